"""Triton kernels of the top-k loss (docs/math.md, "A teacher that returns its top-k").

The teacher is k ids and their log-probabilities per row; only the student has a
row of V logits. Four kernels, each with its launcher below:

1. ``_topk_stream_kernel``, one program per row, one streaming pass over the
   student's logits: their maximum, ``S = sum 2^((z - r) scale2)`` and
   ``sum 2^((z - r) scale2) (z - r) scale2`` (the entropy), against a reference
   ``r`` fixed before the pass (the largest student logit among the row's
   categories and its first block); then the student's logits at the k ids (and
   at y), and the tail by exclusion: ``tail = S - sum over the categories of the
   same terms``. The terms at the ids are formed by the same operations on the
   same values as in the stream, so they are bitwise the terms the stream added;
   both sums are float64, so the subtraction is exact to about 1e-16 of S and
   the tail keeps float32 precision even when the categories hold all but 1e-6
   of the student's mass. No per-element membership test, except in the rare
   row whose tail holds less than 2^-30 of S (where the subtraction would leave
   fewer digits than float32 has, or the terms underflowed): it reads itself
   once more, each block tested against the sorted ids that fall into it, and
   sums its tail against the tail's own maximum. A row whose maximum lies more
   than 64 (base 2) above ``r`` reads itself once more with the maximum as its
   reference. Both re-reads are zero-trip loops for every other row.
2. ``_topk_rows_kernel``, one program per row, O(k): the categories, delta, the
   gate, the bridge over the categories and the divergence (reverse KL, forward
   KL or JSD), the statistics and the row's backward state, into the row table.
   It makes a row NaN where an id is outside the vocabulary, an id appears twice
   or the sampled token is out of range (nothing is read out of bounds).
3. ``_topk_bwd_kernel``, a 2-D grid over (row, a few vocabulary blocks): re-reads
   the student's logits and writes ``p_S,v alpha_tail / tau`` (the tail's
   coefficient) times the row's incoming gradient, everywhere, the row's
   conditions folded into two scalars (the coefficient, and the value where
   p_S is 0: 0, or NaN for a NaN row).
4. ``_topk_bwd_slots_kernel``, one program per row, after (3): overwrites the
   gradient at the k ids (and at y with its own category) with the categories'
   own values.

Kernels (1) and (3) stream the grid of ``_common.grid_lead``: rows whose starts
are not 16-byte aligned (V = 50257) are read on a grid shifted back to a 16-byte
boundary, so that the blocks inside the row keep their 128-bit loads and
stores.

Traffic: the student's logits are read once in forward (plus k gathered values)
and once in backward, which writes the gradient; the teacher side is O(rows k).
With ``process_group`` the same kernels run on each rank's shard of the
student's logits, with the ids global (``start`` is the shard's first column):
(1) gives each shard's sums, which :func:`topk_rows_parallel` combines with
all-reduces of O(rows k) before (2).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from .._options import Divergence
from ..parallel import all_reduce, shard_start
from ._layout import row_layout
from ._table import (A, B, DELTA, ENTROPY, GATE, K_G_MEAN, K_LOG2Z, K_LOG_ZQ, K_REF,
                     K_TAIL_COEF, K_TAIL_LOG2, LOSS, TEACHER_KL, TOPK_K)
from ._common import (bwd_span, grid_lead, load_block, load_inside, load_span, on_grid, online,
                      put, row_offset, row_ptr, row_token, store_span, tile)
from .logits import LOG2E, fwd_block, stream_plan

RKL = tl.constexpr(int(Divergence.REVERSE_KL))
FKL = tl.constexpr(int(Divergence.FORWARD_KL))
# the stream kernel's per-row output: the reference r; S (the sum of 2^((z - r) scale2)), the
# tail's log2 of that sum, the categories' sum; sum 2^((z - r) scale2) (z - r) scale2; the
# raw student logit at y where this shard holds y (0 elsewhere)
ST_REF = tl.constexpr(0)
ST_S = tl.constexpr(1)
ST_LT2 = tl.constexpr(2)
ST_HELD = tl.constexpr(3)
ST_ENT = tl.constexpr(4)
ST_ZY = tl.constexpr(5)
STREAM_K = tl.constexpr(6)


@triton.jit
def _shard_col(ids, start, V):
    """The shard's column of each global id (negative ids: unused), -1 where not held."""
    col = ids - start
    return tl.where((ids >= 0) & (col >= 0) & (col < V), col, -1)


@triton.jit
def _stream_block(raw, r, scale2, mx, acc, ent, cnt):
    """Fold a tile of raw logits into the running max, sum of 2^((raw - r) scale2) (float64),
    sum of 2^((raw - r) scale2) (raw - r) scale2 and count of finite logits."""
    sf = (raw - r) * scale2
    e = tl.exp2(sf)
    mx = tl.maximum(mx, tl.max(raw, 1))
    acc += tl.sum(e.to(tl.float64), 1)
    ent += tl.sum(tl.where(e == 0.0, 0.0, e * sf), 1)
    cnt += tl.sum((raw > float("-inf")).to(tl.int32), 1)
    return mx, acc, ent, cnt


