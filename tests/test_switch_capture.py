"""transformers 5.x Switch Transformers: the experts loop over the data-dependent ``expert_hit`` is
traced as a loop over ``range(num_experts)`` (``moe_inductor.dynamo.capture`` / ``loop_capture``, from the
code, no per-class list), so the whole MoE block is one graph and the ``expert_loop`` idiom rewrites it (routing from the one-hot x capacity mask,
tokens over capacity as dropped assignments). Exact vs eager, logits and every gradient."""
import pytest
import torch
from torch._dynamo.utils import counters

pytest.importorskip("transformers")
import hf_models  # noqa: E402
import moe_inductor  # noqa: E402
from moe_inductor.dynamo import capture  # noqa: E402
from test_hf_models import close  # noqa: E402
from test_mask_dispatch import no_dropout  # noqa: E402

def _switch(capacity=None):
    model, ids = hf_models.build("switch_transformers")
    no_dropout(model)  # run_and_compare trains: attention/ff dropout would make eager random
    blocks = hf_models.moe_modules(model)
    if capacity is not None:
        for _, b in blocks:
            b.router.expert_capacity = capacity
    return model, ids, blocks


def run_and_compare(model, ids, expected_rewrites, atol=1e-4, rtol=1e-4):
    """test_hf_models.run_and_compare, except for one documented difference: an expert that receives
    no token gets None as gradient in eager (the expert_hit loop skips it) and an exact zero gradient
    compiled (the captured loop runs it on zero rows). Returns the names of those parameters."""
    torch._dynamo.reset()
    counters.clear()
    model.train()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    ref = model(ids)[0]
    g = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, params, g, allow_unused=True)
    out = torch.compile(model, backend="sonic")(ids)[0]
    grads = torch.autograd.grad(out, params, g, allow_unused=True)
    assert counters["sonic"]["moe_rewrites"] == expected_rewrites
    close(out, ref, atol, rtol, "logits")
    unused = []
    for (name, _), a, b in zip(named, grads, ref_grads):
        if b is None and a is not None and ".experts.expert_" in name:
            assert torch.count_nonzero(a) == 0, name
            unused.append(name)
            continue
        if a is None or b is None:
            assert a is None and b is None, name
            continue
        close(a, b, atol, rtol, name)
    return unused


def test_substitution_scoped_to_the_modules_sonic_compiles():
    # importing the backend changes no class; compiling with sonic gives the compiled model's
    # experts modules (only) an instance-level forward; the class keeps its own
    from transformers.models.switch_transformers import modeling_switch_transformers as m

    import moe_inductor.compile.backend  # noqa: F401

    original = m.SwitchTransformersExperts.forward
    model, ids, blocks = _switch()
    other, _, other_blocks = _switch()
    assert all("forward" not in b.experts.__dict__ for _, b in blocks)
    torch._dynamo.reset()
    torch.compile(model, backend="eager")(ids)  # another backend: nothing given
    assert all("forward" not in b.experts.__dict__ for _, b in blocks)
    moe_inductor.explain(model, ids, inductor=False)  # sonic's frames (without Inductor's codegen)
    assert m.SwitchTransformersExperts.forward is original
    assert all(isinstance(b.experts.__dict__.get("forward"), capture.CapturableForward) for _, b in blocks)
    assert all("forward" not in b.experts.__dict__ for _, b in other_blocks)


@pytest.mark.parametrize("capacity", [
    None,  # the config's capacity (64): no token dropped
    1,     # one token per expert and sequence: the others are dropped (expert id -1)
])
def test_switch_5x_every_block_rewritten_and_exact(capacity):
    model, ids, blocks = _switch(capacity)
    routed, hooks = [], []
    for _, b in blocks:
        hooks.append(b.router.register_forward_hook(lambda m, i, o: routed.append(int(o[0].sum()))))
    model(ids)
    for h in hooks:
        h.remove()
    assert (min(routed) < ids.numel()) == (capacity == 1)  # tokens were (not) dropped
    run_and_compare(model, ids, len(blocks))
    assert counters["sonic"]["moe_declined"] == 0
    report = moe_inductor.explain(model, ids, inductor=False)
    assert len(report.rewritten) == len(blocks) and not report.declined and not report.missed, str(report)
    assert {e.idiom for e in report.rewritten} == {"expert_loop"}


def test_switch_5x_expert_dropout_in_training_declined():
    model, ids, blocks = _switch()
    for _, b in blocks:
        for m in b.experts.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.1
    model.train()
    report = moe_inductor.explain(model, ids, inductor=False)
    assert not report.rewritten and len(report.declined) == len(blocks), str(report)
    # the part recognisers decline the expert body with dropout between the projections as "not a
    # supported MLP" (the dropout-specific reason is given for dropout on the expert's output)
    assert all("dropout with p > 0 in training" in e.reason or "not a supported MLP" in e.reason
               for e in report.declined), str(report)


def test_eager_unchanged():
    # eager runs the original transformers code: same values as calling it directly, and the
    # same gradients, including None for experts that received no token
    model, ids, blocks = _switch(capacity=1)
    experts = blocks[0][1].experts
    assert capture.prepare({"self": model}) == len(blocks)
    assert capture.prepare({"self": model}) == 0  # once per module
    torch.manual_seed(0)
    T, d, E = 16, experts.expert_0.wi.in_features, experts.num_experts
    x = torch.randn(T, d)
    sel = torch.nn.functional.one_hot(torch.tensor([0, 1] * 8), E).view(T, 1, E)  # experts >= 2 unused
    w = torch.rand(T, 1)
    original = type(experts).forward
    assert experts.forward.original is original
    a = experts(x, sel, w)
    b = original(experts, x, sel, w)
    assert torch.equal(a, b)
    params = list(experts.parameters())
    ga = torch.autograd.grad(experts(x, sel, w).sum(), params, allow_unused=True)
    gb = torch.autograd.grad(original(experts, x, sel, w).sum(), params, allow_unused=True)
    assert [g is None for g in ga] == [g is None for g in gb] and any(g is None for g in ga)
    for g, h in zip(ga, gb):
        assert g is None or torch.equal(g, h)
    # the instance-level forward survives copy.deepcopy (bound to the copy) and pickling
    import copy
    import pickle

    clone = copy.deepcopy(experts)
    assert clone.forward.module is clone and torch.equal(clone(x, sel, w), a)
    assert torch.equal(pickle.loads(pickle.dumps(experts))(x, sel, w), a)


def test_decided_by_the_code_not_by_the_class():
    # no per-class list: a class of another name and module with the same loop is traced the same
    # way, and the Switch loop with a side effect added (a print) is left as it is
    import textwrap

    from transformers.models.switch_transformers import modeling_switch_transformers as m

    import linecache

    def define(source, filename):
        # the source must be readable back (inspect.getsource), as for any function of a file
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        exec(compile(source, filename, "exec"), namespace)

    src = textwrap.dedent(__import__("inspect").getsource(m.SwitchTransformersExperts.forward))
    namespace = {"torch": torch}
    define(src, "<renamed>")
    renamed = type("MyExperts", (torch.nn.ModuleDict,), {"forward": namespace["forward"], "__module__": __name__})
    assert capture.replacement_for(renamed) is not None
    noisy_src = src.replace("final_hidden_states.index_add_(", "print(expert_idx); final_hidden_states.index_add_(")
    define(noisy_src, "<noisy>")
    noisy = type("NoisyExperts", (torch.nn.ModuleDict,), {"forward": namespace["forward"], "__module__": __name__})
    assert capture.replacement_for(noisy) is None
    assert capture.prepare({"self": noisy()}) == 0
