"""Rewrite machinery shared by the idiom modules in ``patterns/``.

An idiom module matches MoE code in Dynamo's torch-level FX graph with Inductor's pattern
matcher (``torch._inductor.pattern_matcher``) and describes each block it recognises as a
``MoEBlock``: where the tokens, the routing and the expert weights are in the graph, and which
graph value the fused op replaces. ``emit_fused_moe`` then inserts one call of
``torch.ops.moe_inductor.fused_moe`` and rewires the users. Anything an idiom cannot prove
becomes a ``Declined`` with a reason; nothing here raises into the compiler.

Shape legend: T tokens, d hidden, n expert intermediate, E experts, K experts per token.
"""
from __future__ import annotations

import contextlib
import dataclasses
import operator
from typing import Any, Callable, Optional, Sequence

import sympy
import torch
import torch.fx as fx
from torch._inductor.pattern_matcher import (
    MULTIPLE,
    CallFunction,
    CallMethod,
    FailedMatch,
    Match,
    MatchContext,
    PatternExpr,
    is_match,
)

from .worth import Choice, choose_gathered, gathered_experts


class AnyOf(PatternExpr):
    """Matches if any alternative matches (first wins). The alternatives' captures join the
    enclosing match, so a KeywordArg used elsewhere in the pattern must bind the same node."""

    def __init__(self, *alternatives: PatternExpr) -> None:
        super().__init__()
        self.alternatives = alternatives

    def __repr__(self) -> str:
        return f"AnyOf({', '.join(map(repr, self.alternatives))})"

    def _match(self, node, ctx: MatchContext):
        failures = []
        for alt in self.alternatives:
            m = alt.match(node) if isinstance(node, fx.Node) else alt._match(node, ctx)
            if is_match(m):
                res = Match(ctx, self, kwargs=dict(m.kwargs))
                res.nodes.extend(m.nodes)
                return res
            failures.append(str(m))
        return FailedMatch("no alternative matched: {}", "; ".join(failures))


def F(fn, *args, **kwargs) -> CallFunction:
    """CallFunction that tolerates other users of the matched node: the rewrite adds a new
    node and leaves dead code elimination to drop what nothing uses any more, so a shared
    intermediate is never a correctness problem."""
    return CallFunction(fn, *args, _users=MULTIPLE, **kwargs)


class MethodCall(CallMethod):
    """CallMethod that fails to match, instead of raising, a call spelled with fewer keyword
    arguments than the pattern: Inductor's matcher would normalise such a call through the
    target's signature, which a method name does not have (AssertionError). Without this, one
    ``h.sum()`` anywhere in a graph broke every idiom whose pattern has ``M("sum", ..., dim=1)``."""

    def _match(self, node, ctx: MatchContext):
        if len(node.kwargs) < len(self.kwargs):
            return FailedMatch("{} has fewer keyword arguments than {}", node, self)
        return super()._match(node, ctx)


def M(method: str, *args, **kwargs) -> CallMethod:
    return MethodCall(method, *args, _users=MULTIPLE, **kwargs)


def getitem(obj, index) -> CallFunction:
    return F(operator.getitem, obj, index)


# --------------------------------------------------------------------------- shapes (sympy)

def example_value(node_or_value: Any) -> Any:
    if isinstance(node_or_value, fx.Node):
        return node_or_value.meta.get("example_value", node_or_value.meta.get("val"))
    return node_or_value


def to_sympy(v: Any) -> Optional[sympy.Expr]:
    """An int, SymInt or a graph node holding one -> sympy expression (None if unknown)."""
    v = example_value(v)
    if isinstance(v, sympy.Expr):
        return v
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return sympy.Integer(v)
    if isinstance(v, torch.SymInt):
        return v.node.expr
    return None


def shape_of(node: Any) -> Optional[tuple[sympy.Expr, ...]]:
    v = example_value(node)
    if isinstance(v, torch.Tensor):
        return tuple(to_sympy(s) for s in v.shape)
    return None


def sympy_prod(sizes) -> Optional[sympy.Expr]:
    """Product of sizes (ints, SymInts or sympy expressions); None if one is unknown."""
    out = sympy.Integer(1)
    for s in sizes:
        e = s if isinstance(s, sympy.Expr) else to_sympy(s)
        if e is None:
            return None
        out = out * e
    return out


