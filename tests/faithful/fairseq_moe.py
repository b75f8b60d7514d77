"""fairseq ``MOELayer`` with ``Top1Gate`` / ``Top2Gate`` and the expert FFN of fairseq's MoE
transformer layer, re-implemented op for op at a tiny size.

Read: github facebookresearch/fairseq at commit 26d62ae8fbf3deccf01a138d704be1e5c346ca9a (the
``moe`` branch; fairseq's main branch has no ``fairseq/modules/moe``):
``fairseq/modules/moe/moe_layer.py`` (``get_fused_cumsum_sub_one``, ``_AllToAll``, ``MOELayer``),
``fairseq/modules/moe/top2gate.py`` (``one_hot``, ``entropy``, ``top2gating``, ``Top2Gate``),
``fairseq/modules/moe/top1gate.py`` (``top1gating``, ``Top1Gate``),
``fairseq/modules/transformer_layer.py`` (``_ffn``, ``FeedForwardNetwork``, ``make_experts``, and how
``TransformerDecoderLayerBase`` builds the gate and ``MOELayer``), ``fairseq/modules/linear.py``
(``Linear``: nn.Linear's init), ``fairseq/modules/gelu.py`` (``gelu``: fp32 gelu cast back).

Configuration (fairseq's own options, no code changed): world size 1 (one process: the MoE and
all-to-all groups have size 1, so ``MOELayer`` never calls ``_AllToAll``); ``--max-tokens`` training
(``batch_size`` None, so ``MOELayer`` takes its padding path: an all-reduce MAX of the token count
read with ``.item()``, padded input and a padding mask that the gate then applies);
``--moe-gating-use-fp32``; ``--moe-second-expert-policy all`` (the default ``sampling`` adds
Gumbel noise: router noise off); activation ``gelu``; ``dropout`` 0.0 and ``activation_dropout`` 0.0
(fairseq's usual 0.1 would be random in training mode); no tutel, no ``moe_eom`` token dropout, no
``moe_local_drop``, no prefix tokens. The layer runs in training mode.
"""
from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from idiom_catalogue import D, E, N, Idiom, seeded, tokens

SAMPLE_FRACTION = 0.2
EVAL_CAPACITY_TOKEN_FRACTION = 0.25


# --------------------------------------------------------------------------- moe_layer.py helpers

def get_fused_cumsum_sub_one(use_tutel):
    assert not use_tutel  # deviation: tutel's fast_cumsum_sub_one is not installed (use_tutel_moe off)
    return lambda mask: torch.cumsum(mask, dim=0) - 1


class _AllToAll(torch.autograd.Function):
    """``moe_layer._AllToAll``; with no process group initialised the source itself returns the
    input (``assert group is None; output = input``). Never reached at world size 1 (kept for
    completeness)."""

    @staticmethod
    def forward(ctx: Any, group, input: torch.Tensor) -> torch.Tensor:
        ctx.group = group
        input = input.contiguous()
        output = torch.empty_like(input)
        assert group is None  # torch.distributed not initialised: the source's own fallback
        output = input
        return output

    @staticmethod
    def backward(ctx: Any, *grad_output: torch.Tensor) -> Tuple[None, torch.Tensor]:
        return (None, _AllToAll.apply(ctx.group, *grad_output))


def _all_reduce_max(tensor):
    # deviation: fairseq distributed_utils.all_reduce(t, group=WORLD, op="max") at world size 1 is the identity
    return tensor


# --------------------------------------------------------------------------- top2gate.py

def one_hot(indices: torch.Tensor, num_classes: int, unsqueeze_indices=False) -> torch.Tensor:
    """``top2gate.one_hot``: zeros of the index dtype, ``scatter_`` of 1 along the last axis."""
    if unsqueeze_indices:
        indices = indices.unsqueeze(-1)
    assert indices.shape[-1] == 1, "last dimension of indices must be have size 1"
    output = torch.zeros(indices.shape[:-1] + (num_classes,), device=indices.device, dtype=indices.dtype)
    output.scatter_(len(output.shape) - 1, indices, 1)
    return output


def entropy(probs):
    logits = torch.distributions.utils.probs_to_logits(probs)
    p_log_p = probs * logits
    return -p_log_p.sum(-1)


