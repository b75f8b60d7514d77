"""makeMoE (github AviSoori1x/makeMoE), read at commit 0d68228adb1ee8a0bbebb8a27ca84388ad72e1a0
(2024-10-30): ``Expert``, ``NoisyTopkRouter`` and ``SparseMoE`` in two published forms:

- the mask loop of ``makeMoE_from_Scratch.ipynb`` / ``makeMoE_Concise.ipynb`` (``(indices == i)
  .any(-1)`` masks, ``if flat_mask.any():``, ``final_output[expert_mask] += ...``);
- the expert-capacity loop of ``makeMoE.py`` / ``makeMoE_from_Scratch_with_Expert_Capacity.ipynb``
  (``torch.nonzero``, the capacity computed on the host from the shape, ``numel()`` checks,
  ``updates.index_add_``, ``final_output += updates.view(...)``).

``SparseMoE`` takes (batch, seq, n_embed), so the entries feed (1, T, D).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from idiom_catalogue import D, E, K, N, Idiom, seeded, tokens

DROPOUT = 0.0  # deviation: makeMoE's global `dropout` is 0.1; the catalogue runs modules in train mode, so 0 keeps eager deterministic


class Expert(nn.Module):
    """makeMoE ``Expert``: ``Sequential(Linear, ReLU, Linear, Dropout)`` with biases."""

    def __init__(self, n_embed):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(n_embed, N),  # deviation: width N (tiny size); the source uses 4 * n_embed
            nn.ReLU(),
            nn.Linear(N, n_embed),  # deviation: as above
            nn.Dropout(DROPOUT),
        )

    def forward(self, x):
        return self.net(x)


class NoisyTopkRouter(nn.Module):
    """makeMoE ``NoisyTopkRouter``: route and noise linears (with bias), noise scaled by
    ``softplus(noise_logits)`` added to the logits, top-k, the picks scattered into a ``-inf``
    table, softmax over all experts. Noise off: the unit Gaussian is replaced by zeros (the noise
    linear, the softplus and the add stay in the graph)."""

    def __init__(self, n_embed, num_experts, top_k):
        super().__init__()
        self.top_k = top_k
        self.topkroute_linear = nn.Linear(n_embed, num_experts)
        self.noise_linear = nn.Linear(n_embed, num_experts)

    def forward(self, mh_output):
        logits = self.topkroute_linear(mh_output)
        noise_logits = self.noise_linear(mh_output)
        noise = torch.zeros_like(logits) * F.softplus(noise_logits)  # deviation: noise off (source: torch.randn_like(logits))
        noisy_logits = logits + noise
        top_k_logits, indices = noisy_logits.topk(self.top_k, dim=-1)
        zeros = torch.full_like(noisy_logits, float("-inf"))
        sparse_logits = zeros.scatter(-1, indices, top_k_logits)
        router_output = F.softmax(sparse_logits, dim=-1)
        return router_output, indices


class SparseMoE(nn.Module):
    """makeMoE ``SparseMoE`` of the from-scratch and concise notebooks, op for op: router on the
    3-D input, ``zeros_like(x)`` output, flattened views of x and of the gates, per expert the
    boolean mask ``(indices == i).any(dim=-1)`` and its flat view, the data-dependent ``if
    flat_mask.any():`` skip, boolean-mask row selection ``flat_x[flat_mask]``, gate column
    ``flat_gating_output[flat_mask, i].unsqueeze(1)``, and the 3-D boolean-mask in-place
    ``final_output[expert_mask] += weighted_output.squeeze(1)``. Deviations: tiny sizes, noise and
    dropout off (see the router and ``DROPOUT``)."""

    def __init__(self, n_embed, num_experts, top_k):
        super().__init__()
        self.router = NoisyTopkRouter(n_embed, num_experts, top_k)
        self.experts = nn.ModuleList([Expert(n_embed) for _ in range(num_experts)])
        self.top_k = top_k

    def forward(self, x):
        gating_output, indices = self.router(x)
        final_output = torch.zeros_like(x)
        flat_x = x.view(-1, x.size(-1))
        flat_gating_output = gating_output.view(-1, gating_output.size(-1))
        for i, expert in enumerate(self.experts):
            expert_mask = (indices == i).any(dim=-1)
            flat_mask = expert_mask.view(-1)
            if flat_mask.any():
                expert_input = flat_x[flat_mask]
                expert_output = expert(expert_input)
                gating_scores = flat_gating_output[flat_mask, i].unsqueeze(1)
                weighted_output = expert_output * gating_scores
                final_output[expert_mask] += weighted_output.squeeze(1)
        return final_output


class SparseMoECapacity(nn.Module):
    """makeMoE ``SparseMoE`` of ``makeMoE.py`` (expert capacity), op for op: batch and sequence read
    from the shape, the capacity ``int(B * S * top_k / num_experts * capacity_factor)`` computed on
    the host, ``updates = zeros_like(flat_x)``, per expert the mask, ``torch.nonzero(flat_mask)
    .squeeze(-1)``, the first ``capacity`` selected tokens kept when ``numel() > capacity`` (a
    data-dependent Python conditional), ``if limited_indices.numel() > 0:``, gather, expert, gate
    column, ``updates.index_add_(0, ...)``, then ``final_output += updates.view(B, S, -1)``.
    Deviations: tiny sizes, noise and dropout off."""

    def __init__(self, n_embed, num_experts, top_k, capacity_factor=1.0):
        super().__init__()
        self.router = NoisyTopkRouter(n_embed, num_experts, top_k)
        self.experts = nn.ModuleList([Expert(n_embed) for _ in range(num_experts)])
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        self.num_experts = num_experts

    def forward(self, x):
        batch_size, seq_len, _ = x.shape
        gating_output, indices = self.router(x)
        final_output = torch.zeros_like(x)
        flat_x = x.view(-1, x.size(-1))
        flat_gating_output = gating_output.view(-1, gating_output.size(-1))
        tokens_per_batch = batch_size * seq_len * self.top_k
        expert_capacity = int((tokens_per_batch / self.num_experts) * self.capacity_factor)
        updates = torch.zeros_like(flat_x)
        for i, expert in enumerate(self.experts):
            expert_mask = (indices == i).any(dim=-1)
            flat_mask = expert_mask.view(-1)
            selected_indices = torch.nonzero(flat_mask).squeeze(-1)
            limited_indices = (selected_indices[:expert_capacity] if selected_indices.numel() > expert_capacity
                               else selected_indices)
            if limited_indices.numel() > 0:
                expert_input = flat_x[limited_indices]
                expert_output = expert(expert_input)
                gating_scores = flat_gating_output[limited_indices, i].unsqueeze(1)
                weighted_output = expert_output * gating_scores
                updates.index_add_(0, limited_indices, weighted_output)
        final_output += updates.view(batch_size, seq_len, -1)
        return final_output


_x3d = tokens(lambda T: (1, T, D))
_NB = "AviSoori1x/makeMoE makeMoE_from_Scratch.ipynb / makeMoE_Concise.ipynb NoisyTopkRouter, Expert, SparseMoE @0d68228"
_PY = "AviSoori1x/makeMoE makeMoE.py NoisyTopkRouter, Expert, SparseMoE(capacity_factor=1.0) @0d68228"

ENTRIES = [
    Idiom("makemoe_mask_loop", _NB, seeded(144, lambda: SparseMoE(D, E, K)), _x3d, expect=1,
          fullgraph=False, other_gemms=2, faithful=True,
          note="the noise linear + softplus in the router, softmax over a -inf-scattered table, the "
               "data-dependent 'if flat_mask.any()' skip, boolean-mask gathers and the 3-D boolean-mask "
               "in-place '+=', biased ReLU experts with Dropout"),
    Idiom("makemoe_capacity", _PY, seeded(145, lambda: SparseMoECapacity(D, E, K)), _x3d, expect=1,
          fullgraph=False, other_gemms=2, faithful=True,
          note="the host-side capacity from the shape, torch.nonzero, the numel() > capacity truncation "
               "and numel() > 0 skip, updates.index_add_ and the in-place 'final_output += updates.view'"),
]
