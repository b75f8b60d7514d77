"""``autograd.Function`` calls that are ``F.linear``, read as such by the experts recogniser
(``moe_inductor.fx.safety.linear_function_operands``, used by ``patterns/experts.py::projection``).

Megatron-Core runs every parallel linear through ``LinearWithGradAccumulationAndAsyncCommunication``
(and its router through ``RouterGatingLinearFunction``): Dynamo records ``Fn.apply(x, w, ...)`` as
``autograd_function_apply(fwd_body, bwd_body, w, x, ...)[0]``. Such a call is read as
``F.linear(x, w, b)`` only when the forward body is ``x @ w.t() (+ b)`` and the backward body gives
x ``g @ w``, w ``g2.t() @ x2`` (the 2-D row views) and b ``g2.sum(0)``, with nothing else in either
body (same-dtype casts, copies, reshapes keeping the last dimension, an autocast region that is off).
Through the rewrite alone (``tests/rewrite_check.py``): output and every gradient against eager.

Rewritten: a per-expert loop (``where(ids == e)``, ``x[tok]``, ``index_add_``) whose experts are
Megatron's ``MLP`` (fused gate|up fc1, SwiGLU, fc2, each a linear Function, behind the identity TP
regions); the same loop with ``F.linear``-bodied Functions with biases; a top-1 masked assignment
(gathered rows ``x[m]`` written back into a clone) with plain linear Functions. Near misses, not
rewritten and exact: a backward that doubles the input's gradient, a forward that adds 1, a backward
without the weight's gradient, a bias without its gradient.

Rows sorted from a routing map (``patterns/dispatch.py::routing_map_sorted``, read by
``patterns/assignment_rows.py``'s sorted-rows proof): Megatron-Core's router and unfused ``permute``
(the (T, E) bool map as the ``scatter`` one-hot of the top-k ids, its column-major flat view sorted
descending and stably, ``[:T * K]``, rows ``index_select(0, perm % T)``, scores by ``masked_select``,
counts ``map.sum(0)``) with grouped-GEMM experts and ``scatter_add_`` back: rewritten and exact.
Near misses, not rewritten: an unstable sort, counts of another map, an ascending sort.
"""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from idiom_catalogue import D, E, K, N
from moe_inductor.fx import safety
from rewrite_check import rewrite_and_compare

custom_fwd = functools.partial(torch.amp.custom_fwd, device_type="cuda")
custom_bwd = functools.partial(torch.amp.custom_bwd, device_type="cuda")


class MegatronLinear(torch.autograd.Function):
    """Megatron-Core ``LinearWithGradAccumulationAndAsyncCommunication`` on one rank, without
    gradient-accumulation fusion (``tests/faithful/megatron_core.py`` keeps its full signature)."""

    @staticmethod
    @custom_fwd
    def forward(ctx, input, weight, bias):
        ctx.save_for_backward(input, weight)
        ctx.use_bias = bias is not None
        ctx.input_dtype = input.dtype
        output = torch.matmul(input, weight.t())
        if bias is not None:
            output = output + bias
        return output

    @staticmethod
    @custom_bwd
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        grad_output = grad_output.to(ctx.input_dtype)
        grad_input = grad_output.matmul(weight)
        grad_output = grad_output.contiguous()
        total_input = input.contiguous()
        if grad_output.dim() == 3:
            grad_output = grad_output.view(grad_output.shape[0] * grad_output.shape[1], grad_output.shape[2])
            total_input = total_input.view(total_input.shape[0] * total_input.shape[1], total_input.shape[2])
        grad_weight = grad_output.t().matmul(total_input)
        grad_bias = grad_output.sum(dim=0) if ctx.use_bias else None
        return grad_input, grad_weight, grad_bias


class PlainLinear(torch.autograd.Function):
    """``F.linear`` forward, the derivative written with ``flatten``."""

    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w)
        return F.linear(x, w, b)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        g2 = g.flatten(0, -2)
        return g @ w, g2.t() @ x.flatten(0, -2), g2.sum(0)


