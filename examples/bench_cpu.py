"""CPU benchmark: forward+backward of one MoE layer (transformers' OLMoE/Mixtral sparse block,
grouped_mm experts) under the sonic backend, plain Inductor and eager, with one thread, plus the
bytes saved for backward. Prints a table and writes JSON.

    python examples/bench_cpu.py [--reps 5] [--out examples/results/bench_cpu.json]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from moe_layers import block_output, mixtral_block, olmoe_block  # noqa: E402

from moe_inductor.memory import saved_activation_bytes, sonic_minimum_bytes  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    T: int
    d: int
    n: int
    E: int
    K: int


SHAPES = (Shape("fine-grained (OLMoE block)", 2048, 512, 128, 64, 8),
          Shape("coarse Mixtral-like (Mixtral block)", 2048, 512, 1024, 8, 2))


def time_fwd_bwd(fn, x, reps):
    def step():
        out = block_output(fn(x))
        out.backward(torch.ones_like(out))
    for _ in range(2):  # compile + warm-up
        step()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "bench_cpu.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)  # these machines are shared: one thread gives stable figures
    rows = []
    for shape in SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            build = olmoe_block if shape.E > 8 else mixtral_block
            block = build(shape.d, shape.n, shape.E, shape.K, dtype=dtype)
            params = list(block.parameters())
            x = torch.randn(1, shape.T, shape.d, dtype=dtype, requires_grad=True)
            minimum = sonic_minimum_bytes(shape.T, shape.d, shape.n, shape.T * shape.K, dtype)
            for variant, backend in (("sonic", "sonic"), ("plain Inductor", "inductor"), ("eager", None)):
                torch._dynamo.reset()
                fn = torch.compile(block, backend=backend) if backend else block
                ms = time_fwd_bwd(fn, x, args.reps) * 1e3
                saved, _ = saved_activation_bytes(lambda: block_output(fn(x)), exclude=params)
                row = dict(shape=shape.name, T=shape.T, d=shape.d, n=shape.n, E=shape.E, K=shape.K,
                           dtype=str(dtype).replace("torch.", ""), variant=variant, fwd_bwd_ms=round(ms, 1),
                           saved_bytes=saved, saved_vs_minimum=round(saved / minimum, 2))
                rows.append(row)
                print(f"{shape.name:36s} {row['dtype']:9s} {variant:15s} {ms:9.1f} ms  "
                      f"saved {saved / 2**20:7.1f} MiB ({row['saved_vs_minimum']:.2f}x min)", flush=True)
                write(args.out, rows)  # after every row, so a stopped run keeps what it measured
    write(args.out, rows)
    print(f"wrote {args.out}")


def write(out, rows):
    meta = dict(machine=platform.processor() or platform.machine(), cpu_threads=1, torch=torch.__version__,
                python=platform.python_version(), statistic="median forward+backward")
    try:
        meta["cpu_model"] = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(dict(meta=meta, results=rows), indent=1))


if __name__ == "__main__":
    main()
