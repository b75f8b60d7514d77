"""Activation memory: bytes autograd keeps for backward, measured without a GPU.

``torch.autograd.graph.saved_tensors_hooks`` sees every tensor saved for backward, including
what a compiled region saves; counting each storage once and leaving parameters out gives a
device-independent figure (the CPU proxy for SonicMoE's memory claim).
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch


def saved_activation_bytes(fn: Callable, *args, exclude: Iterable[torch.Tensor] = (), **kwargs) -> tuple[int, object]:
    """Run ``fn(*args, **kwargs)`` and return (bytes saved for backward, output).

    Storages of ``exclude`` (typically the model's parameters) are not counted."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        try:
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in skip:
                seen[ptr] = max(seen.get(ptr, 0), storage.nbytes())
        except (RuntimeError, NotImplementedError):
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args, **kwargs)
    return sum(seen.values()), out


def sonic_minimum_bytes(T: int, d: int, n: int, A: int, dtype: torch.dtype, gated: bool = True,
                        score_dtype: torch.dtype = torch.float32) -> int:
    """SonicMoE's minimum saved set: X (T x d) + H (A x 2n) + scores (A) + int32 token and
    expert indices (2 x A)."""
    b = torch.empty(0, dtype=dtype).element_size()
    h_cols = 2 * n if gated else n
    return T * d * b + A * h_cols * b + A * torch.empty(0, dtype=score_dtype).element_size() + 2 * A * 4
