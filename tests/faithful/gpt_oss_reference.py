"""OpenAI gpt-oss PyTorch reference ``MLPBlock``, re-implemented op for op at a tiny size.

Source read: github openai/gpt-oss, ``gpt_oss/torch/model.py`` at commit
7b583341fe16729127f6d5b94a7b09ccae97e1a1: ``RMSNorm``, ``swiglu``, ``MLPBlock`` (and
``ModelConfig`` for the defaults). ``gpt_oss/triton/model.py`` was read for understanding only
(the same block through Triton MoE kernels: routing, matmul_ogs with a fused swiglu epilogue).

The block is a whole pre-norm residual sub-layer: ``x + experts(norm(x))``. The RMSNorm (fp32,
rounded back) and the residual add stay graph code; the router is a biased bf16 ``nn.Linear``,
``torch.topk(sorted=True)`` on the logits, softmax over the K picked logits; every token gathers
its K experts' weights ``mlp1_weight[expert_indices, ...]`` (T, K, 2N, D) and biases and contracts
them with ``torch.einsum``; the clamped SwiGLU on interleaved columns (``x[..., ::2]`` gate,
``x[..., 1::2]`` linear, ``+ 1`` on the linear half); the down bias added in place (``t +=``);
the weighted sum of the K slots by a third einsum. ``TransformerBlock`` calls it on the
(num_tokens, hidden) activations (the source packs tokens on one axis), so the entries feed (T, D).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from idiom_catalogue import D, E, K, N, Idiom, seeded, tokens


@dataclass
class ModelConfig:
    """``ModelConfig``, the fields ``MLPBlock`` reads. Deviation: tiny sizes (catalogue D, N, E, K)."""
    num_experts: int = E
    experts_per_token: int = K
    hidden_size: int = D
    intermediate_size: int = N
    swiglu_limit: float = 7.0


class RMSNorm(torch.nn.Module):
    """``RMSNorm``: fp32 statistics and fp32 scale, the result cast back to the input dtype."""

    def __init__(self, num_features: int, eps: float = 1e-05, device=None):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.scale = torch.nn.Parameter(torch.ones(num_features, device=device, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[-1] == self.num_features
        t, dtype = x.float(), x.dtype
        t = t * torch.rsqrt(torch.mean(t ** 2, dim=-1, keepdim=True) + self.eps)
        return (t * self.scale).to(dtype)


def swiglu(x, alpha: float = 1.702, limit: float = 7.0):
    """``swiglu``: gate on the even columns clamped above, linear on the odd columns clamped both
    ways, ``gate * sigmoid(alpha * gate) * (linear + 1)``."""
    x_glu, x_linear = x[..., ::2], x[..., 1::2]
    x_glu = x_glu.clamp(min=None, max=limit)
    x_linear = x_linear.clamp(min=-limit, max=limit)
    out_glu = x_glu * torch.sigmoid(alpha * x_glu)
    return out_glu * (x_linear + 1)


class MLPBlock(torch.nn.Module):
    """``MLPBlock``. Deviations: ``param_dtype`` (bf16 in the source for the gate and the expert
    parameters; fp32 for the fp32 entry, bf16 for the bf16 one; the norm scale is fp32 in both, as
    in the source); parameters drawn at init (the source allocates ``torch.empty`` and loads a
    checkpoint); the ``world_size > 1`` all-reduce branch is kept but not taken (one process)."""

    def __init__(self, config: ModelConfig, device=None, param_dtype=torch.bfloat16):
        super().__init__()
        self.num_experts = config.num_experts
        self.experts_per_token = config.experts_per_token
        self.swiglu_limit = config.swiglu_limit
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.norm = RMSNorm(config.hidden_size, device=device)
        self.gate = torch.nn.Linear(config.hidden_size, config.num_experts, device=device, dtype=param_dtype)
        assert config.intermediate_size % self.world_size == 0
        n, d, e = config.intermediate_size // self.world_size, config.hidden_size, config.num_experts
        # deviation: drawn here (torch.empty + checkpoint in the source)
        self.mlp1_weight = torch.nn.Parameter((torch.randn(e, n * 2, d) / d ** 0.5).to(param_dtype))
        self.mlp1_bias = torch.nn.Parameter((torch.randn(e, n * 2) * 0.1).to(param_dtype))
        self.mlp2_weight = torch.nn.Parameter((torch.randn(e, d, n) / n ** 0.5).to(param_dtype))
        self.mlp2_bias = torch.nn.Parameter((torch.randn(e, d) * 0.1).to(param_dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.norm(x)
        g = self.gate(t)
        experts = torch.topk(g, k=self.experts_per_token, dim=-1, sorted=True)
        expert_weights = torch.nn.functional.softmax(experts.values, dim=1)
        expert_indices = experts.indices

        # MLP #1
        mlp1_weight = self.mlp1_weight[expert_indices, ...]
        mlp1_bias = self.mlp1_bias[expert_indices, ...]
        t = torch.einsum("beck,bk->bec", mlp1_weight, t) + mlp1_bias
        t = swiglu(t, limit=self.swiglu_limit)

        # MLP #2
        mlp2_weight = self.mlp2_weight[expert_indices, ...]
        mlp2_bias = self.mlp2_bias[expert_indices, ...]
        t = torch.einsum("beck,bek->bec", mlp2_weight, t)
        if self.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)  # never taken: one process
        t += mlp2_bias

        # Weighted sum of experts
        t = torch.einsum("bec,be->bc", t, expert_weights)

        return x + t


_SOURCE = "openai/gpt-oss gpt_oss/torch/model.py MLPBlock + RMSNorm + swiglu @7b58334"
_NOTE = ("the RMSNorm before the router (fp32, cast back) and the residual add inside the block, "
         "topk(sorted=True) then softmax over the K picked logits, per-token gathered weights and "
         "biases mlp1_weight[expert_indices, ...] contracted by einsum('beck,bk->bec') / "
         "einsum('beck,bek->bec'), the clamped swiglu on interleaved columns x[..., ::2] / x[..., 1::2] "
         "with the +1 on the linear half, the in-place 't += mlp2_bias', the einsum('bec,be->bc') slot sum")

ENTRIES = [
    Idiom("gpt_oss_reference_mlp", _SOURCE + " (fp32 parameters)",
          seeded(151, lambda: MLPBlock(ModelConfig(), param_dtype=torch.float32)), tokens(),
          expect=1, faithful=True, note=_NOTE),
    Idiom("gpt_oss_reference_mlp_bf16", _SOURCE + " (bf16 gate and expert parameters, as the source)",
          seeded(152, lambda: MLPBlock(ModelConfig())), tokens(dtype=torch.bfloat16),
          expect=1, faithful=True, dtype=torch.bfloat16, tol=3e-2,
          note=_NOTE + "; bf16 activations and parameters with the fp32 norm scale"),
]
