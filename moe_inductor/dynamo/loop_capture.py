"""Rewrite graph-breaking per-expert loops into loops Dynamo captures as one graph (source level).

Legend: E experts, S the expert id of one iteration, M a routing mask whose dimension 0 is the
expert (``one_hot(top_k_index, E).permute(2, 1, 0)``), R a table of expert ids (``top_k_index``).

Per-expert loops are often written to skip the experts that received no token, and every way of
skipping reads routing data on the host, which Dynamo cannot trace as one graph:

- ``hit = (M.sum(dim=(-1, -2)) > 0).nonzero(); for e in hit: e = e[0]; ...``
  (transformers "eager" experts of the ``use_experts_implementation`` families, DBRX, NLLB-MoE,
  LongCat-Flash, Step3p7, Switch Transformers);
- ``counts = torch.bincount(R.flatten(), minlength=E).tolist(); for i in range(E):
  if counts[i] == 0: continue`` (DeepSeek-V3 official inference);
- ``idx, tok = torch.where(M[i]); if tok.shape[0] == 0: continue`` with ``tok.tolist()`` used as an
  index (transformers 4.36 Mixtral), ``if idx.numel() == 0: continue`` (vLLM's reference MoE);
- ``if mask.any(): <body>`` / ``if not mask.any(): continue`` / ``if mask.sum(): <body>``
  (makeMoE and its nanoGPT copies).

For such a loop this module writes an equivalent function whose loop visits every expert
(``range(E)``, E read from the mask: ``hit_source.shape[0]``) and has the skip removed. That is
equivalent when the body, run for a skipped expert, does nothing observable, which is proved from
the source (``_Body``):

- the skip condition proves one *selection* empty: "M[S] has no nonzero" for the hit loop,
  "no element of R equals S" for ``counts[S] == 0`` with ``counts = bincount(R...)``, "the index
  tensor is empty" for ``numel() == 0`` / ``shape[0] == 0`` / ``len() == 0``, "the mask is all
  false" for ``mask.any()`` / ``mask.sum()``;
- every write of the body that outlives the iteration is an accumulation into a tensor defined
  outside the loop through an index derived from that same selection (``acc.index_add_(0, idx, v)``,
  ``acc[idx] += v``, ``acc[mask] = v``, ``acc.index_put_((idx,), v, accumulate=True)``,
  ``acc.scatter_add_(0, idx..., v)``, ``acc = acc.index_add(0, idx, v)``): with no selected rows
  it writes nothing;
- everything else only binds names local to the iteration (not read after the loop, not carried
  from one iteration to the next), calls no host-syncing or mutating method (``.item()``,
  ``.tolist()``, ``.cpu()``, ``.append``, in-place ``*_`` methods), updates in place (``y *= s``)
  only tensors the iteration computed (not views of tensors from outside the loop), writes no
  attribute, and branches only on static values (the expert id, ``self`` attributes, constants);
- a capacity cut of the selection, ``X[:c] if len(X) > c else X`` (any row count, either
  orientation: ``X if X.numel() <= c else X[:c]``), is ``X[:c]``: the whole X is taken only when it
  has at most c rows, and then ``X[:c]`` holds the same rows. It is written ``X[:c]`` under a
  trace-time ``isinstance(c, int)`` (and ``X.dim() == 1`` when the test counts ``numel()``), else
  the original expression; c must be free of calls, indexing and names the body binds. ``X[:c]``
  gets its own selection (a test of its emptiness is a skip of exactly it; a write at it writes
  nothing when X is empty), so makeMoE's capacity loop loses its data-dependent branch;
- labml's capacity skip of per-expert index lists, ``if len(L[i]) <= c: continue`` followed by
  ``D.append(L[i][c:])`` / ``L[i] = L[i][:c]``, is a form of its own (``moe_inductor.dynamo.drop_lists``);
- the rewritten loop leaves out an expert past the end of a container the body indexes by the
  expert id (``len(weight)``, ``key in module_dict``; static under Dynamo): the original never
  ran it (DBRX's ``one_hot(..., num_experts + 1)`` has a padding class and no weights for it).

The rewritten loop keeps the original order of experts (ascending), so the same rows are
accumulated in the same order. Values are the same; one difference is visible when compiled: an
expert that receives no token gets a zero gradient instead of ``None`` (eager skips it; the
captured loop runs it on zero rows). A skipped ``bincount`` no longer rejects negative ids.

For the hit loop the rewritten code checks, at trace time (static shapes), that the hit source is
1-D and that M has the dimensions the ``sum``/``any`` reduces plus the expert dimension 0; if not,
the original loop runs (and graph-breaks as before). "Sum > 0 means some nonzero" needs M >= 0:
proved when M comes from ``one_hot``, a comparison or ``.bool()``; for a mask computed elsewhere
(an argument, e.g. Switch Transformers' router mask) it is assumed for integer and bool masks
(routing masks hold 0/1) and the rewritten code runs the original loop for a floating-point mask.

A loop that is not rewritten gets a ``LoopNote`` saying which line breaks the graph and why, and
so does each host read outside a loop (JetMoE's router ``.tolist()``, DeepSeek-MoE's
``.cpu().numpy()`` counts); they are what ``moe_inductor.explain`` shows.

*Segment loops* (``_segment_loop``; DeepSeek-V2/V3 Hub ``moe_infer``, rxlm): rows ``R[start:end]``
with ``end = start + n``, ``start = end`` carried to the next expert, counts from one host copy
(``for i, n in enumerate(T.cpu().numpy())``) or read per expert (``n = T[i]``), outputs appended
and ``torch.cat``-ed over dimension 0: rewritten as ``R.split(T.tolist(), 0)`` and one output per
expert (see there why that is exact); the frame is then traced with the counts as symbolic sizes
(``host_count_splits`` sees the split). Out of reach today: segment loops whose offset and list are
bound together (``outputs, start = [], 0``), torchtitan's for-loop experts with ``split`` by host
counts, host capacity arithmetic
(DeepSpeed's ``_capacity``: a tensor compared in an ``if``, then used as ``topk``'s ``k``). Nothing here runs at import; ``analyse`` is called for the
forward methods of the modules of frames compiled with the sonic backend (``moe_inductor.dynamo.capture``).
"""
from __future__ import annotations

import ast
import copy
import dataclasses
import inspect
import textwrap
import types
from typing import Optional

from moe_inductor.fx.targets import ALIASING_METHODS, CAST_METHODS
from moe_inductor.dynamo.drop_lists import capacity_skip_loop
from moe_inductor.dynamo.source_ast import (PURE_NODES, Decline, const_int, following, inside_loop, is_method,  # noqa: F401
                                           is_name, is_torch_fn, length_of, loads, short, source_text, stores_of)

#: name of the loop variable of a rewritten loop (the expert id, a Python int)
EXPERT = "_sonic_expert"

# calls that read tensors on the host, mutate containers or print: never allowed in a rewritten body
_HOST_OR_MUTATING_METHODS = {
    "item", "tolist", "cpu", "numpy", "append", "extend", "insert", "pop", "popitem", "update", "add",
    "discard", "remove", "clear", "setdefault", "write", "backward", "register_hook", "record_stream",
}
_FORBIDDEN_FUNCTIONS = {"print", "setattr", "delattr", "exec", "eval", "open", "input", "globals", "locals",
                        "vars", "breakpoint", "next", "iter", "id"}
# methods that keep "this selection is empty" exactly (empty before <=> empty after)
_SAME_EMPTINESS = {"view", "reshape", "flatten", "squeeze", "unsqueeze", "contiguous", "bool", "to", "permute",
                   "transpose", "t", "long", "int", "detach", "clone", "ravel", "view_as", "reshape_as"}
# methods whose result is empty when the receiver is (not the converse)
_EMPTY_IF_EMPTY = {"expand", "expand_as", "repeat", "unsqueeze", "__getitem__"}
# methods whose result may be (a view of) their receiver. Read on source code, without dtypes, so
# every cast counts (``x.float()`` is ``x`` when x is float32), with every aliasing view
# (``unfold`` was missing from the list kept here before)
_VIEWS = ALIASING_METHODS | CAST_METHODS
_ACCUMULATING_METHODS = {"index_add_", "index_put_", "scatter_add_", "scatter_reduce_", "index_copy_",
                         "masked_scatter_", "index_fill_", "index_reduce_"}
_STATIC_CONTEXTS = ("no_grad", "enable_grad", "inference_mode", "autocast")


@dataclasses.dataclass
class LoopNote:
    """What happened to one per-expert loop: rewritten (``form`` says which skip was removed) or kept
    (``reason``: why the rewrite could not be proved equivalent, in the words of the source)."""

    filename: str
    lineno: int
    function: str
    rewritten: bool
    form: str = ""
    reason: str = ""
    #: attributes ``self.X`` whose modules a rewritten comprehension calls (``capture`` proves them pure)
    modules: frozenset = frozenset()

    def __str__(self) -> str:
        where = f"{self.filename}:{self.lineno} in {self.function}"
        if self.rewritten:
            return f"{where}: per-expert loop ({self.form}) traced as a loop over every expert"
        return f"{where}: {self.reason}"


@dataclasses.dataclass
class Analysis:
    """The result for one function: ``replacement`` (same signature, or None) and a note per loop."""

    function: object
    replacement: Optional[object] = None
    notes: list = dataclasses.field(default_factory=list)


def _capacity_truncation(node) -> Optional[tuple]:
    """(X, c, by_numel) when ``node`` keeps the first c rows of X only when X has more than c:
    ``X[:c] if len(X) > c else X`` (``>=``, or the test reversed: ``X if len(X) <= c else X[:c]``,
    ``<``; any row count of ``length_of``). Whenever the whole X is chosen, len(X) <= c, and then
    ``X[:c]`` holds the same rows as X: the expression equals ``X[:c]`` for an integer c (c is
    evaluated twice in the source, so it must be free of calls and indexing). None otherwise."""
    if not isinstance(node, ast.IfExp) or not isinstance(node.test, ast.Compare) or len(node.test.ops) != 1:
        return None
    left, op, c = node.test.left, type(node.test.ops[0]), node.test.comparators[0]
    x, by_numel = length_of(left)
    if x is None:
        x, by_numel = length_of(c)
        left, c = c, left
        op = {ast.Gt: ast.Lt, ast.Lt: ast.Gt, ast.GtE: ast.LtE, ast.LtE: ast.GtE}.get(op, op)
    if op in (ast.Gt, ast.GtE):
        cut, whole = node.body, node.orelse
    elif op in (ast.Lt, ast.LtE):
        cut, whole = node.orelse, node.body
    else:
        return None
    if not isinstance(x, ast.Name) or not is_name(whole, x.id) or not isinstance(cut, ast.Subscript) \
            or not is_name(cut.value, x.id) or not isinstance(cut.slice, ast.Slice):
        return None
    sl = cut.slice
    if sl.lower is not None or sl.step is not None or sl.upper is None or source_text(sl.upper) != source_text(c) \
            or not all(isinstance(n, PURE_NODES) for n in ast.walk(c)):
        return None
    return x, c, by_numel


def _dims(node) -> Optional[tuple]:
    v = const_int(node)
    if v is not None:
        return (v,)
    if isinstance(node, (ast.Tuple, ast.List)):
        out = tuple(const_int(e) for e in node.elts)
        return out if all(d is not None for d in out) else None
    return None


def _kwarg(call, name, pos=None):
    for k in call.keywords:
        if k.arg == name:
            return k.value
    if pos is not None and len(call.args) > pos:
        return call.args[pos]
    return None


def _names_stored(node) -> list:
    return [n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)]


def _names_loaded(node) -> set:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}


def _with_parents(tree):
    for parent in ast.walk(tree):
        for child in ast.iter_child_nodes(parent):
            child._sonic_parent = parent
    return tree


# --------------------------------------------------------------------------- the hit loop's source

@dataclasses.dataclass
class _Hit:
    """``for V in <nonzero of SRC>``: SRC reduces the mask M over every dimension but its expert
    axis: dimension 0 (``M.sum(dims)``, then ``ndim`` = len(dims) + 1) or the last one
    (``M.reshape(A, E).sum(0)``, ``axis`` "last", ``ndim`` None: any M.dim())."""

    mask: str  # name of M
    ndim: Optional[int]  # M.dim() the reduction implies (len(dims) + 1); None for the last-axis form
    src: ast.AST  # the SRC expression (a node inside the loop's iterable or the hit assignment)
    vector: bool  # V is a row of nonzero() (shape (1,)); else a scalar id
    axis: object = 0  # M's expert axis: 0 or "last"


def _last_axis_source(src) -> Optional[tuple]:
    """(M name, None, "last") for ``M.reshape(A, E).sum(0)`` (``view``, ``sum(dim=0)``, ``sum(-2)``,
    ``torch.sum(M.reshape(A, E), 0)``; transformers 4.x Switch Transformers): a 2-D reshape summed over
    its rows. Column j of a reshape of M to (A, E) holds exactly the elements of M whose last index is
    j when E == M.shape[-1] (row-major order), so SRC[j] sums M[..., j]; the rewritten code checks
    that at trace time (``hit.shape[0] == M.shape[-1]``: SRC is 1-D, so the reshape was 2-D)."""
    red = src
    if is_method(red, {"sum", "any", "amax"}) and source_text(red.func.value) != "torch":
        flat, dim = red.func.value, _kwarg(red, "dim", 0)
    elif is_torch_fn(red, {"sum", "any", "amax"}) and isinstance(red.func, ast.Attribute) \
            and source_text(red.func.value) == "torch" and len(red.args) >= 1:
        flat, dim = red.args[0], _kwarg(red, "dim", 1)
    else:
        return None
    if any(k.arg not in ("dim",) for k in red.keywords) or len(red.args) > (2 if flat is not red.func.value else 1) \
            or _dims(dim) not in ((0,), (-2,)):
        return None
    if not is_method(flat, {"reshape", "view"}) or flat.keywords or not isinstance(flat.func.value, ast.Name):
        return None
    shape = flat.args[0].elts if len(flat.args) == 1 and isinstance(flat.args[0], (ast.Tuple, ast.List)) else flat.args
    if len(shape) != 2 or any(isinstance(a, ast.Starred) for a in shape):
        return None
    return flat.func.value.id, None, "last"


