"""Distributed training with the sonic backend, 2 gloo ranks on CPU (processes started here with
torch.multiprocessing): DDP and FSDP2 (``fully_shard``) keep the rewrite and match eager; a
torchtitan-style expert-parallel MoE (tokens exchanged with ``all_to_all_single``, each rank runs
its local experts on the tokens it receives) has its local-experts computation rewritten and
matches plain Inductor and eager in loss and every gradient.

Expert parallelism, how it is written here (shape legend: T local tokens, d hidden, E experts,
W ranks, El = E / W local experts, K experts per token, R tokens a rank receives):
router and top-k on each rank; assignments sorted by expert; per-expert counts exchanged with
``all_to_all_single``; tokens exchanged with ``all_to_all_single_autograd`` (split sizes from the
counts, ``.tolist()`` under ``capture_scalar_outputs``); the local experts run on the R received
rows, each of which belongs to exactly one local expert; the outputs go back the same way and the
routing scores multiply them after the return exchange (as torchtitan does by default: a score
before the experts' nonlinearity would be another model); combine = unsort and sum over K.

What the sonic rewrite sees of this: the local computation is an MoE block in the fused op's
sense with one assignment per received row: token_ids = arange(R), expert_ids = the row's local
expert, scores = 1 (the real scores are applied outside, after the exchange back). Written as a
loop over the local experts with a (R, 1) unit score table (``LocalExperts`` below) it is
rewritten by the ``expert_loop`` composition, and so it is without the unit multiply
(``out.index_add_(0, idx, expert(recv[idx]))`` with ``idx = torch.where(local_ids == e)[0]``: boolean
row selections, no scores). Written as torchtitan writes it (``GroupedLocalExperts``: stacked
weights, the received rows grouped by local expert, ``torch._grouped_mm`` with offsets =
cumsum(local counts), rows back in the received order, no score multiply) it is rewritten by
``patterns/assignment_rows.py`` ("local_experts"): one fused op over the R rows with token_ids =
arange(R), the expert of each row the group the grouped GEMM puts it in, score 1.
"""
import json
import os
import tempfile

import pytest

pytestmark = pytest.mark.slow  # 2 gloo ranks per test, about a minute each: run by CI with -m slow
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from moe_modules import GatedMLP, LoopMoE

WORLD = 2
ATOL = RTOL = 1e-4


def spawn(case, tmp_path, *args):
    """Run ``case(rank, *args)`` on WORLD gloo ranks; returns rank 0's JSON result."""
    init = tmp_path / "init"
    result = tmp_path / "result.json"
    mp.spawn(_worker, args=(case, str(init), str(result), args), nprocs=WORLD, join=True)
    return json.loads(result.read_text())


def _worker(rank, case, init, result, args):
    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=WORLD)
    try:
        out = case(rank, *args)
        if rank == 0:
            with open(result, "w") as f:
                json.dump(out, f)
    finally:
        dist.destroy_process_group()


def _rewrites():
    from torch._dynamo.utils import counters

    return counters["sonic"]["moe_rewrites"]


def _why_not():
    """What the backend reports about frames it compiled differently (for assertion messages)."""
    try:
        from moe_inductor.dynamo import dynamo_scope

        return [str(f) for f in dynamo_scope.fallbacks()]
    except Exception as e:  # the module is optional here
        return [f"(no fallback list: {e})"]


def _close(got, want, what, tol=None):
    torch.testing.assert_close(got, want, atol=tol or ATOL, rtol=tol or RTOL, msg=lambda m: f"{what}: {m}")


# --------------------------------------------------------------------------- DDP and FSDP2

