"""Composition: an MoE block written as a Python loop over the experts, unrolled by Dynamo into
one (dispatch, expert, combine) unit per expert. The parts come from the registries
(``moe_inductor.recognize.parts``: ``patterns/dispatch.py``, ``patterns/experts.py``, ``patterns/combine.py``); this
module proves once that the units form one MoE block and describes it for the fused op.

A unit, recognised from each write into an accumulator (combine part)::

    acc <write at index> [score *] f_e(x[index] [* score])      # write: index_add_, +=, index_put_, setitem, scatter_add_
    index: a selection of rows for expert e                    # dispatch: where(ids == e), v == e masks, ...
    f_e: an expert MLP                                         # experts: Linears, stacked P[e], fused gate_up
    score: the routing weight of each selected row             # scores: w[tok, k, None], s[mask, None]

Proof (``analyse_group``), for the units writing one accumulator; each failure declines the block
with a reason naming the part or the proof:
  * every unit reads the same tokens x, gathered at the index it writes (``safety.equivalent``);
  * the experts are a contiguous range lo..lo+E-1, each once, each with its own weights, one
    activation, weights of one shape; assignments to experts outside the range are dropped (expert
    id -1), exactly what the loop does with them;
  * scores: in every unit or in none, read at the unit's own selection (the same (token, k) pairs,
    or the same mask), applied once (on the output, or on the input);
  * the accumulator starts as zeros or as a copy of a tensor (added back), for assignments also as
    ``empty`` when the selections provably cover every row; nothing but the units writes it (views
    included) and nothing reads it inside the loop; x, the routing and the scores are not modified
    inside the loop; nothing random or in place on an expert's path;
  * a read-modify-write ``acc[idx] += v`` (last duplicate wins) needs selections without duplicate
    rows (``where(ids == e)`` of top-k ids, boolean masks); an assignment needs selections that are
    disjoint (``v == e`` for one v, columns of a one-hot mask).
A per-token scale of the result after the loop, ``out * s`` with s (T, 1) (labml's Switch:
``final_output * route_prob_max.view(-1, 1)`` or ``* (p / p.detach()).view(-1, 1)``;
``combine.token_scale``), is folded into the scores, ``(sum_a w_a f(x_t)) s_t = sum_a (w_a s_t) f(x_t)``,
when the accumulator starts at zeros (or empty), only that multiply reads it, and every token has an
assignment (top-k / top-1 ids over exactly the looped experts 0..E-1); the fused op then runs
where the multiply was (nothing it reads may change in between). Otherwise the multiply stays.
Assignments (flat, for the fused op): a (T, K) top-k table gives ``token = t``, ``expert = ids[t, k]``;
boolean row masks give one candidate assignment per (row, expert) with expert -1 where the mask is
false (rows routed nowhere keep the accumulator's start value).

Identity experts (LongCat-Flash's "zero-computation" experts): a unit whose expert returns its
input rows (``acc.index_add_(0, tok, x[tok] * w[tok, k, None])``, experts part ``identity_experts``)
computes nothing for the fused op. The block is then: the fused op over the MLP experts, where the
assignments to identity experts get expert id -1 (dropped), plus the identity experts' contribution
``x[t] * sum_k w[t, k] * [ids[t, k] is an identity expert]`` as plain graph ops (left to Inductor).
Proven as for the MLP units (same x, the same (T, K) id table and score table, the same rows
gathered and written, accumulation), and: the MLP experts and the identity experts are each a
contiguous range, disjoint, every expert once.

Two-level combine: rows that are replicated assignments (``x.repeat_interleave(K, 0)``, masks
``ids.view(-1) == e``) written by assignment and then summed per token with the top-k weights,
``(y.view(T, K, d) * w.unsqueeze(-1)).sum(1)`` (DeepSeek-MoE/V2/V3 remote code, training branch),
become one fused op over the original tokens with those weights.
"""
from __future__ import annotations

import operator
from collections import defaultdict
from typing import Optional

import torch
import torch.fx as fx

from moe_inductor.fx.targets import LINEAR_FUNCTIONS, MATMUL_FUNCTIONS
from moe_inductor.fx import safety
from moe_inductor.fx.build import call, method
from moe_inductor.fx.decline import Declined, need
from moe_inductor.fx.matching import size_asserts_of
from moe_inductor.fx.nodes import is_mutation, node_order
from moe_inductor.fx.shapes import dtype_of, int_value, same, shape_of, sympy_prod
from moe_inductor.recognize.parts import PartDeclined, recognise, weight_node
from moe_inductor.lower.rewrite import ExpertWeights, MoEBlock

from . import combine as _combine  # noqa: F401  (registers the recognisers)
from . import dispatch as _dispatch
from . import experts as _experts  # noqa: F401

IDIOM = "expert_loop"

_GEMMS = {*LINEAR_FUNCTIONS, *MATMUL_FUNCTIONS, torch.bmm}


def _has_gemm_upstream(node, depth: int = 10) -> bool:
    frontier, seen = [node], set()
    for _ in range(depth):
        nxt = []
        for n in frontier:
            if not isinstance(n, fx.Node) or n in seen:
                continue
            seen.add(n)
            if (n.op == "call_function" and n.target in _GEMMS) or (n.op == "call_method" and n.target in (
                    "matmul", "mm", "bmm")):
                return True
            nxt += n.all_input_nodes
        frontier = nxt
    return False


