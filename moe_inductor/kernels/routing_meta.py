"""Routing metadata for the grouped-GEMM kernels, built on the device without a host sync.

Shape legend (as in ``moe_inductor.ops.reference``): T tokens, E experts, A assignments,
M = tile_m (rows of one grouped-GEMM tile, ``config.kernel_tile_m``), P = cdiv(A, M) + min(E, A - 1),
C = wgrad chunk (``config.wgrad_chunk``), S = A // C weight-gradient partial slots.

Launches: torch.argsort by expert (forward only: the backward reuses the forward's order), one
Triton kernel for the sorted-row tables and the expert offsets, torch.argsort by token (the CSR of
the combine), one Triton kernel for the token CSR offsets, the tile schedule and the
weight-gradient slots. The two sorts stay on torch (CUB radix sort on CUDA); everything else
(formerly ~25 small torch launches: gathers, scatters, searchsorted, cumsum, where) is in the two
kernels. No kernel or torch op here reads device data on the host: the only Python integers are
shapes, which keeps the fused op free of CPU/GPU synchronisation and capturable in CUDA graphs.

Tile schedule (fixed length P, an upper bound): first cdiv(D, M) "dropped" tiles over the D
dropped assignments (expert id -1, sorted first) marked ``tile_expert = DROPPED_TILE`` (-2), then
expert e's cdiv(count_e, M) tiles, then unused tiles (-1). With the dropped rows counted as one
more group, sum_g cdiv(c_g, M) <= cdiv(A, M) + E still holds (each of the E + 1 groups wastes less
than one tile and the total is an integer), so P needs no extra term; and only groups that have
rows waste anything, at most min(E + 1, A) of them, hence the min(E, A - 1) (decode with more
experts than assignments launches no tile per empty expert). The up-projection zeroes the
dropped rows of the saved H (the reference does too); every other kernel skips dropped tiles
(``e < 0``), except dH, which writes their zero score gradient.

``build_routing_meta_reference`` is the same tables from plain torch ops: the tests' source of truth.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from moe_inductor.kernels import config
from moe_inductor.kernels.launch_utils import INTERPRET, alloc

UNUSED_TILE = -1
DROPPED_TILE = -2


@dataclass(frozen=True)
class RoutingMeta:
    order: Tensor           # (A,) int32  stable expert-sorted order: sorted row r is assignment order[r]
    inv_order: Tensor       # (A,) int32  sorted row of each assignment (inverse permutation of order)
    tok_sorted: Tensor      # (A,) int32  token of each sorted row
    scores_sorted: Tensor   # (A,) fp32   routing score of each sorted row
    expert_offsets: Tensor  # (E+1,) int32 expert e owns sorted rows [offsets[e], offsets[e+1]);
                            # rows before offsets[0] are dropped assignments (expert id -1)
    tile_expert: Tensor     # (P,) int32  expert of each row tile, -2 dropped rows, -1 unused
    tile_row_start: Tensor  # (P,) int32  first sorted row of each tile (-1 unused)
    tile_row_end: Tensor    # (P,) int32  end of the tile's segment (rows >= it are masked; -1 unused)
    token_offsets: Tensor   # (T+1,) int32 token t owns entries [offsets[t], offsets[t+1]) of token_rows
    token_rows: Tensor      # (A,) int32  sorted rows grouped by token (CSR by token), expert order inside
    slot_start: Tensor      # (E+1,) int32 expert e's extra weight-grad chunks are slots [start[e], start[e+1])
    slot_expert: Tensor     # (S,) int32  expert of each weight-grad slot, -1 unused
    slot_row_start: Tensor  # (S,) int32  rows [start, end) of the slot's chunk
    slot_row_end: Tensor    # (S,) int32
    num_tiles: int          # P, the launch grid's row-tile extent (a shape, not data)
    tile_m: int             # M
    wgrad_chunk: int        # C: rows per weight-gradient program; expert e's first chunk is its own
    num_slots: int          # S


def max_row_tiles(num_assignments: int, num_experts: int, tile_m: int) -> int:
    """Upper bound on the tiles of the schedule. With k groups that have rows (the experts and the
    dropped rows; k <= min(E + 1, A)), sum_g cdiv(c_g, M) <= cdiv(A, M) + k - 1: each group wastes
    less than one tile and the sum is an integer."""
    return -(-num_assignments // tile_m) + min(num_experts, max(num_assignments - 1, 0))


def max_wgrad_slots(num_assignments: int, chunk: int) -> int:
    """Upper bound on sum_e max(cdiv(count_e, C) - 1, 0): each extra chunk is C rows."""
    return num_assignments // chunk


# Block sizes: the row / token sections stream (1024 per program); the tile and slot sections
# compare a (BLOCK_P, BLOCK_E) block per step (8K int32s over 4 warps: 64 registers per thread).
# The interpreter pays per program and per loop step, not per element: bigger blocks there.
_BLOCK = 1024
_BLOCK_P = 256 if INTERPRET else 128
_BLOCK_E = 256 if INTERPRET else 64


@triton.jit
def _lower_bound(keys_ptr, idx_ptr, v, vmask, n, steps):
    """For each v: the first i in [0, n) with keys[idx[i]] >= v (n if none). keys[idx[.]] must be
    sorted; binary search, steps >= bit_length(n) + 1 iterations (a runtime value: no recompile
    per A)."""
    lo = tl.zeros_like(v)
    hi = lo + n
    for _ in range(steps):
        active = (lo < hi) & vmask
        mid = lo + (hi - lo) // 2
        i = tl.load(idx_ptr + mid, mask=active, other=0)
        k = tl.load(keys_ptr + i, mask=active, other=0)
        right = active & (k < v)
        lo = tl.where(right, mid + 1, lo)
        hi = tl.where(active & (k >= v), mid, hi)
    return lo


@triton.jit
def _sorted_rows_kernel(
    order_ptr, expert_ids_ptr, token_ids_ptr, scores_ptr,
    order32_ptr, inv_order_ptr, tok_sorted_ptr, scores_sorted_ptr, tok_key_ptr, expert_offsets_ptr,
    A, T, E, num_row_blocks, steps,
    WRITE_ORDER: tl.constexpr, BLOCK: tl.constexpr,
):
    """Programs [0, num_row_blocks): per sorted row r, the gathers through order and the inverse
    permutation; the rest: expert_offsets[v], v in [0, E], by binary search over the sorted experts."""
    pid = tl.program_id(0)
    if pid < num_row_blocks:
        r = pid * BLOCK + tl.arange(0, BLOCK)
        m = r < A
        o = tl.load(order_ptr + r, mask=m, other=0).to(tl.int64)
        e = tl.load(expert_ids_ptr + o, mask=m, other=0).to(tl.int32)
        tok = tl.load(token_ids_ptr + o, mask=m, other=0).to(tl.int32)
        s = tl.load(scores_ptr + o, mask=m, other=0.0).to(tl.float32)
        if WRITE_ORDER:
            tl.store(order32_ptr + r, o.to(tl.int32), mask=m)
        tl.store(inv_order_ptr + o, r, mask=m)
        tl.store(tok_sorted_ptr + r, tok, mask=m)
        tl.store(scores_sorted_ptr + r, s, mask=m)
        # CSR key: dropped assignments get T, after every real token (the combine never reads them)
        tl.store(tok_key_ptr + r, tl.where(e < 0, T, tok), mask=m)
    else:
        v = (pid - num_row_blocks) * BLOCK + tl.arange(0, BLOCK)
        vm = v <= E
        off = _lower_bound(expert_ids_ptr, order_ptr, v, vm, A, steps)
        tl.store(expert_offsets_ptr + v, off, mask=vm)


@triton.jit
def _groups_before(offsets_ptr, q, E, div, BLOCK_E: tl.constexpr):
    """Expert e gets n_e = cdiv(count_e, div) consecutive items (tiles or chunks; count_e from
    offsets). For item indices q (among the experts' items): (expert of q, first item of that
    expert); the expert is E past the last item. Each program scans all E experts in blocks: no
    cross-program cumsum, no barrier."""
    n_before = tl.zeros_like(q)
    first = tl.zeros_like(q)
    carry = tl.sum(tl.zeros((BLOCK_E,), dtype=tl.int32), axis=0)
    for e0 in range(0, E, BLOCK_E):
        es = e0 + tl.arange(0, BLOCK_E)
        em = es < E
        lo_e = tl.load(offsets_ptr + es, mask=em, other=0)
        hi_e = tl.load(offsets_ptr + es + 1, mask=em, other=0)
        n_e = (hi_e - lo_e + div - 1) // div
        end = carry + tl.cumsum(n_e, axis=0)
        before = (end[None, :] <= q[:, None]) & em[None, :]
        n_before += tl.sum(before.to(tl.int32), axis=1)
        first += tl.sum(tl.where(before, n_e[None, :], 0), axis=1)
        carry += tl.sum(n_e, axis=0)
    return n_before, first


@triton.jit
def _schedule_kernel(
    tok_key_ptr, token_rows_l_ptr, expert_offsets_ptr,
    token_rows_ptr, token_offsets_ptr,
    tile_expert_ptr, tile_row_start_ptr, tile_row_end_ptr,
    slot_start_ptr, slot_expert_ptr, slot_row_start_ptr, slot_row_end_ptr,
    A, T, E, P, S, tile_m, chunk,
    n_row_blocks, n_tok_blocks, n_tile_blocks, n_slot_blocks, steps,
    BLOCK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """Five sections of one launch, by program id: token_rows to int32; token_offsets (binary
    search over the token-sorted keys); the tile schedule; the weight-gradient slots; slot_start."""
    pid = tl.program_id(0)
    if pid < n_row_blocks:
        r = pid * BLOCK + tl.arange(0, BLOCK)
        m = r < A
        tl.store(token_rows_ptr + r, tl.load(token_rows_l_ptr + r, mask=m, other=0).to(tl.int32), mask=m)
    elif pid < n_row_blocks + n_tok_blocks:
        t = (pid - n_row_blocks) * BLOCK + tl.arange(0, BLOCK)
        tm = t <= T
        tl.store(token_offsets_ptr + t, _lower_bound(tok_key_ptr, token_rows_l_ptr, t, tm, A, steps), mask=tm)
    elif pid < n_row_blocks + n_tok_blocks + n_tile_blocks:
        p = (pid - n_row_blocks - n_tok_blocks) * BLOCK_P + tl.arange(0, BLOCK_P)
        pm = p < P
        dropped = tl.load(expert_offsets_ptr)
        zt = (dropped + tile_m - 1) // tile_m  # tiles of the dropped rows, first in the schedule
        q = p - zt
        e, first = _groups_before(expert_offsets_ptr, q, E, tile_m, BLOCK_E)
        is_drop = p < zt
        active = (q >= 0) & (e < E)
        e_c = tl.minimum(e, E - 1)
        off_lo = tl.load(expert_offsets_ptr + e_c, mask=pm, other=0)
        off_hi = tl.load(expert_offsets_ptr + e_c + 1, mask=pm, other=0)
        t_exp = tl.where(is_drop, -2, tl.where(active, e_c, -1))
        t_lo = tl.where(is_drop, p * tile_m, tl.where(active, off_lo + (q - first) * tile_m, -1))
        t_hi = tl.where(is_drop, dropped, tl.where(active, off_hi, -1))
        tl.store(tile_expert_ptr + p, t_exp, mask=pm)
        tl.store(tile_row_start_ptr + p, t_lo, mask=pm)
        tl.store(tile_row_end_ptr + p, t_hi, mask=pm)
    elif pid < n_row_blocks + n_tok_blocks + n_tile_blocks + n_slot_blocks:
        # slot s is an extra chunk (index >= 1) of some expert: expert e has cdiv(count_e, C) - 1
        # extra chunks = cdiv(max(count_e - C, 0), C) items of the same kind as tiles
        s = (pid - n_row_blocks - n_tok_blocks - n_tile_blocks) * BLOCK_P + tl.arange(0, BLOCK_P)
        sm = s < S
        e, first = _groups_before_extra(expert_offsets_ptr, s, E, chunk, BLOCK_E)
        active = e < E
        e_c = tl.minimum(e, E - 1)
        off_lo = tl.load(expert_offsets_ptr + e_c, mask=sm, other=0)
        off_hi = tl.load(expert_offsets_ptr + e_c + 1, mask=sm, other=0)
        lo = off_lo + (s - first + 1) * chunk
        tl.store(slot_expert_ptr + s, tl.where(active, e_c, -1), mask=sm)
        tl.store(slot_row_start_ptr + s, tl.where(active, lo, -1), mask=sm)
        tl.store(slot_row_end_ptr + s, tl.where(active, tl.minimum(lo + chunk, off_hi), -1), mask=sm)
    else:
        v = (pid - n_row_blocks - n_tok_blocks - n_tile_blocks - n_slot_blocks) * BLOCK_P + tl.arange(0, BLOCK_P)
        vm = v <= E
        acc = tl.zeros_like(v)
        for e0 in range(0, E, BLOCK_E):
            es = e0 + tl.arange(0, BLOCK_E)
            em = es < E
            n_x = _extra_chunks(expert_offsets_ptr, es, em, chunk)
            acc += tl.sum(tl.where((es[None, :] < v[:, None]) & em[None, :], n_x[None, :], 0), axis=1)
        tl.store(slot_start_ptr + v, acc, mask=vm)


@triton.jit
def _extra_chunks(offsets_ptr, es, em, chunk):
    lo_e = tl.load(offsets_ptr + es, mask=em, other=0)
    hi_e = tl.load(offsets_ptr + es + 1, mask=em, other=0)
    return (tl.maximum(hi_e - lo_e - chunk, 0) + chunk - 1) // chunk


@triton.jit
def _groups_before_extra(offsets_ptr, q, E, chunk, BLOCK_E: tl.constexpr):
    """As _groups_before, for the extra weight-gradient chunks of each expert."""
    n_before = tl.zeros_like(q)
    first = tl.zeros_like(q)
    carry = tl.sum(tl.zeros((BLOCK_E,), dtype=tl.int32), axis=0)
    for e0 in range(0, E, BLOCK_E):
        es = e0 + tl.arange(0, BLOCK_E)
        em = es < E
        n_e = _extra_chunks(offsets_ptr, es, em, chunk)
        end = carry + tl.cumsum(n_e, axis=0)
        before = (end[None, :] <= q[:, None]) & em[None, :]
        n_before += tl.sum(before.to(tl.int32), axis=1)
        first += tl.sum(tl.where(before, n_e[None, :], 0), axis=1)
        carry += tl.sum(n_e, axis=0)
    return n_before, first


def _steps(n: int) -> int:
    return n.bit_length() + 1


def build_routing_meta(
    token_ids: Tensor,
    expert_ids: Tensor,
    scores: Tensor,
    num_tokens: int,
    num_experts: int,
    tile_m: int,
    order: Optional[Tensor] = None,
    wgrad_chunk: Optional[int] = None,
) -> RoutingMeta:
    """All routing tables for one call. ``order`` (from the forward) is reused in backward: no
    expert sort there, and the saved ``h_sorted`` rows and the recomputed tables agree by
    construction. ``wgrad_chunk`` defaults to ``config.wgrad_chunk(A, E)``."""
    device = expert_ids.device
    A, T, E = token_ids.shape[0], num_tokens, num_experts
    C = wgrad_chunk if wgrad_chunk is not None else config.wgrad_chunk(A, E)
    i32 = torch.int32
    token_ids, expert_ids, scores = token_ids.contiguous(), expert_ids.contiguous(), scores.contiguous()
    write_order = order is None
    order_in = torch.argsort(expert_ids, stable=True) if write_order else order.contiguous()
    order32 = alloc((A,), i32, device) if write_order else order
    inv_order = alloc((A,), i32, device)
    tok_sorted = alloc((A,), i32, device)
    scores_sorted = alloc((A,), torch.float32, device)
    tok_key = alloc((A,), i32, device)
    expert_offsets = alloc((E + 1,), i32, device)
    n_rows = triton.cdiv(A, _BLOCK)
    _sorted_rows_kernel[(n_rows + triton.cdiv(E + 1, _BLOCK),)](
        order_in, expert_ids, token_ids, scores,
        order32, inv_order, tok_sorted, scores_sorted, tok_key, expert_offsets,
        A, T, E, n_rows, _steps(A),
        WRITE_ORDER=write_order, BLOCK=_BLOCK,
    )
    # CSR by token: sorting the sorted rows by token (stably) keeps, inside one token, the expert
    # order, so the gather-and-sum adds a token's contributions in the same order as the reference.
    token_rows_l = torch.argsort(tok_key, stable=True)

    P = max_row_tiles(A, E, tile_m)
    S = max_wgrad_slots(A, C)
    token_rows = alloc((A,), i32, device)
    token_offsets = alloc((T + 1,), i32, device)
    tile_expert = alloc((P,), i32, device)
    tile_row_start = alloc((P,), i32, device)
    tile_row_end = alloc((P,), i32, device)
    slot_start = alloc((E + 1,), i32, device)
    slot_expert = alloc((S,), i32, device)
    slot_row_start = alloc((S,), i32, device)
    slot_row_end = alloc((S,), i32, device)
    sections = (triton.cdiv(A, _BLOCK), triton.cdiv(T + 1, _BLOCK), triton.cdiv(P, _BLOCK_P), triton.cdiv(S, _BLOCK_P))
    grid = (sum(sections) + triton.cdiv(E + 1, _BLOCK_P),)
    _schedule_kernel[grid](
        tok_key, token_rows_l, expert_offsets,
        token_rows, token_offsets,
        tile_expert, tile_row_start, tile_row_end,
        slot_start, slot_expert, slot_row_start, slot_row_end,
        A, T, E, P, S, tile_m, C,
        *sections, _steps(A),
        BLOCK=_BLOCK, BLOCK_P=_BLOCK_P, BLOCK_E=_BLOCK_E,
    )
    return RoutingMeta(
        order=order32, inv_order=inv_order, tok_sorted=tok_sorted, scores_sorted=scores_sorted,
        expert_offsets=expert_offsets, tile_expert=tile_expert, tile_row_start=tile_row_start,
        tile_row_end=tile_row_end, token_offsets=token_offsets, token_rows=token_rows,
        slot_start=slot_start, slot_expert=slot_expert, slot_row_start=slot_row_start, slot_row_end=slot_row_end,
        num_tiles=P, tile_m=tile_m, wgrad_chunk=C, num_slots=S,
    )


def build_routing_meta_reference(
    token_ids: Tensor,
    expert_ids: Tensor,
    scores: Tensor,
    num_tokens: int,
    num_experts: int,
    tile_m: int,
    order: Optional[Tensor] = None,
    wgrad_chunk: Optional[int] = None,
) -> RoutingMeta:
    """The same tables from plain torch ops (the earlier implementation, ~25 launches): what the
    tests compare ``build_routing_meta`` with, field by field."""
    device = expert_ids.device
    A, T, E = token_ids.shape[0], num_tokens, num_experts
    C = wgrad_chunk if wgrad_chunk is not None else config.wgrad_chunk(A, E)
    i32 = torch.int32
    order_l = torch.argsort(expert_ids, stable=True) if order is None else order.long()
    sorted_experts = expert_ids.index_select(0, order_l)
    expert_offsets = torch.searchsorted(
        sorted_experts, torch.arange(E + 1, device=device, dtype=sorted_experts.dtype), out_int32=True
    )
    inv_order = torch.empty(A, dtype=i32, device=device).scatter_(0, order_l, torch.arange(A, dtype=i32, device=device))
    tok_sorted = token_ids.index_select(0, order_l).to(i32)
    tok_key = torch.where(sorted_experts < 0, torch.full_like(tok_sorted, T), tok_sorted)
    token_rows_l = torch.argsort(tok_key, stable=True)
    token_offsets = torch.searchsorted(
        tok_key.index_select(0, token_rows_l), torch.arange(T + 1, device=device, dtype=i32), out_int32=True
    )

    def schedule(counts, div, length):
        """item -> (group, first item of the group) for groups of cdiv(count, div) items."""
        per = torch.div(counts + (div - 1), div, rounding_mode="floor").to(i32)
        end = torch.cumsum(per, 0, dtype=i32)
        ids = torch.arange(length, device=device, dtype=i32)
        g = torch.searchsorted(end, ids, right=True, out_int32=True)
        g_c = g.clamp(max=counts.numel() - 1).long()
        return ids, g, g_c, (end - per).index_select(0, g_c)

    # tiles: group 0 = dropped rows, then the experts
    P = max_row_tiles(A, E, tile_m)
    group_offsets = torch.cat([torch.zeros(1, dtype=i32, device=device), expert_offsets])
    p, g, g_c, first = schedule(group_offsets[1:] - group_offsets[:-1], tile_m, P)
    lo = group_offsets.index_select(0, g_c) + (p - first) * tile_m
    hi = group_offsets.index_select(0, g_c + 1)
    active = (g < E + 1) & (lo < hi)
    minus_one = torch.full_like(p, -1)
    tile_expert = torch.where(active, torch.where(g == 0, torch.full_like(p, -2), (g_c - 1).to(i32)), minus_one)
    # weight-grad slots: the extra chunks of each expert
    S = max_wgrad_slots(A, C)
    counts = expert_offsets[1:] - expert_offsets[:-1]
    s, se, se_c, s_first = schedule((counts - C).clamp(min=0), C, S)
    s_lo = expert_offsets.index_select(0, se_c) + (s - s_first + 1) * C
    s_active = se < E
    s_minus = torch.full_like(s, -1)
    slot_start = torch.cat([torch.zeros(1, dtype=i32, device=device),
                            torch.cumsum(torch.div((counts - C).clamp(min=0) + C - 1, C, rounding_mode="floor"), 0,
                                         dtype=i32)])
    return RoutingMeta(
        order=order_l.to(i32), inv_order=inv_order, tok_sorted=tok_sorted,
        scores_sorted=scores.index_select(0, order_l).to(torch.float32),
        expert_offsets=expert_offsets,
        tile_expert=tile_expert,
        tile_row_start=torch.where(active, lo.to(i32), minus_one),
        tile_row_end=torch.where(active, hi.to(i32), minus_one),
        token_offsets=token_offsets, token_rows=token_rows_l.to(i32),
        slot_start=slot_start,
        slot_expert=torch.where(s_active, se_c.to(i32), s_minus),
        slot_row_start=torch.where(s_active, s_lo.to(i32), s_minus),
        slot_row_end=torch.where(s_active, torch.minimum(s_lo + C, expert_offsets.index_select(0, se_c + 1)).to(i32),
                                 s_minus),
        num_tiles=P, tile_m=tile_m, wgrad_chunk=C, num_slots=S,
    )
