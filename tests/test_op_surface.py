"""The fused ops' public surface (issue 19): both schemas built from one description, options
keyword-only, the Python entry points' parameters equal to the schemas', clear errors for bad
keywords, the Autocast kernels wired by name, one ``impl`` decision, and the names the docs use
(``moe_inductor.fused_moe``) exported."""
import inspect
import os
import subprocess
import sys

import pytest
import torch

import moe_inductor
from moe_inductor.ops import op
from moe_inductor.diagnostics import report
from moe_inductor.ops.reference import naive_moe

from test_op import expert_lists, make

OPS = {"fused_moe": op.FUSED_MOE, "fused_moe_experts": op.FUSED_MOE_EXPERTS}
ENTRY_POINTS = {"fused_moe": op.fused_moe, "fused_moe_experts": op.fused_moe_experts}


def _registered(name):
    return getattr(torch.ops.moe_inductor, name).default._schema


@pytest.mark.parametrize("name", sorted(OPS))
def test_schema_is_the_description(name):
    desc, schema = OPS[name], _registered(name)
    assert str(schema) == str(torch._C.parse_schema(desc.qualname + desc.schema()))
    assert [a.name for a in schema.arguments] == [a.name for a in desc.args]
    for got, want in zip(schema.arguments, desc.args):
        assert got.kwarg_only == want.kw_only, got.name
        if want.default is op.REQUIRED:
            assert not got.has_default_value(), got.name
        else:
            assert got.default_value == want.default, got.name
    # keyword-only wherever a custom op allows: every non-tensor argument, and no tensor argument
    for a in schema.arguments:
        is_tensor = "Tensor" in str(a.type)
        assert a.kwarg_only is not is_tensor, (a.name, str(a.type))


def test_both_ops_share_routing_and_options():
    fm, fe = op.FUSED_MOE.args, op.FUSED_MOE_EXPERTS.args
    assert fm[:4] == fe[:4] == op.ROUTING_ARGS
    assert fm[-len(op.OPTION_ARGS):] == fe[-len(op.OPTION_ARGS):] == op.OPTION_ARGS
    # required weights first, then the optional ones, in both
    assert [a.name for a in fm[4:-len(op.OPTION_ARGS)]] == ["w1", "w2", "b1", "b2"]
    assert [a.name for a in fe[4:-len(op.OPTION_ARGS)]] == ["w_gate", "w_down", "w_up", "b_gate", "b_up", "b_down"]


def _params(sig):
    return [(p.name, p.kind, p.default) for p in sig.parameters.values()]


@pytest.mark.parametrize("name", sorted(OPS))
def test_entry_point_signature_is_the_schema(name):
    fn, desc, schema = ENTRY_POINTS[name], OPS[name], _registered(name)
    got = _params(inspect.signature(fn))
    assert got == _params(desc.signature(python=True))
    assert [n for n, _, _ in got] == [a.name for a in schema.arguments]
    for (n, kind, default), a in zip(got, schema.arguments):
        assert (kind is inspect.Parameter.KEYWORD_ONLY) == a.kwarg_only, n
        if a.has_default_value():
            assert default == a.default_value, n
        else:  # only the lists may have a default the schema cannot express
            assert default is inspect.Parameter.empty or (default == () and str(a.type) == "List[Tensor]"), n


def test_bad_keywords_raise_clear_errors():
    x, tok, ex, s, w1, w2, _, _ = make(8, 8, 4, 4, 2)
    with pytest.raises(TypeError, match="activaton"):
        op.fused_moe(x, tok, ex, s, w1, w2, activaton="relu")
    with pytest.raises(RuntimeError, match="Unknown keyword argument 'activaton'"):
        torch.ops.moe_inductor.fused_moe(x, tok, ex, s, w1, w2, activaton="relu")
    # options are keyword-only: positional ones are refused, not taken for another argument
    with pytest.raises(RuntimeError, match="positional argument"):
        torch.ops.moe_inductor.fused_moe(x, tok, ex, s, w1, w2, None, None, "swiglu")
    with pytest.raises(TypeError):
        op.fused_moe(x, tok, ex, s, w1, w2, None, None, "swiglu")
    with pytest.raises(TypeError, match=r"fused_moe_experts: .*signature: fused_moe_experts\(x, token_ids"):
        op.FUSED_MOE_EXPERTS.bind((x, tok, ex, s), {"w_gate": [], "nope": 1})


@pytest.mark.parametrize("name", sorted(OPS))
def test_bind_is_inspect_binding(name):
    """The hand-written bind (it runs on every call) agrees with inspect's, for every split of the
    arguments into positional ones and keywords, with and without the defaulted ones."""
    desc = OPS[name]
    sig = desc.signature()
    values = {a.name: object() for a in desc.args}
    positional = [a.name for a in desc.args if not a.kw_only]
    for n_pos in range(len(positional) + 1):
        for drop_defaults in (False, True):
            kept = {k: v for k, v in values.items()
                    if not (drop_defaults and sig.parameters[k].default is not inspect.Parameter.empty)}
            args = [kept[k] for k in positional[:n_pos] if k in kept]
            if len(args) < n_pos:
                continue
            kwargs = {k: v for k, v in kept.items() if k not in positional[:n_pos]}
            want = sig.bind(*args, **kwargs)
            want.apply_defaults()
            assert desc.bind(args, kwargs) == dict(want.arguments)


