"""Dispatch part (per expert): which rows expert e takes, and the score each selected row reads.

Recognisers registered here (``moe_inductor.recognize.parts.register``), each returning a canonical
``Selection`` / ``Score`` / gather, or None when the node is not its spelling:

dispatch (what ``x`` and the output are indexed with for expert e)
  ``where_pairs``     ``tok, k = torch.where(ids == e)`` (or ``nonzero(as_tuple=True)``) over a (T, K)
                      top-k table; ``torch.where(one_hot(ids, E).permute(2, ..)[e])``; a (T, K, E)
                      binary mask with at most one nonzero per row (transformers 4.x loops, Switch
                      5.x, mistral-inference ``moe.py``, DeepSeek-V3 ``inference/model.py``)
  ``bool_rows``       a boolean mask over rows: ``v == e`` (tokens of a top-1 router, or replicated
                      assignment rows ``flat_ids == e`` after ``repeat_interleave(K)``: DeepSeek-MoE/V2/V3
                      remote code, training branch), ``(ids == e).any(-1)``, a column of a one-hot
                      mask (research code, makeMoE)
  ``index_of_rows``   an index computed from such a mask: ``torch.where(m)[0]``, ``m.nonzero().squeeze(-1)``,
                      ``m.nonzero(as_tuple=True)[0]``, ``torch.nonzero(m).flatten()`` (vLLM's torch reference)
scores (how a selected row reads its routing weight)
  ``pair_score``      ``w[tok, k, None]``, ``w[tok, k].unsqueeze(-1)``, ``w[tok, k][:, None]``
  ``row_score``       ``s[m, None]``, ``s[m].unsqueeze(-1)``, ``s[m]`` for s (R, 1), with the selection's mask or index
gather (the expert's input)
  ``x[index]``, ``x[index, :]``, ``x[None, index].reshape(-1, d)``, ``index_select(x, 0, index)``
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Optional

import torch
import torch.fx as fx
import torch.nn.functional as Fn
from torch._inductor.pattern_matcher import KeywordArg as KA, is_match

from moe_inductor.fx import safety
from moe_inductor.fx.decline import need
from moe_inductor.fx.matching import AnyOf, arange_onehot, einsum_parts, eq_constant, F, getitem, M
from moe_inductor.fx.shapes import dtype_of, int_value, known_nonnegative, same, shape_of, to_sympy
from moe_inductor.recognize.parts import Score, Selection, decline, register

_ALL = slice(None, None, None)


# --------------------------------------------------------------------------- routing tables

def _one_hot():
    return AnyOf(F(torch._C._nn.one_hot, KA("index"), num_classes=KA("E")),
                 F(Fn.one_hot, KA("index"), num_classes=KA("E")),
                 F(torch._C._nn.one_hot, KA("index"), KA("E")), F(Fn.one_hot, KA("index"), KA("E")))


def rows_index(index):
    """The row index of ``t[index]`` when ``index`` is one tensor or one tensor followed only by full
    slices / an Ellipsis (``t[idx, :]``, ``t[mask, ...]``: the trailing entries select every
    element, so the result is ``t[idx]``'s); None otherwise."""
    if isinstance(index, fx.Node):
        return index
    if not (isinstance(index, tuple) and len(index) >= 2 and isinstance(index[0], fx.Node)):
        return None
    rest = index[1:]
    if sum(p is Ellipsis for p in rest) > 1 or not all(p is Ellipsis or p == _ALL for p in rest):
        return None
    return index[0]


def _top1_indices(n) -> Optional[fx.Node]:
    """The (.., E) tensor whose last dim ``n`` takes the position of the maximum along:
    ``torch.max(t, dim=-1)[1]`` / ``t.max(-1)[1]`` (``.indices`` records the same getitem) or
    ``torch.argmax(t, dim=-1)`` / ``t.argmax(-1)`` (keepdim or not). None otherwise. Each index is a
    position in [0, E): a top-1 table (K = 1)."""
    if not isinstance(n, fx.Node) or n.op not in ("call_function", "call_method"):
        return None
    if n.op == "call_function" and n.target is operator.getitem and n.args[1] == 1:
        mx, pos = n.args[0], 1
        is_max = isinstance(mx, fx.Node) and ((mx.op == "call_function" and mx.target is torch.max)
                                             or (mx.op == "call_method" and mx.target == "max"))
        if not is_max:
            return None
    elif (n.op == "call_function" and n.target is torch.argmax) or (n.op == "call_method" and n.target == "argmax"):
        mx, pos = n, None
    else:
        return None
    if set(mx.kwargs) - {"dim", "keepdim"} or len(mx.args) > 3 or not isinstance(mx.args[0], fx.Node):
        return None
    dim = mx.kwargs.get("dim", mx.args[1] if len(mx.args) > 1 else None)
    src = shape_of(mx.args[0])
    # torch.max(a, b) (elementwise) or torch.max(t) / argmax(t) (over every element): not per row
    if isinstance(dim, bool) or not isinstance(dim, int) or src is None or dim not in (-1, len(src) - 1):
        return None
    return mx.args[0]


def topk_columns(node) -> Optional[int]:
    """E when ``node`` (through casts, reshapes and flattening) holds indices of ``torch.topk``
    over the last dim of a (.., E) tensor: its values are then provably in [0, E) and distinct
    along the top-k dim. Top-1 indices ``torch.max(t, dim=-1)[1]`` and ``torch.argmax(t, -1)`` are
    a K = 1 table (one index per row: distinct trivially). None otherwise."""
    n = safety.strip_casts(node)
    while isinstance(n, fx.Node) and n.op == "call_method" and n.target in ("view", "reshape", "flatten", "long",
                                                                              "int", "contiguous"):
        n = safety.strip_casts(n.args[0])
    top1 = _top1_indices(n)
    if top1 is not None:
        return int_value(shape_of(top1)[-1])
    if not (isinstance(n, fx.Node) and n.op == "call_function" and n.target is operator.getitem and n.args[1] == 1):
        return None
    tk = n.args[0]
    if not (isinstance(tk, fx.Node) and ((tk.op == "call_function" and tk.target is torch.topk)
                                         or (tk.op == "call_method" and tk.target == "topk"))):
        return None
    src = shape_of(tk.args[0])
    dim = tk.kwargs.get("dim", tk.args[2] if len(tk.args) > 2 else -1)
    if src is None or dim not in (-1, len(src) - 1) or tk.kwargs.get("largest", True) is not True:
        return None
    return int_value(src[-1])


def at_most_one_per_row(node: fx.Node) -> Optional[int]:
    """E if ``node``'s rows (last dim) provably hold at most one nonzero: ``one_hot(i, E)``,
    optionally times an integer/bool tensor of its own shape, optionally reshaped keeping the last
    dim. None otherwise."""
    src = node
    if node.op == "call_method" and node.target in ("view", "reshape") and isinstance(node.args[0], fx.Node):
        ns, ss = shape_of(node), shape_of(node.args[0])
        if ns is None or ss is None or not same(ns[-1], ss[-1]):
            return None
        src = node.args[0]
    oh = _one_hot().match(src)
    if is_match(oh):
        return int_value(oh.kwargs["E"])
    if arange_onehot(src) is not None:  # ids[..., None] == arange(E): one_hot(ids, E) as booleans
        return arange_onehot(src)[1]
    if src.op == "call_function" and src.target is operator.mul and len(src.args) == 2:
        out = shape_of(src)
        for a in src.args:
            m = _one_hot().match(a) if isinstance(a, fx.Node) else None
            if m is not None and is_match(m) and safety.same_shape(a, src) and out is not None:
                dt = dtype_of(src)
                # a float factor could turn 0 into nan (0 * inf): a nonzero torch.where would select
                if dt is not None and not dt.is_floating_point and not dt.is_complex:
                    return int_value(m.kwargs["E"])
        # (one_hot * m1) * m2 (NLLB-MoE: the padding column, then the capacity mask): an integer
        # product of something already at most one per row, of the product's shape
        found = _integer_factor_of(src)
        if found is not None:
            return found
    return None


def _integer(node) -> bool:
    dt = dtype_of(node)
    return dt is not None and not dt.is_floating_point and not dt.is_complex


def _integer_factor_of(src: fx.Node) -> Optional[int]:
    """E if ``src = a * b`` is integer/bool and one factor has ``src``'s shape and at most one
    nonzero per row (integer arithmetic: 0 * b == 0 for every b)."""
    if not _integer(src):
        return None
    for a in src.args:
        if isinstance(a, fx.Node) and safety.same_shape(a, src) and a.op == "call_function" \
                and a.target is operator.mul:
            E = at_most_one_per_row(a)
            if E is not None:
                return E
    return None


_ADD = (operator.add, torch.add)
_MUL = (operator.mul, torch.mul)


def _binary(node, targets, method_name) -> Optional[tuple]:
    if not isinstance(node, fx.Node) or node.kwargs or len(node.args) != 2:
        return None
    if (node.op == "call_function" and node.target in targets) or (node.op == "call_method" and node.target == method_name):
        return node.args
    return None


def nonzero_pattern_of(node) -> Optional[fx.Node]:
    """S if ``node`` is S's nonzero pattern as booleans: ``S.bool()``, ``S.to(torch.bool)``,
    ``S != 0``, ``S.ne(0)``. None otherwise."""
    if not isinstance(node, fx.Node) or dtype_of(node) != torch.bool:
        return None
    cast = AnyOf(M("bool", KA("src")), M("to", KA("src"), torch.bool), M("to", KA("src"), dtype=torch.bool)).match(node)
    if is_match(cast):
        return cast.kwargs["src"]
    ne = _binary(node, (operator.ne, torch.ne), "ne")
    if ne is not None and isinstance(ne[0], fx.Node) and ne[1] == 0 and not isinstance(ne[1], bool):
        return ne[0]
    return None


def at_most_k_per_row(node) -> Optional[tuple]:
    """(E, k, finite) if ``node``'s rows (last dim, E columns) hold at most k nonzeros, provided
    every floating factor is finite when ``finite`` (0 * inf is nan, which is nonzero):

    - ``at_most_one_per_row``: k = 1 (integer: no proviso);
    - ``a * t`` / ``t * a`` with t at most k per row of the product's shape (a broadcasts, e.g. the
      per-row gate ``p[:, None] * one_hot(i, E)``): k, and ``finite`` when the product is floating;
    - ``t1 + t2`` of two such tensors of the sum's shape: k1 + k2 (the nonzeros of a sum lie in
      the union of the terms' nonzeros);
    - the nonzero pattern of such a tensor (``.bool()``, ``!= 0``): the same.
    Each tensor the proof reads must not be written in place anywhere (the proof reads its
    definition); None otherwise."""
    if not isinstance(node, fx.Node) or any(safety.writes_to(n) for n in [node] + node.all_input_nodes):
        return None
    src = nonzero_pattern_of(node)
    if src is not None:
        return at_most_k_per_row(src)
    E = at_most_one_per_row(node)
    if E is not None:
        return E, 1, False
    ns = shape_of(node)
    if ns is None or not ns or int_value(ns[-1]) is None:
        return None
    add = _binary(node, _ADD, "add")
    if add is not None:
        parts = [at_most_k_per_row(a) if safety.same_shape(a, node) else None for a in add]
        if any(p is None for p in parts) or parts[0][0] != parts[1][0]:
            return None
        return parts[0][0], parts[0][1] + parts[1][1], parts[0][2] or parts[1][2]
    mul = _binary(node, _MUL, "mul")
    if mul is not None:
        for t in mul:
            got = at_most_k_per_row(t) if isinstance(t, fx.Node) and safety.same_shape(t, node) else None
            if got is not None:
                return got[0], got[1], got[2] or not _integer(node)
    return None


# --------------------------------------------------------------------------- dispatch recognisers

def _where_outputs(index) -> Optional[tuple]:
    """(where node, output number) if ``index`` is an output of ``torch.where(mask)`` or
    ``mask.nonzero(as_tuple=True)``."""
    if not (isinstance(index, fx.Node) and index.op == "call_function" and index.target is operator.getitem
            and isinstance(index.args[1], int)):
        return None
    w = index.args[0]
    if w.op == "call_function" and w.target is torch.where and len(w.args) == 1 and not w.kwargs:
        return w, index.args[1]
    if ((w.op == "call_method" and w.target == "nonzero") or (w.op == "call_function" and w.target is torch.nonzero)) \
            and w.kwargs.get("as_tuple") is True and len(w.args) == 1:
        return w, index.args[1]
    return None


def _outputs_of(where: fx.Node) -> dict:
    return {u.args[1]: u for u in where.users if u.op == "call_function" and u.target is operator.getitem}


@register("dispatch", "where_pairs", "torch.where(ids == e) over a (T, K) top-k table; one_hot(...).permute(2, ..)[e]")
def where_pairs(index) -> Optional[Selection]:
    found = _where_outputs(index)
    if found is None:
        return None
    where, pos = found
    mask = safety.strip_identity(where.args[0])  # LongCat-Flash: expert_mask[e].squeeze(0) with K > 1
    ms = shape_of(mask)
    if ms is None or len(ms) != 2:
        return None  # a rank-1 mask: rows (index_of_rows)
    outs = _outputs_of(where)
    eq = eq_constant(mask)
    if eq is not None:
        ids, e = eq
        need(len(shape_of(ids) or ()) == 2, f"{mask.name}: expert ids are not a (T, K) table", part="dispatch")
        roles = {0: "token", 1: "k"}
        routing, kind, E = ids, "ids", topk_columns(ids)
        unique = E is not None  # top-k indices are distinct along K: a token appears once per expert
    else:
        sel = AnyOf(getitem(M("permute", KA("m"), KA("p0"), KA("p1"), KA("p2")), KA("e"))).match(mask)
        if not is_match(sel):
            return None
        perm = (sel.kwargs["p0"], sel.kwargs["p1"], sel.kwargs["p2"])
        need(sorted(perm) == [0, 1, 2] and perm[0] == 2,
             f"{mask.name}: expert mask is not a (T, K, E) mask permuted to (E, ., .)", part="dispatch")
        roles = {i: ("token" if perm[1 + i] == 0 else "k") for i in range(2)}
        e = int_value(sel.kwargs["e"])
        m = sel.kwargs["m"]
        oh = _one_hot().match(m)
        if is_match(oh) or arange_onehot(m) is not None:
            # one_hot(ids, E) or its boolean spelling ids[..., None] == arange(E)
            routing, E = (oh.kwargs["index"], int_value(oh.kwargs["E"])) if is_match(oh) else arange_onehot(m)
            kind, unique = "ids", topk_columns(routing) is not None
        else:
            E = at_most_one_per_row(m)
            need(E is not None, f"{m.name}: routing mask rows may hold several experts (not one_hot(ids) "
                                           "or one_hot(...) times a mask of its shape)", part="dispatch")
            routing, kind, unique = m, "onehot_mask", True
    need(e is not None and e >= 0, f"{mask.name}: expert number is not a constant", part="dispatch")
    token = index
    k = next((outs[i] for i, r in roles.items() if r == "k" and i in outs), None)
    need(roles.get(pos) == "token",
         f"{index.name}: rows are indexed with the k output of {where.name}, not its token output", part="dispatch")
    return Selection(expert=e, layout="pairs", index=token, routing=routing, routing_kind=kind, token=token, k=k,
                     unique=unique, num_classes=E, nodes=[where, mask])


def _bool_rows(mask) -> Optional[Selection]:
    if not isinstance(mask, fx.Node) or dtype_of(mask) != torch.bool:
        return None
    ms = shape_of(mask)
    if ms is None or not ms:
        return None
    if len(ms) > 1:  # a token mask over (B, S, ..): only (ids == e).any(-1), written through the mask
        anym = AnyOf(M("any", KA("m"), -1), M("any", KA("m"), dim=-1), F(torch.any, KA("m"), -1),
                     F(torch.any, KA("m"), dim=-1)).match(mask)
        if is_match(anym):
            eq = eq_constant(anym.kwargs["m"])
            if eq is not None and len(shape_of(eq[0]) or ()) == len(ms) + 1:
                return Selection(expert=eq[1], layout="rows", index=mask, mask=mask, unique=True, nodes=[mask])
        return None
    # m.view(-1) / reshape(-1) / flatten() of a (B, S) token mask (ids == e).any(-1): the same rows,
    # flattened as x.view(-1, d) is (makeMoE's capacity loop)
    flat = AnyOf(M("view", KA("m"), -1), M("reshape", KA("m"), -1), M("flatten", KA("m"))).match(mask)
    if is_match(flat) and isinstance(flat.kwargs["m"], fx.Node) and len(shape_of(flat.kwargs["m"]) or ()) > 1:
        sel = _bool_rows(flat.kwargs["m"])
        return dataclasses.replace(sel, index=mask, mask=mask, nodes=sel.nodes + [mask]) if sel is not None else None
    eq = eq_constant(mask)
    if eq is not None and len(shape_of(eq[0]) or ()) == 1:
        v, e = eq
        return Selection(expert=e, layout="rows", index=mask, mask=mask, unique=True, disjoint_key=v, value=v,
                         num_classes=topk_columns(v), nodes=[mask])
    # a column of a mask whose rows hold at most one nonzero: R[:, e] (optionally .bool() first)
    col = AnyOf(getitem(KA("rows"), (_ALL, KA("e"))), getitem(KA("rows"), (Ellipsis, KA("e")))).match(mask)
    if is_match(col):
        rows, e = col.kwargs["rows"], int_value(col.kwargs["e"])
        src = rows
        cast = AnyOf(M("bool", KA("src")), M("to", KA("src"), torch.bool)).match(rows)
        if is_match(cast):
            src = cast.kwargs["src"]
        E = at_most_one_per_row(src) if isinstance(src, fx.Node) else None
        need(e is not None, f"{mask.name}: mask column is not a constant expert number", part="dispatch")
        return Selection(expert=e, layout="rows", index=mask, mask=mask, unique=True,
                         disjoint_key=rows if E is not None else None, num_classes=E, nodes=[mask])
    # (ids == e).any(-1): the tokens that chose e among their K
    anym = AnyOf(M("any", KA("m"), -1), M("any", KA("m"), dim=-1), M("any", KA("m"), 1),
                 M("any", KA("m"), dim=1), F(torch.any, KA("m"), -1), F(torch.any, KA("m"), dim=-1)).match(mask)
    if is_match(anym):
        eq = eq_constant(anym.kwargs["m"])
        if eq is not None and len(shape_of(eq[0]) or ()) == 2:
            return Selection(expert=eq[1], layout="rows", index=mask, mask=mask, unique=True, nodes=[mask])
    return None


@register("dispatch", "bool_rows", "x[v == e], x[(ids == e).any(-1)], x[one_hot_mask[:, e]]")
def bool_rows(index) -> Optional[Selection]:
    return _bool_rows(index)


@register("dispatch", "index_of_rows", "torch.where(m)[0], m.nonzero().squeeze(-1), torch.nonzero(m).flatten()")
def index_of_rows(index) -> Optional[Selection]:
    if not isinstance(index, fx.Node):
        return None
    mask = None
    found = _where_outputs(index)
    if found is not None and found[1] == 0 and len(shape_of(found[0].args[0]) or ()) == 1:
        mask = found[0].args[0]
    else:
        m = AnyOf(M("squeeze", M("nonzero", KA("m")), -1), M("squeeze", M("nonzero", KA("m")), 1),
                  M("flatten", M("nonzero", KA("m"))), M("view", M("nonzero", KA("m")), -1),
                  M("reshape", M("nonzero", KA("m")), -1),
                  M("squeeze", F(torch.nonzero, KA("m")), -1), M("squeeze", F(torch.nonzero, KA("m")), 1),
                  M("flatten", F(torch.nonzero, KA("m"))), M("view", F(torch.nonzero, KA("m")), -1),
                  M("reshape", F(torch.nonzero, KA("m")), -1)).match(index)
        if is_match(m) and len(shape_of(m.kwargs["m"]) or ()) == 1:
            mask = m.kwargs["m"]
    if mask is None:
        return None
    if dtype_of(mask) != torch.bool:
        return None
    sel = _bool_rows(mask)
    if sel is None:
        decline("dispatch", f"{mask.name}: rows are selected by a mask that is not v == e, a column of a one-hot "
                            "mask or (ids == e).any(-1)")
    sel.index = index
    return sel


@register("dispatch", "capacity_rows", "idx[:c] of an index of rows (m.nonzero().squeeze(-1)[:c], torch.where(m)[0][:c]): "
          "the first c selected rows, a capacity")
def capacity_rows(index) -> Optional[Selection]:
    """``idx[:c]`` with idx an ``index_of_rows`` of a 1-D mask m: nonzero/where list the selected rows
    in increasing order, so the first c of them are the rows r with m[r] and cumsum(m)[r] <= c, for
    c >= 0 (proved: an int, or a SymInt the shape environment knows is >= 0; a negative c would cut
    from the end). The selection keeps m as its mask and the cut as ``capacity``; assignments past
    it are dropped (expert -1). Not a ``v == e`` selection any more (``value`` cleared: v no longer
    tells which rows are taken), but ``disjoint_key`` stays: the cut keeps a subset of m's rows, and
    subsets of selections that never share a row never share one either (labml's kept index lists
    assigned into ``final_output``)."""
    if not (isinstance(index, fx.Node) and index.op == "call_function" and index.target is operator.getitem
            and isinstance(index.args[1], slice)):
        return None
    base, cut = index.args
    if cut.start is not None or cut.step is not None or cut.stop is None or not isinstance(base, fx.Node):
        return None
    base = in_order(base)
    sel = index_of_rows(base)
    if sel is None:
        return None
    need(known_nonnegative(cut.stop), f"{index.name}: the capacity {getattr(cut.stop, 'name', cut.stop)} of "
                                      f"{base.name}[:c] is not provably >= 0 (a negative c cuts from the end)",
         part="dispatch")
    need(not safety.writes_to(base), f"{base.name}: the selected rows are modified in place", part="dispatch")
    return dataclasses.replace(sel, index=index, capacity=cut.stop, value=None, num_classes=None,
                               nodes=sel.nodes + [base])


def in_order(node: fx.Node) -> fx.Node:
    """X for ``X[torch.arange(n)]`` with X 1-D and n its length, provably (the shapes), neither written
    in place: position j holds X[j], the same values in the same order (labml's Switch with its
    shuffle before dropping, ``idx[torch.randperm(len(idx))]``, made deterministic as an identity
    permutation); ``node`` itself otherwise."""
    if not (node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node)):
        return node
    x, perm = node.args
    n, xs = _arange_rows(perm), shape_of(x)
    if n is None or xs is None or len(xs) != 1 or not same(n, xs[0]) or safety.writes_to(perm) \
            or safety.writes_to(x):
        return node
    return x


