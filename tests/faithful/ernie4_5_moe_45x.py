"""transformers 4.5x ``Ernie4_5_MoeSparseMoeBlock`` + ``Ernie4_5_MoeStatics`` + ``Ernie4_5_MoeMLP`` (github
huggingface/transformers, ``src/transformers/models/ernie4_5_moe/modeling_ernie4_5_moe.py``), read from
the released wheels v4.55.0 and v4.56.2 (PyPI; the classes are the same, v4.56 renames the loop
variable ``expert_hitted`` to ``expert_hit``; the family is not in v4.53).

The block runs the shared experts first (on the flattened input), then the router inside
``torch.autocast(device_type, enabled=False)``: the gate is an ``nn.Linear`` created with
``dtype=torch.float32`` applied to ``x.float()``, softmax in fp32, the experts picked by ``topk`` of
``moe_statics(probs)`` (``probs + e_score_correction_bias.squeeze()``, a frozen (1, E) parameter), the
unbiased probabilities ``torch.gather``-ed at the picks, divided by ``clamp(sum, min=moe_norm_min)``,
cast to the input dtype. The experts loop is transformers' ``expert_hitted`` loop (``one_hot`` mask
``permute(2, 1, 0)``, ``greater(mask.sum((-1, -2)), 0).nonzero()``, ``torch.where(mask[e].squeeze(0))``,
``x[None, top_x].reshape(-1, h)``, the weight ``routing_weights[top_x, idx, None]``, ``index_add_`` with
``.to(dtype)``) into ``zeros``, plus the shared output, ``reshape(B, S, h)``; returns
``(output, router_logits)``: a wrapper keeps the logits, and the entry feeds (1, T, D).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from idiom_catalogue import D, E, K, N, Idiom, seeded, tokens


class Ernie4_5_MoeConfigLite:
    """The ``Ernie4_5_MoeConfig`` fields the block reads (deviation: a plain object, not the config class;
    tiny sizes: the default has 64 experts, top-6, two shared experts)."""

    hidden_size = D
    intermediate_size = 2 * N
    moe_intermediate_size = N
    moe_num_experts = E
    moe_k = K
    moe_num_shared_experts = 2
    moe_norm_min = 1e-12
    use_bias = False
    hidden_act = "silu"


class Ernie4_5_MoeMLP(nn.Module):
    """``Ernie4_5_MoeMLP``: ``down_proj(act(gate_proj x) * up_proj x)``, linears biased iff ``use_bias``."""

    def __init__(self, config, intermediate_size=None):
        super().__init__()
        self.config = config
        self.hidden_size = config.hidden_size
        self.intermediate_size = intermediate_size if intermediate_size is not None else config.intermediate_size
        self.gate_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=config.use_bias)
        self.up_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=config.use_bias)
        self.down_proj = nn.Linear(self.intermediate_size, self.hidden_size, bias=config.use_bias)
        self.act_fn = F.silu  # ACT2FN["silu"] is transformers' SiLUActivation = nn.functional.silu

    def forward(self, x):
        down_proj = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        return down_proj


class Ernie4_5_MoeStatics(nn.Module):
    """``Ernie4_5_MoeStatics``: a frozen (1, E) fp32 correction bias added to the probabilities."""

    def __init__(self, config):
        super().__init__()
        num_experts_groups = 1
        num_experts = config.moe_num_experts
        self.e_score_correction_bias = nn.Parameter(
            torch.zeros(num_experts_groups, num_experts, dtype=torch.float32),
            requires_grad=False,
        )
        # deviation: a trained checkpoint's bias is not zero; small seeded values so that it changes picks
        with torch.no_grad():
            self.e_score_correction_bias.copy_(0.1 * torch.randn(num_experts_groups, num_experts))

    def forward(self, hidden_states):
        return hidden_states + self.e_score_correction_bias.squeeze()


class Ernie4_5_MoeSparseMoeBlock(nn.Module):
    """``Ernie4_5_MoeSparseMoeBlock.forward``, op for op (v4.55.0). Deviations: tiny sizes only."""

    def __init__(self, config):
        super().__init__()
        self.num_experts = config.moe_num_experts
        self.top_k = config.moe_k
        self.moe_statics = Ernie4_5_MoeStatics(config)
        self.gate = nn.Linear(config.hidden_size, config.moe_num_experts, bias=False, dtype=torch.float32)
        self.experts = nn.ModuleList(
            [Ernie4_5_MoeMLP(config, config.moe_intermediate_size) for _ in range(config.moe_num_experts)])
        self.norm_min = config.moe_norm_min
        self.shared_experts = None
        if config.moe_num_shared_experts > 0:
            self.shared_experts = Ernie4_5_MoeMLP(config, config.moe_intermediate_size * config.moe_num_shared_experts)

    def forward(self, hidden_states):
        batch_size, sequence_length, hidden_dim = hidden_states.shape
        hidden_states = hidden_states.view(-1, hidden_dim)
        if self.shared_experts is not None:
            shared_output = self.shared_experts(hidden_states)
        device_type = (
            hidden_states.device.type
            if isinstance(hidden_states.device.type, str) and hidden_states.device.type != "mps"
            else "cpu"
        )
        with torch.autocast(device_type=device_type, enabled=False):
            router_logits = self.gate(hidden_states.float())
            routing_weights = F.softmax(router_logits, dim=1, dtype=torch.float)
            _, selected_experts = torch.topk(self.moe_statics(routing_weights), self.top_k, dim=-1)
            routing_weights = torch.gather(routing_weights, dim=-1, index=selected_experts)
            routing_weights = routing_weights / torch.clamp(
                routing_weights.sum(dim=-1, keepdim=True), min=self.norm_min
            )
            routing_weights = routing_weights.to(hidden_states.dtype)
        final_hidden_states = torch.zeros(
            (batch_size * sequence_length, hidden_dim), dtype=hidden_states.dtype, device=hidden_states.device
        )
        expert_mask = torch.nn.functional.one_hot(selected_experts, num_classes=self.num_experts).permute(2, 1, 0)
        expert_hitted = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        for expert_idx in expert_hitted:
            expert_layer = self.experts[expert_idx]
            idx, top_x = torch.where(expert_mask[expert_idx].squeeze(0))
            current_state = hidden_states[None, top_x].reshape(-1, hidden_dim)
            current_hidden_states = expert_layer(current_state) * routing_weights[top_x, idx, None]
            final_hidden_states.index_add_(0, top_x, current_hidden_states.to(hidden_states.dtype))
        if self.shared_experts is not None:
            final_hidden_states = final_hidden_states + shared_output
        final_hidden_states = final_hidden_states.reshape(batch_size, sequence_length, hidden_dim)
        return final_hidden_states, router_logits


class KeepRouterLogits(nn.Module):
    """Test wrapper (not in the source): returns the block's hidden states and keeps its router logits."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        out, self.router_logits = self.block(x)
        return out


ENTRIES = [
    Idiom("ernie4_5_moe_45x_block", "transformers v4.55.0 / v4.56.2 models/ernie4_5_moe/modeling_ernie4_5_moe.py "
          "Ernie4_5_MoeSparseMoeBlock + Ernie4_5_MoeStatics + Ernie4_5_MoeMLP",
          seeded(500, lambda: KeepRouterLogits(Ernie4_5_MoeSparseMoeBlock(Ernie4_5_MoeConfigLite()))),
          tokens(lambda T: (1, T, D)),
          expect=1, other_gemms=4, faithful=True,
          note="the shared experts computed before the router, the router under autocast(enabled=False) "
               "with an fp32 gate on x.float(), top-k of the probabilities plus a frozen correction-bias "
               "parameter, torch.gather of the unbiased probabilities, clamp(min=norm_min) renormalisation, "
               "the expert_hitted loop, the shared output added after"),
]
