"""Triton kernels of the vocabulary-parallel loss (docs/math.md): each rank reads its shard.

Two forward kernels, each one streaming pass over this rank's shard of both
models' logits, with O(rows) all-reduces between them and after them
(:func:`opd_rows_parallel` combines):

1. ``_tp_stats_kernel``: per row, the online (max, sum 2^(s - max)) of both
   models in raw units, the teacher's logit at the shard's best student token,
   and the sampled token's raw logits where this shard holds it. Combined:
   both normalizers, delta, the gate, the bridge coefficients, and the row's
   frame: the student's global maximum and the teacher's logit there.
2. ``_tp_bridge_kernel``: against that frame (the single-device kernels'
   centring, so near-converged rows keep their precision), the student's
   probability mass and the two frame-relative means, and the online (max, sum)
   of the bridge x = a (t - f_t) + b (s - f_s) with the forward-KL sums.
   Combined: the loss, the statistics, and the single-device row table.

The backward is the single-device backward kernel (``logits._opd_bwd_kernel``)
on that table, without communication. :func:`opd_rows_parallel` combines the
kernels' partial statistics across the ranks; nothing is read on the host: a
token id that no rank holds makes its row's loss and gradient NaN, and shards of
unequal widths make every row NaN (the widths travel with the first all-reduce).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from .. import _rows as C
from ..parallel import all_reduce, finite, shard_start
from ..reference import gate_lambda, sampled_delta
from ._layout import row_layout
from ._table import (A, B, FRAME_S, FRAME_T, LOG2Z_Q, LOG2Z_S, LOGITS_K, MAX_Q, MEAN_S, MEAN_T,
                     REF_S)
from .logits import (LOG2E, _bridge, _cand_update, _divergence, _load_row_block, _online,
                     _row_ptr, opd_rows_backward)

STATS_K = 8   # m_s, z_s, m_t, z_t, s[y], t[y], 1 where the shard holds y, t at argmax s
BRIDGE_K = 7  # m_x, z_x, ax, as, sum p, sum p sf, sum p tf
BLOCK_V = 4096
NUM_WARPS = 8


@triton.jit
def _tp_stats_kernel(
    S, T, TOK, OUT, V, start,
    s_d1, s_st0, s_st1, s_stv, t_d1, t_st0, t_st1, t_stv,
    scale2, tscale2, ignore_index,
    STRIDED_V: tl.constexpr, BLOCK_V: tl.constexpr, K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = _row_ptr(S, row, s_d1, s_st0, s_st1)
    t_row = _row_ptr(T, row, t_d1, t_st0, t_st1)
    y = tl.load(TOK + row).to(tl.int64)
    valid = y != ignore_index
    n_cols = tl.where(valid, V, 0)
    zero = tl.sum(tl.zeros([BLOCK_V], dtype=tl.float32), 0)
    m_s = zero + float("-inf")
    m_t = zero + float("-inf")
    z_s = zero
    z_t = zero
    t_best = zero  # the teacher's raw logit at the best student token so far
    offs = tl.arange(0, BLOCK_V)
    for lo in range(0, n_cols, BLOCK_V):
        cols = lo + offs
        raw_s = _load_row_block(s_row, cols, s_stv, V, STRIDED_V)
        raw_t = _load_row_block(t_row, cols, t_stv, V, STRIDED_V)
        t_at = tl.sum(tl.where(offs == tl.argmax(raw_s, 0), raw_t, 0.0), 0)
        t_best = tl.where(tl.max(raw_s, 0) > m_s, t_at, t_best)
        m_s, z_s = _online(raw_s, m_s, z_s, scale2)
        m_t, z_t = _online(raw_t, m_t, z_t, tscale2)
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
    tl.store(out + 7, t_best)


@triton.jit
def _tp_bridge_kernel(
    S, T, TOK, ROWS, OUT, V,
    s_d1, s_st0, s_st1, s_stv, t_d1, t_st0, t_st1, t_stv,
    scale2, tscale2, ignore_index,
    STRIDED_V: tl.constexpr, BLOCK_V: tl.constexpr, K: tl.constexpr,
):
    NEG_INF: tl.constexpr = float("-inf")
    row = tl.program_id(0).to(tl.int64)
    s_row = _row_ptr(S, row, s_d1, s_st0, s_st1)
    t_row = _row_ptr(T, row, t_d1, t_st0, t_st1)
    y = tl.load(TOK + row).to(tl.int64)
    n_cols = tl.where(y != ignore_index, V, 0)
    st = ROWS + row * LOGITS_K  # the single-device table (triton/_table.py)
    r_s = tl.load(st + REF_S)
    lz_s = tl.load(st + LOG2Z_S)
    f_s = tl.load(st + FRAME_S)
    f_t = tl.load(st + FRAME_T)
    a = tl.load(st + A)
    b = tl.load(st + B)
    zero = tl.sum(tl.zeros([BLOCK_V], dtype=tl.float32), 0)
    m_x = zero + NEG_INF
    z_x = zero
    ax = zero
    a_s = zero
    p_sum = zero
    p_sf = zero
    p_tf = zero
    offs = tl.arange(0, BLOCK_V)
    for lo in range(0, n_cols, BLOCK_V):
        cols = lo + offs
        raw_s = _load_row_block(s_row, cols, s_stv, V, STRIDED_V)
        raw_t = _load_row_block(t_row, cols, t_stv, V, STRIDED_V)
        sf = (raw_s - f_s) * scale2
        tf = (raw_t - f_t) * tscale2
        p = tl.exp2((raw_s - r_s) * scale2 - lz_s)
        p_sum += tl.sum(p, 0)
        p_sf += tl.sum(tl.where(p == 0.0, 0.0, p * sf), 0)
        p_tf += tl.sum(tl.where(p == 0.0, 0.0, p * tf), 0)
        x = _bridge(tf, sf, a, b, (raw_s != NEG_INF) & (raw_t != NEG_INF))
        m_x, z_x, ax, a_s = _cand_update(x, m_x, z_x, ax, a_s, sf, True)
    out = OUT + row * K
    tl.store(out + 0, m_x)
    tl.store(out + 1, z_x)
    tl.store(out + 2, ax)
    tl.store(out + 3, a_s)
    tl.store(out + 4, p_sum)
    tl.store(out + 5, p_sf)
    tl.store(out + 6, p_tf)


# ---------------------------------------------------------------------------
# launchers (s: this rank's student shard (..., V); t: the teacher's, (..., >= V))

def _launch(kernel, s, t, tokens, extra, k, opts, **const):
    vocab = s.shape[-1]
    ls, lt = row_layout(s), row_layout(t)
    n = tokens.numel()
    out = torch.empty(n, k, dtype=torch.float32, device=s.device)
    if n:
        kernel[(n,)](
            ls.tensor, lt.tensor, tokens, *extra, out, vocab, *const.pop("start", ()),
            ls.d1, ls.st0, ls.st1, ls.stv, lt.d1, lt.st0, lt.st1, lt.stv,
            LOG2E / opts.temperature, LOG2E / opts.teacher_temperature,
            int(opts.ignore_index), STRIDED_V=ls.stv != 1 or lt.stv != 1,
            BLOCK_V=min(BLOCK_V, triton.next_power_of_2(vocab)), K=k, num_warps=NUM_WARPS,
            **const)
    return out


def stats(s, t, tokens, opts, *, start):
    """(N, STATS_K) float32 per-row partial statistics of this shard (see the kernel)."""
    return _launch(_tp_stats_kernel, s, t, tokens, (), STATS_K, opts, start=(int(start),))


def bridge(s, t, tokens, rows, opts):
    """(N, BRIDGE_K) float32 from the table's REF_S, LOG2Z_S, FRAME_S, FRAME_T, A, B."""
    return _launch(_tp_bridge_kernel, s, t, tokens, (rows,), BRIDGE_K, opts)