def top2gating(logits, input_mask=None, use_fp32=False, second_expert_policy="sampling",
               normalize_gate_prob_before_dropping=False, eval_mode=False,
               moe_eval_capacity_token_fraction=0.25, batch_prioritized_routing=False,
               moe_eval_capacity_length=None, use_tutel=False, prefix_tokens=None):
    """``top2gate.top2gating``, op for op: fp32 logits, softmax, entropy metadata, capacity 2*ceil(S/E)
    (train) or ceil(fraction * S) (eval) on the host, argmax keepdim + scatter one-hot, second choice
    argmax of ``masked_fill(-inf)`` (noise per policy), padding mask applied, cumsum-1 locations with
    ``locations2 +=`` (in place), l_aux, overflow / histc / sort balance metadata, ``mask * lt(loc, C)``,
    renormalisation ``gates1_s /= denom_s`` after dropping (in place), combine as ``bmm`` outer
    products of the gates and the one-hot locations, dispatch ``combine.bool()``."""
    metadata = {}
    if use_fp32:
        orig_dtype = logits.dtype
        logits = logits.float()
    gates = F.softmax(logits, dim=1)

    metadata["entropy_gating"] = entropy(probs=gates).mean().detach()
    num_tokens = gates.shape[0]
    num_experts = gates.shape[1]
    if moe_eval_capacity_token_fraction > 0.0 and eval_mode:
        if moe_eval_capacity_length is None:
            capacity = math.ceil(moe_eval_capacity_token_fraction * num_tokens)
        else:
            capacity = math.ceil(moe_eval_capacity_token_fraction * moe_eval_capacity_length)
    else:
        capacity = 2 * math.ceil(num_tokens / num_experts)  # 2S/E

    indices1_s = torch.argmax(gates, dim=1, keepdim=True)
    mask1 = one_hot(indices1_s, num_experts)
    if second_expert_policy == "sampling":
        raise NotImplementedError("deviation: Gumbel-max sampling of the 2nd expert is router noise (off); "
                                  "the entries use the 'all' policy")
    else:
        logits_w_noise = logits
    logits_except1 = logits_w_noise.masked_fill(mask1.bool(), float("-inf"))
    indices2_s = torch.argmax(logits_except1, dim=1, keepdim=True)
    mask2 = one_hot(indices2_s, num_experts)

    gates1_s = (gates * mask1).sum(dim=1)
    gates2_s = (gates * mask2).sum(dim=1)

    if normalize_gate_prob_before_dropping:
        denom_s = gates1_s + gates2_s
        denom_s = torch.clamp(denom_s, min=torch.finfo(denom_s.dtype).eps)
        gates1_s = gates1_s / denom_s
        gates2_s = gates2_s / denom_s

    if second_expert_policy == "random":
        sampled = (2 * gates2_s) > torch.rand_like(gates2_s)
        mask2 = mask2 * sampled.repeat(num_experts, 1).transpose(1, 0)

    if input_mask is not None:
        nonpadding = ~input_mask
        mask1 = mask1 * nonpadding.unsqueeze(-1).to(mask1.dtype)
        mask2 = mask2 * nonpadding.unsqueeze(-1).to(mask1.dtype)
    langs_per_expert = {}
    assert prefix_tokens is None  # no language prefix tokens (the per-expert torch.unique logging is skipped by the source too)
    metadata["median_prefix_count_expert1"] = (
        torch.median(torch.stack(list(langs_per_expert.values()))) if len(langs_per_expert) > 0 else 0)
    fused_cumsum_sub_one = get_fused_cumsum_sub_one(use_tutel)
    if batch_prioritized_routing:
        importance_scores = -1 * gates.max(dim=1)[0]
        sorted_mask1 = mask1[importance_scores.argsort(dim=0)]
        sorted_cumsum1 = fused_cumsum_sub_one(sorted_mask1) * sorted_mask1
        importance_sorted_locations1 = sorted_cumsum1[importance_scores.argsort(dim=0).argsort(dim=0)]
        sorted_mask2 = mask2[importance_scores.argsort(dim=0)]
        sorted_cumsum2 = fused_cumsum_sub_one(sorted_mask2) * sorted_mask2
        importance_sorted_locations2 = sorted_cumsum2[importance_scores.argsort(dim=0).argsort(dim=0)]
        importance_sorted_locations2 += torch.sum(mask1, dim=0, keepdim=True)
        locations1, locations2 = importance_sorted_locations1, importance_sorted_locations2
    else:
        locations1 = fused_cumsum_sub_one(mask1)
        locations2 = fused_cumsum_sub_one(mask2)
        locations2 += torch.sum(mask1, dim=0, keepdim=True)  # in place: second choices after every first

    me = torch.mean(gates, dim=0)
    ce = torch.mean(mask1.to(gates.dtype), dim=0)
    l_aux = torch.mean(me * ce)
    l_aux = l_aux * num_experts * num_experts

    metadata["overflow_expert1"] = 100 * torch.sum(mask1 * torch.ge(locations1, capacity)) / torch.sum(mask1)
    metadata["overflow_expert2"] = 100 * torch.sum(mask2 * torch.ge(locations2, capacity)) / torch.sum(mask2)

    mask1_, mask2_ = mask1, mask2
    mask1 = mask1 * torch.lt(locations1, capacity)
    mask2 = mask2 * torch.lt(locations2, capacity)

    expert1_hist = 100 * torch.histc(
        (indices1_s.squeeze() + 1).float(),  # deviation: .float(), CPU histc has no Long kernel
        bins=num_experts, min=1, max=num_experts) / num_tokens
    metadata["unused_expert1_count"] = (expert1_hist == 0).sum()
    expert1_hist = torch.sort(expert1_hist, dim=0, descending=True).values + torch.finfo(torch.float32).tiny
    expert2_hist = 100 * torch.histc(
        (indices2_s.squeeze() + 1).float(),  # deviation: .float(), CPU histc has no Long kernel
        bins=num_experts, min=1, max=num_experts) / num_tokens
    metadata["unused_expert2_count"] = (expert2_hist == 0).sum()
    expert2_hist = torch.sort(expert2_hist, dim=0, descending=True).values + torch.finfo(torch.float32).tiny

    sample_count = max(math.ceil(num_experts * SAMPLE_FRACTION), 1)
    metadata["expert1_balance_top"] = expert1_hist[:sample_count].sum()
    metadata["expert1_balance_bottom"] = expert1_hist[-sample_count:].sum()
    metadata["expert2_balance_top"] = expert2_hist[:sample_count].sum()
    metadata["expert2_balance_bottom"] = expert2_hist[-sample_count:].sum()

    if not normalize_gate_prob_before_dropping:
        gates1_s = (gates * mask1).sum(dim=1)
        gates2_s = (gates * mask2).sum(dim=1)
        denom_s = gates1_s + gates2_s
        denom_s = torch.clamp(denom_s, min=torch.finfo(denom_s.dtype).eps)
        gates1_s /= denom_s
        gates2_s /= denom_s

    assert not use_tutel  # the tutel return (indices, locations, gates lists) is not taken
    locations1_s = torch.sum(locations1 * mask1, dim=1)
    locations2_s = torch.sum(locations2 * mask2, dim=1)

    gates1 = gates1_s.unsqueeze(-1) * mask1.to(gates1_s.dtype)  # "s,se->se"
    gates2 = gates2_s.unsqueeze(-1) * mask2.to(gates2_s.dtype)
    locations1_sc = one_hot(locations1_s, num_classes=capacity, unsqueeze_indices=True)
    locations2_sc = one_hot(locations2_s, num_classes=capacity, unsqueeze_indices=True)
    combine1_sec = torch.bmm(gates1.unsqueeze(-1), locations1_sc.to(gates1.dtype).unsqueeze(1))  # "se,sc->sec"
    combine2_sec = torch.bmm(gates2.unsqueeze(-1), locations2_sc.to(gates2.dtype).unsqueeze(1))
    combine_weights = combine1_sec + combine2_sec
    dispatch_mask = combine_weights.bool()
    if use_fp32:
        return l_aux, combine_weights.to(orig_dtype), dispatch_mask, metadata
    return l_aux, combine_weights, dispatch_mask, metadata


