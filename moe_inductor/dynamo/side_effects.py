"""Is it safe to run a module for an expert that received no tokens?

The loop capture (``moe_inductor.dynamo.loop_capture`` / ``capture``) turns a loop over the experts that
received tokens into a loop over every expert, the empty ones on zero rows. For the values that is
exact; for the modules the loop calls it is exact only if calling them changes nothing that
outlives the call. An expert whose ``forward`` writes its own state (a weight scaled in place, a
buffer of call or token counts, ``self.last = ...``, BatchNorm running statistics, a forward hook)
would have that state changed, under sonic, for experts that eager never ran: a wrong result that
no comparison of outputs shows at once (found by ``tests/test_loop_capture.py``: the expert
weights of a module that decays them in ``forward`` drifted from eager's after one step).

``loop_module_roots`` reads which attributes of ``self`` a rewritten loop reaches (``self.experts``
in ``self.experts[e](x)``, also through a local bound before the loop); ``impurity`` proves each such
module, and all modules below it, free of persistent side effects from their source, or says why
not. Conservative where it cannot read: a module class without readable source, other than
torch's own stateless ones, is not proved.
"""
from __future__ import annotations

import ast
import inspect
import textwrap
import threading
import weakref
from typing import Optional

import torch

_lock = threading.RLock()
_class_verdicts: dict = {}  # class -> None (no side effect found) or the reason
_roots: dict = {}  # (function, loop line numbers) -> frozenset of attribute names of self

# torch.nn modules that write state in forward (running statistics) when they track it
_STATEFUL_TORCH = (torch.nn.modules.batchnorm._NormBase,)
_SETTERS = {"setattr", "delattr", "register_buffer", "register_parameter", "register_module",
            "add_module", "register_forward_hook", "register_forward_pre_hook", "register_full_backward_hook"}


def _tree(fn) -> Optional[tuple]:
    """(the function's ast.FunctionDef, its first line in the file) or None."""
    inner = fn
    while getattr(inner, "__wrapped__", None) is not None:
        inner = inner.__wrapped__
    inner = getattr(inner, "__func__", inner)
    try:
        lines, start = inspect.getsourcelines(inner)
        tree = ast.parse(textwrap.dedent("".join(lines)))
    except (OSError, TypeError, SyntaxError, IndentationError):
        return None
    fdef = next((n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))), None)
    return (fdef, start) if fdef is not None else None


def _root_attr(node, self_name: str) -> Optional[str]:
    """``X`` for an expression ``self.X``, ``self.X[...]``, ``self.X.Y(...)`` ... rooted at ``self``."""
    while True:
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == self_name:
            return node.attr
        if isinstance(node, (ast.Attribute, ast.Subscript)):
            node = node.value
        elif isinstance(node, ast.Call):
            node = node.func
        else:
            return None


def loop_module_roots(fn, loop_lines) -> frozenset:
    """Names ``X`` of the attributes ``self.X`` read inside the loops of ``fn`` that start at the file
    lines ``loop_lines``, directly or through a local name bound to ``self.X...`` elsewhere in
    ``fn``. Unreadable source: every attribute (the caller checks all submodules)."""
    key = (fn, tuple(sorted(loop_lines)))
    with _lock:
        if key in _roots:
            return _roots[key]
    found = _tree(fn)
    out: Optional[frozenset] = None
    if found is not None:
        fdef, start = found
        self_name = fdef.args.args[0].arg if fdef.args.args else None
        aliases: dict = {}
        for n in ast.walk(fdef):
            if isinstance(n, ast.Assign):
                root = _root_attr(n.value, self_name)
                for t in n.targets:
                    if root is not None and isinstance(t, ast.Name):
                        aliases.setdefault(t.id, set()).add(root)
        names: set = set()
        for n in ast.walk(fdef):
            if isinstance(n, (ast.For, ast.AsyncFor)) and n.lineno + start - 1 in set(loop_lines):
                for m in ast.walk(n):
                    root = _root_attr(m, self_name) if isinstance(m, ast.Attribute) else None
                    if root is not None:
                        names.add(root)
                    if isinstance(m, ast.Name) and isinstance(m.ctx, ast.Load):
                        names |= aliases.get(m.id, set())
        out = frozenset(names)
    with _lock:
        _roots[key] = out
    return out


