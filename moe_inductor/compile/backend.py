"""The ``sonic`` torch.compile backend: graph in -> MoE blocks matched -> fused op -> Inductor.

``torch.compile(model, backend="sonic")`` finds this function through the
``torch_dynamo_backends`` entry point, so users need no import. The backend receives Dynamo's
torch-level graph, replaces every MoE block that an idiom module in ``patterns/`` recognises by
one call of ``torch.ops.moe_inductor.fused_moe`` (which carries its own memory-lean backward),
and hands the graph to Inductor's ``compile_fx`` for everything else, forward and backward.

No global side effects: importing this module changes no torch config and no class. The Dynamo
setting sonic needs (``capture_dynamic_output_shape_ops``, so that per-expert loops over
``torch.where(mask)`` / ``nonzero`` are captured as one graph) applies only while Dynamo traces a
frame compiled with this backend, and known transformers expert loops are made capturable only
for the modules of those frames (``moe_inductor/dynamo/dynamo_scope.py``, ``moe_inductor/dynamo/capture.py``).
Never worse than Inductor: a sonic frame that fails to compile with that setting is compiled
without it from its next call on; a graph on which Inductor fails after the MoE rewrite is compiled
without the rewrite (``sonic()``); both are logged as warnings and listed by ``explain``.
"""
from __future__ import annotations

import functools
import logging
import operator
from typing import Any, Optional

import torch
import torch.fx as fx
from torch._dynamo.utils import counters

from moe_inductor.dynamo import dynamo_scope as _scope
from moe_inductor.compile import idioms as _idioms
from moe_inductor.compile import cache_key as _cache_key
from moe_inductor.compile import inductor_workarounds as _workarounds
from moe_inductor.ops import op as _op  # noqa: F401  (registers torch.ops.moe_inductor)
from moe_inductor.compile.options import SonicOptions
from moe_inductor.diagnostics.report import CompileReport, note_runs_on, record_report
from moe_inductor.fx.nodes import clean_module_path
from moe_inductor.fx.targets import INPLACE_FUNCTIONS
from moe_inductor.recognize.normal_form import functionalize
from moe_inductor.dynamo.one_hot_width import narrow_one_hots
from moe_inductor.fx.build import call
from moe_inductor.fx.nodes import module_path_of
from moe_inductor.fx.shapes import same, shape_of
from moe_inductor.lower.rewrite import Candidate, MoEBlock, emit_fused_moe
from moe_inductor.recognize.router import analyse_router, graph_token_rounding

log = logging.getLogger("moe_inductor")

# The scoped settings: an inert Dynamo compile-start/end callback that acts on sonic frames only
# (torch.compile drops a backend's backend_ctx_ctor; see dynamo_scope's docstring).
_scope.install()


def _module_of(path: str):
    """(module, Dynamo source) of an nn_module_stack path like L['self'].model.layers.0.mlp,
    resolved in the frame Dynamo is compiling; None if that is not possible."""
    import re

    from torch._dynamo.source import AttrSource, DictGetItemSource, LocalSource
    from torch._dynamo.symbolic_convert import InstructionTranslator

    m = re.match(r"L\['([^']+)'\]((?:\.[A-Za-z0-9_]+)*)$", re.sub(r"\[(\d+)\]", r".\1", path))
    tx = InstructionTranslator.current_tx()
    if m is None or tx is None or m.group(1) not in tx.f_locals:
        return None
    obj, src = tx.f_locals[m.group(1)], LocalSource(m.group(1))
    for part in m.group(2).split(".")[1:]:
        if not isinstance(obj, torch.nn.Module) or part not in obj._modules:
            return None
        obj, src = obj._modules[part], DictGetItemSource(AttrSource(src, "_modules"), part)
    return (obj, src) if isinstance(obj, torch.nn.Module) else None


