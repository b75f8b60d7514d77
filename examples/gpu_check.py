"""One time-boxed GPU check: environment, GPU tests, benchmark; everything as JSON in OUTDIR.

  bash examples/gpu_check.sh OUTDIR             # on a lent H100/H200 (no network needed)
  bash examples/gpu_check.sh OUTDIR --dry-run   # CPU, Triton interpreter, tiny shapes (CI)

Steps, each in its own subprocess with its own share of the time budget (--budget: default 480 s;
1500 s for the dry run, a ceiling for slow shared CI machines):

  environment  device, driver, torch/triton/transformers/liger versions    (environment.json)
  precompile   examples/precompile.py: the plan (steps x kernels to compile,  (precompile.json)
               estimated compile and run s, limits) printed, then every
               Triton kernel x config the later steps launch compiled in
               --workers processes into Triton's cache (dry run: the 3
               cheapest, 2 workers); --plan prints the plan alone
  gpu_tests    pytest tests/gpu: Triton path vs PyTorch path, CUDA graphs,  (gpu_tests.json,
               the sonic backend on tiny transformers models                 gpu_tests.jsonl)
  bench        examples/bench_kernels.py, one subprocess per (pass, shape):  (bench.json, bench.png,
               pass "core" (sonic, sonic_tr, hf_grouped_mm, liger, dense)    bench/*.json)
               over every shape first, then "compiled" (hf_compiled), then
               "max_autotune" (hf_max_autotune) with the time left
  report       merged summary: speed-ups, fraction of the dense GEMM,       (gpu_check.json)
               token rounding vs top-k, targets

Time boxing. Each step runs with a hard limit (its share; the bench passes split theirs over the
shapes, unused time flows to the next shape and pass). A step that reaches its limit is stopped
(its process group killed) and the rest of that step is skipped: pytest skips the tests not yet
started, the benchmark skips the implementations and shapes not yet measured; what finished is
kept. Then the next step starts with its own share. Elapsed time is printed per step.
OUTDIR/gpu_check.json is written before the first step and rewritten after each one, so it exists
whatever happens (a step that crashes is recorded as failed with the tail of its log).

Statuses: ok | failed (a test or an implementation failed, or the step crashed) | timeout (stopped
at its share; partial results kept) | skipped (no time left for it).

Packing: at the end every file but gpu_check.json and bench.png goes into results.tar.gz (listed
in gpu_check.json's summary), so that OUTDIR holds 3 files (a lent machine returns at most 8);
--no-pack leaves them loose.

The driver itself imports neither torch nor triton: a crash or a CUDA error in a step cannot take
the record down. Exit status 0 when every step is ok, 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "examples", "bench_kernels.py")

# Shares of the budget. A step's limit is fixed when it starts: the time left times its fraction
# of the fractions still to run, so time a step does not use flows to the later ones. The report
# step takes what it needs (a few seconds). precompile 0.24 (was 0.20) since the dH rework: 264
# distinct compiles at an estimated 88 s on 16 workers (was 243, 71 s), plus discovery.
SHARES = {"environment": 0.04, "precompile": 0.24, "gpu_tests": 0.26, "bench": 0.46}
# The bench's share over its passes: every shape's core comparison first.
BENCH_PASSES = [
    ("core", "sonic,hf_grouped_mm,liger,sonic_tr,dense", 0.55),  # in order of the targets
    ("compiled", "hf_compiled", 0.20),
    ("max_autotune", "hf_max_autotune", 0.25),
]
PRECOMPILE = os.path.join(ROOT, "examples", "precompile.py")
#: the dry run compiles this many kernels (the cheapest) with this many workers: the mechanism, not the set
DRY_PRECOMPILE = {"limit": 3, "workers": 2}
MIN_START_S = 5.0  # a step (or bench run) with less time than this left is skipped
#: what stays loose in OUTDIR after packing (the rest goes into ARCHIVE): at most 3 files come back
KEEP = ("gpu_check.json", "bench.png")
ARCHIVE = "results.tar.gz"
STOP_GRACE_S = 10.0  # after SIGTERM at the limit, wait this long before SIGKILL


def share_of(left_s: float, name: str, names_left: list) -> float:
    """A step's limit: the time left times its fraction of the fractions still to run."""
    return left_s * SHARES[name] / sum(SHARES[n] for n in names_left)


