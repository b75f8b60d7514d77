"""Every idiom of ``tests/idiom_catalogue.py`` through the sonic rewrite, against eager.

Per entry, one compiled module runs at two sequence lengths (T=5, then T=8: Dynamo recompiles
once, with T dynamic) and must:
- match eager in the output and in the gradient of every parameter and floating input
  (fp32: 1e-4 elementwise; the bf16 grouped-GEMM idioms: relative norm error at their stated
  tolerance plus a gross per-element bound, ``close``);
- compile at most twice (a forward that graph-breaks as its source does: each fragment at most
  twice; only the fragments that hold the block are checked further);
- rewrite exactly ``expect`` MoE blocks in every graph (0 for the look-alikes), and leave a graph
  that calls the fused op ``expect`` times with no expert GEMM left (only the entry's ``other_gemms``: router, shared
  expert, gating einsum). A ``"pending"`` entry is checked for numerics only; what the rewrite did
  is printed and recorded (``record_property``), so the lead can flip it when a recogniser lands.

The backend is light (``rewrite_moe``, then the graph runs eagerly: no Inductor code generation),
so the file stays fast; the fused op runs its PyTorch path with its own autograd.
"""
from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as Fn
from torch._dynamo.utils import counters

from moe_inductor.compile.backend import rewrite_moe
from moe_inductor.dynamo.dynamo_scope import mark_sonic, throwaway_trace
from moe_inductor.compile.options import SonicOptions

from idiom_catalogue import BY_NAME, CATALOGUE

LENGTHS = ((5, 0), (8, 1))  # (T, input seed): two sequence lengths, so one dynamic-shape recompile at most

_GEMM_FUNCTIONS = {torch._C._nn.linear, Fn.linear, torch.bmm, torch.mm, torch.matmul, torch.einsum,
                   torch._grouped_mm, operator.matmul}
_GEMM_METHODS = {"bmm", "mm", "matmul", "__matmul__"}


def gemm_nodes(gm: torch.fx.GraphModule) -> list:
    """GEMM nodes at the graph's top level, and ``autograd.Function`` calls whose forward body runs one
    (Megatron-Core's parallel linears: their GEMMs live in the Function's body)."""
    return [n for n in gm.graph.nodes
            if (n.op == "call_function" and n.target in _GEMM_FUNCTIONS)
            or (n.op == "call_method" and n.target in _GEMM_METHODS)
            or _function_with_gemm(gm, n)]


def _function_with_gemm(gm: torch.fx.GraphModule, n: torch.fx.Node) -> bool:
    if not (n.op == "call_function" and n.target is torch.ops.higher_order.autograd_function_apply):
        return False
    body = n.args[0]
    fwd = getattr(gm, body.target, None) if isinstance(body, torch.fx.Node) and body.op == "get_attr" else None
    return isinstance(fwd, torch.fx.GraphModule) and bool(gemm_nodes(fwd))


def fused_calls(gm: torch.fx.GraphModule) -> int:
    ops = (torch.ops.moe_inductor.fused_moe, torch.ops.moe_inductor.fused_moe_experts)
    targets = set(ops) | {op.default for op in ops}
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target in targets)


@mark_sonic  # frames compiled with it get sonic's scoped Dynamo settings
class RewriteOnly:
    """Backend: the sonic rewrite, then the graph as it is. Records, per compiled graph, the
    rewrite report and the GEMM nodes before and after."""

    def __init__(self):
        self.compiles = []  # dicts: report, gemms_before, gemms_after, fused, graph

    def __call__(self, gm, example_inputs):
        if throwaway_trace():  # as sonic: a trace a trampoline replaces never runs
            return gm.forward
        before = len(gemm_nodes(gm))
        report = rewrite_moe(gm, SonicOptions())
        self.compiles.append(dict(report=report, gemms_before=before, gemms_after=len(gemm_nodes(gm)),
                                  fused=fused_calls(gm), graph=gm))
        return gm.forward


