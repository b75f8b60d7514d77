"""CPU benchmark: sonic against eager and plain Inductor, one thread, fp32, in one process.

    python examples/bench_cpu.py [--quick] [--out examples/results/bench_cpu.json]

Rows (each variant compiled afresh per row, static shapes; variants interleaved within a round):

  inference  transformers' Qwen3-MoE sparse block used on its own (default experts code: the
             per-expert loop), d=1024, n=512, E=64, K=8, under no_grad, at 1, 8, 128, 1024 tokens
  training   forward+backward of transformers' sparse blocks with grouped_mm experts, T=2048,
             d=512: fine-grained (OLMoE block, n=128, E=64, K=8) and coarse (Mixtral block,
             n=1024, E=8, K=2), plus the bytes each path saves for backward against the SonicMoE
             minimum (X + H + scores + indices)

Statistic: the minimum over rounds of the median of the calls in a round (rounds alternate the
variants, so a slow spell of a shared machine hits them alike). Physical limit per row: inference,
the larger of (bytes of the weights of the experts the row's routing picks, averaged over the
16 inputs the row cycles through, one per call, so that weights are not found in cache) / (measured
read bandwidth) and (FLOPs) / (measured dense GEMM rate); training, FLOPs / GEMM rate. Both rates are
measured in the same run on the same thread. Writes JSON (and a PNG when matplotlib is present).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
from moe_layers import block_output, mixtral_block, olmoe_block  # noqa: E402

import moe_inductor  # noqa: E402,F401  (registers the backend)
from moe_inductor.diagnostics.memory import saved_activation_bytes, sonic_minimum_bytes  # noqa: E402

VARIANTS = (("eager", None), ("plain Inductor", "inductor"), ("sonic", "sonic"))
STATISTIC = "min over rounds of the per-round median (variants alternate within a round)"


@dataclasses.dataclass(frozen=True)
class Train:
    name: str
    T: int
    d: int
    n: int
    E: int
    K: int


TRAIN = (Train("fine-grained (OLMoE block)", 2048, 512, 128, 64, 8),
         Train("coarse (Mixtral block)", 2048, 512, 1024, 8, 2))
INFER = dict(d=1024, n=512, E=64, K=8)
TOKENS = (1, 8, 128, 1024)


def qwen3_block(d, n, E, K, seed=0):
    """transformers' Qwen3-MoE sparse block built on its own, as a new user would (its config
    leaves ``_experts_implementation`` unset: the experts' own per-expert loop runs)."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    torch.manual_seed(seed)
    block = Qwen3MoeSparseMoeBlock(Qwen3MoeConfig(hidden_size=d, moe_intermediate_size=n, num_experts=E,
                                                  num_experts_per_tok=K))
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return block.eval()


