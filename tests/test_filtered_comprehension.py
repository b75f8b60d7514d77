"""Filtered list comprehensions over experts (``moe_inductor.dynamo.loop_capture._filtered_comprehension``):
LLaMA-MoE's ``UniversalCalculator`` writes ``[self.experts(split_x[i], i) for i in range(E) if
split_x[i].shape[0] > 0]`` and concatenates the list; the filter guards on an unbacked size and stops
Dynamo. With the list read only by ``torch.cat(list, 0)`` and row-wise experts, the outputs of the
empty chunks are provably empty and harmless to the concatenation: the block is one graph, rewritten,
output and every gradient equal to eager. Near misses (the list also read by ``len``, a filter on
something else, an expert with a side effect) keep their comprehension and stay exact."""
import importlib.util
import math
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from moe_inductor.dynamo import capture, loop_capture, side_effects
from rewrite_check import CaptureGraphs, rewrite_and_compare

pytestmark = pytest.mark.usefixtures("fresh_dynamo")

D, N, E, K = 16, 8, 4, 2

# the block, as LLaMA-MoE writes it (counts of fixed length E by one_hot); FILTER and AFTER vary
_TEMPLATE = '''
import math
import torch
import torch.nn as nn
import torch.nn.functional as F


class Experts(nn.Module):
    """LLaMA-MoE's LinearGLUExperts: ParameterList weights, forward(x, i)."""

    def __init__(self, d, n, e):
        super().__init__()
        self.calls = 0
        self.weight_gate = nn.ParameterList([nn.Parameter(torch.randn(n, d) / math.sqrt(d)) for _ in range(e)])
        self.weight_up = nn.ParameterList([nn.Parameter(torch.randn(n, d) / math.sqrt(d)) for _ in range(e)])
        self.weight_down = nn.ParameterList([nn.Parameter(torch.randn(d, n) / math.sqrt(n)) for _ in range(e)])

    def forward(self, x, i):
        SIDE_EFFECT
        gate = F.silu(F.linear(x, self.weight_gate[i]))
        return F.linear(gate * F.linear(x, self.weight_up[i]), self.weight_down[i])


class Block(nn.Module):
    def __init__(self, d, n, e, k):
        super().__init__()
        self.num_experts, self.k = e, k
        self.gate = nn.Linear(d, e)
        self.experts = Experts(d, n, e)
        with torch.no_grad():
            self.gate.bias[e - 1] = -100.0  # the last expert never gets a token

    def forward(self, x):
        top_logits, ids = self.gate(x).topk(self.k, dim=1)
        scores = top_logits.softmax(1)
        batch_size = ids.size(0)
        ids, scores = ids.flatten(), scores.flatten()
        batch_indices = torch.arange(batch_size, device=x.device).repeat_interleave(self.k)
        _, order = ids.sort(0)
        sorted_scores = scores.index_select(0, order)
        sorted_batch = batch_indices.index_select(0, order)
        counts = F.one_hot(ids, self.num_experts).sum(0).tolist()
        split_x = torch.split(x.index_select(0, sorted_batch), counts, dim=0)
        outs = [self.experts(split_x[i], i) for i in range(self.num_experts) if FILTER]
        y = torch.cat(outs, 0) AFTER
        y = torch.mul(y, sorted_scores.reshape(-1, 1) * 1.0)
        return torch.zeros((batch_size, y.size(1)), dtype=y.dtype).index_add(0, sorted_batch, y)
'''

SPELLINGS = ["split_x[i].shape[0] > 0", "split_x[i].numel() > 0", "len(split_x[i]) > 0", "split_x[i].size(0) != 0",
             "0 < split_x[i].shape[0]", "split_x[i].shape[0] >= 1", "split_x[i].shape[0]"]
_modules: dict = {}
_dir = Path(tempfile.mkdtemp(prefix="sonic_filtered_comp_"))


