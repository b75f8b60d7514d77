"""patterns/assignment_rows.py: MoE blocks on a flat tensor of assignment rows.

- sorted rows (torchtitan ``models/moe``): counts by histc/bincount, stable argsort / sort, rows
  gathered (``x[perm // K]``, ``torch.gather``, ``index_select``), ``torch._grouped_mm`` with
  offsets = cumsum(counts), scores after (fused fully) or before the experts (pre-scaled rows,
  score 1), ``scatter_add`` / ``index_add_`` back to the tokens;
- gathered weights: ``W[idx]`` + ``bmm`` in both orientations, ``scatter_add_`` /
  ``scatter_reduce(sum)`` / ``index_add_``;
- local experts (expert parallelism): grouped GEMMs on rows grouped by expert, no scores.

Each case runs at two sequence lengths against eager: output and every gradient (x and every
parameter). Tolerances: fp32 1e-4; bf16 3e-2 (``torch._grouped_mm`` compiles on CPU only in bf16,
and the fused op rounds its bf16 result once where eager rounds each GEMM and product). Near-misses
must be declined with a reason naming what does not fit, and still match eager.

Shape legend: T tokens, d hidden, n expert intermediate, E experts, K experts per token.
"""
from __future__ import annotations

import operator

import expecttest
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as Fn

from moe_inductor.compile.backend import rewrite_moe
from moe_inductor.dynamo.dynamo_scope import mark_sonic
from moe_inductor.compile.options import SonicOptions

from idiom_catalogue import BY_NAME

# registers torch.ops.transformers.grouped_mm_fallback, the fp32 grouped GEMM of transformers' experts
pytest.importorskip("transformers.integrations.moe")

D, N, E, K = 16, 8, 4, 2
LENGTHS = ((5, 0), (8, 1))  # (T, seed): two lengths, one dynamic-shape recompile
FP32, BF16 = 1e-4, 3e-2

_GEMMS = {torch._C._nn.linear, Fn.linear, torch.bmm, torch._grouped_mm, torch.mm, torch.matmul, operator.matmul}
_FUSED = {torch.ops.moe_inductor.fused_moe.default, torch.ops.moe_inductor.fused_moe_experts.default}


@mark_sonic
class RewriteOnly:
    """Backend: the sonic rewrite, then the graph as it is (no Inductor: fast)."""

    def __init__(self):
        self.graphs = []  # (report, gm)

    def __call__(self, gm, example_inputs):
        report = rewrite_moe(gm, SonicOptions())
        self.graphs.append((report, gm))
        return gm


def counts(gm):
    nodes = list(gm.graph.nodes)
    return (sum(n.op == "call_function" and n.target in _FUSED for n in nodes),
            sum(n.op == "call_function" and n.target in _GEMMS for n in nodes))


def stacked(e, rows, cols, dtype=torch.float32):
    return nn.Parameter((torch.randn(e, rows, cols) / cols ** 0.5).to(dtype))


