"""Idiom: dense all-experts MoE, every expert on every token via bmm, inputs pre-scaled by a
dense router-score matrix (transformers 5.x Llama4 ``Llama4TextMoe``/``Llama4TextExperts``)::

    logits = router(x)                                                 # (T, E)
    v, idx = torch.topk(logits, K, dim=1)
    R = sigmoid(full_like(logits, -inf).scatter_(1, idx, v))           # (T, E), 0 off the top-k
    xin = x.repeat(E, 1) * R.transpose(0, 1).reshape(-1, 1)            # (E*T, d), expert-major
    h = bmm(xin.view(E, -1, d), gate_up_proj)                          # gate_up_proj (E, d, 2n)
    a = up * act(gate)  with gate, up = h.chunk(2, -1)
    y = bmm(a, down_proj).view(-1, d)                                  # down_proj (E, n, d)
    out = y.reshape(E, -1, d).sum(dim=0)                               # anchor, (T, d)

(the shared expert is added afterwards and left to Inductor).

Rewriting this to top-k sparse work is exact only if (``analyse``, which proves both from the
graph or declines): (1) every unselected score is exactly 0: R is ``sigmoid`` of a
``full_like(-inf)`` (or R is a ``zeros``) with the top-k values scattered in at the top-k
indices, nothing else writing it; (2) each expert maps 0 to 0, so the dropped (expert, token)
pairs contributed exactly 0: bias-free bmm's, and act(gate) * up with up(0) = 0 (or act(0) = 0
for silu/relu/gelu). Scores scale the *inputs* here, expert(s * x), which the fused op (scores
on outputs) cannot express; the replacement therefore feeds it the A = T*K pre-scaled rows
``x[t] * R[t, idx[t, k]]`` (one per assignment, score 1) and sums each token's K rows: an
(A, d) copy of the inputs instead of Llama4's (E*T, d), and K/E of its GEMM work. The scores are
read from R with ``gather``, so their gradient flows through the graph's own router code.
"""
from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx
from torch._inductor.pattern_matcher import KeywordArg as KA, is_match

from moe_inductor.rewrite import (
    AnyOf, Declined, F, M, MoEBlock, call, method, dtype_of, getitem, int_value, is_mutation,
    match_or_decline as _match, need as _need, same, shape_of,
)
from .common import GATED_OF, unary_activation

IDIOM = "dense_experts"


def _combine_pattern():
    views = [M(v, KA("y"), KA("E"), KA("T"), KA("d")) for v in ("view", "reshape")]
    return AnyOf(*[M("sum", v, dim=0) for v in views], *[M("sum", v, 0) for v in views])


def _expert_input_pattern():
    scale = M("reshape", M("transpose", KA("R"), 0, 1), -1, 1)
    rep = M("repeat", KA("x"), KA("Er"), 1)
    return AnyOf(F(operator.mul, rep, scale), F(operator.mul, scale, rep))


def _strip_casts(node):
    while isinstance(node, fx.Node) and node.op == "call_method" and node.target in ("float", "to", "type_as"):
        node = node.args[0]
    return node


def is_candidate(node: fx.Node) -> bool:
    if not (node.op == "call_method" and node.target == "sum" and is_match(_combine_pattern().match(node))):
        return False
    y = node.args[0].args[0]
    return isinstance(y, fx.Node) and y.op == "call_method" and y.target == "view" and isinstance(y.args[0], fx.Node) \
        and y.args[0].target is torch.bmm


def _zero_off_topk(R: fx.Node):
    """Prove R[t, e] == 0 exactly for e not in idx[t]; return (idx, K) or raise Declined."""
    inner = _strip_casts(R)
    squash = None
    if inner.op == "call_function" and inner.target in (torch.sigmoid, torch.nn.functional.sigmoid):
        squash, inner = "sigmoid", _strip_casts(inner.args[0])
    _need(inner.op == "call_method" and inner.target in ("scatter_", "scatter") and len(inner.args) == 4
          and not inner.kwargs, "dense router scores are not a scatter of the top-k values into a constant matrix")
    base, dim, idx, vals = inner.args
    _need(dim in (1, -1), "router scores are scattered along the token axis")
    fill = None
    if isinstance(base, fx.Node) and base.op == "call_function":
        if base.target is torch.full_like and len(base.args) == 2:
            fill = base.args[1]
        elif base.target in (torch.zeros_like, torch.zeros):
            fill = 0.0
    _need(fill is not None, "the matrix the top-k scores are scattered into is not zeros/full_like")
    if squash == "sigmoid":
        _need(fill == -math.inf, f"unselected scores are sigmoid({fill}), not exactly 0")
    else:
        _need(fill == 0, f"unselected scores are {fill}, not exactly 0")
    writes = [u for u in base.users if is_mutation(u, base)]
    _need(writes == ([inner] if inner.target == "scatter_" else []),
          "the dense score matrix is written by something else than the top-k scatter")
    for u in R.users:
        _need(not is_mutation(u, R), f"router scores are modified in place by {u.format_node()}")
    tk = _match(getitem(F(torch.topk, KA("logits"), KA("K"), dim=KA("dim")), 1), idx, "top-k indices")
    _need(tk["dim"] in (1, -1), "top-k is not over the experts")
    K = int_value(tk["K"])
    _need(K is not None, "top-k is not a constant")
    return idx, K


