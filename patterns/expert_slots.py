"""Composition: MoE blocks whose experts run on *slots*, an (E, C, d) tensor of capacity-padded
expert batches (expert e's batch is row e; C slots per expert).

Shape legend: S tokens (T), d hidden, n expert width, E experts, C slots per expert (capacity),
K choices per token (terms of a capacity dispatch), R = E * C slots.

Parts (recognisers registered in ``moe_inductor.recognize.parts``):

``slots_dispatch`` fills the slots:
  ``capacity_einsum``  GShard/Switch capacity dispatch (fairseq/fairscale ``top1gating``/``top2gating``,
                       DeepSpeed ``sharded_moe``): ``einsum("sec,sm->ecm", combine.bool().type_as(x), x)``
                       where ``combine`` (S, E, C) is a sum of terms, one per choice k::

                           combine_k = W_k[s, e] * one_hot(idx_k, E)[s, e] * caps_k[s, e] * one_hot(L_k, C)[s, c]
                           loc_k = cumsum(one_hot(idx_k, E), dim=0) - 1
                                   + sum_{j<k} one_hot(idx_j, E).sum(0, keepdim=True)
                           L_k = (loc_k * Q_k).sum(1)    (Q_k: 0/1 factors of the term, one_hot(idx_k) among them)

                       spelled with ``einsum("se,sc->sec", ...)`` outer products, ``bmm(a.unsqueeze(-1),
                       b.unsqueeze(1))`` (a contraction over one term: the product, fairseq) or broadcast
                       multiplies of unsqueezed factors, any casts of 0/1 masks; one-hots by ``one_hot`` or
                       ones scattered into zeros at ``i.unsqueeze(-1)`` or at an (S, 1) column
                       (``argmax(..., keepdim=True)``, fairseq); caps are any 0/1 factors
                       (``lt(loc, C)``: tokens over capacity dropped; DeepSpeed top-1's keep mask, ones
                       scattered once into fresh zeros, ``zeros_like(m).scatter_(0, top_idx, 1)``); the
                       dispatch tensor is the nonzero pattern (``bool()``, ``!= 0``) cast to any dtype
                       (``type_as``, ``to``, ``float``: 0/1 is exact in each); the cumsum may count a 0/1 mask
                       (the one-hot times flags the term is also multiplied by); in-place ``+=``, ``*=``,
                       ``/=`` on routing tensors (DeepSpeed) are read as values when nothing reads the
                       old value after the write (``inplace_as``). Stacked choices (nanoMoE): the K
                       choices on their own axis, ``combine = sum(P, 0)`` over a (K, S, E, C) product,
                       positions by one cumsum over the flattened (choice, token) rows, dispatch
                       ``combine.bool().permute(1, 2, 0) @ x``. fairseq: ``torch.mm(d.permute(1, 2, 0)
                       .view(E * C, S), x)``, the slots as (E * C, d) rows, row e * C + c slot (e, c)
                       (the row-major merge of the (E, C) axes; the experts read them regrouped row-major,
                       a (E, C, d) view or fairscale's chunks, so the same row is the same slot).
                       OpenMoE (``HFOpenMoeTop2Router``): the combine weights and the dispatch mask each
                       written term by term into zeros, ``cw[i, ids_k[i], L_k[i]] += W_k[i, ids_k[i]]`` and
                       ``mask[i, ids_k[i], L_k[i]] |= F_k.bool()[i, ids_k[i]]`` with i = ``arange(S)``
                       (``_indexed_writes``: each write places term k at (s, ids_k[s], L_k[s]) for every token
                       once, nothing reads the tensor before its last write); the terms are those above
                       (W_k's factors: the one-hot of ids_k, flags, weights; L_k proven as above) and the
                       mask's terms must place the tokens at the same (expert, slot) under the same flags as
                       the weights' (``_with_combine_weights``), so the mask is the weights' nonzero pattern
                       up to a zero weight (the slot then holds its token and gets weight 0: exact).
                       Per group (GShard's group axis, lucidrains' ``MoE``): ``einsum("bnd,bnec->ebcd", x,
                       combine.bool().to(x))`` read by the experts as ``.reshape(E, -1, d)`` and combined by
                       ``einsum("ebcd,bnec->bnd", y.reshape(E, G, C, d), combine)``: the terms over (g, s, e, c),
                       positions counted over the tokens of each group (``cumsum(B, 1) - 1 +
                       B_j.sum(1, keepdim=True)``); slots of different groups are different slots (e, g, c), so
                       this is flat capacity over G * C slots per expert where token (g, s) takes only slots of
                       group g; the fused op reads the tokens as G * S rows. lucidrains' ``Top2Gating``
                       spells the rest: positions by an exclusive cumsum ``F.pad(B, (0, 0, 1, 0)).cumsum(-2)
                       [..., :-1, :]`` (cumsum(B) - B, i.e. cumsum - 1 on B's tokens, ``_exclusive_cumsum``),
                       per-token flags ``M.sum(-1)`` of 0/1 masks with a one-hot over the experts (0/1, and M
                       itself where the term has that one-hot: ``_row_sum_mask``), the second choice after
                       the counts of the kept first choices ``B * (pos < C)`` (``_covers_kept``: the first
                       term capped by the same C keeps only positions below that count), and slots by
                       ``L.unsqueeze(-1) == arange(C)`` (a zero row, not an error, for L >= C: accepted only
                       for a term capped by ``v < C`` on its own positions, ``_need_capped``).
  ``gathered_rows``    expert-choice routing: ``x[idx]`` with an (E, C) table of token ids (``topk(scores.T, C)``
                       indices, or any other), also ``x[idx.reshape(-1)].view(E, C, d)``.
  ``dense_scores``     every token in every expert's slots (C = S), inputs scaled by a dense (S, E) score matrix
                       (transformers 5.x Llama4 ``Llama4TextMoe``)::

                           v, idx = topk(logits, K, dim=1)
                           R = sigmoid(full_like(logits, -inf).scatter_(1, idx, v))    (or zeros.scatter_(1, idx, v))
                           slots = (x.repeat(E, 1) * R.transpose(0, 1).reshape(-1, 1)).view(E, -1, d)

                       slot (e, s) holds x[s] * R[s, e]; proven here: R is exactly 0 off the top-k (sigmoid(-inf)
                       or 0 scattered over by the top-k values at the top-k indices, nothing else writing R or
                       what it is computed from). Meta's Llama 4 ``moe.py`` spells the same dispatch::

                           R_T = sigmoid(full_like(logits, -inf).scatter_(1, idx, v).transpose(0, 1))   (E, S)
                           I = arange(S).view(1, -1).expand(E, -1)
                           rows = gather(x, 0, I.reshape(-1, 1).expand(-1, d))       (= x.repeat(E, 1))
                           slots = (rows * R_T.reshape(-1, 1)).detach().view(E, -1, d)
                           out = shared(x); out.scatter_add_(0, I.reshape(-1, 1).expand(-1, d), y.view(-1, d))

                       (``_replicated_rows``, ``_expert_major_column``; the ``.detach()`` is kept on the emitted
                       rows; the scatter adds slot (e, s) to token s, the sum over the experts, ``_token_scatter``).
``slots_experts``: ``bmm_mlp``: one MLP on all slots with stacked weights: ``bmm(z, W)`` / ``z @ W`` /
  ``einsum("ecm,emh->ech", z, W)`` with W (E, in, out), or W (E, out, in) transposed/contracted on its
  last axis; optional (E, 1, out) biases; gated (``chunk(2, -1)`` of one projection, or two projections)
  or plain activations. ``chunked_mlps``: one ModuleList MLP per chunk of the slots (fairscale), or per
  slice ``z[e]`` put back by ``.unsqueeze(0)`` before the ``cat`` (ColossalAI's ``MLPExperts``; layout steps
  that only move size-1 axes, ``_order_step``, are followed on both sides), also
  behind a row flatten of the chunk and the unflatten of its output (fairseq's ``x.reshape(-1, d)`` ...
  ``.view(x_shape)``: same last dimension, the output back in the chunk's leading shape; the MLP is
  row-wise, so each row lands where it came from).
``slots_combine``:
  ``combine_einsum``   ``einsum("sec,ecm->sm", combine.type_as(x), y)``
  ``combine_matmul``   ``combine.view(S, -1) @ y.view(-1, d)`` (nanoMoE), ``.mm(...)`` (fairseq): columns
                       e * C + c of the weights meet rows e * C + c of the outputs (both row-major merges);
                       y may be (1, E, C, d) or any layout that only adds or moves size-1 axes of the (E, C, d)
                       outputs (ColossalAI's ``transpose(0, 1).contiguous()``, ``_slots_behind``)
  ``scatter_slots``    ``zeros.scatter_add_(0, idx.reshape(-1, 1).expand(-1, d), (y * g[..., None]).reshape(-1, d))``,
                       ``index_add_(0, idx.reshape(-1), ...)`` (in place or not), score g (E, C) optional.
  ``expert_sum``       ``y.view(-1, d).reshape(E, -1, d).sum(0)`` (Llama4; ``.sum(dim=0)``): each slot's outputs
                       summed over the experts, after row-major reshapes that give back y's (E, C, d) layout.

Proof (``analyse``), which declines naming the part or the proof:
  * capacity: the dispatch mask is the nonzero pattern of the very combine weights the output uses,
    nothing written into it (or the casts between) before the dispatch reads it;
    each term is zero outside column ``idx_k[s]`` and slot ``L_k[s]``; within a term the slot
    positions of expert e are a cumsum of a 0/1 column that is 1 at every token choosing e, so
    they are distinct; term k's positions start after the counts of terms 0..k-1, so terms never
    share a slot. Hence every slot holds at most one token, every (token, expert, slot) has at
    most one nonzero term, and a slot that holds no token has combine weight 0 for every token:
    ``out[s] = sum_k W_k[s, idx_k[s]] * f_{idx_k[s]}(x[s])`` over the kept choices (caps 1), which
    is the fused op over assignments (s, idx_k[s], W_k gathered at idx_k[s]), expert -1 where a
    cap is 0 (dropped: the token keeps 0 from that choice, as in the original).
  * expert choice: the rows gathered for the experts and the rows written back are the same (E, C)
    table, flattened the same way: assignments are (idx[e, c], e, g[e, c]); a token taken by
    several experts gets the sum, a token taken by none keeps the accumulator's start (zeros, or a
    copy of a tensor that is added back).
  * dense: slot (e, s) holds x[s] * R[s, e] and the output is sum_e f_e(x[s] * R[s, e]). Off the top-k
    R[s, e] == 0 exactly, so those pairs compute f_e(0), which is exactly 0 when the experts have no
    biases and act(0) == 0 (or a gated act(gate) * up, up(0) == 0): dropping them is exact. The block
    is the fused op over the S*K pre-scaled rows ``x[s] * R[s, idx[s, k]]`` (scores on the inputs,
    as Llama4 applies them), each with score 1, expert ``idx[s, k]``, and each token's K rows summed:
    K/E of the GEMM work, an (S*K, d) copy of the inputs instead of (E*S, d). The scores are read
    from R with ``gather``, so their gradient flows through the graph's own router code.
  * scores applied once (the combine weights, or g on the output; scaled expert inputs are declined,
    except the dense dispatch's, which the emitted rows carry);
    nothing random or in place on the experts' path; nothing used by the block written in place.

Limit: a kept capacity choice whose gate is exactly 0 (an underflowed softmax) has an empty slot in
the original, so its gate's gradient there is <dO, f_e(0)>; the fused op gives <dO, f_e(x[s])>.
"""
from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn.functional as Fn

from moe_inductor.fx.targets import ONE_HOT_FUNCTIONS
from moe_inductor.fx import safety
from moe_inductor.fx.build import call, method
from moe_inductor.fx.decline import Declined, need
from moe_inductor.fx.matching import einsum_parts, transpose_of
from moe_inductor.fx.nodes import arg, is_mutation, node_order
from moe_inductor.fx.shapes import dtype_of, example_value, int_value, same, shape_of
from moe_inductor.recognize.parts import ExpertMLP, PartDeclined, decline, recognise, register, weight_node, weight_nodes
from moe_inductor.lower.rewrite import ExpertWeights, MoEBlock

from . import experts as _experts_part
from .common import GATED_OF

IDIOM = "expert_slots"
_line_of = _experts_part._line_of

_EINSUM = (torch.einsum, torch.functional.einsum)
_ONE_HOT = ONE_HOT_FUNCTIONS
_MUL = (operator.mul, torch.mul)
_ADD = (operator.add, torch.add)
_COMPARE = {operator.lt, operator.le, operator.gt, operator.ge, operator.eq, operator.ne, torch.lt, torch.le,
            torch.gt, torch.ge, torch.eq, torch.ne, torch.logical_and, torch.logical_not}
_COMPARE_METHODS = {"lt", "le", "gt", "ge", "eq", "ne", "__lt__", "__le__", "__gt__", "__ge__", "__eq__", "__ne__",
                    "logical_and", "logical_not", "bool"}


# --------------------------------------------------------------------------- canonical descriptions

@dataclasses.dataclass
class SlotTerm:
    """One choice of a capacity dispatch: token s goes to expert ``choice[s]`` at slot ``L[s]``
    with weight ``prod(weights)`` gathered at (s, choice[s]), kept where every 0/1 ``flags``
    factor is nonzero there. Factors are (node or number, labels): per dim the axis ("s", "e", and
    "k" for a stacked term of K choices) or None for a dim of size 1."""

    choice: fx.Node
    weights: list
    flags: list
    slot: fx.Node
    offsets: list  # 0/1 masks whose column counts offset this term's positions
    choice_labels: tuple = ("s",)  # axes of ``choice``: ("s",), or ("s", "k") / ("k", "s") for a stacked term
    width: Any = 1  # choices in the term: 1, or K for a stacked term


@dataclasses.dataclass
class SlotsDispatch:
    """How the (E, C, d) slots are filled from tokens ``x`` (S, d). ``kind`` "capacity":
    ``combine_weights`` (S, E, C) whose nonzeros dispatch, decomposed into ``terms``; "gathered":
    ``index`` (E, C) token ids, slot (e, c) holds x[index[e, c]]; "dense": C = S, slot (e, s) holds
    ``x[s] * scores[s, e]`` with ``scores`` (S, E) exactly 0 off ``choices`` (S, K) int64, the
    top-``top_k`` indices; ``writes`` are the in-place writes the recogniser proved are the
    dispatch's own (the top-k ``scatter_`` into the score matrix); ``inputs`` the values its proof
    starts from (the router logits), whatever they hold: the composition's check that nothing the
    block reads is written in place stops there (besides ``x``)."""

    kind: str
    x: fx.Node
    slots: fx.Node
    num_experts: int
    combine_weights: Optional[fx.Node] = None
    terms: list = dataclasses.field(default_factory=list)
    index: Optional[fx.Node] = None
    nodes: list = dataclasses.field(default_factory=list)  # read by indexed writes (``_written_nodes``)
    scores: Optional[fx.Node] = None
    choices: Optional[fx.Node] = None
    top_k: Optional[int] = None
    writes: list = dataclasses.field(default_factory=list)
    inputs: list = dataclasses.field(default_factory=list)
    spelling: str = ""
    groups: Optional[fx.Node] = None  # capacity per group: the (E, G, C, d) slots (``_grouped_capacity``)
    #: dense: ``scores`` is (E, S), expert-major (sigmoid of the transposed scattered matrix)
    scores_expert_major: bool = False
    #: dense: the scaled rows are ``.detach()``-ed before the experts (no gradient to the tokens or the
    #: scores through them; the emitted rows are detached too)
    detached: bool = False


@dataclasses.dataclass
class SlotsCombine:
    """How the experts' slot outputs ``experts_out`` (E, C, d) reach the tokens. ``kind`` "einsum":
    ``out = einsum("sec,ecm->sm", weights, experts_out)``; "scatter": slot (e, c) is added to row
    ``index[e, c]`` of ``acc`` times ``score[e, c]`` (None: 1); ``inplace``: the write mutates acc;
    "sum": ``out[c] = sum_e experts_out[e, c]`` (slot c of every expert is token c)."""

    kind: str
    anchor: fx.Node
    experts_out: fx.Node
    weights: Optional[fx.Node] = None
    index: Optional[fx.Node] = None
    score: Optional[fx.Node] = None
    acc: Optional[fx.Node] = None
    inplace: bool = False
    dtype: Optional[torch.dtype] = None  # einsum: the dtype the weights are used in
    spelling: str = ""
    groups: bool = False  # einsum("ebcd,bnec->bnd"): (E, G, C, d) outputs, (G, S, E, C) weights


# --------------------------------------------------------------------------- small helpers



def _is_integral(node) -> bool:
    dt = dtype_of(node)
    return dt is not None and (dt == torch.bool or not (dt.is_floating_point or dt.is_complex))


def _strip_exact_casts(node):
    """Follow casts whose input is a bool/integer tensor (0/1 masks, slot positions: exact in any
    float dtype used here) and identities back to the producer."""
    while isinstance(node, fx.Node):
        inner = safety.strip_identity(node)
        if inner is not node:
            node = inner
            continue
        outer = safety.strip_casts(node)
        int_cast = node.op == "call_method" and node.target in ("long", "int", "short") and len(node.args) == 1
        if (outer is not node or int_cast) and node.op == "call_method" and _is_integral(node.args[0]):
            node = node.args[0]
            continue
        return node
    return node


@dataclasses.dataclass(frozen=True)
class _ReshapedIds:
    """The ids of ``one_hot(ids, E).view(L + (E,))`` (``reshape`` too): a row-major reshape that keeps
    the class axis last only regroups whole one-hot rows, so it is ``one_hot(ids.reshape(L), E)``
    (nanoMoE: ``F.one_hot(top_k_indices, E).view(B * T, K, E)`` of (B, T, K) ids). ``view`` is the
    reshape, whose leading sizes the ids take when the composition reads them."""

    ids: fx.Node
    view: fx.Node


