"""Reading Python source of forward methods: the AST vocabulary of the loop capture
(``loop_capture``, ``drop_lists``): names, loads and stores, statements after a loop, row counts,
and ``Decline``, the one way a source-level proof says no (with the line it stopped at)."""
from __future__ import annotations

import ast
from typing import Optional


class Decline(Exception):
    def __init__(self, node, text: str):
        super().__init__(text)
        self.lineno = getattr(node, "lineno", 0)
        self.text = text


def source_text(node) -> str:
    try:
        return ast.unparse(node)
    except Exception:  # pragma: no cover
        return ast.dump(node)


def short(node, limit: int = 60) -> str:
    s = source_text(node).replace("\n", " ")
    return s if len(s) <= limit else s[:limit - 3] + "..."


def is_method(node, names, receiver=None) -> bool:
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in names \
        and (receiver is None or source_text(node.func.value) == receiver)


def is_torch_fn(node, names) -> bool:
    """``torch.<name>(...)`` / ``torch.nn.functional.<name>`` / ``F.<name>`` / bare ``<name>``."""
    if not isinstance(node, ast.Call):
        return False
    f = node.func
    if isinstance(f, ast.Attribute):
        return f.attr in names
    return isinstance(f, ast.Name) and f.id in names


def const_int(node) -> Optional[int]:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        v = const_int(node.operand)
        return -v if v is not None else None
    return None


def length_of(node) -> tuple:
    """(X, by_numel) when ``node`` counts the rows of X: ``len(X)``, ``X.shape[0]``, ``X.size(0)``,
    ``X.size()[0]`` (by_numel False), ``X.numel()``, ``X.nelement()`` (by_numel True: the row count
    only when X is 1-D); (None, False) for anything else."""
    if is_method(node, {"numel", "nelement"}) and not node.args:
        return node.func.value, True
    if is_method(node, {"size"}) and len(node.args) == 1 and const_int(node.args[0]) == 0:
        return node.func.value, False
    if isinstance(node, ast.Subscript) and const_int(node.slice) == 0 and (
            (isinstance(node.value, ast.Attribute) and node.value.attr == "shape")
            or (is_method(node.value, {"size"}) and not node.value.args)):
        return (node.value.value if isinstance(node.value, ast.Attribute) else node.value.func.value), False
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "len" \
            and len(node.args) == 1:
        return node.args[0], False
    return None, False


PURE_NODES = (ast.Name, ast.Attribute, ast.Constant, ast.BinOp, ast.UnaryOp, ast.operator, ast.unaryop,
               ast.expr_context)


def stores_of(fdef) -> dict:
    count: dict = {}
    for n in ast.walk(fdef):
        if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
            count[n.id] = count.get(n.id, 0) + 1
    args = fdef.args
    for a in args.posonlyargs + args.args + args.kwonlyargs + [args.vararg, args.kwarg]:
        if a is not None:
            count[a.arg] = count.get(a.arg, 0) + 1
    return count


def loads(fdef, name, exclude=None) -> list:
    skip = {id(n) for n in ast.walk(exclude)} if exclude is not None else set()
    return [n for n in ast.walk(fdef) if isinstance(n, ast.Name) and n.id == name
            and isinstance(n.ctx, ast.Load) and id(n) not in skip]


def following(fdef, loop):
    """Statements that run after ``loop`` (the rest of its block, then of each enclosing block)."""
    out = []

    def visit(body) -> bool:
        for i, s in enumerate(body):
            if s is loop:
                out.extend(body[i + 1:])
                return True
            for field in ("body", "orelse", "finalbody"):
                sub = getattr(s, field, None)
                if isinstance(sub, list) and visit(sub):
                    out.extend(body[i + 1:])
                    return True
            for h in getattr(s, "handlers", []) or []:
                if visit(h.body):
                    out.extend(body[i + 1:])
                    return True
        return False

    visit(fdef.body)
    return out


def inside_loop(fdef, loop) -> bool:
    for n in ast.walk(fdef):
        if isinstance(n, (ast.For, ast.While, ast.AsyncFor)) and n is not loop:
            if any(m is loop for m in ast.walk(n)):
                return True
    return False


def is_name(node, name) -> bool:
    return isinstance(node, ast.Name) and node.id == name