# --------------------------------------------------------------------------- every assignment's token
#
# ``arange(T).repeat_interleave(K)`` holds, at position j of the T*K assignments in (token, k) order,
# token j // K; indexed by a permutation ``perm`` of range(T*K) (a sort of T*K values) it holds
# perm[i] // K. Either is the token of every assignment, not one expert's selection of rows: a write at
# it combines the rows of all experts at once (rxlm's MoeFeedForward: ``token_indices[sorted_order]``
# gathers, ``scatter_add_`` at ``token_indices`` of the rows put back by ``argsort``), the flat-rows form.

_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _arange_rows(node) -> Optional[object]:
    """T (sympy) of ``torch.arange(T)`` / ``torch.arange(0, T)`` (step 1, integer dtype): values 0..T-1."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target is torch.arange):
        return None
    if set(node.kwargs) - {"device", "dtype"} or len(node.args) not in (1, 2) or dtype_of(node) not in _INT_DTYPES:
        return None
    if len(node.args) == 2 and int_value(node.args[0]) != 0:
        return None
    s = shape_of(node)
    return s[0] if s is not None and len(s) == 1 else None


def replicated_tokens(node) -> Optional[tuple]:
    """(T, K) when ``node`` is ``arange(T).repeat_interleave(K)`` (method or ``torch.repeat_interleave``,
    K a Python int >= 1, no dim or dim 0 of the 1-D arange), nothing writing either in place: element j
    is j // K, for j in [0, T*K)."""
    if not _method_or_function(node, ("repeat_interleave",), (torch.repeat_interleave,)):
        return None
    if len(node.args) != 2 or set(node.kwargs) - {"dim", "output_size"} or node.kwargs.get("dim", 0) not in (0, -1):
        return None
    ar, K = node.args
    T = _arange_rows(ar)
    if T is None or type(K) is not int or K < 1 or any(safety.writes_to(n) for n in (ar, node)):
        return None
    s = shape_of(node)
    if s is None or len(s) != 1 or not same(s[0], T * K):
        return None
    return T, K


