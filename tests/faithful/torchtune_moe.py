"""torchtune's MoE layer (github pytorch/torchtune), re-implemented op for op at a tiny size.

Source read: ``torchtune/modules/moe/moe.py`` (``TokenChoiceTopKRouter``, ``MoE``),
``torchtune/modules/moe/experts.py`` (``GroupedExperts``), ``torchtune/modules/moe/utils.py``
(``should_use_grouped_mm``), ``torchtune/modules/moe/indices.py`` (``generate_permute_indices``,
``fill_indices_cpu``), ``torchtune/modules/feed_forward.py`` (``FeedForward``) and the Llama 4
builder ``torchtune/models/llama4/_component_builders.py`` (``llama4_moe``, ``llama4_mlp``), at
commit bd2a0fc7c31430972728494fa01aaeeb0ebf1ba1 (2026-04-23; the MoE files last changed at
b9160bdc16ce7cfaccf37a410be2ca498d2200c6, 2025-06-24).

Two code paths, chosen by ``should_use_grouped_mm()`` (True only on a CUDA device of capability
9.0 or later, so False on this CPU machine):

- the per-expert loop: ``GroupedExperts._forward_no_grouped_mm`` splits the rows by
  ``num_tokens_per_expert.tolist()`` and runs ``matmul`` per expert (what torchtune runs on CPU),
  with the shared expert as the ``scatter_add`` base or ``zeros_like`` without one;
- the grouped GEMM: rows padded per expert to a multiple of 16 by ``generate_permute_indices``,
  ``vstack`` of a zero row, ``torch._grouped_mm`` in bf16 (torch 2.13's CPU build runs it in bf16),
  ``num_tokens_per_expert.sum().item()`` with ``torch._check`` hints under compile.

The router's scores multiply the rows *before* the experts in both paths (torchtune has no flag).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from idiom_catalogue import D, E, K, N, Idiom, seeded, tokens


class TokenChoiceTopKRouter(nn.Module):
    """torchtune ``TokenChoiceTopKRouter``: gate linear, sigmoid in fp32 cast back to the input
    dtype, top-k, the indices stored on the module, histc counts, stable argsort of the flat ids,
    scores in expert order, token of each sorted row by ``// experts_per_token``."""

    def __init__(self, *, gate, dim, num_experts, experts_per_token):
        super().__init__()
        self.gate = gate
        self.dim = dim
        self.num_experts = num_experts
        self.experts_per_token = experts_per_token

    def forward(self, x):
        scores = self.gate(x)
        scores = torch.sigmoid(scores.to(torch.float32)).to(x.dtype)
        top_scores, selected_experts_indices = torch.topk(scores, k=self.experts_per_token, dim=1)
        self.selected_experts_indices = selected_experts_indices
        # deviation: CPU has no int64 histc kernel (torchtune's own test runs it on CUDA only, where
        # histc of int64 ids returns int64 counts); the ids go through histc as fp32 and the counts
        # come back as the ids' dtype: the same bins (width 1 over [0, E]), values and dtype
        num_tokens_per_expert = torch.histc(
            selected_experts_indices.view(-1).to(torch.float32),
            bins=self.num_experts, min=0, max=self.num_experts,
        ).to(selected_experts_indices.dtype)
        token_indices_experts_sorted = torch.argsort(selected_experts_indices.view(-1), stable=True)
        top_scores = top_scores.view(-1)[token_indices_experts_sorted]
        token_indices_experts_sorted = token_indices_experts_sorted // self.experts_per_token
        return top_scores, token_indices_experts_sorted, num_tokens_per_expert


class FeedForward(nn.Module):
    """torchtune ``FeedForward`` (the Llama 4 shared expert, ``llama4_mlp``): w2(act(w1 x) * w3 x)."""

    def __init__(self, *, gate_proj, down_proj, up_proj=None, activation=nn.SiLU()):
        super().__init__()
        self.w1 = gate_proj
        self.w2 = down_proj
        self.w3 = up_proj
        self.activation = activation

    def forward(self, x):
        h = self.activation(self.w1(x))
        if self.w3 is not None:
            h = h * self.w3(x)
        h = self.w2(h)
        return h