def same(a: Any, b: Any) -> bool:
    """Provably equal sizes (no guards added): sympy difference simplifies to 0."""
    ea = a if isinstance(a, sympy.Expr) else to_sympy(a)
    eb = b if isinstance(b, sympy.Expr) else to_sympy(b)
    if ea is None or eb is None:
        return False
    return sympy.simplify(ea - eb) == 0


def int_value(v: Any) -> Optional[int]:
    e = to_sympy(v)
    if e is not None and e.is_Integer:
        return int(e)
    return None


def dtype_of(node: Any) -> Optional[torch.dtype]:
    v = example_value(node)
    return v.dtype if isinstance(v, torch.Tensor) else None


def _is_eq(node: Any) -> bool:
    return isinstance(node, fx.Node) and not node.kwargs and len(node.args) == 2 and (
        (node.op == "call_function" and node.target in (operator.eq, torch.eq))
        or (node.op == "call_method" and node.target in ("eq", "__eq__")))


def eq_constant(node: Any) -> Optional[tuple]:
    """(tensor node, int) if ``node`` is ``tensor == constant``, else None. Dynamo spells it
    differently by version: ``operator.eq(t, e)`` (2.13, which also puts the tensor first for
    ``e == t``), ``t.__eq__(e)`` as a method call and ``operator.eq(e, t)`` as written (2.11),
    ``torch.eq(t, e)`` and ``t.eq(e)`` as the user wrote them (both). Column ``e`` of a mask
    ``ids[..., None] == arange(E)`` is ``ids == e`` too (``arange_column``)."""
    if not _is_eq(node):
        return arange_column(node)
    for t, v in (node.args, node.args[::-1]):
        if isinstance(t, fx.Node) and isinstance(example_value(t), torch.Tensor) and int_value(v) is not None:
            return t, int_value(v)
    return None


