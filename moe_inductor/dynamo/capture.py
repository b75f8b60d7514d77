"""Make graph-breaking per-expert loops capturable by Dynamo, for the modules sonic compiles.

Many experts modules loop over the experts that received tokens (``for e in (mask.sum(...) > 0)
.nonzero()``) or skip the others (``if counts[e] == 0: continue``, ``if mask.any():``): Dynamo cannot
trace that as one graph, so no compiled graph holds the MoE block and no recogniser can rewrite
it. ``moe_inductor.dynamo.loop_capture`` reads a forward's source, proves that running every expert (the
empty ones on zero rows) computes the same thing, and writes an equivalent forward whose loop runs
over ``range(E)``; this file decides where that forward is used.

Scope: nothing happens at import, and no class is changed. ``prepare(f_locals)`` runs when Dynamo
starts tracing a frame compiled with the sonic backend (``moe_inductor.dynamo.dynamo_scope``): it gives
each submodule of that frame's modules (``self``, arguments) whose class forward (or another
method of the class whose code loops, such as DeepSeek's ``moe_infer`` that the forward calls as
``self.moe_infer(...)``; the definition the instance sees, decorators such as ``@torch.no_grad()``
kept) has a rewritten loop an *instance* attribute of that name (``CapturableForward``) that runs the class's own method in eager and
the rewritten one while Dynamo traces (``torch.compiler.is_dynamo_compiling()``, a constant during
tracing, so the branch costs nothing in the graph). Other modules, other backends and eager code
of modules sonic never compiled keep the original. A module sonic compiled keeps the instance
attribute (Dynamo guards on it); a later compile of the same instance with another backend traces
the rewritten loop too (the same values; still one graph).
(``torch.compiler.substitute_in_graph`` is not used: Dynamo inlines an nn.Module's ``forward``
without consulting it, checked on torch 2.13.)

Decorated forwards: transformers' ``use_experts_implementation`` replaces ``forward`` by a wrapper
that dispatches on ``config._experts_implementation`` and calls the original (its ``__wrapped__``,
held in the wrapper's closure) for "eager". The rewritten forward is then a copy of the wrapper
whose closure holds the rewritten original: "grouped_mm" and the others keep their own code.

Values: forward values are identical (same experts, same order, same rows accumulated). One
difference is visible when compiled: an expert that receives no token in a step gets a zero
gradient for its parameters instead of ``None`` (eager skips it; the captured loop runs it on
zero rows). Nothing here raises: every failure is logged at debug level and leaves the module as
it was. ``notes_for(module)`` gives, per loop, what was rewritten or why not (used by ``explain``).
"""
from __future__ import annotations

import logging
from typing import Optional
import threading
import weakref

import torch

from moe_inductor.dynamo import loop_capture, side_effects

log = logging.getLogger("moe_inductor")

_lock = threading.RLock()
_dropped = weakref.WeakKeyDictionary()  # module -> reason: its capture was given up (``drop``)
_analysed: dict = {}  # class forward (the function object) -> (replacement or None, [LoopNote])


class CapturableForward:
    """An instance-level method (``forward``, or a method the forward calls as ``self.name(...)``,
    e.g. DeepSeek's ``moe_infer``): the class's own method in eager, ``replacement`` while Dynamo
    traces. A class, not a closure, so that the module still pickles and deep-copies."""

    def __init__(self, module: torch.nn.Module, original, replacement, name: str = "forward"):
        self.module = module
        self.original = original
        self.replacement = replacement
        self.name = name

    def __call__(self, *args, **kwargs):
        if torch.compiler.is_dynamo_compiling():
            return self.replacement(self.module, *args, **kwargs)
        return self.original(self.module, *args, **kwargs)

    def __reduce__(self):
        # pickle by reference to the class's method; the replacement is found again on load
        return (_restore, (self.module, self.name))


def _restore(module, name: str = "forward"):
    method = getattr(type(module), name)
    replacement, _ = _analyse(method)
    if replacement is None or _called_modules_impurity(module, name):
        return method.__get__(module)
    return CapturableForward(module, method, replacement, name)