def _reshaped_one_hot(node) -> Optional[tuple]:
    """(_ReshapedIds, num_classes) of a reshape of a one-hot that keeps its last (class) axis."""
    if not (isinstance(node, fx.Node) and node.op == "call_method" and node.target in ("view", "reshape")
            and isinstance(node.args[0], fx.Node)):
        return None
    oh = _one_hot(node.args[0], reshaped=False)
    ns, ss = shape_of(node), shape_of(node.args[0])
    if oh is None or ns is None or ss is None or len(ns) < 2 or not same(ns[-1], ss[-1]):
        return None
    return _ReshapedIds(oh[0], node), oh[1]


def _materialise_ids(graph, ids, like):
    """The ids as a node: ``_ReshapedIds`` reshaped to its view's leading sizes (constants, and -1
    for at most one symbolic size; ``size()`` of the view otherwise)."""
    if not isinstance(ids, _ReshapedIds):
        return ids
    lead = shape_of(ids.view)[:-1]
    sizes = [int_value(s) for s in lead]
    if sizes.count(None) == 1:
        sizes = [-1 if s is None else s for s in sizes]
    elif None in sizes:
        sizes = [method(graph, "size", ids.view, i, like=like) for i in range(len(lead))]
    return method(graph, "reshape", ids.ids, *sizes, like=like)


_ZEROS_F = (torch.zeros, torch.zeros_like)


def _last_axis_column(index) -> Optional[fx.Node]:
    """i if ``index`` is ``i.unsqueeze(-1)`` or ``i[..., None]`` (one column of positions per row)."""
    if not isinstance(index, fx.Node):
        return None
    if index.op == "call_method" and index.target == "unsqueeze" and len(index.args) == 2 and \
            isinstance(index.args[0], fx.Node) and index.args[1] in (-1, len(shape_of(index.args[0]) or ())):
        return index.args[0]
    if index.op == "call_function" and index.target is operator.getitem and index.args[1] in (
            (Ellipsis, None),) and isinstance(index.args[0], fx.Node):
        return index.args[0]
    return None


def _scattered_one_hot(node, column: bool = False) -> Optional[tuple]:
    """(index, num_classes) of ``ret = zeros(i.shape + (n,)); ret.scatter_(-1, i.unsqueeze(-1), 1)``
    (fairscale's ``one_hot``, ``torch.zeros_like``/``new_zeros`` too): the scatter writes 1 at column
    i[r] of each row r of zeros, which is ``one_hot(i, n)``; it is the tensor's first write and comes
    before every read (``_initialised``), so every reader sees the one-hot. With ``column``, also of an
    index that is a column already, (..., 1) (fairseq: ``argmax(g, dim=1, keepdim=True)``): the one-hot
    of its values, index ``_ReshapedIds(column, ret)`` (the column read in ret's leading shape)."""
    if not (isinstance(node, fx.Node) and ((node.op == "call_function" and node.target in _ZEROS_F)
                                           or (node.op == "call_method" and node.target == "new_zeros"))):
        return None
    writes = safety.writes_to(node)
    w = writes[0] if writes else None
    if w is None or not (w.op == "call_method" and w.target == "scatter_" and w.args[0] is node) or \
            set(w.kwargs) - {"dim", "index", "value"} or len(w.args) + len(w.kwargs) != 4:
        return None
    dim, index, value = arg(w, 1, "dim"), arg(w, 2, "index"), arg(w, 3, "value")
    s, i = shape_of(node), _last_axis_column(index)
    ids = i
    if i is None and column and isinstance(index, fx.Node) and _size_one((shape_of(index) or [None])[-1]):
        i, ids = index, _ReshapedIds(index, node)  # its trailing unit axis dropped below
    si = shape_of(i)
    if ids is not i and si is not None:
        si = si[:-1]
    if s is None or dim not in (-1, len(s) - 1) or type(value) not in (int, float) or value != 1 or \
            si is None or not _is_integral(i) or dtype_of(i) == torch.bool or len(si) != len(s) - 1 \
            or not all(same(p, q) for p, q in zip(si, s[:-1])):
        return None
    if not _initialised(w, node_order(node.graph)):
        return None
    return ids, s[-1]


def _one_hot(node, reshaped: bool = True) -> Optional[tuple]:
    """(index, num_classes) of ``one_hot(index, num_classes)``; with ``reshaped``, also of a reshape of
    one keeping its class axis (the index is then a ``_ReshapedIds``)."""
    node = _strip_exact_casts(node)
    if reshaped and _reshaped_one_hot(node) is not None:
        return _reshaped_one_hot(node)
    if _scattered_one_hot(node, column=reshaped) is not None:
        return _scattered_one_hot(node, column=reshaped)
    if isinstance(node, fx.Node) and node.op == "call_function" and node.target in _ONE_HOT:
        idx, n = arg(node, 0, "tensor", arg(node, 0, "input")), arg(node, 1, "num_classes", -1)
        # num_classes: a constant, or a size computed from T (capacity factor * T / E)
        if isinstance(idx, fx.Node) and (isinstance(n, fx.Node) or (int_value(n) is not None and int_value(n) > 0)):
            return idx, n
    return None


def _scattered_ones(node) -> bool:
    """``node`` is ``z`` or ``z.scatter_(dim, index, 1)`` for a fresh zeros tensor ``z`` that this
    scatter is the only write into, before every read (``_initialised``): zeros with ones written at
    some places, 0/1 whatever the index (DeepSpeed ``top1gating``'s random token selection:
    ``zeros_like(mask1).scatter_(0, top_idx, 1)``, the C kept rows of each expert)."""
    z = node.args[0] if node.op == "call_method" and node.target == "scatter_" and node.args else node
    if not (isinstance(z, fx.Node) and ((z.op == "call_function" and z.target in _ZEROS_F)
                                        or (z.op == "call_method" and z.target == "new_zeros"))):
        return False
    writes = safety.writes_to(z)
    if len(writes) != 1 or (node is not z and writes[0] is not node):
        return False
    w = writes[0]
    if not (w.op == "call_method" and w.target == "scatter_" and w.args[0] is z) or \
            set(w.kwargs) - {"dim", "index", "value"} or len(w.args) + len(w.kwargs) != 4:
        return False
    value = arg(w, 3, "value")
    return type(value) in (int, float, bool) and value in (0, 1) and _initialised(w, node_order(z.graph))


def _is_flag(node) -> bool:
    """A 0/1-valued tensor: a one-hot, a comparison, a bool tensor, ones scattered into zeros or their
    products."""
    node = _strip_exact_casts(node)
    if not isinstance(node, fx.Node):
        return False
    if dtype_of(node) == torch.bool or _one_hot(node) is not None or _scattered_ones(node):
        return True
    if node.op == "call_function" and node.target in _COMPARE:
        return True
    if node.op == "call_method" and node.target in _COMPARE_METHODS:
        return True
    if (node.op == "call_function" and node.target in _MUL and len(node.args) == 2) or inplace_as(node) == "mul":
        return all(isinstance(a, fx.Node) and _is_flag(a) for a in node.args)
    return _row_sum_mask(node) is not None


def _row_sum_mask(node) -> Optional[list]:
    """The factors of M, labelled ("a0", ..., "e"), when ``node`` is ``M.sum(-1)`` of a 0/1 product M
    with a one-hot over its last axis among its factors (lucidrains' ``mask_1.sum(dim=-1)``): at most
    one term of the sum is nonzero, so the row sum is 0/1, M at the one-hot's column; else None."""
    rank = len(shape_of(node) or ()) if isinstance(node, fx.Node) else 0
    M = _reduce(node, "sum", (-1, rank), keepdim=False) if rank else None
    if M is None or len(shape_of(M) or ()) != rank + 1:
        return None
    mask = _mask(M, tuple(f"a{i}" for i in range(rank)) + ("e",))
    return mask if mask is not None and _choice_of(mask) is not None else None


def _size_one(v) -> bool:
    return int_value(v) == 1


def _operand_axes(operand, result, axes) -> tuple:
    """Axes (labels or None for broadcast) of a broadcast operand of ``result`` labelled ``axes``."""
    so, sr = shape_of(operand), shape_of(result)
    if so is None or sr is None or len(so) > len(sr):
        raise PartDeclined("slots_dispatch", f"{getattr(operand, 'name', operand)}: shape unknown or larger than "
                                             "the product's")
    out = []
    for i, size in enumerate(so):
        j = len(sr) - len(so) + i
        if same(size, sr[j]):
            out.append(axes[j])
        elif _size_one(size):
            out.append(None)
        else:
            raise PartDeclined("slots_dispatch", f"{operand.name}: does not broadcast against {result.name}")
    return tuple(out)


_INPLACE_OPS = {operator.iadd: "add", operator.isub: "sub", operator.imul: "mul", operator.itruediv: "div",
                "add_": "add", "sub_": "sub", "mul_": "mul", "div_": "div"}


def _precedes(a: fx.Node, b: fx.Node) -> bool:
    n = a.next
    while n is not b and n.op != "root":
        n = n.next
    return n is b


def inplace_as(node) -> Optional[str]:
    """"add"/"sub"/"mul"/"div" for ``a += b`` (``a.add_(b)`` ...) that may be read as the value
    ``a + b``: every reader of a and of the tensors sharing its memory (views, bases) runs before the
    write, so nothing sees the old value afterwards (DeepSpeed's ``locations2 += counts``,
    ``mask1 *= lt(locations1, C)``, ``gates1_s /= denom_s``; nanoMoE's ``exp_mask *= lt(rank, C)`` on
    a permuted one-hot)."""
    if not (isinstance(node, fx.Node) and len(node.args) == 2 and not node.kwargs):
        return None
    kind = _INPLACE_OPS.get(node.target) if node.op in ("call_function", "call_method") else None
    if kind is None or (node.op == "call_method") != isinstance(node.target, str):
        return None
    a = node.args[0]
    if not isinstance(a, fx.Node):
        return None
    for n in safety.aliases(a):
        if n.op not in ("call_function", "call_method"):
            return None
        if any(u is not node and not _precedes(u, node) for u in n.users):
            return None
    return kind


def _unit_contraction(node) -> Optional[tuple]:
    """(a, b) of ``bmm(a, b)`` (``matmul``, ``@``) with a (B, n, 1) and b (B, 1, m) of the same batch B:
    a contraction over one term, out[i, j, k] = a[i, j, 0] * b[i, 0, k], the broadcast product
    ``a * b`` (fairseq's ``bmm(gates.unsqueeze(-1), locations_sc.unsqueeze(1))``); the one product is
    rounded once either way."""
    if not (isinstance(node, fx.Node) and node.op in ("call_function", "call_method") and len(node.args) == 2
            and not node.kwargs and node.target in (torch.bmm, "bmm", torch.matmul, operator.matmul, "matmul",
                                                     "__matmul__")):
        return None
    a, b = node.args
    sa, sb = shape_of(a), shape_of(b)
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node) and sa is not None and sb is not None
            and len(sa) == 3 and len(sb) == 3 and same(sa[0], sb[0]) and _size_one(sa[2]) and _size_one(sb[1])):
        return None
    return a, b


def _without_ellipsis(node) -> Optional[tuple]:
    """The index of ``t[index]`` (a tuple) with an ``...`` spelled out as the ``slice(None)``s it
    stands for (``g[..., None, None]``: unsqueezes after t's axes), else None."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target is operator.getitem
            and isinstance(node.args[1], tuple)):
        return None
    index = node.args[1]
    if Ellipsis not in index:
        return index
    st = shape_of(node.args[0])
    if st is None or index.count(Ellipsis) != 1:
        return None
    i, rest = index.index(Ellipsis), len([p for p in index if p is not None and p is not Ellipsis])
    if rest > len(st):
        return None
    return index[:i] + (slice(None),) * (len(st) - rest) + index[i + 1:]


def _product(node, axes: tuple, out: list) -> None:
    """Flatten a product of broadcast factors (``*``, ``unsqueeze``, outer-product einsums, exact
    casts) into ``out``: (leaf node or number, its axes)."""
    if not isinstance(node, fx.Node):
        out.append((node, ()))
        return
    inner = _strip_exact_casts(node)
    if inner is not node and same_rank(inner, node):
        return _product(inner, axes, out)
    # ``a *= b`` is read as a * b only for a 0/1 b: the composition reads the factor a where the block
    # was, after the write, so it gets a * b there and a * b * b == a * b needs b in {0, 1}; a weight
    # multiplied in place is one factor (the written value)
    if (node.op == "call_function" and node.target in _MUL and len(node.args) == 2 and not node.kwargs) or \
            (inplace_as(node) == "mul" and isinstance(node.args[1], fx.Node) and _is_flag(node.args[1])):
        for a in node.args:
            _product(a, _operand_axes(a, node, axes) if isinstance(a, fx.Node) else (), out)
        return
    if node.op == "call_method" and node.target == "unsqueeze" and len(node.args) == 2:
        dim = node.args[1] % len(axes)
        if axes[dim] is None or _size_one((shape_of(node) or [None] * len(axes))[dim]):
            return _product(node.args[0], axes[:dim] + axes[dim + 1:], out)
    if node.op == "call_method" and node.target == "permute" and len(node.args) >= 2:
        dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) else node.args[1:]
        if sorted(d % len(axes) for d in dims) == list(range(len(axes))):
            inner_axes = [None] * len(axes)
            for i, d in enumerate(dims):
                inner_axes[d % len(axes)] = axes[i]
            return _product(node.args[0], tuple(inner_axes), out)
    index = _without_ellipsis(node)
    if index is not None and all(p is None or p == slice(None) for p in index) and len(index) <= len(axes):
        kept, i = [], 0  # t[None, :]: unsqueezes
        for p in index:
            if p is None:
                if axes[i] is not None and not _size_one(shape_of(node)[i]):
                    break
            else:
                kept.append(axes[i])
            i += 1
        else:
            return _product(node.args[0], tuple(kept) + tuple(axes[i:]), out)
    unit = _unit_contraction(node)
    if unit is not None and len(axes) == 3:
        a, b = unit
        _product(a, (axes[0], axes[1], None), out)
        _product(b, (axes[0], None, axes[2]), out)
        return
    es = einsum_parts(node)
    if es is not None:
        ins, outl, ops = es
        letters = dict(zip(outl, axes))
        if len(set(outl)) == len(outl) and all(set(i) <= set(outl) and len(set(i)) == len(i) for i in ins):
            for lt, op in zip(ins, ops):
                _product(op, tuple(letters[c] for c in lt), out)
            return
    out.append((node, axes))


def same_rank(a, b) -> bool:
    sa, sb = shape_of(a), shape_of(b)
    return sa is not None and sb is not None and len(sa) == len(sb)


def _signed_sum(node, sign: int, out: list) -> None:
    """Flatten ``a + b - c ...`` into (sign, term) pairs."""
    kind = inplace_as(node)
    if kind in ("add", "sub"):
        _signed_sum(node.args[0], sign, out)
        _signed_sum(node.args[1], sign if kind == "add" else -sign, out)
        return
    if isinstance(node, fx.Node) and node.op == "call_function" and not node.kwargs and len(node.args) == 2:
        if node.target in _ADD:
            _signed_sum(node.args[0], sign, out)
            _signed_sum(node.args[1], sign, out)
            return
        if node.target in (operator.sub, torch.sub):
            _signed_sum(node.args[0], sign, out)
            _signed_sum(node.args[1], -sign, out)
            return
    if isinstance(node, fx.Node) and node.op == "call_method" and node.target in ("add", "sub") and \
            len(node.args) == 2 and not node.kwargs:
        _signed_sum(node.args[0], sign, out)
        _signed_sum(node.args[1], sign if node.target == "add" else -sign, out)
        return
    out.append((sign, node))


def _reduce(node, fn_name: str, dims: tuple, keepdim: Optional[bool] = None) -> Optional[fx.Node]:
    """The input of ``torch.<fn>(t, dim)`` / ``t.<fn>(dim)`` over one of ``dims``, else None."""
    if not isinstance(node, fx.Node):
        return None
    fn = getattr(torch, fn_name)
    if not ((node.op == "call_function" and node.target is fn)
            or (node.op == "call_method" and node.target == fn_name)):
        return None
    dim = arg(node, 1, "dim")
    if isinstance(dim, (tuple, list)) and len(dim) == 1:
        dim = dim[0]
    if dim not in dims:
        return None
    if keepdim is not None and bool(arg(node, 2, "keepdim", False)) != keepdim:
        return None
    extra = set(node.kwargs) - {"dim", "keepdim", "dtype"}
    return node.args[0] if not extra and isinstance(node.args[0], fx.Node) else None


def _same_choice(a, b) -> bool:
    if isinstance(a, _ReshapedIds) or isinstance(b, _ReshapedIds):
        return isinstance(a, _ReshapedIds) and isinstance(b, _ReshapedIds) and safety.equivalent(a.ids, b.ids) \
            and safety.same_shape(a.view, b.view)
    return safety.equivalent(a, b)


# --------------------------------------------------------------------------- slots_dispatch: capacity

def _varies(f, labels) -> set:
    """The axes a factor varies along: its labelled dims of size > 1."""
    shape = shape_of(f) if isinstance(f, fx.Node) else None
    return {a for a, n in zip(labels, shape or ()) if a is not None and not _size_one(n)}


def _factors(node, axes) -> list:
    """``_product`` with each leaf as (leaf with exact casts stripped, labels): per dim the axis it
    runs along, None where it is broadcast."""
    out: list = []
    _product(node, axes, out)
    return [(_strip_exact_casts(f), a) if isinstance(f, fx.Node) else (f, ()) for f, a in out]


def _mask(node, axes) -> Optional[list]:
    """The 0/1 factors of a product of flags, as (leaf, labels), else None."""
    try:
        factors = _factors(node, axes)
    except PartDeclined:
        return None
    if factors and all(isinstance(f, fx.Node) and _is_flag(f) for f, _ in factors):
        return factors
    return None


def _choice_of(mask: list) -> Optional[tuple]:
    """(ids, labels of ids) of the one-hot over experts among the factors (all one-hots over experts
    of one ids), else None."""
    found = [(_one_hot(f)[0], lab[:-1]) for f, lab in mask if _one_hot(f) is not None and lab and lab[-1] == "e"]
    if found and all(_same_choice(i, found[0][0]) and lab == found[0][1] for i, lab in found):
        return found[0]
    return None


def _same_ids(a: Optional[tuple], b: Optional[tuple]) -> bool:
    return a is not None and b is not None and _same_choice(a[0], b[0]) and a[1] == b[1]


def _within(mask: list, factors: list) -> bool:
    """Every factor of ``mask`` is one of ``factors`` (same value, same axes): where all of
    ``factors`` are 1, mask is 1."""
    return all(any(safety.equivalent(f, g) and lf == lg for g, lg in factors) for f, lf in mask)


@dataclasses.dataclass
class _Positions:
    choice: tuple  # (ids, labels): the experts whose one-hot the cumsum counts
    counted: list  # 0/1 factors of the cumsum's mask (that one-hot among them)
    offsets: list  # 0/1 factor lists: their column counts are added
    #: (node, labels) equal to the slot index at the term's chosen expert wherever the term is nonzero
    values: list = dataclasses.field(default_factory=list)


def _counts_of(t, grouped: bool) -> Optional[fx.Node]:
    """The mask whose column counts ``t`` is: (1, E) or (E,), broadcast over the tokens, the axis of the
    tokens as 0 or as -2 of the (S, E) mask; grouped, (G, 1, E) (``keepdim``), each group's counts."""
    if grouped:
        counted = _reduce(t, "sum", (1, -2), keepdim=True)
        return counted if len(shape_of(counted) or ()) == 3 else None
    counted = _reduce(t, "sum", (0, -2))
    if counted is not None and len(shape_of(counted) or ()) != 2 and arg(t, 1, "dim") not in (0, (0,), [0]):
        return None
    return counted


