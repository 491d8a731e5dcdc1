"""The gated OPD loss of hidden states and LM heads, whose logits never exist in full.

``fused_linear_gated_opd_loss(h_S, W_S, h_T, W_T, tokens, ...)`` equals
``gated_opd_loss(h_S @ W_S.T + b_S, h_T @ W_T.T + b_T, tokens, ...)`` (SPEC §6)
but walks over chunks of rows: per chunk it forms both models' logits with one
matrix product each, runs the backend's row kernels on them (the same custom
ops as the logits path) and drops them. At most one chunk of logits (and, with
gradients, one chunk of their gradient) exists at a time.

Gradients (to the student's hidden state, weight and bias; the teacher gets
none) are computed in the forward when the reduction is "mean" or "sum": the
incoming gradient is then a scalar, so backward only scales the stored
gradients by it (in float32, rounded once), on the device, without reading it
on the host. That makes forward + backward four matrix products per chunk,
the minimum. With ``reduction="none"`` the incoming gradient differs per
position and the weight gradient cannot be scaled afterwards: backward
recomputes the logits chunk by chunk (six products per chunk). float16 inputs
recompute too: their gradients formed at unit scale would underflow, and a
loss scaler's factor (65536 at first) would overflow them afterwards.

The weight gradient is accumulated over the chunks in the weight's dtype,
each product added by ``addmm_`` (one rounding per chunk, the matrix product
itself accumulating in float32 for 16-bit inputs on a GPU); the bias gradient
is accumulated in float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import numbers
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from . import _rows as C
from . import api as _api
from . import autograd as _ops

# default rows per chunk: about this many logits per model per chunk
CHUNK_LOGITS = 1 << 26


def _chunk_rows(n: int, vocab: int, chunk_size: Optional[int]) -> int:
    if chunk_size is not None:
        return chunk_size
    return max(1, min(n, CHUNK_LOGITS // max(vocab, 1)))


def _logits(h: Tensor, w: Tensor, b: Optional[Tensor]) -> Tensor:
    return torch.mm(h, w.t()) if b is None else torch.addmm(b, h, w.t())


class _FusedLinear(torch.autograd.Function):
    """(h_S, W_S, b_S, h_T, W_T, b_T) -> (loss, per-row table); see the module docstring."""

    @staticmethod
    def forward(ctx, hs, ws, bs, ht, wt, bt, tok, sign, w, opts):
        (beta, lam_pos, lam_neg, reverse, temperature, ignore_index, backend, reduction,
         lead, chunk, grad_enabled) = opts
        n = hs.shape[0]
        # under no_grad / inference_mode no gradient is computed, whatever requires_grad says
        need = ctx.needs_input_grad[:3] if grad_enabled else (False, False, False)
        # float16 gradients formed at unit scale would underflow (and overflow once a loss
        # scaler multiplies them): float16 always recomputes with the incoming gradient
        store = any(need) and reduction != "none" and hs.dtype != torch.float16
        gh = gw = gb = None
        tdt = _ops._table_dtype(backend, hs, ht)  # float32, or float64 on the torch backend
        # d loss / d row loss per unit incoming gradient, as _api._reduce_loss forms the loss
        valid = tok != ignore_index
        coef = valid.to(tdt) if w is None else \
            torch.where(valid, w.to(tdt), torch.zeros_like(w, dtype=tdt))
        if reduction == "mean":
            coef = coef / valid.sum().clamp(min=1).to(tdt)
        if store:
            gh, gw, gb = _grad_buffers(need, hs, ws, bs)
        tables = []
        for a in range(0, n, chunk):
            sl = slice(a, min(n, a + chunk))
            zs = _logits(hs[sl], ws, bs)
            zt = _logits(ht[sl], wt, bt)
            s_sl = None if sign is None else sign[sl]
            rows = _ops.opd_rows(zs, zt, tok[sl], s_sl, beta, lam_pos, lam_neg, reverse,
                                 temperature, ignore_index, backend)
            tables.append(rows)
            if store:
                dz = _ops.opd_rows_backward(coef[sl].contiguous(), zs, zt,
                                            tok[sl], rows, reverse, temperature, ignore_index,
                                            backend)
                del zs, zt
                _accumulate(dz, hs[sl], ws, sl, gh, gw, gb)
                del dz  # before the next chunk's logits exist
            else:
                del zs, zt
        rows = torch.cat(tables) if tables else \
            hs.new_zeros((0, C.ROW_K), dtype=tdt)
        loss = _api._reduce_loss(rows, tok, w, lead, ignore_index, reduction)
        ctx.mark_non_differentiable(rows)
        ctx.store = store
        ctx.consumed = False
        ctx.opts = opts
        ctx.bias_dtype = None if bs is None else bs.dtype
        if store:
            ctx.save_for_backward(gh, gw, gb)
        elif any(need):
            ctx.save_for_backward(hs, ws, bs, ht, wt, bt, tok, coef, rows)
        return loss, rows

    @staticmethod
    def backward(ctx, grad_loss, _grad_rows):
        need = ctx.needs_input_grad[:3]
        if not any(need) or not ctx.opts[-1]:
            return (None,) * 10
        if ctx.store:
            if ctx.consumed:
                raise RuntimeError(
                    "fused_linear_gated_opd_loss: backward ran twice through the same graph; "
                    "the gradients are computed in the forward and scaled in place once. Call "
                    "the loss again, or use reduction='none' and reduce it yourself.")
            ctx.consumed = True
            gh, gw, gb = ctx.saved_tensors
            out = [None if x is None else _scale_(x, grad_loss) for x in (gh, gw, gb)]
            if out[2] is not None:
                out[2] = out[2].to(ctx.bias_dtype)
        else:
            out = _recompute_grads(ctx, grad_loss, need)
        return tuple(out) + (None,) * 7


def _scale_(x: Tensor, g: Tensor, rows: int = 4096) -> Tensor:
    """x *= g in place, the product in float32 (at least) and rounded once; for a 16-bit x
    a block of rows at a time, so no float32 copy of x exists."""
    if x.element_size() >= 4:
        return x.mul_(g.to(x.dtype))
    g = g.to(torch.float32)
    flat = x.view(x.shape[0], -1) if x.dim() else x.view(1)
    for a in range(0, flat.shape[0], rows):
        flat[a:a + rows] = flat[a:a + rows].float() * g
    return x


def _grad_buffers(need, hs, ws, bs):
    gh = torch.empty_like(hs) if need[0] else None
    gw = torch.zeros_like(ws) if need[1] else None
    # the bias gradient sums over every row: float32 at least
    acc = torch.promote_types(bs.dtype, torch.float32) if bs is not None else None
    gb = torch.zeros(bs.shape, dtype=acc, device=bs.device) if need[2] else None
    return gh, gw, gb


def _accumulate(dz: Tensor, hs_c: Tensor, ws: Tensor, sl: slice, gh, gw, gb) -> None:
    """Add one chunk's logits gradient dz (R, V) to the hidden, weight and bias gradients."""
    if gh is not None:
        torch.mm(dz, ws, out=gh[sl])
    if gw is not None:
        gw.addmm_(dz.t(), hs_c)
    if gb is not None:
        gb += dz.sum(0, dtype=gb.dtype)