def _block(filter_="split_x[i].shape[0] > 0", after="", side_effect="pass"):
    """A Block whose comprehension filter, use of the concatenation and expert body are given (a module
    written to a file: the loop capture reads the source)."""
    key = (filter_, after, side_effect)
    if key not in _modules:
        src = _TEMPLATE.replace("FILTER", filter_).replace("AFTER", after).replace("SIDE_EFFECT", side_effect)
        path = _dir / f"fc_block_{len(_modules)}.py"
        path.write_text(textwrap.dedent(src))
        spec = importlib.util.spec_from_file_location(path.stem, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = mod
        spec.loader.exec_module(mod)
        _modules[key] = mod
    torch.manual_seed(0)
    return _modules[key].Block(D, N, E, K)


@pytest.mark.parametrize("filter_", SPELLINGS)
def test_every_filter_spelling_is_one_graph_rewritten_and_exact(filter_):
    model = _block(filter_)
    analysis = loop_capture.analyse(type(model).forward)
    assert analysis.replacement is not None, [str(n) for n in analysis.notes]
    note = next(n for n in analysis.notes if n.rewritten)
    assert note.modules == frozenset({"experts"})
    cands = rewrite_and_compare(nn.Sequential(model), D, lengths=(5, 8))  # fullgraph; expert E-1 gets no token
    assert cands and all(c.status == "rewritten" for c in cands), [(c.status, c.reason) for c in cands]


def _compare(model, T=6):
    """Compile with sonic's capture (graph breaks allowed); output and every gradient equal eager,
    an expert's None gradient in eager is zero or None compiled; the backend is returned."""
    backend = CaptureGraphs()
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(T))
    params = list(model.parameters())
    ref = model(x)
    g = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, params, g, allow_unused=True)
    out = torch.compile(nn.Sequential(model), backend=backend)(x)
    grads = torch.autograd.grad(out, params, g, allow_unused=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, ref_grads):
        if b is None:
            assert a is None or torch.count_nonzero(a) == 0
        else:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    return backend


def test_list_read_by_len_keeps_the_filter():
    """``len(outs)`` counts the experts with rows: dropping the filter would change it."""
    model = _block(after="* len(outs)")
    analysis = loop_capture.analyse(type(model).forward)
    assert analysis.replacement is None
    assert any("read other than by `torch.cat(outs, 0)`" in n.reason for n in analysis.notes), analysis.notes
    _compare(model)


@pytest.mark.parametrize("filter_", ["i >= 0", "split_x[i].shape[1] > 0"])
def test_filter_on_something_else_is_not_rewritten(filter_):
    """A filter on the expert id, or on a dimension other than the rows: not "this chunk is
    non-empty" (``if i % 2`` is not even a working block here: the scores would not match)."""
    model = _block(filter_)
    assert loop_capture.analyse(type(model).forward).replacement is None
    _compare(model)


def test_cat_over_another_dimension_keeps_the_filter():
    """``torch.cat(outs, 1)`` is not ``cat(..., 0)``: an empty output would change its shape check."""
    model = _block(after=".t().contiguous().t()")  # cat(outs, 0) still: rewritten
    assert loop_capture.analyse(type(model).forward).replacement is not None
    src = textwrap.dedent('''
        def f(xs):
            outs = [x * 2 for i in range(3) if xs[i].shape[0] > 0]
            return torch.cat(outs, 1)
    ''')
    ns = {"torch": torch}
    path = _dir / "fc_cat1.py"
    path.write_text("import torch\n" + src)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert loop_capture.analyse(mod.f).replacement is None


def test_expert_with_a_side_effect_keeps_the_filter():
    """An expert counting its calls (``self.calls += 1``) would count the empty experts too: the
    capture keeps the comprehension for this instance; the count and the values equal eager's."""
    model = _block(side_effect="self.calls += 1")
    assert loop_capture.analyse(type(model).forward).replacement is not None  # the source alone is fine
    _compare(model)
    eager = _block(side_effect="self.calls += 1")
    eager(torch.randn(6, D, generator=torch.Generator().manual_seed(6)))
    assert model.experts.calls == 2 * eager.experts.calls  # eager + compiled, the same experts each time
    assert "forward" not in model.__dict__
    assert any("calls" in n.reason for n in side_effects.declines_for(model)), side_effects.declines_for(model)


def test_a_module_argument_is_not_called_in_the_rewrite():
    """Experts passed as an argument (not ``self``'s): nothing proves them free of side effects."""
    path = _dir / "fc_arg.py"
    path.write_text("import torch\n" + textwrap.dedent('''
        def f(experts, xs):
            outs = [experts(xs[i], i) for i in range(3) if xs[i].shape[0] > 0]
            return torch.cat(outs, 0)
    '''))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    analysis = loop_capture.analyse(mod.f)
    assert analysis.replacement is None
    assert any("may be a module" in n.reason for n in analysis.notes), analysis.notes


def test_bincount_counts_are_explained():
    """``bincount(...).tolist()`` has a data-dependent length: kept, and the note says why."""
    from faithful.llama_moe import UniversalCalculator

    notes = loop_capture.analyse(UniversalCalculator.forward).notes
    assert any(n.rewritten for n in notes)
    assert any("max(minlength, largest id + 1)" in n.reason for n in notes), [str(n) for n in notes]
