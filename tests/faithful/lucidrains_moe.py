"""lucidrains ``mixture-of-experts`` (GShard top-2 gating transcribed from tensor2tensor's ``moe.py``),
re-implemented op for op at a tiny size.

Read: github lucidrains/mixture-of-experts, ``mixture_of_experts/mixture_of_experts.py`` at commit
0fb459faf558c8e77b0e018685c64d00571d4fd9 (2023-09-12): ``MoE``, ``Top2Gating``, ``Experts``, helpers
``top1``, ``cumsum_exclusive``, ``safe_one_hot``, ``init_``, constant ``MIN_EXPERT_CAPACITY``.

The second-expert policy: the source's default is ``'random'`` in BOTH train and eval mode (a fresh
``uniform_(0, 1)`` draw every call), which a compiled module cannot be compared with eager on. The
source offers the other policies as constructor arguments (``second_policy_train`` /
``second_policy_eval``: ``'all'``, ``'none'``, ``'threshold'``, ``'random'``), so no line is changed:
the eval entry builds ``MoE(..., second_policy_eval='all')`` and calls ``.eval()`` (capacity factor
2.0); the train entry builds ``MoE(..., second_policy_train='all')`` (capacity factor 1.25, capacity
masking drops some second choices at T=8). The ``'random'`` and ``'threshold'`` branches are kept in
the code as written. ``'threshold'`` is not usable as published: ``mask_2 *= (gate_2 >
threshold).float()`` multiplies a (b, n, E) mask by a (b, n) tensor without ``unsqueeze(-1)`` (the
``'random'`` branch has it), which raises a broadcast error unless n == E (tried here at n=5, E=4).
"""
from __future__ import annotations

import math
from inspect import isfunction

import torch
import torch.nn as nn
import torch.nn.functional as F

from idiom_catalogue import D, E, N, Idiom, seeded, tokens

MIN_EXPERT_CAPACITY = 4


def _default(val, default_val):
    default_val = default_val() if isfunction(default_val) else default_val
    return val if val is not None else default_val


def _cast_tuple(el):
    return el if isinstance(el, tuple) else (el,)


def _top1(t):
    # top-1 by topk(k=1), both results squeezed on the last dim
    values, index = t.topk(k=1, dim=-1)
    values, index = map(lambda v: v.squeeze(dim=-1), (values, index))
    return values, index


def _cumsum_exclusive(t, dim=-1):
    # pad one zero step in front along ``dim``, cumsum, then slice the last step off
    num_pad_dims = -dim - 1
    pre_padding = (0, 0) * num_pad_dims
    pre_slice = (slice(None),) * num_pad_dims
    padded_t = F.pad(t, (*pre_padding, 1, 0)).cumsum(dim=dim)
    return padded_t[(..., slice(None, -1), *pre_slice)]


def _safe_one_hot(indexes, max_length):
    # one_hot over max(indexes.max() + 2, max_length) classes (a tensor compared with an int on the
    # host, as the source does), then cut to max_length: out-of-range positions become zero rows
    max_index = indexes.max() + 1
    return F.one_hot(indexes, max(max_index + 1, max_length))[..., :max_length]


def _init_(t):
    # uniform in +-1/sqrt(last dim), in place
    dim = t.shape[-1]
    std = 1 / math.sqrt(dim)
    return t.uniform_(-std, std)


class LucidExperts(nn.Module):
    """mixture-of-experts ``Experts``: stacked weights w1 (E, d, h), w2 (E, h, d) from zeros then
    ``init_``; ``einsum('...nd,...dh->...nh')``, activation module, ``einsum('...nh,...hd->...nd')``.
    No bias."""

    def __init__(self, dim, num_experts=16, hidden_dim=None, activation=nn.GELU):
        super().__init__()
        hidden_dim = _default(hidden_dim, dim * 4)
        num_experts = _cast_tuple(num_experts)
        w1 = torch.zeros(*num_experts, dim, hidden_dim)
        w2 = torch.zeros(*num_experts, hidden_dim, dim)
        w1 = _init_(w1)
        w2 = _init_(w2)
        self.w1 = nn.Parameter(w1)
        self.w2 = nn.Parameter(w2)
        self.act = activation()

    def forward(self, x):
        hidden = torch.einsum("...nd,...dh->...nh", x, self.w1)
        hidden = self.act(hidden)
        out = torch.einsum("...nh,...hd->...nd", hidden, self.w2)
        return out


