"""Idioms batched_mm (and more): matched blocks, declined look-alikes, numerics vs eager.

The rewrite runs in a light test backend (``rewrite_moe`` then the graph eagerly, no Inductor
code generation) so the CPU suite stays fast; the fused op runs its PyTorch path and its own
autograd, which is what these tests check against the model's eager code.
"""
import pytest
import torch
import torch.nn.functional as Fn
from torch._dynamo.testing import normalize_gm
from torch._dynamo.utils import counters
from torch.testing._internal.common_utils import TestCase

from moe_inductor.compile.backend import rewrite_moe
from moe_inductor.dynamo.dynamo_scope import mark_sonic
from moe_inductor.compile.options import SonicOptions

T, D, N, E, K = 6, 16, 8, 4, 2  # 6 tokens, hidden 16, expert width 8, 4 experts, top-2


@mark_sonic  # frames get sonic's scoped Dynamo settings
class RewriteOnly:
    """Backend: the sonic rewrite, then the graph as it is (keeps the last graph and report)."""

    def __init__(self):
        self.graphs, self.reports = [], []

    def __call__(self, gm, example_inputs):
        self.reports.append(rewrite_moe(gm, SonicOptions()))
        self.graphs.append(gm)
        return gm.forward

    @property
    def candidates(self):
        return [c for r in self.reports for c in r.candidates]


def compile_and_run(mod, *args):
    torch._dynamo.reset()
    counters.clear()
    be = RewriteOnly()
    out = torch.compile(mod, backend=be, fullgraph=True)(*args)
    return out, be


def check_grads(mod, args, atol=1e-4, rtol=1e-4):
    """Output and the gradients of every parameter and floating input match eager."""
    def run(fn):
        ins = [a.detach().clone().requires_grad_(a.is_floating_point()) for a in args]
        mod.zero_grad(set_to_none=True)
        out = fn(*ins)
        out.float().pow(2).sum().backward()
        return out.detach(), [p.grad.clone() for p in mod.parameters()], [a.grad for a in ins if a.is_floating_point()]

    ref = run(mod)
    torch._dynamo.reset()
    counters.clear()
    be = RewriteOnly()
    got = run(torch.compile(mod, backend=be, fullgraph=True))
    torch.testing.assert_close(got[0], ref[0], atol=atol, rtol=rtol)
    for g, r in zip(got[1] + got[2], ref[1] + ref[2]):
        torch.testing.assert_close(g, r, atol=atol, rtol=rtol)
    return be


# --------------------------------------------------------------------------- modules

class BatchedExperts(torch.nn.Module):
    """transformers' batched_mm experts code, with switches that break it in realistic ways."""

    def __init__(self, transposed=False, clamp_ids=False, other_down_ids=False, gate=True, tile_tokens=False):
        super().__init__()
        self.transposed, self.clamp_ids, self.other_down_ids, self.gate = transposed, clamp_ids, other_down_ids, gate
        self.tile_tokens = tile_tokens
        up = 2 * N if gate else N
        w1 = torch.randn(E, up, D) / D ** 0.5
        w2 = torch.randn(E, D, N) / N ** 0.5
        self.gate_up_proj = torch.nn.Parameter(w1.transpose(1, 2).contiguous() if transposed else w1)
        self.down_proj = torch.nn.Parameter(w2.transpose(1, 2).contiguous() if transposed else w2)

    def lin(self, x, w):
        if self.transposed:
            return torch.bmm(x.unsqueeze(1), w).squeeze(1)
        return torch.bmm(w, x.unsqueeze(-1)).squeeze(-1)

    def forward(self, hidden, top_k_index, top_k_weights):
        k = top_k_index.size(-1)
        if self.tile_tokens:  # k-major layout: assignment i is token i % T
            x = hidden.repeat(k, 1)
            top_k_index, top_k_weights = top_k_index.t(), top_k_weights.t()
        else:
            x = hidden.repeat_interleave(k, dim=0)
        s = top_k_weights.reshape(-1)
        ids = top_k_index.reshape(-1)
        if self.clamp_ids:
            ids = ids.clamp(0, E - 2)
        h = self.lin(x, self.gate_up_proj[ids])
        if self.gate:
            g, u = h.chunk(2, dim=-1)
            a = Fn.silu(g) * u
        else:
            a = Fn.gelu(h)
        down_ids = top_k_index.flip(-1).reshape(-1) if self.other_down_ids else ids
        y = self.lin(a, self.down_proj[down_ids])
        if self.tile_tokens:
            return (y * s.unsqueeze(-1)).view(k, hidden.size(0), hidden.size(1)).sum(dim=0)
        return (y * s.unsqueeze(-1)).view(hidden.size(0), k, hidden.size(1)).sum(dim=1)


