"""The normal form (moe_inductor/recognize/normal_form.py): in-place elementwise ops on tensors the graph
allocated are made functional before recognition, and nothing else is.

- Spellings real code uses inside the block (``h.mul_(up)``, ``h *= up``, ``F.silu(g, inplace=True)``,
  ``w /= w.sum(...)`` on top-k values) are rewritten by the whole backend, output and every gradient
  equal to eager.
- Near misses keep their in-place op: a view taken before the write, an input, a cast that may
  return its argument, a write that would promote the dtype.
- A fuzz of random straight-line programs (fresh tensors, views, in-place ops, reads, inputs
  written in place) compares the functionalized graph with eager: outputs and the inputs' final
  values.
"""
import random

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from moe_inductor.recognize.normal_form import functionalize
from rewrite_check import rewrite_and_compare

pytestmark = pytest.mark.usefixtures("fresh_dynamo")

D, N, E, K = 16, 8, 4, 2


class _Loop(nn.Module):
    """Stacked-weight experts over range(E) with torch.where, index_add_ combine; the expert body
    is ``body`` (one of the spellings below)."""

    def __init__(self, body, router_inplace=False):
        super().__init__()
        torch.manual_seed(0)
        self.gate = nn.Linear(D, E, bias=False)
        self.w1 = nn.Parameter(torch.randn(E, N, D) * 0.2)
        self.w3 = nn.Parameter(torch.randn(E, N, D) * 0.2)
        self.w2 = nn.Parameter(torch.randn(E, D, N) * 0.2)
        self.body, self.router_inplace = body, router_inplace

    def forward(self, x):
        probs = F.softmax(self.gate(x), dim=-1)
        w, ids = torch.topk(probs, K, dim=-1)
        if self.router_inplace:
            w /= w.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(x)
        for e in range(E):
            tok, k = torch.where(ids == e)
            h = x[tok]
            y = self.body(h, self.w1[e], self.w3[e], self.w2[e])
            out.index_add_(0, tok, y * w[tok, k, None])
        return out


def body_mul_(h, w1, w3, w2):
    a = F.silu(F.linear(h, w1))
    a.mul_(F.linear(h, w3))
    return F.linear(a, w2)


def body_imul(h, w1, w3, w2):
    a = F.silu(F.linear(h, w1))
    a *= F.linear(h, w3)
    return F.linear(a, w2)


def body_inplace_act(h, w1, w3, w2):
    return F.linear(F.silu(F.linear(h, w1), inplace=True) * F.linear(h, w3), w2)


def body_plain(h, w1, w3, w2):
    return F.linear(F.silu(F.linear(h, w1)) * F.linear(h, w3), w2)


@pytest.mark.parametrize("body,router_inplace", [
    (body_mul_, False), (body_imul, False), (body_inplace_act, False), (body_plain, True), (body_mul_, True),
], ids=["mul_", "imul", "silu_inplace", "router_idiv", "mul_+router_idiv"])
def test_inplace_spellings_are_rewritten_and_exact(body, router_inplace):
    cands = rewrite_and_compare(_Loop(body, router_inplace), D)
    assert cands and all(c.status == "rewritten" for c in cands), [(c.status, c.reason) for c in cands]


# ----- functionalize on Dynamo graphs, against eager -------------------------------------------
def _check(fn, *inputs, expect_rewritten=None):
    """Compile ``fn`` with a backend that functionalizes the graph and runs it; the outputs and the
    inputs' final values (in-place writes to inputs) equal eager's. Returns the number of ops made
    functional."""
    made = []

    def backend(gm, example_inputs):
        made.append(functionalize(gm))
        return gm.forward

    eager_in = [t.clone() for t in inputs]
    comp_in = [t.clone() for t in inputs]
    ref = fn(*eager_in)
    out = torch.compile(fn, backend=backend, fullgraph=True)(*comp_in)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    for a, b in zip(comp_in, eager_in):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    if expect_rewritten is not None:
        assert sum(made) == expect_rewritten, made
    return sum(made)


def test_readers_before_the_write_keep_the_old_value():
    def fn(x):
        h = x * 3
        before = h + 1
        h.mul_(2)
        return before + h

    _check(fn, torch.randn(5), expect_rewritten=1)


def test_view_taken_before_the_write_keeps_the_in_place_op():
    def fn(x):
        h = x * 3
        v = h.view(-1)
        h.mul_(2)
        return v + 0

    _check(fn, torch.randn(2, 3), expect_rewritten=0)


def test_input_and_parameter_like_tensors_keep_the_in_place_op():
    def fn(x):
        x.mul_(2)
        return x + 1

    _check(fn, torch.randn(4), expect_rewritten=0)


