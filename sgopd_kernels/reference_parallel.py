"""The vocabulary-parallel losses in readable eager PyTorch (the torch backend's path).

Row-chunked, float64 for float64 inputs, on any device and process-group
backend. Before anything else it checks, the same way on every rank (so that
all raise or none): equal shard widths, and token ids inside the global
vocabulary; this reads values on the host. Every sum below is over this
rank's shard, combined by an all-reduce (docs/math.md, "Vocabulary parallel").
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from . import _rows as C
from ._options import Divergence
from .parallel import all_reduce, check_shards, finite, log_total, shard_start
from .reference import (TOPK_DTYPE, _as_rows, _chunks, _compute_dtype, _xmul, bridge_logits,
                        check_tokens, check_topk_ids, divergence_rows, gate_lambda, log_mixture,
                        opd_grad_logprobs, sampled_delta, topk_bridge, topk_grad_coefficients,
                        topk_log_abs_tail, topk_membership, topk_scatter_grad,
                        topk_single_token_terms, topk_teacher_categories)

NEG_INF = float("-inf")

# this path's private columns of the logits family's table (natural units). Logits are
# taken against their row's raw maximum before the temperature divides them, s = (z_S -
# M_S) / tau, as the single-device reference does: z / tau - (m + log Z) would round log Z
# away in a row held near a huge constant, and z / tau could overflow.
LSE_S = C.PRIVATE["logits"]  # log Z_S = log sum e^s, s = (z_S - M_S) / tau
LSE_T = LSE_S + 1            # log Z_T = log sum e^t, t = (z_T - M_T) / tau_T
LOG_Z_Q = LSE_S + 2          # log Z_q = L_q
E_P = LSE_S + 3              # E_{p_S}[u] (reverse KL) or E_{p_S}[h] (JSD)
M_S = LSE_S + 4              # the row maximum of the raw z_S (0 where it is not finite)
M_T = LSE_S + 5              # ... of z_T
# and of the sampled family's
S_LSE = C.PRIVATE["sampled"]  # log Z_S = log sum e^((z_S - S_M) / tau)
S_M = S_LSE + 1               # the row maximum of the raw z_S (0 where it is not finite)
assert M_T < C.WIDTH["logits"] and S_M < C.WIDTH["sampled"]
# and of the top-k family's
K_LSE_S = C.PRIVATE["topk"]  # log Z_S of s = z_S / tau
K_LOG_ZQ = K_LSE_S + 1       # log Z_q over the categories
K_G_MEAN = K_LSE_S + 2       # sum_c P_S(c) G_c
K_TAIL = K_LSE_S + 3         # log |alpha| of the tail (alpha = G_tail - sum_c P_S(c) G_c,
K_TAIL_SIGN = K_LSE_S + 4    # which may lie beyond float64's range), and its sign


def _check(student, tokens, opts, group) -> None:
    vocab = check_shards(student.shape[-1], group, student.device)
    check_tokens(tokens, vocab, opts.ignore_index,
                 what=" (the global vocabulary of the process group)")


def _owned(tokens, start: int, local_vocab: int, ignore_index: int):
    """Whether this rank holds each row's token, and its local column (0 where not)."""
    local = tokens - start
    own = (tokens != ignore_index) & (local >= 0) & (local < local_vocab)
    return own, torch.where(own, local, torch.zeros_like(local)).unsqueeze(-1)


def _gather_owned(x, own, col):
    return torch.where(own, x.gather(-1, col).squeeze(-1), torch.zeros_like(x[:, 0]))


