"""Idiom: boolean-mask dispatch with top-1 ("switch") routing. transformers 4.x Switch
Transformers and research code, unrolled by Dynamo into one ``setitem`` per expert::

    buf = hidden.clone()                    # or torch.zeros_like(hidden)   (B.., d)
    router_mask = one_hot(argmax(probs), E) * capacity_mask               # (B.., E)
    for e, expert in enumerate(experts):    # ModuleList / ModuleDict.values()
        m = router_mask.bool()[..., e]      # or (expert_index == e)         (B..,) bool
        buf[m] = expert(hidden[m])          # optionally w[m, None] * ..., .to(dtype)  <- anchor

expert(z) = down(act(up(z))) or down(act(gate(z)) * up(z)); linears with or without bias;
dropout that is the identity (eval mode, or p == 0) is allowed between them.

Semantics the rewrite must keep, and how it keeps them:

- A token in no mask keeps ``buf``'s initial value (its input for ``clone``, Switch's tokens over
  expert capacity; 0 for ``zeros``). The replacement is ``where(routed, fused, initial)`` with
  ``routed`` the OR of the very masks the model uses, so capacity dropping is reproduced exactly
  (and a non-finite expert output of an unrouted token cannot leak in through ``0 * y``).
- Assignment overwrites; it does not sum. The rewrite is exact only if no token is in two masks,
  which is proved from the graph: the masks are columns ``e`` of one tensor whose rows have at most
  one nonzero (``one_hot(i, E)``, optionally multiplied elementwise by anything of its shape, then
  ``.bool()``), or ``i == e`` for one index tensor and distinct constants. Otherwise: declined.
- The fused op gets one assignment per token: expert = position of the token's mask (argmax over
  the stacked masks; 0 for unrouted tokens, whose output the ``where`` discards), score = the
  router weight the model multiplies by inside the loop, or 1.0 (unrouted tokens get score 0).

Declined (with the reason), because the fused op would not compute the same thing:

- anything random or in place between the gathered tokens and the assigned value (dropout with
  p > 0 in training: NLLB-MoE's ``moe_token_dropout``, Switch's expert dropout; ``y *= 1 - p``);
- masks not provably disjoint (thresholds, top-k masks: later experts overwrite earlier ones);
- indexing other than ``buf[mask]`` (or ``buf[mask, :]``: trailing full slices), except NLLB-MoE
  4.x's per-expert slices ``buf[e, R[:, e]]`` of ``buf = einsum("bm,be->ebm", x, R)`` summed by
  ``buf.sum(0)`` (``analyse_slices`` below: K per token from R's definition, a sum of K terms each
  at most one nonzero per row, ``dispatch.at_most_k_per_row``);
- the loop reading the buffer it writes, the buffer written elsewhere, experts sharing weights,
  experts of different shapes or activations, router weights that differ between experts.

transformers 5.x Switch Transformers and NLLB-MoE loop over the data-dependent ``expert_hit``
(``nonzero``): Dynamo cannot capture that loop in one graph, so no idiom sees NLLB-MoE's blocks
(``moe_inductor.explain`` reports the graph break); Switch's loop is traced as a loop over
``range(num_experts)`` (``moe_inductor/dynamo/capture.py``) and rewritten by ``expert_loop``.

Shape legend: T tokens (flattened leading dims), d hidden, n expert intermediate, E experts.
"""
from __future__ import annotations

import math
import operator
from collections import defaultdict

import torch
import torch.fx as fx
from torch._inductor.pattern_matcher import KeywordArg as KA, is_match

from moe_inductor.fx.targets import LINEAR_FUNCTIONS
from moe_inductor.fx import safety
from moe_inductor.fx.build import call, method
from moe_inductor.fx.decline import Declined, need
from moe_inductor.fx.matching import (
    AnyOf, eq_constant, F, getitem, M, match_or_decline, nearest_upstream, size_asserts_of,
)
from moe_inductor.fx.nodes import is_mutation, node_order
from moe_inductor.fx.shapes import dtype_of, int_value, same, shape_of
from moe_inductor.recognize.parts import recognise, weight_node
from moe_inductor.lower.rewrite import ExpertWeights, gemm_name, MoEBlock
from . import combine as _combine
from . import dispatch as _dispatch
from . import experts as _experts  # noqa: F401  (registers the expert recognisers)
from .common import GATED_OF

IDIOM = "mask_dispatch"


# --------------------------------------------------------------------------- patterns

_LINEAR = LINEAR_FUNCTIONS
_ALL = slice(None, None, None)


