"""transformers 4.5x ``Llama4TextMoe`` + ``Llama4TextExperts`` + ``Llama4TextMLP`` (+ ``Llama4Router``)
(github huggingface/transformers, ``src/transformers/models/llama4/modeling_llama4.py``), read from the
released wheels (PyPI) v4.51.3, v4.53.3, v4.55.0 and v4.56.2. The experts and the shared MLP are the
same in all four (v4.55 views by ``gate_up_proj.shape[0]`` where the others write ``num_experts``, the
same number); the block was rewritten three times:

- v4.51.3: logits transposed to (E, T), ``topk`` on the transpose back, ``full_like(-inf).scatter_``
  of the top values, transposed to (E, T); ``arange(T)`` token indices expanded to (E, T), sigmoid of
  the fp32 scores cast back; the rows gathered by ``torch.gather(x, 0, idx.reshape(-1, 1).expand(-1,
  h))`` (every token for every expert), scaled by the scores, the experts, and the outputs
  ``scatter_add_``-ed into the shared expert's output by the same indices; returns the scores.
- v4.53.3: the same scores, ``x.repeat(E, 1)`` instead of the gather, ``out.add_(routed_out.reshape(E,
  -1, h).sum(dim=0))`` instead of the scatter.
- v4.55.0: the router moved into ``Llama4Router(nn.Linear)`` returning (T, E) scores, and the block
  multiplies ``x.repeat(E, 1)`` by ``router_scores.reshape(-1, 1)`` with no transpose: row e*T + t of
  the repeated tokens gets the score at flat position e*T + t of the (T, E) table, i.e. of token
  (e*T + t) // E and expert (e*T + t) % E; the released code mixes tokens' scores (fixed in v4.56 by
  the transpose below). It is kept as its own entry because users pinned to 4.55 run it: it is not an
  MoE block (each expert gets other tokens' scores) and must not be rewritten as one.
- v4.56.2: the same router; the block multiplies by ``router_scores.transpose(0, 1).reshape(-1, 1)``.

Every expert runs on every token (the "dense" Llama4 spelling): a token's input row for expert e is
``x[t] * sigmoid(score)``, which is 0 for the experts outside the top-k (sigmoid(-inf) = 0), and the
experts are bias-free SwiGLU MLPs (``up * silu(gate)`` on a fused ``gate_up_proj`` chunked in two), so
they map those zero rows to zero. The shared expert (a ``Llama4TextMLP`` of ``intermediate_size``)
runs on every token; the routed sum is added into its output in place. Each block returns
``(out, router_scores)`` (v4.51, v4.53) or ``(out, router_logits)`` (v4.55, v4.56), ``out`` flattened to
(B*S, h): a wrapper keeps the second as an attribute and views ``out`` back as the decoder layer does,
and the entries feed (1, T, D).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from idiom_catalogue import D, E, N, Idiom, seeded, tokens


class Llama4TextConfigLite:
    """The ``Llama4TextConfig`` fields the MoE classes read (deviation: a plain object, not the config
    class; tiny sizes: Llama-4-Scout has hidden 5120, intermediate_size 8192, 16 experts, top-1)."""

    hidden_size = D
    intermediate_size = N
    num_local_experts = E
    num_experts_per_tok = 1  # the config default and the released models' setting
    hidden_act = "silu"


class Llama4TextExperts(nn.Module):
    """``Llama4TextExperts``: rows viewed (E, -1, h), ``bmm`` with the (E, h, 2n) ``gate_up_proj``,
    ``chunk(2, dim=-1)`` into gate, up, ``bmm(up * act(gate), down_proj)``, viewed back (-1, h)."""

    def __init__(self, config, view_by_weight=False):
        super().__init__()
        self.num_experts = config.num_local_experts
        self.intermediate_size = config.intermediate_size
        self.hidden_size = config.hidden_size
        self.expert_dim = self.intermediate_size
        # deviation: the source allocates torch.empty (filled by the checkpoint / _init_weights' normal_);
        # here seeded randn scaled to unit-ish outputs
        self.gate_up_proj = nn.Parameter(
            torch.randn(self.num_experts, self.hidden_size, 2 * self.expert_dim) / self.hidden_size ** 0.5)
        self.down_proj = nn.Parameter(
            torch.randn((self.num_experts, self.expert_dim, self.hidden_size)) / self.expert_dim ** 0.5)
        self.act_fn = F.silu  # ACT2FN["silu"] is transformers' SiLUActivation = nn.functional.silu
        self.view_by_weight = view_by_weight  # v4.55 / v4.56 view by gate_up_proj.shape[0]

    def forward(self, hidden_states):
        if self.view_by_weight:
            hidden_states = hidden_states.view(self.gate_up_proj.shape[0], -1, self.hidden_size)
        else:
            hidden_states = hidden_states.view(self.num_experts, -1, self.hidden_size)
        gate_up = torch.bmm(hidden_states, self.gate_up_proj)
        gate, up = gate_up.chunk(2, dim=-1)
        next_states = torch.bmm((up * self.act_fn(gate)), self.down_proj)
        next_states = next_states.view(-1, self.hidden_size)
        return next_states


class Llama4TextMLP(nn.Module):
    """``Llama4TextMLP`` (the shared expert): ``down_proj(act(gate_proj x) * up_proj x)``, bias-free."""

    def __init__(self, config, intermediate_size=None):
        super().__init__()
        if intermediate_size is None:
            intermediate_size = config.intermediate_size
        self.config = config
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=False)
        self.activation_fn = F.silu

    def forward(self, x):
        down_proj = self.activation_fn(self.gate_proj(x)) * self.up_proj(x)
        return self.down_proj(down_proj)


class Llama4TextMoe451(nn.Module):
    """v4.51.3 ``Llama4TextMoe.forward``, op for op (gather / ``scatter_add_`` form). Deviations: tiny
    sizes only."""

    def __init__(self, config):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.hidden_dim = config.hidden_size
        self.num_experts = config.num_local_experts
        self.experts = Llama4TextExperts(config)
        self.router = nn.Linear(config.hidden_size, config.num_local_experts, bias=False)
        self.shared_expert = Llama4TextMLP(config)

    def forward(self, hidden_states):
        batch, seq_len, hidden_dim = hidden_states.shape
        hidden_states = hidden_states.view(-1, self.hidden_dim)
        router_logits = self.router(hidden_states).transpose(0, 1)
        tokens_per_expert = batch * seq_len
        router_top_value, router_indices = torch.topk(router_logits.transpose(0, 1), self.top_k, dim=1)
        router_scores = (
            torch.full_like(router_logits.transpose(0, 1), float("-inf"))
            .scatter_(1, router_indices, router_top_value)
            .transpose(0, 1)
        )
        router_indices = (
            torch.arange(tokens_per_expert, device=hidden_states.device).view(1, -1).expand(router_scores.size(0), -1)
        )
        router_scores = torch.sigmoid(router_scores.float()).to(hidden_states.dtype)
        router_indices = router_indices.reshape(-1, 1).expand(-1, hidden_dim)
        routed_in = torch.gather(
            input=hidden_states,
            dim=0,
            index=router_indices,
        ).to(hidden_states.device)
        routed_in = routed_in * router_scores.reshape(-1, 1)
        routed_out = self.experts(routed_in)
        out = self.shared_expert(hidden_states)
        out.scatter_add_(dim=0, index=router_indices, src=routed_out.view(-1, hidden_dim))
        return out, router_scores


class Llama4TextMoe453(Llama4TextMoe451):
    """v4.53.3 ``Llama4TextMoe.forward``: the (E, T) scores as in v4.51, ``x.repeat(E, 1)``, and the
    in-place ``out.add_`` of the per-expert sum. Deviations: tiny sizes only."""

    def forward(self, hidden_states):
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        router_logits = self.router(hidden_states)
        router_top_value, router_indices = torch.topk(router_logits, self.top_k, dim=1)
        router_scores = (
            torch.full_like(router_logits, float("-inf")).scatter_(1, router_indices, router_top_value).transpose(0, 1)
        )
        router_scores = torch.sigmoid(router_scores.float()).to(hidden_states.dtype)
        routed_in = hidden_states.repeat(self.num_experts, 1)
        routed_in = routed_in * router_scores.reshape(-1, 1)
        routed_out = self.experts(routed_in)
        out = self.shared_expert(hidden_states)
        out.add_(routed_out.reshape(self.num_experts, -1, self.hidden_dim).sum(dim=0))
        return out, router_scores


class Llama4Router(nn.Linear):
    """v4.55.0 / v4.56.2 ``Llama4Router(nn.Linear)``: logits, ``topk``, ``full_like(-inf).scatter_`` of
    the top values, sigmoid of the fp32 scores cast back to the logits' dtype; (T, E) scores."""

    def __init__(self, config):
        super().__init__(config.hidden_size, config.num_local_experts, bias=False)
        self.num_experts = config.num_local_experts
        self.top_k = config.num_experts_per_tok

    def forward(self, hidden_states):
        router_logits = super().forward(hidden_states)
        router_top_value, router_indices = torch.topk(router_logits, self.top_k, dim=1)
        router_scores = torch.full_like(router_logits, float("-inf")).scatter_(1, router_indices, router_top_value)
        router_scores = torch.nn.functional.sigmoid(router_scores.float()).to(router_scores.dtype)
        return router_scores, router_logits


