"""Compile-time overhead of the sonic rewrite: wall-clock time of the first call (Dynamo capture,
AOT autograd, the sonic rewrite, Inductor code generation and C++ compilation, and the run itself)
of ``torch.compile(model, backend="sonic")`` against ``torch.compile(model, backend="inductor")``
on tiny 2-layer transformers MoE models (tests/hf_models.py: Mixtral and Qwen3-MoE, default
grouped_mm experts, fp32), forward only (eval, ``torch.no_grad``) and forward+backward (train).

Every measurement runs in a fresh subprocess with a fresh, empty ``TORCHINDUCTOR_CACHE_DIR`` and
``TORCHINDUCTOR_FX_GRAPH_CACHE=0``, ``TORCHINDUCTOR_AUTOGRAD_CACHE=0``, so that neither backend
profits from the other's caches. The order sonic/inductor alternates between repeats. Imports
(torch, transformers, ``torch._inductor.compile_fx``, and for sonic ``moe_inductor.compile.backend``) and
building the model happen before the clock starts; the plain-Inductor child never imports
moe_inductor (importing its backend sets a global Dynamo flag). In the sonic child
``moe_inductor.compile.backend.rewrite_moe`` is wrapped to time the rewrite itself.

    python examples/bench_compile_time.py [--reps 3] [--families mixtral,qwen3_moe]
                                          [--out examples/results/compile_time_cpu.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sweep_families import cpu_model  # same folder; stdlib-only imports

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "examples" / "results" / "compile_time_cpu.json"
BACKENDS = ("sonic", "inductor")
MODES = ("fwd", "fwd+bwd")
TARGET_RATIO = 1.25


def child(family, backend, mode):
    sys.path.insert(0, str(ROOT / "tests"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import torch._dynamo
    import torch._inductor.compile_fx  # noqa: F401  (import cost outside the clock, both backends)
    from torch._dynamo.utils import counters

    import hf_models

    rewrite = dict(seconds=0.0, calls=0)
    t_import = 0.0
    if backend == "sonic":
        t = time.perf_counter()
        import moe_inductor.compile.backend as sonic_backend
        t_import = time.perf_counter() - t
        original = sonic_backend.rewrite_moe

        def timed_rewrite(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                rewrite["seconds"] += time.perf_counter() - t0
                rewrite["calls"] += 1

        sonic_backend.rewrite_moe = timed_rewrite  # sonic() looks the name up in its module at call time

    model, ids = hf_models.build(family)
    blocks = len(hf_models.moe_modules(model))
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend=backend)

    def step():
        if mode == "fwd":
            with torch.no_grad():
                out = compiled(ids)
        else:
            out = compiled(ids)
        t = out.logits if getattr(out, "logits", None) is not None else out[0]
        if mode == "fwd+bwd":
            t.float().sum().backward()

    if mode == "fwd":
        model.eval()
    else:
        model.train()
    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    step()
    second = time.perf_counter() - t0
    print(json.dumps(dict(
        family=family, backend=backend, mode=mode, first_call_s=first, second_call_s=second,
        rewrite_s=rewrite["seconds"], rewrite_calls=rewrite["calls"], sonic_import_s=t_import,
        moe_rewrites=int(counters["sonic"]["moe_rewrites"]), blocks=blocks,
        frames_compiled=int(counters["stats"]["unique_graphs"]),
        compile_threads=torch._inductor.config.compile_threads)))


def run_child(family, backend, mode, timeout):
    cache = tempfile.mkdtemp(prefix="inductor_cache_")
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, TORCHINDUCTOR_FX_GRAPH_CACHE="0",
               TORCHINDUCTOR_AUTOGRAD_CACHE="0", HF_HUB_OFFLINE="1")
    env.pop("TORCH_LOGS", None)
    try:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--child", family, backend, mode], env=env,
                              capture_output=True, text=True, timeout=timeout, cwd=str(ROOT))
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"{family} {backend} {mode}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
        rec = json.loads(proc.stdout.strip().splitlines()[-1])
        rec["process_wall_s"] = wall
        rec["loadavg_1min_after"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        return rec
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def machine():
    import torch

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return dict(processor=platform.processor(), cpu_model=cpu_model(), machine=platform.machine(),
                cpu_count=os.cpu_count(), torch=torch.__version__, python=platform.python_version(),
                loadavg_at_start=load,
                note="shared machine: other jobs (tests, benchmarks of other agents) ran at the same time; "
                     "the order sonic/inductor alternates between repeats to spread that noise")


def summarise(runs, families, reps):
    rows = []
    for fam in families:
        for mode in MODES:
            sel = {b: [r for r in runs if r["family"] == fam and r["mode"] == mode and r["backend"] == b]
                   for b in BACKENDS}
            if not all(sel.values()):
                continue
            med = {b: statistics.median(r["first_call_s"] for r in sel[b]) for b in BACKENDS}
            rw = statistics.median(r["rewrite_s"] for r in sel["sonic"])
            rows.append(dict(
                family=fam, mode=mode, n=min(len(v) for v in sel.values()),
                sonic_first_call_s=med["sonic"], inductor_first_call_s=med["inductor"],
                ratio=med["sonic"] / med["inductor"],
                ratios_per_repeat=[s["first_call_s"] / i["first_call_s"] for s, i in zip(sel["sonic"], sel["inductor"])],
                sonic_rewrite_s=rw, rewrite_share_of_sonic=rw / med["sonic"],
                sonic_import_s=statistics.median(r["sonic_import_s"] for r in sel["sonic"]),
                moe_rewrites=sel["sonic"][0]["moe_rewrites"], blocks=sel["sonic"][0]["blocks"],
                sonic_second_call_s=statistics.median(r["second_call_s"] for r in sel["sonic"]),
                inductor_second_call_s=statistics.median(r["second_call_s"] for r in sel["inductor"]),
                within_target=med["sonic"] / med["inductor"] <= TARGET_RATIO))
    return rows


def print_table(rows):
    head = ("model", "mode", "n", "sonic s", "inductor s", "ratio", "per-repeat ratios", "rewrite s", "rewrites")
    out = [head]
    for r in rows:
        out.append((r["family"], r["mode"], str(r["n"]), f"{r['sonic_first_call_s']:.1f}",
                    f"{r['inductor_first_call_s']:.1f}", f"{r['ratio']:.2f}",
                    " ".join(f"{x:.2f}" for x in r["ratios_per_repeat"]), f"{r['sonic_rewrite_s']:.3f}",
                    f"{r['moe_rewrites']}/{r['blocks']}"))
    widths = [max(len(row[i]) for row in out) for i in range(len(head))]
    for row in out:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--families", default="mixtral,qwen3_moe")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--timeout", type=int, default=900, help="seconds per child")
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return

    families = [f for f in args.families.split(",") if f]
    modes = [m for m in args.modes.split(",") if m]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(machine(), reps=args.reps, target_ratio=TARGET_RATIO,
                measured="wall-clock seconds of the first call (compile + run) of a fresh process; median over "
                         "repeats; fresh empty Inductor cache dir per run, FX graph and AOT autograd caches off",
                started=time.strftime("%Y-%m-%d %H:%M:%S"))
    runs = []
    for rep in range(args.reps):
        order = BACKENDS if rep % 2 == 0 else BACKENDS[::-1]
        for fam in families:
            for mode in modes:
                for backend in order:
                    rec = run_child(fam, backend, mode, args.timeout)
                    rec["repeat"] = rep
                    runs.append(rec)
                    print(f"[rep {rep}] {fam} {mode} {backend}: first call {rec['first_call_s']:.2f}s "
                          f"(rewrite {rec['rewrite_s']:.3f}s, rewrites {rec['moe_rewrites']}/{rec['blocks']}), "
                          f"second call {rec['second_call_s']:.3f}s", flush=True)
                    rows = summarise(runs, families, args.reps)
                    out.write_text(json.dumps(dict(meta=meta, summary=rows, runs=runs), indent=1) + "\n")
    meta["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    meta["loadavg_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    rows = summarise(runs, families, args.reps)
    out.write_text(json.dumps(dict(meta=meta, summary=rows, runs=runs), indent=1) + "\n")
    print()
    print_table(rows)


if __name__ == "__main__":
    main()
