"""moe_inductor: the ``sonic`` torch.compile backend for Mixture-of-Experts blocks."""


def explain(*args, **kwargs):
    """Report which MoE blocks of a model the sonic backend rewrites: see ``moe_inductor.explain``.
    Imported lazily so that ``import moe_inductor`` stays cheap."""
    import importlib

    module = importlib.import_module(".explain", __name__)
    # importing the submodule binds its name on this package, over this function: bind it back
    globals()["explain"] = _entry
    return module.explain(*args, **kwargs)


_entry = explain
