"""Triton kernels of the fused MoE op against the PyTorch reference.

On machines without CUDA, tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported, so
every kernel runs on CPU tensors through the interpreter (~1000x slower than a GPU): shapes stay
tiny (T <= 150, d <= 136, n <= 264, E <= 512, K <= 16), which still exercises masking, multi-tile
experts, several K steps and column blocks, empty experts, gathers and every epilogue, with the
interpreter's small tile config and (test_gpu_tile_configs_interpreted) each GPU autotune config.
Also here: no host sync at the ATen dispatch level, the impl='auto' fallback with its log line,
the saved-activation set of the Triton path vs the PyTorch path, fp32 without tf32, the interpreter
smoke run of examples/bench_kernels.py. GPU-scale checks are marked ``gpu`` and skip without CUDA.

Every output and gradient (out, h_sorted, order, dx, dscores, dw1, dw2, db1, db2) is compared,
with per-dtype tolerances relative to the reference's magnitude (SonicMoE's test tolerances for
bf16: 1.4e-2 forward, 2e-2 gradients). Fresh kernel buffers are NaN-filled (launch_utils debug
flag), so a row or column a kernel forgets to write fails the comparison.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moe_inductor.ops import reference
from moe_inductor.ops.activations import parse_activation
from moe_inductor.kernels import triton_moe_backward, triton_moe_forward, unsupported_reason
from moe_inductor.ops.op import fused_moe

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
pytestmark = pytest.mark.skipif(
    not HAS_CUDA and os.environ.get("TRITON_INTERPRET") != "1",
    reason="Triton kernels need CUDA or TRITON_INTERPRET=1 (tests/conftest.py sets it without CUDA)",
)

FWD_TOL = {torch.float32: 1e-4, torch.bfloat16: 1.4e-2, torch.float16: 1e-2}
GRAD_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 1e-2}


@pytest.fixture(autouse=True)
def _nan_filled_buffers(monkeypatch):
    from moe_inductor.kernels import launch_utils

    monkeypatch.setattr(launch_utils, "DEBUG_FILL_NAN", True)


@dataclass
class Case:
    x: torch.Tensor
    token_ids: torch.Tensor
    expert_ids: torch.Tensor
    scores: torch.Tensor
    w1: torch.Tensor
    w2: torch.Tensor
    b1: Optional[torch.Tensor]
    b2: Optional[torch.Tensor]
    act: object
    interleaved: bool
    grad_out: torch.Tensor


def topk_routing(T, E, K, allowed=None, gen=None):
    logits = torch.randn(T, E, generator=gen)
    if allowed is not None:  # experts outside `allowed` receive no tokens at all
        mask = torch.full((E,), float("-inf"))
        mask[list(allowed)] = 0.0
        logits = logits + mask
    probs, experts = logits.softmax(-1).topk(K, dim=-1)
    token_ids = torch.arange(T).repeat_interleave(K)
    return token_ids, experts.flatten(), probs.flatten()


def general_routing(T, E, gen):
    """Token-rounding style routing: tokens with 0, 1 or 3 experts, assignments in shuffled order."""
    toks, exps = [], []
    for t in range(T):
        k = (0, 1, 3)[t % 3]  # token 0 has no expert at all
        for e in torch.randperm(E, generator=gen)[:k].tolist():
            toks.append(t)
            exps.append(e)
    perm = torch.randperm(len(toks), generator=gen)
    token_ids = torch.tensor(toks)[perm]
    expert_ids = torch.tensor(exps)[perm]
    scores = torch.rand(len(toks), generator=gen)
    return token_ids, expert_ids, scores


def make_case(T=16, d=32, n=16, E=4, K=2, dtype=torch.float32, act="swiglu", interleaved=False, bias=False,
              transposed=False, routing="topk", allowed=None, index_dtype=torch.int64, seed=0, poison=True) -> Case:
    """A random case. ``poison``: what no kernel may read is NaN, so a read shows up as NaN in the
    results: the weights and biases of experts no assignment uses, and the rows of X and of the
    output gradient of tokens routed to no expert."""
    gen = torch.Generator().manual_seed(seed)
    a = parse_activation(act)
    h_cols = a.width * n
    x = torch.randn(T, d, generator=gen)
    if transposed:  # storage (E, d, H) / (E, n, d) as some checkpoints keep it; kernels see views
        w1 = (torch.randn(E, d, h_cols, generator=gen) / d**0.5).transpose(1, 2)
        w2 = (torch.randn(E, n, d, generator=gen) / n**0.5).transpose(1, 2)
    else:
        w1 = torch.randn(E, h_cols, d, generator=gen) / d**0.5
        w2 = torch.randn(E, d, n, generator=gen) / n**0.5
    b1 = torch.randn(E, h_cols, generator=gen) * 0.5 if bias else None
    b2 = torch.randn(E, d, generator=gen) * 0.5 if bias else None
    if routing == "general":
        token_ids, expert_ids, scores = general_routing(T, E, gen)
    else:
        token_ids, expert_ids, scores = topk_routing(T, E, K, allowed, gen)
    grad_out = torch.randn(T, d, generator=gen)
    if poison:
        poison_unread(token_ids, expert_ids, x, grad_out, w1, w2, b1, b2)

    def dev(t, dt=dtype):
        return None if t is None else t.to(device=DEVICE, dtype=dt)

    return Case(
        dev(x), dev(token_ids, index_dtype), dev(expert_ids, index_dtype), dev(scores, torch.float32),
        dev(w1), dev(w2), dev(b1), dev(b2), a, interleaved, dev(grad_out),
    )


def poison_unread(token_ids, expert_ids, x, grad_out, w1, w2, b1=None, b2=None):
    """NaN (in place) into the rows of x / grad_out of tokens without an assignment and into the
    weights and biases of experts without one: inputs that no kernel may read."""
    nan = float("nan")
    routed = torch.zeros(x.shape[0], dtype=torch.bool)
    routed[token_ids[expert_ids >= 0].long()] = True
    x[~routed] = nan
    grad_out[~routed] = nan
    used = torch.zeros(w1.shape[0], dtype=torch.bool)
    used[expert_ids[expert_ids >= 0].long()] = True
    for w in (w1, w2, b1, b2):
        if w is not None:
            w[~used] = nan


def assert_close_scaled(name, got, want, tol, dtype=None):
    """max |got - want| <= tol * max(|want|.max(), 1); got must have `dtype` (default: want's)."""
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert got.dtype == (dtype or want.dtype), f"{name}: dtype {got.dtype} != {dtype or want.dtype}"
    if want.numel() == 0:
        return
    assert torch.isfinite(got).all(), f"{name}: non-finite values (a buffer left unwritten?)"
    scale = max(want.abs().max().item(), 1.0)
    err = (got.double() - want.double()).abs().max().item()
    assert err <= tol * scale, f"{name}: max abs error {err:.3e} > {tol:g} * scale {scale:.3g}"


# ---------------------------------------------------------------------------------------------
# The kernels' reference: an independent float64 MoE written here (one assignment at a time, the
# formulas of the activations spelled out again), differentiated by autograd. Nothing of
# moe_inductor.ops.reference / activations is reused, so a mistake shared by the kernels and the
# package's PyTorch path cannot cancel out.
# ---------------------------------------------------------------------------------------------
def _gelu64(z, tanh=False):
    if tanh:
        return 0.5 * z * (1 + torch.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3)))
    return 0.5 * z * (1 + torch.erf(z / math.sqrt(2)))


