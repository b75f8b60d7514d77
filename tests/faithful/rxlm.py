"""rxlm's MoE feed-forwards (github RxAI-dev/rxlm, ``python/src/rxlm/transformers/moe.py``:
``MoeRouter``, ``MoeFeedForward``, ``GatedMoeFeedForward``; experts from
``python/src/rxlm/transformers/ff.py``: ``FeedForward``, ``GatedLinearUnit``, ``GatedFeedForward``),
read at commit bed87771e901c80bd4b5f783c5b65b41683444e1 (2026-04-22; moe.py last changed in
1a30d43). The same classes are in RxAI-dev/RxNN ``python/src/rxnn/transformers/moe.py``.

The "Vectorized" classes of the same file (padded bmm / the optional ``grouped_gemm`` package)
are not re-implemented here; the legacy classes below are the ones the brief names.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from idiom_catalogue import D, E, K, N, Idiom, seeded, tokens


# --------------------------------------------------------------------------- ff.py experts

class FeedForward(nn.Module):
    """rxlm ``ff.FeedForward``: ``fc2(dropout(activation(fc1(x))))``, biased linears."""

    def __init__(self, embed_dim, hidden_dim, activation, dropout=0.0, use_bias=True):
        super().__init__()
        self.fc1 = nn.Linear(embed_dim, hidden_dim, bias=use_bias)
        self.activation = activation
        self.fc2 = nn.Linear(hidden_dim, embed_dim, bias=use_bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        h = self.activation(self.fc1(x))
        h = self.dropout(h)
        return self.fc2(h)


class GatedLinearUnit(nn.Module):
    """rxlm ``ff.GatedLinearUnit``: one biased linear to 2*hidden, ``chunk(2)``, ``l * act(g)``
    (the FIRST half is the linear part, the SECOND the gate)."""

    def __init__(self, embed_dim, hidden_dim, activation, use_bias=True):
        super().__init__()
        self.linear = nn.Linear(embed_dim, hidden_dim * 2, bias=use_bias)
        self.activation = activation

    def forward(self, x):
        lin, gate = self.linear(x).chunk(2, dim=-1)
        return lin * self.activation(gate)


class GatedFeedForward(nn.Module):
    """rxlm ``ff.GatedFeedForward``: ``fc2(dropout(GLU(x)))``."""

    def __init__(self, embed_dim, hidden_dim, activation, dropout=0.0, use_bias=True):
        super().__init__()
        self.fc1 = GatedLinearUnit(embed_dim, hidden_dim, activation, use_bias=use_bias)
        self.fc2 = nn.Linear(hidden_dim, embed_dim, bias=use_bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.fc2(self.dropout(self.fc1(x)))


# --------------------------------------------------------------------------- moe.py

class MoeRouter(nn.Module):
    """rxlm ``MoeRouter``: bias-free gate, softmax, top-k of the probabilities, renormalised with
    ``+ 1e-9`` in the denominator; in training the load-balancing loss is computed in forward
    (``scatter_add_`` usage counts, gathered probabilities, ``clamp``) and stored over the
    registered ``aux_loss`` buffer (``self.aux_loss = ...``)."""

    def __init__(self, embed_dim, num_experts, top_k=1):
        super().__init__()
        self.top_k = top_k
        self.num_experts = num_experts
        self.gate = nn.Linear(embed_dim, num_experts, bias=False)
        self.register_buffer("aux_loss", torch.tensor(0.0), persistent=False)

    def calculate_aux_loss(self, top_k_indices, probs):
        T, K_ = top_k_indices.size()
        flat_indices = top_k_indices.view(-1)
        expert_usage = torch.zeros(self.num_experts, device=flat_indices.device, dtype=probs.dtype)
        expert_usage.scatter_add_(0, flat_indices, torch.ones_like(flat_indices, dtype=probs.dtype))
        total_selections = T * K_
        fraction_expert = expert_usage / (total_selections + 1e-6)
        flat_probs = probs.gather(1, top_k_indices).view(-1)
        sum_probs = torch.zeros(self.num_experts, device=flat_indices.device, dtype=probs.dtype)
        sum_probs.scatter_add_(0, flat_indices, flat_probs)
        avg_probs = sum_probs / expert_usage.clamp(min=1e-6)
        return (fraction_expert * avg_probs).sum() * self.num_experts

    def forward(self, x):
        logits = self.gate(x)
        probs = F.softmax(logits, dim=-1)
        top_k_weights, top_k_indices = probs.topk(self.top_k, dim=-1)
        top_k_weights = top_k_weights / (top_k_weights.sum(dim=-1, keepdim=True) + 1e-9)
        if self.training:
            self.aux_loss = self.calculate_aux_loss(top_k_indices, probs)
        return top_k_weights, top_k_indices


class MoeFeedForward(nn.Module):
    """rxlm ``MoeFeedForward.forward``, op for op: ``view(-1, embed_dim)``, the router (optionally
    under ``torch.amp.autocast``), the single-token branch (a loop over the K picks indexing the
    ModuleList with a 0-d tensor), and for T > 1: ``arange(T).repeat_interleave(top_k)`` token ids,
    ``sort`` of the flat expert ids, permuted token ids and weights, ``x[permuted]``,
    ``one_hot(sorted).sum(0)`` counts, a Python loop over experts that reads each count as a tensor
    (``if count == 0: continue``, slice bounds ``start:start + count``), ``torch.cat`` of the
    outputs, weights multiplied in expert order, ``argsort`` inverse permutation, and
    ``zeros_like(x).scatter_add_`` with a ``.to(dtype)`` cast; optional shared experts (one: added;
    several: softmax-gated stack), ``view(orig_shape)``. Deviations: tiny sizes only."""

    def __init__(self, embed_dim, hidden_dim, num_experts, activation, top_k=1, dropout=0.0,
                 num_shared_experts=0, router_amp=False, router_dtype=torch.float32):
        super().__init__()
        self.embed_dim = embed_dim
        self.num_experts = num_experts
        self.top_k = top_k
        self.num_shared_experts = num_shared_experts
        self.router_amp = router_amp
        self.router_dtype = router_dtype
        self.router = MoeRouter(embed_dim, num_experts, top_k)
        self.experts = self._init_experts(num_experts, embed_dim, hidden_dim, activation, dropout)
        if num_shared_experts > 0:
            self.shared_experts = self._init_experts(num_shared_experts, embed_dim, hidden_dim, activation, dropout)
            if num_shared_experts > 1:
                self.shared_expert_gate = nn.Linear(embed_dim, num_shared_experts, bias=False)

    def _init_experts(self, num_experts, embed_dim, hidden_dim, activation, dropout):
        return nn.ModuleList([FeedForward(embed_dim, hidden_dim, activation, dropout) for _ in range(num_experts)])

    def router_loss(self):
        return self.router.aux_loss

    def forward(self, x):
        orig_shape = x.size()
        x = x.view(-1, self.embed_dim)
        num_tokens, embed_dim = x.size()
        if self.router_amp:
            with torch.amp.autocast(device_type=x.device.type, dtype=self.router_dtype):
                routing_weights, selected_experts = self.router(x)
        else:
            routing_weights, selected_experts = self.router(x)

        if num_tokens == 1:
            final_output = torch.zeros_like(x)
            for k in range(self.top_k):
                expert_idx = selected_experts[0, k]
                weight = routing_weights[0, k]
                expert_output = self.experts[expert_idx](x)
                final_output += weight * expert_output
        else:
            flat_selected_experts = selected_experts.view(-1)
            flat_routing_weights = routing_weights.view(-1)
            token_indices = torch.arange(num_tokens, device=x.device).repeat_interleave(self.top_k)
            sorted_expert_indices, sorted_order = flat_selected_experts.sort(0)
            permuted_token_indices = token_indices[sorted_order]
            permuted_routing_weights = flat_routing_weights[sorted_order]
            dispatched_x = x[permuted_token_indices]
            tokens_per_expert = F.one_hot(sorted_expert_indices, num_classes=self.num_experts).sum(dim=0)
            expert_outputs = []
            start_idx = 0
            for i in range(self.num_experts):
                num_tokens_for_expert = tokens_per_expert[i]
                if num_tokens_for_expert == 0:
                    continue
                end_idx = start_idx + num_tokens_for_expert
                expert_input = dispatched_x[start_idx:end_idx]
                expert_outputs.append(self.experts[i](expert_input))
                start_idx = end_idx
            concatenated_outputs = torch.cat(expert_outputs, dim=0)
            weighted_outputs = concatenated_outputs * permuted_routing_weights.unsqueeze(1)
            final_output = torch.zeros_like(x)
            inverse_sorted_order = sorted_order.argsort(0)
            unpermuted_outputs = weighted_outputs[inverse_sorted_order]
            scatter_indices = token_indices.unsqueeze(1).expand(-1, embed_dim)
            final_output.scatter_add_(0, scatter_indices, unpermuted_outputs.to(dtype=final_output.dtype))

        if self.num_shared_experts > 0:
            if self.num_shared_experts == 1:
                final_output = final_output + self.shared_experts[0](x)
            else:
                shared_weights = F.softmax(self.shared_expert_gate(x), dim=-1)
                shared_outputs = torch.stack([expert(x) for expert in self.shared_experts], dim=1)
                final_output = final_output + (shared_outputs * shared_weights.unsqueeze(-1)).sum(dim=1)
        return final_output.view(orig_shape)


class GatedMoeFeedForward(MoeFeedForward):
    """rxlm ``GatedMoeFeedForward``: ``MoeFeedForward`` with ``GatedFeedForward`` (GLU) experts; the
    override of ``_init_experts`` serves both calls, so the shared experts are GLU too."""

    def __init__(self, embed_dim, hidden_dim, num_experts, activation=None, top_k=1, dropout=0.1,
                 num_shared_experts=0, **kwargs):
        super().__init__(embed_dim=embed_dim, hidden_dim=hidden_dim, num_experts=num_experts,
                         activation=nn.SiLU() if activation is None else activation, top_k=top_k, dropout=dropout,
                         num_shared_experts=num_shared_experts, **kwargs)

    def _init_experts(self, num_experts, embed_dim, hidden_dim, activation, dropout):
        return nn.ModuleList([GatedFeedForward(embed_dim, hidden_dim, activation, dropout)
                              for _ in range(num_experts)])


class WithRouterLoss(nn.Module):
    """Test wrapper (not in the source): calls the layer and keeps ``router_loss()`` (the router's
    ``aux_loss`` buffer that rxlm's trainer reads after the forward) as ``self.aux_loss``."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        out = self.layer(x)
        self.aux_loss = self.layer.router_loss()
        return out


_x3d = tokens(lambda T: (1, T, D))
# rxlm_moe_ff and the gated ones recognised: the block is the flat-rows form (rows x[arange(T).repeat_interleave(K)[perm]] of a
# sort, expert chunks split by host counts, scatter_add_ at arange(T).repeat_interleave(K) of the rows put
# back by argsort), not a per-expert loop; expert_loop declines its scatter_add_ as a unit (dispatch.
# assignment_tokens). rxlm_moe_ff: host_splits turns the biased chunk experts into grouped GEMMs with
# per-expert biases and assignment_rows composes the block (rows_dispatch tok[perm], rows_combine
# unpermute_scatter): rewritten, exact, one fused call, from the SECOND call on. The first call runs
# eagerly until the trampoline stood in for forwards whose arguments are cells (x, read by the shared
# experts' list comprehension) and the throwaway trace stopped skipping the frame at the loop's graph
# break (moe_inductor/dynamo/dynamo_scope.py): rewritten from the first call since. The gated variants: the GLU experts put the activation on
# the SECOND chunk half (lin * act(gate)): patterns.common.gate_up_halves reads it as the fused gate|up
# weight with the up half first (activation "swiglu+up_first", the op's kernels take the gate from the
# second half, no weight copy), so host_splits and assignment_rows compose them as rxlm_moe_ff.
_SRC = "RxAI-dev/rxlm python/src/rxlm/transformers/moe.py MoeRouter + {} (ff.py experts) @bed8777"

ENTRIES = [
    Idiom("rxlm_moe_ff", _SRC.format("MoeFeedForward"),
          seeded(146, lambda: MoeFeedForward(D, N, E, nn.GELU(), top_k=K, dropout=0.0)), _x3d,
          expect=1, fullgraph=False, faithful=True,
          note="the aux-loss buffer written in forward (scatter_add_ counts, gather, clamp), '+ 1e-9' "
               "renormalisation, sort + repeat_interleave dispatch, the per-expert loop with tensor counts "
               "('if count == 0: continue', tensor slice bounds), cat, argsort inverse, scatter_add_"),
    Idiom("rxlm_gated_moe_ff_shared", _SRC.format("GatedMoeFeedForward(num_shared_experts=1)"),
          seeded(147, lambda: GatedMoeFeedForward(D, N, E, nn.SiLU(), top_k=K, dropout=0.0,  # dropout 0: train-mode determinism (default 0.1)
                                                  num_shared_experts=1)), _x3d,
          expect=1, fullgraph=False, other_gemms=3, faithful=True,
          note="GLU experts with one biased fused linear chunked as (linear, gate), a shared GLU expert "
               "added after the scatter_add_, and the MoeFeedForward loop and aux loss"),
    Idiom("rxlm_gated_moe_ff_router_loss", _SRC.format("GatedMoeFeedForward") + " + router_loss() read after forward",
          seeded(148, lambda: WithRouterLoss(GatedMoeFeedForward(D, N, E, nn.SiLU(), top_k=K, dropout=0.0))), _x3d,
          expect=1, fullgraph=False, faithful=True,
          note="the router_loss() read after the forward (a wrapper keeps it as self.aux_loss), GLU experts"),
]