class LucidTop2Gating(nn.Module):
    """mixture-of-experts ``Top2Gating`` (GShard): gating weight ``randn(dim, E)`` applied by
    einsum, softmax; first choice by ``top1`` and ``F.one_hot(...).float()``; second choice top-1
    of ``raw_gates * (1 - mask_1)``; in-place ``gate_1 /= denom``, ``gate_2 /= denom`` with
    denom = g1 + g2 + eps; balance loss ``mean(mean(probs) * mean(mask_1)) * E**2``; second-expert
    policy (all / none / threshold / random) with ``mask_2 *=``; host-side capacity
    ``max(min(n, int(n * cf / E)), 4)``; exclusive cumsum positions, in-place ``mask_1 *=`` /
    ``gate_1 *=`` / ``position_in_expert_2 *=`` / ``mask_2 *=`` / ``gate_2 *=`` capacity masking; the
    (b, n, E, C) combine tensor as a sum of two 4-way products with ``safe_one_hot`` of the
    positions; the dispatch tensor ``combine.bool().to(combine)``. The ``importance`` argument
    (hierarchical MoE only) is kept. Deviations: tiny sizes only."""

    def __init__(self, dim, num_gates, eps=1e-9, outer_expert_dims=tuple(), second_policy_train="random",
                 second_policy_eval="random", second_threshold_train=0.2, second_threshold_eval=0.2,
                 capacity_factor_train=1.25, capacity_factor_eval=2.):
        super().__init__()
        self.eps = eps
        self.num_gates = num_gates
        self.w_gating = nn.Parameter(torch.randn(*outer_expert_dims, dim, num_gates))
        self.second_policy_train = second_policy_train
        self.second_policy_eval = second_policy_eval
        self.second_threshold_train = second_threshold_train
        self.second_threshold_eval = second_threshold_eval
        self.capacity_factor_train = capacity_factor_train
        self.capacity_factor_eval = capacity_factor_eval

    def forward(self, x, importance=None):
        *_, b, group_size, dim = x.shape
        num_gates = self.num_gates

        if self.training:
            policy = self.second_policy_train
            threshold = self.second_threshold_train
            capacity_factor = self.capacity_factor_train
        else:
            policy = self.second_policy_eval
            threshold = self.second_threshold_eval
            capacity_factor = self.capacity_factor_eval

        raw_gates = torch.einsum("...bnd,...de->...bne", x, self.w_gating)
        raw_gates = raw_gates.softmax(dim=-1)

        # first choice
        gate_1, index_1 = _top1(raw_gates)
        mask_1 = F.one_hot(index_1, num_gates).float()
        density_1_proxy = raw_gates

        if importance is not None:
            equals_one_mask = (importance == 1.).float()
            mask_1 *= equals_one_mask[..., None]
            gate_1 *= equals_one_mask
            density_1_proxy = density_1_proxy * equals_one_mask[..., None]
            del equals_one_mask

        # second choice: the best of the gates with the first masked to zero
        gates_without_top_1 = raw_gates * (1. - mask_1)
        gate_2, index_2 = _top1(gates_without_top_1)
        mask_2 = F.one_hot(index_2, num_gates).float()

        if importance is not None:
            greater_zero_mask = (importance > 0.).float()
            mask_2 *= greater_zero_mask[..., None]
            del greater_zero_mask

        # renormalise the two gates, in place
        denom = gate_1 + gate_2 + self.eps
        gate_1 /= denom
        gate_2 /= denom

        # balance loss over the first choices, (b, E) densities
        density_1 = mask_1.mean(dim=-2)
        density_1_proxy = density_1_proxy.mean(dim=-2)
        loss = (density_1_proxy * density_1).mean() * float(num_gates ** 2)

        # second-expert policy
        if policy == "all":
            pass
        elif policy == "none":
            mask_2 = torch.zeros_like(mask_2)
        elif policy == "threshold":
            mask_2 *= (gate_2 > threshold).float()
        elif policy == "random":
            probs = torch.zeros_like(gate_2).uniform_(0., 1.)
            mask_2 *= (probs < (gate_2 / max(threshold, self.eps))).float().unsqueeze(-1)
        else:
            raise ValueError(f"Unknown policy {policy}")

        # capacity per expert and sequence, on the host from the static group size
        expert_capacity = min(group_size, int((group_size * capacity_factor) / num_gates))
        expert_capacity = max(expert_capacity, MIN_EXPERT_CAPACITY)
        expert_capacity_f = float(expert_capacity)

        # slots of the first choices; drop what does not fit
        position_in_expert_1 = _cumsum_exclusive(mask_1, dim=-2) * mask_1
        mask_1 *= (position_in_expert_1 < expert_capacity_f).float()
        mask_1_count = mask_1.sum(dim=-2, keepdim=True)
        mask_1_flat = mask_1.sum(dim=-1)
        position_in_expert_1 = position_in_expert_1.sum(dim=-1)
        gate_1 *= mask_1_flat

        # slots of the second choices, after the first choices' counts
        position_in_expert_2 = _cumsum_exclusive(mask_2, dim=-2) + mask_1_count
        position_in_expert_2 *= mask_2
        mask_2 *= (position_in_expert_2 < expert_capacity_f).float()
        mask_2_flat = mask_2.sum(dim=-1)
        position_in_expert_2 = position_in_expert_2.sum(dim=-1)
        gate_2 *= mask_2_flat

        # (b, n, E, C)
        combine_tensor = (
            gate_1[..., None, None]
            * mask_1_flat[..., None, None]
            * F.one_hot(index_1, num_gates)[..., None]
            * _safe_one_hot(position_in_expert_1.long(), expert_capacity)[..., None, :]
            + gate_2[..., None, None]
            * mask_2_flat[..., None, None]
            * F.one_hot(index_2, num_gates)[..., None]
            * _safe_one_hot(position_in_expert_2.long(), expert_capacity)[..., None, :]
        )
        dispatch_tensor = combine_tensor.bool().to(combine_tensor)
        return dispatch_tensor, combine_tensor, loss


