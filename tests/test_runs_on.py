"""No silent slow path (issue 11, item 3): what a rewritten block runs on is decided at rewrite time
and said once (``explain`` column "runs on", a warning and ``counters["sonic"]["pytorch_path"]``
for a CUDA block that will not use the Triton kernels), and the PyTorch path has a sync-free
variant that CUDA-graph capture (``mode="reduce-overhead"``) takes.

No GPU here: the sync-free variant is forced on CPU (``sync_free=True`` /
``reference.FORCE_SYNC_FREE``) and checked against the sorted path and autograd, and under a
dispatch mode that rejects every op that would sync a CUDA device (tests/test_kernels.py); the CUDA
decisions are checked on the metadata the rewrite sees.
"""
from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from moe_inductor.ops import reference
from moe_inductor.diagnostics import report
from moe_inductor.ops.activations import parse_activation
from moe_inductor.ops.op import fused_moe
from moe_inductor.lower.rewrite import Candidate

from test_kernels import _NoHostSyncMode  # noqa: E402

TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _case(T=11, d=12, n=6, E=5, dtype=torch.float32, act="swiglu", bias=False, dropped=True, seed=0):
    """General routing (0 to 3 experts per token, shuffled) with some dropped (-1) assignments."""
    g = torch.Generator().manual_seed(seed)
    a = parse_activation(act)
    cols = 2 * n if a.gated else n
    toks, exps = [], []
    for t in range(T):
        for e in torch.randperm(E, generator=g)[: t % 4].tolist():
            toks.append(t)
            exps.append(e)
    token_ids, expert_ids = torch.tensor(toks), torch.tensor(exps)
    if dropped:
        expert_ids[::4] = -1
    perm = torch.randperm(len(toks), generator=g)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    x, w1, w2 = r(T, d), r(E, cols, d) / d**0.5, r(E, d, n) / n**0.5
    b1, b2 = (r(E, cols), r(E, d)) if bias else (None, None)
    cast = lambda t: None if t is None else t.to(dtype)
    return dict(x=cast(x), token_ids=token_ids[perm], expert_ids=expert_ids[perm],
                scores=torch.rand(len(toks), generator=g, dtype=torch.float64).to(torch.float32 if dtype != torch.float64
                                                                                    else dtype),
                w1=cast(w1), w2=cast(w2), b1=cast(b1), b2=cast(b2), act=a, grad_out=cast(r(T, d)))


def _run(c, sync_free, keep_h=True, interleaved=False):
    args = (c["x"], c["token_ids"], c["expert_ids"], c["scores"], c["w1"], c["w2"], c["b1"], c["b2"], c["act"],
            interleaved)
    out, h, order = reference.moe_forward(*args, keep_h, sync_free=sync_free)
    grads = reference.moe_backward(c["grad_out"], *args[:8], h if keep_h else None, order, c["act"], interleaved,
                                   sync_free=sync_free)
    return (out, h, order), grads


@pytest.mark.parametrize("kwargs,keep_h,interleaved", [
    (dict(), True, False),                                                     # fp32 SwiGLU, dropped rows
    (dict(dtype=torch.float64, act="gptoss:1.702:0.5", bias=True), True, True),  # the case it exists for: fp64
    (dict(dtype=torch.float64, act="relu2", bias=True), False, False),         # non-gated, H recomputed
    (dict(dtype=torch.bfloat16, act="geglu"), True, True),                     # half precision rounding points
    (dict(E=3, dropped=False, act="softcap_swiglu:0.7:1.3"), False, False),    # no dropped rows, recompute
])
def test_sync_free_variant_matches_sorted_path(kwargs, keep_h, interleaved):
    c = _case(**kwargs)
    (out, h, order), grads = _run(c, True, keep_h, interleaved)
    (r_out, r_h, r_order), r_grads = _run(c, False, keep_h, interleaved)
    tol = TOL[c["x"].dtype]
    assert torch.equal(order, r_order) and order.dtype == torch.int32
    torch.testing.assert_close(out, r_out, atol=tol, rtol=tol)
    torch.testing.assert_close(h, r_h, atol=tol, rtol=tol)
    for name, g, rg in zip(("dx", "dscores", "dw1", "dw2", "db1", "db2"), grads, r_grads):
        if rg is None:
            assert g is None, name
            continue
        assert g.shape == rg.shape and g.dtype == rg.dtype and g.stride() == rg.stride(), name
        torch.testing.assert_close(g, rg, atol=tol, rtol=tol, msg=lambda m: f"{name}: {m}")


def test_sync_free_variant_reads_nothing_back_to_the_host():
    """The sync-free variant passes the dispatch-level check that rejects every op that would sync a
    CUDA device (value reads, data-sized outputs, CUDA bincount); the sorted path does not."""
    c = _case(dtype=torch.float64, bias=True)
    with _NoHostSyncMode():
        _run(c, True)
        _run(c, True, keep_h=False)
    with pytest.raises(AssertionError, match="bincount"), _NoHostSyncMode():
        _run(c, False)


