"""Routing: from router probabilities to the (token, expert, score) assignments of the fused op.

Shape legend
  T tokens, E experts, K experts per token (top-k), M GEMM row tile (``kernels.config.TILE_M``)
  A assignments (A = T*K for top-k; data dependent for token rounding)
  probs       (T, E) float  router probabilities (softmax of the router logits), differentiable
  token_ids   (A,) int32    token of each assignment
  expert_ids  (A,) int32    expert of each assignment
  scores      (A,)          routing weight of each assignment, probs.dtype, differentiable in probs
  counts      (E,) int64    assignments per expert (f_e for top-k, f~_e for token rounding)

``topk_routing`` is plain top-k routing written as assignments (token-major order).

``token_rounding_routing`` is SonicMoE token rounding (TR), as in its public code:

  v, I = topk(P, K);  f_e = #{t : e in I[t]}                     (top-k counts)
  C = P - 1;  C[t, I[t, k]] = v[t, k] / sum_k v[t, k]            (picks rank above non-picks:
                                                                  picks in (0, 1], others in [-1, 0))
  f~_e = M * round(f_e / M)   "nearest" (round half up: f_e = M/2 rounds to M)
         M * ceil(f_e / M)    "up"
         M * floor(f_e / M)   "down"
  f~_e = min(f~_e, T)                                             (an expert cannot take a token twice)
  expert e takes the f~_e tokens with the largest C[:, e]; ties go to the lower token index.

So rounding down drops an expert's lowest-weight picks, rounding up adds the tokens with the
highest probability among those that did not pick it, and "nearest" does whichever is closer;
with f_e < M/2 "nearest" gives f~_e = 0 and the expert is dropped for this batch. That is the
algorithm, not a bug: the token keeps its other experts (or, rarely, none). Every count is a
multiple of M, except where the clamp to T applies (T < M, or an expert wanted by nearly every
token), so no GEMM tile is partly empty.

Scores. Every assignment (t, e), pick or added, gets ``P[t, e] / sum_k v[t, k]`` when
``renormalize`` (the token's own top-k mass, so picks keep exactly their top-k weight and an added
pair is weighted on the same scale) and ``P[t, e]`` otherwise. They are gathered from ``probs``,
so gradients reach the router. The ranking C is computed from detached probabilities: it only
chooses pairs, as top-k's index choice does.

Host synchronisation: the trade-off. Everything up to f~_e runs on the device: one
``topk``, one column-wise sort of C (T x E), integer rounding, a cumulative sum; no Python loop
over experts or tokens. The number of assignments A = sum_e f~_e is data dependent, so an output
of exactly A entries needs its length on the host. Two modes:

* ``static_shape=False`` (default): exactly A assignments, expert-sorted. Costs exactly one host
  sync, one ``Tensor.item()`` of the scalar A. This is the default because the fused op does work
  proportional to the number of assignments: padding entries would be real wasted GEMM rows,
  the very waste token rounding exists to remove.
* ``static_shape=True``: no host sync at all (CUDA-graph and ``fullgraph`` friendly). The output
  has the static length ``max_token_rounding_assignments(T, E, K, M, mode)`` (T*K for "down", up
  to T*K + E*(M-1) for "up"). The first ``counts.sum()`` entries are the assignments, as in the
  exact mode; the rest is padding: token 0, expert -1, score exactly 0. The fused op treats
  expert -1 as a dropped assignment: no GEMM rows, nothing added, zero score gradient, so the
  padding costs one sort position each and every expert's count stays a multiple of M. This is
  the mode the ``sonic`` backend uses inside compiled graphs.

``expert_counts`` and ``padding_waste_tensor`` avoid the host too (``bincount`` sizes its
output from ``max(input)``, a sync on CUDA, so counts use a scatter-add).
"""
from __future__ import annotations

import numbers
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "MODES",
    "Routing",
    "topk_routing",
    "token_rounding_routing",
    "round_expert_counts",
    "max_token_rounding_assignments",
    "expert_counts",
    "padding_waste",
    "padding_waste_tensor",
]

MODES = ("nearest", "up", "down")


class Routing(NamedTuple):
    """Routing assignments in the form ``moe_inductor.ops.op.fused_moe`` takes.

    token_ids, expert_ids: (A,) int32; scores: (A,) probs.dtype, differentiable in probs;
    counts: (E,) int64, assignments per expert (padding of ``static_shape=True`` not counted).
    """

    token_ids: Tensor
    expert_ids: Tensor
    scores: Tensor
    counts: Tensor


