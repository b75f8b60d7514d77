"""Inductor's FX-graph cache and the AOTAutograd cache are keyed on this package's code, the
backend options and the versions (issue 11, item 2; ``moe_inductor/compile/cache_key.py``).

The end-to-end test compiles a tiny MoE forward + backward in fresh processes that share one
temporary cache directory (FX-graph and AOTAutograd caches on, remote caches off):
  1. cold: cache miss; the same process again after ``torch._dynamo.reset()``: cache hit;
     then a simulated code change (``cache_key.set_extra``): miss;
  2. a fresh process with the same package: hit (the key is stable across processes);
  3. a fresh process importing a temporary copy of the package whose ``op.py`` backward scales
     the incoming gradient by 2: miss, and the gradients are doubled. Before the key covered the
     package's code, step 3 was an AOTAutograd cache hit that served the old backward graph
     (unchanged gradients): the stale-code bug of the issue.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from moe_inductor.compile import cache_key
from moe_inductor.compile.options import SonicOptions

DRIVER = textwrap.dedent('''
    import json, sys
    import torch
    import torch.nn.functional as F
    from torch._dynamo.utils import counters

    torch._inductor.config.fx_graph_cache = True
    torch._inductor.config.fx_graph_remote_cache = False
    torch._functorch.config.enable_autograd_cache = True
    if hasattr(torch._functorch.config, "enable_remote_autograd_cache"):
        torch._functorch.config.enable_remote_autograd_cache = False

    class MoE(torch.nn.Module):  # gpt-fast ConditionalFeedForward spelling (idiom batched_mm)
        def __init__(self, d=16, n=8, E=4, K=2):
            super().__init__()
            g = torch.Generator().manual_seed(0)
            self.gate = torch.nn.Parameter(torch.randn(E, d, generator=g) / d**0.5)
            self.w1 = torch.nn.Parameter(torch.randn(E, n, d, generator=g) / d**0.5)
            self.w3 = torch.nn.Parameter(torch.randn(E, n, d, generator=g) / d**0.5)
            self.w2 = torch.nn.Parameter(torch.randn(E, d, n, generator=g) / n**0.5)
            self.K = K

        def forward(self, x):
            w, idx = torch.topk(F.softmax(x @ self.gate.t(), dim=-1), self.K, dim=-1)
            x1 = F.silu(torch.einsum("ti,taoi->tao", x, self.w1[idx]))
            x3 = torch.einsum("ti,taoi->tao", x, self.w3[idx])
            y = torch.einsum("tao,taio->tai", x1 * x3, self.w2[idx])
            return torch.einsum("tai,ta->ti", y, w)

    def run(extra):
        import moe_inductor.compile.cache_key as ck
        if extra:
            ck.set_extra(extra)
        torch._dynamo.reset()
        counters.clear()
        m = MoE()
        x = torch.randn(8, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
        out = torch.compile(m, backend="sonic")(x)
        out.backward(torch.ones_like(out))
        c = lambda k, n: counters[k][n]
        return dict(rewrites=c("sonic", "moe_rewrites"),
                    aot_hit=c("aot_autograd", "autograd_cache_hit"), aot_miss=c("aot_autograd", "autograd_cache_miss"),
                    fx_hit=c("inductor", "fxgraph_cache_hit"), fx_miss=c("inductor", "fxgraph_cache_miss"),
                    out=out.detach().tolist(), dx=x.grad.tolist(), dw1=m.w1.grad.tolist())

    import moe_inductor
    results = [run(step if step != "same" else None) for step in sys.argv[1:]]
    print("RESULT " + json.dumps(dict(package=moe_inductor.__file__, runs=results)))
''')


def _run(tmp_path, steps, pythonpath=None) -> dict:
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor_cache"))
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(driver), *steps], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"driver failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def _copy_package(dest):
    """A snapshot of moe_inductor as imported here (with its patterns subpackage) under ``dest``:
    the processes below import it through PYTHONPATH, so edits made to the working tree while the
    test runs cannot change their key."""
    pkg, *extra = cache_key.package_dirs()
    target = dest / "moe_inductor"
    shutil.copytree(pkg, target, ignore=shutil.ignore_patterns("__pycache__"))
    for folder in extra:  # the patterns folder of a checkout install (moe_inductor.patterns)
        shutil.copytree(folder, target / "patterns", ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
    return dest


def _double_the_backward(root):
    """Make op.py's autograd backwards (``_backward`` of fused_moe, ``_experts_backward`` of
    fused_moe_experts) multiply the incoming gradient by 2: a code change that shows only in the
    traced (and cached) backward graph."""
    op = root / "moe_inductor" / "ops" / "op.py"
    new, count = re.subn(r"(\ndef _(?:experts_)?backward\w*\(ctx, grad_out\b[^)]*\):\n)",
                         r"\1    grad_out = grad_out * 2\n", op.read_text())
    assert count >= 1, "op.py has no 'def _backward(ctx, grad_out, ...)' to modify: update this test"
    op.write_text(new)


@pytest.mark.slow  # three fresh processes, one cold Inductor compile of forward + backward
def test_code_change_invalidates_warm_caches(tmp_path):
    snapshot = _copy_package(tmp_path / "pkg")
    first = _run(tmp_path, ["same", "same", "simulated code change"], pythonpath=snapshot)
    assert first["package"].startswith(str(snapshot)), first["package"]
    cold, warm, changed = first["runs"]
    assert cold["rewrites"] == 1 and cold["aot_miss"] >= 1 and cold["aot_hit"] == 0
    assert warm["aot_hit"] >= 1 and warm["aot_miss"] == 0, warm  # nothing changed: served from the caches
    assert changed["aot_hit"] == 0 and changed["aot_miss"] >= 1, changed  # the key covers set_extra
    assert changed["fx_hit"] == 0 and changed["fx_miss"] >= 1, changed
    for run in (warm, changed):
        assert run["out"] == cold["out"] and run["dx"] == cold["dx"] and run["dw1"] == cold["dw1"]

    again = _run(tmp_path, ["same"], pythonpath=snapshot)["runs"][0]
    assert again["aot_hit"] >= 1 and again["aot_miss"] == 0, again  # the key is stable across processes

    modified = _copy_package(tmp_path / "pkg_modified")
    _double_the_backward(modified)
    result = _run(tmp_path, ["same"], pythonpath=modified)
    assert result["package"].startswith(str(modified)), result["package"]
    new = result["runs"][0]
    assert new["rewrites"] == 1
    assert new["aot_hit"] == 0 and new["aot_miss"] >= 1, new  # the changed op.py is a new key ...
    torch.testing.assert_close(torch.tensor(new["out"]), torch.tensor(cold["out"]), rtol=0, atol=0)
    for name in ("dx", "dw1"):  # ... so its backward runs: gradients doubled, not the stale ones
        torch.testing.assert_close(torch.tensor(new[name]), 2 * torch.tensor(cold[name]), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- the key, in process

def test_key_covers_options_versions_and_extra(monkeypatch):
    a = cache_key.SonicCacheKeyPass(SonicOptions()).uuid()
    assert a == cache_key.SonicCacheKeyPass(SonicOptions()).uuid()  # deterministic
    assert a != cache_key.SonicCacheKeyPass(SonicOptions(recompute_h=True)).uuid()
    assert a != cache_key.SonicCacheKeyPass(SonicOptions(token_rounding="up")).uuid()
    # Inductor patches are keyed by Inductor itself (and may hold objects without a stable repr)
    assert a == cache_key.SonicCacheKeyPass(SonicOptions(inductor={"max_autotune": False})).uuid()
    monkeypatch.setattr(cache_key, "versions", lambda: (("torch", "0.0"), ("triton", None), ("transformers", None)))
    assert a != cache_key.SonicCacheKeyPass(SonicOptions()).uuid()
    monkeypatch.undo()
    monkeypatch.setattr(cache_key, "_extra", "x")
    assert a != cache_key.SonicCacheKeyPass(SonicOptions()).uuid()
    versions = dict(cache_key.versions())
    assert versions["torch"] == torch.__version__ and "transformers" in versions


def test_package_hash_covers_every_python_file(tmp_path, monkeypatch):
    """Any .py file of the package and its patterns folder changes the hash; other files do not."""
    pkg, patterns = tmp_path / "moe_inductor", tmp_path / "patterns"
    (pkg / "kernels").mkdir(parents=True)
    patterns.mkdir()
    for f in (pkg / "op.py", pkg / "kernels" / "k.py", patterns / "idiom.py"):
        f.write_text("x = 1\n")
    monkeypatch.setattr(cache_key, "package_dirs", lambda: [pkg, patterns])

    def digest():
        cache_key.package_hash.cache_clear()
        return cache_key.package_hash()

    try:
        base = digest()
        (pkg / "notes.txt").write_text("not code")
        assert digest() == base
        for f in (pkg / "op.py", pkg / "kernels" / "k.py", patterns / "idiom.py"):
            f.write_text("x = 2\n")
            assert digest() != base, f
            f.write_text("x = 1\n")
            assert digest() == base
        (patterns / "new_idiom.py").write_text("")
        assert digest() != base
    finally:
        cache_key.package_hash.cache_clear()


def test_real_package_dirs_include_patterns_and_kernels():
    dirs = cache_key.package_dirs()
    files = {p.name for d in dirs for p in d.rglob("*.py")}
    assert {"op.py", "backend.py", "cache_key.py", "grouped_gemm.py", "activation_jit.py"} <= files
    import moe_inductor.patterns as patterns

    # the patterns folder is hashed: its own entry (a checkout) or inside the package's (an install)
    for p in patterns.__path__:
        p = Path(p).resolve()
        assert any(p == d or d in p.parents for d in dirs), (p, dirs)


class _KeyedPass(torch._inductor.custom_graph_pass.CustomGraphPass):
    def __init__(self, key):
        self.key, self.calls = key, 0

    def __call__(self, graph):
        self.calls += 1

    def uuid(self):
        return self.key


def test_wraps_a_configured_pass():
    """An already configured post-grad pass still runs and stays in the key; one without a uuid
    makes ours None, so Inductor bypasses its caches as it would without sonic."""
    opts = SonicOptions()
    inner = _KeyedPass("k1")
    patched = cache_key.config_patch(opts, {"post_grad_custom_post_pass": inner})
    p = patched["post_grad_custom_post_pass"]
    assert isinstance(p, cache_key.SonicCacheKeyPass) and p.inner is inner
    p(torch.fx.Graph())
    assert inner.calls == 1
    assert p.uuid() != cache_key.config_patch(opts, {"post_grad_custom_post_pass": _KeyedPass("k2")})[
        "post_grad_custom_post_pass"].uuid()
    assert cache_key.config_patch(opts, {"post_grad_custom_post_pass": lambda g: None})[
        "post_grad_custom_post_pass"].uuid() is None
    both = cache_key.config_patch(opts, {"post_grad_custom_post_pass": [inner, _KeyedPass("k3")]})
    both["post_grad_custom_post_pass"](torch.fx.Graph())
    assert inner.calls == 2 and both["post_grad_custom_post_pass"].uuid() is not None
    # nothing configured: the current Inductor config's value (None by default) is wrapped
    assert cache_key.config_patch(opts, {})["post_grad_custom_post_pass"].inner is None


def test_backend_installs_the_key_pass_for_forward_and_backward(monkeypatch, fresh_dynamo):
    """sonic() hands the pass to compile_fx as a config patch (what reaches the backward compile
    too), not as a context around it."""
    import torch._inductor.compile_fx as cfx

    seen = []

    def fake_compile_fx(gm, example_inputs, config_patches=None, **kw):
        seen.append(config_patches)
        return gm.forward

    monkeypatch.setattr(cfx, "compile_fx", fake_compile_fx)
    f = torch.compile(lambda x: torch.sin(x) + 1, backend="sonic", options={"recompute_h": True})
    f(torch.randn(3))
    assert seen and all(isinstance(p["post_grad_custom_post_pass"], cache_key.SonicCacheKeyPass) for p in seen)
    assert seen[0]["post_grad_custom_post_pass"].opts.recompute_h is True
