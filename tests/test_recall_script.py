"""examples/recall.py's judgement of a compiled module: the fp32 check and the --dtype bfloat16
check against a float64 copy (issue 18: the project is judged in bf16, as people train)."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def recall():
    spec = importlib.util.spec_from_file_location("recall_script", os.path.join(HERE, "..", "examples", "recall.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    yield mod
    mod.DTYPE = None


def test_bf16_value_as_close_as_eager_passes(recall):
    ref = torch.randn(64, dtype=torch.float64)
    eager = ref.to(torch.bfloat16)
    assert recall.mismatch_vs_float64(eager.clone(), eager, ref) is None


def test_bf16_value_far_from_float64_fails(recall):
    recall.DTYPE = torch.bfloat16
    ref = torch.randn(64, dtype=torch.float64)
    eager = ref.to(torch.bfloat16)
    wrong = eager.clone()
    wrong[:8] = 0  # an eighth of the values zeroed: relative error ~0.35
    assert "relative norm error vs float64" in recall.mismatch_vs_float64(wrong, eager, ref)


def test_missing_gradient_fails(recall):
    ref = torch.randn(4, dtype=torch.float64)
    assert recall.mismatch_vs_float64(None, ref.float(), ref) == "one side has no gradient"


def test_fp32_tolerance(recall):
    a = torch.randn(16)
    assert recall.mismatch(a + 1e-6, a, torch.float32, 1e-4) is None
    assert recall.mismatch(a + 1e-2, a, torch.float32, 1e-4).startswith("max abs error")


def test_bf16_entry_recalled_light(recall):
    """One faithful entry cast to bf16 (module and inputs), through the rewrite: rewritten from the
    first call and judged against its float64 copy."""
    from idiom_catalogue import BY_NAME

    recall.DTYPE = torch.bfloat16
    try:
        rec = recall.run_entry(BY_NAME["mixtral_4x_expert_hit"], light=True)
    finally:
        recall.DTYPE = None
    assert rec["errors"] == [] and rec["fused_calls"] == [1, 1] and rec["recalled"], rec
