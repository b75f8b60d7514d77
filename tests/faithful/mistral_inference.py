"""mistral-inference ``MoeLayer`` (github mistralai/mistral-inference, ``src/mistral_inference/moe.py``,
with ``FeedForward`` and ``maybe_lora`` from ``src/mistral_inference/transformer_layers.py`` and
``LoRALinear`` from ``src/mistral_inference/lora.py``), read at commit
2557e12d0e1878a1562ece30434820f80aa3e12a (2026-02-26).

``TransformerBlock`` builds the layer as ``MoeLayer(experts=[FeedForward(dim, hidden_dim, lora)
...], gate=nn.Linear(dim, num_experts, bias=False), moe_args=MoeArgs(...))`` and calls it on the
flattened (num_tokens, dim) activations (mistral-inference packs the sequences of a batch into
one token axis), so the entries feed (T, D).
"""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from idiom_catalogue import D, E, K, N, Idiom, seeded, tokens


@dataclasses.dataclass
class MoeArgs:  # deviation: the source derives from simple_parsing's Serializable (config I/O only)
    num_experts: int
    num_experts_per_tok: int


@dataclasses.dataclass
class LoraArgs:  # deviation: the source derives from simple_parsing's Serializable (config I/O only)
    rank: int
    scaling: float


class LoRALinear(nn.Module):
    """mistral-inference ``lora.py`` ``LoRALinear`` (forward only; its state-dict loading hooks are
    not part of the forward and are left out): ``linear(x) + lora_B(lora_A(x)) * scaling``."""

    def __init__(self, in_features: int, out_features: int, rank: int, scaling: float, bias: bool = False):
        super().__init__()
        assert not bias
        self.in_features, self.out_features = in_features, out_features
        self.bias, self.rank, self.scaling = bias, rank, scaling
        self.lora_A = nn.Linear(in_features, rank, bias=bias)
        self.lora_B = nn.Linear(rank, out_features, bias=bias)
        self.linear = nn.Linear(in_features, out_features, bias=bias)

    def forward(self, x):
        low_rank = self.lora_B(self.lora_A(x))
        return self.linear(x) + low_rank * self.scaling


def maybe_lora(lora_args: Optional[LoraArgs]):
    """``transformer_layers.maybe_lora``: plain ``nn.Linear`` or a ``LoRALinear`` partial."""
    if lora_args is None:
        return nn.Linear
    return partial(LoRALinear, rank=lora_args.rank, scaling=lora_args.scaling)


class FeedForward(nn.Module):
    """``transformer_layers.FeedForward``: ``w2(silu(w1 x) * w3 x)``, each projection a
    ``maybe_lora`` linear without bias."""

    def __init__(self, dim: int, hidden_dim: int, lora: Optional[LoraArgs] = None):
        super().__init__()
        Lin = maybe_lora(lora)
        self.w1 = Lin(dim, hidden_dim, bias=False)
        self.w2 = Lin(hidden_dim, dim, bias=False)
        self.w3 = Lin(dim, hidden_dim, bias=False)

    def forward(self, x):
        return self.w2(nn.functional.silu(self.w1(x)) * self.w3(x))


class MoeLayer(nn.Module):
    """mistral-inference ``moe.py`` ``MoeLayer.forward``, op for op: gate logits, ``torch.topk`` on the
    logits (no softmax before), softmax over the K picked logits in fp32 (``dtype=torch.float``)
    cast back to the input dtype, ``zeros_like`` accumulator, ``enumerate(self.experts)`` loop with
    ``torch.where(selected == i)`` giving (token, slot) pairs and the indexed in-place
    ``results[batch_idx] += w[batch_idx, nth, None] * expert(x[batch_idx])``. No deviation besides
    tiny sizes."""

    def __init__(self, experts: List[nn.Module], gate: nn.Module, moe_args: MoeArgs):
        super().__init__()
        assert len(experts) > 0
        self.experts = nn.ModuleList(experts)
        self.gate = gate
        self.args = moe_args

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        gate_logits = self.gate(inputs)
        weights, selected_experts = torch.topk(gate_logits, self.args.num_experts_per_tok)
        weights = F.softmax(weights, dim=1, dtype=torch.float).to(inputs.dtype)
        results = torch.zeros_like(inputs)
        for i, expert in enumerate(self.experts):
            batch_idx, nth_expert = torch.where(selected_experts == i)
            results[batch_idx] += weights[batch_idx, nth_expert, None] * expert(inputs[batch_idx])
        return results


def build_moe_layer(lora: Optional[LoraArgs] = None, dtype: torch.dtype = torch.float32) -> MoeLayer:
    """As ``TransformerBlock.__init__`` builds it (tiny sizes); ``dtype``: the model's dtype
    (mistral-inference loads the weights in bf16 by default)."""
    moe = MoeArgs(num_experts=E, num_experts_per_tok=K)
    layer = MoeLayer(experts=[FeedForward(dim=D, hidden_dim=N, lora=lora) for _ in range(moe.num_experts)],
                     gate=nn.Linear(D, moe.num_experts, bias=False), moe_args=moe)
    return layer.to(dtype)


_SOURCE = ("mistral-inference src/mistral_inference/moe.py MoeLayer + transformer_layers.py FeedForward/"
           "maybe_lora + lora.py LoRALinear @2557e12")

ENTRIES = [
    Idiom("mistral_inference_moe", _SOURCE, seeded(141, build_moe_layer), tokens(), expect=1, faithful=True,
          note="the top-k on raw logits then softmax(dtype=float).to(dtype) over the K picks, the "
               "enumerate(experts) loop with torch.where(selected == i) and the indexed in-place '+='"),
    Idiom("mistral_inference_moe_lora", _SOURCE + " (experts built with lora=LoraArgs(rank=2, scaling=2.0))",
          seeded(142, lambda: build_moe_layer(lora=LoraArgs(rank=2, scaling=2.0))), tokens(),
          expect=1, faithful=True,
          other_gemms=1 + 3 * E,  # the router's, and per expert projection the merge W + s * (B @ A) (weight-sized)
          note="LoRALinear experts (TransformerBlock passes lora to every expert FeedForward): each expert "
               "projection is linear(x) + lora_B(lora_A(x)) * scaling"),
    Idiom("mistral_inference_moe_bf16", _SOURCE + " (bf16 weights and activations, as the model is loaded)",
          seeded(143, lambda: build_moe_layer(dtype=torch.bfloat16)), tokens(dtype=torch.bfloat16),
          expect=1, faithful=True, dtype=torch.bfloat16, tol=2e-2,
          note="bf16 model: the softmax of the K picked logits in fp32 and its cast back to bf16, "
               "bf16 expert GEMMs and the bf16 indexed '+='"),
]
