"""Idiom: expert weights gathered per assignment, then a batched GEMM (no sort, no offsets).

transformers 5.x "batched_mm" experts (``integrations/moe.py: batched_mm_experts_forward``)::

    x_rep = hidden.repeat_interleave(K, dim=0)                        # (A, d), A = T*K
    ids = top_k_index.reshape(-1); s = top_k_weights.reshape(-1)      # (A,)
    h = bmm(gate_up_proj[ids], x_rep.unsqueeze(-1)).squeeze(-1)       # (A, 2n); transposed
                                                                      # storage: bmm(x.unsqueeze(1), W[ids]).squeeze(1)
    a = act(h.chunk(2, -1)[0]) * h.chunk(2, -1)[1]                    # or act(h) (no gate)
    y = bmm(down_proj[ids], a.unsqueeze(-1)).squeeze(-1)              # (A, d)
    out = (y * s.unsqueeze(-1)).view(T, K, d).sum(dim=1)              # anchor, (T, d)

gpt-fast Mixtral (``ConditionalFeedForward`` + ``MOEFeedForward``), einsum over gathered
weights w1/w3 (E, n, d), w2 (E, d, n)::

    x1 = silu(einsum('ti,taoi->tao', x, w1[idx])); x3 = einsum('ti,taoi->tao', x, w3[idx])
    y = einsum('tao,taio->tai', x1 * x3, w2[idx])                     # (T, K, d)
    out = einsum('tai,ta->ti', y, expert_weights)                     # anchor, (T, d)

Replacement: fused_moe(hidden, arange(T).repeat_interleave(K), ids, s, W1, W2): assignment i is
token i // K in both spellings (repeat_interleave, resp. the (T, K) layout of idx), which is
what that token_ids says, so the rewrite is exact whatever produced ids and s. Safety
(``analyse_*``): both GEMMs gather their weights with the same index node (integer, one entry per
assignment), the replicated tokens, the index, the scores and the final view agree on T and K
symbolically, weights have the (E, 2n|n, d) / (E, d, n) shapes the activation implies, and no
intermediate is written in place except one ``out.add_(bias[ids])`` per GEMM (GPT-OSS's biases,
gathered with the very ids the weights are gathered with: b1/b2 of the fused op, the add_ erased
with the block; activation and layout as in ``sorted_grouped_mm``). The op receives the
very index node both GEMMs gather with, so a transformation of the ids (expert-parallel
``clamp``) is carried over as it is.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch._inductor.pattern_matcher import KeywordArg as KA, is_match

from moe_inductor.activations import parse_activation
from moe_inductor.rewrite import (
    AnyOf, Declined, F, M, MoEBlock, call, method, dtype_of, getitem, int_value, is_mutation,
    match_or_decline as _match, need as _need, same, shape_of, to_sympy,
)
from .common import GATED_OF, after_gemm_reason, expert_activation, expert_bias, unary_activation

IDIOM = "batched_mm"


# --------------------------------------------------------------------------- transformers bmm form

def _combine_pattern():
    views = [M(v, KA("weighted"), KA("T"), KA("K"), KA("d")) for v in ("view", "reshape")]
    return AnyOf(*[M("sum", v, dim=1) for v in views], *[M("sum", v, 1) for v in views])


def _weighted_pattern():
    scale = M("unsqueeze", KA("scores"), -1)
    return AnyOf(F(operator.mul, KA("expert_out"), scale), F(operator.mul, scale, KA("expert_out")))


def _batched_linear(a: str, w: str, ids: str):
    """(A, in) x W[ids] -> (A, out): W (E, out, in) as bmm(W[ids], a.unsqueeze(-1)).squeeze(-1),
    or transposed storage W (E, in, out) as bmm(a.unsqueeze(1), W[ids]).squeeze(1)."""
    gathered = getitem(KA(w), KA(ids))
    plain = M("squeeze", F(torch.bmm, gathered, M("unsqueeze", KA(a), -1)), -1)
    transposed = M("squeeze", F(torch.bmm, M("unsqueeze", KA(a), 1), gathered), 1)
    return AnyOf(plain, transposed)


def _is_transposed_form(node: fx.Node) -> bool:
    return node.args[1] == 1  # squeeze(1): the bmm(a.unsqueeze(1), W[ids]) spelling


def _no_writes(named, allowed=()):
    for name, v in named:
        for user in v.users:
            _need(user in allowed or not is_mutation(user, v), f"{name} is modified in place by {user.format_node()}")


def analyse_bmm(node: fx.Node) -> MoEBlock:
    c = _match(_combine_pattern(), node, "per-token combine")
    T, K, d = c["T"], c["K"], c["d"]
    w = _match(_weighted_pattern(), c["weighted"], "routing-weight multiply")
    scores = w["scores"]
    if not is_match(_batched_linear("act_out", "w_down", "ids").match(w["expert_out"])):
        why = after_gemm_reason(w["expert_out"], lambda n: is_match(_batched_linear("a", "w", "i").match(n)))
        _need(why is None, why)
    down = _match(_batched_linear("act_out", "w_down", "ids"), w["expert_out"], "down-projection batched GEMM")
    ids = down["ids"]
    activation, interleaved, up_out = expert_activation(down["act_out"])
    up = _match(_batched_linear("x_rep", "w_up", "ids"), up_out, "up-projection batched GEMM")
    _need(up["ids"] is ids, "the two GEMMs gather expert weights with different indices")
    transposed = _is_transposed_form(up_out)
    _need(_is_transposed_form(w["expert_out"]) == transposed, "the two GEMMs use different weight layouts")
    rep = _match(AnyOf(M("repeat_interleave", KA("hidden"), KA("Kr"), dim=0),
                       M("repeat_interleave", KA("hidden"), KA("Kr"), 0),
                       F(torch.repeat_interleave, KA("hidden"), KA("Kr"), dim=0)),
                 up["x_rep"], "token replication (repeat_interleave(K, dim=0))")
    hidden = rep["hidden"]

    Ki, Ti = int_value(K), to_sympy(T)
    _need(Ki is not None and int_value(rep["Kr"]) == Ki, "tokens are replicated a different number of times than top-k")
    hs, es, ss = shape_of(hidden), shape_of(ids), shape_of(scores)
    wu, wd = shape_of(up["w_up"]), shape_of(down["w_down"])
    _need(None not in (hs, es, ss, wu, wd, Ti), "shapes unknown")
    _need(len(hs) == 2 and len(es) == 1 and len(ss) == 1 and len(wu) == 3 and len(wd) == 3,
          "unexpected ranks of tokens, routing or weights")
    _need(dtype_of(ids) in (torch.int64, torch.int32), "expert weights are not gathered with integer indices")
    _need(same(hs[0], Ti), "rows of the replicated tokens differ from the combine's T")
    A = Ti * Ki
    _need(same(es[0], A) and same(ss[0], A), "routing lengths differ from T*K")
    # weights as stored: W1 (E, 2n|n, d), W2 (E, d, n); transposed storage swaps the last two
    if transposed:
        wu, wd = (wu[0], wu[2], wu[1]), (wd[0], wd[2], wd[1])
    E = int_value(wu[0])
    _need(E is not None and same(wd[0], E), "number of experts unknown or inconsistent")
    _need(same(hs[1], d) and same(wu[2], d) and same(wd[1], d), "hidden sizes disagree")
    n = wd[2]
    gated = parse_activation(activation).gated
    _need(same(wu[1], 2 * n if gated else n), "up-projection width does not match the activation")
    out_shape = shape_of(node)
    _need(out_shape is not None and len(out_shape) == 2 and same(out_shape[0], Ti) and same(out_shape[1], d),
          "per-token combine does not give (T, d)")
    # per-expert biases gathered with the same ids as the weights, added in place (GPT-OSS)
    b1, add_b1 = expert_bias(up_out, lambda i: i is ids, E, "up-projection output")
    b2, add_b2 = expert_bias(w["expert_out"], lambda i: i is ids, E, "down-projection output")
    for b in (b1, b2):
        _need(b is None or dtype_of(b) == dtype_of(up["w_up"]), "expert biases and weights differ in dtype")
    bias_adds = [a for a in (add_b1, add_b2) if a is not None]
    _no_writes((("up-projection output", up_out), ("down-projection output", w["expert_out"]),
                ("expert ids", ids), ("routing scores", scores), ("replicated tokens", up["x_rep"])),
               allowed=bias_adds)
    w_up, w_down = up["w_up"], down["w_down"]

    def token_ids(graph):
        t = method(graph, "size", hidden, 0, like=node)
        ar = call(graph, torch.arange, t, device=hidden.meta["example_value"].device, like=node)
        return method(graph, "repeat_interleave", ar, Ki, like=node)

    def build_weights(graph):
        if transposed:
            return (method(graph, "transpose", w_up, -2, -1, like=node),
                    method(graph, "transpose", w_down, -2, -1, like=node), b1, b2)
        return w_up, w_down, b1, b2

    def replace(out):
        node.replace_all_uses_with(out)
        node.graph.erase_node(node)

    return MoEBlock(
        idiom=IDIOM, anchor=node, x=hidden, token_ids=token_ids, expert_ids=lambda graph: ids,
        scores=lambda graph: scores, build_weights=build_weights, replace=replace, activation=activation,
        interleaved=interleaved, num_experts=E, top_k=Ki, hidden=int_value(hs[1]) if int_value(hs[1]) is not None else hs[1],
        intermediate=int_value(n) if int_value(n) is not None else n, dtype=dtype_of(hidden),
        orphans=bias_adds, autocast_like="aten::bmm",
    )


# --------------------------------------------------------------------------- gpt-fast einsum form

_EINSUM = (torch.einsum, torch.functional.einsum)


def _canonical(equation: str) -> str:
    """Rename einsum letters by first appearance: 'ti, taoi -> tao' -> 'ab,acdb->acd'."""
    eq = equation.replace(" ", "")
    names: dict = {}
    return "".join(names.setdefault(ch, "abcdefghij"[len(names)]) if ch.isalpha() else ch for ch in eq)


_UP_EQ, _DOWN_EQ, _COMBINE_EQ = "ab,acdb->acd", "abc,abdc->abd", "abc,ab->ac"


def _einsum(node, eq):
    """Operands of ``einsum(eq, a, b)`` (either spelling: operands as varargs or as one list)."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target in _EINSUM and node.args
            and isinstance(node.args[0], str) and _canonical(node.args[0]) == eq):
        return None
    ops = node.args[1:]
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = ops[0]
    return tuple(ops) if len(ops) == 2 else None


