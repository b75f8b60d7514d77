"""Idiom: a Python loop over the experts (transformers 4.x Mixtral/Qwen2-MoE style; most
research code), unrolled by Dynamo into one block per expert::

    final = torch.zeros(T, d)
    expert_mask = one_hot(top_k_index, E).permute(2, 1, 0)      # or top_k_index == e
    for e in range(E):                                          # or over a ModuleList
        k_idx, tok = torch.where(expert_mask[e])
        y = experts[e](hidden[None, tok].reshape(-1, d)) * top_k_weights[tok, k_idx, None]
        final.index_add_(0, tok, y.to(hidden.dtype))          # anchor of one expert block

experts[e](z) = w2(act(w1(z)) * w3(z)) (gated) or w2(act(w1(z))), all bias-free linears; dropout that
is the identity (eval mode or p == 0) and casts to the same dtype may sit between them, dropout with
p > 0 in training is declined (random).

The mask may also be a binary routing mask that does not come from top-k (transformers 5.x Switch
Transformers, traced through ``moe_inductor/capture.py``): ``(one_hot(argmax(probs), E) *
capacity_mask).view(T, 1, E).permute(2, 1, 0)``. It is accepted only when the graph proves that each
(token, k) row holds at most one nonzero (``one_hot`` times a same-shape integer/bool tensor, reshaped
keeping the expert dimension); then the row's expert is the position of its nonzero and an all-zero row
(a token over expert capacity) becomes a dropped assignment (expert id -1: adds nothing, no score
gradient), exactly like ``torch.where`` never selecting it.

No pattern construct matches a variable number of repetitions, so one expert block is matched
per ``index_add_`` and the blocks are grouped by what they share: the accumulator, the tokens,
the top-k indices and weights. A group is rewritten only if (``can_rewrite``) its experts are
exactly 0..E-1 once each with E the mask's number of classes, every expert body is the same
supported MLP with weights of one shape, the accumulator starts as zeros of (T, d) and nothing
else touches it inside the loop, and the token/k roles of ``torch.where`` agree with how the
weights are indexed. Replacement: one ``fused_moe_experts`` call that takes the per-expert
parameters as lists (w1_e as gate, w3_e as up, w2_e as down): the op stacks them transiently and
keeps the parameters themselves for backward, so no weight-sized copy is kept. Under autocast it
computes in the autocast dtype, as the experts' Linears do.
"""
from __future__ import annotations

import operator
from collections import defaultdict

import torch
import torch.fx as fx
from torch._inductor.pattern_matcher import KeywordArg as KA, is_match

from moe_inductor.rewrite import (
    AnyOf, Declined, ExpertWeights, F, M, MoEBlock, call, method, dtype_of, eq_constant, gemm_name, getitem,
    int_value, is_mutation,
    match_or_decline as _match, nearest_upstream, need as _need, same, shape_of, size_asserts_of,
)
from .common import GATED_OF, unary_activation
from .mask_dispatch import _at_most_one_per_row, _check_expert_path, _skip_identities

IDIOM = "expert_loop"


_LINEAR = (torch._C._nn.linear, torch.nn.functional.linear)


def _linear(name_in: str, name_w: str):
    return AnyOf(F(_LINEAR[0], KA(name_in), KA(name_w)), F(_LINEAR[0], KA(name_in), KA(name_w), None),
                 F(_LINEAR[1], KA(name_in), KA(name_w)), F(_LINEAR[1], KA(name_in), KA(name_w), None))


def _index_add_pattern():
    return AnyOf(M("index_add_", KA("acc"), 0, KA("tok"), KA("src")),
                 M("index_add_", KA("acc"), 0, KA("tok"), source=KA("src")),
                 M("index_add_", KA("acc"), dim=0, index=KA("tok"), source=KA("src")))


def _weighted_pattern():
    w = AnyOf(getitem(KA("weights"), (KA("tok"), KA("kid"), None)),
              M("unsqueeze", getitem(KA("weights"), (KA("tok"), KA("kid"))), -1))
    return AnyOf(F(operator.mul, KA("expert_out"), w), F(operator.mul, w, KA("expert_out")))


def _gather_pattern():
    return AnyOf(M("reshape", getitem(KA("x"), (None, KA("tok"))), -1, KA("d")),
                 getitem(KA("x"), KA("tok")),
                 M("index_select", KA("x"), 0, KA("tok")),
                 F(torch.index_select, KA("x"), 0, KA("tok")))