def _act64(h, act, interleaved):
    """act(h) of one row in float64, from the activation's documented formula."""
    unary = {"silu": lambda z: z * torch.sigmoid(z), "gelu": _gelu64, "gelu_tanh": lambda z: _gelu64(z, True),
             "relu": lambda z: torch.clamp(z, min=0), "relu2": lambda z: torch.clamp(z, min=0) ** 2}
    if act.kind in unary:
        return unary[act.kind](h)
    if act.kind == "swiglu3":  # H = [x1 | x2 | up]
        x1, x2, u = h.chunk(3)
        return x1 * (x2 * torch.sigmoid(x2)) * u
    first, second = (h[0::2], h[1::2]) if interleaved else (h[: h.shape[0] // 2], h[h.shape[0] // 2:])
    g, u = (second, first) if act.up_first else (first, second)
    lim = act.limit
    if act.kind == "gptoss":
        g, u = torch.clamp(g, max=lim), torch.clamp(u, -lim, lim)
        return g * torch.sigmoid(act.alpha * g) * (u + 1)
    if act.kind == "swiglu_limit":
        g = torch.clamp(g, max=lim)
        return g * torch.sigmoid(g) * torch.clamp(u, -lim, lim)
    if act.kind == "swiglu_limit_after":
        return torch.clamp(g * torch.sigmoid(g), max=lim) * torch.clamp(u, -lim, lim)
    if act.kind == "softcap_swiglu":
        cg, cu = act.alpha, act.limit
        return cg * torch.tanh(g / cg) * torch.sigmoid(g) * cu * torch.tanh(u / cu)
    gate_fn = {"swiglu": unary["silu"], "geglu": _gelu64, "geglu_tanh": lambda z: _gelu64(z, True)}[act.kind]
    return gate_fn(g) * u


def naive_moe64(c: Case):
    """(out, h_sorted, order, {grad name: gradient}) of the case in float64: out[t] = sum over the
    assignments a of token t of scores[a] * (W2[e] act(W1[e] x[t] + b1[e]) + b2[e]) (none for
    e = -1, a dropped assignment); h_sorted is H of the assignments in stable expert order
    (dropped ones first, zero rows); gradients by autograd against grad_out."""
    names = ("x", "scores", "w1", "w2", "b1", "b2")
    leaves = {k: getattr(c, k).detach().double().requires_grad_() for k in names if getattr(c, k) is not None}
    x, s, w1, w2 = leaves["x"], leaves["scores"], leaves["w1"], leaves["w2"]
    b1, b2 = leaves.get("b1"), leaves.get("b2")
    toks, exps = c.token_ids.tolist(), c.expert_ids.tolist()
    rows = [[] for _ in range(x.shape[0])]
    h_of = {}
    for a, (t, e) in enumerate(zip(toks, exps)):
        if e < 0:  # a dropped assignment (expert -1): no contribution, a zero row of H
            h_of[a] = torch.zeros(c.w1.shape[1], dtype=torch.float64)
            continue
        h = w1[e] @ x[t] + (b1[e] if b1 is not None else 0)
        y = w2[e] @ _act64(h, c.act, c.interleaved) + (b2[e] if b2 is not None else 0)
        rows[t].append(s[a] * y)
        h_of[a] = h
    zero = torch.zeros(x.shape[1], dtype=torch.float64)
    out = torch.stack([sum(r[1:], r[0]) if r else zero for r in rows])
    order = sorted(range(len(toks)), key=lambda a: exps[a])  # Python's sort is stable
    h_sorted = torch.stack([h_of[a] for a in order]) if order else torch.zeros(0, c.w1.shape[1], dtype=torch.float64)
    grads = torch.autograd.grad(out, list(leaves.values()), c.grad_out.double(), allow_unused=True)
    grads = {k: (g if g is not None else torch.zeros_like(leaves[k])) for k, g in zip(leaves, grads)}
    return out.detach(), h_sorted.detach(), torch.tensor(order, dtype=torch.int32), grads


# Tolerances against the float64 truth on the same (rounded) inputs: the relative error of the
# whole tensor, ||got - want|| / ||want||, and a per-element bound
# |got - want| <= ELEM_TOL * (|want| + max |want|) (an element may err by its own size's rounding
# plus that of the large terms it was summed from).
NORM_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}
ELEM_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def assert_close_to_truth(name, got, want, dtype, out_dtype=None):
    """got against the float64 truth `want`: relative norm and per-element bound of the compute
    dtype `dtype`; got must have `out_dtype` (default `dtype`; dscores are fp32 for every dtype)."""
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert got.dtype == (out_dtype or dtype), f"{name}: dtype {got.dtype} != {out_dtype or dtype}"
    if want.numel() == 0:
        return
    assert torch.isfinite(got).all(), f"{name}: non-finite values (an unwritten buffer, or a NaN input read)"
    err = got.double() - want
    norm = want.norm().item()
    if norm == 0:
        assert not err.any(), f"{name}: nonzero where the truth is all zeros"
        return
    rel = err.norm().item() / norm
    assert rel <= NORM_TOL[dtype], f"{name}: relative error {rel:.2e} > {NORM_TOL[dtype]:g}"
    bound = ELEM_TOL[dtype] * (want.abs() + want.abs().max())
    worst = (err.abs() / bound).max().item()
    assert worst <= 1, f"{name}: an element errs {worst:.2f}x its bound {ELEM_TOL[dtype]:g} * (|want| + max |want|)"


def run_and_compare(c: Case, keep_h=True):
    """Triton forward/backward vs autograd of the float64 naive MoE (naive_moe64) on the same,
    already rounded inputs: every output and gradient within NORM_TOL / ELEM_TOL of the truth
    (error vs truth, as SonicMoE's tests measure it, so the check does not depend on where two
    bf16 implementations happen to round). Inputs the kernels must not read are NaN (make_case)."""
    args = (c.x, c.token_ids, c.expert_ids, c.scores, c.w1, c.w2, c.b1, c.b2, c.act, c.interleaved)
    out, h, order = triton_moe_forward(*args, keep_h)
    r_out, r_h, r_order, r_grads = naive_moe64(c)
    dt = c.x.dtype
    assert order.dtype == torch.int32 and torch.equal(order, r_order), "order differs from the stable sort"
    assert_close_to_truth("out", out, r_out, dt)
    if keep_h:
        assert_close_to_truth("h_sorted", h, r_h, dt)
    bwd = (c.grad_out, c.x, c.token_ids, c.expert_ids, c.scores, c.w1, c.w2, c.b1, c.b2)
    grads = triton_moe_backward(*bwd, h if keep_h else None, order, c.act, c.interleaved)
    for name, g in zip(("x", "scores", "w1", "w2", "b1", "b2"), grads):
        if name not in r_grads:
            assert g is None, f"d{name}: expected None without bias"
        else:
            assert_close_to_truth(f"d{name}", g, r_grads[name], dt, c.scores.dtype if name == "scores" else dt)
    return out, grads


CASES = [
    # (kwargs, reason)
    pytest.param(dict(), id="fp32-swiglu-concat"),  # baseline: top-2 of 4, gate/up concatenated
    pytest.param(dict(act="geglu", interleaved=True), id="fp32-geglu-interleaved"),  # strided gate/up columns
    pytest.param(dict(act="gptoss:1.702:0.5", interleaved=True, bias=True, transposed=True),
                 id="fp32-gptoss-clamped"),  # GPT-OSS layout; limit 0.5 so both clamps are hit
    pytest.param(dict(act="geglu_tanh", bias=True, index_dtype=torch.int32), id="fp32-geglu_tanh-bias-int32"),
    pytest.param(dict(act="gelu", n=12), id="fp32-gelu-nongated"),  # non-gated, n not a block multiple
    pytest.param(dict(act="relu", transposed=True, d=24), id="fp32-relu-transposed"),  # d not a block multiple
    pytest.param(dict(dtype=torch.bfloat16), id="bf16-swiglu"),  # the training dtype
    pytest.param(dict(dtype=torch.bfloat16, act="gptoss:1.702:7.0", interleaved=True, bias=True, transposed=True),
                 id="bf16-gptoss-bias-transposed"),  # GPT-OSS as shipped
    pytest.param(dict(dtype=torch.float16, act="geglu_tanh"), id="fp16-geglu_tanh"),
    pytest.param(dict(dtype=torch.bfloat16, act="silu"), id="bf16-silu-nongated"),
    pytest.param(dict(E=8, K=2, allowed=(1, 6)), id="fp32-empty-experts"),  # 6 of 8 experts get no token
    pytest.param(dict(T=1, E=8, K=4, bias=True), id="fp32-T1"),  # decode: one token
    pytest.param(dict(E=4, K=4, act="geglu"), id="fp32-K-equals-E"),  # every token uses every expert
    pytest.param(dict(T=3, E=16, K=16, d=16, n=8), id="fp32-K16"),  # the largest K served, K = E = 16
    pytest.param(dict(routing="general", T=12, E=5, bias=True), id="fp32-general-routing"),  # 0/1/3 experts
    pytest.param(dict(routing="general", T=12, E=5, dtype=torch.bfloat16), id="bf16-general-routing"),
    pytest.param(dict(T=150, E=2, K=2, d=16, n=8), id="fp32-multi-tile-experts"),  # 150 rows > TILE_M
    # T not a multiple of anything, every dtype with biases and transposed storage, each activation
    pytest.param(dict(T=7, E=5, K=3, d=24, n=12, transposed=True), id="fp32-swiglu-concat-transposed-T7"),
    pytest.param(dict(T=13, E=6, K=2, d=16, n=16, dtype=torch.float16, bias=True, transposed=True),
                 id="fp16-swiglu-bias-transposed-T13"),
    pytest.param(dict(T=7, E=4, K=2, d=16, n=8, dtype=torch.float16, act="gptoss:1.702:0.5", interleaved=True,
                      bias=True), id="fp16-gptoss-clamped-bias-T7"),
    pytest.param(dict(T=13, E=4, K=2, d=16, n=12, dtype=torch.float16, act="gelu", transposed=True),
                 id="fp16-gelu-nongated-transposed-T13"),
    pytest.param(dict(T=13, E=4, K=1, d=16, n=12, act="gelu_tanh", bias=True), id="fp32-gelu_tanh-nongated-bias"),
    pytest.param(dict(T=7, E=4, K=2, d=16, n=12, dtype=torch.bfloat16, act="relu", bias=True, transposed=True),
                 id="bf16-relu-bias-transposed"),
    pytest.param(dict(T=7, E=4, K=2, d=16, n=16, dtype=torch.bfloat16, act="geglu", interleaved=True,
                      transposed=True, bias=True), id="bf16-geglu-interleaved-transposed-bias"),
    pytest.param(dict(T=1, E=8, K=3, d=16, n=8, dtype=torch.bfloat16, bias=True), id="bf16-T1"),
    pytest.param(dict(T=13, E=8, K=2, d=16, n=8, dtype=torch.float16, allowed=(0, 3, 7)),
                 id="fp16-empty-experts-T13"),
    # d, n above the interpreter's 32 x 32 tiles: several K steps and column blocks, partial last
    # blocks, dH's dS partials summed over column blocks (and b2's <dO, b2> added by block 0 only)
    pytest.param(dict(T=9, E=3, K=2, d=72, n=40, dtype=torch.bfloat16, act="geglu", interleaved=True, bias=True),
                 id="bf16-multi-block-d72-n40"),
    pytest.param(dict(T=9, E=3, K=2, d=72, n=40, act="relu", bias=True, transposed=True),
                 id="fp32-multi-block-nongated-d72-n40"),
    # E = 512 (most experts empty) with K = 16: per-expert kernels run 512 programs. No bias: the
    # bias column sums would add two more 512-program launches (~4 s interpreted) for no new path.
    pytest.param(dict(T=2, E=512, K=16, d=16, n=8), id="fp32-E512-K16"),
    # three factors x1 * silu(x2) * up (OpenMoE): the third accumulator and column block of H
    pytest.param(dict(act="swiglu3", bias=True), id="fp32-swiglu3-bias"),
    pytest.param(dict(T=13, E=4, K=2, d=16, n=12, dtype=torch.float16, act="swiglu3", transposed=True),
                 id="fp16-swiglu3-transposed-T13"),
    pytest.param(dict(T=9, E=3, K=2, d=72, n=40, dtype=torch.bfloat16, act="swiglu3", bias=True),
                 id="bf16-swiglu3-multi-block-d72-n40"),
    pytest.param(dict(routing="general", T=12, E=5, act="swiglu3"), id="fp32-swiglu3-general-routing"),
]


@pytest.mark.parametrize("kwargs", CASES)
def test_forward_backward_match_reference(kwargs):
    run_and_compare(make_case(**kwargs))


def test_cases_cover_every_activation_dtype_and_layout():
    """The parametrization above keeps covering the whole matrix of the issue: every activation
    (gated and not), every dtype, concat/interleaved, transposed/plain weights, biases, T = 1."""
    from moe_inductor.ops.activations import GATED, NON_GATED, TRIPLE
    from test_activation_epilogues import EPILOGUE_KINDS  # the later epilogues are tested there

    kw = [p.values[0] for p in CASES]
    acts = {parse_activation(k.get("act", "swiglu")).kind for k in kw} | EPILOGUE_KINDS
    kinds = set(GATED + NON_GATED + TRIPLE)
    assert acts == kinds, f"activations without a kernel test: {kinds - acts}"
    assert {k.get("dtype", torch.float32) for k in kw} == {torch.float32, torch.float16, torch.bfloat16}
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        of_dt = [k for k in kw if k.get("dtype", torch.float32) == dt]
        assert any(k.get("bias") for k in of_dt) and any(k.get("transposed") for k in of_dt), dt
    gated = [k for k in kw if parse_activation(k.get("act", "swiglu")).gated]
    assert {bool(k.get("interleaved")) for k in gated} == {False, True}
    assert any(k.get("transposed") and not k.get("interleaved") for k in gated)
    assert any(k.get("T") == 1 for k in kw) and max(k.get("E", 4) for k in kw) == 512
    assert max(k.get("K", 2) for k in kw) == 16


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param(dict(bias=True), id="fp32-swiglu-bias"),  # recompute must add b1 like the forward
        pytest.param(dict(dtype=torch.bfloat16, act="geglu", interleaved=True), id="bf16-geglu-interleaved"),
        pytest.param(dict(act="swiglu3", bias=True), id="fp32-swiglu3-bias"),  # the third block recomputed
    ],
)
def test_recompute_h(kwargs):
    """keep_h=False: the forward returns an empty H and the backward recomputes it from X."""
    c = make_case(**kwargs)
    _, h, _ = triton_moe_forward(c.x, c.token_ids, c.expert_ids, c.scores, c.w1, c.w2, c.b1, c.b2, c.act,
                                 c.interleaved, False)
    assert h.shape == (0, c.w1.shape[1])
    run_and_compare(c, keep_h=False)


