"""transformers 4.x ``MixtralSparseMoeBlock`` + ``MixtralBlockSparseTop2MLP`` (github
huggingface/transformers, ``src/transformers/models/mixtral/modeling_mixtral.py``), read from the
released wheels:

- v4.50.0: the ``for expert_idx in range(self.num_experts)`` loop (no ``expert_hit``: at the 4.4x
  tags and 4.50 the loop visits every expert);
- v4.55.0: the ``expert_hitted = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()`` loop
  that iterates over a tensor of expert ids (the form many 4.5x MoE blocks copied).

The block's forward returns ``(final_hidden_states, router_logits)`` and takes (batch, seq,
hidden): a wrapper keeps the router logits as an attribute, and the entries feed (1, T, D).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from idiom_catalogue import D, E, K, N, Idiom, seeded, tokens


class MixtralConfigLite:
    """The ``MixtralConfig`` fields the block reads (deviation: a plain object, not the config class)."""

    hidden_size = D
    intermediate_size = N
    num_local_experts = E
    num_experts_per_tok = K
    hidden_act = "silu"
    router_jitter_noise = 0.0  # router jitter off (MixtralConfig's default is 0.0 too)


class MixtralBlockSparseTop2MLP(nn.Module):
    """``MixtralBlockSparseTop2MLP``: ``w2(act(w1 x) * w3 x)``, bias-free linears."""

    def __init__(self, config):
        super().__init__()
        self.ffn_dim = config.intermediate_size
        self.hidden_dim = config.hidden_size
        self.w1 = nn.Linear(self.hidden_dim, self.ffn_dim, bias=False)
        self.w2 = nn.Linear(self.ffn_dim, self.hidden_dim, bias=False)
        self.w3 = nn.Linear(self.hidden_dim, self.ffn_dim, bias=False)
        self.act_fn = nn.SiLU()  # ACT2FN["silu"] is transformers' SiLUActivation = nn.functional.silu

    def forward(self, hidden_states):
        h = self.act_fn(self.w1(hidden_states)) * self.w3(hidden_states)
        return self.w2(h)


class MixtralSparseMoeBlock(nn.Module):
    """transformers ``MixtralSparseMoeBlock.forward``, op for op: (batch, seq, hidden) unpacked from
    the shape, the training-only jitter branch (kept; jitter 0 so it is skipped), ``view(-1, h)``,
    gate, softmax in fp32, top-k, the in-place renormalisation ``/=``, cast back to the input
    dtype, ``torch.zeros((B*S, h))`` accumulator, ``one_hot(...).permute(2, 1, 0)`` expert mask,
    per expert ``torch.where(mask[e])``, the row gather ``hidden[None, top_x].reshape(-1, h)``,
    expert times ``routing_weights[top_x, idx, None]``, ``index_add_`` with a ``.to(dtype)`` cast,
    ``reshape(B, S, h)``, and the ``(output, router_logits)`` return; the v4.50.0
    ``range(num_experts)`` loop. Deviations: tiny sizes only."""

    def __init__(self, config):
        super().__init__()
        self.hidden_dim = config.hidden_size
        self.ffn_dim = config.intermediate_size
        self.num_experts = config.num_local_experts
        self.top_k = config.num_experts_per_tok
        self.gate = nn.Linear(self.hidden_dim, self.num_experts, bias=False)
        self.experts = nn.ModuleList([MixtralBlockSparseTop2MLP(config) for _ in range(self.num_experts)])
        self.jitter_noise = config.router_jitter_noise

    def forward(self, hidden_states):
        batch_size, sequence_length, hidden_dim = hidden_states.shape
        if self.training and self.jitter_noise > 0:
            hidden_states *= torch.empty_like(hidden_states).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        hidden_states = hidden_states.view(-1, hidden_dim)
        router_logits = self.gate(hidden_states)
        routing_weights = F.softmax(router_logits, dim=1, dtype=torch.float)
        routing_weights, selected_experts = torch.topk(routing_weights, self.top_k, dim=-1)
        routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
        routing_weights = routing_weights.to(hidden_states.dtype)
        final_hidden_states = torch.zeros((batch_size * sequence_length, hidden_dim), dtype=hidden_states.dtype,
                                          device=hidden_states.device)
        expert_mask = torch.nn.functional.one_hot(selected_experts, num_classes=self.num_experts).permute(2, 1, 0)
        for expert_idx in range(self.num_experts):
            expert_layer = self.experts[expert_idx]
            idx, top_x = torch.where(expert_mask[expert_idx])
            current_state = hidden_states[None, top_x].reshape(-1, hidden_dim)
            current_hidden_states = expert_layer(current_state) * routing_weights[top_x, idx, None]
            final_hidden_states.index_add_(0, top_x, current_hidden_states.to(hidden_states.dtype))
        final_hidden_states = final_hidden_states.reshape(batch_size, sequence_length, hidden_dim)
        return final_hidden_states, router_logits


class MixtralSparseMoeBlockExpertHit(MixtralSparseMoeBlock):
    """transformers v4.55.0 ``MixtralSparseMoeBlock.forward``: the same ops as v4.50.0 up to the
    expert mask, then the loop over ``greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()`` (an
    (n_hit, 1) tensor: each ``expert_idx`` is a 1-element tensor), ``self.experts[expert_idx]``
    indexed by that tensor, ``torch.where(expert_mask[expert_idx].squeeze(0))``, and the same
    gather / weight / ``index_add_`` body. Deviations: tiny sizes only."""

    def forward(self, hidden_states):
        batch_size, sequence_length, hidden_dim = hidden_states.shape
        if self.training and self.jitter_noise > 0:
            hidden_states *= torch.empty_like(hidden_states).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        hidden_states = hidden_states.view(-1, hidden_dim)
        router_logits = self.gate(hidden_states)
        routing_weights = F.softmax(router_logits, dim=1, dtype=torch.float)
        routing_weights, selected_experts = torch.topk(routing_weights, self.top_k, dim=-1)
        routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
        routing_weights = routing_weights.to(hidden_states.dtype)
        final_hidden_states = torch.zeros((batch_size * sequence_length, hidden_dim), dtype=hidden_states.dtype,
                                          device=hidden_states.device)
        expert_mask = torch.nn.functional.one_hot(selected_experts, num_classes=self.num_experts).permute(2, 1, 0)
        expert_hitted = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        for expert_idx in expert_hitted:
            expert_layer = self.experts[expert_idx]
            idx, top_x = torch.where(expert_mask[expert_idx].squeeze(0))
            current_state = hidden_states[None, top_x].reshape(-1, hidden_dim)
            current_hidden_states = expert_layer(current_state) * routing_weights[top_x, idx, None]
            final_hidden_states.index_add_(0, top_x, current_hidden_states.to(hidden_states.dtype))
        final_hidden_states = final_hidden_states.reshape(batch_size, sequence_length, hidden_dim)
        return final_hidden_states, router_logits


class KeepRouterLogits(nn.Module):
    """Test wrapper (not in the source): returns the block's hidden states and keeps its router
    logits as ``self.router_logits`` (in transformers the decoder layer collects them for the
    load-balancing loss)."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        out, self.router_logits = self.block(x)
        return out