def _methods(cls) -> dict:
    """{name: function} of the methods defined by ``cls`` and its bases below nn.Module whose
    loops may be rewritten: ``forward`` and the plain methods it may call (not properties,
    static/class methods or dunders). Looked up as the instance would see them (MRO order)."""
    found: dict = {}
    seen: set = set()  # names already defined lower in the MRO: what the instance sees is that one
    for klass in cls.__mro__:
        if klass is torch.nn.Module or klass is object or _skip_class(klass):
            continue
        for name, value in vars(klass).items():
            if name in seen or (name.startswith("__") and name.endswith("__")):
                continue
            seen.add(name)
            if isinstance(value, (type, staticmethod, classmethod, property)) or not callable(value):
                continue
            inner = value
            while getattr(inner, "__wrapped__", None) is not None:
                inner = inner.__wrapped__
            code = getattr(inner, "__code__", None)
            # forward always; another method only if its code loops at all (cheap: no source read)
            if code is not None and (name == "forward" or _has_loop(code)):
                found[name] = value
    return found


_loops: dict = {}  # code object -> whether it has a for loop


def _has_loop(code) -> bool:
    if code not in _loops:
        import dis

        _loops[code] = any(ins.opname == "FOR_ITER" for ins in dis.get_instructions(code))
    return _loops[code]


def _skip_class(cls) -> bool:
    # torch's own modules hold no per-expert loops; reading their source would only cost time
    return cls.__module__.startswith(("torch.nn.", "moe_inductor."))


def _analyse(forward) -> tuple:
    """(replacement of ``forward`` or None, notes), computed once per function object."""
    with _lock:
        if forward in _analysed:
            return _analysed[forward]
    result = (None, [])
    try:
        inner = getattr(forward, "__wrapped__", None)
        if inner is not None and getattr(inner, "__wrapped__", None) is None:
            analysis = loop_capture.analyse(inner)
            replacement = None
            if analysis.replacement is not None:
                replacement = loop_capture.with_inner(forward, inner, analysis.replacement)
                if replacement is None:
                    log.debug("sonic: %s is decorated without a closure holding its original; not rewritten",
                              getattr(forward, "__qualname__", forward))
            result = (replacement, analysis.notes)
        elif inner is None:
            analysis = loop_capture.analyse(forward)
            result = (analysis.replacement, analysis.notes)
    except Exception as e:  # never fail a compile over this
        log.debug("sonic: could not analyse %s: %s", getattr(forward, "__qualname__", forward), e)
    for note in result[1]:
        log.debug("sonic: %s", note)
    with _lock:
        _analysed[forward] = result
    return result


def replacement_for(cls) -> object:
    """The capturable replacement of ``cls.forward`` (a function taking the module first), or None."""
    return replacements_for(cls).get("forward")


def replacements_for(cls) -> dict:
    """{method name: capturable replacement} for ``forward`` and the other methods of ``cls`` with a
    rewritten per-expert loop (only methods whose code loops are analysed; each function once).
    Read from the class each time, so a method replaced on the class later is seen."""
    if _skip_class(cls):
        return {}
    out = {}
    try:
        for name, fn in _methods(cls).items():
            replacement = _analyse(fn)[0]
            if replacement is not None:
                out[name] = replacement
    except Exception as e:  # never fail a compile over this
        log.debug("sonic: could not read the methods of %s: %s", cls.__qualname__, e)
    return out


def notes_for(module: torch.nn.Module) -> list:
    """``loop_capture.LoopNote`` of every per-expert loop in the forwards of ``module`` and its
    submodules: rewritten ones and the reason for the others."""
    out, seen = [], set()
    for sub in module.modules():
        if _skip_class(type(sub)):
            continue
        out.extend(side_effects.declines_for(sub))  # loops kept for this instance (side effects)
        for name, fn in _methods(type(sub)).items():
            if fn in seen:
                continue
            seen.add(fn)
            out.extend(_analyse(fn)[1])
            if name == "forward":
                out.extend(_host_splits_of(fn, type(sub)))
    return out


_splits: dict = {}  # (class forward, module class) -> host_count_splits notes


