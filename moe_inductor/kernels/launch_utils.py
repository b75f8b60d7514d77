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


class DtypeConfigs:
    """Autotune candidates chosen by the element size of the kernel's operands.

    A tile that fits a 2-byte dtype does not fit fp32: every staged operand tile doubles in
    shared memory, and fp32 with input_precision="ieee" runs tl.dot on CUDA cores (FMA), whose
    operand tiles live in registers. So each GEMM kernel keeps one list per element size and the
    autotuner only ever benchmarks the list of the launch's dtype:

        _CONFIGS = DtypeConfigs({2: configs_bf16_fp16, 4: configs_fp32}, interpret_config)

        @triton.autotune(configs=_CONFIGS.configs, key=[...], prune_configs_by=_CONFIGS.prune_by)

    ``configs`` is the union (what the autotuner holds; iterating a DtypeConfigs yields it too),
    ``prune_by`` drops the candidates that are not in the launch dtype's list. The dtype is that of
    the first floating-point tensor argument of the launch (the GEMM's A operand in every kernel
    here). Triton's autotuner already adds every tensor argument's dtype to its cache key, so
    bf16 and fp32 launches with the same key tune separately. The lists are checked without a GPU
    by examples/kernel_resources.py (registers, spills, shared memory for sm_90 / sm_80;
    tests/test_kernel_resources.py fails when a listed config spills or overflows shared memory).

    Under the interpreter there is one config (``interpret_config``), as in ``autotune_configs``.
    """

    def __init__(self, by_itemsize: dict, interpret_config: triton.Config):
        if not by_itemsize or any(not cfgs for cfgs in by_itemsize.values()):
            raise ValueError("DtypeConfigs needs a non-empty config list for each element size")
        self.by_itemsize = {int(size): list(cfgs) for size, cfgs in by_itemsize.items()}
        self.interpret_config = interpret_config
        union = []
        for cfgs in self.by_itemsize.values():
            union.extend(c for c in cfgs if c not in union)
        self.gpu_configs = union
        self.configs = [interpret_config] if INTERPRET else union
        # Also under the interpreter (one config, never pruned): the autotuner then still names
        # its DtypeConfigs (``early_config_prune.__self__``), which the resource test reads.
        self.prune_by = {"early_config_prune": self.prune}

    def __iter__(self):
        return iter(self.configs)

    def __len__(self):
        return len(self.configs)

    def for_itemsize(self, itemsize: int) -> list:
        """The GPU candidates for operands of ``itemsize`` bytes (the nearest listed size above it
        for sizes without a list of their own, e.g. 1-byte types use the 2-byte list)."""
        sizes = sorted(self.by_itemsize)
        size = next((s for s in sizes if s >= itemsize), sizes[-1])
        return self.by_itemsize[size]

    def prune(self, configs: list, named_args: dict, **kwargs) -> list:
        """``early_config_prune`` of triton.autotune: the candidates of the launch's dtype."""
        itemsize = _operand_itemsize(named_args)
        allowed = self.for_itemsize(itemsize)
        kept = [c for c in configs if c in allowed]
        # configs replaced by a caller (a test pinning one config) are kept as they are
        return kept or list(configs)


def _operand_itemsize(named_args: dict) -> int:
    for value in named_args.values():
        if isinstance(value, torch.Tensor) and value.dtype.is_floating_point:
            return value.element_size()
    raise ValueError("DtypeConfigs: the launch has no floating-point tensor argument to choose configs by")
