"""transformers 4.5x ``DeepseekV3MoE`` + ``DeepseekV3TopkRouter`` + ``DeepseekV3MLP`` (github
huggingface/transformers, ``src/transformers/models/deepseek_v3/modeling_deepseek_v3.py``), read from
the stored repository at commit 00b676f8f0489b88652a31d70751cc540dd06305 and from the released wheel
v4.55.0 (PyPI ``transformers==4.55.0``; the MoE classes are the same in both). GLM-4-MoE
(``glm4_moe/modeling_glm4_moe.py``) and dots.llm1 (``dots1/modeling_dots1.py``) of v4.55.0 have the
same router and block op for op (diffed with the names replaced; GLM's buffer is declared
``dtype=torch.float32``, the default): see ``glm4_moe_45x.py`` and ``dots1_45x.py``, which build these
classes with those families' configs.

The router computes in fp32 (``F.linear`` of ``.type(torch.float32)`` copies of the input and the
weight), sigmoid scores, and picks the experts under ``@torch.no_grad()`` from the scores plus the
``e_score_correction_bias`` buffer, group-limited (the sum of the top-2 biased scores per group, the
``topk_group`` best groups kept by a ``zeros_like`` + ``scatter_`` mask, ``masked_fill`` 0.0 outside
them, ``topk(sorted=False)``); the weights are the unbiased scores ``gather``-ed at the picks,
renormalised in place (``/=`` by the sum ``+ 1e-20``) when ``norm_topk_prob``, times
``routed_scaling_factor``. The block's ``moe`` loops over ``range(len(self.experts))`` on a
``one_hot(...).permute(2, 0, 1)`` mask, ``torch.where(mask)`` giving (token, slot) pairs, skips an
expert with ``if token_indices.numel() > 0`` (a data-dependent branch), gathers ``x[token_indices]``,
weights the expert's output by ``topk_weights[token_indices, weight_indices].unsqueeze(-1)``,
``index_add_``-s into ``zeros_like(x, dtype=topk_weights.dtype)`` (an fp32 accumulator) and casts
back with ``.type(hidden_states.dtype)``; the shared experts (one MLP of ``n_shared_experts`` times
the expert width) run on the un-flattened input and are added after.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from idiom_catalogue import D, E, K, N, Idiom, seeded, tokens


class DeepseekV3ConfigLite:
    """The ``DeepseekV3Config`` fields the MoE classes read (deviation: a plain object, not the config
    class; tiny sizes: DeepSeek-V3 has 256 routed experts in 8 groups, top-8 from the best 4 groups,
    ``routed_scaling_factor`` 2.5, one shared expert; here E experts in 2 groups of E // 2, top-K from
    the best group)."""

    hidden_size = D
    intermediate_size = 2 * N  # the dense layers' width (not used by the MoE block)
    moe_intermediate_size = N
    n_routed_experts = E
    n_shared_experts = 1
    num_experts_per_tok = K
    n_group = 2
    topk_group = 1
    norm_topk_prob = True
    routed_scaling_factor = 2.5
    hidden_act = "silu"


class DeepseekV3MLP(nn.Module):
    """``DeepseekV3MLP``: ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``, bias-free linears, width given
    by the caller (experts: moe_intermediate_size; shared experts: times n_shared_experts)."""

    def __init__(self, config, hidden_size=None, intermediate_size=None):
        super().__init__()
        self.config = config
        self.hidden_size = config.hidden_size if hidden_size is None else hidden_size
        self.intermediate_size = config.intermediate_size if intermediate_size is None else intermediate_size
        self.gate_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=False)
        self.up_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=False)
        self.down_proj = nn.Linear(self.intermediate_size, self.hidden_size, bias=False)
        self.act_fn = F.silu  # ACT2FN["silu"] is transformers' SiLUActivation = nn.functional.silu

    def forward(self, x):
        down_proj = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        return down_proj


class DeepseekV3TopkRouter(nn.Module):
    """``DeepseekV3TopkRouter``: fp32 logits, sigmoid, group-limited top-k under ``no_grad`` with the
    correction bias, ``gather`` of the unbiased scores, in-place renormalisation, routed scaling."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.top_k = config.num_experts_per_tok
        self.n_routed_experts = config.n_routed_experts
        self.routed_scaling_factor = config.routed_scaling_factor
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.norm_topk_prob = config.norm_topk_prob
        # deviation: the source allocates torch.empty (filled by the checkpoint / _init_weights' normal_);
        # here seeded randn
        self.weight = nn.Parameter(torch.randn((self.n_routed_experts, config.hidden_size)) / config.hidden_size ** 0.5)
        self.register_buffer("e_score_correction_bias", torch.zeros(self.n_routed_experts))
        # deviation: a trained checkpoint's correction bias is not zero; small seeded values, so that the
        # bias changes the picks as it does in the released models
        self.e_score_correction_bias.copy_(0.1 * torch.randn(self.n_routed_experts))

    @torch.no_grad()
    def get_topk_indices(self, scores):
        scores_for_choice = scores.view(-1, self.n_routed_experts) + self.e_score_correction_bias.unsqueeze(0)
        group_scores = (
            scores_for_choice.view(-1, self.n_group, self.n_routed_experts // self.n_group)
            .topk(2, dim=-1)[0]
            .sum(dim=-1)
        )
        group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores)
        group_mask.scatter_(1, group_idx, 1)
        score_mask = (
            group_mask.unsqueeze(-1)
            .expand(-1, self.n_group, self.n_routed_experts // self.n_group)
            .reshape(-1, self.n_routed_experts)
        )
        scores_for_choice = scores_for_choice.masked_fill(~score_mask.bool(), 0.0)
        topk_indices = torch.topk(scores_for_choice, k=self.top_k, dim=-1, sorted=False)[1]
        return topk_indices

    def forward(self, hidden_states):
        hidden_states = hidden_states.view(-1, self.config.hidden_size)
        router_logits = F.linear(hidden_states.type(torch.float32), self.weight.type(torch.float32))
        scores = router_logits.sigmoid()
        topk_indices = self.get_topk_indices(scores)
        topk_weights = scores.gather(1, topk_indices)
        if self.norm_topk_prob:
            denominator = topk_weights.sum(dim=-1, keepdim=True) + 1e-20
            topk_weights /= denominator
        topk_weights = topk_weights * self.routed_scaling_factor
        return topk_indices, topk_weights


class DeepseekV3MoE(nn.Module):
    """``DeepseekV3MoE``: ``moe`` (the per-expert loop with the ``numel() > 0`` skip, an fp32
    ``zeros_like`` accumulator, ``index_add_``, ``.type`` back) plus the shared experts on the
    un-flattened input. Deviations: tiny sizes only."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.experts = nn.ModuleList(
            [DeepseekV3MLP(config, intermediate_size=config.moe_intermediate_size)
             for _ in range(config.n_routed_experts)])
        self.gate = DeepseekV3TopkRouter(config)
        self.shared_experts = DeepseekV3MLP(
            config=config, intermediate_size=config.moe_intermediate_size * config.n_shared_experts)

    def moe(self, hidden_states, topk_indices, topk_weights):
        final_hidden_states = torch.zeros_like(hidden_states, dtype=topk_weights.dtype)
        expert_mask = torch.nn.functional.one_hot(topk_indices, num_classes=len(self.experts))
        expert_mask = expert_mask.permute(2, 0, 1)
        for expert_idx in range(len(self.experts)):
            expert = self.experts[expert_idx]
            mask = expert_mask[expert_idx]
            token_indices, weight_indices = torch.where(mask)
            if token_indices.numel() > 0:
                expert_weights = topk_weights[token_indices, weight_indices]
                expert_input = hidden_states[token_indices]
                expert_output = expert(expert_input)
                weighted_output = expert_output * expert_weights.unsqueeze(-1)
                final_hidden_states.index_add_(0, token_indices, weighted_output)
        return final_hidden_states.type(hidden_states.dtype)

    def forward(self, hidden_states):
        residuals = hidden_states
        orig_shape = hidden_states.shape
        topk_indices, topk_weights = self.gate(hidden_states)
        hidden_states = hidden_states.view(-1, hidden_states.shape[-1])
        hidden_states = self.moe(hidden_states, topk_indices, topk_weights).view(*orig_shape)
        hidden_states = hidden_states + self.shared_experts(residuals)
        return hidden_states


_x3d = tokens(lambda T: (1, T, D))

ENTRIES = [
    Idiom("deepseek_v3_45x_moe", "huggingface/transformers src/transformers/models/deepseek_v3/modeling_deepseek_v3.py "
          "@00b676f8f0489b88652a31d70751cc540dd06305 (= v4.55.0) DeepseekV3MoE + DeepseekV3TopkRouter + DeepseekV3MLP",
          seeded(460, lambda: DeepseekV3MoE(DeepseekV3ConfigLite())), _x3d,
          expect=1, other_gemms=4, faithful=True,
          note="fp32 router on .type(float32) copies, sigmoid, group-limited top-k under no_grad with the "
               "correction-bias buffer, gather of the unbiased scores, in-place '/=' by sum + 1e-20, "
               "routed_scaling_factor, the 'if token_indices.numel() > 0' skip, the fp32 zeros_like "
               "accumulator with index_add_ of un-cast bf16/fp32 products, .type(dtype) back, shared "
               "experts on the un-flattened input"),
]
