"""The losses of hidden states and LM heads, whose logits never exist in full.

``fused_linear_gated_opd_loss(h_S, W_S, h_T, W_T, tokens, ...)`` equals
``gated_opd_loss(head_S(h_S), head_T(h_T), tokens, ...)`` (docs/math.md) with
``head(h) = softcap(scale * (h @ W.T + b))``, but walks over chunks of rows:
per chunk it forms both models' logits with one matrix product each, runs a
loss family's row ops on them (the same custom ops as the logits path) and
drops them. At most one chunk of logits (and, with gradients, one chunk of
their gradient) exists at a time. :class:`_FusedLinear` takes the family's
teacher side as a function of the chunk, so another family (a teacher given by
its top-k) reuses it as is.

Gradients (to the student's hidden state, weight and bias; the teacher gets
none) are computed in the forward when the reduction is "mean" or "sum": the
incoming gradient is then a scalar, so backward only scales the stored
gradients by it (in float32, rounded once), on the device, without reading it
on the host. That makes forward + backward four matrix products per chunk,
the minimum. With ``reduction="none"`` the incoming gradient differs per
position and the weight gradient cannot be scaled afterwards: backward
recomputes the logits chunk by chunk (six products per chunk). float16 inputs
(products, hidden state, weight or bias) recompute too: their gradients formed at unit scale would underflow, and a
loss scaler's factor (65536 at first) would overflow them afterwards.

Dtypes, as trainers run it: the products run in the autocast dtype when
``torch.autocast`` is on for the device (float64 inputs excepted, as autocast
leaves them), else in the promoted dtype of the hidden state, the weight and the
bias (float32 master weights beside bfloat16 activations compute in float32
then). The head's scale and softcap apply to
the product in that dtype, as the models do. Each gradient comes back in its
input's dtype: the weight gradient is accumulated over the chunks in the
weight's dtype (one rounding per chunk), the bias gradient in float32 (float64
for float64 inputs).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from . import _dispatch
from . import _rows
from . import api as _api
from . import autograd as _ops
from ._options import LossOptions

# default rows per chunk: about this many logits per model per chunk
CHUNK_LOGITS = 1 << 26


@dataclass(frozen=True)
class Head:
    """An LM head's logits: ``softcap(scale * (h @ weight.T + bias))``, softcap
    ``z -> c tanh(z / c)`` (Gemma-2/3 ``final_logit_softcapping``; Cohere's
    ``logit_scale`` and Granite's ``1 / logits_scaling`` are the scale)."""

    weight: Tensor           # in the products' dtype (cast once, as autocast casts it)
    bias: Optional[Tensor]   # likewise
    scale: float
    softcap: Optional[float]

    @classmethod
    def of(cls, weight, bias, scale, softcap, dtype) -> "Head":
        return cls(weight.to(dtype), None if bias is None else bias.to(dtype), scale, softcap)

    @property
    def dtype(self) -> torch.dtype:
        """The products' dtype."""
        return self.weight.dtype

    def logits(self, h: Tensor) -> Tensor:
        h = h.to(self.dtype)
        z = torch.mm(h, self.weight.t()) if self.bias is None else \
            torch.addmm(self.bias, h, self.weight.t())
        if self.scale != 1.0:
            z.mul_(self.scale)
        if self.softcap is not None:
            z.div_(self.softcap).tanh_().mul_(self.softcap)
        return z

    def raw_grad(self, dz: Tensor, z: Tensor) -> Tensor:
        """d loss / d (h @ W.T + b) from d loss / d logits, in the products' dtype."""
        if self.scale == 1.0 and self.softcap is None:
            return dz.to(self.dtype)
        acc = torch.promote_types(dz.dtype, torch.float32)  # float32 at least, float64 kept
        g = dz.to(acc) * self.scale
        if self.softcap is not None:  # d/du c tanh(u / c) = 1 - tanh^2 = 1 - (z / c)^2
            g.mul_(1.0 - (z.to(acc) / self.softcap).square())
        return g.to(self.dtype)


def _chunk_rows(n: int, vocab: int, chunk_size: Optional[int]) -> int:
    if chunk_size is not None:
        return chunk_size
    return max(1, min(n, CHUNK_LOGITS // max(vocab, 1)))


def _product_dtype(device: torch.device, *tensors: Optional[Tensor]) -> torch.dtype:
    """The autocast dtype where autocast would cast the product (it leaves float64 alone),
    else the inputs' promoted dtype."""
    dtype = tensors[0].dtype
    for x in tensors[1:]:
        if x is not None:
            dtype = torch.promote_types(dtype, x.dtype)
    if torch.is_autocast_enabled(device.type) and dtype != torch.float64:
        return torch.get_autocast_dtype(device.type)
    return dtype


class _FusedLinear(torch.autograd.Function):
    """(h_S, W_S, b_S) -> (loss, per-row table) for one loss family.

    ``teacher(sl)`` gives the family's teacher tensors for the rows ``sl`` (the teacher's
    logits chunk, for the logits family).
    """

    @staticmethod
    def forward(ctx, hs, ws, bs, head, family, teacher, rows, options, backend, chunk,
                grad_enabled):
        o = options.rows
        n = hs.shape[0]
        # under no_grad / inference_mode no gradient is computed, whatever requires_grad says
        need = ctx.needs_input_grad[:3] if grad_enabled else (False, False, False)
        # float16 gradients formed at unit scale would underflow (and overflow once a loss
        # scaler multiplies them): a float16 product or gradient always recomputes with the
        # incoming gradient
        half = torch.float16 in (head.dtype, hs.dtype, ws.dtype, None if bs is None else bs.dtype)
        store = any(need) and options.reduction != "none" and not half
        tdt = _ops._table_dtype(backend, hs, ws)  # float32, or float64 on the torch backend
        # d loss / d row loss per unit incoming gradient, as api.reduce_loss forms the loss
        coef = _api.row_coefficients(rows, options.reduction, o.ignore_index, tdt)
        grads = _grad_buffers(need, hs, ws, bs) if store else None
        tables = []
        with torch.autocast(hs.device.type, enabled=False):
            for a in range(0, n, chunk):
                sl = slice(a, min(n, a + chunk))
                zs = head.logits(hs[sl])
                t = teacher(sl)
                if store:
                    table, dz = _ops.rows_grad(family, zs, t, rows.tokens[sl], _sl(rows.sign, sl),
                                               coef[sl].contiguous(), o, backend)
                    del t
                    _accumulate(head.raw_grad(dz, zs), hs[sl], head, sl, *grads)
                    del zs, dz  # before the next chunk's logits exist
                else:
                    table = _ops.rows(family, zs, t, rows.tokens[sl], _sl(rows.sign, sl), o,
                                      backend)
                    del zs, t
                tables.append(table)
        width = _rows.WIDTH[family]
        table = torch.cat(tables) if tables else hs.new_zeros((0, width), dtype=tdt)
        loss = _api.reduce_loss(table, rows, options.reduction, o.ignore_index)
        ctx.mark_non_differentiable(table)
        ctx.store = store
        ctx.reduction = options.reduction
        ctx.consumed = False
        ctx.grad_enabled = grad_enabled
        ctx.bias_dtype = None if bs is None else bs.dtype
        if store:
            ctx.save_for_backward(*grads)
        elif any(need):
            ctx.args = (head, family, teacher, rows, options, backend, chunk)
            ctx.save_for_backward(hs, ws, bs, coef, table)
        return loss, table

    @staticmethod
    def backward(ctx, grad_loss, _grad_table):
        need = ctx.needs_input_grad[:3]
        if not any(need) or not ctx.grad_enabled:
            return (None,) * 11
        if ctx.store:
            if ctx.consumed:
                raise RuntimeError(
                    "fused_linear loss: backward ran twice through the same graph; the "
                    "gradients are computed in the forward and scaled in place once. Call the "
                    "loss again, or use reduction='none' and reduce it yourself.")
            ctx.consumed = True
            if torch.is_grad_enabled():
                _api.raise_no_graph_of_gradient(
                    f"the fused_linear loss with reduction={ctx.reduction!r}",
                    "the losses are not twice differentiable")
            out = [None if x is None else _scale_(x, grad_loss) for x in ctx.saved_tensors]
            if out[2] is not None:
                out[2] = out[2].to(ctx.bias_dtype)
        else:
            out = _recompute_grads(ctx, grad_loss, need)
        return tuple(out) + (None,) * 8


def _sl(x: Optional[Tensor], sl: slice) -> Optional[Tensor]:
    return None if x is None else x[sl]


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


def _accumulate(dz: Tensor, hs_c: Tensor, head: Head, sl: slice, gh, gw, gb) -> None:
    """Add one chunk's gradient of the raw product, dz (R, V) in the products' dtype, to the
    hidden, weight and bias gradients (each in its input's dtype)."""
    if gh is not None:
        if gh.dtype == head.dtype:
            torch.mm(dz, head.weight, out=gh[sl])
        else:
            gh[sl] = torch.mm(dz, head.weight)
    if gw is not None:
        hc = hs_c.to(head.dtype)
        if gw.dtype == head.dtype:
            gw.addmm_(dz.t(), hc)
        else:  # float32 master weights beside 16-bit products
            gw.add_(torch.mm(dz.t(), hc))
    if gb is not None:
        gb += dz.sum(0, dtype=gb.dtype)


def _recompute_grads(ctx, grad_loss, need):
    head, family, teacher, rows, options, backend, chunk = ctx.args
    hs, ws, bs, coef, table = ctx.saved_tensors
    # a scalar incoming gradient ("mean", "sum") or one per position ("none")
    g_rows = coef * grad_loss.reshape(-1).to(coef.dtype)
    gh, gw, gb = _grad_buffers(need, hs, ws, bs)
    n = hs.shape[0]
    with torch.autocast(hs.device.type, enabled=False):
        for a in range(0, n, chunk):
            sl = slice(a, min(n, a + chunk))
            zs = head.logits(hs[sl])
            dz = _ops.rows_backward(family, g_rows[sl].contiguous(), zs, teacher(sl),
                                    rows.tokens[sl], table[sl], options.rows, backend)
            _accumulate(head.raw_grad(dz, zs), hs[sl], head, sl, gh, gw, gb)
            del zs, dz
    if gb is not None:
        gb = gb.to(bs.dtype)
    return [gh, gw, gb]


# ---------------------------------------------------------------------------
# validation and the public functions

def check_head(prefix: str, hidden, weight, bias, device, scale, softcap) -> Tuple[float,
                                                                                   Optional[float]]:
    """Check one model's hidden state, LM head and head options; (scale, softcap)."""
    for name, x in ((f"{prefix}_hidden", hidden), (f"{prefix}_weight", weight)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor (float32, bfloat16, "
                            f"float16 or float64), got {x.dtype}")
        _api.check_device(name, x, device, "student_hidden")
    if hidden.dim() < 1 or hidden.shape[-1] < 1:
        raise ValueError(f"{prefix}_hidden: expected shape (..., H) with H >= 1, got "
                         f"{tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[0] < 1 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{prefix}_weight: expected shape (V, {hidden.shape[-1]}) (vocabulary "
                         f"by {prefix}_hidden's last dimension) with V >= 1, got "
                         f"{tuple(weight.shape)}")
    if bias is not None:
        name = f"{prefix}_bias"
        if not isinstance(bias, Tensor):
            raise TypeError(f"{name}: expected None or a torch.Tensor, got "
                            f"{type(bias).__name__}")
        if not bias.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got {bias.dtype}")
        if bias.shape != weight.shape[:1]:
            raise ValueError(f"{name}: expected shape ({weight.shape[0]},), got "
                             f"{tuple(bias.shape)}")
        _api.check_device(name, bias, device, "student_hidden")
    scale = _api._check_number(f"{prefix}_logit_scale", scale)
    if scale == 0:
        raise ValueError(f"{prefix}_logit_scale: expected a nonzero number, got 0.0")
    if softcap is not None:
        softcap = _api._check_number(f"{prefix}_softcap", softcap, positive=True)
    return scale, softcap


def _no_process_group(process_group) -> None:
    if process_group is not None:
        raise NotImplementedError(
            "process_group: the vocabulary-parallel fused-linear loss is not implemented; "
            "form each rank's logits shard and call gated_opd_loss(..., process_group=)")


def _check_chunk(chunk_size) -> None:
    if chunk_size is not None and (isinstance(chunk_size, bool)
                                   or not isinstance(chunk_size, numbers.Integral)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size: expected None or an int >= 1, got {chunk_size!r}")


def fused_linear_loss(family: str, student_hidden: Tensor, student_weight: Tensor,
                      student_bias, teacher, tokens, verifier, weights, num_items_in_batch,
                      options: LossOptions, *, chunk_size, scale, softcap, vocab_dtype):
    """The fused-linear form of a family's loss, validated up to the teacher side.

    ``teacher(sl)`` gives the family's teacher tensors for rows ``sl`` of the flattened
    positions; ``vocab_dtype`` is the dtype the teacher side brings (its products'), for the
    backend choice, or None where it brings none (a top-k teacher's O(rows k) log-probabilities
    come in the products' precision).
    """
    device = student_hidden.device
    lead = student_hidden.shape[:-1]
    vocab = student_weight.shape[0]
    rows = _api.check_rows(student_hidden, tokens, verifier, weights, num_items_in_batch,
                           options, of="student_hidden", lead=lead)
    dtype = _product_dtype(device, student_hidden, student_weight, student_bias)
    backend = _dispatch.resolve(options.backend, device,
                                dtype if vocab_dtype is None
                                else torch.promote_types(dtype, vocab_dtype), family=family,
                                divergence=options.rows.divergence,
                                dtype_of="the hidden states and heads (their products)")
    head = Head.of(student_weight, student_bias, scale, softcap, dtype)
    hs = student_hidden.reshape(-1, student_hidden.shape[-1])
    chunk = _chunk_rows(hs.shape[0], vocab, chunk_size)
    loss, table = _FusedLinear.apply(hs, student_weight, student_bias, head, family, teacher,
                                     rows, options, backend, chunk, torch.is_grad_enabled())
    return _api.finish(loss, table, rows, options)


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
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_softcap: Optional[float] = None,
    teacher_softcap: Optional[float] = None,
    beta: float = 0.0,
    extrapolation: float = 1.8,
    interpolation: float = 1.0,
    divergence: str = "reverse_kl",
    jsd_beta: float = 0.5,
    temperature: float = 1.0,
    teacher_temperature: Optional[float] = None,
    ignore_index: int = -100,
    weights: Optional[Tensor] = None,
    reduction: str = "mean",
    num_items_in_batch=None,
    return_stats: bool = False,
    process_group=None,
    backend: str = "auto",
) -> Union[Tensor, Tuple[Tensor, "_api.OPDStats"]]:
    """:func:`gated_opd_loss` of the two models' LM-head logits, one chunk of rows at a time.

    Each model's logits are ``softcap(scale * (hidden @ weight.T + bias))`` with softcap
    ``z -> c tanh(z / c)``: pass ``*_logit_scale`` (Cohere's ``logit_scale``; Granite's
    ``1 / logits_scaling``) and ``*_softcap`` (Gemma-2/3's ``final_logit_softcapping``)
    as the model's config gives them, or the loss differs from the model's own logits.

    Args:
        student_hidden: (..., H) the student's last hidden states.
        student_weight: (V, H) its LM head; ``student_bias`` (V,) optional.
        teacher_hidden: (..., H_T) with the same leading shape.
        teacher_weight: (V_T, H_T), V_T >= V; only its first V rows are used (like a padded
            teacher's logits). ``teacher_bias`` (V_T,) optional. The teacher gets no gradient.
        tokens, verifier: as in :func:`gated_opd_loss`, shaped like the hidden states
            without their last dimension.
        chunk_size: rows per chunk (default: about 2^26 / V rows). The peak extra memory is
            about three chunks of logits (student, teacher, gradient) plus the gradients.
        Other keywords: as in :func:`gated_opd_loss`. It runs under ``torch.autocast``
        (the products in the autocast dtype) and with float32 master weights beside 16-bit
        hidden states.

    Returns:
        The float32 loss, and :class:`OPDStats` when ``return_stats`` is True. Gradients flow
        to ``student_hidden``, ``student_weight`` and ``student_bias``, each in its dtype.
    """
    _no_process_group(process_group)
    options = _api.loss_options(
        beta=beta, extrapolation=extrapolation, interpolation=interpolation,
        divergence=divergence, jsd_beta=jsd_beta, temperature=temperature,
        teacher_temperature=teacher_temperature, ignore_index=ignore_index,
        reduction=reduction, return_stats=return_stats, backend=backend)
    if not isinstance(student_hidden, Tensor):
        raise TypeError(f"student_hidden: expected a torch.Tensor, got "
                        f"{type(student_hidden).__name__}")
    device = student_hidden.device
    s_scale, s_cap = check_head("student", student_hidden, student_weight, student_bias, device,
                                student_logit_scale, student_softcap)
    t_scale, t_cap = check_head("teacher", teacher_hidden, teacher_weight, teacher_bias, device,
                                teacher_logit_scale, teacher_softcap)
    lead = student_hidden.shape[:-1]
    if teacher_hidden.shape[:-1] != lead:
        raise ValueError(f"teacher_hidden: expected leading shape {tuple(lead)} like "
                         f"student_hidden, got {tuple(teacher_hidden.shape)}")
    vocab = student_weight.shape[0]
    if teacher_weight.shape[0] < vocab:
        raise ValueError(f"teacher_weight: vocabulary V_T={teacher_weight.shape[0]} is smaller "
                         f"than the student's V={vocab}; V_T >= V is needed")
    _check_chunk(chunk_size)
    ht = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])
    wt = teacher_weight.detach()[:vocab]
    bt = None if teacher_bias is None else teacher_bias.detach()[:vocab]
    t_head = Head.of(wt, bt, t_scale, t_cap, _product_dtype(device, ht, wt, bt))
    return fused_linear_loss(
        "logits", student_hidden, student_weight, student_bias,
        lambda sl: (t_head.logits(ht[sl]),), tokens, verifier, weights, num_items_in_batch,
        options, chunk_size=chunk_size, scale=s_scale, softcap=s_cap,
        vocab_dtype=t_head.dtype)


def fused_linear_topk_opd_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_topk_ids: Tensor,
    teacher_topk_logprobs: Tensor,
    tokens: Tensor,
    verifier: Optional[Tensor] = None,
    *,
    student_bias: Optional[Tensor] = None,
    chunk_size: Optional[int] = None,
    student_logit_scale: float = 1.0,
    student_softcap: Optional[float] = None,
    teacher_token_logprobs: Optional[Tensor] = None,
    tail_floor: float = 1e-7,
    beta: float = 0.0,
    extrapolation: float = 1.8,
    interpolation: float = 1.0,
    divergence: str = "reverse_kl",
    jsd_beta: float = 0.5,
    temperature: float = 1.0,
    teacher_temperature: Optional[float] = None,
    ignore_index: int = -100,
    weights: Optional[Tensor] = None,
    reduction: str = "mean",
    num_items_in_batch=None,
    return_stats: bool = False,
    process_group=None,
    backend: str = "auto",
) -> Union[Tensor, Tuple[Tensor, "_api.OPDStats"]]:
    """:func:`~sgopd_kernels.topk_opd_loss` of the student's LM-head logits, one chunk of rows
    at a time: the student's logits ``softcap(scale * (hidden @ weight.T + bias))`` never exist
    in full, and the teacher is its top-k (``teacher_topk_ids``, ``teacher_topk_logprobs``
    shaped like the hidden states' leading dimensions plus ``(k,)``).

    The head options, chunking, dtypes and the gradients (to ``student_hidden``,
    ``student_weight`` and ``student_bias``) are those of
    :func:`fused_linear_gated_opd_loss`; the other keywords those of
    :func:`~sgopd_kernels.topk_opd_loss`.
    """
    _api.refuse_teacher_temperature(teacher_temperature)
    _no_process_group(process_group)
    options = _api.loss_options(
        beta=beta, extrapolation=extrapolation, interpolation=interpolation,
        divergence=divergence, jsd_beta=jsd_beta, temperature=temperature,
        ignore_index=ignore_index, tail_floor=tail_floor, reduction=reduction,
        return_stats=return_stats, backend=backend)
    if not isinstance(student_hidden, Tensor):
        raise TypeError(f"student_hidden: expected a torch.Tensor, got "
                        f"{type(student_hidden).__name__}")
    device = student_hidden.device
    scale, cap = check_head("student", student_hidden, student_weight, student_bias, device,
                            student_logit_scale, student_softcap)
    _check_chunk(chunk_size)
    ids, tlp, ttl = _api.topk_teacher_in(
        _product_dtype(device, student_hidden, student_weight, student_bias),
        _api.check_topk_teacher(teacher_topk_ids, teacher_topk_logprobs, teacher_token_logprobs,
                                student_hidden.shape[:-1], device, of="student_hidden"))
    return fused_linear_loss(
        "topk", student_hidden, student_weight, student_bias,
        lambda sl: (ids[sl], tlp[sl], None if ttl is None else ttl[sl]), tokens, verifier,
        weights, num_items_in_batch, options, chunk_size=chunk_size, scale=scale, softcap=cap,
        vocab_dtype=None)
