"""Capacity loops over per-expert index lists with a ``continue`` skip (labml's Switch with token
dropping), rewritten without the skip so that Dynamo captures them as one graph (source level, a
plan for ``loop_capture.analyse`` like ``_rewrite_loop``'s).

The form, L a list of index tensors bound before the loop, c a capacity::

    for i in range(...):
        if len(L[i]) <= c:                       # or `< c`, `c >= len(L[i])`, `c > len(L[i])`
            continue
        L[i] = L[i][torch.arange(len(L[i]))]     # optional: the rows in their own order
        D.append(L[i][c:])                       # optional: the rows past the capacity, D = [] before
        L[i] = L[i][:c]                          # the first c rows kept

is rewritten with the skip's test ``not isinstance(c, int) and <test>``: for an int c (what Dynamo
traces) every expert runs the statements. Exact because an expert the original skips has
len(L[i]) <= c rows, and then each statement changes nothing the program can observe:
``X[torch.arange(len(X))]`` and ``X[:c]`` hold the rows of X in the same order (the same values, a
new tensor: L's elements are proved not modified in place after the loop), and ``X[c:]`` is empty,
so D gains an empty tensor. D, proved: bound to ``[]`` before the loop, read in the loop only by
these appends, and after it only by ``if D:`` whose body first rebinds ``D = torch.cat(D)`` and then
only copies rows at D (``A[D, :] = B[D, :]``: nothing when D is empty), and by ``len(D)`` (0 for the
empty list and for the cat of empty tensors; for a non-empty D, the cat of the same rows with empty
tensors between). So the only difference is which Python object holds those values. A random
permutation (``torch.randperm``) instead of the identity one is declined: run for every expert it
draws random numbers the original does not draw.
"""
from __future__ import annotations

import ast
from typing import Optional

from moe_inductor.dynamo.source_ast import (PURE_NODES, Decline, following, inside_loop, is_name, length_of, loads, short,
                                           source_text, stores_of)


def _list_item(node, L, i) -> bool:
    """``L[i]``."""
    return isinstance(node, ast.Subscript) and is_name(node.value, L) and is_name(node.slice, i)


def _skip(test, i) -> Optional[tuple]:
    """(L, c) for ``len(L[i]) <= c`` / ``< c`` (either side; any row count but numel): true only when
    L[i] has at most c rows. None for another test."""
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1):
        return None
    op, a, b = type(test.ops[0]), test.left, test.comparators[0]
    for x, c, ok in ((a, b, (ast.LtE, ast.Lt)), (b, a, (ast.GtE, ast.Gt))):
        item, by_numel = length_of(x)
        if item is not None and not by_numel and op in ok and isinstance(item, ast.Subscript) \
                and isinstance(item.value, ast.Name) and is_name(item.slice, i):
            return item.value.id, c
    return None


def _statement(s, L, i, c) -> Optional[str]:
    """The list D a statement appends to (``D.append(L[i][c:])``), "" for ``L[i] = L[i][:c]`` and
    ``L[i] = L[i][torch.arange(len(L[i]))]``; raises Decline for anything else."""
    cut = lambda sl, lower: isinstance(sl, ast.Slice) and sl.step is None and \
        (sl.lower is not None and source_text(sl.lower) == c and sl.upper is None if lower
         else sl.lower is None and sl.upper is not None and source_text(sl.upper) == c)
    if isinstance(s, ast.Assign) and len(s.targets) == 1 and _list_item(s.targets[0], L, i) \
            and isinstance(s.value, ast.Subscript) and _list_item(s.value.value, L, i):
        sl = s.value.slice
        if cut(sl, False):
            return ""
        if isinstance(sl, ast.Call) and isinstance(sl.func, ast.Attribute) and source_text(sl.func.value) == "torch" \
                and sl.func.attr in ("arange", "randperm") and len(sl.args) == 1 and not sl.keywords:
            n, by_numel = length_of(sl.args[0])
            if n is not None and not by_numel and _list_item(n, L, i):
                if sl.func.attr == "arange":
                    return ""
                raise Decline(s, f"`{short(s)}` permutes the rows at random: run for every expert it would "
                                 f"draw random numbers the original does not draw")
    if isinstance(s, ast.Expr) and isinstance(s.value, ast.Call) and isinstance(s.value.func, ast.Attribute) \
            and s.value.func.attr == "append" and isinstance(s.value.func.value, ast.Name) \
            and len(s.value.args) == 1 and not s.value.keywords:
        arg = s.value.args[0]
        if isinstance(arg, ast.Subscript) and _list_item(arg.value, L, i) and cut(arg.slice, True):
            return s.value.func.value.id
    raise Decline(s, f"`{short(s)}` after the capacity skip is not `{L}[{i}] = {L}[{i}][:{c}]`, "
                     f"`{L}[{i}] = {L}[{i}][torch.arange(len({L}[{i}]))]` or `D.append({L}[{i}][{c}:])`: "
                     f"it may do something for an expert with at most {c} rows")


def _row_copy(s, D) -> bool:
    """``A[D] = B[D]`` / ``A[D, :] = B[D, :]`` (the same index, A and B names other than D): with D
    empty it writes nothing."""
    if not (isinstance(s, ast.Assign) and len(s.targets) == 1 and isinstance(s.targets[0], ast.Subscript)
            and isinstance(s.value, ast.Subscript)):
        return False
    t, v = s.targets[0], s.value
    idx = t.slice.elts if isinstance(t.slice, ast.Tuple) else [t.slice]
    full = all(isinstance(e, ast.Slice) and e.lower is e.upper is e.step is None for e in idx[1:])
    return isinstance(t.value, ast.Name) and isinstance(v.value, ast.Name) and D not in (t.value.id, v.value.id) \
        and is_name(idx[0], D) and full and source_text(t.slice) == source_text(v.slice)