class GptFastMoE(torch.nn.Module):
    """gpt-fast Mixtral MOEFeedForward + ConditionalFeedForward (einsum over gathered weights)."""

    def __init__(self, swap_combine=False):
        super().__init__()
        self.gate = torch.nn.Linear(D, E, bias=False)
        self.w1 = torch.nn.Parameter(torch.randn(E, N, D) / D ** 0.5)
        self.w2 = torch.nn.Parameter(torch.randn(E, D, N) / N ** 0.5)
        self.w3 = torch.nn.Parameter(torch.randn(E, N, D) / D ** 0.5)
        self.swap_combine = swap_combine

    def forward(self, x):
        scores = Fn.softmax(self.gate(x), dim=-1)
        expert_weights, expert_indices = torch.topk(scores, K, dim=-1)
        expert_weights = expert_weights / expert_weights.sum(dim=-1, keepdim=True)
        x1 = Fn.silu(torch.einsum("ti,taoi -> tao", x, self.w1[expert_indices]))
        x3 = torch.einsum("ti, taoi -> tao", x, self.w3[expert_indices])
        expert_outs = torch.einsum("tao, taio -> tai", (x1 * x3), self.w2[expert_indices])
        if self.swap_combine:  # sums over tokens instead of experts: not an MoE combine
            return torch.einsum("tai,ta -> ai", expert_outs, expert_weights)
        return torch.einsum("tai,ta -> ti", expert_outs, expert_weights)


def routing(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g)
    logits = torch.randn(T, E, generator=g)
    w, idx = torch.topk(logits.softmax(-1), K, dim=-1)
    return x, idx, w


# --------------------------------------------------------------------------- batched_mm