def fwd_bwd(fn, module, args):
    """Output, and gradients of every parameter and floating input (None -> zeros: an expert that
    got no token has no gradient in eager and a zero one through the fused op)."""
    ins = [a.detach().clone().requires_grad_(a.is_floating_point()) for a in args]
    module.zero_grad(set_to_none=True)
    out = fn(*ins)
    out.float().pow(2).sum().backward()
    grads = [(name, p.grad if p.grad is not None else torch.zeros_like(p)) for name, p in module.named_parameters()]
    grads += [(f"input{i}", a.grad) for i, a in enumerate(ins) if a.is_floating_point()]
    return out.detach(), grads


def check_against_eager(idiom):
    """Compile ``idiom`` and run it at both lengths against eager; return the backend's record."""
    torch._dynamo.reset()
    counters.clear()
    module = idiom.build()
    backend = RewriteOnly()
    compiled = torch.compile(module, backend=backend, fullgraph=idiom.fullgraph)
    backend.after_length = []  # graphs compiled by the end of each length
    for T, seed in LENGTHS:
        args = idiom.inputs(T, seed)
        ref_out, ref_grads = fwd_bwd(module, module, args)
        out, grads = fwd_bwd(compiled, module, args)
        for name, g, r in [("output", out, ref_out)] + [(n, g, r) for (n, g), (_, r) in zip(grads, ref_grads)]:
            close(g, r, idiom, f"{idiom.name} T={T} {'output' if name == 'output' else 'grad of ' + name}")
        backend.after_length.append(len(backend.compiles))
    return backend


def close(got, want, idiom, what: str) -> None:
    """fp32 entries: elementwise at the entry's tolerance. bf16 entries (experts computed in bf16,
    the fused op accumulating in fp32 where eager rounds per GEMM): the relative norm error per
    tensor at most the entry's tolerance, and no element off by more than a quarter of the tensor's
    largest value (elementwise checks at 3e-2 failed on single small elements of exact rewrites)."""
    if idiom.dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=idiom.tol, rtol=idiom.tol, msg=lambda m: f"{what}: {m}")
        return
    g, w = got.double(), want.double()
    err, scale = (g - w).norm().item(), w.norm().item()
    assert err <= idiom.tol * max(scale, 1e-6), f"{what}: relative norm error {err / max(scale, 1e-30):.3g} > {idiom.tol}"
    worst = (g - w).abs().max().item() if w.numel() else 0.0
    assert worst <= 0.25 * w.abs().max().item() + 1e-6, f"{what}: an element is off by {worst:.3g}"


#: entries that torch 2.11's Dynamo itself gets wrong (checked with backend="eager" too), and two the rewrite
#: recognises only on 2.13 (marked below): strict xfail there, so that a change is noticed
_TORCH_211_DYNAMO = {
    "labml_switch_default": "torch 2.11's Dynamo cannot build new_tensor from len() of a data-dependent nonzero "
                            "under fullgraph (UserError u0); 2.13 can",
    "labml_switch_unscaled": "as labml_switch_default",
    "nllb_moe_4x_no_mask": "torch 2.11's Dynamo cannot trace the router's `self.classifier = self.classifier.to(dtype)` "
                           "in forward (the nn.Parameter constructor) under fullgraph; 2.13 can",
    "nllb_moe_4x_encoder_mask": "as nllb_moe_4x_no_mask",
    "openmoe_sparse_mlp": "as nllb_moe_4x_no_mask (`self.gate = self.gate.to(float)` in forward)",
    "openmoe_ffn_sublayers_eval": "as openmoe_sparse_mlp",
    # not Dynamo's fault: on 2.11 mask_dispatch declines the block ("routing mask is not one-hot per token"),
    # exact; the 2.11 graph of the capacity-masked router mask is not read as one-hot (not investigated)
    "switch_4x_clone": "torch 2.11: the Switch 4.x block is declined (its router mask not proven one-hot), exact",
    "switch_4x_zeros": "as switch_4x_clone",
    "labml_switch_drop": "torch 2.11: the captured capacity loop's graph is spelled otherwise and the block is "
                         "declined (the row index the result is written at not recognised), exact; not investigated",
}
_OLD_TORCH = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) < (2, 12)