def _mul_operands(v: fx.Node):
    if v.op == "call_function" and v.target in (operator.mul, torch.mul) and len(v.args) == 2 and not v.kwargs:
        a, b = v.args
        if isinstance(a, fx.Node) and isinstance(b, fx.Node):
            return [(a, b), (b, a)]
    return []


def _score_of(v: fx.Node, sel, on: str):
    """(score, the other operand) if ``v`` multiplies something by the selection's scores."""
    for s, other in _mul_operands(v):
        score = recognise("scores", safety.strip_casts(s), sel)
        if score is not None:
            score.on = on
            return score, other
    return None, v


_INPLACE_MUL = (operator.imul, torch.Tensor.mul_)
# results that are always new tensors (never an alias of an argument)
_FRESH_FUNCTIONS = (operator.mul, torch.mul, operator.matmul, torch.matmul, *LINEAR_FUNCTIONS)


def _constant_scale(v: fx.Node) -> tuple:
    """(c, the scaled node, the in-place node or None) if ``v`` is ``y * c`` / ``c * y`` (the form the
    normal form gives ``y *= c`` on a fresh y) or ``y *= c`` / ``y.mul_(c)`` for a Python number c on a fresh result y (a product or a projection, read by nothing but that multiply): NLLB-MoE's eval-mode
    ``*= 1 - moe_token_dropout``. The scale is then folded into the routing weights (the combine is
    linear in each expert's output). (1.0, v, None) otherwise."""
    number = lambda c: isinstance(c, (int, float)) and not isinstance(c, bool)
    functional = (v.op == "call_function" and v.target in (operator.mul, torch.mul)) or \
        (v.op == "call_method" and v.target == "mul")
    if functional and len(v.args) == 2 and not v.kwargs:  # y * c, c * y: a new tensor, nothing aliased
        a, b = v.args
        y, c = (a, b) if number(b) else (b, a) if number(a) else (None, None)
        if isinstance(y, fx.Node) and c is not None:
            return float(c), safety.strip_casts(y), None
    inplace = (v.op == "call_function" and v.target in _INPLACE_MUL) or (v.op == "call_method" and v.target == "mul_")
    if not inplace or len(v.args) != 2 or v.kwargs:
        return 1.0, v, None
    y, c = v.args
    if not isinstance(c, (int, float)) or isinstance(c, bool) or not isinstance(y, fx.Node) or set(y.users) != {v}:
        return 1.0, v, None
    if not ((y.op == "call_function" and y.target in _FRESH_FUNCTIONS) or
            (y.op == "call_method" and y.target in ("mul", "matmul", "__matmul__"))):
        return 1.0, v, None  # e.g. a same-dtype .to() or a view: y may alias a tensor others read
    return float(c), safety.strip_casts(y), v


def analyse_unit(write) -> dict:
    """One expert's dispatch, expert MLP and scores behind ``write`` (raises Declined)."""
    sel = recognise("dispatch", write.index, required=f"the index {getattr(write.index, 'name', write.index)} "
                                                       "the result is written at (an expert's selection of rows)")
    v = safety.strip_casts(write.value)
    scale, v, scale_node = _constant_scale(v)
    score, core = _score_of(v, sel, "output")
    for n in (v, core):
        if n.args and isinstance(n.args[0], fx.Node) and is_mutation(n, n.args[0]):
            raise PartDeclined("experts", f"{n.name}: the expert output is modified in place ({n.format_node()}), "
                                          "e.g. NLLB-MoE's eval-mode `*= 1 - moe_token_dropout`")
        if n.op == "call_function" and n.target is torch.nn.functional.dropout and not safety.is_identity_dropout(n):
            raise PartDeclined("experts", f"{n.name}: dropout with p > 0 in training on the expert output (random "
                                          "per element, e.g. NLLB-MoE moe_token_dropout): the fused op cannot "
                                          "reproduce it")
    identity = recognise("identity_experts", core)
    if identity is not None:  # the expert returns its rows: x[idx] [* score]
        mlp, z = None, identity.input
    else:
        mlp = recognise("experts", safety.strip_casts(core), required=f"{core.name}: the expert MLP")
        z = safety.strip_identity(mlp.input)
    g = recognise("gather", z)
    if g is None and mlp is not None:
        s_in, inner = _score_of(z, sel, "input")
        if s_in is not None:
            if score is not None:
                raise PartDeclined("scores", "routing weights are applied twice (to the expert's input and output)")
            score, z = s_in, safety.strip_identity(inner)
            g = recognise("gather", z)
    if g is None:
        raise PartDeclined("gather", f"{z.name}: the expert's input is not a gather of token rows x[index]")
    x, gidx = g
    if not (safety.same_rows(gidx, write.index) or safety.same_rows(gidx, sel.index)
            or (sel.mask is not None and sel.capacity is None and safety.same_rows(gidx, sel.mask))):
        raise Declined(f"proof: the expert reads rows {getattr(gidx, 'name', gidx)} but its output is written at "
                       f"{getattr(write.index, 'name', write.index)}: not the same selection")
    allowed = [scale_node] if scale_node is not None else []
    safety.need_pure_path(write.value, z, allowed)
    if score is not None and score.on == "input":
        safety.need_pure_path(write.value, score.node, allowed)
    return dict(write=write, sel=sel, mlp=mlp, score=score, x=x, gathered=z, scale=scale)


