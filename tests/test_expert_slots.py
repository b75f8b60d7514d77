"""The "expert slots" composition (patterns/expert_slots.py): experts on an (E, C, d) tensor of slots.

Capacity dispatch (GShard/Switch style, written here from a reading of fairseq/fairscale
``top1gating``/``top2gating`` and DeepSpeed ``sharded_moe``), expert-choice routing (each expert
takes its top-C tokens) and dense scores (transformers 5.x Llama4: every token in every expert's
slots, inputs scaled by a score matrix that is 0 off the top-k), in several spellings, through the
sonic rewrite (the graph then runs eagerly; the fused op runs its PyTorch path), at two sequence
lengths: output and every gradient against eager (fp32, 1e-4), at most one recompile, fused-op and
GEMM counts, snapshots of two rewritten graphs, and near-misses that must be declined with a reason naming the part or the proof.

Shape legend: S tokens, d hidden, n expert width, E experts, C slots per expert (capacity).
"""
from __future__ import annotations

import math
import operator

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as Fn
from torch._dynamo.testing import normalize_gm
from torch.testing._internal.common_utils import TestCase

from moe_inductor.compile.backend import rewrite_moe
from moe_inductor.dynamo.dynamo_scope import mark_sonic
from moe_inductor.compile.options import SonicOptions

from idiom_catalogue import BY_NAME
from moe_modules import deepspeed_top2_in_place

D, N, E = 8, 4, 4
K_DENSE = 2  # choices per token of the dense-scores (Llama4) modules
LENGTHS = ((5, 0), (8, 1))  # two sequence lengths: one dynamic-shape recompile at most
_GEMMS = {torch._C._nn.linear, Fn.linear, torch.bmm, torch.mm, torch.matmul, torch.einsum,
          torch.functional.einsum, operator.matmul}
_FUSED = {torch.ops.moe_inductor.fused_moe.default, torch.ops.moe_inductor.fused_moe_experts.default}


# --------------------------------------------------------------------------- modules

class BatchedExperts(nn.Module):
    """Experts on (E, C, d) slots with stacked weights: relu MLP by bmm with (E, in, out) weights,
    SwiGLU by einsum with (E, out, in) weights (fused gate/up, gate first), or SwiGLU by bmm with
    separate biased gate and up stacks ("swiglu_separate")."""

    def __init__(self, kind: str = "relu_bmm", dropout: float = 0.0):
        super().__init__()
        self.kind, self.dropout = kind, dropout
        if kind == "swiglu_separate":
            self.w_gate, self.w_up = (nn.Parameter(torch.randn(E, D, N) / D ** 0.5) for _ in range(2))
            self.b_gate, self.b_up = (nn.Parameter(torch.randn(E, 1, N) / 4) for _ in range(2))
            self.w_out = nn.Parameter(torch.randn(E, N, D) / N ** 0.5)
        elif kind == "relu_bmm":
            self.w_in = nn.Parameter(torch.randn(E, D, N) / D ** 0.5)
            self.b_in = nn.Parameter(torch.randn(E, 1, N) / 4)
            self.w_out = nn.Parameter(torch.randn(E, N, D) / N ** 0.5)
        else:
            self.w_gate_up = nn.Parameter(torch.randn(E, 2 * N, D) / D ** 0.5)
            self.w_down = nn.Parameter(torch.randn(E, D, N) / N ** 0.5)

    def forward(self, slots):
        if self.kind == "swiglu_separate":
            h = Fn.silu(torch.bmm(slots, self.w_gate) + self.b_gate) * (torch.bmm(slots, self.w_up) + self.b_up)
            return torch.bmm(Fn.dropout(h, self.dropout, training=self.dropout > 0), self.w_out)
        if self.kind == "relu_bmm":
            h = Fn.relu(torch.bmm(slots, self.w_in) + self.b_in)
            h = Fn.dropout(h, self.dropout, training=self.dropout > 0)
            return torch.bmm(h, self.w_out)
        gate, up = torch.einsum("ecd,efd->ecf", slots, self.w_gate_up).chunk(2, dim=-1)
        h = Fn.dropout(Fn.silu(gate) * up, self.dropout, training=self.dropout > 0)
        return torch.einsum("ecn,edn->ecd", h, self.w_down)


