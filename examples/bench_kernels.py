"""GPU benchmark of the fused MoE kernels against the usual ways of running MoE experts.

Compared side by side, per shape (T, d, n, E, K), bf16, SwiGLU, top-K routing from a random router:
  sonic            moe_inductor.ops.op.fused_moe(..., impl="triton")  (this package's Triton kernels)
  sonic_tr         the same kernels on token-rounding routing of the same router probabilities
                   (moe_inductor.ops.routing.token_rounding_routing, "nearest", tile_m = the kernels'
                   row tile; routing computed outside the timed region: kernel time vs top-k)
  hf_grouped_mm    transformers' MixtralExperts with the "grouped_mm" experts implementation
                   (sort, gather, torch._grouped_mm, SwiGLU, torch._grouped_mm, weight, unsort, sum)
  hf_compiled      the same module under plain torch.compile (Inductor, no MoE rewrite)
  hf_max_autotune  the same under torch.compile(mode="max-autotune-no-cudagraphs"): Inductor's
                   max-autotune (its own GEMM / grouped-GEMM templates, coordinate-descent tuning)
                   without CUDA graphs, which no other row gets and whose output-buffer reuse
                   breaks timing backward apart from forward
  liger            liger-kernel's LigerFusedMoEFunction, if importable (optional comparator)
  dense            one dense bf16 GEMM (TK x d) @ (d x 3n) with the same FLOPs (the roofline proxy)

Reported: forward, backward and forward+backward time in ms, the MEDIAN of
triton.testing.do_bench (return_mode="median"; the 20th/80th percentiles beside it), and TFLOP/s
from the FLOPs actually needed by that row's assignments A: 6*A*d*n forward, 12*A*d*n backward
(A = T*K for top-k; sum of the rounded counts for sonic_tr; never padded FLOPs); activation bytes
saved for backward (autograd saved tensors, unique storages, parameters and inputs excluded);
relative error of the output against a reference row (--ref, default sonic). Correctness gate:
before it is timed, every row's output and gradients (x, scores, and the weights of the first
GATE_EXPERTS experts: the whole weight gradient of the largest shape would not fit twice) are
compared with the op's PyTorch path (impl="torch", same bf16 inputs, the row's own routing) by
relative Frobenius error; a row above GATE_TOL is recorded "failed: correctness gate ..." and its
speed is not measured (the dense GEMM computes something else and is not gated). Results go to JSON
(device name, versions, shapes and run id beside every figure), rewritten after every row so a
run stopped early keeps what it measured, and a PNG bar chart (if matplotlib is installed).

Usage:
  PYTHONPATH=. python examples/bench_kernels.py [--shapes all|0,4] [--out examples/results/bench_kernels]
  PYTHONPATH=. python examples/bench_kernels.py --interpret-smoke   # CPU, TRITON_INTERPRET=1, tiny
  --deadline UNIX_TIME: rows not started by then are skipped, a row still running then is
  interrupted (SIGALRM) and recorded as "timeout", and the JSON is written (examples/gpu_check.py).
The real benchmark needs CUDA and exits with a message without it. --interpret-smoke runs every
code path of this script at a tiny shape on CPU under the Triton interpreter so the script itself
is tested; its timings are meaningless and are not recorded (only correctness and bytes); there
the compiled rows use backend="aot_eager" (Inductor's CPU code generation would take minutes).
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
import signal  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from typing import Callable, Optional  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from moe_inductor.ops.op import fused_moe  # noqa: E402

# (T, d, n, E, K), from the issue: fine-grained 64/128 experts, DeepSeek-V3-like, Mixtral-like, and
# a very fine-grained high-sparsity shape where token rounding matters most (SonicMoE's +1.16x).
SHAPES = [
    (16384, 2048, 1024, 64, 8),
    (16384, 2048, 768, 128, 8),
    (8192, 7168, 2048, 256, 8),
    (16384, 4096, 14336, 8, 2),
    (16384, 1536, 256, 256, 8),
]
SMOKE_SHAPE = (32, 32, 16, 4, 2)
SMOKE_TILE_M = 8  # token rounding tile in the smoke run (T = 32 is far below the kernels' tile)
STATISTIC = ("median of triton.testing.do_bench(quantiles=[0.5, 0.2, 0.8], rep=REP_MS); q20/q80 = its 20th/80th "
             "percentiles; samples = do_bench's repetition count (rep / estimated time)")
REP_MS = 500  # do_bench's rep: a 10-15 ms forward+backward gets 30-50 samples (the default 100 ms gives 5-10)
GATE_TOL = 2e-2  # bf16: ||row - torch path|| / ||torch path||, output and every gradient compared
GATE_EXPERTS = 4  # weight gradients compared on these first experts (memory: see the docstring)


@dataclass(frozen=True)
class BenchConfig:
    T: int
    d: int
    n: int
    E: int
    K: int
    dtype: str = "bfloat16"

    def fwd_flops(self, assignments: Optional[int] = None) -> float:
        a = self.T * self.K if assignments is None else assignments
        return 6.0 * a * self.d * self.n

    def bwd_flops(self, assignments: Optional[int] = None) -> float:
        return 2.0 * self.fwd_flops(assignments)


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
    rel_err_vs_ref: Optional[float] = None  # ||out - ref|| / ||ref|| (Frobenius)
    err_ref: Optional[str] = None
    assignments: Optional[int] = None  # the (token, expert) pairs computed: the needed FLOPs' A
    fwd_bwd_ms_q20_q80: Optional[list] = None
    samples: Optional[dict] = None  # do_bench repetitions per measurement (fwd, bwd, fwd_bwd)
    gate: Optional[dict] = None  # relative error vs the PyTorch path per tensor (out, x, scores, ...)
    gate_tol: Optional[float] = None
    notes: list = field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# problem setup
# ----------------------------------------------------------------------------------------------
@dataclass
class Problem:
    x: torch.Tensor  # (T, d)
    gate_up: torch.Tensor  # (E, 2n, d)
    down: torch.Tensor  # (E, d, n)
    top_i: torch.Tensor  # (T, K) int64
    top_w: torch.Tensor  # (T, K), renormalised top-k probabilities
    probs: torch.Tensor  # (T, E) fp32 router probabilities (token rounding starts from them)
    grad_out: torch.Tensor  # (T, d)
    tile_m: int  # token rounding tile


def make_problem(cfg: BenchConfig, device: str, seed: int = 0, tile_m: Optional[int] = None) -> Problem:
    """Generated on the device: at (8192, 7168, 2048, 256, 8) the weights are 11 G elements, which
    a host fp32 randn would take ~45 GB and a minute to make."""
    g = torch.Generator(device=device).manual_seed(seed)
    dtype = getattr(torch, cfg.dtype)
    T, d, n, E, K = cfg.T, cfg.d, cfg.n, cfg.E, cfg.K

    def randn(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g, device=device, dtype=dt) * scale).to(dt)

    x = randn(T, d)
    gate_up = randn(E, 2 * n, d, scale=d**-0.5)
    down = randn(E, d, n, scale=n**-0.5)
    w_router = randn(d, E, scale=d**-0.5, dt=torch.float32)
    probs = (x.float() @ w_router).softmax(-1)
    top_w, top_i = probs.topk(K, dim=-1)
    top_w = (top_w / top_w.sum(-1, keepdim=True)).to(dtype)
    grad_out = randn(T, d)
    if tile_m is None:
        from moe_inductor.kernels.config import TILE_M as tile_m
    return Problem(x, gate_up, down, top_i, top_w, probs, grad_out, tile_m)


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
# implementations: each takes the Problem and returns (forward_fn, params) where forward_fn() -> out
# (T, d); forward_fn.assignments (if set) is the number of (token, expert) pairs it computes
# ----------------------------------------------------------------------------------------------
def leaves(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Autograd leaves that share storage with the problem tensors: at (8192, 7168, 2048, 256, 8)
    the bf16 weights are 22.5 GB, so every implementation must use the same copy (plus its own
    22.5 GB of weight gradients, dropped before the next implementation runs)."""
    return [t.detach().requires_grad_(True) for t in tensors]


