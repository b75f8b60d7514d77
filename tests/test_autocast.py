"""Autocast (issue 11, item 1): under ``torch.autocast("cpu", dtype=torch.bfloat16)`` the rewritten
block computes in the dtype eager autocast gives the GEMMs it replaced (bf16 for nn.Linear / bmm
experts, fp32 for transformers' ``grouped_mm_fallback``, which autocast leaves alone), returns the
dtype eager returns, and keeps bytes of that dtype for backward. Compared with eager autocast:
output, every gradient, the fused op's input dtype (profiler) and the bytes saved for backward.

The compiled runs use the sonic rewrite followed by AOTAutograd without Inductor's code generation
(``sonic_aot``): autocast acts while AOTAutograd traces, the part under test, and that is several
times faster on CPU; ``test_loop_moe_full_backend`` runs the full backend once."""
import contextlib
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch._dynamo.utils import counters

import moe_inductor.compile.backend  # noqa: F401  (registers the op and the backend)
from moe_inductor.diagnostics.memory import saved_activation_bytes, sonic_minimum_bytes

sys.path.insert(0, str(Path(__file__).resolve().parent))
from moe_modules import LoopMoE  # noqa: E402

BF16 = torch.bfloat16
FUSED = ("moe_inductor::fused_moe", "moe_inductor::fused_moe_experts")


def sonic_aot(gm, example_inputs):
    """The sonic rewrite, then AOTAutograd running the graphs as they are (aot_eager)."""
    from torch._dynamo.backends.debugging import aot_eager

    from moe_inductor.compile.backend import rewrite_moe
    from moe_inductor.compile.options import SonicOptions

    rewrite_moe(gm, SonicOptions())
    return aot_eager(gm, example_inputs)


def compiled(model, backend=sonic_aot):
    torch._dynamo.reset()
    counters.clear()
    return torch.compile(model, backend=backend)


def autocast(enabled=True):
    return torch.autocast("cpu", dtype=BF16, enabled=enabled)


def run(fn, params, with_autocast, warm_up=False):
    """Output, bytes saved for backward (parameters excluded) and the dtypes of x in the fused op's
    calls (profiler; nested calls included: the op's Autocast kernel calls it again below itself).
    ``warm_up``: call ``fn`` once before (compilation is not profiled)."""
    ctx = autocast if with_autocast else contextlib.nullcontext
    if warm_up:  # the same call (saved-tensor hooks included: they are part of Dynamo's guards)
        with ctx():
            saved_activation_bytes(fn, exclude=params)
    with torch.profiler.profile(record_shapes=True) as prof:
        with ctx():
            nbytes, out = saved_activation_bytes(fn, exclude=params)
    x_dtypes = {e.input_dtypes[0] for e in prof.events() if e.name in FUSED}
    return out, nbytes, x_dtypes


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def check_close(out, ref, grads, ref_grads, names, bound):
    """bf16 numerics: relative (Frobenius) error of the output and of every gradient."""
    assert out.dtype == ref.dtype, f"output dtype {out.dtype}, eager autocast gives {ref.dtype}"
    assert rel_err(out, ref) <= bound, f"output: relative error {rel_err(out, ref):.3e}"
    for name, a, b in zip(names, grads, ref_grads):
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.dtype == b.dtype, f"{name}: gradient dtype {a.dtype} vs {b.dtype}"
            assert rel_err(a, b) <= bound, f"{name}: relative error {rel_err(a, b):.3e}"


