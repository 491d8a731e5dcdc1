"""Fused Triton kernels of the gated OPD loss on logits (reverse and forward KL).

Forward, one program per row, one streaming pass over the vocabulary that
reads every student and teacher logit once. Exponentials are base 2: with
``scale2 = log2(e) / tau`` the scaled logits are ``s = z_S * scale2``, and the
row carries

- the online (max, sum 2^(s - max)) of the student and of the teacher,
- sum 2^(s - max) (s - f_s) and sum 2^(s - max) (t - f_t), which give
  E_{p_S}[lp_S] and E_{p_S}[lp_T] (f: the fixed frame below),
- for each candidate lambda the row can take (lambda+ and lambda- where the
  verifier has a verdict, 1 otherwise) the online lse of the bridge value
  x = a (t - f_t) + b (s - f_s) over the joint support, and for forward KL
  also sum 2^(x - max x) (x - max x) and sum 2^(x - max x) (s - f_s).

Every linear accumulator is centred on a frame fixed before the pass: both
models' logits at one token the student likes (the sampled token, or the
student's best in the first block if it rates that higher). It never moves,
so nothing is shifted when a running max changes, and the values that carry
the student's probability sit near it, small and exact. Maxima
are kept in raw logit units and every exponent is ``(raw - ref) * scale2``,
so the row max contributes exactly 2^0 and the backward recomputes the same
bits. After the pass the gate picks the candidate, and the row's loss,
statistics and backward state go to a small float32 table (``_rows``). A row
whose verifier has a verdict but whose delta is exactly 0 needs the lambda = 1
candidate that was not carried: it reads its row a second time (a rare case;
the loop is empty for every other row). So does a row whose student-weighted
means land more than 16 (base-2 units) from the frame: it reads itself again
centred on those means.

Backward: a 2-D grid over (row, vocabulary block) that re-reads the logits and
writes the gradient from the saved row state. The gradient is not stored in
forward: docs/design.md gives the byte counts behind that choice.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._options import Divergence
from ._layout import row_layout
from ._table import (A, B, DELTA, ENTROPY, FRAME_S, FRAME_T, GATE, LOG2Z_Q, LOG2Z_S, LOGITS_K,
                     LOSS, MAX_Q, MEAN_S, MEAN_T, REF_S, TEACHER_KL)

LOG2E = 1.4426950408889634
# DIVERGENCE (a kernel's constexpr) is a Divergence value: these kernels implement reverse
# KL (RKL) and forward KL
RKL = tl.constexpr(int(Divergence.REVERSE_KL))


@triton.jit
def _cand_update(x, m, z, acc_x, acc_s, sf, FKL: tl.constexpr):
    """Fold a block of bridge values x (-inf off the support) into (m, z, acc_x, acc_s).

    z = sum 2^(x-m); acc_x = sum 2^(x-m) (x-m); acc_s = sum 2^(x-m) sf; m is the
    running max (-inf while empty). The max value enters as exactly 2^0.
    """
    m_new = tl.maximum(m, tl.max(x, 0))
    ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    dm = tl.where(m == float("-inf"), 0.0, m - ref)
    alpha = tl.exp2(dm)
    e = tl.exp2(x - ref)
    if FKL:
        acc_x = (acc_x + dm * z) * alpha + tl.sum(tl.where(e == 0.0, 0.0, e * (x - ref)), 0)
        acc_s = acc_s * alpha + tl.sum(tl.where(e == 0.0, 0.0, e * sf), 0)
    z = z * alpha + tl.sum(e, 0)
    return m_new, z, acc_x, acc_s


@triton.jit
def _bridge(tf, sf, a, b, support):
    """x = a (t - f_t) + b (s - f_s) with a pinned rounding: forward and backward agree bitwise."""
    return tl.where(support, tl.fma(a, tf, b * sf), float("-inf"))


@triton.jit
def _row_ptr(X, row, d1, st0, st1):
    """The first element of row ``row`` of a tensor addressed as ``row_layout`` describes."""
    return X + (row // d1) * st0 + (row % d1) * st1


@triton.jit
def _online(raw, m, z, scale2):
    """Fold raw logits into (raw running max, sum 2^((raw - max) scale2))."""
    nm = tl.maximum(m, tl.max(raw, 0))
    r = tl.where(nm == float("-inf"), 0.0, nm)
    z = z * tl.exp2(tl.where(m == float("-inf"), 0.0, (m - r) * scale2)) \
        + tl.sum(tl.exp2((raw - r) * scale2), 0)
    return nm, z


@triton.jit
def _row_token(TOK, row, V, ignore_index):
    """The row's sampled token, whether the row counts, and whether the id is in [0, V)."""
    y = tl.load(TOK + row).to(tl.int64)
    return y, y != ignore_index, (y >= 0) & (y < V)


