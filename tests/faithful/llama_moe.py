"""LLaMA-MoE's MoE MLP (``LinearGLUMoELayer`` with ``TopKBalancedNoisyGate`` and
``UniversalCalculator``), re-implemented op for op at a tiny size.

Read: github pjlab-sys4nlp/llama-moe at commit b17aff436cce58e2fcd7327789c7fadafe15d19e (2024-06-25):
``smoe/modules/moe/moe_layers.py`` (``MoEMlpOutput``, ``BaseMoELayer._create_gate`` /
``_create_calculator`` / ``forward``, ``LinearGLUMoELayer``), ``smoe/modules/moe/moe_gates.py``
(``get_gate_network``, ``TopKBalancedNoisyGate.forward`` / ``cv_squared``),
``smoe/modules/moe/moe_calculators.py`` (``CalculatorOutput``, ``UniversalCalculator.forward``),
``smoe/modules/moe/moe_experts.py`` (``LinearGLUExperts``), and how
``smoe/models/llama_moe/modeling_llama_moe.py`` ``LlamaMoEDecoderLayer`` builds the layer
(``bias=False``, the config's gate / calculator options; ``configuration_llama_moe.py`` defaults:
``gate_network="mlp"``, softmax on, balance loss weight 1e-2, ``gate_add_noise=True``, noise epsilon
1e-2, ``multiply_gate_scores=True``, ``score_scale_factor=1.0``, ``add_weight_norm=False``).

Router noise: ``TopKBalancedNoisyGate`` adds ``randn_like(logits) * (softplus(W_noise x) + eps)`` in
training when ``add_noise``. The eval entry runs the default configuration in eval mode (no noise:
the source's own eval path, the noise projection unused); the train entry sets the config's
``gate_add_noise=False`` (the source's training path without noise: load counted by
``(scores > 0).sum(0)`` and a one-time ``warnings.warn`` with ``self.warned = True``). No line is
changed for either. ``MoEMlpOutput`` / ``CalculatorOutput`` are transformers ``ModelOutput``
dataclasses in the source; plain dataclasses here (the catalogue imports only torch).
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributions.normal import Normal

from idiom_catalogue import D, E, K, N, Idiom, seeded, tokens


@dataclasses.dataclass
class MoEMlpOutput:  # transformers ModelOutput in the source
    hidden_states: Optional[torch.Tensor] = None
    balance_loss: Optional[torch.Tensor] = None
    num_dropped_tokens: Optional[int] = None
    gate_load: Optional[list] = None
    gate_importance: Optional[list] = None


@dataclasses.dataclass
class CalculatorOutput:  # transformers ModelOutput in the source
    hidden_states: Optional[torch.Tensor] = None
    num_dropped_tokens: Optional[int] = None


def get_gate_network(gate_type, input_size, num_experts):
    """``moe_gates.get_gate_network``: "linear" (zero-initialised) or "mlp"
    (Linear(d, E) -> Tanh -> Linear(E, E), no biases)."""
    gate_type = gate_type.lower()
    if gate_type == "linear":
        gate_network = nn.Linear(input_size, num_experts, bias=False)
        nn.init.zeros_(gate_network.weight)
    elif gate_type == "mlp":
        gate_network = nn.Sequential(nn.Linear(input_size, num_experts, bias=False), nn.Tanh(),
                                     nn.Linear(num_experts, num_experts, bias=False))
    else:
        raise ValueError(f'Expected "gate_type" in ("linear", "mlp"), got {gate_type}.')
    return gate_network


class TopKBalancedNoisyGate(nn.Module):
    """``moe_gates.TopKBalancedNoisyGate``: gate network logits (+ noise in training if
    ``add_noise``), ``topk(min(k + 1, E))`` sliced to k, ``nn.Softmax(1)`` of the top-k logits in fp32
    cast back to the logits' dtype, ``zeros_like(logits, requires_grad=True).scatter(1, idx, scores)``,
    importance = column sums, load (noise-aware normal-CDF estimate in noisy training, else the count
    of nonzero scores), ``cv_squared`` balance loss scaled in place (``*=``); returns a dict."""

    def __init__(self, input_size, num_experts, num_selects, gate_network="mlp", use_softmax=True,
                 use_balance=True, balance_loss_weight=1e-2, add_noise=True, noise_epsilon=1e-2):
        super().__init__()
        assert num_selects <= num_experts
        self.input_size = input_size
        self.num_experts = num_experts
        self.num_selects = num_selects
        self.gate_network_type = gate_network
        self.gate_network = get_gate_network(gate_network, input_size, num_experts)
        self.use_softmax = use_softmax
        self.softmax = nn.Softmax(1)
        self.use_balance = use_balance
        self.balance_loss_weight = balance_loss_weight
        self.add_noise = add_noise
        self.noise_epsilon = noise_epsilon
        self.warned = False
        if self.add_noise:
            self.weight_noise = nn.Linear(input_size, num_experts, bias=False)
            self.weight_noise.weight.data = torch.zeros((num_experts, input_size), requires_grad=True,
                                                        device=self.weight_noise.weight.data.device,
                                                        dtype=self.weight_noise.weight.data.dtype)
            self.mean = 0.0
            self.std = 1.0
            self.normal = Normal(self.mean, self.std)
            self.softplus = nn.Softplus()
        self.reset_parameters()

    def reset_parameters(self):
        if self.add_noise:
            nn.init.zeros_(self.weight_noise.weight)

    def cv_squared(self, x, eps=1e-10):
        # squared coefficient of variation; a host check of the length first
        if x.shape[0] == 1:
            return torch.tensor(0.0, device=x.device)
        return x.float().var() / (x.float().mean() ** 2 + eps)

    def forward(self, x):
        logits_gate = self.gate_network(x)
        if self.training and self.add_noise:
            # router noise: not taken by either entry (eval mode, or gate_add_noise=False)
            noise_mm = self.weight_noise(x)
            noise_control = self.softplus(noise_mm) + self.noise_epsilon
            logits_noise = torch.randn_like(logits_gate) * noise_control
            logits = logits_gate + logits_noise
        else:
            logits = logits_gate

        top_logits, top_indices = logits.topk(min(self.num_selects + 1, self.num_experts), dim=1)
        top_k_logits = top_logits[:, :self.num_selects]
        top_k_indices = top_indices[:, :self.num_selects]
        top_k_scores = self.softmax(top_k_logits.to(torch.float32)) if self.use_softmax else top_k_logits
        top_k_scores = top_k_scores.to(logits.dtype)

        zeros = torch.zeros_like(logits, requires_grad=True, device=logits.device)
        scores_filtered = zeros.scatter(dim=1, index=top_k_indices, src=top_k_scores)
        importance = scores_filtered.sum(0)

        if self.training:
            if self.add_noise and self.num_selects != self.num_experts:
                batch_size = top_logits.size(0)
                m = top_logits.size(1)
                top_values_flat = top_logits.flatten()
                threshold_positions_if_in = torch.arange(batch_size, device=x.device) * m + self.num_selects
                threshold_if_in = torch.unsqueeze(torch.gather(top_values_flat, 0, threshold_positions_if_in), 1)
                is_in = torch.gt(logits_noise, threshold_if_in)
                threshold_positions_if_out = threshold_positions_if_in - 1
                threshold_if_out = torch.unsqueeze(torch.gather(top_values_flat, 0, threshold_positions_if_out), 1)
                prob_if_in = self.normal.cdf((logits_gate - threshold_if_in) / noise_control)
                prob_if_out = self.normal.cdf((logits_gate - threshold_if_out) / noise_control)
                prob = torch.where(is_in, prob_if_in, prob_if_out)
                load = prob.sum(0)
            else:
                load = (scores_filtered > 0).sum(0)
                if not self.add_noise and not self.warned:
                    warnings.warn('Gradient-trackable implementation for load calculation is only available when '
                                  '"add_noise=True". Training without noise will block the gradient from "load" '
                                  'path and lead to inconsistency in optimization objectives.')
                    self.warned = True
        else:
            load = (scores_filtered > 0).sum(0)

        if self.use_balance:
            balance_loss = self.cv_squared(importance) + self.cv_squared(load)
            balance_loss *= self.balance_loss_weight
        else:
            balance_loss = torch.tensor(-100.0, device=x.device)

        return {"topK_indices": top_k_indices, "topK_scores": top_k_scores, "balance_loss": balance_loss,
                "load": load, "importance": importance}


class LinearGLUExperts(nn.Module):
    """``moe_experts.LinearGLUExperts``: per-expert ``nn.ParameterList`` weights (gate, up: (n_i, d);
    down: (d, n_i)), expert widths ``hidden_features // num_experts``, kaiming-uniform init;
    ``forward(input, i)`` = ``F.linear(act(F.linear(x, Wg[i])) * F.linear(x, Wu[i]), Wd[i])`` (biases
    from ParameterLists when ``bias``)."""

    def __init__(self, in_features, hidden_features, out_features, hidden_act, num_experts, size_experts=None,
                 bias=True, device=None, dtype=None):
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.in_features = in_features
        self.hidden_features = hidden_features
        self.out_features = out_features
        self.hidden_act = hidden_act
        self.num_experts = num_experts
        if size_experts is None:
            assert hidden_features % num_experts == 0
            size_per_expert = hidden_features // num_experts
            size_experts = [size_per_expert for _ in range(num_experts)]
        else:
            assert len(size_experts) == num_experts and sum(size_experts) == hidden_features
        self.size_experts = size_experts
        self.act_fn = {"silu": nn.SiLU()}[hidden_act]  # transformers ACT2FN["silu"]
        self.weight_gate = nn.ParameterList()
        self.weight_up = nn.ParameterList()
        self.weight_down = nn.ParameterList()
        for i in range(num_experts):
            self.weight_gate.append(nn.Parameter(torch.empty((size_experts[i], in_features), **factory_kwargs)))
            self.weight_up.append(nn.Parameter(torch.empty((size_experts[i], in_features), **factory_kwargs)))
            self.weight_down.append(nn.Parameter(torch.empty((out_features, size_experts[i]), **factory_kwargs)))
        if bias:
            self.bias_gate = nn.ParameterList()
            self.bias_up = nn.ParameterList()
            self.bias_down = nn.ParameterList()
            for i in range(num_experts):
                self.bias_gate.append(nn.Parameter(torch.empty((size_experts[i],), **factory_kwargs)))
                self.bias_up.append(nn.Parameter(torch.empty((size_experts[i],), **factory_kwargs)))
                self.bias_down.append(nn.Parameter(torch.empty((out_features,), **factory_kwargs)))
        else:
            self.register_parameter("bias_gate", None)
            self.register_parameter("bias_up", None)
            self.register_parameter("bias_down", None)
        self.reset_parameters()

    def reset_parameters(self):
        for i in range(self.num_experts):
            nn.init.kaiming_uniform_(self.weight_gate[i], a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.weight_up[i], a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.weight_down[i], a=math.sqrt(5))
            if self.bias_gate is not None:
                fan_in, _ = nn.init._calculate_fan_in_and_fan_out(self.weight_gate[i])
                bound = 1 / math.sqrt(fan_in)
                nn.init.uniform_(self.bias_gate[i], -bound, bound)
            if self.bias_up is not None:
                fan_in, _ = nn.init._calculate_fan_in_and_fan_out(self.weight_up[i])
                bound = 1 / math.sqrt(fan_in)
                nn.init.uniform_(self.bias_up[i], -bound, bound)
            if self.bias_down is not None:
                fan_in, _ = nn.init._calculate_fan_in_and_fan_out(self.weight_down[i])
                bound = 1 / math.sqrt(fan_in)
                nn.init.uniform_(self.bias_down[i], -bound, bound)

    def forward(self, input, i):
        gate = self.act_fn(F.linear(input, self.weight_gate[i], self.bias_gate[i] if self.bias_gate is not None else None))
        up = F.linear(input, self.weight_up[i], self.bias_up[i] if self.bias_up is not None else None)
        down = F.linear(gate * up, self.weight_down[i], self.bias_down[i] if self.bias_down is not None else None)
        return down


class UniversalCalculator(nn.Module):
    """``moe_calculators.UniversalCalculator.forward``: flatten the (T, k) ids and scores, token ids
    ``arange(T).repeat_interleave(k)``, ``sort(0)`` of the ids, ``index_select`` of scores and token ids
    in that order, per-expert counts ``bincount(minlength=E).tolist()`` (a host copy), ``index_select``
    of the rows, ``torch.split`` by the counts, a list comprehension over experts with a non-empty
    batch (``split_x[i].shape[0] > 0``), ``cat``, ``mul`` by the scores times ``score_scale_factor``,
    ``zeros((T, d)).index_add(0, token ids, ...)``. ``add_weight_norm`` off (config default)."""

    def __init__(self, experts, multiply_gate_scores=True, score_scale_factor=1.0, add_weight_norm=False):
        super().__init__()
        self.experts = experts
        self.multiply_gate_scores = multiply_gate_scores
        self.score_scale_factor = score_scale_factor
        self.num_experts = experts.num_experts
        self.mlp_norm = None
        assert not (multiply_gate_scores and add_weight_norm)  # WeightNorm branch: add_weight_norm=False (config default)

    def reset_experts(self):
        self.experts.reset_parameters()

    def forward(self, x, topK_indices, topK_scores, expert_batch_size=None, **kwargs):
        batch_size = topK_indices.size(0)
        num_selects = topK_indices.size(1)
        topK_indices = topK_indices.flatten()
        topK_scores = topK_scores.flatten()
        batch_indices = torch.arange(batch_size, device=topK_scores.device).repeat_interleave(num_selects)

        _, index_sorted_topK_indices = topK_indices.sort(0)

        sorted_topK_scores = topK_scores.index_select(0, index_sorted_topK_indices)
        sorted_batch_indices = batch_indices.index_select(0, index_sorted_topK_indices)

        if expert_batch_size is None:
            expert_batch_size = topK_indices.bincount(minlength=self.num_experts).tolist()

        sorted_x = x.index_select(0, sorted_batch_indices)
        split_x = torch.split(sorted_x, expert_batch_size, dim=0)

        expert_outputs = [self.experts(split_x[i], i) for i in range(self.num_experts) if split_x[i].shape[0] > 0]

        cat_expert_outputs = torch.cat(expert_outputs, 0)
        output_dim = cat_expert_outputs.size(1)
        if self.multiply_gate_scores:
            if self.mlp_norm is None:
                cat_expert_outputs = torch.mul(cat_expert_outputs,
                                               sorted_topK_scores.reshape(-1, 1) * self.score_scale_factor)
            else:
                cat_expert_outputs = torch.mul(cat_expert_outputs, sorted_topK_scores.reshape(-1, 1))
                cat_expert_outputs = self.mlp_norm(cat_expert_outputs)

        zeros = torch.zeros((batch_size, output_dim), device=cat_expert_outputs.device, dtype=cat_expert_outputs.dtype)
        y = zeros.index_add(0, sorted_batch_indices, cat_expert_outputs)
        return CalculatorOutput(hidden_states=y, num_dropped_tokens=torch.tensor(-1.0))


class LinearGLUMoELayer(nn.Module):
    """``moe_layers.LinearGLUMoELayer`` (``BaseMoELayer.forward``): reshape to (-1, d), the gate's dict
    passed to the calculator as keyword arguments, reshape back, ``MoEMlpOutput`` with the balance
    loss, ``num_dropped_tokens`` and the gate's load / importance (``dict.get`` with a
    ``torch.tensor(-1)`` default). Only the gate / calculator kinds the model uses by default are
    built (``TopKBalancedNoisyGate``, ``UniversalCalculator``)."""

    def __init__(self, input_size, hidden_size, output_size, hidden_act, num_experts, num_selects,
                 size_experts=None, bias=True, **kwargs):
        super().__init__()
        assert num_selects <= num_experts
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.output_size = output_size
        self.hidden_act = hidden_act
        self.num_experts = num_experts
        self.num_selects = num_selects
        self.size_experts = size_experts
        self.bias = bias
        experts = LinearGLUExperts(input_size, hidden_size, output_size, hidden_act, num_experts,
                                   size_experts=size_experts, bias=bias)
        self._create_gate(**kwargs)
        self._create_calculator(experts, **kwargs)

    def _create_gate(self, **kwargs):
        self.gate_type = kwargs.get("gate_type", "TopKBalancedNoisyGate")
        assert self.gate_type == "TopKBalancedNoisyGate"  # the model's default; the other gates are not built here
        self.gate = TopKBalancedNoisyGate(
            self.input_size, self.num_experts, self.num_selects,
            gate_network=kwargs.get("gate_network", "mlp"), use_softmax=kwargs.get("gate_use_softmax", True),
            use_balance=kwargs.get("gate_use_balance", True),
            balance_loss_weight=kwargs.get("gate_balance_loss_weight", 1e-2),
            add_noise=kwargs.get("gate_add_noise", True), noise_epsilon=kwargs.get("gate_noise_epsilon", 1e-2))

    def _create_calculator(self, experts, **kwargs):
        self.calculator_type = kwargs.get("calculator_type", "UniversalCalculator")
        assert self.calculator_type == "UniversalCalculator"  # the model's default
        self.calculator = UniversalCalculator(
            experts, multiply_gate_scores=kwargs.get("multiply_gate_scores", True),
            score_scale_factor=kwargs.get("score_scale_factor", 1.0),
            add_weight_norm=kwargs.get("add_weight_norm", False))

    def forward(self, x) -> MoEMlpOutput:
        original_shape = x.shape[:-1]
        x = x.reshape(-1, self.input_size)
        gate_outputs: dict = self.gate(x)
        calc_outs: CalculatorOutput = self.calculator(x, **gate_outputs)
        y = calc_outs.hidden_states
        y = y.reshape(original_shape + (self.output_size,))
        return MoEMlpOutput(hidden_states=y, balance_loss=gate_outputs.get("balance_loss"),
                            num_dropped_tokens=calc_outs.num_dropped_tokens,
                            gate_load=gate_outputs.get("load", torch.tensor(-1)),
                            gate_importance=gate_outputs.get("importance", torch.tensor(-1)))


class LlamaMoEMlpOutput(nn.Module):
    """Catalogue wrapper (not in the source): as ``LlamaMoEDecoderLayer`` reads ``mlp_outs``, keeps
    the ``MoEMlpOutput`` as ``self.mlp_outs`` (balance loss, load, importance) and returns
    ``hidden_states``."""

    def __init__(self, mlp):
        super().__init__()
        self.mlp = mlp

    def forward(self, x):
        mlp_outs = self.mlp(x)
        self.mlp_outs = mlp_outs
        return mlp_outs.hidden_states


def _build(**config):
    # LlamaMoEDecoderLayer: intermediate_size is the total over experts (E * n), bias=False, silu
    return LlamaMoEMlpOutput(LinearGLUMoELayer(input_size=D, hidden_size=E * N, output_size=D, hidden_act="silu",
                                               num_experts=E, num_selects=K, size_experts=None, bias=False,
                                               gate_type="TopKBalancedNoisyGate", gate_network="mlp",
                                               gate_use_softmax=True, gate_use_balance=True,
                                               gate_balance_loss_weight=1e-2, gate_noise_epsilon=1e-2,
                                               calculator_type="UniversalCalculator", multiply_gate_scores=True,
                                               score_scale_factor=1.0, add_weight_norm=False, **config))


_x3d = tokens(lambda T: (1, T, D))
_SRC = ("pjlab-sys4nlp/llama-moe smoe/modules/moe/moe_layers.py LinearGLUMoELayer, moe_gates.py "
        "TopKBalancedNoisyGate (mlp gate network), moe_calculators.py UniversalCalculator, moe_experts.py "
        "LinearGLUExperts")

ENTRIES = [
    Idiom("llama_moe_eval", _SRC + ", default config in eval mode (no router noise)",
          seeded(370, lambda: _build(gate_add_noise=True).eval()), _x3d, expect=1, faithful=True,
          fullgraph=False,  # (one graph under sonic: moe_inductor/dynamo/shape_items.py, grad_leaves.py)
          other_gemms=2,  # the mlp gate network: Linear(d, E) -> Tanh -> Linear(E, E)
          note="tanh MLP gate network, topk(k+1) sliced to k, fp32 softmax cast back, zeros_like(requires_grad=True)"
               ".scatter importance, cv_squared balance loss with a host length check and in-place *=, "
               "sort + index_select, bincount().tolist() split, non-empty-expert list comprehension over "
               "ParameterList experts, score_scale_factor multiply, zeros.index_add, MoEMlpOutput kept"),
    Idiom("llama_moe_train_nonoise", _SRC + ", training mode with gate_add_noise=False",
          seeded(371, lambda: _build(gate_add_noise=False)), _x3d, expect=1, faithful=True,
          fullgraph=False,  # (one graph under sonic: moe_inductor/dynamo/shape_items.py, grad_leaves.py)
          other_gemms=2,  # the mlp gate network
          note="as llama_moe_eval in training mode: load by (scores > 0).sum(0) with the one-time warnings.warn "
               "and self.warned = True attribute store in forward"),
]
