"""Segment loops (``moe_inductor.dynamo.loop_capture._segment_loop``): per-expert loops that slice sorted
rows ``R[start:end]`` with a running offset carried from one expert to the next (DeepSeek-V2/V3 Hub
``moe_infer``, rxlm's ``MoeFeedForward``) are traced as ``R.split(counts.tolist(), 0)`` and one
output per expert: one graph under sonic, output and every gradient equal to eager. Near misses
(offset advanced by something else, rows from two tensors, outputs concatenated in another order or
read otherwise) are not rewritten and stay exact."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from moe_inductor.dynamo import capture, loop_capture
from rewrite_check import CaptureGraphs

pytestmark = pytest.mark.usefixtures("fresh_dynamo")

D, N, E, K = 16, 24, 4, 2


Graphs = CaptureGraphs  # tests/rewrite_check.py


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_proj = nn.Linear(D, N, bias=False)
        self.up_proj = nn.Linear(D, N, bias=False)
        self.down_proj = nn.Linear(N, D, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Base(nn.Module):
    """Router (softmax top-k) + ModuleList experts; ``experts_of`` holds the loop under test."""

    def __init__(self, experts=E):
        super().__init__()
        self.gate = nn.Linear(D, experts, bias=False)
        self.experts = nn.ModuleList([MLP() for _ in range(experts)])

    def route(self, x):
        w, ids = self.gate(x).softmax(-1).topk(K, dim=-1)
        return ids, w


# each class defines its own forward: ``capture.wants_host_counts`` reads ``type(module).forward`` and
# the methods it calls are looked up on the class that defines that forward


class DeepseekForm(Base):
    """DeepSeek-V2/V3 ``moe_infer`` (without ``no_grad``: the gradients are compared)."""

    def forward(self, x):
        return self.moe_infer(x, *self.route(x))

    def moe_infer(self, x, topk_ids, topk_weight):
        cnts = topk_ids.new_zeros((topk_ids.shape[0], len(self.experts)))
        cnts.scatter_(1, topk_ids, 1)
        tokens_per_expert = cnts.sum(dim=0)
        idxs = topk_ids.view(-1).argsort()
        sorted_tokens = x[idxs // topk_ids.shape[1]]
        tokens_per_expert = tokens_per_expert.cpu().numpy()
        outputs = []
        start_idx = 0
        for i, num_tokens in enumerate(tokens_per_expert):
            end_idx = start_idx + num_tokens
            if num_tokens == 0:
                continue
            expert = self.experts[i]
            tokens_for_this_expert = sorted_tokens[start_idx:end_idx]
            expert_out = expert(tokens_for_this_expert)
            outputs.append(expert_out)
            start_idx = end_idx
        outs = torch.cat(outputs, dim=0) if len(outputs) else sorted_tokens.new_empty(0)
        new_x = torch.empty_like(outs)
        new_x[idxs] = outs
        return new_x.view(*topk_ids.shape, -1).type(topk_weight.dtype).mul_(
            topk_weight.unsqueeze(dim=-1)).sum(dim=1).type(new_x.dtype)


class TolistNoSkip(Base):
    """``.tolist()`` counts (one_hot sum), no skip, the slice inline in the call."""

    def forward(self, x):
        return self.moe_infer(x, *self.route(x))

    def moe_infer(self, x, ids, w):
        perm = ids.view(-1).argsort()
        rows = x[perm // K]
        counts = F.one_hot(ids.view(-1), len(self.experts)).sum(0).tolist()
        outs = []
        start = 0
        for e, n in enumerate(counts):
            end = start + n
            outs.append(self.experts[e](rows[start:end]))
            start = end
        y = torch.cat(outs, 0)
        back = torch.empty_like(y)
        back[perm] = y
        return (back.view(x.shape[0], K, -1) * w.unsqueeze(-1)).sum(1)


class RangeTensorCounts(Base):
    """rxlm's form: ``for i in range(E)``, the count read as a tensor ``counts[i]``."""

    def forward(self, x):
        return self.moe_infer(x, *self.route(x))

    def moe_infer(self, x, ids, w):
        sorted_ids, order = ids.view(-1).sort(0)
        tok = torch.arange(x.shape[0]).repeat_interleave(K)
        rows = x[tok[order]]
        counts = F.one_hot(sorted_ids, num_classes=len(self.experts)).sum(dim=0)
        outs = []
        start_idx = 0
        for i in range(len(self.experts)):
            n = counts[i]
            if n == 0:
                continue
            end_idx = start_idx + n
            outs.append(self.experts[i](rows[start_idx:end_idx]))
            start_idx = end_idx
        y = torch.cat(outs, dim=0) * w.view(-1)[order].unsqueeze(1)
        out = torch.zeros_like(x)
        out.index_add_(0, tok[order], y)
        return out