def impl_sonic(pb: Problem):
    T, K = pb.top_i.shape
    token_ids = torch.arange(T, device=pb.x.device, dtype=torch.int32).repeat_interleave(K)
    expert_ids = pb.top_i.flatten().to(torch.int32)
    params = leaves(pb.x, pb.gate_up, pb.down, pb.top_w)
    xs, w1, w2, s = params

    def fwd():
        return fused_moe(xs, token_ids, expert_ids, s.flatten(), w1, w2, activation="swiglu", impl="triton")

    fwd.assignments = T * K
    return fwd, params


def impl_sonic_tr(pb: Problem):
    """Token rounding: routing (one host sync for its exact length) is computed here, untimed; the
    timed region is the fused op on the rounded assignments, as for top-k above."""
    from moe_inductor.ops.routing import token_rounding_routing

    K = pb.top_i.shape[1]
    r = token_rounding_routing(pb.probs, K, pb.tile_m, "nearest")
    scores = r.scores.detach().to(pb.x.dtype)
    params = leaves(pb.x, pb.gate_up, pb.down, scores)
    xs, w1, w2, s = params

    def fwd():
        return fused_moe(xs, r.token_ids, r.expert_ids, s, w1, w2, activation="swiglu", impl="triton")

    fwd.assignments = int(r.token_ids.numel())
    fwd.routing = (r.token_ids, r.expert_ids, scores)  # its correctness gate uses this routing
    fwd.note = (f"token rounding 'nearest', tile_m={pb.tile_m}: {fwd.assignments} assignments vs "
                f"{pb.top_i.numel()} for top-k")
    return fwd, params


