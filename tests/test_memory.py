"""Activation memory (bytes saved for backward; device-independent) of a fine-grained MoE layer
(transformers' grouped_mm experts) and of a per-expert loop of nn.Linear experts: the
sonic-compiled block keeps at most 1.1x SonicMoE's minimum (X + H + scores + indices)."""
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from moe_layers import block_output, olmoe_block  # noqa: E402

from moe_inductor.diagnostics.memory import saved_activation_bytes, sonic_minimum_bytes  # noqa: E402


def saved_bytes(block, x, backend, options=None):
    torch._dynamo.reset()
    compiled = torch.compile(block, backend=backend, options=options) if options else torch.compile(block, backend=backend)
    nbytes, _ = saved_activation_bytes(lambda: block_output(compiled(x)), exclude=list(block.parameters()))
    return nbytes


def test_fine_grained_layer_saves_sonic_minimum():
    T, d, n, E, K = 2048, 512, 128, 64, 8
    block = olmoe_block(d, n, E, K)
    x = torch.randn(1, T, d, requires_grad=True)
    minimum = sonic_minimum_bytes(T, d, n, T * K, torch.float32)
    sonic = saved_bytes(block, x, "sonic")
    inductor = saved_bytes(block, x, "inductor")
    print(f"saved for backward: sonic {sonic / minimum:.2f}x, plain inductor {inductor / minimum:.2f}x of the minimum")
    assert sonic <= 1.1 * minimum
    assert sonic < inductor
    lean = saved_bytes(block, x, "sonic", {"recompute_h": True})
    # recompute_h keeps no H: X and routing only (router logits and top-k outputs included)
    assert lean < 0.4 * minimum


def test_expert_loop_saves_sonic_minimum():
    """The per-expert loop idiom (nn.Linear experts): its rewrite hands the experts' own weights to the
    fused op as lists, so no stacked weight copy is kept for backward (issue 11, item 4)."""
    from moe_modules import LoopMoE

    T, d, n, E, K = 256, 64, 128, 4, 2
    torch.manual_seed(0)
    block = LoopMoE(d=d, n=n, E=E, K=K)
    x = torch.randn(1, T, d, requires_grad=True)
    minimum = sonic_minimum_bytes(T, d, n, T * K, torch.float32)
    sonic = saved_bytes(block, x, "sonic")
    print(f"saved for backward: expert loop, sonic {sonic / minimum:.2f}x of the minimum")
    assert sonic <= 1.1 * minimum