@triton.jit
def _load_row_block(row_ptr, cols, stv, V, STRIDED_V: tl.constexpr):
    """Raw logits of one block as float32, -inf past the vocabulary."""
    msk = cols < V
    if STRIDED_V:
        ptrs = row_ptr + cols.to(tl.int64) * stv
    else:
        ptrs = row_ptr + cols
    return tl.load(ptrs, mask=msk, other=float("-inf")).to(tl.float32)


@triton.jit
def _fwd_block(raw_s, raw_t, f_s, f_t, scale2, tscale2, a0, b0, a1, b1,
               m_s, z_s, acc_ss, acc_st, m_t, z_t, m0, z0, ax0, as0, m1, z1, ax1, as1,
               HAS_GATE: tl.constexpr, REVERSE: tl.constexpr):
    """Fold one block of raw student and teacher logits into the row's running state."""
    NEG_INF: tl.constexpr = float("-inf")
    sf = (raw_s - f_s) * scale2
    tf = (raw_t - f_t) * tscale2
    # student: z_s, acc_ss, acc_st, rescaled when the max moves
    nm_s = tl.maximum(m_s, tl.max(raw_s, 0))
    r_s = tl.where(nm_s == NEG_INF, 0.0, nm_s)
    al_s = tl.exp2(tl.where(m_s == NEG_INF, 0.0, (m_s - r_s) * scale2))
    e_s = tl.exp2((raw_s - r_s) * scale2)
    acc_ss = acc_ss * al_s + tl.sum(tl.where(e_s == 0.0, 0.0, e_s * sf), 0)
    acc_st = tl.where(acc_st == NEG_INF, NEG_INF, acc_st * al_s) \
        + tl.sum(tl.where(e_s == 0.0, 0.0, e_s * tf), 0)
    z_s = z_s * al_s + tl.sum(e_s, 0)
    # teacher: z_t
    nm_t, z_t = _online(raw_t, m_t, z_t, tscale2)
    # candidate bridges on the joint support
    support = (raw_s != NEG_INF) & (raw_t != NEG_INF)
    m0, z0, ax0, as0 = _cand_update(_bridge(tf, sf, a0, b0, support), m0, z0, ax0, as0, sf,
                                    not REVERSE)
    if HAS_GATE:
        m1, z1, ax1, as1 = _cand_update(_bridge(tf, sf, a1, b1, support), m1, z1, ax1, as1,
                                        sf, not REVERSE)
    return nm_s, z_s, acc_ss, acc_st, nm_t, z_t, m0, z0, ax0, as0, m1, z1, ax1, as1


@triton.jit
def _fwd_range(s_row, t_row, lo, hi, V, s_stv, t_stv, f_s, f_t, scale2, tscale2, a0, b0, a1, b1,
               m_s, z_s, acc_ss, acc_st, m_t, z_t, m0, z0, ax0, as0, m1, z1, ax1, as1,
               HAS_GATE: tl.constexpr, REVERSE: tl.constexpr, STRIDED_V: tl.constexpr,
               BLOCK_V: tl.constexpr):
    """Fold the blocks starting at lo, lo + BLOCK_V, ... below hi into the row's state."""
    offs = tl.arange(0, BLOCK_V)
    for start in range(lo, hi, BLOCK_V):
        cols = start + offs
        raw_s = _load_row_block(s_row, cols, s_stv, V, STRIDED_V)
        raw_t = _load_row_block(t_row, cols, t_stv, V, STRIDED_V)
        m_s, z_s, acc_ss, acc_st, m_t, z_t, m0, z0, ax0, as0, m1, z1, ax1, as1 = _fwd_block(
            raw_s, raw_t, f_s, f_t, scale2, tscale2, a0, b0, a1, b1,
            m_s, z_s, acc_ss, acc_st, m_t, z_t, m0, z0, ax0, as0, m1, z1, ax1, as1,
            HAS_GATE, REVERSE)
    return m_s, z_s, acc_ss, acc_st, m_t, z_t, m0, z0, ax0, as0, m1, z1, ax1, as1


