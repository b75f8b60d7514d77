"""OpenMoE's sparse MLP in its PyTorch (Hugging Face) port, re-implemented op for op at a tiny size.

Read: github pingzhili/openmoe-pt at commit 81951ebfb1bc3fa93ab156af64769a4d6667d9c4,
``hf_openmoe/modeling_hf_openmoe.py`` (``swiglu_act_fn``, ``HFOpenMoeMLP``, ``moe_cumsum``,
``HFOpenMoeTop2Router``, ``HFOpenMoeSparseMLP`` with ``_local_process`` (which says it is copied from
ColossalAI's ``MLPExperts``), ``LlamaRMSNorm``, ``HFOpenMoeDecoderLayer.forward``) and
``hf_openmoe/configuration_hf_openmoe.py`` (``HFOpenMoeConfig`` defaults: top-2, capacity factor 1.25
train / 2.0 eval, min capacity 4, tokens dropped). This is the PyTorch port of OpenMoE
(XueFuzhao/OpenMoE, trained in JAX/T5X; ColossalAI's ``examples/language/openmoe`` is the other
PyTorch port); the stored OpenMoE repository itself holds no PyTorch MoE layer.

Nothing is random in this layer (``router_noisy_policy`` None, the port has no noise at all), so no
line is changed; the sizes are tiny (E=4 experts, ``intermediate_size`` 8, hidden 16).
"""
from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from idiom_catalogue import D, E, N, Idiom, seeded, tokens


