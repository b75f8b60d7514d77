"""Pieces shared by the idiom modules: activation recognition (plain, gated via chunk(2), the
GPT-OSS clamped gate on interleaved columns), per-expert biases added in place, and
grouped-GEMM spellings."""
from __future__ import annotations

import math
import operator
from typing import Callable, Optional

import torch
import torch.fx as fx
import torch.nn.functional as Fn

from moe_inductor.activations import Activation
from moe_inductor.rewrite import (
    F, M, getitem, AnyOf, is_mutation, match_or_decline, need, same, shape_of, dtype_of,
)
from torch._inductor.pattern_matcher import KeywordArg, is_match

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


# --------------------------------------------------------------------------- activations

def _either(fn, a, b):
    """fn(a, b) or fn(b, a) (commutative ops). At least one side must be a structural pattern:
    AnyOf takes the first alternative that matches and never backtracks."""
    return AnyOf(F(fn, a, b), F(fn, b, a))


def _sigmoid(arg):
    return AnyOf(F(torch.sigmoid, arg), F(Fn.sigmoid, arg), M("sigmoid", arg))


def _gptoss_pattern():
    """(up + c) * (gate * sigmoid(scaled)), either operand order of each product; the leaves
    (gate, scaled, up, c) are checked by ``gptoss_activation``."""
    glu = _either(operator.mul, KeywordArg("gate"), _sigmoid(KeywordArg("scaled")))
    shifted = F(operator.add, KeywordArg("up_a"), KeywordArg("up_b"))
    return _either(operator.mul, shifted, glu)


def _unwritten(nodes, what: str) -> None:
    """Decline if any of ``nodes`` (the activation's intermediates, several of them views of h)
    is written in place: the pattern would describe values the graph no longer computes."""
    for v in nodes:
        for u in v.users:
            need(not is_mutation(u, v), f"{what} intermediate {v.name} is modified in place by {u.format_node()}")


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _clamp_bounds(node) -> Optional[tuple]:
    """(input, min, max) of ``x.clamp(min, max)`` / ``torch.clamp(x, min, max)`` in any
    positional/keyword spelling, else None."""
    if not isinstance(node, fx.Node):
        return None
    if not ((node.op == "call_method" and node.target == "clamp")
            or (node.op == "call_function" and node.target is torch.clamp)):
        return None
    args, kwargs = list(node.args), dict(node.kwargs)
    if not args or set(kwargs) - {"min", "max"} or len(args) > 3:
        return None
    names = ("min", "max")
    bounds = {"min": None, "max": None}
    for name, v in zip(names, args[1:]):
        bounds[name] = v
    for name, v in kwargs.items():
        if len(args) > 1 + names.index(name):
            return None  # given twice
        bounds[name] = v
    return args[0], bounds["min"], bounds["max"]


def _interleaved_half(index, rank: Optional[int]) -> Optional[int]:
    """0 for h[..., ::2] (gate), 1 for h[..., 1::2] (up), else None. ``[:, ::2]`` counts only
    when h is 2-D."""
    if not isinstance(index, tuple) or len(index) != 2:
        return None
    lead, last = index
    if not (lead is Ellipsis or (rank == 2 and lead == slice(None))):
        return None
    if not isinstance(last, slice) or last.step != 2 or last.stop is not None:
        return None
    return {None: 0, 0: 0, 1: 1}.get(last.start)


