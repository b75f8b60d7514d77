"""The PyTorch path where it is small and where the weights are already stacked:

- decode: at most ``reference.SMALL_A`` assignments are grouped on the host (no sort, no device
  counts); the same output, H, order and gradients as the sorted path, bit for bit;
- a per-expert loop over ``W[e]`` slices of one stacked parameter (transformers' experts) is fed
  to the fused op as the stacked ``W`` itself (``rewrite.stacked_source``), never restacked per call;
- a transformers block used on its own (``config._experts_implementation`` unset: its dispatch
  logs a warning in ``forward``) is one graph, rewritten, and Dynamo does not retry a frame on
  every call (it did: the capturable forward shared its code object with the original wrapper).
"""
from __future__ import annotations

import operator

import pytest
import torch
import torch.fx as fx
from torch._dynamo.utils import counters

from moe_inductor import explain
from moe_inductor.ops import reference
from moe_inductor.ops import op as _op  # noqa: F401  (registers the ops)
from moe_inductor.ops.activations import parse_activation
from moe_inductor.dynamo.dynamo_scope import mark_sonic
from moe_inductor.lower.rewrite import stacked_source

from rewrite_check import light_backend


def _routing(T, E, K, seed, dropped=0, repeats=False):
    g = torch.Generator().manual_seed(seed)
    if repeats:  # a token may hold the same expert twice (general routing lists allow it)
        experts = torch.randint(0, E, (T * K,), generator=g)
    else:
        experts = torch.rand(T, E, generator=g).topk(K, dim=-1).indices.flatten()
    tokens = torch.arange(T).repeat_interleave(K)
    if dropped:
        experts[torch.randperm(T * K, generator=g)[:dropped]] = -1
    scores = torch.rand(T * K, generator=g)
    return tokens.int(), experts.int(), scores


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation,bias", [("swiglu", False), ("gelu", True), ("swiglu", True)])
@pytest.mark.parametrize("T,K,dropped,repeats", [(1, 4, 0, False), (3, 2, 1, False), (6, 3, 2, True)])
def test_small_forward_is_the_sorted_path(dtype, activation, bias, T, K, dropped, repeats):
    E, d, n = 5, 16, 8
    g = torch.Generator().manual_seed(1)
    act = parse_activation(activation)
    cols = 2 * n if act.gated else n
    x = torch.randn(T, d, generator=g).to(dtype)
    w1 = torch.randn(E, cols, d, generator=g).to(dtype)
    w2 = torch.randn(E, d, n, generator=g).to(dtype).transpose(1, 2).contiguous().transpose(1, 2)  # any strides
    b1 = torch.randn(E, cols, generator=g).to(dtype) if bias else None
    b2 = torch.randn(E, d, generator=g).to(dtype) if bias else None
    tok, exp, s = _routing(T, E, K, seed=T, dropped=dropped, repeats=repeats)
    assert tok.numel() <= reference.SMALL_A
    for keep_h in (True, False):
        small = reference.moe_forward(x, tok, exp, s, w1, w2, b1, b2, act, False, keep_h)
        sorted_path = reference.moe_forward(x, tok, exp, s, w1, w2, b1, b2, act, False, keep_h, small=False)
        for got, want in zip(small, sorted_path):
            assert got.dtype == want.dtype and got.shape == want.shape
            assert torch.equal(got, want)
    # gradients through the op: the small forward's order and H feed the same backward
    grads = []
    for small in (True, False):
        leaves = [t.clone().requires_grad_(True) for t in (x, w1, w2, s)]
        old = reference.SMALL_A
        reference.SMALL_A = old if small else 0
        try:
            out = torch.ops.moe_inductor.fused_moe(leaves[0], tok, exp, leaves[3], leaves[1], leaves[2], b1, b2,
                                                   activation=activation, impl="torch")[0]
        finally:
            reference.SMALL_A = old
        out.float().pow(2).sum().backward()
        grads.append([out.detach()] + [t.grad for t in leaves])
    for got, want in zip(*grads):
        assert torch.equal(got, want)


