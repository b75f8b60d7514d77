"""``.item()`` of a tensor computed only from sizes and constants, read at trace time in sonic frames.

Code that pads or all-reduces a token count writes it as a one-element tensor and reads it back:
fairseq's ``MOELayer`` computes ``int(all_reduce_max(n_tokens * torch.ones((1,), dtype=torch.long,
device=d)).item())`` where ``n_tokens`` is a size. Dynamo breaks the graph at ``.item()`` (without
``capture_scalar_outputs``), or makes it an unbacked symbol (with it) that the padding and the
capacity arithmetic after it then guard on: either way the MoE block is split or not traced.

In a frame compiled with sonic (scoped by ``moe_inductor.dynamo.dynamo_scope``: installed between
Dynamo's compile-start and compile-end callbacks of that frame, and only acting while the innermost
frame being traced is a sonic one), ``Tensor.item()`` on a tensor whose value the graph computes
only from sizes (SymInts Dynamo tracks) and Python integers is answered at trace time with that
value as a size expression (``s0*s1``, or a plain int), which Dynamo guards on like any size. It
is the value eager reads: every tensor on the way is a one-element ``int64`` tensor made by
``ones``/``zeros``/``full``/``tensor`` of integer constants or sizes, combined by integer ``+ - *
//``, negation, ``maximum``/``minimum`` and value-keeping views, which on int64 compute exactly
Python's integer arithmetic (sizes are far below 2**63). Anything else (a float, an input tensor,
a random or data-dependent op, another reader of nothing) is left to Dynamo unchanged, with
``reasons()`` saying which producer stopped the proof.

``bincount(ids, minlength=M)`` (no weights) whose ids are proved in [0, M) from the graph (each a
position along an axis of static size at most M: the index output of ``topk``/``sort``/``max``/
``min`` with a dim, ``argmax``/``argmin`` with a dim, through views, slices and copies) has length
exactly M, which eager computes too; Dynamo only knows ``len >= M`` (an unbacked size), so a
``.tolist()`` of the counts (LLaMA-MoE's split sizes) fails to trace. In sonic frames the length is
told to Dynamo's shape environment (``torch._check(len == M)``, kept as a runtime assert that the
proof says always holds), so the counts are M symbolic sizes ``moe_inductor.dynamo.host_splits`` reads.

The same values are answered where Python reads a tensor otherwise, in sonic frames only: a branch
on it (``if capacity < min_capacity:``, ``if t:``: Dynamo's conditional jumps, wrapped in each
instruction translator's dispatch table while installed, get the truth as a constant, a symbolic
one guarded as Dynamo guards ``if size < 4``), ``__index__``/``int()``, and an argument that every
overload of a torch op takes as an ``int`` (``topk(k=t)``, ``one_hot(num_classes=t)``: torch reads
it by ``__index__`` there; nowhere else is a tensor argument replaced, since type promotion of a 0-d
tensor and of a Python number differ). Values with floats (DeepSpeed's ``ceil((S / E) *
torch.tensor(factor))``) are folded by ``moe_inductor.dynamo.trace_values``, exactly as eager computes
them, with the sizes involved specialized (its docstring says why). Anything not proved keeps
Dynamo's graph break, ``reasons()`` saying which producer stopped the proof.

``F.one_hot(ids, n)`` with a tensor ``n`` proved ``>= L`` (a clamp with minimum L: lucidrains'
``safe_one_hot``) and Python ``max(t, size)`` of a one-element integer tensor: ``moe_inductor.dynamo.one_hot_width``.
"""
from __future__ import annotations

import dataclasses
import logging
import operator
import threading
import types

import torch

log = logging.getLogger("moe_inductor")

_lock = threading.RLock()
_depth = 0
_originals: dict = {}  # attribute -> Dynamo's own function, while installed
_reasons: list = []  # (seq, where, why) of the host reads left to Dynamo, newest last (bounded)
_seq = 0