class RouterLinear(torch.autograd.Function):
    """Megatron-Core ``RouterGatingLinearFunction`` (no bias), router dtype = the input's."""

    @staticmethod
    def forward(ctx, inp, weight, router_dtype):
        ctx.save_for_backward(inp, weight)
        ctx.router_dtype, ctx.input_dtype, ctx.weight_dtype = router_dtype, inp.dtype, weight.dtype
        shape = inp.shape
        out = torch.mm(inp.view(-1, shape[-1]).to(router_dtype), weight.to(router_dtype).t())
        return out.view(*shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad_output):
        inp, weight = ctx.saved_tensors
        inp2 = inp.view(-1, inp.shape[-1])
        g = grad_output.view(-1, grad_output.shape[-1])
        grad_input = torch.mm(g, weight.to(ctx.router_dtype)).to(ctx.input_dtype)
        grad_weight = torch.mm(g.t(), inp2.to(ctx.router_dtype)).to(ctx.weight_dtype)
        return grad_input.view(*inp.shape), grad_weight, None


class ScaledGrad(torch.autograd.Function):
    """Near miss: the input's gradient doubled."""

    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w)
        return torch.matmul(x, w.t())

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        return (g @ w) * 2, g.flatten(0, -2).t() @ x.flatten(0, -2), None


class PlusOne(torch.autograd.Function):
    """Near miss: the forward adds 1 (the backward is linear's)."""

    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w)
        return torch.matmul(x, w.t()) + 1

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        return g @ w, g.flatten(0, -2).t() @ x.flatten(0, -2), None


class NoWeightGrad(torch.autograd.Function):
    """Near miss: no gradient for the weight."""

    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w)
        return torch.matmul(x, w.t())

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        return g @ w, None, None


class NoBiasGrad(torch.autograd.Function):
    """Near miss: a bias without its gradient."""

    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w)
        return torch.matmul(x, w.t()) + b

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        return g @ w, g.flatten(0, -2).t() @ x.flatten(0, -2), None


class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input_, group):
        return input_

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output, None


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input_, group):
        return input_

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output, None


class FnLinear(nn.Module):
    """A column/row-parallel linear on one rank: ``fn.apply(x, w, b)``, behind the identity regions
    when ``regions``."""

    def __init__(self, fn, d_in, d_out, bias, regions=True):
        super().__init__()
        self.fn, self.regions = fn, regions
        self.weight = nn.Parameter(torch.randn(d_out, d_in) / d_in ** 0.5)
        self.bias = nn.Parameter(torch.randn(d_out) * 0.1) if bias else None

    def forward(self, x):
        if not self.regions:
            return self.fn.apply(x, self.weight, self.bias)
        y = self.fn.apply(_CopyToRegion.apply(x, None), self.weight, self.bias)
        return _ReduceFromRegion.apply(y, None)


class GluExpert(nn.Module):
    """Megatron's ``MLP``: fc1 2N wide (gate | up), ``chunk(2, -1)``, ``silu(gate) * (up + offset)``
    (``glu_linear_offset``, default 0.0: Megatron writes the add; None: no add), fc2."""

    def __init__(self, fn, bias=False, offset=None):
        super().__init__()
        self.offset = offset
        self.fc1 = FnLinear(fn, D, 2 * N, bias)
        self.fc2 = FnLinear(fn, N, D, bias)

    def forward(self, x):
        gate, up = torch.chunk(self.fc1(x), 2, dim=-1)
        return self.fc2(F.silu(gate) * (up if self.offset is None else up + self.offset))


class LoopMoE(nn.Module):
    """Top-k softmax router, per-expert loop over ``where(ids == e)`` rows, ``index_add_``."""

    def __init__(self, fn, bias=False, offset=None):
        super().__init__()
        self.gate = nn.Linear(D, E, bias=False)
        self.experts = nn.ModuleList(GluExpert(fn, bias, offset) for _ in range(E))

    def forward(self, x):
        w, ids = torch.topk(torch.softmax(self.gate(x), dim=-1), K, dim=-1)
        out = torch.zeros_like(x)
        for e in range(E):
            tok, k = torch.where(ids == e)
            out.index_add_(0, tok, self.experts[e](x[tok]) * w[tok, k, None])
        return out


class Top1Masked(nn.Module):
    """Top-1 (Switch): gathered rows ``x[m]`` of each expert written back into a clone, then scaled
    (no TP regions: mask_dispatch compares the MLP's input with the gathered rows as they are)."""

    def __init__(self, fn):
        super().__init__()
        self.gate = nn.Linear(D, E, bias=False)
        self.experts = nn.ModuleList(nn.Sequential(FnLinear(fn, D, N, True, False), nn.ReLU(),
                                                   FnLinear(fn, N, D, True, False))
                                     for _ in range(E))

    def forward(self, x):
        p, ids = torch.softmax(self.gate(x), dim=-1).max(dim=-1)
        out = x.clone()
        for e in range(E):
            m = ids == e
            out[m] = self.experts[e](x[m])
        return out * p[:, None]


