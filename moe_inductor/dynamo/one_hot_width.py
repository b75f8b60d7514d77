"""``F.one_hot(ids, n)`` with a tensor ``n`` proved ``>= L``, traced in sonic frames; and the normal
form of a one-hot cut to its first L columns.

lucidrains' ``safe_one_hot(indexes, max_length)`` (mixture-of-experts, st-moe-pytorch) computes
``F.one_hot(indexes, max(indexes.max() + 2, max_length))[..., :max_length]``: Dynamo turns the Python
``max`` of a tensor and an int into ``clamp(t, min=max_length)`` and then breaks the graph at the
one-hot (its width is a host read of the data). The width never reaches the result: column j of a
one-hot is ``ids == j``, so the first L columns of any one-hot of width N >= L are
``ids[..., None] == arange(L)``, whatever N is (an index >= L gives a zero row).

Trace time (``trace_one_hot``, sonic frames only, from ``shape_items``): when ``n`` is a one-element
integer tensor whose graph producer is ``clamp(t, min=L)`` / ``clamp_min(t, L)`` with no maximum and L
an integer >= 1 or a size (so ``n >= L`` for every value of ``t``: a proof from the graph, not a
guess), the width is read as an unbacked size ``u = n.item()`` (``capture_scalar_outputs`` for this
one read, nothing else), ``u >= L`` is told to the shape environment (``torch._check``: a runtime
assert that the clamp makes always true), and the one-hot is traced as torch's own decomposition of
``one_hot`` (``torch/_decomp/decompositions.py``, what Inductor compiles for it): the two asserts
``all(ids >= 0)`` and ``all(ids < n)`` (``_assert_async``, kept: eager's errors stay errors) and
``(ids.unsqueeze(-1) == arange(u, dtype=ids.dtype)).to(int64)``. A later ``[..., :L]`` then has the
width L. Python ``max(t, n)`` of such a tensor and a size (a dynamic capacity), which Dynamo would
compare on the host, is traced as ``clamp(t, min=n)`` (``trace_max``), as Dynamo traces ``max(t, 4)``.

Graph time (``narrow_one_hots``, part of the normal form): ``X[..., :L]`` where X is
``one_hot(ids, N)`` or ``(ids[..., None] == arange(N))`` (possibly cast) and the slice's width is
provably L (so N >= L: the shape environment knows it, or N is a number) becomes ``(ids.unsqueeze(-1) ==
arange(L)).to(X.dtype)``, the at-most-one-hot the recognisers read (``fx.matching.arange_onehot``).
Exact: the same values column by column. Near misses left alone: a slice of another axis, a slice
with a start or step, a one-hot without the slice, a width L not proved <= N.
"""
from __future__ import annotations

import logging
import operator
from typing import Optional

import torch
import torch.fx as fx

from moe_inductor.fx.build import call, method
from moe_inductor.fx.matching import is_eq, last_axis_added
from moe_inductor.fx.nodes import invalidate_order
from moe_inductor.fx.shapes import example_value, same

log = logging.getLogger("moe_inductor")

_ONE_HOTS = (torch.nn.functional.one_hot, torch._C._nn.one_hot)
_CLAMPS = (torch.clamp, torch.clip, "clamp", "clip", torch.clamp_min, "clamp_min")


def is_one_hot(fn) -> bool:
    return any(fn is f for f in _ONE_HOTS)


def _int_arg(v) -> Optional[int]:
    return v if type(v) is int else None


def _size_arg(v):
    """An int, or the SymInt a graph node holds (a size Dynamo tracks), else None."""
    if _int_arg(v) is not None:
        return v
    ev = example_value(v) if isinstance(v, fx.Node) else None
    return ev if isinstance(ev, torch.SymInt) else None