class TestBatchedMM(TestCase):
    def test_snapshot_transformers_form(self):
        torch.manual_seed(0)
        _, be = compile_and_run(BatchedExperts(), *routing())
        self.assertEqual(counters["sonic"]["moe_rewrites"], 1)
        self.assertExpectedInline(normalize_gm(be.graphs[0].print_readable(print_output=False)), """\
class GraphModule(torch.nn.Module):
    def forward(self, L_top_k_index_: "i64[6, 2]", L_hidden_: "f32[6, 16]", L_top_k_weights_: "f32[6, 2]", L_self_parameters_gate_up_proj_: "f32[4, 16, 16]", L_self_parameters_down_proj_: "f32[4, 16, 8]"):
        l_top_k_index_ = L_top_k_index_
        l_hidden_ = L_hidden_
        l_top_k_weights_ = L_top_k_weights_
        l_self_parameters_gate_up_proj_ = L_self_parameters_gate_up_proj_
        l_self_parameters_down_proj_ = L_self_parameters_down_proj_

        s: "f32[12]" = l_top_k_weights_.reshape(-1);  l_top_k_weights_ = None

        ids: "i64[12]" = l_top_k_index_.reshape(-1);  l_top_k_index_ = None

        size = l_hidden_.size(0)
        arange: "i64[6]" = torch.arange(size, device = device(type='cpu'));  size = None
        repeat_interleave_1: "i64[12]" = arange.repeat_interleave(2);  arange = None
        to: "i32[12]" = repeat_interleave_1.to(torch.int32);  repeat_interleave_1 = None
        to_1: "i32[12]" = ids.to(torch.int32);  ids = None
        fused_moe_default = torch.ops.moe_inductor.fused_moe.default(l_hidden_, to, to_1, s, l_self_parameters_gate_up_proj_, l_self_parameters_down_proj_, None, None, activation = 'swiglu', interleaved = False, recompute_h = False, impl = 'auto', autocast_like = 'aten::bmm');  l_hidden_ = to = to_1 = s = l_self_parameters_gate_up_proj_ = l_self_parameters_down_proj_ = None
        getitem_4: "f32[6, 16]" = fused_moe_default[0];  fused_moe_default = None
        return (getitem_4,)
""")

    def test_snapshot_gpt_fast_einsum(self):
        torch.manual_seed(0)
        _, be = compile_and_run(GptFastMoE(), routing()[0])
        self.assertEqual(counters["sonic"]["moe_rewrites"], 1)
        self.assertExpectedInline(normalize_gm(be.graphs[0].print_readable(print_output=False)), """\
class GraphModule(torch.nn.Module):
    def forward(self, L_self_modules_gate_parameters_weight_: "f32[4, 16]", L_x_: "f32[6, 16]", L_self_parameters_w1_: "f32[4, 8, 16]", L_self_parameters_w3_: "f32[4, 8, 16]", L_self_parameters_w2_: "f32[4, 16, 8]"):
        l_self_modules_gate_parameters_weight_ = L_self_modules_gate_parameters_weight_
        l_x_ = L_x_
        l_self_parameters_w1_ = L_self_parameters_w1_
        l_self_parameters_w3_ = L_self_parameters_w3_
        l_self_parameters_w2_ = L_self_parameters_w2_

        linear: "f32[6, 4]" = torch._C._nn.linear(l_x_, l_self_modules_gate_parameters_weight_, None);  l_self_modules_gate_parameters_weight_ = None
        scores: "f32[6, 4]" = torch.nn.functional.softmax(linear, dim = -1);  linear = None

        topk = torch.topk(scores, 2, dim = -1);  scores = None
        expert_weights: "f32[6, 2]" = topk[0]
        expert_indices: "i64[6, 2]" = topk[1];  topk = None

        sum_1: "f32[6, 1]" = expert_weights.sum(dim = -1, keepdim = True)
        expert_weights_1: "f32[6, 2]" = expert_weights / sum_1;  expert_weights = sum_1 = None

        getitem_5: "f32[8, 16]" = l_self_parameters_w1_[0]
        getitem_6: "f32[8, 16]" = l_self_parameters_w1_[1]
        getitem_7: "f32[8, 16]" = l_self_parameters_w1_[2]
        getitem_8: "f32[8, 16]" = l_self_parameters_w1_[3];  l_self_parameters_w1_ = None
        getitem_9: "f32[8, 16]" = l_self_parameters_w3_[0]
        getitem_10: "f32[8, 16]" = l_self_parameters_w3_[1]
        getitem_11: "f32[8, 16]" = l_self_parameters_w3_[2]
        getitem_12: "f32[8, 16]" = l_self_parameters_w3_[3];  l_self_parameters_w3_ = None
        getitem_13: "f32[16, 8]" = l_self_parameters_w2_[0]
        getitem_14: "f32[16, 8]" = l_self_parameters_w2_[1]
        getitem_15: "f32[16, 8]" = l_self_parameters_w2_[2]
        getitem_16: "f32[16, 8]" = l_self_parameters_w2_[3];  l_self_parameters_w2_ = None
        size = l_x_.size(0)
        arange: "i64[6]" = torch.arange(size, device = device(type='cpu'));  size = None
        repeat_interleave: "i64[12]" = arange.repeat_interleave(2);  arange = None
        reshape: "i64[12]" = expert_indices.reshape(-1);  expert_indices = None
        reshape_1: "f32[12]" = expert_weights_1.reshape(-1);  expert_weights_1 = None
        to: "i32[12]" = repeat_interleave.to(torch.int32);  repeat_interleave = None
        to_1: "i32[12]" = reshape.to(torch.int32);  reshape = None
        fused_moe_experts_default = torch.ops.moe_inductor.fused_moe_experts.default(l_x_, to, to_1, reshape_1, [getitem_5, getitem_6, getitem_7, getitem_8], [getitem_13, getitem_14, getitem_15, getitem_16], [getitem_9, getitem_10, getitem_11, getitem_12], [], [], [], activation = 'swiglu', interleaved = False, recompute_h = False, impl = 'auto', autocast_like = 'aten::bmm');  l_x_ = to = to_1 = reshape_1 = getitem_5 = getitem_6 = getitem_7 = getitem_8 = getitem_13 = getitem_14 = getitem_15 = getitem_16 = getitem_9 = getitem_10 = getitem_11 = getitem_12 = None
        getitem_17: "f32[6, 16]" = fused_moe_experts_default[0];  fused_moe_experts_default = None
        return (getitem_17,)
""")


@pytest.mark.parametrize("kwargs", [
    dict(),                  # transformers default layout (E, 2n, d), silu-gated
    dict(transposed=True),   # is_transposed storage (E, d, 2n): bmm(x.unsqueeze(1), W[ids])
    dict(gate=False),        # has_gate=False: plain gelu MLP, up_proj (E, n, d)
    dict(clamp_ids=True),    # expert-parallel clamp of the ids: the op gets the clamped ids, as the GEMMs do
])
def test_batched_mm_numerics(kwargs):
    torch.manual_seed(0)
    be = check_grads(BatchedExperts(**kwargs), routing())
    assert [c.status for c in be.candidates] == ["rewritten"]
    assert be.candidates[0].idiom == "gathered_weights" and be.candidates[0].num_experts == E


