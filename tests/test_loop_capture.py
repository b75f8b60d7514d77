"""Graph-breaking per-expert loops are traced as one loop over every expert under sonic
(``moe_inductor.dynamo.loop_capture``, applied by ``moe_inductor.dynamo.capture`` in sonic frames only): one graph,
output and every gradient equal to eager; loops whose body cannot be proved to do nothing for an
expert without tokens are left alone, with the reason. Modules: tests/loop_forms.py (hand-written
after the public code each names) and tiny transformers models (tests/hf_models.py)."""
import copy
import pickle

import pytest
import torch
from torch._dynamo.utils import counters

import loop_forms
from rewrite_check import CaptureGraphs
from moe_inductor.dynamo import capture, dynamo_scope, loop_capture

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


Graphs = CaptureGraphs  # tests/rewrite_check.py


def _compare(model, x, atol=1e-4):
    """Compile ``model`` with a sonic-marked backend; output and every parameter gradient equal to
    eager. An expert that received no token has a None gradient in eager and a zero one compiled
    (the captured loop runs it on zero rows). Returns the backend (its graphs)."""
    backend = Graphs()
    params = [p for p in model.parameters()]
    torch.manual_seed(3)
    ref = model(x)
    g = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, params, g, allow_unused=True)
    # inside a parent module, as in a model: the block's forward is looked up while Dynamo traces
    # the parent (test_compiled_block_itself covers compiling the block alone)
    out = torch.compile(torch.nn.Sequential(model), backend=backend)(x)
    grads = torch.autograd.grad(out, params, g, allow_unused=True)
    torch.testing.assert_close(out, ref, atol=atol, rtol=atol)
    for (name, _), a, b in zip(model.named_parameters(), grads, ref_grads):
        if b is None:
            assert a is None or torch.count_nonzero(a) == 0, name
            continue
        assert a is not None, name
        torch.testing.assert_close(a, b, atol=atol, rtol=atol, msg=lambda m: f"{name}: {m}")
    return backend


def _skewed_input(model, B=2, S=5, d=32, seed=0):
    """Input for which the last two experts receive no token (the case the skip exists for): a
    constant feature that the router weighs strongly against them."""
    torch.manual_seed(seed)
    with torch.no_grad():
        model.gate.weight[-2:, 0] = -5.0
    x = torch.randn(B, S, d)
    x[..., 0] = 5.0
    return x


# (module, text of the removed skip, MoE blocks the recognisers rewrite in the captured graph)
FORMS = [
    (loop_forms.HitLoopMoE, "for e in hit", 1),             # transformers 5.x eager experts, NLLB, DBRX
    (loop_forms.HitLoopPaddedMoE, "for e in hit", 1),       # E + 1 classes, padding expert skipped, stacked weights
    (loop_forms.HitLoopScalarMoE, "for e in hit", 1),       # Nemotron-H: 0-d rows, e = e.item(), E + 1 classes
    (loop_forms.BincountSkipMoE, "counts[i] == 0", 1),      # DeepSeek-V3 official inference, y[idx] += ...
    (loop_forms.ShapeSkipMoE, "top_x.shape[0] == 0", 1),    # transformers 4.36 Mixtral, tolist() indices
    (loop_forms.MaskAnyMoE, "flat_mask.any()", 1),          # makeMoE: (B, S) token masks, (B, S, d) += combine
    (loop_forms.NotAnyContinueMoE, "not mask.any()", 1),    # index_put_(accumulate=True)
    (loop_forms.NumelSkipMoE, "idx.numel() == 0", 1),       # vLLM reference: masked rows, weighted view-sum
    (loop_forms.ScatterAddHitMoE, "tolist()", 1),           # host-int hit list, scatter_add_
]


