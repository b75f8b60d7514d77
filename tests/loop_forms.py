"""Tiny MoE blocks whose per-expert loop graph-breaks in Dynamo, one per way of skipping the experts
that received no token, each written from a reading of the public code named in its docstring
(same structure of ops, not a copy). Shared by tests/test_loop_capture.py.

Shapes: x (B, S, d) -> (B, S, d); T = B*S tokens, E experts, K picks per token.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x), bias-free (the Mixtral / DeepSeek / mistral-inference expert)."""

    def __init__(self, d, n):
        super().__init__()
        self.w1 = nn.Linear(d, n, bias=False)
        self.w2 = nn.Linear(n, d, bias=False)
        self.w3 = nn.Linear(d, n, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class _Routed(nn.Module):
    """Softmax top-k router shared by the blocks below: weights (T, K), ids (T, K)."""

    def __init__(self, d=32, n=16, E=6, K=2):
        super().__init__()
        self.num_experts, self.top_k = E, K
        self.gate = nn.Linear(d, E, bias=False)
        self.experts = nn.ModuleList(SwiGLU(d, n) for _ in range(E))

    def route(self, x):
        probs = F.softmax(self.gate(x), dim=-1, dtype=torch.float)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)
        return weights, ids


class HitLoopMoE(_Routed):
    """transformers 5.x "eager" experts / DBRX / NLLB-MoE: a one-hot mask (E, K, T), the experts with
    tokens from ``(mask.sum(dim=(-1, -2)) > 0).nonzero()``, ``index_add_`` combine."""

    def forward(self, x):
        shape = x.shape
        h = x.reshape(-1, shape[-1])
        weights, ids = self.route(h)
        out = torch.zeros_like(h)
        mask = F.one_hot(ids, num_classes=self.num_experts).permute(2, 1, 0)
        hit = (mask.sum(dim=(-1, -2)) > 0).nonzero()
        for e in hit:
            e = e[0]
            slot, tok = torch.where(mask[e])
            y = self.experts[e](h[tok]) * weights[tok, slot, None]
            out.index_add_(0, tok, y.to(out.dtype))
        return out.view(shape)


class HitLoopPaddedMoE(_Routed):
    """Step3p7 / transformers 5.x Mixtral "eager": one_hot over E + 1 classes, ``torch.greater``,
    a skip of the padding expert ``if e == self.num_experts: continue``, stacked expert weights
    (E, 2n, d) and (E, d, n) indexed per expert."""

    def __init__(self, d=32, n=16, E=6, K=2):
        super().__init__(d, n, E, K)
        del self.experts
        self.gate_up = nn.Parameter(torch.randn(E, 2 * n, d) * d ** -0.5)
        self.down = nn.Parameter(torch.randn(E, d, n) * n ** -0.5)

    def forward(self, x):
        shape = x.shape
        h = x.reshape(-1, shape[-1])
        weights, ids = self.route(h)
        out = torch.zeros_like(h)
        with torch.no_grad():
            mask = F.one_hot(ids, num_classes=self.num_experts + 1).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for e in hit:
            e = e[0]
            if e == self.num_experts:
                continue
            slot, tok = torch.where(mask[e])
            gate, up = F.linear(h[tok], self.gate_up[e]).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, self.down[e]) * weights[tok, slot, None]
            out.index_add_(0, tok, y.to(out.dtype))
        return out.view(shape)


class HitLoopScalarMoE(HitLoopPaddedMoE):
    """Nemotron-H's own experts: one_hot over E + 1 classes with no explicit skip of the padding
    expert, 0-d hit rows (``nonzero().squeeze(-1)``) made ints by ``e = e.item()`` (the same name),
    an ``if tok.numel() == 0: continue`` skip, stacked expert weights."""

    def forward(self, x):
        rows = x.reshape(-1, x.shape[-1])
        weights, ids = self.route(rows)
        out = torch.zeros_like(rows)
        with torch.no_grad():  # the mask is proven >= 0 (one_hot), so the static check is on shapes only
            mask = F.one_hot(ids, num_classes=self.num_experts + 1).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero().squeeze(-1)
        for e in hit:
            e = e.item()
            slot, tok = torch.where(mask[e])
            if tok.numel() == 0:
                continue
            gate, up = F.linear(rows[tok], self.gate_up[e]).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, self.down[e]) * weights[tok, slot, None]
            out.index_add_(0, tok, y.to(out.dtype))
        return out.view(x.shape)


