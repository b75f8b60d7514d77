"""The Dynamo settings the sonic backend needs, applied only to the frames compiled with it.

Why a setting at all: a per-expert loop over ``torch.where(mask)`` / ``nonzero`` is captured as one
graph only with ``torch._dynamo.config.capture_dynamic_output_shape_ops = True`` (without it, and
without ``fullgraph=True``, Dynamo graph-breaks inside the loop and skips the whole frame: no graph
holds the MoE block, nothing to rewrite).

Why not ``backend_ctx_ctor``: Dynamo enters a backend's ``backend_ctx_ctor`` only when the backend
callable itself is handed to ``torch._dynamo.optimize``. ``torch.compile(..., backend=X)`` always
wraps X in ``torch._TorchCompileWrapper`` (options or not), which does not carry the attribute
(checked on torch 2.13: the context is never entered, with or without ``options=``, ``fullgraph``,
``dynamic``, ``mode``). The one hook Dynamo runs before it traces each frame, for every backend, is
its compile-start callback (``torch._dynamo.callback_handler``). So:

- ``install()`` registers a start and an end callback (an inert registration: no torch config and
  no class changes). The start callback finds the frame Dynamo is about to trace and its backend
  (the ``_compile`` call on the stack); for a sonic frame only, it enters
  ``torch._dynamo.config.patch(**SETTINGS)`` and lets ``moe_inductor.dynamo.capture`` make the
  graph-breaking per-expert loops of the frame's modules capturable; the end callback leaves the
  patch. When the frame is itself such a module's original forward (``torch.compile(block)``: the
  frame exists before the block got its capturable forward), Dynamo still traces it, without the
  settings and without compiling its graphs, and a bytecode hook (``register_bytecode_hook``, also
  inert for other frames) replaces the code Dynamo made of it by a trampoline into the capturable
  forward (``capture.trampoline_for``): the first call already runs the captured loop. Where that
  trace fails as a whole (a data-dependent ``if`` inside the loop, where Dynamo cannot resume),
  that one call runs eagerly and the next is traced through the capturable forward.
  Frames of every other backend see Dynamo's settings untouched.
- ``torch._dynamo.reset()`` clears Dynamo's callbacks; a sentinel callback in each list, released
  by that, registers them again (``_Sentinel``), so the scope survives resets.

Never worse than Inductor: when a sonic frame that was traced with these settings fails to compile
(a Dynamo error such as ``GuardOnDataDependentSymNode`` on ``bincount(...).tolist()``, or an
Inductor lowering error on a graph the setting let Dynamo capture), the end callback replaces the
error by a soft Dynamo failure that runs this call of the frame eagerly (its callees are still
compiled) and remembers the code object: from the next call on the frame is compiled without the
settings, as plain Inductor compiles it. A warning says so, and ``fallbacks()`` / ``explain`` list it.
(``fullgraph=True`` compiles are not retried: Dynamo captures dynamic-output-shape ops there anyway.)
"""
from __future__ import annotations

import dataclasses
import logging
import sys
import threading
import weakref

import torch

from moe_inductor.diagnostics import listeners

log = logging.getLogger("moe_inductor")

#: Dynamo settings applied while a sonic frame is traced
SETTINGS = {"capture_dynamic_output_shape_ops": True}

#: added for frames whose modules split rows by host copies of per-expert counts (JetMoE): the
#: ``.tolist()`` is traced as symbolic sizes, which ``moe_inductor.dynamo.host_splits`` moves to the device
HOST_COUNTS_SETTINGS = {"capture_scalar_outputs": True}

#: marks a backend function (or the object torch.compile wraps it in) as the sonic backend
MARKER = "_moe_inductor_sonic"


@dataclasses.dataclass
class Fallback:
    """Something sonic compiled differently from its default so that compilation would not fail."""

    kind: str  # "without settings" | "without rewrite"
    where: str  # "function (file:line)" of the frame, or the graph's name
    reason: str  # the error that caused it, first line

    def __str__(self) -> str:
        if self.kind == "without settings":
            return (f"{self.where}: compiling it with {_settings_text()} failed ({self.reason}); that call ran the "
                    f"frame eagerly (its callees compiled), later calls compile it without the setting, as plain "
                    f"Inductor does")
        return f"{self.where}: Inductor failed on the rewritten graph ({self.reason}); compiled without the MoE rewrite"


_lock = threading.RLock()
_tls = threading.local()
_without_settings: set = set()  # code objects of frames compiled without SETTINGS (after a failure)
_fallbacks: list = []


