"""What an MoE block computes, in parts, and the registries of the recognisers of each part.

An MoE block computes ``out[t] = sum over assignments (t, e, s) of s * f_e(x[t])`` with ``f_e`` an
expert MLP. Code spells it in three parts, each in many ways:

- **dispatch**: which (token, expert) assignments exist and with which score: a top-k table and
  ``torch.where(ids == e)``, one-hot masks, boolean masks over tokens or over replicated
  assignment rows, sort permutations with counts, capacity slots, expert-choice indices;
- **experts**: ``f_e``: Linears of a ModuleList under any names, fused gate/up weights, stacked
  parameters indexed per expert, batched GEMMs over expert batches;
- **combine**: how each expert's weighted output reaches its tokens: ``index_add_``, an indexed
  ``+=``, ``index_put_(accumulate=True)``, ``scatter_add_``, a masked assignment, a weighted
  ``view(T, K, d).sum(1)`` ...

A recogniser of one part maps one spelling to the part's canonical description below
(``Selection``, ``ExpertMLP``, ``Write``, ``Score``); a composition (``patterns/per_expert.py``) asks the
registries for the parts of a candidate, proves once that they fit together (the same
assignments, the same rows gathered and written, scores applied exactly once, nothing else
touching the intermediates: ``moe_inductor/fx/safety.py``) and describes the block as a
``moe_inductor.lower.rewrite.MoEBlock`` for ``emit_fused_moe``. A new spelling costs one recogniser
registered here (``register``), not a new idiom.

A recogniser returns None when the node is not its spelling at all, and raises ``PartDeclined``
when it is its spelling but something is not provable (the reason reaches ``explain``, naming
the part).
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Any, Callable, Optional

import torch
import torch.fx as fx

from moe_inductor.fx.build import call, method
from moe_inductor.fx.decline import Declined, PartDeclined  # noqa: F401  (PartDeclined: read as parts.PartDeclined)
from moe_inductor.fx.nodes import module_path_of
from moe_inductor.fx.shapes import example_value

PARTS = ("dispatch", "experts", "combine", "scores", "gather",
         # an expert that returns its input rows (LongCat-Flash's zero-computation experts): patterns/experts.py
         "identity_experts",
         # experts on an (E, C, d) tensor of slots: patterns/expert_slots.py
         "slots_dispatch", "slots_experts", "slots_combine",
         # experts on a flat tensor of assignment rows: patterns/assignment_rows.py
         "rows_dispatch", "rows_experts", "rows_combine")


def decline(part: str, reason: str):
    raise PartDeclined(part, reason)


# --------------------------------------------------------------------------- canonical descriptions

@dataclasses.dataclass
class Selection:
    """Dispatch, per expert: the rows expert ``expert`` takes.

    ``layout``:
      - "pairs": ``(token, k) = where(ids == e)`` over a (T, K) table ``routing`` of expert ids
        (``token``/``k`` are the two index nodes; ``routing_kind`` "ids" or "onehot_mask" for a
        (T, K, E) mask with at most one nonzero per row);
      - "rows": a boolean mask ``mask`` (R,) over the rows of x (or an index computed from one:
        ``where(mask)[0]``, ``mask.nonzero()``): expert e takes the rows where it is true.
    ``index`` is what x and the output are indexed with for this expert (compared with
    ``safety.equivalent``). ``unique``: no row is selected twice by this expert. ``disjoint_key``:
    selections with the same key never share a row (``v == e`` for one tensor v and distinct e).
    ``value``/``value_e``: for ``v == e`` masks, the tensor v and e (assignment ids then are v).
    ``covers``: ``v`` provably takes only values in [0, E) (top-k indices over E columns).
    ``capacity``: for "rows", only the first ``capacity`` rows of the mask (in row order) are
    taken (``m.nonzero().squeeze(-1)[:c]``, c an int or a graph node holding a SymInt, provably
    >= 0); ``mask`` is then the mask before that cut, and the rows taken are ``mask & (cumsum(mask)
    <= capacity)``."""

    expert: int
    layout: str
    index: Any
    routing: Optional[fx.Node] = None
    routing_kind: str = "ids"
    token: Optional[fx.Node] = None
    k: Optional[fx.Node] = None
    mask: Optional[fx.Node] = None
    unique: bool = True
    disjoint_key: Any = None
    value: Optional[fx.Node] = None
    num_classes: Optional[int] = None
    nodes: list = dataclasses.field(default_factory=list)
    spelling: str = ""
    capacity: Any = None


@dataclasses.dataclass
class ExpertMLP:
    """Experts, one expert: ``output = down(act(gate(input)) [* up(input)])`` with weights in
    Linear layout (out, in) and optional biases; ``gemm`` is the GEMM the code calls (its autocast
    rule is the fused op's). A weight is a graph node or a ``LowRankWeight`` (a merged weight the
    composition builds with ``weight_node``)."""

    input: fx.Node
    output: fx.Node
    activation: str
    gate: fx.Node
    down: fx.Node
    up: Optional[fx.Node] = None
    b_gate: Optional[fx.Node] = None
    b_up: Optional[fx.Node] = None
    b_down: Optional[fx.Node] = None
    gemm: str = "aten::linear"
    spelling: str = ""
    #: names among gate/up/down stored (in, out) and used as ``z @ W``: the composition transposes them
    transposed: set = dataclasses.field(default_factory=set)
    #: the fused gate/up weight ``gate`` holds gate and up columns interleaved ([..., ::2] / [..., 1::2],
    #: GPT-OSS's layout) rather than one half after the other
    interleaved: bool = False
    #: the (rows, 1) factor the hidden rows are multiplied by before the down projection (Megatron-Core's
    #: ``per_token_scale``: the router's probabilities): the output is ``row_scale * down(...)`` up to
    #: rounding (no down bias). Only ``patterns.experts.mlp_scaled`` fills it, for callers that take the
    #: scores from there; every other recogniser declines such an expert
    row_scale: Optional[fx.Node] = None

    def weights(self) -> tuple:
        return (self.gate, self.up, self.down, self.b_gate, self.b_up, self.b_down)


@dataclasses.dataclass(frozen=True)
class LowRankWeight:
    """An expert projection's weight that the graph never forms: ``W + scale * (B @ A)``, read from a
    linear spelled as a base linear plus a scaled low-rank product, ``W x + s * B(A x)`` (LoRA:
    ``patterns.experts.low_rank``). ``base`` is W in the layout its projection uses (the projection's
    ``transposed`` says which), ``a`` (r, in) and ``b`` (out, r) in Linear layout unless ``a_t`` /
    ``b_t`` (stored transposed). It stands in an ``ExpertMLP`` where a weight node stands, with W's
    shape, dtype and device (``shaped_like``: ``fx.shapes`` reads it), and ``build`` emits the merged
    weight in the graph, differentiably: autograd of the merge gives W, A and B their gradients (bf16 /
    fp16 weights are merged in fp32 and rounded once, so are the gradients of A and B).
    ``at``: the add that computes the adapted projection (the emitted nodes take its source line)."""

    base: fx.Node
    a: fx.Node
    b: fx.Node
    scale: float
    base_t: bool = False
    a_t: bool = False
    b_t: bool = False
    at: Optional[fx.Node] = dataclasses.field(default=None, compare=False)

    @property
    def shaped_like(self) -> fx.Node:
        return self.base

    @property
    def name(self) -> str:
        return f"{self.base.name} + {self.scale!r} * {self.b.name} @ {self.a.name}"

    def nodes(self) -> tuple:
        return self.base, self.a, self.b

    def build(self, graph: fx.Graph, like: Optional[fx.Node] = None) -> fx.Node:
        like = like if like is not None else self.at
        dtype = example_value(self.base).dtype
        wide = dtype in (torch.bfloat16, torch.float16)  # merged in fp32, rounded once to W's dtype

        def lin(w, t):
            w = method(graph, "float", w, like=like) if wide else w
            return method(graph, "t", w, like=like) if t else w

        ba = call(graph, torch.mm, lin(self.b, self.b_t), lin(self.a, self.a_t), like=like)
        if self.base_t:
            ba = method(graph, "t", ba, like=like)
        if self.scale != 1.0:
            ba = call(graph, operator.mul, ba, self.scale, like=like)
        merged = call(graph, operator.add, lin(self.base, False), ba, like=like)
        return method(graph, "to", merged, dtype, like=like) if wide else merged


def weight_node(graph: fx.Graph, w, like: Optional[fx.Node] = None):
    """The graph node of an expert weight (or bias) of an ``ExpertMLP``: the node itself, None, or the
    merged weight of a ``LowRankWeight``, built before the graph's insertion point."""
    return w.build(graph, like) if isinstance(w, LowRankWeight) else w


