"""Views, aliases and writes: is a tensor written, directly or through anything sharing its memory,
between two points of the graph? (Each failed ``need_unmodified`` raises ``Declined`` naming the
node.)"""
from __future__ import annotations

import operator
from typing import Iterable, Optional

import torch
import torch.fx as fx

from .decline import Declined
from .nodes import is_mutation, node_order
from .shapes import dtype_of, example_value
from .targets import (ALIASING_FUNCTIONS, ALIASING_METHODS, CAST_METHODS, FRESH_TUPLE_FUNCTIONS,
                      FRESH_TUPLE_METHODS)


def fresh_tuple(node: fx.Node) -> bool:
    """``node`` returns a tuple of freshly allocated tensors."""
    if node.op == "call_method":
        return node.target in FRESH_TUPLE_METHODS
    return node.op == "call_function" and node.target in FRESH_TUPLE_FUNCTIONS


def basic_index(index) -> bool:
    """An index made only of ints, slices, None and Ellipsis: ``t[index]`` is a view of t."""
    parts = index if isinstance(index, tuple) else (index,)
    return all(p is None or p is Ellipsis or isinstance(p, (int, slice)) for p in parts)


def _may_keep_dtype(node: fx.Node, base: fx.Node) -> bool:
    """A cast returns its receiver itself unless the dtype changes: only a provable change of
    dtype (both example values known and different) makes it a new tensor."""
    a, b = dtype_of(node), dtype_of(base)
    return a is None or b is None or a == b


def is_view_of(node: fx.Node, base: fx.Node) -> bool:
    """``node`` may share memory with its argument ``base``."""
    if not node.args or node.args[0] is not base:
        return False
    if node.op == "call_method":
        if node.target in CAST_METHODS:
            return _may_keep_dtype(node, base)
        return node.target in ALIASING_METHODS
    if node.op == "call_function":
        if node.target is operator.getitem:
            # tuple outputs (chunk/split results) are views when their producer is; those of ops that
            # allocate their outputs (topk, sort, max(dim), where(mask)) are not
            if isinstance(example_value(base), (tuple, list)):
                return not fresh_tuple(base)
            return basic_index(node.args[1])
        return node.target in ALIASING_FUNCTIONS
    return False


def is_fresh(node) -> bool:
    """``node`` is a tensor the graph computed into memory of its own: not an input, a parameter or
    a buffer (placeholder / get_attr), not a view of its argument, not the result of an in-place op
    (which is its argument). Writing into it in place changes nothing the caller can see."""
    if not isinstance(node, fx.Node) or node.op not in ("call_function", "call_method") \
            or not isinstance(example_value(node), torch.Tensor):
        return False
    src = node.args[0] if node.args else None
    return not (isinstance(src, fx.Node) and (is_view_of(node, src) or is_mutation(node, src)))


#: factories whose result holds no value computed from anything (a constant, or nothing: ``empty``)
_ALLOCATING_FUNCTIONS = (torch.zeros, torch.zeros_like, torch.ones, torch.ones_like, torch.full, torch.full_like,
                         torch.empty, torch.empty_like)
_ALLOCATING_METHODS = ("new_zeros", "new_ones", "new_full", "new_empty")


def is_allocation(node) -> bool:
    """``node`` allocates a tensor filled with a constant (``zeros``, ``full_like``, ``new_zeros``, ...)
    or with nothing (``empty``): unlike a computed fresh tensor (``cumsum(m) - 1``, ``one_hot(i)``, a
    product), its value is not a function of anything, so a first write into it, before any read, is
    how its value is computed rather than a change to a value computed before."""
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_function":
        return node.target in _ALLOCATING_FUNCTIONS
    return node.op == "call_method" and node.target in _ALLOCATING_METHODS


def aliases(node: fx.Node) -> set:
    """``node`` and every node of the graph that may share its memory: views of it, views of those,
    and, when ``node`` is itself a view, its bases and their views."""
    root = node
    while isinstance(root, fx.Node) and root.op in ("call_function", "call_method") and root.args \
            and isinstance(root.args[0], fx.Node) and is_view_of(root, root.args[0]):
        root = root.args[0]
    found, stack = {root}, [root]
    while stack:
        n = stack.pop()
        for u in n.users:
            if u not in found and is_view_of(u, n):
                found.add(u)
                stack.append(u)
    found.add(node)
    return found


def writes_to(value: fx.Node) -> list:
    """Nodes that write into ``value`` or into anything aliasing it (in-place methods, setitem,
    augmented assignment, mutating ops), in graph order."""
    out = []
    for a in aliases(value):
        out += [u for u in a.users if is_mutation(u, a)]
    order = node_order(value.graph)
    return sorted(set(out), key=order.__getitem__)


def mutated_between(value: fx.Node, start: fx.Node, end: fx.Node, allowed: Iterable = ()) -> Optional[fx.Node]:
    """A write into ``value`` (or an alias) strictly between ``start`` and ``end`` in graph order,
    other than the nodes in ``allowed``; None if there is none."""
    order = node_order(value.graph)
    lo, hi, allowed = order[start], order[end], set(allowed)
    for w in writes_to(value):
        if lo < order[w] < hi and w not in allowed:
            return w
    return None


def need_unmodified(values: Iterable, start: fx.Node, end: fx.Node, what: str, allowed: Iterable = ()) -> None:
    """Decline if any of ``values`` is written (directly or through an alias) between start and end."""
    for v in values:
        if isinstance(v, fx.Node):
            w = mutated_between(v, start, end, allowed)
            if w is not None:
                raise Declined(f"{what} ({v.name}) is modified in place by {w.format_node()} inside the block")