def _settings_text() -> str:
    return ", ".join(f"torch._dynamo.config.{k}={v}" for k, v in SETTINGS.items())


def record(fallback: Fallback) -> None:
    """Log a fallback, keep it for ``fallbacks()`` and hand it to ``capture_fallbacks`` listeners."""
    log.warning("sonic: %s", fallback)
    with _lock:
        _fallbacks.append(fallback)
    listeners.publish(listeners.FALLBACKS, fallback)


def fallbacks() -> list:
    """Every fallback of this process so far (``Fallback`` objects)."""
    with _lock:
        return list(_fallbacks)


def capture_fallbacks():
    """``with capture_fallbacks() as found:`` collects the fallbacks recorded inside the block."""
    return listeners.listen(listeners.FALLBACKS)


def mark_sonic(backend):
    """Mark ``backend`` (a callable that runs the sonic rewrite, e.g. a test harness or a user's own
    backend wrapping ``rewrite_moe``) so that its frames get the same scoped Dynamo settings as
    ``backend="sonic"``. Returns ``backend``."""
    setattr(backend, MARKER, True)
    return backend


def is_sonic(compiler_fn) -> bool:
    """Is ``compiler_fn`` (as Dynamo holds it: WrapBackendDebug -> torch.compile's wrapper -> the
    function, possibly a functools.partial, or DDPOptimizer's compile_fn) the sonic backend?"""
    fn, seen = compiler_fn, 0
    while fn is not None and seen < 8:
        if getattr(fn, MARKER, False):
            return True
        seen += 1
        nxt = getattr(fn, "_torchdynamo_orig_backend", None)
        if nxt is None:
            nxt = getattr(fn, "compiler_fn", None)  # torch._TorchCompileWrapper
        if nxt is None:
            nxt = getattr(fn, "func", None)  # functools.partial
        if nxt is None:  # DDPOptimizer.compile_fn, the bound method Dynamo uses under DDP
            nxt = getattr(getattr(fn, "__self__", None), "backend_compile_fn", None)
        fn = nxt
    return False


def _frame_being_compiled():
    """(code, f_locals, compiler_fn, one_graph) of the innermost Dynamo ``_compile`` call on the
    stack, or None."""
    f = sys._getframe(2)
    while f is not None:
        code = f.f_code
        if code.co_name == "_compile" and code.co_filename.endswith("convert_frame.py"):
            loc = f.f_locals
            if "compiler_fn" in loc and "code" in loc:
                return loc["code"], loc.get("locals") or {}, loc["compiler_fn"], bool(loc.get("one_graph", False))
            return None
        f = f.f_back
    return None


def _describe(code) -> str:
    return f"{code.co_name} ({code.co_filename}:{code.co_firstlineno})"


def _tracing_sonic_frame() -> bool:
    """Is the innermost frame being traced a sonic one (``shape_items`` acts only there)?"""
    stack = _stack()
    return bool(stack) and stack[-1] is not None


def _stack() -> list:
    s = getattr(_tls, "stack", None)
    if s is None:
        s = _tls.stack = []
    return s


class _Start:
    """Compile-start callback: enter the settings for a sonic frame."""

    def __call__(self, args) -> None:
        trigger = getattr(args, "callback_trigger", None)
        if trigger is not None and getattr(trigger, "name", "") != "DYNAMO":
            return
        entry = None
        try:
            found = _frame_being_compiled()
            if found is not None and is_sonic(found[2]):
                code, f_locals, _, one_graph = found
                retry = code in _without_settings
                settings = SETTINGS
                from moe_inductor.dynamo import capture

                # the frame is a forward that has a capturable one: Dynamo's code for it is replaced
                # by a trampoline into that one (_bytecode_hook); this trace is thrown away (its
                # graphs are not compiled: throwaway_trace) and runs without the settings, so that
                # it ends with graph breaks where Dynamo's defaults put them, not in an error
                try:
                    capture.prepare(f_locals)
                    trampoline = not one_graph and capture.needs_trampoline(code, f_locals)
                except Exception as e:  # never fail a compile over this
                    log.debug("sonic: capture.prepare failed: %s", e)
                    trampoline = False
                if not retry and not trampoline and capture.wants_host_counts(f_locals):
                    settings = {**SETTINGS, **HOST_COUNTS_SETTINGS}  # rows split by host counts: host_splits.py
                # the retry gets Dynamo's own defaults, whatever else set them
                patch = torch._dynamo.config.patch(**({k: False for k in SETTINGS} if retry or trampoline else settings))
                patch.__enter__()
                if trampoline:
                    _throwaway_breaks_anywhere(True)
                from moe_inductor.dynamo import shape_items, trace_logging

                logging_entered = trace_logging.enter()
                items_entered = shape_items.enter(_tracing_sonic_frame)
                # an exception being handled around the compile is not a compile failure
                entry = {"code": code, "one_graph": one_graph, "patch": patch, "retry": retry or trampoline,
                         "handled": sys.exc_info()[1], "logging": logging_entered, "trampoline": trampoline,
                         "items": items_entered}
                try:
                    if not one_graph and not trampoline:  # a capturable forward, no trampoline: start over
                        entry["restart"] = capture.restart_error(code, f_locals)
                except Exception as e:  # never fail a compile over this
                    log.debug("sonic: capture.restart_error failed: %s", e)
        except Exception as e:
            log.debug("sonic: compile-start callback failed: %s", e)
        _stack().append(entry)  # one entry per start (None: not a sonic frame), popped by _End
        if entry is not None and entry.get("restart") is not None:
            raise entry["restart"]  # Dynamo runs the end callbacks (popping the entry) as it unwinds


