"""transformers 4.x ``Qwen2MoeSparseMoeBlock`` + ``Qwen2MoeMLP`` (github huggingface/transformers,
``src/transformers/models/qwen2_moe/modeling_qwen2_moe.py``), read from the released wheels:

- v4.50.0 (PyPI ``transformers==4.50.0``): the ``for expert_idx in range(self.num_experts)`` loop;
- v4.55.0 (PyPI ``transformers==4.55.0``): the loop over
  ``torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()`` (the ``expert_hitted`` tensor).

Both add a shared expert (a ``Qwen2MoeMLP`` of its own width) scaled by
``sigmoid(shared_expert_gate(x))`` (a ``Linear(hidden, 1)``) to the routed sum, after the loop.
``norm_topk_prob`` is False (``Qwen2MoeConfig``'s default, and Qwen1.5-MoE-A2.7B's setting): the
top-k softmax probabilities are used un-renormalised (they sum to less than 1).

The block's forward returns ``(final_hidden_states, router_logits)`` and takes (batch, seq,
hidden): a wrapper keeps the router logits as an attribute, and the entries feed (1, T, D).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from idiom_catalogue import D, E, K, N, Idiom, seeded, tokens


class Qwen2MoeConfigLite:
    """The ``Qwen2MoeConfig`` fields the block reads (deviation: a plain object, not the config class;
    tiny sizes: Qwen1.5-MoE-A2.7B has hidden 2048, moe_intermediate_size 1408, 60 experts, top-4 and
    shared_expert_intermediate_size 5632 = 4 x the expert width; here the shared expert is 2 x N)."""

    hidden_size = D
    moe_intermediate_size = N
    shared_expert_intermediate_size = 2 * N
    num_experts = E
    num_experts_per_tok = K
    norm_topk_prob = False  # the config default
    hidden_act = "silu"


class Qwen2MoeMLP(nn.Module):
    """``Qwen2MoeMLP``: ``down_proj(act(gate_proj x) * up_proj x)``, bias-free linears, width given by
    the caller (experts: moe_intermediate_size; shared expert: shared_expert_intermediate_size)."""

    def __init__(self, config, intermediate_size=None):
        super().__init__()
        self.config = config
        self.hidden_size = config.hidden_size
        self.intermediate_size = intermediate_size
        self.gate_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=False)
        self.up_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=False)
        self.down_proj = nn.Linear(self.intermediate_size, self.hidden_size, bias=False)
        self.act_fn = F.silu  # ACT2FN["silu"] is transformers' SiLUActivation = nn.functional.silu

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class Qwen2MoeSparseMoeBlock(nn.Module):
    """transformers v4.50.0 ``Qwen2MoeSparseMoeBlock.forward``, op for op: shape unpacked,
    ``view(-1, h)``, gate, softmax in fp32, top-k, the ``norm_topk_prob`` branch (in-place ``/=``;
    not taken at the default False), cast back to the input dtype, ``torch.zeros((B*S, h))``,
    ``one_hot(...).permute(2, 1, 0)``, per expert ``torch.where(mask[e])``,
    ``hidden[None, top_x].reshape(-1, h)``, expert times ``routing_weights[top_x, idx, None]``,
    ``index_add_`` with ``.to(dtype)``; then the shared expert on every token times
    ``F.sigmoid(shared_expert_gate(x))``, added out of place, ``reshape(B, S, h)``, and the
    ``(output, router_logits)`` return. Deviations: tiny sizes only."""

    def __init__(self, config):
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = nn.ModuleList(
            [Qwen2MoeMLP(config, intermediate_size=config.moe_intermediate_size) for _ in range(self.num_experts)])
        self.shared_expert = Qwen2MoeMLP(config, intermediate_size=config.shared_expert_intermediate_size)
        self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)

    def forward(self, hidden_states):
        batch_size, sequence_length, hidden_dim = hidden_states.shape
        hidden_states = hidden_states.view(-1, hidden_dim)
        router_logits = self.gate(hidden_states)
        routing_weights = F.softmax(router_logits, dim=1, dtype=torch.float)
        routing_weights, selected_experts = torch.topk(routing_weights, self.top_k, dim=-1)
        if self.norm_topk_prob:
            routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
        routing_weights = routing_weights.to(hidden_states.dtype)
        final_hidden_states = torch.zeros((batch_size * sequence_length, hidden_dim), dtype=hidden_states.dtype,
                                          device=hidden_states.device)
        expert_mask = F.one_hot(selected_experts, num_classes=self.num_experts).permute(2, 1, 0)
        for expert_idx in range(self.num_experts):
            expert_layer = self.experts[expert_idx]
            idx, top_x = torch.where(expert_mask[expert_idx])
            current_state = hidden_states[None, top_x].reshape(-1, hidden_dim)
            current_hidden_states = expert_layer(current_state) * routing_weights[top_x, idx, None]
            final_hidden_states.index_add_(0, top_x, current_hidden_states.to(hidden_states.dtype))
        shared_expert_output = self.shared_expert(hidden_states)
        shared_expert_output = F.sigmoid(self.shared_expert_gate(hidden_states)) * shared_expert_output
        final_hidden_states = final_hidden_states + shared_expert_output
        final_hidden_states = final_hidden_states.reshape(batch_size, sequence_length, hidden_dim)
        return final_hidden_states, router_logits


class Qwen2MoeSparseMoeBlockExpertHit(Qwen2MoeSparseMoeBlock):
    """transformers v4.55.0 ``Qwen2MoeSparseMoeBlock.forward``: the same ops as v4.50.0 except the loop,
    which runs over ``greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()`` (each ``expert_idx`` a
    1-element tensor), indexes the ModuleList with that tensor and takes
    ``torch.where(expert_mask[expert_idx].squeeze(0))``. Deviations: tiny sizes only."""

    def forward(self, hidden_states):
        batch_size, sequence_length, hidden_dim = hidden_states.shape
        hidden_states = hidden_states.view(-1, hidden_dim)
        router_logits = self.gate(hidden_states)
        routing_weights = F.softmax(router_logits, dim=1, dtype=torch.float)
        routing_weights, selected_experts = torch.topk(routing_weights, self.top_k, dim=-1)
        if self.norm_topk_prob:
            routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
        routing_weights = routing_weights.to(hidden_states.dtype)
        final_hidden_states = torch.zeros((batch_size * sequence_length, hidden_dim), dtype=hidden_states.dtype,
                                          device=hidden_states.device)
        expert_mask = F.one_hot(selected_experts, num_classes=self.num_experts).permute(2, 1, 0)
        expert_hitted = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        for expert_idx in expert_hitted:
            expert_layer = self.experts[expert_idx]
            idx, top_x = torch.where(expert_mask[expert_idx].squeeze(0))
            current_state = hidden_states[None, top_x].reshape(-1, hidden_dim)
            current_hidden_states = expert_layer(current_state) * routing_weights[top_x, idx, None]
            final_hidden_states.index_add_(0, top_x, current_hidden_states.to(hidden_states.dtype))
        shared_expert_output = self.shared_expert(hidden_states)
        shared_expert_output = F.sigmoid(self.shared_expert_gate(hidden_states)) * shared_expert_output
        final_hidden_states = final_hidden_states + shared_expert_output
        final_hidden_states = final_hidden_states.reshape(batch_size, sequence_length, hidden_dim)
        return final_hidden_states, router_logits


class KeepRouterLogits(nn.Module):
    """Test wrapper (not in the source): returns the block's hidden states and keeps its router
    logits as ``self.router_logits`` (in transformers the decoder layer hands them up for the
    load-balancing loss)."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        out, self.router_logits = self.block(x)
        return out


