"""Randomised MoE blocks built from a random spelling of each part, and near-miss mutations.

An MoE block computes ``out[t] = sum over assignments (t, e, s) of s * f_e(x[t])`` (or, with the
score on the input, ``f_e(s * x[t])``). ``GeneratedMoE(spec)`` writes that computation with one
spelling per part:

- layout / dispatch (how the (token, expert, score) assignments are expressed):
  ``loop``: a Python loop over the experts with per-expert token lists,
  ``where_eq`` (``tok, k = torch.where(ids == e)``), ``onehot_permute``
  (``k, tok = torch.where(one_hot(ids, E).permute(2, 1, 0)[e])``) or ``arange_eq``
  (``tok, k = torch.where((ids.unsqueeze(-1) == torch.arange(E))[..., e])``);
  ``flat``: a loop over the experts with boolean masks over the ``repeat_interleave(K)``'d rows
  (``flat_mask``: ``m = ids.reshape(-1) == e``);
  ``gathered``: no loop, one row per assignment, ``interleave`` (``x.repeat_interleave(K, dim=0)``:
  row i is token i // K) or ``sorted`` (rows ``x[order // K]``, ``order`` a stable ``argsort`` of
  the expert ids);
  ``slots``: experts on (E, C, d) capacity slots (``GeneratedMoE._slots``): ``expert_choice``
  (each expert takes its top-C tokens, ``g, idx = topk(scores.t(), C)``, C drawn from 1, 2, 3, T
  and T + 2, clipped to T as the source code does; slots ``x[idx]``, or ``expert_choice_flat``:
  ``x[idx.reshape(-1)].view(E, C, d)``) or ``capacity`` (token choice as Switch/GShard write it:
  per choice a one-hot of the top-k ids, ``cumsum`` positions after the earlier choices' counts,
  a ``< C`` keep mask, combine weights by ``einsum("se,sc->sec")``, dispatch ``einsum("sec,sm->ecm",
  combine.bool().type_as(x), x)``); experts ``bmm`` / ``einsum`` / ``matmul`` on stacked (E, out, in)
  weights or one gate|up stack (``bmm_fused``); combine (``SLOT_COMBINES``) for expert choice an
  in-place ``scatter_add_`` / ``index_add_``, out-of-place ``scatter_add`` / ``index_add``, into
  zeros or the base, or into zeros then ``+ base`` (``scatter_add_plus``); for capacity
  ``einsum("sec,ecm->sm")`` or ``combine.view(S, -1) @ y.view(-1, d)``, then ``+ base``; the base
  (a shared projection's output) is drawn half the time, with or without extras;
- experts: ``modulelist`` (a ModuleList of Linears), ``stacked`` (parameters (E, ...) indexed
  ``w[e]`` inside the loop), ``gathered`` (``W[ids]`` + ``bmm``, gate and up separate) or
  ``gathered_fused`` (one gate_up parameter, ``chunk(2)``); gated or plain, with or without biases,
  activation silu / gelu / relu;
- combine: ``index_add`` (``out.index_add_(0, tok, y)``), ``indexed_iadd`` (``out[tok] += y``),
  ``index_put_acc`` (``out.index_put_((tok,), y, accumulate=True)``), ``scatter_add``
  (``out.scatter_add_(0, tok[:, None].expand(-1, d), y)``), ``view_sum``
  (``(y * s).view(T, K, d).sum(1)``);
- scores on the ``output`` or on the ``input`` of the experts;
- router (``ROUTERS``): ``softmax`` (softmax of logits plus a buffer, top-k, renormalised: in
  bf16/fp16 the softmax runs in fp32 and the weights are cast back, as Mixtral does),
  ``sigmoid_bias`` (``sigmoid((gate(x) + bias_buffer).float())``, top-k, ``.to(x.dtype)``: the
  router of issue 22), ``group_limited`` (DeepSeek-V3: sigmoid scores, a correction-bias buffer
  for the selection only, top groups by their two best scores, top-k inside them, weights
  gathered from the unbiased scores, renormalised with an eps, scaled, cast back),
  ``softmax_inplace`` (gpt-fast / vLLM's reference: the renormalisation written in place on the
  top-k values, ``w /= w.sum(-1, keepdim=True)``, declined before issue 18's aliasing fix);
- dtype of the module and its input: float32, bfloat16 or float16;
- ``base``: the combine adds into a shared projection's output instead of zeros (torchtitan's
  shared experts; layouts with an accumulator);
- ``halves`` (with extras): a fused gate|up split by ``chunk``, slices or ``split``, or with the up half
  first (``u, g = h.chunk(2, -1)``: rxlm's GatedLinearUnit, the ``+up_first`` layout);
- ``inplace`` (with extras): the expert's own tensors written in place (an in-place activation,
  the gated product ``h.mul_(up)`` / ``h *= up``), made functional by the normal form;
- ``side_effects``: load statistics written into a buffer under ``no_grad`` (torchtitan's
  ``tokens_per_expert.add_``) and an auxiliary loss from the router probabilities stored as an
  attribute in ``forward`` (Switch / fairseq style), both beside the block.

Near-miss mutations (``MUTATIONS``) change what the block computes; none may be rewritten unless
the fused op expresses the mutated block exactly (``rewrite_allowed``), and whatever the rewrite
does, compiled output and every gradient must equal eager.

This module imports only torch; ``run_case`` (used by tests/test_generated_moe.py and
examples/fuzz_rewrites.py) imports the backend when called.
"""
from __future__ import annotations

import dataclasses
import math
import random
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as Fn

D, N = 8, 6  # hidden, expert width

LAYOUTS = {
    # layout: (dispatches, experts, combines)
    "loop": (("where_eq", "onehot_permute", "arange_eq"), ("modulelist", "stacked"),
             ("index_add", "indexed_iadd", "index_put_acc", "scatter_add")),
    "flat": (("flat_mask",), ("modulelist", "stacked"), ("view_sum", "index_add")),
    "gathered": (("interleave", "sorted"), ("gathered", "gathered_fused"), ("view_sum", "scatter_add", "index_add")),
    # capacity slots (E, C, d): expert-choice gathers (each expert's top-C tokens) or token-choice
    # capacity dispatch einsums; stacked experts on the slots; the combine depends on the dispatch
    # (``SLOT_COMBINES``)
    "slots": (("expert_choice", "expert_choice_flat", "capacity"), ("bmm", "einsum", "matmul", "bmm_fused"),
              ("scatter_add_", "scatter_add", "index_add_", "index_add", "scatter_add_plus", "einsum", "matmul")),
}
#: slots dispatch -> its combines. expert choice: ``acc.scatter_add_(0, idx.reshape(-1, 1).expand(-1, d), y)``
#: in place / ``scatter_add`` out of place / ``index_add_`` / ``index_add``, or ``scatter_add_plus``: into
#: zeros, then ``+ base``; capacity: ``einsum("sec,ecm->sm", combine, y)`` or ``combine.view(S, -1) @
#: y.view(-1, d)`` (nanoMoE), then ``+ base``
SLOT_COMBINES = {"expert_choice": ("scatter_add_", "scatter_add", "index_add_", "index_add", "scatter_add_plus"),
                 "capacity": ("einsum", "matmul")}
