"""Branches on tensors proved to hold one constant (``moe_inductor.dynamo.uniform_values``), taken at trace
time in sonic frames: fairseq's ``top1gating`` ``if input_mask.any():`` on ``MOELayer``'s padding mask
``ones((n,), bool)`` with ``[:n] = False`` (all False for every n). The MoE block after such a branch is
rewritten from the first call (one graph, output and every gradient equal to eager, fp32 and bf16);
look-alikes whose branch is not decided by the graph keep Dynamo's graph break and eager's outcome:
a write that may not cover the mask (``[:n - 1]``), a mask from the input, a second writer, ``all()``
of a possibly empty tensor (the block after the break may still be rewritten there, as any graph's).
Plain Inductor is unchanged.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as Fn

from moe_inductor.dynamo import shape_items, uniform_values
from moe_inductor.fx.shapes import example_value
from rewrite_check import light_backend, rewrite_and_compare

E, K, d, n = 4, 2, 16, 32


def _padding(x, form):
    """MOELayer's padding mask over the (S, d) tokens, and look-alikes."""
    s = x.shape[0]
    expected = int((s * torch.ones((1,), dtype=torch.long, device=x.device)).item())  # all-reduce MAX at world size 1
    mask = torch.ones((expected,), dtype=torch.bool, device=x.device)
    if form == "fairseq":
        mask[:s] = False
    elif form == "fill":  # a spelling: every element written by fill_
        mask.fill_(False)
    elif form == "short":  # near miss: the last token stays padding
        mask[:s - 1] = False
    elif form == "input":  # near miss: a mask computed from the data
        mask = x[:, 0] > 4.0
    elif form == "second_writer":  # near miss: a data-dependent second write
        mask[:s] = False
        mask |= x[:, 0] > 4.0
    return mask


class PaddedTop2(nn.Module):
    """Top-2 softmax router over a loop of experts (``torch.where(selected == e)``, ``index_add_``),
    the router's probabilities zeroed on padding tokens only ``if mask.any()`` (fairseq's top1gating)."""

    def __init__(self, form="fairseq", dtype=torch.float32):
        super().__init__()
        self.form = form
        self.gate = nn.Linear(d, E, bias=False, dtype=dtype)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(d, n, bias=False, dtype=dtype), nn.GELU(),
                                                   nn.Linear(n, d, bias=False, dtype=dtype)) for _ in range(E))

    def forward(self, x):
        x = x.to(self.gate.weight.dtype)
        mask = _padding(x, self.form)
        probs = Fn.softmax(self.gate(x), dim=-1, dtype=torch.float)
        if mask is not None and mask.any():
            probs = probs * (~mask).unsqueeze(-1).to(probs.dtype)
        weights, selected = torch.topk(probs, K, dim=-1)
        weights = weights.to(x.dtype)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok, k = torch.where(selected == e)
            out.index_add_(0, tok, expert(x[tok]) * weights[tok, k].unsqueeze(-1))
        return out


def _statuses(cands):
    return [(c.status, c.reason) for c in cands]


@pytest.mark.parametrize("form", ["fairseq", "fill"])
def test_padding_branch_rewritten(form):
    torch.manual_seed(0)
    cands = rewrite_and_compare(PaddedTop2(form), d, lengths=(5, 8))  # one graph: fullgraph=True
    assert cands and all(c.status == "rewritten" for c in cands), _statuses(cands)


def test_padding_branch_rewritten_bf16():
    torch.manual_seed(0)
    cands = rewrite_and_compare(PaddedTop2("fairseq", torch.bfloat16), d, lengths=(5, 8), tol=3e-2, rel_norm=True)
    assert cands and all(c.status == "rewritten" for c in cands), _statuses(cands)


def _compile_loose(fn, inputs):
    """``fn`` compiled with the sonic rewrite (graph breaks allowed) on each input, against eager:
    (graphs compiled, notes of the host reads left to Dynamo)."""
    reports: list = []
    torch._dynamo.reset()
    mark = shape_items.mark()
    compiled = torch.compile(fn, backend=light_backend(reports))
    for x in inputs:
        torch.testing.assert_close(compiled(x), fn(x))
    return len(reports), " | ".join(why for _, why in shape_items.reasons(mark))