def acc_start(acc: fx.Node):
    """('zeros', None) | ('copy', v0) | ('empty', None) | ('base', acc) | None for how the
    accumulator starts (``base``: a tensor the graph computed, ``safety.is_fresh``, that the loop adds
    into: it ends as ``acc + sum of expert rows``)."""
    if acc.op == "call_function" and acc.target in (torch.zeros, torch.zeros_like):
        return "zeros", None
    if acc.op == "call_method" and acc.target == "new_zeros":
        return "zeros", None
    if (acc.op == "call_method" and acc.target == "clone" and len(acc.args) == 1) or \
            (acc.op == "call_function" and acc.target is torch.clone and len(acc.args) == 1):
        return "copy", acc.args[0]
    if acc.op == "call_function" and acc.target in (torch.empty, torch.empty_like):
        return "empty", None
    if acc.op == "call_method" and acc.target == "new_empty":
        return "empty", None
    if safety.is_fresh(acc):
        return "base", acc
    return None


def analyse_group(units: list, graph: fx.Graph) -> MoEBlock:
    order = node_order(graph)
    units = sorted(units, key=lambda u: order[u["write"].anchor])
    first, last = units[0], units[-1]
    acc = first["write"].acc
    kinds = {u["write"].kind for u in units}
    need(len(kinds) == 1, "combine: some experts accumulate into the result and others assign to it")
    kind = kinds.pop()
    x = first["x"]
    need(all(u["x"] is x for u in units), "proof: the experts read different token tensors")
    need(x is not acc, "proof: the loop reads the tensor it writes")
    layouts = {u["sel"].layout for u in units}
    need(len(layouts) == 1, "dispatch: experts select their rows in different ways")
    layout = layouts.pop()

    # experts: a contiguous range, each once, own weights, one activation and shape
    es = sorted(u["sel"].expert for u in units)
    need(len(set(es)) == len(es), f"proof: an expert is selected twice ({es})")
    all_units = units
    units = [u for u in all_units if u["mlp"] is not None]
    identity = _identity_experts([u for u in all_units if u["mlp"] is None], units, layout, kind)
    es = sorted(u["sel"].expert for u in units)
    lo, E = es[0], len(es)
    need(es == list(range(lo, lo + E)), f"proof: the loop covers experts {es}, not a contiguous range")
    acts = {u["mlp"].activation for u in units}
    need(len(acts) == 1, f"experts: the experts use different activations {sorted(acts)}")
    act = acts.pop()
    need(len({u["mlp"].interleaved for u in units}) == 1,
         "experts: some experts interleave gate and up columns and others not")
    for role in range(6):
        present = {u["mlp"].weights()[role] is not None for u in units}
        need(len(present) == 1, "experts: some experts have biases (or gates) and others not")
        if units[0]["mlp"].weights()[role] is not None:
            shapes = {tuple(map(str, shape_of(u["mlp"].weights()[role]) or ())) for u in units}
            need(len(shapes) == 1, "experts: the experts have weights of different shapes")
    need(len({tuple(sorted(u["mlp"].transposed)) for u in units}) == 1,
         "experts: the experts store their weights in different layouts")
    if E > 1:
        need(len({u["mlp"].gate for u in units}) == E and len({u["mlp"].down for u in units}) == E,
             "experts: the experts share weights (each iteration must use its own expert's weights)")

    # scores: everywhere or nowhere, applied once, from one table for pairs (identity experts
    # included: s * x[t] is the same on the input or the output, so only the MLP units say where)
    scored = {u["score"] is not None for u in all_units}
    need(len(scored) == 1, "scores: only some experts multiply by a routing weight")
    scored = scored.pop()
    if scored:
        need(len({u["score"].on for u in units}) == 1, "scores: applied to the input by some experts, the output "
                                                        "by others")
    on = units[0]["score"].on if scored else "output"
    scales = {u["scale"] for u in all_units}
    need(len(scales) == 1, f"scores: the experts scale their outputs by different constants {sorted(scales)}")
    scale = scales.pop()
    if scale != 1.0:
        need(on == "output", "scores: a constant scale of the output with the routing weights applied to the input")
        need(identity is None, "experts: a constant scale of the outputs together with identity experts")

    # from here on, every unit (MLP and identity experts): the same routing, scores and result
    mlp_units, units = units, all_units
    # dispatch: one routing table for pairs
    if layout == "pairs":
        need(len({u["sel"].routing for u in units}) == 1 and len({u["sel"].routing_kind for u in units}) == 1,
             "dispatch: the experts' selections come from different routing tables")
        if scored:
            need(len({u["score"].source for u in units}) == 1, "scores: the experts read different weight tables")
    if not all(u["write"].duplicates_add for u in units):
        need(all(u["sel"].unique for u in units),
             "proof: acc[idx] += v keeps only the last of duplicate rows, and the selection may select a row twice "
             "(ids not provably distinct per token: not torch.topk indices)")

    # the accumulator
    start = acc_start(acc)
    need(start is not None, f"combine: the result {acc.name} does not start as zeros, a copy, an empty tensor "
                            "or a tensor the graph computed")
    start_kind, base = start
    if start_kind == "base":
        need(kind == "add", f"combine: rows assigned into {acc.name}, which holds values of its own")
        early_views = [v for v in safety.aliases(acc) if v is not acc and order[v] < order[last["write"].anchor]]
        need(not early_views, f"combine: the result {acc.name} has views made before the loop ends "
                              f"({', '.join(v.name for v in early_views)}): they would see the sum")
    rows = shape_of(x)
    accs = shape_of(acc)
    need(rows is not None and len(rows) == 2 and accs is not None and len(accs) >= 2 and same(accs[-1], rows[1])
         and same(sympy_prod(accs[:-1]), rows[0]), "proof: the result is not (rows of x, d)")
    if len(accs) > 2:  # a (B, S, d) result written through (B, S) masks, x its (-1, d) view
        need(layout == "rows" and all(len(shape_of(u["sel"].mask) or ()) == len(accs) - 1 for u in units),
             "proof: a multi-dimensional result must be written through token masks of its leading shape")
    if kind == "add":
        need(start_kind != "empty", "combine: accumulation into an uninitialised (empty) tensor")
    else:
        if layout == "pairs":
            raise Declined("proof: assignments at top-k (token, k) selections overlap across experts")
        keys = {u["sel"].disjoint_key for u in units}
        need(len(keys) == 1 and None not in keys,
             "proof: assignments need selections that never share a row (v == e for one v, or columns of a "
             "one-hot mask); these may overlap, and the last expert would win")
        if start_kind == "empty":
            ncls = {u["sel"].num_classes for u in units}
            need(lo == 0 and ncls == {E}, "proof: the result starts empty and the selections are not proven to "
                                           "cover every row (ids from torch.topk over exactly the looped experts)")
    writes = {n for u in units for n in u["write"].nodes}
    last_anchor = last["write"].anchor
    later = _later_writes(acc, writes, order, last_anchor)
    first_write = min((n for n in writes), key=order.__getitem__)
    views = safety.aliases(acc)
    for a in views:
        for user in a.users:
            if user in writes or user in views or not (order[first_write] < order[user] < order[last_anchor]):
                continue
            raise Declined(f"combine: the result is read or aliased inside the loop ({user.format_node()})")
    srcs = [x] + ([first["sel"].routing] if layout == "pairs" else []) + \
        [u["score"].source for u in units if u["score"] is not None] + \
        ([base] if base is not None and base is not acc else [])
    safety.need_unmodified(srcs, min((u["gathered"] for u in units), key=order.__getitem__), last_anchor,
                           "proof: the tokens, the routing or the scores")

    lift = _lift_assignment_rows(units, acc, x, layout, kind, order) if kind == "assign" else None
    post = None
    if lift is None and on == "output" and identity is None and start_kind in ("zeros", "empty") and not later \
            and _every_row_assigned(units, layout, lo, E, rows[0]):
        post = _combine.token_scale(acc, writes, x)
    if post is not None:  # the fused op runs where the scale was: nothing in between may change what it reads
        masks = [n for u in units for n in (u["sel"].mask, u["sel"].value) if n is not None]
        start = min((u["gathered"] for u in units), key=order.__getitem__)
        if any(safety.mutated_between(v, start, post[0]) is not None for v in srcs + masks):
            post = None  # not folded: the fused op replaces the loop, the scale stays a graph op
    return _block(mlp_units, acc, x, layout, kind, start_kind, base, lo, E, act, scored, on, lift, order,
                  all_units=units, identity=identity, scale=scale, post=post, later=later)


