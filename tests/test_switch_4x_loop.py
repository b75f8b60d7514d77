"""transformers 4.x Switch Transformers' hit loop (``moe_inductor.dynamo.loop_capture`` +
``patterns/mask_dispatch.py``)::

    hit = mask.reshape(B * S, E).sum(dim=0)                 # expert axis LAST, no `> 0`
    hit = torch.nonzero(hit, as_tuple=True)[0].tolist()     # the name rebound, function form
    for e in hit:
        out[mask[:, :, e]] = expert_e(x[mask[:, :, e]])     # the mask indexed twice

each spelling traced as one ``range(E)`` loop, rewritten into the fused op and exact (output and
every gradient vs eager, at two lengths); near misses kept as written and exact."""
import pytest
import torch
import torch.nn as nn
from torch._dynamo.utils import counters

from rewrite_check import CaptureGraphs
from moe_inductor.dynamo import capture

pytestmark = pytest.mark.usefixtures("fresh_dynamo")

E, D, N = 4, 16, 8


class _Base(nn.Module):
    """Router by ``argmax`` of a linear map whose expert e reads feature 1 + e (so inputs choose the
    routing), ModuleDict experts ``expert_{i}`` (Switch's)."""

    def __init__(self):
        super().__init__()
        self.router = nn.Linear(D, E, bias=False)
        with torch.no_grad():
            self.router.weight.zero_()
            for e in range(E):
                self.router.weight[e, 1 + e] = 10.0
        self.experts = nn.ModuleDict({f"expert_{i}": nn.Sequential(nn.Linear(D, N), nn.ReLU(), nn.Linear(N, D))
                                      for i in range(E)})

    def route(self, x):  # x (B, S, d): one-hot (B, S, E) and the top probability (B, S, 1)
        probs = self.router(x).softmax(-1)
        return nn.functional.one_hot(probs.argmax(-1), E), probs.max(-1).values.unsqueeze(-1)


class Switch4x(_Base):  # the transformers 4.50 spelling
    def forward(self, x):
        router_mask, p = self.route(x)
        out = x.clone()
        router_mask = router_mask.bool()
        B, S, n = router_mask.shape
        idx_mask = router_mask.reshape(B * S, n).sum(dim=0)
        idx_mask = torch.nonzero(idx_mask, as_tuple=True)[0].tolist()
        for idx in idx_mask:
            out[router_mask[:, :, idx]] = getattr(self.experts, "expert_{}".format(idx))(x[router_mask[:, :, idx]])
        return p * out


class FnGtForm(_Base):  # torch.nonzero(S > 0, as_tuple=True)[0].tolist(), expert axis 0
    def forward(self, x):
        mask, p = self.route(x)
        out = torch.zeros_like(x)
        mp = mask.bool().permute(2, 0, 1)
        hit = torch.nonzero(mp.sum(dim=(-1, -2)) > 0, as_tuple=True)[0].tolist()
        for e in hit:
            out[mp[e]] = getattr(self.experts, "expert_{}".format(e))(x[mp[e]])
        return p * out


class FnBareForm(_Base):  # torch.nonzero(S, as_tuple=True)[0] of a bare sum, expert axis 0
    def forward(self, x):
        mask, p = self.route(x)
        out = x.clone()
        mp = mask.bool().permute(2, 0, 1)
        for e in torch.nonzero(mp.sum(dim=(1, 2)), as_tuple=True)[0].tolist():
            m = mp[e]
            out[m] = getattr(self.experts, "expert_{}".format(e))(x[m])
        return p * out


class EllipsisForm(_Base):  # last axis read as M[..., e], int mask bound by one_hot then .bool() per use
    def forward(self, x):
        mask, p = self.route(x)
        out = x.clone()
        mask = mask.bool()
        hit = torch.nonzero(mask.view(-1, E).sum(0), as_tuple=True)[0].tolist()
        for e in hit:
            out[mask[..., e]] = getattr(self.experts, "expert_{}".format(e))(x[mask[..., e]])
        return p * out


class SignedFloatMask(_Base):  # near miss: a float mask that can be negative (sums may cancel)
    def forward(self, x):
        mask, p = self.route(x)
        out = x.clone()
        sign = (x[..., 0] > 0).float() * 2 - 1
        mask = mask.float() * sign[..., None]
        B, S, n = mask.shape
        hit = mask.reshape(B * S, n).sum(dim=0)
        hit = torch.nonzero(hit, as_tuple=True)[0].tolist()
        for e in hit:
            out[mask[:, :, e].bool()] = getattr(self.experts, "expert_{}".format(e))(x[mask[:, :, e].bool()])
        return p * out


class OtherAxis(_Base):  # near miss: the hit list keeps the token axis, the body selects experts
    def forward(self, x):  # x (1, E, d): as many tokens as experts, so both index
        mask, p = self.route(x)
        keep = x[..., 0:1] > 0  # dropped tokens: rows with no expert
        mask = (mask * keep)[0].bool()  # (T, E)
        out = x[0].clone()
        hit = mask.sum(dim=1)
        hit = torch.nonzero(hit, as_tuple=True)[0].tolist()  # tokens with an expert, not experts
        for e in hit:
            out[mask[:, e]] = getattr(self.experts, "expert_{}".format(e))(x[0][mask[:, e]])
        return (p[0] * out)[None]


