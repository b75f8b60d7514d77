"""DeepSeek-V3 official inference code's MoE layer, re-implemented op for op at a tiny size.

Source read: github deepseek-ai/DeepSeek-V3, ``inference/model.py`` at commit
9b4e9788e4a3a731f7567338ed15d3ec549ce03b (2025-08-28): ``linear``, ``Linear``,
``ColumnParallelLinear``, ``RowParallelLinear``, ``MLP``, ``Gate``, ``Expert``, ``MoE``; the
routing settings from ``inference/configs/config_671B.json`` (sigmoid scores with the bias, 8
groups of which 4 are kept, route scale 2.5, one shared expert) and ``config_16B.json`` (softmax
scores, one group, route scale 1, two shared experts). ``config_236B.json`` (softmax, 8 groups,
no bias) is not an entry: see the note at the end of ``ENTRIES``.

``fullgraph=False``: plain Dynamo graph-breaks on the ``.tolist()``; under sonic the loop is
captured, but a ``fullgraph=True`` compile of this module fails (see the entries).

Run as on one process: the module-level ``world_size = 1`` / ``rank = 0`` of the source, so every
rank owns every expert and ``dist.all_reduce`` is never reached (the source guards it with
``world_size > 1``). The catalogue's ``DeepSeekV3Inference`` re-spells this layer with a plain
``range(E)`` loop; this file keeps the source's ``bincount(...).tolist()`` and its skip of experts
with no token.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from idiom_catalogue import D, E, K, N, Idiom, seeded, tokens

world_size = 1  # the source's module globals, as a single process sets them
rank = 0
gemm_impl = "bf16"


def linear(x, weight, bias=None, scale_fmt=None):
    """``model.py`` ``linear``: a plain ``F.linear`` for unquantised weights (element size > 1).
    The fp8 branches (``weight_dequant`` / ``act_quant`` + ``fp8_gemm``, Triton kernels in
    ``kernel.py``) are not re-implemented: weights here are never 1-byte."""
    if weight.element_size() > 1:
        return F.linear(x, weight, bias)
    raise NotImplementedError("fp8 weights: kernel.py's Triton kernels have no CPU path")  # deviation


class Linear(nn.Module):
    """``model.py`` ``Linear``: a weight (out, in) and an optional bias, forward through ``linear``.
    Deviation: the source's default dtype is ``torch.bfloat16`` (``Linear.dtype``); fp32 here, so
    the catalogue compares at 1e-4. Weights are drawn at init (the source loads a checkpoint into
    ``torch.empty``)."""

    dtype = torch.float32  # deviation: bfloat16 in the source
    scale_fmt = None

    def __init__(self, in_features, out_features, bias=False, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.randn(out_features, in_features, dtype=dtype or Linear.dtype)
                                   / in_features ** 0.5)
        self.register_parameter("scale", None)  # only 1-byte (fp8) weights carry a block scale
        if bias:
            self.bias = nn.Parameter(torch.randn(out_features) * 0.1)
        else:
            self.register_parameter("bias", None)

    def forward(self, x):
        return linear(x, self.weight, self.bias, self.scale_fmt)


class ColumnParallelLinear(Linear):
    """``ColumnParallelLinear``: output features split over ranks (all of them at world size 1)."""

    def __init__(self, in_features, out_features, bias=False, dtype=None):
        assert out_features % world_size == 0
        self.part_out_features = out_features // world_size
        super().__init__(in_features, self.part_out_features, bias, dtype)

    def forward(self, x):
        y = linear(x, self.weight, self.bias)
        return y


class RowParallelLinear(Linear):
    """``RowParallelLinear``: input features split over ranks; the partial sums are all-reduced
    when ``world_size > 1`` (never here), then the bias is added in place."""

    def __init__(self, in_features, out_features, bias=False, dtype=None):
        assert in_features % world_size == 0
        self.part_in_features = in_features // world_size
        super().__init__(self.part_in_features, out_features, bias, dtype)

    def forward(self, x):
        y = linear(x, self.weight)
        if world_size > 1:  # world size 1: the all-reduce is the identity and is not reached
            torch.distributed.all_reduce(y)
        if self.bias is not None:
            y += self.bias
        return y


class MLP(nn.Module):
    """``MLP`` (the shared experts): w2(silu(w1 x) * w3 x) with tensor-parallel linears."""

    def __init__(self, dim, inter_dim):
        super().__init__()
        self.w1 = ColumnParallelLinear(dim, inter_dim)
        self.w2 = RowParallelLinear(inter_dim, dim)
        self.w3 = ColumnParallelLinear(dim, inter_dim)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Expert(nn.Module):
    """``Expert`` (one routed expert): the same MLP with plain ``Linear`` layers."""

    def __init__(self, dim, inter_dim):
        super().__init__()
        self.w1 = Linear(dim, inter_dim)
        self.w2 = Linear(inter_dim, dim)
        self.w3 = Linear(dim, inter_dim)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Gate(nn.Module):
    """``Gate``: scores by softmax (fp32) or sigmoid; the bias (the V3 load-balancing correction,
    selection only) added to a copy; group-limited selection (group score = the max, or the sum of
    the two best biased scores when there is a bias; the other groups masked to -inf in place);
    top-k; weights gathered from the unbiased scores; for sigmoid renormalised in place
    (``/=``); scaled in place (``*= route_scale``); cast to x's dtype.

    Deviation: the source creates the bias only when ``dim == 7168`` (the 671B config's hidden
    size); at the tiny size that test is replaced by ``with_bias`` (True for the 671B config).
    The bias is a parameter in the source (fp32), kept so."""

    def __init__(self, score_func, n_groups, topk_groups, route_scale, with_bias):
        super().__init__()
        self.dim = D
        self.topk = K
        self.n_groups = n_groups
        self.topk_groups = topk_groups
        self.score_func = score_func
        self.route_scale = route_scale
        self.weight = nn.Parameter(torch.randn(E, D) / D ** 0.5)
        self.bias = nn.Parameter(torch.linspace(-0.2, 0.2, E, dtype=torch.float32)) if with_bias else None

    def forward(self, x):
        scores = linear(x, self.weight)
        if self.score_func == "softmax":
            scores = scores.softmax(dim=-1, dtype=torch.float32)
        else:
            scores = scores.sigmoid()
        original_scores = scores
        if self.bias is not None:
            scores = scores + self.bias
        if self.n_groups > 1:
            scores = scores.view(x.size(0), self.n_groups, -1)
            if self.bias is None:
                group_scores = scores.amax(dim=-1)
            else:
                group_scores = scores.topk(2, dim=-1)[0].sum(dim=-1)
            indices = group_scores.topk(self.topk_groups, dim=-1)[1]
            mask = scores.new_ones(x.size(0), self.n_groups, dtype=bool).scatter_(1, indices, False)
            # in place: without a bias this view aliases original_scores (the source does the same)
            scores = scores.masked_fill_(mask.unsqueeze(-1), float("-inf")).flatten(1)
        indices = torch.topk(scores, self.topk, dim=-1)[1]
        weights = original_scores.gather(1, indices)
        if self.score_func == "sigmoid":
            weights /= weights.sum(dim=-1, keepdim=True)
        weights *= self.route_scale
        return weights.type_as(x), indices


class MoE(nn.Module):
    """``MoE``: the tokens flattened to (T, dim); the gate; ``y = zeros_like(x)``; per-expert token
    counts read on the host (``torch.bincount(indices.flatten(), minlength=E).tolist()``); a loop
    over this rank's experts that skips those with ``counts[i] == 0`` and accumulates
    ``y[idx] += expert(x[idx]) * weights[idx, top, None]`` with ``idx, top = torch.where(indices
    == i)``; the shared experts on every token; ``(y + z).view(shape)``.

    Tiny sizes: E=4 routed experts of width N, top-2, groups of 2 experts."""

    def __init__(self, score_func="sigmoid", n_groups=2, topk_groups=1, route_scale=2.5, with_bias=True,
                 n_shared_experts=1):
        super().__init__()
        self.dim = D
        assert E % world_size == 0
        self.n_routed_experts = E
        self.n_local_experts = E // world_size
        self.n_activated_experts = K
        self.experts_start_idx = rank * self.n_local_experts
        self.experts_end_idx = self.experts_start_idx + self.n_local_experts
        self.gate = Gate(score_func, n_groups, topk_groups, route_scale, with_bias)
        self.experts = nn.ModuleList([Expert(D, N) if self.experts_start_idx <= i < self.experts_end_idx else None
                                      for i in range(self.n_routed_experts)])
        self.shared_experts = MLP(D, n_shared_experts * N)

    def forward(self, x):
        shape = x.size()
        x = x.view(-1, self.dim)
        weights, indices = self.gate(x)
        y = torch.zeros_like(x)
        counts = torch.bincount(indices.flatten(), minlength=self.n_routed_experts).tolist()
        for i in range(self.experts_start_idx, self.experts_end_idx):
            if counts[i] == 0:
                continue
            expert = self.experts[i]
            idx, top = torch.where(indices == i)
            y[idx] += expert(x[idx]) * weights[idx, top, None]
        z = self.shared_experts(x)
        if world_size > 1:  # world size 1: not reached
            torch.distributed.all_reduce(y)
        return (y + z).view(shape)


_x3d = tokens(lambda T: (1, T, D))  # the Block passes (batch, seqlen, dim)

ENTRIES = [
    Idiom("deepseek_v3_official_671b", "deepseek-ai/DeepSeek-V3 inference/model.py MoE + Gate + Expert + MLP, "
          "config_671B routing (sigmoid, bias, group-limited, route_scale 2.5), world size 1",
          seeded(103, MoE), _x3d, expect=1, faithful=True, fullgraph=False, other_gemms=4,  # router + the shared MLP's 3
          note="bincount(...).tolist() host counts with 'if counts[i] == 0: continue', group-limited top-k "
               "(top-2 sum per group, masked_fill_ in place), in-place '/=' and '*= route_scale', "
               "RowParallelLinear's world-size guard, the shared MLP added after the loop"),
    Idiom("deepseek_v3_official_16b", "deepseek-ai/DeepSeek-V3 inference/model.py MoE + Gate + Expert + MLP, "
          "config_16B routing (softmax, no bias, one group, route_scale 1), world size 1",
          seeded(104, lambda: MoE(score_func="softmax", n_groups=1, topk_groups=1, route_scale=1.0,
                                  with_bias=False, n_shared_experts=2)),
          _x3d, expect=1, faithful=True, fullgraph=False, other_gemms=4,
          note="softmax in fp32, no renormalisation, '*= route_scale' in place on the gathered weights, "
               "bincount(...).tolist() skip loop, two shared experts' width"),
    # config_236B routing (softmax, no bias, 8 groups) is left out: with no bias the source masks the
    # groups with masked_fill_ in place on a view of the softmax output that the weights are then
    # gathered from, so eager backward fails ("modified by an inplace operation"); the source runs it
    # only under torch.inference_mode (generate.py), and the catalogue checks gradients.
]
