"""David Rau's sparsely-gated mixture of experts (github davidmrau/mixture-of-experts, ``moe.py``),
re-implemented op for op at a tiny size.

Source read: ``moe.py`` at commit f662999727109357c42074997e9a6cd72806f668 (2024-04-19, the
repository's head; ``moe.py`` last changed at 1d77a00a0c7d0eef67e38d321129a2e110b2ee95): the
``SparseDispatcher`` helper object (``torch.nonzero(gates).sort(0)``, expert and batch indices, host
part sizes ``(gates > 0).sum(0).tolist()``, ``dispatch`` by ``inp[batch_index].squeeze(1)`` and
``torch.split``, ``combine`` by ``cat``, ``mul`` by the nonzero gates and ``index_add`` into an fp32
``zeros(..., requires_grad=True)``; this version has no ``exp``/``log`` in ``combine``, only the
comment left from the older log-space one), ``MLP`` experts, and ``MoE`` with
``noisy_top_k_gating`` (softmax of the logits, top k+1, renormalised top-k gates scattered into a
``zeros_like(..., requires_grad=True)``), ``_prob_in_top_k`` (the Normal cdf load), ``_gates_to_load``
and the ``cv_squared`` importance and load losses.

The expert ``MLP`` is ``Linear -> ReLU -> Linear -> Softmax(dim=1)``: its output is a softmax over
the output features of each row, applied after the down projection, and the source offers no other
expert. The fused op computes ``down(act(up(x)))`` per expert, so no composition can take these
blocks: both entries stay pending, with the experts part saying why.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributions.normal import Normal

from idiom_catalogue import D, E, K, N, Idiom, seeded, tokens


class SparseDispatcher(object):
    """``SparseDispatcher``: a plain Python object built in ``MoE.forward`` from the (B, E) gates."""

    def __init__(self, num_experts, gates):
        self._gates = gates
        self._num_experts = num_experts
        sorted_experts, index_sorted_experts = torch.nonzero(gates).sort(0)
        _, self._expert_index = sorted_experts.split(1, dim=1)
        self._batch_index = torch.nonzero(gates)[index_sorted_experts[:, 1], 0]
        self._part_sizes = (gates > 0).sum(0).tolist()
        gates_exp = gates[self._batch_index.flatten()]
        self._nonzero_gates = torch.gather(gates_exp, 1, self._expert_index)

    def dispatch(self, inp):
        inp_exp = inp[self._batch_index].squeeze(1)
        return torch.split(inp_exp, self._part_sizes, dim=0)

    def combine(self, expert_out, multiply_by_gates=True):
        stitched = torch.cat(expert_out, 0)
        if multiply_by_gates:
            stitched = stitched.mul(self._nonzero_gates)
        zeros = torch.zeros(self._gates.size(0), expert_out[-1].size(1), requires_grad=True, device=stitched.device)
        combined = zeros.index_add(0, self._batch_index, stitched.float())
        return combined

    def expert_to_gates(self):
        return torch.split(self._nonzero_gates, self._part_sizes, dim=0)


class MLP(nn.Module):
    """The source's expert: fc1, ReLU, fc2, then ``nn.Softmax(1)`` over the output features."""

    def __init__(self, input_size, output_size, hidden_size):
        super(MLP, self).__init__()
        self.fc1 = nn.Linear(input_size, hidden_size)
        self.fc2 = nn.Linear(hidden_size, output_size)
        self.relu = nn.ReLU()
        self.soft = nn.Softmax(1)

    def forward(self, x):
        out = self.fc1(x)
        out = self.relu(out)
        out = self.fc2(out)
        out = self.soft(out)
        return out


