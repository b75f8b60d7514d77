"""transformers 4.x ``SwitchTransformersSparseMLP`` + ``SwitchTransformersTop1Router`` +
``SwitchTransformersDenseActDense`` (github huggingface/transformers,
``src/transformers/models/switch_transformers/modeling_switch_transformers.py``), read from the
released wheels:

- v4.50.0 (PyPI): ``next_states = hidden_states.clone()``: a token dropped by the capacity limit
  passes through unchanged (then still scaled by its router probability);
- v4.55.0 (PyPI): ``next_states = torch.zeros(hidden_states.shape, ...)``: a dropped token gets 0.
  Everything else in the MoE code is the same in both.

The router is top-1 with a capacity: fp32 classifier (the router casts its input and the
classifier module itself to ``router_dtype`` inside forward, storing ``self.input_dtype``),
softmax, ``argmax`` -> ``one_hot``, ``cumsum`` over the sequence as token priority,
``<= expert_capacity`` mask, and the max probability as the per-token scale. The sparse MLP reads
the hit experts to the host (``nonzero(...).tolist()``), writes each expert's output with a
boolean-mask index assignment ``next_states[mask] = expert(hidden[mask])``, and multiplies ALL
tokens by their router probability at the end. The entries run in eval mode (deviation: no
router jitter and no expert dropout; ``SwitchTransformersConfig`` defaults are jitter 0.01 and
dropout 0.1, both training-only).

The sparse MLP returns ``(hidden_states, (router_logits, expert_index))``; the wrapper keeps the
tuple and, as ``SwitchTransformersForConditionalGeneration.forward`` does with
``output_router_logits``, computes ``router_z_loss_func`` and ``load_balancing_loss_func`` from it
(kept as attributes). Inputs are (batch, seq, hidden) as the router requires: the entries feed (1, T, D).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from idiom_catalogue import CAPACITY, D, E, N, Idiom, seeded, tokens


class SwitchTransformersConfigLite:
    """The ``SwitchTransformersConfig`` fields the layer reads (deviation: a plain object, not the
    config class; tiny sizes: switch-base-8 has d_model 768, d_ff 2048, 8 experts, capacity 64)."""

    d_model = D
    hidden_size = D
    d_ff = N
    num_experts = E
    expert_capacity = CAPACITY  # deviation: 3 instead of 64, so that T=8 drops tokens
    router_bias = False
    router_jitter_noise = 0.01  # config default; training-only (the entries run in eval mode)
    router_dtype = "float32"
    router_ignore_padding_tokens = False
    dropout_rate = 0.1  # config default; nn.Dropout is the identity in eval mode
    dense_act_fn = "relu"
    router_z_loss_coef = 0.001
    router_aux_loss_coef = 0.001


def router_z_loss_func(router_logits):
    """``router_z_loss_func``: mean over groups and tokens of ``logsumexp(logits)**2``."""
    num_groups, tokens_per_group, _ = router_logits.shape
    log_z = torch.logsumexp(router_logits, dim=-1)
    z_loss = log_z ** 2
    return torch.sum(z_loss) / (num_groups * tokens_per_group)


def load_balancing_loss_func(router_probs, expert_indices):
    """``load_balancing_loss_func``: one_hot of the expert ids, max over the k axis, fp32 cast, mean
    fraction of tokens times mean probability per expert, times ``num_experts**2``."""
    num_experts = router_probs.shape[-1]
    if expert_indices.dtype != torch.int64:
        expert_indices = expert_indices.to(torch.int64)
    if len(expert_indices.shape) == 2:
        expert_indices = expert_indices.unsqueeze(2)
    expert_mask = torch.nn.functional.one_hot(expert_indices, num_experts)
    expert_mask = torch.max(expert_mask, axis=-2).values
    expert_mask = expert_mask.to(torch.float32)
    tokens_per_group_and_expert = torch.mean(expert_mask, axis=-2)
    router_prob_per_group_and_expert = torch.mean(router_probs, axis=-2)
    return torch.mean(tokens_per_group_and_expert * router_prob_per_group_and_expert) * (num_experts ** 2)


class SwitchTransformersTop1Router(nn.Module):
    """``SwitchTransformersTop1Router``: ``_compute_router_probabilities`` (stores ``self.input_dtype``,
    casts to ``router_dtype``, the training-only jitter ``*=``, ``_cast_classifier`` re-assigning
    ``self.classifier = self.classifier.to(dtype)`` unless bitsandbytes, classifier, softmax in
    ``router_dtype`` cast back), then ``argmax`` -> ``one_hot``, ``cumsum(dim=-2)`` priority,
    ``<= expert_capacity`` mask multiplied in, ``max(probs).values.unsqueeze(-1)``."""

    def __init__(self, config):
        super().__init__()
        self.num_experts = config.num_experts
        self.expert_capacity = config.expert_capacity
        self.classifier = nn.Linear(config.hidden_size, self.num_experts, bias=config.router_bias)
        self.jitter_noise = config.router_jitter_noise
        self.ignore_padding_tokens = config.router_ignore_padding_tokens
        self.dtype = getattr(torch, config.router_dtype)

    def _compute_router_probabilities(self, hidden_states):
        self.input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(self.dtype)
        if self.training and self.jitter_noise > 0:
            # training-only multiplicative jitter (not taken: the entries run in eval mode)
            hidden_states *= torch.empty_like(hidden_states).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        self._cast_classifier()
        router_logits = self.classifier(hidden_states)
        router_probabilities = nn.functional.softmax(router_logits, dim=-1, dtype=self.dtype).to(self.input_dtype)
        return router_probabilities, router_logits

    def _cast_classifier(self):
        if not (hasattr(self.classifier, "SCB") or hasattr(self.classifier, "CB")):
            self.classifier = self.classifier.to(self.dtype)

    def forward(self, hidden_states):
        router_probs, router_logits = self._compute_router_probabilities(hidden_states)
        expert_index = torch.argmax(router_probs, dim=-1)
        expert_index = torch.nn.functional.one_hot(expert_index, num_classes=self.num_experts)
        token_priority = torch.cumsum(expert_index, dim=-2)
        expert_capacity_mask = token_priority <= self.expert_capacity
        expert_index = expert_index * expert_capacity_mask
        router_probs = torch.max(router_probs, dim=-1).values.unsqueeze(-1)
        return expert_index, router_probs, router_logits


class SwitchTransformersDenseActDense(nn.Module):
    """``SwitchTransformersDenseActDense`` (= T5DenseActDense): ``wi``, act, dropout, a cast to
    ``wo``'s dtype when it differs (and is not int8), ``wo``."""

    def __init__(self, config):
        super().__init__()
        self.wi = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)
        self.dropout = nn.Dropout(config.dropout_rate)
        self.act = nn.functional.relu  # ACT2FN["relu"] is nn.ReLU

    def forward(self, hidden_states):
        hidden_states = self.wi(hidden_states)
        hidden_states = self.act(hidden_states)
        hidden_states = self.dropout(hidden_states)
        if (isinstance(self.wo.weight, torch.Tensor) and hidden_states.dtype != self.wo.weight.dtype
                and self.wo.weight.dtype != torch.int8):
            hidden_states = hidden_states.to(self.wo.weight.dtype)
        hidden_states = self.wo(hidden_states)
        return hidden_states


