"""Capacity slots with a group axis (GShard's group dimension; lucidrains mixture-of-experts):
tokens (G, S, d) in G groups, each with its own C slots per expert and positions counted within the
group, dispatch ``einsum("bnd,bnec->ebcd", x, combine.bool().to(x))``, the experts on
``.reshape(E, -1, d)`` (the (G, C) slots of each expert merged row-major), their outputs reshaped back
to (E, G, C, d) and combined by ``einsum("ebcd,bnec->bnd", y, combine)``. Rewritten and exact (output
and every gradient, fp32 and bf16); near misses (positions counted across groups, the combine with
another group's weights, another group's slots) not rewritten. Written from a reading of GShard and
lucidrains' ``Top2Gating``: not a copy."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as Fn

from rewrite_check import rewrite_and_compare

D, N, E, G = 8, 4, 4, 2


class GroupCapacityMoE(nn.Module):
    """Top-2 GShard gating within each of G groups of the tokens (T, d) viewed (G, T / G, d)."""

    def __init__(self, capacity=2, mutation=None, dtype=torch.float32):
        super().__init__()
        self.capacity, self.mutation = capacity, mutation
        self.router = nn.Linear(D, E, bias=False, dtype=dtype)
        self.w_in = nn.Parameter((torch.randn(E, D, N) / D ** 0.5).to(dtype))
        self.b_in = nn.Parameter((torch.randn(E, 1, N) / 4).to(dtype))
        self.w_out = nn.Parameter((torch.randn(E, N, D) / N ** 0.5).to(dtype))

    def positions(self, mask, offset=None):
        dim = 0 if self.mutation == "across_groups" else 1
        loc = torch.cumsum(mask, dim=dim) - 1
        return loc if offset is None else loc + offset

    def gating(self, x, C):
        gates = Fn.softmax(self.router(x), dim=-1)  # (G, S, E)
        first = torch.argmax(gates, dim=-1)
        mask1 = Fn.one_hot(first, E)
        loc1 = self.positions(mask1)
        kept1 = mask1 * (loc1 < C).long()
        slot1 = (loc1 * kept1).sum(dim=-1)
        second = torch.argmax(gates.masked_fill(mask1.bool(), float("-inf")), dim=-1)
        mask2 = Fn.one_hot(second, E)
        loc2 = self.positions(mask2, mask1.sum(dim=1, keepdim=True))
        kept2 = mask2 * (loc2 < C).long()
        slot2 = (loc2 * kept2).sum(dim=-1)
        g1, g2 = (gates * kept1).sum(dim=-1), (gates * kept2).sum(dim=-1)
        dt = gates.dtype
        one_hot = Fn.one_hot
        if self.mutation in ("eq_one_hot", "eq_uncapped"):
            # positions of every choice (over capacity too), slots by comparison with arange(C): a zero row
            # for a position >= C; "eq_uncapped" forgets the capacity flag, so only the zero row drops
            slot1, slot2 = (loc1 * mask1).sum(dim=-1), (loc2 * mask2).sum(dim=-1)
            one_hot = lambda L, C: L.unsqueeze(-1) == torch.arange(C)  # noqa: E731
            if self.mutation == "eq_uncapped":
                kept1, kept2 = mask1, mask2
                g1, g2 = (gates * kept1).sum(dim=-1), (gates * kept2).sum(dim=-1)
        return (g1[..., None, None] * kept1.to(dt)[..., None] * one_hot(slot1, C).to(dt)[..., None, :]
                + g2[..., None, None] * kept2.to(dt)[..., None] * one_hot(slot2, C).to(dt)[..., None, :])

    def gating_exclusive(self, x, C):
        """lucidrains' spelling: exclusive cumsum by pad + slice, ``mask *= (pos < C)`` in place, per-token
        flags as row sums of the capped masks, the second choice after the counts of the kept first
        choices, slots by ``pos.long().unsqueeze(-1) == arange(C)``. Mutations: "uncapped_first" (the first
        choice's term not capped, its positions >= C never dropped by a flag), "row_sum_alone" (a row sum of
        a mask with another one-hot than the term's), "offset_cap_smaller" (the second choice after the first
        choices counted below C - 1 only: two tokens in one slot)."""
        gates = Fn.softmax(self.router(x), dim=-1)
        first = torch.argmax(gates, dim=-1)
        mask1 = Fn.one_hot(first, E).float()
        second = torch.argmax(gates * (1.0 - mask1), dim=-1)
        mask2 = Fn.one_hot(second, E).float()
        pos1 = _exclusive(mask1) * mask1
        mask1 *= (pos1 < float(C)).float()
        flat1 = mask1.sum(dim=-1)
        if self.mutation == "uncapped_first":
            flat1 = Fn.one_hot(first, E).float().sum(dim=-1)
        count1 = mask1.sum(dim=-2, keepdim=True)
        if self.mutation == "offset_cap_smaller":  # counts of the first choices below C - 1 only: collisions
            count1 = (Fn.one_hot(first, E).float() * (pos1 < float(C - 1)).float()).sum(dim=-2, keepdim=True)
        pos2 = (_exclusive(mask2) + count1) * mask2
        mask2 *= (pos2 < float(C)).float()
        flat2 = mask2.sum(dim=-1)
        g1, g2 = gates.max(dim=-1).values * flat1, (gates * mask2).sum(dim=-1)
        one_hot2 = Fn.one_hot(first if self.mutation == "row_sum_alone" else second, E)
        dt = gates.dtype

        def slot(p):
            return (p.sum(dim=-1).long().unsqueeze(-1) == torch.arange(C)).to(dt)[..., None, :]
        return (g1[..., None, None] * flat1[..., None, None] * Fn.one_hot(first, E)[..., None] * slot(pos1)
                + g2[..., None, None] * flat2[..., None, None] * one_hot2[..., None] * slot(pos2))

    def forward(self, tokens):
        x = tokens.to(self.w_in.dtype).view(G, -1, D)
        lucid = self.mutation in ("exclusive", "uncapped_first", "row_sum_alone", "offset_cap_smaller")
        combine = self.gating_exclusive(x, self.capacity) if lucid else self.gating(x, self.capacity)
        dispatch = combine.bool().to(x)
        slots = torch.einsum("bnd,bnec->ebcd", x, dispatch)
        shape = slots.shape
        h = torch.relu(torch.bmm(slots.reshape(E, -1, D), self.w_in) + self.b_in)
        y = torch.bmm(h, self.w_out)
        if self.mutation == "other_group_slots":
            y = y.reshape(E, G, -1, D).flip(1)
        else:
            y = y.reshape(*shape)
        weights = combine.flip(0) if self.mutation == "other_group_weights" else combine
        out = torch.einsum("ebcd,bnec->bnd", y, weights.to(y.dtype))
        return out.reshape(-1, D)


def _exclusive(t):
    return Fn.pad(t, (0, 0, 1, 0)).cumsum(dim=-2)[..., :-1, :]


def _seeded(**kw):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return GroupCapacityMoE(**kw)


def _status(cands):
    return [(c.idiom, c.status) for c in cands]


@pytest.mark.parametrize("capacity", [1, 2, 16])  # drops tokens; some dropped; nothing dropped
def test_group_axis_rewritten_fp32(capacity):
    cands = rewrite_and_compare(_seeded(capacity=capacity), D, lengths=(6, 8))
    assert ("expert_slots", "rewritten") in _status(cands), [(c.idiom, c.status, c.reason) for c in cands]


def test_group_axis_rewritten_bf16():
    m = _seeded(capacity=2, dtype=torch.bfloat16)
    cands = rewrite_and_compare(m.to(torch.bfloat16), D, lengths=(8,), close=_bf16_close)
    assert ("expert_slots", "rewritten") in _status(cands), [(c.idiom, c.status, c.reason) for c in cands]


def _bf16_close(got, want):
    if got.dtype != torch.bfloat16:
        got, want = got.float(), want.float()
    err = ((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-12)).item()
    assert got.dtype == want.dtype and err <= 2e-2, f"relative error {err:.3e}"


@pytest.mark.parametrize("capacity", [1, 16])
def test_eq_slot_one_hot_rewritten(capacity):
    """Slots by ``L.unsqueeze(-1) == arange(C)`` of uncapped positions, the terms capped by ``loc < C``."""
    cands = rewrite_and_compare(_seeded(capacity=capacity, mutation="eq_one_hot"), D, lengths=(6, 8))
    assert ("expert_slots", "rewritten") in _status(cands), [(c.idiom, c.status, c.reason) for c in cands]


def test_eq_slot_one_hot_rewritten_bf16():
    m = _seeded(capacity=1, mutation="eq_one_hot", dtype=torch.bfloat16)
    cands = rewrite_and_compare(m, D, lengths=(8,), close=_bf16_close)
    assert ("expert_slots", "rewritten") in _status(cands), [(c.idiom, c.status, c.reason) for c in cands]


@pytest.mark.parametrize("capacity", [1, 2, 16])
def test_exclusive_cumsum_row_sums_rewritten(capacity):
    """lucidrains' spelling (``gating_exclusive``): rewritten and exact, fp32."""
    cands = rewrite_and_compare(_seeded(capacity=capacity, mutation="exclusive"), D, lengths=(6, 8))
    assert ("expert_slots", "rewritten") in _status(cands), [(c.idiom, c.status, c.reason) for c in cands]


def test_exclusive_cumsum_row_sums_rewritten_bf16():
    m = _seeded(capacity=1, mutation="exclusive", dtype=torch.bfloat16)
    cands = rewrite_and_compare(m, D, lengths=(8,), close=_bf16_close)
    assert ("expert_slots", "rewritten") in _status(cands), [(c.idiom, c.status, c.reason) for c in cands]


@pytest.mark.parametrize("mutation,words", [
    ("uncapped_first", "over capacity"),
    ("offset_cap_smaller", "do not start after"),
    ("row_sum_alone", "row sum"),
    ("eq_uncapped", "over capacity"),
    ("across_groups", "slot positions"),
    ("other_group_weights", "proof"),
    ("other_group_slots", "regrouped"),
])
def test_near_miss_not_rewritten(mutation, words):
    # 16 tokens per group for 4 experts: choices over capacity and second choices behind the first ones
    cands = rewrite_and_compare(_seeded(capacity=2, mutation=mutation), D, lengths=(32,))
    assert all(c.status != "rewritten" for c in cands), _status(cands)
    reasons = [c.reason for c in cands if c.idiom == "expert_slots"]
    assert reasons and all(words in r for r in reasons), reasons