def _tokens(T, seed=0):
    return torch.randn(T, D, generator=torch.Generator().manual_seed(seed))


def _compare(model, x, atol=1e-5):
    backend = Graphs()
    params = list(model.parameters())
    ref = model(x)
    g = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, params, g, allow_unused=True)
    out = torch.compile(nn.Sequential(model), backend=backend)(x)
    grads = torch.autograd.grad(out, params, g, allow_unused=True)
    torch.testing.assert_close(out, ref, atol=atol, rtol=atol)
    for (name, _), a, b in zip(model.named_parameters(), grads, ref_grads):
        if b is None:  # an expert without rows: None in eager, zero when it ran on its empty chunk
            assert a is None or torch.count_nonzero(a) == 0, name
            continue
        torch.testing.assert_close(a, b, atol=atol, rtol=atol, msg=lambda m: f"{name}: {m}")
    return backend


def _skewed(model, T=6):
    """Tokens routed so that some expert gets none (its skip is taken in eager)."""
    x = _tokens(T)
    with torch.no_grad():
        model.gate.weight.zero_()
        model.gate.weight[0, 0] = 5.0
        model.gate.weight[1, 1] = 5.0
        x[:, 0] = x[:, 0].abs() + 1
        x[:, 1] = x[:, 1].abs() + 1
    return x


@pytest.mark.parametrize("cls", [DeepseekForm, TolistNoSkip, RangeTensorCounts])
def test_segment_loop_is_one_graph_and_exact(cls):
    torch.manual_seed(0)
    model = cls()
    src = loop_capture.analyse(cls.moe_infer).replacement._sonic_source
    assert ".split(" in src and "start" not in src.split(".split(")[1].split("torch.cat")[0].replace(
        "start_idx = 0", ""), src
    assert loop_capture.host_count_splits(cls.forward), "the frame must get capture_scalar_outputs"
    for x in (_tokens(7, 1), _skewed(model)):
        backend = _compare(model, x)
        assert len(backend.graphs) == 1, [g.code for g in backend.graphs]
        torch._dynamo.reset()


def test_every_expert_empty_keeps_the_empty_branch():
    """No rows at all (T = 0): ``cat(outputs) if len(outputs) else new_empty(0)`` takes the else
    branch in eager; the rewritten test (rows > 0) takes it too."""
    src = loop_capture.analyse(DeepseekForm.moe_infer).replacement._sonic_source
    assert "if _sonic_nonempty" in src and "len(outputs)" not in src


