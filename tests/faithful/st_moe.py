"""lucidrains ``st-moe-pytorch`` (ST-MoE, transcribed from tensor2tensor's ``moe.py``), re-implemented
op for op at a tiny size.

Read: github lucidrains/st-moe-pytorch, ``st_moe_pytorch/st_moe_pytorch.py`` at commit
d94e65d8a1f50eb5b41efa5317b0d1b17c9dbfad (2024-06-16): ``MoE``, ``TopNGating``, ``Experts``,
``Expert``, ``GEGLU``, ``RMSNorm``, ``SparseMoEBlock``, helpers ``cumsum_exclusive`` and
``safe_one_hot``; the top-k helper is ``colt5_attention/topk.py`` ``topk`` of
github lucidrains/CoLT5-attention at commit f2a8da09644615e827fc49883d2652c5c1c22792 (its
``non_differentiable=True`` path: a plain ``torch.topk`` under ``autocast('cuda', enabled=False)``).

The source writes its reshapes and reductions with ``einops`` (``rearrange``, ``reduce``) and
``einx`` (``einx.divide``, ``einx.multiply``); the catalogue imports only torch, so each call is
written here as the torch op it stands for (a permute, a keepdim sum/mean, a broadcast multiply),
and each is marked ``# einops`` / ``# einx`` beside the line.

Random threshold routing: the source draws ``probs = zeros_like(gates).uniform_(0, 1)`` in
``TopNGating.forward`` in BOTH train and eval mode (eval only switches to ``threshold_eval``, which
also defaults to 0.2, and to ``capacity_factor_eval`` 2.0): the second expert is used with
probability ``min(1, gate_2 / threshold)`` even at inference. A compiled module cannot be compared
with eager on fresh random numbers, so here the draw is the constant 0.5 (``fill_`` in place of
``uniform_``): a deterministic threshold that still routes some tokens to one expert only.
"""
from __future__ import annotations

from collections import namedtuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from idiom_catalogue import D, E, K, Idiom, seeded, tokens

MIN_EXPERT_CAPACITY = 4

TopkReturn = namedtuple("TopkReturn", ["values", "indices", "coor_descent_values", "gates"])  # colt5_attention
MixtureOfExpertsReturn = namedtuple("MixtureOfExpertsReturn", ["outputs", "total_aux_loss", "balance_loss",
                                                                "router_z_loss"])


def _exists(v):
    return v is not None


def _default(v, d):
    if _exists(v):
        return v
    return d() if callable(d) else d


def _cast_tuple(el, n=1):
    return el if isinstance(el, tuple) else ((el,) * n)


def _sequential(*modules):
    return nn.Sequential(*[m for m in modules if _exists(m)])


def _cumsum_exclusive(t, dim=-3):
    # the source pads one step before and crops one at the end (a negative pad), then cumsums
    assert dim < 0
    pre = (0, 0) * (-dim - 1)
    return F.pad(t, (*pre, 1, -1)).cumsum(dim=dim)


def _safe_one_hot(indexes, max_length):
    # as the source: one_hot over max(indexes.max() + 2, max_length) classes (a tensor compared with
    # an int on the host), then cut to max_length, so out-of-capacity positions become all-zero rows
    max_index = indexes.max() + 1
    classes = max(max_index + 1, max_length)
    return F.one_hot(indexes, classes)[..., :max_length]


@torch.amp.autocast("cuda", enabled=False)  # colt5_attention.topk's decorator, kept (a no-op on CPU)
def _colt5_topk(x, k, non_differentiable=False):
    # colt5_attention.topk with non_differentiable=True (what TopNGating passes by default): plain top-k
    assert non_differentiable  # the coordinate-descent path (differentiable_topk=True) is not the default
    values, indices = torch.topk(x, k=k, dim=-1)
    return TopkReturn(values, indices, None, None)


class StRMSNorm(nn.Module):
    """st-moe-pytorch ``RMSNorm``: ``F.normalize(x) * gamma * sqrt(dim)``."""

    def __init__(self, dim):
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.normalize(x, dim=-1) * self.gamma * self.scale