@triton.jit
def _opd_fwd_kernel(
    S, T, TOK, SIG, OUT,
    V,
    s_d1, s_st0, s_st1, s_stv,
    t_d1, t_st0, t_st1, t_stv,
    scale2, tscale2, beta, lam_pos, lam_neg, ignore_index,
    HAS_GATE: tl.constexpr, DIVERGENCE: tl.constexpr,
    STRIDED_V: tl.constexpr, BLOCK_V: tl.constexpr,
):
    NEG_INF: tl.constexpr = float("-inf")
    LN2_: tl.constexpr = 0.6931471805599453
    FRAME_TOL: tl.constexpr = 16.0  # base-2 units, about 11 nats
    row = tl.program_id(0).to(tl.int64)
    s_row = _row_ptr(S, row, s_d1, s_st0, s_st1)
    t_row = _row_ptr(T, row, t_d1, t_st0, t_st1)
    y, valid, y_ok = _row_token(TOK, row, V, ignore_index)
    n_cols = tl.where(valid, V, 0)  # a masked row reads nothing

    # candidate bridges: slot 0 = lambda+ (or 1), slot 1 = lambda- (or 1)
    if HAS_GATE:
        sig = tl.load(SIG + row).to(tl.float32)
        lam0 = tl.where(sig != 0.0, lam_pos, 1.0)
        lam1 = tl.where(sig != 0.0, lam_neg, 1.0)
    else:
        sig = 0.0
        lam0 = 1.0
        lam1 = 1.0
    a0 = lam0
    b0 = 1.0 - lam0 + beta
    a1 = lam1
    b1 = 1.0 - lam1 + beta

    # the sampled token's raw logits
    y_safe = tl.where(y_ok, y, 0)  # never read out of bounds (the loss is NaN then)
    s_y = tl.load(s_row + y_safe * s_stv).to(tl.float32)
    t_y = tl.load(t_row + y_safe * t_stv).to(tl.float32)

    # The frame (f_s, f_t) of every linear accumulator: both models' logits at one token the
    # student likes, the sampled token or the student's best in the first block, whichever
    # the student rates higher. It is fixed before the pass and never moves after.
    offs = tl.arange(0, BLOCK_V)
    raw_s = _load_row_block(s_row, offs, s_stv, n_cols, STRIDED_V)
    raw_t = _load_row_block(t_row, offs, t_stv, n_cols, STRIDED_V)
    s_j = tl.max(raw_s, 0)
    t_j = tl.sum(tl.where(offs == tl.argmax(raw_s, 0), raw_t, 0.0), 0)
    use_y = s_y >= s_j
    f_s = tl.where(use_y, s_y, s_j)
    f_t = tl.where(use_y, t_y, t_j)
    f_s = tl.where(f_s == NEG_INF, 0.0, f_s)
    f_t = tl.where(f_t == NEG_INF, 0.0, f_t)

    zero = tl.sum(tl.zeros([BLOCK_V], dtype=tl.float32), 0)  # a float32 scalar
    neg = zero + NEG_INF
    # state: m_s (raw student max), z_s = sum 2^((z_S - m_s) scale2), acc_ss = sum 2^(..) sf,
    # acc_st = sum 2^(..) tf with sf = (z_S - f_s) scale2, tf = (z_T - f_t) tscale2; the
    # teacher's max and sum; per candidate max, sum and the two forward-KL sums
    m_s, z_s, acc_ss, acc_st, m_t, z_t, m0, z0, ax0, as0, m1, z1, ax1, as1 = _fwd_block(
        raw_s, raw_t, f_s, f_t, scale2, tscale2, a0, b0, a1, b1,
        neg, zero, zero, zero, neg, zero, neg, zero, zero, zero, neg, zero, zero, zero,
        HAS_GATE, DIVERGENCE == RKL)
    m_s, z_s, acc_ss, acc_st, m_t, z_t, m0, z0, ax0, as0, m1, z1, ax1, as1 = _fwd_range(
        s_row, t_row, BLOCK_V, n_cols, V, s_stv, t_stv, f_s, f_t, scale2, tscale2, a0, b0,
        a1, b1,
        m_s, z_s, acc_ss, acc_st, m_t, z_t, m0, z0, ax0, as0, m1, z1, ax1, as1,
        HAS_GATE, DIVERGENCE == RKL, STRIDED_V, BLOCK_V)

    # A frame far from where p_S puts its mass (|E_{p_S}[s - f_s]| or |E_{p_S}[t - f_t]| above
    # FRAME_TOL, e.g. a masked first block and a sampled token the student masks) would cost
    # precision: such a rare row reads itself once more, with those means as its frame.
    # A zero-trip loop for every other row.
    mean_s = acc_ss / z_s
    mean_t = acc_st / z_s
    far_s = tl.abs(mean_s) > FRAME_TOL
    far_t = (tl.abs(mean_t) > FRAME_TOL) & (mean_t != NEG_INF)
    far = far_s | far_t
    f_s = tl.where(far_s, f_s + mean_s / scale2, f_s)
    f_t = tl.where(far_t, f_t + mean_t / tscale2, f_t)
    m_s = tl.where(far, neg, m_s)
    z_s = tl.where(far, zero, z_s)
    acc_ss = tl.where(far, zero, acc_ss)
    acc_st = tl.where(far, zero, acc_st)
    m_t = tl.where(far, neg, m_t)
    z_t = tl.where(far, zero, z_t)
    m0 = tl.where(far, neg, m0)
    z0 = tl.where(far, zero, z0)
    ax0 = tl.where(far, zero, ax0)
    as0 = tl.where(far, zero, as0)
    m1 = tl.where(far, neg, m1)
    z1 = tl.where(far, zero, z1)
    ax1 = tl.where(far, zero, ax1)
    as1 = tl.where(far, zero, as1)
    m_s, z_s, acc_ss, acc_st, m_t, z_t, m0, z0, ax0, as0, m1, z1, ax1, as1 = _fwd_range(
        s_row, t_row, 0, tl.where(far, n_cols, 0), V, s_stv, t_stv, f_s, f_t, scale2, tscale2,
        a0, b0, a1, b1, m_s, z_s, acc_ss, acc_st, m_t, z_t, m0, z0, ax0, as0, m1, z1, ax1, as1,
        HAS_GATE, DIVERGENCE == RKL, STRIDED_V, BLOCK_V)

    r_s = tl.where(m_s == NEG_INF, 0.0, m_s)
    r_t = tl.where(m_t == NEG_INF, 0.0, m_t)
    # a model that masks its whole row gives every token probability 0: lp = -inf, not NaN
    lz_s = tl.where(z_s == 0.0, float("inf"), tl.log2(z_s))
    lz_t = tl.where(z_t == 0.0, float("inf"), tl.log2(z_t))
    off_s = (f_s - r_s) * scale2 - lz_s  # lp_S = sf + off_s (base 2)
    off_t = (f_t - r_t) * tscale2 - lz_t
    mean_s = acc_ss / z_s                # E_{p_S}[sf] in the final frame
    mean_t = acc_st / z_s                # E_{p_S}[tf]
    elp_s = tl.where(z_s == 0.0, 0.0, mean_s + off_s)  # E_{p_S}[lp_S], base 2 (0: no p_S)
    elp_t = tl.where(z_s == 0.0, 0.0, mean_t + off_t)  # E_{p_S}[lp_T], base 2

    # the sampled token: delta and the gate
    lps_y = (s_y - r_s) * scale2 - lz_s
    lpt_y = (t_y - r_t) * tscale2 - lz_t
    both_zero = (lps_y == NEG_INF) & (lpt_y == NEG_INF)
    delta2 = tl.where(both_zero, 0.0, lpt_y - lps_y)
    d = (delta2 > 0.0).to(tl.float32) - (delta2 < 0.0).to(tl.float32)
    g = d * sig

    # chosen bridge: g > 0 -> slot 0, g < 0 -> slot 1, g == 0 -> lambda = 1, which is
    # slot 0 unless the row has a verdict (then delta == 0: read the row once more)
    a_c = tl.where(g > 0.0, a0, tl.where(g < 0.0, a1, 1.0))
    b_c = tl.where(g > 0.0, b0, tl.where(g < 0.0, b1, beta))
    m_c = tl.where(g < 0.0, m1, m0)
    z_c = tl.where(g < 0.0, z1, z0)
    ax_c = tl.where(g < 0.0, ax1, ax0)
    as_c = tl.where(g < 0.0, as1, as0)
    if HAS_GATE:
        need = (g == 0.0) & (sig != 0.0)
        m2 = neg
        z2 = zero
        ax2 = zero
        as2 = zero
        for start in range(0, tl.where(need, n_cols, 0), BLOCK_V):
            cols = start + offs
            raw_s = _load_row_block(s_row, cols, s_stv, V, STRIDED_V)
            raw_t = _load_row_block(t_row, cols, t_stv, V, STRIDED_V)
            sf = (raw_s - f_s) * scale2
            x2 = _bridge((raw_t - f_t) * tscale2, sf, a_c, b_c,
                         (raw_s != NEG_INF) & (raw_t != NEG_INF))
            m2, z2, ax2, as2 = _cand_update(x2, m2, z2, ax2, as2, sf, DIVERGENCE != RKL)
        m_c = tl.where(need, m2, m_c)
        z_c = tl.where(need, z2, z_c)
        ax_c = tl.where(need, ax2, ax_c)
        as_c = tl.where(need, as2, as_c)

    lz_c = tl.log2(z_c)
    if DIVERGENCE == RKL:  # L_q = lse(a lp_T + b lp_S) = lse(x) + a off_t + b off_s
        lq = m_c + lz_c + a_c * off_t + b_c * off_s
        loss2 = (1.0 - b_c) * elp_s - a_c * elp_t + lq
    else:  # E_q[log q] - E_q[lp_S]
        loss2 = (ax_c / z_c - lz_c) - (as_c / z_c + off_s)
    loss2 = tl.where(z_c == 0.0, float("inf"), loss2)  # empty joint support
    if HAS_GATE:  # a NaN verifier poisons its position: the loss and (through a) the gradient
        a_c = tl.where(sig != sig, float("nan"), a_c)
        loss2 = tl.where(sig != sig, float("nan"), loss2)
    loss = tl.where(y_ok, loss2 * LN2_, float("nan"))

    out = OUT + row * LOGITS_K
    tl.store(out + LOSS, tl.where(valid, loss, 0.0))
    tl.store(out + DELTA, tl.where(valid, delta2 * LN2_, 0.0))
    tl.store(out + GATE, tl.where(valid, g, 0.0))
    tl.store(out + TEACHER_KL, tl.where(valid, (elp_s - elp_t) * LN2_, 0.0))
    tl.store(out + ENTROPY, tl.where(valid, -elp_s * LN2_, 0.0))
    tl.store(out + A, tl.where(valid, a_c, 0.0))
    tl.store(out + B, tl.where(valid, b_c, 0.0))
    # backward state (this backend's columns, triton/_table.py)
    tl.store(out + REF_S, tl.where(valid, r_s, 0.0))
    tl.store(out + LOG2Z_S, tl.where(valid, lz_s, 0.0))
    tl.store(out + FRAME_S, tl.where(valid, f_s, 0.0))
    tl.store(out + FRAME_T, tl.where(valid, f_t, 0.0))
    tl.store(out + MEAN_S, tl.where(valid, mean_s, 0.0))
    tl.store(out + MEAN_T, tl.where(valid, mean_t, 0.0))
    tl.store(out + MAX_Q, tl.where(valid, m_c, 0.0))
    tl.store(out + LOG2Z_Q, tl.where(valid, lz_c, 0.0))


