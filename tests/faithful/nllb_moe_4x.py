"""transformers 4.x ``NllbMoeSparseMLP`` + ``NllbMoeTop2Router`` + ``NllbMoeDenseActDense`` (github
huggingface/transformers, ``src/transformers/models/nllb_moe/modeling_nllb_moe.py``), read from the
released wheels v4.50.0 and v4.55.0 (PyPI): the MoE code is the same in both (4.55 changes type
hints and a docstring typo only).

What the 4.x layer does that a quick re-spelling drops:

- the router runs in ``router_dtype`` (fp32), stores ``self.input_dtype``, re-assigns
  ``self.classifier = self.classifier.to(dtype)`` inside forward, and in eval mode stores
  ``self.expert_capacity = ceil(moe_eval_capacity_token_fraction * nb_tokens)`` (a host integer
  from the token count) on the module;
- top-2 without ``topk``: ``argmax`` -> ``one_hot``, the logits with the first pick
  ``masked_fill``-ed to -inf, a second ``argmax`` -> ``one_hot``; capacity positions by ``cumsum``
  (the second pick's offset by the first pick's per-expert totals), ``torch.lt`` capacity masks,
  the two probabilities renormalised after dropping (clamped by ``finfo.eps``); the combine
  weights are ``gates1 + gates2`` as an (T, E) dense tensor and the routing mask is
  ``router_probs.bool()``;
- the padding mask: the encoder passes its 4-D additive attention mask, of which the router takes
  the last row ``[:, :, -1, :].reshape(-1)[-nb_tokens:]``, ``~bool()``, and zeroes both pick masks;
- dispatch ``einsum("bm,be->ebm", x, router_mask)`` into an (E, T, d) buffer, per expert the
  boolean-mask read ``buf[idx, token_indices]``, the expert, the eval-mode in-place token-dropout
  scale ``expert_output *= 1 - moe_token_dropout`` (config default 0.2), the per-row gate by
  ``einsum("b,be->be", w, y)`` written back into ``buf[idx, token_indices]``, then ``sum(dim=0)``.

The entries run in eval mode (deviation: the training path draws dropout masks; eval is what
translation runs). ``NllbMoeSparseMLP`` returns ``(hidden_states, (router_probs, top_1_expert_index))``
and takes ``(hidden_states, padding_mask)``: a wrapper calls it as ``NllbMoeEncoderLayer`` does and
computes the load-balancing loss from the tuple as ``NllbMoeForConditionalGeneration`` does.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from idiom_catalogue import D, E, N, Idiom, seeded, tokens


class NllbMoeConfigLite:
    """The ``NllbMoeConfig`` fields the layer reads (deviation: a plain object, not the config class;
    tiny sizes: NLLB-MoE 54B has d_model 2048, ffn 8192, 128 experts). Routing fields: the defaults."""

    d_model = D
    hidden_size = D
    encoder_ffn_dim = N
    num_experts = E
    expert_capacity = 64
    router_bias = False
    router_dtype = "float32"
    router_ignore_padding_tokens = False
    second_expert_policy = "all"
    normalize_router_prob_before_dropping = False
    batch_prioritized_routing = False
    moe_eval_capacity_token_fraction = 1.0
    moe_token_dropout = 0.2
    activation_function = "relu"
    activation_dropout = 0.0
    router_aux_loss_coef = 0.001


def load_balancing_loss_func(router_probs, expert_indices):
    """``load_balancing_loss_func`` (NLLB-MoE's copy: returns 0 for ``None`` probabilities)."""
    if router_probs is None:
        return 0
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


class NllbMoeTop2Router(nn.Module):
    """``NllbMoeTop2Router``: forward (``self.input_dtype``, reshape to (T, d), cast, ``_cast_classifier``,
    classifier) and ``route_tokens`` op for op, every config branch kept; ``normalize_router_probabilities``."""

    def __init__(self, config):
        super().__init__()
        self.num_experts = config.num_experts
        self.expert_capacity = config.expert_capacity
        self.classifier = nn.Linear(config.hidden_size, self.num_experts, bias=config.router_bias)
        self.router_ignore_padding_tokens = config.router_ignore_padding_tokens
        self.dtype = getattr(torch, config.router_dtype)
        self.second_expert_policy = config.second_expert_policy
        self.normalize_router_prob_before_dropping = config.normalize_router_prob_before_dropping
        self.batch_prioritized_routing = config.batch_prioritized_routing
        self.moe_eval_capacity_token_fraction = config.moe_eval_capacity_token_fraction

    def _cast_classifier(self):
        if not (hasattr(self.classifier, "SCB") or hasattr(self.classifier, "CB")):
            self.classifier = self.classifier.to(self.dtype)

    def normalize_router_probabilities(self, router_probs, top_1_mask, top_2_mask):
        top_1_max_probs = (router_probs * top_1_mask).sum(dim=1)
        top_2_max_probs = (router_probs * top_2_mask).sum(dim=1)
        denom_s = torch.clamp(top_1_max_probs + top_2_max_probs, min=torch.finfo(router_probs.dtype).eps)
        top_1_max_probs = top_1_max_probs / denom_s
        top_2_max_probs = top_2_max_probs / denom_s
        return top_1_max_probs, top_2_max_probs

    def route_tokens(self, router_logits, input_dtype=torch.float32, padding_mask=None):
        nb_tokens = router_logits.shape[0]
        router_probs = nn.functional.softmax(router_logits, dim=-1, dtype=self.dtype).to(input_dtype)
        top_1_expert_index = torch.argmax(router_probs, dim=-1)
        top_1_mask = torch.nn.functional.one_hot(top_1_expert_index, num_classes=self.num_experts)
        if self.second_expert_policy == "sampling":
            # not taken (policy "all", the default): Gumbel noise added in place to the logits
            gumbel = torch.distributions.gumbel.Gumbel(0, 1).rsample
            router_logits += gumbel(router_logits.shape).to(router_logits.device)
        logits_except_top_1 = router_logits.masked_fill(top_1_mask.bool(), float("-inf"))
        top_2_expert_index = torch.argmax(logits_except_top_1, dim=-1)
        top_2_mask = torch.nn.functional.one_hot(top_2_expert_index, num_classes=self.num_experts)
        if self.normalize_router_prob_before_dropping:
            top_1_max_probs, top_2_max_probs = self.normalize_router_probabilities(router_probs, top_1_mask,
                                                                                   top_2_mask)
        if self.second_expert_policy == "random":
            # not taken (policy "all"): the second pick kept with probability 2 * p2
            top_2_max_probs = (router_probs * top_2_mask).sum(dim=1)
            sampled = (2 * top_2_max_probs) > torch.rand_like(top_2_max_probs.float())
            top_2_mask = top_2_mask * sampled.repeat(self.num_experts, 1).transpose(1, 0)
        if padding_mask is not None and not self.router_ignore_padding_tokens:
            if len(padding_mask.shape) == 4:
                padding_mask = padding_mask[:, :, -1, :].reshape(-1)[-nb_tokens:]
            non_padding = ~padding_mask.bool()
            top_1_mask = top_1_mask * non_padding.unsqueeze(-1).to(top_1_mask.dtype)
            top_2_mask = top_2_mask * non_padding.unsqueeze(-1).to(top_1_mask.dtype)
        if self.batch_prioritized_routing:
            importance_scores = -1 * router_probs.max(dim=1)[0]
            sorted_top_1_mask = top_1_mask[importance_scores.argsort(dim=0)]
            sorted_cumsum1 = (torch.cumsum(sorted_top_1_mask, dim=0) - 1) * sorted_top_1_mask
            locations1 = sorted_cumsum1[importance_scores.argsort(dim=0).argsort(dim=0)]
            sorted_top_2_mask = top_2_mask[importance_scores.argsort(dim=0)]
            sorted_cumsum2 = (torch.cumsum(sorted_top_2_mask, dim=0) - 1) * sorted_top_2_mask
            locations2 = sorted_cumsum2[importance_scores.argsort(dim=0).argsort(dim=0)]
            locations2 += torch.sum(top_1_mask, dim=0, keepdim=True)
        else:
            locations1 = torch.cumsum(top_1_mask, dim=0) - 1
            locations2 = torch.cumsum(top_2_mask, dim=0) - 1
            locations2 += torch.sum(top_1_mask, dim=0, keepdim=True)
        if not self.training and self.moe_eval_capacity_token_fraction > 0:
            self.expert_capacity = math.ceil(self.moe_eval_capacity_token_fraction * nb_tokens)
        else:
            capacity = 2 * math.ceil(nb_tokens / self.num_experts)
            self.expert_capacity = capacity if self.expert_capacity is None else self.expert_capacity
        top_1_mask = top_1_mask * torch.lt(locations1, self.expert_capacity)
        top_2_mask = top_2_mask * torch.lt(locations2, self.expert_capacity)
        if not self.normalize_router_prob_before_dropping:
            top_1_max_probs, top_2_max_probs = self.normalize_router_probabilities(router_probs, top_1_mask,
                                                                                   top_2_mask)
        gates1 = top_1_max_probs[:, None] * top_1_mask
        gates2 = top_2_max_probs[:, None] * top_2_mask
        router_probs = gates1 + gates2
        return top_1_mask, router_probs

    def forward(self, hidden_states, padding_mask=None):
        self.input_dtype = hidden_states.dtype
        batch_size, sequence_length, hidden_dim = hidden_states.shape
        hidden_states = hidden_states.reshape((batch_size * sequence_length), hidden_dim)
        hidden_states = hidden_states.to(self.dtype)
        self._cast_classifier()
        router_logits = self.classifier(hidden_states)
        top_1_mask, router_probs = self.route_tokens(router_logits, self.input_dtype, padding_mask)
        return top_1_mask, router_probs


class NllbMoeDenseActDense(nn.Module):
    """``NllbMoeDenseActDense``: ``fc1`` (bias), act, dropout, a cast to ``fc2``'s dtype unless int8 /
    uint8, ``fc2`` (bias)."""

    def __init__(self, config, ffn_dim):
        super().__init__()
        self.fc1 = nn.Linear(config.d_model, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, config.d_model)
        self.dropout = nn.Dropout(config.activation_dropout)
        self.act = nn.functional.relu  # ACT2FN["relu"] is nn.ReLU

    def forward(self, hidden_states):
        hidden_states = self.fc1(hidden_states)
        hidden_states = self.act(hidden_states)
        hidden_states = self.dropout(hidden_states)
        if (isinstance(self.fc2.weight, torch.Tensor) and hidden_states.dtype != self.fc2.weight.dtype
                and (self.fc2.weight.dtype != torch.int8 and self.fc2.weight.dtype != torch.uint8)):
            hidden_states = hidden_states.to(self.fc2.weight.dtype)
        hidden_states = self.fc2(hidden_states)
        return hidden_states


class NllbMoeSparseMLP(nn.Module):
    """``NllbMoeSparseMLP.forward``: router, ``router_probs.bool()``, ``einsum("bm,be->ebm")`` dispatch,
    ``enumerate(self.experts.values())`` loop with boolean-mask reads and writes of the (E, T, d)
    buffer, the token-dropout branch (eval: in-place ``*= 1 - p``), ``einsum("b,be->be")`` gating,
    ``sum(dim=0)``, ``argmax(top_1_mask)``. Deviations: tiny sizes only."""

    def __init__(self, config, ffn_dim, expert_class=NllbMoeDenseActDense):
        super().__init__()
        self.router = NllbMoeTop2Router(config)
        self.moe_token_dropout = config.moe_token_dropout
        self.token_dropout = nn.Dropout(self.moe_token_dropout)
        self.num_experts = config.num_experts
        self.experts = nn.ModuleDict()
        for idx in range(self.num_experts):
            self.experts[f"expert_{idx}"] = expert_class(config, ffn_dim)

    def forward(self, hidden_states, padding_mask=False):
        batch_size, sequence_length, hidden_dim = hidden_states.shape
        top_1_mask, router_probs = self.router(hidden_states, padding_mask)
        router_mask = router_probs.bool()
        hidden_states = hidden_states.reshape((batch_size * sequence_length), hidden_dim)
        masked_hidden_states = torch.einsum("bm,be->ebm", hidden_states, router_mask)
        for idx, expert in enumerate(self.experts.values()):
            token_indices = router_mask[:, idx]
            combining_weights = router_probs[token_indices, idx]
            expert_output = expert(masked_hidden_states[idx, token_indices])
            if self.moe_token_dropout > 0:
                if self.training:
                    expert_output = self.token_dropout(expert_output)
                else:
                    expert_output *= 1 - self.moe_token_dropout
            masked_hidden_states[idx, token_indices] = torch.einsum("b,be->be", combining_weights, expert_output)
        hidden_states = masked_hidden_states.sum(dim=0).reshape(batch_size, sequence_length, hidden_dim)
        top_1_expert_index = torch.argmax(top_1_mask, dim=-1)
        return hidden_states, (router_probs, top_1_expert_index)


class NllbEncoderFFNCall(nn.Module):
    """Test wrapper (not in the source). Calls ``NllbMoeSparseMLP`` unchanged the way
    ``NllbMoeEncoderLayer`` does, ``self.ffn(hidden_states, attention_mask)``, with the encoder's mask:
    ``None`` when the model got no ``attention_mask`` (``four_d=False``), else the 4-D additive mask
    ``_prepare_4d_attention_mask`` builds from an all-ones (no padding) ``attention_mask``
    (``four_d=True``: (B, 1, S, S), 0 where attended, ``finfo.min`` elsewhere). Keeps the router tuple
    as ``self.router_states`` and, as ``NllbMoeForConditionalGeneration.forward`` does with
    ``output_router_logits``, ``_unpack_router_logits`` (``cat`` dim 1 / ``stack`` dim 1 over the one
    sparse layer) then ``router_aux_loss_coef * load_balancing_loss_func(...)`` as ``self.aux_loss``."""

    def __init__(self, config, four_d=False):
        super().__init__()
        self.ffn = NllbMoeSparseMLP(config, ffn_dim=config.encoder_ffn_dim)
        self.four_d = four_d
        self.router_aux_loss_coef = config.router_aux_loss_coef

    def forward(self, x):
        attention_mask = None
        if self.four_d:
            bsz, src_len = x.shape[0], x.shape[1]
            mask2d = torch.ones(bsz, src_len, dtype=torch.long, device=x.device)  # no padding
            # _prepare_4d_attention_mask -> AttentionMaskConverter._expand_mask: expand, invert, fill finfo.min
            expanded = mask2d[:, None, None, :].expand(bsz, 1, src_len, src_len).to(x.dtype)
            inverted = 1.0 - expanded
            attention_mask = inverted.masked_fill(inverted.to(torch.bool), torch.finfo(x.dtype).min)
        out, self.router_states = self.ffn(x, attention_mask)
        probs, expert_indexes = torch.cat([self.router_states[0]], dim=1), torch.stack([self.router_states[1]], dim=1)
        self.aux_loss = self.router_aux_loss_coef * load_balancing_loss_func(probs, expert_indexes)
        return out


def _build(**kw):
    # deviation: eval mode (training draws token-dropout masks); eval also sets the capacity to the token count
    return NllbEncoderFFNCall(NllbMoeConfigLite(), **kw).eval()


_x3d = tokens(lambda T: (1, T, D))
# left after the rewrite: the classifier (the dispatch einsum "bm,be->ebm" and the gating einsums
# "b,be->be" are replaced with the experts)
_GEMMS = 1

ENTRIES = [
    Idiom("nllb_moe_4x_no_mask", "transformers v4.50.0 / v4.55.0 models/nllb_moe/modeling_nllb_moe.py NllbMoeSparseMLP "
          "+ NllbMoeTop2Router + NllbMoeDenseActDense (eval, padding_mask None)",
          seeded(340, _build), _x3d, expect=1, other_gemms=_GEMMS, faithful=True,
          note="argmax / masked_fill(-inf) / argmax top-2, cumsum capacity positions with the eval capacity "
               "stored on the module, renormalisation after dropping, router_probs.bool() masks, the (E, T, d) "
               "einsum dispatch buffer written per expert, eval token-dropout '*= 0.8', einsum gating, sum(0)"),
    Idiom("nllb_moe_4x_encoder_mask", "transformers v4.50.0 / v4.55.0 models/nllb_moe/modeling_nllb_moe.py "
          "NllbMoeSparseMLP + NllbMoeTop2Router, called with the encoder's 4-D additive attention mask",
          seeded(341, lambda: _build(four_d=True)), _x3d, expect=1, other_gemms=_GEMMS, faithful=True,
          note="the router's padding path: the last row of the 4-D additive mask, ~bool(), both pick masks "
               "multiplied by the non-padding column, on top of everything nllb_moe_4x_no_mask keeps"),
]
