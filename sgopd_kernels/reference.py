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
from typing import Optional

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


def log_softmax(x: torch.Tensor) -> torch.Tensor:
    """log_softmax over the last dimension; a row that is -inf everywhere stays -inf.

    (torch.log_softmax gives NaN there: -inf - -inf.) Such a row is a distribution with no
    support: it gives every token probability 0, so it never creates NaN by itself.
    """
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
    lp_s = log_softmax(s_logits / opts.temperature)
    lp_t = log_softmax(t_logits / opts.teacher_temperature)
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
    return opd_grad_logprobs(log_softmax(s_logits / opts.temperature),
                             log_softmax(t_logits / opts.teacher_temperature), a.unsqueeze(-1),
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
    lp_s = log_softmax(s_logits / opts.temperature)
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
        p = log_softmax(student[sl].to(cdt) / tau).exp()
        y = torch.where(valid[sl], tokens[sl], torch.zeros_like(tokens[sl]))
        onehot = torch.zeros_like(p).scatter_(-1, y.unsqueeze(-1), 1.0)
        adv = rows[sl, C.ADV].to(cdt).unsqueeze(-1)
        g = -(adv / tau) * (onehot - p) * grad_rows[sl].to(cdt).unsqueeze(-1)
        grad[sl] = torch.where(valid[sl].unsqueeze(-1), g, torch.zeros_like(g)).to(student.dtype)
    return grad.view(shape)