class ReboundElsewhere(_Base):  # near miss: the hit name rebound to another list than its nonzero
    def forward(self, x):
        mask, p = self.route(x)
        out = x.clone()
        mask = mask.bool()
        B, S, n = mask.shape
        hit = mask.reshape(B * S, n).sum(dim=0)
        hit = torch.nonzero(hit[:2], as_tuple=True)[0].tolist()  # only the first two experts
        for e in hit:
            out[mask[:, :, e]] = getattr(self.experts, "expert_{}".format(e))(x[mask[:, :, e]])
        return p * out


def _input(S, experts, signs=None, seed=0):
    """(1, S, D) whose token t routes to ``experts[t]`` (feature 1 + e large); feature 0's sign from
    ``signs`` (default +)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, S, D, generator=g) * 0.1
    for t, e in enumerate(experts):
        x[0, t, 1 + e] = 1.0
        x[0, t, 0] = 1.0 if signs is None else signs[t]
    return x


def _compare(model, inputs, atol=1e-5):
    """Compile with a sonic-marked backend (loop capture, rewrite, graph run as is); output and
    every gradient equal to eager for each input (an expert without tokens: None in eager, zero
    compiled)."""
    backend = CaptureGraphs()
    compiled = torch.compile(nn.Sequential(model), backend=backend)  # as in a model (test_loop_capture)
    params = list(model.parameters())
    for x in inputs:
        x = x.requires_grad_(True)
        ref = model(x)
        ref_grads = torch.autograd.grad(ref.pow(2).sum(), [x] + params, allow_unused=True)
        out = compiled(x)
        grads = torch.autograd.grad(out.pow(2).sum(), [x] + params, allow_unused=True)
        torch.testing.assert_close(out, ref, atol=atol, rtol=atol)
        for a, b in zip(grads, ref_grads):
            if b is None:
                assert a is None or torch.count_nonzero(a) == 0
                continue
            torch.testing.assert_close(a, b, atol=atol, rtol=atol)
    return backend


# token -> expert; expert 3 gets no token (the skip matters), then a second length
_ROUTES = ([0, 1, 2, 0, 1], [2, 2, 0, 1, 0, 1, 2, 0])


# (module, fused rewrites): the permuted mask `mp[e]` is captured as one graph, but mask_dispatch
# reads columns M[..., e] only (not M.permute(2, 0, 1)[e]): the loop part is what is tested there
@pytest.mark.parametrize("cls,rewrites", [(Switch4x, 1), (FnGtForm, 0), (FnBareForm, 0), (EllipsisForm, 1)])
def test_spelling_is_one_graph_rewritten_and_exact(cls, rewrites):
    torch.manual_seed(0)
    model = cls().eval()
    notes = capture.notes_for(model)
    assert [n.rewritten for n in notes] == [True], notes
    backend = _compare(model, [_input(len(r), r) for r in _ROUTES])
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert len(backend.graphs) == len(_ROUTES)  # one graph per length (static shapes)
    assert counters["sonic"]["moe_rewrites"] == rewrites * len(_ROUTES)


def test_signed_float_mask_keeps_the_original_loop():
    # expert 2 receives one +1 and one -1 token: its sum is 0, the original skips it, while
    # mask[:, :, 2].bool() selects both tokens; the loop must run as written (graph break)
    torch.manual_seed(0)
    model = SignedFloatMask().eval()
    x = _input(5, [0, 2, 2, 1, 0], signs=[1.0, 1.0, -1.0, 1.0, 1.0])
    _compare(model, [x])
    assert counters["sonic"]["moe_rewrites"] == 0
    assert counters["graph_break"]  # the data-dependent loop ran as written


def test_selection_on_another_axis_than_the_hit_is_declined():
    torch.manual_seed(0)
    model = OtherAxis().eval()
    notes = capture.notes_for(model)
    assert not any(n.rewritten for n in notes) and any("does not prove that selection empty" in n.reason
                                                       for n in notes), notes
    # token 3 is dropped (no expert): the original skips expert 3, which token 0 routes to
    x = _input(E, [3, 1, 2, 0], signs=[1.0, 1.0, 1.0, -1.0])
    _compare(model, [x])
    assert counters["sonic"]["moe_rewrites"] == 0


def test_hit_name_rebound_to_another_list_is_not_rewritten():
    torch.manual_seed(0)
    model = ReboundElsewhere().eval()
    assert not any(n.rewritten for n in capture.notes_for(model))
    _compare(model, [_input(5, [0, 1, 2, 3, 3])])
    assert counters["sonic"]["moe_rewrites"] == 0


def test_last_axis_check_is_in_the_rewritten_source():
    # the reshape reads M's last axis only when E == M.shape[-1] and M[:, :, e] is that axis only
    # for a 3-D M; both are checked (static) before the range loop, and the mask must be bool to index
    from moe_inductor.dynamo import loop_capture

    text = loop_capture.analyse(Switch4x.forward).replacement._sonic_source
    assert "idx_mask.shape[0] == router_mask.shape[-1]" in text and "router_mask.dim() == 3" in text, text
    assert "torch.bool" in text and "is_floating_point" not in text  # .bool(): proved, not assumed
