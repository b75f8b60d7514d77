"""``.item()`` of a tensor computed only from sizes and constants, read at trace time in sonic frames.

Code that pads or all-reduces a token count writes it as a one-element tensor and reads it back:
fairseq's ``MOELayer`` computes ``int(all_reduce_max(n_tokens * torch.ones((1,), dtype=torch.long,
device=d)).item())`` where ``n_tokens`` is a size. Dynamo breaks the graph at ``.item()`` (without
``capture_scalar_outputs``), or makes it an unbacked symbol (with it) that the padding and the
capacity arithmetic after it then guard on: either way the MoE block is split or not traced.

In a frame compiled with sonic (scoped by ``moe_inductor.dynamo_scope``: installed between
Dynamo's compile-start and compile-end callbacks of that frame, and only acting while the innermost
frame being traced is a sonic one), ``Tensor.item()`` on a tensor whose value the graph computes
only from sizes (SymInts Dynamo tracks) and Python integers is answered at trace time with that
value as a size expression (``s0*s1``, or a plain int), which Dynamo guards on like any size. It
is the value eager reads: every tensor on the way is a one-element ``int64`` tensor made by
``ones``/``zeros``/``full``/``tensor`` of integer constants or sizes, combined by integer ``+ - *
//``, negation, ``maximum``/``minimum`` and value-keeping views, which on int64 compute exactly
Python's integer arithmetic (sizes are far below 2**63). Anything else (a float, an input tensor,
a random or data-dependent op, another reader of nothing) is left to Dynamo unchanged, with
``reasons()`` saying which producer stopped the proof.
"""
from __future__ import annotations

import logging
import operator
import threading

import torch

log = logging.getLogger("moe_inductor")

_lock = threading.RLock()
_depth = 0
_original = None
_reasons: list = []  # (where, why) of the .item() calls left to Dynamo, newest last (bounded)

_FACTORIES = {torch.ones: 1, torch.zeros: 0}
_BINARY = {operator.mul: operator.mul, operator.add: operator.add, operator.sub: operator.sub,
           operator.floordiv: operator.floordiv, torch.mul: operator.mul, torch.add: operator.add,
           torch.sub: operator.sub, torch.floor_divide: operator.floordiv, torch.maximum: torch.sym_max, torch.minimum: torch.sym_min,
           "mul": operator.mul, "add": operator.add, "sub": operator.sub, "floor_divide": operator.floordiv,
           "__mul__": operator.mul, "__add__": operator.add, "__sub__": operator.sub, "__rmul__": operator.mul,
           "__radd__": operator.add, "__floordiv__": operator.floordiv, "maximum": torch.sym_max,
           "minimum": torch.sym_min}
_KEEP = {"view", "reshape", "flatten", "squeeze", "unsqueeze", "contiguous", "clone", "long", "to", "detach",
         "__getitem__", torch.flatten, torch.squeeze, torch.unsqueeze, torch.clone, torch.reshape, operator.getitem}
_FACTORY_KWARGS = {"dtype", "device", "layout", "pin_memory", "requires_grad"}


class NotShapeOnly(Exception):
    """The tensor's value is not proved a function of sizes and constants (the message says why)."""


def _describe(node) -> str:
    target = getattr(node.target, "__name__", node.target)
    return f"{node.name} = {target}({', '.join(str(a) for a in node.args)})"


def _one_long(node) -> None:
    v = node.meta.get("example_value")
    # static sizes only: a symbolic numel would be compared through a guard
    if not isinstance(v, torch.Tensor) or v.dtype != torch.int64 or not all(type(d) is int for d in v.shape) \
            or v.numel() != 1:
        raise NotShapeOnly(f"`{_describe(node)}` is not a one-element int64 tensor")


def _scalar(a, depth: int):
    """(value, proxy-or-int) of an argument: a Python int, a SymInt node, or a tensor node."""
    if isinstance(a, bool) or (not isinstance(a, (int, torch.fx.Node))):
        raise NotShapeOnly(f"argument {a!r} is not an integer or a graph value")
    if isinstance(a, int):
        return a, a
    v = a.meta.get("example_value")
    if isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool):
        return v, a
    return evaluate(a, depth + 1)


def _combine(fn, pairs):
    """Apply ``fn`` to the values; the graph node computing it only when a value is symbolic."""
    values = [p[0] for p in pairs]
    out = fn(*values)
    if all(isinstance(p[1], int) for p in pairs):
        return out, int(out)
    return out, (fn, [p[1] for p in pairs])