@pytest.mark.parametrize("cls,form,rewrites", FORMS, ids=[c.__name__ for c, _, _ in FORMS])
def test_form_is_one_graph_and_exact(cls, form, rewrites):
    torch.manual_seed(0)
    model = cls()
    x = _skewed_input(model)
    with torch.no_grad():
        used = set(model.route(x.view(-1, 32))[1].flatten().tolist())
    assert len(used) < model.num_experts  # some expert has no token: the skip matters
    notes = capture.notes_for(model)
    assert [n.rewritten for n in notes] == [True] and form in notes[0].form, notes
    with dynamo_scope.capture_fallbacks() as fallbacks:
        backend = _compare(model, x)
    assert len(backend.graphs) == 1 and not counters["graph_break"], dict(counters["graph_break"])
    assert not fallbacks
    assert counters["sonic"]["moe_rewrites"] == rewrites
    assert counters["sonic"]["moe_rewrites"] + counters["sonic"]["moe_declined"] == 1  # seen in the graph
    # the compiled module got the instance-level forward; the class kept its own
    assert isinstance(model.__dict__.get("forward"), capture.CapturableForward)
    assert type(model).forward is cls.forward


@pytest.mark.parametrize("cls", [loop_forms.HitLoopMoE, loop_forms.BincountSkipMoE])
def test_form_without_capture_graph_breaks(cls):
    # the same module under plain Dynamo settings and no capture: more than one graph (what the
    # capture is for); a module sonic never compiled is never given the rewritten forward
    torch.manual_seed(0)
    model = cls()
    graphs = []

    def plain(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    x = _skewed_input(model)
    torch.testing.assert_close(torch.compile(model, backend=plain)(x), model(x))
    assert len(graphs) > 1 or counters["graph_break"]
    assert "forward" not in model.__dict__


@pytest.mark.parametrize("cls,why", [
    (loop_forms.AppendsToListMoE, "`ran.append(e)`"),
    (loop_forms.ItemInBodyMoE, "reads a tensor on the host"),
    (loop_forms.UnrelatedSkipMoE, "does not prove that selection empty"),
    (loop_forms.SortedSplitMoE, "carries a value from one expert's iteration to the next"),
    (loop_forms.InPlaceOnViewMoE, "may share memory with one defined outside the loop"),
])
def test_near_miss_is_not_rewritten_and_says_why(cls, why):
    torch.manual_seed(0)
    model = cls()
    notes = [n for n in capture.notes_for(model) if "breaks the graph (data-dependent" in n.reason]
    assert len(notes) == 1 and not notes[0].rewritten and why in notes[0].reason, notes
    assert "line" in notes[0].reason and "breaks the graph" in notes[0].reason
    assert capture.prepare({"self": model}) == 0 and "forward" not in model.__dict__
    # compiles as before (graph breaks), same values
    x = _skewed_input(model)
    ref = model(x)
    torch.testing.assert_close(torch.compile(model, backend=Graphs())(x), ref)


def test_inductor_never_sees_the_rewritten_loop():
    # a module compiled with sonic keeps its instance forward; a fresh module of the same class,
    # compiled with plain Inductor in the same process, traces the original (and graph-breaks)
    torch.manual_seed(0)
    a, b = loop_forms.HitLoopMoE(), loop_forms.HitLoopMoE()
    x = _skewed_input(a)
    torch.compile(a, backend=Graphs())(x)
    assert isinstance(a.__dict__.get("forward"), capture.CapturableForward)
    torch._dynamo.reset()
    counters.clear()
    out = torch.compile(b, backend="inductor")(x)
    torch.testing.assert_close(out, b(x), atol=1e-5, rtol=1e-5)
    assert "forward" not in b.__dict__
    assert counters["stats"]["unique_graphs"] > 1 or counters["graph_break"]
    assert torch._dynamo.config.capture_dynamic_output_shape_ops is False


def test_compiled_block_itself():
    # torch.compile(block): the frame Dynamo starts on is the block's own (original) forward, created
    # before the block got its capturable forward. Dynamo's code for that frame is replaced by a
    # trampoline into the capturable forward (its own trace of the original, which graph-breaks at
    # the host counts, is thrown away): the first call already runs the captured loop, fused
    from moe_inductor.diagnostics.stats import capture_routing_stats

    torch.manual_seed(0)
    model = loop_forms.BincountSkipMoE()
    x = _skewed_input(model)
    backend = Graphs()
    compiled = torch.compile(model, backend=backend)
    with capture_routing_stats() as calls:
        torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)
    assert len(calls) == 1  # the fused op ran on the first call
    fused = [g for g in backend.graphs if "fused_moe" in g.code]
    assert len(fused) == 1
    seen = len(backend.graphs)
    for _ in range(2):
        with capture_routing_stats() as calls:
            torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)
        assert len(calls) == 1 and len(backend.graphs) == seen  # nothing compiled again
    # a second block of the class compiled on its own (the class forward's cache entry holds the
    # trampoline) is given its capturable forward and runs fused from its first call too
    other = loop_forms.BincountSkipMoE()
    with capture_routing_stats() as calls:
        torch.testing.assert_close(torch.compile(other, backend=backend)(x), other(x), atol=1e-5, rtol=1e-5)
    assert len(calls) == 1
    # the original forward untouched: a plain call of the class's method is eager
    assert type(model).forward(model, x).shape == x.shape


