"""LitGPT's MoE block, re-implemented op for op at a tiny size.

Source read: github Lightning-AI/litgpt, ``litgpt/model.py`` at commit
26857050fe3ff627cd714fe92f5838f51a3d5efa (2026-06-29): ``LLaMAMLP`` (the expert: ``fc_1``,
``fc_2``, ``proj``, ``silu(fc_1(x)) * fc_2(x)``), ``LLaMAMoE`` (the ``gate`` router, top-k on the
logits then ``softmax(dim=1, dtype=torch.float).to(dtype=x.dtype)``, the one-hot masks
``indices.unsqueeze(-1) == torch.arange(n_expert)`` permuted to (n_expert, B*T, k), the
``zip(masks, self.experts)`` loop with ``torch.where(mask)`` and ``y[token_idx] += ...``, the
optional ``routed_scaling_factor`` and shared experts) and ``GroupedTopkRouter`` (the
DeepSeek-V3 gate LitGPT builds when ``config.n_expert_groups`` is set). ``litgpt/config.py`` at
the same commit for the fields they read.

Three code paths a config selects, one entry each:
- the plain gate (Mixtral-8x7B / Qwen3-30B-A3B configs: no groups, scaling 1.0, no shared expert);
- the plain gate with ``routed_scaling_factor != 1.0`` and ``n_shared_expert`` (config fields the
  block reads; no registry config sets them without groups, a user config can);
- the grouped gate (``n_expert_groups``: sigmoid scores in fp32, ``@torch.no_grad()`` group-limited
  top-k with the correction-bias buffer, ``gather``, in-place ``/=`` renormalisation when
  ``norm_topk_prob``), with scaling and a shared expert as in DeepSeek-V3.

LitGPT feeds the block (B, T, C); the entries feed (1, T, D). Deviations common to all: tiny
sizes (the catalogue's D, N, E, K; groups of 2 experts); fp32 weights; ``Config`` below holds only
the fields these classes read (litgpt's dataclass has many more); all biases off as in every MoE
config of the registry (``bias=False``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from idiom_catalogue import D, E, K, N, Idiom, seeded, tokens


@dataclass
class Config:
    """The fields of ``litgpt.Config`` that ``LLaMAMLP`` / ``LLaMAMoE`` / ``GroupedTopkRouter`` read."""
    n_embd: int = D
    intermediate_size: int = 4 * D
    moe_intermediate_size: Optional[int] = N
    bias: bool = False
    n_expert: int = E
    n_expert_per_token: int = K
    n_shared_expert: Optional[int] = None
    n_expert_groups: Optional[int] = None
    n_topk_groups: Optional[int] = None
    n_topk_scores_per_group: Optional[int] = None
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = False


class LLaMAMLP(nn.Module):
    """litgpt ``LLaMAMLP``: ``proj(silu(fc_1(x)) * fc_2(x))``."""

    def __init__(self, config: Config, intermediate_size: Optional[int] = None) -> None:
        super().__init__()
        self.intermediate_size = intermediate_size or config.intermediate_size
        self.fc_1 = nn.Linear(config.n_embd, self.intermediate_size, bias=config.bias)
        self.fc_2 = nn.Linear(config.n_embd, self.intermediate_size, bias=config.bias)
        self.proj = nn.Linear(self.intermediate_size, config.n_embd, bias=config.bias)
        self.config = config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_fc_1 = self.fc_1(x)
        x_fc_2 = self.fc_2(x)
        x = F.silu(x_fc_1) * x_fc_2
        return self.proj(x)


class GroupedTopkRouter(nn.Module):
    """litgpt ``GroupedTopkRouter`` (DeepSeek-V3 gate). Deviation: ``weight`` is drawn here (the
    source allocates ``torch.empty`` and loads a checkpoint)."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.randn(config.n_expert, config.n_embd) / config.n_embd ** 0.5)
        self.register_buffer("e_score_correction_bias", torch.zeros(config.n_expert))

    @torch.no_grad()
    def get_topk_indices(self, scores: torch.Tensor) -> torch.Tensor:
        c = self.config
        scores_for_choice = scores.view(-1, c.n_expert) + self.e_score_correction_bias.unsqueeze(0)
        group_scores = (
            scores_for_choice.view(-1, c.n_expert_groups, c.n_expert // c.n_expert_groups)
            .topk(c.n_topk_scores_per_group, dim=-1)[0]
            .sum(dim=-1)
        )
        group_idx = torch.topk(group_scores, k=c.n_topk_groups, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores)
        group_mask.scatter_(1, group_idx, 1)
        score_mask = (
            group_mask.unsqueeze(-1)
            .expand(-1, c.n_expert_groups, c.n_expert // c.n_expert_groups)
            .reshape(-1, c.n_expert)
        )
        scores_for_choice = scores_for_choice.masked_fill(~score_mask.bool(), 0.0)
        return torch.topk(scores_for_choice, k=c.n_expert_per_token, dim=-1, sorted=False)[1]

    def forward(self, x: torch.Tensor):
        router_logits = F.linear(x.type(torch.float32), self.weight.type(torch.float32))
        scores = router_logits.sigmoid()
        topk_indices = self.get_topk_indices(scores)
        topk_weights = scores.gather(1, topk_indices)
        if self.config.norm_topk_prob:
            denominator = topk_weights.sum(dim=-1, keepdim=True) + 1e-20
            topk_weights /= denominator
        return topk_weights, topk_indices


class LLaMAMoE(nn.Module):
    """litgpt ``LLaMAMoE``, op for op (the ``x.clone()`` residual, ``view(-1, C)``, the permuted
    one-hot masks, ``torch.where`` per expert, the in-place indexed add, ``view(B, T, C)``)."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.gate = (
            nn.Linear(config.n_embd, config.n_expert, bias=False)
            if not config.n_expert_groups
            else GroupedTopkRouter(config)
        )
        self.experts = nn.ModuleList(
            LLaMAMLP(config, intermediate_size=config.moe_intermediate_size) for _ in range(config.n_expert)
        )
        if config.n_shared_expert:
            self.shared_experts = LLaMAMLP(config, intermediate_size=config.moe_intermediate_size * config.n_shared_expert)
        self.config = config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        residual_x = x.clone()
        x = x.view(-1, C)
        if not self.config.n_expert_groups:
            router = self.gate(x)
            probs, indices = torch.topk(router, self.config.n_expert_per_token)
            probs = probs.softmax(dim=1, dtype=torch.float).to(dtype=x.dtype)
        else:
            probs, indices = self.gate(x)
        if self.config.routed_scaling_factor != 1.0:
            probs = probs * self.config.routed_scaling_factor
        masks = indices.unsqueeze(-1) == torch.arange(self.config.n_expert, device=x.device)
        masks = masks.permute(2, 0, 1)
        y = torch.zeros_like(x)
        for mask, expert in zip(masks, self.experts):
            token_idx, expert_idx = torch.where(mask)
            y[token_idx] += probs[token_idx, expert_idx, None] * expert(x[token_idx])
        y = y.view(B, T, C)
        if self.config.n_shared_expert:
            y = y + self.shared_experts(residual_x)
        return y


_SRC = "Lightning-AI/litgpt litgpt/model.py@2685705 LLaMAMoE + LLaMAMLP"
_x3d = tokens(lambda T: (1, T, D))  # litgpt's Block passes (B, T, C)
_NOTE = ("x.clone() residual, view(-1, C), top-k on the logits then softmax(dim=1, dtype=float).to(x.dtype), "
         "masks indices.unsqueeze(-1) == arange(n_expert) permuted (2, 0, 1), zip(masks, experts) with "
         "torch.where(mask) -> (token_idx, slot_idx), y[token_idx] += probs[token_idx, slot_idx, None] * expert(...)")

ENTRIES = [
    Idiom("litgpt_llamamoe", _SRC + " (Mixtral / Qwen3-MoE configs: plain gate)",
          seeded(390, lambda: LLaMAMoE(Config())), _x3d, expect=1, faithful=True, fullgraph=False,
          note=_NOTE),
    Idiom("litgpt_llamamoe_shared_scaled", _SRC + " (n_shared_expert=1, routed_scaling_factor=2.5)",
          seeded(391, lambda: LLaMAMoE(Config(n_shared_expert=1, routed_scaling_factor=2.5))), _x3d,
          expect=1, faithful=True, fullgraph=False, other_gemms=4,
          note=_NOTE + "; probs * routed_scaling_factor, the shared LLaMAMLP on the cloned 3-D input added after "
                       "view(B, T, C)"),
    Idiom("litgpt_llamamoe_grouped", _SRC + " + GroupedTopkRouter (n_expert_groups=2, n_topk_groups=1, "
          "n_topk_scores_per_group=2, norm_topk_prob, routed_scaling_factor=2.5, n_shared_expert=1)",
          seeded(392, lambda: LLaMAMoE(Config(n_expert_groups=2, n_topk_groups=1, n_topk_scores_per_group=2,
                                              norm_topk_prob=True, routed_scaling_factor=2.5,
                                              n_shared_expert=1))), _x3d,
          expect=1, faithful=True, fullgraph=False, other_gemms=4,
          note=_NOTE + "; the grouped gate: F.linear in fp32 of x.type(float32), sigmoid, @torch.no_grad() group "
                       "top-k (correction-bias buffer, topk-sum group scores, scatter_ mask, masked_fill 0.0, "
                       "topk sorted=False), gather, in-place /= (sum + 1e-20)"),
]