def _param(name):
    if _OLD_TORCH and name in _TORCH_211_DYNAMO:
        return pytest.param(name, marks=pytest.mark.xfail(reason=_TORCH_211_DYNAMO[name], strict=True))
    return name


@pytest.mark.parametrize("name", [_param(i.name) for i in CATALOGUE])
def test_idiom(name, record_property):
    idiom = BY_NAME[name]
    backend = check_against_eager(idiom)
    compiles = backend.compiles
    if idiom.fullgraph:
        assert 1 <= len(compiles) <= 2, f"{name}: compiled {len(compiles)} times for two lengths"
    else:
        # a forward that graph-breaks (as its source does) compiles one graph per fragment: the
        # second length may recompile each fragment once, no more; only graphs that hold the block
        # (a fused call, or an expert GEMM) are checked below
        first, both = backend.after_length
        # (a pending entry whose frame ran its first call eagerly, sonic's retry without the Dynamo
        # setting, compiles its fragments only from the second length: recorded, not asserted)
        if idiom.expect != "pending":
            assert 1 <= first and both <= 2 * first, f"{name}: {first} graphs at the first length, {both} after both"
        record_property("graphs_per_length", [first, both])
        compiles = [rec for rec in compiles if rec["fused"] or rec["gemms_before"] > idiom.other_gemms] or compiles[:1]
    seen = [[(c.idiom, c.status, c.reason) for c in rec["report"].candidates] for rec in compiles]
    rewritten = [sum(c.status == "rewritten" for c in rec["report"].candidates) for rec in compiles]
    record_property("rewritten_per_graph", rewritten)
    if idiom.expect == "pending":
        # what flipping ``expect`` to the rewritten count would check: fused calls and GEMMs left
        left = [(rec["fused"], rec["gemms_after"]) for rec in compiles]
        ready = rewritten[0] > 0 and len(set(rewritten)) == 1 and all(
            f == rewritten[0] and g == idiom.other_gemms for f, g in left)
        note = (f"{name}: pending; rewritten per graph {rewritten}; (fused calls, GEMMs left) {left}, "
                f"other_gemms {idiom.other_gemms}; {'ready to flip' if ready else 'not ready'}; candidates {seen}")
        record_property("pending_note", note)
        print(note)
        return
    assert rewritten == [idiom.expect] * len(compiles), f"{name}: rewritten {rewritten}, candidates {seen}"
    if idiom.expect == 0:  # a look-alike: the graph keeps every GEMM it had
        assert all(rec["fused"] == 0 and rec["gemms_after"] == rec["gemms_before"] for rec in compiles), name
        return
    for rec in compiles:
        assert rec["fused"] == idiom.expect, f"{name}: {rec['fused']} fused-op calls in {rec['graph'].code}"
        # the experts' GEMMs are gone; only the router's (and shared experts', gating's) remain
        assert rec["gemms_before"] > idiom.other_gemms
        assert rec["gemms_after"] == idiom.other_gemms, (
            f"{name}: {rec['gemms_after']} GEMM nodes left, expected {idiom.other_gemms}: "
            f"{[str(n.target) for n in gemm_nodes(rec['graph'])]}")


def test_catalogue_entries_are_well_formed():
    for idiom in CATALOGUE:
        assert idiom.expect == "pending" or (isinstance(idiom.expect, int) and idiom.expect >= 0), idiom.name
        assert idiom.source, idiom.name
        a, b = idiom.build(), idiom.build()  # deterministic weights
        for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
            assert torch.equal(p, q), f"{idiom.name}.{n} differs between two builds"
        args = idiom.inputs(5, 0)
        assert all(torch.equal(x, y) for x, y in zip(args, idiom.inputs(5, 0)))
        assert a(*args).shape == args[0].shape, idiom.name  # an MoE block maps tokens to tokens