def _hit_source(src, bare: bool = False) -> Optional[tuple]:
    """(M name, ndim, expert axis) for ``M.sum(dims) > 0`` / ``torch.greater(M.sum(dims), 0)`` /
    ``M.any(dims)`` and spellings (``gt``, ``!= 0``, ``ne``, ``torch.sum(M, dims)``, ``torch.any(M,
    dims)``), keeping dimension 0 (axis 0). ``bare``: SRC is read by ``nonzero``, so the reduction
    itself (``nonzero(M.sum(dims))``) is the same set as ``nonzero(M.sum(dims) > 0)`` for M >= 0
    (which the caller proves or checks, as for ``> 0``: a sum of nonnegative numbers is 0 exactly
    when all of them are); then also ``M.reshape(A, E).sum(0)`` (``_last_axis_source``)."""
    if bare:
        last = _last_axis_source(src)
        if last is not None:
            return last
    reduced = None
    if bare and (is_method(src, {"sum", "amax"}) or is_torch_fn(src, {"sum", "amax"})):
        reduced = src
    elif isinstance(src, ast.Compare) and len(src.ops) == 1 and isinstance(src.ops[0], (ast.Gt, ast.NotEq)) \
            and const_int(src.comparators[0]) == 0:
        reduced = src.left
    elif is_torch_fn(src, {"greater", "gt", "ne", "not_equal"}) and len(src.args) == 2 \
            and const_int(src.args[1]) == 0 and isinstance(src.func, ast.Attribute) \
            and source_text(src.func.value) in ("torch",):
        reduced = src.args[0]
    elif is_method(src, {"gt", "greater", "ne"}) and len(src.args) == 1 and const_int(src.args[0]) == 0:
        reduced = src.func.value
    elif is_method(src, {"bool"}) and not src.args:
        reduced = src.func.value
    elif is_method(src, {"any"}):
        reduced = src
    if reduced is None or not isinstance(reduced, ast.Call) or not isinstance(reduced.func, ast.Attribute):
        return None
    if reduced.func.attr not in ("sum", "any", "amax"):
        return None
    if isinstance(reduced.func.value, ast.Name) and source_text(reduced.func.value) != "torch":
        mask, dims = reduced.func.value.id, _kwarg(reduced, "dim", 0)
    elif source_text(reduced.func.value) == "torch" and reduced.args and isinstance(reduced.args[0], ast.Name):
        mask, dims = reduced.args[0].id, _kwarg(reduced, "dim", 1)
    else:
        return None
    dims = _dims(dims) if dims is not None else None
    if not dims or len(set(dims)) != len(dims):
        return None
    ndim = len(dims) + 1
    if any(d % ndim == 0 for d in dims) or any(not -ndim <= d < ndim for d in dims):
        return None  # the reduction must keep dimension 0 (the expert)
    return mask, ndim, 0


def _nonzero_of(it) -> Optional[tuple]:
    """(SRC node, vector) for the iterable of a hit loop: ``SRC.nonzero()`` (rows of shape (1,)),
    ``torch.nonzero(SRC)``, ``torch.argwhere(SRC)``, with ``.squeeze(-1)``/``.flatten()``/``[:, 0]``/
    ``.tolist()`` after it (scalar ids), ``SRC.nonzero(as_tuple=True)[0]``, ``torch.where(SRC)[0]``."""
    scalar = False
    node = it
    if is_method(node, {"tolist"}) and not node.args:
        node = node.func.value
    if is_method(node, {"squeeze", "flatten", "view", "reshape", "ravel"}):
        args = [const_int(a) for a in node.args]
        if node.func.attr in ("flatten", "ravel") and not node.args or args in ([-1], [1]):
            node, scalar = node.func.value, True
    elif isinstance(node, ast.Subscript):
        sl = node.slice
        if isinstance(sl, ast.Tuple) and len(sl.elts) == 2 and isinstance(sl.elts[0], ast.Slice) \
                and sl.elts[0].lower is None and sl.elts[0].upper is None and const_int(sl.elts[1]) == 0:
            node, scalar = node.value, True
        elif const_int(sl) == 0:
            inner = node.value
            if is_method(inner, {"nonzero"}) and source_text(inner.func.value) != "torch" \
                    and source_text(_kwarg(inner, "as_tuple") or ast.Constant(False)) == "True":
                return inner.func.value, False, True
            if is_torch_fn(inner, {"where", "nonzero"}) and isinstance(inner.func, ast.Attribute) \
                    and source_text(inner.func.value) == "torch" and len(inner.args) == 1 \
                    and (inner.func.attr == "where" or source_text(_kwarg(inner, "as_tuple") or ast.Constant(False)) == "True"):
                return inner.args[0], False, True
            return None
    if is_method(node, {"nonzero", "argwhere"}) and not node.args \
            and source_text(_kwarg(node, "as_tuple") or ast.Constant(False)) == "False":
        return node.func.value, not scalar, scalar
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and source_text(node.func.value) == "torch" \
            and node.func.attr in ("nonzero", "argwhere") and len(node.args) == 1 \
            and source_text(_kwarg(node, "as_tuple") or ast.Constant(False)) == "False":
        return node.args[0], not scalar, scalar
    return None


# --------------------------------------------------------------------------- the loop body

@dataclasses.dataclass
class _Sel:
    """A selection: ``key`` names what is selected ("idx", M) = M[S], ("eq", R) = R == S; ``exact``:
    empty exactly when the selection is empty (else: empty whenever it is); ``kind``: "mask" (a
    boolean / nonnegative mask), "index" (index tensor), "tuple" (tuple of index tensors)."""

    key: tuple
    exact: bool
    kind: str
    dtype: str = "bool"  # of a "mask": "bool", "same" (M's own dtype: M[S]) or "other" (cast)


