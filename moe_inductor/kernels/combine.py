"""Deterministic reductions over assignment rows: per-token gather-and-sum and per-expert column sums.

Shape legend: T tokens, D columns (d), E experts, A assignments (sorted rows).

  gather_sum      out[t] = sum over sorted rows r of token t of (scale[r] *) src[r]    O, dX
  segment_colsum  out[e] = sum over sorted rows r of expert e of (scale[r] *) src[g(r)]  db1, db2

No atomics: each output element is owned by one program, which adds its inputs in fp32 in an
order fixed by the routing and the static shapes (a token's rows, in expert order, in blocks of
BLOCK_J = config.gather_block_rows(A, T) rows, each block summed and added to the total; an
expert's rows in sorted order), never by the autotuned config, so results are bitwise
reproducible run to run and need no zero-initialised output.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from moe_inductor.kernels import config
from moe_inductor.kernels.jit_utils import cast
from moe_inductor.kernels.launch_utils import INTERPRET, alloc, autotune_configs
from moe_inductor.kernels.routing_meta import RoutingMeta

# Per-expert column sums (db1, db2): a program owns BLOCK_C columns of one expert and adds the
# expert's rows in blocks of BLOCK_R (each block summed, then added to the fp32 total). Fixed
# constants, not autotuned: the summation order follows them, so results stay bitwise reproducible.
# The gathered variant (db2: rows of dY read through tok_sorted, scaled) holds BLOCK_R * BLOCK_C /
# (32 * warps) loaded elements and as many 64-bit addresses per thread: (64, 256) at 4 warps spilled
# about 3 KB under triton 3.6 / ptxas 12.8 for sm_90 (none under triton 3.9), (64, 128) at 4 warps
# and (64, 256) at 8 warps spilled under 3.6 too; (32, 128) at 4 warps uses 128 registers, no
# spills under either (examples/kernel_resources.py, all dtypes, row tiles 16-128).
_COLSUM_BLOCK_R = 16 if INTERPRET else 32
_COLSUM_BLOCK_C = 64 if INTERPRET else 128
_COLSUM_WARPS = 4


# The gather-and-sum is bandwidth bound (each of a token's rows of D elements read once). A program
# owns BLOCK_D columns of one token and loads BLOCK_J of its rows at once, a (BLOCK_J, BLOCK_D)
# block per step, so the K row reads of a token are in flight together instead of one after the
# other. Autotuned over BLOCK_D and warps only (reasoned, unmeasured: no GPU when written): the
# fp32 summation order depends on BLOCK_J alone, which comes from static shapes
# (config.gather_block_rows), so whichever config the tuner picks, results are bitwise the same.
def _gcfg(bd, warps):
    return triton.Config({"BLOCK_D": bd}, num_warps=warps, num_stages=1)


# Each thread holds BLOCK_J * BLOCK_D / (32 * warps) loaded elements per step: at most 64 at the
# largest BLOCK_J (16) for every config here (ptxas for sm_90, triton 3.9: no spills at BLOCK_J 16;
# (1024, 4) and (2048, 8) spilled there).
_GATHER_GPU_CONFIGS = [
    _gcfg(256, 4),    # small d or many tokens: more programs
    _gcfg(512, 4),    # 1 KB bf16 per row
    _gcfg(512, 8),
    _gcfg(1024, 8),   # wide d (4096 / 7168): fewer programs, 2 KB per row
]
_GATHER_CONFIGS = autotune_configs(_GATHER_GPU_CONFIGS, _gcfg(64, 1))


@triton.autotune(configs=_GATHER_CONFIGS, key=["D", "BLOCK_J"])
@triton.jit
def _gather_sum_kernel(
    src_ptr, scale_ptr, token_offsets_ptr, token_rows_ptr, out_ptr,
    D,
    stride_sr, stride_sd,
    stride_ot, stride_od,
    HAS_SCALE: tl.constexpr, INTERPRET: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < D
    j_lo = tl.load(token_offsets_ptr + t)
    j_hi = tl.load(token_offsets_ptr + t + 1)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    # a token with no assignments gets zeros (a dropped token under token rounding)
    for j0 in range(j_lo, j_hi, BLOCK_J):
        js = j0 + tl.arange(0, BLOCK_J)
        j_mask = js < j_hi
        r = tl.load(token_rows_ptr + js, mask=j_mask, other=0).to(tl.int64)
        v = tl.load(src_ptr + r[:, None] * stride_sr + cols[None, :] * stride_sd,
                    mask=j_mask[:, None] & col_mask[None, :], other=0.0).to(tl.float32)
        if HAS_SCALE:
            v = v * tl.load(scale_ptr + r, mask=j_mask, other=0.0)[:, None]
        acc += tl.sum(v, axis=0)
    tl.store(out_ptr + t.to(tl.int64) * stride_ot + cols * stride_od, cast(acc, out_ptr.dtype.element_ty, INTERPRET),
             mask=col_mask)


def gather_sum(
    src_sorted: torch.Tensor, scale_sorted: Optional[torch.Tensor], meta: RoutingMeta, num_tokens: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """src_sorted (A, D) rows in sorted order, scale_sorted (A,) fp32 or None -> (T, D) out_dtype."""
    A, D = src_sorted.shape
    out = alloc((num_tokens, D), out_dtype, src_sorted.device)
    if num_tokens == 0 or D == 0:
        return out
    scale = scale_sorted if scale_sorted is not None else meta.scores_sorted
    grid = lambda META: (num_tokens, triton.cdiv(D, META["BLOCK_D"]))
    _gather_sum_kernel[grid](
        src_sorted, scale, meta.token_offsets, meta.token_rows, out,
        D,
        src_sorted.stride(0), src_sorted.stride(1),
        out.stride(0), out.stride(1),
        HAS_SCALE=scale_sorted is not None, INTERPRET=INTERPRET,
        BLOCK_J=config.gather_block_rows(A, num_tokens),
    )
    return out


@triton.jit
def _segment_colsum_kernel(
    src_ptr, src_rows_ptr, scale_ptr, expert_offsets_ptr, out_ptr,
    C,
    stride_sr, stride_sc,
    stride_oe, stride_oc,
    GATHER: tl.constexpr, HAS_SCALE: tl.constexpr, INTERPRET: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    e = tl.program_id(1)
    col_mask = cols < C
    r_lo = tl.load(expert_offsets_ptr + e)
    r_hi = tl.load(expert_offsets_ptr + e + 1)
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for r0 in range(r_lo, r_hi, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        r_mask = rr < r_hi
        if GATHER:
            src_r = tl.load(src_rows_ptr + rr, mask=r_mask, other=0).to(tl.int64)
        else:
            src_r = rr.to(tl.int64)
        v = tl.load(src_ptr + src_r[:, None] * stride_sr + cols[None, :] * stride_sc,
                    mask=r_mask[:, None] & col_mask[None, :], other=0.0).to(tl.float32)
        if HAS_SCALE:
            v = v * tl.load(scale_ptr + rr, mask=r_mask, other=0.0)[:, None]
        acc += tl.sum(v, axis=0)
    tl.store(out_ptr + e.to(tl.int64) * stride_oe + cols * stride_oc, cast(acc, out_ptr.dtype.element_ty, INTERPRET), mask=col_mask)


def segment_colsum(
    src: torch.Tensor, src_rows: Optional[torch.Tensor], scale_sorted: Optional[torch.Tensor],
    meta: RoutingMeta, num_experts: int, out_dtype: torch.dtype,
) -> torch.Tensor:
    """out (E, C): out[e] = sum over sorted rows r of expert e of scale[r] * src[src_rows[r]]
    (src_rows None: src is already in sorted order; scale None: 1)."""
    C = src.shape[1]
    out = alloc((num_experts, C), out_dtype, src.device)
    grid = (triton.cdiv(C, _COLSUM_BLOCK_C), num_experts)
    _segment_colsum_kernel[grid](
        src, src_rows if src_rows is not None else meta.tok_sorted,
        scale_sorted if scale_sorted is not None else meta.scores_sorted,
        meta.expert_offsets, out,
        C,
        src.stride(0), src.stride(1),
        out.stride(0), out.stride(1),
        GATHER=src_rows is not None, HAS_SCALE=scale_sorted is not None, INTERPRET=INTERPRET,
        BLOCK_R=_COLSUM_BLOCK_R, BLOCK_C=_COLSUM_BLOCK_C,
        num_warps=_COLSUM_WARPS,
    )
    return out
