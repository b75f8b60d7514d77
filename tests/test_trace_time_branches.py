"""Python branches and int conversions of size-only tensors, answered at trace time in sonic frames
(``moe_inductor.dynamo.shape_items`` with ``moe_inductor.dynamo.trace_values``).

DeepSpeed's ``_capacity`` (read from ``deepspeed/moe/sharded_moe.py``; see
tests/faithful/deepspeed_moe.py) computes ``ceil((S / E) * torch.tensor(factor)).to(int64)`` in
float32, branches on ``capacity < min_capacity`` (two tensors) and passes the tensor as ``topk``'s k
and ``one_hot``'s num_classes. Without the trace-time answers the tensor ``if`` breaks the graph and
the gate, dispatch and combine land in different graphs (nothing rewritten; ``fullgraph=True``
fails). Checked here: the block rewritten and exact (output and every gradient vs eager, fp32 and
bf16), the float32 rounding of the factor as eager rounds it, the size specialized per length,
and near misses (data-dependent branches, a value read from an input or a parameter) left to
Dynamo's graph break; plain Inductor frames see nothing of it.

Shape legend: S tokens, D hidden, N expert width, E experts.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as Fn
from torch._dynamo.utils import counters

from moe_modules import deepspeed_top2_in_place
from rewrite_check import light_backend, rewrite_and_compare

D, N, E = 8, 6, 4


def _capacity(gates: torch.Tensor, capacity_factor: torch.Tensor, min_capacity: torch.Tensor) -> torch.Tensor:
    """DeepSpeed's ``_capacity`` spelling (a TorchScript function there, as here)."""
    num_tokens = gates.shape[0]
    num_experts = gates.shape[1]
    capacity = torch.ceil((num_tokens / num_experts) * capacity_factor).to(torch.int64)
    if capacity < min_capacity:
        capacity = min_capacity.to(torch.int64)
    return capacity


_capacity_script = torch.jit.script(_capacity)


class CapacityMoE(nn.Module):
    """Top-1 (keep mask from ``topk(k=capacity)``, slots by ``one_hot(num_classes=capacity)``) or
    top-2 (``lt(locations, capacity)``) DeepSpeed gating with the capacity a tensor from ``_capacity``.
    ``factor_dtype``: the factor tensor's dtype (None: ``torch.tensor(float)``'s default, float32)."""

    def __init__(self, top=1, factor=1.0, min_capacity=1, dtype=torch.float32, factor_dtype=None, script=True):
        super().__init__()
        self.top, self.factor, self.min_capacity, self.factor_dtype = top, factor, min_capacity, factor_dtype
        self.capacity_fn = _capacity_script if script else _capacity
        self.wg = nn.Linear(D, E, bias=False)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(D, N), nn.GELU(), nn.Linear(N, D)) for _ in range(E))
        self.to(dtype)

    def capacity(self, gates):
        return self.capacity_fn(gates, torch.tensor(self.factor, dtype=self.factor_dtype),
                                torch.tensor(self.min_capacity))

    def forward(self, x):
        x = x.to(self.wg.weight.dtype)
        gates = Fn.softmax(Fn.linear(x.float(), self.wg.weight.float()), dim=1)
        capacity = self.capacity(gates)
        if self.top == 1:
            mask1 = Fn.one_hot(torch.argmax(gates, dim=1), num_classes=E)
            top_idx = torch.topk(mask1 * gates, k=capacity, dim=0)[1]
            mask1 = mask1 * torch.zeros_like(mask1).scatter_(0, top_idx, 1)
            slot = torch.sum((torch.cumsum(mask1, dim=0) - 1) * mask1, dim=1)
            combine = torch.einsum("se,sc->sec", gates * mask1.float(), Fn.one_hot(slot, num_classes=capacity).float())
        else:
            combine = deepspeed_top2_in_place(gates, E, capacity)
        slots = torch.einsum("sec,sm->ecm", combine.bool().type_as(x), x).reshape(1, E, -1, D)
        y = torch.cat([ex(ch) for ex, ch in zip(self.experts, slots.chunk(E, dim=1))], dim=1).reshape(E, -1, D)
        return torch.einsum("sec,ecm->sm", combine.type_as(x), y)


def _rewritten(cands) -> None:
    st = [(c.status, c.reason) for c in cands if c.idiom == "expert_slots"]
    assert st and all(s == "rewritten" for s, _ in st), st


