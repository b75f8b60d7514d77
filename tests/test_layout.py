"""The package's layout (issue 19): one folder per layer, each saying its job. Import cycles and
private names across modules: ``tests/test_module_graph.py``; the FX vocabulary importing nothing
above it: ``tests/test_fx_vocabulary.py``."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "moe_inductor"
LAYERS = {"compile", "diagnostics", "dynamo", "fx", "kernels", "lower", "ops", "recognize"}


def test_every_module_lives_in_a_layer_folder():
    loose = [p.name for p in PKG.glob("*.py") if p.name != "__init__.py"]
    assert not loose, f"modules outside a layer folder: {loose}"
    folders = {p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists()} - {"patterns"}
    assert folders == LAYERS, folders
    for layer in LAYERS:
        assert ast.get_docstring(ast.parse((PKG / layer / "__init__.py").read_text())), layer
