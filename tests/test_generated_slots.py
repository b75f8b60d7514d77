"""Zero wrong rewrites on capacity slots: the generator's ``slots`` layout (``tests/moe_generator.py``)
through the sonic rewrite, against eager.

Expert-choice routing (each expert's top-C tokens gathered into (E, C, d), outputs added back with
``scatter_add_`` / ``index_add_`` in or out of place) and Switch/GShard capacity slots (one-hot,
``cumsum`` positions, ``< C`` keep mask, dispatch and combine einsums), combined into zeros or into
a shared projection's output, in fp32/bf16/fp16, with and without near-miss mutations. Before
f22b619 an expert-choice block combined into a graph-computed base (``out = shared(x);
out.scatter_add_(0, idx..., y)``) was rewritten to a result that dropped the base; at 30de754 the
random cases below report wrong rewrites and ``test_expert_choice_into_a_base`` fails.

Every case: compiled output and every gradient equal eager (``run_case``); a near-miss is not
rewritten unless the fused op expresses it exactly (``rewrite_allowed``); a supported combination
is rewritten.
"""
from __future__ import annotations

import pytest

import moe_generator as G

SEED, CASES = 29, 24
_DRAW = dict(dtypes=tuple(G.DTYPES), routers=G.ROUTERS, layouts=("slots",))
_SPECS = G.cases(CASES, SEED, **_DRAW)
_OUTCOMES: list = []


def check(outcome: G.Outcome) -> None:
    spec = outcome.spec
    assert not outcome.wrong_rewrite, f"WRONG REWRITE ({outcome.rewritten} block(s)) of {spec.describe()}: {outcome.error}"
    assert outcome.numerics_ok, f"compiled != eager without a rewrite, {spec.describe()}: {outcome.error}"
    assert not outcome.near_miss_rewritten, f"near-miss rewritten: {spec.describe()}"
    if G.supported(spec):
        assert outcome.rewritten == 1, f"supported block not rewritten: {spec.describe()}: {outcome.declined}"


def test_the_draw_covers_the_slots_family():
    # the seeded draw must hold what the fuzz is for: both dispatches, expert choice into a base,
    # supported blocks with and without a base, C clipped to T, low precision, near-misses
    kinds = {s.dispatch for s in _SPECS}
    assert {"capacity"} < kinds and kinds & {"expert_choice", "expert_choice_flat"}, kinds
    sup = [s for s in _SPECS if G.supported(s)]
    assert any(s.base and s.dispatch != "capacity" for s in sup), [s.describe() for s in sup]
    assert any(not s.base for s in sup) and any(s.dispatch == "capacity" for s in sup)
    assert any(s.dispatch != "capacity" and s.capacity >= s.T for s in _SPECS)
    assert {s.dtype for s in _SPECS} == set(G.DTYPES)
    assert sum(s.mutation is not None for s in _SPECS) >= 5


@pytest.mark.parametrize("spec", _SPECS, ids=lambda s: f"seed{s.seed}-{s.dispatch}-{s.combine}-{s.dtype}")
def test_random_slots_case(spec):
    outcome = G.run_case(spec)
    _OUTCOMES.append(outcome)
    check(outcome)


def _spec(dispatch, combine, base=True, **kw) -> G.Spec:
    args = dict(layout="slots", dispatch=dispatch, experts="bmm", combine=combine, score_on="output", bias=False,
                gated=True, act="silu", E=3, K=2 if dispatch == "capacity" else 1, T=7, skew=False, seed=5,
                capacity=3, base=base)
    args.update(kw)
    return G.Spec(**args)


@pytest.mark.parametrize("combine", G.SLOT_COMBINES["expert_choice"])
def test_expert_choice_into_a_base(combine):
    # shared(x) as the accumulator: in place (scatter_add_ / index_add_, the f22b619 bug), out of
    # place (scatter_add / index_add on the base), or into zeros and then + base
    outcome = G.run_case(_spec("expert_choice", combine))
    check(outcome)
    assert outcome.rewritten == 1, outcome.declined


@pytest.mark.parametrize("mutation", ["base_twice", "acc_not_zero"])
def test_expert_choice_base_near_misses(mutation):
    # the base read again after an in-place combine (r + base, base aliased to r), an accumulator of ones
    outcome = G.run_case(_spec("expert_choice", "scatter_add_", mutation=mutation, base=mutation == "base_twice"))
    check(outcome)
    assert outcome.rewritten == 1 and G.rewrite_allowed(outcome.spec), outcome.declined


@pytest.mark.parametrize("mutation", ["combine_index_differs", "score_twice"])
@pytest.mark.parametrize("dispatch", ["expert_choice", "capacity"])
def test_slots_near_miss_declined(dispatch, mutation):
    # outputs added at another token; scores on the input and the output: not the fused op
    combine = "einsum" if dispatch == "capacity" else "scatter_add_"
    outcome = G.run_case(_spec(dispatch, combine, mutation=mutation))
    check(outcome)
    assert outcome.rewritten == 0


def test_zz_some_random_cases_rewritten(capsys):
    """The random cases ran and the rewrite replaced some of them (a fuzz that rewrites nothing proves nothing)."""
    assert len(_OUTCOMES) == CASES, "the random cases did not all run before this check"
    rewritten = [o for o in _OUTCOMES if o.rewritten]
    with capsys.disabled():
        print(f"\nslots cases: {len(_OUTCOMES)}, rewritten {len(rewritten)} "
              f"(near-misses rewritten, allowed: {sum(o.spec.mutation is not None for o in rewritten)})")
    assert len(rewritten) >= 8, [o.spec.describe() for o in _OUTCOMES]
    assert any(o.spec.base and o.spec.dispatch != "capacity" for o in rewritten)