_x3d = tokens(lambda T: (1, T, D))

ENTRIES = [
    Idiom("mixtral_4x_range_loop", "transformers v4.50.0 models/mixtral/modeling_mixtral.py MixtralSparseMoeBlock + "
          "MixtralBlockSparseTop2MLP (range(num_experts) loop)",
          seeded(149, lambda: KeepRouterLogits(MixtralSparseMoeBlock(MixtralConfigLite()))), _x3d,
          expect=1, faithful=True,
          note="the (output, router_logits) tuple, the in-place '/=' renormalisation, fp32 softmax and the "
               "cast back, hidden[None, top_x].reshape, index_add_ with .to(dtype), reshape(B, S, h)"),
    Idiom("mixtral_4x_expert_hit", "transformers v4.55.0 models/mixtral/modeling_mixtral.py MixtralSparseMoeBlock "
          "(loop over greater(expert_mask.sum((-1, -2)), 0).nonzero())",
          seeded(150, lambda: KeepRouterLogits(MixtralSparseMoeBlockExpertHit(MixtralConfigLite()))), _x3d,
          expect=1, fullgraph=False, faithful=True,
          note="the loop over the nonzero() tensor of hit experts, the ModuleList indexed by a 1-element "
               "tensor and expert_mask[expert_idx].squeeze(0)"),
]
