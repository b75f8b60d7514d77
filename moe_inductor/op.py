"""The fused MoE operator: ``torch.ops.moe_inductor.fused_moe`` with fake and autograd.

Layering: kernels (``moe_inductor.kernels``) and the PyTorch path (``moe_inductor.reference``)
-> this op (validation, dispatch, fake, autograd) -> the graph rewrite, which emits calls of it.

Schema (shape legend in ``moe_inductor.reference``)::

  fused_moe(x, token_ids, expert_ids, scores, w1, w2, b1?, b2?, activation, interleaved,
            recompute_h, impl) -> (out (T, d), h_sorted (A, 2n) | (0, 2n), order (A,) int32)

Only ``out`` is meant for users (``moe_inductor.fused_moe`` returns it alone); ``h_sorted`` and
``order`` are outputs so that autograd can save them: with them, x, scores and the int32
routing, that is all the backward keeps (SonicMoE's memory-lean set). With
``recompute_h=True`` H is not kept either and is recomputed from X in backward.

``impl``: "auto" (Triton on CUDA where the kernels serve the shape, else PyTorch), "torch", or
"triton" (on CPU tensors only under TRITON_INTERPRET=1, for testing the kernels). The
environment variable ``MOE_INDUCTOR_IMPL`` overrides "auto" for direct calls.
"""
from __future__ import annotations

import logging
import os
from typing import Optional

import torch
from torch import Tensor

from .activations import parse_activation
from . import reference
from . import stats as _stats

log = logging.getLogger(__name__)

IMPLS = ("auto", "torch", "triton")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


