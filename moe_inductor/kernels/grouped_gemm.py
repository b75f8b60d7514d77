"""Grouped GEMMs over expert-sorted assignment rows: @triton.jit kernels and their launchers.

Shape legend: T tokens, d hidden, n expert intermediate, H = 2n (gated), 3n (swiglu3: [x1 | x2 | up],
a third accumulator and column block in up_proj and dh) or n columns of the first projection, E experts, A assignments, M = tile_m rows per tile, P row tiles (see routing_meta).

  up_proj       H_sorted = gather(X) W1^T (+b1), A_sorted = act(H_sorted)   rows gathered in-kernel
  sorted_gemm   Out_sorted = In_sorted W[e] (+bias)                         Y = A W2^T ; dX' = dH W1
  dh            dA' = gather(dO) W2[e]; epilogue: dS partials, dH, A' = s*A  (SonicMoE dH kernel: dh.py)
  weight_grad   dW[e] = P_e^T Q_e over each expert's rows                   dW2, dW1

Row tiles come from the device-side schedule (``RoutingMeta``): the program for (p, j) handles
sorted rows [tile_row_start[p], +M) of expert tile_expert[p], masked at tile_row_end[p]; unused
tiles return, dropped-row tiles (-2) only zero H / write zero dS. The grid is 1-D in grouped
order (``swizzled_tile``: GROUP_M row tiles per column block, for L2 reuse of weight and gathered
tiles). The row tile M is ``config.kernel_tile_m(A, E)`` (static shapes: 128, or smaller when the
mean rows per expert are few); the schedule depends on it, so autotuning varies only the
column/reduction tiles, warps and pipeline depth, and BLOCK_M is part of every GEMM's autotune key
(a config tuned for 128-row tiles is not reused for 16-row ones). Weight gradients split an expert's rows into
chunks of ``meta.wgrad_chunk`` rows with a deterministic two-launch reduction (``weight_grad``).

Weights are read through their strides (transposed storage needs no copy). Pointer offsets of
rows are computed in int64: A * H can exceed 2**31 at the benchmark shapes.

Numerics follow ``reference.moe_forward/moe_backward``: fp32 accumulation, and the same roundings
to the input dtype at the same places (H, A, dA', dH, A' are rounded before their next use), so
the saved-H and recompute paths agree and half-precision results track the reference.

Autotune configs are chosen by reasoning about an H100 (228 KB shared memory per SM, 64K
registers), NOT by measurement: no GPU was available when they were written. Re-tune with
examples/bench_kernels.py on the target GPU before trusting them. What was checked without a GPU
(tests/test_kernels.py::test_kernels_compile_for_hopper, triton 3.9): the kernels compile for
sm_90 and, with the alignment a real launch specialises, their main loops are software-pipelined
(cp.async into num_stages-deep shared buffers, including the gathered X / dO rows) and use wgmma.
Configs that do not fit in shared memory are dropped by the autotuner (OutOfResources).
Under TRITON_INTERPRET=1 one small config runs instead (launch_utils.autotune_configs); the GPU
configs (``_*_GPU_CONFIGS``) are checked for correctness, not speed, by
tests/test_kernels.py::test_gpu_tile_configs_interpreted.
No TMA / tensor descriptors: the gathered A operand cannot use a 2-D TMA box, and their API
moved between triton 3.6 and 3.9.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from moe_inductor.ops.activations import Activation
from moe_inductor.kernels.activation_jit import act_code, gated_fwd, unary_fwd
from moe_inductor.kernels.jit_utils import cast, halves, mma
from moe_inductor.kernels.launch_utils import DtypeConfigs, alloc, dot_flags
from moe_inductor.kernels.routing_meta import RoutingMeta


def _cfg(bn, bk, warps, stages):
    return triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)


# Autotune candidates per operand size (launch_utils.DtypeConfigs: bf16/fp16 get the 2-byte list,
# fp32 the 4-byte one). Speed is unmeasured (no GPU when written); what was measured is that every
# config compiles for sm_90 without register spills and within shared memory, for every variant
# the launchers use (biases, interleaved gate/up, H kept or recomputed, 128- and 16-row tiles):
# examples/kernel_resources.py (BLOCK_M = 128 figures quoted below: triton 3.9), tables for triton
# 3.9 and 3.6 in examples/results/sm90_kernels*.json, enforced by tests/test_kernel_resources.py.
# fp32 uses tl.dot(input_precision="ieee"): CUDA-core FMA with operand tiles in registers, so its
# tiles are much smaller; shared memory per stage also doubles.
#
# Up-projection. Gated two-block kinds: one dot per K step over a (BK, 2 BN) [gate | up] W tile into
# one 128 x 2BN fp32 accumulator, split into gate and up after the loop (_gate_up_dot); before,
# two BN-wide dots per step re-read the gathered X tile from shared memory twice. Figures below
# marked (two dots) predate it; with one dot (examples/results, BLOCK_M = 128): bf16 128-214
# registers under 3.9, 127-175 under 3.6, no spills; fp32 64x16 244-254 (3.9) / 244-254 (3.6).
# swiglu3 (ACT 9, part of the autotune key so it tunes apart from the two-block kinds) adds a third
# accumulator and W tile: on sm_90 (triton 3.9, examples/kernel_resources.py --acts swiglu3) its
# BLOCK_K=128 3-stage config needs 240 KB of shared memory (> 227 KB: the autotuner skips it as
# OutOfResources) and spills 8 B in one variant, and fp32 64x16 w8 spills 248 B; every other
# up-projection and dH config fits. Not measured on a GPU.
# Per stage X (M x BK) and two W tiles (BK x BN): (128*BK + 2*BK*BN) * itemsize.
# bf16 (two dots): with 4 warps every config spilled (255 registers; 64x64 w4: 64 B, 64x128 w4: 356 B in the
# H-recompute variant); BN=128 with 8 warps spilled too (556-588 B). 8 warps and BN=64: 133-215
# registers, no spills.
_UP_GPU_CONFIGS = [
    _cfg(64, 64, 8, 4),   # 128 KB smem
    _cfg(64, 128, 8, 3),  # long K (d = 7168): fewer loop iterations; 192 KB smem (> sm_80's 163 KB)
]
# fp32 (two dots): 32x32 and 64x32 tiles spilled 12-24 B in the H-recompute variant; BK=16 did
# not at the 128-row tile. With one dot only 64x16 at the 32-row tile spills, 4 B under triton 3.9
# (ptxas 13.4), nothing under 3.6 (before: 4-24 B and 12 B at the 32/64-row tiles). Known and
# bounded in tests/test_kernel_resources.py (KNOWN_SPILLS, fp32 IEEE only); every bf16/fp16/tf32
# row fits under both versions.
_UP_GPU_CONFIGS_FP32 = [
    _cfg(32, 16, 8, 3),   # 128 registers, 24 KB smem
    _cfg(64, 16, 8, 3),   # 250-254 registers, 32 KB smem
]
_UP_CONFIGS = DtypeConfigs({2: _UP_GPU_CONFIGS, 4: _UP_GPU_CONFIGS_FP32}, _cfg(32, 32, 1, 1))

# Plain grouped GEMM (Y = A W2^T, dX' = dH W1): one B tile per stage, (128*BK + BK*BN) * itemsize.
# bf16: every config fits (108-204 registers, 96-192 KB smem); the usual Hopper 128x128x64 tile
# with 8 warps comes first.
_GEMM_GPU_CONFIGS = [
    _cfg(128, 64, 8, 4),
    _cfg(64, 64, 4, 4),
    _cfg(256, 64, 8, 3),   # wide output (d = 4096/7168): halves the re-reads of the A tile
    _cfg(128, 128, 8, 3),
]
# fp32: the bf16 list needs 128-256 KB smem per block at 4 B (3 of 4 over sm_90's 227 KB) and
# 128x32 w8 spilled 32 B; these two: 154 / 128 registers, 48 / 96 KB. 64x64 spills 8 B at the
# 32-row tile under triton 3.9 (KNOWN_SPILLS in tests/test_kernel_resources.py).
_GEMM_GPU_CONFIGS_FP32 = [
    _cfg(64, 32, 8, 3),
    _cfg(64, 64, 8, 3),
]
_GEMM_CONFIGS = DtypeConfigs({2: _GEMM_GPU_CONFIGS, 4: _GEMM_GPU_CONFIGS_FP32}, _cfg(32, 32, 1, 1))


# ----------------------------------------------------------------------------------------------
# shared pieces of the row-tiled kernels (inlined by the compiler)
# ----------------------------------------------------------------------------------------------
@triton.jit
def tile_rows(tile_row_start_ptr, tile_row_end_ptr, pid_m, BLOCK_M: tl.constexpr):
    """Sorted rows of row tile pid_m of an active tile: (rows int32, row_mask, rows int64)."""
    row_start = tl.load(tile_row_start_ptr + pid_m)
    row_end = tl.load(tile_row_end_ptr + pid_m)
    rows = row_start + tl.arange(0, BLOCK_M)
    return rows, rows < row_end, rows.to(tl.int64)


@triton.jit
def gate_up_cols(cols, n_act, INTERLEAVED: tl.constexpr, UP_FIRST: tl.constexpr, ACT: tl.constexpr):
    """Columns of H holding gate and up for activation columns cols (interleaved or concatenated;
    UP_FIRST: the up half is the first one, ``Activation.up_first``). SWIGLU3 (H = [x1 | x2 | up]):
    x2 and up, the second and third blocks (x1 is at cols)."""
    if ACT == 9:
        return cols + n_act, cols + 2 * n_act
    if INTERLEAVED:
        first_cols = 2 * cols
        second_cols = 2 * cols + 1
    else:
        first_cols = cols
        second_cols = cols + n_act
    if UP_FIRST:
        return second_cols, first_cols
    return first_cols, second_cols


@triton.jit
def swizzled_tile(num_tiles, num_col_blocks, GROUP_M: tl.constexpr):
    """(row tile, column block) of this program in grouped order (Triton's matmul tutorial): the
    1-D grid walks GROUP_M consecutive row tiles for one column block, then the next column block.
    Consecutive row tiles are mostly the same expert, so the GROUP_M programs that run together
    read the same weight tiles (L2 hits) and each gathered row tile is reused across the column
    blocks of the group while it is still in L2, instead of every row tile streaming the whole
    weight (row-major order) or every column block re-gathering every row tile (column-major)."""
    pid = tl.program_id(0)
    in_group = GROUP_M * num_col_blocks
    first_m = (pid // in_group) * GROUP_M
    group_rows = tl.minimum(num_tiles - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_rows
    pid_n = (pid % in_group) // group_rows
    return pid_m, pid_n


@triton.jit
def _gate_up_dot(x_ptr, w_base, tok, row_mask, pid_n, n_act, d, stride_xt, stride_xd, stride_wh, stride_wd,
                 INTERLEAVED: tl.constexpr, UP_FIRST: tl.constexpr, ACT: tl.constexpr, IEEE: tl.constexpr,
                 INTERPRET: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """(gather(X) W1[gate cols]^T, gather(X) W1[up cols]^T) of column block pid_n, as ONE dot per
    K step: the B tile's 2 * BLOCK_N columns are the gate rows of W1 then the up rows, addressed
    through W1's strides (either layout, no re-laid-out copy of the weight), and the (M, 2 BN)
    accumulator is split into its halves after the loop."""
    j = tl.arange(0, 2 * BLOCK_N)
    cols2 = pid_n * BLOCK_N + j % BLOCK_N  # the activation column of each B-tile column
    g2, u2 = gate_up_cols(cols2, n_act, INTERLEAVED, UP_FIRST, ACT)
    wcols = tl.where(j < BLOCK_N, g2, u2)
    wcol_mask = cols2 < n_act
    acc = tl.zeros((BLOCK_M, 2 * BLOCK_N), dtype=tl.float32)
    for k0 in range(0, d, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < d
        xb = tl.load(x_ptr + tok[:, None] * stride_xt + ks[None, :] * stride_xd,
                     mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_base + wcols[None, :] * stride_wh + ks[:, None] * stride_wd,
                    mask=k_mask[:, None] & wcol_mask[None, :], other=0.0)
        acc = mma(xb, w, acc, IEEE, INTERPRET)
    return halves(acc, BLOCK_M, 2 * BLOCK_N)


# Row tiles per group of the grouped program order; 8 as in Triton's tutorial (unmeasured here).
GROUP_M = 8


# ----------------------------------------------------------------------------------------------
# up-projection
# ----------------------------------------------------------------------------------------------
@triton.autotune(configs=_UP_CONFIGS.configs, key=["n_act", "d", "GATED", "ACT", "BLOCK_M"], prune_configs_by=_UP_CONFIGS.prune_by)
@triton.jit
def _up_proj_kernel(
    x_ptr, w1_ptr, b1_ptr, h_ptr, a_ptr,
    tok_sorted_ptr, tile_expert_ptr, tile_row_start_ptr, tile_row_end_ptr,
    num_tiles, n_act, d,
    stride_xt, stride_xd,
    stride_we, stride_wh, stride_wd,
    stride_be, stride_bh,
    stride_hr, stride_hc,
    stride_ar, stride_ac,
    alpha, limit,
    HAS_B1: tl.constexpr, KEEP_H: tl.constexpr, WRITE_A: tl.constexpr,
    GATED: tl.constexpr, INTERLEAVED: tl.constexpr, UP_FIRST: tl.constexpr, ACT: tl.constexpr,
    IEEE: tl.constexpr, INTERPRET: tl.constexpr, GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Over 60 lines: one kernel body whose constexpr branches (dropped tile, one / three dots, the
    # H and A stores) share the tile's rows and columns; helpers would only pass them all around.
    pid_m, pid_n = swizzled_tile(num_tiles, tl.cdiv(n_act, BLOCK_N), GROUP_M)
    e = tl.load(tile_expert_ptr + pid_m)
    if e < 0:
        if KEEP_H:
            if e == -2:
                # dropped assignments (expert id -1): their rows of the saved H are zeroed, as the
                # reference does, so H holds no uninitialised memory (nothing reads them).
                rows, row_mask, rows64 = tile_rows(tile_row_start_ptr, tile_row_end_ptr, pid_m, BLOCK_M)
                cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
                if GATED:
                    gate_cols, up_cols = gate_up_cols(cols, n_act, INTERLEAVED, UP_FIRST, ACT)
                else:
                    gate_cols = cols
                zmask = row_mask[:, None] & (cols < n_act)[None, :]
                zero = tl.zeros((BLOCK_M, BLOCK_N), dtype=h_ptr.dtype.element_ty)
                tl.store(h_ptr + rows64[:, None] * stride_hr + gate_cols[None, :] * stride_hc, zero, mask=zmask)
                if GATED:
                    tl.store(h_ptr + rows64[:, None] * stride_hr + up_cols[None, :] * stride_hc, zero, mask=zmask)
                if ACT == 9:
                    tl.store(h_ptr + rows64[:, None] * stride_hr + cols[None, :] * stride_hc, zero, mask=zmask)
        return
    rows, row_mask, rows64 = tile_rows(tile_row_start_ptr, tile_row_end_ptr, pid_m, BLOCK_M)
    # the gather: A-operand rows come straight from X via the sorted token ids (no A x d copy)
    tok = tl.load(tok_sorted_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < n_act
    if GATED:
        gate_cols, up_cols = gate_up_cols(cols, n_act, INTERLEAVED, UP_FIRST, ACT)
    else:
        gate_cols = cols
    w_base = w1_ptr + e.to(tl.int64) * stride_we
    if GATED and ACT != 9:
        acc_g, acc_u = _gate_up_dot(x_ptr, w_base, tok, row_mask, pid_n, n_act, d, stride_xt, stride_xd,
                                    stride_wh, stride_wd, INTERLEAVED, UP_FIRST, ACT, IEEE, INTERPRET,
                                    BLOCK_M, BLOCK_N, BLOCK_K)
    else:  # one column block (non-gated), or three dots (swiglu3: 3 * BLOCK_N is no power of two)
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if GATED:
            acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            acc_x = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, d, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_mask = ks < d
            xb = tl.load(x_ptr + tok[:, None] * stride_xt + ks[None, :] * stride_xd,
                         mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            wmask = k_mask[:, None] & col_mask[None, :]
            wg = tl.load(w_base + gate_cols[None, :] * stride_wh + ks[:, None] * stride_wd, mask=wmask, other=0.0)
            acc_g = mma(xb, wg, acc_g, IEEE, INTERPRET)
            if GATED:
                wu = tl.load(w_base + up_cols[None, :] * stride_wh + ks[:, None] * stride_wd, mask=wmask, other=0.0)
                acc_u = mma(xb, wu, acc_u, IEEE, INTERPRET)
                wx = tl.load(w_base + cols[None, :] * stride_wh + ks[:, None] * stride_wd, mask=wmask, other=0.0)
                acc_x = mma(xb, wx, acc_x, IEEE, INTERPRET)

    dt = x_ptr.dtype.element_ty
    out_mask = row_mask[:, None] & col_mask[None, :]
    if HAS_B1:
        b_base = b1_ptr + e.to(tl.int64) * stride_be
        acc_g += tl.load(b_base + gate_cols * stride_bh, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        if GATED:
            acc_u += tl.load(b_base + up_cols * stride_bh, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        if ACT == 9:
            acc_x += tl.load(b_base + cols * stride_bh, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    # H is rounded to the input dtype first and A computed from the rounded H: the backward
    # recomputes A from the stored H and must see the same values.
    hg = cast(acc_g, dt, INTERPRET)
    if KEEP_H:
        tl.store(h_ptr + rows64[:, None] * stride_hr + gate_cols[None, :] * stride_hc, hg, mask=out_mask)
    if GATED:
        hu = cast(acc_u, dt, INTERPRET)
        if KEEP_H:
            tl.store(h_ptr + rows64[:, None] * stride_hr + up_cols[None, :] * stride_hc, hu, mask=out_mask)
    if ACT == 9:
        hx = cast(acc_x, dt, INTERPRET)
        if KEEP_H:
            tl.store(h_ptr + rows64[:, None] * stride_hr + cols[None, :] * stride_hc, hx, mask=out_mask)
    if WRITE_A:
        if ACT == 9:  # (x1 * silu(x2)) * up, the reference's order
            act = hx.to(tl.float32) * unary_fwd(hg.to(tl.float32), 0) * hu.to(tl.float32)
        elif GATED:
            act = gated_fwd(hg.to(tl.float32), hu.to(tl.float32), alpha, limit, ACT)
        else:
            act = unary_fwd(hg.to(tl.float32), ACT)
        tl.store(a_ptr + rows64[:, None] * stride_ar + cols[None, :] * stride_ac, cast(act, dt, INTERPRET), mask=out_mask)


def up_proj(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: Optional[torch.Tensor],
    meta: RoutingMeta,
    act: Activation,
    interleaved: bool,
    h_out: Optional[torch.Tensor],
    a_out: Optional[torch.Tensor],
) -> None:
    """Writes H_sorted (A, H) into h_out and/or act(H_sorted) (A, n) into a_out."""
    E, h_cols, d = w1.shape
    n_act = h_cols // act.width
    assert x.shape[1] == d and (h_out is not None or a_out is not None)
    if h_out is not None:
        assert h_out.shape == (meta.tok_sorted.shape[0], h_cols) and h_out.dtype == x.dtype
    if a_out is not None:
        assert a_out.shape == (meta.tok_sorted.shape[0], n_act) and a_out.dtype == x.dtype
    dummy = x  # never dereferenced when the matching constexpr flag is off
    h = h_out if h_out is not None else dummy
    a = a_out if a_out is not None else dummy
    b = b1 if b1 is not None else dummy
    grid = lambda META: (meta.num_tiles * triton.cdiv(n_act, META["BLOCK_N"]),)
    _up_proj_kernel[grid](
        x, w1, b, h, a,
        meta.tok_sorted, meta.tile_expert, meta.tile_row_start, meta.tile_row_end,
        meta.num_tiles, n_act, d,
        x.stride(0), x.stride(1),
        w1.stride(0), w1.stride(1), w1.stride(2),
        b.stride(0) if b1 is not None else 0, b.stride(1) if b1 is not None else 0,
        h.stride(0) if h_out is not None else 0, h.stride(1) if h_out is not None else 0,
        a.stride(0) if a_out is not None else 0, a.stride(1) if a_out is not None else 0,
        float(act.alpha), float(act.limit),
        HAS_B1=b1 is not None, KEEP_H=h_out is not None, WRITE_A=a_out is not None,
        GATED=act.width > 1, INTERLEAVED=interleaved, UP_FIRST=act.up_first, ACT=act_code(act),
        GROUP_M=GROUP_M, BLOCK_M=meta.tile_m, **dot_flags(x.dtype),
    )


# ----------------------------------------------------------------------------------------------
# grouped GEMM over sorted rows: Out[r] = In[r] W[e] (+ bias[e])
#
# Open question, kept on Triton: torch._grouped_mm (CUTLASS, bf16, sm90) could serve these two
# plain GEMMs (no gather: Y = A W2^T and dX' = dH W1) from the same expert-sorted rows, given the
# expert end offsets. Whether it beats this kernel on Hopper has not been measured (no GPU was lent
# to this work); decide by numbers from examples/bench_kernels.py before switching, and keep this
# kernel for fp32/fp16, pre-sm90 devices and the interpreter either way.
# ----------------------------------------------------------------------------------------------
@triton.autotune(configs=_GEMM_CONFIGS.configs, key=["N", "K", "BLOCK_M"], prune_configs_by=_GEMM_CONFIGS.prune_by)
@triton.jit
def _sorted_gemm_kernel(
    in_ptr, w_ptr, bias_ptr, out_ptr,
    tile_expert_ptr, tile_row_start_ptr, tile_row_end_ptr,
    num_tiles, N, K,
    stride_ir, stride_ik,
    stride_we, stride_wk, stride_wn,
    stride_be, stride_bn,
    stride_or, stride_on,
    HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, INTERPRET: tl.constexpr, GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m, pid_n = swizzled_tile(num_tiles, tl.cdiv(N, BLOCK_N), GROUP_M)
    e = tl.load(tile_expert_ptr + pid_m)
    if e < 0:
        return
    rows, row_mask, rows64 = tile_rows(tile_row_start_ptr, tile_row_end_ptr, pid_m, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    w_base = w_ptr + e.to(tl.int64) * stride_we
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        ab = tl.load(in_ptr + rows64[:, None] * stride_ir + ks[None, :] * stride_ik,
                     mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        wb = tl.load(w_base + ks[:, None] * stride_wk + cols[None, :] * stride_wn,
                     mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = mma(ab, wb, acc, IEEE, INTERPRET)
    dt = out_ptr.dtype.element_ty
    if HAS_BIAS:
        acc += tl.load(bias_ptr + e.to(tl.int64) * stride_be + cols * stride_bn, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows64[:, None] * stride_or + cols[None, :] * stride_on, cast(acc, dt, INTERPRET),
             mask=row_mask[:, None] & col_mask[None, :])


def sorted_gemm(
    inp: torch.Tensor, w_ekn: torch.Tensor, bias: Optional[torch.Tensor], meta: RoutingMeta
) -> torch.Tensor:
    """inp (A, K) sorted rows, w_ekn (E, K, N) any strides (e.g. ``w2.transpose(1, 2)``),
    bias (E, N) or None -> (A, N) in inp.dtype."""
    A, K = inp.shape
    E, K2, N = w_ekn.shape
    if K2 != K:
        raise ValueError(f"sorted_gemm: inner dims differ: inp {tuple(inp.shape)}, w {tuple(w_ekn.shape)}")
    out = alloc((A, N), inp.dtype, inp.device)
    b = bias if bias is not None else inp
    grid = lambda META: (meta.num_tiles * triton.cdiv(N, META["BLOCK_N"]),)
    _sorted_gemm_kernel[grid](
        inp, w_ekn, b, out,
        meta.tile_expert, meta.tile_row_start, meta.tile_row_end,
        meta.num_tiles, N, K,
        inp.stride(0), inp.stride(1),
        w_ekn.stride(0), w_ekn.stride(1), w_ekn.stride(2),
        b.stride(0) if bias is not None else 0, b.stride(1) if bias is not None else 0,
        out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None, GROUP_M=GROUP_M, BLOCK_M=meta.tile_m, **dot_flags(inp.dtype),
    )
    return out


# ----------------------------------------------------------------------------------------------
# per-expert weight gradients: dW[e] = P_e^T Q_e, rows of expert e only
# ----------------------------------------------------------------------------------------------
def _wcfg(bi, bj, br, warps, stages):
    return triton.Config({"BLOCK_I": bi, "BLOCK_J": bj, "BLOCK_R": br}, num_warps=warps, num_stages=stages)


# Speed reasoned, not measured (no GPU when written); fit measured as for the configs above.
# The reduction runs over an expert's rows (T*K/E: 256 to 4096 at the benchmark shapes); both
# operands are loaded transposed-or-gathered, so tiles stay at 128x128 with a 32/64-row step.
# Stage size (128*BR + BR*128) * 2 B = 16/32 KB: 3-4 stages fit easily. bf16: 114-228 registers,
# no spills, 32-72 KB smem.
_WGRAD_GPU_CONFIGS = [
    _wcfg(128, 128, 64, 8, 3),
    _wcfg(128, 128, 32, 8, 4),
    _wcfg(64, 128, 64, 4, 4),   # small I (n = 768/1024 for dW2's columns of A') keeps more CTAs
    _wcfg(128, 64, 64, 4, 4),
]
# fp32 (FMA): 128x128x32, 128x64x32 and 64x128x32 with 8 warps each spilled 12-16 B in one of the
# gather/partial variants; 64x64x32 w8 fits every variant (64-141 registers, 16 KB smem).
_WGRAD_GPU_CONFIGS_FP32 = [
    _wcfg(64, 64, 32, 8, 3),
]
_WGRAD_CONFIGS = DtypeConfigs({2: _WGRAD_GPU_CONFIGS, 4: _WGRAD_GPU_CONFIGS_FP32}, _wcfg(32, 32, 32, 1, 1))


@triton.autotune(configs=_WGRAD_CONFIGS.configs, key=["I", "J", "PARTIAL"], prune_configs_by=_WGRAD_CONFIGS.prune_by)
@triton.jit
def _weight_grad_kernel(
    p_ptr, q_ptr, p_rows_ptr, q_rows_ptr, expert_offsets_ptr,
    slot_start_ptr, slot_expert_ptr, slot_row_start_ptr, slot_row_end_ptr, ws_ptr, out_ptr,
    I, J, chunk,
    stride_pr, stride_pi,
    stride_qr, stride_qj,
    stride_oe, stride_oi, stride_oj,
    PARTIAL: tl.constexpr, HAS_SLOTS: tl.constexpr,
    GATHER_P: tl.constexpr, GATHER_Q: tl.constexpr, IEEE: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """PARTIAL: program (tile, slot) reduces the slot's chunk of rows (an expert's extra chunk) into
    the fp32 workspace ws[slot]. Otherwise program (tile, e) reduces expert e's first chunk, adds
    the expert's workspace partials in slot order and stores dW[e]: deterministic, no atomics."""
    pid = tl.program_id(0)
    g = tl.program_id(1)
    num_j = tl.cdiv(J, BLOCK_J)
    pid_i = pid // num_j
    pid_j = pid % num_j
    if PARTIAL:
        e = tl.load(slot_expert_ptr + g)
        if e < 0:
            return
        r_lo = tl.load(slot_row_start_ptr + g)
        r_hi = tl.load(slot_row_end_ptr + g)
    else:
        e = g
        r_lo = tl.load(expert_offsets_ptr + e)
        r_hi = tl.minimum(tl.load(expert_offsets_ptr + e + 1), r_lo + chunk)
    ii = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    jj = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    i_mask = ii < I
    j_mask = jj < J
    acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
    # an expert with no rows runs zero iterations and stores a zero gradient
    for r0 in range(r_lo, r_hi, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        r_mask = rr < r_hi
        if GATHER_P:
            prow = tl.load(p_rows_ptr + rr, mask=r_mask, other=0).to(tl.int64)
        else:
            prow = rr.to(tl.int64)
        if GATHER_Q:
            qrow = tl.load(q_rows_ptr + rr, mask=r_mask, other=0).to(tl.int64)
        else:
            qrow = rr.to(tl.int64)
        pb = tl.load(p_ptr + prow[None, :] * stride_pr + ii[:, None] * stride_pi,
                     mask=i_mask[:, None] & r_mask[None, :], other=0.0)
        qb = tl.load(q_ptr + qrow[:, None] * stride_qr + jj[None, :] * stride_qj,
                     mask=r_mask[:, None] & j_mask[None, :], other=0.0)
        acc = mma(pb, qb, acc, IEEE, INTERPRET)
    ij_mask = i_mask[:, None] & j_mask[None, :]
    if HAS_SLOTS:
        ws_tile = ii[:, None].to(tl.int64) * J + jj[None, :]
        plane = (I * J).to(tl.int64)  # one (I, J) fp32 partial per workspace slot
        if PARTIAL:
            tl.store(ws_ptr + g * plane + ws_tile, acc, mask=ij_mask)
        else:
            for slot in range(tl.load(slot_start_ptr + e), tl.load(slot_start_ptr + e + 1)):
                acc += tl.load(ws_ptr + slot * plane + ws_tile, mask=ij_mask, other=0.0)
    if not PARTIAL:
        tl.store(out_ptr + e.to(tl.int64) * stride_oe + ii[:, None] * stride_oi + jj[None, :] * stride_oj,
                 cast(acc, out_ptr.dtype.element_ty, INTERPRET), mask=ij_mask)


def weight_grad(
    p: torch.Tensor,
    p_rows: Optional[torch.Tensor],
    q: torch.Tensor,
    q_rows: Optional[torch.Tensor],
    meta: RoutingMeta,
    out: torch.Tensor,
) -> torch.Tensor:
    """out[e] (I, J) = sum over sorted rows r of expert e of P[pr(r)]^T Q[qr(r)], where
    pr(r) = p_rows[r] if p_rows is given (a gather, e.g. token ids into dO or X) else r.
    out may have any strides (a transposed parameter's layout).

    An expert's rows beyond its first ``meta.wgrad_chunk`` are reduced by extra programs, one per
    chunk (``meta.slot_*``), into a transient fp32 workspace (S, I, J) that a second launch adds in
    slot order: with skewed routing one expert's rows no longer serialise on its I x J tiles alone.
    S = 0 (no expert over the chunk size can exist) skips the first launch and the workspace."""
    E, I, J = out.shape
    assert p.shape[1] == I and q.shape[1] == J
    dummy = meta.tok_sorted
    S = meta.num_slots
    # NaN-filled under launch_utils.DEBUG_FILL_NAN: a slot read before it was written shows up
    ws = alloc((S, I, J), torch.float32, p.device) if S else p
    args = (
        p, q, p_rows if p_rows is not None else dummy, q_rows if q_rows is not None else dummy,
        meta.expert_offsets, meta.slot_start, meta.slot_expert, meta.slot_row_start, meta.slot_row_end, ws, out,
        I, J, meta.wgrad_chunk,
        p.stride(0), p.stride(1),
        q.stride(0), q.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
    )
    flags = dict(HAS_SLOTS=S > 0, GATHER_P=p_rows is not None, GATHER_Q=q_rows is not None, **dot_flags(p.dtype))
    if S:
        grid_p = lambda META: (triton.cdiv(I, META["BLOCK_I"]) * triton.cdiv(J, META["BLOCK_J"]), S)
        _weight_grad_kernel[grid_p](*args, PARTIAL=True, **flags)
    grid = lambda META: (triton.cdiv(I, META["BLOCK_I"]) * triton.cdiv(J, META["BLOCK_J"]), E)
    _weight_grad_kernel[grid](*args, PARTIAL=False, **flags)
    return out
