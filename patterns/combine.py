"""Combine part (per expert): how an expert's (weighted) output reaches its rows of the result.

Recognisers (``moe_inductor.recognize.parts.register``), each mapping a write to a canonical ``Write``:
  ``index_add_``       ``acc.index_add_(0, idx, v)`` (transformers 4.x loops, most research code)
  ``indexed_iadd``     ``acc[idx] += v`` / ``acc[idx] = acc[idx] + v``: Dynamo records getitem, add,
                       setitem (mistral-inference ``moe.py``, DeepSeek-V3 ``inference/model.py``)
                       (also ``acc[idx, :]``: trailing full slices select every column, ``dispatch.rows_index``)
  ``index_put_``       ``acc.index_put_((idx,), v, accumulate=True)`` (accumulate=False: an assignment)
  ``scatter_add_``     ``acc.scatter_add_(0, idx[:, None].expand(-1, d), v)`` (and ``.unsqueeze(-1).expand_as(v)``)
  ``setitem``          ``acc[idx] = v`` / ``acc[mask] = v`` / ``acc[idx, :] = v`` (an assignment:
                       DeepSeek-MoE/V2/V3 training branch, Switch Transformers 4.x, labml's Switch)
"""
from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.fx as fx

from moe_inductor.fx import safety
from moe_inductor.fx.nodes import arg, node_order
from moe_inductor.fx.shapes import dtype_of, int_value, same, shape_of
from moe_inductor.recognize.parts import Write, register

from .dispatch import rows_index


@register("combine", "index_add_", "acc.index_add_(0, idx, v)")
def index_add(node) -> Optional[Write]:
    if not (node.op == "call_method" and node.target == "index_add_"):
        return None
    acc, dim, idx, v = node.args[0], arg(node, 1, "dim"), arg(node, 2, "index"), arg(node, 3, "source")
    if dim != 0 or not isinstance(idx, fx.Node) or not isinstance(v, fx.Node) or "alpha" in node.kwargs:
        return None
    return Write(kind="add", acc=acc, index=idx, value=v, anchor=node, nodes=[node], duplicates_add=True)


def _read_of(node, acc, idx) -> bool:
    return (isinstance(node, fx.Node) and node.op == "call_function" and node.target is operator.getitem
            and node.args[0] is acc and safety.equivalent(rows_index(node.args[1]), idx))


@register("combine", "indexed_iadd", "acc[idx] += v; acc[idx] = acc[idx] + v")
def indexed_iadd(node) -> Optional[Write]:
    if not (node.op == "call_function" and node.target is operator.setitem and len(node.args) == 3):
        return None
    acc, idx, new = node.args[0], rows_index(node.args[1]), node.args[2]
    if idx is None or not isinstance(new, fx.Node) or not (new.op == "call_function" and new.target in (
            operator.iadd, operator.add, torch.add) and len(new.args) == 2 and not new.kwargs):
        return None
    a, b = new.args
    for read, v in ((a, b), (b, a) if new.target is not operator.iadd else ()):
        if _read_of(read, acc, idx) and isinstance(v, fx.Node):
            return Write(kind="add", acc=acc, index=idx, value=v, anchor=node, nodes=[node, new, read],
                         duplicates_add=False)
    return None


@register("combine", "index_put_", "acc.index_put_((idx,), v, accumulate=True)")
def index_put(node) -> Optional[Write]:
    if not ((node.op == "call_method" and node.target == "index_put_")
            or (node.op == "call_function" and node.target is torch.index_put_)):
        return None
    acc, indices, v = node.args[0], arg(node, 1, "indices"), arg(node, 2, "values")
    acc_flag = arg(node, 3, "accumulate", False)
    if not isinstance(indices, (tuple, list)) or len(indices) != 1 or not isinstance(v, fx.Node):
        return None
    return Write(kind="add" if acc_flag else "assign", acc=acc, index=indices[0], value=v, anchor=node,
                 nodes=[node], duplicates_add=bool(acc_flag))


def expanded_rows(node) -> Optional[fx.Node]:
    """idx if ``node`` is idx (R,) broadcast to (R, d): ``idx[:, None].expand(-1, d)``,
    ``idx.unsqueeze(-1).expand_as(v)``, ``idx.view(-1, 1).expand(R, d)``, ``.repeat(1, d)``."""
    if not (isinstance(node, fx.Node) and node.op == "call_method" and node.target in ("expand", "expand_as",
                                                                                       "repeat")):
        return None
    inner = node.args[0]
    if not isinstance(inner, fx.Node):
        return None
    if inner.op == "call_method" and inner.target == "unsqueeze" and inner.args[1] in (-1, 1):
        return inner.args[0]
    if inner.op == "call_function" and inner.target is operator.getitem and \
            inner.args[1] in ((slice(None), None), (Ellipsis, None)):
        return inner.args[0]
    if inner.op == "call_method" and inner.target in ("view", "reshape") and tuple(inner.args[1:]) == (-1, 1):
        return inner.args[0]
    return None


