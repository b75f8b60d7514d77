"""labml's Switch with token dropping (issue 18): per-expert index lists cut to a capacity behind a
``continue`` skip, the dropped rows collected in a list and passed through.

- ``drop_lists.capacity_skip_loop`` (loop capture): ``if len(L[i]) <= c: continue`` followed only by
  ``L[i] = L[i][torch.arange(len(L[i]))]``, ``D.append(L[i][c:])``, ``L[i] = L[i][:c]`` is traced
  without the skip (for an expert under capacity those change nothing observable; D, an empty
  list before the loop, is read after it only by ``if D: D = torch.cat(D); A[D, :] = B[D, :]`` and
  ``len(D)``), so the block is one graph;
- ``dispatch.capacity_rows``: ``idx[torch.arange(len(idx))][:c]`` (``dispatch.in_order``) is the first
  c rows, and the cut keeps the selections disjoint, so they may be *assigned* into zeros;
- ``per_expert``: ``acc[D] = x[D]`` after the loop (``_passes_rows_through`` / ``_later_writes``)
  stays graph code on the fused result.
Checked against eager: output and every gradient, fp32 and bf16, at lengths where experts do get
more tokens than their capacity; near misses declined with their reason (or rewritten exactly).
"""
import pytest
import torch
import torch.nn as nn

from rewrite_check import CaptureGraphs, outputs_and_grads
from moe_inductor.dynamo import loop_capture

pytestmark = pytest.mark.usefixtures("fresh_dynamo")

D, N, E = 16, 24, 4
LENGTHS = (8, 16)


class Switch(nn.Module):
    """labml ``SwitchFeedForward`` on (T, d) rows (drop_tokens, is_scale_prob): softmax router, top-1
    by ``torch.max``, ``nonzero`` index lists; subclasses spell the capacity loop."""

    def __init__(self, dtype=torch.float32, factor=1.2):
        super().__init__()
        self.switch = nn.Linear(D, E, dtype=dtype)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(D, N, dtype=dtype), nn.ReLU(),
                                                   nn.Linear(N, D, dtype=dtype)) for _ in range(E))
        self.factor, self.n_experts = factor, E

    def route(self, x):
        x = x.to(self.switch.weight.dtype)
        p, routes = torch.max(torch.softmax(self.switch(x), dim=-1), dim=-1)
        idx = [torch.eq(routes, i).nonzero(as_tuple=True)[0] for i in range(self.n_experts)]
        return x, p, idx, x.new_zeros(x.shape), int(self.factor * len(x) / self.n_experts)

    def forward(self, x):
        x, p, idx, out, capacity = self.route(x)
        dropped = []
        for i in range(self.n_experts):
            if len(idx[i]) <= capacity:
                continue
            idx[i] = idx[i][torch.arange(len(idx[i]))]
            dropped.append(idx[i][capacity:])
            idx[i] = idx[i][:capacity]
        ys = [self.experts[i](x[idx[i], :]) for i in range(self.n_experts)]
        for i in range(self.n_experts):
            out[idx[i], :] = ys[i]
        if dropped:
            dropped = torch.cat(dropped)
            out[dropped, :] = x[dropped, :]
        return out * p.view(-1, 1)


class SwitchLess(Switch):
    """``<`` instead of ``<=`` (also skips only experts under capacity), capacity on the left, no
    reordering, the count ``idx[i].shape[0]``."""

    def forward(self, x):
        x, p, idx, out, capacity = self.route(x)
        dropped = []
        for i in range(self.n_experts):
            if capacity > idx[i].shape[0]:
                continue
            dropped.append(idx[i][capacity:])
            idx[i] = idx[i][:capacity]
        ys = [self.experts[i](x[idx[i], :]) for i in range(self.n_experts)]
        for i in range(self.n_experts):
            out[idx[i], :] = ys[i]
        if dropped:
            dropped = torch.cat(dropped)
            out[dropped, :] = x[dropped, :]
        return out * p.view(-1, 1)


class SkipFree(Switch):
    """The loop already without its skip (what the capture traces): the FX side alone."""

    def forward(self, x):
        x, p, idx, out, capacity = self.route(x)
        dropped = []
        for i in range(self.n_experts):
            idx[i] = idx[i][torch.arange(len(idx[i]))]
            dropped.append(idx[i][capacity:])
            idx[i] = idx[i][:capacity]
        ys = [self.experts[i](x[idx[i], :]) for i in range(self.n_experts)]
        for i in range(self.n_experts):
            out[idx[i], :] = ys[i]
        if dropped:
            dropped = torch.cat(dropped)
            out[dropped, :] = x[dropped, :]
        return out * p.view(-1, 1)