def check(build, make_inputs, tol, lengths=LENGTHS):
    """Compile ``build()`` with the rewrite, compare with eager at each length; returns the backend."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = build()
    backend = RewriteOnly()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    for T, seed in lengths:
        args = make_inputs(T, seed)
        res = []
        for fn in (model, compiled):
            xs = [a.detach().clone().requires_grad_(a.is_floating_point()) for a in args]
            out = fn(*xs)
            g = torch.Generator().manual_seed(seed + 7)
            out.backward(torch.randn(out.shape, generator=g).to(out.dtype))
            grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
            grads.update({f"input{i}": x.grad for i, x in enumerate(xs) if x.grad is not None})
            model.zero_grad(set_to_none=True)
            res.append((out.detach(), grads))
        (ref, gref), (got, ggot) = res
        torch.testing.assert_close(got.float(), ref.float(), atol=tol, rtol=tol, msg=lambda m: f"T={T} output: {m}")
        assert gref.keys() == ggot.keys()
        for name in gref:
            torch.testing.assert_close(ggot[name].float(), gref[name].float(), atol=tol, rtol=tol,
                                       msg=lambda m: f"T={T} grad {name}: {m}")
    assert 1 <= len(backend.graphs) <= 2
    return backend


def candidates(backend):
    return [[(c.idiom, c.status, c.reason) for c in report.candidates] for report, _ in backend.graphs]


def tokens(T, seed, dtype=torch.float32):
    return (torch.randn(T, D, generator=torch.Generator().manual_seed(seed)).to(dtype),)


# --------------------------------------------------------------------------- sorted rows (torchtitan)

class SortedRows(nn.Module):
    """torchtitan-style sort-based dispatch with spelling variants and near-misses (``variant``)."""

    def __init__(self, variant="ok"):
        super().__init__()
        self.variant = variant
        self.gate = nn.Linear(D, E, bias=False)
        self.w1, self.w3, self.w2 = stacked(E, N, D), stacked(E, N, D), stacked(E, D, N)

    def forward(self, x):
        v = self.variant
        top_scores, selected = torch.topk(Fn.softmax(self.gate(x), dim=-1), K, dim=-1)
        flat = selected.reshape(-1)
        if v == "bins_wrong":  # two expert ids per bin: the offsets group the rows wrongly
            per_expert = torch.histc(flat.float(), bins=E, min=0, max=2 * E)
        elif v in ("sort_bincount", "index_add"):
            per_expert = torch.bincount(flat, minlength=E)
        else:
            per_expert = torch.histc(flat.float(), bins=E, min=0, max=E - 1)
        if v == "sort_bincount":
            perm = torch.sort(flat, stable=True)[1]
        else:
            perm = torch.argsort(flat, stable=True)
        rows_perm = torch.argsort(flat.flip(0), stable=True) if v == "perm_other" else perm
        token_of_row = rows_perm // K
        sorted_scores = top_scores.reshape(-1)[perm]
        if v == "index_add":
            rows = x.index_select(0, token_of_row)
        else:
            rows = x[token_of_row]
        if v == "scores_twice":
            rows = rows * sorted_scores.unsqueeze(-1)
        offsets = torch.cumsum(per_expert, dim=0, dtype=torch.int32)
        h = Fn.silu(torch._grouped_mm(rows.bfloat16(), self.w1.bfloat16().transpose(-2, -1), offs=offsets))
        h = h * torch._grouped_mm(rows.bfloat16(), self.w3.bfloat16().transpose(-2, -1), offs=offsets)
        y = torch._grouped_mm(h, self.w2.bfloat16().transpose(-2, -1), offs=offsets).type_as(x)
        y = y * sorted_scores.unsqueeze(-1)
        if v == "index_add":
            return torch.zeros_like(x).index_add_(0, token_of_row, y)
        back = (perm.flip(0) // K) if v == "scatter_other" else token_of_row
        return x.new_zeros(x.shape).scatter_add(0, back.unsqueeze(-1).expand(-1, D), y)


@pytest.mark.parametrize("variant", [
    "ok",             # histc over [0, E-1], argsort, x[perm // K], scatter_add
    "sort_bincount",  # torch.sort(stable)[1], bincount(minlength=E)
    "index_add",      # index_select rows, index_add_ back
])
def test_sorted_rows_rewritten(variant):
    backend = check(lambda: SortedRows(variant), tokens, BF16)
    for report, gm in backend.graphs:
        assert [(c.idiom, c.status) for c in report.candidates] == [("sorted_rows", "rewritten")], candidates(backend)
        assert counts(gm) == (1, 1)  # one fused op; only the router's GEMM is left


@pytest.mark.parametrize("variant, reason", [
    ("perm_other", "not of the sorted ids"),           # rows gathered through a permutation of other ids
    ("bins_wrong", "covers [0, 8]"),                   # histc over [0, 2E]: two ids per bin
    ("scores_twice", "applied twice"),                 # scores on the rows and on the outputs
    ("scatter_other", "not the same token mapping"),   # written back at other tokens than read
])
def test_sorted_rows_near_misses_declined(variant, reason):
    backend = check(lambda: SortedRows(variant), tokens, BF16)
    for report, gm in backend.graphs:
        assert counts(gm)[0] == 0, candidates(backend)
        why = [c.reason for c in report.candidates if c.status == "declined" and c.idiom == "assignment_rows"]
        assert why and reason in why[0], candidates(backend)


class ScoreBefore(nn.Module):
    """torchtitan ``score_before_experts=True``: the rows are scaled before a non-linear expert."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(D, E, bias=False)
        self.w1, self.w3, self.w2 = stacked(E, N, D), stacked(E, N, D), stacked(E, D, N)

    def forward(self, x):
        top_scores, selected = torch.topk(Fn.softmax(self.gate(x).float(), dim=-1), K, dim=-1)
        flat = selected.view(-1)
        per_expert = torch.bincount(flat, minlength=E)
        order = torch.argsort(flat, stable=True)
        index = (order // K).reshape(-1, 1).expand(-1, D)
        rows = torch.gather(x, dim=0, index=index)
        rows = (rows.to(torch.float32) * top_scores.view(-1)[order].reshape(-1, 1)).to(x.dtype)
        offsets = torch.cumsum(per_expert, dim=0, dtype=torch.int32)
        h = Fn.silu(torch._grouped_mm(rows.bfloat16(), self.w1.bfloat16().transpose(-2, -1), offs=offsets))
        h = h * torch._grouped_mm(rows.bfloat16(), self.w3.bfloat16().transpose(-2, -1), offs=offsets)
        out = torch._grouped_mm(h, self.w2.bfloat16().transpose(-2, -1), offs=offsets).type_as(rows)
        return torch.zeros(x.size(0), D, dtype=x.dtype).scatter_add(0, index, out)


def test_score_before_experts_fed_prescaled():
    """f(s * x) != s * f(x) for a non-linear expert: the fused op gets the pre-scaled rows with
    score 1 (token_ids = arange(A)); the graph's own gather and scatter stay."""
    backend = check(ScoreBefore, tokens, BF16)
    for report, gm in backend.graphs:
        assert [(c.idiom, c.status) for c in report.candidates] == [("sorted_rows", "rewritten")]
        assert "pre-scaled" in report.candidates[0].parts
        assert counts(gm) == (1, 1)
        ones = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.ones]
        assert len(ones) == 1  # score 1 per row


