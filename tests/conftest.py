import os

# Triton kernels run on CPU tensors through the interpreter when no GPU is present. It must be
# set before triton is first imported, so it lives here, before any test module imports.
try:
    import torch

    _has_cuda = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _has_cuda = False
if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402


@pytest.fixture
def fresh_dynamo():
    """Forget compiled code and counters before and after a test (rewrite counts are per test)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()
