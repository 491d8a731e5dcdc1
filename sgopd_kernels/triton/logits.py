"""Fused Triton kernels of the gated OPD loss on logits (reverse and forward KL).

Forward, one program per row, one streaming pass over the vocabulary that
reads every student and teacher logit once and carries, in base-2 units
(s2 = z_S * log2(e) / tau, t2 likewise):

- the online (max, sum 2^(s2-m)) of the student and of the teacher,
- sum 2^(s2-m) (s2-m) and sum 2^(s2-m) (t2-m_t): E_{p_S}[lp_S], E_{p_S}[lp_T],
- for each candidate lambda the row can take (lambda+ and lambda- where the
  verifier has a verdict, 1 otherwise) the online lse of
  x = a (t2-m_t) + b (s2-m_s) over the joint support, and for forward KL
  also sum 2^(x-m_x) (x-m_x) and sum 2^(x-m_x) (s2-m_s).

All accumulators are kept relative to the running maxima; when a maximum
moves, the accumulators are rescaled and shifted in closed form (a candidate's
x moves by a*dt + b*ds as a whole). After the pass the gathered logits at the
sampled token give delta, the gate picks the candidate, and the row's loss,
statistics and backward state go to a small float32 table (see ``_rows``).
A row whose verifier has a verdict but whose delta is exactly 0 needs the
lambda = 1 candidate that was not carried: it reads its row a second time
(a rare case; the loop is empty for every other row).

Backward: a 2-D grid over (row, vocabulary block) that re-reads the logits and
writes the gradient from the saved row state. The gradient is not stored in
forward: docs/design.md gives the byte counts behind that choice.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _rows as C
from ._layout import row_layout

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _cand_update(x, m, z, acc_x, acc_s, sc, FKL: tl.constexpr):
    """Fold a block of candidate values x (-inf off support) into (m, z, acc_x, acc_s).

    z = sum 2^(x-m); acc_x = sum 2^(x-m) (x-m); acc_s = sum 2^(x-m) sc.
    ``m`` is the running max in the current frame (-inf while empty).
    """
    m_new = tl.maximum(m, tl.max(x, 0))
    ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    dm = tl.where(m == float("-inf"), 0.0, m - ref)
    alpha = tl.exp2(dm)
    e = tl.exp2(x - ref)
    if FKL:
        acc_x = (acc_x + dm * z) * alpha + tl.sum(tl.where(e == 0.0, 0.0, e * (x - ref)), 0)
        acc_s = acc_s * alpha + tl.sum(tl.where(e == 0.0, 0.0, e * sc), 0)
    z = z * alpha + tl.sum(e, 0)
    return m_new, z, acc_x, acc_s


@triton.jit
def _row_token(TOK, row, V, ignore_index):
    """The row's sampled token, whether the row counts, and whether the id is in [0, V)."""
    y = tl.load(TOK + row).to(tl.int64)
    return y, y != ignore_index, (y >= 0) & (y < V)


@triton.jit
def _load_row_block(row_ptr, cols, stv, V, STRIDED_V: tl.constexpr):
    msk = cols < V
    if STRIDED_V:
        ptrs = row_ptr + cols.to(tl.int64) * stv
    else:
        ptrs = row_ptr + cols
    return tl.load(ptrs, mask=msk, other=float("-inf")).to(tl.float32)