class BincountSkipMoE(_Routed):
    """DeepSeek-V3 official inference MoE: host counts ``bincount(ids.flatten()).tolist()``, skip on
    ``counts[i] == 0``, ``y[idx] += expert(x[idx]) * w[idx, top, None]`` (an indexed ``+=``)."""

    def forward(self, x):
        shape = x.shape
        h = x.view(-1, shape[-1])
        weights, ids = self.route(h)
        y = torch.zeros_like(h)
        counts = torch.bincount(ids.flatten(), minlength=self.num_experts).tolist()
        for i in range(self.num_experts):
            if counts[i] == 0:
                continue
            expert = self.experts[i]
            idx, top = torch.where(ids == i)
            y[idx] += expert(h[idx]) * weights[idx, top, None]
        return y.view(shape)


class ShapeSkipMoE(_Routed):
    """transformers 4.36 Mixtral: ``torch.where`` of the one-hot mask, ``if top_x.shape[0] == 0:
    continue``, the indices read as host lists (``tolist()``) and used to index."""

    def forward(self, x):
        shape = x.shape
        h = x.view(-1, shape[-1])
        weights, ids = self.route(h)
        out = torch.zeros_like(h)
        mask = F.one_hot(ids, num_classes=self.num_experts).permute(2, 1, 0)
        for e in range(self.num_experts):
            layer = self.experts[e]
            slot, top_x = torch.where(mask[e])
            if top_x.shape[0] == 0:
                continue
            top_x_list = top_x.tolist()
            slot_list = slot.tolist()
            state = h[None, top_x_list].reshape(-1, shape[-1])
            y = layer(state) * weights[top_x_list, slot_list, None]
            out.index_add_(0, top_x, y.to(h.dtype))
        return out.view(shape)


class MaskAnyMoE(_Routed):
    """makeMoE / nanoGPT MoE copies: a dense (T, E) gating table (softmax over the top-k logits),
    ``(ids == i).any(dim=-1)`` token masks, ``if flat_mask.any():`` around the expert's work and a
    masked ``+=`` combine."""

    def forward(self, x):
        logits = self.gate(x)
        top_logits, ids = logits.topk(self.top_k, dim=-1)
        sparse = torch.full_like(logits, float("-inf")).scatter(-1, ids, top_logits)
        gating = F.softmax(sparse, dim=-1)
        final = torch.zeros_like(x)
        flat_x = x.view(-1, x.size(-1))
        flat_gating = gating.view(-1, gating.size(-1))
        for i, expert in enumerate(self.experts):
            expert_mask = (ids == i).any(dim=-1)
            flat_mask = expert_mask.view(-1)
            if flat_mask.any():
                expert_out = expert(flat_x[flat_mask])
                scores = flat_gating[flat_mask, i].unsqueeze(1)
                final[expert_mask] += expert_out * scores
        return final


class NotAnyContinueMoE(_Routed):
    """The same masks with ``if not mask.any(): continue`` and ``index_put_(..., accumulate=True)``."""

    def forward(self, x):
        shape = x.shape
        h = x.view(-1, shape[-1])
        weights, ids = self.route(h)
        out = torch.zeros_like(h)
        for i in range(self.num_experts):
            mask = ids == i
            if not mask.any():
                continue
            tok, slot = mask.nonzero(as_tuple=True)
            y = self.experts[i](h[tok]) * weights[tok, slot].unsqueeze(-1)
            out.index_put_((tok,), y, accumulate=True)
        return out.view(shape)


class NumelSkipMoE(_Routed):
    """vLLM's torch reference MoE: flat (T*K,) ids, ``mask = ids == i``, ``if mask.sum():`` around a
    masked assignment into a (T*K, d) buffer, then a weighted sum over the K picks; here also an
    ``if idx.numel() == 0: continue`` spelling of the same skip."""

    def forward(self, x):
        shape = x.shape
        h = x.view(-1, shape[-1])
        weights, ids = self.route(h)
        T = h.shape[0]
        flat_ids = ids.view(-1)
        picked = h.repeat_interleave(self.top_k, dim=0)
        buf = torch.zeros(T * self.top_k, shape[-1], dtype=h.dtype)
        for i in range(self.num_experts):
            idx = torch.nonzero(flat_ids == i).squeeze(-1)
            if idx.numel() == 0:
                continue
            mask = flat_ids == i
            if mask.sum():
                buf[mask] = self.experts[i](picked[mask])
        return (buf.view(T, self.top_k, -1) * weights.unsqueeze(-1)).sum(dim=1).view(shape)


class ScatterAddHitMoE(_Routed):
    """A hit loop over ``nonzero().squeeze(-1).tolist()`` (host ints) with a ``scatter_add_``
    combine through an expanded index."""

    def forward(self, x):
        shape = x.shape
        h = x.view(-1, shape[-1])
        weights, ids = self.route(h)
        out = torch.zeros_like(h)
        mask = F.one_hot(ids, self.num_experts).permute(2, 1, 0)
        for e in mask.sum(dim=(1, 2)).gt(0).nonzero().squeeze(-1).tolist():
            slot, tok = torch.where(mask[e])
            y = self.experts[e](h[tok]) * weights[tok, slot, None]
            out.scatter_add_(0, tok.unsqueeze(-1).expand(-1, shape[-1]), y)
        return out.view(shape)