def _training_mode(block: MoEBlock) -> tuple[bool, str]:
    """Is the block's module in training mode? Read from the module itself (with a Dynamo guard on
    its ``training`` flag, so model.eval() recompiles); where the module cannot be found, grad mode
    at compile time stands in for it (Dynamo always guards on grad mode)."""
    node = block.location or block.anchor
    stack = node.meta.get("nn_module_stack") or {}
    # the block's own module first; code directly in the compiled module's forward has no
    # module stack, and then the frame's own module (L['self']) is the one
    for path in [p for p, _ in reversed(list(stack.values()))] + ["L['self']"]:
        try:
            found = _module_of(path)
            if found is None:
                continue
            module, src = found
            from torch._dynamo.guards import GuardBuilder, install_guard
            from torch._dynamo.source import AttrSource

            install_guard(AttrSource(src, "training").make_guard(GuardBuilder.CONSTANT_MATCH))
            return bool(module.training), f"{_clean(path)}.training"
        except Exception as e:  # never fail compilation over this
            log.debug("sonic: cannot read the training flag of %s: %s", path, e)
    return torch.is_grad_enabled(), "grad mode (the module was not found)"


def _clean(path: str) -> str:
    return clean_module_path(path)


def _rounding_hook(block: MoEBlock, opts: SonicOptions, notes: list):
    """The routing hook of emit_fused_moe that applies token rounding, or None. Appends to
    ``notes`` what happened (for the log and the report)."""
    if opts.token_rounding == "off":
        return None
    if not opts.token_rounding_in_eval:
        training, by = _training_mode(block)
        if not training:
            notes.append(f"token rounding not applied in eval mode (by {by}); plain top-k")
            return None

    def hook(graph, expert_ids, scores):
        spec = analyse_router(expert_ids, scores, block.num_experts, block.top_k)
        if isinstance(spec, str):
            notes.append(f"token rounding refused: {spec}; plain top-k")
            return None
        probs_rows, x_rows = (shape_of(spec.probs) or (None,))[0], (shape_of(block.x) or (None,))[0]
        if not same(probs_rows, x_rows):
            notes.append("token rounding refused: router rows and tokens differ; plain top-k")
            return None
        r = call(graph, graph_token_rounding, spec.probs, spec.top_k, opts.tile_m, opts.token_rounding,
                 spec.renormalize, spec.softmax_of_logits, spec.scale, spec.score_dtype, like=block.anchor)
        notes.append(f"token rounding {opts.token_rounding!r} to multiples of {opts.tile_m} ({spec.form})")
        return tuple(call(graph, operator.getitem, r, i, like=block.anchor) for i in range(3))

    return hook


def _describe(block: MoEBlock, status: str, reason: str = "", where: Optional[str] = None) -> Candidate:
    return Candidate(
        idiom=block.idiom, where=where or module_path_of(block.anchor), status=status, reason=reason,
        num_experts=block.num_experts, top_k=block.top_k, hidden=block.hidden,
        intermediate=block.intermediate, dtype=block.dtype, parts=block.parts,
    )


def _removable(node: fx.Node) -> bool:
    """Dead and provably free of side effects. fx's own eliminate_dead_code treats in-place
    call_method nodes (index_add_, add_, ...) as pure and would drop them, so it is not used."""
    return not node.users and _pure(node)


def _pure(node: fx.Node) -> bool:
    if node.op not in ("call_function", "call_method") or "out" in node.kwargs:
        return False
    if node.op == "call_method":
        return not (node.target.endswith("_") and not node.target.startswith("__"))
    if node.target in INPLACE_FUNCTIONS:
        return False
    schema = getattr(node.target, "_schema", None)
    if schema is not None and schema.is_mutable:
        return False
    return not node.is_impure()


def _live_nodes(graph: fx.Graph) -> set:
    """Nodes whose value reaches the graph's output or a side effect (in-place writes, asserts)."""
    live: set = set()
    for node in reversed(list(graph.nodes)):
        if node.op in ("output", "placeholder") or any(u in live for u in node.users) or (
                node.op in ("call_function", "call_method") and not _pure(node)):
            live.add(node)
    return live


def _remove_dead(graph: fx.Graph, keep: set) -> None:
    """Erase what the rewrite left without users. Nodes in ``keep`` (those that had no users
    before the rewrite) stay: Dynamo put them there on purpose (functorch's vmap level calls, for
    one, look pure to fx and erasing them breaks the graph)."""
    for node in reversed(list(graph.nodes)):
        if node not in keep and _removable(node):
            graph.erase_node(node)