def _check_probs(probs: Tensor, top_k: int, fn: str) -> tuple[int, int]:
    if not isinstance(probs, Tensor):
        raise TypeError(f"{fn}: probs must be a tensor, got {type(probs).__name__}")
    if probs.dim() != 2:
        raise ValueError(f"{fn}: probs must be 2-D (T, E), got shape {tuple(probs.shape)}")
    if not probs.is_floating_point():
        raise TypeError(f"{fn}: probs must be floating point, got {probs.dtype}")
    T, E = probs.shape
    if E == 0:
        raise ValueError(f"{fn}: probs has no experts (shape {tuple(probs.shape)})")
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral):
        raise TypeError(f"{fn}: top_k must be an int, got {type(top_k).__name__}")
    if not 1 <= top_k <= E:
        raise ValueError(f"{fn}: top_k must be in [1, E] = [1, {E}], got {top_k}")
    return T, E


def _check_tile_m(tile_m: int, fn: str) -> None:
    if isinstance(tile_m, bool) or not isinstance(tile_m, numbers.Integral):
        raise TypeError(f"{fn}: tile_m must be an int, got {type(tile_m).__name__}")
    if tile_m <= 0:
        raise ValueError(f"{fn}: tile_m must be positive, got {tile_m}")


def _check_mode(mode: str, fn: str) -> None:
    if mode not in MODES:
        raise ValueError(f"{fn}: unknown mode {mode!r}; valid: {', '.join(MODES)}")


def expert_counts(expert_ids: Tensor, num_experts: int) -> Tensor:
    """Assignments per expert: (E,) int64 on expert_ids' device, without a host sync.

    expert_ids: (A,) int, values in [0, num_experts). A scatter-add rather than ``bincount``,
    whose output size depends on ``max(expert_ids)`` (a device-to-host read on CUDA).
    """
    if expert_ids.dim() != 1:
        raise ValueError(f"expert_counts: expert_ids must be 1-D, got shape {tuple(expert_ids.shape)}")
    if num_experts <= 0:
        raise ValueError(f"expert_counts: num_experts must be positive, got {num_experts}")
    ids = expert_ids.to(torch.int64)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=expert_ids.device)
    return counts.scatter_add_(0, ids, torch.ones_like(ids))