class CapacityMoE(nn.Module):
    """Capacity dispatch: top-1 (Switch) or top-2 (GShard) choices, slot positions from a cumsum of
    the choices' one-hot columns (the second choice's after the first's counts), tokens over
    capacity dropped, ``einsum("sec,sm->ecm", dispatch, x)``, experts on the slots,
    ``einsum("sec,ecm->sm", combine, y)``. ``capacity``: an int, or "auto" (ceil(1.25 S / E), a
    function of S). ``mutation`` makes a near-miss (see ``NEAR_MISSES``)."""

    def __init__(self, top=1, capacity=3, experts="relu_bmm", mutation=None, dropout=0.0):
        super().__init__()
        self.top, self.capacity, self.mutation = top, capacity, mutation
        self.router = nn.Linear(D, E, bias=False)
        self.experts = BatchedExperts(experts, dropout)

    def positions(self, mask, offset=None):
        if self.mutation == "positions_not_cumsum":
            return torch.zeros_like(mask)
        if self.mutation == "two_tokens_per_slot":
            return torch.div(torch.cumsum(mask, dim=0) - 1, 2, rounding_mode="floor")
        loc = torch.cumsum(mask, dim=0) - 1
        return loc if offset is None else loc + offset

    def gating(self, x, C):
        gates = Fn.softmax(self.router(x), dim=-1)
        first = torch.argmax(gates, dim=-1)
        mask1 = Fn.one_hot(first, num_classes=E)
        loc1 = self.positions(mask1)
        kept1 = mask1 * (loc1 < C).long()
        slot1 = (loc1 * kept1).sum(dim=1)
        if self.top == 1:
            # Switch: the gate is not renormalised; a three-operand outer-product einsum
            g1 = (gates * kept1).sum(dim=1)
            return torch.einsum("s,se,sc->sec", g1, kept1.to(gates.dtype), Fn.one_hot(slot1, C).to(gates.dtype))
        second = torch.argmax(gates.masked_fill(mask1.bool(), float("-inf")), dim=-1)
        mask2 = Fn.one_hot(second, num_classes=E)
        offset = None if self.mutation == "no_offset" else mask1.sum(dim=0, keepdim=True)
        loc2 = self.positions(mask2, offset)
        kept2 = mask2 * (loc2 < C).long()
        # near-miss: the second choice placed at the first choice's position (in another expert)
        slot2 = slot1 if self.mutation == "slot_of_other_choice" else (loc2 * kept2).sum(dim=1)
        g1, g2 = (gates * kept1).sum(dim=1), (gates * kept2).sum(dim=1)
        norm = (g1 + g2).clamp(min=torch.finfo(gates.dtype).eps)
        w1 = torch.einsum("s,se->se", g1 / norm, kept1.to(gates.dtype))
        w2 = torch.einsum("s,se->se", g2 / norm, kept2.to(gates.dtype))
        return (torch.einsum("se,sc->sec", w1, Fn.one_hot(slot1, C).to(gates.dtype))
                + torch.einsum("se,sc->sec", w2, Fn.one_hot(slot2, C).to(gates.dtype)))

    def gating_in_place(self, x, C):
        """Top-2 in DeepSpeed's spelling (``moe_modules.deepspeed_top2_in_place``)."""
        return deepspeed_top2_in_place(Fn.softmax(self.router(x), dim=1), E, C)

    def forward(self, x):
        C = math.ceil(1.25 * x.size(0) / E) if self.capacity == "auto" else self.capacity
        combine = self.gating_in_place(x, C) if self.top == "2_in_place" else self.gating(x, C)
        if self.mutation == "dispatch_weighted":
            dispatch = combine  # inputs scaled by the gates, outputs too: scores applied twice
        else:
            dispatch = combine.bool().type_as(x)
        y = self.experts(torch.einsum("sec,sm->ecm", dispatch, x))
        if self.mutation == "combine_of_other_weights":
            combine = combine * (combine > 0.3)  # nonzeros differ from the dispatch's
        return torch.einsum("sec,ecm->sm", combine.type_as(x), y)