class GroupedExperts(nn.Module):
    """torchtune ``GroupedExperts``: stacked (E, dim, hidden) / (E, hidden, dim) parameters used
    as (in, out) storage, the per-expert ``matmul`` loop over ``torch.split(x, counts.tolist())``
    or three ``torch._grouped_mm`` on ``cumsum(counts, dtype=int32)`` offsets (bf16 asserted)."""

    def __init__(self, *, dim, hidden_dim, num_experts=1, activation=F.silu, use_grouped_mm=False):
        super().__init__()
        self.dim = dim
        self.num_experts = num_experts
        self.gate_proj = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.up_proj = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.act_fn = activation
        self.use_grouped_mm = use_grouped_mm  # deviation: the source reads should_use_grouped_mm() (False on CPU)

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.gate_proj, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.down_proj, a=math.sqrt(5))
        if self.up_proj is not None:
            nn.init.kaiming_uniform_(self.up_proj, a=math.sqrt(5))

    def _forward_no_grouped_mm(self, x, num_tokens_per_expert):
        x = torch.split(x, split_size_or_sections=num_tokens_per_expert.tolist(), dim=0)
        out_experts_splits = []
        for expert_idx, x_expert in enumerate(x):
            w1, w2, w3 = (self.gate_proj[expert_idx], self.down_proj[expert_idx], self.up_proj[expert_idx])
            h = self.act_fn(torch.matmul(x_expert, w1))
            h = h * torch.matmul(x_expert, w3)
            h = torch.matmul(h, w2)
            out_experts_splits.append(h)
        out = torch.cat(out_experts_splits, dim=0)
        return out

    @torch.inference_mode(mode=False)
    def forward(self, x, num_tokens_per_expert):
        if not self.use_grouped_mm:
            return self._forward_no_grouped_mm(x, num_tokens_per_expert)
        if num_tokens_per_expert is not None:
            offsets = torch.cumsum(num_tokens_per_expert, dim=0, dtype=torch.int32)
            assert x.dim() == 2
        else:
            offsets = None
            assert x.dim() == 3
        w1, w2, w3 = (self.gate_proj, self.down_proj, self.up_proj)
        assert x.dtype == w1.dtype == w2.dtype == w3.dtype == torch.bfloat16, \
            "torch._grouped_mm only supports bf16 dtypes"
        h = self.act_fn(torch._grouped_mm(x, w1, offs=offsets))
        h = h * torch._grouped_mm(x, w3, offs=offsets)
        out = torch._grouped_mm(h, w2, offs=offsets)
        return out


def fill_indices_cpu(tokens_per_expert_group, start_index_values, write_offsets, experts_per_rank,
                     num_ranks, total_size):
    """torchtune ``indices.fill_indices_cpu`` (its reference for the Triton ``_fill_indices_kernel``):
    ``-1`` everywhere, then each expert's rows copied to its aligned write offset with ``.item()``."""
    permuted_indices = torch.full((total_size,), -1, dtype=torch.int32)
    for e in range(experts_per_rank):
        write_start = write_offsets[e].item()
        for r in range(num_ranks):
            i = r * experts_per_rank + e
            start_index = start_index_values[i].item()
            length = tokens_per_expert_group[i].item()
            if length > 0:
                end_idx = min(write_start + length, total_size)
                permuted_indices[write_start:end_idx] = torch.arange(
                    start_index, start_index + (end_idx - write_start), dtype=torch.int32)
            write_start += length
    return permuted_indices


