"""Capacity dropping that used to break the graph (issue 18).

- ``loop_capture``: ``X[:c] if len(X) > c else X`` (any row count of X, either orientation) inside
  a per-expert loop is ``X[:c]`` whenever c is an int (the whole X is taken only when it has at most
  c rows, and then ``X[:c]`` holds the same rows); rewritten as ``X[:c]`` under a trace-time
  ``isinstance(c, int)`` (and ``X.dim() == 1`` for ``numel()``), the data-dependent branch is gone
  and the loop is one graph (makeMoE's ``SparseMoE`` with expert capacity).
- ``dispatch.capacity_rows``: ``m.nonzero().squeeze(-1)[:c]`` takes the first c selected rows, i.e.
  ``m & (cumsum(m) <= c)`` for c >= 0: the per-expert composition gives the assignments past the
  capacity expert -1 (dropped).
Checked against eager: output and every gradient, fp32 and bf16, two sequence lengths, inputs
where experts do receive more tokens than their capacity; near misses are left alone. Out of reach,
explained: a capacity skip guarding statements whose dropped list is used as a whole (labml's
``if len(idx) <= capacity: continue`` form is captured otherwise: ``tests/test_switch_drop_lists.py``). A
Python branch on a tensor computed from sizes (DeepSpeed's ``_capacity``) is answered at trace time
(``moe_inductor.dynamo.shape_items`` / ``trace_values``; tests/test_trace_time_branches.py).
"""
import ast

import pytest
import torch
import torch.nn as nn

from rewrite_check import CaptureGraphs
from moe_inductor.dynamo import loop_capture

pytestmark = pytest.mark.usefixtures("fresh_dynamo")

D, N, E, K = 16, 24, 4, 2


class CapacityLoop(nn.Module):
    """Top-k router, per expert ``torch.nonzero((ids == e).any(-1)).squeeze(-1)`` cut to the capacity
    ``int(T * K / E * factor)``, a ``numel() > 0`` guard, ``index_add_`` of the weighted expert rows
    (makeMoE ``makeMoE.py`` with capacity, written on (T, d) rows). Subclasses spell the cut."""

    def __init__(self, factor=0.5, capacity=None):
        super().__init__()
        self.gate = nn.Linear(D, E, bias=False)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(D, N), nn.ReLU(), nn.Linear(N, D)) for _ in range(E))
        self.factor, self.capacity = factor, capacity

    def route(self, x):
        probs = self.gate(x).softmax(-1)
        cap = self.capacity if self.capacity is not None else int(x.shape[0] * K / E * self.factor)
        return probs, probs.topk(K, dim=-1)[1], torch.zeros_like(x), cap


class CutNumel(CapacityLoop):
    def forward(self, x):
        probs, ids, out, cap = self.route(x)
        for i, expert in enumerate(self.experts):
            sel = torch.nonzero((ids == i).any(dim=-1)).squeeze(-1)
            kept = sel[:cap] if sel.numel() > cap else sel
            if kept.numel() > 0:
                out.index_add_(0, kept, expert(x[kept]) * probs[kept, i].unsqueeze(1))
        return out


class CutLen(CapacityLoop):
    def forward(self, x):
        probs, ids, out, cap = self.route(x)
        for i, expert in enumerate(self.experts):
            sel = torch.nonzero((ids == i).any(dim=-1)).squeeze(-1)
            kept = sel if len(sel) <= cap else sel[:cap]
            if kept.numel() > 0:
                out.index_add_(0, kept, expert(x[kept]) * probs[kept, i].unsqueeze(1))
        return out


class CutShape(CapacityLoop):
    def forward(self, x):
        probs, ids, out, cap = self.route(x)
        for i, expert in enumerate(self.experts):
            sel = torch.nonzero((ids == i).any(dim=-1)).squeeze(-1)
            kept = sel[:cap] if cap <= sel.shape[0] else sel
            if kept.numel() > 0:
                out.index_add_(0, kept, expert(x[kept]) * probs[kept, i].unsqueeze(1))
        return out


class CutPlain(CapacityLoop):
    def forward(self, x):
        probs, ids, out, cap = self.route(x)
        for i, expert in enumerate(self.experts):
            kept = torch.nonzero((ids == i).any(dim=-1)).squeeze(-1)[:cap]
            if kept.numel() > 0:
                out.index_add_(0, kept, expert(x[kept]) * probs[kept, i].unsqueeze(1))
        return out


