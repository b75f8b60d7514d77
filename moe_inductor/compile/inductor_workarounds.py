"""A fix of an Inductor scheduler defect, applied only while Inductor compiles a sonic graph.

The defect (torch 2.11 and 2.13): ``SchedulerNode.recompute_size_and_body`` rebuilds a node's
reads from its loop body, where a buffer that an earlier node mutated (an in-place ``scatter`` into
``zeros``) is read under its real name (``buf9``), not under the name of the mutation (``buf10``);
the node's ``mutation_renames`` are re-applied on 2.13 only when the node has fake dependencies,
never on 2.11. The node then no longer depends on the scatter. The CPU backend calls it when it
fuses two pointwise nodes of compatible but different loop shapes ((T, E) and (T*E,)), so a fused
reader of a scatter's result can run before the scatter and read zeros. MoE routers hit it: the
backward of ``topk`` is ``zeros.scatter(ids, d_scores)``, and in bf16/fp16 AOTAutograd recomputes
``sigmoid(mm + bias)`` in the backward, which gets fused with ``d_scores_scattered * sigmoid'``:
the router's gradient was exactly zero (issue 22). Whether the misplaced kernel ends up before the
scatter depends on the order Inductor then picks: with its peak-memory reordering on, issue 22's
graph went wrong; with it off, other graphs went wrong (the bf16/fp16 fuzz found both, in graphs
with and without the fused op, and plain Inductor gives the same zero gradients on them).

The fix: after ``recompute_size_and_body``, re-apply the node's fake dependencies and its
``mutation_renames``, as ``refresh_dependencies`` and node construction do. It is installed only
around Inductor's inner compiles of the graphs the sonic backend hands to ``compile_fx``
(``inner_compile``, which AOTAutograd uses for the forward and the backward), so nothing changes
for other backends or outside those compiles (a compile in another thread during that window
would see the fix too). Private torch APIs used here, checked on torch 2.11 and 2.13
(tests/test_bf16_router_grads.py): ``SchedulerNode.recompute_size_and_body``,
``BaseSchedulerNode.set_read_writes``, ``mutation_renames``, ``ReadWrites.with_read/rename``,
``WeakDep``/``StarDep``, ``compile_fx(inner_compile=...)``, ``compile_fx_inner``.
"""
from __future__ import annotations

import contextlib
import functools


def _keeping_mutation_renames(original):
    from torch._inductor.dependencies import StarDep, WeakDep
    from torch.utils._ordered_set import OrderedSet

    @functools.wraps(original)
    def recompute_size_and_body(self, *args, **kwargs):
        fake = OrderedSet(dep for dep in self.read_writes.reads if isinstance(dep, (WeakDep, StarDep)))
        original(self, *args, **kwargs)
        rw = self.read_writes.with_read(fake) if fake else self.read_writes
        self.set_read_writes(rw.rename(getattr(self, "mutation_renames", {}) or {}))

    return recompute_size_and_body


def fix_available() -> bool:
    """Does this torch have what the fix wraps?"""
    try:
        from torch._inductor.scheduler import BaseSchedulerNode, SchedulerNode
    except ImportError:  # pragma: no cover
        return False
    return "recompute_size_and_body" in SchedulerNode.__dict__ and hasattr(BaseSchedulerNode, "set_read_writes")


@contextlib.contextmanager
def mutation_renames_kept():
    """Inside: ``SchedulerNode.recompute_size_and_body`` keeps the node's dependencies on
    mutations. Restored on exit; nested use is harmless (renaming twice changes nothing)."""
    if not fix_available():  # pragma: no cover (a torch without the method: nothing to fix there)
        yield
        return
    from torch._inductor.scheduler import SchedulerNode

    original = SchedulerNode.__dict__["recompute_size_and_body"]
    SchedulerNode.recompute_size_and_body = _keeping_mutation_renames(original)
    try:
        yield
    finally:
        SchedulerNode.recompute_size_and_body = original


def inner_compile(*args, **kwargs):
    """``compile_fx_inner`` with the fix installed: pass as ``compile_fx(..., inner_compile=...)``."""
    from torch._inductor.compile_fx import compile_fx_inner

    with mutation_renames_kept():
        return compile_fx_inner(*args, **kwargs)