def test_gpt_fast_numerics():
    torch.manual_seed(0)
    be = check_grads(GptFastMoE(), (routing()[0],))
    assert [(c.idiom, c.status, c.top_k, c.intermediate) for c in be.candidates] == [("gathered_weights", "rewritten", K, N)]


def test_batched_mm_different_ids_declined():
    # the two GEMMs pick different experts per assignment: no single (token, expert) routing
    torch.manual_seed(0)
    be = check_grads(BatchedExperts(other_down_ids=True), routing())
    assert counters["sonic"]["moe_rewrites"] == 0
    assert [c.status for c in be.candidates] == ["declined"]
    assert "group their rows differently" in be.candidates[0].reason


def test_batched_mm_k_major_layout_not_matched():
    # tokens tiled (repeat) instead of interleaved and summed over dim 0: correct MoE, other layout;
    # the idiom must not read it as token i // K
    torch.manual_seed(0)
    be = check_grads(BatchedExperts(tile_tokens=True), routing())
    assert counters["sonic"]["moe_rewrites"] == 0 and be.candidates == []


def test_gpt_fast_lookalike_not_rewritten():
    torch.manual_seed(0)
    mod = GptFastMoE(swap_combine=True)
    x = routing()[0]
    ref = mod(x)
    out, be = compile_and_run(mod, x)
    torch.testing.assert_close(out, ref)
    assert counters["sonic"]["moe_rewrites"] == 0 and be.candidates == []


# --------------------------------------------------------------------------- transformers families

@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_hf_batched_mm_logits_and_grads(family):
    pytest.importorskip("transformers")
    import hf_models

    model, ids = hf_models.build(family, experts_impl="batched_mm")
    model.train()  # dropout is 0 in these configs; train mode keeps autograd paths realistic

    class Logits(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids):
            return self.m(input_ids).logits

    be = check_grads(Logits(model), (ids,))
    assert [(c.idiom, c.status) for c in be.candidates] == [("gathered_weights", "rewritten")] * 2


# --------------------------------------------------------------------------- dense dispatch (Llama4, expert_slots)

class DenseMoE(torch.nn.Module):
    """Llama4TextMoe's routed part: every expert on every token, inputs pre-scaled by scores."""

    def __init__(self, fill=float("-inf"), dense_scores=False):
        super().__init__()
        self.router = torch.nn.Linear(D, E, bias=False)
        self.gate_up_proj = torch.nn.Parameter(torch.randn(E, D, 2 * N) / D ** 0.5)
        self.down_proj = torch.nn.Parameter(torch.randn(E, N, D) / N ** 0.5)
        self.fill, self.dense_scores = fill, dense_scores

    def forward(self, x):
        logits = self.router(x)
        if self.dense_scores:  # every expert weighted: not a top-k MoE
            scores = torch.sigmoid(logits)
        else:
            v, idx = torch.topk(logits, K, dim=1)
            scores = torch.sigmoid(torch.full_like(logits, self.fill).scatter_(1, idx, v).float()).to(x.dtype)
        xin = x.repeat(scores.shape[1], 1) * scores.transpose(0, 1).reshape(-1, 1)
        h = torch.bmm(xin.view(E, -1, D), self.gate_up_proj)
        gate, up = h.chunk(2, dim=-1)
        y = torch.bmm(up * Fn.silu(gate), self.down_proj).view(-1, D)
        return y.reshape(E, -1, D).sum(dim=0)


def test_dense_experts_numerics():
    torch.manual_seed(0)
    be = check_grads(DenseMoE(), (routing()[0],))
    assert [(c.idiom, c.status, c.top_k) for c in be.candidates] == [("expert_slots", "rewritten", K)]
    assert "dispatch=dense_scores" in be.candidates[0].parts and "combine=expert_sum" in be.candidates[0].parts
    # the rewritten graph runs K of the E experts per token: no (E*T, d) bmm is left
    assert not any(n.target is torch.bmm for n in be.graphs[0].graph.nodes)


@pytest.mark.parametrize("kwargs, reason", [
    (dict(fill=0.0), "sigmoid(0.0), not exactly 0"),    # unselected experts get weight 0.5
    (dict(dense_scores=True), "not a scatter"),          # no top-k at all
])
def test_dense_experts_lookalikes_declined(kwargs, reason):
    torch.manual_seed(0)
    be = check_grads(DenseMoE(**kwargs), (routing()[0],))
    assert counters["sonic"]["moe_rewrites"] == 0
    assert [c.status for c in be.candidates] == ["declined"] and reason in be.candidates[0].reason