class Top2Gate(nn.Module):
    """``top2gate.Top2Gate``: ``wg`` (fairseq ``Linear``, no bias) then ``top2gating``; eval mode
    switches the capacity to the eval token fraction."""

    def __init__(self, model_dim, num_experts, use_fp32=False, second_expert_policy="sampling",
                 normalize_gate_prob_before_dropping=False, moe_eval_capacity_token_fraction=0.25,
                 batch_prioritized_routing=False, use_tutel=False, init_model_on_gpu=False):
        super().__init__()
        self.wg = nn.Linear(model_dim, num_experts, bias=False)  # fairseq Linear: nn.Linear's init, on CPU
        self.use_fp32 = use_fp32
        self.second_expert_policy = second_expert_policy
        self.normalize_gate_prob_before_dropping = normalize_gate_prob_before_dropping
        self.moe_eval_capacity_token_fraction = moe_eval_capacity_token_fraction
        self.batch_prioritized_routing = batch_prioritized_routing
        self.use_tutel = use_tutel

    def forward(self, input, mask=None, moe_eval_capacity_length=None, prefix_tokens=None):
        logits = self.wg(input)
        return top2gating(logits, mask, use_fp32=self.use_fp32, second_expert_policy=self.second_expert_policy,
                          normalize_gate_prob_before_dropping=self.normalize_gate_prob_before_dropping,
                          eval_mode=not self.training,
                          moe_eval_capacity_token_fraction=self.moe_eval_capacity_token_fraction,
                          batch_prioritized_routing=self.batch_prioritized_routing,
                          moe_eval_capacity_length=moe_eval_capacity_length, use_tutel=self.use_tutel,
                          prefix_tokens=prefix_tokens)


