"""OpenMoE's spellings of the expert-slots parts (patterns/expert_slots.py), as the PyTorch port of OpenMoE
(pingzhili/openmoe-pt ``HFOpenMoeSparseMLP``, whose ``_local_process`` is ColossalAI's ``MLPExperts``)
writes them, each through the sonic rewrite (output and every gradient against eager, fp32 and bf16), with
near misses that compute something else and must not be rewritten:

  * ``colossal``: the experts' layout, ``x.unsqueeze(0).transpose(0, 1).reshape(E, -1, d)``, one module per
    ``x[i]``, ``torch.cat([y[i].unsqueeze(0) ...], 0).reshape(inshape).transpose(0, 1).contiguous()`` and the
    combine ``matmul(cb.view(S, -1), y.view(-1, d))`` of that (1, E, C, d) output (unit axes moved only);
  * ``indexed``: the router's (S, E, C) combine weights and bool dispatch mask written term by term into zeros,
    ``cb[i, top1[i], rank1[i]] += w1[i, top1[i]]`` and ``sec[i, top1[i], rank1[i]] |= mask1.bool()[i, top1[i]]``
    (i = arange(S)), the dispatch ``matmul(sec.type_as(x).permute(1, 2, 0), x)``;
  * ``triple``: OpenMoE's three-factor experts ``down(x1 * silu(x2) * up(z))`` (x1, x2 halves of one
    projection): the fused op's "swiglu3", tested in tests/test_three_factor_experts.py.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as Fn

from rewrite_check import rewrite_and_compare

E, d, n = 4, 16, 8


class Expert(nn.Module):
    """SwiGLU (``swiglu``: down(silu(gate(z)) * up(z))) or OpenMoE's three factors (``triple``)."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.gate = nn.Linear(d, 2 * n if kind == "triple" else n, bias=False)
        self.up, self.down = nn.Linear(d, n, bias=False), nn.Linear(n, d, bias=False)

    def forward(self, z):
        if self.kind == "triple":
            x1, x2 = torch.split(self.gate(z), n, -1)
            return self.down(x1 * (x2 * torch.sigmoid(x2)) * self.up(z))
        return self.down(Fn.silu(self.gate(z)) * self.up(z))