def _recompute_grads(ctx, grad_loss, need):
    (_beta, _lp, _ln, reverse, temperature, ignore_index, backend, _red, _lead,
     chunk, _grad_enabled) = ctx.opts
    hs, ws, bs, ht, wt, bt, tok, coef, rows = ctx.saved_tensors
    # a scalar incoming gradient ("mean", "sum") or one per position ("none")
    g_rows = coef * grad_loss.reshape(-1).to(coef.dtype)
    gh, gw, gb = _grad_buffers(need, hs, ws, bs)
    n = hs.shape[0]
    for a in range(0, n, chunk):
        sl = slice(a, min(n, a + chunk))
        zs = _logits(hs[sl], ws, bs)
        zt = _logits(ht[sl], wt, bt)
        dz = _ops.opd_rows_backward(g_rows[sl].contiguous(), zs, zt, tok[sl], rows[sl],
                                    reverse, temperature, ignore_index, backend)
        del zs, zt
        _accumulate(dz, hs[sl], ws, sl, gh, gw, gb)
        del dz
    if gb is not None:
        gb = gb.to(bs.dtype)
    return [gh, gw, gb]


# ---------------------------------------------------------------------------
# validation and the public function

def _check_pair(prefix: str, hidden, weight, bias, device) -> None:
    for name, x in ((f"{prefix}_hidden", hidden), (f"{prefix}_weight", weight)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor (float32, bfloat16, "
                            f"float16 or float64), got {x.dtype}")
        if x.device != device:
            raise ValueError(f"{name}: is on {x.device} but student_hidden is on {device}; "
                             "all tensors must be on one device")
    if hidden.dim() < 1 or hidden.shape[-1] < 1:
        raise ValueError(f"{prefix}_hidden: expected shape (..., H) with H >= 1, got "
                         f"{tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[0] < 1 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{prefix}_weight: expected shape (V, {hidden.shape[-1]}) (vocabulary "
                         f"by {prefix}_hidden's last dimension) with V >= 1, got "
                         f"{tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{prefix}_weight: dtype {weight.dtype} differs from {prefix}_hidden's "
                        f"{hidden.dtype}; cast one of them (the product runs in one dtype)")
    if bias is None:
        return
    name = f"{prefix}_bias"
    if not isinstance(bias, Tensor):
        raise TypeError(f"{name}: expected None or a torch.Tensor, got {type(bias).__name__}")
    if bias.shape != weight.shape[:1]:
        raise ValueError(f"{name}: expected shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if bias.dtype != weight.dtype:
        raise TypeError(f"{name}: dtype {bias.dtype} differs from {prefix}_weight's "
                        f"{weight.dtype}")
    if bias.device != device:
        raise ValueError(f"{name}: is on {bias.device} but student_hidden is on {device}; "
                         "all tensors must be on one device")


def fused_linear_gated_opd_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    tokens: Tensor,
    verifier: Optional[Tensor] = None,
    *,
    student_bias: Optional[Tensor] = None,
    teacher_bias: Optional[Tensor] = None,
    chunk_size: Optional[int] = None,
    beta: float = 0.0,
    extrapolation: float = 1.8,
    interpolation: float = 1.0,
    divergence: str = "reverse_kl",
    temperature: float = 1.0,
    ignore_index: int = -100,
    weights: Optional[Tensor] = None,
    reduction: str = "mean",
    return_stats: bool = False,
    process_group=None,
    backend: str = "auto",
) -> Union[Tensor, Tuple[Tensor, "_api.OPDStats"]]:
    """:func:`gated_opd_loss` of ``student_hidden @ student_weight.T (+ student_bias)`` and
    ``teacher_hidden @ teacher_weight.T (+ teacher_bias)``, one chunk of rows at a time.

    Args:
        student_hidden: (..., H) the student's last hidden states.
        student_weight: (V, H) its LM head, same dtype; ``student_bias`` (V,) optional.
        teacher_hidden: (..., H_T) with the same leading shape.
        teacher_weight: (V_T, H_T), V_T >= V; only its first V rows are used (like a padded
            teacher's logits). ``teacher_bias`` (V_T,) optional. The teacher gets no gradient.
        tokens, verifier: as in :func:`gated_opd_loss`, shaped like the hidden states
            without their last dimension.
        chunk_size: rows per chunk (default: about 2^26 / V rows). The peak extra memory is
            about three chunks of logits (student, teacher, gradient) plus the gradients.
        Other keywords: as in :func:`gated_opd_loss`.

    Returns:
        The float32 loss, and :class:`OPDStats` when ``return_stats`` is True. Gradients flow
        to ``student_hidden``, ``student_weight`` and ``student_bias``.
    """
    if not isinstance(student_hidden, Tensor):
        raise TypeError(f"student_hidden: expected a torch.Tensor, got "
                        f"{type(student_hidden).__name__}")
    device = student_hidden.device
    _check_pair("student", student_hidden, student_weight, student_bias, device)
    _check_pair("teacher", teacher_hidden, teacher_weight, teacher_bias, device)
    lead = student_hidden.shape[:-1]
    if teacher_hidden.shape[:-1] != lead:
        raise ValueError(f"teacher_hidden: expected leading shape {tuple(lead)} like "
                         f"student_hidden, got {tuple(teacher_hidden.shape)}")
    vocab = student_weight.shape[0]
    if teacher_weight.shape[0] < vocab:
        raise ValueError(f"teacher_weight: vocabulary V_T={teacher_weight.shape[0]} is smaller "
                         f"than the student's V={vocab}; V_T >= V is needed")
    if chunk_size is not None and (isinstance(chunk_size, bool)
                                   or not isinstance(chunk_size, numbers.Integral)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size: expected None or an int >= 1, got {chunk_size!r}")
    if process_group is not None:
        raise NotImplementedError(
            "process_group: the vocabulary-parallel fused-linear loss is not implemented; "
            "form each rank's logits shard and call gated_opd_loss(..., process_group=)")
    # the row arguments are checked as the logits path checks them (a (lead, V) stand-in)
    stand_in = torch.empty((), device=device, dtype=student_hidden.dtype).expand(*lead, vocab)
    lead, tok, sign, w, lam_pos, lam_neg, temperature, ignore_index = _api._common(
        stand_in, tokens, verifier, weights, extrapolation, interpolation, temperature,
        ignore_index, reduction, return_stats, process_group)
    beta = _api._check_number("beta", beta, nonnegative=True)
    _api._check_choice("divergence", divergence, _api.DIVERGENCES)
    name = _api.resolve_backend(backend, device,
                                torch.promote_types(student_hidden.dtype, teacher_hidden.dtype))

    hs = student_hidden.reshape(-1, student_hidden.shape[-1])
    ht = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])
    wt = teacher_weight.detach()[:vocab]
    bt = None if teacher_bias is None else teacher_bias.detach()[:vocab]
    chunk = _chunk_rows(hs.shape[0], vocab, chunk_size)
    opts = (beta, lam_pos, lam_neg, divergence == "reverse_kl", temperature, ignore_index, name,
            reduction, tuple(lead), chunk, torch.is_grad_enabled())
    loss, rows = _FusedLinear.apply(hs, student_weight, student_bias, ht, wt, bt, tok, sign, w,
                                    opts)
    loss = loss.to(torch.float32)
    if not return_stats:
        return loss
    return loss, _api._stats(rows, tok, ignore_index)