def _arange_E(node: Any) -> Optional[int]:
    """E if ``node`` is ``torch.arange(E)`` or ``torch.arange(0, E)`` (step 1)."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target is torch.arange):
        return None
    if set(node.kwargs) - {"device", "dtype"}:
        return None
    ends = [int_value(a) for a in node.args]
    if len(ends) == 1:
        return ends[0]
    if len(ends) == 2 and ends[0] == 0:
        return ends[1]
    return None


def _last_axis_added(node: Any) -> Optional[fx.Node]:
    """t if ``node`` is ``t.unsqueeze(-1)`` / ``t[..., None]`` / ``t[:, :, None]`` (a new last axis)."""
    if not isinstance(node, fx.Node):
        return None
    t = node.args[0] if node.args else None
    ts = shape_of(t) if isinstance(t, fx.Node) else None
    if ts is None:
        return None
    if node.op == "call_method" and node.target == "unsqueeze" and len(node.args) == 2 and not node.kwargs:
        return t if node.args[1] in (-1, len(ts)) else None
    if node.op == "call_function" and node.target is torch.unsqueeze and len(node.args) == 2 and not node.kwargs:
        return t if node.args[1] in (-1, len(ts)) else None
    if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[1], tuple):
        idx = node.args[1]
        if idx and idx[-1] is None and (idx[:-1] == (Ellipsis,) or
                                        (len(idx) == len(ts) + 1 and all(i == slice(None) for i in idx[:-1]))):
            return t
    return None


def arange_column(node: Any) -> Optional[tuple]:
    """(ids, e) if ``node`` is column ``e`` along the expert axis of ``M = ids[..., None] == arange(E)``
    (either side of the ``==``), read as ``M[..., e]``, ``M[:, :, e]``, ``M.select(-1, e)`` or
    ``M.permute(last, *rest)[e]`` (the expert axis first, the others in order): elementwise
    ``ids == e``, the same shape and layout as ``ids``."""
    if not isinstance(node, fx.Node) or node.kwargs:
        return None
    m, e = None, None
    if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node):
        src, idx = node.args
        ms = shape_of(src)
        if isinstance(idx, tuple) and idx and int_value(idx[-1]) is not None and ms is not None and (
                idx[:-1] == (Ellipsis,) or (len(idx) == len(ms) and all(i == slice(None) for i in idx[:-1]))):
            m, e = src, int_value(idx[-1])
        elif int_value(idx) is not None and src.op == "call_method" and src.target == "permute" and ms is not None:
            perm = [int_value(p) for p in (src.args[1:] if len(src.args) > 2 else src.args[1])]
            n = len(ms)
            if perm == [n - 1] + list(range(n - 1)):
                m, e = src.args[0], int_value(idx)
    elif node.op == "call_method" and node.target == "select" and len(node.args) == 3:
        src = node.args[0]
        ms = shape_of(src) if isinstance(src, fx.Node) else None
        if ms is not None and node.args[1] in (-1, len(ms) - 1):
            m, e = src, int_value(node.args[2])
    found = arange_onehot(m) if m is not None and e is not None else None
    if found is None or not 0 <= e < found[1]:
        return None
    return found[0], e


def arange_onehot(node: Any) -> Optional[tuple]:
    """(ids, E) if ``node`` is ``ids[..., None] == arange(E)`` (either side of the ``==``): the
    boolean ``one_hot(ids, E)``, at most one True along its last axis."""
    if not _is_eq(node):
        return None
    for a, b in (node.args, node.args[::-1]):
        ids, E = _last_axis_added(a), _arange_E(b)
        if ids is not None and E is not None:
            return ids, E
    return None


# --------------------------------------------------------------------------- mutation safety

_INPLACE_FUNCTIONS = {operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv}


def is_mutation(node: fx.Node, of: fx.Node) -> bool:
    """Does ``node`` write into ``of`` (in-place method, setitem, augmented assignment)?"""
    if not node.args or node.args[0] is not of:
        return False
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("_")
    if node.op == "call_function":
        if node.target in _INPLACE_FUNCTIONS:
            return True
        schema = getattr(node.target, "_schema", None)
        return bool(schema and schema.arguments and schema.arguments[0].alias_info and schema.arguments[0].alias_info.is_write)
    return False


_ORDER: dict = {}


def node_order(graph: fx.Graph) -> dict:
    """{node: position} of ``graph``, cached while the graph keeps its nodes (recognisers ask it
    per unit and per block: recomputing it each time made the rewrite quadratic in graph size)."""
    key = id(graph)
    hit = _ORDER.get(key)
    n = len(graph.nodes)
    if hit is not None and hit[0] is graph and hit[1] == n and hit[3] is graph._root._prev:
        return hit[2]
    order = {node: i for i, node in enumerate(graph.nodes)}
    if len(_ORDER) > 64:
        _ORDER.clear()
    _ORDER[key] = (graph, n, order, graph._root._prev)
    return order


def mutated_between(value: fx.Node, start: fx.Node, end: fx.Node) -> Optional[fx.Node]:
    """A node strictly after ``start`` and before ``end`` (graph order) that mutates ``value``."""
    order = node_order(value.graph)
    lo, hi = order[start], order[end]
    for user in value.users:
        if lo < order[user] < hi and is_mutation(user, value):
            return user
    return None


# --------------------------------------------------------------------------- blocks and reports

@dataclasses.dataclass
class ExpertWeights:
    """Per-expert weight nodes, E of each, that ``build_weights`` may return instead of stacked
    (w1, w2, b1, b2): the rewrite then emits ``fused_moe_experts``, which stacks them inside the op
    and keeps the per-expert parameters, not a stacked copy, for backward. ``up`` is empty for
    non-gated experts (or when ``gate`` holds both halves); bias lists are empty when absent."""

    gate: list
    down: list
    up: list = dataclasses.field(default_factory=list)
    b_gate: list = dataclasses.field(default_factory=list)
    b_up: list = dataclasses.field(default_factory=list)
    b_down: list = dataclasses.field(default_factory=list)


#: qualified names of the GEMMs idioms replace, for the fused op's ``autocast_like`` (its Autocast
#: kernels apply that GEMM's autocast rule). einsum decomposes to bmm under CPU autocast.
_GEMM_NAMES = {
    torch._C._nn.linear: "aten::linear", torch.nn.functional.linear: "aten::linear",
    torch.mm: "aten::mm", torch.matmul: "aten::matmul", torch.bmm: "aten::bmm",
    torch.einsum: "aten::bmm", torch.functional.einsum: "aten::bmm", torch._grouped_mm: "aten::_grouped_mm",
}


def gemm_name(target: Any) -> str:
    """The operator name whose autocast rule applies to a GEMM call target of the torch-level
    graph (a torch function, or a custom op such as transformers::grouped_mm_fallback)."""
    if target in _GEMM_NAMES:
        return _GEMM_NAMES[target]
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target._qualified_op_name
    raise ValueError(f"no known autocast rule for GEMM {target}")


@dataclasses.dataclass
class MoEBlock:
    """A recognised MoE block, as the graph computes it.

    token_ids/expert_ids/scores are graph nodes of shape (A,) (the rewrite casts the ids to
    int32). ``build_weights`` emits nodes for (w1 (E, 2n|n, d), w2 (E, d, n), b1, b2) right
    before the insertion point, or returns ``ExpertWeights`` (per-expert nodes, nothing stacked).
    ``replace`` rewires the graph to the fused output node (T, d) and erases what the idiom must
    erase itself (in-place accumulations). ``autocast_like``: the GEMM the block's experts call
    (``gemm_name``), whose autocast rule the fused op follows."""

    idiom: str
    anchor: fx.Node
    x: fx.Node
    token_ids: Callable[[fx.Graph], fx.Node]
    expert_ids: Callable[[fx.Graph], fx.Node]
    scores: Callable[[fx.Graph], fx.Node]
    build_weights: Callable[[fx.Graph], tuple[fx.Node, fx.Node, Optional[fx.Node], Optional[fx.Node]]]
    replace: Callable[[fx.Node], None]
    activation: str
    interleaved: bool
    num_experts: int
    top_k: Optional[int]
    hidden: Any
    intermediate: Any
    dtype: Optional[torch.dtype]
    insert_before: Optional[fx.Node] = None
    router: Optional[dict] = None  # router description, for token rounding (later issues)
    # in-place writes (setitem, index_add_, ...) that belong to the block: erased once dead code
    # elimination has removed every reader of the tensor they write
    orphans: list = dataclasses.field(default_factory=list)
    #: node whose module path names the block in reports (default: the anchor)
    location: Optional[fx.Node] = None
    autocast_like: str = "aten::mm"
    #: the parts the block was recognised from (dispatch, experts, combine spellings), for reports
    parts: str = ""
    #: set by ``emit_fused_moe``: the gathered decomposition chosen instead of the fused op
    #: (``moe_inductor.worth``), or None
    choice: Optional[Choice] = None


@dataclasses.dataclass
class Candidate:
    """One MoE candidate seen by the pass: rewritten, or declined with a reason."""

    idiom: str
    where: str
    status: str  # "rewritten" | "declined"
    reason: str = ""
    num_experts: Optional[int] = None
    top_k: Optional[int] = None
    hidden: Any = None
    intermediate: Any = None
    dtype: Optional[torch.dtype] = None
    #: rewritten blocks: "triton" or "PyTorch path (<reason>)", decided at rewrite time (report.runs_on)
    runs_on: str = ""
    #: rewritten blocks: the parts they were recognised from (``MoEBlock.parts``)
    parts: str = ""


def source_of(node: fx.Node) -> str:
    """Module path of a node (from Dynamo's nn_module_stack), else its source line."""
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        return _clean_module_path(path)
    trace = node.meta.get("stack_trace")
    if trace:
        lines = [l.strip() for l in trace.strip().splitlines() if l.strip().startswith("File")]
        if lines:
            return lines[-1]
    return f"node {node.name}"


def module_path_of(node: fx.Node, depth_from_leaf: int = 0) -> str:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return source_of(node)
    paths = [v[0] for v in stack.values()]
    idx = max(0, len(paths) - 1 - depth_from_leaf)
    return _clean_module_path(paths[idx])


def _clean_module_path(path: str) -> str:
    # Dynamo spells module paths like L['self'].model.layers[0].mlp; keep the attribute part.
    for prefix in ("L['self'].", "L['self']", "L['mod'].", "L['model']."):
        if path.startswith(prefix):
            path = path[len(prefix):]
            break
    return path or "<root>"


# --------------------------------------------------------------------------- emission

def _graph_fake_mode(graph: fx.Graph):
    # Dynamo's example values share one fake mode, which is not always the ambient one
    # (detect_fake_mode() may return the backend's); new values must live in the graph's.
    for n in graph.nodes:
        v = n.meta.get("example_value")
        if isinstance(v, torch.Tensor) and hasattr(v, "fake_mode"):
            return v.fake_mode
    return torch._guards.detect_fake_mode()


def _fake_run(node: fx.Node) -> None:
    """Fill meta['example_value'] of a new node by running it on the fake values of its inputs,
    so later passes (Inductor's pre-grad passes read it) see a well-formed graph."""
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), example_value)
    tensors = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
    fake_mode = next((t.fake_mode for t in tensors if hasattr(t, "fake_mode")), None)
    fake_mode = fake_mode or _graph_fake_mode(node.graph)
    if fake_mode is None:
        return
    with fake_mode:
        if node.op == "call_function":
            val = node.target(*args, **kwargs)
        else:
            val = getattr(args[0], node.target)(*args[1:], **kwargs)
    node.meta["example_value"] = val


