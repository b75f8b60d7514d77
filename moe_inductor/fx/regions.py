"""Nested regions: the subgraphs of higher-order ops that the MoE rewrite enters.

Dynamo does not inline everything into one flat graph. Activation checkpointing
(``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``, transformers'
``gradient_checkpointing_enable``) becomes a node
``torch.ops.higher_order.tag_activation_checkpoint(wrap_body_0, *operands)`` whose body is a child
GraphModule of the backend's graph, read through a ``get_attr`` node; ``torch._higher_order_ops.wrap``,
``torch.compiler.nested_compile_region`` (``invoke_subgraph``) and Dynamo's grad-mode wrapper do
the same. A rewrite that walks only the top-level graph sees no MoE block in them.

The ops listed in ``ENTERED`` run their body once, as a plain function of its operands, in the
parent's autograd context: replacing an MoE block inside the body by the fused op (same inputs,
same value) keeps the region's meaning. What the region does around the body stays as it was:
a checkpointed region still saves only its operands and recomputes the body, fused op included,
in backward. A body is rewritten as a copy that then replaces it in its parent (whoever holds
the original graph keeps the original body); placeholders and the body's outputs keep their
number and order (dead-code removal never erases a placeholder or the output node; checked).

Other higher-order ops that hold subgraphs (``cond``, ``while_loop``, ``map``, ``scan``,
``flex_attention``'s score functions, a user ``autograd.Function``'s forward and backward bodies,
...) are not entered: their bodies run zero or many times, under a contract on their outputs, or
with a backward of their own that the fused op's would bypass. An MoE block found in one of those
is reported as declined with that reason.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterator

import torch
import torch.fx as fx

#: names of the higher-order ops whose subgraphs the rewrite enters (see the module docstring)
ENTERED = frozenset({
    "tag_activation_checkpoint",   # torch.utils.checkpoint under Dynamo (use_reentrant=False)
    "wrap",                        # torch._higher_order_ops.wrap.wrap
    "wrap_activation_checkpoint",  # older spelling of the checkpoint wrapper
    "invoke_subgraph",             # torch.compiler.nested_compile_region
    "wrap_with_set_grad_enabled",  # a torch.no_grad()/enable_grad() block Dynamo kept as a region
})


@dataclasses.dataclass
class Region:
    """One child GraphModule of a higher-order op, and the ops that call it."""

    gm: fx.GraphModule
    path: str  # attribute path from the backend's graph, e.g. "wrap_body_0" or "wrap_body_0.wrap_body_1"
    hop: str  # name of the higher-order op, e.g. "tag_activation_checkpoint"
    callers: list = dataclasses.field(default_factory=list)  # its call nodes in the parent graph

    @property
    def entered(self) -> bool:
        return self.hop in ENTERED

    def describe(self) -> str:
        shared = f", body shared by {len(self.callers)} calls" if len(self.callers) > 1 else ""
        return f"{self.hop} region {self.path}{shared}"


def hop_name(node: fx.Node) -> str | None:
    """The name of a higher-order op called by ``node``, else None."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.HigherOrderOperator):
        return None
    name = getattr(node.target, "_name", None) or getattr(node.target, "__name__", None)
    return str(name) if name else type(node.target).__name__


def _subgraph_args(gm: fx.GraphModule, node: fx.Node) -> Iterator[tuple[str, fx.GraphModule]]:
    """(attribute name, child GraphModule) of every get_attr operand of ``node`` naming a graph."""
    seen: list = []

    def visit(a):
        if a.op == "get_attr" and a not in seen:
            seen.append(a)
        return a

    fx.node.map_arg((node.args, node.kwargs), visit)
    for attr in seen:
        try:
            child = gm.get_submodule(attr.target) if isinstance(attr.target, str) else None
        except AttributeError:
            child = None
        if isinstance(child, fx.GraphModule):
            yield attr.target, child


def direct_regions(gm: fx.GraphModule, prefix: str = "") -> list[Region]:
    """The child GraphModules that higher-order ops of ``gm``'s own graph call (one level; a body
    called by several ops is listed once, with all its callers)."""
    found: dict[int, Region] = {}
    for node in gm.graph.nodes:
        name = hop_name(node)
        if name is None:
            continue
        for attr, child in _subgraph_args(gm, node):
            key = id(child)
            if key not in found:
                found[key] = Region(gm=child, path=f"{prefix}{attr}", hop=name)
            found[key].callers.append(node)
    return list(found.values())


def copy_body(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of a body's graph (node metadata shallow-copied) over the same submodules and
    attributes. Bodies are rewritten as copies that replace the original attribute, never in
    place: a caller holding the original graph (the backend keeps one to fall back to) keeps the
    original bodies too."""
    graph = fx.Graph(owning_module=None, tracer_cls=getattr(gm.graph, "_tracer_cls", None))
    graph._codegen = gm.graph._codegen
    env: dict = {}
    for node in gm.graph.nodes:
        env[node] = graph.node_copy(node, lambda n: env[n])
    body = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    body.meta.update(getattr(gm, "meta", {}))
    return body


def rewrite_nested(gm: fx.GraphModule, rewrite: Callable[[fx.GraphModule, Region], None],
                   decline: Callable[[Region], None], prefix: str = "", depth: int = 0) -> None:
    """Rewrite the bodies of the regions ``gm`` calls, outer before inner: for an entered region,
    ``rewrite(body, region)`` runs on a copy of its body, then its own regions, and the copy
    replaces the body in ``gm``; ``decline(region)`` is called for a region that is not entered
    (nothing below it is visited)."""
    if depth > 16:  # nothing real nests this deep; guards against a cyclic module tree
        return
    for region in direct_regions(gm, prefix):
        if not region.entered:
            decline(region)
            continue
        before = signature(region.gm)
        body = copy_body(region.gm)
        rewrite(body, Region(gm=body, path=region.path, hop=region.hop, callers=region.callers))
        rewrite_nested(body, rewrite, decline, prefix=f"{region.path}.", depth=depth + 1)
        if signature(body) != before:  # the rewrite never touches placeholders or outputs
            raise RuntimeError(f"sonic: rewriting {region.describe()} changed its signature")
        owner_path, _, attr = region.path[len(prefix):].rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        setattr(owner, attr, body)


def signature(gm: fx.GraphModule) -> tuple:
    """What a rewrite inside a body must not change: its placeholders and the arity of its output."""
    placeholders = tuple(n.target for n in gm.graph.nodes if n.op == "placeholder")
    out = next((n for n in reversed(gm.graph.nodes) if n.op == "output"), None)
    arity = len(out.args[0]) if out is not None and isinstance(out.args[0], (tuple, list)) else 1
    return placeholders, arity
