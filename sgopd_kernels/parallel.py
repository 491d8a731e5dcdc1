"""Vocabulary-parallel losses (SPEC §7): each rank holds a shard of the vocabulary.

Megatron's layout: with ``W`` ranks in ``process_group`` and ``V_local``
columns per rank, rank ``r`` holds the global columns ``[r V_local, (r + 1)
V_local)`` of both models' logits (shards of equal width, as Megatron's
vocabulary-parallel layers make them; checked, on every rank alike). The
teacher's shard must hold the same global columns as the student's: its
first ``V_local`` columns are used and any further ones ignored. A teacher
whose padded vocabulary is sharded at its own boundaries (``r V_T / W``)
must be re-sharded at the student's first. ``tokens`` are global ids.

Every rank computes per-row partial statistics of its shard and combines them
with all-reduces of O(rows) size (two rounds of max and two of sums for the
full-logits loss, one of each for the sampled estimator); nothing of size
rows x vocabulary is communicated. Every rank then holds the same loss and
statistics, and its backward writes the gradient of its own shard from the
combined row state, without communication.

Two paths: the readable torch path here (row-chunked eager PyTorch, float64
for float64 inputs; any device and process-group backend; it raises on
misuse, reading the shard widths and token ids on the host), and the Triton
kernels of ``sgopd_kernels/triton/parallel.py`` combined by
:func:`opd_rows_parallel_triton` (the full-logits loss only; nothing read on
the host).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from . import _rows as C
from .reference import (_chunks, _compute_dtype, _xmul, bridge_logits, check_tokens, gate_lambda,
                        opd_grad_logprobs, sampled_delta)

NEG_INF = float("-inf")


def check_shards(local_vocab: int, group, device) -> int:
    """The global vocabulary; raises on every rank alike if the shard widths differ."""
    w = torch.tensor([local_vocab, -local_vocab], dtype=torch.int64, device=device)
    dist.all_reduce(w, op=dist.ReduceOp.MAX, group=group)
    widest, narrowest = int(w[0]), -int(w[1])
    if widest != narrowest:
        raise ValueError(f"student_logits: the vocabulary shards of the process group have "
                         f"different widths ({narrowest} to {widest}); shards of equal width "
                         "are expected (rank r holds columns [r V, (r + 1) V))")
    return local_vocab * dist.get_world_size(group=group)


def shard_start(local_vocab: int, process_group) -> int:
    """The first global column of this rank's shard (shards of equal width)."""
    return dist.get_rank(group=process_group) * local_vocab


def _all_reduce(x: Tensor, op, group) -> Tensor:
    dist.all_reduce(x, op=op, group=group)
    return x


def _finite(m: Tensor) -> Tensor:
    return torch.where(torch.isinf(m), torch.zeros_like(m), m)


def _lse(m: Tensor, total: Tensor) -> Tensor:
    """m + log(total); +inf for an empty row (total 0), so that z - lse is -inf there, not NaN."""
    return torch.where(total == 0, torch.full_like(m, math.inf), m + total.log())


def _owned(tokens: Tensor, start: int, local_vocab: int, ignore_index: int):
    """Whether this rank holds each row's token, and its local column (0 where not)."""
    local = tokens - start
    own = (tokens != ignore_index) & (local >= 0) & (local < local_vocab)
    return own, torch.where(own, local, torch.zeros_like(local)).unsqueeze(-1)


def _gather_owned(x: Tensor, own: Tensor, col: Tensor) -> Tensor:
    return torch.where(own, x.gather(-1, col).squeeze(-1), torch.zeros_like(x[:, 0]))


# ---------------------------------------------------------------------------
# the full-logits loss

