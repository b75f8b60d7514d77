"""Tensors whose every element provably holds one constant, and branches on them in sonic frames.

fairseq's ``MOELayer`` builds its padding mask as ``m = torch.ones((n,), dtype=torch.bool)`` then
``m[:n] = False`` (``n`` the token count, also the mask's length), and ``top1gating`` branches
``if input_mask is not None and input_mask.any():``. Dynamo breaks the graph at the branch (a host
read of a tensor), splitting the MoE block in two graphs. Yet the branch has one outcome for every
size: the mask is all False, so ``any()`` is False.

``value(node)`` is a small abstract evaluation of a graph tensor as a *uniform* value: a one-element
CPU tensor holding the constant every element of ``node`` holds (in ``node``'s dtype), or
``NotUniform`` saying which producer or writer stops the proof. Uniform are:

- factories with a constant fill: ``ones``/``zeros``/``full`` and their ``_like`` and ``new_*`` forms;
- views of a uniform tensor (their elements are some of its elements), clones, casts, ``~``,
  ``logical_not``/``neg``/``abs``, and ``& | ^``/``logical_and/or/xor``/``eq``/``ne`` of uniform tensors
  and Python constants: computed by torch itself on one element, so promotion and rounding are
  eager's (each operand keeps whether it is 0-dim, which is what promotion looks at);
- ``any()``/``all()`` (whole or along dims): ``any`` of a false constant is False and ``all`` of a true
  one is True for any number of elements; otherwise the reduced count must be proved > 0 (then the
  constant's truth) or proved 0 (an empty ``all()`` is True, an empty ``any()`` False).

A tensor's value at a point of the graph is its producer's value changed by every write into it or
anything sharing its memory between the two (``fx.aliasing``): each must be ``t[key] = c`` or
``t.fill_(c)``/``t.zero_()`` on the tensor itself with a constant (or uniform) ``c``, where ``key``
provably covers the whole tensor (each axis a slice with step 1, start 0 and stop proved >= the size
by the shape environment, ``statically_known_true``: no guard is added). Any other writer (a partial
slice, a write through a view, an op that may write: an in-place op, ``out=``, a module call, a
higher-order op) is refused, as are graph inputs, parameters, random and data ops.

In a frame compiled with sonic, ``shape_items``' conditional-jump hook (``POP_JUMP_*_IF_TRUE/FALSE``,
not those that keep the value on the stack) asks ``truth`` when the tensor is not a
size-only value: a proved uniform one-element tensor is given that constant, so the branch is taken at trace time as
eager takes it, for every input the graph's guards admit.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from moe_inductor.fx.aliasing import aliases, is_view_of
from moe_inductor.fx.nodes import is_mutation, node_order
from moe_inductor.fx.shapes import example_value
from moe_inductor.fx.targets import CAST_METHODS, INPLACE_FLAG_FUNCTIONS


class NotUniform(Exception):
    """The tensor is not proved to hold one constant in every element (the message says why)."""


#: factory -> (position of the fill argument or the constant fill, keyword of the fill)
_FILLS = {torch.ones: (1, None), torch.zeros: (0, None), torch.ones_like: (1, None), torch.zeros_like: (0, None),
          torch.full: ("arg", 1), torch.full_like: ("arg", 1), "new_ones": (1, None), "new_zeros": (0, None),
          "new_full": ("arg", 2)}
_FACTORY_KWARGS = {"dtype", "device", "layout", "pin_memory", "requires_grad", "memory_format", "fill_value", "size"}
_UNARY = {operator.invert: torch.bitwise_not, "__invert__": torch.bitwise_not, "bitwise_not": torch.bitwise_not,
          torch.bitwise_not: torch.bitwise_not, "logical_not": torch.logical_not, torch.logical_not: torch.logical_not,
          operator.neg: torch.neg, "neg": torch.neg, "__neg__": torch.neg, torch.neg: torch.neg, "abs": torch.abs,
          torch.abs: torch.abs, "clone": torch.clone, torch.clone: torch.clone}
_BINARY = {operator.and_: torch.bitwise_and, "__and__": torch.bitwise_and, "bitwise_and": torch.bitwise_and,
           operator.or_: torch.bitwise_or, "__or__": torch.bitwise_or, "bitwise_or": torch.bitwise_or,
           operator.xor: torch.bitwise_xor, "__xor__": torch.bitwise_xor, "bitwise_xor": torch.bitwise_xor,
           "logical_and": torch.logical_and, torch.logical_and: torch.logical_and, "logical_or": torch.logical_or,
           torch.logical_or: torch.logical_or, "logical_xor": torch.logical_xor, torch.logical_xor: torch.logical_xor,
           operator.eq: torch.eq, "eq": torch.eq, torch.eq: torch.eq, operator.ne: torch.ne, "ne": torch.ne,
           torch.ne: torch.ne, "__eq__": torch.eq, "__ne__": torch.ne}  # t.__eq__(u): how torch 2.11 records ==
_REDUCTIONS = {"any": "any", torch.any: "any", "all": "all", torch.all: "all"}


def _describe(node) -> str:
    target = getattr(node.target, "__name__", node.target)
    return f"`{node.name} = {target}(...)`"


def _fake(node) -> torch.Tensor:
    v = example_value(node) if isinstance(node, fx.Node) else None
    if not isinstance(v, torch.Tensor) or v.is_complex() or v.is_quantized:
        raise NotUniform(f"{node} is not a real tensor of the graph")
    return v


def _known(fact) -> bool:
    """A size fact (bool or SymBool) the shape environment proves, adding no guard."""
    if isinstance(fact, bool):
        return fact
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    try:
        return bool(statically_known_true(fact))
    except Exception:  # not decidable here: not proved
        return False


def _scalar(v):
    """A Python constant argument (or a graph int that is a plain int), else raise."""
    v = example_value(v) if isinstance(v, fx.Node) else v
    if isinstance(v, (bool, int, float)):
        return v
    raise NotUniform(f"{v!r} is not a constant")


def _defined_cast(fill: torch.Tensor, dtype: torch.dtype) -> None:
    """A float converted to an integer type is defined (the same on every device) only when finite and
    in the type's range."""
    if fill.is_floating_point() and not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool):
        v, info = float(fill.reshape(-1)[0]), torch.iinfo(dtype)
        if not (info.min <= v <= info.max):
            raise NotUniform(f"the constant {v} has no defined value as {dtype}")


