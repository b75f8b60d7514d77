"""GPU benchmark of the fused MoE kernels against the usual ways of running MoE experts.

Compared side by side, per shape (T, d, n, E, K), bf16, SwiGLU, top-K routing from a random router:
  sonic          moe_inductor.op.fused_moe(..., impl="triton")  (this package's Triton kernels)
  hf_grouped_mm  transformers' MixtralExperts with the "grouped_mm" experts implementation
                 (sort, gather, torch._grouped_mm, SwiGLU, torch._grouped_mm, weight, unsort, sum)
  hf_compiled    the same module under plain torch.compile (Inductor, no MoE rewrite)
  liger          liger-kernel's LigerFusedMoEFunction, if importable (optional comparator)
  dense          one dense bf16 GEMM (TK x d) @ (d x 3n) with the same FLOPs (the roofline proxy)

Reported: forward, backward and forward+backward time (triton.testing.do_bench median, ms) and
TFLOP/s from the FLOPs actually needed: 6*T*K*d*n forward, 12*T*K*d*n backward (never padded
FLOPs); activation bytes saved for backward (autograd saved tensors, unique storages, parameters
and inputs excluded). Results go to JSON (device name, torch/triton versions, shapes beside every
figure) and a PNG bar chart (if matplotlib is installed).

Usage:
  PYTHONPATH=. python examples/bench_kernels.py [--shapes all|0,2] [--out examples/results/bench_kernels]
  PYTHONPATH=. python examples/bench_kernels.py --interpret-smoke   # CPU, TRITON_INTERPRET=1, tiny
The real benchmark needs CUDA and exits with a message without it. --interpret-smoke runs every
code path of this script at a tiny shape on CPU under the Triton interpreter so the script itself
is tested; its timings are meaningless and are not recorded (only correctness and bytes).
"""
from __future__ import annotations

import os
import sys

# The interpreter must be chosen before triton is imported (by this script or by torch).
if "--interpret-smoke" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ.setdefault("LIGER_FUSED_MOE_AUTOTUNE", "0")  # liger's autotuner asks for a GPU driver
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from typing import Callable, Optional  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from moe_inductor.op import fused_moe  # noqa: E402

# (T, d, n, E, K), from the issue: fine-grained 64/128 experts, DeepSeek-V3-like, Mixtral-like.
SHAPES = [
    (16384, 2048, 1024, 64, 8),
    (16384, 2048, 768, 128, 8),
    (8192, 7168, 2048, 256, 8),
    (16384, 4096, 14336, 8, 2),
]
SMOKE_SHAPE = (32, 32, 16, 4, 2)


@dataclass(frozen=True)
class BenchConfig:
    T: int
    d: int
    n: int
    E: int
    K: int
    dtype: str = "bfloat16"

    @property
    def fwd_flops(self) -> float:
        return 6.0 * self.T * self.K * self.d * self.n

    @property
    def bwd_flops(self) -> float:
        return 12.0 * self.T * self.K * self.d * self.n


@dataclass(frozen=True)
class BenchResult:
    config: BenchConfig
    impl: str
    status: str  # "ok" or "skipped: <reason>" / "failed: <error>"
    fwd_ms: Optional[float] = None
    bwd_ms: Optional[float] = None
    fwd_bwd_ms: Optional[float] = None
    fwd_tflops: Optional[float] = None
    bwd_tflops: Optional[float] = None
    fwd_bwd_tflops: Optional[float] = None
    saved_activation_bytes: Optional[int] = None
    max_abs_err_vs_sonic: Optional[float] = None
    notes: list = field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# problem setup
