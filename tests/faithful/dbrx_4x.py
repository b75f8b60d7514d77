"""DBRX's MoE feed-forward as transformers 4.4x writes it (``DbrxFFN`` = ``DbrxRouter`` + ``DbrxExperts``
+ ``DbrxExpertGLU``), re-implemented op for op at a tiny size.

Read: huggingface/transformers ``src/transformers/models/dbrx/modeling_dbrx.py`` in the v4.40.0 wheel
(PyPI ``transformers==4.40.0``) and in the stored snapshots at commits 00491ceeee1a (4.45-era) and
7c65d177a1df (4.5x-era): the MoE body is the same in all three (the later ones only add comments).
Note: none of them calls ``.tolist()``: the published transformers code keeps the names
``token_list = token_idx`` / ``topk_list = topk_idx`` but indexes with the tensors themselves (the
``.tolist()`` spelling lives in Databricks' original remote code / llm-foundry and its copies, not
in transformers).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as Fn

from idiom_catalogue import D, E, K, N, Idiom, seeded, tokens


class DbrxRouter(nn.Module):
    """transformers ``modeling_dbrx.py`` ``DbrxRouter`` (v4.40.0 .. 4.5x): linear (no bias), softmax in
    fp32, top-k, division by the p-norm of the top-k values, casts back to the hidden dtype."""

    def __init__(self, hidden_size, moe_num_experts, moe_top_k, moe_jitter_eps, moe_normalize_expert_weights):
        super().__init__()
        self.hidden_size = hidden_size
        self.moe_num_experts = moe_num_experts
        self.moe_top_k = moe_top_k
        self.moe_jitter_eps = moe_jitter_eps
        self.moe_normalize_expert_weights = moe_normalize_expert_weights
        self.layer = nn.Linear(hidden_size, moe_num_experts, bias=False)

    def forward(self, hidden_states):
        # deviation: the factory passes moe_jitter_eps=None (router noise off), so the source's in-place
        # ``hidden_states *= empty_like(...).uniform_(1 - eps, 1 + eps)`` on the caller's tensor is not taken
        if self.training and self.moe_jitter_eps is not None:
            hidden_states *= torch.empty_like(hidden_states).uniform_(1.0 - self.moe_jitter_eps,
                                                                      1.0 + self.moe_jitter_eps)
        hidden_states = hidden_states.view(-1, hidden_states.shape[-1])
        weights = self.layer(hidden_states).softmax(dim=-1, dtype=torch.float32)
        top_weights, top_experts = torch.topk(weights, self.moe_top_k, dim=-1)
        if self.moe_normalize_expert_weights is not None:
            scale = torch.norm(top_weights, p=self.moe_normalize_expert_weights, dim=-1, keepdim=True)
        else:
            scale = 1.0
        top_weights = top_weights / scale
        weights = weights.to(hidden_states.dtype)
        top_weights = top_weights.to(hidden_states.dtype)
        return weights, top_weights, top_experts


class DbrxExpertGLU(nn.Module):
    """transformers ``DbrxExpertGLU``: the experts' weights as three 2-D parameters (E*n, d), all
    three in the same (E*n, d) layout (w2 too: its expert slice is used un-transposed); forward takes
    one expert's slices: ``act(x @ w1.t()) * (x @ v1.t())``, then ``@ w2``."""

    def __init__(self, hidden_size, ffn_hidden_size, moe_num_experts):
        super().__init__()
        self.hidden_size = hidden_size
        self.ffn_hidden_size = ffn_hidden_size
        self.moe_num_experts = moe_num_experts
        # deviation: the source allocates torch.empty and initialises with normal_(std=initializer_range)
        # in _init_weights; here seeded randn scaled to unit-ish outputs
        self.w1 = nn.Parameter(torch.randn(moe_num_experts * ffn_hidden_size, hidden_size) / hidden_size ** 0.5)
        self.v1 = nn.Parameter(torch.randn(moe_num_experts * ffn_hidden_size, hidden_size) / hidden_size ** 0.5)
        self.w2 = nn.Parameter(torch.randn(moe_num_experts * ffn_hidden_size, hidden_size) / ffn_hidden_size ** 0.5)
        self.activation_fn = Fn.silu  # ffn_act_fn {"name": "silu"} through ACT2FN (SiLUActivation = F.silu)

    def forward(self, x, expert_w1, expert_v1, expert_w2):
        gate_proj = x.matmul(expert_w1.t())
        up_proj = x.matmul(expert_v1.t())
        gate_proj = self.activation_fn(gate_proj)
        intermediate_states = gate_proj * up_proj
        return intermediate_states.matmul(expert_w2)