def _cleanup(gm: fx.GraphModule, orphans: list, keep: set) -> None:
    graph = gm.graph
    _remove_dead(graph, keep)
    changed = True
    while changed:
        changed = False
        for node in list(orphans):
            if node.graph is not graph or node not in graph.nodes:
                orphans.remove(node)
                continue
            target = node.args[0] if node.args else None
            readers = [u for u in getattr(target, "users", ()) if u is not node and u not in orphans
                       and not _reads_shape_only(u, target)]
            if not node.users and not readers:
                graph.erase_node(node)
                orphans.remove(node)
                changed = True
        if changed:
            _remove_dead(graph, keep)


_SHAPE_OF_SECOND = {"reshape_as", "view_as", "expand_as"}  # x.reshape_as(t) reads only t's shape
_SHAPE_METHODS = {"size", "dim", "numel"}


def _reads_shape_only(user: fx.Node, target: fx.Node) -> bool:
    """``user`` reads ``target``'s metadata and never its values (a rewritten block reshaped like
    its accumulator: ``result.reshape_as(acc)``), so the writes into ``target`` stay orphans."""
    if user.op != "call_method":
        return False
    if user.target in _SHAPE_METHODS:
        return True
    return user.target in _SHAPE_OF_SECOND and len(user.args) == 2 and user.args[1] is target \
        and user.args[0] is not target and not user.kwargs


def _tokens_written_after(block) -> Optional[fx.Node]:
    """A write into the block's token tensor (or a view of it) after the block: the original's
    backward kept its own gathered copies of the rows, the fused op keeps the tokens themselves, so
    such a write would fail autograd's version check in backward. None if there is none."""
    from moe_inductor.fx import safety

    x = block.x
    if not isinstance(x, fx.Node):
        return None
    order = safety.node_order(x.graph)
    end = order.get(block.anchor, -1)
    return next((w for w in safety.writes_to(x) if order[w] > end), None)


def rewrite_moe(gm: fx.GraphModule, opts: SonicOptions) -> CompileReport:
    """Replace every recognised MoE block of ``gm`` in place, and of the nested regions it enters
    (bodies of activation checkpointing and other wrappers: ``moe_inductor/fx/regions.py``); return
    what was seen. A block in a region that is not entered is reported as declined."""
    from moe_inductor.compile.isolation import user_hooks_deferred
    from moe_inductor.fx.regions import rewrite_nested

    report = CompileReport()
    with user_hooks_deferred():  # the fake runs must not call the user's saved-tensor hooks
        _rewrite_graph(gm, opts, report)
        rewrite_nested(gm, lambda body, region: _rewrite_graph(body, opts, report, region=region.describe()),
                       lambda region: _report_not_entered(region, report))
    return report


def _report_not_entered(region, report: CompileReport) -> None:
    """An MoE block inside a higher-order op whose body the rewrite does not enter: declined."""
    why = f"inside a {region.describe()}, which the rewrite does not enter (see moe_inductor/fx/regions.py)"
    for idiom in _idioms.load():
        try:
            found = list(idiom.find(region.gm))
        except Exception as e:
            log.debug("sonic: %s matcher failed in %s: %s", idiom.IDIOM, region.describe(), e)
            continue
        for node, block in found:
            cand = (Candidate(idiom=idiom.IDIOM, where=module_path_of(node), status="declined", reason=why)
                    if isinstance(block, str) else _describe(block, "declined", why, module_path_of(block.location or node)))
            report.candidates.append(cand)
            counters["sonic"]["moe_declined"] += 1
            log.warning("sonic: not rewriting %s block at %s: %s", idiom.IDIOM, cand.where, why)


def _rewrite_graph(gm: fx.GraphModule, opts: SonicOptions, report: CompileReport, region: str = "") -> None:
    """Rewrite the blocks of one graph (the backend's, or a region's body named ``region``), as a
    pipeline: normal form -> each composition's candidates -> proof and lowering -> one clean-up
    of what the lowered blocks left dead -> the declines reported on the final graph."""
    _normal_form(gm, f" (in {region})" if region else "")
    run = _GraphRewrite(gm, opts, report, region)
    for idiom in _idioms.load():
        run.take(idiom)
    run.finish()


