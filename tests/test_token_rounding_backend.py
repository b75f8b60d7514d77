"""Token rounding inside compiled graphs: ``options={"token_rounding": mode}``.

The rewrite takes the router into the fused computation: the compiled block must equal
fused_moe over ``token_rounding_routing`` of the model's own router probabilities, in value and
in every gradient (the router's included); eval mode keeps the model's top-k unless
``token_rounding_in_eval``; routers the rewrite does not understand keep plain top-k, with the
reason logged and reported, and the block is still rewritten.
"""
import logging
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.utils import counters

import moe_inductor
from moe_inductor.ops.op import fused_moe
from moe_inductor.ops.routing import token_rounding_routing
from moe_modules import GatedMLP

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


class RoutedLoopMoE(nn.Module):
    """Per-expert loop (4.x style) with a choice of router:
    "renorm"   softmax -> top-k -> divide by the top-k sum (Mixtral)
    "plain"    softmax -> top-k (Qwen2-MoE, OLMoE)
    "topk_sm"  top-k of the logits -> softmax over the K values (GPT-OSS)
    "scaled"   softmax -> top-k -> renormalise -> * 2.5 (a routed scaling factor)
    "sigmoid"  sigmoid scores -> top-k (DeepSeek-V3-like; not understood by the rewrite)
    "eps"      softmax -> top-k -> divide by (sum + 1e-20) (not reproduced exactly: refused)
    """

    def __init__(self, router="renorm", d=16, n=8, E=6, K=2):
        super().__init__()
        self.gate = nn.Linear(d, E, bias=False)
        self.experts = nn.ModuleList([GatedMLP(d, n) for _ in range(E)])
        self.router, self.E, self.K = router, E, K

    def route(self, x):
        logits = self.gate(x)
        if self.router == "topk_sm":
            v, i = torch.topk(logits, self.K, dim=-1)
            return F.softmax(v, dim=-1), i
        if self.router == "sigmoid":
            return torch.topk(torch.sigmoid(logits), self.K, dim=-1)
        v, i = torch.topk(F.softmax(logits, dim=-1, dtype=torch.float), self.K, dim=-1)
        if self.router in ("renorm", "scaled"):
            v = v / v.sum(dim=-1, keepdim=True)
        if self.router == "eps":
            v = v / (v.sum(dim=-1, keepdim=True) + 1e-20)
        if self.router == "scaled":
            v = v * 2.5
        return v.to(x.dtype), i

    def forward(self, h):
        b, s, d = h.shape
        x = h.view(-1, d)
        weights, selected = self.route(x)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok, k = torch.where(selected == e)
            out.index_add_(0, tok, expert(x[tok]) * weights[tok, k].unsqueeze(-1))
        return out.view(b, s, d)


def stacked(m):
    w1 = torch.stack([torch.cat([e.w1.weight, e.w3.weight]) for e in m.experts])
    w2 = torch.stack([e.w2.weight for e in m.experts])
    return w1, w2


def rounded_reference(m, h, mode, tile_m):
    """What the compiled block must compute: fused_moe over token-rounded routing of the model's
    own router probabilities (eager, autograd through the router)."""
    x = h.reshape(-1, h.shape[-1])
    logits = m.gate(x)
    probs = F.softmax(logits.float(), dim=-1)
    renorm = m.router in ("renorm", "scaled", "topk_sm")
    r = token_rounding_routing(probs, m.K, tile_m, mode, renorm)
    scores = r.scores * (2.5 if m.router == "scaled" else 1.0)
    w1, w2 = stacked(m)
    return fused_moe(x, r.token_ids, r.expert_ids, scores.to(x.dtype), w1, w2, impl="torch").view_as(h), r


def grads(out, m, h, g):
    return torch.autograd.grad(out, [h, m.gate.weight] + [p for e in m.experts for p in e.parameters()], g)


@pytest.mark.parametrize("router,mode", [
    ("renorm", "nearest"), ("renorm", "up"), ("renorm", "down"),
    ("plain", "nearest"), ("topk_sm", "up"), ("scaled", "nearest"),
])
def test_compiled_block_equals_rounded_reference(router, mode):
    torch.manual_seed(0)
    M = 4
    m = RoutedLoopMoE(router)
    h = torch.randn(2, 19, 16, requires_grad=True)  # T = 38: not a multiple of M
    c = torch.compile(m, backend="sonic", options={"token_rounding": mode, "tile_m": M})
    out = c(h)
    assert counters["sonic"]["moe_rewrites"] == 1 and counters["sonic"]["token_rounding"] == 1
    ref, r = rounded_reference(m, h, mode, M)
    assert torch.all(r.counts % M == 0)
    plain = m(h)
    assert not torch.allclose(ref, plain, atol=1e-4), "rounding must change this routing (else the test is vacuous)"
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(out)
    got, want = grads(out, m, h, g), grads(ref, m, h, g)
    assert got[1].abs().sum() > 0, "gradients must reach the router"
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_eval_mode_keeps_top_k_and_recompiles_on_train():
    torch.manual_seed(0)
    m = RoutedLoopMoE("renorm")
    h = torch.randn(2, 19, 16)
    c = torch.compile(m, backend="sonic", options={"token_rounding": "nearest", "tile_m": 4})
    m.eval()
    torch.testing.assert_close(c(h), m(h), atol=1e-5, rtol=1e-5)
    assert counters["sonic"]["token_rounding"] == 0 and counters["sonic"]["token_rounding_skipped"] == 1
    m.train()  # the training flag is guarded: this recompiles, now with rounding
    torch.testing.assert_close(c(h), rounded_reference(m, h, "nearest", 4)[0], atol=1e-5, rtol=1e-5)
    assert counters["sonic"]["token_rounding"] == 1