def _one(fake: torch.Tensor, fill) -> torch.Tensor:
    """The one-element stand-in of ``fake`` holding ``fill`` (0-dim when ``fake`` is), converted as
    ``copy_``/``fill_`` convert."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():
        try:
            out = torch.empty(() if fake.dim() == 0 else (1,), dtype=fake.dtype)
            if not isinstance(fill, torch.Tensor):
                return out.fill_(fill)
            _defined_cast(fill, fake.dtype)
            return out.copy_(fill.reshape(out.shape))
        except (RuntimeError, TypeError, OverflowError) as e:  # as eager would fail: not answered
            raise NotUniform(f"the constant {fill} does not convert to {fake.dtype}: {e}") from None


def _compute(fn, node, *operands) -> torch.Tensor:
    """``fn`` of one-element stand-ins, checked to have ``node``'s dtype."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():
        try:
            out = fn(*operands)
        except (RuntimeError, TypeError) as e:
            raise NotUniform(f"{_describe(node)} fails on its constants: {e}") from None
    if out.dtype != _fake(node).dtype:
        raise NotUniform(f"{_describe(node)}: its dtype is not the one computed on one element")
    return _one(_fake(node), out)


def _operand(a, at: fx.Node, depth: int):
    """A binary op's operand: a uniform tensor's stand-in or a Python constant."""
    if isinstance(a, fx.Node) and isinstance(example_value(a), torch.Tensor):
        return _value_at(a, at, depth + 1)
    return _scalar(a)


def _fill_of(node: fx.Node):
    spec = _FILLS[node.target]
    if set(node.kwargs) - _FACTORY_KWARGS or "out" in node.kwargs:
        raise NotUniform(f"{_describe(node)} has arguments other than size/dtype/device")
    if spec[0] != "arg":
        return spec[0]
    pos = spec[1]
    return _scalar(node.args[pos] if len(node.args) > pos else node.kwargs.get("fill_value"))


