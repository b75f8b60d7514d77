"""Pieces shared by the idiom modules: activation recognition and grouped-GEMM spellings."""
from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.fx as fx
import torch.nn.functional as Fn

from moe_inductor.rewrite import F, M, getitem, AnyOf
from torch._inductor.pattern_matcher import KeywordArg

# torch-level callables Dynamo leaves in the graph for an activation -> our unary name
_UNARY = {
    Fn.silu: "silu",
    torch.sigmoid: None,  # never alone: only inside x * sigmoid(x), see unary_activation
    Fn.relu: "relu",
    torch.relu: "relu",
    Fn.gelu: "gelu",
}

GATED_OF = {"silu": "swiglu", "gelu": "geglu", "gelu_tanh": "geglu_tanh"}


def unary_activation(node: fx.Node) -> tuple[Optional[str], Optional[fx.Node]]:
    """If ``node`` applies a supported elementwise activation to one tensor, return
    (name, input node); else (None, None). Recognises F.silu/F.gelu/F.relu (any approximate
    setting of gelu we can reproduce) and the spelled-out silu x * sigmoid(x)."""
    if node.op == "call_function" and node.target in _UNARY and _UNARY[node.target]:
        if node.kwargs.get("inplace", False):
            return None, None
        name = _UNARY[node.target]
        if name == "gelu":
            approx = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
            if approx == "tanh":
                name = "gelu_tanh"
            elif approx != "none":
                return None, None
        if len(node.args) != 1 and not (name.startswith("gelu") and len(node.args) == 2):
            return None, None
        return name, node.args[0]
    if node.op == "call_method" and node.target in ("relu",) and len(node.args) == 1:
        return "relu", node.args[0]
    # x * sigmoid(x)
    if node.op == "call_function" and node.target is operator.mul and len(node.args) == 2:
        a, b = node.args
        for u, s in ((a, b), (b, a)):
            if (isinstance(s, fx.Node) and s.op == "call_function" and s.target is torch.sigmoid
                    and s.args and s.args[0] is u):
                return "silu", u
    return None, None


def grouped_mm(a: str, w: str, offs: str, cast: str):
    """Spellings of one grouped GEMM in transformers' grouped_mm experts path:
    `op(input.to(dtype), weight, offs=offsets)` with op torch._grouped_mm or the
    transformers::grouped_mm_fallback custom op (the input cast may be absent)."""
    alts = []
    targets = [torch._grouped_mm]
    fallback = getattr(getattr(torch.ops, "transformers", None), "grouped_mm_fallback", None)
    if fallback is not None:
        targets += [fallback, fallback.default]
    for tgt in targets:
        alts.append(F(tgt, M("to", KeywordArg(a), KeywordArg(cast)), KeywordArg(w), offs=KeywordArg(offs)))
        alts.append(F(tgt, KeywordArg(a), KeywordArg(w), offs=KeywordArg(offs)))
    return AnyOf(*alts)