SLOT_COMBINES["expert_choice_flat"] = SLOT_COMBINES["expert_choice"]
ACTIVATIONS = {"silu": Fn.silu, "gelu": Fn.gelu, "relu": Fn.relu}
E_CHOICES, T_CHOICES = (1, 2, 3, 5, 8), (1, 2, 3, 7, 13)
ROUTERS = ("softmax", "sigmoid_bias", "group_limited", "softmax_inplace")
INPLACE = ("none", "act_inplace", "mul_", "imul")  # in-place spellings of the expert body (extras)
ACT_CASTS = ("none", "fp32")  # a plain activation as act(h.float()).type_as(h) (drawn with extras)
HALVES = ("chunk", "slice", "split", "up_first")  # spellings of a fused gate|up's halves (drawn with extras)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: per dtype: (atol, rtol) for the elementwise check in fp32, else the largest relative error
#: ||compiled - eager|| / ||eager|| allowed per tensor. bf16 has 8 significand bits (eps 2^-8 =
#: 0.0039) and fp16 11 (eps 2^-11): the fused op accumulates in fp32 where eager rounds per op,
#: so their results differ by a few eps; a lost gradient (zeros) is an error of 1.0.
TOLERANCES = {"float32": (1e-4, 1e-4), "bfloat16": 0.05, "float16": 0.01}
#: unit roundoff of the low-precision dtypes: what a tensor's error may be, relative to the largest
#: tensor of the case, before it says anything (a gradient that cancels below it is noise)
EPS = {"bfloat16": 2.0 ** -8, "float16": 2.0 ** -11}

# near-miss mutation -> the layouts it applies to (``applies`` leaves out the cases it cannot change)
MUTATIONS = {
    "score_twice": ("loop", "flat", "gathered", "slots"),  # s applied on the input and again on the output
    "score_never": ("loop", "flat", "gathered", "slots"),  # the routing weight is never applied
    "missing_expert": ("loop", "flat"),                  # the loop skips expert 0 (the busiest under skew)
    "shared_weights": ("loop", "flat"),                  # expert 1 computes with expert 0's weights
    "combine_index_differs": ("loop", "flat", "gathered", "slots"),  # results land on token (t + 1) % T
    "acc_not_zero": ("loop", "flat", "gathered", "slots"),  # accumulator starts at ones (view_sum: n/a, see applies)
    "acc_read_inside": ("loop", "flat"),                 # the loop reads the accumulator it writes
    "dropout_train": ("loop", "flat", "gathered", "slots"),  # dropout p=0.25 in training between act and down
    "inplace_expert": ("loop", "flat", "gathered", "slots"),  # the pre-activation is scaled in place (mul_)
    "scores_other_tensor": ("loop", "flat", "gathered", "slots"),  # scores from a second router, not the top-k's
    "transform_after_down": ("loop", "flat", "gathered", "slots"),  # tanh on the expert output after W2
    "clamped_ids": ("loop", "flat", "gathered", "slots"),  # ids.clamp(max=E-2): a token may pick one expert twice
    "score_wrong_slot": ("loop", "flat", "gathered", "slots"),  # scores rolled by one slot: w[t, k-1] with expert ids[t, k]
    "gather_k_major": ("flat", "gathered"),              # rows x.repeat(K, 1) (token i % T) for token-major ids
    "where_roles_swapped": ("loop",),                    # torch.where's two outputs read the other way round
    # slots only (see ``GeneratedMoE._slots``): the base added again after the combine (``r + base``,
    # where an in-place combine's ``base`` is the combined tensor itself); a slot dropped from the
    # combine (expert choice: the last slot of every expert not scattered back; capacity: the combine
    # weights of the last slot zeroed after the dispatch mask was taken); capacity off by one (the
    # combine weights computed with capacity C - 1, the dispatch mask with C)
    "base_twice": ("slots",),
    "slot_dropped": ("slots",),
    "capacity_off_by_one": ("slots",),
}

#: near-miss mutations that a recogniser may rewrite, because the mutated block is still exactly
#: what the fused op computes for some assignments, and the op can be given those: scores from
#: another (T, K) table or another slot are other scores (taken from the node the block multiplies
#: by); scores never applied are scores 1; a skipped expert's assignments are dropped ones (expert
#: id -1); two experts with the same weights are two experts; torch.where's outputs read the other
#: way round are assignments (token = slot index) too; clamped ids are assignments that may
#: repeat an expert for a token, which every summing combine adds twice -- but not an indexed
#: ``out[tok] += y``, where a repeated index is written once (last write wins): see
#: ``rewrite_allowed``. Every other mutation is not expressible by the op (f(s x) s, gather and
#: combine at different tokens, a read of the accumulator, randomness, an in-place change or a
#: transform inside the expert; rows gathered k-major for
#: token-major ids, except as noted in ``rewrite_allowed``). Whatever is rewritten, numerics are
#: asserted.
#: An accumulator that starts at ones (``acc_not_zero``) is a base the rows are added into: since
#: issue 18 the rewrite expresses it exactly as ``base + fused op``.
#: Slots: a base added again after the combine is outside the block (the rewrite keeps it); a
#: dropped slot and a capacity off by one between dispatch and combine drop assignments (a slot
#: combined with weight 0 is one the op never computes): all three are the op over some
#: assignments. Since f22b619 the scatter combine into a graph-computed base adds the base back
#: (it was dropped: expert choice into ``shared(x)``, the bug this layout was added to catch).
ALLOWED_NEAR_MISS_REWRITES: set = {"scores_other_tensor", "score_never", "missing_expert", "shared_weights",
                                   "clamped_ids", "score_wrong_slot", "where_roles_swapped", "acc_not_zero",
                                   "base_twice", "slot_dropped", "capacity_off_by_one"}


def rewrite_allowed(spec: "Spec") -> bool:
    """May the rewrite replace this block? (valid blocks; near-misses the op expresses exactly)"""
    if spec.mutation is None:
        return True
    if spec.mutation == "clamped_ids" and spec.combine == "indexed_iadd" and spec.K > 1:
        return False
    if spec.mutation in ("gather_k_major", "combine_index_differs") and spec.combine == "view_sum":
        # rows gathered k-major (x.repeat(K, 1)) or folded k-major (view(K, T, d).sum(0)): the
        # per-row expert outputs are exact when the rewrite takes the (A, d) rows as its tokens
        # (one assignment each) and keeps the model's own fold; a combine straight into tokens
        # mixes two tokens (numerics catch that)
        return True
    return spec.mutation in ALLOWED_NEAR_MISS_REWRITES


