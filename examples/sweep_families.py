"""Sweep: every MoE family of the installed transformers, built tiny from config (tests/hf_models.py),
through the sonic backend. For each family and each experts implementation it has ("grouped_mm",
the transformers default, and "batched_mm" for families with the ``use_experts_implementation``
switch, and with ``--impls ...,eager`` transformers' "eager" experts loop too; the family's own code,
called "native", for the others):

- ``moe_inductor.explain(model, ids, inductor=False)``: status and reason of every MoE block;
- ``torch.compile(model, backend="sonic")`` (the full backend, Inductor's code generation included),
  called twice in train mode: logits and every parameter gradient of the second call against eager (max abs difference, pass at atol=rtol=1e-4; nothing asserted), and the number of
  rewritten blocks from ``torch._dynamo.utils.counters["sonic"]["moe_rewrites"]``. A gradient that
  is None on one side and all zeros on the other (an expert no token chose) passes but is counted
  apart (``grad_none_vs_zero``): an optimizer with weight decay treats the two differently.

Dropout is set to 0 before the numerics check (modules' ``nn.Dropout.p``, float ``*dropout*``
attributes of modules and configs), so that train-mode eager and compiled runs are comparable;
everything else is the unmodified transformers code.

Each family runs in its own subprocess under a time limit, so a hang or a crash is recorded and the
sweep goes on. The JSON file is rewritten after every family.

    python examples/sweep_families.py                                   # every family
    python examples/sweep_families.py --families mixtral,dbrx --out examples/results/x.json
    python examples/sweep_families.py --resume                          # skip families already in --out
    python examples/sweep_families.py --markdown [--out FILE]           # README table from a JSON
    python examples/sweep_families.py --explain-only --out examples/results/families_explain.json
                                        # recognition only: explain per family, no compile, no numerics

Every record names the commit it ran on (``commit``, with "+dirty" when the tree had changes).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
DEFAULT_OUT = ROOT / "examples" / "results" / "families.json"
ATOL = RTOL = 1e-4
IMPL_ORDER = {"grouped_mm": 0, "batched_mm": 1, "eager": 2, "native": 3}


# --------------------------------------------------------------------------- child: one family

def _zero_dropout(model):
    import torch

    n = 0
    seen_cfgs = set()

    def zero_cfg(cfg):
        nonlocal n
        if cfg is None or id(cfg) in seen_cfgs:
            return
        seen_cfgs.add(id(cfg))
        for k, v in list(vars(cfg).items()):
            if "dropout" in k and isinstance(v, float) and v != 0.0:
                setattr(cfg, k, 0.0)
                n += 1
            elif hasattr(v, "to_dict") and hasattr(v, "__dict__"):  # sub-config
                zero_cfg(v)

    for m in model.modules():
        if isinstance(m, torch.nn.Dropout) and m.p != 0.0:
            m.p = 0.0
            n += 1
        for k, v in list(vars(m).items()):
            if "dropout" in k and isinstance(v, float) and not isinstance(v, bool) and v != 0.0:
                setattr(m, k, 0.0)
                n += 1
        zero_cfg(getattr(m, "config", None))
    return n


def _first_tensor(out):
    if hasattr(out, "logits") and out.logits is not None:
        return out.logits
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    return out[0]


def _compare(model, ids):
    """Eager vs sonic, train mode: logits and every parameter gradient. Returns a dict."""
    import torch
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model.train()
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
    ref = _first_tensor(model(ids))
    g = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, params, g, allow_unused=True)
    from moe_inductor.dynamo import dynamo_scope

    # the full backend (Inductor's code generation included), called twice: a frame that sonic had
    # to compile again without its Dynamo setting runs eagerly on the first call and compiled on
    # the second (moe_inductor.dynamo.dynamo_scope), so the second call's values are the ones checked
    compiled = torch.compile(model, backend="sonic")
    with dynamo_scope.capture_fallbacks() as fallbacks:
        torch.autograd.grad(_first_tensor(compiled(ids)), params, g, allow_unused=True)
        out = _first_tensor(compiled(ids))
        grads = torch.autograd.grad(out, params, g, allow_unused=True)
    rewritten = int(counters["sonic"]["moe_rewrites"])
    declined = int(counters["sonic"]["moe_declined"])

    max_diff = 0.0
    bad, none_vs_zero = [], []
    for name, a, b in [("logits", out, ref)] + list(zip(names, grads, ref_grads)):
        if a is None or b is None:
            if (a is None) != (b is None):
                other = b if a is None else a
                msg = f"{name}: gradient None in {'compiled' if a is None else 'eager'}"
                if bool((other == 0).all()):
                    # same values, but an optimizer treats None and zeros differently (weight decay)
                    none_vs_zero.append(msg + ", all zeros in the other")
                else:
                    bad.append(msg + ", nonzero in the other")
            continue
        a, b = a.detach().float(), b.detach().float()
        if a.shape != b.shape:
            bad.append(f"{name}: shape {tuple(a.shape)} vs {tuple(b.shape)}")
            continue
        if not torch.isfinite(a).all() or not torch.isfinite(b).all():
            if not torch.equal(torch.isfinite(a), torch.isfinite(b)):
                bad.append(f"{name}: non-finite values differ")
                continue
        d = (a - b).abs().nan_to_num(0.0)
        if d.numel():
            max_diff = max(max_diff, float(d.max()))
        if not torch.allclose(a, b, atol=ATOL, rtol=RTOL, equal_nan=True):
            bad.append(f"{name}: max abs diff {float(d.max()):.3e}")
    torch._dynamo.reset()
    return dict(rewritten=rewritten, declined_counter=declined, numerics_ok=not bad, max_diff=max_diff,
                fallbacks=[str(f) for f in fallbacks][:8],
                mismatches=bad[:8], n_mismatches=len(bad), grad_none_vs_zero=none_vs_zero[:8],
                n_grad_none_vs_zero=len(none_vs_zero), n_params=len(params))


def _run_one(family, impl, has_switch, explain_only=False):
    import torch

    import hf_models
    import moe_inductor

    rec = dict(family=family, impl=impl)
    t0 = time.perf_counter()
    try:
        # "grouped_mm" is the transformers default: build with None so that the default path is what runs
        model, ids = hf_models.build(family, experts_impl=None if impl in ("grouped_mm", "native") else impl)
        cfg_impl = getattr(model.config, "_experts_implementation", None)
        if has_switch:
            rec["experts_implementation"] = cfg_impl
        blocks = hf_models.moe_modules(model)
        rec["blocks"] = len(blocks)
        rec["block_classes"] = sorted({type(m).__name__ for _, m in blocks})
    except Exception as e:
        rec.update(status="build error", error=f"{type(e).__name__}: {e}"[:2000], seconds=time.perf_counter() - t0)
        return rec
    try:
        report = moe_inductor.explain(model, ids, inductor=False)
        rec["entries"] = [dict(where=e.where, idiom=e.idiom, status=e.status, reason=e.reason) for e in report.entries]
        rec["explain_rewritten"] = len(report.rewritten)
        rec["graph_breaks"] = list(dict.fromkeys(b.summary for b in report.graph_breaks))[:10]
    except Exception as e:
        rec["explain_error"] = f"{type(e).__name__}: {e}"[:2000]
    if explain_only:
        rec.update(explain_only=True, rewritten=rec.get("explain_rewritten"),
                   status="ok" if "explain_error" not in rec else "explain error")
        rec["reasons"] = list(dict.fromkeys(
            f"{e['status']}: {e['reason']}" for e in rec.get("entries", []) if e["status"] != "rewritten"))
        rec["seconds"] = round(time.perf_counter() - t0, 1)
        return rec
    try:
        rec["dropout_zeroed"] = _zero_dropout(model)
        rec.update(_compare(model, ids))
        rec["status"] = "ok"
    except Exception as e:
        rec.update(status="compile error", error=f"{type(e).__name__}: {e}"[:2000],
                   traceback=traceback.format_exc()[-3000:], numerics_ok=False)
    rec["reasons"] = list(dict.fromkeys(
        f"{e['status']}: {e['reason']}" for e in rec.get("entries", []) if e["status"] != "rewritten"))
    rec["seconds"] = round(time.perf_counter() - t0, 1)
    return rec


def child(family, result_file, explain_only=False, impls=("grouped_mm", "batched_mm")):
    """Run every implementation of ``family``; append one JSON line per implementation to result_file."""
    sys.path.insert(0, str(TESTS))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import hf_models

    try:
        has_switch = hf_models.supports_experts_impl(family)
    except Exception as e:
        with open(result_file, "a") as f:
            f.write(json.dumps(dict(family=family, impl="-", status="build error",
                                    error=f"{type(e).__name__}: {e}"[:2000])) + "\n")
        return
    impls = list(impls) if has_switch else ["native"]
    for impl in impls:
        rec = _run_one(family, impl, has_switch, explain_only)
        with open(result_file, "a") as f:
            f.write(json.dumps(rec) + "\n")


# --------------------------------------------------------------------------- parent

def cpu_model():
    """The CPU's model name from /proc/cpuinfo (platform.processor() is often empty)."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _versions():
    import platform

    import torch
    import transformers

    return dict(torch=torch.__version__, transformers=transformers.__version__, python=platform.python_version(),
                machine=platform.machine(), processor=platform.processor(), cpu_model=cpu_model(),
                cpu_count=os.cpu_count())