class MoE(nn.Module):
    """``MoE`` op for op (the training entry's Gaussian is the one deviation, beside the code)."""

    def __init__(self, input_size, output_size, num_experts, hidden_size, noisy_gating=True, k=4):
        super(MoE, self).__init__()
        self.noisy_gating = noisy_gating
        self.num_experts = num_experts
        self.output_size = output_size
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.k = k
        self.experts = nn.ModuleList([MLP(self.input_size, self.output_size, self.hidden_size)
                                      for i in range(self.num_experts)])
        self.w_gate = nn.Parameter(torch.zeros(input_size, num_experts), requires_grad=True)
        self.w_noise = nn.Parameter(torch.zeros(input_size, num_experts), requires_grad=True)
        self.softplus = nn.Softplus()
        self.softmax = nn.Softmax(1)
        self.register_buffer("mean", torch.tensor([0.0]))
        self.register_buffer("std", torch.tensor([1.0]))
        assert(self.k <= self.num_experts)

    def cv_squared(self, x):
        eps = 1e-10
        if x.shape[0] == 1:
            return torch.tensor([0], device=x.device, dtype=x.dtype)
        return x.float().var() / (x.float().mean()**2 + eps)

    def _gates_to_load(self, gates):
        return (gates > 0).sum(0)

    def _prob_in_top_k(self, clean_values, noisy_values, noise_stddev, noisy_top_values):
        batch = clean_values.size(0)
        m = noisy_top_values.size(1)
        top_values_flat = noisy_top_values.flatten()
        threshold_positions_if_in = torch.arange(batch, device=clean_values.device) * m + self.k
        threshold_if_in = torch.unsqueeze(torch.gather(top_values_flat, 0, threshold_positions_if_in), 1)
        is_in = torch.gt(noisy_values, threshold_if_in)
        threshold_positions_if_out = threshold_positions_if_in - 1
        threshold_if_out = torch.unsqueeze(torch.gather(top_values_flat, 0, threshold_positions_if_out), 1)
        normal = Normal(self.mean, self.std)
        prob_if_in = normal.cdf((clean_values - threshold_if_in)/noise_stddev)
        prob_if_out = normal.cdf((clean_values - threshold_if_out)/noise_stddev)
        prob = torch.where(is_in, prob_if_in, prob_if_out)
        return prob

    def noisy_top_k_gating(self, x, train, noise_epsilon=1e-2):
        clean_logits = x @ self.w_gate
        if self.noisy_gating and train:
            raw_noise_stddev = x @ self.w_noise
            noise_stddev = ((self.softplus(raw_noise_stddev) + noise_epsilon))
            # deviation (training entry only): zeros for the unit Gaussian (source: torch.randn_like), so
            # eager and compiled draw the same; the noise scale, the product and the sum stay
            noisy_logits = clean_logits + (torch.zeros_like(clean_logits) * noise_stddev)
            logits = noisy_logits
        else:
            logits = clean_logits
        logits = self.softmax(logits)
        top_logits, top_indices = logits.topk(min(self.k + 1, self.num_experts), dim=1)
        top_k_logits = top_logits[:, :self.k]
        top_k_indices = top_indices[:, :self.k]
        top_k_gates = top_k_logits / (top_k_logits.sum(1, keepdim=True) + 1e-6)
        zeros = torch.zeros_like(logits, requires_grad=True)
        gates = zeros.scatter(1, top_k_indices, top_k_gates)
        if self.noisy_gating and self.k < self.num_experts and train:
            load = (self._prob_in_top_k(clean_logits, noisy_logits, noise_stddev, top_logits)).sum(0)
        else:
            load = self._gates_to_load(gates)
        return gates, load

    def forward(self, x, loss_coef=1e-2):
        gates, load = self.noisy_top_k_gating(x, self.training)
        importance = gates.sum(0)
        loss = self.cv_squared(importance) + self.cv_squared(load)
        loss *= loss_coef
        dispatcher = SparseDispatcher(self.num_experts, gates)
        expert_inputs = dispatcher.dispatch(x)
        gates = dispatcher.expert_to_gates()
        expert_outputs = [self.experts[i](expert_inputs[i]) for i in range(self.num_experts)]
        y = dispatcher.combine(expert_outputs)
        return y, loss


class RauMoEOutput(nn.Module):
    """Catalogue wrapper (not in the source): calls the source's ``MoE`` unchanged, keeps its
    ``(y, loss)`` tuple's loss as ``self.aux_loss`` and returns ``y`` (the catalogue compares one
    output tensor)."""

    def __init__(self, moe):
        super().__init__()
        self.moe = moe

    def forward(self, x):
        y, loss = self.moe(x)
        self.aux_loss = loss
        return y


def _trained(**kw):
    """``MoE(D, D, E, N, k=K)`` with gate and noise weights set as a trained checkpoint would set them
    (the constructor's zeros tie every gate, so the top-k would pick by index alone)."""
    m = MoE(D, D, E, N, k=K, **kw)
    with torch.no_grad():
        m.w_gate.normal_(0.0, D ** -0.5)
        m.w_noise.normal_(0.0, D ** -0.5)
    return RauMoEOutput(m)


_SRC = "davidmrau/mixture-of-experts moe.py SparseDispatcher + MLP + MoE @f662999"
_WHY = ("Pending by design: the expert MLP ends with nn.Softmax(1) over its output features after fc2, "
        "which the fused op (down(act(up(x))) per expert) cannot compute, and the source has no other expert")

ENTRIES = [
    Idiom("davidmrau_moe_eval", _SRC + ", eval mode (train=False: no noise, load = (gates > 0).sum(0))",
          seeded(170, lambda: _trained(noisy_gating=True).eval()), tokens(), expect="pending",
          fullgraph=False, other_gemms=1, faithful=True,
          note="the SparseDispatcher object: nonzero(gates).sort(0), split(1, dim=1), batch index, host part "
               "sizes (gates > 0).sum(0).tolist(), gather of the nonzero gates, inp[batch_index].squeeze(1) and "
               "torch.split, cat, mul by the gates, fp32 zeros(requires_grad=True).index_add; top k+1 of the "
               "softmax, renormalisation with +1e-6, zeros_like(requires_grad=True).scatter, cv_squared losses, "
               "the unused expert_to_gates split. " + _WHY),
    Idiom("davidmrau_moe_train", _SRC + ", training mode, noise scale kept with a zero Gaussian",
          seeded(171, lambda: _trained(noisy_gating=True)), tokens(),
          expect="pending", fullgraph=False, other_gemms=2, faithful=True,
          note="the noisy branch: x @ w_noise, softplus + noise_epsilon, the noisy logits, and the load from "
               "_prob_in_top_k (thresholds gathered from the flat top k+1 values, Normal(mean, std).cdf of "
               "both, torch.where), otherwise as the eval entry. " + _WHY),
]
