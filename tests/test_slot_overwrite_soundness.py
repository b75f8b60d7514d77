"""In-place overwrites of the capacity-slot factors (patterns/expert_slots.py ``analyse``, ``_initialised``,
``_need_stable_leaves``): a top-2 capacity gating in product form (GShard / fairscale / DeepSpeed
``top2gating``: one-hot masks, ``cumsum - 1`` locations, ``kept = mask * lt(loc, C)``, slot positions
``(loc * kept).sum(1)``, renormalised gates, ``einsum("sec,sm->ecm")`` dispatch of ``combine.bool()``), with
F.one_hot or fairscale's ``zeros(...).scatter_(-1, i.unsqueeze(-1), 1)`` one-hots, into which one in-place
write (``t[:] = 0``, ``t[0] = 2``, ``zero_``, ``fill_``, ``add_``, ``mul_``, ``masked_fill_``, ``scatter_``
into an initialised tensor, a write through ``t.reshape(-1)[0]``, ``copy_``) is injected after a factor is
computed, before or after the proof's reads of it.

The proof reads a factor as its computation (``cumsum(m) - 1``, ``one_hot(i)``, a product): a write into it
changes that value, so it must make the proof fail. The only write excused is the first write into a tensor
allocated with a constant (or nothing: zeros, full_like, new_zeros, empty) that precedes every read of it and
of its views (fairscale's one-hot scatter, nanoMoE's ``full_like(-inf).scatter_``): there the write is how
the value is computed, and the recognisers that read such a tensor interpret that write. Before the fix, a
first write into any computed tensor was excused too (``loc1 = cumsum(mask1) - 1; loc1[0] = 2``, ``s1[:] = 0``,
``comb.reshape(-1)[0] = 2`` ...): rewritten, and the output differed from eager. A write into the combine
weights after the combine made the rewritten module's backward fail where eager's does not (the fused op
saves the weights): declined too.

Each case: rewritten and exact (output and every gradient vs eager), or not rewritten (and then equal to
eager, as the graph is left as it is). The fuzz draws the place and kind of the write.
"""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as Fn

from rewrite_check import light_backend, rewrite_and_compare

D, N, E, C = 8, 4, 4, 3
KINDS = ("set_all", "set_0", "zero_", "fill_", "add_", "sub_", "mul_", "masked_fill_", "scatter_", "view_set",
         "copy_")


def one_hot_scattered(i, n):
    """fairscale's ``one_hot``: zeros of the index dtype, 1 scattered at column i of each row."""
    ret = torch.zeros(i.shape + (n,), dtype=i.dtype, device=i.device)
    ret.scatter_(-1, i.unsqueeze(-1), 1)
    return ret


def overwrite(t, kind):
    """Write into ``t`` in place (``kind`` of ``KINDS``)."""
    if kind == "set_all":
        t[:] = 0
    elif kind == "set_0":
        t[0] = 2
    elif kind in ("zero_", "fill_", "add_", "sub_", "mul_"):
        getattr(t, kind)(*{"zero_": (), "fill_": (1,), "add_": (1,), "sub_": (1,), "mul_": (0,)}[kind])
    elif kind == "masked_fill_":
        t.masked_fill_(t > 0, 0)
    elif kind == "scatter_":
        t.scatter_(0, torch.zeros((1,) + t.shape[1:], dtype=torch.long, device=t.device), 1)
    elif kind == "view_set":
        t.reshape(-1)[0] = 2
    elif kind == "copy_":
        t.copy_(torch.ones_like(t))