def test_compiled_block_whose_original_cannot_be_traced():
    # the original forward's trace fails as a whole (a data-dependent `if` inside the loop: Dynamo
    # cannot resume inside it), so there is no code to replace: that one call runs eagerly, and
    # from the next call on the capturable forward is traced (one graph, fused)
    from moe_inductor.diagnostics.stats import capture_routing_stats

    torch.manual_seed(0)
    model = loop_forms.MaskAnyMoE()
    x = _skewed_input(model)
    compiled = torch.compile(model, backend=Graphs())
    torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)
    with capture_routing_stats() as calls:
        torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)
    assert len(calls) == 1


def test_eager_runs_the_original_and_pickles():
    torch.manual_seed(0)
    model = loop_forms.HitLoopPaddedMoE()
    x = _skewed_input(model)
    original = type(model).forward
    ref = original(model, x)
    assert capture.prepare({"self": model}) == 1
    assert capture.prepare({"self": model}) == 0  # once per module
    assert model.forward.original is original
    assert torch.equal(model(x), ref)
    # eager gradients keep None for the experts with no token (the original loop runs)
    grads = torch.autograd.grad(model(x).sum(), [model.gate_up, model.down])
    assert all(g is not None for g in grads)
    clone = copy.deepcopy(model)
    assert clone.forward.module is clone and torch.equal(clone(x), ref)
    restored = pickle.loads(pickle.dumps(model))
    assert isinstance(restored.forward, capture.CapturableForward) and torch.equal(restored(x), ref)


def test_rewritten_source_runs_every_expert_under_a_static_check():
    src = loop_capture.analyse(loop_forms.HitLoopPaddedMoE.forward).replacement._sonic_source
    # range over the mask's experts; the original loop kept for masks of another rank
    assert "for _sonic_expert in range(hit.shape[0]):" in src
    assert "if hit.dim() == 1 and mask.dim() == 3:" in src and "for e in hit.nonzero():" in src
    # the padding expert (E + 1 classes) is past the end of the stacked weights: left out
    assert "_sonic_expert < len(self.gate_up)" in src and "_sonic_expert < len(self.down)" in src
    src = loop_capture.analyse(loop_forms.BincountSkipMoE.forward).replacement._sonic_source
    assert "tolist" not in src and "bincount" not in src and "counts" not in src


def test_closure_is_declined_with_a_note():
    scale = 2.0

    class ClosureMoE(loop_forms.HitLoopMoE):
        def forward(self, x):
            h = x.reshape(-1, x.shape[-1])
            weights, ids = self.route(h)
            out = torch.zeros_like(h)
            mask = torch.nn.functional.one_hot(ids, num_classes=self.num_experts).permute(2, 1, 0)
            for e in (mask.sum(dim=(-1, -2)) > 0).nonzero():
                slot, tok = torch.where(mask[e[0]])
                out.index_add_(0, tok, self.experts[e[0]](h[tok]) * weights[tok, slot, None] * scale)
            return out.view(x.shape)

    notes = capture.notes_for(ClosureMoE())
    assert len(notes) == 1 and "enclosing scope" in notes[0].reason