def emit(graph: fx.Graph, op: str, target, args=(), kwargs=None, like: Optional[fx.Node] = None) -> fx.Node:
    node = graph.create_node(op, target, tuple(args), dict(kwargs or {}))
    if like is not None:
        for key in ("stack_trace", "nn_module_stack", "source_fn_stack"):
            if key in like.meta:
                node.meta[key] = like.meta[key]
    _fake_run(node)
    return node


def call(graph, target, *args, like=None, **kwargs) -> fx.Node:
    return emit(graph, "call_function", target, args, kwargs, like)


def method(graph, name, *args, like=None, **kwargs) -> fx.Node:
    return emit(graph, "call_method", name, args, kwargs, like)


def _autocast_regions(graph: fx.Graph, before: fx.Node) -> list:
    """Arguments of the ``with torch.autocast(...)`` regions Dynamo recorded in ``graph``
    (``_enter_autocast`` / ``_exit_autocast`` nodes) that are open at ``before``."""
    enter = getattr(torch.amp.autocast_mode, "_enter_autocast", None)
    leave = getattr(torch.amp.autocast_mode, "_exit_autocast", None)
    open_: dict = {}
    for n in graph.nodes:
        if n is before:
            break
        if n.op == "call_function" and enter is not None and n.target is enter:
            open_[n] = n.args
        elif n.op == "call_function" and leave is not None and n.target is leave and n.args:
            open_.pop(n.args[0], None)
    return list(open_.values())


