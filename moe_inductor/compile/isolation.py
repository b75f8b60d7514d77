"""Keep the rewrite's own work away from the user's autograd hooks.

The rewrite runs ops on Dynamo's fake example values (``fx.build.fake_run``). Where those record
autograd (parameters require grad), autograd calls the pack hook of any
``torch.autograd.graph.saved_tensors_hooks`` the user has active while the model compiles; memory
profilers and offloaders read ``untyped_storage().data_ptr()`` there, which raises on a fake tensor,
and every block was declined with "internal error while rewriting: Cannot access data pointer".
AOTAutograd meets the same hooks when it traces and defers them with
``torch._C._autograd._saved_tensors_hooks_set_tracing`` (``torch._dynamo.utils.
_disable_saved_tensors_hooks_during_tracing``); the rewrite does the same around its work. The
private call is used here only, checked on torch 2.11 and 2.13 (tests/test_isolation.py); where a
torch lacks it, the rewrite runs as before (a hook that fails declines the block, with the reason).
"""
from __future__ import annotations

import contextlib

import torch


def hooks_deferred_available() -> bool:
    return hasattr(torch._C._autograd, "_saved_tensors_hooks_set_tracing")


@contextlib.contextmanager
def user_hooks_deferred():
    """Saved-tensor pack hooks are not called inside (the fake runs of the rewrite)."""
    if not hooks_deferred_available():
        yield
        return
    prior = torch._C._autograd._saved_tensors_hooks_set_tracing(True)
    try:
        yield
    finally:
        torch._C._autograd._saved_tensors_hooks_set_tracing(prior)
