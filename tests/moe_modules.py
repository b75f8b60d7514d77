"""Hand-written MoE modules in the idioms users write (transformers 4.x style, research code),
and look-alikes that are not MoE, for the backend tests."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class GatedMLP(nn.Module):
    def __init__(self, d, n, act=F.silu, norm=False):
        super().__init__()
        self.w1 = nn.Linear(d, n, bias=False)
        self.w3 = nn.Linear(d, n, bias=False)
        self.w2 = nn.Linear(n, d, bias=False)
        self.act = act
        self.norm = nn.LayerNorm(n) if norm else None

    def forward(self, x):
        h = self.act(self.w1(x)) * self.w3(x)
        if self.norm is not None:
            h = self.norm(h)
        return self.w2(h)


class PlainMLP(nn.Module):
    def __init__(self, d, n, act=F.gelu):
        super().__init__()
        self.fc1 = nn.Linear(d, n, bias=False)
        self.fc2 = nn.Linear(n, d, bias=False)
        self.act = act

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class LoopMoE(nn.Module):
    """transformers 4.x Mixtral sparse block: one_hot mask, loop over range(E), index_add_.

    mask="onehot_210" (Mixtral 4.x), "onehot_201" (where gives (token, k)), or "eq"
    (torch.where(top_k_index == e), research code)."""

    def __init__(self, d=32, n=16, E=4, K=2, mask="onehot_210", expert=GatedMLP, router_bias=None, **kw):
        super().__init__()
        self.gate = nn.Linear(d, E, bias=False)
        self.experts = nn.ModuleList([expert(d, n, **kw) for _ in range(E)])
        self.E, self.K, self.mask = E, K, mask
        self.register_buffer("router_bias", router_bias if router_bias is not None else torch.zeros(E))

    def forward(self, hidden_states):
        b, s, d = hidden_states.shape
        x = hidden_states.view(-1, d)
        logits = self.gate(x) + self.router_bias
        weights = F.softmax(logits, dim=1, dtype=torch.float)
        weights, selected = torch.topk(weights, self.K, dim=-1)
        weights /= weights.sum(dim=-1, keepdim=True)
        weights = weights.to(x.dtype)
        final = torch.zeros((b * s, d), dtype=x.dtype, device=x.device)
        if self.mask == "onehot_210":
            expert_mask = F.one_hot(selected, num_classes=self.E).permute(2, 1, 0)
            for e in range(self.E):
                idx, top_x = torch.where(expert_mask[e])
                cur = x[None, top_x].reshape(-1, d)
                y = self.experts[e](cur) * weights[top_x, idx, None]
                final.index_add_(0, top_x, y.to(x.dtype))
        elif self.mask == "onehot_201":
            expert_mask = F.one_hot(selected, num_classes=self.E).permute(2, 0, 1)
            for e in range(self.E):
                tok, k = torch.where(expert_mask[e])
                y = self.experts[e](x[tok]) * weights[tok, k, None]
                final.index_add_(0, tok, y)
        else:
            for e, expert in enumerate(self.experts):
                tok, k = torch.where(selected == e)
                y = expert(x[tok]) * weights[tok, k].unsqueeze(-1)
                final.index_add_(0, tok, y)
        return final.view(b, s, d)


class SharedWeightLoop(LoopMoE):
    """Look-alike: a loop of index_add_ whose iterations all use the same MLP (not experts)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        for i in range(1, self.E):
            self.experts[i] = self.experts[0]


class DenseMLPBlock(nn.Module):
    """Look-alike: a dense gated MLP (no routing)."""

    def __init__(self, d=32, n=16):
        super().__init__()
        self.mlp = GatedMLP(d, n)

    def forward(self, x):
        return self.mlp(x)


def mixtral_with_loop_moe(model):
    """Give a transformers 5.x Mixtral model transformers-4.x-style sparse blocks that use the
    same weights: what a user with 4.x-era model code has."""
    for layer in model.model.layers:
        block = layer.mlp
        E, K = block.experts.num_experts, block.top_k
        gate_up, down = block.experts.gate_up_proj, block.experts.down_proj
        d, n = down.shape[1], down.shape[2]
        new = LoopMoE(d=d, n=n, E=E, K=K)
        with torch.no_grad():
            new.gate.weight.copy_(block.gate.weight)
            for e in range(E):
                new.experts[e].w1.weight.copy_(gate_up[e, :n])
                new.experts[e].w3.weight.copy_(gate_up[e, n:])
                new.experts[e].w2.weight.copy_(down[e])
        layer.mlp = new
    return model
