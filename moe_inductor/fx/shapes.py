"""Example values and symbolic sizes of graph nodes (sympy; nothing here adds a guard)."""
from __future__ import annotations

from typing import Any, Optional

import sympy
import torch
import torch.fx as fx


def example_value(node_or_value: Any) -> Any:
    if isinstance(node_or_value, fx.Node):
        return node_or_value.meta.get("example_value", node_or_value.meta.get("val"))
    like = getattr(node_or_value, "shaped_like", None)  # a value the rewrite builds later (parts.LowRankWeight)
    if isinstance(like, fx.Node):
        return example_value(like)
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


def same_dim(a: fx.Node, i: int, b: fx.Node, j: int) -> bool:
    """Size ``i`` of ``a`` and size ``j`` of ``b`` provably equal: ``same``, or a fact the graph's shape
    environment holds (Dynamo's runtime asserts, ``Eq(u2, u1)`` for two lengths of data-dependent
    size that the program checks equal; ``statically_known_true`` adds no guard)."""
    va, vb = example_value(a), example_value(b)
    if not isinstance(va, torch.Tensor) or not isinstance(vb, torch.Tensor) or \
            not (-va.dim() <= i < va.dim() and -vb.dim() <= j < vb.dim()):
        return False
    x, y = va.shape[i], vb.shape[j]
    if same(x, y):
        return True
    if isinstance(x, torch.SymInt) or isinstance(y, torch.SymInt):
        from torch.fx.experimental.symbolic_shapes import statically_known_true

        try:
            return bool(statically_known_true(x == y))
        except Exception:  # a size the environment cannot reason about: not proven
            return False
    return False


def known_nonnegative(v: Any) -> bool:
    """An int, SymInt or a graph node holding one that is provably >= 0 (no guard added)."""
    v = example_value(v)
    if isinstance(v, bool):
        return False
    if isinstance(v, int):
        return v >= 0
    if isinstance(v, torch.SymInt):
        from torch.fx.experimental.symbolic_shapes import statically_known_true

        try:
            return bool(statically_known_true(v >= 0))
        except Exception:  # not something the environment can decide: not proven
            return False
    return False


def int_value(v: Any) -> Optional[int]:
    e = to_sympy(v)
    if e is not None and e.is_Integer:
        return int(e)
    return None


def dtype_of(node: Any) -> Optional[torch.dtype]:
    v = example_value(node)
    return v.dtype if isinstance(v, torch.Tensor) else None
