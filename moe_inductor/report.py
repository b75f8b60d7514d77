"""What the backend saw: every MoE candidate, rewritten or declined with its reason."""
from __future__ import annotations

import dataclasses
from typing import Optional

from .rewrite import Candidate
from .stats import RoutingStats, _listening, capture_routing_stats  # noqa: F401  (re-exported)

_listeners: list = []


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