_FACTORIES = {torch.ones: 1, torch.zeros: 0}
_BINARY = {operator.mul: operator.mul, operator.add: operator.add, operator.sub: operator.sub,
           operator.floordiv: operator.floordiv, torch.mul: operator.mul, torch.add: operator.add,
           torch.sub: operator.sub, torch.floor_divide: operator.floordiv, torch.maximum: torch.sym_max, torch.minimum: torch.sym_min,
           "mul": operator.mul, "add": operator.add, "sub": operator.sub, "floor_divide": operator.floordiv,
           "__mul__": operator.mul, "__add__": operator.add, "__sub__": operator.sub, "__rmul__": operator.mul,
           "__radd__": operator.add, "__floordiv__": operator.floordiv, "maximum": torch.sym_max,
           "minimum": torch.sym_min}
_KEEP = {"view", "reshape", "flatten", "squeeze", "unsqueeze", "contiguous", "clone", "long", "to", "detach",
         "__getitem__", torch.flatten, torch.squeeze, torch.unsqueeze, torch.clone, torch.reshape, operator.getitem}
_FACTORY_KWARGS = {"dtype", "device", "layout", "pin_memory", "requires_grad"}


class NotShapeOnly(Exception):
    """The tensor's value is not proved a function of sizes and constants (the message says why)."""


def _describe(node) -> str:
    target = getattr(node.target, "__name__", node.target)
    return f"{node.name} = {target}({', '.join(str(a) for a in node.args)})"


def _one_long(node) -> None:
    v = node.meta.get("example_value")
    # static sizes only: a symbolic numel would be compared through a guard
    if not isinstance(v, torch.Tensor) or v.dtype != torch.int64 or not all(type(d) is int for d in v.shape) \
            or v.numel() != 1:
        raise NotShapeOnly(f"`{_describe(node)}` is not a one-element int64 tensor")


def _scalar(a, depth: int):
    """(value, proxy-or-int) of an argument: a Python int, a SymInt node, or a tensor node."""
    if isinstance(a, bool) or (not isinstance(a, (int, torch.fx.Node))):
        raise NotShapeOnly(f"argument {a!r} is not an integer or a graph value")
    if isinstance(a, int):
        return a, a
    v = a.meta.get("example_value")
    if isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool):
        return v, a
    return evaluate(a, depth + 1)


def _combine(fn, pairs):
    """Apply ``fn`` to the values; the graph node computing it only when a value is symbolic."""
    values = [p[0] for p in pairs]
    out = fn(*values)
    if all(isinstance(p[1], int) for p in pairs):
        return out, int(out)
    return out, (fn, [p[1] for p in pairs])


def evaluate(node, depth: int = 0):
    """(value, recipe) of the one-element int64 tensor ``node``: its value (int or SymInt) and how to
    compute it from graph scalars (an int, a Node, or ``(fn, [recipes])``). Raises NotShapeOnly."""
    if depth > 32:
        raise NotShapeOnly("too many producers")
    _one_long(node)
    target = node.target if node.op == "call_function" else node.target if node.op == "call_method" else None
    args, kwargs = list(node.args), dict(node.kwargs)
    if target is None:
        raise NotShapeOnly(f"`{_describe(node)}` is a graph input or attribute")
    if target in _FACTORIES or target is torch.full or target is torch.tensor:
        if set(kwargs) - _FACTORY_KWARGS:
            raise NotShapeOnly(f"`{_describe(node)}` has arguments other than dtype/device")
        if target in _FACTORIES:
            return _FACTORIES[target], _FACTORIES[target]
        fill = args[1] if target is torch.full else args[0]
        while target is torch.tensor and isinstance(fill, (list, tuple)) and len(fill) == 1:
            fill = fill[0]
        return _scalar(fill, depth)
    if target in _BINARY and len(args) == 2 and not kwargs:
        return _combine(_BINARY[target], [_scalar(a, depth) for a in args])
    if target in (operator.neg, torch.neg, "neg", "__neg__") and len(args) == 1 and not kwargs:
        return _combine(operator.neg, [_scalar(args[0], depth)])
    if target in _KEEP and args and isinstance(args[0], torch.fx.Node):
        _one_long(args[0])  # int64 in and out, one element: the value is kept
        return evaluate(args[0], depth + 1)
    raise NotShapeOnly(f"`{_describe(node)}` is not a size-only integer op")


