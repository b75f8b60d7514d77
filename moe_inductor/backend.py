"""The ``sonic`` torch.compile backend: graph in -> MoE blocks matched -> fused op -> Inductor.

``torch.compile(model, backend="sonic")`` finds this function through the
``torch_dynamo_backends`` entry point, so users need no import. The backend receives Dynamo's
torch-level graph, replaces every MoE block that an idiom module in ``patterns/`` recognises by
one call of ``torch.ops.moe_inductor.fused_moe`` (which carries its own memory-lean backward),
and hands the graph to Inductor's ``compile_fx`` for everything else, forward and backward.

Global setting (said here because it is a side effect of importing this module): Dynamo's
``capture_dynamic_output_shape_ops`` is turned on, so per-expert loops over
``torch.where(mask)`` / ``nonzero`` are captured as one graph instead of Dynamo skipping the
whole frame. It applies to every torch.compile in the process.
"""
from __future__ import annotations

import logging
import operator
from typing import Any, Optional

import torch
import torch.fx as fx
from torch._dynamo.utils import counters

from . import op as _op  # noqa: F401  (registers torch.ops.moe_inductor)
from .options import SonicOptions
from .report import CompileReport, record_report
from .rewrite import _INPLACE_FUNCTIONS, Candidate, MoEBlock, emit_fused_moe, module_path_of

log = logging.getLogger("moe_inductor")

if not torch._dynamo.config.capture_dynamic_output_shape_ops:
    torch._dynamo.config.capture_dynamic_output_shape_ops = True
    log.debug("sonic: set torch._dynamo.config.capture_dynamic_output_shape_ops = True")


def _idioms():
    try:
        from moe_inductor.patterns import IDIOMS
    except ModuleNotFoundError:
        # Running from a source checkout without an install: the patterns live in the top-level
        # patterns/ folder that installs as moe_inductor.patterns; load it under that name.
        import importlib.util
        import sys
        from pathlib import Path

        folder = Path(__file__).resolve().parents[1] / "patterns"
        spec = importlib.util.spec_from_file_location(
            "moe_inductor.patterns", folder / "__init__.py", submodule_search_locations=[str(folder)])
        module = importlib.util.module_from_spec(spec)
        sys.modules["moe_inductor.patterns"] = module
        spec.loader.exec_module(module)
        IDIOMS = module.IDIOMS
    return IDIOMS


def _describe(block: MoEBlock, status: str, reason: str = "", where: Optional[str] = None) -> Candidate:
    return Candidate(
        idiom=block.idiom, where=where or module_path_of(block.anchor), status=status, reason=reason,
        num_experts=block.num_experts, top_k=block.top_k, hidden=block.hidden,
        intermediate=block.intermediate, dtype=block.dtype,
    )


def _removable(node: fx.Node) -> bool:
    """Dead and provably free of side effects. fx's own eliminate_dead_code treats in-place
    call_method nodes (index_add_, add_, ...) as pure and would drop them, so it is not used."""
    if node.users or node.op not in ("call_function", "call_method") or "out" in node.kwargs:
        return False
    if node.op == "call_method":
        return not (node.target.endswith("_") and not node.target.startswith("__"))
    if node.target in _INPLACE_FUNCTIONS:
        return False
    schema = getattr(node.target, "_schema", None)
    if schema is not None and schema.is_mutable:
        return False
    return not node.is_impure()


def _remove_dead(graph: fx.Graph) -> None:
    for node in reversed(list(graph.nodes)):
        if _removable(node):
            graph.erase_node(node)


def _cleanup(gm: fx.GraphModule, orphans: list) -> None:
    graph = gm.graph
    _remove_dead(graph)
    changed = True
    while changed:
        changed = False
        for node in list(orphans):
            if node.graph is not graph or node not in graph.nodes:
                orphans.remove(node)
                continue
            target = node.args[0] if node.args else None
            readers = [u for u in getattr(target, "users", ()) if u is not node and u not in orphans]
            if not node.users and not readers:
                graph.erase_node(node)
                orphans.remove(node)
                changed = True
        if changed:
            _remove_dead(graph)


def rewrite_moe(gm: fx.GraphModule, opts: SonicOptions) -> CompileReport:
    """Replace every recognised MoE block of ``gm`` in place; return what was seen."""
    report = CompileReport()
    orphans: list = []
    for idiom in _idioms():
        try:
            found = list(idiom.find(gm))
        except Exception as e:  # a broken matcher must never break compilation
            log.warning("sonic: %s matcher failed: %s: %s", idiom.IDIOM, type(e).__name__, e)
            continue
        for node, block in found:
            where = module_path_of(node)
            if isinstance(block, str):
                report.candidates.append(Candidate(idiom=idiom.IDIOM, where=where, status="declined", reason=block))
                counters["sonic"]["moe_declined"] += 1
                log.info("sonic: not rewriting %s block at %s: %s", idiom.IDIOM, where, block)
                continue
            where = module_path_of(block.location or node)
            before = set(gm.graph.nodes)
            try:
                emit_fused_moe(gm, block, recompute_h=opts.recompute_h, impl=opts.impl)
            except Exception as e:
                # emission adds nodes before the anchor and rewires only at its very end: drop what
                # it added and leave the block as it was
                for n in reversed(list(gm.graph.nodes)):
                    if n not in before and not n.users:
                        gm.graph.erase_node(n)
                cand = _describe(block, "declined", f"internal error while rewriting: {type(e).__name__}: {e}", where)
                report.candidates.append(cand)
                counters["sonic"]["moe_declined"] += 1
                log.warning("sonic: not rewriting %s block at %s: %s", idiom.IDIOM, where, cand.reason)
                continue
            orphans.extend(block.orphans)
            report.candidates.append(_describe(block, "rewritten", where=where))
            counters["sonic"]["moe_rewrites"] += 1
            log.info("sonic: rewrote %s block at %s (E=%s, K=%s, d=%s, n=%s, %s, %s)", block.idiom, where,
                     block.num_experts, block.top_k, block.hidden, block.intermediate, block.activation, block.dtype)
    _cleanup(gm, orphans)
    gm.graph.lint()
    gm.recompile()
    return report


def sonic(gm: fx.GraphModule, example_inputs, options: Optional[dict] = None, mode: Optional[str] = None, **kwargs: Any):
    """The torch.compile backend. ``options``: see ``moe_inductor.options.SonicOptions``."""
    opts = SonicOptions.from_dict(options)
    if kwargs:
        raise ValueError(f"sonic backend: unexpected arguments {sorted(kwargs)}; use options={{...}}")
    if opts.token_rounding != "off":
        # The rewrite does not yet take the router into the fused computation, so rounding cannot
        # be applied inside compiled graphs; say so loudly rather than ignore the option.
        log.warning("sonic: token_rounding=%r is not applied by the graph rewrite yet; blocks use the "
                    "model's plain top-k (moe_inductor.routing.token_rounding_routing applies it in eager code)",
                    opts.token_rounding)
    if opts.rewrite:
        report = rewrite_moe(gm, opts)
        record_report(report, gm)
    patches: dict = {}
    if mode is not None:
        patches.update(torch._inductor.list_mode_options(mode))
    if opts.inductor:
        patches.update(opts.inductor)
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs, config_patches=patches or None)