def _later_writes(acc, writes, order, last_anchor) -> list:
    """The writes into the result other than the loop's ``writes``: allowed only after the loop's last
    write and straight into ``acc`` (not through a view), e.g. labml's pass-through of the tokens a
    capacity dropped, ``final_output[dropped, :] = x[dropped, :]``. They are later code working on
    the loop's result: the rewrite hands them the fused result (a fresh tensor) in place of acc, in
    the same order, so they change the same rows to the same values. Declines any other write."""
    later = [w for w in safety.writes_to(acc) if w not in writes]
    for w in later:
        need(order[w] > order[last_anchor] and w.args and w.args[0] is acc,
             f"combine: the result is written by something other than the expert loop ({w.format_node()})")
    return later


def _every_row_assigned(units, layout, lo, E, R) -> bool:
    """Every row of x has at least one assignment to a looped expert: ids provably in [0, E) (top-k
    or top-1 indices over E columns, ``dispatch.topk_columns``), one id table (T, K) or one id
    vector (R,) selected by ``v == e``, T = R rows, and the loop runs experts 0..E-1."""
    sel = units[0]["sel"]
    if lo != 0 or {u["sel"].num_classes for u in units} != {E}:
        return False
    if layout == "pairs" and sel.routing_kind == "ids":
        ids = sel.routing
    elif layout == "rows" and sel.value is not None and len({u["sel"].value for u in units}) == 1:
        ids = sel.value
    else:
        return False
    return same((shape_of(ids) or (None,))[0], R)


