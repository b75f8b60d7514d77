"""DeepSpeed ``MoE`` (github microsoft/DeepSpeed, ``deepspeed/moe/layer.py`` ``MoE``;
``deepspeed/moe/sharded_moe.py`` ``_AllToAll``, ``einsum``, ``_capacity``, ``_top_idx``,
``_one_hot_to_float``, ``top1gating``, ``top2gating``, ``TopKGate``, ``MOELayer``;
``deepspeed/moe/experts.py`` ``Experts``), read at commit 38327e07f6cd39b63418f60cedd1651b0be3e7c3
(2025-02-21; the last change of ``sharded_moe.py`` there is 726089045 "reduce cpu host overhead when
using moe", which turned ``exp_counts``' ``.to('cpu')`` into ``.to(logits.device)``).

The layer is built as a user builds it, ``MoE(hidden_size, expert, num_experts, ep_size=1, k=...)``
with ``MoE``'s defaults: capacity_factor = eval_capacity_factor = 1.0, min_capacity 4,
noisy_gate_policy None, drop_tokens True, use_rts True (on: random token selection for top-1),
use_tutel False; top2_2nd_expert_sampling is set to False (its default True adds Gumbel noise to
the logits: router noise off, through the source's own switch). The capacity is a 0-d int64 tensor
from the TorchScript ``_capacity`` (``if capacity < min_capacity`` on tensors), then read on the host
where it is used as a size: ``topk(k=capacity)`` and ``one_hot(num_classes=capacity)``.

The expert is user code in DeepSpeed (the tutorial passes an ``nn.Linear``, the unit tests an
``nn.Sequential`` of two ``nn.Linear``); here ``nn.Sequential(Linear(D, N), GELU(), Linear(N, D))``,
deep-copied E times by ``Experts`` as the source does.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from idiom_catalogue import D, E, N, Idiom, seeded, tokens

uniform_map: Dict[torch.device, Callable] = {}
gumbel_map: Dict[torch.device, Callable] = {}
exp_selection_uniform_map: Dict[torch.device, Callable] = {}


def gumbel_rsample(shape: Tuple, device: torch.device) -> Tensor:
    """``sharded_moe.gumbel_rsample`` (used only by the noisy paths, off in the entries)."""
    gumbel = gumbel_map.get(device)
    if gumbel is None:
        one = torch.tensor(1.0, device=device)
        zero = torch.tensor(0.0, device=device)
        gumbel = torch.distributions.gumbel.Gumbel(zero, one).rsample
        gumbel_map[device] = gumbel
    return gumbel(shape)


class _AllToAll(torch.autograd.Function):
    """``sharded_moe._AllToAll``: contiguous input, ``empty_like`` output that
    ``dist.all_to_all_single`` fills; backward is the same exchange. At expert-parallel size 1 the
    exchange copies the input into the output: that copy stands for it here."""

    @staticmethod
    def forward(ctx: Any, group, input: Tensor) -> Tensor:
        ctx.group = group
        input = input.contiguous()
        output = torch.empty_like(input)
        output.copy_(input)  # deviation: dist.all_to_all_single(output, input, group=group) at ep size 1
        return output

    @staticmethod
    def backward(ctx: Any, *grad_output: Tensor) -> Tuple[None, Tensor]:
        return (None, _AllToAll.apply(ctx.group, *grad_output))


USE_EINSUM = True  # the source's module-level switch (True: every rule is torch.einsum)


def einsum(rule, a, b):
    """``sharded_moe.einsum``: ``torch.einsum`` while USE_EINSUM, else hand-written equivalents."""
    if USE_EINSUM:
        return torch.einsum(rule, a, b)
    elif rule == 's,se->se':
        return a.reshape(a.shape[0], -1) * b
    elif rule == 'se,sc->sec':
        return a.unsqueeze(2) * b.unsqueeze(1)
    elif rule == 'se,se->s':
        return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).reshape(-1)
    elif rule == 'se,sec->sec':
        return a.unsqueeze(2) * b
    elif rule == 'sec,sm->ecm':
        s, e, c, m = a.shape[0], a.shape[1], a.shape[2], b.shape[1]
        return torch.matmul(a.reshape(s, -1).t(), b).reshape(e, c, m)
    elif rule == 'sec,ecm->sm':
        return torch.matmul(a.reshape(a.shape[0], -1), b.reshape(-1, b.shape[-1]))
    elif rule == 'ks,ksm->sm':
        k, s, m = b.shape[0], b.shape[1], b.shape[2]
        a = a.t().unsqueeze(1)
        b = b.reshape(k, -1).t().reshape(s, m, k)
        return torch.bmm(a, b.transpose(1, 2)).squeeze(2)
    else:
        return torch.einsum(rule, a, b)


@torch.jit.script
def _capacity(gates: Tensor, capacity_factor: Tensor, min_capacity: Tensor) -> Tensor:
    # ceil(S / E * factor) as an int64 0-d tensor, raised to min_capacity (a tensor comparison)
    num_tokens = gates.shape[0]
    num_experts = gates.shape[1]
    capacity = torch.ceil((num_tokens / num_experts) * capacity_factor).to(torch.int64)
    if capacity < min_capacity:
        capacity = min_capacity.to(torch.int64)
    return capacity


@torch.jit.script
def _top_idx(source, k):
    return torch.topk(source, k=k, dim=0)[1]


@torch.jit.script
def _one_hot_to_float(x, num_classes):
    return F.one_hot(x, num_classes=num_classes).float()


def top1gating(logits: Tensor, capacity_factor: float, min_capacity: int, used_token: Tensor = None,
               noisy_gate_policy: Optional[str] = None, drop_tokens: bool = True, use_rts: bool = True,
               ep_group=None, use_tutel: bool = False):
    """``sharded_moe.top1gating`` on the non-Tutel, drop_tokens path, op for op."""
    if noisy_gate_policy == 'RSample':
        logits_w_noise = logits + gumbel_rsample(logits.shape, device=logits.device)
    gates = F.softmax(logits, dim=1)
    capacity = _capacity(gates, torch.tensor(capacity_factor), torch.tensor(min_capacity))

    indices1_s = torch.argmax(logits_w_noise if noisy_gate_policy == 'RSample' else gates, dim=1)
    num_experts = int(gates.shape[1])
    mask1 = F.one_hot(indices1_s, num_classes=num_experts)

    if used_token is not None:
        mask1 = einsum("s,se->se", used_token, mask1)

    exp_counts = torch.sum(mask1, dim=0).detach().to(logits.device)

    # deviation: the drop_tokens=False branch (capacity = max count, all_reduce over ep_group,
    # padding to the tensor-parallel size) is left out: not taken at the default drop_tokens=True
    assert drop_tokens

    me = torch.mean(gates, dim=0)
    ce = torch.mean(mask1.float(), dim=0)
    l_aux = torch.sum(me * ce) * num_experts

    if use_rts:  # random token selection: uniform priorities decide who keeps a slot when over capacity
        uniform = exp_selection_uniform_map.get(logits.device)
        if uniform is None:
            uniform = torch.distributions.uniform.Uniform(low=torch.tensor(0.0, device=logits.device),
                                                          high=torch.tensor(1.0, device=logits.device)).rsample
            exp_selection_uniform_map[logits.device] = uniform
        mask1_rand = mask1 * uniform(mask1.shape)
    else:
        mask1_rand = mask1

    assert logits.shape[0] >= min_capacity, \
        "No. of tokens (batch-size) should be greater than min_capacity. Either set min_capacity to 0 or increase your batch size."

    top_idx = _top_idx(mask1_rand, capacity)  # k = the capacity tensor, read on the host
    new_mask1 = mask1 * torch.zeros_like(mask1).scatter_(0, top_idx, 1)
    mask1 = new_mask1

    # deviation: the use_tutel branches (Tutel's fast_cumsum_sub_one and its return) are left out
    locations1 = torch.cumsum(mask1, dim=0) - 1
    locations1_s = torch.sum(locations1 * mask1, dim=1)

    mask1_float = mask1.float()
    gates = gates * mask1_float

    locations1_sc = _one_hot_to_float(locations1_s, capacity)  # num_classes = the capacity tensor
    combine_weights = einsum("se,sc->sec", gates, locations1_sc)
    dispatch_mask = combine_weights.bool()
    return l_aux, combine_weights, dispatch_mask, exp_counts


def top2gating(logits: Tensor, capacity_factor: float, min_capacity: int, drop_tokens: bool = True,
               ep_group=None, top2_2nd_expert_sampling: bool = True):
    """``sharded_moe.top2gating`` on the drop_tokens path, op for op."""
    gates = F.softmax(logits, dim=1)
    indices1_s = torch.argmax(gates, dim=1)
    num_experts = int(gates.shape[1])
    mask1 = F.one_hot(indices1_s, num_classes=num_experts)

    if top2_2nd_expert_sampling:  # the source's default; the entries pass False (router noise off)
        logits += gumbel_rsample(logits.shape, device=logits.device)

    logits_except1 = logits.masked_fill(mask1.bool(), float("-inf"))
    indices2_s = torch.argmax(logits_except1, dim=1)
    mask2 = F.one_hot(indices2_s, num_classes=num_experts)

    locations1 = torch.cumsum(mask1, dim=0) - 1
    locations2 = torch.cumsum(mask2, dim=0) - 1
    locations2 += torch.sum(mask1, dim=0, keepdim=True)  # in place, as the source

    me = torch.mean(gates, dim=0)
    ce = torch.mean(mask1.float(), dim=0)
    l_aux = torch.mean(me * ce) * num_experts * num_experts

    exp_counts = torch.sum(mask1 + mask2, dim=0).detach().to(logits.device)

    # deviation: the drop_tokens=False branch (capacity = max count, all_reduce over ep_group,
    # padding to the tensor-parallel size) is left out: not taken at the default drop_tokens=True
    assert drop_tokens
    capacity = _capacity(gates, torch.tensor(capacity_factor * 2), torch.tensor(min_capacity))
    mask1 *= torch.lt(locations1, capacity)  # in place, compared with the capacity tensor
    mask2 *= torch.lt(locations2, capacity)

    locations1_s = torch.sum(locations1 * mask1, dim=1)
    locations2_s = torch.sum(locations2 * mask2, dim=1)

    mask1_float = mask1.float()
    mask2_float = mask2.float()
    gates1_s = einsum("se,se->s", gates, mask1_float)
    gates2_s = einsum("se,se->s", gates, mask2_float)
    denom_s = gates1_s + gates2_s
    denom_s = torch.clamp(denom_s, min=torch.finfo(denom_s.dtype).eps)
    gates1_s /= denom_s  # in place, as the source
    gates2_s /= denom_s

    gates1 = einsum("s,se->se", gates1_s, mask1_float)
    gates2 = einsum("s,se->se", gates2_s, mask2_float)
    locations1_sc = _one_hot_to_float(locations1_s, capacity)
    locations2_sc = _one_hot_to_float(locations2_s, capacity)
    combine1_sec = einsum("se,sc->sec", gates1, locations1_sc)
    combine2_sec = einsum("se,sc->sec", gates2, locations2_sc)
    combine_weights = combine1_sec + combine2_sec
    dispatch_mask = combine_weights.bool()
    return l_aux, combine_weights, dispatch_mask, exp_counts


class TopKGate(nn.Module):
    """``sharded_moe.TopKGate``: fp32 input and fp32 copy of ``wg.weight`` into ``F.linear``, then
    top1gating / top2gating with the training or eval capacity factor. (k > 2, ``topkgating``, is not
    re-implemented: the entries are k = 1 and k = 2.)"""

    def __init__(self, model_dim: int, num_experts: int, k: int = 1, capacity_factor: float = 1.0,
                 eval_capacity_factor: float = 1.0, min_capacity: int = 8, noisy_gate_policy: Optional[str] = None,
                 drop_tokens: bool = True, use_rts: bool = True, ep_group=None,
                 top2_2nd_expert_sampling: bool = True) -> None:
        super().__init__()
        self.wg = nn.Linear(model_dim, num_experts, bias=False)
        self.ep_group = ep_group
        self.k = k
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.min_capacity = min_capacity
        self.noisy_gate_policy = noisy_gate_policy
        # deviation: self.timers = SynchronizedWallClockTimer() left out (only used when wall_clock_breakdown)
        self.wall_clock_breakdown = False
        self.gate_time = 0.0
        self.drop_tokens = drop_tokens
        self.use_rts = use_rts
        self.top2_2nd_expert_sampling = top2_2nd_expert_sampling

    def forward(self, input: Tensor, used_token: Tensor = None, use_tutel: bool = False):
        if self.wall_clock_breakdown:
            raise NotImplementedError("timers are not re-implemented")  # deviation: the source starts a timer
        input_fp32 = input.float()
        if self.noisy_gate_policy == 'Jitter' and self.training:
            raise NotImplementedError("jitter is router noise: off")  # deviation: multiplicative_jitter
        logits = torch.nn.functional.linear(input_fp32, weight=self.wg.weight.float(), bias=None)
        if self.k == 1:
            gate_output = top1gating(logits, self.capacity_factor if self.training else self.eval_capacity_factor,
                                     self.min_capacity, used_token, self.noisy_gate_policy if self.training else None,
                                     self.drop_tokens, self.use_rts, self.ep_group, use_tutel)
        elif self.k == 2:
            gate_output = top2gating(logits, self.capacity_factor if self.training else self.eval_capacity_factor,
                                     self.min_capacity, self.drop_tokens, self.ep_group, self.top2_2nd_expert_sampling)
        else:
            raise NotImplementedError("topkgating (k > 2) is not re-implemented")
        return gate_output


class Experts(nn.Module):
    """``experts.Experts``: ``copy.deepcopy`` of one expert per local expert, parameters tagged
    ``allreduce = False`` / ``group_name``; forward chunks the (ep, local experts, C, d) input along
    dim 1, runs each expert on its chunk (taking ``out[0]`` of a tuple output), ``torch.cat`` on dim 1."""

    def __init__(self, expert: nn.Module, num_local_experts: int = 1, expert_group_name: Optional[str] = None):
        super().__init__()
        self.deepspeed_experts = nn.ModuleList([copy.deepcopy(expert) for _ in range(num_local_experts)])
        self.num_local_experts = num_local_experts
        for expert in self.deepspeed_experts:
            for param in expert.parameters():
                param.allreduce = False
                param.group_name = expert_group_name

    def forward(self, inputs: Tensor) -> Tensor:
        chunks = inputs.chunk(self.num_local_experts, dim=1)
        expert_outputs: List[Tensor] = []
        for chunk, expert in zip(chunks, self.deepspeed_experts):
            out = expert(chunk)
            if isinstance(out, tuple):
                out = out[0]
            expert_outputs += [out]
        return torch.cat(expert_outputs, dim=1)


class MOELayer(nn.Module):
    """``sharded_moe.MOELayer.forward`` on the non-Tutel path, op for op: reshape to (S, d), the gate
    call storing ``self.l_aux`` and ``self.exp_counts``, dispatch einsum ``sec,sm->ecm`` on
    ``dispatch_mask.type_as(x)``, ``_AllToAll``, reshape (ep, local experts, C, d), ``Experts``,
    reshape (E, C, d), ``_AllToAll``, combine einsum ``sec,ecm->sm`` on ``combine_weights.type_as(x)``,
    reshape to the input's shape."""

    def __init__(self, gate: nn.Module, experts: nn.Module, ep_group_name, ep_size, num_local_experts: int,
                 use_tutel: bool = False) -> None:
        super().__init__()
        self.gate = gate
        self.experts = experts
        self.ep_group = None  # set by _set_ep_group in DeepSpeed; None here (deviation: no process group)
        self.ep_size = ep_size
        self.ep_group_name = ep_group_name
        self.num_local_experts = num_local_experts
        self.time_falltoall = 0.0
        self.time_salltoall = 0.0
        self.time_moe = 0.0
        self.wall_clock_breakdown = False
        self.use_tutel = False  # use_tutel and TUTEL_INSTALLED and k == 1: Tutel is not installed here
        assert not use_tutel

    def forward(self, *input: Tensor, **kwargs: Any) -> Tensor:
        d_model = input[0].shape[-1]
        reshaped_input = input[0].reshape(-1, d_model)
        self.l_aux, combine_weights, dispatch_mask, self.exp_counts = self.gate(reshaped_input, input[1])
        dispatched_input = einsum("sec,sm->ecm", dispatch_mask.type_as(input[0]), reshaped_input)

        tensor_model_world_size = 1  # bwc_tensor_model_parallel_world_size(groups.mpu): 1 with no mpu
        if tensor_model_world_size > 1:
            raise NotImplementedError("drop_tokens over tensor-parallel ranks")  # not taken at world size 1

        dispatched_input = _AllToAll.apply(self.ep_group, dispatched_input)
        dispatched_input = dispatched_input.reshape(self.ep_size, self.num_local_experts, -1, d_model)
        expert_output = self.experts(dispatched_input)
        expert_output = expert_output.reshape(self.ep_size * self.num_local_experts, -1, d_model)
        expert_output = _AllToAll.apply(self.ep_group, expert_output)
        combined_output = einsum("sec,ecm->sm", combine_weights.type_as(input[0]), expert_output)
        a = combined_output.reshape(input[0].shape)
        return a


