"""Readable eager PyTorch of every formula in docs/math.md.

This module is the correctness oracle of the library and its CPU path
(``backend="torch"``). The backend entry points (:func:`opd_rows`,
:func:`sampled_rows` and their backwards) take (..., V) logits and walk over
row chunks, so that no more than a few chunk-sized temporaries exist at a
time, whatever the number of rows; the formulas below them work on one 2-D
chunk: student logits (R, V), teacher logits already cut to the student's
vocabulary, (R, V).

Per-row results are returned in a table (float32, or float64 for float64
inputs) whose shared and family columns are named in :mod:`sgopd_kernels._rows`
(this backend keeps nothing private); the autograd layer reduces the table and,
for the backward, calls :func:`opd_rows_backward` / :func:`sampled_rows_backward`,
which evaluate the closed-form gradients of docs/math.md chunk by chunk.
"""

from __future__ import annotations

import math

import torch

from . import _rows as C
from ._options import Divergence, RowOptions

NEG_INF = float("-inf")
# elements of one row chunk: a handful of float64 temporaries of this size.
CHUNK_ELEMENTS = 1 << 23


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(x.dtype == torch.float64 for x in tensors) else torch.float32


def _chunks(n_rows: int, vocab: int):
    step = max(1, CHUNK_ELEMENTS // max(vocab, 1))
    for start in range(0, n_rows, step):
        yield slice(start, min(n_rows, start + step))


def _xmul(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """p * x with the convention 0 * (+-inf) = 0 (``0 log 0 = 0``), autograd safe."""
    return p * torch.where(p == 0, torch.zeros_like(x), x)


def log_softmax(x: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log_softmax of ``x / temperature`` over the last dimension; a row that is -inf
    everywhere stays -inf.

    (torch.log_softmax gives NaN there: -inf - -inf.) Such a row is a distribution with no
    support: it gives every token probability 0, so it never creates NaN by itself.

    Centred on the row's maximum before the temperature divides it: ``x - logsumexp(x)``
    would round away the log of the row's sum where the logits are large (a row held near
    -1e15, or near 2^16 in float32: a uniform row would get log-probabilities of 0), and
    ``x / temperature`` would overflow a row held near the largest float at a temperature
    below 1.
    """
    m = x.detach().amax(dim=-1, keepdim=True)
    x = (x - torch.where(torch.isfinite(m), m, torch.zeros_like(m))) / temperature
    lse = torch.logsumexp(x, dim=-1, keepdim=True)
    return torch.where(lse == NEG_INF, torch.full_like(x, NEG_INF), x - lse)


def _sign(x: torch.Tensor) -> torch.Tensor:
    """sign(x) with NaN -> 0."""
    return (x > 0).to(x.dtype) - (x < 0).to(x.dtype)


def check_tokens(tokens: torch.Tensor, vocab: int, ignore_index: int, what: str = "") -> None:
    """The torch path raises on an out-of-range token id (this syncs the host).

    ``what`` names the vocabulary in the message (e.g. a process group's global one).
    """
    bad = (tokens != ignore_index) & ((tokens < 0) | (tokens >= vocab))
    if bool(bad.any()):
        first = int(tokens[bad][0])
        raise ValueError(f"tokens: id {first} is outside [0, {vocab}){what} and is not "
                         f"ignore_index={ignore_index}")


def gate_lambda(delta, sign, lam_pos: float, lam_neg: float):
    """lambda per row from the sign-consistency gate g = sign(delta) * sigma.

    A NaN verdict gives lambda = NaN: NaN in an input reaches that position's loss.
    """
    g = _sign(delta) * sign if sign is not None else torch.zeros_like(delta)
    one = torch.ones_like(delta)
    lam = torch.where(g > 0, one * lam_pos, torch.where(g < 0, one * lam_neg, one))
    return torch.where(torch.isnan(g), one * math.nan, lam), g


def sampled_delta(lp_t_y: torch.Tensor, lp_s_y: torch.Tensor) -> torch.Tensor:
    """delta = lp_T(y) - lp_S(y); 0 where both models give y zero probability."""
    both = (lp_t_y == NEG_INF) & (lp_s_y == NEG_INF)
    return torch.where(both, torch.zeros_like(lp_s_y), lp_t_y - lp_s_y)


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """(..., V) -> (N, V); a view where the strides allow it."""
    return x.reshape(-1, x.shape[-1])


def bridge_logits(lp_s, lp_t, a, b):
    """x = a lp_T + b lp_S on the joint support, -inf elsewhere (a, b: one per row, (R, 1))."""
    support = (lp_s != NEG_INF) & (lp_t != NEG_INF)
    return torch.where(support, a * lp_t + b * lp_s, torch.full_like(lp_s, NEG_INF))


def log_mixture(lp_s, log_q, pi: float):
    """log m, m = (1 - pi) p_S + pi q (the generalized JSD's mixture); -inf where both are 0
    (and there without a NaN in the gradient: logaddexp's derivative at (-inf, -inf) is NaN)."""
    none = (lp_s == NEG_INF) & (log_q == NEG_INF)
    zero = torch.zeros_like(lp_s)
    m = torch.logaddexp(torch.where(none, zero, lp_s) + math.log1p(-pi),
                        torch.where(none, zero, log_q) + math.log(pi))
    return torch.where(none, torch.full_like(m, NEG_INF), m)


def divergence_rows(lp_s, log_q, opts: RowOptions):
    """The per-row divergence between p_S = exp(lp_s) and q = exp(log_q) (docs/math.md).

    Differentiable in ``lp_s`` (``log_q`` is a constant of the student's update).
    """
    d = opts.divergence
    p_s = lp_s.exp()
    if d == Divergence.REVERSE_KL:  # KL(p_S || q)
        return _xmul(p_s, lp_s - log_q).sum(-1)
    q = log_q.exp()
    if d == Divergence.FORWARD_KL:  # KL(q || p_S)
        return _xmul(q, log_q - lp_s).sum(-1)
    pi = opts.jsd_beta  # pi KL(q || m) + (1 - pi) KL(p_S || m)
    log_m = log_mixture(lp_s, log_q, pi)
    return pi * _xmul(q, log_q - log_m).sum(-1) + (1 - pi) * _xmul(p_s, lp_s - log_m).sum(-1)


def bridge_terms(s_logits, t_logits, tokens, sign, opts: RowOptions) -> dict:
    """All per-row quantities of the spec for one chunk of rows.

    Differentiable in ``s_logits`` exactly as the spec's loss is: the target
    ``q`` and the gate use the detached student log-probabilities. Masked rows
    give loss 0. Inputs are used in their own dtype (the caller upcasts).
    """
    lp_s = log_softmax(s_logits, opts.temperature)
    lp_t = log_softmax(t_logits, opts.teacher_temperature)
    lp_s_d = lp_s.detach()
    p_s = lp_s_d.exp()

    valid = tokens != opts.ignore_index
    y = torch.where(valid, tokens, torch.zeros_like(tokens)).unsqueeze(-1)
    lp_s_y = lp_s_d.gather(-1, y).squeeze(-1)
    lp_t_y = lp_t.detach().gather(-1, y).squeeze(-1)
    delta = sampled_delta(lp_t_y, lp_s_y)
    lam, g = gate_lambda(delta, sign, opts.lam_pos, opts.lam_neg)
    a = lam.unsqueeze(-1)
    b = (1.0 - lam + opts.beta).unsqueeze(-1)

    # the bridge target q = softmax(a lp_T + b sg(lp_S)) on the joint support
    x = bridge_logits(lp_s_d, lp_t, a, b)
    log_z_q = torch.logsumexp(x, dim=-1, keepdim=True)
    loss = divergence_rows(lp_s, x - log_z_q, opts)
    # an empty joint support: no target, the divergence is +inf
    loss = torch.where(log_z_q.squeeze(-1) == NEG_INF, torch.full_like(loss, math.inf), loss)
    loss = torch.where(valid, loss, torch.zeros_like(loss))

    with torch.no_grad():
        teacher_kl = _xmul(p_s, lp_s_d - lp_t).sum(-1)
        entropy = -_xmul(p_s, lp_s_d).sum(-1)
    zero = torch.zeros_like(delta)
    return dict(
        loss=loss,
        delta=torch.where(valid, delta, zero),
        gate=torch.where(valid, g, zero),
        teacher_kl=torch.where(valid, teacher_kl, zero),
        entropy=torch.where(valid, entropy, zero),
        a=lam,
        b=1.0 - lam + opts.beta,
    )


def _table(family, student, others, tokens, sign, terms, opts):
    """Fill the per-row table chunk by chunk: ``terms`` maps a chunk to named row values."""
    n, vocab = student.shape
    check_tokens(tokens, vocab, ignore_index=opts.ignore_index)
    cdt = _compute_dtype(student, *others)
    out = torch.zeros(n, C.WIDTH[family], dtype=cdt, device=student.device)
    columns = {**C.SHARED, **C.FAMILY[family]}
    for sl in _chunks(n, vocab):
        r = terms(student[sl].to(cdt), *(x[sl].to(cdt) for x in others), tokens[sl],
                  None if sign is None else sign[sl].to(cdt), opts)
        for name, col in columns.items():
            out[sl, col] = r[name]
    return out


def opd_rows(student, teacher, tokens, sign, opts: RowOptions) -> torch.Tensor:
    """Per-row table (N, WIDTH["logits"]) for logits ``student`` (..., V), ``teacher`` (..., >=V)."""
    student = _as_rows(student)
    teacher = _as_rows(teacher)[:, :student.shape[1]]
    return _table("logits", student, (teacher,), tokens, sign, bridge_terms, opts)


def opd_grad_logprobs(lp_s, lp_t, a, b, opts: RowOptions, *, e_p=None, log_z_q=None):
    """Closed-form d loss / d student logits from the rows' log-probabilities (docs/math.md).

    a, b: (R, 1). The row constants log Z_q and E_{p_S}[u] (reverse KL, u = (1 - b) lp_S -
    a lp_T) or E_{p_S}[h] (JSD, h = (1 - pi) log(p_S / m)), each (R, 1), are formed here from
    the rows unless given (a vocabulary shard gets them from all ranks).
    """
    p_s = lp_s.exp()
    d = opts.divergence
    if d == Divergence.REVERSE_KL:  # p (u - E_p[u])
        u = (1.0 - b) * lp_s - a * lp_t
        if e_p is None:
            e_p = _xmul(p_s, u).sum(-1, keepdim=True)
        grad = _xmul(p_s, u - e_p)
    else:
        x = bridge_logits(lp_s, lp_t, a, b)
        log_q = torch.log_softmax(x, dim=-1) if log_z_q is None else x - log_z_q
        if d == Divergence.FORWARD_KL:  # p - q
            grad = p_s - log_q.exp()
        else:  # p (h - E_p[h])
            h = (1.0 - opts.jsd_beta) * (lp_s - log_mixture(lp_s, log_q, opts.jsd_beta))
            if e_p is None:
                e_p = _xmul(p_s, h).sum(-1, keepdim=True)
            grad = _xmul(p_s, h - e_p)
    return grad / opts.temperature


def opd_grad_chunk(s_logits, t_logits, a, b, opts: RowOptions):
    """Closed-form d loss / d student logits for one chunk (docs/math.md)."""
    return opd_grad_logprobs(log_softmax(s_logits, opts.temperature),
                             log_softmax(t_logits, opts.teacher_temperature), a.unsqueeze(-1),
                             b.unsqueeze(-1), opts)


def opd_rows_backward(grad_rows, student, teacher, tokens, rows, opts: RowOptions):
    """d loss / d student logits, shaped like ``student``, from the table's A and B."""
    shape = student.shape
    student = _as_rows(student)
    n, vocab = student.shape
    teacher = _as_rows(teacher)
    cdt = _compute_dtype(student, teacher)
    grad = torch.empty(student.shape, dtype=student.dtype, device=student.device)
    valid = tokens != opts.ignore_index
    for sl in _chunks(n, vocab):
        g = opd_grad_chunk(student[sl].to(cdt), teacher[sl, :vocab].to(cdt),
                           rows[sl, C.A].to(cdt), rows[sl, C.B].to(cdt), opts)
        g = g * grad_rows[sl].to(cdt).unsqueeze(-1)
        grad[sl] = torch.where(valid[sl].unsqueeze(-1), g, torch.zeros_like(g)).to(student.dtype)
    return grad.view(shape)


# ---------------------------------------------------------------------------
# the sampled-token estimator (docs/math.md, "The sampled-token estimator")

def sampled_terms(s_logits, teacher_logprobs, tokens, sign, opts: RowOptions) -> dict:
    """Per-row quantities of the sampled estimator; differentiable in s_logits."""
    lp_s = log_softmax(s_logits, opts.temperature)
    valid = tokens != opts.ignore_index
    y = torch.where(valid, tokens, torch.zeros_like(tokens)).unsqueeze(-1)
    lp_s_y = lp_s.gather(-1, y).squeeze(-1)
    delta = sampled_delta(teacher_logprobs, lp_s_y.detach())
    lam, g = gate_lambda(delta, sign, opts.lam_pos, opts.lam_neg)
    adv = lam * delta
    loss = -_xmul(adv, lp_s_y)  # A = 0 (delta = 0) contributes 0, even where lp_S(y) = -inf
    zero = torch.zeros_like(delta)
    with torch.no_grad():
        entropy = -_xmul(lp_s.exp(), lp_s).sum(-1)
    return dict(
        loss=torch.where(valid, loss, zero),
        delta=torch.where(valid, delta, zero),
        gate=torch.where(valid, g, zero),
        teacher_kl=torch.where(valid, -delta, zero),
        entropy=torch.where(valid, entropy, zero),
        adv=torch.where(valid, adv, zero),
    )


def sampled_rows(student, teacher_logprobs, tokens, sign, opts: RowOptions) -> torch.Tensor:
    """Per-row table (N, WIDTH["sampled"]) of the sampled estimator."""
    return _table("sampled", _as_rows(student), (teacher_logprobs,), tokens, sign,
                  sampled_terms, opts)


def sampled_rows_backward(grad_rows, student, teacher_logprobs, tokens, rows, opts: RowOptions):
    """d loss / d z = -(A / tau) (onehot(y) - p_S), times the row's incoming gradient."""
    shape = student.shape
    student = _as_rows(student)
    n, vocab = student.shape
    cdt = _compute_dtype(student)
    grad = torch.empty(student.shape, dtype=student.dtype, device=student.device)
    valid = tokens != opts.ignore_index
    tau = opts.temperature
    for sl in _chunks(n, vocab):
        p = log_softmax(student[sl].to(cdt), tau).exp()
        y = torch.where(valid[sl], tokens[sl], torch.zeros_like(tokens[sl]))
        onehot = torch.zeros_like(p).scatter_(-1, y.unsqueeze(-1), 1.0)
        adv = rows[sl, C.ADV].to(cdt).unsqueeze(-1)
        g = -(adv / tau) * (onehot - p) * grad_rows[sl].to(cdt).unsqueeze(-1)
        grad[sl] = torch.where(valid[sl].unsqueeze(-1), g, torch.zeros_like(g)).to(student.dtype)
    return grad.view(shape)


# ---------------------------------------------------------------------------
# a teacher given by its top-k (docs/math.md, "A teacher that returns its top-k")
#
# The categories of a row, in this order along the last dimension: its K slots (an unused slot,
# a negative id, is an absent category), y's own category (present when the teacher's lp_T(y)
# is given and y is not among the ids), the tail bucket. An absent category has log-probability
# -inf in both models, so it is outside the target's support and adds nothing.

def check_topk_ids(ids, tokens, vocab: int, ignore_index: int, what: str = "") -> None:
    """The torch path raises on an id >= vocab or an id twice in one unmasked row (this syncs
    the host). ``ids``: (N, K) int64; masked rows are not read."""
    live = ids[tokens != ignore_index]
    bad = live >= vocab
    if bool(bad.any()):
        raise ValueError(f"teacher_topk_ids: id {int(live[bad][0])} is outside [0, {vocab})"
                         f"{what}; a negative id marks an unused slot")
    ordered = live.sort(-1).values
    twice = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)
    if bool(twice.any()):
        raise ValueError(f"teacher_topk_ids: id {int(ordered[:, 1:][twice][0])} appears twice "
                         "in one position's top-k; the ids of a position must be distinct")


def logsumexp_or_empty(x):
    """logsumexp over the last dimension; -inf, with a zero gradient, where every entry is -inf
    (torch.logsumexp's gradient is NaN there)."""
    empty = (x == NEG_INF).all(-1, keepdim=True)
    out = torch.logsumexp(torch.where(empty, torch.zeros_like(x), x), dim=-1)
    return torch.where(empty.squeeze(-1), torch.full_like(out, NEG_INF), out)


def log1mexp(a):
    """log(1 - e^a), accurate for every a < 0 (log(-expm1(a)) near 0, log1p(-e^a) below
    -log 2); -inf for a >= 0."""
    near = a > -math.log(2.0)
    out = torch.where(near, torch.log(-torch.expm1(torch.where(near, a, -1.0))),
                      torch.log1p(-torch.exp(torch.where(near, -1.0, a))))
    return torch.where(a >= 0, torch.full_like(a, NEG_INF), out)


def topk_membership(ids, tokens, has_token_logprobs: bool, ignore_index: int):
    """Per row: which slots are used (R, K), whether y has its own category (R,), and y's
    category index (R,): its slot, K (its own) or K + 1 (the tail)."""
    k = ids.shape[-1]
    valid = tokens != ignore_index
    present = (ids >= 0) & valid.unsqueeze(-1)  # (a masked position has no categories)
    hit = present & (ids == tokens.unsqueeze(-1))
    in_e = hit.any(-1)
    own = valid & ~in_e if has_token_logprobs else torch.zeros_like(valid)
    cat_y = torch.where(in_e, hit.to(torch.int64).argmax(-1),
                        torch.where(own, torch.full_like(tokens, k), torch.full_like(tokens, k + 1)))
    return present, own, cat_y


def topk_teacher_categories(tlp, ttl, present, own, tail_floor: float):
    """The teacher's category log-probabilities (R, K + 2): lp_T at the used slots and at y's
    own category, and log max(1 - sum, tail_floor) for the tail, with log(1 - sum) formed
    from a float64 logsumexp without cancelling (:func:`log1mexp`)."""
    lt_k = torch.where(present, tlp, torch.full_like(tlp, NEG_INF))
    lt_y = torch.full_like(tlp[:, 0], NEG_INF) if ttl is None else \
        torch.where(own, ttl, torch.full_like(ttl, NEG_INF))
    # in float64 whatever the inputs' dtype: a float32 logsumexp near 0 carries an absolute
    # error of about 1e-7, which is all of a tail of 1e-7 (O(rows k) work)
    held = logsumexp_or_empty(torch.cat([lt_k, lt_y.unsqueeze(-1)], -1).double())
    tail = torch.maximum(log1mexp(held), torch.full_like(held, math.log(tail_floor)
                                                         if tail_floor > 0 else NEG_INF))
    return torch.cat([lt_k, lt_y.unsqueeze(-1), tail.to(lt_k.dtype).unsqueeze(-1)], -1)


def topk_student_categories(lp_s, ids, tokens, present, own):
    """The student's category log-probabilities (R, K + 2) from its log-probabilities (R, V):
    gathered at the used slots and y, and the tail as the log-sum over the tokens outside
    them (an exact sum, never 1 - sum in the working precision) or, where that sum holds more
    than half the mass, as log(1 - the categories' sum) formed without cancelling (so that a
    tail near 1 keeps its digits); differentiable in ``lp_s``."""
    n, vocab = lp_s.shape
    neg = torch.full_like(ids, NEG_INF, dtype=lp_s.dtype)
    ids0 = torch.where(present, ids, torch.zeros_like(ids))
    y0 = torch.where(own, tokens, torch.zeros_like(tokens)).unsqueeze(-1)
    ls_k = torch.where(present, lp_s.gather(-1, ids0), neg)
    ls_y = torch.where(own, lp_s.gather(-1, y0).squeeze(-1), neg[:, 0])
    inside = torch.zeros(n, vocab + 1, dtype=torch.bool, device=lp_s.device)
    inside.scatter_(-1, torch.where(present, ids, vocab), True)  # (column vocab: a spare)
    inside.scatter_(-1, torch.where(own.unsqueeze(-1), y0, vocab), True)
    outside = logsumexp_or_empty(torch.where(inside[:, :vocab], torch.full_like(lp_s, NEG_INF),
                                             lp_s))
    held = logsumexp_or_empty(torch.cat([ls_k, ls_y.unsqueeze(-1)], -1))
    small = outside < -math.log(2.0)
    tail = torch.where(small, outside, log1mexp(torch.where(small, -1.0, held)))
    return torch.cat([ls_k, ls_y.unsqueeze(-1), tail.unsqueeze(-1)], -1)


def topk_bridge(cat_s, cat_t, cat_y, sign, opts: RowOptions):
    """delta, the gate, lambda, a, b, the bridge logits x over the categories and log Z_q, from
    the category log-probabilities (``cat_s`` detached)."""
    y = cat_y.unsqueeze(-1)
    delta = sampled_delta(cat_t.gather(-1, y).squeeze(-1), cat_s.gather(-1, y).squeeze(-1))
    lam, g = gate_lambda(delta, sign, opts.lam_pos, opts.lam_neg)
    a, b = lam.unsqueeze(-1), (1.0 - lam + opts.beta).unsqueeze(-1)
    x = bridge_logits(cat_s, cat_t, a, b)
    return delta, g, a, b, x, logsumexp_or_empty(x).unsqueeze(-1)


def topk_terms(s_logits, ids, tlp, ttl, tokens, sign, opts: RowOptions) -> dict:
    """All per-row quantities of the top-k loss for one chunk of rows; differentiable in
    ``s_logits`` as the spec's loss is (the target and the gate use the detached student)."""
    lp_s = log_softmax(s_logits, opts.temperature)
    valid = tokens != opts.ignore_index
    present, own, cat_y = topk_membership(ids, tokens, ttl is not None, opts.ignore_index)
    cat_s = topk_student_categories(lp_s, ids, tokens, present, own)
    cat_t = topk_teacher_categories(tlp, ttl, present, own, opts.tail_floor)
    cat_sd = cat_s.detach()
    delta, g, a, b, x, log_z_q = topk_bridge(cat_sd, cat_t, cat_y, sign, opts)
    loss = divergence_rows(cat_s, x - log_z_q, opts)
    # an empty joint support: no target, the divergence is +inf
    loss = torch.where(log_z_q.squeeze(-1) == NEG_INF, torch.full_like(loss, math.inf), loss)
    with torch.no_grad():
        teacher_kl = _xmul(cat_sd.exp(), cat_sd - cat_t).sum(-1)
        lp_sd = lp_s.detach()
        entropy = -_xmul(lp_sd.exp(), lp_sd).sum(-1)
    zero = torch.zeros_like(delta)
    return dict(
        loss=torch.where(valid, loss, torch.zeros_like(loss)),
        delta=torch.where(valid, delta, zero),
        gate=torch.where(valid, g, zero),
        teacher_kl=torch.where(valid, teacher_kl, zero),
        entropy=torch.where(valid, entropy, zero),
        a=a.squeeze(-1),
        b=b.squeeze(-1),
    )


def topk_single_token_terms(cat_s, log_q, opts: RowOptions):
    """(G_c, beta_c) of categories with one token each (docs/math.md): the gradient at that
    token is (p_S (G_c - sum_c' P_S(c') G_c') + beta_c) / tau. Reverse KL and JSD: G_c =
    d loss / d P_S(c) up to a constant (0 where P_S(c) = 0) and beta_c = 0; forward KL has
    G_c = -Q_c / P_S(c), whose p_S G_c is kept as beta_c = -Q_c (no division), G_c = 0."""
    zero = torch.zeros_like(cat_s)
    if opts.divergence == Divergence.FORWARD_KL:
        return zero, -log_q.exp()
    if opts.divergence == Divergence.REVERSE_KL:  # G = log P_S - log Q (up to a constant)
        g = cat_s - log_q
    else:  # JSD: G = (1 - pi) log(P_S / M)
        g = (1.0 - opts.jsd_beta) * (cat_s - log_mixture(cat_s, log_q, opts.jsd_beta))
    return torch.where(cat_s.exp() > 0, g, zero), zero


def topk_grad_coefficients(cat_s, x, log_z_q, opts: RowOptions):
    """The closed-form gradient over the categories (R, K + 2): d loss / d z_v =
    (p_S,v alpha_c + beta_c) / tau for v in category c (beta_c only for a category of one
    token). Returns (alpha, beta, sum_c P_S(c) G_c (R, 1)).

    alpha_c = G_c - sum_c' P_S(c') G_c'. For the tail it is formed without the cancellation
    that a tail holding nearly all the mass would bring: sum over the other categories of
    P_S(c) (G_tail - G_c), and for forward KL (G_tail = -Q_tail / P_S(tail), sum_c P_S G =
    -sum Q) sum of the other Q_c minus Q_tail P_S(others) / P_S(tail).
    """
    log_q = x - log_z_q
    g, beta = topk_single_token_terms(cat_s, log_q, opts)
    p = cat_s.exp()
    zero = torch.zeros_like(p[:, -1:])
    if opts.divergence == Divergence.FORWARD_KL:
        q = log_q.exp()
        g_mean = -q.sum(-1, keepdim=True)  # (P_S(c) G_c = -Q_c on the support, however small P_S)
        ratio = (log_q[:, -1:] + logsumexp_or_empty(cat_s[:, :-1]).unsqueeze(-1)
                 - cat_s[:, -1:]).exp()
        tail = torch.where(cat_s[:, -1:] == NEG_INF, zero, q[:, :-1].sum(-1, keepdim=True)
                           - ratio)
        return torch.cat([-g_mean.expand_as(g[:, :-1]), tail], -1), \
            torch.cat([beta[:, :-1], zero], -1), g_mean
    g_mean = _xmul(p, g).sum(-1, keepdim=True)
    tail = _xmul(p[:, :-1], g[:, -1:] - g[:, :-1]).sum(-1, keepdim=True)
    return torch.cat([g[:, :-1] - g_mean, tail], -1), beta, g_mean


def topk_log_abs_tail(cat_s, x, alpha_tail, opts):
    """(log|alpha_tail|, its sign). Forward KL toward a tail the student nearly lacks has
    alpha_tail = sum_{c != tail} Q_c - Q_tail P_S(others) / P_S(tail) far beyond float64's
    range (a student tail of e^-10000) while p_v alpha_tail is not: its log is formed from
    the logs of the two terms."""
    if opts.divergence != Divergence.FORWARD_KL:
        return alpha_tail.abs().log(), torch.sign(alpha_tail)
    log_q = x - logsumexp_or_empty(x).unsqueeze(-1)
    log_a = logsumexp_or_empty(log_q[:, :-1])
    log_r = log_q[:, -1] + logsumexp_or_empty(cat_s[:, :-1]) - cat_s[:, -1]
    big, small = torch.maximum(log_a, log_r), torch.minimum(log_a, log_r)
    log_abs = torch.where(big == NEG_INF, big, big + log1mexp(small - big))
    sign = torch.where(log_r > log_a, -1.0, 1.0).to(log_abs.dtype)
    none = cat_s[:, -1] == NEG_INF  # no tail: alpha 0
    return torch.where(none, NEG_INF, log_abs), torch.where(none, 0.0, sign).to(log_abs.dtype)


def topk_category_grads(cat_s, tlp, ttl, present, own, a, b, opts: RowOptions):
    """The backward's O(k) terms from the student's categories ``cat_s`` (R, K + 2), the
    teacher's top-k and the row's bridge coefficients ``a``, ``b`` (R, 1): tau times the
    gradient at the slots and at y's own category (R, K + 1), and the tail's coefficient as
    (log |.|, sign) (R,) each (:func:`topk_log_abs_tail`)."""
    k = tlp.shape[-1]
    cat_t = topk_teacher_categories(tlp, ttl, present, own, opts.tail_floor)
    x = bridge_logits(cat_s, cat_t, a, b)
    alpha, beta, _ = topk_grad_coefficients(cat_s, x, logsumexp_or_empty(x).unsqueeze(-1), opts)
    values = _xmul(cat_s[:, :k + 1].exp(), alpha[:, :k + 1]) + beta[:, :k + 1]
    return (values,) + topk_log_abs_tail(cat_s, x, alpha[:, -1], opts)


def topk_scatter_grad(lp_s, log_tail, sign_tail, cols, values, opts: RowOptions):
    """The gradient (R, V): p_S times the tail's coefficient (given as its log |.| and sign,
    (R, 1) each: :func:`topk_log_abs_tail`) everywhere, then ``values`` (R, J) (tau times
    the gradient) at ``cols`` (R, J), whose entries equal to V are written nowhere."""
    n, vocab = lp_s.shape
    grad = torch.empty(n, vocab + 1, dtype=lp_s.dtype, device=lp_s.device)  # (column V: a
    tail = sign_tail * (lp_s + log_tail).exp()                              # spare to write)
    grad[:, :vocab] = torch.where(lp_s == NEG_INF, torch.zeros_like(tail), tail)  # (0 log 0)
    grad.scatter_(-1, cols, values)
    return grad[:, :vocab] / opts.temperature


# The top-k reference computes in float64 whatever the inputs' dtype: a student tail far
# below its row's mass (p_S of a token 100 nats below the max) and the gradient there (p_v
# times a coefficient of the order of 1 / P_S(tail)) underflow and overflow float32, and the
# teacher's tail 1 - sum of its top-k cancels in float32. Its tables are in the inputs' dtype.
TOPK_DTYPE = torch.float64


def _topk_others(tlp, ttl):
    return (tlp,) if ttl is None else (tlp, ttl)


def topk_rows(student, ids, tlp, ttl, tokens, sign, opts: RowOptions) -> torch.Tensor:
    """Per-row table (N, WIDTH["topk"]) for logits ``student`` (..., V), the teacher's top-k
    ``ids`` and ``tlp`` (N, K) and optionally its lp_T(y) ``ttl`` (N,)."""
    student = _as_rows(student)
    n, vocab = student.shape
    check_tokens(tokens, vocab, ignore_index=opts.ignore_index)
    check_topk_ids(ids, tokens, vocab, opts.ignore_index)
    cdt = TOPK_DTYPE
    out = torch.zeros(n, C.WIDTH["topk"], dtype=_compute_dtype(student, *_topk_others(tlp, ttl)),
                      device=student.device)
    columns = {**C.SHARED, **C.FAMILY["topk"]}
    for sl in _chunks(n, vocab):
        r = topk_terms(student[sl].to(cdt), ids[sl], tlp[sl].to(cdt),
                       None if ttl is None else ttl[sl].to(cdt), tokens[sl],
                       None if sign is None else sign[sl].to(cdt), opts)
        for name, col in columns.items():
            out[sl, col] = r[name]
    return out


def topk_rows_backward(grad_rows, student, ids, tlp, ttl, tokens, rows, opts: RowOptions):
    """d loss / d student logits, shaped like ``student``, from the table's A and B."""
    shape = student.shape
    student = _as_rows(student)
    n, vocab = student.shape
    cdt = TOPK_DTYPE
    grad = torch.empty(student.shape, dtype=student.dtype, device=student.device)
    valid = tokens != opts.ignore_index
    for sl in _chunks(n, vocab):
        lp_s = log_softmax(student[sl].to(cdt), opts.temperature)
        t_sl = None if ttl is None else ttl[sl].to(cdt)
        present, own, _ = topk_membership(ids[sl], tokens[sl], ttl is not None,
                                          opts.ignore_index)
        cat_s = topk_student_categories(lp_s, ids[sl], tokens[sl], present, own)
        values, log_tail, sign_tail = topk_category_grads(
            cat_s, tlp[sl].to(cdt), t_sl, present, own, rows[sl, C.A, None].to(cdt),
            rows[sl, C.B, None].to(cdt), opts)
        cols = torch.cat([torch.where(present, ids[sl], vocab),
                          torch.where(own, tokens[sl], vocab).unsqueeze(-1)], -1)
        g = topk_scatter_grad(lp_s, log_tail[:, None], sign_tail[:, None], cols, values, opts)
        g = g * grad_rows[sl].to(cdt).unsqueeze(-1)
        grad[sl] = torch.where(valid[sl].unsqueeze(-1), g, torch.zeros_like(g)).to(student.dtype)
    return grad.view(shape)