def test_token_rounding_in_eval_rounds_in_eval_mode():
    torch.manual_seed(0)
    m = RoutedLoopMoE("renorm").eval()
    h = torch.randn(2, 19, 16)
    c = torch.compile(m, backend="sonic",
                      options={"token_rounding": "up", "tile_m": 4, "token_rounding_in_eval": True})
    torch.testing.assert_close(c(h), rounded_reference(m, h, "up", 4)[0], atol=1e-5, rtol=1e-5)
    assert counters["sonic"]["token_rounding"] == 1


@pytest.mark.parametrize("router,reason", [
    ("sigmoid", "not a softmax over the experts"),
    ("eps", "divided by something other than their sum"),
])
def test_unknown_router_keeps_top_k_with_logged_reason(router, reason, caplog):
    torch.manual_seed(0)
    m = RoutedLoopMoE(router)
    h = torch.randn(2, 19, 16, requires_grad=True)
    with caplog.at_level(logging.WARNING, logger="moe_inductor"):
        out = torch.compile(m, backend="sonic", options={"token_rounding": "nearest", "tile_m": 4})(h)
    assert counters["sonic"]["moe_rewrites"] == 1, "the block is still rewritten, with plain top-k"
    assert counters["sonic"]["token_rounding"] == 0
    assert "token rounding refused" in caplog.text and reason in caplog.text
    torch.testing.assert_close(out, m(h), atol=1e-5, rtol=1e-5)


def test_explain_reports_rounding():
    torch.manual_seed(0)
    h = torch.randn(2, 19, 16)
    report = moe_inductor.explain(RoutedLoopMoE("renorm"), h, options={"token_rounding": "down", "tile_m": 4},
                                  inductor=False)
    assert [e.status for e in report.entries] == ["rewritten"]
    assert "token rounding 'down' to multiples of 4" in report.entries[0].reason
    assert "token rounding 'down'" in str(report)


def test_transformers_block_rounds():
    pytest.importorskip("transformers")
    from moe_layers import mixtral_block

    torch.manual_seed(0)
    blk = mixtral_block(32, 16, 8, 2)
    h = torch.randn(2, 20, 32, requires_grad=True)
    out = torch.compile(blk, backend="sonic", options={"token_rounding": "nearest", "tile_m": 4})(h)
    out = out[0] if isinstance(out, tuple) else out
    assert counters["sonic"]["token_rounding"] == 1
    x = h.reshape(-1, 32)
    probs = F.linear(x, blk.gate.weight).float().softmax(-1)
    r = token_rounding_routing(probs, 2, 4, "nearest", True)
    ref = fused_moe(x, r.token_ids, r.expert_ids, r.scores, blk.experts.gate_up_proj, blk.experts.down_proj,
                    impl="torch")
    torch.testing.assert_close(out.reshape(-1, 32), ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out.reshape(-1, 32), [h, blk.gate.weight], g),
                    torch.autograd.grad(ref, [h, blk.gate.weight], g)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_explain_prints_padding_waste_of_the_routing_it_ran():
    torch.manual_seed(0)
    m = RoutedLoopMoE("renorm")
    h = torch.randn(2, 19, 16)
    plain = moe_inductor.explain(m, h, options={"tile_m": 8}, inductor=False)
    (stats,) = plain.routing
    x = h.reshape(-1, 16)
    counts = torch.bincount(torch.topk(m.gate(x).softmax(-1), 2).indices.reshape(-1), minlength=6)
    assert stats.counts == counts.tolist() and stats.assignments == 76
    want = float(((counts + 7) // 8 * 8 - counts).sum()) / 76
    assert plain.padding_waste == pytest.approx(want) and want > 0
    assert f"padding waste at tile 8 rows: {100 * want:.2f}%" in str(plain)
    rounded = moe_inductor.explain(m, h, options={"tile_m": 8, "token_rounding": "up"}, inductor=False)
    assert rounded.padding_waste == 0.0 and rounded.routing[0].assignments > 76


@pytest.mark.parametrize("family,expect", [
    ("gpt_oss", "token rounding 'nearest' to multiples of 4 (top-k then softmax)"),
    ("deepseek_v3", "token rounding refused: expert ids do not come from torch.topk"),  # group-limited
])
def test_transformers_routers_rounded_or_refused(family, expect):
    pytest.importorskip("transformers")
    import hf_models

    model, ids = hf_models.build(family)
    report = moe_inductor.explain(model.train(), ids, options={"token_rounding": "nearest", "tile_m": 4},
                                  inductor=False)
    assert len(report.rewritten) == len(hf_models.moe_modules(model))
    assert all(e.reason.startswith(expect) for e in report.rewritten), [e.reason for e in report.rewritten]
    assert (report.padding_waste == 0.0) == ("refused" not in expect)