def is_candidate(node: fx.Node) -> bool:
    return node.op == "call_method" and node.target == "index_add_"


def _expert_mlp(out: fx.Node, gathered: fx.Node):
    """(activation, w_gate_or_w1, w_up_or_None, w_down) of out = expert(gathered)."""
    down = _match(_linear("mid", "w_down"), _skip_identities(out), "expert down-projection (bias-free linear)")
    mid = _skip_identities(down["mid"])
    if mid.op == "call_function" and mid.target is operator.mul and len(mid.args) == 2:
        for a, b in (mid.args, mid.args[::-1]):
            name, inner = unary_activation(a) if isinstance(a, fx.Node) else (None, None)
            if name is None or not isinstance(b, fx.Node):
                continue
            g = _linear("z", "w_gate").match(inner)
            u = _linear("z", "w_up").match(_skip_identities(b))
            if is_match(g) and is_match(u) and g.kwargs["z"] is gathered and u.kwargs["z"] is gathered:
                _need(name in GATED_OF, f"gated activation {name} unsupported")
                return GATED_OF[name], g.kwargs["w_gate"], u.kwargs["w_up"], down["w_down"]
    name, inner = unary_activation(mid)
    _need(name is not None, "expert body is not a supported MLP (linear -> activation [* linear] -> linear)")
    one = _match(_linear("z", "w_in"), inner, "expert up-projection (bias-free linear)")
    _need(one["z"] is gathered, "expert MLP does not read the gathered tokens")
    return name, one["w_in"], None, down["w_down"]


def _binary_mask_rows(node: fx.Node):
    """E if ``node`` is a (T, K, E) routing mask whose rows (last dim) provably hold at most one
    nonzero: ``one_hot(i, E)``, optionally times a same-shape integer/bool tensor (a capacity mask),
    optionally reshaped keeping the last dim (Switch Transformers). Declines anything else."""
    src = node
    if node.op == "call_method" and node.target in ("view", "reshape") and isinstance(node.args[0], fx.Node):
        src = node.args[0]
        ns, ss = shape_of(node), shape_of(src)
        _need(ns is not None and ss is not None and same(ns[-1], ss[-1]),
              "routing mask reshaped across its expert dimension (rows not kept)")
    _need(_at_most_one_per_row(src), "routing mask is neither one_hot(top-k index) nor one_hot(...) times a "
                                     "mask of its shape (rows may hold several experts)")
    dt = dtype_of(src)
    # a float factor could turn 0 into nan (0 * inf), a nonzero that torch.where would select
    _need(dt is not None and not dt.is_floating_point and not dt.is_complex,
          f"routing mask has dtype {dt}: not provably zero outside the one-hot entry")
    ms = shape_of(node)
    _need(ms is not None and len(ms) == 3 and int_value(ms[-1]) is not None, "routing mask is not (T, K, E)")
    return int_value(ms[-1])


def _routing_roles(where_node: fx.Node):
    """Which torch.where output is the token index and which the k index, and the routing tensor
    behind the mask; returns (routing, expert number, E or None, {output: role}, kind): kind "index"
    for a top-k index tensor (T, K), "mask" for a (T, K, E) mask with at most one nonzero per row."""
    _need(where_node.op == "call_function" and where_node.target is torch.where and len(where_node.args) == 1,
          "token selection is not torch.where(mask)")
    mask = where_node.args[0]
    eq = eq_constant(mask)  # top_k_index == e, in whichever spelling this torch's Dynamo records
    if eq is not None:
        return eq[0], eq[1], None, {0: "token", 1: "k"}, "index"
    sel = _match(getitem(M("permute", KA("onehot"), KA("p0"), KA("p1"), KA("p2")), KA("e")), mask, "expert mask")
    perm = (sel["p0"], sel["p1"], sel["p2"])
    _need(sorted(perm) == [0, 1, 2] and perm[0] == 2, "expert mask is not one_hot(...).permute(2, ...)")
    roles = {i: ("token" if perm[1 + i] == 0 else "k") for i in range(2)}
    oh = AnyOf(F(torch._C._nn.one_hot, KA("topk"), num_classes=KA("E")),
               F(torch.nn.functional.one_hot, KA("topk"), num_classes=KA("E"))).match(sel["onehot"])
    if is_match(oh):
        return oh.kwargs["topk"], int_value(sel["e"]), int_value(oh.kwargs["E"]), roles, "index"
    # a binary routing mask that does not come from top-k (Switch Transformers: one_hot(argmax) times
    # the capacity mask): each (token, k) row's expert is the position of its nonzero, rows that are
    # all zero (dropped by capacity) are dropped assignments
    E = _binary_mask_rows(sel["onehot"])
    return sel["onehot"], int_value(sel["e"]), E, roles, "mask"


