"""One place for the safety questions every MoE recogniser asks of Dynamo's torch-level graph.

A part recogniser (``patterns/dispatch.py``, ``patterns/experts.py``, ``patterns/combine.py``) and the
composition that proves the parts fit together (``patterns/per_expert.py``, the idiom modules) ask:

- mutation and aliasing: is a tensor written, directly or through a view of it (``view``,
  ``reshape``, ``permute``, basic indexing, ``chunk``, a cast that keeps the dtype ...), between two
  points of the graph (``writes_to``, ``mutated_between``, ``need_unmodified``: defined in
  ``moe_inductor.fx.aliasing``, read here as ``safety.<name>``);
- dtypes: casts that change nothing (``strip_identity``), casts in general (``strip_casts``);
- ``autograd.Function`` calls that are the identity (``identity_function_input``: collectives at
  world size 1 wrapped in a Function, fairscale/DeepSpeed ``_AllToAll``, Megatron's TP regions),
  which ``strip_identity`` reads through; Function calls that are ``F.linear`` in value and gradient
  (``linear_function_operands``: Megatron-Core's parallel linears), read by the experts recogniser;
- symbolic shapes: sizes provably equal (``moe_inductor.fx.shapes.same``, sympy, no guards added);
- is a path pure: nothing random and nothing in place between the gathered tokens and the value an
  expert produces (``need_pure_path``);
- are two index computations the same value (``equivalent``: Dynamo records ``flat == e`` once
  for the gather and once for the write).

Every check that fails raises ``Declined`` with a reason that names the node.
"""
from __future__ import annotations

import operator
from typing import Iterable, Optional

import torch
import torch.fx as fx
import torch.nn.functional as Fn

from .regions import hop_name
from .aliasing import (  # noqa: F401  (the aliasing checks, read as safety.<name> by the recognisers)
    aliases, is_allocation, is_fresh, is_view_of, mutated_between, need_unmodified, writes_to,
)
from .decline import Declined
from .nodes import downstream, is_mutation, node_order
from .shapes import dtype_of, example_value, same, shape_of
from .targets import FLOAT_CAST_DTYPES, LINEAR_FUNCTIONS, MATMUL_FUNCTIONS, MATMUL_METHODS


# --------------------------------------------------------------------------- dtypes and identities

def is_identity_dropout(node: fx.Node) -> bool:
    """F.dropout(h, p, training, inplace) that returns h unchanged: eval mode or p == 0."""
    if node.op != "call_function" or node.target is not Fn.dropout:
        return False
    args = dict(zip(("input", "p", "training", "inplace"), node.args))
    args.update(node.kwargs)
    p, training, inplace = args.get("p", 0.5), args.get("training", True), args.get("inplace", False)
    return inplace is False and (training is False or p == 0 or p == 0.0)


def _same_dtype_cast(node: fx.Node) -> bool:
    if node.op != "call_method" or node.kwargs or not node.args:
        return False
    if node.target == "to" and len(node.args) == 2 and isinstance(node.args[1], torch.dtype):
        return dtype_of(node.args[0]) == node.args[1]
    if node.target == "type_as" and len(node.args) == 2:
        return dtype_of(node.args[0]) == dtype_of(node.args[1])
    return node.target in FLOAT_CAST_DTYPES and len(node.args) == 1 \
        and dtype_of(node.args[0]) == FLOAT_CAST_DTYPES[node.target]


def _same_device_move(node: fx.Node) -> bool:
    """``t.to(device)`` to the device t is on (Llama4 4.51: ``gather(...).to(hidden_states.device)``):
    returns t itself."""
    if node.op != "call_method" or node.target != "to" or node.kwargs or len(node.args) != 2 \
            or not isinstance(node.args[1], torch.device) or not isinstance(node.args[0], fx.Node):
        return False
    v = node.args[0].meta.get("example_value")
    return isinstance(v, torch.Tensor) and v.device == node.args[1]


