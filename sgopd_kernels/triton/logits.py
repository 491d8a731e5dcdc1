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
are kept in raw logit units; an element's one exponent is ``sf - c`` with
``sf = (raw - f_s) * scale2`` and ``c`` the slot's max in the same units
(forward KL forms both as ``fma(raw, scale2, -f_s scale2)``, one instruction
instead of two: ``_common.frame_units``; its backward forms them alike. A row
whose frames are too large for that form, ``_common.fma_frames``, skips its
full blocks and is read again in the difference form).

The state is kept per slot of a [BLOCK_V // 16, 16] tile (``_common.tile2``:
each thread holds 8 consecutive logits of each half of the block and keeps
one slot over both, so a slot's sums are rescaled once per 16 logits) and
combined across slots once per row. Block 0 and the partial last block are
masked and guarded; the full blocks between them are neither (bfloat16 rows
read as int32 pairs), and a row that meets a -inf there (a NaN in some
accumulator) is read again with the guards. The table's ``FINITE`` column
says which columns those unguarded blocks were, where they were finite.
Rows whose starts are not 16-byte aligned (V = 50257) are streamed on a grid
shifted back to a 16-byte boundary (``ALIGN``, :func:`shift_plan`), so that
the full blocks keep their 128-bit loads. Without a gate and with beta = 0
(``TEACHER_BRIDGE``, reverse KL) the bridge is the teacher and no candidate
is folded; a row where the student masks a token is read again to fold it
over the joint support.

After the pass the gate picks the candidate, and the row's loss,
statistics and backward state go to a small float32 table (``_rows``). A row
whose verifier has a verdict but whose delta is exactly 0 needs the lambda = 1
candidate that was not carried: it reads its row a second time (a rare case;
the loop is empty for every other row). So does a row whose student-weighted
means land more than 16 (base-2 units) from the frame: it reads itself again
centred on those means (on that model's row maximum where a mean is 2^20 or
more, or not finite: a frame token held at a huge constant).

Backward: a 2-D grid over (row, group of ``BLOCKS`` vocabulary blocks) that
re-reads the logits and writes the gradient from the saved row state (loaded
once per program), the row's validity, token check and incoming gradient
folded into one scalar (a masked row reads nothing). Blocks inside the span
the forward found finite are computed without per-element guards; the others
keep them. The gradient is not stored in forward: docs/design.md gives the
byte and instruction counts behind that choice.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._options import Divergence
from ._common import (DIFF, FMA, ROW, SLOT, any_nan, bridge, bwd_span, combine_bridge, combine_lse,
                      fma_frames, fold_bridge, fold_lse, frame_units, grid_lead, load_inside,
                      load_inside2, load_span, load_span2, on_grid, put, row_frame, row_offset,
                      row_ptr, row_token, slot_ref, slot_state, store_span, tile2)
from ._layout import RowLayout, row_layout
from ._table import (A, B, DELTA, ENTROPY, FINITE, FRAME_S, FRAME_T, GATE, LOG2Z_Q, LOG2Z_S,
                     LOGITS_K, LOSS, MAX_Q, MEAN_S, MEAN_T, REF_S, TEACHER_KL)

LOG2E = 1.4426950408889634
# reverse KL: the largest distance of a logit from the frame in the forward's unguarded span
# for the backward to drop its guards there (2^64 raw units)
TAME = tl.constexpr(1.8446744073709552e19)
# DIVERGENCE (a kernel's constexpr) is a Divergence value: these kernels implement reverse
# KL (RKL) and forward KL
RKL = tl.constexpr(int(Divergence.REVERSE_KL))


@triton.jit
def _fold_student(st, raw_s, sf, tf, f_s, scale2, GUARD: tl.constexpr, FORM: tl.constexpr):
    """st = per slot (raw max, sum 2^(sf - c), sum 2^(sf - c) sf, sum 2^(sf - c) tf)."""
    m, z, acc_ss, acc_st = st
    nm, c, al = slot_ref(m, raw_s, f_s, scale2, GUARD, FORM)
    e = tl.exp2(sf - c[:, None])  # the element's one exponent
    if GUARD:
        ps = tl.where(e == 0.0, 0.0, e * sf)
        pt = tl.where(e == 0.0, 0.0, e * tf)
        # a -inf sum (the teacher masks a token the student weights) stays -inf; a sum of sf
        # whose factor is 0 drops out, even where it overflowed (logits of -3e38 beside
        # ordinary ones, before the frame moves to the ordinary ones)
        acc_st = tl.where(acc_st == float("-inf"), float("-inf"), acc_st * al)
        acc_ss = tl.where(al == 0.0, 0.0, acc_ss * al)
    else:  # (-inf * al is -inf, or NaN where al is 0: a NaN means a guarded re-read)
        ps = e * sf
        pt = e * tf
        acc_st = acc_st * al
        acc_ss = acc_ss * al
    acc_st = acc_st + tl.sum(pt, 1)
    return nm, z * al + tl.sum(e, 1), acc_ss + tl.sum(ps, 1), acc_st


@triton.jit
def _fold(state, raw_s, raw_t, frame, coef, HAS_GATE: tl.constexpr, FKL: tl.constexpr,
          SKIP_BRIDGE: tl.constexpr, GUARD: tl.constexpr, FORM: tl.constexpr):
    """Fold one tile of raw student and teacher logits into the row's per-slot state.

    state = (student, teacher, candidate 0, candidate 1); frame = (f_s, f_t, scale2,
    tscale2), each f the frame of frame units in the form ``FORM`` (_common.frame_units);
    coef = (a0, b0, a1, b1). SKIP_BRIDGE: candidate 0 is the teacher (no gate, beta = 0),
    taken from the teacher's state after the pass.
    """
    st_s, st_t, q0, q1 = state
    f_s, f_t, scale2, tscale2 = frame
    a0, b0, a1, b1 = coef
    # (forward KL: frame units in one FMA where the row allows it; reverse KL's backward
    # takes the exact differences raw - f against the forward's means, and keeps DIFF)
    sf = frame_units(raw_s, f_s, scale2, FORM)
    tf = frame_units(raw_t, f_t, tscale2, FORM)
    st_s = _fold_student(st_s, raw_s, sf, tf, f_s, scale2, GUARD, FORM)
    st_t = fold_lse(st_t, raw_t, tf, f_t, tscale2, GUARD, FORM)
    if GUARD:
        support = (raw_s != float("-inf")) & (raw_t != float("-inf"))
        if not SKIP_BRIDGE:
            q0 = fold_bridge(q0, bridge(tf, sf, a0, b0, support), sf, FKL, GUARD)
        if HAS_GATE:
            q1 = fold_bridge(q1, bridge(tf, sf, a1, b1, support), sf, FKL, GUARD)
    else:  # off the support some product is NaN: the row is read again with GUARD
        if not SKIP_BRIDGE:
            q0 = fold_bridge(q0, tl.fma(a0, tf, b0 * sf), sf, FKL, GUARD)
        if HAS_GATE:
            q1 = fold_bridge(q1, tl.fma(a1, tf, b1 * sf), sf, FKL, GUARD)
    return st_s, st_t, q0, q1


@triton.jit
def _empty_state(BLOCK_V: tl.constexpr):
    neg = slot_state(BLOCK_V // 2, float("-inf"))  # (the slots of tile2)
    zero = slot_state(BLOCK_V // 2, 0.0)
    return (neg, zero, zero, zero), (neg, zero), (neg, zero, zero, zero), (neg, zero, zero, zero)


@triton.jit
def _reread(state, s_row, t_row, n, V, s_stv, t_stv, frame, coef, HAS_GATE: tl.constexpr,
            FKL: tl.constexpr, FORM: tl.constexpr, STRIDED_V: tl.constexpr,
            BLOCK_V: tl.constexpr):
    """Fold the row's first ``n`` columns (0 or all of them) with every guard."""
    for start in range(0, n, BLOCK_V):
        state = _fold(state, load_span2(s_row, start, 0, V, s_stv, STRIDED_V, BLOCK_V),
                      load_span2(t_row, start, 0, V, t_stv, STRIDED_V, BLOCK_V), frame, coef,
                      HAS_GATE, FKL, False, True, FORM)
    return state


@triton.jit
def _reset2(st, redo):
    """(max, sum) per slot, emptied where ``redo`` (a row scalar)."""
    return tl.where(redo, float("-inf"), st[0]), tl.where(redo, 0.0, st[1])


@triton.jit
def _reset4(st, redo):
    """(max, sum, sum, sum) per slot, emptied where ``redo``."""
    return (tl.where(redo, float("-inf"), st[0]), tl.where(redo, 0.0, st[1]),
            tl.where(redo, 0.0, st[2]), tl.where(redo, 0.0, st[3]))


@triton.jit
def _reset(state, redo):
    """The state, or an empty one where ``redo``."""
    return (_reset4(state[0], redo), _reset2(state[1], redo), _reset4(state[2], redo),
            _reset4(state[3], redo))


@triton.jit
def _opd_fwd_kernel(
    S, T, TOK, SIG, OUT,
    V,
    s_d1, s_st0, s_st1, s_stv,
    t_d1, t_st0, t_st1, t_stv,
    scale2, tscale2, beta, lam_pos, lam_neg, ignore_index,
    HAS_GATE: tl.constexpr, DIVERGENCE: tl.constexpr,
    STRIDED_V: tl.constexpr, BLOCK_V: tl.constexpr, TEACHER_BRIDGE: tl.constexpr = False,
    ALIGN: tl.constexpr = False, T_SAME: tl.constexpr = False, S_PAIRS: tl.constexpr = False,
    T_PAIRS: tl.constexpr = False,
):
    NEG_INF_: tl.constexpr = float("-inf")
    LN2_: tl.constexpr = 0.6931471805599453
    FRAME_TOL: tl.constexpr = 16.0  # base-2 units, about 11 nats
    FRAME_JUMP: tl.constexpr = 1048576.0  # 2^20 base-2 units: a mean rounded by 2^-4 or more
    FKL: tl.constexpr = DIVERGENCE != RKL
    # frame units (_common.frame_units): forward KL streams its row in FMA form, and reads
    # again in the row's form (ROW: FMA's bits, or DIFF's where the frame is too large for
    # FMA); reverse KL takes DIFF throughout
    MAIN: tl.constexpr = FMA if FKL else DIFF
    RFORM: tl.constexpr = ROW if FKL else DIFF
    # TEACHER_BRIDGE (no gate, beta = 0, reverse KL): the bridge is the teacher, lq = 0
    SKIP: tl.constexpr = TEACHER_BRIDGE and not HAS_GATE and not FKL
    row = tl.program_id(0).to(tl.int64)
    s_row = row_ptr(S, row, s_d1, s_st0, s_st1)
    t_row = row_ptr(T, row, t_d1, t_st0, t_st1)
    y, valid, y_ok = row_token(TOK, row, V, ignore_index)
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
    coef = (a0, b0, a1, b1)

    # the sampled token's raw logits
    # (never read out of bounds, where the loss is NaN, nor in a masked row)
    y_safe = tl.where(y_ok, y, 0)
    s_y = tl.load(s_row + y_safe * s_stv, mask=valid & y_ok, other=0.0).to(tl.float32)
    t_y = tl.load(t_row + y_safe * t_stv, mask=valid & y_ok, other=0.0).to(tl.float32)

    # The frame (f_s, f_t) of every linear accumulator: both models' logits at one token the
    # student likes, the sampled token or the student's best in the first block, whichever
    # the student rates higher. It is fixed before the pass and never moves after.
    # The streaming grid (_common.grid_lead; ALIGN: rows whose starts are not 16-byte
    # aligned, e.g. V = 50257), whose unmasked full blocks keep their 128-bit loads. Block 0
    # masks the lead columns, the last block the columns past the row (end = n_cols + lead).
    offs = tile2(BLOCK_V)
    s_off = row_offset(row, s_d1, s_st0, s_st1)
    lead = grid_lead(s_off, ALIGN)
    s_grid = on_grid(S, s_off, lead, ALIGN, True)
    t_grid = on_grid(T, row_offset(row, t_d1, t_st0, t_st1), lead, ALIGN, T_SAME)
    end = n_cols + lead
    raw_s = load_span2(s_grid, 0, lead, end, s_stv, STRIDED_V, BLOCK_V)
    raw_t = load_span2(t_grid, 0, lead, end, t_stv, STRIDED_V, BLOCK_V)
    inside = (offs >= lead) & (offs < end)
    s_j = tl.max(tl.max(raw_s, 1), 0)
    j = tl.min(tl.min(tl.where(raw_s == s_j, offs, BLOCK_V), 1), 0)  # first best column
    t_j = tl.sum(tl.sum(tl.where(offs == j, raw_t, 0.0), 1), 0)
    use_y = s_y >= s_j
    f_s = tl.where(use_y, s_y, s_j)
    f_t = tl.where(use_y, t_y, t_j)
    f_s = tl.where(f_s == NEG_INF_, 0.0, f_s)
    f_t = tl.where(f_t == NEG_INF_, 0.0, f_t)
    frame = (f_s, f_t, scale2, tscale2)
    if FKL:  # the row's frame units: FMA unless the frame is too large (_common.fma_frames)
        fma_ok = fma_frames(f_s, f_t, scale2, tscale2)
        rframe = (row_frame(f_s, scale2, fma_ok), row_frame(f_t, tscale2, fma_ok), scale2,
                  tscale2)
    else:
        rframe = frame

    # per slot: the student's raw max m_s, z_s = sum 2^(sf - c_s), acc_ss = sum 2^(..) sf,
    # acc_st = sum 2^(..) tf with sf = (z_S - f_s) scale2, tf = (z_T - f_t) tscale2; the
    # teacher's max and sum; per candidate max, sum and the two forward-KL sums.
    # Block 0 and the partial last block are folded with every guard, the full blocks
    # between them unmasked and unguarded.
    # (a forward-KL row whose frame is too large for FMA skips the full blocks: it is read
    # again below in DIFF form)
    state = _fold(_empty_state(BLOCK_V), raw_s, raw_t, frame, coef, HAS_GATE, FKL, SKIP, True,
                  MAIN)
    hole = tl.sum(tl.sum(((raw_s == NEG_INF_) & inside).to(tl.int32), 1), 0)
    n_full = (end // BLOCK_V) * BLOCK_V
    if FKL:
        n_body = tl.where(fma_ok, n_full, 0)
    else:
        n_body = n_full
    lo_s = slot_state(BLOCK_V // 2, float("inf"))  # reverse KL: the blocks' raw minima
    lo_t = slot_state(BLOCK_V // 2, float("inf"))
    for start in range(BLOCK_V, n_body, BLOCK_V):
        raw_s = load_inside2(s_grid, start, s_stv, STRIDED_V, S_PAIRS, BLOCK_V)
        raw_t = load_inside2(t_grid, start, t_stv, STRIDED_V, T_PAIRS, BLOCK_V)
        state = _fold(state, raw_s, raw_t, frame, coef, HAS_GATE, FKL, SKIP, False, MAIN)
        if not FKL:
            lo_s = tl.minimum(lo_s, tl.min(raw_s, 1))
            lo_t = tl.minimum(lo_t, tl.min(raw_t, 1))
    for start in range(tl.maximum(n_full, BLOCK_V), end, BLOCK_V):  # at most once
        cols = start + offs  # (past block 0: every column of the grid is past the lead)
        raw_s = load_span2(s_grid, start, 0, end, s_stv, STRIDED_V, BLOCK_V)
        state = _fold(state, raw_s, load_span2(t_grid, start, 0, end, t_stv, STRIDED_V,
                                               BLOCK_V), frame, coef, HAS_GATE, FKL, SKIP, True,
                      MAIN)
        hole += tl.sum(tl.sum(((raw_s == NEG_INF_) & (cols < end)).to(tl.int32), 1), 0)

    # An unguarded block that met a -inf (or NaN) logit left a NaN: such a row is read again
    # with every guard. So is, when candidate 0 is taken from the teacher, a row where the
    # student masks a token (the joint support is then smaller than the teacher's), and a
    # forward-KL row whose frame is too large for FMA (in DIFF form).
    chk = state[0][1] + state[0][2] + state[0][3] + state[1][1]
    if not SKIP:
        chk += state[2][1] + state[2][2] + state[2][3]
    if HAS_GATE:
        chk += state[3][1] + state[3][2] + state[3][3]
    redo = any_nan(chk) & (n_full > BLOCK_V)
    if SKIP:
        redo = redo | (hole > 0)
    if FKL:
        redo = redo | ~fma_ok
    state = _reread(_reset(state, redo), s_row, t_row, tl.where(redo, n_cols, 0), V, s_stv,
                    t_stv, rframe, coef, HAS_GATE, FKL, RFORM, STRIDED_V, BLOCK_V)
    computed = redo  # the bridge was computed (rather than taken from the teacher)

    # A frame far from where p_S puts its mass (|E_{p_S}[s - f_s]| or |E_{p_S}[t - f_t]| above
    # FRAME_TOL, e.g. a masked first block and a sampled token the student masks) would cost
    # precision: such a rare row reads itself once more, with those means as its frame.
    # A mean of FRAME_JUMP units or more (a frame token that a model holds at a huge
    # constant, -1e15 or -3e38, beside ordinary logits) is itself rounded at that size, or
    # overflows: that model's frame moves to its row maximum instead, which is exact (the
    # student's mean then lies within log2 V of it).
    # A zero-trip loop for every other row.
    m_s, z_s, w_s = combine_lse((state[0][0], state[0][1]), rframe[0], scale2, RFORM)
    m_t = tl.max(state[1][0], 0)
    acc_ss = tl.sum(tl.where(w_s == 0.0, 0.0, state[0][2] * w_s), 0)  # (see combine_bridge)
    acc_st = tl.sum(tl.where(state[0][3] == NEG_INF_, NEG_INF_, state[0][3] * w_s), 0)
    mean_s = acc_ss / z_s
    mean_t = acc_st / z_s
    # (a NaN mean, where sums of huge frame units overflowed, counts as far and as a jump;
    # a row without p_S has no mean, and a -inf mean_t is a teacher masking p_S's mass)
    has_p = z_s != 0.0  # (NaN too: frame units that overflowed to +inf)
    far_s = ~(tl.abs(mean_s) <= FRAME_TOL) & has_p
    far_t = ~(tl.abs(mean_t) <= FRAME_TOL) & (mean_t != NEG_INF_) & has_p
    far = far_s | far_t
    jump_s = ~(tl.abs(mean_s) < FRAME_JUMP) & (tl.abs(m_s) < float("inf"))
    jump_t = ~(tl.abs(mean_t) < FRAME_JUMP) & (tl.abs(m_t) < float("inf"))
    f_s = tl.where(far_s, tl.where(jump_s, m_s, f_s + mean_s / scale2), f_s)
    f_t = tl.where(far_t, tl.where(jump_t, m_t, f_t + mean_t / tscale2), f_t)
    if FKL:  # (the new frame may be too large for FMA)
        fma_ok = fma_frames(f_s, f_t, scale2, tscale2)
        rframe = (row_frame(f_s, scale2, fma_ok), row_frame(f_t, tscale2, fma_ok), scale2,
                  tscale2)
    else:
        rframe = (f_s, f_t, scale2, tscale2)
    state = _reread(_reset(state, far), s_row, t_row, tl.where(far, n_cols, 0), V, s_stv,
                    t_stv, rframe, coef, HAS_GATE, FKL, RFORM, STRIDED_V, BLOCK_V)
    computed = computed | far

    m_s, z_s, w_s = combine_lse((state[0][0], state[0][1]), rframe[0], scale2, RFORM)
    acc_ss = tl.sum(tl.where(w_s == 0.0, 0.0, state[0][2] * w_s), 0)  # (see combine_bridge)
    acc_st = tl.sum(tl.where(state[0][3] == NEG_INF_, NEG_INF_, state[0][3] * w_s), 0)
    m_t, z_t, _ = combine_lse(state[1], rframe[1], tscale2, RFORM)
    m0, z0, ax0, as0 = combine_bridge(state[2], FKL)
    m1, z1, ax1, as1 = combine_bridge(state[3], FKL)

    r_s = tl.where(m_s == NEG_INF_, 0.0, m_s)
    r_t = tl.where(m_t == NEG_INF_, 0.0, m_t)
    if SKIP:  # candidate 0 is the teacher over its whole support (the student masks nothing)
        m0 = tl.where(computed, m0, frame_units(r_t, f_t, tscale2, DIFF))
        z0 = tl.where(computed, z0, z_t)
    # a model that masks its whole row gives every token probability 0: lp = -inf, not NaN
    lz_s = tl.where(z_s == 0.0, float("inf"), tl.log2(z_s))
    lz_t = tl.where(z_t == 0.0, float("inf"), tl.log2(z_t))
    off_s = -(frame_units(r_s, rframe[0], scale2, RFORM) + lz_s)  # lp_S = sf + off_s (base 2)
    off_t = -(frame_units(r_t, rframe[1], tscale2, RFORM) + lz_t)
    mean_s = acc_ss / z_s                # E_{p_S}[sf] in the final frame
    mean_t = acc_st / z_s                # E_{p_S}[tf]
    elp_s = tl.where(z_s == 0.0, 0.0, mean_s + off_s)  # E_{p_S}[lp_S], base 2 (0: no p_S)
    elp_t = tl.where(z_s == 0.0, 0.0, mean_t + off_t)  # E_{p_S}[lp_T], base 2

    # the sampled token: delta and the gate
    lps_y = (s_y - r_s) * scale2 - lz_s
    lpt_y = (t_y - r_t) * tscale2 - lz_t
    both_zero = (lps_y == NEG_INF_) & (lpt_y == NEG_INF_)
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
        q2 = _empty_state(BLOCK_V)[2]
        for start in range(0, tl.where(need, n_cols, 0), BLOCK_V):
            raw_s = load_span2(s_row, start, 0, V, s_stv, STRIDED_V, BLOCK_V)
            raw_t = load_span2(t_row, start, 0, V, t_stv, STRIDED_V, BLOCK_V)
            sf = frame_units(raw_s, rframe[0], scale2, RFORM)
            x2 = bridge(frame_units(raw_t, rframe[1], tscale2, RFORM), sf, a_c, b_c,
                        (raw_s != NEG_INF_) & (raw_t != NEG_INF_))
            q2 = fold_bridge(q2, x2, sf, FKL, True)
        m2, z2, ax2, as2 = combine_bridge(q2, FKL)
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
    put(out, LOSS, valid, loss)
    put(out, DELTA, valid, delta2 * LN2_)
    put(out, GATE, valid, g)
    put(out, TEACHER_KL, valid, (elp_s - elp_t) * LN2_)
    put(out, ENTROPY, valid, -elp_s * LN2_)
    put(out, A, valid, a_c)
    put(out, B, valid, b_c)
    # backward state (this backend's columns, triton/_table.py)
    put(out, REF_S, valid, r_s)
    put(out, LOG2Z_S, valid, lz_s)
    put(out, FRAME_S, valid, f_s)
    put(out, FRAME_T, valid, f_t)
    put(out, MEAN_S, valid, mean_s)
    put(out, MEAN_T, valid, mean_t)
    put(out, MAX_Q, valid, m_c)
    put(out, LOG2Z_Q, valid, lz_c)
    # The unguarded full blocks met no -inf, +inf or NaN in either model if none left a NaN
    # (no re-read) and the loss is finite (a teacher's -inf where the student has mass is a
    # -inf sum, and an infinite loss): the backward then drops its guards there. Written as
    # the grid that says which columns those blocks are (block size and lead), 0 if not.
    if ALIGN:
        code = BLOCK_V * SLOT + lead
    else:
        code = BLOCK_V * SLOT
    finite = valid & ~redo & (tl.abs(loss) < float("inf"))
    if FKL:  # (the backward's unguarded blocks form FMA frame units)
        finite = finite & fma_ok
    else:
        # Reverse KL's unguarded gradient p (A d_s + B d_t + C) must not overflow where p is 0:
        # the span's logits lie within TAME of the frame (a mask of -3e38 is finite, but not
        # that), and the backward checks its coefficients (_tame).
        span = tl.maximum(tl.maximum(f_s - tl.min(lo_s, 0), r_s - f_s),
                          tl.maximum(f_t - tl.min(lo_t, 0), r_t - f_t))
        finite = finite & (span <= TAME)
    put(out, FINITE, finite, code.to(tl.float32))


@triton.jit
def _rkl_coefficients(rs):
    """Reverse KL's gradient p (A d_s + B d_t + C), d = raw - frame: with d_s scale2 + off_s
    = lp_S, k (u - E_p[u]) is affine in (d_s, d_t), k = factor ln 2 (the row's scalar)
    folded into A, B, C."""
    f_s, f_t, r_s, lz_s, mean_s, mean_t, a, b, m_c, lz_c, scale2, tscale2, factor = rs
    k = factor * 0.6931471805599453
    kb = k * (1.0 - b)
    ka = k * a
    return kb * scale2, -ka * tscale2, ka * mean_t - kb * mean_s


@triton.jit
def _tame(rs):
    """Whether reverse KL's coefficients times logits within TAME of the frame stay finite
    (|A|, |B| <= 2^60, |C| <= 2^100: every term of p (A d_s + B d_t + C) is below 2^125).
    False for a NaN scalar (a bad token id), which the guarded form turns into NaN."""
    c_a, c_b, c_c = _rkl_coefficients(rs)
    return ((tl.abs(c_a) <= 1.152921504606847e18) & (tl.abs(c_b) <= 1.152921504606847e18)
            & (tl.abs(c_c) <= 1.2676506002282294e30))


@triton.jit
def _grad_block(raw_s, raw_t, rs, DIVERGENCE: tl.constexpr, GUARD: tl.constexpr):
    """d loss / d z_S of one block from the row's saved state ``rs``; its ``factor`` is the
    row's scalar (its incoming gradient, validity and token check) over the temperature.
    Without ``GUARD`` (blocks inside the span the forward found finite and, for reverse KL,
    tame) no element is sanitized."""
    f_s, f_t, r_s, lz_s, mean_s, mean_t, a, b, m_c, lz_c, scale2, tscale2, factor = rs
    if DIVERGENCE == RKL:  # p (u - E_p[u]), u = (1-b) lp_S - a lp_T, centred on the frame
        d_s = raw_s - f_s
        d_t = raw_t - f_t
        p = tl.exp2(tl.fma(d_s, scale2, -((r_s - f_s) * scale2 + lz_s)))
        c_a, c_b, c_c = _rkl_coefficients(rs)
        w = tl.fma(c_a, d_s, tl.fma(c_b, d_t, c_c))
        k = factor * 0.6931471805599453
        if GUARD:  # (k * 0: NaN for a bad token id, as p * w)
            gv = tl.where(p == 0.0, k * 0.0, p * w)
        else:
            gv = p * w
    else:  # p - q in the forward's frame units: x has its bits, so x - m_c is exact at the max
        if GUARD:  # the row's form (the forward read rows whose frame is too large in DIFF)
            ok = fma_frames(f_s, f_t, scale2, tscale2)
            fs = row_frame(f_s, scale2, ok)
            ft = row_frame(f_t, tscale2, ok)
            sf = frame_units(raw_s, fs, scale2, ROW)
            tf = frame_units(raw_t, ft, tscale2, ROW)
            p = tl.exp2(sf - (frame_units(r_s, fs, scale2, ROW) + lz_s))
        else:  # (blocks the forward found finite: only rows in FMA form have such blocks)
            sf = frame_units(raw_s, f_s, scale2, FMA)
            tf = frame_units(raw_t, f_t, tscale2, FMA)
            p = tl.exp2(sf - (frame_units(r_s, f_s, scale2, FMA) + lz_s))
        if GUARD:
            x = bridge(tf, sf, a, b, (raw_s != float("-inf")) & (raw_t != float("-inf")))
        else:
            x = tl.fma(a, tf, b * sf)
        q = tl.exp2((x - m_c) - lz_c)
        gv = (p - q) * factor
    return gv


@triton.jit
def _grad_inside(grids, stv, start, rs, DIVERGENCE: tl.constexpr, GUARD: tl.constexpr,
                 STRIDED_V: tl.constexpr, S_PAIRS: tl.constexpr, T_PAIRS: tl.constexpr,
                 BLOCK_V: tl.constexpr):
    """The gradient of a block inside the row: unmasked loads and store."""
    s_grid, t_grid, g_grid = grids
    cols = start + tl.arange(0, BLOCK_V)
    gv = _grad_block(load_inside(s_grid, start, cols, stv[0], STRIDED_V, S_PAIRS, BLOCK_V),
                     load_inside(t_grid, start, cols, stv[1], STRIDED_V, T_PAIRS, BLOCK_V),
                     rs, DIVERGENCE, GUARD)
    tl.store(g_grid + cols, gv.to(g_grid.dtype.element_ty))


@triton.jit
def _opd_bwd_kernel(
    S, T, TOK, ROWS, GROW, DS,
    V,
    s_d1, s_st0, s_st1, s_stv,
    t_d1, t_st0, t_st1, t_stv,
    scale2, tscale2, inv_temp, ignore_index,
    DIVERGENCE: tl.constexpr, STRIDED_V: tl.constexpr, BLOCK_V: tl.constexpr,
    LOCAL_TOKENS: tl.constexpr, BLOCKS: tl.constexpr = 1, ALIGN: tl.constexpr = False,
    T_SAME: tl.constexpr = False, G_SAME: tl.constexpr = False, S_PAIRS: tl.constexpr = False,
    T_PAIRS: tl.constexpr = False,
):
    """Program (row, j) writes the gradient of blocks j BLOCKS .. (j + 1) BLOCKS - 1 of the
    row: the row's state is loaded once for BLOCKS blocks."""
    row = tl.program_id(0).to(tl.int64)
    y, valid, y_ok = row_token(TOK, row, V, ignore_index)
    if not LOCAL_TOKENS:  # global ids of a vocabulary shard: the forward made bad rows NaN
        y_ok = valid
    gr = tl.load(GROW + row)
    st = ROWS + row * LOGITS_K
    # the row's conditions as one scalar: 0 for a masked row (which reads nothing, so its p
    # and q are 0), NaN for a token id out of range, else the incoming gradient
    coef = tl.where(valid, tl.where(y_ok, gr, float("nan")), 0.0)
    n_cols = tl.where(valid, V, 0)
    # (a table may hold -inf sums for a masked row)
    rs = (tl.load(st + FRAME_S), tl.load(st + FRAME_T), tl.load(st + REF_S),
          tl.where(valid, tl.load(st + LOG2Z_S), 0.0), tl.load(st + MEAN_S),
          tl.load(st + MEAN_T), tl.load(st + A), tl.load(st + B), tl.load(st + MAX_Q),
          tl.where(valid, tl.load(st + LOG2Z_Q), 0.0), scale2, tscale2, coef * inv_temp)
    # the columns [c0, c1) of the row that the forward read unguarded and found finite
    # (none where its table says 0; see the forward's FINITE)
    code = tl.load(st + FINITE).to(tl.int32)
    if DIVERGENCE == RKL:
        code = tl.where(_tame(rs), code, 0)
    b_f = code // SLOT
    c0 = b_f - code % SLOT
    c1 = tl.where(code > 0, ((V + code % SLOT) // tl.maximum(b_f, 1)) * b_f - code % SLOT, 0)
    # the forward's grid: a block inside the row loads and stores unmasked, 128-bit where
    # the teacher's and the gradient's rows share the shift
    s_off = row_offset(row, s_d1, s_st0, s_st1)
    lead = grid_lead(s_off, ALIGN)
    grids = (on_grid(S, s_off, lead, ALIGN, True),
             on_grid(T, row_offset(row, t_d1, t_st0, t_st1), lead, ALIGN, T_SAME),
             on_grid(DS, row * V, lead, ALIGN, G_SAME))
    end = n_cols + lead  # the grid's columns [lead, end) are the row's (none if masked)
    # this program's blocks [lo, hi), those inside the row [in_lo, in_hi) unmasked, and of
    # those the ones inside [c0, c1) also unguarded
    lo, hi, in_lo, in_hi = bwd_span(lead, n_cols, V, BLOCKS, BLOCK_V)
    u_lo = tl.minimum(tl.maximum(in_lo, tl.cdiv(c0 + lead, BLOCK_V) * BLOCK_V), in_hi)
    u_hi = tl.maximum(tl.minimum(in_hi, ((c1 + lead) // BLOCK_V) * BLOCK_V), u_lo)
    for start in range(u_lo, u_hi, BLOCK_V):
        _grad_inside(grids, (s_stv, t_stv), start, rs, DIVERGENCE, False, STRIDED_V, S_PAIRS,
                     T_PAIRS, BLOCK_V)
    for start in range(in_lo, in_hi, BLOCK_V):
        if (start < u_lo) | (start >= u_hi):
            _grad_inside(grids, (s_stv, t_stv), start, rs, DIVERGENCE, True, STRIDED_V,
                         S_PAIRS, T_PAIRS, BLOCK_V)
    # the others, masked: block 0 where lead > 0, the partial last block, and every block of
    # a masked row (zeros)
    for start in range(lo, hi, BLOCK_V):
        if (start < in_lo) | (start >= in_hi):
            cols = start + tl.arange(0, BLOCK_V)
            store_span(grids[2], cols, lead, V,
                       _grad_block(load_span(grids[0], cols, lead, end, s_stv, STRIDED_V),
                                   load_span(grids[1], cols, lead, end, t_stv, STRIDED_V), rs,
                                   DIVERGENCE, True))


# ---------------------------------------------------------------------------
# launchers

FWD_BLOCK_V = 4096
FWD_WARPS = 8
MIN_BLOCK_V = 2 * SLOT.value  # a forward block: two slots of tile (sampled, parallel), one of tile2
BWD_BLOCK_V = 8192
BWD_WARPS = 8
BWD_BLOCKS = 4  # blocks per backward program


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


def _misaligned(lay) -> bool:
    """Whether some row of ``lay`` starts off a multiple of SLOT columns."""
    return lay.st0 % SLOT.value != 0 or (lay.d1 > 1 and lay.st1 % SLOT.value != 0)


def _congruent(a, b, m: int = SLOT.value) -> bool:
    """Whether every row of layouts ``a`` and ``b`` starts at the same offset modulo ``m``."""
    return a.d1 == b.d1 and (a.st0 - b.st0) % m == 0 and (a.d1 == 1 or (a.st1 - b.st1) % m == 0)


def shift_plan(ls, lt, vocab: int) -> dict:
    """The constexprs of the shifted grid (ALIGN, T_SAME, G_SAME): taken where the student's
    rows are contiguous along the vocabulary, its base 16-byte aligned and some row start is
    not (V = 50257, a view that starts mid-row). T_SAME / G_SAME: the teacher's rows / the
    gradient's contiguous (N, V) rows share the student's shift, so their blocks vectorize
    too. Elsewhere the rows are read as they are."""
    if ls.stv != 1 or lt.stv != 1 or not _misaligned(ls) or ls.tensor.data_ptr() % 16:
        return dict(ALIGN=False, T_SAME=False, G_SAME=False)
    grad = RowLayout(None, ls.d1, ls.d1 * vocab, vocab, 1)
    return dict(ALIGN=True, T_SAME=_congruent(ls, lt) and lt.tensor.data_ptr() % 16 == 0,
                G_SAME=_congruent(ls, grad))


def _even_rows(lay) -> bool:
    """Whether every row of ``lay`` starts 4-byte aligned (an even column of a bfloat16 tensor
    whose base is 4-byte aligned)."""
    return (lay.tensor.data_ptr() % 4 == 0 and lay.st0 % 2 == 0
            and (lay.d1 == 1 or lay.st1 % 2 == 0))


def pairs_plan(ls, lt, align: bool, block: int) -> dict:
    """S_PAIRS / T_PAIRS: the full blocks of the student's / the teacher's rows are read as
    int32 pairs of bfloat16 logits (:func:`_common.load_pairs`). That needs bfloat16, a
    contiguous vocabulary and grid rows that start 4-byte aligned: every row where the grid
    is not shifted; on the shifted grid (``align``) the student's, and the teacher's where
    its row starts have the parity of the student's. Blocks of fewer than 2 SLOT columns (a
    tiny vocabulary) are read as they are."""
    def bf16(lay):
        return lay.tensor.dtype == torch.bfloat16 and lay.stv == 1 and block >= 2 * SLOT.value
    if align:
        t_ok = lt.tensor.data_ptr() % 4 == 0 and _congruent(ls, lt, 2)
        return dict(S_PAIRS=bf16(ls), T_PAIRS=bf16(lt) and t_ok)
    return dict(S_PAIRS=bf16(ls) and _even_rows(ls), T_PAIRS=bf16(lt) and _even_rows(lt))


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
    block = fwd_block(vocab, block_v, FWD_BLOCK_V)
    _, plan = stream_plan(_opd_fwd_kernel, ls, lt, vocab, block, backward=False)
    _opd_fwd_kernel[(n,)](
        ls.tensor, lt.tensor, tokens, sig, out,
        vocab, ls.d1, ls.st0, ls.st1, ls.stv, lt.d1, lt.st0, lt.st1, lt.stv,
        LOG2E / opts.temperature, LOG2E / opts.teacher_temperature, float(opts.beta),
        float(opts.lam_pos), float(opts.lam_neg), int(opts.ignore_index),
        HAS_GATE=sign is not None, DIVERGENCE=_divergence(opts),
        TEACHER_BRIDGE=(sign is None and float(opts.beta) == 0.0),
        num_warps=num_warps or FWD_WARPS, **plan,
    )
    return out


def _fwd_plan(ls, lt, vocab: int) -> dict:
    """The forward's shift: only where it costs the teacher nothing (its rows share the
    student's shift, or are misaligned themselves). An aligned teacher beside a misaligned
    student (a teacher vocabulary padded to 64) keeps its own 128-bit loads instead; the
    backward, which also writes the gradient, shifts to the student's rows in any case."""
    plan = shift_plan(ls, lt, vocab)
    del plan["G_SAME"]
    if plan["ALIGN"] and not plan["T_SAME"] and not _misaligned(lt):
        plan["ALIGN"] = False
    return plan


def bwd_programs(vocab: int, block: int, align: bool) -> tuple:
    """A backward's programs per row and blocks per program (BLOCKS): up to BWD_BLOCKS
    blocks share one load of the row's state. The shifted grid has SLOT - 1 more columns."""
    blocks = triton.cdiv(vocab + (SLOT.value - 1 if align else 0), block)
    per = min(BWD_BLOCKS, blocks)
    return triton.cdiv(blocks, per), per


def fwd_block(vocab: int, block_v, default: int) -> int:
    """A forward's block: ``block_v`` if given, else the default or the vocabulary rounded up
    to a power of 2 if smaller, never under MIN_BLOCK_V."""
    return max(MIN_BLOCK_V, block_v or min(default, triton.next_power_of_2(vocab)))


def stream_plan(kernel, ls, lt, vocab: int, block: int, backward: bool) -> tuple:
    """One launch of a kernel that streams rows in blocks (logits, sampled and top-k,
    forward and backward): (programs per row, the layout constexprs ``kernel`` takes). ``lt`` is the
    teacher's layout, or None where the student is read alone. The constexprs: STRIDED_V,
    BLOCK_V, the shifted grid (ALIGN, and the teacher's and the gradient's rows joining it:
    :func:`shift_plan`, in forward :func:`_fwd_plan`), the int32 pairs (:func:`pairs_plan`)
    and, in backward, the blocks per program (:func:`bwd_programs`)."""
    lt = ls if lt is None else lt
    plan = shift_plan(ls, lt, vocab) if backward else _fwd_plan(ls, lt, vocab)
    plan.update(pairs_plan(ls, lt, plan["ALIGN"], block), BLOCK_V=block,
                STRIDED_V=ls.stv != 1 or lt.stv != 1)
    programs = 1
    if backward:
        programs, plan["BLOCKS"] = bwd_programs(vocab, block, plan["ALIGN"])
    names = set(kernel.arg_names)
    need = {"STRIDED_V", "BLOCK_V", "ALIGN", "S_PAIRS"} | ({"BLOCKS"} if backward else set())
    assert need <= names, (kernel, need - names)
    return programs, {k: v for k, v in plan.items() if k in names}


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
    programs, plan = stream_plan(_opd_bwd_kernel, ls, lt, vocab, block, backward=True)
    _opd_bwd_kernel[(n, programs)](
        ls.tensor, lt.tensor, tokens, rows, grad_rows.float().contiguous(), grad,
        vocab, ls.d1, ls.st0, ls.st1, ls.stv, lt.d1, lt.st0, lt.st1, lt.stv,
        LOG2E / opts.temperature, LOG2E / opts.teacher_temperature, 1.0 / opts.temperature,
        int(opts.ignore_index), DIVERGENCE=_divergence(opts), LOCAL_TOKENS=bool(local_tokens),
        num_warps=num_warps or BWD_WARPS, **plan,
    )
    return grad
