"""Never worse than Inductor: a module plain Inductor compiles, sonic compiles too, with the same
numerics; where sonic's Dynamo setting (``capture_dynamic_output_shape_ops``) makes Dynamo fail on
a frame, the frame is compiled again without it (``moe_inductor.dynamo.dynamo_scope``), and a graph on
which Inductor fails after the MoE rewrite is compiled without the rewrite (``sonic()``); both
are logged and listed by ``explain``."""
import logging

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.utils import counters

from moe_inductor.compile import backend as sonic_backend
from moe_inductor.dynamo import dynamo_scope

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


class Expert(nn.Module):
    """SwiGLU expert, three bias-free projections (w1 gate, w3 up, w2 down)."""

    def __init__(self, d, n):
        super().__init__()
        self.w1 = nn.Linear(d, n, bias=False)
        self.w2 = nn.Linear(n, d, bias=False)
        self.w3 = nn.Linear(d, n, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class SigmoidGate(nn.Module):
    """DeepSeek-V3-style router: sigmoid scores, a selection bias that only picks experts,
    weights from the unbiased scores, renormalised and scaled."""

    def __init__(self, d, E, K, route_scale=2.5):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(E, d) * d ** -0.5)
        self.bias = nn.Parameter(torch.linspace(-0.1, 0.1, E))
        self.K, self.route_scale = K, route_scale

    def forward(self, x):
        scores = F.linear(x, self.weight).sigmoid()
        picked = torch.topk(scores + self.bias, self.K, dim=-1)[1]
        weights = scores.gather(1, picked)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return (weights * self.route_scale).type_as(x), picked


class OfficialStyleMoE(nn.Module):
    """The DeepSeek-V3 official inference MoE idiom: per-expert counts read to the host with
    ``bincount(...).tolist()``, experts with no token skipped, ``y[idx] += expert(x[idx]) * w``,
    plus a shared expert."""

    def __init__(self, d=32, n=16, E=6, K=2):
        super().__init__()
        self.E = E
        self.gate = SigmoidGate(d, E, K)
        self.experts = nn.ModuleList(Expert(d, n) for _ in range(E))
        self.shared_experts = Expert(d, 2 * n)

    def forward(self, x):
        shape = x.size()
        x = x.view(-1, shape[-1])
        weights, indices = self.gate(x)
        y = torch.zeros_like(x)
        counts = torch.bincount(indices.flatten(), minlength=self.E).tolist()
        for i in range(self.E):
            if counts[i] == 0:
                continue
            idx, top = torch.where(indices == i)
            y[idx] += self.experts[i](x[idx]) * weights[idx, top, None]
        return (y + self.shared_experts(x)).view(shape)


class HostCountsMoE(OfficialStyleMoE):
    """The official form with the host counts also read inside the loop (``* (counts[i] > 0)``, a
    factor 1): sonic's loop capture (``moe_inductor/dynamo/capture.py``) must keep the ``.tolist()``, so the
    frame still fails in Dynamo under sonic's setting. (The official form itself is traced as one
    loop over every expert: tests/test_loop_capture.py.) The ids are counted as ``indices.flatten() * 1``:
    arithmetic the bincount length proof (``moe_inductor/dynamo/shape_items.py``) does not follow, so the
    counts' length stays data-dependent as well."""

    def forward(self, x):
        shape = x.size()
        x = x.view(-1, shape[-1])
        weights, indices = self.gate(x)
        y = torch.zeros_like(x)
        counts = torch.bincount(indices.flatten() * 1, minlength=self.E).tolist()
        for i in range(self.E):
            if counts[i] == 0:
                continue
            idx, top = torch.where(indices == i)
            y[idx] += self.experts[i](x[idx]) * weights[idx, top, None] * (counts[i] > 0)
        return (y + self.shared_experts(x)).view(shape)


def _grads(model, out, g):
    params = [p for p in model.parameters()]
    return torch.autograd.grad(out, params, g, allow_unused=True)


def _check_calls(model, compiled, calls=3, atol=1e-5):
    """Every call of ``compiled`` matches eager: output and every parameter gradient."""
    torch.manual_seed(1)
    for _ in range(calls):
        x = torch.randn(2, 5, 32)
        ref = model(x)
        g = torch.randn_like(ref)
        out = compiled(x)
        torch.testing.assert_close(out, ref, atol=atol, rtol=atol)
        for a, b in zip(_grads(model, out, g), _grads(model, ref, g)):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, atol=atol, rtol=atol)