def test_weight_grad_workspace_is_not_read_unwritten(monkeypatch):
    """Skewed routing with a 16-row weight-gradient chunk: expert 1's 40 rows are reduced by 3
    programs (2 fp32 workspace slots), experts 0 and 2 by 2 each; the workspace is NaN-filled when
    allocated and one slot stays unused. Every output and gradient matches the float64 truth, so
    no slot is read unwritten; expert 3 gets no row and its NaN weights are not read either."""
    from moe_inductor.kernels import config, grouped_gemm

    monkeypatch.setattr(config, "wgrad_chunk", lambda num_assignments, num_experts: 16)
    c = make_case(T=40, E=4, K=2, d=24, n=16, bias=True, poison=False)
    other = torch.tensor([0, 2])[torch.randint(0, 2, (40,), generator=torch.Generator().manual_seed(5))]
    c.expert_ids = torch.stack([torch.ones(40, dtype=torch.int64), other], 1).flatten().to(c.expert_ids)
    poison_unread(c.token_ids, c.expert_ids, c.x, c.grad_out, c.w1, c.w2, c.b1, c.b2)  # expert 3: NaN
    workspaces = []
    real_alloc = grouped_gemm.alloc

    def spy(shape, dtype, device):
        out = real_alloc(shape, dtype, device)
        if dtype == torch.float32 and len(shape) == 3:
            workspaces.append(out)
        return out

    monkeypatch.setattr(grouped_gemm, "alloc", spy)
    run_and_compare(c)
    # dW2 and dW1 each: A // 16 = 5 slots; experts 0, 1, 2 fill 4 of them, the 5th stays NaN (unread)
    assert [tuple(w.shape) for w in workspaces] == [(5, 24, 16), (5, 32, 24)]
    assert all(torch.isnan(w).any() and torch.isfinite(w[:4]).all() for w in workspaces)


