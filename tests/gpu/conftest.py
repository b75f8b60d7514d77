"""GPU checks of the fused MoE op and the sonic backend, run by ``examples/gpu_check.py``.

Scale. With CUDA the tests run at realistic shapes on the GPU. With ``MOE_GPU_CHECK_DRY_RUN=1``
(``examples/gpu_check.sh OUTDIR --dry-run``) they run the same code on CPU under the Triton
interpreter at tiny shapes, so the GPU command is known to work before a GPU is lent. Without
either, every test here is skipped with that reason (the normal CPU suite covers the kernels with
the interpreter in tests/test_kernels.py; tests/test_gpu_check.py runs the dry run).

Reporting, for the driver:
  MOE_GPU_CHECK_RESULTS=<file.jsonl>  one JSON line per finished test (outcome, duration, the
                                      errors it measured), written as each test ends, so a run
                                      stopped at its time limit still leaves the finished ones.
  MOE_GPU_CHECK_DEADLINE=<unix time>  tests not started by then are skipped ("time share used up").
"""
from __future__ import annotations

import json
import os
import time

import pytest
import torch

DRY_RUN = os.environ.get("MOE_GPU_CHECK_DRY_RUN") == "1"
HAS_CUDA = torch.cuda.is_available() and not DRY_RUN

_SKIP_REASON = ("needs a CUDA device: run `bash examples/gpu_check.sh OUTDIR` on a GPU, or "
                "`--dry-run` for these tests on CPU under the Triton interpreter")


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(os.path.abspath(__file__))
    for item in items:
        if not str(item.fspath).startswith(here):
            continue
        item.add_marker(pytest.mark.gpu)
        if not HAS_CUDA and not DRY_RUN:
            item.add_marker(pytest.mark.skip(reason=_SKIP_REASON))


def pytest_runtest_setup(item):
    deadline = os.environ.get("MOE_GPU_CHECK_DEADLINE")
    if deadline and time.time() > float(deadline):
        pytest.skip("time share of the gpu_tests step used up: not started")


def pytest_runtest_logreport(report):
    path = os.environ.get("MOE_GPU_CHECK_RESULTS")
    if not path:
        return
    # One line per test: its call phase, or the setup/teardown phase that failed or skipped it.
    if not (report.when == "call" or report.outcome != "passed"):
        return
    record = {
        "test": report.nodeid,
        "phase": report.when,
        "outcome": report.outcome,
        "duration_s": round(report.duration, 3),
        "measured": {k: v for k, v in report.user_properties},
    }
    if report.outcome == "skipped" and isinstance(report.longrepr, tuple):
        record["reason"] = str(report.longrepr[2])
    elif report.outcome != "passed":
        record["reason"] = str(report.longrepr)[-4000:]
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