def _setitem_pattern():
    return F(operator.setitem, KA("buf"), KA("mask"), KA("value"))


def _column_pattern():
    """m = R[..., e] for a rank-2 or rank-3 R."""
    return AnyOf(getitem(KA("rows"), (_ALL, KA("e"))), getitem(KA("rows"), (_ALL, _ALL, KA("e"))),
                 getitem(KA("rows"), (Ellipsis, KA("e"))))


def _bool_cast_pattern():
    return AnyOf(M("bool", KA("src")), M("to", KA("src"), torch.bool), M("to", KA("src"), dtype=torch.bool))


def _buffer_pattern():
    return AnyOf(M("clone", KA("src")), F(torch.clone, KA("src")), F(torch.zeros_like, KA("zeros_of")))


def _buffer_start(buf: fx.Node):
    """The tensor ``buf`` is a clone of, or None for zeros (``zeros_like``, ``new_zeros``,
    ``torch.zeros``); declines anything else."""
    if (buf.op == "call_method" and buf.target == "new_zeros") or \
            (buf.op == "call_function" and buf.target is torch.zeros):
        return None
    return match_or_decline(_buffer_pattern(), buf, "buffer (clone or zeros of the tokens)").get("src")


def _weighted_pattern():
    w = AnyOf(getitem(KA("weights"), (KA("wmask"), None)), M("unsqueeze", getitem(KA("weights"), KA("wmask")), -1),
              getitem(KA("weights"), KA("wmask")))
    return AnyOf(F(operator.mul, w, KA("expert_out")), F(operator.mul, KA("expert_out"), w))


def _gather_pattern():
    return getitem(KA("x"), KA("gmask"))


# --------------------------------------------------------------------------- one expert block
# (the expert MLP, identities, the purity of the expert path and one-hot rows are the shared parts:
# patterns/experts.py, moe_inductor/fx/safety.py, patterns/dispatch.py)

def _expert_mlp(out: fx.Node, gathered: fx.Node):
    """(activation, w_gate|w1, b_gate|b1, w_up, b_up, w_down, b_down, interleaved) of out = expert(gathered)."""
    m = recognise("experts", safety.strip_identity(out), required="expert MLP (linear -> activation [* linear] -> linear)")
    need(safety.equivalent(m.input, gathered), "expert MLP does not read the gathered tokens")
    need(not m.transposed, "expert weights are used transposed (z @ W): not the Linear layout this composition emits")
    return m.activation, m.gate, m.b_gate, m.up, m.b_up, m.down, m.b_down, m.interleaved


def _check_expert_path(value, gathered):
    safety.need_pure_path(value, gathered)


def _at_most_one_per_row(node) -> bool:
    return _dispatch.at_most_one_per_row(node) is not None


def _find_gather(value: fx.Node, index):
    """The ``x[index]`` (same index object) that ``value`` is computed from, or None."""
    stack, seen = [value], set()
    while stack:
        n = stack.pop()
        if n in seen or not isinstance(n, fx.Node):
            continue
        seen.add(n)
        if n.op == "call_function" and n.target is operator.getitem and len(n.args) == 2:
            idx = n.args[1]
            if idx is index or (isinstance(idx, tuple) and isinstance(index, tuple) and len(idx) == len(index)
                                and all(a is b for a, b in zip(idx, index))):
                return n
        if n.op in ("call_function", "call_method"):
            stack.extend(n.all_input_nodes)
    return None


def _mask_source(mask: fx.Node):
    """('rows', R, e) for m = R[..., e] with R's rows holding at most one nonzero,
    ('eq', i, e) for m = (i == e); declines anything else."""
    need(dtype_of(mask) == torch.bool, "index is not a boolean mask")
    col = _column_pattern().match(mask)
    if is_match(col):
        rows, e = col.kwargs["rows"], int_value(col.kwargs["e"])
        need(e is not None and e >= 0, "mask column is not a constant expert number")
        src = rows
        cast = _bool_cast_pattern().match(rows)
        if is_match(cast):
            src = cast.kwargs["src"]
        need(_at_most_one_per_row(src), "routing mask is not one-hot per token (masks may overlap: later "
                                         "experts overwrite earlier ones, not expressible as a sum)")
        return "rows", rows, e
    eq = eq_constant(mask)  # expert_index == e, in whichever spelling this torch's Dynamo records
    if eq is not None:
        return "eq", eq[0], eq[1]
    raise Declined("mask is neither a column of a one-hot routing mask nor expert_index == e "
                   "(masks not provably disjoint)")


