"""Idiom mask_dispatch: top-1 boolean-mask dispatch (transformers 4.x Switch Transformers, research
code ``out[mask] = expert(x[mask])``). Matched blocks, exact numerics vs eager (logits, every
gradient), the rewritten graph, and look-alikes that must be declined with their reason.

Hand-written modules run in a light backend (rewrite, then the graph eagerly); the HF models go
through the real ``sonic`` backend (Inductor) via ``test_hf_models.run_and_compare``.
"""
import functools
import operator

import pytest
import torch
from torch._dynamo.testing import normalize_gm
from torch._dynamo.utils import counters
from torch.testing._internal.common_utils import TestCase

from moe_inductor.compile.backend import rewrite_moe
from moe_inductor.dynamo.dynamo_scope import mark_sonic
from moe_inductor.compile.options import SonicOptions
from moe_modules import BiasedMLP, LoopMoE, MaskDispatchMoE, PlainMLP


@mark_sonic  # frames get sonic's scoped Dynamo settings
class RewriteOnly:
    """Backend: the sonic rewrite, then the graph as it is (keeps graphs and candidates)."""

    def __init__(self):
        self.graphs, self.candidates = [], []

    def __call__(self, gm, example_inputs):
        self.candidates += rewrite_moe(gm, SonicOptions()).candidates
        self.graphs.append(gm)
        return gm.forward


def check_grads(mod, x, atol=1e-5, rtol=1e-5):
    """Rewrite-only compile; output and the gradients of x and every used parameter match eager."""
    def run(fn):
        xi = x.detach().clone().requires_grad_()
        params = [p for p in mod.parameters()]
        out = fn(xi)
        grads = torch.autograd.grad(out.pow(2).sum(), [xi] + params, allow_unused=True)
        return out.detach(), grads

    ref = run(mod)
    torch._dynamo.reset()
    counters.clear()
    be = RewriteOnly()
    got = run(torch.compile(mod, backend=be, fullgraph=True))
    torch.testing.assert_close(got[0], ref[0], atol=atol, rtol=rtol)
    for g, r in zip(got[1], ref[1]):
        assert (g is None) == (r is None)
        if g is not None:
            torch.testing.assert_close(g, r, atol=atol, rtol=rtol)
    return be


def statuses(be):
    return [(c.idiom, c.status) for c in be.candidates]


# --------------------------------------------------------------------------- research code

@pytest.mark.parametrize("kw", [
    dict(),                                          # idx == e masks, zeros buffer, w[m, None] * expert
    dict(mask="onehot", init="clone"),               # one_hot(idx).bool()[:, e], unrouted keep input
    dict(mask="onehot", init="clone", capacity=1),   # expert capacity 1: most tokens routed nowhere
    dict(mask="onehot", init="zeros", capacity=2),   # dropped tokens give exactly 0
    dict(weighted=False, init="clone"),              # no router weight in the loop
    dict(expert=PlainMLP),                           # non-gated GELU experts
    dict(expert=BiasedMLP, mask="onehot", capacity=1),  # fc1/fc2 biases, ReLU, eval-identity dropout
    dict(E=7),                                       # prime E
])
def test_mask_dispatch_rewritten_and_exact(kw):
    torch.manual_seed(0)
    mod = MaskDispatchMoE(**kw)
    x = torch.randn(2, 5, 16)
    be = check_grads(mod, x)
    assert statuses(be) == [("mask_dispatch", "rewritten")]
    assert be.candidates[0].num_experts == mod.E and be.candidates[0].top_k == 1
    # the per-expert loop is gone: no masked assignment, no expert linear left
    nodes = list(be.graphs[0].graph.nodes)
    assert not any(n.target is operator.setitem for n in nodes)
    assert sum(n.target is torch._C._nn.linear for n in nodes) == 1  # the router