# ---------------------------------------------------------------------- near misses (kept as they are)

class AppendsToListMoE(HitLoopMoE):
    """A hit loop whose body also records which experts ran (a list append: a side effect that
    differs when every expert runs)."""

    def forward(self, x):
        h = x.reshape(-1, x.shape[-1])
        weights, ids = self.route(h)
        out = torch.zeros_like(h)
        mask = F.one_hot(ids, num_classes=self.num_experts).permute(2, 1, 0)
        hit = (mask.sum(dim=(-1, -2)) > 0).nonzero()
        ran = []
        for e in hit:
            e = e[0]
            ran.append(e)
            slot, tok = torch.where(mask[e])
            out.index_add_(0, tok, self.experts[e](h[tok]) * weights[tok, slot, None])
        self.ran = len(ran)
        return out.view(x.shape)


class ItemInBodyMoE(BincountSkipMoE):
    """The counts skip with a host read in the body (``.item()`` of the tokens' count)."""

    def forward(self, x):
        h = x.view(-1, x.shape[-1])
        weights, ids = self.route(h)
        y = torch.zeros_like(h)
        counts = torch.bincount(ids.flatten(), minlength=self.num_experts).tolist()
        for i in range(self.num_experts):
            if counts[i] == 0:
                continue
            idx, top = torch.where(ids == i)
            n = idx.numel()
            scale = (weights[idx, top].sum() / n).item()
            y[idx] += self.experts[i](h[idx]) * weights[idx, top, None] * scale
        return y.view(x.shape)


class UnrelatedSkipMoE(BincountSkipMoE):
    """Skips on counts of a different table than the one the body selects with: skipping an expert
    with no count does not prove its selection empty, so running it could add rows."""

    def forward(self, x):
        h = x.view(-1, x.shape[-1])
        weights, ids = self.route(h)
        y = torch.zeros_like(h)
        first = ids[:, :1]
        counts = torch.bincount(first.flatten(), minlength=self.num_experts).tolist()
        for i in range(self.num_experts):
            if counts[i] == 0:
                continue
            idx, top = torch.where(ids == i)
            y[idx] += self.experts[i](h[idx]) * weights[idx, top, None]
        return y.view(x.shape)


