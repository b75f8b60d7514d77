"""Building nodes: new call nodes with the example value of their result (Inductor's pre-grad
passes read it), in the graph's own fake mode."""
from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx

from .shapes import example_value


def graph_fake_mode(graph: fx.Graph):
    # Dynamo's example values share one fake mode, which is not always the ambient one
    # (detect_fake_mode() may return the backend's); new values must live in the graph's.
    for n in graph.nodes:
        v = n.meta.get("example_value")
        if isinstance(v, torch.Tensor) and hasattr(v, "fake_mode"):
            return v.fake_mode
    return torch._guards.detect_fake_mode()


def fake_run(node: fx.Node) -> None:
    """Fill meta['example_value'] of a new node by running it on the fake values of its inputs,
    so later passes (Inductor's pre-grad passes read it) see a well-formed graph."""
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), example_value)
    tensors = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
    fake_mode = next((t.fake_mode for t in tensors if hasattr(t, "fake_mode")), None)
    fake_mode = fake_mode or graph_fake_mode(node.graph)
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
    fake_run(node)
    return node


def call(graph, target, *args, like=None, **kwargs) -> fx.Node:
    return emit(graph, "call_function", target, args, kwargs, like)


def method(graph, name, *args, like=None, **kwargs) -> fx.Node:
    return emit(graph, "call_method", name, args, kwargs, like)