def _gathered_weight(node, what):
    g = _match(getitem(KA("w"), KA("idx")), node, f"{what} gathered by expert index")
    return g["w"], g["idx"]


def is_einsum_candidate(node: fx.Node) -> bool:
    return _einsum(node, _COMBINE_EQ) is not None


def analyse_einsum(node: fx.Node) -> MoEBlock:
    y, weights = _einsum(node, _COMBINE_EQ)
    down = _einsum(y, _DOWN_EQ)
    _need(down is not None, "expert outputs are not einsum('tao,taio->tai', a, w2[idx])")
    act_out, w2g = down
    w2, idx = _gathered_weight(w2g, "down-projection weight")
    activation, w1, w3, x = None, None, None, None
    if act_out.op == "call_function" and act_out.target is operator.mul and len(act_out.args) == 2:
        for a, b in (act_out.args, act_out.args[::-1]):
            name, inner = unary_activation(a) if isinstance(a, fx.Node) else (None, None)
            g, u = _einsum(inner, _UP_EQ) if name else None, _einsum(b, _UP_EQ)
            if name and g and u and g[0] is u[0]:
                _need(name in GATED_OF, f"gated activation {name} unsupported")
                activation, x = GATED_OF[name], g[0]
                (w1, i1), (w3, i3) = _gathered_weight(g[1], "gate weight"), _gathered_weight(u[1], "up weight")
                _need(i1 is idx and i3 is idx, "expert weights are gathered with different indices")
                break
    if activation is None:
        name, inner = unary_activation(act_out)
        up = _einsum(inner, _UP_EQ) if name else None
        _need(up is not None, "expert body is not einsum -> (gated) activation -> einsum")
        activation, x = name, up[0]
        w1, i1 = _gathered_weight(up[1], "up weight")
        _need(i1 is idx, "expert weights are gathered with different indices")

    xs, ids_s, ws = shape_of(x), shape_of(idx), shape_of(weights)
    s1, s2, s3 = shape_of(w1), shape_of(w2), shape_of(w3) if w3 is not None else None
    _need(None not in (xs, ids_s, ws, s1, s2), "shapes unknown")
    _need(len(xs) == 2 and len(ids_s) == 2 and len(ws) == 2 and len(s1) == 3 and len(s2) == 3,
          "unexpected ranks of tokens, routing or weights")
    _need(dtype_of(idx) in (torch.int64, torch.int32), "expert weights are not gathered with integer indices")
    _need(same(xs[0], ids_s[0]) and same(ws[0], ids_s[0]) and same(ws[1], ids_s[1]),
          "tokens, expert indices and routing weights are not all (T, K)")
    E, K = int_value(s1[0]), int_value(ids_s[1])
    _need(E is not None and K is not None and same(s2[0], E), "number of experts or top-k unknown or inconsistent")
    n = s1[1]
    _need(same(s1[2], xs[1]) and same(s2[1], xs[1]) and same(s2[2], n), "expert weight shapes disagree")
    if w3 is not None:
        _need(s3 is not None and tuple(map(str, s3)) == tuple(map(str, s1)), "gate and up weights differ in shape")
    _no_writes((("expert indices", idx), ("routing weights", weights), ("expert input", x)))

    def build_weights(graph):
        w13 = call(graph, torch.cat, [w1, w3], 1, like=node) if w3 is not None else w1
        return w13, w2, None, None

    def token_ids(graph):
        t = method(graph, "size", x, 0, like=node)
        ar = call(graph, torch.arange, t, device=x.meta["example_value"].device, like=node)
        return method(graph, "repeat_interleave", ar, K, like=node)

    def replace(out):
        node.replace_all_uses_with(out)
        node.graph.erase_node(node)

    return MoEBlock(
        idiom=IDIOM, anchor=node, x=x, token_ids=token_ids,
        expert_ids=lambda graph: method(graph, "reshape", idx, -1, like=node),
        scores=lambda graph: method(graph, "reshape", weights, -1, like=node),
        build_weights=build_weights, replace=replace, activation=activation, interleaved=False,
        num_experts=E, top_k=K, hidden=int_value(xs[1]) if int_value(xs[1]) is not None else xs[1],
        intermediate=int_value(n) if int_value(n) is not None else n, dtype=dtype_of(x),
        autocast_like="aten::bmm",  # einsum runs as bmm under autocast
    )


# --------------------------------------------------------------------------- driver

def is_candidate(node: fx.Node) -> bool:
    """Cheap pre-filter: a per-token sum directly over weighted bmm outputs (the sorted idiom
    sums a permuted tensor instead), or the gpt-fast combine einsum."""
    if is_einsum_candidate(node):
        return True
    if not (node.op == "call_method" and node.target == "sum" and is_match(_combine_pattern().match(node))):
        return False
    weighted = node.args[0].args[0]
    return is_match(_weighted_pattern().match(weighted)) and any(
        u.op == "call_function" and u.target is torch.bmm for u in _ancestors(weighted, 4))


def _ancestors(node: fx.Node, depth: int):
    frontier = [node]
    for _ in range(depth):
        frontier = [i for n in frontier for i in n.all_input_nodes]
        yield from frontier


def find(gm: fx.GraphModule):
    """Yield (anchor node, MoEBlock or decline reason) for every candidate in the graph."""
    for node in list(gm.graph.nodes):
        if not is_candidate(node):
            continue
        try:
            yield node, analyse_einsum(node) if is_einsum_candidate(node) else analyse_bmm(node)
        except Declined as e:
            yield node, str(e)