def _sort_call(node) -> Optional[fx.Node]:
    """The ``sort`` / ``argsort`` call whose permutation ``node`` is (``sort(v)[1]``, ``argsort(v)``)."""
    if isinstance(node, fx.Node) and node.op == "call_function" and node.target is operator.getitem \
            and node.args[1] == 1 and _method_or_function(node.args[0], ("sort",), (torch.sort,)):
        return node.args[0]
    return node if _method_or_function(node, ("argsort",), (torch.argsort,)) else None


def _sort_permutation(node) -> Optional[fx.Node]:
    """v of ``sort(v)[1]`` / ``v.sort(...)[1]`` / ``argsort(v)`` (1-D v, any order or stability): a
    permutation of range(len(v))."""
    s = _sort_call(node)
    if s is None:
        return None
    if not isinstance(s.args[0], fx.Node) or len(shape_of(s.args[0]) or ()) != 1 or \
            set(s.kwargs) - {"dim", "descending", "stable"}:
        return None
    dim = s.kwargs.get("dim", s.args[1] if len(s.args) > 1 else -1)
    if dim not in (0, -1) or len(s.args) > 3 or safety.writes_to(node):
        return None
    return s.args[0]


def assignment_tokens(index) -> Optional[dict]:
    """The proof that ``index`` holds the token of every assignment: ``arange(T).repeat_interleave(K)``
    (row j: token j // K) or that indexed by a permutation of its T*K positions, ``tok[perm]`` /
    ``tok.index_select(0, perm)`` with perm ``sort(v)[1]`` / ``argsort(v)`` of a 1-D v of T*K values
    (row i: token perm[i] // K). Returns dict(T, K, perm (None when unpermuted), tokens) or None."""
    rt = replicated_tokens(index)
    if rt is not None:
        return dict(T=rt[0], K=rt[1], perm=None, tokens=index)
    tok = perm = None
    if isinstance(index, fx.Node) and index.op == "call_function" and index.target is operator.getitem:
        tok, perm = index.args[0], index.args[1]
    elif _method_or_function(index, ("index_select",), (torch.index_select,)) and len(index.args) == 3 \
            and index.args[1] == 0 and not index.kwargs:
        tok, perm = index.args[0], index.args[2]
    rt = replicated_tokens(tok) if isinstance(perm, fx.Node) else None
    v = _sort_permutation(perm) if rt is not None else None
    if v is None or not same(shape_of(v)[0], rt[0] * rt[1]):
        return None
    return dict(T=rt[0], K=rt[1], perm=perm, tokens=tok)