class StackedChoicesMoE(nn.Module):
    """Top-k capacity dispatch with the choices on their own axis (written from a reading of nanoMoE's
    router and MoE layer): one-hot (K, S, E), slot positions by one cumsum over the flattened
    (choice, token) rows, capacity by an in-place ``*=`` on the permuted one-hot, combine weights
    ``sum(w.unsqueeze(3) * one_hot(slot, C).unsqueeze(2), 0)``, dispatch
    ``combine.bool().permute(1, 2, 0) @ x``, combine ``combine.view(S, -1) @ y.view(-1, d)``."""

    def __init__(self, capacity=3, k=2, mutation=None):
        super().__init__()
        self.capacity, self.k, self.mutation = capacity, k, mutation
        self.router = nn.Linear(D, E, bias=False)
        self.experts = BatchedExperts("relu_bmm")

    def forward(self, x):
        S, K, C = x.size(0), self.k, self.capacity
        logits = self.router(x)
        top_v, top_i = logits.topk(K, dim=-1)
        probs = Fn.softmax(torch.full_like(logits, float("-inf")).scatter(-1, top_i, top_v), dim=-1)
        mask = Fn.one_hot(top_i, num_classes=E).permute(1, 0, 2)  # (K, S, E)
        if self.mutation == "positions_per_choice":  # each choice counts from 0: choices share slots
            rank = torch.cumsum(mask, dim=1) - 1
        else:
            rank = (torch.cumsum(mask.reshape(K * S, E), dim=0) - 1).reshape(K, S, E)
        mask *= torch.lt(rank, C)
        slot = torch.sum(mask * rank, dim=-1)  # (K, S)
        combine = torch.sum((mask * probs[None, :]).unsqueeze(3) * Fn.one_hot(slot, num_classes=C).unsqueeze(2), 0)
        y = self.experts(combine.bool().permute(1, 2, 0).type_as(x) @ x)
        return combine.view(S, -1) @ y.view(-1, D)


class ExpertChoiceMoE(nn.Module):
    """Expert-choice routing: affinities softmax over experts, each expert takes its top-C tokens
    ``topk(scores.T, C)``, slots gathered (E, C, d), experts on the slots, gated outputs added back
    to their tokens. ``combine``: "scatter_add_" into zeros, "index_add" into a copy of x (a
    residual), or "index_add_unscored" (no gate). ``gather``: "index" (``x[idx]``) or "flat"
    (``x[idx.reshape(-1)].view(E, C, d)``)."""

    def __init__(self, capacity=3, experts="swiglu_einsum", combine="scatter_add_", gather="index",
                 mutation=None, dropout=0.0):
        super().__init__()
        self.capacity, self.combine, self.gather, self.mutation = capacity, combine, gather, mutation
        self.router = nn.Linear(D, E, bias=False)
        self.experts = BatchedExperts(experts, dropout)

    def forward(self, x):
        C = x.size(0) if self.capacity == "all" else self.capacity
        affinity = Fn.softmax(self.router(x), dim=-1)
        gate, token = torch.topk(affinity.t(), C, dim=-1)  # (E, C)
        slots = x[token] if self.gather == "index" else x[token.reshape(-1)].view(E, C, D)
        if self.mutation == "scores_twice":
            slots = slots * gate.unsqueeze(-1)
        y = self.experts(slots)
        back = token.flip(1) if self.mutation == "written_elsewhere" else token
        if self.combine == "scatter_add_":
            out = torch.zeros_like(x)
            y = y * gate.unsqueeze(-1)
            return out.scatter_add_(0, back.reshape(-1, 1).expand(-1, D), y.reshape(-1, D))
        if self.combine == "index_add":
            return x.clone().index_add_(0, back.reshape(-1), y.reshape(-1, D) * gate.reshape(-1, 1))
        if self.combine == "scatter_add_residual":  # out of place, into x itself: x + the block
            return x.scatter_add(0, back.reshape(-1, 1).expand(-1, D), (y * gate.unsqueeze(-1)).reshape(-1, D))
        if self.combine == "viewed_before":  # a view taken before the in-place add is what is returned
            out = torch.zeros_like(x)
            view = out.view(-1)
            out.scatter_add_(0, back.reshape(-1, 1).expand(-1, D), (y * gate.unsqueeze(-1)).reshape(-1, D))
            return view.view(-1, D) * 1.0
        return x.new_zeros(x.shape).index_add_(0, back.reshape(-1), y.reshape(-1, D))


