"""The one set of op targets per question the recognisers ask of a torch-level FX graph.

Each set answers one question; a caller picks the set whose question it asks, and a set is never
widened or narrowed for one caller's convenience (the sets of the three modules that each had
their own list diverged: ``safety`` missed aliasing casts, ``patterns/common`` missed most views,
``loop_capture`` missed ``unfold``).
"""
from __future__ import annotations

import operator

import torch

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
