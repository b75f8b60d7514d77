"""Expert biases spelled as vLLM's ``torch_experts`` spells them (``tests/faithful/vllm_torch_moe.py``),
through the rewrite alone (``tests/rewrite_check.py``): output and every gradient against eager at two
lengths (fp32, 1e-4), what was rewritten or declined asserted.

- The gate|up bias as one (1, 2n) row of a per-expert bias, ``a @ w1[i].T + b1[i].view(1, -1).to(dtype)``
  (``experts.row_bias``: a 1-D B of the projection's width, or B viewed as one row, same dtype).
- The down bias added through the buffer after the assignment, ``out[m] = h @ w2[i].T`` then
  ``out[m] = out[m] + b2[i].view(1, -1)`` (or ``out[m] += b2[i]``): the boolean mask selects each row
  once, so the pair writes ``down(h) + b2[i]`` (``combine.bias_after_assign``, read by mask_dispatch).
  A bias of another expert is still each expert's own (its node goes to the op): rewritten, exact.

Near misses, not rewritten: the bias added after the rows were weighted by the router (``w * y + b``),
a per-expert scalar broadcast over the columns (``b[i].view(1, -1)`` of an (E, 1) bias), a per-row
(R, 1) term broadcast over the columns, the second write through another expert's mask, a scalar
gate bias.

Scores applied before the down projection (Megatron-Core's ``MLP`` with ``per_token_scale``:
``fc2(act(fc1(x)) * probs.unsqueeze(-1))``): ``down(h * s)`` is ``s * down(h)`` only up to rounding and
without an unscaled down bias, and no composition takes scores from inside an expert, so the experts
part declines it, naming the line and the scale (not rewritten, numerics unchanged).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from rewrite_check import rewrite_and_compare

E, K, d, n = 4, 2, 16, 8


class BiasedMaskExperts(nn.Module):
    """vLLM's ``torch_experts`` without the ``if mask.sum():`` host check: rows repeated K times, a
    boolean mask per expert, fused gate|up weights split in halves, biases per ``form``."""

    def __init__(self, form: str):
        super().__init__()
        self.form = form
        g = torch.Generator().manual_seed(7)
        self.router = nn.Linear(d, E, bias=False)
        self.w1 = nn.Parameter(torch.randn(E, 2 * n, d, generator=g) / d ** 0.5)
        self.w2 = nn.Parameter(torch.randn(E, d, n, generator=g) / n ** 0.5)
        self.b1 = nn.Parameter(torch.randn(E, 2 * n, generator=g) * 0.1)
        self.b2 = nn.Parameter(torch.randn(E, d, generator=g) * 0.1)
        self.s = nn.Parameter(torch.randn(E, 1, generator=g) * 0.1)  # per-expert scalars (near misses)

    def forward(self, x):
        f, T = self.form, x.shape[0]
        w, ids = torch.topk(torch.softmax(self.router(x), -1, dtype=torch.float32), K)
        a = x.view(T, -1, d).repeat(1, K, 1).reshape(-1, d)
        out = torch.zeros(T * K, d, dtype=a.dtype)
        ids, wf = ids.view(-1), w.view(-1)
        for i in range(E):
            mask = ids == i
            gate_bias = self.s[i].view(1, -1) if f == "scalar_gate_bias" else self.b1[i].view(1, -1).to(a.dtype)
            h = a[mask] @ self.w1[i].transpose(0, 1) + gate_bias
            h = F.silu(h[..., :n]) * h[..., n:]
            y = h @ self.w2[i].transpose(0, 1)
            out[mask] = wf[mask, None] * y if f == "after_weight" else y
            if f in ("vllm", "after_weight"):
                out[mask] = out[mask] + self.b2[i].view(1, -1).to(a.dtype)
            elif f == "iadd":
                out[mask] += self.b2[i]
            elif f == "other_expert":
                out[mask] = self.b2[(i + 1) % E].unsqueeze(0) + out[mask]
            elif f == "scalar_bias":
                out[mask] = out[mask] + self.s[i].view(1, -1)
            elif f == "row_term":
                out[mask] = out[mask] + a[mask][:, :1]
            elif f == "other_mask":
                m2 = ids == (i + 1) % E
                out[m2] = out[m2] + self.b2[i]
        if f == "after_weight":
            return out.view(T, K, d).sum(1)
        return (out.view(T, K, d) * w.view(T, K, 1)).sum(1)


def _statuses(cands):
    return [(c.status, c.reason, c.parts) for c in cands]


@pytest.mark.parametrize("form", ["vllm", "iadd", "no_down_bias", "other_expert"])
def test_expert_biases_rewritten_exact(form):
    cands = rewrite_and_compare(BiasedMaskExperts(form), d)
    assert cands and all(c.status == "rewritten" for c in cands), _statuses(cands)


@pytest.mark.parametrize("form, reason", [
    ("after_weight", "after the rows were weighted by the router"),
    ("scalar_bias", "not a bias of the output width"),
    ("row_term", "not a bias of the output width"),
    ("other_mask", "modified by something other than the expert loop"),
    ("scalar_gate_bias", "not a supported MLP"),
])
def test_expert_bias_near_misses_not_rewritten(form, reason):
    cands = rewrite_and_compare(BiasedMaskExperts(form), d)
    assert all(c.status != "rewritten" for c in cands), _statuses(cands)
    assert cands and any(reason in c.reason for c in cands), _statuses(cands)


class ScaledBeforeDown(nn.Module):
    """Top-1 masked experts whose router weight multiplies the activation before the down projection."""

    def __init__(self):
        super().__init__()
        self.router = nn.Linear(d, E, bias=False)
        self.fc1 = nn.ModuleList([nn.Linear(d, n, bias=False) for _ in range(E)])
        self.fc2 = nn.ModuleList([nn.Linear(n, d, bias=False) for _ in range(E)])

    def forward(self, x):
        p, ids = torch.softmax(self.router(x), -1).max(-1)
        out = torch.zeros_like(x)
        for i in range(E):
            m = ids == i
            h = F.silu(self.fc1[i](x[m])) * p[m].unsqueeze(-1)
            out[m] = self.fc2[i](h)
        return out


def test_score_before_down_projection_declined_with_line():
    cands = rewrite_and_compare(ScaledBeforeDown(), d)
    assert cands and all(c.status != "rewritten" for c in cands), _statuses(cands)
    assert any("before the down projection" in c.reason and "p[m].unsqueeze(-1)" in c.reason for c in cands), \
        _statuses(cands)
