"""Options of the sonic backend: ``torch.compile(m, backend="sonic", options={...})``."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

from moe_inductor.kernels.config import TILE_M

TOKEN_ROUNDING_MODES = ("off", "nearest", "up", "down")
IMPLS = ("auto", "torch", "triton")


@dataclasses.dataclass(frozen=True)
class SonicOptions:
    #: False compiles with plain Inductor, no rewrite (for A/B comparisons).
    rewrite: bool = True
    #: Keep only X and the routing for backward and recompute H too (below SonicMoE's X + H).
    recompute_h: bool = False
    #: Fused op implementation: "auto" (Triton on CUDA when the kernels serve the shape, else
    #: PyTorch), "torch", or "triton" (on CPU only under TRITON_INTERPRET=1, for testing).
    impl: str = "auto"
    #: SonicMoE token rounding of per-expert token counts to multiples of tile_m.
    token_rounding: str = "off"
    #: Row tile that token rounding rounds to (default: the kernels' row tile).
    tile_m: int = TILE_M
    #: Whether evaluation mode (model.eval()) also uses token rounding.
    token_rounding_in_eval: bool = False
    #: Extra Inductor config patches passed to compile_fx for the whole graph.
    inductor: Optional[Mapping[str, Any]] = None

    @classmethod
    def from_dict(cls, options: Optional[Mapping[str, Any]]) -> "SonicOptions":
        options = dict(options or {})
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - set(fields))
        if unknown:
            raise ValueError(
                f"sonic backend: unknown option(s) {', '.join(map(repr, unknown))}; "
                f"valid options: {', '.join(fields)}"
            )
        opts = cls(**options)
        opts.validate()
        return opts

    def validate(self) -> None:
        def bad(name, value, valid):
            raise ValueError(f"sonic backend: option {name}={value!r} is invalid; valid: {valid}")

        for name in ("rewrite", "recompute_h", "token_rounding_in_eval"):
            if not isinstance(getattr(self, name), bool):
                bad(name, getattr(self, name), "True or False")
        if self.impl not in IMPLS:
            bad("impl", self.impl, ", ".join(IMPLS))
        if self.token_rounding not in TOKEN_ROUNDING_MODES:
            bad("token_rounding", self.token_rounding, ", ".join(TOKEN_ROUNDING_MODES))
        if not isinstance(self.tile_m, int) or isinstance(self.tile_m, bool) or self.tile_m <= 0:
            bad("tile_m", self.tile_m, "a positive int")
        if self.inductor is not None and not isinstance(self.inductor, Mapping):
            bad("inductor", self.inductor, "a dict of torch._inductor.config patches")