def _same_shape_view(node: fx.Node) -> bool:
    """``t.view(...)`` / ``t.reshape(...)`` that provably keeps t's shape (DBRX: ``y.view(-1, d)``)."""
    if node.op != "call_method" or node.target not in ("view", "reshape", "squeeze") or not node.args \
            or not isinstance(node.args[0], fx.Node):
        return False
    return same_shape(node, node.args[0])


def _identity_step(node: fx.Node):
    """The node whose value ``node`` is when ``node`` is one of the identities ``strip_identity``
    follows; None otherwise."""
    if is_identity_dropout(node):
        return node.args[0] if node.args else node.kwargs["input"]
    if _same_dtype_cast(node) or _same_device_move(node) or (node.op == "call_method" and node.target == "contiguous"
                                  and len(node.args) == 1 and not node.kwargs) or _same_shape_view(node):
        return node.args[0]
    return identity_function_input(node)


def strip_identity(node):
    """Follow identity dropout, casts to the same dtype, ``contiguous``, same-shape views and
    identity ``autograd.Function`` calls (``identity_function_input``) back to the producer."""
    while isinstance(node, fx.Node):
        inner = _identity_step(node)
        if inner is None:
            return node
        node = inner
    return node


_NARROW_FLOATS = (torch.bfloat16, torch.float16)
_LINEAR_TARGETS = LINEAR_FUNCTIONS
_WIDE_FLOATS = (torch.float32, torch.float64)


def _widening_cast_input(node) -> Optional[fx.Node]:
    """x of ``x.to(D)`` / ``x.float()`` / ``x.double()`` that widens a bf16/fp16 x to fp32/fp64
    (exact: every narrow value is representable), else None."""
    if not (isinstance(node, fx.Node) and node.op == "call_method" and not node.kwargs and node.args
            and isinstance(node.args[0], fx.Node)):
        return None
    if node.target == "to" and len(node.args) == 2 and isinstance(node.args[1], torch.dtype):
        to = node.args[1]
    elif node.target in FLOAT_CAST_DTYPES and len(node.args) == 1:
        to = FLOAT_CAST_DTYPES[node.target]
    else:
        return None
    return node.args[0] if dtype_of(node.args[0]) in _NARROW_FLOATS and to in _WIDE_FLOATS \
        and dtype_of(node) == to else None


def autocast_round_trip(node):
    """x when ``node`` widens a bf16/fp16 x (``h.to(fc2.weight.dtype)`` under autocast: NLLB-MoE's
    expert) and its only reader is a GEMM whose recorded result has x's dtype: only autocast makes
    an fp32 operand give a bf16 GEMM result, and it casts that operand back to x's dtype first, so
    the GEMM reads x's values exactly (widening then narrowing to the same dtype is the identity, in
    value and gradient). ``node`` itself otherwise."""
    x = _widening_cast_input(node)
    if x is None or len(node.users) != 1:
        return node
    (gemm,) = node.users
    is_gemm = (gemm.op == "call_function" and (gemm.target in MATMUL_FUNCTIONS or gemm.target in _LINEAR_TARGETS)) \
        or (gemm.op == "call_method" and gemm.target in MATMUL_METHODS)
    return x if is_gemm and dtype_of(gemm) == dtype_of(x) else node


def strip_casts(node):
    """Follow any dtype cast (``.to(dtype)``, ``.float()``, ``type_as``, ``.to(other)``: other's dtype and
    device, the values cast) and identities back."""
    while isinstance(node, fx.Node):
        inner = strip_identity(node)
        if inner is not node:
            node = inner
            continue
        if node.op == "call_method" and node.args and (
                (node.target == "to" and len(node.args) == 2 and isinstance(node.args[1], torch.dtype)
                 and not node.kwargs)
                or (node.target in FLOAT_CAST_DTYPES and len(node.args) == 1)
                or (node.target in ("type_as", "to") and len(node.args) == 2 and not node.kwargs
                    and isinstance(node.args[1], fx.Node)
                    and isinstance(node.args[1].meta.get("example_value"), torch.Tensor))):
            node = node.args[0]
            continue
        return node
    return node


