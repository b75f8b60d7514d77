"""One place for the safety questions every MoE recogniser asks of Dynamo's torch-level graph.

A part recogniser (``patterns/dispatch.py``, ``patterns/experts.py``, ``patterns/combine.py``) and the
composition that proves the parts fit together (``patterns/per_expert.py``, the idiom modules) ask:

- mutation and aliasing: is a tensor written, directly or through a view of it (``view``,
  ``reshape``, ``permute``, basic indexing, ``chunk`` ...), between two points of the graph
  (``writes_to``, ``mutated_between``, ``need_unmodified``);
- dtypes: casts that change nothing (``strip_identity``), casts in general (``strip_casts``);
- symbolic shapes: sizes provably equal (``moe_inductor.rewrite.same``, sympy, no guards added);
- is a path pure: nothing random and nothing in place between the gathered tokens and the value an
  expert produces (``need_pure_path``);
- are two index computations the same value (``equivalent``: Dynamo records ``flat == e`` once
  for the gather and once for the write).

Every check that fails raises ``Declined`` with a reason that names the node.
"""
from __future__ import annotations

import operator
from typing import Iterable, Optional

import torch
import torch.fx as fx
import torch.nn.functional as Fn

from .rewrite import Declined, dtype_of, example_value, is_mutation, node_order, same, shape_of

# methods / functions whose result may share memory with their first argument
_VIEW_METHODS = {
    "view", "reshape", "permute", "transpose", "unsqueeze", "squeeze", "expand", "t", "flatten", "unflatten",
    "narrow", "select", "view_as", "reshape_as", "expand_as", "as_strided", "chunk", "split", "unbind",
    "contiguous", "detach", "movedim", "swapaxes", "diagonal", "unfold", "real", "imag", "__getitem__",
}
_VIEW_FUNCTIONS = {
    torch.reshape, torch.transpose, torch.permute, torch.squeeze, torch.unsqueeze, torch.flatten, torch.narrow,
    torch.select, torch.chunk, torch.split, torch.unbind, torch.t, torch.detach, torch.movedim, torch.swapaxes,
    torch.diagonal, torch.as_strided,
}


# ops whose tuple outputs are fresh tensors: no output aliases an input or another output (top-k
# values and indices, sort, max/min along a dim, nonzero-style where): ``vals /= vals.sum()`` on
# top-k values does not write the ids
_FRESH_TUPLE_METHODS = {"topk", "sort", "max", "min", "kthvalue", "median", "mode", "nonzero", "unique", "aminmax"}
_FRESH_TUPLE_FUNCTIONS = {torch.topk, torch.sort, torch.max, torch.min, torch.kthvalue, torch.median, torch.mode,
                          torch.where, torch.nonzero, torch.unique, torch.aminmax}


def _fresh_tuple(node: fx.Node) -> bool:
    """``node`` returns a tuple of freshly allocated tensors."""
    if node.op == "call_method":
        return node.target in _FRESH_TUPLE_METHODS
    return node.op == "call_function" and node.target in _FRESH_TUPLE_FUNCTIONS


def _basic_index(index) -> bool:
    """An index made only of ints, slices, None and Ellipsis: ``t[index]`` is a view of t."""
    parts = index if isinstance(index, tuple) else (index,)
    return all(p is None or p is Ellipsis or isinstance(p, (int, slice)) for p in parts)


def is_view_of(node: fx.Node, base: fx.Node) -> bool:
    """``node`` may share memory with its argument ``base``."""
    if not node.args or node.args[0] is not base:
        return False
    if node.op == "call_method":
        return node.target in _VIEW_METHODS
    if node.op == "call_function":
        if node.target is operator.getitem:
            # tuple outputs (chunk/split results) are views when their producer is; those of ops that
            # allocate their outputs (topk, sort, max(dim), where(mask)) are not
            if isinstance(example_value(base), (tuple, list)):
                return not _fresh_tuple(base)
            return _basic_index(node.args[1])
        return node.target in _VIEW_FUNCTIONS
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


# --------------------------------------------------------------------------- dtypes and identities

def is_identity_dropout(node: fx.Node) -> bool:
    """F.dropout(h, p, training, inplace) that returns h unchanged: eval mode or p == 0."""
    if node.op != "call_function" or node.target is not Fn.dropout:
        return False
    args = dict(zip(("input", "p", "training", "inplace"), node.args))
    args.update(node.kwargs)
    p, training, inplace = args.get("p", 0.5), args.get("training", True), args.get("inplace", False)
    return inplace is False and (training is False or p == 0 or p == 0.0)


def _same_dtype_cast(node: fx.Node) -> bool:
    if node.op != "call_method" or node.kwargs or not node.args:
        return False
    if node.target == "to" and len(node.args) == 2 and isinstance(node.args[1], torch.dtype):
        return dtype_of(node.args[0]) == node.args[1]
    if node.target == "type_as" and len(node.args) == 2:
        return dtype_of(node.args[0]) == dtype_of(node.args[1])
    names = {"float": torch.float32, "double": torch.float64, "half": torch.float16, "bfloat16": torch.bfloat16}
    return node.target in names and len(node.args) == 1 and dtype_of(node.args[0]) == names[node.target]