def _positions(loc, axes: tuple) -> _Positions:
    """``loc = cumsum(B, 0) - 1 + sum_j B_j.sum(0, keepdim=True)`` for 0/1 masks B (the one-hot of the
    chosen experts, possibly times capacity flags) and B_j, over axes (s, e) (or (g, s, e): along axis 1,
    per group); or, over (k, s, e), ``cumsum(B.reshape(K * S, E), 0) - 1`` reshaped back (nanoMoE)."""
    loc, grouped = _strip_exact_casts(loc), axes == ("g", "s", "e")
    stacked, outer = len(axes) == 3 and not grouped, loc
    need(grouped or axes in (("s", "e"), ("k", "s", "e"), ("s", "k", "e")),
         f"slot positions {loc.name} are not counted over the tokens for each expert (axes {axes})",
         part="slots_dispatch")
    if stacked:
        flat = loc.args[0] if loc.op == "call_method" and loc.target in ("reshape", "view") else None
        fs, ls = shape_of(flat), shape_of(loc)
        need(fs is not None and len(fs) == 2 and ls is not None and same(fs[0], ls[0] * ls[1])
             and same(fs[1], ls[2]), f"slot positions {loc.name} are not a count over the flattened (choice, "
                                     "token) rows reshaped back", part="slots_dispatch")
        loc = flat
    terms: list = []
    _signed_sum(loc, 1, terms)
    cums, consts, offsets = [], 0, []
    for sign, t in terms:
        if not isinstance(t, fx.Node):
            if isinstance(t, (int, float)) and not isinstance(t, bool):
                consts += sign * t
                continue
            decline("slots_dispatch", f"slot positions {loc.name}: a term {t!r} is not a number")
        t = _strip_exact_casts(t)
        c = _reduce(t, "cumsum", (1, -2) if grouped else (0,))
        if c is not None and sign == 1 and (not grouped or len(shape_of(t) or ()) == 3):
            cums.append(c)
            continue
        c = _exclusive_cumsum(t) if not stacked else None
        if c is not None and sign == 1:  # cumsum(B) - B: cumsum(B) - 1 where B is 1 (the term's tokens)
            cums.append(c)
            consts -= sign
            continue
        counted = None if stacked else _counts_of(t, grouped)
        mask = _mask(counted, axes if grouped else ("s", "e")) if counted is not None else None
        if mask is not None and _choice_of(mask) is not None and sign == 1:
            offsets.append(mask)
            continue
        decline("slots_dispatch", f"slot positions {loc.name}: {t.name} is neither a cumsum over the tokens of the "
                                  "chosen experts' one-hot nor the counts of earlier choices "
                                  "(one_hot.sum(0, keepdim=True))")
    need(len(cums) == 1, f"slot positions {loc.name} are not one cumsum over the tokens minus 1", part="slots_dispatch")
    need(consts == -1, f"slot positions {loc.name} are cumsum {consts:+} (not cumsum - 1)", part="slots_dispatch")
    src = cums[0]
    if stacked:
        inner = _strip_exact_casts(src)
        inner = inner.args[0] if inner.op == "call_method" and inner.target in ("reshape", "view") else None
        need(inner is not None and safety.same_shape(inner, outer),
             f"slot positions {loc.name}: the cumsum is not over the (choice, token) rows of a (K, S, E) mask",
             part="slots_dispatch")
        src = inner
    counted = _mask(src, axes)
    choice = _choice_of(counted) if counted is not None else None
    need(choice is not None, f"slot positions {loc.name}: the cumsum is not over a 0/1 mask of the "
                                               "chosen experts (one_hot(ids, E), times flags): distinct positions "
                                               "are proven for such a column only", part="slots_dispatch")
    return _Positions(choice=choice, counted=counted, offsets=offsets)


def _exclusive_cumsum(t) -> Optional[fx.Node]:
    """B of ``F.pad(B, (0, 0, 1, 0)).cumsum(-2)[..., :-1, :]`` (lucidrains' ``cumsum_exclusive`` along the
    tokens, axis -2 of an (S, E) or (G, S, E) mask): one zero row in front, the running sum, the last row
    off, so row s is sum_{r<s} B[r] = cumsum(B)[s] - B[s]; else None."""
    index = _without_ellipsis(t)
    c = t.args[0] if index is not None else None
    p = _reduce(c, "cumsum", (-2, len(shape_of(c) or ()) - 2))
    if p is None or p.op != "call_function" or p.target not in (torch._C._nn.pad, Fn.pad) or \
            arg(p, 2, "mode", "constant") != "constant" or arg(p, 3, "value", None) not in (None, 0, 0.0):
        return None
    B, rank = arg(p, 0, "input"), len(shape_of(c) or ())
    pad = tuple(arg(p, 1, "pad", ()))
    ok = rank in (2, 3) and index[:rank] == (slice(None),) * (rank - 2) + (slice(None, -1, None), slice(None)) \
        and len(index) == rank and pad[:4] == (0, 0, 1, 0) and not any(pad[4:])
    return B if ok and isinstance(B, fx.Node) and safety.same_shape(B, t) else None


def _slot_of(L, L_labels: tuple, choice: tuple, term_flags: list) -> _Positions:
    """Prove that wherever the term is nonzero, L == loc at the chosen expert and loc counts the
    token (so kept tokens of one expert get distinct positions); return loc's description. ``.long()``
    of fp32/fp64 positions is exact (counts of 0/1 masks: integers, exact below 2**24)."""
    L = _strip_exact_casts(L)
    if L.op == "call_method" and L.target in ("long", "int") and len(L.args) == 1 and not L.kwargs and \
            dtype_of(L.args[0]) in (torch.float32, torch.float64):
        L = _strip_exact_casts(L.args[0])
    red = L if L.op in ("call_function", "call_method") else None
    inner = None
    for d in range(len(L_labels) + 1):
        inner = inner or _reduce(red, "sum", (d, d - len(L_labels) - 1), keepdim=False)
        if inner is not None:
            break
    if inner is not None:
        axes = L_labels[:d] + ("e",) + L_labels[d:]
        need(None not in axes, f"slot index {L.name}: positions of a size-1 axis", part="slots_dispatch")
        factors = _factors(inner, axes)
        locs = [(f, a) for f, a in factors if isinstance(f, fx.Node) and not _is_flag(f)]
        flags = [(f, a) for f, a in factors if isinstance(f, fx.Node) and _is_flag(f)]
        need(len(locs) == 1 and len(flags) + 1 == len(factors) and tuple(locs[0][1]) == axes,
             f"slot index {L.name} is not sum(positions * mask) over the experts with a 0/1 mask",
             part="slots_dispatch")
        loc = locs[0][0]
        need(_same_ids(_choice_of(flags), choice),
             f"slot index {L.name}: the mask it reads positions with is not the term's one-hot of its experts",
             part="slots_dispatch")
        need(_within(flags, term_flags),
             f"slot index {L.name}: reads positions under a mask the combine weights are not multiplied by (a slot "
             "could then hold a token it was not given)", part="slots_dispatch")
    else:
        g = L
        if g.op == "call_method" and g.target == "squeeze" and len(g.args) in (1, 2):
            g = g.args[0]
        need(L_labels == ("s",) and isinstance(g, fx.Node) and g.op in ("call_method",
             "call_function") and g.target in ("gather", torch.gather) and arg(g, 1, "dim") in (1, -1),
             f"slot index {L.name} is not the slot positions read at the chosen expert "
             "(sum(positions * mask, 1) or positions.gather(1, ids))", part="slots_dispatch")
        loc, gi = g.args[0], arg(g, 2, "index")
        gi = gi.args[0] if isinstance(gi, fx.Node) and gi.op == "call_method" and gi.target in (
            "unsqueeze", "view", "reshape") else gi
        need(_same_choice(gi, choice[0]), f"slot index {L.name} reads positions at other experts "
                                                            "than the term's", part="slots_dispatch")
        axes = ("s", "e")
    pos = _positions(loc, axes)
    pos.values = [(L, L_labels), (loc, axes)] + ([(inner, axes)] if inner is not None else [])
    need(_same_ids(pos.choice, choice), f"slot positions {loc.name} count another choice of "
                                                          "experts than the term that uses them", part="slots_dispatch")
    need(_within(pos.counted, term_flags),
         f"slot positions {loc.name} count tokens under a mask the combine weights are not multiplied by (two kept "
         "tokens could share a position)", part="slots_dispatch")
    return pos


