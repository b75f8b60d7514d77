"""Meta's official Llama 4 MoE layer, re-implemented op for op at a tiny size.

Source read: github meta-llama/llama-models at commit a9c89c471f793423afd4cc3ca8671d6e56fe64cb
(2025-07-15): ``models/llama4/moe.py`` (``Experts``, ``MoE``, ``divide_exact``),
``models/llama4/ffn.py`` (``FeedForward``, the shared expert), ``models/llama4/args.py``
(``MoEArgs``) and the ``MoE(...)`` call of ``TransformerBlock`` in ``models/llama4/model.py``
(``hidden_dim=int(ffn_exp * dim)``).

The layer routes with a (D, E) parameter by ``matmul``, ``topk`` of the logits, a ``full_like(-inf)``
matrix filled by ``scatter_`` and a ``sigmoid`` (0 for the unpicked experts); every expert sees every
token (``gather`` of the tokens by ``arange(a).expand(E, -1)``), scaled by its score BEFORE the experts
(``routed_in * router_scores``), the experts' input ``.detach()``-ed (so neither the tokens nor the
router get a gradient through the routed path), batched SwiGLU experts by ``bmm`` on (E, a, D)
views with (in, out) weights, the shared expert's output as the base of ``scatter_add_``.

Run as one process: fairscale's model-parallel world size is 1, so ``ColumnParallelLinear`` /
``RowParallelLinear`` hold a plain (out, in) weight and ``reduce_from_model_parallel_region`` is
the identity; fairscale is not installed here, so both are re-stated below (deviations).
"""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from idiom_catalogue import D, E, K, Idiom, seeded, tokens


def get_model_parallel_world_size() -> int:
    """deviation: fairscale's ``fs_init.get_model_parallel_world_size()`` on one process."""
    return 1


def reduce_from_model_parallel_region(x: Tensor) -> Tensor:
    """deviation: fairscale's all-reduce over the model-parallel group; the identity at world size 1."""
    return x