def gptoss_activation(act_out: fx.Node) -> Optional[tuple[str, fx.Node]]:
    """GPT-OSS experts' gate on interleaved gate/up columns of h (transformers
    ``GptOssExperts._apply_gate``)::

        gate, up = h[..., ::2], h[..., 1::2]
        gate = gate.clamp(min=None, max=limit); up = up.clamp(min=-limit, max=limit)
        out = (up + 1) * (gate * sigmoid(gate * alpha))

    -> ("gptoss:<alpha>:<limit>", h): the same formula as ``moe_inductor.activations`` (g *
    sigmoid(alpha * g) * (u + 1); products commute exactly in IEEE arithmetic). None when
    ``act_out`` does not have this shape at all; Declined when it has it but a piece is not
    proven (a constant that is a tensor, other clamp bounds, other columns, ...)."""
    m = _gptoss_pattern().match(act_out) if isinstance(act_out, fx.Node) else None
    if m is None or not is_match(m):
        return None
    k = m.kwargs
    gate = k["gate"]
    up, one = k["up_a"], k["up_b"]
    if not isinstance(up, fx.Node):
        up, one = one, up
    need(isinstance(up, fx.Node) and _number(one) and one == 1,
         f"gated output is (up + {one}) * glu, not (up + 1) * glu")
    sc = match_or_decline(F(operator.mul, KeywordArg("a"), KeywordArg("b")), k["scaled"], "sigmoid(gate * alpha)")
    need(sc["a"] is gate or sc["b"] is gate, "sigmoid is not taken of alpha times the gate it multiplies")
    alpha = sc["b"] if sc["a"] is gate else sc["a"]
    need(not isinstance(alpha, fx.Node), "gate scale alpha is a tensor, not a Python constant")
    need(_number(alpha), f"gate scale alpha={alpha!r} is not a finite number")

    gb, ub = _clamp_bounds(gate), _clamp_bounds(up)
    need(gb is not None, "gate is not clamped (gate.clamp(max=limit))")
    need(ub is not None, "up is not clamped (up.clamp(min=-limit, max=limit))")
    g_in, g_min, g_max = gb
    u_in, u_min, u_max = ub
    for v in (g_min, g_max, u_min, u_max):
        need(not isinstance(v, fx.Node), "clamp limit is a tensor, not a Python constant")
    need(g_min is None and _number(g_max), f"gate clamp is clamp(min={g_min!r}, max={g_max!r}), not clamp(max=limit)")
    limit = g_max
    need(_number(u_min) and _number(u_max) and u_max == limit and u_min == -limit,
         f"up clamp is clamp(min={u_min!r}, max={u_max!r}), not clamp(min=-{limit!r}, max={limit!r})")

    gi = match_or_decline(getitem(KeywordArg("h"), KeywordArg("index")), g_in, "gate columns h[..., ::2]")
    ui = match_or_decline(getitem(KeywordArg("h"), KeywordArg("index")), u_in, "up columns h[..., 1::2]")
    h = gi["h"]
    need(ui["h"] is h, "gate and up are taken from different tensors")
    rank = len(shape_of(h) or ())
    need(_interleaved_half(gi["index"], rank) == 0 and _interleaved_half(ui["index"], rank) == 1,
         f"gate/up columns are h[{gi['index']!r}] / h[{ui['index']!r}], not interleaved [..., ::2] / [..., 1::2]")
    _unwritten([*m.nodes, gate, up, k["scaled"], g_in, u_in], "GPT-OSS gate")
    return Activation("gptoss", float(alpha), float(limit)).spec, h


def expert_activation(act_out: fx.Node, chunk_dims=(-1, 1)) -> tuple[str, bool, fx.Node]:
    """(activation spec, interleaved, pre-activation h) of the expert body's activation:
    GPT-OSS's clamped gate (interleaved), act(gate) * up with gate, up = h.chunk(2, dim)
    (concatenated), or a plain act(h). Declines otherwise."""
    g = gptoss_activation(act_out)
    if g is not None:
        return g[0], True, g[1]
    if act_out.op == "call_function" and act_out.target is operator.mul and len(act_out.args) == 2:
        for gt, u in (act_out.args, act_out.args[::-1]):
            name, gate = unary_activation(gt) if isinstance(gt, fx.Node) else (None, None)
            if name and gate.op == "call_function" and gate.target is operator.getitem and gate.args[1] == 0 \
                    and isinstance(u, fx.Node) and u.target is operator.getitem and u.args[1] == 1 \
                    and u.args[0] is gate.args[0]:
                ch = gate.args[0]
                if ch.op == "call_method" and ch.target == "chunk" and ch.args[1:] == (2,) \
                        and ch.kwargs.get("dim", None) in chunk_dims:
                    need(name in GATED_OF, f"gated activation {name} unsupported")
                    _unwritten([act_out, gt, gate, u], "gated activation")
                    return GATED_OF[name], False, ch.args[0]
    name, inner = unary_activation(act_out)
    need(name is not None, "expert activation is not a supported (gated) activation")
    return name, False, inner