def pass_share(left_s: float, frac: float, fracs_left: float) -> float:
    """A bench pass's part of the time left in the bench step."""
    return left_s * frac / fracs_left


@dataclass
class Step:
    name: str
    share_s: float
    status: str = "pending"
    elapsed_s: Optional[float] = None
    files: list = field(default_factory=list)
    detail: dict = field(default_factory=dict)


class Driver:
    def __init__(self, outdir: str, dry_run: bool, budget_s: float, shapes: Optional[str],
                 only: Optional[list] = None, pack: bool = True, workers: Optional[int] = None):
        self.pack = pack
        self.workers = workers
        self.outdir = os.path.abspath(outdir)
        self.dry_run = dry_run
        self.budget_s = budget_s
        self.shapes = shapes
        self.t0 = time.time()
        self.deadline = self.t0 + budget_s
        self.steps = [Step(name, round(budget_s * share, 1)) for name, share in SHARES.items()]  # planned
        self.steps.append(Step("report", 0.0))
        self.only = only  # None: every step
        self.summary: dict = {}
        os.makedirs(self.outdir, exist_ok=True)
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = ROOT + (os.pathsep + self.env["PYTHONPATH"] if self.env.get("PYTHONPATH") else "")
        self.env.setdefault("HF_HUB_OFFLINE", "1")
        self.env.setdefault("TRANSFORMERS_OFFLINE", "1")
        self.env["PYTHONUNBUFFERED"] = "1"
        # liger's fused MoE is a comparator row, not a tuning run: its autotuner (~160 configs) off
        # unless the caller sets it (it also needs a GPU driver, so the dry run could not use it)
        self.env.setdefault("LIGER_FUSED_MOE_AUTOTUNE", "0")
        if dry_run:
            self.env["TRITON_INTERPRET"] = "1"  # before any triton import in the children
            self.env["MOE_GPU_CHECK_DRY_RUN"] = "1"
        self.write()

    # ------------------------------------------------------------------------------------------
    def write(self) -> None:
        payload = {
            "command": "examples/gpu_check.sh " + " ".join(sys.argv[1:]),
            "dry_run": self.dry_run,
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.t0)),
            "budget_s": self.budget_s,
            "elapsed_s": round(time.time() - self.t0, 1),
            "host": platform.node(),
            "steps": [asdict(s) for s in self.steps],
            "summary": self.summary,
        }
        tmp = os.path.join(self.outdir, ".gpu_check.json.tmp")
        with open(tmp, "w") as f:
            json.dump(payload, f, indent=1)
        os.replace(tmp, os.path.join(self.outdir, "gpu_check.json"))

    def pack_results(self) -> None:
        """Everything the steps wrote, but the summary and the chart, into one archive beside them,
        and the originals removed: OUTDIR then holds at most KEEP plus ARCHIVE (a lent machine's
        $OUT brings back at most 8 files). The record lists what the archive holds."""
        import tarfile

        archive = os.path.join(self.outdir, ARCHIVE)
        packed = []
        for dirpath, _, files in os.walk(self.outdir):
            for f in sorted(files):
                rel = os.path.relpath(os.path.join(dirpath, f), self.outdir)
                if rel not in KEEP and rel != ARCHIVE and not f.startswith(".gpu_check"):
                    packed.append(rel)
        try:
            with tarfile.open(archive, "w:gz") as tar:
                for rel in packed:
                    tar.add(os.path.join(self.outdir, rel), arcname=rel)
        except Exception as exc:  # keep the loose files: nothing may be lost
            self.log(f"packing failed ({type(exc).__name__}: {exc}); the files stay as they are")
            return
        for rel in packed:
            os.remove(os.path.join(self.outdir, rel))
        for dirpath, dirs, files in sorted(os.walk(self.outdir), key=lambda t: -len(t[0])):
            if dirpath != self.outdir and not os.listdir(dirpath):
                os.rmdir(dirpath)
        self.summary["packed"] = {"archive": ARCHIVE, "files": packed}
        self.write()
        self.log(f"packed {len(packed)} files into {ARCHIVE}; {self.outdir} holds "
                 f"{', '.join(sorted(os.listdir(self.outdir)))}")

    def log(self, msg: str) -> None:
        print(f"[gpu_check {time.time() - self.t0:7.1f}s] {msg}", flush=True)

    def run(self, cmd: list, limit_s: float, log_path: str, env: Optional[dict] = None) -> tuple[Optional[int], bool]:
        """Run cmd in its own process group with stdout+stderr teed to log_path; stop it at
        limit_s (SIGTERM to the group, SIGKILL after a grace period). Returns (rc, timed_out)."""
        with open(log_path, "w") as logf:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env or self.env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, errors="replace",
                                    start_new_session=True)

            def tee():
                for line in proc.stdout:
                    logf.write(line)
                    logf.flush()
                    sys.stdout.write("    | " + line)
                    sys.stdout.flush()

            reader = threading.Thread(target=tee, daemon=True)
            reader.start()
            timed_out = False
            try:
                proc.wait(timeout=max(limit_s, 0.1))
            except subprocess.TimeoutExpired:
                timed_out = True
                self.log(f"limit of {limit_s:.0f} s reached: stopping {' '.join(cmd[1:3])} ...")
                _signal_group(proc, signal.SIGTERM)
                try:
                    proc.wait(timeout=STOP_GRACE_S)
                except subprocess.TimeoutExpired:
                    _signal_group(proc, signal.SIGKILL)
                    proc.wait()
            reader.join(timeout=5.0)
            return proc.returncode, timed_out

    def left(self) -> float:
        return self.deadline - time.time()

    # ------------------------------------------------------------------------------------------
    def step_environment(self, step: Step) -> None:
        path = os.path.join(self.outdir, "environment.json")
        # at least a minute where the budget allows: importing torch on a busy machine is slow
        limit = step.share_s = round(min(max(step.share_s, 60.0), self.left()), 1)
        rc, timed_out = self.run([sys.executable, __file__, "--probe-environment", path], limit,
                                 os.path.join(self.outdir, "environment.log"))
        step.files = ["environment.json", "environment.log"]
        if os.path.exists(path):
            with open(path) as f:
                step.detail = json.load(f)
        step.status = "timeout" if timed_out else "ok" if rc == 0 and step.detail else "failed"

    def step_precompile(self, step: Step) -> None:
        """Every kernel x config the later steps launch, compiled in parallel into Triton's cache
        (examples/precompile.py); it prints the plan (steps x compile and run estimates) first."""
        path = os.path.join(self.outdir, "precompile.json")
        env = {k: v for k, v in self.env.items() if k != "TRITON_INTERPRET"}  # it compiles for the GPU
        cmd = precompile_cmd(path, self.dry_run, self.workers, self.shapes, self.budget_s)
        rc, timed_out = self.run(cmd, min(step.share_s, self.left()),
                                 os.path.join(self.outdir, "precompile.log"), env)
        step.files = ["precompile.json", "precompile.log"]
        record = {}
        if os.path.exists(path):
            with open(path) as f:
                record = json.load(f)
        self.summary["plan"] = record.get("plan")
        step.detail = {k: record.get(k) for k in ("device", "jobs", "compile_wall_s", "errors", "discovery_errors")}
        step.detail["returncode"] = rc
        step.status = "timeout" if timed_out else "ok" if rc == 0 and "compiled" in record else "failed"

    def step_gpu_tests(self, step: Step) -> None:
        jsonl = os.path.join(self.outdir, "gpu_tests.jsonl")
        if os.path.exists(jsonl):
            os.remove(jsonl)
        limit = min(step.share_s, self.left())
        env = dict(self.env, MOE_GPU_CHECK_RESULTS=jsonl,
                   # tests not started 15 s before the hard limit are skipped cleanly
                   MOE_GPU_CHECK_DEADLINE=str(time.time() + max(limit - 15.0, limit * 0.8)),
                   MOE_INDUCTOR_DEBUG_FILL_NAN="1")  # unwritten kernel outputs show up as NaN
        cmd = [sys.executable, "-m", "pytest", "tests/gpu", "-v", "-rs", "-p", "no:cacheprovider",
               "-o", "addopts=", "--durations=15"]
        rc, timed_out = self.run(cmd, limit, os.path.join(self.outdir, "gpu_tests.log"), env)
        records = []
        if os.path.exists(jsonl):
            with open(jsonl) as f:
                records = [json.loads(line) for line in f if line.strip()]
        counts: dict = {}
        for r in records:
            counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
        out_of_time = sum(1 for r in records if r["outcome"] == "skipped" and "time share" in r.get("reason", ""))
        step.detail = {"pytest_returncode": rc, "counts": counts, "not_started_for_time": out_of_time,
                       "tests": records}
        with open(os.path.join(self.outdir, "gpu_tests.json"), "w") as f:
            json.dump(step.detail, f, indent=1)
        step.files = ["gpu_tests.json", "gpu_tests.jsonl", "gpu_tests.log"]
        if counts.get("failed", 0):
            step.status = "failed"
        elif timed_out or out_of_time:
            step.status = "timeout"
        elif rc != 0 or not records:  # e.g. a collection error, or no test found
            step.status = "failed"
        else:
            step.status = "ok"

    def step_bench(self, step: Step) -> None:
        bench_dir = os.path.join(self.outdir, "bench")
        os.makedirs(bench_dir, exist_ok=True)
        shapes = self._bench_shapes()
        step_end = time.time() + min(step.share_s, self.left())
        runs = []
        passes_left = sum(p[2] for p in BENCH_PASSES)
        for pass_name, impls, frac in BENCH_PASSES:
            pass_end = time.time() + pass_share(step_end - time.time(), frac, passes_left)
            passes_left -= frac
            for i, shape in enumerate(shapes):
                remaining = pass_end - time.time()
                share = remaining / (len(shapes) - i)
                tag = f"{pass_name}_shape{shape}"
                if share < MIN_START_S:
                    runs.append({"pass": pass_name, "shape": shape, "status": "skipped",
                                 "reason": f"time share of the bench step used up ({share:.0f} s left)"})
                    self.log(f"bench {tag}: skipped (no time left in this pass)")
                    continue
                prefix = os.path.join(bench_dir, tag)
                # the run stops itself a little before the hard limit, so it can write its JSON
                cmd = [sys.executable, BENCH, "--impls", impls, "--out", prefix,
                       "--deadline", str(time.time() + share - min(10.0, 0.1 * share)), "--no-plot"]
                cmd += ["--interpret-smoke"] if self.dry_run else ["--shapes", str(shape)]
                if pass_name != "core":
                    cmd += ["--ref", "hf_grouped_mm"]
                t = time.time()
                rc, timed_out = self.run(cmd, share, prefix + ".log")
                runs.append({"pass": pass_name, "shape": shape, "returncode": rc, "timed_out": timed_out,
                             "elapsed_s": round(time.time() - t, 1), "json": os.path.relpath(prefix + ".json", self.outdir)})
                self.log(f"bench {tag}: rc={rc}{' (stopped at its limit)' if timed_out else ''} "
                         f"in {time.time() - t:.1f} s")
        merged = merge_bench(self.outdir, runs)
        with open(os.path.join(self.outdir, "bench.json"), "w") as f:
            json.dump(merged, f, indent=1)
        step.files = ["bench.json"] + [r["json"] for r in runs if "json" in r]
        png = plot_bench(merged, os.path.join(self.outdir, "bench.png"))
        if png:
            step.files.append("bench.png")
        statuses = [r["status"] for r in merged["results"]]
        step.detail = {"runs": runs, "result_statuses": {s: statuses.count(s) for s in sorted(set(statuses))}}
        self.summary["bench"] = merged["summary"]
        failed = any(s.startswith("failed") for s in statuses) or any(
            r.get("returncode") not in (0, None) and not r.get("timed_out") for r in runs)
        partial = any(r.get("timed_out") or r.get("status") == "skipped" for r in runs) or any(
            s.startswith("timeout") or "time share" in s for s in statuses)
        step.status = "failed" if failed else "timeout" if partial else "failed" if not statuses else "ok"

    def _bench_shapes(self) -> list:
        if self.dry_run:
            return [0]  # --interpret-smoke: the tiny smoke shape
        if self.shapes:
            return [int(s) for s in self.shapes.split(",")]
        return list(range(5))

    def step_report(self, step: Step) -> None:
        self.summary["steps"] = {s.name: s.status for s in self.steps if s.name != "report"}
        tests = next(s for s in self.steps if s.name == "gpu_tests").detail
        if tests:
            self.summary["gpu_tests"] = tests.get("counts", {})
        step.status = "ok"

    # ------------------------------------------------------------------------------------------
    def main(self) -> int:
        self.log(f"{'dry run (CPU, Triton interpreter)' if self.dry_run else 'GPU run'}: budget {self.budget_s:.0f} s, "
                 f"output in {self.outdir}")
        for step in self.steps:
            start = time.time()
            left = self.left()
            if self.only is not None and step.name not in self.only and step.name != "report":
                step.status, step.detail = "skipped", {"reason": "not selected (--steps)"}
                self.log(f"step {step.name}: skipped (not selected)")
                self.write()
                continue
            if step.name != "report" and left < MIN_START_S:
                step.status, step.detail = "skipped", {"reason": f"budget used up ({left:.0f} s left)"}
                self.log(f"step {step.name}: skipped (budget used up)")
                self.write()
                continue
            if step.name in SHARES:
                later = [s.name for s in self.steps[self.steps.index(step):] if s.name in SHARES
                         and (self.only is None or s.name in self.only)]
                step.share_s = round(share_of(left, step.name, later), 1)
            self.log(f"step {step.name}: start (share {step.share_s:.0f} s, {left:.0f} s left in the budget)")
            try:
                getattr(self, "step_" + step.name)(step)
            except Exception as exc:  # the record must survive any failure of a step
                step.status = "failed"
                step.detail["driver_error"] = f"{type(exc).__name__}: {exc}"
                step.detail["traceback"] = traceback.format_exc()[-3000:]
            step.elapsed_s = round(time.time() - start, 1)
            self.log(f"step {step.name}: {step.status} in {step.elapsed_s:.1f} s")
            self.write()
        self.log(f"done in {time.time() - self.t0:.1f} s: " + ", ".join(f"{s.name}={s.status}" for s in self.steps))
        if self.pack:
            self.pack_results()
        print(json.dumps(self.summary, indent=1))
        selected = [s for s in self.steps if self.only is None or s.name in self.only or s.name == "report"]
        return 0 if all(s.status == "ok" for s in selected) else 1


