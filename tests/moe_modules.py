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


class InterleavedGateMLP(nn.Module):
    """One expert in GPT-OSS's layout written as research code: a fused, biased gate_up Linear whose
    output holds gate and up columns interleaved (gate at even columns), the clamped gate
    ``(clamp(up, -L, L) + 1) * g * sigmoid(alpha * g)`` with g = clamp(gate, max=L), a biased down
    Linear. ``layout="concat"`` reads the halves one after the other instead."""

    def __init__(self, d, n, alpha=1.702, limit=0.5, layout="interleaved"):
        super().__init__()
        self.gate_up = nn.Linear(d, 2 * n)
        self.down = nn.Linear(n, d)
        self.alpha, self.limit, self.layout = alpha, limit, layout

    def forward(self, x):
        h = self.gate_up(x)
        if self.layout == "interleaved":
            gate, up = h[..., ::2], h[..., 1::2]
        else:
            gate, up = h.chunk(2, dim=-1)
        gate = gate.clamp(min=None, max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        return self.down((up + 1) * (gate * torch.sigmoid(gate * self.alpha)))


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


class StackedLoopMoE(nn.Module):
    """Softmax top-k over stacked SwiGLU experts (w1 (E, 2n, d), w2 (E, d, n)), a per-expert loop
    with torch.where and index_add_ (transformers' experts idiom). ``before_experts(w)`` runs
    between the router and the experts (a no-op here; tests override it)."""

    def __init__(self, d=32, n=16, E=16, K=2):
        super().__init__()
        self.gate = nn.Linear(d, E, bias=False)
        self.w1 = nn.Parameter(torch.randn(E, 2 * n, d) * 0.2)
        self.w2 = nn.Parameter(torch.randn(E, d, n) * 0.2)
        self.E, self.K = E, K

    def before_experts(self, w):
        pass

    def forward(self, x):
        w, ids = torch.topk(self.gate(x).softmax(-1), self.K, dim=-1)
        self.before_experts(w)
        out = torch.zeros_like(x)
        for e in range(self.E):
            tok, slot = torch.where(ids == e)
            g, u = F.linear(x[tok], self.w1[e]).chunk(2, dim=-1)
            out.index_add_(0, tok, F.linear(F.silu(g) * u, self.w2[e]) * w[tok, slot, None])
        return out


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


# --------------------------------------------------------------------------- boolean-mask dispatch

class Switch4xSparseMLP(nn.Module):
    """transformers 4.x ``SwitchTransformersSparseMLP.forward`` around a 5.x block's router and
    experts (same weights): top-1 one-hot mask (capacity-masked), boolean-mask dispatch into a clone
    of the input (tokens over capacity keep their input), then scaled by the router probability.
    transformers 5.x rewrote it as a loop over the data-dependent ``expert_hit``, which Dynamo
    cannot capture in one graph; this is the form users with 4.x-era model code have."""

    def __init__(self, block):
        super().__init__()
        self.router = block.router
        self.experts = block.experts  # ModuleDict expert_0 .. expert_{E-1}

    def forward(self, hidden_states):
        router_mask, router_probs, router_logits = self.router(hidden_states)
        next_states = hidden_states.clone()
        router_mask = router_mask.bool()
        for idx, expert in enumerate(self.experts.values()):
            token_indices = router_mask[:, :, idx]
            next_states[token_indices] = expert(hidden_states[token_indices]).to(next_states.dtype)
        return router_probs * next_states


def switch_with_4x_sparse_mlp(model):
    """Give a transformers 5.x Switch Transformers model 4.x-style sparse MLPs (same weights)."""
    for name, m in list(model.named_modules()):
        if type(m).__name__ == "SwitchTransformersSparseMLP":
            parent = model.get_submodule(name.rsplit(".", 1)[0])
            setattr(parent, name.rsplit(".", 1)[1], Switch4xSparseMLP(m))
    return model


class Nllb4xSparseMLP(nn.Module):
    """transformers 4.x ``NllbMoeSparseMLP.forward`` around a 5.x block's router and experts: top-2
    boolean masks, per-expert slices of an (E, T, d) buffer, expert outputs through
    ``moe_token_dropout`` (dropout in training, a 1 - p scale in eval), sum over experts."""

    def __init__(self, block):
        super().__init__()
        self.router = block.router
        self.num_experts = block.num_experts
        self.experts = nn.ModuleList([block.experts[f"expert_{i}"] for i in range(block.num_experts)])
        self.moe_token_dropout = block.experts.moe_token_dropout
        self.token_dropout = nn.Dropout(self.moe_token_dropout)

    def forward(self, hidden_states, padding_mask=None):
        batch_size, sequence_length, hidden_dim = hidden_states.shape
        hidden_states = hidden_states.reshape(batch_size * sequence_length, hidden_dim)
        top_1_mask, router_probs, _ = self.router(hidden_states, padding_mask)
        router_mask = router_probs.bool()
        masked_hidden_states = torch.einsum("bm,be->ebm", hidden_states, router_mask)
        for idx, expert in enumerate(self.experts):
            token_indices = router_mask[:, idx]
            combining_weights = router_probs[token_indices, idx]
            expert_output = expert(masked_hidden_states[idx, token_indices])
            if self.moe_token_dropout > 0:
                if self.training:
                    expert_output = self.token_dropout(expert_output)
                else:
                    expert_output *= 1 - self.moe_token_dropout
            masked_hidden_states[idx, token_indices] = torch.einsum("b,be->be", combining_weights, expert_output)
        hidden_states = masked_hidden_states.sum(dim=0)
        return hidden_states.reshape(batch_size, sequence_length, hidden_dim)


def nllb_with_4x_sparse_mlp(model):
    """Give a transformers 5.x NLLB-MoE model 4.x-style sparse MLPs (same weights)."""
    for name, m in list(model.named_modules()):
        if type(m).__name__ == "NllbMoeSparseMLP":
            parent = model.get_submodule(name.rsplit(".", 1)[0])
            setattr(parent, name.rsplit(".", 1)[1], Nllb4xSparseMLP(m))
    return model


class MaskDispatchMoE(nn.Module):
    """Research-code top-1 boolean-mask dispatch over a ModuleList of experts:
    ``out[idx == e] = w[idx == e, None] * experts[e](x[idx == e])``.

    mask="eq" (``expert_index == e``) or "onehot" (``one_hot(expert_index, E).bool()[:, e]``);
    init="zeros" or "clone" (unrouted tokens keep their input); weighted: multiply by the router
    probability inside the loop; capacity (mask="onehot"): an expert takes only its first
    ``capacity`` tokens, the others are routed nowhere (Switch Transformers' expert capacity). Look-alike switches: mask="threshold" (``probs[:, e] > 1/E``: a
    token may pass several masks, later experts overwrite), inplace_expert (the expert output is
    scaled in place), read_inside (the loop reads the buffer it writes: ``y - out[m]``; ``read_inside="add"`` is
    ``out[m] = out[m] + y``, an accumulation, which is rewritten)."""

    def __init__(self, d=16, n=8, E=4, expert=GatedMLP, mask="eq", init="zeros", weighted=True,
                 inplace_expert=False, read_inside=False, capacity=None, **kw):
        super().__init__()
        self.gate = nn.Linear(d, E, bias=False)
        self.experts = nn.ModuleList([expert(d, n, **kw) for _ in range(E)])
        self.E, self.mask, self.init, self.weighted = E, mask, init, weighted
        self.inplace_expert, self.read_inside, self.capacity = inplace_expert, read_inside, capacity

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs = F.softmax(self.gate(x), dim=-1)
        w, idx = probs.max(dim=-1)
        out = torch.zeros_like(x) if self.init == "zeros" else x.clone()
        onehot = F.one_hot(idx, self.E)
        if self.capacity is not None:
            onehot = onehot * (torch.cumsum(onehot, dim=0) <= self.capacity)
        onehot = onehot.bool()
        for e, expert in enumerate(self.experts):
            if self.mask == "eq":
                m = idx == e
            elif self.mask == "onehot":
                m = onehot[:, e]
            else:
                m = probs[:, e] > 1.0 / self.E
            y = expert(x[m])
            if self.inplace_expert:
                y.mul_(2.0)
            if self.weighted:
                y = w[m, None] * y
            if self.read_inside == "add":  # out[m] = out[m] + y: an indexed accumulation (rewritten)
                y = y + out[m]
            elif self.read_inside:          # out[m] = y - out[m]: not an MoE combine
                y = y - out[m]
            out[m] = y
        return out.reshape(shape)


class BiasedMLP(nn.Module):
    """NLLB-MoE / T5-style expert: fc1 and fc2 with biases, ReLU, dropout between them."""

    def __init__(self, d, n, act=F.relu, p=0.0):
        super().__init__()
        self.fc1 = nn.Linear(d, n)
        self.fc2 = nn.Linear(n, d)
        self.act = act
        self.dropout = nn.Dropout(p)

    def forward(self, x):
        return self.fc2(self.dropout(self.act(self.fc1(x))))


def deepspeed_top2_in_place(gates, num_experts: int, capacity: int):
    """The (S, E, C) combine weights of DeepSpeed's top-2 gating in its own spelling (read from
    ``deepspeed/moe/sharded_moe.py`` ``top2gating``; no noise, drop_tokens on): one-hot masks from two
    ``argmax`` rounds, slot positions by ``cumsum``, in-place ``+=``, ``*=``, ``/=`` on the routing
    tensors, gate sums by a contracting einsum, weights spread by ``einsum("s,se->se")``. Shared by
    tests/test_expert_slots.py and tests/test_deepspeed_dispatch.py."""
    import torch.nn.functional as Fn

    mask1 = Fn.one_hot(torch.argmax(gates, dim=1), num_classes=num_experts)
    mask2 = Fn.one_hot(torch.argmax(gates.masked_fill(mask1.bool(), float("-inf")), dim=1), num_classes=num_experts)
    loc1 = torch.cumsum(mask1, dim=0) - 1
    loc2 = torch.cumsum(mask2, dim=0) - 1
    loc2 += torch.sum(mask1, dim=0, keepdim=True)
    mask1 *= torch.lt(loc1, capacity)
    mask2 *= torch.lt(loc2, capacity)
    slot1, slot2 = torch.sum(loc1 * mask1, dim=1), torch.sum(loc2 * mask2, dim=1)
    g1 = torch.einsum("se,se->s", gates, mask1.float())
    g2 = torch.einsum("se,se->s", gates, mask2.float())
    denom = torch.clamp(g1 + g2, min=torch.finfo(g1.dtype).eps)
    g1 /= denom
    g2 /= denom
    c1 = torch.einsum("se,sc->sec", torch.einsum("s,se->se", g1, mask1.float()), Fn.one_hot(slot1, capacity).float())
    c2 = torch.einsum("se,sc->sec", torch.einsum("s,se->se", g2, mask2.float()), Fn.one_hot(slot2, capacity).float())
    return c1 + c2