def generate_permute_indices(tokens_per_expert_group, experts_per_rank, num_ranks, alignment, use_cpu=False):
    """torchtune ``indices.generate_permute_indices``: start indices, per-expert totals clamped up to
    the alignment and rounded up to a multiple of it, aligned write offsets, the permutation."""
    start_index_values = torch.cumsum(tokens_per_expert_group, 0) - tokens_per_expert_group
    total_tokens_per_expert = tokens_per_expert_group.view(num_ranks, -1).sum(0)
    total_tokens_per_expert = torch.clamp_min(total_tokens_per_expert, alignment)
    m_sizes = ((total_tokens_per_expert + alignment - 1) // alignment * alignment).to(torch.int32)
    m_offsets = torch.cumsum(m_sizes, 0)
    write_offsets = m_offsets - m_sizes
    total_size = m_offsets[-1]
    # deviation: the source launches the Triton _fill_indices_kernel unless use_cpu (no Triton on
    # CPU); its own CPU reference fill_indices_cpu computes the same permutation
    permuted_indices = fill_indices_cpu(tokens_per_expert_group, start_index_values, write_offsets,
                                        experts_per_rank, num_ranks, total_size)
    return permuted_indices, m_sizes, m_offsets.to(torch.int32)


class MoE(nn.Module):
    """torchtune ``MoE.forward`` op for op: router on ``x.reshape(bs * slen, dim)``, token indices
    expanded to (rows, dim), ``torch.gather`` of the token rows, the rows scaled by the scores
    before the experts, on the grouped-GEMM path the no-grad permutation padding each expert to a
    multiple of 16 (``vstack`` of zero rows, rows and indices permuted), the experts, the shared
    expert's output (or ``zeros_like``) as the ``scatter_add`` base, on the grouped-GEMM path
    ``num_tokens_per_expert.sum().item()`` and the ``torch._check`` hints, ``reshape(bs, slen, dim)``."""

    def __init__(self, *, experts, router, shared_expert=None, use_grouped_mm=False):
        super().__init__()
        self.experts = experts
        self.router = router
        self.shared_expert = shared_expert
        self.use_grouped_mm = use_grouped_mm  # deviation: the source reads should_use_grouped_mm() (False on CPU)

    def _pad_grouped(self, token_indices, routed_input, num_tokens_per_expert, dim):
        # the source writes these lines inline in forward under `if self.use_grouped_mm:`
        ALIGN_SIZE_M = 16  # noqa: N806
        with torch.no_grad():
            (permuted_indices, num_tokens_per_expert, _) = generate_permute_indices(
                num_tokens_per_expert, self.experts.num_experts, 1, ALIGN_SIZE_M)
        token_indices = torch.vstack((token_indices, token_indices.new_zeros((dim))))
        token_indices = token_indices[permuted_indices, :]
        routed_input = torch.vstack((routed_input, routed_input.new_zeros((dim))))
        routed_input = routed_input[permuted_indices, :]
        return token_indices, routed_input, num_tokens_per_expert

    def forward(self, x):
        bs, slen, dim = x.shape
        (top_scores, token_indices, num_tokens_per_expert) = self.router(x.reshape(bs * slen, dim))
        token_indices = token_indices.reshape(-1, 1).expand(-1, dim)
        routed_input = torch.gather(x.view(-1, dim), dim=0, index=token_indices)
        routed_input = routed_input * top_scores.reshape(-1, 1)
        if self.use_grouped_mm:
            token_indices, routed_input, num_tokens_per_expert = self._pad_grouped(
                token_indices, routed_input, num_tokens_per_expert, dim)
        routed_output = self.experts(routed_input, num_tokens_per_expert)
        if self.shared_expert is not None:
            out = self.shared_expert(x).reshape(bs * slen, dim)
        else:
            out = torch.zeros_like(x.reshape(bs * slen, dim))
        if self.use_grouped_mm:
            num_tokens = num_tokens_per_expert.sum().item()
            if torch.compiler.is_compiling():
                torch._check_is_size(num_tokens)
                torch._check(num_tokens <= token_indices.size(0))
                torch._check(num_tokens <= routed_output.size(0))
            out = out.scatter_add(dim=0, index=token_indices, src=routed_output)
        else:
            out = out.scatter_add(dim=0, index=token_indices, src=routed_output)
        out = out.reshape(bs, slen, dim)
        return out


def llama4_moe(dim, hidden_dim, num_experts, experts_per_token, use_shared_expert=True, use_grouped_mm=False):
    """torchtune ``llama4_moe``: bias-free gate linear, ``GroupedExperts``, ``llama4_mlp`` shared
    expert (bias-free ``FeedForward``). ``reset_parameters`` initialises the experts (the builder
    leaves them ``torch.empty`` for the checkpoint loader)."""
    router = TokenChoiceTopKRouter(gate=nn.Linear(dim, num_experts, bias=False), dim=dim,
                                   num_experts=num_experts, experts_per_token=experts_per_token)
    experts = GroupedExperts(dim=dim, hidden_dim=hidden_dim, num_experts=num_experts,
                             use_grouped_mm=use_grouped_mm)
    experts.reset_parameters()
    shared_expert = (FeedForward(gate_proj=nn.Linear(dim, hidden_dim, bias=False),
                                 down_proj=nn.Linear(hidden_dim, dim, bias=False),
                                 up_proj=nn.Linear(dim, hidden_dim, bias=False))
                     if use_shared_expert else None)
    return MoE(experts=experts, router=router, shared_expert=shared_expert, use_grouped_mm=use_grouped_mm)


def _grouped_bf16():
    return llama4_moe(D, N, E, K, use_grouped_mm=True).to(torch.bfloat16)


_SRC = "pytorch/torchtune torchtune/modules/moe/{moe,experts}.py + llama4_moe @bd2a0fc"

ENTRIES = [
    Idiom("torchtune_moe_split_loop", _SRC + ": shared expert, per-expert loop over split(counts.tolist())",
          seeded(160, lambda: llama4_moe(D, N, E, K)), tokens(lambda T: (1, T, D)), expect=1,
          fullgraph=False, other_gemms=4, faithful=True,
          note="sigmoid in fp32 cast back, the indices stored on the router module, histc counts, stable "
               "argsort, the rows scaled by the scores before the experts, @inference_mode(False) experts, "
               "torch.split by counts.tolist() and one matmul per expert, cat, the shared FeedForward as the "
               "out-of-place scatter_add base"),
    Idiom("torchtune_moe_split_loop_no_shared", _SRC + ": no shared expert (zeros_like base), per-expert loop",
          seeded(161, lambda: llama4_moe(D, N, E, K, use_shared_expert=False)), tokens(lambda T: (1, T, D)),
          expect=1, fullgraph=False, other_gemms=1, faithful=True,
          note="zeros_like(x.reshape(bs * slen, dim)) as the scatter_add base, otherwise as the shared entry"),
    Idiom("torchtune_moe_grouped_mm", _SRC + ": the SM90 path, padded rows and torch._grouped_mm in bf16",
          seeded(162, _grouped_bf16), tokens(lambda T: (1, T, D), dtype=torch.bfloat16), expect="pending",
          fullgraph=False, dtype=torch.bfloat16, tol=3e-2, other_gemms=4, faithful=True,
          note="generate_permute_indices under no_grad (clamp_min to 16, rounded up, -1 filled, .item() per "
               "expert), vstack of a zero row, rows and indices permuted, bf16 _grouped_mm, "
               "num_tokens_per_expert.sum().item() with the torch._check hints. Pending: the padded permutation "
               "is sized by a device value (m_offsets[-1]; the CPU reference fills it with .item() per expert, the "
               "source's Triton kernel writes a tensor of that data-dependent length) and the .item() of the "
               "total breaks the graph too, so the gather, the experts and the scatter_add land in different "
               "graphs: the resumed graph holds experts and combine but not the gather that grouped the rows"),
]