def opd_rows_parallel(s, t, tokens, sign, *, beta, lam_pos, lam_neg, reverse, temperature,
                      ignore_index, group):
    """Per-row table (N, C.ROW_K) of this rank's shard ``s`` (N, V_local), ``t`` (N, >= V_local).

    Columns 0-4 as everywhere; A and B; and for the backward (natural units, scaled logits):
    5 = log Z_S, 6 = log Z_T, 7 = log Z_q, 8 = E_{p_S}[u] (reverse KL).
    """
    n, vl = s.shape
    cdt = _compute_dtype(s, t)
    start = shard_start(vl, group)
    valid = tokens != ignore_index
    own, col = _owned(tokens, start, vl, ignore_index)

    def chunks(fn, width):
        out = torch.empty(n, width, dtype=cdt, device=s.device)
        for sl in _chunks(n, vl):
            out[sl] = fn(sl, s[sl].to(cdt) / temperature, t[sl, :vl].to(cdt) / temperature)
        return out

    # round 1: the row maxima of both models
    m = _all_reduce(chunks(lambda sl, zs, zt: torch.stack(
        [zs.amax(-1), zt.amax(-1)], -1), 2), dist.ReduceOp.MAX, group)
    m_s, m_t = _finite(m[:, 0]), _finite(m[:, 1])

    # round 2: the normalizers and the sampled token's scaled logits (from its owner)
    r2 = _all_reduce(chunks(lambda sl, zs, zt: torch.stack([
        (zs - m_s[sl, None]).exp().sum(-1), (zt - m_t[sl, None]).exp().sum(-1),
        _gather_owned(zs, own[sl], col[sl]), _gather_owned(zt, own[sl], col[sl])], -1), 4),
        dist.ReduceOp.SUM, group)
    lse_s = _lse(m_s, r2[:, 0])
    lse_t = _lse(m_t, r2[:, 1])
    delta = sampled_delta(r2[:, 3] - lse_t, r2[:, 2] - lse_s)
    lam, g = gate_lambda(delta, None if sign is None else sign.to(cdt), lam_pos, lam_neg)
    a, b = lam, 1.0 - lam + beta

    def bridge(sl, zs, zt):
        lp_s = zs - lse_s[sl, None]
        lp_t = zt - lse_t[sl, None]
        return lp_s, lp_t, bridge_logits(lp_s, lp_t, a[sl, None], b[sl, None])

    # round 3: the bridge's row maximum
    m_x = _all_reduce(chunks(lambda sl, zs, zt: bridge(sl, zs, zt)[2].amax(-1, keepdim=True), 1),
                      dist.ReduceOp.MAX, group)[:, 0]
    m_xf = _finite(m_x)

    # round 4: the bridge's normalizer and the expectations the loss needs
    def sums(sl, zs, zt):
        lp_s, lp_t, x = bridge(sl, zs, zt)
        p = lp_s.exp()
        e = (x - m_xf[sl, None]).exp()
        return torch.stack([e.sum(-1), _xmul(p, lp_s).sum(-1), _xmul(p, lp_t).sum(-1),
                            _xmul(e, x - m_xf[sl, None]).sum(-1), _xmul(e, lp_s).sum(-1)], -1)
    r4 = _all_reduce(chunks(sums, 5), dist.ReduceOp.SUM, group)
    z_x, e_s, e_t = r4[:, 0], r4[:, 1], r4[:, 2]
    log_z_q = m_xf + z_x.log()
    if reverse:  # KL(p_S || q) = E_p[lp_S] - E_p[x] + log Z_q
        loss = (1.0 - b) * e_s - a * e_t + log_z_q
    else:  # KL(q || p_S) = E_q[x - m] - log sum e^(x - m) - E_q[lp_S]
        loss = r4[:, 3] / z_x - z_x.log() - r4[:, 4] / z_x
    loss = torch.where(z_x == 0, torch.full_like(loss, math.inf), loss)

    zero = torch.zeros_like(loss)
    out = torch.zeros(n, C.ROW_K, dtype=cdt, device=s.device)
    for c, v in ((C.LOSS, loss), (C.DELTA, delta), (C.GATE, g), (C.TEACHER_KL, e_s - e_t),
                 (C.ENTROPY, -e_s)):
        out[:, c] = torch.where(valid, v, zero)
    out[:, C.A], out[:, C.B] = a, b
    out[:, 5], out[:, 6], out[:, 7] = lse_s, lse_t, log_z_q
    out[:, 8] = (1.0 - b) * e_s - a * e_t  # E_p[u], u = (1 - b) lp_S - a lp_T
    return out


def opd_rows_parallel_backward(grad_rows, s, t, tokens, rows, *, reverse, temperature,
                               ignore_index):
    """d loss / d (this rank's student shard), from the combined row state."""
    n, vl = s.shape
    cdt = _compute_dtype(s, t)
    grad = torch.empty(s.shape, dtype=s.dtype, device=s.device)
    valid = (tokens != ignore_index).unsqueeze(-1)
    for sl in _chunks(n, vl):
        r = rows[sl].to(cdt)
        gv = opd_grad_logprobs(s[sl].to(cdt) / temperature - r[:, 5, None],
                               t[sl, :vl].to(cdt) / temperature - r[:, 6, None],
                               r[:, C.A, None], r[:, C.B, None], reverse=reverse,
                               temperature=temperature, eu=r[:, 8, None],
                               log_z_q=r[:, 7, None])
        gv = gv * grad_rows[sl].to(cdt).unsqueeze(-1)
        grad[sl] = torch.where(valid[sl], gv, torch.zeros_like(gv)).to(s.dtype)
    return grad


