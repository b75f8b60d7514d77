"""The package's module graph (issue 19): no import cycles, not even through imports inside
functions (``cache_key`` once imported ``backend._idioms`` while ``backend`` imports ``cache_key``);
no module imports another's private names; every module imports on its own in a fresh process.

``patterns/`` (the idiom modules, restructured separately) is not covered here.
"""
from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

PACKAGE = "moe_inductor"
#: private names still imported across modules (the last three moved to the public fx layer).
#: Nothing may be added here.
KNOWN_PRIVATE: set = set()


def _package_dir() -> Path:
    spec = importlib.util.find_spec(PACKAGE)  # without importing it
    return Path(list(spec.submodule_search_locations)[0])


def _modules() -> dict:
    """{dotted name: path} of the package's modules (its patterns subfolder excluded)."""
    root = _package_dir()
    found = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent).with_suffix("")
        if "patterns" in rel.parts or "__pycache__" in rel.parts:
            continue
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _imports(name: str, path: Path, modules: dict):
    """(imported module, imported name or None, attribute names read off it) for every import
    statement of the module, at any depth (imports inside functions count)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    aliases = {}  # local name -> module of the package it stands for
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for a in node.names:
                if f"{source}.{a.name}" in modules:  # a submodule
                    out.append((f"{source}.{a.name}", None))
                    aliases[a.asname or a.name] = f"{source}.{a.name}"
                elif source in modules:
                    out.append((source, a.name))
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name in modules:
                    out.append((a.name, None))
                    if a.asname:
                        aliases[a.asname] = a.name
    for node in ast.walk(tree):  # alias._private
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            out.append((aliases[node.value.id], node.attr))
    return out


def _graph():
    modules = _modules()
    edges, private = {}, set()
    for name, path in modules.items():
        for target, attr in _imports(name, path, modules):
            if target == name:
                continue
            edges.setdefault(name, set()).add(target)
            if attr and attr.startswith("_") and not attr.startswith("__"):
                private.add((name, target, attr))
    return modules, edges, private


def _cycle(edges: dict):
    """One import cycle as a list of modules, or None."""
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(edges.get(n, ())):
            if state.get(m) == "open":
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = "done"
        return None

    for n in sorted(edges):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_no_import_cycles():
    modules, edges, _ = _graph()
    assert len(modules) > 20 and "moe_inductor.ops.op" in modules, sorted(modules)
    cycle = _cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_check_can_fail():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_private_names_across_modules():
    _, _, private = _graph()
    new = sorted(private - KNOWN_PRIVATE)
    assert not new, f"modules import other modules' private names: {new}"
    gone = sorted(KNOWN_PRIVATE - private)
    assert not gone, f"made public: remove from KNOWN_PRIVATE: {gone}"


def test_each_module_imports_alone():
    """Each module imported first, in a process that has imported no module of the package (one
    process with torch and Inductor loaded, forked once per module)."""
    names = sorted(_modules())
    script = r"""
import os, sys, importlib
import torch, torch._dynamo, torch._inductor.compile_fx, torch._inductor.pattern_matcher
assert not [m for m in sys.modules if m == "moe_inductor" or m.startswith("moe_inductor.")]
failed = []
for name in sys.argv[1:]:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            importlib.import_module(name)
            code, msg = 0, b""
        except BaseException as e:
            code, msg = 1, f"{type(e).__name__}: {e}"[:2000].encode()
        os.write(w, msg)
        os._exit(code)
    os.close(w)
    chunks = []
    while True:
        chunk = os.read(r, 4096)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    if status:
        failed.append(f"{name}: {b''.join(chunks).decode()}")
print("\n".join(failed))
sys.exit(1 if failed else 0)
"""
    env = dict(os.environ)
    env.setdefault("TRITON_INTERPRET", "1")
    proc = subprocess.run([sys.executable, "-c", script, *names], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"modules that fail to import alone:\n{proc.stdout}\n{proc.stderr[-3000:]}"
