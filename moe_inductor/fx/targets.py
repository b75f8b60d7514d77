"""The one set of op targets per question the recognisers ask of a torch-level FX graph.

Each set answers one question; a caller picks the set whose question it asks, and a set is never
widened or narrowed for one caller's convenience (the sets of the three modules that each had
their own list diverged: ``safety`` missed aliasing casts, ``patterns/common`` missed most views,
``loop_capture`` missed ``unfold``).
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F

# --------------------------------------------------------------------------- aliasing

#: methods whose result may share memory with their receiver (the first argument). Used to prove
#: that nothing writes a tensor through another name, so it must hold every aliasing method, not
#: only the value-preserving ones: ``contiguous`` and ``detach`` return the receiver itself,
#: ``chunk``/``split``/``unbind`` return tuples of views. Casts are in ``CAST_METHODS`` (they alias
#: exactly when the dtype does not change).
ALIASING_METHODS = frozenset({
    "view", "reshape", "permute", "transpose", "unsqueeze", "squeeze", "expand", "t", "flatten", "unflatten",
    "narrow", "select", "view_as", "reshape_as", "expand_as", "as_strided", "chunk", "split", "unbind",
    "contiguous", "detach", "movedim", "swapaxes", "diagonal", "unfold", "real", "imag", "__getitem__",
})
#: torch functions whose result may share memory with their first argument (``operator.getitem``
#: is decided by its index: basic indexing is a view, advanced indexing copies).
ALIASING_FUNCTIONS = frozenset({
    torch.reshape, torch.transpose, torch.permute, torch.squeeze, torch.unsqueeze, torch.flatten, torch.narrow,
    torch.select, torch.chunk, torch.split, torch.unbind, torch.t, torch.detach, torch.movedim, torch.swapaxes,
    torch.diagonal, torch.as_strided,
})

#: dtype-cast methods. Each returns its receiver itself when the dtype (and device) do not change,
#: so a cast aliases its input unless the dtype provably changes (``aliasing.is_view_of`` checks
#: the example values; a check without dtypes, on source code, must count every cast as aliasing).
CAST_METHODS = frozenset({
    "to", "type", "type_as", "float", "double", "half", "bfloat16", "int", "long", "short", "bool", "byte", "char",
    "cfloat", "cdouble",
})
#: the floating-point casts without arguments and the dtype each returns (value-preserving when
#: the receiver already has it: ``strip_identity`` and the router read through those).
FLOAT_CAST_DTYPES = {"float": torch.float32, "double": torch.float64, "half": torch.float16,
                     "bfloat16": torch.bfloat16}

#: ops whose tuple outputs are fresh tensors: no output aliases an input or another output (top-k
#: values and indices, sort, max/min along a dim, nonzero-style where): ``vals /= vals.sum()`` on
#: top-k values does not write the ids
FRESH_TUPLE_METHODS = frozenset({"topk", "sort", "max", "min", "kthvalue", "median", "mode", "nonzero", "unique",
                                 "aminmax"})
FRESH_TUPLE_FUNCTIONS = frozenset({torch.topk, torch.sort, torch.max, torch.min, torch.kthvalue, torch.median,
                                   torch.mode, torch.where, torch.nonzero, torch.unique, torch.aminmax})

# --------------------------------------------------------------------------- writes

#: Python-level functions that write into their first argument as Dynamo records them
#: (``t[i] = v``, ``t += v`` on a tensor, and the other augmented assignments). Used to prove that
#: nothing writes a tensor, so every augmented assignment is here, not only the arithmetic ones.
#: In-place methods are recognised by name (``add_``), aten ops by their schema.
INPLACE_FUNCTIONS = frozenset({
    operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
    operator.imod, operator.ipow, operator.imatmul, operator.iand, operator.ior, operator.ixor, operator.ilshift,
    operator.irshift,
})

# --------------------------------------------------------------------------- products

#: matrix products of two operands (no bias), as torch functions and as methods
MATMUL_FUNCTIONS = frozenset({torch.matmul, torch.mm, operator.matmul})
MATMUL_METHODS = frozenset({"matmul", "mm", "__matmul__"})
#: the functional linear as Dynamo records it (``torch._C._nn.linear``) and as written; a tuple whose
#: first entry is the name the op's autocast rule follows (``lower.rewrite.gemm_name``)
LINEAR_FUNCTIONS = (torch._C._nn.linear, F.linear)
#: ``F.one_hot`` as Dynamo records it and as written
ONE_HOT_FUNCTIONS = (torch._C._nn.one_hot, F.one_hot)

# --------------------------------------------------------------------------- the normal form

#: in-place elementwise methods -> their functional method (the normal form's rewrite)
FUNCTIONAL_OF_METHOD = {
    "add_": "add", "sub_": "sub", "mul_": "mul", "div_": "div", "neg_": "neg", "pow_": "pow",
    "exp_": "exp", "sigmoid_": "sigmoid", "tanh_": "tanh", "relu_": "relu", "sqrt_": "sqrt",
    "rsqrt_": "rsqrt", "abs_": "abs", "square_": "square", "clamp_": "clamp", "clamp_min_": "clamp_min",
    "clamp_max_": "clamp_max", "masked_fill_": "masked_fill", "reciprocal_": "reciprocal",
}
#: binary in-place methods whose functional form is the Python operator (without kwargs: alpha,
#: rounding_mode), the form Dynamo records for ``a * b``
OPERATOR_OF_METHOD = {"add_": operator.add, "sub_": operator.sub, "mul_": operator.mul, "div_": operator.truediv}
#: in-place functions -> their functional function
FUNCTIONAL_OF_FUNCTION = {
    operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
    operator.itruediv: operator.truediv, torch.relu_: torch.relu, torch.sigmoid_: torch.sigmoid,
    torch.tanh_: torch.tanh, torch.exp_: torch.exp, torch.sqrt_: torch.sqrt, torch.rsqrt_: torch.rsqrt,
}
#: functions with an ``inplace=`` flag (in place when it is True)
INPLACE_FLAG_FUNCTIONS = {F.relu, F.silu, F.gelu, F.leaky_relu, F.elu, F.hardtanh, F.relu6, F.selu, F.celu,
                 F.hardswish, F.hardsigmoid, F.mish, F.threshold, F.dropout}

#: ops whose result is always memory of its own, never an argument's (the normal form writes into
#: their results functionally); casts, views, ``contiguous`` and zeros/empty buffers are not here
ALLOCATING_FUNCTIONS = {
    torch.matmul, torch.mm, torch.bmm, torch.einsum, F.linear, torch.addmm, torch.baddbmm,
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.matmul, operator.pow,
    torch.add, torch.sub, torch.mul, torch.div, torch.neg, torch.pow, torch.exp, torch.log, torch.sqrt,
    torch.rsqrt, torch.sigmoid, torch.tanh, torch.relu, torch.softmax, torch.log_softmax, torch.clamp,
    torch.masked_fill, torch.where, torch.sum, torch.mean, torch.cat, torch.stack, torch.clone, torch.square,
    torch.reciprocal, F.softmax, F.log_softmax, F.silu, F.gelu, F.relu, F.sigmoid, F.tanh, F.leaky_relu,
    F.elu, F.relu6, F.mish, F.hardswish, F.softplus, F.normalize,
}
ALLOCATING_METHODS = {
    "add", "sub", "mul", "div", "neg", "pow", "exp", "log", "sqrt", "rsqrt", "sigmoid", "tanh", "relu",
    "softmax", "log_softmax", "clamp", "clamp_min", "clamp_max", "masked_fill", "matmul", "mm", "bmm",
    "sum", "mean", "clone", "square", "reciprocal", "abs",
}