@triton.jit
def _opd_bwd_kernel(
    S, T, TOK, ROWS, GROW, DS,
    V,
    s_d1, s_st0, s_st1, s_stv,
    t_d1, t_st0, t_st1, t_stv,
    scale2, tscale2, inv_temp, ignore_index,
    DIVERGENCE: tl.constexpr, STRIDED_V: tl.constexpr, BLOCK_V: tl.constexpr,
    LOCAL_TOKENS: tl.constexpr,
):
    NEG_INF: tl.constexpr = float("-inf")
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    y, valid, y_ok = _row_token(TOK, row, V, ignore_index)
    if not LOCAL_TOKENS:  # global ids of a vocabulary shard: the forward made bad rows NaN
        y_ok = valid
    gr = tl.load(GROW + row)
    st = ROWS + row * LOGITS_K
    r_s = tl.load(st + REF_S)
    lz_s = tl.load(st + LOG2Z_S)
    f_s = tl.load(st + FRAME_S)
    f_t = tl.load(st + FRAME_T)
    mean_s = tl.load(st + MEAN_S)
    mean_t = tl.load(st + MEAN_T)
    a = tl.load(st + A)
    b = tl.load(st + B)
    m_c = tl.load(st + MAX_Q)
    lz_c = tl.load(st + LOG2Z_Q)

    s_row = _row_ptr(S, row, s_d1, s_st0, s_st1)
    t_row = _row_ptr(T, row, t_d1, t_st0, t_st1)
    raw_s = _load_row_block(s_row, cols, s_stv, V, STRIDED_V)
    raw_t = _load_row_block(t_row, cols, t_stv, V, STRIDED_V)
    sf = (raw_s - f_s) * scale2
    tf = (raw_t - f_t) * tscale2
    p = tl.exp2((raw_s - r_s) * scale2 - lz_s)
    if DIVERGENCE == RKL:  # p (u - E_p[u]), u = (1-b) lp_S - a lp_T, centred on the frame
        w = (1.0 - b) * (sf - mean_s) - a * (tf - mean_t)
        gv = tl.where(p == 0.0, 0.0, p * w) * (0.6931471805599453 * inv_temp)
    else:  # p - q; x has the forward's bits, so x - m_c is exact at the max
        support = (raw_s != NEG_INF) & (raw_t != NEG_INF)
        q = tl.exp2((_bridge(tf, sf, a, b, support) - m_c) - lz_c)
        gv = (p - q) * inv_temp
    gv = tl.where(valid, tl.where(y_ok, gv * gr, float("nan")), 0.0)
    tl.store(DS + row * V + cols, gv.to(DS.dtype.element_ty), mask=cols < V)


