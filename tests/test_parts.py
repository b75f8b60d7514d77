"""The part recognisers (moe_inductor/recognize/parts.py registries) and the per-expert composition.

Each part recogniser is checked on a tiny Dynamo graph holding its spelling; the composition on
whole blocks: rewritten ones (snapshot of the rewritten graph, output and every gradient vs
eager at two sequence lengths) and near-misses that must be declined with a reason naming the
part or the proof. Written from our reading of mistral-inference ``moe.py`` (indexed ``+=`` after
``torch.where(selected == i)``), DeepSeek-V3 ``inference/model.py`` (the same with a range of local
experts) and the DeepSeek-MoE/V2 remote code training branch (``repeat_interleave`` rows,
``y[flat == i] = expert(...)``, weighted ``view(T, K, d).sum(1)``).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as Fn
from torch._dynamo.testing import normalize_gm
from torch._dynamo.utils import counters
from torch.testing._internal.common_utils import TestCase

from moe_inductor.recognize import parts
from moe_inductor.compile.backend import rewrite_moe
from moe_inductor.dynamo.dynamo_scope import mark_sonic
from moe_inductor.compile.options import SonicOptions

D, N, E, K = 8, 12, 4, 2


@mark_sonic
class Capture:
    """Backend: keeps the graph (optionally after the sonic rewrite) and runs it as it is."""

    def __init__(self, rewrite: bool = True):
        self.rewrite, self.graphs, self.reports = rewrite, [], []

    def __call__(self, gm, example_inputs):
        if self.rewrite:
            self.reports.append(rewrite_moe(gm, SonicOptions()))
        self.graphs.append(gm)
        return gm.forward

    @property
    def candidates(self):
        return [c for r in self.reports for c in r.candidates]


def _mlp(gated=True):
    class Expert(nn.Module):
        def __init__(self):
            super().__init__()
            self.w1 = nn.Linear(D, N, bias=False)
            self.w2 = nn.Linear(N, D, bias=False)
            self.w3 = nn.Linear(D, N, bias=False) if gated else None

        def forward(self, z):
            h = Fn.silu(self.w1(z))
            return self.w2(h * self.w3(z) if self.w3 is not None else h)

    return Expert()


class Routed(nn.Module):
    """Router (softmax then top-k) and a ModuleList of experts; ``combine`` picks the loop body."""

    def __init__(self, combine="iadd", ids="topk", score="output", experts=None, lo=0):
        super().__init__()
        self.gate = nn.Linear(D, E, bias=False)
        self.experts = nn.ModuleList([_mlp() for _ in range(E)])
        self.combine, self.ids, self.score, self.loop = combine, ids, score, experts or list(range(E))
        self.lo = lo

    def forward(self, x):
        w, sel = torch.topk(self.gate(x).softmax(-1), K)
        if self.ids == "argsort":  # ids not from top-k: a token may carry one expert twice
            sel = self.gate(x).argsort(-1)[:, :K] % 2
        out = torch.zeros_like(x)
        seen = x.new_zeros(())
        for i in self.loop:
            idx, nth = torch.where(sel == i + self.lo)
            if self.score == "output":
                y = self.experts[i](x[idx]) * w[idx, nth, None]
            elif self.score == "input":  # f(s * x): torchtitan's score_before_experts, per expert
                y = self.experts[i](x[idx] * w[idx, nth, None])
            elif self.score == "twice":
                y = self.experts[i](x[idx] * w[idx, nth, None]) * w[idx, nth, None]
            else:
                y = self.experts[i](x[idx])
            if self.combine == "iadd":
                out[idx] += y
            elif self.combine == "index_put":
                out.index_put_((idx,), y, accumulate=True)
            elif self.combine == "scatter_add":
                out.scatter_add_(0, idx[:, None].expand(-1, D), y)
            elif self.combine == "read_inside":  # near-miss: reads the partial sum inside the loop
                out[idx] += y
                seen = seen + out.sum()
        return out + seen


class TrainBranch(nn.Module):
    """DeepSeek-MoE/V2 remote code, training branch: replicated rows, masked assignment, weighted sum."""

    def __init__(self, overlap=False):
        super().__init__()
        self.gate = nn.Linear(D, E, bias=False)
        self.experts = nn.ModuleList([_mlp(gated=False) for _ in range(E)])
        self.overlap = overlap

    def forward(self, x):
        w, ids = torch.topk(self.gate(x).softmax(-1), K, dim=-1)
        flat = ids.view(-1)
        xr = x.repeat_interleave(K, dim=0)
        y = torch.empty_like(xr)
        for i, expert in enumerate(self.experts):
            m = flat == i if not self.overlap else flat >= i  # near-miss: masks overlap
            y[m] = expert(xr[m])
        return (y.view(*w.shape, -1) * w.unsqueeze(-1)).sum(dim=1)


def _check(mod, lengths=(5, 8), atol=1e-4):
    """Compile once, run at each length: output and every gradient vs eager; returns the backend."""
    torch._dynamo.reset()
    counters.clear()
    be = Capture()
    compiled = torch.compile(mod, backend=be)
    for t in lengths:
        torch.manual_seed(t)
        x = torch.randn(t, D)
        grads = []
        for fn in (mod, compiled):
            xi = x.clone().requires_grad_(True)
            mod.zero_grad(set_to_none=True)
            out = fn(xi)
            out.pow(2).sum().backward()
            grads.append((out.detach(), xi.grad, [p.grad for p in mod.parameters()]))
        (o1, gx1, gp1), (o2, gx2, gp2) = grads
        torch.testing.assert_close(o2, o1, atol=atol, rtol=atol)
        torch.testing.assert_close(gx2, gx1, atol=atol, rtol=atol)
        for a, b in zip(gp2, gp1):
            if a is None and b is None:
                continue
            if a is None or b is None:  # an expert no token chose: None in eager, zeros compiled
                assert (a if a is not None else b).abs().max() == 0
            else:
                torch.testing.assert_close(a, b, atol=atol, rtol=atol)
    assert len(be.graphs) <= 2, "more than one recompile"
    return be


# --------------------------------------------------------------------------- compositions

@pytest.mark.parametrize("combine", ["iadd", "index_put", "scatter_add"])
def test_loop_combines_rewritten(combine):
    be = _check(Routed(combine=combine))
    rewritten = [c for c in be.candidates if c.status == "rewritten"]
    assert len(rewritten) == len(be.graphs) and all(c.idiom == "expert_loop" for c in rewritten), be.candidates
    spelling = {"iadd": "indexed_iadd", "index_put": "index_put_", "scatter_add": "scatter_add_"}[combine]
    assert f"combine={spelling}" in rewritten[0].parts and "dispatch=where_pairs" in rewritten[0].parts


@pytest.mark.parametrize("combine", ["iadd", "scatter_add"])
def test_scores_on_the_input_rewritten(combine):
    """f(s * x) per expert: the fused op gets pre-scaled rows (one per assignment) with score 1."""
    be = _check(Routed(combine=combine, score="input"))
    assert [c.status for c in be.candidates] == ["rewritten"] * len(be.graphs), be.candidates


def test_local_expert_range_rewritten():
    """DeepSeek-V3 inference loops over its local experts only: ids outside lo..hi are dropped."""
    mod = Routed(experts=[0, 1], lo=2)  # experts 0, 1 of this module serve global ids 2, 3
    be = _check(mod)
    assert [c.status for c in be.candidates] == ["rewritten"] * len(be.graphs)
    assert be.candidates[0].num_experts == 2


def test_train_branch_two_level_combine_snapshot():
    be = _check(TrainBranch())
    assert [(c.status, c.top_k) for c in be.candidates] == [("rewritten", K)] * len(be.graphs)
    assert "then a weighted per-token sum" in be.candidates[0].parts
    gm = be.graphs[0]
    fused = [n for n in gm.graph.nodes if n.op == "call_function" and "fused_moe" in str(n.target)]
    assert len(fused) == 1
    left = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in (torch._C._nn.linear,)]
    assert len(left) == 1  # the router only: every expert GEMM went into the fused op
    assert not any(n.target is torch.Tensor.repeat_interleave or (n.op == "call_method" and n.target == "sum")
                   for n in gm.graph.nodes), "the replicated rows and the per-token sum are gone"


class Snapshot(TestCase):
    def test_mistral_iadd_snapshot(self):
        torch.manual_seed(0)
        mod = Routed(combine="iadd")
        torch._dynamo.reset()
        be = Capture()
        torch.compile(mod, backend=be, dynamic=False)(torch.randn(5, D))
        self.assertExpectedInline(normalize_gm(be.graphs[0].print_readable(False)), """\