def _expert_index(node: Any) -> Optional[tuple]:
    """(W, e, transposed) when ``node`` is expert ``e``'s slice of a stacked tensor ``W``:
    ``W[e]`` / ``W.select(0, e)`` / ``torch.select(W, 0, e)`` with an int ``e``, optionally
    followed by ``.t()`` / ``.transpose(0, 1)`` (either order of the two dims); else None."""
    transposed = False
    if isinstance(node, fx.Node) and node.op == "call_method" and (
            (node.target == "t" and len(node.args) == 1 and not node.kwargs)
            or (node.target == "transpose" and not node.kwargs and len(node.args) == 3
                and sorted(a % 2 if isinstance(a, int) else -9 for a in node.args[1:]) == [0, 1])):
        node, transposed = node.args[0], True
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_function" and node.target is operator.getitem and len(node.args) == 2 \
            and type(node.args[1]) is int:
        base, e = node.args
    elif ((node.op == "call_method" and node.target == "select")
          or (node.op == "call_function" and node.target is torch.select)) \
            and len(node.args) == 3 and node.args[1] == 0 and type(node.args[2]) is int and not node.kwargs:
        base, _, e = node.args
    else:
        return None
    return (base, e, transposed) if isinstance(base, fx.Node) else None


def stacked_source(graph: fx.Graph, nodes: list, like: fx.Node) -> Optional[fx.Node]:
    """The stacked tensor the per-expert weight nodes ``nodes`` are the slices 0..E-1 of, when they
    are exactly that (one base ``W`` with ``W.shape[0] == E``, expert ``e`` at position ``e``, all
    transposed alike): a node for ``W`` (or ``W.transpose(1, 2)``), else None. The fused op then
    takes the stacked tensor as it is instead of stacking E slices of it again on every call
    (transformers' experts loop ``self.gate_up_proj[expert_idx]`` over stacked parameters)."""
    parts = [_expert_index(n) for n in nodes]
    if not parts or any(p is None for p in parts):
        return None
    base, _, transposed = parts[0]
    if any(p[0] is not base or p[1] != e or p[2] != transposed for e, p in enumerate(parts)):
        return None
    value = example_value(base)
    if not isinstance(value, torch.Tensor) or value.dim() < 2 or not isinstance(value.shape[0], int) \
            or value.shape[0] != len(nodes):
        return None
    if not transposed:
        return base
    if value.dim() != 3:
        return None
    return method(graph, "transpose", base, 1, 2, like=like)