def test_cast_that_may_return_its_argument_keeps_the_in_place_op():
    def fn(x):
        h = x.float()  # x is float32: h is x itself
        h.add_(1)
        return h * 2

    _check(fn, torch.randn(4), expect_rewritten=0)


def test_promoting_write_keeps_the_in_place_op():
    def fn(x, s):
        h = x * 2  # bf16
        h.mul_(s)  # fp32 tensor: in place keeps bf16, functional would be fp32
        return h

    _check(fn, torch.randn(4, 3, dtype=torch.bfloat16), torch.randn(4, 3), expect_rewritten=0)


def test_accumulation_into_a_zeros_buffer_is_left_to_the_combine():
    def fn(x):
        out = torch.zeros_like(x)
        out += x * 2
        return out

    _check(fn, torch.randn(4), expect_rewritten=0)


def test_top_k_values_divided_in_place():
    def fn(x):
        w, i = torch.topk(x.softmax(-1), 2, dim=-1)
        w /= w.sum(-1, keepdim=True)
        return w * 1, i

    x = torch.randn(5, 4)
    made = []

    def backend(gm, example_inputs):
        made.append(functionalize(gm))
        return gm.forward

    ref = fn(x)
    out = torch.compile(fn, backend=backend, fullgraph=True)(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert made == [1]


# ----- fuzz ------------------------------------------------------------------------------------
_FRESH = ["mul", "add", "sigmoid", "linear", "topk", "rows"]  # rows: t[index list], a copy
_VIEWS = ["view", "transpose", "slice", "row0d"]  # row0d: t[0-dim int tensor], a view
_INPLACE = ["mul_", "add_", "imul", "iadd", "sigmoid_", "silu_inplace", "clamp_", "masked_fill_"]


def _program(rng, steps=10):
    prog = []
    for _ in range(steps):
        kind = rng.choice(["fresh", "fresh", "view", "inplace", "inplace", "inplace", "read"])
        prog.append((kind, rng.choice({"fresh": _FRESH, "view": _VIEWS, "inplace": _INPLACE, "read": [""]}[kind]),
                     rng.randrange(1000), rng.choice([True, False])))
    return prog


def _run(prog, x, w):
    pool = [x]  # x: an input (may itself be written in place)
    acc = x.sum() * 0
    for kind, op, pick, flag in prog:
        t = pool[pick % len(pool)]
        if kind == "fresh":
            if (op == "linear" and t.shape[-1] != w.shape[-1]) or (op == "topk" and t.shape[-1] < 2):
                op = "mul"
            new = {"mul": lambda: t * 1.5, "add": lambda: t + 0.25, "sigmoid": lambda: torch.sigmoid(t),
                   "linear": lambda: F.linear(t, w), "topk": lambda: torch.topk(t, 2, dim=-1)[0],
                   "rows": lambda: t[torch.tensor([0, 1, 1])]}[op]()
            pool.append(new)
        elif kind == "view":
            if t.shape[-1] != t.shape[0]:
                continue
            pool.append({"view": lambda: t.view(t.shape), "transpose": lambda: t.transpose(0, 1),
                         "slice": lambda: t[:, :2], "row0d": lambda: t[torch.tensor(1)]}[op]())
        elif kind == "inplace":
            if op == "mul_":
                t.mul_(0.5)
            elif op == "add_":
                t.add_(pool[0] * 0.1 if flag and t.shape == pool[0].shape else 1.0)
            elif op == "imul":
                t *= 2.0
            elif op == "iadd":
                t += 0.5
            elif op == "sigmoid_":
                t.sigmoid_()
            elif op == "silu_inplace":
                F.silu(t, inplace=True)
            elif op == "clamp_":
                t.clamp_(-0.5, 0.5)
            elif op == "masked_fill_":
                t.masked_fill_(t > 0.3, -1.0)
        else:
            acc = acc + t.sum()
    return acc + sum(p.sum() for p in pool)


@pytest.mark.parametrize("seed", range(32))
def test_fuzz_functionalized_equals_eager(seed):
    rng = random.Random(seed)
    prog = _program(rng)
    x = torch.randn(4, 4)
    w = torch.randn(4, 4)
    _check(lambda x, w: _run(prog, x, w), x, w)


def test_fuzz_rewrites_something():
    # the fuzz is not vacuous: over its seeds, ops are made functional and others are kept
    made = 0
    for seed in range(32):
        rng = random.Random(seed)
        prog = _program(rng)
        made += _check(lambda x, w: _run(prog, x, w), torch.randn(4, 4), torch.randn(4, 4))
        torch._dynamo.reset()
    assert made > 10, made
