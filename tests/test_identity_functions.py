"""``autograd.Function`` calls that are the identity, read through by the rewrite
(``moe_inductor.fx.safety.identity_function_input``, followed by ``strip_identity``).

Dynamo records ``MyFn.apply(x)`` as ``autograd_function_apply(fwd_body, bwd_body, x, ...)[k]``.
Public MoE code wraps its dispatch in such Functions: fairscale / DeepSpeed ``_AllToAll`` (at world
size 1: ``contiguous``, ``empty_like`` + ``copy_`` standing for ``all_to_all_single``; backward the
same Function on the gradient), Megatron-Core's tensor-parallel regions at size 1 (forward and
backward return their input). A call is read through only when its forward body is, by value, one
operand, its backward body gives that operand the incoming gradient unchanged and every other
operand None. Through the rewrite alone (``tests/rewrite_check.py``): output and every gradient
against eager at two lengths.

Rewritten: GShard top-2 capacity einsum with stacked bmm experts whose slots pass through
``_AllToAll`` before and after the experts (fairscale's / DeepSpeed's MOELayer order); a
per-expert loop whose gathered rows and expert outputs pass through Megatron-style identity
regions. Near misses, not rewritten (and exact): a backward that doubles the gradient; a forward
that doubles the value; an aux-loss attach (``MoEAuxLossAutoScaler``: forward returns its first
input, backward sends a gradient into the aux tensor too; dropping the call would lose it); the
tokens written in place after ``_AllToAll`` copied an expert's rows (the copy keeps the old rows).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from idiom_catalogue import CAPACITY, D, E, K, N, _top2_capacity
from moe_inductor.fx import safety
from rewrite_check import rewrite_and_compare


class _AllToAll(torch.autograd.Function):
    """fairscale ``moe_layer._AllToAll`` / DeepSpeed ``sharded_moe._AllToAll`` at world size 1 (the
    copy into ``empty_like`` stands for ``dist.all_to_all_single``)."""

    @staticmethod
    def forward(ctx, group, input):
        ctx.group = group
        input = input.contiguous()
        output = torch.empty_like(input)
        output.copy_(input)
        return output

    @staticmethod
    def backward(ctx, *grad_output):
        return (None, _AllToAll.apply(ctx.group, *grad_output))


class _CopyToRegion(torch.autograd.Function):
    """Megatron ``_CopyToModelParallelRegion`` at tensor-parallel size 1 (the all-reduce of the
    gradient is the identity)."""

    @staticmethod
    def forward(ctx, input_, group):
        return input_

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output, None


class _ReduceFromRegion(torch.autograd.Function):
    """Megatron ``_ReduceFromModelParallelRegion`` at size 1."""

    @staticmethod
    def forward(ctx, input_, group):
        return input_

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output, None


class _DoubleGrad(torch.autograd.Function):
    """Near miss: forward the identity, backward doubles the gradient."""

    @staticmethod
    def forward(ctx, group, input):
        return input.contiguous().clone()

    @staticmethod
    def backward(ctx, grad):
        return None, grad * 2


class _DoubleValue(torch.autograd.Function):
    """Near miss: forward doubles the value, backward passes the gradient unchanged."""

    @staticmethod
    def forward(ctx, group, input):
        output = torch.empty_like(input)
        output.copy_(input * 2)
        return output

    @staticmethod
    def backward(ctx, grad):
        return None, grad.contiguous()


class _AuxLossScaler(torch.autograd.Function):
    """Near miss: Megatron ``MoEAuxLossAutoScaler`` (forward returns ``output``; backward also sends
    ``scale * ones_like(aux)`` into the aux loss)."""

    @staticmethod
    def forward(ctx, output, aux_loss):
        ctx.save_for_backward(aux_loss)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        (aux_loss,) = ctx.saved_tensors
        return grad_output, torch.ones_like(aux_loss) * 0.5


def _wrap(kind, t, aux=None):
    if kind == "all_to_all":
        return _AllToAll.apply(None, t)
    if kind == "regions":
        return _ReduceFromRegion.apply(_CopyToRegion.apply(t, None), None)
    if kind == "double_grad":
        return _DoubleGrad.apply(None, t)
    if kind == "double_value":
        return _DoubleValue.apply(None, t)
    if kind == "aux":
        return _AuxLossScaler.apply(t, aux)
    return t


class CapacityThroughFunction(nn.Module):
    """``tests/idiom_catalogue.py::CapacityEinsum`` (top-2) with the (E, C, d) slots sent through
    ``kind`` before the experts and the experts' outputs after them, as fairscale's and DeepSpeed's
    MOELayer do with ``_AllToAll``."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.wg = nn.Linear(D, E, bias=False)
        self.w_in = nn.Parameter(torch.randn(E, D, N) / D ** 0.5)
        self.w_out = nn.Parameter(torch.randn(E, N, D) / N ** 0.5)

    def forward(self, x):
        logits = self.wg(x)
        combine, dispatch = _top2_capacity(logits, CAPACITY)
        aux = logits.float().mean() if self.kind == "aux" else None
        expert_in = _wrap(self.kind, torch.einsum("sec,sm->ecm", dispatch.type_as(x), x), aux)
        y = torch.bmm(F.relu(torch.bmm(expert_in, self.w_in)), self.w_out)
        y = _wrap("regions" if self.kind == "aux" else self.kind, y)
        return torch.einsum("sec,ecm->sm", combine.type_as(x), y)