class _Body:
    """Checks (and rewrites) one loop body; raises Decline with the reason."""

    def __init__(self, self_name, counts, outer_names, scalars, vector, reasons):
        self.self_name = self_name
        self.counts = counts  # name -> R source of ``counts = bincount(R...)[.tolist()]``
        self.outer = outer_names  # names bound outside the loop
        self.scalars = set(scalars)  # names holding the expert id (int or 0-d tensor)
        self.vector = vector  # the hit loop's variable when it is a (1,) row, else None
        self.sel: dict = {}  # name -> _Sel
        self.aliases: set = set()  # names that were ``index.tolist()``: used only as an index
        self.assigned: set = set()  # names bound in the body so far (this iteration)
        self.base_reasons = list(reasons)
        self.removed: list = []  # descriptions of removed skips
        self.counts_used: set = set()
        self.accumulators: set = set()  # names rebound by `acc = acc.index_add(...)`
        self.fresh: set = set()  # names holding a tensor computed in this iteration (not a view of another)
        self.dim_checks: set = set()  # (M, ndim): M[:, .., S] matched as M's last axis needs M.dim() == ndim
        self.bool_masks: set = set()  # M whose selection M[..S] indexes a write directly: must be bool

    # ----- expressions
    def _scalar_expr(self, node) -> bool:
        if isinstance(node, ast.Name):
            return node.id in self.scalars or node.id == EXPERT
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult)):
            return (self._scalar_expr(node.left) and self._static(node.right)) or \
                (self._scalar_expr(node.right) and self._static(node.left))
        return False

    def _none_test(self, node) -> bool:
        """``X is None`` / ``X is not None`` of a name the loop never binds (an optional argument such
        as vLLM's ``b_bias1``): the same answer for every expert, and a constant to Dynamo."""
        return isinstance(node, ast.Compare) and len(node.ops) == 1 and isinstance(node.ops[0], (ast.Is, ast.IsNot)) \
            and isinstance(node.comparators[0], ast.Constant) and node.comparators[0].value is None \
            and self._outer_stable(node.left) is not None

    @staticmethod
    def _type_test(node) -> bool:
        """``isinstance(name, T)`` / ``isinstance(name, (T1, T2))`` with T dotted names: a Python type,
        known while tracing (DeepSpeed's ``Experts``: ``if isinstance(out, tuple)``); no tensor data read."""
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "isinstance"
                and len(node.args) == 2 and not node.keywords and isinstance(node.args[0], ast.Name)):
            return False
        types_ = node.args[1].elts if isinstance(node.args[1], ast.Tuple) else [node.args[1]]
        return all(isinstance(t, (ast.Name, ast.Attribute)) and all(isinstance(n, (ast.Name, ast.Attribute, ast.Load))
                                                                     for n in ast.walk(t)) for t in types_)

    def _static(self, node) -> bool:
        """Only the expert id, ``self`` attributes, constants and ``is None`` tests of names bound
        before the loop: the same in eager and traced."""
        if self._none_test(node) or self._type_test(node):
            return True
        if isinstance(node, ast.BoolOp):
            return all(self._static(v) for v in node.values)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            return self._static(node.operand)
        for n in ast.walk(node):
            if isinstance(n, ast.Name):
                if not (n.id in self.scalars or n.id == EXPERT or n.id == self.self_name
                        or n.id in ("None", "True", "False")):
                    return False
            elif isinstance(n, (ast.Call, ast.Subscript, ast.Lambda, ast.NamedExpr, ast.Await, ast.Yield)):
                return False
        return True

    def _outer_stable(self, node) -> Optional[str]:
        """A name the loop body never binds: the same tensor in every iteration."""
        if isinstance(node, ast.Name) and node.id not in self._body_names and node.id not in self.scalars \
                and node.id != EXPERT:
            return node.id
        return None

    def selection(self, node) -> Optional[_Sel]:
        if isinstance(node, ast.Name):
            return self.sel.get(node.id)
        if isinstance(node, ast.Compare) and len(node.ops) == 1 and isinstance(node.ops[0], ast.Eq):
            a, b = node.left, node.comparators[0]
            for r, s in ((a, b), (b, a)):
                name = self._outer_stable(r)
                if name is not None and self._scalar_expr(s):
                    return _Sel(("eq", name), True, "mask")
            return None
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            attr, recv = node.func.attr, node.func.value
            if source_text(recv) == "torch":
                if attr == "eq" and len(node.args) == 2:
                    return self.selection(ast.Compare(node.args[0], [ast.Eq()], [node.args[1]]))
                if attr in ("where", "nonzero", "argwhere") and len(node.args) == 1:
                    s = self.selection(node.args[0])
                    if s is None or s.kind != "mask":
                        return None
                    as_tuple = attr == "where" or source_text(_kwarg(node, "as_tuple") or ast.Constant(False)) == "True"
                    return _Sel(s.key, s.exact, "tuple" if as_tuple else "index")
                if attr == "any" and node.args:
                    s = self.selection(node.args[0])
                    return _Sel(s.key, s.exact, "mask") if s is not None and s.kind == "mask" else None
                return None
            if attr == "eq" and len(node.args) == 1:
                return self.selection(ast.Compare(recv, [ast.Eq()], [node.args[0]]))
            s = self.selection(recv)
            if s is None:
                return None
            if attr in ("nonzero", "argwhere") and s.kind == "mask":
                as_tuple = source_text(_kwarg(node, "as_tuple") or ast.Constant(False)) == "True"
                return _Sel(s.key, s.exact, "tuple" if as_tuple else "index")
            if attr == "any" and s.kind == "mask":
                return _Sel(s.key, s.exact, "mask")
            if attr in _SAME_EMPTINESS and s.kind != "tuple":
                dtype = "bool" if attr == "bool" else "other" if attr in ("to", "long", "int") else s.dtype
                return dataclasses.replace(s, dtype=dtype)
            if attr in _EMPTY_IF_EMPTY and s.kind != "tuple":
                return _Sel(s.key, False, s.kind, s.dtype)
            return None
        if isinstance(node, ast.Subscript):
            name = self._outer_stable(node.value)
            axis = self._expert_axis(node.slice) if name is not None else None
            if axis is not None:
                return _Sel(("idx", name, axis), True, "mask", "same")  # M[S], M[:, :, S], M[..., S]
            s = self.selection(node.value)
            if s is None:
                return None
            if s.kind == "tuple" and const_int(node.slice) is not None:
                return _Sel(s.key, s.exact, "index")
            cut = self._cut(node.slice) if s.kind == "index" else None
            if cut is not None:  # X[:c]: its own key (see _truncation)
                return _Sel(("trunc", s.key, cut), True, "index")
            if s.kind == "index":
                sl = node.slice
                rows_kept = isinstance(sl, ast.Tuple) and sl.elts and isinstance(sl.elts[0], ast.Slice) \
                    and sl.elts[0].lower is None and sl.elts[0].upper is None and sl.elts[0].step is None
                return _Sel(s.key, bool(rows_kept) and s.exact, "index")
            if s.kind == "mask":
                return _Sel(s.key, False, "mask", s.dtype)
            return None
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitAnd):
            for side, other in ((node.left, node.right), (node.right, node.left)):
                s = self.selection(side)
                if s is not None and s.kind == "mask":
                    o = self.selection(other)
                    both = s.dtype == "bool" and (isinstance(other, ast.Compare) or o is not None and o.dtype == "bool")
                    return _Sel(s.key, False, "mask", "bool" if both else "other")
        return None

    def _cut(self, sl) -> Optional[str]:
        """The source of c for a slice ``[:c]`` whose c is free of calls and indexing and of names the
        loop body binds (the same value wherever it is written in one iteration); None otherwise."""
        if not isinstance(sl, ast.Slice) or sl.lower is not None or sl.step is not None or sl.upper is None:
            return None
        if not all(isinstance(n, PURE_NODES) for n in ast.walk(sl.upper)) or \
                any(isinstance(n, ast.Name) and n.id in self._body_names for n in ast.walk(sl.upper)):
            return None
        return source_text(sl.upper)

    def _truncation(self, node) -> Optional[tuple]:
        """(selection, replacement) for a capacity truncation (``_capacity_truncation``) of this expert's
        index tensor X: the replacement is ``X[:c]`` when c is an int (and X is 1-D where the test
        counts ``numel()``), checked at trace time, else the original expression. The truncated rows
        get their own selection key: empty exactly when they are (a test of their emptiness is a skip
        of exactly that), and empty whenever X is (``same_key``)."""
        found = _capacity_truncation(node)
        if found is None:
            return None
        x, c, by_numel = found
        s = self.selection(x)
        if s is None or s.kind != "index" or self._cut(ast.Slice(upper=c)) is None:
            return None
        check = f"isinstance({source_text(c)}, int)" + (f" and {x.id}.dim() == 1" if by_numel else "")
        value = ast.IfExp(test=ast.parse(check, mode="eval").body,
                          body=ast.Subscript(value=ast.Name(x.id, ast.Load()),
                                             slice=ast.Slice(upper=copy.deepcopy(c)), ctx=ast.Load()),
                          orelse=node)
        self.removed.append(f"`{short(node)}` (as {x.id}[:{short(c)}])")
        return _Sel(("trunc", s.key, source_text(c)), True, "index"), ast.fix_missing_locations(value)

    def _expert_axis(self, sl) -> object:
        """The axis an index selects the expert id S on: 0 for ``[S]``, k for ``[:, .. (k), S]``,
        "last" for ``[..., S]``; None for any other index."""
        if self._scalar_expr(sl):
            return 0
        if not isinstance(sl, ast.Tuple) or len(sl.elts) < 2 or not self._scalar_expr(sl.elts[-1]):
            return None
        lead = sl.elts[:-1]
        if len(lead) == 1 and isinstance(lead[0], ast.Constant) and lead[0].value is Ellipsis:
            return "last"
        full = all(isinstance(e, ast.Slice) and e.lower is None and e.upper is None and e.step is None for e in lead)
        return len(lead) if full else None

    def same_key(self, key, reason) -> bool:
        """The selection ``key`` is the one ``reason`` proves empty. ``M[:, :, S]`` (axis 2) is M's last
        axis when M.dim() == 3: recorded in ``dim_checks``, which the rewritten code checks."""
        if key == reason:
            return True
        if key[0] == "trunc":  # the first rows of a selection: empty whenever it is
            return self.same_key(key[1], reason)
        if key[0] == reason[0] == "idx" and key[1] == reason[1]:
            axes = {key[2], reason[2]}
            if "last" in axes and len(axes) == 2:
                k = next(a for a in axes if a != "last")
                self.dim_checks.add((key[1], k + 1))
                return True
        return False

    def emptiness_test(self, test) -> Optional[tuple]:
        """(key, True) if ``test`` is true exactly when the selection ``key`` is empty, (key, False)
        if exactly when it is not; None if ``test`` is not such a test."""
        if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
            r = self.emptiness_test(test.operand)
            return (r[0], not r[1]) if r else None
        if isinstance(test, ast.Compare) and len(test.ops) == 1:
            op, left, right = test.ops[0], test.left, test.comparators[0]
            if const_int(left) is not None and const_int(right) is None:
                left, right = right, left
                op = {ast.Gt: ast.Lt(), ast.Lt: ast.Gt(), ast.GtE: ast.LtE(), ast.LtE: ast.GtE()}.get(type(op), op)
            c = const_int(right)
            key = self._measure(left)
            if key is None or c is None:
                return None
            if (isinstance(op, ast.Eq) and c == 0) or (isinstance(op, ast.Lt) and c == 1) \
                    or (isinstance(op, ast.LtE) and c == 0):
                return key, True
            if (isinstance(op, (ast.NotEq, ast.Gt)) and c == 0) or (isinstance(op, ast.GtE) and c == 1):
                return key, False
            return None
        key = self._measure(test)
        if key is not None:
            return key, False
        node = test
        if is_method(node, {"item"}) and not node.args:
            node = node.func.value
        if is_method(node, {"any"}) and not node.args and not node.keywords:
            s = self.selection(node.func.value)
            if s is not None and s.exact and s.kind == "mask":
                return s.key, False
        if is_torch_fn(node, {"any"}) and isinstance(node.func, ast.Attribute) and source_text(node.func.value) == "torch" \
                and len(node.args) == 1 and not node.keywords:
            s = self.selection(node.args[0])
            if s is not None and s.exact and s.kind == "mask":
                return s.key, False
        return None

    def _measure(self, node) -> Optional[tuple]:
        """The selection key of a count that is zero exactly when the selection is empty:
        ``idx.numel()``/``nelement()``/``shape[0]``/``size(0)``/``len(idx)`` of an index tensor,
        ``mask.sum()`` of a mask, ``counts[S]``."""
        if is_method(node, {"item"}) and not node.args:
            node = node.func.value
        if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id in self.counts \
                and self._scalar_expr(node.slice):
            self.counts_used.add(node.value.id)
            return ("eq", self.counts[node.value.id])
        target = length_of(node)[0]
        if target is not None:
            s = self.selection(target)
            return s.key if s is not None and s.exact and s.kind == "index" else None
        if is_method(node, {"sum", "count_nonzero"}) and not node.args and not node.keywords:
            s = self.selection(node.func.value)
            return s.key if s is not None and s.exact and s.kind == "mask" else None
        return None

    def _computes_new_tensor(self, node) -> bool:
        """Is ``node`` a tensor computed here, not a view of (or the same object as) a tensor defined
        outside the loop? Arithmetic is; a view method is when its receiver is; any other call is when
        no argument is a name from outside the loop (an Identity or eval-mode Dropout module returns
        its input); indexing by a selection copies."""
        if isinstance(node, (ast.BinOp, ast.UnaryOp)):
            return True
        if isinstance(node, ast.Name):
            return node.id in self.fresh
        if isinstance(node, ast.Subscript):
            return self.selection(node.slice) is not None or self._computes_new_tensor(node.value)
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Attribute) and f.attr in _VIEWS:
                return self._computes_new_tensor(f.value)
            args = list(node.args) + [k.value for k in node.keywords]
            return not any(isinstance(a, ast.Name) and (a.id in self.outer or a.id not in self.fresh
                                                         and a.id not in self.scalars) for a in args)
        return False

    # ----- purity
    def check_expr(self, node) -> None:
        for n in ast.walk(node):
            if isinstance(n, (ast.Lambda, ast.NamedExpr, ast.Yield, ast.YieldFrom, ast.Await)):
                raise Decline(n, f"`{short(n)}` inside the loop")
            if isinstance(n, ast.Call):
                f = n.func
                if isinstance(f, ast.Attribute):
                    if f.attr in _HOST_OR_MUTATING_METHODS:
                        what = "reads a tensor on the host" if f.attr in ("item", "tolist", "cpu", "numpy") \
                            else "has a side effect"
                        raise Decline(n, f"`{short(n)}` {what}")
                    if f.attr.endswith("_") and not f.attr.endswith("__"):
                        raise Decline(n, f"`{short(n)}` modifies a tensor in place")
                elif isinstance(f, ast.Name) and f.id in _FORBIDDEN_FUNCTIONS:
                    raise Decline(n, f"`{short(n)}` has a side effect")
            if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load):
                if n.id == self.vector:
                    raise Decline(n, f"the nonzero() row `{n.id}` is used as a tensor (`{short(node)}`), "
                                     f"not as the expert id `{n.id}[0]`")
                if n.id in self.aliases and not self._inside_index(n, node):
                    raise Decline(n, f"`{n.id}` (a host list of token ids) is used other than as an index")
                if n.id not in self.assigned and n.id in self._body_names and n.id not in self.scalars:
                    raise Decline(n, f"`{n.id}` carries a value from one expert's iteration to the next")
            if isinstance(n, ast.Name) and n.id in self.counts and isinstance(n.ctx, ast.Load) \
                    and not getattr(n, "_sonic_counts_ok", False):
                raise Decline(n, f"the host counts `{n.id}` are used other than to skip experts with no tokens")

    @staticmethod
    def _inside_index(name_node, root) -> bool:
        n = name_node
        while n is not root and hasattr(n, "_sonic_parent"):
            p = n._sonic_parent
            if isinstance(p, ast.Subscript) and n is p.slice:
                return True
            n = p
        return False

    # ----- statements
    def run(self, body) -> list:
        self._body_names = set()
        for s in body:
            self._body_names.update(_names_stored(s))
        return self.block(body, list(self.base_reasons))

    def block(self, body, reasons) -> list:
        out = []
        reasons = list(reasons)
        for s in body:
            if isinstance(s, ast.If):
                r = self.if_stmt(s, reasons)
                if r is None:
                    continue  # a removed skip
                if isinstance(r, tuple):  # `if <skip>: continue` removed: later statements gain a reason
                    reasons.append(r[0])
                    continue
                out.extend(r)
                continue
            out.extend(self.stmt(s, reasons))
        return out

    def if_stmt(self, s, reasons):
        _with_parents(s.test)
        if self._static(s.test):
            new = copy.copy(s)
            before, fresh_before = set(self.assigned), set(self.fresh)
            new.body = self.block(s.body, reasons) or [ast.Pass()]
            after_body, fresh_body = set(self.assigned), set(self.fresh)
            self.assigned, self.fresh = set(before), set(fresh_before)
            new.orelse = self.block(s.orelse, reasons) if s.orelse else []
            self.assigned = after_body & self.assigned if s.orelse else before
            self.fresh = fresh_body & self.fresh  # what holds on both paths
            return [new]
        t = self.emptiness_test(s.test)
        if t is None and self._capacity_test(s.test):
            raise Decline(s, f"`if {short(s.test)}` compares the length of this expert's rows with a capacity, "
                             f"not with 0, and guards statements (not one expression `X[:c] if len(X) > c else X`, "
                             f"which is traced as X[:c]): whether they run depends on how many tokens the expert got")
        if t is None:
            raise Decline(s, f"`if {short(s.test)}` branches on tensor data that is not the emptiness of "
                             f"this expert's selection")
        key, true_when_empty = t
        if true_when_empty and len(s.body) == 1 and isinstance(s.body[0], ast.Continue) and not s.orelse:
            self.removed.append(f"`if {short(s.test)}: continue`")
            return (key,)
        if not true_when_empty and not s.orelse:
            self.removed.append(f"`if {short(s.test)}:`")
            before = set(self.assigned)
            inner = self.block(s.body, reasons + [key])
            self.assigned = before  # names bound only on that path do not count as bound after it
            return inner
        raise Decline(s, f"`if {short(s.test)}` has a form other than a skip (`continue`) or a guard "
                         f"around the expert's work")

    @staticmethod
    def _capacity_test(test) -> bool:
        """``len(X) <= c``-like: a row count of X compared (<, <=, >, >=) with a non-constant bound."""
        if not (isinstance(test, ast.Compare) and len(test.ops) == 1
                and isinstance(test.ops[0], (ast.Lt, ast.LtE, ast.Gt, ast.GtE))):
            return False
        a, b = test.left, test.comparators[0]
        return any(length_of(m)[0] is not None and const_int(o) is None for m, o in ((a, b), (b, a)))

    def _accumulation_index(self, node, reasons, what) -> None:
        if not reasons:
            return  # runs for the same experts before and after the rewrite
        idx = node.elts if isinstance(node, ast.Tuple) else [node]
        keys = []
        for e in idx:
            if isinstance(e, ast.Slice) or (isinstance(e, ast.Constant) and e.value in (None, Ellipsis)):
                continue
            s = self.selection(e)
            if s is None:
                if self._static(e):
                    continue
                raise Decline(e, f"{what} is indexed by `{short(e)}`, which is not derived from this expert's "
                                 f"selection")
            keys.append(s.key)
            if s.kind == "mask" and s.dtype == "other":
                raise Decline(e, f"{what} is indexed by `{short(e)}`, a mask cast to another dtype (an integer "
                                 f"index selects rows by value, not by mask)")
            if s.kind == "mask" and s.dtype == "same" and s.key[0] == "idx":
                self.bool_masks.add(s.key[1])  # an integer M[S] would index rows by value, not select
        if not keys:
            raise Decline(node, f"{what} is not indexed by this expert's selection")
        for r in reasons:
            if any(not self.same_key(k, r) for k in keys):
                raise Decline(node, f"{what} selects by `{short(node)}`, and the skipped condition does not "
                                    f"prove that selection empty")

    def _accumulator(self, node, what) -> str:
        if not isinstance(node, ast.Name) or node.id in self._body_names and node.id not in self.outer:
            raise Decline(node, f"{what} writes into `{short(node)}`, not a tensor defined outside the loop")
        return node.id

    def stmt(self, s, reasons) -> list:
        _with_parents(s)
        if isinstance(s, ast.Assign):
            if len(s.targets) != 1:
                raise Decline(s, f"`{short(s)}`: chained assignment in the loop")
            target = s.targets[0]
            if isinstance(target, ast.Subscript):  # acc[mask] = v
                self.check_expr(s.value)
                self.check_expr(target.slice)
                self._accumulator(target.value, f"`{short(s)}`")
                self._accumulation_index(target.slice, reasons, f"`{short(s)}`")
                return [s]
            if isinstance(target, ast.Name) and target.id in self.outer and target.id in self._body_names \
                    and is_method(s.value, {"index_add", "index_put", "scatter_add"}, receiver=target.id):
                # acc = acc.index_add(0, idx, v)
                self.accumulators.add(target.id)
                self.check_expr(s.value)
                self._method_accumulation(s.value, reasons)
                return [s]
            names = [target] if isinstance(target, ast.Name) else \
                list(target.elts) if isinstance(target, ast.Tuple) else None
            if names is None or not all(isinstance(n, ast.Name) for n in names):
                raise Decline(s, f"`{short(s)}` writes an attribute or an element outside the loop")
            for n in names:
                if n.id in self.outer and n.id not in self.scalars:
                    raise Decline(s, f"`{short(s)}` rebinds `{n.id}`, a name defined outside the loop")
            # index.tolist() used as an index: the index tensor itself selects the same rows
            if len(names) == 1 and is_method(s.value, {"tolist"}) and not s.value.args:
                sel = self.selection(s.value.func.value)
                if sel is not None and sel.kind == "index":
                    s = ast.Assign(targets=[target], value=s.value.func.value, lineno=s.lineno,
                                   col_offset=s.col_offset)
                    self.aliases.add(target.id)
                    self.sel[target.id] = sel
                    self.assigned.add(target.id)
                    return [s]
            self.check_expr(s.value)
            sel = self.selection(s.value)
            trunc = self._truncation(s.value) if len(names) == 1 else None
            if trunc is not None:  # `X[:c] if len(X) > c else X`: X[:c] under a trace-time type check
                sel, value = trunc
                s = ast.Assign(targets=[target], value=value, lineno=s.lineno, col_offset=s.col_offset)
            fresh = len(names) == 1 and self._computes_new_tensor(s.value)
            for n in names:
                self.sel.pop(n.id, None)
                self.scalars.discard(n.id)
                if n.id == self.vector:
                    self.vector = None  # `e = e[0]`: from here on the name is the expert id
            if len(names) == 1:
                if self._scalar_expr(s.value) or (isinstance(s.value, ast.Call) and isinstance(s.value.func, ast.Name)
                                                  and s.value.func.id == "int" and len(s.value.args) == 1
                                                  and self._scalar_expr(s.value.args[0])):
                    self.scalars.add(names[0].id)
                elif sel is not None:
                    self.sel[names[0].id] = sel
            elif sel is not None and sel.kind == "tuple":
                for n in names:
                    self.sel[n.id] = _Sel(sel.key, sel.exact, "index")
            self.assigned.update(n.id for n in names)
            for n in names:
                self.fresh.discard(n.id)
            if fresh:
                self.fresh.add(names[0].id)
            return [s]
        if isinstance(s, ast.AugAssign):
            self.check_expr(s.value)
            if isinstance(s.target, ast.Subscript):  # acc[idx] += v
                self.check_expr(s.target.slice)
                self._accumulator(s.target.value, f"`{short(s)}`")
                self._accumulation_index(s.target.slice, reasons, f"`{short(s)}`")
                return [s]
            if isinstance(s.target, ast.Name) and s.target.id in self.assigned and s.target.id not in self.outer:
                if s.target.id not in self.fresh:
                    raise Decline(s, f"`{short(s)}` updates in place a tensor that may share memory with one "
                                     f"defined outside the loop")
                return [s]  # in place on a tensor this iteration computed
            raise Decline(s, f"`{short(s)}` accumulates across experts outside a tensor")
        if isinstance(s, ast.Expr):
            if isinstance(s.value, ast.Constant):
                return [s]
            if is_method(s.value, _ACCUMULATING_METHODS):
                self._accumulator(s.value.func.value, f"`{short(s)}`")
                for a in list(s.value.args) + [k.value for k in s.value.keywords]:
                    self.check_expr(a)
                self._method_accumulation(s.value, reasons)
                return [s]
            raise Decline(s, f"`{short(s)}`: a call whose result is not used (a side effect)")
        if isinstance(s, ast.With):
            for item in s.items:
                ctx = item.context_expr
                if not (isinstance(ctx, ast.Call) and isinstance(ctx.func, ast.Attribute)
                        and ctx.func.attr in _STATIC_CONTEXTS) or item.optional_vars is not None:
                    raise Decline(s, f"`with {short(ctx)}` inside the loop")
            new = copy.copy(s)
            new.body = self.block(s.body, reasons) or [ast.Pass()]
            return [new]
        if isinstance(s, (ast.Pass, ast.Continue)):
            return [s]  # a bare `continue` (or one under a static test) skips the same experts as before
        if isinstance(s, (ast.For, ast.While, ast.AsyncFor)):
            raise Decline(s, "a nested loop inside the per-expert loop")
        kind = type(s).__name__.lower()
        raise Decline(s, f"`{short(s)}` ({kind}) inside the loop")

    def _method_accumulation(self, call, reasons) -> None:
        attr = call.func.attr.rstrip("_")
        what = f"`{short(call)}`"
        if attr in ("index_add", "index_copy", "index_fill", "index_reduce"):
            dim = _kwarg(call, "dim", 0)
            idx = _kwarg(call, "index", 1)
            if const_int(dim) is None or idx is None:
                raise Decline(call, f"{what}: dimension or index not recognised")
            self._accumulation_index(idx, reasons, what)
        elif attr == "index_put":
            idx = _kwarg(call, "indices", 0)
            if not isinstance(idx, (ast.Tuple, ast.List)):
                raise Decline(call, f"{what}: indices are not a literal tuple")
            self._accumulation_index(ast.Tuple(elts=list(idx.elts), ctx=ast.Load()), reasons, what)
        elif attr in ("scatter_add", "scatter_reduce"):
            idx = _kwarg(call, "index", 1)
            if idx is None:
                raise Decline(call, f"{what}: index not recognised")
            self._accumulation_index(idx, reasons, what)
        elif attr == "masked_scatter":
            self._accumulation_index(_kwarg(call, "mask", 0), reasons, what)
        else:  # pragma: no cover
            raise Decline(call, f"{what} not recognised")


