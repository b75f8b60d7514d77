"""Triton epilogues of the activations added after the first kernels (clamped SwiGLU, softcapped
SwiGLU, relu^2) against the PyTorch path, and clear errors for malformed activation specs.

The kernels run interpreted on CPU (tests/conftest.py sets TRITON_INTERPRET=1 without CUDA), with
the same harness as tests/test_kernels.py: every output and gradient (out, h_sorted, order, dx,
dscores, dw1, dw2, db1, db2) vs ``reference.moe_forward`` / ``moe_backward``, whose formulas are
checked against autograd in float64 by tests/test_more_activations.py. Pre-activations are about
N(0, 1), so clamp limits of 0.5 and caps near 1 put many entries on both sides of every clamp and
deep into every tanh.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

from moe_inductor.ops import reference
from moe_inductor.ops.activations import ALL_KINDS, parse_activation
from moe_inductor.ops.op import fused_moe

from test_kernels import DEVICE, HAS_CUDA, make_case, run_and_compare  # noqa: E402

needs_triton = pytest.mark.skipif(
    not HAS_CUDA and os.environ.get("TRITON_INTERPRET") != "1",
    reason="Triton kernels need CUDA or TRITON_INTERPRET=1 (tests/conftest.py sets it without CUDA)",
)

EPILOGUE_CASES = [
    # limit 0.5: the gate clamp (max only) and both up clamps are hit; biases shift H per expert
    pytest.param(dict(act="swiglu_limit:0.5", interleaved=True, bias=True), id="fp32-swiglu_limit-interleaved-bias"),
    pytest.param(dict(act="swiglu_limit:0.5", dtype=torch.bfloat16, transposed=True, T=7),
                 id="bf16-swiglu_limit-concat-transposed"),
    # clamped after the activation (Step-3.7): silu(H_gate) > 0.5 and |H_up| > 0.5 both occur
    pytest.param(dict(act="swiglu_limit_after:0.5", interleaved=True, bias=True),
                 id="fp32-swiglu_limit_after-interleaved-bias"),
    pytest.param(dict(act="swiglu_limit_after:0.5", dtype=torch.bfloat16, transposed=True, T=7),
                 id="bf16-swiglu_limit_after-concat-transposed"),
    # caps near |H| exercise the tanh nonlinearity; 4/25 are Inkling2's shipped caps
    pytest.param(dict(act="softcap_swiglu:0.7:1.3", bias=True, routing="general", T=12, E=5),
                 id="fp32-softcap_swiglu-bias-general-routing"),
    pytest.param(dict(act="softcap_swiglu:4.0:25.0", dtype=torch.float16, interleaved=True),
                 id="fp16-softcap_swiglu-interleaved"),
    pytest.param(dict(act="softcap_swiglu:-0.8:1.1", transposed=True), id="fp32-softcap_swiglu-negative-cap"),
    # non-gated; n not a multiple of the interpreter's column block
    pytest.param(dict(act="relu2", n=12, bias=True), id="fp32-relu2-nongated-bias"),
    pytest.param(dict(act="relu2", dtype=torch.bfloat16, transposed=True, T=13, n=12), id="bf16-relu2-transposed"),
]

#: activation kinds whose kernel cases live here rather than in tests/test_kernels.py
EPILOGUE_KINDS = {parse_activation(p.values[0]["act"]).kind for p in EPILOGUE_CASES}


@needs_triton
@pytest.mark.parametrize("kwargs", EPILOGUE_CASES)
def test_epilogue_matches_reference(kwargs):
    run_and_compare(make_case(**kwargs))


@needs_triton
@pytest.mark.parametrize("spec", ["swiglu_limit:0.5", "swiglu_limit_after:0.5", "softcap_swiglu:0.7:1.3"])
def test_epilogue_recompute_h(spec):
    """keep_h=False: the backward recomputes H and the epilogue from X."""
    run_and_compare(make_case(act=spec, bias=True), keep_h=False)


@needs_triton
@pytest.mark.parametrize("spec,interleaved", [("swiglu_limit:0.5", True), ("swiglu_limit_after:0.3", False),
                                              ("softcap_swiglu:0.7:1.3", False),
                                              ("relu2", False)])
def test_fused_op_triton_matches_autograd_of_naive_loop(spec, interleaved):
    """End to end through the op with impl='triton' and its registered autograd, against autograd
    through the obviously-correct loop (no shared backward code)."""
    c = make_case(act=spec, interleaved=interleaved, bias=True, T=9, E=3, K=2)

    def leaves():
        return [t.detach().clone().requires_grad_(True) for t in (c.x, c.scores, c.w1, c.w2, c.b1, c.b2)]

    got = leaves()
    x, s, w1, w2, b1, b2 = got
    out = fused_moe(x, c.token_ids, c.expert_ids, s, w1, w2, b1=b1, b2=b2, activation=spec,
                    interleaved=interleaved, impl="triton")
    out.backward(c.grad_out)
    want = leaves()
    x, s, w1, w2, b1, b2 = want
    ref = reference.naive_moe(x, c.token_ids, c.expert_ids, s, w1, w2, b1, b2, spec, interleaved)
    ref.backward(c.grad_out)
    torch.testing.assert_close(out.detach(), ref.detach(), atol=1e-4, rtol=1e-4)
    for name, g, r in zip(("dx", "dscores", "dw1", "dw2", "db1", "db2"), got, want):
        torch.testing.assert_close(g.grad, r.grad, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")


@needs_triton
def test_every_activation_has_an_epilogue():
    """No activation is left to a per-call PyTorch fallback on CUDA: each kind maps to a kernel
    code and the kernels accept it (on CPU: under the interpreter)."""
    from moe_inductor.kernels import unsupported_reason
    from moe_inductor.kernels.activation_jit import act_code

    specs = {"gptoss": "gptoss:1.702:7.0", "swiglu_limit": "swiglu_limit:7.0",
             "swiglu_limit_after": "swiglu_limit_after:7.0",
             "softcap_swiglu": "softcap_swiglu:4.0:25.0"}
    codes = {}
    for kind in ALL_KINDS:
        act = parse_activation(specs.get(kind, kind))
        assert act.triton, kind
        codes[kind] = act_code(act)
        cols = 8 * act.width
        w1 = torch.zeros(2, cols, 8, device=DEVICE)
        assert unsupported_reason(torch.zeros(4, 8, device=DEVICE), w1, torch.zeros(2, 8, 8, device=DEVICE), act) \
            is None, kind
    # kinds that share a code share their math (gated X-GLU and its unary X); the rest are distinct
    assert codes["swiglu"] == codes["silu"] and codes["geglu"] == codes["gelu"]
    assert len({codes[k] for k in ("swiglu", "geglu", "geglu_tanh", "relu", "gptoss", "swiglu_limit",
                                   "swiglu_limit_after", "softcap_swiglu", "relu2")}) == 9


# --------------------------------------------------------------------------- spec errors (issue 11, item 6)

@pytest.mark.parametrize("spec,fragments", [
    ("gptoss:abc:def", ("'gptoss:abc:def'", "alpha 'abc' is not a number", "'gptoss:<alpha>:<limit>'")),
    ("gptoss:1.702:x", ("limit 'x' is not a number", "'gptoss:<alpha>:<limit>'")),
    ("gptoss:1.702", ("gptoss takes 2 parameter(s)", "'gptoss:<alpha>:<limit>'")),
    ("swiglu_limit:ten", ("'swiglu_limit:ten'", "limit 'ten' is not a number", "'swiglu_limit:<limit>'")),
    ("swiglu_limit:inf", ("limit must be finite", "'swiglu_limit:<limit>'")),
    ("swiglu_limit_after", ("swiglu_limit_after takes 1 parameter(s)", "'swiglu_limit_after:<limit>'")),
    ("swiglu_limit_after:nan", ("limit must be finite", "'swiglu_limit_after:<limit>'")),
    ("softcap_swiglu:4:", ("up cap '' is not a number", "'softcap_swiglu:<gate cap>:<up cap>'")),
    ("softcap_swiglu:0:1", ("caps must be nonzero",)),
    ("relu2:2", ("'relu2' takes no parameters",)),
    ("swish", ("unknown activation 'swish'", "valid: swiglu", "'gptoss:<alpha>:<limit>'")),
])
def test_bad_spec_error_names_activation_and_form(spec, fragments):
    with pytest.raises(ValueError) as info:
        parse_activation(spec)
    msg = str(info.value)
    assert "could not convert" not in msg
    for f in fragments:
        assert f in msg, (f, msg)


def test_bad_spec_error_through_the_op():
    """The op validates the spec before anything else and surfaces the same message."""
    x = torch.randn(2, 4)
    ids = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"activation 'gptoss:abc:def': alpha 'abc' is not a number"):
        fused_moe(x, ids, ids, torch.ones(2), torch.randn(1, 8, 4), torch.randn(1, 4, 4),
                  activation="gptoss:abc:def", impl="torch")


def test_good_specs_round_trip():
    for spec in ("gptoss:1.702:7.0", "swiglu_limit:10.0", "swiglu_limit_after:7.0", "softcap_swiglu:4.0:25.0",
                 "relu2", "swiglu"):
        act = parse_activation(spec)
        assert act.spec == spec and parse_activation(act.spec) == act
    assert parse_activation("gptoss:1:7").spec == "gptoss:1.0:7.0"
    assert math.isclose(parse_activation("softcap_swiglu:4:25").alpha, 4.0)
