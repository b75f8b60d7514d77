"""NLLB-MoE 4.x's slices dispatch (``patterns/mask_dispatch.py``: ``analyse_slices``;
``patterns/dispatch.py``: ``masked_copies``, ``slice_score``, ``at_most_k_per_row``)::

    p = logits.softmax(-1); m1 = one_hot(p.argmax(-1), E)
    m2 = one_hot(logits.masked_fill(m1.bool(), -inf).argmax(-1), E)
    probs = p * m1 + p * m2; mask = probs.bool()          # at most 2 nonzeros per row
    buf = einsum("bm,be->ebm", x, mask)                   # (E, T, d): x where routed, 0 elsewhere
    for e, expert in enumerate(experts):
        sel = mask[:, e]; y = expert(buf[e, sel])
        buf[e, sel] = einsum("b,be->be", probs[sel, e], y)
    return buf.sum(0)

rewritten into one fused op (ids ``topk(mask.int(), K)``, expert -1 for false slots) and exact: output
and every gradient vs eager, at two lengths, fp32 and bf16, with an expert that gets no token,
capacity dropping, NLLB's per-row gates and its eval ``*= 1 - moe_token_dropout``. Near misses are
kept as written (declined, with the part named) and exact."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from rewrite_check import light_backend, rewrite_and_compare

pytestmark = pytest.mark.usefixtures("fresh_dynamo")

E, D, N = 4, 16, 8


class Slices(nn.Module):
    """The reduced NLLB-MoE 4.x block; ``variant`` picks one spelling or near miss."""

    def __init__(self, variant="plain", capacity=None, dead_expert=True, dtype=torch.float32):
        super().__init__()
        self.variant, self.capacity, self.dtype = variant, capacity, dtype
        self.router = nn.Linear(D, E)
        with torch.no_grad():
            if dead_expert:  # expert E-1 is never among the top 2: it gets no token
                self.router.bias[E - 1] = -1e4
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(D, N), nn.ReLU(), nn.Linear(N, D)) for _ in range(E))
        self.to(dtype)

    def route(self, x):
        logits = self.router(x)
        p = logits.softmax(-1)
        m1 = F.one_hot(p.argmax(-1), E)
        m2 = F.one_hot(logits.masked_fill(m1.bool(), float("-inf")).argmax(-1), E)
        if self.capacity is not None:  # NLLB's capacity positions: the second pick after the first's counts
            m1 = m1 * torch.lt(torch.cumsum(m1, 0) - 1, self.capacity)
            m2 = m2 * torch.lt(torch.cumsum(m2, 0) - 1 + m1.sum(0, keepdim=True), self.capacity)
        if self.variant == "gates":  # NLLB: renormalised per-row gates times the pick masks
            a, b = (p * m1).sum(1), (p * m2).sum(1)
            den = torch.clamp(a + b, min=torch.finfo(p.dtype).eps)
            return (a / den)[:, None] * m1 + (b / den)[:, None] * m2, p, m1
        if self.variant == "poisoned":  # an inf factor off the picks, 0 * inf = nan: 3 nonzeros per row, the
            # nan column the first (column 0 when not picked) or the last (the dead expert's) of the three
            e = torch.arange(E)
            col = torch.where((m1 + m2)[:, :1] == 0, 0, E - 1)
            g = torch.where(e == col, float("inf"), 1.0)
            return (p * g) * m1 + p * m2, p, m1
        if self.variant == "three_terms":
            m3 = F.one_hot(logits.masked_fill((m1 + m2).bool(), float("-inf")).argmax(-1), E)
            return p * m1 + p * m2 + p * m3, p, m1
        if self.variant == "threshold_term":  # a third term with any number of nonzeros per row
            return p * m1 + p * m2 + p * (p > 0.2), p, m1
        return p * m1 + p * m2, p, m1

    def forward(self, x):
        x = x.to(self.dtype)
        probs, p, m1 = self.route(x)
        mask = probs.bool()
        v = self.variant
        if v == "copy_all":  # every slice starts as x (no mask): unrouted slots keep x
            buf = torch.einsum("bm,be->ebm", x, torch.ones_like(mask))
        elif v == "clone_all":
            buf = x.unsqueeze(0).repeat(E, 1, 1)
        else:
            buf = torch.einsum("bm,be->ebm", x, mask)
        w = p if v == "other_weights" else probs
        for e, expert in enumerate(self.experts):
            if v == "missing_slice" and e == 0:  # slice 0 keeps x at its routed rows
                continue
            sel = mask[:, e]
            if v == "read_other_slice":  # slice e-1 after it was written
                y = expert(buf[max(e - 1, 0), sel])
            elif v == "read_whole":  # the buffer read inside the loop
                y = expert(buf.sum(0)[sel])
            else:
                y = expert(buf[e, sel])
            if v in ("gates", "scaled"):
                y *= 0.8  # NLLB eval: expert_output *= 1 - moe_token_dropout
            if v == "mul_score":
                out = w[sel, e, None] * y
            elif v == "unweighted":
                out = y
            else:
                out = torch.einsum("b,be->be", w[sel, e], y)
            if v == "other_mask":  # written at other rows (as many) than it was read at
                buf[e, sel.flip(0)] = out
            else:
                buf[e, sel] = out
        return buf.sum(1) if v == "sum_axis1" else buf.sum(0)


def _fused(cands) -> int:
    return sum(c.status == "rewritten" and c.idiom == "mask_dispatch" for c in cands)


def _build(**kw):
    torch.manual_seed(0)
    return Slices(**kw).eval()


@pytest.mark.parametrize("kw", [
    dict(variant="plain"),
    dict(variant="plain", capacity=2),          # tokens over capacity dropped: rows with 0 or 1 expert
    dict(variant="gates", capacity=3),          # NLLB's per-row gates, capacity, '*= 0.8'
    dict(variant="mul_score", dead_expert=False),
    dict(variant="scaled"),
    dict(variant="three_terms"),                # three one-hot terms: at most 3 per row, K = 3
])
def test_slices_rewritten_and_exact(kw):
    cands = rewrite_and_compare(_build(**kw), D, lengths=(5, 8))
    assert _fused(cands) == 2, [(c.idiom, c.status, c.reason) for c in cands]


def test_slices_bf16_rewritten_and_exact():
    cands = rewrite_and_compare(_build(variant="gates", capacity=3, dtype=torch.bfloat16), D, lengths=(5, 8),
                                tol=5e-2)
    assert _fused(cands) == 2, [(c.idiom, c.status, c.reason) for c in cands]


def test_expert_with_no_token_and_dropped_tokens_really_happen():
    m = _build(variant="plain", capacity=2)
    probs, _, _ = m.route(torch.randn(8, D, generator=torch.Generator().manual_seed(8)))
    counts = probs.bool().sum(0)
    assert counts[E - 1] == 0 and (probs.bool().sum(1) < 2).any()


@pytest.mark.parametrize("variant, reason", [
    ("read_other_slice", "does not read slice"),
    ("read_whole", "does not read slice"),            # buf.sum(0)[sel]: not a slice of the buffer
    ("other_mask", "not column"),
    ("sum_axis1", "combine: the buffer is read by something other"),
    ("copy_all", "not column 0 of the routing mask R of the buffer"),  # R all ones: the masks are not its columns
    ("clone_all", "NLLB-MoE 4.x layout"),
    ("threshold_term", "not provably at most K"),
    ("other_weights", "finite router factors"),    # the count rests on finite p; the experts weigh by p
    ("unweighted", "finite router factors"),
    ("missing_slice", "not each of the 4 slices"),
])
def test_near_misses_declined_and_exact(variant, reason):
    cands = rewrite_and_compare(_build(variant=variant), D, lengths=(5, 8))
    assert _fused(cands) == 0, [(c.idiom, c.status, c.reason) for c in cands]
    assert any(reason in c.reason for c in cands), [(c.idiom, c.status, c.reason) for c in cands]


def test_row_with_more_than_k_from_a_non_finite_factor_is_nan_as_in_eager():
    """0 * inf in a float router factor puts a third nonzero (nan) in every row, the first of its
    three true columns in some rows and the last in others (so however topk breaks ties among the
    three, some row loses its nan column): eager adds nan * f into every token, the fused op (which
    takes K = 2 columns) gets nan scores for a row with more than 2 nonzeros."""
    m = _build(variant="poisoned")
    reports: list = []
    compiled = torch.compile(m, backend=light_backend(reports), fullgraph=True)
    x = torch.randn(8, D, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        S, _, m1 = m.route(x)
        assert (S.bool().sum(1) == 3).all()
        first = S[:, 0].isnan()
        assert first.any() and not first.all()
        want, got = m(x), compiled(x)
    assert torch.isnan(want).all()
    torch.testing.assert_close(got, want, equal_nan=True)
    assert _fused([c for r in reports for c in r.candidates]) == 1