#: combinations (layout, dispatch, experts, combine, score_on, bias) that the rewrite replaces
#: for every E, K, T, activation (except a gated relu: the fused op has no ReGLU), gate and skew:
#: asserted by tests/test_generated_moe.py and counted by examples/fuzz_rewrites.py. Each was
#: checked at (gated silu, E=5, K=2, T=7, skewed), (gelu, E=3, K=1, T=1), (gated gelu, E=8, K=3,
#: T=13) on main at 63e4aa2 plus the parts work in progress; extend it as recognisers land. The
#: slots entries: every spelling at (gated silu, E=3, T=7, C=3, K=2 for capacity) with and without a
#: base, and 80 random fp32/bf16/fp16 cases of every router, on h-fz after f22b619.
#: Not yet rewritten (the gaps the fuzz reports): scores on the input of per-expert loops and
#: flat masks, flat masks combined with index_add_ into tokens, gathered layouts with biases, a
#: sorted gathered layout folded back with view_sum, separate gate/up bmm's with a view_sum; slots
#: with the scores on the input (expert choice: ``x[idx] * g``; capacity: the combine weights in the
#: dispatch einsum, the 0/1 mask in the combine), slots experts with a plain activation in fp32.
SUPPORTED = (
    {("loop", d, ex, c, "output", b)  # per-expert loops: where / one-hot / arange mask, Linears or w[e], any combine
     for d in ("where_eq", "onehot_permute", "arange_eq") for ex in ("modulelist", "stacked")
     for c in ("index_add", "indexed_iadd", "index_put_acc", "scatter_add") for b in (False, True)}
    | {("flat", "flat_mask", ex, "view_sum", "output", b)  # DeepSeek training-branch form
       for ex in ("modulelist", "stacked") for b in (False, True)}
    | {("gathered", d, ex, c, so, False)  # W[ids] + bmm rows, into tokens (torchtitan-like when sorted)
       for d in ("interleave", "sorted") for ex in ("gathered", "gathered_fused")
       for c in ("index_add", "scatter_add") for so in ("output", "input")}
    | {("gathered", "interleave", "gathered_fused", "view_sum", "output", False)}  # transformers batched_mm
    | {("slots", d, ex, c, "output", b)  # expert choice / capacity slots, stacked experts, any combine (into a base)
       for d in SLOT_COMBINES for ex in LAYOUTS["slots"][1] for c in SLOT_COMBINES[d] for b in (False, True)}
)


def supported(spec: "Spec") -> bool:
    """Must the rewrite replace this (unmutated) block?"""
    if spec.layout == "slots" and spec.act_cast == "fp32" and not spec.gated and spec.inplace != "act_inplace":
        return False  # slots experts with act(h.float()).type_as(h): not a slots MLP yet (a gap the fuzz reports)
    return spec.mutation is None and spec.combo in SUPPORTED and not (spec.gated and spec.act == "relu")


@dataclasses.dataclass(frozen=True)
class Spec:
    layout: str
    dispatch: str
    experts: str
    combine: str
    score_on: str  # "output" | "input"
    bias: bool
    gated: bool
    act: str
    E: int
    K: int
    T: int
    skew: bool  # router bias that sends most tokens to the first experts (others get none)
    mutation: Optional[str] = None
    seed: int = 0
    router: str = "softmax"
    dtype: str = "float32"
    base: bool = False
    side_effects: bool = False
    #: gathered_fused experts: how h is split into gate and up (``chunk(2, -1)``; ``slice``:
    #: ``h[..., :w // 2]`` / ``h[..., w // 2:]`` as vLLM's reference SiluAndMul; ``split(w // 2, -1)``)
    halves: str = "chunk"
    #: the expert's own tensors written in place (drawn with extras; made functional by
    #: moe_inductor/recognize/normal_form.py): ``none``; ``act_inplace`` (``F.silu/relu(h, inplace=True)``);
    #: ``mul_`` / ``imul``: the gated product ``h.mul_(up)`` / ``h *= up`` (not after relu, whose
    #: backward reads its output: eager itself would fail)
    inplace: str = "none"
    #: a plain (not gated) activation computed in fp32 and rounded back, fairseq's
    #: ``F.gelu(h.float()).type_as(h)`` (drawn with extras): ``none`` or ``fp32``
    act_cast: str = "none"
    #: slots: the capacity C (expert choice: tokens per expert, ``min(C, T)`` at run time; capacity
    #: dispatch: slots per expert); 0 for the other layouts
    capacity: int = 0

    @property
    def combo(self) -> tuple:
        return (self.layout, self.dispatch, self.experts, self.combine, self.score_on, self.bias)

    def describe(self) -> str:
        m = f" MUTATION={self.mutation}" if self.mutation else ""
        return (f"{self.layout}/{self.dispatch}/{self.experts}/{self.combine} score_on={self.score_on} "
                f"bias={self.bias} gated={self.gated} act={self.act} E={self.E} K={self.K} T={self.T} "
                f"skew={self.skew} router={self.router} dtype={self.dtype}"
                + (" base" if self.base else "") + (" side_effects" if self.side_effects else "")
                + (f" inplace={self.inplace}" if self.inplace != "none" else "")
                + (f" act_cast={self.act_cast}" if self.act_cast != "none" else "")
                + (f" C={self.capacity}" if self.layout == "slots" else "") + f" seed={self.seed}{m}")


def applies(mutation: str, layout: str, combine: str, E: int, T: int, K: int = 2, dispatch: str = "",
            C: int = 0) -> bool:
    if layout not in MUTATIONS[mutation]:
        return False
    if layout == "slots" and not _slots_applies(mutation, dispatch, E, T, K, C):
        return False
    if mutation == "acc_not_zero" and combine == "view_sum":
        return False  # every row of the (A, d) buffer is written: its initial value is never read
    if mutation == "combine_index_differs" and T == 1:
        return False  # (t + 1) % 1 == t: no change
    if mutation in ("shared_weights", "acc_read_inside", "missing_expert") and E < 2:
        return False  # one expert: nothing to share, nothing added before it, no expert left
    if mutation == "clamped_ids" and (E < 2 or K < 2):
        return False  # nothing to repeat
    if mutation in ("score_wrong_slot", "gather_k_major") and K < 2:
        return False  # one slot: nothing changes
    if mutation == "gather_k_major" and T == 1:
        return False
    if mutation == "where_roles_swapped" and (K < 2 or T < max(2, K)):
        return False  # K = 1 or T = 1: slot and token indices coincide too often; T < K: x[slot] out of range
    return True


