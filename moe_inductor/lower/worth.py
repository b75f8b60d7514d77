"""Which implementation a rewritten block's experts run, and why: the "worth it" decision next
to the "safe" proof (the recognisers and ``moe_inductor.fx.safety``), as Inductor's ``pad_mm``
separates ``should_pad`` from ``can_pad``. Decided per block at rewrite time from what the graph
says statically (device, dtype, whether autograd needs the result, the number of assignments and
experts), recorded in the report (``explain``'s "runs on" column) with its reason.

Choices:

  triton     the fused op's Triton grouped-GEMM kernels (CUDA, where they serve the shape)
  torch      the fused op's PyTorch path (one sort, per-expert GEMMs; a handful of assignments
             grouped on the host, ``reference.SMALL_A``). The memory-lean contract (X, H, scores
             and routing saved for backward) holds for both.
  gathered   CPU inference with few assignments per distinct expert (decode): no fused op; each
             assignment's output is computed as a reduction over its own expert's weight rows,
             ``(W1[e] * x[t]).sum(-1)``, written as plain tensor code that Inductor compiles into
             vectorised loops reading each picked row once (``gathered_experts``). A GEMV this way
             streams the weights at close to the machine's read bandwidth, where a BLAS GEMV with
             one or a few rows per expert reaches about 60% of it (measured on the project's CPU
             machine, one thread: 23 vs 14.6 GB/s); a weight row of an expert that two assignments
             share is read twice, so it pays only while assignments per distinct expert stay low
             (``GATHER_MAX_SHARING``). Only where nothing is saved for backward (the block's result
             does not require grad): memory is the reason to keep the fused op in training.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from moe_inductor.ops.activations import act_forward, parse_activation

#: the gathered decomposition is chosen while the expected assignments per distinct expert (random
#: routing) stay at or below this. Measured on the project's CPU machine, one thread, Qwen3-MoE
#: shape (d=1024, n=512, E=64, K=8), gathered vs fused op: 1.06 per expert (1 token) 2.0 vs 4.4 ms,
#: 1.58 (8 tokens) 17.0 vs 24.5 ms, 2.31 (16 tokens) 34.0 vs 39.4 ms, 3.6 (32 tokens) 65.9 vs
#: 49.7 ms: the crossover lies near 2.8; below it with a margin
GATHER_MAX_SHARING = 2.4
#: and never for more assignments than this (the decomposition's cost grows with every assignment)
GATHER_MAX_ASSIGNMENTS = 256


@dataclasses.dataclass(frozen=True)
class Choice:
    impl: str  # "triton" | "torch" | "gathered"
    reason: str


def expected_sharing(assignments: int, experts: int) -> float:
    """Assignments per distinct expert when ``assignments`` land on ``experts`` uniformly at random."""
    if assignments <= 0 or experts <= 0:
        return 1.0
    distinct = experts * (1.0 - (1.0 - 1.0 / experts) ** assignments)
    return assignments / max(distinct, 1.0)


def choose_gathered(device: Optional[torch.device], needs_grad: bool, assignments: Optional[int], experts: int,
                    stacked: bool, rewritten_routing: bool) -> Optional[Choice]:
    """The gathered decomposition for this block, with its reason, or None (then the fused op)."""
    if device is None or torch.device(device).type != "cpu" or needs_grad or not stacked or rewritten_routing:
        return None
    if assignments is None or assignments > GATHER_MAX_ASSIGNMENTS:
        return None
    sharing = expected_sharing(assignments, experts)
    if sharing > GATHER_MAX_SHARING:
        return None
    return Choice("gathered", f"CPU inference, {assignments} assignment(s) over {experts} experts "
                              f"({sharing:.2f} per distinct expert expected): gathered GEMVs compiled by Inductor")


def gathered_experts(x, token_ids, expert_ids, scores, w1, w2, b1, b2, activation: str, interleaved: bool):
    """The fused op's forward output, written as tensor code for Inductor to compile (no custom op):
    per assignment, H = W1[e] x[t] (+ b1[e]) as a reduction over d, A = act(H), Y = W2[e] A (+ b2[e])
    as a reduction over n, and out[t] += score * Y in fp32. The same roundings as the op: H and Y
    in x's dtype, the activation in fp32, the combine in fp32 then x's dtype. Assignments with
    expert -1 contribute nothing."""
    act = parse_activation(activation)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    valid = expert_ids >= 0
    e = torch.where(valid, expert_ids, 0).long()
    t = token_ids.long()
    xg = x.index_select(0, t).to(acc)
    h = (w1[e].to(acc) * xg[:, None, :]).sum(-1)
    if b1 is not None:
        h = h + b1[e].to(acc)
    h = h.to(x.dtype)
    a = act_forward(h, act, interleaved).to(acc)
    y = (w2[e].to(acc) * a[:, None, :]).sum(-1)
    if b2 is not None:
        y = y + b2[e].to(acc)
    y = y.to(x.dtype).to(acc) * scores.to(acc)[:, None]
    y = torch.where(valid[:, None], y, 0)
    # the combine as a selection summed over the assignments (T * A * d, small here), not
    # index_add: Inductor's CPU code for a scatter whose index it inlines as (assignment // K)
    # under outer-loop vectorisation writes to wrong rows (out of bounds: heap corruption; torch
    # 2.13, seen with token_ids = arange(T).repeat_interleave(K)). A select, not a 0/1 product: an
    # inf in one assignment's row must not become NaN (0 * inf) in other tokens' rows
    owner = t[None, :] == torch.arange(x.shape[0], device=x.device)[:, None]
    return torch.where(owner[:, :, None], y[None, :, :], 0).sum(1).to(x.dtype)
