"""Logging calls inside frames compiled with sonic are carried out at trace time, not graph breaks
(``moe_inductor.dynamo.trace_logging``); other backends keep Dynamo's behaviour, and a call Dynamo would
have to evaluate on tensors still breaks the graph."""
from __future__ import annotations

import logging

import pytest
import torch

import moe_inductor
from moe_inductor.dynamo import trace_logging
from moe_modules import StackedLoopMoE

pytestmark = pytest.mark.usefixtures("fresh_dynamo")

logger = logging.getLogger("tests.trace_logging")


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def records():
    h = _Records()
    logger.addHandler(h)
    logger.setLevel(logging.DEBUG)
    yield h.messages
    logger.removeHandler(h)


class LoggingMoE(StackedLoopMoE):
    """The stacked-experts loop MoE whose forward logs between the router and the experts (as
    transformers' experts dispatch does), with constant arguments or a tensor one."""

    def __init__(self, tensor_arg=False):
        super().__init__(d=16, n=8, E=4, K=2)
        self.tensor_arg = tensor_arg

    def before_experts(self, w):
        if self.tensor_arg:
            logger.info("largest routing weight %s", w.max())
        else:
            logger.warning("experts implementation %s not set; using %s", None, "eager")


def test_constant_logging_call_is_emitted_at_trace_time_and_the_block_is_one_graph(records):
    m = LoggingMoE()
    x = torch.randn(7, 16)
    report = moe_inductor.explain(m, x)
    assert report.graph_breaks == [] and [e.status for e in report.entries] == ["rewritten"], str(report)
    torch._dynamo.reset()
    records.clear()
    compiled = torch.compile(m, backend="sonic")
    for _ in range(3):
        got = compiled(x)
    # once, when Dynamo traced the frame, with the call's own arguments
    assert records == ["experts implementation None not set; using eager"]
    torch.testing.assert_close(got, m(x))
    assert trace_logging._depth == 0 and trace_logging._original is None


def test_other_backends_keep_the_graph_break(records):
    m = LoggingMoE()
    x = torch.randn(7, 16)
    torch.compile(m, backend="sonic")(x)  # sonic first in the same process: nothing may stay behind
    out = torch._dynamo.explain(m)(x)
    assert any("logging.Logger" in str(b.reason) for b in out.break_reasons), out.break_reasons


def test_a_call_on_tensors_still_breaks_the_graph(records):
    m = LoggingMoE(tensor_arg=True)
    x = torch.randn(7, 16)
    report = moe_inductor.explain(m, x)
    assert any("logging.Logger" in b.reason for b in report.graph_breaks), str(report)
    torch._dynamo.reset()
    records.clear()
    compiled = torch.compile(m, backend="sonic")
    got = compiled(x)
    torch.testing.assert_close(got, m(x))
    assert len(records) == 2 and records[0].startswith("largest routing weight")  # eager's call, then ours