def _slots_applies(mutation: str, dispatch: str, E: int, T: int, K: int, C: int) -> bool:
    """Slots cases a mutation changes (``applies`` checks the rest)."""
    capacity = dispatch == "capacity"
    if mutation in ("clamped_ids", "capacity_off_by_one") and not capacity:
        return False  # expert choice has no token ids, and one capacity (the top-C's)
    if mutation == "slot_dropped":
        return C >= 2 if not capacity else True
    if mutation == "acc_not_zero":
        return not capacity  # the capacity combine is an einsum: no accumulator
    return True


def sample(rng: random.Random, mutation_rate: float = 0.4, seed: int = 0, dtypes: tuple = ("float32",),
           routers: tuple = ("softmax",), extras: bool = False, layouts: Optional[tuple] = None) -> Spec:
    layout = rng.choice(sorted(layouts or LAYOUTS))
    dispatches, experts, combines = LAYOUTS[layout]
    E = rng.choice(E_CHOICES)
    T = rng.choice(T_CHOICES)
    spec = dict(layout=layout, dispatch=rng.choice(dispatches), experts=rng.choice(experts),
                combine=rng.choice(combines), score_on=rng.choice(("output", "input")),
                bias=rng.random() < 0.3, gated=rng.random() < 0.6, act=rng.choice(sorted(ACTIVATIONS)),
                E=E, K=rng.randint(1, min(E, 3)), T=T, skew=rng.random() < 0.3, seed=seed)
    if layout == "slots":
        _sample_slots(rng, spec)
    if rng.random() < mutation_rate:
        options = [m for m in sorted(MUTATIONS) if applies(m, layout, spec["combine"], E, T, spec["K"],
                                                             spec["dispatch"], spec.get("capacity", 0))]
        if options:
            spec["mutation"] = rng.choice(options)
    if spec.get("mutation") == "base_twice":
        spec["base"] = True
    if len(routers) > 1 or routers != ("softmax",):
        spec["router"] = rng.choice(routers)
    if len(dtypes) > 1 or dtypes != ("float32",):
        spec["dtype"] = rng.choice(dtypes)
    if extras:  # issue 18's spellings beside the parts: a base for the combine, side effects
        if layout != "slots":  # (slots draw their base themselves, with or without extras)
            spec["base"] = rng.random() < 0.3
        spec["side_effects"] = rng.random() < 0.3 and layout != "slots"  # (slots: none beside the block)
        spec["halves"] = rng.choice(HALVES)
        spec["inplace"] = rng.choice(INPLACE)
        spec["act_cast"] = rng.choice(ACT_CASTS)
    return Spec(**spec)


def _sample_slots(rng: random.Random, spec: dict) -> None:
    """The slots layout's own draws: the combine of the dispatch, the capacity, a base half the time
    (the combine into a shared projection's output is what f22b619 fixed: drawn without extras)."""
    T, E = spec["T"], spec["E"]
    spec["combine"] = rng.choice(SLOT_COMBINES[spec["dispatch"]])
    if spec["score_on"] == "input" and rng.random() < 0.5:  # a quarter on the input (declined: a gap)
        spec["score_on"] = "output"
    if spec["dispatch"] == "capacity":  # tokens over capacity dropped, a Switch-like factor, none dropped
        spec["capacity"] = rng.choice((1, 2, math.ceil(1.25 * T * spec["K"] / E), T * spec["K"]))
    else:  # expert choice: C tokens per expert, clipped to T as the source would (C = min(C, T))
        spec["K"] = 1
        spec["capacity"] = rng.choice((1, 2, 3, T, T + 2))
    spec["base"] = rng.random() < 0.5


def cases(n: int, seed: int, mutation_rate: float = 0.4, dtypes: tuple = ("float32",),
          routers: tuple = ("softmax",), extras: bool = False, layouts: Optional[tuple] = None) -> list:
    """``n`` random specs; with the default ``dtypes``, ``routers`` and ``extras`` the draws of
    earlier rounds."""
    rng = random.Random(seed)
    return [sample(rng, mutation_rate, seed=seed * 100003 + i, dtypes=dtypes, routers=routers, extras=extras,
                   layouts=layouts) for i in range(n)]


# --------------------------------------------------------------------------- the module

class ExpertMLP(nn.Module):
    def __init__(self, d, n, gated, bias):
        super().__init__()
        self.w1 = nn.Linear(d, n, bias=bias)
        self.w3 = nn.Linear(d, n, bias=bias) if gated else None
        self.w2 = nn.Linear(n, d, bias=bias)


