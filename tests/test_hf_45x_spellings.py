"""Spellings of transformers 4.5x MoE blocks (tests/faithful/*_45x.py) that the expert-slots composition
(patterns/expert_slots.py) reads, each through the sonic rewrite (output and every gradient against eager,
fp32 and bf16), with near misses that compute something else and must not be rewritten.

Llama4 (``Llama4TextMoe``: every token through every expert, inputs scaled by dense sigmoid scores that are
exactly 0 off the top-k):
  * v4.53: the (S, E) score matrix transposed *before* the elementwise sigmoid and casts,
    ``sigmoid(full_like(-inf).scatter_(1, i, v).transpose(0, 1).float()).to(dt)``, read as a column
    ``.reshape(-1, 1)`` (``expert_slots._expert_major_column`` / ``_zero_off_top_k``: the transpose
    between the scatter and the column, the elementwise ops commuting with it);
  * v4.51: the rows gathered by ``torch.gather(x, 0, arange(S).view(1, -1).expand(E, -1).reshape(-1,
    1).expand(-1, d)).to(x.device)`` (``x.repeat(E, 1)``: ``expert_slots._replicated_rows`` after
    ``safety.strip_identity``, which reads a move to the tensor's own device as the identity) and
    combined by ``out.scatter_add_(0, that index, y.view(-1, d))`` into the shared expert's output
    (the sum over the experts, plus the base: ``expert_slots._token_scatter``).
Near misses: v4.55's released line ``x.repeat(E, 1) * scores.reshape(-1, 1)`` on (S, E) scores (each
row gets another token's score), also at S == E where every shape fits; scores transposed twice; a gather
index shifted by one row; an arange written in place before the gather.

Expert-choice slots combined in place into a computed tensor (``out = shared(x);
out.scatter_add_(0, idx, y)``): the result keeps ``out``'s value (the composition adds its base; it
dropped it before this change).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as Fn

from rewrite_check import rewrite_and_compare

E, d, n = 4, 16, 8


def _statuses(cands):
    return [(c.status, c.reason) for c in cands]


def _rewritten(cands):
    assert [c.status for c in cands] == ["rewritten"] * 2, _statuses(cands)


def _kept(cands, reason=None):
    assert all(c.status != "rewritten" for c in cands), _statuses(cands)
    if reason is not None:
        assert any(reason in (c.reason or "") for c in cands), _statuses(cands)


def _compare(module, dtype=torch.float32, lengths=(5, 8)):
    if dtype == torch.float32:
        return rewrite_and_compare(module, d, lengths=lengths)
    return rewrite_and_compare(module, d, lengths=lengths, rel_norm=True, tol=3e-2)


class DenseLlama4(nn.Module):
    """A Llama4-style block: router, dense sigmoid scores 0 off the top-k, every token through every
    expert (``bmm`` on (E, S, d) with a fused gate|up), the per-expert sum added to a shared MLP. ``form``:

    - ``t_after``: v4.56, ``x.repeat(E, 1) * sigmoid(R.float()).to(dt).transpose(0, 1).reshape(-1, 1)``
      (read before this change; the faithful entry ``llama4_456_router_module`` covers it);
    - ``t_before``: v4.53, the transpose before the sigmoid (spelling);
    - ``gather``: v4.51, gather of the tiled arange index, ``.to(x.device)``, ``scatter_add_`` back (spelling);
    - ``untransposed`` (near miss): v4.55.0, ``scores.reshape(-1, 1)`` of the (S, E) scores;
    - ``twice`` (near miss): the scores transposed twice (token-major) before ``reshape(-1, 1)``;
    - ``shifted`` (near miss): the gather index ``(arange(S) + 1) % S`` tiled: expert e's slot s holds
      token s + 1 while the scatter puts it back at s;
    - ``arange_written`` (near miss): the arange of the gather index changed in place before use.
    """

    def __init__(self, form: str, dtype=torch.float32, top_k: int = 1):
        super().__init__()
        self.form, self.top_k, self.dtype = form, top_k, dtype
        self.router = nn.Linear(d, E, bias=False)
        self.gate_up = nn.Parameter(torch.randn(E, d, 2 * n) / d ** 0.5)
        self.down = nn.Parameter(torch.randn(E, n, d) / n ** 0.5)
        self.sg, self.su, self.sd = (nn.Linear(d, n, bias=False), nn.Linear(d, n, bias=False),
                                     nn.Linear(n, d, bias=False))
        self.to(dtype)

    def experts(self, rows):
        h = torch.bmm(rows.view(E, -1, d), self.gate_up)
        gate, up = h.chunk(2, dim=-1)
        return torch.bmm(up * Fn.silu(gate), self.down).view(-1, d)

    def scores(self, x):
        logits = self.router(x)
        v, i = torch.topk(logits, self.top_k, dim=1)
        R = torch.full_like(logits, float("-inf")).scatter_(1, i, v)
        if self.form in ("t_before", "gather"):
            return torch.sigmoid(R.transpose(0, 1).float()).to(x.dtype)  # (E, S)
        s = torch.sigmoid(R.float()).to(x.dtype)  # (S, E)
        if self.form == "twice":
            return s.transpose(0, 1).transpose(0, 1)
        return s.transpose(0, 1) if self.form == "t_after" else s

    def forward(self, x):
        x = x.to(self.dtype)
        S = x.size(0)
        scores = self.scores(x)
        if self.form in ("gather", "shifted", "arange_written"):
            ar = torch.arange(S, device=x.device)
            if self.form == "arange_written":
                ar[0] = S - 1
            src = (ar + 1) % S if self.form == "shifted" else ar
            index = src.view(1, -1).expand(E, -1).reshape(-1, 1).expand(-1, d)
            back = ar.view(1, -1).expand(E, -1).reshape(-1, 1).expand(-1, d)
            if self.form != "gather":
                scores = torch.sigmoid(self.scores_t(x).float()).to(x.dtype)
            rows = torch.gather(x, 0, index).to(x.device) * scores.reshape(-1, 1)
            out = self.sd(Fn.silu(self.sg(x)) * self.su(x))
            out.scatter_add_(0, back, self.experts(rows).view(-1, d))
            return out
        rows = x.repeat(E, 1) * scores.reshape(-1, 1)
        out = self.sd(Fn.silu(self.sg(x)) * self.su(x))
        out.add_(self.experts(rows).reshape(E, -1, d).sum(dim=0))
        return out

    def scores_t(self, x):
        logits = self.router(x)
        v, i = torch.topk(logits, self.top_k, dim=1)
        return torch.full_like(logits, float("-inf")).scatter_(1, i, v).transpose(0, 1)


@pytest.mark.parametrize("form, top_k, dtype", [
    pytest.param("t_before", 1, torch.float32, id="t_before-k1-fp32"),
    pytest.param("t_before", 1, torch.bfloat16, id="t_before-k1-bf16"),
    pytest.param("t_before", 2, torch.float32, id="t_before-k2-fp32"),
    pytest.param("gather", 1, torch.float32, id="gather-k1-fp32"),
    pytest.param("gather", 1, torch.bfloat16, id="gather-k1-bf16"),
    pytest.param("gather", 2, torch.float32, id="gather-k2-fp32")])
def test_dense_llama4_spellings_rewritten(form, top_k, dtype):
    torch.manual_seed(0)
    _rewritten(_compare(DenseLlama4(form, dtype, top_k), dtype))


@pytest.mark.parametrize("form, lengths, reason", [
    ("untransposed", (5, 8), None),
    # S == E: every shape fits; the column is not an expert-major read of the scores
    ("untransposed", (4, 4), "how the slots are filled"),
    ("twice", (4, 4), "not provably 0"),  # transposed twice: token-major, not a column of the scores
    ("shifted", (5, 8), None),
    ("arange_written", (5, 8), "modified in place"),
])
def test_dense_llama4_near_misses_kept(form, lengths, reason):
    torch.manual_seed(0)
    _kept(_compare(DenseLlama4(form), lengths=lengths), reason)


class ChoiceIntoShared(nn.Module):
    """Expert-choice slots (``topk`` of the (E, S) probabilities, C tokens per expert), ``bmm`` experts,
    combined by ``scatter_add_`` in place into a shared MLP's output (a tensor the graph computed)."""

    def __init__(self, dtype=torch.float32, C=3):
        super().__init__()
        self.C, self.dtype = C, dtype
        self.router = nn.Linear(d, E, bias=False)
        self.shared = nn.Linear(d, d, bias=False)
        self.w1 = nn.Parameter(torch.randn(E, d, n) / d ** 0.5)
        self.w2 = nn.Parameter(torch.randn(E, n, d) / n ** 0.5)
        self.to(dtype)

    def forward(self, x):
        x = x.to(self.dtype)
        g, idx = torch.topk(self.router(x).softmax(-1).t(), self.C, dim=-1)
        y = torch.bmm(torch.relu(torch.bmm(x[idx], self.w1)), self.w2)
        out = self.shared(x)
        out.scatter_add_(0, idx.reshape(-1, 1).expand(-1, d), (y * g[..., None]).reshape(-1, d))
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_expert_choice_into_computed_base_keeps_base(dtype):
    torch.manual_seed(0)
    _rewritten(_compare(ChoiceIntoShared(dtype), dtype, lengths=(8, 11)))