def _arange_length(node):
    """n of ``torch.arange(n)`` / ``arange(0, n[, 1])`` (0, 1, ..., n - 1), else None."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target is torch.arange
            and set(node.kwargs) <= {"dtype", "device"}):
        return None
    a = node.args
    if len(a) == 1:
        return a[0]
    return a[1] if len(a) in (2, 3) and a[0] == 0 and a[2:] in ((), (1,)) else None


def _eq_one_hot(node) -> Optional[tuple]:
    """(L, C) of ``L.unsqueeze(-1) == arange(C)`` (``torch.eq``, either side; exact casts around; the
    normal form's ``one_hot(L, N)[..., :C]``): row r is one_hot(L[r], C) where 0 <= L[r] < C, and a
    zero row elsewhere (no error, unlike ``one_hot``): a term placed by it must be proven capped
    (``_need_capped``)."""
    node = _strip_exact_casts(node)
    if not (isinstance(node, fx.Node) and node.op in ("call_function", "call_method") and len(node.args) == 2
            and not node.kwargs and node.target in (operator.eq, torch.eq, "eq", "__eq__")):
        return None
    for a, b in (node.args, node.args[::-1]):
        L, C = _last_axis_column(a), _arange_length(b)
        if L is not None and C is not None and len(shape_of(b) or ()) == 1 and dtype_of(L) != torch.bool:
            return L, C
    return None


def _same_bound(a, b) -> bool:
    """``a`` and ``b`` are the same integer bound: equal numbers (4 and 4.0), equivalent nodes, also
    through ``torch.sym_float`` of a SymInt (``float(C)``: exact for any capacity below 2**53)."""
    a, b = (n.args[0] if isinstance(n, fx.Node) and n.op == "call_function" and n.target is torch.sym_float
            and len(n.args) == 1 else n for n in (a, b))
    if isinstance(a, fx.Node) or isinstance(b, fx.Node):
        return safety.equivalent(a, b)
    return all(isinstance(n, (int, float)) and not isinstance(n, bool) for n in (a, b)) and a == b


def _less_than(f) -> Optional[tuple]:
    """(p, c) of the flag ``p < c`` (``lt``, or ``c > p``), else None."""
    if not (isinstance(f, fx.Node) and f.op in ("call_function", "call_method") and len(f.args) == 2
            and not f.kwargs):
        return None
    if f.target in (operator.lt, torch.lt, "lt", "__lt__"):
        return f.args[0], f.args[1]
    if f.target in (operator.gt, torch.gt, "gt", "__gt__"):
        return f.args[1], f.args[0]
    return None


def _need_capped(L, C, pos: _Positions, flags: list, cw) -> None:
    """A term placed by ``L == arange(C)`` is nonzero only where L < C: one of its flags is ``v < C``
    for a v equal to L at the chosen expert wherever the term is nonzero (``pos.values``: L, the
    positions, or the positions times the term's mask), read along the same axes; L >= 0 there (a
    count of the term's own mask minus 1 plus counts, ``_positions``). So where the eq form gives a zero
    row (a position over capacity) the term is zero by its flags too: the fused op, which drops by the
    flags, drops the same tokens."""
    for f, lab in flags:
        lt = _less_than(f)
        if lt is None:
            continue
        v, c = _strip_exact_casts(lt[0]), lt[1]
        if _same_bound(c, C) and any(safety.equivalent(v, _strip_exact_casts(n)) and tuple(lab) == tuple(a)
                          for n, a in pos.values):
            return
    decline("slots_dispatch", f"combine weights {cw.name}: slots placed by {L.name} == arange({C}) (a zero row for "
                              f"a position >= {C}) in a term with no flag {L.name} < {C}: a token over capacity "
                              "would be dropped by the zero row but kept by the fused op")


def _term(t: fx.Node, axes: tuple, cw: fx.Node):
    """One term of the combine weights over ``axes`` ("s", "e", "c") or, stacked, ("k", "s", "e", "c")."""
    slots, flags, weights, bound = [], [], [], None
    factors, sums = _factors(t, axes), []
    for f, lab in factors:
        rows = _row_sum_mask(f) if isinstance(f, fx.Node) and "e" not in lab else None
        if rows is not None and len(lab) == len(rows[0][1]) - 1:
            # M.sum(-1) times the term's one-hot over e is M (at most one nonzero column): M's factors too
            names = dict(zip([f"a{i}" for i in range(len(lab))] + ["e"], tuple(lab) + ("e",)))
            sums.append([(g, tuple(names.get(a) for a in la)) for g, la in rows])
    for f, lab in factors:
        oh = _one_hot(f, reshaped=False) if isinstance(f, fx.Node) else None
        eq = _eq_one_hot(f) if isinstance(f, fx.Node) and oh is None else None
        if (oh is not None or eq is not None) and lab and lab[-1] == "c" and "e" not in lab:
            slots.append(((oh or eq)[0], lab[:-1]))
            bound = eq[1] if eq is not None else bound
        elif "c" in _varies(f, lab):
            decline("slots_dispatch", f"combine weights {cw.name}: {f.name} varies along the slots and is not a "
                                      "one-hot of slot positions")
        elif isinstance(f, fx.Node) and _is_flag(f):
            flags.append((f, lab))
        else:
            weights.append((f, lab))
    need(len(slots) == 1, f"combine weights {cw.name}: a term is not placed by one one-hot of "
                                            "slot positions (one_hot(locations, C))", part="slots_dispatch")
    choice = _choice_of(flags)
    for rows in sums:  # valid only where the term has that one-hot itself
        need(choice is not None and _same_ids(_choice_of(rows), choice),
             f"combine weights {cw.name}: a row sum of a mask over the experts is not multiplied by that mask's "
             "one-hot of the chosen experts", part="slots_dispatch")
        flags.extend(rows)
    per_token = set(axes) - {"e", "c"}
    need(choice is not None and set(choice[1]) - {None} <= per_token,
         f"combine weights {cw.name}: a term is not restricted to one chosen expert per token (one_hot(ids, E))",
         part="slots_dispatch")
    need(set(slots[0][1]) - {None} <= per_token, f"combine weights {cw.name}: slot positions do "
                                                                   "not follow the tokens", part="slots_dispatch")
    pos = _slot_of(slots[0][0], slots[0][1], choice, flags)
    if bound is not None:
        _need_capped(slots[0][0], bound, pos, flags, cw)
    width = 1
    if "k" in axes:
        width = shape_of(t)[axes.index("k")]
    return SlotTerm(choice=choice[0], choice_labels=choice[1], weights=weights, flags=flags, slot=slots[0][0],
                    offsets=pos.offsets, width=width), pos


def _terms(cw: fx.Node) -> list:
    """The terms of the combine weights (S, E, C), each proven to give every token at most one
    (expert, slot) per choice, ordered so that term k's positions start after the positions of the
    terms before it; or one stacked term ``sum(P, 0)`` over a (K, S, E, C) product (nanoMoE)."""
    stacked = _reduce(cw, "sum", (0,), keepdim=False)
    if stacked is not None and len(shape_of(stacked) or ()) == 4 and not inplace_as(cw):
        term, _ = _term(stacked, ("k", "s", "e", "c"), cw)
        return [term]
    written = _indexed_writes(cw)
    if written is not None:  # zeros written term by term at (token, expert, slot) (OpenMoE)
        return _ordered([_indexed_term(ids, pos, W, cw, True) for ids, pos, W, _ in written], cw)
    sums: list = []
    _signed_sum(cw, 1, sums)
    terms = []
    for sign, t in sums:
        need(sign == 1 and isinstance(t, fx.Node) and safety.same_shape(t, cw),
             f"combine weights {cw.name}: a term is subtracted or broadcast along an axis", part="slots_dispatch")
        terms.append(_term(t, ("s", "e", "c"), cw))
    return _ordered(terms, cw)


def _capped_by(f, lab, pos: _Positions):
    """c when the flag ``f`` (labels ``lab``) is ``v < c`` with v the term's positions (``pos.values``)."""
    lt = _less_than(f)
    if lt is None:
        return None
    v = _strip_exact_casts(lt[0])
    hit = any(safety.equivalent(v, _strip_exact_casts(n)) and tuple(lab) == tuple(a) for n, a in pos.values)
    return lt[1] if hit else None


def _covers_kept(m: list, term: SlotTerm, pos: _Positions) -> bool:
    """The count of the offset mask ``m`` is above every kept position of ``term``: m covers the term's
    counted mask B (its factors among B's), or is B times ``v < C`` with v the term's positions and the
    term itself capped by a flag ``v' < C`` on its positions (same C): the positions of B's tokens are
    off, off + 1, ... (distinct, consecutive), so m counts min(count(B), C - off) of them and the kept
    ones (< C) lie in [off, off + count(m)) (lucidrains' counts of the first choices kept)."""
    rest = [(f, lab) for f, lab in m if not _within([(f, lab)], pos.counted)]
    if not rest:
        return True
    bounds = [_capped_by(f, lab, pos) for f, lab in rest]
    if len(rest) != 1 or bounds[0] is None:
        return False
    own = [_capped_by(f, lab, pos) for f, lab in term.flags]
    return any(c is not None and _same_bound(c, bounds[0]) for c in own)


def _ordered(terms: list, cw: fx.Node) -> list:
    """The terms [(SlotTerm, _Positions)] ordered so that term k's positions start after the positions of
    the terms before it (declines otherwise)."""
    # Kept positions of term j lie in [off_j, off_j + count(B_j)), B_j the mask its cumsum counts. Term k
    # adds the counts of masks Y_kj for j < k; off_k >= off_j + count(B_j) when Y_kj covers B_j and Y_ki
    # covers Y_ji for i < j (a mask covers another when its factors are among the other's).
    ordered = sorted(terms, key=lambda tp: len(tp[1].offsets))
    matched: list = []  # per term: {j: offset mask}
    for k, (t, pos) in enumerate(ordered):
        need(len(pos.offsets) == k,
             f"combine weights {cw.name}: the slot positions of choice {k + 1} do not start after the positions of "
             "the choices before it (a slot could hold two tokens)", part="slots_dispatch")
        rest, by_term = list(pos.offsets), {}
        for j, (tj, pj) in enumerate(ordered[:k]):
            hit = next((m for m in rest if _same_ids(_choice_of(m), (tj.choice, tj.choice_labels))
                        and _covers_kept(m, tj, pj)), None)
            need(hit is not None,
                 f"combine weights {cw.name}: the slot positions of choice {k + 1} do not start after the "
                 f"positions of choice {j + 1} (a slot could hold two tokens)", part="slots_dispatch")
            rest.remove(hit)
            by_term[j] = hit
        for j in range(k):
            for i in range(j):
                need(_within(by_term[i], matched[j][i]),
                     f"combine weights {cw.name}: choices {j + 1} and {k + 1} count the earlier choices differently",
                     part="slots_dispatch")
        matched.append(by_term)
    return [t for t, _ in ordered]


# --------------------------------------------------------------------------- slots_dispatch: indexed writes

#: the op of a read-modify-write ``t[i] op= v`` (the normal form makes ``+=`` on the copy ``t[i]`` a ``+``)
_RMW = {operator.iadd: "add", operator.add: "add", torch.add: "add", operator.ior: "or", operator.or_: "or",
        torch.bitwise_or: "or", torch.logical_or: "or"}
#: readers of a tensor's metadata only (its shape, dtype, device), never of its values
_META_READERS = (torch.zeros_like, torch.empty_like, torch.ones_like)


def _arange_rows(i, rows) -> bool:
    """``i`` is ``torch.arange(rows)`` / ``arange(0, rows[, 1])``: every row index once, in order."""
    if not (isinstance(i, fx.Node) and i.op == "call_function" and i.target is torch.arange) or \
            set(i.kwargs) - {"device", "dtype"} or not 1 <= len(i.args) <= 3:
        return False
    a, s = i.args, shape_of(i)
    start, step = (0 if len(a) == 1 else a[0]), (a[2] if len(a) == 3 else 1)
    return type(start) is int and start == 0 and type(step) is int and step == 1 and s is not None \
        and len(s) == 1 and same(s[0], rows)


def _per_row(v, I, rows) -> Optional[fx.Node]:
    """u when ``v`` is ``u[I]`` (I the rows' arange: u itself) or u, a 1-D integral (rows,) tensor."""
    if isinstance(v, fx.Node) and v.op == "call_function" and v.target is operator.getitem and v.args[1] is I:
        v = v.args[0]
    s = shape_of(v) if isinstance(v, fx.Node) else None
    if s is None or len(s) != 1 or not same(s[0], rows) or not _is_integral(v) or dtype_of(v) == torch.bool:
        return None
    return v


def _meta_only(u: fx.Node) -> bool:
    return (u.op == "call_function" and u.target in _META_READERS) or \
        (u.op == "call_method" and u.target in ("size", "dim", "new_zeros", "new_empty"))


def _written_value(w: fx.Node, t: fx.Node, I, choice, rows) -> fx.Node:
    """W of the read-modify-write ``t[I, J, L] op= W[I, choice[I]]`` that ``w`` (the setitem) ends."""
    op, idx = w.args[2], w.args[1]
    kind = _RMW.get(op.target) if isinstance(op, fx.Node) and op.op == "call_function" else None
    g = op.args[0] if kind else None
    need(kind is not None and len(op.args) == 2 and not op.kwargs and list(op.users) == [w]
         and isinstance(g, fx.Node) and g.op == "call_function" and g.target is operator.getitem
         and g.args[0] is t and isinstance(g.args[1], tuple) and len(g.args[1]) == 3
         and all(a is b for a, b in zip(g.args[1], idx)) and list(g.users) == [op],
         f"{w.name} at {_line_of(w)}: a write into {t.name} is not the read-modify-write t[i, e, c] += v "
         "(|= for a bool mask) of the same places", part="slots_dispatch")
    need((kind == "or") == (dtype_of(t) == torch.bool), f"{w.name}: {op.target.__name__} into a {dtype_of(t)} "
                                                         "tensor (+= for weights, |= for a bool mask)",
         part="slots_dispatch")
    v = op.args[1]
    ok = isinstance(v, fx.Node) and v.op == "call_function" and v.target is operator.getitem and \
        isinstance(v.args[1], tuple) and len(v.args[1]) == 2 and v.args[1][0] is I and \
        safety.equivalent(_per_row(v.args[1][1], I, rows), choice)
    W = v.args[0] if ok else None
    sw, st = shape_of(W), shape_of(t)
    need(ok and sw is not None and len(sw) == 2 and same(sw[0], st[0]) and same(sw[1], st[1]),
         f"{w.name} at {_line_of(w)}: the value written is not an (S, E) tensor read at each token's chosen "
         "expert (w[i, ids[i]])", part="slots_dispatch")
    return W


def _indexed_writes(t) -> Optional[list]:
    """[(ids, positions, W, setitem), ...] when ``t`` is fresh zeros (S, E, C) computed only by
    read-modify-writes ``t[I, ids[I], pos[I]] += W[I, ids[I]]`` (``|=`` into a bool t) with I =
    ``arange(S)`` (OpenMoE's ``HFOpenMoeTop2Router``): each writes W[s, ids[s]] at (s, ids[s], pos[s]) for
    every token s once (the rows are distinct, so no place is written twice by one write), reading the
    value the writes before it left, and nothing reads t's values before the last write: t is the sum
    (the or) of the written terms wherever it is read. None when t is not zeros written by setitems."""
    if not (isinstance(t, fx.Node) and ((t.op == "call_function" and t.target in _ZEROS_F)
                                        or (t.op == "call_method" and t.target == "new_zeros"))):
        return None
    writes, st = safety.writes_to(t), shape_of(t)
    if not writes or st is None or len(st) != 3 or not all(
            w.op == "call_function" and w.target is operator.setitem and w.args[0] is t for w in writes):
        return None
    order, out = node_order(t.graph), []
    for prev, w in zip([None] + writes[:-1], writes):
        idx = w.args[1]
        ok = isinstance(idx, tuple) and len(idx) == 3 and _arange_rows(idx[0], st[0])
        ids, pos = (_per_row(idx[1], idx[0], st[0]), _per_row(idx[2], idx[0], st[0])) if ok else (None, None)
        need(ids is not None and pos is not None,
             f"{w.name} at {_line_of(w)}: {t.name} is written at places that are not (arange(S), ids, positions) "
             "with one expert and one slot per token", part="slots_dispatch")
        W = _written_value(w, t, idx[0], ids, st[0])
        # the proof reads how these were computed: a write into one (even a first one) changes that
        for n in (*idx, ids, pos, w.args[2].args[1], W):
            early = [u for u in safety.writes_to(n) if order[u] < order[w]] if isinstance(n, fx.Node) else []
            need(not early, f"{n.name}, which {w.name} at {_line_of(w)} writes with, is modified in place by "
                            f"{early[0].format_node() if early else ''}", part="slots_dispatch")
        need(prev is None or order[w.args[2].args[0]] > order[prev],
             f"{w.name}: reads {t.name} before the write {prev.name if prev else ''} before it", part="slots_dispatch")
        out.append((ids, pos, W, w))
    own = {n for w in writes for n in (w, w.args[2].args[0])}
    late = [u for a in safety.aliases(t) for u in a.users
            if u not in own and not _meta_only(u) and order[u] < order[writes[-1]]]
    need(not late, f"{t.name} is read ({late[0].format_node() if late else ''}) before its last write "
                   f"{writes[-1].name}", part="slots_dispatch")
    return out


def _written_nodes(written: list) -> list:
    """What indexed writes read (the rows' arange, ids, positions, values): the composition checks that
    nothing writes into them in place, as it checks what the block reads."""
    return [n for ids, pos, W, w in written for n in (w.args[1][0], ids, pos, W)]


def _written_flags(W) -> list:
    """The factors of W over (s, e): a 0/1 product read through ``.bool()`` (exact on 0/1 values)."""
    if isinstance(W, fx.Node) and W.op == "call_method" and W.target == "bool" and len(W.args) == 1:
        inner = _mask(W.args[0], ("s", "e"))
        if inner is not None:
            return inner
    return _factors(W, ("s", "e"))


def _indexed_term(ids, pos, W, cw, prove: bool):
    """The SlotTerm of one indexed write (and, with ``prove``, its positions' proof, ``_slot_of``)."""
    flags, weights = [], []
    for f, lab in _written_flags(W):
        (flags if isinstance(f, fx.Node) and _is_flag(f) else weights).append((f, lab))
    need(_same_ids(_choice_of(flags), (ids, ("s",))),
         f"{cw.name}, written term by term: the value written at each token's expert {ids.name} is not multiplied "
         "by the one-hot of those experts (the positions are proven for that column)", part="slots_dispatch")
    pos_proof = _slot_of(pos, ("s",), (ids, ("s",)), flags) if prove else None
    term = SlotTerm(choice=ids, weights=weights, flags=flags, slot=pos,
                    offsets=pos_proof.offsets if pos_proof else [])
    return term, pos_proof


def _nonzero_source(d) -> Optional[fx.Node]:
    """W if ``d`` is ``W.bool()`` or ``W != 0`` (exact casts around allowed)."""
    d = _strip_exact_casts(d)
    if d.op == "call_method" and d.target == "bool" and len(d.args) == 1:
        return d.args[0]
    if d.op in ("call_function", "call_method") and d.target in (operator.ne, torch.ne, "ne", "__ne__") \
            and len(d.args) == 2 and d.args[1] == 0:
        return d.args[0]
    return None


def _need_unwritten_dispatch(m: fx.Node, src: fx.Node, slots: fx.Node) -> None:
    """The einsum reads ``m`` as the nonzero pattern of ``src`` through the nodes between them (casts,
    ``bool()``, ``!= 0``, identities): decline if one of them (or a view of it) is written in place before
    the einsum reads it (``d = combine.bool().type_as(x); d[:, 0] = 0`` dispatches another mask)."""
    order, n, seen = node_order(slots.graph), m, set()
    while isinstance(n, fx.Node) and n is not src and n not in seen:
        seen.add(n)
        early = [w for w in safety.writes_to(n) if order[w] < order[slots]]
        if early:
            decline("slots_dispatch", f"{m.name}: the dispatch mask {n.name} is modified in place by "
                                      f"{early[0].format_node()} before the dispatch reads it")
        inner = safety.identity_function_input(n)
        n = inner if inner is not None else (n.args[0] if n.args else n.kwargs.get("input"))
    need(n is src, f"{m.name}: the dispatch mask's computation from {src.name} is not followed", part="slots_dispatch")


def _matmul_args(node) -> Optional[tuple]:
    """(a, b) of ``a @ b`` (``matmul``), or of ``torch.mm(a, b)`` / ``a.mm(b)`` (2-D only: the matmul of
    two matrices)."""
    if isinstance(node, fx.Node) and len(node.args) == 2 and not node.kwargs and (
            (node.op == "call_function" and node.target in (torch.matmul, operator.matmul, torch.mm))
            or (node.op == "call_method" and node.target in ("matmul", "__matmul__", "mm"))):
        return node.args
    return None


def _merged_rows(node) -> Optional[fx.Node]:
    """t if ``node`` is ``t.view(A * B, n)`` (``reshape``) of a 3-D t (A, B, n): a row-major reshape
    merging the two leading axes, so row a * B + b of ``node`` is t[a, b]."""
    t = _flattened(node, 3)
    s, st = shape_of(node), shape_of(t)
    if t is None or s is None or len(s) != 2 or not (same(s[0], st[0] * st[1]) and same(s[1], st[2])):
        return None
    return t


def _slot_major(m, rank: int) -> Optional[fx.Node]:
    """d when the dispatch operand ``m`` is ``d.permute(1, 2, 0)`` (E, C, S) (``rank`` 3) or that permute
    with its (E, C) axes merged, ``.view(E * C, S)`` (``rank`` 2: row e * C + c is slot (e, c), the
    order the slots have in (E, C, d)); exact casts of the 0/1 mask around either."""
    p = _strip_exact_casts(m)
    if rank == 2:
        p = _merged_rows(p)
        if p is None:
            return None
        p = _strip_exact_casts(p)
    if p.op == "call_method" and p.target == "permute" and tuple(
            p.args[1] if len(p.args) == 2 and isinstance(p.args[1], (tuple, list)) else p.args[1:]) in (
            (1, 2, 0), (-2, -1, 0)):
        return p.args[0]
    return None


def _mm_slots_view(slots) -> Optional[fx.Node]:
    """The 2-D ``mm`` dispatch (E * C, d) that the 3-D ``slots`` is a row-major reshape of, else None."""
    inner, steps = _row_major_source(slots)
    mm = _matmul_args(inner)
    if steps == 0 or len(shape_of(slots) or ()) != 3 or mm is None or len(shape_of(inner) or ()) != 2:
        return None
    return inner


@register("slots_dispatch", "capacity_einsum",
          'einsum("sec,sm->ecm", combine.bool(), x) or combine.bool().permute(1, 2, 0) @ x, or '
          'torch.mm(combine.bool().permute(1, 2, 0).view(E * C, S), x) (rows e * C + c, fairseq): one-hot/cumsum '
          'capacity slots (GShard/Switch, nanoMoE, fairseq)')
def capacity_einsum(slots) -> Optional[SlotsDispatch]:
    if _grouped_slots(slots) is not None:
        return _grouped_capacity(slots, _grouped_slots(slots))
    flat = _mm_slots_view(slots)
    if flat is not None:  # mm(...).view(E, C, d): the (E * C, d) rows regrouped row-major into the slots
        disp = capacity_einsum(flat)
        if disp is None:
            return None
        cs, ss = shape_of(disp.combine_weights), shape_of(slots)
        need(all(same(p, q) for p, q in zip(ss, (cs[1], cs[2], shape_of(flat)[1]))),
             f"{slots.name}: the (E * C, d) dispatch rows are regrouped as {tuple(ss)}, not as the (E, C, d) slots",
             part="slots_dispatch")
        return dataclasses.replace(disp, slots=slots)
    es = einsum_parts(slots)
    mm = _matmul_args(slots)
    if es is not None and len(es[2]) == 2:
        ins, outl, ops = es
        for (md, xd), (m, x) in ((ins, ops), (ins[::-1], ops[::-1])):
            if len(md) == 3 and len(xd) == 2 and len(outl) == 3 and len(set(md + xd)) == 4 and xd[0] == md[0] \
                    and outl == md[1] + md[2] + xd[1]:
                break
        else:
            return None
        d = m
    elif mm is not None and len(shape_of(mm[0]) or ()) in (2, 3) and len(shape_of(mm[1]) or ()) == 2:
        m, x = mm
        d = _slot_major(m, len(shape_of(m)))
        if d is None:
            return None
    else:
        return None
    src = _nonzero_source(d)
    written = _indexed_writes(_strip_exact_casts(d)) if not isinstance(src, fx.Node) else None
    if written is not None:  # a mask written on its own, matched with the combine weights' writes (analyse)
        mask = _strip_exact_casts(d)
        _need_unwritten_dispatch(m, mask, slots)
        ms, xs = shape_of(mask), shape_of(x)
        need(xs is not None and len(xs) == 2 and int_value(ms[1]) is not None,
             f"{slots.name}: dispatch is not (S, E, C) x (S, d) with a constant E", part="slots_dispatch")
        terms = [_indexed_term(ids, pos, W, mask, False)[0] for ids, pos, W, _ in written]
        need(all(not t.weights for t in terms), f"{mask.name}: the dispatch mask is written with values that are "
                                                "not 0/1 flags", part="slots_dispatch")
        return SlotsDispatch(kind="capacity", x=x, slots=slots, num_experts=int_value(ms[1]), terms=terms,
                             writes=[w for *_, w in written], inputs=[mask], nodes=_written_nodes(written))
    if not isinstance(src, fx.Node):
        given = safety.strip_casts(d)
        need(given.op != "placeholder",
             f"{m.name}: the dispatch tensor {given.name} is an input of this graph (computed in another graph, "
             "e.g. before a graph break): that it is the nonzero pattern of the combine weights cannot be proved here",
             part="slots_dispatch")
        twice = " (it scales the expert inputs by routing weights: with the combine weights, scores are applied " \
                "twice)" if not _is_flag(d) else ""
        decline("slots_dispatch", f"{m.name}: the dispatch tensor is not the nonzero pattern of combine weights "
                                  f"(combine.bool()){twice}")
    _need_unwritten_dispatch(m, src, slots)
    ss, xs = shape_of(src), shape_of(x)
    need(ss is not None and len(ss) == 3 and xs is not None and len(xs) == 2,
         f"{slots.name}: dispatch is not (S, E, C) x (S, d)", part="slots_dispatch")
    E = int_value(ss[1])
    need(E is not None, f"{src.name}: the number of experts is not a constant", part="slots_dispatch")
    terms = _terms(src)
    written = _indexed_writes(src) or []
    return SlotsDispatch(kind="capacity", x=x, slots=slots, num_experts=E, combine_weights=src, terms=terms,
                         writes=[w for *_, w in written], nodes=_written_nodes(written))


def _group_einsum(node) -> Optional[tuple]:
    """(mask, x) of ``einsum("bnd,bnec->ebcd", x, mask)`` (operands either way): x (G, S, d) tokens in G
    groups, mask (G, S, E, C); slot (e, g, c) sums the tokens of group g only."""
    es = einsum_parts(node)
    if es is None or len(es[2]) != 2:
        return None
    ins, outl, ops = es
    for (md, xd), (m, x) in ((ins, ops), (ins[::-1], ops[::-1])):
        if len(md) == 4 and len(xd) == 3 and len(set(md + xd)) == 5 and xd[:2] == md[:2] \
                and outl == md[2] + md[0] + md[3] + xd[2]:
            return m, x
    return None


def _grouped_slots(slots) -> Optional[fx.Node]:
    """g if ``slots`` is ``g.reshape(E, -1, d)`` (``view``) of a group einsum g (E, G, C, d)
    (``_group_einsum``): the (G, C) slots of each expert merged row-major, row g * C + c is (g, c)."""
    src, steps = _row_major_source(slots)
    s, ss = shape_of(slots), shape_of(src)
    if steps == 0 or _group_einsum(src) is None or s is None or ss is None or len(s) != 3 or len(ss) != 4:
        return None
    if not (same(s[0], ss[0]) and same(s[1], ss[1] * ss[2]) and same(s[2], ss[3])):
        return None
    return src


def _grouped_capacity(slots, g) -> SlotsDispatch:
    """Capacity slots per group (GShard's group axis, lucidrains' ``einsum("bnd,bnec->ebcd")``): the
    combine weights (G, S, E, C) as terms over axes (g, s, e, c), each term's positions counted over
    the tokens of its group (``_positions`` over (g, s, e)); so within a group every slot holds at most
    one token, and slots of different groups are different slots (e, g, c)."""
    m, x = _group_einsum(g)
    src = _nonzero_source(m)
    need(isinstance(src, fx.Node), f"{m.name}: the dispatch tensor is not the nonzero pattern of combine weights "
                                   "(combine.bool())", part="slots_dispatch")
    _need_unwritten_dispatch(m, src, g)
    ss, xs = shape_of(src), shape_of(x)
    need(ss is not None and len(ss) == 4 and xs is not None and len(xs) == 3,
         f"{g.name}: dispatch is not (G, S, E, C) x (G, S, d)", part="slots_dispatch")
    E = int_value(ss[2])
    need(E is not None, f"{src.name}: the number of experts is not a constant", part="slots_dispatch")
    sums: list = []
    _signed_sum(src, 1, sums)
    terms = []
    for sign, t in sums:
        need(sign == 1 and isinstance(t, fx.Node) and safety.same_shape(t, src),
             f"combine weights {src.name}: a term is subtracted or broadcast along an axis", part="slots_dispatch")
        terms.append(_term(t, ("g", "s", "e", "c"), src))
    return SlotsDispatch(kind="capacity", x=x, slots=slots, num_experts=E, combine_weights=src,
                         terms=_ordered(terms, src), groups=g)


def _with_combine_weights(disp: SlotsDispatch, cw: fx.Node) -> SlotsDispatch:
    """``disp`` (a dispatch mask written term by term, ``disp.terms`` flags only) with the combine
    weights ``cw`` the output uses: proven to be written term by term too, each term at the same (token,
    expert, slot) as a term of the mask, under the same 0/1 flags (so the mask holds a token in a slot
    exactly where the combine weights are nonzero there, up to a zero weight, and its positions are the
    ones proven distinct for the weights)."""
    written = _indexed_writes(cw)
    need(written is not None, f"proof: the dispatch mask {disp.inputs[0].name} is written term by term but the "
                              f"combine weights {cw.name} are not", part="proof")
    terms = _terms(cw)
    need(len(terms) == len(disp.terms), f"proof: {len(disp.terms)} dispatch terms for {len(terms)} combine terms",
         part="proof")
    for t in terms:
        hit = [m for m in disp.terms if _same_choice(m.choice, t.choice) and safety.equivalent(m.slot, t.slot)
               and _within(m.flags, t.flags) and _within(t.flags, m.flags)]
        need(hit, f"proof: no term of the dispatch mask {disp.inputs[0].name} places the tokens at expert "
                  f"{t.choice.name}, slot {t.slot.name} under the combine weights' flags", part="proof")
    return dataclasses.replace(disp, combine_weights=cw, terms=terms, inputs=[],
                               writes=list(disp.writes) + [w for *_, w in written],
                               nodes=list(disp.nodes) + _written_nodes(written))


# --------------------------------------------------------------------------- slots_dispatch: gathered rows

def _flat_of(node) -> Optional[fx.Node]:
    """t if ``node`` is ``t.reshape(-1)`` / ``view(-1)`` / ``flatten()`` of a 2-D t, else None."""
    if isinstance(node, fx.Node) and node.op == "call_method" and (
            (node.target in ("reshape", "view") and tuple(node.args[1:]) in ((-1,), ((-1,),)))
            or (node.target == "flatten" and len(node.args) == 1 and not node.kwargs)):
        t = node.args[0]
        if isinstance(t, fx.Node) and len(shape_of(t) or ()) == 2:
            return t
    return None


@register("slots_dispatch", "gathered_rows", "x[idx] with idx (E, C) token ids (expert-choice routing)")
def gathered_rows(slots) -> Optional[SlotsDispatch]:
    s = shape_of(slots)
    if s is None or len(s) != 3 or not isinstance(slots, fx.Node):
        return None
    node, idx, x = slots, None, None
    if node.op == "call_method" and node.target in ("view", "reshape"):
        inner = node.args[0]
        if isinstance(inner, fx.Node) and inner.op == "call_function" and inner.target is operator.getitem:
            idx, x = _flat_of(inner.args[1]), inner.args[0]
        elif isinstance(inner, fx.Node) and inner.target in ("index_select", torch.index_select) \
                and arg(inner, 1, "dim") == 0:
            idx, x = _flat_of(arg(inner, 2, "index")), inner.args[0]
    elif node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[1], fx.Node):
        idx, x = node.args[1], node.args[0]
    if idx is None or not isinstance(x, fx.Node):
        return None
    xs, ix = shape_of(x), shape_of(idx)
    if xs is None or len(xs) != 2 or ix is None or len(ix) != 2 or not _is_integral(idx) or dtype_of(idx) == torch.bool:
        return None
    need(same(ix[0], s[0]) and same(ix[1], s[1]) and same(xs[1], s[2]),
         f"{slots.name}: the gathered rows are not (E, C, d) for an (E, C) index table", part="slots_dispatch")
    E = int_value(ix[0])
    need(E is not None, f"{idx.name}: the number of experts is not a constant", part="slots_dispatch")
    return SlotsDispatch(kind="gathered", x=x, slots=slots, num_experts=E, index=idx)


# --------------------------------------------------------------------------- slots_dispatch: dense scores

_SIGMOID = (torch.sigmoid, Fn.sigmoid)
_CONST_BASE = {torch.full_like: "full_like", torch.zeros_like: "zeros_like", torch.zeros: "zeros", torch.full: "full"}


def _repeat_count(node) -> Optional[int]:
    """E of ``x.repeat(E, 1)`` (whole rows of a 2-D x repeated E times, copy e at rows e*S..e*S+S-1)."""
    if not (isinstance(node, fx.Node) and node.op == "call_method" and node.target == "repeat" and not node.kwargs):
        return None
    reps = node.args[1:]
    if len(reps) == 1 and isinstance(reps[0], (tuple, list)):
        reps = tuple(reps[0])
    if len(reps) != 2 or int_value(reps[1]) != 1 or len(shape_of(node.args[0]) or ()) != 2:
        return None
    return int_value(reps[0])


def _arange_table(I) -> Optional[tuple]:
    """(S, E) if ``I`` (E, S) holds I[e, s] == s: ``arange(S)`` viewed (1, S) (``view``/``reshape``
    (1, -1), ``unsqueeze(0)``) or left 1-D, then broadcast to (E, S) by ``expand``/``expand_as`` (only a
    size-1 or missing leading axis is broadcast, so every row is the arange) (Llama 4's
    ``arange(a).view(1, -1).expand(E, -1)``)."""
    s = shape_of(I)
    if not (isinstance(I, fx.Node) and I.op == "call_method" and I.target in ("expand", "expand_as")
            and s is not None and len(s) == 2 and isinstance(I.args[0], fx.Node)):
        return None
    J = I.args[0]
    if J.op == "call_method" and J.target in ("view", "reshape", "unsqueeze") and isinstance(J.args[0], fx.Node) \
            and len(shape_of(J) or ()) == 2 and _size_one(shape_of(J)[0]) and len(shape_of(J.args[0]) or ()) == 1:
        J = J.args[0]
    if _arange_length(J) is None or not _is_integral(J) or not same(shape_of(J)[0], s[1]) or int_value(s[0]) is None:
        return None
    return s[1], int_value(s[0])


def _replicated_rows(node) -> Optional[tuple]:
    """(x, E) if ``node`` holds the rows of a 2-D x (S, d) E times over, copy e at rows e*S..e*S+S-1:
    ``x.repeat(E, 1)`` (transformers' Llama4), or ``torch.gather(x, 0, I.reshape(-1, 1).expand(-1, d))``
    with I an ``_arange_table`` (E, S) of x's S rows (Meta's Llama 4 ``moe.py``): row e*S + s of the
    row-major flattened I is s, and the expanded index spans all d columns of x, so row e*S + s is
    x[s] whole."""
    E = _repeat_count(node)
    if E is not None:
        return node.args[0], E
    if not (isinstance(node, fx.Node) and ((node.op == "call_function" and node.target is torch.gather)
                                           or (node.op == "call_method" and node.target == "gather"))):
        return None
    from .combine import expanded_rows
    x, dim, index = arg(node, 0, "input"), arg(node, 1, "dim"), arg(node, 2, "index")
    if dim != 0 or node.kwargs.get("sparse_grad", False) or len(node.args) + len(node.kwargs) != 3 \
            or not isinstance(x, fx.Node):
        return None
    I, xs, gs = expanded_rows(index), shape_of(x), shape_of(node)
    table = _arange_table(I) if isinstance(I, fx.Node) else None
    if table is None or xs is None or len(xs) != 2 or gs is None or len(gs) != 2:
        return None
    S, E = table
    if not (same(S, xs[0]) and same(gs[1], xs[1]) and same(gs[0], xs[0] * E)):
        return None
    return x, E


def _transposed_2d(node) -> Optional[fx.Node]:
    """R if ``node`` is ``R.transpose(0, 1)`` / ``R.t()`` / ``R.T`` / ``R.permute(1, 0)`` of a 2-D R."""
    if not isinstance(node, fx.Node):
        return None
    inner = transpose_of(node)
    if inner is None and node.op == "call_method" and node.target == "permute":
        dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) else node.args[1:]
        inner = node.args[0] if tuple(dims) in ((1, 0), (-1, -2), (1, -2), (-1, 0)) else None
    return inner if isinstance(inner, fx.Node) and len(shape_of(inner) or ()) == 2 else None


