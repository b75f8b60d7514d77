"""Expert activations: forward and hand-written backward, shared by every implementation.

An activation spec is a string so that the fused op's schema never changes when one is added:

  gated (the first projection yields gate and up, 2n columns):
    "swiglu"                silu(gate) * up
    "geglu"                 gelu(gate) * up               (erf gelu)
    "geglu_tanh"            gelu_tanh(gate) * up
    "gptoss:<alpha>:<limit>" GPT-OSS: g = gate.clamp(max=limit), u = up.clamp(-limit, limit),
                            g * sigmoid(alpha * g) * (u + 1)
    "swiglu_limit:<limit>"  clamped SwiGLU (DeepSeek-V4, HY-V4, GLM-5-Next):
                            silu(gate.clamp(max=limit)) * up.clamp(-limit, limit)
    "swiglu_limit_after:<limit>" SwiGLU clamped after the activation (Step-3.7):
                            silu(gate).clamp(max=limit) * up.clamp(-limit, limit)
    "softcap_swiglu:<cg>:<cu>" Inkling2: softcap(gate, cg) * sigmoid(gate) * softcap(up, cu),
                            softcap(z, c) = tanh(z / c) * c
  three-factor (the first projection yields x1, x2 and up, 3n columns [x1 | x2 | up], concatenated):
    "swiglu3"               x1 * silu(x2) * up            (OpenMoE's ``swiglu_act_fn(gate(z)) * up(z)``:
                            gate's 2n columns split in halves x1, x2; the fused weight is gate's
                            rows with up's below them, as for a gated kind with separate weights)
  non-gated (n columns):
    "silu", "gelu", "gelu_tanh", "relu"
    "relu2"                 relu(z) ** 2 (Nemotron-H's "relu2")

Every kind has a Triton epilogue (``kernels/activation_jit.py``, formula by formula the same as
here); GATED_TORCH_ONLY / NON_GATED_TORCH_ONLY would list kinds served by the PyTorch path only
(``kernels.unsupported_reason`` says so) and are empty.

Gate/up layout of the 2n columns: "concat" (gate = [:n], up = [n:]) or interleaved
(gate = [0::2], up = [1::2]). A gated spec may end in "+up_first" (e.g. "swiglu+up_first",
"gptoss:1.702:7.0+up_first"): the up half comes first, the gate second (rxlm's
``lin, gate = h.chunk(2, -1); lin * act(gate)``): concat up = [:n], gate = [n:]; interleaved
up = [0::2], gate = [1::2]. Same formula, the fused weight used as it is (no column copy).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

GATED = ("swiglu", "geglu", "geglu_tanh", "gptoss", "swiglu_limit", "swiglu_limit_after", "softcap_swiglu")
NON_GATED = ("silu", "gelu", "gelu_tanh", "relu", "relu2")
#: three factors of one 3n-column H (``Activation.width`` 3)
TRIPLE = ("swiglu3",)
GATED_TORCH_ONLY: tuple = ()
NON_GATED_TORCH_ONLY: tuple = ()
#: the form of each parameterised kind, for error messages
FORMS = {
    "gptoss": "'gptoss:<alpha>:<limit>' (e.g. 'gptoss:1.702:7.0')",
    "swiglu_limit": "'swiglu_limit:<limit>' (e.g. 'swiglu_limit:10.0')",
    "swiglu_limit_after": "'swiglu_limit_after:<limit>' (e.g. 'swiglu_limit_after:7.0')",
    "softcap_swiglu": "'softcap_swiglu:<gate cap>:<up cap>' (e.g. 'softcap_swiglu:30.0:30.0')",
}
ALL_KINDS = GATED + NON_GATED + TRIPLE + GATED_TORCH_ONLY + NON_GATED_TORCH_ONLY
#: the spec suffix of the "up half first" layout of a gated activation's 2n columns
UP_FIRST = "+up_first"


@dataclass(frozen=True)
class Activation:
    kind: str
    alpha: float = 1.702
    limit: float = 7.0
    #: gated only: the up half comes before the gate half (see the module docstring)
    up_first: bool = False

    @property
    def gated(self) -> bool:
        return self.kind in GATED or self.kind in GATED_TORCH_ONLY

    @property
    def width(self) -> int:
        """Columns of H per activation column: 3 (``TRIPLE``), 2 (gated) or 1."""
        return 3 if self.kind in TRIPLE else 2 if self.gated else 1

    @property
    def triton(self) -> bool:
        """Whether the Triton epilogue implements this kind."""
        return self.kind in GATED or self.kind in NON_GATED or self.kind in TRIPLE

    @property
    def spec(self) -> str:
        return self._base_spec + (UP_FIRST if self.up_first else "")

    @property
    def _base_spec(self) -> str:
        if self.kind == "gptoss":
            return f"gptoss:{self.alpha!r}:{self.limit!r}"
        if self.kind in ("swiglu_limit", "swiglu_limit_after"):
            return f"{self.kind}:{self.limit!r}"
        if self.kind == "softcap_swiglu":  # alpha = gate softcap, limit = up softcap
            return f"softcap_swiglu:{self.alpha!r}:{self.limit!r}"
        return self.kind


def _numbers(spec: str, kind: str, parts: list, names: tuple) -> list:
    """The numeric parameters of ``spec`` (finite floats), or a ValueError naming the activation,
    the parameter and the expected form."""
    if len(parts) != len(names) + 1:
        raise ValueError(f"activation {spec!r}: {kind} takes {len(names)} parameter(s) "
                         f"({', '.join(names)}); expected {FORMS[kind]}")
    values = []
    for name, text in zip(names, parts[1:]):
        try:
            v = float(text)
        except ValueError:
            raise ValueError(f"activation {spec!r}: {name} {text!r} is not a number; expected {FORMS[kind]}") from None
        if not math.isfinite(v):
            raise ValueError(f"activation {spec!r}: {name} must be finite, got {text!r}; expected {FORMS[kind]}")
        values.append(v)
    return values


@functools.lru_cache(maxsize=None)
def parse_activation(spec: str) -> Activation:
    if not isinstance(spec, str):
        raise TypeError(f"activation must be a string such as 'swiglu', got {type(spec).__name__} {spec!r}")
    up_first = spec.endswith(UP_FIRST)
    base = spec[:-len(UP_FIRST)] if up_first else spec
    tail = base.rpartition("+")[2]
    if "+" in base and not tail[:1].isdigit():  # not the exponent sign of a number ("1e+3")
        raise ValueError(f"activation {spec!r}: unknown suffix {'+' + tail!r}; the only suffix is "
                         f"{UP_FIRST!r} (gated kinds: up half first, gate half second), once")
    act = _parse_base(base)
    if not up_first:
        return act
    if not act.gated:
        raise ValueError(f"activation {spec!r}: {UP_FIRST!r} needs a gated activation "
                         f"({', '.join(GATED)}); {act.kind!r} has no gate and up halves")
    return dataclasses.replace(act, up_first=True)


def _parse_base(spec: str) -> Activation:
    """``parse_activation`` of a spec without a layout suffix."""
    parts = spec.split(":")
    kind = parts[0]
    if kind not in ALL_KINDS:
        raise ValueError(
            f"unknown activation {spec!r}; valid: {', '.join(ALL_KINDS)} "
            f"(parameterised: {', '.join(FORMS.values())})"
        )
    if kind == "gptoss":
        alpha, limit = _numbers(spec, kind, parts, ("alpha", "limit"))
        return Activation(kind, alpha, limit)
    if kind in ("swiglu_limit", "swiglu_limit_after"):
        (limit,) = _numbers(spec, kind, parts, ("limit",))
        return Activation(kind, limit=limit)
    if kind == "softcap_swiglu":
        cg, cu = _numbers(spec, kind, parts, ("gate cap", "up cap"))
        if cg == 0 or cu == 0:
            raise ValueError(f"activation {spec!r}: softcap_swiglu caps must be nonzero; expected {FORMS[kind]}")
        return Activation(kind, cg, cu)
    if len(parts) != 1:
        raise ValueError(f"activation {spec!r}: {kind!r} takes no parameters; write {kind!r}")
    return Activation(kind)


def split_gate_up(h: torch.Tensor, interleaved: bool, up_first: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate, up) views of h's 2n columns; ``up_first``: the up half is the first one."""
    if interleaved:
        first, second = h[..., 0::2], h[..., 1::2]
    else:
        n = h.shape[-1] // 2
        first, second = h[..., :n], h[..., n:]
    return (second, first) if up_first else (first, second)


