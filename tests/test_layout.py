"""The package's layout (issue 19): one folder per layer, no import cycle at module level, no module
importing another's private names, and the FX vocabulary importing nothing above it (see also
``tests/test_fx_vocabulary.py``)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "moe_inductor"
LAYERS = {"compile", "diagnostics", "dynamo", "fx", "kernels", "lower", "ops", "recognize"}


def _modules():
    """module name -> source path, for the package and the patterns folder (installed beside it)."""
    mods = {}
    for path in sorted(PKG.rglob("*.py")):
        if "patterns" in path.relative_to(PKG).parts:
            continue
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = path
    for path in sorted((ROOT / "patterns").glob("*.py")):
        stem = "" if path.stem == "__init__" else "." + path.stem
        mods["moe_inductor.patterns" + stem] = path
    return mods


def _top_level_imports(name, path, mods):
    """Package modules imported when ``name`` is imported (module-level statements only; imports
    inside functions run later and cannot make an import cycle)."""
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in mods}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                base = ".".join(up + ([node.module] if node.module else []))
            for a in node.names:
                full = f"{base}.{a.name}"
                out.add(full if full in mods else base)
    return {m for m in out if m in mods and m != name}


def test_every_module_lives_in_a_layer_folder():
    loose = [p.name for p in PKG.glob("*.py") if p.name != "__init__.py"]
    assert not loose, f"modules outside a layer folder: {loose}"
    folders = {p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists()} - {"patterns"}
    assert folders == LAYERS, folders
    for layer in LAYERS:
        assert ast.get_docstring(ast.parse((PKG / layer / "__init__.py").read_text())), layer


def test_no_import_cycle_at_module_level():
    mods = _modules()
    graph = {name: _top_level_imports(name, path, mods) for name, path in mods.items()}
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_no_module_imports_private_names_of_another():
    bad = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("moe_inductor")):
                bad += [(name, node.module, a.name) for a in node.names
                        if a.name.startswith("_") and not a.name.startswith("__")]
    assert not bad, bad


def test_the_cycle_check_can_fail(tmp_path):
    """The checker itself: two modules importing each other at module level are a cycle."""
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("from moe_inductor.x import b\n")
    b.write_text("import moe_inductor.x.a\n")
    mods = {"moe_inductor.x.a": a, "moe_inductor.x.b": b}
    assert _top_level_imports("moe_inductor.x.a", a, mods) == {"moe_inductor.x.b"}
    assert _top_level_imports("moe_inductor.x.b", b, mods) == {"moe_inductor.x.a"}
