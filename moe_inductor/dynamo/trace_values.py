"""Values of one-element tensors computed from sizes and constants, folded at trace time (sonic frames).

``moe_inductor.dynamo.shape_items`` answers ``.item()``, a Python branch (``if t < u:``) and an int conversion
(``topk(k=t)``, ``one_hot(num_classes=t)``) of such a tensor. Its integer path keeps the answer
symbolic; this module covers the rest, floats included: DeepSpeed's ``_capacity`` computes
``torch.ceil((S / E) * torch.tensor(factor)).to(torch.int64)`` and compares it with
``torch.tensor(min_capacity)``.

``fold(node)`` replays the producers of ``node`` with real one-element CPU tensors: the same torch
op on the same dtypes, so type promotion and every rounding are eager's own (``torch.tensor(1.25)``
is float32, ``S / E`` a Python float rounded to float32 by the multiplication, as in eager). The
ops are a closed list whose results do not depend on the device: integer and boolean arithmetic,
and on float32 / float64 only IEEE correctly rounded ones (``+ - * /``), exact ones (``ceil``,
``floor``, ``trunc``, ``neg``, ``abs``, ``maximum``/``minimum``, comparisons) and casts. Half and
bfloat16 values are refused (their kernels may compute in another precision on another device),
so is ``rounding_mode`` division and floor division of floats. Leaves are Python numbers, sizes
(SymInts) and Python arithmetic on them (``S / E``); anything else (an input, a parameter, a random
or data-dependent op) stops the fold with the reason.

Symbolic sizes: the fold reads their hints and returns them; ``specialize`` then guards each of
them to that value (``guard_int``), so the compiled graph is used only for those sizes and Dynamo
recompiles for others. Why specialize rather than keep a formula: the float rounding of ``S / E``
and of the product with the factor is exact for all sizes only in special cases (a power-of-two
E, a factor with a short mantissa, S bounded), and a formula that differs from eager's float32 for
one size would change which tokens are dropped. Integer-only chains stay symbolic (shape_items).
"""
from __future__ import annotations

import operator

import torch

_DTYPES = {torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool, torch.float32, torch.float64}
_INT_ONLY = {operator.floordiv, torch.floor_divide, "floor_divide", "__floordiv__", "__rfloordiv__", "remainder",
             operator.mod, "__mod__"}
_FNS = {operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.neg, operator.mod,
        operator.lt, operator.le, operator.gt, operator.ge, operator.eq, operator.ne, operator.getitem,
        torch.add, torch.sub, torch.mul, torch.div, torch.true_divide, torch.floor_divide, torch.maximum,
        torch.minimum, torch.ceil, torch.floor, torch.trunc, torch.neg, torch.abs, torch.lt, torch.le, torch.gt,
        torch.ge, torch.eq, torch.ne, torch.squeeze, torch.unsqueeze, torch.flatten, torch.reshape, torch.clone}
_METHODS = {"add", "sub", "mul", "div", "true_divide", "floor_divide", "maximum", "minimum", "ceil", "floor", "trunc",
            "neg", "abs", "lt", "le", "gt", "ge", "eq", "ne", "long", "int", "float", "double", "bool", "view",
            "reshape", "squeeze", "unsqueeze", "flatten", "clone", "contiguous", "detach", "to", "__getitem__",
            "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__", "__rtruediv__",
            "__floordiv__", "__rfloordiv__", "__neg__", "__lt__", "__le__", "__gt__", "__ge__", "__eq__", "__ne__",
            "__abs__", "remainder", "__mod__"}
_FACTORIES = {torch.tensor, torch.scalar_tensor, torch.ones, torch.zeros, torch.full}
_PY_SCALAR_OPS = {operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.neg,
                  operator.mod, torch.sym_max, torch.sym_min, torch.sym_float}


class NotFoldable(Exception):
    """The value is not proved a function of sizes and constants (the message says which producer)."""


