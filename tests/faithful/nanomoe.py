"""nanoMoE (Cameron Wolfe's nanoGPT with MoE layers), re-implemented op for op at a tiny size.

Read: github wolfecameron/nanoMoE, ``model.py`` at commit 661fbcfade3e3081b3ed1150bc07e49082f46b48
(2025-03-09): ``Router`` (``forward``, ``compute_aux_loss``, ``compute_router_z_loss``,
``get_capacity``), ``MLPExperts``, ``MOELayer``, ``GPTConfig``, ``GPT._init_weights`` /
``GPT.forward`` (how the losses are collected and reset); ``manager.py`` ``MOEManager`` / ``MANAGER``;
``config/train_nano_moe.py`` (the training configuration).
"""
from __future__ import annotations

import dataclasses
import math
from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F

from idiom_catalogue import D, E, K, N, Idiom, seeded, tokens


class _MOEManager:
    """nanoMoE ``manager.py`` ``MOEManager``: a process-wide object the routers append their losses to
    (lists), summed and reset by ``GPT.forward``."""

    def __init__(self):
        self.aux_loss = []
        self.router_z_loss = []

    def reset_aux_loss(self):
        self.aux_loss = []

    def reset_router_z_loss(self):
        self.router_z_loss = []

    def add_aux_loss(self, loss):
        self.aux_loss.append(loss)

    def add_router_z_loss(self, loss):
        self.router_z_loss.append(loss)

    def aggregate_aux_loss(self):
        return sum(self.aux_loss)

    def aggregate_router_z_loss(self):
        return sum(self.router_z_loss)


MANAGER = _MOEManager()  # nanoMoE's module-level singleton (one per process, as in manager.py)


@dataclasses.dataclass
class NanoMoEConfig:
    """The MoE fields of nanoMoE's ``GPTConfig``, with its defaults except the sizes."""

    n_embd: int = D  # deviation: tiny (768 in GPTConfig, 384 in train_nano_moe)
    n_exp: int = E  # deviation: 4 (8 in train_nano_moe)
    top_k: int = K
    bias: bool = True
    dropout: float = 0.0
    use_aux_loss: bool = False
    use_router_z_loss: bool = False
    use_noisy_top_k: bool = False
    aux_loss_weight: float = 0.01
    router_z_loss_weight: float = 0.001
    train_capacity: float = 1.25
    eval_capacity: float = 2.0
    min_capacity: int = 4
    router_use_full_prec: bool = False
    n_layer: int = 1
    use_switch_tfm_init: bool = True
    switch_tfm_init_scale: float = 1.0