def recipe_proxy(tx, recipe):
    """A proxy (or int) computing ``recipe`` in Dynamo's graph."""
    if isinstance(recipe, int):
        return recipe
    if isinstance(recipe, torch.fx.Node):
        return torch.fx.Proxy(recipe, tx.output.current_tracer)
    fn, parts = recipe
    return tx.output.create_proxy("call_function", fn, tuple(recipe_proxy(tx, p) for p in parts), {})


def where(tx) -> str:
    try:
        return f"{tx.f_code.co_filename}:{tx.lineno}"
    except Exception:
        return "?"


def note(where: str, why: str) -> None:
    global _seq
    with _lock:
        _seq += 1
        _reasons.append((_seq, where, why))
        del _reasons[:-50]


def mark() -> int:
    """A position in the notes: ``reasons(since=mark())`` gives only the later ones."""
    with _lock:
        return _seq


def reasons(since: int = 0) -> list:
    """(file:line, why) of the recent host reads in sonic frames left to Dynamo (an ``.item()`` not
    proved a function of sizes, a ``bincount`` whose ids are not proved below minlength)."""
    with _lock:
        return [(where, why) for seq, where, why in _reasons if seq > since]


def _answer(tx, tensor_var, kind: str = "item"):
    """A VariableTracker holding the value of ``tensor_var.item()`` (``kind`` "item"), of its
    ``__index__``/``int()`` ("index", "int") or of its truth ("bool"), or None (left to Dynamo)."""
    from torch._dynamo.variables import ConstantVariable
    from torch._dynamo.variables.tensor import SymNodeVariable

    if getattr(tx, "export", False) or not in_sonic_frame():
        return None
    node = tensor_var.as_proxy().node
    try:
        if kind == "bool":
            return ConstantVariable.create(bool(_symbolic_truth(node)))  # bool() guards a symbolic truth
        value, recipe = evaluate(node)
    except NotShapeOnly as e:
        return _folded(tx, node, kind, str(e))
    if isinstance(recipe, int):
        log.debug("sonic: .item() at %s read at trace time: %s", where(tx), recipe)
        return ConstantVariable.create(recipe)
    proxy = recipe_proxy(tx, recipe)
    log.debug("sonic: .item() at %s read at trace time as the size %s", where(tx), value)
    return SymNodeVariable.create(tx, proxy, value)


_COMPARE = {k: getattr(operator, n) for n in ("lt", "le", "gt", "ge", "eq", "ne")
            for k in (getattr(operator, n), getattr(torch, n), n, f"__{n}__")}


def _symbolic_truth(node):
    """The truth of a one-element tensor from the integer path: a comparison of two size-only int64
    values (a SymBool when symbolic) or ``value != 0``. Raises NotShapeOnly."""
    v = node.meta.get("example_value")
    if isinstance(v, torch.Tensor) and v.dtype == torch.bool and v.numel() == 1 and node.op in (
            "call_function", "call_method") and node.target in _COMPARE and len(node.args) == 2 and not node.kwargs:
        a, b = (_scalar(x, 0)[0] for x in node.args)
        return _COMPARE[node.target](a, b)
    return evaluate(node)[0] != 0


_KINDS = {"item": ".item()", "index": "an int argument", "int": "int()", "bool": "a branch"}


def _folded(tx, node, kind: str, int_reason: str):
    """The answer from ``trace_values.fold`` (floats included; symbolic sizes specialized), or None."""
    from torch._dynamo.variables import ConstantVariable

    from . import trace_values

    try:
        value, sizes = trace_values.fold(node)
        if kind in ("index", "int") and (value.is_floating_point() if kind == "index" else False):
            raise trace_values.NotFoldable(f"`{_describe(node)}` is a float: not an index")
    except trace_values.NotFoldable as e:
        note(where(tx), f"{_KINDS[kind]} left to Dynamo: {int_reason}; {e}")
        return None
    trace_values.specialize(sizes)
    out = bool(value.item()) if kind == "bool" else int(value.item()) if kind in ("index", "int") else value.item()
    log.debug("sonic: %s of `%s` at %s folded at trace time: %s (sizes %s specialized)", kind, _describe(node),
              where(tx), out, sizes)
    return ConstantVariable.create(out)


