"""Logging calls in frames sonic traces: emitted when Dynamo traces them, not a graph break.

Dynamo cannot put a ``logging.Logger`` method call in a graph: it breaks the graph there (or
drops the call, for methods listed in ``torch._dynamo.config.ignore_logging_functions``). MoE code
logs in its forward (transformers' experts dispatch calls ``logger.warning_once`` when a module's
``config._experts_implementation`` is unset, e.g. a block used on its own), and the break splits
the MoE block over several graphs, where no recogniser sees all of it.

In a frame compiled with sonic (scoped by ``moe_inductor.dynamo.dynamo_scope``: applied between Dynamo's
compile-start and compile-end callbacks of that frame, and only there), a logger method call whose
arguments are all Python constants at trace time is carried out by Dynamo while it traces (the
record is emitted then, once per compilation) and leaves nothing in the graph; any other call
(a tensor argument, ``exception``, export) goes to Dynamo unchanged. For ``warning_once`` and
``info_once`` that is what eager does (one record); a per-call ``logger.info`` in a compiled
forward is emitted once per compilation instead of once per call, which plain Inductor does not
do either: it splits the graph and runs the call eagerly.
"""
from __future__ import annotations

import logging
import threading

log = logging.getLogger("moe_inductor")

#: logger methods carried out at trace time (transformers adds the ``_once`` ones to Logger)
METHODS = frozenset({"debug", "info", "warning", "warn", "error", "critical", "log", "warning_once",
                     "info_once"})

_lock = threading.RLock()
_depth = 0
_original = None


def _target():
    try:
        from torch._dynamo.variables.misc import LoggingLoggerVariable
    except ImportError:
        return None
    return LoggingLoggerVariable if callable(getattr(LoggingLoggerVariable, "call_method", None)) else None


def _constant(v):
    return v.as_python_constant()  # NotImplementedError / other: not a constant


def _call_method(self, tx, name, args, kwargs):
    if name in METHODS and not getattr(tx, "export", False):
        try:
            values = [_constant(a) for a in args]
            named = {k: _constant(v) for k, v in kwargs.items()}
        except Exception:
            return _original(self, tx, name, args, kwargs)
        from torch._dynamo.variables import ConstantVariable

        where = ""
        try:
            where = f" at {tx.f_code.co_filename}:{tx.lineno}"
        except Exception:
            pass
        log.debug("sonic: %s.%s(...)%s carried out at trace time (no graph break)", self.value.name, name, where)
        method = getattr(self.value, name)
        try:
            method(*values, **named)
        except Exception as e:  # a logging call must never fail a compile
            log.debug("sonic: the logging call failed at trace time: %s", e)
        return ConstantVariable.create(None)
    return _original(self, tx, name, args, kwargs)


def enter() -> bool:
    """Install the trace-time logging for the sonic frame being traced; returns whether it did
    (then ``leave()`` must follow). Nested sonic traces share one installation."""
    global _depth, _original
    cls = _target()
    if cls is None:
        return False
    with _lock:
        if _depth == 0:
            _original = cls.call_method
            cls.call_method = _call_method
        _depth += 1
    return True


def leave() -> None:
    global _depth, _original
    cls = _target()
    with _lock:
        if _depth == 0 or cls is None:
            return
        _depth -= 1
        if _depth == 0:
            cls.call_method = _original
            _original = None