class GraphModule(torch.nn.Module):
    def forward(self, L_self_modules_gate_parameters_weight_: "f32[4, 8]", L_x_: "f32[5, 8]", L_self_modules_experts_modules_0_modules_w1_parameters_weight_: "f32[12, 8]", L_self_modules_experts_modules_0_modules_w3_parameters_weight_: "f32[12, 8]", L_self_modules_experts_modules_0_modules_w2_parameters_weight_: "f32[8, 12]", L_self_modules_experts_modules_1_modules_w1_parameters_weight_: "f32[12, 8]", L_self_modules_experts_modules_1_modules_w3_parameters_weight_: "f32[12, 8]", L_self_modules_experts_modules_1_modules_w2_parameters_weight_: "f32[8, 12]", L_self_modules_experts_modules_2_modules_w1_parameters_weight_: "f32[12, 8]", L_self_modules_experts_modules_2_modules_w3_parameters_weight_: "f32[12, 8]", L_self_modules_experts_modules_2_modules_w2_parameters_weight_: "f32[8, 12]", L_self_modules_experts_modules_3_modules_w1_parameters_weight_: "f32[12, 8]", L_self_modules_experts_modules_3_modules_w3_parameters_weight_: "f32[12, 8]", L_self_modules_experts_modules_3_modules_w2_parameters_weight_: "f32[8, 12]"):
        l_self_modules_gate_parameters_weight_ = L_self_modules_gate_parameters_weight_
        l_x_ = L_x_
        l_self_modules_experts_modules_0_modules_w1_parameters_weight_ = L_self_modules_experts_modules_0_modules_w1_parameters_weight_
        l_self_modules_experts_modules_0_modules_w3_parameters_weight_ = L_self_modules_experts_modules_0_modules_w3_parameters_weight_
        l_self_modules_experts_modules_0_modules_w2_parameters_weight_ = L_self_modules_experts_modules_0_modules_w2_parameters_weight_
        l_self_modules_experts_modules_1_modules_w1_parameters_weight_ = L_self_modules_experts_modules_1_modules_w1_parameters_weight_
        l_self_modules_experts_modules_1_modules_w3_parameters_weight_ = L_self_modules_experts_modules_1_modules_w3_parameters_weight_
        l_self_modules_experts_modules_1_modules_w2_parameters_weight_ = L_self_modules_experts_modules_1_modules_w2_parameters_weight_
        l_self_modules_experts_modules_2_modules_w1_parameters_weight_ = L_self_modules_experts_modules_2_modules_w1_parameters_weight_
        l_self_modules_experts_modules_2_modules_w3_parameters_weight_ = L_self_modules_experts_modules_2_modules_w3_parameters_weight_
        l_self_modules_experts_modules_2_modules_w2_parameters_weight_ = L_self_modules_experts_modules_2_modules_w2_parameters_weight_
        l_self_modules_experts_modules_3_modules_w1_parameters_weight_ = L_self_modules_experts_modules_3_modules_w1_parameters_weight_
        l_self_modules_experts_modules_3_modules_w3_parameters_weight_ = L_self_modules_experts_modules_3_modules_w3_parameters_weight_
        l_self_modules_experts_modules_3_modules_w2_parameters_weight_ = L_self_modules_experts_modules_3_modules_w2_parameters_weight_

        linear: "f32[5, 4]" = torch._C._nn.linear(l_x_, l_self_modules_gate_parameters_weight_, None);  l_self_modules_gate_parameters_weight_ = None
        softmax: "f32[5, 4]" = linear.softmax(-1);  linear = None
        topk = torch.topk(softmax, 2);  softmax = None
        w: "f32[5, 2]" = topk[0]
        sel: "i64[5, 2]" = topk[1];  topk = None

        seen: "f32[]" = l_x_.new_zeros(())

        size = l_x_.size(0)
        arange: "i64[5]" = torch.arange(size, device = device(type='cpu'));  size = None
        size_1 = sel.size(1)
        repeat_interleave: "i64[10]" = arange.repeat_interleave(size_1);  arange = size_1 = None
        reshape: "i64[10]" = sel.reshape(-1);  sel = None
        reshape_1: "f32[10]" = w.reshape(-1);  w = None
        to: "i32[10]" = repeat_interleave.to(torch.int32);  repeat_interleave = None
        to_1: "i32[10]" = reshape.to(torch.int32);  reshape = None
        fused_moe_experts_default = torch.ops.moe_inductor.fused_moe_experts.default(l_x_, to, to_1, reshape_1, [l_self_modules_experts_modules_0_modules_w1_parameters_weight_, l_self_modules_experts_modules_1_modules_w1_parameters_weight_, l_self_modules_experts_modules_2_modules_w1_parameters_weight_, l_self_modules_experts_modules_3_modules_w1_parameters_weight_], [l_self_modules_experts_modules_0_modules_w2_parameters_weight_, l_self_modules_experts_modules_1_modules_w2_parameters_weight_, l_self_modules_experts_modules_2_modules_w2_parameters_weight_, l_self_modules_experts_modules_3_modules_w2_parameters_weight_], [l_self_modules_experts_modules_0_modules_w3_parameters_weight_, l_self_modules_experts_modules_1_modules_w3_parameters_weight_, l_self_modules_experts_modules_2_modules_w3_parameters_weight_, l_self_modules_experts_modules_3_modules_w3_parameters_weight_], [], [], [], activation = 'swiglu', interleaved = False, recompute_h = False, impl = 'auto', autocast_like = 'aten::linear');  l_x_ = to = to_1 = reshape_1 = l_self_modules_experts_modules_0_modules_w1_parameters_weight_ = l_self_modules_experts_modules_1_modules_w1_parameters_weight_ = l_self_modules_experts_modules_2_modules_w1_parameters_weight_ = l_self_modules_experts_modules_3_modules_w1_parameters_weight_ = l_self_modules_experts_modules_0_modules_w2_parameters_weight_ = l_self_modules_experts_modules_1_modules_w2_parameters_weight_ = l_self_modules_experts_modules_2_modules_w2_parameters_weight_ = l_self_modules_experts_modules_3_modules_w2_parameters_weight_ = l_self_modules_experts_modules_0_modules_w3_parameters_weight_ = l_self_modules_experts_modules_1_modules_w3_parameters_weight_ = l_self_modules_experts_modules_2_modules_w3_parameters_weight_ = l_self_modules_experts_modules_3_modules_w3_parameters_weight_ = None
        getitem_26: "f32[5, 8]" = fused_moe_experts_default[0];  fused_moe_experts_default = None

        add: "f32[5, 8]" = getitem_26 + seen;  getitem_26 = seen = None
        return (add,)