# --------------------------------------------------------------------------- one function

def _function_tree(fn):
    src = textwrap.dedent(inspect.getsource(fn))
    tree = ast.parse(src)
    fdef = tree.body[0]
    if not isinstance(fdef, (ast.FunctionDef,)) or fdef.name != fn.__name__:
        raise Decline(None, "the source is not a plain function definition")
    _, first = inspect.getsourcelines(fn)
    ast.increment_lineno(tree, first - 1)
    return tree, fdef


def _assignment_of(fdef, name):
    for n in ast.walk(fdef):
        if isinstance(n, ast.Assign) and len(n.targets) == 1 and isinstance(n.targets[0], ast.Name) \
                and n.targets[0].id == name:
            return n
    return None


# casts and views that keep every value's sign (>= 0 stays >= 0)
_SIGN_KEEPING = {"bool", "long", "int", "float", "double", "half", "bfloat16", "to", "view", "reshape", "permute",
                 "transpose", "flatten", "unsqueeze", "squeeze", "contiguous", "clone", "detach", "t", "type_as"}


def _mask_proven_nonnegative(fdef, mask, before, depth: int = 4) -> bool:
    """M >= 0 everywhere, proved from its last binding before ``before`` (a plain ``M = value`` in the
    same block, so that it is the binding that reaches ``before``):
    ``one_hot(...)``, a comparison, ``.bool()``, a product of such, casts and views of such, or a
    name proved so by its own last binding."""
    lines = [line for line in _store_lines(fdef, mask) if line < before.lineno]
    if not lines or depth <= 0:
        return False
    last = max(lines)
    a = [n for n in ast.walk(fdef) if isinstance(n, ast.Assign) and n.lineno == last and len(n.targets) == 1
         and is_name(n.targets[0], mask)]
    block = _block_of(fdef, before)
    if len(a) != 1 or block is None or not any(s is a[0] for s in block):
        return False  # bound on a branch or in another block: another binding may reach `before`
    return _nonnegative(fdef, a[0].value, a[0], depth)


def _nonnegative(fdef, v, at, depth) -> bool:
    if isinstance(v, ast.Compare) or is_method(v, {"bool"}) or is_torch_fn(v, {"one_hot", "eq", "ne", "gt", "lt",
                                                                                  "ge", "le", "isin"}):
        return True
    if isinstance(v, ast.BinOp) and isinstance(v.op, (ast.Mult, ast.BitAnd)):
        return _nonnegative(fdef, v.left, at, depth) and _nonnegative(fdef, v.right, at, depth)
    if isinstance(v, ast.Call) and isinstance(v.func, ast.Attribute) and v.func.attr in _SIGN_KEEPING:
        return _nonnegative(fdef, v.func.value, at, depth)
    if isinstance(v, ast.Name):
        return _mask_proven_nonnegative(fdef, v.id, at, depth - 1)
    return False


def _store_lines(fdef, name) -> list:
    return [n.lineno for n in ast.walk(fdef) if isinstance(n, ast.Name) and n.id == name
            and isinstance(n.ctx, ast.Store)]


def _counts_sources(fdef) -> dict:
    """name -> R for ``name = torch.bincount(R[.flatten()|.view(-1)|.reshape(-1)], ...)[.tolist()|.cpu()...]``."""
    out = {}
    for n in ast.walk(fdef):
        if not (isinstance(n, ast.Assign) and len(n.targets) == 1 and isinstance(n.targets[0], ast.Name)):
            continue
        v = n.value
        while is_method(v, {"tolist", "cpu", "numpy", "to"}):
            v = v.func.value
        if not (is_torch_fn(v, {"bincount"}) and isinstance(v.func, ast.Attribute)):
            continue
        r = v.args[0] if source_text(v.func.value) == "torch" and v.args else v.func.value
        if is_method(r, {"flatten", "view", "reshape", "ravel"}):
            args = [const_int(a) for a in r.args]
            if not (not r.args or args == [-1]):
                continue
            r = r.func.value
        if isinstance(r, ast.Name) and all(line < n.lineno for line in _store_lines(fdef, r.id)) \
                and len(_store_lines(fdef, n.targets[0].id)) == 1:
            out[n.targets[0].id] = r.id  # R is not rebound after the counts are taken
    return out


def _rebound_hit(fdef, loop, name, stores) -> Optional[tuple]:
    """(first, second, nonzero_of) for a hit name bound twice (transformers 4.x Switch Transformers)::

        hit = SRC                                          # first
        hit = torch.nonzero(hit, as_tuple=True)[0].tolist()  # second: the nonzero of the first
        for e in hit: ...

    both plain assignments in the loop's block, in that order before it, and ``hit`` read nowhere
    else (no in-place write or other reader of SRC between them): the loop iterates over the
    nonzero of SRC, as with one binding. None for anything else."""
    if stores.get(name) != 2:
        return None
    block = _block_of(fdef, loop)
    if block is None:
        return None
    binds = [i for i, s in enumerate(block) if name in _names_stored(s)]
    pos = next(i for i, s in enumerate(block) if s is loop)
    if len(binds) != 2 or not binds[1] < pos:
        return None
    first, second = block[binds[0]], block[binds[1]]
    for s in (first, second):
        if not (isinstance(s, ast.Assign) and len(s.targets) == 1 and is_name(s.targets[0], name)):
            return None
    found = _nonzero_of(second.value)
    if found is None or not is_name(found[0], name) or name in _names_loaded(first.value):
        return None
    if len(loads(fdef, name, exclude=second)) != 1 or len(loads(second, name)) != 1:
        return None  # read elsewhere (the loop's iterable is the one read allowed)
    return first, second, (first.value,) + tuple(found[1:])


def _rewrite_loop(fdef, loop, self_name, stores, counts) -> tuple:
    """(replacement statements, prelude edits, counts names used, form) or raises Decline."""
    if loop.orelse:
        raise Decline(loop, "the loop has an `else:` clause")
    if inside_loop(fdef, loop):
        raise Decline(loop, "the per-expert loop is inside another loop")
    body_names = set()
    for s in loop.body:
        body_names.update(_names_stored(s))
    target_names = _names_stored(loop.target)
    outer = {n for n in stores if n not in body_names and n not in target_names} | \
        {n for n in body_names if stores.get(n, 0) > sum(1 for s in loop.body for m in _names_stored(s) if m == n)
         + target_names.count(n)}

    hit = None
    hit_assign = None
    first = None  # the first of two bindings of the hit name (`hit = SRC; hit = nonzero(hit)...`)
    it = loop.iter
    if isinstance(it, ast.Name):
        a = _assignment_of(fdef, it.id)
        rebound = _rebound_hit(fdef, loop, it.id, stores)
        if rebound is not None:
            first, hit_assign, found = rebound
        elif a is not None and stores.get(it.id) == 1 and _nonzero_of(a.value) is not None:
            if len(loads(fdef, it.id)) != 1:
                raise Decline(loop, f"`{it.id}` (the experts that have tokens) is also used outside the loop")
            hit_assign, found = a, _nonzero_of(a.value)
        else:
            found = None
    else:
        found = _nonzero_of(it)
    if found is not None:
        src, vector, _ = found
        hs = _hit_source(src, bare=True)
        if hs is None:
            raise Decline(loop, f"`for {short(loop.target)} in {short(loop.iter)}` iterates over a "
                                f"data-dependent list, and `{short(src)}` is not a recognised 'has tokens' test "
                                f"(M.sum(dims) > 0 / M.any(dims) keeping dimension 0, M.reshape(A, E).sum(0))")
        mask, ndim, axis = hs
        at = (first or hit_assign).lineno if hit_assign is not None else loop.lineno
        if any(line >= at for line in _store_lines(fdef, mask)):
            raise Decline(loop, f"the mask `{mask}` is assigned again after the experts that have tokens are "
                                f"read from it")
        if not isinstance(loop.target, ast.Name):
            raise Decline(loop, "the loop variable is not a single name")
        hit = _Hit(mask, ndim, src, vector, axis)

    scalars = set()
    vector_name = None
    if hit is not None:
        if hit.vector:
            vector_name = loop.target.id
        else:
            scalars.add(loop.target.id)
        reasons = [("idx", mask, axis)]
    else:
        # any other loop keeps its header (it iterates exactly as before); only skips inside the body
        # go. The expert id is the variable of a range() or the count of an enumerate().
        if isinstance(loop.iter, ast.Call) and isinstance(loop.iter.func, ast.Name):
            if loop.iter.func.id == "range" and isinstance(loop.target, ast.Name):
                scalars.add(loop.target.id)
            elif loop.iter.func.id == "enumerate" and isinstance(loop.target, ast.Tuple) \
                    and isinstance(loop.target.elts[0], ast.Name):
                scalars.add(loop.target.elts[0].id)
        reasons = []

    # scalar forms of the nonzero row: V[0], V.item(), int(V), int(V[0]), V[0].item(), X[V].squeeze(0)
    new_body = [copy.deepcopy(s) for s in loop.body]
    if vector_name is not None:
        # ``self.experts[V]`` means the row only while V is not rebound (``e = e[0]`` makes it the id)
        rebound = any(vector_name in _names_stored(s) for s in loop.body)
        new_body = [_ScalarForms(vector_name, None if rebound else self_name).visit(s) for s in new_body]
        scalars.add(EXPERT)
    new_body = [_ItemOfScalar(scalars | {EXPERT}).visit(s) for s in new_body]
    # ``e = e.item()`` of a scalar id became ``e = e``: nothing is bound any more (Nemotron-H)
    new_body = [s for s in new_body if not (isinstance(s, ast.Assign) and len(s.targets) == 1
                                            and isinstance(s.targets[0], ast.Name) and isinstance(s.value, ast.Name)
                                            and s.targets[0].id == s.value.id and s.value.id in scalars)]
    for s in new_body:
        ast.fix_missing_locations(s)
        for n in ast.walk(s):
            if isinstance(n, ast.Subscript) and isinstance(n.value, ast.Name) and n.value.id in counts:
                n.value._sonic_counts_ok = True
    checker = _Body(self_name, counts, outer, scalars, vector_name, reasons)
    checked = checker.run(new_body)
    if hit is None and not checker.removed:
        return None
    checked = _in_range_guard(checker, checked, loop, hit is not None) + checked
    # names the body binds must not be read after the loop (the last iteration's values would differ)
    bound = (set(body_names) | set(target_names)) - checker.accumulators
    for s in following(fdef, loop):
        loaded = _names_loaded(s)
        for name in sorted(bound & loaded):
            raise Decline(loop, f"`{name}`, bound in the loop, is read after it (line {s.lineno}); "
                                f"it would hold another expert's value")
        if isinstance(s, ast.Assign):
            bound -= set(_names_stored(s))

    checks = [f"{name}.dim() == {ndim}" for name, ndim in sorted(checker.dim_checks)] + \
        [f"str({name}.dtype) == 'torch.bool'" for name in sorted(checker.bool_masks)]
    if hit is None:
        new_loop = copy.copy(loop)
        new_loop.body = checked or [ast.Pass()]
        form = f"`for {short(loop.target)} in {short(loop.iter)}` without " + ", ".join(checker.removed)
        if checks:  # checked at trace time (static); else the original loop runs
            new_loop = ast.If(test=ast.parse(" and ".join(checks), mode="eval").body, body=[new_loop], orelse=[copy.deepcopy(loop)])
        return [new_loop], None, checker.counts_used, form

    # the hit loop: for EXPERT in range(SRC.shape[0]) under a static shape check, else the original
    hit_name = hit_assign.targets[0].id if hit_assign is not None else "_sonic_hit"
    body = []
    if vector_name is None:
        body.append(ast.Assign(targets=[ast.Name(loop.target.id, ast.Store())], value=ast.Name(EXPERT, ast.Load())))
    body.extend(checked)
    new_for = ast.For(target=ast.Name(EXPERT, ast.Store()),
                      iter=ast.parse(f"range({hit_name}.shape[0])", mode="eval").body, body=body or [ast.Pass()],
                      orelse=[])
    if hit.axis == "last":
        cond = f"{hit_name}.dim() == 1 and {hit_name}.shape[0] == {hit.mask}.shape[-1]"
    else:
        cond = f"{hit_name}.dim() == 1 and {hit.mask}.dim() == {hit.ndim}"
    # M[:, :, S] read as the last axis: M.dim() == 3; acc[M[..S]] = v: a mask index only when M is bool
    cond += "".join(f" and {c}" for c in checks)
    if not _mask_proven_nonnegative(fdef, hit.mask, first or hit_assign or loop):
        cond += f" and not {hit.mask}.is_floating_point()"
    old_iter = copy.deepcopy(hit_assign.value if hit_assign is not None else loop.iter)
    old_iter = _Replace(hit.src, ast.Name(hit_name, ast.Load())).visit(old_iter)
    old_for = ast.For(target=loop.target, iter=old_iter, body=loop.body, orelse=[])
    guarded = ast.If(test=ast.parse(cond, mode="eval").body, body=[new_for], orelse=[old_for])
    stmts = [guarded]
    prelude = None
    if first is not None:  # `hit = SRC; hit = nonzero(hit)`: the second binding keeps SRC
        prelude = (hit_assign, ast.Name(hit_name, ast.Load()))
    elif hit_assign is not None:
        prelude = (hit_assign, copy.deepcopy(hit.src))
    else:
        stmts.insert(0, ast.Assign(targets=[ast.Name(hit_name, ast.Store())], value=copy.deepcopy(hit.src)))
    form = f"`for {short(loop.target)} in {short(loop.iter)}`"
    if checker.removed:
        form += " without " + ", ".join(checker.removed)
    return stmts, prelude, checker.counts_used, form



