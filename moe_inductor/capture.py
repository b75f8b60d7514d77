"""Make known transformers expert loops capturable by Dynamo, for the modules sonic compiles.

Some transformers experts modules loop over a data-dependent list of the experts that received
tokens (``expert_hit = (...).nonzero(); for expert_idx in expert_hit: ... self[f"expert_{expert_idx[0]}"]``).
Dynamo cannot unroll that loop, so it graph-breaks and no compiled graph ever holds the MoE block:
no idiom can rewrite it. For such a module this file gives the *instance* a ``forward`` that runs
the original method in eager and a replacement while Dynamo traces it (``torch.compiler.
is_dynamo_compiling()``, a constant during tracing): a loop over ``range(num_experts)`` with
``torch.where(expert_mask[e])``, which unrolls into one graph that the ``expert_loop`` idiom
recognises. (``torch.compiler.substitute_in_graph`` is not used: Dynamo inlines an nn.Module's
``forward`` without consulting it, checked on torch 2.13.)

Substituted now: transformers 5.x ``SwitchTransformersExperts.forward``.

Scope: nothing happens at import, and no class is changed. ``prepare(f_locals)`` runs when Dynamo
starts tracing a frame compiled with the sonic backend (``moe_inductor.dynamo_scope``): it gives
the matching submodules of that frame's modules (``self``, arguments) the instance-level
``forward``. Other modules, other backends and eager code of modules sonic never compiled keep the
original. A module sonic compiled keeps the instance attribute (Dynamo guards on it); a later
compile of the same module instance with another backend traces the replacement too.

Safety: a replacement is used only if the class's method source, whitespace-normalised, has exactly
the sha256 the replacement was written against (``_TARGETS``); any other version of transformers
keeps its own code (logged at debug level). Nothing here raises: every failure is logged.

Values: forward values are identical: the same experts in the same ascending order accumulate the
same rows with ``index_add_`` (experts that receive no token add nothing), for the router's masks
(one-hot times the capacity mask, entries 0/1). One difference is visible when compiled: an expert
that receives no token in a step gets a zero gradient for its parameters instead of ``None``
(eager skips it; the captured graph runs it on zero rows).
"""
from __future__ import annotations

import hashlib
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
_checked: dict = {}  # class -> replacement, or None when its source is not the expected one


def source_hash(fn) -> str:
    return hashlib.sha256(" ".join(inspect.getsource(fn).split()).encode()).hexdigest()


class CapturableForward:
    """An instance-level ``forward``: the class's own method in eager, ``replacement`` while Dynamo
    traces (``is_dynamo_compiling()`` is a constant True then, so the branch costs nothing in the
    graph). A class, not a closure, so that the module still pickles and deep-copies."""

    def __init__(self, module: torch.nn.Module, original, replacement):
        self.module = module
        self.original = original
        self.replacement = replacement

    def __call__(self, *args, **kwargs):
        if torch.compiler.is_dynamo_compiling():
            return self.replacement(self.module, *args, **kwargs)
        return self.original(self.module, *args, **kwargs)


def replacement_for(cls) -> object:
    """The capturable replacement of ``cls.forward``, or None (not a target, or another source)."""
    with _lock:
        if cls in _checked:
            return _checked[cls]
        found = None
        for modname, cls_name, meth, digest, replacement in _TARGETS:
            if cls.__module__ != modname or cls.__name__ != cls_name:
                continue
            key = f"{modname}.{cls_name}.{meth}"
            try:
                got = source_hash(getattr(cls, meth))
            except Exception as e:
                log.debug("sonic: cannot read the source of %s: %s", key, e)
                break
            if got != digest:
                log.debug("sonic: not substituting %s: its source (sha256 %s) is not the version the "
                          "replacement was written for (%s)", key, got, digest)
                break
            found = replacement
        _checked[cls] = found
        return found


def prepare(f_locals: dict) -> int:
    """Give the target submodules of the nn.Modules among ``f_locals`` (the locals of a frame sonic
    is about to trace) their capturable ``forward``. Returns how many were given one."""
    if not any(t[0] in sys.modules for t in _TARGETS):
        return 0  # no target class was ever imported: nothing to look for
    done = 0
    seen: set = set()
    for value in list(f_locals.values()):
        if not isinstance(value, torch.nn.Module) or id(value) in seen:
            continue
        seen.add(id(value))
        for module in value.modules():
            if "forward" in module.__dict__:
                continue  # already given one (or the user set their own)
            replacement = replacement_for(type(module))
            if replacement is None:
                continue
            module.forward = CapturableForward(module, type(module).forward, replacement)
            done += 1
            log.debug("sonic: Dynamo traces a capturable replacement of %s.forward for this module",
                      type(module).__qualname__)
    return done
