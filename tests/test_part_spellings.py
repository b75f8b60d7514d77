"""Spellings of parts that public MoE code writes and quick re-spellings drop (issue 18), through
the rewrite alone (``tests/rewrite_check.py``): output and every gradient against eager at two
lengths (fp32, 1e-4), what was rewritten or declined asserted.

- Combine into a base that is not zeros: routed rows added into the shared experts' output.
  ``out = shared(x)`` then a per-expert loop of ``out.index_add_`` (per_expert) here;
  ``shared(x).scatter_add(0, idx, rows)`` (assignment_rows) in tests/test_assignment_rows.py and,
  as torchtitan writes it, in the catalogue. The block becomes ``base + fused op``. Near misses,
  declined: the loop adds in place into a slice of a module buffer (state the caller sees after
  the call); a view of the base made before the loop and read after it (it would see the sum);
  gathered rows ``index_add_``-ed in place into a whole module buffer (the rewrite would drop the
  buffer's update: it was rewritten before ``safety.is_fresh`` was asked in both compositions).
- Expert masks spelled ``ids[..., None] == torch.arange(E)``: the boolean ``one_hot(ids, E)``, a
  column of which is ``ids == e``. One part recogniser (``fx.matching.arange_onehot`` /
  ``arange_column``, read by ``eq_constant`` and the one-hot paths of ``patterns/dispatch.py``)
  makes every composition that reads ``ids == e`` or ``one_hot`` read these. Near miss:
  ``arange(1, E + 1)`` (column e is expert e + 1) is not rewritten.
- Halves of a fused gate|up output: ``h[..., :w // 2]`` / ``h[..., w // 2:]`` (vLLM's reference
  ``SiluAndMul``), ``split(w // 2, -1)``, ``torch.split(h, [w // 2] * 2, -1)``, ``torch.chunk``: one
  part recogniser (``patterns.common.halves``) read by every experts recogniser; the activation on
  the second half is the up-first layout (``"swiglu+up_first"``, tests/test_glu_halves.py). Near
  misses not rewritten: overlapping halves, both factors from one half.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from rewrite_check import rewrite_and_compare

E, K, d, n = 4, 2, 16, 8


class _Routed(nn.Module):
    """A softmax top-k router; ``form`` picks the spelling under test."""

    def __init__(self, form: str):
        super().__init__()
        self.form = form
        self.gate = nn.Linear(d, E, bias=False)

    def route(self, x):
        return torch.topk(torch.softmax(self.gate(x), dim=-1), K, dim=-1)


# --------------------------------------------------------------------------- combine into a base
class LoopIntoBase(_Routed):
    def __init__(self, variant: str):
        super().__init__(variant)
        self.shared = nn.Linear(d, d, bias=False)
        self.w1 = nn.Parameter(torch.randn(E, n, d) / d**0.5)
        self.w2 = nn.Parameter(torch.randn(E, d, n) / n**0.5)
        self.register_buffer("acc", torch.zeros(8, d))

    def forward(self, x):
        w, idx = self.route(x)
        v = self.form
        out = self.acc[: x.shape[0]] if v == "into_buffer" else self.shared(x)
        early = out.view(-1) if v == "early_view" else None
        for e in range(E):
            tok, k = torch.where(idx == e)
            y = F.linear(F.silu(F.linear(x[tok], self.w1[e])), self.w2[e]) * w[tok, k, None]
            out.index_add_(0, tok, y)
        if early is not None:
            return out + early.view_as(out)
        return out


def _run(variant):
    torch.manual_seed(0)
    # the into_buffer near miss writes the buffer: both runs start from zeros
    return rewrite_and_compare(LoopIntoBase(variant), d,
                               before_each=lambda m: m.register_buffer("acc", torch.zeros(8, d)))


def test_loop_adds_into_the_shared_output():
    cands = _run("shared")
    assert [c.status for c in cands] == ["rewritten", "rewritten"], [(c.status, c.reason) for c in cands]


@pytest.mark.parametrize("variant, reason", [
    ("into_buffer", "does not start as zeros"),  # out = self.acc[:T]: module state, written in place
    ("early_view", "has views made before the loop ends"),
])
def test_loop_base_near_misses_declined(variant, reason):
    cands = _run(variant)
    assert cands and all(c.status == "declined" for c in cands), [(c.status, c.reason) for c in cands]
    assert any(reason in c.reason for c in cands), [c.reason for c in cands]



class GatheredIntoBuffer(_Routed):
    """Weights gathered per assignment (bmm), rows added in place into a module buffer (T, d)."""

    def __init__(self):
        super().__init__("buffer")
        self.w1 = nn.Parameter(torch.randn(E, n, d) / d**0.5)
        self.w2 = nn.Parameter(torch.randn(E, d, n) / n**0.5)
        self.register_buffer("acc", torch.zeros(8, d))

    def forward(self, x):
        w, ids = self.route(x)
        idx, tok = ids.reshape(-1), torch.arange(x.size(0)).repeat_interleave(K)
        h = F.silu(torch.bmm(self.w1[idx], x[tok].unsqueeze(-1)))
        y = torch.bmm(self.w2[idx], h).squeeze(-1) * w.reshape(-1, 1)
        self.acc.index_add_(0, tok, y)
        return self.acc * 1.0


def test_rows_added_in_place_into_a_buffer_declined():
    torch.manual_seed(0)
    m = GatheredIntoBuffer()
    reset = lambda mod: mod.register_buffer("acc", torch.zeros(8, d))  # noqa: E731  (both runs from zeros)
    cands = rewrite_and_compare(m, d, lengths=(8,), before_each=reset)
    assert all(c.status != "rewritten" for c in cands), [(c.status, c.reason) for c in cands]
    assert any("buffer or view the caller may see" in c.reason for c in cands), [c.reason for c in cands]
    reset(m)
    torch.compile(m, backend="sonic", fullgraph=True)(torch.randn(8, d))
    assert m.acc.abs().sum() > 0  # the module's state is updated, as in eager

# --------------------------------------------------------------------------- ids[..., None] == arange(E)
class ArangeMaskMoE(_Routed):
    def __init__(self, form: str):
        super().__init__(form)
        self.experts = nn.ModuleList([nn.Sequential(nn.Linear(d, n), nn.SiLU(), nn.Linear(n, d)) for _ in range(E)])

    def forward(self, x):
        f = self.form
        w, ids = self.route(x)
        out = torch.zeros_like(x)
        if f == "rows":  # DeepSeek's training branch with a (T*K, E) arange mask: a column per expert
            flat = ids.reshape(-1)
            mask = flat[:, None] == torch.arange(E, device=x.device)  # (A, E)
            rows = x.repeat_interleave(K, dim=0)
            buf = torch.zeros_like(rows)
            for e in range(E):
                m = mask[:, e]
                buf[m] = self.experts[e](rows[m])
            return (buf.view(x.shape[0], K, d) * w.unsqueeze(-1)).sum(1)
        arange = torch.arange(1, E + 1) if f == "off_by_one" else torch.arange(E, device=x.device)
        mask = (arange == ids.unsqueeze(-1)) if f == "arange_left" else (ids.unsqueeze(-1) == arange)  # (T, K, E)
        if f == "permute":  # the expert axis first, as Mixtral permutes its one_hot
            mask = mask.permute(2, 1, 0)
        for e in range(E):
            if f == "permute":
                k, tok = torch.where(mask[e])
            elif f == "select":
                tok, k = torch.where(mask.select(-1, e))
            elif f == "slices":
                tok, k = torch.where(mask[:, :, e])
            else:
                tok, k = torch.where(mask[..., e])
            out.index_add_(0, tok, self.experts[e](x[tok]) * w[tok, k, None])
        return out


def _run_mask(form):
    torch.manual_seed(0)
    return rewrite_and_compare(ArangeMaskMoE(form), d)


@pytest.mark.parametrize("form", [
    "column",       # mask[..., e]
    "slices",       # mask[:, :, e]
    "select",       # mask.select(-1, e)
    "arange_left",  # torch.arange(E) == ids.unsqueeze(-1)
    "permute",      # mask.permute(2, 1, 0)[e], k and token out of torch.where in that order
    "rows",         # flat ids: buf[(flat[:, None] == arange(E))[:, e]] = expert(rows[...]), view(T, K, d) sum
])
def test_arange_mask_rewritten(form):
    cands = _run_mask(form)
    assert [c.status for c in cands] == ["rewritten"] * len(cands) and cands, [(c.status, c.reason) for c in cands]


def test_arange_off_by_one_not_rewritten():
    # arange(1, E + 1): column e selects expert e + 1's tokens; expert E's never run
    cands = _run_mask("off_by_one")
    assert all(c.status != "rewritten" for c in cands), [(c.status, c.reason) for c in cands]


# --------------------------------------------------------------------------- halves of a fused gate|up
class FusedHalvesLoop(_Routed):
    """A per-expert loop over a fused gate|up weight (E, 2n, d) whose output h is split into gate and
    up in one of the ways public code writes it: vLLM's reference ``SiluAndMul`` slices
    ``h[..., :w // 2]`` / ``h[..., w // 2:]``; others ``split``, ``chunk`` (method or function)."""

    def __init__(self, form: str):
        super().__init__(form)
        self.w13 = nn.Parameter(torch.randn(E, 2 * n, d) / d**0.5)
        self.w2 = nn.Parameter(torch.randn(E, d, n) / n**0.5)

    def act(self, h):
        half = h.shape[-1] // 2
        f = self.form
        if f == "slice":
            return F.silu(h[..., :half]) * h[..., half:]
        if f == "slice_2d":
            return F.silu(h[:, :half]) * h[:, half:]
        if f == "split":
            g, u = h.split(half, dim=-1)
            return F.silu(g) * u
        if f == "split_sections":
            g, u = torch.split(h, [half, half], -1)
            return F.silu(g) * u
        if f == "torch_chunk":
            g, u = torch.chunk(h, 2, dim=-1)
            return F.silu(g) * u
        if f == "swapped":  # the activation on the second half: the up-first layout ("swiglu+up_first")
            return F.silu(h[..., half:]) * h[..., :half]
        # near misses
        if f == "off_by_one":  # halves that overlap: not a gate|up split
            return F.silu(h[..., :half + 1])[..., :half] * h[..., half:]
        if f == "same_half":  # both factors from the second half
            g, u = h.split(half, dim=-1)
            return F.silu(u) * u
        raise ValueError(f)

    def forward(self, x):
        w, ids = self.route(x)
        out = torch.zeros_like(x)
        for e in range(E):
            tok, k = torch.where(ids == e)
            h = x[tok] @ self.w13[e].t()
            out.index_add_(0, tok, (self.act(h) @ self.w2[e].t()) * w[tok, k, None])
        return out


@pytest.mark.parametrize("form", ["slice", "slice_2d", "split", "split_sections", "torch_chunk", "swapped"])
def test_fused_gate_up_halves_rewritten(form):
    torch.manual_seed(0)
    cands = rewrite_and_compare(FusedHalvesLoop(form), d)
    assert [c.status for c in cands] == ["rewritten"] * 2, [(c.status, c.reason) for c in cands]


@pytest.mark.parametrize("form", ["off_by_one", "same_half"])
def test_fused_gate_up_halves_near_misses_not_rewritten(form):
    torch.manual_seed(0)
    cands = rewrite_and_compare(FusedHalvesLoop(form), d)  # equal to eager whatever happens
    assert not any(c.status == "rewritten" for c in cands), [(c.status, c.reason) for c in cands]


# --------------------------------------------------------------------------- tokens written after the block
class TokensWrittenAfter(_Routed):
    """The block's tokens are modified in place after it (``x.mul_(2)``). The loop's backward kept its
    own gathered copies ``x[tok]``; the fused op keeps ``x`` itself, so rewriting would fail
    autograd's version check in backward: declined with the reason (found in review of labml's form).
    ``write_after="fresh"``: the tokens are a product the graph computed (``x * 1.0``): the normal form
    (moe_inductor/recognize/normal_form.py) makes the write functional, the block reads the unwritten tokens
    and is rewritten. ``"normed"``: tokens from a layer norm, outside the normal form's list of
    allocating ops: the write stays in place and the block is declined."""

    def __init__(self, write_after):
        super().__init__("where")
        self.write_after = write_after
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(d, n), nn.SiLU(), nn.Linear(n, d)) for _ in range(E))

    def forward(self, x):
        x = F.layer_norm(x, (d,)) if self.write_after == "normed" else x * 1.0
        w, ids = self.route(x.clone())
        out = torch.zeros_like(x)
        for e in range(E):
            tok, k = torch.where(ids == e)
            out.index_add_(0, tok, self.experts[e](x[tok]) * w[tok, k, None])
        if self.write_after:
            x.mul_(2.0)
        return out + x


@pytest.mark.parametrize("write_after", [False, "fresh", "normed"])
def test_tokens_written_in_place_after_the_block(write_after):
    torch.manual_seed(0)
    cands = rewrite_and_compare(TokensWrittenAfter(write_after), d)  # backward runs: no version error
    if write_after == "normed":
        assert cands and all(c.status == "declined" and "modified in place after the block" in c.reason
                             for c in cands), [(c.status, c.reason) for c in cands]
    else:
        assert [c.status for c in cands] == ["rewritten"] * 2