def test_capacity_really_drops_tokens():
    # guards the capacity cases above: with capacity 1 most of the 10 tokens are routed nowhere
    torch.manual_seed(0)
    mod = MaskDispatchMoE(mask="onehot", init="clone", capacity=1)
    x = torch.randn(10, 16)
    idx = mod.gate(x).argmax(-1)
    assert len(set(idx.tolist())) < 10


class TestSnapshot(TestCase):
    def test_snapshot_switch_style_clone_and_capacity(self):
        torch.manual_seed(0)
        be = RewriteOnly()
        torch._dynamo.reset()
        counters.clear()
        torch.compile(MaskDispatchMoE(d=8, n=4, E=2, mask="onehot", init="clone", capacity=1), backend=be,
                      fullgraph=True)(torch.randn(4, 8))
        self.assertEqual(counters["sonic"]["moe_rewrites"], 1)
        self.assertExpectedInline(normalize_gm(be.graphs[0].print_readable(print_output=False)), """\
class GraphModule(torch.nn.Module):
    def forward(self, L_x_: "f32[4, 8]", L_self_modules_gate_parameters_weight_: "f32[2, 8]", L_self_modules_experts_modules_0_modules_w1_parameters_weight_: "f32[4, 8]", L_self_modules_experts_modules_0_modules_w3_parameters_weight_: "f32[4, 8]", L_self_modules_experts_modules_0_modules_w2_parameters_weight_: "f32[8, 4]", L_self_modules_experts_modules_1_modules_w1_parameters_weight_: "f32[4, 8]", L_self_modules_experts_modules_1_modules_w3_parameters_weight_: "f32[4, 8]", L_self_modules_experts_modules_1_modules_w2_parameters_weight_: "f32[8, 4]"):
        l_x_ = L_x_
        l_self_modules_gate_parameters_weight_ = L_self_modules_gate_parameters_weight_
        l_self_modules_experts_modules_0_modules_w1_parameters_weight_ = L_self_modules_experts_modules_0_modules_w1_parameters_weight_
        l_self_modules_experts_modules_0_modules_w3_parameters_weight_ = L_self_modules_experts_modules_0_modules_w3_parameters_weight_
        l_self_modules_experts_modules_0_modules_w2_parameters_weight_ = L_self_modules_experts_modules_0_modules_w2_parameters_weight_
        l_self_modules_experts_modules_1_modules_w1_parameters_weight_ = L_self_modules_experts_modules_1_modules_w1_parameters_weight_
        l_self_modules_experts_modules_1_modules_w3_parameters_weight_ = L_self_modules_experts_modules_1_modules_w3_parameters_weight_
        l_self_modules_experts_modules_1_modules_w2_parameters_weight_ = L_self_modules_experts_modules_1_modules_w2_parameters_weight_

        x: "f32[4, 8]" = l_x_.reshape(-1, 8);  l_x_ = None

        linear: "f32[4, 2]" = torch._C._nn.linear(x, l_self_modules_gate_parameters_weight_, None);  l_self_modules_gate_parameters_weight_ = None
        probs: "f32[4, 2]" = torch.nn.functional.softmax(linear, dim = -1);  linear = None

        max_1 = probs.max(dim = -1);  probs = None
        w: "f32[4]" = max_1[0]
        idx: "i64[4]" = max_1[1];  max_1 = None

        onehot: "i64[4, 2]" = torch._C._nn.one_hot(idx, 2);  idx = None

        cumsum: "i64[4, 2]" = torch.cumsum(onehot, dim = 0)
        le: "b8[4, 2]" = cumsum <= 1;  cumsum = None
        onehot_1: "i64[4, 2]" = onehot * le;  onehot = le = None

        onehot_2: "b8[4, 2]" = onehot_1.bool();  onehot_1 = None

        m: "b8[4]" = onehot_2[(slice(None, None, None), 0)]
        m_1: "b8[4]" = onehot_2[(slice(None, None, None), 1)];  onehot_2 = None

        size = x.size(-1)
        reshape_2: "f32[4, 8]" = x.reshape(-1, size)
        size_1 = reshape_2.size(0)
        arange: "i64[4]" = torch.arange(size_1, device = device(type='cpu'));  size_1 = None
        reshape_3: "b8[4]" = m.reshape(-1);  m = None
        reshape_4: "b8[4]" = m_1.reshape(-1);  m_1 = None
        stack: "b8[4, 2]" = torch.stack([reshape_3, reshape_4], -1);  reshape_3 = reshape_4 = None
        any_1: "b8[4]" = stack.any(-1)
        to: "i32[4, 2]" = stack.to(torch.int32);  stack = None
        argmax: "i64[4]" = to.argmax(-1);  to = None
        reshape_5: "f32[4]" = w.reshape(-1);  w = None
        where: "f32[4]" = torch.where(any_1, reshape_5, 0.0);  reshape_5 = None
        to_1: "i32[4]" = arange.to(torch.int32);  arange = None
        to_2: "i32[4]" = argmax.to(torch.int32);  argmax = None
        fused_moe_experts_default = torch.ops.moe_inductor.fused_moe_experts.default(reshape_2, to_1, to_2, where, [l_self_modules_experts_modules_0_modules_w1_parameters_weight_, l_self_modules_experts_modules_1_modules_w1_parameters_weight_], [l_self_modules_experts_modules_0_modules_w2_parameters_weight_, l_self_modules_experts_modules_1_modules_w2_parameters_weight_], [l_self_modules_experts_modules_0_modules_w3_parameters_weight_, l_self_modules_experts_modules_1_modules_w3_parameters_weight_], [], [], [], activation = 'swiglu', interleaved = False, recompute_h = False, impl = 'auto', autocast_like = 'aten::linear');  reshape_2 = to_1 = to_2 = where = l_self_modules_experts_modules_0_modules_w1_parameters_weight_ = l_self_modules_experts_modules_1_modules_w1_parameters_weight_ = l_self_modules_experts_modules_0_modules_w2_parameters_weight_ = l_self_modules_experts_modules_1_modules_w2_parameters_weight_ = l_self_modules_experts_modules_0_modules_w3_parameters_weight_ = l_self_modules_experts_modules_1_modules_w3_parameters_weight_ = None
        getitem_8: "f32[4, 8]" = fused_moe_experts_default[0];  fused_moe_experts_default = None
        unsqueeze: "b8[4, 1]" = any_1.unsqueeze(-1);  any_1 = None
        reshape_6: "f32[4, 8]" = x.reshape(-1, size);  size = None
        where_1: "f32[4, 8]" = torch.where(unsqueeze, getitem_8, reshape_6);  unsqueeze = getitem_8 = reshape_6 = None
        reshape_as: "f32[4, 8]" = where_1.reshape_as(x);  where_1 = x = None

        reshape_1: "f32[4, 8]" = reshape_as.reshape((4, 8));  reshape_as = None
        return (reshape_1,)
""")


