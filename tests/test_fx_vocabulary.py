"""The FX vocabulary layer (issue 19): ``moe_inductor/fx/`` holds the one definition of each op-target
set and FX helper the recognisers share, imports nothing above it, and each of its modules (and each
recogniser module) imports alone in a fresh interpreter. The divergences the duplicated sets had are
checked on small graphs: a cast that keeps the dtype aliases its input, every augmented assignment
writes, ``unfold`` is a view for the loop capture too, a reshape of a shared tensor is not fresh.
"""
from __future__ import annotations

import ast
import operator
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.fx as fx

from moe_inductor.fx import aliasing, decline, nodes, targets

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted(p for d in ("moe_inductor", "patterns") for p in (ROOT / d).rglob("*.py")
                 if "__pycache__" not in p.parts)

#: functions defined once, in moe_inductor/fx/ (an old private spelling counts as a second definition)
HELPERS = {"arg", "need", "same", "shape_of", "to_sympy", "sympy_prod", "int_value", "dtype_of", "example_value",
           "is_mutation", "node_order", "is_view_of", "is_fresh", "aliases", "writes_to", "mutated_between",
           "need_unmodified", "emit", "call", "method", "fake_run", "graph_fake_mode", "source_of",
           "module_path_of", "clean_module_path", "match_or_decline", "nearest_upstream", "size_asserts_of",
           "eq_constant", "arange_onehot", "arange_column", "getitem", "transpose_of", "fresh_tuple",
           "basic_index"}
#: op-target sets defined once, in moe_inductor/fx/targets.py: the public names and the private names
#: the three diverging copies had
SETS = {n for n in dir(targets) if n.isupper()} | {
    "_VIEW_METHODS", "_VIEW_FUNCTIONS", "_VIEWS", "_INPLACE_FUNCTIONS", "_FRESH_TUPLE_METHODS",
    "_FRESH_TUPLE_FUNCTIONS", "_MM_FUNCTIONS", "_MM_METHODS", "_MATMUL_F"}
#: second definitions left in files another session owns; each must go (the test then says so)
KNOWN: set = set()


def _definitions(sources=SOURCES, root=ROOT):
    """{(file, 'def name' | 'set NAME')} of every module-level definition outside moe_inductor/fx/ of a
    name the vocabulary owns (a function's local closure or a class's method is another thing). A set
    counts when it is built from a literal (a derived ``A | B`` is a use)."""
    found = set()
    for path in sources:
        rel = path.relative_to(root).as_posix()
        if rel.startswith("moe_inductor/fx/"):
            continue
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and \
                    (node.name in HELPERS or node.name.lstrip("_") in HELPERS):
                found.add((rel, f"def {node.name}"))
            elif isinstance(node, ast.Assign) and isinstance(node.value, (ast.Set, ast.Tuple, ast.List, ast.Dict,
                                                                         ast.Call)):
                for t in node.targets:
                    if isinstance(t, ast.Name) and (t.id in SETS or t.id.lstrip("_") in SETS):
                        found.add((rel, f"set {t.id}"))
    return found


def test_one_definition_each():
    found = _definitions()
    new = sorted(found - KNOWN)
    assert not new, f"second definitions of FX-vocabulary names (import them from moe_inductor.fx): {new}"
    gone = sorted(KNOWN - found)
    assert not gone, f"gone: remove from KNOWN: {gone}"


def test_definition_check_can_fail(tmp_path):
    extra = tmp_path / "dup.py"
    extra.write_text("_VIEW_METHODS = {'view'}\ndef _arg(node, pos, name):\n    return None\n"
                     "ALIASING = ALIASING_METHODS | CAST_METHODS\n")
    assert _definitions([extra], tmp_path) == {("dup.py", "set _VIEW_METHODS"), ("dup.py", "def _arg")}


def test_no_renamed_need():
    """``need`` goes by one name: no ``need as <alias>`` anywhere."""
    bad = []
    for path in SOURCES:
        rel = path.relative_to(ROOT).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                bad += [(rel, a.asname) for a in node.names if a.name == "need" and a.asname]
    assert not bad, bad


