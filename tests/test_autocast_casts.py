"""Casts around the expert activation as public code writes them for mixed precision (issue 18):

- NLLB-MoE (transformers 4.x ``NllbMoeDenseActDense``): ``h = h.to(self.fc2.weight.dtype)`` before
  fc2. Under bf16 autocast that widens the bf16 activation to fp32 and the autocast GEMM narrows it
  back: the identity (``safety.autocast_round_trip``), so the block is rewritten;
- fairseq (``utils.gelu``): ``F.gelu(h.float()).type_as(h)``: the activation computed in fp32 and
  rounded to h's dtype, which is the fused op's own precision rule (``common.expert_activation``).

Each form is rewritten with output and every gradient equal to eager (fp32: 1e-4; bf16 weights or
autocast: bf16 rounding), and the near misses that compute something else are left as written: an
fp32 copy that is read elsewhere too, an fp32 down projection without autocast (eager runs fc2 in
fp32, the op would run it in bf16), and an activation rounded to another tensor's dtype."""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rewrite_check import light_backend  # noqa: E402

D, N, E, K = 16, 8, 4, 2


class Expert(nn.Module):
    def __init__(self, form):
        super().__init__()
        self.fc1, self.fc2, self.form = nn.Linear(D, N), nn.Linear(N, D), form
        self.kept = None

    def forward(self, x):
        h = self.fc1(x)
        if self.form == "fairseq":  # fairseq's gelu: math in fp32, result in h's dtype
            h = F.gelu(h.float()).type_as(h)
        elif self.form == "fairseq_other":  # near miss: rounded to another tensor's dtype (fp32 x)
            h = F.gelu(h.float()).type_as(x.float())
        else:
            h = F.relu(h)
            if h.dtype != self.fc2.weight.dtype:  # NLLB-MoE's cast before fc2
                h = h.to(self.fc2.weight.dtype)
                if self.form == "nllb_kept":  # near miss: the fp32 copy is read elsewhere too
                    self.kept = h.sum()
        return self.fc2(h)


class LoopMoE(nn.Module):
    def __init__(self, form):
        super().__init__()
        self.router = nn.Linear(D, E, bias=False)
        self.experts = nn.ModuleList(Expert(form) for _ in range(E))

    def forward(self, x):
        p = self.router(x).softmax(-1)
        w, idx = p.topk(K, -1)
        w = w / w.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        for e in range(E):
            t, k = torch.where(idx == e)
            y = self.experts[e](x[t]) * w[t, k, None]
            out.index_add_(0, t, y.to(out.dtype))
        out = out if self.experts[0].kept is None else out + 0 * sum(ex.kept for ex in self.experts
                                                                        if ex.kept is not None)
        return out


def _run(model, x, ctx):
    x = x.detach().clone().requires_grad_(True)
    with ctx():
        out = model(x)
    grads = torch.autograd.grad(out.float().pow(2).sum(), [x, *model.parameters()], allow_unused=True)
    return out, grads


def _compare(form, autocast, weights_dtype=torch.float32, mixed=False):
    """(fused blocks, max relative error) of the rewritten model against eager."""
    torch.manual_seed(0)
    model = LoopMoE(form).to(weights_dtype)
    if mixed:  # fc2 kept in fp32 (a mixed-precision model without autocast)
        for ex in model.experts:
            ex.fc2.float()
    x = torch.randn(9, D).to(weights_dtype)
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if autocast else torch.enable_grad
    ref, ref_grads = _run(model, x, ctx)
    reports = []
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=light_backend(reports), fullgraph=True)
    out, grads = _run(compiled, x, ctx)
    assert out.dtype == ref.dtype
    errs = [((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()
            for a, b in zip((out, *grads), (ref, *ref_grads)) if b is not None]
    fused = sum(1 for r in reports for c in r.candidates if c.status == "rewritten")
    return fused, max(errs)


@pytest.mark.parametrize("form,autocast,dtype,bound", [
    ("nllb", True, torch.float32, 2e-2),  # bf16 autocast: the round trip is the identity
    ("nllb", False, torch.float32, 1e-5),  # fp32: the cast is a same-dtype cast (as before)
    ("fairseq", True, torch.float32, 2e-2),
    ("fairseq", False, torch.bfloat16, 2e-2),  # a bf16 model: gelu in fp32, rounded to bf16
    ("fairseq", False, torch.float32, 1e-5),
])
def test_casts_rewritten(form, autocast, dtype, bound):
    fused, err = _compare(form, autocast, dtype)
    assert fused == 1, f"{form}: not rewritten"
    assert err <= bound, f"{form}: relative error {err:.2e}"


@pytest.mark.parametrize("form,autocast,mixed", [
    ("nllb_kept", True, False),  # the fp32 copy has another reader
    ("nllb", False, True),  # bf16 fc1, fp32 fc2, no autocast: eager's fc2 runs in fp32
    ("fairseq_other", True, False),  # activation result fp32 (another tensor's dtype), not h's
])
def test_near_misses_left_as_written(form, autocast, mixed):
    fused, err = _compare(form, autocast, torch.bfloat16 if mixed else torch.float32, mixed=mixed)
    assert fused == 0, f"{form}: rewritten although it computes something else"
    assert err == 0.0, f"{form}: the graph left as written differs from eager ({err:.2e})"