# --------------------------------------------------------------------------- top1gate.py

def top1gating(logits, input_mask=None, use_fp32=False, capacity_factor=1.0, eval_mode=False,
               moe_eval_capacity_token_fraction=EVAL_CAPACITY_TOKEN_FRACTION, moe_eval_capacity_length=None,
               use_tutel=False, prefix_tokens=None):
    """``top1gate.top1gating``, op for op: fp32 logits, softmax, entropy metadata, capacity
    ``int(cf * ceil(S/E))`` on the host, argmax + scatter one-hot, the padding mask applied only if
    ``input_mask.any()`` (a host read of a tensor), histc / sort metadata, cumsum-1 locations, l_aux,
    ``mask1 * lt(loc, C)``, ``bmm`` outer product of gate and one-hot location, dispatch ``.bool()``."""
    metadata = {}
    if use_fp32:
        orig_dtype = logits.dtype
        logits = logits.float()
    gates = F.softmax(logits, dim=1)
    metadata["entropy_gating"] = entropy(probs=gates).mean().detach()

    num_tokens = gates.shape[0]
    num_experts = gates.shape[1]
    if moe_eval_capacity_token_fraction > 0.0 and eval_mode:
        if moe_eval_capacity_length is None:
            capacity = math.ceil(moe_eval_capacity_token_fraction * num_tokens)
        else:
            capacity = math.ceil(moe_eval_capacity_token_fraction * moe_eval_capacity_length)
    else:
        capacity = int(capacity_factor * math.ceil(num_tokens / num_experts))

    indices1_s = torch.argmax(gates, dim=1)
    mask1 = one_hot(indices1_s, num_classes=num_experts, unsqueeze_indices=True)
    if input_mask is not None and input_mask.any():
        nonpadding = ~input_mask
        mask1 = mask1 * nonpadding.unsqueeze(-1).to(mask1.dtype)

    expert1_hist = 100 * torch.histc(
        (indices1_s.squeeze() + 1).float(),  # deviation: .float(), CPU histc has no Long kernel
        bins=num_experts, min=1, max=num_experts) / num_tokens
    metadata["unused_expert1_count"] = (expert1_hist == 0).sum()
    expert1_hist = torch.sort(expert1_hist, dim=0, descending=True).values + torch.finfo(torch.float32).tiny
    sample_count = max(math.ceil(num_experts * SAMPLE_FRACTION), 1)
    metadata["expert1_balance_top"] = expert1_hist[:sample_count].sum()
    metadata["expert1_balance_bottom"] = expert1_hist[-sample_count:].sum()

    gates1_s = (gates * mask1).sum(dim=1)
    locations1 = get_fused_cumsum_sub_one(use_tutel)(mask1)

    me = torch.mean(gates, dim=0)
    ce = torch.mean(mask1.to(gates.dtype), dim=0)
    l_aux = torch.mean(me * ce)
    l_aux = l_aux * num_experts * num_experts

    assert not use_tutel  # the tutel return is not taken
    mask1 = mask1 * torch.lt(locations1, capacity)
    locations1_s = torch.sum(locations1 * mask1, dim=1)

    gates1 = gates1_s.unsqueeze(-1) * mask1.to(gates1_s.dtype)  # "s,se->se"
    locations1_sc = one_hot(locations1_s, num_classes=capacity, unsqueeze_indices=True)
    combine1_sec = torch.bmm(gates1.unsqueeze(-1), locations1_sc.to(gates1.dtype).unsqueeze(1))  # "se,sc->sec"
    dispatch_mask = combine1_sec.bool()
    if use_fp32:
        return l_aux, combine1_sec.to(orig_dtype), dispatch_mask, metadata
    return l_aux, combine1_sec, dispatch_mask, metadata


