"""One harness for tests of a hand-written module through the sonic rewrite alone (``rewrite_moe``,
then the graph runs eagerly: no Inductor code generation, fast): output and every gradient against
eager at each sequence length, and the candidates the rewrite reported."""
from __future__ import annotations

import torch

from moe_inductor.compile.backend import rewrite_moe
from moe_inductor.dynamo.dynamo_scope import mark_sonic, throwaway_trace
from moe_inductor.compile.options import SonicOptions


def light_backend(reports: list):
    """A backend that runs the sonic rewrite, appends its report to ``reports`` and returns the
    rewritten graph to run eagerly (marked as sonic, so sonic's scoped Dynamo settings apply)."""

    @mark_sonic
    def light(gm, example_inputs):
        if throwaway_trace():  # as sonic: a trace a trampoline replaces never runs
            return gm.forward
        reports.append(rewrite_moe(gm, SonicOptions()))
        return gm.forward

    return light


def outputs_and_grads(fn, module: torch.nn.Module, x: torch.Tensor, before_each=None, upcast: bool = False) -> list:
    """[output, x's gradient, every parameter's gradient (zeros where none)] of ``fn(x)`` (``module``
    itself or its compiled form) under the loss ``sum(out ** 2)`` (computed in fp32 with ``upcast``)."""
    if before_each is not None:
        before_each(module)
    module.zero_grad(set_to_none=True)
    xi = x.clone().requires_grad_(True)
    out = fn(xi)
    (out.float() if upcast else out).pow(2).sum().backward()
    return [out.detach(), xi.grad] + [p.grad if p.grad is not None else torch.zeros_like(p) for p in module.parameters()]


def rewrite_and_compare(module: torch.nn.Module, d: int, lengths=(5, 8), tol: float = 1e-4, before_each=None,
                        rel_norm: bool = False, close=None) -> list:
    """Compile ``module`` with the rewrite only, run it and eager on (T, d) inputs for each T in
    ``lengths`` (``before_each(module)`` first, to reset state); assert output and gradients equal
    (elementwise within ``tol``, or with ``rel_norm`` by relative Frobenius error <= ``tol``: bf16,
    where the fused op rounds once what eager rounds per op, or by ``close(got, want)`` when given);
    return the candidates of every compiled graph."""
    reports: list = []
    torch._dynamo.reset()
    compiled = torch.compile(module, backend=light_backend(reports), fullgraph=True)
    for T in lengths:
        x = torch.randn(T, d, generator=torch.Generator().manual_seed(T))
        res = [outputs_and_grads(fn, module, x, before_each) for fn in (module, compiled)]
        for i, (got, want) in enumerate(zip(res[1], res[0])):
            if close is not None:
                close(got, want)
            elif rel_norm:
                err = ((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-12)).item()
                assert got.dtype == want.dtype and err <= tol, f"tensor {i}: relative error {err:.3e} > {tol}"
            else:
                torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    return [c for r in reports for c in r.candidates]


def fused_activations(module: torch.nn.Module, x: torch.Tensor) -> tuple:
    """Compile ``module`` with the rewrite only (fullgraph) and run it on ``x``: the activation spec of
    every fused-op call the rewrite emitted, and the candidates it reported."""
    specs, cands = [], []

    @mark_sonic
    def backend(gm, example_inputs):
        if throwaway_trace():
            return gm.forward
        report = rewrite_moe(gm, SonicOptions())
        cands.extend(report.candidates)
        specs.extend(nd.kwargs.get("activation") for nd in gm.graph.nodes
                     if nd.op == "call_function" and "fused_moe" in str(nd.target))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(module, backend=backend, fullgraph=True)(x)
    return specs, cands


class CaptureGraphs:
    """A sonic-marked backend (frames get sonic's scoped settings and loop capture) that runs the
    MoE rewrite and then the graph as it is (no Inductor code generation: the capture is what the
    loop tests check), records each graph and its report; throwaway traces are skipped as sonic
    skips them."""

    def __init__(self):
        self.graphs, self.reports = [], []
        mark_sonic(self)

    def __call__(self, gm, example_inputs):
        from moe_inductor.diagnostics.report import record_report

        if throwaway_trace():  # as sonic: a trace a trampoline replaces never runs
            return gm.forward
        self.graphs.append(gm)
        self.reports.append(rewrite_moe(gm, SonicOptions()))
        record_report(self.reports[-1], gm)
        return gm.forward
