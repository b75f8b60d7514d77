"""Expert masks spelled as ``ids[..., None] == torch.arange(E)`` (issue 18: "masks that are provably
one-hot but spelled differently"). The mask is the boolean ``one_hot(ids, E)``; a column of it is
``ids == e``. One part recogniser (``rewrite.arange_onehot`` / ``arange_column``, read by
``eq_constant`` and the one-hot paths of ``patterns/dispatch.py``) makes every composition that
reads ``ids == e`` or ``one_hot`` read these too.

Each form: output and every gradient against eager at two lengths (fp32, 1e-4), one block
rewritten. Near misses: ``arange(1, E + 1)`` (column e is expert e + 1) and a mask compared with
another table than the top-k ids (rows may then hold an expert twice): the rewrite must either
decline or stay exact; the first must decline (the mapping is not the identity).
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


class ArangeMaskMoE(nn.Module):
    def __init__(self, form: str):
        super().__init__()
        self.form = form
        self.gate = nn.Linear(d, E, bias=False)
        self.experts = nn.ModuleList([nn.Sequential(nn.Linear(d, n), nn.SiLU(), nn.Linear(n, d)) for _ in range(E)])

    def forward(self, x):
        f = self.form
        w, ids = torch.topk(torch.softmax(self.gate(x), -1), K, dim=-1)
        out = torch.zeros_like(x)
        if f == "rows":  # DeepSeek's training branch with a (T*K, E) arange mask: a column per expert
            flat = ids.reshape(-1)
            mask = flat[:, None] == torch.arange(E, device=x.device)  # (A, E)
            rows = x.repeat_interleave(K, dim=0)
            buf = torch.zeros_like(rows)
            for e in range(E):
                m = mask[:, e]
                buf[m] = self.experts[e](rows[m])
            return (buf.view(x.shape[0], K, d) * w.unsqueeze(-1)).sum(1)
        arange = torch.arange(1, E + 1) if f == "off_by_one" else torch.arange(E, device=x.device)
        mask = (arange == ids.unsqueeze(-1)) if f == "arange_left" else (ids.unsqueeze(-1) == arange)  # (T, K, E)
        if f == "permute":  # the expert axis first, as Mixtral permutes its one_hot
            mask = mask.permute(2, 1, 0)
        for e in range(E):
            if f == "permute":
                k, tok = torch.where(mask[e])
            elif f == "select":
                tok, k = torch.where(mask.select(-1, e))
            elif f == "slices":
                tok, k = torch.where(mask[:, :, e])
            else:
                tok, k = torch.where(mask[..., e])
            out.index_add_(0, tok, self.experts[e](x[tok]) * w[tok, k, None])
        return out


@mark_sonic
def _light(gm, example_inputs):
    _REPORTS.append(rewrite_moe(gm, SonicOptions()))
    return gm.forward


_REPORTS: list = []


def _run(form):
    torch.manual_seed(0)
    m = ArangeMaskMoE(form)
    _REPORTS.clear()
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(m, backend=_light, fullgraph=True)
    for T in (5, 8):
        x = torch.randn(T, d)
        res = []
        for fn in (m, compiled):
            m.zero_grad(set_to_none=True)
            xi = x.clone().requires_grad_(True)
            out = fn(xi)
            out.pow(2).sum().backward()
            res.append([out.detach(), xi.grad] + [p.grad if p.grad is not None else torch.zeros_like(p)
                                                   for p in m.parameters()])
        for got, want in zip(res[1], res[0]):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    return [c for r in _REPORTS for c in r.candidates]


@pytest.mark.parametrize("form", [
    "column",       # mask[..., e]
    "slices",       # mask[:, :, e]
    "select",       # mask.select(-1, e)
    "arange_left",  # torch.arange(E) == ids.unsqueeze(-1)
    "permute",      # mask.permute(2, 1, 0)[e], k and token out of torch.where in that order
    "rows",         # flat ids: buf[(flat[:, None] == arange(E))[:, e]] = expert(rows[...]), view(T, K, d) sum
])
def test_arange_mask_rewritten(form):
    cands = _run(form)
    assert [c.status for c in cands] == ["rewritten"] * len(cands) and cands, [(c.status, c.reason) for c in cands]


def test_arange_off_by_one_not_rewritten():
    # arange(1, E + 1): column e selects expert e + 1's tokens; expert E's never run
    cands = _run("off_by_one")
    assert all(c.status != "rewritten" for c in cands), [(c.status, c.reason) for c in cands]