class NanoRouter(nn.Module):
    """nanoMoE ``Router``: optional full-precision region (``torch.amp.autocast(device_type,
    enabled=False)``, device type from ``torch.cuda.is_available()``), ``w_g`` logits, z-loss
    (``logsumexp(logits) ** 2`` mean) appended to MANAGER, ``logits.topk``, softmax over a
    ``full_like(-inf).scatter_`` of the top-k logits, Switch aux loss (one-hot counts under
    ``no_grad``) appended to MANAGER, host capacity ``floor(K * cf * T / E)`` rounded up to even and
    at least ``min_capacity``, one-hot masks permuted to (k, T, E), ranks by one cumsum over the
    flattened (k, T) rows minus 1, in-place ``exp_mask *= lt(rank, C)`` (int64 *= bool), used
    capacity, ranks summed over experts, ``F.one_hot(rank, C)``, the (T, E, C) combine weights
    summed over k and ``cb_weight.bool()``. Deviation: noisy top-k is off (the config default and
    train_nano_moe's)."""

    def __init__(self, config):
        super().__init__()
        self.top_k = config.top_k
        self.n_exp = config.n_exp
        assert 1 <= self.top_k <= config.n_exp
        self.use_noisy_top_k = config.use_noisy_top_k
        self.train_capacity = config.train_capacity
        self.eval_capacity = config.eval_capacity
        self.min_capacity = config.min_capacity
        self.router_use_full_prec = config.router_use_full_prec
        self.use_aux_loss = config.use_aux_loss
        self.use_router_z_loss = config.use_router_z_loss
        self.w_g = nn.Linear(config.n_embd, config.n_exp, bias=False)
        self.w_noise = nn.Linear(config.n_embd, config.n_exp, bias=False) if self.use_noisy_top_k else None

    def forward(self, x):
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
        ctx = nullcontext() if not self.router_use_full_prec else torch.amp.autocast(device_type=device_type,
                                                                                       enabled=False)
        with ctx:
            B, T, _ = x.size()
            num_tokens = B * T

            logits = self.w_g(x)  # (B, T, E)
            assert not self.use_noisy_top_k  # deviation: router noise off (softplus(w_noise x) * randn_like)

            if self.use_router_z_loss:
                z_loss = self.compute_router_z_loss(logits)
                MANAGER.add_router_z_loss(z_loss)

            top_k_logits, top_k_indices = logits.topk(self.top_k, dim=-1)  # (B, T, k)

            # softmax over the top-k logits only: the others are -inf before the softmax
            router_probs = torch.full_like(logits, float("-inf"))
            router_probs.scatter_(-1, top_k_indices, top_k_logits)
            router_probs = F.softmax(router_probs, dim=-1)

            if self.use_aux_loss:
                aux_loss = self.compute_aux_loss(router_probs, top_k_indices)
                MANAGER.add_aux_loss(aux_loss)

            exp_capacity = self.get_capacity(num_tokens)

            exp_mask = F.one_hot(top_k_indices, num_classes=self.n_exp)  # (B, T, k, E) int64
            exp_mask = exp_mask.view(num_tokens, self.top_k, self.n_exp)
            exp_mask = exp_mask.permute(1, 0, 2)  # (k, T, E): all first choices before all second ones

            exp_rank = exp_mask.reshape(self.top_k * num_tokens, self.n_exp)
            exp_rank = torch.cumsum(exp_rank, dim=0) - 1
            exp_rank = exp_rank.reshape(self.top_k, num_tokens, self.n_exp)

            exp_mask *= torch.lt(exp_rank, exp_capacity)  # drop what is over capacity, in place
            used_capacity = torch.sum(exp_mask, dim=(0, 1))  # (E,)

            exp_rank = torch.sum(exp_mask * exp_rank, dim=-1)  # (k, T): slot of each kept choice

            router_probs = router_probs.view(num_tokens, self.n_exp)[None, :]  # (1, T, E)
            exp_weights = exp_mask * router_probs  # (k, T, E)

            exp_rank_sc = F.one_hot(exp_rank, num_classes=exp_capacity)  # (k, T, C)

            cb_weight = torch.sum(exp_weights.unsqueeze(3) * exp_rank_sc.unsqueeze(2), dim=0)  # (T, E, C)
            sec_mask = cb_weight.bool()
            return used_capacity, cb_weight, sec_mask

    def compute_aux_loss(self, expert_probs, indices):
        with torch.no_grad():
            one_hot_indices = F.one_hot(indices, num_classes=self.n_exp)  # (B, T, k, E)
            one_hot_indices = torch.sum(one_hot_indices.float(), dim=2)  # (B, T, E)
            tokens_per_expert = torch.mean(one_hot_indices.float(), dim=(0, 1))
        prob_per_expert = torch.mean(expert_probs.float(), dim=(0, 1))
        return self.n_exp * torch.sum(prob_per_expert * tokens_per_expert)

    def compute_router_z_loss(self, logits):
        z_loss = torch.logsumexp(logits, dim=-1) ** 2.0
        return torch.mean(z_loss)

    def get_capacity(self, tokens_per_batch):
        capacity_factor = self.train_capacity if self.training else self.eval_capacity
        capacity = math.floor(self.top_k * capacity_factor * tokens_per_batch / self.n_exp)
        capacity += capacity % 2
        capacity = max(capacity, self.min_capacity)
        assert capacity > 0
        return int(capacity)


class NanoMLPExperts(nn.Module):
    """nanoMoE ``MLPExperts``: stacked (E, d, h) / (E, h, d) weights in (in, out) layout, ``torch.bmm``
    on the (E, C, d) slots, in-place ``x += fc_bias`` / ``x += proj_bias`` with (E, 1, out) biases,
    ``nn.GELU``, ``nn.Dropout`` (p = config.dropout = 0.0). Deviation: the expert width is 8, not
    ``4 * n_embd``."""

    def __init__(self, config):
        super().__init__()
        self.bias = config.bias
        h = N  # deviation: the source's width is 4 * config.n_embd
        self.c_fc = nn.Parameter(torch.empty(config.n_exp, config.n_embd, h))
        self.c_proj = nn.Parameter(torch.empty(config.n_exp, h, config.n_embd))
        self.fc_bias = nn.Parameter(torch.empty(config.n_exp, 1, h)) if self.bias else None
        self.proj_bias = nn.Parameter(torch.empty(config.n_exp, 1, config.n_embd)) if self.bias else None
        self.gelu = nn.GELU()
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        x = torch.bmm(x, self.c_fc)
        if self.bias:
            x += self.fc_bias
        x = self.gelu(x)
        x = torch.bmm(x, self.c_proj)
        if self.bias:
            x += self.proj_bias
        x = self.dropout(x)
        return x


