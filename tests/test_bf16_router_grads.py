"""Issue 22: in bf16, a sigmoid router with a bias buffer got a zero gradient after the rewrite.

The rewrite itself was right (run eagerly, the rewritten graph gave the right gradient); Inductor
then ran a fused reader of the top-k backward's scatter before the scatter
(``moe_inductor/inductor_workarounds.py`` says how). Everything here therefore goes through the
whole sonic backend, Inductor included, and compares the output and every gradient with eager in
the dtype people train in: bf16 and fp16, sigmoid and softmax routers, with and without the bias
buffer, per-expert loops and the sorted (grouped) and bmm (batched) forms. A lost gradient is a
relative error of 1; the tolerances (``moe_generator.TOLERANCES``) are what fp32 accumulation
against per-op rounding needs.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.utils import counters

import moe_generator as G
from moe_inductor import inductor_workarounds

E, K, d, n, T = 4, 2, 32, 16, 12


class IssueMoE(nn.Module):
    """The module of issue 22, op for op; ``with_bias=False`` drops the buffer (the issue's
    "without the buffer" case), ``router="softmax"`` swaps the sigmoid for a softmax."""

    def __init__(self, with_bias: bool = True, router: str = "sigmoid"):
        super().__init__()
        self.router, self.with_bias = router, with_bias
        self.gate = nn.Linear(d, E, bias=False)
        self.register_buffer("bias", torch.zeros(E))
        self.w1 = nn.Parameter(torch.randn(E, n, d) / d**0.5)
        self.w2 = nn.Parameter(torch.randn(E, d, n) / n**0.5)

    def forward(self, x):
        logits = self.gate(x) + self.bias if self.with_bias else self.gate(x)
        s = torch.sigmoid(logits.float()) if self.router == "sigmoid" else torch.softmax(logits.float(), dim=-1)
        w, idx = torch.topk(s, K, dim=-1)
        w = w.to(x.dtype)
        out = torch.zeros_like(x)
        for e in range(E):
            tok, k = torch.where(idx == e)
            h = F.gelu(F.linear(x[tok], self.w1[e]))
            out.index_add_(0, tok, F.linear(h, self.w2[e]) * w[tok, k, None])
        return out


def _grads(fn, module, x):
    module.zero_grad(set_to_none=True)
    xi = x.detach().clone().requires_grad_(True)
    out = fn(xi)
    out.float().pow(2).sum().backward()
    return [("output", out.detach()), ("x", xi.grad)] + [(name, p.grad) for name, p in module.named_parameters()]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("with_bias, router", [
    (True, "sigmoid"),   # the issue's module: zero router gradient before the fix
    (False, "sigmoid"),  # without the buffer (right before the fix too)
    (True, "softmax"),   # softmax router with the buffer
])
def test_issue_module(dtype, with_bias, router):
    torch.manual_seed(0)
    dt = G.DTYPES[dtype]
    m = IssueMoE(with_bias, router).to(dt)
    x = torch.randn(T, d).to(dt)
    ref = _grads(m, m, x)
    torch._dynamo.reset()
    counters.clear()
    got = _grads(torch.compile(m, backend="sonic"), m, x)
    assert counters["sonic"]["moe_rewrites"] == 1
    for (name, g), (_, r) in zip(got, ref):
        assert g is not None, name
        why = G.compare(name, g, r, G.TOLERANCES[dtype])
        assert not why, why


_FORMS = {  # the forms the issue's fuzz found wrong: per-expert loop, sorted (grouped) rows, bmm (batched) rows
    "loop": ("loop", "where_eq", "stacked", "index_add", "output", False),
    "grouped": ("gathered", "sorted", "gathered", "index_add", "output", False),
    "batched": ("gathered", "interleave", "gathered_fused", "view_sum", "output", False),
}


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("router", G.ROUTERS)
@pytest.mark.parametrize("form", sorted(_FORMS))
def test_generated_forms_full_backend(form, router, dtype):
    # E = 8 so that the group-limited router has two groups; K = 2, T = 7
    spec = G.Spec(*_FORMS[form], gated=True, act="silu", E=8, K=2, T=7, skew=False, seed=3, router=router, dtype=dtype)
    outcome = G.run_case(spec, backend="sonic")
    assert outcome.rewritten == 1, outcome.declined
    assert outcome.numerics_ok, f"{spec.describe()}: {outcome.error}"


def test_workaround_only_fills_what_the_user_left_unset():
    assert inductor_workarounds.for_sonic_graph({}) == {"reorder_for_peak_memory": False}
    assert inductor_workarounds.for_sonic_graph({"reorder_for_peak_memory": True}) == {"reorder_for_peak_memory": True}
    assert inductor_workarounds.for_sonic_graph({"max_autotune": True}) == {
        "max_autotune": True, "reorder_for_peak_memory": False}


def test_workaround_applied_to_sonic_graphs_not_to_plain_inductor_ab(monkeypatch):
    """The settings reach compile_fx for every sonic graph (with or without a rewritten block), and
    not with ``rewrite=False`` (plain Inductor, for A/B comparisons)."""
    import torch._inductor.compile_fx as cfx

    seen = []
    real = cfx.compile_fx

    def spy(gm, example_inputs, config_patches=None, **kw):
        seen.append(dict(config_patches or {}))
        return real(gm, example_inputs, config_patches=config_patches, **kw)

    monkeypatch.setattr(cfx, "compile_fx", spy)
    m = IssueMoE().to(torch.bfloat16)
    x = torch.randn(T, d, dtype=torch.bfloat16)
    for module, inp, options, want in [(m, x, None, False), (nn.Linear(d, d), torch.randn(3, d), None, False),
                                       (m, x, {"rewrite": False}, None)]:
        seen.clear()
        torch._dynamo.reset()
        torch.compile(module, backend="sonic", options=options)(inp)
        assert seen and seen[0].get("reorder_for_peak_memory") is want, (options, seen)  # the backend's call (Inductor nests more)