@pytest.mark.parametrize("top", [1, 2])
@pytest.mark.parametrize("min_capacity", [1, 3])  # 1: the float ceil is the capacity; 3: the branch replaces it
def test_tensor_capacity_rewritten_fp32(top, min_capacity):
    """One graph (fullgraph) from the first call, rewritten and exact at 5, 8 and 13 tokens
    (capacities 2, 2, 4 with min_capacity 1: tokens dropped at 8; a new length specializes again)."""
    torch.manual_seed(0)
    _rewritten(rewrite_and_compare(CapacityMoE(top, min_capacity=min_capacity), D, lengths=(5, 8, 13)))


@pytest.mark.parametrize("top", [1, 2])
def test_tensor_capacity_rewritten_bf16(top):
    torch.manual_seed(0)
    cands = rewrite_and_compare(CapacityMoE(top, dtype=torch.bfloat16), D, lengths=(5, 8), tol=3e-2, rel_norm=True)
    _rewritten(cands)


class TopkByCapacity(nn.Module):
    """The capacity's value made visible: ``topk(x, k=capacity)`` has k rows."""

    def __init__(self, factor, factor_dtype=None):
        super().__init__()
        self.factor, self.factor_dtype = factor, factor_dtype

    def forward(self, x):
        gates = x[:, :E]
        capacity = _capacity(gates, torch.tensor(self.factor, dtype=self.factor_dtype), torch.tensor(1))
        return torch.topk(x, k=capacity, dim=0)[0]


@pytest.mark.parametrize("factor_dtype, rows", [(None, 3), (torch.float64, 4)])
def test_factor_rounded_as_eager(factor_dtype, rows):
    """``torch.tensor(1.5 + 1e-8)`` is float32 1.5: at 8 tokens eager's capacity is ceil(2 * 1.5) = 3,
    where float64 arithmetic gives ceil(3.00000002) = 4; with a float64 factor tensor eager gives 4.
    The trace-time answer is eager's in both."""
    m = TopkByCapacity(1.5 + 1e-8, factor_dtype)
    torch._dynamo.reset()
    compiled = torch.compile(m, backend=light_backend([]), fullgraph=True)
    x = torch.randn(8, D)
    out, ref = compiled(x), m(x)
    assert ref.shape[0] == rows and out.shape == ref.shape
    torch.testing.assert_close(out, ref)


class DataBranch(nn.Module):
    """A branch on ``ceil((S / E) * factor)``: ``kind`` "size" (a ``torch.tensor`` constant factor) is
    size-only; the near misses depend on data: "data" (the input's values), "input" (the factor read
    from a parameter), "random" (a random draw, times 0: the same branch every call)."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.factor = nn.Parameter(torch.tensor(1.0))

    def forward(self, x):
        if self.kind == "data":
            capacity = torch.ceil(x.sum().abs()).to(torch.int64)
        elif self.kind == "input":
            capacity = torch.ceil((x.shape[0] / E) * self.factor.detach()).to(torch.int64)
        elif self.kind == "random":
            capacity = torch.ceil((x.shape[0] / E) * (1 + 0 * torch.rand(()))).to(torch.int64)
        else:
            capacity = torch.ceil((x.shape[0] / E) * torch.tensor(1.0)).to(torch.int64)
        if capacity < 2:
            return x * 2
        return x * 3


def _breaks(module, backend, x):
    """Graph breaks of one compiled call (graphs beyond the first; Dynamo counts a repeated break
    message once per process, so its break counter is not used)."""
    torch._dynamo.reset()
    counters.clear()
    out = torch.compile(module, backend=backend)(x)
    torch.testing.assert_close(out, module(x))
    return int(counters["stats"]["unique_graphs"]) - 1


@pytest.mark.parametrize("kind", ["data", "input", "random"])
def test_branch_on_data_keeps_the_break(kind):
    """Not proved a function of sizes: Dynamo's graph break stays, and the reason names the producer."""
    from moe_inductor.dynamo import shape_items

    torch.manual_seed(0)
    mark = shape_items.mark()
    assert _breaks(DataBranch(kind), light_backend([]), torch.randn(8, D)) >= 1
    assert shape_items.reasons(since=mark)


def test_branch_on_sizes_answered_only_in_sonic_frames():
    """The same size-only branch: no break under sonic, Dynamo's break under another backend, and
    Dynamo's own handlers back in place after the sonic compile."""
    from torch._dynamo.symbolic_convert import InstructionTranslator
    from torch._dynamo.variables.tensor import TensorVariable

    table, item = list(InstructionTranslator.dispatch_table), TensorVariable.__dict__["method_item"]
    m, x = DataBranch("size"), torch.randn(8, D)
    assert _breaks(m, light_backend([]), x) == 0
    assert InstructionTranslator.dispatch_table == table and TensorVariable.__dict__["method_item"] is item
    assert _breaks(m, "inductor", x) == 1