@register("dispatch", "assignment_tokens", "arange(T).repeat_interleave(K) [indexed by a sort permutation]: "
          "every assignment's token, declined as a per-expert selection")
def every_assignment(index) -> Optional[Selection]:
    found = assignment_tokens(index) if isinstance(index, fx.Node) else None
    if found is None:
        return None
    how = f" indexed by the sort permutation {found['perm'].name}" if found["perm"] is not None else ""
    decline("dispatch", f"{index.name} is arange(T).repeat_interleave({found['K']}){how}: the token of every one of "
                        "the T*K assignments, not one expert's selection of rows; this write puts the rows of all "
                        "experts back at once (a flat-rows block, the assignment_rows composition's form), not one "
                        "unit of a per-expert loop")


@register("dispatch", "graph_input", "an index that is an input of the graph: declined (its rows cannot be proven)")
def graph_input(index) -> Optional[Selection]:
    base = index
    while isinstance(base, fx.Node) and base.op == "call_function" and base.target is operator.getitem \
            and isinstance(base.args[1], slice):
        base = base.args[0]
    if not (isinstance(base, fx.Node) and base.op == "placeholder"):
        return None
    decline("dispatch", f"{index.name} is an input of this graph ({base.target}): the rows it selects were computed "
                        "in another graph (Dynamo split the block there, e.g. at a data-dependent branch on an index's "
                        "length such as labml's capacity check `if len(idx) <= capacity`), so which expert's rows they "
                        "are cannot be proven here")


