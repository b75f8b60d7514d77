"""Matching: the additions to Inductor's pattern matcher the recognisers spell their patterns with
(``AnyOf``, ``F``, ``M``, ``getitem``), small matched forms (``t == e``, a column of
``ids[..., None] == arange(E)``), and searches (``match_or_decline``, ``nearest_upstream``,
``size_asserts_of``)."""
from __future__ import annotations

import operator
from typing import Any, Callable, Optional

import torch
import torch.fx as fx
from torch._inductor.pattern_matcher import (
    MULTIPLE,
    CallFunction,
    CallMethod,
    FailedMatch,
    Match,
    MatchContext,
    PatternExpr,
    is_match,
)

from .decline import Declined
from .shapes import example_value, int_value, same, same_dim, shape_of


class AnyOf(PatternExpr):
    """Matches if any alternative matches (first wins). The alternatives' captures join the
    enclosing match, so a KeywordArg used elsewhere in the pattern must bind the same node."""

    def __init__(self, *alternatives: PatternExpr) -> None:
        super().__init__()
        self.alternatives = alternatives

    def __repr__(self) -> str:
        return f"AnyOf({', '.join(map(repr, self.alternatives))})"

    def _match(self, node, ctx: MatchContext):
        failures = []
        for alt in self.alternatives:
            m = alt.match(node) if isinstance(node, fx.Node) else alt._match(node, ctx)
            if is_match(m):
                res = Match(ctx, self, kwargs=dict(m.kwargs))
                res.nodes.extend(m.nodes)
                return res
            failures.append(str(m))
        return FailedMatch("no alternative matched: {}", "; ".join(failures))


def F(fn, *args, **kwargs) -> CallFunction:
    """CallFunction that tolerates other users of the matched node: the rewrite adds a new
    node and leaves dead code elimination to drop what nothing uses any more, so a shared
    intermediate is never a correctness problem."""
    return CallFunction(fn, *args, _users=MULTIPLE, **kwargs)


class MethodCall(CallMethod):
    """CallMethod that fails to match, instead of raising, a call spelled with fewer keyword
    arguments than the pattern: Inductor's matcher would normalise such a call through the
    target's signature, which a method name does not have (AssertionError). Without this, one
    ``h.sum()`` anywhere in a graph broke every idiom whose pattern has ``M("sum", ..., dim=1)``."""

    def _match(self, node, ctx: MatchContext):
        if len(node.kwargs) < len(self.kwargs):
            return FailedMatch("{} has fewer keyword arguments than {}", node, self)
        return super()._match(node, ctx)


def M(method: str, *args, **kwargs) -> CallMethod:
    return MethodCall(method, *args, _users=MULTIPLE, **kwargs)


def getitem(obj, index) -> CallFunction:
    return F(operator.getitem, obj, index)


# --------------------------------------------------------------------------- matched forms

def is_eq(node: Any) -> bool:
    return isinstance(node, fx.Node) and not node.kwargs and len(node.args) == 2 and (
        (node.op == "call_function" and node.target in (operator.eq, torch.eq))
        or (node.op == "call_method" and node.target in ("eq", "__eq__")))


def eq_constant(node: Any) -> Optional[tuple]:
    """(tensor node, int) if ``node`` is ``tensor == constant``, else None. Dynamo spells it
    differently by version: ``operator.eq(t, e)`` (2.13, which also puts the tensor first for
    ``e == t``), ``t.__eq__(e)`` as a method call and ``operator.eq(e, t)`` as written (2.11),
    ``torch.eq(t, e)`` and ``t.eq(e)`` as the user wrote them (both). Column ``e`` of a mask
    ``ids[..., None] == arange(E)`` is ``ids == e`` too (``arange_column``)."""
    if not is_eq(node):
        return arange_column(node)
    for t, v in (node.args, node.args[::-1]):
        if isinstance(t, fx.Node) and isinstance(example_value(t), torch.Tensor) and int_value(v) is not None:
            return t, int_value(v)
    return None