def _reduced_count(node: fx.Node, src: torch.Tensor):
    """How many elements each output element of ``any``/``all`` reduces (a size expression)."""
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if set(node.kwargs) - {"dim", "keepdim"}:
        raise NotUniform(f"{_describe(node)} has arguments other than dim/keepdim")
    if dim is None:
        return src.numel()
    dims = dim if isinstance(dim, (tuple, list)) else (dim,)
    count = 1
    for d in dims:
        count = count * src.shape[_scalar(d)]
    return count


def _reduce(node: fx.Node, depth: int) -> torch.Tensor:
    src = _fake(node.args[0])
    c = bool(_value_at(node.args[0], node, depth + 1).reshape(-1)[0])
    kind = _REDUCTIONS[node.target]
    if (kind == "any" and not c) or (kind == "all" and c):
        return _one(_fake(node), c)  # for any number of elements, none included
    count = _reduced_count(node, src)
    if _known(count == 0):
        return _one(_fake(node), kind == "all")  # nothing reduced: all() True, any() False
    if not _known(count > 0):
        raise NotUniform(f"{_describe(node)}: that it reduces at least one element is not proved "
                         f"(an empty {kind}() is {kind == 'all'})")
    return _one(_fake(node), c)


def _produced(node: fx.Node, depth: int) -> torch.Tensor:
    """The stand-in of ``node``'s value just after it runs."""
    t, args = node.target, node.args
    if t in _FILLS:
        return _one(_fake(node), _fill_of(node))
    if t in _REDUCTIONS and args:
        return _reduce(node, depth)
    if node.kwargs and not (node.op == "call_method" and t in CAST_METHODS):
        raise NotUniform(f"{_describe(node)} has keyword arguments")
    if t in _UNARY and len(args) == 1:
        return _compute(_UNARY[t], node, _value_at(args[0], node, depth + 1))
    if t in _BINARY and len(args) == 2:
        a, b = (_operand(x, node, depth) for x in args)
        if not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor):
            raise NotUniform(f"{_describe(node)} has no tensor operand")
        return _compute(_BINARY[t], node, *((a, b) if isinstance(a, torch.Tensor) else (b, a)))  # commutative
    if node.op == "call_method" and t in CAST_METHODS and args:  # a cast that changes the dtype: a copy
        return _one(_fake(node), _value_at(args[0], node, depth + 1))
    raise NotUniform(f"{_describe(node)} is not an op whose result is proved uniform")


def _covers(key, fake: torch.Tensor) -> bool:
    """``t[key]`` is the whole of ``t``: per axis a slice of step 1 from 0 to at least the size."""
    parts = list(key) if isinstance(key, tuple) else [key]
    if sum(p is Ellipsis for p in parts) > 1 or any(p is not Ellipsis and not isinstance(p, slice) for p in parts):
        return False
    if Ellipsis in parts:
        i = parts.index(Ellipsis)
        parts[i:i + 1] = [slice(None)] * (fake.dim() - len(parts) + 1)
    if len(parts) > fake.dim():
        return False
    for p, size in zip(parts, fake.shape):
        start, stop, step = (example_value(x) if isinstance(x, fx.Node) else x for x in (p.start, p.stop, p.step))
        if not (step is None or (type(step) is int and step == 1)) or not (start is None or (type(start) is int
                                                                                             and start == 0)):
            return False
        if stop is not None and (isinstance(stop, bool) or not isinstance(stop, (int, torch.SymInt))
                                 or not _known(stop >= size)):
            return False
    return True


def _schema_writes(user: fx.Node, alias: fx.Node) -> bool:
    """An aten/custom op whose schema (any overload's) writes an argument that ``alias`` is."""
    t = user.target
    if isinstance(t, torch._ops.OpOverloadPacket):
        schemas = [getattr(t, o)._schema for o in t.overloads()]
    else:
        schemas = [t._schema] if isinstance(t, torch._ops.OpOverload) else []
    for schema in schemas:
        given = list(zip(schema.arguments, user.args)) + [(a, user.kwargs[a.name]) for a in schema.arguments
                                                           if a.name in user.kwargs]
        if any(v is alias and a.alias_info is not None and a.alias_info.is_write for a, v in given):
            return True
    return False