def _host_splits_of(forward, cls: Optional[type] = None) -> list:
    """``loop_capture.host_count_splits`` of ``forward`` with the methods it calls on ``self`` looked
    up on ``cls``, the module's own class (an inherited forward may call an overridden method)."""
    key = (forward, cls)
    with _lock:
        if key in _splits:
            return _splits[key]
    try:
        fn = forward
        while getattr(fn, "__wrapped__", None) is not None:
            fn = fn.__wrapped__
        notes = loop_capture.host_count_splits(fn, cls=cls)
    except Exception as e:  # never fail a compile over this
        log.debug("sonic: could not read %s: %s", getattr(forward, "__qualname__", forward), e)
        notes = []
    with _lock:
        _splits[key] = notes
    return notes


def wants_host_counts(f_locals: dict) -> bool:
    """Whether a module of the frame (``self``, arguments, their submodules) splits rows by host
    sizes in its forward (``loop_capture.host_count_splits``): Dynamo then traces the frame with
    ``capture_scalar_outputs`` so that the counts' ``.tolist()`` stays in the graph as symbolic
    sizes, which ``moe_inductor.dynamo.host_splits`` turns into device offsets (scoped by
    ``moe_inductor.dynamo.dynamo_scope``; a failure retries the frame without the settings)."""
    for module in _frame_modules(f_locals):
        forward = getattr(type(module), "forward", None)
        if forward is not None and not _skip_class(type(module)) and _host_splits_of(forward, type(module)):
            return True
    return False


def _frame_modules(f_locals: dict):
    """The nn.Modules among ``f_locals`` and their submodules (each top-level module walked once)."""
    seen: set = set()
    for value in list(f_locals.values()):
        if isinstance(value, CapturableForward):  # the capturable forward's own frame: its module
            value = value.module
        if not isinstance(value, torch.nn.Module) or id(value) in seen:
            continue
        seen.add(id(value))
        yield from value.modules()


def prepare(f_locals: dict) -> int:
    """Give the submodules of the nn.Modules among ``f_locals`` (the locals of a frame sonic is
    about to trace) whose forward has a rewritten per-expert loop their capturable ``forward``.
    Returns how many were given one."""
    done = 0
    for module in _frame_modules(f_locals):
        for name, replacement in replacements_for(type(module)).items():
            if name in module.__dict__ or module in _dropped:
                continue  # already given one (or the user set their own), or given up (drop)
            kept = _called_modules_impurity(module, name)
            if kept:
                for note in kept:
                    side_effects.record_decline(module, note)
                log.info("sonic: %s.%s keeps its per-expert loop: %s", type(module).__qualname__, name, kept[0].reason)
                continue
            setattr(module, name, CapturableForward(module, getattr(type(module), name), replacement, name))
            done += 1
            log.debug("sonic: Dynamo traces %s.%s with its per-expert loop over every expert",
                      type(module).__qualname__, name)
    return done


def _called_modules_impurity(module: torch.nn.Module, name: str) -> list:
    """A kept-loop ``LoopNote`` per rewritten loop of ``module.<name>`` when a module the loops call
    may not run for experts with no tokens (``side_effects``); [] when all are proved free of side
    effects. Every submodule is checked where the loop cannot be read."""
    method = getattr(type(module), name)
    rewritten = [n for n in _analyse(method)[1] if n.rewritten]
    roots = side_effects.loop_module_roots(method, [n.lineno for n in rewritten])
    if roots is not None:  # a rewritten list comprehension is no `for` statement: its modules come with its note
        roots = roots | frozenset().union(*(n.modules for n in rewritten))
    subs = [(f"self.{r}", getattr(module, r, None)) for r in sorted(roots)] if roots is not None \
        else [(f"self.{r}", sub) for r, sub in module.named_children()]
    for path, sub in subs:
        if isinstance(sub, torch.nn.Module):
            reason = side_effects.impurity(sub, path)
            if reason is not None:
                reason = (f"not traced as a loop over every expert: {reason}; running it for experts with no "
                          "tokens would change state that eager leaves alone")
                return [loop_capture.LoopNote(n.filename, n.lineno, n.function, False, reason=reason)
                        for n in rewritten]
    return []