def _expert_major_column(node) -> Optional[tuple]:
    """(R, False) if ``node`` is ``R.transpose(0, 1).reshape(-1, 1)`` (``view``, ``.t()``, ``.T``) of a 2-D
    R (S, E): a column whose row e*S + s is R[s, e] (the row-major order of R transposed). (C, True) if
    it is ``C.reshape(-1, 1)`` of C = ``sigmoid(X.transpose(0, 1))`` (casts around either) of a 2-D X
    (S, E) (Meta's Llama 4): C is (E, S), expert-major already, and C[e, s] is sigmoid(X[s, e]), an
    elementwise function of X transposed; ``_zero_off_top_k`` proves X's part."""
    if not (isinstance(node, fx.Node) and node.op == "call_method" and node.target in ("reshape", "view")):
        return None
    s = shape_of(node)
    if s is None or len(s) != 2 or not _size_one(s[1]):
        return None
    R = _transposed_2d(node.args[0])
    if R is not None:
        return R, False
    C = node.args[0]
    sq = _squash(safety.strip_casts(C))
    if sq is not None and _transposed_2d(safety.strip_casts(sq.args[0])) is not None:
        return C, True
    return None


def _squash(node) -> Optional[fx.Node]:
    """``node`` if it is ``sigmoid(t)`` (function or method, one argument), else None."""
    if isinstance(node, fx.Node) and ((node.op == "call_function" and node.target in _SIGMOID)
                                      or (node.op == "call_method" and node.target == "sigmoid")) \
            and len(node.args) == 1 and not node.kwargs:
        return node
    return None


def _top_k_indices(idx) -> Optional[tuple]:
    """(scores, K, dim) if ``idx`` is the indices of ``torch.topk(scores, K, dim)`` (or the method)."""
    if not (isinstance(idx, fx.Node) and idx.op == "call_function" and idx.target is operator.getitem
            and idx.args[1] == 1 and isinstance(idx.args[0], fx.Node)):
        return None
    tk = idx.args[0]
    if not ((tk.op == "call_function" and tk.target is torch.topk) or (tk.op == "call_method" and tk.target == "topk")):
        return None
    k = tk.args[1] if len(tk.args) > 1 else tk.kwargs.get("k")
    dim = tk.args[2] if len(tk.args) > 2 else tk.kwargs.get("dim", -1)
    return tk.args[0], int_value(k), dim


