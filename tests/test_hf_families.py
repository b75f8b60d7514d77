"""MoE idioms of the transformers families, each with its default experts implementation and with
"batched_mm": every MoE block rewritten (counter and ``explain`` agree), logits and all parameter
gradients equal to eager. Then a hand-written GPT-OSS-style grouped_mm block: graph snapshot,
numerics, and near-misses that must be declined with their reason."""
import operator

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.testing import normalize_gm
from torch._dynamo.utils import counters

pytest.importorskip("transformers")
import hf_models  # noqa: E402
import moe_inductor  # noqa: E402
from moe_inductor.dynamo.dynamo_scope import mark_sonic
from moe_inductor.compile.backend import rewrite_moe  # noqa: E402
from moe_inductor.compile.options import SonicOptions  # noqa: E402
from test_hf_models import run_and_compare, sonic_without_codegen  # noqa: E402

# registers torch.ops.transformers.grouped_mm_fallback, the fp32 grouped GEMM of the HF code
import transformers.integrations.moe  # noqa: E402,F401


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def rewrite_only(model, *args):
    """Compile with a backend that runs only the sonic rewrite (no Inductor, fast): returns the
    output, the rewritten graphs and their reports."""
    graphs, reports = [], []

    def backend(gm, example_inputs):
        reports.append(rewrite_moe(gm, SonicOptions()))
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    out = torch.compile(model, backend=mark_sonic(backend))(*args)
    return out, graphs, reports


def fused_calls(graphs):
    ops = (torch.ops.moe_inductor.fused_moe.default, torch.ops.moe_inductor.fused_moe_experts.default)
    return [n for gm in graphs for n in gm.graph.nodes if n.target in ops]


# --------------------------------------------------------------------------- HF families

CASES = [
    ("mixtral", None),             # softmax -> top-k -> renormalise
    ("mixtral", "batched_mm"),
    ("qwen2_moe", None),           # softmax -> top-k, sigmoid-gated shared expert beside the routed ones
    ("qwen2_moe", "batched_mm"),
    ("qwen3_moe", None),           # softmax -> top-k, no renormalisation at default config
    ("qwen3_moe", "batched_mm"),
    ("olmoe", None),               # same idiom as qwen3_moe, other family
    ("olmoe", "batched_mm"),
    ("deepseek_v3", None),         # sigmoid scores, correction bias for the choice only, group-limited
    ("deepseek_v3", "batched_mm"),  # top-k, renormalise, routed scaling 2.5; shared experts beside
    # softmax, group-limited top-k, scaling; shared experts beside. Only batched_mm: its grouped_mm
    # experts graph is the same as deepseek_v3's (survey), and each case costs 10-50 s here
    ("deepseek_v2", "batched_mm"),
    ("gpt_oss", None),             # router bias, softmax over top-k logits; experts stored (E, d, 2n),
    ("gpt_oss", "batched_mm"),     # biases added in place, clamped gate on interleaved columns
    ("llama4", None),              # dense all-experts bmm (no transformers experts implementation)
]


def _id(case):
    family, impl = case
    return f"{family}-{impl or 'default'}"


@pytest.mark.parametrize("family,impl", CASES, ids=[_id(c) for c in CASES])
def test_family_rewritten_and_matches_eager(family, impl):
    model, ids = hf_models.build(family, experts_impl=impl)
    blocks = hf_models.moe_modules(model)
    if family == "deepseek_v3":
        # the router features this case is meant to exercise are on in the tiny config
        cfg = model.config
        assert cfg.routed_scaling_factor != 1.0 and cfg.norm_topk_prob and cfg.n_group > 1 and cfg.topk_group < cfg.n_group
    if family == "qwen2_moe":
        assert all(hasattr(m, "shared_expert_gate") for _, m in blocks)

    # every block rewritten, logits and every parameter gradient equal to eager; the batched_mm
    # cases skip Inductor's code generation (the default cases run the full backend)
    run_and_compare(model, ids, len(blocks), atol=1e-4, rtol=1e-4,
                    backend="sonic" if impl is None else sonic_without_codegen)

    # explain reports the same: one "rewritten" entry per MoE block, nothing declined or missed
    counters.clear()
    report = moe_inductor.explain(model, ids, inductor=False)
    assert [e.status for e in report.entries] == ["rewritten"] * len(blocks), str(report)
    assert counters["sonic"]["moe_rewrites"] == len(blocks) and not counters["sonic"]["moe_declined"]

    if family == "gpt_oss":
        # the fused op gets GPT-OSS's activation, interleaved gate/up and both biases
        _, graphs, _ = rewrite_only(model, ids)
        calls = fused_calls(graphs)
        assert len(calls) == len(blocks)
        experts = blocks[0][1].experts
        for n in calls:
            # fused_moe(x, token_ids, expert_ids, scores, w1, w2, b1, b2, *, activation, interleaved, ...)
            b1, b2 = n.args[6:8]
            activation, interleaved = n.kwargs["activation"], n.kwargs["interleaved"]
            assert b1 is not None and b2 is not None
            assert activation == f"gptoss:{float(experts.alpha)!r}:{float(experts.limit)!r}" and interleaved is True


