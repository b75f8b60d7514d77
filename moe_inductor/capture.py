"""Make known transformers expert loops capturable by Dynamo.

Some transformers experts modules loop over a data-dependent list of the experts that received
tokens (``expert_hit = (...).nonzero(); for expert_idx in expert_hit: ... self[f"expert_{expert_idx[0]}"]``).
Dynamo cannot unroll that loop, so it graph-breaks and no compiled graph ever holds the MoE block:
no idiom can rewrite it. For such methods this file installs, on the class, a wrapper that runs the
original method in eager and a replacement while Dynamo traces it (``torch.compiler.
is_dynamo_compiling()``, a constant during tracing): a loop over ``range(num_experts)`` with
``torch.where(expert_mask[e])``, which unrolls into one graph that the ``expert_loop`` idiom
recognises. (``torch.compiler.substitute_in_graph`` is not used: Dynamo inlines an nn.Module's
``forward`` without consulting it, checked on torch 2.13.)

Substituted now: transformers 5.x ``SwitchTransformersExperts.forward``.

Safety: a replacement is registered only if the original method's source, whitespace-normalised,
has exactly the sha256 the replacement was written against (``_TARGETS``); any other version of
transformers keeps its own code (logged at debug level). Nothing here raises: every failure is
logged and leaves Dynamo as it was.

When: ``install()`` runs at import of ``moe_inductor.backend`` (which ``torch.compile(...,
backend="sonic")`` triggers), from the backend itself and from ``moe_inductor.explain``. It never
imports transformers: if the modeling module is already imported it substitutes at once, otherwise
a ``sys.meta_path`` hook waits for that one module to be imported and substitutes then.

Global side effect: the wrapper is process-wide and applies to every torch.compile backend
(Dynamo traces the replacement whatever the backend); eager runs the original code (one extra
Python call). Forward values are identical: the same
experts in the same ascending order accumulate the same rows with ``index_add_`` (experts that
receive no token add nothing), for the router's masks (one-hot times the capacity mask, entries
0/1). One difference is visible: an expert that receives no token in a step gets a zero gradient
for its parameters instead of ``None`` (eager skips it; the captured graph runs it on zero rows).
"""
from __future__ import annotations

import functools
import hashlib
import importlib.abc
import inspect
import logging
import sys
import threading

import torch

log = logging.getLogger("moe_inductor")


def _switch_experts_forward(self, hidden_states, selected_experts, routing_weights):
    # transformers 5.x SwitchTransformersExperts.forward with the loop over range(num_experts)
    # instead of the data-dependent expert_hit: same experts, same order, same accumulation
    final_hidden_states = torch.zeros_like(hidden_states)
    expert_mask = selected_experts.permute(2, 1, 0)
    for expert_idx in range(self.num_experts):
        idx, top_x = torch.where(expert_mask[expert_idx])
        current_state = hidden_states[None, top_x].reshape(-1, hidden_states.shape[-1])
        current_hidden_states = self[f"expert_{expert_idx}"](current_state) * routing_weights[top_x, idx, None]
        final_hidden_states.index_add_(0, top_x, current_hidden_states.to(hidden_states.dtype))
    return final_hidden_states


#: (module, class, method, sha256 of the whitespace-normalised original source, replacement)
_TARGETS = [
    ("transformers.models.switch_transformers.modeling_switch_transformers", "SwitchTransformersExperts",
     "forward", "8c3d52abcfd5f63df45277bdfdc09bd8e4b66b90704ab84ca27e9c19d79c1a13", _switch_experts_forward),
]

_lock = threading.RLock()
_done: set = set()       # module names handled (substituted or refused)
_substituted: dict = {}  # "module.Class.method" -> replacement, for tests and reports
_hook = None


def source_hash(fn) -> str:
    return hashlib.sha256(" ".join(inspect.getsource(fn).split()).encode()).hexdigest()


def _substitute(module) -> None:
    for modname, cls_name, meth, digest, replacement in _TARGETS:
        if modname != module.__name__:
            continue
        key = f"{modname}.{cls_name}.{meth}"
        try:
            original = getattr(getattr(module, cls_name), meth)
            got = source_hash(original)
            if got != digest:
                log.debug("sonic: not substituting %s: its source (sha256 %s) is not the version the "
                          "replacement was written for (%s)", key, got, digest)
                continue
            setattr(getattr(module, cls_name), meth, _traced_as(original, replacement))
            _substituted[key] = replacement
            log.debug("sonic: Dynamo traces a capturable replacement of %s", key)
        except Exception as e:  # never break the import or the compile
            log.debug("sonic: cannot substitute %s: %s", key, e)


def _traced_as(original, replacement):
    """``original`` in eager, ``replacement`` when Dynamo traces it (``is_dynamo_compiling()`` is a
    constant True while tracing, so the branch costs nothing in the graph)."""

    @functools.wraps(original)
    def method(*args, **kwargs):
        if torch.compiler.is_dynamo_compiling():
            return replacement(*args, **kwargs)
        return original(*args, **kwargs)

    method.__sonic_original__ = original
    return method


def _handle(modname: str) -> None:
    with _lock:
        if modname in _done or modname not in sys.modules:
            return
        _done.add(modname)
        _substitute(sys.modules[modname])


class _Hook(importlib.abc.MetaPathFinder):
    """Substitutes when one of the target modules is imported (after its code ran)."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in {t[0] for t in _TARGETS} or fullname in _done:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        class _Loader:
            """The module's own loader, with the substitution run after its code."""

            def __getattr__(self, name):
                return getattr(loader, name)

            def exec_module(self, module):
                exec_module(module)
                try:
                    sys.modules.setdefault(fullname, module)
                    _handle(fullname)
                except Exception as e:
                    log.debug("sonic: substitution after import of %s failed: %s", fullname, e)

        spec.loader = _Loader()
        return spec


def install() -> None:
    """Substitute the known loops whose modules are imported; hook the others. Idempotent, never raises."""
    global _hook
    try:
        if not hasattr(torch.compiler, "is_dynamo_compiling"):
            return
        for modname, *_ in _TARGETS:
            _handle(modname)
        with _lock:
            if _hook is None and any(t[0] not in _done for t in _TARGETS):
                _hook = _Hook()
                sys.meta_path.insert(0, _hook)
    except Exception as e:
        log.debug("sonic: capture.install failed: %s", e)
