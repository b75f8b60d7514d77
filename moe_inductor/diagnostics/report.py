"""What the backend saw: every MoE candidate, rewritten or declined with its reason."""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Optional

import torch

from moe_inductor.diagnostics import listeners
from moe_inductor.lower.rewrite import Candidate
from moe_inductor.diagnostics.stats import RoutingStats, capture_routing_stats  # noqa: F401  (re-exported)

log = logging.getLogger("moe_inductor")

#: (where, runs on) pairs already warned about, so that recompiles do not repeat the warning
_warned: set = set()


@dataclasses.dataclass
class CompileReport:
    """Candidates of one compiled graph."""

    candidates: list = dataclasses.field(default_factory=list)
    graph_name: str = ""
    #: {module path: {part: {spelling: count}}} of recognised parts, filled while ``explain`` listens
    census: dict = dataclasses.field(default_factory=dict)

    @property
    def rewritten(self) -> list:
        return [c for c in self.candidates if c.status == "rewritten"]

    @property
    def declined(self) -> list:
        return [c for c in self.candidates if c.status == "declined"]


def record_report(report: CompileReport, gm) -> None:
    report.graph_name = getattr(gm, "_sonic_name", type(gm).__name__)
    if listeners.active(listeners.REPORTS):  # explain is listening: which parts of not-rewritten blocks were found
        try:
            from moe_inductor.recognize.parts import census

            report.census = census(gm)
        except Exception as e:  # a report must never break compilation
            log.debug("sonic: parts census failed: %s", e)
    listeners.publish(listeners.REPORTS, report)


def capture_reports():
    """Collect the CompileReports of every graph the sonic backend compiles in this block."""
    return listeners.listen(listeners.REPORTS)


# --------------------------------------------------------------------------- what a block runs on

PYTORCH_PATH = "PyTorch path"


def runs_on(device: Optional[torch.device], dtype: Optional[torch.dtype], activation: str, impl: str) -> str:
    """What the fused op of a block will run on, decided at rewrite time from what the graph says
    (device, dtype, activation, the ``impl`` option): "triton", "PyTorch path (<reason>)", or
    "error: ..." for impl='triton' where the kernels cannot serve. A prediction: the op decides at
    run time, through the same ``op.requested_impl`` (``MOE_INDUCTOR_IMPL`` as set now)."""
    from moe_inductor.ops.activations import parse_activation
    from moe_inductor.kernels import unsupported_reason_meta
    from moe_inductor.ops.op import requested_impl

    impl = requested_impl(impl)
    if impl == "torch":
        return f"{PYTORCH_PATH} (impl='torch')"
    if device is None or dtype is None:
        return "unknown (the graph does not record the block's device or dtype)"
    device = torch.device(device)
    reason = unsupported_reason_meta(device, dtype, parse_activation(activation))
    if impl == "triton":
        return "triton" if reason is None else f"error: impl='triton' cannot serve it: {reason}"
    if device.type != "cuda":
        return f"{PYTORCH_PATH} ({device.type})"
    return "triton" if reason is None else f"{PYTORCH_PATH} ({reason})"


def note_runs_on(candidate: Candidate, block: Any, impl: str) -> str:
    """Set ``candidate.runs_on`` for a rewritten block. A CUDA block that will take the PyTorch
    path is counted (``counters["sonic"]["pytorch_path"]``) and warned about once per block and
    reason: that path copies expert counts to the host twice per call and runs experts one by one
    (under CUDA-graph capture it takes a sync-free variant with E times the GEMM work instead)."""
    from torch._dynamo.utils import counters

    example = getattr(block.x, "meta", {}).get("example_value")
    device = getattr(example, "device", None)
    dtype = getattr(block, "dtype", None) or getattr(example, "dtype", None)
    where = candidate.where
    try:
        choice = getattr(block, "choice", None)
        if choice is not None:  # moe_inductor.lower.worth: no fused op for this block
            decided = f"{choice.impl}: {choice.reason}"
        else:
            decided = runs_on(device, dtype, block.activation, impl)
    except Exception as e:  # never fail compilation over a report
        decided = f"unknown ({type(e).__name__}: {e})"
    candidate.runs_on = decided
    if device is not None and torch.device(device).type == "cuda" and decided.startswith(PYTORCH_PATH):
        counters["sonic"]["pytorch_path"] += 1
        if (where, decided) not in _warned and "impl='torch'" not in decided:  # chosen: no warning
            _warned.add((where, decided))
            log.warning(
                "sonic: the MoE block at %s runs on the %s on CUDA, not the Triton kernels: it copies expert "
                "counts to the host twice per call and runs the experts one by one (under CUDA-graph capture a "
                "sync-free variant with E times the GEMM work)", where, decided)
    return decided