class Layer(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        return self.block(x)


def _drops(module):
    """The test inputs do overflow some expert's capacity (else nothing is dropped)."""
    for T in LENGTHS:
        x = torch.randn(T, D, generator=torch.Generator().manual_seed(T)).to(module.switch.weight.dtype)
        routes = module.switch(x).argmax(-1)
        assert torch.bincount(routes, minlength=E).max() > int(module.factor * T / E)


def _close(got, want):
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def _close_bf16(got, want, tol=3e-2):
    """The catalogue's bf16 rule: relative norm error per tensor at most ``tol``."""
    g, w = got.double(), want.double()
    assert got.dtype == want.dtype and (g - w).norm() <= tol * max(w.norm(), 1e-6), ((g - w).norm() / w.norm())


def rewrite_and_compare(module, close=_close) -> list:
    """Compile with a sonic-marked backend (scoped settings and loop capture, no Inductor codegen;
    not fullgraph: the capture replaces the forward when the frame is traced), compare output and
    every gradient with eager at each length; return the candidates. One graph per length: the
    capacity loop did not break the graph. The block is compiled inside a layer (as labml's
    ``SwitchTransformerLayer`` calls it): the capture gives the layer's submodules their captured
    forward before the first trace (a frame that is itself the original forward is traced once
    through it and, failing at the data-dependent skip as a whole, runs eagerly on its first call)."""
    backend = CaptureGraphs()
    compiled = torch.compile(Layer(module), backend=backend)
    for T in LENGTHS:
        x = torch.randn(T, D, generator=torch.Generator().manual_seed(T))
        res = [outputs_and_grads(fn, module, x, upcast=True) for fn in (module, compiled)]
        for got, want in zip(res[1], res[0]):
            close(got, want)
    assert len(backend.graphs) == len(LENGTHS)
    return [c for r in backend.reports for c in r.candidates]


def _rewritten(cands, n=1):
    assert sum(c.status == "rewritten" for c in cands) >= n, [(c.status, c.reason) for c in cands]
    assert all(c.parts.startswith("dispatch=capacity_rows") for c in cands if c.status == "rewritten")


@pytest.mark.parametrize("cls", [Switch, SwitchLess, SkipFree])
def test_capacity_skip_rewritten_exact(cls):
    torch.manual_seed(0)
    m = cls()
    _drops(m)
    _rewritten(rewrite_and_compare(m), n=len(LENGTHS))


@pytest.mark.parametrize("cls", [Switch, SwitchLess])
def test_capacity_skip_rewritten_exact_bf16(cls):
    torch.manual_seed(0)
    m = cls(dtype=torch.bfloat16)
    _drops(m)
    _rewritten(rewrite_and_compare(m, close=_close_bf16), n=len(LENGTHS))


def test_capture_note_names_the_skip():
    a = loop_capture.analyse(Switch.forward)
    assert a.replacement is not None
    assert any(n.rewritten and "if len(idx[i]) <= capacity: continue" in n.form for n in a.notes), a.notes
    assert "not isinstance(capacity, int) and len(idx[i]) <= capacity" in a.replacement._sonic_source


# --------------------------------------------------------------------------- near misses (source)

class KeepLast(Switch):
    """Keeps the last rows: not the head cut."""

    def forward(self, x):
        x, p, idx, out, capacity = self.route(x)
        dropped = []
        for i in range(self.n_experts):
            if len(idx[i]) <= capacity:
                continue
            dropped.append(idx[i][:-capacity])
            idx[i] = idx[i][-capacity:]
        ys = [self.experts[i](x[idx[i], :]) for i in range(self.n_experts)]
        for i in range(self.n_experts):
            out[idx[i], :] = ys[i]
        if dropped:
            dropped = torch.cat(dropped)
            out[dropped, :] = x[dropped, :]
        return out * p.view(-1, 1)


class SkipOver(Switch):
    """Skips the experts *over* capacity (``>=``): their rows stay whole, the others are cut."""

    def forward(self, x):
        x, p, idx, out, capacity = self.route(x)
        dropped = []
        for i in range(self.n_experts):
            if len(idx[i]) >= capacity:
                continue
            dropped.append(idx[i][capacity:])
            idx[i] = idx[i][:capacity]
        ys = [self.experts[i](x[idx[i], :]) for i in range(self.n_experts)]
        for i in range(self.n_experts):
            out[idx[i], :] = ys[i]
        if dropped:
            dropped = torch.cat(dropped)
            out[dropped, :] = x[dropped, :]
        return out * p.view(-1, 1)


class Shuffled(Switch):
    """labml's original ``torch.randperm`` shuffle before dropping."""

    def forward(self, x):
        x, p, idx, out, capacity = self.route(x)
        dropped = []
        for i in range(self.n_experts):
            if len(idx[i]) <= capacity:
                continue
            idx[i] = idx[i][torch.randperm(len(idx[i]))]
            dropped.append(idx[i][capacity:])
            idx[i] = idx[i][:capacity]
        ys = [self.experts[i](x[idx[i], :]) for i in range(self.n_experts)]
        for i in range(self.n_experts):
            out[idx[i], :] = ys[i]
        if dropped:
            dropped = torch.cat(dropped)
            out[dropped, :] = x[dropped, :]
        return out * p.view(-1, 1)


class DroppedCounted(Switch):
    """The dropped list counted before its cat (``len`` of the list: the number of experts over
    capacity, which the skip-free loop would change to every expert)."""

    def forward(self, x):
        x, p, idx, out, capacity = self.route(x)
        dropped = []
        for i in range(self.n_experts):
            if len(idx[i]) <= capacity:
                continue
            dropped.append(idx[i][capacity:])
            idx[i] = idx[i][:capacity]
        self.n_over = len(dropped)
        ys = [self.experts[i](x[idx[i], :]) for i in range(self.n_experts)]
        for i in range(self.n_experts):
            out[idx[i], :] = ys[i]
        if dropped:
            dropped = torch.cat(dropped)
            out[dropped, :] = x[dropped, :]
        return out * p.view(-1, 1)


@pytest.mark.parametrize("cls, words", [
    (KeepLast, "is not `idx[i] = idx[i][:capacity]`"),
    (Shuffled, "permutes the rows at random"),
    (DroppedCounted, "`dropped` (the dropped rows) is read other than"),
    (SkipOver, "compares the length of this expert's rows with a capacity"),
])
def test_near_miss_loops_declined(cls, words):
    a = loop_capture.analyse(cls.forward)
    assert a.replacement is None
    assert any(not n.rewritten and words in n.reason for n in a.notes), [n.reason for n in a.notes]


# --------------------------------------------------------------------------- near misses (graph)

class PassThroughOther(Switch):
    """The dropped rows written into another tensor: the result's block is rewritten, that write
    stays graph code (exact)."""

    def forward(self, x):
        x, p, idx, out, capacity = self.route(x)
        dropped = []
        for i in range(self.n_experts):
            dropped.append(idx[i][capacity:])
            idx[i] = idx[i][:capacity]
        ys = [self.experts[i](x[idx[i], :]) for i in range(self.n_experts)]
        for i in range(self.n_experts):
            out[idx[i], :] = ys[i]
        other = torch.zeros_like(x)
        dropped = torch.cat(dropped)
        other[dropped, :] = x[dropped, :]
        return out * p.view(-1, 1) + other


class PassThroughInside(Switch):
    """The pass-through written between two experts' writes: a later expert may overwrite it."""

    def forward(self, x):
        x, p, idx, out, capacity = self.route(x)
        dropped = []
        for i in range(self.n_experts):
            dropped.append(idx[i][capacity:])
            idx[i] = idx[i][:capacity]
        dropped = torch.cat(dropped)
        ys = [self.experts[i](x[idx[i], :]) for i in range(self.n_experts)]
        for i in range(self.n_experts):
            out[idx[i], :] = ys[i]
            if i == 1:
                out[dropped, :] = x[dropped, :]
        return out * p.view(-1, 1)


class Reversed(SkipFree):
    """Reindexed by ``arange(len).flip(0)``: the rows in reverse order (the cut keeps the last ones),
    not the identity permutation."""

    def forward(self, x):
        x, p, idx, out, capacity = self.route(x)
        dropped = []
        for i in range(self.n_experts):
            idx[i] = idx[i][torch.arange(len(idx[i])).flip(0)]
            dropped.append(idx[i][capacity:])
            idx[i] = idx[i][:capacity]
        ys = [self.experts[i](x[idx[i], :]) for i in range(self.n_experts)]
        for i in range(self.n_experts):
            out[idx[i], :] = ys[i]
        if dropped:
            dropped = torch.cat(dropped)
            out[dropped, :] = x[dropped, :]
        return out * p.view(-1, 1)


def test_pass_through_into_another_tensor_rewritten_exact():
    torch.manual_seed(0)
    _rewritten(rewrite_and_compare(PassThroughOther()), n=len(LENGTHS))


@pytest.mark.parametrize("cls, words", [
    (PassThroughInside, "written by something other than the expert loop"),
    (Reversed, "not recognised"),
])
def test_graph_near_misses_declined(cls, words):
    torch.manual_seed(0)
    cands = rewrite_and_compare(cls())
    assert cands and all(c.status == "declined" for c in cands), [(c.status, c.reason) for c in cands]
    assert any(words in c.reason for c in cands), [c.reason for c in cands]
