"""A catalogue of Mixture-of-Experts idioms, as data.

Each entry is one way public training or inference code writes an MoE block, re-implemented at a
tiny size with the same structure of ops (never copied; the comment of each builder names the
public code it follows). ``tests/test_idiom_catalogue.py`` compiles every entry with the sonic
rewrite at two sequence lengths and checks the output and every gradient against eager, the
number of rewritten blocks against ``expect``, and the rewritten graph's GEMMs.

A new spelling is added here as one more ``Idiom(...)``. ``expect`` is the number of MoE blocks
the rewrite must replace (0 for the look-alikes at the end, which compute something else), or ``"pending"`` for a spelling whose recogniser has not landed (only
numerics are checked, and the test records a note); flip it to the count when it lands.

Only torch is imported (and ``moe_modules`` from this folder): the catalogue does not depend on
the package it tests.

Shape legend: T tokens, d hidden, n expert intermediate, E experts, K experts per token, C expert
capacity (slots per expert), A = T*K assignments.
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
from typing import Callable, Union

import torch
import torch.nn as nn
import torch.nn.functional as Fn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from moe_modules import LoopMoE, MaskDispatchMoE  # noqa: E402

D, N, E, K = 16, 8, 4, 2  # hidden 16, expert width 8 (bf16 grouped GEMMs need 16-byte row strides), 4 experts, top-2
CAPACITY = 3  # slots per expert in the capacity idioms: fixed, so one graph serves both lengths; drops tokens at T=8


@dataclasses.dataclass(frozen=True)
class Idiom:
    name: str
    source: str  # the public code whose structure the entry follows
    build: Callable[[], nn.Module]  # fresh module, deterministic weights (seeded inside)
    inputs: Callable[[int, int], tuple]  # (T, seed) -> forward arguments
    expect: Union[int, str]  # MoE blocks the sonic rewrite replaces, or "pending"
    fullgraph: bool = True  # Dynamo captures the whole forward in one graph
    dtype: torch.dtype = torch.float32  # compute dtype of the experts (bf16: the grouped_mm idioms)
    tol: float = 1e-4  # atol = rtol for output and gradients
    other_gemms: int = 1  # linear/bmm/einsum/grouped_mm nodes that are not the experts' (the router's)
    #: a faithful re-implementation of its source (every op kept, deviations stated beside the code);
    #: ``examples/recall.py`` measures these through the whole backend
    faithful: bool = False
    #: faithful entries: what was kept that a quick re-spelling would have dropped
    note: str = ""


def seeded(seed: int, factory: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def build():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return factory()
    return build


def tokens(shape_of_T: Callable[[int], tuple] = lambda T: (T, D), dtype=torch.float32):
    def make(T: int, seed: int) -> tuple:
        g = torch.Generator().manual_seed(seed)
        return (torch.randn(*shape_of_T(T), generator=g).to(dtype),)
    return make


def gated_weights(e=E, d=D, n=N, dtype=torch.float32):
    """Stacked SwiGLU weights, nn.Linear layout: w1, w3 (E, n, d), w2 (E, d, n)."""
    return (nn.Parameter((torch.randn(e, n, d) / d ** 0.5).to(dtype)),
            nn.Parameter((torch.randn(e, d, n) / n ** 0.5).to(dtype)),
            nn.Parameter((torch.randn(e, n, d) / d ** 0.5).to(dtype)))


class SwiGLU(nn.Module):
    """The FeedForward of mistral-inference / DeepSeek-V3 inference: w2(silu(w1 x) * w3 x)."""

    def __init__(self, d=D, n=N):
        super().__init__()
        self.w1 = nn.Linear(d, n, bias=False)
        self.w2 = nn.Linear(n, d, bias=False)
        self.w3 = nn.Linear(d, n, bias=False)

    def forward(self, x):
        return self.w2(Fn.silu(self.w1(x)) * self.w3(x))


# --------------------------------------------------------------------------- the five existing idioms

class Llama4Dense(nn.Module):
    """transformers 5.x ``Llama4TextMoe`` routed part: every expert on every token (bmm over an
    expert-major (E*T, d) copy), inputs pre-scaled by sigmoid of a top-k-scattered -inf table."""

    def __init__(self):
        super().__init__()
        self.router = nn.Linear(D, E, bias=False)
        self.gate_up_proj = nn.Parameter(torch.randn(E, D, 2 * N) / D ** 0.5)
        self.down_proj = nn.Parameter(torch.randn(E, N, D) / N ** 0.5)

    def forward(self, x):
        logits = self.router(x)
        top_v, top_i = torch.topk(logits, K, dim=1)
        scores = torch.sigmoid(torch.full_like(logits, float("-inf")).scatter_(1, top_i, top_v))
        routed_in = x.repeat(E, 1) * scores.transpose(0, 1).reshape(-1, 1)
        h = torch.bmm(routed_in.view(E, -1, D), self.gate_up_proj)
        gate, up = h.chunk(2, dim=-1)
        y = torch.bmm(up * Fn.silu(gate), self.down_proj).view(-1, D)
        return y.reshape(E, -1, D).sum(dim=0)


class GptFastEinsum(nn.Module):
    """gpt-fast ``mixtral-moe/model.py`` ``MOEFeedForward`` + ``ConditionalFeedForward`` (also in
    PyTorch's ``benchmarks/gpt_fast/mixtral_moe_model.py``), op for op: ``x.view(-1, dim)``, softmax,
    top-k, the in-place renormalisation ``expert_weights /= ...`` (a quick re-spelling as
    ``w = w / ...`` hid that it was declined), weights gathered per (token, slot) and contracted with
    einsum, combine einsum over the slots, ``view(B, S, dim)``. Deviations: tiny sizes, the expert
    weights are the ``ConditionalFeedForward`` parameters held here (one module instead of two)."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(D, E, bias=False)
        self.w1, self.w2, self.w3 = gated_weights()
        self.dim, self.num_activated_experts = D, K

    def cond_ffn(self, x, expert_indices):
        w1_weights = self.w1[expert_indices]  # [T, A, D, D]
        w3_weights = self.w3[expert_indices]  # [T, A, D, D]
        w2_weights = self.w2[expert_indices]  # [T, A, D, D]
        x1 = Fn.silu(torch.einsum("ti,taoi -> tao", x, w1_weights))
        x3 = torch.einsum("ti, taoi -> tao", x, w3_weights)
        return torch.einsum("tao, taio -> tai", (x1 * x3), w2_weights)

    def forward(self, x):
        B, S = x.shape[:2]
        x = x.view(-1, self.dim)
        scores = self.gate(x)  # [T, E]
        expert_weights = Fn.softmax(scores, dim=-1)
        expert_weights, expert_indices = torch.topk(expert_weights, self.num_activated_experts, dim=-1)
        expert_weights /= expert_weights.sum(dim=-1, keepdim=True)  # [T, A]
        expert_outs = self.cond_ffn(x, expert_indices)
        int_v1 = torch.einsum("tai,ta -> ti", expert_outs, expert_weights)
        return int_v1.view(B, S, self.dim)


class HFBatchedMM(nn.Module):
    """transformers 5.x ``batched_mm`` experts (``integrations/moe.py``) behind a softmax top-k
    router: tokens repeat_interleave'd K times, weights gathered per assignment ``W[ids]``, bmm,
    ``(y * s).view(T, K, d).sum(1)``."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(D, E, bias=False)
        self.gate_up_proj = nn.Parameter(torch.randn(E, 2 * N, D) / D ** 0.5)
        self.down_proj = nn.Parameter(torch.randn(E, D, N) / N ** 0.5)

    def forward(self, x):
        w, ids = torch.topk(Fn.softmax(self.gate(x), dim=-1), K, dim=-1)
        rows = x.repeat_interleave(K, dim=0)
        flat_ids, s = ids.reshape(-1), w.reshape(-1)
        h = torch.bmm(self.gate_up_proj[flat_ids], rows.unsqueeze(-1)).squeeze(-1)
        gate, up = h.chunk(2, dim=-1)
        y = torch.bmm(self.down_proj[flat_ids], (Fn.silu(gate) * up).unsqueeze(-1)).squeeze(-1)
        return (y * s.unsqueeze(-1)).view(x.size(0), K, D).sum(dim=1)


class HFSortedGroupedMM(nn.Module):
    """transformers 5.x default ``grouped_mm`` experts written by hand with ``torch._grouped_mm``
    (bf16: CPU compiles only bf16 grouped GEMMs): sort by expert, ``hidden[perm // K]``, histc
    offsets, two grouped GEMMs, weight, inverse permutation, ``view(T, K, d).sum(1)``."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(D, E, bias=False, dtype=torch.bfloat16)
        self.gate_up_proj = nn.Parameter((torch.randn(E, 2 * N, D) / D ** 0.5).bfloat16())
        self.down_proj = nn.Parameter((torch.randn(E, D, N) / N ** 0.5).bfloat16())

    def forward(self, x):
        w, ids = torch.topk(Fn.softmax(self.gate(x), dim=-1), K, dim=-1)
        sorted_ids, perm = torch.sort(ids.reshape(-1))
        rows = x[perm // K]
        offsets = torch.cumsum(torch.histc(sorted_ids.float(), bins=E, min=0, max=E - 1), dim=0, dtype=torch.int32)
        h = torch._grouped_mm(rows, self.gate_up_proj.transpose(-2, -1), offs=offsets)
        gate, up = h.chunk(2, dim=-1)
        y = torch._grouped_mm(Fn.silu(gate) * up, self.down_proj.transpose(-2, -1), offs=offsets)
        y = y * w.reshape(-1)[perm].unsqueeze(-1)
        inv_perm = torch.empty_like(perm)
        inv_perm[perm] = torch.arange(perm.numel(), device=perm.device)
        return y[inv_perm].view(x.size(0), K, D).sum(dim=1)


# --------------------------------------------------------------------------- issue 9's spellings

class MistralWhere(nn.Module):
    """mistral-inference ``moe.py`` ``MoeLayer``: top-k of the logits, then softmax over the K
    picks; per expert ``idx, nth = torch.where(selected == i)`` and an indexed ``+=`` into
    ``zeros_like(x)`` (``results[idx] += w[idx, nth, None] * expert(x[idx])``)."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(D, E, bias=False)
        self.experts = nn.ModuleList([SwiGLU() for _ in range(E)])

    def forward(self, x):
        logits = self.gate(x)
        w, selected = torch.topk(logits, K)
        w = Fn.softmax(w, dim=1, dtype=torch.float).to(x.dtype)
        results = torch.zeros_like(x)
        for i, expert in enumerate(self.experts):
            idx, nth = torch.where(selected == i)
            results[idx] += w[idx, nth, None] * expert(x[idx])
        return results


class DeepSeekV3Inference(nn.Module):
    """DeepSeek-V3 ``inference/model.py`` ``MoE`` (its ``.tolist()`` skip of empty experts left out,
    a plain ``range(E)`` loop): sigmoid gate, top-k on scores + correction bias, weights gathered
    from the unbiased scores, renormalised, route scale; ``y[idx] += expert(x[idx]) * w[idx, top,
    None]``; a shared expert added to the routed output."""

    def __init__(self):
        super().__init__()
        self.gate_weight = nn.Parameter(torch.randn(E, D) / D ** 0.5)
        self.register_buffer("correction_bias", torch.linspace(-0.1, 0.1, E))
        self.experts = nn.ModuleList([SwiGLU() for _ in range(E)])
        self.shared = SwiGLU()
        self.route_scale = 2.5

    def forward(self, x):
        scores = torch.sigmoid(Fn.linear(x, self.gate_weight))
        original = scores
        indices = torch.topk(scores + self.correction_bias, K, dim=-1)[1]
        weights = original.gather(1, indices)
        weights = weights / weights.sum(dim=-1, keepdim=True) * self.route_scale
        y = torch.zeros_like(x)
        for i in range(E):
            idx, top = torch.where(indices == i)
            y[idx] += self.experts[i](x[idx]) * weights[idx, top, None]
        return y + self.shared(x)


def _top1_capacity(gates, capacity, near_miss=None):
    """Top-1 gating with capacity (Switch / GShard as in fairseq ``top1gating`` and DeepSpeed
    ``sharded_moe.top1gating``, eval semantics, no noise): (combine (T, E, C), dispatch bool).
    near_miss="shared_slot": slot = token index % C, so one slot may hold several tokens (the
    dispatch einsum then sums them: an expert runs on a sum of tokens)."""
    idx1 = torch.argmax(gates, dim=1)
    mask1 = Fn.one_hot(idx1, num_classes=gates.size(1))
    slot1 = torch.cumsum(mask1, dim=0) - 1
    if near_miss == "shared_slot":
        slot1 = mask1 * (torch.arange(gates.size(0), device=gates.device) % capacity).unsqueeze(1)
    mask1 = mask1 * torch.lt(slot1, capacity)
    slot1_s = torch.sum(slot1 * mask1, dim=1)
    gates1 = gates * mask1.to(gates.dtype)
    combine = torch.einsum("se,sc->sec", gates1, Fn.one_hot(slot1_s, num_classes=capacity).to(gates.dtype))
    return combine, combine.bool()


def _top2_capacity(logits, capacity):
    """Top-2 gating with capacity (fairseq/fairscale ``top2gating``, DeepSpeed ``top2gating``,
    eval semantics: second expert = argmax of the other logits, no sampling noise; the second
    expert's slots come after every first choice; both weights renormalised)."""
    gates = Fn.softmax(logits, dim=1)
    n_exp = gates.size(1)
    idx1 = torch.argmax(gates, dim=1)
    mask1 = Fn.one_hot(idx1, num_classes=n_exp)
    idx2 = torch.argmax(logits.masked_fill(mask1.bool(), float("-inf")), dim=1)
    mask2 = Fn.one_hot(idx2, num_classes=n_exp)
    slot1 = torch.cumsum(mask1, dim=0) - 1
    slot2 = torch.cumsum(mask2, dim=0) - 1 + torch.sum(mask1, dim=0, keepdim=True)
    mask1 = mask1 * torch.lt(slot1, capacity)
    mask2 = mask2 * torch.lt(slot2, capacity)
    slot1_s = torch.sum(slot1 * mask1, dim=1)
    slot2_s = torch.sum(slot2 * mask2, dim=1)
    g1 = torch.sum(gates * mask1, dim=1)
    g2 = torch.sum(gates * mask2, dim=1)
    denom = torch.clamp(g1 + g2, min=torch.finfo(gates.dtype).eps)
    g1, g2 = g1 / denom, g2 / denom
    c1 = (g1.unsqueeze(1) * mask1).unsqueeze(2) * Fn.one_hot(slot1_s, num_classes=capacity).to(gates.dtype).unsqueeze(1)
    c2 = (g2.unsqueeze(1) * mask2).unsqueeze(2) * Fn.one_hot(slot2_s, num_classes=capacity).to(gates.dtype).unsqueeze(1)
    combine = c1 + c2
    return combine, combine.bool()


class CapacityEinsum(nn.Module):
    """GShard/Switch dense capacity dispatch (fairseq ``MOELayer``, DeepSpeed ``sharded_moe.MOELayer``,
    Tutel's einsum path): ``einsum("sec,sm->ecm", dispatch, x)``, experts on the capacity-padded
    (E, C, d) batches with stacked weights (bmm, as nanoMoE / Tutel batched experts), then
    ``einsum("sec,ecm->sm", combine, y)``. top1 (Switch) or top2 (GShard). Tokens over capacity get 0.

    near_miss (look-alikes that must not be rewritten): "shared_slot" (see ``_top1_capacity``),
    "weighted_dispatch" (the dispatch einsum takes the combine weights: scores on the input and
    again on the output), "combine_other_slot" (the combine reads slot c + 1 of what slot c
    computed: another token's output)."""

    def __init__(self, top: int = 1, near_miss=None):
        super().__init__()
        self.top, self.near_miss = top, near_miss
        self.wg = nn.Linear(D, E, bias=False)
        self.w_in = nn.Parameter(torch.randn(E, D, N) / D ** 0.5)
        self.w_out = nn.Parameter(torch.randn(E, N, D) / N ** 0.5)

    def forward(self, x):
        logits = self.wg(x)
        if self.top == 1:
            combine, dispatch = _top1_capacity(Fn.softmax(logits, dim=1), CAPACITY, self.near_miss)
        else:
            combine, dispatch = _top2_capacity(logits, CAPACITY)
        if self.near_miss == "weighted_dispatch":
            dispatch = combine
        if self.near_miss == "combine_other_slot":
            combine = combine.roll(1, dims=2)
        expert_in = torch.einsum("sec,sm->ecm", dispatch.type_as(x), x)
        h = Fn.relu(torch.bmm(expert_in, self.w_in))
        y = torch.bmm(h, self.w_out)
        return torch.einsum("sec,ecm->sm", combine.type_as(x), y)


class TorchtitanGroupedMM(nn.Module):
    """torchtitan ``models/moe``: softmax router top-k, counts by ``histc`` (or ``bincount``), stable
    ``argsort`` of the flat expert ids, token rows gathered with ``torch.gather``, scores applied
    before the experts (``score_before_experts``) or after, ``_run_experts_grouped_mm`` (bf16
    casts, offsets ``cumsum(counts).to(int32)``, w1/w3/w2 (E, n, d)/(E, d, n) transposed), then
    ``scatter_add`` back to the tokens.

    near_miss: "offsets_flipped" (group sizes in reverse expert order: rows run through the wrong
    experts), "scatter_k_major" (outputs added at token ``order % T`` instead of ``order // K``)."""

    def __init__(self, counts="histc", score_before_experts=False, near_miss=None):
        super().__init__()
        self.counts, self.score_before, self.near_miss = counts, score_before_experts, near_miss
        self.gate = nn.Linear(D, E, bias=False)
        self.w1, self.w2, self.w3 = gated_weights()

    def forward(self, x):
        T_ = x.size(0)
        scores = Fn.softmax(self.gate(x).float(), dim=-1)
        top_scores, selected = torch.topk(scores, K, dim=-1)
        flat = selected.view(-1)
        if self.counts == "histc":
            per_expert = torch.histc(flat.float(), bins=E, min=0, max=E)
        else:
            per_expert = torch.bincount(flat, minlength=E)
        if self.near_miss == "offsets_flipped":
            per_expert = per_expert.flip(0)
        order = torch.argsort(flat, stable=True)
        sorted_scores = top_scores.view(-1)[order]
        token_of_row = order // K
        index = token_of_row.reshape(-1, 1).expand(-1, D)
        rows = torch.gather(x, dim=0, index=index)
        if self.score_before:
            rows = (rows.to(torch.float32) * sorted_scores.reshape(-1, 1)).to(x.dtype)
        offsets = torch.cumsum(per_expert, dim=0, dtype=torch.int32)
        h = Fn.silu(torch._grouped_mm(rows.bfloat16(), self.w1.bfloat16().transpose(-2, -1), offs=offsets))
        h = h * torch._grouped_mm(rows.bfloat16(), self.w3.bfloat16().transpose(-2, -1), offs=offsets)
        out = torch._grouped_mm(h, self.w2.bfloat16().transpose(-2, -1), offs=offsets).type_as(rows)
        if not self.score_before:
            out = (out.to(torch.float32) * sorted_scores.reshape(-1, 1)).to(x.dtype)
        if self.near_miss == "scatter_k_major":
            index = (order % T_).reshape(-1, 1).expand(-1, D)
        return torch.zeros(T_, D, dtype=x.dtype, device=x.device).scatter_add(0, index, out)


class _TitanRouter(nn.Module):
    """torchtitan ``TokenChoiceTopKRouter`` (no node-limited routing, no router noise)."""

    def __init__(self, score_func, route_norm, route_scale):
        super().__init__()
        self.gate = nn.Linear(D, E, bias=False)
        self.num_experts, self.top_k = E, K
        self.score_func, self.route_norm, self.route_scale = score_func, route_norm, route_scale

    def forward(self, x, expert_bias=None):
        scores = self.gate(x)
        # By default, sigmoid or softmax is performed in float32 to avoid loss explosion
        if self.score_func == "sigmoid":
            scores = torch.sigmoid(scores.to(torch.float32))
        else:
            scores = Fn.softmax(scores.to(torch.float32), dim=1)
        if expert_bias is not None:  # the bias only selects; the gate values come from the scores
            _, selected_experts_indices = torch.topk(scores + expert_bias, k=self.top_k, dim=1)
            top_scores = scores.gather(dim=1, index=selected_experts_indices)
        else:
            top_scores, selected_experts_indices = torch.topk(scores, k=self.top_k, dim=1)
        if self.route_norm:
            denominator = top_scores.sum(dim=-1, keepdim=True) + 1e-20
            top_scores = top_scores / denominator
        top_scores = top_scores * self.route_scale
        # deviation: .float() before histc (no CPU histc kernel for int64)
        num_tokens_per_expert = torch.histc(selected_experts_indices.view(-1).float(), bins=self.num_experts,
                                            min=0, max=self.num_experts)
        return top_scores, selected_experts_indices, num_tokens_per_expert


class _TitanReorderer(nn.Module):
    """torchtitan ``TokenReorderer``: histc counts again, stable argsort, scores in expert order,
    token of each sorted row by ``// top_k``."""

    def forward(self, top_scores, selected_experts_indices):
        num_tokens_per_expert = torch.histc(selected_experts_indices.view(-1).float(), bins=E, min=0, max=E)  # .float(): as above
        token_indices_experts_sorted = torch.argsort(selected_experts_indices.view(-1), stable=True)
        top_scores_experts_sorted = top_scores.view(-1)[token_indices_experts_sorted]
        token_indices_experts_sorted = token_indices_experts_sorted // K
        return top_scores_experts_sorted, token_indices_experts_sorted, num_tokens_per_expert


class _TitanGroupedExperts(nn.Module):
    """torchtitan ``GroupedExperts`` with ``_run_experts_grouped_mm`` (bf16 grouped GEMMs on
    ``cumsum(counts)`` offsets, the result cast back with ``type_as``)."""

    def __init__(self):
        super().__init__()
        self.w1, self.w2, self.w3 = gated_weights()

    def forward(self, x, num_tokens_per_expert):
        offsets = torch.cumsum(num_tokens_per_expert, dim=0, dtype=torch.int32)
        h = Fn.silu(torch._grouped_mm(x.bfloat16(), self.w1.bfloat16().transpose(-2, -1), offs=offsets))
        h = h * torch._grouped_mm(x.bfloat16(), self.w3.bfloat16().transpose(-2, -1), offs=offsets)
        return torch._grouped_mm(h, self.w2.bfloat16().transpose(-2, -1), offs=offsets).type_as(x)


class TorchtitanMoE(nn.Module):
    """torchtitan ``models/moe`` ``MoE.forward`` as published, op for op: 3-D input viewed to
    (bs*slen, dim), the router with the load-balancing ``expert_bias`` buffer (selection only), the
    ``tokens_per_expert`` buffer statistics written under ``no_grad`` in ``forward``, the reorderer,
    ``torch.gather`` of the token rows, scores before or after the experts (fp32 multiply, cast
    back), the shared experts' output as the base the routed rows are ``scatter_add``-ed into,
    ``reshape(bs, slen, dim)``. A quick re-spelling (zeros as the base, no buffers) hid that the
    shared-expert base was declined ("does not start as zeros"). Deviations: tiny sizes; histc on
    ``.float()`` ids (CPU)."""

    def __init__(self, shared=True, score_before_experts=False, score_func="sigmoid", load_balance=True):
        super().__init__()
        self.router = _TitanRouter(score_func, route_norm=True, route_scale=2.5)
        self.reorderer = _TitanReorderer()
        self.experts = _TitanGroupedExperts()
        self.shared_experts = SwiGLU(D, N) if shared else None  # torchtitan's FeedForward: the same ops
        self.score_before_experts = score_before_experts
        self.register_buffer("expert_bias", torch.zeros(E, dtype=torch.float32) if load_balance else None)
        self.register_buffer("tokens_per_expert", torch.zeros(E, dtype=torch.float32), persistent=False)

    def forward(self, x):
        bs, slen, dim = x.shape
        x = x.view(-1, dim)
        top_scores, selected_experts_indices, num_tokens_per_expert = self.router(x, self.expert_bias)
        with torch.no_grad():
            self.tokens_per_expert.add_(num_tokens_per_expert)
        (top_scores_experts_sorted, token_indices_experts_sorted,
         num_tokens_per_expert) = self.reorderer(top_scores, selected_experts_indices)
        token_indices_experts_sorted = token_indices_experts_sorted.reshape(-1, 1).expand(-1, dim)
        routed_input = torch.gather(x, dim=0, index=token_indices_experts_sorted)
        if self.score_before_experts:
            routed_input = (routed_input.to(torch.float32) * top_scores_experts_sorted.reshape(-1, 1)).to(x.dtype)
        routed_output = self.experts(routed_input, num_tokens_per_expert)
        if not self.score_before_experts:
            routed_output = (routed_output.to(torch.float32) * top_scores_experts_sorted.reshape(-1, 1)).to(x.dtype)
        if self.shared_experts is not None:
            out = self.shared_experts(x)
        else:
            out = torch.zeros_like(x)
        out = out.scatter_add(dim=0, index=token_indices_experts_sorted, src=routed_output)
        return out.reshape(bs, slen, dim)


class GatheredBmmScatter(nn.Module):
    """Research code: weights gathered per assignment ``W[expert_idx]`` and bmm, combine by
    ``scatter_add_`` (or ``scatter_reduce(..., "sum")``) into the tokens."""

    def __init__(self, reduce="scatter_add"):
        super().__init__()
        self.reduce = reduce
        self.gate = nn.Linear(D, E, bias=False)
        self.w1, self.w2, self.w3 = gated_weights()

    def forward(self, x):
        w, ids = torch.topk(Fn.softmax(self.gate(x), dim=-1), K, dim=-1)
        tok = torch.arange(x.size(0), device=x.device).repeat_interleave(K)
        expert_idx = ids.reshape(-1)
        rows = x[tok].unsqueeze(-1)  # (A, d, 1)
        h = Fn.silu(torch.bmm(self.w1[expert_idx], rows)) * torch.bmm(self.w3[expert_idx], rows)
        y = torch.bmm(self.w2[expert_idx], h).squeeze(-1) * w.reshape(-1, 1)
        index = tok.unsqueeze(-1).expand(-1, D)
        if self.reduce == "scatter_add":
            return torch.zeros_like(x).scatter_add_(0, index, y)
        return torch.zeros_like(x).scatter_reduce(0, index, y, reduce="sum")


class DeepSeekTrainBranch(nn.Module):
    """DeepSeek-MoE / V2 / V3 remote code (``modeling_deepseek.py`` ``DeepseekMoE``), training
    branch: ``x.repeat_interleave(K, dim=0)``, ``y = torch.empty_like(...)``, per expert
    ``y[flat_ids == i] = expert(x_rep[flat_ids == i])``, ``(y.view(T, K, d) * w.unsqueeze(-1)).sum(1)``."""

    def __init__(self):
        super().__init__()
        self.gate_weight = nn.Parameter(torch.randn(E, D) / D ** 0.5)
        self.experts = nn.ModuleList([SwiGLU() for _ in range(E)])

    def forward(self, x):
        scores = Fn.linear(x, self.gate_weight).softmax(dim=-1)
        topk_weight, topk_idx = torch.topk(scores, k=K, dim=-1, sorted=False)
        flat_topk_idx = topk_idx.view(-1)
        x_rep = x.repeat_interleave(K, dim=0)
        y = torch.empty_like(x_rep)
        for i, expert in enumerate(self.experts):
            y[flat_topk_idx == i] = expert(x_rep[flat_topk_idx == i])
        return (y.view(*topk_weight.shape, -1) * topk_weight.unsqueeze(-1)).sum(dim=1)


class ExpertChoice(nn.Module):
    """Expert-choice routing (Zhou et al. 2022 and its ports): token-expert affinities (T, E)
    softmax over experts, each expert takes its top-C tokens ``topk(scores.T, C)``, gathers them
    (E, C, d), runs bmm experts with stacked weights, and adds the gated outputs back to the
    tokens with ``scatter_add_`` (a token may be taken by any number of experts, including none).

    near_miss="scatter_elsewhere": outputs added at token (t + 1) % T, not the token gathered."""

    def __init__(self, near_miss=None):
        super().__init__()
        self.near_miss = near_miss
        self.gate = nn.Linear(D, E, bias=False)
        self.w_in = nn.Parameter(torch.randn(E, D, 2 * N) / D ** 0.5)
        self.w_out = nn.Parameter(torch.randn(E, N, D) / N ** 0.5)

    def forward(self, x):
        scores = Fn.softmax(self.gate(x), dim=-1)
        gate_vals, token_idx = torch.topk(scores.t(), CAPACITY, dim=-1)  # (E, C)
        h = torch.bmm(x[token_idx], self.w_in)  # (E, C, 2n)
        g, u = h.chunk(2, dim=-1)
        y = torch.bmm(Fn.silu(g) * u, self.w_out) * gate_vals.unsqueeze(-1)  # (E, C, d)
        out = torch.zeros_like(x)
        target = (token_idx + 1) % x.size(0) if self.near_miss == "scatter_elsewhere" else token_idx
        return out.scatter_add_(0, target.reshape(-1, 1).expand(-1, D), y.reshape(-1, D))


# --------------------------------------------------------------------------- the catalogue

_x = tokens()
_x3d = tokens(lambda T: (1, T, D))

CATALOGUE = [
    # the five idioms the project rewrote before issue 9
    Idiom("loop_index_add", "transformers 4.x MixtralSparseMoeBlock: one_hot(...).permute(2, 1, 0), "
          "torch.where, index_add_ (tests/moe_modules.LoopMoE)",
          seeded(1, lambda: LoopMoE(d=D, n=N, E=E, K=K)), _x3d, expect=1),
    Idiom("mask_dispatch_switch", "transformers 4.x SwitchTransformersSparseMLP: top-1 one_hot with "
          "capacity, out[mask_e] = expert_e(x[mask_e]) into a clone (tests/moe_modules.MaskDispatchMoE)",
          seeded(2, lambda: MaskDispatchMoE(d=D, n=N, E=E, mask="onehot", init="clone", capacity=CAPACITY)),
          _x, expect=1),
    Idiom("gpt_fast_einsum", "gpt-fast mixtral-moe/model.py MOEFeedForward + ConditionalFeedForward",
          seeded(3, GptFastEinsum), _x3d, expect=1, faithful=True,
          note="the in-place '/=' on the top-k values, view(-1, dim), the cond_ffn einsums, view(B, S, dim)"),
    Idiom("hf_sorted_grouped_mm", "transformers 5.x integrations/moe.py grouped_mm experts (torch._grouped_mm, bf16)",
          seeded(4, HFSortedGroupedMM), tokens(dtype=torch.bfloat16), expect=1, dtype=torch.bfloat16, tol=2e-2),
    Idiom("hf_batched_mm", "transformers 5.x integrations/moe.py batched_mm experts",
          seeded(5, HFBatchedMM), _x, expect=1),
    Idiom("llama4_dense", "transformers 5.x Llama4TextMoe / Llama4TextExperts (every expert on every token)",
          seeded(6, Llama4Dense), _x, expect=1),
    # issue 9's table (recognised by the parts compositions: expert_loop's per-expert forms,
    # expert_slots, the assignment-rows forms)
    Idiom("mistral_where_iadd", "mistral-inference src/mistral_inference/moe.py MoeLayer",
          seeded(7, MistralWhere), _x, expect=1),
    Idiom("deepseek_v3_inference", "DeepSeek-V3 inference/model.py MoE (range(E) loop, no .tolist())",
          seeded(8, DeepSeekV3Inference), _x, expect=1, other_gemms=4),  # router + the shared SwiGLU
    Idiom("switch_capacity_einsum", "fairseq moe_layer + top1gating, DeepSpeed sharded_moe top1gating, Tutel",
          seeded(9, lambda: CapacityEinsum(top=1)), _x, expect=1),  # the gating einsum builds only the combine weights: dead after the rewrite
    Idiom("gshard_top2_capacity_einsum", "fairseq/fairscale top2gating, DeepSpeed sharded_moe top2gating (no noise)",
          seeded(10, lambda: CapacityEinsum(top=2)), _x, expect=1),
    Idiom("torchtitan_histc", "torchtitan models/moe: histc counts, argsort, gather, _grouped_mm, scatter_add",
          seeded(11, TorchtitanGroupedMM), _x, expect=1, dtype=torch.bfloat16, tol=3e-2),
    Idiom("torchtitan_bincount_score_before", "torchtitan models/moe with score_before_experts=True, bincount counts",
          seeded(12, lambda: TorchtitanGroupedMM(counts="bincount", score_before_experts=True)), _x,
          expect=1, dtype=torch.bfloat16, tol=3e-2),
    Idiom("gathered_bmm_scatter_add", "research code: W[expert_idx] + bmm, scatter_add_",
          seeded(13, GatheredBmmScatter), _x, expect=1),
    Idiom("gathered_bmm_scatter_reduce", "research code: W[expert_idx] + bmm, scatter_reduce(sum)",
          seeded(14, lambda: GatheredBmmScatter(reduce="scatter_reduce")), _x, expect=1),
    Idiom("deepseek_train_repeat_interleave", "DeepSeek-MoE/V2/V3 remote code modeling_deepseek.py DeepseekMoE (training branch)",
          seeded(15, DeepSeekTrainBranch), _x, expect=1),
    Idiom("expert_choice", "expert-choice routing (Zhou et al. 2022): topk(scores.T, C), gather, bmm, scatter_add_",
          seeded(16, ExpertChoice), _x, expect=1),
    # faithful re-implementations (issue 18): every op of the source kept, deviations stated in the class
    Idiom("torchtitan_moe_shared", "torchtitan models/moe MoE: sigmoid router with expert_bias, tokens_per_expert "
          "buffer, shared experts as the scatter_add base, grouped_mm experts",
          seeded(17, TorchtitanMoE), _x3d, expect=1, dtype=torch.bfloat16, tol=3e-2, other_gemms=4, faithful=True,
          note="expert_bias buffer and gather, tokens_per_expert.add_ under no_grad, shared experts as the "
               "scatter_add base, fp32 casts around the scores"),
    Idiom("torchtitan_moe_score_before", "torchtitan models/moe MoE: softmax router, score_before_experts, "
          "no shared experts, no expert_bias",
          seeded(18, lambda: TorchtitanMoE(shared=False, score_before_experts=True, score_func="softmax",
                                           load_balance=False)), _x3d, expect=1, dtype=torch.bfloat16, tol=3e-2,
          faithful=True, note="scores applied to the rows before the experts, with fp32 casts"),
]

# Look-alikes of the idioms above that compute something else: expect 0 (nothing rewritten;
# numerics vs eager as for every entry).
CATALOGUE += [
    Idiom("near_miss_capacity_shared_slot", "Switch capacity dispatch with slot = token % C (two tokens per slot)",
          seeded(9, lambda: CapacityEinsum(top=1, near_miss="shared_slot")), _x, expect=0, other_gemms=2),
    Idiom("near_miss_capacity_weighted_dispatch", "GShard top-2 with the combine weights also in the dispatch einsum",
          seeded(10, lambda: CapacityEinsum(top=2, near_miss="weighted_dispatch")), _x, expect=0),
    Idiom("near_miss_capacity_combine_other_slot", "Switch capacity combine reading the next slot",
          seeded(9, lambda: CapacityEinsum(top=1, near_miss="combine_other_slot")), _x, expect=0, other_gemms=2),
    Idiom("near_miss_torchtitan_offsets_flipped", "torchtitan grouped_mm with group sizes in reverse expert order",
          seeded(11, lambda: TorchtitanGroupedMM(near_miss="offsets_flipped")), _x, expect=0,
          dtype=torch.bfloat16, tol=3e-2),
    Idiom("near_miss_torchtitan_scatter_k_major", "torchtitan grouped_mm scattering to order % T",
          seeded(11, lambda: TorchtitanGroupedMM(near_miss="scatter_k_major")), _x, expect=0,
          dtype=torch.bfloat16, tol=3e-2),
    Idiom("near_miss_expert_choice_scatter_elsewhere", "expert choice adding outputs at the next token",
          seeded(16, lambda: ExpertChoice(near_miss="scatter_elsewhere")), _x, expect=0),
]

# faithful re-implementations of public MoE layers (issue 18), one file per source in tests/faithful/
from faithful import ENTRIES as _FAITHFUL  # noqa: E402  (the files import Idiom and the helpers above)

CATALOGUE += _FAITHFUL

BY_NAME = {i.name: i for i in CATALOGUE}
assert len(BY_NAME) == len(CATALOGUE), "duplicate idiom names"