# --------------------------------------------------------------------------- scores

def unsqueezed(node: fx.Node):
    """(inner, True) for ``a[..., None]``-like trailing unsqueezes: ``a.unsqueeze(-1)``,
    ``a[:, None]``, ``a.view(-1, 1)``; (node, False) otherwise."""
    if node.op == "call_method" and node.target == "unsqueeze" and len(node.args) == 2 and node.args[1] in (-1, 1):
        return node.args[0], True
    if node.op == "call_function" and node.target is operator.getitem and node.args[1] in ((_ALL, None),
                                                                                           (Ellipsis, None)):
        return node.args[0], True
    if node.op == "call_method" and node.target in ("view", "reshape") and tuple(node.args[1:]) in ((-1, 1),):
        return node.args[0], True
    return node, False


@register("scores", "pair_score", "w[tok, k, None], w[tok, k].unsqueeze(-1)")
def pair_score(node, sel: Selection) -> Optional[Score]:
    if sel.layout != "pairs" or not isinstance(node, fx.Node):
        return None
    if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[1], tuple) \
            and len(node.args[1]) == 3 and node.args[1][2] is None:
        src, (a, b, _) = node.args[0], node.args[1]
    else:
        inner, unsq = unsqueezed(node)
        if not unsq or not (inner.op == "call_function" and inner.target is operator.getitem
                            and isinstance(inner.args[1], tuple) and len(inner.args[1]) == 2):
            return None
        src, (a, b) = inner.args[0], inner.args[1]
    if not (safety.equivalent(a, sel.token) and safety.equivalent(b, sel.k)):
        decline("scores", f"{node.name}: routing weights are read at other (token, k) positions than the "
                          "selection's (swapped roles, or another torch.where)")
    ss = shape_of(src)
    need(ss is not None and len(ss) == 2, f"{src.name}: routing weights are not a (T, K) table", part="scores")
    return Score(source=src, layout="pairs", index=(a, b), node=node)


