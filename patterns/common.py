"""Pieces shared by the idiom modules: activation recognition (plain, gated via chunk(2) with the
gate half first or second (``"+up_first"`` specs), the GPT-OSS clamped gate on interleaved columns),
per-expert biases added in place, and grouped-GEMM spellings."""
from __future__ import annotations

import math
import operator
from typing import Callable, Optional

import torch
import torch.fx as fx
import torch.nn.functional as Fn

from moe_inductor.fx import safety
from moe_inductor.ops.activations import UP_FIRST, Activation
from moe_inductor.fx.aliasing import is_view_of
from moe_inductor.fx.decline import Declined, need
from moe_inductor.fx.matching import AnyOf, F, getitem, M, match_or_decline
from moe_inductor.fx.nodes import is_mutation, node_order
from moe_inductor.fx.shapes import dtype_of, same, shape_of
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
#: expert_activation's reason when nothing in the expert body has the shape of an activation
NO_ACTIVATION = "expert activation is not a supported (gated) activation"


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


def after_gemm_reason(node, is_gemm: Callable[[fx.Node], bool], depth: int = 24) -> Optional[str]:
    """When ``node`` (what the routing weight multiplies) is not itself the down-projection GEMM
    but computed from one within ``depth`` nodes (MuseSpark's per-expert RMSNorm after the down
    projection), a precise decline reason naming the ops in between; else None."""
    if not isinstance(node, fx.Node):
        return None
    seen, frontier, gemm = {node}, [node], None
    for _ in range(depth):
        nxt = []
        for n in frontier:
            for i in n.all_input_nodes:
                if i not in seen and i.op in ("call_function", "call_method"):
                    seen.add(i)
                    nxt.append(i)
                    if gemm is None and is_gemm(i):
                        gemm = i
        frontier = nxt
    if gemm is None:
        return None
    between, stack = set(), [gemm]  # nodes on a path gemm -> node
    while stack:
        for u in stack.pop().users:
            if u in seen and u not in between:
                between.add(u)
                stack.append(u)
    names = sorted({str(o.target) if o.op == "call_method" else getattr(o.target, "__name__", str(o.target))
                    for o in between})
    return ("expert output is transformed between the down-projection GEMM and the routing weight ("
            + ", ".join(names) + "; e.g. a per-expert norm): the fused op's expert ends at W2 act(W1 x), "
            "so this block cannot be expressed exactly")


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