def weight_nodes(ws) -> list:
    """The graph nodes the expert weights ``ws`` read (a ``LowRankWeight``: W, A and B), Nones left out."""
    out = []
    for w in ws:
        out += list(w.nodes()) if isinstance(w, LowRankWeight) else [w] if w is not None else []
    return out


@dataclasses.dataclass
class IdentityExpert:
    """Experts, one expert that computes nothing: ``output`` is its input rows ``input`` (a gather
    ``x[index]``; LongCat-Flash's "zero experts", ``nn.Identity``). Kept apart from ``ExpertMLP``
    (its own part, ``identity_experts``): only a composition that adds the identity experts'
    contribution itself asks for it."""

    input: fx.Node
    output: fx.Node
    spelling: str = ""


@dataclasses.dataclass
class Write:
    """Combine, per expert: ``value`` reaches the rows ``index`` of ``acc``.

    ``kind``: "add" (accumulates) or "assign" (overwrites). ``duplicates_add``: duplicate indices
    accumulate (``index_add_``, ``index_put_(accumulate=True)``, ``scatter_add_``), unlike a
    ``getitem``/``+``/``setitem`` read-modify-write, where the last duplicate wins. ``nodes`` are the
    graph nodes of the write (erased with the block); ``anchor`` the node that completes it."""

    kind: str
    acc: fx.Node
    index: Any
    value: fx.Node
    anchor: fx.Node
    nodes: list
    duplicates_add: bool
    spelling: str = ""


