"""``moe_inductor.explain(model, *args, **kwargs)``: which MoE blocks the sonic backend rewrites.

Compiles ``model`` with the sonic backend (``fullgraph=False``), runs it once on the arguments
and returns an ``ExplainReport`` with one entry per MoE block:

- every candidate an idiom module saw in a compiled graph: "rewritten", or the reason it was
  declined (from ``moe_inductor.diagnostics.report.capture_reports``); a rewritten block also says what it
  runs on ("runs on": "triton" or "PyTorch path (<reason>)", decided at rewrite time by
  ``moe_inductor.diagnostics.report.runs_on``);
- every MoE-looking module of ``model`` that no compiled graph contained, typically because a
  Dynamo graph break or a skipped frame kept it out (transformers' eager experts loop over the
  data-dependent ``expert_hit``, DBRX), with the graph break that explains it and a remedy.

Side effects, said here because they are global: ``torch._dynamo.reset()`` is called first (a
compiled function already in Dynamo's cache would otherwise never reach the backend), so other
compiled functions recompile on their next call; the model runs once (forward only).
"""
from __future__ import annotations

import dataclasses
import inspect
import linecache
import logging
import os
import re
from typing import Any, Optional

import torch
from torch._dynamo.utils import counters

log = logging.getLogger("moe_inductor")

#: class-name fragments of modules that hold a mixture of experts
_MOE_CLASS_HINTS = ("Experts", "MoE", "Moe", "SparseMoe", "MixtureOfExperts")


@dataclasses.dataclass
class GraphBreak:
    """One Dynamo graph break or skipped frame seen while compiling."""

    reason: str
    where: str = ""  # innermost user frame "file:line in function"
    frames: tuple = ()  # ((filename, lineno), ...) of the user stack, outermost first

    @property
    def summary(self) -> str:
        first = next((l.strip() for l in self.reason.splitlines() if l.strip()), "")
        return f"{first} at {self.where}" if self.where else first


@dataclasses.dataclass
class ExplainEntry:
    """One MoE block: where it is, what it looks like, and what the backend did with it."""

    where: str
    idiom: str  # idiom module name, or "-" when no compiled graph contained the block
    status: str  # "rewritten" | "declined" | "graph break" | "not recognised"
    reason: str = ""
    remedy: str = ""
    num_experts: Optional[int] = None
    top_k: Optional[int] = None
    hidden: Any = None
    intermediate: Any = None
    dtype: Optional[torch.dtype] = None
    #: rewritten blocks: "triton" or "PyTorch path (<reason>)", decided at rewrite time
    runs_on: str = ""