def _zero_off_top_k(R: fx.Node, expert_major: bool = False) -> tuple:
    """Prove R[s, e] == 0 exactly for every e not among the top-k choices idx[s] (distinct: topk
    indices): R is ``sigmoid`` of a matrix of -inf, or a matrix of zeros, into which the top-k values
    are scattered at the top-k indices, with only casts between and nothing else writing R, the
    matrix, or anything on the way from one to the other. ``expert_major``: R is (E, S), the sigmoid
    of that matrix transposed (``_expert_major_column``), and the claim is about R's transpose.
    Returns (idx, K, [the in-place scatter], the logits the top-k was taken of)."""
    inner = safety.strip_casts(R)
    squash = _squash(inner)
    if squash is not None:
        inner = safety.strip_casts(inner.args[0])
    if expert_major:
        need(squash is not None and _transposed_2d(inner) is not None,
             f"{R.name}: not the sigmoid of a transposed score matrix", part="slots_dispatch")
        inner = safety.strip_casts(_transposed_2d(inner))
    scatter = isinstance(inner, fx.Node) and not set(inner.kwargs) - {"dim", "index", "src", "value"} and (
        (inner.op == "call_method" and inner.target in ("scatter_", "scatter"))
        or (inner.op == "call_function" and inner.target is torch.scatter))
    need(scatter,
         f"the dense scores {R.name} that scale the experts' inputs are not a scatter of the top-k values into a "
         f"constant matrix ({R.name} is computed from {getattr(inner, 'name', inner)}): the unselected (expert, "
         "token) scores are not provably 0, so every expert would have to run on every token", part="slots_dispatch")
    base, dim, idx = inner.args[0], arg(inner, 1, "dim"), arg(inner, 2, "index")
    need(len(inner.args) + len(inner.kwargs) == 4, f"{inner.name}: not scatter(dim, index, src)", part="slots_dispatch")
    need(dim in (1, -1), f"{inner.name}: the router scores are scattered along axis {dim}, not "
                                           "along the experts", part="slots_dispatch")
    fill = None
    if isinstance(base, fx.Node) and base.op == "call_function" and base.target in _CONST_BASE:
        kind = _CONST_BASE[base.target]
        if kind in ("zeros_like", "zeros"):
            fill = 0.0
        elif len(base.args) == 2:
            fill = base.args[1]
        else:
            fill = base.kwargs.get("fill_value")
    elif isinstance(base, fx.Node) and base.op == "call_method" and base.target in ("new_zeros", "new_full"):
        fill = 0.0 if base.target == "new_zeros" else (base.args[2] if len(base.args) > 2 else
                                                        base.kwargs.get("fill_value"))
    need(isinstance(fill, (int, float)) and not isinstance(fill, bool),
         f"{inner.name}: the matrix the top-k scores are scattered into is not a constant (zeros / full_like)",
         part="slots_dispatch")
    if squash is not None:
        need(fill == -math.inf, f"the unselected router scores are sigmoid({fill}), not exactly 0 "
                                                  f"({squash.name}): every expert would have to run on every token",
                                                  part="slots_dispatch")
    else:
        need(fill == 0, f"the unselected router scores are {fill}, not exactly 0: every expert "
                                          "would have to run on every token", part="slots_dispatch")
    tk = _top_k_indices(safety.strip_identity(idx))
    need(tk is not None, f"{inner.name}: the scores are scattered at {getattr(idx, 'name', idx)}, "
                                           "not at the indices of a top-k (distinct per token)", part="slots_dispatch")
    logits, K, tk_dim = tk
    ls, Rs, ix = shape_of(logits), shape_of(R), shape_of(idx)
    Rs = tuple(Rs)[::-1] if expert_major and Rs is not None else Rs
    need(K is not None and tk_dim in (1, -1) and ls is not None and len(ls) == 2,
         f"{idx.name}: not a constant top-k over the experts of (S, E) logits", part="slots_dispatch")
    need(Rs is not None and ix is not None and len(ix) == 2 and same(ix[0], Rs[0])
         and same(ls[1], Rs[1]) and same(ls[0], Rs[0]) and int_value(ix[1]) == K,
         f"{idx.name}: the top-k indices are not (S, K) for the (S, E) score matrix {R.name}", part="slots_dispatch")
    # nothing else writes the score matrix, nor what it is computed from (through any view)
    path, n = [], R
    while isinstance(n, fx.Node) and n is not base:
        path.append(n)
        n = n.args[0] if n.args else n.kwargs.get("input")
    need(n is base, f"the dense score matrix {R.name} is not computed from {base.name} alone", part="slots_dispatch")
    path.append(base)
    own = [inner] if inner.op == "call_method" and inner.target == "scatter_" else []
    for p in path:
        for w in safety.writes_to(p):
            need(w in own, f"the dense score matrix {R.name} is written by something else than "
                                             f"the top-k scatter ({w.format_node()}): its unselected scores are not "
                                             "provably 0", part="slots_dispatch")
    return idx, K, own, logits


@register("slots_dispatch", "dense_scores",
          "(x.repeat(E, 1) * R.transpose(0, 1).reshape(-1, 1)).view(E, -1, d): every token in every expert's "
          "slots, inputs scaled by a dense (S, E) score matrix that is 0 off the top-k (Llama4); the rows also "
          "as gather(x, 0, arange(S).expand(E, -1).reshape(-1, 1).expand(-1, d)), the column also as "
          "sigmoid(X.transpose(0, 1)).reshape(-1, 1), the scaled rows optionally .detach()-ed (Meta's Llama 4)")
def dense_scores(slots) -> Optional[SlotsDispatch]:
    s = shape_of(slots)
    if s is None or len(s) != 3 or not (slots.op == "call_method" and slots.target in ("view", "reshape")):
        return None
    xin, detached = _undetached(slots.args[0])
    if not (isinstance(xin, fx.Node) and xin.op == "call_function" and xin.target in _MUL and len(xin.args) == 2
            and not xin.kwargs):
        return None
    for rep, col in (xin.args, xin.args[::-1]):
        rows, column = _replicated_rows(safety.strip_identity(rep)), _expert_major_column(col)
        if rows is not None and column is not None:
            break
    else:
        return None
    (x, E), (R, expert_major) = rows, column
    xs, Rs = shape_of(x), shape_of(R)
    Rs = tuple(Rs)[::-1] if expert_major else Rs
    need(int_value(Rs[1]) == E and same(Rs[0], xs[0]),
         f"{xin.name}: the tokens are repeated {E} times but scaled by {R.name} of shape {tuple(Rs)}, not (S, E) for "
         f"x {tuple(xs)}", part="slots_dispatch")
    need(int_value(s[0]) == E and same(s[1], xs[0]) and same(s[2], xs[1]),
         f"{slots.name}: the scaled copies of the tokens are not viewed (E, S, d), expert-major", part="slots_dispatch")
    idx, K, own, logits = _zero_off_top_k(R, expert_major)
    return SlotsDispatch(kind="dense", x=x, slots=slots, num_experts=E, scores=R, choices=idx, top_k=K, writes=own,
                         inputs=[logits], scores_expert_major=expert_major, detached=detached)


def _undetached(node) -> tuple:
    """(t, True) if ``node`` is ``t.detach()`` / ``torch.detach(t)``, else (node, False)."""
    if isinstance(node, fx.Node) and len(node.args) == 1 and not node.kwargs and (
            (node.op == "call_method" and node.target == "detach")
            or (node.op == "call_function" and node.target is torch.detach)):
        return node.args[0], True
    return node, False


# --------------------------------------------------------------------------- slots_experts

def _inplace_bias(node) -> bool:
    """``h += b`` (``h.add_(b)``) of an (E, 1, out) floating bias on a projection output h that
    nothing reads before (``inplace_as``) and that is the projection's own fresh result (no view
    of something else): the value ``h + b`` (nanoMoE's ``x = bmm(x, c_fc); x += fc_bias``). The bias
    may have another floating dtype than h: under autocast the GEMM gives bf16 and the fp32 bias
    parameter is added in place into it (nanoMoE trains so), which rounds the sum to h's dtype; the
    fused op adds the bias in its compute dtype (a difference of one rounding, as every GEMM of the
    op accumulates differently from eager)."""
    if inplace_as(node) != "add" or node.target not in (operator.iadd, "add_"):
        return False
    h, b = node.args
    if not (isinstance(b, fx.Node) and safety.is_fresh(h)) or not (
            dtype_of(b) is not None and dtype_of(b).is_floating_point and dtype_of(h) is not None
            and dtype_of(h).is_floating_point):
        return False
    inner = _batched_projection(h)
    bs = shape_of(b)
    return inner is not None and inner[3] is None and bs is not None and len(bs) == 3 and _size_one(bs[1])


def _batched_projection(node) -> Optional[tuple]:
    """(input, weight, transposed, bias) of one projection of all slots: ``bmm(z, W)``, ``z @ W``,
    an einsum; W (E, in, out) is ``transposed`` (Linear layout is (E, out, in)); bias (E, 1, out)."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_function" and node.target in _ADD and len(node.args) == 2 and not node.kwargs:
        for a, b in (node.args, node.args[::-1]):
            inner = _batched_projection(a) if isinstance(a, fx.Node) else None
            bs = shape_of(b) if isinstance(b, fx.Node) else None
            if inner is not None and inner[3] is None and bs is not None and len(bs) == 3 and _size_one(bs[1]):
                return inner[0], inner[1], inner[2], b
        return None
    if _inplace_bias(node):
        inner = _batched_projection(node.args[0])
        return inner[0], inner[1], inner[2], node.args[1]
    z = w = None
    if (node.op == "call_function" and node.target in (torch.bmm, torch.matmul, operator.matmul)) or \
            (node.op == "call_method" and node.target in ("bmm", "matmul", "__matmul__")):
        if len(node.args) == 2 and not node.kwargs:
            z, w = node.args
    es = einsum_parts(node)
    if es is not None and len(es[2]) == 2:
        (zl, wl), outl, (z0, w0) = es
        if len(zl) == 3 and len(wl) == 3 and len(outl) == 3 and len(set(zl)) == 3 and outl[:2] == zl[:2] \
                and outl[2] not in zl and wl[0] == zl[0] and set(wl[1:]) == {zl[2], outl[2]}:
            return z0, w0, wl[1] == zl[2], None
        return None
    if not (isinstance(z, fx.Node) and isinstance(w, fx.Node)):
        return None
    if len(shape_of(z) or ()) != 3 or len(shape_of(w) or ()) != 3:
        return None
    inner = transpose_of(w)
    if inner is None and w.op == "call_method" and w.target == "transpose" and len(w.args) == 3 and \
            set(w.args[1:]) in ({1, 2}, {-1, -2}, {1, -1}, {2, -2}):
        inner = w.args[0]
    if inner is not None and len(shape_of(inner) or ()) == 3:
        return z, inner, False, None
    return z, w, True, None


def _no_dropout(node) -> None:
    if isinstance(node, fx.Node) and node.op == "call_function" and node.target is Fn.dropout \
            and not safety.is_identity_dropout(node):
        decline("slots_experts", f"{node.name}: dropout with p > 0 in training inside the experts (random per "
                                 "element): the fused op cannot reproduce it")


@register("slots_experts", "bmm_mlp", "bmm/matmul/einsum MLP on (E, C, d) slots with stacked (E, ., .) weights")
def bmm_mlp(out) -> Optional[ExpertMLP]:
    # the shared MLP walker (patterns/experts.py) with the batched projection over slots
    return _experts_part.walk_mlp(out, _batched_projection, "slots_experts", "aten::bmm", check=_no_dropout)


@dataclasses.dataclass
class SlotsMLPs(ExpertMLP):
    """Experts, one module per expert on its own slots (``experts``: one ``ExpertMLP`` per expert, in
    expert order, all of one structure); the stacked fields are expert 0's (structure only)."""

    experts: list = dataclasses.field(default_factory=list)

    def weights(self) -> tuple:
        return tuple(w for m in self.experts for w in m.weights())


def _merged_rows_of(rows, like) -> bool:
    """``rows`` is (E * C, d) for ``like`` (E, C, d): the same elements row-major, row e * C + c is (e, c)."""
    s, ls = shape_of(rows), shape_of(like)
    return s is not None and ls is not None and len(s) == 2 and len(ls) == 3 and same(s[0], ls[0] * ls[1]) \
        and same(s[1], ls[2])


def _order_step(node) -> Optional[fx.Node]:
    """The input of ``node`` when ``node`` keeps the row-major order of its input's elements: a row-major
    reshape (``_ROW_MAJOR``), ``unsqueeze``/``squeeze``, or a ``transpose``/``permute`` that moves only
    size-1 axes (the axes of other sizes keep their order: ColossalAI's ``MLPExperts``
    ``x.unsqueeze(0).transpose(0, 1)`` of (E, C, d)); else None. A size that is not a constant 1 counts
    as an axis of its own, so a symbolic size never lets a real transpose through."""
    if not (isinstance(node, fx.Node) and node.op == "call_method" and node.args
            and isinstance(node.args[0], fx.Node)) or node.kwargs:
        return None
    src = node.args[0]
    if node.target in _ROW_MAJOR + ("unsqueeze", "squeeze"):
        return src
    s = shape_of(src)
    if s is None or node.target not in ("transpose", "permute"):
        return None
    rank, dims = len(s), list(node.args[1:])
    if node.target == "permute" and len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = list(dims[0])
    if not all(isinstance(d, int) for d in dims):
        return None
    if node.target == "transpose":
        if len(dims) != 2:
            return None
        perm = list(range(rank))
        a, b = dims[0] % rank, dims[1] % rank
        perm[a], perm[b] = perm[b], perm[a]
    else:
        perm = [d % rank for d in dims]
    if sorted(perm) != list(range(rank)):
        return None
    moved = [d for d in perm if not _size_one(s[d])]
    return src if moved == sorted(moved) else None


def _strip_layout(node) -> fx.Node:
    """Follow order-keeping layout steps (``_order_step``) and identities back to the producer."""
    while True:
        inner = safety.strip_identity(node)
        step = _order_step(inner)
        inner = inner if step is None else step
        if inner is node:
            return node
        node = inner


def _slots_behind(rows, E, C, d) -> Optional[fx.Node]:
    """The first (E, C, d) tensor behind ``rows`` through order-keeping steps (``_order_step``), each step
    unwritten in place: ``rows`` holds its elements in row-major order (ColossalAI's experts' (1, E, C, d)
    output viewed ``(-1, d)``: row e * C + c is slot (e, c))."""
    node, chain = rows, []
    while isinstance(node, fx.Node):
        chain.append(node)
        st = shape_of(node)
        if node is not rows and st is not None and len(st) == 3 and same(st[0], E) and same(st[1], C) \
                and same(st[2], d):
            if any(safety.writes_to(n) for n in chain):
                return None
            return node
        node = _order_step(node)
    return None


def _selected(node) -> Optional[tuple]:
    """(source, axis, size of the axis, position) of ``src[i]`` (an int index: axis 0) or
    ``src.select(axis, i)``: one slice along the axis, the axis dropped."""
    if not (isinstance(node, fx.Node) and node.args and isinstance(node.args[0], fx.Node)):
        return None
    src = node.args[0]
    s = shape_of(src)
    if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[1], int) \
            and not isinstance(example_value(src), (tuple, list)):
        axis, i = 0, node.args[1]
    elif node.op == "call_method" and node.target == "select" and len(node.args) == 3 and not node.kwargs \
            and all(isinstance(v, int) for v in node.args[1:]):
        axis, i = node.args[1], node.args[2]
    else:
        return None
    if not s:
        return None
    n = int_value(s[axis % len(s)])
    return (src, axis % len(s), n, i % n) if n is not None and -n <= i < n else None


def _chunk_of(node) -> Optional[tuple]:
    """(source, axis, chunks, position, kept) of ``src.chunk(n, axis)[i]`` (``torch.chunk`` too; the axis
    kept, size 1) or of ``_selected`` ``src[i]`` / ``src.select(axis, i)`` (one slice each: the axis
    dropped, ``kept`` False)."""
    sel = _selected(node)
    if sel is not None:
        return sel + (False,)
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target is operator.getitem
            and isinstance(node.args[1], int) and isinstance(node.args[0], fx.Node)):
        return None
    ch = node.args[0]
    if not ((ch.op == "call_method" and ch.target == "chunk") or (ch.op == "call_function" and ch.target is torch.chunk)):
        return None
    src, n, dim = ch.args[0], arg(ch, 1, "chunks"), arg(ch, 2, "dim", 0)
    rank = len(shape_of(src) or ())
    if not isinstance(src, fx.Node) or not isinstance(dim, int) or not rank:
        return None
    return src, dim % rank, n, node.args[1], True


def _expert_axis(node, like) -> Optional[int]:
    """The axis of ``node`` that holds the experts when its shape is (1, .., 1, E, C, d) and ``like``
    is (E, C, d): a row-major reshape between the two keeps every element in place."""
    s, ls = shape_of(node), shape_of(like)
    if s is None or ls is None or len(s) < 3 or len(ls) != 3:
        return None
    if all(_size_one(v) for v in s[:-3]) and all(same(p, q) for p, q in zip(s[-3:], ls)):
        return len(s) - 3
    return None


def _lead_rows(node) -> Optional[fx.Node]:
    """t if ``node`` is a row-major reshape (``_row_major_source``) of t with the same last dimension:
    both hold the same rows (length n) in the same order, only the leading dimensions are regrouped."""
    t, steps = _row_major_source(node)
    s, st = shape_of(node), shape_of(t)
    if steps == 0 or not s or not st or not same(s[-1], st[-1]):
        return None
    return t


def _unsqueezed(piece, axis) -> Optional[fx.Node]:
    """q if ``piece`` is ``q.unsqueeze(axis)`` (``axis`` of the result, negative counted too)."""
    if isinstance(piece, fx.Node) and piece.op == "call_method" and piece.target == "unsqueeze" and \
            len(piece.args) == 2 and not piece.kwargs and isinstance(piece.args[1], int) and axis is not None:
        rank = len(shape_of(piece) or ())
        if rank and piece.args[1] % rank == axis:
            return piece.args[0]
    return None


def _row_wise_expert(piece, e: int) -> ExpertMLP:
    """The expert MLP whose output is ``piece``, and its input: also through a row-major flatten of its
    input's leading dimensions and the unflatten of its output back to them (fairseq's
    ``x.reshape(-1, d) ... x.view(x_shape)``): the MLP maps each row on its own (linear, activation,
    linear over the last axis), so when the flatten keeps the last dimension and the unflatten gives the
    output the input's leading shape, each output row is the MLP of the input row at the same place."""
    what = f"{getattr(piece, 'name', piece)}: expert {e} on its chunk of the slots"
    inner = _lead_rows(piece) if isinstance(piece, fx.Node) else None
    if inner is None or recognise("experts", piece) is not None:
        return recognise("experts", piece, required=what)
    m = recognise("experts", inner, required=what)
    t = _lead_rows(safety.strip_identity(m.input))
    need(t is not None and m.row_scale is None, f"{m.input.name}: expert {e}'s output is reshaped ({piece.name}) "
                                                "but its input is not its chunk's rows flattened the same way",
         part="slots_experts")
    sp, st = shape_of(piece), shape_of(t)
    need(len(sp) == len(st) and all(same(p, q) for p, q in zip(sp[:-1], st[:-1])),
         f"{piece.name}: expert {e}'s output rows are regrouped as {tuple(sp)}, not in the leading shape "
         f"{tuple(st)} of the input rows", part="slots_experts")
    return dataclasses.replace(m, input=t, output=piece)