def evaluate(node, depth: int = 0):
    """(value, recipe) of the one-element int64 tensor ``node``: its value (int or SymInt) and how to
    compute it from graph scalars (an int, a Node, or ``(fn, [recipes])``). Raises NotShapeOnly."""
    if depth > 32:
        raise NotShapeOnly("too many producers")
    _one_long(node)
    target = node.target if node.op == "call_function" else node.target if node.op == "call_method" else None
    args, kwargs = list(node.args), dict(node.kwargs)
    if target is None:
        raise NotShapeOnly(f"`{_describe(node)}` is a graph input or attribute")
    if target in _FACTORIES or target is torch.full or target is torch.tensor:
        if set(kwargs) - _FACTORY_KWARGS:
            raise NotShapeOnly(f"`{_describe(node)}` has arguments other than dtype/device")
        if target in _FACTORIES:
            return _FACTORIES[target], _FACTORIES[target]
        fill = args[1] if target is torch.full else args[0]
        while target is torch.tensor and isinstance(fill, (list, tuple)) and len(fill) == 1:
            fill = fill[0]
        return _scalar(fill, depth)
    if target in _BINARY and len(args) == 2 and not kwargs:
        return _combine(_BINARY[target], [_scalar(a, depth) for a in args])
    if target in (operator.neg, torch.neg, "neg", "__neg__") and len(args) == 1 and not kwargs:
        return _combine(operator.neg, [_scalar(args[0], depth)])
    if target in _KEEP and args and isinstance(args[0], torch.fx.Node):
        _one_long(args[0])  # int64 in and out, one element: the value is kept
        return evaluate(args[0], depth + 1)
    raise NotShapeOnly(f"`{_describe(node)}` is not a size-only integer op")


def _emit(tx, recipe):
    """A proxy (or int) computing ``recipe`` in Dynamo's graph."""
    if isinstance(recipe, int):
        return recipe
    if isinstance(recipe, torch.fx.Node):
        return torch.fx.Proxy(recipe, tx.output.current_tracer)
    fn, parts = recipe
    return tx.output.create_proxy("call_function", fn, tuple(_emit(tx, p) for p in parts), {})


def _where(tx) -> str:
    try:
        return f"{tx.f_code.co_filename}:{tx.lineno}"
    except Exception:
        return "?"


def _note(where: str, why: str) -> None:
    with _lock:
        _reasons.append((where, why))
        del _reasons[:-50]


def reasons() -> list:
    """(file:line, why) of the recent ``.item()`` calls in sonic frames left to Dynamo."""
    with _lock:
        return list(_reasons)


def _answer(tx, tensor_var):
    """A VariableTracker holding the value of ``tensor_var.item()``, or None (left to Dynamo)."""
    from torch._dynamo.variables import ConstantVariable
    from torch._dynamo.variables.tensor import SymNodeVariable

    if getattr(tx, "export", False) or not _sonic_frame():
        return None
    try:
        value, recipe = evaluate(tensor_var.as_proxy().node)
    except NotShapeOnly as e:
        _note(_where(tx), str(e))
        return None
    if isinstance(recipe, int):
        log.debug("sonic: .item() at %s read at trace time: %s", _where(tx), recipe)
        return ConstantVariable.create(recipe)
    proxy = _emit(tx, recipe)
    log.debug("sonic: .item() at %s read at trace time as the size %s", _where(tx), value)
    return SymNodeVariable.create(tx, proxy, value)


def _sonic_frame() -> bool:
    from . import dynamo_scope

    stack = dynamo_scope._stack()
    return bool(stack) and stack[-1] is not None


def _method_item(self, tx, *args, **kwargs):
    if not args and not kwargs:
        try:
            found = _answer(tx, self)
        except Exception as e:  # never fail a compile over this: Dynamo's own handling follows
            log.debug("sonic: trace-time .item() failed: %s", e)
            found = None
        if found is not None:
            return found
    return _original(self, tx, *args, **kwargs)


def _target():
    try:
        from torch._dynamo.variables.tensor import TensorVariable
    except ImportError:
        return None
    return TensorVariable if callable(TensorVariable.__dict__.get("method_item")) else None


def enter() -> bool:
    """Install the trace-time ``.item()`` for the sonic frame being traced; returns whether it did
    (then ``leave()`` must follow). Nested sonic traces share one installation."""
    global _depth, _original
    cls = _target()
    if cls is None:
        return False
    with _lock:
        if _depth == 0:
            _original = cls.method_item
            cls.method_item = _method_item
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
            cls.method_item = _original
            _original = None