def _describe(node) -> str:
    target = getattr(node.target, "__name__", node.target)
    return f"`{node.name} = {target}(...)`"


def _hint(v, leaves: list):
    """A SymInt's value (recorded as a leaf to specialize); plain numbers as they are."""
    if isinstance(v, (torch.SymFloat, torch.SymBool)):
        raise NotFoldable(f"symbolic {type(v).__name__} {v} (only sizes are read at their value)")
    if isinstance(v, torch.SymInt):
        hint = v.node.hint
        if not isinstance(hint, int):
            raise NotFoldable(f"size {v} has no value at trace time (data-dependent)")
        leaves.append(v)
        return hint
    return v


def _constant(a):
    """A non-graph argument the replay may pass on: numbers, dtypes, None, slices, tuples of these."""
    if isinstance(a, (tuple, list)):
        return type(a)(_constant(x) for x in a)
    if isinstance(a, slice):
        return slice(_constant(a.start), _constant(a.stop), _constant(a.step))
    if a is None or isinstance(a, (bool, int, float, torch.dtype, torch.device, str)):
        return a  # devices and strings reach only ``.to`` and factories, which drop them
    raise NotFoldable(f"argument {a!r} is not a number, dtype or device")


def _operand_value(a, leaves: list, depth: int):
    if isinstance(a, torch.fx.Node):
        return _value(a, leaves, depth + 1)
    return _constant(a)


def _scalar_node(node, leaves: list, depth: int):
    """A Python-level number of the graph: a size, or Python arithmetic on sizes and constants."""
    v = node.meta.get("example_value")
    if not isinstance(v, (torch.SymInt, torch.SymFloat)):
        return v
    if node.op == "call_function" and node.target in _PY_SCALAR_OPS and not node.kwargs:
        return node.target(*(_operand_value(a, leaves, depth) for a in node.args))
    if isinstance(v, torch.SymInt):
        return _hint(v, leaves)
    raise NotFoldable(f"{_describe(node)} is a symbolic float not computed from sizes")


def _value(node, leaves: list, depth: int = 0):
    """The value of ``node``: a one-element CPU tensor replaying its producers, or a Python number."""
    if depth > 48:
        raise NotFoldable("too many producers")
    v = node.meta.get("example_value")
    if isinstance(v, (int, float, bool, torch.SymInt, torch.SymFloat)):
        return _scalar_node(node, leaves, depth)
    if not isinstance(v, torch.Tensor) or v.numel() != 1 or not all(type(d) is int for d in v.shape) \
            or v.dtype not in _DTYPES:
        raise NotFoldable(f"{_describe(node)} is not a one-element integer, bool, float32 or float64 tensor")
    if node.op not in ("call_function", "call_method"):
        raise NotFoldable(f"{_describe(node)} is a graph input or attribute")
    if node.target in _FACTORIES:
        return _factory(node, v, leaves, depth)
    if node.target not in (_METHODS if node.op == "call_method" else _FNS):
        raise NotFoldable(f"{_describe(node)} is not an op folded at trace time")
    args = [_operand_value(a, leaves, depth) for a in node.args]
    kwargs = {k: _operand_value(a, leaves, depth) for k, a in node.kwargs.items()}
    if node.target in ("to", "view") or set(kwargs) - {"dim"}:
        return _cast(node, args, kwargs, v)
    if node.target in _INT_ONLY and any(isinstance(a, float) or (isinstance(a, torch.Tensor) and a.is_floating_point())
                                        for a in args):
        raise NotFoldable(f"{_describe(node)}: floor division or remainder of floats")
    fn = getattr(args[0], node.target) if node.op == "call_method" else node.target
    out = fn(*(args[1:] if node.op == "call_method" else args), **kwargs)
    return _checked(node, out, v)