# --------------------------------------------------------------------------- segment loops

def _host_copy_of(value):
    """The expression T of a host copy of a tensor: ``T.tolist()``, ``T.cpu()``, ``T.cpu().numpy()``,
    ``T.cpu().tolist()``, ``T.numpy()``, ``T.cpu().numpy().tolist()``, else None."""
    v, seen = value, 0
    while is_method(v, {"tolist", "cpu", "numpy"}) and not v.args and not v.keywords:
        v, seen = v.func.value, seen + 1
    return v if seen else None


def _block_of(fdef, stmt) -> Optional[list]:
    for parent in ast.walk(fdef):
        for field in ("body", "orelse", "finalbody"):
            block = getattr(parent, field, None)
            if isinstance(block, list) and any(s is stmt for s in block):
                return block
    return None


def _last_store_before(block, loop, name):
    """The last statement of ``block`` before ``loop`` that binds ``name`` (None if none), provided it
    binds it at the top level of the block (a plain ``name = ...``)."""
    last = None
    for s in block:
        if s is loop:
            break
        if name in _names_stored(s):
            last = s
    if last is None or not (isinstance(last, ast.Assign) and len(last.targets) == 1
                            and isinstance(last.targets[0], ast.Name) and last.targets[0].id == name):
        return None
    return last


def _sum_of(node, a, b) -> bool:
    """``a + b`` or ``b + a`` (names)."""
    return isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add) and (
        (is_name(node.left, a) and is_name(node.right, b)) or (is_name(node.left, b) and is_name(node.right, a)))


def _zero_test(test, n) -> bool:
    """``n == 0`` / ``0 == n`` / ``not n``."""
    if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
        return is_name(test.operand, n)
    if isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq):
        l, r = test.left, test.comparators[0]
        return (is_name(l, n) and const_int(r) == 0) or (is_name(r, n) and const_int(l) == 0)
    return False


def _counts_sizes(sizes: str, T: str) -> ast.Assign:
    """``sizes = T.tolist() if isinstance(T, torch.Tensor) else list(T)``: the per-expert counts a segment
    loop reads as ``T[i]`` or iterates (``enumerate(T)``: the elements ``T[i]``, 0-d tensors of a 1-D
    tensor), as host ints; a list of ints is split by itself."""
    return ast.Assign(targets=[ast.Name(sizes, ast.Store())], value=ast.parse(
        f"{T}.tolist() if isinstance({T}, torch.Tensor) else list({T})", mode="eval").body)


def _segment_loop(fdef, loop, self_name, stores, glb) -> Optional[tuple]:
    """A *segment loop*: rows ``R[start:end]`` of consecutive segments whose sizes are per-expert
    counts, ``end = start + n``, ``start = end`` carried to the next expert, one output appended per
    expert to a list ``L`` that is only ``torch.cat(L, 0)``-ed after the loop, an optional
    ``if n == 0: continue``. The counts are either a host copy ``C = T.cpu().numpy()`` (``.tolist()``,
    ``.cpu()``) iterated as ``for i, n in enumerate(C)``, or the counts tensor iterated itself
    (``for i, n in enumerate(T)``: each n the 0-d ``T[i]``; transformers 4.5x ``DeepseekV2MoE.moe``), or
    read per expert ``n = T[i]`` in ``for i in range(...)``. Rewritten (plan as ``_rewrite_loop``'s) into::

        sizes = T.tolist(); chunks = R.split(sizes, 0)
        for i in range(len(sizes)):     # or the original range(...)
            <body without the offsets and the skip, R[start:end] -> chunks[i]>

    Exact: chunk i is ``R[c_0 + .. + c_{i-1} : c_0 + .. + c_i]``, the rows the original sliced for
    expert i (the offset is the running sum of the counts whether or not empty experts are
    skipped: for them end == start); the split checks at run time that the counts are >= 0 and sum
    to R's rows, so counts that do not tile R raise instead of giving another result. An expert
    that was skipped now runs on its empty chunk: its output must have no rows, checked
    (``torch._check``: static for row-wise experts, the sizes being the same symbol), so the
    concatenation over dimension 0 is unchanged; ``len(L)`` (``cat(L) if len(L) else ...``, or the
    list's truth ``cat(L) if L else ...``) is then ``R.shape[0] > 0``. The rest of the body is checked as a skip loop's (``_Body``: only bindings
    local to the iteration, no host reads, no side effects). None when the loop is not
    segment-shaped; Decline when it is but a condition fails."""
    body = loop.body
    # the carry: `start = end` (last statement) with `end = start + n`
    if not body or not (isinstance(body[-1], ast.Assign) and len(body[-1].targets) == 1
                        and isinstance(body[-1].targets[0], ast.Name) and isinstance(body[-1].value, ast.Name)):
        return None
    start, end = body[-1].targets[0].id, body[-1].value.id
    end_defs = [s for s in body if isinstance(s, ast.Assign) and len(s.targets) == 1 and is_name(s.targets[0], end)]
    if len(end_defs) != 1 or not isinstance(end_defs[0].value, ast.BinOp):
        return None
    ev = end_defs[0].value
    n = ev.right.id if is_name(ev.left, start) and isinstance(ev.right, ast.Name) else \
        ev.left.id if is_name(ev.right, start) and isinstance(ev.left, ast.Name) else None
    if n is None or not _sum_of(ev, start, n):
        raise Decline(ev, f"the offset `{start}` is advanced by `{short(ev)}`, not by the expert's count")
    if loop.orelse:
        raise Decline(loop, "the loop has an `else:` clause")
    block = _block_of(fdef, loop)
    if block is None:
        raise Decline(loop, "the loop is not in a plain block")
    init = _last_store_before(block, loop, start)
    if init is None:
        return None  # not bound by a plain `start = ...` before the loop (`outputs, start = [], 0`): not read
    if const_int(init.value) != 0 or stores.get(start, 0) != 2 or stores.get(end, 0) != 1:
        raise Decline(loop, f"the offset `{start}` does not start at 0 right before the loop (or is bound elsewhere)")
    # the counts and the expert id
    prelude, counts_def, sizes_stmt = None, None, None
    tag = f"_{loop.lineno}"
    sizes = f"_sonic_sizes{tag}"
    it, tgt = loop.iter, loop.target
    if isinstance(it, ast.Call) and is_name(it.func, "enumerate") and len(it.args) == 1 and not it.keywords \
            and isinstance(it.args[0], ast.Name) and isinstance(tgt, ast.Tuple) and len(tgt.elts) == 2 \
            and all(isinstance(e, ast.Name) for e in tgt.elts) and tgt.elts[1].id == n:
        i, C = tgt.elts[0].id, it.args[0].id
        host = _last_store_before(block, loop, C)
        T = _host_copy_of(host.value) if host is not None else None
        if T is None:  # the counts iterated themselves: a tensor (0-d counts C[i]) or a list of ints
            prelude, sizes_stmt, T = None, _counts_sizes(sizes, C), C
            header = ast.parse(f"range(len({sizes}))", mode="eval").body
        else:
            if any(x is not it.args[0] and x.lineno > host.lineno for x in loads(fdef, C)):
                raise Decline(loop, f"the host counts `{C}` are read elsewhere than by the loop")
            sizes = C
            prelude = (host, ast.Call(func=ast.Attribute(value=copy.deepcopy(T), attr="tolist", ctx=ast.Load()),
                                      args=[], keywords=[]))
            T = short(T)
            header = ast.parse(f"range(len({C}))", mode="eval").body
    elif isinstance(it, ast.Call) and is_name(it.func, "range") and len(it.args) == 1 and isinstance(tgt, ast.Name):
        i, header = tgt.id, copy.deepcopy(it)
        counts_def = [s for s in body if isinstance(s, ast.Assign) and len(s.targets) == 1 and is_name(s.targets[0], n)]
        v = counts_def[0].value if len(counts_def) == 1 else None
        if v is not None and is_method(v, {"item"}) and not v.args:
            v = v.func.value
        if v is not None and isinstance(v, ast.Call) and is_name(v.func, "int") and len(v.args) == 1:
            v = v.args[0]
        if not (isinstance(v, ast.Subscript) and isinstance(v.value, ast.Name) and is_name(v.slice, i)):
            raise Decline(loop, f"the count `{n}` is not `T[{i}]` of a tensor of per-expert counts")
        T = v.value.id
        if stores.get(n, 0) != 1 or body.index(counts_def[0]) > body.index(end_defs[0]):
            raise Decline(counts_def[0], f"the count `{n}` is bound elsewhere or after its use")
        sizes_stmt = _counts_sizes(sizes, T)
        counts_def = counts_def[0]
    else:
        raise Decline(loop, f"`for {short(tgt)} in {short(it)}` is not `enumerate(host counts)` or `range(E)`")
    if stores.get(n, 0) != 1:
        raise Decline(loop, f"the count `{n}` is bound elsewhere in the function")
    # the body: the offsets, the skip, the slices, one append; the rest checked as local bindings
    rows, L, append, rest = None, None, None, []
    chunks = f"_sonic_chunks{tag}"
    for s in body:
        if s is body[-1] or s is end_defs[0] or s is counts_def:
            continue
        if isinstance(s, ast.If) and _zero_test(s.test, n) and len(s.body) == 1 \
                and isinstance(s.body[0], ast.Continue) and not s.orelse:
            continue
        if isinstance(s, ast.Expr) and is_method(s.value, {"append"}) and isinstance(s.value.func.value, ast.Name) \
                and len(s.value.args) == 1 and not s.value.keywords:
            if append is not None:
                raise Decline(s, "more than one output is appended per expert")
            append, L = s, s.value.func.value.id
        for sub in ast.walk(s):
            if isinstance(sub, (ast.Continue, ast.Break, ast.Return)):
                raise Decline(sub, f"`{short(sub)}` other than the skip of an expert with no rows")
        seg = _SegmentSlices(start, end, f"{chunks}[{i}]")
        s = seg.visit(copy.deepcopy(s))
        for r in seg.rows:
            if rows not in (None, r):
                raise Decline(s, f"rows are sliced from `{rows}` and `{r}`")
            rows = r
        for name in (start, end, n):
            if name in _names_loaded(s):
                raise Decline(s, f"`{name}` is used other than as the bounds `[{start}:{end}]` of one tensor's rows")
        rest.append(s)
    if rows is None or append is None:
        raise Decline(loop, "no rows are sliced by the running offsets, or no output is appended")
    if stores.get(rows, 0) and any(rows in _names_stored(s) for s in body):
        raise Decline(loop, f"the rows `{rows}` are rebound in the loop")
    linit = _last_store_before(block, loop, L)
    if linit is None or not (isinstance(linit.value, ast.List) and not linit.value.elts) or stores.get(L, 0) != 1:
        raise Decline(loop, f"the outputs `{L}` are not an empty list made right before the loop")
    # after the loop: L only as `torch.cat(L, 0)`, possibly under `if len(L)`
    nonempty = f"_sonic_nonempty{tag}"
    edits = []
    inside = {id(x) for x in ast.walk(loop)}
    for node in ast.walk(fdef):
        t = node.test if isinstance(node, ast.IfExp) else None
        # `cat(L) if len(L) else ...` / `cat(L) if L else ...` (a list is true iff it has elements)
        seen = t.args[0] if isinstance(t, ast.Call) and is_name(t.func, "len") and len(t.args) == 1 else t
        if is_name(seen, L) and is_torch_fn(node.body, {"cat", "concat", "concatenate"}):
            edits.append((node, "test", ast.Name(nonempty, ast.Load())))
            seen._sonic_seg_ok = True
        if isinstance(node, ast.Call) and is_torch_fn(node, {"cat", "concat", "concatenate"}) \
                and isinstance(node.func, ast.Attribute) and is_name(node.func.value, "torch") \
                and node.args and is_name(node.args[0], L):
            dim = _kwarg(node, "dim", 1)
            if (dim is None or const_int(dim) == 0) and len(node.args) + len(node.keywords) <= 2:
                node.args[0]._sonic_seg_ok = True
    for x in loads(fdef, L):
        if id(x) not in inside and not getattr(x, "_sonic_seg_ok", False):
            raise Decline(x, f"the outputs `{L}` are used other than by `torch.cat({L}, dim=0)`")
    if glb.get("torch") is None or getattr(glb.get("torch"), "cat", None) is not _torch_cat():
        raise Decline(loop, "`torch` is not the torch module in the function's globals")
    # the rest of the body: bindings local to the iteration only
    out = f"_sonic_out{tag}"
    rest_wo_append = [s for s in rest if not (isinstance(s, ast.Expr) and is_method(s.value, {"append"})
                                                and is_name(s.value.func.value, L))]
    # an expert that was skipped now runs: nothing it does may outlive the iteration but its output
    for st in (x for s in rest_wo_append for x in ast.walk(s)):
        if isinstance(st, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            targets = st.targets if isinstance(st, ast.Assign) else [st.target]
            if any(not isinstance(t, (ast.Name, ast.Tuple)) or isinstance(t, ast.Tuple)
                   and not all(isinstance(e, ast.Name) for e in t.elts) for t in targets):
                raise Decline(st, f"`{short(st)}` writes outside the iteration (an expert without rows now runs)")
        elif isinstance(st, ast.Expr) and not isinstance(st.value, ast.Constant):
            raise Decline(st, f"`{short(st)}`: a call whose result is not used (an expert without rows now runs)")
    body_names = set().union(*(set(_names_stored(s)) for s in body)) | {i, n}
    outer = {k for k in stores if k not in body_names} | {chunks}
    checker = _Body(self_name, {}, outer, {i}, None, [])
    checker._body_names = set().union(*(set(_names_stored(s)) for s in rest_wo_append)) if rest_wo_append else set()
    checker.block(rest_wo_append, [])
    checker.check_expr(append.value.args[0])
    if checker.accumulators:
        raise Decline(loop, f"`{sorted(checker.accumulators)[0]}` accumulates across experts (an expert without rows "
                            f"now runs)")
    for s in following(fdef, loop):
        for name in sorted((body_names - {L}) & _names_loaded(s)):
            raise Decline(loop, f"`{name}`, bound in the loop, is read after it (line {s.lineno})")
    new_body = []
    for s in rest:
        if isinstance(s, ast.Expr) and is_method(s.value, {"append"}) and is_name(s.value.func.value, L):
            new_body += ast.parse(
                f"{out} = None\n"
                f"torch._check(({chunks}[{i}].shape[0] != 0) | ({out}.shape[0] == 0), "
                f"lambda: 'an expert without rows returned rows')\n"
                f"{L}.append({out})").body
            new_body[-3].value = s.value.args[0]
        else:
            new_body.append(s)
    new_loop = ast.For(target=ast.Name(i, ast.Store()), iter=header, body=new_body, orelse=[])
    pre = ([sizes_stmt] if sizes_stmt is not None else []) + ast.parse(
        f"{chunks} = {rows}.split({sizes}, 0)\n{nonempty} = {rows}.shape[0] > 0").body
    stmts = [ast.copy_location(s, loop) for s in pre + [new_loop]]

    if sizes_stmt is not None:
        sizes_stmt._sonic_segment_sizes = True

    def apply():
        if prelude is not None:
            prelude[0].value = prelude[1]
            prelude[0]._sonic_segment_sizes = True
        for node, field, value in edits:
            setattr(node, field, value)

    form = (f"segment loop `for {short(tgt)} in {short(it)}` over `{rows}[{start}:{end}]` with offsets "
            f"carried across experts, as `{rows}.split({T}.tolist(), 0)` and one output per expert")
    return stmts, apply, set(), form


# --------------------------------------------------------------------------- filtered comprehensions

# Module methods that change the module (a tensor has methods of the same names): not called on a
# local that could be a module passed in (``capture`` proves only ``self``'s submodules pure)
_MODULE_METHODS = set(dir(__import__("torch").nn.Module))


def _chunk_measure(node, i) -> Optional[tuple]:
    """(C[i] node, kind) for ``C[i].shape[0]`` / ``C[i].size(0)`` / ``len(C[i])`` (kind "rows") or
    ``C[i].numel()`` (kind "numel"), C a name and i the comprehension's variable; else None."""
    item, kind = None, None
    if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute) and node.value.attr == "shape" \
            and const_int(node.slice) == 0:
        item, kind = node.value.value, "rows"
    elif is_method(node, {"size"}) and len(node.args) + len(node.keywords) == 1 \
            and const_int(_kwarg(node, "dim", 0)) == 0:
        item, kind = node.func.value, "rows"
    elif is_method(node, {"numel"}) and not node.args and not node.keywords:
        item, kind = node.func.value, "numel"
    elif isinstance(node, ast.Call) and is_name(node.func, "len") and len(node.args) == 1 and not node.keywords:
        item, kind = node.args[0], "rows"
    if isinstance(item, ast.Subscript) and isinstance(item.value, ast.Name) and is_name(item.slice, i) \
            and item.value.id != i:
        return item, kind
    return None


