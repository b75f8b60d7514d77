"""Composition: MoE blocks that compute on a flat tensor of assignment rows (one row per (token,
expert) assignment), recognised in parts and proven once.

Shape legend: T tokens, d hidden, n expert intermediate, E experts, K experts per token,
A assignment rows (T*K, or R rows received by a rank under expert parallelism).

Parts (registered in ``moe_inductor.recognize.parts``; each maps a spelling to a canonical description):

- **rows_dispatch** (``RowsGather``): how the rows are read from the tokens: ``x[idx]``,
  ``torch.gather(x, 0, idx.reshape(-1, 1).expand(-1, d))``, ``x.index_select(0, idx)``,
  ``x.repeat_interleave(K, dim=0)``; a sorted row's token as ``perm // K`` or as ``tok[perm]`` /
  ``tok.index_select(0, perm)`` with ``tok = arange(T).repeat_interleave(K)`` (rxlm; ``_row_tokens``);
- **rows_experts** (``RowsMLP``): the expert MLP applied to every row with the expert of that
  row: ``torch._grouped_mm(rows, W.transpose(-2, -1), offs=offsets)`` (rows grouped by expert,
  bf16 casts of rows and weights as torchtitan writes them, the output cast back with
  ``type_as``), or weights gathered per row ``bmm(W[idx], rows.unsqueeze(-1))`` /
  ``bmm(rows.unsqueeze(1), W[idx])``, or an einsum of gathered weights with their rows in any
  letters and operand order (gpt-fast's ``einsum('ti,taoi->tao', x, W[idx])`` on the tokens
  broadcast over a (T, K) index, GPT-OSS's reference ``einsum('beck,bk->bec', W[idx, ...], x)``; also
  two gpt-fast einsums on the halves of one fused gate|up weight gathered and chunked first,
  SGLang's ``torch.chunk(w13[ids], 2, dim=2)``: ``_weight_halves_proj``); transformers' ``grouped_mm_fallback`` and weights stored
  (E, in, out) used as they are (GPT-OSS); gated (``silu(g) * u`` over two GEMMs, ``chunk(2, -1)``
  of one, GPT-OSS's clamped gate on interleaved columns) or plain activations; a per-expert bias
  added in place after a GEMM, ``out.add_(bias[ids])`` (``common.expert_bias``: the only in-place
  write the proof admits; which ids index it is proven by the composition), or out of place after a
  gathered-weight GEMM, ``gemm + bias[ids, ...]`` (GPT-OSS's reference; ``+=`` reads so after the
  normal form; ``_biased_proj``, the ids proven the weights' by the composition), or inside
  ``moe_inductor::grouped_mm(rows, W, offs, bias=b)`` (host_splits' biased chunk experts: row r of
  group e gets b[e], the GEMM's own grouping, so no ids to prove);
- **rows_combine** (``RowsScatter``): how the rows reach their tokens: ``zeros(T, d).scatter_add(_)
  (0, idx.reshape(-1, 1).expand(-1, d), y)``, ``scatter_reduce(_)(..., "sum")``,
  ``index_add(_)(0, idx, y)``; per-token sums: ``inverse_perm_sum`` (``inv = empty_like(perm);
  inv[perm] = arange(A); y[inv].view(T, K, d).sum(1)``: row i reaches token perm[i] // K),
  ``setitem_perm_sum`` (``new = empty_like(y); new[perm] = y; new.view(T, K, d)[.type(w.dtype)]
  .mul_(w.unsqueeze(-1)).sum(1)``, DeepSeek-V2/V3 ``moe_infer``: the setitem at a sort permutation
  writes every row once, row i to position perm[i]; the weighting of a fresh view nobody else reads;
  scores (T, K) in (token, k) order, same dtype as the rows),
  ``unpermute_scatter`` (``acc.scatter_add_(0, tok[:, None].expand(-1, d), y[argsort(perm)])`` with
  ``tok = arange(T).repeat_interleave(K)``, rxlm: row i of y is at position perm[i] of the unpermuted
  rows, added at token perm[i] // K),
  ``token_k_sum`` (``y.view(T, K, d).sum(1)``: row i reaches token i // K), ``einsum_tk``
  (``einsum('tai,ta->ti', y, w)``: the scores applied by the combine itself).

Blocks (``find``):

1. **sorted rows** (torchtitan ``models/moe``; transformers 5.x "grouped_mm" experts, the default
   of 64 families, GPT-OSS's biases and clamped gate included)::

       counts = histc(flat.float(), bins=E, min=0, max=E)  | bincount(flat, minlength=E)
                | zeros(T, E).scatter(1, ids, 1).sum(0) (also scatter_ in place, ids.to(torch.int64) of
                  int64 ids: SGLang) | one_hot(flat, E).sum(0)
                (of flat or of the sorted ids sort(flat)[0])
       perm = argsort(flat, stable=True)                    | sort(flat)[1]
       rows = x[perm // K]  (or gather / index_select);  s = w.view(-1)[perm]
       y = grouped_mm MLP on rows with offsets = cumsum(counts, dtype=int32)
           [h.add_(b1[sorted ids]) / y.add_(b2[sorted ids]) after the GEMMs]
       out = zeros(T, d).scatter_add(0, index, y * s[:, None])
           | inv = empty_like(perm); inv[perm] = arange(A); (y * s[:, None])[inv].view(T, K, d).sum(1)

   Proof: one permutation for the rows and the scores, counts a full histogram over exactly E
   bins of the ids that were sorted, offsets = cumsum of those counts, A == T*K symbolically, the
   rows written back with the token mapping they were read with (an inverse permutation filled
   with arange(A) at the very permutation the rows were gathered with), weights shaped for the
   activation and the rows, biases indexed by the sorted ids of that sort, scores applied once,
   nothing written in place but those bias adds (erased with the block, as the inverse
   permutation's setitem).
2. **gathered weights** (research code; transformers 5.x "batched_mm" experts; gpt-fast):
   ``W[idx]`` + ``bmm`` on rows ``x[tok]`` (or ``x.repeat_interleave(K, 0)``), combine by
   scatter/index_add into zeros or ``(y * s[:, None]).view(T, K, d).sum(1)`` (biases
   ``out.add_(b[idx])`` with the weights' own index); gpt-fast's einsum on the (T, K) layout.
3. **local experts** (expert parallelism, torchtitan): grouped GEMMs on rows that are already
   grouped by expert (``offsets = cumsum(counts)``) and returned in the same order without a score
   multiply: one fused op over those rows, token_ids = arange(R), scores = 1. Also the form of
   torchtitan's ``score_before_experts`` (scores multiply the rows before a non-linear expert,
   which the fused op cannot do on its inputs): the pre-scaled rows go in with score 1 and the
   graph's own scatter stays (as the dense dispatch of ``patterns/expert_slots.py`` does).

For every offsets-grouped form the fused op's expert of row i is the group the grouped GEMM puts
it in, ``searchsorted(offsets, i, right=True)`` (rows past ``offsets[-1]`` dropped: expert -1),
so the rewrite follows the GEMM's own grouping, not an assumption about the ids. When the sorted
ids are provably top-k indices over the E experts (values in [0, E): ``dispatch.topk_columns``),
that group is ids[perm[i]], and the op takes the assignments in their original order (token
j // K, expert ids[j], score s[j]): the sort, the counts and the gather leave the graph.
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Optional

import torch
import torch.fx as fx

from moe_inductor.fx.targets import ONE_HOT_FUNCTIONS
from moe_inductor.fx import safety
from moe_inductor.ops.activations import parse_activation
from moe_inductor.recognize.parts import PartDeclined, recognise, register
from moe_inductor.fx.build import call, method
from moe_inductor.fx.decline import Declined, need
from moe_inductor.fx.matching import einsum_parts
from moe_inductor.fx.nodes import arg, node_order
from moe_inductor.fx.shapes import dtype_of, int_value, same, same_dim, shape_of, to_sympy
from moe_inductor.lower.rewrite import ExpertWeights, MoEBlock, gemm_name

from .common import (GATED_OF, after_gemm_reason, expert_activation, expert_bias, gate_up_halves,
                     unary_activation, with_layout)
from .dispatch import assignment_tokens, routing_map_sorted, rows_index, topk_columns
from .experts import row_scaled

IDIOM = "assignment_rows"

_GROUPED = [torch._grouped_mm]
import moe_inductor.dynamo.host_splits  # noqa: E402  (registers moe_inductor::grouped_mm: splits by host counts)
_GROUPED += [torch.ops.moe_inductor.grouped_mm.default]


def _is_grouped_target(target) -> bool:
    """A grouped GEMM: the lists above, or transformers' ``grouped_mm_fallback`` custom op (looked up
    per call: transformers registers it when its MoE integration is imported, which may be after
    this module)."""
    if target in _GROUPED:
        return True
    if not isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return False
    fallback = getattr(getattr(torch.ops, "transformers", None), "grouped_mm_fallback", None)
    if fallback is None:
        return False
    if fallback.default not in _GROUPED:
        _GROUPED.extend([fallback, fallback.default])
    return target in (fallback, fallback.default)


# --------------------------------------------------------------------------- canonical descriptions

@dataclasses.dataclass
class Proj:
    """One GEMM over assignment rows: ``input`` (A, in) (casts stripped), weight stored (E, out, in)
    unless ``transposed`` ((E, in, out)), rows grouped by ``group``: ("offsets", node) or
    ("index", node) (weights gathered per row)."""

    input: fx.Node
    weight: fx.Node
    transposed: bool
    group: tuple
    node: fx.Node
    gemm: str
    #: the node the projection's result is read from (the GEMM, or its ``squeeze``)
    out: Optional[fx.Node] = None
    #: per-expert bias ``out.add_(bias[bias_ids])`` (E, out) written in place after the GEMM; the
    #: composition proves ``bias_ids`` are the expert ids of the rows
    bias: Optional[fx.Node] = None
    bias_add: Optional[fx.Node] = None
    bias_ids: Optional[fx.Node] = None


@dataclasses.dataclass
class RowsMLP:
    """Experts on assignment rows: ``output = down(act(gate(input)) [* up(input)])`` per row."""

    input: fx.Node
    output: fx.Node
    activation: str
    interleaved: bool
    gate: Proj
    down: Proj
    up: Optional[Proj] = None
    spelling: str = ""
    #: "rows": (A, d) rows in, (A, d) out; "tk": tokens (T, d) in, broadcast over the K slots of a
    #: (T, K) index (gpt-fast's einsum), (T, K, d) out
    layout: str = "rows"
    #: the (A, 1) factor the hidden rows are multiplied by before the down projection (Megatron-Core's
    #: probabilities applied inside the expert, ``experts.row_scaled``): the composition takes it as the
    #: scores applied after the experts (``down(h * s) == s * down(h)`` for a down without bias, up to rounding)
    row_scale: Optional[fx.Node] = None

    @property
    def group(self) -> tuple:
        return self.down.group

    def projections(self) -> list:
        return [p for p in (self.gate, self.up, self.down) if p is not None]

    def bias_adds(self) -> list:
        return [p.bias_add for p in self.projections() if p.bias_add is not None]


@dataclasses.dataclass
class RowsGather:
    """Rows read from tokens ``x`` (T, d): row i is ``x[index[i]]``; ``replicated`` = K for
    ``x.repeat_interleave(K, 0)`` (index None). ``index2d`` the (A, d) index of a ``gather``."""

    x: fx.Node
    node: fx.Node
    index: Optional[fx.Node] = None
    index2d: Optional[fx.Node] = None
    replicated: Optional[int] = None
    spelling: str = ""


@dataclasses.dataclass
class RowsScatter:
    """Rows ``value`` (A, d) added to tokens of ``acc`` (T, d) at ``index`` (1-D) or ``index2d``.

    A per-token sum has no ``acc`` (the result is the anchor, (T, d)): rows in (token, k) order
    (``replicated`` = K, ``T``: row i reaches token i // K), or in the order of a permutation
    (``perm``, with ``replicated`` = K: row i reaches token perm[i] // K, the inverse permutation's
    ``setitem`` in ``orphans``). ``score`` (T, K): the combine applies the scores itself (gpt-fast's
    ``einsum('tai,ta->ti', y, w)``, ``value`` (T, K, d))."""

    acc: Optional[fx.Node]
    value: fx.Node
    anchor: fx.Node
    inplace: bool
    index: Optional[fx.Node] = None
    index2d: Optional[fx.Node] = None
    spelling: str = ""
    replicated: Optional[int] = None
    T: object = None
    perm: Optional[fx.Node] = None
    score: Optional[fx.Node] = None
    orphans: list = dataclasses.field(default_factory=list)
    #: scores (T, K) applied by the combine after the rows are back in (token, k) order
    #: (``setitem_perm_sum``); the score of assignment j is ``score_tk.reshape(-1)[j]``
    score_tk: Optional[fx.Node] = None


# --------------------------------------------------------------------------- small helpers

def _is(node, op: str, target) -> bool:
    return isinstance(node, fx.Node) and node.op == op and (
        node.target in target if isinstance(target, (tuple, list, set)) else node.target == target)


def _untranspose(w) -> Optional[fx.Node]:
    """W if ``w`` is ``W.transpose(-2, -1)`` (any spelling of the last two dims) of a 3-D W."""
    if _is(w, "call_method", "transpose") and len(w.args) == 3 and len(shape_of(w.args[0]) or ()) == 3 and \
            set(w.args[1:]) in ({-2, -1}, {1, 2}):
        return w.args[0]
    if _is(w, "call_function", torch.transpose) and len(w.args) == 3 and set(w.args[1:]) in ({-2, -1}, {1, 2}):
        return w.args[0]
    if _is(w, "call_function", getattr) and w.args[1] == "mT":
        return w.args[0]
    return None


def _column(node) -> Optional[fx.Node]:
    """v of ``v.reshape(-1, 1)``, ``v.view(-1, 1)``, ``v.unsqueeze(-1)``/``(1)``, ``v[:, None]`` for 1-D v."""
    if not isinstance(node, fx.Node):
        return None
    inner = None
    if _is(node, "call_method", ("reshape", "view")) and tuple(node.args[1:]) in ((-1, 1), ((-1, 1),)):
        inner = node.args[0]
    elif _is(node, "call_method", "unsqueeze") and len(node.args) == 2 and node.args[1] in (-1, 1):
        inner = node.args[0]
    elif _is(node, "call_function", operator.getitem) and node.args[1] in ((slice(None), None), (Ellipsis, None)):
        inner = node.args[0]
    if isinstance(inner, fx.Node) and len(shape_of(inner) or ()) == 1:
        return inner
    return None


def _row_index(index2d) -> Optional[fx.Node]:
    """idx of an (A, d) scatter/gather index ``idx.reshape(-1, 1).expand(-1, d)`` (or
    ``unsqueeze(-1)``, ``[:, None]``, ``expand_as``)."""
    if _is(index2d, "call_method", ("expand", "expand_as")) and isinstance(index2d.args[0], fx.Node):
        return _column(index2d.args[0])
    return None


def _lift(v) -> Optional[fx.Node]:
    """z (A, in) of ``z.unsqueeze(-1)`` / ``unsqueeze(2)`` / ``unsqueeze(1)`` for 2-D z (bmm operands)."""
    if _is(v, "call_method", "unsqueeze") and len(v.args) == 2 and len(shape_of(v.args[0]) or ()) == 2:
        return v.args[0]
    return None


def _is_int(node) -> bool:
    return dtype_of(node) in (torch.int64, torch.int32)


def _is_column(node) -> bool:
    """``node`` is a column (A, 1) made from scores: ``s.reshape(-1, 1)``, ``s.unsqueeze(-1)``, ``s[:, None]``
    (``reshape(-1, 1)`` also of a (T, K) table)."""
    if not isinstance(node, fx.Node):
        return False
    s = shape_of(node)
    if s is None or len(s) != 2 or int_value(s[1]) != 1:
        return False
    if _column(node) is not None:
        return True
    return _is(node, "call_method", ("reshape", "view")) and tuple(node.args[1:]) in ((-1, 1), ((-1, 1),))


def _score_column(node):
    """(score column (A, 1), other operand) if ``node`` is ``y * s[:, None]`` (either order, casts on
    either side), else (None, node)."""
    node = safety.strip_casts(node)
    if not (_is(node, "call_function", (operator.mul, torch.mul)) and len(node.args) == 2 and not node.kwargs):
        return None, node
    for a, b in (node.args, node.args[::-1]):
        col = safety.strip_casts(b) if isinstance(b, fx.Node) else None
        if col is not None and _is_column(col) and isinstance(a, fx.Node) and len(shape_of(a) or ()) == 2 \
                and not _is_column(safety.strip_casts(a)):
            return col, a
    return None, node


# --------------------------------------------------------------------------- experts on rows

def _grouped_proj(node) -> Optional[Proj]:
    if not (isinstance(node, fx.Node) and node.op == "call_function" and _is_grouped_target(node.target)):
        return None
    # torch.nn.functional.grouped_mm traces to torch._grouped_mm(a, b, offs=, bias=None, out_dtype=None);
    # moe_inductor::grouped_mm (host_splits) may carry a per-expert bias (E, out): row r of group e gets bias[e]
    bias = node.kwargs.get("bias")
    own_bias = node.target is torch.ops.moe_inductor.grouped_mm.default and isinstance(bias, fx.Node)
    if set(node.kwargs) - {"offs", "bias", "out_dtype"} or (bias is not None and not own_bias) or \
            node.kwargs.get("out_dtype") is not None or len(node.args) != 2 or \
            not isinstance(node.kwargs.get("offs"), fx.Node):
        return None
    a, b = node.args
    if len(shape_of(a) or ()) != 2 or len(shape_of(b) or ()) != 3:
        return None
    w = _untranspose(b)
    return Proj(input=safety.strip_casts(a), weight=w if w is not None else b, transposed=w is None,
                group=("offsets", node.kwargs["offs"]), node=node, gemm=gemm_name(node.target), out=node,
                bias=bias if own_bias else None)


def _bmm_proj(node) -> Optional[Proj]:
    """``bmm(W[idx], v)`` (W (E, out, in), v (A, in, 1)) or ``bmm(v, W[idx])`` (W (E, in, out), v
    (A, 1, in)), optionally squeezed back to 2-D; v = ``z.unsqueeze(...)`` for 2-D z, or a 3-D
    intermediate of the same layout."""
    bmm = node
    if _is(node, "call_method", "squeeze") and len(node.args) == 2 and node.args[1] in (-1, 1, 2):
        bmm = node.args[0]
    if not (_is(bmm, "call_function", torch.bmm) and len(bmm.args) == 2 and not bmm.kwargs):
        return None
    a, b = bmm.args
    for g, v, transposed in ((a, b, False), (b, a, True)):
        if _is(g, "call_function", operator.getitem) and isinstance(g.args[1], fx.Node) and \
                len(shape_of(g.args[0]) or ()) == 3 and len(shape_of(g.args[1]) or ()) == 1 and _is_int(g.args[1]):
            z = _lift(v)
            return Proj(input=z if z is not None else v, weight=g.args[0], transposed=transposed,
                        group=("index", g.args[1]), node=bmm, gemm="aten::bmm", out=node)
    return None


_EINSUM = (torch.einsum, torch.functional.einsum)
#: gpt-fast's up projection 'ti,taoi->tao' (the halves of one gathered gate|up weight,
#: ``_weight_halves_proj``) and combine 'tai,ta->ti', with letters renamed by first appearance
_UP_EQ, _COMBINE_EQ = "ab,acdb->acd", "abc,ab->ac"


def _canonical(equation: str) -> str:
    eq = equation.replace(" ", "")
    names: dict = {}
    return "".join(names.setdefault(ch, "abcdefghij"[len(names)]) if ch.isalpha() else ch for ch in eq)


def _einsum(node, eq) -> Optional[tuple]:
    """The two operands of ``einsum(eq, a, b)`` (operands as varargs or as one list), else None."""
    if not (_is(node, "call_function", _EINSUM) and node.args and isinstance(node.args[0], str)
            and not node.kwargs and _canonical(node.args[0]) == eq):
        return None
    ops = node.args[1:]
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = ops[0]
    return tuple(ops) if len(ops) == 2 and all(isinstance(o, fx.Node) for o in ops) else None


def _gathered_weight(g) -> Optional[tuple]:
    """(W, idx) if ``g`` is ``W[idx]`` (``W[idx, ...]``, ``W[idx, :, :]``: ``dispatch.rows_index``) of a
    3-D W with an integer index of one or two dimensions (rows, or a (T, K) table)."""
    if not _is(g, "call_function", operator.getitem):
        return None
    idx = rows_index(g.args[1])
    if not isinstance(idx, fx.Node) or len(shape_of(g.args[0]) or ()) != 3 or \
            len(shape_of(idx) or ()) not in (1, 2) or not _is_int(idx):
        return None
    return g.args[0], idx


def _einsum_proj(node) -> Optional[Proj]:
    """An einsum of per-row gathered weights with their rows, in any letters and operand order
    (gpt-fast ``einsum('ti,taoi->tao', x, W[idx])``, GPT-OSS's reference ``einsum('beck,bk->bec',
    W[idx, ...], x)``): W[idx] (lead..., p, q) with idx (lead...) of rank r, the rows v (lead..., i)
    (or, for a (T, K) idx, the tokens (T, i) broadcast over the K slots), i one of p, q and the
    output exactly (lead..., o) with o the other: row (lead) is ``W[idx[lead]] @ v[lead]`` (W stored
    (E, out, in) when q is contracted, (E, in, out) when p is). Each letter appears once per term;
    sizes must agree without broadcasting."""
    parts = einsum_parts(node)
    if parts is None or len(parts[2]) != 2:
        return None
    ins, out, ops = parts
    for iw, iv in ((0, 1), (1, 0)):
        gw = _gathered_weight(ops[iw])
        if gw is None:
            continue
        W, idx = gw
        wl, vl, r = ins[iw], ins[iv], len(shape_of(idx))
        if len(wl) != r + 2 or any(len(set(t)) != len(t) for t in (wl, vl, out)):
            return None
        lead, (p, q) = wl[:r], wl[r:]
        i = next((c for c in (p, q) if c not in out), None)
        o = q if i == p else p
        if i is None or out != lead + o or vl not in (lead + i, lead[0] + i if r == 2 else None):
            return None
        vs, gs = shape_of(ops[iv]), shape_of(ops[iw])
        if vs is None or gs is None or not all(same(vs[k], gs[wl.index(c)]) for k, c in enumerate(vl)):
            return None
        return Proj(input=ops[iv], weight=W, transposed=i == p, group=("index", idx), node=node,
                    gemm="aten::bmm", out=node)  # einsum runs as bmm under autocast
    return None


def _biased_proj(node) -> Optional[Proj]:
    """``P + B[ids]`` (either order; ``P += B[ids]`` reads so after the normal form): a GEMM P on
    weights gathered per row plus a per-expert bias B (E, out) gathered per row, of exactly P's
    shape and B's dtype the weights'. That ``ids`` are the rows' expert ids (the weights' index) is
    the composition's proof (``_prove_biases``)."""
    if not (_is(node, "call_function", (operator.add, torch.add)) and len(node.args) == 2 and not node.kwargs):
        return None
    for a, b in (node.args, node.args[::-1]):
        p = _bmm_proj(safety.strip_identity(a)) or _einsum_proj(safety.strip_identity(a)) \
            if isinstance(a, fx.Node) else None
        if p is None or not _is(b, "call_function", operator.getitem):
            continue
        ids, B = rows_index(b.args[1]), b.args[0]
        if not isinstance(ids, fx.Node) or len(shape_of(B) or ()) != 2 or not _is_int(ids):
            continue
        ws = _linear_shape(p)
        need(ws is not None and safety.same_shape(b, node) and safety.same_shape(b, p.out)
             and same(shape_of(B)[0], ws[0]) and same(shape_of(B)[1], ws[1]),
             f"{node.name}: the bias {B.name} added to the gathered-weight GEMM is not (E, out) gathered per row",
             part="rows_experts")
        need(dtype_of(B) == dtype_of(p.weight) == dtype_of(node),
             f"{node.name}: the expert bias and weights differ in dtype", part="rows_experts")
        written = safety.writes_to(B) + safety.writes_to(b)
        need(not written, f"{node.name}: the expert bias {B.name} is modified in place "
                          f"({written[0].format_node() if written else ''})", part="rows_experts")
        p.bias, p.bias_ids, p.out = B, ids, node
        return p
    return None


