"""The main job on a tiny built-in model: compile an unmodified transformers MoE model with
backend="sonic", show which blocks were rewritten, the difference from eager, and the bytes saved
for backward against plain Inductor (the tiny model, then a fine-grained layer).

    python examples/quickstart.py
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch  # noqa: E402
from transformers import MixtralConfig, MixtralForCausalLM  # noqa: E402

from moe_inductor.diagnostics.memory import saved_activation_bytes, sonic_minimum_bytes  # noqa: E402
from moe_inductor.diagnostics.report import capture_reports  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from moe_layers import block_output, olmoe_block  # noqa: E402


def saved(fn, params):
    return saved_activation_bytes(fn, exclude=params)


def main():
    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=256, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2)
    model = MixtralForCausalLM(cfg)
    ids = torch.randint(0, 256, (2, 16))
    params = list(model.parameters())

    eager_bytes, eager_out = saved(lambda: model(ids).logits, params)
    with capture_reports() as reports:
        sonic_model = torch.compile(model, backend="sonic")
        sonic_bytes, sonic_out = saved(lambda: sonic_model(ids).logits, params)
    torch._dynamo.reset()
    inductor_bytes, _ = saved(lambda: torch.compile(model, backend="inductor")(ids).logits, params)

    print("MoE blocks seen by the sonic backend (tiny Mixtral, 2 layers, E=8, K=2):")
    for report in reports:
        for c in report.candidates:
            print(f"  {c.where:40s} {c.idiom:18s} {c.status:9s} E={c.num_experts} K={c.top_k} "
                  f"d={c.hidden} n={c.intermediate} {c.reason}")
    print(f"max |sonic - eager| of the logits: {(sonic_out - eager_out).abs().max().item():.3e}")
    sonic_out.sum().backward()
    print(f"bytes saved for backward, whole model: sonic {sonic_bytes:,}  plain Inductor {inductor_bytes:,}  "
          f"eager {eager_bytes:,}")

    T, d, n, E, K = 2048, 512, 128, 64, 8
    block = olmoe_block(d, n, E, K)
    x = torch.randn(1, T, d, requires_grad=True)
    minimum = sonic_minimum_bytes(T, d, n, T * K, torch.float32)
    figures = {}
    for name, backend in (("sonic", "sonic"), ("plain Inductor", "inductor")):
        torch._dynamo.reset()
        compiled = torch.compile(block, backend=backend)
        figures[name], _ = saved(lambda: block_output(compiled(x)), list(block.parameters()))
    figures["eager"], _ = saved(lambda: block_output(block(x)), list(block.parameters()))
    print(f"fine-grained OLMoE layer (T={T}, d={d}, n={n}, E={E}, K={K}, fp32), bytes saved for backward:")
    print(f"  SonicMoE minimum (X + H + scores + indices): {minimum:,}")
    for name, b in figures.items():
        print(f"  {name:15s} {b:>12,}  ({b / minimum:.2f}x the minimum)")


if __name__ == "__main__":
    main()
