"""vLLM's PyTorch reference MoE of its kernel tests, re-implemented op for op at a tiny size.

Source read: github vllm-project/vllm, ``tests/kernels/utils.py`` at commit
bcf9083ca17eee27d9bfb2f87ec8f71ecb99ff45: ``torch_moe`` (softmax in fp32, top-k) calling
``torch_experts`` (the loop over experts with a boolean mask per expert, ``if mask.sum():``, the
fused gate|up GEMM split by ``SiluAndMul``, ``out[mask] = ...``, fp32 weighted sum over the K
slots cast back), and ``vllm.model_executor.layers.activation.SiluAndMul`` (its native path).
An older spelling of the same function (``tests/kernels/utils.py`` before the ``torch_experts``
split, with the loop inline) computes the same ops except the final fp32 casts.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from idiom_catalogue import D, E, K, N, Idiom, seeded, tokens


class SiluAndMul(nn.Module):
    """vLLM ``SiluAndMul``: the first half of the last dim through SiLU, times the second half.
    Deviation: vLLM's CustomOp dispatches to a compiled ``silu_and_mul`` kernel on CUDA (and its
    own CPU op); its ``forward_native`` spelling is used here, the one the test file itself
    documents as the equivalent."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1] // 2
        return F.silu(x[..., :d]) * x[..., d:]


def _quantize_input(a, a_scale, quant_dtype, per_act_token_quant, block_shape):
    """vLLM ``moe_kernel_quantize_input`` on its unquantised path (``quant_dtype is None``): the
    activations and their (absent) scale come back unchanged. The fp8/int8/fp4 branches are not
    re-implemented (the wrapped test below runs unquantised, as the unquantised kernel tests do)."""
    assert quant_dtype is None, "only the unquantised path is re-implemented"
    return a, a_scale


def torch_experts(a, w1, w2, topk_weight, topk_ids, global_num_experts=-1, b_bias1=None, b_bias2=None,
                  expert_map=None, a1_scale=None, quant_dtype=None, per_act_token_quant=False,
                  block_shape=None, apply_router_weights_on_input=False):
    """vLLM ``tests/kernels/utils.py`` ``torch_experts``, unquantised path (the w*_scale / a2_scale
    arguments of the quantised branches are dropped with those branches)."""
    assert (global_num_experts == -1
            or (global_num_experts == w1.shape[0] and expert_map is None)
            or (expert_map is not None and global_num_experts == expert_map.shape[0]))
    M, Kdim = a.shape
    topk = topk_ids.shape[1]
    if apply_router_weights_on_input:
        assert topk == 1
        a = a * topk_weight.to(a.dtype)
    # every token repeated once per slot: row m*topk + j is token m's j-th pick
    a = a.view(M, -1, Kdim).repeat(1, topk, 1).reshape(-1, Kdim)
    out = torch.zeros(M * topk, w2.shape[1], dtype=a.dtype, device=a.device)
    if a1_scale:
        assert not per_act_token_quant and block_shape is None
    a, a_scale = _quantize_input(a, a1_scale, quant_dtype, per_act_token_quant, block_shape)
    num_experts = w1.shape[0]
    topk_ids = topk_ids.view(-1)
    if expert_map is not None:
        topk_ids = expert_map[topk_ids]
    f32 = torch.float32
    for i in range(num_experts):
        mask = topk_ids == i
        if mask.sum():  # data-dependent: an expert with no row is skipped
            # quant_dtype is None: the first of the source's three branches
            tmp1 = a[mask] @ w1[i].transpose(0, 1)  # fused gate|up rows of w1[i]: (rows, 2N)
            if b_bias1 is not None:
                tmp1 = tmp1 + b_bias1[i].view(1, -1).to(tmp1.dtype)
            tmp2 = SiluAndMul()(tmp1)  # a fresh module per expert, as the source writes it
            out[mask] = tmp2 @ w2[i].transpose(0, 1)
            if b_bias2 is not None:
                out[mask] = out[mask] + b_bias2[i].view(1, -1).to(tmp1.dtype)
    if apply_router_weights_on_input:
        return out
    return (out.view(M, -1, w2.shape[1]).to(f32) * topk_weight.view(M, -1, 1)).sum(dim=1).to(out.dtype)


def torch_moe(a, w1, w2, score, topk, b_bias1=None, b_bias2=None, global_num_experts=-1, expert_map=None):
    """vLLM ``tests/kernels/utils.py`` ``torch_moe``: softmax of the scores in fp32, top-k, then
    ``torch_experts``."""
    score = torch.softmax(score, dim=-1, dtype=torch.float32)
    topk_weight, topk_ids = torch.topk(score, topk)
    return torch_experts(a, w1, w2, topk_weight, topk_ids, global_num_experts, b_bias1, b_bias2, expert_map)


class VllmTorchMoE(nn.Module):
    """A module around vLLM's ``torch_moe`` reference (``tests/kernels/utils.py``, commit bcf9083):
    ``w1`` (E, 2N, D) holds gate and up stacked (the fused layout of vLLM's ``FusedMoE``), ``w2``
    (E, D, N). Deviation: the kernel tests draw ``score`` with ``torch.randn((m, e))``; here a
    router linear computes it from the tokens (the wrapper the brief asks for), and the call is
    ``torch_moe(a, w1, w2, score, topk)`` as ``test_fused_moe`` makes it (no expert map, no
    biases). The weights are fp32 (the tests run fp16/bf16 on CUDA)."""

    def __init__(self, with_bias: bool = False):
        super().__init__()
        self.router = nn.Linear(D, E, bias=False)
        self.w1 = nn.Parameter(torch.randn(E, 2 * N, D) / D ** 0.5)
        self.w2 = nn.Parameter(torch.randn(E, D, N) / N ** 0.5)
        # the gpt-oss style test (``test_fused_moe_with_bias``) passes per-expert biases
        self.b1 = nn.Parameter(torch.randn(E, 2 * N) * 0.1) if with_bias else None
        self.b2 = nn.Parameter(torch.randn(E, D) * 0.1) if with_bias else None

    def forward(self, x):
        score = self.router(x)
        return torch_moe(x, self.w1, self.w2, score, K, self.b1, self.b2)


ENTRIES = [
    Idiom("vllm_torch_moe_reference", "vllm-project/vllm tests/kernels/utils.py torch_moe + torch_experts "
          "(unquantised path) + SiluAndMul native, behind a router linear",
          seeded(101, VllmTorchMoE), tokens(), expect=1, faithful=True, fullgraph=False,
          note="the per-expert 'if mask.sum():' host check, a[mask] / out[mask] = boolean-mask dispatch into "
               "zeros(M*topk, D) of repeated rows, the fused gate|up GEMM split inside SiluAndMul() built per "
               "expert, fp32 softmax and the fp32 slot sum cast back"),
    Idiom("vllm_torch_moe_bias", "vllm-project/vllm tests/kernels/utils.py torch_moe with b_bias1/b_bias2 "
          "(the biased-experts test), behind a router linear",
          seeded(102, lambda: VllmTorchMoE(with_bias=True)), tokens(), expect=1, faithful=True,
          fullgraph=False,
          note="per-expert biases after each GEMM as (1, n) views b[i].view(1, -1).to(dtype), the second one as "
               "out[mask] = out[mask] + b2[i] (a read-modify-write of the masked rows just assigned)"),
]