def opd_rows_parallel(student, teacher, tokens, sign, opts, group):
    """The table (N, WIDTH["logits"]) of this rank's shard; private columns named above."""
    _check(student, tokens, opts, group)
    s = _as_rows(student)
    n, vl = s.shape
    t = _as_rows(teacher)[:, :vl]
    cdt = _compute_dtype(s, t)
    valid = tokens != opts.ignore_index
    own, col = _owned(tokens, shard_start(vl, group), vl, opts.ignore_index)

    # round 1: the raw row maxima of both models
    m = torch.empty(n, 2, dtype=cdt, device=s.device)
    for sl in _chunks(n, vl):
        m[sl] = torch.stack([s[sl].to(cdt).amax(-1), t[sl].to(cdt).amax(-1)], -1)
    m = all_reduce(m, dist.ReduceOp.MAX, group)
    m_s, m_t = finite(m[:, 0]), finite(m[:, 1])

    def chunks(fn, width):
        """fn(rows, s, t) over the chunks of rows, s and t scaled against the maxima."""
        out = torch.empty(n, width, dtype=cdt, device=s.device)
        for sl in _chunks(n, vl):
            out[sl] = fn(sl, (s[sl].to(cdt) - m_s[sl, None]) / opts.temperature,
                         (t[sl].to(cdt) - m_t[sl, None]) / opts.teacher_temperature)
        return out

    # round 2: the normalizers and the sampled token's scaled logits (from its owner)
    r2 = all_reduce(chunks(lambda sl, zs, zt: torch.stack([
        zs.exp().sum(-1), zt.exp().sum(-1),
        _gather_owned(zs, own[sl], col[sl]), _gather_owned(zt, own[sl], col[sl])], -1), 4),
        dist.ReduceOp.SUM, group)
    lse_s = log_total(torch.zeros_like(m_s), r2[:, 0])  # (+inf for an empty row: lp = -inf)
    lse_t = log_total(torch.zeros_like(m_t), r2[:, 1])
    delta = sampled_delta(r2[:, 3] - lse_t, r2[:, 2] - lse_s)
    lam, g = gate_lambda(delta, None if sign is None else sign.to(cdt), opts.lam_pos,
                         opts.lam_neg)
    a, b = lam, 1.0 - lam + opts.beta

    def bridge(sl, zs, zt):
        lp_s = zs - lse_s[sl, None]
        lp_t = zt - lse_t[sl, None]
        return lp_s, lp_t, bridge_logits(lp_s, lp_t, a[sl, None], b[sl, None])

    # round 3: the bridge's row maximum
    m_x = all_reduce(chunks(lambda sl, zs, zt: bridge(sl, zs, zt)[2].amax(-1, keepdim=True), 1),
                     dist.ReduceOp.MAX, group)[:, 0]
    m_xf = finite(m_x)

    # round 4: the bridge's normalizer and the expectations the loss needs
    def sums(sl, zs, zt):
        lp_s, lp_t, x = bridge(sl, zs, zt)
        p = lp_s.exp()
        e = (x - m_xf[sl, None]).exp()
        return torch.stack([e.sum(-1), _xmul(p, lp_s).sum(-1), _xmul(p, lp_t).sum(-1),
                            _xmul(e, x - m_xf[sl, None]).sum(-1), _xmul(e, lp_s).sum(-1)], -1)
    r4 = all_reduce(chunks(sums, 5), dist.ReduceOp.SUM, group)
    z_x, e_s, e_t = r4[:, 0], r4[:, 1], r4[:, 2]
    log_z_q = m_xf + z_x.log()
    e_p = (1.0 - b) * e_s - a * e_t  # E_p[u], u = (1 - b) lp_S - a lp_T
    if opts.divergence == Divergence.REVERSE_KL:  # E_p[lp_S] - E_p[x] + log Z_q
        loss = e_p + log_z_q
    elif opts.divergence == Divergence.FORWARD_KL:  # E_q[x - m] - log sum e^(x - m) - E_q[lp_S]
        loss = r4[:, 3] / z_x - z_x.log() - r4[:, 4] / z_x
    else:  # round 5 (JSD): pi sum q (log q - log m) and sum p h, h = (1 - pi) (lp_S - log m)
        pi = opts.jsd_beta

        def mixture(sl, zs, zt):
            lp_s, _, x = bridge(sl, zs, zt)
            log_q = x - log_z_q[sl, None]
            log_m = log_mixture(lp_s, log_q, pi)
            return torch.stack([_xmul(log_q.exp(), log_q - log_m).sum(-1),
                                (1 - pi) * _xmul(lp_s.exp(), lp_s - log_m).sum(-1)], -1)
        r5 = all_reduce(chunks(mixture, 2), dist.ReduceOp.SUM, group)
        loss = pi * r5[:, 0] + r5[:, 1]
        e_p = r5[:, 1]
    loss = torch.where(z_x == 0, torch.full_like(loss, math.inf), loss)

    zero = torch.zeros_like(loss)
    out = torch.zeros(n, C.WIDTH["logits"], dtype=cdt, device=s.device)
    for c, v in ((C.LOSS, loss), (C.DELTA, delta), (C.GATE, g), (C.TEACHER_KL, e_s - e_t),
                 (C.ENTROPY, -e_s)):
        out[:, c] = torch.where(valid, v, zero)
    out[:, C.A], out[:, C.B] = a, b
    out[:, LSE_S], out[:, LSE_T], out[:, LOG_Z_Q], out[:, E_P] = lse_s, lse_t, log_z_q, e_p
    out[:, M_S], out[:, M_T] = m_s, m_t
    return out