def _proj(node) -> Optional[Proj]:
    node = safety.strip_identity(node)
    return _grouped_proj(node) or _bmm_proj(node) or _einsum_proj(node) or _biased_proj(node)


def _weight_halves_proj(g_out, u_out) -> Optional[tuple]:
    """(Proj of the fused gate|up GEMM, up_first) when ``g_out`` / ``u_out`` are gpt-fast up
    projections ``einsum('ti,taoi->tao', x, H)`` of the same tokens x whose weights H are the two
    halves along ``o`` of one gathered ``W[idx]`` (W (E, 2n, d), idx (T, K)): SGLang's
    ``w1, w3 = torch.chunk(w13_weight[topk_ids], 2, dim=2)`` (``common.halves`` on axis -2: equal
    halves, gate first or up first). Row o of half j is row j*n + o of ``W[idx]``, so the two
    einsums are the first and second halves along ``o`` of ``einsum(x, W[idx])``: the fused
    gate|up GEMM of W, whose activation takes the halves in the same order. The halves, the
    gathered weights and both GEMMs' results must not be written in place (the proof of the block
    follows the gate GEMM's path only; a bias added in place to one half is no bias of the fused GEMM)."""
    g, u = safety.strip_identity(g_out), safety.strip_identity(u_out)
    go, uo = _einsum(g, _UP_EQ), _einsum(u, _UP_EQ)
    if go is None or uo is None or not safety.equivalent(go[0], uo[0]) or len(shape_of(go[0]) or ()) != 2:
        return None
    found = gate_up_halves(go[1], uo[1], axis=-2)
    if found is None or found[1]:
        return None
    G, up_first = found[0], found[2]
    if not (_is(G, "call_function", operator.getitem) and isinstance(G.args[1], fx.Node)
            and len(shape_of(G.args[0]) or ()) == 3 and len(shape_of(G.args[1]) or ()) == 2 and _is_int(G.args[1])):
        return None
    for n in (G, g, u, uo[1], go[1]):
        w = safety.writes_to(n)
        need(not w, f"{n.name} (gathered gate|up weights or a GEMM on one half) is modified in place ({w[0].name if w else ''})",
             part="rows_experts")
    return Proj(input=go[0], weight=G.args[0], transposed=False, group=("index", G.args[1]), node=g,
                gemm="aten::bmm", out=g), up_first