def join_gate_up(dg: torch.Tensor, du: torch.Tensor, interleaved: bool, up_first: bool = False) -> torch.Tensor:
    """The 2n columns holding dg and du in ``split_gate_up``'s layout."""
    first, second = (du, dg) if up_first else (dg, du)
    if interleaved:
        return torch.stack((first, second), dim=-1).flatten(-2)
    return torch.cat((first, second), dim=-1)


def split_triple(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x1, x2, up) views of a three-factor activation's 3n columns [x1 | x2 | up]."""
    n = h.shape[-1] // 3
    return h[..., :n], h[..., n:2 * n], h[..., 2 * n:]


def _check_triple(h: torch.Tensor, interleaved: bool) -> None:
    if interleaved or h.shape[-1] % 3:
        raise ValueError(f"activation swiglu3 needs H of 3n concatenated columns [x1 | x2 | up], got "
                         f"{h.shape[-1]} columns{' interleaved' if interleaved else ''}")


def _up(t: torch.Tensor) -> torch.Tensor:
    """Upcast half precisions to fp32 for elementwise math; keep fp32/fp64 as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _gelu_tanh_grad(z: torch.Tensor) -> torch.Tensor:
    c = math.sqrt(2.0 / math.pi)
    inner = c * (z + 0.044715 * z**3)
    t = torch.tanh(inner)
    return 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * c * (1 + 3 * 0.044715 * z * z)


def _unary(kind: str, z: torch.Tensor) -> torch.Tensor:
    if kind in ("silu", "swiglu"):
        return F.silu(z)
    if kind in ("gelu", "geglu"):
        return F.gelu(z)
    if kind in ("gelu_tanh", "geglu_tanh"):
        return F.gelu(z, approximate="tanh")
    if kind == "relu":
        return F.relu(z)
    if kind == "relu2":
        return torch.square(F.relu(z))
    raise AssertionError(kind)


def _unary_grad(kind: str, z: torch.Tensor) -> torch.Tensor:
    if kind in ("silu", "swiglu"):
        s = torch.sigmoid(z)
        return s * (1 + z * (1 - s))
    if kind in ("gelu", "geglu"):
        cdf = 0.5 * (1 + torch.erf(z * (1 / math.sqrt(2.0))))
        pdf = torch.exp(-0.5 * z * z) * (1 / math.sqrt(2 * math.pi))
        return cdf + z * pdf
    if kind in ("gelu_tanh", "geglu_tanh"):
        return _gelu_tanh_grad(z)
    if kind == "relu":
        return (z > 0).to(z.dtype)
    if kind == "relu2":
        return 2 * F.relu(z)
    raise AssertionError(kind)


def act_forward(h: torch.Tensor, act: Activation, interleaved: bool) -> torch.Tensor:
    """A = act(H). H: (..., 2n) gated or (..., n); computed in fp32, returned in H's dtype."""
    hf = _up(h)
    if act.kind in TRIPLE:
        _check_triple(h, interleaved)
        x1, x2, u = split_triple(hf)
        return (x1 * F.silu(x2) * u).to(h.dtype)
    if not act.gated:
        return _unary(act.kind, hf).to(h.dtype)
    g, u = split_gate_up(hf, interleaved, act.up_first)
    if act.kind == "gptoss":
        g = g.clamp(max=act.limit)
        u = u.clamp(-act.limit, act.limit)
        return (g * torch.sigmoid(act.alpha * g) * (u + 1)).to(h.dtype)
    if act.kind == "swiglu_limit":
        return (F.silu(g.clamp(max=act.limit)) * u.clamp(-act.limit, act.limit)).to(h.dtype)
    if act.kind == "swiglu_limit_after":
        return (F.silu(g).clamp(max=act.limit) * u.clamp(-act.limit, act.limit)).to(h.dtype)
    if act.kind == "softcap_swiglu":
        cg, cu = act.alpha, act.limit
        return (torch.tanh(g / cg) * cg * torch.sigmoid(g) * (torch.tanh(u / cu) * cu)).to(h.dtype)
    return (_unary(act.kind, g) * u).to(h.dtype)


