"""The sonic backend on hand-written MoE code: options, rewrite counts, graph snapshots, look-alikes
that must not be rewritten, routing edge cases and dynamic shapes."""
import functools

import pytest
import torch
import torch.nn.functional as F
from expecttest import assert_expected_inline
from torch._dynamo.testing import normalize_gm
from torch._dynamo.utils import counters

from moe_inductor.compile.backend import rewrite_moe
from moe_inductor.compile.options import SonicOptions
from moe_modules import DenseMLPBlock, GatedMLP, LoopMoE, PlainMLP, SharedWeightLoop


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def check_against_eager(model, x, rewrites, atol=1e-5, **compile_kw):
    torch.manual_seed(0)
    x = x.clone().requires_grad_()
    params = [p for p in model.parameters()]
    ref = model(x)
    g = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, [x] + params, g)
    out = torch.compile(model, backend="sonic", **compile_kw)(x)
    grads = torch.autograd.grad(out, [x] + params, g)
    assert counters["sonic"]["moe_rewrites"] == rewrites
    torch.testing.assert_close(out, ref, atol=atol, rtol=atol)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=atol, rtol=atol)


def test_unknown_option_is_a_clear_error():
    m = LoopMoE()
    # Dynamo wraps backend errors in BackendCompilerFailed; the message is ours
    with pytest.raises(Exception, match=r"unknown option\(s\) 'tile'.*valid options: rewrite, recompute_h"):
        torch.compile(m, backend="sonic", options={"tile": 3})(torch.randn(1, 4, 32))


@pytest.mark.parametrize("options,err", [
    ({"impl": "cuda"}, "impl='cuda' is invalid; valid: auto, torch, triton"),
    ({"token_rounding": "sideways"}, "token_rounding='sideways' is invalid"),
    ({"tile_m": 0}, "tile_m=0 is invalid"),
    ({"recompute_h": "yes"}, "recompute_h='yes' is invalid"),
])
def test_bad_option_values(options, err):
    with pytest.raises(ValueError, match=err):
        SonicOptions.from_dict(options)


@pytest.mark.parametrize("kw", [
    dict(mask="onehot_210"),                 # transformers 4.x Mixtral
    dict(mask="onehot_201"),                 # where() yields (token, k)
    dict(mask="eq"),                         # torch.where(top_k_index == e), ModuleList enumerate
    dict(mask="eq", act=F.gelu),             # GeGLU experts
    dict(mask="eq", expert=PlainMLP),        # non-gated GELU experts
    dict(E=7, K=3, mask="onehot_210"),       # prime E
])
def test_expert_loop_rewritten_and_matches(kw):
    torch.manual_seed(0)
    check_against_eager(LoopMoE(**kw), torch.randn(2, 8, 32), rewrites=1)


def test_loop_captured_without_fullgraph_and_with_recompute_h():
    torch.manual_seed(0)
    check_against_eager(LoopMoE(), torch.randn(2, 8, 32), rewrites=1,
                        options={"recompute_h": True})


@pytest.mark.parametrize("model,why", [
    (SharedWeightLoop(), "iterations use the same weights"),
    (DenseMLPBlock(), "dense MLP"),
    (LoopMoE(expert=functools.partial(GatedMLP, norm=True)), "expert applies a norm inside"),
])
def test_look_alikes_are_not_rewritten(model, why):
    torch.manual_seed(0)
    check_against_eager(model, torch.randn(2, 8, 32), rewrites=0)


@pytest.mark.parametrize("T,E,K,router_bias", [
    (1, 4, 2, None),                                            # a single token
    (16, 4, 4, None),                                           # K = E
    (16, 6, 2, torch.tensor([30.0, 30.0, -30, -30, -30, -30])),  # experts 2..5 get no tokens
    (16, 4, 1, torch.tensor([30.0, -30, -30, -30])),            # all tokens on one expert
])
def test_routing_edge_cases(T, E, K, router_bias):
    torch.manual_seed(0)
    check_against_eager(LoopMoE(E=E, K=K, router_bias=router_bias), torch.randn(1, T, 32), rewrites=1)


def test_dynamic_shapes_one_recompile():
    torch.manual_seed(0)
    m = LoopMoE()
    cm = torch.compile(m, backend="sonic")
    for seq in (5, 9, 13, 17):
        x = torch.randn(1, seq, 32)
        torch.testing.assert_close(cm(x), m(x), atol=1e-5, rtol=1e-5)
    # the first shape compiles static, the second recompiles once with dynamic sizes, then reuse
    assert counters["stats"]["unique_graphs"] <= 2
    assert counters["sonic"]["moe_rewrites"] == counters["stats"]["unique_graphs"]


def rewritten_code(model, *args):
    captured = []

    def capture(gm, example_inputs):
        rewrite_moe(gm, SonicOptions())
        captured.append(normalize_gm(gm.print_readable(print_output=False)))
        return gm.forward

    # one graph for the torch.where loop on every torch version (2.11 splits the frame without it)
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        torch.compile(model, backend=capture)(*args)
    return captured[0]