def test_deepseek_v3_official_moe_compiles_like_inductor(caplog):
    torch.manual_seed(0)
    model = HostCountsMoE()
    graphs = []

    def counting_inductor(gm, example_inputs):
        graphs.append(len(gm.graph.nodes))
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs)

    _check_calls(model, torch.compile(model, backend=counting_inductor))
    assert graphs, "plain Inductor compiles the module (with graph breaks)"

    torch._dynamo.reset()
    counters.clear()
    with caplog.at_level(logging.WARNING, logger="moe_inductor"), dynamo_scope.capture_fallbacks() as fallbacks:
        _check_calls(model, torch.compile(model, backend="sonic"))
    # the frame failed in Dynamo with the setting, and was compiled again without it
    assert [f.kind for f in fallbacks] == ["without settings"], fallbacks
    assert "GuardOnDataDependentSymNode" in fallbacks[0].reason and "forward" in fallbacks[0].where
    assert any("compiled" in r.message and "without" in r.message for r in caplog.records)
    assert counters["stats"]["unique_graphs"] >= len(graphs)  # compiled, not left to eager
    assert torch._dynamo.config.capture_dynamic_output_shape_ops is False


def test_deepseek_v3_official_moe_explain_says_what_happened():
    import moe_inductor

    torch.manual_seed(0)
    model = HostCountsMoE()
    report = moe_inductor.explain(model, torch.randn(2, 5, 32), inductor=False)
    assert len(report.fallbacks) == 1 and report.fallbacks[0].kind == "without settings"
    text = str(report)
    assert "fallbacks" in text and "compile it without the setting" in text


def test_a_frame_that_compiles_keeps_the_setting():
    # the usual case: a where-loop frame is captured whole (rewritten), no fallback
    from moe_modules import LoopMoE

    torch.manual_seed(0)
    model = LoopMoE()
    x = torch.randn(2, 8, 32)
    with dynamo_scope.capture_fallbacks() as fallbacks:
        torch.testing.assert_close(torch.compile(model, backend="sonic")(x), model(x), atol=1e-5, rtol=1e-5)
    assert counters["sonic"]["moe_rewrites"] == 1 and not fallbacks


def test_inductor_failure_after_rewrite_falls_back_to_the_unrewritten_graph(monkeypatch):
    # Inductor refusing the rewritten graph (simulated: it fails on any graph holding the fused op)
    # must not fail compilation: the graph as Dynamo gave it is compiled instead, and it is said
    from moe_modules import LoopMoE
    from torch._inductor import compile_fx as cfx

    real = cfx.compile_fx

    def picky(gm, example_inputs, **kw):
        if any(str(n.target).startswith("moe_inductor.") for n in gm.graph.nodes):
            raise RuntimeError("simulated lowering failure")
        return real(gm, example_inputs, **kw)

    monkeypatch.setattr(cfx, "compile_fx", picky)
    torch.manual_seed(0)
    model = LoopMoE()
    x = torch.randn(2, 8, 32)
    with dynamo_scope.capture_fallbacks() as fallbacks:
        torch.testing.assert_close(torch.compile(model, backend="sonic")(x), model(x), atol=1e-5, rtol=1e-5)
    assert [f.kind for f in fallbacks] == ["without rewrite"]
    assert "simulated lowering failure" in fallbacks[0].reason
    assert counters["sonic"]["fallback_without_rewrite"] == 1


def test_inductor_failure_without_rewrite_is_not_hidden(monkeypatch):
    # a graph Inductor cannot compile with or without the rewrite fails as under plain Inductor
    from torch._inductor import compile_fx as cfx

    def broken(gm, example_inputs, **kw):
        raise RuntimeError("inductor is broken")

    monkeypatch.setattr(cfx, "compile_fx", broken)
    with pytest.raises(Exception, match="inductor is broken"):
        torch.compile(lambda t: t.sin() + 1, backend="sonic", fullgraph=True)(torch.randn(3))
    assert sonic_backend.sonic is not None


def test_scope_survives_reset_and_leaves_no_setting_behind():
    # torch._dynamo.reset() empties Dynamo's callback lists (explain calls it too): the scoped
    # setting must come back for the next sonic frame, and never stay on after a compile
    import moe_inductor
    from torch._dynamo import callback_handler

    torch.manual_seed(0)
    model = HostCountsMoE()
    x = torch.randn(2, 5, 32)
    for _ in range(2):
        report = moe_inductor.explain(model, x, inductor=False)  # resets Dynamo first
        assert [f.kind for f in report.fallbacks] == ["without settings"]
        assert torch._dynamo.config.capture_dynamic_output_shape_ops is False
    torch._dynamo.reset()
    assert any(c is dynamo_scope._START for c in callback_handler.start_callbacks)
    assert any(c is dynamo_scope._END for c in callback_handler.end_callbacks)


def test_bad_options_fail_at_once_without_a_retry():
    from moe_modules import LoopMoE

    model = LoopMoE()
    with dynamo_scope.capture_fallbacks() as fallbacks, pytest.raises(Exception, match="no_such_option"):
        torch.compile(model, backend="sonic", options={"no_such_option": 1})(torch.randn(1, 4, 32))
    assert not fallbacks