def test_small_forward_is_taken():
    calls = []
    real = reference._small_forward

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    E, d, n = 4, 8, 4
    x, w1, w2 = torch.randn(2, d), torch.randn(E, 2 * n, d), torch.randn(E, d, n)
    tok, exp, s = _routing(2, E, 2, seed=0)
    reference._small_forward = spy
    try:
        reference.moe_forward(x, tok, exp, s, w1, w2, None, None, parse_activation("swiglu"), False)
        big = _routing(reference.SMALL_A, E, 2, seed=0)
        reference.moe_forward(torch.randn(reference.SMALL_A, d), *big, w1, w2, None, None,
                              parse_activation("swiglu"), False)
    finally:
        reference._small_forward = real
    assert calls == [1]


# --------------------------------------------------------------------------- stacked slices

def _graph_with(slices):
    """A graph whose placeholder W (E, 3, 2) is sliced as ``slices`` says: (index, transposed)."""
    graph = fx.Graph()
    W = graph.placeholder("W")
    W.meta["example_value"] = torch.empty(3, 3, 2)
    nodes = []
    for e, transposed in slices:
        n = graph.call_function(operator.getitem, (W, e))
        n.meta["example_value"] = torch.empty(3, 2)
        if transposed:
            n = graph.call_method("t", (n,))
            n.meta["example_value"] = torch.empty(2, 3)
        nodes.append(n)
    graph.output(tuple(nodes))
    return graph, W, nodes


def test_stacked_source_recognises_exactly_the_slices_in_order():
    graph, W, nodes = _graph_with([(0, False), (1, False), (2, False)])
    assert stacked_source(graph, nodes, nodes[0]) is W
    graph, W, nodes = _graph_with([(0, True), (1, True), (2, True)])
    with graph.inserting_before(graph.output_node()):
        got = stacked_source(graph, nodes, nodes[0])
    assert got.op == "call_method" and got.target == "transpose" and got.args == (W, 1, 2)
    for near_miss in ([(1, False), (0, False), (2, False)],  # another order
                      [(0, False), (1, False)],  # not every expert of W
                      [(0, False), (1, True), (2, False)],  # transposed differently
                      [(0, False), (1, False), (1, False)]):
        graph, W, nodes = _graph_with(near_miss)
        assert stacked_source(graph, nodes, nodes[0]) is None, near_miss


def _qwen3_block(E=4, d=16, n=8, K=2):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(hidden_size=d, moe_intermediate_size=n, num_experts=E, num_experts_per_tok=K)
    block = Qwen3MoeSparseMoeBlock(cfg)  # on its own: config._experts_implementation is unset
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return block


def test_loop_over_stacked_parameters_feeds_them_to_the_op_unstacked(fresh_dynamo):
    block = _qwen3_block()
    graphs = []
    light = light_backend([])

    @mark_sonic  # sonic's scoped Dynamo settings and loop capture apply to its frames
    def backend(gm, example_inputs):
        fn = light(gm, example_inputs)
        graphs.append(gm)
        return fn

    compiled = torch.compile(block, backend=backend)
    x = torch.randn(1, 5, 16)
    for _ in range(2):  # the first call may run eagerly (the capturable forward takes over next)
        compiled(x)
    ops = [n for gm in graphs for n in gm.graph.nodes if n.op == "call_function"
           and n.target in (torch.ops.moe_inductor.fused_moe.default, torch.ops.moe_inductor.fused_moe_experts.default)]
    assert [n.target for n in ops] == [torch.ops.moe_inductor.fused_moe.default]
    w1, w2 = ops[0].args[4], ops[0].args[5]
    params = dict(block.named_parameters())
    for node, name in ((w1, "experts.gate_up_proj"), (w2, "experts.down_proj")):
        value = node.meta["example_value"]
        assert value.shape == params[name].shape, (name, value.shape)
    torch.testing.assert_close(compiled(x), block(x))