def analyse_one(node: fx.Node) -> dict:
    si = match_or_decline(_setitem_pattern(), node, "masked assignment")
    buf, mask, value = si["buf"], _dispatch.rows_index(si["mask"]), si["value"]  # buf[mask, :]: buf[mask]
    need(isinstance(mask, fx.Node), "index is not a tensor")
    v = value
    if v.op == "call_method" and v.target == "to" and len(v.args) == 2 and isinstance(v.args[1], torch.dtype):
        v = v.args[0]  # setitem casts to the buffer's dtype anyway
    weights, out, wmask = None, v, mask
    w = _weighted_pattern().match(v)
    if is_match(w) and safety.equivalent(w.kwargs["wmask"], mask):
        weights, out, wmask = w.kwargs["weights"], w.kwargs["expert_out"], w.kwargs["wmask"]
        # w[mask] is (n,) for w of the mask's shape, (n, 1) for w with a trailing 1: the first must be
        # unsqueezed to scale rows (else it broadcasts against d)
        ws, ms = shape_of(weights), shape_of(mask)
        plain = any(a.target is operator.getitem and safety.equivalent(a.args[1], mask) for a in v.args
                    if isinstance(a, fx.Node))
        want = len(ms) + 1 if plain else len(ms)
        need(ws is not None and ms is not None and len(ws) == want and all(same(a, b) for a, b in zip(ws, ms))
              and (not plain or int_value(ws[-1]) == 1), "router weights are not one per token, per row")
    # the gathered tokens: the x[mask] that feeds the expert
    # the same mask, or one computed the same way (``x[M[:, :, e]]`` and ``buf[M[:, :, e]]`` are two
    # nodes): equal values when M is not written between them, which analyse_group proves from the
    # earliest of the masks (``start``)
    gathered, g = nearest_upstream(out, _gather_pattern(),
                                   lambda kw: safety.equivalent(_dispatch.rows_index(kw["gmask"]), mask))
    x = g["x"] if g else None
    need(x is not buf, "the loop reads the buffer it writes")
    need(gathered is not None, "assigned value is not computed from x[mask] with the same mask")
    _check_expert_path(value, gathered)
    kind, source, e = _mask_source(mask)
    mlp = _expert_mlp(out, gathered)
    mlp, extra = _down_bias_after(node, mlp, weights, out)
    gmask = _dispatch.rows_index(g["gmask"])
    return dict(node=node, buf=buf, mask=mask, gmask=gmask, wmask=wmask, x=x, gathered=gathered, weights=weights, kind=kind,
                source=source, e=e, mlp=mlp, extra=extra, end=extra[-1] if extra else node)


def _down_bias_after(node: fx.Node, mlp: tuple, weights, out: fx.Node):
    """(mlp, extra nodes): the expert's down bias when the assignment ``buf[m] = y`` is followed by
    ``buf[m] = buf[m] + b`` (``combine.bias_after_assign``: the pair writes ``y + b``) with ``b`` a
    1-D bias of the output width, or one (1, d) row of it (``experts.row_bias``); then
    ``down(h) + b`` is the expert's output, as the fused op computes it. Declined when the rows were
    already weighted by the router (``w * y + b`` is not ``w * (y + b)``), when the down projection
    has its own bias, when the expert's output ``out`` was cast to the buffer's dtype before the bias
    (the op adds the bias in the experts' dtype), or when what is added is not such a bias."""
    found = _combine.bias_after_assign(node)
    if found is None:
        return mlp, []
    b, read, added, end = found
    need(weights is None, f"experts: {added.name}: a bias added after the rows were weighted by the router "
                           f"(w * y + b, not w * (y + b))")
    need(mlp[6] is None, f"experts: {added.name}: a second down bias added to rows whose projection has one")
    need(dtype_of(out) == dtype_of(added), f"experts: {added.name}: the bias is added to the expert's output "
                                            f"after a cast to the buffer's dtype (the fused op adds it before)")
    bias = _experts.row_bias(b, read, added)
    need(bias is not None, f"experts: {added.name}: what is added to the assigned rows is not a bias of the "
                            f"output width in their dtype (B or B.view(1, -1) of a 1-D B)")
    return mlp[:6] + (bias,) + mlp[7:], [read, added, end]


# --------------------------------------------------------------------------- grouping and checks