_BACKEDGE = {"depth": 0, "original": None}


def _throwaway_breaks_anywhere(enter: bool) -> None:
    """While a throwaway trace runs (its code is replaced by a trampoline, its graphs never run),
    a graph break inside a loop does not make Dynamo skip the frame: Dynamo would otherwise run the
    frame eagerly and the trampoline would not be installed until the next call (a loop that skips
    empty experts with ``if mask.any():``, rxlm's host-sized slices). Dynamo's private
    ``InstructionTranslatorBase.maybe_has_backedge`` is answered False for the duration (checked on
    torch 2.11 and 2.13); nested throwaway traces are counted."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslatorBase as tx
    except ImportError:
        return
    with _lock:
        if enter:
            _BACKEDGE["depth"] += 1
            if _BACKEDGE["depth"] == 1 and callable(tx.__dict__.get("maybe_has_backedge")):
                _BACKEDGE["original"] = tx.__dict__.get("maybe_has_backedge")
                original = _BACKEDGE["original"]

                def maybe_has_backedge(self):
                    if throwaway_trace():
                        return False
                    return original(self)

                tx.maybe_has_backedge = maybe_has_backedge
        elif _BACKEDGE["depth"] > 0:
            _BACKEDGE["depth"] -= 1
            if _BACKEDGE["depth"] == 0 and _BACKEDGE["original"] is not None:
                tx.maybe_has_backedge = _BACKEDGE["original"]
                _BACKEDGE["original"] = None


def throwaway_trace() -> bool:
    """The frame being traced is one whose Dynamo code a trampoline replaces: the backend need not
    compile its graphs (they never run)."""
    stack = _stack()
    return bool(stack) and stack[-1] is not None and bool(stack[-1].get("trampoline"))


def after_this_compile(fn) -> None:
    """Run ``fn()`` when Dynamo has finished compiling the current sonic frame (its guards built),
    or now when no sonic frame is being compiled. Used to change what a guard checks (a capturable
    forward given up) without that change being what the guard is built from."""
    stack = _stack()
    if stack and stack[-1] is not None:
        stack[-1].setdefault("after", []).append(fn)
        return
    fn()


def _bytecode_hook(code, out_code):
    """Dynamo's bytecode hook (registered for every backend; it acts only on the sonic frames that
    ``_Start`` marked): the code Dynamo made of a module's class forward is replaced by a trampoline
    into the module's capturable forward (``moe_inductor.dynamo.capture.trampoline_for``)."""
    try:
        if not throwaway_trace() or _stack()[-1]["code"] is not code:
            return None
        from moe_inductor.dynamo import capture

        return capture.trampoline_for(code)
    except Exception as e:  # never fail a compile over this
        log.debug("sonic: bytecode hook failed: %s", e)
        return None