#: whether the innermost frame Dynamo is tracing is a sonic one (given by ``enter``: dynamo_scope
#: owns the frame stack, and importing it here would make an import cycle)
_in_sonic_frame = [lambda: False]


def in_sonic_frame() -> bool:
    return _in_sonic_frame[0]()


# -- bincount(ids, minlength=M) with every id proved below M: its length is M ------------------------

#: ops whose index output (``[1]``) is a position along ``dim`` of their input
_INDEX_PAIRS = {"topk": ("dim", 2, -1), torch.topk: ("dim", 2, -1), "sort": ("dim", 1, -1),
                torch.sort: ("dim", 1, -1), "max": ("dim", 1, None), torch.max: ("dim", 1, None),
                "min": ("dim", 1, None), torch.min: ("dim", 1, None)}
_INDEX_OPS = {"argmax": ("dim", 1, None), torch.argmax: ("dim", 1, None), "argmin": ("dim", 1, None),
              torch.argmin: ("dim", 1, None)}
#: ops that keep a subset of their first argument's values (views, slices, copies)
_SUBSET = {"flatten", "view", "reshape", "contiguous", "clone", "squeeze", "unsqueeze", "t", "permute",
           "transpose", "long", "detach", torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze,
           torch.t, torch.permute, torch.transpose, torch.clone}


def _dim_size(producer, spec):
    """The static size of the axis ``producer`` (topk/sort/max/min/argmax/argmin) indexes, or None."""
    kw, pos, default = spec
    dim = producer.kwargs.get(kw, producer.args[pos] if len(producer.args) > pos else default)
    x = producer.args[0].meta.get("example_value") if isinstance(producer.args[0], torch.fx.Node) else None
    if not isinstance(dim, int) or not isinstance(x, torch.Tensor) or not x.dim():
        return None
    size = x.shape[dim]
    return size if type(size) is int else None


def ids_bound(node, depth: int = 0):
    """A static bound B with every value of the int64 tensor ``node`` in [0, B), proved from its
    producers (positions along an axis of static size), else None."""
    v = node.meta.get("example_value") if isinstance(node, torch.fx.Node) else None
    if depth > 16 or not isinstance(v, torch.Tensor) or v.dtype != torch.int64 or node.op not in (
            "call_function", "call_method"):
        return None
    t = node.target
    if t in _INDEX_OPS:
        return _dim_size(node, _INDEX_OPS[t])
    if t is operator.getitem and isinstance(node.args[0], torch.fx.Node) and node.args[1] == 1 \
            and not isinstance(node.args[0].meta.get("example_value"), torch.Tensor):
        producer = node.args[0]
        spec = _INDEX_PAIRS.get(producer.target) if producer.op in ("call_function", "call_method") else None
        return _dim_size(producer, spec) if spec is not None else None
    if t in _SUBSET or t is operator.getitem:  # a view, copy or slice of the ids: a subset of their values
        return ids_bound(node.args[0], depth + 1)
    return None


def _pin_bincount(tx, out, ids, kwargs) -> None:
    """``out = bincount(ids, minlength=M)`` (no weights) with ids proved in [0, M): its length is M,
    told to the shape environment (a runtime assert Dynamo keeps), so that ``.tolist()`` has M sizes."""
    try:
        minlength = kwargs.get("minlength")
        m = minlength.as_python_constant() if minlength is not None else None
        node = ids.as_proxy().node
        fake = out.as_proxy().node.meta.get("example_value")
        if not isinstance(m, int) or set(kwargs) - {"minlength"} or not isinstance(fake, torch.Tensor) \
                or not isinstance(fake.shape[0], torch.SymInt):
            return
        bound = ids_bound(node)
        if bound is None or bound > m:
            note(where(tx), f"bincount of `{_describe(node)}`: no id proved below minlength {m}; its length "
                              f"is known only from the data")
            return
        torch._check(fake.shape[0] == m)
        log.debug("sonic: bincount at %s has length %d (ids below %d)", where(tx), m, bound)
    except Exception as e:  # never fail a compile over this
        log.debug("sonic: bincount length not pinned: %s", e)