class AutocastInside(nn.Module):
    """``with torch.autocast`` inside the compiled code (Dynamo records enter/exit nodes)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        with torch.autocast("cpu", dtype=BF16):
            y = self.inner(x)
        return y * 2


@pytest.mark.parametrize("where", ["around", "inside"])
def test_loop_moe_autocast(where):
    T, d, n, E, K = 128, 32, 128, 4, 2
    torch.manual_seed(0)
    moe = LoopMoE(d=d, n=n, E=E, K=K)
    model = AutocastInside(moe) if where == "inside" else moe
    outer = where == "around"  # autocast entered by the caller, around the compiled call
    x = torch.randn(1, T, d, requires_grad=True)
    leaves = [x] + list(moe.parameters())
    names = ["x"] + [n for n, _ in moe.named_parameters()]
    params = list(moe.parameters())

    ref, ref_bytes, _ = run(lambda: model(x), params, outer)
    g = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, leaves, g)
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        c = compiled(model)
        out, nbytes, x_dtypes = run(lambda: c(x), params, outer, warm_up=True)
    grads = torch.autograd.grad(out, leaves, g)

    assert counters["sonic"]["moe_rewrites"] == 1  # compiled once: the warm-up call and this one share it
    assert x_dtypes == {"c10::BFloat16"}, f"fused op got x of dtype {x_dtypes}; the experts' Linears run in bf16"
    check_close(out, ref, grads, ref_grads, names, 2e-2)
    # X and H kept in bf16: SonicMoE's minimum in bf16 (the router adds a little)
    minimum = sonic_minimum_bytes(T, d, n, T * K, BF16)
    assert nbytes <= 1.1 * minimum, f"saved {nbytes} bytes = {nbytes / minimum:.2f}x the bf16 minimum"
    assert nbytes < ref_bytes


def test_loop_moe_full_backend():
    """The same through Inductor (``backend="sonic"``), autocast around the call."""
    T, d, n, E, K = 64, 32, 64, 4, 2
    torch.manual_seed(1)
    moe = LoopMoE(d=d, n=n, E=E, K=K, mask="eq")
    x = torch.randn(1, T, d, requires_grad=True)
    leaves = [x] + list(moe.parameters())
    params = list(moe.parameters())
    ref, _, _ = run(lambda: moe(x), params, True)
    g = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, leaves, g)
    c = compiled(moe, "sonic")
    out, nbytes, x_dtypes = run(lambda: c(x), params, True, warm_up=True)
    grads = torch.autograd.grad(out, leaves, g)
    assert counters["sonic"]["moe_rewrites"] == 1
    assert x_dtypes == {"c10::BFloat16"}
    check_close(out, ref, grads, ref_grads, ["x"] + [n for n, _ in moe.named_parameters()], 2e-2)
    assert nbytes <= 1.1 * sonic_minimum_bytes(T, d, n, T * K, BF16) + 4 * T * E * 4  # + fp32 router (T, E)


@pytest.mark.parametrize("experts_impl,x_dtype", [
    # transformers' grouped_mm path on CPU calls its grouped_mm_fallback custom op, which has no
    # autocast rule: eager runs the experts in fp32, and so must the fused op
    ("grouped_mm", "float"),
    # batched_mm: torch.bmm, which autocast runs in bf16
    ("batched_mm", "c10::BFloat16"),
])
def test_transformers_mixtral_autocast(experts_impl, x_dtype):
    pytest.importorskip("transformers")
    import hf_models

    model, ids = hf_models.build("mixtral", experts_impl=experts_impl)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    ref, ref_bytes, _ = run(lambda: model(ids).logits, params, True)
    g = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, params, g, allow_unused=True)
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        c = compiled(model)
        out, nbytes, x_dtypes = run(lambda: c(ids).logits, params, True, warm_up=True)
    grads = torch.autograd.grad(out, params, g, allow_unused=True)
    layers = len(hf_models.moe_modules(model))
    assert counters["sonic"]["moe_rewrites"] == layers
    assert x_dtypes == {x_dtype}
    check_close(out, ref, grads, ref_grads, names, 2e-2)
    assert nbytes < ref_bytes


@pytest.mark.parametrize("name", ["nanomoe_train", "megatron_core_allgather", "rxlm_gated_moe_ff_shared",
                                  "nllb_moe_4x_no_mask"])
def test_faithful_entries_under_autocast(name):
    """Faithful public layers as people train them, under CPU bf16 autocast around the call: nanoMoE's
    experts add their fp32 bias parameters in place into the bf16 bmm outputs (``x += fc_bias``), the
    split-by-host-counts experts (rxlm) run their grouped GEMMs in bf16 as each F.linear did. Rewritten
    (one fused call), output and every gradient within bf16 rounding of eager autocast. An entry whose
    own eager code fails under autocast (Megatron-Core's linear Function backward: bf16 gradient times
    fp32 weight) is skipped with that reason."""
    from idiom_catalogue import BY_NAME
    from moe_inductor.diagnostics.stats import capture_routing_stats

    idiom = BY_NAME[name]
    model = idiom.build()
    args = [a.detach().clone().requires_grad_(a.is_floating_point()) for a in idiom.inputs(8, 1)]
    leaves = [a for a in args if a.requires_grad] + list(model.parameters())
    try:
        with autocast():
            ref = model(*args)
        ref_grads = torch.autograd.grad(ref.float().pow(2).sum(), leaves, allow_unused=True)
    except RuntimeError as e:
        pytest.skip(f"{name}: the source itself fails under autocast: {e}")
    c = compiled(model, "sonic")
    with capture_routing_stats() as calls, autocast():
        out = c(*args)
    grads = torch.autograd.grad(out.float().pow(2).sum(), leaves, allow_unused=True)
    assert len(calls) == 1, f"{name}: {len(calls)} fused calls under autocast"
    check_close(out, ref, grads, ref_grads, [f"leaf {i}" for i in range(len(leaves))], 3e-2)