@dataclasses.dataclass
class Score:
    """Scores, per expert: ``node`` reads the score of each selected row from ``source``: at the
    (token, k) pairs of the selection (``layout`` "pairs", source (T, K)) or at its rows (``layout``
    "rows", source (R,) or (R, 1)). ``on``: "output" (``s * f(x)``) or "input" (``f(s * x)``)."""

    source: fx.Node
    layout: str
    index: Any
    node: fx.Node
    on: str = "output"
    spelling: str = ""
    #: the score is column ``column`` of ``source`` ((R, E) table read as ``source[mask, column]``)
    column: Optional[int] = None


# --------------------------------------------------------------------------- registries

@dataclasses.dataclass
class Recogniser:
    part: str
    name: str
    fn: Callable
    source: str = ""


REGISTRY: dict = {p: [] for p in PARTS}


def register(part: str, name: str, source: str = ""):
    """Decorator: add ``fn`` to the recognisers of ``part`` (tried in registration order)."""
    assert part in REGISTRY, part

    def wrap(fn):
        REGISTRY[part].append(Recogniser(part, name, fn, source))
        return fn

    return wrap


def recognise(part: str, *args, required: Optional[str] = None):
    """The first recogniser of ``part`` that accepts ``args``: its result (with ``spelling`` set
    to the recogniser's name), else None; with ``required`` (what was expected, in words), a
    ``PartDeclined`` naming the part instead of None. A recogniser's own ``PartDeclined`` is
    raised when no later recogniser accepts."""
    first_decline = None
    for r in REGISTRY[part]:
        try:
            got = r.fn(*args)
        except Declined as e:
            first_decline = first_decline or (e if isinstance(e, PartDeclined) else PartDeclined(part, str(e)))
            continue
        if got is not None:
            if hasattr(got, "spelling") and not got.spelling:
                got.spelling = r.name
            return got
    if first_decline is not None:
        raise first_decline
    if required is not None:
        raise PartDeclined(part, f"{required} not recognised")
    return None


def spellings() -> dict:
    """{part: [(name, source), ...]}: what the registered recognisers understand (README, explain)."""
    return {p: [(r.name, r.source) for r in rs] for p, rs in REGISTRY.items()}


def census(gm) -> dict:
    """{module path: {part: {spelling: count}}} of the experts and combine parts the registries
    recognise in ``gm``, node by node (for ``explain``: which parts of an MoE block that was not
    rewritten were found, and so which one was not). Never raises."""
    from collections import Counter

    out: dict = {}
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method"):
            continue
        for part in ("experts", "combine"):
            try:
                got = recognise(part, node)
            except Exception:
                got = None
            if got is not None:
                path = module_path_of(node, depth_from_leaf=1 if part == "experts" else 0)
                out.setdefault(path, {}).setdefault(part, Counter())[got.spelling or part] += 1
    return out