def _tensor_call_method(self, tx, name, args, kwargs):
    if in_sonic_frame() and isinstance(getattr(torch.Tensor, str(name), None), types.MethodDescriptorType):
        args, kwargs = _int_arguments(tx, name, True, args, kwargs)  # a C method: parsed by the op's schema
    out = _originals["call_method"](self, tx, name, args, kwargs)
    if name == "bincount" and not args and in_sonic_frame():
        _pin_bincount(tx, out, self, kwargs)
    return out


def _int_arguments(tx, name, method: bool, args, kwargs):
    """``args``/``kwargs`` with each size-only tensor that torch reads as an int (``topk(k=t)``,
    ``one_hot(num_classes=t)``: every overload of the op takes an int there, so torch calls
    ``__index__``) replaced by its value, read at trace time (``_answer``)."""
    from torch._dynamo.variables.tensor import TensorVariable

    from . import trace_values

    if not isinstance(name, str) or not any(isinstance(a, TensorVariable) for a in (*args, *kwargs.values())):
        return args, kwargs
    try:
        positions, names = trace_values.int_params(name, method)
        swap = lambda i, a: _answer(tx, a, "index") if isinstance(a, TensorVariable) and i in positions else None
        new_args = [swap(i, a) or a for i, a in enumerate(args)]
        new_kwargs = {k: (_answer(tx, a, "index") if isinstance(a, TensorVariable) and k in names else None) or a
                      for k, a in kwargs.items()}
        return new_args, new_kwargs
    except Exception as e:  # never fail a compile over this: Dynamo's own handling follows
        log.debug("sonic: int arguments of %s not read: %s", name, e)
        return args, kwargs


def _torch_call_function(self, tx, args, kwargs):
    if "requires_grad" in kwargs and in_sonic_frame():
        try:
            from moe_inductor.dynamo import grad_leaves

            dropped, why = grad_leaves.drop_flag(tx, getattr(self, "value", None), kwargs)
            if why is not None:
                note(where(tx), why)
            kwargs = dropped if dropped is not None else kwargs  # {} when the flag was the only keyword
        except Exception as e:  # never fail a compile over this: Dynamo's own handling follows
            log.debug("sonic: requires_grad creation check failed: %s", e)
    if in_sonic_frame():
        fn = getattr(self, "value", None)
        if isinstance(fn, types.BuiltinFunctionType):  # a C binding: its arguments parsed by the op's schema
            args, kwargs = _int_arguments(tx, fn.__name__, False, args, kwargs)
        if len(args) == 2 and not kwargs:  # one_hot(ids, n) with n not size-only: a clamp proved >= L
            found = _traced_one_hot(self, tx, args)
            if found is not None:
                return found
    out = _originals["call_function"](self, tx, args, kwargs)
    if getattr(self, "value", None) is torch.bincount and len(args) == 1 and in_sonic_frame():
        _pin_bincount(tx, out, args[0], kwargs)
    return out


def _traced_one_hot(fn_var, tx, args):
    """``one_hot(ids, n)`` with a tensor ``n`` proved >= its clamp's minimum: ``one_hot_width``."""
    from torch._dynamo.variables.tensor import TensorVariable

    from . import one_hot_width

    if not one_hot_width.is_one_hot(getattr(fn_var, "value", None)) or not all(
            isinstance(a, TensorVariable) for a in args):
        return None
    try:
        return one_hot_width.trace_one_hot(tx, args[0], args[1], _unbacked_item)
    except Exception as e:  # never fail a compile over this: Dynamo's own handling follows
        log.debug("sonic: one_hot with a tensor width left to Dynamo: %s", e)
        return None