def _run(module):
    torch.manual_seed(0)
    return rewrite_and_compare(module, D)


@pytest.mark.parametrize("build", [lambda: LoopMoE(MegatronLinear), lambda: LoopMoE(PlainLinear, bias=True),
                                   lambda: Top1Masked(PlainLinear), lambda: LoopMoE(MegatronLinear, offset=0.0)],
                         ids=["loop_megatron", "loop_plain_bias", "top1_masked", "loop_megatron_zero_offset"])
def test_function_linears_rewritten(build):
    torch.manual_seed(0)
    cands = _run(build())
    assert cands and all(c.status == "rewritten" for c in cands), [(c.status, c.reason) for c in cands]


def test_nonzero_glu_offset_not_rewritten():
    """Near miss: ``silu(gate) * (up + 1.0)`` is not the SwiGLU of the halves (only a zero offset is read through)."""
    torch.manual_seed(0)
    cands = _run(LoopMoE(MegatronLinear, offset=1.0))
    assert not any(c.status == "rewritten" for c in cands), [(c.status, c.reason) for c in cands]


@pytest.mark.parametrize("fn", [ScaledGrad, PlusOne, NoWeightGrad, NoBiasGrad])
def test_look_alike_functions_not_linear(fn):
    torch.manual_seed(0)
    cands = _run(LoopMoE(fn, bias=fn is NoBiasGrad))  # exact: asserted by rewrite_and_compare
    assert not any(c.status == "rewritten" for c in cands), [(c.status, c.reason) for c in cands]


# --------------------------------------------------------------------------- the proof on single calls

def _linears(fn, *args):
    """For each Function output of fn's graph: which operands ``linear_function_operands`` names
    (positions among fn's arguments, None for none), or None."""
    found = []

    def backend(gm, example_inputs):
        places = [n for n in gm.graph.nodes if n.op == "placeholder"]
        for n in gm.graph.nodes:
            if n.op == "call_function" and safety.is_function_apply(n.args[0] if n.args else None):
                got = safety.linear_function_operands(n)
                found.append(None if got is None else tuple(places.index(t) if t is not None else None for t in got))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=backend, fullgraph=True)(*args)
    return found


@pytest.mark.parametrize("lead", [(5,), (1, 5)])
def test_single_calls(lead):
    x = torch.randn(*lead, D, requires_grad=True)
    w = torch.randn(N, D, requires_grad=True)
    b = torch.randn(N, requires_grad=True)
    assert _linears(lambda x, w: MegatronLinear.apply(x, w, None), x, w) == [(0, 1, None)]
    assert _linears(lambda x, w, b: MegatronLinear.apply(x, w, b), x, w, b) == [(0, 1, 2)]
    assert _linears(lambda x, w, b: PlainLinear.apply(x, w, b), x, w, b) == [(0, 1, 2)]
    assert _linears(lambda x, w: RouterLinear.apply(x, w, torch.float32), x, w) == [(0, 1, None)]
    for fn in (ScaledGrad, PlusOne, NoWeightGrad):
        assert _linears(lambda x, w: fn.apply(x, w, None), x, w) == [None], fn
    assert _linears(lambda x, w, b: NoBiasGrad.apply(x, w, b), x, w, b) == [None]