class DbrxExperts(nn.Module):
    """transformers ``DbrxExperts``: ``one_hot(top_experts).permute(2, 1, 0)``; every parameter viewed
    (E, n, d), ``chunk``-ed per expert and ``squeeze``-d once before the loop; per expert
    ``torch.where`` on the (K, T) mask, a data-dependent ``continue`` when it is empty,
    ``x[None, token_list].reshape(-1, d)``, the GLU on the chunk slices times
    ``top_weights[token_list, topk_list, None]``, ``out.index_add_``; ``reshape(bsz, q_len, d)``.
    The ``weights`` argument (full softmax) is taken and unused, as in the source."""

    def __init__(self, hidden_size, ffn_hidden_size, moe_num_experts):
        super().__init__()
        self.moe_num_experts = moe_num_experts
        self.mlp = DbrxExpertGLU(hidden_size, ffn_hidden_size, moe_num_experts)

    def forward(self, x, weights, top_weights, top_experts):
        bsz, q_len, hidden_size = x.shape
        x = x.view(-1, hidden_size)
        out = torch.zeros_like(x)
        expert_mask = nn.functional.one_hot(top_experts, num_classes=self.moe_num_experts).permute(2, 1, 0)
        mlp = self.mlp
        w1_chunked = mlp.w1.view(mlp.moe_num_experts, mlp.ffn_hidden_size, mlp.hidden_size).chunk(
            self.moe_num_experts, dim=0)
        v1_chunked = mlp.v1.view(mlp.moe_num_experts, mlp.ffn_hidden_size, mlp.hidden_size).chunk(
            self.moe_num_experts, dim=0)
        w2_chunked = mlp.w2.view(mlp.moe_num_experts, mlp.ffn_hidden_size, mlp.hidden_size).chunk(
            self.moe_num_experts, dim=0)
        w1_chunked = [w.squeeze(dim=0) for w in w1_chunked]
        v1_chunked = [w.squeeze(dim=0) for w in v1_chunked]
        w2_chunked = [w.squeeze(dim=0) for w in w2_chunked]
        for expert_idx in range(0, self.moe_num_experts):
            topk_idx, token_idx = torch.where(expert_mask[expert_idx])
            if token_idx.shape[0] == 0:
                continue
            token_list = token_idx  # the source's names; no .tolist() in transformers (see module docstring)
            topk_list = topk_idx
            expert_tokens = x[None, token_list].reshape(-1, hidden_size)
            expert_out = (mlp(expert_tokens, w1_chunked[expert_idx], v1_chunked[expert_idx], w2_chunked[expert_idx])
                          * top_weights[token_list, topk_list, None])
            out.index_add_(0, token_idx, expert_out)
        return out.reshape(bsz, q_len, hidden_size)


class DbrxFFN(nn.Module):
    """transformers ``DbrxFFN``: router then experts on the 3-D input; returns ``(out, weights)`` (the
    full softmax, which ``DbrxModel`` collects as router logits for its load-balancing loss)."""

    def __init__(self, top_k=K, normalize=1):
        super().__init__()
        # deviation: tiny sizes (DBRX: d_model 6144, ffn_hidden_size 10752, 16 experts, top-4); jitter off
        self.router = DbrxRouter(D, E, top_k, moe_jitter_eps=None, moe_normalize_expert_weights=normalize)
        self.experts = DbrxExperts(D, N, E)

    def forward(self, x):
        weights, top_weights, top_experts = self.router(x)
        out = self.experts(x, weights, top_weights, top_experts)
        return out, weights


class DbrxFFNOutput(nn.Module):
    """Wrapper for the catalogue (one tensor in, one out): calls ``DbrxFFN`` unchanged, keeps its second
    result (the router's softmax) as ``self.router_weights`` the way ``DbrxBlock`` passes it on as
    ``router_logits``, and returns the output."""

    def __init__(self, **kw):
        super().__init__()
        self.ffn = DbrxFFN(**kw)
        self.router_weights = None

    def forward(self, x):
        out, weights = self.ffn(x)
        self.router_weights = weights
        return out


ENTRIES = [
    Idiom("dbrx_4x_ffn", "huggingface/transformers v4.40.0..4.5x src/transformers/models/dbrx/modeling_dbrx.py "
          "DbrxFFN / DbrxRouter / DbrxExperts / DbrxExpertGLU",
          seeded(101, DbrxFFNOutput), tokens(lambda T: (1, T, D)), expect=1, faithful=True,
          note="fp32 softmax + p=1 norm of the top-k, parameters stored (E*n, d) and chunk/squeeze-d per expert "
               "(w2 used un-transposed), the empty-expert `continue`, x[None, idx] indexing, index_add_, "
               "the router softmax returned and kept"),
]