def check_inputs(x, token_ids, expert_ids, scores, w1, w2, b1, b2, activation, impl) -> None:
    """Clear errors for direct calls; all checks are on metadata (no host sync)."""
    act = parse_activation(activation)
    if impl not in IMPLS:
        raise ValueError(f"fused_moe: unknown impl {impl!r}; valid: {', '.join(IMPLS)}")
    if x.dim() != 2:
        raise ValueError(f"fused_moe: x must be (T, d), got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"fused_moe: unsupported dtype {x.dtype}; supported: {FLOAT_DTYPES}")
    for name, w in (("w1", w1), ("w2", w2), ("b1", b1), ("b2", b2)):
        if w is not None and w.dtype != x.dtype:
            raise TypeError(f"fused_moe: {name} has dtype {w.dtype} but x has {x.dtype}")
        if w is not None and w.device != x.device:
            raise ValueError(f"fused_moe: {name} is on {w.device} but x is on {x.device}")
    if w1.dim() != 3 or w2.dim() != 3:
        raise ValueError(
            f"fused_moe: w1 must be (E, 2n, d) and w2 (E, d, n); got {tuple(w1.shape)}, {tuple(w2.shape)}"
        )
    E, h_cols, d = w1.shape
    n = w2.shape[2]
    if d != x.shape[1]:
        raise ValueError(f"fused_moe: w1 is (E, 2n, d) = {tuple(w1.shape)} but x has d = {x.shape[1]}")
    want_cols = 2 * n if act.gated else n
    if tuple(w2.shape) != (E, d, n) or h_cols != want_cols:
        raise ValueError(
            f"fused_moe: inconsistent expert weights for activation {activation!r}: "
            f"w1 {tuple(w1.shape)} (expected (E, {'2n' if act.gated else 'n'}, d)), w2 {tuple(w2.shape)} "
            "(expected (E, d, n))"
        )
    if b1 is not None and tuple(b1.shape) != (E, h_cols):
        raise ValueError(f"fused_moe: b1 must be {(E, h_cols)}, got {tuple(b1.shape)}")
    if b2 is not None and tuple(b2.shape) != (E, d):
        raise ValueError(f"fused_moe: b2 must be {(E, d)}, got {tuple(b2.shape)}")
    for name, t in (("token_ids", token_ids), ("expert_ids", expert_ids), ("scores", scores)):
        if t.dim() != 1:
            raise ValueError(f"fused_moe: {name} must be 1-D (one entry per assignment), got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"fused_moe: {name} is on {t.device} but x is on {x.device}")
    if not (token_ids.shape[0] == expert_ids.shape[0] == scores.shape[0]):
        raise ValueError(
            "fused_moe: inconsistent routing: token_ids, expert_ids and scores must have one entry per "
            f"assignment, got lengths {token_ids.shape[0]}, {expert_ids.shape[0]}, {scores.shape[0]}"
        )
    for name, t in (("token_ids", token_ids), ("expert_ids", expert_ids)):
        if t.dtype not in INDEX_DTYPES:
            raise TypeError(f"fused_moe: {name} must be int32 or int64, got {t.dtype}")
    if not scores.is_floating_point():
        raise TypeError(f"fused_moe: scores must be floating point, got {scores.dtype}")


def _check_routing_values(token_ids: Tensor, expert_ids: Tensor, T: int, E: int) -> None:
    # Value checks need the data; on CPU that is free, on GPU it would be a host sync, so the
    # kernels rely on the metadata checks alone there.
    if token_ids.numel() == 0:
        return
    if int(token_ids.min()) < 0 or int(token_ids.max()) >= T:
        raise ValueError(f"fused_moe: inconsistent routing: token_ids outside [0, {T})")
    if int(expert_ids.min()) < -1 or int(expert_ids.max()) >= E:
        raise ValueError(
            f"fused_moe: inconsistent routing: expert_ids outside [0, {E}) (or -1 for a dropped assignment)")


def _resolve_impl(impl: str, x: Tensor, w1: Tensor, w2: Tensor, act, num_assignments: int = 0) -> str:
    if impl == "auto":
        impl = os.environ.get("MOE_INDUCTOR_IMPL", "auto")
        if impl not in IMPLS:
            raise ValueError(f"MOE_INDUCTOR_IMPL={impl!r}; valid: {', '.join(IMPLS)}")
    if impl == "auto":
        if x.is_cuda:
            from .kernels import unsupported_reason

            reason = unsupported_reason(x, w1, w2, act, num_assignments)
            if reason is None:
                return "triton"
            log.info("sonic: Triton kernels cannot serve this call (%s); using the PyTorch path", reason)
        return "torch"
    if impl == "triton" and not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("fused_moe: impl='triton' on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported")
    if impl == "triton":
        from .kernels import unsupported_reason

        reason = unsupported_reason(x, w1, w2, act, num_assignments)
        if reason is not None:
            raise ValueError(f"fused_moe: impl='triton' cannot serve this call: {reason}")
    return impl


@torch.library.custom_op("moe_inductor::fused_moe", mutates_args=())
def _fused_moe(
    x: Tensor,
    token_ids: Tensor,
    expert_ids: Tensor,
    scores: Tensor,
    w1: Tensor,
    w2: Tensor,
    b1: Optional[Tensor],
    b2: Optional[Tensor],
    activation: str,
    interleaved: bool,
    recompute_h: bool,
    impl: str,
) -> tuple[Tensor, Tensor, Tensor]:
    check_inputs(x, token_ids, expert_ids, scores, w1, w2, b1, b2, activation, impl)
    act = parse_activation(activation)
    which = _resolve_impl(impl, x, w1, w2, act, token_ids.shape[0])
    if not x.is_cuda:
        _check_routing_values(token_ids, expert_ids, x.shape[0], w1.shape[0])
    elif token_ids.numel():
        # out-of-range ids would make the kernels read out of bounds: check on device, no sync
        T, E = x.shape[0], w1.shape[0]
        torch._assert_async(((token_ids >= 0) & (token_ids < T)).all(), "fused_moe: token_ids outside [0, T)")
        torch._assert_async(((expert_ids >= -1) & (expert_ids < E)).all(), "fused_moe: expert_ids outside [-1, E)")
    if _stats._routing_listeners:
        _stats._record_routing(expert_ids, x.shape[0], w1.shape[0])
    if which == "triton":
        from .kernels import triton_moe_forward

        return triton_moe_forward(x, token_ids, expert_ids, scores, w1, w2, b1, b2, act, interleaved, not recompute_h)
    return reference.moe_forward(x, token_ids, expert_ids, scores, w1, w2, b1, b2, act, interleaved, not recompute_h)


@_fused_moe.register_fake
def _fused_moe_fake(x, token_ids, expert_ids, scores, w1, w2, b1, b2, activation, interleaved, recompute_h, impl):
    check_inputs(x, token_ids, expert_ids, scores, w1, w2, b1, b2, activation, impl)
    A = token_ids.shape[0]
    out = x.new_empty(x.shape)
    h = x.new_empty((0 if recompute_h else A, w1.shape[1]))
    order = token_ids.new_empty((A,), dtype=torch.int32)
    return out, h, order


@torch.library.custom_op("moe_inductor::fused_moe_backward", mutates_args=())
def _fused_moe_backward(
    grad_out: Tensor,
    x: Tensor,
    token_ids: Tensor,
    expert_ids: Tensor,
    scores: Tensor,
    w1: Tensor,
    w2: Tensor,
    b1: Optional[Tensor],
    b2: Optional[Tensor],
    h_sorted: Tensor,
    order: Tensor,
    activation: str,
    interleaved: bool,
    recompute_h: bool,
    impl: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    act = parse_activation(activation)
    which = _resolve_impl(impl, x, w1, w2, act, token_ids.shape[0])
    h = None if recompute_h else h_sorted
    if which == "triton":
        from .kernels import triton_moe_backward

        grads = triton_moe_backward(grad_out, x, token_ids, expert_ids, scores, w1, w2, b1, b2, h, order, act, interleaved)
    else:
        grads = reference.moe_backward(grad_out, x, token_ids, expert_ids, scores, w1, w2, b1, b2, h, order, act, interleaved)
    dx, dscores, dw1, dw2, db1, db2 = grads
    # custom ops cannot return None: empty tensors stand for "no bias"
    if db1 is None:
        db1 = x.new_empty(0)
    if db2 is None:
        db2 = x.new_empty(0)
    return dx, dscores, dw1, dw2, db1, db2


@_fused_moe_backward.register_fake
def _fused_moe_backward_fake(grad_out, x, token_ids, expert_ids, scores, w1, w2, b1, b2, h_sorted, order,
                             activation, interleaved, recompute_h, impl):
    return (
        x.new_empty(x.shape),
        scores.new_empty(scores.shape),
        # weight gradients in the weights' layout (a transposed view's strides), as both paths
        # allocate them: autograd then needs no copy to give the parameter its layout
        torch.empty_like(w1),
        torch.empty_like(w2),
        b1.new_empty(b1.shape) if b1 is not None else x.new_empty(0),
        b2.new_empty(b2.shape) if b2 is not None else x.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    x, token_ids, expert_ids, scores, w1, w2, b1, b2, activation, interleaved, recompute_h, impl = inputs
    _, h_sorted, order = output
    ctx.save_for_backward(x, token_ids, expert_ids, scores, w1, w2, b1, b2, h_sorted, order)
    ctx.config = (activation, interleaved, recompute_h, impl)


def _backward(ctx, grad_out, _grad_h, _grad_order):
    x, token_ids, expert_ids, scores, w1, w2, b1, b2, h_sorted, order = ctx.saved_tensors
    activation, interleaved, recompute_h, impl = ctx.config
    dx, dscores, dw1, dw2, db1, db2 = torch.ops.moe_inductor.fused_moe_backward(
        grad_out, x, token_ids, expert_ids, scores, w1, w2, b1, b2, h_sorted, order,
        activation, interleaved, recompute_h, impl,
    )
    return (dx, None, None, dscores, dw1, dw2,
            db1 if b1 is not None else None, db2 if b2 is not None else None,
            None, None, None, None)


_fused_moe.register_autograd(_backward, setup_context=_setup_context)


def fused_moe(
    x: Tensor,
    token_ids: Tensor,
    expert_ids: Tensor,
    scores: Tensor,
    w1: Tensor,
    w2: Tensor,
    *,
    b1: Optional[Tensor] = None,
    b2: Optional[Tensor] = None,
    activation: str = "swiglu",
    interleaved: bool = False,
    recompute_h: bool = False,
    impl: str = "auto",
) -> Tensor:
    """Mixture-of-experts MLP over general routing assignments.

    out[t] = sum over assignments a with token_ids[a] == t of
             scores[a] * (act(x[t] @ w1[e].T + b1[e]) @ w2[e].T + b2[e]),  e = expert_ids[a]

    x (T, d); token_ids, expert_ids (A,) int32/int64; scores (A,). An expert id of -1 marks a
    dropped (padding) assignment: it adds nothing and its score gets gradient 0, so routings of
    a static length (``moe_inductor.routing.token_rounding_routing(static_shape=True)``) cost no
    GEMM rows for their padding. w1 (E, 2n, d) for gated
    activations (gate then up, or interleaved), (E, n, d) otherwise; w2 (E, d, n). Weights may be
    transposed views. Differentiable in x, scores, w1, w2, b1, b2.
    """
    out, _, _ = torch.ops.moe_inductor.fused_moe(
        x, token_ids, expert_ids, scores, w1, w2, b1, b2, activation, interleaved, recompute_h, impl
    )
    return out