def test_router_in_another_dtype_not_linear():
    """The router GEMM in fp32 on bf16 rows (``moe_router_dtype='fp32'``): not F.linear of the operands."""
    x = torch.randn(5, D, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(N, D, dtype=torch.bfloat16, requires_grad=True)
    assert _linears(lambda x, w: RouterLinear.apply(x, w, torch.float32), x, w) == [None]


# --------------------------------------------------------------------------- rows sorted from a routing map

import moe_inductor.dynamo.host_splits  # noqa: E402,F401  (registers moe_inductor::grouped_mm)

GROUPED_MM = torch.ops.moe_inductor.grouped_mm.default


class RoutingMapRows(nn.Module):
    """Megatron-Core's router and ``permute`` (unfused, dropless) with grouped-GEMM experts: the dense
    probabilities and bool routing map by ``scatter`` of the top-k, the map's column-major flat view
    sorted descending and stably, ``[:T * K]`` (the all-to-all dispatcher's ``num_out_tokens``),
    rows ``index_select(0, perm % T)``, scores by ``masked_select``, counts ``map.sum(0)``, the experts
    on ``cumsum(counts)`` offsets, ``scatter_add_`` back (``unpermute``). ``kind`` makes near misses."""

    def __init__(self, kind="megatron"):
        super().__init__()
        self.kind = kind
        self.gate = nn.Linear(D, E, bias=False)
        self.w13 = nn.Parameter(torch.randn(E, 2 * N, D) / D ** 0.5)
        self.w2 = nn.Parameter(torch.randn(E, D, N) / N ** 0.5)

    def forward(self, x):
        T = x.shape[0]
        logits = self.gate(x)
        vals, ids = torch.topk(logits, K, dim=1)
        probs = torch.softmax(vals, dim=-1, dtype=torch.float32).type_as(logits)
        routing_probs = torch.zeros_like(logits).scatter(1, ids, probs)
        routing_map = torch.zeros_like(logits).int().scatter(1, ids, 1).bool()
        counts = routing_map.sum(dim=0)
        flat_map = routing_map.T.contiguous().reshape(-1)
        perm = flat_map.argsort(descending=self.kind != "ascending", stable=self.kind != "unstable")
        idx = perm[:T * K] % T
        rows = x.index_select(0, idx)
        p = routing_probs.T.contiguous().masked_select(routing_map.T.contiguous())
        if self.kind == "counts_of_other_map":
            counts = torch.zeros_like(logits).int().scatter(1, torch.topk(-logits, K, dim=1)[1], 1).bool().sum(0)
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        gate, up = GROUPED_MM(rows, self.w13.transpose(-2, -1), offs=offs).chunk(2, dim=-1)
        y = GROUPED_MM(F.silu(gate) * up, self.w2.transpose(-2, -1), offs=offs)
        y = y * p.unsqueeze(-1)
        out = torch.zeros(T, D, dtype=x.dtype)
        out.scatter_add_(0, idx.unsqueeze(1).expand(-1, D), y)
        return out


def test_routing_map_rows_rewritten():
    torch.manual_seed(0)
    cands = _run(RoutingMapRows())
    assert cands and all(c.status == "rewritten" for c in cands), [(c.status, c.reason) for c in cands]


@pytest.mark.parametrize("kind", ["unstable", "counts_of_other_map", "ascending"])
def test_routing_map_near_misses_not_rewritten(kind):
    """An unstable sort (tokens within an expert in any order: the proof asks for the stable one), counts
    of another map (the groups are not the sorted experts'), an ascending sort (the map's zeros first: rows of
    unrouted (token, expert) pairs)."""
    torch.manual_seed(0)
    cands = _run(RoutingMapRows(kind))
    assert not any(c.status == "rewritten" for c in cands), [(c.status, c.reason) for c in cands]


def test_faithful_megatron_dispatch_proved():
    """The faithful Megatron-Core allgather dispatcher's graph (``tests/faithful/megatron_core.py``: the
    local map ``routing_map[:, 0:E].contiguous()``, counts ``.sum(dim=0).long().cpu()``, A the host copy
    ``counts.sum().item()``): its rows are proven the routing map's sorted assignments, grouped by those
    counts. (The entry stays pending: its experts are per-expert MLPs on host-count splits.)"""
    import moe_inductor.compile.backend  # noqa: F401  (sonic's Dynamo scope: the host counts as symbolic sizes)
    from faithful import megatron_core as mc
    from moe_inductor.dynamo.dynamo_scope import mark_sonic
    from moe_inductor.patterns.dispatch import routing_map_sorted

    found = []

    @mark_sonic
    def backend(gm, example_inputs):
        sel = [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "index_select"]
        cpu = [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "cpu"]
        if sel and cpu:
            found.append(routing_map_sorted(sel[0].args[2], cpu[0], None, shape_of_rows(sel[0].args[0])))
        return gm.forward

    torch._dynamo.reset()
    entry = mc.ENTRIES[0]
    torch.compile(entry.build(), backend=backend)(*entry.inputs(5, 0))
    assert found and found[-1] is not None and (found[-1]["K"], found[-1]["E"]) == (K, E), found


def shape_of_rows(node):
    return node.meta["example_value"].shape[0]