# ---------------------------------------------------------------------------
# launchers

FWD_BLOCK_V = 4096
FWD_WARPS = 8
BWD_BLOCK_V = 4096
BWD_WARPS = 8


def _check_rows(student: torch.Tensor, teacher: torch.Tensor) -> None:
    for name, x in (("student_logits", student), ("teacher_logits", teacher)):
        if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(
                f"{name}: the Triton backend takes float32, bfloat16 or float16, got {x.dtype}; "
                "use backend='torch' for float64")


def _divergence(opts) -> int:
    if opts.divergence not in (Divergence.REVERSE_KL, Divergence.FORWARD_KL):
        raise NotImplementedError(f"the Triton logits kernels do not implement "
                                  f"divergence={opts.divergence.label!r}")
    return int(opts.divergence)


def opd_rows(student, teacher, tokens, sign, opts, *, block_v=None, num_warps=None):
    """Forward: per-row table (N, LOGITS_K) for logits (..., V) and (..., V_T) of any strides."""
    _check_rows(student, teacher)
    vocab = student.shape[-1]
    ls = row_layout(student)
    lt = row_layout(teacher)
    n = tokens.numel()
    out = torch.empty(n, LOGITS_K.value, dtype=torch.float32, device=student.device)
    if n == 0:
        return out
    sig = sign if sign is not None else tokens  # unused pointer when there is no gate
    block = block_v or min(FWD_BLOCK_V, triton.next_power_of_2(vocab))
    _opd_fwd_kernel[(n,)](
        ls.tensor, lt.tensor, tokens, sig, out,
        vocab, ls.d1, ls.st0, ls.st1, ls.stv, lt.d1, lt.st0, lt.st1, lt.stv,
        LOG2E / opts.temperature, LOG2E / opts.teacher_temperature, float(opts.beta),
        float(opts.lam_pos), float(opts.lam_neg), int(opts.ignore_index),
        HAS_GATE=sign is not None, DIVERGENCE=_divergence(opts),
        STRIDED_V=(ls.stv != 1 or lt.stv != 1), BLOCK_V=block,
        num_warps=num_warps or FWD_WARPS,
    )
    return out


