"""Spellings of the expert-slots parts (patterns/expert_slots.py) that the faithful nanoMoE and
fairscale entries use, each through the sonic rewrite (output and every gradient against eager),
with near misses that compute something else and must not be rewritten.

nanoMoE (``model.py`` ``Router`` / ``MLPExperts``):
  * the one-hot of 3-D top-k ids reshaped, ``F.one_hot(ids, E).view(B * T, K, E)`` (a row-major
    reshape keeping the class axis: the one-hot of the reshaped ids);
  * the top-k logits scattered in place into a fresh ``full_like(logits, -inf)`` before any read;
  * in-place bias adds on the fresh bmm outputs, ``h = bmm(z, w1); h += b1``.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as Fn

from rewrite_check import rewrite_and_compare

E, K, d, n, C = 4, 2, 16, 8, 3


class NanoSlots(nn.Module):
    """nanoMoE's capacity dispatch on (1, S, d) tokens, choices stacked (K, S, E), one cumsum over the
    flattened (choice, token) rows, ``bmm`` experts. ``form`` selects the spelling or near miss:

    - ``view3d``: one-hot of the (1, S, K) ids viewed (S, K, E) (spelling);
    - ``scatter_``: ``probs = full_like(-inf); probs.scatter_(-1, i, v)`` then softmax (spelling);
    - ``bias_``: ``h = bmm(z, w1); h += b1`` and the same for the second projection (spelling);
    - ``nano``: all three (the faithful entry's combination);
    - ``per_choice`` (near miss, viewed one-hot): each choice counts its slots from 0: two choices share slots;
    - ``read_before_scatter`` (near miss): the softmax reads the -inf matrix before the top-k scatter_;
    - ``bias_sub`` / ``bias_alpha`` (near misses): ``h -= b1``, ``h.add_(b1, alpha=2)``;
    - ``bias_wide`` (near miss): the in-place "bias" is (E, C, out), a different value per slot;
    - ``weight_imul``: the combine weights scaled in place by a real weight before the combine reads them
      (``pw = probs.clone(); pw *= q``: read as the written value, not as the factors pw and q, since the
      composition reads pw after the write) (spelling);
    - ``weight_written_late`` (near miss): ``pw *= 2`` after the combine weights were computed from pw (the
      composition would read the doubled value where the block was).
    """

    def __init__(self, form: str):
        super().__init__()
        self.form = form
        self.router = nn.Linear(d, E, bias=False)
        self.w1 = nn.Parameter(torch.randn(E, d, n) / d ** 0.5)
        self.w2 = nn.Parameter(torch.randn(E, n, d) / n ** 0.5)
        self.b1 = nn.Parameter(torch.randn(E, C if form == "bias_wide" else 1, n) / 4)
        self.b2 = nn.Parameter(torch.randn(E, 1, d) / 4)

    def forward(self, x):
        f = self.form
        S = x.size(0)
        logits = self.router(x.view(1, S, d))  # (1, S, E)
        top_v, top_i = logits.topk(K, dim=-1)  # (1, S, K)
        if f in ("scatter_", "nano", "read_before_scatter"):
            probs = torch.full_like(logits, float("-inf"))
            early = Fn.softmax(probs, dim=-1) if f == "read_before_scatter" else None
            probs.scatter_(-1, top_i, top_v)
            probs = Fn.softmax(probs if early is None else probs + early.nan_to_num(0.0), dim=-1)
        else:
            probs = Fn.softmax(torch.full_like(logits, float("-inf")).scatter(-1, top_i, top_v), dim=-1)
        if f in ("view3d", "nano", "per_choice"):
            mask = Fn.one_hot(top_i, E).view(S, K, E).permute(1, 0, 2)  # (K, S, E)
        else:
            mask = Fn.one_hot(top_i.view(S, K), E).permute(1, 0, 2)
        if f == "per_choice":
            rank = torch.cumsum(mask, dim=1) - 1
        else:
            rank = (torch.cumsum(mask.reshape(K * S, E), dim=0) - 1).reshape(K, S, E)
        mask = mask * torch.lt(rank, C)
        slot = torch.sum(mask * rank, dim=-1)  # (K, S)
        pw = probs.view(S, E)
        if f in ("weight_imul", "weight_written_late"):
            pw = pw.clone()
        if f == "weight_imul":
            pw *= Fn.softmax(logits.view(S, E), dim=-1)
        w = mask * pw[None, :]
        combine = torch.sum(w.unsqueeze(3) * Fn.one_hot(slot, C).unsqueeze(2), dim=0)  # (S, E, C)
        if f == "weight_written_late":
            pw *= 2.0
        z = combine.bool().permute(1, 2, 0).type_as(x) @ x  # (E, C, d)
        h = torch.bmm(z, self.w1)
        if f in ("bias_", "nano", "bias_sub", "bias_alpha", "bias_wide"):
            if f == "bias_sub":
                h -= self.b1
            elif f == "bias_alpha":
                h.add_(self.b1, alpha=2.0)
            else:
                h += self.b1
            h = Fn.gelu(h)
            y = torch.bmm(h, self.w2)
            y += self.b2
        else:
            y = torch.bmm(Fn.gelu(h + self.b1), self.w2) + self.b2
        return combine.view(S, -1) @ y.view(-1, d)


def _run(module):
    return rewrite_and_compare(module, d, lengths=(8, 11))


@pytest.mark.parametrize("form", ["view3d", "scatter_", "bias_", "nano", "weight_imul"])
def test_nanomoe_spellings_rewritten(form):
    cands = _run(NanoSlots(form))
    assert [c.status for c in cands] == ["rewritten"] * 2, [(c.status, c.reason) for c in cands]


@pytest.mark.parametrize("form, reason", [
    ("per_choice", "slot positions"),
    ("read_before_scatter", "modified in place"),
    ("bias_sub", "slots_experts"),
    ("bias_alpha", "in place"),
    ("bias_wide", "slots_experts"),
    ("weight_written_late", "modified in place"),
])
def test_nanomoe_near_misses_declined(form, reason):
    cands = _run(NanoSlots(form))
    assert cands and all(c.status != "rewritten" for c in cands), [(c.status, c.reason) for c in cands]
    assert any(reason in (c.reason or "") for c in cands), [c.reason for c in cands]