class Top1Gate(nn.Module):
    """``top1gate.Top1Gate``: ``wg`` (no bias) then ``top1gating`` (capacity factor 1.0, as
    ``TransformerDecoderLayerBase`` builds it)."""

    def __init__(self, model_dim, num_experts, use_fp32=False, input_noise_type=None, capacity_factor=1.0,
                 moe_eval_capacity_token_fraction=EVAL_CAPACITY_TOKEN_FRACTION, use_tutel=False,
                 init_model_on_gpu=False):
        super().__init__()
        self.wg = nn.Linear(model_dim, num_experts, bias=False)  # fairseq Linear: nn.Linear's init, on CPU
        self.use_fp32 = use_fp32
        self.input_noise_type = input_noise_type
        self.capacity_factor = capacity_factor
        self.moe_eval_capacity_token_fraction = moe_eval_capacity_token_fraction
        self.use_tutel = use_tutel

    def forward(self, input, mask=None, moe_eval_capacity_length=None, prefix_tokens=None):
        logits = self.wg(input)
        return top1gating(logits, mask, use_fp32=self.use_fp32, capacity_factor=self.capacity_factor,
                          eval_mode=not self.training,
                          moe_eval_capacity_token_fraction=self.moe_eval_capacity_token_fraction,
                          moe_eval_capacity_length=moe_eval_capacity_length, use_tutel=self.use_tutel,
                          prefix_tokens=prefix_tokens)


# --------------------------------------------------------------------------- transformer_layer.py experts

def gelu(x: torch.Tensor) -> torch.Tensor:
    """``fairseq.modules.gelu.gelu``: gelu in fp32, cast back to x's dtype."""
    return F.gelu(x.float()).type_as(x)


class FairseqDropout(nn.Module):
    """``fairseq.modules.fairseq_dropout.FairseqDropout``: dropout only if p > 0 and training
    (or applied during inference); else the input itself."""

    def __init__(self, p, module_name=None):
        super().__init__()
        self.p = p
        self.module_name = module_name
        self.apply_during_inference = False

    def forward(self, x, inplace: bool = False):
        if self.p > 0 and (self.training or self.apply_during_inference):
            return F.dropout(x, p=self.p, training=True, inplace=inplace)
        return x


def _ffn(x, fc1, activation_fn, activation_dropout_module, fc2, dropout_module, ffn_ln=None):
    """``transformer_layer._ffn``: flatten to (-1, d), ``F.linear`` with fc1's weight and bias (the
    fused bias-gelu kernel is Megatron's, absent here as in a CPU install: the unfused branch),
    activation, activation dropout, [ffn LayerNorm], fc2, ``view`` back, dropout."""
    x_shape = x.shape
    x = x.reshape(-1, x.size(-1))
    x = F.linear(x, fc1.weight, fc1.bias)  # has_fused_bias_gelu is False without megatron's kernels
    x = activation_fn(x)
    x = activation_dropout_module(x)
    if ffn_ln is not None:
        x = ffn_ln(x)
    x = F.linear(x, fc2.weight, fc2.bias)
    x = x.view(x_shape)
    fc_result = x
    x = dropout_module(x)
    return x, fc_result


class FeedForwardNetwork(nn.Module):
    """``transformer_layer.FeedForwardNetwork``: fc1 / fc2 (fairseq ``Linear`` with bias, quant
    noise p=0: the plain module), activation from the config, ``FairseqDropout`` modules; forward is
    ``_ffn(...)[0]``. ``dropout_module`` is the layer's own, passed in by ``make_experts``."""

    def __init__(self, cfg, embed_dim, ffn_dim, dropout_module=None):
        super().__init__()
        self.embed_dim = embed_dim
        self.activation_fn = {"gelu": gelu, "relu": F.relu}[str(cfg.activation_fn)]  # utils.get_activation_fn
        activation_dropout_p = cfg.activation_dropout or 0
        if activation_dropout_p == 0:
            activation_dropout_p = cfg.relu_dropout or 0
        self.activation_dropout_module = FairseqDropout(float(activation_dropout_p), module_name="FeedForwardNetwork")
        self.fc1 = nn.Linear(self.embed_dim, ffn_dim)  # quant_noise(Linear(...), p=0): the Linear itself
        self.fc2 = nn.Linear(ffn_dim, self.embed_dim)
        self.dropout_module = (FairseqDropout(cfg.dropout, module_name="FeedForwardNetwork")
                               if not dropout_module else dropout_module)

    def forward(self, x):
        return _ffn(x, fc1=self.fc1, activation_fn=self.activation_fn,
                    activation_dropout_module=self.activation_dropout_module, fc2=self.fc2,
                    dropout_module=self.dropout_module)[0]