# ----------------------------------------------------------------------------------------------
def make_problem(cfg: BenchConfig, device: str, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    dtype = getattr(torch, cfg.dtype)
    T, d, n, E, K = cfg.T, cfg.d, cfg.n, cfg.E, cfg.K
    x = torch.randn(T, d, generator=g).to(device, dtype)
    gate_up = (torch.randn(E, 2 * n, d, generator=g) / d**0.5).to(device, dtype)
    down = (torch.randn(E, d, n, generator=g) / n**0.5).to(device, dtype)
    w_router = torch.randn(d, E, generator=g) / d**0.5
    probs = (x.float().cpu() @ w_router).softmax(-1)
    top_w, top_i = probs.topk(K, dim=-1)
    top_w = (top_w / top_w.sum(-1, keepdim=True)).to(device, dtype)
    top_i = top_i.to(device)
    grad_out = torch.randn(T, d, generator=g).to(device, dtype)
    return x, gate_up, down, top_i, top_w, grad_out


def saved_activation_bytes(run_forward: Callable[[], torch.Tensor], exclude: list[torch.Tensor]) -> int:
    """Bytes autograd keeps for backward (unique storages), minus parameters and inputs."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in excluded:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run_forward()
    del out
    return sum(seen.values())


# ----------------------------------------------------------------------------------------------
# implementations: each returns (forward_fn, params) where forward_fn() -> out (T, d)
# ----------------------------------------------------------------------------------------------
def leaves(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Autograd leaves that share storage with the problem tensors: at (8192, 7168, 2048, 256, 8)
    the bf16 weights are 22.5 GB, so every implementation must use the same copy (plus its own
    22.5 GB of weight gradients, dropped before the next implementation runs)."""
    return [t.detach().requires_grad_(True) for t in tensors]


def impl_sonic(x, gate_up, down, top_i, top_w):
    T, K = top_i.shape
    token_ids = torch.arange(T, device=x.device, dtype=torch.int32).repeat_interleave(K)
    expert_ids = top_i.flatten().to(torch.int32)
    params = leaves(x, gate_up, down, top_w)
    xs, w1, w2, s = params

    def fwd():
        return fused_moe(xs, token_ids, expert_ids, s.flatten(), w1, w2, activation="swiglu", impl="triton")

    return fwd, params


def _hf_experts_module(x, gate_up, down, E, K):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    n, d = down.shape[2], down.shape[1]
    config = MixtralConfig(hidden_size=d, intermediate_size=n, num_local_experts=E, num_experts_per_tok=K,
                           hidden_act="silu", num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1,
                           vocab_size=8)
    config._experts_implementation = "grouped_mm"
    with torch.device("meta"):  # no fp32 host allocation of the full weights
        mod = MixtralExperts(config)
    if mod.config._experts_implementation != "grouped_mm":
        raise RuntimeError(f"transformers picked experts implementation {mod.config._experts_implementation!r}")
    mod.gate_up_proj = torch.nn.Parameter(gate_up.detach())  # shares storage with the problem
    mod.down_proj = torch.nn.Parameter(down.detach())
    return mod


def impl_hf(x, gate_up, down, top_i, top_w, compiled=False):
    E, K = gate_up.shape[0], top_i.shape[1]
    mod = _hf_experts_module(x, gate_up, down, E, K)
    xs, s = leaves(x, top_w)
    run = torch.compile(mod) if compiled else mod

    def fwd():
        return run(xs, top_i, s)

    fwd.note = f"transformers experts implementation: {mod.config._experts_implementation}"
    return fwd, [xs, mod.gate_up_proj, mod.down_proj, s]


def impl_liger(x, gate_up, down, top_i, top_w):
    from liger_kernel.ops.fused_moe import LigerFusedMoEFunction

    params = leaves(x, gate_up, down, top_w)
    xs, w1, w2, s = params
    idx = top_i.to(torch.int32)

    def fwd():
        return LigerFusedMoEFunction.apply(xs, w1, w2, idx, s)

    return fwd, params


def impl_dense(x, gate_up, down, top_i, top_w):
    """(TK x d) @ (d x 3n): 2*TK*d*3n = 6TKdn FLOPs forward, twice that backward."""
    T, d = x.shape
    K, n = top_i.shape[1], down.shape[2]
    a = torch.randn(T * K, d, device=x.device, dtype=x.dtype, requires_grad=True)
    w = (torch.randn(d, 3 * n, device=x.device, dtype=x.dtype) / d**0.5).requires_grad_(True)
    def fwd():
        return a @ w

    fwd.note = "saves only its inputs a and w, which are excluded from the activation bytes"
    return fwd, [a, w]


IMPLS = {
    "sonic": impl_sonic,
    "hf_grouped_mm": impl_hf,
    "hf_compiled": lambda *a: impl_hf(*a, compiled=True),
    "liger": impl_liger,
    "dense": impl_dense,
}


# ----------------------------------------------------------------------------------------------
# measurement
# ----------------------------------------------------------------------------------------------
def bench_one(cfg: BenchConfig, name: str, problem, sonic_out, smoke: bool) -> tuple[BenchResult, Optional[torch.Tensor]]:
    x, gate_up, down, top_i, top_w, grad_out = problem
    try:
        fwd, params = IMPLS[name](x, gate_up, down, top_i, top_w)
    except ImportError as exc:
        return BenchResult(cfg, name, f"skipped: {exc}"), None
    try:
        notes = [fwd.note] if hasattr(fwd, "note") else []
        out = fwd()  # also triggers compilation / autotuning outside the timed region
        if name == "dense":
            grad = torch.randn_like(out)
        else:
            grad = grad_out
        out.backward(grad)
        err = None
        if sonic_out is not None and name != "dense":
            err = (out.detach().float() - sonic_out.float()).abs().max().item()
        inputs = [t for t in (x, top_i, top_w) if t is not None]
        saved = saved_activation_bytes(fwd, params + inputs)
        if smoke:  # interpreter timings mean nothing: exercise the paths, record correctness/bytes
            return BenchResult(cfg, name, "ok", saved_activation_bytes=saved, max_abs_err_vs_sonic=err,
                               notes=["interpret smoke run: no timings"] + notes), out.detach()
        import triton.testing

        def run_fwd():
            with torch.no_grad():
                fwd()

        holder = {}

        def make_graph():
            holder["out"] = fwd()

        def run_bwd():
            holder["out"].backward(grad, retain_graph=True)

        def run_fwd_bwd():
            fwd().backward(grad)

        fwd_ms = triton.testing.do_bench(run_fwd)
        make_graph()
        bwd_ms = triton.testing.do_bench(run_bwd, grad_to_none=params)
        holder.clear()
        fb_ms = triton.testing.do_bench(run_fwd_bwd, grad_to_none=params)
        for t in params:  # free this implementation's weight gradients before the next one
            t.grad = None
        tf = lambda flops, ms: flops / (ms * 1e-3) / 1e12
        return BenchResult(
            cfg, name, "ok", fwd_ms, bwd_ms, fb_ms, tf(cfg.fwd_flops, fwd_ms), tf(cfg.bwd_flops, bwd_ms),
            tf(cfg.fwd_flops + cfg.bwd_flops, fb_ms), saved, err, notes,
        ), out.detach()
    except Exception as exc:  # a comparator failing must not hide the others' results
        return BenchResult(cfg, name, f"failed: {type(exc).__name__}: {str(exc)[:300]}"), None


def environment(device: str) -> dict:
    import triton

    env = {
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({platform.processor() or 'unknown'})",
        "interpret": os.environ.get("TRITON_INTERPRET") == "1",
    }
    for pkg in ("transformers", "liger_kernel"):
        try:
            env[pkg] = __import__(pkg).__version__
        except Exception:
            env[pkg] = None
    return env


def plot(results: list[BenchResult], path: str, title: str) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the chart (JSON written)")
        return None
    configs = list(dict.fromkeys(r.config for r in results))
    impls = list(dict.fromkeys(r.impl for r in results))
    fig, axes = plt.subplots(1, 2, figsize=(6 + 2.5 * len(configs), 4.5))
    for ax, metric, label in ((axes[0], "fwd_bwd_tflops", "fwd+bwd TFLOP/s"),
                              (axes[1], "saved_activation_bytes", "saved activations (GiB)")):
        width = 0.8 / max(len(impls), 1)
        for i, impl in enumerate(impls):
            vals = []
            for c in configs:
                r = next((r for r in results if r.config == c and r.impl == impl), None)
                v = getattr(r, metric) if r is not None else None
                if v is not None and metric == "saved_activation_bytes":
                    v = v / 2**30
                vals.append(v or 0.0)
            ax.bar([j + i * width for j in range(len(configs))], vals, width, label=impl)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(configs))])
        ax.set_xticklabels([f"T{c.T} d{c.d}\nn{c.n} E{c.E} K{c.K}" for c in configs], fontsize=8)
        ax.set_ylabel(label)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="all", help="'all' or comma-separated indices into SHAPES")
    p.add_argument("--impls", default=",".join(IMPLS), help="comma-separated subset of " + ",".join(IMPLS))
    p.add_argument("--out", default=None, help="output path prefix (.json and .png are appended)")
    p.add_argument("--interpret-smoke", action="store_true", help="tiny CPU run under TRITON_INTERPRET=1")
    args = p.parse_args(argv)

    smoke = args.interpret_smoke
    if not smoke and not torch.cuda.is_available():
        print("bench_kernels: no CUDA device found. This benchmark measures GPU kernels and cannot run "
              "here; use --interpret-smoke to exercise the script on CPU (no timings).", file=sys.stderr)
        return 2
    device = "cpu" if smoke else "cuda"
    if smoke:
        shapes = [SMOKE_SHAPE]
        default_out = os.path.join("/tmp", "bench_kernels_smoke")
    else:
        shapes = SHAPES if args.shapes == "all" else [SHAPES[int(i)] for i in args.shapes.split(",")]
        default_out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "bench_kernels")
    out_prefix = args.out or default_out
    os.makedirs(os.path.dirname(os.path.abspath(out_prefix)), exist_ok=True)
    impls = [i for i in args.impls.split(",") if i]
    unknown = set(impls) - set(IMPLS)
    if unknown:
        p.error(f"unknown impls {sorted(unknown)}; valid: {', '.join(IMPLS)}")
    if "sonic" in impls:  # sonic first: the others are checked against its output
        impls.remove("sonic")
        impls.insert(0, "sonic")

    env = environment(device)
    results: list[BenchResult] = []
    for shape in shapes:
        cfg = BenchConfig(*shape)
        problem = make_problem(cfg, device)
        sonic_out = None
        for name in impls:
            res, out = bench_one(cfg, name, problem, sonic_out, smoke)
            if name == "sonic":
                sonic_out = out
            results.append(res)
            fmt = lambda v, f: "-" if v is None else format(v, f)
            print(f"{shape} {name:14s} {res.status:8.60s} fwd {fmt(res.fwd_ms, '.3f')} ms "
                  f"bwd {fmt(res.bwd_ms, '.3f')} ms fwd+bwd {fmt(res.fwd_bwd_tflops, '.1f')} TFLOP/s "
                  f"saved {fmt(res.saved_activation_bytes, ',d')} B "
                  f"err {fmt(res.max_abs_err_vs_sonic, '.2e')}", flush=True)
        del problem
        if device == "cuda":
            torch.cuda.empty_cache()

    payload = {"environment": env, "smoke": smoke, "results": [asdict(r) for r in results]}
    with open(out_prefix + ".json", "w") as f:
        json.dump(payload, f, indent=1)
    print(f"wrote {out_prefix}.json")
    chart = plot(results, out_prefix + ".png", f"{env['device']} | torch {env['torch']} triton {env['triton']} | bf16 SwiGLU")
    if chart:
        print(f"wrote {chart}")
    if smoke:  # the smoke run tests the script: any implementation that failed (not skipped) fails it
        bad = [r for r in results if r.status.startswith("failed") or (r.impl == "sonic" and r.status != "ok")]
        if bad:
            print(f"smoke run: {bad[0].impl} failed: {bad[0].status}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
