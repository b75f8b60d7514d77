"""Three-factor experts (issue 18): OpenMoE's ``down(swiglu_act_fn(gate(z)) * up(z))`` where
``swiglu_act_fn`` splits gate's 2n columns into x1, x2 and returns ``x1 * silu(x2)``: the hidden rows are
``x1 * silu(x2) * up``, three projections of the same rows.

The fused op's activation ``"swiglu3"`` (``moe_inductor.ops.activations``) takes H = [x1 | x2 | up] (3n
columns): the first projection's weight is gate's (2n, d) rows with up's (n, d) below them, as for a gated
kind with separate weights (the per-expert lists need no copy; stacked weights a ``cat`` autograd
differentiates). ``patterns.experts.three_factors`` reads the product in any order and grouping, x1 / x2
as the halves of one projection (split, chunk, slices).

Here: the spelling rewritten and exact (output and every gradient vs eager) in a per-expert ModuleList
loop (with and without biases) and in OpenMoE's expert slots, fp32 and bf16; near misses (the third
factor not a projection, up on other rows, gelu, x1 / x2 swapped, halves of another projection) not
rewritten, with their reasons; the op called directly with "swiglu3" (PyTorch path, and the Triton
kernels under TRITON_INTERPRET=1 when triton is installed) against an independent float64 loop; the
op's shape error; the activation's hand-written backward against autograd.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from moe_inductor.ops.activations import act_backward, act_forward, parse_activation
from rewrite_check import rewrite_and_compare, fused_activations

E, K, d, n = 4, 2, 16, 8


def _hidden(h, u, z, form: str):
    """The expert's hidden rows from gate's output h (.., 2n), up's output u (.., n) and the expert's
    input z, as ``form`` spells them; the near misses compute something else."""
    x1, x2 = torch.split(h, n, -1)
    if form == "split":  # OpenMoE's swiglu_act_fn(gate(z)) * up(z)
        return x1 * (x2 * torch.sigmoid(x2)) * u
    if form == "chunk_reordered":
        a, b = h.chunk(2, dim=-1)
        return u * (F.silu(b) * a)
    if form == "slices":
        return h[..., :n] * u * F.silu(h[..., n:])
    # near misses
    if form == "not_projection":  # the third factor is the first columns of the input, not a projection
        return x1 * F.silu(x2) * z[..., :n]
    if form == "gelu":
        return x1 * F.gelu(x2) * u
    if form == "swapped":  # the activation on the FIRST half: x2 * silu(x1) * up
        return x2 * F.silu(x1) * u
    raise ValueError(form)


class TripleExpert(nn.Module):
    """``down(x1 * silu(x2) * up(z))``; ``other_rows``: up reads the rows in reverse order (a near miss)."""

    def __init__(self, form: str, bias: bool = False, other_rows: bool = False):
        super().__init__()
        self.form, self.other_rows = form, other_rows
        self.gate_proj = nn.Linear(d, 2 * n, bias=bias)
        self.up_proj = nn.Linear(d, n, bias=bias)
        self.down_proj = nn.Linear(n, d, bias=bias)

    def forward(self, z):
        u = self.up_proj(z.flip(0) if self.other_rows else z)
        return self.down_proj(_hidden(self.gate_proj(z), u, z, self.form))


class LoopTriple(nn.Module):
    """A per-expert loop over a ModuleList (transformers' Mixtral-style ``index_add_``)."""

    def __init__(self, form="split", bias=False, other_rows=False, dtype=torch.float32):
        super().__init__()
        self.gate = nn.Linear(d, E, bias=False)
        self.experts = nn.ModuleList(TripleExpert(form, bias, other_rows) for _ in range(E))
        self.to(dtype)
        self.dtype = dtype

    def forward(self, x):
        x = x.to(self.dtype)
        w, ids = torch.topk(F.softmax(self.gate(x), dim=-1, dtype=torch.float), K, dim=-1)
        w = (w / w.sum(-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        for e in range(E):
            tok, k = torch.where(ids == e)
            out.index_add_(0, tok, self.experts[e](x[tok]) * w[tok, k, None])
        return out.float()


def _statuses(cands):
    return [(c.status, c.reason) for c in cands]


def _tol(dtype):
    return 1e-4 if dtype == torch.float32 else 3e-2


def _rewritten(cands):
    assert cands and all(c.status == "rewritten" for c in cands), _statuses(cands)


@pytest.mark.parametrize("form, bias, dtype", [
    pytest.param("split", False, torch.float32, id="split-fp32"),
    pytest.param("split", False, torch.bfloat16, id="split-bf16"),
    pytest.param("chunk_reordered", True, torch.float32, id="chunk_reordered-bias-fp32"),
    pytest.param("chunk_reordered", True, torch.bfloat16, id="chunk_reordered-bias-bf16"),
    pytest.param("slices", False, torch.float32, id="slices-fp32")])
def test_loop_of_three_factor_experts_rewritten(form, bias, dtype):
    torch.manual_seed(0)
    _rewritten(rewrite_and_compare(LoopTriple(form, bias, dtype=dtype), d, tol=_tol(dtype)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_openmoe_slots_three_factor_experts_rewritten(dtype):
    """OpenMoE's own composition (ColossalAI MLPExperts over capacity slots), the experts of its port."""
    from test_openmoe_spellings import OpenMoeSlots

    torch.manual_seed(0)
    _rewritten(rewrite_and_compare(OpenMoeSlots(("colossal",), "triple", dtype=dtype), d, lengths=(8, 12),
                                   tol=_tol(dtype)))


class DenseSlotsTriple(nn.Module):
    """Every token in every expert's slots, inputs scaled by a dense (T, E) score matrix that is 0 off the
    top-k, outputs summed over the experts (transformers 5.x ``Llama4TextMoe`` written out), stacked
    three-factor experts: the dense dispatch drops the unselected (expert, token) pairs only because
    x1 * silu(x2) * up maps 0 to 0 (no biases)."""

    def __init__(self):
        super().__init__()
        self.router = nn.Linear(d, E, bias=False)
        self.gate_proj = nn.Parameter(torch.randn(E, d, 2 * n) / d**0.5)
        self.up_proj = nn.Parameter(torch.randn(E, d, n) / d**0.5)
        self.down_proj = nn.Parameter(torch.randn(E, n, d) / n**0.5)

    def forward(self, x):
        logits = self.router(x)
        top_v, top_i = torch.topk(logits, K, dim=1)
        R = torch.zeros_like(logits).scatter(dim=1, index=top_i, src=F.softmax(top_v, dim=-1))
        routed_in = (x.repeat(E, 1) * R.transpose(0, 1).reshape(-1, 1)).view(E, -1, d)
        x1, x2 = torch.bmm(routed_in, self.gate_proj).chunk(2, dim=-1)
        hid = x1 * F.silu(x2) * torch.bmm(routed_in, self.up_proj)
        return torch.bmm(hid, self.down_proj).view(-1, d).reshape(E, -1, d).sum(dim=0)


def test_dense_slots_three_factor_experts_rewritten():
    torch.manual_seed(0)
    _rewritten(rewrite_and_compare(DenseSlotsTriple(), d))


def test_the_recognised_activation_is_swiglu3():
    torch.manual_seed(0)
    specs, cands = fused_activations(LoopTriple(), torch.randn(6, d))
    assert [c.status for c in cands] == ["rewritten"], _statuses(cands)
    assert specs == ["swiglu3"]


@pytest.mark.parametrize("form, other_rows, reason", [
    ("not_projection", False, "is not a projection"),  # x1 * silu(x2) * z[:, :n]
    ("split", True, "different rows"),  # up(z.flip(0)): the factors' rows differ
    ("gelu", False, "silu(x2) * up only"),  # x1 * gelu(x2) * up: not an activation of the op
    ("swapped", False, "not the first and second halves"),  # x2 * silu(x1) * up
])
def test_three_factor_near_misses_not_rewritten(form, other_rows, reason):
    torch.manual_seed(0)
    cands = rewrite_and_compare(LoopTriple(form, other_rows=other_rows), d, lengths=(6,))
    assert cands and all(c.status != "rewritten" for c in cands), _statuses(cands)
    assert any(reason in (c.reason or "") for c in cands), _statuses(cands)


class OtherHalves(nn.Module):
    """x1 the first half of ANOTHER projection than x2's: ``a(z)[:, :n] * silu(g(z)[:, n:]) * up(z)``."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(d, E, bias=False)
        self.a, self.g = nn.Linear(d, 2 * n, bias=False), nn.Linear(d, 2 * n, bias=False)
        self.up, self.down = nn.Linear(d, n, bias=False), nn.Linear(n, d, bias=False)

    def forward(self, x):
        w, ids = torch.topk(F.softmax(self.gate(x), dim=-1), 1, dim=-1)
        out = torch.zeros_like(x)
        for e in range(E):
            tok, k = torch.where(ids == e)
            z = x[tok]
            hid = self.a(z)[:, :n] * F.silu(self.g(z)[:, n:]) * self.up(z)
            out.index_add_(0, tok, self.down(hid) * w[tok, k, None])
        return out


def test_halves_of_different_projections_not_rewritten():
    torch.manual_seed(0)
    cands = rewrite_and_compare(OtherHalves(), d, lengths=(6,))
    assert cands and all(c.status != "rewritten" for c in cands), _statuses(cands)
    assert any("not the first and second halves" in (c.reason or "") for c in cands), _statuses(cands)


# --------------------------------------------------------------------------- the op itself

def _naive(x, tok, ex, sc, wg, wu, wd):
    """float64 loop, written from the formula: y[t] += s * down(x1 * silu(x2) * up(x[t]))."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    for a in range(tok.shape[0]):
        t, e = int(tok[a]), int(ex[a])
        x1, x2 = (x[t].double() @ wg[e].double().t()).split(n)
        hid = x1 * (x2 / (1 + torch.exp(-x2))) * (x[t].double() @ wu[e].double().t())
        out[t] = out[t] + sc[a].double() * (hid @ wd[e].double().t())
    return out


def _case(dtype=torch.float64, requires_grad=True):
    g = torch.Generator().manual_seed(3)
    T, A = 6, 9

    def r(*s):
        return (torch.randn(*s, generator=g, dtype=torch.float64) / 2).to(dtype).requires_grad_(requires_grad)
    tok = torch.tensor([0, 1, 2, 3, 4, 5, 0, 2, 5], dtype=torch.int32)
    ex = torch.tensor([0, 1, 2, 3, 1, 2, 1, 1, 0], dtype=torch.int32)
    return (r(T, d), tok, ex, r(A), [r(2 * n, d) for _ in range(E)], [r(n, d) for _ in range(E)],
            [r(d, n) for _ in range(E)])


def _grads(out, inputs, g):
    return torch.autograd.grad(out, inputs, g)


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("stacked", [False, True], ids=["lists", "stacked"])
def test_op_matches_a_float64_loop(stacked, impl, monkeypatch):
    from moe_inductor.ops.op import fused_moe, fused_moe_experts

    if impl == "triton":
        pytest.importorskip("triton")
        if not parse_activation("swiglu3").triton:
            pytest.skip("swiglu3 has no Triton epilogue")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    dtype = torch.float64 if impl == "torch" else torch.float32
    x, tok, ex, sc, wg, wu, wd = _case(dtype)
    if stacked:
        w1 = torch.stack([torch.cat((a, b)) for a, b in zip(wg, wu)])
        y = fused_moe(x, tok, ex, sc, w1, torch.stack(wd), activation="swiglu3", impl=impl)
        leaves = [x, sc, w1]
    else:
        y = fused_moe_experts(x, tok, ex, sc, wg, wd, w_up=wu, activation="swiglu3", impl=impl)
        leaves = [x, sc] + wg + wu + wd
    y = y[0] if isinstance(y, tuple) else y
    ref_in = [t.detach().double().requires_grad_() for t in (x, sc)]
    ref_w = [[t.detach().double().requires_grad_() for t in ws] for ws in (wg, wu, wd)]
    want = _naive(ref_in[0], tok, ex, ref_in[1], *ref_w)
    tol = dict(atol=1e-10, rtol=1e-10) if dtype == torch.float64 else dict(atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(y.double(), want, **tol)
    g = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    got = _grads(y, leaves, g.to(y.dtype))
    ref_leaves = ref_in + [t for ws in ref_w for t in ws]
    wanted = _grads(want, ref_leaves, g)
    if stacked:
        wanted = wanted[:2] + (torch.stack([torch.cat((a, b)) for a, b in zip(wanted[2:6], wanted[6:10])]),)
        got = got[:3]
    for a, b in zip(got, wanted):
        torch.testing.assert_close(a.double(), b, **tol)


def test_op_rejects_a_first_projection_of_another_width():
    from moe_inductor.ops.op import fused_moe, fused_moe_experts

    x, tok, ex, sc, wg, wu, wd = _case(torch.float32, requires_grad=False)
    w1 = torch.stack(wg)  # 2n rows: the up rows are missing
    with pytest.raises(ValueError, match=r"expected \(E, 3n, d\)"):
        fused_moe(x, tok, ex, sc, w1, torch.stack(wd), activation="swiglu3")
    with pytest.raises(ValueError, match="twice w_up's rows"):
        fused_moe_experts(x, tok, ex, sc, wu, wd, w_up=wu, activation="swiglu3")
    w1 = torch.stack([torch.cat((a, b)) for a, b in zip(wg, wu)])
    for impl in ("torch", "triton"):  # the kernels would read concatenated blocks: refused, not misread
        with pytest.raises(ValueError, match="interleaved=True is not a layout"):
            fused_moe(x, tok, ex, sc, w1, torch.stack(wd), activation="swiglu3", interleaved=True, impl=impl)
    with pytest.raises(ValueError, match="needs a gated activation"):
        parse_activation("swiglu3+up_first")


def test_activation_backward_matches_autograd():
    act = parse_activation("swiglu3")
    assert act.width == 3 and not act.gated
    h = torch.randn(5, 3 * n, dtype=torch.float64, requires_grad=True)
    da = torch.randn(5, n, dtype=torch.float64)
    (want,) = torch.autograd.grad(act_forward(h, act, False), h, da)
    torch.testing.assert_close(act_backward(h.detach(), da, act, False), want)
    x1, x2, u = h.detach().split(n, -1)
    torch.testing.assert_close(act_forward(h.detach(), act, False), x1 * F.silu(x2) * u)
    with pytest.raises(ValueError, match="3n concatenated columns"):
        act_forward(h.detach(), act, True)


@pytest.mark.parametrize("keep_h", [True, False], ids=["keep_h", "recompute_h"])
def test_triton_kernels_with_dropped_assignments(keep_h):
    """The Triton kernels (TRITON_INTERPRET=1) against tests/test_kernels.py's independent float64 MoE,
    with two assignments dropped (expert id -1: their rows of the kept H, all three blocks, are zeros)."""
    pytest.importorskip("triton")
    from test_kernels import make_case, run_and_compare

    c = make_case(T=9, E=3, K=2, d=24, n=12, act="swiglu3", bias=True, poison=False)
    c.expert_ids[[1, 6]] = -1
    run_and_compare(c, keep_h=keep_h)
