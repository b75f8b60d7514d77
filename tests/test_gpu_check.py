"""The one-command GPU check (examples/gpu_check.sh) is known to work before a GPU is lent.

test_dry_run runs ``bash examples/gpu_check.sh OUTDIR --dry-run``: every step (environment, the
GPU tests of tests/gpu on CPU under the Triton interpreter, the benchmark's every pass on its
tiny smoke shape, the report) must end with status ok and leave its JSON. The other tests check
the time boxing (a step that overruns its share is stopped, the record survives) and the summary
arithmetic the GPU figures will be read from.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))

import gpu_check  # noqa: E402

STEPS = ["environment", "precompile", "gpu_tests", "bench", "report"]


def _clean_env():
    env = dict(os.environ)
    for k in ("MOE_GPU_CHECK_RESULTS", "MOE_GPU_CHECK_DEADLINE", "MOE_GPU_CHECK_DRY_RUN", "PYTEST_CURRENT_TEST"):
        env.pop(k, None)
    return env


@pytest.mark.slow
def test_dry_run(tmp_path):
    out = tmp_path / "out"
    res = subprocess.run(["bash", os.path.join(ROOT, "examples", "gpu_check.sh"), str(out), "--dry-run"],
                         capture_output=True, text=True, timeout=1800, cwd=ROOT, env=_clean_env())
    record = json.loads((out / "gpu_check.json").read_text())
    statuses = {s["name"]: s["status"] for s in record["steps"]}
    assert list(statuses) == STEPS
    assert all(v == "ok" for v in statuses.values()), (statuses, res.stdout[-4000:], res.stderr[-2000:])
    # packed: what comes back from a lent machine (at most 8 files) is the record, the chart and
    # one archive holding every other file
    assert sorted(os.listdir(out)) == sorted(["gpu_check.json", gpu_check.ARCHIVE] + (
        ["bench.png"] if (out / "bench.png").exists() else []))
    with tarfile.open(out / gpu_check.ARCHIVE) as tar:
        names = tar.getnames()
        tar.extractall(out)
    assert sorted(names) == sorted(record["summary"]["packed"]["files"])
    assert {"environment.json", "gpu_tests.json", "bench.json"} <= set(names)
    assert res.returncode == 0, res.stderr[-2000:]
    assert record["dry_run"] is True
    assert all(s["elapsed_s"] is not None for s in record["steps"])
    for name in STEPS:  # elapsed time printed per step
        assert f"step {name}: ok in " in res.stdout, name

    # the precompile step: discovery of the check's launches, the plan printed before compiling, the
    # cheapest kernels compiled by its worker pool (the dry run's small count)
    pre = json.loads((out / "precompile.json").read_text())
    assert pre["dry_run"] and pre["jobs"] == gpu_check.DRY_PRECOMPILE["limit"] and not pre["errors"], pre.get("errors")
    assert len(pre["compiled"]) == pre["jobs"] and all(len(r["hash"]) == 64 for r in pre["compiled"])
    assert record["summary"]["plan"]["rows"][1]["step"] == "precompile"
    assert res.stdout.index("plan at ") < res.stdout.index("step gpu_tests: start")

    env = json.loads((out / "environment.json").read_text())
    assert env["torch"] and env["triton"] and env["device"].startswith("cpu") and env["triton_interpret"]

    tests = json.loads((out / "gpu_tests.json").read_text())
    outcomes = {r["test"].split("::")[1]: r["outcome"] for r in tests["tests"]}
    assert tests["counts"].get("failed", 0) == 0 and tests["counts"].get("passed", 0) >= 6, tests["counts"]
    # every test function of tests/gpu ran at least once in the dry run
    ran = {name.split("[")[0] for name, o in outcomes.items() if o == "passed"}
    assert ran == {"test_triton_matches_torch_path", "test_triton_matches_torch_path_more",
                   "test_graph_capture_forward_backward", "test_backend_tiny_model",
                   "test_backend_reduce_overhead"}, ran
    passed = [r for r in tests["tests"] if r["outcome"] == "passed" and "rel_err" in r["measured"]]
    assert passed and all(isinstance(v, float) for r in passed for v in r["measured"]["rel_err"].values())

    bench = json.loads((out / "bench.json").read_text())
    rows = {r["impl"]: r for r in bench["results"]}
    want = {"sonic", "sonic_tr", "hf_grouped_mm", "liger", "dense", "hf_compiled", "hf_max_autotune"}
    assert set(rows) == want, set(rows)
    for name, r in rows.items():
        ok = r["status"] == "ok" or (name == "liger" and r["status"].startswith("skipped: No module"))
        assert ok, (name, r["status"])
    assert rows["sonic"]["fwd_ms"] is None  # interpreter timings are never recorded
    assert rows["sonic"]["saved_activation_bytes"] < rows["hf_grouped_mm"]["saved_activation_bytes"]
    assert rows["hf_grouped_mm"]["rel_err_vs_ref"] < 2e-2 and rows["hf_compiled"]["rel_err_vs_ref"] < 2e-2
    assert rows["sonic_tr"]["assignments"] > 0 and rows["sonic_tr"]["err_ref"] is None
    assert all(r["complete"] and "median" in r["statistic"] for r in bench["runs"])


def test_default_plan_fits_the_budget(tmp_path):
    """The plan of the default GPU check (every test case, the five benchmark shapes, 16 compile
    workers), made on CPU (discovery at shapes with d and n / 16, the same launches otherwise):
    every step's estimate within the limit the driver will give it, the total within 480 s."""
    res = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "gpu_check.py"), str(tmp_path), "--plan",
                          "--workers", "16"], capture_output=True, text=True, timeout=600, cwd=ROOT, env=_clean_env())
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    plan = json.loads((tmp_path / "plan.json").read_text())["plan"]
    assert "plan at 16 compile workers" in res.stdout
    assert [r["step"] for r in plan["rows"]] == ["environment", "precompile", "gpu_tests", "bench:core",
                                                 "bench:compiled", "bench:max_autotune"]
    pre = plan["rows"][1]
    assert pre["compiles"] > 100  # every GEMM config of every dtype / row tile the check launches
    assert plan["serial_compile_s"] > 4 * pre["compile_s"]  # what the pool saves
    assert plan["total_s"] <= 480 and plan["within_limit"], json.dumps(plan, indent=1)