def _hf_experts_module(gate_up, down, E, K):
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


COMPILE_MODES = {"hf_compiled": None, "hf_max_autotune": "max-autotune-no-cudagraphs"}


def impl_hf(pb: Problem, compiled: Optional[str] = None):
    E, K = pb.gate_up.shape[0], pb.top_i.shape[1]
    mod = _hf_experts_module(pb.gate_up, pb.down, E, K)
    xs, s = leaves(pb.x, pb.top_w)
    notes = [f"transformers experts implementation: {mod.config._experts_implementation}"]
    run = mod
    if compiled is not None:
        mode = COMPILE_MODES[compiled]
        if pb.x.device.type == "cpu":  # smoke run: Dynamo + AOTAutograd, no Inductor code generation
            run = torch.compile(mod, backend="aot_eager")
            notes.append(f"smoke run: backend='aot_eager' stands in for Inductor (mode {mode!r} not applied)")
        else:
            run = torch.compile(mod, mode=mode)
            notes.append(f"torch.compile(mode={mode!r})")
    top_i = pb.top_i

    def fwd():
        return run(xs, top_i, s)

    fwd.note = "; ".join(notes)
    return fwd, [xs, mod.gate_up_proj, mod.down_proj, s]


def impl_liger(pb: Problem):
    from liger_kernel.ops.fused_moe import LigerFusedMoEFunction

    tensors = (pb.x, pb.gate_up, pb.down, pb.top_w)
    smoke_fp32 = pb.x.device.type == "cpu" and pb.x.dtype == torch.bfloat16
    if smoke_fp32:  # the Triton interpreter has no bf16 atomic_add, which liger's backward uses
        tensors = tuple(t.float() for t in tensors)
    params = leaves(*tensors)
    xs, w1, w2, s = params
    idx = pb.top_i.to(torch.int32)

    def fwd():
        return LigerFusedMoEFunction.apply(xs, w1, w2, idx, s)

    if smoke_fp32:
        fwd.note = "smoke run: fp32 copies (the Triton interpreter has no bf16 atomic_add)"
    return fwd, params


def impl_dense(pb: Problem):
    """(TK x d) @ (d x 3n): 2*TK*d*3n = 6TKdn FLOPs forward, twice that backward."""
    T, d = pb.x.shape
    K, n = pb.top_i.shape[1], pb.down.shape[2]
    a = torch.randn(T * K, d, device=pb.x.device, dtype=pb.x.dtype, requires_grad=True)
    w = (torch.randn(d, 3 * n, device=pb.x.device, dtype=pb.x.dtype) / d**0.5).requires_grad_(True)

    def fwd():
        return a @ w

    fwd.note = "saves only its inputs a and w, which are excluded from the activation bytes"
    return fwd, [a, w]