def opd_rows_parallel_backward(grad_rows, student, teacher, tokens, rows, opts, group):
    """d loss / d (this rank's student shard), from the combined row state."""
    shape = student.shape
    s = _as_rows(student)
    n, vl = s.shape
    t = _as_rows(teacher)[:, :vl]
    cdt = _compute_dtype(s, t)
    grad = torch.empty(s.shape, dtype=s.dtype, device=s.device)
    valid = (tokens != opts.ignore_index).unsqueeze(-1)
    for sl in _chunks(n, vl):
        r = rows[sl].to(cdt)
        gv = opd_grad_logprobs((s[sl].to(cdt) - r[:, M_S, None]) / opts.temperature
                               - r[:, LSE_S, None],
                               (t[sl].to(cdt) - r[:, M_T, None]) / opts.teacher_temperature
                               - r[:, LSE_T, None],
                               r[:, C.A, None], r[:, C.B, None], opts, e_p=r[:, E_P, None],
                               log_z_q=r[:, LOG_Z_Q, None])
        gv = gv * grad_rows[sl].to(cdt).unsqueeze(-1)
        grad[sl] = torch.where(valid[sl], gv, torch.zeros_like(gv)).to(s.dtype)
    return grad.view(shape)


def sampled_rows_parallel(student, teacher_logprobs, tokens, sign, opts, group):
    """The table (N, WIDTH["sampled"]); columns S_LSE and S_M hold log Z_S and the row
    maximum for the backward."""
    _check(student, tokens, opts, group)
    s = _as_rows(student)
    n, vl = s.shape
    cdt = _compute_dtype(s, teacher_logprobs)
    valid = tokens != opts.ignore_index
    own, col = _owned(tokens, shard_start(vl, group), vl, opts.ignore_index)
    m = torch.empty(n, 1, dtype=cdt, device=s.device)
    for sl in _chunks(n, vl):
        m[sl, 0] = s[sl].to(cdt).amax(-1)
    m_s = finite(all_reduce(m, dist.ReduceOp.MAX, group)[:, 0])
    r = torch.empty(n, 3, dtype=cdt, device=s.device)
    for sl in _chunks(n, vl):
        zc = (s[sl].to(cdt) - m_s[sl, None]) / opts.temperature
        e = zc.exp()
        r[sl] = torch.stack([e.sum(-1), _xmul(e, zc).sum(-1),
                             _gather_owned(zc, own[sl], col[sl])], -1)
    r = all_reduce(r, dist.ReduceOp.SUM, group)
    log_z = log_total(torch.zeros_like(m_s), r[:, 0])
    lp_s_y = r[:, 2] - log_z
    delta = sampled_delta(teacher_logprobs.to(cdt), lp_s_y)
    lam, g = gate_lambda(delta, None if sign is None else sign.to(cdt), opts.lam_pos,
                         opts.lam_neg)
    adv = lam * delta
    # -E_p[lp_S], lp_S = zc - log Z; 0 for a row without support
    entropy = torch.where(r[:, 0] == 0, torch.zeros_like(log_z), log_z - r[:, 1] / r[:, 0])
    zero = torch.zeros_like(delta)
    out = torch.zeros(n, C.WIDTH["sampled"], dtype=cdt, device=s.device)
    for c, v in ((C.LOSS, -_xmul(adv, lp_s_y)), (C.DELTA, delta), (C.GATE, g),
                 (C.TEACHER_KL, -delta), (C.ENTROPY, entropy), (C.ADV, adv)):
        out[:, c] = torch.where(valid, v, zero)
    out[:, S_LSE], out[:, S_M] = log_z, m_s
    return out


def sampled_rows_parallel_backward(grad_rows, student, teacher_logprobs, tokens, rows, opts,
                                   group):
    """-(A / tau) (onehot(y) - p_S) on this rank's shard."""
    shape = student.shape
    s = _as_rows(student)
    n, vl = s.shape
    cdt = _compute_dtype(s)
    own, col = _owned(tokens, shard_start(vl, group), vl, opts.ignore_index)
    grad = torch.empty(s.shape, dtype=s.dtype, device=s.device)
    valid = (tokens != opts.ignore_index).unsqueeze(-1)
    tau = opts.temperature
    for sl in _chunks(n, vl):
        p = ((s[sl].to(cdt) - rows[sl, S_M, None].to(cdt)) / tau
             - rows[sl, S_LSE, None].to(cdt)).exp()
        onehot = torch.zeros_like(p).scatter_(-1, col[sl], 1.0) * own[sl, None].to(cdt)
        adv = rows[sl, C.ADV, None].to(cdt)
        gv = -(adv / tau) * (onehot - p) * grad_rows[sl].to(cdt).unsqueeze(-1)
        grad[sl] = torch.where(valid[sl], gv, torch.zeros_like(gv)).to(s.dtype)
    return grad.view(shape)


