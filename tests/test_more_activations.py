"""Activations and gate/up layouts beyond SwiGLU/GeGLU/GPT-OSS, found in transformers 5.23 MoE
families, and the families they unlock (default experts implementation, fp32, CPU):

  swiglu_limit:<L>      silu(gate.clamp(max=L)) * up.clamp(-L, L)        deepseek_v4, hy_v4 (glm5_next: same code, in the sweep)
  gptoss, concatenated  GPT-OSS's gate over h.chunk(2, -1)               minimax_m3_vl, openai_privacy_filter
  softcap_swiglu:cg:cu  (tanh(g/cg)*cg) * sigmoid(g) * (tanh(u/cu)*cu)   inkling2
  relu2                 relu(h) ** 2 (non-gated)                         nemotron_h
  swiglu with .float() casts around it and .to(h.dtype) after            beam

MuseSpark (per-expert RMSNorm after the down projection) stays declined with a precise reason.
"""
import pytest
import torch
import torch.nn.functional as F

from moe_inductor.ops.activations import act_backward, act_forward, parse_activation, split_gate_up

pytest.importorskip("transformers")
import hf_models  # noqa: E402
from test_hf_models import run_and_compare, sonic_without_codegen  # noqa: E402


# --------------------------------------------------------------------------- activation math

def _plain(spec, g, u=None):
    """The formula written naively (autograd differentiates this one)."""
    a = parse_activation(spec)
    if a.kind == "relu2":
        return torch.relu(g) ** 2
    if a.kind == "swiglu_limit":
        gc = torch.clamp(g, max=a.limit)
        return gc * torch.sigmoid(gc) * torch.clamp(u, -a.limit, a.limit)
    if a.kind == "softcap_swiglu":
        return (a.alpha * torch.tanh(g / a.alpha)) * torch.sigmoid(g) * (a.limit * torch.tanh(u / a.limit))
    if a.kind == "gptoss":
        gc = torch.clamp(g, max=a.limit)
        return gc * torch.sigmoid(a.alpha * gc) * (torch.clamp(u, -a.limit, a.limit) + 1)
    raise AssertionError(spec)


@pytest.mark.parametrize("spec", ["relu2", "swiglu_limit:0.7", "softcap_swiglu:0.8:1.3", "softcap_swiglu:4.0:25.0",
                                  "gptoss:1.702:0.7"])
@pytest.mark.parametrize("interleaved", [False, True])
def test_forward_and_backward_match_autograd_float64(spec, interleaved):
    act = parse_activation(spec)
    if not act.gated and interleaved:
        pytest.skip("layout only applies to gated activations")
    assert parse_activation(act.spec) == act  # spec round-trips
    gen = torch.Generator().manual_seed(0)
    cols = 24 if act.gated else 12
    h = (torch.randn(7, cols, generator=gen, dtype=torch.float64) * 2).requires_grad_()
    if act.gated:
        g, u = split_gate_up(h, interleaved)
        want = _plain(spec, g, u)
    else:
        want = _plain(spec, h)
    if "limit" in spec or "gptoss" in spec:  # the clamps are hit on both sides
        assert (h > act.limit).any() and (h < -act.limit).any()
    got = act_forward(h.detach(), act, interleaved)
    torch.testing.assert_close(got, want.detach(), atol=1e-12, rtol=1e-12)
    da = torch.randn(want.shape, generator=gen, dtype=torch.float64)
    (dh_want,) = torch.autograd.grad(want, h, da)
    dh = act_backward(h.detach(), da, act, interleaved)
    torch.testing.assert_close(dh, dh_want, atol=1e-12, rtol=1e-12)


