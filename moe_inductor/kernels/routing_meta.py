"""Routing metadata for the grouped-GEMM kernels, built on the device without a host sync.

Shape legend (as in ``moe_inductor.reference``): T tokens, E experts, A assignments,
M = tile_m (rows of one grouped-GEMM tile), P = max_tiles = cdiv(A, M) + E.

Every tensor here is computed by torch ops that never copy data to the host (no ``.item()``,
``.tolist()``, no ``bincount`` — CUDA bincount reads ``max()`` on the host — and no
``nonzero``): the only Python integers used are shapes. That keeps the fused op free of
CPU/GPU synchronisation and capturable in CUDA graphs.

The tile schedule has a *fixed* length P = cdiv(A, M) + E, an upper bound on
sum_e cdiv(count_e, M) (each expert wastes at most one partial tile). Tiles past the real count
get ``tile_expert = -1`` and their programs return at once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor


@dataclass(frozen=True)
class RoutingMeta:
    order: Tensor           # (A,) int32  stable expert-sorted order: sorted row r is assignment order[r]
    inv_order: Tensor       # (A,) int32  sorted row of each assignment (inverse permutation of order)
    tok_sorted: Tensor      # (A,) int32  token of each sorted row
    scores_sorted: Tensor   # (A,) fp32   routing score of each sorted row
    expert_offsets: Tensor  # (E+1,) int32 expert e owns sorted rows [offsets[e], offsets[e+1]);
                            # rows before offsets[0] are dropped assignments (expert id -1)
    tile_expert: Tensor     # (P,) int32  expert of each row tile, -1 for unused tiles
    tile_row_start: Tensor  # (P,) int32  first sorted row of each tile
    tile_row_end: Tensor    # (P,) int32  end of the tile's expert segment (rows >= it are masked)
    token_offsets: Tensor   # (T+1,) int32 token t owns entries [offsets[t], offsets[t+1]) of token_rows
    token_rows: Tensor      # (A,) int32  sorted rows grouped by token (CSR by token), expert order inside
    num_tiles: int          # P, the launch grid's row-tile extent (a shape, not data)
    tile_m: int             # M


def max_row_tiles(num_assignments: int, num_experts: int, tile_m: int) -> int:
    """Upper bound on sum_e cdiv(count_e, M): full tiles cdiv(A, M) plus one partial per expert."""
    return -(-num_assignments // tile_m) + num_experts


def build_routing_meta(
    token_ids: Tensor,
    expert_ids: Tensor,
    scores: Tensor,
    num_tokens: int,
    num_experts: int,
    tile_m: int,
    order: Optional[Tensor] = None,
) -> RoutingMeta:
    """All routing tables for one call. ``order`` (from the forward) is reused in backward so that
    the saved ``h_sorted`` rows and the recomputed tables agree by construction."""
    device = expert_ids.device
    A, T, E = token_ids.shape[0], num_tokens, num_experts
    i32 = torch.int32
    if order is None:
        order_l = torch.argsort(expert_ids, stable=True)
        order = order_l.to(i32)
    else:
        order_l = order.long()
    sorted_experts = expert_ids.index_select(0, order_l)
    expert_offsets = torch.searchsorted(
        sorted_experts, torch.arange(E + 1, device=device, dtype=sorted_experts.dtype), out_int32=True
    )
    inv_order = torch.empty(A, dtype=i32, device=device).scatter_(
        0, order_l, torch.arange(A, dtype=i32, device=device)
    )
    tok_sorted = token_ids.index_select(0, order_l).to(i32)
    scores_sorted = scores.index_select(0, order_l).to(torch.float32)

    # CSR by token: sorting the sorted rows by token (stably) keeps, inside one token, the expert
    # order, so the gather-and-sum adds a token's contributions in the same order as the reference.
    # Dropped assignments (expert -1, sorted first, before expert_offsets[0]) get the key T, which
    # puts them after token T-1's entries, outside every token's range: the combine never reads them.
    tok_key = torch.where(sorted_experts < 0, torch.full_like(tok_sorted, T), tok_sorted)
    token_rows_l = torch.argsort(tok_key, stable=True)
    token_offsets = torch.searchsorted(
        tok_key.index_select(0, token_rows_l), torch.arange(T + 1, device=device, dtype=i32), out_int32=True
    )

    # Tile schedule: expert e gets cdiv(count_e, M) consecutive tiles.
    P = max_row_tiles(A, E, tile_m)
    counts = expert_offsets[1:] - expert_offsets[:-1]
    tiles_per_expert = torch.div(counts + (tile_m - 1), tile_m, rounding_mode="floor").to(i32)
    tile_end = torch.cumsum(tiles_per_expert, 0, dtype=i32)
    tile_ids = torch.arange(P, device=device, dtype=i32)
    tile_e = torch.searchsorted(tile_end, tile_ids, right=True, out_int32=True)
    active = tile_e < E
    tile_e_c = tile_e.clamp(max=E - 1).long()
    first_tile = (tile_end - tiles_per_expert).index_select(0, tile_e_c)
    row_start = expert_offsets.index_select(0, tile_e_c) + (tile_ids - first_tile) * tile_m
    row_end = expert_offsets.index_select(0, tile_e_c + 1)
    minus_one = torch.full_like(tile_ids, -1)
    return RoutingMeta(
        order=order,
        inv_order=inv_order,
        tok_sorted=tok_sorted,
        scores_sorted=scores_sorted,
        expert_offsets=expert_offsets,
        tile_expert=torch.where(active, tile_e_c.to(i32), minus_one),
        tile_row_start=torch.where(active, row_start.to(i32), minus_one),
        tile_row_end=torch.where(active, row_end.to(i32), minus_one),
        token_offsets=token_offsets,
        token_rows=token_rows_l.to(i32),
        num_tiles=P,
        tile_m=tile_m,
    )