def _identity_experts(id_units: list, mlp_units: list, layout: str, kind: str) -> Optional[tuple]:
    """(first, end) of the identity experts' range, None without identity experts; declines what
    the identity contribution ``x[t] * sum_k w[t, k] [first <= ids[t, k] < end]`` does not express."""
    if not id_units:
        return None
    need(mlp_units, "experts: every expert of the loop returns its input (identity): no expert MLP to fuse")
    ies = sorted(u["sel"].expert for u in id_units)
    first, end = ies[0], ies[-1] + 1
    need(ies == list(range(first, end)), f"proof: the identity experts {ies} are not a contiguous range")
    need(layout == "pairs" and all(u["sel"].routing_kind == "ids" for u in id_units),
         "dispatch: identity experts are supported over a (T, K) table of expert ids (where(ids == e)), "
         "not over boolean row masks")
    need(kind == "add", "combine: identity experts whose rows are assigned, not accumulated")
    return first, end


def _lift_assignment_rows(units, acc, x, layout, kind, order) -> Optional[dict]:
    """For rows that are replicated top-k assignments summed per token with the top-k weights
    after the loop: {x0, ids, w, anchor, T, K}; None if the result is used otherwise."""
    if layout != "rows" or acc_start(acc)[0] == "copy":
        return None
    vals = {u["sel"].value for u in units}
    if len(vals) != 1 or None in vals:
        return None
    v = vals.pop()
    if not (v.op == "call_method" and v.target in ("view", "reshape", "flatten") and
            (v.target == "flatten" or tuple(v.args[1:]) in ((-1,), ((-1,),)))):
        return None
    ids = v.args[0]
    rep = _replicated(x)
    if rep is None:
        return None
    x0, K = rep
    ids_shape, x0_shape = shape_of(ids), shape_of(x0)
    if K is None or ids_shape is None or len(ids_shape) != 2 or int_value(ids_shape[1]) != K or \
            x0_shape is None or len(x0_shape) != 2 or not same(ids_shape[0], x0_shape[0]):
        return None
    users = [u for u in acc.users if order[u] > order[units[-1]["write"].anchor]]
    if len(users) != 1:
        return None
    view = users[0]
    if not (view.op == "call_method" and view.target in ("view", "reshape")):
        return None
    vs = shape_of(view)
    if vs is None or len(vs) != 3 or not same(vs[0], ids_shape[0]) or int_value(vs[1]) != K or len(view.users) != 1:
        return None
    mul = next(iter(view.users))
    w = None
    for a, b in _mul_operands(mul):
        if a is view:
            inner, unsq = _dispatch.unsqueezed(safety.strip_casts(b))
            ws = shape_of(inner)
            if unsq and ws is not None and len(ws) == 2 and same(ws[0], ids_shape[0]) and int_value(ws[1]) == K:
                w = inner
            b3 = shape_of(safety.strip_casts(b))
            if w is None and b3 is not None and len(b3) == 3 and same(b3[0], ids_shape[0]) \
                    and int_value(b3[1]) == K and int_value(b3[2]) == 1:
                w = safety.strip_casts(b)  # w.view(T, -1, 1): (T, K, 1)
    if w is None or len(mul.users) != 1:
        return None
    s = next(iter(mul.users))
    if not (s.op == "call_method" and s.target == "sum" and (s.args[1:] == (1,) or s.kwargs == {"dim": 1})
            and len(s.args) <= 2 and set(s.kwargs) <= {"dim"}):
        return None
    return dict(x0=x0, ids=ids, w=w, anchor=s, K=K)


def _replicated(x: fx.Node):
    """(x0, K) if the rows of ``x`` are each token of x0 (T, d) K times in a row (row t*K + k = x0[t]):
    ``x0.repeat_interleave(K, dim=0)`` or ``x0.view(T, 1, d).repeat(1, K, 1).reshape(-1, d)``."""
    if x.op == "call_method" and x.target == "repeat_interleave" and len(x.args) >= 2:
        dim = x.kwargs.get("dim", x.args[2] if len(x.args) > 2 else None)
        K = int_value(x.args[1])
        return (x.args[0], K) if dim == 0 and K is not None else None
    if x.op == "call_method" and x.target in ("reshape", "view") and tuple(x.args[1:2]) == (-1,) and len(x.args) == 3:
        r = x.args[0]
        if isinstance(r, fx.Node) and r.op == "call_method" and r.target == "repeat" and len(r.args) == 4 \
                and r.args[1] == 1 and r.args[3] == 1 and isinstance(r.args[2], int):
            v = r.args[0]
            vs = shape_of(v)
            if isinstance(v, fx.Node) and v.op == "call_method" and v.target in ("view", "reshape") \
                    and vs is not None and len(vs) == 3 and int_value(vs[1]) == 1:
                x0 = v.args[0]
                x0s = shape_of(x0)
                if x0s is not None and len(x0s) == 2 and same(x0s[0], vs[0]) and same(x0s[1], vs[2]):
                    return x0, r.args[2]
    return None


def _score_column(graph, score, like):
    if score.column is None:
        return score.source
    return call(graph, operator.getitem, score.source, (slice(None), score.column), like=like)


def _summed_per_token(acc: fx.Node) -> bool:
    """``acc`` (assignment rows) is read as ``(acc.view(T, K, d) * w).sum(1)``: the two-level combine."""
    for v in acc.users:
        if v.op == "call_method" and v.target in ("view", "reshape") and len(v.users) == 1:
            m = next(iter(v.users))
            if _mul_operands(m) and len(m.users) == 1:
                s = next(iter(m.users))
                if s.op == "call_method" and s.target == "sum":
                    return True
    return False


