"""Routing statistics of the fused op's calls, for ``explain`` and benchmarks.

Kept apart from ``report`` (which imports the rewrite machinery and so Inductor): the fused op
imports this module, and ``import moe_inductor.ops.op`` must stay light (no triton import).
"""
from __future__ import annotations

import dataclasses

import torch

from moe_inductor.diagnostics import listeners


@dataclasses.dataclass
class RoutingStats:
    """What one call of the fused op routed: per-expert counts and the padding waste that GEMM
    tiles of ``tile_m`` rows would compute for them (the token-rounding issue's figure)."""

    num_tokens: int
    num_experts: int
    assignments: int  # dropped (expert -1) padding excluded
    counts: list
    tile_m: int
    padding_waste: float  # sum_e (ceil(f_e/M)*M - f_e) / sum_e f_e


def capture_routing_stats():
    """Collect a RoutingStats for every fused-op call (eager or inside compiled graphs) run in
    this block. Costs one device-to-host read per call, so only while capturing."""
    return listeners.listen(listeners.ROUTING)


def record_routing(expert_ids, num_tokens: int, num_experts: int) -> None:
    """Publish the RoutingStats of one fused-op call if anyone listens (``listeners.ROUTING``)."""
    if not listeners.active(listeners.ROUTING):
        return
    from moe_inductor.kernels.config import TILE_M
    from moe_inductor.ops.routing import padding_waste

    ids = expert_ids.detach().long()
    counts = torch.zeros(num_experts, dtype=torch.int64, device=ids.device)
    counts.scatter_add_(0, ids.clamp(min=0), (ids >= 0).long())
    rec = RoutingStats(num_tokens=num_tokens, num_experts=num_experts, assignments=int(counts.sum()),
                       counts=counts.tolist(), tile_m=TILE_M, padding_waste=padding_waste(counts, TILE_M))
    listeners.publish(listeners.ROUTING, rec)