def lower_bound(node):
    """L (an int >= 1, or a SymInt size) when ``node`` (a one-element integer tensor) is
    ``clamp(t, min=L)`` / ``clamp_min(t, L)`` with no max bound: its value is >= L for every t. Else None."""
    v = example_value(node) if isinstance(node, fx.Node) else None
    if not isinstance(v, torch.Tensor) or v.dtype not in (torch.int64, torch.int32) or v.numel() != 1 \
            or node.op not in ("call_function", "call_method") or node.target not in _CLAMPS:
        return None
    low = node.args[1] if len(node.args) > 1 else node.kwargs.get("min")
    high = node.args[2] if len(node.args) > 2 else node.kwargs.get("max")
    if node.target in (torch.clamp_min, "clamp_min"):
        high = None if len(node.args) <= 2 else node
    low = _size_arg(low)
    if high is not None or low is None or (type(low) is int and low < 1):
        return None
    return low


def trace_max(tx, fn, a, b):
    """Python ``max(t, n)`` of a one-element integer tensor and a SymInt size, traced as
    ``clamp(t, min=n)`` (the value of the larger one, as Dynamo already traces ``max(t, 4)``), or None.
    Dynamo's own trace of it compares the tensor on the host (a graph break)."""
    from torch._dynamo.variables.tensor import SymNodeVariable, TensorVariable
    from torch._dynamo.variables.torch import TorchInGraphFunctionVariable

    if fn is not max:
        return None
    if isinstance(b, TensorVariable) and isinstance(a, SymNodeVariable):
        a, b = b, a
    if not (isinstance(a, TensorVariable) and isinstance(b, SymNodeVariable)):
        return None
    v = a.as_proxy().node.meta.get("example_value")
    if not isinstance(v, torch.Tensor) or v.dtype not in (torch.int64, torch.int32) or v.dim() != 0 \
            or not isinstance(b.sym_num, torch.SymInt):
        return None
    return TorchInGraphFunctionVariable(torch.clamp).call_function(tx, [a], {"min": b})


def trace_one_hot(tx, ids, n, item):
    """The VariableTracker of ``one_hot(ids, n)`` for a tensor ``n`` proved ``>= L >= 1``, traced as
    ``(ids.unsqueeze(-1) == arange(u)).long()`` with ``u = n.item()`` unbacked, or None (left to
    Dynamo). ``item(var)`` reads ``var.item()`` with ``capture_scalar_outputs`` (the caller's)."""
    from torch._dynamo.variables import ConstantVariable
    from torch._dynamo.variables.torch import TorchInGraphFunctionVariable

    ids_v = ids.as_proxy().node.meta.get("example_value")
    if not isinstance(ids_v, torch.Tensor) or ids_v.dtype != torch.int64:
        return None
    low = lower_bound(n.as_proxy().node)
    if low is None:
        log.debug("sonic: one_hot width %s not proved >= a clamp's integer minimum", n.as_proxy().node.format_node())
        return None
    width = item(n)
    sym = width.sym_num if hasattr(width, "sym_num") else None
    if not isinstance(sym, torch.SymInt):
        return None
    torch._check(sym >= low)  # n = clamp(t, min=low): always true

    def torch_fn(fn, *args, **kwargs):
        return TorchInGraphFunctionVariable(fn).call_function(
            tx, list(args), {k: ConstantVariable.create(v) for k, v in kwargs.items()})

    # torch's own decomposition of one_hot (torch/_decomp/decompositions.py), checks included
    for check, message in (("__ge__", "non-negative"), ("__lt__", "smaller than num_classes")):
        in_range = torch_fn(torch.all, ids.call_method(tx, check, [ConstantVariable.create(0) if check == "__ge__"
                                                                   else n], {}))
        torch_fn(torch._assert_async, in_range, ConstantVariable.create(f"one_hot: Class values must be {message}."))
    ar = torch_fn(torch.arange, width, dtype=ids_v.dtype, device=ids_v.device)
    col = ids.call_method(tx, "unsqueeze", [ConstantVariable.create(-1)], {})
    log.debug("sonic: one_hot with a width >= %s traced as an eq with arange of an unbacked size", low)
    return torch_fn(torch.eq, col, ar).call_method(tx, "to", [ConstantVariable.create(torch.int64)], {})


_INT_CASTS = ("long", "int", "short", "bool")