class StGEGLU(nn.Module):
    """st-moe-pytorch ``GEGLU``: chunk in two, ``gelu(gate) * x * mult_bias`` (a learned vector)."""

    def __init__(self, dim, mult_bias=True):
        super().__init__()
        self.mult_bias = nn.Parameter(torch.ones(dim)) if mult_bias else 1.

    def forward(self, x):
        x, gate = x.chunk(2, dim=-1)
        return F.gelu(gate) * x * self.mult_bias


class StExpert(nn.Module):
    """st-moe-pytorch ``Expert``: [RMSNorm], Linear(dim, 2h) with bias, GEGLU with multiplicative
    bias, Linear(h, dim) with bias; h = int(dim * hidden_mult * 2 / 3); weights and biases drawn
    uniform in +-out_features**-0.5 (``init_``)."""

    def __init__(self, dim, hidden_mult=4, mult_bias=True, prenorm=False):
        super().__init__()
        dim_hidden = int(dim * hidden_mult * 2 / 3)
        self.net = _sequential(StRMSNorm(dim) if prenorm else None,
                               nn.Linear(dim, dim_hidden * 2),
                               StGEGLU(dim_hidden, mult_bias=mult_bias),
                               nn.Linear(dim_hidden, dim))
        self.apply(self.init_)

    def init_(self, module):
        if isinstance(module, nn.Linear):
            std = module.weight.shape[0] ** -0.5
            module.weight.data.uniform_(-std, std)
            module.bias.data.uniform_(-std, std)

    def forward(self, x):
        return self.net(x)


class StExperts(nn.Module):
    """st-moe-pytorch ``Experts``: input (b, e, c, d) rearranged to (e, b, c, d), each expert's
    slab through its own module in a Python loop, stacked and rearranged back; in every forward
    ``all_experts_to_cpu_besides(slice)`` moves each expert with ``.to(device)`` (the ``dummy``
    buffer's device); ``assert outs.shape == shape``. Deviation: world size 1, so
    ``is_distributed`` is False (as ``dist.is_initialized()`` gives it) and the all-gather /
    split-by-rank branches never run; they are left out."""

    def __init__(self, experts, is_distributed=None, allow_var_seq_len=False):
        super().__init__()
        self.num_experts = len(experts)
        self.experts = nn.ModuleList(experts)
        self.is_distributed = is_distributed
        if not _exists(self.is_distributed):
            self.is_distributed = dist.is_initialized() and dist.get_world_size() > 1
        self.allow_var_seq_len = allow_var_seq_len
        self.register_buffer("dummy", torch.ones(1), persistent=False)

    @property
    def device(self):
        return self.dummy.device

    def all_experts_to_cpu_besides(self, selection):
        # kept as the source writes it (an int selection falls through to the else branch there too)
        if isinstance(selection, int):
            experts = [self.experts[selection]]
        if isinstance(selection, slice):
            experts = self.experts[selection]
        else:
            experts = selection
        experts_set = set(experts)
        for expert in self.experts:
            device = self.device if expert in experts_set else "cpu"
            expert.to(device)

    def forward(self, x, is_distributed=None):
        is_distributed = _default(is_distributed, self.is_distributed)
        shape, num_experts = x.shape, self.num_experts
        seq_len = shape[-2]  # noqa: F841  (used by the distributed branch only)
        assert not is_distributed  # deviation: world size 1 (the distributed branches are left out)
        num_experts_per_rank = num_experts  # noqa: F841
        expert_slice = slice(0, num_experts)
        x = x.permute(1, 0, 2, 3)  # einops rearrange 'b e n d -> e b n d'
        self.all_experts_to_cpu_besides(expert_slice)
        experts = self.experts[expert_slice]
        outs = []
        for expert, expert_input in zip(experts, x):
            outs.append(expert(expert_input))
        if len(outs) > 0:
            outs = torch.stack(outs)
        else:
            outs = torch.empty_like(x, requires_grad=self.training)
        outs = outs.permute(1, 0, 2, 3)  # einops rearrange 'e b n d -> b e n d'
        assert outs.shape == shape
        return outs


