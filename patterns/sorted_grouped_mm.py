"""Idiom: sort by expert, gather, grouped GEMM, gated activation, grouped GEMM, weight,
inverse permutation, per-token sum (transformers 5.x "grouped_mm" experts, the default of 64
MoE families)::

    expert_ids_g, perm = torch.sort(top_k_index.reshape(-1))          # (A,) A = T*K
    x_g = hidden[perm // K]                                           # (A, d)
    offsets = cumsum(histc(expert_ids_g.float(), bins=E, min=0, max=E-1), dtype=int32)
    h = grouped_mm(x_g, gate_up_proj.transpose(-2, -1), offs=offsets) # (A, 2n)
    a = act(h.chunk(2, -1)[0]) * h.chunk(2, -1)[1]                    # (A, n)
    y = grouped_mm(a, down_proj.transpose(-2, -1), offs=offsets)      # (A, d)
    w = y * top_k_weights.reshape(-1)[perm].unsqueeze(-1)
    inv_perm = empty_like(perm); inv_perm[perm] = arange(A)
    out = w[inv_perm].view(T, K, d).sum(dim=1)                        # anchor, (T, d)

Replacement: fused_moe(hidden, arange(T).repeat_interleave(K), top_k_index.reshape(-1),
top_k_weights.reshape(-1), W1, W2) where W1/W2 are the GEMM weight operands transposed back
(views, no copies). Safety (``can_rewrite``): every structural link is checked to be the same
node (one sort, one perm, one offsets), the counts are a full histogram over exactly E bins, the
sizes agree symbolically (A == T*K, rows of hidden == T, weight shapes), and no intermediate is
modified in place (expert-parallel ``clamp_`` is declined) except, after each grouped GEMM, one
``out.add_(bias[expert_ids_g])`` with the sort's own expert ids: that is the per-expert bias
b1/b2 of the fused op (``common.expert_bias``), and the add_ is erased with the block.

GPT-OSS (transformers ``GptOssExperts``): weights stored transposed (E, d, 2n) / (E, n, d) and
used directly as GEMM operands, the biases above, and its clamped gate on interleaved columns
(``common.gptoss_activation``) -> activation "gptoss:<alpha>:<limit>", interleaved=True.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch._inductor.pattern_matcher import KeywordArg as KA, is_match

from moe_inductor.activations import parse_activation
from moe_inductor.rewrite import (
    AnyOf, Declined, F, M, MoEBlock, getitem, call, method, is_mutation, match_or_decline, need as _need, same,
    shape_of, int_value, dtype_of, to_sympy, gemm_name,
)
from .common import GATED_OF, after_gemm_reason, expert_activation, expert_bias, grouped_mm

IDIOM = "sorted_grouped_mm"


def _combine_pattern():
    back = getitem(KA("weighted"), KA("inv_perm"))
    views = [M(v, back, KA("T"), KA("K"), KA("d")) for v in ("view", "reshape")]
    return AnyOf(*[M("sum", v, dim=1) for v in views], *[M("sum", v, 1) for v in views])


def _weighted_pattern():
    scale = M("unsqueeze", getitem(KA("sample_weights"), KA("perm")), -1)
    return AnyOf(F(operator.mul, KA("down_out"), scale), F(operator.mul, scale, KA("down_out")))


def _offsets_pattern():
    sorted_ids = getitem(KA("sort"), 0)
    counts = AnyOf(
        F(torch.histc, M("float", sorted_ids), bins=KA("bins"), min=KA("lo"), max=KA("hi")),
        F(torch.histc, M("int", sorted_ids), bins=KA("bins"), min=KA("lo"), max=KA("hi")),
        F(torch.histc, M("to", sorted_ids, KA("_c")), bins=KA("bins"), min=KA("lo"), max=KA("hi")),
        F(torch.bincount, sorted_ids, minlength=KA("bins")),
    )
    return AnyOf(F(torch.cumsum, counts, dim=0, dtype=torch.int32), F(torch.cumsum, counts, 0, dtype=torch.int32))


def _match(pattern, node, what):
    return match_or_decline(pattern, node, what, detail=True)


def is_candidate(node: fx.Node) -> bool:
    """Cheap pre-filter: the per-token sum of a sorted grouped-GEMM block."""
    return node.op == "call_method" and node.target == "sum" and is_match(_combine_pattern().match(node))


def analyse(node: fx.Node) -> MoEBlock:
    """Recognise the block ending at ``node`` or raise Declined with the reason."""
    c = _match(_combine_pattern(), node, "per-token combine")
    T, K, d = c["T"], c["K"], c["d"]
    inv = c["inv_perm"]
    _need(isinstance(inv, fx.Node) and inv.op == "call_function" and inv.target is torch.empty_like,
          "inverse permutation is not empty_like(perm) filled by setitem")
    perm = inv.args[0]
    setters = [u for u in inv.users if u.op == "call_function" and u.target is operator.setitem]
    _need(len(setters) == 1 and len(inv.users) == 2, "inverse permutation has other users or writers")
    s = setters[0]
    _need(s.args[1] is perm, "inverse permutation is not indexed by the sort permutation")
    ar = s.args[2]
    _need(isinstance(ar, fx.Node) and ar.target is torch.arange and len(ar.args) == 1
          and same(ar.args[0], shape_of(perm)[0]), "inverse permutation is not filled with arange(A)")

    w = _match(_weighted_pattern(), c["weighted"], "routing-weight multiply")
    _need(w["perm"] is perm, "routing weights are permuted differently from the tokens")
    sample_weights = w["sample_weights"]

    if not is_match(grouped_mm("act_out", "w_down", "offsets", "cast2").match(w["down_out"])):
        why = after_gemm_reason(w["down_out"], lambda n: is_match(grouped_mm("a", "w", "o", "c").match(n)))
        _need(why is None, why)
    down = _match(grouped_mm("act_out", "w_down", "offsets", "cast2"), w["down_out"], "down-projection grouped GEMM")
    offsets = down["offsets"]
    act_out = down["act_out"]

    # activation: GPT-OSS clamped gate (interleaved), act(gate) * up over chunk(2), or act(h)
    activation, interleaved, up_out = expert_activation(act_out)

    up = _match(grouped_mm("gathered", "w_up", "offsets", "cast1"), up_out, "up-projection grouped GEMM")
    _need(up["offsets"] is offsets, "the two grouped GEMMs use different expert offsets")
    g = _match(getitem(KA("hidden"), F(operator.floordiv, KA("perm"), KA("K"))), up["gathered"], "token gather")
    _need(g["perm"] is perm, "tokens are gathered with a different permutation")
    _need(int_value(g["K"]) is not None and same(g["K"], K), "gather stride differs from top-k")
    hidden = g["hidden"]

    _need(perm.op == "call_function" and perm.target is operator.getitem and perm.args[1] == 1,
          "permutation is not the sort's indices")
    sort = perm.args[0]
    _need(sort.op == "call_function" and sort.target is torch.sort and len(sort.args) == 1
          and not sort.kwargs.get("descending", False), "permutation does not come from torch.sort(expert_ids)")
    expert_ids = sort.args[0]
    o = _match(_offsets_pattern(), offsets, "per-expert offsets")
    _need(o["sort"] is sort, "offsets are counted from another sort")

    # shapes (sympy): A = T*K, hidden (T, d), W_up (E, d, h), W_down (E, n, d)
    wu, wd = shape_of(up["w_up"]), shape_of(down["w_down"])
    hs, es, ss = shape_of(hidden), shape_of(expert_ids), shape_of(sample_weights)
    _need(None not in (wu, wd, hs, es, ss), "shapes unknown")
    _need(len(wu) == 3 and len(wd) == 3 and len(hs) == 2 and len(es) == 1 and len(ss) == 1,
          "unexpected ranks of weights or routing")
    E = int_value(wu[0])
    _need(E is not None and same(wd[0], E), "number of experts unknown or inconsistent")
    bins = int_value(o["bins"])
    _need(bins == E, f"offsets histogram has {bins} bins for {E} experts")
    if "lo" in o:
        _need(o["lo"] == 0 and o["hi"] == E - 1, "offsets histogram range is not [0, E-1]")
    A = es[0]
    _need(same(A, ss[0]) and same(A, (shape_of(perm) or [None])[0]), "routing lengths differ")
    _need(same(A, to_sympy(T) * to_sympy(K)) if to_sympy(T) is not None and to_sympy(K) is not None else False,
          "number of assignments is not T*K")
    _need(same(hs[0], T), "gathered tensor has more rows than tokens")
    _need(same(hs[1], d) and same(wu[1], d) and same(wd[2], d), "hidden sizes disagree")
    n = wd[1]
    gated = parse_activation(activation).gated
    _need(same(wu[2], 2 * n if gated else n), "up-projection width does not match the activation")
    out_shape = shape_of(node)
    _need(out_shape is not None and len(out_shape) == 2 and same(out_shape[0], T) and same(out_shape[1], d),
          "per-token combine does not give (T, d)")

    # per-expert biases: out.add_(bias[expert_ids_g]) right after each grouped GEMM (GPT-OSS)
    def sorted_ids(ids):
        return ids.op == "call_function" and ids.target is operator.getitem and ids.args == (sort, 0)

    b1, add_b1 = expert_bias(up_out, sorted_ids, E, "up-projection output")
    b2, add_b2 = expert_bias(w["down_out"], sorted_ids, E, "down-projection output")
    for b in (b1, b2):
        _need(b is None or dtype_of(b) == dtype_of(up["w_up"]), "expert biases and weights differ in dtype")
    bias_adds = [a for a in (add_b1, add_b2) if a is not None]

    # nothing else in the block is modified in place (expert-parallel clamp_, ...)
    for name, v in (("up-projection output", up_out), ("down-projection output", w["down_out"]),
                    ("sorted expert ids", getitem_of(sort, 0)), ("gathered tokens", up["gathered"])):
        if v is None:
            continue
        for user in v.users:
            _need(user in bias_adds or not is_mutation(user, v), f"{name} is modified in place by {user.format_node()}")

    top_k_weights = sample_weights
    w_up, w_down = up["w_up"], down["w_down"]

    def token_ids(graph):
        t = method(graph, "size", hidden, 0, like=node)
        ar = call(graph, torch.arange, t, device=hidden.meta["example_value"].device, like=node)
        return method(graph, "repeat_interleave", ar, int_value(K), like=node)

    def untranspose(w):
        # the GEMM operand is weight.transpose(-2, -1) (transformers' default layout): use the
        # stored weight itself; otherwise (is_transposed storage) a transposed view of it
        if w.op == "call_method" and w.target == "transpose" and tuple(w.args[1:]) in ((-2, -1), (1, 2), (-1, -2), (2, 1)):
            return w.args[0]
        return method(node.graph, "transpose", w, -2, -1, like=node)

    def build_weights(graph):
        return untranspose(w_up), untranspose(w_down), b1, b2

    def replace(out):
        node.replace_all_uses_with(out)
        node.graph.erase_node(node)

    return MoEBlock(
        idiom=IDIOM, anchor=node, x=hidden,
        token_ids=token_ids, expert_ids=lambda graph: expert_ids, scores=lambda graph: top_k_weights,
        build_weights=build_weights, replace=replace, activation=activation, interleaved=interleaved,
        num_experts=E, top_k=int_value(K), hidden=d if not isinstance(d, fx.Node) else hs[1],
        intermediate=int_value(n) if int_value(n) is not None else n, dtype=dtype_of(hidden),
        orphans=[s, *bias_adds], autocast_like=gemm_name(up_out.target),
    )


def getitem_of(node: fx.Node, index: int):
    for u in node.users:
        if u.op == "call_function" and u.target is operator.getitem and u.args[1] == index:
            return u
    return None


def find(gm: fx.GraphModule):
    """Yield (anchor node, MoEBlock or decline reason) for every candidate in the graph."""
    for node in list(gm.graph.nodes):
        if is_candidate(node):
            try:
                yield node, analyse(node)
            except Declined as e:
                yield node, str(e)
