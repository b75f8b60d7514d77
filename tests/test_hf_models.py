"""Unmodified transformers MoE models, built tiny from config with random weights: every MoE
layer rewritten exactly once, logits and all gradients equal to eager."""
import pytest
import torch
from torch._dynamo.utils import counters

pytest.importorskip("transformers")
import hf_models  # noqa: E402
from moe_modules import mixtral_with_loop_moe  # noqa: E402


def close(a, b, atol, rtol, name, rel_norm=None):
    if rel_norm is not None:
        # bf16: elementwise bounds fail on a few near-cancelling entries whatever the backend;
        # the relative error of the whole tensor is the meaningful figure
        err = (a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)
        assert err <= rel_norm, f"{name}: relative error {err:.3e} > {rel_norm}"
    else:
        torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def sonic_without_codegen(gm, example_inputs):
    """The sonic rewrite, then AOTAutograd running the graphs as they are (aot_eager): checks all
    the rewrite changes, traced through the fused op's fake and autograd, without Inductor's code
    generation (several times faster; the full backend is covered by the default-experts tests)."""
    from torch._dynamo.backends.debugging import aot_eager

    from moe_inductor.compile.backend import rewrite_moe
    from moe_inductor.compile.options import SonicOptions

    rewrite_moe(gm, SonicOptions())
    return aot_eager(gm, example_inputs)


def run_and_compare(model, ids, expected_rewrites, atol=None, rtol=None, rel_norm=None, backend="sonic"):
    torch._dynamo.reset()
    counters.clear()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    ref = model(ids).logits if hasattr(model(ids), "logits") else model(ids)[0]
    g = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, params, g, allow_unused=True)
    compiled = torch.compile(model, backend=backend)
    out = compiled(ids)
    out = out.logits if hasattr(out, "logits") else out[0]
    grads = torch.autograd.grad(out, params, g, allow_unused=True)
    assert counters["sonic"]["moe_rewrites"] == expected_rewrites
    close(out, ref, atol, rtol, "logits", rel_norm)
    for (name, _), a, b in zip([(n, p) for n, p in model.named_parameters() if p.requires_grad], grads, ref_grads):
        if a is None or b is None:
            assert a is None and b is None, name
            continue
        close(a, b, atol, rtol, name, rel_norm)


@pytest.mark.parametrize("family", [
    "mixtral",    # softmax -> top-k -> renormalise
    "qwen3_moe",  # softmax -> top-k, no renormalisation at default config
    "olmoe",      # same idiom, other family
])
def test_default_experts_impl_fp32(family):
    model, ids = hf_models.build(family)
    run_and_compare(model, ids, len(hf_models.moe_modules(model)), atol=1e-4, rtol=1e-4)


def test_mixtral_with_4x_style_expert_loop():
    model, ids = hf_models.build("mixtral")
    model = mixtral_with_loop_moe(model)
    run_and_compare(model, ids, len(model.model.layers), atol=1e-4, rtol=1e-4)


def test_mixtral_bf16():
    # bf16: transformers runs bf16 grouped GEMMs and sums the K expert outputs in bf16, we
    # accumulate the combine in fp32. Stated bound: relative (Frobenius) error <= 2e-2 for the
    # logits and every gradient.
    model, ids = hf_models.build("mixtral", dtype=torch.bfloat16)
    run_and_compare(model, ids, len(hf_models.moe_modules(model)), rel_norm=2e-2)