# ------------------------------------------------------------------------------------ rates
def read_bandwidth(mb=512, reps=5) -> float:
    """Bytes per second of a single-thread streaming read (sum of a tensor far larger than cache)."""
    t = torch.ones(mb * 2**20 // 4)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        t.sum()
        best = min(best, time.perf_counter() - t0)
    return t.numel() * 4 / best


def gemm_rate(m=2048, k=1024, n=1024, reps=5) -> float:
    """FLOP/s of a dense fp32 GEMM of about the training rows' size."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * m * k * n / best


# ------------------------------------------------------------------------------------ timing
def interleaved(fns: dict, rounds: int, calls: int) -> dict:
    """{name: (statistic in ms, [per-round medians])}: every round runs each fn ``calls`` times."""
    per = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            ts = []
            for _ in range(calls):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
            per[name].append(statistics.median(ts) * 1e3)
    return {k: (min(v), v) for k, v in per.items()}


POOL = 16  # inputs cycled in the inference rows


def _cycling(fn, pool):
    state = {"i": 0}

    def call():
        state["i"] = (state["i"] + 1) % len(pool)
        return fn(pool[state["i"]])

    return call


def picked_experts(block, x) -> int:
    with torch.no_grad():
        logits = torch.nn.functional.linear(x.reshape(-1, x.shape[-1]), block.gate.weight)
        return int(torch.topk(logits, block.gate.top_k, dim=-1).indices.unique().numel())


def inference_rows(args, bw, rate):
    rows = []
    d, n, E, K = INFER["d"], INFER["n"], INFER["E"], INFER["K"]
    block = qwen3_block(d, n, E, K)
    for T in args.tokens:
        # a pool of inputs cycled call by call: each call routes to other experts, as successive
        # decode steps do (one repeated input would find its few experts' weights in cache)
        pool = [torch.randn(1, T, d, generator=torch.Generator().manual_seed(1000 * T + i)) for i in range(POOL)]
        x = pool[0]
        fns = {}
        with torch.no_grad():
            want = block(x)
            for name, backend in VARIANTS:
                torch._dynamo.reset()
                fn = torch.compile(block, backend=backend, dynamic=False) if backend else block
                for _ in range(3):  # compile, recompile-free warm-up
                    got = fn(x)
                err = ((got - want).norm() / want.norm()).item()
                fns[name] = _cycling(fn, pool)
                rows.append(dict(kind="inference", tokens=T, d=d, n=n, E=E, K=K, variant=name, rel_err_vs_eager=err))
            calls = 15 if T <= 128 else 5
            timed = interleaved(fns, args.rounds, calls)
        picked = statistics.mean(picked_experts(block, p) for p in pool)
        bytes_ = int(picked * 3 * d * n * 4)
        flops = 2 * T * K * 3 * d * n
        limit = max(bytes_ / bw, flops / rate) * 1e3
        for r in rows[-len(VARIANTS):]:
            ms, rounds = timed[r["variant"]]
            r.update(ms=round(ms, 3), round_medians_ms=[round(v, 3) for v in rounds], picked_experts=picked,
                     weight_bytes=bytes_, flops=flops, limit_ms=round(limit, 3), vs_limit=round(ms / limit, 2))
        report(rows[-len(VARIANTS):])
    return rows


def training_rows(args, rate):
    rows = []
    for shape in [t for t in TRAIN if t.name.split(" ")[0].split("-")[0] in args.train_shapes.split(",")]:
        build = olmoe_block if shape.E > 8 else mixtral_block
        block = build(shape.d, shape.n, shape.E, shape.K)
        params = list(block.parameters())
        x = torch.randn(1, shape.T, shape.d, requires_grad=True)
        minimum = sonic_minimum_bytes(shape.T, shape.d, shape.n, shape.T * shape.K, torch.float32)
        flops = 3 * 2 * shape.T * shape.K * 3 * shape.d * shape.n  # forward GEMMs, twice that backward
        fns, made = {}, []
        for name, backend in VARIANTS:
            torch._dynamo.reset()
            fn = torch.compile(block, backend=backend, dynamic=False) if backend else block

            def step(fn=fn):
                out = block_output(fn(x))
                out.backward(torch.ones_like(out))

            for _ in range(2):
                step()
            saved, _ = saved_activation_bytes(lambda fn=fn: block_output(fn(x)), exclude=params)
            fns[name] = step
            made.append(dict(kind="training", shape=shape.name, T=shape.T, d=shape.d, n=shape.n, E=shape.E,
                             K=shape.K, variant=name, saved_bytes=saved, saved_vs_minimum=round(saved / minimum, 2)))
        timed = interleaved(fns, args.rounds, args.train_calls)
        for r in made:
            ms, rounds = timed[r["variant"]]
            limit = flops / rate * 1e3
            r.update(ms=round(ms, 1), round_medians_ms=[round(v, 1) for v in rounds], flops=flops,
                     limit_ms=round(limit, 1), vs_limit=round(ms / limit, 2))
        report(made)
        rows.extend(made)
    return rows


def report(rows):
    best_peer = min(r["ms"] for r in rows if r["variant"] != "sonic")
    for r in rows:
        what = f"T={r['tokens']:5d}" if r["kind"] == "inference" else r["shape"]
        extra = f"  saved {r['saved_vs_minimum']:.2f}x min" if "saved_vs_minimum" in r else ""
        print(f"{r['kind']:9s} {what:28s} {r['variant']:15s} {r['ms']:10.3f} ms  {r['vs_limit']:5.2f}x limit  "
              f"{r['ms'] / best_peer:5.2f}x best peer{extra}", flush=True)


def meta(bw, rate, args):
    m = dict(machine=platform.machine(), cpu_threads=torch.get_num_threads(), torch=torch.__version__,
             python=platform.python_version(), statistic=STATISTIC, rounds=args.rounds,
             read_bandwidth_GBps=round(bw / 1e9, 2), gemm_GFLOPs=round(rate / 1e9, 1), dtype="float32")
    try:
        import transformers

        m["transformers"] = transformers.__version__
        m["cpu_model"] = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
        m["load_average_at_end"] = os.getloadavg()
    except Exception:
        pass
    return m


def plot(rows, path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    groups = {}
    for r in rows:
        key = f"T={r['tokens']}" if r["kind"] == "inference" else r["shape"].split(" ")[0] + " train"
        groups.setdefault(key, {})[r["variant"]] = r
    fig, ax = plt.subplots(figsize=(9, 4))
    names = [v for v, _ in VARIANTS]
    width = 0.8 / (len(names) + 1)
    for i, name in enumerate(names + ["physical limit"]):
        vals = []
        for g in groups.values():
            best = min(g[v]["ms"] for v in names if v != "sonic")
            vals.append((g[names[0]]["limit_ms"] if name == "physical limit" else g[name]["ms"]) / best)
        ax.bar([j + i * width for j in range(len(groups))], vals, width, label=name)
    ax.axhline(1.0, color="k", lw=0.5)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))], list(groups))
    ax.set_ylabel("time / faster of eager and plain Inductor")
    ax.set_title("one MoE layer, CPU, one thread, fp32 (lower is better)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "bench_cpu.json"))
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--train-calls", type=int, default=3)
    ap.add_argument("--tokens", type=lambda s: [int(t) for t in s.split(",")], default=list(TOKENS))
    ap.add_argument("--no-training", action="store_true")
    ap.add_argument("--no-inference", action="store_true")
    ap.add_argument("--train-shapes", default="fine,coarse", help="comma list of: fine, coarse")
    ap.add_argument("--quick", action="store_true", help="tiny run to check the script (2 rounds, tokens 1,8)")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.train_calls, args.tokens, args.no_training = 2, 1, [1, 8], True
    torch.set_num_threads(1)
    bw, rate = read_bandwidth(), gemm_rate()
    print(f"read bandwidth {bw / 1e9:.2f} GB/s, dense GEMM {rate / 1e9:.1f} GFLOP/s (one thread)", flush=True)
    rows = [] if args.no_inference else inference_rows(args, bw, rate)
    if not args.no_training:
        rows += training_rows(args, rate)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(meta=meta(bw, rate, args), results=rows), indent=1))
    print(f"wrote {out}")
    if plot(rows, out.with_suffix(".png")):
        print(f"wrote {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