@dataclasses.dataclass
class ExplainReport:
    entries: list = dataclasses.field(default_factory=list)
    graph_breaks: list = dataclasses.field(default_factory=list)
    graph_count: int = 0
    #: moe_inductor.dynamo.dynamo_scope.Fallback: frames compiled without sonic's Dynamo setting, graphs
    #: compiled without the MoE rewrite (so that compilation would not fail)
    fallbacks: list = dataclasses.field(default_factory=list)
    #: (file:line, why) of host reads in sonic frames not read at trace time (moe_inductor.dynamo.shape_items):
    #: Dynamo's own handling (a graph break, or an unbacked size) followed
    host_reads: list = dataclasses.field(default_factory=list)
    #: moe_inductor.diagnostics.report.RoutingStats of every fused-op call of the explain run, in call order
    routing: list = dataclasses.field(default_factory=list)
    #: GEMM row tile the padding waste is computed for (the backend option tile_m)
    tile_m: int = 128

    @property
    def padding_waste(self) -> Optional[float]:
        """Padding waste over all fused-op calls of the run: GEMM rows that tiles of TILE_M rows
        compute for no assignment, over the rows the assignments need (None if no call ran)."""
        return _waste([c for r in self.routing for c in r.counts], self.tile_m) if self.routing else None

    @property
    def rewritten(self) -> list:
        return [e for e in self.entries if e.status == "rewritten"]

    @property
    def declined(self) -> list:
        return [e for e in self.entries if e.status == "declined"]

    @property
    def missed(self) -> list:
        """MoE modules no idiom saw: kept out of every graph by a graph break, or not recognised."""
        return [e for e in self.entries if e.status in ("graph break", "not recognised")]

    def __str__(self) -> str:
        head = ("where", "idiom", "E", "K", "d", "n", "dtype", "status", "runs on")
        rows = [head]
        for e in self.entries:
            dtype = str(e.dtype).replace("torch.", "") if e.dtype is not None else "-"
            rows.append((e.where, e.idiom, *("-" if v is None else str(v) for v in
                                            (e.num_experts, e.top_k, e.hidden, e.intermediate)), dtype, e.status,
                         e.runs_on or "-"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = [f"sonic: {len(self.rewritten)} MoE block(s) rewritten, {len(self.declined)} declined, "
                 f"{len(self.missed)} not seen by any idiom; {self.graph_count} graph(s), "
                 f"{len(self.graph_breaks)} graph break(s)"]
        for r in rows:
            lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        notes = [e for e in self.entries if e.reason or e.remedy]
        if notes:
            lines.append("")
            for e in notes:
                lines.append(f"{e.where}: {e.status}: {e.reason}")
                if e.remedy:
                    lines.append(f"    remedy: {e.remedy}")
        if self.routing:
            lines.append("")
            lines.append(f"routing seen by the fused op: {len(self.routing)} call(s), "
                         f"{sum(r.assignments for r in self.routing)} assignments, padding waste at "
                         f"tile {self.tile_m} rows: {100 * self.padding_waste:.2f}% "
                         f"(per call: {', '.join(f'{100 * _waste(r.counts, self.tile_m):.1f}%' for r in self.routing)})")
        if self.fallbacks:
            lines.append("")
            lines.append("fallbacks (compiled differently so that compilation would not fail):")
            lines.extend(f"  {f}" for f in self.fallbacks)
        if self.host_reads:
            lines.append("")
            lines.append("host reads left to Dynamo (not proved a function of sizes):")
            lines.extend(f"  {where}: {why}" for where, why in dict.fromkeys(self.host_reads))
        if self.graph_breaks:
            lines.append("")
            lines.append("graph breaks:")
            lines.extend(f"  {s}" for s in dict.fromkeys(b.summary for b in self.graph_breaks))
        return "\n".join(lines)


# --------------------------------------------------------------------------- MoE modules

def moe_like_modules(model: torch.nn.Module) -> list:
    """(qualified name, module) of the outermost modules that look like a mixture of experts:
    a module with an ``experts`` child, or a class name with Experts/MoE in it (attention
    "mixtures" excluded). A block nested in one already listed is left out."""
    out = []
    for name, m in model.named_modules():
        cname = type(m).__name__
        if "Attention" in cname:
            continue
        has_experts = isinstance(getattr(m, "experts", None), torch.nn.Module)
        if not (has_experts or any(h in cname for h in _MOE_CLASS_HINTS)):
            continue
        if any(name.startswith(prev + ".") or prev == "" for prev, _ in out):
            continue
        out.append((name, m))
    return out


def _is_transformers_dispatched(m: torch.nn.Module) -> bool:
    """Experts class decorated with transformers' ``use_experts_implementation``."""
    for sub in m.modules():
        if getattr(type(sub).forward, "__wrapped__", None) is not None and hasattr(sub, "has_gate") \
                and hasattr(getattr(sub, "config", None), "_experts_implementation"):
            return True
    return False


def _experts_impl(m: torch.nn.Module) -> Optional[str]:
    for sub in m.modules():
        cfg = getattr(sub, "config", None)
        if cfg is not None and hasattr(cfg, "_experts_implementation"):
            return cfg._experts_implementation
    return None


def _code_spans(m: torch.nn.Module) -> list:
    """(file, first line, last line) of the forward methods of ``m`` and its submodules (``m``'s own
    forward first), then of the other methods their classes define outside torch (a graph break in
    a helper method that the forward calls is traced as that method's own frame after the break)."""
    spans, rest = [], []
    for sub in m.modules():
        spans += _spans_of([type(sub).forward])
        rest += _spans_of([f for c in type(sub).__mro__ if not c.__module__.startswith("torch.")
                           for k, f in vars(c).items() if k != "forward" and inspect.isfunction(f)])
    return spans + rest


def _spans_of(functions: list) -> list:
    out = []
    for fn in functions:
        fn = inspect.unwrap(fn)
        try:
            lines, start = inspect.getsourcelines(fn)
            out.append((os.path.realpath(inspect.getsourcefile(fn)), start, start + len(lines) - 1))
        except (OSError, TypeError):
            continue
    return out


def _break_inside(b: GraphBreak, spans: list) -> bool:
    for filename, lineno in b.frames:
        f = os.path.realpath(filename)
        if any(f == s and lo <= lineno <= hi for s, lo, hi in spans):
            return True
    return False


def _covers(candidate_path: str, name: str, module: torch.nn.Module) -> bool:
    """Is a candidate reported at ``candidate_path`` inside the MoE module ``name``? Paths of
    graphs compiled from a resumed or nested frame are relative to that frame's ``self``, so a
    relative path matches any module whose qualified name ends with it."""
    if candidate_path.startswith("File "):
        # a block compiled from a forward with no module stack (the compiled module's own code):
        # covered if the source line lies in this module's forward
        m = re.match(r'File "([^"]+)", line (\d+)', candidate_path)
        spans = _code_spans(module)[:1]  # the module's own forward, not its submodules'
        return bool(m) and _break_inside(GraphBreak(reason="", where="", frames=((m.group(1), int(m.group(2))),)),
                                         spans)
    if candidate_path in ("", "<root>") or candidate_path.startswith("node "):
        return False
    names = [name] + [f"{name}.{sub}" if name else sub for sub, _ in module.named_modules() if sub]
    return any(s == candidate_path or s.endswith("." + candidate_path) for s in names)


def _normalise_path(path: str) -> str:
    # Dynamo spells list items layers[0] (and some versions _modules['x']): back to named_modules'
    path = re.sub(r"_modules\['([^']+)'\]", r"\1", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"\['([^']+)'\]", r".\1", path)
    return path.replace("..", ".").strip(".")


def _loop_notes(m: torch.nn.Module) -> str:
    """Why sonic's loop capture (moe_inductor/dynamo/capture.py) left a per-expert loop of ``m`` as it is:
    the line that breaks the graph and what in the loop stops the rewrite."""
    from moe_inductor.dynamo import capture

    try:
        kept = [n for n in capture.notes_for(m) if not n.rewritten]
    except Exception as e:  # a report never fails over this
        log.debug("sonic: no loop notes for %s: %s", type(m).__qualname__, e)
        return ""
    return "; ".join(f"{os.path.basename(n.filename)}: {n.reason}" for n in kept)


#: Dynamo's words for a host read of a tensor's value (``.item()``, ``int()``, an int argument)
_HOST_READ = ("Data dependent operator", "_local_scalar_dense", "data-dependent expression", "Tensor.item()",
              "Data-dependent branching")


def _source_line(b: GraphBreak) -> str:
    """The text of the innermost user line of a graph break ('' when unknown)."""
    if not b.frames:
        return ""
    filename, lineno = b.frames[-1]
    return linecache.getline(filename, lineno).strip()


def _one_hot_width(b: GraphBreak) -> bool:
    """A host read on a line that calls ``one_hot``: its ``num_classes`` computed from tensor values."""
    return any(w in b.reason for w in _HOST_READ) and "one_hot(" in _source_line(b)


def _break_text(b: GraphBreak) -> str:
    """The break's summary with, for a host read, the source line and why Dynamo stops there."""
    if not any(w in b.reason for w in _HOST_READ):
        return b.summary
    line = _source_line(b)
    if _one_hot_width(b):
        why = ("one_hot's num_classes is computed from tensor values (e.g. safe_one_hot's max(indexes.max() + k, C)); "
               "aten::one_hot takes a plain int, so Dynamo reads the width on the host and breaks the graph there")
    else:
        why = ("a tensor's value is read on the host (.item(), int(), bool(), a Python max/min/if comparing it, "
               "or an int argument computed from it)")
    return f"{b.summary}: `{line}`: {why}" if line else f"{b.summary}: {why}"


#: the static-width spelling of a one-hot whose width was read from the indexes
_ONE_HOT_REMEDY = ("give one_hot a width that does not depend on data: for indexes >= 0, "
                   "F.one_hot(idx, max(idx.max() + k, C))[..., :C] (k >= 1) equals "
                   "(idx.unsqueeze(-1) == torch.arange(C, device=idx.device)).long() (indexes >= C give zero rows), "
                   "which Dynamo traces in the block's graph")


_BRANCH_REASONS = ("Data-dependent branching", "generic_jump TensorVariable")


def _branch_remedy(inside: list) -> str:
    """For graph breaks at a Python ``if`` on a tensor value (Dynamo's "Data-dependent branching"):
    the source line of each and why it splits the block, or "" when there is none."""
    said = []
    for b in inside:
        # Dynamo's words for it: "Data-dependent branching" (the explanation) or "generic_jump
        # TensorVariable()" (the reason a graph compiled at the break carries)
        if not b.reason.lstrip().startswith(_BRANCH_REASONS) or not b.frames:
            continue
        filename, lineno = b.frames[-1]
        line = linecache.getline(filename, lineno).strip()
        said.append(f"{os.path.basename(filename)}:{lineno} `{line}` branches on a tensor's value")
    if not said:
        return ""
    return ("; ".join(dict.fromkeys(said)) + ": Dynamo ends the graph there and the rest of the block runs in "
            "another graph, whose inputs (e.g. the dispatch mask) cannot be proved to be what the routing made; "
            "where the value depends only on shapes and constants (a capacity such as ceil(tokens / experts * "
            "factor)), compute it with Python numbers (math.ceil, max) so that the branch is decided while tracing")


def _remedy(m: torch.nn.Module, inside: tuple = ()) -> str:
    branch = _branch_remedy(list(inside))
    if branch:
        return branch
    notes = _loop_notes(m)
    if not notes and any(_one_hot_width(b) for b in inside):
        return _ONE_HOT_REMEDY
    if notes and not _is_transformers_dispatched(m):
        return (f"{notes}. The loop is compiled as written, with the graph breaks plain Inductor has (sonic "
                f"traces a per-expert loop as one graph when its host reads only decide which experts to skip, "
                f"its body only accumulates into a tensor through the expert's selection, and the modules it "
                f"calls change no state)")
    if _is_transformers_dispatched(m):
        return ('model.set_experts_implementation("grouped_mm") (or config._experts_implementation = '
                '"grouped_mm" before building the model): the default transformers experts code, one graph, '
                'rewritten as sorted rows (patterns/assignment_rows.py); "batched_mm" is rewritten too')
    return ("loop over range(num_experts) with torch.where(expert_mask[e]) instead of over a data-dependent "
            "list of experts, with no host reads (.item(), .tolist()) in the loop, or store the experts as "
            "stacked (E, ...) weights and use a sorted grouped GEMM")


def _parts_found(name: str, reports: list) -> str:
    """Which parts of an MoE block the recognisers found in the compiled code of module ``name``
    (``CompileReport.census``), so that the reason names the part that was not recognised."""
    found: dict = {}
    for r in reports:
        for path, parts in getattr(r, "census", {}).items():
            p = _normalise_path(path)
            if not name or p == name or p.startswith(name + "."):
                for part, spellings in parts.items():
                    for spelling, n in spellings.items():
                        found.setdefault(part, {}).setdefault(spelling, 0)
                        found[part][spelling] += n
    said = []
    for part, words in (("experts", "expert MLPs"), ("combine", "writes of expert outputs to token rows")):
        if part in found:
            said.append(f"{part}: {sum(found[part].values())} {words} found ("
                        + ", ".join(f"{k} x{v}" for k, v in sorted(found[part].items())) + ")")
        else:
            said.append(f"{part}: no {words} recognised")
    return ("not recognised as an MoE block (no dispatch -> experts -> combine composition proved): "
            + "; ".join(said) + "; recognised spellings of each part: README 'Recognised parts'")


def _waste(counts: list, tile_m: int) -> float:
    need = sum(counts)
    return (sum(-(-c // tile_m) * tile_m for c in counts) - need) / need if need else 0.0


# --------------------------------------------------------------------------- driver

def _frames_of(reason) -> tuple:
    stack = getattr(reason, "user_stack", None) or []
    return tuple((f.filename, f.lineno) for f in stack)


def _where_of(frames: tuple, stack) -> str:
    if not stack:
        return ""
    f = stack[-1]
    return f"{os.path.basename(f.filename)}:{f.lineno} in {f.name}"


def explain(model: torch.nn.Module, *args, options: Optional[dict] = None, inductor: bool = True,
            **kwargs) -> ExplainReport:
    """Compile ``model`` with the sonic backend, run ``model(*args, **kwargs)`` once and report
    every MoE block: rewritten, declined (with the reason) or never in a compiled graph (with the
    graph break and a remedy). ``options``: sonic backend options. ``inductor=False`` stops after
    the rewrite and runs the graphs eagerly (same report, much faster: for tests and quick looks).
    """
    from moe_inductor.compile.backend import rewrite_moe, sonic
    from moe_inductor.compile.options import SonicOptions
    from moe_inductor.diagnostics.report import capture_reports, capture_routing_stats, record_report

    opts = SonicOptions.from_dict(options)
    breaks: list[GraphBreak] = []
    graph_count = 0

    def backend(gm, example_inputs):
        nonlocal graph_count
        graph_count += 1
        reason = getattr(gm, "compile_subgraph_reason", None)
        if reason is not None and getattr(reason, "graph_break", False):
            stack = getattr(reason, "user_stack", None) or []
            breaks.append(GraphBreak(reason=str(reason.reason), where=_where_of((), stack), frames=_frames_of(reason)))
        if inductor:
            return sonic(gm, example_inputs, options=options)
        if opts.rewrite:
            record_report(rewrite_moe(gm, opts), gm)
        return gm.forward

    from moe_inductor.dynamo import dynamo_scope

    setattr(backend, dynamo_scope.MARKER, True)  # sonic's scoped Dynamo settings apply to its frames
    torch._dynamo.reset()
    dynamo_scope.install()
    before = {k: dict(counters[k]) for k in ("graph_break", "unimplemented")}
    from moe_inductor.dynamo import shape_items

    reads_mark = shape_items.mark()
    with capture_reports() as reports, capture_routing_stats() as routing_stats, \
            dynamo_scope.capture_fallbacks() as fallbacks:
        torch.compile(model, backend=backend, fullgraph=False)(*args, **kwargs)
    # graph breaks that skipped a whole frame leave no graph behind: only Dynamo's counters know
    seen = {b.reason for b in breaks}
    for key in ("graph_break", "unimplemented"):
        for msg, count in counters[key].items():
            if count > before[key].get(msg, 0) and msg not in seen:
                seen.add(msg)
                m = re.search(r"frame skipped: (\S+) \((\S+) line (\d+)\)", msg)
                frames = ((m.group(2), int(m.group(3))),) if m else ()
                where = f"{os.path.basename(m.group(2))}:{m.group(3)} in {m.group(1)}" if m else ""
                breaks.append(GraphBreak(reason=msg, where=where, frames=frames))

    rep = ExplainReport(graph_breaks=breaks, graph_count=graph_count, routing=routing_stats, tile_m=opts.tile_m,
                        fallbacks=fallbacks, host_reads=shape_items.reasons(since=reads_mark))
    candidates = [c for r in reports for c in r.candidates]
    for c in candidates:
        rep.entries.append(ExplainEntry(
            where=_normalise_path(c.where), idiom=c.idiom, status=c.status, reason=c.reason,
            num_experts=c.num_experts, top_k=c.top_k, hidden=c.hidden, intermediate=c.intermediate, dtype=c.dtype,
            runs_on=getattr(c, "runs_on", "")))

    for name, m in moe_like_modules(model):
        spans = _code_spans(m)
        inside = [b for b in breaks if _break_inside(b, spans)]
        covering = [e for e in rep.entries if e.idiom != "-" and _covers(e.where, name, m)]
        if covering:
            _note_breaks(covering, inside, m)
            continue
        impl = _experts_impl(m)
        if inside:
            status = "graph break"
            reason = "not in any compiled graph: " + "; ".join(dict.fromkeys(_break_text(b) for b in inside))
        else:
            status = "not recognised"
            reason = _parts_found(name, reports) + (" (or a graph break listed below kept it out)" if breaks else "")
        if impl is not None:
            reason += f" [experts implementation {impl!r}]"
        remedy = "" if status == "not recognised" and impl in ("grouped_mm", "batched_mm") else _remedy(m, inside)
        rep.entries.append(ExplainEntry(where=name or "<root>", idiom="-", status=status, reason=reason,
                                        remedy=remedy, num_experts=_num_experts(m), dtype=_param_dtype(m)))
    log.info("%s", rep)
    return rep


def _note_breaks(entries: list, inside: list, m: torch.nn.Module) -> None:
    """Declined candidates of a block that also has host-read graph breaks: the break (line, why)
    is said with the decline, since what the candidate's graph reads as inputs was computed in
    another graph, and the block gets the break's remedy."""
    hosts = [b for b in inside if any(w in b.reason for w in _HOST_READ)]
    for e in entries:
        if e.status == "declined" and hosts:
            e.reason += " (graph break in this block before it: " + "; ".join(
                dict.fromkeys(_break_text(b) for b in hosts)) + ")"
            e.remedy = e.remedy or _remedy(m, tuple(hosts))


def _num_experts(m: torch.nn.Module) -> Optional[int]:
    for sub in m.modules():
        for attr in ("num_experts", "moe_num_experts", "num_local_experts"):
            v = getattr(sub, attr, None)
            if isinstance(v, int) and not isinstance(v, bool):
                return v
        experts = getattr(sub, "experts", None)
        if isinstance(experts, torch.nn.ModuleList):
            return len(experts)
    return None


def _param_dtype(m: torch.nn.Module) -> Optional[torch.dtype]:
    p = next(m.parameters(), None)
    return p.dtype if p is not None else None
