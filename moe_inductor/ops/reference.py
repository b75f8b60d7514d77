"""Pure-PyTorch MoE expert computation: the CPU path of the fused op and the reference that
the Triton kernels are tested against.

Shape legend
  T tokens, d hidden, n expert intermediate, E experts, A assignments (A = T*K for top-k routing)
  x           (T, d)        tokens
  token_ids   (A,) int      token of each assignment
  expert_ids  (A,) int      expert of each assignment; -1 marks a dropped (padding) assignment
                            that contributes nothing and gets a zero score gradient
  scores      (A,)          routing weight of each assignment
  w1          (E, 2n, d)    gate/up projection (E, n, d) for non-gated activations; any strides
  w2          (E, d, n)     down projection; any strides
  b1, b2      (E, 2n), (E, d) optional biases
  h_sorted    (A, 2n)       pre-activation H, rows in expert-sorted assignment order
  order       (A,) int32    expert-sorted order of the assignments (stable)

The routing is a general list of (token, expert, score) assignments, so token rounding and
capacity-style routing use the same code: a token may have any number of experts, including none.

Two implementations live here:
  * ``moe_forward`` / ``moe_backward``: the efficient path. One stable sort, then per expert a
    contiguous slice of the sorted assignments; the gather of X happens per expert (no A x d
    copy is ever alive), the combine accumulates in fp32 with index_add_. Backward follows
    SonicMoE: it needs only X, H, the scores and the routing, recomputes A = act(H), and gets the
    score gradient as sum(dA' * A) without Y.
  * ``naive_moe``: an obviously-correct loop, differentiable by autograd, used by the tests.

The efficient path reads the per-expert counts on the host (two syncs per call on CUDA), which
CUDA-graph capture forbids. While the current CUDA stream is capturing (``mode="reduce-overhead"``),
``moe_forward`` / ``moe_backward`` therefore take a sync-free variant (``sync_free=True`` forces it,
as does ``FORCE_SYNC_FREE``, for tests): every expert's GEMMs over all A sorted rows, each row
keeping its own expert's result (``torch.where``), never a value read back to the host. E times the
GEMM work and an A x d gathered copy of X: a correct fallback for what the Triton kernels do not
serve (e.g. float64), not a fast path.
"""
from __future__ import annotations

import itertools
from typing import Optional

import torch

from moe_inductor.ops.activations import Activation, act_backward, act_forward, act_forward_keeping