IMPLS = {
    "sonic": impl_sonic,
    "sonic_tr": impl_sonic_tr,
    "hf_grouped_mm": impl_hf,
    "liger": impl_liger,
    "dense": impl_dense,
    "hf_compiled": lambda pb: impl_hf(pb, compiled="hf_compiled"),
    "hf_max_autotune": lambda pb: impl_hf(pb, compiled="hf_max_autotune"),
}
# Rows whose output is not comparable with the top-k reference (other routing, other math).
NO_REF = {"sonic_tr", "dense"}


# ----------------------------------------------------------------------------------------------
# correctness gate
# ----------------------------------------------------------------------------------------------
def topk_routing(pb: Problem) -> tuple:
    """(token_ids, expert_ids, scores leaf source) of the problem's top-k routing."""
    T, K = pb.top_i.shape
    token_ids = torch.arange(T, device=pb.x.device, dtype=torch.int32).repeat_interleave(K)
    return token_ids, pb.top_i.flatten().to(torch.int32), pb.top_w


def _gated(grads: dict) -> dict:
    """The tensors the gate compares: weight gradients cut to the first GATE_EXPERTS experts."""
    return {k: (v[:GATE_EXPERTS] if k in ("gate_up", "down") and v is not None else v) for k, v in grads.items()}


def torch_reference(pb: Problem, routing: tuple) -> dict:
    """Output and gradients of the op's PyTorch path (impl="torch") on ``routing`` with the
    problem's bf16 tensors and output gradient: the row's expected values."""
    token_ids, expert_ids, scores = routing
    x, w1, w2, s = leaves(pb.x, pb.gate_up, pb.down, scores)
    out = fused_moe(x, token_ids, expert_ids, s.flatten(), w1, w2, activation="swiglu", impl="torch")
    out.backward(pb.grad_out)
    ref = _gated({"out": out.detach(), "x": x.grad, "scores": s.grad, "gate_up": w1.grad, "down": w2.grad})
    return {k: v.clone() for k, v in ref.items()}  # the clones free the full weight gradients


def gate_errors(ref: dict, out: torch.Tensor, params: list) -> dict:
    """Relative error per tensor of a row (``params`` = its leaves x, gate_up, down, scores, after
    its backward) against ``ref``; a missing gradient counts as error inf."""
    got = _gated({"out": out.detach(), "x": params[0].grad, "gate_up": params[1].grad, "down": params[2].grad,
                  "scores": params[3].grad})
    return {k: (rel_err(got[k].reshape(ref[k].shape), ref[k]) if got[k] is not None else float("inf"))
            for k in ref}


def gate_failure(errors: dict) -> Optional[str]:
    bad = {k: e for k, e in errors.items() if not e <= GATE_TOL}
    return None if not bad else "failed: correctness gate: " + ", ".join(
        f"{k} rel. error {e:.2e} > {GATE_TOL:g}" for k, e in bad.items())


# ----------------------------------------------------------------------------------------------
# measurement
# ----------------------------------------------------------------------------------------------
class RowTimeout(Exception):
    pass


_ALARM = {"fired": False}


def _on_alarm(signum, frame):
    _ALARM["fired"] = True
    raise RowTimeout("the run's deadline passed while this row was running")


