"""Importing and using the sonic backend changes nothing for the rest of the process: no torch
config value, no transformers class, and a plain ``backend="inductor"`` compile behaves exactly as
in a process that never imported the package. Each check runs in a fresh subprocess (the config
and Dynamo state of the pytest process are shared with every other test)."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # fresh subprocesses with full compiles: run by CI with -m slow

TESTS = Path(__file__).resolve().parent

# Prints a JSON summary: the configs before/after, the transformers forward identities, and what a
# plain Inductor compile of a where-loop MoE did (graphs, graph breaks, frames, output).
SCRIPT = textwrap.dedent(r"""
    import json, os, sys
    import torch
    sys.path.insert(0, os.environ["TESTS_DIR"])
    use_sonic = os.environ["USE_SONIC"] == "1"

    def configs():
        out = {}
        for name, cfg in (("dynamo", torch._dynamo.config), ("inductor", torch._inductor.config),
                          ("functorch", torch._functorch.config)):
            out[name] = {k: canon(v) for k, v in cfg.get_config_copy().items()}
        return out

    def canon(v):
        # sets by content: a config.patch restores a copy whose iteration order may differ
        if isinstance(v, (set, frozenset)):
            return repr(sorted(map(repr, v)))
        return repr(v)

    def forwards():
        try:
            from transformers.models.switch_transformers import modeling_switch_transformers as sw
            from transformers.models.mixtral import modeling_mixtral as mx
        except ImportError:
            return {}
        classes = [sw.SwitchTransformersExperts, sw.SwitchTransformersSparseMLP, mx.MixtralExperts,
                   mx.MixtralSparseMoeBlock]
        return {c.__qualname__: (id(c.forward), c.forward.__code__.co_filename) for c in classes}

    before, fwd_before = configs(), forwards()
    if use_sonic:
        import moe_inductor.compile.backend  # noqa: F401
        from moe_modules import LoopMoE
        torch.manual_seed(1)
        m = LoopMoE(d=8, n=8, E=2, K=1)
        torch.compile(m, backend="sonic")(torch.randn(1, 3, 8))  # a sonic compile of a where-loop
        torch._dynamo.reset()
    after, fwd_after = configs(), forwards()

    from torch._dynamo.utils import counters
    from moe_modules import LoopMoE
    counters.clear()
    torch.manual_seed(0)
    m = LoopMoE(d=16, n=8, E=3, K=2)
    x = torch.randn(1, 5, 16)
    out = torch.compile(m, backend="inductor")(x)
    print("JSON" + json.dumps({
        "config_changes": {n: sorted(k for k in before[n] if before[n][k] != after[n].get(k)) for n in before},
        "forwards_same": fwd_before == fwd_after, "forwards": len(fwd_before),
        "capture_flag": torch._dynamo.config.capture_dynamic_output_shape_ops,
        "inductor": {"graphs": counters["stats"]["unique_graphs"],
                     "graph_breaks": sorted(counters["graph_break"]),
                     "frames": dict(counters["frames"]),
                     "out": out.detach().flatten().tolist(),
                     "eager": m(x).detach().flatten().tolist()},
    }))
""")


def _run(use_sonic: bool) -> dict:
    env = dict(os.environ, TESTS_DIR=str(TESTS), USE_SONIC="1" if use_sonic else "0", HF_HUB_OFFLINE="1")
    env.pop("TORCHDYNAMO_CAPTURE_DYNAMIC_OUTPUT_SHAPE_OPS", None)
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("JSON"))
    return json.loads(line[4:])


@pytest.fixture(scope="module")
def runs():
    return _run(use_sonic=False), _run(use_sonic=True)


def test_configs_and_classes_untouched(runs):
    _, with_sonic = runs
    assert with_sonic["config_changes"] == {"dynamo": [], "inductor": [], "functorch": []}
    assert with_sonic["capture_flag"] is False
    if with_sonic["forwards"]:
        assert with_sonic["forwards_same"]


def test_plain_inductor_compile_behaves_as_without_the_package(runs):
    without, with_sonic = runs
    a, b = without["inductor"], with_sonic["inductor"]
    # same capture (Dynamo skips the loop frame and compiles the pieces around it), same values
    assert (a["graphs"], a["graph_breaks"], a["frames"]) == (b["graphs"], b["graph_breaks"], b["frames"])
    assert a["out"] == b["out"]
    assert max(abs(p - q) for p, q in zip(b["out"], b["eager"])) < 1e-5