def _nonempty_filter(test, i) -> Optional[tuple]:
    """(C[i] node, kind) when ``test`` says "C[i] is not empty": ``m > 0``, ``m != 0``, ``m >= 1``
    (either side), or ``m`` alone, m a ``_chunk_measure``."""
    if isinstance(test, ast.Compare) and len(test.ops) == 1:
        l, op, r = test.left, test.ops[0], test.comparators[0]
        for m, c, o in ((l, r, op), (r, l, {ast.Lt: ast.Gt(), ast.Gt: ast.Lt(), ast.LtE: ast.GtE(),
                                            ast.GtE: ast.LtE()}.get(type(op), op))):
            k = const_int(c)
            ok = (isinstance(o, ast.Gt) and k == 0) or (isinstance(o, ast.NotEq) and k == 0) \
                or (isinstance(o, ast.GtE) and k == 1)
            found = _chunk_measure(m, i) if ok else None
            if found is not None:
                return found
        return None
    return _chunk_measure(test, i)


def _cat_reads_only(fdef, stmt, L) -> Optional[object]:
    """None when every read of ``L`` after its binding ``stmt`` is ``torch.cat(L, 0)`` (``dim=0``,
    ``torch.concat``/``concatenate``, dimension left out); else the first other read."""
    ok = set()
    for node in ast.walk(fdef):
        if isinstance(node, ast.Call) and is_torch_fn(node, {"cat", "concat", "concatenate"}) \
                and isinstance(node.func, ast.Attribute) and is_name(node.func.value, "torch") \
                and node.args and is_name(node.args[0], L) and len(node.args) + len(node.keywords) <= 2:
            dim = _kwarg(node, "dim", 1)
            if (dim is None or const_int(dim) == 0) and all(k.arg == "dim" for k in node.keywords):
                ok.add(id(node.args[0]))
    return next((x for x in loads(fdef, L) if id(x) not in ok), None)


def _self_aliases(fdef, self_name) -> dict:
    """{local: attribute X} for locals bound as ``local = self.X...``."""
    out = {}
    for n in ast.walk(fdef):
        if isinstance(n, ast.Assign) and len(n.targets) == 1 and isinstance(n.targets[0], ast.Name):
            root = n.value
            while isinstance(root, (ast.Attribute, ast.Subscript)):
                if isinstance(root, ast.Attribute) and is_name(root.value, self_name):
                    out[n.targets[0].id] = root.attr
                    break
                root = root.value
    return out


def _callee_roots(elt, fdef, self_name, local: set, i) -> set:
    """The attributes ``self.X`` whose modules ``elt`` may call (directly or through a local alias
    ``m = self.X``): ``capture`` proves them free of side effects. Decline when a call goes through
    a local that may be a module from elsewhere (an argument), which nothing here proves pure."""
    aliases = _self_aliases(fdef, self_name)
    roots = set()
    for n in ast.walk(elt):
        if isinstance(n, ast.Attribute) and is_name(n.value, self_name):
            roots.add(n.attr)
        if isinstance(n, ast.Name) and n.id in aliases:
            roots.add(aliases[n.id])
        if not isinstance(n, ast.Call):
            continue
        f, depth = n.func, 0
        while isinstance(f, (ast.Attribute, ast.Subscript)):
            f, depth = f.value, depth + 1
        if not isinstance(f, ast.Name) or (self_name is not None and (f.id == self_name or f.id in aliases)) \
                or f.id not in local:
            continue  # self, an alias of self.X, a global (torch, F, a module-level function), an expression
        last = n.func.attr if isinstance(n.func, ast.Attribute) else None
        if depth != 1 or last is None or last in _MODULE_METHODS or f.id == i:
            raise Decline(n, f"`{short(n)}` calls through the local `{f.id}`, which may be a module whose "
                             f"freedom from side effects cannot be proved")
    return roots


def _filtered_comprehension(fdef, stmt, self_name, stores, glb) -> Optional[tuple]:
    """``L = [ELT for i in ITER if <C[i] is not empty>]`` (``C[i].shape[0] > 0``, ``C[i].size(0) != 0``,
    ``len(C[i]) > 0``, ``C[i].numel() > 0``, ...) with ``L`` read only by ``torch.cat(L, 0)``: the
    filter on an unbacked size stops Dynamo (LLaMA-MoE's ``UniversalCalculator``). Rewritten into::

        pairs = [(C[i], ELT) for i in ITER]          # ELT for every expert: proved pure
        L = [o for c, o in pairs if keep(c, o, pairs)]

    where ``keep`` is True, without reading data, when the dropped output can only be empty and
    harmless to the concatenation: o and c are tensors of at least one dimension, ``o.shape[0] ==
    c.shape[0]`` is known (``guard_or_false``: for a row-wise expert on a split chunk the same
    symbol; False when it is data-dependent), for ``numel`` C[i]'s other dimensions are nonzero, and
    every output has o's dimensions past 0, dtype, device and ``requires_grad`` (so cat's result is
    the same with o or without it); otherwise ``keep`` is the original filter on c. Exact: an output
    kept that the original dropped has zero rows and changes neither values, dtype nor autograd
    (its expert gets a zero gradient instead of None, as in the rewritten loops). ELT runs for every
    expert: it may read no host data nor mutate (``_Body.check_expr``), and the modules it calls
    through ``self`` are proved free of side effects by ``capture`` (``LoopNote.modules``)."""
    if not (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name)
            and isinstance(stmt.value, ast.ListComp) and len(stmt.value.generators) == 1):
        return None
    comp, L = stmt.value.generators[0], stmt.targets[0].id
    if comp.is_async or len(comp.ifs) != 1 or not isinstance(comp.target, ast.Name):
        return None
    i = comp.target.id
    found = _nonempty_filter(comp.ifs[0], i)
    if found is None:
        return None
    item, kind = found
    elt = stmt.value.elt
    if stores.get(L, 0) != 1:
        raise Decline(stmt, f"the list `{L}` is bound more than once in the function")
    other = _cat_reads_only(fdef, stmt, L)
    if other is not None:
        raise Decline(other, f"the list `{L}` is read other than by `torch.cat({L}, 0)` (line {other.lineno}), "
                             f"which would see the outputs of experts with no rows")
    if glb.get("torch") is None or getattr(glb.get("torch"), "cat", None) is not _torch_cat():
        raise Decline(stmt, "`torch` is not the torch module in the function's globals")
    checker = _Body(self_name, {}, set(stores), {i}, None, [])
    checker._body_names = set()
    checker.check_expr(elt)
    checker.check_expr(comp.iter)
    local = set(stores) - {L}
    roots = _callee_roots(elt, fdef, self_name, local, i)
    tag = f"_{stmt.lineno}"
    pairs, keep = f"_sonic_pairs{tag}", f"_sonic_keep{tag}"
    original = _Replace(item, ast.Name("_c", ast.Load())).visit(copy.deepcopy(comp.ifs[0]))
    numel = " and all(_d != 0 for _d in _c.shape[1:])" if kind == "numel" else ""
    helper = ast.parse(
        f"def {keep}(_c, _o, _pairs):\n"
        f"    if isinstance(_c, torch.Tensor) and isinstance(_o, torch.Tensor) and _c.dim() >= 1 and _o.dim() >= 1"
        f"{numel} and torch.fx.experimental.symbolic_shapes.guard_or_false(_o.shape[0] == _c.shape[0]) and all("
        f"isinstance(_p, torch.Tensor) and _p.dim() == _o.dim() and _p.dtype == _o.dtype and _p.device == _o.device"
        f" and _p.requires_grad == _o.requires_grad and _p.shape[1:] == _o.shape[1:] for _, _p in _pairs):\n"
        f"        return True\n"
        f"    return ORIGINAL\n").body[0]
    helper.body[-1].value = original
    first = ast.ListComp(elt=ast.Tuple([copy.deepcopy(item), copy.deepcopy(elt)], ast.Load()),
                         generators=[copy.deepcopy(comp)])
    first.generators[0].ifs = []
    stmts = [helper, ast.Assign(targets=[ast.Name(pairs, ast.Store())], value=first),
             ast.parse(f"{L} = [_o for _c, _o in {pairs} if {keep}(_c, _o, {pairs})]").body[0]]
    stmts = [ast.fix_missing_locations(ast.copy_location(s, stmt)) for s in stmts]
    form = (f"list comprehension `[{short(elt, 40)} for {i} in {short(comp.iter, 30)} if {short(comp.ifs[0], 40)}]`"
            f" read only by `torch.cat({L}, 0)`: every expert's output computed, the empty ones kept where provably "
            f"empty and harmless to the concatenation")
    return stmts, None, set(), form, frozenset(roots)


