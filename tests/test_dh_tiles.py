"""The dH kernel's full-width column blocks and its column-sliced epilogue (moe_inductor/kernels/dh.py).

The kernel computes dA' = gather(dO) W2[e] for BLOCK_N = 128 columns at once and runs the
activation backward slice by slice (SLICE_N columns, the accumulator halved by reshape / permute /
split). Interpreted (TRITON_INTERPRET=1 without a GPU) at tiny shapes, against the float64 naive
MoE of tests/test_kernels.py: every GPU config of the dH kernel with every epilogue kind (two
blocks, three blocks, clamped, non-gated), biases, both gate/up layouts, the decode row tiles
16/32/64 and token-rounded routing. n is past BLOCK_N (two column blocks, the second partial) and
d leaves a partial K step.
"""
from __future__ import annotations

import os

import pytest
import torch
import triton
import triton.language as tl

from moe_inductor.kernels import dh as dh_module
from moe_inductor.kernels.jit_utils import halves
from test_kernels import DEVICE, HAS_CUDA, make_case, poison_unread, run_and_compare

pytestmark = pytest.mark.skipif(
    not HAS_CUDA and os.environ.get("TRITON_INTERPRET") != "1",
    reason="Triton kernels need CUDA or TRITON_INTERPRET=1 (tests/conftest.py sets it without CUDA)",
)


@pytest.fixture(autouse=True)
def _nan_filled_buffers(monkeypatch):
    from moe_inductor.kernels import launch_utils

    monkeypatch.setattr(launch_utils, "DEBUG_FILL_NAN", True)


def _pin_dh_config(monkeypatch, dtype, j):
    """The j-th GPU config of the dH kernel for dtype's operand size (the others keep the
    interpreter's small config); returns it."""
    from moe_inductor.kernels import dh

    itemsize = torch.empty(0, dtype=dtype).element_size()
    cfgs = dh._DH_CONFIGS.for_itemsize(itemsize)
    cfg = cfgs[j % len(cfgs)]
    monkeypatch.setattr(dh._dh_kernel, "configs", [cfg])
    return cfg


def _check_ran(cfg):
    from moe_inductor.kernels import dh

    assert dh._dh_kernel.best_config is cfg


EPILOGUE_CASES = [
    pytest.param(dict(dtype=torch.bfloat16, act="swiglu", bias=True), id="bf16-swiglu-bias"),
    pytest.param(dict(dtype=torch.bfloat16, act="gptoss:1.702:0.5", interleaved=True, bias=True, transposed=True),
                 id="bf16-gptoss-clamped-interleaved"),
    pytest.param(dict(dtype=torch.bfloat16, act="swiglu3"), id="bf16-swiglu3"),
    pytest.param(dict(dtype=torch.bfloat16, act="gelu", bias=True), id="bf16-gelu-nongated"),
    pytest.param(dict(dtype=torch.float32, act="geglu", interleaved=True), id="fp32-geglu-interleaved"),
    pytest.param(dict(dtype=torch.float32, act="relu", bias=True, transposed=True), id="fp32-relu-nongated"),
]


def _with_every_config(cases):
    """(kwargs, j) for every case and every GPU config j of its dtype's dH list."""
    out = []
    for p in cases:
        kwargs = p.values[0]
        itemsize = torch.empty(0, dtype=kwargs["dtype"]).element_size()
        for j in range(len(dh_module._DH_CONFIGS.for_itemsize(itemsize))):
            out.append(pytest.param(kwargs, j, id=f"{p.id}-cfg{j}"))
    return out


@pytest.mark.parametrize("kwargs,j", _with_every_config(EPILOGUE_CASES))
def test_dh_gpu_configs_every_epilogue(kwargs, j, monkeypatch):
    cfg = _pin_dh_config(monkeypatch, kwargs["dtype"], j)
    n = cfg.kwargs["BLOCK_N"] + 8  # two column blocks: the second has 8 of BLOCK_N columns
    run_and_compare(make_case(T=5, E=3, K=2, d=40, n=n, **kwargs))
    _check_ran(cfg)


@pytest.mark.parametrize("tile_m", [16, 32, 64])
def test_dh_gpu_config_at_decode_row_tiles(tile_m, monkeypatch):
    """The kernels' smaller row tiles (config.kernel_tile_m) with the widest dH block."""
    from moe_inductor.kernels import config

    monkeypatch.setattr(config, "kernel_tile_m", lambda num_assignments, num_experts: tile_m)
    cfg = _pin_dh_config(monkeypatch, torch.bfloat16, 0)
    run_and_compare(make_case(T=40, E=3, K=2, d=24, n=cfg.kwargs["BLOCK_N"] + 8, dtype=torch.bfloat16,
                              act="swiglu_limit:7.0", bias=True))
    _check_ran(cfg)


def test_dh_gpu_config_token_rounded_routing(monkeypatch):
    """Token-rounded assignments (static shape: expert -1 padding rows, dropped-row tiles whose dS
    partials must be zero for every one of the block's PART_N slots)."""
    from moe_inductor.kernels import config
    from moe_inductor.ops.routing import token_rounding_routing

    monkeypatch.setattr(config, "kernel_tile_m", lambda num_assignments, num_experts: 16)
    cfg = _pin_dh_config(monkeypatch, torch.bfloat16, 0)
    T, E, K, tile = 24, 3, 2, 16
    c = make_case(T=T, E=E, K=K, d=24, n=cfg.kwargs["BLOCK_N"] + 8, dtype=torch.bfloat16, poison=False)
    probs = torch.randn(T, E, generator=torch.Generator().manual_seed(3)).softmax(-1)
    r = token_rounding_routing(probs, K, tile, "up", static_shape=True)
    assert (r.expert_ids < 0).any(), "the case should hold padding (dropped) rows"
    c.token_ids, c.expert_ids = r.token_ids.to(DEVICE), r.expert_ids.to(DEVICE)
    c.scores = r.scores.to(DEVICE, torch.float32)
    poison_unread(r.token_ids, r.expert_ids, c.x, c.grad_out, c.w1, c.w2)
    run_and_compare(c)
    _check_ran(cfg)


@triton.jit
def _halves_kernel(x_ptr, lo_ptr, hi_ptr, M: tl.constexpr, W: tl.constexpr):
    r = tl.arange(0, M)[:, None]
    x = tl.load(x_ptr + r * W + tl.arange(0, W)[None, :])
    lo, hi = halves(x, M, W)
    c = tl.arange(0, W // 2)[None, :]
    tl.store(lo_ptr + r * (W // 2) + c, lo)
    tl.store(hi_ptr + r * (W // 2) + c, hi)


def test_halves_splits_a_register_tile_into_its_column_halves():
    """jit_utils.halves(x) == (x[:, :W/2], x[:, W/2:]) exactly, the building block of the sliced epilogue."""
    x = torch.arange(16 * 64, dtype=torch.float32, device=DEVICE).reshape(16, 64)
    lo, hi = torch.empty(16, 32, device=DEVICE), torch.empty(16, 32, device=DEVICE)
    _halves_kernel[(1,)](x, lo, hi, M=16, W=64)
    assert torch.equal(lo, x[:, :32]) and torch.equal(hi, x[:, 32:])
