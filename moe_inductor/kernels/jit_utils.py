"""@triton.jit helpers shared by the kernels: the tl.dot wrapper and the output-dtype cast.

Both take the constexpr INTERPRET flag (``launch_utils.INTERPRET``); on a GPU it is False and
they compile to a plain ``tl.dot`` / ``.to(dtype)``.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def mma(a, b, acc, IEEE: tl.constexpr, INTERPRET: tl.constexpr):
    """acc + a @ b with fp32 accumulation.

    INTERPRET: the interpreter runs tl.dot as a numpy matmul on the raw storage (garbage for bf16,
    fp16 accumulation for fp16), so both operands are upcast to fp32 first. IEEE: fp32 operands
    must not silently drop to tf32 (10-bit mantissa) on the default path."""
    if INTERPRET:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def cast(x, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """fp32 -> dtype with round-to-nearest-even, as the GPU does.

    The interpreter (triton 3.9) converts fp32 -> bf16 by truncation (checked: half of random
    values differ from torch's rounding, max error one bf16 ulp instead of half), which doubles
    bf16 error in the CPU tests. There we round the fp32 bits to nearest-even ourselves so that the
    truncating conversion afterwards is exact. NaN/Inf are not special-cased (tests have none)."""
    if INTERPRET:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            x = (bits & 0xFFFF0000).to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def halves(x, BLOCK_M: tl.constexpr, WIDTH: tl.constexpr):
    """(x[:, :WIDTH // 2], x[:, WIDTH // 2:]) of a (BLOCK_M, WIDTH) register tile. Triton cannot
    slice a register tile: (M, W) -> (M, 2, W/2) -> (M, W/2, 2) -> split the last axis."""
    return tl.split(tl.permute(tl.reshape(x, (BLOCK_M, 2, WIDTH // 2)), (0, 2, 1)))
