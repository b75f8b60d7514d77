"""Per-expert GEMMs on rows split by host copies of the per-expert counts, traced on the device.

Shape legend: E experts, A rows grouped by expert (expert 0's rows first), ``in``/``out`` the
GEMM's sizes; ``counts`` (E,) integer, ``offsets = cumsum(counts)`` int32.

The form (JetMoE's router and ``JetMoeParallelExperts``, ScatterMoE-style code)::

    sizes = counts.tolist()                       # host copy of the per-expert counts
    chunks = rows.split(sizes, dim=0)             # rows grouped by expert, in expert order
    out = torch.cat([F.linear(chunks[i], W[i]) for i in range(E)], dim=0)

Without help Dynamo breaks the graph at ``.tolist()``. In the frames sonic compiles whose modules
hold such a split (``moe_inductor.dynamo.capture.wants_host_counts``), Dynamo runs with
``capture_scalar_outputs`` (scoped by ``moe_inductor.dynamo.dynamo_scope``): the counts become unbacked
symbolic sizes ``u0 .. u{E-1}`` (``counts[i].item()``) and the block is one graph. ``rewrite``
then replaces, in that graph, each such split/linear/cat by one grouped GEMM that reads the counts
on the device::

    out = torch.ops.moe_inductor.grouped_mm(rows, W.transpose(-2, -1), offs=cumsum(counts, 0, dtype=int32))

Proof, per split (else the graph is left as Dynamo traced it, one graph with host reads):

- the split sizes are ``counts[0].item(), ..., counts[E-1].item()`` of one 1-D tensor with exactly
  E elements, in order (so chunk i is rows ``[offsets[i-1], offsets[i])``);
- the split is over dimension 0 of 2-D rows, every chunk i is used once, by ``F.linear(chunk_i,
  W[i])`` with no bias and the same 3-D W, and the E products are used only by one ``torch.cat``
  over dimension 0, in chunk order.

Then ``grouped_mm`` computes row by row what the cat holds, whatever the rows are (it follows the
offsets, as the split did). The host copy itself goes only when its values are used for nothing
but such splits and the shape checks Dynamo recorded for them (``u_i >= 0``, ``sum(u) == A``);
those checks are kept as one device-side ``torch._assert_async`` (no host copy). That the rows
really are grouped by the experts counted (a sort of the same ids) is what the MoE composition
proves before it replaces the block by the fused op (``patterns/assignment_rows.py``); this step
alone changes no value.

The same split with one ModuleList expert module per chunk (DeepSeek-V2/V3 ``moe_infer`` once
``loop_capture`` has rewritten its segment loop: ``torch.cat([experts[i](chunks[i]) for i ...])``)
is rewritten when every expert is the same MLP (``patterns.experts.mlp``: the same nodes in the same
order, ``F.linear`` projections, weights of one shape per role) reading only its chunk and its
weights, nothing else reading its intermediates: expert 0's nodes are emitted once on all the rows
with each projection a ``grouped_mm`` on the experts' weights stacked (``torch.stack``, so gradients
reach every expert's own parameter). Biased projections (rxlm's ``FeedForward``: ``nn.Linear`` with
bias) are accepted when every expert has the bias on the same projections (equal signatures), each
bias is the one the expert description gives that projection (``ExpertMLP.b_*``), read by nothing
else in the expert, shaped (out,) in its weight's dtype: the biases are stacked too and ``grouped_mm(..., bias=)``
adds ``bias[e]`` to the rows of group e, which is the chunk's own ``F.linear(chunk, W_e, b_e)``.
Exact: each projection is the per-expert ``F.linear`` of the chunk (grouped_mm runs exactly that),
and everything else in the MLP works row by row (activations, products, same-dtype casts, ``chunk``
of columns), so on the concatenated rows it gives the concatenation of the per-chunk results. The
result is the form ``patterns/assignment_rows`` recognises as grouped experts on offsets (a bias in
the grouped GEMM follows the GEMM's own grouping, so no ids index it).

``moe_inductor::grouped_mm`` has ``torch._grouped_mm``'s calling convention (b is (E, in, out), offs
the int32 end offsets, rows past ``offs[-1]`` are zero; an optional per-expert ``bias`` (E, out))
without its dtype and alignment limits
(``torch._grouped_mm`` in fp32 does not compile on CPU and asks for 16-byte aligned strides): its
implementation is the per-expert ``F.linear`` loop of the original code (bitwise the same values),
with a backward of the same loops.
"""
from __future__ import annotations

import logging
import operator
from typing import Optional

import torch
import torch.fx as fx

from moe_inductor.fx.targets import LINEAR_FUNCTIONS

log = logging.getLogger("moe_inductor")


# --------------------------------------------------------------------------- the grouped GEMM op

