"""examples/precompile.py: the kernels it compiles in parallel are the ones a later launch loads.

The evidence that matters for the GPU check: Triton's on-disk cache key of a precompiled kernel
equals the key of the JIT launch it stands for. Checked here without a GPU in a child process
(stand-in sm_90 driver, CPU tensors, no TRITON_INTERPRET): the check's discovery records a
scenario's launches, the worker pool compiles them into a fresh TRITON_CACHE_DIR, then the JIT's
own path (JITFunction.run: binder, specialisation, _do_compile; forced to warmup so nothing is
launched) compiles the same scenario: every kernel must come back with a precompiled hash and the
cache must gain no entry (every compile a hit). A job whose options differ (num_warps) must not
match (the check can fail). The GEMM autotuners are cut to their first candidate to keep it fast
(the candidates reach the compile the same way, through the config's keyword arguments).

Plus the plan's arithmetic (makespan over workers, the driver's shares) on made-up figures.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))

import gpu_check  # noqa: E402  (imports neither torch nor triton)

CHILD = textwrap.dedent('''
    import copy, json, os, sys
    sys.path.insert(0, os.path.join(sys.argv[1], "examples"))
    import kernel_resources as kr
    import precompile

    def main():
        kernels = set(sys.argv[2].split(","))
        _, tuners = kr.discover_kernels(kr.kernel_modules())
        for t in tuners.values():  # one candidate per autotuned kernel: fast, same path
            t.configs = t.configs[:1]
        sc = kr.Scenario("bf16", "swiglu", False, False, False, (64, 64, 32, 4, 2))
        launches, errors = precompile.discover({"t": [sc]}, "cpu")
        unique, _ = kr.unique_launches(launches["t"])
        jobs = [precompile.job_of(l) for l in unique if l.kernel.split(".")[-1] in kernels]
        # near miss: the cheapest job with other options (num_warps) is another kernel
        other = copy.deepcopy(min(jobs, key=lambda j: j["kernel"] != "routing_meta._sorted_rows_kernel"))
        other["options"]["num_warps"] = 8 if other["options"]["num_warps"] != 8 else 4
        other["spec_key"] = "near-miss"
        pre = precompile.compile_all(jobs + [other], 2)
        cache = os.environ["TRITON_CACHE_DIR"]
        before = set(os.listdir(cache))
        jit = precompile.jit_compile_hashes([sc], kernels)
        print("RESULT " + json.dumps({
            "errors": errors, "kernels": sorted({j["kernel"] for j in jobs}),
            "pre": {r["spec_key"]: r.get("hash", r.get("error")) for r in pre},
            "other_key": other["spec_key"], "jit": jit, "pids": sorted({r["pid"] for r in pre}),
            "new_cache_entries": sorted(set(os.listdir(cache)) - before)}))

    if __name__ == "__main__":
        main()
''')
KERNELS = "_sorted_rows_kernel,_schedule_kernel,_gather_sum_kernel,_segment_colsum_kernel,_sorted_gemm_kernel"


def test_precompiled_kernels_are_the_jit_launches_cache_hits(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "cache"), PYTHONPATH=ROOT)
    res = subprocess.run([sys.executable, str(script), ROOT, KERNELS], capture_output=True, text=True,
                         timeout=600, env=env, cwd=ROOT)
    line = next((l for l in res.stdout.splitlines() if l.startswith("RESULT ")), None)
    assert line, res.stdout[-3000:] + res.stderr[-3000:]
    out = json.loads(line[len("RESULT "):])
    assert not out["errors"]
    assert {"grouped_gemm._sorted_gemm_kernel", "routing_meta._sorted_rows_kernel",
            "combine._gather_sum_kernel"} <= set(out["kernels"]), out["kernels"]
    other = out["pre"].pop(out["other_key"])
    pre = set(out["pre"].values())
    assert all(len(h) == 64 for h in pre), out["pre"]  # hashes, no compile error
    assert set(out["jit"]) == pre, (sorted(out["jit"]), sorted(pre))  # the JIT compiled exactly those
    assert out["new_cache_entries"] == [], out["new_cache_entries"]  # ... and every one was a cache hit
    assert other not in out["jit"]  # other options: another key
    assert len(out["pids"]) >= 1 and os.getpid() not in out["pids"]  # compiled in worker processes


def _precompile():
    import precompile

    return precompile


def test_makespan_longest_first():
    pc = _precompile()
    assert pc.makespan([5, 5, 5, 5], 2) == 10
    assert pc.makespan([8, 1, 1, 1, 1], 4) == 8
    assert pc.makespan([3.0] * 32, 16) == 6.0
    assert pc.makespan([], 16) == 0.0


def _rows(gpu_tests_s):
    pc = _precompile()
    return [pc._row("environment", 0, 0.0, 15.0), pc._row("precompile", 200, 60.0, 20.0),
            pc._row("gpu_tests", 0, 0.0, gpu_tests_s), pc._row("bench:core", 0, 0.0, 90.0),
            pc._row("bench:compiled", 0, 0.0, 50.0, 5), pc._row("bench:max_autotune", 0, 0.0, 400.0, 5)]


def test_plan_limits_follow_the_driver_shares():
    """The plan's limits are the driver's own share arithmetic: each step its fraction of the time
    left after the steps before it used their estimate; the bench passes split the bench's."""
    pc = _precompile()
    rows = _rows(100.0)
    pc._shares(rows, 480.0)
    s = gpu_check.SHARES
    env = 480.0 * s["environment"] / sum(s.values())
    pre = (480.0 - 15.0) * s["precompile"] / (sum(s.values()) - s["environment"])
    assert rows[0]["share_s"] == round(env, 1) and rows[1]["share_s"] == round(pre, 1)
    bench = 480.0 - 15.0 - 80.0 - 100.0
    core = bench * gpu_check.BENCH_PASSES[0][2] / sum(p[2] for p in gpu_check.BENCH_PASSES)
    assert rows[3]["share_s"] == round(core, 1)
    assert rows[4]["shapes_measured"] == 5 and rows[5]["shapes_measured"] == 0  # 80 s per shape does not fit


def test_plan_over_its_limit_is_not_within():
    """A required step whose estimate exceeds its limit (it would be stopped) fails the plan."""
    pc = _precompile()
    times = {"k.a": {"bf16": 4.0}}
    jobs = [{"kernel": "k.a", "dtype": "bf16"}] * 64
    ok = pc.make_plan({}, jobs, times, 16, 5, 10, 10.0)
    assert ok["within_limit"], pc.format_plan(ok)
    assert ok["rows"][1]["compile_s"] == 16.0 and ok["serial_compile_s"] == 256.0
    slow = pc.make_plan({}, jobs, times, 1, 5, 10, 10.0)  # one worker: 256 s of compiles
    assert not slow["within_limit"] and "OVER ITS LIMIT" in pc.format_plan(slow)