@register("slots_experts", "chunked_mlps",
          "torch.cat([f_e(c) for c, f_e in zip(z.reshape(1, E, C, d).chunk(E, 1), experts)], 1).reshape(E, C, d): "
          "one ModuleList expert per slot chunk (fairscale MOELayer; fairseq's experts flatten each chunk's rows, "
          "x.reshape(-1, d) ... .view(x_shape)); z may be the (E * C, d) rows of an mm dispatch")
def chunked_mlps(out) -> Optional[SlotsMLPs]:
    cat = _strip_layout(out)
    if not (isinstance(cat, fx.Node) and cat.op == "call_function" and cat.target is torch.cat
            and isinstance(cat.args[0], (list, tuple)) and len(shape_of(out) or ()) == 3):
        return None
    pieces, axis = list(cat.args[0]), _expert_axis(cat, out)
    dim = arg(cat, 1, "dim", 0)
    need(axis is not None and isinstance(dim, int) and dim % len(shape_of(cat)) == axis,
         f"{cat.name}: the concatenated expert outputs are not (1, .., E, C, d) joined along the experts, "
         f"reshaped to {out.name} (E, C, d)", part="slots_experts")
    E = len(pieces)
    need(int_value(shape_of(out)[0]) == E, f"{cat.name}: {E} pieces for {shape_of(out)[0]} experts",
         part="slots_experts")
    mlps, slots = [], None
    for e, p in enumerate(pieces):
        q = _unsqueezed(p, axis)
        m = _row_wise_expert(p if q is None else q, e)
        ch = _chunk_of(safety.strip_identity(m.input))
        need(ch is not None and ch[3] == e and int_value(ch[2]) == E,
             f"{m.input.name}: expert {e} does not run on chunk {e} of {E} of the slots", part="slots_experts")
        # a slice that drops the experts' axis (x[e]) comes back through unsqueeze(axis), a chunk keeps it
        need(ch[4] == (q is None), f"{p.name}: expert {e}'s output is not put back along the axis its input "
                                   "was taken from (x[e] needs .unsqueeze(axis), a chunk keeps its axis)",
             part="slots_experts")
        src = _strip_layout(ch[0])
        need((slots is None or src is slots) and _expert_axis(ch[0], out) == ch[1],
             f"{m.input.name}: the chunks are not taken along the experts of one (E, C, d) slots tensor",
             part="slots_experts")
        slots = src
        need(safety.same_shape(slots, out) or _merged_rows_of(slots, out),
             f"{slots.name}: the chunked slots are not (E, C, d) like the experts' outputs {out.name}, nor "
             "their (E * C, d) rows", part="slots_experts")
        mlps.append(m)
    m0 = mlps[0]
    for m in mlps[1:]:
        need((m.activation, m.interleaved, m.transposed, m.gemm) == (m0.activation, m0.interleaved,
                                                                                     m0.transposed, m0.gemm),
             "the experts differ in activation, weight layout or GEMM", part="slots_experts")
        need(all((a is None) == (b is None) and (a is None or safety.same_shape(a, b))
                                  for a, b in zip(m.weights(), m0.weights())),
             "the experts have weights (or biases) of different shapes", part="slots_experts")
    return SlotsMLPs(input=slots, output=out, activation=m0.activation, gate=m0.gate, up=m0.up, down=m0.down,
                     b_gate=m0.b_gate, b_up=m0.b_up, b_down=m0.b_down, gemm=m0.gemm, transposed=set(m0.transposed),
                     interleaved=m0.interleaved, experts=mlps)


# --------------------------------------------------------------------------- slots_combine

@register("slots_combine", "combine_einsum", 'einsum("sec,ecm->sm", combine_weights, expert_outputs)')
def combine_einsum(node) -> Optional[SlotsCombine]:
    es = einsum_parts(node)
    if es is None or len(es[2]) != 2:
        return None
    ins, outl, ops = es
    for (cl, yl), (c, y) in ((ins, ops), (ins[::-1], ops[::-1])):
        if len(cl) == 3 and len(yl) == 3 and len(outl) == 2 and yl[:2] == cl[1:] and outl == cl[0] + yl[2] \
                and len(set(cl + yl)) == 4:
            return SlotsCombine(kind="einsum", anchor=node, experts_out=y, weights=c, dtype=dtype_of(c))
        # per group: einsum("ebcd,bnec->bnd"): group b's tokens read group b's slots
        if len(cl) == 4 and len(yl) == 4 and len(outl) == 3 and yl[:3] == cl[2] + cl[0] + cl[3] \
                and outl == cl[:2] + yl[3] and len(set(cl + yl)) == 5:
            return SlotsCombine(kind="einsum", anchor=node, experts_out=y, weights=c, dtype=dtype_of(c), groups=True)
    return None


def _flattened(node, rank: int) -> Optional[fx.Node]:
    """t if ``node`` is ``t.view(a, b)`` / ``reshape`` of a 3-D t merging two of its axes, else None."""
    if isinstance(node, fx.Node) and node.op == "call_method" and node.target in ("view", "reshape") and \
            isinstance(node.args[0], fx.Node) and len(shape_of(node.args[0]) or ()) == rank:
        return node.args[0]
    return None


@register("slots_combine", "combine_matmul", "combine.view(S, -1) @ y.view(-1, d) (nanoMoE)")
def combine_matmul(node) -> Optional[SlotsCombine]:
    mm = _matmul_args(node)
    if mm is None:
        return None
    a, b = mm
    sa, sb = shape_of(a), shape_of(b)
    if sa is None or sb is None or len(sa) != 2 or len(sb) != 2:
        return None
    w, y = _flattened(safety.strip_casts(a), 3), _flattened(b, 3)
    if w is not None and y is None:  # the outputs behind unit axes, (1, E, C, d) viewed (-1, d)
        sw = shape_of(w)
        y = _slots_behind(b, sw[1], sw[2], sb[1])
        need(y is not None or not (same(sa[0], sw[0]) and same(sa[1], sw[1] * sw[2]) and same(sb[0], sa[1])),
             f"{node.name}: the combine weights {w.name} (S, E, C) meet rows {b.name} that are not an (E, C, d) "
             "tensor in row-major order (a transpose of axes other than size-1 ones, or a write in place, between)",
             part="slots_combine")
    if w is None or y is None:
        return None
    sw, sy = shape_of(w), shape_of(y)
    if not (same(sa[0], sw[0]) and same(sa[1], sw[1] * sw[2]) and same(sb[0], sy[0] * sy[1]) and same(sb[1], sy[2])
            and same(sw[1], sy[0]) and same(sw[2], sy[1])):
        return None
    weights = a.args[0] if a.op == "call_method" and a.target in ("view", "reshape") else w
    return SlotsCombine(kind="einsum", anchor=node, experts_out=y, weights=weights, dtype=dtype_of(a))


def _slot_rows(index) -> Optional[fx.Node]:
    """The (E, C) token table behind a scatter/index_add index over the R = E*C slot rows."""
    from .combine import expanded_rows
    r = expanded_rows(index) if isinstance(index, fx.Node) else None
    if r is not None and len(shape_of(r) or ()) == 2:
        return r
    return _flat_of(r if r is not None else index)


def _scored(v) -> tuple:
    """(core, score) of ``core * score`` where score broadcasts along the last axis only."""
    if isinstance(v, fx.Node) and v.op == "call_function" and v.target in _MUL and len(v.args) == 2:
        for a, b in (v.args, v.args[::-1]):
            sa, sb = shape_of(a), shape_of(b)
            if sa is not None and sb is not None and len(sa) == len(sb) and _size_one(sb[-1]) and \
                    not _size_one(sa[-1]) and all(same(p, q) for p, q in zip(sa[:-1], sb[:-1])):
                return a, b
    return v, None


@register("slots_combine", "scatter_slots", "acc.scatter_add_(0, idx.reshape(-1, 1).expand(-1, d), "
                                            "(y * g[..., None]).reshape(-1, d)); index_add_(0, idx.reshape(-1), ...)")
def scatter_slots(node) -> Optional[SlotsCombine]:
    if node.op != "call_method" or node.target not in ("scatter_add_", "scatter_add", "index_add_", "index_add"):
        return None
    acc, dim = node.args[0], arg(node, 1, "dim")
    if node.target.startswith("scatter"):
        index, v = arg(node, 2, "index"), arg(node, 3, "src")
        if not (isinstance(index, fx.Node) and safety.same_shape(index, v)):
            return None
    else:
        index, v = arg(node, 2, "index"), arg(node, 3, "source")
        if "alpha" in node.kwargs or len(node.args) > 4:
            return None
    idx = _slot_rows(index)
    if dim != 0 or idx is None or not isinstance(v, fx.Node) or not isinstance(acc, fx.Node):
        return None
    core, score = _scored(safety.strip_identity(v))
    y = core
    if y.op == "call_method" and y.target in ("reshape", "view") and len(shape_of(y.args[0]) or ()) == 3:
        y = y.args[0]
    elif y.op == "call_method" and y.target == "flatten" and tuple(y.args[1:]) in ((0, 1), ()) and \
            len(shape_of(y.args[0]) or ()) == 3 and len(y.args) == 3:
        y = y.args[0]
    else:
        return None
    if score is None:
        y, score = _scored(safety.strip_identity(y))
    ys, ix = shape_of(y), shape_of(idx)
    if ys is None or len(ys) != 3 or not (same(ys[0], ix[0]) and same(ys[1], ix[1])):
        return None
    if score is not None:
        ss = shape_of(score)
        n = 1
        for p in ss:
            n = n * p
        need(same(n, ix[0] * ix[1]), f"{score.name}: the weight of each slot is not one number", part="slots_combine")
    return SlotsCombine(kind="scatter", anchor=node, experts_out=y, index=idx, score=score, acc=acc,
                        inplace=node.target.endswith("_"))


_ROW_MAJOR = ("view", "reshape", "flatten", "contiguous")


def _row_major_source(node) -> tuple:
    """(source, steps): follow ``view``/``reshape``/``flatten``/``contiguous`` (each keeps the row-major
    order of the elements) back to the first node that is none of them."""
    steps = 0
    while isinstance(node, fx.Node) and node.op == "call_method" and node.target in _ROW_MAJOR and \
            isinstance(node.args[0], fx.Node) and not node.kwargs:
        node, steps = node.args[0], steps + 1
    return node, steps


@register("slots_combine", "expert_sum", "y.view(-1, d).reshape(E, -1, d).sum(0): each slot's outputs summed over "
                                         "the experts (Llama4)")
def expert_sum(node) -> Optional[SlotsCombine]:
    if not ((node.op == "call_method" and node.target == "sum") or (node.op == "call_function" and node.target is torch.sum)):
        return None
    r = node.args[0] if node.args else None
    if not isinstance(r, fx.Node) or len(shape_of(r) or ()) != 3 or set(node.kwargs) - {"dim"} or len(node.args) > 2:
        return None
    y, steps = _row_major_source(r)
    if steps == 0 or len(shape_of(y) or ()) != 3 or _batched_projection(safety.strip_identity(y)) is None:
        return None
    dim = arg(node, 1, "dim")
    if isinstance(dim, (tuple, list)) and len(dim) == 1:
        dim = dim[0]
    if not isinstance(dim, int):  # a total sum (a loss), or over several axes: not a combine
        return None
    ys, rs = shape_of(y), shape_of(r)
    need(all(same(p, q) for p, q in zip(ys, rs)),
         f"{r.name} regroups the rows of the experts' outputs {y.name} {tuple(ys)} as {tuple(rs)}, not in the "
         "(E, C, d) layout they were computed in: its sum does not add the outputs of one slot across the experts",
         part="slots_combine")
    need(dim in (0, -3), f"{node.name} sums the (E, C, d) experts' outputs over axis {dim}, not over "
                                          "the experts (axis 0)", part="slots_combine")
    for w in safety.writes_to(y):
        decline("slots_combine", f"the experts' outputs {y.name} are modified in place by {w.format_node()} before "
                                 "they are summed")
    return SlotsCombine(kind="sum", anchor=node, experts_out=y)


# --------------------------------------------------------------------------- the composition

def _acc_start(acc: fx.Node):
    from .per_expert import acc_start
    return acc_start(acc)


def _base_of(node: fx.Node) -> fx.Node:
    """The tensor whose memory ``node`` views (``node`` itself when it is no view)."""
    while node.op in ("call_function", "call_method") and node.args and isinstance(node.args[0], fx.Node) \
            and safety.is_view_of(node, node.args[0]):
        node = node.args[0]
    return node


def _initialised(w: fx.Node, order: dict) -> bool:
    """``w`` is the first write into a tensor the graph allocated itself, filled with a constant or
    nothing (``safety.is_allocation``: zeros, full_like, new_zeros, empty, ...), and comes before
    anything reads it: every user of it and of its views, except the writes and the views themselves,
    comes after ``w``, and nothing writes into what ``w`` returns (nanoMoE: ``probs = full_like(logits,
    -inf); probs.scatter_(-1, idx, v); softmax(probs)``; fairscale's ``one_hot``: ``zeros(...).scatter_(-1,
    idx[..., None], 1)``). Every read then sees the written value: the write is how the value is
    computed, not a change to it. A tensor computed from something (``cumsum(m) - 1``, ``one_hot(i)``,
    a product, a sum) is not excused: the proof reads it as its computation, which a write changes
    (``loc = cumsum(m) - 1; loc[0] = 2``). Later writes are the caller's to prove (``inplace_as``,
    ``_need_stable_leaves``)."""
    base = _base_of(w.args[0]) if w.args and isinstance(w.args[0], fx.Node) else None
    if base is None or not (safety.is_fresh(base) and safety.is_allocation(base)):
        return False
    writes = safety.writes_to(base)
    if not writes or writes[0] is not w or any(is_mutation(u, w) for u in w.users):
        return False
    return all(u in writes or safety.is_view_of(u, a) or order[u] > order[w]
               for a in safety.aliases(base) for u in a.users)


def _need_stable_leaves(term: SlotTerm, anchor: fx.Node, order: dict) -> None:
    """The composition reads each factor of a term (its ids, flags and weights) where the block was:
    prove that each holds there the value the block read. A write into a factor (or a view of it)
    before the anchor must come before every reader of it (it computes the value), or be ``a *= b``
    with a 0/1 ``b`` the term is multiplied by too (``mask *= lt(loc, C)``: the composition then
    gets mask * b * b == mask * b). Nothing may write a weight after the anchor: the fused op saves it
    for its backward pass."""
    flags = [f for f, _ in term.flags]
    ids = term.choice.ids if isinstance(term.choice, _ReshapedIds) else term.choice
    weights = [g for g, _ in term.weights]
    for f in [ids] + flags + weights:
        if not isinstance(f, fx.Node):
            continue
        late = [w for w in safety.writes_to(f) if order[w] > order[anchor]] if f in weights else []
        need(not late, f"{f.name}, a factor of the combine weights, is modified in place by "
                       f"{late[0].format_node() if late else ''} after the block: the fused op saves the weights "
                       "for the backward pass, which would then fail (eager does not save them)", part="proof")
        readers = [order[u] for a in safety.aliases(f) for u in a.users
                   if not safety.is_view_of(u, a) and not is_mutation(u, a)]
        first = min(readers, default=order[anchor])
        for w in safety.writes_to(f):
            if order[w] < first or order[w] >= order[anchor]:
                continue
            b = w.args[1] if inplace_as(w) == "mul" else None
            need(isinstance(b, fx.Node) and any(b is g for g in flags),
                 f"{f.name}, a factor of the combine weights, is modified in place by {w.format_node()} after "
                 "the block read it: where the fused op reads it, it holds another value", part="proof")


def _grouped_outputs(comb: SlotsCombine) -> fx.Node:
    """The experts' (E, G * C, d) outputs that a group combine's (E, G, C, d) operand is a row-major
    reshape of: row g * C + c is slot (g, c), as the dispatch merged them (``_grouped_slots``; the
    same (G, C) sizes are checked in ``analyse``)."""
    y4 = safety.strip_identity(comb.experts_out)
    y, steps = _row_major_source(y4)
    s, s4 = shape_of(y), shape_of(y4)
    need(steps > 0 and s is not None and s4 is not None and len(s) == 3 and len(s4) == 4 and same(s[0], s4[0])
         and same(s[1], s4[1] * s4[2]) and same(s[2], s4[3]),
         f"combine: {comb.experts_out.name} is not the experts' (E, G * C, d) outputs regrouped row-major into "
         "(E, G, C, d)", part="slots_combine")
    return safety.strip_identity(y)


def _upstream(roots, stop: set, own: Optional[set] = None) -> list:
    """Nodes that ``roots`` are computed from, not past ``stop``; with ``own`` (the writes a dispatch
    interprets itself, whose reads it lists in ``nodes``), also what the other in-place writes into them
    read (fairscale's ``zeros(...).scatter_(-1, slot.unsqueeze(-1), 1)``: the one-hot's value is computed
    from ``slot``, which no argument of the zeros names)."""
    seen, stack = [], list(roots)
    while stack:
        n = stack.pop()
        if not isinstance(n, fx.Node) or n in seen or n in stop or n.op != "call_function" and n.op != "call_method":
            continue
        seen.append(n)
        stack.extend(n.all_input_nodes)
        if own is not None:
            stack.extend(a for w in safety.writes_to(n) if w not in own for a in w.all_input_nodes)
    return seen


#: activations with act(0) == 0 (plain), gated ones (act(gate) * up, up(0) == 0) and swiglu3 (x1 * silu(x2) * up,
#: up(0) == 0): an expert without biases then maps 0 to 0
_ZERO_AT_ZERO = {"silu", "relu", "gelu", "gelu_tanh", "swiglu3"} | set(GATED_OF.values()) | \
    {g + "+up_first" for g in GATED_OF.values()}


