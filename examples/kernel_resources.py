"""Registers, spills, shared memory and tensor-core use of every Triton kernel, without a GPU.

    python examples/kernel_resources.py [--arch 90,80] [--out examples/results/sm90_kernels.json]
        [--dtypes bf16,fp16,fp32,fp32_tf32] [--acts all|swiglu,gelu,...] [--kernels name,...] [--jobs 2]

The committed tables (one per Triton version, register allocation differs between them):
``--arch 90 --acts swiglu --out examples/results/sm90_kernels.json`` under triton 3.9 and
``... --out examples/results/sm90_kernels_triton36.json`` under triton 3.6 (torch 2.11); 433
compiles each (26 and 36 minutes with --jobs 1 on a shared, loaded 2-core machine). After editing
a few kernels, ``--kernels a,b --merge TABLE --out TABLE`` recompiles only those and keeps the
other kernels' entries (how the dH / up-projection rows were last regenerated: 160 compiles).

What it does, in three steps:

1. Discovery. The real launchers run once per scenario (dtype x activation x bias/layout/recompute,
   a "prefill" and a "decode" shape) through the public fused op (forward and backward) on CPU
   tensors, with a stand-in Triton driver that reports an sm_90 (or sm_80) GPU. Triton's own launch
   path binds and specialises the arguments exactly as on that GPU (tensor -> pointer type with its
   dtype, ints -> i32/i64, == 1 and divisible-by-16 specialisations, constexprs, options) and hands
   them to ``knobs.runtime.jit_cache_hook``, which records them and stops the launch: no kernel
   runs, nothing is compiled yet. Autotuned kernels are intercepted one level up, where the
   autotuner's candidate list for that launch (after its ``early_config_prune``, so per-dtype lists
   of ``launch_utils.DtypeConfigs`` apply) is recorded and each candidate is "launched" in turn.
   Triton is imported without TRITON_INTERPRET, so the modules' GPU constants (config lists, block
   sizes) are the ones seen; ``TRITON_INTERPRET=1`` is set only afterwards, for the op's CPU-tensor
   check. Fresh ``torch.empty`` buffers are zero-filled during discovery, so tables that a skipped
   kernel would have written still hold valid indices for the torch ops that follow.
   Whatever ``@triton.jit`` kernels the package defines are picked up; a ``*_kernel`` that no
   scenario launched is listed under ``never_launched``.
2. Compilation. Every distinct (kernel, specialisation, config) is compiled with
   ``triton.compile`` for ``GPUTarget("cuda", arch, 32)`` (2 worker processes), with the ptxas that
   Triton itself uses for that arch (``TRITON_PTXAS_PATH`` overrides it); its ``-v`` log gives
   registers per thread, spill stores/loads and stack; ``metadata.shared`` gives the dynamic shared
   memory per block; the PTX tells whether the kernel uses ``wgmma.mma_async`` (Hopper tensor
   cores), ``mma.sync`` (Ampere-style tensor cores), ``cp.async`` and ``cp.async.bulk`` (TMA).
3. Verdict. ``ok`` = no spill stores/loads, shared memory within the arch's per-block limit, and
   registers x threads within the register file. Results: a table on stdout and a JSON file.

The Triton compile cache (``TRITON_CACHE_DIR``) makes a re-run fast; ptxas logs are cached next to
it by kernel hash (a cache hit in Triton skips ptxas).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import importlib
import io
import json
import multiprocessing
import os
import pkgutil
import re
import subprocess
import sys
import time
from pathlib import Path

if __name__ == "__main__" and os.environ.get("TRITON_INTERPRET") == "1":
    # The interpreter would replace every @triton.jit by an interpreted function and the modules
    # would pick their interpreter configs: re-run this script without it. (Imported as a module,
    # e.g. by a test, only the parsing helpers are meant to be used in such a process.)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    os.execve(sys.executable, [sys.executable, *sys.argv], env)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# Per-block limits (CUDA programming guide, "Compute capabilities" table): dynamic shared memory a
# block may opt in to, registers per thread, 32-bit registers per SM (one block must fit).
ARCH_LIMITS = {
    90: {"smem_per_block": 232448, "regs_per_thread": 255, "regs_per_sm": 65536},  # H100/H200: 227 KB
    80: {"smem_per_block": 166912, "regs_per_thread": 255, "regs_per_sm": 65536},  # A100: 163 KB
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp32_tf32": torch.float32}
WARP_SIZE = 32


# ------------------------------------------------------------------------------------------------
# 1. discovery
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Scenario:
    """One call of the fused op (forward + backward) whose kernel launches are recorded."""
    dtype: str            # key of DTYPES
    activation: str       # activation spec
    bias: bool
    interleaved: bool
    recompute_h: bool
    shape: object         # key of SHAPES, or a (T, d, n, E, K) tuple (a caller's own shape)
    routing: str = "topk"  # topk | dropped | skewed | token_rounding (static) | token_rounding_dynamic
    tr_tile_m: int = 128   # token rounding's tile (routing token_rounding*)

    def dims(self) -> tuple:
        return tuple(SHAPES[self.shape]) if isinstance(self.shape, str) else tuple(self.shape)


# (T, d, n, E, K). All multiples of 16 like real model sizes, so Triton's divisibility
# specialisations match a real launch. One shape per row tile that config.kernel_tile_m can choose
# (the GEMMs' BLOCK_M, part of their autotune key): "prefill" ~256 rows per expert (128-row tiles);
# "decode" ~1 row per expert (16-row tiles); "decode_m32" / "decode_m64" 32 / 64 rows per expert
# (small batches, the graph tests' shapes: 32- and 64-row tiles).
SHAPES = {
    "prefill": (512, 256, 128, 4, 2),
    "decode": (16, 256, 128, 64, 4),
    "decode_m32": (64, 256, 128, 8, 4),
    "decode_m64": (128, 256, 128, 8, 4),
}
SHAPE_TILE_M = {"prefill": 128, "decode": 16, "decode_m32": 32, "decode_m64": 64}


@dataclasses.dataclass
class Launch:
    """What Triton would compile for one launch on the target arch (jit_cache_hook's view)."""
    arch: int
    fn: object                 # the JITFunction
    signature: dict
    constants: dict
    attrs: dict
    options: dict
    config: dict               # BLOCK_* / tile constexprs of the autotune config (or the launch), warps, stages
    autotuned: bool
    dtype: str
    tune_key: tuple = ()       # the autotuner's cache key of the launch (() when not autotuned)

    @property
    def kernel(self) -> str:
        return f"{self.fn.fn.__module__.rsplit('.', 1)[-1]}.{self.fn.fn.__name__}"

    def unit_args(self) -> list:
        """Non-constexpr int arguments Triton specialised to the constant 1 (unit strides): two
        launches of one variant can differ here, e.g. a weight read transposed or not."""
        return sorted(p.name for i, p in enumerate(self.fn.params)
                      if not p.is_constexpr and self.constants.get((i,)) == 1)

    def variant(self) -> dict:
        """The kernel's own constexpr parameters other than the config (what specialises the code)."""
        out = {}
        for i, p in enumerate(self.fn.params):
            if p.is_constexpr and p.name not in self.config:
                v = self.constants.get((i,))
                out[p.name] = v if isinstance(v, (bool, int, float, str, type(None))) else str(v)
        return out

    def spec_key(self) -> str:
        blob = repr((self.kernel, self.arch, sorted(self.signature.items()),
                     sorted((k, repr(v)) for k, v in self.constants.items()),
                     sorted((k, repr(v)) for k, v in self.attrs.items()),
                     sorted((k, repr(v)) for k, v in self.options.items())))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _tuples(obj):
    """JSON turned the options' tuples into lists; Triton hashes them."""
    if isinstance(obj, dict):
        return {k: _tuples(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return tuple(_tuples(v) for v in obj)
    return obj


class _StandInDriver:
    """Enough of a Triton driver for JITFunction.run to bind arguments for a chosen target."""

    def __init__(self, arch: int):
        self.arch = arch

    def get_current_device(self):
        return self.arch  # one binder cache per arch

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", self.arch, WARP_SIZE)

    def get_active_torch_device(self):
        return torch.device("cpu")


def kernel_modules() -> list:
    import moe_inductor.kernels as pkg

    mods = []
    for info in pkgutil.iter_modules(pkg.__path__):
        mods.append(importlib.import_module(f"{pkg.__name__}.{info.name}"))
    return mods


def _unwrap(obj):
    while not isinstance(obj, triton.runtime.jit.JITFunction):
        obj = obj.fn
    return obj


def discover_kernels(mods) -> tuple[dict, dict]:
    """{id(JITFunction): JITFunction} of every module-level jit function, and the autotuners
    ({id(Autotuner): Autotuner}) wrapping some of them."""
    jits, tuners = {}, {}
    for mod in mods:
        for value in vars(mod).values():
            if isinstance(value, triton.runtime.autotuner.Autotuner):
                tuners[id(value)] = value
            if isinstance(value, triton.runtime.jit.KernelInterface):
                try:
                    jf = _unwrap(value)
                except AttributeError:
                    continue
                if jf.fn.__module__ == mod.__name__:
                    jits[id(jf)] = jf
    return jits, tuners


_CONFIG_OPTION_KEYS = ("num_warps", "num_stages")


@contextlib.contextmanager
def _zero_fill_empty():
    """torch.empty & co. return zeros: a skipped kernel leaves its tables all-zero (valid indices)."""
    saved = torch.empty, torch.empty_like, torch.Tensor.new_empty

    def empty(*a, **k):
        return saved[0](*a, **k).zero_()

    def empty_like(*a, **k):
        return saved[1](*a, **k).zero_()

    def new_empty(self, *a, **k):
        return saved[2](self, *a, **k).zero_()

    torch.empty, torch.empty_like, torch.Tensor.new_empty = empty, empty_like, new_empty
    try:
        yield
    finally:
        torch.empty, torch.empty_like, torch.Tensor.new_empty = saved


def record_launches(scenarios, archs, jits, tuners, device: str = "cpu",
                    skip_compile: bool = True) -> tuple[list[Launch], list[str]]:
    """Runs every scenario once per arch; returns the recorded launches and scenario errors.

    device "cpu": CPU tensors and a stand-in driver per arch (no GPU needed). "cuda": the real
    driver and CUDA tensors (archs is then the device's own arch): what the launch on that GPU
    binds, by construction. skip_compile=False lets Triton go on to compile each launch itself
    (precompile's check of its cache keys against the JIT's own)."""
    from triton.runtime import driver

    from moe_inductor.kernels import launch_utils

    launches: list[Launch] = []
    errors: list[str] = []
    state = {"config": None, "autotuned": False, "dtype": None, "arch": None, "tune_key": ()}

    def hook(*, key, repr, fn, compile, is_manual_warmup, already_compiled):
        jf = fn.jit_function
        spec = json.loads(compile["specialization_data"])
        constants = compile["constants"]
        if state["config"] is not None:
            config = dict(state["config"])
        else:  # not autotuned: the launch's own tile constexprs
            config = {}
            for i, p in enumerate(jf.params):
                if p.is_constexpr and p.name.startswith("BLOCK"):
                    config[p.name] = constants[(i,)]
        config.update({k: spec["options"][k] for k in _CONFIG_OPTION_KEYS})
        launches.append(Launch(
            arch=state["arch"], fn=jf, signature=dict(compile["signature"]), constants=dict(constants),
            attrs=dict(compile["configs"][0]), options=_tuples(spec["options"]), config=config,
            autotuned=state["autotuned"], dtype=state["dtype"], tune_key=state["tune_key"],
        ))
        return skip_compile  # True: skip compilation and the launch

    from moe_inductor.ops.activations import parse_activation
    from moe_inductor.ops.op import fused_moe

    with _discovery_hooks(device, hook, tuners, state), _zero_fill_empty():
        for arch in archs:
            if device == "cpu":
                driver.set_active(_StandInDriver(arch))
            state["arch"] = driver.active.get_current_target().arch
            for sc in scenarios:
                state["dtype"] = sc.dtype
                launch_utils.ALLOW_TF32 = sc.dtype == "fp32_tf32"
                try:
                    _run_scenario(sc, parse_activation, fused_moe, device)
                except Exception as exc:  # noqa: BLE001 - reported, the other scenarios still run
                    errors.append(f"sm_{arch} {sc}: {type(exc).__name__}: {exc}")
    return launches, errors


def _tuner_run(tuner, state: dict):
    """Autotuner.run replaced: every candidate its (per-dtype) pruning keeps is "launched" in turn,
    with the same keyword arguments Autotuner._bench gives it (config.all_kwargs())."""
    def run(*args, **kwargs):
        tuner.nargs = dict(zip(tuner.arg_names, args))
        try:
            configs = tuner.prune_configs(kwargs) if len(tuner.configs) > 1 else list(tuner.configs)
        finally:
            tuner.nargs = None
        named = {**dict(zip(tuner.arg_names, args)), **kwargs}
        tune_key = (tuner.base_fn.__name__,) + tuple(repr(named.get(k)) for k in tuner.keys) + tuple(
            str(a.dtype) for a in named.values() if hasattr(a, "dtype"))
        for cfg in configs:
            state["config"], state["autotuned"], state["tune_key"] = dict(cfg.kwargs), True, tune_key
            try:
                tuner.fn.run(*args, **kwargs, **cfg.all_kwargs())
            finally:
                state["config"], state["autotuned"], state["tune_key"] = None, False, ()
    return run


@contextlib.contextmanager
def _discovery_hooks(device: str, hook, tuners: dict, state: dict):
    """The jit_cache_hook and the autotuners' run installed, and everything restored after."""
    from triton import knobs
    from triton.runtime import driver

    from moe_inductor.kernels import launch_utils

    saved_env = os.environ.get("TRITON_INTERPRET")
    saved_driver = driver._active  # None until a real driver was created (none on a CPU machine)
    saved = knobs.runtime.jit_cache_hook, launch_utils.ALLOW_TF32, launch_utils.DEBUG_FILL_NAN
    if device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # the op's CPU-tensor check only; triton is already imported
    knobs.runtime.jit_cache_hook = hook
    launch_utils.DEBUG_FILL_NAN = False
    for tuner in tuners.values():
        tuner.run = _tuner_run(tuner, state)
    try:
        yield
    finally:
        if device == "cpu":
            driver._active = saved_driver
        knobs.runtime.jit_cache_hook, launch_utils.ALLOW_TF32, launch_utils.DEBUG_FILL_NAN = saved
        for tuner in tuners.values():
            del tuner.run
        if saved_env is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved_env


def _run_scenario(sc: Scenario, parse_activation, fused_moe, device: str = "cpu") -> None:
    T, d, n, E, K = sc.dims()
    from moe_inductor.kernels import config

    tile = config.kernel_tile_m(T * K, E)
    if isinstance(sc.shape, str) and tile != SHAPE_TILE_M[sc.shape]:
        raise RuntimeError(f"shape {sc.shape} gives row tile {tile}, not {SHAPE_TILE_M[sc.shape]}: update SHAPES")
    act = parse_activation(sc.activation)
    dt = DTYPES[sc.dtype]
    g = torch.Generator().manual_seed(0)
    h_cols = act.width * n

    def param(*shape):  # on a GPU: zeros made there (values do not matter, the kernels are skipped)
        t = torch.randn(*shape, generator=g).to(dt) if device == "cpu" else torch.zeros(*shape, dtype=dt, device=device)
        return t.requires_grad_()

    x, w1, w2 = param(T, d), param(E, h_cols, d), param(E, d, n)
    b1, b2 = (param(E, h_cols), param(E, d)) if sc.bias else (None, None)
    token_ids, expert_ids, scores = _scenario_routing(sc, T, E, K, g)
    scores = scores.to(device, dt).requires_grad_()
    out = fused_moe(x, token_ids.to(device), expert_ids.to(device), scores, w1, w2, b1=b1, b2=b2,
                    activation=act.spec, interleaved=sc.interleaved, recompute_h=sc.recompute_h, impl="triton")
    out.sum().backward()


def _scenario_routing(sc: Scenario, T: int, E: int, K: int, g) -> tuple:
    """(token_ids, expert_ids, scores) of the scenario's routing kind, on CPU."""
    if sc.routing.startswith("token_rounding"):
        from moe_inductor.ops.routing import token_rounding_routing

        probs = torch.randn(T, E, generator=g).softmax(-1)
        r = token_rounding_routing(probs, K, sc.tr_tile_m, "nearest", static_shape=sc.routing == "token_rounding")
        return r.token_ids, r.expert_ids, r.scores
    if sc.routing == "skewed":  # every token on experts 0..K-1, the others empty
        expert_ids = torch.arange(K).repeat(T)
    else:
        expert_ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).reshape(-1)
    expert_ids = expert_ids.to(torch.int32)
    if sc.routing == "dropped":  # every third assignment dropped (-1)
        expert_ids[::3] = -1
    elif sc.routing not in ("topk", "skewed"):
        raise ValueError(f"unknown routing {sc.routing!r}")
    token_ids = torch.arange(T, dtype=torch.int32).repeat_interleave(K)
    return token_ids, expert_ids, torch.rand(T * K, generator=g)


def default_scenarios(dtypes, acts, shapes=tuple(SHAPES), kinds=("plain", "flags")) -> list[Scenario]:
    """Every dtype x activation in the plain layout, and per dtype the flags that add code: biases,
    interleaved gate/up and recomputed H (with the heaviest gated epilogue, GPT-OSS, and with a
    non-gated one), each at every shape (row tiles 128, 16, 32, 64)."""
    out = []
    for dt in dtypes:
        for a in acts if "plain" in kinds else ():
            for shape in shapes:
                out.append(Scenario(dt, a, bias=False, interleaved=False, recompute_h=False, shape=shape))
        flag_acts = [a for a in acts if a.startswith("gptoss")] or acts[:1]
        flag_acts += [a for a in acts if a in ("gelu", "silu")][:1]
        for a in flag_acts if "flags" in kinds else ():
            gated = a not in ("silu", "gelu", "gelu_tanh", "relu", "relu2", "swiglu3")  # interleaved halves
            for shape in shapes:
                out.append(Scenario(dt, a, bias=True, interleaved=gated, recompute_h=True, shape=shape))
    return out


def triton_activations() -> list[str]:
    from moe_inductor.ops.activations import ALL_KINDS, Activation

    return [Activation(kind).spec for kind in ALL_KINDS if Activation(kind).triton]


# ------------------------------------------------------------------------------------------------
# 2. compilation for the target and ptxas -v
# ------------------------------------------------------------------------------------------------
_JOBS: list[Launch] = []  # set before the worker processes fork


def _ptxas_path(arch: int) -> str:
    from triton.backends.nvidia import compiler as nv

    return nv.get_ptxas(arch).path


def _cache_dir() -> Path:
    base = os.environ.get("TRITON_CACHE_DIR") or os.path.join(Path.home(), ".triton", "cache")
    d = Path(base) / "moe_inductor_ptxas_logs"
    d.mkdir(parents=True, exist_ok=True)
    return d


def compile_launch(fn, signature: dict, constants: dict, attrs: dict, options: dict, arch: int):
    """What JITFunction._do_compile does for a launch (triton 3.6 and 3.9 alike): compile
    ``ASTSource(fn, signature, constexprs, attrs)`` for the target with the launch's options. The
    on-disk cache key is a function of exactly these (plus Triton's version, the backend's ptxas
    version and arch, and the cache-invalidating environment), so a JIT launch with the same
    specialisation on that target finds the result in TRITON_CACHE_DIR."""
    src = ASTSource(fn, signature, constants, attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, WARP_SIZE), options=options)


def unique_launches(launches: list) -> tuple[list, list]:
    """(one Launch per distinct compile, [(index into the first list, launch)] per distinct
    (compile, dtype label))."""
    by_spec: dict[str, int] = {}
    unique: list[Launch] = []
    entry_of: list[tuple[int, Launch]] = []
    seen_entries = set()
    for l in launches:
        key = l.spec_key()
        if key not in by_spec:
            by_spec[key] = len(unique)
            unique.append(l)
        if (key, l.dtype) not in seen_entries:
            seen_entries.add((key, l.dtype))
            entry_of.append((by_spec[key], l))
    return unique, entry_of


def _compile_job(i: int) -> dict:
    job = _JOBS[i]
    from triton import knobs

    captured = io.StringIO()
    t0 = time.time()
    knobs.nvidia.dump_ptxas_log = True  # Triton prints its own `ptxas -v` log when it compiles
    try:
        with contextlib.redirect_stdout(captured):
            k = compile_launch(job.fn, job.signature, job.constants, job.attrs, job.options, job.arch)
    except Exception as exc:  # noqa: BLE001 - a config that does not compile is a finding
        return {"error": f"{type(exc).__name__}: {str(exc)[:400]}", "compile_s": time.time() - t0}
    finally:
        knobs.nvidia.dump_ptxas_log = False
    log = captured.getvalue()
    cache = _cache_dir() / f"{k.hash}_sm{job.arch}.log"
    ptxas_source = "triton"
    if "registers" in log:
        cache.write_text(log)
    elif cache.exists():
        log = cache.read_text()
    else:  # Triton's cache hit without our log: run the same ptxas ourselves
        log = _run_ptxas(k.asm["ptx"], job.arch, job.options)
        ptxas_source = "rerun"
        cache.write_text(log)
    ptx = k.asm["ptx"]
    res = parse_ptxas_log(log, k.name)
    res.update(
        smem=int(k.metadata.shared),
        uses_wgmma="wgmma.mma_async" in ptx,
        uses_mma_sync=bool(re.search(r"\bmma\.sync\.", ptx)),
        uses_cp_async=bool(re.search(r"\bcp\.async\.(ca|cg)\b", ptx)),
        uses_tma="cp.async.bulk" in ptx,
        ptxas=ptxas_source,
        compile_s=round(time.time() - t0, 2),
    )
    return res


def _indexed_compile_job(i: int) -> tuple[int, dict]:
    return i, _compile_job(i)


def _run_ptxas(ptx: str, arch: int, options: dict) -> str:
    import tempfile

    name = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        Path(src).write_text(ptx)
        cmd = [_ptxas_path(arch), "-lineinfo", "-v", f"--gpu-name={name}", src, "-o", os.path.join(tmp, "k.o")]
        if not options.get("enable_fp_fusion", True):
            cmd.insert(1, "--fmad=false")
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return res.stderr + res.stdout


def parse_ptxas_log(log: str, name: str) -> dict:
    """Registers, spills and stack of entry ``name`` from a ``ptxas -v`` log (plus its warnings)."""
    # the log of one kernel: from "Compiling entry function 'name'" to the next entry or the end
    m = re.search(rf"Compiling entry function '{re.escape(name)}'(.*?)(?=Compiling entry function|\Z)", log, re.S)
    body = m.group(1) if m else log
    regs = re.search(r"Used (\d+) registers", body)
    spill = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", body)
    if regs is None or spill is None:
        raise RuntimeError(f"could not parse the ptxas log of {name}:\n{log[-2000:]}")
    warnings = sorted({w.strip() for w in re.findall(r"ptxas\s*(?:warning|info)\s*:\s*(.*(?:Performance|serializ).*)", log)})
    return {
        "registers": int(regs.group(1)),
        "stack_frame": int(spill.group(1)),
        "spill_stores": int(spill.group(2)),
        "spill_loads": int(spill.group(3)),
        "ptxas_warnings": warnings,
    }


def verdict(entry: dict) -> tuple[bool, list[str]]:
    lim = ARCH_LIMITS[entry["arch"]]
    why = []
    if "error" in entry:
        return False, [f"does not compile: {entry['error']}"]
    if entry["spill_stores"] or entry["spill_loads"]:
        why.append(f"spills ({entry['spill_stores']} B stores, {entry['spill_loads']} B loads)")
    if entry["smem"] > lim["smem_per_block"]:
        why.append(f"shared memory {entry['smem']} B > {lim['smem_per_block']} B")
    threads = entry["config"]["num_warps"] * WARP_SIZE
    if entry["registers"] * threads > lim["regs_per_sm"]:
        why.append(f"{entry['registers']} registers x {threads} threads > {lim['regs_per_sm']}")
    return not why, why


# ------------------------------------------------------------------------------------------------
# 3. driver
# ------------------------------------------------------------------------------------------------
def collect(archs, dtypes, acts, kernels=None, jobs=2, shapes=tuple(SHAPES), kinds=("plain", "flags"),
            log=print) -> dict:
    global _JOBS
    t0 = time.time()
    mods = kernel_modules()
    jits, tuners = discover_kernels(mods)
    scenarios = default_scenarios(dtypes, acts, shapes, kinds)
    launches, errors = record_launches(scenarios, archs, jits, tuners)
    launched = {id(l.fn) for l in launches}
    never = sorted(f"{jf.fn.__module__.rsplit('.', 1)[-1]}.{jf.fn.__name__}" for i, jf in jits.items()
                   if i not in launched and jf.fn.__name__.endswith("_kernel"))
    if kernels:
        launches = [l for l in launches if l.kernel.split(".")[-1] in kernels or l.kernel in kernels]
    # one compile per distinct specialisation; one entry per (specialisation, dtype label)
    unique, entry_of = unique_launches(launches)
    log(f"discovery: {len(scenarios)} scenarios x {len(archs)} arch(s), {len(launches)} launches, "
        f"{len(unique)} distinct compiles ({time.time() - t0:.1f} s)")
    _JOBS = unique
    t1 = time.time()
    if jobs > 1 and len(unique) > 1:
        results = [None] * len(unique)
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            for done, (i, res) in enumerate(pool.imap_unordered(_indexed_compile_job, range(len(unique))), 1):
                results[i] = res
                if done % 10 == 0 or done == len(unique):
                    log(f"  {done}/{len(unique)} compiled ({time.time() - t1:.0f} s)")
    else:
        results = [_compile_job(i) for i in range(len(unique))]
    log(f"compiled {len(unique)} kernels in {time.time() - t1:.1f} s with {jobs} process(es)")
    entries = []
    for idx, l in entry_of:
        e = {"kernel": l.kernel, "dtype": l.dtype, "arch": l.arch, "config": l.config, "autotuned": l.autotuned,
             "variant": l.variant(), "unit_args": l.unit_args(), **results[idx], "smem_limit": ARCH_LIMITS[l.arch]["smem_per_block"]}
        e["ok"], e["why_not_ok"] = verdict(e)
        entries.append(e)
    entries.sort(key=_entry_order)
    return {
        "command": "python examples/kernel_resources.py " + " ".join(sys.argv[1:]),
        "versions": {"triton": triton.__version__, "torch": torch.__version__,
                     "ptxas": {str(a): _ptxas_version(a) for a in archs}},
        "limits": {str(a): ARCH_LIMITS[a] for a in archs},
        "shapes": SHAPES,
        "shape_tile_m": {k: SHAPE_TILE_M[k] for k in shapes},
        "scenarios": [dataclasses.asdict(s) for s in scenarios],
        "discovery_errors": errors,
        "never_launched": never,
        "entries": entries,
    }


def merge(old: dict, new: dict, kernels=None) -> dict:
    """``new`` plus the entries of ``old`` for (dtype, arch) pairs ``new`` has none of (same compilers).
    With ``kernels`` (the run's --kernels: only those were recompiled, e.g. after editing them), the
    entries of ``old`` for every other kernel are kept instead and all of its entries of these
    kernels, under any module name, are replaced."""
    if old["versions"]["triton"] != new["versions"]["triton"]:
        raise SystemExit(f"--merge: triton {old['versions']['triton']} there, {new['versions']['triton']} here")
    covered = {(e["dtype"], e["arch"]) for e in new["entries"]}
    if kernels:
        kept = [e for e in old["entries"] if e["kernel"].split(".")[-1] not in kernels and e["kernel"] not in kernels]
    else:
        kept = [e for e in old["entries"] if (e["dtype"], e["arch"]) not in covered]
    out = dict(new)
    out["command"] = old["command"] + " ; " + new["command"]
    out["versions"] = {**old["versions"], **new["versions"],
                       "ptxas": {**old["versions"]["ptxas"], **new["versions"]["ptxas"]}}
    out["limits"] = {**old["limits"], **new["limits"]}
    out["scenarios"] = old["scenarios"] + [s for s in new["scenarios"] if s not in old["scenarios"]]
    out["discovery_errors"] = old["discovery_errors"] + new["discovery_errors"]
    out["never_launched"] = sorted(set(old["never_launched"]) & set(new["never_launched"]))
    out["entries"] = kept + new["entries"]
    out["entries"].sort(key=_entry_order)
    return out


def _entry_order(e: dict):
    return (e["kernel"], -e["arch"], list(DTYPES).index(e["dtype"]), json.dumps(e["variant"], sort_keys=True),
            json.dumps(e["config"], sort_keys=True))


def _ptxas_version(arch: int) -> str:
    try:
        out = subprocess.run([_ptxas_path(arch), "--version"], capture_output=True, text=True).stdout
    except OSError as exc:
        return f"unavailable: {exc}"
    m = re.search(r"release [\d.]+, V[\d.]+", out)
    return m.group(0) if m else out.strip().splitlines()[-1]


def _short_variant(v: dict) -> str:
    skip = {"INTERPRET"}
    return ",".join(f"{k}={int(x) if isinstance(x, bool) else x}" for k, x in v.items() if k not in skip)


def format_table(result: dict) -> str:
    rows = [("kernel", "dtype", "sm", "config", "regs", "spill st/ld", "smem KB", "wgmma", "mma", "cp.async",
             "tma", "ok", "variant")]
    for e in result["entries"]:
        c = e["config"]
        cfg = "x".join(str(v) for k, v in c.items() if k not in _CONFIG_OPTION_KEYS)
        cfg += f" w{c['num_warps']} s{c['num_stages']}"
        if "error" in e:
            rows.append((e["kernel"], e["dtype"], str(e["arch"]), cfg, "-", "-", "-", "-", "-", "-", "-", "ERR",
                         e["error"][:60]))
            continue
        rows.append((e["kernel"], e["dtype"], str(e["arch"]), cfg, str(e["registers"]),
                     f"{e['spill_stores']}/{e['spill_loads']}", f"{e['smem'] / 1024:.1f}",
                     "y" if e["uses_wgmma"] else "-", "y" if e["uses_mma_sync"] else "-",
                     "y" if e["uses_cp_async"] else "-", "y" if e["uses_tma"] else "-",
                     "ok" if e["ok"] else "NO", _short_variant(e["variant"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(r[i].ljust(widths[i]) for i in range(len(widths))) + "  " + r[-1] for r in rows]
    bad = [e for e in result["entries"] if not e["ok"]]
    lines.append(f"{len(result['entries'])} entries, {len(bad)} not ok")
    for e in bad:
        lines.append(f"  NOT OK {e['kernel']} {e['dtype']} sm_{e['arch']} {e['config']}: {'; '.join(e['why_not_ok'])}")
    for w in sorted({w for e in result["entries"] for w in e.get("ptxas_warnings", [])}):
        lines.append(f"  ptxas: {w}")
    if result["never_launched"]:
        lines.append(f"never launched by any scenario: {', '.join(result['never_launched'])}")
    for err in result["discovery_errors"]:
        lines.append(f"discovery error: {err}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="90,80", help="comma-separated compute capabilities (90, 80)")
    ap.add_argument("--out", default=None, help="JSON output path (e.g. examples/results/sm90_kernels.json)")
    ap.add_argument("--dtypes", default="bf16,fp16,fp32,fp32_tf32",
                    help="bf16, fp16, fp32 (ieee, the default fp32 path), fp32_tf32 (MOE_INDUCTOR_ALLOW_TF32=1)")
    ap.add_argument("--acts", default="all", help="'all' Triton activations, or a comma-separated list of specs")
    ap.add_argument("--kernels", default=None, help="only these kernels (function names)")
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"scenario shapes, of {', '.join(SHAPES)}")
    ap.add_argument("--scenarios", default="plain,flags",
                    help="plain (no bias, concatenated gate/up, H kept) and/or flags (biases, interleaved, H recomputed)")
    ap.add_argument("--merge", default=None,
                    help="a previous JSON to extend: its entries for (dtype, arch) pairs this run does not cover are "
                         "kept; with --kernels, its entries of every kernel not named there")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    args = ap.parse_args(argv)
    archs = [int(a) for a in args.arch.split(",")]
    for a in archs:
        if a not in ARCH_LIMITS:
            ap.error(f"--arch {a}: known: {sorted(ARCH_LIMITS)}")
    dtypes = args.dtypes.split(",")
    for dt in dtypes:
        if dt not in DTYPES:
            ap.error(f"--dtypes {dt}: known: {', '.join(DTYPES)}")
    acts = triton_activations() if args.acts == "all" else args.acts.split(",")
    kernels = set(args.kernels.split(",")) if args.kernels else None
    torch.set_num_threads(1)
    shapes = args.shapes.split(",")
    for sh in shapes:
        if sh not in SHAPES:
            ap.error(f"--shapes {sh}: known: {', '.join(SHAPES)}")
    kinds = tuple(args.scenarios.split(","))
    if not set(kinds) <= {"plain", "flags"}:
        ap.error(f"--scenarios {args.scenarios}: plain and/or flags")
    result = collect(archs, dtypes, acts, kernels, args.jobs, shapes, kinds, log=lambda m: print(m, flush=True))
    if args.merge:
        result = merge(json.loads(Path(args.merge).read_text()), result, kernels)
    print(format_table(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1, sort_keys=False) + "\n")
        print(f"wrote {args.out}")
    return 0 if all(e["ok"] for e in result["entries"]) and not result["discovery_errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