def _collapse_stacked(graph: fx.Graph, weights: "ExpertWeights", like: fx.Node):
    """``weights`` as stacked (w1, w2, b1, b2) when every list is the slices of one stacked
    tensor (``stacked_source``) and no gate/up pair would have to be concatenated; else
    ``weights`` unchanged. (Nodes left without users are erased by the pass's dead-code cleanup.)"""
    if weights.up or weights.b_up:
        return weights
    stacked = []
    for nodes in (weights.gate, weights.down, weights.b_gate, weights.b_down):
        w = stacked_source(graph, list(nodes), like) if nodes else None
        if nodes and w is None:
            return weights
        stacked.append(w)
    return tuple(stacked)


def _gathered_choice(block: MoEBlock, x: fx.Node, token_ids: fx.Node, weights, per_expert: bool,
                     rewritten_routing: bool, autocast: bool):
    """``worth.choose_gathered`` for this block, from its graph's example values (None: fused op)."""
    xv, out = example_value(x), example_value(block.anchor)
    if not isinstance(xv, torch.Tensor) or not isinstance(out, torch.Tensor):
        return None
    # autocast recorded in the graph, or entered around the compiled call (Dynamo guards on it):
    # the fused op follows the replaced GEMM's autocast rule, the reductions would not
    if autocast or torch.is_autocast_enabled(xv.device.type):
        return None
    if not per_expert:
        w1v, w2v = example_value(weights[0]), example_value(weights[1])
        if not (isinstance(w1v, torch.Tensor) and isinstance(w2v, torch.Tensor)):
            return None
        if w1v.stride(-1) != 1 or w2v.stride(-1) != 1:  # the reductions run along contiguous rows
            return None
    assignments = int_value(shape_of(token_ids)[0]) if shape_of(token_ids) else None
    return choose_gathered(xv.device, out.requires_grad, assignments, block.num_experts, not per_expert,
                           rewritten_routing)


