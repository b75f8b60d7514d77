"""Padding waste of the grouped GEMMs: plain top-k vs token rounding, on two MoE shapes.

Padding waste = sum_e (ceil(f_e / M) * M - f_e) / sum_e f_e: the fraction of extra GEMM rows that
row tiles of M = TILE_M compute because expert e's f_e rows are not a multiple of M.

Router probabilities come from a *random* router: P = softmax(x @ W_r) with x ~ N(0, 1) of shape
(T, d) and W_r ~ N(0, 1/d) of shape (d, E), seeded. Logits are then ~N(0, 1) per expert, so
expert loads are close to balanced (f_e ~ T*K/E with binomial spread). A trained router is less
balanced; the waste of top-k depends on the load distribution, token rounding's is 0 by
construction, so treat the top-k figures as indicative. n (the expert intermediate size) does
not enter the waste figure; it is recorded with the shape for reference.

Usage: PYTHONPATH=. python examples/padding_waste.py [--out examples/results/padding_waste.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from dataclasses import asdict, dataclass

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from moe_inductor.kernels.config import TILE_M  # noqa: E402
from moe_inductor.ops.routing import MODES, padding_waste, token_rounding_routing, topk_routing  # noqa: E402

# (T, d, n, E, K): a fine-grained MoE layer (many small experts) and a DeepSeek-V3-like layer.
SHAPES = [(16384, 1536, 256, 256, 8), (8192, 7168, 2048, 256, 8)]


@dataclass(frozen=True)
class WasteResult:
    T: int
    d: int
    n: int
    E: int
    K: int
    tile_m: int
    routing: str  # "topk" or "token_rounding:<mode>"
    assignments: int  # A = sum of expert counts
    assignments_vs_topk: float  # A / (T*K)
    padded_rows: int  # sum_e ceil(f_e/M)*M
    padding_waste: float
    experts_used: int
    min_count: int
    max_count: int


def random_router_probs(T: int, d: int, E: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d, generator=g)
    w_router = torch.randn(d, E, generator=g) / d ** 0.5
    return (x @ w_router).softmax(-1)


def measure(shape, tile_m: int, seed: int) -> list[WasteResult]:
    T, d, n, E, K = shape
    probs = random_router_probs(T, d, E, seed)
    routings = [("topk", topk_routing(probs, K))]
    routings += [(f"token_rounding:{m}", token_rounding_routing(probs, K, tile_m, m)) for m in MODES]
    results = []
    for name, r in routings:
        counts = r.counts
        padded = int((-(-counts // tile_m) * tile_m).sum())
        A = int(counts.sum())
        results.append(WasteResult(
            T, d, n, E, K, tile_m, name, A, A / (T * K), padded, padding_waste(counts, tile_m),
            int((counts > 0).sum()), int(counts.min()), int(counts.max()),
        ))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "padding_waste.json"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    all_results = []
    print(f"TILE_M = {TILE_M} (moe_inductor/kernels/config.py); random router, seed {args.seed}")
    print(f"{'T,d,n,E,K':>28} {'routing':>24} {'A/(TK)':>8} {'waste':>8} {'experts':>7} {'min..max f':>12}")
    for shape in SHAPES:
        for r in measure(shape, TILE_M, args.seed):
            all_results.append(asdict(r))
            print(f"{str(shape):>28} {r.routing:>24} {r.assignments_vs_topk:8.4f} {r.padding_waste:8.2%} "
                  f"{r.experts_used:7d} {f'{r.min_count}..{r.max_count}':>12}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({
            "description": "padding waste = sum_e(ceil(f_e/M)*M - f_e) / sum_e f_e, M = TILE_M",
            "router": "random: softmax(x @ W_r), x ~ N(0,1) (T,d), W_r ~ N(0,1/d) (d,E), torch.Generator seed",
            "seed": args.seed,
            "tile_m": TILE_M,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "results": all_results,
        }, fh, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