def analyse_one(node: fx.Node) -> dict:
    ia = _match(_index_add_pattern(), node, "index_add_ accumulation")
    src = ia["src"]
    if src.op == "call_method" and src.target == "to":
        src = src.args[0]
    w = _match(_weighted_pattern(), src, "routing-weight multiply")
    _need(w["tok"] is ia["tok"], "weights indexed with other tokens than accumulated")
    tok, kid = w["tok"], w["kid"]
    _need(tok.target is operator.getitem and kid.target is operator.getitem and tok.args[0] is kid.args[0],
          "token and k indices do not come from one torch.where")
    topk, e, E, roles, kind = _routing_roles(tok.args[0])
    _need(roles.get(tok.args[1]) == "token" and roles.get(kid.args[1]) == "k",
          "torch.where outputs are used with swapped token/k roles")
    _need(e is not None, "expert number is not a constant")
    # the expert body: find the gather feeding it
    out = w["expert_out"]
    # walk back through the linear chain to find the gathered input
    down = _match(_linear("mid", "w_down"), _skip_identities(out), "expert down-projection (bias-free linear)")
    gathered, g = nearest_upstream(down["mid"], _gather_pattern(), lambda kw: kw["tok"] is tok)
    x = g["x"] if g else None
    _need(gathered is not None, "expert input is not a gather of the selected tokens")
    # nothing random (dropout with p > 0 in training) or in place on the expert path
    _check_expert_path(ia["src"], gathered)
    act, wg, wu, wd = _expert_mlp(out, gathered)
    return dict(node=node, acc=ia["acc"], x=x, topk=topk, weights=w["weights"], e=e, E=E, act=act,
                wg=wg, wu=wu, wd=wd, where=tok.args[0], kind=kind)


def find_blocks(gm: fx.GraphModule):
    """Group the per-expert blocks of the graph into MoE blocks: yields MoEBlock or
    (where, idiom, reason) for groups that are declined."""
    groups = defaultdict(list)
    declined = []
    for node in gm.graph.nodes:
        if not is_candidate(node):
            continue
        try:
            info = analyse_one(node)
        except Declined as e:
            declined.append((node, str(e)))
            continue
        groups[(info["acc"], info["x"], info["topk"], info["weights"])].append(info)
    return groups, declined