def test_deterministic():
    """No atomics on the default path: two runs are bitwise equal."""
    c = make_case(routing="general", T=12, E=5, bias=True)
    out1, g1 = run_and_compare(c)
    out2, g2 = run_and_compare(c)
    assert torch.equal(out1, out2)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


def test_no_assignments():
    """A = 0 (e.g. every token dropped): zero output and gradients, no launch."""
    c = make_case()
    empty = c.token_ids[:0]
    out, h, order = triton_moe_forward(c.x, empty, empty, c.scores[:0], c.w1, c.w2, None, None, c.act, False, True)
    assert torch.equal(out, torch.zeros_like(c.x)) and h.shape == (0, c.w1.shape[1]) and order.numel() == 0
    dx, ds, dw1, dw2, db1, db2 = triton_moe_backward(c.grad_out, c.x, empty, empty, c.scores[:0], c.w1, c.w2,
                                                     None, None, h, order, c.act, False)
    assert not dx.any() and ds.numel() == 0 and not dw1.any() and not dw2.any() and db1 is None and db2 is None


@pytest.mark.parametrize("recompute_h", [False, True])
def test_fused_op_no_assignments_with_bias(recompute_h):
    """A = 0 through the op and autograd with impl='triton': zero output, zero gradients for every
    input including the biases (a layer whose tokens were all dropped still gets gradients)."""
    c = make_case(bias=True, act="geglu", interleaved=True, index_dtype=torch.int32)
    leaves = [t.detach().clone().requires_grad_(True) for t in (c.x, c.scores[:0], c.w1, c.w2, c.b1, c.b2)]
    x, s, w1, w2, b1, b2 = leaves
    empty = c.token_ids[:0]
    out = fused_moe(x, empty, empty, s, w1, w2, b1=b1, b2=b2, activation="geglu", interleaved=True,
                    recompute_h=recompute_h, impl="triton")
    out.backward(c.grad_out)
    assert torch.equal(out.detach(), torch.zeros_like(c.x))
    for name, t in zip(("dx", "dscores", "dw1", "dw2", "db1", "db2"), leaves):
        assert t.grad is not None and t.grad.shape == t.shape and not t.grad.any(), name


@pytest.mark.parametrize("recompute_h", [False, True])  # saved-H and recompute backward through the op
def test_fused_op_autograd_matches_torch_impl(recompute_h):
    c = make_case(act="gptoss:1.702:7.0", interleaved=True, bias=True, routing="general", T=12, E=5)

    def run(impl):
        leaves = [t.detach().clone().requires_grad_(True) for t in (c.x, c.scores, c.w1, c.w2, c.b1, c.b2)]
        x, s, w1, w2, b1, b2 = leaves
        out = fused_moe(x, c.token_ids, c.expert_ids, s, w1, w2, b1=b1, b2=b2, activation=c.act.spec,
                        interleaved=True, recompute_h=recompute_h, impl=impl)
        out.backward(c.grad_out)
        return [out.detach()] + [t.grad for t in leaves]

    got, want = run("triton"), run("torch")
    for name, g, w in zip(("out", "dx", "dscores", "dw1", "dw2", "db1", "db2"), got, want):
        assert_close_scaled(name, g, w, 1e-4)
    # and the PyTorch path itself agrees with autograd through the naive loop
    leaves = [t.detach().clone().requires_grad_(True) for t in (c.x, c.scores, c.w1, c.w2, c.b1, c.b2)]
    naive = reference.naive_moe(leaves[0], c.token_ids, c.expert_ids, leaves[1], *leaves[2:4], leaves[4], leaves[5],
                                act=c.act, interleaved=True)
    naive.backward(c.grad_out)
    assert_close_scaled("naive out", got[0], naive.detach(), 1e-4)
    for name, g, t in zip(("dx", "dscores", "dw1", "dw2", "db1", "db2"), got[1:], leaves):
        assert_close_scaled(f"naive {name}", g, t.grad, 1e-4)


def test_fused_op_expanded_grad_out():
    """out.sum().backward() hands the op an expanded (stride 0) grad: kernels read it by strides."""
    c = make_case(bias=True, act="geglu")

    def run(impl):
        leaves = [t.detach().clone().requires_grad_(True) for t in (c.x, c.scores, c.w1, c.w2, c.b1, c.b2)]
        x, s, w1, w2, b1, b2 = leaves
        fused_moe(x, c.token_ids, c.expert_ids, s, w1, w2, b1=b1, b2=b2, activation="geglu", impl=impl).sum().backward()
        return [t.grad for t in leaves]

    for name, g, w in zip(("dx", "dscores", "dw1", "dw2", "db1", "db2"), run("triton"), run("torch")):
        assert_close_scaled(name, g, w, 1e-4)


@pytest.mark.skipif(HAS_CUDA, reason="host-sync check patches CPU tensor methods (interpreter path)")
def test_forward_backward_do_not_sync(monkeypatch):
    """Routing metadata stays on the device: nothing in forward or backward reads tensor data on
    the host. On CPU that would be free, so reading is made to raise instead."""
    c = make_case(routing="general", T=12, E=5, bias=True)

    def forbidden(*_args, **_kwargs):
        raise AssertionError("host read of device data (a sync on GPU)")

    # Patch only while our code runs; the interpreter itself converts kernel arguments with
    # numpy(), which is its own business and has no GPU counterpart.
    from moe_inductor.kernels import fused_moe_triton, routing_meta

    for mod in (fused_moe_triton, routing_meta):
        assert not hasattr(mod, "item")
    for meth in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, meth, forbidden)
    out, h, order = triton_moe_forward(c.x, c.token_ids, c.expert_ids, c.scores, c.w1, c.w2, c.b1, c.b2, c.act,
                                       c.interleaved, True)
    grads = triton_moe_backward(c.grad_out, c.x, c.token_ids, c.expert_ids, c.scores, c.w1, c.w2, c.b1, c.b2, h,
                                order, c.act, c.interleaved)
    grads_recompute = triton_moe_backward(c.grad_out, c.x, c.token_ids, c.expert_ids, c.scores, c.w1, c.w2, c.b1,
                                          c.b2, None, order, c.act, c.interleaved)
    monkeypatch.undo()
    r_out, _, _ = reference.moe_forward(c.x, c.token_ids, c.expert_ids, c.scores, c.w1, c.w2, c.b1, c.b2, c.act,
                                        c.interleaved)
    assert_close_scaled("out", out, r_out, 1e-4)
    for a, b in zip(grads, grads_recompute):
        assert_close_scaled("recompute vs saved", a, b, 1e-5)