# --------------------------------------------------------------------------- identity autograd.Functions
#
# Dynamo records ``MyFn.apply(x, ...)`` as ``autograd_function_apply(fwd_body, bwd_body, *tensors,
# non_differentiable_idx=..., saved_for_backward_idx=...)`` (torch 2.11 and 2.13): one operand per
# tensor argument (non-tensor arguments are baked into the bodies), the forward body a GraphModule
# with one placeholder per operand returning ``(outputs, saved)``, the backward body with one
# placeholder per output's gradient (then the saved tensors) returning one gradient per operand
# (``None`` for none), positionally: ``torch._functorch.autograd_function.AutogradFunctionApply``
# runs the bodies as the Function's forward/backward. Output k is read by ``getitem(call, k)``.
# Dynamo records the call only where autograd tracks it, and autograd then forbids writing in place
# into an output that is a view of an input (``return x``) or into its base: the call's outputs need
# no place among the views of ``is_view_of``.

_BODY_ONLY_STEPS = {"view_as", "clone"}  # value identities inside a body (no autograd there)


def is_function_apply(node) -> bool:
    return isinstance(node, fx.Node) and hop_name(node) == "autograd_function_apply"


def _bodies(call: fx.Node):
    """(forward body, backward body) GraphModules of an autograd_function_apply call, else None."""
    owner = call.graph.owning_module
    mods = []
    for a in call.args[:2]:
        try:
            mods.append(owner.get_submodule(a.target) if isinstance(a, fx.Node) and a.op == "get_attr" else None)
        except AttributeError:
            return None
    return tuple(mods) if all(isinstance(m, fx.GraphModule) for m in mods) else None


def _body_io(gm: fx.GraphModule) -> tuple:
    """(placeholders, output node's value) of a body."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    return placeholders, out.args[0]


def _filled_buffer(node: fx.Node):
    """``buf = torch.empty_like(t)`` written once, by ``buf.copy_(src)`` (same shape and dtype: the whole
    of it), before anything else reads it: its value is src's. Returns (src, copy node), else None."""
    if node.op != "call_function" or node.target is not torch.empty_like:
        return None
    writes = [u for u in node.users if is_mutation(u, node)]
    if len(writes) != 1 or writes[0].op != "call_method" or writes[0].target != "copy_" \
            or len(writes[0].args) != 2 or writes[0].kwargs:
        return None
    w, src = writes[0], writes[0].args[1]
    order = node_order(node.graph)
    if not isinstance(src, fx.Node) or not same_shape(node, src) or dtype_of(node) != dtype_of(src) \
            or any(order[u] < order[w] for u in node.users):
        return None
    return src, w


def _body_step(node: fx.Node, used: set):
    """The node whose value ``node`` is, inside a Function body (no autograd there, so a copy is as
    good as a view); the nodes it passes are added to ``used``. None if it is not such a step."""
    if node.op == "call_method" and node.target in _BODY_ONLY_STEPS and node.args and not node.kwargs \
            and (node.target == "clone" and len(node.args) == 1
                 or node.target == "view_as" and len(node.args) == 2 and same_shape(node, node.args[0])):
        return node.args[0]
    if node.op == "call_method" and node.target == "copy_" and len(node.args) == 2 \
            and isinstance(node.args[0], fx.Node) and _filled_buffer(node.args[0]) is not None:
        return node.args[0]  # buf.copy_(src) returns buf
    filled = _filled_buffer(node)
    if filled is not None:
        used.add(filled[1])
        return filled[0]
    inner = _identity_step(node)
    if inner is not None and is_function_apply(node.args[0] if node.args else None):
        used.add(node.args[0])  # a nested identity Function (the backward calling the Function again)
    return inner


