"""The fused op against the obviously-correct reference: outputs, every gradient, edge cases,
opcheck, input errors and the memory-lean saved set."""
import pytest
import torch

from moe_inductor.memory import saved_activation_bytes, sonic_minimum_bytes
from moe_inductor.op import fused_moe
from moe_inductor.reference import naive_moe


def make(T, d, n, E, K, dtype=torch.float32, gated=True, bias=False, seed=0, logits_bias=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d, generator=g, dtype=dtype)
    w1 = torch.randn(E, (2 if gated else 1) * n, d, generator=g, dtype=dtype) / d**0.5
    w2 = torch.randn(E, d, n, generator=g, dtype=dtype) / n**0.5
    logits = torch.randn(T, E, generator=g)
    if logits_bias is not None:
        logits = logits + logits_bias
    v, i = logits.softmax(-1).topk(K)
    token_ids = torch.arange(T).repeat_interleave(K).int()
    b1 = torch.randn(E, w1.shape[1], generator=g, dtype=dtype) if bias else None
    b2 = torch.randn(E, d, generator=g, dtype=dtype) if bias else None
    return x, token_ids, i.flatten().int(), v.flatten().to(dtype), w1, w2, b1, b2


def grads_both(args, activation="swiglu", interleaved=False, recompute_h=False):
    x, tok, ex, s, w1, w2, b1, b2 = args
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, s, w1, w2, b1, b2)]
    diff = [t for t in leaves if t is not None]
    lx, ls, lw1, lw2, lb1, lb2 = leaves
    out = fused_moe(lx, tok, ex, ls, lw1, lw2, b1=lb1, b2=lb2, activation=activation,
                    interleaved=interleaved, recompute_h=recompute_h)
    gout = torch.randn_like(out)
    g1 = torch.autograd.grad(out, diff, gout)
    ref = naive_moe(lx, tok, ex, ls, lw1, lw2, lb1, lb2, activation, interleaved)
    g2 = torch.autograd.grad(ref, diff, gout)
    return out, ref, g1, g2


@pytest.mark.parametrize("activation,gated,interleaved,bias,recompute_h", [
    ("swiglu", True, False, False, False),          # Mixtral/Qwen default layout
    ("swiglu", True, True, False, False),           # interleaved gate/up
    ("geglu", True, False, False, True),            # GeGLU, H recomputed in backward
    ("geglu_tanh", True, False, True, False),       # tanh GeGLU with biases
    ("gptoss:1.702:7.0", True, True, True, False),  # GPT-OSS clamped gate, interleaved, biased
    ("gelu", False, False, False, False),           # non-gated expert
    ("relu", False, False, True, True),             # non-gated, biased, recomputed H
])
def test_matches_reference_fp64(activation, gated, interleaved, bias, recompute_h):
    args = make(37, 16, 8, 5, 2, dtype=torch.float64, gated=gated, bias=bias)
    out, ref, g1, g2 = grads_both(args, activation, interleaved, recompute_h)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("dtype,atol", [
    (torch.float32, 1e-5),   # fp32 accumulation everywhere
    (torch.bfloat16, 3e-2),  # bf16 GEMM operands; loose bound as in SonicMoE's tests
])
def test_dtypes(dtype, atol):
    args = make(64, 32, 16, 8, 2, dtype=dtype)
    out, ref, g1, g2 = grads_both(args)
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=atol)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a.float(), b.float(), atol=atol * 4, rtol=atol * 4)


@pytest.mark.parametrize("T,E,K,bias", [
    (1, 4, 2, None),                                      # a single token
    (16, 4, 4, None),                                     # K = E: every expert on every token
    (32, 6, 2, torch.tensor([9.0, 9.0, -9, -9, -9, -9])),  # experts 2..5 get no tokens
    (32, 4, 1, torch.tensor([20.0, -20, -20, -20])),      # all tokens on one expert
])
def test_edge_cases(T, E, K, bias):
    args = make(T, 8, 4, E, K, dtype=torch.float64, logits_bias=bias)
    out, ref, g1, g2 = grads_both(args)
    torch.testing.assert_close(out, ref)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


def test_general_routing_assignments():
    # not a T x K table: token 0 has three experts, token 1 none, token 2 one
    x, _, _, _, w1, w2, _, _ = make(4, 8, 4, 4, 1, dtype=torch.float64)
    tok = torch.tensor([0, 0, 0, 2, 3], dtype=torch.int32)
    ex = torch.tensor([0, 1, 3, 3, 2], dtype=torch.int32)
    s = torch.tensor([0.5, 0.25, 0.25, 1.0, 0.7], dtype=torch.float64)
    out, ref, g1, g2 = grads_both((x, tok, ex, s, w1, w2, None, None))
    torch.testing.assert_close(out, ref)
    assert torch.all(out[1] == 0)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


def test_opcheck():
    x, tok, ex, s, w1, w2, b1, b2 = make(12, 8, 4, 4, 2, bias=True)
    for recompute in (False, True):
        torch.library.opcheck(
            torch.ops.moe_inductor.fused_moe.default,
            (x.requires_grad_(), tok, ex, s.requires_grad_(), w1.requires_grad_(), w2.requires_grad_(),
             b1.requires_grad_(), b2.requires_grad_(), "swiglu", False, recompute, "torch"),
        )


@pytest.mark.parametrize("change,err", [
    (lambda a: a.update(x=a["x"].int()), "unsupported dtype"),
    (lambda a: a.update(scores=a["scores"][:-1]), "inconsistent routing"),
    (lambda a: a.update(expert_ids=a["expert_ids"] + 10), "expert_ids outside"),
    (lambda a: a.update(token_ids=a["token_ids"] - 1), "token_ids outside"),
    (lambda a: a.update(expert_ids=a["expert_ids"].float()), "int32 or int64"),
    (lambda a: a.update(w2=a["w2"][:, :, :-1]), "inconsistent expert weights"),
    (lambda a: a.update(w1=a["w1"].double()), "w1 has dtype"),
    (lambda a: a.update(activation="swish"), "unknown activation"),
    (lambda a: a.update(impl="cuda"), "unknown impl"),
])
def test_clear_errors(change, err):
    x, tok, ex, s, w1, w2, _, _ = make(8, 8, 4, 4, 2)
    a = dict(x=x, token_ids=tok, expert_ids=ex, scores=s, w1=w1, w2=w2, activation="swiglu", impl="auto")
    change(a)
    with pytest.raises((ValueError, TypeError), match=err):
        fused_moe(a.pop("x"), a.pop("token_ids"), a.pop("expert_ids"), a.pop("scores"), a.pop("w1"), a.pop("w2"), **a)


@pytest.mark.parametrize("recompute_h", [False, True])
def test_saved_set_is_sonic_minimum(recompute_h):
    T, d, n, E, K = 256, 64, 32, 16, 4
    x, tok, ex, s, w1, w2, _, _ = make(T, d, n, E, K)
    x.requires_grad_(); s.requires_grad_(); w1.requires_grad_(); w2.requires_grad_()
    nbytes, out = saved_activation_bytes(
        lambda: fused_moe(x, tok, ex, s, w1, w2, recompute_h=recompute_h), exclude=[w1, w2])
    A = T * K
    minimum = sonic_minimum_bytes(T, d, n, A, torch.float32)
    if recompute_h:
        # only X and the routing (+ the int32 sort order)
        assert nbytes <= T * d * 4 + A * 4 * 4
    else:
        # X + H + scores + token/expert ids, plus the int32 sort order (A * 4 bytes)
        assert minimum <= nbytes <= 1.1 * minimum
