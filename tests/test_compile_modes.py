"""The ways users call torch.compile besides the default, through the whole sonic backend: every
MoE block rewritten from the first call, output and every gradient equal to eager.

``dynamic=True`` found a defect: Inductor's compile of the rewritten graph raised Dynamo's
``TensorifyScalarRestartAnalysis`` (its signal to trace the frame again with a float specialised),
and the backend took that for an Inductor failure and compiled the frame without the rewrite
(``moe_inductor/compile/backend.py``: ``_DYNAMO_CONTROL_FLOW`` is let through now).
"""
import copy

import pytest
import torch
from torch._dynamo.utils import counters

import hf_models
from moe_inductor.diagnostics.stats import capture_routing_stats

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def _steps(model, lengths, **compile_kwargs):
    ref = copy.deepcopy(model)
    compiled = torch.compile(model, backend="sonic", **compile_kwargs)
    fused = []
    for T in lengths:
        ids = torch.randint(3, model.config.vocab_size, (2, T), generator=torch.Generator().manual_seed(T))
        with capture_routing_stats() as calls:
            out = compiled(ids).logits
        fused.append(len(calls))
        want = ref(ids).logits
        out.pow(2).mean().backward()
        want.pow(2).mean().backward()
        torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)
        for (name, p), q in zip(model.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")
        model.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
    return fused


def test_dynamic_true_keeps_the_rewrite():
    model, _ = hf_models.build("mixtral")
    fused = _steps(model.train(), (5, 9), dynamic=True)
    assert fused == [2, 2], fused  # both MoE layers, from the first call (failed before: [0, 0])
    assert counters["sonic"]["fallback_without_rewrite"] == 0


def test_mark_dynamic_keeps_the_rewrite():
    model, _ = hf_models.build("qwen3_moe")
    model.train()
    ref = copy.deepcopy(model)
    compiled = torch.compile(model, backend="sonic")
    for T in (6, 11):
        ids = torch.randint(3, model.config.vocab_size, (2, T), generator=torch.Generator().manual_seed(T))
        torch._dynamo.mark_dynamic(ids, 1)
        with capture_routing_stats() as calls:
            out = compiled(ids).logits
        assert len(calls) == 2
        torch.testing.assert_close(out, ref(ids).logits, atol=1e-4, rtol=1e-4)
    assert counters["sonic"]["fallback_without_rewrite"] == 0


def test_inference_mode_serving():
    model, _ = hf_models.build("mixtral")
    ref = copy.deepcopy(model)
    compiled = torch.compile(model, backend="sonic")
    for T in (5, 9):
        ids = torch.randint(3, model.config.vocab_size, (2, T), generator=torch.Generator().manual_seed(T))
        with torch.inference_mode():
            with capture_routing_stats() as calls:
                out = compiled(ids).logits
            want = ref(ids).logits
        assert len(calls) == 2
        torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)


def test_control_flow_exceptions_are_let_through(monkeypatch):
    """The backend's fallback must not swallow Dynamo's restart signal: raised by Inductor's compile
    of the rewritten graph, it reaches Dynamo (which traces again), not the unrewritten fallback."""
    from moe_inductor.compile import backend

    assert any(issubclass(torch._dynamo.exc.TensorifyScalarRestartAnalysis, c) for c in backend._DYNAMO_CONTROL_FLOW)
    import torch._inductor.compile_fx as cfx

    calls = []

    def restart_once(gm, *args, **kwargs):
        calls.append(gm)
        if len(calls) == 1:
            raise torch._dynamo.exc.TensorifyScalarRestartAnalysis()
        return gm.forward

    monkeypatch.setattr(cfx, "compile_fx", restart_once)
    model, ids = hf_models.build("mixtral")
    with capture_routing_stats() as seen:
        torch.compile(model, backend="sonic")(ids)
    assert len(calls) == 2 and len(seen) == 2  # traced again, and the second compile kept the rewrite
    assert counters["sonic"]["fallback_without_rewrite"] == 0