def _unbacked_item(tensor_var):
    """``tensor_var.item()`` as an unbacked size (``capture_scalar_outputs`` for this one read)."""
    from torch._dynamo.variables.tensor import SymNodeVariable

    tx = _current_tx()
    shape_env = tx.output.shape_env
    # fake tensors read the frame's own shape environment: its graph now holds a scalar read, which
    # the backend's trace of this graph must allow too (Dynamo's config, read by every other
    # ``.item()`` of the frame, is changed for this one read only)
    if not shape_env.allow_scalar_outputs:
        shape_env.settings = dataclasses.replace(shape_env.settings, allow_scalar_outputs=True)
    _PASSTHROUGH.append(1)
    try:
        with torch._dynamo.config.patch(capture_scalar_outputs=True):
            out = tensor_var.call_method(tx, "item", [], {})
    finally:
        _PASSTHROUGH.pop()
    return out if isinstance(out, SymNodeVariable) else None


#: non-empty while ``_unbacked_item`` reads an item through Dynamo (the trace-time answer is skipped)
_PASSTHROUGH: list = []


def _current_tx():
    from torch._dynamo.symbolic_convert import InstructionTranslator

    return InstructionTranslator.current_tx()


def _method_item(self, tx, *args, **kwargs):
    if not args and not kwargs and not _PASSTHROUGH:
        try:
            found = _answer(tx, self)
        except Exception as e:  # never fail a compile over this: Dynamo's own handling follows
            log.debug("sonic: trace-time .item() failed: %s", e)
            found = None
        if found is not None:
            return found
    return _originals["method_item"](self, tx, *args, **kwargs)


def _converter(kind: str):
    """``TensorVariable.nb_index_impl`` / ``nb_int_impl`` answered at trace time when proved."""
    attr = f"nb_{kind}_impl"

    def convert(self, tx):
        try:
            found = _answer(tx, self, kind)
        except Exception as e:  # never fail a compile over this: Dynamo's own handling follows
            log.debug("sonic: trace-time %s failed: %s", attr, e)
            found = None
        return found if found is not None else _originals[attr](self, tx)

    return attr, convert


def _uniform_branch(tx, value):
    """A ConstantVariable of ``bool(value)`` for a tensor proved to hold one constant in its one element
    (``uniform_values.truth``), or None with the reason noted."""
    from torch._dynamo.variables import ConstantVariable
    from torch._dynamo.variables.tensor import TensorVariable

    from moe_inductor.dynamo import uniform_values

    if type(value) is not TensorVariable or getattr(tx, "export", False):
        return None
    try:
        found = uniform_values.truth(value.as_proxy().node)
    except uniform_values.NotUniform as e:
        note(where(tx), f"branch on a tensor: {e}")
        return None
    log.debug("sonic: branch on a uniform tensor at %s taken at trace time: %s", where(tx), found)
    return ConstantVariable.create(found)


def _jump(original):
    """Dynamo's conditional jump ``original`` with a one-element tensor on the stack answered at trace time
    (its truth read when proved, then Dynamo's own jump on that constant)."""

    def jump(self, inst):
        from torch._dynamo.variables.tensor import TensorVariable

        value = self.stack[-1] if self.stack else None
        if isinstance(value, TensorVariable) and in_sonic_frame():
            try:
                found = _answer(self, value, "bool")
            except Exception as e:  # never fail a compile over this: Dynamo's own handling follows
                log.debug("sonic: trace-time branch failed: %s", e)
                found = None
            if found is None:  # not size-only: perhaps a tensor holding one constant (fairseq's padding mask)
                try:
                    found = _uniform_branch(self, value)
                except Exception as e:  # never fail a compile over this
                    log.debug("sonic: trace-time branch on a uniform tensor failed: %s", e)
            if found is not None:
                self.stack[-1] = found
        return original(self, inst)

    return jump