class SwitchTransformersSparseMLP(nn.Module):
    """transformers v4.50.0 ``SwitchTransformersSparseMLP.forward``: router, ``argmax(router_mask)`` as
    the returned expert index, ``next_states = hidden_states.clone()``, ``router_mask.bool()``, the hit
    experts ``nonzero(mask.reshape(B*S, E).sum(0), as_tuple=True)[0].tolist()``, per hit expert the
    ``ModuleDict`` lookup ``getattr(self.experts, "expert_{idx}")`` and the boolean-mask assignment
    ``next_states[mask[:, :, idx]] = expert(hidden_states[mask[:, :, idx]])``, then
    ``router_probs * next_states``. Deviations: tiny sizes only."""

    zero_dropped = False  # v4.55.0 starts from zeros instead of a clone

    def __init__(self, config, expert_class=SwitchTransformersDenseActDense):
        super().__init__()
        self.router = SwitchTransformersTop1Router(config)
        self.experts = nn.ModuleDict()
        for idx in range(config.num_experts):
            self.experts[f"expert_{idx}"] = expert_class(config)

    def forward(self, hidden_states):
        router_mask, router_probs, router_logits = self.router(hidden_states)
        expert_index = torch.argmax(router_mask, dim=-1)
        if self.zero_dropped:
            # v4.55.0 spelling (the one line that differs between the two releases)
            next_states = torch.zeros(hidden_states.shape, device=hidden_states.device, dtype=hidden_states.dtype)
        else:
            next_states = hidden_states.clone()
        router_mask = router_mask.bool()
        batch_size, seq_len, num_experts = router_mask.shape
        idx_mask = router_mask.reshape(batch_size * seq_len, num_experts).sum(dim=0)
        idx_mask = torch.nonzero(idx_mask, as_tuple=True)[0].tolist()
        for idx in idx_mask:
            next_states[router_mask[:, :, idx]] = getattr(self.experts, "expert_{}".format(idx))(
                hidden_states[router_mask[:, :, idx]])
        hidden_states = router_probs * next_states
        return hidden_states, (router_logits, expert_index)


