"""Fuzz the sonic rewrite with random MoE blocks and near-miss mutations (tests/moe_generator.py).

Each case builds a block from a random spelling of each part (dispatch, experts, combine; scores
on the input or the output; E in {1, 2, 3, 5, 8}, K <= E, T in {1, 2, 3, 7, 13}, skewed routing,
biases, silu/gelu/relu, gated or plain; with ``--routers`` softmax, biased-sigmoid or
group-limited routers; with ``--dtypes`` fp32, bf16 or fp16; ``--layouts`` restricts the layouts,
by default all of them, drawn uniformly: ``slots`` draws expert-choice routing and Switch/GShard
capacity slots, combined into zeros or a shared projection's output), possibly mutated into a near-miss,
and compares it with eager: output and every gradient, fp32 at atol = rtol = 1e-4, bf16/fp16 by
relative norm error (``TOLERANCES`` in the generator). ``--backend light`` runs the rewritten
graph eagerly (the rewrite alone, fast); ``--backend sonic`` runs the whole backend, Inductor
included, as users do (issue 22's zero gradient showed only there).

Findings, most important first:
- wrong rewrite: a block was rewritten and compiled != eager;
- near-miss rewritten: a mutated block was rewritten (near-misses the op expresses exactly,
  ``rewrite_allowed`` in the generator, are counted apart);
- compiled != eager without a rewrite (not the rewrite's fault, but reported);
- supported combination not rewritten (``SUPPORTED`` in the generator).
Also the rewrite rate of valid blocks per combination of spellings (reported, not asserted).

    python examples/fuzz_rewrites.py --cases 300 --seed 1
    python examples/fuzz_rewrites.py --cases 50 --seed 7 --out examples/results/fuzz_seed7.json
    python examples/fuzz_rewrites.py --cases 300 --seed 22 --backend sonic \
        --dtypes float32,bfloat16,float16 --routers softmax,sigmoid_bias,group_limited
    python examples/fuzz_rewrites.py --cases 100 --seed 3 --layouts slots --dtypes float32,bfloat16,float16

Exit status 1 if there is a wrong rewrite, a near-miss rewritten or a case eager cannot run.
"""
from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import platform
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

import torch  # noqa: E402

import moe_generator as G  # noqa: E402