def _arange_E(node: Any) -> Optional[int]:
    """E if ``node`` is ``torch.arange(E)`` or ``torch.arange(0, E)`` (step 1)."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target is torch.arange):
        return None
    if set(node.kwargs) - {"device", "dtype"}:
        return None
    ends = [int_value(a) for a in node.args]
    if len(ends) == 1:
        return ends[0]
    if len(ends) == 2 and ends[0] == 0:
        return ends[1]
    return None


def _arange_length(node: Any):
    """S (an int or a symbolic size) if ``node`` is ``torch.arange(S)`` / ``arange(0, S)`` of integers."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target is torch.arange) \
            or set(node.kwargs) - {"device", "dtype"} or node.kwargs.get("dtype") not in (None, torch.int64, torch.int32):
        return None
    if not (len(node.args) == 1 or (len(node.args) == 2 and int_value(node.args[0]) == 0)):
        return None
    s = shape_of(node)
    return s[0] if s is not None and len(s) == 1 else None


def _row_of(node: Any) -> Optional[fx.Node]:
    """a if ``node`` is a (1, S) row of a 1-D a: ``a.view(1, -1)`` / ``reshape``, ``a.unsqueeze(0)``,
    ``a[None]`` / ``a[None, :]``."""
    if not isinstance(node, fx.Node) or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    a, s = node.args[0], shape_of(node)
    if s is None or len(s) != 2 or int_value(s[0]) != 1 or len(shape_of(a) or ()) != 1:
        return None
    if node.op == "call_method" and node.target in ("view", "reshape", "unsqueeze") and not node.kwargs:
        return a if node.target != "unsqueeze" or node.args[1:] == (0,) else None
    if node.op == "call_function" and node.target is operator.getitem and node.args[1] in (None, (None,),
                                                                                          (None, slice(None))):
        return a
    return None


def arange_tiles(node: Any) -> Optional[tuple]:
    """(E, S, nodes) if ``node`` is an (E, S) table whose every row is ``arange(S)``: a (1, S) row of
    ``torch.arange(S)`` (``_row_of``) expanded (``expand(E, -1)`` / ``expand(E, S)``) or repeated
    (``repeat(E, 1)``) to E rows; ``nodes`` the chain from the table to the arange (the caller proves
    nothing writes them)."""
    if not (isinstance(node, fx.Node) and node.op == "call_method" and node.target in ("expand", "repeat")):
        return None
    s, row = shape_of(node), _row_of(node.args[0])
    S = _arange_length(row) if row is not None else None
    if s is None or len(s) != 2 or S is None or not same(s[1], S):
        return None
    if node.target == "repeat" and (len(node.args) != 3 or int_value(node.args[2]) != 1):
        return None
    E = int_value(s[0])
    return (E, S, [node, node.args[0], row]) if E is not None else None


def tiled_arange_index(node: Any) -> Optional[tuple]:
    """(E, S, nodes) if ``node`` is an (E*S, d) integer index whose row e*S + s holds s in every column:
    an ``arange_tiles`` (E, S) table flattened to a column (``reshape(-1, 1)`` / ``view``, row-major:
    element e*S + s is table[e, s]) and expanded along the columns (``expand(-1, d)`` / ``expand(R, d)``).
    ``gather(x, 0, it)`` is then ``x.repeat(E, 1)`` and ``acc.scatter_add_(0, it, v)`` adds row e*S + s
    of v to row s (Llama4 4.51's ``router_indices``)."""
    if not (isinstance(node, fx.Node) and node.op == "call_method" and node.target == "expand"):
        return None
    col = node.args[0]
    s, cs = shape_of(node), shape_of(col)
    if not (isinstance(col, fx.Node) and col.op == "call_method" and col.target in ("view", "reshape")) \
            or s is None or cs is None or len(s) != 2 or len(cs) != 2 or int_value(cs[1]) != 1 or not same(s[0], cs[0]):
        return None
    tiles = arange_tiles(col.args[0])
    if tiles is None or not same(cs[0], tiles[0] * tiles[1]):
        return None
    return tiles[0], tiles[1], [node, col] + tiles[2]