def opd_rows_backward(grad_rows, student, teacher, tokens, rows, opts, *, block_v=None,
                      num_warps=None, local_tokens=True):
    """Backward: d loss / d student logits, contiguous, the student's dtype and shape.

    ``local_tokens=False``: the ids are global ids of a vocabulary shard (the table of the
    vocabulary-parallel forward), not checked against this shard's columns.
    """
    vocab = student.shape[-1]
    ls = row_layout(student)
    lt = row_layout(teacher)
    n = tokens.numel()
    grad = torch.empty(student.shape, dtype=student.dtype, device=student.device)
    if n == 0 or vocab == 0:
        return grad
    block = block_v or min(BWD_BLOCK_V, triton.next_power_of_2(vocab))
    _opd_bwd_kernel[(n, triton.cdiv(vocab, block))](
        ls.tensor, lt.tensor, tokens, rows, grad_rows.float().contiguous(), grad,
        vocab, ls.d1, ls.st0, ls.st1, ls.stv, lt.d1, lt.st0, lt.st1, lt.stv,
        LOG2E / opts.temperature, LOG2E / opts.teacher_temperature, 1.0 / opts.temperature,
        int(opts.ignore_index), DIVERGENCE=_divergence(opts),
        STRIDED_V=(ls.stv != 1 or lt.stv != 1),
        BLOCK_V=block, LOCAL_TOKENS=bool(local_tokens),
        num_warps=num_warps or BWD_WARPS,
    )
    return grad
