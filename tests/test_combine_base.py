"""A combine into a base that is not zeros (issue 18): routed rows added into the shared experts'
output, in every routing layout. ``out = shared(x)`` then a per-expert loop of ``out.index_add_``
(per_expert), and ``shared(x).scatter_add(0, idx, rows)`` (assignment_rows,
tests/test_assignment_rows.py and torchtitan in the catalogue): the block is ``base + fused op``.

Near misses, declined: the loop adds in place into a slice of a module buffer (state the caller
sees after the call); a view of the base made before the loop and read after it (it sees
the sum). Each case: output and every gradient against
eager at two lengths (fp32, 1e-4), the rewrite count asserted.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.utils import counters

from moe_inductor.backend import rewrite_moe
from moe_inductor.dynamo_scope import mark_sonic
from moe_inductor.options import SonicOptions

E, K, d, n = 4, 2, 16, 8


class LoopIntoBase(nn.Module):
    def __init__(self, variant: str):
        super().__init__()
        self.variant = variant
        self.gate = nn.Linear(d, E, bias=False)
        self.shared = nn.Linear(d, d, bias=False)
        self.w1 = nn.Parameter(torch.randn(E, n, d) / d**0.5)
        self.w2 = nn.Parameter(torch.randn(E, d, n) / n**0.5)
        self.register_buffer("acc", torch.zeros(8, d))

    def forward(self, x):
        w, idx = torch.topk(torch.softmax(self.gate(x), dim=-1), K, dim=-1)
        v = self.variant
        out = self.acc[: x.shape[0]] if v == "into_buffer" else self.shared(x)
        early = out.view(-1) if v == "early_view" else None
        for e in range(E):
            tok, k = torch.where(idx == e)
            y = F.linear(F.silu(F.linear(x[tok], self.w1[e])), self.w2[e]) * w[tok, k, None]
            out.index_add_(0, tok, y)
        if early is not None:
            return out + early.view_as(out)
        return out


@mark_sonic
class RewriteOnly:
    def __init__(self):
        self.reports = []

    def __call__(self, gm, example_inputs):
        self.reports.append(rewrite_moe(gm, SonicOptions()))
        return gm.forward


def _run(variant):
    torch.manual_seed(0)
    m = LoopIntoBase(variant)
    backend = RewriteOnly()
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(m, backend=backend, fullgraph=True)
    for T in (5, 8):
        x = torch.randn(T, d)
        res = []
        for fn in (m, compiled):
            m.zero_grad(set_to_none=True)
            m.register_buffer("acc", torch.zeros(8, d))  # the into_buffer near miss writes it: both runs start from zeros
            xi = x.clone().requires_grad_(True)
            out = fn(xi)
            out.pow(2).sum().backward()
            res.append([out.detach(), xi.grad] + [p.grad for p in m.parameters()])
        for got, want in zip(res[1], res[0]):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    return [c for r in backend.reports for c in r.candidates]


def test_loop_adds_into_the_shared_output():
    cands = _run("shared")
    assert [c.status for c in cands] == ["rewritten", "rewritten"], [(c.status, c.reason) for c in cands]


@pytest.mark.parametrize("variant, reason", [
    ("into_buffer", "does not start as zeros"),  # out = self.acc[:T]: module state, written in place
    ("early_view", "has views made before the loop ends"),
])
def test_loop_base_near_misses_declined(variant, reason):
    cands = _run(variant)
    assert cands and all(c.status == "declined" for c in cands), [(c.status, c.reason) for c in cands]
    assert any(reason in c.reason for c in cands), [c.reason for c in cands]
