"""moe_inductor: the ``sonic`` torch.compile backend for Mixture-of-Experts blocks.

Public names (imported on first use, so that ``import moe_inductor`` stays cheap):

- ``fused_moe``, ``fused_moe_experts``: the fused op's Python entry points (``moe_inductor.ops.op``);
- ``explain``: which MoE blocks of a model the backend rewrites (``moe_inductor.diagnostics.explain``);
- ``capture_routing_stats``, ``capture_reports``, ``capture_fallbacks``: collect what the op and
  the backend record (all through ``moe_inductor.diagnostics.listeners``).
"""
import importlib

#: public name -> (submodule, attribute)
_LAZY = {
    "fused_moe": ("ops.op", "fused_moe"),
    "fused_moe_experts": ("ops.op", "fused_moe_experts"),
    "capture_routing_stats": ("diagnostics.stats", "capture_routing_stats"),
    "capture_reports": ("diagnostics.report", "capture_reports"),
    "capture_fallbacks": ("dynamo.dynamo_scope", "capture_fallbacks"),
}

__all__ = ["explain", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(f".{module}", __name__), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))


def explain(*args, **kwargs):
    """Report which MoE blocks of a model the sonic backend rewrites: see ``moe_inductor.diagnostics.explain``.
    Imported lazily so that ``import moe_inductor`` stays cheap."""
    module = importlib.import_module(".diagnostics.explain", __name__)
    return module.explain(*args, **kwargs)