class Block(nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.moe = LoopMoE(d, 16, 4, 2, mask="eq")  # research-code loop: torch.where + index_add_

    def forward(self, x):
        return x + self.moe(self.norm(x))


class Net(nn.Module):
    def __init__(self, d=32, layers=2):
        super().__init__()
        self.layers = nn.ModuleList([Block(d) for _ in range(layers)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def _net_and_data(rank):
    torch.manual_seed(0)
    net = Net()
    torch.manual_seed(100 + rank)  # every rank its own batch
    return net, torch.randn(2, 8, 32)


def _ddp_case(rank):
    from torch.nn.parallel import DistributedDataParallel as DDP

    net, x = _net_and_data(rank)
    ref = DDP(_copy(net))
    model = DDP(net)
    compiled = torch.compile(model, backend="sonic")
    loss = compiled(x).pow(2).mean()
    loss.backward()
    ref_loss = ref(x).pow(2).mean()
    ref_loss.backward()
    _close(loss, ref_loss, "loss")
    for (name, p), q in zip(net.named_parameters(), ref.module.parameters()):
        _close(p.grad, q.grad, name)
    assert _rewrites() == 2, (rank, _rewrites(), _why_not())
    return {"rewrites": _rewrites(), "loss": loss.item()}


def _copy(module):
    import copy

    return copy.deepcopy(module)


def _fsdp_case(rank):
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6 spelling
        from torch.distributed._composable.fsdp import fully_shard

    net, x = _net_and_data(rank)
    ref = _copy(net)
    for layer in net.layers:
        fully_shard(layer)
    fully_shard(net)
    compiled = torch.compile(net, backend="sonic")
    loss = compiled(x).pow(2).mean()
    loss.backward()
    # reference: unsharded eager model, gradients averaged over the ranks as FSDP does
    ref_loss = ref(x).pow(2).mean()
    ref_loss.backward()
    _close(loss, ref_loss, "loss")
    for (name, p), q in zip(net.named_parameters(), ref.parameters()):
        dist.all_reduce(q.grad)
        q.grad /= WORLD
        _close(p.grad.full_tensor(), q.grad, name)
    assert _rewrites() == 2, (rank, _rewrites(), _why_not())
    return {"rewrites": _rewrites(), "loss": loss.item()}


def test_ddp_keeps_rewrite(tmp_path):
    out = spawn(_ddp_case, tmp_path)
    assert out["rewrites"] == 2


def test_fsdp2_keeps_rewrite(tmp_path):
    out = spawn(_fsdp_case, tmp_path)
    assert out["rewrites"] == 2


# --------------------------------------------------------------------------- expert parallelism

class LocalExperts(nn.Module):
    """The rank's El experts run on the R received rows, each row one expert (``local_ids``).
    ``unit_scores``: the loop multiplies by a (R, 1) table of ones (score 1 per row: the routing
    scores are applied after the exchange back), the form the sonic rewrite recognises."""

    def __init__(self, experts, unit_scores=True):
        super().__init__()
        self.experts = experts
        self.unit_scores = unit_scores

    def forward(self, recv, local_ids):
        out = torch.zeros_like(recv)
        if self.unit_scores:
            ids = local_ids.unsqueeze(1)                   # (R, 1): the rows' "top-1" table
            ones = torch.ones(ids.shape, dtype=recv.dtype)  # (R, 1): score 1 for every row
            for e, expert in enumerate(self.experts):
                tok, k = torch.where(ids == e)
                out.index_add_(0, tok, expert(recv[tok]) * ones[tok, k, None])
        else:
            for e, expert in enumerate(self.experts):
                tok = torch.where(local_ids == e)[0]
                out.index_add_(0, tok, expert(recv[tok]))
        return out


class GroupedLocalExperts(nn.Module):
    """torchtitan's local experts under expert parallelism: stacked weights (the same values as the
    rank's GatedMLP experts), the received rows permuted into local-expert order (torchtitan's
    ``generate_permute_indices``, without its alignment padding), bf16 grouped GEMMs with offsets =
    cumsum(local counts) (CPU compiles only bf16 ``torch._grouped_mm``), rows back in the received
    order; no score multiply."""

    def __init__(self, experts):
        super().__init__()

        def stacked(name):
            return nn.Parameter(torch.stack([getattr(e, name).weight.detach() for e in experts]))

        self.w1, self.w3, self.w2 = stacked("w1"), stacked("w3"), stacked("w2")  # (El, n, d), (El, n, d), (El, d, n)

    def forward(self, recv, local_ids, local_counts):
        perm = torch.argsort(local_ids, stable=True)
        rows = recv[perm]                                                          # (R, d), grouped by local expert
        offsets = torch.cumsum(local_counts, dim=0, dtype=torch.int32)
        h = F.silu(torch._grouped_mm(rows.bfloat16(), self.w1.bfloat16().transpose(-2, -1), offs=offsets))
        h = h * torch._grouped_mm(rows.bfloat16(), self.w3.bfloat16().transpose(-2, -1), offs=offsets)
        out = torch._grouped_mm(h, self.w2.bfloat16().transpose(-2, -1), offs=offsets).type_as(rows)
        return torch.empty_like(out).index_copy(0, perm, out)                      # back to the received order


class ExpertParallelMoE(nn.Module):
    """A torchtitan-style expert-parallel MoE layer (written for this test): E experts, El = E / W
    of them on each rank; the router is replicated."""

    def __init__(self, rank, d=16, n=8, E=4, K=2, unit_scores=True, grouped=False):
        super().__init__()
        torch.manual_seed(0)  # same router and same global experts on every rank
        self.router = nn.Linear(d, E, bias=False)
        every = [GatedMLP(d, n) for _ in range(E)]
        self.El = E // WORLD
        mine = every[rank * self.El:(rank + 1) * self.El]
        self.grouped = grouped
        self.local = GroupedLocalExperts(mine) if grouped else LocalExperts(nn.ModuleList(mine), unit_scores)
        self.E, self.K = E, K

    def forward(self, x):
        from torch.distributed._functional_collectives import all_to_all_single, all_to_all_single_autograd

        T, d = x.shape
        probs = F.softmax(self.router(x), dim=-1, dtype=torch.float32)
        scores, ids = torch.topk(probs, self.K, dim=-1)            # (T, K)
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)                   # assignments sorted by expert
        routed = x[order // self.K]                                 # (T*K, d), rank-major, expert-minor
        counts = torch.bincount(flat, minlength=self.E)            # (E,) assignments per global expert
        with torch.no_grad():
            recv_counts = all_to_all_single(counts, None, None, group=dist.group.WORLD)  # (W*El,)
            in_splits = counts.view(WORLD, self.El).sum(1).tolist()
            out_splits = recv_counts.view(WORLD, self.El).sum(1).tolist()
            R = sum(out_splits)
            # the received rows come source rank by source rank, each sorted by local expert
            local_ids = torch.repeat_interleave(torch.arange(self.El).repeat(WORLD), recv_counts, output_size=R)
            local_counts = recv_counts.view(WORLD, self.El).sum(0)  # (El,) rows per local expert
        recv = all_to_all_single_autograd(routed, out_splits, in_splits, group=dist.group.WORLD)   # (R, d)
        y = self.local(recv, local_ids, local_counts) if self.grouped else self.local(recv, local_ids)  # (R, d)
        back = all_to_all_single_autograd(y, in_splits, out_splits, group=dist.group.WORLD)      # (T*K, d)
        back = back * scores.reshape(-1)[order].unsqueeze(-1).to(back.dtype)
        unsorted = torch.empty_like(back).index_copy_(0, order, back)  # back to (token, k) order
        return unsorted.view(T, self.K, d).sum(1)


def _ep_case(rank, unit_scores, grouped=False):
    from torch._dynamo.utils import counters

    import moe_inductor  # noqa: F401  (the sonic backend's op)

    torch._dynamo.config.capture_scalar_outputs = True  # .tolist() of the split sizes
    torch._dynamo.config.capture_dynamic_output_shape_ops = True  # torch.where in the loop (plain Inductor too)
    torch.manual_seed(100 + rank)
    x = torch.randn(12, 16)
    results = {}
    for backend in ("eager", "inductor", "sonic"):
        model = ExpertParallelMoE(rank, unit_scores=unit_scores, grouped=grouped)
        xin = x.clone().requires_grad_()
        fn = model if backend == "eager" else torch.compile(model, backend=backend, fullgraph=True)
        loss = fn(xin).pow(2).mean()
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        grads["input"] = xin.grad
        results[backend] = (loss.detach(), grads)
    tol = 3e-2 if grouped else None  # bf16 grouped GEMMs (eager, Inductor and the fused op round differently)
    for backend in ("inductor", "sonic"):
        loss, grads = results[backend]
        _close(loss, results["eager"][0], f"{backend} loss", tol)
        for name, g in grads.items():
            _close(g, results["eager"][1][name], f"{backend} grad {name}", tol)
    _close(results["sonic"][0], results["inductor"][0], "sonic vs inductor loss", tol)
    for name, g in results["sonic"][1].items():
        _close(g, results["inductor"][1][name], f"sonic vs inductor grad {name}", tol)
    return {"rewrites": counters["sonic"]["moe_rewrites"], "declined": counters["sonic"]["moe_declined"],
            "loss": results["sonic"][0].item()}


def test_ep_local_experts_rewritten(tmp_path):
    out = spawn(_ep_case, tmp_path, True)
    assert out["rewrites"] == 1, out  # the local-experts loop of rank 0's graph


def test_ep_unweighted_local_loop_rewritten(tmp_path):
    """A local-experts loop without the unit score multiply (boolean row selections, no scores) is
    rewritten too (it was declined before the parts redesign)."""
    out = spawn(_ep_case, tmp_path, False)
    assert out["rewrites"] == 1 and out["declined"] == 0, out


def test_ep_grouped_local_experts_rewritten(tmp_path):
    """torchtitan's local experts (grouped GEMMs over the received rows with offsets = cumsum of
    the local counts, no score multiply): one fused op over the rows, loss and every gradient as
    plain Inductor and eager (bf16 tolerance)."""
    out = spawn(_ep_case, tmp_path, False, True)
    # the local experts are rewritten; the layer as a whole (rows in (token, k) order, weighted
    # view(T, K, d).sum(1)) is a candidate of the rows composition and declined: between the experts'
    # down projection and the routing weight its rows go through all_to_all, which the fused op
    # cannot express
    assert out["rewrites"] == 1 and out["declined"] == 1, out