def _cast_free(node):
    """The producer of ``node`` under dtype casts (``safety.strip_casts`` and integer casts)."""
    from moe_inductor.fx.safety import strip_casts

    while isinstance(node, fx.Node):
        inner = strip_casts(node)
        if inner is node and node.op == "call_method" and node.target in _INT_CASTS and len(node.args) == 1:
            inner = node.args[0]
        if inner is node:
            return node
        node = inner
    return node


def _first_columns(node) -> Optional[tuple]:
    """(X, L) if ``node`` is ``X[..., :L]`` / ``X[:, ..., :L]`` (no start, no step, the last axis only)."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target is operator.getitem
            and len(node.args) == 2 and isinstance(node.args[0], fx.Node) and isinstance(node.args[1], tuple)):
        return None
    x, idx = node.args
    xv = example_value(x)
    if not isinstance(xv, torch.Tensor) or not idx or not isinstance(idx[-1], slice):
        return None
    last = idx[-1]
    full = (Ellipsis,) if idx[:-1] == (Ellipsis,) else idx[:-1]
    stop = _size_arg(last.stop)
    if last.start not in (None, 0) or last.step not in (None, 1) or stop is None or (type(stop) is int and stop < 1):
        return None
    if full != (Ellipsis,) and (len(full) != xv.dim() - 1 or any(i != slice(None) for i in full)):
        return None
    return x, last.stop


def _one_hot_core(x) -> Optional[tuple]:
    """(core, ids) if ``x`` is ``one_hot(ids, N)`` or ``ids[..., None] == arange(N)`` under casts."""
    core = _cast_free(x)
    if not isinstance(core, fx.Node):
        return None
    if core.op == "call_function" and is_one_hot(core.target) and core.args and not core.kwargs:
        return (core, core.args[0]) if isinstance(core.args[0], fx.Node) else None
    if not is_eq(core):
        return None
    for a, b in (core.args, core.args[::-1]):
        ids = last_axis_added(a)
        if ids is not None and isinstance(b, fx.Node) and b.op == "call_function" and b.target is torch.arange \
                and len(b.args) == 1 and not set(b.kwargs) - {"device", "dtype"}:
            return core, ids
    return None


def _narrowed(node) -> Optional[tuple]:
    """(core, ids, L) when ``node`` is the first L columns of a one-hot proved at least L wide."""
    found = _first_columns(node)
    core = _one_hot_core(found[0]) if found is not None else None
    v, xv = example_value(node), example_value(found[0]) if found is not None else None
    if core is None or not isinstance(v, torch.Tensor) or not same(v.shape[-1], _size_arg(found[1])):
        return None  # the slice's width is L only when the one-hot is at least L wide (shape env / static)
    if type(xv.shape[-1]) is int and type(found[1]) is int and xv.shape[-1] < found[1]:
        return None
    return core[0], core[1], found[1]


def narrow_one_hots(gm: fx.GraphModule) -> int:
    """Rewrite each ``X[..., :L]`` of a one-hot X proved at least L wide (module docstring) into
    ``(ids.unsqueeze(-1) == arange(L)).to(dtype)``; returns how many. Never raises."""
    graph, done = gm.graph, 0
    for n in list(graph.nodes):
        try:
            found = _narrowed(n)
            if found is None:
                continue
            core, ids, width = found
            with graph.inserting_after(core):
                col = method(graph, "unsqueeze", ids, -1, like=core)
            with graph.inserting_after(col):
                ar = call(graph, torch.arange, width, like=core, device=example_value(ids).device)
            with graph.inserting_after(ar):
                eq = call(graph, torch.eq, col, ar, like=core)
            with graph.inserting_after(eq):
                out = method(graph, "to", eq, example_value(n).dtype, like=n)
            n.replace_all_uses_with(out)
            graph.erase_node(n)
            done += 1
        except Exception as e:  # never fail a compile over the normal form
            log.debug("sonic: one-hot narrowing skipped: %s", e)
    if done:
        invalidate_order(graph)  # the old one-hot is left to the backend's removal of dead pure nodes
        graph.lint()
        gm.recompile()
    return done
