"""DeepSpeed-style capacity dispatch (patterns/expert_slots.py, ``slots_dispatch`` ``capacity_einsum``).

Written from a reading of DeepSpeed ``sharded_moe`` (see tests/faithful/deepspeed_moe.py for the
faithful entries): the dispatch mask is ``combine_weights.bool()`` cast to the tokens' dtype
(``type_as``, ``to(dtype)``, ``float()``) in the einsum ``sec,sm->ecm``; top-1 keeps at most C tokens
per expert by ``mask1 * zeros_like(mask1).scatter_(0, topk(priority, C, dim=0).indices, 1)`` (random
token selection; here a deterministic priority so eager and compiled agree); experts are a ModuleList
run on ``chunk``s of the (1, E, C, d) slots and concatenated.

Checked through the sonic rewrite alone (``rewrite_check``): the spellings rewritten and exact (output
and every gradient vs eager), near misses declined with a reason naming the part.

Shape legend: S tokens, d hidden, n expert width, E experts, C slots per expert (capacity).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as Fn

from moe_modules import deepspeed_top2_in_place
from rewrite_check import light_backend, rewrite_and_compare

D, N, E, C = 8, 6, 4, 2


class DeepSpeedLikeMoE(nn.Module):
    """``top``: 1 (keep mask scattered into zeros) or 2 (in-place ``*=`` by ``lt(loc, C)``).
    ``dispatch``: how the combine weights become the dispatch tensor. ``keep``: how top-1's keep mask is
    built ("scatter": ones scattered into zeros; the rest are near misses, whose positions run past C:
    ``slots`` classes then)."""

    def __init__(self, top=1, dispatch="bool_type_as", keep="scatter", break_before_dispatch=False, slots=C):
        super().__init__()
        self.top, self.dispatch, self.keep, self.brk = top, dispatch, keep, break_before_dispatch
        self.slots = slots  # slot classes of top-1's one-hot: more than C for the keep-mask near misses
        self.wg = nn.Linear(D, E, bias=False)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(D, N), nn.GELU(), nn.Linear(N, D)) for _ in range(E))

    def keep_mask(self, mask1, gates):
        top_idx = torch.topk(mask1 * gates, k=C, dim=0)[1]  # the C highest-priority tokens of each expert
        if self.keep == "scatter":
            return torch.zeros_like(mask1).scatter_(0, top_idx, 1)
        if self.keep == "scatter_two":  # near miss: 0/2, not 0/1
            return torch.zeros_like(mask1).scatter_(0, top_idx, 2)
        if self.keep == "scatter_add_reduce":  # near miss: scatter with a reduction (repeated rows add up)
            return torch.zeros_like(mask1).scatter_(0, top_idx, 1, reduce="add")
        assert self.keep == "scatter_then_add"  # near miss: written again after the scatter
        k = torch.zeros_like(mask1).scatter_(0, top_idx, 1)
        k.add_(1)
        return k

    def top1(self, gates):
        mask1 = Fn.one_hot(torch.argmax(gates, dim=1), num_classes=E)
        mask1 = mask1 * self.keep_mask(mask1, gates)
        locations1 = torch.cumsum(mask1, dim=0) - 1
        locations1_s = torch.sum(locations1 * mask1, dim=1)
        gates = gates * mask1.float()
        return torch.einsum("se,sc->sec", gates, Fn.one_hot(locations1_s, num_classes=self.slots).float())

    def top2(self, gates):
        return deepspeed_top2_in_place(gates, E, C)

    def dispatch_of(self, combine, x):
        kind = self.dispatch
        if kind == "bool_type_as":
            return combine.bool().type_as(x)
        if kind == "bool_to_dtype":
            return combine.bool().to(x.dtype)
        if kind == "bool_float":
            return combine.bool().float()
        if kind == "ne_zero_type_as":
            return (combine != 0).type_as(x)
        if kind == "threshold":  # near miss: a cast of another pattern than the nonzeros
            return (combine > 0.5).type_as(x)
        if kind == "combine_modified_after":  # near miss: the combine weights changed after the mask was taken
            d = combine.bool().type_as(x)
            combine[:, 0] = 0
            return d
        assert kind == "modified_in_place"  # near miss: the cast mask changed afterwards
        d = combine.bool().type_as(x)
        d[:, 0] = 0
        return d

    def forward(self, x):
        gates = Fn.softmax(Fn.linear(x.float(), self.wg.weight.float()), dim=1)
        combine = self.top1(gates) if self.top == 1 else self.top2(gates)
        dispatch = self.dispatch_of(combine, x)
        if self.brk:
            torch._dynamo.graph_break()
        slots = torch.einsum("sec,sm->ecm", dispatch, x).reshape(1, E, -1, D)
        y = torch.cat([ex(ch) for ex, ch in zip(self.experts, slots.chunk(E, dim=1))], dim=1).reshape(E, -1, D)
        return torch.einsum("sec,ecm->sm", combine.type_as(x), y)


def _seeded(**kw) -> DeepSpeedLikeMoE:
    torch.manual_seed(7)
    return DeepSpeedLikeMoE(**kw)


def _statuses(cands) -> list:
    return [(c.status, c.reason) for c in cands if c.idiom == "expert_slots"]


@pytest.mark.parametrize("top", [1, 2])
@pytest.mark.parametrize("dispatch", ["bool_type_as", "bool_to_dtype", "bool_float", "ne_zero_type_as"])
def test_cast_nonzero_pattern_rewritten(top, dispatch):
    """The nonzero pattern cast to the compute dtype (exact: 0/1 in any float dtype) dispatches;
    top-1 with the keep mask of ones scattered into zeros (tokens over capacity dropped at C = 2)."""
    cands = rewrite_and_compare(_seeded(top=top, dispatch=dispatch), D, lengths=(5, 8))
    st = _statuses(cands)
    assert st and all(s == "rewritten" for s, _ in st), st


@pytest.mark.parametrize("top", [1, 2])
def test_threshold_mask_declined(top):
    cands = rewrite_and_compare(_seeded(top=top, dispatch="threshold"), D, lengths=(5, 8))
    st = _statuses(cands)
    assert st and all(s == "declined" and "not the nonzero pattern" in r for s, r in st), st


@pytest.mark.parametrize("top", [1, 2])
@pytest.mark.parametrize("dispatch", ["modified_in_place", "combine_modified_after"])
def test_dispatch_modified_in_place_declined(top, dispatch):
    """Written in place after the mask was cast: the dispatched mask, or the combine weights (the
    output then weighs the slots by other weights than those whose nonzeros dispatched)."""
    cands = rewrite_and_compare(_seeded(top=top, dispatch=dispatch), D, lengths=(5, 8))
    st = _statuses(cands)
    assert st and all(s == "declined" and "modified in place" in r for s, r in st), st


@pytest.mark.parametrize("keep", ["scatter_two", "scatter_add_reduce", "scatter_then_add"])
def test_keep_mask_not_zero_one_declined(keep):
    """A keep mask that is not ones scattered once into zeros is not a 0/1 flag: the slot positions
    counted from it are not proved distinct."""
    cands = rewrite_and_compare(_seeded(top=1, keep=keep, slots=32), D, lengths=(5, 8))
    st = _statuses(cands)
    assert st and all(s == "declined" and r.startswith("slots_dispatch") for s, r in st), st


def test_dispatch_from_another_graph_declined():
    """A graph break between the gating and the dispatch einsum (DeepSpeed's host-side capacity): the
    dispatch mask is an input of the graph that holds the block, its relation to the combine weights
    unknown there. Declined, saying so."""
    module, reports = _seeded(top=2, break_before_dispatch=True), []
    torch._dynamo.reset()
    compiled = torch.compile(module, backend=light_backend(reports))
    x = torch.randn(8, D)
    torch.testing.assert_close(compiled(x), module(x))
    st = _statuses([c for r in reports for c in r.candidates])
    assert st and all(s == "declined" and "is an input of this graph" in r for s, r in st), st
