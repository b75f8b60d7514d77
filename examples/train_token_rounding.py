"""Train a tiny Mixtral-style MoE language model with plain top-k routing and with SonicMoE token
rounding, same seed and same data order, and compare the loss curves.

Data: byte-level language modelling on Python's own documentation text,
``pydoc_data/topics.py`` (about 0.75 MB of English, installed with every CPython): no download.
The first 90% of the bytes is the training split, the last 10% the held-out validation split.

Model: ``transformers.MixtralConfig`` built from scratch (random init, no hub access):
vocab 256 (bytes), hidden 128, 2 layers, 16 experts of intermediate 256, top-2; about 3.4M params.

How token rounding is applied. The intended user path is
``torch.compile(model, backend="sonic", options={"token_rounding": mode, "tile_m": M})``.
The script first probes whether ``moe_inductor.compile.backend`` both accepts that option (it raises
ValueError on unknown options) and actually applies it: a tiny MoE block compiled with
``token_rounding="down"`` and a tile larger than every expert's count must return all zeros
(every expert rounds down to 0 tokens). If the probe passes, both runs are compiled with the
backend (``token_rounding="off"`` for the top-k run). Otherwise both runs use the explicit eager
path of this script, ``replace_moe_blocks_with_fused_routing``: every ``MixtralSparseMoeBlock``
is wrapped so that routing comes from ``moe_inductor.ops.routing`` (``topk_routing`` or
``token_rounding_routing``) and the experts run as one ``moe_inductor.ops.op.fused_moe`` call.
Either way the two runs differ only in the routing. Which path ran is printed and recorded.

Validation loss is computed in eval mode, where both models route with plain top-k (token
rounding is a training-time device, as in SonicMoE; the backend's default
``token_rounding_in_eval=False`` does the same). On the eager path the rounding run also records
its validation loss with token rounding applied.

Usage (defaults: 300 steps per run, ~10 minutes in all on 2 otherwise idle CPU cores):
  PYTHONPATH=. python examples/train_token_rounding.py [--steps 300] [--mode nearest] [--tile-m 32]
Writes examples/results/token_rounding_cpu.json and .png.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from moe_inductor.ops.op import fused_moe  # noqa: E402
from moe_inductor.ops.routing import padding_waste, token_rounding_routing, topk_routing  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


@dataclass(frozen=True)
class Config:
    steps: int = 300
    batch_size: int = 4
    seq_len: int = 128  # T = 4 * 128 = 512 tokens per MoE call
    hidden: int = 128
    intermediate: int = 256
    # 2 layers: on the shared 2-core machine a step of 4 layers took 1-4 s (others' jobs).
    layers: int = 2
    experts: int = 16
    top_k: int = 2
    # M = 32: with T*K = 1024 picks over 16 experts, f_e is ~64, so f_e / M ~ 2, the same ratio
    # as the production shape T=8192, E=256, K=8 with TILE_M=128 (256 / 128). The real tile
    # (128) would round a tiny model's experts to 0 or 128 tokens: a different regime.
    tile_m: int = 32
    mode: str = "nearest"
    lr: float = 3e-3
    warmup: int = 30
    eval_every: int = 50
    eval_batches: int = 16
    seed: int = 0
    threads: int = 2


# ---------------------------------------------------------------------------------------- data

def load_bytes() -> torch.Tensor:
    import pydoc_data.topics as topics_module

    with open(topics_module.__file__, "rb") as fh:
        return torch.frombuffer(bytearray(fh.read()), dtype=torch.uint8).long()


def make_batches(data: torch.Tensor, n: int, cfg: Config, seed: int) -> list[torch.Tensor]:
    """n batches of (B, L+1) windows at seeded random offsets: the same list feeds both runs."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, data.numel() - cfg.seq_len - 1, (n, cfg.batch_size), generator=g)
    idx = starts[..., None] + torch.arange(cfg.seq_len + 1)
    return list(data[idx])


# ---------------------------------------------------------------------------------------- model

