"""Plain Inductor against eager for chosen transformers families: the same comparison as the family
sweep (train mode, dropout 0, logits and every parameter gradient at
atol = rtol = 1e-4, second compiled call), with ``backend="inductor"``, and the relative error
``||a - b|| / ||b||`` of every gradient for both backends. It tells whether an elementwise mismatch
in the sweep comes from the rewrite or is already there without it.

    python examples/inductor_baseline.py --families gemma4,muse_spark --out examples/results/x.json
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _run(model, ids, backend):
    import torch
    from torch._dynamo.utils import counters
    import sweep_families as sf
    torch._dynamo.reset()
    counters.clear()
    model.train()
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
    ref = sf._first_tensor(model(ids))
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(0), dtype=ref.dtype)
    ref_grads = torch.autograd.grad(ref, params, g, allow_unused=True)
    compiled = torch.compile(model, backend=backend)
    torch.autograd.grad(sf._first_tensor(compiled(ids)), params, g, allow_unused=True)
    out = sf._first_tensor(compiled(ids))
    grads = torch.autograd.grad(out, params, g, allow_unused=True)
    worst_rel, worst_abs, bad = 0.0, 0.0, []
    for name, a, b in [("logits", out, ref)] + list(zip(names, grads, ref_grads)):
        if a is None or b is None:
            continue
        a, b = a.detach().float(), b.detach().float()
        worst_abs = max(worst_abs, float((a - b).abs().max()))
        if b.norm() > 0:
            worst_rel = max(worst_rel, float((a - b).norm() / b.norm()))
        if not torch.allclose(a, b, atol=sf.ATOL, rtol=sf.RTOL):
            bad.append(name)
    rewritten = int(counters["sonic"]["moe_rewrites"])
    torch._dynamo.reset()
    return dict(numerics_ok=not bad, n_mismatches=len(bad), mismatches=bad[:12], max_diff=worst_abs,
                max_relative_error=worst_rel, rewritten=rewritten)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", required=True)
    ap.add_argument("--impl", default=None, help="experts implementation (default: the family's default)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    import moe_inductor  # noqa: F401  (registers the sonic backend)
    import hf_models
    import sweep_families as sf
    recs = []
    for fam in args.families.split(","):
        for backend in ("inductor", "sonic"):
            t0 = time.time()
            model, ids = hf_models.build(fam, experts_impl=args.impl)
            sf._zero_dropout(model)
            r = _run(model, ids, backend)
            r.update(family=fam, impl=args.impl or "default", backend=backend, seconds=round(time.time() - t0, 1))
            recs.append(r)
            print(f"[{fam} {backend}] numerics_ok={r['numerics_ok']} max_abs={r['max_diff']:.2e} "
                  f"n_mismatches={r['n_mismatches']} max_rel={r['max_relative_error']:.2e} rewritten={r['rewritten']}",
                  flush=True)
    meta = dict(sf._versions(), commit=sf._git_commit(), atol=sf.ATOL, rtol=sf.RTOL)
    Path(args.out).write_text(json.dumps(dict(meta=meta, results=recs), indent=1) + "\n")


if __name__ == "__main__":
    main()
