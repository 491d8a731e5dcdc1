"""Triton kernels of the vocabulary-parallel loss (SPEC §7): each rank reads its shard.

Three kernels, each one streaming pass over this rank's shard of both models'
logits, and O(rows) all-reduces between them (``sgopd_kernels.parallel``
combines):

1. ``_tp_stats_kernel``: per row, the online (max, sum 2^(s - max)) of both
   models in raw units, and the sampled token's raw logits where this rank
   holds it. Combined: the global log-normalizers L_S, L_T (base 2, scaled
   units), then delta, the gate and the bridge coefficients a, b.
2. ``_tp_bridge_kernel``: with L_S, L_T, a, b known, per row the online
   (max, sum) of the bridge x = a lp_T + b lp_S (base 2) on the joint support,
   sum 2^(x - max)(x - max), sum 2^(x - max) lp_S, E_{p_S}[lp_S] and
   E_{p_S}[lp_T]. Combined: L_q, the loss and the statistics.
3. ``_tp_bwd_kernel``: a 2-D grid writing this shard's gradient from the
   combined row state, without communication.

Log-probabilities are formed against the global normalizers, the way eager
PyTorch forms them (the single-device kernels' frame is per row and would not
survive the combination across ranks); the forward reads each shard twice.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .logits import LOG2E, _cand_update, _load_row_block
from ._layout import row_layout

# per-row outputs of the two forward kernels
STATS_K = 7   # m_s, z_s, m_t, z_t, s_y, t_y, 1 where this shard holds y
BRIDGE_K = 6  # m_x, z_x, ax, as, e_s, e_t
# the backward's row state, written by the combination (sgopd_kernels.parallel)
L_S, L_T, L_Q, E_U, A, B = 5, 6, 7, 8, 11, 12
BLOCK_V = 4096
NUM_WARPS = 8


@triton.jit
def _row_ptrs(S, T, row, s_d1, s_st0, s_st1, t_d1, t_st0, t_st1):
    s_row = S + (row // s_d1) * s_st0 + (row % s_d1) * s_st1
    t_row = T + (row // t_d1) * t_st0 + (row % t_d1) * t_st1
    return s_row, t_row


@triton.jit
def _online(raw, m, z, scale2):
    """Fold raw logits into (raw running max, sum 2^((raw - max) scale2))."""
    nm = tl.maximum(m, tl.max(raw, 0))
    r = tl.where(nm == float("-inf"), 0.0, nm)
    z = z * tl.exp2(tl.where(m == float("-inf"), 0.0, (m - r) * scale2)) \
        + tl.sum(tl.exp2((raw - r) * scale2), 0)
    return nm, z


@triton.jit
def _tp_stats_kernel(
    S, T, TOK, OUT, V, start,
    s_d1, s_st0, s_st1, s_stv, t_d1, t_st0, t_st1, t_stv,
    scale2, ignore_index,
    STRIDED_V: tl.constexpr, BLOCK_V: tl.constexpr, K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row, t_row = _row_ptrs(S, T, row, s_d1, s_st0, s_st1, t_d1, t_st0, t_st1)
    y = tl.load(TOK + row).to(tl.int64)
    valid = y != ignore_index
    n_cols = tl.where(valid, V, 0)
    zero = tl.sum(tl.zeros([BLOCK_V], dtype=tl.float32), 0)
    m_s = zero + float("-inf")
    m_t = zero + float("-inf")
    z_s = zero
    z_t = zero
    offs = tl.arange(0, BLOCK_V)
    for lo in range(0, n_cols, BLOCK_V):
        cols = lo + offs
        m_s, z_s = _online(_load_row_block(s_row, cols, s_stv, V, STRIDED_V), m_s, z_s, scale2)
        m_t, z_t = _online(_load_row_block(t_row, cols, t_stv, V, STRIDED_V), m_t, z_t, scale2)
    yl = y - start  # this shard's column of the sampled token, if it holds it
    own = valid & (yl >= 0) & (yl < V)
    yl = tl.where(own, yl, 0)
    s_y = tl.where(own, tl.load(s_row + yl * s_stv).to(tl.float32), 0.0)
    t_y = tl.where(own, tl.load(t_row + yl * t_stv).to(tl.float32), 0.0)
    out = OUT + row * K
    tl.store(out + 0, m_s)
    tl.store(out + 1, z_s)
    tl.store(out + 2, m_t)
    tl.store(out + 3, z_t)
    tl.store(out + 4, s_y)
    tl.store(out + 5, t_y)
    tl.store(out + 6, own.to(tl.float32))


@triton.jit
def _tp_bridge_kernel(
    S, T, TOK, ROWS, OUT, V,
    s_d1, s_st0, s_st1, s_stv, t_d1, t_st0, t_st1, t_stv,
    scale2, ignore_index,
    STRIDED_V: tl.constexpr, BLOCK_V: tl.constexpr, ROW_K: tl.constexpr, K: tl.constexpr,
):
    NEG_INF: tl.constexpr = float("-inf")
    row = tl.program_id(0).to(tl.int64)
    s_row, t_row = _row_ptrs(S, T, row, s_d1, s_st0, s_st1, t_d1, t_st0, t_st1)
    y = tl.load(TOK + row).to(tl.int64)
    n_cols = tl.where(y != ignore_index, V, 0)
    st = ROWS + row * ROW_K
    l_s = tl.load(st + 5)
    l_t = tl.load(st + 6)
    a = tl.load(st + 11)
    b = tl.load(st + 12)
    zero = tl.sum(tl.zeros([BLOCK_V], dtype=tl.float32), 0)
    m_x = zero + NEG_INF
    z_x = zero
    ax = zero
    a_s = zero
    e_s = zero
    e_t = zero
    offs = tl.arange(0, BLOCK_V)
    for lo in range(0, n_cols, BLOCK_V):
        cols = lo + offs
        raw_s = _load_row_block(s_row, cols, s_stv, V, STRIDED_V)
        raw_t = _load_row_block(t_row, cols, t_stv, V, STRIDED_V)
        ls = raw_s * scale2 - l_s  # base-2 log-probabilities
        lt = raw_t * scale2 - l_t
        p = tl.exp2(ls)
        e_s += tl.sum(tl.where(p == 0.0, 0.0, p * ls), 0)
        e_t += tl.sum(tl.where(p == 0.0, 0.0, p * lt), 0)
        support = (raw_s != NEG_INF) & (raw_t != NEG_INF)
        x = tl.where(support, a * lt + b * ls, NEG_INF)
        m_x, z_x, ax, a_s = _cand_update(x, m_x, z_x, ax, a_s, ls, True)
    out = OUT + row * K
    tl.store(out + 0, m_x)
    tl.store(out + 1, z_x)
    tl.store(out + 2, ax)
    tl.store(out + 3, a_s)
    tl.store(out + 4, e_s)
    tl.store(out + 5, e_t)


@triton.jit
def _tp_bwd_kernel(
    S, T, TOK, ROWS, GROW, DS, V,
    s_d1, s_st0, s_st1, s_stv, t_d1, t_st0, t_st1, t_stv,
    scale2, inv_temp, ignore_index,
    REVERSE: tl.constexpr, STRIDED_V: tl.constexpr, BLOCK_V: tl.constexpr,
    ROW_K: tl.constexpr,
):
    NEG_INF: tl.constexpr = float("-inf")
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    s_row, t_row = _row_ptrs(S, T, row, s_d1, s_st0, s_st1, t_d1, t_st0, t_st1)
    valid = tl.load(TOK + row) != ignore_index
    gr = tl.load(GROW + row)
    st = ROWS + row * ROW_K
    l_s = tl.load(st + 5)
    l_t = tl.load(st + 6)
    l_q = tl.load(st + 7)
    e_u = tl.load(st + 8)
    a = tl.load(st + 11)
    b = tl.load(st + 12)
    raw_s = _load_row_block(s_row, cols, s_stv, V, STRIDED_V)
    raw_t = _load_row_block(t_row, cols, t_stv, V, STRIDED_V)
    ls = raw_s * scale2 - l_s
    lt = raw_t * scale2 - l_t
    p = tl.exp2(ls)
    if REVERSE:  # p (u - E_p[u]), u = (1 - b) lp_S - a lp_T (base 2: times ln 2)
        gv = tl.where(p == 0.0, 0.0, p * ((1.0 - b) * ls - a * lt - e_u)) \
            * (0.6931471805599453 * inv_temp)
    else:  # p - q
        x = tl.where((raw_s != NEG_INF) & (raw_t != NEG_INF), a * lt + b * ls, NEG_INF)
        gv = (p - tl.exp2(x - l_q)) * inv_temp
    gv = tl.where(valid, gv * gr, 0.0)
    tl.store(DS + row * V + cols, gv.to(DS.dtype.element_ty), mask=cols < V)


# ---------------------------------------------------------------------------
# launchers (s: this rank's student shard (..., V); t: the teacher's, (..., >= V))

def _layouts(s, t):
    return row_layout(s), row_layout(t)


def _args(ls, lt):
    return (ls.d1, ls.st0, ls.st1, ls.stv, lt.d1, lt.st0, lt.st1, lt.stv)


def _block(vocab):
    return min(BLOCK_V, triton.next_power_of_2(vocab))


def stats(s, t, tokens, *, start, temperature, ignore_index):
    """(N, STATS_K) float32: m_s, z_s, m_t, z_t (raw max, base-2 sums), s[y], t[y] and 1
    where this shard holds y (0 otherwise)."""
    vocab = s.shape[-1]
    ls, lt = _layouts(s, t)
    n = tokens.numel()
    out = torch.empty(n, STATS_K, dtype=torch.float32, device=s.device)
    if n:
        _tp_stats_kernel[(n,)](
            ls.tensor, lt.tensor, tokens, out, vocab, int(start), *_args(ls, lt),
            LOG2E / temperature, int(ignore_index), STRIDED_V=ls.stv != 1 or lt.stv != 1,
            BLOCK_V=_block(vocab), K=STATS_K, num_warps=NUM_WARPS)
    return out


def bridge(s, t, tokens, rows, *, temperature, ignore_index):
    """(N, BRIDGE_K) float32 from the row state's L_S, L_T, A, B (columns of ``rows``)."""
    vocab = s.shape[-1]
    ls, lt = _layouts(s, t)
    n = tokens.numel()
    out = torch.empty(n, BRIDGE_K, dtype=torch.float32, device=s.device)
    if n:
        _tp_bridge_kernel[(n,)](
            ls.tensor, lt.tensor, tokens, rows, out, vocab, *_args(ls, lt),
            LOG2E / temperature, int(ignore_index), STRIDED_V=ls.stv != 1 or lt.stv != 1,
            BLOCK_V=_block(vocab), ROW_K=rows.shape[1], K=BRIDGE_K, num_warps=NUM_WARPS)
    return out


def backward(grad_rows, s, t, tokens, rows, *, reverse, temperature, ignore_index):
    """This shard's d loss / d student logits, contiguous, the student's dtype and shape."""
    vocab = s.shape[-1]
    ls, lt = _layouts(s, t)
    n = tokens.numel()
    grad = torch.empty(s.shape, dtype=s.dtype, device=s.device)
    if n == 0:
        return grad
    block = _block(vocab)
    _tp_bwd_kernel[(n, triton.cdiv(vocab, block))](
        ls.tensor, lt.tensor, tokens, rows, grad_rows.float().contiguous(), grad, vocab,
        *_args(ls, lt), LOG2E / temperature, 1.0 / temperature, int(ignore_index),
        REVERSE=bool(reverse), STRIDED_V=ls.stv != 1 or lt.stv != 1, BLOCK_V=block,
        ROW_K=rows.shape[1], num_warps=NUM_WARPS)
    return grad
