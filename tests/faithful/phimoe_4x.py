"""transformers 4.x ``PhimoeSparseMoeBlock`` + ``PhimoeBlockSparseTop2MLP`` + ``sparsemixer`` +
``MultiplierProcessor`` (github huggingface/transformers, ``src/transformers/models/phimoe/modeling_phimoe.py``),
read from the released wheels v4.50.0 and v4.55.0 (PyPI): the MoE code is the same in both (4.55
only changes docstrings).

Phi-3.5-MoE routes with SparseMixer: top-1 is the arg-max of the raw logits; its weight is the
softmax over the logits that lie within a relative ``2 * router_jitter_noise`` of the max (the rest
masked to -inf); the first pick is then scattered to -inf and the same is done again for the
second pick. In training the picks are Gumbel-sampled and the weights go through the
``MultiplierProcessor`` autograd.Function (Heun's third-order gradient estimate); in eval the picks
are the arg-maxes and the weights the plain gathered softmax values. The entry runs the eval
path (deviation: ``.eval()``; the training path draws random numbers, which eager and compiled
runs cannot share). ``router_jitter_noise`` is NOT noise in eval: it is the masking threshold, kept
at the config default 0.01.

The block returns ``(final_hidden_states, router_logits)`` and takes (batch, seq, hidden): a wrapper
keeps the router logits as an attribute, and the entry feeds (1, T, D).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from idiom_catalogue import D, E, K, N, Idiom, seeded, tokens


class PhimoeConfigLite:
    """The ``PhimoeConfig`` fields the block reads (deviation: a plain object, not the config class;
    tiny sizes: Phi-3.5-MoE has hidden 4096, intermediate 6400, 16 experts, top-2)."""

    hidden_size = D
    intermediate_size = N
    num_local_experts = E
    num_experts_per_tok = K  # sparsemixer raises unless 2
    hidden_act = "silu"
    router_jitter_noise = 0.01  # config default: the sparsity threshold of sparsemixer (used in eval too)
    input_jitter_noise = 0.0  # config default: no input jitter


class PhimoeBlockSparseTop2MLP(nn.Module):
    """``PhimoeBlockSparseTop2MLP``: ``w2(act(w1 x) * w3 x)``, bias-free linears."""

    def __init__(self, config):
        super().__init__()
        self.ffn_dim = config.intermediate_size
        self.hidden_dim = config.hidden_size
        self.w1 = nn.Linear(self.hidden_dim, self.ffn_dim, bias=False)
        self.w2 = nn.Linear(self.ffn_dim, self.hidden_dim, bias=False)
        self.w3 = nn.Linear(self.hidden_dim, self.ffn_dim, bias=False)
        self.act_fn = F.silu  # ACT2FN["silu"] is transformers' SiLUActivation = nn.functional.silu

    def forward(self, hidden_states):
        current_hidden_states = self.act_fn(self.w1(hidden_states)) * self.w3(hidden_states)
        current_hidden_states = self.w2(current_hidden_states)
        return current_hidden_states


class MultiplierProcessor(torch.autograd.Function):
    """``MultiplierProcessor``: forward ``multiplier * mask_for_one``; backward scales the incoming
    gradient by the multiplier and returns ``-masked_gates * g`` with ``g`` scatter-added at the
    selected expert, as the gradient of the scores (training path only)."""

    @staticmethod
    def forward(ctx, scores, multiplier, selected_experts, masked_gates, mask_for_one):
        ctx.save_for_backward(multiplier, selected_experts, masked_gates)
        return multiplier * mask_for_one

    @staticmethod
    def backward(ctx, grad_at_output):
        multiplier, selected_experts, masked_gates = ctx.saved_tensors
        grad_at_output = grad_at_output * multiplier
        grad_at_scores_expanded = masked_gates * grad_at_output.mul(-1)
        grad_at_scores_expanded.scatter_add_(dim=-1, index=selected_experts, src=grad_at_output)
        return grad_at_scores_expanded, None, None, None, None


def sparsemixer(scores, jitter_eps, training, top_k=2):
    """``sparsemixer``, op for op (both branches; the entry runs ``training=False``)."""
    if top_k != 2:
        raise ValueError("top_k must be equal to 2")

    # first pick
    with torch.no_grad():
        mask_logits_threshold, max_ind = scores.max(dim=-1, keepdim=True)
        factor = scores.abs().clamp(min=mask_logits_threshold)
        mask_logits_threshold = ((mask_logits_threshold - scores) / factor) > (2 * jitter_eps)
    masked_gates = scores.masked_fill(mask_logits_threshold, float("-inf"))
    if training:
        # Gumbel sampling (not run by the entry: eval mode)
        selected_experts = (masked_gates - torch.empty_like(
            masked_gates, memory_format=torch.legacy_contiguous_format).exponential_().log()).max(dim=-1)[1].unsqueeze(-1)
    else:
        selected_experts = max_ind
    masked_gates = torch.softmax(masked_gates, dim=-1)
    multiplier_o = masked_gates.gather(dim=-1, index=selected_experts)
    if training:
        max_scores, max_ind = masked_gates.max(dim=-1, keepdim=True)
        mask_for_one = torch.logical_or(selected_experts == max_ind, torch.rand_like(max_scores) > 0.75)
        mask_for_one = torch.add(0.3333, mask_for_one, alpha=0.6667).type_as(masked_gates)
        multiplier = MultiplierProcessor.apply(scores, multiplier_o, selected_experts, masked_gates, mask_for_one)
    else:
        multiplier = multiplier_o

    # second pick: the first one masked out
    masked_scores = torch.scatter(scores, -1, selected_experts, float("-inf"))
    with torch.no_grad():
        mask_logits_threshold, max_ind = masked_scores.max(dim=-1, keepdim=True)
        factor = scores.abs().clamp(min=mask_logits_threshold)  # (the source clamps |scores|, not |masked_scores|)
        mask_logits_threshold = ((mask_logits_threshold - scores) / factor) > (2 * jitter_eps)
    masked_gates_top2 = masked_scores.masked_fill(mask_logits_threshold, float("-inf"))
    if training:
        selected_experts_top2 = (masked_gates_top2 - torch.empty_like(
            masked_gates_top2, memory_format=torch.legacy_contiguous_format).exponential_().log()
        ).max(dim=-1)[1].unsqueeze(-1)
    else:
        selected_experts_top2 = max_ind
    masked_gates_top2 = torch.softmax(masked_gates_top2, dim=-1)
    multiplier_top2_o = masked_gates_top2.gather(dim=-1, index=selected_experts_top2)
    if training:
        max_scores, max_ind = masked_gates_top2.max(dim=-1, keepdim=True)
        mask_for_one_top2 = torch.logical_or(selected_experts_top2 == max_ind,
                                             torch.rand_like(max_scores).uniform_() > 0.75)
        mask_for_one_top2 = torch.add(0.3333, mask_for_one_top2, alpha=0.6667).type_as(masked_gates_top2)
        multiplier_top2 = MultiplierProcessor.apply(scores, multiplier_top2_o, selected_experts_top2,
                                                    masked_gates_top2, mask_for_one_top2)
    else:
        multiplier_top2 = multiplier_top2_o

    multiplier = torch.concat((multiplier, multiplier_top2), dim=-1)
    selected_experts = torch.concat((selected_experts, selected_experts_top2), dim=-1)
    return multiplier, selected_experts


class PhimoeSparseMoeBlock(nn.Module):
    """``PhimoeSparseMoeBlock.forward``: the training-only input-jitter branch (kept; not taken),
    ``view(-1, h)``, gate (router logits in the input dtype, no fp32 softmax), ``sparsemixer``,
    ``torch.zeros((B*S, h))``, ``one_hot(...).permute(2, 1, 0)``, per expert
    ``torch.where(mask[e])`` with the data-dependent ``continue`` on an empty expert,
    ``hidden[None, top_x].reshape(-1, h)``, expert times ``routing_weights[top_x, idx, None]``,
    ``index_add_`` with ``.to(dtype)``, ``reshape(B, S, h)``, ``(output, router_logits)`` return.
    Deviations: tiny sizes only (and the entry runs it in eval mode)."""

    def __init__(self, config):
        super().__init__()
        self.hidden_dim = config.hidden_size
        self.ffn_dim = config.intermediate_size
        self.num_experts = config.num_local_experts
        self.top_k = config.num_experts_per_tok
        self.gate = nn.Linear(self.hidden_dim, self.num_experts, bias=False)
        self.experts = nn.ModuleList([PhimoeBlockSparseTop2MLP(config) for _ in range(self.num_experts)])
        self.router_jitter_noise = config.router_jitter_noise
        self.input_jitter_noise = config.input_jitter_noise

    def forward(self, hidden_states):
        batch_size, sequence_length, hidden_dim = hidden_states.shape
        if self.training and self.input_jitter_noise > 0:
            hidden_states *= torch.empty_like(hidden_states).uniform_(1.0 - self.input_jitter_noise,
                                                                      1.0 + self.input_jitter_noise)
        hidden_states = hidden_states.view(-1, hidden_dim)
        router_logits = self.gate(hidden_states)
        routing_weights, selected_experts = sparsemixer(router_logits, jitter_eps=self.router_jitter_noise,
                                                        training=self.training)
        final_hidden_states = torch.zeros((batch_size * sequence_length, hidden_dim), dtype=hidden_states.dtype,
                                          device=hidden_states.device)
        expert_mask = F.one_hot(selected_experts, num_classes=self.num_experts).permute(2, 1, 0)
        for expert_idx in range(self.num_experts):
            expert_layer = self.experts[expert_idx]
            idx, top_x = torch.where(expert_mask[expert_idx])
            if top_x.shape[0] == 0:
                continue
            current_state = hidden_states[None, top_x].reshape(-1, hidden_dim)
            current_hidden_states = expert_layer(current_state) * routing_weights[top_x, idx, None]
            final_hidden_states.index_add_(0, top_x, current_hidden_states.to(hidden_states.dtype))
        final_hidden_states = final_hidden_states.reshape(batch_size, sequence_length, hidden_dim)
        return final_hidden_states, router_logits


class KeepRouterLogits(nn.Module):
    """Test wrapper (not in the source): returns the block's hidden states and keeps its router logits
    as ``self.router_logits`` (in transformers the decoder layer hands them up for the load-balancing
    loss)."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        out, self.router_logits = self.block(x)
        return out


ENTRIES = [
    Idiom("phimoe_4x_sparsemixer_eval", "transformers v4.50.0 / v4.55.0 models/phimoe/modeling_phimoe.py "
          "PhimoeSparseMoeBlock + PhimoeBlockSparseTop2MLP + sparsemixer (eval path)",
          # deviation: eval mode (the training path samples picks with Gumbel noise and rand_like)
          seeded(320, lambda: KeepRouterLogits(PhimoeSparseMoeBlock(PhimoeConfigLite())).eval()),
          tokens(lambda T: (1, T, D)), expect=1, faithful=True,
          note="sparsemixer: two sequential arg-max picks on the raw logits, each weighted by a softmax over "
               "only the logits within a relative 2*eps of that pick (thresholds under no_grad, masked_fill "
               "-inf, scatter -inf of the first pick), no renormalisation, the empty-expert continue"),
]
