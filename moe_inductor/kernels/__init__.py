"""Triton kernels for the fused MoE op (SonicMoE-style), behind import-cheap entry points.

Importing this package does not import triton: the launchers are imported on the first call, so
``import moe_inductor`` stays cheap and works where triton is missing.

Exports:
  unsupported_reason(x, w1, w2, act) -> str | None
  unsupported_reason_meta(device, dtype, act) -> str | None   (what a rewrite can know)
  triton_moe_forward(x, token_ids, expert_ids, scores, w1, w2, b1, b2, act, interleaved, keep_h)
      -> (out (T, d) x.dtype, h_sorted (A, H) or (0, H), order (A,) int32)
  triton_moe_backward(grad_out, x, token_ids, expert_ids, scores, w1, w2, b1, b2, h_sorted|None,
                      order, act, interleaved) -> (dx, dscores, dw1, dw2, db1|None, db2|None)
Semantics: exactly ``moe_inductor.ops.reference.moe_forward`` / ``moe_backward``.

Layout: routing_meta (device-side routing tables and tile schedule) -> grouped_gemm (up-proj,
grouped GEMM, dH, weight-grad kernels and launchers) + combine (gather-and-sum, per-expert column
sums) + activation_jit (epilogue math) -> fused_moe_triton (sequencing) -> this module.
"""
from __future__ import annotations

import functools
import importlib.util
import os

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=None)
def _cuda_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def unsupported_reason_meta(device: torch.device, dtype: torch.dtype, act) -> str | None:
    """The part of ``unsupported_reason`` that needs no shapes: device, dtype and activation.
    Also what the rewrite uses to say, once per block, what a block will run on."""
    device = torch.device(device)
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if dtype not in SUPPORTED_DTYPES:
        return f"dtype {dtype} (the kernels serve float32, float16, bfloat16)"
    if device.type == "cuda":
        if dtype == torch.bfloat16 and _cuda_capability(device.index or 0) < (8, 0):
            return "bfloat16 tl.dot needs compute capability 8.0+"
    elif not (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"):
        return f"tensors on {device.type} (the kernels need CUDA, or CPU under TRITON_INTERPRET=1)"
    if not act.triton:
        return f"activation {act.spec} has no Triton epilogue (PyTorch path only)"
    return None


def unsupported_reason(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, act,
                       num_assignments: int = 0) -> str | None:
    """None if the Triton kernels can serve this call, else a short reason (metadata only)."""
    reason = unsupported_reason_meta(x.device, x.dtype, act)
    if reason is not None:
        return reason
    if w1.dim() != 3 or w2.dim() != 3:
        return "expert weights must be 3-D"
    E, h_cols, d = w1.shape
    n = w2.shape[2]
    if E == 0 or d == 0 or n == 0 or h_cols == 0:
        return "empty expert weights"
    if h_cols != act.width * n:
        return f"activation {act.spec} needs w1 with {act.width}n rows"
    if x.shape[0] >= 2**31 or num_assignments >= 2**31:
        return "2**31 or more tokens or assignments (int32 routing tables)"
    if num_assignments * max(h_cols, d) >= 2**62:
        return "sorted activations too large to index"
    if E > 65535:
        return "more than 65535 experts (grid axis 1 of the per-expert kernels)"
    return None


def _require_supported(x, w1, w2, act) -> None:
    reason = unsupported_reason(x, w1, w2, act)
    if reason is not None:
        raise ValueError(f"fused_moe: the Triton kernels cannot serve this call: {reason} (use impl='torch')")


def triton_moe_forward(x, token_ids, expert_ids, scores, w1, w2, b1, b2, act, interleaved, keep_h):
    _require_supported(x, w1, w2, act)
    from moe_inductor.kernels.fused_moe_triton import forward

    return forward(x, token_ids, expert_ids, scores, w1, w2, b1, b2, act, interleaved, keep_h)


def triton_moe_backward(grad_out, x, token_ids, expert_ids, scores, w1, w2, b1, b2, h_sorted, order, act,
                        interleaved):
    _require_supported(x, w1, w2, act)
    from moe_inductor.kernels.fused_moe_triton import backward

    return backward(grad_out, x, token_ids, expert_ids, scores, w1, w2, b1, b2, h_sorted, order, act, interleaved)


__all__ = ["unsupported_reason", "unsupported_reason_meta", "triton_moe_forward", "triton_moe_backward", "SUPPORTED_DTYPES"]