class CountsTensorLoop(nn.Module):
    """transformers 4.5x ``DeepseekV2MoE.moe``'s segment loop: rows sorted by expert, ``for i, num_tokens in
    enumerate(counts)`` over the counts *tensor* (each a 0-d tensor), ``if num_tokens == 0: continue``,
    ``end = start + num_tokens`` slices, ``torch.cat(outputs) if outputs else rows.new_empty(0)``, the
    inverse permutation by ``new_x[idxs] = outs``, weighted sum (spelling: the counts iterated themselves,
    the list's truth). Subclasses change ``moe`` (the loop is read from each method's source)."""

    def __init__(self, dtype=torch.float32, K: int = 2):
        super().__init__()
        self.K, self.dtype = K, dtype
        self.gate = nn.Linear(d, E, bias=False)
        self.experts = nn.ModuleList([nn.Sequential(nn.Linear(d, n, bias=False), nn.SiLU(), nn.Linear(n, d, bias=False))
                                      for _ in range(E)])
        self.to(dtype)

    def forward(self, x):
        x = x.to(self.dtype)
        w, ids = torch.topk(self.gate(x).float().softmax(-1), self.K, dim=-1)
        cnts = ids.new_zeros((ids.shape[0], E))
        cnts.scatter_(1, ids, 1)
        idxs = ids.view(-1).argsort()
        outs = self.moe(x[idxs // ids.shape[1]], cnts.sum(dim=0))
        new_x = torch.empty_like(outs)
        new_x[idxs] = outs
        return new_x.view(*ids.shape, -1).type(w.dtype).mul_(w.unsqueeze(dim=-1)).sum(dim=1).type(new_x.dtype)

    def moe(self, sorted_tokens, tokens_per_expert):
        outputs = []
        start_idx = 0
        for i, num_tokens in enumerate(tokens_per_expert):
            if num_tokens == 0:
                continue
            end_idx = start_idx + num_tokens
            outputs.append(self.experts[i](sorted_tokens[start_idx:end_idx]))
            start_idx = end_idx
        return torch.cat(outputs, dim=0) if outputs else sorted_tokens.new_empty(0)


class CountsTensorLoopCountRead(CountsTensorLoop):
    """Near miss: each expert's output scaled by its count (the count read other than as a slice bound)."""

    def moe(self, sorted_tokens, tokens_per_expert):
        outputs = []
        start_idx = 0
        for i, num_tokens in enumerate(tokens_per_expert):
            if num_tokens == 0:
                continue
            end_idx = start_idx + num_tokens
            outputs.append(self.experts[i](sorted_tokens[start_idx:end_idx]) * num_tokens)
            start_idx = end_idx
        return torch.cat(outputs, dim=0) if outputs else sorted_tokens.new_empty(0)


class CountsTensorLoopOutputsRead(CountsTensorLoop):
    """Near miss: the list of outputs read otherwise (its length scales the result: the number of experts
    with rows, which running every expert would change)."""

    def moe(self, sorted_tokens, tokens_per_expert):
        outputs = []
        start_idx = 0
        for i, num_tokens in enumerate(tokens_per_expert):
            if num_tokens == 0:
                continue
            end_idx = start_idx + num_tokens
            outputs.append(self.experts[i](sorted_tokens[start_idx:end_idx]))
            start_idx = end_idx
        return (torch.cat(outputs, dim=0) if outputs else sorted_tokens.new_empty(0)) * len(outputs)


def _loop_compare(module, dtype=torch.float32):
    """Through the rewrite with sonic's loop capture (not fullgraph: the loop is captured, or not)."""
    from rewrite_check import light_backend, outputs_and_grads

    reports: list = []
    torch._dynamo.reset()
    compiled = torch.compile(module, backend=light_backend(reports))
    for T in (5, 8):
        x = torch.randn(T, d, generator=torch.Generator().manual_seed(T))
        res = [outputs_and_grads(fn, module, x) for fn in (module, compiled)]
        for got, want in zip(res[1], res[0]):
            if dtype == torch.float32:
                torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
            else:
                err = ((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-12)).item()
                assert err <= 3e-2, err
    return [c for r in reports for c in r.candidates]


@pytest.mark.parametrize("cls, dtype", [
    pytest.param(CountsTensorLoop, torch.float32, id="plain-fp32"),
    pytest.param(CountsTensorLoop, torch.bfloat16, id="plain-bf16")])
def test_counts_tensor_segment_loop_rewritten(cls, dtype):
    torch.manual_seed(0)
    cands = _loop_compare(cls(dtype), dtype)
    assert [c.status for c in cands].count("rewritten") == 2, _statuses(cands)


@pytest.mark.parametrize("cls", [CountsTensorLoopCountRead, CountsTensorLoopOutputsRead])
def test_counts_tensor_segment_loop_near_misses_kept(cls):
    torch.manual_seed(0)
    cands = _loop_compare(cls())
    assert all(c.status != "rewritten" for c in cands), _statuses(cands)