class OpenMoeSlots(nn.Module):
    """Top-2 capacity gating (combine weights as fairseq's broadcast products, dispatch ``combine.bool()``),
    the dispatch ``matmul(dispatch.permute(1, 2, 0), x)``, experts in ``forms``' layout, and near misses:

    - ``swap``: the experts' (E, C, d) outputs transposed to (C, E, d) before the reshape (C == E: same shape);
    - ``shifted``: expert e runs on the slots of expert (e + 1) % E.
    """

    def __init__(self, forms=("colossal",), expert="swiglu", dtype=torch.float32):
        super().__init__()
        self.forms, self.dtype = set(forms), dtype
        self.wg = nn.Linear(d, E, bias=False)
        self.experts = nn.ModuleList([Expert(expert) for _ in range(E)])
        self.to(dtype)

    def gate(self, x):
        logits = self.wg(x).float()
        gates = Fn.softmax(logits, dim=1)
        capacity = E  # == E: the near misses that swap the (E, C) axes keep the shapes
        mask1 = Fn.one_hot(torch.argmax(gates, dim=1), E)
        mask2 = Fn.one_hot(torch.argmax(logits.masked_fill(mask1.bool(), float("-inf")), dim=1), E)
        loc1 = torch.cumsum(mask1, dim=0) - 1
        loc2 = torch.cumsum(mask2, dim=0) - 1 + torch.sum(mask1, dim=0, keepdim=True)
        mask1 = mask1 * torch.lt(loc1, capacity)
        mask2 = mask2 * torch.lt(loc2, capacity)
        s1, s2 = torch.sum(loc1 * mask1, dim=1), torch.sum(loc2 * mask2, dim=1)
        g1, g2 = gates * mask1, gates * mask2
        combine = g1.unsqueeze(-1) * Fn.one_hot(s1, capacity).unsqueeze(1) \
            + g2.unsqueeze(-1) * Fn.one_hot(s2, capacity).unsqueeze(1)
        return combine, combine.bool()

    def gate_indexed(self, x):
        """OpenMoE's ``HFOpenMoeTop2Router``: int32 one-hots, in-place ``rank2 +=`` and ``mask *=``, the
        (S, E, C) combine weights and the bool dispatch mask written at (token, expert, slot) by
        advanced-index ``+=`` / ``|=`` into zeros. Near misses: ``or_weights`` (the mask written under the
        pre-capacity one-hot: dropped tokens take slot 0), ``mask_slot_1`` (the mask's first choice at the
        second choice's slots), ``value_other`` (the first choice's weight read at the second choice's expert), ``pos_written`` (the
        first choices' slot positions overwritten in place by 0 after they were computed)."""
        f = self.forms
        probs = Fn.softmax(self.wg(x).float(), dim=-1)
        capacity = E
        top1 = torch.argmax(probs, dim=-1)
        mask1 = Fn.one_hot(top1, num_classes=E).to(torch.int32)
        top2 = torch.argmax(probs.masked_fill(mask1.bool(), float("-inf")), dim=-1)
        mask2 = Fn.one_hot(top2, num_classes=E).to(torch.int32)
        pre1 = Fn.one_hot(top1, num_classes=E) if "or_weights" in f else None
        rank1 = torch.cumsum(mask1, dim=0) - 1
        rank2 = torch.cumsum(mask2, dim=0) - 1
        rank2 += torch.sum(mask1, dim=-2, keepdim=True)
        mask1 *= torch.lt(rank1, capacity)
        mask2 *= torch.lt(rank2, capacity)
        rank1 = torch.sum(mask1 * rank1, dim=-1)
        rank2 = torch.sum(mask2 * rank2, dim=-1)
        if "pos_written" in f:
            rank1[:] = 0  # every first choice at slot 0 (8 tokens, 4 experts: two share a slot)
        weight1, weight2 = mask1 * probs, mask2 * probs
        cb = torch.zeros(probs.shape + (capacity,), device=x.device)
        sec = torch.zeros_like(cb, dtype=torch.bool)
        i = torch.arange(0, probs.shape[0], device=x.device)
        cb[i, top1[i], rank1[i]] += weight1[i, (top2 if "value_other" in f else top1)[i]]
        cb[i, top2[i], rank2[i]] += weight2[i, top2[i]]
        m1 = pre1 if pre1 is not None else mask1
        sec[i, top1[i], (rank2 if "mask_slot_1" in f else rank1)[i]] |= m1.bool()[i, top1[i]]
        sec[i, top2[i], rank2[i]] |= mask2.bool()[i, top2[i]]
        return cb, sec

    def experts_on(self, slots):
        """ColossalAI's ``MLPExperts`` as OpenMoE's ``_local_process`` writes it (else fairscale's chunks)."""
        if "colossal" not in self.forms:
            chunks = slots.reshape(1, E, -1, d).chunk(E, dim=1)
            return torch.cat([ex(c) for c, ex in zip(chunks, self.experts)], dim=1).reshape(E, -1, d)
        x = slots.unsqueeze(0)
        e, h = x.size(1), x.size(-1)
        x = x.transpose(0, 1)
        inshape = x.shape
        x = x.reshape(e, -1, h)
        shift = 1 if "shifted" in self.forms else 0
        x = [self.experts[i](x[(i + shift) % e]) for i in range(e)]
        x = torch.cat([x[i].unsqueeze(0) for i in range(e)], dim=0)
        if "swap" in self.forms:
            x = x.transpose(0, 1)
        x = x.reshape(inshape)
        return x.transpose(0, 1).contiguous()

    def forward(self, x):
        x = x.to(self.dtype)
        combine, dispatch = self.gate_indexed(x) if "indexed" in self.forms else self.gate(x)
        slots = torch.matmul(dispatch.type_as(x).permute(1, 2, 0), x)
        y = self.experts_on(slots)
        cw = combine.type_as(x)
        out = torch.matmul(cw.view(cw.shape[0], -1), y.view(-1, y.shape[-1]))
        return out.float()


def _statuses(cands):
    return [(c.status, c.reason) for c in cands]


def test_colossal_layout_rewritten():
    torch.manual_seed(0)
    cands = rewrite_and_compare(OpenMoeSlots(), d, lengths=(8, 12))
    assert cands and all(c.status == "rewritten" for c in cands), _statuses(cands)


@pytest.mark.parametrize("forms", [("indexed",), ("indexed", "colossal")])
def test_indexed_writes_rewritten(forms):
    torch.manual_seed(0)
    cands = rewrite_and_compare(OpenMoeSlots(forms), d, lengths=(8, 12))
    assert cands and all(c.status == "rewritten" for c in cands), _statuses(cands)


def test_indexed_writes_rewritten_bf16():
    torch.manual_seed(0)
    cands = rewrite_and_compare(OpenMoeSlots(("indexed", "colossal"), dtype=torch.bfloat16), d, lengths=(8, 12),
                                tol=3e-2)
    assert cands and all(c.status == "rewritten" for c in cands), _statuses(cands)


@pytest.mark.parametrize("forms, expert, reason", [
    (("colossal", "swap"), "swiglu", "slots_experts"),  # (E, C) axes of the outputs swapped: other rows
    (("colossal", "shifted"), "swiglu", "chunk 0 of"),  # expert e on expert e + 1's slots
    (("indexed", "or_weights"), "swiglu", "no term of the dispatch mask"),  # dropped tokens dispatched to slot 0
    (("indexed", "mask_slot_1"), "swiglu", "no term of the dispatch mask"),  # mask at other slots
    (("indexed", "value_other"), "swiglu", "chosen expert"),  # weight read at another expert
    (("indexed", "pos_written"), "swiglu", "modified in place"),  # a slot position overwritten
])
def test_openmoe_near_misses_not_rewritten(forms, expert, reason):
    torch.manual_seed(0)
    cands = rewrite_and_compare(OpenMoeSlots(forms, expert), d, lengths=(8,))
    assert cands and all(c.status != "rewritten" for c in cands), _statuses(cands)
    assert any(reason in (c.reason or "") for c in cands), _statuses(cands)