class MoE(nn.Module):
    """``layer.MoE`` (no residual): builds ``Experts`` and ``MOELayer(TopKGate(...))``; forward returns
    (output, l_aux, exp_counts)."""

    def __init__(self, hidden_size: int, expert: nn.Module, num_experts: int = 1, ep_size: int = 1, k: int = 1,
                 capacity_factor: float = 1.0, eval_capacity_factor: float = 1.0, min_capacity: int = 4,
                 use_residual: bool = False, noisy_gate_policy: Optional[str] = None, drop_tokens: bool = True,
                 use_rts: bool = True, use_tutel: bool = False, enable_expert_tensor_parallelism: bool = False,
                 top2_2nd_expert_sampling: bool = True) -> None:
        super().__init__()
        assert not use_residual  # the residual MoE (a dense MLP blended by a coefficient) is not re-implemented
        self.use_residual = use_residual
        self.enable_expert_tensor_parallelism = enable_expert_tensor_parallelism
        assert num_experts % ep_size == 0
        self.ep_size = ep_size
        self.expert_group_name = f"ep_size_{self.ep_size}"
        self.num_experts = num_experts
        self.num_local_experts = num_experts // self.ep_size
        experts = Experts(expert, self.num_local_experts, self.expert_group_name)
        self.deepspeed_moe = MOELayer(TopKGate(hidden_size, num_experts, k, capacity_factor, eval_capacity_factor,
                                               min_capacity, noisy_gate_policy, drop_tokens, use_rts, None,
                                               top2_2nd_expert_sampling),
                                      experts, self.expert_group_name, self.ep_size, self.num_local_experts,
                                      use_tutel=use_tutel)

    def forward(self, hidden_states: Tensor, used_token: Optional[Tensor] = None):
        output = self.deepspeed_moe(hidden_states, used_token)
        return output, self.deepspeed_moe.l_aux, self.deepspeed_moe.exp_counts


