"""Invariants of top-k routing and SonicMoE token rounding (moe_inductor.ops.routing), on CPU.

The vectorised implementation is checked against a per-expert Python loop written straight from
the algorithm (``bruteforce_token_rounding``), and against the properties the algorithm promises.
"""
from __future__ import annotations

import math

import pytest
import torch

from moe_inductor.ops.op import fused_moe
from moe_inductor.ops.reference import naive_moe
from moe_inductor.ops.routing import (
    MODES,
    expert_counts,
    max_token_rounding_assignments,
    padding_waste,
    padding_waste_tensor,
    round_expert_counts,
    token_rounding_routing,
    topk_routing,
)


def random_probs(T, E, seed=0, dtype=torch.float32, sharpness=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(T, E, generator=g, dtype=torch.float64) * sharpness).softmax(-1).to(dtype)


def rounded(f, M, mode, T):
    """Python rounding of one count, written independently of the tensor version."""
    if mode == "down":
        r = (f // M) * M
    elif mode == "up":
        r = -(-f // M) * M
    else:  # nearer multiple; a tie (f = M/2 mod M) goes up
        lo, hi = (f // M) * M, (f // M + 1) * M
        r = hi if (hi - f) <= (f - lo) else lo
    return min(r, T)


def bruteforce_token_rounding(probs, K, M, mode, renormalize):
    """Per-expert loop over Python lists: {(t, e): score} and counts, straight from FIELD-NOTES."""
    P = probs.detach().double().tolist()
    T, E = len(P), (len(P[0]) if P else 0)
    v, idx = torch.topk(probs.detach(), K, dim=-1)
    v, idx = v.double().tolist(), idx.tolist()
    picks = [dict(zip(idx[t], v[t])) for t in range(T)]
    mass = [sum(v[t]) for t in range(T)]
    out, counts = {}, []
    for e in range(E):
        f = sum(1 for t in range(T) if e in picks[t])
        keep = rounded(f, M, mode, T)
        key = [(picks[t][e] / mass[t]) if e in picks[t] else P[t][e] - 1.0 for t in range(T)]
        order = sorted(range(T), key=lambda t: (-key[t], t))
        for t in order[:keep]:
            out[(t, e)] = P[t][e] / mass[t] if renormalize else P[t][e]
        counts.append(keep)
    return out, counts


def as_dict(r):
    return {(t, e): s for t, e, s in zip(r.token_ids.tolist(), r.expert_ids.tolist(), r.scores.double().tolist())}


CASES = [
    (256, 8, 2, 16, "nearest"),  # typical: several tiles per expert
    (256, 8, 2, 16, "up"),  # same shape, rounding up adds non-picks
    (256, 8, 2, 16, "down"),  # same shape, rounding down drops picks
    (300, 7, 3, 32, "nearest"),  # prime E, T not a multiple of M
    (300, 13, 4, 16, "up"),  # prime E = 13, K > 1
    (100, 13, 2, 32, "down"),  # f_e < M for most experts: down drops nearly everything
    (100, 13, 2, 32, "nearest"),  # f_e around M/2: some experts dropped, some rounded up
    (20, 5, 2, 32, "up"),  # T < M: every used expert clamps to T
    (64, 4, 4, 16, "nearest"),  # K == E: every token picks every expert
    (129, 6, 1, 7, "up"),  # odd tile, K = 1
]


@pytest.mark.parametrize("T,E,K,M,mode", CASES)
@pytest.mark.parametrize("renormalize", [True, False])  # both score formulas
def test_matches_bruteforce(T, E, K, M, mode, renormalize):
    probs = random_probs(T, E, seed=T + E + K + M)
    r = token_rounding_routing(probs, K, M, mode, renormalize)
    want, want_counts = bruteforce_token_rounding(probs, K, M, mode, renormalize)
    got = as_dict(r)
    assert len(got) == r.token_ids.numel(), "a (token, expert) pair appears twice"
    assert set(got) == set(want)
    for pair, s in want.items():
        assert got[pair] == pytest.approx(s, rel=1e-5, abs=1e-7)
    assert r.counts.tolist() == want_counts
    assert r.token_ids.dtype == r.expert_ids.dtype == torch.int32
    assert r.counts.dtype == torch.int64


@pytest.mark.parametrize("T,E,K,M,mode", CASES)
def test_counts_rounded_and_consistent(T, E, K, M, mode):
    probs = random_probs(T, E, seed=1)
    f = topk_routing(probs, K).counts
    r = token_rounding_routing(probs, K, M, mode)
    for fe, ce in zip(f.tolist(), r.counts.tolist()):
        assert ce <= T
        assert ce == T or ce % M == 0
        if ce < T:  # not clamped: the exact rounding of the mode
            assert ce == {"down": (fe // M) * M, "up": -(-fe // M) * M,
                          "nearest": M * math.floor(fe / M + 0.5)}[mode]
    # counts agrees with the assignments actually emitted
    assert torch.equal(expert_counts(r.expert_ids, E), r.counts)
    assert int(r.counts.sum()) == r.token_ids.numel()
    assert r.token_ids.numel() <= max_token_rounding_assignments(T, E, K, M, mode)


def _picks_and_weights(probs, K):
    v, i = torch.topk(probs, K, dim=-1)
    w = v / v.sum(-1, keepdim=True)
    pick_w = torch.full_like(probs, float("nan"))
    pick_w.scatter_(1, i, w)
    return ~pick_w.isnan(), pick_w


@pytest.mark.parametrize("T,E,K,M", [
    (256, 8, 2, 16),  # several tiles per expert
    (333, 11, 3, 32),  # prime E, uneven counts
])
def test_round_down_keeps_highest_weight_picks(T, E, K, M):
    probs = random_probs(T, E, seed=2)
    is_pick, pick_w = _picks_and_weights(probs, K)
    r = token_rounding_routing(probs, K, M, "down")
    kept = torch.zeros(T, E, dtype=torch.bool)
    kept[r.token_ids.long(), r.expert_ids.long()] = True
    assert not (kept & ~is_pick).any(), "rounding down must never add a non-pick"
    dropped_some = False
    for e in range(E):
        kept_w = pick_w[kept[:, e], e]
        dropped_w = pick_w[is_pick[:, e] & ~kept[:, e], e]
        if len(kept_w) and len(dropped_w):
            dropped_some = True
            assert kept_w.min() >= dropped_w.max()
    assert dropped_some, "case too easy: no expert both kept and dropped picks"


@pytest.mark.parametrize("T,E,K,M", [
    (256, 8, 2, 16),  # several tiles per expert
    (333, 11, 3, 32),  # prime E, uneven counts
])
def test_round_up_adds_highest_probability_non_picks(T, E, K, M):
    probs = random_probs(T, E, seed=3)
    is_pick, _ = _picks_and_weights(probs, K)
    r = token_rounding_routing(probs, K, M, "up")
    kept = torch.zeros(T, E, dtype=torch.bool)
    kept[r.token_ids.long(), r.expert_ids.long()] = True
    assert not (is_pick & ~kept).any(), "rounding up must keep every pick"
    added_some = False
    for e in range(E):
        added_p = probs[kept[:, e] & ~is_pick[:, e], e]
        left_p = probs[~kept[:, e] & ~is_pick[:, e], e]
        if len(added_p) and len(left_p):
            added_some = True
            assert added_p.min() >= left_p.max()
    assert added_some


def test_nearest_drops_expert_below_half_tile():
    # Expert 0 is picked by 7 tokens (< M/2 = 8), expert 1 by 8 (= M/2, a tie: rounds up),
    # expert 2 by the rest: nearest must drop expert 0 entirely and give expert 1 a full tile.
    T, E, M = 64, 3, 16
    probs = torch.full((T, E), 0.05)
    probs[:7, 0] = 0.9
    probs[7:15, 1] = 0.9
    probs[15:, 2] = 0.9
    probs = probs / probs.sum(-1, keepdim=True)
    r = token_rounding_routing(probs, 1, M, "nearest")
    assert topk_routing(probs, 1).counts.tolist() == [7, 8, 49]
    assert r.counts.tolist() == [0, 16, 48]
    assert not (r.expert_ids == 0).any()
    # expert 1 takes its 8 picks plus 8 added tokens: the 7 of expert 0 tie on P, so the lowest
    # token index wins (0..6), then token 15 (first of expert 2's).
    assert sorted(r.token_ids[r.expert_ids == 1].tolist()) == list(range(0, 16))


@pytest.mark.parametrize("mode", MODES)  # clamp to T under each rounding rule
def test_all_tokens_on_one_expert(mode):
    T, E, M = 100, 5, 32
    probs = torch.full((T, E), 0.01)
    probs[:, 3] = 0.96
    r = token_rounding_routing(probs, 1, M, mode)
    f3 = {"nearest": 96, "up": 100, "down": 96}[mode]  # 100 -> 96 / min(128, T) / 96
    assert r.counts.tolist() == [0, 0, 0, f3, 0]
    assert len(set(r.token_ids.tolist())) == f3


def test_empty_batch():
    # T = 0 (e.g. an empty microbatch): empty, well-typed outputs instead of an error.
    r = token_rounding_routing(torch.empty(0, 6), 2, 16, "up")
    assert r.token_ids.numel() == 0 and r.counts.tolist() == [0] * 6
    assert padding_waste(r.counts, 16) == 0.0


def test_padding_waste_zero_with_rounding_and_hand_computed_for_topk():
    # counts [5, 0, 16, 17] with M = 16: padded rows 16 + 0 + 16 + 32 = 64 for 38 useful rows.
    E, M = 4, 16
    rows = [0] * 5 + [2] * 16 + [3] * 17
    probs = torch.full((len(rows), E), 0.1)
    probs[torch.arange(len(rows)), torch.tensor(rows)] = 0.7
    f = topk_routing(probs, 1).counts
    assert f.tolist() == [5, 0, 16, 17]
    assert padding_waste(f, M) == pytest.approx((11 + 0 + 0 + 15) / 38)
    assert padding_waste_tensor(f, M).dtype == torch.float64
    for mode in MODES:
        r = token_rounding_routing(probs, 1, M, mode)
        assert padding_waste(r.counts, M) == 0.0, mode
    # larger random case: rounding removes waste that top-k has
    probs = random_probs(1000, 12, seed=4)
    assert padding_waste(topk_routing(probs, 2).counts, 64) > 0.05
    for mode in MODES:
        assert padding_waste(token_rounding_routing(probs, 2, 64, mode).counts, 64) == 0.0


def test_topk_routing_layout():
    probs = random_probs(50, 9, seed=5)
    r = topk_routing(probs, 3, renormalize=True)
    v, i = torch.topk(probs, 3, dim=-1)
    assert torch.equal(r.token_ids, torch.arange(50, dtype=torch.int32).repeat_interleave(3))
    assert torch.equal(r.expert_ids, i.reshape(-1).to(torch.int32))
    torch.testing.assert_close(r.scores, (v / v.sum(-1, keepdim=True)).reshape(-1))
    torch.testing.assert_close(topk_routing(probs, 3, renormalize=False).scores, v.reshape(-1))
    assert torch.equal(r.counts, torch.bincount(i.reshape(-1), minlength=9))


@pytest.mark.parametrize("renormalize", [True, False])  # both score formulas have a gradient path
@pytest.mark.parametrize("mode", ["up", "down"])  # added pairs (up) and picks only (down)
def test_gradients_reach_probs(renormalize, mode):
    logits = torch.randn(40, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(6))

    def scores_of(lg):
        return token_rounding_routing(lg.softmax(-1), 2, 8, mode, renormalize).scores

    # gradcheck perturbs by 1e-6: far below the gaps between random probabilities, so the
    # chosen pairs stay fixed and the check sees the gather (and the renormalisation).
    assert torch.autograd.gradcheck(scores_of, (logits.clone().requires_grad_(),))
    p = logits.softmax(-1).requires_grad_()
    token_rounding_routing(p, 2, 8, mode, renormalize).scores.sum().backward()
    assert p.grad.abs().sum() > 0


@pytest.mark.parametrize("impl,dtype", [("torch", torch.float64), ("triton", torch.float32)])
def test_fused_moe_accepts_routing_and_padding_is_dropped(impl, dtype):
    # static-shape padding is (token 0, expert -1, score 0): the op must drop it in value and in
    # every gradient, on the PyTorch path and in the (interpreted) Triton kernels
    T, d, n, E, K, M = 48, 16, 8, 5, 2, 8
    g = torch.Generator().manual_seed(7)
    x = torch.randn(T, d, generator=g, dtype=dtype)
    w1 = torch.randn(E, 2 * n, d, generator=g, dtype=dtype) * 0.2
    w2 = torch.randn(E, d, n, generator=g, dtype=dtype) * 0.2
    probs = random_probs(T, E, seed=8, dtype=dtype)
    exact = token_rounding_routing(probs, K, M, "up")
    static = token_rounding_routing(probs, K, M, "up", static_shape=True)
    A = exact.token_ids.numel()
    assert static.token_ids.numel() > A  # there is padding to test
    assert torch.equal(static.expert_ids[A:], torch.full_like(static.expert_ids[A:], -1))
    # every expert's count stays a multiple of M: padding is not counted as any expert's rows
    assert torch.equal(torch.bincount(static.expert_ids[:A].long(), minlength=E), static.counts)

    def run(routing):
        leaves = [t.detach().clone().requires_grad_() for t in (x, routing.scores, w1, w2)]
        xx, ss, ww1, ww2 = leaves
        out = fused_moe(xx, routing.token_ids, routing.expert_ids, ss, ww1, ww2, impl=impl)
        out.backward(torch.linspace(-1, 1, out.numel(), dtype=dtype).view_as(out))
        return out, [t.grad for t in leaves]

    out_exact, g_exact = run(exact)
    out_static, g_static = run(static)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else {}
    torch.testing.assert_close(out_exact, naive_moe(x, *exact[:3], w1, w2), **tol)
    torch.testing.assert_close(out_static, out_exact, **tol)
    for name, a, b in zip(("x", "scores", "w1", "w2"), g_static, g_exact):
        if name == "scores":
            torch.testing.assert_close(a[:A], b, **tol)
            assert torch.equal(a[A:], torch.zeros_like(a[A:])), "padding must get a zero score gradient"
        else:
            torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{name}: {m}")


def test_fused_moe_rejects_expert_ids_below_minus_one():
    x = torch.randn(4, 8)
    w1, w2 = torch.randn(2, 8, 8), torch.randn(2, 8, 4)
    with pytest.raises(ValueError, match="expert_ids outside"):
        fused_moe(x, torch.tensor([0, 1]), torch.tensor([0, -2]), torch.ones(2), w1, w2, impl="torch")


@pytest.fixture
def no_host_reads(monkeypatch):
    """Make the Python-level ways of reading device data raise; count Tensor.item calls."""
    calls = {"item": 0}

    def forbidden(name):
        def raise_(*args, **kwargs):
            raise AssertionError(f"host sync: Tensor.{name} called")
        return raise_

    def counting_item(self):
        calls["item"] += 1
        if calls.get("forbid_item"):
            raise AssertionError("host sync: Tensor.item called")
        return real_item(self)

    real_item = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", counting_item)
    for name in ("tolist", "nonzero", "__bool__", "__int__", "__float__", "numpy", "cpu"):
        monkeypatch.setattr(torch.Tensor, name, forbidden(name))
    monkeypatch.setattr(torch, "nonzero", forbidden("torch.nonzero"))
    monkeypatch.setattr(torch, "bincount", forbidden("torch.bincount"))
    return calls


@pytest.mark.parametrize("mode", MODES)  # each rounding rule has its own count arithmetic
def test_no_host_sync(mode, no_host_reads):
    probs = random_probs(200, 7, seed=9)
    no_host_reads["forbid_item"] = True
    static = token_rounding_routing(probs, 2, 16, mode, static_shape=True)
    topk_routing(probs, 2)
    padding_waste_tensor(static.counts, 16)
    no_host_reads["forbid_item"] = False
    exact = token_rounding_routing(probs, 2, 16, mode)
    assert no_host_reads["item"] == 1, "exact-length mode must read exactly one scalar"
    A = exact.token_ids.shape[0]
    assert torch.equal(static.token_ids[:A], exact.token_ids)
    assert torch.equal(static.expert_ids[:A], exact.expert_ids)
    assert torch.equal(static.scores[:A], exact.scores)
    assert torch.equal(static.scores[A:], torch.zeros_like(static.scores[A:]))
    assert torch.equal(static.expert_ids[A:], torch.full_like(static.expert_ids[A:], -1))


def test_static_shape_traces_as_one_graph():
    # Stronger than the monkeypatch (which sees only Python-level reads): Dynamo with
    # fullgraph=True raises on any data-dependent shape or scalar read (nonzero, item, ...).
    torch._dynamo.reset()
    fn = torch.compile(lambda p: token_rounding_routing(p, 2, 16, "nearest", static_shape=True),
                       backend="eager", fullgraph=True)
    probs = random_probs(96, 7, seed=10)
    got, want = fn(probs), token_rounding_routing(probs, 2, 16, "nearest", static_shape=True)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("call,err,match", [
    (lambda p: token_rounding_routing(p, 2, 16, "sideways"), ValueError, "unknown mode"),  # bad mode
    (lambda p: token_rounding_routing(p, 2, 0, "up"), ValueError, "tile_m"),  # tile_m = 0
    (lambda p: token_rounding_routing(p, 2, -8, "up"), ValueError, "tile_m"),  # negative tile_m
    (lambda p: token_rounding_routing(p, 9, 16, "up"), ValueError, "top_k"),  # top_k > E = 8
    (lambda p: token_rounding_routing(p, 0, 16, "up"), ValueError, "top_k"),  # top_k = 0
    (lambda p: token_rounding_routing(p[0], 2, 16, "up"), ValueError, "2-D"),  # 1-D probs
    (lambda p: token_rounding_routing(p[None], 2, 16, "up"), ValueError, "2-D"),  # 3-D probs
    (lambda p: token_rounding_routing((p * 10).long(), 2, 16, "up"), TypeError, "floating"),  # int probs
    (lambda p: token_rounding_routing(p, 2, 16.0, "up"), TypeError, "tile_m"),  # float tile_m
    (lambda p: topk_routing(p, 9), ValueError, "top_k"),  # top-k path checks too
    (lambda p: padding_waste(torch.tensor([3, 4]), 0), ValueError, "tile_m"),  # waste needs a tile
    (lambda p: round_expert_counts(torch.tensor([3]), 16, "random", 10), ValueError, "unknown mode"),
])
def test_bad_arguments(call, err, match):
    with pytest.raises(err, match=match):
        call(random_probs(10, 8))
