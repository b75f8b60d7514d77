"""Host reads that only look like host syncs, read at trace time in sonic frames (moe_inductor/dynamo/shape_items.py).

``int((n_tokens * torch.ones((1,), dtype=torch.long)).item())`` (fairseq ``MOELayer``'s --max-tokens
padding: the all-reduced token count) is a function of a size only: in a frame compiled with sonic it
is answered at trace time with that size, so the padding and the MoE block after it stay in one graph
(no graph break, the block rewritten from the first call). Near misses, whose value depends on tensor
data or is a float, are left to Dynamo (a graph break, as plain Inductor), with the reason recorded;
frames of other backends never see the change.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.utils import counters

import loop_forms
from moe_inductor.dynamo import shape_items
from rewrite_check import light_backend, outputs_and_grads
from test_fairseq_spellings import ALL, FairseqSlots, d


class PaddedCount(nn.Module):
    """fairseq MOELayer's padding around a block: the row count read back from a one-element tensor,
    a zeros buffer of that many rows, the rows copied in, the block's output sliced back.
    ``form``: "item" (fairseq's), "full" (``torch.full`` + integer ops + a view), and near misses
    "data" (the count plus 0 * a sum of the input: data-dependent); "float" (a float32 count: folded as
    eager computes it by moe_inductor.dynamo.trace_values, the size specialized)."""

    def __init__(self, block, form="item"):
        super().__init__()
        self.block, self.form = block, form

    def count(self, x):
        S = x.shape[0]
        if self.form == "item":
            return int((S * torch.ones((1,), dtype=torch.long, device=x.device)).item())
        if self.form == "full":
            t = torch.full((1,), S, dtype=torch.long) * 3 + torch.tensor([2])
            return int(torch.maximum(t // 3, torch.zeros(1, dtype=torch.long)).view(()).item())
        if self.form == "data":
            return int((S + (x.detach().abs().sum() * 0).long()).item())
        return int((S * torch.ones((1,))).item())  # "float"

    def forward(self, x):
        S = x.shape[0]
        m = self.count(x)
        padded = torch.zeros((m, x.shape[1]), dtype=x.dtype, device=x.device)
        padded[:S] = x
        return self.block(padded)[:S]


def _run(module, lengths=(8, 12), tol=1e-4):
    """Compile ``module`` with the rewrite only (no fullgraph: breaks allowed, as a user compiles),
    compare output and every gradient with eager per length; returns (candidates, graph breaks)."""
    reports: list = []
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(module, backend=light_backend(reports))
    for T in lengths:
        x = torch.randn(T, d, generator=torch.Generator().manual_seed(T))
        res = [outputs_and_grads(fn, module, x, upcast=True) for fn in (module, compiled)]
        for got, want in zip(res[1], res[0]):
            torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
    return [c for r in reports for c in r.candidates], int(sum(counters["graph_break"].values()))


@pytest.mark.parametrize("form", ["item", "full"])
def test_size_only_item_read_at_trace_time(form):
    torch.manual_seed(0)
    cands, breaks = _run(PaddedCount(FairseqSlots(ALL), form))
    assert breaks == 0, dict(counters["graph_break"])
    assert cands and all(c.status == "rewritten" for c in cands), [(c.status, c.reason) for c in cands]


def test_size_only_item_read_at_trace_time_bf16():
    torch.manual_seed(0)
    cands, breaks = _run(PaddedCount(FairseqSlots(ALL, torch.bfloat16)), tol=3e-2)
    assert breaks == 0, dict(counters["graph_break"])
    assert cands and all(c.status == "rewritten" for c in cands), [(c.status, c.reason) for c in cands]


def test_float_item_folded():
    """A float32 count of sizes is read as eager reads it (``trace_values``): no break, exact."""
    torch.manual_seed(0)
    _, breaks = _run(PaddedCount(FairseqSlots(ALL), "float"), lengths=(8, 12))
    # one graph per length (the size specialized), none split by a break
    assert breaks == 0 and counters["stats"]["unique_graphs"] == 2, (dict(counters["graph_break"]),
                                                                     dict(counters["stats"]))


@pytest.mark.parametrize("form, why", [("data", "sum")])
def test_data_item_left_to_dynamo(form, why):
    torch.manual_seed(0)
    _, breaks = _run(PaddedCount(FairseqSlots(ALL), form), lengths=(8,))
    assert breaks > 0  # Dynamo's own graph break, as plain Inductor
    # the producer that stopped the proof is named (a float tensor on the way)
    assert any(why in r and "not a one-element int64 tensor" in r for _, r in shape_items.reasons()), \
        shape_items.reasons()[-3:]


def test_other_backends_untouched():
    from torch._dynamo.variables.tensor import TensorVariable

    original = TensorVariable.method_item
    graphs = []

    def plain(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def f(x):
        return x * (x.shape[0] * torch.ones((1,), dtype=torch.long)).item()

    torch._dynamo.reset()
    counters.clear()
    x = torch.randn(4, 3)
    torch.testing.assert_close(torch.compile(f, backend=plain)(x), f(x))
    assert sum(counters["graph_break"].values()) > 0  # not a sonic frame: Dynamo's break
    assert TensorVariable.method_item is original
    torch._dynamo.reset()
    counters.clear()
    torch.testing.assert_close(torch.compile(f, backend=light_backend([]))(x), f(x))
    assert sum(counters["graph_break"].values()) == 0
    assert TensorVariable.method_item is original  # left again after the sonic frame


# -- bincount(ids, minlength=E).tolist() sizing a split: the ids proved below E (topk positions) ------

class BincountSplitMoE(loop_forms.HostCountsSplitMoE):
    """LLaMA-MoE's counts spelling on the host-split block: ``ids.flatten().bincount(minlength=E)``;
    ``shift`` (near miss): the counts of ``(ids + shift) % E`` (other experts' counts; below E, but
    ``%`` is not a position the bound is read from: its length is left to the data, as Dynamo does)."""

    def __init__(self, shift=0, dtype=torch.float32):
        super().__init__()
        self.shift = shift
        self.to(dtype)

    def counts(self, ids, T):
        flat = (ids.flatten() + self.shift) % self.num_experts if self.shift else ids.flatten()
        return flat.bincount(minlength=self.num_experts)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_bincount_counts_split_is_one_graph_rewritten(dtype, tol):
    from test_loop_capture import _compare

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = BincountSplitMoE(dtype=dtype)
    backend = _compare(model, torch.randn(2, 5, 32, dtype=dtype), atol=tol)
    assert len(backend.graphs) == 1 and not counters["graph_break"], dict(counters["graph_break"])
    assert counters["sonic"]["moe_rewrites"] == 1, dict(counters["sonic"])
    assert "fused_moe" in backend.graphs[0].code


def test_bincount_of_ids_not_below_minlength_is_left_to_dynamo():
    from test_loop_capture import _compare

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    _compare(BincountSplitMoE(shift=1), torch.randn(2, 5, 32))  # exact, as plain Inductor
    assert counters["sonic"]["moe_rewrites"] == 0, dict(counters["sonic"])
    assert any("no id proved below minlength" in r for _, r in shape_items.reasons()), shape_items.reasons()[-3:]


def test_explain_names_the_host_read_left_to_dynamo():
    from moe_inductor import explain

    torch.manual_seed(0)
    rep = explain(PaddedCount(FairseqSlots(ALL), "data"), torch.randn(8, d), inductor=False)
    assert any("test_host_sync_capture.py" in where and "sum" in why for where, why in rep.host_reads), rep.host_reads
    assert "host reads left to Dynamo" in str(rep)


# -- a requires_grad=True creation whose gradient nobody reads (LLaMA-MoE's importance scores) --------

class RequiresGradLeafMoE(BincountSplitMoE):
    """The bincount block with LLaMA-MoE's gate statistic before it:
    ``zeros = torch.zeros_like(probs, requires_grad=True)`` then ``zeros.scatter(dim=1, index=ids,
    src=weights)``, summed into ``self.importance``."""

    def forward(self, x):
        h = x.reshape(-1, x.shape[-1])
        probs = F.softmax(self.gate(h), dim=-1, dtype=torch.float)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        zeros = torch.zeros_like(probs, requires_grad=True)
        filtered = zeros.scatter(dim=1, index=ids, src=weights)
        self.importance = filtered.sum(0)
        return self.block(x, h, weights, ids)

    def block(self, x, h, weights, ids):
        sizes = self.counts(ids, h.shape[0]).tolist()
        order = ids.flatten().argsort(stable=True)
        token = order // self.top_k
        g, u = self.up(h[token], sizes).chunk(2, dim=-1)
        y = self.down(F.silu(g) * u, sizes) * weights.flatten()[order][:, None].to(x.dtype)
        return torch.zeros_like(h).index_add(0, token, y).view(x.shape)


class EscapingLeafMoE(RequiresGradLeafMoE):
    """Near miss: the leaf is also kept on the module (its ``.grad`` is readable after backward):
    Dynamo's graph break stays."""

    def forward(self, x):
        h = x.reshape(-1, x.shape[-1])
        probs = F.softmax(self.gate(h), dim=-1, dtype=torch.float)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        zeros = torch.zeros_like(probs, requires_grad=True)
        filtered = zeros.scatter(dim=1, index=ids, src=weights)
        self.importance, self.leaf = filtered.sum(0), zeros
        return self.block(x, h, weights, ids)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_unread_requires_grad_leaf_keeps_one_graph(dtype, tol):
    # LLaMA-MoE's gate (tests/faithful/llama_moe.py): zeros_like(logits, requires_grad=True).scatter(...)
    # then the calculator's bincount(minlength=E).tolist() split: one graph, rewritten, exact
    from faithful.llama_moe import ENTRIES

    entry = ENTRIES[0]
    module = entry.build().to(dtype)
    reports: list = []
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(module, backend=light_backend(reports))
    for T in (5, 8):
        x = entry.inputs(T, 0)[0].to(dtype)
        res = [outputs_and_grads(fn, module, x, upcast=True) for fn in (module, compiled)]
        for got, want in zip(res[1], res[0]):
            torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
    assert not counters["graph_break"], dict(counters["graph_break"])
    cands = [c for r in reports for c in r.candidates]
    assert cands and all(c.status == "rewritten" for c in cands), [(c.status, c.reason) for c in cands]


def test_escaping_requires_grad_leaf_keeps_the_break():
    from test_loop_capture import _compare

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    _compare(EscapingLeafMoE(), torch.randn(2, 5, 32))
    assert counters["graph_break"], "expected Dynamo's break at the requires_grad creation"
    assert any("requires_grad=True) kept" in r and "read exactly once" in r for _, r in shape_items.reasons()), \
        shape_items.reasons()[-3:]
