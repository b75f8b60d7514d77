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

    def __init__(self, spelling="keyword", near=None, dtype=torch.float32, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.spelling, self.near, self.dtype = spelling, near, dtype
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
        counts = torch.histc(ids.view(-1).float(), bins=E, min=0, max=E).to(ids.dtype)
        order = torch.argsort(ids.view(-1), stable=True)
        top = top.view(-1)[order]
        tok = (order // K).reshape(-1, 1).expand(-1, D)
        rows = torch.gather(x, 0, tok) * top.reshape(-1, 1)
        chunks = self._split(rows, counts)
        y = torch.cat([self._expert(i, c) for i, c in enumerate(chunks)], dim=0)
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