def _same_group(a: tuple, b: tuple) -> bool:
    return a[0] == b[0] and (a[1] is b[1] or safety.equivalent(a[1], b[1]))


@register("rows_experts", "rows_mlp", "torch._grouped_mm(rows, W.transpose(-2, -1), offs=cumsum(counts)) "
          "(or transformers' grouped_mm_fallback, W stored (E, in, out) used as it is), bmm(W[idx], "
          "rows.unsqueeze(-1)) / bmm(rows.unsqueeze(1), W[idx]), gpt-fast's einsum('ti,taoi->tao', x, W[idx]); "
          "silu(g) * u, chunk(2, -1), GPT-OSS's clamped interleaved gate, plain activations; a per-expert "
          "bias out.add_(b[ids]) after a GEMM")
def rows_mlp(out) -> Optional[RowsMLP]:
    """The expert MLP whose per-row output is ``out`` ((A, d), or (T, K, d) for the einsum
    spelling); None if ``out`` is not a grouped or gathered-weight GEMM at all."""
    down = _proj(safety.strip_casts(out))
    tk = down is not None and len(shape_of(down.group[1]) or ()) == 2
    if down is None or len(shape_of(out) or ()) != (3 if tk else 2):
        return None
    mid = safety.strip_identity(down.input)
    scaled = row_scaled(mid) if not tk else None
    if scaled is not None:
        mid, row_scale = safety.strip_identity(scaled[0]), scaled[1]
    gate = up = None
    act, interleaved = None, False
    if _is(mid, "call_function", (operator.mul, torch.mul)) and len(mid.args) == 2 and not mid.kwargs:
        for a, b in (mid.args, mid.args[::-1]):
            if not isinstance(a, fx.Node) or not isinstance(b, fx.Node):
                continue
            name, inner = unary_activation(a)
            g = _proj(inner) if name else None
            u = _proj(b)
            if g is not None and u is not None:
                need(name in GATED_OF, f"{a.name}: gated activation {name} is not supported", part="rows_experts")
                act, gate, up = GATED_OF[name], g, u
                break
            fused = _weight_halves_proj(inner, b) if name and g is None and u is None else None
            if fused is not None:  # one fused gate|up weight chunked before its two GEMMs
                need(name in GATED_OF, f"{a.name}: gated activation {name} is not supported", part="rows_experts")
                act, gate = with_layout(GATED_OF[name], fused[1]), fused[0]
                break
    if act is None:
        try:
            act, interleaved, h = expert_activation(mid)
        except Declined as e:
            raise PartDeclined("rows_experts", f"{mid.name}: {e}")
        gate = _proj(h)
        need(gate is not None, f"{h.name}: the expert's first projection is not a grouped "
                                                    "GEMM or a GEMM with weights gathered per row", part="rows_experts")
    projs = [p for p in (gate, up, down) if p is not None]
    need(all(_same_group(p.group, down.group) for p in projs), "the projections group their rows differently (other offsets, or weights gathered with other ids)", part="rows_experts")
    need(up is None or safety.equivalent(gate.input, up.input), "gate and up projections read different rows", part="rows_experts")
    need(len({p.transposed for p in projs}) == 1 or down.group[0] == "offsets", "the GEMMs use different weight layouts", part="rows_experts")
    need(not tk or len(shape_of(gate.input) or ()) == 2, "the einsum experts do not read the tokens (T, d) broadcast over the k slots", part="rows_experts")
    E = int_value((shape_of(down.weight) or (None,))[0])
    for p, what in ((gate, "up-projection output" if up is None else "gate projection output"),
                    (up, "up projection output"), (down, "down-projection output")):
        if p is None:
            continue
        try:  # which ids index the bias is the composition's proof (it knows the rows' expert ids)
            added, p.bias_add = expert_bias(p.out, lambda ids: True, E, what)
        except Declined as e:
            raise PartDeclined("rows_experts", str(e)) from None
        need(added is None or p.bias is None, f"{what}: a per-expert bias added in place after a GEMM that adds its own", part="rows_experts")
        p.bias = p.bias if added is None else added
        if p.bias_add is not None:
            p.bias_ids = p.bias_add.args[1].args[1]
        if p.bias is not None:
            need(up is None, f"{what}: biases on separate gate and up GEMMs are not supported", part="rows_experts")
            need(dtype_of(p.bias) == dtype_of(p.weight), "expert biases and weights differ in dtype", part="rows_experts")
    need(scaled is None or down.bias is None, "the rows are scaled before a down projection with a bias: the op would scale the bias too", part="rows_experts")
    return RowsMLP(input=gate.input, output=out, activation=act, interleaved=interleaved, gate=gate, up=up,
                   down=down, layout="tk" if tk else "rows", row_scale=row_scale if scaled is not None else None)