def owners_in(f_locals: dict, modules) -> list:
    """The modules among ``modules`` and the frame's (``f_locals``: a capturable forward's own frame,
    or a module whose instance attributes hold one) that have a capturable method."""
    out = []
    candidates = list(modules) + [v.module if isinstance(v, CapturableForward) else v for v in f_locals.values()]
    for m in candidates:
        if isinstance(m, torch.nn.Module) and m not in out \
                and any(isinstance(v, CapturableForward) for v in m.__dict__.values()):
            out.append(m)
    return out


def drop(module: torch.nn.Module, reason: str) -> None:
    """Give up the capture of ``module``: its capturable methods are removed (Dynamo guards on the
    instance attribute, so the frames that traced them compile again) and never given back; the
    class's own forward is traced from then on, as plain Inductor would. A kept-loop note with
    ``reason`` is recorded for ``notes_for``/explain."""
    with _lock:
        _dropped[module] = reason
    for name, value in list(module.__dict__.items()):
        if not isinstance(value, CapturableForward):
            continue
        del module.__dict__[name]
        try:  # a trampoline into this forward is cached for the class's forward code: compile it again
            torch._dynamo.reset_code(getattr(value.original, "__code__", None) or value.original.__func__.__code__)
        except Exception as e:
            log.debug("sonic: could not reset the code of %s: %s", name, e)
        for n in _analyse(value.original)[1]:
            if n.rewritten:
                side_effects.record_decline(module, loop_capture.LoopNote(n.filename, n.lineno, n.function, False,
                                                                          reason=reason))


def needs_trampoline(code, f_locals: dict) -> bool:
    """The frame Dynamo is about to trace is the class ``forward`` (code ``code``) of a module that
    ``prepare`` just gave a capturable one (the compiled module is itself the loop's owner:
    ``torch.compile(moe_block)``), and a trampoline can stand in for it (``trampoline_for``)."""
    return _owner_of(code, f_locals) is not None and trampoline_for(code) is not None


def _owner_of(code, f_locals: dict):
    """The module whose original class ``forward`` (code ``code``) the frame runs, when the module
    has a capturable forward; else None."""
    names = code.co_varnames[:1]
    module = f_locals.get(names[0]) if names else None
    if not isinstance(module, torch.nn.Module):
        return None
    mine = module.__dict__.get("forward")
    if not isinstance(mine, CapturableForward) or getattr(mine.original, "__code__", None) is not code:
        return None
    return module


#: the constant a trampoline's template calls, replaced by ``_enter_capturable`` in its co_consts
_PLACEHOLDER = "__sonic_capturable_forward__"
_trampolines: dict = {}  # forward code -> trampoline code (or None: cannot be built)


def trampoline_for(code):
    """A code object with exactly the arguments (and local slots) of ``code``, a module's class
    forward, whose body is ``return _enter_capturable(self, args, kwargs)``: the module's capturable
    forward. Dynamo runs it, through its bytecode hook (``dynamo_scope``), in place of what it made
    of the original forward, so that the first call of ``torch.compile(block)`` already runs the
    captured loop (that frame was created before ``prepare`` gave the instance its forward). None
    when the forward has cell or free variables (their slots would not line up) or is a generator."""
    with _lock:
        if code in _trampolines:
            return _trampolines[code]
    built = None
    try:
        built = _build_trampoline(code)
    except Exception as e:  # never fail a compile over this: the frame then runs eagerly once
        log.debug("sonic: no trampoline for %s: %s", code.co_name, e)
    with _lock:
        _trampolines[code] = built
    return built