class MoEOutput(nn.Module):
    """Catalogue wrapper (not DeepSpeed code): calls the unchanged ``MoE`` and keeps its extra
    results as attributes (``aux_loss``, ``exp_counts``), returning the output tensor only."""

    def __init__(self, moe: MoE):
        super().__init__()
        self.moe = moe

    def forward(self, x):
        out, self.aux_loss, self.exp_counts = self.moe(x)
        return out


def build(k: int) -> MoEOutput:
    expert = nn.Sequential(nn.Linear(D, N), nn.GELU(), nn.Linear(N, D))
    moe = MoE(hidden_size=D, expert=expert, num_experts=E, ep_size=1, k=k,
              top2_2nd_expert_sampling=False)  # the source's switch for the 2nd-choice Gumbel noise: off
    # test setup, not DeepSpeed code: Experts deep-copies one expert, so all E start identical; redraw
    # each copy's weights (as after training) so the check can tell the experts apart
    with torch.no_grad():
        for ex in moe.deepspeed_moe.experts.deepspeed_experts:
            for lin in (ex[0], ex[2]):
                lin.reset_parameters()
    return MoEOutput(moe)


_SOURCE = ("DeepSpeed deepspeed/moe/layer.py MoE, deepspeed/moe/sharded_moe.py MOELayer + TopKGate + {} + "
           "_capacity/_top_idx/_one_hot_to_float (TorchScript) + _AllToAll, deepspeed/moe/experts.py Experts")