# --------------------------------------------------------------------------- hand-written GPT-OSS block

class GptOssStyleMoE(nn.Module):
    """transformers 5.x GPT-OSS sparse block with its grouped_mm experts, written out (x: (T, d)):
    router linear with bias, top-k over logits, softmax of the top-k values; sort by expert,
    gather, grouped GEMM with the stored (E, d, 2n) weight as operand, ``out.add_(bias[ids_g])``,
    clamped gate on interleaved columns, grouped GEMM (E, n, d), bias add_, weight, unpermute, sum.

    ``variant`` makes one near-miss that must not be rewritten:
      "unsorted_bias_ids"  up-projection bias indexed by the unsorted expert ids
      "tensor_limit"       clamp limit is a tensor buffer
      "tensor_alpha"       gate scale alpha is a tensor buffer
      "asymmetric_up"      up clamped to [-limit / 2, limit]
      "read_before_bias"   the up-projection output is read before its bias is added
      "gate_written"       the gate columns (a view of h) are scaled in place before the clamp
    """

    def __init__(self, d=8, n=4, E=4, K=2, alpha=1.702, limit=7.0, variant=None):
        super().__init__()
        self.E, self.K, self.alpha, self.limit, self.variant = E, K, alpha, limit, variant
        self.router = nn.Linear(d, E)
        self.gate_up_proj = nn.Parameter(torch.randn(E, d, 2 * n))
        self.gate_up_proj_bias = nn.Parameter(torch.randn(E, 2 * n))
        self.down_proj = nn.Parameter(torch.randn(E, n, d) * 0.5)
        self.down_proj_bias = nn.Parameter(torch.randn(E, d))
        self.register_buffer("limit_t", torch.tensor(limit))
        self.register_buffer("alpha_t", torch.tensor(alpha))

    def forward(self, x):
        T, d = x.shape
        E, K = self.E, self.K
        top_value, top_index = torch.topk(self.router(x), K, dim=-1)
        scores = F.softmax(top_value, dim=1, dtype=top_value.dtype)
        sample_weights, expert_ids = scores.reshape(-1), top_index.reshape(-1)
        expert_ids_g, perm = torch.sort(expert_ids)
        x_g = x[perm // K]
        sample_weights_g = sample_weights[perm]
        offsets = torch.cumsum(torch.histc(expert_ids_g.float(), bins=E, min=0, max=E - 1), dim=0, dtype=torch.int32)
        grouped_mm = torch.ops.transformers.grouped_mm_fallback

        h = grouped_mm(x_g, self.gate_up_proj, offs=offsets)
        early = h.sum() if self.variant == "read_before_bias" else None
        h.add_(self.gate_up_proj_bias[expert_ids if self.variant == "unsorted_bias_ids" else expert_ids_g])
        gate, up = h[..., ::2], h[..., 1::2]
        if self.variant == "gate_written":
            gate.mul_(2.0)
        limit = self.limit_t if self.variant == "tensor_limit" else self.limit
        alpha = self.alpha_t if self.variant == "tensor_alpha" else self.alpha
        gate = gate.clamp(min=None, max=limit)
        up = up.clamp(min=-limit / 2 if self.variant == "asymmetric_up" else -limit, max=limit)
        glu = gate * torch.sigmoid(gate * alpha)
        a = (up + 1) * glu

        y = grouped_mm(a, self.down_proj, offs=offsets)
        y.add_(self.down_proj_bias[expert_ids_g])
        weighted = y * sample_weights_g.unsqueeze(-1)
        inv_perm = torch.empty_like(perm)
        inv_perm[perm] = torch.arange(perm.size(0), device=x.device)
        out = weighted[inv_perm].view(T, K, d).sum(dim=1)
        return out if early is None else out + early


def test_gptoss_style_block_snapshot():
    torch.manual_seed(0)
    _, graphs, reports = rewrite_only(GptOssStyleMoE(), torch.randn(4, 8))
    assert [c.status for r in reports for c in r.candidates] == ["rewritten"]
    code = normalize_gm(graphs[0].print_readable(print_output=False))
    from expecttest import assert_expected_inline

    assert_expected_inline(code, """\
class GraphModule(torch.nn.Module):
    def forward(self, L_x_: "f32[4, 8]", L_self_modules_router_parameters_weight_: "f32[4, 8]", L_self_modules_router_parameters_bias_: "f32[4]", L_self_parameters_gate_up_proj_: "f32[4, 8, 8]", L_self_parameters_gate_up_proj_bias_: "f32[4, 8]", L_self_parameters_down_proj_: "f32[4, 4, 8]", L_self_parameters_down_proj_bias_: "f32[4, 8]"):
        l_x_ = L_x_
        l_self_modules_router_parameters_weight_ = L_self_modules_router_parameters_weight_
        l_self_modules_router_parameters_bias_ = L_self_modules_router_parameters_bias_
        l_self_parameters_gate_up_proj_ = L_self_parameters_gate_up_proj_
        l_self_parameters_gate_up_proj_bias_ = L_self_parameters_gate_up_proj_bias_
        l_self_parameters_down_proj_ = L_self_parameters_down_proj_
        l_self_parameters_down_proj_bias_ = L_self_parameters_down_proj_bias_

        linear: "f32[4, 4]" = torch._C._nn.linear(l_x_, l_self_modules_router_parameters_weight_, l_self_modules_router_parameters_bias_);  l_self_modules_router_parameters_weight_ = l_self_modules_router_parameters_bias_ = None
        topk = torch.topk(linear, 2, dim = -1);  linear = None
        top_value: "f32[4, 2]" = topk[0]
        top_index: "i64[4, 2]" = topk[1];  topk = None

        scores: "f32[4, 2]" = torch.nn.functional.softmax(top_value, dim = 1, dtype = torch.float32);  top_value = None

        sample_weights: "f32[8]" = scores.reshape(-1);  scores = None
        expert_ids: "i64[8]" = top_index.reshape(-1);  top_index = None

        transpose: "f32[4, 8, 8]" = l_self_parameters_gate_up_proj_.transpose(-2, -1);  l_self_parameters_gate_up_proj_ = None
        transpose_1: "f32[4, 8, 4]" = l_self_parameters_down_proj_.transpose(-2, -1);  l_self_parameters_down_proj_ = None
        size = l_x_.size(0)
        arange_1: "i64[4]" = torch.arange(size, device = device(type='cpu'));  size = None
        repeat_interleave: "i64[8]" = arange_1.repeat_interleave(2);  arange_1 = None
        to: "i32[8]" = repeat_interleave.to(torch.int32);  repeat_interleave = None
        to_1: "i32[8]" = expert_ids.to(torch.int32);  expert_ids = None
        fused_moe_default = torch.ops.moe_inductor.fused_moe.default(l_x_, to, to_1, sample_weights, transpose, transpose_1, l_self_parameters_gate_up_proj_bias_, l_self_parameters_down_proj_bias_, activation = 'gptoss:1.702:7.0', interleaved = True, recompute_h = False, impl = 'auto', autocast_like = 'transformers::grouped_mm_fallback');  l_x_ = to = to_1 = sample_weights = transpose = transpose_1 = l_self_parameters_gate_up_proj_bias_ = l_self_parameters_down_proj_bias_ = None
        getitem_11: "f32[4, 8]" = fused_moe_default[0];  fused_moe_default = None
        return (getitem_11,)
""")


def test_gptoss_style_block_matches_eager():
    torch.manual_seed(0)
    model = GptOssStyleMoE(d=16, n=8, E=6, K=2, limit=1.5)  # small limit: both clamps active
    x = torch.randn(24, 16, requires_grad=True)
    params = list(model.parameters())
    ref = model(x)
    g = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, [x] + params, g)
    out = torch.compile(model, backend="sonic")(x)
    grads = torch.autograd.grad(out, [x] + params, g)
    assert counters["sonic"]["moe_rewrites"] == 1
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for name, a, b in zip(["x"] + [n for n, _ in model.named_parameters()], grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("variant,reason", [
    ("unsorted_bias_ids", "indexed by other ids than the expert ids of its rows"),  # bias of another row's expert
    ("tensor_limit", "clamp limit is a tensor, not a Python constant"),            # cannot go in the op's spec
    ("tensor_alpha", "gate scale alpha is a tensor, not a Python constant"),
    ("asymmetric_up", "not clamp(min=-7.0, max=7.0)"),                            # another formula
    ("read_before_bias", "read before its bias is added"),                        # sees h without bias
    ("gate_written", "is modified in place by"),                                  # h changed behind the pattern
])
def test_gptoss_style_near_misses_declined(variant, reason):
    torch.manual_seed(0)
    model = GptOssStyleMoE(variant=variant)
    x = torch.randn(4, 8)
    out, _, reports = rewrite_only(model, x)
    cands = [c for r in reports for c in r.candidates]
    assert [(c.idiom, c.status) for c in cands] == [("assignment_rows", "declined")], cands
    assert reason in cands[0].reason, cands[0].reason
    assert counters["sonic"]["moe_rewrites"] == 0
    torch.testing.assert_close(out, model(x))  # the declined graph is left as it was
