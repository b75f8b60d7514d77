"""Scores applied inside the expert, before the down projection (Megatron-Core's ``SequentialMLP``:
``tokens_per_expert.tolist()``, ``torch.split`` of the permuted rows AND of the permuted probabilities
by the same counts, each ``MLP`` computing ``fc2((act(fc1(x)) * probs.unsqueeze(-1)).to(dtype))``).

``moe_inductor.dynamo.host_splits`` turns the per-expert modules into grouped GEMMs on all the rows, the
probabilities split alongside read as one per-row column (``host_splits._side_splits``), and
``patterns/assignment_rows`` takes that column as the scores applied after the experts:
``down(h * s) == s * down(h)`` for a down projection without bias (up to rounding). Checked here:
the form rewritten with output and every gradient equal to eager (fp32 and bf16), and near misses
left alone and exact: a down bias (the op would scale it, the graph does not), a scale that is not
one factor per row, a side chunk read otherwise, a scale the expert reads from outside.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from moe_inductor.fx.shapes import same_dim
from rewrite_check import CaptureGraphs

pytestmark = pytest.mark.usefixtures("fresh_dynamo")

D, N, E, K = 16, 8, 4, 2


class ScaledMLP(nn.Module):
    """One expert: fc1 to 2n (SwiGLU, chunk), the rows times their probability, cast back, fc2."""

    def __init__(self, form="plain"):
        super().__init__()
        self.form = form
        self.fc1 = nn.Linear(D, 2 * N, bias=False)
        self.fc2 = nn.Linear(N, D, bias=form == "down_bias")
        self.col = nn.Parameter(torch.rand(N) + 0.5) if form == "column_scale" else None

    def forward(self, x, probs):
        g, u = torch.chunk(self.fc1(x), 2, dim=-1)
        h = F.silu(g) * (u + 0.0)
        dtype = h.dtype
        if self.form == "column_scale":  # one factor per column, not per row: not the router's scores
            h = h * self.col
        elif self.form == "side_sum":  # the side chunk summed over the expert's rows: not row by row
            h = h * probs.sum()
        else:
            h = h * probs.unsqueeze(-1)
        h = h.to(dtype)
        return self.fc2(h)


class MegatronLike(nn.Module):
    """Router (softmax top-k into a dense (T, E) prob map), Megatron's argsort permutation of the
    (E, T) routing map, rows and probabilities split by host counts, one ``ScaledMLP`` per expert,
    cat, ``scatter_add_`` back to the tokens."""

    def __init__(self, form="plain"):
        super().__init__()
        self.form = form
        self.router = nn.Linear(D, E, bias=False)
        self.experts = nn.ModuleList([ScaledMLP(form) for _ in range(E)])
        self.other = nn.Parameter(torch.rand(64) + 0.5) if form == "outside_scale" else None

    def forward(self, x):
        T = x.shape[0]
        logits = self.router(x)
        scores, top = torch.topk(logits, K, dim=1)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).type_as(logits)
        routing_probs = torch.zeros_like(logits).scatter(1, top, probs)
        routing_map = torch.zeros_like(logits).int().scatter(1, top, 1).bool()
        tokens_per_expert = routing_map.sum(dim=0).long()
        num_out = int(tokens_per_expert.sum().item())
        rmap = routing_map.T.contiguous()
        flat = rmap.reshape(-1).argsort(descending=True, stable=True)[:num_out]
        token_of_row = flat % T
        rows = x.index_select(0, token_of_row)
        permuted_probs = routing_probs.T.contiguous().masked_select(rmap)
        if self.form == "outside_scale":  # the expert scales by a tensor that is not split with the rows
            permuted_probs = self.other[:permuted_probs.shape[0]] * 0 + permuted_probs
        counts = tokens_per_expert.tolist()
        chunks = torch.split(rows, counts)
        prob_chunks = torch.split(permuted_probs, counts)
        outs = [expert(c, p) for expert, c, p in zip(self.experts, chunks, prob_chunks)]
        y = torch.cat(outs, dim=0)
        out = torch.zeros(T, x.shape[1], dtype=y.dtype, device=x.device)
        out.scatter_add_(0, token_of_row.unsqueeze(1).expand(-1, x.shape[1]), y)
        return out.to(x.dtype)


def _run(model, dtype, lengths=(5, 8)):
    model = model.to(dtype)
    backend = CaptureGraphs()
    compiled = torch.compile(model, backend=backend)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
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
            g, w = got.double(), want.double()
            if dtype == torch.float32:
                torch.testing.assert_close(g, w, atol=tol, rtol=tol)
            else:
                assert (g - w).norm() <= tol * max(w.norm(), 1e-6), ((g - w).norm(), w.norm())
    return [c for r in backend.reports for c in r.candidates]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_probs_applied_before_the_down_projection_are_the_scores(dtype):
    torch.manual_seed(0)
    cands = _run(MegatronLike(), dtype)
    rewritten = [c for c in cands if c.status == "rewritten"]
    assert len(rewritten) == 2 and all(c.idiom == "sorted_rows" for c in rewritten), cands


@pytest.mark.parametrize("form,why", [
    ("down_bias", "down projection with a bias"),
    ("column_scale", ""),
    ("side_sum", ""),
    ("outside_scale", ""),
])
def test_near_misses_are_left_alone(form, why):
    torch.manual_seed(0)
    cands = _run(MegatronLike(form), torch.float32)
    assert not [c for c in cands if c.status == "rewritten"], cands


def test_same_dim_reads_the_shape_environment():
    """Two data-dependent lengths that the graph asserts equal are the same size to ``same_dim``
    (what lets the probabilities' column meet the rows); unrelated ones are not."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv
    import torch.fx as fx

    mode = FakeTensorMode(shape_env=ShapeEnv())
    with mode:
        a = torch.zeros(10).nonzero()
        b = torch.zeros(10).nonzero()
        c = torch.zeros(10).nonzero()
    g = fx.Graph()
    na, nb, nc = (g.placeholder(n) for n in "abc")
    for n, v in ((na, a), (nb, b), (nc, c)):
        n.meta["example_value"] = v
    assert not same_dim(na, 0, nb, 0)
    torch._check(a.shape[0] == b.shape[0])
    assert same_dim(na, 0, nb, 0) and not same_dim(na, 0, nc, 0)


def test_under_autocast_the_grouped_gemms_cast_as_each_linear_did():
    """Under CPU autocast (bf16) each expert's F.linear casts rows, weights and bias: the grouped GEMM
    standing in for them does too (its Autocast kernels), so the block is rewritten and close to eager
    (bf16 rounding); before, Inductor refused the rewritten graph (bf16 rows, fp32 weights) and the
    frame fell back to plain Inductor."""
    from moe_inductor.diagnostics.stats import capture_routing_stats

    torch.manual_seed(0)
    model = MegatronLike()
    x = torch.randn(7, D, generator=torch.Generator().manual_seed(7))
    params = list(model.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model(x)
    ref_grads = torch.autograd.grad(ref.float().pow(2).sum(), params)
    compiled = torch.compile(model, backend="sonic")
    with capture_routing_stats() as calls, torch.autocast("cpu", dtype=torch.bfloat16):
        out = compiled(x)
    grads = torch.autograd.grad(out.float().pow(2).sum(), params)
    assert len(calls) == 1 and out.dtype == ref.dtype
    for got, want in [(out, ref), *zip(grads, ref_grads)]:
        g, w = got.double(), want.double()
        assert (g - w).norm() <= 2e-2 * w.norm(), ((g - w).norm() / w.norm()).item()
