"""fairscale ``MOELayer`` + ``Top2Gate`` (github facebookresearch/fairscale,
``fairscale/nn/moe/moe_layer.py`` (``_AllToAll``, ``MOELayer``) and ``fairscale/nn/moe/top2gate.py``
(``one_hot``, ``top2gating``, ``Top2Gate``)), read at commit 146f160241651e1211c4247979f159a4ef43b54a
(2025-04-26). The experts are the ``FeedForwardLayer`` of ``benchmarks/models/transformer_lm.py``
(the only place in the repository that builds an ``MOELayer`` with a real expert): a
``nn.ModuleList`` of E of them, all local (world size 1).

Shapes: ``MOELayer.forward`` asserts a 3-D input whose first dimension is a multiple of the number
of local experts, and ``top2gating`` asserts that the token count is a multiple of E (capacity =
2S/E). The catalogue's (T, D) / (1, T, D) inputs break both at T=5, so the entry feeds (E, T, D), as
fairscale's own ``forward_multi`` test feeds (4 * num_local_experts, 16, model_dim); the module
still maps x to x's shape.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from idiom_catalogue import D, E, N, Idiom, seeded, tokens


class _AllToAll(torch.autograd.Function):
    """``moe_layer._AllToAll``: contiguous input, ``empty_like`` output filled by
    ``dist.all_to_all_single``; the backward is the same exchange. At world size 1 the exchange
    copies the input into the output: that copy stands for it here."""

    @staticmethod
    def forward(ctx: Any, group, input: torch.Tensor) -> torch.Tensor:
        ctx.group = group
        input = input.contiguous()
        output = torch.empty_like(input)
        output.copy_(input)  # deviation: dist.all_to_all_single(output, input, group) at world size 1
        return output

    @staticmethod
    def backward(ctx: Any, *grad_output: torch.Tensor) -> Tuple[None, torch.Tensor]:
        return (None, _AllToAll.apply(ctx.group, *grad_output))


def one_hot(tensor: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``top2gate.one_hot``: the workaround for F.one_hot (zeros of the index dtype, ``scatter_`` of 1)."""
    assert num_classes > 0, "num_classes must be a positive integer"
    ret = torch.zeros(tensor.shape + (num_classes,), device=tensor.device, dtype=tensor.dtype)
    ret.scatter_(-1, tensor.unsqueeze(-1), 1)
    return ret


