"""MoE layers for the examples and benchmarks: transformers' own sparse-MoE blocks built from a
config at a given shape (random weights, no download)."""
from __future__ import annotations

import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def olmoe_block(d: int, n: int, E: int, K: int, dtype=torch.float32, seed: int = 0, experts_impl="grouped_mm"):
    """OLMoE's sparse block (softmax -> top-k, grouped_mm experts, SwiGLU) at (d, n, E, K)."""
    from transformers import OlmoeConfig
    from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock

    torch.manual_seed(seed)
    cfg = OlmoeConfig(hidden_size=d, intermediate_size=n, num_experts=E, num_experts_per_tok=K,
                      norm_topk_prob=False)
    cfg._experts_implementation = experts_impl  # a standalone block gets no default from a model
    block = OlmoeSparseMoeBlock(cfg)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return block.to(dtype)


def mixtral_block(d: int, n: int, E: int, K: int, dtype=torch.float32, seed: int = 0, experts_impl="grouped_mm"):
    """Mixtral's sparse block (softmax -> top-k -> renormalise, grouped_mm experts, SwiGLU)."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    torch.manual_seed(seed)
    cfg = MixtralConfig(hidden_size=d, intermediate_size=n, num_local_experts=E, num_experts_per_tok=K)
    cfg._experts_implementation = experts_impl
    block = MixtralSparseMoeBlock(cfg)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return block.to(dtype)


def block_output(out):
    return out[0] if isinstance(out, tuple) else out
