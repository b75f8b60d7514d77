"""The router of a matched MoE block, for token rounding inside compiled graphs.

Token rounding (``moe_inductor.ops.routing.token_rounding_routing``) needs the router's probabilities
over all experts, not just the top-k the model kept, so with the backend option
``token_rounding`` on, the rewrite takes the router into the fused computation: it recognises how
the block's (expert ids, scores) came from the router, and replaces the model's top-k by the
rounded routing computed from the same probabilities. Gradients reach the router logits because
the rounded scores are gathered from the probabilities the graph already computes.

Routers understood (Dynamo's torch-level graph, any of the usual spellings)::

    probs = softmax(logits, dim=-1)                    # optional dtype=, optional .float() first
    v, i = topk(probs, K, dim=-1)                      # softmax then top-k
    w = v                                              # (a) Qwen2/3-MoE, OLMoE (norm_topk_prob False)
    w = v / v.sum(dim=-1, keepdim=True)                # (b) Mixtral, Qwen3 norm_topk_prob (also /=)

    v, i = topk(logits, K, dim=-1); w = softmax(v, dim=-1)   # (c) top-k then softmax (GPT-OSS)

then optionally ``w.to(dtype)`` and ``w * c`` for a Python constant c (a routed scaling factor),
and ``i``/``w`` flattened to (T*K,). (c) is (b) in disguise: softmax over the selected logits is
the selected probabilities divided by their sum. Anything else (sigmoid scores, a correction bias
used for the choice only, group-limited top-k, dense score matrices, eps in the
renormalisation) is refused with the reason; the block is then rewritten with the model's
plain top-k.
"""
from __future__ import annotations

import dataclasses
import numbers
import operator
from typing import Optional, Union

import torch
import torch.fx as fx
import torch.nn.functional as Fn
from torch._inductor.pattern_matcher import KeywordArg as KA, is_match

from moe_inductor.fx.decline import Declined, need
from moe_inductor.fx.matching import AnyOf, F, M
from moe_inductor.fx.nodes import is_mutation
from moe_inductor.fx.shapes import int_value, same, shape_of
from moe_inductor.ops import routing


@dataclasses.dataclass
class RouterSpec:
    """probs (T, E) node (or logits when ``softmax_of_logits``), K, renormalisation, scaling."""

    probs: fx.Node
    softmax_of_logits: bool
    top_k: int
    renormalize: bool
    scale: float
    score_dtype: Optional[torch.dtype]
    form: str


def _flat(name: str):
    inner = KA(name)
    return AnyOf(M("reshape", inner, -1), M("view", inner, -1), M("flatten", inner), M("reshape", inner, (-1,)),
                 M("view", inner, (-1,)))


def _topk():
    alts = []
    for src in (KA("src"),):
        alts += [
            F(torch.topk, src, KA("k"), dim=KA("dim")),
            F(torch.topk, src, KA("k"), KA("dim")),
            F(torch.topk, src, KA("k")),
            M("topk", src, KA("k"), dim=KA("dim")),
            M("topk", src, KA("k"), KA("dim")),
            M("topk", src, KA("k")),
        ]
    return AnyOf(*alts)


def _softmax(name: str):
    x = KA(name)
    return AnyOf(
        F(Fn.softmax, x, dim=KA("sm_dim")), F(Fn.softmax, x, KA("sm_dim")),
        F(Fn.softmax, x, dim=KA("sm_dim"), dtype=KA("sm_dtype")), F(Fn.softmax, x, KA("sm_dim"), dtype=KA("sm_dtype")),
        F(torch.softmax, x, dim=KA("sm_dim")), F(torch.softmax, x, KA("sm_dim")),
        F(torch.softmax, x, dim=KA("sm_dim"), dtype=KA("sm_dtype")),
        M("softmax", x, dim=KA("sm_dim")), M("softmax", x, KA("sm_dim")),
        M("softmax", x, dim=KA("sm_dim"), dtype=KA("sm_dtype")),
    )


def _last_dim(dim, rank: int) -> bool:
    return isinstance(dim, int) and not isinstance(dim, bool) and dim in (-1, rank - 1)


def _strip(node, *methods):
    """Peel casts like .to(dtype) / .float() / .type_as(); returns (inner node, cast dtype or None)."""
    dtype = None
    while isinstance(node, fx.Node) and node.op == "call_method" and node.target in methods:
        if node.target == "to" and len(node.args) == 2 and isinstance(node.args[1], torch.dtype) and not node.kwargs:
            dtype = dtype or node.args[1]
        elif node.target in ("float", "double", "half", "bfloat16") and len(node.args) == 1:
            dtype = dtype or {"float": torch.float32, "double": torch.float64, "half": torch.float16,
                              "bfloat16": torch.bfloat16}[node.target]
        else:
            break
        node = node.args[0]
    return node, dtype


def analyse_router(expert_ids: fx.Node, scores: fx.Node, num_experts: int, top_k: Optional[int]) -> Union[RouterSpec, str]:
    """How the block's flat (A,) expert ids and scores came from the router, or a refusal reason."""
    try:
        return _analyse(expert_ids, scores, num_experts, top_k)
    except Declined as e:
        return str(e)