class DenseScoresMoE(nn.Module):
    """Every token in every expert's slots, inputs scaled by a dense (S, E) score matrix that is 0
    off the top-k, outputs summed over the experts (transformers 5.x ``Llama4TextMoe``, written out).
    ``scores``: "sigmoid_neg_inf" (Llama4: ``sigmoid(full_like(-inf).scatter_(1, idx, v).float())``
    cast back), "zeros" (``torch.zeros_like(logits).scatter(dim=1, index=idx, src=softmax(v))``, out of
    place, no squash). ``experts``: "swiglu_chunk" (Llama4: (E, d, 2n) gate_up, ``chunk(2, -1)``, ``up *
    silu(gate)``) or "relu" (plain). ``mutation`` makes a near-miss (see ``NEAR_MISSES``)."""

    def __init__(self, scores="sigmoid_neg_inf", experts="swiglu_chunk", mutation=None):
        super().__init__()
        self.scores, self.experts, self.mutation = scores, experts, mutation
        self.router = nn.Linear(D, E, bias=False)
        width = 2 * N if experts == "swiglu_chunk" else N
        self.gate_up_proj = nn.Parameter(torch.randn(E, D, width) / D ** 0.5)
        self.down_proj = nn.Parameter(torch.randn(E, N, D) / N ** 0.5)
        if mutation == "bias":
            self.gate_up_bias = nn.Parameter(torch.randn(E, 1, width) / 4)

    def router_scores(self, x):
        logits = self.router(x)
        if self.mutation == "sigmoid_all":  # every expert weighted: not a top-k MoE
            return torch.sigmoid(logits)
        top_v, top_i = torch.topk(logits, K_DENSE, dim=1)
        if self.scores == "zeros":
            return torch.zeros_like(logits).scatter(dim=1, index=top_i, src=Fn.softmax(top_v, dim=-1))
        table = torch.full_like(logits, float("-inf")).scatter_(1, top_i, top_v)
        if self.mutation == "second_write":  # expert 0 gets sigmoid(0) = 0.5 for every token
            table[:, 0] = 0.0
        return torch.sigmoid(table.float()).to(logits.dtype)

    def forward(self, x):
        R = self.router_scores(x)
        routed_in = x.repeat(R.shape[1], 1) * R.transpose(0, 1).reshape(-1, 1)
        h = torch.bmm(routed_in.view(E, -1, D), self.gate_up_proj)
        if self.mutation == "bias":
            h = h + self.gate_up_bias
        if self.experts == "swiglu_chunk":
            gate, up = h.chunk(2, dim=-1)
            h = up * Fn.silu(gate)
        else:
            h = Fn.relu(h)
        y = torch.bmm(h, self.down_proj).view(-1, D)
        if self.mutation == "token_major_sum":  # rows regrouped (S, E, d): sums E consecutive rows
            return y.reshape(-1, E, D).sum(dim=1)
        if self.mutation == "slot_sum":  # sums over the slots: one row per expert
            return y.reshape(E, -1, D).sum(dim=1)
        per_expert = y.reshape(E, -1, D)
        return per_expert.sum(0) if self.experts == "relu" else per_expert.sum(dim=0)  # both spellings


# --------------------------------------------------------------------------- harness