def _dropped_if(s, D) -> bool:
    """``if D: D = torch.cat(D); <row copies at D>`` (no else)."""
    if not (isinstance(s, ast.If) and is_name(s.test, D) and not s.orelse and s.body):
        return False
    first = s.body[0]
    cat = isinstance(first, ast.Assign) and len(first.targets) == 1 and is_name(first.targets[0], D) \
        and source_text(first.value) in (f"torch.cat({D})", f"torch.cat({D}, 0)", f"torch.cat({D}, dim=0)")
    return cat and all(_row_copy(t, D) for t in s.body[1:])


def _check_dropped(fdef, loop, D) -> None:
    """D: bound ``D = []`` before the loop and by the cat of ``_dropped_if`` only, read in the loop
    only by the appends, after it only by ``_dropped_if`` and, after that, ``len(D)`` (before the
    cat, ``len(D)`` would count the experts over capacity: every expert once the skip is gone)."""
    binds = [n for n in ast.walk(fdef) if isinstance(n, ast.Assign) and any(is_name(t, D) for t in n.targets)]
    before = [a for a in binds if a.lineno < loop.lineno]
    if stores_of(fdef).get(D) != len(binds) or len(before) != 1 or source_text(before[0].value) != "[]" \
            or any(a.lineno > loop.lineno and not is_name(a.value.args[0] if isinstance(a.value, ast.Call)
                                                           and a.value.args else None, D) for a in binds):
        raise Decline(loop, f"`{D}` (the dropped rows) is not bound once to `[]` before the loop")
    allowed, catted = set(), False  # len(D) only once D is the cat: before it, it counts the appends
    for s in following(fdef, loop):
        if _dropped_if(s, D):  # a statement of an enclosing block: runs once, after the loop
            allowed.update(id(m) for m in ast.walk(s))
            catted = True
        for n in ast.walk(s) if catted else ():
            if isinstance(n, ast.Call) and is_name(n.func, "len") and len(n.args) == 1 and is_name(n.args[0], D):
                allowed.add(id(n.args[0]))
    inside = {id(n.func.value) for n in ast.walk(loop) if isinstance(n, ast.Call)
              and isinstance(n.func, ast.Attribute) and n.func.attr == "append"}
    for n in loads(fdef, D):
        if id(n) not in allowed | inside:
            raise Decline(n, f"`{D}` (the dropped rows) is read other than by `if {D}: {D} = torch.cat({D})` and "
                             f"row copies at it, or `len({D})` (line {n.lineno}): with the skip removed it also "
                             f"holds empty tensors of the experts under capacity")


def _check_list(fdef, loop, L) -> None:
    """The elements of L are only indexed after the loop, never modified in place (the loop rebinds
    an expert under capacity to a copy of its rows)."""
    for s in following(fdef, loop):
        for n in ast.walk(s):
            if isinstance(n, ast.Name) and n.id == L and isinstance(n.ctx, ast.Load):
                p = getattr(n, "_sonic_parent", None)
                if not (isinstance(p, ast.Subscript) and p.value is n):
                    raise Decline(n, f"`{L}` is used after the loop other than indexed (line {n.lineno})")
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr.endswith("_") \
                    and not n.func.attr.endswith("__") and L in {m.id for m in ast.walk(n.func.value)
                                                                  if isinstance(m, ast.Name)}:
                raise Decline(n, f"`{short(n)}` modifies an element of `{L}` in place after the loop")


def capacity_skip_loop(fdef, loop) -> Optional[tuple]:
    """The plan (statements, None, set(), form) for a loop of the module docstring's form; None when
    the loop does not start with a capacity skip of a list element; raises Decline when it does and
    the rest is not provably a no-op for an expert under capacity."""
    if not (isinstance(loop, ast.For) and isinstance(loop.target, ast.Name) and isinstance(loop.iter, ast.Call)
            and is_name(loop.iter.func, "range") and loop.body and isinstance(loop.body[0], ast.If)):
        return None
    i, head = loop.target.id, loop.body[0]
    found = _skip(head.test, i)
    if found is None or head.orelse or len(head.body) != 1 or not isinstance(head.body[0], ast.Continue):
        return None
    L, c = found
    if loop.orelse or inside_loop(fdef, loop):
        raise Decline(loop, "the capacity loop has an `else:` clause or is inside another loop")
    if not all(isinstance(n, PURE_NODES) for n in ast.walk(c)) or \
            any(isinstance(n, ast.Name) and n.id in (L, i) for n in ast.walk(c)):
        raise Decline(head, f"the capacity `{short(c)}` has calls, indexing or names the loop binds")
    c_src = source_text(c)
    lists = {_statement(s, L, i, c_src) for s in loop.body[1:]}
    if "" not in lists:
        raise Decline(loop, f"no `{L}[{i}] = {L}[{i}][:{c_src}]`: the rows over capacity are kept")
    for n in ast.walk(fdef):
        for ch in ast.iter_child_nodes(n):
            ch._sonic_parent = n
    for D in sorted(lists - {""}):
        _check_dropped(fdef, loop, D)
    _check_list(fdef, loop, L)
    new_loop = ast.For(target=loop.target, iter=loop.iter, orelse=[], body=[
        ast.If(test=ast.BoolOp(op=ast.And(), values=[ast.parse(f"not isinstance({c_src}, int)", mode="eval").body,
                                                      head.test]), body=head.body, orelse=[])] + loop.body[1:])
    form = f"`for {i} in {short(loop.iter)}` without `if {short(head.test)}: continue` (as {L}[{i}][:{c_src}])"
    return [ast.copy_location(new_loop, loop)], None, set(), form