def _analyse(expert_ids, scores, E, K) -> RouterSpec:
    m = _flat("idx").match(expert_ids) if isinstance(expert_ids, fx.Node) else None
    need(m is not None and is_match(m), "expert ids are not a flattened (T, K) tensor")
    idx, _ = _strip(m.kwargs["idx"], "to", "long", "int")
    need(isinstance(idx, fx.Node) and idx.op == "call_function" and idx.target is operator.getitem
          and idx.args[1] == 1, "expert ids do not come from a top-k")
    topk = idx.args[0]
    t = _topk().match(topk)
    need(is_match(t), "expert ids do not come from torch.topk (e.g. group-limited or capacity routing)")
    src = t.kwargs["src"]
    k = int_value(t.kwargs["k"])
    src_shape = shape_of(src)
    need(src_shape is not None and len(src_shape) == 2, "router scores are not a (T, E) matrix")
    need(_last_dim(t.kwargs.get("dim", -1), 2), "top-k is not over the experts axis")
    need(k is not None and (K is None or k == K), "top-k size unknown or different from the block's K")
    need(same(src_shape[1], E), f"router has {src_shape[1]} columns for {E} experts")
    topk_users = [u for u in topk.users if not (u.op == "call_function" and u.target is operator.getitem)]
    need(not topk_users, "top-k result is used whole")

    m = _flat("w").match(scores) if isinstance(scores, fx.Node) else None
    need(m is not None and is_match(m), "scores are not a flattened (T, K) tensor")
    w = m.kwargs["w"]

    scale = 1.0
    w, outer_dtype = _strip(w, "to", "float", "type_as")
    if isinstance(w, fx.Node) and w.op == "call_function" and w.target is operator.mul:
        a, b = w.args
        const, other = (a, b) if isinstance(a, numbers.Real) else (b, a)
        need(isinstance(const, numbers.Real) and not isinstance(const, bool) and isinstance(other, fx.Node),
              "scores are scaled by a tensor, not a constant")
        scale, w = float(const), other
    w, inner_dtype = _strip(w, "to", "float", "type_as")
    score_dtype = outer_dtype or inner_dtype

    vals = next((u for u in topk.users if u.op == "call_function" and u.target is operator.getitem and u.args[1] == 0),
                None)
    renormalize, form = False, ""
    # (c) top-k of the logits, softmax over the K values
    sm = _softmax("v").match(w) if isinstance(w, fx.Node) else None
    if sm is not None and is_match(sm):
        need(sm.kwargs["v"] is vals, "softmax is over something other than the top-k values")
        need(_last_dim(sm.kwargs["sm_dim"], 2), "softmax over the top-k values is not over the K axis")
        logits, _ = _strip(src, "to", "float")
        need(not _is_softmax(src), "softmax of already normalised probabilities")
        return RouterSpec(probs=logits, softmax_of_logits=True, top_k=k, renormalize=True, scale=scale,
                          score_dtype=score_dtype or _dtype(w), form="top-k then softmax")
    # (a)/(b) softmax over experts, top-k of the probabilities, optional renormalisation
    need(_is_softmax(src), "router scores are not a softmax over the experts (e.g. sigmoid scores or "
                            "a correction bias used for the choice)")
    if w is vals:
        form = "softmax then top-k"
    else:
        need(isinstance(w, fx.Node) and w.op == "call_function"
              and w.target in (operator.truediv, operator.itruediv, torch.div) and len(w.args) == 2
              and w.args[0] is vals and not w.kwargs,
              "top-k weights are transformed in a way token rounding cannot reproduce")
        den = w.args[1]
        ok = isinstance(den, fx.Node) and den.op == "call_method" and den.target == "sum" and den.args[0] is vals \
            and den.kwargs.get("keepdim", False) is True \
            and _last_dim(den.kwargs.get("dim", den.args[1] if len(den.args) > 1 else None), 2)
        need(ok, "top-k weights are divided by something other than their sum (e.g. sum + eps)")
        renormalize, form = True, "softmax then top-k, renormalised"
    for u in vals.users:
        need(u is w or not is_mutation(u, vals), f"top-k values are modified in place by {u.format_node()}")
    return RouterSpec(probs=src, softmax_of_logits=False, top_k=k, renormalize=renormalize, scale=scale,
                      score_dtype=score_dtype, form=form)


def _dtype(node):
    v = node.meta.get("example_value") if isinstance(node, fx.Node) else None
    return v.dtype if isinstance(v, torch.Tensor) else None


def _is_softmax(node) -> bool:
    m = _softmax("x").match(node) if isinstance(node, fx.Node) else None
    return bool(m is not None and is_match(m) and _last_dim(m.kwargs["sm_dim"], 2))


def graph_token_rounding(probs: torch.Tensor, top_k: int, tile_m: int, mode: str, renormalize: bool,
                         softmax_of_logits: bool, scale: float, score_dtype: Optional[torch.dtype]):
    """What the rewritten graph calls: token-rounded (token_ids, expert_ids, scores), static
    length, padding dropped (expert -1), no host sync. Traced by AOTAutograd like model code."""
    if softmax_of_logits:
        probs = torch.softmax(probs.float(), dim=-1)
    r = routing.token_rounding_routing(probs, top_k, tile_m, mode, renormalize, static_shape=True)
    scores = r.scores
    if scale != 1.0:
        scores = scores * scale
    if score_dtype is not None:
        scores = scores.to(score_dtype)
    return r.token_ids, r.expert_ids, scores
