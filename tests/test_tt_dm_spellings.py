"""Spellings of torchtune's ``GroupedExperts`` loop path (issue 18, ``tests/faithful/torchtune_moe.py``).

- ``moe_inductor/dynamo/loop_capture.py`` (``_split_sizes``): a split whose sizes are host counts given
  by keyword (``torch.split(x, split_size_or_sections=counts.tolist(), dim=0)``) or as the inline
  ``.tolist()`` call itself marks the frame for tracing the counts as symbolic sizes, as the positional
  ``sizes = counts.tolist(); rows.split(sizes)`` form already did.
- ``moe_inductor/dynamo/host_splits.py`` (``_matmul_parts``): an expert projection ``torch.matmul(chunk,
  W[e])`` / ``chunk @ W[e]`` / ``mm`` on stacked weights stored (in, out) is a grouped GEMM on the
  stacked weights used as they are (``grouped_mm`` takes (E, in, out)): each group runs the expert's
  own ``mm`` on its rows.

Rewritten cases are compared with eager (output, input gradient and every parameter gradient) in fp32
and bf16; near misses (rows run through the wrong experts, experts computing different functions) are
not composed and stay equal to eager.
"""
from __future__ import annotations

import ast
import logging
import textwrap

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from moe_inductor.dynamo import host_splits  # noqa: F401  (registers moe_inductor::grouped_mm)
from moe_inductor.dynamo import loop_capture
from rewrite_check import rewrite_and_compare

D, N, E, K = 16, 8, 4, 2


