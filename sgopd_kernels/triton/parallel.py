"""Triton kernels of the vocabulary-parallel loss (SPEC §7): each rank reads its shard.

Two forward kernels, each one streaming pass over this rank's shard of both
models' logits, with O(rows) all-reduces between them and after them
(``sgopd_kernels.parallel`` combines):

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
on that table, without communication.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .logits import LOG2E, _bridge, _cand_update, _load_row_block, _online, _row_ptr
from ._layout import row_layout

STATS_K = 8   # m_s, z_s, m_t, z_t, s[y], t[y], 1 where the shard holds y, t at argmax s
BRIDGE_K = 7  # m_x, z_x, ax, as, sum p, sum p sf, sum p tf
BLOCK_V = 4096
NUM_WARPS = 8


@triton.jit
def _tp_stats_kernel(
    S, T, TOK, OUT, V, start,
    s_d1, s_st0, s_st1, s_stv, t_d1, t_st0, t_st1, t_stv,
    scale2, ignore_index,
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
        m_t, z_t = _online(raw_t, m_t, z_t, scale2)
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
    scale2, ignore_index,
    STRIDED_V: tl.constexpr, BLOCK_V: tl.constexpr, ROW_K: tl.constexpr, K: tl.constexpr,
):
    NEG_INF: tl.constexpr = float("-inf")
    row = tl.program_id(0).to(tl.int64)
    s_row = _row_ptr(S, row, s_d1, s_st0, s_st1)
    t_row = _row_ptr(T, row, t_d1, t_st0, t_st1)
    y = tl.load(TOK + row).to(tl.int64)
    n_cols = tl.where(y != ignore_index, V, 0)
    st = ROWS + row * ROW_K  # the single-device table's columns (sgopd_kernels/_rows.py)
    r_s = tl.load(st + 5)
    lz_s = tl.load(st + 6)
    f_s = tl.load(st + 7)
    f_t = tl.load(st + 8)
    a = tl.load(st + 11)
    b = tl.load(st + 12)
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
        tf = (raw_t - f_t) * scale2
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

def _launch(kernel, s, t, tokens, extra, k, temperature, ignore_index, **const):
    vocab = s.shape[-1]
    ls, lt = row_layout(s), row_layout(t)
    n = tokens.numel()
    out = torch.empty(n, k, dtype=torch.float32, device=s.device)
    if n:
        kernel[(n,)](
            ls.tensor, lt.tensor, tokens, *extra, out, vocab, *const.pop("start", ()),
            ls.d1, ls.st0, ls.st1, ls.stv, lt.d1, lt.st0, lt.st1, lt.stv,
            LOG2E / temperature, int(ignore_index), STRIDED_V=ls.stv != 1 or lt.stv != 1,
            BLOCK_V=min(BLOCK_V, triton.next_power_of_2(vocab)), K=k, num_warps=NUM_WARPS,
            **const)
    return out


def stats(s, t, tokens, *, start, temperature, ignore_index):
    """(N, STATS_K) float32 per-row partial statistics of this shard (see the kernel)."""
    return _launch(_tp_stats_kernel, s, t, tokens, (), STATS_K, temperature, ignore_index,
                   start=(int(start),))


def bridge(s, t, tokens, rows, *, temperature, ignore_index):
    """(N, BRIDGE_K) float32 from the table's REF_S, LOG2Z_S, FRAME_S, FRAME_T, A, B."""
    return _launch(_tp_bridge_kernel, s, t, tokens, (rows,), BRIDGE_K, temperature,
                   ignore_index, ROW_K=rows.shape[1])
