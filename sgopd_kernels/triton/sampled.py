"""Triton kernels of the sampled-token estimator (teacher gives only lp_T(y)).

Forward: one pass per row for the student's online (max, sum-exp) and
sum 2^(s-m) (s-m) (the entropy statistic), plus the gathered s[y]; maxima in
raw logit units, exponents ``(raw - ref) * log2(e) / tau`` as in logits.py.
Backward: a 2-D grid writing -(A / tau) (onehot(y) - p_S) times the row's
incoming gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._layout import row_layout
from ._table import ADV, DELTA, ENTROPY, GATE, LOSS, S_LOG2Z, S_REF, SAMPLED_K, TEACHER_KL
from .logits import LOG2E, _load_row_block, _row_ptr, _row_token


@triton.jit
def _sampled_fwd_kernel(
    S, TLP, TOK, SIG, OUT,
    V, s_d1, s_st0, s_st1, s_stv,
    scale2, lam_pos, lam_neg, ignore_index,
    HAS_GATE: tl.constexpr, STRIDED_V: tl.constexpr, BLOCK_V: tl.constexpr,
):
    NEG_INF: tl.constexpr = float("-inf")
    LN2: tl.constexpr = 0.6931471805599453
    row = tl.program_id(0).to(tl.int64)
    s_row = _row_ptr(S, row, s_d1, s_st0, s_st1)
    y, valid, y_ok = _row_token(TOK, row, V, ignore_index)
    n_cols = tl.where(valid, V, 0)

    zero = tl.sum(tl.zeros([BLOCK_V], dtype=tl.float32), 0)
    m_s = zero + NEG_INF  # running max of the raw logits
    z_s = zero            # sum 2^((z - m_s) scale2)
    acc_ss = zero         # sum 2^((z - m_s) scale2) (z - m_s) scale2
    offs = tl.arange(0, BLOCK_V)
    for start in range(0, n_cols, BLOCK_V):
        raw = _load_row_block(s_row, start + offs, s_stv, V, STRIDED_V)
        nm_s = tl.maximum(m_s, tl.max(raw, 0))
        r_s = tl.where(nm_s == NEG_INF, 0.0, nm_s)
        dms = tl.where(m_s == NEG_INF, 0.0, (m_s - r_s) * scale2)
        al_s = tl.exp2(dms)
        sc = (raw - r_s) * scale2
        e_s = tl.exp2(sc)
        acc_ss = (acc_ss + dms * z_s) * al_s + tl.sum(tl.where(e_s == 0.0, 0.0, e_s * sc), 0)
        z_s = z_s * al_s + tl.sum(e_s, 0)
        m_s = nm_s
    r_s = tl.where(m_s == NEG_INF, 0.0, m_s)
    lz_s = tl.where(z_s == 0.0, float("inf"), tl.log2(z_s))  # a row without support: lp = -inf

    y_safe = tl.where(y_ok, y, 0)  # never read out of bounds (the loss is NaN then)
    s_y = tl.load(s_row + y_safe * s_stv).to(tl.float32)
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
    tl.store(out + LOSS, tl.where(valid, loss, 0.0))
    tl.store(out + DELTA, tl.where(valid, delta, 0.0))
    tl.store(out + GATE, tl.where(valid, g, 0.0))
    tl.store(out + TEACHER_KL, tl.where(valid, -delta, 0.0))
    entropy = tl.where(z_s == 0.0, 0.0, (lz_s - acc_ss / z_s) * LN2)
    tl.store(out + ENTROPY, tl.where(valid, entropy, 0.0))
    tl.store(out + ADV, tl.where(valid, adv, 0.0))
    tl.store(out + S_REF, tl.where(valid, r_s, 0.0))
    tl.store(out + S_LOG2Z, tl.where(valid, lz_s, 0.0))


@triton.jit
def _sampled_bwd_kernel(
    S, TOK, ROWS, GROW, DS,
    V, s_d1, s_st0, s_st1, s_stv,
    scale2, inv_temp, ignore_index,
    STRIDED_V: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    y, valid, y_ok = _row_token(TOK, row, V, ignore_index)
    gr = tl.load(GROW + row)
    st = ROWS + row * SAMPLED_K
    adv = tl.load(st + ADV)
    r_s = tl.load(st + S_REF)
    lz_s = tl.load(st + S_LOG2Z)
    raw = _load_row_block(_row_ptr(S, row, s_d1, s_st0, s_st1), cols, s_stv, V,
                          STRIDED_V)
    p = tl.exp2((raw - r_s) * scale2 - lz_s)
    onehot = (cols.to(tl.int64) == y).to(tl.float32)
    gv = -(adv * inv_temp) * (onehot - p) * gr
    gv = tl.where(valid, tl.where(y_ok, gv, float("nan")), 0.0)
    tl.store(DS + row * V + cols, gv.to(DS.dtype.element_ty), mask=cols < V)


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
    block = block_v or min(FWD_BLOCK_V, triton.next_power_of_2(vocab))
    _sampled_fwd_kernel[(n,)](
        ls.tensor, teacher_logprobs, tokens, sign if sign is not None else tokens, out,
        vocab, ls.d1, ls.st0, ls.st1, ls.stv,
        LOG2E / opts.temperature, float(opts.lam_pos), float(opts.lam_neg),
        int(opts.ignore_index), HAS_GATE=sign is not None, STRIDED_V=ls.stv != 1, BLOCK_V=block,
        num_warps=NUM_WARPS,
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
    _sampled_bwd_kernel[(n, triton.cdiv(vocab, block))](
        ls.tensor, tokens, rows, grad_rows.float().contiguous(), grad,
        vocab, ls.d1, ls.st0, ls.st1, ls.stv,
        LOG2E / opts.temperature, 1.0 / opts.temperature, int(opts.ignore_index),
        STRIDED_V=ls.stv != 1, BLOCK_V=block, num_warps=NUM_WARPS,
    )
    return grad
