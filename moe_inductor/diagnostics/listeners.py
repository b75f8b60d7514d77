"""The one registry of listeners: where the package's records go while someone collects them.

Three kinds of record are published, each on its own channel:

- ``ROUTING``: a ``stats.RoutingStats`` per call of the fused op (``stats.capture_routing_stats``);
- ``REPORTS``: a ``report.CompileReport`` per graph the backend compiles (``report.capture_reports``);
- ``FALLBACKS``: a ``dynamo_scope.Fallback`` per fallback (``dynamo_scope.capture_fallbacks``).

``with listen(channel) as found:`` appends every record published on ``channel`` inside the block to
the list ``found``; blocks may nest and overlap (each gets every record). Publishing is a no-op
when nobody listens, and ``active(channel)`` lets a publisher skip computing a record nobody
wants (the fused op's routing counts cost a device-to-host copy). This module holds the only
listener lists of the package; it imports nothing of it, so every module can import it.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterator

ROUTING = "routing"
REPORTS = "reports"
FALLBACKS = "fallbacks"
CHANNELS = (ROUTING, REPORTS, FALLBACKS)

_lock = threading.RLock()
#: channel -> the lists of the blocks listening to it now (the only listener state of the package)
_listening: dict = {channel: [] for channel in CHANNELS}


def _lists(channel: str) -> list:
    try:
        return _listening[channel]
    except KeyError:
        raise ValueError(f"moe_inductor.diagnostics.listeners: unknown channel {channel!r}; valid: {', '.join(CHANNELS)}") from None


def active(channel: str) -> bool:
    """Is anyone listening to ``channel``? (No lock: a stale answer costs one record at most.)"""
    return bool(_lists(channel))


def publish(channel: str, record: Any) -> None:
    """Hand ``record`` to every block listening to ``channel`` now."""
    with _lock:
        targets = list(_lists(channel))
    for found in targets:
        found.append(record)


@contextlib.contextmanager
def listen(channel: str) -> Iterator[list]:
    """``with listen(channel) as found:`` collects the records published on ``channel`` in the block."""
    lists = _lists(channel)
    found: list = []
    with _lock:
        lists.append(found)
    try:
        yield found
    finally:
        with _lock:
            # by identity: two blocks' lists may be equal (both empty)
            for i, entry in enumerate(lists):
                if entry is found:
                    del lists[i]
                    break