def act_forward_keeping(h: torch.Tensor, act: Activation, interleaved: bool):
    """(A, kept): ``act_forward``'s A, and what ``act_backward(..., kept=kept)`` can reuse instead
    of recomputing (SwiGLU: silu(gate) in fp32; None for the others)."""
    if act.kind != "swiglu":
        return act_forward(h, act, interleaved), None
    g, u = split_gate_up(_up(h), interleaved, act.up_first)
    sg = F.silu(g)
    return (sg * u).to(h.dtype), sg


def act_backward(h: torch.Tensor, da: torch.Tensor, act: Activation, interleaved: bool,
                 kept: Optional[torch.Tensor] = None) -> torch.Tensor:
    """dH from dA and H (fp32 math, result in H's dtype). ``kept``: from ``act_forward_keeping``."""
    hf, daf = _up(h), _up(da)
    if act.kind in TRIPLE:
        return _triple_backward(hf, daf, interleaved).to(h.dtype)
    if not act.gated:
        return (daf * _unary_grad(act.kind, hf)).to(h.dtype)
    g, u = split_gate_up(hf, interleaved, act.up_first)
    if act.kind == "gptoss":
        gc = g.clamp(max=act.limit)
        uc = u.clamp(-act.limit, act.limit)
        s = torch.sigmoid(act.alpha * gc)
        glu = gc * s
        dglu = s * (1 + act.alpha * gc * (1 - s))
        dg = daf * (uc + 1) * dglu * (g <= act.limit)
        du = daf * glu * ((u >= -act.limit) & (u <= act.limit))
    elif act.kind == "swiglu_limit":
        gc = g.clamp(max=act.limit)
        uc = u.clamp(-act.limit, act.limit)
        dg = daf * uc * _unary_grad("silu", gc) * (g <= act.limit)
        du = daf * F.silu(gc) * ((u >= -act.limit) & (u <= act.limit))
    elif act.kind == "swiglu_limit_after":
        # clamp's derivative is 1 on the closed interval (torch.clamp's backward: min <= x <= max)
        sg = F.silu(g)
        uc = u.clamp(-act.limit, act.limit)
        dg = daf * uc * _unary_grad("silu", g) * (sg <= act.limit)
        du = daf * sg.clamp(max=act.limit) * ((u >= -act.limit) & (u <= act.limit))
    elif act.kind == "softcap_swiglu":
        cg, cu = act.alpha, act.limit
        tg, tu = torch.tanh(g / cg), torch.tanh(u / cu)
        s = torch.sigmoid(g)
        capped_u = tu * cu
        # d/dg [cg tanh(g/cg) sigmoid(g)] = (1 - tg^2) s + cg tg s (1 - s)
        dg = daf * capped_u * ((1 - tg * tg) * s + cg * tg * s * (1 - s))
        du = daf * (tg * cg * s) * (1 - tu * tu)
    elif act.kind == "swiglu":
        # written into the halves of one dH: aten's fused silu_backward, no concatenation
        dh = torch.empty(hf.shape, dtype=hf.dtype, device=hf.device)
        dg, du = split_gate_up(dh, interleaved, act.up_first)
        torch.ops.aten.silu_backward.grad_input(daf * u, g, grad_input=dg)
        torch.mul(daf, F.silu(g) if kept is None else kept, out=du)
        return dh.to(h.dtype)
    else:
        dg = daf * u * _unary_grad(act.kind, g)
        du = daf * _unary(act.kind, g)
    return join_gate_up(dg, du, interleaved, act.up_first).to(h.dtype)


def _triple_backward(hf: torch.Tensor, daf: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """dH (fp32) of A = x1 * silu(x2) * up: d x1 = dA silu(x2) up, d x2 = dA x1 up silu'(x2),
    d up = dA x1 silu(x2)."""
    _check_triple(hf, interleaved)
    x1, x2, u = split_triple(hf)
    sg = F.silu(x2)
    return torch.cat((daf * sg * u, daf * x1 * u * _unary_grad("silu", x2), daf * x1 * sg), dim=-1)