def last_axis_added(node: Any) -> Optional[fx.Node]:
    """t if ``node`` is ``t.unsqueeze(-1)`` / ``t[..., None]`` / ``t[:, :, None]`` (a new last axis)."""
    if not isinstance(node, fx.Node):
        return None
    t = node.args[0] if node.args else None
    ts = shape_of(t) if isinstance(t, fx.Node) else None
    if ts is None:
        return None
    if node.op == "call_method" and node.target == "unsqueeze" and len(node.args) == 2 and not node.kwargs:
        return t if node.args[1] in (-1, len(ts)) else None
    if node.op == "call_function" and node.target is torch.unsqueeze and len(node.args) == 2 and not node.kwargs:
        return t if node.args[1] in (-1, len(ts)) else None
    if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[1], tuple):
        idx = node.args[1]
        if idx and idx[-1] is None and (idx[:-1] == (Ellipsis,) or
                                        (len(idx) == len(ts) + 1 and all(i == slice(None) for i in idx[:-1]))):
            return t
    return None


def arange_column(node: Any) -> Optional[tuple]:
    """(ids, e) if ``node`` is column ``e`` along the expert axis of ``M = ids[..., None] == arange(E)``
    (either side of the ``==``), read as ``M[..., e]``, ``M[:, :, e]``, ``M.select(-1, e)`` or
    ``M.permute(last, *rest)[e]`` (the expert axis first, the others in order): elementwise
    ``ids == e``, the same shape and layout as ``ids``."""
    if not isinstance(node, fx.Node) or node.kwargs:
        return None
    m, e = None, None
    if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node):
        src, idx = node.args
        ms = shape_of(src)
        if isinstance(idx, tuple) and idx and int_value(idx[-1]) is not None and ms is not None and (
                idx[:-1] == (Ellipsis,) or (len(idx) == len(ms) and all(i == slice(None) for i in idx[:-1]))):
            m, e = src, int_value(idx[-1])
        elif int_value(idx) is not None and src.op == "call_method" and src.target == "permute" and ms is not None:
            perm = [int_value(p) for p in (src.args[1:] if len(src.args) > 2 else src.args[1])]
            n = len(ms)
            if perm == [n - 1] + list(range(n - 1)):
                m, e = src.args[0], int_value(idx)
    elif node.op == "call_method" and node.target == "select" and len(node.args) == 3:
        src = node.args[0]
        ms = shape_of(src) if isinstance(src, fx.Node) else None
        if ms is not None and node.args[1] in (-1, len(ms) - 1):
            m, e = src, int_value(node.args[2])
    found = arange_onehot(m) if m is not None and e is not None else None
    if found is None or not 0 <= e < found[1]:
        return None
    return found[0], e


def arange_onehot(node: Any) -> Optional[tuple]:
    """(ids, E) if ``node`` is ``ids[..., None] == arange(E)`` (either side of the ``==``): the
    boolean ``one_hot(ids, E)``, at most one True along its last axis."""
    if not is_eq(node):
        return None
    for a, b in (node.args, node.args[::-1]):
        ids, E = last_axis_added(a), _arange_E(b)
        if ids is not None and E is not None:
            return ids, E
    return None


def transpose_of(w) -> Optional[fx.Node]:
    """W if ``w`` is ``W.t()``, ``W.T``, ``W.transpose(0, 1)`` / ``(-1, -2)`` of a 2-D W."""
    if not isinstance(w, fx.Node):
        return None
    if w.op == "call_method" and w.target == "t" and len(w.args) == 1:
        return w.args[0]
    if w.op == "call_function" and w.target is torch.t and len(w.args) == 1:
        return w.args[0]
    if w.op == "call_method" and w.target == "transpose" and len(w.args) == 3 and \
            set(w.args[1:]) in ({0, 1}, {-1, -2}, {-2, -1}):
        return w.args[0]
    if w.op == "call_function" and w.target is getattr and w.args[1] in ("T", "mT"):
        return w.args[0]
    return None


# --------------------------------------------------------------------------- searches