def _body_source(node, used: set):
    """The placeholder whose value ``node`` (inside a body) is, through copies, same-shape views and
    the identities of ``strip_identity``; None if not proven."""
    while isinstance(node, fx.Node):
        used.add(node)
        if node.op == "placeholder":
            return node
        node = _body_step(node, used)
    return None


def _only(gm: fx.GraphModule, used: set) -> bool:
    """Nothing in the body but ``used`` (and grad-mode switches): no other op, so nothing written,
    nothing random."""
    return all(n in used or n.op in ("placeholder", "output", "get_attr")
               or (n.op == "call_function" and n.target is torch._C._set_grad_enabled) for n in gm.graph.nodes)


def identity_function_input(node) -> Optional[fx.Node]:
    """The operand x when ``node`` is ``getitem(autograd_function_apply(fwd, bwd, ..., x, ...), k)``
    of a Function that is, provably, the identity on x, by value and by gradient:

    - forward: output k is, by value, operand x (only copies, ``contiguous``, ``empty_like`` +
      ``copy_``, same-shape views, ``clone``, same-dtype casts, nested identity Functions; nothing
      else in the body);
    - backward: x's gradient is output k's incoming gradient by the same steps; every other operand
      gets None (a Function that sends a gradient elsewhere, Megatron's ``MoEAuxLossAutoScaler``
      into the aux loss, would lose it when a rewrite drops the call);
    - output k is differentiable and nothing is marked dirty.

    fairscale/DeepSpeed ``_AllToAll`` at world size 1, Megatron's copy-to / reduce-from / gather /
    scatter regions at tensor-parallel size 1. Reading through such a call is exact for values and
    gradients, and dropping it when nothing else reads it loses nothing."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target is operator.getitem
            and len(node.args) == 2 and isinstance(node.args[1], int) and is_function_apply(node.args[0])):
        return None
    call, k = node.args
    bodies = _bodies(call)
    if bodies is None or call.kwargs.get("dirty_idx") or k in (call.kwargs.get("non_differentiable_idx") or ()) \
            or set(call.kwargs) - {"non_differentiable_idx", "saved_for_backward_idx", "dirty_idx"}:
        return None
    operands = call.args[2:]
    (fwd_in, fwd_out), (bwd_in, grads) = _body_io(bodies[0]), _body_io(bodies[1])
    outs = fwd_out[0] if isinstance(fwd_out, (tuple, list)) and len(fwd_out) == 2 else None  # (outputs, saved)
    if not isinstance(outs, (tuple, list)) or not isinstance(grads, (tuple, list)) or not 0 <= k < len(outs) \
            or len(fwd_in) != len(operands) or len(grads) != len(operands) or len(bwd_in) <= k:
        return None
    used_f, used_b = set(), set()
    src = _body_source(outs[k], used_f)
    if src is None or not _only(bodies[0], used_f):
        return None
    i = fwd_in.index(src)
    if _body_source(grads[i], used_b) is not bwd_in[k] or not _only(bodies[1], used_b) \
            or any(g is not None for j, g in enumerate(grads) if j != i):
        return None
    x = operands[i]
    return x if isinstance(x, fx.Node) and same_shape(x, node) and dtype_of(x) == dtype_of(node) else None


# --------------------------------------------------------------------------- linear autograd.Functions
#
# Megatron-Core's parallel linears (``LinearWithGradAccumulationAndAsyncCommunication``, the router's
# ``RouterGatingLinearFunction``) are Functions whose forward is ``x @ w.t() (+ b)`` and whose backward
# writes out linear's derivative by hand. Such a call is ``F.linear(x, w, b)`` by value and by gradient
# when both bodies are proven to compute exactly that (``linear_function_operands``).



def _row_reshape(node: fx.Node):
    """``t.view(...)`` / ``t.reshape(...)`` / ``t.flatten(...)`` keeping the size of the last dimension:
    element i of the row-major order is row i // L, column i % L on both sides, so the rows of t are
    regrouped, not changed (a matmul on the last dimension commutes with it). Returns t, else None."""
    is_reshape = (node.op == "call_method" and node.target in ("view", "reshape", "flatten")) or \
        (node.op == "call_function" and node.target in (torch.reshape, torch.flatten))
    if not is_reshape or len(node.args) < 2 or not isinstance(node.args[0], fx.Node) or \
            any(isinstance(a, torch.dtype) for a in node.args[1:]) or node.kwargs:
        return None
    a, b = shape_of(node.args[0]), shape_of(node)
    return node.args[0] if a and b and same(a[-1], b[-1]) else None


def _rows_source(node, used: set):
    """The placeholder whose rows ``node`` holds (copies, same-dtype casts, identities and row-keeping
    reshapes of it, inside a body), else None. A node of the placeholder's own shape *is* its value."""
    while isinstance(node, fx.Node):
        used.add(node)
        if node.op == "placeholder":
            return node
        inner = _body_step(node, used)
        node = inner if inner is not None else _row_reshape(node)
    return None