# --------------------------------------------------------------------------- look-alikes

def test_read_modify_write_accumulation_rewritten():
    """``out[m] = y + out[m]`` over disjoint masks into a copy of x: an indexed accumulation (the
    per-expert composition's indexed_iadd combine), result x + sum of weighted experts."""
    torch.manual_seed(0)
    be = check_grads(MaskDispatchMoE(read_inside="add", init="clone"), torch.randn(2, 5, 16))
    assert [(c.idiom, c.status) for c in be.candidates] == [("expert_loop", "rewritten")], be.candidates
    assert "combine=indexed_iadd" in be.candidates[0].parts


@pytest.mark.parametrize("kw, reason", [
    (dict(mask="threshold"), "masks not provably disjoint"),       # probs[:, e] > 1/E: masks overlap
    (dict(inplace_expert=True), "expert MLP"),                       # y.mul_(2) on the expert output: made
                                                                     # functional, y * 2 is not an expert MLP
    (dict(read_inside=True), "reads the buffer it writes"),          # out[m] = y - out[m]
    (dict(expert=functools.partial(BiasedMLP, p=0.5)), "dropout with p > 0 in training"),
])
def test_lookalikes_declined(kw, reason):
    torch.manual_seed(0)
    mod = MaskDispatchMoE(**kw)
    if "expert" in kw:
        mod.train()
        torch._dynamo.reset()
        counters.clear()
        be = RewriteOnly()
        torch.compile(mod, backend=be, fullgraph=True)(torch.randn(2, 5, 16))
    else:
        be = check_grads(mod, torch.randn(2, 5, 16))
    assert counters["sonic"]["moe_rewrites"] == 0
    assert [c.status for c in be.candidates] == ["declined"]
    assert reason in be.candidates[0].reason, be.candidates[0].reason