def test_results_are_packed_into_one_archive(tmp_path):
    """The packing alone, on a fake OUTDIR: every file but the record and the chart goes into the
    archive (subfolders too), the record lists them, nothing else stays."""
    out = tmp_path / "out"
    driver = gpu_check.Driver(str(out), dry_run=True, budget_s=1, shapes=None)
    (out / "bench").mkdir()
    for rel in ("environment.json", "gpu_tests.log", "bench/core_shape0.json", "bench/core_shape0.log", "bench.png"):
        (out / rel).write_text(rel)
    driver.pack_results()
    assert sorted(os.listdir(out)) == ["bench.png", "gpu_check.json", "results.tar.gz"]
    with tarfile.open(out / "results.tar.gz") as tar:
        contents = {m.name: tar.extractfile(m).read().decode() for m in tar.getmembers() if m.isfile()}
    want = ["bench/core_shape0.json", "bench/core_shape0.log", "environment.json", "gpu_tests.log"]
    assert sorted(contents) == want and all(contents[k] == k for k in want)
    assert sorted(json.loads((out / "gpu_check.json").read_text())["summary"]["packed"]["files"]) == want


def test_overrun_is_stopped_and_recorded(tmp_path):
    """A budget far too small for the dry run: the step that overruns is stopped at its limit, the
    rest are skipped or stopped too, and gpu_check.json holds every step with a final status."""
    out = tmp_path / "out"
    t = time.time()
    res = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "gpu_check.py"), str(out), "--dry-run",
                          "--budget", "12"], capture_output=True, text=True, timeout=300, cwd=ROOT, env=_clean_env())
    elapsed = time.time() - t
    record = json.loads((out / "gpu_check.json").read_text())
    statuses = {s["name"]: s["status"] for s in record["steps"]}
    assert list(statuses) == STEPS
    assert res.returncode == 1
    assert all(v in ("ok", "timeout", "skipped", "failed") for v in statuses.values()), statuses
    bench = next(s for s in record["steps"] if s["name"] == "bench")
    assert statuses["gpu_tests"] in ("timeout", "skipped") and statuses["bench"] in ("timeout", "skipped"), (
        statuses, bench.get("detail"))
    assert statuses["report"] == "ok"
    # 12 s budget + the kill grace period + process start-up; far below the dry run's own time
    assert elapsed < 12 + gpu_check.STOP_GRACE_S + 60, elapsed


