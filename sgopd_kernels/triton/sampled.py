"""Triton kernels of the sampled-token estimator (teacher gives only lp_T(y)).

Forward: one pass per row for the student's online (max, sum-exp) and
sum 2^(s-m) (s-m) (the entropy statistic), plus the gathered s[y]; maxima in
raw logit units, exponents ``(raw - ref) * log2(e) / tau`` as in logits.py.
The state is kept per slot of a [BLOCK_V // SLOT, SLOT] tile (``_common``):
full blocks unmasked and without per-element guards, a row that meets a -inf
there read again with them.
Backward: a 2-D grid, each program a few blocks of a row, writing
-(A / tau) (onehot(y) - p_S) times the row's incoming gradient, the row's
conditions folded into one scalar. Rows whose
starts are not 16-byte aligned (V = 50257) are read on a grid shifted back to
a 16-byte boundary (``ALIGN``, as in logits.py), so full blocks keep their
128-bit loads and stores.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._layout import row_layout
from ._table import ADV, DELTA, ENTROPY, GATE, LOSS, S_LOG2Z, S_REF, SAMPLED_K, TEACHER_KL
from ._common import (any_nan, bwd_span, grid_lead, load_block, load_inside, load_span,
                      on_grid, put, row_offset, row_ptr, row_token, slot_state, store_span, tile)
from .logits import LOG2E, fwd_block, stream_plan


@triton.jit
def _fold_entropy(st, raw, scale2, GUARD: tl.constexpr):
    """Per slot (raw max m, z = sum 2^(sc), acc = sum 2^(sc) sc), sc = (raw - m) scale2."""
    m, z, acc = st
    nm = tl.maximum(m, tl.max(raw, 1))
    r = tl.where(nm == float("-inf"), 0.0, nm)
    dms = tl.where(m == float("-inf"), 0.0, (m - r) * scale2)
    al = tl.exp2(dms)
    sc = (raw - r[:, None]) * scale2
    e = tl.exp2(sc)
    if GUARD:
        es = tl.where(e == 0.0, 0.0, e * sc)
    else:  # a -inf logit gives 0 * -inf = NaN: the row is read again with GUARD
        es = e * sc
    return nm, z * al + tl.sum(e, 1), (acc + dms * z) * al + tl.sum(es, 1)


@triton.jit
def _sampled_fwd_kernel(
    S, TLP, TOK, SIG, OUT,
    V, s_d1, s_st0, s_st1, s_stv,
    scale2, lam_pos, lam_neg, ignore_index,
    HAS_GATE: tl.constexpr, STRIDED_V: tl.constexpr, BLOCK_V: tl.constexpr,
    ALIGN: tl.constexpr = False, S_PAIRS: tl.constexpr = False,
):
    NEG_INF: tl.constexpr = float("-inf")
    LN2: tl.constexpr = 0.6931471805599453
    row = tl.program_id(0).to(tl.int64)
    s_row = row_ptr(S, row, s_d1, s_st0, s_st1)
    y, valid, y_ok = row_token(TOK, row, V, ignore_index)
    n_cols = tl.where(valid, V, 0)

    # per slot of the [BLOCK_V // SLOT, SLOT] tile: the raw running max, sum 2^((z - m) scale2)
    # and sum 2^((z - m) scale2) (z - m) scale2; full blocks unmasked and unguarded, the
    # partial last one masked and guarded
    # ALIGN (rows whose starts are not 16-byte aligned, e.g. V = 50257): the grid of
    # _common.grid_lead, whose full blocks keep 128-bit loads; its block 0 (which masks the
    # lead) is guarded too
    offs = tile(BLOCK_V)
    empty = (slot_state(BLOCK_V, float("-inf")), slot_state(BLOCK_V, 0.0),
             slot_state(BLOCK_V, 0.0))
    st = empty
    s_off = row_offset(row, s_d1, s_st0, s_st1)
    lead = grid_lead(s_off, ALIGN)
    grid = on_grid(S, s_off, lead, ALIGN, True)
    end = n_cols + lead
    if ALIGN:
        first = BLOCK_V
        st = _fold_entropy(st, load_span(grid, offs, lead, end, s_stv, STRIDED_V), scale2, True)
    else:
        first = 0
    n_full = (end // BLOCK_V) * BLOCK_V
    for start in range(first, n_full, BLOCK_V):
        st = _fold_entropy(st, load_inside(grid, start, start + offs, s_stv, STRIDED_V, S_PAIRS,
                                           BLOCK_V), scale2, False)
    redo = any_nan(st[1] + st[2]) & (n_full > first)  # a -inf (or NaN) logit in a full block
    st = (tl.where(redo, float("-inf"), st[0]), tl.where(redo, 0.0, st[1]),
          tl.where(redo, 0.0, st[2]))
    for start in range(tl.where(redo, 0, tl.maximum(n_full, first)), end, BLOCK_V):
        if ALIGN:  # (block 0 of a re-read masks the lead)
            raw = load_span(grid, start + offs, lead, end, s_stv, STRIDED_V)
        else:  # (lead = 0: only the row's end to mask; a masked row has no trips)
            raw = load_block(grid, start + offs, s_stv, V, STRIDED_V)
        st = _fold_entropy(st, raw, scale2, True)
    m, z, acc = st
    m_s = tl.max(m, 0)
    ref = tl.where(m_s == NEG_INF, 0.0, m_s)
    dm = tl.where(m == NEG_INF, 0.0, (m - ref) * scale2)
    w = tl.exp2(dm)
    z_s = tl.sum(z * w, 0)
    acc_ss = tl.sum((acc + dm * z) * w, 0)
    r_s = tl.where(m_s == NEG_INF, 0.0, m_s)
    lz_s = tl.where(z_s == 0.0, float("inf"), tl.log2(z_s))  # a row without support: lp = -inf

    # (never read out of bounds, where the loss is NaN, nor in a masked row)
    y_safe = tl.where(y_ok, y, 0)
    s_y = tl.load(s_row + y_safe * s_stv, mask=valid & y_ok, other=0.0).to(tl.float32)
    lps_y = ((s_y - r_s) * scale2 - lz_s) * LN2
    lpt_y = tl.load(TLP + row).to(tl.float32)
    both_zero = (lps_y == NEG_INF) & (lpt_y == NEG_INF)
    delta = tl.where(both_zero, 0.0, lpt_y - lps_y)
    if HAS_GATE:
        sig = tl.load(SIG + row).to(tl.float32)
        g = ((delta > 0.0).to(tl.float32) - (delta < 0.0).to(tl.float32)) * sig
        lam = tl.where(g > 0.0, lam_pos, tl.where(g < 0.0, lam_neg, 1.0))
        lam = tl.where(sig != sig, float("nan"), lam)  # a NaN verifier poisons its position
    else:
        g = delta * 0.0
        lam = 1.0
    adv = lam * delta
    loss = tl.where(adv == 0.0, 0.0, -adv * lps_y)  # A = 0 contributes 0 (0 log 0 = 0)
    loss = tl.where(y_ok, loss, float("nan"))

    out = OUT + row * SAMPLED_K
    put(out, LOSS, valid, loss)
    put(out, DELTA, valid, delta)
    put(out, GATE, valid, g)
    put(out, TEACHER_KL, valid, -delta)
    entropy = tl.where(z_s == 0.0, 0.0, (lz_s - acc_ss / z_s) * LN2)
    put(out, ENTROPY, valid, entropy)
    put(out, ADV, valid, adv)
    put(out, S_REF, valid, r_s)
    put(out, S_LOG2Z, valid, lz_s)


@triton.jit
def _grad(raw, cols, col_y, r_s, lz_s, scale2, coef):
    """-(A / tau) (onehot(y) - p_S) times the incoming gradient (``coef``), at ``cols``."""
    return ((cols.to(tl.int64) == col_y).to(tl.float32)
            - tl.exp2((raw - r_s) * scale2 - lz_s)) * coef


@triton.jit
def _sampled_bwd_kernel(
    S, TOK, ROWS, GROW, DS,
    V, s_d1, s_st0, s_st1, s_stv,
    scale2, inv_temp, ignore_index,
    STRIDED_V: tl.constexpr, BLOCK_V: tl.constexpr, BLOCKS: tl.constexpr = 1,
    ALIGN: tl.constexpr = False, G_SAME: tl.constexpr = False, S_PAIRS: tl.constexpr = False,
):
    """Program (row, j) writes blocks j BLOCKS .. (j + 1) BLOCKS - 1 of the row's gradient."""
    row = tl.program_id(0).to(tl.int64)
    y, valid, y_ok = row_token(TOK, row, V, ignore_index)
    n_cols = tl.where(valid, V, 0)  # a masked row reads nothing
    # the row's conditions as one scalar: 0 (masked), NaN (token id out of range), or
    # -(A / tau) times the incoming gradient
    coef = tl.where(valid, tl.where(y_ok, -(tl.load(ROWS + row * SAMPLED_K + ADV) * inv_temp)
                                    * tl.load(GROW + row), float("nan")), 0.0)
    st = ROWS + row * SAMPLED_K
    r_s = tl.load(st + S_REF)
    lz_s = tl.load(st + S_LOG2Z)
    # the forward's grid; a block inside the row is unmasked
    s_off = row_offset(row, s_d1, s_st0, s_st1)
    lead = grid_lead(s_off, ALIGN)
    grid = on_grid(S, s_off, lead, ALIGN, True)
    g_grid = on_grid(DS, row * V, lead, ALIGN, G_SAME)
    end = n_cols + lead
    col_y = y + lead  # y in the grid's columns
    lo, hi, in_lo, in_hi = bwd_span(lead, n_cols, V, BLOCKS, BLOCK_V)
    for start in range(in_lo, in_hi, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        gv = _grad(load_inside(grid, start, cols, s_stv, STRIDED_V, S_PAIRS, BLOCK_V), cols,
                   col_y, r_s, lz_s, scale2, coef)
        tl.store(g_grid + cols, gv.to(DS.dtype.element_ty))
    for start in range(lo, hi, BLOCK_V):  # the others, masked (every block of a masked row)
        if (start < in_lo) | (start >= in_hi):
            cols = start + tl.arange(0, BLOCK_V)
            store_span(g_grid, cols, lead, V, _grad(load_span(grid, cols, lead, end, s_stv,
                                                              STRIDED_V), cols, col_y, r_s,
                                                    lz_s, scale2, coef))


FWD_BLOCK_V = 4096
BWD_BLOCK_V = 4096
NUM_WARPS = 8


def sampled_rows(student, teacher_logprobs, tokens, sign, opts, *, block_v=None):
    if student.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"student_logits: the Triton backend takes float32, bfloat16 or float16, "
                        f"got {student.dtype}; use backend='torch' for float64")
    vocab = student.shape[-1]
    ls = row_layout(student)
    n = tokens.numel()
    out = torch.empty(n, SAMPLED_K.value, dtype=torch.float32, device=student.device)
    if n == 0:
        return out
    block = fwd_block(vocab, block_v, FWD_BLOCK_V)
    _, plan = stream_plan(_sampled_fwd_kernel, ls, None, vocab, block, backward=False)
    _sampled_fwd_kernel[(n,)](
        ls.tensor, teacher_logprobs, tokens, sign if sign is not None else tokens, out,
        vocab, ls.d1, ls.st0, ls.st1, ls.stv,
        LOG2E / opts.temperature, float(opts.lam_pos), float(opts.lam_neg),
        int(opts.ignore_index), HAS_GATE=sign is not None, num_warps=NUM_WARPS, **plan,
    )
    return out


def sampled_rows_backward(grad_rows, student, teacher_logprobs, tokens, rows, opts, *,
                          block_v=None):
    vocab = student.shape[-1]
    ls = row_layout(student)
    n = tokens.numel()
    grad = torch.empty(student.shape, dtype=student.dtype, device=student.device)
    if n == 0 or vocab == 0:
        return grad
    block = block_v or min(BWD_BLOCK_V, triton.next_power_of_2(vocab))
    programs, plan = stream_plan(_sampled_bwd_kernel, ls, None, vocab, block, backward=True)
    _sampled_bwd_kernel[(n, programs)](
        ls.tensor, tokens, rows, grad_rows.float().contiguous(), grad,
        vocab, ls.d1, ls.st0, ls.st1, ls.stv,
        LOG2E / opts.temperature, 1.0 / opts.temperature, int(opts.ignore_index),
        num_warps=NUM_WARPS, **plan,
    )
    return grad