def _same_shape_view(node: fx.Node) -> bool:
    """``t.view(...)`` / ``t.reshape(...)`` that provably keeps t's shape (DBRX: ``y.view(-1, d)``)."""
    if node.op != "call_method" or node.target not in ("view", "reshape", "squeeze") or not node.args \
            or not isinstance(node.args[0], fx.Node):
        return False
    return same_shape(node, node.args[0])


def strip_identity(node):
    """Follow identity dropout, casts to the same dtype and ``contiguous`` back to the producer."""
    while isinstance(node, fx.Node):
        if is_identity_dropout(node):
            node = node.args[0] if node.args else node.kwargs["input"]
        elif _same_dtype_cast(node) or (node.op == "call_method" and node.target == "contiguous"
                                        and len(node.args) == 1 and not node.kwargs) or _same_shape_view(node):
            node = node.args[0]
        else:
            return node
    return node


def strip_casts(node):
    """Follow any dtype cast (``.to(dtype)``, ``.float()``, ``type_as``) and identities back."""
    while isinstance(node, fx.Node):
        inner = strip_identity(node)
        if inner is not node:
            node = inner
            continue
        if node.op == "call_method" and node.args and (
                (node.target == "to" and len(node.args) == 2 and isinstance(node.args[1], torch.dtype)
                 and not node.kwargs)
                or (node.target in ("float", "double", "half", "bfloat16") and len(node.args) == 1)
                or (node.target == "type_as" and len(node.args) == 2)):
            node = node.args[0]
            continue
        return node
    return node


# --------------------------------------------------------------------------- purity

_RANDOM = {torch.rand_like, torch.randn_like, torch.bernoulli, torch.rand, torch.randn, torch.randint,
           torch.multinomial, torch.normal}


def need_pure_path(value: fx.Node, source: fx.Node, allowed: Iterable = ()) -> None:
    """Nothing random and nothing in place on the path from ``source`` (the gathered tokens) to
    ``value`` (what the expert produces), except the in-place nodes ``allowed`` (proven parts of
    the block, e.g. a per-expert bias ``add_``)."""
    order = node_order(value.graph)
    downstream, stack = {source}, [source]
    while stack:
        for u in stack.pop().users:
            if u not in downstream and order[u] <= order[value]:
                downstream.add(u)
                stack.append(u)
    for n in downstream:
        if n.op == "call_function" and n.target is Fn.dropout and not is_identity_dropout(n):
            raise Declined(f"expert path applies dropout with p > 0 in training ({n.name}: random per element): "
                           "the fused op cannot reproduce it")
        if n.op == "call_function" and n.target in _RANDOM:
            raise Declined(f"expert path draws random numbers ({n.name}): the fused op cannot reproduce it")
        for u in n.users:
            if is_mutation(u, n) and u not in allowed:
                raise Declined(f"expert path modifies {n.name} in place ({u.format_node()})")


# --------------------------------------------------------------------------- equal values

def equivalent(a, b, depth: int = 6) -> bool:
    """``a`` and ``b`` compute the same value: the same node, equal constants, or the same pure
    call on equivalent arguments (Dynamo records ``flat == e`` once for ``x[flat == e]`` and once
    for ``y[flat == e] = ...``). Writes between the two are the caller's concern."""
    if a is b:
        return True
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(equivalent(p, q, depth) for p, q in zip(a, b))
    if isinstance(a, fx.Node) and isinstance(b, fx.Node):
        if depth <= 0 or a.op != b.op or a.op not in ("call_function", "call_method") or a.target != b.target:
            return False
        if is_mutation(a, a.args[0] if a.args else None) or (a.op == "call_function" and a.target in _RANDOM):
            return False
        return (len(a.args) == len(b.args) and set(a.kwargs) == set(b.kwargs)
                and all(equivalent(p, q, depth - 1) for p, q in zip(a.args, b.args))
                and all(equivalent(a.kwargs[k], b.kwargs[k], depth - 1) for k in a.kwargs))
    if isinstance(a, fx.Node) or isinstance(b, fx.Node):
        return False
    return type(a) is type(b) and a == b


def _flat_of(a, b) -> bool:
    """``a`` is ``b`` flattened to one dim (``b.view(-1)``, ``b.reshape(-1)``, ``b.flatten()``)."""
    return (isinstance(a, fx.Node) and a.op == "call_method" and a.args and equivalent(a.args[0], b)
            and ((a.target in ("view", "reshape") and tuple(a.args[1:]) in ((-1,), ((-1,),)))
                 or (a.target == "flatten" and len(a.args) == 1 and not a.kwargs)))


def same_rows(a, b) -> bool:
    """Two masks / indices select the same rows of a (tokens.., d) tensor and of its (-1, d) view:
    equivalent, or one is the other flattened."""
    return equivalent(a, b) or _flat_of(a, b) or _flat_of(b, a)


def same_shape(a, b) -> bool:
    sa, sb = shape_of(a), shape_of(b)
    return sa is not None and sb is not None and len(sa) == len(sb) and all(same(p, q) for p, q in zip(sa, sb))