def _linear_shape(p: Proj):
    s = shape_of(p.weight)
    return None if s is None else ((s[0], s[2], s[1]) if p.transposed else s)


# --------------------------------------------------------------------------- dispatch: rows from tokens

@register("rows_dispatch", "row_gather", "x[idx], torch.gather(x, 0, idx[:, None].expand(-1, d)), "
          "x.index_select(0, idx), x.repeat_interleave(K, dim=0)")
def row_gather(z) -> Optional[RowsGather]:
    if not isinstance(z, fx.Node) or len(shape_of(z) or ()) != 2:
        return None
    if _is(z, "call_function", operator.getitem) and isinstance(z.args[1], fx.Node) and \
            len(shape_of(z.args[0]) or ()) == 2 and len(shape_of(z.args[1]) or ()) == 1 and _is_int(z.args[1]):
        return RowsGather(x=z.args[0], node=z, index=z.args[1])
    if _is(z, "call_function", torch.gather) or _is(z, "call_method", "gather"):
        x, dim, index = arg(z, 0, "input"), arg(z, 1, "dim"), arg(z, 2, "index")
        if dim == 0 and isinstance(index, fx.Node) and len(shape_of(x) or ()) == 2 and \
                not z.kwargs.get("sparse_grad", False) and same(shape_of(z)[1], shape_of(x)[1]):
            return RowsGather(x=x, node=z, index=_row_index(index), index2d=index)
        return None
    if _is(z, "call_function", torch.index_select) or _is(z, "call_method", "index_select"):
        x, dim, index = arg(z, 0, "input"), arg(z, 1, "dim"), arg(z, 2, "index")
        if dim == 0 and isinstance(index, fx.Node) and len(shape_of(x) or ()) == 2:
            return RowsGather(x=x, node=z, index=index)
        return None
    if _is(z, "call_method", "repeat_interleave") or _is(z, "call_function", torch.repeat_interleave):
        x, reps = z.args[0], arg(z, 1, "repeats")
        dim = z.kwargs.get("dim", z.args[2] if len(z.args) > 2 else None)
        if dim == 0 and int_value(reps) is not None and len(shape_of(x) or ()) == 2:
            return RowsGather(x=x, node=z, replicated=int_value(reps))
    return None


def _replicated_tokens(idx) -> Optional[tuple]:
    """(T node or size, K) if ``idx`` is ``arange(T).repeat_interleave(K)``."""
    if not (_is(idx, "call_method", "repeat_interleave") or _is(idx, "call_function", torch.repeat_interleave)):
        return None
    if len(idx.args) != 2 or set(idx.kwargs) - {"output_size"}:
        return None
    ar, K = idx.args
    if _is(ar, "call_function", torch.arange) and len(ar.args) == 1 and int_value(K) is not None:
        return ar.args[0], int_value(K)
    return None


# --------------------------------------------------------------------------- combine: rows to tokens

def _same_dtype_to(node):
    """v of ``v.to(dtype=D)`` (the keyword spelling ``safety`` does not follow) when v already has
    dtype D: the same values; ``node`` otherwise."""
    if _is(node, "call_method", "to") and len(node.args) == 1 and set(node.kwargs) == {"dtype"} \
            and isinstance(node.args[0], fx.Node) and dtype_of(node.args[0]) == node.kwargs["dtype"]:
        return node.args[0]
    return node


def _inverse_of(inv) -> Optional[fx.Node]:
    """p of ``argsort(p)`` / ``p.argsort(0)`` / ``sort(p)[1]`` (ascending, 1-D p) when p is a sort
    permutation (``_sort_perm``: every index once): then inv[j] is the position of j in p, the inverse
    permutation (distinct values: stability plays no part)."""
    p = None
    if (_is(inv, "call_function", torch.argsort) or _is(inv, "call_method", "argsort")) and inv.args:
        p, dims = inv.args[0], inv.args[1:]
    elif _is(inv, "call_function", operator.getitem) and inv.args[1] == 1 and \
            (_is(inv.args[0], "call_function", torch.sort) or _is(inv.args[0], "call_method", "sort")):
        p, dims, inv = inv.args[0].args[0], inv.args[0].args[1:], inv.args[0]
    if not isinstance(p, fx.Node) or len(dims) > 1 or set(inv.kwargs) - {"dim", "stable", "descending"} \
            or inv.kwargs.get("descending", False) or inv.kwargs.get("dim", dims[0] if dims else -1) not in (0, -1):
        return None
    return p if len(shape_of(p) or ()) == 1 and _sort_perm(p) is not None and not safety.writes_to(inv) else None


@register("rows_combine", "unpermute_scatter", "acc.scatter_add(_)(0, tok[:, None].expand(-1, d), y[argsort(perm)]) "
          "with tok = arange(T).repeat_interleave(K): rows in the order of the sort permutation perm put back in "
          "(token, k) order by its inverse and added at their tokens (rxlm)")
def unpermute_scatter(node) -> Optional[RowsScatter]:
    """Row i of ``y`` is at position perm[i] of ``y[argsort(perm)]``, which the scatter adds at token
    perm[i] // K: the per-token sum of ``inverse_perm_sum`` into the scatter's accumulator."""
    if not (_is(node, "call_method", ("scatter_add", "scatter_add_", "index_add", "index_add_"))
            or _is(node, "call_function", (torch.scatter_add, torch.index_add))):
        return None
    c = row_scatter(node)
    back = safety.strip_identity(_same_dtype_to(c.value)) if c is not None and c.index is not None else None
    if not (_is(back, "call_function", operator.getitem) and isinstance(back.args[1], fx.Node)):
        return None
    tok = assignment_tokens(c.index)
    if tok is None or tok["perm"] is not None:
        return None
    perm = _inverse_of(back.args[1])
    need(perm is not None and same(shape_of(perm)[0], tok["T"] * tok["K"]), f"{node.name}: the rows added at every assignment's token are {back.name} = "
              f"{back.args[0].name}[{back.args[1].name}], not the rows of a sort permutation of the T*K "
              "assignments put back by its inverse (argsort of that permutation)", part="rows_combine")
    c.value, c.perm, c.replicated, c.T, c.index, c.index2d = back.args[0], perm, tok["K"], tok["T"], None, None
    c.spelling = f"unpermute_scatter ({c.spelling} of y[argsort(perm)])"
    return c


@register("rows_combine", "row_scatter", "zeros(T, d).scatter_add(_)(0, idx[:, None].expand(-1, d), y), "
          "scatter_reduce(_)(..., 'sum'), index_add(_)(0, idx, y)")
def row_scatter(node) -> Optional[RowsScatter]:
    if not isinstance(node, fx.Node) or node.op not in ("call_method", "call_function"):
        return None
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    if node.op == "call_function" and node.target not in (torch.scatter_add, torch.scatter_reduce, torch.index_add):
        return None
    if name not in ("scatter_add", "scatter_add_", "scatter_reduce", "scatter_reduce_", "index_add", "index_add_"):
        return None
    acc, dim, index = node.args[0] if node.args else None, arg(node, 1, "dim"), arg(node, 2, "index")
    value = arg(node, 3, "src" if name.startswith("scatter") else "source")
    if dim != 0 or not all(isinstance(v, fx.Node) for v in (acc, index, value)):
        return None
    if len(shape_of(acc) or ()) != 2 or len(shape_of(value) or ()) != 2:
        return None
    inplace = name.endswith("_")
    if name.startswith("scatter_reduce"):
        reduce = arg(node, 4, "reduce")
        if reduce != "sum":
            raise PartDeclined("rows_combine", f"{node.name}: scatter_reduce with reduce={reduce!r}, not 'sum'")
        if set(node.kwargs) - {"reduce", "include_self", "dim", "index", "src"} or len(node.args) > 6 or \
                not safety.same_shape(index, value):
            return None
        return RowsScatter(acc=acc, value=value, anchor=node, inplace=inplace, index=_row_index(index),
                           index2d=index, spelling="scatter_reduce(sum)")
    if name.startswith("index_add"):
        if "alpha" in node.kwargs or len(node.args) > 4 or len(shape_of(index) or ()) != 1:
            return None
        return RowsScatter(acc=acc, value=value, anchor=node, inplace=inplace, index=index, spelling=name)
    if len(node.args) > 4 or not safety.same_shape(index, value):
        return None  # scatter_add reads only the index's part of src
    return RowsScatter(acc=acc, value=value, anchor=node, inplace=inplace, index=_row_index(index),
                       index2d=index, spelling=name)


def _summed_over_dim1(node) -> Optional[fx.Node]:
    """x of ``x.sum(1)`` / ``x.sum(dim=1)`` / ``x.sum((1,))``, else None."""
    if not (_is(node, "call_method", "sum") and len(node.args) in (1, 2) and isinstance(node.args[0], fx.Node)):
        return None
    dim = node.args[1] if len(node.args) == 2 else node.kwargs.get("dim")
    if dim not in (1, (1,)) or set(node.kwargs) - {"dim"}:
        return None
    return node.args[0]


def _token_k_sum(node) -> Optional[tuple]:
    """(rows (A, d), T, K) of ``rows.view(T, K, d).sum(dim=1)`` (``reshape``; ``sum(1)``), else None."""
    v = _summed_over_dim1(node)
    if v is None:
        return None
    if not _is(v, "call_method", ("view", "reshape")) or not isinstance(v.args[0], fx.Node):
        return None
    dims = tuple(v.args[1]) if len(v.args) == 2 and isinstance(v.args[1], (tuple, list)) else tuple(v.args[1:])
    rows, vs, rs = v.args[0], shape_of(v), shape_of(v.args[0])
    if len(dims) != 3 or vs is None or rs is None or len(vs) != 3 or len(rs) != 2 or int_value(vs[1]) is None \
            or not same(vs[2], rs[1]):
        return None
    return rows, vs[0], int_value(vs[1])


@register("rows_combine", "inverse_perm_sum", "inv = empty_like(perm); inv[perm] = arange(A); "
          "y[inv].view(T, K, d).sum(1): rows in the order of perm back to (token, k) order, summed per token")