def _comprehension_statements(fdef) -> list:
    return [s for s in ast.walk(fdef) if isinstance(s, ast.Assign) and isinstance(s.value, ast.ListComp)
            and s.value.generators and s.value.generators[0].ifs and not inside_loop(fdef, s)]


class _SegmentSlices(ast.NodeTransformer):
    """``R[start:end]`` (R a name) -> ``chunks[i]``; ``rows`` collects the R seen."""

    def __init__(self, start, end, chunk):
        self.start, self.end, self.chunk, self.rows = start, end, chunk, []

    def visit_Subscript(self, node):
        sl = node.slice
        if isinstance(sl, ast.Slice) and is_name(sl.lower, self.start) and is_name(sl.upper, self.end) \
                and sl.step is None and isinstance(node.value, ast.Name) and isinstance(node.ctx, ast.Load):
            self.rows.append(node.value.id)
            return ast.copy_location(ast.parse(self.chunk, mode="eval").body, node)
        return self.generic_visit(node)


def _torch_cat():
    import torch

    return torch.cat


def _in_range_guard(checker, body, loop, hit) -> list:
    """``if not (S < len(X) and ...): continue`` for every ``X[S]`` of the body that indexes a
    loop-invariant container (a weight, a ModuleList, the mask) by the expert id S. The original
    never ran an expert without tokens, so a mask with more experts than the weights (DBRX's
    ``one_hot(..., num_experts + 1)``) never indexed past their end; the rewritten loop must not
    either. Static under Dynamo (sizes). (An expert past the end that had tokens made eager raise
    IndexError; the rewritten loop leaves it out.)"""
    body_names = checker._body_names
    # the loop variable is the id for range()/enumerate() loops and for a hit loop over 0-d rows
    # (``nonzero().squeeze(-1)``); a hit loop over (1,) rows maps its scalar forms to EXPERT instead
    aliases = {EXPERT} | ({loop.target.id} if isinstance(loop.target, ast.Name)
                          and (not hit or loop.target.id in checker.scalars) else set())
    if not hit and isinstance(loop.target, ast.Tuple) and isinstance(loop.target.elts[0], ast.Name):
        aliases.add(loop.target.elts[0].id)
    for s in body:  # names bound to the expert id itself (`e = _sonic_expert`, `e = int(...)`)
        for n in ast.walk(s):
            if isinstance(n, ast.Assign) and len(n.targets) == 1 and isinstance(n.targets[0], ast.Name):
                v = n.value
                if isinstance(v, ast.Call) and isinstance(v.func, ast.Name) and v.func.id == "int" and len(v.args) == 1:
                    v = v.args[0]
                if isinstance(v, ast.Name) and v.id == EXPERT:
                    aliases.add(n.targets[0].id)
    guards: dict = {}
    rename = _Rename({a: EXPERT for a in aliases if a in body_names})

    def statements(block, conds):
        for s in block:
            if isinstance(s, ast.If):  # a static test (the others were removed or declined)
                test = source_text(rename.visit(copy.deepcopy(s.test)))
                statements(s.body, conds + [f"({test})"])
                statements(s.orelse, conds + [f"not ({test})"])
            elif isinstance(s, ast.With):
                statements(s.body, conds)
            else:
                subscripts(s, conds)

    def subscripts(s, conds):
        for n in ast.walk(s):
            if not isinstance(n, ast.Subscript) or not isinstance(n.ctx, ast.Load):
                continue
            names = _names_loaded(n.slice)
            keyed = isinstance(n.slice, ast.JoinedStr)  # self[f"expert_{e}"] (a ModuleDict)
            if not names or not names <= (aliases | {checker.self_name}) or not keyed \
                    and not checker._scalar_expr(n.slice) and not (isinstance(n.slice, ast.Name) and n.slice.id in aliases):
                continue
            if _names_loaded(n.value) & (body_names - aliases) or any(
                    isinstance(m, (ast.Subscript, ast.Lambda)) for m in ast.walk(n.value)):
                continue
            index = rename.visit(copy.deepcopy(n.slice))
            text = f"{source_text(index)} in {source_text(n.value)}" if keyed else f"{source_text(index)} < len({source_text(n.value)})"
            if conds:  # indexed only on a static branch: only when that branch runs
                text = f"not ({' and '.join(conds)}) or {text}"
            guards.setdefault(text, None)

    statements(body, [])
    if not guards:
        return []
    test = ast.parse(" and ".join(f"({g})" for g in guards), mode="eval").body
    return [ast.If(test=ast.UnaryOp(op=ast.Not(), operand=test), body=[ast.Continue()], orelse=[])]


class _Rename(ast.NodeTransformer):
    def __init__(self, mapping):
        self.mapping = mapping

    def visit_Name(self, node):
        if node.id in self.mapping:
            return ast.copy_location(ast.Name(self.mapping[node.id], node.ctx), node)
        return node


class _Replace(ast.NodeTransformer):
    def __init__(self, old, new):
        self.old, self.new = source_text(old), new

    def visit(self, node):
        if isinstance(node, ast.expr) and source_text(node) == self.old:
            return copy.deepcopy(self.new)
        return self.generic_visit(node)


class _ScalarForms(ast.NodeTransformer):
    """Rewrite the uses of a nonzero() row V (shape (1,)) by the expert id EXPERT: ``V[0]``,
    ``V.item()``, ``int(V)`` and combinations are the id; ``X[V].squeeze(0)`` is ``X[EXPERT]``
    (``X[[e]]`` has leading dimension 1, which ``squeeze(0)`` removes); ``self.<attr>[V]`` (a
    ModuleList indexed by the row: transformers 4.5x ``self.experts[expert_idx]``) is the container's
    item ``EXPERT`` when it is a module container, and the slice ``[EXPERT:EXPERT + 1]`` (the same
    values as ``X[[e]]``) when it is a tensor."""

    def __init__(self, name, self_name=None):
        self.name = name
        self.self_name = self_name

    def _of_self(self, node) -> bool:
        while isinstance(node, ast.Attribute):
            node = node.value
        return isinstance(node, ast.Name) and node.id == self.self_name and self.self_name is not None

    def _is_v(self, node) -> bool:
        return isinstance(node, ast.Name) and node.id == self.name

    def _scalar_of_v(self, node) -> bool:
        if isinstance(node, ast.Subscript) and self._is_v(node.value) and const_int(node.slice) == 0:
            return True
        if is_method(node, {"item"}) and not node.args:
            return self._is_v(node.func.value) or self._scalar_of_v(node.func.value)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "int" \
                and len(node.args) == 1:
            return self._is_v(node.args[0]) or self._scalar_of_v(node.args[0])
        return False

    def visit(self, node):
        if isinstance(node, ast.expr):
            if self._scalar_of_v(node):
                return ast.copy_location(ast.Name(EXPERT, ast.Load()), node)
            if is_method(node, {"squeeze"}) and len(node.args) == 1 and const_int(node.args[0]) == 0 \
                    and isinstance(node.func.value, ast.Subscript) and self._is_v(node.func.value.slice):
                sub = node.func.value
                return ast.copy_location(ast.Subscript(value=self.visit(sub.value),
                                                       slice=ast.Name(EXPERT, ast.Load()), ctx=ast.Load()), node)
            if isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load) and self._is_v(node.slice) \
                    and isinstance(node.value, ast.Attribute) and self._of_self(node.value):
                owner = ast.unparse(node.value)
                expr = ast.parse(f"({owner}[{EXPERT}] if hasattr({owner}, '_modules') "
                                 f"else {owner}[{EXPERT}:{EXPERT} + 1])", mode="eval").body
                return ast.copy_location(expr, node)
        return self.generic_visit(node)


class _ItemOfScalar(ast.NodeTransformer):
    """``s.item()`` of an expert-id name is the id itself (a Python int in the rewritten loop)."""

    def __init__(self, names):
        self.names = names

    def visit_Call(self, node):
        self.generic_visit(node)
        if is_method(node, {"item"}) and not node.args and isinstance(node.func.value, ast.Name) \
                and node.func.value.id in self.names:
            return node.func.value
        return node


def _strip_annotations(fdef) -> None:
    args = fdef.args
    for a in args.posonlyargs + args.args + args.kwonlyargs + [args.vararg, args.kwarg]:
        if a is not None:
            a.annotation = None
    fdef.returns = None
    fdef.decorator_list = []


def _candidate_loops(fdef) -> list:
    return [n for n in ast.walk(fdef) if isinstance(n, ast.For)]


def _looks_graph_breaking(loop, fdef) -> bool:
    """Worth a note when not rewritten: a loop over nonzero() / a host list, or with a data-dependent
    skip or host read in its body."""
    if _nonzero_of(loop.iter) is not None:
        return True
    if isinstance(loop.iter, ast.Name):  # any binding of the name (`hit = SRC; hit = nonzero(hit)...`)
        if any(isinstance(a, ast.Assign) and len(a.targets) == 1 and is_name(a.targets[0], loop.iter.id)
               and _nonzero_of(a.value) is not None for a in ast.walk(fdef)):
            return True
    for name in _names_loaded(loop.iter):  # iterating over host data (counts read with .tolist())
        a = _assignment_of(fdef, name)
        if a is not None and any(is_method(n, {"tolist", "item", "numpy", "nonzero"}) for n in ast.walk(a.value)):
            return True
    for n in ast.walk(loop):
        if is_method(n, {"tolist", "item", "cpu", "numpy", "nonzero"}):
            return True
        if isinstance(n, ast.If) and not _static_test(n.test):
            return True
    return False


def _static_test(test) -> bool:
    return not any(isinstance(n, (ast.Call, ast.Subscript)) for n in ast.walk(test))


#: how deep calls of module-level functions are followed (forward -> torch_moe -> torch_experts)
CALLEE_DEPTH = 3
_callee_analyses: dict = {}  # function -> Analysis (module-level functions reached from a method)


def _callee_replacements(fn, fdef, depth: int, notes: list) -> dict:
    """{name: replacement} for the module-level Python functions ``fn`` calls by a global name
    (``torch_experts(...)``, vLLM's reference MoE) whose own loops (or whose callees') were
    rewritten; their notes are added to ``notes``. Functions of torch and of this package are not
    followed, nor names ``fn`` binds itself."""
    if depth >= CALLEE_DEPTH:
        return {}
    out: dict = {}
    for name, g in global_callees(fn, fdef).items():
        if g not in _callee_analyses:
            _callee_analyses[g] = None  # a recursive call sees "in progress": not followed
            _callee_analyses[g] = analyse(g, depth + 1)
        sub = _callee_analyses[g]
        if sub is None:
            continue
        notes.extend(x for x in sub.notes if x not in notes)
        if sub.replacement is not None:
            out[name] = sub.replacement
    return out


def global_callees(fn, fdef) -> dict:
    """{name: function} for the module-level Python functions ``fn`` (parsed as ``fdef``) calls by a
    global name, in the order first called; functions of torch and of this package, closures, ``fn``
    itself and names ``fn`` binds are left out."""
    local = set(stores_of(fdef)) | {a.arg for a in fdef.args.posonlyargs + fdef.args.args + fdef.args.kwonlyargs}
    out: dict = {}
    for n in ast.walk(fdef):
        if not (isinstance(n, ast.Call) and isinstance(n.func, ast.Name)) or n.func.id in local or n.func.id in out:
            continue
        g = fn.__globals__.get(n.func.id)
        if not isinstance(g, types.FunctionType) or g is fn or g.__closure__ \
                or (g.__module__ or "").split(".")[0] in ("torch", "moe_inductor"):
            continue
        out[n.func.id] = g
    return out


def _callee_name(name: str) -> str:
    return f"_sonic_callee_{name}"