def make_experts(cfg, embed_dim, expert_ffn_dim, dropout_module) -> nn.ModuleList:
    """``transformer_layer.make_experts`` at world size 1: one start seed drawn, each expert built
    under ``set_torch_seed(start_seed + rank * local_count + i)`` (RNG state restored after)."""
    world_size = 1  # torch.distributed not initialised
    ddp_rank = 0  # dist_utils.get_data_parallel_rank() at world size 1
    expert_list = []
    start_seed = torch.randint(1000000, (1,)).item()
    assert cfg.moe_expert_count >= world_size and cfg.moe_expert_count % world_size == 0
    local_moe_expert_count = cfg.moe_expert_count // world_size
    for i in range(local_moe_expert_count):
        with torch.random.fork_rng(devices=[]):  # utils.set_torch_seed: seed, then restore the RNG state
            torch.manual_seed(start_seed + ddp_rank * local_moe_expert_count + i)
            expert_list.append(FeedForwardNetwork(cfg, embed_dim, expert_ffn_dim, dropout_module))
    return nn.ModuleList(expert_list)


# --------------------------------------------------------------------------- moe_layer.py MOELayer

class MOELayer(nn.Module):
    """``moe_layer.MOELayer.forward`` (GShard algorithm 2, non-tutel path), op for op: the 3-D
    assert; expected batch size from the config (None with ``--max-tokens``: 0); reshape to (S, d);
    the ``--max-tokens`` padding: all-reduce MAX of S read back with ``.item()``, a zeros (S', d)
    buffer with the tokens copied in by slice assignment, a bool padding mask of ones with
    ``[:S] = False``; the gate called with the mask (``l_aux, combine, dispatch, self.metadata``);
    dispatch ``mm(dispatch_mask.to(dtype).permute(1, 2, 0).view(E*C, S), x)``; reshape to
    (all2all size, local experts, C, d), ``chunk`` along the local experts and a loop over
    ``zip(chunks, self.experts)``, ``cat``; reshape to (E, C, d); combine
    ``combine.view(S, E*C).mm(y.view(E*C, d))``; un-padding slices and reshape; the all-to-all
    statistics reset (attribute stores) in ``record_all_to_all_stats``; returns
    ``(output, {"moe_gate_loss": l_aux})``. Deviations: world size 1 (groups None, sizes 1:
    ``_AllToAll`` never runs, as in the source at all2all size 1); the all-reduce is the identity."""

    def __init__(self, gate, experts, args, group=None, all2all_group=None, max_positions=None,
                 init_model_on_gpu=False, tok_dropout=0.0, moe_local_drop=0.0):
        super().__init__()
        self.gate = gate
        if type(experts) == nn.ModuleList:
            self.experts = experts
        else:
            self.experts = nn.ModuleList([experts])
        self.expert_group = group  # deviation: distributed_utils.get_moe_group(E) at world size 1
        self.all2all_group = all2all_group  # deviation: distributed_utils.get_all2all_group(E) at world size 1
        for p in experts.parameters():
            p.expert = True
        self.world_size = 1  # distributed_utils.get_world_size(group) at world size 1
        self.all2all_size = 1
        self.num_local_experts = len(self.experts)
        self.args = args
        self.in_generation = False
        self.a2a_cuda_event_intervals = []
        self.a2a_cpu_time_ms = 0.0
        self.use_tutel = getattr(args, "use_tutel_moe", False)
        self.moe_eval_capacity_max_seqlen = getattr(args, "moe_eval_capacity_max_seqlen", False)
        self.max_positions = max_positions
        self.tok_dropout = tok_dropout
        self.moe_local_drop = moe_local_drop

    def forward(self, *input, input_padding_mask=None, prefix_tokens=None, **kwargs):
        assert len(input) == 1, "only single input Tensor supported"
        input = input[0]
        assert len(input.shape) == 3, "input Tensor must have dimensions: (s)equence, (t)oken, (m)odel"
        if input_padding_mask is not None:
            assert len(input_padding_mask.shape) == 2
            assert input_padding_mask.shape[0] == input.shape[0]
            assert input_padding_mask.shape[1] == input.shape[1]

        d_model = input.shape[2]
        input_shape = list(input.shape)
        expected_bsz = (getattr(self.args, "batch_size", 0) if self.training
                        else getattr(self.args, "batch_size_valid", 0))
        if expected_bsz is None:
            expected_bsz = 0
        if not self.in_generation and expected_bsz != 0 and input_shape[0] != expected_bsz:
            # padding the batch to --batch-size: not taken with --max-tokens (expected_bsz == 0)
            assert input_shape[0] < expected_bsz, f"{input_shape[0]} < {expected_bsz}"
            padded_input = torch.zeros((expected_bsz, input_shape[1], input_shape[2]), dtype=input.dtype,
                                       layout=input.layout, device=input.device)
            padded_input[: input_shape[0], :, :] = input
            input = padded_input
            padded_input_padding_mask = torch.ones((expected_bsz, input_shape[1]), dtype=torch.bool,
                                                   device=input.device)
            if input_padding_mask is not None:
                padded_input_padding_mask[: input_shape[0], :] = input_padding_mask
            else:
                padded_input_padding_mask[: input_shape[0], :] = False
            input_padding_mask = padded_input_padding_mask
            assert prefix_tokens is None

        reshaped_input = input.reshape(-1, d_model)
        reshaped_input_shape = reshaped_input.shape
        reshaped_input_padding_mask = input_padding_mask.reshape(-1) if input_padding_mask is not None else None
        reshaped_prefix_tokens = (prefix_tokens.repeat(1, input.shape[1]).reshape(-1)
                                  if prefix_tokens is not None else None)

        if expected_bsz == 0:
            expected_dim = int(_all_reduce_max(
                reshaped_input_shape[0] * torch.ones((1,), dtype=torch.long, device=input.device)).item())
            padded_input = torch.zeros((expected_dim, reshaped_input_shape[1]), dtype=input.dtype,
                                       layout=input.layout, device=input.device)
            padded_input[: reshaped_input_shape[0], :] = reshaped_input
            reshaped_input = padded_input

            padded_input_padding_mask = torch.ones((expected_dim,), dtype=torch.bool, device=padded_input.device)
            if reshaped_input_padding_mask is not None:
                padded_input_padding_mask[: reshaped_input_shape[0]] = reshaped_input_padding_mask
            else:
                padded_input_padding_mask[: reshaped_input_shape[0]] = False
            reshaped_input_padding_mask = padded_input_padding_mask
            assert reshaped_prefix_tokens is None

        if self.moe_eval_capacity_max_seqlen:
            eval_capacity_length = self.max_positions * input.shape[0]
        else:
            eval_capacity_length = None
        assert not self.use_tutel  # the tutel dispatcher branch is not taken
        l_aux, combine_weights, dispatch_mask, self.metadata = self.gate(
            reshaped_input, reshaped_input_padding_mask, eval_capacity_length, prefix_tokens=reshaped_prefix_tokens)
        dispatch_mask = dispatch_mask.to(input.dtype).permute(1, 2, 0)  # S,E,C -> E,C,S
        E_, C, S = dispatch_mask.size()
        M = reshaped_input.size(1)
        assert reshaped_input.size() == (S, M)
        dispatched_input = torch.mm(dispatch_mask.view(E_ * C, S), reshaped_input)  # "sec,sm->ecm"

        use_all_to_all = True
        assert not (self.moe_local_drop > 0.0 and self.training)  # moe_local_drop 0 (a random rank-0 draw otherwise)
        if self.all2all_size > 1 and use_all_to_all:
            dispatched_input = self.all_to_all_wrapper(dispatched_input)
        dispatched_input = dispatched_input.reshape(self.all2all_size, self.num_local_experts, -1, d_model)
        chunks = dispatched_input.chunk(self.num_local_experts, dim=1)
        expert_outputs = []
        for chunk, expert in zip(chunks, self.experts):
            expert_outputs += [expert(chunk)]
        expert_output = torch.cat(expert_outputs, dim=1)
        if self.all2all_size > 1 and use_all_to_all:
            expert_output = self.all_to_all_wrapper(expert_output)
        assert not self.tok_dropout > 0.0  # moe_eom 0 (a random token mask in training otherwise)

        expert_output = expert_output.reshape(self.all2all_size * self.num_local_experts, -1, d_model)
        combined_output = combine_weights.view(S, E_ * C).mm(expert_output.view(E_ * C, M))  # "sec,ecm->sm"

        combined_output = combined_output[: reshaped_input_shape[0], :]
        combined_output = combined_output.reshape(input.shape)
        combined_output = combined_output[: input_shape[0], :, :]

        self.record_all_to_all_stats()
        return combined_output, {"moe_gate_loss": l_aux}

    def all_to_all_wrapper(self, input):
        # never called at all2all size 1; the CUDA event timing of the source is left out
        return _AllToAll.apply(self.all2all_group, input)

    def record_all_to_all_stats(self):
        record_a2a_perf_stats = getattr(self.args, "record_a2a_perf_stats", False)
        assert not record_a2a_perf_stats  # needs torch.cuda.synchronize and CUDA events
        self.a2a_cpu_time_ms = 0.0
        self.a2a_cuda_event_intervals = []