def test_fx_imports_nothing_above_it():
    """moe_inductor/fx/ imports torch and itself only: no cycle can run through it."""
    for path in sorted((ROOT / "moe_inductor" / "fx").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.level <= 1, (path.name, node.module)
                assert node.level == 1 or (node.module or "").split(".")[0] != "moe_inductor", (path.name, node.module)
            elif isinstance(node, ast.Import):
                assert all(a.name.split(".")[0] != "moe_inductor" for a in node.names), path.name


def test_each_module_imports_alone():
    """Each FX-vocabulary and recogniser module imported first in a fresh interpreter (the other
    modules of the package: tests/test_module_graph.py)."""
    names = [f"moe_inductor.fx.{p.stem}" for p in sorted((ROOT / "moe_inductor" / "fx").glob("*.py"))
             if p.stem != "__init__"] + ["moe_inductor.fx"]
    names += [f"moe_inductor.patterns.{p.stem}" for p in sorted((ROOT / "patterns").glob("*.py"))
              if p.stem != "__init__"]
    script = r"""
import os, sys, importlib
import torch, torch._inductor.pattern_matcher
failed = []
for name in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module(name)
        except BaseException as e:
            print(f"{name}: {type(e).__name__}: {e}"[:2000], flush=True)
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    if status:
        failed.append(name)
sys.exit(1 if failed else 0)
"""
    env = dict(os.environ, TRITON_INTERPRET=os.environ.get("TRITON_INTERPRET", "1"))
    proc = subprocess.run([sys.executable, "-c", script, *names], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"modules that fail to import alone:\n{proc.stdout}\n{proc.stderr[-3000:]}"


# --------------------------------------------------------------------------- the divergences, resolved

def _graph(x_dtype, body):
    """A graph ``x -> body(graph, x)`` with example values (what Dynamo's graphs carry)."""
    g = fx.Graph()
    x = g.placeholder("x")
    x.meta["example_value"] = torch.zeros(4, 3, dtype=x_dtype)
    out = body(g, x)
    g.output(out)
    return g, x


def _node(g, op, target, *args, value=None):
    n = g.create_node(op, target, args, {})
    n.meta["example_value"] = value
    return n


@pytest.mark.parametrize("dtype,aliased", [(torch.float32, True), (torch.bfloat16, False)])
def test_cast_that_keeps_the_dtype_aliases(dtype, aliased):
    """``x.float()`` is x itself when x is float32: a write into it writes x (safety's view list had
    no casts; loop_capture's had them all)."""
    def body(g, x):
        y = _node(g, "call_method", "float", x, value=torch.zeros(4, 3))
        _node(g, "call_method", "mul_", y, 2.0, value=torch.zeros(4, 3))
        return y
    g, x = _graph(dtype, body)
    assert bool(aliasing.writes_to(x)) is aliased
    assert aliasing.is_fresh(x.next) is not aliased


def test_every_augmented_assignment_writes():
    def body(g, x):
        return _node(g, "call_function", operator.iand, x, x, value=torch.zeros(4, 3))
    g, x = _graph(torch.int64, body)
    assert nodes.is_mutation(x.next, x) and aliasing.writes_to(x) == [x.next]
    assert {operator.iadd, operator.setitem, operator.ior, operator.ixor} <= targets.INPLACE_FUNCTIONS


def test_view_sets_are_one():
    from moe_inductor.dynamo import loop_capture
    assert loop_capture._VIEWS == targets.ALIASING_METHODS | targets.CAST_METHODS
    assert "unfold" in loop_capture._VIEWS and "float" in loop_capture._VIEWS
    assert targets.FLOAT_CAST_DTYPES["bfloat16"] is torch.bfloat16


def test_reshape_of_a_shared_tensor_is_not_a_sole_owner():
    """patterns/common's bias check walked only eight view methods: ``torch.reshape`` of a tensor
    another node reads passed as a fresh GEMM result."""
    from moe_inductor.patterns import common

    def body(g, x):
        r = _node(g, "call_function", torch.reshape, x, (12,), value=torch.zeros(12))
        _node(g, "call_method", "sum", x, value=torch.zeros(()))
        return r
    g, x = _graph(torch.float32, body)
    assert not common._sole_owner(x.next)

    def fresh(g, x):
        y = _node(g, "call_function", torch.matmul, x, x, value=torch.zeros(4, 4))
        return _node(g, "call_method", "t", y, value=torch.zeros(4, 4))
    g, x = _graph(torch.float32, fresh)
    assert common._sole_owner(x.next.next)


def test_need():
    decline.need(True, "unused")
    with pytest.raises(decline.Declined) as e:
        decline.need(False, "why")
    assert type(e.value) is decline.Declined and str(e.value) == "why"
    with pytest.raises(decline.PartDeclined) as e:
        decline.need(0, "why", part="dispatch")
    assert e.value.part == "dispatch" and str(e.value) == "dispatch: why"
    from moe_inductor.recognize import parts
    assert parts.PartDeclined is decline.PartDeclined and not hasattr(parts, "need")


def test_arg():
    g = fx.Graph()
    x = g.placeholder("x")
    n = g.call_method("index_add_", (x, 0), {"index": x})
    assert nodes.arg(n, 1, "dim") == 0 and nodes.arg(n, 2, "index") is x and nodes.arg(n, 3, "source", 7) == 7