class OffsetPlusOne(DeepseekForm):

    def forward(self, x):
        return self.moe_infer(x, *self.route(x))
    def moe_infer(self, x, topk_ids, topk_weight):
        idxs = topk_ids.view(-1).argsort()
        sorted_tokens = x[idxs // K]
        counts = torch.bincount(topk_ids.view(-1), minlength=E).tolist()
        outputs = []
        start = 0
        for i, n in enumerate(counts):
            end = start + n
            outputs.append(self.experts[i](sorted_tokens[start:end]))
            start = end - 1 if i == 99 else end  # not the carried end: advanced by something else
        return _combine(torch.cat(outputs, dim=0), idxs, topk_ids, topk_weight)


class OffsetTwice(DeepseekForm):

    def forward(self, x):
        return self.moe_infer(x, *self.route(x))
    def moe_infer(self, x, topk_ids, topk_weight):
        idxs = topk_ids.view(-1).argsort()
        sorted_tokens = x[idxs // K]
        counts = torch.bincount(topk_ids.view(-1), minlength=E).tolist()
        outputs = []
        start = 0
        for i, n in enumerate(counts):
            end = start + n + n // 2  # advanced by more than the count
            outputs.append(self.experts[i](sorted_tokens[start:end]))
            start = end
        return torch.cat(outputs, 0)[:1].expand(x.shape[0], -1)


class TwoRowTensors(DeepseekForm):

    def forward(self, x):
        return self.moe_infer(x, *self.route(x))
    def moe_infer(self, x, topk_ids, topk_weight):
        idxs = topk_ids.view(-1).argsort()
        sorted_tokens = x[idxs // K]
        other = x.repeat_interleave(K, 0)
        counts = torch.bincount(topk_ids.view(-1), minlength=E).tolist()
        outputs = []
        start = 0
        for i, n in enumerate(counts):
            end = start + n
            h = sorted_tokens[start:end] if i % 2 else other[start:end]  # rows from another tensor
            outputs.append(self.experts[i](h))
            start = end
        return _combine(torch.cat(outputs, dim=0), idxs, topk_ids, topk_weight)


class Reversed(DeepseekForm):

    def forward(self, x):
        return self.moe_infer(x, *self.route(x))
    def moe_infer(self, x, topk_ids, topk_weight):
        idxs = topk_ids.view(-1).argsort()
        sorted_tokens = x[idxs // K]
        counts = torch.bincount(topk_ids.view(-1), minlength=E).tolist()
        outputs = []
        start = 0
        for i, n in enumerate(counts):
            end = start + n
            if n == 0:
                continue
            outputs.append(self.experts[i](sorted_tokens[start:end]))
            start = end
        return _combine(torch.cat(outputs[::-1], dim=0), idxs, topk_ids, topk_weight)  # another order


class CountedOutputs(DeepseekForm):

    def forward(self, x):
        return self.moe_infer(x, *self.route(x))
    def moe_infer(self, x, topk_ids, topk_weight):
        idxs = topk_ids.view(-1).argsort()
        sorted_tokens = x[idxs // K]
        counts = torch.bincount(topk_ids.view(-1), minlength=E).tolist()
        outputs = []
        start = 0
        for i, n in enumerate(counts):
            end = start + n
            if n == 0:
                continue
            outputs.append(self.experts[i](sorted_tokens[start:end]))
            start = end
        return _combine(torch.cat(outputs, dim=0), idxs, topk_ids, topk_weight) * len(outputs)  # how many experts had rows


class ConcatOtherDim(DeepseekForm):

    def forward(self, x):
        return self.moe_infer(x, *self.route(x))
    def moe_infer(self, x, topk_ids, topk_weight):
        idxs = topk_ids.view(-1).argsort()
        sorted_tokens = x[idxs // K]
        counts = torch.bincount(topk_ids.view(-1), minlength=E).tolist()
        outputs = []
        start = 0
        for i, n in enumerate(counts):
            end = start + n
            if n == 0:
                continue
            outputs.append(self.experts[i](sorted_tokens[start:end]).sum(0, keepdim=True))
            start = end
        return torch.cat(outputs, -1).sum().expand(x.shape[0], D)


class CountsCalls(DeepseekForm):
    """Besides its output, each expert that ran adds to a tally: running the skipped experts on
    empty chunks would add more."""

    def moe_infer(self, x, topk_ids, topk_weight):
        idxs = topk_ids.view(-1).argsort()
        sorted_tokens = x[idxs // K]
        counts = torch.bincount(topk_ids.view(-1), minlength=E).tolist()
        tally = torch.zeros(())
        outputs = []
        start = 0
        for i, n in enumerate(counts):
            end = start + n
            if n == 0:
                continue
            outputs.append(self.experts[i](sorted_tokens[start:end]))
            tally += 1.0
            start = end
        return _combine(torch.cat(outputs, dim=0), idxs, topk_ids, topk_weight) * tally


class TallyInPlace(CountsCalls):
    """The same tally as an ``index_add_`` into a tensor from outside the loop."""

    def moe_infer(self, x, topk_ids, topk_weight):
        idxs = topk_ids.view(-1).argsort()
        sorted_tokens = x[idxs // K]
        counts = torch.bincount(topk_ids.view(-1), minlength=E).tolist()
        tally = torch.zeros(1)
        outputs = []
        start = 0
        for i, n in enumerate(counts):
            end = start + n
            if n == 0:
                continue
            outputs.append(self.experts[i](sorted_tokens[start:end]))
            tally.index_add_(0, torch.zeros(1, dtype=torch.long), torch.ones(1))
            start = end
        return _combine(torch.cat(outputs, dim=0), idxs, topk_ids, topk_weight) * tally


def _combine(outs, idxs, topk_ids, topk_weight):
    new_x = torch.empty_like(outs)
    new_x[idxs] = outs
    return (new_x.view(*topk_ids.shape, -1) * topk_weight.unsqueeze(-1)).sum(1)


@pytest.mark.parametrize("cls, why", [
    (OffsetPlusOne, "carries a value"),
    (OffsetTwice, "advanced by"),
    (TwoRowTensors, "sliced from"),
    (Reversed, "torch.cat"),
    (CountedOutputs, "torch.cat"),
    (ConcatOtherDim, "torch.cat"),
    (CountsCalls, "accumulates"),
    (TallyInPlace, "an expert without rows now runs"),
])
def test_near_miss_is_not_rewritten(cls, why):
    torch.manual_seed(0)
    analysis = loop_capture.analyse(cls.moe_infer)
    assert analysis.replacement is None
    assert any(why in n.reason for n in analysis.notes if not n.rewritten), [str(n) for n in analysis.notes]
    model = cls()
    x = _skewed(model)
    ref = model(x)
    out = torch.compile(nn.Sequential(model), backend=Graphs())(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_explain_notes_name_the_segment_loop():
    notes = [n for n in capture.notes_for(DeepseekForm()) if n.rewritten]
    assert any("segment loop" in n.form for n in notes), [str(n) for n in notes]


# --------------------------------------------------------------------------- the whole block: one fused op

def _fused(backend) -> int:
    return sum(g.code.count("torch.ops.moe_inductor.fused_moe") for g in backend.graphs)


def _blocks(backend) -> list:
    """The whole blocks rewritten (router to combine); the grouped MLP alone on rows already grouped
    by expert (``local_experts``, score 1, the graph's own combine kept) is exact for any rows."""
    return [c for r in backend.reports for c in r.candidates if c.status == "rewritten" and c.idiom == "sorted_rows"]


@pytest.mark.parametrize("cls", [DeepseekForm, TolistNoSkip])
def test_sorted_segment_block_is_fused_and_exact(cls):
    """split + the same ModuleList MLP per chunk + cat -> grouped GEMMs on device offsets
    (host_splits); scatter_ / one_hot counts of the sorted ids; new_x[perm] = y combine weighted
    per (token, slot): one fused op, output and every gradient equal to eager."""
    torch.manual_seed(0)
    model = cls()
    for x in (_tokens(7, 1), _skewed(model)):
        backend = _compare(model, x)
        assert len(backend.graphs) == 1 and _fused(backend) == 1 and len(_blocks(backend)) == 1, \
            backend.graphs[0].code
        torch._dynamo.reset()


class PlainInfer(Base):
    """A base class whose ``forward`` calls ``self.moe_infer``, itself a dense stand-in with no split."""

    def forward(self, x):
        return self.moe_infer(x, *self.route(x))

    def moe_infer(self, x, ids, w):
        return x * 0


class InheritedForward(PlainInfer):
    """``forward`` inherited from ``PlainInfer``; ``moe_infer`` overridden with DeepSeek's segment loop
    (a subclass of a generic layer, as model code often is): the split is found through the
    instance's class, not the class that defines ``forward``."""

    moe_infer = DeepseekForm.moe_infer


def test_inherited_forward_calling_an_overridden_method():
    torch.manual_seed(0)
    model = InheritedForward()
    assert not loop_capture.host_count_splits(PlainInfer.forward)
    assert loop_capture.host_count_splits(PlainInfer.forward, cls=InheritedForward)
    assert capture.wants_host_counts({"self": model})
    for x in (_tokens(7, 1), _skewed(model)):
        backend = _compare(model, x)
        assert len(backend.graphs) == 1 and _fused(backend) == 1, [g.code for g in backend.graphs]
        torch._dynamo.reset()


class CountsOfOtherIds(DeepseekForm):
    """The counts are taken of other top-k ids than the ones sorted: the chunks are not the
    experts' rows."""

    def forward(self, x):
        return self.moe_infer(x, *self.route(x))

    def moe_infer(self, x, topk_ids, topk_weight):
        other = (-self.gate(x)).topk(K, dim=-1)[1]
        cnts = other.new_zeros((other.shape[0], len(self.experts)))
        cnts.scatter_(1, other, 1)
        tokens_per_expert = cnts.sum(dim=0)
        idxs = topk_ids.view(-1).argsort()
        sorted_tokens = x[idxs // topk_ids.shape[1]]
        tokens_per_expert = tokens_per_expert.cpu().numpy()
        outputs = []
        start_idx = 0
        for i, num_tokens in enumerate(tokens_per_expert):
            end_idx = start_idx + num_tokens
            if num_tokens == 0:
                continue
            outputs.append(self.experts[i](sorted_tokens[start_idx:end_idx]))
            start_idx = end_idx
        return _combine(torch.cat(outputs, dim=0), idxs, topk_ids, topk_weight)


class WrittenBackElsewhere(DeepseekForm):
    """The rows are written back at another permutation than the one they were gathered with."""

    def forward(self, x):
        return self.moe_infer(x, *self.route(x))

    def moe_infer(self, x, topk_ids, topk_weight):
        cnts = topk_ids.new_zeros((topk_ids.shape[0], len(self.experts)))
        cnts.scatter_(1, topk_ids, 1)
        idxs = topk_ids.view(-1).argsort()
        sorted_tokens = x[idxs // K]
        counts = cnts.sum(dim=0).tolist()
        outputs = []
        start = 0
        for i, n in enumerate(counts):
            end = start + n
            outputs.append(self.experts[i](sorted_tokens[start:end]))
            start = end
        return _combine(torch.cat(outputs, dim=0), idxs.flip(0), topk_ids, topk_weight)


class UnsortedRows(DeepseekForm):
    """Segments of rows that were not sorted by expert (the rewritten loop is exact, the block is
    not the sorted-rows MoE)."""

    def forward(self, x):
        return self.moe_infer(x, *self.route(x))

    def moe_infer(self, x, topk_ids, topk_weight):
        cnts = topk_ids.new_zeros((topk_ids.shape[0], len(self.experts)))
        cnts.scatter_(1, topk_ids, 1)
        idxs = topk_ids.view(-1).argsort()
        rows = x.repeat_interleave(K, 0)
        counts = cnts.sum(dim=0).tolist()
        outputs = []
        start = 0
        for i, n in enumerate(counts):
            end = start + n
            outputs.append(self.experts[i](rows[start:end]))
            start = end
        return _combine(torch.cat(outputs, dim=0), idxs, topk_ids, topk_weight)


class GeluExpert(MLP):
    def forward(self, x):
        return self.down_proj(F.gelu(self.gate_proj(x)) * self.up_proj(x))


class MixedExperts(DeepseekForm):
    """Expert 1 computes another function (gelu): no grouped GEMM over all experts."""

    def __init__(self):
        super().__init__()
        self.experts[1] = GeluExpert()

    def forward(self, x):
        return self.moe_infer(x, *self.route(x))


class ScoresAppliedTwice(DeepseekForm):
    def forward(self, x):
        return self.moe_infer(x, *self.route(x))

    def moe_infer(self, x, topk_ids, topk_weight):
        idxs = topk_ids.view(-1).argsort()
        cnts = topk_ids.new_zeros((topk_ids.shape[0], len(self.experts)))
        cnts.scatter_(1, topk_ids, 1)
        counts = cnts.sum(dim=0).tolist()
        sorted_tokens = x[idxs // K]
        s = topk_weight.view(-1)[idxs].unsqueeze(-1)
        outputs = []
        start = 0
        for i, n in enumerate(counts):
            end = start + n
            outputs.append(self.experts[i](sorted_tokens[start:end]))
            start = end
        y = torch.cat(outputs, 0) * s
        new_x = torch.empty_like(y)
        new_x[idxs] = y
        return (new_x.view(*topk_ids.shape, -1) * topk_weight.unsqueeze(-1)).sum(1)


@pytest.mark.parametrize("cls", [CountsOfOtherIds, WrittenBackElsewhere, UnsortedRows, MixedExperts,
                                 ScoresAppliedTwice])
def test_block_near_miss_is_not_fused_and_exact(cls):
    torch.manual_seed(0)
    model = cls()
    assert loop_capture.analyse(cls.moe_infer).replacement is not None  # the loop itself is rewritten
    backend = _compare(model, _skewed(model))
    assert len(backend.graphs) == 1 and not _blocks(backend), backend.graphs[0].code