def _experts_agree(members: list) -> tuple:
    """(activation, gated): every expert the same structure and shapes, each its own weights."""
    acts = {m["mlp"][0] for m in members}
    need(len(acts) == 1, f"experts use different activations {sorted(acts)}")
    act = acts.pop()
    need(len({m["mlp"][7] for m in members}) == 1, "some experts interleave gate and up columns and others not")
    for i in range(1, 7):
        present = {m["mlp"][i] is not None for m in members}
        need(len(present) == 1, "some experts have biases (or gates) and others not")
        if members[0]["mlp"][i] is not None:
            shapes = {tuple(map(str, shape_of(m["mlp"][i]) or ())) for m in members}
            need(len(shapes) == 1, "experts have weights of different shapes")
    need(len({m["mlp"][1] for m in members}) == len(members) and len({m["mlp"][5] for m in members}) == len(members),
          "experts share weights: not an MoE (each iteration must use its own expert's weights)")
    return act, act in GATED_OF.values()


def _member_weights(members: list, gated: bool):
    """``build_weights`` of a group: the per-expert Linear weights and biases themselves (``ExpertWeights``;
    the fused op stacks them transiently), from each member's ``mlp`` tuple."""
    first = members[0]

    def build_weights(graph):
        def each(i):
            return [weight_node(graph, m["mlp"][i]) for m in members] if first["mlp"][i] is not None else []

        return ExpertWeights(gate=each(1), up=each(3) if gated else [], down=each(5),
                             b_gate=each(2), b_up=each(4) if gated else [], b_down=each(6))

    return build_weights


