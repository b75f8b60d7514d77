"""Rewrite machinery shared by the idiom modules in ``patterns/``.

An idiom module matches MoE code in Dynamo's torch-level FX graph with Inductor's pattern
matcher (``torch._inductor.pattern_matcher``) and describes each block it recognises as a
``MoEBlock``: where the tokens, the routing and the expert weights are in the graph, and which
graph value the fused op replaces. ``emit_fused_moe`` then inserts one call of
``torch.ops.moe_inductor.fused_moe`` and rewires the users. Anything an idiom cannot prove
becomes a ``Declined`` with a reason; nothing here raises into the compiler. The FX vocabulary the
idioms and this module speak (shapes, op targets, aliasing, matching, node building, ``need``) is
``moe_inductor.fx``.

Shape legend: T tokens, d hidden, n expert intermediate, E experts, K experts per token.
"""
from __future__ import annotations

import contextlib
import dataclasses
import operator
from typing import Any, Callable, Optional

import torch
import torch.fx as fx

# The FX vocabulary lives in moe_inductor.fx; this module imports what emission uses.
from moe_inductor.fx.build import call, method
from moe_inductor.fx.shapes import dtype_of, example_value, int_value, shape_of

from moe_inductor.lower.worth import Choice, choose_gathered, gathered_experts



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
    #: (``moe_inductor.lower.worth``), or None
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


# --------------------------------------------------------------------------- emission

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
                # the op's options are keyword-only (moe_inductor.ops.op.OPTION_ARGS); the weights
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