def _normal_form(gm: fx.GraphModule, inside: str) -> None:
    """The spellings recognition reads as one: host-count splits as one grouped GEMM
    (``dynamo/host_splits.py``), in-place arithmetic on fresh tensors made functional
    (``recognize/normal_form.py``), ``one_hot(ids, N)[..., :L]`` with N >= L as the width-L one-hot
    (``dynamo/one_hot_width.py``)."""
    from moe_inductor.dynamo import host_splits

    for note in host_splits.rewrite(gm):
        log.info("sonic: %s%s", note, inside)
    made = functionalize(gm) + narrow_one_hots(gm)
    if made:
        log.debug("sonic: %d in-place op(s) made functional%s", made, inside)


class _GraphRewrite:
    """One graph's rewrite: the blocks the compositions find, the one emission per block, and what
    the clean-up and the report need at the end."""

    def __init__(self, gm: fx.GraphModule, opts: SonicOptions, report: CompileReport, region: str):
        self.gm, self.opts, self.report, self.region = gm, opts, report, region
        self.inside = f" (in {region})" if region else ""
        self.orphans: list = []
        self.declines: list = []  # (node, Candidate), reported once the graph is final
        self.claimed: set = set()
        self.dead_before = {n for n in gm.graph.nodes if not n.users}

    def take(self, idiom) -> None:
        """Every block one composition finds: declined, skipped (claimed already) or lowered."""
        try:
            found = list(idiom.find(self.gm))
        except Exception as e:  # a broken matcher must never break compilation
            log.warning("sonic: %s matcher failed: %s: %s", idiom.IDIOM, type(e).__name__, e)
            return
        live = _live_nodes(self.gm.graph) if any(not isinstance(b, str) for _, b in found) else set()
        for node, block in found:
            where = module_path_of(node)
            if isinstance(block, str):
                # reported once the graph is final: a look-alike that another composition rewrote
                # (its nodes are gone then) is not a declined block
                self._decline(node, idiom, where, block + self.inside)
            elif block.anchor not in live or block.anchor in self.claimed:
                # an earlier composition rewrote this block (its result no longer reaches the output):
                # two recognisers of one block never both emit
                log.debug("sonic: %s block at %s was rewritten by an earlier composition", idiom.IDIOM, where)
            else:
                self._prove_and_lower(idiom, node, block)

    def _decline(self, node, idiom, where: str, reason: str) -> None:
        self.declines.append((node, Candidate(idiom=idiom.IDIOM, where=where, status="declined", reason=reason)))

    def _prove_and_lower(self, idiom, node, block: MoEBlock) -> None:
        """The proof the backend adds to every composition's (the tokens are not written after the
        block), then the one emission; an emission error leaves the block as it was."""
        where = module_path_of(block.location or node)
        written = _tokens_written_after(block)
        if written is not None:
            self._decline(node, idiom, where, (
                f"proof: the tokens {block.x.name} are modified in place after the block ({written.name}), "
                f"and the fused op keeps them for backward where the original kept copies{self.inside}"))
            return
        before = set(self.gm.graph.nodes)
        notes: list = []
        try:
            hook = _rounding_hook(block, self.opts, notes)
            emit_fused_moe(self.gm, block, recompute_h=self.opts.recompute_h, impl=self.opts.impl, routing_hook=hook)
        except Exception as e:
            # emission adds nodes before the anchor and rewires only at its very end: drop what
            # it added and leave the block as it was
            for n in reversed(list(self.gm.graph.nodes)):
                if n not in before and not n.users:
                    self.gm.graph.erase_node(n)
            cand = _describe(block, "declined", f"internal error while rewriting: {type(e).__name__}: {e}{self.inside}",
                             where)
            self.report.candidates.append(cand)
            counters["sonic"]["moe_declined"] += 1
            log.warning("sonic: not rewriting %s block at %s: %s", idiom.IDIOM, where, cand.reason)
            return
        self.orphans.extend(block.orphans)
        self.claimed.update(block.orphans)
        self.claimed.add(block.anchor)
        self._report_rewritten(block, where, notes)

    def _report_rewritten(self, block: MoEBlock, where: str, notes: list) -> None:
        note = "; ".join(notes)
        shown = "; ".join(notes + [f"in {self.region}"]) if self.region else note
        self.report.candidates.append(_describe(block, "rewritten", reason=shown, where=where))
        note_runs_on(self.report.candidates[-1], block, self.opts.impl)  # counted, and warned if a CUDA block won't use Triton
        counters["sonic"]["moe_rewrites"] += 1
        if note.startswith("token rounding "):
            counters["sonic"]["token_rounding" if "to multiples" in note else "token_rounding_skipped"] += 1
        log.info("sonic: rewrote %s block at %s%s (E=%s, K=%s, d=%s, n=%s, %s, %s)%s", block.idiom, where, self.inside,
                 block.num_experts, block.top_k, block.hidden, block.intermediate, block.activation, block.dtype,
                 f": {note}" if note else "")
        if "refused" in note:
            log.warning("sonic: %s block at %s: %s", block.idiom, where, note)

    def finish(self) -> None:
        """Dead code removed once; the declines of candidates still in the final graph reported."""
        _cleanup(self.gm, self.orphans, self.dead_before)
        alive = set(self.gm.graph.nodes)
        for node, cand in self.declines:
            if isinstance(node, fx.Node) and node not in alive:
                log.debug("sonic: %s candidate at %s was part of a block rewritten otherwise", cand.idiom, cand.where)
                continue
            self.report.candidates.append(cand)
            counters["sonic"]["moe_declined"] += 1
            log.info("sonic: not rewriting %s block at %s: %s", cand.idiom, cand.where, cand.reason)
        self.gm.graph.lint()
        self.gm.recompile()