def gptoss_activation(act_out: fx.Node) -> Optional[tuple[str, bool, fx.Node]]:
    """GPT-OSS experts' gate on interleaved gate/up columns of h (transformers
    ``GptOssExperts._apply_gate``), or on concatenated ones (MiniMax-M3-VL,
    OpenAI-privacy-filter: ``gate, up = h.chunk(2, dim=-1)``)::

        gate, up = h[..., ::2], h[..., 1::2]
        gate = gate.clamp(min=None, max=limit); up = up.clamp(min=-limit, max=limit)
        out = (up + 1) * (gate * sigmoid(gate * alpha))

    -> ("gptoss:<alpha>:<limit>", interleaved, h): the same formula as ``moe_inductor.ops.activations`` (g *
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

    h, interleaved, up_first, src = gate_up_source(g_in, u_in)
    _unwritten([*m.nodes, gate, up, k["scaled"], g_in, u_in, *src], "GPT-OSS gate")
    return with_layout(Activation("gptoss", float(alpha), float(limit)).spec, up_first), interleaved, h


def _on_axis(dim, rank: int, axis: int) -> bool:
    """``dim`` names the (negative) ``axis`` of a tensor of ``rank`` dimensions."""
    return rank >= -axis and dim in (axis, rank + axis)


def _chunk2(node, axis: int = -1) -> Optional[fx.Node]:
    """h of ``h.chunk(2, dim=-1)`` / ``torch.chunk(h, 2, -1)`` (``dim=1`` when h is 2-D; dim positional
    or keyword; ``axis`` another negative axis), else None."""
    if isinstance(node, fx.Node) and node.op == "call_function" and node.target is torch.chunk:
        args, kwargs = list(node.args), dict(node.kwargs)  # torch.chunk(h, chunks, dim=0)
    elif isinstance(node, fx.Node) and node.op == "call_method" and node.target == "chunk":
        args, kwargs = list(node.args), dict(node.kwargs)
    else:
        return None
    if len(args) == 3 and not kwargs:
        dim = args[2]
    elif len(args) == 2 and set(kwargs) <= {"dim"}:
        dim = kwargs.get("dim", 0)
    else:
        return None
    if args[1] != 2 or not isinstance(args[0], fx.Node):
        return None
    if not _on_axis(dim, len(shape_of(args[0]) or ()), axis):
        return None
    return args[0]


def _split_half(node, axis: int = -1) -> Optional[fx.Node]:
    """h of ``h.split(w // 2, dim=-1)`` / ``torch.split(h, w // 2, -1)`` / ``h.split([w // 2] * 2, -1)``
    (w the last dimension of h; ``axis`` another negative axis), else None."""
    if not isinstance(node, fx.Node) or node.kwargs.keys() - {"dim", "split_size_or_sections", "split_size"}:
        return None
    if not ((node.op == "call_method" and node.target == "split") or
            (node.op == "call_function" and node.target is torch.split)):
        return None
    args = list(node.args)
    h = args[0] if args else None
    size = args[1] if len(args) > 1 else node.kwargs.get("split_size_or_sections", node.kwargs.get("split_size"))
    dim = args[2] if len(args) > 2 else node.kwargs.get("dim", 0)
    shape = shape_of(h) if isinstance(h, fx.Node) else None
    if not shape or not _on_axis(dim, len(shape), axis):
        return None
    width = shape[axis]
    if isinstance(size, (list, tuple)):
        return h if len(size) == 2 and all(same(c * 2, width) for c in size) else None
    return h if not isinstance(size, (fx.Node, type(None))) and same(size * 2, width) else None


def _slice_half(index, width, rank: Optional[int]) -> Optional[int]:
    """0 for ``h[..., :w // 2]``, 1 for ``h[..., w // 2:]`` (``[:, ...]`` when h is 2-D), else None."""
    if not isinstance(index, tuple) or len(index) != 2:
        return None
    lead, last = index
    if not (lead is Ellipsis or (rank == 2 and lead == slice(None))):
        return None
    if not isinstance(last, slice) or last.step not in (None, 1):
        return None
    if last.start in (None, 0) and isinstance(last.stop, int) and same(last.stop * 2, width):
        return 0
    if last.stop is None and isinstance(last.start, int) and same(last.start * 2, width):
        return 1
    return None


def halves(g_in, u_in, axis: int = -1) -> Optional[tuple]:
    """(h, interleaved, intermediate nodes) when g_in / u_in are the first and second halves of the
    last dimension of one tensor h, else None. Concatenated: ``h.chunk(2, -1)[0] / [1]``,
    ``h.split(w // 2, -1)[0] / [1]``, ``h[..., :w // 2] / h[..., w // 2:]`` (vLLM's ``SiluAndMul``);
    interleaved: ``h[..., ::2] / h[..., 1::2]``. ``axis``: another (negative) axis, for the chunk and
    split spellings only (SGLang's ``torch.chunk(w13[ids], 2, dim=2)`` of gathered weights: axis -2);
    the two halves must then have the same size (an odd length chunks unevenly)."""
    if not all(isinstance(n, fx.Node) and n.op == "call_function" and n.target is operator.getitem
               and len(n.args) == 2 for n in (g_in, u_in)):
        return None
    if g_in.args[0] is not u_in.args[0]:
        return None
    src, gi, ui = g_in.args[0], g_in.args[1], u_in.args[1]
    h = _chunk2(src, axis)
    if h is None:
        h = _split_half(src, axis)
    if h is not None and axis != -1:
        sg, su, sh = shape_of(g_in), shape_of(u_in), shape_of(h)
        if not (sg and su and sh and same(sg[axis], su[axis]) and same(sg[axis] * 2, sh[axis])):
            return None
    if h is not None:
        return (h, False, [src]) if (gi, ui) == (0, 1) else None
    shape = shape_of(src) if isinstance(src, fx.Node) else None
    if not shape or axis != -1:
        return None
    rank = len(shape)
    if _slice_half(gi, shape[-1], rank) == 0 and _slice_half(ui, shape[-1], rank) == 1:
        return src, False, []
    if _interleaved_half(gi, rank) == 0 and _interleaved_half(ui, rank) == 1:
        return src, True, []
    return None


def gate_up_halves(g_in, u_in, axis: int = -1) -> Optional[tuple]:
    """(h, interleaved, up_first, intermediate nodes) when gate / up are the two halves of one tensor h
    (``halves``) in either order: gate first (up_first False), or up first (rxlm's
    ``lin, gate = h.chunk(2, -1); lin * act(gate)``: up_first True, ``Activation.up_first``). The same
    halves taken in the other order, nothing else: the same half twice is neither."""
    found = halves(g_in, u_in, axis)
    if found is not None:
        return found[0], found[1], False, found[2]
    found = halves(u_in, g_in, axis)
    return None if found is None else (found[0], found[1], True, found[2])


def with_layout(spec: str, up_first: bool) -> str:
    """The activation spec of a gated activation whose up half comes first when ``up_first``."""
    return spec + UP_FIRST if up_first else spec


def gate_up_source(g_in: fx.Node, u_in: fx.Node) -> tuple[fx.Node, bool, bool, list]:
    """``gate_up_halves`` (h, interleaved, up_first, intermediate nodes) of gate/up, or a decline with the
    reason."""
    gi = match_or_decline(getitem(KeywordArg("h"), KeywordArg("index")), g_in, "gate columns of h")
    ui = match_or_decline(getitem(KeywordArg("h"), KeywordArg("index")), u_in, "up columns of h")
    need(ui["h"] is gi["h"], "gate and up are taken from different tensors")
    found = gate_up_halves(g_in, u_in)
    need(found is not None,
         f"gate/up columns are [{gi['index']!r}] / [{ui['index']!r}] of one tensor, not its two halves "
         "(first / second in either order) nor interleaved [..., ::2] / [..., 1::2] (either order)")
    return found


def _float_cast(node) -> Optional[fx.Node]:
    """x of ``x.float()`` / ``x.to(torch.float32)``, else None."""
    if not (isinstance(node, fx.Node) and node.op == "call_method" and not node.kwargs):
        return None
    if node.target == "float" and len(node.args) == 1:
        return node.args[0]
    if node.target == "to" and len(node.args) == 2 and node.args[1] is torch.float32:
        return node.args[0]
    return None


def _peel_float(node):
    """(x, cast node) for ``x.float()``, else (node, None)."""
    inner = _float_cast(node)
    return (inner, node) if inner is not None else (node, None)


def _is_mul(node) -> bool:
    return (isinstance(node, fx.Node) and node.op == "call_function" and node.target is operator.mul
            and len(node.args) == 2 and not node.kwargs)


def _mul_operands(node):
    return tuple(node.args) if _is_mul(node) else None


def _const(v, what: str) -> float:
    need(not isinstance(v, fx.Node), f"{what} is a tensor, not a Python constant")
    need(_number(v), f"{what}={v!r} is not a finite number")
    return float(v)


def _softcap(node) -> Optional[tuple[fx.Node, object]]:
    """(z, c) of ``tanh(z / c) * c`` (either product order), else None; c unchecked."""
    ops = _mul_operands(node)
    if ops is None:
        return None
    for t, c in (ops, ops[::-1]):
        if (isinstance(t, fx.Node) and t.op == "call_function" and t.target is torch.tanh and len(t.args) == 1
                and not t.kwargs):
            q = t.args[0]
            if (isinstance(q, fx.Node) and q.op == "call_function" and q.target is operator.truediv
                    and len(q.args) == 2 and not q.kwargs and isinstance(q.args[0], fx.Node)):
                need(not isinstance(c, fx.Node) and not isinstance(q.args[1], fx.Node),
                     "softcap constant is a tensor, not a Python constant")
                need(_number(c) and c == q.args[1] and c != 0,
                     f"softcap is tanh(z / {q.args[1]!r}) * {c!r}: divisor and factor differ")
                return q.args[0], c
    return None


def softcap_swiglu_activation(act_out: fx.Node):
    """Inkling2's ``Inkling2SoftcappedSwiGLU``::

        (softcap(gate, cg) * sigmoid(gate)) * softcap(up, cu),  softcap(z, c) = tanh(z / c) * c

    (gate, up as ``gate_up_source``, optionally ``.float()`` each) -> ("softcap_swiglu:cg:cu",
    interleaved, h, [float casts]). None when ``act_out`` is not a product with a softcap factor
    next to a sigmoid; Declined when it is but a piece does not match."""
    ops = _mul_operands(act_out)
    if ops is None:
        return None
    for left, right in (ops, ops[::-1]):
        lo = _mul_operands(left)
        cu = _softcap(right) if lo is not None else None
        if cu is None:
            continue
        for sc, sg in (lo, lo[::-1]):
            cg = _softcap(sc)
            if cg is None:
                continue
            gate, cgv = cg
            need(isinstance(sg, fx.Node) and sg.op == "call_function" and sg.target in (torch.sigmoid, Fn.sigmoid)
                 and len(sg.args) == 1 and not sg.kwargs,
                 "softcapped gate is not multiplied by sigmoid(gate)")
            need(sg.args[0] is gate, "sigmoid is taken of another tensor than the softcapped gate")
            up, cuv = cu
            g_in, g_cast = _peel_float(gate)
            u_in, u_cast = _peel_float(up)
            need((g_cast is None) == (u_cast is None), "only one of gate/up is cast with .float()")
            h, interleaved, up_first, src = gate_up_source(g_in, u_in)
            casts = [c for c in (g_cast, u_cast) if c is not None]
            nodes = [act_out, left, right, sc, sg, *[a for n in (sc, right) for a in n.all_input_nodes],
                     gate, up, g_in, u_in, *src, *casts]
            _unwritten(nodes, "softcapped SwiGLU")
            spec = Activation("softcap_swiglu", _const(cgv, "gate softcap"), _const(cuv, "up softcap")).spec
            return with_layout(spec, up_first), interleaved, h, casts
    return None


def _relu2(node):
    """h of ``square(relu(h))`` / ``relu(h) ** 2`` / ``relu(h).pow(2)``, else None."""
    if not isinstance(node, fx.Node):
        return None
    inner = None
    if node.op == "call_function" and node.target in (torch.square,) and len(node.args) == 1 and not node.kwargs:
        inner = node.args[0]
    elif (node.op == "call_function" and node.target in (operator.pow, torch.pow) and len(node.args) == 2
          and not node.kwargs and node.args[1] == 2 and not isinstance(node.args[1], (bool, fx.Node))):
        inner = node.args[0]
    elif (node.op == "call_method" and node.target in ("pow", "square") and not node.kwargs
          and (node.args[1:] == (2,) if node.target == "pow" else len(node.args) == 1)
          and not isinstance(node.args[-1], bool)):
        inner = node.args[0]
    if not isinstance(inner, fx.Node):
        return None
    name, h = unary_activation(inner)
    if name != "relu":
        return None
    return h, inner


def _out_cast(node: fx.Node):
    """(y, D) for ``y.to(D)`` with D a dtype constant, or ``y.type_as(t)`` (fairseq's
    ``gelu(x.float()).type_as(x)``: D is the cast's recorded dtype), else (node, None)."""
    if (node.op == "call_method" and node.target == "to" and len(node.args) == 2 and not node.kwargs
            and isinstance(node.args[0], fx.Node) and isinstance(node.args[1], torch.dtype)):
        return node.args[0], node.args[1]
    if (node.op == "call_method" and node.target == "type_as" and len(node.args) == 2 and not node.kwargs
            and isinstance(node.args[0], fx.Node) and isinstance(node.args[1], fx.Node)
            and dtype_of(node) is not None):
        return node.args[0], dtype_of(node)
    return node, None


def _check_casts(act_out: fx.Node, h: fx.Node, float_casts, out_cast) -> None:
    """``.float()`` on the activation inputs and ``.to(D)`` on its output (Beam, Inkling2) are
    exactly the fused op's own precision rule (math in fp32 for fp32/fp16/bf16 h, result in h's
    dtype) when h is one of those dtypes and the activation's result has h's dtype."""
    if not float_casts and out_cast is None:
        return
    hd = dtype_of(h)
    if float_casts:
        need(hd in (torch.float32, torch.float16, torch.bfloat16),
             f"activation inputs are cast with .float() from {hd}: not the op's precision rule")
    need(dtype_of(act_out) == hd, f"activation result has dtype {dtype_of(act_out)}, h has {hd}: "
         "the fused op returns the activation in h's dtype")


def _swiglu_limit(gate_bounds, up_bounds, what: str) -> float:
    """L of a clamped SwiGLU's bounds: gate ``clamp(max=L)``, up ``clamp(min=-L, max=L)``, L a
    finite Python number or inf (transformers' Step-3.7 writes "no clamp" as L = inf: both clamps
    are then the identity, and the activation is plain SwiGLU). Declines otherwise."""
    g_min, g_max = gate_bounds
    u_min, u_max = up_bounds
    for v in (g_min, g_max, u_min, u_max):
        need(not isinstance(v, fx.Node), "clamp limit is a tensor, not a Python constant")
    need(g_min is None and (_number(g_max) or g_max == math.inf),
         f"{what} is clamp(min={g_min!r}, max={g_max!r}), not clamp(max=limit)")
    need(not isinstance(u_min, bool) and not isinstance(u_max, bool) and u_max == g_max and u_min == -g_max,
         f"up clamp is clamp(min={u_min!r}, max={u_max!r}), not clamp(min=-{g_max!r}, max={g_max!r})")
    return float(g_max)


def zero_offset(node):
    """x of ``x + 0`` / ``0 + x`` / ``x - 0`` (a Python zero, same shape and dtype: Megatron-Core's
    ``x_linear + glu_linear_offset`` with the default offset 0.0), else ``node``. The value is x's (a
    negative zero becomes +0, equal as a number) and so is the gradient."""
    if isinstance(node, fx.Node) and node.op == "call_function" and node.target in (operator.add, operator.sub) \
            and len(node.args) == 2 and not node.kwargs:
        a, b = node.args
        for x, z in ((a, b), (b, a)) if node.target is operator.add else ((a, b),):
            if isinstance(x, fx.Node) and type(z) in (int, float) and z == 0 and safety.same_shape(x, node) \
                    and dtype_of(x) == dtype_of(node):
                return safety.strip_identity(x)
    return node


def expert_activation(act_out: fx.Node) -> tuple[str, bool, fx.Node]:
    """(activation spec, interleaved, pre-activation h) of the expert body's activation:
    GPT-OSS's clamped gate (interleaved or concatenated), Inkling2's softcapped SwiGLU,
    act(gate) * up with gate, up the halves of h in either order (``gate_up_halves``: chunk, split, slices;
    up first gives the spec ``"<kind>+up_first"``) (or ``.float()`` of each, optionally the
    clamped SwiGLU ``silu(gate.clamp(max=L)) * up.clamp(-L, L)`` or the SwiGLU clamped after the
    activation ``silu(gate).clamp(max=L) * up.clamp(-L, L)`` (Step-3.7); L = inf is plain SwiGLU),
    relu(h)**2, or a plain act(h), optionally followed by ``.to(h.dtype)``. Declines otherwise."""
    outer = act_out
    act_out, out_dtype = _out_cast(act_out)
    out_cast = outer if out_dtype is not None else None
    g = gptoss_activation(act_out)
    if g is not None:
        _check_casts(outer, g[2], [], out_cast)
        return g
    sc = softcap_swiglu_activation(act_out)
    if sc is not None:
        spec, interleaved, h, casts = sc
        _check_casts(outer, h, casts, out_cast)
        return spec, interleaved, h
    if act_out.op == "call_function" and act_out.target is operator.mul and len(act_out.args) == 2:
        for gt, u in (act_out.args, act_out.args[::-1]):
            post = _clamp_bounds(gt)  # act(gate).clamp(...): clamped after the activation
            if post is not None and not (isinstance(post[0], fx.Node) and unary_activation(post[0])[0]):
                post = None
            act_node = post[0] if post is not None else gt
            name, gate = unary_activation(act_node) if isinstance(act_node, fx.Node) else (None, None)
            if not name or not isinstance(u, fx.Node):
                continue
            u = zero_offset(u)  # Megatron-Core's ``x_linear + glu_linear_offset`` (0.0 by default)
            gb, ub = _clamp_bounds(gate), _clamp_bounds(u)
            if post is not None:
                need(gb is None, "gate is clamped both before and after the activation")
                g_c, u_c = gate, (u if ub is None else ub[0])
            else:
                g_c, u_c = (gate, u) if gb is None or ub is None else (gb[0], ub[0])
            g_in, g_cast = _peel_float(g_c)
            u_in, u_cast = _peel_float(u_c)
            try:
                h, interleaved, up_first, src = gate_up_source(g_in, u_in)
            except Declined:
                continue
            if interleaved or h is None:
                continue  # act(h[..., ::2]) * h[..., 1::2] is not matched (as before)
            need((g_cast is None) == (u_cast is None), "only one of gate/up is cast with .float()")
            casts = [c for c in (g_cast, u_cast) if c is not None]
            inter = [act_out, gt, act_node, gate, u, g_in, u_in, *casts]
            if post is not None:
                need(ub is not None, "gate is clamped after the activation, up is not clamped")
                need(name == "silu", f"gated activation {name} clamped after it: only SwiGLU is supported")
                need(not casts, "SwiGLU clamped after the activation with .float() casts is not supported")
                limit = _swiglu_limit(post[1:], ub[1:], "gate clamp after the activation")
                _unwritten(inter, "clamped SwiGLU")
                _check_casts(outer, h, [], out_cast)
                spec = "swiglu" if limit == math.inf else Activation("swiglu_limit_after", limit=limit).spec
                return with_layout(spec, up_first), False, h
            if gb is not None and ub is not None:
                need(name == "silu", f"clamped gated activation {name}: only the clamped SwiGLU is supported")
                need(not casts, "clamped SwiGLU with .float() casts inside the clamps is not supported")
                limit = _swiglu_limit(gb[1:], ub[1:], "gate clamp")
                _unwritten(inter, "clamped SwiGLU")
                _check_casts(outer, h, [], out_cast)
                spec = "swiglu" if limit == math.inf else Activation("swiglu_limit", limit=limit).spec
                return with_layout(spec, up_first), False, h
            need(gb is None and ub is None, "only one of gate/up is clamped")
            need(name in GATED_OF, f"gated activation {name} unsupported")
            _unwritten(inter, "gated activation")
            _check_casts(outer, h, casts, out_cast)
            return with_layout(GATED_OF[name], up_first), False, h
    r2 = _relu2(act_out)
    if r2 is not None:
        h, relu_node = r2
        _unwritten([act_out, relu_node], "relu^2 activation")
        _check_casts(outer, h, [], out_cast)
        return "relu2", False, h
    name, inner = unary_activation(act_out)
    need(name is not None, NO_ACTIVATION)
    inner, cast = _peel_float(inner)  # act(h.float()), cast back by ``out_cast``
    _check_casts(outer, inner, [cast] if cast is not None else [], out_cast)
    return name, False, inner


# --------------------------------------------------------------------------- biases

def _sole_owner(out: fx.Node) -> bool:
    """``out`` is a fresh GEMM result, or a view chain of one whose every base has ``out``'s
    chain as its only user: an in-place write to ``out`` is then seen by ``out``'s readers only.
    The chain is followed through every op that may alias (``fx.aliasing.is_view_of``: a write into
    ``out`` reaches each base), not only the reshapes: a shorter list let ``torch.reshape`` or a
    basic index of a shared tensor pass as fresh."""
    node = out
    while node.op in ("call_function", "call_method") and node.args and isinstance(node.args[0], fx.Node) \
            and is_view_of(node, node.args[0]):
        base = node.args[0]
        if len(base.users) != 1:
            return False
        node = base
    return node.op == "call_function" and not (node.args and is_mutation(node, node.args[0]))


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
    order = node_order(out.graph)
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