@register("combine", "scatter_add_", "acc.scatter_add_(0, idx[:, None].expand(-1, d), v)")
def scatter_add(node) -> Optional[Write]:
    if not (node.op == "call_method" and node.target == "scatter_add_"):
        return None
    acc, dim, index, v = node.args[0], arg(node, 1, "dim"), arg(node, 2, "index"), arg(node, 3, "src")
    idx = expanded_rows(index)
    if dim != 0 or idx is None or not isinstance(v, fx.Node) or len(shape_of(idx) or ()) != 1:
        return None
    if not safety.same_shape(index, v):
        return None
    return Write(kind="add", acc=acc, index=idx, value=v, anchor=node, nodes=[node], duplicates_add=True)


@register("combine", "setitem", "acc[idx] = v; acc[mask] = v; acc[idx, :] = v")
def setitem(node) -> Optional[Write]:
    if not (node.op == "call_function" and node.target is operator.setitem and len(node.args) == 3):
        return None
    acc, idx, v = node.args[0], rows_index(node.args[1]), node.args[2]
    if idx is None or not isinstance(v, fx.Node):
        return None
    return Write(kind="assign", acc=acc, index=idx, value=v, anchor=node, nodes=[node], duplicates_add=False)


def bias_after_assign(node) -> Optional[tuple]:
    """(b, read, added, end) when the assignment ``node``, ``acc[m] = v`` with m a boolean mask, is
    followed by ``acc[m] = acc[m] + b`` (or ``acc[m] += b``) with the very same mask node: vLLM's
    ``torch_experts``, ``out[mask] = tmp2 @ w2[i].T`` then ``out[mask] = out[mask] + b2[i].view(1, -1)``
    (``read = acc[m]``, ``added = read + b``, ``end`` the second assignment). A boolean mask selects
    each row once, so reading ``acc[m]`` back gives the assigned rows ``v`` in order, and the pair
    writes ``v + b`` into ``acc[m]``, exactly, when: the second assignment is the next write into acc
    (or an alias) after the first, the mask is not written between them, the read and the sum have
    no other reader, and v, acc, the read and the sum have one dtype (the assignment does not round
    v). ``b`` is returned as the graph adds it: the caller proves it is a bias (``experts.row_bias``)."""
    first = setitem(node)
    if first is None or not isinstance(first.index, fx.Node) or dtype_of(first.index) != torch.bool:
        return None
    acc = first.acc
    if not isinstance(acc, fx.Node):
        return None
    later = [w for w in safety.writes_to(acc) if node_order(acc.graph)[w] > node_order(acc.graph)[node]]
    second = indexed_iadd(later[0]) if later else None
    if second is None or second.acc is not acc or second.index is not first.index:
        return None
    end, added, read = second.nodes
    if safety.mutated_between(first.index, node, end) is not None or set(read.users) != {added} \
            or set(added.users) != {end} or node_order(acc.graph)[read] < node_order(acc.graph)[node]:
        return None
    if not dtype_of(first.value) == dtype_of(acc) == dtype_of(read) == dtype_of(added):
        return None
    return second.value, read, added, end


_MUL = (operator.mul, torch.mul)


def token_scale(acc: fx.Node, writes, x: fx.Node) -> Optional[tuple]:
    """(m, s) when the combined result is scaled per token after the loop: the one reader of the
    (R, d) accumulator ``acc`` (views included) outside its ``writes`` is ``m = acc * s`` (or
    ``s * acc``, ``acc.mul(s)``) with s an (R, 1) tensor of the dtype of acc and of the tokens ``x``
    (the fused op multiplies in that dtype, as the graph does), e.g. labml's
    ``final_output * route_prob_max.view(-1, 1)`` or ``* (p / p.detach()).view(-1, 1)``. Since
    ``(sum_a w_a f(x_t)) * s_t = sum_a (w_a s_t) f(x_t)``, a composition may fold s into the
    scores of token t's assignments, exactly when every token has at least one assignment (a
    token with none is ``0 * s_t`` in the graph: not 0 for a non-finite s_t). None otherwise."""
    accs = shape_of(acc)
    if accs is None or len(accs) != 2:
        return None
    readers = {u for a in safety.aliases(acc) for u in a.users if u not in writes}
    if len(readers) != 1:
        return None
    m = readers.pop()
    is_mul = (m.op == "call_function" and m.target in _MUL) or (m.op == "call_method" and m.target == "mul")
    if not is_mul or len(m.args) != 2 or m.kwargs or acc not in m.args:
        return None
    s = m.args[1] if m.args[0] is acc else m.args[0]
    ss = shape_of(s) if isinstance(s, fx.Node) else None
    if ss is None or len(ss) != 2 or not safety.same_shape(acc, m) or int_value(ss[1]) != 1 \
            or not same(ss[0], accs[0]) or not (dtype_of(s) == dtype_of(acc) == dtype_of(m) == dtype_of(x)):
        return None
    return m, s