class LucidMoE(nn.Module):
    """mixture-of-experts ``MoE``: ``Top2Gating`` -> dispatch ``einsum('bnd,bnec->ebcd')`` ->
    ``reshape(e, -1, d)`` -> ``Experts`` (ReLU, the ``MoE`` default) -> reshape back -> combine
    ``einsum('ebcd,bnec->bnd')``; returns ``(output, loss * loss_coef)``. Deviations: tiny sizes."""

    def __init__(self, dim, num_experts=16, hidden_dim=None, activation=nn.ReLU, second_policy_train="random",
                 second_policy_eval="random", second_threshold_train=0.2, second_threshold_eval=0.2,
                 capacity_factor_train=1.25, capacity_factor_eval=2., loss_coef=1e-2, experts=None):
        super().__init__()
        self.num_experts = num_experts
        gating_kwargs = dict(second_policy_train=second_policy_train, second_policy_eval=second_policy_eval,
                             second_threshold_train=second_threshold_train,
                             second_threshold_eval=second_threshold_eval,
                             capacity_factor_train=capacity_factor_train, capacity_factor_eval=capacity_factor_eval)
        self.gate = LucidTop2Gating(dim, num_gates=num_experts, **gating_kwargs)
        self.experts = _default(experts, lambda: LucidExperts(dim, num_experts=num_experts, hidden_dim=hidden_dim,
                                                              activation=activation))
        self.loss_coef = loss_coef

    def forward(self, inputs, **kwargs):
        b, n, d, e = *inputs.shape, self.num_experts
        dispatch_tensor, combine_tensor, loss = self.gate(inputs)
        expert_inputs = torch.einsum("bnd,bnec->ebcd", inputs, dispatch_tensor)
        orig_shape = expert_inputs.shape
        expert_inputs = expert_inputs.reshape(e, -1, d)
        expert_outputs = self.experts(expert_inputs)
        expert_outputs = expert_outputs.reshape(*orig_shape)
        output = torch.einsum("ebcd,bnec->bnd", expert_outputs, combine_tensor)
        return output, loss * self.loss_coef


class LucidMoEOutput(nn.Module):
    """Catalogue wrapper (not in the source): calls the source's ``MoE`` unchanged, keeps its aux
    loss as ``self.aux_loss`` and returns the output tensor only."""

    def __init__(self, moe):
        super().__init__()
        self.moe = moe

    def forward(self, x):
        out, aux = self.moe(x)
        self.aux_loss = aux  # the (output, loss) tuple's second element, kept
        return out


def _eval_all():
    # the source's constructor options: 'all' policy in eval; eval mode (capacity factor 2.0)
    return LucidMoEOutput(LucidMoE(D, num_experts=E, hidden_dim=N, second_policy_eval="all")).eval()


def _train_all():
    # the source's constructor options: 'all' policy in training (capacity factor 1.25)
    return LucidMoEOutput(LucidMoE(D, num_experts=E, hidden_dim=N, second_policy_train="all"))


_x3d = tokens(lambda T: (1, T, D))
_SOURCE = ("lucidrains/mixture-of-experts mixture_of_experts/mixture_of_experts.py MoE + Top2Gating + Experts "
           "(GShard top-2, capacity, einsum dispatch/combine, stacked einsum experts)")

ENTRIES = [
    Idiom("lucidrains_moe_eval", _SOURCE + ", eval mode, second_policy_eval='all'",
          seeded(350, _eval_all), _x3d, expect=1, faithful=True, fullgraph=False,  # safe_one_hot: max(tensor, int)
          other_gemms=1,  # the gating einsum (dispatch and combine einsums are replaced with the experts)
          note="in-place gate_1 /= denom and mask *= / gate *= capacity masking, eval capacity factor 2.0, "
               "host-side capacity max(min(n, int(n*cf/E)), 4), exclusive cumsum by pad+slice, safe_one_hot over "
               "max(idx.max()+2, C) classes, dispatch = combine.bool().to(combine), loss * loss_coef returned"),
    Idiom("lucidrains_moe_train_all", _SOURCE + ", training mode, second_policy_train='all'",
          seeded(351, _train_all), _x3d, expect=1, faithful=True, fullgraph=False,  # safe_one_hot: max(tensor, int)
          other_gemms=1,  # the gating einsum (dispatch and combine einsums are replaced with the experts)
          note="as the eval entry with every second choice kept and capacity factor 1.25 (tokens dropped at T=8), "
               "balance loss from the first-choice densities returned"),
]