@mark_sonic
class Rewrite:
    """Backend: the sonic rewrite, then the graph as it is; records each compiled graph."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        before = sum(_is_gemm(n) for n in gm.graph.nodes)
        report = rewrite_moe(gm, SonicOptions())
        self.graphs.append(dict(gm=gm, report=report, gemms_before=before,
                                gemms=sum(_is_gemm(n) for n in gm.graph.nodes),
                                fused=sum(n.op == "call_function" and n.target in _FUSED for n in gm.graph.nodes)))
        return gm.forward


def _is_gemm(n):
    return (n.op == "call_function" and n.target in _GEMMS) or (n.op == "call_method" and n.target in ("bmm", "matmul"))


def _fwd_bwd(fn, module, x):
    x = x.detach().clone().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    out = fn(x)
    out.pow(2).sum().backward()
    grads = {name: (p.grad if p.grad is not None else torch.zeros_like(p)) for name, p in module.named_parameters()}
    grads["x"] = x.grad
    return out.detach(), grads


def run(module, lengths=LENGTHS, compare=True) -> Rewrite:
    torch._dynamo.reset()
    backend = Rewrite()
    compiled = torch.compile(module, backend=backend, fullgraph=True)
    for T, seed in lengths:
        x = torch.randn(T, D, generator=torch.Generator().manual_seed(seed))
        if not compare:
            compiled(x)
            continue
        ref, ref_grads = _fwd_bwd(module, module, x)
        out, grads = _fwd_bwd(compiled, module, x)
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4, msg=lambda m: f"T={T} output: {m}")
        for name, g in grads.items():
            torch.testing.assert_close(g, ref_grads[name], atol=1e-4, rtol=1e-4, msg=lambda m: f"T={T} d{name}: {m}")
    assert 1 <= len(backend.graphs) <= 2, f"compiled {len(backend.graphs)} times for two lengths"
    return backend


def seeded(factory, seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory()


def candidates(backend):
    return [(c.idiom, c.status, c.reason) for g in backend.graphs for c in g["report"].candidates]


def assert_rewritten(backend, router_gemms=1):
    for g in backend.graphs:
        rewritten = [c for c in g["report"].candidates if c.status == "rewritten"]
        assert [c.idiom for c in rewritten] == ["expert_slots"], candidates(backend)
        assert g["fused"] == 1, g["gm"].code
        # the experts' GEMMs and the dispatch/combine einsums are gone; the router's remains
        assert g["gemms_before"] > router_gemms and g["gemms"] == router_gemms, g["gm"].code


def assert_declined(backend, *words):
    seen = candidates(backend)
    assert all(g["fused"] == 0 for g in backend.graphs), seen
    reasons = [r for idiom, status, r in seen if idiom == "expert_slots" and status == "declined"]
    assert reasons and all(all(w in r for w in words) for r in reasons), seen


# --------------------------------------------------------------------------- rewritten

CAPACITY_CASES = [
    # (top, capacity, experts, lengths)
    (1, 3, "relu_bmm", LENGTHS),  # Switch: drops tokens at S=8 (E*C = 12 slots, uneven routing)
    (1, 1, "swiglu_einsum", LENGTHS[1:]),  # capacity 1: one token per expert
    (1, 64, "relu_bmm", LENGTHS[1:]),  # capacity far above S: nothing dropped, most slots empty (f_e(0) != 0: bias)
    (2, 3, "relu_bmm", LENGTHS),  # GShard top-2: second choices after every first choice, some dropped
    (2, "auto", "swiglu_einsum", LENGTHS),  # capacity ceil(1.25 S / E): a function of S (Dynamo guards its value)
    ("2_in_place", 3, "relu_bmm", LENGTHS[1:]),  # DeepSpeed's spelling: +=, *=, /= on the routing tensors
]


@pytest.mark.parametrize("top,capacity,experts,lengths", CAPACITY_CASES)
def test_capacity_dispatch(top, capacity, experts, lengths):
    backend = run(seeded(lambda: CapacityMoE(top=top, capacity=capacity, experts=experts)), lengths)
    assert_rewritten(backend, router_gemms=3 if top == "2_in_place" else 1)  # + the gate sums' einsums "se,se->s"
    block = backend.graphs[0]["report"].candidates[0]
    assert block.top_k == (2 if top == "2_in_place" else top) and block.num_experts == E


@pytest.mark.parametrize("capacity,k", [(3, 2), (1, 2), (16, 3)])  # drops; capacity 1; top-3, nothing dropped
def test_stacked_choices(capacity, k):
    backend = run(seeded(lambda: StackedChoicesMoE(capacity, k)), LENGTHS if capacity == 3 else LENGTHS[1:])
    assert_rewritten(backend)
    assert backend.graphs[0]["report"].candidates[0].top_k == k


EC_CASES = [
    # (capacity, experts, combine, gather, lengths)
    (3, "swiglu_einsum", "scatter_add_", "index", LENGTHS),  # the catalogue's shape
    (1, "relu_bmm", "index_add", "flat", LENGTHS[1:]),  # capacity 1, residual accumulator, flat gather + view
    ("all", "swiglu_einsum", "index_add_unscored", "index", LENGTHS),  # C = S: every expert takes every token, no gate
    (2, "relu_bmm", "scatter_add_residual", "index", LENGTHS[1:]),  # out-of-place scatter_add into x: x + the block
    (2, "swiglu_separate", "scatter_add_", "index", LENGTHS[1:]),  # separate biased gate/up stacks
]


@pytest.mark.parametrize("capacity,experts,combine,gather,lengths", EC_CASES)
def test_expert_choice(capacity, experts, combine, gather, lengths):
    backend = run(seeded(lambda: ExpertChoiceMoE(capacity, experts, combine, gather)), lengths)
    assert_rewritten(backend)


DENSE_CASES = [
    # (scores, experts, lengths)
    ("sigmoid_neg_inf", "swiglu_chunk", LENGTHS),  # Llama4 as written: casts around the sigmoid, (E, d, 2n) chunk(2)
    ("zeros", "relu", LENGTHS),  # zeros + out-of-place scatter (keywords) of softmaxed top-k, plain relu, .sum(0)
]


@pytest.mark.parametrize("scores,experts,lengths", DENSE_CASES)
def test_dense_scores(scores, experts, lengths):
    """Every token in every expert's slots (Llama4): rewritten to K rows per token, pre-scaled."""
    backend = run(seeded(lambda: DenseScoresMoE(scores, experts)), lengths)
    assert_rewritten(backend)
    block = backend.graphs[-1]["report"].candidates[0]
    assert block.top_k == K_DENSE and block.num_experts == E
    assert all(f"{part}={name}" in block.parts for part, name in (
        ("dispatch", "dense_scores"), ("experts", "bmm_mlp"), ("combine", "expert_sum"))), block.parts