class GeneratedMoE(nn.Module):
    def __init__(self, spec: Spec):
        super().__init__()
        self.spec = s = spec
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            self.gate = nn.Linear(D, s.E, bias=False)
            if s.mutation == "scores_other_tensor":
                self.gate_alt = nn.Linear(D, s.E, bias=False)
            bias = torch.linspace(3.0, -3.0, s.E) if s.skew and s.E > 1 else torch.zeros(s.E)
            self.register_buffer("router_bias", bias)
            if s.router == "group_limited":  # selection-only bias (DeepSeek-V3's e_score_correction_bias)
                self.register_buffer("correction_bias", torch.linspace(-0.1, 0.1, s.E))
            if s.base:
                self.shared = nn.Linear(D, D, bias=False)
            if s.side_effects:
                self.register_buffer("tokens_per_expert", torch.zeros(s.E), persistent=False)
            if s.experts == "modulelist":
                self.experts = nn.ModuleList([ExpertMLP(D, N, s.gated, s.bias) for _ in range(s.E)])
            else:
                self.w1 = nn.Parameter(torch.randn(s.E, N, D) / D ** 0.5)
                self.w2 = nn.Parameter(torch.randn(s.E, D, N) / N ** 0.5)
                self.b1 = nn.Parameter(torch.randn(s.E, N) * 0.1) if s.bias else None
                self.b2 = nn.Parameter(torch.randn(s.E, D) * 0.1) if s.bias else None
                if s.gated:
                    self.w3 = nn.Parameter(torch.randn(s.E, N, D) / D ** 0.5)
                    self.b3 = nn.Parameter(torch.randn(s.E, N) * 0.1) if s.bias else None

    # ---- experts
    def _weights(self, e: int, which: str):
        """(weight, bias) of expert e's projection ``which`` (1: gate/up, 3: up of a gated MLP, 2: down)."""
        if self.spec.mutation == "shared_weights" and e == 1:
            e = 0
        b = getattr(self, f"b{which}")
        return getattr(self, f"w{which}")[e], (b[e] if b is not None else None)

    def _mlp(self, z, lin1, lin3, lin2):
        h = lin1(z)
        if self.spec.mutation == "inplace_expert":
            h.mul_(1.5)  # in place on the pre-activation (nothing saved for backward is written)
        h = self._act(h)
        if self.spec.gated:
            h = self._gate_product(h, lin3(z))
        return self._mlp_tail(h, lin2)

    def _act(self, h):
        if self.spec.act_cast == "fp32" and not self.spec.gated and self.spec.inplace != "act_inplace":
            return ACTIVATIONS[self.spec.act](h.float()).type_as(h)
        if self.spec.inplace == "act_inplace" and self.spec.act in ("silu", "relu"):
            return ACTIVATIONS[self.spec.act](h, inplace=True)
        return ACTIVATIONS[self.spec.act](h)

    def _gate_product(self, a, up):
        if self.spec.act != "relu" and self.spec.inplace == "mul_":
            return a.mul_(up)
        if self.spec.act != "relu" and self.spec.inplace == "imul":
            a *= up
            return a
        return a * up

    def expert(self, e: int, z):
        if self.spec.experts == "modulelist":
            m = self.experts[0 if self.spec.mutation == "shared_weights" and e == 1 else e]
            return self._mlp(z, m.w1, m.w3, m.w2)  # the modules' own calls, as user code writes them
        return self._mlp(z, *[lambda v, w=w: Fn.linear(v, *self._weights(e, w)) for w in ("1", "3", "2")])

    def gathered_experts(self, z, eids):
        """One row per assignment: weights gathered ``W[eids]``, bmm."""
        s = self.spec

        def lin(v, which):
            w = getattr(self, f"w{which}")[eids]
            out = torch.bmm(w, v.unsqueeze(-1)).squeeze(-1)
            b = getattr(self, f"b{which}")
            return out + b[eids] if b is not None else out

        if s.experts == "gathered_fused" and s.gated:
            w13 = torch.cat([self.w1, self.w3], dim=1)  # (E, 2n, d)
            h = torch.bmm(w13[eids], z.unsqueeze(-1)).squeeze(-1)
            if s.bias:
                h = h + torch.cat([self.b1, self.b3], dim=1)[eids]
            if s.mutation == "inplace_expert":
                h.mul_(1.5)
            g, u = self._halves(h)
            return self._mlp_tail(self._gate_product(ACTIVATIONS[s.act](g), u), lambda v: lin(v, "2"))
        return self._mlp(z, lambda v: lin(v, "1"), lambda v: lin(v, "3"), lambda v: lin(v, "2"))

    def _mlp_tail(self, h, lin2):
        s = self.spec
        if s.mutation == "dropout_train":
            h = Fn.dropout(h, p=0.25, training=True)
        y = lin2(h)
        return torch.tanh(y) if s.mutation == "transform_after_down" else y

    # ---- the router
    def route(self, x):
        """(weights (T, K) in x.dtype, ids (T, K)) of the spec's router."""
        s = self.spec
        if s.router == "sigmoid_bias":
            scores = torch.sigmoid((self.gate(x) + self.router_bias).float())
            w, ids = torch.topk(scores, s.K, dim=-1)
            return w.to(x.dtype), ids
        if s.router == "group_limited":
            T = x.shape[0]
            n_group = 2 if s.E % 2 == 0 and s.E >= 4 else 1
            scores = torch.sigmoid((self.gate(x) + self.router_bias).float())
            choice = scores + self.correction_bias.unsqueeze(0)
            per_group = choice.view(T, n_group, -1)
            group_scores = per_group.topk(min(2, per_group.shape[-1]), dim=-1)[0].sum(dim=-1)
            group_idx = torch.topk(group_scores, k=1, dim=-1, sorted=False)[1]
            group_mask = torch.zeros_like(group_scores)
            group_mask.scatter_(1, group_idx, 1)
            score_mask = group_mask.unsqueeze(-1).expand(T, n_group, s.E // n_group).reshape(T, -1)
            masked = choice.masked_fill(~score_mask.bool(), 0.0)
            ids = torch.topk(masked, k=s.K, dim=-1, sorted=False)[1]
            w = scores.gather(1, ids)
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
            return (w * 2.5).to(x.dtype), ids
        if s.router == "softmax_inplace":
            w, ids = torch.topk(Fn.softmax(self.gate(x) + self.router_bias, dim=-1, dtype=torch.float32), s.K, dim=-1)
            w /= w.sum(dim=-1, keepdim=True)
            return w.to(x.dtype), ids
        if x.dtype == torch.float32:  # the fp32 router of earlier rounds, op for op
            probs = Fn.softmax(self.gate(x) + self.router_bias, dim=-1)
            w, ids = torch.topk(probs, s.K, dim=-1)
            return w / w.sum(dim=-1, keepdim=True), ids
        probs = Fn.softmax(self.gate(x) + self.router_bias, dim=-1, dtype=torch.float32)
        w, ids = torch.topk(probs, s.K, dim=-1)
        return (w / w.sum(dim=-1, keepdim=True)).to(x.dtype), ids

    def side_effects(self, x, ids):
        """Beside the block: load statistics into a buffer under no_grad, an aux loss attribute."""
        with torch.no_grad():
            counts = torch.histc(ids.reshape(-1).float(), bins=self.spec.E, min=0, max=self.spec.E)
            self.tokens_per_expert.add_(counts)
        probs = Fn.softmax(self.gate(x).float(), dim=-1)
        self.aux_loss = self.spec.E * (probs.mean(0) * counts / ids.numel()).sum()

    # ---- the block
    def forward(self, x):
        s = self.spec
        T, d = x.shape
        if s.layout == "slots":
            return self._slots(x)
        w, ids = self.route(x)
        if s.side_effects:
            self.side_effects(x, ids)
        if s.mutation == "scores_other_tensor":
            w = torch.topk(Fn.softmax(self.gate_alt(x), dim=-1), s.K, dim=-1)[0]
        if s.mutation == "clamped_ids":
            ids = ids.clamp(max=s.E - 2)
        if s.mutation == "score_wrong_slot":
            w = w.roll(1, dims=-1)
        on_in = s.score_on == "input" or s.mutation == "score_twice"
        on_out = (s.score_on == "output" or s.mutation == "score_twice") and s.mutation != "score_never"
        on_in = on_in and s.mutation != "score_never"
        shift = (lambda t: (t + 1) % T) if s.mutation == "combine_index_differs" else (lambda t: t)
        init = torch.ones_like if s.mutation == "acc_not_zero" else (
            (lambda t: self.shared(x)) if s.base else torch.zeros_like)
        experts = range(1, s.E) if s.mutation == "missing_expert" else range(s.E)

        if s.layout == "loop":
            out = init(x)
            onehot = Fn.one_hot(ids, s.E).permute(2, 1, 0) if s.dispatch == "onehot_permute" else None
            arange_mask = ids.unsqueeze(-1) == torch.arange(s.E, device=x.device) if s.dispatch == "arange_eq" else None
            for e in experts:
                if s.dispatch == "where_eq":
                    tok, k = torch.where(ids == e)
                elif s.dispatch == "arange_eq":
                    tok, k = torch.where(arange_mask[..., e])
                else:
                    k, tok = torch.where(onehot[e])
                if s.mutation == "where_roles_swapped":
                    # slots read as tokens: gathers x[slot], adds at out[slot], score w[token, slot]
                    tok, k = k, tok
                    score = w[k, tok, None]
                else:
                    score = w[tok, k, None]
                z = x[tok]
                if on_in:
                    z = z * score
                y = self.expert(e, z)
                if on_out:
                    y = y * score
                if s.mutation == "acc_read_inside":
                    y = y + 0.5 * out.sum(0)  # what earlier experts added (0 only before the first)
                self._combine(out, shift(tok), y)
            return out

        if s.layout == "flat":
            x_rep = x.repeat(s.K, 1) if s.mutation == "gather_k_major" else x.repeat_interleave(s.K, dim=0)
            flat_ids, flat_w = ids.reshape(-1), w.reshape(-1)
            tok_of_row = torch.arange(T, device=x.device).repeat_interleave(s.K)
            if s.combine == "view_sum":
                buf = torch.zeros_like(x_rep)
                for e in experts:
                    m = flat_ids == e
                    z = x_rep[m]
                    if on_in:
                        z = z * flat_w[m, None]
                    y = self.expert(e, z)
                    if s.mutation == "acc_read_inside":
                        y = y + 0.5 * buf.sum(0)  # (buf[m] itself is still 0: each row is written once)
                    buf[m] = y
                if s.mutation == "combine_index_differs":  # k-major reading of a token-major buffer
                    v, ww = buf.view(s.K, T, d), w.t()
                    return (v * ww.unsqueeze(-1)).sum(0) if on_out else v.sum(0)
                v = buf.view(T, s.K, d)
                return (v * w.unsqueeze(-1)).sum(1) if on_out else v.sum(1)
            out = init(x)
            for e in experts:
                m = flat_ids == e
                z = x_rep[m]
                if on_in:
                    z = z * flat_w[m, None]
                y = self.expert(e, z)
                if on_out:
                    y = y * flat_w[m, None]
                if s.mutation == "acc_read_inside":
                    y = y + 0.5 * out.sum(0)
                out.index_add_(0, shift(tok_of_row[m]), y)
            return out

        # gathered: one row per assignment
        flat_ids, flat_w = ids.reshape(-1), w.reshape(-1)
        tok = torch.arange(T, device=x.device).repeat_interleave(s.K)
        if s.dispatch == "sorted":
            order = torch.argsort(flat_ids, stable=True)
            eids, sw, tok = flat_ids[order], flat_w[order], order // s.K
            z = x[order % T] if s.mutation == "gather_k_major" else x[tok]
        else:
            order, eids, sw = None, flat_ids, flat_w
            z = x.repeat(s.K, 1) if s.mutation == "gather_k_major" else x.repeat_interleave(s.K, dim=0)
        if on_in:
            z = z * sw.unsqueeze(-1)
        y = self.gathered_experts(z, eids)
        if on_out:
            y = y * sw.unsqueeze(-1)
        if s.combine == "view_sum":
            if order is not None:
                unsorted = torch.zeros_like(y)
                unsorted[order] = y
                y = unsorted
            if s.mutation == "combine_index_differs":
                return y.view(s.K, T, d).sum(0)
            return y.view(T, s.K, d).sum(1)
        out = init(x)
        tok = shift(tok)
        if s.combine == "scatter_add":
            return out.scatter_add_(0, tok.unsqueeze(-1).expand(-1, d), y)
        return out.index_add_(0, tok, y)

    # ---- the slots layout: experts on (E, C, d) capacity slots
    def _slots(self, x):
        s = self.spec
        on_in = (s.score_on == "input" or s.mutation == "score_twice") and s.mutation != "score_never"
        on_out = (s.score_on == "output" or s.mutation == "score_twice") and s.mutation != "score_never"
        base = self.shared(x) if s.base else None
        if s.dispatch == "capacity":
            out = self._capacity(x, on_in, on_out)
            out = out if base is None else base + out
        else:
            out = self._expert_choice(x, on_in, on_out, base)
        return out + base if s.mutation == "base_twice" else out

    def _slot_experts(self, z):
        """Stacked experts on all slots: ``bmm(z, W.transpose(1, 2))``, ``einsum("ecd,efd->ecf", z, W)``,
        ``z @ W.transpose(-2, -1)`` with W (E, out, in), or one gate|up stack (``bmm_fused``, split by
        ``halves``); biases (E, 1, out)."""
        s = self.spec

        def lin(v, which, w=None, b=None):
            w = getattr(self, f"w{which}") if w is None else w
            b = (getattr(self, f"b{which}") if s.bias else None) if b is None else b
            if s.experts == "einsum":
                h = torch.einsum("ecd,efd->ecf", v, w)
            elif s.experts == "matmul":
                h = v @ w.transpose(-2, -1)
            else:
                h = torch.bmm(v, w.transpose(1, 2))
            return h if b is None else h + b.unsqueeze(1)

        if s.experts == "bmm_fused" and s.gated:
            b13 = torch.cat([self.b1, self.b3], dim=1) if s.bias else None
            h = lin(z, "13", torch.cat([self.w1, self.w3], dim=1), b13)
            if s.mutation == "inplace_expert":
                h.mul_(1.5)
            g, u = self._halves(h)
            return self._mlp_tail(self._gate_product(ACTIVATIONS[s.act](g), u), lambda v: lin(v, "2"))
        return self._mlp(z, lambda v: lin(v, "1"), lambda v: lin(v, "3"), lambda v: lin(v, "2"))

    def _halves(self, h):
        half = h.shape[-1] // 2
        if self.spec.halves == "slice":
            return h[..., :half], h[..., half:]
        if self.spec.halves == "split":
            return h.split(half, dim=-1)
        if self.spec.halves == "up_first":  # the activation on the second half
            u, g = h.chunk(2, dim=-1)
            return g, u
        return h.chunk(2, dim=-1)

    def _expert_choice(self, x, on_in, on_out, base):
        """Each expert takes its top-C tokens by score (Zhou et al. 2022): ``topk(scores.t(), C)``,
        slots ``x[idx]`` (``expert_choice_flat``: ``x[idx.reshape(-1)].view(E, C, d)``), outputs added
        back to their tokens into zeros or the base (``SLOT_COMBINES``)."""
        s, (T, d) = self.spec, x.shape
        C = min(s.capacity, T)
        logits = (self.gate_alt if s.mutation == "scores_other_tensor" else self.gate)(x) + self.router_bias
        if s.router == "sigmoid_bias":
            scores = torch.sigmoid(logits.float()).to(x.dtype)
        else:
            scores = Fn.softmax(logits, dim=-1, dtype=torch.float32).to(x.dtype)
        g, idx = torch.topk(scores.t(), C, dim=-1)  # (E, C)
        if s.mutation == "scores_other_tensor":  # the slots of the first router, the gates of the second
            idx = torch.topk(Fn.softmax(self.gate(x) + self.router_bias, dim=-1).t(), C, dim=-1)[1]
        z = x[idx] if s.dispatch == "expert_choice" else x[idx.reshape(-1)].view(s.E, C, d)
        if on_in:
            z = z * g.unsqueeze(-1)
        y = self._slot_experts(z)
        if on_out:
            y = y * g.unsqueeze(-1)
        back = (idx + 1) % T if s.mutation == "combine_index_differs" else idx
        if s.mutation == "slot_dropped":
            back, y = back[:, :-1], y[:, :-1]
        return self._scatter_back(x, back, y.reshape(-1, d), base)

    def _scatter_back(self, x, back, rows, base):
        s, d = self.spec, x.shape[1]
        c = s.combine
        if s.mutation == "acc_not_zero":
            acc = torch.ones_like(x)
        elif base is not None and c != "scatter_add_plus":
            acc = base
        else:
            acc = torch.zeros_like(x) if c in ("scatter_add_", "index_add_") else x.new_zeros(x.shape)
        if c.startswith("scatter"):
            index = back.reshape(-1, 1).expand(-1, d)
            out = acc.scatter_add(0, index, rows) if c == "scatter_add" else acc.scatter_add_(0, index, rows)
        else:
            out = acc.index_add(0, back.reshape(-1), rows) if c == "index_add" else acc.index_add_(0, back.reshape(-1), rows)
        return out + base if c == "scatter_add_plus" and base is not None else out

    def _capacity(self, x, on_in, on_out):
        """Token-choice capacity slots as Switch / GShard write them: per choice k, a one-hot of the
        top-k ids, positions by ``cumsum`` after the earlier choices' counts, ``< C`` keep mask; combine
        weights (S, E, C) by ``einsum("se,sc->sec")``; dispatch ``einsum("sec,sm->ecm", combine.bool())``;
        combine ``einsum("sec,ecm->sm")`` or ``combine.view(S, -1) @ y.view(-1, d)``."""
        s, (T, d) = self.spec, x.shape
        w, ids = self.route(x)
        if s.mutation == "scores_other_tensor":
            w = torch.topk(Fn.softmax(self.gate_alt(x), dim=-1), s.K, dim=-1)[0].to(x.dtype)
        if s.mutation == "clamped_ids":
            ids = ids.clamp(max=s.E - 2)
        if s.mutation == "score_wrong_slot":
            w = w.roll(1, dims=-1)
        C = s.capacity
        combine = self._capacity_weights(w, ids, C, C)
        dispatch = combine.bool().type_as(x)
        if s.mutation == "capacity_off_by_one":  # the dispatch keeps C per expert, the combine C - 1
            combine = self._capacity_weights(w, ids, C - 1, C)
        if s.mutation == "slot_dropped":  # the last slot's weights zeroed after the dispatch mask was taken
            combine = combine * (torch.arange(C, device=x.device) < C - 1).to(combine.dtype)
        if s.mutation == "score_never":
            combine = dispatch
        z = torch.einsum("sec,sm->ecm", combine.type_as(x) if on_in else dispatch, x)
        y = self._slot_experts(z)
        cw = (combine if on_out or s.mutation == "score_never" else dispatch).type_as(x)
        if s.mutation == "combine_index_differs":  # token t reads the slots of token t - 1
            cw = cw.roll(1, dims=0)
        if s.combine == "matmul":
            return cw.view(T, -1) @ y.view(-1, d)
        return torch.einsum("sec,ecm->sm", cw, y)

    def _capacity_weights(self, w, ids, C, width):
        """(S, E, width) combine weights of the top-k choices with capacity C (GShard's order: choice
        k's positions after every earlier choice's tokens)."""
        E, combine, before = self.spec.E, None, None
        for k in range(ids.shape[1]):
            mask = Fn.one_hot(ids[:, k], num_classes=E)
            loc = torch.cumsum(mask, dim=0) - 1
            if before is not None:
                loc = loc + before
            kept = mask * torch.lt(loc, C)
            slot = torch.sum(loc * kept, dim=1)
            gate = w[:, k].unsqueeze(1) * kept.to(w.dtype)
            term = torch.einsum("se,sc->sec", gate, Fn.one_hot(slot, num_classes=width).to(w.dtype))
            combine = term if combine is None else combine + term
            counts = mask.sum(dim=0, keepdim=True)
            before = counts if before is None else before + counts
        return combine

    def _combine(self, out, tok, y):
        c = self.spec.combine
        if c == "index_add":
            out.index_add_(0, tok, y)
        elif c == "indexed_iadd":
            out[tok] += y
        elif c == "index_put_acc":
            out.index_put_((tok,), y, accumulate=True)
        else:
            out.scatter_add_(0, tok.unsqueeze(-1).expand(-1, y.shape[-1]), y)


def inputs(spec: Spec) -> torch.Tensor:
    g = torch.Generator().manual_seed(spec.seed + 1)
    return torch.randn(spec.T, D, generator=g).to(DTYPES[spec.dtype])


def build(spec: Spec) -> "GeneratedMoE":
    """The spec's module in its dtype (buffers too: ``.to`` casts them, as a user's ``.to`` does)."""
    return GeneratedMoE(spec).to(DTYPES[spec.dtype])


# --------------------------------------------------------------------------- running a case

@dataclasses.dataclass
class Outcome:
    spec: Spec
    rewritten: int
    declined: list  # reasons
    numerics_ok: bool
    error: str = ""  # mismatch or exception text
    runs_on: list = dataclasses.field(default_factory=list)  # of each rewritten block (report.runs_on)

    @property
    def wrong_rewrite(self) -> bool:
        return self.rewritten > 0 and not self.numerics_ok

    @property
    def near_miss_rewritten(self) -> bool:
        return self.spec.mutation is not None and self.rewritten > 0 and not rewrite_allowed(self.spec)

    def as_dict(self) -> dict:
        return dict(spec=dataclasses.asdict(self.spec), combo=list(self.spec.combo), rewritten=self.rewritten,
                    declined=self.declined, numerics_ok=self.numerics_ok, error=self.error[:2000],
                    wrong_rewrite=self.wrong_rewrite, near_miss_rewritten=self.near_miss_rewritten,
                    runs_on=list(self.runs_on))


def _fwd_bwd(fn, module, x, rng_seed):
    xi = x.detach().clone().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    torch.manual_seed(rng_seed)  # dropout draws the same numbers in eager and in the captured graph
    out = fn(xi)
    out.float().pow(2).sum().backward()
    grads = [(n, p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in module.named_parameters()]
    return out.detach(), grads + [("x", xi.grad if xi.grad is not None else torch.zeros_like(xi))]


def compare(name: str, got: torch.Tensor, want: torch.Tensor, tol) -> str:
    """'' if ``got`` matches ``want``, else why not. ``tol``: (atol, rtol) for an elementwise check,
    or a number: the largest relative error ||got - want|| / ||want|| (``TOLERANCES``)."""
    if isinstance(tol, tuple):
        try:
            torch.testing.assert_close(got, want, atol=tol[0], rtol=tol[1])
        except AssertionError as e:
            return f"{name}: {e}"
        return ""
    g, w = got.double(), want.double()
    if not torch.isfinite(g).all():
        return f"{name}: non-finite values"
    scale, err = w.norm().item(), (g - w).norm().item()
    # an absolute floor: a gradient that is 0 in exact arithmetic (renormalised weights with K = 1
    # are identically 1) comes out of eager as rounding noise (~1e-7) and of the fused op as 0
    if err > max(tol * scale, 1e-4):
        return (f"{name}: relative error {err / max(scale, 1e-30):.3g} > {tol} "
                f"(|eager| = {scale:.4g}, |compiled| = {g.norm().item():.4g})")
    return ""


def _fwd_only(fn, module, x, rng_seed):
    """Inference: the output under no_grad (where ``moe_inductor.lower.worth`` may choose the gathered
    decomposition instead of the fused op); no gradients."""
    torch.manual_seed(rng_seed)
    with torch.no_grad():
        return fn(x.detach().clone()).detach(), []


def run_case(spec: Spec, atol: Optional[float] = None, rtol: Optional[float] = None, backend: str = "light",
             inference: bool = False) -> Outcome:
    """Eager vs the sonic rewrite, output and every gradient; what was rewritten and declined.

    ``backend="light"``: ``rewrite_moe``, then the rewritten graph runs eagerly (fast; the rewrite
    alone). ``backend="sonic"``: the whole backend, Inductor included (slower; what users run:
    issue 22's zero gradient happened only there). ``atol``/``rtol`` override fp32's tolerance.
    ``inference``: both run under no_grad and only the outputs are compared."""
    run = _fwd_only if inference else _fwd_bwd
    import contextlib

    from torch._dynamo.utils import counters

    from rewrite_check import light_backend

    reports: list = []
    light = light_backend(reports)

    torch._dynamo.reset()
    counters.clear()
    module = build(spec)
    x = inputs(spec)
    ref_out, ref_grads = run(module, module, x, spec.seed)
    truth = _fp32_truth(spec, x, run) if spec.dtype != "float32" else None
    error, ok = "", True
    tol = TOLERANCES[spec.dtype]
    if spec.dtype == "float32" and (atol is not None or rtol is not None):
        tol = (atol if atol is not None else tol[0], rtol if rtol is not None else tol[1])
    try:
        if backend == "sonic":
            from moe_inductor.diagnostics.report import capture_reports

            listening = capture_reports()
            # fallback_random: dropout (a near miss) draws eager's numbers under Inductor too
            compiled = torch.compile(module, backend="sonic", fullgraph=True,
                                     options={"inductor": {"fallback_random": True}})
        else:
            listening = contextlib.nullcontext([])
            compiled = torch.compile(module, backend=light, fullgraph=True)
        with listening as captured:
            out, grads = run(compiled, module, x, spec.seed)
        reports.extend(captured)
        pairs = [(("output", out), ("output", ref_out))] + list(zip(grads, ref_grads))
        for i, ((name, g), (_, r)) in enumerate(pairs):
            why = compare(name, g, r, tol)
            if why and truth is not None:
                why = _worse_than_eager(name, g, r, truth[i], truth, spec.dtype)
            if why:
                ok, error = False, why
                break
    except Exception as e:  # a compile error is a finding too, never a silent pass
        ok, error = False, f"{type(e).__name__}: {e}"
    cands = [c for r in reports for c in r.candidates]
    return Outcome(spec, rewritten=sum(c.status == "rewritten" for c in cands),
                   declined=[f"{c.idiom}: {c.reason}" for c in cands if c.status != "rewritten"],
                   numerics_ok=ok, error=error,
                   runs_on=[c.runs_on for c in cands if c.status == "rewritten"])



def run_plain_inductor(spec: Spec) -> None:
    """Forward and backward of the spec's module under plain Inductor (no sonic): the fuzz runs it
    when a sonic case crashes its process, to tell an Inductor crash from one of the rewrite's."""
    torch._dynamo.reset()
    module, x = build(spec), inputs(spec)
    compiled = torch.compile(module, backend="inductor", fullgraph=True, options={"fallback_random": True})
    _fwd_bwd(compiled, module, x, spec.seed)


def _fp32_truth(spec: Spec, x, run=_fwd_bwd) -> list:
    """Output and gradients of the same module (its low-precision weights upcast) on the same
    input in fp32, eager: the reference a bf16/fp16 result is measured against when it differs from
    eager in its own dtype (eager rounds per op, the fused op accumulates in fp32: either may be
    the closer one)."""
    m32 = build(spec).float()  # the same seeded weights, rounded to the dtype, then upcast
    out, grads = run(m32, m32, x.float(), spec.seed)
    return [out] + [g for _, g in grads]


def _worse_than_eager(name, got, want, truth, all_truth, dtype) -> str:
    """'' unless ``got`` is further from the fp32 truth than eager's ``want`` is (by more than 2x)
    and than the dtype's roundoff of the case's largest tensor; else why."""
    g, w, t = got.double(), want.double(), truth.double()
    if not torch.isfinite(w).all() and torch.isfinite(t).all():
        # eager itself overflows in its dtype (fp16 gradients past 65504 where fp32 has them finite):
        # nothing in that dtype to compare with; fp32 cases check the rewrite's arithmetic
        return ""
    scale = max(v.double().norm().item() for v in all_truth)
    err_got, err_eager = (g - t).norm().item(), (w - t).norm().item()
    if err_got <= max(2 * err_eager, EPS[dtype] * scale, 1e-4):
        return ""
    return (f"{name}: {err_got:.3g} from the fp32 result, eager in {dtype} {err_eager:.3g} "
            f"(|fp32| = {t.norm().item():.4g}, |compiled| = {g.norm().item():.4g}, largest tensor {scale:.4g})")