class _End:
    """Compile-end callback: leave the settings; turn a failure under them into a retry without."""

    def __call__(self, args) -> None:
        trigger = getattr(args, "callback_trigger", None)
        if trigger is not None and getattr(trigger, "name", "") != "DYNAMO":
            return
        stack = _stack()
        if not stack:
            return
        entry = stack.pop()
        if entry is None:
            return
        for fn in entry.get("after", ()):
            try:
                fn()
            except Exception as e:  # never fail a compile over this
                log.debug("sonic: after-compile action failed: %s", e)
        if entry["patch"] is not None:
            entry["patch"].__exit__(None, None, None)
        if entry.get("trampoline"):
            _throwaway_breaks_anywhere(False)
        if entry.get("logging"):
            from moe_inductor.dynamo import trace_logging

            trace_logging.leave()
        if entry.get("items"):
            from moe_inductor.dynamo import shape_items

            shape_items.leave()
        if entry.get("restart") is not None:
            return
        error = sys.exc_info()[1]
        if error is None or error is entry["handled"] or not isinstance(error, Exception) \
                or entry["retry"] or entry["one_graph"] or not _curable(error):
            return
        _retry_without_settings(entry["code"], error)


def no_retry(error: BaseException) -> BaseException:
    """Mark an error that no retry without the settings can cure (bad backend options)."""
    error._sonic_no_retry = True
    return error


def _curable(error: BaseException) -> bool:
    seen, stack = set(), [error]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if getattr(e, "_sonic_no_retry", False):
            return False
        stack.extend([getattr(e, "inner_exception", None), e.__cause__, e.__context__])
    return True


def _retry_without_settings(code, error: BaseException) -> None:
    """Replace the in-flight compile error of a sonic frame by a soft Dynamo failure that runs the
    frame eagerly this time and lets Dynamo compile it again on the next call (without SETTINGS)."""
    from torch._dynamo import callback_handler
    from torch._dynamo.exc import Unsupported

    try:
        from torch._dynamo.types import FrameAction, FrameExecStrategy
    except ImportError:  # older layout: leave the error as it is
        return
    # Dynamo's install_callbacks decrements its pending-callback counter after the end callbacks
    # return; raising here skips that decrement, so do it first (else no start callback would ever
    # run again). If this torch keeps the counter elsewhere, do not interfere: the error stands.
    counter = "_CompilationCallbackHandler__pending_callbacks_counter"
    if getattr(callback_handler, counter, None) != 1:
        return
    first = next((l.strip() for l in str(error).splitlines() if l.strip()), "")
    reason = f"{type(error).__name__}: {first}"[:300]
    with _lock:
        _without_settings.add(code)
    record(Fallback("without settings", _describe(code), reason))
    soft = Unsupported(f"sonic: frame {_describe(code)} is compiled again without {_settings_text()}: {reason}")
    if hasattr(soft, "remove_from_stats"):
        try:
            soft.remove_from_stats()  # a fallback, not a graph break of the user's code
        except Exception:
            pass
    soft.frame_exec_strategy = FrameExecStrategy(FrameAction.DEFAULT, FrameAction.DEFAULT)
    setattr(callback_handler, counter, 0)
    raise soft from error


class _Sentinel:
    """A no-op callback registered next to ours in each of Dynamo's callback lists and referenced
    by nothing else: when torch._dynamo.reset() empties the lists, its release (``list.clear``
    empties the list before it releases the items) is what tells us to register again. (Our own
    callbacks cannot serve: a traceback may keep them alive.)"""

    def __call__(self, args) -> None:
        pass


_START, _END = _Start(), _End()
_hook_handle = None  # the registered bytecode hook (Dynamo's reset keeps it)


def install() -> None:
    """Register the start/end callbacks if they are not registered. Idempotent, never raises."""
    try:
        from torch._dynamo import callback_handler as handler
    except Exception as e:
        log.debug("sonic: no Dynamo callback handler: %s", e)
        return
    global _hook_handle
    with _lock:
        if _hook_handle is None:
            try:
                from torch._dynamo.convert_frame import register_bytecode_hook

                _hook_handle = register_bytecode_hook(_bytecode_hook)
            except Exception as e:  # no hook: a block compiled on its own runs its first call eagerly
                log.debug("sonic: no bytecode hook: %s", e)
        for ours, callbacks, register in ((_START, handler.start_callbacks, handler.register_start_callback),
                                          (_END, handler.end_callbacks, handler.register_end_callback)):
            if not any(c is ours for c in callbacks):
                register(ours)
            if not any(isinstance(c, _Sentinel) for c in callbacks):
                sentinel = _Sentinel()
                register(sentinel)
                weakref.finalize(sentinel, _reinstall)


def _reinstall() -> None:
    """Runs when torch._dynamo.reset() dropped a registered callback: register again, and forget
    which frames had to be compiled without the settings (reset means "as in a fresh process")."""
    if sys.is_finalizing():
        return
    with _lock:
        _without_settings.clear()
    install()
