"""GLU experts whose fused gate|up output has the UP half first and the gate half second (rxlm's
``GatedLinearUnit``: ``lin, gate = fc(x).chunk(2, -1); lin * act(gate)``).

The activation spec ``"<kind>+up_first"`` (``moe_inductor.ops.activations``) names that layout of the
fused weight (no column copy); ``patterns.common.gate_up_halves`` reads the halves in either order.
Here: the spelling rewritten and exact (output and every gradient vs eager) in a per-expert
ModuleList loop and in stacked weights gathered per assignment, fp32 and bf16, with and without a
fused bias (and the dense-slots and boolean-mask compositions); look-alikes computing something else not rewritten; the op called directly with
``"swiglu+up_first"`` (PyTorch path, and the Triton kernels under TRITON_INTERPRET=1) against an
independent float64 loop; the spec's parsing and its errors.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from moe_inductor.ops.activations import parse_activation
from rewrite_check import rewrite_and_compare, fused_activations

E, K, d, n = 4, 2, 16, 8


def _route(gate: nn.Linear, x):
    w, ids = torch.topk(F.softmax(gate(x), dim=-1, dtype=torch.float), K, dim=-1)
    return (w / w.sum(-1, keepdim=True)).to(x.dtype), ids


def _product(h, form: str):
    """The GLU of h (.., 2n) as ``form`` spells it; the near misses compute something else."""
    lin, gate = h.chunk(2, dim=-1)
    if form == "up_first":  # rxlm: the activation on the second half
        return lin * F.silu(gate)
    if form == "up_first_commuted":
        return F.silu(gate) * lin
    if form == "up_first_split":
        a, b = h.split(h.shape[-1] // 2, dim=-1)
        return a * F.silu(b)
    if form == "up_first_slices":
        half = h.shape[-1] // 2
        return h[..., :half] * F.silu(h[..., half:])
    # near misses
    if form == "same_half":  # act(a) * a
        return F.silu(gate) * gate
    if form == "both_activated":  # act(first) * act(second)
        return F.silu(lin) * F.silu(gate)
    raise ValueError(form)


class GLUExpert(nn.Module):
    """rxlm's ``GatedLinearUnit`` followed by the down projection; ``other``: the second factor is the
    first half of ANOTHER projection (halves of different tensors: a near miss)."""

    def __init__(self, form: str, bias: bool, other: bool = False):
        super().__init__()
        self.form, self.other = form, other
        self.fc = nn.Linear(d, 2 * n, bias=bias)
        self.fc_other = nn.Linear(d, 2 * n, bias=bias) if other else None
        self.out = nn.Linear(n, d, bias=bias)

    def forward(self, x):
        h = self.fc(x)
        if self.other:
            lin = self.fc_other(x).chunk(2, dim=-1)[0]
            return self.out(lin * F.silu(h.chunk(2, dim=-1)[1]))
        return self.out(_product(h, self.form))


class LoopGLU(nn.Module):
    """A per-expert loop over a ModuleList of GLU experts (transformers' Mixtral-style loop)."""

    def __init__(self, form="up_first", bias=False, other=False, dtype=torch.float32):
        super().__init__()
        self.gate = nn.Linear(d, E, bias=False)
        self.experts = nn.ModuleList(GLUExpert(form, bias, other) for _ in range(E))
        self.to(dtype)
        self.dtype = dtype

    def forward(self, x):
        x = x.to(self.dtype)
        w, ids = _route(self.gate, x)
        out = torch.zeros_like(x)
        for e in range(E):
            tok, k = torch.where(ids == e)
            out.index_add_(0, tok, self.experts[e](x[tok]) * w[tok, k, None])
        return out.float()


class GatheredGLU(nn.Module):
    """Stacked weights gathered per assignment (transformers' batched_mm experts): one row per
    assignment, ``W13[ids] @ row``, the GLU, ``W2[ids] @ a``, rows folded back per token."""

    def __init__(self, form="up_first", dtype=torch.float32):
        super().__init__()
        self.form = form
        self.gate = nn.Linear(d, E, bias=False)
        self.w13 = nn.Parameter(torch.randn(E, 2 * n, d) / d**0.5)
        self.w2 = nn.Parameter(torch.randn(E, d, n) / n**0.5)
        self.to(dtype)
        self.dtype = dtype

    def forward(self, x):
        x = x.to(self.dtype)
        T = x.shape[0]
        w, ids = _route(self.gate, x)
        flat = ids.reshape(-1)
        rows = x.repeat_interleave(K, dim=0)
        h = torch.bmm(self.w13[flat], rows.unsqueeze(-1)).squeeze(-1)
        a = _product(h, self.form)
        y = torch.bmm(self.w2[flat], a.unsqueeze(-1)).squeeze(-1) * w.reshape(-1).unsqueeze(-1)
        return y.view(T, K, d).sum(1).float()


class DenseSlotsGLU(nn.Module):
    """Every token in every expert's slots, inputs scaled by a dense (T, E) score matrix that is 0 off
    the top-k, outputs summed over the experts (transformers 5.x ``Llama4TextMoe``, written out), with
    the GLU's up half FIRST: the dense dispatch drops the unselected (expert, token) pairs only when the
    expert maps 0 to 0, which ``act(gate) * up`` does in either layout."""

    def __init__(self):
        super().__init__()
        self.router = nn.Linear(d, E, bias=False)
        self.gate_up_proj = nn.Parameter(torch.randn(E, d, 2 * n) / d**0.5)
        self.down_proj = nn.Parameter(torch.randn(E, n, d) / n**0.5)

    def forward(self, x):
        logits = self.router(x)
        top_v, top_i = torch.topk(logits, K, dim=1)
        R = torch.zeros_like(logits).scatter(dim=1, index=top_i, src=F.softmax(top_v, dim=-1))
        routed_in = x.repeat(E, 1) * R.transpose(0, 1).reshape(-1, 1)
        h = torch.bmm(routed_in.view(E, -1, d), self.gate_up_proj)
        up, gate = h.chunk(2, dim=-1)
        y = torch.bmm(up * F.silu(gate), self.down_proj).view(-1, d)
        return y.reshape(E, -1, d).sum(dim=0)


def _statuses(cands):
    return [(c.status, c.reason) for c in cands]


def _tol(dtype):
    return 1e-4 if dtype == torch.float32 else 3e-2


def _assert_up_first_rewritten(cands):
    assert cands and all(c.status == "rewritten" for c in cands), _statuses(cands)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("form", ["up_first", "up_first_commuted", "up_first_split", "up_first_slices"])
def test_loop_of_up_first_glu_experts_rewritten(form, bias, dtype):
    torch.manual_seed(0)
    _assert_up_first_rewritten(rewrite_and_compare(LoopGLU(form, bias, dtype=dtype), d, tol=_tol(dtype)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("form", ["up_first", "up_first_commuted"])
def test_gathered_up_first_glu_rewritten(form, dtype):
    torch.manual_seed(0)
    _assert_up_first_rewritten(rewrite_and_compare(GatheredGLU(form, dtype=dtype), d, tol=_tol(dtype)))


def test_dense_slots_up_first_rewritten():
    torch.manual_seed(0)
    _assert_up_first_rewritten(rewrite_and_compare(DenseSlotsGLU(), d))


def test_mask_dispatch_up_first_rewritten():
    """Research-code top-1 boolean-mask dispatch (``out[idx == e] = w * experts[e](x[idx == e])``)."""
    from moe_modules import MaskDispatchMoE

    torch.manual_seed(0)
    m = MaskDispatchMoE(d=d, n=n, E=E, expert=lambda d_, n_: GLUExpert("up_first", bias=True))
    _assert_up_first_rewritten(rewrite_and_compare(m, d))


def test_the_recognised_activation_is_up_first():
    """The expert description carries the layout: the op is called with ``"swiglu+up_first"``."""
    torch.manual_seed(0)
    specs, cands = fused_activations(LoopGLU(), torch.randn(6, d))
    assert [c.status for c in cands] == ["rewritten"], _statuses(cands)
    assert specs == ["swiglu+up_first"], specs


@pytest.mark.parametrize("module", [
    lambda: LoopGLU("same_half"),
    lambda: LoopGLU("both_activated"),
    lambda: LoopGLU(other=True),
    lambda: GatheredGLU("same_half"),
    lambda: GatheredGLU("both_activated"),
], ids=["loop_same_half", "loop_both_activated", "loop_halves_of_two_tensors", "gathered_same_half",
        "gathered_both_activated"])
def test_near_misses_not_rewritten(module):
    torch.manual_seed(0)
    cands = rewrite_and_compare(module(), d)  # equal to eager whatever happens
    assert not any(c.status == "rewritten" for c in cands), _statuses(cands)


# --------------------------------------------------------------------------- the op called directly
def _naive_up_first(x, tok, eid, s, w1, w2, b1, b2, act=F.silu):
    """Independent float64 loop: h = x W1[e]^T + b1[e]; up, gate = h's halves; act(gate) * up."""
    x, w1, w2, s = x.double(), w1.double(), w2.double(), s.double()
    out = torch.zeros_like(x)
    for a in range(tok.shape[0]):
        t, e = int(tok[a]), int(eid[a])
        h = w1[e] @ x[t] + (b1[e].double() if b1 is not None else 0)
        up, gate = h[: h.shape[0] // 2], h[h.shape[0] // 2:]
        y = w2[e] @ (act(gate) * up) + (b2[e].double() if b2 is not None else 0)
        out = out.index_add(0, torch.tensor([t]), (s[a] * y)[None])
    return out


def _case(bias: bool, dtype, seed=0, T=9, n_=8, d_=12):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d_, generator=g)
    tok = torch.arange(T).repeat_interleave(K)
    eid = torch.randint(0, E, (T * K,), generator=g)
    eid[3] = -1  # one dropped assignment
    s = torch.rand(T * K, generator=g)
    w1 = torch.randn(E, 2 * n_, d_, generator=g) / d_**0.5
    w2 = torch.randn(E, d_, n_, generator=g) / n_**0.5
    b1 = torch.randn(E, 2 * n_, generator=g) * 0.5 if bias else None
    b2 = torch.randn(E, d_, generator=g) * 0.5 if bias else None
    leaves = [t.to(dtype) if t is not None else None for t in (x, w1, w2, b1, b2)]
    return tok, eid, s, leaves


def _op_vs_naive(impl: str, bias: bool, dtype, tol: float):
    from moe_inductor.ops.op import fused_moe

    tok, eid, s, (x, w1, w2, b1, b2) = _case(bias, dtype)
    keep = eid >= 0
    inputs = [t for t in (x, s, w1, w2, b1, b2) if t is not None]
    outs = []
    for fn in ("op", "naive"):
        leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
        lx, ls, lw1, lw2, *lb = leaves
        lb1, lb2 = lb if lb else (None, None)
        if fn == "op":
            y = fused_moe(lx, tok, eid, ls, lw1, lw2, lb1, lb2, activation="swiglu+up_first", impl=impl)
        else:  # the dropped assignment adds nothing
            y = _naive_up_first(lx, tok[keep], eid[keep], ls[keep], lw1, lw2, lb1, lb2)
        g = torch.Generator().manual_seed(1)
        y.double().mul(torch.randn(y.shape, generator=g, dtype=torch.float64)).sum().backward()
        outs.append([y.detach()] + [t.grad for t in leaves])
    names = ["out", "dx", "dscores", "dw1", "dw2", "db1", "db2"]
    for name, got, want in zip(names, *outs):
        assert got is not None and want is not None, name
        scale = max(want.abs().max().item(), 1.0)
        err = (got.double() - want.double()).abs().max().item()
        assert err <= tol * scale, f"{impl} {name}: max abs error {err:.3e} > {tol} * {scale:.3g}"


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_op_up_first_matches_naive_loop(bias):
    _op_vs_naive("torch", bias, torch.float32, 1e-5)


@pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                    reason="Triton kernels need CUDA or TRITON_INTERPRET=1 (tests/conftest.py sets it)")
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_triton_kernels_up_first_interpreted(bias):
    """The kernels' UP_FIRST column swap: forward and every gradient (x, scores, w1, w2, b1, b2)
    against the float64 loop (tiny shapes: the interpreter is slow)."""
    pytest.importorskip("triton")
    from moe_inductor.kernels import launch_utils

    old = launch_utils.DEBUG_FILL_NAN
    launch_utils.DEBUG_FILL_NAN = True  # a column the swap forgets to write fails the comparison
    try:
        _op_vs_naive("triton", bias, torch.float32, 1e-4)
    finally:
        launch_utils.DEBUG_FILL_NAN = old


def test_op_rejects_up_first_on_a_plain_activation():
    from moe_inductor.ops.op import fused_moe

    tok, eid, s, (x, w1, w2, _, _) = _case(False, torch.float32)
    with pytest.raises(Exception, match=r"'\+up_first' needs a gated activation"):
        fused_moe(x, tok, eid, s, w1[:, :8], w2, activation="relu+up_first", impl="torch")


# --------------------------------------------------------------------------- the spec
@pytest.mark.parametrize("spec", ["swiglu+up_first", "geglu_tanh+up_first", "gptoss:1.702:7.0+up_first",
                                  "softcap_swiglu:30.0:20.0+up_first", "swiglu_limit:7.0+up_first"])
def test_up_first_spec_round_trips(spec):
    act = parse_activation(spec)
    assert act.up_first and act.gated and act.spec == spec and parse_activation(act.spec) == act
    assert not parse_activation(spec.split("+")[0]).up_first


@pytest.mark.parametrize("spec, message", [
    ("relu+up_first", "needs a gated activation"),
    ("silu+up_first", "needs a gated activation"),
    ("swiglu+gate_first", "unknown suffix '\\+gate_first'"),
    ("swiglu+", "unknown suffix"),
    ("swiglu+up_first+up_first", "unknown suffix"),
])
def test_up_first_spec_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_activation(spec)


def test_exponent_sign_is_not_a_suffix():
    assert parse_activation("gptoss:1e+1:7.0+up_first") == parse_activation("gptoss:10.0:7.0+up_first")