def analyse_group(members: list) -> MoEBlock:
    first, last = members[0], members[-1]
    acc, x, topk, weights = first["acc"], first["x"], first["topk"], first["weights"]
    experts = sorted(m["e"] for m in members)
    E = first["E"] if first["E"] is not None else len(members)
    _need(all(m["E"] in (None, E) for m in members), "expert masks disagree on the number of experts")
    _need(experts == list(range(E)), f"loop covers experts {experts}, not exactly 0..{E - 1}")
    acts = {m["act"] for m in members}
    _need(len(acts) == 1, f"experts use different activations {sorted(acts)}")
    act = acts.pop()
    gated = act in GATED_OF.values()
    for key in ("wg", "wu", "wd"):
        if members[0][key] is None:
            continue
        shapes = {tuple(map(str, shape_of(m[key]) or ())) for m in members}
        _need(len(shapes) == 1, "experts have weights of different shapes")
    _need(len({m["wg"] for m in members}) == E and len({m["wd"] for m in members}) == E,
          "experts share weights: not an MoE (each iteration must use its own expert's weights)")
    # accumulator: zeros (T, d), written only by this loop
    _need(acc.op == "call_function" and acc.target in (torch.zeros, torch.zeros_like), "accumulator does not start as zeros")
    writes = [u for u in acc.users if is_mutation(u, acc)]
    nodes_in_group = {m["node"] for m in members}
    _need(set(writes) == nodes_in_group, "accumulator is modified by something other than the expert loop")
    order = {n: i for i, n in enumerate(acc.graph.nodes)}
    last_add = max(nodes_in_group, key=order.__getitem__)
    first_add = min(nodes_in_group, key=order.__getitem__)
    for u in acc.users:
        _need(u in nodes_in_group or order[u] > order[last_add], "accumulator is read inside the loop")
    kinds = {m["kind"] for m in members}
    _need(len(kinds) == 1, "experts are selected from different kinds of routing tensors")
    kind = kinds.pop()
    xs, accs, ts = shape_of(x), shape_of(acc), shape_of(topk)
    if kind == "mask" and ts is not None:
        _need(len(ts) == 3 and int_value(ts[2]) == E, "routing mask is not (T, K, E)")
        ts = ts[:2]
    _need(xs is not None and accs is not None and ts is not None and len(xs) == 2 and len(ts) == 2,
          "token or routing shapes unknown")
    _need(same(xs[0], ts[0]) and same(accs[0], xs[0]) and same(accs[1], xs[1]), "accumulator is not (T, d)")
    ws = shape_of(weights)
    _need(ws is not None and len(ws) == 2 and same(ws[0], ts[0]) and same(ws[1], ts[1]), "weights are not (T, K)")
    for m in members:
        for tensor in (x, topk, weights):
            for u in tensor.users:
                _need(not is_mutation(u, tensor), "routing or tokens are modified in place")
    K = int_value(ts[1])
    wd_shape = shape_of(first["wd"])
    by_e = {m["e"]: m for m in members}

    def build_weights(graph):
        # the per-expert Linear weights themselves: the fused op stacks them transiently
        return ExpertWeights(gate=[by_e[e]["wg"] for e in range(E)], down=[by_e[e]["wd"] for e in range(E)],
                             up=[by_e[e]["wu"] for e in range(E)] if gated else [])

    def token_ids(graph):
        t = method(graph, "size", x, 0, like=last_add)
        ar = call(graph, torch.arange, t, device=x.meta["example_value"].device, like=last_add)
        return method(graph, "repeat_interleave", ar, method(graph, "size", topk, 1, like=last_add), like=last_add)

    def replace(out):
        for u in list(acc.users):
            if u not in nodes_in_group and u is not out:
                u.replace_input_with(acc, out)

    # runtime asserts Dynamo added about the sizes of torch.where results die with the loop
    orphans = list(nodes_in_group) + size_asserts_of([m["where"] for m in members],
                                                     (operator.getitem, operator.ge, operator.le))

    def expert_ids(graph):
        if kind == "index":
            return method(graph, "reshape", topk, -1, like=last_add)
        # (T, K, E) mask, at most one nonzero per row: the expert is its position; an all-zero row
        # (a token dropped by expert capacity) is a dropped assignment, expert id -1
        nz = call(graph, operator.ne, topk, 0, like=last_add)
        pos = method(graph, "argmax", method(graph, "to", nz, torch.int32, like=last_add), -1, like=last_add)
        ids = call(graph, torch.where, method(graph, "any", nz, -1, like=last_add), pos, -1, like=last_add)
        return method(graph, "reshape", ids, -1, like=last_add)

    nxt = last_add.next
    return MoEBlock(
        idiom=IDIOM, anchor=last_add, x=x,
        token_ids=token_ids,
        expert_ids=expert_ids,
        scores=lambda graph: method(graph, "reshape", weights, -1, like=last_add),
        build_weights=build_weights, replace=replace, activation=act, interleaved=False,
        num_experts=E, top_k=K, hidden=int_value(xs[1]) if int_value(xs[1]) is not None else xs[1],
        intermediate=int_value(wd_shape[1]) if wd_shape and int_value(wd_shape[1]) is not None else None,
        dtype=dtype_of(x), insert_before=nxt, orphans=orphans, location=acc,
        autocast_like=gemm_name(_LINEAR[0]),  # the experts are nn.Linear calls
    )


def find(gm: fx.GraphModule):
    """Yield (anchor node, MoEBlock or decline reason) for every expert loop in the graph."""
    groups, declined = find_blocks(gm)
    seen_acc = set()
    for node, reason in declined:
        acc = node.args[0] if node.args else node
        if acc in seen_acc:
            continue
        seen_acc.add(acc)
        yield acc if isinstance(acc, fx.Node) else node, reason
    for members in groups.values():
        try:
            yield members[-1]["node"], analyse_group(members)
        except Declined as e:
            yield members[-1]["node"], str(e)