# --------------------------------------------------------------------------- gathered weights

class GatheredWeights(nn.Module):
    """W[idx] + bmm per assignment (fp32). ``variant``: "col" bmm(W[idx], rows.unsqueeze(-1)) with
    x[tok] and scatter_add_; "row" transposed storage bmm(rows.unsqueeze(1), W[idx]) with
    x.repeat_interleave(K, 0) and index_add_; "reduce": scatter_reduce(sum); "base" / "base_inplace":
    the rows added into a shared expert's output (torchtitan) with scatter_add / in-place index_add_;
    near-misses "other_idx" (down weights gathered with other ids), "scatter_other" (written back
    elsewhere), "base_exclude_self" (scatter_reduce into the base with include_self=False: the
    touched rows drop the base), "base_view" (in-place add into a base whose view is read after)."""

    def __init__(self, variant="col"):
        super().__init__()
        self.variant = variant
        self.gate = nn.Linear(D, E, bias=False)
        if variant == "row":  # stored (E, in, out)
            self.w1, self.w3, self.w2 = stacked(E, D, N), stacked(E, D, N), stacked(E, N, D)
        else:
            self.w1, self.w3, self.w2 = stacked(E, N, D), stacked(E, N, D), stacked(E, D, N)
        if variant.startswith("base"):
            self.shared = nn.Linear(D, D, bias=False)

    def forward(self, x):
        v = self.variant
        w, ids = torch.topk(Fn.softmax(self.gate(x), dim=-1), K, dim=-1)
        idx = ids.reshape(-1)
        tok = torch.arange(x.size(0)).repeat_interleave(K)
        if v == "row":
            r = x.repeat_interleave(K, dim=0).unsqueeze(1)                     # (A, 1, d)
            h = Fn.silu(torch.bmm(r, self.w1[idx])) * torch.bmm(r, self.w3[idx])  # (A, 1, n)
            y = torch.bmm(h, self.w2[idx]).squeeze(1) * w.reshape(-1, 1)
            return torch.zeros_like(x).index_add_(0, tok, y)
        rows = x[tok].unsqueeze(-1)                                             # (A, d, 1)
        h = Fn.silu(torch.bmm(self.w1[idx], rows)) * torch.bmm(self.w3[idx], rows)
        down_idx = idx.flip(0) if v == "other_idx" else idx
        y = torch.bmm(self.w2[down_idx], h).squeeze(-1) * w.reshape(-1, 1)
        back = tok.flip(0) if v == "scatter_other" else tok
        index = back.unsqueeze(-1).expand(-1, D)
        if v == "base":
            return self.shared(x).scatter_add(0, index, y)
        if v == "base_inplace":
            out = self.shared(x)
            out.index_add_(0, tok, y)
            return out
        if v == "base_exclude_self":
            return self.shared(x).scatter_reduce(0, index, y, reduce="sum", include_self=False)
        if v == "base_view":
            out = self.shared(x)
            flat = out.view(-1)
            out.scatter_add_(0, index, y)
            return out + flat.view_as(out)
        if v == "reduce":
            return torch.zeros_like(x).scatter_reduce(0, index, y, reduce="sum")
        return torch.zeros_like(x).scatter_add_(0, index, y)


