"""Top-1 ("switch") spellings of labml's Switch Transformer (``tests/faithful/labml_switch.py``),
each one part recogniser, through the rewrite alone (``tests/rewrite_check.py``): output and every
gradient against eager at two lengths (fp32, 1e-4), what was rewritten or declined asserted.

- Rows indexed with trailing full slices: ``acc[idx, :] = v``, ``acc[idx, :] += v`` (combine) and
  ``x[idx, :]`` (gather) are ``acc[idx]`` / ``x[idx]`` (``dispatch.rows_index``); the boolean
  ``buf[mask, :] = expert(x[mask, :])`` too (mask_dispatch). Near miss: ``acc[idx, 1:] = v`` writes
  some columns only: not rewritten.
- Integer rows assigned into a zeros (or cloned) buffer, ``out[idx] = f(x[idx])`` with
  ``idx = (v == e).nonzero(as_tuple=True)[0]``: the expert loop takes them (selections ``v == e`` of
  one id vector never share a row; rows routed nowhere keep the buffer's value). Near miss:
  overlapping selections ``(v == e) | (v == e + 1)``: declined.
- ``torch.max(t, dim=-1)[1]`` and ``t.argmax(-1)`` are a top-1 table (K = 1: ids in [0, E),
  ``dispatch.topk_columns``): an ``empty`` buffer assigned by a loop over all E experts is covered.
  Near miss: the loop skips an expert, rows of the empty buffer stay uninitialised: declined.
- A per-token scale of the combined result, ``out * p.view(-1, 1)`` (labml's ``route_prob_max``) or
  ``out * (p / p.detach()).view(-1, 1)`` (``is_scale_prob=False``), folded into the scores
  (``combine.token_scale``; exact when every token has an assignment, the accumulator starts at
  zeros and is read only by that multiply). Look-alikes where it is not folded (still rewritten,
  the multiply left in the graph): a loop that skips an expert (unassigned rows are ``0 * p``),
  the result read twice, a (T, d) factor.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from rewrite_check import rewrite_and_compare

E, d, n = 4, 16, 8


class Top1Switch(nn.Module):
    """labml's ``SwitchFeedForward`` reduced: top-1 of a softmax router, a loop over the experts
    assigning their rows into a buffer, optionally scaled per token; ``form`` picks the spelling."""

    def __init__(self, form: str):
        super().__init__()
        self.form = form
        self.switch = nn.Linear(d, E)
        self.experts = nn.ModuleList([nn.Sequential(nn.Linear(d, n), nn.ReLU(), nn.Linear(n, d)) for _ in range(E)])

    def forward(self, x):
        f = self.form
        probs = torch.softmax(self.switch(x), dim=-1)
        if f == "argmax":
            routes = probs.argmax(-1)
            p = probs.gather(-1, routes[:, None]).squeeze(-1)
        else:
            p, routes = torch.max(probs, dim=-1)
        if f == "mutated_routes":  # top-1 ids no backward saves, written in place after the loop
            p, routes = probs.max(-1).values, probs.argmax(-1)
        if f == "empty" or f == "empty_partial":
            out = x.new_empty(x.shape)
        elif f == "clone_partial":
            out = x.clone()
        else:
            out = x.new_zeros(x.shape)
        experts = range(E - 1) if f.endswith("_partial") else range(E)
        for i in experts:
            if f == "overlap":
                idx = ((routes == i) | (routes == (i + 1) % E)).nonzero(as_tuple=True)[0]
            elif f == "where_index":
                idx = torch.where(routes == i)[0]
            else:
                idx = torch.eq(routes, i).nonzero(as_tuple=True)[0]
            if f.startswith("mask"):
                m = routes == i
                out[m, :] = self.experts[i](x[m, :])
            elif f == "iadd":
                out[idx, :] += self.experts[i](x[idx, :]) * p[idx, None]
            elif f == "some_columns":
                out[idx, 1:] = self.experts[i](x[idx, :])[:, 1:]
            elif f == "where_index":
                out[idx] = self.experts[i](x[idx])
            else:
                out[idx, :] = self.experts[i](x[idx, :])
        if f in ("scaled", "argmax", "scaled_partial", "mask_scaled", "mask_scaled_partial"):
            return out * p.view(-1, 1)
        if f == "mutated_routes":  # the routing changes after the loop: the fused op cannot run at the scale
            routes.add_(1)
            return out * p.view(-1, 1)
        if f == "unscaled":
            return out * (p / p.detach()).view(-1, 1)
        if f == "read_twice":
            return out * p.view(-1, 1) + out
        if f == "dense_factor":
            return out * probs.repeat(1, d // E)
        if f == "empty_partial":  # only the rows the loop wrote (the others hold whatever memory held)
            return out[routes != E - 1]
        return out


def _run(form):
    torch.manual_seed(0)
    return rewrite_and_compare(Top1Switch(form), d)


def _statuses(cands):
    return [(c.status, c.reason, c.parts) for c in cands]


@pytest.mark.parametrize("form", [
    "plain",          # out[idx, :] = expert(x[idx, :]) into new_zeros, returned as is
    "where_index",    # torch.where(routes == i)[0], out[idx] = expert(x[idx])
    "iadd",           # out[idx, :] += expert(x[idx, :]) * p[idx, None]
    "clone_partial",  # x.clone() buffer, experts 0..E-2: rows of expert E-1 keep x
    "empty",          # x.new_empty: covered, ids from torch.max over exactly E columns
    "mask",           # out[routes == i, :] = expert(x[routes == i, :]) (mask_dispatch)
])
def test_top1_rows_rewritten(form):
    cands = _run(form)
    assert cands and all(c.status == "rewritten" for c in cands), _statuses(cands)


@pytest.mark.parametrize("form", [
    "scaled",       # out * p.view(-1, 1), p the top-1 value of torch.max
    "unscaled",     # out * (p / p.detach()).view(-1, 1): value 1, the gradient to the router
    "argmax",       # routes = probs.argmax(-1), p gathered at them
    "mask_scaled",  # out[routes == i, :] = ..., then out * p.view(-1, 1) (mask_dispatch)
])
def test_token_scale_folded(form):
    cands = _run(form)
    assert cands and all(c.status == "rewritten" and "scaled per token" in c.parts for c in cands), _statuses(cands)


@pytest.mark.parametrize("form", [
    "scaled_partial",  # experts 0..E-2: a token of expert E-1 has no assignment (0 * p in the graph)
    "mask_scaled_partial",  # the same with boolean masks (mask_dispatch)
    "read_twice",      # out * p + out: the unscaled result is read too
    "dense_factor",    # a (T, d) factor, not one per token
    "mutated_routes",  # routes.add_(1) between the loop and the scale
])
def test_token_scale_not_folded_but_exact(form):
    cands = _run(form)
    assert cands and all(c.status == "rewritten" and "scaled per token" not in c.parts for c in cands), \
        _statuses(cands)


@pytest.mark.parametrize("form, reason", [
    ("overlap", "dispatch"),       # (v == i) | (v == i + 1): selections share rows, the last expert wins
    ("empty_partial", "cover"),    # empty buffer, an expert skipped: its rows stay uninitialised
    ("some_columns", None),        # out[idx, 1:]: not a write of whole rows
])
def test_top1_near_misses_not_rewritten(form, reason):
    cands = _run(form)
    assert all(c.status != "rewritten" for c in cands), _statuses(cands)
    if reason is not None:
        assert cands and all(reason in c.reason for c in cands), _statuses(cands)


class TopKScaled(nn.Module):
    """A top-2 loop of ``index_add_`` at ``torch.where(ids == e)`` pairs into zeros, the result then
    scaled per token: the scale folds into both of a token's scores."""

    def __init__(self, partial: bool):
        super().__init__()
        self.partial = partial
        self.gate = nn.Linear(d, E, bias=False)
        self.scale = nn.Linear(d, 1)
        self.experts = nn.ModuleList([nn.Sequential(nn.Linear(d, n), nn.SiLU(), nn.Linear(n, d)) for _ in range(E)])

    def forward(self, x):
        w, ids = torch.topk(torch.softmax(self.gate(x), dim=-1), 2, dim=-1)
        out = torch.zeros_like(x)
        for e in range(E - 1 if self.partial else E):
            tok, k = torch.where(ids == e)
            out.index_add_(0, tok, self.experts[e](x[tok]) * w[tok, k, None])
        return out * torch.sigmoid(self.scale(x))


@pytest.mark.parametrize("partial", [False, True])
def test_token_scale_folded_into_topk_pairs(partial):
    torch.manual_seed(0)
    cands = rewrite_and_compare(TopKScaled(partial), d)
    assert cands and all(c.status == "rewritten" for c in cands), _statuses(cands)
    # a loop that skips an expert leaves tokens without assignments (0 * s in the graph): not folded
    assert all(("scaled per token" in c.parts) != partial for c in cands), _statuses(cands)