@triton.jit
def _opd_fwd_kernel(
    S, T, TOK, SIG, OUT,
    V,
    s_d1, s_st0, s_st1, s_stv,
    t_d1, t_st0, t_st1, t_stv,
    scale2, beta, lam_pos, lam_neg, ignore_index,
    HAS_GATE: tl.constexpr, REVERSE: tl.constexpr, STATS: tl.constexpr,
    STRIDED_V: tl.constexpr, BLOCK_V: tl.constexpr, ROW_K: tl.constexpr,
):
    NEG_INF: tl.constexpr = float("-inf")
    row = tl.program_id(0).to(tl.int64)
    s_row = S + (row // s_d1) * s_st0 + (row % s_d1) * s_st1
    t_row = T + (row // t_d1) * t_st0 + (row % t_d1) * t_st1
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

    zero = tl.sum(tl.zeros([BLOCK_V], dtype=tl.float32), 0)  # a float32 scalar
    m_s = zero + NEG_INF
    r_s = zero
    z_s = zero
    acc_ss = zero   # sum 2^(s-m_s) (s-m_s)
    acc_st = zero   # sum 2^(s-m_s) (t-m_t)
    m_t = zero + NEG_INF
    r_t = zero
    z_t = zero
    m0 = zero + NEG_INF
    z0 = zero
    ax0 = zero
    as0 = zero
    m1 = zero + NEG_INF
    z1 = zero
    ax1 = zero
    as1 = zero

    offs = tl.arange(0, BLOCK_V)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + offs
        s = _load_row_block(s_row, cols, s_stv, V, STRIDED_V) * scale2
        t = _load_row_block(t_row, cols, t_stv, V, STRIDED_V) * scale2
        # move the frames to the new maxima
        nm_s = tl.maximum(m_s, tl.max(s, 0))
        nm_t = tl.maximum(m_t, tl.max(t, 0))
        nr_s = tl.where(nm_s == NEG_INF, 0.0, nm_s)
        nr_t = tl.where(nm_t == NEG_INF, 0.0, nm_t)
        ds = r_s - nr_s
        dt = r_t - nr_t
        sc = s - nr_s
        tc = t - nr_t

        # student: z_s, acc_ss, acc_st
        dms = tl.where(m_s == NEG_INF, 0.0, m_s - nr_s)
        al_s = tl.exp2(dms)
        e_s = tl.exp2(sc)
        if REVERSE or STATS:
            acc_ss = (acc_ss + dms * z_s) * al_s + tl.sum(tl.where(e_s == 0.0, 0.0, e_s * sc), 0)
            acc_st = tl.where(acc_st == NEG_INF, NEG_INF, (acc_st + dt * z_s) * al_s) \
                + tl.sum(tl.where(e_s == 0.0, 0.0, e_s * tc), 0)
        z_s = z_s * al_s + tl.sum(e_s, 0)
        # teacher: z_t
        dmt = tl.where(m_t == NEG_INF, 0.0, m_t - nr_t)
        z_t = z_t * tl.exp2(dmt) + tl.sum(tl.exp2(tc), 0)

        # candidates: their values move by a*dt + b*ds with the frames
        support = (s != NEG_INF) & (t != NEG_INF)
        m0 = m0 + (a0 * dt + b0 * ds)
        as0 = as0 + ds * z0
        x0 = tl.where(support, a0 * tc + b0 * sc, NEG_INF)
        m0, z0, ax0, as0 = _cand_update(x0, m0, z0, ax0, as0, sc, not REVERSE)
        if HAS_GATE:
            m1 = m1 + (a1 * dt + b1 * ds)
            as1 = as1 + ds * z1
            x1 = tl.where(support, a1 * tc + b1 * sc, NEG_INF)
            m1, z1, ax1, as1 = _cand_update(x1, m1, z1, ax1, as1, sc, not REVERSE)

        m_s = nm_s
        r_s = nr_s
        m_t = nm_t
        r_t = nr_t

    lz_s = tl.log2(z_s)
    lz_t = tl.log2(z_t)
    mean_s = acc_ss / z_s
    mean_t = acc_st / z_s

    # the sampled token: delta and the gate
    y_safe = tl.where(y_ok, y, 0)
    if STRIDED_V:
        s_y = tl.load(s_row + y_safe * s_stv).to(tl.float32) * scale2
        t_y = tl.load(t_row + y_safe * t_stv).to(tl.float32) * scale2
    else:
        s_y = tl.load(s_row + y_safe).to(tl.float32) * scale2
        t_y = tl.load(t_row + y_safe).to(tl.float32) * scale2
    lps_y = s_y - r_s - lz_s
    lpt_y = t_y - r_t - lz_t
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
        m2 = zero + NEG_INF
        z2 = zero
        ax2 = zero
        as2 = zero
        b2 = beta
        for start in range(0, tl.where(need, n_cols, 0), BLOCK_V):
            cols = start + offs
            s = _load_row_block(s_row, cols, s_stv, V, STRIDED_V) * scale2
            t = _load_row_block(t_row, cols, t_stv, V, STRIDED_V) * scale2
            sc = s - r_s
            tc = t - r_t
            x2 = tl.where((s != NEG_INF) & (t != NEG_INF), tc + b2 * sc, NEG_INF)
            m2, z2, ax2, as2 = _cand_update(x2, m2, z2, ax2, as2, sc, not REVERSE)
        m_c = tl.where(need, m2, m_c)
        z_c = tl.where(need, z2, z_c)
        ax_c = tl.where(need, ax2, ax_c)
        as_c = tl.where(need, as2, as_c)

    lz_c = tl.log2(z_c)
    lse_c = m_c + lz_c
    if REVERSE:
        lq = lse_c - a_c * lz_t - b_c * lz_s
        loss2 = (1.0 - b_c) * (mean_s - lz_s) - a_c * (mean_t - lz_t) + lq
    else:
        loss2 = (ax_c / z_c - lz_c) - (as_c / z_c - lz_s)
    loss2 = tl.where(z_c == 0.0, float("inf"), loss2)  # empty joint support
    if HAS_GATE:  # a NaN verifier poisons its position: the loss and (through a) the gradient
        a_c = tl.where(sig != sig, float("nan"), a_c)
        loss2 = tl.where(sig != sig, float("nan"), loss2)
    loss = tl.where(y_ok, loss2 * 0.6931471805599453, float("nan"))

    out = OUT + row * ROW_K
    tl.store(out + 0, tl.where(valid, loss, 0.0))
    tl.store(out + 1, tl.where(valid, delta2 * 0.6931471805599453, 0.0))
    tl.store(out + 2, tl.where(valid, g, 0.0))
    if STATS:
        kl2 = (mean_s - lz_s) - (mean_t - lz_t)
        tl.store(out + 3, tl.where(valid, kl2 * 0.6931471805599453, 0.0))
        tl.store(out + 4, tl.where(valid, (lz_s - mean_s) * 0.6931471805599453, 0.0))
    else:
        tl.store(out + 3, 0.0)
        tl.store(out + 4, 0.0)
    tl.store(out + 5, tl.where(valid, r_s, 0.0))
    tl.store(out + 6, tl.where(valid, lz_s, 0.0))
    tl.store(out + 7, tl.where(valid, mean_s, 0.0))
    tl.store(out + 8, tl.where(valid, r_t, 0.0))
    tl.store(out + 9, tl.where(valid, lz_t, 0.0))
    tl.store(out + 10, tl.where(valid, mean_t, 0.0))
    tl.store(out + 11, tl.where(valid, a_c, 0.0))
    tl.store(out + 12, tl.where(valid, b_c, 0.0))
    tl.store(out + 13, tl.where(valid, lse_c, 0.0))


@triton.jit
def _opd_bwd_kernel(
    S, T, TOK, ROWS, GROW, DS,
    V,
    s_d1, s_st0, s_st1, s_stv,
    t_d1, t_st0, t_st1, t_stv,
    scale2, inv_temp, ignore_index,
    REVERSE: tl.constexpr, STRIDED_V: tl.constexpr, BLOCK_V: tl.constexpr,
    ROW_K: tl.constexpr,
):
    NEG_INF: tl.constexpr = float("-inf")
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    y, valid, y_ok = _row_token(TOK, row, V, ignore_index)
    gr = tl.load(GROW + row)
    st = ROWS + row * ROW_K
    r_s = tl.load(st + 5)
    lz_s = tl.load(st + 6)
    mean_s = tl.load(st + 7)
    r_t = tl.load(st + 8)
    mean_t = tl.load(st + 10)
    a = tl.load(st + 11)
    b = tl.load(st + 12)
    lse_c = tl.load(st + 13)

    s_row = S + (row // s_d1) * s_st0 + (row % s_d1) * s_st1
    t_row = T + (row // t_d1) * t_st0 + (row % t_d1) * t_st1
    s = _load_row_block(s_row, cols, s_stv, V, STRIDED_V) * scale2
    t = _load_row_block(t_row, cols, t_stv, V, STRIDED_V) * scale2
    sc = s - r_s
    tc = t - r_t
    p = tl.exp2(sc - lz_s)
    if REVERSE:
        w = (1.0 - b) * (sc - mean_s) - a * (tc - mean_t)
        gv = tl.where(p == 0.0, 0.0, p * w) * (0.6931471805599453 * inv_temp)
    else:
        support = (s != NEG_INF) & (t != NEG_INF)
        q = tl.where(support, tl.exp2(a * tc + b * sc - lse_c), 0.0)
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


def opd_rows(student, teacher, tokens, sign, *, beta, lam_pos, lam_neg, reverse, temperature,
             ignore_index, stats=True, block_v=None):
    """Forward: per-row table (N, ROW_K) for logits (..., V) and (..., V_T) of any strides."""
    _check_rows(student, teacher)
    vocab = student.shape[-1]
    ls = row_layout(student)
    lt = row_layout(teacher)
    n = tokens.numel()
    out = torch.empty(n, C.ROW_K, dtype=torch.float32, device=student.device)
    if n == 0:
        return out
    sig = sign if sign is not None else tokens  # unused pointer when there is no gate
    block = block_v or min(FWD_BLOCK_V, triton.next_power_of_2(vocab))
    _opd_fwd_kernel[(n,)](
        ls.tensor, lt.tensor, tokens, sig, out,
        vocab, ls.d1, ls.st0, ls.st1, ls.stv, lt.d1, lt.st0, lt.st1, lt.stv,
        LOG2E / temperature, float(beta), float(lam_pos), float(lam_neg), int(ignore_index),
        HAS_GATE=sign is not None, REVERSE=bool(reverse), STATS=bool(stats),
        STRIDED_V=(ls.stv != 1 or lt.stv != 1), BLOCK_V=block, ROW_K=C.ROW_K,
        num_warps=FWD_WARPS,
    )
    return out


def opd_rows_backward(grad_rows, student, teacher, tokens, rows, *, reverse, temperature,
                      ignore_index, block_v=None):
    """Backward: d loss / d student logits, contiguous, the student's dtype and shape."""
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
        LOG2E / temperature, 1.0 / temperature, int(ignore_index),
        REVERSE=bool(reverse), STRIDED_V=(ls.stv != 1 or lt.stv != 1), BLOCK_V=block,
        ROW_K=C.ROW_K, num_warps=BWD_WARPS,
    )
    return grad