@register("scores", "row_score", "s[m, None], s[m].unsqueeze(-1), s[m] for s (R, 1)")
def row_score(node, sel: Selection) -> Optional[Score]:
    if sel.layout != "rows" or not isinstance(node, fx.Node):
        return None
    if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[1], tuple) \
            and len(node.args[1]) == 2 and node.args[1][1] is None:
        src, idx, shape_ok = node.args[0], node.args[1][0], 1
    else:
        inner, unsq = unsqueezed(node)
        if not (inner.op == "call_function" and inner.target is operator.getitem):
            return None
        src, idx = inner.args[0], inner.args[1]
        shape_ok = 1 if unsq else 2
    column = None
    if isinstance(idx, tuple) and len(idx) == 2 and isinstance(idx[1], int) and not isinstance(idx[1], bool) \
            and shape_ok == 1:
        idx, column = idx  # s[m, e]: column e of an (R, E) table (makeMoE's dense gating)
        shape_ok = 2
    if not isinstance(src, fx.Node) or not isinstance(idx, fx.Node):
        return None
    if not (safety.same_rows(idx, sel.index) or (sel.capacity is None and safety.same_rows(idx, sel.mask))):
        return None
    ss = shape_of(src)
    if column is not None:
        if ss is None or len(ss) != 2 or int_value(ss[1]) is None or not 0 <= column < int_value(ss[1]):
            return None
        return Score(source=src, layout="rows", index=idx, node=node, column=column)
    if ss is None or len(ss) != shape_ok or (shape_ok == 2 and int_value(ss[1]) != 1):
        return None
    return Score(source=src, layout="rows", index=idx, node=node)


# --------------------------------------------------------------------------- gather