class OPDRowsParallel(torch.autograd.Function):
    """The full-logits loss of a vocabulary shard; ``path`` "torch" or "triton"."""

    @staticmethod
    def forward(ctx, s, t, tokens, sign, beta, lam_pos, lam_neg, reverse, temperature,
                ignore_index, group, path):
        rows_fn = opd_rows_parallel_triton if path == "triton" else opd_rows_parallel
        rows = rows_fn(s, t, tokens, sign, beta=beta, lam_pos=lam_pos, lam_neg=lam_neg,
                       reverse=reverse, temperature=temperature, ignore_index=ignore_index,
                       group=group)
        ctx.save_for_backward(s, t, tokens, rows)
        ctx.args = (reverse, temperature, ignore_index, path)
        return rows

    @staticmethod
    def backward(ctx, grad):
        s, t, tokens, rows = ctx.saved_tensors
        gs = None
        if ctx.needs_input_grad[0]:
            reverse, temperature, ignore_index, path = ctx.args
            kw = dict(reverse=reverse, temperature=temperature, ignore_index=ignore_index)
            if path == "triton":  # the single-device backward kernel on the combined table
                from .triton import logits

                gs = logits.opd_rows_backward(grad[:, C.LOSS].contiguous(), s, t, tokens, rows,
                                              local_tokens=False, **kw)
            else:
                gs = opd_rows_parallel_backward(grad[:, C.LOSS].contiguous(), s, t, tokens,
                                                rows, **kw)
        return (gs,) + (None,) * 11


# ---------------------------------------------------------------------------
# the full-logits loss on the Triton kernels (sgopd_kernels/triton/parallel.py)

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