class CapacityTop2(nn.Module):
    """Top-2 capacity gating in product form and bmm experts on the (E, C, d) slots; ``inject`` = (step,
    name, kind): after statement ``step`` (the ``self.at`` calls), ``overwrite(name, kind)``."""

    def __init__(self, inject=None, one_hot="F", dtype=torch.float32):
        super().__init__()
        self.inject, self.one_hot, self.dtype = inject, one_hot, dtype
        self.router = nn.Linear(D, E, bias=False)
        self.w_in = nn.Parameter(torch.randn(E, D, N) / D ** 0.5)
        self.w_out = nn.Parameter(torch.randn(E, N, D) / N ** 0.5)
        self.to(dtype)

    def at(self, step, **tensors):
        if self.inject is not None and self.inject[0] == step and self.inject[1] in tensors:
            overwrite(tensors[self.inject[1]], self.inject[2])

    def oh(self, i, n):
        return one_hot_scattered(i, n) if self.one_hot == "scatter" else Fn.one_hot(i, n)

    def forward(self, x):
        x, at = x.to(self.dtype), self.at
        gates = Fn.softmax(self.router(x), dim=1)
        mask1 = self.oh(torch.argmax(gates, dim=1), E)
        at(2, mask1=mask1)
        mask2 = self.oh(torch.argmax(gates.masked_fill(mask1.bool(), float("-inf")), dim=1), E)
        at(3, mask1=mask1, mask2=mask2)
        loc1 = torch.cumsum(mask1, dim=0) - 1
        at(4, loc1=loc1, mask1=mask1)
        loc2, off = torch.cumsum(mask2, dim=0) - 1, torch.sum(mask1, dim=0, keepdim=True)
        at(5, off=off, loc2=loc2, loc1=loc1)
        loc2 = loc2 + off
        at(6, loc2=loc2, loc1=loc1, mask1=mask1, mask2=mask2, off=off)
        lt1, lt2 = torch.lt(loc1, C), torch.lt(loc2, C)
        at(7, lt1=lt1, lt2=lt2, loc1=loc1, loc2=loc2)
        kept1, kept2 = mask1 * lt1, mask2 * lt2
        at(8, kept1=kept1, kept2=kept2, loc1=loc1, loc2=loc2, mask1=mask1, mask2=mask2, lt1=lt1)
        s1, s2 = torch.sum(loc1 * kept1, dim=1), torch.sum(loc2 * kept2, dim=1)
        at(9, s1=s1, s2=s2, kept1=kept1, kept2=kept2, loc1=loc1, mask1=mask1)
        g1, g2 = (gates * kept1).sum(dim=1), (gates * kept2).sum(dim=1)
        at(10, g1=g1, g2=g2, kept1=kept1, gates=gates, s1=s1)
        den = torch.clamp(g1 + g2, min=torch.finfo(g1.dtype).eps)
        at(11, den=den, g1=g1)
        w1, w2 = g1 / den, g2 / den
        at(12, w1=w1, w2=w2, den=den, g1=g1, kept1=kept1, s1=s1)
        sc1, sc2 = self.oh(s1, C), self.oh(s2, C)
        at(13, sc1=sc1, sc2=sc2, s1=s1, w1=w1, kept1=kept1)
        c1 = w1.unsqueeze(-1).unsqueeze(-1) * kept1.unsqueeze(2) * sc1.unsqueeze(1)
        c2 = w2.unsqueeze(-1).unsqueeze(-1) * kept2.unsqueeze(2) * sc2.unsqueeze(1)
        at(14, c1=c1, sc1=sc1, kept1=kept1, w1=w1, s1=s1, mask1=mask1, loc1=loc1)
        comb = c1 + c2
        at(15, comb=comb, c1=c1, sc1=sc1, kept1=kept1, w1=w1, mask1=mask1, loc1=loc1, s1=s1)
        disp = comb.bool().type_as(x)
        at(16, disp=disp, comb=comb, kept1=kept1, w1=w1, s1=s1, sc1=sc1)
        y = torch.bmm(Fn.relu(torch.bmm(torch.einsum("sec,sm->ecm", disp, x), self.w_in)), self.w_out)
        at(18, disp=disp, comb=comb, kept1=kept1, s1=s1, sc1=sc1, mask1=mask1, loc1=loc1)
        out = torch.einsum("sec,ecm->sm", comb, y)
        at(19, comb=comb, kept1=kept1, w1=w1, s1=s1, mask1=mask1, loc1=loc1)
        return out.float()


#: every (step, names) of the injection points, read from the module's ``at`` calls
STEPS = {2: ("mask1",), 3: ("mask1", "mask2"), 4: ("loc1", "mask1"), 5: ("off", "loc2", "loc1"),
         6: ("loc2", "loc1", "mask1", "mask2", "off"), 7: ("lt1", "lt2", "loc1", "loc2"),
         8: ("kept1", "kept2", "loc1", "loc2", "mask1", "mask2", "lt1"), 9: ("s1", "s2", "kept1", "kept2", "loc1",
                                                                            "mask1"),
         10: ("g1", "g2", "kept1", "gates", "s1"), 11: ("den", "g1"), 12: ("w1", "w2", "den", "g1", "kept1", "s1"),
         13: ("sc1", "sc2", "s1", "w1", "kept1"), 14: ("c1", "sc1", "kept1", "w1", "s1", "mask1", "loc1"),
         15: ("comb", "c1", "sc1", "kept1", "w1", "mask1", "loc1", "s1"),
         16: ("disp", "comb", "kept1", "w1", "s1", "sc1"), 18: ("disp", "comb", "kept1", "s1", "sc1", "mask1", "loc1"),
         19: ("comb", "kept1", "w1", "s1", "mask1", "loc1")}


def _fwd_bwd(fn, module, x):
    module.zero_grad(set_to_none=True)
    xi = x.clone().requires_grad_(True)
    out = fn(xi)
    out.pow(2).sum().backward()
    return [out.detach(), xi.grad] + [p.grad if p.grad is not None else torch.zeros_like(p)
                                      for p in module.parameters()]