def test_no_sync_ops_in_host_code():
    """The CPU check above only sees Python-level reads; ops that sync inside ATen on CUDA
    (bincount reads max() on the host, nonzero / masked_select / unique size their output from
    data) would pass it. None of them may appear in the host code of the kernel path."""
    import inspect
    import re

    from moe_inductor.kernels import combine, dh, fused_moe_triton, grouped_gemm, routing_meta

    forbidden = re.compile(r"\.item\(|\.tolist\(|\.cpu\(|bincount|nonzero|masked_select|torch\.unique|"
                           r"\.numpy\(|repeat_interleave|torch\.where\([^,()]*\)|\bint\(")
    for mod in (routing_meta, fused_moe_triton, grouped_gemm, dh, combine):
        code = "\n".join(line.split("#")[0] for line in inspect.getsource(mod).splitlines())
        code = re.sub(r'"""[\s\S]*?"""', "", code)
        hits = forbidden.findall(code)
        assert not hits, f"{mod.__name__}: possible host sync {hits}"


class _NoHostSyncMode(TorchDispatchMode):
    """Fails on every ATen op that synchronises a CUDA device with the host: reading a value
    (_local_scalar_dense is what .item(), int(), bool() and .tolist() dispatch to; equal and
    is_nonzero return Python bools), ops whose output size depends on the data (nonzero,
    masked_select, unique, boolean-mask indexing, repeat_interleave without output_size) and CUDA
    bincount (reads max() on the host), plus any copy to another device. On CPU these ops are
    cheap, so only this mode can tell that the GPU path would stall."""

    SYNC_OPS = {
        "_local_scalar_dense", "item", "equal", "is_nonzero", "allclose", "nonzero", "argwhere",
        "masked_select", "bincount", "histc", "unique", "_unique", "_unique2", "unique_dim",
        "unique_consecutive", "unique_dim_consecutive",
    }

    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[-1]
        self.ops.add(name)
        why = None
        if name in self.SYNC_OPS:
            why = "reads device data on the host or sizes its output from it"
        elif name == "repeat_interleave" and func._overloadname != "self_int" and kwargs.get("output_size") is None:
            why = "without output_size sizes its output from the data"
        elif name == "index" and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ())
        ):
            why = "boolean-mask indexing is a nonzero"
        elif name == "_to_copy" and kwargs.get("device") is not None and isinstance(args[0], torch.Tensor) \
                and torch.device(kwargs["device"]) != args[0].device:
            why = "copies to another device"
        if why is not None:
            raise AssertionError(f"host sync in the Triton path: aten.{name} ({why})")
        return func(*args, **kwargs)


@pytest.mark.parametrize("recompute_h", [False, True])
def test_no_host_sync_at_dispatch_level(recompute_h):
    """Forward (and backward) of the kernel path under a dispatch mode that rejects every op that
    would sync on CUDA. Catches what the Python-level patch above cannot: ATen ops that sync
    internally. Runs the kernel entry points directly: the op's CPU-only routing value check
    (op._check_routing_values) reads min/max on the host on purpose and never runs on CUDA."""
    c = make_case(routing="general", T=13, E=5, bias=True, act="gptoss:1.702:0.5", interleaved=True,
                  index_dtype=torch.int32)
    args = (c.x, c.token_ids, c.expert_ids, c.scores, c.w1, c.w2, c.b1, c.b2, c.act, c.interleaved)
    # the mode does catch what it should
    with pytest.raises(AssertionError, match="_local_scalar_dense"), _NoHostSyncMode():
        int(c.token_ids.max())
    with pytest.raises(AssertionError, match="bincount"), _NoHostSyncMode():
        torch.bincount(c.expert_ids.long())
    with _NoHostSyncMode() as mode:
        out, h, order = triton_moe_forward(*args, not recompute_h)
    # it saw the routing code (the expert sort; the rest of the routing tables are Triton kernels)
    assert "sort" in mode.ops
    with _NoHostSyncMode() as mode:
        grads = triton_moe_backward(c.grad_out, *args[:8], None if recompute_h else h, order, c.act, c.interleaved)
    assert "sort" in mode.ops and "index_select" in mode.ops  # the token sort, dS back to assignment order
    r_out, r_h, _ = reference.moe_forward(*args, True)
    r_grads = reference.moe_backward(c.grad_out, *args[:8], r_h, order, c.act, c.interleaved)
    assert_close_scaled("out", out, r_out, FWD_TOL[torch.float32])
    for name, g, rg in zip(("dx", "dscores", "dw1", "dw2", "db1", "db2"), grads, r_grads):
        assert_close_scaled(name, g, rg, GRAD_TOL[torch.float32])


@pytest.mark.parametrize(
    "counts",
    [
        [0, 0, 0, 5],            # leading empty experts
        [128, 129, 0, 1, 256],   # exact multiples of TILE_M and one past
        [3] * 512,               # E = 512, many tiny experts
        [1000],                  # one expert, several tiles
    ],
)
def test_tile_schedule_covers_each_row_once(counts):
    """The device-side schedule: every sorted row in exactly one tile of its own expert, unused
    tiles (-1) only at the end, row ranges within the expert's segment. Pure torch, no kernels."""
    from moe_inductor.kernels.config import TILE_M
    from moe_inductor.kernels.routing_meta import build_routing_meta, max_row_tiles

    E = len(counts)
    expert_ids = torch.repeat_interleave(torch.arange(E), torch.tensor(counts))
    expert_ids = expert_ids[torch.randperm(expert_ids.numel(), generator=torch.Generator().manual_seed(0))]
    A = expert_ids.numel()
    token_ids = torch.arange(A) % 7
    meta = build_routing_meta(token_ids, expert_ids, torch.rand(A), 7, E, TILE_M)
    assert meta.num_tiles == max_row_tiles(A, E, TILE_M)
    covered = torch.zeros(A, dtype=torch.int64)
    seen_inactive = False
    sorted_experts = expert_ids[meta.order.long()]
    for p in range(meta.num_tiles):
        e = int(meta.tile_expert[p])
        if e < 0:
            seen_inactive = True
            continue
        assert not seen_inactive, "active tile after an unused one"
        lo, hi = int(meta.tile_row_start[p]), min(int(meta.tile_row_start[p]) + TILE_M, int(meta.tile_row_end[p]))
        assert lo < hi and hi == min(lo + TILE_M, int(meta.expert_offsets[e + 1]))
        assert (sorted_experts[lo:hi] == e).all()
        covered[lo:hi] += 1
    assert (covered == 1).all()
    assert torch.equal(meta.inv_order[meta.order.long()], torch.arange(A, dtype=torch.int32))
    # CSR by token lists every sorted row once, under its own token
    tok_sorted = token_ids[meta.order.long()]
    for t in range(7):
        rows = meta.token_rows[int(meta.token_offsets[t]):int(meta.token_offsets[t + 1])].long()
        assert (tok_sorted[rows] == t).all() and torch.equal(rows, rows.sort().values)
    assert int(meta.token_offsets[-1]) == A


def test_unsupported_reason(monkeypatch):
    c = make_case()
    assert unsupported_reason(c.x, c.w1, c.w2, c.act) is None
    assert "float64" in unsupported_reason(c.x.double(), c.w1.double(), c.w2.double(), c.act)
    if not HAS_CUDA:  # CPU tensors are served only through the interpreter
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        assert "TRITON_INTERPRET" in unsupported_reason(c.x, c.w1, c.w2, c.act)
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    # a direct call the kernels cannot serve fails with the reason instead of a Triton error
    with pytest.raises(ValueError, match="float64"):
        triton_moe_forward(c.x.double(), c.token_ids, c.expert_ids, c.scores, c.w1.double(), c.w2.double(), None,
                           None, c.act, False, True)


def _fake_cuda_tensor(t: torch.Tensor):
    """Metadata of a CUDA tensor shaped like t: what op._resolve_impl and unsupported_reason read."""
    return SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0), dtype=t.dtype, shape=t.shape,
                           dim=t.dim)


