"""transformers 4.x ``GraniteMoeMoE`` + ``GraniteMoeParallelExperts`` + ``GraniteMoeTopKGating`` (github
huggingface/transformers, ``src/transformers/models/granitemoe/modeling_granitemoe.py``), read from the
released wheels v4.50.0 and v4.55.0 (PyPI): the MoE classes are the same in both (4.55 only fixes a
docstring typo and writes ``super().__init__()``). The gating is marked "Copied from
transformers.models.jetmoe.modeling_jetmoe.JetMoeTopKGating", so JetMoE 4.x routes the same way.

The layer routes ScatterMoE-style: top-k on the fp32 logits, softmax over the k picked logits, the
per-expert counts read to the host with ``.tolist()``, an (unstable) ``sort`` of the flattened expert
ids, token rows gathered in expert order, per-expert ``F.linear`` on ``split(expert_size)`` pieces of
a stacked (E, out, in) weight, a fused gate/up projection ``chunk``-ed in two, the gates multiplied
after the down projection, and an out-of-place ``index_add`` into zeros.

The layer's forward returns ``(layer_output, router_logits)`` and takes (batch, seq, hidden): a
wrapper keeps the router logits as an attribute, and the entries feed (1, T, D).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from idiom_catalogue import D, E, K, N, Idiom, seeded, tokens


class GraniteMoeConfigLite:
    """The ``GraniteMoeConfig`` fields the layer reads (deviation: a plain object, not the config
    class; tiny sizes)."""

    hidden_size = D
    intermediate_size = N
    num_local_experts = E
    num_experts_per_tok = K
    hidden_act = "silu"  # the config default


class GraniteMoeParallelExperts(nn.Module):
    """``GraniteMoeParallelExperts``: one (E, out, in) weight; forward splits the expert-sorted rows by
    the host list ``expert_size`` and applies ``F.linear(piece, weight[i])`` for every expert in
    ``range(num_experts)`` (empty pieces included), then ``torch.cat``."""

    def __init__(self, num_experts, input_size, output_size):
        super().__init__()
        # deviation: the source allocates torch.empty and _init_weights draws normal_(std=initializer_range);
        # here seeded randn scaled to unit-ish outputs
        self.weight = nn.Parameter(torch.randn(num_experts, output_size, input_size) / input_size ** 0.5)
        self.num_experts = num_experts
        self.input_size = input_size
        self.output_size = output_size

    def forward(self, inputs, expert_size):
        input_list = inputs.split(expert_size, dim=0)
        output_list = []
        for i in range(self.num_experts):
            output_list.append(F.linear(input_list[i], self.weight[i]))
        results = torch.cat(output_list, dim=0)
        return results


class GraniteMoeTopKGating(nn.Module):
    """``GraniteMoeTopKGating`` (= ``JetMoeTopKGating``): ``layer(x).float()`` logits, top-k on the
    logits, softmax over the k values ``.type_as(x)``, ``zeros.scatter(1, idx, 1)`` one-hot,
    ``.long().sum(0)`` counts then ``.tolist()`` (a host copy), ``top_k_indices.flatten().sort(0)``,
    ``div(top_k, rounding_mode="trunc")`` token ids, gates gathered in sorted order; returns the
    five-tuple with the fp32 logits."""

    def __init__(self, input_size, num_experts, top_k):
        super().__init__()
        self.num_experts = num_experts
        self.input_size = input_size
        self.top_k = top_k
        self.layer = nn.Linear(input_size, num_experts, bias=False)

    def forward(self, hidden_states):
        logits = self.layer(hidden_states).float()
        top_k_logits, top_k_indices = logits.topk(self.top_k, dim=1)
        top_k_gates = torch.softmax(top_k_logits, dim=1).type_as(hidden_states)
        zeros = torch.zeros([top_k_gates.size(0), self.num_experts], dtype=top_k_gates.dtype,
                            device=top_k_gates.device)
        gates = zeros.scatter(1, top_k_indices, 1)
        expert_size = gates.long().sum(0)
        expert_size = expert_size.tolist()  # host copy, as in the source
        top_k_experts = top_k_indices.flatten()
        _, index_sorted_experts = top_k_experts.sort(0)
        batch_index = index_sorted_experts.div(self.top_k, rounding_mode="trunc")
        top_k_gates = top_k_gates.flatten()
        batch_gates = top_k_gates[index_sorted_experts]
        return index_sorted_experts, batch_index, batch_gates, expert_size, logits


class GraniteMoeMoE(nn.Module):
    """``GraniteMoeMoE.forward``: ``reshape(-1, h)``, the router, ``x[batch_index]`` gather,
    ``input_linear`` (E, 2n, h) on the sorted rows, ``chunk(2, dim=-1)`` into gate / up,
    ``act(gate) * up``, ``output_linear`` (E, h, n), times ``batch_gates[:, None]``, out-of-place
    ``zeros.index_add(0, batch_index, ...)``, ``view(B, S, h)``; returns ``(output, router_logits)``.
    Deviations: tiny sizes only."""

    def __init__(self, config):
        super().__init__()
        self.input_size = config.hidden_size
        self.hidden_size = config.intermediate_size
        self.activation = F.silu  # ACT2FN["silu"] is transformers' SiLUActivation = nn.functional.silu
        self.input_linear = GraniteMoeParallelExperts(config.num_local_experts, self.input_size, self.hidden_size * 2)
        self.output_linear = GraniteMoeParallelExperts(config.num_local_experts, self.hidden_size, self.input_size)
        self.router = GraniteMoeTopKGating(input_size=self.input_size, num_experts=config.num_local_experts,
                                           top_k=config.num_experts_per_tok)

    def forward(self, layer_input):
        bsz, length, emb_size = layer_input.size()
        layer_input = layer_input.reshape(-1, emb_size)
        _, batch_index, batch_gates, expert_size, router_logits = self.router(layer_input)
        expert_inputs = layer_input[batch_index]
        hidden_states = self.input_linear(expert_inputs, expert_size)
        chunked_hidden_states = hidden_states.chunk(2, dim=-1)
        hidden_states = self.activation(chunked_hidden_states[0]) * chunked_hidden_states[1]
        expert_outputs = self.output_linear(hidden_states, expert_size)
        expert_outputs = expert_outputs * batch_gates[:, None]
        zeros = torch.zeros((bsz * length, self.input_size), dtype=expert_outputs.dtype, device=expert_outputs.device)
        layer_output = zeros.index_add(0, batch_index, expert_outputs)
        layer_output = layer_output.view(bsz, length, self.input_size)
        return layer_output, router_logits


class KeepRouterLogits(nn.Module):
    """Test wrapper (not in the source): returns the layer's hidden states and keeps its router logits
    as ``self.router_logits`` (in transformers the decoder layer hands them up for the load-balancing
    loss)."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        out, self.router_logits = self.block(x)
        return out


ENTRIES = [
    Idiom("granitemoe_4x_moe", "transformers v4.50.0 / v4.55.0 models/granitemoe/modeling_granitemoe.py GraniteMoeMoE "
          "+ GraniteMoeParallelExperts + GraniteMoeTopKGating (= JetMoeTopKGating)",
          seeded(310, lambda: KeepRouterLogits(GraniteMoeMoE(GraniteMoeConfigLite()))), tokens(lambda T: (1, T, D)),
          expect=1, faithful=True,
          note="expert_size.tolist() host copy feeding split(), softmax over the top-k logits (not over all "
               "experts), the unstable sort of the flattened ids with div(top_k, 'trunc'), the fused gate/up "
               "weight chunk(2), gates applied after the down projection, out-of-place index_add"),
]
