"""The rewrite's own work isolated from the user's (issue 18, item 4).

- A ``saved_tensors_hooks`` pack hook that reads storage pointers (memory profilers, offloaders),
  active while the model compiles: the rewrite's fake runs must not call it (every block was
  declined with "Cannot access data pointer of Tensor"); at run time it still sees the real tensors.
- Matchers must not raise on constants: a masked fill with a float (``out[out == 0] = eps``, the
  exp/log combine of SparseDispatcher-style code) made the mask_dispatch matcher fail for the whole
  graph.
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.utils import counters

from moe_inductor.compile import isolation

E, K, d, n, T = 4, 2, 16, 8, 10


class LoopMoE(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(d, E, bias=False)
        self.w1 = nn.Parameter(torch.randn(E, n, d) / d**0.5)
        self.w2 = nn.Parameter(torch.randn(E, d, n) / n**0.5)

    def forward(self, x):
        w, idx = torch.topk(torch.softmax(self.gate(x), dim=-1), K, dim=-1)
        out = torch.zeros_like(x)
        for e in range(E):
            tok, k = torch.where(idx == e)
            out.index_add_(0, tok, F.linear(F.silu(F.linear(x[tok], self.w1[e])), self.w2[e]) * w[tok, k, None])
        return out


def test_private_hook_deferral_exists():
    # checked on torch 2.11.0 and 2.13.0: torch._C._autograd._saved_tensors_hooks_set_tracing
    assert isolation.hooks_deferred_available(), torch.__version__


def test_pointer_reading_pack_hook_while_compiling():
    torch.manual_seed(0)
    m, x = LoopMoE(), torch.randn(T, d)
    m(x).pow(2).sum().backward()
    ref = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    packed = []

    def pack(t):
        packed.append(t.untyped_storage().data_ptr())  # raises on a fake tensor
        return t

    torch._dynamo.reset()
    counters.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = torch.compile(m, backend="sonic")(x)
    out.pow(2).sum().backward()
    assert counters["sonic"]["moe_rewrites"] == 1 and counters["sonic"]["moe_declined"] == 0
    assert packed, "the hook no longer sees the tensors saved at run time"
    for g, r in zip([p.grad for p in m.parameters()], ref):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4)


class ExpLogCombine(nn.Module):
    """SparseDispatcher-style: exp of expert outputs, gated sum, zeros set to eps, log. Not an
    expressible MoE block (the combine is not a weighted sum of expert outputs), so nothing is
    rewritten, but no matcher may fail on it either."""

    def __init__(self):
        super().__init__()
        self.w_gate = nn.Parameter(torch.randn(d, E) * 0.1)
        self.experts = nn.ModuleList([nn.Sequential(nn.Linear(d, n), nn.ReLU(), nn.Linear(n, d)) for _ in range(E)])

    def forward(self, x):
        logits = x @ self.w_gate
        top_logits, top_idx = logits.topk(K, dim=1)
        gates = torch.zeros_like(logits).scatter(1, top_idx, F.softmax(top_logits, dim=1))
        out = torch.zeros_like(x)
        for e in range(E):
            idx = torch.nonzero(gates[:, e] > 0).squeeze(1)
            out = out.index_add(0, idx, self.experts[e](x[idx]).exp() * gates[idx, e].unsqueeze(1))
        out[out == 0] = torch.finfo(float).eps
        return out.log()


def test_constant_masked_fill_does_not_break_a_matcher(caplog):
    from moe_inductor.compile.backend import rewrite_moe
    from moe_inductor.dynamo.dynamo_scope import mark_sonic
    from moe_inductor.compile.options import SonicOptions

    @mark_sonic
    def light(gm, example_inputs):  # the rewrite alone (plain Inductor miscompiles this log combine)
        rewrite_moe(gm, SonicOptions())
        return gm.forward

    torch.manual_seed(0)
    m, x = ExpLogCombine(), torch.randn(T, d)
    torch._dynamo.reset()
    counters.clear()
    with caplog.at_level(logging.DEBUG, logger="moe_inductor"):
        out = torch.compile(m, backend=light)(x)
    assert not [r for r in caplog.records if "matcher failed" in r.getMessage()]
    assert counters["sonic"]["moe_rewrites"] == 0
    torch.testing.assert_close(out, m(x))