# Rewritten from the first call: moe_inductor.dynamo.shape_items / trace_values read the capacity at trace
# time (the float32 ceil folded as eager computes it, the tensor ``if`` and the topk k / one_hot
# num_classes answered; the token count specialized on the second length), so the gate, dispatch,
# experts and combine are one graph (tests/test_trace_time_branches.py). A break-free reduction with
# a Python-int capacity is in tests/test_deepspeed_dispatch.py.
ENTRIES = [
    # top-1 with use_rts on: the uniform priorities only matter when an expert gets more than C tokens;
    # with this seed the counts are [1, 2, 1, 1] (T=5) and [2, 4, 1, 1] (T=8) against C = min_capacity = 4,
    # so eager and compiled agree although they draw different random numbers (another seed may drop)
    Idiom("deepspeed_moe_top1", _SOURCE.format("top1gating"), seeded(181, lambda: build(1)),
          tokens(lambda T: (1, T, D)), expect=1, faithful=True, fullgraph=False, other_gemms=1,
          note="the TorchScript _capacity (tensor compare with min_capacity, a graph break) read on the host as "
               "topk k and one_hot num_classes, random token selection (use_rts, default on) with its uniform "
               "sampler cached in a module dict, the fp32 router on .float() weights, l_aux/exp_counts stored "
               "in forward, _AllToAll autograd.Function, Experts' chunk + deepcopied-expert loop + cat"),
    # other_gemms: the router and the two 's,se->se' gating einsums the fused op's scores are read from
    # (measured on a break-free reduction: 11 GEMM nodes before the rewrite, 3 after)
    Idiom("deepspeed_moe_top2", _SOURCE.format("top2gating"), seeded(182, lambda: build(2)),
          tokens(lambda T: (1, T, D)), expect=1, faithful=True, fullgraph=False, other_gemms=3,
          note="the TorchScript _capacity tensor compared in place (mask *= lt(locations, capacity)) and read "
               "on the host as one_hot num_classes, in-place locations2 += and gates_s /=, the einsum "
               "wrapper's gating einsums, l_aux/exp_counts stored in forward, _AllToAll autograd.Function, "
               "Experts' chunk + loop + cat"),
]
