"""What the backend saw: every MoE candidate, rewritten or declined with its reason."""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Optional

import torch

from .rewrite import Candidate

_listeners: list = []
#: lists that the fused op appends a RoutingStats to on every call (see capture_routing_stats)
_routing_listeners: list = []


@dataclasses.dataclass
class RoutingStats:
    """What one call of the fused op routed: per-expert counts and the padding waste that GEMM
    tiles of ``tile_m`` rows would compute for them (the token-rounding issue's figure)."""

    num_tokens: int
    num_experts: int
    assignments: int  # dropped (expert -1) padding excluded
    counts: list
    tile_m: int
    padding_waste: float  # sum_e (ceil(f_e/M)*M - f_e) / sum_e f_e


@contextlib.contextmanager
def _listening(listeners: list):
    found: list = []
    listeners.append(found)
    try:
        yield found
    finally:
        listeners.remove(found)


def capture_routing_stats():
    """Collect a RoutingStats for every fused-op call (eager or inside compiled graphs) run in
    this block. Costs one device-to-host read per call, so only while capturing."""
    return _listening(_routing_listeners)


def _record_routing(expert_ids, num_tokens: int, num_experts: int) -> None:
    from .kernels.config import TILE_M
    from .routing import padding_waste

    ids = expert_ids.detach().long()
    counts = torch.zeros(num_experts, dtype=torch.int64, device=ids.device)
    counts.scatter_add_(0, ids.clamp(min=0), (ids >= 0).long())
    rec = RoutingStats(num_tokens=num_tokens, num_experts=num_experts, assignments=int(counts.sum()),
                       counts=counts.tolist(), tile_m=TILE_M, padding_waste=padding_waste(counts, TILE_M))
    for listener in _routing_listeners:
        listener.append(rec)


@dataclasses.dataclass
class CompileReport:
    """Candidates of one compiled graph."""

    candidates: list = dataclasses.field(default_factory=list)
    graph_name: str = ""

    @property
    def rewritten(self) -> list:
        return [c for c in self.candidates if c.status == "rewritten"]

    @property
    def declined(self) -> list:
        return [c for c in self.candidates if c.status == "declined"]


def record_report(report: CompileReport, gm) -> None:
    report.graph_name = getattr(gm, "_sonic_name", type(gm).__name__)
    for listener in _listeners:
        listener.append(report)


def capture_reports():
    """Collect the CompileReports of every graph the sonic backend compiles in this block."""
    return _listening(_listeners)
