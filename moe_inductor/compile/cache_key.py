"""What the sonic backend adds to Inductor's and AOTAutograd's cache keys.

Inductor's FX-graph cache and the AOTAutograd cache key a compiled graph by the graph handed to
``compile_fx`` (here: after the MoE rewrite), the Inductor config and the torch version. Not by
this package's code: the fused op's autograd formula (``op.py``) is traced into the cached backward
graph, and the rewrite decides the graph, so after an upgrade of moe_inductor a warm cache would
serve graphs built by the old code. Both caches hash custom graph passes by their ``uuid()``
(``torch/_inductor/custom_graph_pass.py``), so ``sonic()`` installs ``SonicCacheKeyPass`` as
Inductor's ``post_grad_custom_post_pass`` through ``compile_fx(config_patches=...)``, which
applies to the forward and the backward compile alike. The pass does nothing to the graph (it
runs a pass that was already configured, if any); its uuid covers:

- the contents of every ``.py`` file of the package as imported (``moe_inductor/**``, including
  ``kernels`` and the ``patterns`` subpackage, wherever it was loaded from);
- the backend options (``SonicOptions``; its ``inductor`` patches are keyed by Inductor already);
- the torch, triton and transformers versions (transformers: the rewrite reads its modules);
- the uuid of the pass it wraps (``None`` if that pass has none: the caches then bypass as they
  would without sonic);
- ``extra``: a value tests set to stand for a code change (``set_extra``).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import logging
from pathlib import Path
from typing import Any, Optional

import torch

try:
    from torch._inductor.custom_graph_pass import CustomGraphPass
except ImportError:  # pragma: no cover (torch >= 2.11 has it)
    CustomGraphPass = object

log = logging.getLogger("moe_inductor")

#: test hook: part of every key (stands for a change of the package's code)
_extra: str = ""


def set_extra(value: str) -> None:
    """Add ``value`` to every cache key from now on (tests: simulate a code change)."""
    global _extra
    _extra = str(value)


def package_dirs() -> list[Path]:
    """Folders of moe_inductor and of moe_inductor.patterns as imported in this process."""
    import moe_inductor

    dirs = [Path(moe_inductor.__file__).resolve().parent]
    try:
        from moe_inductor.compile import idioms  # imports moe_inductor.patterns, from a checkout too

        for p in idioms.folders():
            if not any(p == d or d in p.parents for d in dirs):
                dirs.append(p)
    except Exception as e:  # pragma: no cover - the key must never break compilation
        log.debug("sonic: cache key: patterns folder not found: %s", e)
    return dirs


@functools.lru_cache(maxsize=None)
def package_hash() -> str:
    """sha256 over the relative path and contents of every .py file of the package (computed once
    per process: the code a process runs is the code it imported)."""
    h = hashlib.sha256()
    for root in package_dirs():
        for path in sorted(root.rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            h.update(f"{root.name}/{path.relative_to(root).as_posix()}\0".encode())
            h.update(path.read_bytes())
            h.update(b"\0")
    return h.hexdigest()


def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=None)
def versions() -> tuple:
    return (("torch", torch.__version__), ("triton", _version("triton")), ("transformers", _version("transformers")))


def options_key(opts) -> tuple:
    """The options that shape the rewrite, as a stable tuple (``inductor`` is left out: those
    patches are Inductor config, which both caches key already)."""
    return tuple((f.name, repr(getattr(opts, f.name))) for f in dataclasses.fields(opts) if f.name != "inductor")


def _inner_uuid(inner: Any) -> tuple[bool, Any]:
    """(ok, uuid) of an already configured pass; ok False if it has none (cache must bypass)."""
    if not inner:
        return True, None
    if isinstance(inner, (list, tuple)):
        ids = [_inner_uuid(p) for p in inner]
        return all(ok for ok, _ in ids), tuple(u for _, u in ids)
    uuid = getattr(inner, "uuid", None)
    if not callable(uuid):
        return False, None
    value = uuid()
    return value is not None, value


class SonicCacheKeyPass(CustomGraphPass):
    """A post-grad pass that changes nothing itself and keys the caches on the package's code,
    the options and the versions (module docstring). ``inner``: the pass configured before, which
    it runs."""

    def __init__(self, opts, inner: Any = None):
        self.opts = opts
        self.inner = inner

    def __call__(self, graph: torch.fx.Graph) -> None:
        inner = self.inner
        for p in (inner if isinstance(inner, (list, tuple)) else [inner]):
            if p:
                p(graph)

    def uuid(self) -> Optional[Any]:
        ok, inner = _inner_uuid(self.inner)
        if not ok:
            return None  # as without sonic: Inductor bypasses its caches for uuid-less passes
        key = repr(("moe_inductor", package_hash(), options_key(self.opts), versions(), inner, _extra))
        return hashlib.sha256(key.encode()).hexdigest()

    def __repr__(self) -> str:
        return f"SonicCacheKeyPass(inner={self.inner!r})"


def config_patch(opts, patches: dict) -> dict:
    """``patches`` with the key pass added as ``post_grad_custom_post_pass`` (wrapping the one in
    ``patches`` or in the current Inductor config)."""
    from torch._inductor import config as inductor_config

    key = "post_grad_custom_post_pass"
    inner = patches[key] if key in patches else getattr(inductor_config, key, None)
    out = dict(patches)
    out[key] = SonicCacheKeyPass(opts, inner)
    return out