def test_package_exports_the_entry_points():
    assert moe_inductor.fused_moe is op.fused_moe
    assert moe_inductor.fused_moe_experts is op.fused_moe_experts
    assert {"fused_moe", "fused_moe_experts", "explain"} <= set(moe_inductor.__all__)
    x, tok, ex, s, w1, w2, b1, b2 = make(12, 8, 4, 3, 2, bias=True, dtype=torch.float64)
    want = naive_moe(x, tok, ex, s, w1, w2, b1, b2, "swiglu", False)
    torch.testing.assert_close(moe_inductor.fused_moe(x, tok, ex, s, w1, w2, b1, b2), want)
    lists = expert_lists(w1, w2, b1, b2, split_up=True)
    got = moe_inductor.fused_moe_experts(x, tok, ex, s, lists["w_gate"], lists["w_down"], lists["w_up"],
                                         lists["b_gate"], lists["b_up"], lists["b_down"])
    torch.testing.assert_close(got, want)


def test_package_import_stays_light():
    code = ("import sys, moe_inductor; assert 'moe_inductor.ops.op' not in sys.modules; "
            "f = moe_inductor.fused_moe; assert 'moe_inductor.ops.op' in sys.modules; print(f.__module__)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "moe_inductor.ops.op", proc.stderr[-2000:]


@pytest.mark.parametrize("name", sorted(OPS))
def test_autocast_kernels_find_arguments_by_name(name):
    """The op called with its options as keywords, or left out (the dispatcher then drops them):
    the Autocast kernel reads autocast_like and compute_dtype by name either way."""
    x, tok, ex, s, w1, w2, _, _ = make(16, 8, 4, 4, 2)
    if name == "fused_moe":
        weights = (w1, w2)
    else:
        a = expert_lists(w1, w2, None, None, split_up=True)
        weights = (a["w_gate"], a["w_down"], a["w_up"], [], [], [])
    fn = getattr(torch.ops.moe_inductor, name)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fn(x, tok, ex, s, *weights)[0].dtype == torch.bfloat16  # default autocast_like: aten::mm
        assert fn(x, tok, ex, s, *weights, autocast_like="")[0].dtype == torch.float32
        assert fn(x, tok, ex, s, *weights, impl="torch", autocast_like="aten::linear")[0].dtype == torch.bfloat16
        # an explicit compute_dtype wins over autocast's dtype
        got = fn(x.half(), tok, ex, s, *weights, compute_dtype=torch.float16)[0]
        assert got.dtype == torch.float16
    assert fn(x, tok, ex, s, *weights)[0].dtype == torch.float32


def test_impl_is_decided_by_one_function(monkeypatch):
    """The op (run time) and the backend's report (its prediction at rewrite time) both go through
    ``op.requested_impl``; MOE_INDUCTOR_IMPL replaces "auto" there and nowhere else."""
    monkeypatch.delenv("MOE_INDUCTOR_IMPL", raising=False)
    assert op.requested_impl("auto") == "auto" and op.requested_impl("torch") == "torch"
    monkeypatch.setenv("MOE_INDUCTOR_IMPL", "torch")
    assert op.requested_impl("auto") == "torch"
    assert op.requested_impl("triton") == "triton"  # an explicit choice is not overridden
    assert report.runs_on(torch.device("cuda"), torch.float32, "swiglu", "auto") == "PyTorch path (impl='torch')"
    monkeypatch.setenv("MOE_INDUCTOR_IMPL", "bogus")
    x, tok, ex, s, w1, w2, _, _ = make(8, 8, 4, 4, 2)
    for call in (lambda: op.fused_moe(x, tok, ex, s, w1, w2),
                 lambda: report.runs_on(torch.device("cpu"), torch.float32, "swiglu", "auto")):
        with pytest.raises(ValueError, match="MOE_INDUCTOR_IMPL='bogus'"):
            call()
    with pytest.raises(ValueError, match="unknown impl 'cuda'"):
        op.requested_impl("cuda")
    calls = []
    monkeypatch.setattr(op, "requested_impl", lambda impl: calls.append(impl) or "torch")
    report.runs_on(torch.device("cuda"), torch.float32, "swiglu", "auto")
    op.fused_moe(x, tok, ex, s, w1, w2)
    assert calls and all(c == "auto" for c in calls) and len(calls) >= 2


def test_readme_signatures_are_true():
    """The README's call forms of the entry points name real parameters in the real order."""
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    for name, fn in ENTRY_POINTS.items():
        start = readme.find(f"`moe_inductor.{name}(")
        assert start >= 0, f"README has no `moe_inductor.{name}(...)`"
        text = readme[start + len(f"`moe_inductor.{name}("): readme.index(")`", start)]
        names = [p.split("=")[0].strip() for p in text.replace("\n", " ").split(",") if p.strip()]
        names = [n for n in names if n not in ("*", "...")]
        params = list(inspect.signature(fn).parameters)
        assert names and all(n in params for n in names), (name, names, params)
        assert [params.index(n) for n in names] == sorted(params.index(n) for n in names), (name, names)