class StTopNGating(nn.Module):
    """st-moe-pytorch ``TopNGating`` (top-n softmax gating with capacity, from tensor2tensor):
    host-side capacity ``max(min(n, int(n * cf / E)), 4)``, softmax, top-n (colt5 topk), one-hot
    masks, top-n renormalisation clamped at eps, threshold routing of the 2nd..nth choice,
    ``should_route[0, ...] = True``, in-place ``mask *=``, exclusive cumsum (pad with a negative
    crop), per-choice positions with in-place capacity masking ``mask[n] *=``, ``safe_one_hot`` of
    the positions, the 4-way product into the (b, n, e, c) combine tensor, the dispatch tensor
    ``combine.bool().type(dtype)`` with the straight-through ``+ combine - combine.detach()``, the
    balance loss (train) and the router z-loss (train; ``self.zero`` buffer in eval).
    Deviations: tiny sizes; the routing draw ``uniform_(0, 1)`` is the constant 0.5 (see the file
    docstring); noise_gates (gumbel) is off, as its default."""

    def __init__(self, dim, num_gates, eps=1e-9, top_n=2, threshold_train=0.2, threshold_eval=0.2,
                 capacity_factor_train=1.25, capacity_factor_eval=2., straight_through_dispatch_tensor=True,
                 differentiable_topk=False):
        super().__init__()
        self.eps = eps
        self.num_gates = num_gates
        self.to_gates = nn.Linear(dim, num_gates, bias=False)
        self.differentiable_topk = differentiable_topk
        assert top_n >= 2
        self.top_n = top_n
        threshold_train = _cast_tuple(threshold_train, top_n - 1)
        threshold_eval = _cast_tuple(threshold_eval, top_n - 1)
        self.register_buffer("threshold_train", torch.tensor([eps, *threshold_train]))
        self.register_buffer("threshold_eval", torch.tensor([eps, *threshold_eval]))
        self.capacity_factor_train = capacity_factor_train
        self.capacity_factor_eval = capacity_factor_eval
        self.straight_through_dispatch_tensor = straight_through_dispatch_tensor
        self.register_buffer("zero", torch.zeros((1,)), persistent=False)

    def forward(self, x, noise_gates=False, noise_mult=1.):
        *_, b, group_size, dim, dtype, top_n, num_gates, eps = (*x.shape, x.dtype, self.top_n, self.num_gates,
                                                                self.eps)
        suffix = "train" if self.training else "eval"
        threshold = getattr(self, f"threshold_{suffix}")
        capacity_factor = getattr(self, f"capacity_factor_{suffix}")

        expert_capacity = min(group_size, int((group_size * capacity_factor) / num_gates))
        expert_capacity = max(expert_capacity, MIN_EXPERT_CAPACITY)
        expert_capacity_f = float(expert_capacity)

        gate_logits = self.to_gates(x)
        maybe_noised_gate_logits = gate_logits
        assert not noise_gates  # deviation: router noise off (the source's default)
        raw_gates = maybe_noised_gate_logits.softmax(dim=-1)

        assert not self.differentiable_topk  # the default: colt5 topk with non_differentiable=True
        topk_return = _colt5_topk(raw_gates, k=top_n, non_differentiable=True)
        gate_indices = topk_return.indices
        gates = topk_return.values

        gates = gates.permute(2, 0, 1)  # einops rearrange '... k -> k ...' (x is (b, n, d))
        gate_indices = gate_indices.permute(2, 0, 1)  # einops rearrange '... k -> k ...'

        one_hot_gate_indices = F.one_hot(gate_indices, num_gates)
        mask = one_hot_gate_indices.float()
        mask_1 = mask[0]

        denom = gates.sum(dim=0, keepdim=True).clamp(min=eps)  # einops reduce 'k ... -> 1 ...' sum
        gates = gates / denom

        # deviation: the source draws zeros_like(gates).uniform_(0., 1.) here, in train AND eval;
        # a fixed 0.5 keeps the threshold comparison deterministic (compiled vs eager)
        probs = torch.zeros_like(gates).fill_(0.5)
        should_route = probs < gates / threshold.clamp(min=eps)[:, None, None]  # einx.divide 'k b n, k -> k b n'
        should_route[0, ...] = True
        mask *= should_route.float().unsqueeze(-1)  # einops rearrange '... -> ... 1'

        mask_cumsum = _cumsum_exclusive(mask, dim=-2)

        positions = []
        prev_expert_count = 0.
        for n in range(self.top_n):
            position_in_expert = (mask_cumsum[n] + prev_expert_count) * mask[n]
            mask[n] *= (position_in_expert < expert_capacity_f).float()
            prev_expert_count = mask[n].sum(dim=-2, keepdim=True) + prev_expert_count  # einops reduce '... n e -> ... 1 e' sum
            position_in_expert = position_in_expert.sum(dim=-1)  # einops reduce '... n e -> ... n' sum
            positions.append(position_in_expert)
        positions = torch.stack(positions)

        mask_flat = mask.sum(dim=-1)  # einops reduce '... n e -> ... n' sum
        gates = gates * mask_flat

        # einx.multiply 'k b n, k b n, k b n e, k b n c -> k b n e c'
        combine_tensor = (gates[..., None, None] * mask_flat[..., None, None]
                          * one_hot_gate_indices[..., :, None]
                          * _safe_one_hot(positions.long(), expert_capacity)[..., None, :])
        combine_tensor = combine_tensor.sum(dim=0)  # einops reduce 'k b n e c -> b n e c' sum

        dispatch_tensor = combine_tensor.bool().type(dtype)
        if self.straight_through_dispatch_tensor:
            dispatch_tensor = dispatch_tensor + combine_tensor - combine_tensor.detach()

        if self.training:
            density_1 = mask_1.mean(dim=-2)  # einops reduce '... n e -> ... e' mean
            density_1_proxy = raw_gates.mean(dim=-2)  # einops reduce '... n e -> ... e' mean
            balance_loss = (density_1_proxy * density_1).mean() * float(num_gates ** 2)
        else:
            balance_loss = self.zero

        if self.training:
            router_z_loss = torch.logsumexp(gate_logits, dim=-1)
            router_z_loss = torch.square(router_z_loss)
            router_z_loss = router_z_loss.mean()
        else:
            router_z_loss = self.zero

        return dispatch_tensor, combine_tensor, balance_loss, router_z_loss