def _remap(graph, ids, lo, E, ncls, like):
    """Expert ids relative to the looped range; ids outside it become -1 (dropped)."""
    if lo == 0 and ncls == E:
        return ids
    shifted = call(graph, operator.sub, ids, lo, like=like) if lo else ids
    inside = call(graph, operator.and_, call(graph, operator.ge, shifted, 0, like=like),
                  call(graph, operator.lt, shifted, E, like=like), like=like)
    return call(graph, torch.where, inside, shifted, -1, like=like)


def _taken_rows(graph, sel, like):
    """The rows a "rows" selection takes, flat: its mask, and under a capacity c only the first c of
    them, ``mask & (cumsum(mask) <= c)`` (``dispatch.capacity_rows``)."""
    m = method(graph, "reshape", sel.mask, -1, like=like)
    if sel.capacity is None:
        return m
    pos = call(graph, torch.cumsum, m, 0, like=like)
    return call(graph, operator.and_, m, call(graph, operator.le, pos, sel.capacity, like=like), like=like)


def _block(units, acc, x, layout, kind, start_kind, base, lo, E, act, scored, on, lift, order,
           all_units=None, identity=None, scale: float = 1.0, post=None, later=()) -> MoEBlock:
    """``units``: the MLP experts' units; ``all_units``: those and the identity experts' (whose
    writes go too), ``identity``: (first, end) of the identity experts' ids, or None; ``post``:
    (m, s) for the result scaled per token after the loop, ``m = acc * s`` (``combine.token_scale``):
    s is folded into each assignment's score and the fused op, emitted at m, replaces m."""
    all_units = units if all_units is None else all_units
    by_e = sorted(units, key=lambda u: u["sel"].expert)
    first = by_e[0]
    last_anchor = max((u["write"].anchor for u in all_units), key=order.__getitem__)
    mlp0 = first["mlp"]
    gated = mlp0.up is not None
    transposed = mlp0.transposed
    state: dict = {}
    device = x.meta["example_value"].device

    def build_weights(graph):
        def each(role, name):
            ws = [weight_node(graph, u["mlp"].weights()[role], last_anchor) for u in by_e]  # LoRA: merged
            if ws[0] is None:
                return []
            if name in transposed:
                ws = [method(graph, "t", w, like=last_anchor) for w in ws]
            return ws

        return ExpertWeights(gate=each(0, "gate"), up=each(1, "up"), down=each(2, "down"), b_gate=each(3, ""),
                             b_up=each(4, ""), b_down=each(5, ""))

    sel0 = first["sel"]
    if lift is not None:
        x_in, T_node = lift["x0"], lift["x0"]
    else:
        x_in = x

    def token_ids(graph):
        if lift is not None:
            t = method(graph, "size", lift["x0"], 0, like=last_anchor)
            ar = call(graph, torch.arange, t, device=device, like=last_anchor)
            return method(graph, "repeat_interleave", ar, lift["K"], like=last_anchor)
        t = method(graph, "size", x, 0, like=last_anchor)
        ar = call(graph, torch.arange, t, device=device, like=last_anchor)
        if layout == "pairs":
            return method(graph, "repeat_interleave", ar, method(graph, "size", sel0.routing, 1, like=last_anchor),
                          like=last_anchor)
        if state.get("single_value") is not None:
            return ar
        return method(graph, "repeat_interleave", ar, E, like=last_anchor)

    single_value = None
    if layout == "rows":
        vals = {u["sel"].value for u in units}
        if len(vals) == 1 and None not in vals:
            single_value = vals.pop()
    state["single_value"] = single_value
    ncls = sel0.num_classes

    def expert_ids(graph):
        if lift is not None:
            return _remap(graph, method(graph, "reshape", lift["ids"], -1, like=last_anchor), lo, E, ncls,
                          last_anchor)
        if layout == "pairs" and sel0.routing_kind == "ids":
            return _remap(graph, method(graph, "reshape", sel0.routing, -1, like=last_anchor), lo, E, ncls,
                          last_anchor)
        if layout == "pairs":  # (T, K, E) mask, at most one nonzero per row; an all-zero row is dropped
            m = sel0.routing
            nz = call(graph, operator.ne, m, 0, like=last_anchor)
            pos = method(graph, "argmax", method(graph, "to", nz, torch.int32, like=last_anchor), -1, like=last_anchor)
            ids = call(graph, torch.where, method(graph, "any", nz, -1, like=last_anchor), pos, -1, like=last_anchor)
            return _remap(graph, method(graph, "reshape", ids, -1, like=last_anchor), lo, E, ncls, last_anchor)
        masks = [_taken_rows(graph, u["sel"], last_anchor) for u in by_e]
        stacked = call(graph, torch.stack, masks, 1, like=last_anchor)                   # (R, E) bool
        state["routed"] = method(graph, "any", stacked, -1, like=last_anchor)
        if single_value is not None:
            return _remap(graph, method(graph, "reshape", single_value, -1, like=last_anchor), lo, E, ncls,
                          last_anchor)
        r = method(graph, "size", x, 0, like=last_anchor)
        cand = method(graph, "repeat", call(graph, torch.arange, E, device=device, like=last_anchor), r,
                      like=last_anchor)
        return call(graph, torch.where, method(graph, "reshape", stacked, -1, like=last_anchor), cand, -1,
                    like=last_anchor)

    def scores(graph):
        if lift is not None:
            return method(graph, "reshape", lift["w"], -1, like=last_anchor)
        if layout == "pairs":
            if scored:
                return method(graph, "reshape", first["score"].source, -1, like=last_anchor)
            n = call(graph, operator.mul, method(graph, "size", sel0.routing, 0, like=last_anchor),
                     method(graph, "size", sel0.routing, 1, like=last_anchor), like=last_anchor)
            return call(graph, torch.ones, n, dtype=dtype_of(x), device=device, like=last_anchor)
        if scored:
            srcs = [method(graph, "reshape", _score_column(graph, u["score"], last_anchor), -1, like=last_anchor)
                    for u in by_e]
            if single_value is not None and len({(u["score"].source, u["score"].column) for u in units}) == 1:
                s = srcs[0]
            elif single_value is not None:
                # one expert per row: its own expert's score
                stacked = call(graph, torch.stack, srcs, 1, like=last_anchor)
                s = method(graph, "sum", call(graph, torch.where, call(graph, torch.stack, [
                    _taken_rows(graph, u["sel"], last_anchor) for u in by_e], 1, like=last_anchor),
                    stacked, 0.0, like=last_anchor), -1, like=last_anchor)
            else:
                s = method(graph, "reshape", call(graph, torch.stack, srcs, 1, like=last_anchor), -1, like=last_anchor)
            return s
        n = method(graph, "size", x, 0, like=last_anchor)
        if single_value is None:
            n = call(graph, operator.mul, n, E, like=last_anchor)
        return call(graph, torch.ones, n, dtype=dtype_of(x), device=device, like=last_anchor)

    writes = [n for u in all_units for n in u["write"].nodes]

    def identity_rows(graph):
        """x[t] * sum_k w[t, k] [first <= ids[t, k] < end], in the dtype the loop's product had."""
        ids = sel0.routing
        hit = call(graph, operator.and_, call(graph, operator.ge, ids, identity[0], like=last_anchor),
                   call(graph, operator.lt, ids, identity[1], like=last_anchor), like=last_anchor)
        if scored:
            w = first["score"].source
            hit_w = call(graph, torch.where, hit, w, 0.0, like=last_anchor)
        else:
            hit_w = method(graph, "to", hit, dtype_of(x), like=last_anchor)
        per_token = method(graph, "sum", hit_w, -1, keepdim=True, like=last_anchor)
        return call(graph, operator.mul, x, per_token, like=last_anchor)

    def replace(out):
        graph = out.graph
        result = out
        with graph.inserting_before(out.next):
            if identity is not None:
                rows = identity_rows(graph)
                if dtype_of(rows) != dtype_of(result):
                    rows = method(graph, "to", rows, dtype_of(result), like=last_anchor)
                result = call(graph, operator.add, result, rows, like=last_anchor)
            if lift is None and dtype_of(result) != dtype_of(acc):
                result = method(graph, "to", result, dtype_of(acc), like=last_anchor)
            if lift is None and len(shape_of(acc)) > 2:
                result = method(graph, "reshape_as", result, acc, like=last_anchor)
            if lift is None:
                if kind == "add" and start_kind in ("copy", "base"):
                    result = call(graph, operator.add, base, result, like=last_anchor)
                elif kind == "assign" and start_kind != "empty":
                    keep = method(graph, "unsqueeze", state["routed"], -1, like=last_anchor)
                    other = base if start_kind == "copy" else 0.0
                    result = call(graph, torch.where, keep, result, other, like=last_anchor)
        if later and (result is out or result.target == "reshape_as"):  # written in place: not the op's output
            with graph.inserting_before(result.next):
                result = method(graph, "clone", result, like=last_anchor)
        if lift is not None:
            lift["anchor"].replace_all_uses_with(result)
            return
        if post is not None:
            post[0].replace_all_uses_with(result)
            return
        for u in list(acc.users):
            if u not in writes and order.get(u, -1) > order[last_anchor]:
                u.replace_input_with(acc, result)
        if start_kind == "base":
            # the sum reads the base itself, so the generic cleanup (which keeps writes into a tensor
            # someone reads) would keep the loop's writes: they are this block's, erase them here
            for w in sorted(writes, key=order.__getitem__, reverse=True):
                if not w.users:
                    graph.erase_node(w)

    sizes = size_asserts_of([u["gathered"] for u in all_units] + [n for u in all_units for n in u["sel"].nodes]
                            + [n for u in all_units for n in u["write"].nodes if n.target is operator.getitem],
                            (operator.getitem, operator.ge, operator.le, operator.lt, operator.gt))
    orphans = writes + sizes
    xs = shape_of(x_in)
    wd = shape_of(mlp0.down)
    n_dim = (wd[0] if "down" in transposed else wd[1]) if wd else None
    x_rows, fold = x_in, None
    if on == "input":
        # f(s * x): the fused op scales outputs, so it gets one pre-scaled row per candidate
        # assignment, x[token] * s (the very product the loop feeds its expert), with score 1, and
        # the rows of each token are summed afterwards
        need(lift is None, "scores: applied to the inputs of replicated rows that are summed afterwards")
        graph = x.graph
        with graph.inserting_before(last_anchor.next):
            flat_s = scores(graph)
            per = 1 if layout == "rows" and single_value is not None else (
                method(graph, "size", sel0.routing, 1, like=last_anchor) if layout == "pairs" else E)
            rep = x if per == 1 else method(graph, "repeat_interleave", x, per, 0, like=last_anchor)
            x_rows = call(graph, operator.mul, rep, method(graph, "unsqueeze", flat_s, -1, like=last_anchor),
                          like=last_anchor)
        fold = None if per == 1 else per

        def token_ids(graph):  # noqa: F811  (one row per candidate assignment)
            n = method(graph, "size", x_rows, 0, like=last_anchor)
            return call(graph, torch.arange, n, device=device, like=last_anchor)

        def scores(graph):  # noqa: F811
            n = method(graph, "size", x_rows, 0, like=last_anchor)
            return call(graph, torch.ones, n, dtype=dtype_of(x_rows), device=device, like=last_anchor)

        outer_replace = replace

        def replace(out):  # noqa: F811
            if fold is not None:
                graph = out.graph
                with graph.inserting_before(out.next):
                    d = method(graph, "size", out, -1, like=last_anchor)
                    out = method(graph, "sum", method(graph, "reshape", out, -1, fold, d, like=last_anchor), 1,
                                 like=last_anchor)
            outer_replace(out)
    if scale != 1.0:  # every expert's output times the same constant: the same as weights times it
        weight_scores = scores

        def scores(graph):  # noqa: F811
            return call(graph, operator.mul, weight_scores(graph), scale, like=last_anchor)

    if post is not None:  # (sum_a w_a f(x_t)) * s_t = sum_a (w_a s_t) f(x_t): s_t times each of t's scores
        unscaled = scores

        def scores(graph):  # noqa: F811
            per_token = method(graph, "reshape", post[1], -1, like=last_anchor)
            if layout == "pairs":
                per_token = method(graph, "repeat_interleave", per_token,
                                   method(graph, "size", sel0.routing, 1, like=last_anchor), like=last_anchor)
            return call(graph, operator.mul, unscaled(graph), per_token, like=last_anchor)

    K = int_value(shape_of(sel0.routing)[1]) if layout == "pairs" else (lift["K"] if lift is not None else 1)
    desc = f"dispatch={sel0.spelling}, experts={mlp0.spelling}, combine={first['write'].spelling}" + \
        (f", scores={first['score'].spelling}" if scored else "") + (", then a weighted per-token sum" if lift else "") + \
        (f", outputs scaled by {scale!r} in place" if scale != 1.0 else "") + \
        (f", then scaled per token by {post[1].name} (folded into the scores)" if post is not None else "")
    return MoEBlock(
        idiom=IDIOM, anchor=lift["anchor"] if lift is not None else last_anchor, x=x_rows,
        token_ids=token_ids, expert_ids=expert_ids, scores=scores,
        build_weights=build_weights, replace=replace, activation=act, interleaved=units[0]["mlp"].interleaved,
        num_experts=E, top_k=K, hidden=int_value(xs[1]) if int_value(xs[1]) is not None else xs[1],
        intermediate=int_value(n_dim) if n_dim is not None and int_value(n_dim) is not None else n_dim,
        dtype=dtype_of(x_in), insert_before=(lift["anchor"] if lift is not None else post[0] if post is not None else
                                             x_rows.next if x_rows is not x_in else last_anchor.next),
        orphans=orphans, location=acc, autocast_like=mlp0.gemm, parts=desc,
    )


