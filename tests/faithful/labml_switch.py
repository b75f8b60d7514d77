"""labml.ai annotated paper implementations: the Switch Transformer's routing among FFNs,
re-implemented op for op at a tiny size.

Read: github labmlai/annotated_deep_learning_paper_implementations at commit
e6b3c8a6a2cdae4071bcde1abeaaf9a2bc37bd53 (2025-08-21): ``labml_nn/transformers/switch/__init__.py``
``SwitchFeedForward`` (and ``SwitchTransformerLayer`` for what the outputs feed),
``labml_nn/transformers/switch/experiment.py`` (``Configs`` defaults, ``main``'s overrides, the
load-balancing loss in ``step``), ``labml_nn/transformers/feed_forward.py`` ``FeedForward``,
``labml_nn/utils/__init__.py`` ``clone_module_list``.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from idiom_catalogue import D, E, N, Idiom, seeded, tokens


class LabmlFeedForward(nn.Module):
    """labml ``FeedForward``: ``layer2(dropout(activation(layer1(x)) [* linear_v(x)]))``, biases on,
    ReLU, not gated (the Switch experiment's expert: ``FeedForward(d_model, d_ff, dropout)``)."""

    def __init__(self, d_model, d_ff, dropout=0.1, activation=nn.ReLU(), is_gated=False, bias1=True, bias2=True,
                 bias_gate=True):
        super().__init__()
        self.layer1 = nn.Linear(d_model, d_ff, bias=bias1)
        self.layer2 = nn.Linear(d_ff, d_model, bias=bias2)
        self.dropout = nn.Dropout(dropout)
        self.activation = activation
        self.is_gated = is_gated
        if is_gated:
            self.linear_v = nn.Linear(d_model, d_ff, bias=bias_gate)

    def forward(self, x):
        g = self.activation(self.layer1(x))
        if self.is_gated:
            x = g * self.linear_v(x)
        else:
            x = g
        x = self.dropout(x)
        return self.layer2(x)


def _clone_module_list(module, n):
    """labml ``clone_module_list``: n deep copies of one module."""
    return nn.ModuleList([copy.deepcopy(module) for _ in range(n)])


class LabmlSwitchFeedForward(nn.Module):
    """labml ``SwitchFeedForward``: x (seq, batch, d) viewed to (T, d); ``nn.Softmax`` of the
    ``switch`` Linear (with bias); top-1 by ``torch.max(route_prob, dim=-1)``; per expert
    ``torch.eq(routes, i).nonzero(as_tuple=True)[0]``; ``x.new_zeros``; host capacity
    ``int(cf * len(x) / E)``; ``counts = x.new_tensor([len(idx_i) ...])`` (host lengths of
    data-dependent index lists); with ``drop_tokens``: per expert over capacity, the index list is
    permuted, the tail collected as dropped and the head kept; experts on ``x[idx_i, :]``;
    ``final_output[idx_i, :] = out_i``; dropped tokens passed through ``final_output[dropped, :] =
    x[dropped, :]``; scaled by ``route_prob_max`` (``is_scale_prob``) or by ``p / p.detach()``;
    ``view(seq, batch, d)``; returns (output, counts, route_prob.sum(0), len(dropped),
    route_prob_max).
    Deviation: the shuffle before dropping, ``torch.randperm(len(idx))``, is the identity
    permutation ``torch.arange(len(idx))`` (compiled vs eager must draw the same tokens to drop):
    the tokens over capacity are the last ones in token order instead of random ones."""

    def __init__(self, *, capacity_factor, drop_tokens, is_scale_prob, n_experts, expert, d_model):
        super().__init__()
        self.capacity_factor = capacity_factor
        self.is_scale_prob = is_scale_prob
        self.n_experts = n_experts
        self.drop_tokens = drop_tokens
        self.experts = _clone_module_list(expert, n_experts)
        self.switch = nn.Linear(d_model, n_experts)
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, x):
        seq_len, batch_size, d_model = x.shape
        x = x.view(-1, d_model)
        route_prob = self.softmax(self.switch(x))
        route_prob_max, routes = torch.max(route_prob, dim=-1)
        indexes_list = [torch.eq(routes, i).nonzero(as_tuple=True)[0] for i in range(self.n_experts)]
        final_output = x.new_zeros(x.shape)
        capacity = int(self.capacity_factor * len(x) / self.n_experts)
        counts = x.new_tensor([len(indexes_list[i]) for i in range(self.n_experts)])
        dropped = []
        if self.drop_tokens:
            for i in range(self.n_experts):
                if len(indexes_list[i]) <= capacity:
                    continue
                # deviation: torch.randperm(len(...)) in the source (a random shuffle before dropping)
                indexes_list[i] = indexes_list[i][torch.arange(len(indexes_list[i]))]
                dropped.append(indexes_list[i][capacity:])
                indexes_list[i] = indexes_list[i][:capacity]
        expert_output = [self.experts[i](x[indexes_list[i], :]) for i in range(self.n_experts)]
        for i in range(self.n_experts):
            final_output[indexes_list[i], :] = expert_output[i]
        if dropped:
            dropped = torch.cat(dropped)
            final_output[dropped, :] = x[dropped, :]
        if self.is_scale_prob:
            final_output = final_output * route_prob_max.view(-1, 1)
        else:
            final_output = final_output * (route_prob_max / route_prob_max.detach()).view(-1, 1)
        final_output = final_output.view(seq_len, batch_size, d_model)
        return final_output, counts, route_prob.sum(0), len(dropped), route_prob_max


