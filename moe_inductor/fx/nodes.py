"""Reading graph nodes: arguments, in-place writes, graph order, module paths."""
from __future__ import annotations

import torch.fx as fx

from .targets import INPLACE_FUNCTIONS


def arg(node: fx.Node, pos: int, name: str, default=None):
    """Argument ``name`` of a call, given positionally at ``pos`` or as a keyword."""
    if len(node.args) > pos:
        return node.args[pos]
    return node.kwargs.get(name, default)


def is_mutation(node: fx.Node, of: fx.Node) -> bool:
    """Does ``node`` write into ``of`` itself (in-place method, setitem, augmented assignment, an
    op whose schema writes its first argument)? Writes through a view of ``of`` are
    ``aliasing.writes_to``'s question."""
    if not node.args or node.args[0] is not of:
        return False
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("_")
    if node.op == "call_function":
        if node.target in INPLACE_FUNCTIONS:
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


# --------------------------------------------------------------------------- module paths

def downstream(source: fx.Node, until: fx.Node, order: dict) -> set:
    """``source`` and every node reachable from it through users, up to ``until`` in graph order
    (``order``: ``node_order`` of the graph)."""
    down, stack = {source}, [source]
    while stack:
        for u in stack.pop().users:
            if u not in down and order[u] <= order[until]:
                down.add(u)
                stack.append(u)
    return down


def source_of(node: fx.Node) -> str:
    """Module path of a node (from Dynamo's nn_module_stack), else its source line."""
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        return clean_module_path(path)
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
    return clean_module_path(paths[idx])


def clean_module_path(path: str) -> str:
    """Dynamo spells module paths like L['self'].model.layers[0].mlp; keep the attribute part."""
    for prefix in ("L['self'].", "L['self']", "L['mod'].", "L['model']."):
        if path.startswith(prefix):
            path = path[len(prefix):]
            break
    return path or "<root>"


def invalidate_order(graph: fx.Graph) -> None:
    """Forget the cached ``node_order`` of ``graph``: for passes that replace a node by another at
    the same place (the node count and the last node stay the same, so the cache cannot tell)."""
    _ORDER.pop(id(graph), None)