def analyse_group(members: list, graph: fx.Graph) -> MoEBlock:
    order = node_order(graph)
    members = sorted(members, key=lambda m: order[m["node"]])
    first, last = members[0], members[-1]
    buf, x, source, kind = first["buf"], first["x"], first["source"], first["kind"]
    need(all(m["source"] is source and m["kind"] == kind for m in members),
          "experts are selected by masks from different routing tensors")
    experts = [m["e"] for m in members]
    need(len(set(experts)) == len(experts), f"an expert mask is used twice ({experts})")
    need(all(m["x"] is x for m in members), "experts read different token tensors")
    need(x is not buf, "experts read the buffer they write")
    ws = {m["weights"] for m in members}
    need(len(ws) == 1, "experts are weighted by different router tensors (or only some are weighted)")
    weights = ws.pop()
    act, gated = _experts_agree(members)
    if kind == "rows":
        rs = shape_of(source)
        need(rs is not None and all(0 <= e and (int_value(rs[-1]) is None or e < int_value(rs[-1])) for e in experts),
              "expert numbers outside the routing mask")

    # the buffer: a fresh clone / zeros of (T.., d), written only by this loop, not read inside it
    init = _buffer_start(buf)
    bs, xs, ms = shape_of(buf), shape_of(x), shape_of(first["mask"])
    need(bs is not None and xs is not None and ms is not None and len(bs) == len(ms) + 1 and len(xs) == len(bs)
          and all(same(a, b) for a, b in zip(bs, xs)) and all(same(a, b) for a, b in zip(bs, ms)),
          "buffer, tokens and masks do not have shapes (T.., d), (T.., d), (T..)")
    for m in members:
        need(all(same(a, b) for a, b in zip(shape_of(m["mask"]) or (), ms)), "masks of different shapes")
    nodes = {m["node"] for m in members} | {n for m in members for n in m["extra"]}
    anchor = last["end"]  # the last write of the loop (a bias added after the assignment: its second write)
    writes = {u for u in buf.users if is_mutation(u, buf)}
    need(writes == {m[k] for m in members for k in ("node", "end")},
          "buffer is modified by something other than the expert loop")
    for u in buf.users:
        need(u in nodes or order[u] > order[anchor], "buffer is read or aliased inside the loop")
    if init is not None:
        need(safety.mutated_between(init, buf, anchor) is None, "cloned input is modified inside the loop")
        need(same_shape(init, buf) and dtype_of(init) == dtype_of(buf), "clone source is not the buffer's shape")
    start = min((m[k] for m in members for k in ("mask", "gmask", "wmask")), key=order.__getitem__)
    for tensor in (x, source, weights):
        need(tensor is None or safety.mutated_between(tensor, start, anchor) is None,
              "tokens or routing are modified in place inside the loop")
    # a down bias added through the buffer is read by the fused op after the loop, not where it was added
    safety.need_unmodified([m["mlp"][6] for m in members if m["extra"]], start, anchor, "experts: a down bias")

    # (a fused gate|up weight, up None, has one bias for both halves)
    need(not gated or first["mlp"][3] is None or (first["mlp"][2] is None) == (first["mlp"][4] is None),
          "gate and up projections differ in having a bias")
    E = len(members)
    wd_shape = shape_of(first["mlp"][5])
    post = _folded_scale(buf, nodes, x, init, kind, source, experts, ms)
    if post is not None and any(t is not None and safety.mutated_between(t, start, post[0]) is not None
                                for t in (x, source, weights, *(m["mask"] for m in members))):
        post = None  # something the fused op reads changes before the scale: not folded
    insert_point = post[0] if post is not None else anchor.next
    with graph.inserting_before(insert_point):
        d = method(graph, "size", x, -1, like=anchor)
        x2 = method(graph, "reshape", x, -1, d, like=anchor)
    state: dict = {}

    build_weights = _member_weights(members, gated)

    def token_ids(graph):
        t = method(graph, "size", x2, 0, like=anchor)
        return call(graph, torch.arange, t, device=x.meta["example_value"].device, like=anchor)

    def expert_ids(graph):
        flat = [method(graph, "reshape", m["mask"], -1, like=anchor) for m in members]
        masks = call(graph, torch.stack, flat, -1, like=anchor)                       # (T, E) bool
        state["routed"] = method(graph, "any", masks, -1, like=anchor)               # (T,) bool
        return method(graph, "argmax", method(graph, "to", masks, torch.int32, like=anchor), -1, like=anchor)

    def scores(graph):
        routed = state["routed"]
        if weights is None:
            s = method(graph, "to", routed, dtype_of(x2), like=anchor)
        else:
            s = call(graph, torch.where, routed, method(graph, "reshape", weights, -1, like=anchor), 0.0, like=anchor)
        if post is not None:  # (w_t f(x_t)) * s_t = (w_t s_t) f(x_t)
            s = call(graph, operator.mul, s, method(graph, "reshape", post[1], -1, like=anchor), like=anchor)
        return s

    def replace(out):
        graph = out.graph
        with graph.inserting_before(out.next):
            if dtype_of(out) != dtype_of(buf):
                out = method(graph, "to", out, dtype_of(buf), like=anchor)
            keep = method(graph, "unsqueeze", state["routed"], -1, like=anchor)
            if init is None:
                merged = call(graph, torch.where, keep, out, 0.0, like=anchor)
            else:
                merged = call(graph, torch.where, keep, out, method(graph, "reshape", init, -1, d, like=anchor),
                              like=anchor)
            result = method(graph, "reshape_as", merged, x, like=anchor)
        if post is not None:
            post[0].replace_all_uses_with(result)
            return
        for u in list(buf.users):
            if u not in nodes and order.get(u, -1) > order[anchor]:
                u.replace_input_with(buf, result)

    # runtime asserts Dynamo added about the sizes of the x[mask] gathers die with the loop
    orphans = list(nodes) + size_asserts_of([m["gathered"] for m in members],
                                            (operator.ge, operator.le, operator.lt, operator.gt))
    xs2 = shape_of(x)
    return MoEBlock(
        idiom=IDIOM, anchor=anchor, x=x2, token_ids=token_ids, expert_ids=expert_ids, scores=scores,
        build_weights=build_weights, replace=replace, activation=act, interleaved=first["mlp"][7], num_experts=E,
        top_k=1,
        hidden=int_value(xs2[-1]) if int_value(xs2[-1]) is not None else xs2[-1],
        intermediate=int_value(wd_shape[1]) if wd_shape and int_value(wd_shape[1]) is not None else None,
        dtype=dtype_of(x), insert_before=insert_point, orphans=orphans, location=buf,
        autocast_like=gemm_name(_LINEAR[0]),  # the experts are nn.Linear calls
        parts=f"then scaled per token by {post[1].name} (folded into the scores)" if post is not None else "",
    )


def _folded_scale(buf, writes, x, init, kind, source, experts, mask_shape):
    """(m, s): ``m = buf * s`` scales the (T, d) result per token after the loop
    (``combine.token_scale``), folded into the scores when exact: the buffer starts at zeros and
    every token is in one mask (masks ``v == e`` for v provably in [0, E), ``dispatch.topk_columns``,
    v of the masks' shape, the loop over experts 0..E-1): a token in none would be ``0 * s_t``."""
    if init is not None or kind != "eq" or _dispatch.topk_columns(source) != len(experts) \
            or sorted(experts) != list(range(len(experts))):
        return None
    vs = shape_of(source)
    if vs is None or len(vs) != len(mask_shape) or not all(same(a, b) for a, b in zip(vs, mask_shape)):
        return None
    return _combine.token_scale(buf, writes, x)