class LabmlSwitchOutput(nn.Module):
    """Catalogue wrapper (not in the source): calls ``SwitchFeedForward`` unchanged and keeps its
    extra results as attributes, with the load-balancing loss the experiment's ``step`` computes
    from them (``total = counts.sum(-1, keepdims=True)``, ``route_frac = counts / total``,
    ``route_prob / total``, ``n_experts * (route_frac * route_prob).sum()``); returns the output."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        out, counts, route_prob, n_dropped, route_prob_max = self.inner(x)
        self.counts, self.route_prob_sum, self.n_dropped, self.route_prob_max = counts, route_prob, n_dropped, route_prob_max
        total = counts.sum(dim=-1, keepdims=True)
        route_frac = counts / total
        route_prob = route_prob / total
        self.load_balancing_loss = self.inner.n_experts * (route_frac * route_prob).sum()
        return out


def _switch(capacity_factor, drop_tokens, is_scale_prob):
    def build():
        # the experiment's expert: FeedForward(d_model, d_ff, dropout) with Configs.dropout = 0.0
        ffn = LabmlSwitchFeedForward(capacity_factor=capacity_factor, drop_tokens=drop_tokens,
                                     is_scale_prob=is_scale_prob, n_experts=E,
                                     expert=LabmlFeedForward(D, N, dropout=0.0), d_model=D)
        # deviation (test only): clone_module_list gives E identical copies at init, which training makes
        # different; identical experts would hide a token sent to the wrong expert, so each copy is re-drawn
        for expert in ffn.experts:
            expert.layer1.reset_parameters()
            expert.layer2.reset_parameters()
        return LabmlSwitchOutput(ffn)
    return build


_x3d = tokens(lambda T: (1, T, D))  # [seq_len, batch_size, d_model] = (1, T, d): viewed to (T, d) first thing

# labml_switch_drop: Dynamo would split the forward at `if len(indexes_list[i]) <= capacity` (data-dependent
# branching on a nonzero's length); the loop capture removes that skip (moe_inductor/dynamo/drop_lists.py: for an expert
# under capacity the statements change nothing observable), so the block is one graph: kept rows
# `nonzero(...)[0][arange][:capacity]` (dispatch capacity_rows), assigned into new_zeros, the dropped rows'
# pass-through `final_output[dropped, :] = x[dropped, :]` left as graph code on the fused result.
_SRC = "labmlai/annotated_deep_learning_paper_implementations labml_nn/transformers/switch/__init__.py SwitchFeedForward"
ENTRIES = [
    Idiom("labml_switch_default", _SRC + " (experiment Configs defaults: capacity_factor 1.0, drop_tokens False, "
          "is_scale_prob True; ReLU FeedForward experts with biases)",
          seeded(320, _switch(1.0, False, True)), _x3d, expect=1, faithful=True,
          note="top-1 by torch.max, nonzero index lists, x.new_tensor of their host lengths (counts), route_prob.sum(0), "
               "the router's bias, index-put assignment into new_zeros, scaling after the combine"),
    Idiom("labml_switch_drop", _SRC + " (experiment main: capacity_factor 1.2, drop_tokens True, is_scale_prob True)",
          seeded(321, _switch(1.2, True, True)), _x3d, expect=1, faithful=True,
          fullgraph=False,  # `if len(idx) <= capacity`: data-dependent branching
          note="host capacity int(cf * T / E), data-dependent `len(idx) <= capacity` per expert, dropped tokens passed "
               "through by final_output[dropped, :] = x[dropped, :] and then scaled by their max probability"),
    Idiom("labml_switch_unscaled", _SRC + " (is_scale_prob False: outputs times p / p.detach(); no dropping)",
          seeded(322, _switch(1.0, False, False)), _x3d, expect=1, faithful=True,
          note="the p / p.detach() factor (value 1, gradient to the router) instead of the probability"),
]