@pytest.mark.parametrize("case", ["float64", "bf16-pre-ampere"])
def test_auto_impl_falls_back_with_log(case, monkeypatch, caplog):
    """impl='auto' on CUDA: a call the kernels cannot serve takes the PyTorch path with a log line
    naming the reason, never an error. There is no CUDA here, so _resolve_impl sees CUDA-like
    metadata (and, for bf16, a pre-Ampere capability)."""
    import logging

    from moe_inductor import kernels as kernels_pkg
    from moe_inductor.ops import op as op_mod

    dtype = torch.float64 if case == "float64" else torch.bfloat16
    c = make_case()
    x, w1, w2 = (_fake_cuda_tensor(t.to(dtype)) for t in (c.x, c.w1, c.w2))
    if case == "bf16-pre-ampere":
        monkeypatch.setattr(kernels_pkg, "_cuda_capability", lambda index: (7, 5))
    monkeypatch.delenv("MOE_INDUCTOR_IMPL", raising=False)
    reason = unsupported_reason(x, w1, w2, c.act)
    assert reason is not None and ("float64" if case == "float64" else "capability 8.0") in reason
    with caplog.at_level(logging.INFO, logger=op_mod.log.name):
        assert op_mod._resolve_impl("auto", x, w1, w2, c.act) == "torch"
    assert any(r.name == op_mod.log.name and reason in r.getMessage() and "PyTorch path" in r.getMessage()
               for r in caplog.records), caplog.text
    # explicit impl='triton' on the same call is an error with the reason (not a Triton crash)
    with pytest.raises(ValueError, match="cannot serve"):
        op_mod._resolve_impl("triton", x, w1, w2, c.act)


def test_auto_impl_fallback_end_to_end(monkeypatch, caplog):
    """The whole op (forward and backward) with impl='auto' on a dtype the kernels reject, while
    tensors report is_cuda: it runs, logs the fallback, and matches the PyTorch path."""
    import logging

    from moe_inductor.ops import op as op_mod

    c = make_case(bias=True)
    leaves64 = [t.detach().double().requires_grad_(True) for t in (c.x, c.scores, c.w1, c.w2, c.b1, c.b2)]

    def run(impl):
        leaves = [t.detach().clone().requires_grad_(True) for t in leaves64]
        x, s, w1, w2, b1, b2 = leaves
        out = fused_moe(x, c.token_ids, c.expert_ids, s, w1, w2, b1=b1, b2=b2, impl=impl)
        out.backward(c.grad_out.double())
        return [out.detach()] + [t.grad for t in leaves]

    want = run("torch")
    monkeypatch.delenv("MOE_INDUCTOR_IMPL", raising=False)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    with caplog.at_level(logging.INFO, logger=op_mod.log.name):
        got = run("auto")
    monkeypatch.undo()
    msgs = [r.getMessage() for r in caplog.records if r.name == op_mod.log.name]
    assert len([m for m in msgs if "float64" in m and "PyTorch path" in m]) == 2, msgs  # forward + backward
    for name, g, w in zip(("out", "dx", "dscores", "dw1", "dw2", "db1", "db2"), got, want):
        assert torch.equal(g, w), name


@pytest.mark.parametrize("recompute_h", [False, True])
def test_triton_path_saves_same_activations_as_torch_path(recompute_h):
    """Activation memory: forward + autograd with impl='triton' keeps exactly what impl='torch'
    keeps (X, H or nothing, scores, int routing, order), tensor by tensor and byte for byte."""
    from moe_inductor.diagnostics.memory import saved_activation_bytes

    c = make_case(T=13, E=5, K=3, bias=True, act="swiglu", dtype=torch.bfloat16, index_dtype=torch.int32)
    x = c.x.detach().clone().requires_grad_(True)
    s = c.scores.detach().clone().requires_grad_(True)
    params = [t.detach().clone().requires_grad_(True) for t in (c.w1, c.w2, c.b1, c.b2)]

    def saved_signature(impl):
        sig = []

        def pack(t):
            sig.append((tuple(t.shape), t.dtype))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fused_moe(x, c.token_ids, c.expert_ids, s, *params[:2], b1=params[2], b2=params[3],
                      recompute_h=recompute_h, impl=impl)
        nbytes, _ = saved_activation_bytes(
            fused_moe, x, c.token_ids, c.expert_ids, s, *params[:2], b1=params[2], b2=params[3],
            recompute_h=recompute_h, impl=impl, exclude=params)
        return sorted(sig, key=str), nbytes

    sig_triton, bytes_triton = saved_signature("triton")
    sig_torch, bytes_torch = saved_signature("torch")
    assert sig_triton == sig_torch
    assert bytes_triton == bytes_torch
    A, H = c.token_ids.numel(), c.w1.shape[1]
    h_bytes = 0 if recompute_h else A * H * 2
    # X (bf16) + H + scores (fp32) + token ids, expert ids, order (int32)
    assert bytes_triton == x.numel() * 2 + h_bytes + A * 4 + 3 * A * 4


def test_fp32_dot_is_ieee_unless_tf32_allowed(monkeypatch):
    """fp32 operands use tl.dot(input_precision="ieee") (no silent tf32); MOE_INDUCTOR_ALLOW_TF32=1
    (launch_utils.ALLOW_TF32) opts in to tf32. Half precisions never pass IEEE. The interpreter
    ignores input_precision: test_kernels_compile_for_hopper checks the sm_90 code has no tf32."""
    from moe_inductor.kernels import launch_utils

    assert launch_utils.ALLOW_TF32 == (os.environ.get("MOE_INDUCTOR_ALLOW_TF32") == "1")
    monkeypatch.setattr(launch_utils, "ALLOW_TF32", False)
    assert launch_utils.dot_flags(torch.float32)["IEEE"] is True
    assert launch_utils.dot_flags(torch.bfloat16)["IEEE"] is False
    assert launch_utils.dot_flags(torch.float16)["IEEE"] is False
    monkeypatch.setattr(launch_utils, "ALLOW_TF32", True)
    assert launch_utils.dot_flags(torch.float32)["IEEE"] is False


@pytest.mark.parametrize("dtype,j", [(torch.float32, 0), (torch.float32, 1), (torch.bfloat16, 0), (torch.bfloat16, 1),
                                     (torch.bfloat16, 2), (torch.bfloat16, 3)])  # j-th config of each list (wrapping)
def test_gpu_tile_configs_interpreted(dtype, j, monkeypatch):
    """The interpreter normally runs one small config (32 x 32 tiles, launch_utils.DtypeConfigs);
    here the j-th GPU autotune config of this dtype's list of every GEMM kernel runs instead, so the
    tile shapes the GPU will pick (BLOCK_N up to 256, BLOCK_K up to 128, dS partials spread over
    BLOCK_N / PART_N slots) are checked for correctness too. d and n leave partial blocks."""
    from moe_inductor.kernels import dh, grouped_gemm as gg

    itemsize = torch.empty(0, dtype=dtype).element_size()
    chosen = {}
    for kernel, configs in ((gg._up_proj_kernel, gg._UP_CONFIGS), (gg._sorted_gemm_kernel, gg._GEMM_CONFIGS),
                            (dh._dh_kernel, dh._DH_CONFIGS), (gg._weight_grad_kernel, gg._WGRAD_CONFIGS)):
        cfgs = configs.for_itemsize(itemsize)
        chosen[kernel] = cfgs[j % len(cfgs)]
        monkeypatch.setattr(kernel, "configs", [chosen[kernel]])
    # the dS partial layout (PART_N) is the smallest BLOCK_N of every list, the interpreter's included
    assert all(c.kwargs["BLOCK_N"] % dh._DH_MIN_BLOCK_N == 0 for c in dh._DH_CONFIGS.gpu_configs)
    # n past the widest BLOCK_N (two column blocks in dH / up_proj), d past the widest BLOCK_K
    n = max(chosen[k].kwargs["BLOCK_N"] for k in (gg._up_proj_kernel, dh._dh_kernel, gg._sorted_gemm_kernel)) + 8
    d = max(chosen[k].kwargs["BLOCK_K"] for k in (gg._up_proj_kernel, dh._dh_kernel, gg._sorted_gemm_kernel)) + 8
    run_and_compare(make_case(T=5, E=3, K=2, d=d, n=n, dtype=dtype, bias=True, act="swiglu", interleaved=j % 2 == 1))
    for kernel, cfg in chosen.items():
        assert kernel.best_config is cfg  # the patched config really ran


