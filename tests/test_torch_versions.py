"""Graph spellings that differ between the torch versions this package supports (2.11 and 2.13).

Dynamo records the same Python differently by version. Each test takes the graph Dynamo gives on
the running torch, respells the nodes in question the way the other version writes them, and checks
that the rewrite still happens and is exact (output and every gradient against eager). The whole
suite also runs on torch 2.11 in CI (``.ci/run``, second virtual environment).
"""
import operator

import pytest
import torch
from torch._dynamo.utils import counters

from moe_inductor.compile.backend import rewrite_moe
from moe_inductor.compile.options import SonicOptions
from moe_modules import LoopMoE, MaskDispatchMoE

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def _is_eq(n):
    """``t == e`` as torch 2.13 (operator.eq) or 2.11 (t.__eq__(e)) records it."""
    return ((n.op == "call_function" and n.target is operator.eq)
            or (n.op == "call_method" and n.target == "__eq__"))


def _respell(gm, spelling):
    """Rewrite every ``t == e`` (e an int) of ``gm`` into ``spelling``; returns how many."""
    count = 0
    for n in list(gm.graph.nodes):
        if not (_is_eq(n) and len(n.args) == 2 and isinstance(n.args[1], int)
                and isinstance(n.args[0], torch.fx.Node)):
            continue
        t, e = n.args
        with gm.graph.inserting_before(n):
            if spelling == "2.11 method __eq__":     # torch 2.11: t == e on a tensor
                new = gm.graph.call_method("__eq__", (t, e))
            elif spelling == "2.11 reversed":        # torch 2.11 keeps e == t as written
                new = gm.graph.call_function(operator.eq, (e, t))
            elif spelling == "torch.eq":
                new = gm.graph.call_function(torch.eq, (t, e))
            else:
                assert spelling == "method eq"
                new = gm.graph.call_method("eq", (t, e))
        new.meta = dict(n.meta)
        n.replace_all_uses_with(new)
        gm.graph.erase_node(n)
        count += 1
    gm.recompile()
    return count


class Respelled:
    """Backend: respell the graph, run the sonic rewrite, then run the graph eagerly."""

    def __init__(self, spelling):
        self.spelling, self.respelled, self.candidates = spelling, 0, []

    def __call__(self, gm, example_inputs):
        self.respelled += _respell(gm, self.spelling)
        self.candidates += rewrite_moe(gm, SonicOptions()).candidates
        return gm.forward


def _grads(fn, mod, x):
    xi = x.detach().clone().requires_grad_()
    params = list(mod.parameters())
    out = fn(xi)
    return [out.detach()] + list(torch.autograd.grad(out.pow(2).sum(), [xi] + params, allow_unused=True))


@pytest.mark.parametrize("spelling", ["2.11 method __eq__", "2.11 reversed", "torch.eq", "method eq"])
@pytest.mark.parametrize("make,idiom", [
    (lambda: LoopMoE(d=16, n=8, E=3, K=2, mask="eq"), "expert_loop"),  # torch.where(top_k_index == e)
    (lambda: MaskDispatchMoE(d=16, n=8, E=3), "mask_dispatch"),         # out[idx == e] = ...
], ids=["expert_loop", "mask_dispatch"])
def test_expert_mask_eq_spellings(make, idiom, spelling):
    torch.manual_seed(0)
    mod = make()
    x = torch.randn(2, 5, 16)
    ref = _grads(mod, mod, x)
    be = Respelled(spelling)
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        got = _grads(torch.compile(mod, backend=be, fullgraph=True), mod, x)
    assert be.respelled == mod.E  # one mask per expert, all in the other version's spelling
    assert [(c.idiom, c.status) for c in be.candidates] == [(idiom, "rewritten")], \
        [(c.idiom, c.status, c.reason) for c in be.candidates]
    for g, r in zip(got, ref):
        assert (g is None) == (r is None)
        if g is not None:
            torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)
