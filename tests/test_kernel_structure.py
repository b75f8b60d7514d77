"""Kernel structure (issue 12, item 3) and two kernel fixes (issue 11, item 6b/6c), interpreted.

Every new kernel or kernel path runs here under TRITON_INTERPRET=1 (tests/conftest.py sets it
without CUDA) on tiny shapes and is compared with a torch source of truth:
  * routing metadata in two Triton kernels   vs routing_meta.build_routing_meta_reference (torch ops)
  * grouped (swizzled) program order         every (row tile, column block) exactly once, in groups
  * kernel row tile from static shapes       separate from token rounding's TILE_M, end to end
  * vectorised, autotuned gather-and-sum     vs an fp64 sum; bitwise equal under every GPU config
  * split weight gradients (skewed routing)  vs reference.moe_backward; bitwise reproducible
  * dropped (-1) assignments                 saved-H rows zero (as the reference), dS = 0
  * transposed expert weights                gradients come back in the parameter's layout
Fresh kernel buffers are NaN-filled (launch_utils debug flag), so a row a kernel forgets to
write shows up as NaN. Speed is not measured here (no GPU was lent to this work).
"""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from moe_inductor.kernels import triton_moe_backward, triton_moe_forward

from test_kernels import GRAD_TOL, HAS_CUDA, assert_close_scaled, make_case, run_and_compare

pytestmark = pytest.mark.skipif(
    not HAS_CUDA and os.environ.get("TRITON_INTERPRET") != "1",
    reason="Triton kernels need CUDA or TRITON_INTERPRET=1 (tests/conftest.py sets it without CUDA)",
)
triton = pytest.importorskip("triton")
tl = triton.language


@pytest.fixture(autouse=True)
def _nan_filled_buffers(monkeypatch):
    from moe_inductor.kernels import launch_utils

    monkeypatch.setattr(launch_utils, "DEBUG_FILL_NAN", True)


def _routing(counts, dropped, num_tokens, seed=0):
    """expert ids with the given per-expert counts plus `dropped` ids of -1, shuffled; random tokens."""
    gen = torch.Generator().manual_seed(seed)
    expert_ids = torch.repeat_interleave(torch.arange(-1, len(counts)), torch.tensor([dropped] + list(counts)))
    expert_ids = expert_ids[torch.randperm(expert_ids.numel(), generator=gen)]
    token_ids = torch.randint(0, num_tokens, (expert_ids.numel(),), generator=gen)
    return token_ids, expert_ids, torch.rand(expert_ids.numel(), generator=gen)


