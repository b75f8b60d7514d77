"""Part spellings of two public references (faithful entries ``tests/faithful/gpt_oss_reference.py`` and
``tests/faithful/llama4_official.py``), each on small hand-written modules through the rewrite alone:
rewritten and exact (output and every gradient vs eager, fp32 and bf16), and look-alikes that compute
something else left alone (still equal to eager).

- ``rows_experts`` (``patterns/assignment_rows.py``): an einsum of per-row gathered weights with
  their rows in any letters and operand order (GPT-OSS's ``einsum("beck,bk->bec", W[idx, ...], x)``,
  weights first, ``W[idx, ...]``), and a per-expert bias gathered per row added out of place
  (``einsum(...) + b[idx, ...]``; ``t += b[idx, ...]`` reads so after the normal form).
- ``slots_dispatch`` ``dense_scores`` (``patterns/expert_slots.py``): the replicated rows as
  ``gather(x, 0, arange(S).view(1, -1).expand(E, -1).reshape(-1, 1).expand(-1, d))``, the score column
  as ``sigmoid(X.transpose(0, 1)).reshape(-1, 1)``, the scaled rows ``.detach()``-ed; combined by an
  unweighted ``base.scatter_add_`` of slot (e, s) to token s (Meta's Llama 4 ``moe.py``).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as Fn

from rewrite_check import rewrite_and_compare

D, N, E, K = 24, 8, 4, 2


def _status(cands) -> list:
    return [(c.idiom, c.status) for c in cands]


def _rewritten(cands, idiom) -> bool:
    return (idiom, "rewritten") in _status(cands)


def _why(cands) -> list:
    return [(c.idiom, c.status, c.reason) for c in cands]


def _seeded(cls, seed=0, dtype=torch.float32, **kw):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(**kw).to(dtype)


def swiglu(x, alpha: float = 1.702, limit: float = 7.0):
    g, lin = x[..., ::2], x[..., 1::2]
    g = g.clamp(min=None, max=limit)
    lin = lin.clamp(min=-limit, max=limit)
    return g * torch.sigmoid(alpha * g) * (lin + 1)


# --------------------------------------------------------------------------- gathered-weight einsums

class GatheredEinsum(nn.Module):
    """Top-k softmax router; per token the K experts' weights gathered and contracted by einsum.
    ``order``: "weights_first" (GPT-OSS) or "rows_first" (gpt-fast); ``layout``: "out_in" (W (E, out,
    in)) or "in_out" (W (E, in, out)); ``bias``: None, "add" (``+ b[idx, ...]``), "iadd" (``+=``),
    "other_ids" (the bias gathered with other ids: a look-alike), "shared" (one bias for all experts:
    not a per-expert bias); ``act``: "gptoss" (interleaved clamped gate) or "silu" (chunked halves)."""

    def __init__(self, order="weights_first", layout="out_in", bias="add", act="gptoss"):
        super().__init__()
        self.order, self.layout, self.bias, self.act = order, layout, bias, act
        self.gate = nn.Linear(D, E)
        w1, w2 = torch.randn(E, 2 * N, D) / D ** 0.5, torch.randn(E, D, N) / N ** 0.5
        if layout == "in_out":
            w1, w2 = w1.transpose(1, 2).contiguous(), w2.transpose(1, 2).contiguous()
        self.w1, self.w2 = nn.Parameter(w1), nn.Parameter(w2)
        shape1, shape2 = ((2 * N,), (D,)) if bias == "shared" else ((E, 2 * N), (E, D))
        self.b1 = nn.Parameter(torch.randn(*shape1) * 0.1)
        self.b2 = nn.Parameter(torch.randn(*shape2) * 0.1)

    def proj(self, W, v, up):
        if self.layout == "out_in":
            eq = ("beck,bk->bec" if up else "beck,bek->bec") if self.order == "weights_first" else \
                ("bk,beck->bec" if up else "bek,beck->bec")
        else:
            eq = ("bekc,bk->bec" if up else "bekc,bek->bec") if self.order == "weights_first" else \
                ("bk,bekc->bec" if up else "bek,bekc->bec")
        return torch.einsum(eq, W, v) if self.order == "weights_first" else torch.einsum(eq, v, W)

    def add_bias(self, t, b, idx):
        if self.bias is None:
            return t
        if self.bias == "shared":
            return t + b
        gathered = b[idx.flip(-1), ...] if self.bias == "other_ids" else b[idx, ...]
        if self.bias == "iadd":
            t += gathered
            return t
        return t + gathered

    def forward(self, x):
        x = x.to(self.w1.dtype)
        top = torch.topk(self.gate(x), k=K, dim=-1, sorted=True)
        w, idx = torch.softmax(top.values, dim=1), top.indices
        t = self.add_bias(self.proj(self.w1[idx, ...], x, True), self.b1, idx)
        if self.act == "gptoss":
            t = swiglu(t)
        else:
            g, u = t.chunk(2, dim=-1)
            t = Fn.silu(g) * u
        t = self.add_bias(self.proj(self.w2[idx, ...], t, False), self.b2, idx)
        return torch.einsum("bec,be->bc", t, w)


@pytest.mark.parametrize("order,layout,bias,act", [
    ("weights_first", "out_in", "add", "gptoss"),
    ("weights_first", "out_in", "iadd", "gptoss"),
    ("weights_first", "in_out", "add", "silu"),
    ("rows_first", "in_out", None, "silu"),
    ("rows_first", "out_in", "iadd", "silu"),
])
def test_gathered_einsum_rewritten_fp32(order, layout, bias, act):
    m = _seeded(GatheredEinsum, order=order, layout=layout, bias=bias, act=act)
    cands = rewrite_and_compare(m, D, lengths=(5, 8) if bias == "add" and act == "gptoss" else (8,))
    assert _rewritten(cands, "gathered_weights"), _why(cands)


@pytest.mark.parametrize("layout", ["out_in", "in_out"])
def test_gathered_einsum_rewritten_bf16(layout):
    m = _seeded(GatheredEinsum, dtype=torch.bfloat16, layout=layout, bias="iadd")
    cands = rewrite_and_compare(m, D, lengths=(8,), rel_norm=True, tol=3e-2)
    assert _rewritten(cands, "gathered_weights"), _why(cands)


@pytest.mark.parametrize("bias", ["other_ids", "shared"])
def test_gathered_einsum_bias_look_alikes_not_rewritten(bias):
    """A bias gathered with other ids than the weights' (``b[idx.flip(-1)]``: expert k's bias on
    expert k' rows), or one bias shared by all experts: not a per-expert bias of each row's expert."""
    m = _seeded(GatheredEinsum, bias=bias)
    cands = rewrite_and_compare(m, D, lengths=(8,))
    assert not _rewritten(cands, "gathered_weights"), _why(cands)


class SummedSlotsEinsum(GatheredEinsum):
    """Look-alike: the up einsum also sums over the K slots (``'beck,bk->bc'``), so the K experts'
    hidden rows are added before the activation: not one MLP per (token, expert)."""

    def forward(self, x):
        top = torch.topk(self.gate(x), k=K, dim=-1, sorted=True)
        w, idx = torch.softmax(top.values, dim=1), top.indices
        h = swiglu(torch.einsum("beck,bk->bc", self.w1[idx, ...], x))
        t = torch.einsum("beck,bk->bec", self.w2[idx, ...], h)
        return torch.einsum("bec,be->bc", t, w)


def test_einsum_summing_slots_not_rewritten():
    cands = rewrite_and_compare(_seeded(SummedSlotsEinsum, bias=None), D, lengths=(8,))
    assert not _rewritten(cands, "gathered_weights"), _why(cands)


# --------------------------------------------------------------------------- Llama 4's dense dispatch

class DenseGather(nn.Module):
    """Meta's Llama 4 ``MoE`` spelling. ``detach``: the scaled rows ``.detach()``-ed; ``base``:
    "shared" (a shared expert's output as the scatter_add_ base), "zeros"; look-alikes: ``rows``
    "rolled" (the gathered token order is not arange), ``fill`` 0.0 (sigmoid(0) = 0.5 for the
    unpicked experts), ``detach`` "tokens" (only the gathered tokens detached, the scores not: an
    input the dispatch is not), ``scatter`` "rolled" (slot (e, s) added to another token)."""

    def __init__(self, detach=True, base="shared", rows="arange", fill=float("-inf"), scatter="arange"):
        super().__init__()
        self.detach, self.base, self.rows, self.fill, self.scatter = detach, base, rows, fill, scatter
        self.router = nn.Parameter(torch.randn(D, E) / D ** 0.5)
        self.w1 = nn.Parameter(torch.randn(E, D, N) / D ** 0.5)
        self.w3 = nn.Parameter(torch.randn(E, D, N) / D ** 0.5)
        self.w2 = nn.Parameter(torch.randn(E, N, D) / N ** 0.5)
        self.shared = nn.Linear(D, D, bias=False)

    def table(self, a, kind):
        ar = torch.arange(a)
        if kind == "rolled":
            ar = ar.roll(1)
        return ar.view(1, -1).expand(E, -1)

    def forward(self, x):
        x = x.to(self.w1.dtype)
        a = x.shape[0]
        scores = torch.matmul(x, self.router).transpose(0, 1)
        top_v, top_i = torch.topk(scores.transpose(0, 1), K, dim=1)
        scores = torch.full_like(scores.transpose(0, 1), self.fill).scatter_(1, top_i, top_v).transpose(0, 1)
        scores = torch.sigmoid(scores)
        idx = self.table(a, self.rows)
        routed = torch.gather(x, dim=0, index=idx.reshape(-1, 1).expand(-1, D))
        if self.detach == "tokens":
            routed = routed.detach()
        routed = routed * scores.reshape(-1, 1)
        if self.detach is True:
            routed = routed.detach()
        h = routed.view(E, -1, D)
        y = torch.bmm(Fn.silu(torch.bmm(h, self.w1)) * torch.bmm(h, self.w3), self.w2).view(-1, D)
        out = self.shared(x) if self.base == "shared" else torch.zeros_like(x)
        out.scatter_add_(dim=0, index=self.table(a, self.scatter).reshape(-1, 1).expand(-1, D), src=y.view(-1, D))
        return out


@pytest.mark.parametrize("detach,base", [(True, "shared"), (False, "shared"), (False, "zeros"), (True, "zeros")])
def test_dense_gather_rewritten_fp32(detach, base):
    cands = rewrite_and_compare(_seeded(DenseGather, detach=detach, base=base), D,
                                lengths=(5, 8) if detach is True and base == "shared" else (8,))
    assert _rewritten(cands, "expert_slots"), _why(cands)


def test_dense_gather_rewritten_bf16():
    m = _seeded(DenseGather, dtype=torch.bfloat16)
    cands = rewrite_and_compare(m, D, lengths=(8,), rel_norm=True, tol=3e-2)
    assert _rewritten(cands, "expert_slots"), _why(cands)


@pytest.mark.parametrize("kw", [dict(rows="rolled"), dict(scatter="rolled"), dict(fill=0.0),
                                dict(detach="tokens")], ids=["rows_rolled", "scatter_rolled", "fill_0", "detach_tokens"])
def test_dense_gather_look_alikes_not_rewritten(kw):
    cands = rewrite_and_compare(_seeded(DenseGather, **kw), D, lengths=(8,))
    assert not _rewritten(cands, "expert_slots"), _why(cands)


class ExpertChoiceShared(nn.Module):
    """Expert-choice slots gathered by ``x[idx]`` and scatter-added into a shared expert's output
    (a tensor the graph computed, the combine's "base" start): the result is base + the slots."""

    def __init__(self, C=3, inplace=True):
        super().__init__()
        self.C, self.inplace = C, inplace
        self.router = nn.Linear(D, E, bias=False)
        self.w1 = nn.Parameter(torch.randn(E, D, N) / D ** 0.5)
        self.w2 = nn.Parameter(torch.randn(E, N, D) / N ** 0.5)
        self.shared = nn.Linear(D, D, bias=False)

    def forward(self, x):
        g, idx = torch.topk(torch.softmax(self.router(x), -1).t(), self.C, dim=-1)  # (E, C)
        y = torch.bmm(Fn.silu(torch.bmm(x[idx], self.w1)), self.w2) * g[..., None]
        out = self.shared(x)
        if not self.inplace:
            return out.scatter_add(0, idx.reshape(-1, 1).expand(-1, D), y.reshape(-1, D))
        out.scatter_add_(0, idx.reshape(-1, 1).expand(-1, D), y.reshape(-1, D))
        return out


@pytest.mark.parametrize("inplace", [True, False])
def test_expert_choice_into_shared_output_keeps_the_base(inplace):
    """Before this change the rewrite dropped the base here (a wrong result): only a ``clone`` start
    was added back, not a tensor the graph computed (``per_expert.acc_start``'s "base")."""
    cands = rewrite_and_compare(_seeded(ExpertChoiceShared, inplace=inplace), D, lengths=(8,))
    assert _rewritten(cands, "expert_slots"), _why(cands)