def _mm_args(node):
    """(a, b) of a 2-operand matmul spelling, else None."""
    if not isinstance(node, fx.Node) or len(node.args) != 2 or node.kwargs:
        return None
    if (node.op == "call_function" and node.target in MATMUL_FUNCTIONS) or \
            (node.op == "call_method" and node.target in MATMUL_METHODS):
        return node.args
    return None


def _transposed(node):
    """t when ``node`` is the 2-D transpose ``t.t()``, ``t.T``, ``t.transpose(0, 1)``, else None."""
    if not isinstance(node, fx.Node) or len(shape_of(node) or ()) != 2:
        return None
    if (node.op == "call_method" and node.target == "t" and len(node.args) == 1) or \
            (node.op == "call_function" and node.target is torch.t and len(node.args) == 1):
        return node.args[0]
    if node.op == "call_method" and node.target == "transpose" and len(node.args) == 3 \
            and sorted(a % 2 for a in node.args[1:] if isinstance(a, int)) == [0, 1]:
        return node.args[0]
    if node.op == "call_function" and node.target is getattr and node.args[1] in ("T", "mT"):
        return node.args[0]
    return None


def _linear_forward(out, used: set, fwd_in: list):
    """(x, w, b) placeholders when ``out`` is ``x @ w.t() (+ b)``: ``matmul``/``mm`` of rows of x by
    the transpose of w, ``F.linear``, ``addmm(b, x2d, w.t())``, bias added after; else None."""
    node, bias = out, None
    while True:
        used.add(node)
        if node.op == "call_function" and node.target in (operator.add, torch.add) and len(node.args) == 2 \
                and not node.kwargs and bias is None:
            for a, b in (node.args, node.args[::-1]):
                seen: set = set()
                src = _rows_source(b, seen) if isinstance(b, fx.Node) and len(shape_of(b) or ()) == 1 else None
                if isinstance(a, fx.Node) and src in fwd_in and len(shape_of(src) or ()) == 1:
                    node, bias = a, src
                    used.update(seen)
                    break
            else:
                return None
            continue
        if node.op == "call_function" and node.target is torch.addmm and len(node.args) == 3 and not node.kwargs \
                and bias is None and len(shape_of(node.args[0]) or ()) == 1:
            bias, mm = _rows_source(node.args[0], used), node.args[1:]
            if bias is None or len(shape_of(bias) or ()) != 1:
                return None
            break
        if node.op == "call_function" and node.target is Fn.linear and 2 <= len(node.args) <= 3 and not node.kwargs:
            w = _rows_source(node.args[1], used)
            if w is None or not same_shape(w, node.args[1]):
                return None
            if len(node.args) == 3 and node.args[2] is not None:
                if bias is not None:
                    return None
                bias = _rows_source(node.args[2], used)
            return _rows_source(node.args[0], used), w, bias
        mm = _mm_args(node)
        if mm is not None:
            break
        inner = _body_step(node, used)
        node = inner if inner is not None else _row_reshape(node)
        if node is None:
            return None
    wt = _transposed(mm[1])
    used.add(mm[1])
    w = _rows_source(wt, used) if wt is not None else None
    if w is None or not same_shape(w, wt):
        return None
    return _rows_source(mm[0], used), w, bias


