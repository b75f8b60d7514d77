"""How the sonic rewrite's own compile time scales: seconds spent in ``rewrite_moe`` against the
number of nodes of the Dynamo graphs it reads, for tiny transformers Mixtral models with 2 to 24
layers, in two spellings of the MoE block (transformers' default grouped_mm experts: sorted
rows, the ``assignment_rows`` composition; transformers-4.x-style per-expert loops: the per-expert composition,
the largest graphs per block). And, for 2 and 24 layers, the share of the rewrite in the first call
of ``torch.compile(model, backend="sonic")`` (Dynamo, AOTAutograd, the rewrite, Inductor's code
generation and C++ compilation, the run; forward only).

Graphs are captured once per model (a backend that keeps a copy of each graph); the rewrite then
runs on fresh copies, ``--reps`` times, median. The growth exponent is the least-squares slope of
log(rewrite seconds) against log(nodes) over the layer counts (1.0 = linear). First calls run in
fresh subprocesses with an empty Inductor cache directory and the FX graph / AOTAutograd caches off.

    python examples/bench_rewrite_scaling.py [--layers 2,4,8,16,24] [--reps 3] [--first-call 2,24]
                                             [--out examples/results/rewrite_scaling_cpu.json]
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KINDS = ("grouped_mm", "loop")


def _model(kind: str, layers: int):
    sys.path.insert(0, str(ROOT / "tests"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import hf_models
    from moe_modules import mixtral_with_loop_moe

    for key in ("num_hidden_layers", "n_layers", "num_layers"):
        hf_models._COMMON[key] = layers
    model, ids = hf_models.build("mixtral")
    if kind == "loop":
        model = mixtral_with_loop_moe(model)
    return model.eval(), ids


def scaling(kind: str, layers: int, reps: int) -> dict:
    import torch
    from moe_inductor.compile.backend import rewrite_moe
    from moe_inductor.dynamo.dynamo_scope import mark_sonic
    from moe_inductor.compile.options import SonicOptions

    model, ids = _model(kind, layers)
    graphs = []

    @mark_sonic
    def keep(gm, example_inputs):
        graphs.append(copy.deepcopy(gm))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=keep)(ids)
    times, rewrites = [], 0
    for g in [copy.deepcopy(g) for g in graphs]:  # warm-up (first use of the patterns), not timed
        rewrite_moe(g, SonicOptions())
    for _ in range(reps):
        copies = [copy.deepcopy(g) for g in graphs]
        t0 = time.perf_counter()
        reports = [rewrite_moe(g, SonicOptions()) for g in copies]
        times.append(time.perf_counter() - t0)
        rewrites = sum(len(r.rewritten) for r in reports)
    return dict(kind=kind, layers=layers, graphs=len(graphs), nodes=sum(len(g.graph.nodes) for g in graphs),
                rewrite_s=statistics.median(times), rewrite_s_all=times, rewrites=rewrites)


def first_call_child(kind: str, layers: int) -> None:
    import torch
    import torch._inductor.compile_fx  # noqa: F401  (import cost outside the clock)
    import moe_inductor.compile.backend as sonic_backend
    from torch._dynamo.utils import counters

    spent = dict(s=0.0)
    original = sonic_backend.rewrite_moe

    def timed(*a, **k):
        t0 = time.perf_counter()
        try:
            return original(*a, **k)
        finally:
            spent["s"] += time.perf_counter() - t0

    sonic_backend.rewrite_moe = timed
    model, ids = _model(kind, layers)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="sonic")
    t0 = time.perf_counter()
    with torch.no_grad():
        compiled(ids)
    first = time.perf_counter() - t0
    print(json.dumps(dict(kind=kind, layers=layers, first_call_s=first, rewrite_s=spent["s"],
                          rewrite_share=spent["s"] / first, moe_rewrites=int(counters["sonic"]["moe_rewrites"]))))


def first_call(kind: str, layers: int, timeout: int) -> dict:
    cache = tempfile.mkdtemp(prefix="inductor_cache_")
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, TORCHINDUCTOR_FX_GRAPH_CACHE="0",
               TORCHINDUCTOR_AUTOGRAD_CACHE="0", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, __file__, "--child", kind, str(layers)], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=str(ROOT))
    if proc.returncode != 0:
        return dict(kind=kind, layers=layers, error=proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def slope(rows: list) -> float:
    xs = [math.log(r["nodes"]) for r in rows]
    ys = [math.log(r["rewrite_s"]) for r in rows]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", default="2,4,8,16,24")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--first-call", default="2,24", help="layer counts whose first call is timed ('' for none)")
    ap.add_argument("--timeout", type=int, default=1800)
    ap.add_argument("--out", default=str(ROOT / "examples" / "results" / "rewrite_scaling_cpu.json"))
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        first_call_child(args.child[0], int(args.child[1]))
        return
    import torch

    layers = [int(x) for x in args.layers.split(",") if x]
    kinds = [k for k in args.kinds.split(",") if k]
    meta = dict(machine=platform.machine(), cpu_count=os.cpu_count(), torch=torch.__version__,
                python=platform.python_version(), reps=args.reps,
                loadavg_at_start=os.getloadavg() if hasattr(os, "getloadavg") else None,
                started=time.strftime("%Y-%m-%d %H:%M:%S"),
                note="shared 2-core machine; other jobs may run at the same time (loadavg recorded)")
    rows = []
    for kind in kinds:
        for n in layers:
            r = scaling(kind, n, args.reps)
            rows.append(r)
            print(f"{kind:10s} layers {n:3d}  graphs {r['graphs']:2d}  nodes {r['nodes']:6d}  rewrites {r['rewrites']:3d}  "
                  f"rewrite {r['rewrite_s'] * 1e3:8.1f} ms  ({r['rewrite_s'] * 1e6 / r['nodes']:.1f} us/node)")
    slopes = {k: slope([r for r in rows if r["kind"] == k]) for k in kinds if len(layers) > 1}
    for k, s in slopes.items():
        print(f"{k}: rewrite time grows as nodes^{s:.2f} (1.0 = linear)")
    firsts = []
    for n in [int(x) for x in args.first_call.split(",") if x]:
        for kind in kinds:
            r = first_call(kind, n, args.timeout)
            firsts.append(r)
            if "error" in r:
                print(f"first call {kind} {n} layers: failed: {r['error'][-300:]}")
            else:
                print(f"first call {kind:10s} {n:3d} layers: {r['first_call_s']:7.1f} s, rewrite {r['rewrite_s']:.3f} s "
                      f"= {100 * r['rewrite_share']:.2f}% ({r['moe_rewrites']} blocks rewritten)")
    meta["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    meta["loadavg_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(meta=meta, scaling=rows, growth_exponent=slopes, first_call=firsts), indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
