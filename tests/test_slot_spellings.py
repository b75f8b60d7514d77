"""Spellings of the expert-slots parts (patterns/expert_slots.py) that the faithful nanoMoE and
fairscale entries use, each through the sonic rewrite (output and every gradient against eager),
with near misses that compute something else and must not be rewritten.

nanoMoE (``model.py`` ``Router`` / ``MLPExperts``):
  * the one-hot of 3-D top-k ids reshaped, ``F.one_hot(ids, E).view(B * T, K, E)`` (a row-major
    reshape keeping the class axis: the one-hot of the reshaped ids);
  * the top-k logits scattered in place into a fresh ``full_like(logits, -inf)`` before any read;
  * in-place bias adds on the fresh bmm outputs, ``h = bmm(z, w1); h += b1``;
  * (exactness) a combine factor multiplied in place by a real weight is one factor, and a factor
    written after the block read it is declined.

fairscale (``top2gate.py`` / ``moe_layer.py``, without ``_AllToAll``: world size 1):
  * ``one_hot`` as ``zeros(i.shape + (n,)).scatter_(-1, i.unsqueeze(-1), 1)``;
  * one ModuleList FFN per ``chunk`` of ``z.reshape(1, E, C, d)``, ``cat`` along the experts,
    ``reshape(E, -1, d)``.
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
    ("bias_alpha", "slots_experts"),  # made functional (h.add(b1, alpha=2)): not a bias add
    ("bias_wide", "slots_experts"),
    ("weight_written_late", "modified in place"),
])
def test_nanomoe_near_misses_declined(form, reason):
    cands = _run(NanoSlots(form))  # equal to eager whatever happens
    if form == "bias_alpha" and tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 12):
        # torch 2.11's Dynamo records h.add_(b1, alpha=2) as h.add_(torch.mul(b1, 2)): the normal form
        # makes it h + 2 * b1, an expert bias the op takes as it is (rewritten, and exact: checked above)
        assert [c.status for c in cands] == ["rewritten"] * 2, [(c.status, c.reason) for c in cands]
        return
    assert cands and all(c.status != "rewritten" for c in cands), [(c.status, c.reason) for c in cands]
    assert any(reason in (c.reason or "") for c in cands), [c.reason for c in cands]


# --------------------------------------------------------------------------- fairscale

def _fs_one_hot(idx, num_classes, form="plain", value=1):
    """fairscale ``top2gate.one_hot``: zeros of the index dtype, ``scatter_`` of 1 along the last axis."""
    ret = torch.zeros(idx.shape + (num_classes,), device=idx.device, dtype=idx.dtype)
    if form == "read_zeros":  # near miss: the zeros are read before the scatter_ (the read is kept)
        ret.add_(ret.sum())
    ret.scatter_(-1, idx.unsqueeze(-1), value)
    return ret


class FairscaleSlots(nn.Module):
    """fairscale ``top2gating`` (one_hot by zeros + ``scatter_``, in-place ``locations2 +=``, ``mask *=``,
    ``gates_s /=``) and ``MOELayer.forward`` without ``_AllToAll`` (world size 1); tokens (S, d) with
    S a multiple of E (capacity 2S/E). ``experts``: "bmm" (stacked weights on the slots) or
    "chunks" (fairscale's ``reshape(1, E, -1, d).chunk(E, 1)``, one ModuleList FFN per chunk,
    ``cat(dim=1)``, ``reshape(E, -1, d)``). ``form``: "plain" or a near miss:

    - ``value2``: the one-hot of the slot positions scatters 2, not 1 (combine weights doubled);
    - ``read_zeros``: the zeros are read before the ``scatter_`` (computes the same here, but is not proven);
    - ``reversed_cat``: the outputs concatenated in reverse order (expert e's outputs land in expert E-1-e's slots);
    - ``mixed``: one expert has a GELU where the others have ReLU;
    - ``chunk_other_axis``: the slots reshaped (1, E, C, d) then chunked along C.
    """

    def __init__(self, experts: str = "chunks", form: str = "plain"):
        super().__init__()
        self.experts_kind, self.form = experts, form
        self.wg = nn.Linear(d, E, bias=False)
        if experts == "chunks":
            acts = [nn.GELU() if form == "mixed" and e == 2 else nn.ReLU() for e in range(E)]
            self.experts = nn.ModuleList([nn.Sequential(nn.Linear(d, n), acts[e], nn.Dropout(0.0), nn.Linear(n, d))
                                          for e in range(E)])
        else:
            self.w1 = nn.Parameter(torch.randn(E, d, n) / d ** 0.5)
            self.w2 = nn.Parameter(torch.randn(E, n, d) / n ** 0.5)

    def gate(self, x):
        oh = lambda i, c: _fs_one_hot(i, c, self.form)  # noqa: E731
        logits = self.wg(x)
        gates = Fn.softmax(logits, dim=1, dtype=torch.float)
        S = gates.shape[0]
        capacity = 2 * S // E
        mask1 = oh(torch.argmax(gates, dim=1), E)
        mask2 = oh(torch.argmax(logits.masked_fill(mask1.bool(), float("-inf")), dim=1), E)
        locations1 = torch.cumsum(mask1, dim=0) - 1
        locations2 = torch.cumsum(mask2, dim=0) - 1
        locations2 += torch.sum(mask1, dim=0, keepdim=True)
        mask1 *= torch.lt(locations1, capacity)
        mask2 *= torch.lt(locations2, capacity)
        locations1_s = torch.sum(locations1 * mask1, dim=1)
        locations2_s = torch.sum(locations2 * mask2, dim=1)
        gates1_s = (gates * mask1).sum(dim=1)
        gates2_s = (gates * mask2).sum(dim=1)
        denom_s = torch.clamp(gates1_s + gates2_s, min=torch.finfo(gates.dtype).eps)
        gates1_s /= denom_s
        gates2_s /= denom_s
        v = 2 if self.form == "value2" else 1
        combine1 = (gates1_s.unsqueeze(-1) * mask1).unsqueeze(2) * _fs_one_hot(locations1_s, capacity, value=v).unsqueeze(1)
        combine2 = (gates2_s.unsqueeze(-1) * mask2).unsqueeze(2) * _fs_one_hot(locations2_s, capacity, value=v).unsqueeze(1)
        combine = combine1 + combine2
        return combine.to(logits.dtype), combine.bool()

    def forward(self, x):
        combine, dispatch = self.gate(x)
        z = torch.einsum("sec,sm->ecm", dispatch.float(), x)
        if self.experts_kind == "bmm":
            y = torch.bmm(Fn.relu(torch.bmm(z, self.w1)), self.w2)
        else:
            if self.form == "chunk_other_axis":
                chunks = z.reshape(1, E, -1, d).chunk(E, dim=2)
            else:
                chunks = z.reshape(1, E, -1, d).chunk(E, dim=1)
            outs = [f(c) for c, f in zip(chunks, self.experts)]
            if self.form == "reversed_cat":
                outs = outs[::-1]
            y = torch.cat(outs, dim=1 if self.form != "chunk_other_axis" else 2)
            y = y.reshape(E, -1, d)
        return torch.einsum("sec,ecm->sm", combine, y)


def _run_fs(module):
    return rewrite_and_compare(module, d, lengths=(8, 12))


@pytest.mark.parametrize("experts", ["bmm", "chunks"])
def test_fairscale_spellings_rewritten(experts):
    cands = _run_fs(FairscaleSlots(experts))
    assert [c.status for c in cands] == ["rewritten"] * 2, [(c.status, c.reason) for c in cands]


@pytest.mark.parametrize("experts, form, reason", [
    ("bmm", "value2", "slots_dispatch"),
    ("bmm", "read_zeros", "slots_dispatch"),
    ("chunks", "reversed_cat", "slots_experts"),
    ("chunks", "mixed", "slots_experts"),
    ("chunks", "chunk_other_axis", "slots_experts"),
])
def test_fairscale_near_misses_declined(experts, form, reason):
    cands = _run_fs(FairscaleSlots(experts, form))
    assert cands and all(c.status != "rewritten" for c in cands), [(c.status, c.reason) for c in cands]
    assert any(reason in (c.reason or "") for c in cands), [c.reason for c in cands]