# --------------------------------------------------------------------------- per-expert slices (NLLB-MoE 4.x)
#
#     buf = einsum("bm,be->ebm", x, R)             # (E, T, d): slice e is x * R[:, e, None]
#     for e, expert in enumerate(experts):
#         m = R[:, e]
#         buf[e, m] = einsum("b,be->be", W[m, e], c * expert(buf[e, m]))     (W, c optional)
#     out = buf.sum(0)
#
# Parts: dispatch ``buf[e, R[:, e]]`` read before slice e is written is x[R[:, e]] * 1 = x's rows
# (``dispatch.masked_copies``); scores ``W[m, e]`` (``dispatch.slice_score``) and a constant c on the
# expert's fresh output, folded into the scores; combine: every slice 0..E-1 written once at the rows
# it was read at, its other rows x * 0 = 0, so ``buf.sum(0)[t] = sum over e with R[t, e] of
# W[t, e] c f_e(x[t])``: the fused op over (t, e) for the nonzeros of R's row t, at most K of them
# (``dispatch.at_most_k_per_row``), taken as ``topk(R.int(), K)`` with expert -1 (nothing added) for the
# slots topk fills with a false column.

def _constant_factor(v: fx.Node) -> tuple:
    """(c, y) for ``v = y * c`` / ``c * y`` with c a finite Python number (the normal form's
    spelling of ``y *= c`` on a fresh y: NLLB-MoE's eval ``*= 1 - moe_token_dropout``); (1.0, v)."""
    if (v.op == "call_function" and v.target in (operator.mul, torch.mul)) or (v.op == "call_method" and v.target == "mul"):
        if len(v.args) == 2 and not v.kwargs:
            for y, c in (v.args, v.args[::-1]):
                if isinstance(y, fx.Node) and isinstance(c, (int, float)) and not isinstance(c, bool) \
                        and math.isfinite(c):
                    return float(c), y
    return 1.0, v


def analyse_slice(node: fx.Node) -> dict:
    """One expert's write ``buf[e, R[:, e]] = [W[m, e] *] [c *] expert(buf[e, m])`` (raises Declined)."""
    buf, index, value = node.args
    found = _dispatch.masked_copies(buf)
    need(found is not None, "dispatch: buf[e, mask] writes into a buffer that is not einsum('bm,be->ebm', x, R) "
                            "of the tokens and a boolean (T, E) routing mask")
    x, R = found
    e, mask = _dispatch.slice_index(index)
    col = _column_pattern().match(mask)
    need(is_match(col) and safety.equivalent(col.kwargs["rows"], R) and int_value(col.kwargs["e"]) == e,
         f"dispatch: slice {e} is written at rows that are not column {e} of the routing mask R of the buffer")
    v = value
    if v.op == "call_method" and v.target == "to" and len(v.args) == 2 and isinstance(v.args[1], torch.dtype):
        v = v.args[0]  # setitem casts to the buffer's dtype anyway
    weights, out = None, v
    sc = _dispatch.slice_score(v)
    if sc is not None:
        weights, wmask, we, out = sc
        need(we == e and safety.equivalent(wmask, mask), f"scores: slice {e} is weighted by W[m, {we}] at another "
                                                         "mask or expert than it is written at")
        need(same_shape(weights, R), "scores: the router weights are not (T, E) like the routing mask")
    scale, out = _constant_factor(out)

    def own_slice(kw):
        g = _dispatch.slice_index(kw["gmask"])
        return kw["x"] is buf and g is not None and g[0] == e and safety.equivalent(g[1], mask)

    gathered, _ = nearest_upstream(out, _gather_pattern(), own_slice)
    need(gathered is not None,
         f"dispatch: expert {e} does not read slice {e} of the buffer at the rows its output is written at")
    _check_expert_path(value, gathered)
    mlp = _expert_mlp(out, gathered)
    return dict(node=node, buf=buf, x=x, R=R, e=e, mask=mask, gathered=gathered, weights=weights, scale=scale,
                mlp=mlp, slices=True)


def _sum_over_experts(node: fx.Node, buf: fx.Node) -> bool:
    """``buf.sum(0)`` / ``buf.sum(dim=0)`` / ``torch.sum(buf, 0)`` (no keepdim, no dtype)."""
    if not ((node.op == "call_method" and node.target == "sum") or (node.op == "call_function" and node.target is torch.sum)):
        return False
    if node.args[:1] != (buf,) or set(node.kwargs) - {"dim"}:
        return False
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) == 2 else None)
    return len(node.args) <= 2 and (dim == 0 or dim == (0,) or dim == [0])


