"""Tile sizes shared by the kernels and by token rounding (which rounds expert counts to TILE_M)."""

# Row tile of the grouped GEMMs: every expert's slice of sorted assignments is cut into tiles of
# TILE_M rows; token rounding makes each expert's count a multiple of it so no tile is partly empty.
# Read by kernels.fused_moe_triton (the device-side tile schedule and BLOCK_M of every GEMM) and by
# options.SonicOptions.tile_m (the default tile token rounding rounds to); tests/test_kernels.py
# checks both. 128 is SonicMoE's M and the usual Hopper wgmma row tile; it was not chosen by
# measurement (no GPU when written): re-check with examples/bench_kernels.py on the target GPU.
TILE_M = 128