def test_relu2_backward_is_finite_difference():
    act = parse_activation("relu2")
    h = torch.tensor([[-1.0, -1e-3, 0.5, 2.0]], dtype=torch.float64, requires_grad=True)
    eps = 1e-6
    fd = (act_forward(h.detach() + eps, act, False) - act_forward(h.detach() - eps, act, False)) / (2 * eps)
    torch.testing.assert_close(act_backward(h.detach(), torch.ones_like(h), act, False), fd, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("spec", ["swiglu_limit:7", "softcap_swiglu:0:1", "softcap_swiglu:1", "relu2:2"])
def test_bad_specs_rejected(spec):
    if spec == "swiglu_limit:7":
        assert parse_activation(spec).spec == "swiglu_limit:7.0"
        return
    with pytest.raises(ValueError):
        parse_activation(spec)


@pytest.mark.parametrize("spec", ["relu2", "swiglu_limit:7.0", "softcap_swiglu:4.0:25.0"])
def test_new_activations_served_by_triton(spec):
    """These have Triton epilogues now (tests/test_activation_epilogues.py checks them against the
    PyTorch path): unsupported_reason does not send them off the kernels."""
    from moe_inductor.kernels import unsupported_reason

    act = parse_activation(spec)
    cols = 16 if act.gated else 8
    reason = unsupported_reason(torch.zeros(4, 8), torch.zeros(2, cols, 8), torch.zeros(2, 8, 8), act)
    assert act.triton
    assert reason is None or "no Triton epilogue" not in reason, reason


# --------------------------------------------------------------------------- families, end to end

@pytest.mark.parametrize("family,impl", [
    ("deepseek_v4", None),                  # swiglu_limit:10.0
    ("hy_v4", None),                        # swiglu_limit:10.0
    ("minimax_m3_vl", None),                # gptoss:1.702:7.0, concatenated gate/up
    ("openai_privacy_filter", "batched_mm"),  # same + biases (its default "eager" graph-breaks)
    ("beam", None),                         # swiglu inside .float() / .to(dtype)
    ("nemotron_h", None),                   # relu2, non-gated
    ("inkling2", None),                     # softcap_swiglu:4.0:25.0
])
def test_family_rewritten_and_exact(family, impl, fresh_dynamo):
    model, ids = hf_models.build(family, experts_impl=impl)
    run_and_compare(model, ids, len(hf_models.moe_modules(model)), atol=1e-4, rtol=1e-4,
                    backend=sonic_without_codegen)


# --------------------------------------------------------------------------- near misses decline

def _only(reasons, msg, part="rows_experts"):
    """Every declined block gives ``msg``, prefixed by the part that declined and the node it names."""
    import re

    pat = re.compile(rf"{part}: \w+: " + re.escape(msg))
    assert reasons and all(pat.fullmatch(r) for r in reasons), reasons


def _reasons(family, experts_cls_name, apply_gate, monkeypatch, impl=None, inner_rows_ok=False):
    import moe_inductor

    model, ids = hf_models.build(family, experts_impl=impl)
    (_, block), *_ = hf_models.moe_modules(model)
    experts = block.experts
    assert type(experts).__name__ == experts_cls_name
    if apply_gate is not None:
        monkeypatch.setattr(type(experts), "_apply_gate", apply_gate)
    report = moe_inductor.explain(model, ids, inductor=False)
    if inner_rows_ok:  # only the grouped-GEMM chain on sorted rows (rows in, rows out) may be rewritten
        assert {e.idiom for e in report.rewritten} <= {"local_experts"}, report.rewritten
        return {e.reason for e in report.entries if e.status != "rewritten"}
    assert not report.rewritten
    return {e.reason for e in report.entries}


def test_swiglu_limit_asymmetric_up_clamp_declines(monkeypatch, fresh_dynamo):
    def gate(self, gate_up):
        g, u = gate_up.chunk(2, dim=-1)
        return F.silu(g.clamp(max=self.limit)) * u.clamp(min=-self.limit, max=2 * self.limit)

    reasons = _reasons("deepseek_v4", "DeepseekV4Experts", gate, monkeypatch)
    _only(reasons, "up clamp is clamp(min=-10.0, max=20.0), not clamp(min=-10.0, max=10.0)")


def test_gptoss_concat_swapped_chunks_is_up_first(monkeypatch, fresh_dynamo):
    """Halves swapped: the up-first layout ("gptoss:1.702:7.0+up_first", tests/test_glu_halves.py),
    rewritten and exact (was a near miss before that layout existed)."""
    def gate(self, gate_up):
        up, g = gate_up.chunk(2, dim=-1)  # halves swapped
        g = g.clamp(max=self.swiglu_limit)
        up = up.clamp(min=-self.swiglu_limit, max=self.swiglu_limit)
        return (up + 1.0) * (g * torch.sigmoid(g * self.swiglu_alpha))

    model, ids = hf_models.build("minimax_m3_vl")
    monkeypatch.setattr(type(hf_models.moe_modules(model)[0][1].experts), "_apply_gate", gate)
    run_and_compare(model, ids, len(hf_models.moe_modules(model)), atol=1e-4, rtol=1e-4,
                    backend=sonic_without_codegen)


def test_softcap_with_mismatched_constants_declines(monkeypatch, fresh_dynamo):
    def gate(self, gate_up):
        g, u = gate_up.chunk(2, dim=-1)
        return (torch.tanh(g / 4.0) * 5.0) * torch.sigmoid(g) * (torch.tanh(u / 25.0) * 25.0)

    reasons = _reasons("inkling2", "Inkling2Experts", gate, monkeypatch)
    _only(reasons, "softcap is tanh(z / 4.0) * 5.0: divisor and factor differ")


def test_relu_cubed_declines(monkeypatch, fresh_dynamo):
    model, ids = hf_models.build("nemotron_h")
    (_, block), *_ = hf_models.moe_modules(model)
    class Cubed(torch.nn.Module):
        def forward(self, z):
            return torch.relu(z) ** 3

    monkeypatch.setattr(block.experts, "act_fn", Cubed())
    import moe_inductor

    report = moe_inductor.explain(model, ids, inductor=False)
    assert not report.rewritten
    _only({e.reason for e in report.entries}, "expert activation is not a supported (gated) activation")


def test_muse_spark_post_expert_norm_declines_precisely(fresh_dynamo):
    # the whole block is declined with the precise reason; the grouped GEMMs before the norm are
    # rewritten as rows in, rows out (local_experts: exact, the norm and the combine stay in the graph)
    reasons = _reasons("muse_spark", "MuseSparkExperts", None, monkeypatch=None, inner_rows_ok=True)
    assert len(reasons) == 1
    (r,) = reasons
    assert r.startswith("expert output is transformed between the down-projection GEMM and the routing weight")
    assert "rsqrt" in r and "cannot be expressed exactly" in r