def test_snapshot_expert_loop():
    torch.manual_seed(0)
    code = rewritten_code(LoopMoE(d=8, n=4, E=2, K=1, mask="eq"), torch.randn(1, 4, 8))
    assert_expected_inline(code, """\
class GraphModule(torch.nn.Module):
    def forward(self, L_hidden_states_: "f32[1, 4, 8]", L_self_modules_gate_parameters_weight_: "f32[2, 8]", L_self_buffers_router_bias_: "f32[2]", L_self_modules_experts_modules_0_modules_w1_parameters_weight_: "f32[4, 8]", L_self_modules_experts_modules_0_modules_w3_parameters_weight_: "f32[4, 8]", L_self_modules_experts_modules_0_modules_w2_parameters_weight_: "f32[8, 4]", L_self_modules_experts_modules_1_modules_w1_parameters_weight_: "f32[4, 8]", L_self_modules_experts_modules_1_modules_w3_parameters_weight_: "f32[4, 8]", L_self_modules_experts_modules_1_modules_w2_parameters_weight_: "f32[8, 4]"):
        l_hidden_states_ = L_hidden_states_
        l_self_modules_gate_parameters_weight_ = L_self_modules_gate_parameters_weight_
        l_self_buffers_router_bias_ = L_self_buffers_router_bias_
        l_self_modules_experts_modules_0_modules_w1_parameters_weight_ = L_self_modules_experts_modules_0_modules_w1_parameters_weight_
        l_self_modules_experts_modules_0_modules_w3_parameters_weight_ = L_self_modules_experts_modules_0_modules_w3_parameters_weight_
        l_self_modules_experts_modules_0_modules_w2_parameters_weight_ = L_self_modules_experts_modules_0_modules_w2_parameters_weight_
        l_self_modules_experts_modules_1_modules_w1_parameters_weight_ = L_self_modules_experts_modules_1_modules_w1_parameters_weight_
        l_self_modules_experts_modules_1_modules_w3_parameters_weight_ = L_self_modules_experts_modules_1_modules_w3_parameters_weight_
        l_self_modules_experts_modules_1_modules_w2_parameters_weight_ = L_self_modules_experts_modules_1_modules_w2_parameters_weight_

        x: "f32[4, 8]" = l_hidden_states_.view(-1, 8);  l_hidden_states_ = None

        linear: "f32[4, 2]" = torch._C._nn.linear(x, l_self_modules_gate_parameters_weight_, None);  l_self_modules_gate_parameters_weight_ = None
        logits: "f32[4, 2]" = linear + l_self_buffers_router_bias_;  linear = l_self_buffers_router_bias_ = None

        weights: "f32[4, 2]" = torch.nn.functional.softmax(logits, dim = 1, dtype = torch.float32);  logits = None

        topk = torch.topk(weights, 1, dim = -1);  weights = None
        weights_1: "f32[4, 1]" = topk[0]
        selected: "i64[4, 1]" = topk[1];  topk = None

        sum_1: "f32[4, 1]" = weights_1.sum(dim = -1, keepdim = True)
        truediv: "f32[4, 1]" = weights_1 / sum_1;  weights_1 = sum_1 = None

        weights_3: "f32[4, 1]" = truediv.to(torch.float32);  truediv = None

        size = x.size(0)
        arange: "i64[4]" = torch.arange(size, device = device(type='cpu'));  size = None
        size_1 = selected.size(1)
        repeat_interleave: "i64[4]" = arange.repeat_interleave(size_1);  arange = size_1 = None
        reshape: "i64[4]" = selected.reshape(-1);  selected = None
        reshape_1: "f32[4]" = weights_3.reshape(-1);  weights_3 = None
        to_1: "i32[4]" = repeat_interleave.to(torch.int32);  repeat_interleave = None
        to_2: "i32[4]" = reshape.to(torch.int32);  reshape = None
        fused_moe_experts_default = torch.ops.moe_inductor.fused_moe_experts.default(x, to_1, to_2, reshape_1, [l_self_modules_experts_modules_0_modules_w1_parameters_weight_, l_self_modules_experts_modules_1_modules_w1_parameters_weight_], [l_self_modules_experts_modules_0_modules_w2_parameters_weight_, l_self_modules_experts_modules_1_modules_w2_parameters_weight_], [l_self_modules_experts_modules_0_modules_w3_parameters_weight_, l_self_modules_experts_modules_1_modules_w3_parameters_weight_], [], [], [], activation = 'swiglu', interleaved = False, recompute_h = False, impl = 'auto', autocast_like = 'aten::linear');  x = to_1 = to_2 = reshape_1 = l_self_modules_experts_modules_0_modules_w1_parameters_weight_ = l_self_modules_experts_modules_1_modules_w1_parameters_weight_ = l_self_modules_experts_modules_0_modules_w2_parameters_weight_ = l_self_modules_experts_modules_1_modules_w2_parameters_weight_ = l_self_modules_experts_modules_0_modules_w3_parameters_weight_ = l_self_modules_experts_modules_1_modules_w3_parameters_weight_ = None
        getitem_12: "f32[4, 8]" = fused_moe_experts_default[0];  fused_moe_experts_default = None

        view_1: "f32[1, 4, 8]" = getitem_12.view(1, 4, 8);  getitem_12 = None
        return (view_1,)
""")


class VmapThenMoE(torch.nn.Module):
    """torch.vmap in the same graph (transformers' masking utilities use it): Dynamo leaves
    functorch level calls without users, which look pure to fx; the rewrite's clean-up must keep
    them (it once erased them and the compiled graph failed at run time, jamba in the sweep)."""

    def __init__(self):
        super().__init__()
        self.moe = LoopMoE()

    def forward(self, x):
        y = torch.vmap(lambda r: r * torch.sigmoid(r))(x)
        return self.moe(y)


def test_vmap_in_the_graph_survives_the_rewrite():
    check_against_eager(VmapThenMoE(), torch.randn(2, 3, 32), rewrites=1)