def _checked(node, out, fake):
    if not isinstance(out, torch.Tensor) or out.dtype != fake.dtype or out.shape != fake.shape:
        raise NotFoldable(f"{_describe(node)}: the replay does not give the traced dtype and shape")
    return out


def _cast(node, args, kwargs, fake):
    """``.to(dtype/device)`` and ``.view(shape)``: the value at the traced dtype (devices dropped)."""
    if node.target == "view" and not kwargs and all(isinstance(a, int) for a in args[1:]):
        return _checked(node, args[0].reshape(fake.shape), fake)
    if node.target != "to" or set(kwargs) - {"dtype", "device", "non_blocking", "copy"} \
            or not all(isinstance(a, (torch.dtype, str, torch.device)) or a is None for a in args[1:]):
        raise NotFoldable(f"{_describe(node)}: arguments other than a dtype or device")
    return _checked(node, args[0].to(fake.dtype), fake)


def _factory(node, fake, leaves: list, depth: int):
    """``torch.tensor(x)``, ``scalar_tensor``, ``ones``/``zeros``/``full`` of one element, at the traced
    dtype (the default float32 for a Python float, as eager makes it)."""
    if set(node.kwargs) - {"dtype", "device", "layout", "pin_memory", "requires_grad"}:
        raise NotFoldable(f"{_describe(node)} has arguments other than dtype/device")
    args = [_operand_value(a, leaves, depth) for a in node.args]
    if node.target in (torch.ones, torch.zeros):
        fill = 1 if node.target is torch.ones else 0
    elif node.target is torch.full:
        fill = args[1] if len(args) > 1 else None
    else:
        fill = args[0] if args else None
        while isinstance(fill, (list, tuple)) and len(fill) == 1:
            fill = fill[0]
    if isinstance(fill, torch.Tensor) or not isinstance(fill, (bool, int, float)):
        raise NotFoldable(f"{_describe(node)} is not made of a number")
    return torch.full(fake.shape, fill, dtype=fake.dtype)


def fold(node):
    """(value, sizes): the value of the one-element tensor ``node`` as a CPU tensor, and the symbolic
    sizes it was computed from at their hints (to ``specialize``). Raises NotFoldable."""
    leaves: list = []
    out = _value(node, leaves)
    if not isinstance(out, torch.Tensor):
        raise NotFoldable(f"{_describe(node)} is not a tensor")
    return out, leaves


def specialize(sizes) -> None:
    """Guard each symbolic size to its hint: the folded value holds exactly for the compiled graph."""
    from torch.fx.experimental.symbolic_shapes import guard_int

    for s in sizes:
        guard_int(s)


# -- where torch reads a tensor argument as an int (``__index__``) ------------------------------------

_NOT_COUNTS = {"dtype", "layout", "memory_format"}
_int_params_cache: dict = {}


def int_params(name: str, method: bool):
    """(positions, keyword names) at which every overload of ``aten::name`` takes an ``int``: a tensor
    passed there is read by ``__index__``. Positions are those of the Python call (``self`` dropped
    for a method)."""
    key = (name, method)
    if key not in _int_params_cache:
        try:
            schemas = torch._C._jit_get_schemas_for_operator(f"aten::{name}")
        except Exception:
            schemas = []
        positions, names = set(), set()
        if schemas:
            kinds: dict = {}
            for s in schemas:
                for i, a in enumerate(s.arguments):
                    ok = str(a.type) in ("int", "SymInt") and a.name not in _NOT_COUNTS
                    kinds.setdefault(("pos", i - int(method)), []).append(ok and not a.kwarg_only)
                    kinds.setdefault(("name", a.name), []).append(ok)
            positions = {k[1] for k, v in kinds.items() if k[0] == "pos" and all(v) and len(v) == len(schemas)}
            names = {k[1] for k, v in kinds.items() if k[0] == "name" and all(v) and len(v) == len(schemas)}
        _int_params_cache[key] = (positions, names)
    return _int_params_cache[key]