class Llama4TextMoe455(nn.Module):
    """v4.55.0 ``Llama4TextMoe.forward``: (T, E) scores multiplied into ``x.repeat(E, 1)`` without the
    transpose (the released code, which mixes tokens' scores). Deviations: tiny sizes only."""

    transpose_scores = False

    def __init__(self, config):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.hidden_dim = config.hidden_size
        self.num_experts = config.num_local_experts
        self.experts = Llama4TextExperts(config, view_by_weight=True)
        self.router = Llama4Router(config)
        self.shared_expert = Llama4TextMLP(config)

    def forward(self, hidden_states):
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        router_scores, router_logits = self.router(hidden_states)
        routed_in = hidden_states.repeat(router_scores.shape[1], 1)
        if self.transpose_scores:  # v4.56.2's line
            routed_in = routed_in * router_scores.transpose(0, 1).reshape(-1, 1)
        else:  # v4.55.0's line
            routed_in = routed_in * router_scores.reshape(-1, 1)
        routed_out = self.experts(routed_in)
        out = self.shared_expert(hidden_states)
        out.add_(routed_out.reshape(router_scores.shape[1], -1, routed_out.shape[-1]).sum(dim=0))
        return out, router_logits


class Llama4TextMoe456(Llama4TextMoe455):
    """v4.56.2 ``Llama4TextMoe.forward``: as v4.55.0 with ``router_scores.transpose(0, 1)`` before the
    reshape (the released fix). Deviations: tiny sizes only."""

    transpose_scores = True


