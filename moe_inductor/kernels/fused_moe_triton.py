"""Forward and backward of the fused MoE op on Triton kernels (SonicMoE's dataflow).

Shape legend as in ``moe_inductor.ops.reference`` (T, d, n, H = 2n or n, E, A). Semantics are exactly
``reference.moe_forward`` / ``reference.moe_backward``; this module only sequences the launches:

  forward   routing meta -> up_proj (gather X, write H if kept, A = act(H)) -> sorted_gemm
            (Y = A W2^T + b2, transient) -> gather_sum (O[t] = sum s * Y, fp32, deterministic)
  backward  routing meta (reusing the forward's order) -> [up_proj to recompute H] -> dh_backward
            (dA' = gather(dO) W2, dS, dH, A' = s A) -> weight_grad (dW2 = gather(dO)^T A',
            dW1 = dH^T gather(X)) -> segment_colsum (db1, db2) -> sorted_gemm (dX' = dH W1)
            -> gather_sum (dX)

Transients live only inside one call: A and Y (forward), A', dH, dX' (backward), the weight-grad
workspace (skewed routing only). Nothing here reads device data on the host.

Dropped assignments (expert id -1): their rows of the saved H are zeroed by up_proj (as in the
reference) and never read; their score gradient is written as 0 by dH.
Weight gradients are allocated in the parameter's layout (``_grad_like``): a transposed expert
weight (GPT-OSS stores (E, d, 2n) and passes a transposed view) gets a gradient with the same
strides, so autograd's transpose-back hands the parameter a contiguous gradient with no copy.
"""
from __future__ import annotations

from typing import Optional

import torch

from moe_inductor.ops.activations import Activation
from moe_inductor.kernels import config, launch_utils
from moe_inductor.kernels.combine import gather_sum, segment_colsum
from moe_inductor.kernels.dh import dh_backward
from moe_inductor.kernels.grouped_gemm import sorted_gemm, up_proj, weight_grad
from moe_inductor.kernels.launch_utils import alloc
from moe_inductor.kernels.routing_meta import build_routing_meta


def _grad_like(w: torch.Tensor) -> torch.Tensor:
    """An uninitialised gradient buffer with w's strides when w is dense (e.g. a transposed view),
    else contiguous (torch.empty_like's preserve_format rule; op.py's fake follows the same rule)."""
    out = torch.empty_like(w)
    if launch_utils.DEBUG_FILL_NAN:
        out.fill_(float("nan"))
    return out


def forward(x, token_ids, expert_ids, scores, w1, w2, b1, b2, act: Activation, interleaved: bool, keep_h: bool):
    T, d = x.shape
    E, h_cols, _ = w1.shape
    n_act = w2.shape[2]
    A = token_ids.shape[0]
    if A == 0:
        order = torch.empty(0, dtype=torch.int32, device=x.device)
        return torch.zeros_like(x), x.new_empty((0, h_cols)), order
    # the kernels' row tile, from static shapes (token rounding's tile is config.TILE_M, separate)
    meta = build_routing_meta(token_ids, expert_ids, scores, T, E, config.kernel_tile_m(A, E))
    h_sorted = alloc((A, h_cols), x.dtype, x.device) if keep_h else x.new_empty((0, h_cols))
    a_sorted = alloc((A, n_act), x.dtype, x.device)
    up_proj(x, w1, b1, meta, act, interleaved, h_out=h_sorted if keep_h else None, a_out=a_sorted)
    y_sorted = sorted_gemm(a_sorted, w2.transpose(1, 2), b2, meta)
    del a_sorted
    out = gather_sum(y_sorted, meta.scores_sorted, meta, T, x.dtype)
    return out, h_sorted, meta.order


def backward(grad_out, x, token_ids, expert_ids, scores, w1, w2, b1, b2, h_sorted: Optional[torch.Tensor],
             order, act: Activation, interleaved: bool):
    T, d = x.shape
    E, h_cols, _ = w1.shape
    A = token_ids.shape[0]
    if A == 0:
        return (
            torch.zeros_like(x), torch.zeros_like(scores), torch.zeros_like(w1), torch.zeros_like(w2),
            torch.zeros_like(b1) if b1 is not None else None, torch.zeros_like(b2) if b2 is not None else None,
        )
    meta = build_routing_meta(token_ids, expert_ids, scores, T, E, config.kernel_tile_m(A, E), order=order)
    if h_sorted is None:
        h_sorted = alloc((A, h_cols), x.dtype, x.device)
        up_proj(x, w1, b1, meta, act, interleaved, h_out=h_sorted, a_out=None)
    dh_sorted, a_scaled, ds_sorted = dh_backward(grad_out, w2, b2, h_sorted, meta, act, interleaved)
    dw2 = weight_grad(grad_out, meta.tok_sorted, a_scaled, None, meta, _grad_like(w2))
    del a_scaled
    dw1 = weight_grad(dh_sorted, None, x, meta.tok_sorted, meta, _grad_like(w1))
    db1 = segment_colsum(dh_sorted, None, None, meta, E, b1.dtype) if b1 is not None else None
    db2 = segment_colsum(grad_out, meta.tok_sorted, meta.scores_sorted, meta, E, b2.dtype) if b2 is not None else None
    dx_sorted = sorted_gemm(dh_sorted, w1, None, meta)
    del dh_sorted
    dx = gather_sum(dx_sorted, None, meta, T, x.dtype)
    # dropped assignments (expert id -1) get dS = 0 from dH's dropped-row tiles
    dscores = ds_sorted.index_select(0, meta.inv_order.long()).to(scores.dtype)
    return dx, dscores, dw1, dw2, db1, db2