def impurity(module: torch.nn.Module, path: str = "") -> Optional[str]:
    """None if running ``module`` (and every module below it) changes nothing that outlives the
    call, as far as their source shows; else the first reason found."""
    for name, sub in module.named_modules():
        where = f"`{'.'.join(p for p in (path, name) if p) or type(sub).__qualname__}` ({type(sub).__qualname__})"
        hooks = [h for h in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                             "_backward_pre_hooks") if getattr(sub, h, None)]
        if hooks:
            return f"{where} has {hooks[0].strip('_').replace('_', ' ')}, which would run for experts with no tokens"
        if isinstance(sub, _STATEFUL_TORCH) and getattr(sub, "track_running_stats", False) and sub.training:
            return f"{where} updates its running statistics in forward"
        reason = _class_verdict(type(sub))
        if reason is not None:
            return f"{where}: {reason}"
    if torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks:
        return "global module forward hooks are registered; they would run for experts with no tokens"
    return None


def _class_verdict(cls) -> Optional[str]:
    with _lock:
        if cls in _class_verdicts:
            return _class_verdicts[cls]
    verdict = _check_class(cls)
    with _lock:
        _class_verdicts[cls] = verdict
    return verdict


def _check_class(cls) -> Optional[str]:
    forward = getattr(cls, "forward", None)
    if forward is None or cls.__module__.startswith("torch.nn.modules."):
        return None  # torch's own modules: stateless in forward but for _STATEFUL_TORCH (above)
    seen: set = set()
    todo = ["forward"]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        fn = getattr(cls, name, None)
        if fn is None or isinstance(inspect.getattr_static(cls, name, None), (staticmethod, classmethod, property)):
            continue
        found = _tree(fn)
        if found is None:
            return f"the source of `{cls.__qualname__}.{name}` cannot be read to prove it free of side effects"
        fdef, start = found
        reason = _writes_state(fdef, start)
        if reason is not None:
            return f"`{cls.__qualname__}.{name}` {reason}"
        self_name = fdef.args.args[0].arg if fdef.args.args else None
        for n in ast.walk(fdef):  # methods it calls as self.m(...): checked too
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) \
                    and isinstance(n.func.value, ast.Name) and n.func.value.id == self_name \
                    and callable(getattr(cls, n.func.attr, None)):
                todo.append(n.func.attr)
    return None


def _writes_state(fdef, start: int) -> Optional[str]:
    """Why ``fdef`` may change state that outlives its call (attributes of its first argument, what
    they alias, globals), or None. In-place ops on tensors it computed itself are fine."""
    self_name = fdef.args.args[0].arg if fdef.args.args else None
    tainted = {self_name} if self_name else set()  # names that may alias the module's state
    for n in ast.walk(fdef):
        if isinstance(n, ast.Assign) and _root_name(n.value) in tainted and not isinstance(n.value, ast.Call):
            tainted |= {t.id for t in n.targets if isinstance(t, ast.Name)}
    line = lambda n: f"(line {n.lineno + start - 1})"
    for n in ast.walk(fdef):
        if isinstance(n, (ast.Global, ast.Nonlocal)):
            return f"declares `{', '.join(n.names)}` {type(n).__name__.lower()} {line(n)}"
        targets = n.targets if isinstance(n, (ast.Assign, ast.Delete)) else \
            [n.target] if isinstance(n, (ast.AugAssign, ast.AnnAssign)) else []
        for t in targets:
            if not isinstance(t, ast.Name) and _root_name(t) in tainted:
                return f"writes `{ast.unparse(t)}` {line(n)}"
            if isinstance(n, ast.AugAssign) and isinstance(t, ast.Name) and t.id in tainted - {self_name}:
                return f"updates `{t.id}` in place {line(n)}"
        if isinstance(n, ast.Call):
            f = n.func
            fname = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            if fname in _SETTERS:
                return f"calls `{fname}` {line(n)}"
            inplace = fname.endswith("_") and not fname.endswith("__")
            if inplace and isinstance(f, ast.Attribute) and _root_name(f.value) in tainted:
                return f"modifies `{ast.unparse(f.value)}` in place (`{fname}`) {line(n)}"
            args = list(n.args) + [k.value for k in n.keywords if k.arg in (None, "out", "input")]
            if (inplace or any(k.arg == "out" for k in n.keywords)) and any(_root_name(a) in tainted for a in args):
                return f"writes a tensor of the module through `{ast.unparse(f)}` {line(n)}"
    return None


def _root_name(node) -> Optional[str]:
    while isinstance(node, (ast.Attribute, ast.Subscript, ast.Starred)):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


_declined = weakref.WeakKeyDictionary()  # module -> [reasons] for loops not captured for it


def record_decline(module: torch.nn.Module, note) -> None:
    """Keep ``note`` (a kept-loop ``loop_capture.LoopNote``) for ``module``; read by ``declines_for``."""
    with _lock:
        _declined.setdefault(module, [])
        if note not in _declined[module]:
            _declined[module].append(note)


def declines_for(module: torch.nn.Module) -> list:
    with _lock:
        return list(_declined.get(module, []))