def _check(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, bias: Optional[torch.Tensor] = None) -> None:
    torch._check(a.dim() == 2, lambda: f"grouped_mm: rows must be 2-D, got {tuple(a.shape)}")
    torch._check(b.dim() == 3, lambda: f"grouped_mm: weights must be (E, in, out), got {tuple(b.shape)}")
    torch._check(offs.dim() == 1 and offs.shape[0] == b.shape[0],
                 lambda: f"grouped_mm: offs must be ({b.shape[0]},), got {tuple(offs.shape)}")
    torch._check(a.shape[1] == b.shape[1], lambda: f"grouped_mm: rows have {a.shape[1]} columns, weights {b.shape[1]}")
    torch._check(a.dtype == b.dtype, lambda: f"grouped_mm: rows are {a.dtype}, weights {b.dtype}")
    if bias is not None:
        torch._check(bias.dim() == 2 and bias.shape[0] == b.shape[0] and bias.shape[1] == b.shape[2],
                     lambda: f"grouped_mm: bias must be ({b.shape[0]}, {b.shape[2]}), got {tuple(bias.shape)}")
        torch._check(bias.dtype == a.dtype, lambda: f"grouped_mm: rows are {a.dtype}, bias {bias.dtype}")


def _groups(offs: torch.Tensor):
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end < start:
            raise ValueError(f"grouped_mm: offsets must be non-decreasing, got {offs.tolist()}")
        yield e, start, end
        start = end


@torch.library.custom_op("moe_inductor::grouped_mm", mutates_args=())
def grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """out[r] = a[r] @ b[e] (+ bias[e]) for r in [offs[e-1], offs[e]) (offs[-1] = 0); rows past offs[-1] are
    zero. a (A, in), b (E, in, out), offs (E,) int32, bias (E, out) or None; out (A, out) in a's dtype."""
    _check(a, b, offs, bias)
    out = a.new_zeros(a.shape[0], b.shape[2])
    for e, start, end in _groups(offs):
        if end > start:
            # the expert's own F.linear on its chunk (with its bias), as the split/cat code computed it
            out[start:end] = torch.nn.functional.linear(a[start:end], b[e].transpose(0, 1),
                                                        None if bias is None else bias[e])
    return out


@grouped_mm.register_fake
def _(a, b, offs, bias=None):
    _check(a, b, offs, bias)
    return a.new_empty(a.shape[0], b.shape[2])


@torch.library.custom_op("moe_inductor::grouped_mm_weight_grad", mutates_args=())
def grouped_mm_weight_grad(a: torch.Tensor, grad: torch.Tensor, offs: torch.Tensor, experts: int) -> torch.Tensor:
    """d out / d b: (E, in, out) with grad_b[e] = a[rows of e]^T @ grad[rows of e]."""
    out = a.new_zeros(experts, a.shape[1], grad.shape[1])
    for e, start, end in _groups(offs):
        if end > start:
            out[e] = a[start:end].transpose(0, 1) @ grad[start:end]
    return out


@grouped_mm_weight_grad.register_fake
def _(a, grad, offs, experts):
    return a.new_empty(experts, a.shape[1], grad.shape[1])


@torch.library.custom_op("moe_inductor::grouped_bias_grad", mutates_args=())
def grouped_bias_grad(grad: torch.Tensor, offs: torch.Tensor, experts: int) -> torch.Tensor:
    """d out / d bias: (E, out) with grad_bias[e] = grad[rows of e].sum(0) (what F.linear's bias gets)."""
    out = grad.new_zeros(experts, grad.shape[1])
    for e, start, end in _groups(offs):
        if end > start:
            out[e] = grad[start:end].sum(0)
    return out


@grouped_bias_grad.register_fake
def _(grad, offs, experts):
    return grad.new_empty(experts, grad.shape[1])


def _setup(ctx, inputs, output):
    a, b, offs, bias = inputs
    ctx.save_for_backward(a, b, offs)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad):
    a, b, offs = ctx.saved_tensors
    grad = grad.contiguous()
    grad_a = grad_b = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_a = torch.ops.moe_inductor.grouped_mm(grad, b.transpose(-2, -1), offs)
    if ctx.needs_input_grad[1]:
        grad_b = torch.ops.moe_inductor.grouped_mm_weight_grad(a, grad, offs, b.shape[0])
    if ctx.bias_dtype is not None and ctx.needs_input_grad[3]:
        grad_bias = torch.ops.moe_inductor.grouped_bias_grad(grad, offs, b.shape[0]).to(ctx.bias_dtype)
    return grad_a, grad_b, None, grad_bias


grouped_mm.register_autograd(_backward, setup_context=_setup)


def _autocast_library():
    # under autocast the per-expert F.linear calls this op replaces cast rows, weights and bias to the
    # autocast dtype: so does the op (its Autocast kernels, moe_inductor.ops.op.register_gemm_autocast)
    from moe_inductor.ops.op import register_gemm_autocast

    return register_gemm_autocast("moe_inductor::grouped_mm", ("a", "b", "bias"))


_AUTOCAST_LIB = _autocast_library()


# --------------------------------------------------------------------------- the graph rewrite

def _is_item_of(node, counts: Optional[fx.Node], i: int) -> Optional[fx.Node]:
    """counts of ``counts[i].item()`` (``counts`` None: any tensor), else None."""
    if not (isinstance(node, fx.Node) and node.op == "call_method" and node.target == "item" and len(node.args) == 1):
        return None
    g = node.args[0]
    if not (isinstance(g, fx.Node) and g.op == "call_function" and g.target is operator.getitem
            and isinstance(g.args[0], fx.Node) and g.args[1] == i and type(g.args[1]) is int):
        return None
    return g.args[0] if counts is None or g.args[0] is counts else None


