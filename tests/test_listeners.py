"""One listener mechanism (issue 19): routing statistics, compile reports and fallbacks all reach
whoever listens through ``moe_inductor.diagnostics.listeners``, and no other module keeps listener lists."""
import ast
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.fx as fx

from moe_inductor.dynamo import dynamo_scope
from moe_inductor.diagnostics import listeners, report, stats
from moe_inductor.ops.op import fused_moe

from test_op import make


def _route():
    x, tok, ex, s, w1, w2, _, _ = make(8, 8, 4, 4, 2)
    fused_moe(x, tok, ex, s, w1, w2, impl="torch")
    return ex


def test_one_registry_receives_statistics_reports_and_fallbacks(caplog):
    gm = fx.symbolic_trace(torch.nn.Linear(2, 2))
    with listeners.listen(listeners.ROUTING) as routing, listeners.listen(listeners.REPORTS) as reports, \
            listeners.listen(listeners.FALLBACKS) as fallbacks, stats.capture_routing_stats() as routing_too, \
            report.capture_reports() as reports_too, dynamo_scope.capture_fallbacks() as fallbacks_too:
        ex = _route()
        rep = report.CompileReport()
        report.record_report(rep, gm)
        fb = dynamo_scope.Fallback("without rewrite", "graph_1", "TestError: nothing")
        dynamo_scope.record(fb)
    assert len(routing) == 1 and isinstance(routing[0], stats.RoutingStats)
    assert routing[0].counts == torch.bincount(ex.long(), minlength=4).tolist()
    assert reports == [rep] and fallbacks == [fb]
    # the public capture_* helpers are the same mechanism
    assert routing_too == routing and reports_too == reports and fallbacks_too == fallbacks
    # nobody listening: nothing is kept, and the op skips the statistics
    assert not listeners.active(listeners.ROUTING)
    _route()
    assert len(routing) == 1


def test_nested_listeners_each_get_everything():
    """An inner block that ends leaves the outer one listening (the old lists were removed by
    equality, so an inner empty list's exit unregistered the outer empty one)."""
    with listeners.listen(listeners.ROUTING) as outer:
        with listeners.listen(listeners.ROUTING) as inner:
            pass
        _route()
        with stats.capture_routing_stats() as second:
            _route()
    assert inner == [] and len(outer) == 2 and len(second) == 1


def test_unknown_channel_is_an_error():
    with pytest.raises(ValueError, match="unknown channel 'report'"):
        with listeners.listen("report"):
            pass
    with pytest.raises(ValueError, match="unknown channel"):
        listeners.publish("nope", 1)


def test_no_other_listener_lists():
    """No module of the package other than listeners.py keeps a module-level listener list."""
    root = Path(list(importlib.util.find_spec("moe_inductor").submodule_search_locations)[0])
    offenders = []
    for path in root.rglob("*.py"):
        if path.name == "listeners.py" or "patterns" in path.relative_to(root).parts:
            continue
        for node in ast.parse(path.read_text()).body:
            targets = node.targets if isinstance(node, ast.Assign) else \
                [node.target] if isinstance(node, ast.AnnAssign) else []
            for t in targets:
                if isinstance(t, ast.Name) and "listener" in t.id.lower():
                    offenders.append(f"{path.name}: {t.id}")
    assert not offenders, offenders