def inverse_perm_sum(node) -> Optional[RowsScatter]:
    tks = _token_k_sum(node)
    if tks is None:
        return None
    back, T, K = tks
    if not (_is(back, "call_function", operator.getitem) and isinstance(back.args[1], fx.Node)
            and _is(back.args[1], "call_function", torch.empty_like)):
        return None
    value, inv = back.args
    perm = inv.args[0] if inv.args else None
    need(isinstance(perm, fx.Node) and len(inv.args) == 1 and not set(inv.kwargs) - {"device"}
              and len(shape_of(perm) or ()) == 1 and _is_int(perm), f"{inv.name}: the inverse permutation is not empty_like(perm) of a 1-D integer permutation", part="rows_combine")
    setters = [u for u in inv.users if _is(u, "call_function", operator.setitem)]
    need(len(setters) == 1 and set(inv.users) == {setters[0], back}, f"{inv.name}: the inverse permutation has other readers or writers than inv[perm] = arange(A)", part="rows_combine")
    st = setters[0]
    need(st.args[0] is inv and (st.args[1] is perm or safety.equivalent(st.args[1], perm)), f"{inv.name}: the inverse permutation is not filled at the permutation it was made from ({perm.name})", part="rows_combine")
    ar = st.args[2]
    need(_is(ar, "call_function", torch.arange) and len(ar.args) == 1
              and not set(ar.kwargs) - {"device", "dtype"} and same(ar.args[0], shape_of(perm)[0]), f"{inv.name}: the inverse permutation is not filled with arange(A) over the {perm.name} rows", part="rows_combine")
    order = node_order(node.graph)
    need(order[st] < order[back], f"{inv.name}: the inverse permutation is read before it is filled", part="rows_combine")
    return RowsScatter(acc=None, value=value, anchor=node, inplace=False, replicated=K, T=T, perm=perm,
                       orphans=[st])


@register("rows_combine", "token_k_sum", "(y * s[:, None]).view(T, K, d).sum(1): rows in (token, k) order "
          "summed per token")
def token_k_sum(node) -> Optional[RowsScatter]:
    tks = _token_k_sum(node)
    if tks is None:
        return None
    rows, T, K = tks
    if _is(rows, "call_function", operator.getitem) and _is(rows.args[1], "call_function", torch.empty_like):
        return None  # the inverse permutation's spelling
    return RowsScatter(acc=None, value=rows, anchor=node, inplace=False, replicated=K, T=T)


def _same_type(node) -> Optional[fx.Node]:
    """x of ``x.type(dtype)`` / ``x.to(dtype)`` when x already has that dtype (the same tensor), else None."""
    if _is(node, "call_method", ("type", "to")) and len(node.args) == 2 and not node.kwargs \
            and isinstance(node.args[1], torch.dtype) and isinstance(node.args[0], fx.Node) \
            and dtype_of(node.args[0]) == node.args[1]:
        return node.args[0]
    return None


@register("rows_combine", "setitem_perm_sum", "new = empty_like(y); new[perm] = y; new.view(T, K, d)"
          "[.type(w.dtype)].mul_(w.unsqueeze(-1)).sum(1): rows in the order of perm back to (token, k) order by "
          "a setitem, weighted per (token, slot), summed per token (DeepSeek-V2/V3 Hub moe_infer)")
def setitem_perm_sum(node) -> Optional[RowsScatter]:
    m = _summed_over_dim1(node)
    if m is None:
        return None
    if not ((_is(m, "call_method", ("mul_", "mul")) or _is(m, "call_function", (operator.mul, torch.mul)))
            and len(m.args) == 2 and not m.kwargs
            and all(isinstance(a, fx.Node) for a in m.args)):
        return None
    t, wu = m.args
    v = _same_type(t) or t
    if not (_is(v, "call_method", ("view", "reshape")) and _is(v.args[0], "call_function", torch.empty_like)):
        return None
    new = v.args[0]
    y = new.args[0] if new.args else None
    vs, ys = shape_of(v), shape_of(y) if isinstance(y, fx.Node) else None
    need(len(new.args) == 1 and not set(new.kwargs) - {"device"} and ys is not None
              and len(ys) == 2 and vs is not None and len(vs) == 3 and int_value(vs[1]) is not None
              and same(vs[2], ys[1]) and same(to_sympy(vs[0]) * int_value(vs[1]), ys[0]), f"{new.name}: not empty_like of the (A, d) rows viewed as (T, K, d)", part="rows_combine")
    T, K = vs[0], int_value(vs[1])
    setters = [u for u in new.users if _is(u, "call_function", operator.setitem)]
    need(len(setters) == 1 and set(new.users) == {setters[0], v} and setters[0].args[0] is new
              and setters[0].args[2] is y and isinstance(setters[0].args[1], fx.Node), f"{new.name}: not filled by one new[perm] = rows of the rows it was made from, or read elsewhere", part="rows_combine")
    st, perm = setters[0], setters[0].args[1]
    need(_sort_perm(perm) is not None and len(shape_of(perm) or ()) == 1
              and same(shape_of(perm)[0], ys[0]), f"{perm.name}: the rows are written back at something other than a sort permutation of all of them "
              "(every row written once)", part="rows_combine")
    order = node_order(node.graph)
    need(order[st] < order[v], f"{new.name}: read before it is filled", part="rows_combine")
    # the weighting: in place on the fresh (T, K, d) view (nothing else reads it), same dtype
    chain = [v] + ([t] if t is not v else [])
    need(all(set(n.users) == {nxt} for n, nxt in zip(chain, chain[1:] + [m]))
              and set(m.users) == {node}, f"{m.name}: the weighted (T, K, d) rows are read by something else than the per-token sum", part="rows_combine")
    w = wu.args[0] if _is(wu, "call_method", "unsqueeze") and arg(wu, 1, "dim") in (-1, 2) else None
    ws = shape_of(w) if isinstance(w, fx.Node) else None
    need(ws is not None and len(ws) == 2 and same(ws[0], T) and same(ws[1], K), f"{wu.name}: the rows are weighted by something else than w.unsqueeze(-1) of (T, K) scores", part="rows_combine")
    need(dtype_of(w) == dtype_of(y) and dtype_of(t) == dtype_of(y), f"{m.name}: the scores ({dtype_of(w)}) and the rows ({dtype_of(y)}) differ in dtype", part="rows_combine")
    return RowsScatter(acc=None, value=y, anchor=node, inplace=False, replicated=K, T=T, perm=perm,
                       orphans=[st] + ([m] if m.target == "mul_" else []), score_tk=w)


@register("rows_combine", "einsum_tk", "einsum('tai,ta->ti', y, w): expert outputs (T, K, d) weighted by the "
          "scores (T, K) and summed per token (gpt-fast)")
def einsum_tk(node) -> Optional[RowsScatter]:
    ops = _einsum(node, _COMBINE_EQ)
    if ops is None:
        return None
    y, w = ops
    ys, ws = shape_of(y), shape_of(w)
    if ys is None or ws is None or len(ys) != 3 or len(ws) != 2 or int_value(ys[1]) is None:
        return None
    need(same(ys[0], ws[0]) and same(ys[1], ws[1]), f"{node.name}: the scores {w.name} are not one per (token, slot) of the expert outputs", part="rows_combine")
    return RowsScatter(acc=None, value=y, anchor=node, inplace=False, replicated=int_value(ys[1]), T=ys[0], score=w)


def _combine_base(c: RowsScatter) -> Optional[fx.Node]:
    """The tensor the rows are added into when it is not zeros (``out = shared(x);
    out.scatter_add(0, idx, rows)``, torchtitan): the combine is then ``base + (sum of rows per
    token)``. None for zeros or a per-token sum. Declines a base the sum cannot be separated from:
    ``scatter_reduce(include_self=False)`` (the touched rows drop the base), or an in-place add into
    module state, an input or a tensor with views (they would see the sum)."""
    if c.acc is None or _zeros_start(c.acc):
        return None
    need(c.spelling != "scatter_reduce(sum)" or arg(c.anchor, 5, "include_self", True) is True,
         f"combine: scatter_reduce into {c.acc.name} with include_self=False (the rows replace the base)")
    if c.inplace:  # the rewrite drops the in-place write: nobody may see it but the combine's readers
        need(safety.is_fresh(c.acc), f"combine: the rows are added in place into {c.acc.name}, an input, parameter, "
                                      "buffer or view the caller may see")
        need(safety.aliases(c.acc) == {c.acc},
             f"combine: the rows are added in place into {c.acc.name}, which has views (they would see the sum)")
    return c.acc


def _zeros_start(acc: fx.Node) -> bool:
    return (_is(acc, "call_function", (torch.zeros, torch.zeros_like)) or _is(acc, "call_method", "new_zeros")) \
        and not acc.kwargs.get("requires_grad", False)


# --------------------------------------------------------------------------- sort-based dispatch proofs

def _sort_perm(perm) -> Optional[fx.Node]:
    """The sorted ids of ``perm = argsort(ids[, stable=True])`` / ``sort(ids)[1]`` (ascending)."""
    if (_is(perm, "call_function", torch.argsort) or _is(perm, "call_method", "argsort")) and \
            not perm.kwargs.get("descending", False) and perm.kwargs.get("dim", -1) in (-1, 0) and len(perm.args) == 1:
        return perm.args[0]
    if _is(perm, "call_function", operator.getitem) and perm.args[1] == 1:
        s = perm.args[0]
        if (_is(s, "call_function", torch.sort) or _is(s, "call_method", "sort")) and \
                (len(s.args) == 1 or len(s.args) == 2 and s.args[1] in (-1, 0) and len(shape_of(s.args[0]) or ()) == 1) \
                and not s.kwargs.get("descending", False) and s.kwargs.get("dim", -1) in (-1, 0):
            return s.args[0]  # sort(ids) or JetMoE's ids.sort(0) of 1-D ids
    return None


def _floordiv(idx) -> Optional[tuple]:
    """(perm, K) of ``perm // K`` (also ``torch.div(perm, K, rounding_mode='floor')``)."""
    if _is(idx, "call_function", (operator.floordiv, torch.floor_divide)) and len(idx.args) == 2:
        return idx.args[0], int_value(idx.args[1])
    if _is(idx, "call_function", torch.div) and idx.kwargs.get("rounding_mode") == "floor" and len(idx.args) == 2:
        return idx.args[0], int_value(idx.args[1])
    # JetMoE: perm.div(K, rounding_mode="trunc"); trunc is floor on a sort permutation (indices >= 0)
    if (_is(idx, "call_function", torch.div) or _is(idx, "call_method", "div")) and len(idx.args) == 2 and \
            set(idx.kwargs) == {"rounding_mode"} and idx.kwargs["rounding_mode"] in ("floor", "trunc") and \
            (idx.kwargs["rounding_mode"] == "floor" or _sort_perm(idx.args[0]) is not None):
        return idx.args[0], int_value(idx.args[1])
    return None