def _grad_bias(g, used, grad_out):
    """``g`` is ``go2.sum(0)`` with go2 the 2-D row view of the incoming gradient."""
    node = g
    while isinstance(node, fx.Node) and node.target not in ("sum", torch.sum):
        used.add(node)
        node = _body_step(node, used)
    if node is None:
        return False
    used.add(node)
    args = dict(zip(("input", "dim", "keepdim"), node.args))
    args.update(node.kwargs)
    return set(args) <= {"input", "dim", "keepdim"} and args.get("dim") in (0, (0,), [0]) \
        and not args.get("keepdim", False) and len(shape_of(args["input"]) or ()) == 2 \
        and _rows_source(args["input"], used) is grad_out


def _disabled_autocast(node: fx.Node) -> bool:
    """``torch.amp.autocast_mode._enter_autocast(device, dtype, False, ...)`` and its exit: a region
    with autocast off (``custom_bwd`` around a backward whose forward ran without autocast)."""
    from torch.amp import autocast_mode
    if node.op != "call_function":
        return False
    if node.target is autocast_mode._enter_autocast:
        return len(node.args) >= 3 and node.args[2] is False
    return node.target is autocast_mode._exit_autocast and len(node.args) == 1 \
        and _disabled_autocast(node.args[0])


def linear_function_operands(node) -> Optional[tuple]:
    """(x, w, b) (b None when the Function has no bias operand) when ``node`` is
    ``getitem(autograd_function_apply(fwd, bwd, ...), 0)`` of a Function that is, provably,
    ``F.linear(x, w, b)`` by value and by gradient:

    - forward: output 0 is ``matmul(x, w.t())`` (``mm`` of rows of x reshaped keeping the last
      dimension, reshaped back; ``F.linear``; ``addmm``), ``+ b`` with b 1-D; the only output;
    - backward: x gets ``g @ w`` (rows of g), w gets ``g2.t() @ x2`` (the 2-D row views of g and x),
      b gets ``g2.sum(0)``; nothing else in either body (same-dtype casts, copies and row reshapes
      only, grad-mode switches, an autocast region that is *off*); every operand is x, w or b;
    - x, w, b and the output of one dtype, shapes those of linear; nothing dirty, output differentiable.

    A Function whose backward differs (scaled, a missing weight gradient, another dtype, a write into
    ``main_grad``) is not read as linear. Megatron-Core's ``LinearWithGradAccumulationAndAsyncCommunication``
    without gradient-accumulation fusion at world size 1, its ``RouterGatingLinearFunction`` in the
    input's dtype."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target is operator.getitem
            and len(node.args) == 2 and node.args[1] == 0 and is_function_apply(node.args[0])):
        return None
    call = node.args[0]
    bodies = _bodies(call)
    if bodies is None or call.kwargs.get("dirty_idx") or call.kwargs.get("non_differentiable_idx") \
            or set(call.kwargs) - {"non_differentiable_idx", "saved_for_backward_idx", "dirty_idx"}:
        return None
    operands = list(call.args[2:])
    (fwd_in, fwd_out), (bwd_in, grads) = _body_io(bodies[0]), _body_io(bodies[1])
    if not (isinstance(fwd_out, (tuple, list)) and len(fwd_out) == 2 and isinstance(fwd_out[0], (tuple, list))
            and len(fwd_out[0]) >= 1 and isinstance(fwd_out[1], (tuple, list))) \
            or not isinstance(grads, (tuple, list)) or len(grads) != len(operands) or len(fwd_in) != len(operands) \
            or len(bwd_in) != len(fwd_out[0]) + len(fwd_out[1]):
        return None
    # torch 2.11 also returns forward intermediates (``w.t()``) as outputs: allowed when nothing reads
    # them (no getitem but output 0's) and their gradients are unused by the backward body
    n_out = len(fwd_out[0])
    if any(u.op != "call_function" or u.target is not operator.getitem or u.args[1] != 0 for u in call.users) \
            or any(p.users for p in bwd_in[1:n_out]):
        return None
    # tensor operands: x, w (and b); others are sizes Dynamo lifted (unbacked row counts), no gradient
    tensors = [p for p in fwd_in if isinstance(example_value(p), torch.Tensor)]
    if len(tensors) not in (2, 3) or any(g is not None for p, g in zip(fwd_in, grads) if p not in tensors):
        return None
    used_f: set = set()
    found = _linear_forward(fwd_out[0][0], used_f, fwd_in)
    if found is None or None in found[:2] or {n for n in found if n is not None} != set(tensors) \
            or len(set(found)) != 3:
        return None
    idx = [fwd_in.index(n) if n is not None else None for n in found]
    x, w, b = (operands[i] if i is not None else None for i in idx)
    if not _linear_shapes(node, x, w, b):
        return None
    saved = {}  # backward placeholder -> forward placeholder whose rows it holds
    for p, v in zip(bwd_in[n_out:], fwd_out[1]):
        src = _rows_source(v, used_f)
        if src is None:
            return None
        saved[p] = (src, v)
    if not _only(bodies[0], used_f):
        return None
    grad_out, used_b = bwd_in[0], set()
    if not _linear_backward(grads, idx, found, saved, grad_out, used_b) or not _only_linear(bodies[1], used_b):
        return None
    return x, w, b


def _linear_backward(grads, idx, found, saved, grad_out, used) -> bool:
    """The backward body's gradients are linear's (``linear_function_operands``)."""
    def source(p):  # a backward node's forward placeholder, through the saved tensors
        s = _rows_source(p, used)
        return saved[s][0] if s in saved else None

    def rows_of(node, fwd_placeholder, like):
        return source(node) is fwd_placeholder and same_shape(node, like)

    ix, iw, ib = idx
    gx, gw = grads[ix], grads[iw]
    if not isinstance(gx, fx.Node) or not isinstance(gw, fx.Node):
        return False
    # x's gradient: rows of g times w, reshaped to x's shape
    node = gx
    while isinstance(node, fx.Node) and _mm_args(node) is None:
        used.add(node)
        inner = _body_step(node, used)
        node = inner if inner is not None else _row_reshape(node)
    mm = _mm_args(node)
    if mm is None or _rows_source(mm[0], used) is not grad_out or not rows_of(mm[1], found[1], found[1]) \
            or not same_shape(gx, found[0]):
        return False
    used.add(node)
    # w's gradient: g2.t() @ x2
    node = gw
    while isinstance(node, fx.Node) and _mm_args(node) is None:
        used.add(node)
        node = _body_step(node, used)
    mm = _mm_args(node)
    go2 = _transposed(mm[0]) if mm is not None else None
    if go2 is None or len(shape_of(go2) or ()) != 2 or len(shape_of(mm[1]) or ()) != 2 \
            or _rows_source(go2, used) is not grad_out or source(mm[1]) is not found[0] \
            or not same_shape(gw, found[1]):
        return False
    used.update((node, mm[0]))
    if ib is None:
        return True
    return isinstance(grads[ib], fx.Node) and _grad_bias(grads[ib], used, grad_out) \
        and same_shape(grads[ib], found[2])


def _linear_shapes(node, x, w, b) -> bool:
    """x (.., d), w (n, d), b (n,), output (.., n), one dtype."""
    sx, sw, so = shape_of(x), shape_of(w), shape_of(node)
    if not (sx and sw and so and len(sw) == 2 and len(so) == len(sx) and same(sx[-1], sw[1])
            and same(so[-1], sw[0]) and all(same(p, q) for p, q in zip(sx[:-1], so[:-1]))):
        return False
    if b is not None and not (isinstance(b, fx.Node) and len(shape_of(b) or ()) == 1
                              and same(shape_of(b)[0], sw[0])):
        return False
    return len({dtype_of(t) for t in (x, w, b, node) if t is not None}) == 1 and dtype_of(x) is not None


def _only_linear(gm: fx.GraphModule, used: set) -> bool:
    """``_only``, an autocast region that is off allowed too."""
    return all(n in used or n.op in ("placeholder", "output", "get_attr") or _disabled_autocast(n)
               or (n.op == "call_function" and n.target is torch._C._set_grad_enabled) for n in gm.graph.nodes)


# --------------------------------------------------------------------------- purity

_RANDOM = {torch.rand_like, torch.randn_like, torch.bernoulli, torch.rand, torch.randn, torch.randint,
           torch.multinomial, torch.normal}


def need_pure_path(value: fx.Node, source: fx.Node, allowed: Iterable = ()) -> None:
    """Nothing random and nothing in place on the path from ``source`` (the gathered tokens) to
    ``value`` (what the expert produces), except the in-place nodes ``allowed`` (proven parts of
    the block, e.g. a per-expert bias ``add_``)."""
    for n in downstream(source, value, node_order(value.graph)):
        if n.op == "call_function" and n.target is Fn.dropout and not is_identity_dropout(n):
            raise Declined(f"expert path applies dropout with p > 0 in training ({n.name}: random per element): "
                           "the fused op cannot reproduce it")
        if n.op == "call_function" and n.target in _RANDOM:
            raise Declined(f"expert path draws random numbers ({n.name}): the fused op cannot reproduce it")
        for u in n.users:
            if is_mutation(u, n) and u not in allowed:
                raise Declined(f"expert path modifies {n.name} in place ({u.format_node()})")


# --------------------------------------------------------------------------- equal values

def equivalent(a, b, depth: int = 6) -> bool:
    """``a`` and ``b`` compute the same value: the same node, equal constants, or the same pure
    call on equivalent arguments (Dynamo records ``flat == e`` once for ``x[flat == e]`` and once
    for ``y[flat == e] = ...``). Writes between the two are the caller's concern."""
    if a is b:
        return True
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(equivalent(p, q, depth) for p, q in zip(a, b))
    if isinstance(a, fx.Node) and isinstance(b, fx.Node):
        if depth <= 0 or a.op != b.op or a.op not in ("call_function", "call_method") or a.target != b.target:
            return False
        if is_mutation(a, a.args[0] if a.args else None) or (a.op == "call_function" and a.target in _RANDOM):
            return False
        return (len(a.args) == len(b.args) and set(a.kwargs) == set(b.kwargs)
                and all(equivalent(p, q, depth - 1) for p, q in zip(a.args, b.args))
                and all(equivalent(a.kwargs[k], b.kwargs[k], depth - 1) for k in a.kwargs))
    if isinstance(a, fx.Node) or isinstance(b, fx.Node):
        return False
    return type(a) is type(b) and a == b


def _flat_of(a, b) -> bool:
    """``a`` is ``b`` flattened to one dim (``b.view(-1)``, ``b.reshape(-1)``, ``b.flatten()``)."""
    return (isinstance(a, fx.Node) and a.op == "call_method" and a.args and equivalent(a.args[0], b)
            and ((a.target in ("view", "reshape") and tuple(a.args[1:]) in ((-1,), ((-1,),)))
                 or (a.target == "flatten" and len(a.args) == 1 and not a.kwargs)))


def same_rows(a, b) -> bool:
    """Two masks / indices select the same rows of a (tokens.., d) tensor and of its (-1, d) view:
    equivalent, or one is the other flattened."""
    return equivalent(a, b) or _flat_of(a, b) or _flat_of(b, a)


def same_shape(a, b) -> bool:
    sa, sb = shape_of(a), shape_of(b)
    return sa is not None and sb is not None and len(sa) == len(sb) and all(same(p, q) for p, q in zip(sa, sb))
