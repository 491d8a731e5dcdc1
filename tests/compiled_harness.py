"""The public losses' semantics over the compiled backend, for its tests.

Until the core dispatches to ``sgopd_kernels.compiled`` (a capability-table entry),
the tests run the backend through this small stand-in of the public call: the
verifier's sign per row, weights, the reductions, the statistics, and autograd
in both designs of the gradient:

- ``design="recompute"``: the table is the op's output (like ``autograd.py``), the
  reductions are PyTorch on it, and the backward re-reads the logits;
- ``design="stored"``: the gradient is written in forward with the reduction's
  coefficient per row (weight / count), and the backward only scales it by
  ``grad_output`` on the device (``compiled.scale_grad_``).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from sgopd_kernels import compiled

DIVERGENCE = {"reverse_kl": 0, "forward_kl": 1, "jsd": 2}


def make_opts(*, divergence="reverse_kl", beta=0.0, extrapolation=1.8, interpolation=1.0,
              jsd_beta=0.5, temperature=1.0, teacher_temperature=None, ignore_index=-100):
    return SimpleNamespace(divergence=DIVERGENCE[divergence], beta=float(beta),
                           lam_pos=float(extrapolation), lam_neg=float(interpolation),
                           jsd_beta=float(jsd_beta), temperature=float(temperature),
                           teacher_temperature=None if teacher_temperature is None
                           else float(teacher_temperature), ignore_index=int(ignore_index))


def _per_row(x, lead):
    """A per-sequence (prefix of lead) or per-position tensor as one value per row."""
    if x.dim() < len(lead):
        x = x.reshape(tuple(x.shape) + (1,) * (len(lead) - x.dim()))
    return torch.broadcast_to(x, lead).reshape(-1)


def sign_of(verifier, lead):
    if verifier is None:
        return None
    if verifier.dtype == torch.bool:
        v = verifier.float() * 2 - 1
    else:
        v = torch.where(torch.isnan(verifier), verifier, torch.sign(verifier)).float()
    return _per_row(v, lead).contiguous()


class _Rows(torch.autograd.Function):
    """Recompute design: table out, grad_rows in (the table's loss column)."""

    @staticmethod
    def forward(ctx, student, teacher, tokens, sign, opts, sampled):
        ctx.save_for_backward(student, teacher, tokens)
        ctx.opts, ctx.sampled = opts, sampled
        if sampled:
            table = compiled.sampled_rows(student, teacher, tokens, sign, opts)
        else:
            table = compiled.opd_rows(student, teacher, tokens, sign, opts)
        ctx.table = table
        return table

    @staticmethod
    def backward(ctx, grad_table):
        student, teacher, tokens = ctx.saved_tensors
        gr = grad_table[:, 0].contiguous()
        if ctx.sampled:
            g = compiled.sampled_rows_backward(gr, student, tokens, ctx.table, ctx.opts)
        else:
            g = compiled.opd_rows_backward(gr, student, teacher, tokens, ctx.table, ctx.opts)
        return g, None, None, None, None, None


class _Stored(torch.autograd.Function):
    """Gradient written in forward: the loss out, the stored gradient scaled in backward."""

    @staticmethod
    def forward(ctx, student, teacher, tokens, sign, w, opts, sampled, reduction, lead):
        valid = tokens != opts.ignore_index
        count = valid.sum().clamp(min=1).to(torch.float32)
        wv = torch.ones(tokens.shape, device=tokens.device) if w is None else w
        coef = wv / count if reduction == "mean" else wv
        fn = compiled.sampled_rows_grad if sampled else compiled.opd_rows_grad
        table, grad = fn(student, teacher, tokens, sign, coef, opts)
        loss_rows = torch.where(valid, table[:, 0] * wv, torch.zeros_like(table[:, 0]))
        if reduction == "none":
            loss = loss_rows.reshape(lead)
        elif reduction == "sum":
            loss = loss_rows.sum()
        else:
            loss = loss_rows.sum() / count
        ctx.grad = grad
        ctx.mark_non_differentiable(table)
        return loss, table

    @staticmethod
    def backward(ctx, grad_loss, _grad_table):
        grad = ctx.grad
        if grad is None:
            raise RuntimeError("the stored gradient was already used: a second backward "
                               "through the same loss would scale it twice")
        ctx.grad = None
        return (compiled.scale_grad_(grad, grad_loss.reshape(-1) if grad_loss.dim() else
                                     grad_loss),) + (None,) * 8


def _stats(table, valid):
    count = valid.sum().clamp(min=1).to(torch.float32)
    v = valid.float()
    t = table.detach()
    return SimpleNamespace(consistent_frac=((t[:, 2] > 0).float() * v).sum() / count,
                           conflict_frac=((t[:, 2] < 0).float() * v).sum() / count,
                           mean_delta=t[:, 1].sum() / count,
                           teacher_kl=t[:, 3].sum() / count,
                           student_entropy=t[:, 4].sum() / count)


def _loss(student, other, tokens, verifier, weights, reduction, return_stats, design, opts,
          sampled):
    lead = student.shape[:-1]
    tok = tokens.reshape(-1).long().contiguous()
    sign = sign_of(verifier, lead)
    w = None if weights is None else _per_row(weights.detach().float(), lead).contiguous()
    valid = tok != opts.ignore_index
    if sampled:
        other = other.detach().reshape(-1).float().contiguous()
    if design == "stored" and student.requires_grad and torch.is_grad_enabled():
        loss, table = _Stored.apply(student, other, tok, sign, w, opts, sampled, reduction,
                                    lead)
    else:
        table = _Rows.apply(student, other, tok, sign, opts, sampled)
        loss_rows = table[:, 0]
        if w is not None:
            loss_rows = torch.where(valid, loss_rows * w, torch.zeros_like(loss_rows))
        if reduction == "none":
            loss = loss_rows.reshape(lead)
        elif reduction == "sum":
            loss = loss_rows.sum()
        else:
            loss = loss_rows.sum() / valid.sum().clamp(min=1).to(torch.float32)
    return (loss, _stats(table, valid)) if return_stats else loss


def gated_loss(student, teacher, tokens, verifier=None, *, weights=None, reduction="mean",
               return_stats=False, design="stored", **kw):
    return _loss(student, teacher, tokens, verifier, weights, reduction, return_stats, design,
                 make_opts(**kw), False)


def sampled_loss(student, teacher_logprobs, tokens, verifier=None, *, weights=None,
                 reduction="mean", return_stats=False, design="stored", extrapolation=1.8,
                 interpolation=1.0, temperature=1.0, ignore_index=-100):
    opts = make_opts(extrapolation=extrapolation, interpolation=interpolation,
                     temperature=temperature, ignore_index=ignore_index)
    return _loss(student, teacher_logprobs, tokens, verifier, weights, reduction, return_stats,
                 design, opts, True)