# ---------------------------------------------------------------------------
# a teacher given by its top-k: each rank holds a shard of the student's logits, the ids are
# global; the category math is O(rows k) and the same on every rank

def _held(cols, start: int, local_vocab: int):
    """Whether this rank holds each global column (negative: none), and its local column
    (local_vocab, a spare, where not)."""
    local = cols - start
    held = (cols >= 0) & (local >= 0) & (local < local_vocab)
    return held, torch.where(held, local, torch.full_like(local, local_vocab))


def topk_rows_parallel(student, ids, tlp, ttl, tokens, sign, opts, group):
    """The table (N, WIDTH["topk"]) of this rank's shard; private columns named above."""
    vocab = check_shards(student.shape[-1], group, student.device)
    check_tokens(tokens, vocab, opts.ignore_index,
                 what=" (the global vocabulary of the process group)")
    check_topk_ids(ids, tokens, vocab, opts.ignore_index,
                   what=" (the global vocabulary of the process group)")
    s = _as_rows(student)
    n, vl = s.shape
    k = ids.shape[-1]
    # float64 as the single-device reference, the table too: its tail coefficient (of the
    # order of 1 / P_S(tail) for forward KL) would overflow float32
    cdt = TOPK_DTYPE
    valid = tokens != opts.ignore_index
    start = shard_start(vl, group)
    present, own, cat_y = topk_membership(ids, tokens, ttl is not None, opts.ignore_index)
    held_k, col_k = _held(torch.where(present, ids, -1), start, vl)
    held_y, col_y = _held(torch.where(own, tokens, -1), start, vl)
    cols = torch.cat([col_k, col_y.unsqueeze(-1)], -1)

    def chunks(fn, width):
        out = torch.empty(n, width, dtype=cdt, device=s.device)
        for sl in _chunks(n, vl):
            out[sl] = fn(sl, s[sl].to(cdt) / opts.temperature)
        return out

    def outside(sl, zs):
        """This shard's logits outside the categories (-inf at the categories)."""
        keep = torch.ones(zs.shape[0], vl + 1, dtype=torch.bool, device=s.device)
        keep.scatter_(-1, cols[sl], False)
        return torch.where(keep[:, :vl], zs, NEG_INF)

    # round 1: the student's row maximum, and its maximum outside the categories (the tail
    # is summed against its own maximum: a tail far below the row's mass does not underflow)
    m2 = all_reduce(chunks(lambda sl, zs: torch.stack(
        [zs.amax(-1), outside(sl, zs).amax(-1)], -1), 2), dist.ReduceOp.MAX, group)
    m, m_tail = finite(m2[:, 0]), finite(m2[:, 1])

    # round 2: its normalizer, entropy sum and tail (the sum over the tokens outside the
    # categories), and its logits at the categories from their holders (0 from the others)
    def sums(sl, zs):
        zc = zs - m[sl, None]
        e = zc.exp()
        tail = (outside(sl, zs) - m_tail[sl, None]).exp().sum(-1)
        at = torch.cat([zs, torch.zeros_like(zs[:, :1])], -1).gather(-1, cols[sl])
        return torch.cat([torch.stack([e.sum(-1), _xmul(e, zc).sum(-1), tail], -1), at], -1)
    r2 = all_reduce(chunks(sums, 3 + k + 1), dist.ReduceOp.SUM, group)
    t = topk_terms_from_sums(m, m_tail, r2[:, :3], r2[:, 3:], present, own, cat_y, tlp, ttl,
                             sign, valid, opts)
    out = torch.zeros(n, C.WIDTH["topk"], dtype=cdt, device=s.device)
    for name, c in {**C.SHARED, **C.FAMILY["topk"]}.items():
        out[:, c] = t[name]
    out[:, K_LSE_S], out[:, K_LOG_ZQ] = t["lse"], t["log_z_q"]
    out[:, K_G_MEAN] = t["g_mean"]
    out[:, K_TAIL], out[:, K_TAIL_SIGN] = t["log_tail"], t["sign_tail"]
    return out