def _topk(probs: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    # sorted=True so that the K columns are in a fixed order (largest first) on every backend.
    return torch.topk(probs, top_k, dim=-1, largest=True, sorted=True)


def topk_routing(probs: Tensor, top_k: int, renormalize: bool = True) -> Routing:
    """Plain top-k routing as assignments.

    probs (T, E) float. Returns token_ids = arange(T).repeat_interleave(K) (int32),
    expert_ids = the top-k experts of each token (int32, largest probability first),
    scores = the top-k probabilities, divided by their sum per token when ``renormalize``
    (differentiable in probs), counts (E,) int64. A = T*K; no host sync.
    """
    T, E = _check_probs(probs, top_k, "topk_routing")
    top_v_TK, top_i_TK = _topk(probs, top_k)
    if renormalize:
        top_v_TK = top_v_TK / top_v_TK.sum(dim=-1, keepdim=True)
    token_ids = torch.arange(T, device=probs.device, dtype=torch.int32).repeat_interleave(top_k)
    expert_ids = top_i_TK.reshape(-1).to(torch.int32)
    return Routing(token_ids, expert_ids, top_v_TK.reshape(-1), expert_counts(expert_ids, E))


def round_expert_counts(counts: Tensor, tile_m: int, mode: str, num_tokens: int) -> Tensor:
    """f~_e from f_e: a multiple of tile_m by ``mode``, clamped to num_tokens. Integer math, no sync.

    counts (E,) int; returns (E,) int64. "nearest" rounds half up: (2f + M) // (2M) * M is
    round(f / M) * M with ties (f = M/2 mod M) going up, exactly, in integers.
    """
    _check_tile_m(tile_m, "round_expert_counts")
    _check_mode(mode, "round_expert_counts")
    f = counts.to(torch.int64)
    if mode == "down":
        rounded = torch.div(f, tile_m, rounding_mode="floor") * tile_m
    elif mode == "up":
        rounded = torch.div(f + (tile_m - 1), tile_m, rounding_mode="floor") * tile_m
    else:
        rounded = torch.div(2 * f + tile_m, 2 * tile_m, rounding_mode="floor") * tile_m
    return rounded.clamp(max=num_tokens)


def max_token_rounding_assignments(num_tokens: int, num_experts: int, top_k: int, tile_m: int, mode: str) -> int:
    """Static upper bound on sum_e f~_e, the length of ``static_shape=True`` outputs.

    "down" never adds (<= T*K); "nearest" adds at most floor(M/2) per expert that has picks and
    "up" at most M-1; there are at most min(E, T*K) such experts, and no expert takes more
    than T tokens.
    """
    _check_tile_m(tile_m, "max_token_rounding_assignments")
    _check_mode(mode, "max_token_rounding_assignments")
    picks = num_tokens * top_k
    extra = {"down": 0, "nearest": tile_m // 2, "up": tile_m - 1}[mode]
    return _min(num_tokens * num_experts, picks + _min(num_experts, picks) * extra)


def _min(a, b):
    """min without a guard: torch.sym_min when T is a SymInt (a compiled graph with dynamic shapes),
    Python's min on plain ints (torch 2.11's Dynamo cannot trace a torch.sym_min that returns an
    int: "torch.* op returned non-Tensor")."""
    return min(a, b) if isinstance(a, int) and isinstance(b, int) else torch.sym_min(a, b)


def _max(a, b):
    """max without a guard, like ``_min``."""
    return max(a, b) if isinstance(a, int) and isinstance(b, int) else torch.sym_max(a, b)


def token_rounding_routing(
    probs: Tensor,
    top_k: int,
    tile_m: int,
    mode: str = "nearest",
    renormalize: bool = True,
    *,
    static_shape: bool = False,
) -> Routing:
    """SonicMoE token rounding (see the module docstring for the algorithm and the sync trade-off).

    probs (T, E) float, differentiable. Returns Routing with expert-sorted assignments
    (expert 0's tokens first, each expert's tokens by descending rank in C), int32 ids, scores
    gathered from probs (``renormalize``: divided by the token's top-k probability sum) and
    counts = f~_e (E,) int64.

    ``static_shape=False``: exactly sum_e f~_e assignments; one host sync (``Tensor.item``).
    ``static_shape=True``: ``max_token_rounding_assignments(...)`` entries, no host sync, the
    tail is padding (token 0, expert -1 = dropped, score 0).
    """
    fn = "token_rounding_routing"
    T, E = _check_probs(probs, top_k, fn)
    _check_tile_m(tile_m, fn)
    _check_mode(mode, fn)
    if not isinstance(renormalize, bool):
        raise TypeError(f"{fn}: renormalize must be a bool, got {type(renormalize).__name__}")
    device = probs.device

    top_v_TK, top_i_TK = _topk(probs, top_k)
    picks_per_expert = expert_counts(top_i_TK.reshape(-1), E)
    rounded_E = round_expert_counts(picks_per_expert, tile_m, mode, T)

    # Ranking key C: only chooses pairs, so it is built from detached values in fp32 (an fp16
    # router would otherwise squash many ties together).
    with torch.no_grad():
        top_v32_TK = top_v_TK.detach().float()
        rank_key_TE = probs.detach().float() - 1.0
        rank_key_TE.scatter_(1, top_i_TK, top_v32_TK / top_v32_TK.sum(dim=-1, keepdim=True))
        # One column-wise sort; stable descending keeps equal keys in ascending token order,
        # which is the deterministic tie-break.
        ranked_tokens_TE = torch.sort(rank_key_TE, dim=0, descending=True, stable=True).indices

    ends_E = torch.cumsum(rounded_E, dim=0)
    starts_E = ends_E - rounded_E
    total = ends_E[-1]
    if static_shape:
        length = max_token_rounding_assignments(T, E, top_k, tile_m, mode)
    else:
        length = int(total.item())  # the single host sync of the exact-length mode
    slots = torch.arange(length, device=device, dtype=torch.int64)
    # Slot j belongs to the expert whose [start, end) range contains it; padding slots (j >= total)
    # fall past the last end and get E, clamped to E-1 below.
    slot_expert = torch.searchsorted(ends_E, slots, right=True).clamp(max=E - 1)
    slot_rank = (slots - starts_E[slot_expert]).clamp(min=0, max=_max(T - 1, 0))
    slot_token = ranked_tokens_TE[slot_rank, slot_expert]

    if renormalize:
        token_mass_T = top_v_TK.sum(dim=-1)
        scores = probs[slot_token, slot_expert] / token_mass_T[slot_token]
    else:
        scores = probs[slot_token, slot_expert]
    if static_shape:
        valid = slots < total
        slot_token = torch.where(valid, slot_token, torch.zeros_like(slot_token))
        slot_expert = torch.where(valid, slot_expert, torch.full_like(slot_expert, -1))
        scores = torch.where(valid, scores, torch.zeros_like(scores))
    return Routing(slot_token.to(torch.int32), slot_expert.to(torch.int32), scores, rounded_E)


def padding_waste_tensor(counts: Tensor, tile_m: int) -> Tensor:
    """sum_e (ceil(f_e/M)*M - f_e) / sum_e f_e as a 0-d float64 tensor (0 if no assignments); no sync.

    The fraction of extra GEMM rows that tiles of M rows compute when expert e has f_e rows.
    """
    _check_tile_m(tile_m, "padding_waste_tensor")
    f = counts.to(torch.int64)
    padded = torch.div(f + (tile_m - 1), tile_m, rounding_mode="floor") * tile_m
    total = f.sum()
    waste = (padded - f).sum().to(torch.float64)
    return torch.where(total > 0, waste / total.clamp(min=1).to(torch.float64), torch.zeros_like(waste))


def padding_waste(counts: Tensor, tile_m: int) -> float:
    """Host float of ``padding_waste_tensor``: padded-minus-useful GEMM rows over useful rows."""
    return float(padding_waste_tensor(counts, tile_m).item())
