"""Tile sizes shared by the kernels and by token rounding (which rounds expert counts to TILE_M)."""

# Row tile of the grouped GEMMs: every expert's slice of sorted assignments is cut into tiles of
# TILE_M rows; token rounding makes each expert's count a multiple of it so no tile is partly empty.
TILE_M = 128