class MissElse(CapacityLoop):
    """near miss: the else branch is not the whole selection"""

    def forward(self, x):
        probs, ids, out, cap = self.route(x)
        for i, expert in enumerate(self.experts):
            sel = torch.nonzero((ids == i).any(dim=-1)).squeeze(-1)
            kept = sel[:cap] if sel.numel() > cap else sel[:1]
            if kept.numel() > 0:
                out.index_add_(0, kept, expert(x[kept]) * probs[kept, i].unsqueeze(1))
        return out


class MissTail(CapacityLoop):
    """near miss: the last rows kept"""

    def forward(self, x):
        probs, ids, out, cap = self.route(x)
        for i, expert in enumerate(self.experts):
            sel = torch.nonzero((ids == i).any(dim=-1)).squeeze(-1)
            kept = sel[-cap:] if sel.numel() > cap else sel
            if kept.numel() > 0:
                out.index_add_(0, kept, expert(x[kept]) * probs[kept, i].unsqueeze(1))
        return out


class MissStart(CapacityLoop):
    """near miss: rows 1..c-1 (a cut from a start)"""

    def forward(self, x):
        probs, ids, out, cap = self.route(x)
        for i, expert in enumerate(self.experts):
            kept = torch.nonzero((ids == i).any(dim=-1)).squeeze(-1)[1:cap]
            if kept.numel() > 0:
                out.index_add_(0, kept, expert(x[kept]) * probs[kept, i].unsqueeze(1))
        return out


def _compile_compare(model, dtype, lengths=(12, 20)):
    """Compile with a sonic-marked backend (scoped settings and loop capture, no Inductor codegen),
    compare output and every gradient with eager for each length; return (backend, drops seen)."""
    model = model.to(dtype)
    backend = CaptureGraphs()
    compiled = torch.compile(model, backend=backend)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    dropped = False
    for T in lengths:
        x = torch.randn(T, D, generator=torch.Generator().manual_seed(T)).to(dtype)
        res = []
        for fn in (model, compiled):
            model.zero_grad(set_to_none=True)
            xi = x.clone().requires_grad_(True)
            out = fn(xi)
            out.float().pow(2).sum().backward()
            res.append([out.detach(), xi.grad] + [p.grad if p.grad is not None else torch.zeros_like(p)
                                                   for p in model.parameters()])
        for got, want in zip(res[1], res[0]):
            torch.testing.assert_close(got, want, atol=tol, rtol=tol)
        with torch.no_grad():
            ids = model.gate(x).topk(K, dim=-1)[1]
            counts = torch.bincount(ids.flatten(), minlength=E)
            dropped |= bool((counts > int(T * K / E * model.factor)).any())
    return backend, dropped


def _rewritten(backend) -> int:
    return sum(len(r.rewritten) for r in backend.reports)


def _declined(backend) -> list:
    return [c.reason for r in backend.reports for c in r.declined]


@pytest.mark.parametrize("cls,dtype", [(CutNumel, torch.float32), (CutLen, torch.float32), (CutShape, torch.float32),
                                       (CutPlain, torch.float32), (CutNumel, torch.bfloat16),
                                       (CutPlain, torch.bfloat16)])
def test_capacity_cut_rewritten_exact(cls, dtype):
    torch.manual_seed(0)
    backend, dropped = _compile_compare(cls(), dtype)
    assert dropped, "the inputs must put more tokens on an expert than its capacity"
    assert _rewritten(backend) >= 2, _declined(backend)  # both lengths: one graph each, the block fused


def test_truncation_recogniser():
    def parse(src):
        return ast.parse(src, mode="eval").body

    for src in ("X[:c] if X.numel() > c else X", "X[:c] if len(X) >= c else X", "X if X.shape[0] <= c else X[:c]",
                "X if c > len(X) else X[:c]", "X[:self.cap] if X.size(0) > self.cap else X"):
        assert loop_capture._capacity_truncation(parse(src)) is not None, src
    for src in ("X[:c] if X.numel() > c else X[:1]", "X[:c] if len(X) < c else X", "X[:c] if len(X) > d else X",
                "X[-c:] if len(X) > c else X", "X[:c] if len(Y) > c else X", "X[:f(c)] if len(X) > f(c) else X",
                "X[1:c] if len(X) > c else X", "X[:c] if len(X) == c else X"):
        assert loop_capture._capacity_truncation(parse(src)) is None, src