# ---------------------------------------------------------------------------
# the combination across ranks (the torch path's rounds, in these kernels' units)

LN2 = 0.6931471805599453
NEG_INF = float("-inf")


def opd_rows_parallel(s, t, tokens, sign, opts, group):
    """The single-device Triton row table (triton/_table.py) of a vocabulary-sharded row.

    Frame of the row's linear sums: the student's global maximum and the teacher's logit
    at that token (the single-device kernels' centring).
    """
    _divergence(opts)
    n, vl = tokens.numel(), s.shape[-1]
    scale2 = LOG2E / opts.temperature
    tscale2 = LOG2E / opts.teacher_temperature
    valid = tokens != opts.ignore_index
    st = stats(s, t, tokens, opts, start=shard_start(vl, group))
    # round 1: raw maxima; its last row carries (V_local, -V_local): equal widths iff the
    # two maxima are opposite
    width = st.new_full((1, 2), float(vl))
    width[:, 1] = -vl
    m = all_reduce(torch.cat([st[:, [0, 2]], width]), dist.ReduceOp.MAX, group)
    unequal = m[-1, 0] != -m[-1, 1]
    r_s, r_t = finite(m[:-1, 0]), finite(m[:-1, 1])
    # round 2: rescaled sums, y's logits from its holder, the teacher at the student's argmax
    tie = (st[:, 0] == m[:-1, 0]) & (st[:, 0] != NEG_INF)
    r2 = all_reduce(torch.stack([
        st[:, 1] * torch.exp2((st[:, 0] - r_s) * scale2),
        st[:, 3] * torch.exp2((st[:, 2] - r_t) * tscale2),
        st[:, 4], st[:, 5], st[:, 6],
        torch.where(tie, st[:, 7], torch.zeros_like(r_s)), tie.to(torch.float32)], -1),
        dist.ReduceOp.SUM, group)
    lz_s = torch.where(r2[:, 0] == 0, math.inf, torch.log2(r2[:, 0]))  # no support: lp = -inf
    lz_t = torch.where(r2[:, 1] == 0, math.inf, torch.log2(r2[:, 1]))
    f_t = r2[:, 5] / r2[:, 6].clamp(min=1)  # (the mean over ranks whose maxima tie)
    f_t = torch.where(torch.isfinite(f_t) & (r2[:, 6] > 0), f_t, r_t)
    f_s = r_s
    lps_y = (r2[:, 2] - r_s) * scale2 - lz_s  # base 2
    lpt_y = (r2[:, 3] - r_t) * tscale2 - lz_t
    delta = sampled_delta(lpt_y * LN2, lps_y * LN2)
    lam, g = gate_lambda(delta, sign, opts.lam_pos, opts.lam_neg)
    # a token no rank holds (out of range), or shards that do not tile the vocabulary: NaN
    lam = torch.where(unequal | (valid & (r2[:, 4] != 1)), math.nan, lam)
    a, b = lam, 1.0 - lam + opts.beta
    rows = torch.zeros(n, LOGITS_K.value, dtype=torch.float32, device=s.device)
    rows[:, REF_S.value], rows[:, LOG2Z_S.value] = r_s, lz_s
    rows[:, FRAME_S.value], rows[:, FRAME_T.value] = f_s, f_t
    rows[:, A.value], rows[:, B.value] = a, b
    # round 3 and 4: the bridge's maximum, then its sums and the student's means
    br = bridge(s, t, tokens, rows, opts)
    m_x = all_reduce(br[:, 0].clone(), dist.ReduceOp.MAX, group)
    m_c = finite(m_x)
    k = torch.exp2(br[:, 0] - m_c)
    shifted = torch.where(br[:, 1] == 0, torch.zeros_like(m_c), br[:, 2] + (br[:, 0] - m_c)
                          * br[:, 1])
    r4 = all_reduce(torch.stack([br[:, 1] * k, k * shifted, br[:, 3] * k, br[:, 4], br[:, 5],
                                 br[:, 6]], -1), dist.ReduceOp.SUM, group)
    z_c, p_sum = r4[:, 0], r4[:, 3]
    lz_c = torch.log2(z_c)
    no_p = p_sum == 0  # a student without support: its expectations are 0
    mean_s = torch.where(no_p, torch.zeros_like(p_sum), r4[:, 4] / p_sum)
    mean_t = torch.where(no_p, torch.zeros_like(p_sum), r4[:, 5] / p_sum)
    off_s = (f_s - r_s) * scale2 - lz_s  # lp_S = sf + off_s (base 2)
    off_t = (f_t - r_t) * tscale2 - lz_t
    elp_s = torch.where(no_p, torch.zeros_like(p_sum), mean_s + off_s)
    elp_t = torch.where(no_p, torch.zeros_like(p_sum), mean_t + off_t)
    if opts.reverse:  # as in the single-device kernel
        loss = (1.0 - b) * elp_s - a * elp_t + (m_c + lz_c + a * off_t + b * off_s)
    else:
        loss = (r4[:, 1] / z_c - lz_c) - (r4[:, 2] / z_c + off_s)
    loss = torch.where(z_c == 0, torch.full_like(loss, math.inf), loss * LN2)
    zero = torch.zeros_like(loss)
    for c, v in ((C.LOSS, loss), (C.DELTA, delta), (C.GATE, g),
                 (C.TEACHER_KL, (elp_s - elp_t) * LN2), (C.ENTROPY, -elp_s * LN2)):
        rows[:, c] = torch.where(valid, v, zero)
    rows[:, MEAN_S.value], rows[:, MEAN_T.value] = mean_s, mean_t
    rows[:, MAX_Q.value], rows[:, LOG2Z_Q.value] = m_c, lz_c
    return rows


def opd_rows_parallel_backward(grad_rows, s, t, tokens, rows, opts, group):
    """The single-device backward kernel on the combined table: no communication."""
    return opd_rows_backward(grad_rows, s, t, tokens, rows, opts, local_tokens=False)
