"""MoE blocks inside nested regions: activation checkpointing (transformers' and a hand-written
``torch.utils.checkpoint``), nested checkpoints, ``wrap``, ``nested_compile_region``; a region the
rewrite does not enter (``torch.cond``) is reported.

Every case compares the output and every gradient with eager (fp32, 1e-4). The checkpointed runs
must also keep no more bytes for backward than the same model compiled without checkpointing:
the fused op inside a checkpointed body is recomputed in backward like the rest of the body.
The transformers cases run the rewrite and AOTAutograd with the min-cut partitioner (the one
Inductor uses, so recomputation is decided the same way) but no Inductor code generation, to stay
fast on a 2-core machine; the hand-written model goes through the full ``backend="sonic"``.
"""
import copy

import pytest
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from moe_inductor.compile.backend import rewrite_moe
from moe_inductor.diagnostics.memory import saved_activation_bytes
from moe_inductor.compile.options import SonicOptions
from moe_modules import LoopMoE

pytestmark = pytest.mark.usefixtures("fresh_dynamo")
ATOL = RTOL = 1e-4


def rewrite_then_aot(reports):
    """Backend: the sonic rewrite, then AOTAutograd with Inductor's partitioner and no codegen."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    def nop(gm, example_inputs):
        return make_boxed_func(gm.forward)

    aot = aot_autograd(fw_compiler=nop, bw_compiler=nop, partition_fn=min_cut_rematerialization_partition)

    def backend(gm, example_inputs):
        reports.append(rewrite_moe(gm, SonicOptions()))
        return aot(gm, example_inputs)

    return backend


def run(model, backend, *args, loss=lambda out: out.float().pow(2).mean()):
    """(saved bytes, output, {name: grad}) of one compiled forward + backward."""
    compiled = torch.compile(model, backend=backend)
    nbytes, out = saved_activation_bytes(lambda: compiled(*args), exclude=list(model.parameters()))
    out = getattr(out, "logits", out)
    loss(out).backward()
    return nbytes, out.detach(), grads_of(model, args)


def eager(model, *args, loss=lambda out: out.float().pow(2).mean()):
    out = model(*args)
    out = getattr(out, "logits", out)
    loss(out).backward()
    return out.detach(), grads_of(model, args)


def grads_of(model, args):
    grads = {n: p.grad for n, p in model.named_parameters()}
    grads.update({f"input {i}": a.grad for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad})
    return grads


def leaf(x):
    """A fresh input that requires grad (each run gets its own, so input gradients compare)."""
    return x.detach().clone().requires_grad_()


def assert_close(got, want):
    out, grads = got
    ref_out, ref_grads = want
    torch.testing.assert_close(out, ref_out, atol=ATOL, rtol=RTOL)
    assert set(grads) == set(ref_grads)
    for name in grads:
        if ref_grads[name] is None:
            assert grads[name] is None or not grads[name].any(), name
            continue
        assert grads[name] is not None, f"no gradient for {name}"
        torch.testing.assert_close(grads[name], ref_grads[name], atol=ATOL, rtol=RTOL, msg=name)


def rewritten(reports):
    return [c for r in reports for c in r.candidates if c.status == "rewritten"]


# --------------------------------------------------------------------------- transformers

@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_transformers_gradient_checkpointing(family):
    pytest.importorskip("transformers")
    import hf_models

    model, ids = hf_models.build(family)
    model.train()
    plain = copy.deepcopy(model)
    reference = copy.deepcopy(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    n_moe = len(hf_models.moe_modules(model))

    reports: list = []
    ckpt_bytes, out, grads = run(model, rewrite_then_aot(reports), ids)
    done = rewritten(reports)
    assert len(done) == n_moe == 2, [(c.where, c.status, c.reason) for r in reports for c in r.candidates]
    assert all("tag_activation_checkpoint region" in c.reason for c in done)
    assert_close((out, grads), eager(reference, ids))

    torch._dynamo.reset()
    plain_reports: list = []
    plain_bytes, _, _ = run(plain, rewrite_then_aot(plain_reports), ids)
    assert len(rewritten(plain_reports)) == n_moe
    print(f"{family}: saved for backward, checkpointed {ckpt_bytes} B, not checkpointed {plain_bytes} B")
    assert ckpt_bytes <= plain_bytes


# --------------------------------------------------------------------------- hand-written model

class Layer(nn.Module):
    def __init__(self, d=32, n=16, E=4, K=2):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.moe = LoopMoE(d, n, E, K, mask="eq")  # research-code loop: torch.where + index_add_

    def forward(self, x):
        return x + self.moe(self.norm(x))


@torch.compiler.nested_compile_region
def _shared_region(layer, x):
    return layer(x)


class Stack(nn.Module):
    """Two MoE layers; ``mode`` says how each layer is wrapped."""

    def __init__(self, mode="plain"):
        super().__init__()
        self.layers = nn.ModuleList([Layer() for _ in range(2)])
        self.mode = mode

    def forward(self, x):
        for layer in self.layers:
            if self.mode == "checkpoint":
                x = checkpoint(layer, x, use_reentrant=False)
            elif self.mode == "nested_checkpoint":
                x = checkpoint(lambda y: 2.0 * checkpoint(layer, y, use_reentrant=False), x, use_reentrant=False)
            elif self.mode == "wrap":
                from torch._higher_order_ops.wrap import wrap

                x = wrap(layer, x)
            elif self.mode == "nested_compile_region":
                x = _shared_region(layer, x)
            elif self.mode == "cond":
                x = torch.cond(x.sum() > 0, lambda y: layer(y), lambda y: y.clone(), (x,))
            else:
                x = layer(x)
        return x


def stack_and_input(mode):
    torch.manual_seed(0)
    model = Stack(mode)
    x = torch.randn(2, 8, 32)
    return model, x


def test_handwritten_checkpoint_full_backend():
    model, x = stack_and_input("checkpoint")
    plain = copy.deepcopy(model)
    plain.mode = "plain"
    reference = copy.deepcopy(plain)
    from torch._dynamo.utils import counters

    ckpt_bytes, out, grads = run(model, "sonic", leaf(x))
    assert counters["sonic"]["moe_rewrites"] == 2
    assert_close((out, grads), eager(reference, leaf(x)))
    torch._dynamo.reset()
    plain_bytes, _, _ = run(plain, "sonic", leaf(x))
    assert counters["sonic"]["moe_rewrites"] == 4
    print(f"hand-written stack: saved for backward, checkpointed {ckpt_bytes} B, not checkpointed {plain_bytes} B")
    assert ckpt_bytes <= plain_bytes


@pytest.mark.parametrize("mode, region", [
    ("nested_checkpoint", "tag_activation_checkpoint region wrap_body_1.wrap_body_0"),
    ("wrap", "wrap region wrap_body_0"),
    ("nested_compile_region", "invoke_subgraph region subgraph_0, body shared by 2 calls"),
])
def test_nested_regions(mode, region):
    model, x = stack_and_input(mode)
    want = eager(copy.deepcopy(model), leaf(x))  # the same wrappers run eagerly
    reports: list = []
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        # an input that requires grad: with one that does not, Dynamo traces the shared region
        # twice (the first layer's input differs) and inlines both copies
        _, out, grads = run(model, rewrite_then_aot(reports), leaf(x))
    done = rewritten(reports)
    # a body shared by both layers (nested_compile_region) is one rewrite that runs twice
    assert len(done) == (1 if "shared" in region else 2), [(c.where, c.reason) for c in done]
    assert region in done[0].reason
    assert_close((out, grads), want)


def test_region_not_entered_is_reported():
    """torch.cond's branches are not entered: the blocks inside are declined with that reason,
    and explain shows it."""
    import moe_inductor

    model, x = stack_and_input("cond")
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True), torch.no_grad():
        report = moe_inductor.explain(model, x, inductor=False)
    assert len(report.declined) == 2 and not report.rewritten and not report.missed, str(report)
    for entry, region in zip(report.declined, ("cond_true_0", "cond_true_1")):
        assert f"inside a cond region {region}, which the rewrite does not enter" in entry.reason, str(report)


def test_bodies_are_replaced_not_mutated():
    """The rewrite puts rewritten copies of the bodies in place of the originals: whoever kept
    the graph as Dynamo gave it (the backend's fallback) keeps the original bodies."""
    model, x = stack_and_input("checkpoint")
    seen = {}

    def backend(gm, example_inputs):
        bodies = {name: m for name, m in gm.named_children() if isinstance(m, torch.fx.GraphModule)}
        seen["before"] = {name: len(m.graph.nodes) for name, m in bodies.items()}
        report = rewrite_moe(gm, SonicOptions())
        seen["rewritten"] = len(report.rewritten)
        seen["originals_fused"] = [name for name, m in bodies.items() if _fused_calls(m)]
        seen["originals_after"] = {name: len(m.graph.nodes) for name, m in bodies.items()}
        seen["new_fused"] = [name for name, m in gm.named_children() if _fused_calls(m)]
        return gm.forward

    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True), torch.no_grad():
        out = torch.compile(model, backend=backend)(x)
        torch.testing.assert_close(out, copy.deepcopy(model)(x), atol=ATOL, rtol=RTOL)
    assert seen["rewritten"] == 2
    assert seen["originals_fused"] == [] and seen["originals_after"] == seen["before"]
    assert sorted(seen["new_fused"]) == sorted(seen["before"]) and len(seen["before"]) == 2


def _fused_calls(m):
    return [n for n in getattr(m, "graph", torch.fx.Graph()).nodes
            if isinstance(n.target, torch._ops.OpOverload) and n.target.namespace == "moe_inductor"]