@register("gather", "index_rows", "x[index], x[index, :], x[None, index].reshape(-1, d), index_select(x, 0, index)")
def gather_rows(node) -> Optional[tuple]:
    """(x, index) if ``node`` gathers rows of a 2-D ``x``."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node):
        x, idx = node.args[0], rows_index(node.args[1])
        if idx is not None and len(shape_of(x) or ()) == 2:
            return x, idx
        return None
    if node.op == "call_method" and node.target == "reshape" and len(node.args) == 3 and node.args[1] == -1:
        inner = node.args[0]
        if isinstance(inner, fx.Node) and inner.op == "call_function" and inner.target is operator.getitem \
                and isinstance(inner.args[1], tuple) and len(inner.args[1]) == 2 and inner.args[1][0] is None:
            return inner.args[0], inner.args[1][1]
        return None
    if (node.op == "call_method" and node.target == "index_select") or \
            (node.op == "call_function" and node.target is torch.index_select):
        if len(node.args) == 3 and node.args[1] == 0:
            return node.args[0], node.args[2]
    return None


# --------------------------------------------------------------------------- rows sorted from a routing map
#
# Megatron-Core's permute (``moe_utils.permute``, unfused, dropless): a (T, E) boolean routing map,
# the one-hot of the top-k ids (``zeros_like(logits).int().scatter(1, ids, 1).bool()``), its column-major
# flat view sorted descending and stably, the first A entries, rows ``x.index_select(0, perm % T)``,
# counts ``map.sum(0)``, scores ``probs.T.contiguous().masked_select(map.T.contiguous())``. The map has
# exactly K ones per row (top-k ids are distinct), so its T*K ones come first in the sort, in flat order
# e * T + t: the assignments grouped by expert (expert order), tokens ascending within an expert, and
# the counts are the group sizes. ``routing_map_sorted`` proves that form for ``patterns/assignment_rows``.

def _method_or_function(node, names: tuple, functions: tuple) -> bool:
    return isinstance(node, fx.Node) and ((node.op == "call_method" and node.target in names)
                                          or (node.op == "call_function" and node.target in functions))


def _zero_one_casts(node, passed: Optional[list] = None):
    """Through casts of a 0/1 table (any dtype holds 0 and 1 exactly: ``.bool()``, ``.int()``, ``.long()``,
    ``.to(dtype)``), ``contiguous`` and a slice of every column ``m[:, 0:E]``, back to the table (the
    nodes passed, the table included, appended to ``passed``)."""
    while isinstance(node, fx.Node):
        if passed is not None:
            passed.append(node)
        if node.op == "call_method" and node.target in ("bool", "int", "long", "float", "contiguous") \
                and len(node.args) == 1 and not node.kwargs:
            node = node.args[0]
        elif node.op == "call_method" and node.target == "to" and len(node.args) == 2 and not node.kwargs \
                and isinstance(node.args[1], torch.dtype):
            node = node.args[0]
        elif node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[1], tuple) \
                and len(node.args[1]) == 2 and node.args[1][0] == _ALL and isinstance(node.args[1][1], slice) \
                and len(shape_of(node.args[0]) or ()) == 2 and _full_columns(node):
            node = node.args[0]
        else:
            return node
    return node


def _full_columns(node) -> bool:
    """``m[:, a:b]`` keeps every column of the 2-D m."""
    s, full = node.args[1][1], shape_of(node.args[0])
    return s.step in (None, 1) and s.start in (None, 0) and (s.stop is None or (
        type(s.stop) is int and int_value(full[1]) is not None and s.stop >= int_value(full[1])))


def one_hot_map(node) -> Optional[tuple]:
    """(ids (T, K), E) when ``node`` is the (T, E) 0/1 map of top-k ids: ``zeros(T, E).scatter(1, ids, 1)``
    (``zeros_like``/``zeros``/``new_zeros``, 0/1 casts on either side), ids top-k indices over E columns."""
    chain: list = []
    g = _zero_one_casts(node, chain)
    if not (_method_or_function(g, ("scatter",), (torch.scatter,)) and len(g.args) == 4 and not g.kwargs
            and g.args[1] in (1, -1) and type(g.args[3]) is int and g.args[3] == 1):
        return None
    z, ids = _zero_one_casts(g.args[0], chain), g.args[2]
    zs, s = shape_of(z), shape_of(node)
    if not (_method_or_function(z, ("new_zeros",), (torch.zeros, torch.zeros_like))
            and not z.kwargs.get("requires_grad", False) and zs is not None and len(zs) == 2 and s is not None
            and len(s) == 2 and isinstance(ids, fx.Node) and topk_columns(ids) == int_value(zs[1])
            and same(zs[0], shape_of(ids)[0]) and same(s[1], zs[1])):
        return None
    # K ones per row holds for the table as made: nothing writes it (or the zeros, or the ids) in place
    if any(safety.writes_to(n) for n in chain + [ids]):
        return None
    return ids, int_value(zs[1])


def _transposed_flat(node) -> Optional[fx.Node]:
    """m of ``m.T.contiguous().reshape(-1)`` (``view(-1)``, ``flatten()``; the transpose as
    ``_transposed_2d`` reads it): the column-major flat view of a 2-D m."""
    if not (_method_or_function(node, ("reshape", "view", "flatten"), (torch.reshape, torch.flatten))):
        return None
    if node.target in ("reshape", "view", torch.reshape) and tuple(node.args[1:]) not in ((-1,), ((-1,),)) \
            or node.target in ("flatten", torch.flatten) and len(node.args) != 1 or node.kwargs:
        return None
    return _transposed_2d(node.args[0])


def _descending_stable_perm(node) -> Optional[fx.Node]:
    """v of ``argsort(v, descending=True, stable=True)`` / ``sort(v, descending=True, stable=True)[1]`` (1-D v)."""
    s = _sort_call(node)
    if s is None:
        return None
    if len(s.args) != 1 or s.kwargs.get("descending") is not True or s.kwargs.get("stable") is not True \
            or set(s.kwargs) - {"descending", "stable", "dim"} or s.kwargs.get("dim", -1) not in (-1, 0) \
            or len(shape_of(s.args[0]) or ()) != 1:
        return None
    return s.args[0]


def _strip_counts(node):
    """Through same-valued copies of a counts vector: integer casts, ``.cpu()``."""
    while isinstance(node, fx.Node) and node.op == "call_method" and len(node.args) == 1 and not node.kwargs \
            and node.target in ("long", "int", "cpu", "contiguous"):
        node = node.args[0]
    return safety.strip_casts(node)


def map_counts(counts) -> Optional[fx.Node]:
    """The 0/1 map m when ``counts`` is ``m.sum(0)`` (``sum(dim=0)``, casts, ``.cpu()``): expert e's column count."""
    c = _strip_counts(counts)
    if not _method_or_function(c, ("sum",), (torch.sum,)):
        return None
    dim = c.args[1] if len(c.args) == 2 else c.kwargs.get("dim")
    if len(c.args) not in (1, 2) or dim not in (0, (0,)) or set(c.kwargs) - {"dim"} or \
            len(shape_of(c.args[0]) or ()) != 2:
        return None
    return c.args[0]


def _same_map(a, b) -> bool:
    """a and b are the same 0/1 table (through 0/1 casts, copies, full column slices), none of them
    written in place."""
    chain: list = []
    a, b = _zero_one_casts(a, chain), _zero_one_casts(b, chain)
    return (a is b or safety.equivalent(a, b)) and not any(safety.writes_to(n) for n in chain)


def _rows_taken(A, counts, T, K) -> bool:
    """A, the number of sorted entries kept, is T*K (the map's ones), or the host copy ``c.sum().item()``
    of the counts (their sum is the number of ones)."""
    if isinstance(A, fx.Node) and A.op == "call_method" and A.target == "item" and len(A.args) == 1:
        s = A.args[0]
        if not (_method_or_function(s, ("sum",), (torch.sum,)) and len(s.args) == 1 and not s.kwargs):
            return False
        c = _strip_counts(s.args[0])
        return c is _strip_counts(counts) or (map_counts(c) is not None
                                              and _same_map(map_counts(c), map_counts(counts)))
    return A is not None and to_sympy(T) is not None and same(A, to_sympy(T) * K)


def routing_map_sorted(index, counts, score_column, T_x) -> Optional[dict]:
    """The proof that rows gathered at ``index`` are Megatron-Core's permutation of a routing map, grouped
    by ``counts``: index = ``perm[:A] % T`` with perm the descending stable sort of ``m.T.contiguous()
    .reshape(-1)``, m the one-hot map of top-k ids (T, E), A = T*K (or ``counts.sum().item()`` of the same
    counts), counts ``m.sum(0)`` of the same map, the scores (when given, the 1-D per-row column)
    ``P.T.contiguous().masked_select(m.T.contiguous())``. Returns dict(perm, ids, K, counts, counted, E) or None.
    Row i then is token perm[i] % T of expert perm[i] // T, experts in order, each expert's rows the
    counted ones: the grouping the grouped GEMM's offsets give."""
    if not (_method_or_function(index, ("remainder", "__mod__"), (operator.mod, torch.remainder))
            and len(index.args) == 2 and not index.kwargs and isinstance(index.args[0], fx.Node)):
        return None
    flat, T = index.args
    A = None
    if flat.op == "call_function" and flat.target is operator.getitem and isinstance(flat.args[1], slice):
        sl = flat.args[1]
        if sl.start not in (None, 0) or sl.step not in (None, 1):
            return None
        flat, A = flat.args[0], sl.stop
    m_flat = _descending_stable_perm(flat)
    m = _transposed_flat(m_flat) if m_flat is not None else None
    found = one_hot_map(m) if m is not None else None
    counted = map_counts(counts)
    if found is None or counted is None or not _same_map(counted, m):
        return None
    ids, E = found
    ms, K = shape_of(m), int_value(shape_of(ids)[1])
    if K is None or not same(T, ms[0]) or not same(T, T_x):
        return None
    if not (_rows_taken(A, counts, T, K) if A is not None else E == K):
        return None
    if score_column is not None:
        if not (_method_or_function(score_column, ("masked_select",), (torch.masked_select,))
                and len(score_column.args) == 2 and not score_column.kwargs):
            return None
        p, mask = (_transposed_2d(a) for a in score_column.args)
        if p is None or mask is None or not _same_map(mask, m) or not safety.same_shape(p, m):
            return None
    return dict(perm=flat, ids=m, K=K, counts=counts, counted=counted, E=E)