class SortedSplitMoE(_Routed):
    """DeepSeek-MoE / DeepSeek-V2 ``moe_infer``: tokens sorted by expert, per-expert counts read on
    the host (``.cpu().numpy()``), a running ``start_idx`` slicing the sorted rows, outputs appended
    to a list and concatenated, then unsorted and weighted. Out of the loop capture's reach (the
    slice bounds carry from one expert to the next): kept, with the reason."""

    def forward(self, x):
        shape = x.shape
        h = x.view(-1, shape[-1])
        weights, ids = self.route(h)
        cnts = ids.new_zeros((ids.shape[0], self.num_experts))
        cnts.scatter_(1, ids, 1)
        tokens_per_expert = cnts.sum(dim=0).cpu().numpy()
        order = ids.view(-1).argsort()
        sorted_tokens = h[order // ids.shape[1]]
        outputs, start_idx = [], 0
        for i, num_tokens in enumerate(tokens_per_expert):
            end_idx = start_idx + num_tokens
            if num_tokens == 0:
                continue
            outputs.append(self.experts[i](sorted_tokens[start_idx:end_idx]))
            start_idx = end_idx
        outs = torch.cat(outputs, dim=0)
        unsorted = torch.empty_like(outs)
        unsorted[order] = outs
        y = (unsorted.view(*ids.shape, -1) * weights.unsqueeze(-1)).sum(dim=1)
        return y.view(shape)


class InPlaceOnViewMoE(HitLoopMoE):
    """A hit loop that also updates, in place, a view of a tensor defined outside the loop: every
    extra expert would apply it once more."""

    def forward(self, x):
        h = x.reshape(-1, x.shape[-1])
        weights, ids = self.route(h)
        out = torch.zeros_like(h)
        seen = torch.zeros(h.shape[0], 1)
        mask = F.one_hot(ids, num_classes=self.num_experts).permute(2, 1, 0)
        hit = (mask.sum(dim=(-1, -2)) > 0).nonzero()
        for e in hit:
            e = e[0]
            slot, tok = torch.where(mask[e])
            out.index_add_(0, tok, self.experts[e](h[tok]) * weights[tok, slot, None])
            count = seen.view(-1)
            count += 1.0
        return out.view(x.shape) + seen.sum() * 0


class StackedExperts(nn.Module):
    """One projection of every expert, weights stacked (E, out, in); the rows come grouped by expert
    and are split by host sizes (ScatterMoE / JetMoE ``ParallelExperts``)."""

    def __init__(self, E, d_in, d_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(E, d_out, d_in) / d_in ** 0.5)

    def forward(self, rows, sizes):
        chunks = torch.split(rows, sizes, dim=0)
        return torch.cat([F.linear(chunks[e], self.weight[e]) for e in range(self.weight.shape[0])], dim=0)


class HostCountsSplitMoE(nn.Module):
    """Rows sorted by expert, split by a host copy of the per-expert counts (``counts.tolist()``),
    one GEMM per chunk, concatenated; the counts come from a 0/1 (T, E) table of the top-k picks.
    Dynamo breaks the graph at ``.tolist()``; in sonic frames it is traced as symbolic sizes and
    ``moe_inductor.dynamo.host_splits`` makes the chunks' GEMMs one grouped GEMM on device offsets."""

    def __init__(self, d=32, n=16, E=6, K=2):
        super().__init__()
        self.num_experts, self.top_k = E, K
        self.gate = nn.Linear(d, E, bias=False)
        self.up = StackedExperts(E, d, 2 * n)
        self.down = StackedExperts(E, n, d)

    def counts(self, ids, T):
        picked = torch.zeros(T, self.num_experts, device=ids.device).scatter(1, ids, 1)
        return picked.long().sum(0)

    def forward(self, x):
        h = x.reshape(-1, x.shape[-1])
        probs = F.softmax(self.gate(h), dim=-1, dtype=torch.float)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        sizes = self.counts(ids, h.shape[0]).tolist()
        order = ids.flatten().argsort(stable=True)
        token = order // self.top_k
        g, u = self.up(h[token], sizes).chunk(2, dim=-1)
        y = self.down(F.silu(g) * u, sizes) * weights.flatten()[order][:, None].to(x.dtype)
        return torch.zeros_like(h).index_add(0, token, y).view(x.shape)


class HostCountsUnsortedRowsMoE(HostCountsSplitMoE):
    """Near miss: the rows split by the counts are the tokens repeated K times, not sorted by
    expert. The split itself becomes a grouped GEMM (the same values: it follows the offsets as the
    split did), but the block is not the MoE the router describes: declined."""

    def forward(self, x):
        h = x.reshape(-1, x.shape[-1])
        probs = F.softmax(self.gate(h), dim=-1, dtype=torch.float)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        sizes = self.counts(ids, h.shape[0]).tolist()
        token = torch.arange(h.shape[0], device=x.device).repeat_interleave(self.top_k)
        g, u = self.up(h[token], sizes).chunk(2, dim=-1)
        y = self.down(F.silu(g) * u, sizes) * weights.flatten()[:, None].to(x.dtype)
        return torch.zeros_like(h).index_add(0, token, y).view(x.shape)


class HostCountsAlsoReadMoE(HostCountsSplitMoE):
    """Near miss: the host sizes are also used for something else (a load statistic in the
    output): the splits still become grouped GEMMs, the host copy stays, said in the log."""

    def forward(self, x):
        h = x.reshape(-1, x.shape[-1])
        probs = F.softmax(self.gate(h), dim=-1, dtype=torch.float)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        sizes = self.counts(ids, h.shape[0]).tolist()
        load = torch.tensor(sizes, dtype=x.dtype)  # a load statistic from the same host copy
        order = ids.flatten().argsort(stable=True)
        token = order // self.top_k
        g, u = self.up(h[token], sizes).chunk(2, dim=-1)
        y = self.down(F.silu(g) * u, sizes) * weights.flatten()[order][:, None].to(x.dtype)
        return torch.zeros_like(h).index_add(0, token, y).view(x.shape) + 0.0 * load.max()


class HostCountsBiasedChunkMoE(HostCountsSplitMoE):
    """Near miss: expert 0's chunk goes through a GEMM with a bias: not one grouped GEMM, so the
    split stays as Dynamo traced it (symbolic sizes, one graph) and the log says why."""

    def forward(self, x):
        h = x.reshape(-1, x.shape[-1])
        probs = F.softmax(self.gate(h), dim=-1, dtype=torch.float)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        sizes = self.counts(ids, h.shape[0]).tolist()
        order = ids.flatten().argsort(stable=True)
        token = order // self.top_k
        chunks = h[token].split(sizes, dim=0)
        W = self.up.weight
        outs = [F.linear(chunks[0], W[0], torch.ones(W.shape[1], dtype=x.dtype))]
        outs += [F.linear(chunks[e], W[e]) for e in range(1, self.num_experts)]
        g, u = torch.cat(outs, dim=0).chunk(2, dim=-1)
        y = self.down(F.silu(g) * u, sizes) * weights.flatten()[order][:, None].to(x.dtype)
        return torch.zeros_like(h).index_add(0, token, y).view(x.shape)