def match_or_decline(pattern: PatternExpr, node: Any, what: str, detail: bool = False) -> dict:
    """Match ``pattern`` at ``node`` and return the captured KeywordArgs, or decline with
    "<what> not recognised" (with the matcher's own failure text when ``detail``)."""
    m = pattern.match(node) if isinstance(node, fx.Node) else None
    if m is None or not is_match(m):
        raise Declined(f"{what} not recognised" + (f" ({m})" if detail and m is not None else ""))
    return m.kwargs


def size_asserts_of(roots, through) -> list:
    """Dynamo's runtime asserts (``aten._assert_scalar``) on sizes derived from ``roots`` via
    users whose target is in ``through`` or ``aten.sym_size``: they die with the block that
    produced those sizes, so an idiom lists them among its orphans."""
    found, stack = [], list(roots)
    while stack:
        n = stack.pop()
        for u in n.users:
            if u.op == "call_function" and u.target is torch.ops.aten._assert_scalar.default:
                found.append(u)
            elif u.op == "call_function" and (u.target in through or u.target is torch.ops.aten.sym_size.int):
                stack.append(u)
    return found

def nearest_upstream(start: Any, pattern: PatternExpr, accept: Callable[[dict], bool]):
    """Walk from ``start`` through the inputs of call nodes (depth first) to the first node where
    ``pattern`` matches with captures that ``accept`` approves; returns (node, captures) or
    (None, None). For finding, e.g., the token gather that feeds an expert's MLP."""
    stack, seen = [start], set()
    while stack:
        n = stack.pop()
        if n in seen or not isinstance(n, fx.Node):
            continue
        seen.add(n)
        m = pattern.match(n)
        if is_match(m) and accept(m.kwargs):
            return n, m.kwargs
        if n.op in ("call_function", "call_method"):
            stack.extend(n.all_input_nodes)
    return None, None


_EINSUM_FUNCTIONS = (torch.einsum, torch.functional.einsum)


def einsum_parts(node: Any) -> Optional[tuple]:
    """(input letter strings, output letters, operands) of an ``einsum`` call with an explicit
    ``->`` equation and node operands (given as varargs or as one list); else None. An ellipsis is
    read as the letters it stands for (``_expand_ellipsis``), so ``"...nd,...dh->...nh"`` on 3-D
    operands reads as ``"And,Adh->Anh"``; where that is not provably the same einsum, None."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target in _EINSUM_FUNCTIONS
            and node.args):
        return None
    eq, ops = node.args[0], node.args[1:]
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = tuple(ops[0])
    if not isinstance(eq, str) or "->" not in eq or node.kwargs:
        return None
    lhs, out = eq.replace(" ", "").split("->")
    ins = lhs.split(",")
    if len(ins) != len(ops) or not all(isinstance(o, fx.Node) for o in ops):
        return None
    if "." in eq:
        expanded = _expand_ellipsis(ins, out, ops)
        if expanded is None:
            return None
        ins, out = expanded
    return ins, out, ops


def _expand_ellipsis(ins: list, out: str, ops: tuple) -> Optional[tuple]:
    """The equation with each ``...`` replaced by fresh letters, one per dimension it covers, when
    that is the same einsum: every operand and the output hold one ``...``, each covering the same
    number k of leading-or-inner dimensions, of provably equal sizes across the operands (no size-1
    broadcast, which letters would not express), and no other dots. Then dimension i of every
    ellipsis is the same index, kept in the output, which is what a letter says."""
    terms = ins + [out]
    if any(t.count("...") != 1 or t.replace("...", "").count(".") for t in terms):
        return None
    ranks = [len(shape_of(o) or ()) if shape_of(o) is not None else None for o in ops]
    if None in ranks:
        return None
    covers = {r - (len(t) - 3) for r, t in zip(ranks, ins)}
    if len(covers) != 1 or min(covers) < 0:
        return None
    k = covers.pop()
    fresh = [c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz" if c not in "".join(terms)][:k]
    if len(fresh) < k:
        return None
    for i in range(k):
        pos = [ins[j].index("...") + i for j in range(len(ops))]
        if not all(same_dim(ops[0], pos[0], o, p) for o, p in zip(ops[1:], pos[1:])):
            return None
    letters = "".join(fresh)
    return [t.replace("...", letters) for t in ins], out.replace("...", letters)
