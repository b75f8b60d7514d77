"""Experts whose linears are adapted by a scaled low-rank product (LoRA): ``y = W x [+ b] + s * B(A x)``
(mistral-inference's ``LoRALinear``, PEFT's ``Linear``), recognised by the experts part as one projection
with the merged weight ``W + s * (B @ A)`` (``patterns.experts.low_rank``, ``parts.LowRankWeight``),
which the composition builds in the graph so that autograd of the merge gives W, A and B their
gradients.

Here: the spellings (``nn.Linear`` modules, ``F.linear``, ``x @ A.T``, weights stored (in, out), the scale
left, right, before B or absent, a bias on the base before or after the low-rank sum, PEFT's identity
dropout and same-dtype cast) rewritten in a per-expert loop, exact (output and every gradient vs
eager) in fp32 and bf16; the boolean-mask and chunked-slots compositions; near misses not rewritten,
with the reason where the sum is shaped like one (a tensor scale over part of the columns, a branch on
another input, dropout in training on the branch input, a nonlinearity between A and B, a bias on A,
a reader of the branch's intermediate).
"""
from __future__ import annotations

import operator

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from rewrite_check import rewrite_and_compare

E, K, d, n, r = 4, 2, 16, 8, 2
S = 2.0

class LoRALinear(nn.Module):
    """A linear d_in -> d_out plus a rank-r product, spelled as ``form``; the near misses compute
    something else (or the same through a branch the merge does not read)."""

    def __init__(self, d_in, d_out, form="functional", bias=False):
        super().__init__()
        self.form = form
        t = form == "in_out"  # parameters stored (in, out), used as x @ W
        self.weight = nn.Parameter(torch.randn(*((d_in, d_out) if t else (d_out, d_in))) / d_in ** 0.5)
        self.A = nn.Parameter(torch.randn(*((d_in, r) if t else (r, d_in))) / d_in ** 0.5)
        self.B = nn.Parameter(torch.randn(*((r, d_out) if t else (d_out, r))) / r ** 0.5)
        self.bias = nn.Parameter(torch.randn(d_out) * 0.1) if bias or form == "bias_after" else None
        self.a_bias = nn.Parameter(torch.randn(r) * 0.1) if form == "bias_on_a" else None
        self.register_buffer("cols", torch.cat([torch.full((d_out // 2,), S), torch.ones(d_out - d_out // 2)]))
        self.drop = nn.Dropout(0.5 if form == "dropout_train" else 0.0)
        if form == "module":  # mistral-inference's LoRALinear: three nn.Linear modules
            self.linear, self.lora_A, self.lora_B = nn.Linear(d_in, d_out, bias=bias), nn.Linear(d_in, r, bias=False), \
                nn.Linear(r, d_out, bias=False)

    def forward(self, x):
        f, W, A, B, b = self.form, self.weight, self.A, self.B, self.bias
        if f == "module":
            return self.linear(x) + self.lora_B(self.lora_A(x)) * S
        if f == "matmul":
            return x @ W.T + (x @ A.T) @ B.T * S
        if f == "in_out":
            return x @ W + S * ((x @ A) @ B)
        if f == "bias_after":
            return (F.linear(x, W) + F.linear(F.linear(x, A), B) * S) + b
        base = F.linear(x, W, b)
        if f == "peft":  # result + lora_B(lora_A(dropout(x.to(A.dtype)))) * scaling, dropout p = 0
            return base + F.linear(F.linear(self.drop(x.to(A.dtype)), A), B) * S
        low = {"functional": lambda: F.linear(F.linear(x, A), B) * S,
               "scale_left": lambda: S * F.linear(F.linear(x, A), B),
               "scale_before_b": lambda: F.linear(F.linear(x, A) * S, B),
               "no_scale": lambda: F.linear(F.linear(x, A), B),
               # near misses
               "tensor_scale": lambda: F.linear(F.linear(x, A), B) * self.cols,  # only half the columns scaled
               "other_input": lambda: F.linear(F.linear(x.detach(), A), B) * S,
               "dropout_train": lambda: F.linear(F.linear(self.drop(x), A), B) * S,
               "nonlinear": lambda: F.linear(F.relu(F.linear(x, A)), B) * S,
               "bias_on_a": lambda: F.linear(F.linear(x, A, self.a_bias), B) * S}[f]
        if f == "scale_left":
            return low() + base
        return base + low()


class GatedLoRA(nn.Module):
    """mistral-inference ``FeedForward``: ``w2(silu(w1 x) * w3 x)``, projection i a ``LoRALinear`` spelled
    ``forms[i]`` (``"plain"``: an ``nn.Linear``)."""

    def __init__(self, forms, bias=False):
        super().__init__()
        lin = lambda a, b, f: nn.Linear(a, b, bias=bias) if f == "plain" else LoRALinear(a, b, f, bias)  # noqa: E731
        self.w1, self.w2, self.w3 = lin(d, n, forms[0]), lin(n, d, forms[1]), lin(d, n, forms[2])

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def _spread(forms) -> list:
    """Per expert, the forms of its three projections: ``forms`` taken in turn (one form: everywhere)."""
    forms = [forms] if isinstance(forms, str) else list(forms)
    return [tuple(forms[(3 * e + i) % len(forms)] for i in range(3)) for e in range(E)]


class LoopLoRA(nn.Module):
    """mistral-inference ``MoeLayer.forward``: top-k logits, softmax over the picks in fp32, the
    ``enumerate(experts)`` loop with ``where(selected == i)`` and the indexed ``+=``; the experts'
    projections spelled by ``forms`` (``_spread``)."""

    def __init__(self, forms="functional", bias=False, dtype=torch.float32):
        super().__init__()
        self.gate = nn.Linear(d, E, bias=False)
        self.experts = nn.ModuleList(GatedLoRA(f, bias) for f in _spread(forms))
        self.to(dtype)
        self.dtype = dtype

    def forward(self, x):
        x = x.to(self.dtype)
        w, ids = torch.topk(self.gate(x), K)
        w = F.softmax(w, dim=1, dtype=torch.float).to(x.dtype)
        out = torch.zeros_like(x)
        for i, expert in enumerate(self.experts):
            tok, k = torch.where(ids == i)
            out[tok] += w[tok, k, None] * expert(x[tok])
        return out.float()


#: the spellings in Linear layout without bias, spread over the 12 projections of one loop
MIXED = ["module", "functional", "scale_left", "scale_before_b", "no_scale", "matmul", "peft"]


def _statuses(cands):
    return [(c.status, c.reason) for c in cands]


def _rewritten(cands):
    assert cands and all(c.status == "rewritten" for c in cands), _statuses(cands)


def _not_rewritten(cands, reason=None):
    assert cands and all(c.status != "rewritten" for c in cands), _statuses(cands)
    if reason is not None:
        assert any(reason in (c.reason or "") for c in cands), _statuses(cands)


def test_loop_of_lora_experts_rewritten():
    """Every spelling in one loop (two lengths: the second recompiles with a symbolic length)."""
    torch.manual_seed(0)
    _rewritten(rewrite_and_compare(LoopLoRA(MIXED), d))


def test_weights_stored_in_out_rewritten():
    """``x @ W + s * ((x @ A) @ B)`` with every weight stored (in, out): merged in that layout."""
    torch.manual_seed(0)
    _rewritten(rewrite_and_compare(LoopLoRA("in_out"), d, lengths=(6,)))


def test_biased_and_plain_projections_rewritten():
    """A bias on the base linear (``F.linear(x, W, b) + ...``, ``nn.Linear`` modules, ``(W x + ...) + b``),
    and plain biased ``nn.Linear`` projections beside adapted ones (in the same expert and across experts)."""
    torch.manual_seed(0)
    forms = ["functional", "plain", "bias_after", "module", "plain", "plain"]
    _rewritten(rewrite_and_compare(LoopLoRA(forms, bias=True), d, lengths=(6,)))


def _close_bf16(got, want, tol=3e-2):
    """The catalogue's bf16 rule (``test_idiom_catalogue.close``): the relative norm error per tensor at
    most ``tol``, no element off by more than a quarter of the tensor's largest value."""
    g, w = got.double(), want.double()
    assert (g - w).norm() <= tol * max(w.norm(), 1e-6), ((g - w).norm() / w.norm())
    assert (g - w).abs().max() <= 0.25 * w.abs().max() + 1e-6


def _compare_bf16(module, lengths=(16, 32)) -> list:
    """``rewrite_and_compare`` with the bf16 rule: output and every gradient against eager. (At 5 tokens
    a few experts get one or two rows, and eager and the rewrite each differ from a float64 run by up to
    3e-2 on some low-rank factors' gradients, so the two differ by more than the rule allows; the fused
    op on plain Linears holding the merged weights differs from float64 as much: rounding, not the
    merge.)"""
    from rewrite_check import rewrite_and_compare

    return rewrite_and_compare(module, d, lengths=lengths, close=_close_bf16)


def test_loop_of_lora_experts_rewritten_bf16():
    torch.manual_seed(0)
    _rewritten(_compare_bf16(LoopLoRA(MIXED, dtype=torch.bfloat16), lengths=(24,)))


def test_mask_dispatch_of_lora_experts_rewritten():
    """Boolean-mask top-1 dispatch (``out[idx == e] = w * experts[e](x[idx == e])``)."""
    from moe_modules import MaskDispatchMoE

    torch.manual_seed(0)
    m = MaskDispatchMoE(d=d, n=n, E=E, expert=lambda d_, n_: GatedLoRA(("module", "scale_left", "plain"), bias=True))
    _rewritten(rewrite_and_compare(m, d, lengths=(6,)))


def test_chunked_slots_of_lora_experts_rewritten():
    """fairscale's ``MOELayer``: one ModuleList FFN per chunk of the (E, C, d) slots, LoRA linears."""
    from test_slot_spellings import FairscaleSlots

    torch.manual_seed(0)
    m = FairscaleSlots("chunks")
    m.experts = nn.ModuleList(nn.Sequential(LoRALinear(d, n, "module", bias=True), nn.ReLU(),
                                            LoRALinear(n, d, "scale_left", bias=True)) for _ in range(E))
    cands = rewrite_and_compare(m, d, lengths=(8,))
    assert [c.status for c in cands] == ["rewritten"], _statuses(cands)


@pytest.mark.parametrize("form, reason", [
    ("tensor_scale", "a tensor, not one Python constant"),
    ("other_input", "the low-rank branch reads"),
    ("dropout_train", "the low-rank branch reads"),
    ("nonlinear", None),
    ("bias_on_a", None),
])
def test_lora_near_misses_not_rewritten(form, reason):
    """Only the up projection (w3) is the look-alike; the others are plain linears."""
    torch.manual_seed(0)
    reseed = (lambda m: torch.manual_seed(1)) if form == "dropout_train" else None  # the same dropout masks
    m = LoopLoRA(("plain", "plain", form))
    _not_rewritten(rewrite_and_compare(m, d, lengths=(6,), before_each=reseed), reason)


# --------------------------------------------------------------------------- the part on its own

def _graph(fn, *args):
    """Dynamo's graph of ``fn`` (the rewrite does not run)."""
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=keep, fullgraph=True)(*args)
    return graphs[0].graph


def _adds(graph):
    return [nd for nd in graph.nodes if nd.op == "call_function" and nd.target in (operator.add, torch.add)]


def _operands():
    torch.manual_seed(0)
    return torch.randn(5, d), torch.randn(n, d), torch.randn(r, d), torch.randn(n, r)


def test_projection_gives_the_merged_weight():
    from moe_inductor.recognize.parts import LowRankWeight
    from moe_inductor.patterns.experts import projection

    g = _graph(lambda x, W, A, B: F.linear(x, W) + F.linear(F.linear(x, A) * 0.5, B) * 3.0, *_operands())
    x, w, transposed, bias = projection(_adds(g)[-1])
    assert isinstance(w, LowRankWeight) and w.scale == 1.5 and not transposed and bias is None
    assert [p.op for p in (x, *w.nodes())] == ["placeholder"] * 4


@pytest.mark.parametrize("spelling, reason", [
    # the branch's intermediate is also returned
    (lambda x, W, A, B: (F.linear(x, W) + F.linear(F.linear(x, A), B) * S, F.linear(x, A).sum()), None),
    (lambda x, W, A, B: (lambda a: (F.linear(x, W) + F.linear(a, B) * S, a))(F.linear(x, A)), "also read by"),
    (lambda x, W, A, B: (lambda y: (y + F.linear(F.linear(x, A), B) * S, y))(F.linear(x, W)),
     "read by something else"),
    (lambda x, W, A, B: F.linear(x, W) + F.linear(F.linear(x * 2, A), B), "the low-rank branch reads"),
    (lambda x, W, A, B: F.linear(x, W) + F.linear(F.linear(x, A), B) * float("inf"), "not finite"),
])
def test_projection_proof(spelling, reason):
    """A reader of the branch's intermediate or of the linear's output, another input, a non-finite
    scale: not one projection (and the reason, where the sum is shaped like one). The first case
    reads a recomputed intermediate (Dynamo records A x twice): the sum itself is still proven."""
    from moe_inductor.patterns.experts import low_rank_miss, projection

    g = _graph(spelling, *_operands())
    add = _adds(g)[0]
    if reason is None:
        assert projection(add) is not None
        return
    assert projection(add) is None
    assert reason in (low_rank_miss(add, 1) or ""), low_rank_miss(add, 1)