class StMoE(nn.Module):
    """st-moe-pytorch ``MoE``: ``TopNGating`` -> dispatch einsum 'b n d, b n e c -> b e c d' ->
    ``Experts`` -> combine einsum 'b e c d, b n e c -> b n d'; the weighted balance and z-losses
    summed into ``total_aux_loss``; returns the ``MixtureOfExpertsReturn`` namedtuple.
    Deviations: tiny sizes (4 experts, dim 16, ``expert_hidden_mult=0.75`` so the expert width is
    int(16 * 0.75 * 2 / 3) = 8)."""

    def __init__(self, dim=D, num_experts=E, expert_hidden_mult=0.75, threshold_train=0.2, threshold_eval=0.2,
                 capacity_factor_train=1.25, capacity_factor_eval=2., gating_top_n=K, balance_loss_coef=1e-2,
                 router_z_loss_coef=1e-3, straight_through_dispatch_tensor=True):
        super().__init__()
        self.dim = dim
        self.num_experts = num_experts
        self.gate = StTopNGating(dim, top_n=gating_top_n, num_gates=num_experts,
                                 straight_through_dispatch_tensor=straight_through_dispatch_tensor,
                                 threshold_train=threshold_train, threshold_eval=threshold_eval,
                                 capacity_factor_train=capacity_factor_train, capacity_factor_eval=capacity_factor_eval)
        self.experts = StExperts([StExpert(dim=dim, hidden_mult=expert_hidden_mult) for _ in range(num_experts)])
        self.balance_loss_coef = balance_loss_coef
        self.router_z_loss_coef = router_z_loss_coef

    def forward(self, x, noise_gates=False, noise_mult=1.):
        dispatch_tensor, combine_tensor, balance_loss, router_z_loss = self.gate(x, noise_gates=noise_gates,
                                                                                 noise_mult=noise_mult)
        expert_inputs = torch.einsum("b n d, b n e c -> b e c d", x, dispatch_tensor)
        expert_outputs = self.experts(expert_inputs)
        output = torch.einsum("b e c d, b n e c -> b n d", expert_outputs, combine_tensor)
        weighted_balance_loss = balance_loss * self.balance_loss_coef
        weighted_router_z_loss = router_z_loss * self.router_z_loss_coef
        total_aux_loss = weighted_balance_loss + weighted_router_z_loss
        return MixtureOfExpertsReturn(output, total_aux_loss, balance_loss, router_z_loss)


