"""The fused MoE operator: ``torch.ops.moe_inductor.fused_moe`` with fake and autograd.

Layering: kernels (``moe_inductor.kernels``) and the PyTorch path (``moe_inductor.ops.reference``)
-> this op (validation, dispatch, fake, autograd) -> the graph rewrite, which emits calls of it.

Schemas (shape legend in ``moe_inductor.ops.reference``), both built from one description
(``FUSED_MOE``, ``FUSED_MOE_EXPERTS``: the routing, then the op's weights, then the options, which
are keyword-only; custom ops cannot take keyword-only tensors)::

  fused_moe(Tensor x, Tensor token_ids, Tensor expert_ids, Tensor scores, Tensor w1, Tensor w2,
            Tensor? b1=None, Tensor? b2=None, *, str activation="swiglu", bool interleaved=False,
            bool recompute_h=False, str impl="auto", str autocast_like="aten::mm",
            ScalarType? compute_dtype=None)
      -> (out (T, d), h_sorted (A, 2n) | (0, 2n), order (A,) int32)
  fused_moe_experts(Tensor x, Tensor token_ids, Tensor expert_ids, Tensor scores,
                    Tensor[] w_gate, Tensor[] w_down, Tensor[] w_up, Tensor[] b_gate, Tensor[] b_up,
                    Tensor[] b_down, *, <the same options>)
      -> the same three outputs

The Python entry points ``moe_inductor.fused_moe`` and ``moe_inductor.fused_moe_experts`` take the
same arguments in the same order (the lists may be left out there: a schema cannot give a
``Tensor[]`` a default) and return ``out``.

``fused_moe_experts`` takes the experts' weights as per-expert lists (w_gate[e] (2n|n, d) or
gate and up halves (n, d) each, w_down[e] (d, n)): it stacks them inside its implementation (a
transient copy), saves the lists themselves for backward (parameters: no activation bytes) and
restacks them in backward. The per-expert-loop and mask-dispatch rewrites emit it, so no
weight-sized copy is made in the graph or kept for backward.

Only ``out`` is meant for users (``moe_inductor.fused_moe`` returns it alone); ``h_sorted`` and
``order`` are outputs so that autograd can save them: with them, x, scores and the int32
routing, that is all the backward keeps (SonicMoE's memory-lean set). With
``recompute_h=True`` H is not kept either and is recomputed from X in backward.

``impl``: "auto" (Triton on CUDA where the kernels serve the shape, else PyTorch), "torch", or
"triton" (on CPU tensors only under TRITON_INTERPRET=1, for testing the kernels). It is decided at
run time, by the op, for every call: the rewrite writes the backend's ``impl`` option into the
graph unresolved, and the op resolves it (``requested_impl``: the environment variable
``MOE_INDUCTOR_IMPL`` replaces "auto" when set, for direct calls and compiled graphs alike; then
``_resolve_impl`` picks Triton or PyTorch for "auto" from the call's tensors). The backend's report
(``report.runs_on``) predicts that decision at rewrite time through the same ``requested_impl``.

Autocast. The GEMMs run in ``compute_dtype`` (None: x's dtype, and the weights must have it too).
Given a ``compute_dtype``, x must already have it and the weights and biases may be any floating
dtype: they are cast to it transiently, in forward and again in backward (never kept), and their
gradients come back in their own dtype. The op has Autocast kernels (CPU and CUDA) that do what
eager autocast does to the GEMM named ``autocast_like`` (the op the fused block replaced): if that
GEMM has an autocast rule on the device and autocast is on, x is cast to the autocast dtype
(autograd then keeps that copy, as eager does) and ``compute_dtype`` is set to it; a GEMM without
one ("aten::_grouped_mm" in torch 2.13, "transformers::grouped_mm_fallback", or "") leaves the op
in its inputs' dtype, as eager leaves that GEMM. The Autocast kernels find x, the weights,
``autocast_like`` and ``compute_dtype`` by name in the description (``Arg.role``).
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import os
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from moe_inductor.ops.activations import parse_activation
from moe_inductor.ops import reference
from moe_inductor.diagnostics import stats
from moe_inductor.compile.options import IMPLS

log = logging.getLogger(__name__)

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)
#: the GEMM whose autocast rule the op follows unless told otherwise (mm, linear, bmm, matmul all
#: cast to the autocast dtype on CPU and CUDA)
DEFAULT_AUTOCAST_LIKE = "aten::mm"
#: dtypes eager autocast casts (float64 it leaves alone)
_AUTOCAST_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)
_AUTOCAST_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}


# --------------------------------------------------------------------------- the one description

REQUIRED = inspect.Parameter.empty


@dataclasses.dataclass(frozen=True)
class Arg:
    """One argument of the fused ops: its schema type, its default (``REQUIRED``: none), whether it
    is keyword-only, and its ``role`` for the Autocast kernels ("x", "weight", "autocast_like",
    "compute_dtype", or "")."""

    name: str
    type: str
    default: Any = REQUIRED
    kw_only: bool = False
    role: str = ""
    #: the Python entry point's default where the schema cannot hold one (``Tensor[]``: ``()``)
    py_default: Any = REQUIRED

    def schema(self) -> str:
        if self.default is REQUIRED:
            return f"{self.type} {self.name}"
        value = self.default
        text = "None" if value is None else str(value) if isinstance(value, bool) else f'"{value}"'
        return f"{self.type} {self.name}={text}"

    def parameter(self, python: bool) -> inspect.Parameter:
        default = self.py_default if python and self.py_default is not REQUIRED else self.default
        kind = inspect.Parameter.KEYWORD_ONLY if self.kw_only else inspect.Parameter.POSITIONAL_OR_KEYWORD
        return inspect.Parameter(self.name, kind, default=default)


def _opt(name: str, type_: str, default: Any, role: str = "") -> Arg:
    return Arg(name, type_, default, kw_only=True, role=role)


#: the assignments: rows of x routed to experts with scores (int32/int64 ids, -1: dropped)
ROUTING_ARGS = (Arg("x", "Tensor", role="x"), Arg("token_ids", "Tensor"), Arg("expert_ids", "Tensor"),
                Arg("scores", "Tensor"))
#: ``fused_moe``'s stacked weights (w1 (E, 2n|n, d), w2 (E, d, n), biases (E, 2n|n), (E, d))
STACKED_ARGS = (Arg("w1", "Tensor", role="weight"), Arg("w2", "Tensor", role="weight"),
                Arg("b1", "Tensor?", None, role="weight"), Arg("b2", "Tensor?", None, role="weight"))
#: ``fused_moe_experts``' per-expert lists, required ones first as in ``STACKED_ARGS``
LIST_ARGS = (Arg("w_gate", "Tensor[]", role="weight"), Arg("w_down", "Tensor[]", role="weight")) + tuple(
    Arg(name, "Tensor[]", role="weight", py_default=()) for name in ("w_up", "b_gate", "b_up", "b_down"))
#: the options, keyword-only, shared by both ops
OPTION_ARGS = (
    _opt("activation", "str", "swiglu"),
    _opt("interleaved", "bool", False),
    _opt("recompute_h", "bool", False),
    _opt("impl", "str", "auto"),
    _opt("autocast_like", "str", DEFAULT_AUTOCAST_LIKE, role="autocast_like"),
    _opt("compute_dtype", "ScalarType?", None, role="compute_dtype"),
)


@dataclasses.dataclass(frozen=True)
class OpDescription:
    """A fused op's arguments: its schema, the Python signature of its entry point, and binding of
    a call's (args, kwargs) to names (what every kernel of the op does first)."""

    name: str
    args: tuple
    returns: str = "(Tensor, Tensor, Tensor)"

    @property
    def qualname(self) -> str:
        return f"moe_inductor::{self.name}"

    def schema(self) -> str:
        positional = [a.schema() for a in self.args if not a.kw_only]
        keyword = [a.schema() for a in self.args if a.kw_only]
        return f"({', '.join(positional + (['*'] + keyword if keyword else []))}) -> {self.returns}"

    def signature(self, python: bool = False) -> inspect.Signature:
        """The schema as a Python signature; ``python``: with the entry point's extra defaults."""
        return inspect.Signature([a.parameter(python) for a in self.args])

    def names(self, role: str) -> tuple:
        return tuple(a.name for a in self.args if a.role == role)

    @functools.cached_property
    def _plan(self) -> tuple:
        positional = tuple(a.name for a in self.args if not a.kw_only)
        defaults = {a.name: a.default for a in self.args if a.default is not REQUIRED}
        return positional, defaults, frozenset(a.name for a in self.args)

    def bind(self, args: Sequence, kwargs: dict) -> dict:
        """{name: value} of a call, defaults filled in (the dispatcher leaves defaults out). Runs on
        every call of the op, so by hand; a bad call gets ``inspect``'s error message."""
        positional, defaults, names = self._plan
        if len(args) <= len(positional) and names.issuperset(kwargs) and kwargs.keys().isdisjoint(
                positional[:len(args)]):
            values = dict(defaults)
            values.update(zip(positional, args))
            values.update(kwargs)
            if len(values) == len(names):
                return values
        try:
            self.signature().bind(*args, **kwargs)
            problem = "cannot bind the arguments"  # not reached: the checks above are bind's
        except TypeError as e:
            problem = str(e)
        raise TypeError(f"{self.name}: {problem}; signature: {self.name}{self.signature(python=True)}")

    def split(self, values: dict) -> tuple[tuple, dict]:
        """(args, kwargs) to call the op with ``values`` (by name): keyword-only ones as keywords."""
        return (tuple(values[a.name] for a in self.args if not a.kw_only),
                {a.name: values[a.name] for a in self.args if a.kw_only})


