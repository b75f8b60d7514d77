"""Inductor settings for every graph sonic compiles, and why each one is needed.

Every entry here works around an Inductor defect that gives wrong results on MoE graphs. Each is
applied to every graph sonic compiles (not with ``rewrite=False``, the plain-Inductor A/B switch),
and never over a value the user chose with the ``inductor`` option. Checked on torch 2.11 and 2.13
(tests/test_bf16_router_grads.py). First seen on rewritten graphs only; the bf16/fp16 fuzz then
found MoE blocks that were not rewritten (flat masks with ``index_add``, biased-sigmoid router,
bf16) whose router gradient plain Inductor also zeroes, so the setting covers every graph.

``reorder_for_peak_memory = False``: Inductor's scheduler can lose the edge between an in-place
``scatter`` and a fused kernel that reads its result, and the peak-memory reordering
(``torch/_inductor/memory.py``) then runs that kernel before the scatter. Seen with a router
``sigmoid((gate(x) + bias_buffer).float())`` -> ``topk`` -> ``.to(bf16)`` whose scores go to the
fused op: the backward of ``topk`` is ``zeros.scatter(ids, d_scores)``, and in bf16 AOTAutograd
recomputes ``sigmoid(mm + bias)`` in the backward instead of saving it. The CPU backend fuses that
recomputation (loop shape (T, E)) with ``d_scores_scattered * sigmoid'`` (loop shape (T*E,)); to
match the shapes it rebuilds the second node's body, and the rebuilt reads name the scatter's
buffer by its real name (``buf9``) instead of the mutation (``buf10``): the fused node no longer
depends on the scatter, the reordering moves it first, and it reads zeros. The router's gradient
was exactly zero. In fp32 the forward saves the sigmoid, nothing is recomputed and fused, and the
order stays right; plain Inductor on the captured graph (no fused op) gave the right gradient on
every case of the issue. Turning the reordering off keeps Inductor's topological order, which is
correct; what is saved for backward is the same (only the order of frees can differ). Confirmed
on torch 2.13 by dumping the scheduler's nodes: the fused reader's dependencies listed ``buf9``
(the zeros) where its unfused form listed ``buf10`` (the scatter).
"""
from __future__ import annotations

import torch

#: Inductor config entries for the graphs sonic compiles: name -> (value, reason)
SONIC_GRAPH_PATCHES: dict = {
    "reorder_for_peak_memory": (
        False,
        "Inductor's peak-memory reordering can run a fused reader of a scatter's result before the "
        "scatter (bf16 routers whose scores reach the fused op got zero gradients)",
    ),
}


def for_sonic_graph(patches: dict) -> dict:
    """``patches`` (the user's ``inductor`` option and the mode's settings) plus the entries of
    ``SONIC_GRAPH_PATCHES`` that this torch has and that ``patches`` does not set already."""
    out = dict(patches)
    for name, (value, _why) in SONIC_GRAPH_PATCHES.items():
        if name not in out and hasattr(torch._inductor.config, name):
            out[name] = value
    return out
