"""Experts part (per expert): ``f_e`` as the graph computes it, mapped to a canonical ``ExpertMLP``.

One projection (``projection``) is any of
  ``linear(z, W[, b])``                      an ``nn.Linear`` of a ModuleList/ModuleDict, any attribute name
  ``linear(z, P[e][, b])``                   stacked parameters indexed per expert
  ``z @ W.t()``, ``matmul(z, W.T)``, ``mm(z, W.transpose(0, 1))``   the same, spelled as a GEMM
  ``z @ P[e]``, ``mm(z, P[e])``              weights stored (in, out): used transposed
  ``LinearFn.apply(z, W[, b])[0]``           an autograd.Function proven to be ``F.linear`` in value and
                                             gradient (``safety.linear_function_operands``: Megatron-Core's
                                             parallel linears at world size 1)
each optionally followed by ``+ b``, and each also adapted by a scaled low-rank product (LoRA)
  ``W z [+ b] + s * B(A z)``                 read as one projection with the weight ``W + s * (B @ A)``
                                             (``low_rank``: ``parts.LowRankWeight``, built in the graph by
                                             the composition; proven, or declined with its reason)
The MLP (``mlp``) is
  ``down(act(gate(z)) * up(z))``             gated (SwiGLU, GeGLU), either operand order, ``x * sigmoid(x)`` for silu
  ``down(act(gate_up(z).chunk(2, -1)[0]) * gate_up(z).chunk(2, -1)[1])``   fused gate/up weights (gate first)
  ``down(gate_up(z).chunk(2, -1)[0] * act(gate_up(z).chunk(2, -1)[1]))``   fused, up first (rxlm's
                                             ``GatedLinearUnit``): activation spec ``"<kind>+up_first"``
  ``down(act(up(z)))``                       plain (silu, gelu, gelu-tanh, relu)
with identity dropout (eval or p == 0), casts to the same dtype and ``contiguous`` allowed between.
Weights are returned in Linear layout (out, in); ``transposed`` names those the composition must
transpose (views, no copies).

An expert that computes nothing (``identity``, part ``identity_experts``): its output is its input
rows ``x[index]`` themselves (LongCat-Flash's zero-computation experts, ``nn.Identity``), with only
identity dropout, same-dtype casts, ``contiguous`` and shape-keeping views between; a scale, a bias
or a dtype-changing cast makes it something else.
"""
from __future__ import annotations

import math
import operator
from typing import Optional

import torch
import torch.fx as fx

from moe_inductor.fx import safety
from moe_inductor.fx.decline import Declined, need
from moe_inductor.fx.matching import transpose_of
from moe_inductor.fx.nodes import downstream, node_order
from moe_inductor.fx.shapes import dtype_of, int_value, same, same_dim, shape_of
from moe_inductor.fx.targets import LINEAR_FUNCTIONS, MATMUL_FUNCTIONS, MATMUL_METHODS
from moe_inductor.recognize.parts import ExpertMLP, IdentityExpert, LowRankWeight, decline, recognise, register
from moe_inductor.lower.rewrite import gemm_name

from .common import GATED_OF, NO_ACTIVATION, expert_activation, gate_up_halves, halves, unary_activation, \
    with_layout, zero_offset

_LINEAR = LINEAR_FUNCTIONS


def projection(node) -> Optional[tuple]:
    """(input, weight, transposed, bias) of one expert projection, or None."""
    if not isinstance(node, fx.Node):
        return None
    bias = None
    linear = safety.linear_function_operands(node)  # an autograd.Function proven to be F.linear
    if linear is not None:
        return linear[0], linear[1], False, linear[2]
    if _is_add(node):
        for a, b in (node.args, node.args[::-1]):
            inner = projection(a) if isinstance(a, fx.Node) else None  # once per operand: linear recursion
            if inner is None:
                continue
            bias = row_bias(b, a, node) if inner[3] is None else None
            if bias is not None:
                return inner[0], inner[1], inner[2], bias
            merged = low_rank(node, a, inner, b)
            if isinstance(merged, tuple):
                return merged
        return None
    if node.op == "call_function" and node.target in _LINEAR:
        args = list(node.args) + [None] * (3 - len(node.args))
        z, w, b = args[0], args[1], node.kwargs.get("bias", args[2])
        if isinstance(z, fx.Node) and isinstance(w, fx.Node) and len(shape_of(w) or ()) == 2:
            return z, w, False, b
        return None
    if (node.op == "call_function" and node.target in MATMUL_FUNCTIONS and len(node.args) == 2) or \
            (node.op == "call_method" and node.target in MATMUL_METHODS and len(node.args) == 2):
        z, wt = node.args
        if not isinstance(z, fx.Node) or not isinstance(wt, fx.Node) or len(shape_of(wt) or ()) != 2:
            return None
        if len(shape_of(z) or ()) != 2:
            return None
        w = transpose_of(wt)
        if w is not None:
            return z, w, False, None
        return z, wt, True, None
    return None


