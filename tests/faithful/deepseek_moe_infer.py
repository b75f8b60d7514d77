"""DeepSeek-V2 / DeepSeek-V3 Hugging Face Hub remote code, the MoE block's inference branch
(``moe_infer``), re-implemented op for op at a tiny size.

Sources read (the Hub repositories' ``modeling_deepseek.py`` through GitHub copies, byte-identical
in the MoE classes to the Hub files they name in their headers):
- DeepSeek-V3 (huggingface.co/deepseek-ai/DeepSeek-V3 ``modeling_deepseek.py``): the copy in
  github sumansaurabh/deeseek-model-visualizer ``modeling_deepseek.py`` at commit
  076adb67e3b79c78eb5c01e503a368defc36100d: ``DeepseekV3MLP``, ``MoEGate`` (sigmoid scores,
  ``noaux_tc`` top-k with ``e_score_correction_bias``), ``DeepseekV3MoE.forward`` / ``moe_infer``.
- DeepSeek-V2 / V2-Lite (huggingface.co/deepseek-ai/DeepSeek-V2[-Lite] ``modeling_deepseek.py``):
  the copy in github yuyijiong/deepseek-MLA-correct ``modeling_deepseek.py`` at commit
  ac71cc90040babab3ba5990fa6d8a9e8c6a65d17: ``DeepseekV2MLP``, ``MoEGate`` (softmax scores,
  ``greedy`` / ``group_limited_greedy``, the aux loss in training), ``AddAuxiliaryLoss``,
  ``DeepseekV2MoE.forward`` / ``moe_infer``.

Run in eval mode (the factories call ``.eval()``): ``forward`` takes ``moe_infer`` when not
training (V3's gate asserts it). ``moe_infer`` is decorated ``@torch.no_grad()`` in both sources,
kept: the routed output carries no gradient, only the shared experts' part does (as in the
source). Expert parallelism off (no ``config.ep_size``, so ``ep_size = 1``): the ``ep_size > 1``
branches with ``dist.all_to_all`` are not reached and are not re-implemented.

Deviations common to the classes: tiny sizes (hidden D, expert width N, E experts, top-K, groups
of 2 experts); fp32 weights (the checkpoints are bf16; the gates compute in fp32 in the source
anyway); weights drawn at init (the source's ``kaiming_uniform_`` / ``torch.empty`` + checkpoint
load); ``ACT2FN["silu"]`` (transformers' ``SiLUActivation``, ``F.silu``) re-declared here so that
only torch is imported.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

from idiom_catalogue import D, E, K, N, Idiom, seeded, tokens


class SiLUActivation(nn.Module):
    """transformers ``activations.SiLUActivation`` (``ACT2FN["silu"]``)."""

    def forward(self, input):
        return F.silu(input)


class DeepseekMLP(nn.Module):
    """``DeepseekV3MLP`` / ``DeepseekV2MLP`` (identical): down(act(gate(x)) * up(x))."""

    def __init__(self, config, hidden_size=None, intermediate_size=None):
        super().__init__()
        self.config = config
        self.hidden_size = config.hidden_size if hidden_size is None else hidden_size
        self.intermediate_size = config.intermediate_size if intermediate_size is None else intermediate_size
        self.gate_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=False)
        self.up_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=False)
        self.down_proj = nn.Linear(self.intermediate_size, self.hidden_size, bias=False)
        self.act_fn = SiLUActivation()  # ACT2FN[config.hidden_act], hidden_act "silu"

    def forward(self, x):
        down_proj = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        return down_proj


class MoEGateV3(nn.Module):
    """DeepSeek-V3 ``MoEGate``: fp32 logits of the flattened tokens, sigmoid scores; ``noaux_tc``:
    scores + ``e_score_correction_bias`` for the choice only, group score = sum of the two best
    biased scores of each group, ``topk_group`` groups kept through a 0/1 group mask built with
    ``scatter_`` and expanded to the experts, the others' biased scores set to 0.0 (as written),
    top-k of those (``sorted=False``), weights gathered from the unbiased scores; renormalised
    (``+ 1e-20``) when ``norm_topk_prob``; always times ``routed_scaling_factor``. Returns
    ``(topk_idx, topk_weight)``. The correction bias is an ``nn.Parameter`` in the source, kept so."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.top_k = config.num_experts_per_tok
        self.n_routed_experts = config.n_routed_experts
        self.routed_scaling_factor = config.routed_scaling_factor
        self.scoring_func = config.scoring_func
        self.seq_aux = config.seq_aux
        self.topk_method = config.topk_method
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.norm_topk_prob = config.norm_topk_prob
        self.gating_dim = config.hidden_size
        self.weight = nn.Parameter(torch.randn(self.n_routed_experts, self.gating_dim) / self.gating_dim ** 0.5)
        if self.topk_method == "noaux_tc":
            # deviation: a checkpoint loads it; a small spread here so that it changes some choices
            self.e_score_correction_bias = nn.Parameter(torch.linspace(-0.2, 0.2, self.n_routed_experts))

    def forward(self, hidden_states):
        bsz, seq_len, h = hidden_states.shape
        hidden_states = hidden_states.view(-1, h)
        logits = F.linear(hidden_states.type(torch.float32), self.weight.type(torch.float32), None)
        if self.scoring_func == "sigmoid":
            scores = logits.sigmoid()
        else:
            raise NotImplementedError(f"scoring function {self.scoring_func}")
        if self.topk_method == "noaux_tc":
            assert not self.training
            scores_for_choice = scores.view(bsz * seq_len, -1) + self.e_score_correction_bias.unsqueeze(0)
            group_scores = scores_for_choice.view(bsz * seq_len, self.n_group, -1).topk(2, dim=-1)[0].sum(dim=-1)
            group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
            group_mask = torch.zeros_like(group_scores)
            group_mask.scatter_(1, group_idx, 1)
            score_mask = (group_mask.unsqueeze(-1)
                          .expand(bsz * seq_len, self.n_group, self.n_routed_experts // self.n_group)
                          .reshape(bsz * seq_len, -1))
            tmp_scores = scores_for_choice.masked_fill(~score_mask.bool(), 0.0)
            _, topk_idx = torch.topk(tmp_scores, k=self.top_k, dim=-1, sorted=False)
            topk_weight = scores.gather(1, topk_idx)
        else:
            raise NotImplementedError(f"top-k method {self.topk_method}")
        if self.top_k > 1 and self.norm_topk_prob:
            denominator = topk_weight.sum(dim=-1, keepdim=True) + 1e-20
            topk_weight = topk_weight / denominator
        topk_weight = topk_weight * self.routed_scaling_factor
        return topk_idx, topk_weight


class MoEGateV2(nn.Module):
    """DeepSeek-V2 ``MoEGate``: fp32 logits, softmax scores (fp32); ``greedy``: top-k
    (``sorted=False``); ``group_limited_greedy``: group score = the group's max, ``topk_group``
    groups kept by a ``scatter_`` mask, the other experts' scores set to 0.0, top-k of those;
    then either renormalised (``norm_topk_prob``, ``+ 1e-20``, no scaling) or times
    ``routed_scaling_factor`` (the V2 source scales only when it does not renormalise). In
    training with ``aux_loss_alpha > 0`` the expert-level (or sequence-level) balance loss is
    computed; in eval it is None. Returns ``(topk_idx, topk_weight, aux_loss)``."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.top_k = config.num_experts_per_tok
        self.n_routed_experts = config.n_routed_experts
        self.routed_scaling_factor = config.routed_scaling_factor
        self.scoring_func = config.scoring_func
        self.alpha = config.aux_loss_alpha
        self.seq_aux = config.seq_aux
        self.topk_method = config.topk_method
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.norm_topk_prob = config.norm_topk_prob
        self.gating_dim = config.hidden_size
        self.weight = nn.Parameter(torch.randn(self.n_routed_experts, self.gating_dim) / self.gating_dim ** 0.5)

    def forward(self, hidden_states):
        bsz, seq_len, h = hidden_states.shape
        hidden_states = hidden_states.view(-1, h)
        logits = F.linear(hidden_states.type(torch.float32), self.weight.type(torch.float32), None)
        if self.scoring_func == "softmax":
            scores = logits.softmax(dim=-1, dtype=torch.float32)
        else:
            raise NotImplementedError(f"scoring function {self.scoring_func}")
        if self.topk_method == "greedy":
            topk_weight, topk_idx = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)
        elif self.topk_method == "group_limited_greedy":
            group_scores = scores.view(bsz * seq_len, self.n_group, -1).max(dim=-1).values
            group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
            group_mask = torch.zeros_like(group_scores)
            group_mask.scatter_(1, group_idx, 1)
            score_mask = (group_mask.unsqueeze(-1)
                          .expand(bsz * seq_len, self.n_group, self.n_routed_experts // self.n_group)
                          .reshape(bsz * seq_len, -1))
            tmp_scores = scores.masked_fill(~score_mask.bool(), 0.0)
            topk_weight, topk_idx = torch.topk(tmp_scores, k=self.top_k, dim=-1, sorted=False)
        if self.top_k > 1 and self.norm_topk_prob:
            denominator = topk_weight.sum(dim=-1, keepdim=True) + 1e-20
            topk_weight = topk_weight / denominator
        else:
            topk_weight = topk_weight * self.routed_scaling_factor
        if self.training and self.alpha > 0.0:  # not taken: the entries run in eval mode
            scores_for_aux = scores
            aux_topk = self.top_k
            topk_idx_for_aux_loss = topk_idx.view(bsz, -1)
            if self.seq_aux:
                scores_for_seq_aux = scores_for_aux.view(bsz, seq_len, -1)
                ce = torch.zeros(bsz, self.n_routed_experts, device=hidden_states.device)
                ce.scatter_add_(1, topk_idx_for_aux_loss,
                                torch.ones(bsz, seq_len * aux_topk, device=hidden_states.device)
                                ).div_(seq_len * aux_topk / self.n_routed_experts)
                aux_loss = (ce * scores_for_seq_aux.mean(dim=1)).sum(dim=1).mean() * self.alpha
            else:
                mask_ce = F.one_hot(topk_idx_for_aux_loss.view(-1), num_classes=self.n_routed_experts)
                ce = mask_ce.float().mean(0)
                Pi = scores_for_aux.mean(0)
                fi = ce * self.n_routed_experts
                aux_loss = (Pi * fi).sum() * self.alpha
        else:
            aux_loss = None
        return topk_idx, topk_weight, aux_loss


class AddAuxiliaryLoss(torch.autograd.Function):
    """DeepSeek-V2 ``AddAuxiliaryLoss``: identity on x forward; backward hands the aux loss a
    gradient of ones (only in the training branch, not taken here)."""

    @staticmethod
    def forward(ctx, x, loss):
        assert loss.numel() == 1
        ctx.dtype = loss.dtype
        ctx.required_aux_loss = loss.requires_grad
        return x

    @staticmethod
    def backward(ctx, grad_output):
        grad_loss = None
        if ctx.required_aux_loss:
            grad_loss = torch.ones(1, dtype=ctx.dtype, device=grad_output.device)
        return grad_output, grad_loss


class _MoeInfer:
    """``moe_infer`` as both sources write it (the same text in V2 and V3), for ``ep_size == 1``:
    per-expert counts by ``scatter_`` of ones into a (T, E) zeros table and a column sum; the
    flattened top-k ids ``argsort``-ed (not stable); the sorted rows ``x[idxs // K]``; the counts
    copied to the host (``.cpu().numpy()``); a Python loop over the counts that skips
    ``num_tokens == 0`` and slices ``sorted_tokens[start_idx:end_idx]`` with a start carried from
    one expert to the next; ``torch.cat`` of the outputs (``new_empty(0)`` when none);
    ``new_x[idxs] = outs`` into ``empty_like``; ``view(T, K, -1)``, cast to the weights' dtype,
    in-place ``mul_`` by the weights, ``sum(dim=1)``, cast back."""

    @torch.no_grad()
    def moe_infer(self, x, topk_ids, topk_weight):
        cnts = topk_ids.new_zeros((topk_ids.shape[0], len(self.experts)))
        cnts.scatter_(1, topk_ids, 1)
        tokens_per_expert = cnts.sum(dim=0)
        idxs = topk_ids.view(-1).argsort()
        sorted_tokens = x[idxs // topk_ids.shape[1]]
        sorted_tokens_shape = sorted_tokens.shape  # noqa: F841  (used by the ep_size > 1 branch only)
        if self.ep_size > 1:
            # not re-implemented: all_to_all of the counts and rows between ranks (world size 1 here)
            raise NotImplementedError("expert parallelism")
        tokens_per_expert = tokens_per_expert.cpu().numpy()

        outputs = []
        start_idx = 0
        for i, num_tokens in enumerate(tokens_per_expert):
            end_idx = start_idx + num_tokens
            if num_tokens == 0:
                continue
            expert = self.experts[i + self.ep_rank * self.experts_per_rank]
            tokens_for_this_expert = sorted_tokens[start_idx:end_idx]
            expert_out = expert(tokens_for_this_expert)
            outputs.append(expert_out)
            start_idx = end_idx

        outs = torch.cat(outputs, dim=0) if len(outputs) else sorted_tokens.new_empty(0)
        # (ep_size > 1: the rows go back to their ranks here; not reached)
        new_x = torch.empty_like(outs)
        new_x[idxs] = outs
        final_out = (new_x.view(*topk_ids.shape, -1)
                     .type(topk_weight.dtype)
                     .mul_(topk_weight.unsqueeze(dim=-1))
                     .sum(dim=1)
                     .type(new_x.dtype))
        return final_out


def _experts(self, config, mlp):
    """The ``__init__`` part both sources share: ``ep_size`` 1 (no ``config.ep_size``), every
    routed expert local, the gate, the shared experts (width ``moe_intermediate_size *
    n_shared_experts``)."""
    self.config = config
    self.num_experts_per_tok = config.num_experts_per_tok
    if hasattr(config, "ep_size") and config.ep_size > 1:
        raise NotImplementedError("expert parallelism")  # not reached: world size 1
    self.ep_size = 1
    self.experts_per_rank = config.n_routed_experts
    self.ep_rank = 0
    self.experts = nn.ModuleList([mlp(config, intermediate_size=config.moe_intermediate_size)
                                  for i in range(config.n_routed_experts)])


class DeepseekV3MoE(_MoeInfer, nn.Module):
    """DeepSeek-V3 Hub ``DeepseekV3MoE``: ``forward`` keeps the input as ``identity``, runs the gate
    on the 3-D hidden states, flattens them, takes ``moe_infer`` when not training (the source
    has no training branch), adds the shared experts' output on ``identity``."""

    def __init__(self, config):
        super().__init__()
        _experts(self, config, DeepseekMLP)
        self.gate = MoEGateV3(config)
        if config.n_shared_experts is not None:
            intermediate_size = config.moe_intermediate_size * config.n_shared_experts
            self.shared_experts = DeepseekMLP(config=config, intermediate_size=intermediate_size)

    def forward(self, hidden_states):
        identity = hidden_states
        orig_shape = hidden_states.shape
        topk_idx, topk_weight = self.gate(hidden_states)
        hidden_states = hidden_states.view(-1, hidden_states.shape[-1])
        flat_topk_idx = topk_idx.view(-1)  # noqa: F841  (computed and unused in the source)
        if not self.training:
            y = self.moe_infer(hidden_states, topk_idx, topk_weight).view(*orig_shape)
        if self.config.n_shared_experts is not None:
            y = y + self.shared_experts(identity)
        return y


class DeepseekV2MoE(_MoeInfer, nn.Module):
    """DeepSeek-V2 Hub ``DeepseekV2MoE``: the same, with the gate's aux loss returned and a
    training branch (``repeat_interleave`` rows, ``y[flat_topk_idx == i] = expert(...)`` into
    ``empty_like``, weighted sum, ``AddAuxiliaryLoss``) that eval mode does not take."""

    def __init__(self, config):
        super().__init__()
        _experts(self, config, DeepseekMLP)
        self.gate = MoEGateV2(config)
        if config.n_shared_experts is not None:
            intermediate_size = config.moe_intermediate_size * config.n_shared_experts
            self.shared_experts = DeepseekMLP(config=config, intermediate_size=intermediate_size)

    def forward(self, hidden_states):
        identity = hidden_states
        orig_shape = hidden_states.shape
        topk_idx, topk_weight, aux_loss = self.gate(hidden_states)
        hidden_states = hidden_states.view(-1, hidden_states.shape[-1])
        flat_topk_idx = topk_idx.view(-1)
        if self.training:
            hidden_states = hidden_states.repeat_interleave(self.num_experts_per_tok, dim=0)
            y = torch.empty_like(hidden_states)
            for i, expert in enumerate(self.experts):
                y[flat_topk_idx == i] = expert(hidden_states[flat_topk_idx == i])
            y = (y.view(*topk_weight.shape, -1) * topk_weight.unsqueeze(-1)).sum(dim=1)
            y = y.to(hidden_states.dtype).view(*orig_shape)
            y = AddAuxiliaryLoss.apply(y, aux_loss)
        else:
            y = self.moe_infer(hidden_states, topk_idx, topk_weight).view(*orig_shape)
        if self.config.n_shared_experts is not None:
            y = y + self.shared_experts(identity)
        return y


def _config(**kw):
    """The config fields the MoE classes read (``DeepseekV3Config`` / ``DeepseekV2Config``), tiny."""
    base = dict(hidden_size=D, intermediate_size=2 * N, moe_intermediate_size=N, n_routed_experts=E,
                num_experts_per_tok=K, hidden_act="silu", seq_aux=True, aux_loss_alpha=0.001)
    base.update(kw)
    return SimpleNamespace(**base)


def v3():
    # DeepSeek-V3 config.json: sigmoid, noaux_tc, n_group 8 / topk_group 4 (here 2 / 1), norm_topk_prob
    # true, routed_scaling_factor 2.5, n_shared_experts 1
    return DeepseekV3MoE(_config(scoring_func="sigmoid", topk_method="noaux_tc", n_group=2, topk_group=1,
                                 norm_topk_prob=True, routed_scaling_factor=2.5, n_shared_experts=1)).eval()


def v2():
    # DeepSeek-V2 config.json: softmax, group_limited_greedy, n_group 8 / topk_group 3 (here 2 / 1),
    # norm_topk_prob false, routed_scaling_factor 16.0, n_shared_experts 2
    return DeepseekV2MoE(_config(scoring_func="softmax", topk_method="group_limited_greedy", n_group=2,
                                 topk_group=1, norm_topk_prob=False, routed_scaling_factor=16.0,
                                 n_shared_experts=2)).eval()


def v2_lite():
    # DeepSeek-V2-Lite config.json: softmax, greedy, n_group 1, norm_topk_prob false,
    # routed_scaling_factor 1.0, n_shared_experts 2
    return DeepseekV2MoE(_config(scoring_func="softmax", topk_method="greedy", n_group=1, topk_group=1,
                                 norm_topk_prob=False, routed_scaling_factor=1.0, n_shared_experts=2)).eval()


_x3d = tokens(lambda T: (1, T, D))  # the decoder layer passes (batch, seq, hidden)

_NOTE = ("@torch.no_grad() moe_infer: scatter_ counts, argsort, x[idxs // K], .cpu().numpy() host counts, "
         "a loop slicing sorted rows by a start carried across experts with 'if num_tokens == 0: continue', "
         "torch.cat, new_x[idxs] = outs into empty_like, in-place mul_ by the weights")

ENTRIES = [
    Idiom("deepseek_moe_infer_v3", "DeepSeek-V3 Hub modeling_deepseek.py DeepseekV3MoE.moe_infer + MoEGate "
          "(sigmoid, noaux_tc) + DeepseekV3MLP, eval mode, ep_size 1",
          seeded(105, v3), _x3d, expect=1, faithful=True, fullgraph=False, other_gemms=4,
          note=_NOTE + "; the noaux_tc gate (correction bias as a parameter, top-2-sum group scores, masked_fill "
                       "0.0, renormalise + 1e-20, scale)"),
    Idiom("deepseek_moe_infer_v2", "DeepSeek-V2 Hub modeling_deepseek.py DeepseekV2MoE.moe_infer + MoEGate "
          "(softmax, group_limited_greedy) + DeepseekV2MLP, eval mode, ep_size 1",
          seeded(106, v2), _x3d, expect=1, faithful=True, fullgraph=False, other_gemms=4,
          note=_NOTE + "; the group-limited gate (max group score, scatter_ mask, masked_fill 0.0, x16 scale "
                       "without renormalisation), aux loss None in eval"),
    Idiom("deepseek_moe_infer_v2_lite", "DeepSeek-V2-Lite Hub modeling_deepseek.py DeepseekV2MoE.moe_infer + "
          "MoEGate (softmax, greedy) + DeepseekV2MLP, eval mode, ep_size 1",
          seeded(107, v2_lite), _x3d, expect=1, faithful=True, fullgraph=False, other_gemms=4,
          note=_NOTE + "; the greedy softmax gate with topk(sorted=False)"),
]
