"""Where the idiom modules (``patterns/``, installed as ``moe_inductor.patterns``) are loaded from.

Its own module so that the backend (which runs the idioms) and the cache key (which hashes their
source) both import it, and neither imports the other.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

#: the idiom package's import name
PACKAGE = "moe_inductor.patterns"


def load() -> list:
    """The idiom modules in the order the backend tries them (``moe_inductor.patterns.IDIOMS``)."""
    try:
        from moe_inductor.patterns import IDIOMS
    except ModuleNotFoundError:
        # Running from a source checkout without an install: the patterns live in the top-level
        # patterns/ folder that installs as moe_inductor.patterns; load it under that name.
        folder = Path(__file__).resolve().parents[2] / "patterns"
        spec = importlib.util.spec_from_file_location(
            PACKAGE, folder / "__init__.py", submodule_search_locations=[str(folder)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE] = module
        spec.loader.exec_module(module)
        IDIOMS = module.IDIOMS
    return IDIOMS


def folders() -> list:
    """The folders the idiom package was loaded from (loading it if it was not)."""
    load()
    return [Path(p).resolve() for p in getattr(sys.modules.get(PACKAGE), "__path__", []) or []]