def test_tile_m_is_shared_with_token_rounding(monkeypatch):
    """kernels.config.TILE_M is the default tile token rounding rounds to; the kernels' row tile is
    a separate choice from static shapes (config.kernel_tile_m), TILE_M at large loads and always a
    divisor of it, so token-rounded counts fill whole kernel tiles. The kernels serve any row tile
    (here 16: experts span several tiles at T=40)."""
    from moe_inductor.kernels import config
    from moe_inductor.compile.options import SonicOptions

    assert SonicOptions().tile_m == config.TILE_M
    assert config.kernel_tile_m(8192 * 8, 64) == config.TILE_M
    assert all(config.TILE_M % config.kernel_tile_m(a, 64) == 0 for a in (1, 64, 1000, 5000, 10**6))
    monkeypatch.setattr(config, "kernel_tile_m", lambda num_assignments, num_experts: 16)
    run_and_compare(make_case(T=40, E=3, K=2, d=16, n=8, bias=True))


def test_import_moe_inductor_does_not_import_triton():
    import subprocess
    import sys

    code = "import sys, moe_inductor, moe_inductor.ops.op, moe_inductor.kernels; print('triton' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "False"


@pytest.mark.slow
@pytest.mark.skipif(HAS_CUDA, reason="the interpreter smoke run is the CPU stand-in for the GPU benchmark")
def test_bench_kernels_interpret_smoke(tmp_path):
    """examples/bench_kernels.py --interpret-smoke (the GPU benchmark's code paths at a tiny shape
    on CPU) runs, every implementation it ran is ok, and sonic keeps less than transformers'
    grouped_mm experts. hf_compiled and liger are left out to keep the test short."""
    import json
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run(
        [sys.executable, os.path.join(root, "examples", "bench_kernels.py"), "--interpret-smoke",
         "--impls", "sonic,hf_grouped_mm,dense", "--out", str(tmp_path / "smoke")],
        capture_output=True, text=True, timeout=600, cwd=root,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    results = {r["impl"]: r for r in json.loads((tmp_path / "smoke.json").read_text())["results"]}
    assert set(results) == {"sonic", "hf_grouped_mm", "dense"}
    assert all(r["status"] == "ok" for r in results.values()), {k: r["status"] for k, r in results.items()}
    assert results["sonic"]["fwd_ms"] is None  # interpreter timings are never recorded
    assert results["sonic"]["saved_activation_bytes"] < results["hf_grouped_mm"]["saved_activation_bytes"]


# ---------------------------------------------------------------------------------------------
# GPU scale (benchmark shapes at T = 8192); skipped without CUDA.
# ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize(
    "T,d,n,E,K",
    [
        (8192, 2048, 1024, 64, 8),    # fine-grained, 64 experts
        (8192, 2048, 768, 128, 8),    # finer, 128 experts
        (8192, 7168, 2048, 256, 8),   # DeepSeek-V3-like
        (8192, 4096, 14336, 8, 2),    # Mixtral-like, few large experts
    ],
)
def test_gpu_benchmark_shapes_bf16(T, d, n, E, K):
    """At (8192, 7168, 2048, 256, 8) w1 alone is 15 GB in bf16: an fp32 reference (and its fp32
    weight gradients) would not fit, so the reference runs in bf16 and the Triton results wait on
    the host while it runs; comparisons go chunk by chunk on the GPU."""
    torch.manual_seed(1)
    dev, dt = "cuda", torch.bfloat16
    x = torch.randn(T, d, device=dev, dtype=dt)
    w1 = (torch.randn(E, 2 * n, d, device=dev, dtype=dt) / d**0.5)
    w2 = (torch.randn(E, d, n, device=dev, dtype=dt) / n**0.5)
    probs, experts = torch.randn(T, E, device=dev).softmax(-1).topk(K, dim=-1)
    token_ids = torch.arange(T, device=dev).repeat_interleave(K)
    expert_ids, scores = experts.flatten(), probs.flatten()
    grad_out = torch.randn(T, d, device=dev, dtype=dt)
    act = parse_activation("swiglu")
    args = (x, token_ids, expert_ids, scores, w1, w2, None, None, act, False)
    out, h, order = triton_moe_forward(*args, True)
    grads = triton_moe_backward(grad_out, *args[:8], h, order, act, False)
    got = {"out": out.cpu(), "h_sorted": h.cpu()}
    got.update({k: g.cpu() for k, g in zip(("dx", "dscores", "dw1", "dw2"), grads[:4])})
    del out, h, grads
    torch.cuda.empty_cache()
    r_out, r_h, r_order = reference.moe_forward(*args, True)
    assert torch.equal(order, r_order)
    r_grads = reference.moe_backward(grad_out, *args[:8], r_h, r_order, act, False)
    want = {"out": r_out, "h_sorted": r_h, "dx": r_grads[0], "dscores": r_grads[1], "dw1": r_grads[2],
            "dw2": r_grads[3]}
    for name, w in want.items():
        g = got[name]
        assert g.shape == w.shape and g.dtype == w.dtype, name
        scale = max(w.abs().max().item(), 1.0)
        rows = max(1, 2**28 // max(1, w[0].numel()))  # <= 1 GiB of fp32 per chunk
        err = max((g[i:i + rows].to(dev).float() - w[i:i + rows].float()).abs().max().item()
                  for i in range(0, len(w), rows))
        tol = FWD_TOL[dt] if name in ("out", "h_sorted") else GRAD_TOL[dt]
        assert err <= tol * scale, f"{name}: max abs error {err:.3e} > {tol:g} * scale {scale:.3g}"


# ---------------------------------------------------------------------------------------------
# GPU code generation without a GPU: compile for sm_90 (ptxas ships with triton)
# ---------------------------------------------------------------------------------------------
_AOT_SCRIPT = r"""
import inspect, os, re, sys
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from moe_inductor.kernels import combine as cb, dh, grouped_gemm as gg, routing_meta as rm

INT_PTRS = {"tok_sorted_ptr", "tile_expert_ptr", "tile_row_start_ptr", "tile_row_end_ptr", "p_rows_ptr",
            "q_rows_ptr", "expert_offsets_ptr", "token_offsets_ptr", "token_rows_ptr", "src_rows_ptr",
            "slot_start_ptr", "slot_expert_ptr", "slot_row_start_ptr", "slot_row_end_ptr",
            "order32_ptr", "inv_order_ptr", "tok_key_ptr", "expert_ids_ptr", "token_ids_ptr", "order_ptr"}
I64_PTRS = {"token_rows_l_ptr"}
F32_PTRS = {"s_sorted_ptr", "ds_part_ptr", "scale_ptr", "ws_ptr", "scores_ptr", "scores_sorted_ptr"}
UNIT_STRIDES = {"stride_xd", "stride_wd", "stride_hc", "stride_ac", "stride_ik", "stride_wn", "stride_on",
                "stride_gd", "stride_dhc", "stride_pi", "stride_qj", "stride_oj", "stride_sd", "stride_od",
                "stride_sc", "stride_oc", "stride_bh", "stride_bn", "stride_bd"}

def compile_sm90(kernel, dt, consts, warps, stages):
    fn = kernel
    while not isinstance(fn, triton.runtime.jit.JITFunction):
        fn = fn.fn
    names = fn.arg_names
    def ty(nm):
        if nm.endswith("_ptr"):
            return "*i32" if nm in INT_PTRS else "*i64" if nm in I64_PTRS else "*fp32" if nm in F32_PTRS else "*" + dt
        return "fp32" if nm in ("alpha", "limit") else "i32"
    # What a launch at the benchmark shapes specialises: contiguous inner strides are the constant
    # 1, pointers (16-byte aligned torch storage), row strides and dims are divisible by 16.
    consts = dict(consts, **{nm: 1 for nm in UNIT_STRIDES if nm in names})
    sig = {nm: "constexpr" if nm in consts else ty(nm) for nm in names}
    attrs = {(names.index(nm),): [["tt.divisibility", 16]] for nm in names
             if nm not in consts and nm not in ("alpha", "limit")}
    kw = dict(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in consts.items()}, attrs=attrs)
    try:  # only a constructor whose parameters differ is "another triton API": checked by binding
        inspect.signature(ASTSource).bind(**kw)  # the names, without running it; any error of the
    except TypeError as e:                       # constructor itself or of the compile is real
        print("AOT_API_MISMATCH", e)
        sys.exit(3)
    src = ASTSource(**kw)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
    return k.asm

asms = [
    compile_sm90(gg._up_proj_kernel, "bf16", dict(HAS_B1=True, KEEP_H=True, WRITE_A=True, GATED=True,
                 INTERLEAVED=True, UP_FIRST=False, ACT=4, IEEE=False, INTERPRET=False, GROUP_M=8, BLOCK_M=128, BLOCK_N=64,
                 BLOCK_K=64), 4, 4),
    compile_sm90(dh._dh_kernel, "bf16", dict(HAS_B2=True, GATED=True, INTERLEAVED=True, UP_FIRST=False, ACT=4, IEEE=False,
                 INTERPRET=False, GROUP_M=8, PART_N=32, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, SLICE_N=16), 8, 4),
    compile_sm90(gg._sorted_gemm_kernel, "fp32", dict(HAS_BIAS=True, IEEE=True, INTERPRET=False, GROUP_M=8,
                 BLOCK_M=128, BLOCK_N=64, BLOCK_K=64), 4, 3),
    compile_sm90(gg._weight_grad_kernel, "bf16", dict(PARTIAL=False, HAS_SLOTS=True, GATHER_P=False, GATHER_Q=True, IEEE=False,
                 INTERPRET=False, BLOCK_I=128, BLOCK_J=128, BLOCK_R=64), 8, 3),
    compile_sm90(gg._weight_grad_kernel, "bf16", dict(PARTIAL=True, HAS_SLOTS=True, GATHER_P=True, GATHER_Q=False, IEEE=False,
                 INTERPRET=False, BLOCK_I=128, BLOCK_J=128, BLOCK_R=64), 8, 3),
    # the small-row-tile specialisation (decode, many experts: config.kernel_tile_m)
    compile_sm90(gg._up_proj_kernel, "bf16", dict(HAS_B1=False, KEEP_H=True, WRITE_A=True, GATED=True,
                 INTERLEAVED=False, UP_FIRST=False, ACT=0, IEEE=False, INTERPRET=False, GROUP_M=8, BLOCK_M=16, BLOCK_N=64,
                 BLOCK_K=64), 4, 4),
]
compile_sm90(cb._gather_sum_kernel, "bf16", dict(HAS_SCALE=True, INTERPRET=False, BLOCK_J=8, BLOCK_D=1024), 4, 1)
compile_sm90(rm._sorted_rows_kernel, "fp32", dict(WRITE_ORDER=True, BLOCK=1024), 4, 1)
compile_sm90(rm._schedule_kernel, "fp32", dict(BLOCK=1024, BLOCK_P=128, BLOCK_E=64), 4, 1)
compile_sm90(cb._segment_colsum_kernel, "bf16", dict(GATHER=True, HAS_SCALE=True, INTERPRET=False, BLOCK_R=cb._COLSUM_BLOCK_R,
             BLOCK_C=cb._COLSUM_BLOCK_C), cb._COLSUM_WARPS, 1)
print("PIPELINED", *[a["ttgir"].count("async_copy_global_to_local") for a in asms])
# the fp32 specialisation (IEEE=True, what dot_flags gives fp32 by default) must not use tf32
print("FP32_TF32", int("tf32" in asms[2]["ptx"]))
"""


def _run_aot_script(prelude: str = ""):
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-c", prelude + _AOT_SCRIPT], capture_output=True, text=True, env=env,
                          timeout=600)