# ---------------------------------------------------------------------------------------------
# routing metadata: two Triton kernels (plus the two sorts) vs the torch-op reference
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "counts,dropped,tile_m,chunk",
    [
        ([0, 0, 0, 5], 0, 16, None),            # leading empty experts, no slot
        ([128, 129, 0, 1, 256], 3, 128, 128),   # tile multiples and one past; dropped rows; 4 slots
        ([3] * 300, 0, 16, None),               # E = 300: several expert blocks per scan
        ([1000], 0, 128, 128),                  # one expert: 8 tiles, 7 weight-grad slots
        ([5, 300, 2], 130, 32, 128),            # dropped rows spanning 5 tiles; skewed expert 1
        ([40, 0, 7], 17, 16, 16),               # dropped rows not a tile multiple; chunk = tile
        ([1] * 19 + [0] * 30, 1, 16, None),     # A = 20 < E = 49: one row per group, the bound's worst case
    ],
)
def test_routing_meta_kernels_match_torch_reference(counts, dropped, tile_m, chunk):
    from moe_inductor.kernels.routing_meta import build_routing_meta, build_routing_meta_reference

    T, E = 11, len(counts)
    token_ids, expert_ids, scores = _routing(counts, dropped, T)
    fwd = build_routing_meta(token_ids, expert_ids, scores, T, E, tile_m, wgrad_chunk=chunk)
    want = build_routing_meta_reference(token_ids, expert_ids, scores, T, E, tile_m, wgrad_chunk=chunk)
    # backward: int32 ids, the forward's order reused (no expert sort)
    bwd = build_routing_meta(token_ids.int(), expert_ids.int(), scores, T, E, tile_m, order=fwd.order,
                             wgrad_chunk=chunk)
    for got in (fwd, bwd):
        for f in dataclasses.fields(want):
            g, w = getattr(got, f.name), getattr(want, f.name)
            if isinstance(w, torch.Tensor):
                assert g.dtype == w.dtype and torch.equal(g, w), f"{f.name}: {g} != {w}"
            else:
                assert g == w, f"{f.name}: {g} != {w}"
    assert bwd.order is fwd.order
    # the reference itself: every sorted row in exactly one tile; dropped rows (-2 tiles) first
    A, M = expert_ids.numel(), tile_m
    sorted_experts = expert_ids[want.order.long()]
    covered = torch.zeros(A, dtype=torch.int64)
    for p in range(want.num_tiles):
        e = int(want.tile_expert[p])
        if e == -1:
            continue
        lo, hi = int(want.tile_row_start[p]), int(want.tile_row_end[p])
        hi = min(lo + M, hi)
        assert lo < hi and (sorted_experts[lo:hi] == (-1 if e == -2 else e)).all()
        covered[lo:hi] += 1
    assert (covered == 1).all()
    assert int((want.tile_expert == -2).sum()) == -(-dropped // M)
    # weight-grad slots: each expert's rows = its first chunk + its slots, disjoint, in order
    C = want.wgrad_chunk
    for e in range(E):
        lo, hi = int(want.expert_offsets[e]), int(want.expert_offsets[e + 1])
        slots = range(int(want.slot_start[e]), int(want.slot_start[e + 1]))
        bounds = [(lo, min(hi, lo + C))] + [(int(want.slot_row_start[s]), int(want.slot_row_end[s])) for s in slots]
        assert all(int(want.slot_expert[s]) == e for s in slots)
        assert bounds[0][0] == lo and all(b[1] == n[0] for b, n in zip(bounds, bounds[1:]))
        assert bounds[-1][1] == (hi if hi > lo else lo)


# ---------------------------------------------------------------------------------------------
# grouped program order of the GEMMs
# ---------------------------------------------------------------------------------------------
from moe_inductor.kernels.grouped_gemm import GROUP_M, swizzled_tile  # noqa: E402


@triton.jit
def _probe_order_kernel(out_ptr, num_tiles, num_cols, GROUP_M: tl.constexpr):
    pid_m, pid_n = swizzled_tile(num_tiles, num_cols, GROUP_M)
    pid = tl.program_id(0)
    tl.store(out_ptr + 2 * pid, pid_m)
    tl.store(out_ptr + 2 * pid + 1, pid_n)


@pytest.mark.parametrize("num_tiles,num_cols", [(21, 3), (5, 4), (16, 1), (9, 2)])  # partial last group, < GROUP_M
def test_grouped_program_order(num_tiles, num_cols):
    """Program pid -> (row tile, column block): a bijection onto all tiles x column blocks; the
    programs of group g cover row tiles [g*G, g*G + G) for every column block, walking the row
    tiles of one column block first (L2 reuse of its weight tile, then of the gathered rows)."""
    n = num_tiles * num_cols
    out = torch.full((n, 2), -1, dtype=torch.int32, device="cuda" if HAS_CUDA else "cpu")
    _probe_order_kernel[(n,)](out, num_tiles, num_cols, GROUP_M=GROUP_M)
    pairs = [tuple(r) for r in out.cpu().tolist()]
    assert sorted(pairs) == [(m, j) for m in range(num_tiles) for j in range(num_cols)]
    pid = 0
    for first in range(0, num_tiles, GROUP_M):
        rows = min(GROUP_M, num_tiles - first)
        for j in range(num_cols):
            assert pairs[pid:pid + rows] == [(first + i, j) for i in range(rows)], (first, j)
            pid += rows


# ---------------------------------------------------------------------------------------------
# kernel row tile from static shapes (token rounding's TILE_M unchanged)
# ---------------------------------------------------------------------------------------------
def test_kernel_tile_m_rule():
    from moe_inductor.kernels import config
    from moe_inductor.compile.options import SonicOptions

    assert SonicOptions().tile_m == config.TILE_M == 128  # what token rounding rounds to
    assert config.kernel_tile_m(8192 * 8, 64) == 128      # training shapes: the full tile
    assert config.kernel_tile_m(2048 * 8, 256) == 64      # mean 64 rows per expert
    assert config.kernel_tile_m(64 * 8, 256) == 16        # decode, many experts
    assert config.kernel_tile_m(1, 1) == 16
    for a in (1, 17, 100, 999, 4096, 10**7):
        for e in (1, 8, 64, 512):
            m = config.kernel_tile_m(a, e)
            assert 16 <= m <= 128 and config.TILE_M % m == 0 and m >= min(128, -(-a // e))


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param(dict(T=40, E=3, K=2, d=16, n=8, bias=True), id="fp32-tile32"),  # mean 27: M = 32
        pytest.param(dict(T=2, E=64, K=8, d=16, n=8, dtype=torch.bfloat16), id="bf16-decode-tile16"),
    ],
)
def test_small_kernel_tile_end_to_end(kwargs, monkeypatch):
    """The row tile is chosen from (A, E) only (ints, no device data), once per launch sequence,
    and the kernels are right at it; token rounding's TILE_M is not consulted."""
    from moe_inductor.kernels import config

    calls = []
    rule = config.kernel_tile_m

    def spy(num_assignments, num_experts):
        assert type(num_assignments) is int and type(num_experts) is int
        calls.append((num_assignments, num_experts))
        return rule(num_assignments, num_experts)

    monkeypatch.setattr(config, "kernel_tile_m", spy)
    monkeypatch.setattr(config, "TILE_M", None)  # a kernel reading token rounding's tile would fail
    c = make_case(**kwargs)
    run_and_compare(c)
    A, E = c.token_ids.numel(), c.w1.shape[0]
    assert calls == [(A, E), (A, E)] and rule(A, E) < 128


# ---------------------------------------------------------------------------------------------
# vectorised gather-and-sum
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_sum_blocks_of_rows_every_config(dtype, monkeypatch):
    """Tokens with 0 to 9 rows against BLOCK_J = 2 (mean 1.6 rows per token): several row blocks
    per token, masked tails, empty tokens, D = 72 past the interpreter's BLOCK_D. Each GPU config
    (BLOCK_D 512 to 2048, 4 or 8 warps) gives bitwise the interpreter config's result."""
    from moe_inductor.kernels import combine, config
    from moe_inductor.kernels.routing_meta import build_routing_meta

    T, E, D = 10, 6, 72
    per_token = [0, 1, 9, 1, 2, 0, 1, 1, 0, 1]
    gen = torch.Generator().manual_seed(3)
    token_ids = torch.repeat_interleave(torch.arange(T), torch.tensor(per_token))
    expert_ids = torch.cat([torch.randperm(E, generator=gen)[:k] for k in per_token if k] +
                           [torch.randperm(E, generator=gen)[:3]])[: token_ids.numel()]
    expert_ids = torch.where(torch.arange(token_ids.numel()) == 5, -1, expert_ids)  # one dropped assignment
    A = token_ids.numel()
    assert config.gather_block_rows(A, T) == 2
    meta = build_routing_meta(token_ids, expert_ids, torch.rand(A, generator=gen), T, E, 16)
    src = torch.randn(A, D, generator=gen).to(dtype)
    want = torch.zeros(T, D, dtype=torch.float64)
    s64 = meta.scores_sorted.double()
    for r in range(A):
        if int(expert_ids[meta.order[r]]) >= 0:
            want[int(meta.tok_sorted[r])] += s64[r] * src[r].double()
    got = combine.gather_sum(src, meta.scores_sorted, meta, T, dtype)
    assert_close_scaled("gather_sum", got, want.to(dtype), 1e-6 if dtype == torch.float32 else 8e-3)
    assert not got[torch.tensor(per_token) == 0].any()  # tokens without rows are exactly 0
    for cfg in combine._GATHER_GPU_CONFIGS:
        monkeypatch.setattr(combine._gather_sum_kernel, "configs", [cfg])
        assert torch.equal(combine.gather_sum(src, meta.scores_sorted, meta, T, dtype), got), cfg


# ---------------------------------------------------------------------------------------------
# weight gradients split across programs (skewed routing)
# ---------------------------------------------------------------------------------------------
def _skewed_case():
    """Every token's first expert is expert 1 (48 rows), the second one of the other three."""
    c = make_case(T=48, E=4, K=2, d=24, n=16, bias=True, transposed=True)
    gen = torch.Generator().manual_seed(5)
    other = torch.tensor([0, 2, 3])[torch.randint(0, 3, (48,), generator=gen)]
    c.expert_ids = torch.stack([torch.ones(48, dtype=torch.int64), other], 1).flatten().to(c.expert_ids)
    return c


def test_weight_grad_split_skewed_routing(monkeypatch):
    """With a 16-row chunk, expert 1's 48 rows go to 3 programs per tile (2 workspace slots) and
    the other experts' rows to 1-2: dW1, dW2 (and everything else) match the reference, a second
    backward is bitwise equal (the fp32 partials are added in slot order, no atomics), and the
    gradients equal those of the unsplit reduction up to fp32 summation order."""
    from moe_inductor.kernels import config
    from moe_inductor.kernels.routing_meta import build_routing_meta

    monkeypatch.setattr(config, "wgrad_chunk", lambda num_assignments, num_experts: 16)
    c = _skewed_case()
    meta = build_routing_meta(c.token_ids, c.expert_ids, c.scores, 48, 4, 16)
    assert meta.num_slots == 6 and int(meta.slot_start[2] - meta.slot_start[1]) == 2
    _, g1 = run_and_compare(c)
    _, h, order = triton_moe_forward(c.x, c.token_ids, c.expert_ids, c.scores, c.w1, c.w2, c.b1, c.b2, c.act,
                                     c.interleaved, True)
    bwd = (c.grad_out, c.x, c.token_ids, c.expert_ids, c.scores, c.w1, c.w2, c.b1, c.b2, h, order, c.act,
           c.interleaved)
    for a, b in zip(g1, triton_moe_backward(*bwd)):
        assert torch.equal(a, b)
    monkeypatch.setattr(config, "wgrad_chunk", lambda num_assignments, num_experts: 1 << 20)
    for name, a, b in zip(("dw1", "dw2"), g1[2:4], triton_moe_backward(*bwd)[2:4]):
        assert_close_scaled(name, a, b, 1e-5)


def test_weight_grad_split_rule():
    """Balanced routing never splits (no extra launch, no workspace); the workspace is bounded."""
    from moe_inductor.kernels import config

    for A, E in ((8192 * 8, 64), (32768 * 8, 128), (64 * 8, 256), (100, 3)):
        C = config.wgrad_chunk(A, E)
        assert C % 128 == 0 and C >= config.WGRAD_SPLIT_FACTOR * (A // E) and C >= config.WGRAD_MIN_CHUNK
        assert A // C <= max(E // config.WGRAD_SPLIT_FACTOR, A // config.WGRAD_MIN_CHUNK)


# ---------------------------------------------------------------------------------------------
# issue 11, item 6b: dropped assignments and the saved H
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("keep_h", [True, False])
def test_dropped_assignments_zero_h_rows_and_score_grad(dtype, keep_h):
    """20 of 48 assignments dropped (expert -1): more than one 16-row tile of dropped rows. The
    saved H has zeros in their rows (the reference zeros them too; NaN-filled buffers would show
    an unwritten row), their score gradient is exactly 0, everything else matches the reference."""
    c = make_case(T=24, E=4, K=2, d=16, n=8, dtype=dtype, bias=True)
    drop = torch.zeros(48, dtype=torch.bool)
    drop[torch.randperm(48, generator=torch.Generator().manual_seed(1))[:20]] = True
    c.expert_ids = torch.where(drop.to(c.expert_ids.device), -1, c.expert_ids)
    out, grads = run_and_compare(c, keep_h=keep_h)
    _, h, order = triton_moe_forward(c.x, c.token_ids, c.expert_ids, c.scores, c.w1, c.w2, c.b1, c.b2, c.act,
                                     c.interleaved, keep_h)
    if keep_h:
        assert torch.equal(h[:20], torch.zeros_like(h[:20])) and torch.isfinite(h).all()
    ds_dropped = grads[1][drop.to(grads[1].device)]
    assert torch.equal(ds_dropped, torch.zeros_like(ds_dropped)) and ds_dropped.numel() == 20


# ---------------------------------------------------------------------------------------------
# issue 11, item 6c: gradients of transposed expert weights in the parameter's layout
# ---------------------------------------------------------------------------------------------
def test_transposed_weight_grads_keep_parameter_layout():
    """GPT-OSS stores gate_up (E, d, 2n) and down (E, n, d) and the op sees transposed views. The
    weight gradients of both paths, and of the op's fake, have the views' strides, so autograd's
    transpose back gives the parameters contiguous gradients without a copy; values still match."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    c = make_case(T=9, E=3, K=2, d=16, n=8, act="gptoss:1.702:7.0", interleaved=True, bias=True, transposed=True)
    assert not c.w1.is_contiguous() and not c.w2.is_contiguous()
    _, grads = run_and_compare(c)
    assert grads[2].stride() == c.w1.stride() and grads[3].stride() == c.w2.stride()
    _, h, order = triton_moe_forward(c.x, c.token_ids, c.expert_ids, c.scores, c.w1, c.w2, c.b1, c.b2, c.act,
                                     True, True)
    args = (c.grad_out, c.x, c.token_ids, c.expert_ids, c.scores, c.w1, c.w2, c.b1, c.b2, h, order,
            c.act.spec, True, False)
    for impl in ("triton", "torch"):
        dw1, dw2 = torch.ops.moe_inductor.fused_moe_backward(*args, impl)[2:4]
        assert dw1.stride() == c.w1.stride() and dw2.stride() == c.w2.stride(), impl
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        dw1, dw2 = torch.ops.moe_inductor.fused_moe_backward(*fake, "triton")[2:4]
        assert dw1.stride() == c.w1.stride() and dw2.stride() == c.w2.stride(), "fake"
    # no assignments: zeros, same layout
    empty = c.token_ids[:0]
    zero = triton_moe_backward(c.grad_out, c.x, empty, empty, c.scores[:0], c.w1, c.w2, None, None, h[:0],
                               order[:0], c.act, True)
    assert zero[2].stride() == c.w1.stride() and zero[3].stride() == c.w2.stride()
    # through autograd: the parameters' gradients equal the PyTorch path's
    from moe_inductor.ops.op import fused_moe

    def param_grads(impl):
        p1 = c.w1.transpose(1, 2).detach().clone().requires_grad_(True)  # (E, d, 2n) storage
        p2 = c.w2.transpose(1, 2).detach().clone().requires_grad_(True)  # (E, n, d) storage
        out = fused_moe(c.x, c.token_ids, c.expert_ids, c.scores, p1.transpose(1, 2), p2.transpose(1, 2),
                        b1=c.b1, b2=c.b2, activation=c.act.spec, interleaved=True, impl=impl)
        out.backward(c.grad_out)
        return p1.grad, p2.grad

    for got, want in zip(param_grads("triton"), param_grads("torch")):
        assert got.is_contiguous()
        assert_close_scaled("param grad", got, want, GRAD_TOL[torch.float32])
