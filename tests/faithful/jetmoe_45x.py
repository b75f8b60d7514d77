"""transformers 4.5x ``JetMoeMoE`` + ``JetMoeParallelExperts`` + ``JetMoeTopKGating`` (github
huggingface/transformers, ``src/transformers/models/jetmoe/modeling_jetmoe.py``), read from the released
wheels v4.51.3, v4.53.3, v4.55.0 and v4.56.2 (PyPI): the three classes are the same in all four (v4.55
writes ``super().__init__()`` where v4.51 writes ``super(JetMoeMoE, self).__init__()``, and fixes a
docstring typo). ``GraniteMoeMoE`` (``granitemoe_4x.py``) copies the gating and the experts; JetMoE's
layer differs by the ``bias`` parameter added to the output after the combine. (JetMoE's attention,
``JetMoeMoA``, mixes per-head projections with the same router and experts; it is not an MLP MoE block
and is not re-implemented here.)

The layer: ``reshape(-1, h)``; the router's fp32 logits, ``topk``, softmax over the k picked logits
``.type_as(x)``, ``zeros.scatter(1, idx, 1)``, ``.long().sum(0)`` counts read to the host by
``.tolist()``, an unstable ``sort`` of the flattened ids, ``div(top_k, rounding_mode="trunc")`` token
ids, gates gathered in sorted order; rows gathered ``x[batch_index]``, ``input_linear`` (per expert
``F.linear`` on ``split(expert_size)`` pieces of an (E, 2n, h) weight, ``torch.cat``), ``chunk(2)`` read
by index ``[0]`` / ``[1]``, ``act(gate) * up``, ``output_linear`` (E, h, n), times
``batch_gates[:, None]``, out-of-place ``zeros.index_add``, ``view(B, S, h)``, ``+ self.bias``; returns
``(output, router_logits)``: a wrapper keeps the logits, and the entry feeds (1, T, D).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from idiom_catalogue import D, E, K, N, Idiom, seeded, tokens


class JetMoeConfigLite:
    """The ``JetMoeConfig`` fields the layer reads (deviation: a plain object, not the config class;
    tiny sizes: the default has hidden 2048, intermediate 5632, 8 experts, top-2)."""

    hidden_size = D
    intermediate_size = N
    num_local_experts = E
    num_experts_per_tok = K
    activation_function = "silu"  # the config default


class JetMoeParallelExperts(nn.Module):
    """``JetMoeParallelExperts``: an (E, out, in) weight; ``split(expert_size)`` of the sorted rows,
    ``F.linear(piece, weight[i])`` for every expert in ``range(num_experts)``, ``torch.cat``."""

    def __init__(self, num_experts, input_size, output_size):
        super().__init__()
        # deviation: the source allocates torch.empty (filled by _init_weights' normal_); here seeded randn
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


class JetMoeTopKGating(nn.Module):
    """``JetMoeTopKGating``: returns ``(index_sorted_experts, batch_index, batch_gates, expert_size, logits)``."""

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


class JetMoeMoE(nn.Module):
    """``JetMoeMoE.forward``, op for op. Deviations: tiny sizes; the output ``bias`` (``torch.empty`` in
    the source, zeroed by ``_init_weights``) drawn seeded so that the add is not a no-op."""

    def __init__(self, config):
        super().__init__()
        self.input_size = config.hidden_size
        self.hidden_size = config.intermediate_size
        self.activation = F.silu  # ACT2FN["silu"] is transformers' SiLUActivation = nn.functional.silu
        self.bias = torch.nn.Parameter(0.1 * torch.randn(self.input_size))
        self.input_linear = JetMoeParallelExperts(config.num_local_experts, self.input_size, self.hidden_size * 2)
        self.output_linear = JetMoeParallelExperts(config.num_local_experts, self.hidden_size, self.input_size)
        self.router = JetMoeTopKGating(input_size=self.input_size, num_experts=config.num_local_experts,
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
        layer_output = layer_output + self.bias
        return layer_output, router_logits


class KeepRouterLogits(nn.Module):
    """Test wrapper (not in the source): returns the layer's hidden states and keeps its router logits."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        out, self.router_logits = self.block(x)
        return out


ENTRIES = [
    Idiom("jetmoe_45x_moe", "transformers v4.51.3..v4.56.2 models/jetmoe/modeling_jetmoe.py JetMoeMoE + "
          "JetMoeParallelExperts + JetMoeTopKGating",
          seeded(490, lambda: KeepRouterLogits(JetMoeMoE(JetMoeConfigLite()))), tokens(lambda T: (1, T, D)),
          expect=1, faithful=True,
          note="expert_size.tolist() host copy feeding split(), softmax over the top-k logits, the unstable "
               "sort with div(top_k, 'trunc'), the fused gate/up weight chunk(2) read by index, gates after "
               "the down projection, out-of-place index_add, the output bias added after the view"),
]
