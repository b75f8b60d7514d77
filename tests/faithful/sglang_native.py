"""SGLang's torch-native MoE forwards, re-implemented op for op at a tiny size.

Sources read: github sgl-project/sglang,
- ``python/sglang/srt/layers/moe/fused_moe_native.py`` at commit
  163b798100bfb50f94fd857c63776685422f42b3: ``fused_moe_forward_native`` (the gpt-fast spelling:
  ``w13_weight[topk_ids]`` gathered per (token, slot), ``torch.chunk(.., 2, dim=2)``, einsums, the
  activation chosen by ``moe_runner_config.activation``: ``F.silu`` or exact ``F.gelu``, the
  combine einsum with ``topk_weights.to(expert_outs.dtype)``) and ``moe_forward_native`` (the
  DeepSeek-V2 ``moe_infer`` spelling: ``new_zeros`` + ``scatter_`` counts, ``argsort``,
  ``x[idxs // k]``, ``.cpu().numpy()`` host counts, a per-expert loop slicing sorted rows with
  ``if num_tokens == 0: continue``, ``F.linear`` on ``w13_weight[i]`` then ``SiluAndMul()`` /
  ``GeluAndMul()``, ``torch.cat``, ``empty_like`` + ``new_x[idxs] = outs``, the fp32 ``mul_`` /
  ``sum`` combine cast back);
- ``python/sglang/srt/layers/moe/topk.py`` at commit 000328a8cd54dd3aac97cd9977c39b5408034b26:
  ``TopK.forward_native`` -> ``select_experts`` (``torch_native=True``, no grouped top-k, no
  custom routing function) -> ``fused_topk_torch_native`` (softmax scoring, no correction bias:
  the two ``torch.empty`` allocations the source overwrites, ``gating_output.float()`` softmax,
  ``torch.topk``, renormalisation by the sum); ``_post_process_topk_ids`` is a no-op off CUDA
  without fused shared experts and is not re-implemented;
- ``python/sglang/srt/layers/activation.py`` at commit 0099dee6aa65cb084e4b97956dd547519f3d8053:
  ``SiluAndMul.forward_native`` and ``GeluAndMul.forward_native`` (``approximate="tanh"`` by
  default, as ``moe_forward_native`` builds it).

The layer's weights are the stacked ``FusedMoE`` parameters ``w13_weight`` (E, 2n, d) (gate rows
then up rows) and ``w2_weight`` (E, d, n). Deviations: tiny sizes; fp32 weights; a module here
holds the router ``gate`` linear (the models' ``ReplicatedLinear``), the weights, ``num_experts``
and ``moe_runner_config`` and calls the top-k then the forward as ``FusedMoE`` does on the
unquantised native path (no tensor/expert parallel, no dispatcher: ``StandardDispatchOutput`` is
the tuple (x, topk_output)); ``MoeRunnerConfig`` below holds only the two fields read; the
``CustomOp`` dispatch of ``SiluAndMul`` / ``GeluAndMul`` is replaced by their ``forward_native``.
Inputs are (tokens, hidden), as SGLang flattens the batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from idiom_catalogue import D, E, K, N, Idiom, seeded, tokens


class SiluAndMul(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # forward_native
        d = x.shape[-1] // 2
        return F.silu(x[..., :d]) * x[..., d:]


class GeluAndMul(nn.Module):
    def __init__(self, approximate="tanh"):
        super().__init__()
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # forward_native
        d = x.shape[-1] // 2
        return F.gelu(x[..., :d], approximate=self.approximate) * x[..., d:]


@dataclass
class MoeRunnerConfig:
    activation: str = "silu"
    apply_router_weight_on_input: bool = False


class StandardTopKOutput(NamedTuple):
    topk_weights: torch.Tensor
    topk_ids: torch.Tensor
    router_logits: torch.Tensor


def fused_topk_torch_native(hidden_states, gating_output, topk, renormalize, correction_bias=None,
                            scoring_func="softmax"):
    """sglang ``fused_topk_torch_native``, the path without correction bias."""
    def scoring_func_impl(gating_output):
        if scoring_func == "softmax":
            return gating_output.softmax(dim=-1)
        elif scoring_func == "sigmoid":
            return gating_output.sigmoid()
        raise ValueError(f"Invalid scoring function: {scoring_func}")

    assert correction_bias is None, "only the path without correction bias is re-implemented"
    assert hidden_states.shape[0] == gating_output.shape[0]
    M, _ = hidden_states.shape
    topk_weights = torch.empty(M, topk, dtype=torch.float32, device=hidden_states.device)
    topk_ids = torch.empty(M, topk, dtype=torch.int32, device=hidden_states.device)
    topk_weights = scoring_func_impl(gating_output.float())
    topk_weights, topk_ids = torch.topk(topk_weights, topk, dim=-1)
    if renormalize:
        topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
    return topk_weights, topk_ids


def select_experts(hidden_states, router_logits, top_k, renormalize):
    """sglang ``select_experts`` with ``torch_native=True``, no grouped top-k, no custom routing
    function, no fused shared experts (``num_routed_topk == top_k``)."""
    topk_weights, topk_ids = fused_topk_torch_native(hidden_states=hidden_states, gating_output=router_logits,
                                                     topk=top_k, renormalize=renormalize)
    return StandardTopKOutput(topk_weights, topk_ids, router_logits)


def fused_moe_forward_native(layer, dispatch_output):
    x, topk_output = dispatch_output
    moe_runner_config = layer.moe_runner_config
    if moe_runner_config.apply_router_weight_on_input:
        raise NotImplementedError()
    topk_weights, topk_ids, _ = topk_output
    w13_weights = layer.w13_weight[topk_ids]
    w1_weights, w3_weights = torch.chunk(w13_weights, 2, dim=2)
    w2_weights = layer.w2_weight[topk_ids]
    x1 = torch.einsum("ti,taoi -> tao", x, w1_weights)
    if moe_runner_config.activation == "silu":
        x1 = F.silu(x1)
    elif moe_runner_config.activation == "gelu":
        x1 = F.gelu(x1)
    else:
        raise ValueError(f"Unsupported activation: {moe_runner_config.activation=}")
    x3 = torch.einsum("ti, taoi -> tao", x, w3_weights)
    expert_outs = torch.einsum("tao, taio -> tai", (x1 * x3), w2_weights)
    return torch.einsum("tai,ta -> ti", expert_outs, topk_weights.to(expert_outs.dtype))


def moe_forward_native(layer, x, topk_output, moe_runner_config):
    if moe_runner_config.apply_router_weight_on_input:
        raise NotImplementedError()
    topk_weights, topk_ids, _ = topk_output
    len_experts = layer.num_experts
    cnts = topk_ids.new_zeros((topk_ids.shape[0], len_experts))
    cnts.scatter_(1, topk_ids.to(torch.int64), 1)
    tokens_per_expert = cnts.sum(dim=0)
    idxs = topk_ids.view(-1).argsort()
    sorted_tokens = x[idxs // topk_ids.shape[1]]
    tokens_per_expert = tokens_per_expert.cpu().numpy()
    if moe_runner_config.activation == "silu":
        act = SiluAndMul()
    elif moe_runner_config.activation == "gelu":
        act = GeluAndMul()
    else:
        raise ValueError(f"Unsupported activation: {moe_runner_config.activation=}")
    outputs = []
    start_idx = 0
    for i, num_tokens in enumerate(tokens_per_expert):
        end_idx = start_idx + num_tokens
        if num_tokens == 0:
            continue
        tokens_for_this_expert = sorted_tokens[start_idx:end_idx]
        layer_w13_weight = layer.w13_weight[i]
        layer_w2_weight = layer.w2_weight[i]
        gate_up = F.linear(tokens_for_this_expert, layer_w13_weight)
        gate_up = act(gate_up)
        expert_out = F.linear(gate_up, layer_w2_weight)
        outputs.append(expert_out)
        start_idx = end_idx
    outs = torch.cat(outputs, dim=0) if len(outputs) else sorted_tokens.new_empty(0)
    new_x = torch.empty_like(outs)
    new_x[idxs] = outs
    final_out = (
        new_x.view(*topk_ids.shape, -1)
        .type(topk_weights.dtype)
        .mul_(topk_weights.unsqueeze(dim=-1))
        .sum(dim=1)
        .type(new_x.dtype)
    )
    return final_out


class SglangNativeMoE(nn.Module):
    """Router linear + ``TopK.forward_native`` + one of the two native forwards (see the module
    docstring for what stands in for ``FusedMoE``)."""

    def __init__(self, runner: str = "fused", activation: str = "silu", renormalize: bool = True):
        super().__init__()
        self.gate = nn.Linear(D, E, bias=False)
        self.w13_weight = nn.Parameter(torch.randn(E, 2 * N, D) / D ** 0.5)
        self.w2_weight = nn.Parameter(torch.randn(E, D, N) / N ** 0.5)
        self.num_experts, self.top_k, self.renormalize = E, K, renormalize
        self.moe_runner_config = MoeRunnerConfig(activation=activation)
        self.runner = runner

    def forward(self, hidden_states):
        router_logits = self.gate(hidden_states)
        topk_output = select_experts(hidden_states, router_logits, self.top_k, self.renormalize)
        if self.runner == "fused":
            return fused_moe_forward_native(self, (hidden_states, topk_output))
        return moe_forward_native(self, hidden_states, topk_output, self.moe_runner_config)


_FMN = "sgl-project/sglang python/sglang/srt/layers/moe/fused_moe_native.py@163b798"
_TOPK = " + topk.py select_experts/fused_topk_torch_native (softmax, renormalize)"
_FUSED_NOTE = ("fp32 softmax of gating_output.float() after two overwritten torch.empty, topk, renormalise, "
               "w13_weight[topk_ids] gathered (T, K, 2n, d) and torch.chunk'ed along dim 2, three einsums, "
               "combine einsum with topk_weights.to(dtype)")
_LOOP_NOTE = ("new_zeros + scatter_ counts, argsort, x[idxs // k], .cpu().numpy() host counts, per-expert "
              "'if num_tokens == 0: continue' slices of sorted rows, F.linear on w13_weight[i] then a fresh "
              "act-and-mul module, torch.cat, empty_like + new_x[idxs] = outs, .type(fp32).mul_(w).sum(1).type()")

ENTRIES = [
    Idiom("sglang_fused_moe_native_silu", _FMN + " fused_moe_forward_native (activation silu)" + _TOPK,
          seeded(400, lambda: SglangNativeMoE("fused", "silu")), tokens(), expect=1, faithful=True,
          note=_FUSED_NOTE),
    Idiom("sglang_fused_moe_native_gelu", _FMN + " fused_moe_forward_native (activation gelu: exact F.gelu)" + _TOPK,
          seeded(401, lambda: SglangNativeMoE("fused", "gelu")), tokens(), expect=1, faithful=True,
          note=_FUSED_NOTE + "; exact F.gelu on the gate half"),
    Idiom("sglang_moe_forward_native_silu", _FMN + " moe_forward_native (activation silu: SiluAndMul)" + _TOPK,
          seeded(402, lambda: SglangNativeMoE("loop", "silu")), tokens(), expect=1, faithful=True,
          fullgraph=False, note=_LOOP_NOTE),
    Idiom("sglang_moe_forward_native_gelu", _FMN + " moe_forward_native (activation gelu: GeluAndMul tanh)" + _TOPK,
          seeded(403, lambda: SglangNativeMoE("loop", "gelu")), tokens(), expect=1, faithful=True,
          fullgraph=False, note=_LOOP_NOTE + "; GeluAndMul() with its default approximate='tanh'"),
]