class TuneLike(nn.Module):
    """torchtune's MoE loop path on (T, D) tokens: sigmoid top-k, histc counts, stable argsort, gather,
    scores on the rows before the experts, ``torch.split(rows, split_size_or_sections=counts.tolist())``,
    per expert ``matmul`` on (in, out) stacked weights, cat, ``scatter_add`` into zeros.

    ``spelling``: how the split and the GEMMs are written; ``near``: "flipped" (the sizes of the
    counts in reverse expert order: rows through the wrong experts), "gelu_one" (expert 1 uses gelu,
    the others silu: not one function)."""

    def __init__(self, spelling="keyword", near=None, dtype=torch.float32, seed=0, leaves=False):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.spelling, self.near, self.dtype, self.leaves = spelling, near, dtype, leaves
        self.gate = nn.Linear(D, E, bias=False)
        with torch.no_grad():
            self.gate.weight.copy_(torch.randn(E, D, generator=g) / D ** 0.5)
        self.w1 = nn.Parameter((torch.randn(E, D, N, generator=g) / D ** 0.5).to(dtype))
        self.w3 = nn.Parameter((torch.randn(E, D, N, generator=g) / D ** 0.5).to(dtype))
        self.w2 = nn.Parameter((torch.randn(E, N, D, generator=g) / N ** 0.5).to(dtype))

    def _split(self, rows, counts):
        if self.near == "flipped":
            return torch.split(rows, split_size_or_sections=counts.flip(0).tolist(), dim=0)
        if self.spelling == "keyword":
            return torch.split(rows, split_size_or_sections=counts.tolist(), dim=0)
        return rows.split(counts.tolist(), 0)  # "inline": the method, the host copy inline

    def _expert(self, i, z):
        mm = (lambda a, b: a @ b) if self.spelling == "inline" else torch.matmul
        act = F.gelu if self.near == "gelu_one" and i == 1 else F.silu
        h = act(mm(z, self.w1[i])) * mm(z, self.w3[i])
        return mm(h, self.w2[i])

    def forward(self, x):
        x = x.to(self.dtype)
        scores = torch.sigmoid(self.gate(x.float())).to(x.dtype)
        top, ids = torch.topk(scores, K, dim=1)
        if self.leaves:  # David Rau's gates: a leaf with the flag as the only keyword, scattered into
            zeros = torch.zeros_like(scores, requires_grad=True)
            gates = zeros.scatter(1, ids, top)
            self.importance = gates.sum(0)
        counts = torch.histc(ids.view(-1).float(), bins=E, min=0, max=E).to(ids.dtype)
        order = torch.argsort(ids.view(-1), stable=True)
        top = top.view(-1)[order]
        tok = (order // K).reshape(-1, 1).expand(-1, D)
        rows = torch.gather(x, 0, tok) * top.reshape(-1, 1)
        chunks = self._split(rows, counts)
        y = torch.cat([self._expert(i, c) for i, c in enumerate(chunks)], dim=0)
        if self.leaves:  # David Rau's combine: an fp32 leaf, index_add of the rows cast by .float()
            acc = torch.zeros(x.shape[0], D, requires_grad=True, device=x.device)
            return acc.index_add(0, order // K, y.float())
        return torch.zeros_like(x).scatter_add(0, tok, y).float()


def _rewritten(cands):
    return [c for c in cands if c.status == "rewritten"]


@pytest.mark.parametrize("spelling", ["keyword", "inline"])
def test_keyword_split_matmul_experts_rewritten_fp32(spelling):
    cands = rewrite_and_compare(TuneLike(spelling), D, lengths=(5, 8), tol=1e-4)
    done = _rewritten(cands)
    assert done and {c.idiom for c in done} == {"sorted_rows"}, [(c.idiom, c.status, c.reason) for c in cands]


def test_keyword_split_matmul_experts_rewritten_bf16():
    cands = rewrite_and_compare(TuneLike("keyword", dtype=torch.bfloat16), D, lengths=(5, 8), tol=3e-2,
                                rel_norm=True)
    assert {c.idiom for c in _rewritten(cands)} == {"sorted_rows"}, [(c.idiom, c.status, c.reason) for c in cands]


@pytest.mark.parametrize("near", ["flipped", "gelu_one"])
def test_near_misses_not_composed(near, caplog):
    """Not the sorted-rows block (the experts alone may still be one fused call on the grouped rows,
    ``local_experts``, exact whatever the rest does); output and gradients equal to eager."""
    with caplog.at_level(logging.INFO, logger="moe_inductor"):
        cands = rewrite_and_compare(TuneLike("keyword", near=near), D, lengths=(5, 8), tol=1e-4)
    assert not any(c.idiom == "sorted_rows" for c in _rewritten(cands)), [(c.idiom, c.status) for c in cands]
    if near == "gelu_one":
        notes = "\n".join(r.getMessage() for r in caplog.records)
        assert "computes another function than expert 0" in notes, notes


def _notes_of(src: str) -> list:
    fdef = ast.parse(textwrap.dedent(src)).body[0]
    return loop_capture._split_notes(fdef, "f.py", "f")


@pytest.mark.parametrize("src", [
    "def f(self, x, n):\n    xs = torch.split(x, split_size_or_sections=n.tolist(), dim=0)\n    return torch.cat(xs)",
    "def f(self, x, n):\n    xs = torch.split(x, n.tolist(), 0)\n    return torch.cat(xs)",
    "def f(self, x, n):\n    xs = x.split(split_size=n.tolist())\n    return torch.cat(xs)",
    "def f(self, x, n):\n    xs = torch.split(tensor=x, split_size_or_sections=n.tolist())\n    return torch.cat(xs)",
])
def test_split_by_host_sizes_spellings_marked(src):
    assert len(_notes_of(src)) == 1


@pytest.mark.parametrize("src", [
    "def f(self, x, n):\n    xs = torch.split(x, split_size_or_sections=2, dim=0)\n    return torch.cat(xs)",
    "def f(self, x, n):\n    xs = torch.split(x, split_size_or_sections=n.tolist(), dim=0)\n    return xs",  # no cat
    "def f(self, x, n):\n    xs = torch.split(x, split_size_or_sections=self.sizes)\n    return torch.cat(xs)",
])
def test_split_look_alikes_not_marked(src):
    assert _notes_of(src) == []


# -- grad_leaves: requires_grad=True creations whose gradient nobody reads (David Rau's SparseDispatcher) --

@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_unread_leaves_bare_flag_and_float_source_one_graph(dtype, tol):
    """``zeros_like(s, requires_grad=True)`` (the flag its only keyword: it used to stay, an empty
    kwargs dict read as 'nothing dropped') and ``zeros(..., requires_grad=True).index_add(0, i,
    y.float())`` (the source a floating cast of a local): one graph (fullgraph), rewritten, exact."""
    cands = rewrite_and_compare(TuneLike("keyword", dtype=dtype, leaves=True), D, lengths=(5, 8), tol=tol,
                                rel_norm=dtype != torch.float32)
    assert {c.idiom for c in _rewritten(cands)} == {"sorted_rows"}, [(c.idiom, c.status, c.reason) for c in cands]


def _use_of(body: str):
    from moe_inductor.dynamo import grad_leaves

    ns: dict = {"torch": torch}
    exec(compile(textwrap.dedent(body), "<leaf>", "exec"), ns)  # noqa: S102  (a test's own source)
    grad_leaves._cache.clear()
    return ns["f"].__code__


@pytest.mark.parametrize("source,ok", [
    ("y.float()", True), ("y.double()", True), ("y", True),
    ("y.long()", False),  # not a floating cast: the flag stays
    ("y.float() * 2", False),  # not a local or a cast of one
    ("y.to(torch.float32)", False),  # a cast with arguments: not taken
])
def test_leaf_source_spellings(source, ok, monkeypatch):
    import inspect
    from moe_inductor.dynamo import grad_leaves

    body = f"def f(y, i):\n    z = torch.zeros(4, 3, requires_grad=True)\n    return z.index_add(0, i, {source})\n"
    code = _use_of(body)
    monkeypatch.setattr(inspect, "getsourcelines", lambda c: (body.splitlines(True), 1))
    name, why = grad_leaves.source_of_use(code, 2)
    assert (name == "y") is ok and (why is None) is ok, (name, why)


# -- experts: an MLP followed by softmax over its output (David Rau's MLP) is declined, naming it ----------

class SoftmaxExpert(nn.Module):
    """David Rau's expert: Linear, ReLU, Linear, then (``soft``) nn.Softmax(1)."""

    def __init__(self, soft=True):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(D, N), nn.Linear(N, D)
        self.soft = nn.Softmax(1) if soft else nn.Identity()

    def forward(self, x):
        return self.soft(self.fc2(torch.relu(self.fc1(x))))


class WhereLoop(nn.Module):
    def __init__(self, soft=True, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.gate = nn.Linear(D, E, bias=False)
        self.experts = nn.ModuleList(SoftmaxExpert(soft) for _ in range(E))

    def forward(self, x):
        w, ids = F.softmax(self.gate(x), dim=-1).topk(K, dim=-1)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok, k = torch.where(ids == e)
            out.index_add_(0, tok, expert(x[tok]) * w[tok, k, None])
        return out


def test_softmax_expert_declined_with_its_reason():
    cands = rewrite_and_compare(WhereLoop(soft=True), D, lengths=(5, 8), tol=1e-4)
    assert not _rewritten(cands), [(c.idiom, c.status) for c in cands]
    reasons = [c.reason for c in cands if c.status == "declined"]
    assert reasons and all("ends with softmax" in r for r in reasons), [(c.idiom, c.status, c.reason) for c in cands]


def test_plain_expert_of_the_same_loop_rewritten():
    cands = rewrite_and_compare(WhereLoop(soft=False), D, lengths=(5, 8), tol=1e-4)
    assert _rewritten(cands), [(c.idiom, c.status, c.reason) for c in cands]