def sort_assignments(expert_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable expert-sorted order (int32) and counts (E+1,) int64 on expert_ids' device:
    counts[0] dropped assignments (expert -1, sorted first), counts[1 + e] expert e's."""
    order = torch.argsort(expert_ids, stable=True).to(torch.int32)
    counts = torch.bincount(expert_ids.to(torch.int64) + 1, minlength=num_experts + 1)
    return order, counts


def _expert_slices(counts: torch.Tensor):
    """(e, lo, hi) for every expert with assignments; counts as from ``sort_assignments``."""
    counts = counts.tolist()
    start = counts[0]
    for e, c in enumerate(counts[1:]):
        if c:
            yield e, start, start + c
        start += c


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class ExpertList:
    """Per-expert weights as the PyTorch path reads them, never stacked: expert e's rows are
    ``first[e]`` with ``second[e]`` below it (the up half of a gated expert) when given, cast to
    ``dtype`` as they are read. ``shape`` is that of the stack the rows would form. Only the
    experts that receive rows are ever read (``fused_moe_experts`` on the PyTorch path)."""

    def __init__(self, first: list, second: list, dtype: torch.dtype):
        self.first, self.second, self.dtype = list(first), list(second), dtype
        rows = first[0].shape[0] + (second[0].shape[0] if second else 0)
        self.shape = torch.Size((len(first), rows) + tuple(first[0].shape[1:]))
        self.device = first[0].device

    def parts(self, e: int) -> tuple:
        """((tensor, lo, hi), ...): expert e's rows lo:hi of the stack are ``tensor``."""
        a = self.first[e].to(self.dtype)
        if not self.second:
            return ((a, 0, a.shape[0]),)
        n = a.shape[0]
        return ((a, 0, n), (self.second[e].to(self.dtype), n, self.shape[1]))

    def row(self, e: int) -> torch.Tensor:
        """Expert e's rows as one tensor (a copy when split: for biases)."""
        parts = self.parts(e)
        return parts[0][0] if len(parts) == 1 else torch.cat([p[0] for p in parts])

    def materialize(self) -> torch.Tensor:
        return torch.stack([self.row(e) for e in range(self.shape[0])])


def _parts(w, e: int) -> tuple:
    if isinstance(w, ExpertList):
        return w.parts(e)
    return ((w[e], 0, w.shape[1]),)


def _row(b, e: int) -> torch.Tensor:
    return b.row(e) if isinstance(b, ExpertList) else b[e]


def _mm_rows(a: torch.Tensor, w, e: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``a @ w[e].T`` (a: (m, k), w[e]: (r, k)) -> (m, r), written into ``out`` when given; a
    split expert is multiplied piece by piece into its columns (nothing concatenated)."""
    parts = _parts(w, e)
    if len(parts) == 1:
        t = parts[0][0].t()
        return torch.mm(a, t) if out is None else torch.mm(a, t, out=out)
    if out is None:
        out = a.new_empty((a.shape[0], w.shape[1]))
    for t, lo, hi in parts:
        torch.mm(a, t.t(), out=out[:, lo:hi])
    return out


def _mm_cols(g: torch.Tensor, w, e: int) -> torch.Tensor:
    """``g @ w[e]`` (g: (m, r), w[e]: (r, k)) -> (m, k)."""
    parts = _parts(w, e)
    if len(parts) == 1:
        return torch.mm(g, parts[0][0])
    out = None
    for t, lo, hi in parts:
        out = torch.mm(g[:, lo:hi], t) if out is None else out.addmm_(g[:, lo:hi], t)
    return out


def _empty_stack(w, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """An uninitialised gradient for ``w``: the weights' layout for a stacked tensor (strides of a
    transposed view too: no copy by autograd afterwards), a contiguous stack for an ExpertList."""
    if isinstance(w, ExpertList):
        return torch.empty(w.shape, dtype=dtype or w.dtype, device=w.device)
    return torch.empty_like(w)


def _stacked(w):
    return w.materialize() if isinstance(w, ExpertList) else w


#: tests: take the sync-free variant everywhere (it is otherwise chosen only under CUDA-graph capture)
FORCE_SYNC_FREE = False


def _use_sync_free(x: torch.Tensor, sync_free: Optional[bool]) -> bool:
    if sync_free is not None:
        return sync_free
    # the device type, not ``is_cuda``: a CPU build has no stream-capture query at all
    return FORCE_SYNC_FREE or (x.device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def _expert_up(x_e, e: int, w1, b1, h_out=None) -> torch.Tensor:
    """H = X W1[e]^T + b1[e] of expert ``e``'s rows, into ``h_out`` when given."""
    h_e = _mm_rows(x_e, w1, e, out=h_out)
    if b1 is not None:
        h_e += _row(b1, e)
    return h_e


def _expert_mlp(x_e, e: int, w1, w2, b1, b2, act: Activation, interleaved: bool, h_out=None) -> torch.Tensor:
    """Expert ``e`` on its rows ``x_e``: Y = act(X W1[e]^T + b1[e]) W2[e]^T + b2[e] in x's dtype, H
    written into ``h_out`` (the rows kept for backward) when given."""
    h_e = _expert_up(x_e, e, w1, b1, h_out)
    y_e = _mm_rows(act_forward(h_e, act, interleaved), w2, e)
    if b2 is not None:
        y_e += _row(b2, e)
    return y_e


def moe_forward(
    x: torch.Tensor,
    token_ids: torch.Tensor,
    expert_ids: torch.Tensor,
    scores: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    b1: Optional[torch.Tensor],
    b2: Optional[torch.Tensor],
    act: Activation,
    interleaved: bool,
    keep_h: bool = True,
    sync_free: Optional[bool] = None,
    small: Optional[bool] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (out (T, d) in x.dtype, h_sorted (A, 2n) or (0, 2n) if not keep_h, order (A,) int32).
    ``sync_free``: None picks the sync-free variant under CUDA-graph capture (module docstring).
    ``small``: None groups at most ``SMALL_A`` assignments on the host (CPU), False never does."""
    if _use_sync_free(x, sync_free):
        return _sync_free_forward(x, token_ids, expert_ids, scores, _stacked(w1), _stacked(w2), _stacked(b1),
                                  _stacked(b2), act, interleaved, keep_h)
    T, d = x.shape
    A = token_ids.shape[0]
    if (A <= SMALL_A if small is None else small) and x.device.type == "cpu":
        return _small_forward(x, token_ids, expert_ids, scores, w1, w2, b1, b2, act, interleaved, keep_h)
    E, h_cols, _ = w1.shape
    order, counts = sort_assignments(expert_ids, E)
    order_l = order.long()
    tok_sorted = token_ids.long()[order_l]
    s_sorted = scores[order_l].to(_acc_dtype(x.dtype))
    out_acc = torch.zeros(T, d, dtype=_acc_dtype(x.dtype), device=x.device)
    h_sorted = x.new_empty((A if keep_h else 0, h_cols))
    if keep_h:
        h_sorted[: int(counts[0])] = 0  # dropped assignments: defined values, never read
    for e, lo, hi in _expert_slices(counts):
        rows = tok_sorted[lo:hi]
        # H written where it is kept (rows lo:hi of a contiguous H are contiguous): no copy
        y_e = _expert_mlp(x.index_select(0, rows), e, w1, w2, b1, b2, act, interleaved,
                          h_out=h_sorted[lo:hi] if keep_h else None).to(out_acc.dtype)
        out_acc.index_add_(0, rows, y_e.mul_(s_sorted[lo:hi, None]))
    return out_acc.to(x.dtype), h_sorted, order


#: at most this many assignments: ``moe_forward`` groups them on the host (decode: a few tokens'
#: top-k), no sort, no per-expert counts on the device, a row of X used in place where an expert
#: has one row. The same values as the sorted path (same stable order, same fp32 combine).
SMALL_A = 64


def _small_forward(x, token_ids, expert_ids, scores, w1, w2, b1, b2, act, interleaved, keep_h):
    """``moe_forward`` for a handful of assignments on CPU (module docstring; ``SMALL_A``)."""
    T, d = x.shape
    A, h_cols = token_ids.shape[0], w1.shape[1]
    acc = _acc_dtype(x.dtype)
    experts, tokens = expert_ids.tolist(), token_ids.tolist()
    order_l = sorted(range(A), key=experts.__getitem__)  # stable, as argsort(stable=True)
    weights = scores.to(acc).tolist()  # exact: a score in acc's precision, as the sorted path multiplies
    out_acc = torch.zeros(T, d, dtype=acc, device=x.device)
    h_sorted = x.new_empty((A if keep_h else 0, h_cols))
    lo = 0
    for e, group in itertools.groupby(order_l, key=experts.__getitem__):
        picked = list(group)
        hi = lo + len(picked)
        if e < 0:  # dropped assignments (sorted first): defined values, never read
            if keep_h:
                h_sorted[lo:hi] = 0
            lo = hi
            continue
        rows = [tokens[i] for i in picked]
        if len(rows) == 1:
            x_e = x.narrow(0, rows[0], 1)
        else:
            rows_t = torch.tensor(rows, dtype=torch.int64, device=x.device)
            x_e = x.index_select(0, rows_t)
        y_e = _expert_mlp(x_e, e, w1, w2, b1, b2, act, interleaved,
                          h_out=h_sorted.narrow(0, lo, hi - lo) if keep_h else None).to(acc)
        if len(rows) == 1:
            out_acc.narrow(0, rows[0], 1).add_(y_e.mul_(weights[picked[0]]))
        else:
            w_col = torch.tensor([weights[i] for i in picked], dtype=acc, device=x.device)
            out_acc.index_add_(0, rows_t, y_e.mul_(w_col[:, None]))
        lo = hi
    order = torch.tensor(order_l, dtype=torch.int32, device=x.device)
    return out_acc.to(x.dtype), h_sorted, order


def moe_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    token_ids: torch.Tensor,
    expert_ids: torch.Tensor,
    scores: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    b1: Optional[torch.Tensor],
    b2: Optional[torch.Tensor],
    h_sorted: Optional[torch.Tensor],
    order: torch.Tensor,
    act: Activation,
    interleaved: bool,
    sync_free: Optional[bool] = None,
) -> tuple[torch.Tensor, ...]:
    """Returns (dx, dscores, dw1, dw2, db1, db2); db1/db2 are None without biases.

    h_sorted None means H is recomputed from X (the opt-in leaner mode). ``sync_free`` as in
    ``moe_forward``."""
    if _use_sync_free(x, sync_free):
        return _sync_free_backward(grad_out, x, token_ids, expert_ids, scores, _stacked(w1), _stacked(w2),
                                   _stacked(b1), _stacked(b2), h_sorted, order, act, interleaved)
    T, d = x.shape
    E = w1.shape[0]
    acc = _acc_dtype(x.dtype)
    counts = torch.bincount(expert_ids.to(torch.int64) + 1, minlength=E + 1)
    order_l = order.long()
    tok_sorted = token_ids.long()[order_l]
    s_sorted = scores[order_l]
    grad_out = grad_out.contiguous()
    dx_acc = torch.zeros(T, d, dtype=acc, device=x.device)
    # in the weights' layout (strides of a transposed view too): no copy by autograd afterwards;
    # every expert's slice is written below (zeros for experts without rows), no memset of all
    dw1 = _empty_stack(w1)
    dw2 = _empty_stack(w2)
    db1 = _empty_stack(b1) if b1 is not None else None
    db2 = _empty_stack(b2) if b2 is not None else None
    ds_sorted = torch.zeros(order.shape[0], dtype=acc, device=x.device)
    served = [False] * E
    for e, lo, hi in _expert_slices(counts):
        served[e] = True
        rows = tok_sorted[lo:hi]
        x_e = x.index_select(0, rows)
        h_e = _expert_up(x_e, e, w1, b1) if h_sorted is None else h_sorted[lo:hi]
        a_e, kept = act_forward_keeping(h_e, act, interleaved)
        a_e = a_e.to(acc)  # fresh: scaled in place below
        do_e = grad_out.index_select(0, rows)
        s_e = s_sorted[lo:hi, None].to(acc)
        da_e = _mm_cols(do_e, w2, e).to(acc)  # dA' = gather(dO) W2^T, before the score
        ds_e = (da_e * a_e).sum(-1)
        if b2 is not None:
            ds_e += (do_e.to(acc) * _row(b2, e).to(acc)).sum(-1)
            db2[e] = (do_e.to(acc) * s_e).sum(0).to(db2.dtype)
        ds_sorted[lo:hi] = ds_e
        dh_e = act_backward(h_e, da_e.mul_(s_e), act, interleaved, kept=kept).to(x.dtype)
        torch.mm(do_e.t(), a_e.mul_(s_e).to(x.dtype), out=dw2[e])
        torch.mm(dh_e.t(), x_e, out=dw1[e])
        if b1 is not None:
            db1[e] = dh_e.to(acc).sum(0).to(db1.dtype)
        dx_acc.index_add_(0, rows, _mm_cols(dh_e, w1, e).to(acc))
    for e in (e for e, done in enumerate(served) if not done):
        for g in (dw1, dw2, db1, db2):
            if g is not None:
                g[e] = 0
    dscores = torch.empty(order.shape[0], dtype=scores.dtype, device=x.device)
    dscores[order_l] = ds_sorted.to(scores.dtype)
    return dx_acc.to(x.dtype), dscores, dw1, dw2, db1, db2


def _sorted_rows(order: torch.Tensor, token_ids: torch.Tensor, expert_ids: torch.Tensor):
    order_l = order.long()
    return order_l, token_ids.long()[order_l], expert_ids.long()[order_l]


def _masked_up(x_s, exp_sorted, w1, b1) -> torch.Tensor:
    """H (A, 2n) of the sorted rows x_s (A, d): each row through its own expert; 0 for dropped rows."""
    h = x_s.new_zeros((x_s.shape[0], w1.shape[1]))
    for e in range(w1.shape[0]):
        h_e = torch.mm(x_s, w1[e].t())
        if b1 is not None:
            h_e += b1[e]
        h = torch.where((exp_sorted == e)[:, None], h_e, h)
    return h


def _sync_free_forward(x, token_ids, expert_ids, scores, w1, w2, b1, b2, act, interleaved, keep_h):
    """``moe_forward`` without reading device data on the host (module docstring)."""
    T, d = x.shape
    acc = _acc_dtype(x.dtype)
    order = torch.argsort(expert_ids, stable=True).to(torch.int32)
    _, tok_sorted, exp_sorted = _sorted_rows(order, token_ids, expert_ids)
    x_s = x.index_select(0, tok_sorted)
    h = _masked_up(x_s, exp_sorted, w1, b1)
    a = act_forward(h, act, interleaved)
    y = x.new_zeros((x_s.shape[0], d))
    for e in range(w1.shape[0]):
        y_e = torch.mm(a, w2[e].t())
        if b2 is not None:
            y_e += b2[e]
        y = torch.where((exp_sorted == e)[:, None], y_e, y)
    s = torch.where(exp_sorted >= 0, scores[order.long()].to(acc), 0)
    out = torch.zeros(T, d, dtype=acc, device=x.device).index_add_(0, tok_sorted, y.to(acc) * s[:, None])
    return out.to(x.dtype), (h if keep_h else x.new_empty((0, w1.shape[1]))), order


def _sync_free_backward(grad_out, x, token_ids, expert_ids, scores, w1, w2, b1, b2, h_sorted, order, act,
                        interleaved):
    """``moe_backward`` without reading device data on the host (module docstring)."""
    T, d = x.shape
    E = w1.shape[0]
    acc = _acc_dtype(x.dtype)
    order_l, tok_sorted, exp_sorted = _sorted_rows(order, token_ids, expert_ids)
    valid = exp_sorted >= 0
    x_s = x.index_select(0, tok_sorted)
    h = _masked_up(x_s, exp_sorted, w1, b1) if h_sorted is None else h_sorted
    a = act_forward(h, act, interleaved).to(acc)
    do_s = grad_out.contiguous().index_select(0, tok_sorted)
    s = torch.where(valid, scores[order_l].to(acc), 0)[:, None]
    da = x.new_zeros((x_s.shape[0], w2.shape[2]))  # dA' = gather(dO) W2^T, each row its own expert's
    for e in range(E):
        da = torch.where((exp_sorted == e)[:, None], torch.mm(do_s, w2[e]), da)
    ds = (da.to(acc) * a).sum(-1)
    if b2 is not None:
        ds += (do_s.to(acc) * b2[exp_sorted.clamp(min=0)].to(acc)).sum(-1)
    ds = torch.where(valid, ds, 0)
    dh = act_backward(h, da.to(acc) * s, act, interleaved).to(x.dtype)
    dw1, dw2 = torch.zeros_like(w1), torch.zeros_like(w2)
    db1 = torch.zeros_like(b1) if b1 is not None else None
    db2 = torch.zeros_like(b2) if b2 is not None else None
    dx_s = torch.zeros(x_s.shape, dtype=acc, device=x.device)
    for e in range(E):
        m = (exp_sorted == e)[:, None]
        dh_e = torch.where(m, dh, 0)
        dw2[e] = torch.mm(do_s.t(), torch.where(m, a * s, 0).to(x.dtype))
        dw1[e] = torch.mm(dh_e.t(), x_s)
        if b1 is not None:
            db1[e] = dh_e.to(acc).sum(0).to(db1.dtype)
        if b2 is not None:
            db2[e] = torch.where(m, do_s.to(acc) * s, 0).sum(0).to(db2.dtype)
        dx_s = torch.where(m, torch.mm(dh, w1[e]).to(acc), dx_s)
    dx = torch.zeros(T, d, dtype=acc, device=x.device).index_add_(0, tok_sorted, dx_s)
    dscores = torch.empty(order.shape[0], dtype=scores.dtype, device=x.device)
    dscores[order_l] = ds.to(scores.dtype)
    return dx.to(x.dtype), dscores, dw1, dw2, db1, db2


def naive_moe(
    x: torch.Tensor,
    token_ids: torch.Tensor,
    expert_ids: torch.Tensor,
    scores: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    b1: Optional[torch.Tensor] = None,
    b2: Optional[torch.Tensor] = None,
    act: Activation | str = "swiglu",
    interleaved: bool = False,
) -> torch.Tensor:
    """Obviously-correct loop over experts; autograd gives its gradients. For tests only."""
    from moe_inductor.ops.activations import parse_activation

    if isinstance(act, str):
        act = parse_activation(act)
    out = torch.zeros_like(x)
    for e in range(w1.shape[0]):
        sel = expert_ids == e
        tok = token_ids[sel].long()
        h = x[tok] @ w1[e].t()
        if b1 is not None:
            h = h + b1[e]
        y = act_forward(h, act, interleaved) @ w2[e].t()
        if b2 is not None:
            y = y + b2[e]
        out = out.index_add(0, tok, y * scores[sel, None].to(y.dtype))
    return out