def _split_parts(node) -> Optional[tuple]:
    """(rows, [sizes], dim) of ``rows.split(sizes, dim)`` / ``torch.split`` / ``split_with_sizes``."""
    if node.op == "call_method" and node.target in ("split", "split_with_sizes"):
        pass
    elif node.op == "call_function" and node.target in (torch.split, torch.functional.split):
        pass
    else:
        return None
    args = list(node.args)
    rows = args[0] if args else None
    sizes = args[1] if len(args) > 1 else node.kwargs.get("split_size_or_sections", node.kwargs.get("split_sizes"))
    dim = args[2] if len(args) > 2 else node.kwargs.get("dim", 0)
    if not isinstance(rows, fx.Node) or not isinstance(sizes, (list, tuple)) or not sizes:
        return None
    return rows, list(sizes), dim


def _linear_of(node) -> Optional[tuple]:
    """(input, weight) of ``F.linear(input, weight)`` with no bias."""
    parts = _linear_parts(node)
    return parts[:2] if parts is not None and parts[2] is None else None


def _linear_parts(node) -> Optional[tuple]:
    """(input, weight, bias or None) of ``F.linear(input, weight[, bias])`` with node operands."""
    if node.op != "call_function" or node.target not in LINEAR_FUNCTIONS:
        return None
    args = list(node.args) + [None] * (3 - len(node.args))
    bias = node.kwargs.get("bias", args[2])
    inp, weight = node.kwargs.get("input", args[0]), node.kwargs.get("weight", args[1])
    if not all(isinstance(v, fx.Node) for v in (inp, weight)) or not (bias is None or isinstance(bias, fx.Node)):
        return None
    return inp, weight, bias


def _split_by_counts(split: fx.Node, shape_of) -> object:
    """(counts, rows, E, {i: chunk i}) of a split of 2-D rows over dimension 0 by the host counts
    ``counts[0].item() .. counts[E-1].item()`` of one unwritten 1-D tensor with E entries, each chunk
    used one by one; a reason string; or None when the split is not by host counts at all."""
    from moe_inductor.fx.safety import writes_to

    parts = _split_parts(split)
    if parts is None:
        return None
    rows, sizes, dim = parts
    counts = _is_item_of(sizes[0], None, 0)
    if counts is None:
        return None  # not split by host counts: nothing of ours
    E = len(sizes)
    if any(_is_item_of(s, counts, i) is None for i, s in enumerate(sizes)):
        return f"{split.name}: the split sizes are not counts[0].item() .. counts[{E - 1}].item() of one tensor in order"
    cs, xs = shape_of(counts), shape_of(rows)
    if cs is None or len(cs) != 1 or cs[0] != E:
        return f"{split.name}: the split uses {E} of the counts {counts.name} (shape {cs}), not all of them"
    if xs is None or len(xs) != 2 or dim not in (0, -2):
        return f"{split.name}: not a split of 2-D rows over dimension 0"
    for value in (counts, rows):  # the grouped GEMM reads both later than the split and the host copy did
        w = writes_to(value)
        if w:
            return f"{w[0].name} writes into {value.name} in place: the split and a grouped GEMM could read other values"
    chunks: dict = {}
    for u in split.users:
        if not (u.op == "call_function" and u.target is operator.getitem and type(u.args[1]) is int
                and 0 <= u.args[1] < E and u.args[1] not in chunks):
            return f"{split.name}: the chunks are used other than one by one ({u.name})"
        chunks[u.args[1]] = u
    if len(chunks) != E:
        return f"{split.name}: only {len(chunks)} of the {E} chunks are used"
    return counts, rows, E, chunks


def _match(split: fx.Node, shape_of) -> tuple:
    """(counts, rows, W, cat, erasable nodes) or a reason string."""
    found = _split_by_counts(split, shape_of)
    if not isinstance(found, tuple):
        return found
    counts, rows, E, chunks = found
    W = cat = None
    erase = []
    outs = []
    for i in range(E):
        c = chunks[i]
        if len(c.users) != 1:
            return f"{c.name}: chunk {i} has {len(c.users)} users, not one GEMM"
        lin = next(iter(c.users))
        got = _linear_of(lin)
        if got is None or got[0] is not c:
            return f"{lin.name}: chunk {i} is not used by F.linear(chunk, W[{i}]) without bias"
        w = got[1]
        if not (w.op == "call_function" and w.target is operator.getitem and w.args[1] == i
                and type(w.args[1]) is int and isinstance(w.args[0], fx.Node)):
            return f"{lin.name}: chunk {i}'s weight {w.name} is not W[{i}] of one stacked weight"
        if W is None:
            W = w.args[0]
        if w.args[0] is not W:
            return f"{lin.name}: chunk {i} uses another stacked weight ({w.args[0].name}, not {W.name})"
        if len(lin.users) != 1:
            return f"{lin.name}: expert {i}'s output has other users than the concatenation"
        user = next(iter(lin.users))
        if cat is None:
            cat = user
        if user is not cat:
            return f"{lin.name}: expert outputs go to different nodes"
        outs.append(lin)
        erase += [lin, c] + ([w] if len(w.users) == 1 else [])
    ws = shape_of(W)
    if ws is None or len(ws) != 3 or ws[0] != E:
        return f"{W.name}: the stacked weight is not (E={E}, out, in)"
    if not (cat.op == "call_function" and cat.target is torch.cat and len(cat.args) >= 1
            and list(cat.args[0]) == outs and (cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)) in (0, -2)):
        return f"{cat.name}: the expert outputs are not concatenated over dimension 0 in expert order"
    return counts, rows, W, cat, erase + [split]