class KeepSecond(nn.Module):
    """Test wrapper (not in the source): returns the block's hidden states viewed back to the input's
    shape (the block returns them flattened to (B*S, h); ``Llama4TextDecoderLayer`` views them as the
    residual's shape the same way) and keeps its second output (router scores or logits) as
    ``self.router_out``."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        out, self.router_out = self.block(x)
        return out.view(x.shape)


_x3d = tokens(lambda T: (1, T, D))
_SRC = "transformers {v} models/llama4/modeling_llama4.py Llama4TextMoe + Llama4TextExperts + Llama4TextMLP"

ENTRIES = [
    Idiom("llama4_451_gather_scatter", _SRC.format(v="v4.51.3") + " (gather of arange rows, scatter_add_)",
          seeded(470, lambda: KeepSecond(Llama4TextMoe451(Llama4TextConfigLite()))), _x3d,
          expect=1, other_gemms=4, faithful=True,
          note="router logits transposed to (E, T) and back, full_like(-inf).scatter_ of the top values, "
               "arange token indices expanded per expert, torch.gather of every token for every expert, "
               "fp32 sigmoid cast back, scores on the inputs, bmm experts on (E, T, h) with chunk(2) "
               "up * silu(gate), scatter_add_ into the shared expert's output, scores returned"),
    Idiom("llama4_453_repeat", _SRC.format(v="v4.53.3") + " (x.repeat(E, 1), out.add_ of the expert sum)",
          seeded(471, lambda: KeepSecond(Llama4TextMoe453(Llama4TextConfigLite()))), _x3d,
          expect=1, other_gemms=4, faithful=True,
          note="(E, T) scores by a transposed scatter, x.repeat(E, 1) times the flattened scores, bmm "
               "experts, in-place out.add_ of reshape(E, -1, h).sum(0) into the shared expert's output"),
    Idiom("llama4_455_untransposed", _SRC.format(v="v4.55.0") + " + Llama4Router (scores not transposed: "
          "not an MoE block)",
          seeded(472, lambda: KeepSecond(Llama4TextMoe455(Llama4TextConfigLite()))), _x3d,
          expect=0, other_gemms=6, faithful=True,
          note="the released v4.55.0 line routed_in * router_scores.reshape(-1, 1) on (T, E) scores: row "
               "e*T+t gets another token's score, so the block is not an MoE; kept as a look-alike that "
               "must stay unrewritten"),
    Idiom("llama4_456_router_module", _SRC.format(v="v4.56.2") + " + Llama4Router (nn.Linear subclass; "
          "scores transposed in the block)",
          seeded(473, lambda: KeepSecond(Llama4TextMoe456(Llama4TextConfigLite()))), _x3d,
          expect=1, other_gemms=4, faithful=True,
          note="the router as an nn.Linear subclass returning (T, E) sigmoid scores, "
               "router_scores.transpose(0, 1).reshape(-1, 1) on x.repeat(E, 1), experts viewed by "
               "gate_up_proj.shape[0], out.add_ of the expert sum, logits returned"),
]