#: the jumps that pop their condition (``if``/``while``/``assert``); not ``JUMP_IF_*_OR_POP``, which keep
#: it as the value of ``t or u`` (the tensor itself, not its truth)
_JUMPS = ("POP_JUMP_IF_FALSE", "POP_JUMP_IF_TRUE", "POP_JUMP_FORWARD_IF_TRUE", "POP_JUMP_BACKWARD_IF_TRUE",
          "POP_JUMP_FORWARD_IF_FALSE", "POP_JUMP_BACKWARD_IF_FALSE")


def _min_max_binary(self, tx, a, b):
    if in_sonic_frame() and a is not None and b is not None:
        from . import one_hot_width

        try:
            found = one_hot_width.trace_max(tx, getattr(self, "fn", None), a, b)
        except Exception as e:  # never fail a compile over this: Dynamo's own handling follows
            log.debug("sonic: max(tensor, size) left to Dynamo: %s", e)
            found = None
        if found is not None:
            return found
    return _originals["_call_min_max_binary"](self, tx, a, b)


def _targets() -> list:
    """(class, attribute, replacement) of the Dynamo methods wrapped while a sonic frame is traced."""
    try:
        from torch._dynamo.variables.builtin import BuiltinVariable
        from torch._dynamo.variables.tensor import TensorVariable
        from torch._dynamo.variables.torch import TorchInGraphFunctionVariable
    except ImportError:
        return []
    out = [(TensorVariable, "method_item", _method_item), (TensorVariable, "call_method", _tensor_call_method),
           (TorchInGraphFunctionVariable, "call_function", _torch_call_function),
           (BuiltinVariable, "_call_min_max_binary", _min_max_binary)]
    if not all(callable(c.__dict__.get(a)) for c, a, _ in out):
        return []
    for kind in ("index", "int"):
        attr, fn = _converter(kind)
        if callable(TensorVariable.__dict__.get(attr)):
            out.append((TensorVariable, attr, fn))
    return out


def _jump_tables(install: bool) -> None:
    """Wrap (or restore) the conditional jumps in the bytecode dispatch table of every Dynamo
    instruction translator class (each class holds its own table, built from its attributes)."""
    import dis

    from torch._dynamo.symbolic_convert import InstructionTranslatorBase

    if not install:
        for table, i, original in _saved_jumps:
            table[i] = original
        _saved_jumps.clear()
        return
    classes, todo = [], [InstructionTranslatorBase]
    while todo:
        cls = todo.pop()
        classes.append(cls)
        todo.extend(cls.__subclasses__())
    for cls in classes:
        table = cls.__dict__.get("dispatch_table")
        for name in _JUMPS:
            i = dis.opmap.get(name)
            original = InstructionTranslatorBase.__dict__.get(name)
            if isinstance(table, list) and i is not None and original is not None and table[i] is original:
                _saved_jumps.append((table, i, original))
                table[i] = _jump(original)


_saved_jumps: list = []  # (dispatch table, opcode, Dynamo's handler) while installed


def enter(is_sonic) -> bool:
    """Install the trace-time ``.item()`` and bincount lengths for the sonic frame being traced
    (``is_sonic()``: whether the innermost frame being traced is sonic's); returns whether it
    did (then ``leave()`` must follow). Nested sonic traces share one installation."""
    global _depth
    targets = _targets()
    if not targets:
        return False
    _in_sonic_frame[0] = is_sonic
    with _lock:
        if _depth == 0:
            for cls, attr, replacement in targets:
                _originals[attr] = cls.__dict__[attr]
                setattr(cls, attr, replacement)
            try:
                _jump_tables(True)
            except Exception as e:  # never fail a compile over this: branches stay Dynamo's
                log.debug("sonic: trace-time branches not installed: %s", e)
        _depth += 1
    return True


def leave() -> None:
    global _depth
    with _lock:
        if _depth == 0:
            return
        _depth -= 1
        if _depth == 0:
            for cls, attr, _ in _targets():
                setattr(cls, attr, _originals.pop(attr))
            _jump_tables(False)