@pytest.mark.parametrize("name", ["switch_capacity_einsum", "gshard_top2_capacity_einsum", "expert_choice"])
def test_catalogue_entries(name):
    """The catalogue's entries: one block rewritten per graph, only the router's GEMM left (the
    gating einsum of the Switch entry dies with the combine weights it built)."""
    idiom = BY_NAME[name]
    torch._dynamo.reset()
    backend = Rewrite()
    module = idiom.build()
    compiled = torch.compile(module, backend=backend, fullgraph=True)
    for T, seed in LENGTHS[1:]:  # tests/test_idiom_catalogue.py runs both lengths
        (x,) = idiom.inputs(T, seed)
        ref, ref_grads = _fwd_bwd(module, module, x)
        out, grads = _fwd_bwd(compiled, module, x)
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
        for k, g in grads.items():
            torch.testing.assert_close(g, ref_grads[k], atol=1e-4, rtol=1e-4, msg=lambda m: f"d{k}: {m}")
    assert len(backend.graphs) <= 2
    assert_rewritten(backend)


# --------------------------------------------------------------------------- near-misses

NEAR_MISSES = [
    # (module, words the decline reason must contain)
    (lambda: CapacityMoE(top=1, mutation="positions_not_cumsum"), ("slots_dispatch", "slot positions")),
    (lambda: CapacityMoE(top=2, mutation="two_tokens_per_slot"), ("slots_dispatch", "slot positions")),
    (lambda: CapacityMoE(top=2, mutation="no_offset", capacity=64), ("slots_dispatch", "hold two tokens")),
    (lambda: CapacityMoE(top=2, mutation="slot_of_other_choice"), ("slots_dispatch", "slot")),
    (lambda: CapacityMoE(top=1, mutation="combine_of_other_weights"), ("proof", "combined with")),
    (lambda: CapacityMoE(top=1, mutation="dispatch_weighted"), ("slots_dispatch", "twice")),
    (lambda: StackedChoicesMoE(mutation="positions_per_choice"), ("slots_dispatch", "slot positions")),
    (lambda: ExpertChoiceMoE(mutation="scores_twice"), ("proof", "twice")),
    (lambda: ExpertChoiceMoE(mutation="written_elsewhere"), ("proof", "written back")),
    (lambda: ExpertChoiceMoE(combine="viewed_before"), ("combine", "viewed before")),
    # dense scores (Llama4): unselected scores sigmoid(logits) != 0; expert 0's column overwritten after the
    # top-k scatter; a biased gate_up (f_e(0) != 0 on the zero rows of unselected pairs); rows regrouped
    # token-major before the sum; the sum over the slots instead of the experts
    (lambda: DenseScoresMoE(mutation="sigmoid_all"), ("slots_dispatch", "not a scatter")),
    (lambda: DenseScoresMoE(mutation="second_write"), ("slots_dispatch", "written by something else")),
    (lambda: DenseScoresMoE(mutation="bias"), ("proof", "slots_experts", "biases")),
    (lambda: DenseScoresMoE(mutation="token_major_sum"), ("slots_combine", "regroups")),
    (lambda: DenseScoresMoE(mutation="slot_sum"), ("slots_combine", "not over the experts")),
]


