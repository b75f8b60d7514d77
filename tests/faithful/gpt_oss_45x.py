"""transformers 4.5x ``GptOssMLP`` + ``GptOssExperts`` + ``GptOssTopKRouter`` (github huggingface/transformers,
``src/transformers/models/gpt_oss/modeling_gpt_oss.py``), read from the released wheels v4.55.0 (the
family's first release) and v4.56.2 (PyPI).

The router: ``F.linear`` with a bias, ``topk`` of the logits, softmax over the k values (in their dtype),
``zeros_like(logits).scatter_(1, idx, values)``: dense (T, E) routing weights, 0 off the top-k. The experts
hold stacked (E, h, 2n) gate|up weights with interleaved columns (gate ``[..., ::2]``, up ``[..., 1::2]``) and
biases, the gate clamped above at ``limit``, the up half clamped to +-limit, ``glu = gate *
sigmoid(gate * alpha)``, ``(up + 1) * glu``, the down projection with its bias. Two code paths:

- v4.55.0, training (``if self.training``): ``zeros_like`` accumulator; under ``no_grad`` the ``one_hot``
  mask ``permute(2, 1, 0)`` and the hit experts ``greater(mask.sum((-1, -2)), 0).nonzero()``; a loop over
  ``expert_hitted[:]`` (each ``expert_idx`` a 1-element tensor), ``torch.where(mask[expert_idx[0]])`` under
  ``no_grad``, ``x[token_idx] @ gate_up_proj[expert_idx] + gate_up_proj_bias[expert_idx]`` (a (1, t, 2n)
  product: the weight indexed by the tensor keeps a unit axis), the down projection the same way,
  ``out[0] * routing_weights[token_idx, expert_idx, None]``, ``index_add_`` with ``.to(dtype)``,
  ``view(B, -1, h)``;
- v4.55.0, eval: every token through every expert, ``x.repeat(E, 1).view(E, -1, h)``, ``bmm`` with the
  biases broadcast ``[..., None, :]``, the outputs viewed (E, B, -1, h) times
  ``routing_weights.transpose(0, 1).view(E, B, -1)[..., None]``, summed over the experts;
- v4.56.2: the loop also on CPU (``if hidden_states.device.type == "cpu" or self.training``),
  ``expert_idx = expert_idx[0]`` (a 0-d tensor), ``torch.where(mask[expert_idx])``, ``out * ...``.

``GptOssMLP`` returns ``(routed_out, router_scores)``: a wrapper keeps the scores, and the entries feed
(1, T, D).

Not rewritten yet (``expect="pending"``; exact either way): the loops break the graph at the
data-dependent iteration, and the loop capture declines them: v4.55 iterates ``expert_hitted[:]`` (a full
slice of the hit tensor, not read as the hit tensor), binds ``gate_up`` / ``gate`` / ``up`` in the loop
and in the eval arm of the same ``if`` (read as names defined outside the loop), and uses the
1-element row ``expert_idx`` as a tensor index of the stacked weights and the dense scores (a unit axis
kept, ``out[0]``); v4.56 rebinds ``expert_idx = expert_idx[0]`` (read as a value carried across
iterations). The eval arm (every expert on every token, biased experts, outputs weighted by the dense
scores and summed) has no experts or combine recogniser (a dense dispatch is read only with the scores on
the inputs).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from idiom_catalogue import D, E, K, N, Idiom, seeded, tokens


class GptOssConfigLite:
    """The ``GptOssConfig`` fields the MLP reads (deviation: a plain object, not the config class; tiny
    sizes: gpt-oss-20b has hidden 2880, intermediate 2880, 32 experts, top-4)."""

    hidden_size = D
    intermediate_size = N
    num_local_experts = E
    num_experts_per_tok = K


class GptOssExperts(nn.Module):
    """``GptOssExperts``; ``version`` picks the v4.55.0 or v4.56.2 forward. Deviations: tiny sizes; the
    parameters (``torch.empty`` in the source, filled by the checkpoint / ``_init_weights``) drawn seeded."""

    def __init__(self, config, version="4.55"):
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.num_experts = config.num_local_experts
        self.hidden_size = config.hidden_size
        self.expert_dim = self.intermediate_size
        self.gate_up_proj = nn.Parameter(
            torch.randn(self.num_experts, self.hidden_size, 2 * self.expert_dim) / self.hidden_size ** 0.5)
        self.gate_up_proj_bias = nn.Parameter(0.1 * torch.randn(self.num_experts, 2 * self.expert_dim))
        self.down_proj = nn.Parameter(
            torch.randn((self.num_experts, self.expert_dim, self.hidden_size)) / self.expert_dim ** 0.5)
        self.down_proj_bias = nn.Parameter(0.1 * torch.randn(self.num_experts, self.hidden_size))
        self.alpha = 1.702
        self.limit = 7.0
        self.version = version

    def forward(self, hidden_states, router_indices=None, routing_weights=None):
        if self.version == "4.56":
            return self.forward_456(hidden_states, router_indices, routing_weights)
        batch_size = hidden_states.shape[0]
        hidden_states = hidden_states.reshape(-1, self.hidden_size)
        num_experts = routing_weights.shape[1]
        if self.training:
            next_states = torch.zeros_like(hidden_states, dtype=hidden_states.dtype, device=hidden_states.device)
            with torch.no_grad():
                expert_mask = torch.nn.functional.one_hot(router_indices, num_classes=num_experts)
                expert_mask = expert_mask.permute(2, 1, 0)
                expert_hitted = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
            for expert_idx in expert_hitted[:]:
                with torch.no_grad():
                    _, token_idx = torch.where(expert_mask[expert_idx[0]])
                current_state = hidden_states[token_idx]
                gate_up = current_state @ self.gate_up_proj[expert_idx] + self.gate_up_proj_bias[expert_idx]
                gate, up = gate_up[..., ::2], gate_up[..., 1::2]
                gate = gate.clamp(min=None, max=self.limit)
                up = up.clamp(min=-self.limit, max=self.limit)
                glu = gate * torch.sigmoid(gate * self.alpha)
                gated_output = (up + 1) * glu
                out = gated_output @ self.down_proj[expert_idx] + self.down_proj_bias[expert_idx]
                weighted_output = out[0] * routing_weights[token_idx, expert_idx, None]
                next_states.index_add_(0, token_idx, weighted_output.to(hidden_states.dtype))
            next_states = next_states.view(batch_size, -1, self.hidden_size)
        else:
            hidden_states = hidden_states.repeat(num_experts, 1)
            hidden_states = hidden_states.view(num_experts, -1, self.hidden_size)
            gate_up = torch.bmm(hidden_states, self.gate_up_proj) + self.gate_up_proj_bias[..., None, :]
            gate, up = gate_up[..., ::2], gate_up[..., 1::2]
            gate = gate.clamp(min=None, max=self.limit)
            up = up.clamp(min=-self.limit, max=self.limit)
            glu = gate * torch.sigmoid(gate * self.alpha)
            next_states = torch.bmm(((up + 1) * glu), self.down_proj)
            next_states = next_states + self.down_proj_bias[..., None, :]
            next_states = next_states.view(num_experts, batch_size, -1, self.hidden_size)
            next_states = next_states * routing_weights.transpose(0, 1).view(num_experts, batch_size, -1)[..., None]
            next_states = next_states.sum(dim=0)
        return next_states

    def forward_456(self, hidden_states, router_indices=None, routing_weights=None):
        batch_size = hidden_states.shape[0]
        hidden_states = hidden_states.reshape(-1, self.hidden_size)
        num_experts = routing_weights.shape[1]
        if hidden_states.device.type == "cpu" or self.training:
            next_states = torch.zeros_like(hidden_states, dtype=hidden_states.dtype, device=hidden_states.device)
            with torch.no_grad():
                expert_mask = torch.nn.functional.one_hot(router_indices, num_classes=num_experts)
                expert_mask = expert_mask.permute(2, 1, 0)
                expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
            for expert_idx in expert_hit[:]:
                expert_idx = expert_idx[0]
                with torch.no_grad():
                    _, token_idx = torch.where(expert_mask[expert_idx])
                current_state = hidden_states[token_idx]
                gate_up = current_state @ self.gate_up_proj[expert_idx] + self.gate_up_proj_bias[expert_idx]
                gate, up = gate_up[..., ::2], gate_up[..., 1::2]
                gate = gate.clamp(min=None, max=self.limit)
                up = up.clamp(min=-self.limit, max=self.limit)
                glu = gate * torch.sigmoid(gate * self.alpha)
                gated_output = (up + 1) * glu
                out = gated_output @ self.down_proj[expert_idx] + self.down_proj_bias[expert_idx]
                weighted_output = out * routing_weights[token_idx, expert_idx, None]
                next_states.index_add_(0, token_idx, weighted_output.to(hidden_states.dtype))
            next_states = next_states.view(batch_size, -1, self.hidden_size)
        else:  # not reached on CPU (the inference path of v4.55.0's eval branch, as above)
            raise NotImplementedError("the v4.56.2 dense branch runs on accelerators only")
        return next_states


class GptOssTopKRouter(nn.Module):
    """``GptOssTopKRouter``: biased logits, softmax over the top-k values, scattered into zeros."""

    def __init__(self, config):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.num_experts = config.num_local_experts
        self.hidden_dim = config.hidden_size
        # deviation: torch.empty in the source; seeded values
        self.weight = nn.Parameter(torch.randn(self.num_experts, self.hidden_dim) / self.hidden_dim ** 0.5)
        self.bias = nn.Parameter(0.1 * torch.randn(self.num_experts))

    def forward(self, hidden_states):
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        router_logits = F.linear(hidden_states, self.weight, self.bias)
        router_top_value, router_indices = torch.topk(router_logits, self.top_k, dim=-1)
        router_top_value = torch.nn.functional.softmax(router_top_value, dim=1, dtype=router_top_value.dtype)
        router_scores = torch.zeros_like(router_logits).scatter_(1, router_indices, router_top_value)
        return router_scores, router_indices


class GptOssMLP(nn.Module):
    """``GptOssMLP.forward``: the router, the experts, ``(routed_out, router_scores)``."""

    def __init__(self, config, version="4.55"):
        super().__init__()
        self.router = GptOssTopKRouter(config)
        self.experts = GptOssExperts(config, version)

    def forward(self, hidden_states):
        router_scores, router_indices = self.router(hidden_states)
        routed_out = self.experts(hidden_states, router_indices=router_indices, routing_weights=router_scores)
        return routed_out, router_scores


class KeepRouterScores(nn.Module):
    """Test wrapper (not in the source): returns the MLP's hidden states and keeps its router scores."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        out, self.router_scores = self.block(x)
        return out