def _may_write(user: fx.Node, alias: fx.Node) -> bool:
    """``user`` may write into ``alias`` (an in-place op, ``out=``, an ``inplace=`` flag, a module or
    higher-order op call, an op whose schema writes it)."""
    if user.op == "call_module" or isinstance(user.target, torch._ops.HigherOrderOperator) \
            or user.target in INPLACE_FLAG_FUNCTIONS or _schema_writes(user, alias):
        return True
    outs: list = []
    fx.node.map_arg(user.kwargs.get("out"), outs.append)
    if is_mutation(user, alias) or alias in outs:
        return True
    name = getattr(user.target, "__name__", "") if user.op == "call_function" else ""
    return bool(user.args) and user.args[0] is alias and name.endswith("_") and not name.startswith("_")


def _written(node: fx.Node, rep: torch.Tensor, write: fx.Node, depth: int) -> torch.Tensor:
    """The stand-in after ``write``, a constant write over the whole of ``node``, else raise."""
    fake, t, args = _fake(node), write.target, write.args
    if args[0] is not node:
        raise NotUniform(f"{_describe(write)} writes {node.name} through a view or an in-place op's result")
    if t is operator.setitem and len(args) == 3 and not write.kwargs:
        if not _covers(args[1], fake):
            raise NotUniform(f"{_describe(write)} writes a part of {node.name} not proved to be all of it")
        value = args[2]
    elif write.op == "call_method" and t in ("fill_", "zero_") and len(args) == (2 if t == "fill_" else 1) \
            and not write.kwargs:
        value = args[1] if t == "fill_" else 0
    else:
        raise NotUniform(f"{_describe(write)} writes {node.name} (not a constant written over all of it)")
    if isinstance(value, fx.Node) and isinstance(example_value(value), torch.Tensor):
        value = _value_at(value, write, depth + 1)
    return _one(fake, value if isinstance(value, torch.Tensor) else _scalar(value))


def _sharing(node: fx.Node) -> set:
    """``node``'s aliases (``fx.aliasing.aliases``) and the results of in-place ops on any of them
    (each is its receiver: ``m.fill_(0)[0] = 1`` writes ``m``), and their aliases, to a fixed point."""
    found, stack = set(), [node]
    while stack:
        for a in aliases(stack.pop()) - found:
            found.add(a)
            stack += [u for u in a.users if is_mutation(u, a) and u not in found]
    return found


def _value_at(node, at, depth: int = 0) -> torch.Tensor:
    """The stand-in of ``node``'s value just before ``at`` runs (``at`` None: now, at the graph's end)."""
    if depth > 48:
        raise NotUniform("too many producers")
    _fake(node)
    if node.op not in ("call_function", "call_method"):
        raise NotUniform(f"{node.name} is a graph input or attribute (its values are data)")
    if node.args and isinstance(node.args[0], fx.Node) and (is_view_of(node, node.args[0])
                                                             or is_mutation(node, node.args[0])):
        if _fake(node).dtype != _fake(node.args[0]).dtype:
            raise NotUniform(f"{_describe(node)} reinterprets its base's bytes")
        # a view, or an in-place op's result (its receiver): the base's value, with every write since
        return _one(_fake(node), _value_at(node.args[0], at, depth + 1))
    rep = _produced(node, depth)
    order = node_order(node.graph)
    lo, hi = order[node], order[at] if at is not None else len(order)
    writes = {u for a in _sharing(node) for u in a.users if lo < order[u] < hi and _may_write(u, a)}
    for w in sorted(writes, key=order.__getitem__):
        rep = _written(node, rep, w, depth)
    return rep


def value(node: fx.Node) -> torch.Tensor:
    """A one-element CPU tensor holding the constant every element of ``node`` holds now (in its
    dtype; 0-dim when ``node`` is); raises NotUniform saying which producer or writer stops it."""
    return _value_at(node, None)


def truth(node: fx.Node) -> bool:
    """``bool(node)`` as eager computes it, for a uniform tensor proved to have one element."""
    fake = _fake(node)
    if not _known(fake.numel() == 1):
        raise NotUniform(f"{_describe(node)} is not proved to have exactly one element")
    return bool(value(node).reshape(-1)[0])


# -- Dynamo's conditional jumps on a tensor, in sonic frames ----------------------------------------

#: jumps that pop their condition (those that keep it on the stack, ``x.any() or y``, would leave a
#: constant where the program has a tensor)