def _stopped_by_deadline(exc: BaseException) -> bool:
    """True when the row's deadline alarm fired: torch.compile and Triton wrap what their callees
    raise (BackendCompilerFailed, InductorError, ...), so a RowTimeout raised inside compilation
    arrives as another exception type; the CI saw such a row recorded as failed once."""
    seen = exc
    while seen is not None:
        if isinstance(seen, RowTimeout):
            return True
        seen = seen.__cause__ or seen.__context__
    return _ALARM["fired"]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def bench_one(cfg: BenchConfig, name: str, pb: Problem, ref_out, ref_name, smoke: bool) -> tuple[BenchResult, Optional[torch.Tensor]]:
    try:
        fwd, params = IMPLS[name](pb)
    except ImportError as exc:
        return BenchResult(cfg, name, f"skipped: {exc}"), None
    try:
        notes = [fwd.note] if hasattr(fwd, "note") else []
        assignments = getattr(fwd, "assignments", cfg.T * cfg.K)
        out = fwd()  # also triggers compilation / autotuning outside the timed region
        grad = torch.randn_like(out) if name == "dense" else pb.grad_out
        out.backward(grad)
        err = None
        if ref_out is not None and name not in NO_REF:
            err = rel_err(out.detach(), ref_out)
        result = dict(rel_err_vs_ref=err, err_ref=ref_name if err is not None else None, assignments=assignments)
        if name != "dense":  # the gate: checked before any timing, a failing row is not timed
            errors = gate_errors(torch_reference(pb, getattr(fwd, "routing", None) or topk_routing(pb)), out, params)
            result.update(gate=errors, gate_tol=GATE_TOL)
            failure = gate_failure(errors)
            if failure is not None:
                return BenchResult(cfg, name, failure, notes=notes, **result), out.detach()
        saved = saved_activation_bytes(fwd, params + [pb.x, pb.top_i, pb.top_w])
        if smoke:  # interpreter timings mean nothing: exercise the paths, record correctness/bytes
            return BenchResult(cfg, name, "ok", saved_activation_bytes=saved,
                               notes=["interpret smoke run: no timings"] + notes, **result), out.detach()
        import triton.testing

        samples = {}

        def bench(fn, what, **kw):  # (median, q20, q80) in ms; do_bench runs max(1, rep / estimate) times
            q = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], rep=REP_MS, **kw)
            samples[what] = max(1, int(REP_MS / max(q[0], 1e-6)))
            return q

        def run_fwd():
            with torch.no_grad():
                fwd()

        holder = {}

        def run_bwd():
            holder["out"].backward(grad, retain_graph=True)

        def run_fwd_bwd():
            fwd().backward(grad)

        fwd_ms = bench(run_fwd, "fwd")[0]
        holder["out"] = fwd()
        bwd_ms = bench(run_bwd, "bwd", grad_to_none=params)[0]
        holder.clear()
        fb = bench(run_fwd_bwd, "fwd_bwd", grad_to_none=params)
        for t in params:  # free this implementation's weight gradients before the next one
            t.grad = None
        tf = lambda flops, ms: flops / (ms * 1e-3) / 1e12
        fl_f, fl_b = cfg.fwd_flops(assignments), cfg.bwd_flops(assignments)
        return BenchResult(
            cfg, name, "ok", fwd_ms, bwd_ms, fb[0], tf(fl_f, fwd_ms), tf(fl_b, bwd_ms), tf(fl_f + fl_b, fb[0]),
            saved, fwd_bwd_ms_q20_q80=[fb[1], fb[2]], samples=samples, notes=notes, **result,
        ), out.detach()
    except RowTimeout as exc:
        return BenchResult(cfg, name, f"timeout: {exc}"), None
    except Exception as exc:  # a comparator failing must not hide the others' results
        if _stopped_by_deadline(exc):
            return BenchResult(cfg, name, "timeout: the run's deadline passed while this row was running "
                               f"(arrived as {type(exc).__name__})"), None
        return BenchResult(cfg, name, f"failed: {type(exc).__name__}: {str(exc)[:300]}"), None
    finally:
        for t in params:
            t.grad = None