# --------------------------------------------------------------------------- per-expert MLP modules

def _expert_nodes(out: fx.Node, leaves: set) -> Optional[list]:
    """The nodes computing ``out`` from ``leaves`` (its chunk, the side chunks, its weights, the split
    sizes), in graph order, ``out`` last; ``get_attr`` nodes (autograd.Function bodies) are followed
    but not listed. None if ``out`` reads any other node."""
    seen, stack = set(), [out]
    while stack:
        n = stack.pop()
        if n in seen or n in leaves:
            continue
        if n.op == "get_attr":
            continue
        if n.op not in ("call_function", "call_method"):
            return None
        seen.add(n)
        stack.extend(n.all_input_nodes)
    order = {n: i for i, n in enumerate(out.graph.nodes)}
    return sorted(seen, key=order.__getitem__)


def _kind(n: fx.Node) -> tuple:
    """How the grouped form treats an expert node: ("linear", x, w, b) for ``F.linear`` or an
    autograd.Function proven to be it (``safety.linear_function_operands``: Megatron-Core's parallel
    linears), ("identity", x) for a Function proven to be the identity (its tensor-parallel regions at
    size 1), ("call",) for the ``autograd_function_apply`` call under one of those, ("linear_t", x, w)
    for ``x @ W`` / ``matmul(x, W)`` / ``mm(x, W)`` on a weight stored (in, out) (``_matmul_parts``),
    ("plain",) else."""
    from moe_inductor.fx import safety

    got = _matmul_parts(n)
    if got is not None:
        return ("linear_t",) + got
    got = _linear_parts(n) if n.op == "call_function" and n.target in LINEAR_FUNCTIONS else None
    if got is None:
        got = safety.linear_function_operands(n)
    if got is not None:
        return ("linear",) + tuple(got)
    x = safety.identity_function_input(n)
    if x is not None:
        return ("identity", x)
    if safety.is_function_apply(n):
        return ("call",)
    return ("plain",)


def _matmul_parts(n: fx.Node) -> Optional[tuple]:
    """(x, w) of a 2-D GEMM ``x @ w`` spelled ``operator.matmul`` / ``torch.matmul`` / ``torch.mm`` /
    ``x.matmul(w)`` / ``x.mm(w)``, both operands 2-D nodes (torchtune's ``GroupedExperts``:
    ``torch.matmul(x_expert, self.gate_proj[e])``), else None. ``x @ w`` is ``F.linear(x, w.T)``: the
    same ``mm`` on the same memory, and the same autocast rule (both lower-precision ops on CPU and CUDA)."""
    from moe_inductor.fx.shapes import shape_of
    from moe_inductor.fx.targets import MATMUL_FUNCTIONS, MATMUL_METHODS

    if not ((n.op == "call_function" and n.target in MATMUL_FUNCTIONS)
            or (n.op == "call_method" and n.target in MATMUL_METHODS)) or len(n.args) != 2 or n.kwargs:
        return None
    x, w = n.args
    if not (isinstance(x, fx.Node) and isinstance(w, fx.Node)):
        return None
    if len(shape_of(x) or ()) != 2 or len(shape_of(w) or ()) != 2:
        return None
    return x, w


def _signature(nodes: list, chunk: fx.Node, roles: dict, sides: dict) -> tuple:
    """The expert's computation with its nodes numbered, its input as "rows", its side chunks by
    side, its weights by role (Function calls by what they are proven to compute): equal signatures
    compute the same function of (rows, side rows, weights)."""
    kinds = {n: _kind(n) for n in nodes}
    kept = [n for n in nodes if kinds[n][0] != "call"]
    index = {n: i for i, n in enumerate(kept)}

    def arg(a):
        if isinstance(a, fx.Node):
            if a is chunk:
                return ("rows",)
            if a in sides:
                return ("side", sides[a])
            return ("w", roles[a]) if a in roles else ("n", index[a])
        if isinstance(a, (list, tuple)):
            return (type(a).__name__,) + tuple(arg(x) for x in a)
        if isinstance(a, dict):
            return ("dict",) + tuple(sorted((k, arg(v)) for k, v in a.items()))
        return ("c", type(a).__name__, repr(a))

    return tuple((kinds[n][0],) + tuple(arg(a) for a in kinds[n][1:]) if kinds[n][0] != "plain"
                 else (n.op, str(n.target), arg(n.args), arg(n.kwargs)) for n in kept)