def precompile_cmd(out_json: str, dry_run: bool, workers: Optional[int], shapes: Optional[str],
                   budget_s: float, plan_only: bool = False) -> list:
    """examples/precompile.py's command line for this check (the dry run: DRY_PRECOMPILE)."""
    cmd = [sys.executable, PRECOMPILE, "--out", out_json, "--budget", str(budget_s)]
    workers = workers or (DRY_PRECOMPILE["workers"] if dry_run else os.cpu_count() or 1)
    cmd += ["--workers", str(workers)]
    if dry_run:
        cmd += ["--dry-run", "--limit", str(DRY_PRECOMPILE["limit"])]
    if shapes:
        cmd += ["--shapes", shapes]
    return cmd + (["--plan-only"] if plan_only else [])


def _signal_group(proc: subprocess.Popen, sig) -> None:
    try:
        os.killpg(proc.pid, sig)  # the child leads its own session: only its group is signalled
    except ProcessLookupError:
        pass


# ----------------------------------------------------------------------------------------------
# environment probe (runs in a child process: it imports torch and initialises CUDA)
# ----------------------------------------------------------------------------------------------
def probe_environment(path: str) -> int:
    info: dict = {"python": platform.python_version(), "platform": platform.platform(),
                  "cpu_count": os.cpu_count(), "dry_run": os.environ.get("MOE_GPU_CHECK_DRY_RUN") == "1",
                  "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1"}
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            res = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            info["nvidia_smi"] = res.stdout.strip() or res.stderr.strip()
        except Exception as exc:
            info["nvidia_smi"] = f"error: {exc}"
    else:
        info["nvidia_smi"] = None
    import torch

    info["torch"] = torch.__version__
    info["torch_cuda"] = torch.version.cuda
    info["cuda_available"] = torch.cuda.is_available()
    if info["cuda_available"]:
        p = torch.cuda.get_device_properties(0)
        info["device"] = torch.cuda.get_device_name(0)
        info["capability"] = list(torch.cuda.get_device_capability(0))
        info["device_memory_gib"] = round(p.total_memory / 2**30, 1)
        info["sm_count"] = p.multi_processor_count
        try:
            info["cuda_driver"] = torch._C._cuda_getDriverVersion()
        except Exception:
            pass
    else:
        info["device"] = f"cpu ({platform.processor() or platform.machine()})"
    for mod in ("triton", "transformers", "liger_kernel", "matplotlib", "numpy"):
        try:
            m = __import__(mod)
            info[mod] = getattr(m, "__version__", "present")
            if mod == "liger_kernel":
                info["liger_kernel_path"] = os.path.dirname(m.__file__)
        except Exception as exc:
            info[mod] = None if isinstance(exc, ImportError) else f"error: {type(exc).__name__}: {exc}"
    if info.get("liger_kernel") == "present":
        try:
            from importlib.metadata import version

            info["liger_kernel"] = version("liger-kernel")
        except Exception:
            pass
    import moe_inductor

    info["moe_inductor"] = os.path.dirname(moe_inductor.__file__)
    try:
        from importlib.metadata import entry_points

        info["sonic_entry_point"] = any(e.name == "sonic" for e in entry_points(group="torch_dynamo_backends"))
    except Exception:
        info["sonic_entry_point"] = None
    with open(path, "w") as f:
        json.dump(info, f, indent=1)
    print(json.dumps(info, indent=1))
    return 0