def build_model(cfg: Config) -> nn.Module:
    from transformers import MixtralConfig, MixtralForCausalLM

    mcfg = MixtralConfig(
        vocab_size=256, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers, num_attention_heads=4, num_key_value_heads=4,
        num_local_experts=cfg.experts, num_experts_per_tok=cfg.top_k, max_position_embeddings=cfg.seq_len,
        hidden_act="silu", router_jitter_noise=0.0, output_router_logits=False, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    mcfg._attn_implementation = "sdpa"
    torch.manual_seed(cfg.seed)  # identical initial weights for both runs
    return MixtralForCausalLM(mcfg)


class FusedRoutingMoEBlock(nn.Module):
    """Drop-in for ``MixtralSparseMoeBlock``: same parameters (``gate``, ``experts``), routing from
    ``moe_inductor.ops.routing`` and the expert MLP as one ``fused_moe`` call.

    Mixtral's experts store ``gate_up_proj (E, 2n, d)`` with gate rows first, then up rows (its
    forward does ``linear(x, gate_up_proj[e]).chunk(2)``), and ``down_proj (E, d, n)``: exactly
    fused_moe's w1 / w2 with activation "swiglu", interleaved=False. Mixtral renormalises the top-k
    weights, hence ``renormalize=True``.
    """

    def __init__(self, block: nn.Module, mode: str, tile_m: int):
        super().__init__()
        self.gate = block.gate
        self.experts = block.experts
        self.top_k = block.top_k
        self.mode = mode  # "off" = plain top-k
        self.tile_m = tile_m
        self.round_in_eval = False
        self.last_counts = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        B, L, d = hidden_states.shape
        x = hidden_states.reshape(-1, d)
        router_logits, _, _ = self.gate(x)  # via the module, so hooks and recorders still see it
        probs = router_logits.float().softmax(-1)
        if self.mode != "off" and (self.training or self.round_in_eval):
            routing = token_rounding_routing(probs, self.top_k, self.tile_m, self.mode, renormalize=True)
        else:
            routing = topk_routing(probs, self.top_k, renormalize=True)
        self.last_counts = routing.counts.detach()
        out = fused_moe(x, routing.token_ids, routing.expert_ids, routing.scores.to(x.dtype),
                        self.experts.gate_up_proj, self.experts.down_proj, activation="swiglu",
                        interleaved=False)
        return out.reshape(B, L, d)


def replace_moe_blocks_with_fused_routing(model: nn.Module, mode: str, tile_m: int) -> list[FusedRoutingMoEBlock]:
    """The eager fallback path: wrap every decoder layer's MoE block (see FusedRoutingMoEBlock)."""
    blocks = []
    for layer in model.model.layers:
        layer.mlp = FusedRoutingMoEBlock(layer.mlp, mode, tile_m)
        blocks.append(layer.mlp)
    return blocks


def check_fused_block_matches_mixtral(cfg: Config) -> float:
    """Max |difference| between Mixtral's own MoE block and the wrapper with top-k routing."""
    model = build_model(cfg)
    block = model.model.layers[0].mlp
    x = torch.randn(2, 16, cfg.hidden, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = block(x)
        got = FusedRoutingMoEBlock(block, "off", cfg.tile_m)(x)
    err = (want - got).abs().max().item()
    if err > 1e-4:
        raise RuntimeError(f"fused MoE block differs from Mixtral's by {err:.2e}: weight layout changed?")
    return err


# ------------------------------------------------------------------------------ backend probe

def sonic_backend():
    """The sonic backend as torch.compile takes it: its registered name when the package is
    installed (entry point), else the function itself (running from a checkout)."""
    import moe_inductor.compile.backend as backend_module

    if "sonic" in torch._dynamo.list_backends(exclude_tags=()):
        return "sonic"
    return backend_module.sonic


def probe_backend_token_rounding(cfg: Config) -> tuple[bool, str]:
    """(True, "") if the backend accepts *and applies* token rounding, else (False, why)."""
    try:
        backend = sonic_backend()
    except Exception as e:  # not written yet, or broken mid-edit by a concurrent change
        return False, f"moe_inductor.compile.backend not importable: {type(e).__name__}: {e}"
    small = Config(**{**asdict(cfg), "layers": 1})
    block = build_model(small).model.layers[0].mlp
    block.train()
    x = torch.randn(1, 16, cfg.hidden, generator=torch.Generator().manual_seed(2))
    # 16 tokens, tile 64, "down": every f_e <= 16 < 64 rounds to 0, so all experts are dropped
    # and a backend that applies token rounding must return exactly zeros.
    try:
        torch._dynamo.reset()
        compiled = torch.compile(block, backend=backend, options={"token_rounding": "down", "tile_m": 64})
        with torch.no_grad():
            out = compiled(x)
    except Exception as e:
        text = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        return False, f"compiling with token_rounding failed: {text}"
    finally:
        torch._dynamo.reset()
    if out.abs().max().item() != 0.0:
        return False, ("backend accepts the token_rounding option but the probe output is not "
                       "zero, so the rounding is not applied (yet)")
    return True, ""


# ---------------------------------------------------------------------------------- training

def lr_at(step: int, cfg: Config) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def lm_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return model(input_ids=batch[:, :-1], labels=batch[:, 1:].clone(), use_cache=False).loss


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[torch.Tensor]) -> float:
    was_training = model.training
    model.eval()
    loss = sum(float(lm_loss(model, b)) for b in batches) / len(batches)
    model.train(was_training)
    return loss


def train_one(cfg: Config, routing_mode: str, path: str, train_batches, val_batches, log) -> dict:
    """routing_mode "off" (plain top-k) or a rounding mode; path "backend" or "eager"."""
    model = build_model(cfg)
    blocks = []
    if path == "eager":
        blocks = replace_moe_blocks_with_fused_routing(model, routing_mode, cfg.tile_m)
        forward_model = model
    else:
        torch._dynamo.reset()
        forward_model = torch.compile(model, backend=sonic_backend(),
                                      options={"token_rounding": routing_mode, "tile_m": cfg.tile_m})
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.1)
    curve = {"train_step": [], "train_loss": [], "val_step": [], "val_loss": [], "val_loss_rounded": [],
             "padding_waste": []}

    def run_eval(step):
        curve["val_step"].append(step)
        curve["val_loss"].append(evaluate(forward_model, val_batches))
        if blocks and routing_mode != "off":
            for b in blocks:
                b.round_in_eval = True
            curve["val_loss_rounded"].append(evaluate(forward_model, val_batches))
            for b in blocks:
                b.round_in_eval = False
        log(f"  [{routing_mode}] step {step:4d} val {curve['val_loss'][-1]:.4f}"
            + (f" (rounded {curve['val_loss_rounded'][-1]:.4f})" if curve["val_loss_rounded"] else ""))

    model.train()
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        if step % cfg.eval_every == 0:
            run_eval(step)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        loss = lm_loss(forward_model, train_batches[step])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        curve["train_step"].append(step)
        curve["train_loss"].append(float(loss.detach()))
        if blocks:
            curve["padding_waste"].append(
                sum(padding_waste(b.last_counts, cfg.tile_m) for b in blocks) / len(blocks))
        if step % 25 == 0:
            log(f"  [{routing_mode}] step {step:4d} train {float(loss.detach()):.4f} "
                f"({time.perf_counter() - t0:.0f}s)")
    run_eval(cfg.steps)
    wall = time.perf_counter() - t0
    return {"routing": routing_mode, "wall_s": wall, "final_val_loss": curve["val_loss"][-1],
            "num_params": sum(p.numel() for p in model.parameters()), **curve}