def test_explain_names_the_line_that_breaks_the_graph():
    import moe_inductor

    torch.manual_seed(0)
    model = loop_forms.AppendsToListMoE()
    report = moe_inductor.explain(model, _skewed_input(model), inductor=False)
    assert len(report.missed) == 1, str(report)
    entry = report.missed[0]
    assert "ran.append(e)" in entry.remedy and "set_experts_implementation" not in entry.remedy


# ---------------------------------------------------------------------- transformers families

def _hf_compare(family, experts_impl=None, atol=1e-4):
    """The tiny ``family`` model under a sonic-marked backend: one graph (no break in the MoE
    blocks), every MoE block seen by a recogniser (rewritten or declined, never left out of the
    graph), output and every gradient equal to eager. Returns (rewrites, blocks)."""
    hf_models = pytest.importorskip("hf_models")
    pytest.importorskip("transformers")
    model, ids = hf_models.build(family, experts_impl=experts_impl)
    blocks = hf_models.moe_modules(model)

    def first(out):
        return out[0] if isinstance(out, (tuple, list)) else getattr(out, "logits", None) \
            if getattr(out, "logits", None) is not None else out.last_hidden_state

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    ref = first(model(ids))
    g = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, [p for _, p in named], g, allow_unused=True)
    backend = Graphs()
    out = first(torch.compile(model, backend=backend)(ids))
    grads = torch.autograd.grad(out, [p for _, p in named], g, allow_unused=True)
    assert len(backend.graphs) == 1 and not counters["graph_break"], dict(counters["graph_break"])
    seen = counters["sonic"]["moe_rewrites"] + counters["sonic"]["moe_declined"]
    assert seen == len(blocks), dict(counters["sonic"])
    torch.testing.assert_close(out, ref, atol=atol, rtol=atol)
    for (name, _), a, b in zip(named, grads, ref_grads):
        if b is None:  # an expert without tokens: None in eager, zero (or None) compiled
            assert a is None or torch.count_nonzero(a) == 0, name
            continue
        assert a is not None, name
        torch.testing.assert_close(a, b, atol=atol, rtol=atol, msg=lambda m: f"{name}: {m}")
    return counters["sonic"]["moe_rewrites"], len(blocks)


def test_mixtral_eager_experts_one_graph_rewritten_and_exact():
    # transformers 5.x "eager" experts of the use_experts_implementation families (Mixtral here)
    rewrites, blocks = _hf_compare("mixtral", experts_impl="eager")
    assert rewrites == blocks == 2


@pytest.mark.slow
@pytest.mark.parametrize("family", [
    "dbrx",           # hit loop, one_hot over E + 1 classes, experts as views of flat weights
    "nllb_moe",       # hit loop over a ModuleDict, `expert_mask[expert_idx].squeeze(0)`, token dropout branch
    "longcat_flash",  # hit loop with `.item()`, `numel() == 0` skip, identity (zero-compute) experts
    "step3p7",        # hit loop, padding expert skipped, clamped SwiGLU
    "qwen3_moe",      # another decorated family with experts_impl="eager"
    "gpt_oss",        # "eager" experts: z @ P[e] + bias[e], clamped gate on interleaved columns
    "nemotron_h",     # its own "eager" experts: 1-D hit list, `e = e.item()`, one_hot over E + 1, relu^2
])
def test_family_one_graph_and_exact(family):
    hf_models = pytest.importorskip("hf_models")
    impl = "eager" if family in ("qwen3_moe", "gpt_oss", "nemotron_h") else None
    rewrites, blocks = _hf_compare(family, experts_impl=impl)
    assert rewrites == blocks == (1 if family == "nemotron_h" else 2)


