"""fairseq's spellings of the expert-slots parts (patterns/expert_slots.py), as fairseq's ``MOELayer`` +
``top2gating`` (moe branch) write them, each through the sonic rewrite (output and every gradient against
eager), with near misses that compute something else and must not be rewritten:

  * ``mm``: dispatch ``torch.mm(dispatch.permute(1, 2, 0).view(E * C, S), x)`` (2-D rows e * C + c) and
    combine ``combine.view(S, E * C).mm(y.view(E * C, d))``;
  * ``bmm``: the combine's outer products ``torch.bmm(gates.unsqueeze(-1), locations_sc.unsqueeze(1))``
    (a contraction over one term: the broadcast product);
  * ``wrap``: each expert flattens its (1, 1, C, d) chunk's rows, ``x.reshape(-1, d)``, and unflattens its
    output, ``.view(x_shape)`` (fairseq's ``_ffn``);
  * ``keepdim``: the experts' one-hot ``zeros(S, E).scatter_(1, argmax(g, dim=1, keepdim=True), 1)`` (the
    index a (S, 1) column already).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as Fn

from rewrite_check import rewrite_and_compare

E, d, n = 4, 16, 8
ALL = ("mm", "bmm", "wrap", "keepdim")


def _one_hot(idx, num_classes, unsqueeze=True, rows=None, dim=-1):
    """fairseq ``top2gate.one_hot``: zeros of the index dtype, ``scatter_`` of 1 along the last axis
    (``unsqueeze``: of ``idx.unsqueeze(-1)``); near misses: ``rows``, zeros of that many rows; ``dim``
    the axis scattered along."""
    if unsqueeze:
        idx = idx.unsqueeze(-1)
    lead = idx.shape[:-1] if rows is None else (rows,)
    out = torch.zeros(lead + (num_classes,), device=idx.device, dtype=idx.dtype)
    out.scatter_(len(out.shape) - 1 if dim == -1 else dim, idx, 1)
    return out


class FFN(nn.Module):
    """A ReLU FFN; ``wrap``: fairseq's ``_ffn`` row flatten/unflatten around it; ``wrap_t`` (near miss):
    the output transposed before the unflatten (rows land elsewhere)."""

    def __init__(self, form):
        super().__init__()
        self.form = form
        self.fc1, self.fc2 = nn.Linear(d, n), nn.Linear(n, d)

    def forward(self, x):
        if self.form not in ("wrap", "wrap_t"):
            return self.fc2(Fn.relu(self.fc1(x)))
        x_shape = x.shape
        x = x.reshape(-1, x.size(-1))
        x = self.fc2(Fn.relu(self.fc1(x)))
        if self.form == "wrap_t":
            return x.t().reshape(x_shape)
        return x.view(x_shape)


class FairseqSlots(nn.Module):
    """fairseq ``top2gating`` (policy "all", fp32 gates, renormalised after dropping) and ``MOELayer``
    (world size 1, no padding) on (S, d) tokens. ``forms``: the fairseq spellings used (else the
    fairscale ones: einsums, broadcast products, no row flatten, ``unsqueeze(-1)`` indices), and near
    misses:

    - ``mm_t``: the dispatch rows flattened slot-minor, ``permute(2, 1, 0).reshape(C * E, S)`` (c * E + e);
    - ``combine_t``: the combine weights flattened slot-minor, ``transpose(1, 2).reshape(S, C * E)``;
    - ``bmm_wide``: the outer product contracts a 2-wide axis (g * loc + 0.5 * g * loc);
    - ``wrap_t``: an expert's output transposed before it is unflattened;
    - ``argmax_dim0``: ``argmax(gates.t(), dim=0, keepdim=True)``, a (1, S) row, scattered as the one-hot;
    - ``scatter_dim0``: the (S, 1) column scattered along the tokens (dim 0), not the experts;
    - ``mm_bmm_experts``: mm dispatch viewed (E, C, d) into stacked bmm experts (a spelling);
    - ``mm_bmm_view_t``: the same with the rows viewed (C, E, d) then transposed (near miss).
    """

    def __init__(self, forms=ALL, dtype=torch.float32):
        super().__init__()
        self.forms, self.dtype = set(forms), dtype
        self.wg = nn.Linear(d, E, bias=False)
        wrap = "wrap_t" if "wrap_t" in self.forms else "wrap" if "wrap" in self.forms else ""
        self.experts = nn.ModuleList([FFN(wrap) for _ in range(E)])
        self.w1 = nn.Parameter(torch.randn(E, d, n) / d ** 0.5)
        self.w2 = nn.Parameter(torch.randn(E, n, d) / n ** 0.5)
        self.to(dtype)

    def gate(self, x):
        f = self.forms
        logits = self.wg(x).float()
        gates = Fn.softmax(logits, dim=1)
        S = gates.shape[0]
        capacity = 2 * math.ceil(S / E)
        if "argmax_dim0" in f:
            mask1 = _one_hot(torch.argmax(gates.t(), dim=0, keepdim=True), E, unsqueeze=False, rows=S)
        elif "scatter_dim0" in f:
            mask1 = _one_hot(torch.argmax(gates, dim=1, keepdim=True), E, unsqueeze=False, dim=0)
        elif "keepdim" in f:
            mask1 = _one_hot(torch.argmax(gates, dim=1, keepdim=True), E, unsqueeze=False)
        else:
            mask1 = _one_hot(torch.argmax(gates, dim=1), E)
        masked = logits.masked_fill(mask1.bool(), float("-inf"))
        if "keepdim" in f:
            mask2 = _one_hot(torch.argmax(masked, dim=1, keepdim=True), E, unsqueeze=False)
        else:
            mask2 = _one_hot(torch.argmax(masked, dim=1), E)
        locations1 = torch.cumsum(mask1, dim=0) - 1
        locations2 = torch.cumsum(mask2, dim=0) - 1
        locations2 += torch.sum(mask1, dim=0, keepdim=True)
        mask1 = mask1 * torch.lt(locations1, capacity)
        mask2 = mask2 * torch.lt(locations2, capacity)
        gates1_s = (gates * mask1).sum(dim=1)
        gates2_s = (gates * mask2).sum(dim=1)
        denom_s = torch.clamp(gates1_s + gates2_s, min=torch.finfo(gates.dtype).eps)
        gates1_s /= denom_s
        gates2_s /= denom_s
        locations1_s = torch.sum(locations1 * mask1, dim=1)
        locations2_s = torch.sum(locations2 * mask2, dim=1)
        gates1 = gates1_s.unsqueeze(-1) * mask1.to(gates1_s.dtype)
        gates2 = gates2_s.unsqueeze(-1) * mask2.to(gates2_s.dtype)
        loc1_sc = _one_hot(locations1_s, capacity).to(gates1.dtype)
        loc2_sc = _one_hot(locations2_s, capacity).to(gates2.dtype)
        if "bmm_wide" in f:
            outer = lambda g, l: torch.bmm(torch.stack([g, 0.5 * g], -1), torch.stack([l, l], 1))  # noqa: E731
        elif "bmm" in f:
            outer = lambda g, l: torch.bmm(g.unsqueeze(-1), l.unsqueeze(1))  # noqa: E731
        else:
            outer = lambda g, l: g.unsqueeze(-1) * l.unsqueeze(1)  # noqa: E731
        combine = outer(gates1, loc1_sc) + outer(gates2, loc2_sc)
        return combine.to(x.dtype), combine.bool()

    def forward(self, x):
        f = self.forms
        x = x.to(self.dtype)
        combine, dispatch = self.gate(x)
        S, C = combine.shape[0], combine.shape[2]
        dm = dispatch.to(x.dtype)
        if "mm_t" in f:
            z = torch.mm(dm.permute(2, 1, 0).reshape(C * E, S), x)
        elif f & {"mm", "mm_bmm_experts", "mm_bmm_view_t"}:
            dm = dm.permute(1, 2, 0)
            z = torch.mm(dm.view(E * C, S), x)
        else:
            z = torch.einsum("sec,sm->ecm", dm, x)
        if f & {"mm_bmm_experts", "mm_bmm_view_t"}:
            slots = z.view(C, E, d).transpose(0, 1) if "mm_bmm_view_t" in f else z.view(E, C, d)
            y = torch.bmm(Fn.relu(torch.bmm(slots, self.w1)), self.w2)
        else:
            chunks = z.reshape(1, E, -1, d).chunk(E, dim=1)
            y = torch.cat([ex(c) for c, ex in zip(chunks, self.experts)], dim=1).reshape(E, -1, d)
        if "combine_t" in f:
            out = combine.transpose(1, 2).reshape(S, C * E).mm(y.view(E * C, d))
        elif f & {"mm", "mm_t", "mm_bmm_experts", "mm_bmm_view_t"}:
            out = combine.view(S, E * C).mm(y.view(E * C, d))
        else:
            out = torch.einsum("sec,ecm->sm", combine, y)
        return out.float()


def _statuses(cands):
    return [(c.status, c.reason) for c in cands]


@pytest.mark.parametrize("forms", [("mm",), ("bmm",), ("wrap",), ("keepdim",), ALL, ("mm_bmm_experts",),
                                   ("mm_bmm_experts", "bmm", "keepdim")])
def test_fairseq_spellings_rewritten(forms):
    torch.manual_seed(0)
    cands = rewrite_and_compare(FairseqSlots(forms), d, lengths=(8, 12))
    assert cands and all(c.status == "rewritten" for c in cands), _statuses(cands)


def test_fairseq_spellings_rewritten_bf16():
    torch.manual_seed(0)
    cands = rewrite_and_compare(FairseqSlots(ALL, torch.bfloat16), d, lengths=(8, 12), tol=3e-2)
    assert cands and all(c.status == "rewritten" for c in cands), _statuses(cands)


@pytest.mark.parametrize("forms, reason", [
    (("mm_t", "bmm", "wrap", "keepdim"), "slots_dispatch"),  # dispatch rows c * E + e: other slots
    (("mm", "combine_t", "bmm", "wrap", "keepdim"), "combined with"),  # combine columns c * E + e
    (("mm", "bmm_wide", "wrap", "keepdim"), "not a one-hot of slot positions"),  # 1.5 * g * loc
    (("mm", "bmm", "wrap_t", "keepdim"), "expert 0 on its chunk"),  # expert rows transposed, then unflattened
    (("mm", "bmm", "wrap", "argmax_dim0"), "one chosen expert per token"),  # a (1, S) row of expert ids
    (("mm", "bmm", "wrap", "scatter_dim0"), "one chosen expert per token"),  # the column scattered along tokens
    (("mm_bmm_view_t", "bmm", "keepdim"), "slots_dispatch"),  # mm rows regrouped (C, E, d), transposed
])
def test_fairseq_near_misses_not_rewritten(forms, reason):
    torch.manual_seed(0)
    # length 8: capacity 4 == E, so the slot-minor flattens have the shapes of the right ones
    cands = rewrite_and_compare(FairseqSlots(forms), d, lengths=(8,))
    assert cands and all(c.status != "rewritten" for c in cands), _statuses(cands)
    assert any(reason in (c.reason or "") for c in cands), _statuses(cands)
