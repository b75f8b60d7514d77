"""The "worth it" choice (``moe_inductor.lower.worth``): CPU inference with few assignments per distinct
expert runs the gathered decomposition (Inductor-compiled GEMVs, no fused op); everything that
autograd needs, dynamic token counts, autocast, CUDA and per-expert weight lists keep the fused
op. The decomposition computes what the op computes."""
from __future__ import annotations

import pytest
import torch

import moe_inductor
from moe_inductor.ops import op as _op  # noqa: F401  (registers the ops)
from moe_modules import StackedLoopMoE
from moe_inductor.lower.worth import GATHER_MAX_SHARING, choose_gathered, expected_sharing, gathered_experts

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def _case(T, E, K, d, n, dtype, activation, bias, dropped, seed=0):
    g = torch.Generator().manual_seed(seed)
    gated = activation in ("swiglu", "geglu")
    cols = 2 * n if gated else n
    x = torch.randn(T, d, generator=g).to(dtype)
    w1 = (torch.randn(E, cols, d, generator=g) * 0.3).to(dtype)
    w2 = (torch.randn(E, d, n, generator=g) * 0.3).to(dtype)
    b1 = torch.randn(E, cols, generator=g).to(dtype) if bias else None
    b2 = torch.randn(E, d, generator=g).to(dtype) if bias else None
    ids = torch.rand(T, E, generator=g).topk(K, dim=-1).indices.flatten()
    tok = torch.arange(T).repeat_interleave(K)
    if dropped:
        ids[::3] = -1
    s = torch.rand(T * K, generator=g)
    return x, tok.int(), ids.int(), s, w1, w2, b1, b2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation,interleaved,bias,dropped",
                         [("swiglu", False, False, False), ("swiglu", True, True, True), ("gelu", False, True, False)])
def test_gathered_experts_computes_what_the_op_computes(dtype, activation, interleaved, bias, dropped):
    x, tok, ids, s, w1, w2, b1, b2 = _case(5, 6, 2, 16, 8, dtype, activation, bias, dropped)
    want = torch.ops.moe_inductor.fused_moe(x, tok, ids, s, w1, w2, b1, b2, activation=activation,
                                            interleaved=interleaved, impl="torch")[0]
    got = gathered_experts(x, tok, ids, s, w1, w2, b1, b2, activation, interleaved)
    assert got.dtype == want.dtype and got.shape == want.shape
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    else:  # one bf16 rounding of H or Y may differ (another summation order): relative norm
        assert ((got.float() - want.float()).norm() / want.float().norm()).item() < 2e-2
    if dropped:  # a token whose every assignment is dropped gets exactly zero
        only_dropped = [t for t in range(5) if (ids[tok == t] < 0).all()]
        for t in only_dropped:
            assert torch.equal(got[t], torch.zeros_like(got[t]))


def test_choice_rules():
    cpu = torch.device("cpu")
    assert choose_gathered(cpu, False, 8, 64, True, False).impl == "gathered"
    assert expected_sharing(8, 64) < 1.1 and expected_sharing(256, 64) > GATHER_MAX_SHARING
    for args in ((cpu, True, 8, 64, True, False),  # autograd needs it: memory keeps the fused op
                 (cpu, False, None, 64, True, False),  # dynamic number of assignments
                 (cpu, False, 256, 64, True, False),  # too many per expert
                 (cpu, False, 8, 64, False, False),  # per-expert weight lists
                 (cpu, False, 8, 64, True, True),  # token rounding rewrote the routing
                 (torch.device("cuda"), False, 8, 64, True, False)):
        assert choose_gathered(*args) is None, args


StackedMoE = StackedLoopMoE


def _runs_on(m, x, **kw):
    report = moe_inductor.explain(m, x, **kw)
    assert [e.status for e in report.entries] == ["rewritten"], str(report)
    return report.entries[0].runs_on


def test_decode_inference_is_gathered_and_matches_eager():
    m = StackedMoE()
    x = torch.randn(2, 32)
    with torch.no_grad():
        assert _runs_on(m, x).startswith("gathered:")
        torch._dynamo.reset()
        compiled = torch.compile(m, backend="sonic")
        torch.testing.assert_close(compiled(x), m(x), atol=1e-5, rtol=1e-5)


def test_training_and_large_batches_keep_the_fused_op():
    m = StackedMoE()
    assert _runs_on(m, torch.randn(2, 32)) == "PyTorch path (cpu)"  # grad enabled: training
    torch._dynamo.reset()
    with torch.no_grad():
        assert _runs_on(m, torch.randn(64, 32)) == "PyTorch path (cpu)"  # 128 assignments on 16 experts
        torch._dynamo.reset()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert _runs_on(m, torch.randn(2, 32)) == "PyTorch path (cpu)"


def test_non_finite_row_stays_in_its_token():
    """An inf in one token's input gives that token a non-finite output and leaves the others as
    the op computes them (a 0/1 product in the combine would spread NaN to every token)."""
    x, tok, ids, s, w1, w2, b1, b2 = _case(4, 6, 2, 16, 8, torch.float32, "swiglu", False, False)
    x[1, 3] = float("inf")
    want = torch.ops.moe_inductor.fused_moe(x, tok, ids, s, w1, w2, activation="swiglu", impl="torch")[0]
    compiled = torch.compile(gathered_experts, fullgraph=True, dynamic=False)
    for got in (gathered_experts(x, tok, ids, s, w1, w2, None, None, "swiglu", False),
                compiled(x, tok, ids, s, w1, w2, None, None, "swiglu", False)):
        assert not torch.isfinite(got[1]).all()
        keep = [0, 2, 3]
        assert torch.isfinite(got[keep]).all()
        torch.testing.assert_close(got[keep], want[keep], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_transformers_decode_step_is_gathered_and_matches_eager(family):
    """A decode step (one position) of a tiny transformers model under no_grad: every MoE block
    runs the gathered GEMVs and the logits equal eager."""
    import hf_models

    model, ids = hf_models.build(family)
    step = ids[:, :1]
    with torch.no_grad():
        report = moe_inductor.explain(model, step)
        assert len(report.rewritten) == 2 and all(e.runs_on.startswith("gathered:") for e in report.rewritten), \
            str(report)
        want = model(step).logits
        torch._dynamo.reset()
        got = torch.compile(model, backend="sonic")(step).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