def _passes_rows_through(write) -> bool:
    """``acc[i] = x[i]`` (rows of a tensor copied to the same rows of the result), after some expert
    units of the loop: labml's ``final_output[dropped, :] = x[dropped, :]`` for the tokens a capacity
    dropped. Not an expert unit: the rewrite keeps it as graph code working on the fused result."""
    if write.kind != "assign" or not isinstance(write.value, fx.Node):
        return False
    g = recognise("gather", write.value)
    return g is not None and safety.same_rows(g[1], write.index)


def find(gm: fx.GraphModule):
    """Yield (anchor node, MoEBlock or decline reason) for every per-expert loop in the graph."""
    groups: dict = defaultdict(list)
    declined: dict = {}
    claimed: set = set()
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method") or node in claimed:
            continue
        try:
            write = recognise("combine", node)
        except Declined:
            continue
        if write is None or not isinstance(write.acc, fx.Node):
            continue
        if write.kind == "assign" and dtype_of(write.index) == torch.bool \
                and (acc_start(write.acc) or ("",))[0] != "empty" and not _summed_per_token(write.acc):
            continue  # masked assignment into a zeros/copy buffer of tokens: the mask_dispatch composition
        claimed.update(write.nodes)
        if write.acc in declined:
            continue
        if groups.get(write.acc) and _passes_rows_through(write):
            continue  # stays graph code on the loop's result (analyse_group: _later_writes)
        try:
            groups[write.acc].append(analyse_unit(write))
        except Declined as e:
            if _has_gemm_upstream(write.value):
                declined[write.acc] = (node, str(e))
            groups.pop(write.acc, None)
    for acc, (node, reason) in declined.items():
        yield acc, reason
    for acc, units in groups.items():
        if acc in declined:
            continue
        if all(u["mlp"] is None for u in units) and not any(_has_gemm_upstream(u["write"].value) for u in units):
            continue  # only identity "experts" and no GEMM near: a weighted gather-and-add, not an MoE block
        try:
            yield units[-1]["write"].anchor, analyse_group(units, gm.graph)
        except Declined as e:
            yield units[-1]["write"].anchor, str(e)