def test_modulelist_of_separate_linears_with_index_add_is_expert_loop():
    # `for e, expert in enumerate(ModuleList)` + torch.where(idx == e) + index_add_, experts with
    # separate gate/up/down nn.Linear: already the expert_loop idiom; mask_dispatch must not claim it
    torch.manual_seed(0)
    be = check_grads(LoopMoE(mask="eq"), torch.randn(2, 8, 32))
    assert statuses(be) == [("expert_loop", "rewritten")]


# --------------------------------------------------------------------------- transformers models

def _hf(family):
    pytest.importorskip("transformers")
    import hf_models

    return hf_models


def no_dropout(model, keep=()):
    """Dropout off everywhere (run_and_compare runs in train mode), except modules in ``keep``."""
    for m in model.modules():
        if m in keep:
            continue
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        for name in ("dropout", "layerdrop"):
            if isinstance(getattr(m, name, None), float):
                setattr(m, name, 0.0)
    return model



# torch 2.11's Dynamo cannot trace transformers 5.23's Switch/NLLB routers (``self.classifier =
# self.classifier.to(self.dtype)`` builds an nn.Parameter: "Attempted to use torch.nn.Parameter()
# constructor"), so the router and the dispatch land in different graphs and the 4.x blocks are not
# seen whole there. A known limit on 2.11 (README), kept visible: strict, so it fails once it passes.
_ROUTER_BREAKS_ON_211 = pytest.mark.xfail(
    torch.__version__ < "2.12", strict=True,
    reason="torch 2.11 Dynamo graph-breaks in transformers' Switch/NLLB router (nn.Parameter constructor)")

@_ROUTER_BREAKS_ON_211
@pytest.mark.parametrize("capacity", [
    64,  # the config's capacity: no token of the 8-token sequences is dropped
    1,   # one token per expert and sequence: dropped tokens keep their input (then * router prob)
])
def test_hf_switch_transformers_4x_blocks(capacity):
    hf_models = _hf("switch_transformers")
    from moe_modules import switch_with_4x_sparse_mlp
    from test_hf_models import run_and_compare

    model, ids = hf_models.build("switch_transformers")
    model = no_dropout(switch_with_4x_sparse_mlp(model))
    routed, hooks = [], []
    for _, block in hf_models.moe_modules(model):
        block.router.expert_capacity = capacity
        hooks.append(block.router.register_forward_hook(lambda m, i, o: routed.append(int(o[0].sum()))))
    model(ids)
    for h in hooks:
        h.remove()
    assert (min(routed) < ids.numel()) == (capacity == 1)  # tokens were (not) dropped
    run_and_compare(model, ids, len(hf_models.moe_modules(model)), atol=1e-4, rtol=1e-4)


@_ROUTER_BREAKS_ON_211
def test_hf_switch_expert_dropout_in_training_declined():
    # Switch's experts keep dropout_rate 0.1 between wi and wo: random in training
    hf_models = _hf("switch_transformers")
    from moe_modules import switch_with_4x_sparse_mlp

    model, ids = hf_models.build("switch_transformers")
    model = switch_with_4x_sparse_mlp(model).train()
    experts = [m for _, b in hf_models.moe_modules(model) for m in b.experts.modules()]
    no_dropout(model, keep=experts)
    torch._dynamo.reset()
    counters.clear()
    be = RewriteOnly()
    torch.compile(model, backend=be)(ids)
    assert counters["sonic"]["moe_rewrites"] == 0
    assert [c.status for c in be.candidates] == ["declined"] * 2
    assert all("dropout with p > 0 in training" in c.reason for c in be.candidates)