def analyse(node: fx.Node) -> MoEBlock:
    c = _match(_combine_pattern(), node, "sum over experts")
    yv = c["y"]
    down = _match(M("view", F(torch.bmm, KA("a"), KA("w_down")), -1, KA("d2")), yv, "down-projection bmm")
    a = down["a"]
    activation, h = None, None
    if a.op == "call_function" and a.target is operator.mul and len(a.args) == 2:
        for g, u in (a.args, a.args[::-1]):
            name, gate = unary_activation(g) if isinstance(g, fx.Node) else (None, None)
            if name and gate.target is operator.getitem and gate.args[1] == 0 and isinstance(u, fx.Node) \
                    and u.target is operator.getitem and u.args[1] == 1 and u.args[0] is gate.args[0]:
                ch = gate.args[0]
                if ch.op == "call_method" and ch.target == "chunk" and ch.args[1:] == (2,) \
                        and ch.kwargs.get("dim", None) in (-1, 2):
                    _need(name in GATED_OF, f"gated activation {name} unsupported")
                    activation, h = GATED_OF[name], ch.args[0]
                    break
    if activation is None:
        name, h = unary_activation(a)
        _need(name in ("silu", "relu", "gelu", "gelu_tanh"), "expert activation is not one with act(0) == 0")
        activation = name
    up = _match(F(torch.bmm, M("view", KA("xin"), KA("E1"), -1, KA("d1")), KA("w_up")), h, "up-projection bmm")
    xi = _match(_expert_input_pattern(), up["xin"], "router-scaled expert input x.repeat(E, 1) * R.T.reshape(-1, 1)")
    x, R = xi["x"], xi["R"]
    idx, K = _zero_off_topk(R)

    xs, Rs, wu, wd = shape_of(x), shape_of(R), shape_of(up["w_up"]), shape_of(down["w_down"])
    _need(None not in (xs, Rs, wu, wd), "shapes unknown")
    _need(len(xs) == 2 and len(Rs) == 2 and len(wu) == 3 and len(wd) == 3, "unexpected ranks")
    E = int_value(Rs[1])
    _need(E is not None and all(int_value(v) == E for v in (xi["Er"], up["E1"], c["E"], wu[0], wd[0])),
          "experts count differs between router, replication, bmm's and the final sum")
    _need(same(Rs[0], xs[0]), "router scores and tokens disagree on T")
    d = xs[1]
    _need(all(same(v, d) for v in (up["d1"], down["d2"], c["d"], wu[1], wd[2])), "hidden sizes disagree")
    n = wd[1]
    gated = activation in GATED_OF.values()
    _need(same(wu[2], 2 * n if gated else n), "up-projection width does not match the activation")
    for name, v in (("expert input", up["xin"]), ("up-projection output", h), ("expert output", yv)):
        for user in v.users:
            _need(not is_mutation(user, v), f"{name} is modified in place by {user.format_node()}")
    T = xs[0]

    # pre-scaled rows, one per assignment (t-major): x[t] * R[t, idx[t, k]]; created now (before
    # the anchor) because the block's x must be a node; unused if emission fails, then dead code
    graph = node.graph
    with graph.inserting_before(node):
        scores_TK = method(graph, "gather", R, 1, idx, like=node)
        rows = call(graph, operator.mul, method(graph, "unsqueeze", x, 1, like=node),
                    method(graph, "unsqueeze", scores_TK, -1, like=node), like=node)
        x_rows = method(graph, "reshape", rows, -1, method(graph, "size", x, 1, like=node), like=node)

    def token_ids(graph):
        a_rows = method(graph, "size", x_rows, 0, like=node)
        return call(graph, torch.arange, a_rows, device=x.meta["example_value"].device, like=node)

    def build_weights(graph):
        return (method(graph, "transpose", up["w_up"], -2, -1, like=node),
                method(graph, "transpose", down["w_down"], -2, -1, like=node), None, None)

    def replace(out):
        with graph.inserting_before(node):  # the fused op was inserted before the anchor
            per_token = method(graph, "view", out, method(graph, "size", x, 0, like=node), K,
                               method(graph, "size", x, 1, like=node), like=node)
            summed = method(graph, "sum", per_token, 1, like=node)
        node.replace_all_uses_with(summed)
        graph.erase_node(node)

    def ones(graph):
        flat = method(graph, "reshape", scores_TK, -1, like=node)
        return call(graph, torch.ones_like, flat, like=node)

    return MoEBlock(
        idiom=IDIOM, anchor=node, x=x_rows, token_ids=token_ids,
        expert_ids=lambda graph: method(graph, "reshape", idx, -1, like=node), scores=ones,
        build_weights=build_weights, replace=replace, activation=activation, interleaved=False,
        num_experts=E, top_k=K, hidden=int_value(d) if int_value(d) is not None else d,
        intermediate=int_value(n) if int_value(n) is not None else n, dtype=dtype_of(x), location=node,
        autocast_like="aten::bmm",
    )


def find(gm: fx.GraphModule):
    """Yield (anchor node, MoEBlock or decline reason) for every candidate in the graph."""
    for node in list(gm.graph.nodes):
        if not is_candidate(node):
            continue
        try:
            yield node, analyse(node)
        except Declined as e:
            yield node, str(e)