class SwitchTransformersSparseMLPZeros(SwitchTransformersSparseMLP):
    """transformers v4.55.0 ``SwitchTransformersSparseMLP``: identical but for
    ``next_states = torch.zeros(hidden_states.shape, ...)`` (dropped tokens give 0, not themselves)."""

    zero_dropped = True


class SwitchRouterLosses(nn.Module):
    """Test wrapper (not in the source): calls the sparse MLP unchanged, keeps its
    ``(router_logits, expert_index)`` as ``self.router_tuple`` and computes from it what
    ``SwitchTransformersForConditionalGeneration.forward`` computes with ``output_router_logits``
    (``_unpack_router_logits``' ``torch.cat`` over the one sparse layer, ``router_z_loss_func``,
    ``nn.Softmax(dim=-1)`` of the logits, ``load_balancing_loss_func``, times the 0.001 coefficients),
    kept as ``self.z_loss`` / ``self.aux_loss``; returns the hidden states."""

    def __init__(self, mlp, config):
        super().__init__()
        self.mlp = mlp
        self.router_z_loss_coef = config.router_z_loss_coef
        self.router_aux_loss_coef = config.router_aux_loss_coef

    def forward(self, x):
        out, self.router_tuple = self.mlp(x)
        router_logits, expert_indexes = torch.cat([self.router_tuple[0]], dim=1), torch.cat([self.router_tuple[1]], dim=1)
        self.z_loss = self.router_z_loss_coef * router_z_loss_func(router_logits)
        router_probs = nn.Softmax(dim=-1)(router_logits)
        self.aux_loss = self.router_aux_loss_coef * load_balancing_loss_func(router_probs, expert_indexes)
        return out


def _build(cls):
    config = SwitchTransformersConfigLite()
    # deviation: eval mode (router jitter and expert dropout are training-only)
    return SwitchRouterLosses(cls(config), config).eval()


_x3d = tokens(lambda T: (1, T, D))

ENTRIES = [
    Idiom("switch_4x_clone", "transformers v4.50.0 models/switch_transformers/modeling_switch_transformers.py "
          "SwitchTransformersSparseMLP + SwitchTransformersTop1Router + SwitchTransformersDenseActDense "
          "(next_states = hidden_states.clone())",
          seeded(330, lambda: _build(SwitchTransformersSparseMLP)), _x3d, expect=1, fullgraph=False,
          faithful=True,
          note="dropped tokens pass through as themselves (clone) and are still scaled by router_probs, capacity "
               "by cumsum over the sequence, nonzero().tolist() of hit experts, boolean-mask index assignment, "
               "the classifier re-cast inside forward, z-loss and load-balancing loss from the returned tuple"),
    Idiom("switch_4x_zeros", "transformers v4.55.0 models/switch_transformers/modeling_switch_transformers.py "
          "SwitchTransformersSparseMLP (next_states = torch.zeros(...)) + SwitchTransformersTop1Router",
          seeded(331, lambda: _build(SwitchTransformersSparseMLPZeros)), _x3d, expect=1, fullgraph=False,
          faithful=True,
          note="the v4.55 zero base for dropped tokens, with the same capacity cumsum, .tolist() of hit experts, "
               "boolean-mask assignment, top-1 probability scaling after the experts and the router losses"),
]