def reference_output(name: str, pb: Problem) -> Optional[torch.Tensor]:
    """Forward output of the reference row, untimed (when it is not among the rows run)."""
    try:
        fwd, _ = IMPLS[name](pb)
        with torch.no_grad():
            return fwd().detach()
    except Exception as exc:
        print(f"reference {name} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None


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
    plt.close(fig)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="all", help="'all' or comma-separated indices into SHAPES")
    p.add_argument("--impls", default=",".join(IMPLS), help="comma-separated subset of " + ",".join(IMPLS))
    p.add_argument("--ref", default="sonic", choices=sorted(set(IMPLS) - NO_REF),
                   help="row whose output the others are compared with (computed untimed if not run)")
    p.add_argument("--out", default=None, help="output path prefix (.json and .png are appended)")
    p.add_argument("--deadline", type=float, default=None,
                   help="unix time: rows not started by then are skipped, a running row is interrupted")
    p.add_argument("--no-plot", action="store_true", help="JSON only")
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
    impls = list(dict.fromkeys(i for i in args.impls.split(",") if i))
    unknown = set(impls) - set(IMPLS)
    if unknown:
        p.error(f"unknown impls {sorted(unknown)}; valid: {', '.join(IMPLS)}")
    if args.ref in impls:  # the reference first: the others are checked against its output
        impls.remove(args.ref)
        impls.insert(0, args.ref)
    if args.deadline is not None:
        signal.signal(signal.SIGALRM, _on_alarm)

    env = environment(device)
    results: list[BenchResult] = []
    payload = {
        "run_id": time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + f"-{os.getpid()}",
        "argv": sys.argv[1:] if argv is None else list(argv),
        "statistic": STATISTIC,
        "environment": env, "smoke": smoke, "complete": False, "results": [],
    }

    def write():  # after every row: a run stopped early keeps what it measured
        payload["results"] = [asdict(r) for r in results]
        tmp = out_prefix + ".json.tmp"
        with open(tmp, "w") as f:
            json.dump(payload, f, indent=1)
        os.replace(tmp, out_prefix + ".json")

    write()
    for shape in shapes:
        cfg = BenchConfig(*shape)
        problem = make_problem(cfg, device, tile_m=SMOKE_TILE_M if smoke else None)
        ref_out = None if args.ref in impls else reference_output(args.ref, problem)
        for name in impls:
            left = None if args.deadline is None else args.deadline - time.time()
            if left is not None and left <= 1.0:
                res, out = BenchResult(cfg, name, "skipped: time share of this run used up"), None
            else:
                if left is not None:
                    _ALARM["fired"] = False
                    signal.setitimer(signal.ITIMER_REAL, left)
                try:
                    res, out = bench_one(cfg, name, problem, ref_out, args.ref, smoke)
                except RowTimeout as exc:  # raised between bench_one's own handlers
                    res, out = BenchResult(cfg, name, f"timeout: {exc}"), None
                finally:
                    if left is not None:
                        signal.setitimer(signal.ITIMER_REAL, 0)
            if name == args.ref:
                ref_out = out
            results.append(res)
            write()
            fmt = lambda v, f: "-" if v is None else format(v, f)
            print(f"{shape} {name:15s} {res.status:8.60s} fwd {fmt(res.fwd_ms, '.3f')} ms "
                  f"bwd {fmt(res.bwd_ms, '.3f')} ms fwd+bwd {fmt(res.fwd_bwd_tflops, '.1f')} TFLOP/s "
                  f"saved {fmt(res.saved_activation_bytes, ',d')} B "
                  f"err vs {args.ref} {fmt(res.rel_err_vs_ref, '.2e')}", flush=True)
        del problem, ref_out
        if device == "cuda":
            torch.cuda.empty_cache()

    payload["complete"] = True
    write()
    print(f"wrote {out_prefix}.json")
    if not args.no_plot:
        chart = plot(results, out_prefix + ".png",
                     f"{env['device']} | torch {env['torch']} triton {env['triton']} | bf16 SwiGLU")
        if chart:
            print(f"wrote {chart}")
    if smoke:  # the smoke run tests the script: any implementation that failed fails it, and so does
        # sonic skipped for any reason but the run's time (a row stopped or not started at --deadline
        # is the time box working, recorded as such, not a failure)
        out_of_time = lambda r: r.status.startswith("timeout") or r.status == "skipped: time share of this run used up"
        bad = [r for r in results if r.status.startswith("failed")
               or (r.impl == "sonic" and r.status != "ok" and not out_of_time(r))]
        if bad:
            print(f"smoke run: {bad[0].impl} failed: {bad[0].status}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