def _is_add(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in (operator.add, torch.add) \
        and len(node.args) == 2 and not node.kwargs


def _number(c) -> bool:
    return isinstance(c, (int, float)) and not isinstance(c, bool)


def _factor(node) -> tuple:
    """(c, inner, why) for ``node`` = c * inner through identities (``safety.strip_identity``) and
    products by Python numbers (``y * c``, ``c * y``, ``y.mul(c)``, ``torch.mul``), c their product
    (1.0 for none); a product by a tensor is followed to its operand that is a plain projection, with
    ``why`` saying so (a near miss, never accepted)."""
    c, why = 1.0, None
    while isinstance(node, fx.Node):
        node = safety.strip_identity(node)
        if not ((node.op == "call_function" and node.target in _MUL) or (node.op == "call_method"
                                                                          and node.target == "mul")) \
                or len(node.args) != 2 or node.kwargs:
            break
        y, k = node.args if not _number(node.args[0]) else node.args[::-1]
        if _number(k) and isinstance(y, fx.Node):
            c, node = c * k, y
            continue
        ops = [(p, q) for p, q in (node.args, node.args[::-1])
               if _plain_projection(safety.strip_identity(p)) is not None and isinstance(q, fx.Node)]
        if len(ops) != 1:
            break
        why = why or f"{node.name}: the low-rank product is multiplied by {ops[0][1].name}, a tensor, not one " \
                     f"Python constant"
        node = ops[0][0]
    return c, node, why


def _plain_projection(node) -> Optional[tuple]:
    """``projection`` of a GEMM without bias on a weight node (a low-rank factor): never an add, so the
    search of ``low_rank`` does not recurse through sums."""
    if not isinstance(node, fx.Node) or _is_add(node):
        return None
    p = projection(node)
    return p if p is not None and p[3] is None and isinstance(p[1], fx.Node) else None


def _linear_dims(p) -> Optional[tuple]:
    """(out, in) of projection ``p``'s weight in Linear layout."""
    s = shape_of(p[1])
    return None if s is None or len(s) != 2 else (s[1], s[0]) if p[2] else (s[0], s[1])


def _outside_reader(top: fx.Node, bottom: fx.Node, reader: fx.Node) -> Optional[tuple]:
    """(n, u): a node n on a path from ``bottom`` to ``top`` (both included) read by a node u off
    those paths (``top`` may be read by ``reader`` only); None when the paths are private."""
    order = node_order(top.graph)
    down = downstream(bottom, top, order)
    on, stack = {top}, [top]
    while stack:
        for a in stack.pop().all_input_nodes:
            if a in down and a not in on:
                on.add(a)
                stack.append(a)
    for n in sorted(on, key=order.__getitem__):
        for u in n.users:
            if u not in on and not (n is top and u is reader):
                return n, u
    return None


def low_rank(node: fx.Node, base_out: fx.Node, base: tuple, term) -> Optional[object]:
    """The projection ``node = base_out + term`` = ``W x + s * B(A x)`` (a linear adapted by a scaled
    low-rank product, LoRA: mistral-inference's ``LoRALinear``, PEFT's ``Linear``) as (x, LowRankWeight,
    transposed, bias): ``base`` = projection(base_out) (x, W, transposed, bias), ``term`` = ``s * B(A
    x)`` with A and B plain projections without bias (``F.linear``, ``z @ A.T``, ``z @ A``), s a finite
    Python number applied before B, after it, or not at all (1.0). Equal to ``(W + s * B @ A) x`` up to
    rounding. None when ``term`` is not shaped so; a reason string when it is but not proven (``
    _low_rank_reason``)."""
    c, yb, why = _factor(term)
    pb = _plain_projection(yb)
    if pb is None or not isinstance(base[1], fx.Node):
        return None
    c2, ya, why2 = _factor(pb[0])
    pa = _plain_projection(ya)
    if pa is None:
        return None
    scale = float(c * c2)
    why = why or why2 or _low_rank_reason(node, base_out, base, term, scale, pa, pb, ya)
    if why is not None:
        return f"{node.name}: a linear plus a low-rank product, not merged: {why}"
    return base[0], LowRankWeight(base=base[1], a=pa[1], b=pb[1], scale=scale, base_t=base[2], a_t=pa[2],
                                  b_t=pb[2], at=node), base[2], base[3]


def _low_rank_reason(node, base_out, base, term, scale, pa, pb, ya) -> Optional[str]:
    """Why ``base_out + term`` is not provably ``(W + scale * B @ A) x``, else None."""
    if not math.isfinite(scale):
        return f"the scale {scale!r} is not finite"
    if not safety.equivalent(safety.strip_identity(pa[0]), safety.strip_identity(base[0])):
        return f"the low-rank branch reads {pa[0].name}, the linear reads {base[0].name}"
    w, a, b = _linear_dims(base), _linear_dims(pa), _linear_dims(pb)
    if w is None or a is None or b is None or not (same(a[1], w[1]) and same(b[0], w[0]) and same(a[0], b[1])):
        return f"the factors {pa[1].name}, {pb[1].name} are not (r, in) and (out, r) for the weight {base[1].name}"
    if not dtype_of(base[1]) == dtype_of(pa[1]) == dtype_of(pb[1]) or \
            not dtype_of(node) == dtype_of(base_out) == dtype_of(term):
        return "the weights or the summands differ in dtype"
    if not (safety.same_shape(node, base_out) and safety.same_shape(term, base_out)):
        return "the sum broadcasts"
    if set(base_out.users) != {node}:
        return f"the linear's output {base_out.name} is read by something else too"
    other = _outside_reader(term, ya, node)
    if other is not None:
        return f"{other[0].name} of the low-rank branch is also read by {other[1].name}"
    return None


def low_rank_miss(out, limit: int = 48) -> Optional[str]:
    """The reason of the first linear plus low-rank product (``low_rank``) among the ``limit`` nodes
    nearest up the graph from the expert output ``out`` (not beyond a gather of rows: the expert's
    input) that is shaped so but not proven."""
    seen, stack = set(), [out]
    while stack and len(seen) < limit:
        n = stack.pop(0)
        if not isinstance(n, fx.Node) or n in seen:
            continue
        seen.add(n)
        if recognise("gather", n) is not None:
            continue
        if _is_add(n):
            for a, b in (n.args, n.args[::-1]):
                inner = projection(a) if isinstance(a, fx.Node) else None
                got = low_rank(n, a, inner, b) if inner is not None else None
                if isinstance(got, str):
                    return got
        stack += n.all_input_nodes
    return None


def _unit_row_source(b: fx.Node) -> Optional[fx.Node]:
    """B when ``b`` is a 1-D B of length n seen as one (1, n) row: ``B.view(1, -1)``, ``B.reshape(1, n)``
    (a 1-D tensor viewed as (1, n) keeps its elements in order), ``B.unsqueeze(0)``, ``B[None]``,
    ``B[None, :]``; None otherwise."""
    if not isinstance(b, fx.Node) or not b.args or not isinstance(b.args[0], fx.Node):
        return None
    src, s = b.args[0], shape_of(b.args[0])
    if s is None or len(s) != 1:
        return None
    if b.op == "call_method" and b.target in ("view", "reshape") or \
            (b.op == "call_method" and b.target == "unsqueeze" and len(b.args) == 2 and b.args[1] in (0, -2)) or \
            (b.op == "call_function" and b.target is operator.getitem
             and b.args[1] in (None, (None,), (None, slice(None)), (None, Ellipsis))):
        return src
    return None


def row_bias(b, out, added) -> Optional[fx.Node]:
    """The 1-D bias B (n,) when ``added = out + b`` adds B to every row of the (.., n) tensor ``out``:
    ``b`` is B itself or B seen as one (1, n) row (``B.view(1, -1)``, ``unsqueeze(0)``, ``B[None]``:
    vLLM's ``b_bias[i].view(1, -1).to(dtype)``), through same-dtype casts, in ``out``'s dtype, and the
    sum has ``out``'s shape. None otherwise: a bias of another width (a per-expert scalar broadcast over
    the columns), a (rows, 1) or (n, 1) tensor (broadcast over the other axis), a bias in another
    dtype (the add would round it). A 1-D ``b`` is returned as the graph adds it (casts kept)."""
    if not isinstance(b, fx.Node) or not isinstance(out, fx.Node):
        return None
    s = shape_of(b)
    if s is not None and len(s) == 2 and int_value(s[0]) == 1:  # one row: its 1-D source, one dtype
        b = safety.strip_identity(_unit_row_source(safety.strip_identity(b)))
        s = shape_of(b) if isinstance(b, fx.Node) else None
        if not dtype_of(b) == dtype_of(out) == dtype_of(added):
            return None
    so = shape_of(out)
    if s is None or len(s) != 1 or not so or not same(s[0], so[-1]) or not safety.same_shape(added, out):
        return None
    return b


def _gemm_of(node: fx.Node) -> str:
    n = node
    while n.op == "call_function" and n.target in (operator.add, torch.add):  # + bias, + low-rank product
        n = next(a for a in n.args if isinstance(a, fx.Node) and projection(a) is not None)
    if n.op == "call_function" and n.target in _LINEAR or safety.linear_function_operands(n) is not None:
        return gemm_name(_LINEAR[0])
    if n.op == "call_function" and n.target is torch.mm or (n.op == "call_method" and n.target == "mm"):
        return "aten::mm"
    return "aten::matmul"


def _chunk_halves(a, b) -> tuple[Optional[fx.Node], bool]:
    """(h, up_first): the fused gate_up output h if gate a and up b are its concatenated halves in either
    order (``common.gate_up_halves``), up_first when b is the first half; (None, False) otherwise."""
    found = gate_up_halves(a, b)
    return (found[0], found[2]) if found is not None and not found[1] else (None, False)


@register("experts", "mlp", "ModuleList of Linears (any names, biases), fused gate_up, stacked P[e], z @ W.t()")
def mlp(out) -> Optional[ExpertMLP]:
    """The expert MLP whose output is ``out``; its ``input`` is the node both projections read. A linear
    plus a low-rank product that is not proven (``low_rank``) declines with its reason."""
    core = safety.strip_identity(out)
    if projection(core) is None:
        _decline_row_normalisation(core)
        _decline_low_rank_miss(core, 1)
        return None
    try:
        return walk_mlp(out, projection, "experts", _gemm_of(core), more_activations=True)
    except Declined:
        _decline_low_rank_miss(core)
        raise


_ROW_FUNCTIONS = {torch.softmax: "softmax", torch.nn.functional.softmax: "softmax", torch.log_softmax: "log_softmax",
                  torch.nn.functional.log_softmax: "log_softmax"}


def _decline_row_normalisation(core) -> None:
    """Decline, naming it, an expert MLP followed by a softmax / log_softmax of its output (David
    Rau's ``MLP``: Linear, ReLU, Linear, ``nn.Softmax(1)``): each output element then depends on the
    whole row the down projection wrote, which the fused op (``down(act(up(x)))`` per expert, weighted
    and summed) cannot compute. Returns when ``core`` is not such a function of an expert MLP."""
    name = _ROW_FUNCTIONS.get(core.target) if core.op == "call_function" else (
        core.target if core.op == "call_method" and core.target in ("softmax", "log_softmax") else None)
    if name is None or not core.args or not isinstance(core.args[0], fx.Node):
        return
    inner = safety.strip_identity(core.args[0])
    try:
        found = projection(inner) is not None and walk_mlp(inner, projection, "experts", _gemm_of(inner),
                                                            more_activations=True)
    except Declined:
        return
    if found:
        decline("experts", f"{core.name} ({_line_of(core)}): the expert ends with {name} over its down projection's "
                           f"output ({inner.name}): every output element depends on the whole row, which the fused "
                           f"op (down(act(up(x))) per expert, weighted and summed) cannot compute")


def _decline_low_rank_miss(out, limit: int = 48) -> None:
    why = low_rank_miss(out, limit)
    if why is not None:
        decline("experts", why)


@register("identity_experts", "identity", "the expert returns its input rows x[index] (LongCat-Flash zero experts)")
def identity(out) -> Optional[IdentityExpert]:
    z = safety.strip_identity(out)
    if recognise("gather", z) is None:
        return None
    return IdentityExpert(input=z, output=out)


_MUL = (operator.mul, torch.mul)


def walk_mlp(out, proj, part: str, gemm: str, check=None, more_activations: bool = False,
             scaled: bool = False) -> Optional[ExpertMLP]:
    """``down(act(gate(z)) [* up(z)])`` ending at ``out``, with ``proj`` recognising one projection
    ((input, weight, transposed, bias) or None): the per-expert ``projection`` above, or a batched
    one over expert slots (``patterns/expert_slots.py``). ``check(node)`` may decline intermediate
    nodes (dropout); ``more_activations``: also the fused-gate_up activations of ``common.py``;
    ``scaled``: also ``down(act(...) * s)`` with s one factor per row (``row_scaled``), returned as
    ``ExpertMLP.row_scale`` (only for a caller that takes the scores from there)."""
    down = proj(safety.strip_identity(out))
    if down is None:
        return None
    mid = safety.strip_identity(safety.autocast_round_trip(down[0]))
    if check is not None:
        check(mid)
    transposed = {"down": down[2]}
    found = row_scaled(mid) if scaled else None
    if found is not None:
        need(down[3] is None, f"{mid.name}: the rows are scaled before a down projection with a bias: the op "
                              f"scales the bias too, the graph does not", part=part)
        mid, transposed["row_scale"] = safety.strip_identity(found[0]), found[1]
        if check is not None:
            check(mid)
    if mid.op == "call_function" and mid.target in _MUL and len(mid.args) == 2:
        for a, b in (mid.args, mid.args[::-1]):
            if not isinstance(a, fx.Node) or not isinstance(b, fx.Node):
                continue
            name, inner = unary_activation(a)
            if name is None:
                continue
            h, up_first = _chunk_halves(inner, zero_offset(safety.strip_identity(b)))
            if h is not None:
                g = proj(safety.strip_identity(h))
                if g is None:
                    continue
                need(name in GATED_OF, f"{a.name}: gated activation {name} is not supported", part=part)
                transposed["gate"] = g[2]
                spec = with_layout(GATED_OF[name], up_first)
                return _with_layout(ExpertMLP(input=g[0], output=out, activation=spec, gate=g[1],
                                              down=down[1], b_gate=g[3], b_down=down[3], gemm=gemm), transposed)
            g = proj(safety.strip_identity(inner))
            u = proj(zero_offset(safety.strip_identity(b)))
            if g is not None and u is not None and safety.equivalent(g[0], u[0]):
                need(name in GATED_OF, f"{a.name}: gated activation {name} is not supported", part=part)
                need((g[3] is None) == (u[3] is None), "gate and up projections differ in having a bias", part=part)
                transposed.update(gate=g[2], up=u[2])
                return _with_layout(ExpertMLP(input=g[0], output=out, activation=GATED_OF[name], gate=g[1],
                                              up=u[1], down=down[1], b_gate=g[3], b_up=u[3], b_down=down[3],
                                              gemm=gemm), transposed)
    name, inner = unary_activation(mid)
    if check is not None and inner is not None:
        check(inner)
    if name is None:
        # the other activations of fused gate_up weights: clamped SwiGLU, softcapped SwiGLU, GPT-OSS's
        # clamped gate, relu^2, casts around the activation (patterns/common.py)
        spec, why = None, ""
        if more_activations:
            try:
                spec, interleaved, h = expert_activation(mid)
            except Declined as e:
                spec, why = None, str(e)
        g = proj(safety.strip_identity(h)) if spec is not None else None
        if g is not None:
            transposed["gate"] = g[2]
            return _with_layout(ExpertMLP(input=g[0], output=out, activation=spec, gate=g[1], down=down[1],
                                          b_gate=g[3], b_down=down[3], gemm=gemm, interleaved=bool(interleaved)),
                                transposed)
        _decline_scaled_hidden(mid, part)
        found = three_factors(mid, proj, part, check)
        if found is not None:
            g, u = found
            need((g[3] is None) == (u[3] is None), f"{mid.name}: the x1/x2 and up projections differ in having a "
                                                   "bias", part=part)
            transposed.update(gate=g[2], up=u[2])
            return _with_layout(ExpertMLP(input=g[0], output=out, activation="swiglu3", gate=g[1], up=u[1],
                                          down=down[1], b_gate=g[3], b_up=u[3], b_down=down[3], gemm=gemm),
                                transposed)
        _decline_three_factors(mid, part)
        # an activation that was recognised in shape but not proven (a near miss) keeps its own reason
        detail = f": {why}" if why and why != NO_ACTIVATION else ""
        decline(part, f"{mid.name} at {_line_of(mid)}: the expert body is not a supported MLP (projection -> "
                      f"activation [* projection] -> projection){detail}")
    up = proj(safety.strip_identity(inner))
    if up is None:
        decline(part, f"{inner.name}: the expert's first projection is not a linear/matmul/bmm")
    transposed["gate"] = up[2]
    return _with_layout(ExpertMLP(input=up[0], output=out, activation=name, gate=up[1], down=down[1], b_gate=up[3],
                                  b_down=down[3], gemm=gemm), transposed)


def _line_of(node: fx.Node) -> str:
    """``File "...", line N, in f: <code>`` of the user code that made ``node`` (Dynamo's stack trace)."""
    lines = [l.strip() for l in (node.meta.get("stack_trace") or "").strip().splitlines()]
    at = [i for i, l in enumerate(lines) if l.startswith("File")]
    if not at:
        return f"node {node.name}"
    i = at[-1]
    return lines[i] + (f": `{lines[i + 1]}`" if i + 1 < len(lines) else "")


def _decline_scaled_hidden(mid: fx.Node, part: str) -> None:
    """Decline, naming the line, when the down projection's input is ``h * s`` with ``s`` one factor per
    row ((.., 1): the router's scores, Megatron-Core's ``MLP`` ``per_token_scale``, applied before fc2)
    and the caller does not take its scores from there. Only the grouped rows of a split by host
    counts do (``mlp_scaled``: ``host_splits`` and ``assignment_rows``, Megatron-Core's
    ``SequentialMLP``); the per-expert compositions take their scores from the combine."""
    if not (mid.op == "call_function" and mid.target in _MUL and len(mid.args) == 2) or mid.kwargs:
        return
    ms = shape_of(mid)
    for h, sc in (mid.args, mid.args[::-1]):
        ss = shape_of(sc) if isinstance(sc, fx.Node) else None
        if ms and ss and len(ss) == len(ms) and int_value(ss[-1]) == 1 and int_value(ms[-1]) != 1 \
                and all(same(a, b) for a, b in zip(ss[:-1], ms[:-1])) and safety.same_shape(h, mid):
            decline(part, f"{mid.name} at {_line_of(mid)}: the rows are multiplied by {sc.name}, one factor per "
                          f"row (the router's scores), before the down projection: this composition takes the "
                          f"scores from the combine (on the input rows or on the output), not from inside the "
                          f"expert (read there only for rows split by host counts, as Megatron-Core's "
                          f"SequentialMLP splits them)")


def _mul_leaves(node, out: list) -> None:
    """The factors of a tree of two-tensor multiplies ``a * b * ...`` (an activation ``x * sigmoid(x)``
    is one factor)."""
    if isinstance(node, fx.Node) and node.op == "call_function" and node.target in _MUL and len(node.args) == 2 \
            and not node.kwargs and all(isinstance(a, fx.Node) for a in node.args) \
            and unary_activation(node)[0] is None:
        for a in node.args:
            _mul_leaves(a, out)
        return
    out.append(node)


def three_factors(mid: fx.Node, proj, part: str, check=None) -> Optional[tuple]:
    """(g, u): the projections of three-factor experts ``mid = x1 * silu(x2) * up`` (activation
    "swiglu3"; OpenMoE's ``swiglu_act_fn(gate(z)) * up(z)``), the factors multiplied in any order and
    grouping: x1 and x2 the first and second halves of the last axis of one projection g(z)
    (``common.halves``: chunk, split, slices), up a projection u(z) of the same rows. Every factor has
    ``mid``'s shape and dtype (no broadcast, no promotion), so each element of ``mid`` is the product of
    its three factors, which the op computes from H = [g(z) | u(z)]. None when ``mid`` is not a product
    of three factors one of which is an activation; a decline naming the part when it is, unproven."""
    leaves: list = []
    _mul_leaves(mid, leaves)
    acts = [n for n in leaves if isinstance(n, fx.Node) and unary_activation(n)[0] is not None]
    if len(leaves) != 3 or len(acts) != 1:
        return None
    name, x2 = unary_activation(acts[0])
    need(name == "silu", f"{acts[0].name}: three-factor experts with activation {name}: the fused op has x1 * "
                         "silu(x2) * up only (swiglu3)", part=part)
    others = [n for n in leaves if n is not acts[0]]
    for n in leaves:
        need(safety.same_shape(n, mid) and dtype_of(n) == dtype_of(mid),
             f"{n.name}: a factor of {mid.name} differs from the product in shape or dtype (broadcast or type "
             "promotion)", part=part)
        if check is not None:
            check(n)
    for x1, up in (others, others[::-1]):
        h = halves(x1, x2)
        if h is None or h[1]:
            continue
        g, u = proj(safety.strip_identity(h[0])), proj(zero_offset(safety.strip_identity(up)))
        need(g is not None, f"{h[0].name}: the tensor split into x1 and x2 is not a projection", part=part)
        need(u is not None, f"{up.name}: the third factor of {mid.name} is not a projection", part=part)
        need(safety.equivalent(g[0], u[0]), f"{mid.name}: x1/x2 project {g[0].name}, up projects {u[0].name}: "
                                           "different rows", part=part)
        return g, u
    decline(part, f"{mid.name} at {_line_of(mid)}: three factors ({', '.join(n.name for n in leaves)}) but x1 "
                  f"and x2 = the input of {acts[0].name} are not the first and second halves (concatenated) of "
                  "one projection (x1 and x2 from two separate projections are not read: their weights would "
                  "have to be concatenated)")


def _decline_three_factors(mid: fx.Node, part: str) -> None:
    """Decline, naming the line, when the down projection's input is a product of three or more tensors
    one of which is an activation and ``three_factors`` did not read it (more factors, or more than one
    activation): the fused op's activations multiply two factors, or exactly x1 * silu(x2) * up."""
    leaves: list = []
    _mul_leaves(mid, leaves)
    acts = [n for n in leaves if unary_activation(n)[0] is not None]
    if len(leaves) >= 3 and acts:
        decline(part, f"{mid.name} at {_line_of(mid)}: the hidden rows are a product of {len(leaves)} factors "
                      f"({', '.join(n.name for n in leaves)}), {acts[0].name} an activation: a gated activation "
                      "of the fused op multiplies two (act(gate) * up), or three with one silu (x1 * silu(x2) * "
                      "up, swiglu3); this product is neither")


def _with_layout(m: ExpertMLP, transposed: dict) -> ExpertMLP:
    m.row_scale = transposed.pop("row_scale", None)
    m.transposed = {k for k, v in transposed.items() if v}
    return m


def row_scaled(mid) -> Optional[tuple]:
    """(h, column) when ``mid`` is ``h * column`` (either order) with ``column`` one factor per row of
    h ((.., 1) against (.., n), the same leading sizes, no broadcast of h), in h's dtype or cast back to
    it after the product (Megatron-Core: ``(h * probs.unsqueeze(-1)).to(h.dtype)``); else None.
    ``down(h * s)`` is ``s * down(h)`` for a linear ``down`` without bias, up to rounding (each
    ``s * h_j`` is rounded before the GEMM's sum, and again by a cast back to h's dtype)."""
    if not isinstance(mid, fx.Node):
        return None
    prod = safety.strip_casts(mid)
    if not (prod.op == "call_function" and prod.target in _MUL and len(prod.args) == 2) or prod.kwargs:
        return None
    ms = shape_of(mid)
    for h, col in (prod.args, prod.args[::-1]):
        if not isinstance(h, fx.Node) or not isinstance(col, fx.Node):
            continue
        cs, hs = shape_of(col), shape_of(h)
        if ms and cs and hs and len(cs) == len(hs) == len(ms) >= 2 and int_value(cs[-1]) == 1 \
                and int_value(hs[-1]) != 1 and all(same_dim(col, k, h, k) for k in range(len(cs) - 1)) \
                and safety.same_shape(h, prod) and dtype_of(mid) == dtype_of(h):
            return h, col
    return None


def mlp_scaled(out) -> Optional[ExpertMLP]:
    """``mlp``, also accepting the hidden rows scaled per row before the down projection (``row_scaled``;
    ``ExpertMLP.row_scale``): for ``moe_inductor.dynamo.host_splits``, which keeps that product as it is, and
    the compositions that read the scores from it. Not a registered spelling: a composition that does
    not look at ``row_scale`` must never see such an expert."""
    if projection(safety.strip_identity(out)) is None:
        return None
    return walk_mlp(out, projection, "experts", _gemm_of(safety.strip_identity(out)), more_activations=True,
                    scaled=True)