FUSED_MOE = OpDescription("fused_moe", ROUTING_ARGS + STACKED_ARGS + OPTION_ARGS)
FUSED_MOE_EXPERTS = OpDescription("fused_moe_experts", ROUTING_ARGS + LIST_ARGS + OPTION_ARGS)
DESCRIPTIONS = (FUSED_MOE, FUSED_MOE_EXPERTS)


def requested_impl(impl: str) -> str:
    """The implementation a caller asked for: ``impl``, except that "auto" yields to the environment
    variable ``MOE_INDUCTOR_IMPL`` when that is set. The op calls it at run time on every call;
    ``report.runs_on`` calls it to predict the op's choice."""
    if impl not in IMPLS:
        raise ValueError(f"fused_moe: unknown impl {impl!r}; valid: {', '.join(IMPLS)}")
    if impl == "auto":
        impl = os.environ.get("MOE_INDUCTOR_IMPL", "auto")
        if impl not in IMPLS:
            raise ValueError(f"MOE_INDUCTOR_IMPL={impl!r}; valid: {', '.join(IMPLS)}")
    return impl



def check_inputs(x, token_ids, expert_ids, scores, w1, w2, b1, b2, activation, impl, compute_dtype=None) -> None:
    """Clear errors for direct calls; all checks are on metadata (no host sync)."""
    act = parse_activation(activation)
    if impl not in IMPLS:
        raise ValueError(f"fused_moe: unknown impl {impl!r}; valid: {', '.join(IMPLS)}")
    if x.dim() != 2:
        raise ValueError(f"fused_moe: x must be (T, d), got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"fused_moe: unsupported dtype {x.dtype}; supported: {FLOAT_DTYPES}")
    if compute_dtype is not None and x.dtype != compute_dtype:
        raise TypeError(f"fused_moe: x has dtype {x.dtype} but compute_dtype is {compute_dtype} (cast x to it)")
    for name, w in (("w1", w1), ("w2", w2), ("b1", b1), ("b2", b2)):
        if w is not None and compute_dtype is None and w.dtype != x.dtype:
            raise TypeError(f"fused_moe: {name} has dtype {w.dtype} but x has {x.dtype} (pass compute_dtype "
                            "to run the GEMMs in x's dtype with weights of another dtype)")
        if w is not None and w.dtype not in FLOAT_DTYPES:
            raise TypeError(f"fused_moe: {name} has unsupported dtype {w.dtype}; supported: {FLOAT_DTYPES}")
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
    if tuple(w2.shape) != (E, d, n) or h_cols != act.width * n:
        raise ValueError(
            f"fused_moe: inconsistent expert weights for activation {activation!r}: "
            f"w1 {tuple(w1.shape)} (expected (E, {'' if act.width == 1 else act.width}n, d)), w2 {tuple(w2.shape)} "
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
    impl = requested_impl(impl)
    if impl == "auto":
        if x.is_cuda:
            from moe_inductor.kernels import unsupported_reason

            reason = unsupported_reason(x, w1, w2, act, num_assignments)
            if reason is None:
                return "triton"
            log.info("sonic: Triton kernels cannot serve this call (%s); using the PyTorch path", reason)
        return "torch"
    if impl == "triton" and not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("fused_moe: impl='triton' on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported")
    if impl == "triton":
        from moe_inductor.kernels import unsupported_reason

        reason = unsupported_reason(x, w1, w2, act, num_assignments)
        if reason is not None:
            raise ValueError(f"fused_moe: impl='triton' cannot serve this call: {reason}")
    return impl


def register_gemm_autocast(qualname: str, cast: Sequence[str], like: str = "aten::linear") -> Any:
    """Autocast kernels (CPU, CUDA) for the operator ``qualname`` ("moe_inductor::name"): when eager
    autocast would cast the GEMM named ``like`` on that device, the floating arguments named in
    ``cast`` (float32/16, bfloat16; None left alone) go to the autocast dtype, then the operator runs
    below autocast. For ops standing in for a per-expert ``F.linear`` (``host_splits.grouped_mm``):
    what eager autocast did to each ``F.linear`` (both operands cast, kept by autograd as eager keeps
    them). Returns the library that holds the kernels (keep it alive)."""
    namespace, name = qualname.split("::")
    op = getattr(getattr(torch.ops, namespace), name).default
    params = [a.name for a in op._schema.arguments]

    def kernel(device_type, below, *args, **kwargs):
        bound = dict(zip(params, args), **kwargs)
        dt = autocast_dtype(like, device_type)
        tensors = [bound.get(n) for n in cast if bound.get(n) is not None]
        if dt is not None and all(t.dtype in _AUTOCAST_ELIGIBLE for t in tensors):
            for n in cast:
                if bound.get(n) is not None:
                    bound[n] = bound[n].to(dt)
        with below():
            return op(**bound)

    return _autocast_kernels(namespace, name, kernel)


def _autocast_kernels(namespace: str, name: str, kernel) -> Any:
    """Register ``kernel(device_type, below, *args, **kwargs)`` as the AutocastCPU / AutocastCUDA kernel
    of ``namespace::name``; ``below()`` is the context in which a call skips that Autocast key (the one
    place the dispatcher's private key guard is used). Returns the library (keep it alive)."""
    lib = torch.library.Library(namespace, "FRAGMENT")
    for device_type, key in _AUTOCAST_KEYS.items():
        keyset = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

        def impl(*args, _device_type=device_type, _keyset=keyset, **kwargs):
            return kernel(_device_type, lambda: torch._C._ExcludeDispatchKeyGuard(_keyset), *args, **kwargs)

        lib.impl(name, impl, key)
    return lib


def autocast_dtype(autocast_like: str, device_type: str) -> Optional[torch.dtype]:
    """The dtype eager autocast gives the GEMM named ``autocast_like`` (an operator's qualified
    name, e.g. "aten::linear") on ``device_type`` right now, or None: autocast is off, or that
    GEMM has no autocast rule there and runs in its inputs' dtype. (The GEMMs autocast lists,
    mm/bmm/linear/matmul/addmm/baddbmm, all go to the lower-precision dtype.)"""
    key = _AUTOCAST_KEYS.get(device_type)
    if not autocast_like or key is None or not torch.is_autocast_enabled(device_type):
        return None
    try:
        listed = torch._C._dispatch_has_kernel_for_dispatch_key(autocast_like, key)
    except RuntimeError:  # no such operator (e.g. its library is not loaded): no rule
        listed = False
    return torch.get_autocast_dtype(device_type) if listed else None


def _cast(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _forward(x, token_ids, expert_ids, scores, w1, w2, b1, b2, act, interleaved, recompute_h, impl):
    """Forward of both ops, on stacked weights already in x's dtype."""
    if interleaved and act.width == 3:
        raise ValueError(f"fused_moe: activation {act.spec!r} takes H = [x1 | x2 | up] concatenated; "
                         "interleaved=True is not a layout it has")
    which = _resolve_impl(impl, x, w1, w2, act, token_ids.shape[0])
    if not x.is_cuda:
        _check_routing_values(token_ids, expert_ids, x.shape[0], w1.shape[0])
    elif token_ids.numel():
        # out-of-range ids would make the kernels read out of bounds: check on device, no sync
        T, E = x.shape[0], w1.shape[0]
        torch._assert_async(((token_ids >= 0) & (token_ids < T)).all(), "fused_moe: token_ids outside [0, T)")
        torch._assert_async(((expert_ids >= -1) & (expert_ids < E)).all(), "fused_moe: expert_ids outside [-1, E)")
    stats.record_routing(expert_ids, x.shape[0], w1.shape[0])  # only while someone listens
    if which == "triton":
        from moe_inductor.kernels import triton_moe_forward

        return triton_moe_forward(x, token_ids, expert_ids, scores, w1, w2, b1, b2, act, interleaved, not recompute_h)
    return reference.moe_forward(x, token_ids, expert_ids, scores, w1, w2, b1, b2, act, interleaved, not recompute_h)


def _backward_grads(grad_out, x, token_ids, expert_ids, scores, w1, w2, b1, b2, h_sorted, order, act,
                    interleaved, recompute_h, impl):
    """(dx, dscores, dw1, dw2, db1|None, db2|None) of both ops; weights in x's dtype."""
    which = _resolve_impl(impl, x, w1, w2, act, token_ids.shape[0])
    h = None if recompute_h else h_sorted
    if which == "triton":
        from moe_inductor.kernels import triton_moe_backward

        return triton_moe_backward(grad_out, x, token_ids, expert_ids, scores, w1, w2, b1, b2, h, order, act, interleaved)
    return reference.moe_backward(grad_out, x, token_ids, expert_ids, scores, w1, w2, b1, b2, h, order, act, interleaved)


# --------------------------------------------------------------------------- stacked weights

def _fused_moe_impl(*args, **kwargs) -> tuple[Tensor, Tensor, Tensor]:
    a = FUSED_MOE.bind(args, kwargs)
    x, activation, impl, dt = a["x"], a["activation"], a["impl"], a["x"].dtype
    check_inputs(x, a["token_ids"], a["expert_ids"], a["scores"], a["w1"], a["w2"], a["b1"], a["b2"], activation,
                 impl, a["compute_dtype"])
    return _forward(x, a["token_ids"], a["expert_ids"], a["scores"], _cast(a["w1"], dt), _cast(a["w2"], dt),
                    _cast(a["b1"], dt), _cast(a["b2"], dt), parse_activation(activation), a["interleaved"],
                    a["recompute_h"], impl)


def _stacked_fake(x, token_ids, expert_ids, scores, w1, w2, b1, b2, activation, recompute_h, impl, compute_dtype):
    check_inputs(x, token_ids, expert_ids, scores, w1, w2, b1, b2, activation, impl, compute_dtype)
    A = token_ids.shape[0]
    out = x.new_empty(x.shape)
    h = x.new_empty((0 if recompute_h else A, w1.shape[1]))
    order = token_ids.new_empty((A,), dtype=torch.int32)
    return out, h, order


def _fused_moe_fake(*args, **kwargs):
    a = FUSED_MOE.bind(args, kwargs)
    return _stacked_fake(a["x"], a["token_ids"], a["expert_ids"], a["scores"], a["w1"], a["w2"], a["b1"], a["b2"],
                         a["activation"], a["recompute_h"], a["impl"], a["compute_dtype"])


_fused_moe = torch.library.custom_op(FUSED_MOE.qualname, _fused_moe_impl, mutates_args=(), schema=FUSED_MOE.schema())
_fused_moe.register_fake(_fused_moe_fake)


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
    # weights of another dtype than x (compute_dtype in forward) are cast again here, transiently;
    # their gradients go back to their own dtype
    dt = x.dtype
    dx, dscores, dw1, dw2, db1, db2 = _backward_grads(
        grad_out, x, token_ids, expert_ids, scores, _cast(w1, dt), _cast(w2, dt), _cast(b1, dt), _cast(b2, dt),
        h_sorted, order, parse_activation(activation), interleaved, recompute_h, impl)
    # custom ops cannot return None: empty tensors stand for "no bias"
    db1 = x.new_empty(0) if db1 is None else _cast(db1, b1.dtype)
    db2 = x.new_empty(0) if db2 is None else _cast(db2, b2.dtype)
    return dx, dscores, _cast(dw1, w1.dtype), _cast(dw2, w2.dtype), db1, db2


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


def _fit(ctx, grads: tuple) -> tuple:
    # one entry per positional input the op was called with (ctx.needs_input_grad has the caller's
    # structure): trailing arguments left at their defaults are absent (their gradient is None)
    n = len(ctx.needs_input_grad)
    return (tuple(grads) + (None,) * n)[:n]


def _setup_context(ctx, inputs, keyword_only_inputs, output):
    a = FUSED_MOE.bind(inputs, keyword_only_inputs)
    _, h_sorted, order = output
    ctx.save_for_backward(*(a[k] for k in ("x", "token_ids", "expert_ids", "scores", "w1", "w2", "b1", "b2")),
                          h_sorted, order)
    ctx.config = (a["activation"], a["interleaved"], a["recompute_h"], a["impl"])


def _backward(ctx, grad_out, _grad_h, _grad_order):
    x, token_ids, expert_ids, scores, w1, w2, b1, b2, h_sorted, order = ctx.saved_tensors
    activation, interleaved, recompute_h, impl = ctx.config
    dx, dscores, dw1, dw2, db1, db2 = torch.ops.moe_inductor.fused_moe_backward(
        grad_out, x, token_ids, expert_ids, scores, w1, w2, b1, b2, h_sorted, order,
        activation, interleaved, recompute_h, impl,
    )
    grads = (dx, None, None, dscores, dw1, dw2, db1 if b1 is not None else None, db2 if b2 is not None else None)
    return _fit(ctx, grads)


_fused_moe.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- per-expert weight lists

def _check_expert_lists(x, w_gate, w_up, w_down, b_gate, b_up, b_down, width: int) -> None:
    """``width``: ``Activation.width``; w_up only for 2 (gate and up alike) or 3 (w_gate has twice
    w_up's rows: the x1 and x2 halves)."""
    E = len(w_gate)
    if E == 0:
        raise ValueError("fused_moe_experts: w_gate is empty (one weight per expert expected)")
    if len(w_down) != E or len(w_up) not in (0, E):
        raise ValueError(f"fused_moe_experts: inconsistent expert lists: {E} w_gate, {len(w_up)} w_up, "
                         f"{len(w_down)} w_down (w_up: one per expert, or none)")
    if w_up and width == 1:
        raise ValueError("fused_moe_experts: w_up given for a non-gated activation")
    if len(b_gate) not in (0, E) or len(b_down) not in (0, E) or len(b_up) != (len(w_up) if b_gate else 0):
        raise ValueError(f"fused_moe_experts: inconsistent bias lists: {len(b_gate)} b_gate, {len(b_up)} b_up, "
                         f"{len(b_down)} b_down for {E} experts (all or none; b_up exactly when w_up and b_gate)")
    device = x.get_device()  # an int: cheaper than comparing torch.device objects, per call
    for name, parts in (("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down), ("b_gate", b_gate),
                        ("b_up", b_up), ("b_down", b_down)):
        if not parts:
            continue
        shape, dtype = parts[0].shape, parts[0].dtype
        if parts[0].device.type != x.device.type or any(
                p.shape != shape or p.dtype != dtype or p.get_device() != device for p in parts):
            raise ValueError(f"fused_moe_experts: the {name} entries differ in shape, dtype or device "
                                 f"(or are not on x's device {x.device})")
    for (a, b), (ta, tb) in ((("w_gate", "w_up"), (w_gate, w_up)), (("b_gate", "b_up"), (b_gate, b_up))):
        if not tb:
            continue
        want = tb[0].shape if width != 3 else torch.Size((2 * tb[0].shape[0],) + tuple(tb[0].shape[1:]))
        if (ta[0].shape != want or ta[0].dtype != tb[0].dtype):
            raise ValueError(f"fused_moe_experts: {a} {tuple(ta[0].shape)} {ta[0].dtype} and {b} "
                             f"{tuple(tb[0].shape)} {tb[0].dtype} differ in shape or dtype"
                             + (f" (swiglu3: {a} has twice {b}'s rows)" if width == 3 else ""))


def _stacked(first, second, dtype, real: bool) -> Optional[Tensor]:
    """(E, rows, ...) stack of the per-expert ``first`` (and ``second`` below each, the up half of
    a gated expert) in ``dtype``: one copy (cast on the way), transient. Not ``real``: the shape
    only, as a zero-stride view (for checks and fake tensors)."""
    if not first:
        return None
    E, rows = len(first), first[0].shape[0] + (second[0].shape[0] if second else 0)
    shape = (E, rows) + tuple(first[0].shape[1:])
    if not real:
        return first[0].new_empty((), dtype=dtype).expand(shape)
    if second and second[0].shape != first[0].shape:  # swiglu3: [x1 | x2] rows above the up rows
        return torch.stack([torch.cat((f.to(dtype), u.to(dtype))) for f, u in zip(first, second)])
    pieces = [t for pair in zip(first, second) for t in pair] if second else list(first)
    out = first[0].new_empty((len(pieces),) + tuple(first[0].shape), dtype=dtype)
    torch.stack(pieces, 0, out=out)  # [g0, u0, g1, u1, ...]: (E, gate rows then up rows, ...)
    return out.view(shape)


def _expert_lists(x, w_gate, w_up, w_down, b_gate, b_up, b_down):
    """(w1, w2, b1, b2) as ``reference.ExpertList`` views of the lists (nothing stacked; cast to x's
    dtype expert by expert as the PyTorch path reads them)."""
    def view(first, second):
        return reference.ExpertList(first, second, x.dtype) if first else None

    return view(w_gate, w_up), view(w_down, []), view(b_gate, b_up), view(b_down, [])


def _experts_weights(x, token_ids, impl, activation, lists, shapes=None):
    """The weights ``fused_moe_experts`` computes with: per-expert views on the PyTorch path (only
    the experts that receive rows are read), stacks for the Triton kernels. Returns (impl, weights).
    ``shapes``: ``_expert_stacks(..., real=False)`` of the lists when the caller has it."""
    shapes = shapes if shapes is not None else _expert_stacks(x, *lists, activation, real=False)
    which = _resolve_impl(impl, x, shapes[0], shapes[1], parse_activation(activation), token_ids.shape[0])
    if which == "torch":
        return which, _expert_lists(x, *lists)
    return which, _expert_stacks(x, *lists, activation, real=True)


def _expert_stacks(x, w_gate, w_up, w_down, b_gate, b_up, b_down, activation, real: bool):
    """Validated (w1, w2, b1, b2) stacks: in x's dtype (``real``), or shape-only views in the
    weights' own dtypes (for ``check_inputs`` and the fake kernels)."""
    _check_expert_lists(x, w_gate, w_up, w_down, b_gate, b_up, b_down, parse_activation(activation).width)

    def stack(first, second):
        return _stacked(first, second, x.dtype if real else first[0].dtype, real) if first else None

    return stack(w_gate, w_up), stack(w_down, []), stack(b_gate, b_up), stack(b_down, [])


def _list_values(a: dict) -> tuple:
    """The six lists of a bound ``fused_moe_experts`` call, in the order the helpers take them."""
    return tuple(list(a[k]) for k in ("w_gate", "w_up", "w_down", "b_gate", "b_up", "b_down"))


def _fused_moe_experts_impl(*args, **kwargs) -> tuple[Tensor, Tensor, Tensor]:
    a = FUSED_MOE_EXPERTS.bind(args, kwargs)
    x, token_ids, activation, impl = a["x"], a["token_ids"], a["activation"], a["impl"]
    lists = _list_values(a)
    shapes = _expert_stacks(x, *lists, activation, real=False)
    _check_interleaved(a["interleaved"], a["w_up"])
    check_inputs(x, token_ids, a["expert_ids"], a["scores"], *shapes, activation, impl, a["compute_dtype"])
    which, (w1, w2, b1, b2) = _experts_weights(x, token_ids, impl, activation, lists, shapes)
    return _forward(x, token_ids, a["expert_ids"], a["scores"], w1, w2, b1, b2, parse_activation(activation),
                    a["interleaved"], a["recompute_h"], which)


def _check_interleaved(interleaved: bool, w_up) -> None:
    if interleaved and len(w_up):
        raise ValueError("fused_moe_experts: interleaved=True needs the gate and up columns in one w_gate[e] "
                         "(2n, d) per expert and no w_up")


def _fused_moe_experts_fake(*args, **kwargs):
    a = FUSED_MOE_EXPERTS.bind(args, kwargs)
    w1, w2, b1, b2 = _expert_stacks(a["x"], *_list_values(a), a["activation"], real=False)
    _check_interleaved(a["interleaved"], a["w_up"])
    return _stacked_fake(a["x"], a["token_ids"], a["expert_ids"], a["scores"], w1, w2, b1, b2, a["activation"],
                         a["recompute_h"], a["impl"], a["compute_dtype"])


_fused_moe_experts = torch.library.custom_op(FUSED_MOE_EXPERTS.qualname, _fused_moe_experts_impl, mutates_args=(),
                                             schema=FUSED_MOE_EXPERTS.schema())
_fused_moe_experts.register_fake(_fused_moe_experts_fake)


@torch.library.custom_op("moe_inductor::fused_moe_experts_backward", mutates_args=())
def _fused_moe_experts_backward(
    grad_out: Tensor,
    x: Tensor,
    token_ids: Tensor,
    expert_ids: Tensor,
    scores: Tensor,
    w_gate: list[Tensor],
    w_up: list[Tensor],
    w_down: list[Tensor],
    b_gate: list[Tensor],
    b_up: list[Tensor],
    b_down: list[Tensor],
    h_sorted: Tensor,
    order: Tensor,
    activation: str,
    recompute_h: bool,
    impl: str,
    interleaved: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients with the weights restacked (transiently): dx, dscores, and the stacked
    dw1 (E, 2n|n, d), dw2 (E, d, n), db1, db2 (empty when absent) in the weights' dtypes, which
    the autograd formula splits into per-expert views."""
    which, (w1, w2, b1, b2) = _experts_weights(x, token_ids, impl, activation,
                                               (w_gate, w_up, w_down, b_gate, b_up, b_down))
    dx, dscores, dw1, dw2, db1, db2 = _backward_grads(
        grad_out, x, token_ids, expert_ids, scores, w1, w2, b1, b2, h_sorted, order, parse_activation(activation),
        interleaved, recompute_h, which)
    db1 = x.new_empty(0) if db1 is None else _cast(db1, b_gate[0].dtype)
    db2 = x.new_empty(0) if db2 is None else _cast(db2, b_down[0].dtype)
    return dx, dscores, _cast(dw1, w_gate[0].dtype), _cast(dw2, w_down[0].dtype), db1, db2


@_fused_moe_experts_backward.register_fake
def _fused_moe_experts_backward_fake(grad_out, x, token_ids, expert_ids, scores, w_gate, w_up, w_down, b_gate, b_up,
                                     b_down, h_sorted, order, activation, recompute_h, impl, interleaved=False):
    w1, w2, b1, b2 = _expert_stacks(x, w_gate, w_up, w_down, b_gate, b_up, b_down, activation, real=False)
    return (x.new_empty(x.shape), scores.new_empty(scores.shape), w1.new_empty(w1.shape), w2.new_empty(w2.shape),
            b1.new_empty(b1.shape) if b1 is not None else x.new_empty(0),
            b2.new_empty(b2.shape) if b2 is not None else x.new_empty(0))


def _experts_setup_context(ctx, inputs, keyword_only_inputs, output):
    a = FUSED_MOE_EXPERTS.bind(inputs, keyword_only_inputs)
    _, h_sorted, order = output
    lists = _list_values(a)
    # the per-expert weights themselves (parameters), not a stacked copy
    ctx.save_for_backward(a["x"], a["token_ids"], a["expert_ids"], a["scores"], h_sorted, order,
                          *[t for l in lists for t in l])
    ctx.lengths = [len(l) for l in lists]
    ctx.config = (a["activation"], a["recompute_h"], a["impl"], bool(a["interleaved"]))


def _per_expert(stacked: Tensor, up: list) -> tuple[list, list]:
    """Per-expert gradients (views) of a stacked (E, rows, ...) gradient: (all rows, []) or, with
    ``up`` the per-expert up weights (or biases), (gate rows, the last ``up[0].shape[0]`` rows)."""
    if not up:
        return list(stacked.unbind(0)), []
    split = stacked.shape[1] - up[0].shape[0]
    return list(stacked[:, :split].unbind(0)), list(stacked[:, split:].unbind(0))


def _experts_backward(ctx, grad_out, _grad_h, _grad_order):
    saved = ctx.saved_tensors
    x, token_ids, expert_ids, scores, h_sorted, order = saved[:6]
    lists, i = [], 6
    for n in ctx.lengths:
        lists.append(list(saved[i:i + n]))
        i += n
    w_gate, w_up, w_down, b_gate, b_up, b_down = lists
    activation, recompute_h, impl, interleaved = ctx.config
    dx, dscores, dw1, dw2, db1, db2 = torch.ops.moe_inductor.fused_moe_experts_backward(
        grad_out, x, token_ids, expert_ids, scores, w_gate, w_up, w_down, b_gate, b_up, b_down, h_sorted, order,
        activation, recompute_h, impl, interleaved)
    dgate, dup = _per_expert(dw1, w_up)
    dbg, dbu = _per_expert(db1, b_up) if b_gate else ([], [])
    ddown = _per_expert(dw2, [])[0]
    dbd = _per_expert(db2, [])[0] if b_down else []
    grads = (dx, None, None, dscores, dgate, ddown, dup, dbg, dbu, dbd)  # FUSED_MOE_EXPERTS' order
    return _fit(ctx, grads)


_fused_moe_experts.register_autograd(_experts_backward, setup_context=_experts_setup_context)


# --------------------------------------------------------------------------- autocast

def _register_autocast(op, description: OpDescription):
    """Autocast kernels (CPU, CUDA) for ``op``: what eager autocast does to the GEMM named by the
    ``autocast_like`` argument. x is cast here, above autograd, so autograd keeps the cast copy
    (as for an autocast-listed GEMM); the weights are passed on uncast with ``compute_dtype`` set,
    and the op casts them transiently, so no weight-sized copy is kept for backward. Arguments are
    found by their role in ``description``, by name."""
    (x_name,), (like_name,), (dtype_name,) = (description.names(r) for r in ("x", "autocast_like", "compute_dtype"))
    weight_names = description.names("weight")

    def kernel(device_type, below, *args, **kwargs):
        a = description.bind(args, kwargs)
        x = a[x_name]
        dt = autocast_dtype(a[like_name], device_type)
        weights = [t for name in weight_names
                   for t in (a[name] if isinstance(a[name], (list, tuple)) else [a[name]]) if t is not None]
        if (dt is not None and a[dtype_name] is None and x.dtype in _AUTOCAST_ELIGIBLE
                and all(w.dtype in _AUTOCAST_ELIGIBLE for w in weights)):
            a[x_name] = x.to(dt)
            a[dtype_name] = dt
        call_args, call_kwargs = description.split(a)
        with below():
            return op.default(*call_args, **call_kwargs)

    return _autocast_kernels("moe_inductor", description.name, kernel)


_AUTOCAST_LIBS = [
    _register_autocast(torch.ops.moe_inductor.fused_moe, FUSED_MOE),
    _register_autocast(torch.ops.moe_inductor.fused_moe_experts, FUSED_MOE_EXPERTS),
]


# --------------------------------------------------------------------------- Python entry points
# Their parameters are the descriptions' (names, order, keyword-only tail, defaults; the lists of
# fused_moe_experts may be left out here): tests/test_op_surface.py checks it.

def fused_moe(
    x: Tensor,
    token_ids: Tensor,
    expert_ids: Tensor,
    scores: Tensor,
    w1: Tensor,
    w2: Tensor,
    b1: Optional[Tensor] = None,
    b2: Optional[Tensor] = None,
    *,
    activation: str = "swiglu",
    interleaved: bool = False,
    recompute_h: bool = False,
    impl: str = "auto",
    autocast_like: str = DEFAULT_AUTOCAST_LIKE,
    compute_dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """Mixture-of-experts MLP over general routing assignments (``torch.ops.moe_inductor.fused_moe``,
    returning ``out`` alone).

    out[t] = sum over assignments a with token_ids[a] == t of
             scores[a] * (act(x[t] @ w1[e].T + b1[e]) @ w2[e].T + b2[e]),  e = expert_ids[a]

    x (T, d); token_ids, expert_ids (A,) int32/int64; scores (A,). An expert id of -1 marks a
    dropped (padding) assignment: it adds nothing and its score gets gradient 0, so routings of
    a static length (``moe_inductor.ops.routing.token_rounding_routing(static_shape=True)``) cost no
    GEMM rows for their padding. w1 (E, 2n, d) for gated
    activations (gate then up, or interleaved), (E, n, d) otherwise; w2 (E, d, n). Weights may be
    transposed views. Differentiable in x, scores, w1, w2, b1, b2.

    Under ``torch.autocast`` the op computes as the GEMM ``autocast_like`` would (default
    "aten::mm": in the autocast dtype; "" ignores autocast). ``compute_dtype``: run the GEMMs in
    this dtype (x is cast to it; weights of another dtype are cast transiently, never kept).
    The output has the compute dtype.
    """
    if compute_dtype is not None and x.dtype != compute_dtype:
        x = x.to(compute_dtype)
    out, _, _ = torch.ops.moe_inductor.fused_moe(
        x, token_ids, expert_ids, scores, w1, w2, b1, b2, activation=activation, interleaved=interleaved,
        recompute_h=recompute_h, impl=impl, autocast_like=autocast_like, compute_dtype=compute_dtype,
    )
    return out


def fused_moe_experts(
    x: Tensor,
    token_ids: Tensor,
    expert_ids: Tensor,
    scores: Tensor,
    w_gate: Sequence[Tensor],
    w_down: Sequence[Tensor],
    w_up: Sequence[Tensor] = (),
    b_gate: Sequence[Tensor] = (),
    b_up: Sequence[Tensor] = (),
    b_down: Sequence[Tensor] = (),
    *,
    activation: str = "swiglu",
    interleaved: bool = False,
    recompute_h: bool = False,
    impl: str = "auto",
    autocast_like: str = DEFAULT_AUTOCAST_LIKE,
    compute_dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """``fused_moe`` with the experts' weights as per-expert lists (e.g. the ``weight`` of each
    expert's ``nn.Linear``; ``torch.ops.moe_inductor.fused_moe_experts``, returning ``out``):
    w_gate[e] (n, d) with w_up[e] (n, d) for gated activations (or
    w_gate[e] (2n, d) holding both halves, gate first, and no w_up), w_gate[e] (n, d) alone
    otherwise; w_down[e] (d, n); optional biases per list. ``interleaved``: w_gate[e] (2n, d)
    holds the gate and up rows interleaved (gate at even rows, GPT-OSS's layout), with no w_up.
    Same result as ``fused_moe`` on the stacked weights, but the stack is made inside the op and
    dropped: backward keeps the lists (no weight-sized copy) and gets per-expert gradients."""
    if compute_dtype is not None and x.dtype != compute_dtype:
        x = x.to(compute_dtype)
    out, _, _ = torch.ops.moe_inductor.fused_moe_experts(
        x, token_ids, expert_ids, scores, list(w_gate), list(w_down), list(w_up), list(b_gate), list(b_up),
        list(b_down), activation=activation, interleaved=interleaved, recompute_h=recompute_h, impl=impl,
        autocast_like=autocast_like, compute_dtype=compute_dtype,
    )
    return out
