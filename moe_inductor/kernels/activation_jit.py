"""Expert activations as @triton.jit helpers for the GEMM epilogues (forward and derivative).

Mirrors ``moe_inductor.ops.activations`` (the PyTorch source of truth) formula by formula; the
activation kind is a constexpr so each kernel specialisation contains only its own math.
All inputs are fp32 tiles.
"""
from __future__ import annotations

import triton
import triton.language as tl

from moe_inductor.ops.activations import Activation

SILU = 0
GELU = 1
GELU_TANH = 2
RELU = 3
GPTOSS = 4
SWIGLU_LIMIT = 5  # clamped SwiGLU; the clamp is the runtime scalar `limit`
SOFTCAP_SWIGLU = 6  # softcapped SwiGLU; gate cap = runtime `alpha`, up cap = runtime `limit`
RELU2 = 7
SWIGLU_LIMIT_AFTER = 8  # SwiGLU clamped after the activation (Step-3.7); the clamp is the runtime `limit`
SWIGLU3 = 9  # three factors x1 * silu(x2) * up of H = [x1 | x2 | up]; the kernels' third column block

_KIND_CODE = {
    "swiglu": SILU, "silu": SILU,
    "geglu": GELU, "gelu": GELU,
    "geglu_tanh": GELU_TANH, "gelu_tanh": GELU_TANH,
    "relu": RELU,
    "gptoss": GPTOSS,
    "swiglu_limit": SWIGLU_LIMIT,
    "swiglu_limit_after": SWIGLU_LIMIT_AFTER,
    "softcap_swiglu": SOFTCAP_SWIGLU,
    "relu2": RELU2,
    "swiglu3": SWIGLU3,
}


def act_code(act: Activation) -> int:
    return _KIND_CODE[act.kind]


@triton.jit
def _sigmoid(z):
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def _tanh(z):
    # tanh(z) = 2 sigmoid(2z) - 1: no libdevice dependency, so it runs in the interpreter too.
    return 2.0 * _sigmoid(2.0 * z) - 1.0


@triton.jit
def unary_fwd(z, KIND: tl.constexpr):
    if KIND == 0:
        r = z * _sigmoid(z)
    elif KIND == 1:
        r = 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))
    elif KIND == 2:
        r = 0.5 * z * (1.0 + _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z)))
    elif KIND == 7:
        p = tl.maximum(z, 0.0)
        r = p * p
    else:
        r = tl.maximum(z, 0.0)
    return r


@triton.jit
def unary_grad(z, KIND: tl.constexpr):
    if KIND == 0:
        s = _sigmoid(z)
        r = s * (1.0 + z * (1.0 - s))
    elif KIND == 1:
        cdf = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476))
        pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
        r = cdf + z * pdf
    elif KIND == 2:
        t = _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z))
        r = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * z * z)
    elif KIND == 7:
        r = 2.0 * tl.maximum(z, 0.0)
    else:
        r = tl.where(z > 0.0, 1.0, 0.0)
    return r


@triton.jit
def gated_fwd(g, u, alpha, limit, KIND: tl.constexpr):
    if KIND == 4:
        gc = tl.minimum(g, limit)
        uc = tl.minimum(tl.maximum(u, -limit), limit)
        r = gc * _sigmoid(alpha * gc) * (uc + 1.0)
    elif KIND == 5:
        gc = tl.minimum(g, limit)
        uc = tl.minimum(tl.maximum(u, -limit), limit)
        r = gc * _sigmoid(gc) * uc
    elif KIND == 8:
        uc = tl.minimum(tl.maximum(u, -limit), limit)
        r = tl.minimum(g * _sigmoid(g), limit) * uc
    elif KIND == 6:
        # softcap(g, alpha) * sigmoid(g) * softcap(u, limit), softcap(z, c) = tanh(z / c) * c
        r = _tanh(g / alpha) * alpha * _sigmoid(g) * (_tanh(u / limit) * limit)
    else:
        r = unary_fwd(g, KIND) * u
    return r


@triton.jit
def gated_bwd(g, u, da, alpha, limit, KIND: tl.constexpr):
    """(dgate, dup) from dA for a = f(gate) * up (or the clamped / softcapped forms)."""
    if KIND == 4:
        gc = tl.minimum(g, limit)
        uc = tl.minimum(tl.maximum(u, -limit), limit)
        s = _sigmoid(alpha * gc)
        glu = gc * s
        dglu = s * (1.0 + alpha * gc * (1.0 - s))
        dg = tl.where(g <= limit, da * (uc + 1.0) * dglu, 0.0)
        du = tl.where((u >= -limit) & (u <= limit), da * glu, 0.0)
    elif KIND == 5:
        gc = tl.minimum(g, limit)
        uc = tl.minimum(tl.maximum(u, -limit), limit)
        s = _sigmoid(gc)
        dg = tl.where(g <= limit, da * uc * (s * (1.0 + gc * (1.0 - s))), 0.0)
        du = tl.where((u >= -limit) & (u <= limit), da * (gc * s), 0.0)
    elif KIND == 8:
        uc = tl.minimum(tl.maximum(u, -limit), limit)
        s = _sigmoid(g)
        sg = g * s
        dg = tl.where(sg <= limit, da * uc * (s * (1.0 + g * (1.0 - s))), 0.0)
        du = tl.where((u >= -limit) & (u <= limit), da * tl.minimum(sg, limit), 0.0)
    elif KIND == 6:
        tg = _tanh(g / alpha)
        tu = _tanh(u / limit)
        s = _sigmoid(g)
        # d/dg [alpha tanh(g/alpha) sigmoid(g)] = (1 - tg^2) s + alpha tg s (1 - s)
        dg = da * (tu * limit) * ((1.0 - tg * tg) * s + alpha * tg * s * (1.0 - s))
        du = da * (tg * alpha * s) * (1.0 - tu * tu)
    else:
        dg = da * u * unary_grad(g, KIND)
        du = da * unary_fwd(g, KIND)
    return dg, du