def plot(result: dict, path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot written (pip install matplotlib); the JSON has the curves")
        return False
    fig, ax = plt.subplots(figsize=(8, 5))
    for run, color in zip(result["runs"], ("tab:blue", "tab:orange")):
        label = "top-k" if run["routing"] == "off" else f"token rounding ({run['routing']}, M={result['config']['tile_m']})"
        tl = torch.tensor(run["train_loss"])
        w = 20  # moving average: single-batch losses are noisy
        smooth = torch.nn.functional.avg_pool1d(tl[None, None], w, 1).flatten() if len(tl) >= w else tl
        ax.plot(range(len(tl) - len(smooth), len(tl)), smooth.tolist(), color=color, alpha=0.5,
                label=f"{label}: train (avg of {w})")
        ax.plot(run["val_step"], run["val_loss"], "o-", color=color, label=f"{label}: validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / byte)")
    ax.set_title(f"Tiny Mixtral MoE on pydoc topics, {result['path']} path, {result['device']}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main() -> None:
    defaults = Config()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for field, value in asdict(defaults).items():
        parser.add_argument(f"--{field.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--path", choices=("auto", "backend", "eager"), default="auto",
                        help="auto: the backend if it applies token rounding, else the eager path")
    parser.add_argument("--out", default=os.path.join(RESULTS, "token_rounding_cpu.json"))
    args = parser.parse_args()
    cfg = Config(**{f: getattr(args, f) for f in asdict(defaults)})
    if cfg.mode not in ("nearest", "up", "down"):
        parser.error(f"--mode must be nearest, up or down, got {cfg.mode!r}")
    torch.set_num_threads(cfg.threads)

    def log(msg):
        print(msg, flush=True)

    layout_err = check_fused_block_matches_mixtral(cfg)
    log(f"fused block vs Mixtral block (top-k): max |diff| = {layout_err:.2e}")
    probe_ok, probe_reason = (False, "--path eager") if args.path == "eager" else probe_backend_token_rounding(cfg)
    if args.path == "backend" and not probe_ok:
        raise SystemExit(f"--path backend, but the backend cannot do token rounding: {probe_reason}")
    path = "backend" if probe_ok else "eager"
    log(f"path: {path}" + (f" (backend not used: {probe_reason})" if not probe_ok else
                           " (torch.compile(model, backend='sonic', options={'token_rounding': ...}))"))

    data = load_bytes()
    split = int(0.9 * data.numel())
    train_batches = make_batches(data[:split], cfg.steps, cfg, cfg.seed)
    val_batches = make_batches(data[split:], cfg.eval_batches, cfg, cfg.seed + 1)
    log(f"data: {data.numel()} bytes of pydoc_data/topics.py, {split} train / {data.numel() - split} validation")

    t0 = time.perf_counter()
    runs = [train_one(cfg, mode, path, train_batches, val_batches, log) for mode in ("off", cfg.mode)]
    total_wall = time.perf_counter() - t0
    topk_val, tr_val = runs[0]["final_val_loss"], runs[1]["final_val_loss"]
    rel = (tr_val - topk_val) / topk_val
    result = {
        "description": "tiny Mixtral MoE, byte-level LM on pydoc_data/topics.py; top-k vs token rounding, "
                       "same seed and data order; validation in eval mode (top-k routing)",
        "path": path,
        "path_reason": probe_reason,
        "config": asdict(cfg),
        "device": f"CPU, {cfg.threads} threads",
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "python": platform.python_version(),
        "fused_block_max_abs_diff_vs_mixtral": layout_err,
        "final_val_loss_topk": topk_val,
        "final_val_loss_token_rounding": tr_val,
        "relative_difference": rel,
        "total_wall_s": total_wall,
        "runs": runs,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)
    png = os.path.splitext(args.out)[0] + ".png"
    plotted = plot(result, png)
    log(f"final validation loss: top-k {topk_val:.4f}, token rounding ({cfg.mode}, M={cfg.tile_m}) "
        f"{tr_val:.4f}, relative difference {rel:+.2%}; {cfg.steps} steps each, {total_wall:.0f}s, path {path}")
    log(f"wrote {args.out}" + (f" and {png}" if plotted else ""))


if __name__ == "__main__":
    main()