@pytest.mark.parametrize("case", range(len(NEAR_MISSES)))
def test_near_miss_declined(case):
    """Each near-miss is left alone (the compiled module still equals eager) with a reason."""
    factory, words = NEAR_MISSES[case]
    backend = run(seeded(factory), lengths=LENGTHS[1:])
    assert_declined(backend, *words)


@pytest.mark.parametrize("factory", [lambda: CapacityMoE(top=2, dropout=0.25), lambda: ExpertChoiceMoE(dropout=0.25)])
def test_dropout_in_training_declined(factory):
    """Dropout on the experts' path in training draws random numbers the fused op cannot
    reproduce: declined (numerics are random, so only the decision is checked)."""
    backend = run(seeded(factory), lengths=LENGTHS[1:], compare=False)
    assert_declined(backend, "dropout")


# --------------------------------------------------------------------------- snapshot

class SnapshotTest(TestCase):
    def test_expert_choice_graph(self):
        """The rewritten expert-choice block: one fused op on (idx.flatten(), arange(E) repeated C
        times, gates.flatten()); the experts' bmm's, the gather and the scatter are gone."""
        backend = run(seeded(lambda: ExpertChoiceMoE(capacity=2, experts="relu_bmm")), lengths=((5, 0),))
        code = normalize_gm(backend.graphs[0]["gm"].print_readable(print_output=False))
        self.assertExpectedInline(code, """\
class GraphModule(torch.nn.Module):
    def forward(self, L_self_modules_router_parameters_weight_: "f32[4, 8]", L_x_: "f32[5, 8]", L_self_modules_experts_parameters_w_in_: "f32[4, 8, 4]", L_self_modules_experts_parameters_b_in_: "f32[4, 1, 4]", L_self_modules_experts_parameters_w_out_: "f32[4, 4, 8]"):
        l_self_modules_router_parameters_weight_ = L_self_modules_router_parameters_weight_
        l_x_ = L_x_
        l_self_modules_experts_parameters_w_in_ = L_self_modules_experts_parameters_w_in_
        l_self_modules_experts_parameters_b_in_ = L_self_modules_experts_parameters_b_in_
        l_self_modules_experts_parameters_w_out_ = L_self_modules_experts_parameters_w_out_

        linear: "f32[5, 4]" = torch._C._nn.linear(l_x_, l_self_modules_router_parameters_weight_, None);  l_self_modules_router_parameters_weight_ = None
        affinity: "f32[5, 4]" = torch.nn.functional.softmax(linear, dim = -1);  linear = None

        t: "f32[4, 5]" = affinity.t();  affinity = None
        topk = torch.topk(t, 2, dim = -1);  t = None
        gate: "f32[4, 2]" = topk[0]
        token: "i64[4, 2]" = topk[1];  topk = None

        unsqueeze: "f32[4, 2, 1]" = gate.unsqueeze(-1);  gate = None

        transpose: "f32[4, 4, 8]" = l_self_modules_experts_parameters_w_in_.transpose(-2, -1);  l_self_modules_experts_parameters_w_in_ = None
        reshape_2: "f32[4, 4]" = l_self_modules_experts_parameters_b_in_.reshape(4, -1);  l_self_modules_experts_parameters_b_in_ = None
        transpose_1: "f32[4, 8, 4]" = l_self_modules_experts_parameters_w_out_.transpose(-2, -1);  l_self_modules_experts_parameters_w_out_ = None
        reshape_3: "i64[8]" = token.reshape(-1)
        arange: "i64[4]" = torch.arange(4, device = device(type='cpu'))
        size = token.size(1);  token = None
        repeat_interleave: "i64[8]" = arange.repeat_interleave(size);  arange = size = None
        reshape_4: "f32[8]" = unsqueeze.reshape(-1);  unsqueeze = None
        to: "i32[8]" = reshape_3.to(torch.int32);  reshape_3 = None
        to_1: "i32[8]" = repeat_interleave.to(torch.int32);  repeat_interleave = None
        fused_moe_default = torch.ops.moe_inductor.fused_moe.default(l_x_, to, to_1, reshape_4, transpose, transpose_1, reshape_2, None, activation = 'relu', interleaved = False, recompute_h = False, impl = 'auto', autocast_like = 'aten::bmm');  l_x_ = to = to_1 = reshape_4 = transpose = transpose_1 = reshape_2 = None
        getitem_3: "f32[5, 8]" = fused_moe_default[0];  fused_moe_default = None
        return (getitem_3,)
""")

    def test_dense_scores_graph(self):
        """The rewritten Llama4-style block: pre-scaled rows x[s] * R[s, idx[s, k]] (R read with gather,
        so the router's gradient flows), one fused op with score 1 per row and experts idx.flatten(),
        each token's K rows summed; the (E*S, d) repeat and both bmm's are gone."""
        backend = run(seeded(lambda: DenseScoresMoE()), lengths=((5, 0),))
        code = normalize_gm(backend.graphs[0]["gm"].print_readable(print_output=False))
        self.assertExpectedInline(code, """\
class GraphModule(torch.nn.Module):
    def forward(self, L_self_modules_router_parameters_weight_: "f32[4, 8]", L_x_: "f32[5, 8]", L_self_parameters_gate_up_proj_: "f32[4, 8, 8]", L_self_parameters_down_proj_: "f32[4, 4, 8]"):
        l_self_modules_router_parameters_weight_ = L_self_modules_router_parameters_weight_
        l_x_ = L_x_
        l_self_parameters_gate_up_proj_ = L_self_parameters_gate_up_proj_
        l_self_parameters_down_proj_ = L_self_parameters_down_proj_

        logits: "f32[5, 4]" = torch._C._nn.linear(l_x_, l_self_modules_router_parameters_weight_, None);  l_self_modules_router_parameters_weight_ = None

        topk = torch.topk(logits, 2, dim = 1)
        top_v: "f32[5, 2]" = topk[0]
        top_i: "i64[5, 2]" = topk[1];  topk = None

        full_like: "f32[5, 4]" = torch.full_like(logits, -inf);  logits = None
        table: "f32[5, 4]" = full_like.scatter_(1, top_i, top_v);  full_like = top_v = None

        float_1: "f32[5, 4]" = table.float();  table = None
        sigmoid: "f32[5, 4]" = torch.sigmoid(float_1);  float_1 = None
        R: "f32[5, 4]" = sigmoid.to(torch.float32);  sigmoid = None

        gather: "f32[5, 2]" = R.gather(1, top_i);  R = None
        unsqueeze: "f32[5, 1, 8]" = l_x_.unsqueeze(1)
        unsqueeze_1: "f32[5, 2, 1]" = gather.unsqueeze(-1)
        mul_2: "f32[5, 2, 8]" = unsqueeze * unsqueeze_1;  unsqueeze = unsqueeze_1 = None
        size = l_x_.size(1)
        reshape_2: "f32[10, 8]" = mul_2.reshape(-1, size);  mul_2 = size = None
        transpose_1: "f32[4, 8, 8]" = l_self_parameters_gate_up_proj_.transpose(-2, -1);  l_self_parameters_gate_up_proj_ = None
        transpose_2: "f32[4, 8, 4]" = l_self_parameters_down_proj_.transpose(-2, -1);  l_self_parameters_down_proj_ = None
        size_1 = reshape_2.size(0)
        arange: "i64[10]" = torch.arange(size_1, device = device(type='cpu'));  size_1 = None
        reshape_3: "i64[10]" = top_i.reshape(-1);  top_i = None
        reshape_4: "f32[10]" = gather.reshape(-1);  gather = None
        ones_like: "f32[10]" = torch.ones_like(reshape_4);  reshape_4 = None
        to_1: "i32[10]" = arange.to(torch.int32);  arange = None
        to_2: "i32[10]" = reshape_3.to(torch.int32);  reshape_3 = None
        fused_moe_default = torch.ops.moe_inductor.fused_moe.default(reshape_2, to_1, to_2, ones_like, transpose_1, transpose_2, None, None, activation = 'swiglu', interleaved = False, recompute_h = False, impl = 'auto', autocast_like = 'aten::bmm');  reshape_2 = to_1 = to_2 = ones_like = transpose_1 = transpose_2 = None
        getitem_4: "f32[10, 8]" = fused_moe_default[0];  fused_moe_default = None
        size_2 = l_x_.size(0)
        size_3 = l_x_.size(1);  l_x_ = None
        view_2: "f32[5, 2, 8]" = getitem_4.view(size_2, 2, size_3);  getitem_4 = size_2 = size_3 = None
        sum_2: "f32[5, 8]" = view_2.sum(1);  view_2 = None
        return (sum_2,)
""")