def sonic(gm: fx.GraphModule, example_inputs, options: Optional[dict] = None, mode: Optional[str] = None, **kwargs: Any):
    """The torch.compile backend. ``options``: see ``moe_inductor.compile.options.SonicOptions``."""
    try:
        opts = SonicOptions.from_dict(options)
        if kwargs:
            raise ValueError(f"sonic backend: unexpected arguments {sorted(kwargs)}; use options={{...}}")
    except Exception as e:
        raise _scope.no_retry(e)  # the user's options: say so now, not after a retry
    _scope.install()  # idempotent: the scoped settings for the next frames Dynamo compiles
    if _scope.throwaway_trace():  # a trace whose code a trampoline replaces: its graphs never run
        return gm.forward
    patches: dict = {}
    if mode is not None:
        patches.update(torch._inductor.list_mode_options(mode))
    if opts.inductor:
        patches.update(opts.inductor)
    # key Inductor's and AOTAutograd's caches on this package's code, the options and the versions
    # (forward and backward compiles: config_patches reach both; moe_inductor/compile/cache_key.py)
    patches = _cache_key.config_patch(opts, patches)
    from torch._inductor.compile_fx import compile_fx

    if not opts.rewrite:
        return compile_fx(gm, example_inputs, config_patches=patches or None)
    # Inductor's inner compiles (forward and backward) with the fix of a scheduler defect that
    # zeroes router gradients, on every graph sonic compiles (moe_inductor/compile/inductor_workarounds.py)
    compile_fx = functools.partial(compile_fx, inner_compile=_workarounds.inner_compile)
    # keep the graph as Dynamo gave it: if the rewrite or Inductor on the rewritten graph fails,
    # compile that instead (compilation must never fail because of the rewrite)
    original = _copy_graph_module(gm)
    try:
        report = rewrite_moe(gm, opts)
    except Exception as e:
        _scope.record(_scope.Fallback("without rewrite", _graph_name(gm), f"{type(e).__name__}: {_first_line(e)}"))
        return compile_fx(original, example_inputs, config_patches=patches or None)
    record_report(report, gm)
    if _drop_declined_captures(gm):
        # the graph holds a per-expert loop unrolled over every expert for nothing: this call runs it
        # as it is (exact: the capture only adds empty experts), and the frame compiles again on the
        # next call from the loop as written, as plain Inductor compiles it (an unrolled loop of many
        # experts costs Inductor minutes; the original's graph breaks keep its graphs small)
        return gm.forward
    if not report.rewritten:  # the graph as Dynamo gave it (no normal form, no partial edits)
        return compile_fx(original, example_inputs, config_patches=patches or None)
    try:
        return compile_fx(gm, example_inputs, config_patches=patches or None)
    except _DYNAMO_CONTROL_FLOW:
        raise  # Dynamo's own signals (e.g. specialise a float and trace again), not failures
    except Exception as e:
        error = e
    try:
        compiled = compile_fx(original, example_inputs, config_patches=patches or None)
    except Exception:
        raise error  # Inductor fails without the rewrite too: not ours, report the first error
    _scope.record(_scope.Fallback("without rewrite", _graph_name(gm), f"{type(error).__name__}: {_first_line(error)}"))
    counters["sonic"]["fallback_without_rewrite"] += 1
    return compiled