class FairseqMoEOutput(nn.Module):
    """Catalogue wrapper (not in the source): calls ``MOELayer`` unchanged, keeps its aux dict as
    ``self.aux`` (``{"moe_gate_loss": l_aux}``) and returns the output tensor only."""

    def __init__(self, moe):
        super().__init__()
        self.moe = moe

    def forward(self, x):
        out, aux = self.moe(x)
        self.aux = aux
        return out


def _cfg(top1: bool):
    # the argparse namespace fields MOELayer, the gates and the experts read
    return SimpleNamespace(
        moe_expert_count=E, moe_top1_expert=top1, moe_gating_use_fp32=True, moe_second_expert_policy="all",
        moe_normalize_gate_prob_before_dropping=False, moe_eval_capacity_token_fraction=0.25,
        moe_batch_prioritized_routing=False, use_tutel_moe=False, moe_eval_capacity_max_seqlen=False,
        batch_size=None, batch_size_valid=None,  # --max-tokens training: MOELayer pads via all-reduce + .item()
        activation_fn="gelu", activation_dropout=0.0, relu_dropout=0.0,
        dropout=0.0,  # deviation: fairseq's usual 0.1 dropout is random in training mode
        record_a2a_perf_stats=False, moe_eom=0.0, moe_local_drop=0.0)


