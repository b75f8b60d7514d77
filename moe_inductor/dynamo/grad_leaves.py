"""A ``requires_grad=True`` tensor creation whose gradient nobody can read, traced without the flag
in sonic frames.

LLaMA-MoE's gate writes ``zeros = torch.zeros_like(logits, requires_grad=True)`` and on the next
line ``scores = zeros.scatter(dim=1, index=idx, src=top_k_scores)``. Dynamo cannot create a leaf
that requires grad inside a graph and breaks there, which splits the MoE block (the expert ids
then reach the experts' graph as an input). The flag changes nothing anyone reads when, proved
from the frame's source and the values Dynamo holds at that point:

- the creation is ``NAME = torch.<zeros|ones|full>[_like](..., requires_grad=True)``, the only store
  of NAME in the function, which no nested scope captures;
- NAME is loaded exactly once, in the very next statement of the same block, as the receiver of an
  out-of-place ``scatter``/``scatter_add``/``index_add``/``index_copy`` whose source argument is a
  local name that the frame holds as a tensor requiring grad now (no statement runs in between), or a
  floating cast of one, ``NAME.float()`` / ``.double()`` / ``.half()`` / ``.bfloat16()`` (David Rau's
  ``zeros.index_add(0, batch_index, stitched.float())``): a cast of a floating tensor that requires grad
  to a floating dtype is differentiable, so it requires grad too, and its backward casts the gradient
  back whatever the receiver is.

Then the leaf is referenced by nothing but that op (its ``.grad`` is accumulated into a tensor no
code can reach), the op's value is the same (the leaf's values do not depend on the flag), its
``requires_grad`` is the same (the source requires grad; with grad mode off neither does), and the
gradient reaching the source is the same (the backward of these ops for the source does not read
the receiver). Anything else keeps Dynamo's graph break; ``reasons()`` (via ``shape_items``) says why.
"""
from __future__ import annotations

import ast
import inspect
import logging
import textwrap

import torch

log = logging.getLogger("moe_inductor")

FACTORIES = (torch.zeros, torch.ones, torch.full, torch.zeros_like, torch.ones_like, torch.full_like)
_CASTS = ("float", "double", "half", "bfloat16")  # floating casts without arguments: differentiable
_USES = {"scatter": ("src", 2), "scatter_add": ("src", 2), "index_add": ("source", 2), "index_copy": ("source", 2)}
_cache: dict = {}  # code object -> (function AST, first line) or None


def _function_ast(code):
    if code not in _cache:
        try:
            lines, start = inspect.getsourcelines(code)
            fdef = ast.parse(textwrap.dedent("".join(lines))).body[0]
            _cache[code] = (fdef, start) if isinstance(fdef, (ast.FunctionDef, ast.AsyncFunctionDef)) else None
        except (OSError, TypeError, SyntaxError, IndentationError, IndexError):
            _cache[code] = None
    return _cache[code]


def _creation_and_use(fdef, line: int):
    """(name, the next statement) of ``name = <call with requires_grad=...>`` at source line ``line``."""
    for block in (getattr(n, f, None) for n in ast.walk(fdef) for f in ("body", "orelse", "finalbody")):
        if not isinstance(block, list):
            continue
        for i, s in enumerate(block):
            if isinstance(s, ast.Assign) and s.lineno <= line <= s.end_lineno and len(s.targets) == 1 \
                    and isinstance(s.targets[0], ast.Name) and isinstance(s.value, ast.Call) \
                    and any(k.arg == "requires_grad" for k in s.value.keywords):
                return s.targets[0].id, (block[i + 1] if i + 1 < len(block) else None)
    return None, None


def source_of_use(code, line: int):
    """The name of the source argument of the one out-of-place use of the leaf created at ``line``
    of ``code``, when the source proves the flag unread (see the module docstring), else a reason."""
    found = _function_ast(code)
    if found is None:
        return None, "the frame's source cannot be read"
    fdef, start = found
    name, nxt = _creation_and_use(fdef, line - start + 1)
    if name is None or nxt is None:
        return None, "not `name = factory(..., requires_grad=True)` followed by a statement"
    if name in code.co_cellvars or name in code.co_freevars:
        return None, f"`{name}` is captured by a nested scope"
    stores = [n for n in ast.walk(fdef) if isinstance(n, ast.Name) and n.id == name and isinstance(n.ctx, ast.Store)]
    loads = [n for n in ast.walk(fdef) if isinstance(n, ast.Name) and n.id == name and isinstance(n.ctx, ast.Load)]
    uses = [n for n in ast.walk(nxt) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
            and isinstance(n.func.value, ast.Name) and n.func.value.id == name and n.func.attr in _USES]
    if len(stores) != 1 or len(loads) != 1 or len(uses) != 1:
        return None, f"`{name}` is not read exactly once, as the receiver of an out-of-place scatter/index_add"
    call = uses[0]
    kw, pos = _USES[call.func.attr]
    src = next((k.value for k in call.keywords if k.arg == kw), call.args[pos] if len(call.args) > pos else None)
    if isinstance(src, ast.Call) and isinstance(src.func, ast.Attribute) and src.func.attr in _CASTS \
            and not src.args and not src.keywords:
        src = src.func.value  # NAME.float(): requires grad when NAME does and is floating (drop_flag checks)
    if not isinstance(src, ast.Name):
        return None, f"the source of `{name}.{call.func.attr}` is not a local name (or a floating cast of one)"
    return src.id, None


def drop_flag(tx, fn, kwargs):
    """(kwargs without ``requires_grad``, None) when the flag is proved unread (see the module
    docstring); (None, why) when a flagged creation is kept; (None, None) when there is nothing to
    decide. The caller (``shape_items``) records the reason."""
    flag = kwargs.get("requires_grad")
    try:
        if fn not in FACTORIES or flag is None or flag.as_python_constant() is not True:
            return None, None
    except Exception:
        return None, None
    name = getattr(fn, "__name__", fn)
    src, why = source_of_use(tx.f_code, tx.lineno)
    if src is not None:
        var = tx.symbolic_locals.get(src)
        value = var.as_proxy().node.meta.get("example_value") if hasattr(var, "as_proxy") else None
        if isinstance(value, torch.Tensor) and value.requires_grad and value.is_floating_point():
            log.debug("sonic: %s(requires_grad=True) at %s:%s traced without the flag (its gradient is unread)",
                      name, tx.f_code.co_filename, tx.lineno)
            return {k: v for k, v in kwargs.items() if k != "requires_grad"}, None
        why = f"the source `{src}` of its one use does not require grad here"
    return None, f"{name}(requires_grad=True) kept: {why}"