#: ops that make a per-row column of a 1-D side chunk (or keep one): the only way an expert may read
#: its side chunks (Megatron-Core's ``probs.unsqueeze(-1)``, then a cast)
_COLUMN_METHODS = {"unsqueeze", "view", "reshape", "to", "float", "half", "bfloat16", "type_as", "type"}


def _side_splits(split: fx.Node, sizes: list, rows: fx.Node, E: int, shape_of) -> object:
    """{chunk i of every other split by the very same sizes: (side number, i)}, [side tensors]: tensors
    row-aligned with the split rows (Megatron-Core splits the permuted probabilities as it splits the
    permuted tokens); a reason string when such a split is not used chunk by chunk."""
    from moe_inductor.fx.safety import writes_to

    out, tensors = {}, []
    users = [u for u in sizes[0].users if u is not split] if isinstance(sizes[0], fx.Node) else []
    for u in users:
        parts = _split_parts(u)
        if parts is None or parts[1] != sizes:
            continue
        side, _, dim = parts
        ss = shape_of(side)
        if ss is None or len(ss) not in (1, 2) or dim not in (0, -len(ss)):
            return f"{u.name}: another split by the same counts, not of rows over dimension 0"
        if writes_to(side):
            return f"{side.name}: split by the same counts and written in place"
        for g in u.users:
            if not (g.op == "call_function" and g.target is operator.getitem and type(g.args[1]) is int
                    and 0 <= g.args[1] < E):
                return f"{u.name}: the chunks of {side.name} are used other than one by one ({g.name})"
            out[g] = (len(tensors), g.args[1])
        tensors.append((side, u))
    return out, tensors


def _side_reason(m, i: int, nodes: list, sides: dict, chunk: fx.Node) -> Optional[str]:
    """Why expert ``i`` reads its side chunks other than as the per-row scale of its hidden rows
    (``ExpertMLP.row_scale``, a column made of one side chunk), else None. On the concatenated rows
    that column is the whole side tensor's, row for row."""
    inside = set(nodes)
    mine = [c for c, (_, e) in sides.items() if e == i and any(u in inside for u in c.users)]
    if not mine:
        return None if m.row_scale is None else f"expert {i} scales its rows by something else than a side chunk"
    if m.row_scale is None:
        return f"{mine[0].name}: expert {i} reads a side chunk other than as a per-row scale before its down projection"
    col_nodes = set()
    n = m.row_scale
    while isinstance(n, fx.Node) and n not in sides:
        if not (n.op == "call_method" and n.target in _COLUMN_METHODS or
                n.op == "call_function" and n.target is operator.getitem and n.args[1] in ((slice(None), None),)):
            return f"{n.name}: expert {i}'s row scale is not a column of a side chunk"
        col_nodes.add(n)
        n = n.args[0]
    if n not in mine or len(n.users) != 1:
        return f"{m.row_scale.name}: expert {i}'s row scale is not a column of its own side chunk"
    for c in col_nodes:
        if any(u not in inside or (u not in col_nodes and u is not _scaled_product(m)) for u in c.users):
            return f"{c.name}: expert {i}'s row scale is read by something else than the product it scales"
    return None


def _scaled_product(m):
    """The ``h * scale`` node of an ExpertMLP with a row scale (its scale's only user), else None."""
    return next(iter(m.row_scale.users)) if len(m.row_scale.users) == 1 else None


def _roles(m) -> tuple:
    """({weight: role}, {bias: "b_" + role}) of an ``ExpertMLP``, or a reason string when one tensor
    plays two roles (a bias that is also a weight, or the bias of two projections)."""
    roles = {w: r for r, w in (("gate", m.gate), ("up", m.up), ("down", m.down)) if w is not None}
    named = [(b, "b_" + r) for r, b in (("gate", m.b_gate), ("up", m.b_up), ("down", m.b_down)) if b is not None]
    biases = dict(named)
    if len(biases) != len(named) or set(biases) & set(roles):
        return "one tensor is the bias of two projections, or a bias and a weight"
    return roles, biases


def _projection_reason(n: fx.Node, got: tuple, i: int, roles: dict, biases: dict, shape_of) -> Optional[str]:
    """Why expert ``i``'s projection ``n`` ((input, weight, bias) ``got``: ``F.linear`` or a Function
    proven to be it) is not one the grouped GEMM computes, else None: W one of its weights, and b
    None or the bias the expert description gives that very projection, shaped (out,) and of W's
    dtype (added per row, as ``grouped_mm``'s per-expert bias adds it)."""
    if got is None or got[1] not in roles:
        return f"{n.name}: expert {i} has a projection other than F.linear(rows, W[, b]) on its weights"
    w, b = got[1], got[2]
    if b is None:
        return None
    ws, bs = shape_of(w), shape_of(b)
    if biases.get(b) != "b_" + roles[w]:
        return f"{n.name}: expert {i}'s {roles[w]} projection adds {b.name}, not its own bias"
    if ws is None or bs is None or len(ws) != 2 or tuple(bs) != (ws[0],) or \
            b.meta["example_value"].dtype != w.meta["example_value"].dtype:
        return f"{n.name}: expert {i}'s bias {b.name} is not one value per output column of its weight's dtype"
    return None