#: exceptions that compile_fx raises to steer Dynamo, which Dynamo's own call of a backend lets
#: through (``OutputGraph.call_user_compiler``): ``TensorifyScalarRestartAnalysis`` (a float input
#: traced as a SymFloat that a graph op needs as a Python float: Dynamo traces the frame again with
#: that float specialised; ``dynamic=True`` meets it) and ``ShortenTraceback``. Falling back to the
#: unrewritten graph on them would compile a frame without its MoE blocks for nothing.
_DYNAMO_CONTROL_FLOW = tuple(c for c in (getattr(torch._dynamo.exc, "RestartAnalysis", None),
                                         getattr(torch._dynamo.exc, "ShortenTraceback", None)) if c is not None)


setattr(sonic, _scope.MARKER, True)  # how dynamo_scope recognises frames compiled with this backend


def _drop_declined_captures(gm: fx.GraphModule) -> list:
    """The modules whose captured per-expert loop (``moe_inductor.dynamo.capture``) this graph traced and
    which hold no rewritten block: their capture is given up (``capture.drop``). Never raises."""
    from moe_inductor.dynamo import capture

    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
        f_locals = dict(tx.f_locals) if tx is not None else {}
        paths, rewritten_paths, any_rewritten = set(), set(), False
        for node in gm.graph.nodes:
            stack = [v[0] for v in (node.meta.get("nn_module_stack") or {}).values()]
            paths.update(stack)
            if node.op == "call_function" and getattr(node.target, "namespace", None) == "moe_inductor":
                rewritten_paths.update(stack)
                any_rewritten = True
        by_path = {}
        for path in paths:
            found = _module_of(path)
            if found is not None:
                by_path.setdefault(found[0], set()).add(path)
        dropped = []
        for owner in capture.owners_in(f_locals, by_path):
            # an owner met only as the frame's own module holds every node of the graph
            rewritten = (by_path.get(owner, set()) & rewritten_paths) if owner in by_path else any_rewritten
            if rewritten:
                continue
            reason = ("traced as a loop over every expert, but no MoE block in it was rewritten (see the declined "
                      "blocks); compiled as written from the next call on, as plain Inductor compiles it")
            _scope.after_this_compile(functools.partial(capture.drop, owner, reason))
            counters["sonic"]["capture_dropped"] += 1
            log.info("sonic: %s: %s", type(owner).__qualname__, reason)
            dropped.append(owner)
        return dropped
    except Exception as e:  # never fail a compile over this
        log.debug("sonic: could not check the captured loops: %s", e)
        return []


def _copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule sharing ``gm``'s submodules and attributes with a copy of its graph (node
    metadata shallow-copied): cheap, and untouched by the in-place rewrite of ``gm``."""
    graph = fx.Graph(owning_module=None, tracer_cls=getattr(gm.graph, "_tracer_cls", None))
    graph._codegen = gm.graph._codegen
    env: dict = {}
    for node in gm.graph.nodes:
        env[node] = graph.node_copy(node, lambda n: env[n])
    copy = fx.GraphModule(gm, graph)
    copy.meta.update(getattr(gm, "meta", {}))
    for attr in ("compile_subgraph_reason", "_sonic_name"):
        if hasattr(gm, attr):
            setattr(copy, attr, getattr(gm, attr))
    return copy


def _graph_name(gm: fx.GraphModule) -> str:
    return getattr(gm, "_sonic_name", None) or f"graph of {len(gm.graph.nodes)} nodes"


def _first_line(e: BaseException) -> str:
    return next((l.strip() for l in str(e).splitlines() if l.strip()), "")[:300]