def top2gating(logits: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``top2gate.top2gating``, op for op (Gumbel noise on the second choice off)."""
    gates = F.softmax(logits, dim=1, dtype=torch.float)  # fp32 softmax, as the source
    num_tokens = gates.shape[0]
    num_experts = gates.shape[1]
    capacity = 2 * num_tokens // num_experts  # 2S/E, a Python int from the shape
    assert num_tokens % num_experts == 0

    indices1_s = torch.argmax(gates, dim=1)
    mask1 = one_hot(indices1_s, num_classes=num_experts)

    # deviation: the source adds gumbel_rsample(logits.shape) noise here (router noise off)
    logits_w_noise = logits
    logits_except1 = logits_w_noise.masked_fill(mask1.bool(), float("-inf"))
    indices2_s = torch.argmax(logits_except1, dim=1)
    mask2 = one_hot(indices2_s, num_classes=num_experts)

    locations1 = torch.cumsum(mask1, dim=0) - 1
    locations2 = torch.cumsum(mask2, dim=0) - 1
    locations2 += torch.sum(mask1, dim=0, keepdim=True)  # in place: second choices queue after every first

    me = torch.mean(gates, dim=0)
    ce = torch.mean(mask1.float(), dim=0)
    l_aux = torch.mean(me * ce)

    mask1 *= torch.lt(locations1, capacity)  # in place: drop what is over capacity
    mask2 *= torch.lt(locations2, capacity)

    locations1_s = torch.sum(locations1 * mask1, dim=1)
    locations2_s = torch.sum(locations2 * mask2, dim=1)

    gates1_s = (gates * mask1).sum(dim=1)
    gates2_s = (gates * mask2).sum(dim=1)
    denom_s = gates1_s + gates2_s
    denom_s = torch.clamp(denom_s, min=torch.finfo(denom_s.dtype).eps)
    gates1_s /= denom_s  # in-place renormalisation, as the source
    gates2_s /= denom_s

    gates1 = gates1_s.unsqueeze(-1) * mask1
    gates2 = gates2_s.unsqueeze(-1) * mask2
    locations1_sc = one_hot(locations1_s, num_classes=capacity)
    locations2_sc = one_hot(locations2_s, num_classes=capacity)
    combine1_sec = gates1.unsqueeze(2) * locations1_sc.unsqueeze(1)
    combine2_sec = gates2.unsqueeze(2) * locations2_sc.unsqueeze(1)
    combine_weights = combine1_sec + combine2_sec
    dispatch_mask = combine_weights.bool()
    return l_aux.to(logits.dtype), combine_weights.to(logits.dtype), dispatch_mask


class Top2Gate(nn.Module):
    """``top2gate.Top2Gate``: ``wg`` (no bias) then ``top2gating`` on the logits."""

    def __init__(self, model_dim: int, num_experts: int) -> None:
        super().__init__()
        self.wg = nn.Linear(model_dim, num_experts, bias=False)

    def forward(self, input: torch.Tensor):
        logits = self.wg(input)
        return top2gating(logits)


class FeedForwardLayer(nn.Module):
    """fairscale ``benchmarks/models/transformer_lm.py`` ``FeedForwardLayer``:
    dropout2(linear2(dropout1(activation(linear1(x))))), biases on, activation ``nn.ReLU()``."""

    def __init__(self, d_model: int, dim_feedforward: int, activation: nn.Module, dropout: float) -> None:
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.activation = activation
        self.dropout1 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout2(self.linear2(self.dropout1(self.activation(self.linear1(x)))))


class MOELayer(nn.Module):
    """``moe_layer.MOELayer.forward`` (GShard algorithm 2), op for op: the shape asserts, reshape to
    (S, d), ``self.l_aux`` stored by the gate call, dispatch einsum ``sec,sm->ecm`` on the float
    mask, ``_AllToAll`` (an ``autograd.Function``), reshape to (world, local experts, C, d),
    ``chunk`` along the local experts and a python loop over ``zip(chunks, self.experts)``,
    ``torch.cat``, ``_AllToAll`` again, reshape, combine einsum ``sec,ecm->sm``, reshape to the
    input's shape. Returns one tensor (``l_aux`` is read as ``moe.l_aux``), so no wrapper."""

    def __init__(self, gate: nn.Module, experts, group: Optional[Any] = None) -> None:
        super().__init__()
        self.gate = gate
        if type(experts) == nn.ModuleList:
            self.experts = experts
        else:
            self.experts = nn.ModuleList([experts])
        self.group = group  # deviation: the source defaults to dist.group.WORLD (no process group here)
        for expert in self.experts:
            for p in experts.parameters():  # (sic: the source iterates ``experts``, not ``expert``)
                p.expert = True
        self.world_size = 1  # deviation: dist.get_world_size(self.group), one process
        self.num_local_experts = len(self.experts)

    def forward(self, *input: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        assert len(input) == 1, "only single input Tensor supported"
        assert len(input[0].shape) == 3, "input Tensor must have dimensions: (s)equence, (t)oken, (m)odel"
        assert input[0].shape[0] % len(self.experts) == 0, "num tokens must be order of number of local experts"

        d_model = input[0].shape[2]
        reshaped_input = input[0].reshape(-1, d_model)
        self.l_aux, combine_weights, dispatch_mask = self.gate(reshaped_input)
        dispatched_input = torch.einsum("sec,sm->ecm", dispatch_mask.float(), reshaped_input)
        dispatched_input = _AllToAll.apply(self.group, dispatched_input)
        dispatched_input = dispatched_input.reshape(self.world_size, self.num_local_experts, -1, d_model)
        chunks = dispatched_input.chunk(self.num_local_experts, dim=1)
        expert_outputs = []
        for chunk, expert in zip(chunks, self.experts):
            expert_outputs += [expert(chunk)]
        expert_output = torch.cat(expert_outputs, dim=1)
        expert_output = _AllToAll.apply(self.group, expert_output)
        expert_output = expert_output.reshape(self.world_size * self.num_local_experts, -1, d_model)
        combined_output = torch.einsum("sec,ecm->sm", combine_weights, expert_output)
        return combined_output.reshape(input[0].shape)


def build_moe(activation=None) -> MOELayer:
    """As ``transformer_lm.TransformerEncoderLayer`` builds it with ``is_moe=True`` at world size 1:
    ``Top2Gate(d_model, E)`` and a ModuleList of E ``FeedForwardLayer``."""
    gate = Top2Gate(D, E)
    experts = nn.ModuleList([
        FeedForwardLayer(D, N, activation if activation is not None else nn.ReLU(),
                         0.0)  # deviation: dropout 0.0 (the benchmark's 0.1 is random in training mode)
        for _ in range(E)])
    return MOELayer(gate, experts)


_SOURCE = ("fairscale fairscale/nn/moe/moe_layer.py MOELayer + _AllToAll, fairscale/nn/moe/top2gate.py "
           "Top2Gate + top2gating + one_hot, experts benchmarks/models/transformer_lm.py FeedForwardLayer")

ENTRIES = [
    Idiom("fairscale_moe_top2", _SOURCE, seeded(171, build_moe), tokens(lambda T: (E, T, D)), expect=1,
          faithful=True, other_gemms=1,
          note="capacity 2S/E from the shape, the zeros+scatter_ one_hot, in-place locations2 += / mask *= / "
               "gates_s /=, self.l_aux stored in forward, the _AllToAll autograd.Function around the experts, "
               "chunk + per-expert loop over ModuleList + cat, biased ReLU FFN experts with Dropout modules"),
]