# ----------------------------------------------------------------------------------------------
# bench merge, summary and chart
# ----------------------------------------------------------------------------------------------
def _key(cfg: dict) -> tuple:
    return (cfg["T"], cfg["d"], cfg["n"], cfg["E"], cfg["K"])


def merge_bench(outdir: str, runs: list) -> dict:
    results, environment, run_meta = [], None, []
    for r in runs:
        path = os.path.join(outdir, r["json"]) if "json" in r else None
        if not path or not os.path.exists(path):
            continue
        with open(path) as f:
            payload = json.load(f)
        environment = environment or payload.get("environment")
        run_meta.append({k: payload.get(k) for k in ("run_id", "argv", "statistic", "complete")})
        for res in payload.get("results", []):
            res["pass"] = r["pass"]
            results.append(res)
    return {"environment": environment, "runs": run_meta, "results": results, "summary": summarize(results)}


def summarize(results: list) -> dict:
    """Per shape: sonic's forward+backward speed-up over each comparator, its fraction of the dense
    GEMM's TFLOP/s, token rounding vs top-k kernel time, and the issue's targets."""
    by_shape: dict = {}
    for r in results:
        if r["status"] == "ok":
            by_shape.setdefault(_key(r["config"]), {})[r["impl"]] = r
    out = {}
    for key, impls in by_shape.items():
        s = impls.get("sonic")
        row: dict = {}
        if s and s.get("fwd_bwd_ms"):
            for other in ("hf_grouped_mm", "hf_compiled", "hf_max_autotune", "liger"):
                o = impls.get(other)
                if o and o.get("fwd_bwd_ms"):
                    row[f"fwd_bwd_speedup_vs_{other}"] = round(o["fwd_bwd_ms"] / s["fwd_bwd_ms"], 3)
                    if s.get("fwd_ms") and o.get("fwd_ms"):
                        row[f"fwd_speedup_vs_{other}"] = round(o["fwd_ms"] / s["fwd_ms"], 3)
            dense = impls.get("dense")
            if dense and dense.get("fwd_bwd_tflops") and s.get("fwd_bwd_tflops"):
                row["fraction_of_dense_tflops"] = round(s["fwd_bwd_tflops"] / dense["fwd_bwd_tflops"], 3)
            tr = impls.get("sonic_tr")
            if tr and tr.get("fwd_bwd_ms"):
                row["token_rounding_speedup_fwd_bwd"] = round(s["fwd_bwd_ms"] / tr["fwd_bwd_ms"], 3)
                if tr.get("fwd_ms") and s.get("fwd_ms"):
                    row["token_rounding_speedup_fwd"] = round(s["fwd_ms"] / tr["fwd_ms"], 3)
            targets = {}
            if "fwd_bwd_speedup_vs_hf_grouped_mm" in row:
                targets["fwd_bwd >= 1.5x hf_grouped_mm"] = row["fwd_bwd_speedup_vs_hf_grouped_mm"] >= 1.5
            if "fwd_bwd_speedup_vs_liger" in row:
                targets["fwd_bwd >= 1.0x liger"] = row["fwd_bwd_speedup_vs_liger"] >= 1.0
            if key == (16384, 1536, 256, 256, 8) and "token_rounding_speedup_fwd_bwd" in row:
                targets["token rounding >= 1.16x top-k"] = row["token_rounding_speedup_fwd_bwd"] >= 1.16
            row["targets"] = targets
        out["x".join(map(str, key))] = row
    return out


