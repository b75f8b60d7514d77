"""Spellings from lucidrains' ``mixture-of-experts`` / ``st-moe-pytorch`` (issue 18), through the
sonic rewrite (output and every gradient against eager), with near misses that must not be rewritten.

* einsums written with an ellipsis (``fx.matching.einsum_parts`` reads ``...`` as the letters it
  stands for, so every composition that reads einsums accepts them): the stacked experts
  ``einsum("...nd,...dh->...nh", x, w1)`` / ``einsum("...nh,...hd->...nd", h, w2)`` on (E, C, d)
  slots (the ellipsis covers the expert axis), and the capacity dispatch / combine
  ``einsum("...sec,...sm->...ecm")`` / ``einsum("...sec,...ecm->...sm")`` on 2-D tokens (the
  ellipsis covers no dimension);
* near miss: a (1, d, n) weight broadcast over the experts by the ellipsis (one shared weight, not
  one per expert; letters cannot say a size-1 broadcast, so the equation is not read).

``explain`` on the graph break of lucidrains' ``safe_one_hot`` (``F.one_hot(idx, max(idx.max() + 2,
C))[..., :C]``: a width read from the data on the host) names the source line, says why Dynamo
stops there and gives the static-width spelling; another host read (``.item()``) is not given it.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as Fn

from rewrite_check import rewrite_and_compare

E, d, n, C = 4, 16, 32, 3


def _safe_one_hot(indexes, max_length):
    # lucidrains' safe_one_hot: the width is read from the indexes on the host
    max_index = indexes.max() + 1
    return Fn.one_hot(indexes, max(max_index + 1, max_length))[..., :max_length]


class EllipsisSlots(nn.Module):
    """GShard top-2 capacity dispatch (positions by cumsum, the second choice after the first's
    counts, tokens over capacity dropped) with lucidrains' ellipsis einsum experts. ``form``:
    ``experts`` (ellipsis in the experts only), ``all`` (also in the dispatch and the combine),
    ``shared_w1`` (near miss: w1 is (1, d, n), broadcast over the experts by the ellipsis)."""

    def __init__(self, form: str, dtype=torch.float32):
        super().__init__()
        self.form = form
        self.router = nn.Linear(d, E, bias=False, dtype=dtype)
        self.w1 = nn.Parameter((torch.randn(1 if form == "shared_w1" else E, d, n) / d ** 0.5).to(dtype))
        self.w2 = nn.Parameter((torch.randn(E, n, d) / n ** 0.5).to(dtype))

    def combine_weights(self, x):
        gates = Fn.softmax(self.router(x), dim=-1)
        first = torch.argmax(gates, dim=-1)
        mask1 = Fn.one_hot(first, E)
        second = torch.argmax(gates.masked_fill(mask1.bool(), float("-inf")), dim=-1)
        mask2 = Fn.one_hot(second, E)
        loc1 = torch.cumsum(mask1, dim=0) - 1
        loc2 = torch.cumsum(mask2, dim=0) - 1 + mask1.sum(dim=0, keepdim=True)
        kept1, kept2 = mask1 * (loc1 < C).long(), mask2 * (loc2 < C).long()
        slot1, slot2 = (loc1 * kept1).sum(dim=1), (loc2 * kept2).sum(dim=1)
        if self.form == "item":
            slot1 = slot1 * int(slot1.max().item() >= 0)  # a host read that is not a one_hot width
        g1, g2 = (gates * kept1).sum(dim=1), (gates * kept2).sum(dim=1)
        w1 = (g1 / (g1 + g2).clamp(min=1e-6)).unsqueeze(1) * kept1.to(gates.dtype)
        w2 = (g2 / (g1 + g2).clamp(min=1e-6)).unsqueeze(1) * kept2.to(gates.dtype)
        one_hot = _safe_one_hot if self.form == "safe_one_hot" else Fn.one_hot
        return (w1.unsqueeze(2) * one_hot(slot1, C).to(gates.dtype).unsqueeze(1)
                + w2.unsqueeze(2) * one_hot(slot2, C).to(gates.dtype).unsqueeze(1))

    def forward(self, x):
        combine = self.combine_weights(x)
        dispatch = combine.bool().type_as(x)
        ell = self.form == "all"
        slots = torch.einsum("...sec,...sm->...ecm" if ell else "sec,sm->ecm", dispatch, x)
        h = Fn.gelu(torch.einsum("...nd,...dh->...nh", slots, self.w1))
        y = torch.einsum("...nh,...hd->...nd", h, self.w2)
        return torch.einsum("...sec,...ecm->...sm" if ell else "sec,ecm->sm", combine.type_as(x), y)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("form", ["experts", "all"])
def test_ellipsis_einsums_rewritten(form, dtype, tol):
    torch.manual_seed(0)
    module = EllipsisSlots(form, dtype)
    if dtype != torch.float32:
        module.forward = _in_dtype(module, dtype)
    lengths = (8, 11) if dtype == torch.float32 else (11,)  # bf16: one length keeps the file fast
    # bf16: relative norm (the router's gradient differs elementwise by bf16 steps: 2.11 and 2.13 round
    # eager's einsum products differently)
    cands = rewrite_and_compare(module, d, lengths=lengths, tol=tol, rel_norm=dtype != torch.float32)
    assert cands and all(c.status == "rewritten" for c in cands), [(c.status, c.reason) for c in cands]


def _in_dtype(module, dtype):
    forward = module.forward

    def run(x):
        return forward(x.to(dtype))
    return run


def test_broadcast_weight_not_rewritten():
    torch.manual_seed(0)
    cands = rewrite_and_compare(EllipsisSlots("shared_w1"), d, lengths=(11,))
    assert all(c.status != "rewritten" for c in cands), [(c.status, c.reason) for c in cands]


class SafeOneHotMoE(EllipsisSlots):
    """``EllipsisSlots`` with the slot one-hots by ``_safe_one_hot`` (``safe_one_hot``) or with an
    ``.item()`` host read (``item``); the class name marks it as an MoE block for ``explain``."""


@pytest.mark.parametrize("form", ["safe_one_hot", "item"])
def test_explain_names_host_read(form):
    import moe_inductor

    torch.manual_seed(0)
    rep = moe_inductor.explain(SafeOneHotMoE(form), torch.randn(8, d), inductor=False)
    if form == "safe_one_hot":
        # no host read any more: safe_one_hot is traced (moe_inductor/dynamo/one_hot_width.py) and its narrowed
        # ``== arange(C)`` slot one-hot is read as capped slots (patterns/expert_slots.py ``_need_capped``)
        assert [e.status for e in rep.entries] == ["rewritten"], [(e.status, e.reason) for e in rep.entries]
        return
    entry = next(e for e in rep.entries if "graph break" in e.status + e.reason)
    assert "int(slot1.max().item() >= 0)" in entry.reason and "read on the host" in entry.reason, entry.reason
    assert "torch.arange(C" not in entry.remedy, entry.remedy