def _aot_api_mismatch(res) -> bool:
    """The only outcome of _AOT_SCRIPT that skips test_kernels_compile_for_hopper."""
    return res.returncode == 3 and "AOT_API_MISMATCH" in res.stdout


_FAKE_AST_SOURCE = """
import triton.compiler
class ASTSource:
    def __init__(self, {params}):
        raise TypeError("a real error inside the constructor")
triton.compiler.ASTSource = ASTSource
"""


@pytest.mark.skipif(HAS_CUDA, reason="belongs to test_kernels_compile_for_hopper (no GPU only)")
def test_hopper_compile_skips_only_on_another_constructor():
    """The skip of test_kernels_compile_for_hopper: an ASTSource whose parameters differ skips;
    a TypeError raised inside a constructor that accepts the arguments (or by the compile after
    it) fails. The constructor is replaced before the script imports it; nothing is compiled."""
    other = _run_aot_script(_FAKE_AST_SOURCE.format(params="self_fn, sig"))
    assert _aot_api_mismatch(other), other.stdout[-500:] + other.stderr[-1500:]
    same = _run_aot_script(_FAKE_AST_SOURCE.format(params="fn, signature, constexprs=None, attrs=None"))
    assert same.returncode not in (0, 3) and not _aot_api_mismatch(same), same.stdout[-500:]
    assert "a real error inside the constructor" in same.stderr


@pytest.mark.slow
@pytest.mark.skipif(HAS_CUDA, reason="with a GPU the kernels are compiled and run by the other tests")
def test_kernels_compile_for_hopper():
    """The interpreter never runs Triton's compiler: compile the GPU specialisations (bf16 wgmma,
    fp32 ieee, every epilogue flag) for sm_90 in a subprocess without TRITON_INTERPRET, and check
    that the GEMM main loops are software-pipelined (cp.async copies into multi-stage buffers) and
    that the fp32 specialisation has no tf32 instruction (input_precision="ieee" honoured)."""
    try:
        from triton.compiler import ASTSource  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except ImportError as exc:  # pragma: no cover - API moved in another triton version
        pytest.skip(f"triton AOT API not available: {exc}")
    res = _run_aot_script()
    if _aot_api_mismatch(res):
        # the ASTSource constructor's parameters differ (a TypeError later, in the constructor or
        # the compile of a kernel, every traceback of which mentions ASTSource, is a failure)
        pytest.skip(f"triton AOT API differs in this version: {res.stdout.strip()[-300:]}")  # pragma: no cover
    assert res.returncode == 0, res.stderr[-3000:]
    counts = [int(v) for v in res.stdout.split("PIPELINED")[1].split("FP32_TF32")[0].split()]
    assert all(c > 0 for c in counts), f"GEMM loops not pipelined (cp.async counts {counts})"
    assert res.stdout.split("FP32_TF32")[1].split()[0] == "0", "fp32 GEMM compiled to tf32 MMAs"


def test_unsupported_reason_counts_assignments_for_int32_tables():
    from moe_inductor.ops.activations import parse_activation
    from moe_inductor.kernels import unsupported_reason

    x, w1, w2 = torch.empty(4, 8), torch.empty(2, 16, 8), torch.empty(2, 8, 8)
    act = parse_activation("swiglu")
    assert unsupported_reason(x, w1, w2, act, 2**31 - 1) is None
    assert "int32 routing tables" in unsupported_reason(x, w1, w2, act, 2**31)