def swiglu_act_fn(x):
    """Split the last axis in two halves by ``torch.split``: ``x1 * (x2 * sigmoid(x2))``."""
    size = x.shape[-1]
    assert size % 2 == 0, "axis size must be divisible by 2"
    x1, x2 = torch.split(x, size // 2, -1)
    return x1 * (x2 * torch.sigmoid(x2))


class HFOpenMoeMLP(nn.Module):
    """``HFOpenMoeMLP``: ``gate_proj`` (d -> 2f), ``up_proj`` (d -> f), ``down_proj`` (f -> d), no biases;
    ``down(swiglu_act_fn(gate(x)) * up(x))``: three factors, the gate's two halves and the up projection."""

    def __init__(self, config):
        super().__init__()
        assert config.hidden_act == "swiglu"
        self.ffn_dim = config.intermediate_size
        self.hidden_dim = config.hidden_size
        self.gate_proj = nn.Linear(self.hidden_dim, self.ffn_dim * 2, bias=False)
        self.up_proj = nn.Linear(self.hidden_dim, self.ffn_dim, bias=False)
        self.down_proj = nn.Linear(self.ffn_dim, self.hidden_dim, bias=False)

    def forward(self, hidden_states):
        return self.down_proj(swiglu_act_fn(self.gate_proj(hidden_states)) * self.up_proj(hidden_states))


def moe_cumsum(inputs: torch.Tensor):
    return torch.cumsum(inputs, dim=0) - 1


class HFOpenMoeTop2Router(nn.Module):
    """``HFOpenMoeTop2Router``: fp32 input asserted, softmax, host-side capacity
    ``max(floor(k * cf * S / E) rounded up to even, min_capacity)``, top-1 argmax and int32 one-hot, top-2
    argmax of ``masked_fill(-inf)``, cumsum-1 ranks with ``rank2 +=`` and ``mask *= lt(rank, C)`` in place,
    ``used_capacity``, un-renormalised weights ``mask * probs``; the (S, E, C) combine weights and the bool
    dispatch mask built by advanced-indexing read-modify-writes ``cb[i, idx[i], rank[i]] += w[i, idx[i]]``
    and ``sec[i, idx[i], rank[i]] |= mask.bool()[i, idx[i]]``."""

    def __init__(self, config):
        super().__init__()
        assert config.router_topk == 2
        self.k_value = 2
        self.capacity_factor_train = config.router_capacity_factor_train
        self.capacity_factor_eval = config.router_capacity_factor_eval
        self.min_capacity = config.router_min_capacity
        self.drop_tks = config.router_drop_tks

    def get_capacity(self, logits_shape):
        capacity_factor = self.capacity_factor_train if self.training else self.capacity_factor_eval
        capacity = math.floor(self.k_value * capacity_factor * logits_shape[-2] / logits_shape[-1])
        capacity += capacity % 2
        capacity = max(capacity, self.min_capacity)
        assert capacity > 0
        return int(capacity)

    def forward(self, inputs: torch.Tensor) -> Tuple:
        assert inputs.dtype == torch.float, "Router input should be FP32"
        probs = F.softmax(inputs, dim=-1)
        num_experts = probs.size(-1)
        capacity = self.get_capacity(inputs.shape)

        top1_idx = torch.argmax(probs, dim=-1)
        mask1 = F.one_hot(top1_idx, num_classes=num_experts).to(torch.int32)
        logits_except1 = probs.masked_fill(mask1.bool(), float("-inf"))
        top2_idx = torch.argmax(logits_except1, dim=-1)
        mask2 = F.one_hot(top2_idx, num_classes=num_experts).to(torch.int32)

        rank1 = moe_cumsum(mask1)
        rank2 = moe_cumsum(mask2)
        rank2 += torch.sum(mask1, dim=-2, keepdim=True)

        mask1 *= torch.lt(rank1, capacity)
        mask2 *= torch.lt(rank2, capacity)
        used_capacity = mask1.sum(dim=0) + mask2.sum(dim=0)

        rank1 = torch.sum(mask1 * rank1, dim=-1)
        rank2 = torch.sum(mask2 * rank2, dim=-1)

        weight1 = mask1 * probs.type_as(inputs)
        weight2 = mask2 * probs.type_as(inputs)

        cb_weight = torch.zeros(inputs.shape + (capacity,), device=inputs.device)
        sec_mask = torch.zeros_like(cb_weight, dtype=torch.bool)
        indices = torch.arange(0, inputs.shape[0], device=inputs.device)
        cb_weight[indices, top1_idx[indices], rank1[indices]] += weight1[indices, top1_idx[indices]]
        cb_weight[indices, top2_idx[indices], rank2[indices]] += weight2[indices, top2_idx[indices]]
        sec_mask[indices, top1_idx[indices], rank1[indices]] |= mask1.bool()[indices, top1_idx[indices]]
        sec_mask[indices, top2_idx[indices], rank2[indices]] |= mask2.bool()[indices, top2_idx[indices]]
        return used_capacity, cb_weight, sec_mask


class HFOpenMoeSparseMLP(nn.Module):
    """``HFOpenMoeSparseMLP.forward``: tokens ``reshape(-1, d)``, fp32 tokens, the gate module moved to
    fp32 and re-assigned in forward (``self.gate = self.gate.to(torch.float)``), router, dispatch
    ``matmul(sec_mask.type_as(x).permute(1, 2, 0), tokens)``, ``_local_process`` (ColossalAI
    ``MLPExperts``: unsqueeze, transpose, reshape to (E, -1, d), a list of per-expert module calls,
    ``cat`` of unsqueezed outputs, reshape, transpose back, ``contiguous``), combine
    ``matmul(cb.type_as(x).view(S, -1), y.view(-1, d))``, reshape to the input's shape. ``used_capacity``
    is computed and dropped, as the source does."""

    def __init__(self, config):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.intermediate_size = config.intermediate_size
        self.num_experts = config.num_experts
        self.gate = nn.Linear(self.hidden_size, config.num_experts, bias=False)
        self.experts = nn.ModuleList([HFOpenMoeMLP(config) for _ in range(self.num_experts)])
        self.router = HFOpenMoeTop2Router(config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        tokens = hidden_states.reshape(-1, self.hidden_size)
        inputs = hidden_states
        fp32_input = tokens.to(torch.float)
        self.gate = self.gate.to(torch.float)
        gate_output = self.gate(fp32_input)

        used_capacity, *route_result_list = self.router(inputs=gate_output)

        sec_mask_f = route_result_list[1].type_as(inputs)
        dispatch_data = torch.matmul(sec_mask_f.permute(1, 2, 0), tokens)

        expert_output = self._local_process(dispatch_data)

        combine_weights = route_result_list[0].type_as(inputs)
        combine_weights = combine_weights.view(combine_weights.shape[0], -1)
        expert_output = expert_output.view(-1, expert_output.shape[-1])
        ans = torch.matmul(combine_weights, expert_output)

        ans = ans.reshape(inputs.shape)
        return ans

    def _local_process(self, expert_in: torch.Tensor) -> torch.Tensor:
        expert_in = expert_in.unsqueeze(0)
        x = expert_in
        e = x.size(1)
        h = x.size(-1)
        x = x.transpose(0, 1)
        inshape = x.shape
        x = x.reshape(e, -1, h)
        x = [self.experts[i](x[i]) for i in range(e)]
        x = torch.cat([x[i].unsqueeze(0) for i in range(e)], dim=0)
        x = x.reshape(inshape)
        x = x.transpose(0, 1).contiguous()
        expert_out = x
        return expert_out


class LlamaRMSNorm(nn.Module):
    """The port's ``LlamaRMSNorm``: fp32 variance, ``rsqrt``, cast back, times the weight."""

    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class HFOpenMoeFFNSublayers(nn.Module):
    """The feed-forward part of ``HFOpenMoeDecoderLayer.forward`` for an MoE layer (``moe=True``):
    ``post_attention_layernorm`` -> sparse MLP -> residual, then ``pre_extra_mlp_layernorm`` -> the dense
    ``extra_mlp`` (an ``HFOpenMoeMLP``) -> residual. The attention half of the layer is left out (it is
    not part of the MoE block; the catalogue feeds the hidden states directly)."""

    def __init__(self, config):
        super().__init__()
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = HFOpenMoeSparseMLP(config)
        self.pre_extra_mlp_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.extra_mlp = HFOpenMoeMLP(config)
        self.moe = True

    def forward(self, hidden_states):
        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = self.mlp(hidden_states)
        hidden_states = residual + hidden_states
        if self.moe:
            residual = hidden_states
            hidden_states = self.pre_extra_mlp_layernorm(hidden_states)
            hidden_states = self.extra_mlp(hidden_states)
            hidden_states = residual + hidden_states
        return hidden_states


def _config():
    # HFOpenMoeConfig defaults for the router; tiny sizes
    return SimpleNamespace(hidden_size=D, intermediate_size=N, num_experts=E, hidden_act="swiglu", router_topk=2,
                           router_capacity_factor_train=1.25, router_capacity_factor_eval=2.0,
                           router_min_capacity=4, router_drop_tks=True, rms_norm_eps=1e-6)


_x3d = tokens(lambda T: (1, T, D))
_SRC = "pingzhili/openmoe-pt hf_openmoe/modeling_hf_openmoe.py HFOpenMoeSparseMLP + HFOpenMoeTop2Router + HFOpenMoeMLP"

ENTRIES = [
    Idiom("openmoe_sparse_mlp", _SRC + ", training mode (capacity factor 1.25)",
          seeded(380, lambda: HFOpenMoeSparseMLP(_config())), _x3d, expect=1, faithful=True,
          other_gemms=1,  # the fp32 gate Linear
          note="gate module re-assigned by .to(float) in forward, int32 one-hots with in-place rank2 += and mask *=, "
               "even-rounded host capacity, no renormalisation, combine weights and a separate bool dispatch mask "
               "built by advanced-index += / |= read-modify-writes, triple-factor swiglu experts "
               "(split halves x1 * silu(x2) * up), ColossalAI MLPExperts transposes and per-expert list + cat"),
    Idiom("openmoe_ffn_sublayers_eval", _SRC + ", the MoE decoder layer's FFN half (RMSNorm, sparse MLP, residual, "
          "RMSNorm, dense extra_mlp, residual), eval mode (capacity factor 2.0)",
          seeded(381, lambda: HFOpenMoeFFNSublayers(_config()).eval()), _x3d, expect=1, faithful=True,
          other_gemms=4,  # the gate Linear + the dense extra_mlp's three projections
          note="as openmoe_sparse_mlp inside the decoder layer: fp32 RMSNorm prenorm, residual, and the dense "
               "extra_mlp sublayer after the MoE; eval capacity factor 2.0"),
]