@pytest.mark.parametrize("variant", [
    "col",     # W (E, out, in): bmm(W[idx], rows.unsqueeze(-1)), x[tok], scatter_add_
    "row",     # W (E, in, out): bmm(rows.unsqueeze(1), W[idx]), x.repeat_interleave(K, 0), index_add_
    "reduce",  # scatter_reduce(..., "sum")
])
def test_gathered_weights_rewritten(variant):
    backend = check(lambda: GatheredWeights(variant), tokens, FP32)
    for report, gm in backend.graphs:
        assert [(c.idiom, c.status) for c in report.candidates] == [("gathered_weights", "rewritten")], \
            candidates(backend)
        assert counts(gm) == (1, 1)


@pytest.mark.parametrize("variant", [
    "base",          # torchtitan: self.shared(x).scatter_add(0, index, rows)
    "base_inplace",  # out = self.shared(x); out.index_add_(0, tok, rows)
])
def test_combine_into_a_base_rewritten(variant):
    backend = check(lambda: GatheredWeights(variant), tokens, FP32)
    for report, gm in backend.graphs:
        assert [(c.idiom, c.status) for c in report.candidates] == [("gathered_weights", "rewritten")], \
            candidates(backend)
        assert counts(gm) == (1, 2)  # router + the shared projection


@pytest.mark.parametrize("variant, reason", [
    ("other_idx", "group their rows differently"),      # down weights gathered with other expert ids
    ("scatter_other", "not the same token mapping"),    # rows written back at other tokens
    ("base_exclude_self", "include_self=False"),        # scatter_reduce into a base: touched rows drop it
    ("base_view", "which has views"),                   # a view of the base read after the in-place add
])
def test_gathered_weights_near_misses_declined(variant, reason):
    backend = check(lambda: GatheredWeights(variant), tokens, FP32)
    for report, gm in backend.graphs:
        assert counts(gm)[0] == 0
        why = [c.reason for c in report.candidates if c.status == "declined" and c.idiom == "assignment_rows"]
        assert why and reason in why[0], candidates(backend)