def _match_mlp(split: fx.Node, shape_of) -> object:
    """(counts, rows, E, [ExpertMLP per expert], [nodes of expert 0], cat, erasable) for split by host
    counts + the same ModuleList MLP on every chunk (``patterns.experts.mlp``: linear projections,
    each with or without its bias (the same for every expert), the same activation) + cat over dim 0
    in chunk order; a reason string; or None."""
    from moe_inductor.recognize.parts import LowRankWeight
    from moe_inductor.patterns.experts import mlp_scaled as expert_mlp

    from moe_inductor.fx import safety

    found = _split_by_counts(split, shape_of)
    if not isinstance(found, tuple):
        return found
    counts, rows, E, chunks = found
    sizes = _split_parts(split)[1]
    got = _side_splits(split, sizes, rows, E, shape_of)
    if isinstance(got, str):
        return got
    sides, side_tensors = got
    cats = {u for c in chunks.values() for n in _downstream(c) for u in n.users
            if u.op == "call_function" and u.target is torch.cat}
    if len(cats) != 1:
        return f"{split.name}: the experts' outputs do not meet in one torch.cat"
    cat = cats.pop()
    outs = list(cat.args[0]) if cat.args and isinstance(cat.args[0], (list, tuple)) else []
    cdim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
    if len(outs) != E or cdim not in (0, -2) or len(cat.args) + len(cat.kwargs) > 2:
        return f"{cat.name}: not one output per expert concatenated over dimension 0"
    mlps, erase, sig0, nodes0 = [], [], None, None
    for i in range(E):
        out, c = outs[i], chunks[i]
        try:
            m = expert_mlp(out) if isinstance(out, fx.Node) else None
        except Exception as e:  # a declined MLP: its reason
            return f"chunk {i}: {e}"
        if m is None or safety.strip_identity(m.input) is not c:  # (through identity Functions: TP copy regions)
            return f"{getattr(out, 'name', out)}: output {i} of the cat is not an MLP of chunk {i}"
        if any(isinstance(w, LowRankWeight) for w in m.weights()):
            return f"{out.name}: expert {i}'s projections are linears plus low-rank products (W x + s * B(A x)): " \
                   f"the grouped GEMMs group plain linears only"
        got = _roles(m)
        if isinstance(got, str):
            return f"{out.name}: expert {i}: {got}"
        roles, biases = got
        tensors = {**roles, **biases}
        nodes = _expert_nodes(out, {c, *tensors, *sides, *(z for z in sizes if isinstance(z, fx.Node))})
        if nodes is None:
            return f"{out.name}: expert {i} reads other tensors than its chunk and its weights"
        why = _expert_reason(m, i, out, c, cat, nodes, tensors, roles, biases, sides, sizes, shape_of)
        if why is not None:
            return why
        sig = _signature(nodes, c, tensors, {z: k for z, (k, e) in sides.items() if e == i})
        if sig0 is None:
            sig0, nodes0 = sig, nodes
        elif sig != sig0:
            return f"{out.name}: expert {i} computes another function than expert 0 (or has other biases)"
        for w, r in tensors.items():
            if shape_of(w) != shape_of(getattr(mlps[0], r)) if mlps else len(shape_of(w) or ()) != (2 if r in
                                                                                                    roles.values() else 1):
                return f"{w.name}: expert {i}'s {r} {'weight' if r in roles.values() else ''} differs in shape"
        mlps.append(m)
        erase += list(reversed(nodes)) + [c]
    side0 = {z: side_tensors[k][0] for z, (k, e) in sides.items() if e == 0}
    erase += [z for z in sides if z not in erase] + [u for _, u in side_tensors]
    return counts, rows, E, mlps, nodes0, chunks[0], side0, cat, erase + [split]


def _expert_reason(m, i, out, c, cat, nodes, tensors, roles, biases, sides, sizes, shape_of) -> Optional[str]:
    """Why expert ``i`` (its ``nodes``, from chunk ``c`` to ``out``) is not one the grouped form
    computes, else None: nothing outside reads its intermediates, its projections are linear on its
    own weights, weights and biases are read only by them, the split sizes only by the Function calls
    (Dynamo passes a chunk's symbolic size to them), side chunks only as its row scale."""
    inside = set(nodes)
    for n in nodes + [c]:
        extra = [u for u in n.users if u not in inside and not (n is out and u is cat)]
        if extra:
            return f"{n.name}: expert {i}'s {n.name} is also read by {extra[0].name}"
    size_nodes = {z for z in sizes if isinstance(z, fx.Node)}
    for n in nodes:
        kind = _kind(n)
        if kind[0] == "linear_t" and (kind[2] not in roles or roles[kind[2]] not in m.transposed):
            return f"{n.name}: expert {i} multiplies by {kind[2].name}, which is not one of its weights stored (in, out)"
        if kind[0] == "linear" and roles.get(kind[2]) in m.transposed:
            return f"{n.name}: expert {i} uses its {roles[kind[2]]} weight both as (in, out) and as (out, in)"
        if kind[0] == "linear":
            why = _projection_reason(n, kind[1:], i, roles, biases, shape_of)
            if why is not None:
                return why
            continue
        if kind[0] == "linear_t":
            continue
        if kind[0] == "call":
            if len(n.users) != 1 or _kind(next(iter(n.users)))[0] not in ("linear", "identity"):
                return f"{n.name}: expert {i} calls an autograd.Function that is not a linear or an identity"
            continue
        if any(isinstance(a, fx.Node) and a in tensors for a in n.all_input_nodes):
            return f"{n.name}: expert {i} uses a weight or bias other than in a linear projection"
        if any(a in size_nodes or a.op == "get_attr" for a in n.all_input_nodes):
            return f"{n.name}: expert {i} reads the split sizes"
    return _side_reason(m, i, nodes, sides, c)