def _row_tokens(idx) -> Optional[tuple]:
    """(perm, K) when row i of a gather at ``idx`` is token perm[i] // K: ``perm // K``
    (``_floordiv``) or ``tok[perm]`` / ``tok.index_select(0, perm)`` with tok = arange(T).repeat_interleave(K)
    and perm a sort permutation of its T*K positions (``dispatch.assignment_tokens``: tok[perm[i]] =
    perm[i] // K)."""
    if not isinstance(idx, fx.Node):
        return None
    fd = _floordiv(idx)
    if fd is not None:
        return fd
    found = assignment_tokens(idx)
    if found is None or found["perm"] is None:
        return None
    return found["perm"], found["K"]


def _topk_ids(node) -> Optional[fx.Node]:
    """``node`` itself if it is ``topk(scores (T, E), K, dim=-1|1)[1]`` (K distinct ids per row), else None."""
    if not (_is(node, "call_function", operator.getitem) and node.args[1] == 1):
        return None
    t = node.args[0]
    if not (_is(t, "call_function", torch.topk) or _is(t, "call_method", "topk")):
        return None
    dim = arg(t, 2, "dim", -1)
    return node if len(shape_of(t.args[0]) or ()) == 2 and dim in (-1, 1) else None


def _scatter_counts(counts) -> Optional[tuple]:
    """(ids (T, K), E) of JetMoE's ``zeros(T, E).scatter(1, ids, 1).long().sum(0)`` with ids top-k ids
    (distinct per row, so the 0/1 table sums to the histogram of the ids)."""
    if not ((_is(counts, "call_method", "sum") or _is(counts, "call_function", torch.sum)) and (
            (len(counts.args) == 2 and counts.args[1] == 0 and not counts.kwargs)
            or (len(counts.args) == 1 and counts.kwargs == {"dim": 0}))):
        return None
    g = counts.args[0]
    inplace = _inplace_scatter(g, counts)
    if inplace is not None:
        g = inplace  # z.scatter_(1, ids, 1) then z.sum(0): the same table
    if _is(g, "call_method", ("long", "int")) and len(g.args) == 1:
        g = g.args[0]  # the table holds 0 and 1: exact in any dtype
    g = safety.strip_casts(g) if inplace is None else g
    if not ((_is(g, "call_method", "scatter" if inplace is None else "scatter_")
             or (inplace is None and _is(g, "call_function", torch.scatter))) and len(g.args) == 4
            and not g.kwargs and g.args[1] in (1, -1) and g.args[3] == 1 and type(g.args[3]) is int):
        return None
    z, ids = g.args[0], safety.strip_identity(g.args[2])  # `ids.to(torch.int64)` of int64 ids: the same ids
    zs = shape_of(z)
    if not (isinstance(z, fx.Node) and _zeros_start(z) and zs is not None and len(zs) == 2
            and _topk_ids(ids) is not None and same(zs[0], shape_of(ids)[0])):
        return None
    return ids, zs[1]


def _inplace_scatter(z, counts) -> Optional[fx.Node]:
    """The ``z.scatter_(1, ids, 1)`` node when ``z`` (zeros) is written by it alone, before ``counts``
    reads it, and read by nothing else (DeepSeek-V2/V3 ``cnts.scatter_(1, topk_ids, 1)``)."""
    if not (isinstance(z, fx.Node) and _zeros_start(z)):
        return None
    writes = safety.writes_to(z)
    if len(writes) != 1 or not _is(writes[0], "call_method", "scatter_") or writes[0].args[0] is not z:
        return None
    w = writes[0]
    order = node_order(z.graph)
    if set(z.users) != {w, counts} or w.users or order[w] > order[counts]:
        return None
    return w


def _one_hot_counts(counts) -> Optional[tuple]:
    """(ids, E) of ``one_hot(ids, E).sum(0)`` with 1-D ids (rxlm): row j of the table is 1 at column
    ids[j] (one_hot raises for an id outside [0, E)), so its column sums are the histogram of the ids
    over E bins, as ``bincount(ids, minlength=E)``."""
    if not ((_is(counts, "call_method", "sum") or _is(counts, "call_function", torch.sum)) and (
            (len(counts.args) == 2 and counts.args[1] == 0 and not counts.kwargs)
            or (len(counts.args) == 1 and counts.kwargs == {"dim": 0}))):
        return None
    oh = counts.args[0]
    if _is(oh, "call_method", ("long", "int")) and len(oh.args) == 1:
        oh = oh.args[0]
    if not (_is(oh, "call_function", ONE_HOT_FUNCTIONS) and oh.args
            and isinstance(oh.args[0], fx.Node)):
        return None
    E = arg(oh, 1, "num_classes", -1)
    if len(shape_of(oh.args[0]) or ()) != 1 or int_value(E) is None or int_value(E) < 0:
        return None
    return oh.args[0], int_value(E)


def _counts_of(offsets) -> tuple:
    """(counts, ids, bins, spelling) of ``offsets = cumsum(histc(ids, E, 0, E|E-1) | bincount(ids, minlength=E),
    dtype=int32)`` (casts allowed); declines naming what does not fit."""
    o = safety.strip_casts(offsets)
    need(_is(o, "call_function", torch.cumsum) or _is(o, "call_method", "cumsum"),
         f"dispatch: the grouped GEMM offsets {offsets.name} are not a cumsum of per-expert counts")
    need(arg(o, 1, "dim") == 0, "dispatch: offsets are not a cumsum over dim 0")
    counts = safety.strip_casts(o.args[0])
    if _is(counts, "call_function", torch.histc) or _is(counts, "call_method", "histc"):
        ids = safety.strip_casts(counts.args[0])
        bins, lo, hi = arg(counts, 1, "bins", 100), arg(counts, 2, "min", 0), arg(counts, 3, "max", 0)
        return counts, ids, bins, ("histc", lo, hi)
    if _is(counts, "call_function", torch.bincount) or _is(counts, "call_method", "bincount"):
        need(arg(counts, 1, "weights") is None, "dispatch: bincount with weights is not a count of assignments")
        return counts, safety.strip_casts(counts.args[0]), arg(counts, 2, "minlength", 0), ("bincount",)
    sc = _scatter_counts(counts)
    if sc is not None:
        return counts, sc[0], sc[1], ("scatter",)
    oh = _one_hot_counts(counts)
    if oh is not None:
        return counts, oh[0], oh[1], ("one_hot",)
    raise Declined(f"dispatch: the per-expert counts {counts.name} are not histc/bincount of the expert ids")


def _routing_map_proof(gather: RowsGather, mlp: RowsMLP, score, E: int) -> Optional[dict]:
    """Megatron-Core's permute of a (T, E) routing map (``dispatch.routing_map_sorted``): rows
    ``x.index_select(0, perm[:A] % T)`` grouped by the offsets ``cumsum(map.sum(0))``; None if not that form."""
    o = safety.strip_casts(mlp.group[1])
    col = _column(score) if score is not None else None
    if gather.index is None or not (_is(o, "call_function", torch.cumsum) or _is(o, "call_method", "cumsum")) \
            or arg(o, 1, "dim") != 0 or (score is not None and col is None):
        return None
    proof = routing_map_sorted(gather.index, o.args[0], col, shape_of(gather.x)[0])
    if proof is not None:
        need(proof["E"] == E, f"proof: the routing map has {proof['E']} experts, the weights {E}")
    return proof


def _prove_sorted(gather: RowsGather, mlp: RowsMLP, score, E: int) -> dict:
    """The torchtitan proofs; returns {perm, ids, K, counts}."""
    mapped = _routing_map_proof(gather, mlp, score, E)
    if mapped is not None:
        return mapped
    need(gather.index is not None, "dispatch: rows grouped by offsets are not gathered through one permutation "
                                   "(x[perm // K])")
    fd = _row_tokens(gather.index)
    need(fd is not None and fd[1] is not None, f"dispatch: rows are gathered at {gather.index.name}, not at "
                                                "perm // K (or arange(T).repeat_interleave(K)[perm]) of a sort "
                                                "permutation")
    perm, K = fd
    ids = _sort_perm(perm)
    need(ids is not None, f"dispatch: {perm.name} is not an ascending argsort/sort of the expert ids")
    counts, cids, bins, spell = _counts_of(mlp.group[1])
    if spell[0] == "scatter" and _is(ids, "call_method", ("flatten", "view", "reshape")) and ids.args[0] is cids \
            and tuple(ids.args[1:]) in ((), (-1,), ((-1,),)):
        cids = ids  # counted on the (T, K) table whose flat view was sorted
    need(cids is ids or safety.equivalent(cids, ids) or _sorted_ids(cids, perm, ids),
         f"proof: the counts ({counts.name}) are taken of {cids.name}, not of the sorted ids {ids.name}")
    need(int_value(bins) == E, f"proof: the counts histogram has {bins} bins for {E} experts")
    if spell[0] == "histc":
        need(spell[1] == 0 and spell[2] in (E - 1, E),
             f"proof: the counts histogram covers [{spell[1]}, {spell[2]}], not one bin per expert id 0..{E - 1}")
    if score is not None:
        src = _column(score)
        need(src is not None and _is(src, "call_function", operator.getitem) and isinstance(src.args[1], fx.Node)
             and (src.args[1] is perm or safety.equivalent(src.args[1], perm)),
             f"proof: the scores {score.name} are not read through the rows' permutation {perm.name}")
    A = (shape_of(ids) or (None,))[0]
    need(A is not None and len(shape_of(ids)) == 1 and same(A, shape_of(perm)[0]), "proof: sort sizes disagree")
    xs = shape_of(gather.x)
    need(same(A, to_sympy(xs[0]) * K), "proof: the number of sorted assignments is not T*K")
    return dict(perm=perm, ids=ids, K=K, counts=counts, counted=cids)


def _sorted_ids(v, perm, ids) -> bool:
    """``v`` is ``ids`` in the order of ``perm``: the values of the sort that gave ``perm``
    (``sort(ids)[0]``), or ``ids[perm]``."""
    if _is(v, "call_function", operator.getitem) and v.args[1] == 0 and _is(perm, "call_function", operator.getitem) \
            and perm.args[1] == 1 and v.args[0] is perm.args[0]:
        return True
    return _is(v, "call_function", operator.getitem) and isinstance(v.args[1], fx.Node) and \
        (v.args[1] is perm or safety.equivalent(v.args[1], perm)) and (v.args[0] is ids or safety.equivalent(v.args[0], ids))


