"""Flat assignment rows as rxlm's ``MoeFeedForward`` spells them (issue 18).

- ``moe_inductor/dynamo/host_splits.py``: rows split by host counts with the same ModuleList MLP on every
  chunk, the experts' ``nn.Linear`` projections WITH biases: each projection one grouped GEMM on the
  stacked weights and the stacked biases (``moe_inductor::grouped_mm(rows, W, offs, bias=)``: row r of
  group e gets ``r W_e^T + b_e``, the expert's own ``F.linear`` on its chunk). Near misses: one expert
  without a bias the others have, a bias that is not one value per output column.
- ``patterns/assignment_rows.py``: the gather ``x[tok[perm]]`` / ``x[tok.index_select(0, perm)]`` with
  ``tok = arange(T).repeat_interleave(K)`` (row i is token ``perm[i] // K``: ``dispatch.assignment_tokens``),
  and the combine ``acc.scatter_add_(0, tok[:, None].expand(-1, d), y[argsort(perm)])`` (row i of y is at
  position perm[i] of ``y[argsort(perm)]``, added at token perm[i] // K: ``unpermute_scatter``). Near
  misses: rows gathered through another permutation than the sort of the counted ids, rows put back by
  the permutation itself, by the inverse of another permutation, or by a descending argsort.

Every case is checked against eager (output and every gradient); rewritten ones must also be rewritten.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from moe_inductor.dynamo import host_splits  # noqa: F401  (registers moe_inductor::grouped_mm)
from rewrite_check import rewrite_and_compare

D, N, E, K = 16, 8, 4, 2


class FF(nn.Module):
    def __init__(self, bias=True, down_bias=None):
        super().__init__()
        self.fc1 = nn.Linear(D, N, bias=bias)
        self.fc2 = nn.Linear(N, D, bias=bias if down_bias is None else down_bias)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


def _gather(kind, x, tok, perm, flat):
    if kind == "tok_perm":
        return x[tok[perm]]
    if kind == "tok_index_select":
        return x[tok.index_select(0, perm)]
    if kind == "floordiv":
        return x[perm // K]
    if kind == "other_perm":  # near miss: rows sorted by other keys than the ids counted
        return x[tok[((flat + 1) % E).argsort()]]
    raise ValueError(kind)


def _combine(kind, x, tok, perm, flat, y):
    out = torch.zeros_like(x)
    at = tok.unsqueeze(1).expand(-1, D)
    if kind == "unpermute":
        return out.scatter_add_(0, at, y[perm.argsort(0)])
    if kind == "unpermute_fn_cast":
        return out.scatter_add_(0, at, y[torch.argsort(perm)].to(dtype=out.dtype))
    if kind == "unpermute_sort":
        return out.scatter_add(0, at, y[perm.sort()[1]])
    if kind == "floordiv_scatter":
        return out.scatter_add(0, (perm // K).unsqueeze(1).expand(-1, D), y)
    if kind == "not_inverse":  # near miss: the permutation itself, not its inverse
        return out.scatter_add_(0, at, y[perm])
    if kind == "other_inverse":  # near miss: the inverse of another permutation
        return out.scatter_add_(0, at, y[((flat + 1) % E).argsort().argsort()])
    if kind == "descending":  # near miss: not the inverse
        return out.scatter_add_(0, at, y[perm.argsort(descending=True)])
    raise ValueError(kind)


class FlatRows(nn.Module):
    """rxlm ``MoeFeedForward`` (T > 1 branch) with the split spelled by ``.tolist()`` counts."""

    def __init__(self, gather="tok_perm", combine="unpermute", bias=True, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.gather, self.combine = gather, combine
        self.gate = nn.Linear(D, E, bias=False)
        self.experts = nn.ModuleList(FF(bias) for _ in range(E))

    def forward(self, x):
        T = x.shape[0]
        w, ids = F.softmax(self.gate(x), dim=-1).topk(K, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        flat, fw = ids.view(-1), w.view(-1)
        tok = torch.arange(T, device=x.device).repeat_interleave(K)
        sorted_ids, perm = flat.sort(0)
        rows = _gather(self.gather, x, tok, perm, flat)
        counts = F.one_hot(sorted_ids, num_classes=E).sum(0)
        chunks = rows.split(counts.tolist(), 0)
        y = torch.cat([self.experts[i](chunks[i]) for i in range(E)], dim=0)
        y = y * fw[perm].unsqueeze(1)
        return _combine(self.combine, x, tok, perm, flat, y)


def _statuses(cands):
    return [(c.idiom, c.status) for c in cands]


def _rewritten(cands) -> list:
    return [c for c in cands if c.status == "rewritten"]


@pytest.mark.parametrize("gather,combine,bias", [
    ("tok_perm", "unpermute", True),
    ("tok_perm", "unpermute", False),
    ("tok_index_select", "unpermute_fn_cast", True),
    ("tok_perm", "unpermute_sort", True),
    ("floordiv", "unpermute", True),
    ("tok_perm", "floordiv_scatter", True),
    ("floordiv", "floordiv_scatter", True),  # biased chunk experts in the form assignment_rows already read
])
def test_flat_rows_rewritten_and_exact(gather, combine, bias):
    cands = rewrite_and_compare(FlatRows(gather, combine, bias), D, lengths=(5, 8))
    done = _rewritten(cands)
    assert done and all(c.idiom == "sorted_rows" for c in done), _statuses(cands)
    if bias:
        assert all("per-expert biases" in c.parts for c in done), [c.parts for c in done]


@pytest.mark.parametrize("gather,combine", [
    ("other_perm", "unpermute"),
    ("tok_perm", "not_inverse"),
    ("tok_perm", "other_inverse"),
    ("tok_perm", "descending"),
])
def test_flat_rows_near_misses_not_rewritten(gather, combine):
    """The block is not composed; the experts alone may still become one fused call on the rows
    grouped by the host counts (``local_experts``: rows in, rows out in the same order, biases in the
    op), which is exact whatever the rest of the graph does with them (compared with eager)."""
    cands = rewrite_and_compare(FlatRows(gather, combine), D, lengths=(5, 8))
    assert all(c.idiom == "local_experts" for c in _rewritten(cands)), _statuses(cands)


def _split_note(model, caplog) -> str:
    import logging
    with caplog.at_level(logging.INFO, logger="moe_inductor"):
        cands = rewrite_and_compare(model, D, lengths=(5,))
    assert not _rewritten(cands), _statuses(cands)
    return "\n".join(r.getMessage() for r in caplog.records if "host counts" in r.getMessage())


def test_mixed_biases_not_grouped(caplog):
    """One expert without the down bias the others have: another function, the chunks stay."""
    m = FlatRows()
    m.experts[1] = FF(bias=True, down_bias=False)
    notes = _split_note(m, caplog)
    assert "not rewritten" in notes and "computes another function" in notes, notes


def test_broadcast_bias_not_grouped(caplog):
    """A bias of one value broadcast over the output columns is not a per-column bias: declined."""
    m = FlatRows()
    for ex in m.experts:
        ex.fc2.bias = nn.Parameter(torch.randn(1))
    notes = _split_note(m, caplog)
    assert "not rewritten" in notes and "not one value per output column" in notes, notes


def test_grouped_mm_bias_matches_per_expert_linear():
    """The op: per group e, F.linear(rows, W_e, b_e) (an empty group included), and its gradients."""
    g = torch.Generator().manual_seed(0)
    counts = torch.tensor([3, 0, 4, 2])
    a = torch.randn(int(counts.sum()), D, generator=g, requires_grad=True)
    W = torch.randn(E, N, D, generator=g, requires_grad=True)  # Linear layout (out, in)
    b = torch.randn(E, N, generator=g, requires_grad=True)
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    got = torch.ops.moe_inductor.grouped_mm(a, W.transpose(-2, -1), offs, bias=b)
    want = torch.cat([F.linear(c, W[e], b[e]) for e, c in enumerate(a.split(counts.tolist()))])
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    go = torch.randn(got.shape, generator=g)
    grads = torch.autograd.grad(got, (a, W, b), go)
    wants = torch.autograd.grad(want, (a, W, b), go)
    for x, y in zip(grads, wants):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-6)
    with pytest.raises(Exception):
        torch.ops.moe_inductor.grouped_mm(a, W.transpose(-2, -1), offs, bias=b[:, :1])
