"""Recall of the sonic backend on MoE layers written as public code writes them (issue 18).

Each entry of the catalogue (``tests/idiom_catalogue.py``, the faithful re-implementations in
``tests/faithful/`` by default) is compiled as a new user would, ``torch.compile(model,
backend="sonic")`` (no ``fullgraph``), and run at two sequence lengths, forward and backward. Per
entry the script records:

- ``fused_calls``: how many times the fused op ran in each call (counted by the op itself, so a
  frame that ran eagerly, or a block left to Inductor, counts 0);
- ``first_call``: every expected block ran fused from the first call on;
- ``exact``: the output and the gradient of every parameter and floating input equal eager
  (fp32: 1e-4 elementwise; bf16: relative norm error at the entry's tolerance);
- ``recompiles``: compiled graphs beyond those of the first call, and graph breaks;
- the reasons of the candidates the rewrite declined.

An entry counts as recalled when it is exact, rewritten from the first call (fused calls equal to
``expected`` in both calls) and recompiles at most once.

    python examples/recall.py [--names a,b] [--all] [--light] [--autocast bfloat16] [--dtype bfloat16]
                              [--json out.json]

``--light`` runs the rewrite only (no Inductor code generation: fast, for development); the
figures in the README come from the full backend.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

import torch  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

from moe_inductor.diagnostics.report import capture_reports  # noqa: E402
from moe_inductor.diagnostics.stats import capture_routing_stats  # noqa: E402

LENGTHS = ((5, 0), (8, 1))


AUTOCAST = None  # --autocast: the dtype both eager and compiled forwards run under CPU autocast
#: --dtype: the whole module (parameters, floating buffers) and its floating inputs cast to this dtype
#: (``model.to(torch.bfloat16)``, as people train); judged against a float64 copy of the module
DTYPE = None


def fwd_bwd(fn, module, args):
    ins = [a.detach().clone().requires_grad_(a.is_floating_point()) for a in args]
    module.zero_grad(set_to_none=True)
    if AUTOCAST is not None:
        with torch.autocast("cpu", dtype=AUTOCAST):
            out = fn(*ins)
    else:
        out = fn(*ins)
    out = out[0] if isinstance(out, (tuple, list)) else out
    out.float().pow(2).sum().backward()
    grads = [(n, p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in module.named_parameters()]
    grads += [(f"input{i}", a.grad) for i, a in enumerate(ins) if a.is_floating_point()]
    return out.detach(), grads


def to_dtype(args, dtype):
    return tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def high_precision(idiom, reference, args):
    """--dtype: the module's values in float64, or in float32 where the source itself fixes a
    float32 dtype somewhere (a float64 copy then fails eagerly); returns the module used."""
    try:
        return (*fwd_bwd(reference, reference, to_dtype(args, torch.float64)), reference)
    except Exception:
        reference = idiom.build().float()
        return (*fwd_bwd(reference, reference, to_dtype(args, torch.float32)), reference)


def mismatch_vs_float64(got, eager, ref):
    """--dtype: None when the compiled value is as close to the float64 module's as eager's own
    value is (relative norm error at most twice eager's, plus 1e-2), else a short description."""
    if got is None or eager is None or ref is None:
        return None if got is None and eager is None else "one side has no gradient"
    r = ref.double()
    scale = max(r.norm().item(), 1e-6)
    e_got, e_eager = (got.double() - r).norm().item() / scale, (eager.double() - r).norm().item() / scale
    return None if e_got <= 2 * e_eager + 1e-2 else \
        f"relative norm error vs float64 {e_got:.3g} (eager {DTYPE} {e_eager:.3g})"


def mismatch(got, want, dtype, tol):
    """None when equal at the entry's tolerance, else a short description."""
    if got is None or want is None:
        return None if got is None and want is None else "one side has no gradient"
    if dtype == torch.float32:
        if torch.allclose(got.float(), want.float(), atol=tol, rtol=tol):
            return None
        return f"max abs error {(got.float() - want.float()).abs().max().item():.3g}"
    g, w = got.double(), want.double()
    err, scale = (g - w).norm().item(), w.norm().item()
    return None if err <= tol * max(scale, 1e-6) else f"relative norm error {err / max(scale, 1e-30):.3g}"


class EagerFails(Exception):
    """The entry's own eager forward or backward raises in this setting: not applicable."""


def run_entry(idiom, light: bool) -> dict:
    from rewrite_check import light_backend

    torch._dynamo.reset()
    counters.clear()
    module = idiom.build()
    reference = None
    if DTYPE is not None:
        reference = idiom.build().double()
        module = module.to(DTYPE)
    expected = idiom.expect if isinstance(idiom.expect, int) else 1
    light_reports: list = []
    backend = light_backend(light_reports) if light else "sonic"
    compiled = torch.compile(module, backend=backend)
    rec = dict(name=idiom.name, source=idiom.source, expected=expected, fused_calls=[], graphs_after=[],
               errors=[], declined=[], rewritten=[])
    t0 = time.perf_counter()
    with capture_reports() as reports:
        for T, seed in LENGTHS:
            args = idiom.inputs(T, seed)
            try:
                if DTYPE is not None:
                    f64_out, f64_grads, reference = high_precision(idiom, reference, args)
                    args = to_dtype(args, DTYPE)
                ref_out, ref_grads = fwd_bwd(module, module, args)
            except Exception as e:  # the source itself fails in this setting (e.g. not autocast-safe)
                raise EagerFails(f"{type(e).__name__}: {str(e)[:200]}") from e
            with capture_routing_stats() as calls:
                out, grads = fwd_bwd(compiled, module, args)
            rec["fused_calls"].append(len(calls))
            rec["graphs_after"].append(int(counters["stats"]["unique_graphs"]))
            if DTYPE is not None:
                pairs = [("output", out, ref_out, f64_out)] + [
                    (n, g, r, f) for (n, g), (_, r), (_, f) in zip(grads, ref_grads, f64_grads)]
                for name, g, r, f in pairs:
                    bad = mismatch_vs_float64(g, r, f)
                    if bad:
                        rec["errors"].append(f"T={T} {name}: {bad}")
                continue
            for name, g, r in [("output", out, ref_out)] + [(n, g, r) for (n, g), (_, r) in zip(grads, ref_grads)]:
                # under autocast the GEMMs run in the autocast dtype: its relative-norm tolerance
                bad = mismatch(g, r, AUTOCAST, max(idiom.tol, 3e-2)) if AUTOCAST is not None else \
                    mismatch(g, r, idiom.dtype, idiom.tol)
                if bad:
                    rec["errors"].append(f"T={T} {name}: {bad}")
    for rep in list(reports) + light_reports:
        for c in rep.candidates:
            entry = f"{c.idiom} at {c.where}: {c.reason}" if c.status == "declined" else f"{c.idiom} at {c.where}"
            (rec["declined"] if c.status == "declined" else rec["rewritten"]).append(entry)
    rec["declined"] = sorted(set(rec["declined"]))
    rec["rewritten"] = sorted(set(rec["rewritten"]))
    rec["graph_breaks"] = int(sum(counters["graph_break"].values()))
    rec["break_reasons"] = sorted(counters["graph_break"])[:5]
    rec["seconds"] = round(time.perf_counter() - t0, 1)
    rec["exact"] = not rec["errors"]
    rec["first_call"] = rec["fused_calls"][0] == expected
    rec["recompiles"] = rec["graphs_after"][-1] - rec["graphs_after"][0]
    if expected == 0:
        rec["recalled"] = rec["exact"] and all(n == 0 for n in rec["fused_calls"])
    else:
        rec["recalled"] = rec["exact"] and all(n == expected for n in rec["fused_calls"]) and rec["recompiles"] <= 1
    return rec


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--names", default="", help="comma-separated entry names (default: the faithful ones)")
    p.add_argument("--all", action="store_true", help="every catalogue entry, not only the faithful ones")
    p.add_argument("--light", action="store_true", help="rewrite only, no Inductor code generation")
    p.add_argument("--json", default="", help="write the records here")
    p.add_argument("--markdown", default="", help="print the table of a --json file (the README's) and exit")
    p.add_argument("--autocast", default="", choices=("", "bfloat16", "float16"),
                   help="run eager and compiled forwards under CPU autocast to this dtype (as people train)")
    p.add_argument("--dtype", default="", choices=("", "bfloat16", "float16"),
                   help="cast the module and its inputs to this dtype (model.to(dtype)); each value is judged "
                        "against a float64 copy: its error at most twice eager's own plus 1e-2 (relative norm)")
    a = p.parse_args(argv)
    global AUTOCAST, DTYPE
    AUTOCAST = getattr(torch, a.autocast) if a.autocast else None
    DTYPE = getattr(torch, a.dtype) if a.dtype else None
    if a.markdown:
        print(markdown(a.markdown))
        return 0
    from idiom_catalogue import BY_NAME, CATALOGUE

    if a.names:
        chosen = [BY_NAME[n] for n in a.names.split(",")]
    else:
        chosen = [i for i in CATALOGUE if a.all or i.faithful]
    records = []
    for idiom in chosen:
        try:
            rec = run_entry(idiom, a.light)
        except EagerFails as e:  # not counted: eager itself fails here
            rec = dict(name=idiom.name, source=idiom.source, recalled=False, not_applicable=f"eager fails: {e}")
        except Exception as e:  # a crash is a result too
            rec = dict(name=idiom.name, source=idiom.source, recalled=False, crash=f"{type(e).__name__}: {e}",
                       trace=traceback.format_exc(limit=-3))
        records.append(rec)
        if rec.get("not_applicable"):
            print(f"{'n/a':9s} {idiom.name}: {rec['not_applicable']}", flush=True)
            continue
        status = "recalled" if rec["recalled"] else "MISSED"
        detail = rec.get("crash") or (f"fused calls {rec['fused_calls']} (expected {rec['expected']}), "
                                      f"exact {rec['exact']}, recompiles {rec['recompiles']}, "
                                      f"graph breaks {rec['graph_breaks']}, {rec['seconds']} s")
        print(f"{status:9s} {idiom.name}: {detail}", flush=True)
        if not rec["recalled"]:
            for line in rec.get("errors", [])[:3] + rec.get("declined", [])[:4] + rec.get("break_reasons", []):
                print(f"          {line}", flush=True)
    n = sum(r["recalled"] for r in records)
    counted = [r for r in records if not r.get("not_applicable")]
    under = f", under autocast {a.autocast}" if a.autocast else ""
    under += f", module and inputs in {a.dtype}" if a.dtype else ""
    skipped = f"; {len(records) - len(counted)} not applicable (eager fails)" if len(counted) < len(records) else ""
    print(f"recalled {n} of {len(counted)} ({'light' if a.light else 'full'} backend, torch {torch.__version__}{under})"
          f"{skipped}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(torch=torch.__version__, backend="light" if a.light else "sonic", autocast=a.autocast or None,
                           dtype=a.dtype or None,
                           recalled=n, total=len(counted), not_applicable=len(records) - len(counted),
                           records=records), f, indent=1)
    return 0


def markdown(path: str) -> str:
    """The README's catalogue table from a --json file: entry, source, result, what was kept."""
    from idiom_catalogue import BY_NAME

    with open(path) as f:
        data = json.load(f)
    rows = ["| entry | source | result | kept (what a quick re-spelling drops) |", "|---|---|---|---|"]
    for r in data["records"]:
        idiom = BY_NAME.get(r["name"])
        if r.get("not_applicable"):
            result = f"n/a: {r['not_applicable'][:100]}"
        elif r.get("crash"):
            result = f"crash: {r['crash'][:80]}"
        elif r["recalled"]:
            result = "rewritten from the first call, exact"
        elif r["exact"] and r["fused_calls"][-1] == r["expected"]:
            result = "rewritten from the second call, exact"
        else:
            why = (r.get("declined") or r.get("break_reasons") or ["no candidate"])[0]
            why = why.split("\n")[0].split(": ", 1)[-1][:110].replace("|", "/")
            result = f"not rewritten ({'exact' if r['exact'] else 'NOT EXACT'}): {why}"
        note = (idiom.note if idiom else "").replace("|", "/")
        rows.append(f"| `{r['name']}` | {r['source'].replace('|', '/')} | {result} | {note} |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
