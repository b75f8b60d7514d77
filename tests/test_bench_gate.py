"""The benchmark's correctness gate (issue 20, item 2): every row's output and gradients are checked
against the op's PyTorch path before it is timed; a row above the bf16 tolerance is recorded failed
with the tensors that failed, and gets no timings. Checked on CPU with rows built from the PyTorch
path itself: the exact row passes, a row whose output is 5 % off, a row whose scores get no
gradient and a row whose down-projection gradient is wrong fail, each naming the tensor."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import bench_kernels as bk  # noqa: E402
from moe_inductor.ops.op import fused_moe  # noqa: E402


def _row(mode):
    def make(pb):
        token_ids, expert_ids, _ = bk.topk_routing(pb)
        params = bk.leaves(pb.x, pb.gate_up, pb.down, pb.top_w)
        x, w1, w2, s = params
        s_used = s.detach() if mode == "no_score_grad" else s
        # "down_grad": the value of w2 exactly (a - a.detach() is 0), its gradient 1.1 times the true one
        w2_used = w2 + (0.1 * w2 - (0.1 * w2).detach()) if mode == "down_grad" else w2

        def fwd():
            out = fused_moe(x, token_ids, expert_ids, s_used.flatten(), w1, w2_used, activation="swiglu",
                            impl="torch")
            return out + 0.05 * out.detach() if mode == "out" else out  # value 5 % off, gradients exact

        return fwd, params
    return make


@pytest.mark.parametrize("mode,failing", [("exact", None), ("out", "out"), ("no_score_grad", "scores"),
                                          ("down_grad", "down")])
def test_gate(mode, failing, monkeypatch):
    monkeypatch.setitem(bk.IMPLS, "probe", _row(mode))
    cfg = bk.BenchConfig(*bk.SMOKE_SHAPE)
    pb = bk.make_problem(cfg, "cpu", tile_m=8)
    res, _ = bk.bench_one(cfg, "probe", pb, None, "sonic", smoke=True)
    assert res.gate_tol == bk.GATE_TOL and set(res.gate) == {"out", "x", "scores", "gate_up", "down"}
    if failing is None:
        assert res.status == "ok", res.status
        assert max(res.gate.values()) == 0.0
    else:
        assert res.status.startswith("failed: correctness gate"), res.status
        assert f"{failing} rel. error" in res.status
        assert [k for k, e in res.gate.items() if e > bk.GATE_TOL] == [failing]
        assert res.fwd_ms is None and res.fwd_bwd_tflops is None


def test_reference_cuts_weight_gradients_to_gate_experts():
    cfg = bk.BenchConfig(32, 16, 8, 6, 2)
    pb = bk.make_problem(cfg, "cpu", tile_m=8)
    ref = bk.torch_reference(pb, bk.topk_routing(pb))
    assert ref["gate_up"].shape[0] == bk.GATE_EXPERTS and ref["down"].shape[0] == bk.GATE_EXPERTS
    assert ref["scores"].shape == pb.top_w.shape and ref["x"].shape == pb.x.shape