def _transposed_2d(node) -> Optional[fx.Node]:
    """m of ``m.T`` / ``m.t()`` / ``m.transpose(0, 1)`` / ``m.permute(1, 0)`` of a 2-D m, optionally
    followed by ``contiguous()``; else None."""
    t = node
    if _method_or_function(t, ("contiguous",), ()) and len(t.args) == 1:
        t = t.args[0]
    if not isinstance(t, fx.Node) or len(shape_of(t) or ()) != 2:
        return None
    if (t.op == "call_function" and t.target is getattr and t.args[1] == "T") or \
            (_method_or_function(t, ("t",), (torch.t,)) and len(t.args) == 1) or \
            (_method_or_function(t, ("transpose",), (torch.transpose,)) and len(t.args) == 3
             and {a % 2 for a in t.args[1:] if isinstance(a, int)} == {0, 1}) or \
            (_method_or_function(t, ("permute",), (torch.permute,)) and tuple(t.args[1:]) in ((1, 0), ((1, 0),))):
        return t.args[0]
    return None


# --------------------------------------------------------------------------- per-expert slices of a masked copy
# (NLLB-MoE 4.x: ``buf = einsum("bm,be->ebm", x, R)``, expert e reads ``buf[e, R[:, e]]`` and writes its
# weighted output back there, the result is ``buf.sum(0)``; the composition is patterns/mask_dispatch.py)

def masked_copies(buf) -> Optional[tuple]:
    """(x, R) if ``buf = einsum("bm,be->ebm", x, R)`` (any letters, either operand order) with x
    (T, d) floating and R (T, E) boolean: slice e of ``buf`` is ``x * R[:, e, None]``, a pure
    product (no letter is summed), so its rows where R is true are x's rows exactly (x * 1) and
    the others are 0 (x * 0; for a finite x, as the capacity einsum's dispatch assumes: an inf
    or nan token makes them nan in eager, where the fused op adds nothing for an unrouted slot).
    None otherwise."""
    p = einsum_parts(buf)
    if p is None or len(p[2]) != 2:
        return None
    ins, out, ops = p
    for (xl, rl), (x, R) in (((ins[0], ins[1]), ops), ((ins[1], ins[0]), ops[::-1])):
        if len(xl) != 2 or len(rl) != 2 or len(set(xl + rl[1])) != 3 or rl[0] != xl[0] or out != rl[1] + xl:
            continue
        xs, rs, dx = shape_of(x), shape_of(R), dtype_of(x)
        if dtype_of(R) == torch.bool and dx is not None and dx.is_floating_point and xs is not None \
                and rs is not None and len(xs) == 2 and len(rs) == 2 and same(xs[0], rs[0]):
            return x, R
    return None


def slice_index(index) -> Optional[tuple]:
    """(e, mask) for ``t[e, mask]`` / ``t[e, mask, :]`` with e a Python int and mask a tensor."""
    if not (isinstance(index, tuple) and len(index) in (2, 3) and isinstance(index[1], fx.Node)):
        return None
    e = index[0]
    if not isinstance(e, int) or isinstance(e, bool) or (len(index) == 3 and index[2] != _ALL):
        return None
    return e, index[1]


def slice_score(node) -> Optional[tuple]:
    """(W, mask, e, y) if ``node`` weights the rows y of slice e by ``W[mask, e]``:
    ``einsum("b,be->be", W[mask, e], y)`` (either order, any letters), ``W[mask, e, None] * y``,
    ``W[mask, e].unsqueeze(-1) * y`` (either order). None otherwise."""
    def weight(w, trailing):
        if not (isinstance(w, fx.Node) and w.op == "call_function" and w.target is operator.getitem):
            return None
        idx = w.args[1]
        if trailing and isinstance(idx, tuple) and len(idx) == 3 and idx[2] is None:
            idx = idx[:2]
        elif trailing:
            return None
        got = slice_index((idx[1], idx[0]) if isinstance(idx, tuple) and len(idx) == 2 else None)
        return (w.args[0], got[1], got[0]) if got is not None else None

    p = einsum_parts(node)
    if p is not None and len(p[2]) == 2:
        ins, out, ops = p
        for (wl, yl), (w, y) in (((ins[0], ins[1]), ops), ((ins[1], ins[0]), ops[::-1])):
            if len(wl) == 1 and len(yl) == 2 and yl[0] == wl and yl[1] != wl and out == yl:
                got = weight(w, False)
                if got is not None:
                    return got + (y,)
        return None
    mul = _binary(node, _MUL, "mul")
    for w, y in ((mul or ())[:2], (mul or ())[::-1][:2]) if mul else ():
        if isinstance(w, fx.Node) and w.op == "call_method" and w.target == "unsqueeze" and tuple(w.args[1:]) == (-1,):
            got = weight(w.args[0], False)
        else:
            got = weight(w, True)
        if got is not None and isinstance(y, fx.Node):
            return got + (y,)
    return None
