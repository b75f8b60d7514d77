"""moe_inductor.explain: every MoE block of a model is reported, rewritten or not, with why.

Tiny 2-layer Mixtral from transformers (built from config, random weights). ``inductor=False``
keeps the rewrite and skips Inductor's code generation: the report is the same, 5x faster.
"""
import logging

import pytest
import torch

pytest.importorskip("transformers")

import moe_inductor  # noqa: E402
import hf_models  # noqa: E402


def test_default_experts_all_rewritten(caplog):
    model, ids = hf_models.build("mixtral")
    with caplog.at_level(logging.INFO, logger="moe_inductor"):
        report = moe_inductor.explain(model, ids, inductor=False)
    assert [e.where for e in report.rewritten] == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert report.missed == [] and report.declined == []
    e = report.rewritten[0]
    assert (e.idiom, e.num_experts, e.top_k, e.hidden, e.intermediate, e.dtype) == (
        "sorted_rows", 8, 2, 64, 64, torch.float32)
    # decided at rewrite time: on CPU the fused op runs its PyTorch path (issue 11, item 3)
    assert [e.runs_on for e in report.rewritten] == ["PyTorch path (cpu)"] * 2
    text = str(report)
    assert "status     runs on" in text
    assert "model.layers.1.mlp.experts  sorted_rows  8  2  64  64  float32  rewritten  PyTorch path (cpu)" in text
    assert text in caplog.text  # the same table goes to the log


def test_eager_experts_captured_and_rewritten():
    # the "eager" experts loop over the data-dependent expert_hit is traced as a loop over every
    # expert in sonic frames (moe_inductor/dynamo/capture.py): one graph, both blocks rewritten
    model, ids = hf_models.build("mixtral", experts_impl="eager")
    report = moe_inductor.explain(model, ids, inductor=False)
    assert [(e.where, e.idiom) for e in report.rewritten] == [
        ("model.layers.0.mlp.experts", "expert_loop"), ("model.layers.1.mlp.experts", "expert_loop")], str(report)
    assert report.missed == [] and report.graph_breaks == [] and report.graph_count == 1


def test_module_without_moe_reports_nothing():
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())
    x = torch.randn(3, 8)
    report = moe_inductor.explain(mlp, x, inductor=False)
    assert report.entries == [] and report.graph_breaks == [] and report.graph_count == 1
    assert "0 MoE block(s) rewritten" in str(report)


def test_dbrx_blocks_reach_a_graph_without_crashing():
    # DBRX's experts loop over a data-dependent expert_hit: traced as a loop over every expert, so
    # each block is in the one graph, rewritten or declined with a reason (never left out)
    model, ids = hf_models.build("dbrx")
    report = moe_inductor.explain(model, ids, inductor=False)
    assert report.missed == [] and report.graph_breaks == [] and report.graph_count == 1, str(report)
    assert len(report.rewritten) + len(report.declined) == 2
    assert all(e.reason for e in report.declined)