class _ParallelLinear(nn.Module):
    """deviation: fairscale's ``ColumnParallelLinear`` / ``RowParallelLinear`` at world size 1: one
    (out, in) weight, no bias (``FeedForward`` only reads ``.weight``). The source's
    ``init_method=lambda x: x`` leaves ``torch.empty``; drawn here."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / in_features ** 0.5)


@dataclasses.dataclass
class MoEArgs:  # deviation: a pydantic BaseModel in the source (config I/O only)
    num_experts: int = -1
    capacity_factor: float = 1.0
    auto_scale_F: bool = True  # noqa: N815
    top_k: int = 1
    interleave_moe_layer_step: int = 1


def divide_exact(numerator: int, denominator: int) -> int:
    assert numerator % denominator == 0, "{} is not divisible by {}".format(numerator, denominator)
    return numerator // denominator


class FeedForward(nn.Module):
    """``ffn.py`` ``FeedForward``: ``w2(silu(w1 x) * w3 x)`` through ``F.linear`` on the weights; the
    reduce only when ``do_reduce`` (the MoE builds it with ``do_reduce=False``)."""

    def __init__(self, dim: int, hidden_dim: int, do_reduce: bool = True):
        super().__init__()
        self.do_reduce = do_reduce
        self.w1 = _ParallelLinear(dim, hidden_dim)
        self.w2 = _ParallelLinear(hidden_dim, dim)
        self.w3 = _ParallelLinear(dim, hidden_dim)

    def forward(self, x):
        x = F.silu(F.linear(x, self.w1.weight)) * F.linear(x, self.w3.weight)
        out = F.linear(x, self.w2.weight)
        if self.do_reduce:
            return reduce_from_model_parallel_region(out)
        return out


class Experts(nn.Module):
    """``moe.py`` ``Experts``: w1, w3 (e, D, F) and w2 (e, F, D), (in, out) storage; the forward views
    the routed rows (e, -1, D) and runs ``batched_swiglu`` by ``bmm``. The state-dict load hook is
    not part of the forward and is left out. Deviation: weights drawn (``torch.empty`` in the source)."""

    def __init__(self, num_local_experts: int, dim: int, hidden_dim: int) -> None:
        super().__init__()
        dtype = torch.get_default_dtype()
        self.num_local_experts = num_local_experts
        self.dim = dim
        f = divide_exact(hidden_dim, get_model_parallel_world_size())
        self.w1 = nn.Parameter((torch.randn(num_local_experts, dim, f) / dim ** 0.5).to(dtype))
        self.w2 = nn.Parameter((torch.randn(num_local_experts, f, dim) / f ** 0.5).to(dtype))
        self.w3 = nn.Parameter((torch.randn(num_local_experts, dim, f) / dim ** 0.5).to(dtype))

    def forward(self, routed_in_egD: torch.Tensor) -> torch.Tensor:  # noqa: N803
        e = self.num_local_experts
        D = self.dim  # noqa: N806
        x_egD = routed_in_egD.view(e, -1, D)
        out_egD = self.batched_swiglu(x_egD, self.w1, self.w3, self.w2)
        out_egD = out_egD.view(-1, D)
        return out_egD

    def batched_swiglu(self, x: Tensor, w1: Tensor, w3: Tensor, w2: Tensor) -> Tensor:
        middle_out_egF = F.silu(torch.bmm(x, w1)) * torch.bmm(x, w3)  # noqa: N806
        return torch.bmm(middle_out_egF, w2)


class MoE(nn.Module):
    """``moe.py`` ``MoE``, op for op (the state-dict load hook left out: not part of the forward)."""

    def __init__(self, dim: int, hidden_dim: int, ffn_dim_multiplier: float, multiple_of: int,
                 moe_args: MoEArgs) -> None:
        super().__init__()
        self.moe_args = moe_args
        hidden_dim_denom: float = 1
        if moe_args.auto_scale_F:
            hidden_dim_denom = moe_args.capacity_factor + 1
        hidden_dim = int(2 * hidden_dim / 3)
        hidden_dim = int(ffn_dim_multiplier * hidden_dim)
        if moe_args.auto_scale_F:
            hidden_dim = int(hidden_dim / hidden_dim_denom)
        hidden_dim += -hidden_dim % multiple_of
        num_local_experts: int = moe_args.num_experts
        dtype: torch.dtype = torch.get_default_dtype()
        self.experts = Experts(num_local_experts, dim, hidden_dim)
        # deviation: drawn (torch.empty in the source)
        self.router_DE = nn.Parameter((torch.randn(dim, moe_args.num_experts) / dim ** 0.5).to(dtype))
        self.shared_expert = FeedForward(dim, hidden_dim, do_reduce=False)

    def forward(self, x_bsD: Tensor) -> Tensor:  # noqa: N803
        _, slen, D = x_bsD.shape  # noqa: N806
        x_aD = x_bsD.view(-1, D)  # noqa: N806
        a = x_aD.shape[0]
        router_scores: Tensor = torch.matmul(x_aD, self.router_DE).transpose(0, 1)
        router_scores_aK, router_indices_aK = torch.topk(router_scores.transpose(0, 1), self.moe_args.top_k, dim=1)  # noqa: N806
        router_scores = (
            torch.full_like(router_scores.transpose(0, 1), float("-inf"))
            .scatter_(1, router_indices_aK, router_scores_aK)
            .transpose(0, 1)
        )
        router_indices = torch.arange(a, device=x_aD.device).view(1, -1).expand(router_scores.size(0), -1)
        router_scores = torch.sigmoid(router_scores)
        routed_in_EG_D: Tensor = torch.gather(  # noqa: N806
            x_aD,
            dim=0,
            index=router_indices.reshape(-1, 1).expand(-1, D),
        )
        routed_in_EG_D = routed_in_EG_D * router_scores.reshape(-1, 1)  # noqa: N806
        out_aD = self.shared_expert(x_aD)  # noqa: N806
        routed_out_eg_D = self.experts(routed_in_EG_D.detach())  # noqa: N806
        router_indices_EG_D = router_indices.reshape(-1, 1).expand(-1, D)  # noqa: N806
        out_aD.scatter_add_(dim=0, index=router_indices_EG_D, src=routed_out_eg_D.view(-1, D))
        out_aD = reduce_from_model_parallel_region(out_aD)  # noqa: N806
        return out_aD.view(-1, slen, D)


def build_moe(top_k: int = K) -> MoE:
    """As ``TransformerBlock`` builds it: ``hidden_dim=int(ffn_exp * dim)`` with ``ffn_exp=4``.
    Deviation: tiny sizes, ``ffn_dim_multiplier=0.2`` and ``multiple_of=8`` so that the expert width
    is the catalogue's N (int(0.2 * int(2 * 64 / 3)) = 8); ``auto_scale_F=False`` as Llama 4 Scout's
    params set it."""
    args = MoEArgs(num_experts=E, capacity_factor=1.0, auto_scale_F=False, top_k=top_k)
    return MoE(dim=D, hidden_dim=int(4 * D), ffn_dim_multiplier=0.2, multiple_of=8, moe_args=args)


_SOURCE = ("meta-llama/llama-models models/llama4/moe.py MoE + Experts, models/llama4/ffn.py FeedForward "
           "(shared expert), model-parallel world size 1 @a9c89c4")
_NOTE = ("router by matmul on a (D, E) parameter with transposes, topk + full_like(-inf).scatter_ + sigmoid "
         "(0 for unpicked experts), gather of every token for every expert slot by arange(a).expand(E, -1), "
         "scores applied before the experts, .detach() on the experts' input, bmm experts on (e, -1, D) "
         "views with (in, out) weights, the shared expert's output as the scatter_add_ base")
_x3d = tokens(lambda T: (2, T, D))

ENTRIES = [
    Idiom("llama4_official_moe", _SOURCE + f" (top_k={K})", seeded(161, build_moe), _x3d,
          expect=1, faithful=True, other_gemms=4,  # router + the shared expert's 3
          note=_NOTE),
    Idiom("llama4_official_moe_top1", _SOURCE + " (top_k=1, as Llama 4 Scout/Maverick)",
          seeded(162, lambda: build_moe(top_k=1)), _x3d,
          expect=1, faithful=True, other_gemms=4,
          note=_NOTE + "; one expert per token"),
]