@pytest.mark.parametrize("form, why", [
    ("short", "not proved to be all of it"),
    ("input", "gt(...)` is not an op whose result is proved uniform"),
    ("second_writer", "not a constant written over all of it"),
])
def test_near_misses_keep_the_branch(form, why):
    torch.manual_seed(0)
    module = PaddedTop2(form)
    x = torch.randn(8, d)
    x[3, 0] = 5.0  # one token that the data masks ("input", "second_writer")
    with torch.no_grad():
        graphs, notes = _compile_loose(module, [x])
    assert graphs >= 2 and why in notes, (graphs, notes)  # the branch is Dynamo's: a graph break


def _possibly_empty_all(x):
    keep = torch.zeros((x.shape[0] - 2,), dtype=torch.bool)  # empty at two tokens: all() is True there
    if keep.all():
        return x + 1
    return x - 1


def test_all_of_a_possibly_empty_tensor():
    # empty at two tokens (all() True there, x + 1), else x - 1: eager's outcome at each length
    _compile_loose(_possibly_empty_all, [torch.randn(5, 3), torch.randn(2, 3), torch.randn(7, 3), torch.randn(2, 3)])


# -- the abstract evaluation on Dynamo graphs (no branch: the values are the graph's outputs) ------------

def _graph_outputs(fn, x):
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=record, fullgraph=True, dynamic=True)(x)
    (gm,) = graphs
    return list(gm.graph.output_node().args[0])


def _cases(x):
    s = x.shape[0]
    m = torch.ones((s,), dtype=torch.bool)
    m[:s] = False
    t = torch.full((s, 3), 2.5)
    t[..., :] = 0.0
    half = torch.zeros((s,), dtype=torch.bool)
    half[1:] = True  # from 1: element 0 stays False
    viewed = torch.zeros((s,))
    viewed.view(-1)[:s] = 1.0  # through a view: refused
    empty = torch.zeros((s - s,), dtype=torch.bool)  # no element: all() is True, any() False
    late = torch.zeros((s,), dtype=torch.bool)
    late_any = late.any()
    late[:s] = True  # after the reduction: not part of its value
    chained = torch.zeros((s,), dtype=torch.bool)
    chained.fill_(False)[0] = True  # written again through the in-place op's result
    return (chained.any(), torch.full((s,), 1e20).long().any(), m.any(), (~m).all(), m.logical_not().float().sum(),
            t.any(), (t == 0).all(), half.any(), viewed.any(), empty.all(), empty.any(), late_any,
            torch.rand(s).any(), (m | True).all(), x.bool().any())


def test_uniform_values_on_graphs():
    outs = _graph_outputs(_cases, torch.randn(6, 2))
    got = []
    for node in outs:
        try:
            got.append(uniform_values.truth(node))
        except uniform_values.NotUniform as e:
            got.append(str(e))
    assert "through a view or an in-place op's result" in got.pop(0)
    assert "no defined value as torch.int64" in got.pop(0)  # a float out of range cast to an integer
    assert got[:5] == [False, True, got[2], False, True], got
    assert "is not an op whose result is proved uniform" in got[2]  # sum: not an op of the evaluation
    assert "not proved to be all of it" in got[5]
    assert "through a view" in got[6]
    assert got[7:10] == [True, False, False], got  # empty all() True; any() of False: False for any count
    assert "not an op whose result is proved uniform" in got[10]  # random
    assert got[11] is True
    assert "is a graph input" in got[12]
    assert isinstance(example_value(outs[0]), torch.Tensor)


def _fairseq_branch(x):
    s = x.shape[0]
    mask = torch.ones((s,), dtype=torch.bool)
    mask[:s] = False
    if mask.any():
        return x * 2
    return x + 1


def test_plain_inductor_keeps_the_graph_break():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    x = torch.randn(4, 3)
    torch.testing.assert_close(torch.compile(_fairseq_branch, backend="inductor")(x), x + 1)
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])  # the break at the branch
    from torch._dynamo.symbolic_convert import InstructionTranslator

    # nothing left installed after sonic frames (the one jump hook is shape_items')
    ours = [f for f in InstructionTranslator.dispatch_table if getattr(f, "__qualname__", "") == "_jump.<locals>.jump"]
    assert not ours