def analyse_slices(members: list, graph: fx.Graph) -> MoEBlock:
    order = node_order(graph)
    members = sorted(members, key=lambda m: order[m["node"]])
    first, last = members[0], members[-1]
    buf, x, R = first["buf"], first["x"], first["R"]
    E = int_value((shape_of(R) or (None,))[-1])
    bs = shape_of(buf)
    need(E is not None and bs is not None and int_value(bs[0]) == E, "dispatch: the routing mask's expert count "
                                                                    "is not a constant")
    experts = sorted(m["e"] for m in members)
    need(experts == list(range(E)), f"combine: the loop writes slices {experts}, not each of the {E} slices once "
                                    "(an unwritten slice keeps x at its routed rows)")
    ws = {m["weights"] for m in members}
    need(len(ws) == 1, "scores: experts are weighted by different router tensors (or only some are weighted)")
    weights = ws.pop()
    scales = {m["scale"] for m in members}
    need(len(scales) == 1, f"scores: the experts scale their outputs by different constants {sorted(scales)}")
    scale = scales.pop()
    act, gated = _experts_agree(members)
    K = _dispatch.at_most_k_per_row(R)
    need(K is not None and K[0] == E, "dispatch: the routing mask's rows are not provably at most K nonzeros (a sum "
                                      "of K terms each at most one per row: one_hot(i, E) times factors)")
    _, K, finite = K
    # A non-finite float factor makes 0 * inf = nan, a nonzero: the row may then hold more than K. Only
    # such a factor can, and the nan lands in W's row when the experts are weighted by the very tensor W
    # that R is the nonzero pattern of (nan + anything is nan): eager then adds nan * f to that token's
    # output, which is nan. The fused op gets nan scores for a row with more than K nonzeros, so it
    # gives nan there too; every other row is exact.
    need(not finite or (weights is not None and _dispatch.nonzero_pattern_of(R) is weights),
         "dispatch: the routing mask counts at most K experts per token only for finite router factors, and the "
         "experts are not weighted by the tensor it is the nonzero pattern of")
    anchor = last["node"]
    gathers, writes = {m["gathered"] for m in members}, {m["node"] for m in members}
    rest = [u for u in buf.users if u not in gathers and u not in writes]
    need(len(rest) == 1 and _sum_over_experts(rest[0], buf) and order[rest[0]] > order[anchor],
         "combine: the buffer is read by something other than the experts' slices and one buf.sum(0) after the loop")
    total = rest[0]
    safety.need_unmodified([x, R, weights], buf, total, "dispatch: the tokens or the routing")
    safety.need_unmodified([_dispatch.nonzero_pattern_of(R)], R, total, "dispatch: the routing weights")
    wd_shape = shape_of(first["mlp"][5])
    k = min(K, E)
    state: dict = {}

    build_weights = _member_weights(members, gated)

    def token_ids(graph):
        t = method(graph, "size", x, 0, like=anchor)
        rows = call(graph, torch.arange, t, device=x.meta["example_value"].device, like=anchor)
        return method(graph, "repeat_interleave", rows, k, like=anchor)

    def expert_ids(graph):
        top = call(graph, torch.topk, method(graph, "to", R, torch.int32, like=anchor), k, -1, like=anchor)
        state["top"] = call(graph, operator.getitem, top, 1, like=anchor)                  # (T, k)
        state["valid"] = call(graph, torch.gather, R, -1, state["top"], like=anchor)       # (T, k) bool
        ids = call(graph, torch.where, state["valid"], state["top"], -1, like=anchor)
        return method(graph, "reshape", ids, -1, like=anchor)

    def scores(graph):
        valid = state["valid"]
        if weights is None:
            s = method(graph, "to", valid, dtype_of(x), like=anchor)
        else:
            w = call(graph, torch.gather, weights, -1, state["top"], like=anchor)
            s = call(graph, torch.where, valid, w, 0.0, like=anchor)
        if scale != 1.0:  # W (c f) = (W c) f: the constant folded into the scores
            s = call(graph, operator.mul, s, scale, like=anchor)
        if finite:  # a row with more than K nonzeros (a non-finite router factor): nan, as in eager
            count = method(graph, "sum", R, -1, keepdim=True, like=anchor)
            over = call(graph, operator.gt, count, k, like=anchor)
            s = call(graph, torch.where, over, float("nan"), s, like=anchor)
        return method(graph, "reshape", s, -1, like=anchor)

    def replace(out):
        with out.graph.inserting_before(out.next):
            if dtype_of(out) != dtype_of(total):
                out = method(out.graph, "to", out, dtype_of(total), like=anchor)
        total.replace_all_uses_with(out)

    orphans = list(writes) + list(gathers) + size_asserts_of(
        [m["gathered"] for m in members] + [u for m in members for u in m["mask"].users],
        (operator.ge, operator.le, operator.lt, operator.gt))
    return MoEBlock(
        idiom=IDIOM, anchor=anchor, x=x, token_ids=token_ids, expert_ids=expert_ids, scores=scores,
        build_weights=build_weights, replace=replace, activation=act, interleaved=first["mlp"][7], num_experts=E,
        top_k=k, hidden=int_value(bs[-1]) if int_value(bs[-1]) is not None else bs[-1],
        intermediate=int_value(wd_shape[1]) if wd_shape and int_value(wd_shape[1]) is not None else None,
        dtype=dtype_of(x), insert_before=total, orphans=orphans, location=buf,
        autocast_like=gemm_name(_LINEAR[0]),
        parts=f"per-expert slices of einsum('bm,be->ebm', x, R) summed over the experts, at most {K} per token"
              + (f", outputs scaled by {scale} (folded into the scores)" if scale != 1.0 else ""),
    )