def test_hf_llama4_logits_and_grads():
    pytest.importorskip("transformers")
    import hf_models

    model, ids = hf_models.build("llama4")

    class Logits(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids):
            return self.m(input_ids).logits

    be = check_grads(Logits(model), (ids,))
    assert [(c.idiom, c.status) for c in be.candidates] == [("expert_slots", "rewritten")] * 2


# --------------------------------------------------------------------------- GPT-OSS's gate in expert loops

@pytest.mark.parametrize("block", ["loop_top2", "mask_top1"])
@pytest.mark.parametrize("layout", ["interleaved", "concat"])
def test_clamped_gate_layouts_in_expert_loops(block, layout):
    """Experts with GPT-OSS's clamped gate over a fused, biased gate_up Linear, in the per-expert loop
    (top-2, index_add_) and the top-1 mask-assignment loop: rewritten with the layout the expert
    reads (interleaved columns or halves), output and every gradient equal to eager. The clamp limit
    is small so that both clamps are hit."""
    import functools
    from moe_modules import InterleavedGateMLP, LoopMoE, MaskDispatchMoE
    torch.manual_seed(0)
    expert = functools.partial(InterleavedGateMLP, layout=layout)
    mod = LoopMoE(d=16, n=8, E=4, K=2, mask="eq", expert=expert) if block == "loop_top2" else \
        MaskDispatchMoE(d=16, n=8, E=4, expert=expert)
    x = torch.randn(2, 5, 16) if block == "loop_top2" else torch.randn(10, 16)
    be = check_grads(mod, (x,))
    assert counters["sonic"]["moe_rewrites"] == 1, be.reports
    calls = [n for gm in be.graphs for n in gm.graph.nodes
             if n.target in (torch.ops.moe_inductor.fused_moe_experts.default, torch.ops.moe_inductor.fused_moe.default)]
    assert len(calls) == 1
    assert calls[0].kwargs.get("interleaved", False) is (layout == "interleaved")
    assert calls[0].kwargs["activation"] == "gptoss:1.702:0.5"


# --------------------------------------------------------------------------- constant scale of expert outputs

class ScaledOutputLoop(torch.nn.Module):
    """Top-2 loop whose expert outputs are scaled in place (NLLB-MoE eval: ``y *= 1 - p``).
    variant: "const" (rewritten: the constant goes into the routing weights), "per_expert" (each
    expert its own constant), "tensor" (a tensor buffer, not a constant), "read" (y is read before
    it is scaled), "alias" (the scaled tensor is a same-dtype ``.to()`` of y, which is also read)."""

    def __init__(self, variant="const", d=16, n=8, E=4, K=2):
        super().__init__()
        from moe_modules import GatedMLP
        self.router = torch.nn.Linear(d, E, bias=False)
        self.experts = torch.nn.ModuleList([GatedMLP(d, n) for _ in range(E)])
        self.variant, self.E, self.K = variant, E, K
        self.register_buffer("c", torch.tensor(0.8))

    def forward(self, x):
        w, sel = torch.topk(Fn.softmax(self.router(x), -1), self.K, dim=-1)
        out, aux = torch.zeros_like(x), x.new_zeros(())
        for e in range(self.E):
            tok, k = torch.where(sel == e)
            y = self.experts[e](x[tok]) * w[tok, k, None]
            if self.variant == "read":
                aux = aux + y.sum()
            if self.variant == "alias":  # a same-dtype .to() is y itself: the scale would reach aux too
                z = y.to(y.dtype)
                z *= 0.8
                aux = aux + y.sum()
                out.index_add_(0, tok, z)
                continue
            if self.variant == "tensor":
                y *= self.c
            else:
                y *= 0.5 + 0.1 * e if self.variant == "per_expert" else 0.8
            out.index_add_(0, tok, y)
        return out + aux


@pytest.mark.parametrize("variant,reason", [
    ("const", None),
    ("per_expert", "scale their outputs by different constants"),
    ("tensor", "expert MLP not recognised"),  # y * buffer: not a constant
    ("read", None),  # y read before the scale: the normal form makes the scale functional, so the
                     # read sees the unscaled y and the fused op the scaled one (exact, rewritten)
    ("alias", "in place"),
])
def test_constant_output_scale(variant, reason):
    torch.manual_seed(0)
    mod = ScaledOutputLoop(variant)
    be = check_grads(mod, (torch.randn(10, 16),))
    if reason is None:
        assert counters["sonic"]["moe_rewrites"] == 1 and "outputs scaled by 0.8" in be.candidates[0].parts
    else:
        assert counters["sonic"]["moe_rewrites"] == 0
        assert [c.status for c in be.candidates] == ["declined"] and reason in be.candidates[0].reason, \
            [(c.status, c.reason) for c in be.candidates]
