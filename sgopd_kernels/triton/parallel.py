"""Triton kernels of the vocabulary-parallel loss (docs/math.md): each rank reads its shard.

Two forward kernels, each one streaming pass over this rank's shard of both
models' logits, with O(rows) all-reduces between them and after them
(:func:`opd_rows_parallel` combines):

1. ``_tp_stats_kernel``: per row, the (max, sum 2^((s - max) scale2)) of both
   models in raw units, the teacher's logit at the shard's best student token
   (the largest among tied ones), and the sampled token's raw logits where this
   shard holds it. Combined: both normalizers, delta, the gate, the bridge
   coefficients, and the row's frame: the student's global maximum and the
   teacher's logit there (its own maximum where that logit lies 2^20 base-2
   units or more below it). No guard: against a slot's own maximum every exponent
   is finite or -inf.
2. ``_tp_bridge_kernel``: against that frame (the single-device kernels'
   centring, so near-converged rows keep their precision), the student's
   probability mass and the two frame-relative means, and the (max, sum) of the
   bridge x = a (t - f_t) + b (s - f_s), with the forward-KL sums for forward
   KL only. Combined: the loss, the statistics, and the single-device row
   table. Block 0 and the partial last block are masked and guarded, the full
   blocks between them neither; a row that meets a -inf there (a NaN in some
   sum) reads itself again with the guards, as the single-device kernels do.

Both keep their state per slot of a [BLOCK_V // 8, 8] tile and combine the
slots once per row (``_common``), so a block costs no block-wide reduction.
A shard whose rows start off a 16-byte boundary (``ALIGN``, ``logits._fwd_plan``)
streams its full blocks on the grid shifted back to one (:func:`_grids`).

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
from ._common import (DIFF, FMA, ROW, SLOT, any_nan, bridge, combine_bridge, fma_frames,
                      fold_bridge, frame_units, grid_lead, load_block, load_full, on_grid,
                      row_frame, row_offset, row_ptr, row_token, slot_state, tile)
from .logits import LOG2E, _divergence, _fwd_plan, fwd_block, opd_rows_backward

# m_s, z_s, m_t, z_t, s[y], t[y], 1 where the shard holds y, and the largest t among the
# shard's maximal s
STATS_K = 8
FRAME_JUMP = 2.0 ** 20  # base-2 units (as the single-device kernel's)
BRIDGE_K = 7  # m_x, z_x, ax, as, sum p, sum p sf, sum p tf
BLOCK_V = 4096
NUM_WARPS = 8


@triton.jit
def _stats_fold(st, raw_s, raw_t, scale2, tscale2):
    """Fold a tile into the per-slot (student max, sum, teacher max, sum, the teacher's logit
    at the student's maximum). No guard is needed: with the slot's max as reference an
    exponent is -inf (a masked logit: 2^-inf = 0) or finite."""
    m_s, z_s, m_t, z_t, t_best = st
    mx = tl.max(raw_s, 1)
    # the largest teacher logit among the tile slot's maximal student logits
    t_at = tl.max(tl.where(raw_s == mx[:, None], raw_t, float("-inf")), 1)
    t_best = tl.where(mx > m_s, t_at, tl.where(mx == m_s, tl.maximum(t_best, t_at), t_best))
    nm_s = tl.maximum(m_s, mx)
    r_s = tl.where(nm_s == float("-inf"), 0.0, nm_s)
    z_s = z_s * tl.exp2(tl.where(m_s == float("-inf"), 0.0, (m_s - r_s) * scale2)) \
        + tl.sum(tl.exp2((raw_s - r_s[:, None]) * scale2), 1)
    nm_t = tl.maximum(m_t, tl.max(raw_t, 1))
    r_t = tl.where(nm_t == float("-inf"), 0.0, nm_t)
    z_t = z_t * tl.exp2(tl.where(m_t == float("-inf"), 0.0, (m_t - r_t) * tscale2)) \
        + tl.sum(tl.exp2((raw_t - r_t[:, None]) * tscale2), 1)
    return nm_s, z_s, nm_t, z_t, t_best


@triton.jit
def _combine_max_sum(m, z, scale2):
    """Across slots: the row's (raw max, sum 2^((raw - max) scale2))."""
    M = tl.max(m, 0)
    R = tl.where(M == float("-inf"), 0.0, M)
    w = tl.where(m == float("-inf"), 0.0, tl.exp2((m - R) * scale2))
    return M, tl.sum(z * w, 0)


@triton.jit
def _grids(S, T, row, s_d1, s_st0, s_st1, t_d1, t_st0, t_st1, n_cols, ALIGN: tl.constexpr,
           T_SAME: tl.constexpr, BLOCK_V: tl.constexpr):
    """The grids the full blocks stream (s_grid, t_grid, lead, first): with ALIGN (a shard
    whose rows start off a 16-byte boundary) the rows on the grid of ``_common.grid_lead``,
    so that the grid's full blocks keep 128-bit loads; block 0, masked,
    covers the row's columns [0, first = min(n_cols, BLOCK_V - lead)). Without: the rows,
    lead 0 and first 0 (block 0 is a full block)."""
    s_off = row_offset(row, s_d1, s_st0, s_st1)
    lead = grid_lead(s_off, ALIGN)
    if ALIGN:
        first = tl.minimum(n_cols, BLOCK_V - lead)
    else:
        first = 0
    return (on_grid(S, s_off, lead, ALIGN, True),
            on_grid(T, row_offset(row, t_d1, t_st0, t_st1), lead, ALIGN, T_SAME), lead, first)


@triton.jit
def _tp_stats_kernel(
    S, T, TOK, OUT, V, start,
    s_d1, s_st0, s_st1, s_stv, t_d1, t_st0, t_st1, t_stv,
    scale2, tscale2, ignore_index,
    STRIDED_V: tl.constexpr, BLOCK_V: tl.constexpr, K: tl.constexpr,
    ALIGN: tl.constexpr = False, T_SAME: tl.constexpr = False,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = row_ptr(S, row, s_d1, s_st0, s_st1)
    t_row = row_ptr(T, row, t_d1, t_st0, t_st1)
    y, valid, _ = row_token(TOK, row, V, ignore_index)
    n_cols = tl.where(valid, V, 0)  # a masked row reads nothing
    neg = slot_state(BLOCK_V, float("-inf"))
    zero = slot_state(BLOCK_V, 0.0)
    st = (neg, zero, neg, zero, neg)
    offs = tile(BLOCK_V)
    s_grid, t_grid, lead, first = _grids(S, T, row, s_d1, s_st0, s_st1, t_d1, t_st0,
                                         t_st1, n_cols, ALIGN, T_SAME, BLOCK_V)
    if ALIGN:  # block 0 masked: the row's columns [0, first)
        st = _stats_fold(st, load_block(s_row, offs, s_stv, first, STRIDED_V),
                         load_block(t_row, offs, t_stv, first, STRIDED_V), scale2, tscale2)
    # the full blocks of the grid unmasked, then the partial last block masked (-inf past
    # the shard)
    n_full = ((n_cols + lead) // BLOCK_V) * BLOCK_V
    for lo in range(BLOCK_V if ALIGN else 0, n_full, BLOCK_V):
        cols = lo + offs
        st = _stats_fold(st, load_full(s_grid, cols, s_stv, STRIDED_V),
                         load_full(t_grid, cols, t_stv, STRIDED_V), scale2, tscale2)
    for lo in range(tl.maximum(n_full - lead, first), n_cols, BLOCK_V):  # at most once
        cols = lo + offs
        st = _stats_fold(st, load_block(s_row, cols, s_stv, V, STRIDED_V),
                         load_block(t_row, cols, t_stv, V, STRIDED_V), scale2, tscale2)
    m_s, z_s = _combine_max_sum(st[0], st[1], scale2)
    m_t, z_t = _combine_max_sum(st[2], st[3], tscale2)
    t_best = tl.max(tl.where(st[0] == m_s, st[4], float("-inf")), 0)
    yl = y - start  # this shard's column of the sampled token, if it holds it
    own = valid & (yl >= 0) & (yl < V)
    yl = tl.where(own, yl, 0)
    s_y = tl.load(s_row + yl * s_stv, mask=own, other=0.0).to(tl.float32)
    t_y = tl.load(t_row + yl * t_stv, mask=own, other=0.0).to(tl.float32)
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
def _bridge_fold(st, raw_s, raw_t, r_s, f_t, lz_s, coef, FKL: tl.constexpr,
                 GUARD: tl.constexpr, FORM: tl.constexpr):
    """Fold a tile into the per-slot (sum p, sum p sf, sum p tf) and the bridge's state
    (max x, sum 2^(x - max), and for forward KL its two sums), sf = (raw_s - r_s) scale2 (the
    frame's student logit is the row's maximum), tf = (raw_t - f_t) tscale2, in the frame
    units the backward forms (``_common.frame_units`` in the form ``FORM``, of frames r_s
    and f_t: for forward KL FMA's or the row's, whose shift the kernel takes out of the
    row's sums; ``lz_s`` holds the shift of r_s). Without GUARD nothing is sanitized: a -inf
    logit leaves a NaN, and the row is read again with it."""
    p_sum, p_sf, p_tf, q = st
    scale2, tscale2, a, b = coef
    sf = frame_units(raw_s, r_s, scale2, FORM)
    tf = frame_units(raw_t, f_t, tscale2, FORM)
    p = tl.exp2(sf - lz_s)
    if GUARD:
        psf = tl.where(p == 0.0, 0.0, p * sf)
        ptf = tl.where(p == 0.0, 0.0, p * tf)
        x = bridge(tf, sf, a, b, (raw_s != float("-inf")) & (raw_t != float("-inf")))
    else:
        psf = p * sf
        ptf = p * tf
        x = tl.fma(a, tf, b * sf)
    q = fold_bridge(q, x, sf, FKL, GUARD)
    return p_sum + tl.sum(p, 1), p_sf + tl.sum(psf, 1), p_tf + tl.sum(ptf, 1), q


@triton.jit
def _bridge_range(st, s_row, t_row, lo, hi, V, s_stv, t_stv, r_s, f_t, lz_s, coef,
                  FKL: tl.constexpr, FORM: tl.constexpr, STRIDED_V: tl.constexpr,
                  BLOCK_V: tl.constexpr):
    """Fold the row's columns [lo, hi) (hi <= V) in blocks from lo, masked and guarded."""
    offs = tile(BLOCK_V)
    for c0 in range(lo, hi, BLOCK_V):
        cols = c0 + offs
        st = _bridge_fold(st, load_block(s_row, cols, s_stv, hi, STRIDED_V),
                          load_block(t_row, cols, t_stv, hi, STRIDED_V), r_s, f_t, lz_s, coef,
                          FKL, True, FORM)
    return st


@triton.jit
def _tp_bridge_kernel(
    S, T, TOK, ROWS, OUT, V,
    s_d1, s_st0, s_st1, s_stv, t_d1, t_st0, t_st1, t_stv,
    scale2, tscale2, ignore_index,
    STRIDED_V: tl.constexpr, BLOCK_V: tl.constexpr, K: tl.constexpr, FKL: tl.constexpr,
    ALIGN: tl.constexpr = False, T_SAME: tl.constexpr = False,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = row_ptr(S, row, s_d1, s_st0, s_st1)
    t_row = row_ptr(T, row, t_d1, t_st0, t_st1)
    _, valid, _ = row_token(TOK, row, V, ignore_index)
    n_cols = tl.where(valid, V, 0)
    tab = ROWS + row * LOGITS_K  # the single-device table (triton/_table.py)
    r_s = tl.load(tab + REF_S)
    f_t = tl.load(tab + FRAME_T)
    # frame units (_common.frame_units): forward KL streams the shard in FMA form and reads
    # it again in the row's (FMA's bits, or DIFF's where the frame is too large for FMA:
    # such a row skips the full blocks); reverse KL takes DIFF throughout
    MAIN: tl.constexpr = FMA if FKL else DIFF
    RFORM: tl.constexpr = ROW if FKL else DIFF
    if FKL:
        fma_ok = fma_frames(r_s, f_t, scale2, tscale2)
        rf_s = row_frame(r_s, scale2, fma_ok)
        rf_t = row_frame(f_t, tscale2, fma_ok)
    else:
        rf_s = r_s
        rf_t = f_t
    # the shifts of the frame units (0 in DIFF form; in FMA form the rounding of r_s scale2
    # and of f_t tscale2): p's exponent is sf - e_s - lz_s, and the sums of sf and tf leave
    # the kernel without them
    e_s = frame_units(r_s, rf_s, scale2, RFORM)
    e_t = frame_units(f_t, rf_t, tscale2, RFORM)
    lz_s = tl.load(tab + LOG2Z_S) + e_s
    coef = (scale2, tscale2, tl.load(tab + A), tl.load(tab + B))
    neg = slot_state(BLOCK_V, float("-inf"))
    zero = slot_state(BLOCK_V, 0.0)
    empty = (zero, zero, zero, (neg, zero, zero, zero))
    # block 0 and the partial last block masked and guarded, the full blocks between them
    # neither (opd_rows_parallel stores the frame FRAME_S = REF_S)
    # (ALIGN: the full blocks on the grid of _grids, block 0 the row's columns [0, first))
    offs = tile(BLOCK_V)
    s_grid, t_grid, lead, first = _grids(S, T, row, s_d1, s_st0, s_st1, t_d1, t_st0,
                                         t_st1, n_cols, ALIGN, T_SAME, BLOCK_V)
    if not ALIGN:
        first = tl.minimum(n_cols, BLOCK_V)
    st = _bridge_range(empty, s_row, t_row, 0, first, V, s_stv, t_stv, r_s, f_t, lz_s, coef,
                       FKL, MAIN, STRIDED_V, BLOCK_V)
    n_full = ((n_cols + lead) // BLOCK_V) * BLOCK_V
    if FKL:
        n_body = tl.where(fma_ok, n_full, 0)
    else:
        n_body = n_full
    for lo in range(BLOCK_V, n_body, BLOCK_V):
        cols = lo + offs
        st = _bridge_fold(st, load_full(s_grid, cols, s_stv, STRIDED_V),
                          load_full(t_grid, cols, t_stv, STRIDED_V), r_s, f_t, lz_s, coef, FKL,
                          False, MAIN)
    st = _bridge_range(st, s_row, t_row, tl.maximum(n_full - lead, first), n_cols, V, s_stv,
                       t_stv, r_s, f_t, lz_s, coef, FKL, MAIN, STRIDED_V, BLOCK_V)
    # an unguarded block that met a -inf (or NaN) logit left a NaN: read the row again guarded
    # (sum p tf may be -inf, where the teacher masks a token the student supports; no sum is
    # ever +inf, so the total is NaN exactly where one of them is)
    chk = st[0] + st[1] + st[2] + st[3][1]
    if FKL:
        chk += st[3][2] + st[3][3]
    redo = any_nan(chk) & (n_full > BLOCK_V)
    if FKL:  # (and a row whose frame is too large for FMA, in DIFF form)
        redo = redo | ~fma_ok
    st = _bridge_range(
        (tl.where(redo, 0.0, st[0]), tl.where(redo, 0.0, st[1]), tl.where(redo, 0.0, st[2]),
         (tl.where(redo, float("-inf"), st[3][0]), tl.where(redo, 0.0, st[3][1]),
          tl.where(redo, 0.0, st[3][2]), tl.where(redo, 0.0, st[3][3]))),
        s_row, t_row, 0, tl.where(redo, n_cols, 0), V, s_stv, t_stv, rf_s, rf_t, lz_s, coef, FKL,
        RFORM, STRIDED_V, BLOCK_V)
    m_x, z_x, ax, a_s = combine_bridge(st[3], FKL)
    p_sum = tl.sum(st[0], 0)
    out = OUT + row * K
    tl.store(out + 0, m_x)
    tl.store(out + 1, z_x)
    tl.store(out + 2, ax)
    tl.store(out + 3, a_s - e_s * z_x)
    tl.store(out + 4, p_sum)
    tl.store(out + 5, tl.sum(st[1], 0) - e_s * p_sum)
    tl.store(out + 6, tl.sum(st[2], 0) - e_t * p_sum)


# ---------------------------------------------------------------------------
# launchers (s: this rank's student shard (..., V); t: the teacher's, (..., >= V))

def _launch(kernel, s, t, tokens, extra, k, opts, **const):
    vocab = s.shape[-1]
    ls, lt = row_layout(s), row_layout(t)
    n = tokens.numel()
    out = torch.empty(n, k, dtype=torch.float32, device=s.device)
    if n:
        plan = _fwd_plan(ls, lt, vocab)
        kernel[(n,)](
            ls.tensor, lt.tensor, tokens, *extra, out, vocab, *const.pop("start", ()),
            ls.d1, ls.st0, ls.st1, ls.stv, lt.d1, lt.st0, lt.st1, lt.stv,
            LOG2E / opts.temperature, LOG2E / opts.teacher_temperature,
            int(opts.ignore_index), STRIDED_V=ls.stv != 1 or lt.stv != 1,
            BLOCK_V=_block(vocab, plan["ALIGN"]), K=k, num_warps=NUM_WARPS, **plan, **const)
    return out


def _block(vocab: int, align: bool) -> int:
    """The forward's block. On the shifted grid only the grid's full blocks past block 0 are
    vectorized, so a block of at most half the shard keeps some there (a shard of 6282
    columns in blocks of 2048: two of them; in blocks of 4096, none), but not below one slot
    per thread (SLOT 32 NUM_WARPS logits: a slot split across threads costs shuffles)."""
    block = fwd_block(vocab, None, BLOCK_V)
    if align:
        half = 1 << max((vocab // 2).bit_length() - 1, 0)
        block = min(block, max(SLOT.value * 32 * NUM_WARPS, half))
    return block


def stats(s, t, tokens, opts, *, start):
    """(N, STATS_K) float32 per-row partial statistics of this shard (see the kernel)."""
    return _launch(_tp_stats_kernel, s, t, tokens, (), STATS_K, opts, start=(int(start),))


def bridge_sums(s, t, tokens, rows, opts):
    """(N, BRIDGE_K) float32 from the table's REF_S (= FRAME_S), LOG2Z_S, FRAME_T, A, B; the
    forward-KL sums (columns 2, 3) are 0 for reverse KL."""
    return _launch(_tp_bridge_kernel, s, t, tokens, (rows,), BRIDGE_K, opts,
                   FKL=not opts.reverse)


# ---------------------------------------------------------------------------
# the combination across ranks (the torch path's rounds, in these kernels' units)

LN2 = 0.6931471805599453
NEG_INF = float("-inf")


def opd_rows_parallel(s, t, tokens, sign, opts, group):
    """The single-device Triton row table (triton/_table.py) of a vocabulary-sharded row.

    Frame of the row's linear sums: the student's global maximum and the teacher's logit
    at that token (the single-device kernels' centring), or the teacher's maximum where that
    logit lies FRAME_JUMP or more below it.
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
    # a teacher that holds the student's best token FRAME_JUMP base-2 units or more below its
    # own maximum (one that masks it with -1e15, say) is centred on that maximum, near the
    # mass of q, rather than on a value whose distance from the rest it could not resolve
    # (closer, the student's best token stays the better frame: peaked rows keep their digits)
    f_t = torch.where((r_t - f_t) * tscale2 >= FRAME_JUMP, r_t, f_t)
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
    # (the bridge kernel takes its student frame from REF_S: FRAME_S must stay r_s)
    rows[:, FRAME_S.value], rows[:, FRAME_T.value] = f_s, f_t
    rows[:, A.value], rows[:, B.value] = a, b
    # round 3 and 4: the bridge's maximum, then its sums and the student's means
    br = bridge_sums(s, t, tokens, rows, opts)
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