def build(top1: bool) -> FairseqMoEOutput:
    """As ``TransformerDecoderLayerBase.__init__`` builds the MoE sublayer (``is_moe_layer``)."""
    cfg = _cfg(top1)
    dropout_module = FairseqDropout(cfg.dropout, module_name="TransformerDecoderLayerBase")
    if cfg.moe_top1_expert:
        gate = Top1Gate(D, cfg.moe_expert_count, use_fp32=cfg.moe_gating_use_fp32,
                        moe_eval_capacity_token_fraction=cfg.moe_eval_capacity_token_fraction,
                        use_tutel=cfg.use_tutel_moe)
    else:
        gate = Top2Gate(D, cfg.moe_expert_count, cfg.moe_gating_use_fp32, cfg.moe_second_expert_policy,
                        cfg.moe_normalize_gate_prob_before_dropping, cfg.moe_eval_capacity_token_fraction,
                        cfg.moe_batch_prioritized_routing, use_tutel=cfg.use_tutel_moe)
    experts = make_experts(cfg, D, N, dropout_module)
    return FairseqMoEOutput(MOELayer(gate, experts, cfg, max_positions=1024, tok_dropout=cfg.moe_eom,
                                     moe_local_drop=cfg.moe_local_drop))


_x3d = tokens(lambda T: (1, T, D))  # MOELayer asserts (batch, seq, model)
_SRC = ("facebookresearch/fairseq (moe branch) fairseq/modules/moe/moe_layer.py MOELayer, {gate}, experts "
        "fairseq/modules/transformer_layer.py make_experts + FeedForwardNetwork (_ffn)")

ENTRIES = [
    Idiom("fairseq_moe_top2", _SRC.format(gate="fairseq/modules/moe/top2gate.py Top2Gate + top2gating"),
          seeded(360, lambda: build(top1=False)), _x3d, expect=1, faithful=True,
          fullgraph=False,  # MOELayer's --max-tokens padding reads the all-reduced token count with .item()
          other_gemms=1,  # router linear (the bmm outer products of the combine tensor are read as products)
          note="--max-tokens padding (all-reduce MAX .item(), zeros buffer + slice copy, padding mask the gate "
               "applies), fp32 gating, argmax keepdim + scatter_ one-hot, locations2 += in place, gates1_s /= "
               "after dropping, combine by bmm outer products, dispatch/combine by mm on permuted views, "
               "metadata dict (entropy, overflow, histc, sort) stored as self.metadata, fp32 gelu cast back"),
    Idiom("fairseq_moe_top1", _SRC.format(gate="fairseq/modules/moe/top1gate.py Top1Gate + top1gating"),
          seeded(361, lambda: build(top1=True)), _x3d, expect=1, faithful=True,
          # top1gating's `if input_mask is not None and input_mask.any():` branches on the padding mask MOELayer
          # builds as ones((n,)) with [:n] = False: proved all False for every n (moe_inductor.dynamo.uniform_values),
          # so the branch is taken at trace time in sonic frames, without a graph break
          fullgraph=False,  # .item() in MOELayer's padding and input_mask.any() in top1gating
          other_gemms=1,  # router linear (the bmm outer product of the combine tensor is read as a product)
          note="as fairseq_moe_top2 with top1gating: capacity int(1.0 * ceil(S/E)), the padding mask applied "
               "only if input_mask.any() (a host read), no renormalisation, one bmm outer product"),
]