def verdict(module, T=8, tol=1e-4):
    """"eager fails" (the injected write breaks eager itself), "eager not finite", or (rewritten, equal to
    eager: output and every gradient; False where the compiled module raises and eager does not)."""
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(T))
    try:
        want = _fwd_bwd(module, module, x)
    except RuntimeError:
        return "eager fails"
    if not all(t.isfinite().all() for t in want):
        return "eager not finite"  # zeroed denominators: non-finite weights, another question than writes
    reports: list = []
    torch._dynamo.reset()
    compiled = torch.compile(module, backend=light_backend(reports), fullgraph=True)
    try:
        got = _fwd_bwd(compiled, module, x)
        equal = all(torch.allclose(a, b, atol=tol, rtol=tol, equal_nan=True) for a, b in zip(got, want))
    except RuntimeError:
        equal = False
    return any(c.status == "rewritten" for r in reports for c in r.candidates), equal


def build(inject=None, one_hot="F", dtype=torch.float32):
    torch.manual_seed(0)
    return CapacityTop2(inject, one_hot, dtype)


# --------------------------------------------------------------------------- no write: rewritten, exact

@pytest.mark.parametrize("one_hot", ["F", "scatter"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_unwritten_gating_rewritten_exact(one_hot, dtype, tol):
    """The gating without a write (fairscale's scattered one-hots: a first write into zeros, excused) is
    rewritten, output and every gradient equal to eager."""
    cands = rewrite_and_compare(build(None, one_hot, dtype), D, lengths=(5, 8), tol=tol)
    assert cands and all(c.status == "rewritten" for c in cands), [(c.status, c.reason) for c in cands]


@pytest.mark.parametrize("inject", [(18, "s1", "add_"), (19, "loc1", "set_0"), (19, "mask1", "zero_")])
def test_writes_after_every_read_rewritten_exact(inject):
    """Writes after the last reader of a factor that the fused op does not read again change nothing it
    computes: still rewritten, and exact."""
    assert verdict(build(inject)) == (True, True)


# --------------------------------------------------------------------------- near misses: not rewritten

#: writes that were rewritten with an output different from eager before the fix (the first write into a
#: computed tensor, before its readers, was excused as if it computed the value), and a write into the
#: combine weights after the combine (the rewritten backward raised)
NEAR_MISSES = [
    ((2, "mask1", "view_set"), "F"),  # F.one_hot's result written through a view
    ((3, "mask2", "set_0"), "F"),
    ((4, "loc1", "set_0"), "F"),  # locations1 = cumsum(mask1) - 1; locations1[0] = 2
    ((4, "loc1", "zero_"), "scatter"),
    ((5, "off", "scatter_"), "F"),  # the second choices' offset, scatter_ into an initialised tensor
    ((5, "loc2", "zero_"), "scatter"),
    ((6, "loc2", "set_0"), "F"),
    ((9, "s1", "set_0"), "F"),  # slot = (loc * kept).sum(1); slot[0] = 2
    ((10, "s1", "zero_"), "scatter"),  # the index of fairscale's one_hot scatter, written before the scatter
    ((11, "den", "set_0"), "F"),
    ((12, "s1", "view_set"), "F"),
    ((13, "sc1", "set_all"), "F"),  # the slot one-hot cleared: sc1[:] = 0
    ((14, "c1", "set_0"), "F"),
    ((15, "comb", "view_set"), "scatter"),  # the combine weights written through a view before dispatch
    ((19, "w1", "mul_"), "F"),  # the gates written after the combine: the fused op saved them for backward
]


@pytest.mark.parametrize("inject,one_hot", NEAR_MISSES)
def test_overwritten_factor_not_rewritten(inject, one_hot):
    assert verdict(build(inject, one_hot)) == (False, True)


def test_overwritten_factor_reason():
    """The decline names the proof and the write."""
    torch.manual_seed(0)
    reports: list = []
    torch._dynamo.reset()
    torch.compile(build((4, "loc1", "set_0")), backend=light_backend(reports), fullgraph=True)(torch.randn(8, D))
    reasons = [c.reason for r in reports for c in r.candidates]
    assert reasons and all("proof" in r and "modified in place" in r for r in reasons), reasons


# --------------------------------------------------------------------------- fuzz

def test_fuzz_overwrites():
    """Seeded draws of (one-hot spelling, step, factor, kind of write): each either rewritten and exact or
    not rewritten and equal to eager; never rewritten with another result."""
    rng = random.Random(7)
    points = [(s, n) for s, names in STEPS.items() for n in names]
    wrong, ran = [], 0
    for _ in range(60):
        step, name = rng.choice(points)
        inject, one_hot = (step, name, rng.choice(KINDS)), rng.choice(("F", "scatter"))
        v = verdict(build(inject, one_hot))
        if isinstance(v, str):
            continue
        ran += 1
        if v[1] is not True:
            wrong.append((inject, one_hot, v))
    assert ran >= 35 and not wrong, wrong