def analyse(fn, depth: int = 0) -> Analysis:
    """Find the per-expert loops of ``fn`` (a plain function: a method's ``__func__``), rewrite those
    that can be proved equivalent, and return the replacement function (None if no loop was
    rewritten) with a note per loop. Calls of module-level functions whose loops were rewritten
    (``_callee_replacements``) call the rewritten ones in the replacement."""
    result = Analysis(function=fn)
    try:
        filename = inspect.getsourcefile(fn) or "<unknown>"
    except TypeError:
        return result
    qual = getattr(fn, "__qualname__", getattr(fn, "__name__", "?"))
    try:
        tree, fdef = _function_tree(fn)
    except (OSError, TypeError, SyntaxError, IndentationError, Decline):
        return result
    loops = [l for l in _candidate_loops(fdef) if not inside_loop(fdef, l)] + _comprehension_statements(fdef)
    callees = {} if fn.__closure__ else _callee_replacements(fn, fdef, depth, result.notes)
    if not loops and not callees:
        result.notes.extend(_host_reads(fdef, filename, qual))
        return result
    if fn.__closure__:
        for l in loops:
            if _looks_graph_breaking(l, fdef):
                result.notes.append(LoopNote(filename, l.lineno, qual, False, reason=(
                    "the function uses names of an enclosing scope (a closure or super()), so it cannot be "
                    "recompiled with a rewritten loop")))
        return result
    self_name = fdef.args.args[0].arg if fdef.args.args else None
    stores = stores_of(fdef)
    counts = _counts_sources(fdef)
    plans = []
    for loop in loops:
        try:
            segment = True  # a segment-shaped loop declined: counts read on the host, worth a note
            if isinstance(loop, ast.Assign):  # a filtered list comprehension
                owner = self_name if "." in qual and depth == 0 else None  # a method: its modules are proved pure
                plan = _filtered_comprehension(fdef, loop, owner, stores, fn.__globals__)
                if plan is not None:
                    plans.append((loop, plan))
                continue
            plan = _segment_loop(fdef, loop, self_name, stores, fn.__globals__) or capacity_skip_loop(fdef, loop)
            if plan is None:
                segment = False
                plan = _rewrite_loop(fdef, loop, self_name, stores, counts)
        except Decline as d:
            if segment or _looks_graph_breaking(loop, fdef):
                line = d.lineno or loop.lineno
                head = f"`{short(loop.value)}`" if isinstance(loop, ast.Assign) else \
                    f"`for {short(loop.target)} in {short(loop.iter)}`"
                result.notes.append(LoopNote(filename, loop.lineno, qual, False, reason=(
                    f"line {loop.lineno}: {head} breaks the graph (data-dependent iteration or skip); not "
                    f"rewritten because line {line}: {d.text}, so running every expert on zero rows cannot "
                    f"be proved to do nothing")))
            continue
        if plan is not None:
            plans.append((loop, plan))
    if not plans and not callees:
        result.notes.extend(_host_reads(fdef, filename, qual))
        return result
    # host counts: their `.tolist()` assignment goes only when nothing but removed skips read it
    used_counts = set().union(*(p[2] for _, p in plans))
    for loop, (stmts, prelude, cused, form, *_) in plans:
        _replace_stmt(fdef, loop, stmts)
        if callable(prelude):
            prelude()
        elif prelude is not None:
            prelude[0].value = prelude[1]
    drop = []
    for name in used_counts:
        if loads(fdef, name):
            for loop, plan in plans:
                if name in plan[2]:
                    result.notes.append(LoopNote(filename, loop.lineno, qual, False, reason=(
                        f"line {loop.lineno}: the host counts `{name}` are read elsewhere, so their "
                        f"`.tolist()` stays and breaks the graph")))
            return Analysis(function=fn, notes=result.notes)
        drop.append(_assignment_of(fdef, name))
    for a in drop:
        _replace_stmt(fdef, a, [ast.Pass()])
    _strip_annotations(fdef)
    if callees:
        # the callees' replacements reach the new function as closure cells of a factory (the
        # user's module globals are not touched): calls by their global name are renamed
        for n in ast.walk(fdef):
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in callees:
                n.func = ast.copy_location(ast.Name(_callee_name(n.func.id), ast.Load()), n.func)
        fdef.decorator_list = []
        factory = ast.FunctionDef(
            name="_sonic_factory", args=ast.arguments(posonlyargs=[], args=[ast.arg(_callee_name(c)) for c in callees],
                                                      vararg=None, kwonlyargs=[], kw_defaults=[], kwarg=None, defaults=[]),
            body=[fdef, ast.Return(ast.Name(fdef.name, ast.Load()))], decorator_list=[], returns=None,
            **({"type_params": []} if "type_params" in ast.FunctionDef._fields else {}))
        tree.body = [ast.copy_location(factory, fdef)]
    ast.fix_missing_locations(tree)
    try:
        code = compile(tree, filename, "exec")
        namespace: dict = {}
        exec(code, fn.__globals__, namespace)
        new = namespace["_sonic_factory"](*callees.values()) if callees else namespace[fdef.name]
    except Exception as e:  # a rewrite that does not compile is a bug here, never the user's problem
        result.notes.append(LoopNote(filename, fdef.lineno, qual, False,
                                     reason=f"the rewritten loop did not compile ({type(e).__name__}: {e})"))
        return result
    new.__defaults__ = fn.__defaults__
    new.__kwdefaults__ = fn.__kwdefaults__
    new.__qualname__ = fn.__qualname__
    new.__module__ = fn.__module__
    new.__doc__ = fn.__doc__
    new._sonic_rewritten_from = fn
    new._sonic_source = ast.unparse(fdef)  # what Dynamo traces, for a reader (and the tests)
    result.replacement = new
    for loop, plan in plans:
        result.notes.append(LoopNote(filename, loop.lineno, qual, True, form=plan[3],
                                     modules=plan[4] if len(plan) > 4 else frozenset()))
    for name in callees:
        result.notes.append(LoopNote(filename, fdef.lineno, qual, True, form=(
            f"calls `{name}(...)`, whose per-expert loop is rewritten, through its rewritten copy")))
    result.notes.extend(_host_reads(fdef, filename, qual))  # the ones the rewrite kept
    return result


def host_count_splits(fn, depth: int = 0, cls: Optional[type] = None) -> list:
    """``LoopNote`` (rewritten=True) for each ``rows.split(sizes, ...)`` of ``fn`` whose sizes are host
    data: a parameter of ``fn`` (the sizes a router returned, JetMoE's ``JetMoeParallelExperts``) or a
    local assigned from ``.tolist()``, in a function that also concatenates (``torch.cat``) what it
    computes per chunk. Such a frame is traced with the counts as symbolic sizes and
    ``moe_inductor.dynamo.host_splits`` proves, on the graph, whether split + per-expert GEMM + cat is a
    grouped GEMM on device offsets; this only says where it is worth trying. Empty if none.
    The source read is the rewritten one when ``analyse`` rewrites a loop of ``fn`` (a segment loop
    becomes such a split), and the methods ``fn`` calls on its first argument (``self.moe_infer(...)``,
    looked up on ``cls``, the class of the module being compiled, when given: a subclass may override
    a method an inherited ``forward`` calls; else on the class that defines ``fn``) and the
    module-level functions it calls by a global name (``global_callees``: SGLang's
    ``moe_forward_native(self, ...)``) are read too (depth 2)."""
    try:
        filename = inspect.getsourcefile(fn) or "<unknown>"
        _, fdef = _function_tree(fn)
    except (OSError, TypeError, SyntaxError, IndentationError, Decline):
        return []
    qual = getattr(fn, "__qualname__", getattr(fn, "__name__", "?"))
    out = []
    if depth < 2:
        for method in _self_methods(fn, fdef, cls):
            out += host_count_splits(method, depth + 1, cls)
        if not fn.__closure__:  # module-level functions called by name (as ``analyse`` follows them)
            for callee in global_callees(fn, fdef).values():
                out += host_count_splits(callee, depth + 1)
    try:
        new = analyse(fn).replacement
    except Exception:  # never fail over this
        new = None
    if new is not None and getattr(new, "_sonic_source", None):
        line = fdef.lineno
        fdef = ast.parse(new._sonic_source).body[0]
        if isinstance(fdef, ast.FunctionDef) and fdef.name == "_sonic_factory":
            fdef = fdef.body[0]
        for n in ast.walk(fdef):  # the rewritten source has no lines of its own: the function's line
            if hasattr(n, "lineno"):
                n.lineno = line
    return out + _split_notes(fdef, filename, qual)


def _self_methods(fn, fdef, cls: Optional[type] = None) -> list:
    """The plain functions of the methods ``fn`` calls as ``self.name(...)``, looked up on ``cls``
    (the runtime class: its overrides win) or else on the class that defines ``fn`` (found by its
    qualified name in ``fn``'s module globals), decorators unwrapped."""
    if not fdef.args.args or "." not in getattr(fn, "__qualname__", ""):
        return []
    if cls is None:
        owner = fn.__qualname__.rsplit(".", 1)[0]
        cls = fn.__globals__.get(owner) if "<" not in owner else None
    if not isinstance(cls, type):
        return []
    me = fdef.args.args[0].arg
    out = []
    for n in ast.walk(fdef):
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and is_name(n.func.value, me):
            m = inspect.getattr_static(cls, n.func.attr, None)
            if isinstance(m, (staticmethod, classmethod)) or not callable(m):
                continue
            while getattr(m, "__wrapped__", None) is not None:
                m = m.__wrapped__
            if isinstance(m, types.FunctionType) and m is not fn and m not in out:
                out.append(m)
    return out


def _split_notes(fdef, filename, qual) -> list:
    args = fdef.args
    params = {a.arg for a in args.posonlyargs + args.args + args.kwonlyargs}
    host = {n.targets[0].id for n in ast.walk(fdef) if isinstance(n, ast.Assign) and len(n.targets) == 1
            and isinstance(n.targets[0], ast.Name) and (is_method(n.value, {"tolist"}) or (
                isinstance(n.value, ast.IfExp) and is_method(n.value.body, {"tolist"})))}  # a segment loop's sizes
    if not any(is_torch_fn(n, {"cat", "concat", "concatenate"}) for n in ast.walk(fdef)):
        return []
    out = []
    for n in ast.walk(fdef):
        sizes = _split_sizes(n)
        if is_method(sizes, {"tolist"}) or isinstance(sizes, ast.Name) and (
                sizes.id in host or sizes.id in params and sizes.id != fdef.args.args[0].arg):
            out.append(LoopNote(filename, n.lineno, qual, True, form=(
                f"`{short(n)}` splits rows by host sizes `{short(sizes)}`: traced with the counts as symbolic sizes, and "
                f"split + per-expert GEMM + cat proved a grouped GEMM on device offsets in the graph "
                f"(moe_inductor.dynamo.host_splits)")))
    return out


def _split_sizes(n):
    """The sizes argument of a split call ``rows.split(sizes, ...)`` / ``rows.split_with_sizes(...)`` /
    ``torch.split(rows, sizes, ...)``, positional or by keyword (``split_size_or_sections=``,
    ``split_size=``, ``split_sizes=``: torchtune's ``GroupedExperts``); None for anything else."""
    if not isinstance(n, ast.Call) or not isinstance(n.func, ast.Attribute):
        return None
    keyword = {k.arg: k.value for k in n.keywords}
    named = next((keyword[k] for k in ("split_size_or_sections", "split_size", "split_sizes") if k in keyword), None)
    if n.func.attr in ("split", "split_with_sizes") and source_text(n.func.value) != "torch":
        return n.args[0] if n.args else named
    if n.func.attr == "split" and source_text(n.func.value) == "torch":
        return n.args[1] if len(n.args) >= 2 else named if n.args or "tensor" in keyword else None
    return None


def _host_reads(fdef, filename, qual) -> list:
    """A note for each statement outside a loop that reads tensor data on the host (``.tolist()``,
    ``.item()``, ``.numpy()``): each breaks the graph, and the loop capture removes
    such a read only where it only decides which experts to skip (loops have notes of their own)."""
    in_loops = {id(n) for l in ast.walk(fdef) if isinstance(l, (ast.For, ast.While)) for n in ast.walk(l)}
    out, seen = [], set()
    for n in ast.walk(fdef):
        if id(n) in in_loops or not isinstance(n, ast.stmt) or isinstance(n, (ast.For, ast.While, ast.If, ast.With,
                                                                                ast.FunctionDef, ast.Try)):
            continue
        reads = [c for c in ast.walk(n) if is_method(c, {"tolist", "item", "numpy"})]
        if getattr(n, "_sonic_segment_sizes", False):
            continue  # the sizes of a rewritten segment loop's split: traced as symbolic sizes
        if reads and all(any(_split_sizes(c) is r for c in ast.walk(n)) for r in reads):
            continue  # `split(rows, counts.tolist())`: the split's note says how it is traced
        if reads and n.lineno not in seen:
            seen.add(n.lineno)
            counted = _bincount_copied(reads[0])
            if counted is not None:
                out.append(LoopNote(filename, n.lineno, qual, False, reason=(
                    f"line {n.lineno}: `{short(n)}` copies `{short(counted)}` to the host: its length is "
                    f"max(minlength, largest id + 1), known only from the data unless the ids are positions along "
                    f"an axis of at most minlength (topk/sort/max/argmax indices, in the same graph: "
                    f"moe_inductor.dynamo.shape_items pins the length then, and the counts are traced as sizes); else "
                    f"Dynamo breaks the graph at `bincount`; counts of a fixed length E, "
                    f"`one_hot(ids, E).sum(0).tolist()`, are traced on the device (moe_inductor.dynamo.host_splits)")))
                continue
            out.append(LoopNote(filename, n.lineno, qual, False, reason=(
                f"line {n.lineno}: `{short(n)}` reads tensor data on the host (`.{reads[0].func.attr}()`), which "
                f"breaks the graph; it is not a skip of experts without tokens that the loop capture can remove "
                f"(counts read with `.tolist()` that only size splits of rows by expert are traced on the device in "
                f"sonic frames: moe_inductor.dynamo.host_splits; an `.item()` of a value computed only from sizes and "
                f"integer constants is read at trace time: moe_inductor.dynamo.shape_items; anything else stays out of "
                f"reach)")))
    return out


def _bincount_copied(read):
    """The ``bincount(...)`` call a host read ``X.bincount(...).tolist()`` / ``torch.bincount(...).cpu()...``
    copies, else None."""
    v = read
    while is_method(v, {"tolist", "cpu", "numpy", "item"}) and not v.args:
        v = v.func.value
    return v if is_torch_fn(v, {"bincount"}) else None


def _replace_stmt(fdef, old, new_stmts) -> None:
    for parent in ast.walk(fdef):
        for field in ("body", "orelse", "finalbody"):
            block = getattr(parent, field, None)
            if isinstance(block, list):
                for i, s in enumerate(block):
                    if s is old:
                        block[i:i + 1] = new_stmts
                        return
    raise Decline(old, "internal: statement not found")


def with_inner(wrapper, inner, replacement):
    """A copy of the decorator-made ``wrapper`` whose closure cell holding ``inner`` holds
    ``replacement`` instead (transformers' ``use_experts_implementation`` keeps the original forward
    there and dispatches to it for the "eager" implementation). None if no cell holds ``inner``."""
    cells = wrapper.__closure__ or ()
    if not any(c.cell_contents is inner for c in cells if _cell_full(c)):
        return None
    new_cells = tuple(types.CellType(replacement) if _cell_full(c) and c.cell_contents is inner else c
                      for c in cells)
    # a code object of its own (same bytecode): Dynamo caches, skips and restarts frames by code
    # object, and this copy must not share any of that with the wrapper it was made from (a frame
    # of the copy is the capturable forward, never the original ``capture.restart_error`` looks for)
    new = types.FunctionType(wrapper.__code__.replace(), wrapper.__globals__, wrapper.__name__,
                             wrapper.__defaults__, new_cells)
    new.__kwdefaults__ = wrapper.__kwdefaults__
    new.__qualname__ = wrapper.__qualname__
    new.__module__ = wrapper.__module__
    new.__wrapped__ = replacement
    return new


def _cell_full(cell) -> bool:
    try:
        cell.cell_contents
    except ValueError:
        return False
    return True
