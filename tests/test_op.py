"""The fused op against the obviously-correct reference: outputs, every gradient, edge cases,
opcheck, input errors and the memory-lean saved set."""
import pytest
import torch

from moe_inductor.diagnostics.memory import saved_activation_bytes, sonic_minimum_bytes
from moe_inductor.ops.op import fused_moe
from moe_inductor.ops.reference import naive_moe


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
             b1.requires_grad_(), b2.requires_grad_()),
            dict(activation="swiglu", recompute_h=recompute, impl="torch"),
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


# --------------------------------------------------------------------------- per-expert weight lists

from moe_inductor.ops.op import fused_moe_experts  # noqa: E402


def expert_lists(w1, w2, b1, b2, split_up):
    """Per-expert lists from stacked weights (leaves of their own, like nn.Linear parameters)."""
    E, rows, _ = w1.shape
    leaf = lambda t: t.detach().clone().requires_grad_()  # noqa: E731
    gate = [leaf(w1[e, : rows // 2] if split_up else w1[e]) for e in range(E)]
    up = [leaf(w1[e, rows // 2:]) for e in range(E)] if split_up else []
    bg = [leaf(b1[e, : rows // 2] if split_up else b1[e]) for e in range(E)] if b1 is not None else []
    bu = [leaf(b1[e, rows // 2:]) for e in range(E)] if b1 is not None and split_up else []
    return dict(w_gate=gate, w_up=up, w_down=[leaf(w) for w in w2], b_gate=bg, b_up=bu,
                b_down=[leaf(b) for b in b2] if b2 is not None else [])


@pytest.mark.parametrize("activation,split_up,bias,recompute_h", [
    ("swiglu", True, False, False),   # nn.Linear gate and up per expert (Mixtral loops)
    ("swiglu", True, True, True),     # biased gate/up/down, H recomputed
    ("geglu", False, False, False),   # one (2n, d) weight per expert holding gate then up
    ("gelu", False, True, False),     # non-gated, biased (Switch Transformers 4.x)
])
def test_expert_lists_match_stacked(activation, split_up, bias, recompute_h):
    gated = activation in ("swiglu", "geglu")
    x, tok, ex, s, w1, w2, b1, b2 = make(29, 16, 8, 5, 2, dtype=torch.float64, gated=gated, bias=bias)
    lists = expert_lists(w1, w2, b1, b2, split_up)
    xs, ss = x.clone().requires_grad_(), s.clone().requires_grad_()
    out = fused_moe_experts(xs, tok, ex, ss, lists["w_gate"], lists["w_down"], w_up=lists["w_up"],
                            b_gate=lists["b_gate"], b_up=lists["b_up"], b_down=lists["b_down"],
                            activation=activation, recompute_h=recompute_h)
    leaves = [xs, ss] + [t for k in ("w_gate", "w_up", "w_down", "b_gate", "b_up", "b_down") for t in lists[k]]
    gout = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, gout)
    # the reference: naive loop on the stacked weights, differentiated by autograd
    ref = naive_moe(xs, tok, ex, ss, w1.requires_grad_(), w2.requires_grad_(), b1, b2, activation)
    torch.testing.assert_close(out, ref)
    rx, rs, rw1, rw2 = torch.autograd.grad(ref, [xs, ss, w1, w2], gout)
    torch.testing.assert_close(grads[0], rx)
    torch.testing.assert_close(grads[1], rs)
    E, rows = w1.shape[:2]
    got_w1 = torch.stack([torch.cat([g, u]) for g, u in zip(*[grads[2:2 + E], grads[2 + E:2 + 2 * E]])]) \
        if split_up else torch.stack(grads[2:2 + E])
    torch.testing.assert_close(got_w1, rw1)
    k = 2 + E * (2 if split_up else 1)
    torch.testing.assert_close(torch.stack(grads[k:k + E]), rw2)
    if bias:
        _, _, rb1, rb2 = torch.autograd.grad(
            naive_moe(x, tok, ex, s, w1, w2, b1.requires_grad_(), b2.requires_grad_(), activation),
            [w1, w2, b1, b2], gout)
        nb = E * (2 if split_up else 1)
        got_b1 = grads[k + E:k + E + nb]
        got_b1 = (torch.stack([torch.cat([g, u]) for g, u in zip(got_b1[:E], got_b1[E:])]) if split_up
                  else torch.stack(got_b1))
        torch.testing.assert_close(got_b1, rb1)
        torch.testing.assert_close(torch.stack(grads[k + E + nb:]), rb2)


@pytest.mark.parametrize("recompute_h", [False, True])
def test_expert_lists_interleaved_match_naive(recompute_h):
    """GPT-OSS's layout per expert (w_gate[e] (2n, d), gate on even rows, up on odd, clamped gate):
    ``interleaved=True`` gives the naive loop's output and gradients; without it the halves would be
    read one after the other, a different function (checked, so the flag is what makes it right)."""
    act = "gptoss:1.702:0.5"
    x, tok, ex, s, w1, w2, b1, b2 = make(23, 16, 8, 4, 2, dtype=torch.float64, gated=True, bias=True)
    lists = expert_lists(w1, w2, b1, b2, split_up=False)
    xs, ss = x.clone().requires_grad_(), s.clone().requires_grad_()
    out = fused_moe_experts(xs, tok, ex, ss, lists["w_gate"], lists["w_down"], b_gate=lists["b_gate"],
                            b_down=lists["b_down"], activation=act, recompute_h=recompute_h, interleaved=True)
    leaves = [xs, ss] + lists["w_gate"] + lists["w_down"] + lists["b_gate"] + lists["b_down"]
    gout = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, gout)
    w1r, w2r, b1r, b2r = (t.clone().requires_grad_() for t in (w1, w2, b1, b2))
    ref = naive_moe(xs, tok, ex, ss, w1r, w2r, b1r, b2r, act, True)
    torch.testing.assert_close(out, ref)
    E = w1.shape[0]
    want = torch.autograd.grad(ref, [xs, ss, w1r, w2r, b1r, b2r], gout)
    got = [grads[0], grads[1]] + [torch.stack(grads[2 + i * E:2 + (i + 1) * E]) for i in range(4)]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    other = naive_moe(x, tok, ex, s, w1, w2, b1, b2, act, False)
    assert not torch.allclose(other, ref.detach())
    with pytest.raises(ValueError, match="interleaved=True needs"):
        fused_moe_experts(x, tok, ex, s, [w[:8] for w in lists["w_gate"]], lists["w_down"],
                          w_up=[w[8:] for w in lists["w_gate"]], activation=act, interleaved=True)


def test_expert_lists_save_no_weight_copy():
    """The op stacks the lists inside (transiently): backward keeps the parameters, not a copy."""
    T, d, n, E, K = 256, 64, 32, 16, 4
    x, tok, ex, s, w1, w2, _, _ = make(T, d, n, E, K)
    lists = expert_lists(w1, w2, None, None, split_up=True)
    params = lists["w_gate"] + lists["w_up"] + lists["w_down"]
    x.requires_grad_(); s.requires_grad_()
    nbytes, out = saved_activation_bytes(
        lambda: fused_moe_experts(x, tok, ex, s, lists["w_gate"], lists["w_down"], w_up=lists["w_up"]), exclude=params)
    minimum = sonic_minimum_bytes(T, d, n, T * K, torch.float32)
    assert minimum <= nbytes <= 1.1 * minimum
    out.sum().backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in params)


def test_expert_lists_opcheck():
    x, tok, ex, s, w1, w2, b1, b2 = make(12, 8, 4, 3, 2, bias=True)
    lists = expert_lists(w1, w2, b1, b2, split_up=True)
    for recompute in (False, True):
        torch.library.opcheck(
            torch.ops.moe_inductor.fused_moe_experts.default,
            (x.requires_grad_(), tok, ex, s.requires_grad_(), lists["w_gate"], lists["w_down"], lists["w_up"],
             lists["b_gate"], lists["b_up"], lists["b_down"]), dict(activation="swiglu", recompute_h=recompute, impl="torch"))
    fused = expert_lists(w1, w2, b1, b2, split_up=False)  # GPT-OSS's interleaved (2n, d) per expert
    torch.library.opcheck(
        torch.ops.moe_inductor.fused_moe_experts.default,
        (x, tok, ex, s, fused["w_gate"], fused["w_down"], [], fused["b_gate"], [], fused["b_down"]),
        dict(activation="gptoss:1.702:7.0", impl="torch", interleaved=True))


@pytest.mark.parametrize("change,err", [
    (lambda a: a.update(w_down=a["w_down"][:-1]), "inconsistent expert lists"),
    (lambda a: a.update(w_up=a["w_up"][:-1]), "inconsistent expert lists"),
    (lambda a: a.update(w_gate=[a["w_gate"][0][:-1]] + a["w_gate"][1:]), "w_gate entries differ"),
    (lambda a: a.update(w_up=[w.double() for w in a["w_up"]]), "dtype"),
    (lambda a: a.update(b_down=[torch.zeros(8)]), "inconsistent bias lists"),
    (lambda a: a.update(w_gate=[]), "w_gate is empty"),
    (lambda a: a.update(activation="gelu"), "w_up given for a non-gated activation"),
])
def test_expert_lists_clear_errors(change, err):
    x, tok, ex, s, w1, w2, _, _ = make(8, 8, 4, 4, 2)
    a = expert_lists(w1, w2, None, None, split_up=True)
    a["activation"] = "swiglu"
    change(a)
    with pytest.raises((ValueError, TypeError), match=err):
        fused_moe_experts(x, tok, ex, s, a.pop("w_gate"), a.pop("w_down"), **a)


# --------------------------------------------------------------------------- autocast and compute_dtype

def test_autocast_follows_the_named_gemm():
    x, tok, ex, s, w1, w2, _, _ = make(32, 16, 8, 4, 2)
    plain = fused_moe(x, tok, ex, s, w1, w2)
    in_bf16 = fused_moe(x, tok, ex, s, w1, w2, compute_dtype=torch.bfloat16)
    assert in_bf16.dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        # mm/linear/bmm are on autocast's list: the op computes in bf16, exactly as with compute_dtype
        torch.testing.assert_close(fused_moe(x, tok, ex, s, w1, w2), in_bf16, atol=0, rtol=0)
        for like in ("aten::linear", "aten::bmm"):
            torch.testing.assert_close(fused_moe(x, tok, ex, s, w1, w2, autocast_like=like), in_bf16, atol=0, rtol=0)
        # a GEMM without an autocast rule (or none named): eager leaves it in fp32, so does the op
        for like in ("", "transformers::grouped_mm_fallback", "nosuch::op"):
            torch.testing.assert_close(fused_moe(x, tok, ex, s, w1, w2, autocast_like=like), plain, atol=0, rtol=0)
        lists = expert_lists(w1, w2, None, None, split_up=True)
        got = fused_moe_experts(x, tok, ex, s, lists["w_gate"], lists["w_down"], w_up=lists["w_up"])
        torch.testing.assert_close(got, in_bf16, atol=0, rtol=0)
        # float64 is not autocast-eligible
        x64, _, _, s64, w164, w264, _, _ = make(32, 16, 8, 4, 2, dtype=torch.float64)
        assert fused_moe(x64, tok, ex, s64, w164, w264).dtype == torch.float64
    with torch.autocast("cpu", dtype=torch.float16):
        assert fused_moe(x, tok, ex, s, w1, w2).dtype == torch.float16
    # bf16 against the obviously-correct loop run in bf16
    ref = naive_moe(x.bfloat16(), tok, ex, s, w1.bfloat16(), w2.bfloat16())
    torch.testing.assert_close(in_bf16.float(), ref.float(), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("lists", [False, True])
def test_compute_dtype_keeps_no_weight_copy(lists):
    """Under autocast (or compute_dtype) the fp32 weights are cast inside the op, in forward and again
    in backward: x and H are kept in bf16 and no bf16 weight copy is kept; gradients are fp32."""
    T, d, n, E, K = 256, 64, 32, 16, 4
    x, tok, ex, s, w1, w2, _, _ = make(T, d, n, E, K)
    x.requires_grad_(); s.requires_grad_()
    if lists:
        a = expert_lists(w1, w2, None, None, split_up=True)
        params = a["w_gate"] + a["w_up"] + a["w_down"]
        fn = lambda: fused_moe_experts(x, tok, ex, s, a["w_gate"], a["w_down"], w_up=a["w_up"])  # noqa: E731
    else:
        params = [w1.requires_grad_(), w2.requires_grad_()]
        fn = lambda: fused_moe(x, tok, ex, s, w1, w2)  # noqa: E731
    with torch.autocast("cpu", dtype=torch.bfloat16):
        nbytes, out = saved_activation_bytes(fn, exclude=params)
    minimum = sonic_minimum_bytes(T, d, n, T * K, torch.bfloat16)
    assert out.dtype == torch.bfloat16
    assert minimum <= nbytes <= 1.1 * minimum, nbytes / minimum
    grads = torch.autograd.grad(out, [x, s] + params, torch.randn_like(out))
    assert all(g.dtype == torch.float32 for g in grads)
    # the same values as the stacked weights cast to bf16 beforehand
    w1b, w2b = w1.detach().bfloat16().requires_grad_(), w2.detach().bfloat16().requires_grad_()
    xb = x.detach().bfloat16().requires_grad_()
    ref = fused_moe(xb, tok, ex, s, w1b, w2b)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)


def test_compute_dtype_errors():
    x, tok, ex, s, w1, w2, _, _ = make(8, 8, 4, 4, 2)
    with pytest.raises(TypeError, match="compute_dtype"):
        torch.ops.moe_inductor.fused_moe(x, tok, ex, s, w1, w2, compute_dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="w1 has dtype"):
        fused_moe(x, tok, ex, s, w1.bfloat16(), w2)