_x3d = tokens(lambda T: (1, T, D))

ENTRIES = [
    Idiom("qwen2_moe_4x_range_loop", "transformers v4.50.0 models/qwen2_moe/modeling_qwen2_moe.py "
          "Qwen2MoeSparseMoeBlock + Qwen2MoeMLP (range(num_experts) loop, sigmoid-gated shared expert)",
          seeded(300, lambda: KeepRouterLogits(Qwen2MoeSparseMoeBlock(Qwen2MoeConfigLite()))), _x3d,
          expect=1, other_gemms=5, faithful=True,
          note="norm_topk_prob False (top-k probabilities not renormalised), the shared expert of its own "
               "width times sigmoid(Linear(h, 1)) added after the loop, fp32 softmax and cast back, "
               "index_add_ with .to(dtype), the (output, router_logits) tuple"),
    Idiom("qwen2_moe_4x_expert_hit", "transformers v4.55.0 models/qwen2_moe/modeling_qwen2_moe.py "
          "Qwen2MoeSparseMoeBlock (loop over greater(expert_mask.sum((-1, -2)), 0).nonzero())",
          seeded(301, lambda: KeepRouterLogits(Qwen2MoeSparseMoeBlockExpertHit(Qwen2MoeConfigLite()))), _x3d,
          expect=1, other_gemms=5, fullgraph=False, faithful=True,
          note="the loop over the nonzero() tensor of hit experts with the ModuleList indexed by a "
               "1-element tensor, plus the sigmoid-gated shared expert and un-renormalised top-k"),
]