@pytest.mark.parametrize("cls", [MissElse, MissTail])
def test_look_alike_branch_not_rewritten(cls):
    """Another else branch, or the last rows kept: the branch stays (the loop is not captured as one
    graph) and nothing is fused; results still equal eager."""
    torch.manual_seed(0)
    backend, _ = _compile_compare(cls(), torch.float32, lengths=(12,))
    assert _rewritten(backend) == 0


def test_cut_from_a_start_not_rewritten():
    torch.manual_seed(0)
    backend, _ = _compile_compare(MissStart(), torch.float32, lengths=(12,))
    assert _rewritten(backend) == 0


def test_negative_capacity_declined():
    """``sel[:-1]`` drops the last row (not a capacity): declined with the reason."""
    torch.manual_seed(0)
    backend, _ = _compile_compare(CutPlain(capacity=-1), torch.float32, lengths=(12,))
    assert _rewritten(backend) == 0
    assert any("not provably >= 0" in r for r in _declined(backend)), _declined(backend)


class LenSkip(CapacityLoop):
    """labml Switch's dropping: ``if len(idx) <= capacity: continue`` guarding list and name updates."""

    def forward(self, x):
        probs, ids, out, cap = self.route(x)
        idx = [torch.eq(ids[:, 0], i).nonzero(as_tuple=True)[0] for i in range(E)]
        dropped = []
        for i in range(E):
            if len(idx[i]) <= cap:
                continue
            dropped.append(idx[i][cap:])
            idx[i] = idx[i][:cap]
        for i in range(E):
            out[idx[i], :] = self.experts[i](x[idx[i], :])
        return out, dropped


def test_capacity_skip_explained():
    """A capacity skip whose list of dropped rows is returned as a list (with the skip removed it would
    also hold the empty tensors of the experts under capacity) is not rewritten; the note names the
    line and says why (``drop_lists``)."""
    notes = loop_capture.analyse(LenSkip.forward).notes
    assert len(notes) == 1 and not notes[0].rewritten
    assert "`dropped` (the dropped rows) is read other than by" in notes[0].reason, notes[0].reason


class TypeTestInLoop(CapacityLoop):
    """An ``isinstance`` test in the loop body (DeepSpeed ``Experts``: ``if isinstance(out, tuple)``)."""

    def forward(self, x):
        probs, ids, out, cap = self.route(x)
        for i, expert in enumerate(self.experts):
            kept = torch.nonzero((ids == i).any(dim=-1)).squeeze(-1)
            if kept.numel() == 0:
                continue
            y = expert(x[kept])
            if isinstance(y, tuple):
                y = y[0]
            out.index_add_(0, kept, y * probs[kept, i].unsqueeze(1))
        return out


class TensorCapacity(CapacityLoop):
    """DeepSpeed ``_capacity``'s spelling: the capacity a tensor, raised to a minimum by a tensor ``if``."""

    def forward(self, x):
        probs, ids, out, _ = self.route(x)
        cap = torch.ceil(torch.tensor(x.shape[0] / E) * 0.5).to(torch.int64)
        if cap < 2:
            cap = torch.tensor(2)
        for i, expert in enumerate(self.experts):
            kept = torch.nonzero((ids == i).any(dim=-1)).squeeze(-1)[:cap]
            if kept.numel() > 0:
                out.index_add_(0, kept, expert(x[kept]) * probs[kept, i].unsqueeze(1))
        return out


def test_type_test_is_static():
    notes = loop_capture.analyse(TypeTestInLoop.forward).notes
    assert len(notes) == 1 and notes[0].rewritten, notes


def test_tensor_branch_answered():
    """The tensor capacity branch (sizes and constants only) is answered at trace time: the loop is
    rewritten and exact, and explain names no tensor branch."""
    import moe_inductor
    from rewrite_check import light_backend

    torch.manual_seed(0)
    m, x = TensorCapacity(), torch.randn(12, D)
    rep = moe_inductor.explain(m, x, inductor=False)
    assert any(e.status == "rewritten" for e in rep.entries), str(rep)
    assert not any("branches on a tensor's value" in e.remedy for e in rep.entries if e.status == "graph break")
    torch._dynamo.reset()
    reports: list = []
    torch.testing.assert_close(torch.compile(m, backend=light_backend(reports))(x), m(x))
    assert any(c.status == "rewritten" for r in reports for c in r.candidates)