class Snapshot(expecttest.TestCase):
    def test_gathered_weights_graph(self):
        """The rewritten graph of the gathered-weights block (static shapes, T=6): the router, then
        one fused op over (token ids = the gather index, expert ids = the weights' index, scores),
        the stacked weights passed as per-expert views W[e] (no concatenated copy kept for
        backward); no bmm left. Accept a new snapshot with EXPECTTEST_ACCEPT=1
        after reading it."""
        torch._dynamo.reset()
        torch.manual_seed(0)
        backend = RewriteOnly()
        torch.compile(GatheredWeights("col"), backend=backend, fullgraph=True, dynamic=False)(*tokens(6, 0))
        (_, gm), = backend.graphs
        code = torch._dynamo.testing.normalize_gm(gm.print_readable(print_output=False))
        self.assertExpectedInline(code, """\
class GraphModule(torch.nn.Module):
    def forward(self, L_self_modules_gate_parameters_weight_: "f32[4, 16]", L_x_: "f32[6, 16]", L_self_parameters_w1_: "f32[4, 8, 16]", L_self_parameters_w3_: "f32[4, 8, 16]", L_self_parameters_w2_: "f32[4, 16, 8]"):
        l_self_modules_gate_parameters_weight_ = L_self_modules_gate_parameters_weight_
        l_x_ = L_x_
        l_self_parameters_w1_ = L_self_parameters_w1_
        l_self_parameters_w3_ = L_self_parameters_w3_
        l_self_parameters_w2_ = L_self_parameters_w2_

        linear: "f32[6, 4]" = torch._C._nn.linear(l_x_, l_self_modules_gate_parameters_weight_, None);  l_self_modules_gate_parameters_weight_ = None
        softmax: "f32[6, 4]" = torch.nn.functional.softmax(linear, dim = -1);  linear = None
        topk = torch.topk(softmax, 2, dim = -1);  softmax = None
        w: "f32[6, 2]" = topk[0]
        ids: "i64[6, 2]" = topk[1];  topk = None

        idx: "i64[12]" = ids.reshape(-1);  ids = None

        arange: "i64[6]" = torch.arange(6)
        tok: "i64[12]" = arange.repeat_interleave(2);  arange = None

        reshape_1: "f32[12, 1]" = w.reshape(-1, 1);  w = None

        getitem_6: "f32[8, 16]" = l_self_parameters_w1_[0]
        getitem_7: "f32[8, 16]" = l_self_parameters_w1_[1]
        getitem_8: "f32[8, 16]" = l_self_parameters_w1_[2]
        getitem_9: "f32[8, 16]" = l_self_parameters_w1_[3];  l_self_parameters_w1_ = None
        getitem_10: "f32[8, 16]" = l_self_parameters_w3_[0]
        getitem_11: "f32[8, 16]" = l_self_parameters_w3_[1]
        getitem_12: "f32[8, 16]" = l_self_parameters_w3_[2]
        getitem_13: "f32[8, 16]" = l_self_parameters_w3_[3];  l_self_parameters_w3_ = None
        getitem_14: "f32[16, 8]" = l_self_parameters_w2_[0]
        getitem_15: "f32[16, 8]" = l_self_parameters_w2_[1]
        getitem_16: "f32[16, 8]" = l_self_parameters_w2_[2]
        getitem_17: "f32[16, 8]" = l_self_parameters_w2_[3];  l_self_parameters_w2_ = None
        reshape_2: "f32[12]" = reshape_1.reshape(-1);  reshape_1 = None
        to: "i32[12]" = tok.to(torch.int32);  tok = None
        to_1: "i32[12]" = idx.to(torch.int32);  idx = None
        fused_moe_experts_default = torch.ops.moe_inductor.fused_moe_experts.default(l_x_, to, to_1, reshape_2, [getitem_6, getitem_7, getitem_8, getitem_9], [getitem_14, getitem_15, getitem_16, getitem_17], [getitem_10, getitem_11, getitem_12, getitem_13], [], [], [], activation = 'swiglu', interleaved = False, recompute_h = False, impl = 'auto', autocast_like = 'aten::bmm');  l_x_ = to = to_1 = reshape_2 = getitem_6 = getitem_7 = getitem_8 = getitem_9 = getitem_14 = getitem_15 = getitem_16 = getitem_17 = getitem_10 = getitem_11 = getitem_12 = getitem_13 = None
        getitem_18: "f32[6, 16]" = fused_moe_experts_default[0];  fused_moe_experts_default = None
        return (getitem_18,)
""")


# --------------------------------------------------------------------------- transformers' layouts

