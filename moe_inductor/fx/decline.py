"""Declining: the one exception a recogniser raises when it cannot prove what it sees, and ``need``."""
from __future__ import annotations

from typing import Any, Optional


class Declined(Exception):
    """Raised by an analysis when a candidate is not provably what it looks like; the message is
    the reason reported to the user (``explain``, logs, counters)."""


class PartDeclined(Declined):
    """A named part recogniser saw its spelling but could not prove it; ``part`` names the part."""

    def __init__(self, part: str, reason: str) -> None:
        super().__init__(f"{part}: {reason}")
        self.part = part


def need(cond: Any, reason: str, part: Optional[str] = None) -> None:
    """Decline with ``reason`` unless ``cond`` holds: ``Declined(reason)``, or
    ``PartDeclined(part, reason)`` when a part recogniser names itself."""
    if not cond:
        raise PartDeclined(part, reason) if part is not None else Declined(reason)
