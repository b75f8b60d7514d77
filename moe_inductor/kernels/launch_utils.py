"""Helpers shared by the kernel launchers: interpreter detection, output allocation, autotune configs.

Imports triton; only the launcher modules import this one (``moe_inductor.kernels`` imports them
lazily, so ``import moe_inductor`` never imports triton).
"""
from __future__ import annotations

import os

import torch
import triton

# Set before triton is imported (tests/conftest.py does it on machines without CUDA).
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Debug aid for tests: fill every fresh output buffer with NaN (or -1 for integers) so a kernel
# that forgets to write a row or column shows up as NaN in the comparison instead of passing on
# whatever the allocator happened to return. Off by default: it costs a memset per buffer.
DEBUG_FILL_NAN = os.environ.get("MOE_INDUCTOR_DEBUG_FILL_NAN") == "1"

# fp32 operands go through tl.dot with input_precision="ieee" (full fp32 products, as the PyTorch
# path computes them). MOE_INDUCTOR_ALLOW_TF32=1 opts in to tf32 tensor cores for fp32 inputs
# (10-bit mantissa, ~1e-3 relative error, much faster on Ampere/Hopper), like
# torch.backends.cuda.matmul.allow_tf32 for torch.mm. Read once at import. The interpreter ignores
# input_precision, so only the GPU (and the sm_90 compile test) sees the difference.
ALLOW_TF32 = os.environ.get("MOE_INDUCTOR_ALLOW_TF32") == "1"


def alloc(shape, dtype: torch.dtype, device) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    if DEBUG_FILL_NAN:
        out.fill_(float("nan") if dtype.is_floating_point else -1)
    return out


def dot_flags(dtype: torch.dtype) -> dict:
    """Constexpr flags of ``jit_utils.mma`` / ``cast`` for operands of this dtype (see there).

    IEEE for fp32 unless ALLOW_TF32: tf32 would make fp32 results differ from the reference by ~1e-3."""
    return {"INTERPRET": INTERPRET, "IEEE": dtype == torch.float32 and not ALLOW_TF32}


def autotune_configs(gpu_configs: list, interpret_config: triton.Config) -> list:
    """Under the interpreter autotuning would run every config ~1000x slower: one config only."""
    return [interpret_config] if INTERPRET else gpu_configs
