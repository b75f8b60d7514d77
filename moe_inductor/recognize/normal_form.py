"""The normal form the recognisers read: in-place arithmetic on fresh tensors made functional.

Real MoE code writes ``h.mul_(up)``, ``x *= s``, ``F.silu(h, inplace=True)``, ``w /= w.sum(...)``,
``scores.masked_fill_(~keep, -inf)`` on tensors it has just computed. Each recogniser that meets
such a node must otherwise prove by itself that the write changes nothing it reads; most decline
("modifies h in place"). This pass rewrites, before recognition, every in-place elementwise op
``n = t.op_(args)`` into ``f = t.op(args)`` and makes every later reader of ``t`` (and of ``n``)
read ``f``, when that provably computes the same values for everyone:

- ``t`` is a tensor the graph allocated itself (the result of an allocating op in ``_ALLOCATING``:
  a GEMM, arithmetic, an activation, a softmax, a top-k value, rows picked by a mask or an index
  list (``out[m] += y`` reads such a copy)... never an input, a parameter, a
  buffer, a view, a cast that may return its argument, or a zeros/empty buffer, which the combine
  recognisers read as accumulators);
- no view of ``t`` exists before ``n`` (a view taken earlier would see the write; views taken
  after ``n`` are redirected with the other later readers);
- ``f`` has ``t``'s shape, dtype and device (an in-place op keeps ``t``'s dtype and shape; the
  functional one could promote or broadcast: then ``n`` is left as it is).

Readers of ``t`` before ``n`` keep reading ``t``, which now never changes. Values are bitwise those
of the in-place form (same op, same dtype, same inputs). Accumulations into buffers (``index_add_``,
``index_put_``, ``scatter_add_``, the write-back ``setitem`` of ``out[m] += y``, whose ``+=`` on the
copy ``out[m]`` becomes ``+``: ``out[m] = out[m] + y``) stay writes: they are what the combine
recognisers read. ``functionalize`` returns the number of ops rewritten; the backend compiles the
graph as Dynamo gave it when no block is rewritten, so this form only reaches Inductor with a
fused op in it.
"""
from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.fx as fx

from moe_inductor.fx.aliasing import aliases, fresh_tuple
from moe_inductor.fx.build import emit
from moe_inductor.fx.nodes import invalidate_order
from moe_inductor.fx.shapes import example_value, same
from moe_inductor.fx.targets import (ALLOCATING_FUNCTIONS, ALLOCATING_METHODS, FUNCTIONAL_OF_FUNCTION, FUNCTIONAL_OF_METHOD,
                         INPLACE_FLAG_FUNCTIONS, OPERATOR_OF_METHOD)


def _allocating(node) -> bool:
    if not isinstance(node, fx.Node) or not isinstance(example_value(node), torch.Tensor):
        return False
    if node.op == "call_function":
        if node.target is operator.getitem:
            src = node.args[0]
            if isinstance(example_value(src), (tuple, list)):  # one tensor of a fresh tuple (top-k values)
                return isinstance(src, fx.Node) and fresh_tuple(src) and isinstance(node.args[1], int)
            return _advanced_index(node.args[1])  # t[mask], t[idx]: a copy (basic indexing is a view)
        if node.target in INPLACE_FLAG_FUNCTIONS and node.kwargs.get("inplace"):
            return False
        return node.target in ALLOCATING_FUNCTIONS
    return node.op == "call_method" and node.target in ALLOCATING_METHODS


def _advanced_index(index) -> bool:
    """An index with a tensor of at least one dimension (a mask, an index list): indexing by it copies.
    A 0-dim integer tensor indexes like an int (a view), so it does not count."""
    parts = index if isinstance(index, (tuple, list)) else (index,)
    for p in parts:
        v = example_value(p) if isinstance(p, fx.Node) else None
        if isinstance(v, torch.Tensor) and v.dim() >= 1:
            return True
    return False


def _functional(node: fx.Node) -> Optional[tuple]:
    """(op, target, kwargs) of the functional form of an in-place elementwise ``node``, or None."""
    if node.op == "call_method" and node.target in FUNCTIONAL_OF_METHOD:
        if node.target in OPERATOR_OF_METHOD and not node.kwargs and len(node.args) == 2:
            return "call_function", OPERATOR_OF_METHOD[node.target], {}  # a * b: how Dynamo records `*`
        return "call_method", FUNCTIONAL_OF_METHOD[node.target], dict(node.kwargs)
    if node.op == "call_function":
        if node.target in FUNCTIONAL_OF_FUNCTION and not node.kwargs:
            return "call_function", FUNCTIONAL_OF_FUNCTION[node.target], {}
        if node.target in INPLACE_FLAG_FUNCTIONS and node.kwargs.get("inplace") is True:
            return "call_function", node.target, {**node.kwargs, "inplace": False}
    return None


def _same_meta(a, b) -> bool:
    va, vb = example_value(a), example_value(b)
    return isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor) and va.dtype == vb.dtype \
        and va.device == vb.device and va.dim() == vb.dim() and all(same(x, y) for x, y in zip(va.shape, vb.shape))


def _views_before(t: fx.Node, n: fx.Node, order: dict) -> bool:
    return any(a is not t and order.get(a, -1) < order[n] for a in aliases(t))


def functionalize(gm: fx.GraphModule) -> int:
    """Rewrite the in-place elementwise ops on fresh tensors of ``gm``'s graph (see the module
    docstring); returns how many. Never raises: an op that cannot be proved is left as it is."""
    graph = gm.graph
    done = 0
    order = {node: float(i) for i, node in enumerate(graph.nodes)}  # kept current below
    for n in list(graph.nodes):
        try:
            form = _functional(n)
            if form is None or not n.args or not _allocating(n.args[0]):
                continue
            t = n.args[0]
            if _views_before(t, n, order):
                continue
            op, target, kwargs = form
            with graph.inserting_before(n):
                f = emit(graph, op, target, n.args, kwargs, like=n)
            if not _same_meta(f, t):
                graph.erase_node(f)
                continue
            order[f] = order[n] - 0.5
            later = [u for u in t.users if u is not n and u is not f and order.get(u, -1) > order[n]]
            for u in later:
                u.replace_input_with(t, f)
            n.replace_all_uses_with(f)
            graph.erase_node(n)
            done += 1
        except Exception:  # never fail a compile over the normal form
            continue
    if done:
        invalidate_order(graph)
        graph.lint()
        gm.recompile()
    return done