def analyse(node: fx.Node) -> MoEBlock:
    comb = recognise("slots_combine", node)
    if comb is None:
        raise Declined("not a slots combine")
    y = safety.strip_identity(comb.experts_out)
    for n in (y, comb.experts_out):
        if n.op == "call_function" and n.target is Fn.dropout and not safety.is_identity_dropout(n):
            raise PartDeclined("slots_experts", f"{n.name}: dropout with p > 0 in training on the experts' output: "
                                                "the fused op cannot reproduce it")
    if comb.groups:
        y = _grouped_outputs(comb)
    mlp = recognise("slots_experts", y, required=f"{y.name}: the experts on the slots")
    z = safety.strip_identity(mlp.input)
    core, s_in = _scored(z)
    if s_in is not None and recognise("slots_dispatch", safety.strip_identity(core)) is not None:
        raise PartDeclined("proof", f"{z.name}: the slots are scaled before the experts (f(g * x)); the fused op "
                                    "applies scores to the outputs" + (" (and they are applied to the outputs too: "
                                                                       "twice)" if comb.score is not None else ""))
    disp = recognise("slots_dispatch", z, required=f"{z.name}: how the slots are filled from the tokens")
    E = disp.num_experts
    if isinstance(mlp, SlotsMLPs):
        need(len(mlp.experts) == E, f"proof: {len(mlp.experts)} expert modules for the dispatch's {E} experts")
    else:
        ws = {k: shape_of(w) for k, w in (("gate", mlp.gate), ("up", mlp.up), ("down", mlp.down)) if w is not None}
        need(all(s is not None and len(s) == 3 and int_value(s[0]) == E for s in ws.values()),
             f"proof: the stacked expert weights do not have {E} experts (the dispatch's)")
    need(comb.groups == (disp.groups is not None), f"proof: the slots are filled {'per' if disp.groups else 'without'} "
         f"group axis but combined {'per' if comb.groups else 'without'} group axis")
    if disp.groups is not None:
        need(safety.same_shape(comb.experts_out, disp.groups), f"proof: the experts' outputs {comb.experts_out.name} "
             f"are not read back in the (E, G, C, d) layout of the slots {disp.groups.name}")
    if disp.kind == "capacity":
        need(comb.kind == "einsum", "proof: capacity slots are combined by something else than the combine einsum")
        if disp.combine_weights is None:
            disp = _with_combine_weights(disp, safety.strip_casts(comb.weights))
        need(safety.strip_casts(comb.weights) is disp.combine_weights,
             f"proof: the output is combined with {comb.weights.name}, not with the combine weights "
             f"{disp.combine_weights.name} whose nonzeros dispatched the tokens")
        need(safety.same_shape(disp.x, node), "proof: the output is not (tokens, d)")
        for t in disp.terms:
            _need_stable_leaves(t, node, node_order(node.graph))
    elif disp.kind == "dense":
        need(comb.kind == "sum" or _token_scatter(comb, disp),
             "proof: dense slots (every token in every expert's slots) are combined by something else than a sum "
             "over the experts (or an unweighted scatter-add of slot (e, s) to token s)")
        need(safety.same_shape(disp.x, node if comb.kind == "sum" else comb.acc), "proof: the output is not (tokens, d)")
        # the unselected (expert, token) pairs compute f_e(0): dropping them is exact only if f_e(0) == 0
        biases = [k for k, b in (("gate", mlp.b_gate), ("up", mlp.b_up), ("down", mlp.b_down)) if b is not None]
        need(not biases, f"proof: the experts (slots_experts {mlp.spelling}) add biases ({', '.join(biases)}), so "
                          "f_e(0) != 0: the zero rows the dense dispatch gives the unselected (expert, token) pairs "
                          "contribute to the output, and dropping them would change it")
        need(mlp.activation in _ZERO_AT_ZERO, f"proof: the experts' activation {mlp.activation} is not known to map "
                                               "0 to 0: dropping the unselected (expert, token) pairs of the dense "
                                               "dispatch is not proven exact")
    else:
        need(comb.kind == "scatter", "proof: gathered slots are combined by something else than a scatter/index add")
        need(safety.equivalent(comb.index, disp.index),
             f"proof: the slots are gathered at {disp.index.name} but written back at {comb.index.name}")
        need(safety.same_shape(comb.acc, disp.x), "proof: the result is not (tokens, d)")
    # in place on the experts' path: only the bias adds read as h + b (``_inplace_bias``)
    biases = [n for n in _upstream([comb.experts_out], {disp.slots}) if _inplace_bias(n)]
    safety.need_pure_path(comb.experts_out, disp.slots, biases)

    # nothing the block reads is written in place (through any view), except the combine's own write
    order = node_order(node.graph)
    roots = [disp.slots] + [n for n in (comb.weights, comb.score, comb.index) if n is not None] + list(disp.nodes)
    stop = set(weight_nodes(mlp.weights()))
    # the tokens and the dispatch's inputs (the router logits of a dense dispatch) are checked themselves
    # (with their views and bases); what they are computed from (earlier layers, with their own in-place
    # accumulations) is not what the block reads
    inputs = [disp.x] + list(disp.inputs)
    # exempt: in-place arithmetic the block reads as a value (its result is read: ``inplace_as``), the first
    # write into an allocated (zeros / full) tensor before any read (``_initialised``), the dispatch's own
    # writes; what the other writes into a read tensor read is read too (``_upstream``'s ``own``)
    upstream = _upstream(roots, stop | set(inputs), own=set(disp.writes) | {node})
    as_value = set(upstream)
    for n in upstream + inputs:
        for w in safety.writes_to(n):
            if w is not node and order[w] < order[node] and not (inplace_as(w) and w in as_value) \
                    and w not in disp.writes and not _initialised(w, order):
                raise Declined(f"proof: {n.name}, which the block reads, is modified in place by {w.format_node()}")
    # the fused op reads the weights where the combine was: nothing may write them after the experts read them
    safety.need_unmodified(list(stop), disp.slots, node, "proof: the expert weights")
    start_kind, base = None, None
    if comb.kind == "scatter":
        start = _acc_start(comb.acc)
        if start is None and not comb.inplace:
            start = ("copy", comb.acc)  # acc.scatter_add(...) out of place: acc + the block
        need(start is not None and start[0] != "empty",
              f"combine: the result {comb.acc.name} does not start as zeros or a copy")
        start_kind, base = start
        if comb.inplace:
            need(safety.writes_to(comb.acc) == [node], f"combine: {comb.acc.name} is written by something else too")
            early = [u for u in comb.acc.users if u is not node and order[u] < order[node]]
            need(not early, f"combine: the result is read or viewed before the experts' outputs are added "
                             f"({early[0].format_node() if early else ''})")
    return _block(node, comb, mlp, disp, start_kind, base, order, biases)


def _token_scatter(comb: SlotsCombine, disp: SlotsDispatch) -> bool:
    """A scatter combine that adds slot (e, s) to token s unweighted: its (E, S) index is an
    ``_arange_table`` of the dispatch's S tokens over its E experts (Meta's Llama 4:
    ``out.scatter_add_(0, arange(S).expand(E, -1).reshape(-1, 1).expand(-1, d), y.view(-1, d))``), so the
    result is the accumulator's start plus the sum over the experts."""
    if comb.kind != "scatter" or comb.score is not None:
        return False
    table = _arange_table(comb.index)
    return table is not None and table[1] == disp.num_experts and same(table[0], shape_of(disp.x)[0])


def _block(node, comb, mlp, disp, start_kind, base, order, bias_adds=()) -> MoEBlock:
    x, E = disp.x, disp.num_experts
    device = x.meta["example_value"].device
    tr = mlp.transposed

    def linear_layout(graph, w, name):
        return method(graph, "transpose", w, -2, -1, like=node) if name in tr else w

    def bias(graph, b):
        return None if b is None else method(graph, "reshape", b, E, -1, like=node)

    def build_weights(graph):
        if isinstance(mlp, SlotsMLPs):  # per-expert modules: lists, stacked inside the op
            def each(role, name):
                ws = [weight_node(graph, m.weights()[role], node) for m in mlp.experts]  # LoRA: merged
                if ws[0] is None:
                    return []
                return [method(graph, "t", w, like=node) for w in ws] if name in tr else ws
            return ExpertWeights(gate=each(0, "gate"), up=each(1, "up"), down=each(2, "down"), b_gate=each(3, ""),
                                 b_up=each(4, ""), b_down=each(5, ""))
        w1 = linear_layout(graph, mlp.gate, "gate")
        b1 = bias(graph, mlp.b_gate)
        if mlp.up is not None:
            w1 = call(graph, torch.cat, [w1, linear_layout(graph, mlp.up, "up")], 1, like=node)
            if b1 is not None:
                b1 = call(graph, torch.cat, [b1, bias(graph, mlp.b_up)], 1, like=node)
        return w1, linear_layout(graph, mlp.down, "down"), b1, bias(graph, mlp.b_down)

    if disp.kind == "gathered":
        idx = disp.index

        def token_ids(graph):
            return method(graph, "reshape", idx, -1, like=node)

        def expert_ids(graph):
            ar = call(graph, torch.arange, E, device=device, like=node)
            return method(graph, "repeat_interleave", ar, method(graph, "size", idx, 1, like=node), like=node)

        def scores(graph):
            if comb.score is not None:
                return method(graph, "reshape", comb.score, -1, like=node)
            return call(graph, torch.ones, method(graph, "numel", idx, like=node), dtype=dtype_of(x), device=device,
                        like=node)
        K, desc = None, "dispatch=gathered_rows"
    elif disp.kind == "dense":
        # one row per (token, choice), token-major, pre-scaled as the experts' inputs were:
        # x[s] * R[s, idx[s, k]], bitwise the row Llama4 feeds expert idx[s, k]; created here (before the
        # anchor) because the block's x must be a node: dead code, removed, if the emission fails
        R, idx, K = disp.scores, disp.choices, disp.top_k
        graph = node.graph
        with graph.inserting_before(node):
            if disp.scores_expert_major:  # (E, S): R.t()[s, e] is the score of (s, e)
                R = method(graph, "t", R, like=node)
            scores_SK = method(graph, "gather", R, 1, idx, like=node)
            rows = call(graph, operator.mul, method(graph, "unsqueeze", x, 1, like=node),
                        method(graph, "unsqueeze", scores_SK, -1, like=node), like=node)
            if disp.detached:  # as the source's rows: no gradient to the tokens or the scores through them
                rows = method(graph, "detach", rows, like=node)
            x = method(graph, "reshape", rows, -1, method(graph, "size", disp.x, 1, like=node), like=node)
        x_rows = x

        def token_ids(graph):
            return call(graph, torch.arange, method(graph, "size", x_rows, 0, like=node), device=device, like=node)

        def expert_ids(graph):
            return method(graph, "reshape", idx, -1, like=node)

        def scores(graph):  # the scores are on the rows already
            return call(graph, torch.ones_like, method(graph, "reshape", scores_SK, -1, like=node), like=node)
        desc = f"dispatch=dense_scores (top-{K} of a dense score matrix, inputs pre-scaled: one row per choice)"
    else:
        terms = disp.terms
        cw_dtype = comb.dtype or dtype_of(comb.weights)
        state: dict = {}
        grouped = disp.groups is not None
        if grouped:  # the (G, S, d) tokens as G * S rows, group-major (created before the anchor, as below)
            with node.graph.inserting_before(node):
                x = method(node.graph, "reshape", disp.x, -1, method(node.graph, "size", disp.x, 2, like=node),
                           like=node)

        def align(graph, f, labels, order):
            """``f`` with its dims reordered to ``order`` (size 1 where f has no such axis)."""
            if not isinstance(f, fx.Node):
                return f
            drop = tuple(i for i, lab in enumerate(labels) if lab not in order)  # broadcast (size 1) dims
            t = method(graph, "squeeze", f, drop, like=node) if drop else f
            present = [lab for lab in labels if lab in order]
            perm = sorted(range(len(present)), key=lambda j: order.index(present[j]))
            if perm != list(range(len(present))):
                t = method(graph, "permute", t, *perm, like=node)
            for pos, lab in enumerate(order):
                if lab not in present:
                    t = method(graph, "unsqueeze", t, pos, like=node)
            return t

        def per_term(graph):
            """(expert ids, scores), flat and token-major: (S, sum of the terms' widths)."""
            if "ids" in state:
                return state["ids"], state["scores"]
            tok = ("g", "s") if grouped else ("s",)  # the token axes, merged row-major (as x's rows are)
            sizes = [method(graph, "size", disp.x, i, like=node) for i in range(len(tok))]
            ids, ss = [], []
            for t in terms:
                width = int_value(t.width)

                def rows(f, labels, inner):
                    full = method(graph, "expand", align(graph, f, labels, tok + inner), *sizes,
                                  *(width if a == "k" else E for a in inner), like=node)
                    return method(graph, "reshape", full, -1, *full.meta["example_value"].shape[len(tok):],
                                  like=node) if grouped else full
                chosen = rows(_materialise_ids(graph, t.choice, node), t.choice_labels, ("k",))
                where = method(graph, "unsqueeze", chosen, -1, like=node)

                def at_choice(f, labels):
                    if not isinstance(f, fx.Node):
                        return f
                    full = rows(f, labels, ("k", "e"))
                    return method(graph, "squeeze", method(graph, "gather", full, 2, where, like=node), -1, like=node)

                kept = None
                for f, lab in t.flags:
                    v = call(graph, operator.ne, at_choice(f, lab), 0, like=node)
                    kept = v if kept is None else call(graph, operator.and_, kept, v, like=node)
                ids.append(call(graph, torch.where, kept, chosen, -1, like=node))
                score = call(graph, torch.ones_like, chosen, dtype=cw_dtype, like=node)
                for f, lab in t.weights:
                    score = call(graph, operator.mul, score, at_choice(f, lab), like=node)
                if dtype_of(score) != cw_dtype:
                    score = method(graph, "to", score, cw_dtype, like=node)
                ss.append(score)
            state["ids"] = method(graph, "reshape", call(graph, torch.cat, ids, 1, like=node), -1, like=node)
            state["scores"] = method(graph, "reshape", call(graph, torch.cat, ss, 1, like=node), -1, like=node)
            return state["ids"], state["scores"]

        def token_ids(graph):
            ar = call(graph, torch.arange, method(graph, "size", x, 0, like=node), device=device, like=node)
            return method(graph, "repeat_interleave", ar, K, like=node)

        def expert_ids(graph):
            return per_term(graph)[0]

        def scores(graph):
            return per_term(graph)[1]
        widths = [int_value(t.width) for t in terms]
        need(None not in widths, "proof: the number of choices per token is not a constant")
        K = sum(widths)
        desc = f"dispatch=capacity_einsum ({K} choice{'s' if K > 1 else ''}{', stacked' if len(terms) < K else ''})"

    def replace(out):
        graph = out.graph
        result = out
        with graph.inserting_before(out.next):
            if disp.kind == "dense":  # each token's K rows (token-major) summed
                per_token = method(graph, "view", out, method(graph, "size", disp.x, 0, like=node), K,
                                   method(graph, "size", disp.x, 1, like=node), like=node)
                result = method(graph, "sum", per_token, 1, like=node)
            if comb.kind == "scatter":
                if dtype_of(result) != dtype_of(comb.acc):
                    result = method(graph, "to", result, dtype_of(comb.acc), like=node)
                if start_kind in ("copy", "base"):  # acc.clone() / a tensor the graph computed, plus the block
                    result = call(graph, operator.add, base, result, like=node)
            if disp.groups is not None:  # the G * S rows back as (G, S, d)
                result = method(graph, "reshape", result, *(method(graph, "size", disp.x, i, like=node)
                                                            for i in range(3)), like=node)
        if comb.kind == "scatter" and comb.inplace:
            for u in list(comb.acc.users):
                if u is not node and order.get(u, -1) > order[node]:
                    u.replace_input_with(comb.acc, result)
        node.replace_all_uses_with(result)
        if comb.kind == "scatter" and comb.inplace:
            graph.erase_node(node)

    xs, wd = shape_of(x), shape_of(mlp.down)
    n_dim = wd[-1] if "down" not in tr else wd[-2]
    desc += f", experts={mlp.spelling}, combine={comb.spelling}"
    return MoEBlock(
        idiom=IDIOM, anchor=node, x=x, token_ids=token_ids, expert_ids=expert_ids, scores=scores,
        build_weights=build_weights, replace=replace, activation=mlp.activation, interleaved=mlp.interleaved,
        num_experts=E, top_k=K, hidden=int_value(xs[1]) if int_value(xs[1]) is not None else xs[1],
        intermediate=int_value(n_dim) if int_value(n_dim) is not None else n_dim, dtype=dtype_of(x),
        location=node, autocast_like=mlp.gemm, parts=desc, orphans=list(bias_adds),
    )


def _is_candidate(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in _EINSUM:
        return combine_einsum(node) is not None
    if _matmul_args(node) is not None:
        try:
            return combine_matmul(node) is not None
        except Declined:
            return True
    if node.op == "call_method" and node.target in ("scatter_add_", "scatter_add", "index_add_", "index_add"):
        try:
            return scatter_slots(node) is not None
        except Declined:
            return True
    if (node.op == "call_method" and node.target == "sum") or (node.op == "call_function" and node.target is torch.sum):
        try:
            return expert_sum(node) is not None
        except Declined:
            return True
    return False


def find(gm: fx.GraphModule):
    """Yield (anchor node, MoEBlock or decline reason) for every slots candidate of the graph."""
    for node in list(gm.graph.nodes):
        if node.graph is not gm.graph or not _is_candidate(node):
            continue
        try:
            yield node, analyse(node)
        except Declined as e:
            yield node, str(e)
