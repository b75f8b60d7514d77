"""The dH kernel (SonicMoE's): the backward of the down projection and of the activation, fused.

Shape legend as in ``grouped_gemm``. Program (row tile p, column block j) computes
dA' = gather(dO) W2[e] for BLOCK_N columns of n (one wgmma-sized accumulator), then its epilogue,
per column slice of SLICE_N columns: dS partial = <dA', A> (+ <dO, b2[e]> in block 0),
dH = act'(H) * s * dA' (gate/up or the three swiglu3 blocks), A' = s * A (for dW2).

Why slices: the epilogue keeps ~8 fp32 tiles (dA', gate, up, act, dgate, dup, their 64-bit
addresses ...) live per column, so one full-width epilogue over 128 columns spills (the previous
kernel had to run with BLOCK_N = 32, and each program then re-gathered its 128 dO rows, d wide, for
32 columns only). Triton cannot slice a register tile, so the accumulator is halved by
reshape / permute / split (``jit_utils.halves``: contiguous halves, no data leaves the program) down to
SLICE_N-wide slices, and the epilogue runs on one slice at a time: only one slice's temporaries
are live next to the rest of the accumulator. The dS partials of the slices are added in a fixed
order (deterministic).

Register and shared-memory figures per config: examples/results/sm90_kernels*.json (no GPU was
available: speed is unmeasured, the fit is measured with ptxas for sm_90).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from moe_inductor.ops.activations import Activation
from moe_inductor.kernels.activation_jit import act_code, gated_bwd, gated_fwd, unary_fwd, unary_grad
from moe_inductor.kernels.grouped_gemm import GROUP_M, gate_up_cols, swizzled_tile, tile_rows
from moe_inductor.kernels.jit_utils import cast, halves, mma
from moe_inductor.kernels.launch_utils import DtypeConfigs, alloc, dot_flags
from moe_inductor.kernels.routing_meta import RoutingMeta


def _cfg(bn, bk, sn, warps, stages):
    return triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SLICE_N": sn}, num_warps=warps, num_stages=stages)


# Autotune candidates (speed reasoned, not measured: no GPU). Fit measured with ptxas for sm_90,
# both Triton versions, every variant (biases, interleaved gate/up, 16/32/64/128-row tiles):
# examples/results/sm90_kernels*.json, enforced by tests/test_kernel_resources.py; the epilogues
# outside those tables (gptoss with biases + interleaved, swiglu3, gelu) were compiled too.
# bf16 per stage: (BLOCK_M * BK + BK * BN) * 2 B. 8 warps: the 128 x 128 fp32 accumulator is 64
# registers per thread. Spilled (triton 3.9, 128-row tile): 32-column slices with gptoss + biases
# + interleaved (116 B), any 128- or 256-wide block with 16 warps (128-register cap, 92-380 B),
# 256 x 64 with 8 warps (112-824 B: the accumulator alone is 128 registers).
_DH_GPU_CONFIGS = [
    _cfg(128, 64, 16, 8, 4),    # 80 KB smem; 3.9: 249-255 registers at M = 128, 3.6: 182-191
    _cfg(128, 128, 16, 8, 3),   # long K (d = 4096/7168): half the loop iterations; 128 KB smem
]
# fp32 (IEEE: CUDA-core FMA, operand tiles in registers): 128 x 16 and 64 x 16 with 32-column
# slices spilled 4-88 B with biases (triton 3.9).
_DH_GPU_CONFIGS_FP32 = [
    _cfg(64, 16, 16, 8, 3),
    _cfg(64, 32, 16, 8, 3),
]
# Interpreter: 32-wide blocks in two 16-column slices, so the CPU tests run the sliced epilogue.
_DH_CONFIGS = DtypeConfigs({2: _DH_GPU_CONFIGS, 4: _DH_GPU_CONFIGS_FP32}, _cfg(32, 32, 16, 1, 1))


@triton.jit
def _dh_slice(da, col0, row_mask, s, h_row, dh_row, a_row, n_act, stride_hc, stride_dhc, stride_ac,
              alpha, limit, GATED: tl.constexpr, INTERLEAVED: tl.constexpr, UP_FIRST: tl.constexpr,
              ACT: tl.constexpr, INTERPRET: tl.constexpr, WIDTH: tl.constexpr):
    """The epilogue on WIDTH columns [col0, col0 + WIDTH) of n: stores dH and A' = s * A, returns
    the dS partial sum(dA' * A) of these columns (masked columns have dA' = 0)."""
    dt = dh_row.dtype.element_ty
    cols = col0 + tl.arange(0, WIDTH)
    mask2 = row_mask[:, None] & (cols < n_act)[None, :]
    if GATED:
        gate_cols, up_cols = gate_up_cols(cols, n_act, INTERLEAVED, UP_FIRST, ACT)
        g = tl.load(h_row + gate_cols[None, :] * stride_hc, mask=mask2, other=0.0).to(tl.float32)
        u = tl.load(h_row + up_cols[None, :] * stride_hc, mask=mask2, other=0.0).to(tl.float32)
        if ACT == 9:  # x1 * silu(x2) * up: d x1 = dA' silu(x2) up, d x2 = dA' x1 up silu'(x2), d up = dA' x1 silu(x2)
            x1 = tl.load(h_row + cols[None, :] * stride_hc, mask=mask2, other=0.0).to(tl.float32)
            sg = unary_fwd(g, 0)
            a = cast(x1 * sg * u, dt, INTERPRET).to(tl.float32)
            das = da * s[:, None]
            tl.store(dh_row + cols[None, :] * stride_dhc, cast(das * sg * u, dt, INTERPRET), mask=mask2)
            dg = das * x1 * u * unary_grad(g, 0)
            du = das * x1 * sg
        else:
            a = cast(gated_fwd(g, u, alpha, limit, ACT), dt, INTERPRET).to(tl.float32)
            dg, du = gated_bwd(g, u, da * s[:, None], alpha, limit, ACT)
        tl.store(dh_row + gate_cols[None, :] * stride_dhc, cast(dg, dt, INTERPRET), mask=mask2)
        tl.store(dh_row + up_cols[None, :] * stride_dhc, cast(du, dt, INTERPRET), mask=mask2)
    else:
        z = tl.load(h_row + cols[None, :] * stride_hc, mask=mask2, other=0.0).to(tl.float32)
        a = cast(unary_fwd(z, ACT), dt, INTERPRET).to(tl.float32)
        tl.store(dh_row + cols[None, :] * stride_dhc, cast(da * s[:, None] * unary_grad(z, ACT), dt, INTERPRET),
                 mask=mask2)
    tl.store(a_row + cols[None, :] * stride_ac, cast(a * s[:, None], dt, INTERPRET), mask=mask2)
    return tl.sum(da * a, axis=1)


@triton.jit
def _dh_span2(da, col0, row_mask, s, h_row, dh_row, a_row, n_act, stride_hc, stride_dhc, stride_ac,
              alpha, limit, GATED: tl.constexpr, INTERLEAVED: tl.constexpr, UP_FIRST: tl.constexpr,
              ACT: tl.constexpr, INTERPRET: tl.constexpr, BLOCK_M: tl.constexpr, WIDTH: tl.constexpr,
              SLICE_N: tl.constexpr):
    """``_dh_slice`` over WIDTH = SLICE_N or 2 * SLICE_N columns, one slice at a time."""
    if WIDTH == SLICE_N:
        ds = _dh_slice(da, col0, row_mask, s, h_row, dh_row, a_row, n_act, stride_hc, stride_dhc, stride_ac,
                       alpha, limit, GATED, INTERLEAVED, UP_FIRST, ACT, INTERPRET, WIDTH)
    else:
        lo, hi = halves(da, BLOCK_M, WIDTH)
        ds = _dh_slice(lo, col0, row_mask, s, h_row, dh_row, a_row, n_act, stride_hc, stride_dhc, stride_ac,
                       alpha, limit, GATED, INTERLEAVED, UP_FIRST, ACT, INTERPRET, SLICE_N)
        ds += _dh_slice(hi, col0 + SLICE_N, row_mask, s, h_row, dh_row, a_row, n_act, stride_hc, stride_dhc,
                        stride_ac, alpha, limit, GATED, INTERLEAVED, UP_FIRST, ACT, INTERPRET, SLICE_N)
    return ds


@triton.jit
def _dh_span4(da, col0, row_mask, s, h_row, dh_row, a_row, n_act, stride_hc, stride_dhc, stride_ac,
              alpha, limit, GATED: tl.constexpr, INTERLEAVED: tl.constexpr, UP_FIRST: tl.constexpr,
              ACT: tl.constexpr, INTERPRET: tl.constexpr, BLOCK_M: tl.constexpr, WIDTH: tl.constexpr,
              SLICE_N: tl.constexpr):
    """``_dh_span2`` over up to 4 * SLICE_N columns (halves of 2 * SLICE_N each above that)."""
    if WIDTH <= 2 * SLICE_N:
        ds = _dh_span2(da, col0, row_mask, s, h_row, dh_row, a_row, n_act, stride_hc, stride_dhc, stride_ac,
                       alpha, limit, GATED, INTERLEAVED, UP_FIRST, ACT, INTERPRET, BLOCK_M, WIDTH, SLICE_N)
    else:
        lo, hi = halves(da, BLOCK_M, WIDTH)
        ds = _dh_span2(lo, col0, row_mask, s, h_row, dh_row, a_row, n_act, stride_hc, stride_dhc, stride_ac,
                       alpha, limit, GATED, INTERLEAVED, UP_FIRST, ACT, INTERPRET, BLOCK_M, WIDTH // 2, SLICE_N)
        ds += _dh_span2(hi, col0 + WIDTH // 2, row_mask, s, h_row, dh_row, a_row, n_act, stride_hc, stride_dhc,
                        stride_ac, alpha, limit, GATED, INTERLEAVED, UP_FIRST, ACT, INTERPRET, BLOCK_M,
                        WIDTH // 2, SLICE_N)
    return ds


@triton.jit
def _dh_epilogue(da, col0, row_mask, s, h_row, dh_row, a_row, n_act, stride_hc, stride_dhc, stride_ac,
                 alpha, limit, GATED: tl.constexpr, INTERLEAVED: tl.constexpr, UP_FIRST: tl.constexpr,
                 ACT: tl.constexpr, INTERPRET: tl.constexpr, BLOCK_M: tl.constexpr, WIDTH: tl.constexpr,
                 SLICE_N: tl.constexpr):
    """The epilogue over a whole column block: up to 8 slices (``_dh_span4`` on each half above 4)."""
    tl.static_assert(WIDTH % SLICE_N == 0 and WIDTH <= 8 * SLICE_N)
    if WIDTH <= 4 * SLICE_N:
        ds = _dh_span4(da, col0, row_mask, s, h_row, dh_row, a_row, n_act, stride_hc, stride_dhc, stride_ac,
                       alpha, limit, GATED, INTERLEAVED, UP_FIRST, ACT, INTERPRET, BLOCK_M, WIDTH, SLICE_N)
    else:
        lo, hi = halves(da, BLOCK_M, WIDTH)
        ds = _dh_span4(lo, col0, row_mask, s, h_row, dh_row, a_row, n_act, stride_hc, stride_dhc, stride_ac,
                       alpha, limit, GATED, INTERLEAVED, UP_FIRST, ACT, INTERPRET, BLOCK_M, WIDTH // 2, SLICE_N)
        ds += _dh_span4(hi, col0 + WIDTH // 2, row_mask, s, h_row, dh_row, a_row, n_act, stride_hc, stride_dhc,
                        stride_ac, alpha, limit, GATED, INTERLEAVED, UP_FIRST, ACT, INTERPRET, BLOCK_M,
                        WIDTH // 2, SLICE_N)
    return ds


@triton.jit
def _ds_parts(ds_part_ptr, ds, rows64, row_mask, pid_n, stride_dsr, num_parts, R: tl.constexpr):
    """The dS partial buffer has one column per PART_N columns of n, whatever BLOCK_N the autotuner
    picks: this program owns columns [pid_n * R, (pid_n + 1) * R), writes ds to the first and zeros
    to the rest. Every column is written by every config, so autotuning (which runs several configs
    on the same buffer) cannot leave stale partials behind and no zero-fill is needed."""
    for i in tl.static_range(R):
        part_col = pid_n * R + i + tl.zeros_like(rows64)  # as a (BLOCK_M,) tensor for the mask
        if i == 0:
            part = ds
        else:
            part = tl.zeros_like(ds)
        tl.store(ds_part_ptr + rows64 * stride_dsr + part_col, part, mask=row_mask & (part_col < num_parts))


@triton.autotune(configs=_DH_CONFIGS.configs, key=["n_act", "d", "GATED", "ACT", "BLOCK_M"], prune_configs_by=_DH_CONFIGS.prune_by)
@triton.jit
def _dh_kernel(
    dout_ptr, w2_ptr, h_ptr, b2_ptr, s_sorted_ptr,
    dh_ptr, a_scaled_ptr, ds_part_ptr,
    tok_sorted_ptr, tile_expert_ptr, tile_row_start_ptr, tile_row_end_ptr,
    num_tiles, n_act, d,
    stride_gt, stride_gd,
    stride_we, stride_wd, stride_wn,
    stride_hr, stride_hc,
    stride_be, stride_bd,
    stride_dhr, stride_dhc,
    stride_ar, stride_ac,
    stride_dsr, num_parts,
    alpha, limit,
    HAS_B2: tl.constexpr, GATED: tl.constexpr, INTERLEAVED: tl.constexpr, UP_FIRST: tl.constexpr, ACT: tl.constexpr,
    IEEE: tl.constexpr, INTERPRET: tl.constexpr, GROUP_M: tl.constexpr,
    PART_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SLICE_N: tl.constexpr,
):
    # one kernel body (main loop + epilogue call): splitting it would only move the argument list
    pid_m, pid_n = swizzled_tile(num_tiles, tl.cdiv(n_act, BLOCK_N), GROUP_M)
    e = tl.load(tile_expert_ptr + pid_m)
    rows, row_mask, rows64 = tile_rows(tile_row_start_ptr, tile_row_end_ptr, pid_m, BLOCK_M)
    if e < 0:
        if e == -2:
            # dropped assignments: their score gradient is 0 (their dS partials are zeros); dH and
            # A' rows are never read for them and stay unwritten
            zero = tl.zeros((BLOCK_M,), dtype=tl.float32)
            _ds_parts(ds_part_ptr, zero, rows64, row_mask, pid_n, stride_dsr, num_parts, BLOCK_N // PART_N)
        return
    tok = tl.load(tok_sorted_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < n_act
    e64 = e.to(tl.int64)
    w_base = w2_ptr + e64 * stride_we
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    bias_dot = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, d, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < d
        gb = tl.load(dout_ptr + tok[:, None] * stride_gt + ks[None, :] * stride_gd,
                     mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        wb = tl.load(w_base + ks[:, None] * stride_wd + cols[None, :] * stride_wn,
                     mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = mma(gb, wb, acc, IEEE, INTERPRET)
    if HAS_B2:
        if pid_n == 0:
            # <dO, b2[e]>, the bias part of dS = <dO, Y>: one more pass over the row tile's dO rows
            # (L2-resident: just gathered) in column block 0 only. Inside the main loop it kept a
            # register copy of every dO tile and spilled at BLOCK_N = 128.
            for k0 in range(0, d, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_mask = ks < d
                gb = tl.load(dout_ptr + tok[:, None] * stride_gt + ks[None, :] * stride_gd,
                             mask=row_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
                bb = tl.load(b2_ptr + e64 * stride_be + ks * stride_bd, mask=k_mask, other=0.0).to(tl.float32)
                bias_dot += tl.sum(gb * bb[None, :], axis=1)

    da = cast(acc, h_ptr.dtype.element_ty, INTERPRET).to(tl.float32)  # dA' rounded like the reference's mm output
    s = tl.load(s_sorted_ptr + rows, mask=row_mask, other=0.0)
    ds = _dh_epilogue(da, pid_n * BLOCK_N, row_mask, s, h_ptr + rows64[:, None] * stride_hr,
                      dh_ptr + rows64[:, None] * stride_dhr, a_scaled_ptr + rows64[:, None] * stride_ar,
                      n_act, stride_hc, stride_dhc, stride_ac, alpha, limit,
                      GATED, INTERLEAVED, UP_FIRST, ACT, INTERPRET, BLOCK_M, BLOCK_N, SLICE_N)
    if HAS_B2:
        ds += bias_dot  # zero outside column block 0
    # partials summed by torch in a fixed order after the launch: dS is deterministic, no atomics
    _ds_parts(ds_part_ptr, ds, rows64, row_mask, pid_n, stride_dsr, num_parts, BLOCK_N // PART_N)


_DH_MIN_BLOCK_N = min(c.kwargs["BLOCK_N"] for c in _DH_CONFIGS.gpu_configs + [_DH_CONFIGS.interpret_config])
assert all(c.kwargs["BLOCK_N"] % _DH_MIN_BLOCK_N == 0 for c in _DH_CONFIGS), "dS partial layout needs it"
assert all(c.kwargs["BLOCK_N"] % c.kwargs["SLICE_N"] == 0 for c in _DH_CONFIGS.gpu_configs), "whole slices"


def dh_backward(
    grad_out: torch.Tensor,
    w2: torch.Tensor,
    b2: Optional[torch.Tensor],
    h_sorted: torch.Tensor,
    meta: RoutingMeta,
    act: Activation,
    interleaved: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns dH_sorted (A, H), A' = s * act(H) (A, n) in the input dtype, dS_sorted (A,) fp32
    (0 for dropped assignments; their dH and A' rows are left unwritten: nothing reads them)."""
    A, h_cols = h_sorted.shape
    E, d, n_act = w2.shape
    dt = h_sorted.dtype
    dh = alloc((A, h_cols), dt, h_sorted.device)
    a_scaled = alloc((A, n_act), dt, h_sorted.device)
    # One dS partial per (row, PART_N columns of n); see _ds_parts for why it is config-independent.
    ds_part = alloc((A, triton.cdiv(n_act, _DH_MIN_BLOCK_N)), torch.float32, h_sorted.device)
    b = b2 if b2 is not None else h_sorted
    grid = lambda META: (meta.num_tiles * triton.cdiv(n_act, META["BLOCK_N"]),)
    _dh_kernel[grid](
        grad_out, w2, h_sorted, b, meta.scores_sorted,
        dh, a_scaled, ds_part,
        meta.tok_sorted, meta.tile_expert, meta.tile_row_start, meta.tile_row_end,
        meta.num_tiles, n_act, d,
        grad_out.stride(0), grad_out.stride(1),
        w2.stride(0), w2.stride(1), w2.stride(2),
        h_sorted.stride(0), h_sorted.stride(1),
        b.stride(0) if b2 is not None else 0, b.stride(1) if b2 is not None else 0,
        dh.stride(0), dh.stride(1),
        a_scaled.stride(0), a_scaled.stride(1),
        ds_part.stride(0), ds_part.shape[1],
        float(act.alpha), float(act.limit),
        HAS_B2=b2 is not None, GATED=act.width > 1, INTERLEAVED=interleaved, UP_FIRST=act.up_first, ACT=act_code(act),
        GROUP_M=GROUP_M, PART_N=_DH_MIN_BLOCK_N, BLOCK_M=meta.tile_m, **dot_flags(dt),
    )
    return dh, a_scaled, ds_part.sum(dim=1)