class LoopThroughFunction(nn.Module):
    """A per-expert loop (transformers 4.x style) whose gathered rows pass through ``kind`` before
    the expert and whose expert output passes through it after."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.gate = nn.Linear(D, E, bias=False)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(D, N), nn.SiLU(), nn.Linear(N, D)) for _ in range(E))

    def forward(self, x):
        logits = self.gate(x)
        w, ids = torch.topk(torch.softmax(logits, dim=-1), K, dim=-1)
        aux = logits.mean() if self.kind == "aux" else None
        out = torch.zeros_like(x)
        h = x * 1.0
        for e in range(E):
            tok, k = torch.where(ids == e)
            rows = _wrap("all_to_all" if self.kind == "write_after_copy" else self.kind, h[tok], aux)
            if self.kind == "write_after_copy":
                h.add_(0.5)  # the copy holds the rows as they were: the next experts read other values
            y = _wrap("regions" if self.kind == "aux" else self.kind, self.experts[e](rows))
            out.index_add_(0, tok, y * w[tok, k, None])
        return out


def _run(cls, kind):
    torch.manual_seed(0)
    return rewrite_and_compare(cls(kind), D)


@pytest.mark.parametrize("cls", [CapacityThroughFunction, LoopThroughFunction])
@pytest.mark.parametrize("kind", ["all_to_all", "regions"])
def test_identity_functions_read_through(cls, kind):
    cands = _run(cls, kind)
    assert cands and all(c.status == "rewritten" for c in cands), [(c.status, c.reason) for c in cands]


@pytest.mark.parametrize("cls, kind", [(c, k) for c in (CapacityThroughFunction, LoopThroughFunction)
                                       for k in ("double_grad", "double_value", "aux")]
                         + [(LoopThroughFunction, "write_after_copy")])
def test_look_alike_functions_not_read_through(cls, kind):
    old_torch = tuple(int(p) for p in torch.__version__.split(".")[:2]) < (2, 12)
    if kind in ("double_value", "write_after_copy") and old_torch:
        pytest.skip("torch 2.11's Dynamo drops the gradient of a Function whose forward copy_-fills empty_like "
                    "(zero gradients under backend='eager' too): eager and compiled differ without any rewrite")
    cands = _run(cls, kind)  # exact: asserted by rewrite_and_compare
    assert not any(c.status == "rewritten" for c in cands), [(c.status, c.reason) for c in cands]


# --------------------------------------------------------------------------- the proof on single calls

def _calls(fn, *args):
    """{operand name: what identity_function_input answers} for each Function output of fn's graph."""
    found = []

    def backend(gm, example_inputs):
        for n in gm.graph.nodes:
            if n.op == "call_function" and safety.is_function_apply(n.args[0] if n.args else None):
                src = safety.identity_function_input(n)
                found.append(src is not None and src in n.args[0].args[2:])
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=backend, fullgraph=True)(*args)
    return found


def test_single_calls():
    x = torch.randn(3, 4, requires_grad=True)
    a = torch.randn((), requires_grad=True)
    assert _calls(lambda t: _AllToAll.apply(None, t * 2), x) == [True]
    assert _calls(lambda t: _wrap("regions", t * 2), x) == [True, True]
    assert _calls(lambda t: _DoubleGrad.apply(None, t * 2), x) == [False]
    assert _calls(lambda t: _DoubleValue.apply(None, t * 2), x) == [False]
    assert _calls(lambda t, s: _AuxLossScaler.apply(t * 2, s * 1), x, a) == [False]


def test_function_output_aliases_its_input():
    """A Function returning its input returns a view of it (Dynamo: ``x.view_as(x)``): a write into
    the output is a write into the input (``safety.writes_to``); ``_AllToAll``'s output is its own."""
    seen = {}

    def backend(gm, example_inputs):
        mul = next(n for n in gm.graph.nodes if n.op == "call_method" and n.target == "mul")
        seen["writes"] = [w.target for w in safety.writes_to(mul)]
        return gm.forward

    def f(t, kind):
        u = t.mul(1.0)
        y = _wrap(kind, u)
        y.add_(1)
        return u + y

    for kind, expect in (("regions", ["add_"]), ("all_to_all", [])):
        torch._dynamo.reset()
        torch.compile(lambda t: f(t, kind), backend=backend, fullgraph=True)(torch.randn(3, 4))
        assert seen["writes"] == expect, (kind, seen)
