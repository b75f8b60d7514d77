"""Tile sizes of the kernels and of token rounding, chosen from static shapes only.

Shape legend: T tokens, E experts, A assignments (sorted rows). Pure Python (no torch, no triton):
``moe_inductor.compile.options`` imports it, and every choice here is a function of shapes that are known
at launch, never of device data (no host sync).

Everything here was reasoned, not measured: no GPU was available when it was written. Re-check
with examples/bench_kernels.py on the target GPU.
"""
from __future__ import annotations

# Token rounding's tile: token rounding makes each expert's count a multiple of TILE_M (the default
# of options.SonicOptions.tile_m, tests/test_kernels.py checks it). 128 is SonicMoE's M and the usual
# Hopper wgmma row tile. It is NOT necessarily the kernels' row tile: see kernel_tile_m.
TILE_M = 128

# Row tile of the grouped GEMMs (BLOCK_M of up_proj / sorted_gemm / dH and of the device-side tile
# schedule). Powers of two between these bounds; 16 is the smallest M of tl.dot.
KERNEL_TILE_M_MAX = 128
KERNEL_TILE_M_MIN = 16


def kernel_tile_m(num_assignments: int, num_experts: int) -> int:
    """Row tile of the grouped-GEMM kernels for A assignments over E experts.

    Each expert wastes up to M - 1 rows of its last tile. When the mean load A/E is below 128 rows
    (decode, very many experts), 128-row tiles would be mostly padding: the tile shrinks to the
    power of two at or above the mean load (at least 16). Every candidate divides TILE_M, so counts
    that token rounding made multiples of TILE_M still fill whole tiles."""
    mean = -(-max(num_assignments, 1) // max(num_experts, 1))
    m = KERNEL_TILE_M_MIN
    while m < mean and m < KERNEL_TILE_M_MAX:
        m *= 2
    return m


# Weight gradients (dW1, dW2): an expert whose rows exceed WGRAD_SPLIT_FACTOR x the mean load (and
# at least WGRAD_MIN_CHUNK rows) is reduced by several programs, one per chunk of that many rows,
# whose fp32 partials are summed in a fixed order (deterministic). The number of partial slots is
# at most A // chunk <= E / WGRAD_SPLIT_FACTOR, so the transient fp32 workspace is at most
# 1/WGRAD_SPLIT_FACTOR of an fp32 copy of the weight (half a bf16 weight at 4). Balanced routing
# (every expert under 4x the mean) never splits and launches no extra kernel.
WGRAD_SPLIT_FACTOR = 4
WGRAD_MIN_CHUNK = 1024


def wgrad_chunk(num_assignments: int, num_experts: int) -> int:
    """Rows per weight-gradient program (a multiple of 128, so every BLOCK_R divides it)."""
    mean = -(-max(num_assignments, 1) // max(num_experts, 1))
    chunk = max(WGRAD_SPLIT_FACTOR * mean, WGRAD_MIN_CHUNK)
    return -(-chunk // 128) * 128


# Gather-and-sum (combine): rows of one token loaded per step. A token has A/T rows on average
# (K under top-k); they are loaded together as one (BLOCK_J, BLOCK_D) block. A function of the
# static shapes only, not an autotuned value: the order of the fp32 additions depends on it, so
# keeping it out of the autotuner keeps results bitwise identical whatever config the tuner picks.
GATHER_MAX_ROWS = 16


def gather_block_rows(num_assignments: int, num_tokens: int) -> int:
    mean = -(-max(num_assignments, 1) // max(num_tokens, 1))
    j = 2
    while j < mean and j < GATHER_MAX_ROWS:
        j *= 2
    return j
