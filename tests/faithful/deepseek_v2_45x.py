"""transformers 4.5x ``DeepseekV2MoE`` + ``DeepseekV2MoEGate`` + ``DeepseekV2MLP`` (github huggingface/transformers,
``src/transformers/models/deepseek_v2/modeling_deepseek_v2.py``), read from the released wheels v4.55.0 and
v4.56.2 (PyPI; the MoE classes are the same; the family is not in v4.53).

Unlike the Hub remote code's ``moe_infer`` (``deepseek_moe_infer.py``: ``@torch.no_grad()``, eval only,
counts copied to the host by ``.cpu().numpy()``), transformers' ``moe`` runs in training too and loops over
the counts *tensor*: ``cnts = topk_ids.new_zeros((T, E)); cnts.scatter_(1, topk_ids, 1)``,
``tokens_per_expert = cnts.sum(0)``, ``idxs = topk_ids.view(-1).argsort()``, ``sorted_tokens =
x[idxs // K]``, ``for i, num_tokens in enumerate(tokens_per_expert)`` with ``if num_tokens == 0:
continue`` (a data-dependent branch on a 0-d tensor), ``end_idx = start_idx + num_tokens`` (tensor slice
bounds), ``torch.cat(outputs) if outputs else sorted_tokens.new_empty(0)``, ``new_x = empty_like(outs);
new_x[idxs] = outs``, ``new_x.view(T, K, -1).type(w.dtype).mul_(w.unsqueeze(-1)).sum(1).type(new_x.dtype)``.
The gate computes fp32 logits (``F.linear`` of ``.type(torch.float32)`` copies), an fp32 softmax, and picks
``greedy`` (``topk(sorted=False)``) or ``group_limited_greedy`` (the max score per group, the best
``topk_group`` groups by ``zeros_like`` + ``scatter_``, ``masked_fill`` 0.0, ``topk(sorted=False)``), then
multiplies by ``routed_scaling_factor``: no renormalisation, no aux loss in this version. The shared
experts (``n_shared_experts`` times the expert width) run on the un-flattened input and are added after.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from idiom_catalogue import D, E, K, N, Idiom, seeded, tokens


class DeepseekV2ConfigLite:
    """The ``DeepseekV2Config`` fields the MoE classes read (deviation: a plain object, not the config class;
    tiny sizes; ``greedy`` routing, ``routed_scaling_factor`` 1.0 and two shared experts are the config's
    defaults)."""

    hidden_size = D
    intermediate_size = 2 * N
    moe_intermediate_size = N
    n_routed_experts = E
    n_shared_experts = 2
    num_experts_per_tok = K
    topk_method = "greedy"
    n_group = None
    topk_group = None
    norm_topk_prob = False
    routed_scaling_factor = 1.0
    aux_loss_alpha = 0.001
    seq_aux = True
    mlp_bias = False
    hidden_act = "silu"


class DeepseekV2GroupConfigLite(DeepseekV2ConfigLite):
    """DeepSeek-V2 (not Lite): ``group_limited_greedy`` over 2 groups of E // 2 experts, the best group
    kept, ``routed_scaling_factor`` 16.0 (the released V2's; tiny sizes)."""

    topk_method = "group_limited_greedy"
    n_group = 2
    topk_group = 1
    routed_scaling_factor = 16.0


class DeepseekV2MLP(nn.Module):
    """``DeepseekV2MLP``: ``down_proj(act(gate_proj x) * up_proj x)``, linears biased iff ``mlp_bias``."""

    def __init__(self, config, hidden_size=None, intermediate_size=None):
        super().__init__()
        self.config = config
        self.hidden_size = config.hidden_size if hidden_size is None else hidden_size
        self.intermediate_size = config.intermediate_size if intermediate_size is None else intermediate_size
        self.gate_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(self.intermediate_size, self.hidden_size, bias=config.mlp_bias)
        self.act_fn = F.silu  # ACT2FN["silu"] is transformers' SiLUActivation = nn.functional.silu

    def forward(self, x):
        down_proj = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        return down_proj


class DeepseekV2MoEGate(nn.Module):
    """``DeepseekV2MoEGate.forward``, op for op."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.top_k = config.num_experts_per_tok
        self.num_experts = config.n_routed_experts
        self.routed_scaling_factor = config.routed_scaling_factor
        self.alpha = config.aux_loss_alpha
        self.seq_aux = config.seq_aux
        self.topk_method = config.topk_method
        self.num_group = config.n_group
        self.topk_group = config.topk_group
        self.norm_topk_prob = config.norm_topk_prob
        self.gating_dim = config.hidden_size
        # deviation: the source allocates torch.empty (filled by the checkpoint / _init_weights); seeded randn
        self.weight = nn.Parameter(torch.randn((self.num_experts, self.gating_dim)) / self.gating_dim ** 0.5)

    def forward(self, hidden_states):
        batch_size, seq_len, hidden_dim = hidden_states.shape
        hidden_states = hidden_states.view(-1, hidden_dim)
        logits = F.linear(hidden_states.type(torch.float32), self.weight.type(torch.float32), None)
        scores = logits.softmax(dim=-1, dtype=torch.float32)
        if self.topk_method == "greedy":
            topk_weight, topk_idx = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)
        elif self.topk_method == "group_limited_greedy":
            group_scores = scores.view(batch_size * seq_len, self.num_group, -1).max(dim=-1).values
            group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
            group_mask = torch.zeros_like(group_scores)
            group_mask.scatter_(1, group_idx, 1)
            score_mask = (
                group_mask.unsqueeze(-1)
                .expand(batch_size * seq_len, self.num_group, self.num_experts // self.num_group)
                .reshape(batch_size * seq_len, -1)
            )
            tmp_scores = scores.masked_fill(~score_mask.bool(), 0.0)
            topk_weight, topk_idx = torch.topk(tmp_scores, k=self.top_k, dim=-1, sorted=False)
        topk_weight = topk_weight * self.routed_scaling_factor
        return topk_idx, topk_weight


class DeepseekV2MoE(nn.Module):
    """``DeepseekV2MoE``: ``moe`` (the counts-tensor loop) plus the shared experts. Deviations: tiny sizes;
    expert parallelism off (``ep_rank`` 0, ``experts_per_rank`` E, as the source sets them)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.num_experts_per_tok = config.num_experts_per_tok
        self.experts = nn.ModuleList(
            [(DeepseekV2MLP(config, intermediate_size=config.moe_intermediate_size))
             for _ in range(config.n_routed_experts)])
        self.gate = DeepseekV2MoEGate(config)
        if config.n_shared_experts is not None:
            intermediate_size = config.moe_intermediate_size * config.n_shared_experts
            self.shared_experts = DeepseekV2MLP(config=config, intermediate_size=intermediate_size)
        self.ep_rank = 0
        self.experts_per_rank = config.n_routed_experts

    def moe(self, hidden_states, topk_ids, topk_weight):
        cnts = topk_ids.new_zeros((topk_ids.shape[0], len(self.experts)))
        cnts.scatter_(1, topk_ids, 1)
        tokens_per_expert = cnts.sum(dim=0)
        indicies = topk_ids.view(-1).argsort()
        sorted_tokens = hidden_states[indicies // topk_ids.shape[1]]
        outputs = []
        start_idx = 0
        for i, num_tokens in enumerate(tokens_per_expert):
            if num_tokens == 0:
                continue
            end_idx = start_idx + num_tokens
            expert = self.experts[i + self.ep_rank * self.experts_per_rank]
            tokens_for_this_expert = sorted_tokens[start_idx:end_idx]
            expert_out = expert(tokens_for_this_expert)
            outputs.append(expert_out)
            start_idx = end_idx
        outs = torch.cat(outputs, dim=0) if outputs else sorted_tokens.new_empty(0)
        new_x = torch.empty_like(outs)
        new_x[indicies] = outs
        hidden_states = (
            new_x.view(*topk_ids.shape, -1)
            .type(topk_weight.dtype)
            .mul_(topk_weight.unsqueeze(dim=-1))
            .sum(dim=1)
            .type(new_x.dtype)
        )
        return hidden_states

    def forward(self, hidden_states):
        residuals = hidden_states
        orig_shape = hidden_states.shape
        topk_indices, topk_weights = self.gate(hidden_states)
        hidden_states = hidden_states.view(-1, hidden_states.shape[-1])
        hidden_states = self.moe(hidden_states, topk_indices, topk_weights).view(*orig_shape)
        hidden_states = hidden_states + self.shared_experts(residuals)
        return hidden_states


_x3d = tokens(lambda T: (1, T, D))
_SRC = ("transformers v4.55.0 / v4.56.2 models/deepseek_v2/modeling_deepseek_v2.py DeepseekV2MoE + "
        "DeepseekV2MoEGate ({}) + DeepseekV2MLP, training mode")

ENTRIES = [
    Idiom("deepseek_v2_45x_greedy", _SRC.format("greedy"),
          seeded(520, lambda: DeepseekV2MoE(DeepseekV2ConfigLite())), _x3d,
          expect=1, other_gemms=4, faithful=True,
          note="the loop over the counts tensor (enumerate of a 1-D tensor, 'if num_tokens == 0: continue' on a "
               "0-d tensor, tensor slice bounds carried across experts) in training (no no_grad), scatter_ "
               "counts, argsort, x[idxs // K], cat or new_empty(0), new_x[idxs] = outs into empty_like, "
               ".type(fp32).mul_(w).sum(1).type back, fp32 gate without renormalisation, shared experts"),
    Idiom("deepseek_v2_45x_group_limited", _SRC.format("group_limited_greedy"),
          seeded(521, lambda: DeepseekV2MoE(DeepseekV2GroupConfigLite())), _x3d,
          expect=1, other_gemms=4, faithful=True,
          note="as deepseek_v2_45x_greedy with the group-limited gate (max per group, scatter_ mask, "
               "masked_fill 0.0) and routed scaling 16"),
]