class StSparseMoEBlock(nn.Module):
    """st-moe-pytorch ``SparseMoEBlock``: optional prenormed dense ``Expert`` before, RMSNorm
    prenorm, ``MoE``, residual, prenormed dense ``Expert`` after (the default) with its residual;
    returns the namedtuple with the MoE's losses. Deviations: none beyond the ``MoE``'s (the dense
    experts keep ``hidden_mult=4``: width int(16 * 4 * 2 / 3) = 42)."""

    def __init__(self, moe, add_ff_before=False, add_ff_after=True):
        super().__init__()
        dim = moe.dim
        self.moe = moe
        self.moe_prenorm = StRMSNorm(dim)
        self.ff_before = StExpert(dim, prenorm=True) if add_ff_before else None
        self.ff_after = StExpert(dim, prenorm=True) if add_ff_after else None

    def forward(self, x, noise_gates=False, noise_mult=1.):
        if _exists(self.ff_before):
            x = self.ff_before(x) + x
        residual = x
        moe_out, total_aux_loss, balance_loss, router_z_loss = self.moe(self.moe_prenorm(x), noise_gates=noise_gates,
                                                                        noise_mult=noise_mult)
        x = moe_out + residual
        if _exists(self.ff_after):
            x = self.ff_after(x) + x
        return MixtureOfExpertsReturn(x, total_aux_loss, balance_loss, router_z_loss)


class StMoEOutput(nn.Module):
    """Catalogue wrapper (not in the source): calls the source module unchanged, keeps the extra
    results of its ``MixtureOfExpertsReturn`` as attributes (``total_aux_loss``, ``balance_loss``,
    ``router_z_loss``, as a training loop reads them) and returns ``outputs``."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        ret = self.inner(x)
        self.total_aux_loss, self.balance_loss, self.router_z_loss = ret.total_aux_loss, ret.balance_loss, ret.router_z_loss
        return ret.outputs


_x3d = tokens(lambda T: (1, T, D))  # (batch, seq, dim), as MoE takes it

ENTRIES = [
    Idiom("st_moe_top2", "lucidrains/st-moe-pytorch st_moe_pytorch/st_moe_pytorch.py MoE + TopNGating + Experts + "
          "Expert (GEGLU), top-2 capacity gating, training mode",
          seeded(310, lambda: StMoEOutput(StMoE())), _x3d, expect="pending", faithful=True, fullgraph=False,  # safe_one_hot: max(tensor, int) on the host
          note="threshold routing of the 2nd choice (should_route, deterministic here), in-place mask *= and "
               "mask[n] *= capacity masking, exclusive cumsum by negative pad, safe_one_hot over max(idx.max()+2, C) "
               "classes, straight-through dispatch tensor, per-forward expert.to(device), balance and z-losses"),
    Idiom("st_moe_sparse_block", "lucidrains/st-moe-pytorch st_moe_pytorch/st_moe_pytorch.py SparseMoEBlock "
          "(RMSNorm prenorm, MoE, residual, prenormed GEGLU Expert after)",
          seeded(311, lambda: StMoEOutput(StSparseMoEBlock(StMoE()))), _x3d, expect="pending", faithful=True,
          other_gemms=3, fullgraph=False,  # safe_one_hot: max(tensor, int) on the host
          note="the block around the MoE: RMSNorm prenorm by F.normalize, residual, a dense prenormed GEGLU expert "
               "after, and the MoE's namedtuple losses passed through"),
]
