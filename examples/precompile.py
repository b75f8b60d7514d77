"""Compile every Triton kernel the GPU check will launch, in parallel, before the first timed step.

    python examples/precompile.py [--out precompile.json] [--workers 16] [--shapes 0,4]
        [--plan-only] [--device cuda|cpu] [--limit N] [--kernels name,...]

The GPU tests and the benchmark launch ~30 autotune configs of each grouped GEMM plus the small
kernels, per dtype, activation and row tile; Triton compiles each one the first time it is
launched, one after another (3-8 s each). This step compiles them all first, in ``--workers``
processes, into Triton's on-disk cache (TRITON_CACHE_DIR), so the later launches load them.

1. Discovery (examples/kernel_resources.py's, reused): the check's own launches -- every case of
   tests/gpu/test_gpu_numerics.py at its shape and routing, the CUDA-graph test's two, the
   benchmark's sonic and sonic_tr rows at its shapes -- run through the fused op with Triton's
   ``jit_cache_hook``, which receives what JITFunction._do_compile would compile (signature,
   constexprs, specialisation attributes, options) and skips the compile and the launch; an
   autotuned kernel records every candidate its autotuner would benchmark (after the per-dtype
   pruning). On a GPU (``--device cuda``) this binds CUDA tensors at the real shapes through the
   real driver: the records are the launches' own. On CPU (tests, the dry run, ``--plan-only``
   without a GPU) a stand-in driver reports sm_90 and the shapes are scaled down (d and n / 16)
   for the plan.
2. Compilation: each distinct record is compiled by ``kernel_resources.compile_launch`` -- the
   very call JITFunction._do_compile makes (``triton.compile(ASTSource(fn, signature, constexprs,
   attrs), target, options)``, triton 3.6 and 3.9) -- in spawned worker processes. Triton's cache
   key is a hash of Triton's version, the source and those four, the backend (arch, ptxas
   version) and the cache-invalidating environment: a later launch of the same specialisation on
   the same machine is a cache hit. tests/test_precompile.py checks that on CPU against the JIT's
   own compile path (stand-in sm_90 driver). A record that does not match a later launch (e.g. a
   data-dependent int that specialises differently) only costs that launch its compile, as
   without this step.
3. The plan: per step of the check, the kernels to compile, the estimated compile time at the
   worker count (longest-first over the workers, per-compile times measured with
   kernel_resources' sm_90 compile: examples/results/compile_times_sm90.json) and the estimated
   run time (reasoned: RUN_MODEL below). Printed before compiling, written to the JSON.
"""
from __future__ import annotations

import argparse
import heapq
import importlib
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path

if __name__ == "__main__" and os.environ.get("TRITON_INTERPRET") == "1":
    # compiles for the GPU: @triton.jit must not become the interpreter's (the dry run sets it)
    os.execve(sys.executable, [sys.executable, *sys.argv], {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})

ROOT = Path(__file__).resolve().parents[1]
TIMES = ROOT / "examples" / "results" / "compile_times_sm90.json"
PLAN_LIMIT_S = 480.0  # the default GPU check's budget: its plan must fit 8 minutes

# Reasoned run-time model (no GPU measurement yet; replace by measured figures after a GPU run):
#   per GPU-test case: triton + torch paths forward and backward at T=4096 plus the comparison
#   per autotune candidate benchmarked: Triton's do_bench (warmup 25 ms + rep 100 ms) + overhead
#   per bench row: correctness gate + do_bench(rep 500 ms) of forward and of forward+backward
#   per Inductor compile of a transformers row (compiled / max-autotune-no-cudagraphs), per shape
RUN_MODEL = {"test_case_s": 2.0, "autotune_candidate_s": 0.15, "bench_row_s": 3.0, "environment_s": 15.0,
             "inductor_compile_s": 25.0, "inductor_max_autotune_s": 60.0, "graph_and_backend_tests_s": 40.0,
             "gpu_discovery_s": 20.0}  # the last: imports + the op's torch parts at the real shapes, kernels skipped
BENCH_CORE_IMPLS = ("sonic", "sonic_tr", "hf_grouped_mm", "liger", "dense")


def _kernel_resources():
    sys.path.insert(0, str(ROOT / "examples"))
    import kernel_resources

    return kernel_resources


