"""Rows split by host copies of per-expert counts (JetMoE's router ``expert_size.tolist()`` and
``JetMoeParallelExperts``' split + per-expert F.linear + cat): one graph under sonic, the splits
turned into grouped GEMMs on device offsets (``moe_inductor/dynamo/host_splits.py``), the MoE block
rewritten by the sorted-rows composition, output and every gradient equal to eager."""
import logging

import pytest
import torch
from torch._dynamo.utils import counters

import loop_forms
from test_loop_capture import Graphs, _compare

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def _notes(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "moe_inductor"]


def test_host_counts_split_is_one_graph_rewritten_and_exact(caplog):
    torch.manual_seed(0)
    model = loop_forms.HostCountsSplitMoE()
    x = torch.randn(2, 5, 32)
    with caplog.at_level(logging.INFO, logger="moe_inductor"):
        backend = _compare(model, x)
    assert len(backend.graphs) == 1 and not counters["graph_break"], dict(counters["graph_break"])
    assert counters["sonic"]["moe_rewrites"] == 1, dict(counters["sonic"])
    notes = _notes(caplog)
    assert sum("one grouped GEMM with device offsets" in n for n in notes) == 2, notes
    assert any("host copy of" in n and "removed" in n for n in notes), notes
    code = backend.graphs[0].code
    assert ".item()" not in code and ".split(" not in code and "torch.split(" not in code, code  # no host copy
    assert "fused_moe" in code, code


def test_without_sonic_the_host_copy_breaks_the_graph():
    # the same module under another backend: Dynamo's default (graph break at .tolist())
    from torch._dynamo.testing import CompileCounter

    torch.manual_seed(0)
    model = loop_forms.HostCountsSplitMoE()
    x = torch.randn(2, 5, 32)
    cnt = CompileCounter()
    torch.testing.assert_close(torch.compile(model, backend=cnt)(x), model(x))
    assert counters["graph_break"], "expected Dynamo's graph break at .tolist() outside sonic"


def test_rows_not_sorted_by_the_counted_ids_are_declined(caplog):
    torch.manual_seed(0)
    model = loop_forms.HostCountsUnsortedRowsMoE()
    x = torch.randn(2, 5, 32)
    with caplog.at_level(logging.INFO, logger="moe_inductor"):
        backend = _compare(model, x)
    assert len(backend.graphs) == 1
    assert counters["sonic"]["moe_rewrites"] == 0 and counters["sonic"]["moe_declined"] >= 1, dict(counters["sonic"])
    assert any("not rewriting" in n and "dispatch" in n for n in _notes(caplog)), _notes(caplog)


def test_host_sizes_read_elsewhere_keep_their_host_copy(caplog):
    torch.manual_seed(0)
    model = loop_forms.HostCountsAlsoReadMoE()
    x = torch.randn(2, 5, 32)
    with caplog.at_level(logging.INFO, logger="moe_inductor"):
        backend = _compare(model, x)
    assert len(backend.graphs) == 1
    notes = _notes(caplog)
    assert any("kept: its values are also used by" in n for n in notes), notes
    assert ".item()" in backend.graphs[0].code


def test_chunk_with_a_bias_is_not_a_grouped_gemm(caplog):
    torch.manual_seed(0)
    model = loop_forms.HostCountsBiasedChunkMoE()
    x = torch.randn(2, 5, 32)
    with caplog.at_level(logging.INFO, logger="moe_inductor"):
        backend = _compare(model, x)
    assert len(backend.graphs) == 1
    notes = _notes(caplog)
    assert any("not rewritten" in n and "F.linear(chunk, W[0]) without bias" in n for n in notes), notes
    assert counters["sonic"]["moe_rewrites"] == 0, dict(counters["sonic"])


@pytest.mark.slow  # about 42 s on 2 loaded cores (two layers, forward and backward)
def test_jetmoe_one_graph_blocks_rewritten_and_exact(caplog):
    # the MoE blocks (JetMoeMoE) are rewritten; the mixture-of-attention heads (map/reduce over the
    # same router and ParallelExperts) keep their grouped GEMMs and are declined by the composition
    # (a map without a score or an activation is not an expert MLP): 2 per layer
    hf_models = pytest.importorskip("hf_models")
    pytest.importorskip("transformers")
    model, ids = hf_models.build("jetmoe")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    ref = model(ids).logits
    g = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, [p for _, p in named], g, allow_unused=True)
    backend = Graphs()
    with caplog.at_level(logging.INFO, logger="moe_inductor"):
        out = torch.compile(model, backend=backend)(ids).logits
    grads = torch.autograd.grad(out, [p for _, p in named], g, allow_unused=True)
    assert len(backend.graphs) == 1 and not counters["graph_break"], dict(counters["graph_break"])
    assert counters["sonic"]["moe_rewrites"] == len(hf_models.moe_modules(model)) == 2, dict(counters["sonic"])
    assert counters["sonic"]["moe_declined"] == 4, dict(counters["sonic"])  # MoA map and reduce, 2 layers
    notes = _notes(caplog)
    assert sum("one grouped GEMM with device offsets" in n for n in notes) == 8, notes  # 4 per layer
    assert ".item()" not in backend.graphs[0].code
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    for (name, _), a, b in zip(named, grads, ref_grads):
        assert (a is None) == (b is None), name
        if b is not None:
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_jetmoe_notes_name_the_splits():
    hf_models = pytest.importorskip("hf_models")
    pytest.importorskip("transformers")
    from moe_inductor.dynamo import capture

    model, _ = hf_models.build("jetmoe")
    notes = capture.notes_for(model)
    assert any(n.rewritten and "JetMoeParallelExperts" in n.function and "expert_size" in n.form for n in notes), notes