# --------------------------------------------------------------------------- biases

_VIEW_METHODS = ("squeeze", "unsqueeze", "view", "reshape", "transpose", "permute", "flatten", "contiguous")


def _sole_owner(out: fx.Node) -> bool:
    """``out`` is a fresh GEMM result, or a view chain of one whose every base has ``out``'s
    chain as its only user: an in-place write to ``out`` is then seen by ``out``'s readers only."""
    node = out
    while node.op == "call_method" and node.target in _VIEW_METHODS:
        base = node.args[0]
        if not isinstance(base, fx.Node) or len(base.users) != 1:
            return False
        node = base
    return node.op == "call_function"


def expert_bias(out: fx.Node, same_ids: Callable[[fx.Node], bool], num_experts: int, what: str):
    """Per-expert bias added in place to a GEMM output (transformers' biased experts)::

        out.add_(bias[expert_ids])          # out (A, cols), bias (E, cols)

    Returns (bias, the add_ node), or (None, None) when nothing writes ``out`` in place.
    Declines unless: exactly one in-place write, a plain ``add_`` (no alpha), whose result is
    unused, of ``bias[ids]`` with ``same_ids(ids)`` (the very expert ids of this GEMM's rows),
    same shape as ``out``, before every other reader of ``out``; ``out`` owns its storage;
    nothing writes the bias or the gathered rows. The add_ then belongs to the block: the caller
    lists it in ``MoEBlock.orphans``."""
    writes = [u for u in out.users if is_mutation(u, out)]
    if not writes:
        return None, None
    need(len(writes) == 1, f"{what} is modified in place {len(writes)} times")
    wr = writes[0]
    need(wr.op == "call_method" and wr.target == "add_" and len(wr.args) == 2 and not wr.kwargs,
         f"{what} is modified in place by {wr.format_node()}")
    b = match_or_decline(getitem(KeywordArg("bias"), KeywordArg("ids")), wr.args[1],
                         f"bias added in place to {what} (bias[expert_ids])")
    bias, ids = b["bias"], b["ids"]
    need(isinstance(ids, fx.Node) and same_ids(ids),
         f"bias added in place to {what} is indexed by other ids than the expert ids of its rows")
    need(not wr.users, f"the in-place bias add on {what} is read as a value")
    order = {n: i for i, n in enumerate(out.graph.nodes)}
    need(all(order[u] > order[wr] for u in out.users if u is not wr),
         f"{what} is read before its bias is added")
    need(_sole_owner(out), f"{what} shares storage with another tensor; an in-place bias add would reach it")
    for name, v in (("bias", bias), ("gathered bias", wr.args[1])):
        for u in v.users:
            need(not is_mutation(u, v), f"{name} of {what} is modified in place by {u.format_node()}")
    os_, gs, bs = shape_of(out), shape_of(wr.args[1]), shape_of(bias)
    need(None not in (os_, gs, bs) and len(bs) == 2 and len(os_) == len(gs) == 2
         and all(same(a, c) for a, c in zip(os_, gs)), f"bias of {what} does not have one row per GEMM row")
    need(same(bs[0], num_experts) and same(bs[1], os_[1]), f"bias of {what} is not (E, columns)")
    need(dtype_of(bias) == dtype_of(out), f"bias of {what} has dtype {dtype_of(bias)}, output {dtype_of(out)}")
    return bias, wr