def topk_terms_from_sums(m, m_tail, sums, z_at, present, own, cat_y, tlp, ttl, sign, valid,
                         opts):
    """A top-k row's terms (float64) from the sums of a pass over the student's row.

    ``m``, ``m_tail`` (N,): the row's maximum of z / tau and its maximum outside the
    categories (0 where not finite); ``sums`` (N, 3): the sum of e^(z/tau - m), of
    e^(z/tau - m) (z/tau - m) and, outside the categories, of e^(z/tau - m_tail); ``z_at``
    (N, K + 1): z / tau at the slots and at y's own category (any value where absent).
    Returns the shared columns (named as in _rows.SHARED and FAMILY["topk"], 0 in masked
    rows) and lse, log_z_q, g_mean, log_tail and sign_tail (the tail's coefficient:
    :func:`topk_log_abs_tail`), tail (log P_S of the tail): the backward's row state."""
    cdt = TOPK_DTYPE
    m, m_tail, sums, z_at = (x.to(cdt) for x in (m, m_tail, sums, z_at))
    lse = log_total(m, sums[:, 0])
    neg = torch.full_like(z_at, NEG_INF)
    cat_s = torch.cat([torch.where(torch.cat([present, own.unsqueeze(-1)], -1),
                                   z_at - lse[:, None], neg),
                       (m_tail + sums[:, 2].log() - lse).unsqueeze(-1)], -1)  # (-inf: no tail)
    cat_t = topk_teacher_categories(tlp.to(cdt), None if ttl is None else ttl.to(cdt), present,
                                    own, opts.tail_floor)
    delta, g, a, b, x, log_z_q = topk_bridge(cat_s, cat_t, cat_y,
                                             None if sign is None else sign.to(cdt), opts)
    loss = divergence_rows(cat_s, x - log_z_q, opts)
    loss = torch.where(log_z_q[:, 0] == NEG_INF, torch.full_like(loss, math.inf), loss)
    alpha, _, g_mean = topk_grad_coefficients(cat_s, x, log_z_q, opts)
    teacher_kl = _xmul(cat_s.exp(), cat_s - cat_t).sum(-1)
    entropy = torch.where(sums[:, 0] == 0, torch.zeros_like(lse),
                          sums[:, 0].log() - sums[:, 1] / sums[:, 0])
    zero = torch.zeros_like(loss)
    out = {name: torch.where(valid, v, zero) for name, v in (
        ("loss", loss), ("delta", delta), ("gate", g), ("teacher_kl", teacher_kl),
        ("entropy", entropy))}
    log_tail, sign_tail = topk_log_abs_tail(cat_s, x, alpha[:, -1], opts)
    out.update(a=a[:, 0], b=b[:, 0], lse=lse, log_z_q=log_z_q[:, 0], g_mean=g_mean[:, 0],
               log_tail=log_tail, sign_tail=sign_tail, tail=cat_s[:, -1])
    return out


def topk_rows_parallel_backward(grad_rows, student, ids, tlp, ttl, tokens, rows, opts, group):
    """d loss / d (this rank's student shard), from the combined row state: the tail's
    coefficient everywhere, and at the categories this rank holds their own values."""
    shape = student.shape
    s = _as_rows(student)
    n, vl = s.shape
    cdt = TOPK_DTYPE
    present, own, _ = topk_membership(ids, tokens, ttl is not None, opts.ignore_index)
    start = shard_start(vl, group)
    _, col_k = _held(torch.where(present, ids, -1), start, vl)
    _, col_y = _held(torch.where(own, tokens, -1), start, vl)
    cols = torch.cat([col_k, col_y.unsqueeze(-1)], -1)
    lt = torch.cat([tlp, torch.zeros_like(tlp[:, :1]) if ttl is None else ttl.unsqueeze(-1)],
                   -1).to(cdt)
    grad = torch.empty(s.shape, dtype=s.dtype, device=s.device)
    valid = (tokens != opts.ignore_index).unsqueeze(-1)
    for sl in _chunks(n, vl):
        r = rows[sl].to(cdt)
        lp = s[sl].to(cdt) / opts.temperature - r[:, K_LSE_S, None]
        ls = torch.cat([lp, torch.full_like(lp[:, :1], NEG_INF)], -1).gather(-1, cols[sl])
        x = bridge_logits(ls, lt[sl], r[:, C.A, None], r[:, C.B, None])
        g, beta = topk_single_token_terms(ls, x - r[:, K_LOG_ZQ, None], opts)
        values = _xmul(ls.exp(), g - r[:, K_G_MEAN, None]) + beta
        gv = topk_scatter_grad(lp, r[:, K_TAIL, None], r[:, K_TAIL_SIGN, None], cols[sl],
                               values, opts)
        gv = gv * grad_rows[sl].to(cdt).unsqueeze(-1)
        grad[sl] = torch.where(valid[sl], gv, torch.zeros_like(gv)).to(s.dtype)
    return grad.view(shape)