def test_standalone_transformers_block_is_one_graph_and_not_retried(fresh_dynamo, caplog):
    block = _qwen3_block()
    x = torch.randn(1, 3, 16)
    report = explain(block, x)
    assert report.graph_breaks == [] and [e.status for e in report.entries] == ["rewritten"], str(report)
    compiled = torch.compile(block, backend="sonic")
    with torch.no_grad():
        want = block(x)
        compiled(x)
        compiled(x)
        frames = dict(counters["frames"])
        for _ in range(3):
            got = compiled(x)
    assert dict(counters["frames"]) == frames  # nothing traced again, nothing retried per call
    torch.testing.assert_close(got, want)


# --------------------------------------------------------------------------- per-expert lists

@pytest.mark.parametrize("small", [True, False])
@pytest.mark.parametrize("layout", ["gate_up", "interleaved", "biases", "compute_dtype"])
def test_expert_lists_are_read_in_place_on_the_pytorch_path(small, layout, monkeypatch):
    """fused_moe_experts on the PyTorch path reads each expert's own tensors (the gate and up halves
    multiplied into their columns): nothing stacked, in forward or backward; the same values as
    the op on the stacked weights."""
    from moe_inductor.ops import op as op_module

    E, d, n, T, K = 5, 16, 8, 9, 2
    g = torch.Generator().manual_seed(3)
    wdtype = torch.float32
    xdtype = torch.bfloat16 if layout == "compute_dtype" else torch.float32
    r = lambda *s: (torch.randn(*s, generator=g) * 0.3).to(wdtype).requires_grad_()
    x = torch.randn(T, d, generator=g).to(xdtype).requires_grad_()
    interleaved = layout == "interleaved"
    gate = [r(2 * n if interleaved else n, d) for _ in range(E)]
    up = [] if interleaved else [r(n, d) for _ in range(E)]
    down = [r(d, n) for _ in range(E)]
    biases = layout == "biases"
    bg = [r(n) for _ in range(E)] if biases else []
    bu = [r(n) for _ in range(E)] if biases else []
    bd = [r(d) for _ in range(E)] if biases else []
    tok, exp, _ = _routing(T, E, K, seed=5, dropped=2)
    s = torch.rand(T * K, generator=g).requires_grad_()
    leaves = [x, s] + gate + up + down + bg + bu + bd
    monkeypatch.setattr(reference, "SMALL_A", 64 if small else 0)

    def run(stacked: bool):
        for t in leaves:
            t.grad = None
        if stacked:
            w1 = torch.stack([torch.cat([a, b]) for a, b in zip(gate, up)] if up else gate)
            b1 = torch.stack([torch.cat([a, b]) for a, b in zip(bg, bu)]) if biases else None
            out = torch.ops.moe_inductor.fused_moe(
                x, tok, exp, s, w1.to(xdtype), torch.stack(down).to(xdtype), None if b1 is None else b1.to(xdtype),
                torch.stack(bd).to(xdtype) if biases else None, activation="swiglu", interleaved=interleaved,
                impl="torch")[0]
        else:
            calls = []
            real = op_module._stacked
            monkeypatch.setattr(op_module, "_stacked", lambda *a: calls.append(a[-1]) or real(*a))
            kw = {"compute_dtype": xdtype} if layout == "compute_dtype" else {}
            out = torch.ops.moe_inductor.fused_moe_experts(x, tok, exp, s, gate, down, up, bg, bu, bd,
                                                           activation="swiglu", impl="torch",
                                                           interleaved=interleaved, **kw)[0]
            out.float().pow(2).sum().backward()
            assert True not in calls, "the weights were stacked"  # shape-only views (False) are fine
            monkeypatch.setattr(op_module, "_stacked", real)
            return [out.detach()] + [t.grad for t in leaves]
        out.float().pow(2).sum().backward()
        return [out.detach()] + [t.grad for t in leaves]

    want, got = run(True), run(False)
    tol = 2e-2 if xdtype == torch.bfloat16 else 1e-5
    for a, b in zip(got, want):
        assert a is not None and b is not None and a.dtype == b.dtype
        assert ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item() < tol