@triton.jit
def _stream_range(s_row, lo, hi, V, s_stv, r, scale2, mx, acc, ent, cnt,
                  STRIDED_V: tl.constexpr, BLOCK_V: tl.constexpr):
    offs = tile(BLOCK_V)
    for start in range(lo, hi, BLOCK_V):
        raw = load_block(s_row, start + offs, s_stv, V, STRIDED_V)
        mx, acc, ent, cnt = _stream_block(raw, r, scale2, mx, acc, ent, cnt)
    return mx, acc, ent, cnt


@triton.jit
def _next_col(SORTED, row, K1, j, start):
    """The shard column of the row's j-th category id in ascending order (K1 of them), or
    2^62 past the last."""
    c = tl.load(SORTED + row * K1 + tl.minimum(j, K1 - 1)) - start
    return tl.where(j < K1, c, 4611686018427387904)


@triton.jit
def _tail_by_membership(s_row, SORTED, row, K1, start, lo, hi, V, s_stv, r, scale2,
                        STRIDED_V: tl.constexpr, BLOCK_V: tl.constexpr):
    """log2 of the tail's sum of 2^((z - r) scale2), each token tested for membership against
    the row's category ids sorted ascending (SORTED, K1 per row): one more read of the row,
    in which each block compares its tokens with the ids that fall into it, and sums the
    others against their own maximum (so nothing underflows). Called with lo = hi = 0 (no
    iteration) for every row but the rare one whose tail holds less than 2^-30 of S, where
    the exclusion would lose digits."""
    offs = tl.arange(0, BLOCK_V)
    zero = tl.sum(tl.zeros([BLOCK_V], dtype=tl.float32), 0)
    m_t = zero + float("-inf")
    z_t = zero
    j = (row * 0).to(tl.int32)
    for lo_v in range(lo, hi, BLOCK_V):
        cols = lo_v + offs
        member = cols < 0
        c = _next_col(SORTED, row, K1, j, start)
        while c < lo_v + BLOCK_V:  # the ids below this block's end (those below it: no-ops)
            member = member | (cols == c)
            j += 1
            c = _next_col(SORTED, row, K1, j, start)
        raw = load_block(s_row, cols, s_stv, V, STRIDED_V)
        m_t, z_t = online(tl.where(member, float("-inf"), raw), m_t, z_t, scale2)
    return (tl.where(m_t == float("-inf"), 0.0, m_t) - r) * scale2 + tl.log2(z_t)