@_ROUTER_BREAKS_ON_211
@pytest.mark.parametrize("mode, token_dropout, rewritten", [
    ("train", 0.2, False),  # NLLB default moe_token_dropout, training: dropout with p > 0, declined
    ("eval", 0.2, True),    # eval: expert_output *= 1 - p (made functional by the normal form): a constant scale
    ("train", 0.0, True),   # buf[e, mask] slices of an (E, T, d) einsum buffer (mask_dispatch.analyse_slices)
])
def test_hf_nllb_moe_4x_blocks(mode, token_dropout, rewritten):
    """transformers 4.x NLLB-MoE's sparse MLP (the (E, T, d) buffer of masked token copies, per-expert
    slices written back, summed over the experts): rewritten and equal to eager, except in training with
    token dropout (declined, naming it)."""
    hf_models = _hf("nllb_moe")
    from moe_modules import Nllb4xSparseMLP, nllb_with_4x_sparse_mlp

    model, ids = hf_models.build("nllb_moe")
    model = nllb_with_4x_sparse_mlp(model)
    blocks = [m for m in model.modules() if isinstance(m, Nllb4xSparseMLP)]
    no_dropout(model, keep=[b.token_dropout for b in blocks])
    for b in blocks:
        b.moe_token_dropout = token_dropout
        b.token_dropout.p = token_dropout
    getattr(model, mode)()
    torch._dynamo.reset()
    counters.clear()
    be = RewriteOnly()
    out = torch.compile(model, backend=be)(ids)[0]
    if not rewritten:
        assert counters["sonic"]["moe_rewrites"] == 0
        assert [c.status for c in be.candidates] == ["declined"] * len(blocks)
        assert all("dropout with p > 0 in training" in c.reason for c in be.candidates), \
            [c.reason for c in be.candidates]
        return
    assert counters["sonic"]["moe_rewrites"] == len(blocks)
    assert [c.status for c in be.candidates] == ["rewritten"] * len(blocks), [c.reason for c in be.candidates]
    torch.testing.assert_close(out, model(ids)[0])


@_ROUTER_BREAKS_ON_211
@pytest.mark.parametrize("family", ["nllb_moe"])
def test_hf_5x_expert_hit_loop_captured(family):
    # transformers 5.x loops over the data-dependent expert_hit: in a sonic frame the loop is traced
    # over every expert (moe_inductor/dynamo/loop_capture.py), so one graph holds each block and the
    # recognisers see it; in eval mode NLLB-MoE scales the expert output in place
    # (``*= 1 - moe_token_dropout``): a constant the composition folds into the routing weights
    hf_models = _hf(family)
    model, ids = hf_models.build(family)
    assert not model.training and all(m.experts.moe_token_dropout > 0 for _, m in hf_models.moe_modules(model))
    params = [p for p in model.parameters() if p.requires_grad]
    ref = model(ids)[0]
    g = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, params, g, allow_unused=True)
    torch._dynamo.reset()
    counters.clear()
    be = RewriteOnly()
    out = torch.compile(model, backend=be)(ids)[0]
    assert len(be.graphs) == 1 and not counters["graph_break"], dict(counters["graph_break"])
    assert [c.status for c in be.candidates] == ["rewritten"] * 2, [(c.status, c.reason) for c in be.candidates]
    assert all("outputs scaled by 0.8" in c.parts for c in be.candidates), [c.parts for c in be.candidates]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(torch.autograd.grad(out, params, g, allow_unused=True), ref_grads):
        if b is None:  # an expert without tokens
            assert a is None or torch.count_nonzero(a) == 0
        else:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)