# --------------------------------------------------------------------------- the composition

def _check_weights(mlp: RowsMLP, d) -> tuple:
    """(E, n) from the weights, declining on inconsistent shapes."""
    g, dn = _linear_shape(mlp.gate), _linear_shape(mlp.down)
    need(g is not None and dn is not None and len(g) == 3 and len(dn) == 3, "experts: weight shapes unknown")
    E = int_value(g[0])
    need(E is not None and same(dn[0], E), "experts: the projections have different numbers of experts")
    n = dn[2]
    gated = parse_activation(mlp.activation).gated
    if mlp.up is not None:
        u = _linear_shape(mlp.up)
        need(u is not None and all(same(p, q) for p, q in zip(u, g)), "experts: gate and up weights differ in shape")
        need(same(g[1], n), "experts: the gate width differs from the down projection's input")
    else:
        need(same(g[1], 2 * n if gated else n), "experts: up-projection width does not match the activation")
    need(same(g[2], d) and same(dn[1], d), "experts: the weights' hidden size differs from the rows'")
    return E, n


def _expert_ids_of(graph, mlp: RowsMLP, A_of, E: int, like: fx.Node):
    kind, g = mlp.group
    if kind == "index":
        return method(graph, "reshape", g, -1, like=like) if mlp.layout == "tk" else g
    # the group the grouped GEMM puts row i in; rows past offsets[-1] are dropped (-1)
    A = A_of(graph)
    ar = call(graph, torch.arange, A, dtype=dtype_of(g), device=g.meta["example_value"].device, like=like)
    grp = call(graph, torch.searchsorted, g, ar, right=True, like=like)
    return call(graph, torch.where, call(graph, operator.lt, grp, E, like=like), grp, -1, like=like)


def _weights_builder(mlp: RowsMLP, E: int, like: fx.Node):
    """Stacked (w1, w2) when the block has one up-projection weight (views, no copy); separate gate
    and up weights go per expert (``ExpertWeights`` of views ``W[e]``): a ``cat`` of the stacks
    would copy every expert's weights each step and be kept for backward."""
    def lin(graph, p: Proj):
        return method(graph, "transpose", p.weight, -2, -1, like=like) if p.transposed else p.weight

    def each(graph, p: Proj):
        ws = [call(graph, operator.getitem, p.weight, e, like=like) for e in range(E)]
        return [method(graph, "t", w, like=like) for w in ws] if p.transposed else ws

    def build(graph):
        if mlp.up is not None:
            return ExpertWeights(gate=each(graph, mlp.gate), up=each(graph, mlp.up), down=each(graph, mlp.down))
        return lin(graph, mlp.gate), lin(graph, mlp.down), mlp.gate.bias, mlp.down.bias

    return build


def _intermediates_unwritten(mlp: RowsMLP, start: fx.Node, allowed=()) -> None:
    """Nothing in place on the expert path from ``start`` to the output except ``allowed`` (the
    proven bias adds), nothing writes the weights or the grouping."""
    safety.need_pure_path(mlp.output, start, allowed)
    for p in mlp.projections():
        for w in safety.writes_to(p.weight):
            raise Declined(f"proof: {p.weight.name} is modified in place by {w.format_node()}")
        # the grouping: from where it is made to the last GEMM (a write to the top-k values before
        # the block, Mixtral's router_top_value /= sum, is no write to the ids made after it)
        safety.need_unmodified([p.group[1]], p.group[1], mlp.output, "proof: the grouping of the rows")


def _rows_block(mlp: RowsMLP, x_rows: fx.Node, anchor: fx.Node, idiom: str, parts: str) -> MoEBlock:
    """Rows in, rows out: fused op over ``x_rows`` (A, d) with token_ids = arange(A), score 1."""
    need(mlp.row_scale is None, "experts: the rows are scaled inside the experts, and no combine takes those scores")
    xs = shape_of(x_rows)
    need(xs is not None and len(xs) == 2 and same_shape_rows(anchor, xs), "proof: the expert output is not "
                                                                           "(rows, d) of its input rows")
    E, n = _check_weights(mlp, xs[1])
    _intermediates_unwritten(mlp, x_rows)
    device = x_rows.meta["example_value"].device

    def A_of(graph):
        return method(graph, "size", x_rows, 0, like=anchor)

    def token_ids(graph):
        return call(graph, torch.arange, A_of(graph), device=device, like=anchor)

    def ones(graph):
        return call(graph, torch.ones, A_of(graph), dtype=dtype_of(x_rows), device=device, like=anchor)

    def replace(out):
        anchor.replace_all_uses_with(out)

    return MoEBlock(
        idiom=idiom, anchor=anchor, x=x_rows, token_ids=token_ids,
        expert_ids=lambda graph: _expert_ids_of(graph, mlp, A_of, E, anchor), scores=ones,
        build_weights=_weights_builder(mlp, E, anchor), replace=replace, activation=mlp.activation,
        interleaved=mlp.interleaved, num_experts=E, top_k=None,
        hidden=int_value(xs[1]) if int_value(xs[1]) is not None else xs[1],
        intermediate=int_value(n) if int_value(n) is not None else n, dtype=dtype_of(x_rows),
        autocast_like=mlp.down.gemm, parts=parts,
    )


def same_shape_rows(node, xs) -> bool:
    s = shape_of(node)
    return s is not None and len(s) == 2 and same(s[0], xs[0]) and same(s[1], xs[1])


def _same_token_map(g: RowsGather, c: RowsScatter, T_x) -> bool:
    """The combine writes row i back to the token the dispatch read it from."""
    if c.perm is not None:  # row i reaches position perm[i] of the (token, k) order: token perm[i] // K
        fd = _row_tokens(g.index) if g.index is not None else None
        return fd is not None and fd[1] == c.replicated and (fd[0] is c.perm or safety.equivalent(fd[0], c.perm)) \
            and _sort_perm(c.perm) is not None
    if c.acc is None:  # rows in (token, k) order: row i reaches token i // K
        if g.replicated is not None:
            return g.replicated == c.replicated and same(T_x, c.T)
        rt = _replicated_tokens(g.index) if g.index is not None else None
        return rt is not None and rt[1] == c.replicated and same(rt[0], c.T) and same(T_x, c.T)
    if g.replicated is not None and c.index is not None:
        rt = _replicated_tokens(c.index)
        return rt is not None and rt[1] == g.replicated and same(rt[0], T_x)
    if (c.index2d is not None and c.index2d is g.index2d) or \
            (c.index is not None and g.index is not None and (c.index is g.index or safety.equivalent(c.index, g.index))):
        return True
    # two spellings of token perm[i] // K (perm // K, tok[perm]) of one permutation
    gt, ct = _row_tokens(g.index), _row_tokens(c.index)
    return gt is not None and ct is not None and gt[1] == ct[1] is not None and \
        (gt[0] is ct[0] or safety.equivalent(gt[0], ct[0])) and _sort_perm(gt[0]) is not None


def _prove_biases(mlp: RowsMLP, sorted_proof) -> None:
    """Each in-place bias is indexed by the expert ids of its GEMM's rows: the very index the
    weights are gathered with, or the sorted ids of the sort that grouped the rows."""
    for p in mlp.projections():
        if p.bias_ids is None:
            continue  # no bias, or the grouped GEMM's own: added by the group the GEMM puts the row in
        if mlp.group[0] == "index":
            ok = p.bias_ids is mlp.group[1] or safety.equivalent(p.bias_ids, mlp.group[1])
        else:
            ok = sorted_proof is not None and _sorted_ids(p.bias_ids, sorted_proof["perm"], sorted_proof["ids"])
        need(ok, f"experts: the bias added to {p.out.name} (bias[{p.bias_ids.name}]) is indexed by other "
                 "ids than the expert ids of its rows")