def opd_rows_parallel_triton(s, t, tokens, sign, *, beta, lam_pos, lam_neg, reverse,
                             temperature, ignore_index, group):
    """The single-device Triton row table (``_rows.py``) of a vocabulary-sharded row.

    Frame of the row's linear sums: the student's global maximum and the teacher's logit
    at that token (the single-device kernels' centring). Nothing is read on the host: like
    the single-device kernels, a token id that no rank holds makes its row's loss and
    gradient NaN, and shards of unequal widths make every row NaN (the widths travel with
    the first all-reduce).
    """
    from .triton import parallel as K

    n, vl = tokens.numel(), s.shape[-1]
    scale2 = LOG2E / temperature
    valid = tokens != ignore_index
    st = K.stats(s, t, tokens, start=shard_start(vl, group), temperature=temperature,
                 ignore_index=ignore_index)
    # round 1: raw maxima; its last row carries (V_local, -V_local): equal widths iff the
    # two maxima are opposite
    width = st.new_full((1, 2), float(vl))
    width[:, 1] = -vl
    m = _all_reduce(torch.cat([st[:, [0, 2]], width]), dist.ReduceOp.MAX, group)
    unequal = m[-1, 0] != -m[-1, 1]
    r_s, r_t = _finite(m[:-1, 0]), _finite(m[:-1, 1])
    # round 2: rescaled sums, y's logits from its holder, the teacher at the student's argmax
    tie = (st[:, 0] == m[:-1, 0]) & (st[:, 0] != NEG_INF)
    r2 = _all_reduce(torch.stack([
        st[:, 1] * torch.exp2((st[:, 0] - r_s) * scale2),
        st[:, 3] * torch.exp2((st[:, 2] - r_t) * scale2),
        st[:, 4], st[:, 5], st[:, 6],
        torch.where(tie, st[:, 7], torch.zeros_like(r_s)), tie.to(torch.float32)], -1),
        dist.ReduceOp.SUM, group)
    lz_s = torch.where(r2[:, 0] == 0, math.inf, torch.log2(r2[:, 0]))  # no support: lp = -inf
    lz_t = torch.where(r2[:, 1] == 0, math.inf, torch.log2(r2[:, 1]))
    f_t = r2[:, 5] / r2[:, 6].clamp(min=1)  # (the mean over ranks whose maxima tie)
    f_t = torch.where(torch.isfinite(f_t) & (r2[:, 6] > 0), f_t, r_t)
    f_s = r_s
    lps_y = (r2[:, 2] - r_s) * scale2 - lz_s  # base 2
    lpt_y = (r2[:, 3] - r_t) * scale2 - lz_t
    delta = sampled_delta(lpt_y * LN2, lps_y * LN2)
    lam, g = gate_lambda(delta, sign, lam_pos, lam_neg)
    # a token no rank holds (out of range), or shards that do not tile the vocabulary: NaN
    lam = torch.where(unequal | (valid & (r2[:, 4] != 1)), math.nan, lam)
    a, b = lam, 1.0 - lam + beta
    rows = torch.zeros(n, C.ROW_K, dtype=torch.float32, device=s.device)
    rows[:, C.REF_S], rows[:, C.LOG2Z_S], rows[:, C.FRAME_S], rows[:, C.FRAME_T] = \
        r_s, lz_s, f_s, f_t
    rows[:, C.A], rows[:, C.B] = a, b
    # round 3 and 4: the bridge's maximum, then its sums and the student's means
    br = K.bridge(s, t, tokens, rows, temperature=temperature, ignore_index=ignore_index)
    m_x = _all_reduce(br[:, 0].clone(), dist.ReduceOp.MAX, group)
    m_c = _finite(m_x)
    k = torch.exp2(br[:, 0] - m_c)
    shifted = torch.where(br[:, 1] == 0, torch.zeros_like(m_c), br[:, 2] + (br[:, 0] - m_c)
                          * br[:, 1])
    r4 = _all_reduce(torch.stack([br[:, 1] * k, k * shifted, br[:, 3] * k, br[:, 4], br[:, 5],
                                  br[:, 6]], -1), dist.ReduceOp.SUM, group)
    z_c, p_sum = r4[:, 0], r4[:, 3]
    lz_c = torch.log2(z_c)
    no_p = p_sum == 0  # a student without support: its expectations are 0
    mean_s = torch.where(no_p, torch.zeros_like(p_sum), r4[:, 4] / p_sum)
    mean_t = torch.where(no_p, torch.zeros_like(p_sum), r4[:, 5] / p_sum)
    off_s = (f_s - r_s) * scale2 - lz_s  # lp_S = sf + off_s (base 2)
    off_t = (f_t - r_t) * scale2 - lz_t
    elp_s = torch.where(no_p, torch.zeros_like(p_sum), mean_s + off_s)
    elp_t = torch.where(no_p, torch.zeros_like(p_sum), mean_t + off_t)
    if reverse:  # as in the single-device kernel
        loss = (1.0 - b) * elp_s - a * elp_t + (m_c + lz_c + a * off_t + b * off_s)
    else:
        loss = (r4[:, 1] / z_c - lz_c) - (r4[:, 2] / z_c + off_s)
    loss = torch.where(z_c == 0, torch.full_like(loss, math.inf), loss * LN2)
    zero = torch.zeros_like(loss)
    for c, v in ((C.LOSS, loss), (C.DELTA, delta), (C.GATE, g),
                 (C.TEACHER_KL, (elp_s - elp_t) * LN2), (C.ENTROPY, -elp_s * LN2)):
        rows[:, c] = torch.where(valid, v, zero)
    rows[:, C.MEAN_S], rows[:, C.MEAN_T] = mean_s, mean_t
    rows[:, C.MAX_Q], rows[:, C.LOG2Z_Q] = m_c, lz_c
    return rows


# ---------------------------------------------------------------------------
# the sampled-token estimator

def sampled_rows_parallel(s, teacher_logprobs, tokens, sign, *, lam_pos, lam_neg, temperature,
                          ignore_index, group):
    """Per-row table (N, C.SAMPLED_ROW_K); column 6 holds log Z_S for the backward."""
    n, vl = s.shape
    cdt = _compute_dtype(s, teacher_logprobs)
    start = shard_start(vl, group)
    valid = tokens != ignore_index
    own, col = _owned(tokens, start, vl, ignore_index)
    m = torch.empty(n, 1, dtype=cdt, device=s.device)
    for sl in _chunks(n, vl):
        m[sl, 0] = (s[sl].to(cdt) / temperature).amax(-1)
    m_s = _finite(_all_reduce(m, dist.ReduceOp.MAX, group)[:, 0])
    r = torch.empty(n, 3, dtype=cdt, device=s.device)
    for sl in _chunks(n, vl):
        zc = s[sl].to(cdt) / temperature - m_s[sl, None]
        e = zc.exp()
        r[sl] = torch.stack([e.sum(-1), _xmul(e, zc).sum(-1),
                             _gather_owned(zc, own[sl], col[sl])], -1)
    r = _all_reduce(r, dist.ReduceOp.SUM, group)
    log_z = _lse(torch.zeros_like(m_s), r[:, 0])
    lp_s_y = r[:, 2] - log_z
    delta = sampled_delta(teacher_logprobs.to(cdt), lp_s_y)
    lam, g = gate_lambda(delta, None if sign is None else sign.to(cdt), lam_pos, lam_neg)
    adv = lam * delta
    # -E_p[lp_S], lp_S = zc - log Z; 0 for a row without support
    entropy = torch.where(r[:, 0] == 0, torch.zeros_like(log_z), log_z - r[:, 1] / r[:, 0])
    zero = torch.zeros_like(delta)
    out = torch.zeros(n, C.SAMPLED_ROW_K, dtype=cdt, device=s.device)
    for c, v in ((C.LOSS, -_xmul(adv, lp_s_y)), (C.DELTA, delta), (C.GATE, g),
                 (C.TEACHER_KL, -delta), (C.ENTROPY, entropy), (C.S_ADV, adv)):
        out[:, c] = torch.where(valid, v, zero)
    out[:, 6] = m_s + log_z
    return out