def test_sync_free_variant_through_the_op_matches_autograd(monkeypatch):
    """The op with its registered autograd on the forced sync-free variant (what a capture runs)
    against autograd through the obviously-correct loop, float64."""
    monkeypatch.setattr(reference, "FORCE_SYNC_FREE", True)
    c = _case(dtype=torch.float64, act="swiglu_limit:0.5", bias=True)
    names = ("x", "scores", "w1", "w2", "b1", "b2")

    def leaves():
        return {k: c[k].detach().clone().requires_grad_(True) for k in names}

    got, want = leaves(), leaves()
    out = fused_moe(got["x"], c["token_ids"], c["expert_ids"], got["scores"], got["w1"], got["w2"], b1=got["b1"],
                    b2=got["b2"], activation="swiglu_limit:0.5", impl="torch")
    out.backward(c["grad_out"])
    keep = c["expert_ids"] >= 0  # the naive loop has no notion of a dropped assignment: leave them out
    ref = reference.naive_moe(want["x"], c["token_ids"][keep], c["expert_ids"][keep], want["scores"][keep],
                              want["w1"], want["w2"], want["b1"], want["b2"], "swiglu_limit:0.5")
    ref.backward(c["grad_out"])
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    for k in names:
        torch.testing.assert_close(got[k].grad, want[k].grad, atol=1e-10, rtol=1e-10, msg=lambda m: f"{k}: {m}")
    assert not got["scores"].grad[~keep].any()  # dropped assignments: zero score gradient


# --------------------------------------------------------------------------- decided at rewrite time

def test_runs_on_decisions(monkeypatch):
    monkeypatch.delenv("MOE_INDUCTOR_IMPL", raising=False)
    cuda = torch.device("cuda")
    fp64 = report.runs_on(cuda, torch.float64, "swiglu", "auto")
    assert fp64.startswith("PyTorch path (dtype torch.float64"), fp64
    # the three activations that used to fall back have epilogues now
    for spec in ("swiglu_limit:7.0", "softcap_swiglu:4.0:25.0", "relu2", "gptoss:1.702:7.0"):
        assert report.runs_on(cuda, torch.float32, spec, "auto") == "triton", spec
    assert report.runs_on(torch.device("cpu"), torch.float32, "swiglu", "auto") == "PyTorch path (cpu)"
    assert report.runs_on(cuda, torch.float32, "swiglu", "torch") == "PyTorch path (impl='torch')"
    assert report.runs_on(cuda, torch.float64, "swiglu", "triton").startswith("error: impl='triton' cannot serve")
    assert report.runs_on(None, None, "swiglu", "auto").startswith("unknown")
    monkeypatch.setenv("MOE_INDUCTOR_IMPL", "torch")  # the op reads it for impl='auto'
    assert report.runs_on(cuda, torch.float32, "swiglu", "auto") == "PyTorch path (impl='torch')"


def _block(device, dtype, activation="swiglu"):
    """What note_runs_on reads of a MoEBlock: the example value of x, the dtype, the activation."""
    example = SimpleNamespace(device=torch.device(device), dtype=dtype)
    return SimpleNamespace(x=SimpleNamespace(meta={"example_value": example}), dtype=dtype, activation=activation)


def test_cuda_block_on_pytorch_path_is_counted_and_warned_once(caplog, monkeypatch):
    from torch._dynamo.utils import counters

    monkeypatch.delenv("MOE_INDUCTOR_IMPL", raising=False)
    monkeypatch.setattr(report, "_warned", set())
    counters.clear()
    with caplog.at_level(logging.WARNING, logger="moe_inductor"):
        for _ in range(2):  # e.g. a recompile: counted again, warned once
            cand = Candidate(idiom="batched_mm", where="model.layers.0.mlp", status="rewritten")
            report.note_runs_on(cand, _block("cuda", torch.float64), "auto")
            assert cand.runs_on.startswith("PyTorch path (dtype torch.float64")
        fast = Candidate(idiom="batched_mm", where="model.layers.1.mlp", status="rewritten")
        report.note_runs_on(fast, _block("cuda", torch.float32, "relu2"), "auto")
        cpu = Candidate(idiom="batched_mm", where="model.layers.2.mlp", status="rewritten")
        report.note_runs_on(cpu, _block("cpu", torch.float64), "auto")
        chosen = Candidate(idiom="batched_mm", where="model.layers.3.mlp", status="rewritten")
        report.note_runs_on(chosen, _block("cuda", torch.float32), "torch")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "model.layers.0.mlp" in warnings[0] and "float64" in warnings[0] and "host" in warnings[0]
    assert fast.runs_on == "triton" and cpu.runs_on == "PyTorch path (cpu)"
    assert chosen.runs_on == "PyTorch path (impl='torch')"  # chosen by the user: counted, not warned
    assert counters["sonic"]["pytorch_path"] == 3


def test_rewrite_records_runs_on(fresh_dynamo):
    """Through the backend's rewrite: every rewritten candidate carries its decision."""
    from moe_modules import LoopMoE

    import moe_inductor

    m = LoopMoE().double()
    rep = moe_inductor.explain(m, torch.randn(1, 6, 32, dtype=torch.float64), inductor=False)
    assert [e.runs_on for e in rep.rewritten] == ["PyTorch path (cpu)"]
    assert "runs on" in str(rep)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("recompute_h", [False, True])
def test_pytorch_path_captures_in_a_cuda_graph(recompute_h):
    """float64 (no Triton kernel) forward and backward captured in a CUDA graph: the capture takes
    the sync-free variant (a host sync would raise during capture), replays match the eager run."""
    c = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in _case(dtype=torch.float64, bias=True).items()}
    names = ("x", "scores", "w1", "w2", "b1", "b2")
    static = {k: c[k].detach().clone().requires_grad_(True) for k in names}

    def step():
        for t in static.values():
            t.grad = None
        out = fused_moe(static["x"], c["token_ids"], c["expert_ids"], static["scores"], static["w1"], static["w2"],
                        b1=static["b1"], b2=static["b2"], activation="swiglu", recompute_h=recompute_h)
        out.backward(c["grad_out"])
        return out.detach()

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        want = step()  # warm-up, not capturing: the sorted path
        want_grads = {k: t.grad.clone() for k, t in static.items()}
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = step()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    for k, t in static.items():
        torch.testing.assert_close(t.grad, want_grads[k], atol=1e-10, rtol=1e-10, msg=lambda m: f"{k}: {m}")