@triton.jit
def _topk_stream_kernel(
    S, IDS, SORTED, TOK, ZK, ST,
    V, start, K, K1,
    s_d1, s_st0, s_st1, s_stv,
    scale2, ignore_index,
    HAS_TTL: tl.constexpr, STRIDED_V: tl.constexpr, BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr, ALIGN: tl.constexpr = False, S_PAIRS: tl.constexpr = False,
):
    NEG_INF: tl.constexpr = float("-inf")
    FAR: tl.constexpr = 64.0  # base-2 units from the reference
    row = tl.program_id(0).to(tl.int64)
    s_row = row_ptr(S, row, s_d1, s_st0, s_st1)
    y, valid, _ = row_token(TOK, row, V, ignore_index)
    n_cols = tl.where(valid, V, 0)  # a masked row reads nothing

    # the slots this shard holds (all in-range ones on one device), and y
    lanes = tl.arange(0, BLOCK_K)
    in_k = lanes < K
    ids = tl.load(IDS + row * K + lanes, mask=lanes < tl.where(valid, K, 0), other=-1)
    col = _shard_col(ids, start, V)
    own = col >= 0
    z_k = tl.load(s_row + tl.where(own, col, 0) * s_stv, mask=own,
                  other=NEG_INF).to(tl.float32)
    y_col = _shard_col(tl.where(valid, y, -1), start, V)
    own_y = y_col >= 0
    z_y = tl.load(s_row + tl.where(own_y, y_col, 0) * s_stv, mask=own_y,
                  other=NEG_INF).to(tl.float32)
    # with the teacher's lp_T(y), y has its own category where it is not among the ids: it is
    # excluded from the tail too
    in_e = tl.max(((ids == y) & (ids >= 0) & in_k).to(tl.int32), 0) > 0
    excl_y = own_y & (in_e == 0) & HAS_TTL

    # the reference, fixed before the pass: the largest of the categories' logits and the
    # first block's. The pass streams the grid of _common.grid_lead (ALIGN: rows whose
    # starts are not 16-byte aligned, e.g. V = 50257): block 0 masks the lead columns, the
    # full blocks are unmasked (128-bit loads), the partial last one masks past the row.
    offs = tile(BLOCK_V)
    s_off = row_offset(row, s_d1, s_st0, s_st1)
    lead = grid_lead(s_off, ALIGN)
    grid = on_grid(S, s_off, lead, ALIGN, True)
    end = n_cols + lead
    raw = load_span(grid, offs, lead, end, s_stv, STRIDED_V)
    r = tl.maximum(tl.maximum(tl.max(tl.max(raw, 1), 0), tl.max(z_k, 0)),
                   tl.where(excl_y, z_y, NEG_INF))
    r = tl.where(r == NEG_INF, 0.0, r)
    r = tl.where(r != r, 0.0, r)  # (a NaN logit: the sums carry it)
    mx = tl.full([BLOCK_V // 8], NEG_INF, tl.float32)
    acc = tl.zeros([BLOCK_V // 8], dtype=tl.float64)
    ent = tl.zeros([BLOCK_V // 8], dtype=tl.float32)
    cnt = tl.zeros([BLOCK_V // 8], dtype=tl.int32)
    mx, acc, ent, cnt = _stream_block(raw, r, scale2, mx, acc, ent, cnt)
    n_full = (end // BLOCK_V) * BLOCK_V
    for lo in range(BLOCK_V, n_full, BLOCK_V):
        raw = load_inside(grid, lo, lo + offs, s_stv, STRIDED_V, S_PAIRS, BLOCK_V)
        mx, acc, ent, cnt = _stream_block(raw, r, scale2, mx, acc, ent, cnt)
    for lo in range(tl.maximum(n_full, BLOCK_V), end, BLOCK_V):  # at most once
        raw = load_block(grid, lo + offs, s_stv, end, STRIDED_V)
        mx, acc, ent, cnt = _stream_block(raw, r, scale2, mx, acc, ent, cnt)
    m = tl.max(mx, 0)
    # a maximum far above the reference would overflow the sums, one far below it (the
    # reference was 0 for a first block and categories all -inf) underflow them: read again
    # from it
    far = (m > NEG_INF) & (tl.abs(m - r) * scale2 > FAR)
    r = tl.where(far, m, r)
    acc = tl.where(far, 0.0, acc)
    ent = tl.where(far, 0.0, ent)
    cnt = tl.where(far, 0, cnt)
    mx, acc, ent, cnt = _stream_range(s_row, 0, tl.where(far, n_cols, 0), V, s_stv, r, scale2,
                                      mx, acc, ent, cnt, STRIDED_V, BLOCK_V)
    total = tl.sum(acc, 0)

    # the tail by exclusion: the categories' terms, formed as the stream formed them
    e_k = tl.exp2((z_k - r) * scale2)
    e_y = tl.exp2((z_y - r) * scale2)
    held = tl.sum(tl.where(own, e_k, 0.0).to(tl.float64), 0) \
        + tl.where(excl_y, e_y, 0.0).to(tl.float64)
    # finite logits outside the categories: none gives a tail of exactly 0
    n_out = tl.sum(cnt, 0) - tl.sum((own & (z_k > NEG_INF)).to(tl.int32), 0) \
        - (excl_y & (z_y > NEG_INF)).to(tl.int32)
    tail = tl.maximum(total - held, 0.0)
    lt2 = tl.where((tail > 0.0) & (n_out > 0), tl.log2(tail), NEG_INF).to(tl.float32)
    lt2 = tl.where(total != total, float("nan"), lt2)
    # a tail that finite logits hold but that lies 30 (base 2) below S, where the exclusion
    # leaves fewer digits than float32 has (or its terms underflowed): summed again, each token
    # tested for membership (rare)
    under = (n_out > 0) & (lt2 < tl.log2(total).to(tl.float32) - 30.0)
    lt2 = tl.where(under, _tail_by_membership(
        s_row, SORTED, row, K1, start, 0, tl.where(under, n_cols, 0), V, s_stv, r, scale2,
        STRIDED_V, BLOCK_V), lt2)

    out = ST + row * STREAM_K
    put(out, ST_REF, valid, r)
    put(out, ST_S, valid, total.to(tl.float32))
    tl.store(out + ST_LT2, tl.where(valid, lt2, NEG_INF))
    put(out, ST_HELD, valid, held.to(tl.float32))
    put(out, ST_ENT, valid, tl.sum(ent, 0))
    tl.store(out + ST_ZY, tl.where(own_y, z_y, 0.0))
    tl.store(ZK + row * K + lanes, tl.where(own, z_k, 0.0), mask=in_k)


@triton.jit
def _log_mixture(ls, lq, log1m_pi, log_pi):
    """log((1 - pi) e^ls + pi e^lq); -inf where both are -inf."""
    u = ls + log1m_pi
    v = lq + log_pi
    m = tl.maximum(u, v)
    mf = tl.where(m == float("-inf"), 0.0, m)
    out = mf + tl.log(tl.exp(u - mf) + tl.exp(v - mf))
    return tl.where(m == float("-inf"), float("-inf"), out)


@triton.jit
def _log1m(x):
    """log(1 - x) for x in [0, 1], float64, accurate for small x too (its series below 1e-3)."""
    series = -x * (1.0 + x * (0.5 + x * (1.0 / 3.0 + x * 0.25)))
    return tl.where(x < 1e-3, series, tl.log(1.0 - x))


@triton.jit
def _xmul(p, x):
    """p x with 0 x = 0 (0 log 0 = 0)."""
    return tl.where(p == 0.0, 0.0, p * x)


@triton.jit
def _bridge_x(ls, lt, a, b):
    return tl.where((ls != float("-inf")) & (lt != float("-inf")), a * lt + b * ls,
                    float("-inf"))


@triton.jit
def _category_g(ls, lq, p, log1m_pi, one_m_pi, DIVERGENCE: tl.constexpr):
    """G_c = d loss / d P_S(c) (up to a constant) of a category with one token, for reverse
    KL and JSD (forward KL's single tokens use p - q instead)."""
    if DIVERGENCE == RKL:
        g = ls - lq
    else:
        g = one_m_pi * (ls - _log_mixture(ls, lq, log1m_pi, tl.log(1.0 - one_m_pi)))
    return tl.where(p > 0.0, g, 0.0)


@triton.jit
def _topk_rows_kernel(
    IDS, TLP, TTL, TOK, SIG, ZK, ST, OUT,
    VG, K,
    scale2, beta, lam_pos, lam_neg, jsd_beta, tail_floor, ignore_index,
    HAS_GATE: tl.constexpr, HAS_TTL: tl.constexpr, DIVERGENCE: tl.constexpr,
    BLOCK_K: tl.constexpr, DUP_K: tl.constexpr,
):
    NEG_INF: tl.constexpr = float("-inf")
    LN2: tl.constexpr = 0.6931471805599453
    LOG2E_: tl.constexpr = 1.4426950408889634
    row = tl.program_id(0).to(tl.int64)
    y, valid, y_ok = row_token(TOK, row, VG, ignore_index)
    lanes = tl.arange(0, BLOCK_K)
    in_k = lanes < K
    ids = tl.load(IDS + row * K + lanes, mask=in_k, other=-1)
    present = in_k & (ids >= 0)
    # bad input: an id outside the vocabulary, an id twice, an out-of-range token: NaN
    bad = (tl.max((present & (ids >= VG)).to(tl.int32), 0) > 0) | (y_ok == 0)
    dup = lanes < 0
    for j0 in range(0, K, DUP_K):
        sub = j0 + tl.arange(0, DUP_K)
        ids_j = tl.load(IDS + row * K + sub, mask=sub < K, other=-1)
        same = (ids_j[:, None] == ids[None, :]) & (ids_j[:, None] >= 0) \
            & (sub[:, None] != lanes[None, :]) & in_k[None, :]
        dup = dup | (tl.max(same.to(tl.int32), 0) > 0)
    bad = bad | (tl.max(dup.to(tl.int32), 0) > 0)
    hit = present & (ids == y)
    in_e = tl.max(hit.to(tl.int32), 0) > 0

    st = ST + row * STREAM_K
    r = tl.load(st + ST_REF)
    s_tot = tl.load(st + ST_S)
    lt2 = tl.load(st + ST_LT2)
    held_s = tl.load(st + ST_HELD)
    ent = tl.load(st + ST_ENT)
    z_y = tl.load(st + ST_ZY)
    lz = tl.where(s_tot == 0.0, float("inf"), tl.log2(s_tot))  # no support: lp = -inf

    # the categories' log-probabilities (natural units): slots, y's own, the tail
    z_k = tl.load(ZK + row * K + lanes, mask=present, other=NEG_INF)
    ls_k = tl.where(present, ((z_k - r) * scale2 - lz) * LN2, NEG_INF)
    lt_k = tl.where(present, tl.load(TLP + row * K + lanes, mask=present, other=NEG_INF)
                    .to(tl.float32), NEG_INF)
    zero = tl.sum(tl.zeros([BLOCK_K], dtype=tl.float32), 0)  # a float32 scalar
    own = valid & (in_e == 0) & HAS_TTL
    ls_y = tl.where(own, ((z_y - r) * scale2 - lz) * LN2, NEG_INF)
    if HAS_TTL:
        lt_y = tl.where(own, tl.load(TTL + row).to(tl.float32), NEG_INF)
    else:
        lt_y = zero + NEG_INF
    # the student's tail: log(tail / S) where the tail is the smaller part, log(1 - held / S)
    # (in float64) where the categories are: either way relative precision (a log-probability
    # near 0 keeps its digits, and delta its sign, when both models' tails are near 1)
    ls_t = tl.where(lt2 < tl.log2(held_s), (lt2 - lz) * LN2,
                    _log1m((held_s / s_tot).to(tl.float64)).to(tl.float32))
    ls_t = tl.where(lt2 == NEG_INF, NEG_INF, ls_t)
    ls_t = tl.where(lt2 != lt2, lt2, ls_t)
    # the teacher's tail, max(1 - sum, tail_floor), in float64
    held = tl.sum(tl.where(present, tl.exp(lt_k.to(tl.float64)), 0.0), 0) \
        + tl.where(own, tl.exp(lt_y.to(tl.float64)), 0.0)
    lt_t = tl.where(1.0 - held > tail_floor, _log1m(held),
                    tl.log(tail_floor)).to(tl.float32)
    lt_t = tl.where(held != held, float("nan"), lt_t)

    # delta at y's category, the gate, the bridge coefficients
    ls_c = tl.where(in_e, tl.sum(tl.where(hit, ls_k, 0.0), 0), tl.where(own, ls_y, ls_t))
    lt_c = tl.where(in_e, tl.sum(tl.where(hit, lt_k, 0.0), 0), tl.where(own, lt_y, lt_t))
    delta = tl.where((ls_c == NEG_INF) & (lt_c == NEG_INF), 0.0, lt_c - ls_c)
    if HAS_GATE:
        sig = tl.load(SIG + row).to(tl.float32)
        g = ((delta > 0.0).to(tl.float32) - (delta < 0.0).to(tl.float32)) * sig
        lam = tl.where(g > 0.0, lam_pos, tl.where(g < 0.0, lam_neg, 1.0))
        lam = tl.where(sig != sig, float("nan"), lam)  # a NaN verifier poisons its position
    else:
        g = zero
        lam = zero + 1.0
    a = lam
    b = 1.0 - lam + beta

    # the bridge over the categories, log Q = x - log Z_q
    x_k = _bridge_x(ls_k, lt_k, a, b)
    x_y = _bridge_x(ls_y, lt_y, a, b)
    x_t = _bridge_x(ls_t, lt_t, a, b)
    m_x = tl.maximum(tl.maximum(tl.max(x_k, 0), x_y), x_t)
    m_xf = tl.where(m_x == NEG_INF, 0.0, m_x)
    z_q = tl.sum(tl.exp(x_k - m_xf), 0) + tl.exp(x_y - m_xf) + tl.exp(x_t - m_xf)
    lzq = m_xf + tl.log(z_q)
    lq_k = x_k - lzq
    lq_y = x_y - lzq
    lq_t = x_t - lzq
    p_k = tl.exp(ls_k)
    p_y = tl.exp(ls_y)
    p_t = tl.exp(ls_t)
    log1m_pi = tl.log(1.0 - jsd_beta)
    one_m_pi = 1.0 - jsd_beta
    if DIVERGENCE == FKL:  # KL(Q || P_S); G_tail = -Q_tail / P_S(tail), sum P_S G = -sum Q
        q_k = tl.exp(lq_k)
        q_y = tl.exp(lq_y)
        q_t = tl.exp(lq_t)
        loss = tl.sum(_xmul(q_k, lq_k - ls_k), 0) + _xmul(q_y, lq_y - ls_y) \
            + _xmul(q_t, lq_t - ls_t)
        q_rest = tl.sum(q_k, 0) + q_y
        g_mean = -(q_rest + q_t)
        # the tail's alpha = 1 - Q_tail / P_S(tail) as sum of the other Q minus
        # Q_tail P_S(others) / P_S(tail) (no cancellation when the tail holds nearly all), the
        # ratio in float64 (P_S(tail) may lie below float32's range where Q does not)
        m_e = tl.maximum(tl.max(ls_k, 0), ls_y)
        m_ef = tl.where(m_e == NEG_INF, 0.0, m_e)
        lse_e = m_ef + tl.log(tl.sum(tl.exp(ls_k - m_ef), 0) + tl.exp(ls_y - m_ef))
        # alpha = q_rest - e^u in the log domain: e^u may lie beyond float64's range (a tail
        # that only the membership pass resolves), log2 |alpha| does not
        u = (lq_t + lse_e - ls_t).to(tl.float64)
        l_rest = tl.log(q_rest.to(tl.float64))
        big = u > l_rest
        log_abs = tl.where(big, u + _log1m(tl.exp(l_rest - u)), l_rest + _log1m(tl.exp(u - l_rest)))
        log_abs = tl.where((ls_t == NEG_INF) | ((u == NEG_INF) & (l_rest == NEG_INF)), NEG_INF,
                           log_abs)
        alpha = tl.where(big & (ls_t != NEG_INF), -1.0, 1.0) * tl.exp(log_abs)
        alpha_l2 = log_abs * LOG2E_
    else:
        g_k = _category_g(ls_k, lq_k, p_k, log1m_pi, one_m_pi, DIVERGENCE)
        g_y = _category_g(ls_y, lq_y, p_y, log1m_pi, one_m_pi, DIVERGENCE)
        g_t = _category_g(ls_t, lq_t, p_t, log1m_pi, one_m_pi, DIVERGENCE)
        g_mean = tl.sum(_xmul(p_k, g_k), 0) + _xmul(p_y, g_y) + _xmul(p_t, g_t)
        # the tail's alpha = G_tail - g_mean as sum over the others of P_S (G_tail - G_c): no
        # cancellation when the tail holds nearly all the mass
        alpha = (tl.sum(_xmul(p_k, g_t - g_k), 0) + _xmul(p_y, g_t - g_y)).to(tl.float64)
        alpha_l2 = tl.log2(tl.abs(alpha))
        if DIVERGENCE == RKL:  # KL(P_S || Q)
            loss = tl.sum(_xmul(p_k, ls_k - lq_k), 0) + _xmul(p_y, ls_y - lq_y) \
                + _xmul(p_t, ls_t - lq_t)
        else:  # pi KL(Q || M) + (1 - pi) KL(P_S || M)
            log_pi = tl.log(jsd_beta)
            q_k = tl.exp(lq_k)
            q_y = tl.exp(lq_y)
            q_t = tl.exp(lq_t)
            lm_k = _log_mixture(ls_k, lq_k, log1m_pi, log_pi)
            lm_y = _log_mixture(ls_y, lq_y, log1m_pi, log_pi)
            lm_t = _log_mixture(ls_t, lq_t, log1m_pi, log_pi)
            loss = jsd_beta * (tl.sum(_xmul(q_k, lq_k - lm_k), 0) + _xmul(q_y, lq_y - lm_y)
                               + _xmul(q_t, lq_t - lm_t)) + g_mean
    loss = tl.where(z_q == 0.0, float("inf"), loss)  # an empty joint support: no target
    if HAS_GATE:
        loss = tl.where(sig != sig, float("nan"), loss)
    loss = tl.where(bad, float("nan"), loss)
    alpha = tl.where(bad, float("nan"), alpha)
    alpha_l2 = tl.where(alpha != alpha, float("nan"), alpha_l2)
    teacher_kl = tl.sum(_xmul(p_k, ls_k - lt_k), 0) + _xmul(p_y, ls_y - lt_y) \
        + _xmul(p_t, ls_t - lt_t)
    entropy = tl.where(s_tot == 0.0, 0.0, (lz - ent / s_tot) * LN2)

    out = OUT + row * TOPK_K
    put(out, LOSS, valid, loss)
    put(out, DELTA, valid, delta)
    put(out, GATE, valid, g)
    put(out, TEACHER_KL, valid, teacher_kl)
    put(out, ENTROPY, valid, entropy)
    put(out, A, valid, a)
    put(out, B, valid, b)
    put(out, K_REF, valid, r)
    put(out, K_LOG2Z, valid, lz)
    put(out, K_TAIL_COEF, valid, alpha.to(tl.float32))
    put(out, K_TAIL_LOG2, valid, alpha_l2.to(tl.float32))
    put(out, K_G_MEAN, valid, g_mean)
    put(out, K_LOG_ZQ, valid, lzq)


@triton.jit
def _topk_bwd_kernel(
    S, TOK, ROWS, GROW, DS,
    V, s_d1, s_st0, s_st1, s_stv,
    scale2, inv_temp, ignore_index,
    STRIDED_V: tl.constexpr, BLOCK_V: tl.constexpr, BLOCKS: tl.constexpr = 1,
    ALIGN: tl.constexpr = False, G_SAME: tl.constexpr = False, S_PAIRS: tl.constexpr = False,
):
    """Program (row, j) writes blocks j BLOCKS .. (j + 1) BLOCKS - 1 of the row's gradient,
    on the forward's grid (_common.grid_lead): a block inside the row unmasked."""
    row = tl.program_id(0).to(tl.int64)
    _, valid, _ = row_token(TOK, row, V, ignore_index)
    n_cols = tl.where(valid, V, 0)  # a masked row reads nothing
    st = ROWS + row * TOPK_K
    r = tl.load(st + K_REF)
    lz = tl.load(st + K_LOG2Z)
    alpha = tl.load(st + K_TAIL_COEF)
    # p_S alpha g (g: the incoming gradient over tau). Where alpha g lies far outside float32's
    # range, or p_S underflows where p_S alpha does not (forward KL toward a tail the student
    # nearly lacks), 2^e of the coefficient moves into the exponent: p_S 2^e (alpha g 2^-e)
    g = tl.load(GROW + row) * inv_temp
    l2 = tl.load(st + K_TAIL_LOG2) + tl.log2(tl.abs(g))
    fold = (tl.abs(l2) > 64.0) & (tl.abs(l2) < float("inf"))
    e = tl.where(fold, tl.floor(l2), 0.0)
    sgn = tl.where(alpha < 0.0, -1.0, 1.0) * tl.where(g < 0.0, -1.0, 1.0)
    # the row's conditions in two scalars: the coefficient (0 for a masked row, NaN for a NaN
    # row, which is NaN everywhere) and the value where p_S is 0 (0, or NaN for a NaN row)
    coef = tl.where(valid, tl.where(alpha != alpha, float("nan"),
                                    tl.where(fold, sgn * tl.exp2(l2 - e), alpha * g)), 0.0)
    zero = tl.where(coef != coef, float("nan"), 0.0)
    shift = lz - e
    s_off = row_offset(row, s_d1, s_st0, s_st1)
    lead = grid_lead(s_off, ALIGN)
    grid = on_grid(S, s_off, lead, ALIGN, True)
    g_grid = on_grid(DS, row * V, lead, ALIGN, G_SAME)
    lo, hi, in_lo, in_hi = bwd_span(lead, n_cols, V, BLOCKS, BLOCK_V)
    for start in range(in_lo, in_hi, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        raw = load_inside(grid, start, cols, s_stv, STRIDED_V, S_PAIRS, BLOCK_V)
        p = tl.exp2((raw - r) * scale2 - shift)
        tl.store(g_grid + cols, tl.where(p == 0.0, zero, p * coef).to(DS.dtype.element_ty))
    for start in range(lo, hi, BLOCK_V):  # the others, masked (every block of a masked row)
        if (start < in_lo) | (start >= in_hi):
            cols = start + tl.arange(0, BLOCK_V)
            raw = load_span(grid, cols, lead, n_cols + lead, s_stv, STRIDED_V)
            p = tl.exp2((raw - r) * scale2 - shift)
            store_span(g_grid, cols, lead, V, tl.where(p == 0.0, zero, p * coef))


@triton.jit
def _slot_grad(z, lt, r, lz, a, b, lzq, g_mean, scale2, log1m_pi, one_m_pi,
               DIVERGENCE: tl.constexpr):
    """The gradient at a token with its own category (times tau and the incoming gradient)."""
    LN2: tl.constexpr = 0.6931471805599453
    lp2 = (z - r) * scale2 - lz
    p = tl.exp2(lp2)
    ls = lp2 * LN2
    lq = _bridge_x(ls, lt, a, b) - lzq
    if DIVERGENCE == FKL:  # p (1 - sum Q) - ... = p - q
        return p * (-g_mean) - tl.exp(lq)
    return _xmul(p, _category_g(ls, lq, p, log1m_pi, one_m_pi, DIVERGENCE) - g_mean)


@triton.jit
def _topk_bwd_slots_kernel(
    S, IDS, TLP, TTL, TOK, ROWS, GROW, DS,
    V, start, K,
    s_d1, s_st0, s_st1, s_stv,
    scale2, inv_temp, jsd_beta, ignore_index,
    HAS_TTL: tl.constexpr, DIVERGENCE: tl.constexpr, BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = row_ptr(S, row, s_d1, s_st0, s_st1)
    y, valid, _ = row_token(TOK, row, V, ignore_index)
    st = ROWS + row * TOPK_K
    r = tl.load(st + K_REF)
    lz = tl.load(st + K_LOG2Z)
    coef = tl.load(st + K_TAIL_COEF)
    a = tl.load(st + A)
    b = tl.load(st + B)
    lzq = tl.load(st + K_LOG_ZQ)
    g_mean = tl.load(st + K_G_MEAN)
    scale = tl.load(GROW + row) * inv_temp
    log1m_pi = tl.log(1.0 - jsd_beta)
    one_m_pi = 1.0 - jsd_beta
    lanes = tl.arange(0, BLOCK_K)
    ids = tl.load(IDS + row * K + lanes, mask=lanes < tl.where(valid, K, 0), other=-1)
    col = _shard_col(ids, start, V)
    own = col >= 0
    col = tl.where(own, col, 0)
    z = tl.load(s_row + col * s_stv, mask=own, other=float("-inf")).to(tl.float32)
    lt = tl.load(TLP + row * K + lanes, mask=own, other=float("-inf")).to(tl.float32)
    gv = _slot_grad(z, lt, r, lz, a, b, lzq, g_mean, scale2, log1m_pi, one_m_pi,
                    DIVERGENCE) * scale
    gv = tl.where(coef != coef, float("nan"), gv)
    tl.store(DS + row * V + col, gv.to(DS.dtype.element_ty), mask=own)
    if HAS_TTL:  # y with its own category (where it is not among the ids)
        in_e = tl.max(((ids == y) & (ids >= 0)).to(tl.int32), 0) > 0
        y_col = _shard_col(tl.where(valid & (in_e == 0), y, -1), start, V)
        own_y = y_col >= 0
        z_y = tl.load(s_row + tl.where(own_y, y_col, 0) * s_stv, mask=own_y,
                      other=float("-inf")).to(tl.float32)
        gy = _slot_grad(z_y, tl.load(TTL + row).to(tl.float32), r, lz, a, b, lzq, g_mean,
                        scale2, log1m_pi, one_m_pi, DIVERGENCE) * scale
        gy = tl.where(coef != coef, float("nan"), gy)
        tl.store(DS + row * V + tl.where(own_y, y_col, 0), gy.to(DS.dtype.element_ty),
                 mask=own_y)


# ---------------------------------------------------------------------------
# launchers

FWD_BLOCK_V = 4096
FWD_WARPS = 8
BWD_BLOCK_V = 4096
BWD_WARPS = 8
ROW_WARPS = 2
DUP_K = 16


def _block_k(k: int) -> int:
    return max(2, triton.next_power_of_2(k))


def _check_student(student: torch.Tensor) -> None:
    if student.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"student_logits: the Triton backend takes float32, bfloat16 or float16, "
                        f"got {student.dtype}; use backend='torch' for float64")


def stream(student, ids, tokens, opts, *, start=0, has_ttl=False):
    """Kernel 1: ((N, STREAM_K) float32 per-row sums, (N, K) the student's raw logits at the
    ids this shard holds, 0 elsewhere)."""
    _check_student(student)
    vocab = student.shape[-1]
    ls = row_layout(student)
    n, k = ids.shape
    st = torch.empty(n, STREAM_K.value, dtype=torch.float32, device=student.device)
    zk = torch.empty(n, k, dtype=torch.float32, device=student.device)
    # the categories' ids in ascending order (with y where it may have its own), for the rare
    # row whose tail is summed by membership
    cats = torch.cat([ids, tokens.unsqueeze(-1)], -1) if has_ttl else ids
    cats = cats.sort(-1).values
    if n:
        _, plan = stream_plan(_topk_stream_kernel, ls, None, vocab,
                              fwd_block(vocab, None, FWD_BLOCK_V), backward=False)
        _topk_stream_kernel[(n,)](
            ls.tensor, ids, cats, tokens, zk, st, vocab, int(start), k, cats.shape[-1],
            ls.d1, ls.st0, ls.st1, ls.stv, LOG2E / opts.temperature, int(opts.ignore_index),
            HAS_TTL=bool(has_ttl), BLOCK_K=_block_k(k), num_warps=FWD_WARPS, **plan)
    return st, zk


def rows_from_stream(ids, tlp, ttl, tokens, sign, zk, st, opts, vocab):
    """Kernel 2: the row table (N, TOPK_K) from the stream's sums (``vocab``: the global
    vocabulary the ids index)."""
    n, k = ids.shape
    out = torch.empty(n, TOPK_K.value, dtype=torch.float32, device=ids.device)
    if n:
        _topk_rows_kernel[(n,)](
            ids, tlp, ttl if ttl is not None else tlp, tokens, sign if sign is not None else tlp,
            zk, st, out, int(vocab), k, LOG2E / opts.temperature, float(opts.beta),
            float(opts.lam_pos), float(opts.lam_neg), float(opts.jsd_beta),
            float(opts.tail_floor), int(opts.ignore_index),
            HAS_GATE=sign is not None, HAS_TTL=ttl is not None,
            DIVERGENCE=int(opts.divergence), BLOCK_K=_block_k(k),
            DUP_K=min(DUP_K, _block_k(k)), num_warps=ROW_WARPS)
    return out


def topk_rows(student, ids, tlp, ttl, tokens, sign, opts):
    """Forward: the row table (N, TOPK_K) for logits (..., V) of any strides."""
    st, zk = stream(student, ids, tokens, opts, has_ttl=ttl is not None)
    return rows_from_stream(ids, tlp, ttl, tokens, sign, zk, st, opts, student.shape[-1])


def topk_rows_backward(grad_rows, student, ids, tlp, ttl, tokens, rows, opts, *, start=0):
    """Backward: d loss / d student logits (contiguous, the student's dtype and shape); with
    ``start``, of a vocabulary shard whose first global column is ``start``."""
    vocab = student.shape[-1]
    ls = row_layout(student)
    n, k = ids.shape
    grad = torch.empty(student.shape, dtype=student.dtype, device=student.device)
    if n == 0 or vocab == 0:
        return grad
    grow = grad_rows.float().contiguous()
    programs, plan = stream_plan(_topk_bwd_kernel, ls, None, vocab,
                                 min(BWD_BLOCK_V, triton.next_power_of_2(vocab)), backward=True)
    _topk_bwd_kernel[(n, programs)](
        ls.tensor, tokens, rows, grow, grad, vocab, ls.d1, ls.st0, ls.st1, ls.stv,
        LOG2E / opts.temperature, 1.0 / opts.temperature, int(opts.ignore_index),
        num_warps=BWD_WARPS, **plan)
    _topk_bwd_slots_kernel[(n,)](
        ls.tensor, ids, tlp, ttl if ttl is not None else tlp, tokens, rows, grow, grad,
        vocab, int(start), k, ls.d1, ls.st0, ls.st1, ls.stv,
        LOG2E / opts.temperature, 1.0 / opts.temperature, float(opts.jsd_beta),
        int(opts.ignore_index), HAS_TTL=ttl is not None, DIVERGENCE=int(opts.divergence),
        BLOCK_K=_block_k(k), num_warps=ROW_WARPS)
    return grad


# ---------------------------------------------------------------------------
# vocabulary parallel: the stream's sums of every shard combined, then kernel 2 on every rank

def topk_rows_parallel(student, ids, tlp, ttl, tokens, sign, opts, group):
    """The single-device row table of a row whose student logits are sharded over ``group``.

    Nothing is read on the host: an id or token that no rank holds makes its row NaN (kernel
    2 checks them against the global vocabulary), and shards of unequal widths make every
    row NaN (the widths travel with the first all-reduce).
    """
    vl = student.shape[-1]
    world = dist.get_world_size(group=group)
    scale2 = LOG2E / opts.temperature
    st, zk = stream(student, ids, tokens, opts, start=shard_start(vl, group),
                    has_ttl=ttl is not None)
    ref, s_l = st[:, ST_REF.value], st[:, ST_S.value]
    # round 1: the common reference (a shard without support takes no part); the widths ride
    # along as (V_local, -V_local): equal iff the two maxima are opposite
    empty = s_l == 0
    m = all_reduce(torch.cat([torch.where(empty, -math.inf, ref), st.new_tensor([vl, -vl])]),
                   dist.ReduceOp.MAX, group)
    unequal = m[-2] != -m[-1]
    r = m[:-2]
    r = torch.where(torch.isinf(r), torch.zeros_like(r), r)
    # round 2: each shard's sums against it (float64: a tail's 2^lt2 may lie below float32's
    # range), and the student's logits at the slots and y from their holders (0 elsewhere)
    shift = (ref - r).double() * scale2
    f = torch.where(empty, torch.zeros_like(shift), torch.exp2(shift))
    st64 = st.double()
    parts = torch.stack([
        st64[:, ST_S.value] * f,
        torch.where(empty, torch.zeros_like(f), torch.exp2(st64[:, ST_LT2.value] + shift)),
        st64[:, ST_HELD.value] * f,
        f * (st64[:, ST_ENT.value] + shift * st64[:, ST_S.value]),
        st64[:, ST_ZY.value]], -1)
    sums = all_reduce(torch.cat([parts, zk.double()], -1), dist.ReduceOp.SUM, group)
    sums[:, ST_LT2.value - 1] = torch.log2(sums[:, ST_LT2.value - 1])
    sums = sums.float()
    combined = torch.cat([r.unsqueeze(-1), sums[:, :STREAM_K.value - 1]], -1)  # ST's layout
    rows = rows_from_stream(ids, tlp, ttl, tokens, sign, sums[:, STREAM_K.value - 1:].contiguous(),
                            combined, opts, vl * world)
    poison = unequal & (tokens != opts.ignore_index)
    for c in (LOSS.value, K_TAIL_COEF.value):
        rows[:, c] = torch.where(poison, torch.full_like(rows[:, c], math.nan), rows[:, c])
    return rows


def topk_rows_parallel_backward(grad_rows, student, ids, tlp, ttl, tokens, rows, opts, group):
    """The single-device backward kernels on this rank's shard: no communication."""
    return topk_rows_backward(grad_rows, student, ids, tlp, ttl, tokens, rows, opts,
                              start=shard_start(student.shape[-1], group))
