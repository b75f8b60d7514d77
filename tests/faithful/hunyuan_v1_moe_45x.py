"""transformers 4.5x ``HunYuanMoEV1Moe`` + ``HunYuanMoEV1Gate`` + ``HunYuanMoEV1MLP`` (github
huggingface/transformers, ``src/transformers/models/hunyuan_v1_moe/modeling_hunyuan_v1_moe.py``), read
from the released wheel v4.56.2 (PyPI; the family first appears in v4.56).

The shared MLP runs first on the (B, S, h) input; the gate (``HunYuanMoEV1Gate``: an ``nn.Linear``
created with ``dtype=torch.float32``, the input reshaped to (-1, h) and cast ``.float()`` when the
gate's weight is fp32) gives fp32 logits; softmax (``dtype=torch.float``), ``topk``, the in-place
``/=`` renormalisation (always on), cast back; transformers' ``expert_hit`` loop (``one_hot`` mask
``permute(2, 1, 0)``, ``greater(mask.sum((-1, -2)), 0).nonzero()``, ``where(mask[e].squeeze(0))``,
``x[None, top_x].reshape(-1, h)``, ``routing_weights[top_x, idx, None]``, ``index_add_`` with
``.to(dtype)``) into ``zeros``, ``reshape(B, S, h)``, ``+ hidden_states_mlp``. The experts and the
shared MLP have the same width (``intermediate_size``; ``is_shared_mlp`` is not read in v4.56.2). The
block returns the hidden states only.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from idiom_catalogue import D, E, K, N, Idiom, seeded, tokens


class HunYuanMoEV1ConfigLite:
    """The ``HunYuanMoEV1Config`` fields the block reads (deviation: a plain object, not the config class;
    tiny sizes; ``moe_topk`` K where the config default is 1)."""

    hidden_size = D
    intermediate_size = N
    num_experts = E
    moe_topk = K
    hidden_act = "silu"


class HunYuanMoEV1MLP(nn.Module):
    """``HunYuanMoEV1MLP``: ``down_proj(act(gate_proj x) * up_proj x)``, bias-free, width intermediate_size."""

    def __init__(self, config, layer_idx=None, is_shared_mlp=False):
        super().__init__()
        self.config = config
        self.hidden_size = config.hidden_size
        self.intermediate_size = config.intermediate_size
        self.gate_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=False)
        self.up_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=False)
        self.down_proj = nn.Linear(self.intermediate_size, self.hidden_size, bias=False)
        self.act_fn = F.silu  # ACT2FN["silu"] is transformers' SiLUActivation = nn.functional.silu
        self.layer_idx = layer_idx

    def forward(self, x):
        down_proj = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        return down_proj


class HunYuanMoEV1Gate(nn.Module):
    """``HunYuanMoEV1Gate``: an fp32 linear on the flattened input, cast to fp32 when the weight is."""

    def __init__(self, config, layer_idx=None):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        num_experts = config.num_experts if isinstance(config.num_experts, int) else config.num_experts[layer_idx]
        self.wg = nn.Linear(config.hidden_size, num_experts, bias=False, dtype=torch.float32)

    def forward(self, hidden_states):
        bsz, seq_len, hidden_size = hidden_states.shape
        hidden_states = hidden_states.reshape(-1, hidden_size)
        if self.wg.weight.dtype == torch.float32:
            hidden_states = hidden_states.float()
        logits = self.wg(hidden_states)
        return logits


class HunYuanMoEV1Moe(nn.Module):
    """``HunYuanMoEV1Moe.forward``, op for op (v4.56.2). Deviations: tiny sizes only."""

    def __init__(self, config, layer_idx=None):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_experts = config.num_experts if isinstance(config.num_experts, int) else config.num_experts[layer_idx]
        self.top_k = config.moe_topk if isinstance(config.moe_topk, int) else config.moe_topk[layer_idx]
        self.gate = HunYuanMoEV1Gate(config, layer_idx=layer_idx)
        self.experts = nn.ModuleList(
            [HunYuanMoEV1MLP(config, layer_idx=layer_idx, is_shared_mlp=False) for _ in range(self.num_experts)])
        self.shared_mlp = HunYuanMoEV1MLP(config, layer_idx=layer_idx, is_shared_mlp=True)

    def forward(self, hidden_states):
        batch_size, sequence_length, hidden_dim = hidden_states.shape
        hidden_states_mlp = self.shared_mlp(hidden_states)
        router_logits = self.gate(hidden_states)
        hidden_states = hidden_states.view(-1, hidden_dim)
        routing_weights = F.softmax(router_logits, dim=1, dtype=torch.float)
        routing_weights, selected_experts = torch.topk(routing_weights, self.top_k, dim=-1)
        routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
        routing_weights = routing_weights.to(hidden_states.dtype)
        final_hidden_states = torch.zeros(
            (batch_size * sequence_length, hidden_dim), dtype=hidden_states.dtype, device=hidden_states.device
        )
        expert_mask = torch.nn.functional.one_hot(selected_experts, num_classes=self.num_experts).permute(2, 1, 0)
        expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        for expert_idx in expert_hit:
            expert_layer = self.experts[expert_idx]
            idx, top_x = torch.where(expert_mask[expert_idx].squeeze(0))
            current_state = hidden_states[None, top_x].reshape(-1, hidden_dim)
            current_hidden_states = expert_layer(current_state) * routing_weights[top_x, idx, None]
            final_hidden_states.index_add_(0, top_x, current_hidden_states.to(hidden_states.dtype))
        final_hidden_states = final_hidden_states.reshape(batch_size, sequence_length, hidden_dim)
        return final_hidden_states + hidden_states_mlp


ENTRIES = [
    Idiom("hunyuan_v1_moe_45x_moe", "transformers v4.56.2 models/hunyuan_v1_moe/modeling_hunyuan_v1_moe.py "
          "HunYuanMoEV1Moe + HunYuanMoEV1Gate + HunYuanMoEV1MLP",
          seeded(510, lambda: HunYuanMoEV1Moe(HunYuanMoEV1ConfigLite())), tokens(lambda T: (1, T, D)),
          expect=1, other_gemms=4, fullgraph=False, faithful=True,
          note="the shared MLP on the 3-D input before the router, the fp32 gate module with its "
               "weight-dtype check and .float() input, the in-place '/=' renormalisation, the expert_hit "
               "loop, the shared output added after the reshape"),
]