def _git_commit():
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=str(ROOT), capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=str(ROOT),
                               capture_output=True, text=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _run_family(family, timeout, explain_only=False, commit="unknown", impls=("grouped_mm", "batched_mm")):
    fd, path = tempfile.mkstemp(prefix=f"sweep_{family}_", suffix=".jsonl")
    os.close(fd)
    t0 = time.perf_counter()
    cmd = [sys.executable, __file__, "--child", family, "--child-out", path] + (["--explain-only"] if explain_only else []) + ["--impls", ",".join(impls)]
    status, tail = None, ""
    # own process group, so that a timeout also ends Inductor's compile workers
    with tempfile.TemporaryFile(mode="w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, cwd=str(ROOT), start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
            if rc != 0:
                status = f"crashed (exit code {rc})"
        except subprocess.TimeoutExpired:
            status = f"timeout after {timeout}s"
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        if status is not None:
            err.seek(0)
            tail = err.read()[-2000:]
    elapsed = round(time.perf_counter() - t0, 1)
    recs = []
    with open(path) as f:
        for line in f:
            if line.strip():
                recs.append(json.loads(line))
    os.unlink(path)
    if status is not None:
        # the implementation that was running when the child died: record it
        recs.append(dict(family=family, impl="(next)" if recs else "-", status=status, error=tail,
                         numerics_ok=False, seconds=elapsed))
    for r in recs:
        r.setdefault("seconds", elapsed)
        r["commit"] = commit
    return recs


def _write(out, meta, results):
    tmp = Path(str(out) + ".tmp")
    tmp.write_text(json.dumps(dict(meta=meta, results=results), indent=1) + "\n")
    tmp.replace(out)


def _cell_rewritten(r):
    if "blocks" not in r:
        return "-"
    return f"{r.get('rewritten', '?')}/{r['blocks']}"


def _short(s, n=110):
    s = " ".join(str(s).split())
    return s if len(s) <= n else s[: n - 1] + "…"


_BOILERPLATE = (  # Dynamo's generic wording, dropped from the table (kept in the JSON)
    (r"Consider annotating your code using torch\._check\*\(\)\. ", ""),
    (r"not in any compiled graph: ", ""),
    (r"Could not extract specialized integer from data-dependent expression", "data-dependent int"),
    (r" ?\(unhinted: [^)]*\)", ""),
    (r" ?\(Size-like symbols: [^)]*\)", ""),
    (r"\.\s+at ", " at "),
)


def _condense(s):
    for pat, rep in _BOILERPLATE:
        s = re.sub(pat, rep, s)
    return s


def _reason(r):
    if r.get("status") not in ("ok",):
        return _short(f"{r.get('status')}: {r.get('error', '')}", 160)
    if r.get("rewritten") == r.get("blocks") and not r.get("reasons"):
        return ""
    reasons = r.get("reasons") or ([r["explain_error"]] if r.get("explain_error") else [])
    return _short(_condense("; ".join(reasons)) or "rewrite count differs from the block count", 160)


def _numerics(r):
    if r.get("status") != "ok":
        return "-"
    if r.get("explain_only"):
        return "not run (explain only)"
    note = f"; {r['n_grad_none_vs_zero']} grads None vs zeros" if r.get("n_grad_none_vs_zero") else ""
    return ("ok" if r.get("numerics_ok") else "FAIL") + f" ({r.get('max_diff', float('nan')):.1e}{note})"


def print_table(results):
    rows = [("family", "impl", "rewritten", "numerics", "s", "reason if not all rewritten")]
    for r in results:
        rows.append((r["family"], r.get("impl", "-"), _cell_rewritten(r), _numerics(r),
                     f"{r.get('seconds', 0):.0f}", _short(_reason(r), 80)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


def print_markdown(path):
    data = json.loads(Path(path).read_text())
    meta = data.get("meta", {})
    print(f"<!-- {Path(path).name}: torch {meta.get('torch')}, transformers {meta.get('transformers')} -->")
    print("| family | impl | blocks rewritten | numerics (max abs diff) | reason if not all rewritten |")
    print("|---|---|---|---|---|")
    for r in data["results"]:
        reason = _reason(r).replace("|", "\\|")
        print(f"| {r['family']} | {r.get('impl', '-')} | {_cell_rewritten(r)} | {_numerics(r)} | {reason} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", default="", help="comma-separated subset (default: every family of hf_models.FAMILIES)")
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--timeout", type=int, default=1200, help="seconds per family (all its implementations)")
    ap.add_argument("--jobs", type=int, default=1, help="families run in parallel")
    ap.add_argument("--resume", action="store_true", help="keep the results already in --out, skip those families")
    ap.add_argument("--markdown", action="store_true", help="print the README table from --out and exit")
    ap.add_argument("--explain-only", action="store_true",
                    help="recognition only: explain (rewrite without Inductor) per family, no numerics")
    ap.add_argument("--impls", default="grouped_mm,batched_mm",
                    help="experts implementations of the families that have the switch (also: eager)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        child(args.child, args.child_out, args.explain_only, [i for i in args.impls.split(",") if i])
        return
    if args.markdown:
        print_markdown(args.out)
        return

    sys.path.insert(0, str(TESTS))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import hf_models

    families = [f.strip() for f in args.families.split(",") if f.strip()] or list(hf_models.FAMILIES)
    unknown = [f for f in families if f not in hf_models.FAMILIES]
    if unknown:
        sys.exit(f"unknown families: {', '.join(unknown)}; known: {', '.join(hf_models.FAMILIES)}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results, earlier = [], None
    if args.resume and out.exists():
        prev = json.loads(out.read_text())
        results, earlier = prev["results"], prev.get("meta")
        done = {r["family"] for r in results}
        families = [f for f in families if f not in done]
    meta = dict(_versions(), atol=ATOL, rtol=RTOL, timeout_per_family_s=args.timeout,
                note="tiny random-weight models from tests/hf_models.py, fp32, CPU; numerics in train mode "
                     "with dropout set to 0, full sonic backend (Inductor code generation included), values "
                     "of the second compiled call; explain with inductor=False",
                started=time.strftime("%Y-%m-%d %H:%M:%S"))
    if args.explain_only:
        meta["note"] = ("tiny random-weight models from tests/hf_models.py, fp32, CPU; explain only "
                        "(moe_inductor.explain with inductor=False): what is recognised and rewritten, no numerics")
    if earlier:
        # the runs this one resumes (their records keep their own "commit")
        meta["earlier_runs"] = earlier.pop("earlier_runs", []) + [earlier]
    commit = _git_commit()
    impls = [i for i in args.impls.split(",") if i]
    bad = [i for i in impls if i not in ("grouped_mm", "batched_mm", "eager")]
    if bad:
        sys.exit(f"unknown experts implementations: {', '.join(bad)}; known: grouped_mm, batched_mm, eager")
    order = {f: i for i, f in enumerate(hf_models.FAMILIES)}

    def done_family(recs):
        results.extend(recs)
        results.sort(key=lambda r: (order.get(r["family"], 1 << 30), IMPL_ORDER.get(r.get("impl"), 9)))
        _write(out, meta, results)
        for r in recs:
            print(f"[{r['family']} {r.get('impl', '-')}] {r.get('status')} rewritten {_cell_rewritten(r)} "
                  f"numerics {_numerics(r)} {r.get('seconds', 0):.0f}s {_short(_reason(r), 100)}", flush=True)

    if args.jobs <= 1:
        for fam in families:
            done_family(_run_family(fam, args.timeout, args.explain_only, commit, impls))
    else:
        with ThreadPoolExecutor(args.jobs) as pool:
            futures = [pool.submit(_run_family, f, args.timeout, args.explain_only, commit, impls) for f in families]
            for fut in as_completed(futures):
                done_family(fut.result())
    meta["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    _write(out, meta, results)
    print()
    print_table(results)


if __name__ == "__main__":
    main()