def _downstream(node: fx.Node, limit: int = 64) -> list:
    out, stack = [], [node]
    while stack and len(out) < limit:
        n = stack.pop()
        out.append(n)
        stack.extend(u for u in n.users if u not in out and u.op in ("call_function", "call_method")
                     and u.target is not torch.cat)
    return out


def _emit_mlp(graph, plan, offs, call, method, emitted: list) -> fx.Node:
    """Expert 0's nodes on all the rows, each projection a grouped GEMM on the stacked weights (and
    the stacked biases, when the projection has one; the new nodes are appended to ``emitted``: their
    fake values are expert 0's until refreshed)."""
    counts, rows, E, mlps, nodes0, chunk0, side0, cat, _ = plan
    roles, biases = _roles(mlps[0])
    stacked = {}

    def stack(r):  # grouped_mm's weights are (E, in, out): Linear-layout (out, in) weights are transposed
        if r not in stacked:
            W = call(graph, torch.stack, [getattr(m, r) for m in mlps], 0, like=cat)
            keep = r.startswith("b_") or r in mlps[0].transposed
            stacked[r] = W if keep else method(graph, "transpose", W, -2, -1, like=cat)
        return stacked[r]

    for side in set(side0.values()):
        # split by the same sizes as the rows, so as long as they (the split checked it; Dynamo may
        # give the two lengths two symbols): said once in the graph (the shape environment learns it:
        # rows and side combine without a data-dependent broadcast, ``fx.shapes.same_dim`` proves it)
        n_rows = call(graph, torch.ops.aten.sym_size.int, rows, 0, like=cat)
        n_side = call(graph, torch.ops.aten.sym_size.int, side, 0, like=cat)
        same_n = call(graph, operator.eq, n_side, n_rows, like=cat)
        call(graph, torch.ops.aten._assert_scalar.default, same_n,
             f"sonic: {side.name} and {rows.name} are split by the same counts: their lengths must agree", like=cat)
    env = {chunk0: rows, **side0}
    for n in nodes0:
        kind = _kind(n)
        if kind[0] == "call":  # the Function call under a linear or an identity: replaced with it
            continue
        if kind[0] == "identity":
            env[n] = env[kind[1]]
            continue
        if kind[0] in ("linear", "linear_t"):
            inp, w, b = (kind[1:] + (None,))[:3]
            extra = {} if b is None else {"bias": stack(biases[b])}
            env[n] = call(graph, torch.ops.moe_inductor.grouped_mm.default, env[inp], stack(roles[w]), offs=offs,
                          like=n, **extra)
        else:
            env[n] = graph.node_copy(n, lambda a: env[a])
        emitted.append(env[n])
    return env[nodes0[-1]]


_SYM_OPS = {operator.ge, operator.gt, operator.le, operator.lt, operator.eq, operator.ne, operator.add,
            operator.sub, operator.mul, operator.and_, operator.or_, operator.not_,
            operator.mod, operator.floordiv}  # (mod / floordiv: a view of the rows into (T, K, d) checks sum(u) % K == 0)