""")


# --------------------------------------------------------------------------- near-misses

@pytest.mark.parametrize("mod, part, words", [
    (lambda: Routed(score="twice"), "scores", "applied twice"),
    (lambda: Routed(ids="argsort"), "proof", "keeps only the last of duplicate rows"),
    (lambda: Routed(experts=[0, 2]), "proof", "not a contiguous range"),
    (lambda: Routed(combine="read_inside"), "combine", "read or aliased inside the loop"),
    (lambda: TrainBranch(overlap=True), "dispatch", "not recognised"),
])
def test_near_misses_declined(mod, part, words):
    be = _check(mod())
    assert counters["sonic"]["moe_rewrites"] == 0
    reasons = [c.reason for c in be.candidates]
    assert reasons and all(r.startswith(part) and words in r for r in reasons), reasons


# --------------------------------------------------------------------------- part recognisers

def _graph(fn, *args):
    torch._dynamo.reset()
    be = Capture(rewrite=False)
    torch.compile(fn, backend=be, fullgraph=True)(*args)
    return be.graphs[0]


def _found(gm, part, *extra):
    out = []
    for n in gm.graph.nodes:
        if n.op in ("call_function", "call_method"):
            try:
                got = parts.recognise(part, n, *extra)
            except parts.PartDeclined:  # its spelling, not provable here (e.g. an inner projection)
                continue
            if got is not None:
                out.append(got)
    return out


def test_experts_spellings():
    w1, w2, w3 = torch.randn(N, D), torch.randn(D, N), torch.randn(N, D)
    P1 = torch.randn(E, D, N)  # stacked, stored (in, out)

    def linear_gated(z):
        return Fn.linear(Fn.silu(Fn.linear(z, w1)) * Fn.linear(z, w3), w2)

    def matmul_t(z):
        return (Fn.gelu(z @ w1.t())) @ w2.T

    def stacked_in_out(z):
        return torch.relu(z @ P1[1]) @ P1[2].transpose(0, 1)

    def fused_gate_up(z):
        g, u = Fn.linear(z, torch.cat([w1, w3])).chunk(2, dim=-1)
        return Fn.linear(Fn.silu(g) * u, w2)

    z = torch.randn(3, D)
    for fn, act, transposed in ((linear_gated, "swiglu", set()), (matmul_t, "gelu", set()),
                                (stacked_in_out, "relu", {"gate"}), (fused_gate_up, "swiglu", set())):
        found = [m for m in _found(_graph(fn, z), "experts") if m.output.op != "placeholder"]
        outer = max(found, key=lambda m: len(str(m.output)))  # the whole MLP, not an inner projection
        assert any(m.activation == act and m.transposed == transposed for m in found), (fn.__name__, found)
        del outer


def test_combine_spellings():
    idx = torch.tensor([0, 2])
    v = torch.randn(2, D)

    def forms(acc, idx, v):
        a = acc.clone().index_add_(0, idx, v)
        b = acc.clone()
        b[idx] += v
        c = acc.clone().index_put_((idx,), v, accumulate=True)
        d = acc.clone().scatter_add_(0, idx.unsqueeze(-1).expand_as(v), v)
        e = acc.clone()
        e[idx] = v
        return a, b, c, d, e

    got = [w.spelling for w in _found(_graph(forms, torch.zeros(4, D), idx, v), "combine")]
    assert got == ["index_add_", "indexed_iadd", "index_put_", "scatter_add_", "setitem"], got


def test_dispatch_spellings():
    ids = torch.tensor([[0, 1], [2, 0], [1, 3]])

    def forms(ids, x):
        tok, k = torch.where(ids == 1)
        m = ids.view(-1) == 2
        r = (ids == 0).any(-1)
        n = r.nonzero().squeeze(-1)
        return x[tok], x.repeat_interleave(2, 0)[m], x[r], x[n], k

    gm = _graph(forms, ids, torch.randn(3, D))
    idx = [n.args[1] for n in gm.graph.nodes if n.op == "call_function" and n.target.__name__ == "getitem"
           and isinstance(n.args[1], torch.fx.Node) and n.args[0].op == "placeholder" or
           (n.op == "call_function" and getattr(n.target, "__name__", "") == "getitem"
            and isinstance(n.args[1], torch.fx.Node) and n.args[0].op == "call_method")]
    spellings = [parts.recognise("dispatch", i).spelling for i in idx]
    assert spellings == ["where_pairs", "bool_rows", "bool_rows", "index_of_rows"], spellings


def test_registry_lists_every_part():
    s = parts.spellings()
    assert {"dispatch", "experts", "combine", "scores", "gather"} <= set(s)
    assert all(s[p] for p in ("dispatch", "experts", "combine", "scores", "gather"))