def analyse_combine(c: RowsScatter, mlp: RowsMLP, score_after) -> MoEBlock:
    """A full block: rows gathered from tokens, experts, (scores), back to the tokens."""
    z = mlp.input
    tk = mlp.layout == "tk"
    need(tk == (c.score is not None), "proof: experts on (token, slot) pairs combined as rows, or the reverse")
    if mlp.row_scale is not None:  # scores applied inside the experts, before the down projection
        if score_after is not None or c.score_tk is not None:
            raise PartDeclined("scores", "routing weights are applied twice (inside the experts and to their outputs)")
        score_after = mlp.row_scale
    score_before, inner = _score_column(z) if not tk else (None, z)
    if score_before is not None and score_after is not None:
        raise PartDeclined("scores", "routing weights are applied twice (to the rows before the experts and to "
                                     "their outputs)")
    if tk:  # gpt-fast: the tokens themselves, broadcast over the K slots of the (T, K) index
        g = RowsGather(x=z, node=z, replicated=int_value(shape_of(mlp.group[1])[1]),
                       spelling="tokens broadcast over the k slots")
    else:
        rows = safety.strip_casts(inner) if score_before is not None else z
        g = recognise("rows_dispatch", rows, required=f"{rows.name}: the expert rows as a gather of token rows")
    x = g.x
    xs = shape_of(x)
    need(xs is not None and len(xs) == 2, "dispatch: the tokens are not (T, d)")
    need(g.index is not None or g.replicated is not None,
         f"dispatch: the gather index {getattr(g.index2d, 'name', '?')} is not one token per row (idx[:, None].expand(-1, d))")
    need(_same_token_map(g, c, xs[0]),
         f"proof: rows are read from the tokens at {getattr(g.index or g.index2d, 'name', 'x.repeat_interleave')}"
         f" but written back at {getattr(c.index or c.index2d or c.perm, 'name', 'the (token, k) order')}: "
         "not the same token mapping")
    res = shape_of(c.acc) if c.acc is not None else shape_of(c.anchor)
    base = _combine_base(c)  # None: the rows are added into zeros
    need(res is not None and len(res) == 2 and same(xs[0], res[0]) and same(xs[1], res[1]),
         "proof: the result is not (tokens, d) of the gathered tokens")
    if tk:
        K = g.replicated
        A = to_sympy(xs[0]) * K
        os_ = shape_of(mlp.output)
        need(os_ is not None and same(os_[0], xs[0]) and same(os_[1], K) and same(os_[2], xs[1]),
             "proof: the expert output is not (T, K, d) of the tokens")
    else:
        A = (shape_of(z) or (None,))[0]
        need(A is not None and same_shape_rows(mlp.output, (A, xs[1])), "proof: the expert output is not one row per "
                                                                         "gathered row")
    E, n = _check_weights(mlp, xs[1])
    score = score_after if score_after is not None else score_before
    if c.score_tk is not None:
        need(score is None, "scores: routing weights are applied twice (to the rows and by the combine)")
    if score is not None:
        ss = shape_of(score)
        need(ss is not None and len(ss) == 2 and
             ((same(ss[0], xs[0]) and same(ss[1], g.replicated)) if tk else
              same_dim(score, 0, z, 0)),
             "scores: not one routing weight per row")
    sorted_proof = _prove_sorted(g, mlp, score, E) if mlp.group[0] == "offsets" else None
    if mlp.group[0] == "index":
        ids_s = shape_of(mlp.group[1])
        ok = ids_s is not None and (len(ids_s) == 2 and same(ids_s[0], xs[0]) and same(ids_s[1], g.replicated) if tk
                                    else len(ids_s) == 1 and same(ids_s[0], A))
        need(ok, "proof: weights are not gathered with one expert id per row")
    _prove_biases(mlp, sorted_proof)
    bias_adds = mlp.bias_adds()

    # nothing written in place: the acc only by this combine, nothing reads it before
    order = node_order(c.anchor.graph)
    if c.acc is not None:
        writes = safety.writes_to(c.acc)
        need(set(writes) <= {c.anchor}, f"combine: the result {c.acc.name} is written by something else "
                                        f"({', '.join(w.name for w in writes if w is not c.anchor)})")
        for a in safety.aliases(c.acc):
            for u in a.users:
                if u is not c.anchor and order[u] < order[c.anchor] and not safety.is_view_of(u, a):
                    raise Declined(f"combine: the result is read before the rows are added ({u.format_node()})")
    srcs = [x, g.index, g.index2d, c.index, c.index2d, c.perm, score, c.score_tk, mlp.group[1]] + \
        [p.bias_ids for p in mlp.projections()]
    if sorted_proof is not None:
        srcs += [sorted_proof["perm"], sorted_proof["ids"], sorted_proof["counts"], sorted_proof["counted"]]
    safety.need_unmodified([s for s in srcs if isinstance(s, fx.Node)], g.node, c.anchor,
                           "proof: the tokens, the routing or the scores")
    for s in srcs:
        if isinstance(s, fx.Node):
            safety.need_unmodified([s], s, c.anchor, "proof: the routing")

    idiom = "sorted_rows" if mlp.group[0] == "offsets" else "gathered_weights"
    how = {"offsets": "grouped GEMMs on offsets", "index": "weights gathered per row"}[mlp.group[0]]
    parts = f"rows_dispatch:{g.spelling} + rows_experts:{mlp.spelling} ({how}" + \
        (", per-expert biases" if any(p.bias is not None for p in mlp.projections()) else "") + \
        f") + rows_combine:{c.spelling}" + \
        (", scores on the rows before the experts (fed pre-scaled, score 1)" if score_before is not None else
         (", scores after the experts" if score_after is not None else ""))

    if score_before is not None:
        # f(s * x) is not s * f(x) for a non-linear expert: the fused op takes the pre-scaled rows
        # with score 1; the graph's own scatter stays
        need(not any(p.bias is not None for p in mlp.projections()),
             "experts: biased experts on pre-scaled rows are not supported")
        return _rows_block(mlp, z, mlp.output, idiom, parts)

    if tk:
        for p in mlp.projections():  # the path from the tokens includes the router: start at the GEMMs
            if p is not mlp.down:
                _intermediates_unwritten(mlp, p.node, bias_adds)
    else:
        _intermediates_unwritten(mlp, g.node, bias_adds)
    device = x.meta["example_value"].device
    anchor = c.anchor
    K = sorted_proof["K"] if sorted_proof is not None else g.replicated
    # sorted rows whose ids are provably top-k indices over the E experts (values in [0, E)): the
    # group of sorted row i is ids[perm[i]], so the assignments go in their original order (token
    # j // K, expert ids[j], score s[j]) and the sort, counts and gather fall out of the graph.
    # Otherwise the expert of row i is the group the grouped GEMM puts it in (searchsorted).
    flat_scores = _column(score) if score is not None else None
    unsorted = None
    if sorted_proof is not None and topk_columns(sorted_proof["ids"]) == E and \
            (score is None or (flat_scores is not None and _is(flat_scores, "call_function", operator.getitem)
                               and len(shape_of(flat_scores.args[0]) or ()) == 1
                               and same(shape_of(flat_scores.args[0])[0], A))):
        unsorted = dict(ids=sorted_proof["ids"], scores=flat_scores.args[0] if score is not None else None)
    # scores the combine applies in (token, k) order: the assignments' own order, so the ids must be
    # the sorted top-k ids taken in that order too
    need(c.score_tk is None or unsorted is not None,
         "proof: the combine weights the rows in (token, k) order, and the sorted ids are not proven top-k ids "
         "over the experts")

    def A_of(graph):  # from the routing, never from the rows (which would keep them alive)
        if g.index is not None:
            return method(graph, "size", g.index, 0, like=anchor)
        if g.replicated is not None:
            return call(graph, operator.mul, method(graph, "size", x, 0, like=anchor), g.replicated, like=anchor)
        return method(graph, "size", c.index if c.index is not None else c.index2d, 0, like=anchor)

    def token_ids(graph):
        if g.replicated is not None or unsorted is not None:
            ar = call(graph, torch.arange, method(graph, "size", x, 0, like=anchor), device=device, like=anchor)
            return method(graph, "repeat_interleave", ar, K, like=anchor)
        return g.index if g.index is not None else c.index

    def expert_ids(graph):
        if unsorted is not None:
            return unsorted["ids"]
        return _expert_ids_of(graph, mlp, A_of, E, anchor)

    def scores(graph):
        if c.score_tk is not None:  # w[t, k] is the score of assignment t * K + k
            return method(graph, "reshape", c.score_tk, -1, like=anchor)
        if unsorted is not None and unsorted["scores"] is not None:
            return unsorted["scores"]
        if flat_scores is not None:  # s of s.unsqueeze(-1): the column's own 1-D source
            return flat_scores
        if score is not None:
            return method(graph, "reshape", score, -1, like=anchor)
        return call(graph, torch.ones, A_of(graph), dtype=dtype_of(x), device=device, like=anchor)

    def replace(out):
        graph = anchor.graph
        if base is not None:  # rows added into a tensor (torchtitan's shared experts' output): base + sum of rows
            with graph.inserting_before(anchor):
                out = call(graph, operator.add, base, out, like=anchor)
        later = [u for u in c.acc.users if u is not anchor and order.get(u, -1) > order[anchor]] if c.inplace else []
        anchor.replace_all_uses_with(out)
        for u in later:
            u.replace_input_with(c.acc, out)
        if c.inplace:
            graph.erase_node(anchor)

    xs1 = xs[1]
    return MoEBlock(
        idiom=idiom, anchor=anchor, x=x, token_ids=token_ids, expert_ids=expert_ids, scores=scores,
        build_weights=_weights_builder(mlp, E, anchor), replace=replace, activation=mlp.activation,
        interleaved=mlp.interleaved, num_experts=E, top_k=K,
        hidden=int_value(xs1) if int_value(xs1) is not None else xs1,
        intermediate=int_value(n) if int_value(n) is not None else n, dtype=dtype_of(x),
        autocast_like=mlp.down.gemm, parts=parts + (f", into the base {base.name}" if base is not None else ""),
        location=c.acc if c.acc is not None and base is None else None,
        orphans=[*c.orphans, *bias_adds],
    )


def _outer_cast(node: fx.Node) -> fx.Node:
    """Follow a chain of sole-user dtype casts (``type_as``, ``.to(dtype)``, ``.float()``) downstream."""
    while len(node.users) == 1:
        u = next(iter(node.users))
        if safety.strip_casts(u) is node and u is not node:
            node = u
        else:
            break
    return node


def find(gm: fx.GraphModule):
    """Yield (anchor node, MoEBlock or decline reason) for each block on assignment rows."""
    claimed: set = set()
    for node in list(gm.graph.nodes):
        if node.op not in ("call_function", "call_method") or node in claimed:
            continue
        try:
            c = recognise("rows_combine", node)
        except Declined as e:
            if _token_k_sum(node) is not None or any(_proj(safety.strip_casts(a)) for a in node.all_input_nodes):
                yield node, str(e)
            continue
        if c is None or (not c.anchor.users and not c.inplace):
            continue
        score_after, y = (c.score, c.value) if c.score is not None else _score_column(c.value)
        try:
            mlp = recognise("rows_experts", safety.strip_casts(y))
        except Declined as e:
            yield node, str(e)
            continue
        if mlp is None:
            # a per-token sum over something computed from a grouped/batched GEMM (MuseSpark's
            # per-expert norm after the down projection): say what is in between
            why = after_gemm_reason(y, lambda n: _proj(n) is not None) if c.acc is None else None
            if why is not None:
                yield node, why
            continue
        mlp.output = y if score_after is not None else c.value
        claimed.update(p.node for p in mlp.projections())
        try:
            yield node, analyse_combine(c, mlp, score_after)
        except Declined as e:
            yield node, str(e)

    # local experts: grouped GEMMs on rows already grouped by expert, rows back in the same order
    for node in list(gm.graph.nodes):
        p = _grouped_proj(node)
        if p is None or node in claimed or not node.users:
            continue
        out = _outer_cast(node)
        try:
            mlp = recognise("rows_experts", out)
        except Declined:
            continue  # an up-projection, or not an expert MLP: nothing to report here
        if mlp is None or mlp.down.node is not node:
            continue
        if _feeds_sorted_combine(out):
            continue  # transformers' grouped_mm experts: a whole block, recognised (or declined) above
        claimed.update(q.node for q in mlp.projections())
        parts = f"experts={mlp.spelling} (offsets) on rows grouped by expert, no scores"
        try:
            need(mlp.group[0] == "offsets", "experts: not grouped by offsets")
            yield out, _rows_block(mlp, mlp.input, out, "local_experts", parts)
        except Declined as e:
            yield out, str(e)


def _feeds_sorted_combine(out: fx.Node, depth: int = 4) -> bool:
    """``out`` reaches an inverse-permutation + per-token sum (transformers' grouped_mm experts)
    within a few nodes."""
    frontier = [out]
    for _ in range(depth):
        frontier = [u for n in frontier for u in n.users]
        for u in frontier:
            tks = _token_k_sum(u)
            if tks is not None and _is(tks[0], "call_function", operator.getitem) and \
                    _is(tks[0].args[1], "call_function", torch.empty_like):
                return True
    return False