def _is_sym_size(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is torch.ops.aten.sym_size.int


def _checks_only(items: list) -> Optional[list]:
    """The nodes that use ``items`` (the host counts) only to check them (Dynamo's ``_assert_scalar``
    chains: ``u >= 0``, ``sum(u) == A``), if that is all they are used for; else None. In graph
    order (a check that reads two others, ``(u != 0) | (u == 0)``, is accepted whichever is seen first)."""
    seen, stack = set(), list(items)
    while stack:
        n = stack.pop()
        for u in n.users:
            if u in seen:
                continue
            ok = u.op == "call_function" and (
                u.target in _SYM_OPS or u.target is getattr(torch, "sym_sum", None)
                or u.target is torch.ops.aten._assert_scalar.default
                or u.target is getattr(torch, "_check", None))
            if not ok:
                return None
            seen.add(u)
            stack.append(u)
    # every input of a check is one of the counts, a check, a constant or a tensor's size (the length
    # of a tensor split by the counts, ``sum(u) == n``)
    if any(a not in seen and a not in items and not _is_sym_size(a) for u in seen for a in u.all_input_nodes):
        return None
    if not seen:
        return []
    order = {n: k for k, n in enumerate(next(iter(seen)).graph.nodes)}
    return sorted(seen, key=order.__getitem__)


def rewrite(gm: fx.GraphModule, shape_of=None) -> list:
    """Replace the split-by-host-counts GEMM loops of ``gm`` by ``grouped_mm`` (see the module
    docstring). Returns notes (str), one per split seen: rewritten, or why not."""
    from moe_inductor.fx.build import call, method
    from moe_inductor.fx.shapes import shape_of as _shape_of

    shape_of = shape_of or _shape_of
    graph = gm.graph
    notes, plans = [], []
    for node in list(graph.nodes):
        if node.op not in ("call_method", "call_function"):
            continue
        shapes = lambda n: tuple(_int(s) for s in (shape_of(n) or ())) if shape_of(n) is not None else None  # noqa: E731
        try:
            got = _match(node, shapes)
            if isinstance(got, str):  # not one F.linear per chunk: the same ModuleList MLP per chunk?
                mlp = _match_mlp(node, shapes)
                got = mlp if not isinstance(mlp, str) else f"{got}; as expert MLPs: {mlp}"
        except Exception as e:  # a look-alike we do not understand: leave it
            got = f"{node.name}: {type(e).__name__}: {e}"
        if got is None:
            continue
        if isinstance(got, str):
            notes.append((node, f"split by host counts not rewritten: {got}"))
            continue
        plans.append(got)
    # a split read alongside a rewritten one (its chunks the experts' row scales) is no separate split
    absorbed = {n for plan in plans if len(plan) != 5 for n in plan[-1]}
    notes = [note for node, note in notes if node not in absorbed]
    if not plans:
        return notes
    offsets: dict = {}
    rows_of: dict = {}
    first_of: dict = {}
    changed: list = []
    for plan in plans:
        counts, rows, cat, erase = plan[0], plan[1], plan[-2], plan[-1]
        with graph.inserting_before(cat):
            if counts not in offsets:
                with graph.inserting_after(counts):
                    offsets[counts] = call(graph, torch.cumsum, counts, 0, dtype=torch.int32, like=counts)
            if len(plan) == 5:  # one F.linear per chunk on W[i]
                wt = method(graph, "transpose", plan[2], -2, -1, like=cat)
                y = call(graph, torch.ops.moe_inductor.grouped_mm.default, rows, wt, offs=offsets[counts], like=cat)
            else:  # the same MLP module per chunk: its nodes once, each projection a grouped GEMM
                y = _emit_mlp(graph, plan, offsets[counts], call, method, changed)
        rows_of.setdefault(counts, rows)
        first_of.setdefault(counts, y)
        cat.replace_all_uses_with(y)
        graph.erase_node(cat)
        for n in erase:  # users before what they use
            if not n.users:
                graph.erase_node(n)
        changed.append(y)
        if len(plan) == 5:
            notes.append(f"split of {rows.name} by host counts {counts.name} with per-expert F.linear on {plan[2].name}: "
                         f"one grouped GEMM with device offsets")
        else:
            notes.append(f"split of {rows.name} by host counts {counts.name} with the same MLP in each of {plan[2]} "
                         f"experts: one grouped GEMM per projection with device offsets")
    # the host copies: gone when nothing but the splits (now rewritten) and their checks read them
    for counts, offs in offsets.items():
        items = [u2 for g in counts.users if g.op == "call_function" and g.target is operator.getitem
                 for u2 in g.users if u2.op == "call_method" and u2.target == "item"]
        checks = _checks_only(items)
        if checks is None:
            users = sorted({u.name for i in items for u in i.users})
            notes.append(f"host copy of {counts.name} kept: its values are also used by {', '.join(users)}")
            continue
        with graph.inserting_before(first_of[counts]):
            rows = rows_of[counts]
            rows_n = _int(shape_of(rows)[0])
            if not isinstance(rows_n, int):  # dynamic shapes: the size, read in the graph
                rows_n = method(graph, "size", rows, 0, like=counts)
            nonneg = call(graph, torch.ge, counts, 0, like=counts)
            all_nonneg = call(graph, torch.all, nonneg, like=counts)
            total = call(graph, torch.sum, counts, like=counts)
            whole = call(graph, torch.eq, total, rows_n, like=counts)
            ok = call(graph, torch.logical_and, all_nonneg, whole, like=counts)
            call(graph, torch._assert_async, ok,
                 f"sonic: the per-expert counts {counts.name} must be >= 0 and sum to the rows they split", like=counts)
        for n in reversed(checks):
            graph.erase_node(n)
        for i in items:
            g = i.args[0]
            graph.erase_node(i)
            if not g.users:
                graph.erase_node(g)
        notes.append(f"host copy of {counts.name} removed (its values only sized the splits; checked on the device)")
    # shapes downstream were in the unbacked sizes of the host copy: run the fake values again
    _refresh(graph, changed)
    graph.lint()
    gm.recompile()
    return notes


def _int(s):
    try:
        return int(s)
    except Exception:
        return s


def _refresh(graph: fx.Graph, starts: list) -> None:
    from moe_inductor.fx.build import fake_run as _fake_run

    dirty = set(starts)
    for n in graph.nodes:
        if n in dirty or any(a in dirty for a in n.all_input_nodes):
            dirty.add(n)
            if n.op in ("call_function", "call_method"):
                try:
                    _fake_run(n)
                except Exception as e:  # keep the old value: later passes re-derive shapes themselves
                    log.debug("sonic: could not refresh the fake value of %s: %s", n.name, e)