def emit_fused_moe(gm: fx.GraphModule, block: MoEBlock, recompute_h: bool, impl: str,
                   routing_hook: Optional[Callable] = None) -> fx.Node:
    """Insert the fused op for ``block`` and rewire the graph. Returns the op's output node.

    ``routing_hook(graph, expert_ids, scores)``, if given, sees the block's flat routing nodes and
    may return replacement (token_ids, expert_ids, scores) nodes (token rounding), else None.

    Autocast: the op's Autocast kernels act when AOTAutograd traces the graph (autocast entered
    around the compiled call, or a ``with torch.autocast`` region Dynamo recorded); here the op's
    example value is computed under the same autocast state, so that the cast back to the dtype
    the replaced code returned is inserted exactly when needed."""
    graph = gm.graph
    where = block.insert_before or block.anchor
    with graph.inserting_before(where):
        like = block.anchor
        x = block.x
        weights = block.build_weights(graph)
        if isinstance(weights, ExpertWeights):
            weights = _collapse_stacked(graph, weights, like)
        per_expert = isinstance(weights, ExpertWeights)
        wdtype = dtype_of(weights.gate[0] if per_expert else weights[0])
        if wdtype is not None and dtype_of(x) != wdtype:
            x = method(graph, "to", x, wdtype, like=like)
        token_ids, expert_ids, scores = block.token_ids(graph), block.expert_ids(graph), block.scores(graph)
        replaced = routing_hook(graph, expert_ids, scores) if routing_hook is not None else None
        if replaced is not None:
            token_ids, expert_ids, scores = replaced
        token_ids = method(graph, "to", token_ids, torch.int32, like=like)
        expert_ids = method(graph, "to", expert_ids, torch.int32, like=like)
        regions_open = _autocast_regions(graph, where)
        block.choice = _gathered_choice(block, x, token_ids, weights, per_expert, replaced is not None,
                                        bool(regions_open))
        with contextlib.ExitStack() as regions:
            for args in regions_open:
                regions.enter_context(torch.amp.autocast(*args))
            if block.choice is not None:
                w1, w2, b1, b2 = weights
                out = call(graph, gathered_experts, x, token_ids, expert_ids, scores, w1, w2, b1, b2,
                           block.activation, block.interleaved, like=like)
            else:
                # the op's options are keyword-only (moe_inductor.op.OPTION_ARGS); the weights
                # positional, in the order of the op's description
                options = dict(activation=block.activation, interleaved=block.interleaved, recompute_h=recompute_h,
                               impl=impl, autocast_like=block.autocast_like)
                if per_expert:
                    fused = call(
                        graph, torch.ops.moe_inductor.fused_moe_experts.default,
                        x, token_ids, expert_ids, scores, list(weights.gate), list(weights.down), list(weights.up),
                        list(weights.b_gate), list(weights.b_up), list(weights.b_down), like=like, **options)
                else:
                    w1, w2, b1, b2 = weights
                    fused = call(graph, torch.ops.moe_inductor.fused_moe.default,
                                 x, token_ids, expert_ids, scores, w1, w2, b1, b2, like=like, **options)
        if block.choice is None:
            out = call(graph, operator.getitem, fused, 0, like=like)
        want = dtype_of(block.anchor)
        if want is not None and want != dtype_of(out):
            out = method(graph, "to", out, want, like=like)
    block.replace(out)
    return out


# --------------------------------------------------------------------------- declining

class Declined(Exception):
    """Raised by an idiom's analysis when a candidate is not provably the MoE block it looks
    like; the message is the reason reported to the user (``explain``, logs, counters)."""


def need(cond: Any, reason: str) -> None:
    """Decline with ``reason`` unless ``cond`` holds."""
    if not cond:
        raise Declined(reason)


def match_or_decline(pattern: PatternExpr, node: Any, what: str, detail: bool = False) -> dict:
    """Match ``pattern`` at ``node`` and return the captured KeywordArgs, or decline with
    "<what> not recognised" (with the matcher's own failure text when ``detail``)."""
    m = pattern.match(node) if isinstance(node, fx.Node) else None
    if m is None or not is_match(m):
        raise Declined(f"{what} not recognised" + (f" ({m})" if detail and m is not None else ""))
    return m.kwargs


def size_asserts_of(roots, through) -> list:
    """Dynamo's runtime asserts (``aten._assert_scalar``) on sizes derived from ``roots`` via
    users whose target is in ``through`` or ``aten.sym_size``: they die with the block that
    produced those sizes, so an idiom lists them among its orphans."""
    found, stack = [], list(roots)
    while stack:
        n = stack.pop()
        for u in n.users:
            if u.op == "call_function" and u.target is torch.ops.aten._assert_scalar.default:
                found.append(u)
            elif u.op == "call_function" and (u.target in through or u.target is torch.ops.aten.sym_size.int):
                stack.append(u)
    return found


def nearest_upstream(start: Any, pattern: PatternExpr, accept: Callable[[dict], bool]):
    """Walk from ``start`` through the inputs of call nodes (depth first) to the first node where
    ``pattern`` matches with captures that ``accept`` approves; returns (node, captures) or
    (None, None). For finding, e.g., the token gather that feeds an expert's MLP."""
    stack, seen = [start], set()
    while stack:
        n = stack.pop()
        if n in seen or not isinstance(n, fx.Node):
            continue
        seen.add(n)
        m = pattern.match(n)
        if is_match(m) and accept(m.kwargs):
            return n, m.kwargs
        if n.op in ("call_function", "call_method"):
            stack.extend(n.all_input_nodes)
    return None, None