def _dtype_label(dtype) -> str:
    import torch

    if dtype == torch.float32:
        return "fp32_tf32" if os.environ.get("MOE_INDUCTOR_ALLOW_TF32") == "1" else "fp32"
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def _scale(shape: tuple, scale: int) -> tuple:
    T, d, n, E, K = shape
    return (T, d // scale, n // scale, E, K)


def _gpu_test_module(as_on_gpu: bool):
    """tests/gpu/test_gpu_numerics, imported as a GPU run sees it (its cases and shapes are chosen
    at import from torch.cuda.is_available()) when ``as_on_gpu`` (the plan of a GPU run on CPU)."""
    import torch

    sys.path.insert(0, str(ROOT / "tests" / "gpu"))
    sys.modules.pop("test_gpu_numerics", None)
    saved = torch.cuda.is_available
    if as_on_gpu:
        torch.cuda.is_available = lambda: True
    try:
        return importlib.import_module("test_gpu_numerics")
    finally:
        torch.cuda.is_available = saved


def gpu_test_scenarios(scale: int = 1, as_on_gpu: bool = False) -> list:
    """The launches of tests/gpu/test_gpu_numerics.py: its cases (those that run in this mode) and
    the CUDA-graph test's two (T = 1024, bf16, biases; dropped and static token rounding)."""
    kr = _kernel_resources()
    tg = _gpu_test_module(as_on_gpu)
    from moe_inductor.ops.activations import parse_activation

    base = (tg.BASE.T, tg.BASE.d, tg.BASE.n, tg.BASE.E, tg.BASE.K)
    out = []
    for p in tg.CORE_CASES + tg.MORE_CASES:
        case = getattr(p, "values", (p,))[0]
        if getattr(p, "marks", ()) or not parse_activation(case.activation).triton:
            continue  # skipped there
        shape = _scale((case.T or base[0],) + base[1:], scale)
        out.append(kr.Scenario(_dtype_label(case.dtype), case.activation, case.bias, case.interleaved,
                               case.recompute_h, shape, case.routing, tg.TR_TILE_M))
    graph_T = min(base[0], 1024) if tg.HAS_CUDA else base[0]
    for routing in ("dropped", "token_rounding"):
        out.append(kr.Scenario("bf16", "swiglu", True, False, False, _scale((graph_T,) + base[1:], scale),
                               routing, tg.TR_TILE_M))
    return out


def bench_scenarios(shapes: list, tile_m: int, scale: int = 1) -> list:
    """bench_kernels' sonic (top-k) and sonic_tr (token rounding, dynamic length) rows: bf16 SwiGLU."""
    kr = _kernel_resources()
    out = []
    for shape in shapes:
        for routing in ("topk", "token_rounding_dynamic"):
            out.append(kr.Scenario("bf16", "swiglu", False, False, False, _scale(tuple(shape), scale), routing, tile_m))
    return out


def check_scenarios(dry_run: bool, shape_ids, scale: int, as_on_gpu: bool = False) -> dict:
    """{step: scenarios} of the GPU check (dry run: its tiny shapes)."""
    sys.path.insert(0, str(ROOT / "examples"))
    import bench_kernels

    if dry_run:
        shapes, tile_m = [bench_kernels.SMOKE_SHAPE], bench_kernels.SMOKE_TILE_M
    else:
        from moe_inductor.kernels.config import TILE_M as tile_m

        shapes = [bench_kernels.SHAPES[i] for i in shape_ids]
    return {"gpu_tests": gpu_test_scenarios(scale, as_on_gpu), "bench": bench_scenarios(shapes, tile_m, scale)}


def discover(scenarios_by_step: dict, device: str, arch: int = 90) -> tuple[dict, list]:
    """{step: [Launch]} recorded through the fused op (kernel_resources.record_launches), and the
    scenario errors."""
    kr = _kernel_resources()
    import torch

    torch.set_num_threads(min(8, os.cpu_count() or 1))
    jits, tuners = kr.discover_kernels(kr.kernel_modules())
    out, errors = {}, []
    for step, scenarios in scenarios_by_step.items():
        launches, errs = kr.record_launches(scenarios, [arch], jits, tuners, device=device)
        out[step] = launches
        errors += errs
    return out, errors


def job_of(launch) -> dict:
    """A picklable description of one compile (a spawned worker imports the kernel itself)."""
    fn = launch.fn.fn
    return {"module": fn.__module__, "name": fn.__name__, "kernel": launch.kernel, "dtype": launch.dtype,
            "config": launch.config, "signature": launch.signature, "constants": launch.constants,
            "attrs": launch.attrs, "options": launch.options, "arch": launch.arch,
            "spec_key": launch.spec_key()}


def compile_job(job: dict) -> dict:
    """Runs in a worker: kernel_resources.compile_launch of the job into TRITON_CACHE_DIR."""
    kr = _kernel_resources()
    fn = kr._unwrap(getattr(importlib.import_module(job["module"]), job["name"]))
    t0 = time.time()
    try:
        k = kr.compile_launch(fn, job["signature"], job["constants"], job["attrs"], job["options"], job["arch"])
    except Exception as exc:  # noqa: BLE001 - reported; the launch will compile (and fail) at run time
        return {"spec_key": job["spec_key"], "error": f"{type(exc).__name__}: {str(exc)[:300]}",
                "compile_s": round(time.time() - t0, 2), "pid": os.getpid()}
    return {"spec_key": job["spec_key"], "hash": k.hash, "compile_s": round(time.time() - t0, 2), "pid": os.getpid()}


def compile_all(jobs: list, workers: int, log=print) -> list:
    """Compiles the jobs in ``workers`` spawned processes (longest expected first); results in
    completion order. Spawned, not forked: the parent may hold a CUDA context."""
    if not jobs:
        return []
    t0 = time.time()
    results = []
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(max(1, min(workers, len(jobs)))) as pool:
        for res in pool.imap_unordered(compile_job, jobs):
            results.append(res)
            if len(results) % 10 == 0 or len(results) == len(jobs):
                log(f"  {len(results)}/{len(jobs)} compiled ({time.time() - t0:.0f} s)")
    return results


def jit_compile_hashes(scenarios: list, kernels: set, arch: int = 90) -> list:
    """Hashes of what JITFunction.run itself compiles for the scenarios' launches of ``kernels``
    (CPU tensors, stand-in sm_90 driver; run forced to warmup=True: Triton's own binder,
    specialisation and _do_compile, no launch). Compiled into TRITON_CACHE_DIR like a real launch:
    after a precompile of the same launches, every one must be a cache hit with the same hash."""
    kr = _kernel_resources()
    from triton.runtime.jit import JITFunction

    hashes = []
    orig = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        if self.fn.__name__ not in kernels:
            return None
        k = orig(self, *args, grid=grid, warmup=True, **kwargs)
        hashes.append(k.hash)
        return k

    jits, tuners = kr.discover_kernels(kr.kernel_modules())
    JITFunction.run = run
    try:
        _, errors = kr.record_launches(scenarios, [arch], jits, tuners, skip_compile=False)
    finally:
        JITFunction.run = orig
    if errors:
        raise RuntimeError(errors)
    return hashes


def derive_times(tables: list) -> dict:
    """The per-compile seconds of kernel_resources' sm_90 tables (each entry was compiled afresh,
    ``ptxas: triton``, one process: ``--jobs 1``), summarised per Triton version, kernel and dtype."""
    out = {"source": "compile_s of every entry of " + ", ".join(str(Path(t).relative_to(ROOT)) for t in tables)
           + " (examples/kernel_resources.py --arch 90 --jobs 1: triton.compile for sm_90 + ptxas, one process, "
             "on the shared 2-core CPU machine of the project; a 16-core GPU host is likely no slower per compile)",
           "by_triton": {}}
    for path in tables:
        table = json.loads(Path(path).read_text())
        minor = ".".join(table["versions"]["triton"].split(".")[:2])
        per: dict = {}
        for e in table["entries"]:
            per.setdefault(e["kernel"], {}).setdefault(e["dtype"], []).append(e["compile_s"])
        out["by_triton"][minor] = {"versions": table["versions"], "kernels": {
            k: {dt: {"n": len(v), "mean_s": round(sum(v) / len(v), 2), "max_s": max(v)} for dt, v in sorted(by.items())}
            for k, by in sorted(per.items())}}
    return out


def load_times(path: Path = TIMES) -> dict:
    """{kernel: {dtype label: mean compile s}} measured for the running Triton's major.minor."""
    import triton

    minor = ".".join(triton.__version__.split(".")[:2])
    table = json.loads(path.read_text())["by_triton"]
    if minor not in table:  # the nearest measured version: an estimate either way
        minor = sorted(table)[-1]
    return {k: {dt: v["mean_s"] for dt, v in by_dt.items()} for k, by_dt in table[minor]["kernels"].items()}


def job_seconds(job: dict, times: dict) -> float:
    by_dt = times.get(job["kernel"])
    if not by_dt:
        return max(v for d in times.values() for v in d.values())  # an unmeasured kernel: the worst
    return by_dt.get(job["dtype"], max(by_dt.values()))


def makespan(seconds: list, workers: int) -> float:
    """Longest-first onto the least loaded of ``workers`` (what a pool fed longest-first does)."""
    loads = [0.0] * max(1, workers)
    for s in sorted(seconds, reverse=True):
        heapq.heappush(loads, heapq.heappop(loads) + s)
    return max(loads)


def _tuned(launches: list) -> int:
    """Autotune candidates the step benchmarks: distinct (autotuner key, config) pairs."""
    return len({(l.tune_key, json.dumps(l.config, sort_keys=True)) for l in launches if l.autotuned})


def make_plan(launches: dict, jobs: list, times: dict, workers: int, n_shapes: int, n_cases: int,
              discovery_s: float, budget_s: float = PLAN_LIMIT_S) -> dict:
    """Per step of the check: kernels to compile, estimated compile and run seconds, and the limit
    the driver will give it (gpu_check's own share arithmetic at ``budget_s``)."""
    m = RUN_MODEL
    secs = [job_seconds(j, times) for j in jobs]
    tune_s = m["autotune_candidate_s"]
    rows = [_row("environment", 0, 0.0, m["environment_s"]),
            _row("precompile", len(jobs), makespan(secs, workers), discovery_s),
            _row("gpu_tests", 0, 0.0, n_cases * m["test_case_s"] + m["graph_and_backend_tests_s"]
                 + _tuned(launches.get("gpu_tests", [])) * tune_s),
            _row("bench:core", 0, 0.0, n_shapes * len(BENCH_CORE_IMPLS) * m["bench_row_s"]
                 + _tuned(launches.get("bench", [])) * tune_s),
            _row("bench:compiled", 0, 0.0, n_shapes * (m["inductor_compile_s"] + m["bench_row_s"]), n_shapes),
            _row("bench:max_autotune", 0, 0.0, n_shapes * (m["inductor_max_autotune_s"] + m["bench_row_s"]), n_shapes)]
    _shares(rows, budget_s)
    required = [r for r in rows if "shapes" not in r]
    total = round(sum(min(r["est_s"], r["share_s"]) for r in rows), 1)
    return {"workers": workers, "budget_s": budget_s, "rows": rows, "total_s": total, "limit_s": budget_s,
            "required_s": round(sum(r["est_s"] for r in required), 1),
            "serial_compile_s": round(sum(secs), 1),
            "within_limit": total <= budget_s and all(r["est_s"] <= r["share_s"] for r in required),
            "measured": "per-compile seconds (examples/results/compile_times_sm90.json); discovery seconds on a GPU",
            "reasoned": "run seconds (precompile.RUN_MODEL); discovery seconds when planned on CPU"}


def _row(step: str, compiles: int, compile_s: float, run_s: float, shapes: int = 0) -> dict:
    row = {"step": step, "compiles": compiles, "compile_s": round(compile_s, 1), "run_s": round(run_s, 1),
           "est_s": round(compile_s + run_s, 1)}
    if shapes:  # a pass that measures the shapes its time allows ("with the time left")
        row["shapes"] = shapes
    return row


def _shares(rows: list, budget_s: float) -> None:
    """Each row's limit as gpu_check's driver sets it (a step uses its estimate, at most its limit;
    the time it leaves flows on), and for the fill-in bench passes the shapes that fit."""
    sys.path.insert(0, str(ROOT / "examples"))
    import gpu_check

    left = budget_s
    steps = [r for r in rows if not r["step"].startswith("bench")]
    for i, r in enumerate(steps):
        r["share_s"] = round(gpu_check.share_of(left, r["step"], [x["step"] for x in steps[i:]] + ["bench"]), 1)
        left -= min(r["est_s"], r["share_s"])
    bench_left = gpu_check.share_of(left, "bench", ["bench"])
    fracs_left = sum(p[2] for p in gpu_check.BENCH_PASSES)
    for (name, _, frac), r in zip(gpu_check.BENCH_PASSES, [r for r in rows if r["step"].startswith("bench")]):
        r["share_s"] = round(gpu_check.pass_share(bench_left, frac, fracs_left), 1)
        fracs_left -= frac
        bench_left -= min(r["est_s"], r["share_s"])
        if "shapes" in r:  # the driver splits a pass evenly over its shapes; one over its part is stopped
            r["shapes_measured"] = r["shapes"] if r["est_s"] <= r["share_s"] else 0


def format_plan(plan: dict) -> str:
    lines = [f"plan at {plan['workers']} compile workers, budget {plan['budget_s']:.0f} s "
             f"(compile s measured per config, run s reasoned):",
             f"  {'step':<20}{'compiles':>9}{'compile s':>11}{'run s':>9}{'limit s':>9}"]
    for r in plan["rows"]:
        note = f"  {r['shapes_measured']} of {r['shapes']} shapes fit" if "shapes" in r else (
            "" if r["est_s"] <= r["share_s"] else "  OVER ITS LIMIT")
        lines.append(f"  {r['step']:<20}{r['compiles']:>9}{r['compile_s']:>11.1f}{r['run_s']:>9.1f}"
                     f"{r['share_s']:>9.1f}{note}")
    lines.append(f"  total {plan['total_s']:.0f} s (limit {plan['limit_s']:.0f} s: "
                 f"{'within' if plan['within_limit'] else 'EXCEEDED'}); the same compiles one after "
                 f"another: {plan['serial_compile_s']:.0f} s")
    return "\n".join(lines)


def run(args, log=print) -> dict:
    dry_run = args.dry_run or os.environ.get("MOE_GPU_CHECK_DRY_RUN") == "1"
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() and not dry_run else "cpu")
    # CPU without the dry run: the plan of a GPU run, at shapes scaled down (d, n / 16)
    scale = 16 if device == "cpu" and not dry_run else 1
    shape_ids = [int(i) for i in args.shapes.split(",")] if args.shapes else list(range(5))
    t0 = time.time()
    by_step = check_scenarios(dry_run, shape_ids, scale, as_on_gpu=scale > 1)
    launches, errors = discover(by_step, device)
    discovery_s = time.time() - t0
    plan_discovery_s = discovery_s if device == "cuda" or dry_run else RUN_MODEL["gpu_discovery_s"]
    kr = _kernel_resources()
    unique, _ = kr.unique_launches([l for ls in launches.values() for l in ls])
    jobs = [job_of(l) for l in unique if not args.kernels or l.kernel.split(".")[-1] in args.kernels]
    times = load_times(Path(args.times))
    jobs.sort(key=lambda j: -job_seconds(j, times))  # longest first: the pool's makespan
    if args.limit is not None:  # the cheapest N (CI): the mechanism, not the whole set
        jobs = jobs[::-1][:args.limit]
    n_cases = sum(1 for sc in by_step["gpu_tests"])
    n_shapes = 1 if dry_run else len(shape_ids)  # the dry run: the smoke shape
    plan = make_plan(launches, jobs, times, args.workers, n_shapes, n_cases, plan_discovery_s, args.budget)
    log(f"discovery: {sum(len(v) for v in launches.values())} launches, {len(unique)} distinct compiles, "
        f"{len(errors)} scenario errors, on {device} in {discovery_s:.1f} s")
    log(format_plan(plan))
    record = {"device": device, "dry_run": dry_run, "scale": scale, "plan": plan, "discovery_errors": errors,
              "triton_cache_dir": os.environ.get("TRITON_CACHE_DIR"), "jobs": len(jobs)}
    if not args.plan_only:
        t1 = time.time()
        results = compile_all(jobs, args.workers, log)
        record.update(compile_wall_s=round(time.time() - t1, 1), compiled=results,
                      errors=[r for r in results if "error" in r])
        log(f"precompiled {len(results)} kernels in {time.time() - t1:.1f} s with {args.workers} workers "
            f"({len(record['errors'])} errors)")
    return record


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="JSON record (plan, compiles)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--shapes", default=None, help="benchmark shape indices (default: all five)")
    ap.add_argument("--dry-run", action="store_true", help="the dry run's tiny shapes (also MOE_GPU_CHECK_DRY_RUN=1)")
    ap.add_argument("--plan-only", action="store_true", help="discovery and the plan, no compile")
    ap.add_argument("--device", choices=("cuda", "cpu"), default=None, help="discovery device (default: cuda if any)")
    ap.add_argument("--limit", type=int, default=None, help="compile only the N cheapest (CI)")
    ap.add_argument("--kernels", default=None, help="only these kernels (function names)")
    ap.add_argument("--times", default=str(TIMES), help="measured per-compile seconds (JSON)")
    ap.add_argument("--budget", type=float, default=PLAN_LIMIT_S, help="the check's budget the plan shares out")
    ap.add_argument("--write-times", action="store_true",
                    help=f"rewrite {TIMES.name} from the committed sm_90 resource tables and exit")
    args = ap.parse_args(argv)
    if args.write_times:
        tables = [ROOT / "examples" / "results" / n for n in ("sm90_kernels_triton36.json", "sm90_kernels.json")]
        Path(args.times).write_text(json.dumps(derive_times(tables), indent=1) + "\n")
        return 0
    args.kernels = set(args.kernels.split(",")) if args.kernels else None
    record = run(args, log=lambda m: print(m, flush=True))
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    ok = not record["discovery_errors"] and not record.get("errors")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
