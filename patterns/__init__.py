"""MoE idioms, one module each. Every module exposes:

  IDIOM       a short name
  find(gm)    yields (anchor node, MoEBlock) for each block it can rewrite, and
              (anchor node, reason) for each MoE-looking candidate it declines

Each module holds what matches its idiom (Inductor pattern-matcher patterns), the checks that
decide whether rewriting is safe (raising its Declined with a reason), and what the block is
replaced with (a moe_inductor.rewrite.MoEBlock that emit_fused_moe turns into the fused op).
"""
from . import assignment_rows, batched_mm, dense_experts, expert_slots, mask_dispatch, per_expert, sorted_grouped_mm

IDIOMS = [sorted_grouped_mm, assignment_rows, per_expert, batched_mm, dense_experts, mask_dispatch, expert_slots]