def test_host_read_outside_a_loop_is_named():
    # DeepSeek-MoE's counts read with .cpu().numpy() before its loop, JetMoE's router .tolist():
    # the line and the call are in the notes (what explain shows)
    notes = capture.notes_for(loop_forms.SortedSplitMoE())
    assert any("`.numpy()`" in n.reason and "tokens_per_expert" in n.reason for n in notes), notes
    hf_models = pytest.importorskip("hf_models")
    pytest.importorskip("transformers")
    model, _ = hf_models.build("jetmoe")
    notes = capture.notes_for(model)
    assert any("expert_size = expert_size.tolist()" in n.reason and "JetMoeTopKGating" in n.function
               for n in notes), notes


class HelperMethodMoE(loop_forms.HitLoopPaddedMoE):
    """The skipping loop in a method the forward calls (``self.run_experts(...)``; DeepSeek's
    ``moe_infer``, many research codebases), optionally decorated ``@torch.no_grad()`` as DeepSeek's
    inference branch is: the method gets the capturable instance attribute, as ``forward`` does."""

    def forward(self, x):
        shape = x.shape
        h = x.reshape(-1, shape[-1])
        weights, ids = self.route(h)
        return self.run_experts(h, weights, ids).view(shape)

    def run_experts(self, h, weights, ids):
        out = torch.zeros_like(h)
        for e in range(self.num_experts):
            tok, slot = torch.where(ids == e)
            if tok.numel() == 0:
                continue
            gate, up = torch.nn.functional.linear(h[tok], self.gate_up[e]).chunk(2, dim=-1)
            y = torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, self.down[e])
            out.index_add_(0, tok, y * weights[tok, slot, None])
        return out


def test_loop_in_a_method_the_forward_calls():
    torch.manual_seed(0)
    model = HelperMethodMoE()
    backend = _compare(model, torch.randn(2, 5, 32))
    assert len(backend.graphs) == 1  # one graph: the skip in the method is gone under Dynamo
    assert isinstance(model.__dict__.get("run_experts"), capture.CapturableForward)
    notes = [n for n in capture.notes_for(model) if n.rewritten]
    assert any("run_experts" in n.function for n in notes), notes
    # eager code of the module is untouched: the instance method runs the class's own loop
    restored = pickle.loads(pickle.dumps(model))
    assert isinstance(restored.run_experts, capture.CapturableForward)


def run_experts_of(h, weights, ids, gate_up, down):
    """A module-level function holding the skipping loop (vLLM's reference ``torch_experts`` form):
    reached from a module's forward by its global name."""
    out = torch.zeros_like(h)
    for e in range(gate_up.shape[0]):
        tok, slot = torch.where(ids == e)
        if tok.numel() == 0:
            continue
        gate, up = torch.nn.functional.linear(h[tok], gate_up[e]).chunk(2, dim=-1)
        y = torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, down[e])
        out.index_add_(0, tok, y * weights[tok, slot, None])
    return out


def routed_experts(h, weights, ids, gate_up, down):
    return run_experts_of(h, weights, ids, gate_up, down)  # one more level, as torch_moe -> torch_experts


class FunctionCallMoE(loop_forms.HitLoopPaddedMoE):
    def forward(self, x):
        shape = x.shape
        h = x.reshape(-1, shape[-1])
        weights, ids = self.route(h)
        return routed_experts(h, weights, ids, self.gate_up, self.down).view(shape)


def test_loop_in_a_module_level_function():
    torch.manual_seed(0)
    model = FunctionCallMoE()
    backend = _compare(model, torch.randn(2, 5, 32))
    assert len(backend.graphs) == 1 and "fused_moe" in backend.graphs[0].code
    notes = [n for n in capture.notes_for(model) if n.rewritten]
    assert {n.function for n in notes} >= {"run_experts_of", "routed_experts", "FunctionCallMoE.forward"}, notes
    # the user's globals are untouched: the module-level functions are the originals
    assert globals()["run_experts_of"].__code__.co_filename == __file__
    assert "_sonic_callee_run_experts_of" not in globals()