def sampled_rows_parallel_backward(grad_rows, s, tokens, rows, *, temperature, ignore_index,
                                   group):
    """-(A / tau) (onehot(y) - p_S) on this rank's shard."""
    n, vl = s.shape
    cdt = _compute_dtype(s)
    own, col = _owned(tokens, shard_start(vl, group), vl, ignore_index)
    grad = torch.empty(s.shape, dtype=s.dtype, device=s.device)
    valid = (tokens != ignore_index).unsqueeze(-1)
    for sl in _chunks(n, vl):
        p = (s[sl].to(cdt) / temperature - rows[sl, 6, None].to(cdt)).exp()
        onehot = torch.zeros_like(p).scatter_(-1, col[sl], 1.0) * own[sl, None].to(cdt)
        adv = rows[sl, C.S_ADV, None].to(cdt)
        gv = -(adv / temperature) * (onehot - p) * grad_rows[sl].to(cdt).unsqueeze(-1)
        grad[sl] = torch.where(valid[sl], gv, torch.zeros_like(gv)).to(s.dtype)
    return grad


class SampledRowsParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s, tlp, tokens, sign, lam_pos, lam_neg, temperature, ignore_index, group):
        rows = sampled_rows_parallel(s, tlp, tokens, sign, lam_pos=lam_pos, lam_neg=lam_neg,
                                     temperature=temperature, ignore_index=ignore_index,
                                     group=group)
        ctx.save_for_backward(s, tokens, rows)
        ctx.args = (temperature, ignore_index, group)
        return rows

    @staticmethod
    def backward(ctx, grad):
        s, tokens, rows = ctx.saved_tensors
        gs = None
        if ctx.needs_input_grad[0]:
            temperature, ignore_index, group = ctx.args
            gs = sampled_rows_parallel_backward(grad[:, C.LOSS].contiguous(), s, tokens, rows,
                                                temperature=temperature,
                                                ignore_index=ignore_index, group=group)
        return (gs,) + (None,) * 8


def rows_parallel(kind: str, *args, group, backend: str = "torch", **kw) -> Tensor:
    """Entry point of the public API: ``kind`` is "opd" or "sampled"; the table.

    ``backend`` "triton" runs the full-logits loss on the Triton kernels (the sampled
    estimator has the torch path only); "torch" the readable path.

    The torch path checks first, the same way on every rank (so that all raise or none):
    equal shard widths, and token ids inside the global vocabulary. The Triton path reads
    nothing on the host and makes the affected rows NaN instead.
    """
    s, tokens = args[0], args[2]
    if backend == "torch":  # the readable path raises on misuse (reading values on the host)
        vocab = check_shards(s.shape[-1], group, s.device)
        check_tokens(tokens, vocab, kw["ignore_index"],
                     what=" (the global vocabulary of the process group)")
    if kind == "opd":
        s, t, tokens, sign = args
        rest = (tokens, sign, kw["beta"], kw["lam_pos"], kw["lam_neg"], kw["reverse"],
                kw["temperature"], kw["ignore_index"], group, backend)
        if backend == "triton":  # the kernels read any strides in place
            return OPDRowsParallel.apply(s, t.detach(), *rest)
        return OPDRowsParallel.apply(s.reshape(-1, s.shape[-1]),
                                     t.detach().reshape(-1, t.shape[-1]), *rest)
    s, tlp, tokens, sign = args
    return SampledRowsParallel.apply(s.reshape(-1, s.shape[-1]), tlp, tokens, sign,
                                     kw["lam_pos"], kw["lam_neg"], kw["temperature"],
                                     kw["ignore_index"], group)