def _eval(m):
    return m.eval()


_x3d = tokens(lambda T: (1, T, D))
_SRC = "transformers {} models/gpt_oss/modeling_gpt_oss.py GptOssMLP + GptOssExperts + GptOssTopKRouter"

ENTRIES = [
    Idiom("gpt_oss_455_train_loop", _SRC.format("v4.55.0") + " (training: the expert_hitted loop)",
          seeded(530, lambda: KeepRouterScores(GptOssMLP(GptOssConfigLite()))), _x3d,
          expect="pending", fullgraph=False, faithful=True,
          note="the no_grad one-hot / expert_hitted / where, the loop over expert_hitted[:] indexing the stacked "
               "weights and biases with a 1-element tensor (a unit axis kept, out[0]), interleaved gate/up "
               "columns, clamps, (up + 1) * gate * sigmoid(1.702 gate), dense (T, E) router scores indexed "
               "[token_idx, expert_idx, None], index_add_ with .to(dtype)"),
    Idiom("gpt_oss_455_eval_dense", _SRC.format("v4.55.0") + " (eval: every token through every expert)",
          seeded(531, lambda: _eval(KeepRouterScores(GptOssMLP(GptOssConfigLite())))), _x3d,
          expect="pending", fullgraph=False, faithful=True,
          note="x.repeat(E, 1) through biased bmm experts, outputs times the transposed dense scores viewed "
               "(E, B, -1)[..., None] and summed over the experts (the unselected experts' outputs times 0)"),
    Idiom("gpt_oss_456_cpu_loop", _SRC.format("v4.56.2") + " (the loop, taken on CPU in training and eval)",
          seeded(532, lambda: KeepRouterScores(GptOssMLP(GptOssConfigLite(), version="4.56"))), _x3d,
          expect="pending", fullgraph=False, faithful=True,
          note="expert_idx = expert_idx[0] (a 0-d tensor) indexing the weights without a unit axis, out * "
               "scores[token_idx, expert_idx, None]"),
]
