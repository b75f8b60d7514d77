"""Part spellings met in LitGPT's ``LLaMAMoE`` and SGLang's torch-native MoE forwards
(``tests/faithful/litgpt.py``, ``tests/faithful/sglang_native.py``):

- gathered gate|up weights split before their GEMMs (``patterns/assignment_rows._weight_halves_proj``,
  ``common.halves(axis=-2)``): ``w1, w3 = torch.chunk(W13[ids], 2, dim=2)`` then
  ``einsum('ti,taoi->tao', x, w1)`` / ``(x, w3)``: the two halves of one fused gate|up GEMM;
- per-expert counts ``cnts.scatter_(1, ids.to(torch.int64), 1).sum(0)`` with int64 top-k ids (the
  cast is the identity: ``assignment_rows._scatter_counts``);
- a segment loop split by host counts inside a module-level function the forward calls by name
  (``loop_capture.host_count_splits`` follows ``global_callees``): the frame is traced with the counts
  as symbolic sizes, so the block is one graph and fused on the first call.

Each is rewritten with output and every gradient equal to eager (fp32 and bf16); near misses
(halves of two different gathered weights, the same half twice, a bias added in place to one half,
counts of another top-k, an expert computing another function) are not rewritten and stay equal to eager."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from moe_inductor.dynamo import loop_capture
from rewrite_check import CaptureGraphs, rewrite_and_compare

pytestmark = pytest.mark.usefixtures("fresh_dynamo")

D, N, E, K = 16, 8, 4, 2


# --------------------------------------------------------------------------- chunked gathered weights

class ChunkedEinsum(nn.Module):
    """SGLang's ``fused_moe_forward_native`` spelling; ``form`` picks a near miss."""

    def __init__(self, form="gate_first", act="silu"):
        super().__init__()
        self.gate = nn.Linear(D, E, bias=False)
        self.w13 = nn.Parameter(torch.randn(E, 2 * N, D) / D ** 0.5)
        self.w13b = nn.Parameter(torch.randn(E, 2 * N, D) / D ** 0.5)
        self.w2 = nn.Parameter(torch.randn(E, D, N) / N ** 0.5)
        self.b1 = nn.Parameter(torch.randn(E, N) * 0.1)  # "half_bias": a bias on the gate half only
        self.form, self.act = form, act

    def forward(self, x):
        w, ids = self.gate(x).float().softmax(-1).topk(K, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        a, b = torch.chunk(self.w13[ids], 2, dim=2)
        if self.form == "up_first":
            b, a = a, b
        elif self.form == "same_half":
            b = a
        elif self.form == "two_weights":
            b = torch.chunk(self.w13b[ids], 2, dim=2)[1]
        x1 = torch.einsum("ti,taoi -> tao", x, a)
        if self.form == "half_bias":
            x1.add_(self.b1[ids])
        x1 = F.silu(x1) if self.act == "silu" else F.gelu(x1)
        x3 = torch.einsum("ti, taoi -> tao", x, b)
        y = torch.einsum("tao, taio -> tai", x1 * x3, self.w2[ids])
        return torch.einsum("tai,ta -> ti", y, w.to(y.dtype))


def _rewritten(cands) -> list:
    return [c for c in cands if c.status == "rewritten"]


@pytest.mark.parametrize("form,act", [("gate_first", "silu"), ("up_first", "silu"), ("gate_first", "gelu")])
def test_chunked_gathered_weights_fused_and_exact(form, act):
    torch.manual_seed(0)
    cands = rewrite_and_compare(ChunkedEinsum(form, act), D, lengths=(5, 8) if form == "gate_first" else (7,))
    assert _rewritten(cands) and all(c.status == "rewritten" for c in cands), [(c.idiom, c.reason) for c in cands]


def test_chunked_gathered_weights_bf16():
    torch.manual_seed(0)
    model = ChunkedEinsum().to(torch.bfloat16)
    cands = _compare_bf16(model)
    assert _rewritten(cands) and all(c.status == "rewritten" for c in cands), [(c.idiom, c.reason) for c in cands]


def _compare_bf16(model):
    """rewrite_and_compare on bf16 tokens (its inputs are fp32): the module casts them first."""
    return rewrite_and_compare(_Cast(model), D, lengths=(7,), tol=2e-2, rel_norm=True)


class _Cast(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x.to(torch.bfloat16))


@pytest.mark.parametrize("form", ["same_half", "two_weights", "half_bias"])
def test_chunked_gathered_weights_near_miss(form):
    torch.manual_seed(0)
    cands = rewrite_and_compare(ChunkedEinsum(form), D, lengths=(7,))
    assert not _rewritten(cands), [(c.idiom, c.reason) for c in cands]


# --------------------------------------------------------------------------- segment loops: counts and callees

class Stacked(nn.Module):
    """Router + stacked weights ``w13`` (E, 2n, d), ``w2`` (E, d, n), as SGLang's ``FusedMoE``."""

    def __init__(self, gelu_expert=None):
        super().__init__()
        self.gate = nn.Linear(D, E, bias=False)
        self.other = nn.Linear(D, E, bias=False)
        self.w13 = nn.Parameter(torch.randn(E, 2 * N, D) / D ** 0.5)
        self.w2 = nn.Parameter(torch.randn(E, D, N) / N ** 0.5)
        self.num_experts, self.gelu_expert = E, gelu_expert

    def route(self, x):
        # the scores in the rows' dtype: the combine of bf16 rows upcast to fp32 scores (SGLang's own
        # bf16 case) is declined by setitem_perm_sum (scores and rows must share a dtype)
        w, ids = self.gate(x).float().softmax(-1).topk(K, dim=-1)
        return ids, (w / w.sum(-1, keepdim=True)).to(x.dtype)


def _expert(layer, rows, i):
    h = F.linear(rows, layer.w13[i])
    act = F.gelu if i == layer.gelu_expert else F.silu  # a near miss makes one expert compute another function
    return F.linear(act(h[..., :N]) * h[..., N:], layer.w2[i])


def segment_infer(layer, x, ids, w, count_ids=None):
    """SGLang's ``moe_forward_native`` (a module-level function the forward calls by name): counts by
    ``scatter_`` of ``ids.to(torch.int64)``, argsort, ``.cpu().numpy()`` counts, the segment loop."""
    cnts = ids.new_zeros((ids.shape[0], layer.num_experts))
    cnts.scatter_(1, (ids if count_ids is None else count_ids).to(torch.int64), 1)
    tokens_per_expert = cnts.sum(dim=0)
    idxs = ids.view(-1).argsort()
    sorted_tokens = x[idxs // ids.shape[1]]
    tokens_per_expert = tokens_per_expert.cpu().numpy()
    outputs = []
    start_idx = 0
    for i, num_tokens in enumerate(tokens_per_expert):
        end_idx = start_idx + num_tokens
        if num_tokens == 0:
            continue
        outputs.append(_expert(layer, sorted_tokens[start_idx:end_idx], i))
        start_idx = end_idx
    outs = torch.cat(outputs, dim=0) if len(outputs) else sorted_tokens.new_empty(0)
    new_x = torch.empty_like(outs)
    new_x[idxs] = outs
    return new_x.view(*ids.shape, -1).type(w.dtype).mul_(w.unsqueeze(-1)).sum(dim=1).type(new_x.dtype)


class GlobalSegment(Stacked):
    """The forward calls the module-level ``segment_infer`` by name."""

    def forward(self, x):
        ids, w = self.route(x)
        return segment_infer(self, x, ids, w)


class MethodCastCounts(Stacked):
    """The segment loop in a method of the module (found without following module-level callees):
    only the counts of ``ids.to(torch.int64)`` are new."""

    def forward(self, x):
        return self.infer(x, *self.route(x))

    def infer(self, x, ids, w):
        cnts = ids.new_zeros((ids.shape[0], self.num_experts))
        cnts.scatter_(1, ids.to(torch.int64), 1)
        tokens_per_expert = cnts.sum(dim=0)
        idxs = ids.view(-1).argsort()
        sorted_tokens = x[idxs // ids.shape[1]]
        tokens_per_expert = tokens_per_expert.cpu().numpy()
        outputs = []
        start_idx = 0
        for i, num_tokens in enumerate(tokens_per_expert):
            end_idx = start_idx + num_tokens
            if num_tokens == 0:
                continue
            outputs.append(_expert(self, sorted_tokens[start_idx:end_idx], i))
            start_idx = end_idx
        outs = torch.cat(outputs, dim=0) if len(outputs) else sorted_tokens.new_empty(0)
        new_x = torch.empty_like(outs)
        new_x[idxs] = outs
        return new_x.view(*ids.shape, -1).type(w.dtype).mul_(w.unsqueeze(-1)).sum(dim=1).type(new_x.dtype)


class OtherIdsCounts(Stacked):
    """Near miss: the counts are of another router's top-k ids (cast to int64), the rows sorted by the
    routing ids: the segments are not the experts' rows."""

    def forward(self, x):
        ids, w = self.route(x)
        return segment_infer(self, x, ids, w, count_ids=self.other(x).topk(K, dim=-1)[1])


class MixedGlobal(GlobalSegment):
    """Near miss: expert 1 applies gelu (not the same MLP in every segment)."""

    def __init__(self):
        super().__init__(gelu_expert=1)


def _tokens(T, dtype=torch.float32):
    return torch.randn(T, D, generator=torch.Generator().manual_seed(T)).to(dtype)


def _compare(model, x, tol):
    backend = CaptureGraphs()
    params = list(model.parameters())
    ref = model(x)
    g = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, params, g, allow_unused=True)
    out = torch.compile(nn.Sequential(model), backend=backend)(x)
    grads = torch.autograd.grad(out, params, g, allow_unused=True)
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    for (name, _), a, b in zip(model.named_parameters(), grads, ref_grads):
        if b is None:  # unused (the near misses' second router) or an expert without rows
            assert a is None or torch.count_nonzero(a) == 0, name
            continue
        torch.testing.assert_close(a, b, atol=tol, rtol=tol, msg=lambda m: f"{name}: {m}")
    return backend


def _blocks(backend) -> list:
    return [c for r in backend.reports for c in r.candidates if c.status == "rewritten" and c.idiom == "sorted_rows"]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("cls", [GlobalSegment, MethodCastCounts])
def test_segment_block_fused_and_exact(cls, dtype, tol):
    torch.manual_seed(0)
    model = cls().to(dtype)
    assert loop_capture.host_count_splits(cls.forward), "the frame must get capture_scalar_outputs"
    backend = _compare(model, _tokens(7, dtype), tol)
    assert len(backend.graphs) == 1 and len(_blocks(backend)) == 1, [g.code for g in backend.graphs]


@pytest.mark.parametrize("cls", [OtherIdsCounts, MixedGlobal])
def test_segment_near_miss_not_fused_and_exact(cls):
    torch.manual_seed(0)
    backend = _compare(cls(), _tokens(7), 1e-5)
    assert not _blocks(backend), [g.code for g in backend.graphs]