def _git_state() -> str:
    """The commit the package was at, and whether its tree had uncommitted changes."""
    import subprocess

    root = os.path.join(HERE, "..")
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "moe_inductor", "patterns"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
        return head + (" + uncommitted changes in moe_inductor/ or patterns/" if dirty else "")
    except OSError:
        return "unknown"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--mutation-rate", type=float, default=0.4)
    ap.add_argument("--out", default=None, help="JSON path (default examples/results/fuzz_rewrites_seed<S>.json)")
    ap.add_argument("--quiet", action="store_true", help="one line per finding only")
    ap.add_argument("--backend", choices=("light", "sonic"), default="light",
                    help="light: the rewritten graph run eagerly; sonic: the whole backend, Inductor included")
    ap.add_argument("--inference", action="store_true",
                    help="run eager and compiled under no_grad and compare outputs only (CPU decode-sized blocks "
                         "then take the gathered decomposition, moe_inductor/lower/worth.py)")
    ap.add_argument("--dtypes", default="float32", help=f"comma-separated, of {sorted(G.DTYPES)}")
    ap.add_argument("--routers", default="softmax", help=f"comma-separated, of {list(G.ROUTERS)}")
    ap.add_argument("--layouts", default=",".join(sorted(G.LAYOUTS)),
                    help=f"comma-separated, of {sorted(G.LAYOUTS)} (default: all, drawn uniformly); "
                         "slots: expert-choice and capacity-slot blocks")
    ap.add_argument("--extras", action="store_true",
                    help="also draw a base for the combine (shared projection) and side effects beside the block")
    args = ap.parse_args(argv)
    dtypes, routers = tuple(args.dtypes.split(",")), tuple(args.routers.split(","))
    layouts = tuple(args.layouts.split(","))
    for value, known in ([(v, G.DTYPES) for v in dtypes] + [(v, G.ROUTERS) for v in routers]
                         + [(v, G.LAYOUTS) for v in layouts]):
        if value not in known:
            ap.error(f"unknown {value!r}; choose from {sorted(known)}")
    out_path = args.out or os.path.join(HERE, "results", f"fuzz_rewrites_seed{args.seed}.json")
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)

    git = _git_state()  # the code the cases run on (imported now; later edits of the tree do not apply)
    outcomes, generator_errors, crashes, t0 = [], [], [], time.time()
    pool = _Isolated()
    for i, spec in enumerate(G.cases(args.cases, args.seed, args.mutation_rate, dtypes=dtypes, routers=routers,
                                         extras=args.extras, layouts=layouts)):
        try:
            o = pool.run(G.run_case, spec, backend=args.backend, inference=args.inference)
        except _Crashed as e:
            # the process died (a segfault in compiled code): is plain Inductor's compile of the same
            # module as fatal? (then it is not the rewrite's: sonic compiles what Inductor compiles)
            plain = "crashes too" if _crashes(pool, spec) else "runs"
            crashes.append(dict(spec=spec.describe(), exit=str(e), plain_inductor=plain))
            print(f"[{i + 1}/{args.cases}] CRASH ({e}; plain Inductor {plain}) {spec.describe()}", flush=True)
            continue
        except Exception as e:  # eager itself failed: a bug of the generator, not of the rewrite
            generator_errors.append(dict(spec=spec.describe(), error=f"{type(e).__name__}: {e}"[:500]))
            print(f"[{i + 1}/{args.cases}] GENERATOR ERROR {spec.describe()}: {type(e).__name__}: {e}", flush=True)
            continue
        outcomes.append(o)
        flag = ("WRONG REWRITE" if o.wrong_rewrite else "NEAR-MISS REWRITTEN" if o.near_miss_rewritten
                else "MISMATCH (no rewrite)" if not o.numerics_ok
                else "SUPPORTED NOT REWRITTEN" if G.supported(spec) and o.rewritten != 1 else "")
        if flag or not args.quiet:
            print(f"[{i + 1}/{args.cases} {time.time() - t0:6.1f}s] rewritten={o.rewritten} {flag} {spec.describe()}"
                  + (f"\n    {o.error[:300]}" if o.error else ""), flush=True)

    valid = [o for o in outcomes if o.spec.mutation is None]
    near = [o for o in outcomes if o.spec.mutation is not None]
    per_combo = collections.defaultdict(lambda: [0, 0])
    for o in valid:
        per_combo["/".join(map(str, o.spec.combo))][0] += o.rewritten > 0
        per_combo["/".join(map(str, o.spec.combo))][1] += 1
    per_mutation = collections.defaultdict(lambda: [0, 0])
    for o in near:
        per_mutation[o.spec.mutation][0] += o.rewritten > 0
        per_mutation[o.spec.mutation][1] += 1
    per_dtype_router = collections.defaultdict(lambda: [0, 0, 0])  # cases, rewritten, numerics wrong
    for o in outcomes:
        row = per_dtype_router[f"{o.spec.dtype}/{o.spec.router}"]
        row[0] += 1
        row[1] += o.rewritten > 0
        row[2] += not o.numerics_ok
    summary = dict(
        cases=len(outcomes), seed=args.seed, seconds=round(time.time() - t0, 1), backend=args.backend,
        inference=args.inference,
        rewritten_gathered=sum(any(r.startswith("gathered") for r in o.runs_on) for o in outcomes),
        dtypes=list(dtypes), routers=list(routers), layouts=list(layouts), extras=args.extras,
        per_dtype_router={k: dict(cases=c, rewritten=r, numerics_wrong=w)
                          for k, (c, r, w) in sorted(per_dtype_router.items())},
        wrong_rewrites=sum(o.wrong_rewrite for o in outcomes),
        near_misses=len(near), near_misses_rewritten=sum(o.near_miss_rewritten for o in near),
        near_misses_rewritten_allowed=sum(o.rewritten > 0 and G.rewrite_allowed(o.spec) for o in near),
        mismatch_without_rewrite=sum(not o.numerics_ok and o.rewritten == 0 for o in outcomes),
        valid=len(valid), valid_rewritten=sum(o.rewritten > 0 for o in valid),
        supported_not_rewritten=sum(G.supported(o.spec) and o.rewritten != 1 for o in valid),
        rewrite_rate_per_combination={k: f"{r}/{n}" for k, (r, n) in sorted(per_combo.items())},
        near_miss_rewritten_per_mutation={k: f"{r}/{n}" for k, (r, n) in sorted(per_mutation.items())},
        generator_errors=generator_errors,
        crashes=crashes, crashes_sonic_only=sum(c["plain_inductor"] != "crashes too" for c in crashes),
    )
    env = dict(torch=torch.__version__, python=platform.python_version(), machine=platform.machine(),
               git=git)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w") as f:
        json.dump(dict(summary=summary, environment=env, outcomes=[o.as_dict() for o in outcomes]), f, indent=1)

    print(f"\n{summary['cases']} cases (seed {args.seed}) in {summary['seconds']} s, torch {torch.__version__}")
    print(f"  wrong rewrites:                 {summary['wrong_rewrites']}")
    print(f"  near-misses rewritten:          {summary['near_misses_rewritten']} of {summary['near_misses']} "
          f"(+ {summary['near_misses_rewritten_allowed']} the op expresses exactly: generator's rewrite_allowed)")
    print(f"  compiled != eager, no rewrite:  {summary['mismatch_without_rewrite']}")
    print(f"  valid blocks rewritten:         {summary['valid_rewritten']} of {summary['valid']} "
          f"(supported but not rewritten: {summary['supported_not_rewritten']})")
    for k, v in summary["rewrite_rate_per_combination"].items():
        print(f"    {v:>6}  {k}")
    print(f"  near-misses rewritten per mutation: {summary['near_miss_rewritten_per_mutation']}")
    print(f"  per dtype/router (cases, rewritten, numerics wrong): {summary['per_dtype_router']}")
    if generator_errors:
        print(f"  generator errors (eager failed; cases left out): {len(generator_errors)}")
    print(f"  process crashes: {len(crashes)} (plain Inductor crashes on the same module too: "
          f"{len(crashes) - summary['crashes_sonic_only']})")
    print(f"  JSON: {out_path}")
    pool.close()
    return 1 if (summary["wrong_rewrites"] or summary["near_misses_rewritten"] or generator_errors
                 or summary["crashes_sonic_only"]) else 0


class _Crashed(Exception):
    pass


class _Isolated:
    """Runs each case in a fresh worker process, so a segfault or a heap corruption in compiled
    code ends that case only and is blamed on it (with a long-lived worker, a case that corrupts
    the heap can crash a later one): the case is reported as a crash, and plain Inductor is tried
    on the same module in another fresh process."""

    def __init__(self):
        self._pool = None

    def run(self, fn, *args, **kwargs):
        import concurrent.futures as cf
        import multiprocessing as mp

        if self._pool is None:
            self._pool = cf.ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn"),
                                                initializer=_quiet_worker, max_tasks_per_child=1)
        try:
            return self._pool.submit(fn, *args, **kwargs).result()
        except cf.process.BrokenProcessPool as e:
            self._pool = None
            raise _Crashed("worker process died") from e

    def close(self):
        if self._pool is not None:
            self._pool.shutdown()


def _quiet_worker():
    sys.path.insert(0, os.path.join(HERE, "..", "tests"))
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)


def _crashes(pool: "_Isolated", spec) -> bool:
    try:
        pool.run(G.run_plain_inductor, spec)
    except _Crashed:
        return True
    return False


if __name__ == "__main__":
    sys.exit(main())