def test_smoke_run_out_of_time_is_not_a_failure(tmp_path):
    """A smoke run whose deadline passes before (or while) sonic's row runs records the row as
    skipped/timeout and exits 0: the driver counts it as the time box working (CI failed once on a
    fast machine where the core pass got just enough time to start and sonic's row was stopped)."""
    prefix = str(tmp_path / "smoke")
    env = dict(_clean_env(), TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "bench_kernels.py"), "--impls", "sonic,dense",
                          "--out", prefix, "--deadline", str(time.time() + 0.5), "--no-plot", "--interpret-smoke"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    rows = json.loads(open(prefix + ".json").read())["results"]
    assert {r["impl"]: r["status"] for r in rows} == {"sonic": "skipped: time share of this run used up",
                                                     "dense": "skipped: time share of this run used up"}
    assert res.returncode == 0, res.stderr[-2000:]


def _row(impl, shape, fwd_ms, fwd_bwd_ms, tflops=None):
    T, d, n, E, K = shape
    return {"impl": impl, "status": "ok", "config": {"T": T, "d": d, "n": n, "E": E, "K": K},
            "fwd_ms": fwd_ms, "fwd_bwd_ms": fwd_bwd_ms, "fwd_bwd_tflops": tflops}


def test_summary_arithmetic():
    tr_shape = (16384, 1536, 256, 256, 8)
    other = (16384, 2048, 768, 128, 8)
    rows = [
        _row("sonic", tr_shape, 1.0, 3.0, 300.0), _row("sonic_tr", tr_shape, 0.8, 2.5, 360.0),
        _row("hf_grouped_mm", tr_shape, 2.0, 6.0), _row("liger", tr_shape, 1.1, 2.9),
        _row("dense", tr_shape, 0.5, 1.5, 600.0),
        _row("sonic", other, 1.0, 4.0), _row("hf_grouped_mm", other, 1.5, 5.0),
        {"impl": "hf_compiled", "status": "failed: boom", "config": {"T": 16384, "d": 2048, "n": 768, "E": 128, "K": 8}},
    ]
    summary = gpu_check.summarize(rows)
    a, b = summary["16384x1536x256x256x8"], summary["16384x2048x768x128x8"]
    assert a["fwd_bwd_speedup_vs_hf_grouped_mm"] == 2.0 and a["fwd_speedup_vs_hf_grouped_mm"] == 2.0
    assert a["fwd_bwd_speedup_vs_liger"] == round(2.9 / 3.0, 3)
    assert a["fraction_of_dense_tflops"] == 0.5
    assert a["token_rounding_speedup_fwd_bwd"] == 1.2
    assert a["targets"] == {"fwd_bwd >= 1.5x hf_grouped_mm": True, "fwd_bwd >= 1.0x liger": False,
                            "token rounding >= 1.16x top-k": True}
    assert b["fwd_bwd_speedup_vs_hf_grouped_mm"] == 1.25 and b["targets"] == {"fwd_bwd >= 1.5x hf_grouped_mm": False}
    assert "fwd_bwd_speedup_vs_hf_compiled" not in b  # failed rows are left out


def test_deadline_inside_a_wrapping_compiler_is_a_timeout(monkeypatch):
    """torch.compile wraps what its callees raise (BackendCompilerFailed, InductorError): a deadline
    alarm that fires inside compilation arrives as another exception type. The row must still be
    recorded as stopped by the time box, not as a failed implementation (CI failed on this once:
    the overrun test's bench step came back 'failed')."""
    import signal

    import bench_kernels

    class Wrapped(RuntimeError):
        pass

    def slow_compile():
        try:
            time.sleep(5)
        except bench_kernels.RowTimeout as exc:
            raise Wrapped("backend compiler failed") from exc

    def impl(pb):
        return slow_compile, []

    monkeypatch.setitem(bench_kernels.IMPLS, "wrapped_row", impl)
    monkeypatch.setitem(bench_kernels._ALARM, "fired", False)
    old = signal.signal(signal.SIGALRM, bench_kernels._on_alarm)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        res, out = bench_kernels.bench_one(bench_kernels.BenchConfig(8, 8, 8, 2, 1), "wrapped_row", None, None,
                                           None, True)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert res.status.startswith("timeout:") and "Wrapped" in res.status, res.status
    assert out is None
    # a plain failure without the alarm stays a failure
    monkeypatch.setitem(bench_kernels._ALARM, "fired", False)
    monkeypatch.setitem(bench_kernels.IMPLS, "broken_row", lambda pb: ((lambda: 1 / 0), []))
    res, _ = bench_kernels.bench_one(bench_kernels.BenchConfig(8, 8, 8, 2, 1), "broken_row", None, None, None, True)
    assert res.status.startswith("failed: ZeroDivisionError"), res.status