class NanoMOELayer(nn.Module):
    """nanoMoE ``MOELayer``: the router's (T, E, C) combine weights and boolean dispatch mask;
    dispatch ``exp_mask.permute(1, 2, 0).type_as(x) @ x`` -> (E, C, d) slots; ``MLPExperts``;
    combine ``exp_weight.view(T, E * C) @ exp_out.view(E * C, d)``; ``view(B, T, d)``."""

    def __init__(self, config):
        super().__init__()
        self.router = NanoRouter(config)
        self.experts = NanoMLPExperts(config)

    def forward(self, x):
        B, T, n_embd = x.size()
        num_tokens = B * T
        used_capacity, exp_weight, exp_mask = self.router(x)
        x = x.view(num_tokens, n_embd)
        exp_batches = exp_mask.permute(1, 2, 0).type_as(x) @ x  # (E, C, T) @ (T, d)
        exp_out = self.experts(exp_batches)  # (E, C, d)
        exp_weight = exp_weight.view(num_tokens, -1)  # (T, E * C)
        exp_out = exp_out.view(-1, n_embd)  # (E * C, d)
        output = exp_weight @ exp_out
        return output.view(B, T, n_embd)


def _init_like_gpt(layer, config):
    """``GPT._init_weights`` for the MoE layer's parameters with ``use_switch_tfm_init`` (as
    train_nano_moe sets): truncated normal, std sqrt(scale / fan_in), cut at 2 std, for the router's
    ``nn.Linear`` (fan_in = in features) and the stacked ``c_fc`` / ``c_proj`` (fan_in = shape[-2]).
    Deviations: the biases get small random values (the source zeros them: a bias the rewrite
    dropped would not show), and the GPT-2 residual re-initialisation of ``experts.c_proj``
    (normal, std 0.02 / sqrt(2 * n_layer)) is skipped, so that the expert outputs are not tiny next to
    the tolerance."""
    with torch.no_grad():
        w = layer.router.w_g.weight
        std = (config.switch_tfm_init_scale / w.shape[-1]) ** 0.5
        torch.nn.init.trunc_normal_(w, mean=0.0, std=std, a=-2 * std, b=2 * std)
        for p in (layer.experts.c_fc, layer.experts.c_proj):
            std = (config.switch_tfm_init_scale / p.shape[-2]) ** 0.5
            torch.nn.init.trunc_normal_(p, mean=0.0, std=std, a=-2 * std, b=2 * std)
        if layer.experts.fc_bias is not None:
            layer.experts.fc_bias.normal_(0.0, 0.1)  # deviation: zeros in the source
            layer.experts.proj_bias.normal_(0.0, 0.1)  # deviation: zeros in the source


class NanoMoEOutput(nn.Module):
    """Catalogue wrapper (not in the source): runs ``MOELayer`` unchanged, then does what
    ``GPT.forward`` does with the losses when targets are given: ``aggregate_*`` (Python ``sum`` of
    MANAGER's lists) weighted by the config, then ``reset_*``; kept here as ``self.aux_loss`` /
    ``self.router_z_loss`` instead of being added to the cross-entropy loss."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.moe = NanoMOELayer(config)
        _init_like_gpt(self.moe, config)

    def forward(self, x):
        out = self.moe(x)
        if self.config.n_exp > 1 and self.config.use_aux_loss:
            self.aux_loss = self.config.aux_loss_weight * MANAGER.aggregate_aux_loss()
            MANAGER.reset_aux_loss()
        if self.config.n_exp > 1 and self.config.use_router_z_loss:
            self.router_z_loss = self.config.router_z_loss_weight * MANAGER.aggregate_router_z_loss()
            MANAGER.reset_router_z_loss()
        return out


_x3d = tokens(lambda T: (1, T, D))  # (B, T, n_embd), as MOELayer takes it

ENTRIES = [
    Idiom("nanomoe_train", "wolfecameron/nanoMoE model.py MOELayer + Router + MLPExperts (config/train_nano_moe.py: "
          "aux loss, router z-loss, full-precision router, biases)",
          seeded(330, lambda: NanoMoEOutput(NanoMoEConfig(use_aux_loss=True, use_router_z_loss=True,
                                                          router_use_full_prec=True))),
          _x3d, expect=1, faithful=True,
          note="autocast(enabled=False) router region, losses appended to a global MANAGER and summed/reset, "
               "softmax over full_like(-inf).scatter_ of the top-k logits, in-place int64 exp_mask *= lt(rank, C), "
               "used_capacity, even-rounded host capacity, in-place bmm bias adds"),
    Idiom("nanomoe_nobias_plain", "wolfecameron/nanoMoE model.py MOELayer + Router + MLPExperts (GPTConfig defaults, "
          "bias=False: no aux losses, no autocast region)",
          seeded(331, lambda: NanoMoEOutput(NanoMoEConfig(bias=False))),
          _x3d, expect=1, faithful=True,
          note="stacked (E, in, out) bmm experts without biases, exp_mask.permute(1, 2, 0).type_as(x) @ x dispatch "
               "and the (T, E*C) @ (E*C, d) combine matmul, with the nullcontext router"),
]