def same_shape(a, b) -> bool:
    sa, sb = shape_of(a), shape_of(b)
    return sa is not None and sb is not None and len(sa) == len(sb) and all(same(p, q) for p, q in zip(sa, sb))


def is_candidate(node: fx.Node) -> bool:
    """A setitem of a tensor value whose index is, or holds, a boolean tensor (a masked fill with a
    constant, ``out[out == 0] = eps``, writes no expert output: not a candidate)."""
    if node.op != "call_function" or node.target is not operator.setitem or len(node.args) != 3:
        return False
    if not isinstance(node.args[2], fx.Node):
        return False
    idx = node.args[1]
    parts = idx if isinstance(idx, (tuple, list)) else (idx,)
    return any(isinstance(p, fx.Node) and dtype_of(p) == torch.bool for p in parts)


def find(gm: fx.GraphModule):
    """Yield (anchor node, MoEBlock or decline reason) for every boolean-mask dispatch loop."""
    groups, declined = defaultdict(list), {}
    for node in gm.graph.nodes:
        if not is_candidate(node):
            continue
        buf = node.args[0]
        if buf in declined:
            continue
        if isinstance(buf, fx.Node) and ((buf.op == "call_function" and buf.target in (torch.empty, torch.empty_like))
                                         or (buf.op == "call_method" and buf.target == "new_empty")):
            continue  # assignments into an empty buffer: the per_expert composition
        if _combine.indexed_iadd(node) is not None:
            continue  # out[m] = out[m] + y: an accumulation, the per_expert composition
        try:
            if _dispatch.slice_index(node.args[1]) is not None and _dispatch.masked_copies(buf) is not None:
                info = analyse_slice(node)  # buf[e, R[:, e]] of einsum("bm,be->ebm", x, R): NLLB-MoE 4.x
            elif isinstance(node.args[1], (tuple, list)) and _dispatch.rows_index(node.args[1]) is None:
                value, gathered = node.args[2], _find_gather(node.args[2], node.args[1])
                if isinstance(value, fx.Node) and gathered is not None:
                    _check_expert_path(value, gathered)
                raise Declined("index is not a single boolean mask (buf[e, mask] is read only as a slice of "
                               "einsum('bm,be->ebm', x, R), the NLLB-MoE 4.x layout)")
            else:
                info = analyse_one(node)
        except Declined as e:
            declined[buf] = (node, str(e))
            groups.pop(buf, None)
            continue
        groups[buf].append(info)
    for buf, (node, reason) in declined.items():
        yield (buf if isinstance(buf, fx.Node) else node), reason
    for members in groups.values():
        try:
            analyse = analyse_slices if members[0].get("slices") else analyse_group
            need(len({bool(m.get("slices")) for m in members}) == 1, "combine: the buffer is written both as "
                                                                     "slices buf[e, mask] and through row masks")
            yield members[-1]["node"], analyse(members, gm.graph)
        except Declined as e:
            yield members[-1]["node"], str(e)