def _build_trampoline(code):
    import inspect as _inspect
    import warnings

    flags = code.co_flags
    if code.co_freevars or flags & (_inspect.CO_GENERATOR | _inspect.CO_COROUTINE |
                                    _inspect.CO_ASYNC_GENERATOR | _inspect.CO_ITERABLE_COROUTINE):
        return None
    names = code.co_varnames
    npos, nkw = code.co_argcount, code.co_kwonlyargcount
    nargs = npos + nkw + bool(flags & _inspect.CO_VARARGS) + bool(flags & _inspect.CO_VARKEYWORDS)
    # cells: only arguments a nested scope reads (a comprehension over ``x`` on Python 3.11: rxlm);
    # the trampoline makes the same arguments cells, so the frame's slots line up one for one
    if any(c not in names[:nargs] for c in code.co_cellvars):
        return None
    pos, kwonly = list(names[:npos]), list(names[npos:npos + nkw])
    at = npos + nkw
    star = names[at] if flags & _inspect.CO_VARARGS else None
    at += bool(star)
    starstar = names[at] if flags & _inspect.CO_VARKEYWORDS else None
    if not pos:
        return None
    npo = code.co_posonlyargcount
    params = pos[:npo] + (["/"] if npo else []) + pos[npo:]
    if star:
        params.append("*" + star)
    elif kwonly:
        params.append("*")
    params += kwonly
    if starstar:
        params.append("**" + starstar)
    args = "(" + "".join(f"{n}, " for n in pos[1:]) + ")" + (f" + {star}" if star else "")
    kwargs = "{" + ", ".join(f"{n!r}: {n}" for n in kwonly) + "}"
    if starstar:
        kwargs = f"{{**{kwargs}, **{starstar}}}"
    cells = "".join(f"    (lambda: {c})\n" for c in code.co_cellvars)
    src = f"def {code.co_name}({', '.join(params)}):\n{cells}    return {_PLACEHOLDER!r}({pos[0]}, {args}, {kwargs})\n"
    namespace: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SyntaxWarning)  # "'str' object is not callable": replaced below
        exec(compile(src, code.co_filename, "exec"), {}, namespace)
    tmpl = namespace[code.co_name].__code__
    consts = tuple(_enter_capturable if c == _PLACEHOLDER else c for c in tmpl.co_consts)
    if consts == tmpl.co_consts or tmpl.co_varnames != names[:len(tmpl.co_varnames)] \
            or tmpl.co_cellvars != code.co_cellvars:
        return None
    # the original's local slots: Dynamo copies the frame's locals into the new code slot by slot
    extra = {"co_qualname": code.co_qualname} if hasattr(code, "co_qualname") else {}
    return tmpl.replace(co_consts=consts, co_varnames=names, co_nlocals=len(names), co_filename=code.co_filename,
                        co_firstlineno=code.co_firstlineno, co_name=code.co_name, **extra)


@torch.compiler.disable(recursive=False)
def _enter_capturable(module, args, kwargs):
    """What a trampoline calls: the module's capturable forward, which Dynamo traces (this frame
    itself is not traced). Another instance of the class whose frame matched the cached trampoline
    (compiled on its own, by sonic: Dynamo's cache entries belong to their backend) is given its
    capturable forward first; one that cannot have it runs its own forward without Dynamo."""
    mine = module.__dict__.get("forward")
    if not isinstance(mine, CapturableForward) and "forward" not in module.__dict__:
        prepare({"module": module})
        mine = module.__dict__.get("forward")
    if isinstance(mine, CapturableForward):
        return mine(*args, **kwargs)
    return torch.compiler.disable(type(module).forward)(module, *args, **kwargs)


def restart_error(code, f_locals: dict):
    """The frame Dynamo is about to trace is the class ``forward`` of a module that ``prepare`` just
    gave a capturable one (the compiled module itself: ``torch.compile(moe_block)``): tracing it
    would trace the original loop. Returns a soft Dynamo error that runs this one call eagerly and
    lets Dynamo compile again on the next call, which goes through the instance ``forward``; None
    otherwise (and on a torch without frame execution strategies)."""
    module = _owner_of(code, f_locals)
    if module is None:
        return None
    try:
        from torch._dynamo.exc import Unsupported
        from torch._dynamo.types import FrameAction, FrameExecStrategy
    except ImportError:
        return None
    error = Unsupported(f"sonic: {type(module).__qualname__}.forward is traced from its capturable forward "
                        f"from the next call on; this call runs eagerly")
    if hasattr(error, "remove_from_stats"):
        try:
            error.remove_from_stats()  # not a graph break of the user's code
        except Exception:
            pass
    # this call: the frame and the frames it calls run without Dynamo (nothing compiled for a
    # call that is thrown away); the frame itself is not marked: the next call compiles again
    error.frame_exec_strategy = FrameExecStrategy(FrameAction.DEFAULT, FrameAction.SKIP)
    return error