class TransformersSorted(nn.Module):
    """transformers 5.x grouped_mm experts (``integrations/moe.py``), written out in fp32 with its
    ``transformers::grouped_mm_fallback`` GEMM:
    ``torch.sort``, histc of the sorted ids, ``x[perm // K]``, one gate/up grouped GEMM split by
    ``chunk(2)``, per-expert biases added in place with the sorted ids (GPT-OSS), scores
    ``s[perm]``, inverse permutation, ``view(T, K, d).sum(1)``. ``variant`` makes one near-miss:
    "inv_other_fill" (the inverse permutation filled with another arange), "scores_other_perm",
    "bins_shifted" (a histogram of E bins over [1, E]: expert e's rows in group e - 1), "bias_twice" (a second in-place write to the
    up-projection output), "rows_in_token_order" (the sorted rows summed as if in (token, k) order)."""

    def __init__(self, variant="ok"):
        super().__init__()
        self.variant = variant
        self.gate = nn.Linear(D, E, bias=False)
        self.gate_up_proj, self.down_proj = stacked(E, 2 * N, D), stacked(E, D, N)
        self.gate_up_bias = nn.Parameter(torch.randn(E, 2 * N) / 4)
        self.down_bias = nn.Parameter(torch.randn(E, D) / 4)

    def forward(self, x):
        v, T = self.variant, x.size(0)
        w, top = torch.topk(Fn.softmax(self.gate(x), dim=-1), K, dim=-1)
        s, ids = w.reshape(-1), top.reshape(-1)
        ids_g, perm = torch.sort(ids)
        rows = x[perm // K]
        s_g = s[torch.argsort(ids.flip(0))] if v == "scores_other_perm" else s[perm]
        lo, hi = (1, E) if v == "bins_shifted" else (0, E - 1)
        offsets = torch.cumsum(torch.histc(ids_g.float(), bins=E, min=lo, max=hi), dim=0, dtype=torch.int32)
        grouped_mm = torch.ops.transformers.grouped_mm_fallback
        h = grouped_mm(rows, self.gate_up_proj.transpose(-2, -1), offs=offsets)
        h.add_(self.gate_up_bias[ids_g])
        if v == "bias_twice":
            h.add_(self.gate_up_bias[ids_g])
        g, u = h.chunk(2, dim=-1)
        y = grouped_mm(Fn.silu(g) * u, self.down_proj.transpose(-2, -1), offs=offsets)
        y.add_(self.down_bias[ids_g])
        y = y * s_g.unsqueeze(-1)
        if v == "rows_in_token_order":
            return y.view(T, K, D).sum(dim=1)
        inv = torch.empty_like(perm)
        fill = torch.arange(perm.size(0))
        inv[perm] = fill.flip(0) if v == "inv_other_fill" else fill
        return y[inv].view(T, K, D).sum(dim=1)


def test_transformers_sorted_rewritten():
    """rows_dispatch (x[perm // K] of a torch.sort) + rows_experts (grouped GEMMs, in-place biases
    indexed by the sorted ids) + rows_combine (inverse permutation, per-token sum): one fused op;
    the ids are top-k indices, so the op takes the assignments in their original order and the
    sort, the counts and the inverse permutation leave the graph."""
    backend = check(TransformersSorted, tokens, FP32)
    for report, gm in backend.graphs:
        assert [(c.idiom, c.status) for c in report.candidates] == [("sorted_rows", "rewritten")], candidates(backend)
        parts = report.candidates[0].parts
        assert "rows_combine:inverse_perm_sum" in parts and "per-expert biases" in parts, parts
        assert counts(gm)[0] == 1 and not any(
            n.target in (torch.ops.transformers.grouped_mm_fallback, torch.ops.transformers.grouped_mm_fallback.default)
            for n in gm.graph.nodes)
        left = {n.target for n in gm.graph.nodes if n.op == "call_function"}
        assert not left & {torch.sort, torch.histc, torch.empty_like, operator.setitem}, left


@pytest.mark.parametrize("variant, reason", [
    ("inv_other_fill", "rows_combine: inv: the inverse permutation is not filled with arange(A)"),
    ("scores_other_perm", "not read through the rows' permutation"),          # scores of other rows
    ("bins_shifted", "covers [1, 4], not one bin per expert id"),           # groups shifted by one expert
    ("bias_twice", "rows_experts: up-projection output is modified in place 2 times"),
    ("rows_in_token_order", "not the same token mapping"),                  # sorted rows summed as (t, k)
])
def test_transformers_sorted_near_misses_declined(variant, reason):
    backend = check(lambda: TransformersSorted(variant), tokens, FP32)
    for report, gm in backend.graphs:
        assert counts(gm)[0] == 0, candidates(backend)
        why = [c.reason for c in report.candidates if c.status == "declined" and c.idiom == "assignment_rows"]
        assert why and reason in why[0], candidates(backend)


class TransformersBatched(nn.Module):
    """transformers 5.x batched_mm experts: ``x.repeat_interleave(K, 0)``, ``W[ids]`` + bmm (weights
    stored (E, in, out) when ``transposed``: GPT-OSS), biases ``out.add_(b[ids])``, scores on the
    outputs, ``view(T, K, d).sum(1)``. Near-misses: "bias_other_ids" (the down bias indexed by
    other ids), "scores_twice" (also on the rows), "rows_written" (the replicated rows scaled in
    place before the GEMM)."""

    def __init__(self, variant="ok", transposed=False):
        super().__init__()
        self.variant, self.transposed = variant, transposed
        self.gate = nn.Linear(D, E, bias=False)
        self.gate_up_proj = stacked(E, D, 2 * N) if transposed else stacked(E, 2 * N, D)
        self.down_proj = stacked(E, N, D) if transposed else stacked(E, D, N)
        self.gate_up_bias = nn.Parameter(torch.randn(E, 2 * N) / 4)
        self.down_bias = nn.Parameter(torch.randn(E, D) / 4)

    def linear(self, z, w):
        if self.transposed:
            return torch.bmm(z.unsqueeze(1), w).squeeze(1)
        return torch.bmm(w, z.unsqueeze(-1)).squeeze(-1)

    def forward(self, x):
        v, T = self.variant, x.size(0)
        w, top = torch.topk(Fn.softmax(self.gate(x), dim=-1), K, dim=-1)
        s, ids = w.reshape(-1), top.reshape(-1)
        rows = x.repeat_interleave(K, dim=0)
        if v == "rows_written":
            rows.mul_(2.0)
        if v == "scores_twice":
            rows = rows * s.unsqueeze(-1)
        h = self.linear(rows, self.gate_up_proj[ids])
        h.add_(self.gate_up_bias[ids])
        g, u = h.chunk(2, dim=-1)
        y = self.linear(Fn.silu(g) * u, self.down_proj[ids])
        y.add_(self.down_bias[ids.flip(0) if v == "bias_other_ids" else ids])
        return (y * s.unsqueeze(-1)).view(T, K, D).sum(dim=1)


@pytest.mark.parametrize("transposed", [False, True])  # W (E, out, in) and GPT-OSS's (E, in, out)
def test_transformers_batched_rewritten(transposed):
    backend = check(lambda: TransformersBatched(transposed=transposed), tokens, FP32)
    for report, gm in backend.graphs:
        assert [(c.idiom, c.status) for c in report.candidates] == [("gathered_weights", "rewritten")], \
            candidates(backend)
        assert "rows_combine:token_k_sum" in report.candidates[0].parts
        assert counts(gm) == (1, 1)


@pytest.mark.parametrize("variant, reason", [
    ("bias_other_ids", "is indexed by other ids than the expert ids of its rows"),
    ("scores_twice", "applied twice"),
    ("rows_written", "expert path modifies rows in place"),
])
def test_transformers_batched_near_misses_declined(variant, reason):
    backend = check(lambda: TransformersBatched(variant), tokens, FP32)
    for report, gm in backend.graphs:
        assert counts(gm)[0] == 0, candidates(backend)
        why = [c.reason for c in report.candidates if c.status == "declined" and c.idiom == "assignment_rows"]
        assert why and reason in why[0], candidates(backend)


class GptFastEinsum(nn.Module):
    """gpt-fast's einsum over gathered weights on the (T, K) layout; near-misses "down_other_ids"
    (the down weights gathered with other ids) and "up_other_tokens" (the up projection reads other
    tokens than the gate)."""

    def __init__(self, variant="ok"):
        super().__init__()
        self.variant = variant
        self.gate = nn.Linear(D, E, bias=False)
        self.w1, self.w3, self.w2 = stacked(E, N, D), stacked(E, N, D), stacked(E, D, N)

    def forward(self, x):
        v = self.variant
        w, idx = torch.topk(Fn.softmax(self.gate(x), dim=-1), K, dim=-1)
        g = Fn.silu(torch.einsum("ti,taoi->tao", x, self.w1[idx]))
        u = torch.einsum("ti,taoi->tao", x.flip(0) if v == "up_other_tokens" else x, self.w3[idx])
        y = torch.einsum("tao,taio->tai", g * u, self.w2[idx.flip(0) if v == "down_other_ids" else idx])
        return torch.einsum("tai,ta->ti", y, w)


def test_gpt_fast_einsum_rewritten():
    backend = check(GptFastEinsum, tokens, FP32)
    for report, gm in backend.graphs:
        assert [(c.idiom, c.status) for c in report.candidates] == [("gathered_weights", "rewritten")], \
            candidates(backend)
        assert "rows_combine:einsum_tk" in report.candidates[0].parts
        assert counts(gm)[0] == 1 and not any(n.target is torch.functional.einsum for n in gm.graph.nodes)


@pytest.mark.parametrize("variant, reason", [
    ("down_other_ids", "group their rows differently"),
    ("up_other_tokens", "gate and up projections read different rows"),
])
def test_gpt_fast_einsum_near_misses_declined(variant, reason):
    backend = check(lambda: GptFastEinsum(variant), tokens, FP32)
    for report, gm in backend.graphs:
        assert counts(gm)[0] == 0, candidates(backend)
        why = [c.reason for c in report.candidates if c.status == "declined" and c.idiom == "assignment_rows"]
        assert why and reason in why[0], candidates(backend)


# --------------------------------------------------------------------------- local experts (expert parallelism)

class LocalExperts(nn.Module):
    """torchtitan's local experts: rows already grouped by local expert, counts given, grouped
    GEMMs with offsets = cumsum(counts), rows returned in the same order, no scores."""

    def __init__(self, El=3):
        super().__init__()
        self.w1, self.w3, self.w2 = stacked(El, N, D), stacked(El, N, D), stacked(El, D, N)

    def forward(self, rows, counts):
        offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
        h = Fn.silu(torch._grouped_mm(rows.bfloat16(), self.w1.bfloat16().transpose(-2, -1), offs=offsets))
        h = h * torch._grouped_mm(rows.bfloat16(), self.w3.bfloat16().transpose(-2, -1), offs=offsets)
        return torch._grouped_mm(h, self.w2.bfloat16().transpose(-2, -1), offs=offsets).type_as(rows)


def _grouped_rows(R, seed):
    g = torch.Generator().manual_seed(seed)
    cuts = torch.sort(torch.randint(0, R + 1, (2,), generator=g)).values
    counts = torch.stack([cuts[0], cuts[1] - cuts[0], R - cuts[1]])  # 3 local experts, any may be empty
    return torch.randn(R, D, generator=g), counts


def test_local_experts_rewritten():
    backend = check(LocalExperts, _grouped_rows, BF16, lengths=((6, 0), (11, 1)))
    for report, gm in backend.graphs:
        assert [(c.idiom, c.status) for c in report.candidates] == [("local_experts", "rewritten")]
        assert counts(gm) == (1, 0)
        assert any(n.op == "call_function" and n.target is torch.searchsorted for n in gm.graph.nodes)


def test_local_experts_rows_past_the_last_offset_are_dropped():
    """Rows beyond offsets[-1] belong to no group (expert -1 for the fused op: zero rows)."""
    torch.manual_seed(0)
    m = LocalExperts()
    rows = torch.randn(7, D)
    counts_ = torch.tensor([2, 0, 3])
    backend = RewriteOnly()
    out = torch.compile(m, backend=backend, fullgraph=True)(rows, counts_)
    assert counts(backend.graphs[0][1])[0] == 1
    torch.testing.assert_close(out[:5].float(), m(rows, counts_)[:5].float(), atol=BF16, rtol=BF16)
    assert (out[5:] == 0).all()


# --------------------------------------------------------------------------- the catalogue

@pytest.mark.parametrize("name", ["torchtitan_histc", "torchtitan_bincount_score_before",
                                  "gathered_bmm_scatter_add", "gathered_bmm_scatter_reduce"])
def test_catalogue_entries(name):
    idiom = BY_NAME[name]
    backend = check(idiom.build, idiom.inputs, idiom.tol)
    for report, gm in backend.graphs:
        assert sum(c.status == "rewritten" for c in report.candidates) == 1, candidates(backend)
        assert counts(gm) == (1, idiom.other_gemms)