def plot_bench(merged: dict, path: str) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [r for r in merged["results"] if r["status"] == "ok" and r.get("fwd_bwd_tflops")]
    if not rows:
        return None
    shapes = list(dict.fromkeys(_key(r["config"]) for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    fig, ax = plt.subplots(figsize=(4 + 2.2 * len(shapes), 4.5))
    width = 0.8 / len(impls)
    for i, impl in enumerate(impls):
        vals = []
        for sh in shapes:
            r = next((r for r in rows if _key(r["config"]) == sh and r["impl"] == impl), None)
            vals.append(r["fwd_bwd_tflops"] if r else 0.0)
        ax.bar([j + i * width for j in range(len(shapes))], vals, width, label=impl)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))])
    ax.set_xticklabels([f"T{t} d{d}\nn{n} E{e} K{k}" for t, d, n, e, k in shapes], fontsize=8)
    ax.set_ylabel("forward+backward TFLOP/s (needed FLOPs, median time)")
    env = merged.get("environment") or {}
    ax.set_title(f"{env.get('device')} | torch {env.get('torch')} | triton {env.get('triton')}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("outdir", nargs="?")
    p.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny shapes")
    p.add_argument("--budget", type=float, default=None,
                   help="wall-clock budget in seconds (default 480 on GPU, 1500 for the dry run)")
    p.add_argument("--shapes", default=None, help="benchmark shape indices, e.g. 0,4 (default: all five)")
    p.add_argument("--steps", default=None,
                   help="comma-separated subset of " + ",".join(SHARES) + " (default: all; the budget is shared by those)")
    p.add_argument("--no-pack", action="store_true",
                   help=f"leave every result file loose in OUTDIR (default: all but {', '.join(KEEP)} go into {ARCHIVE})")
    p.add_argument("--workers", type=int, default=None,
                   help="precompile worker processes (default: every core; dry run: 2)")
    p.add_argument("--plan", action="store_true",
                   help="print the plan (steps x kernels to compile, estimated compile and run s) and exit")
    p.add_argument("--probe-environment", metavar="JSON", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.probe_environment:
        return probe_environment(args.probe_environment)
    if not args.outdir:
        p.error("OUTDIR is required")
    budget = args.budget if args.budget is not None else (1500.0 if args.dry_run else 480.0)
    only = None
    if args.steps:
        only = [s for s in args.steps.split(",") if s]
        unknown = set(only) - set(SHARES)
        if unknown:
            p.error(f"unknown steps {sorted(unknown)}; valid: {', '.join(SHARES)}")
    if args.plan:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        os.makedirs(args.outdir, exist_ok=True)
        cmd = precompile_cmd(os.path.join(args.outdir, "plan.json"), args.dry_run, args.workers, args.shapes,
                             budget, plan_only=True)
        return subprocess.run(cmd, cwd=ROOT, env=env).returncode
    if not args.dry_run:  # what the lent machine's run call needs (library's device tool)
        print(f"[gpu_check] device run: give the run call timeout_s >= {int(budget) + 90} (budget {int(budget)} s "
              f"+ start-up and packing); carry .whl if the comparator wheels are there; results: "
              f"{', '.join(KEEP)} and {ARCHIVE} under OUTDIR", flush=True)
    return Driver(args.outdir, args.dry_run, budget, args.shapes, only, pack=not args.no_pack,
                  workers=args.workers).main()


if __name__ == "__main__":
    sys.exit(main())
