"""Public functions: argument checks, broadcasting, backend choice, reductions.

Data flows one way: the public call validates every argument once, into a
frozen :class:`~sgopd_kernels._options.LossOptions` and per-row tensors,
before any kernel runs; :mod:`sgopd_kernels._dispatch` picks the backend; the
custom op of :mod:`sgopd_kernels.autograd` (or, with ``process_group``, the
vocabulary-parallel path of :mod:`sgopd_kernels.parallel`) returns the
per-row table, which is reduced here with O(rows) PyTorch that never syncs
the host. The formulas are in docs/math.md.
"""

from __future__ import annotations

import math
import numbers
import os
import sys
import warnings
from typing import NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor

from . import _dispatch
from . import _rows as C
from . import autograd as _ops
from ._options import Divergence, LossOptions, RowOptions

BACKENDS = _dispatch.BACKENDS
DIVERGENCES = Divergence.labels()
REDUCTIONS = ("mean", "sum", "none")


class OPDStats(NamedTuple):
    """Statistics of one loss call, float32 scalars on the logits' device.

    All are unweighted means over the unmasked positions (0 when there are none).

    - ``consistent_frac``: fraction where the gate extrapolates (g > 0).
    - ``conflict_frac``: fraction where it interpolates (g < 0).
    - ``mean_delta``: mean of delta = lp_T(y) - lp_S(y).
    - ``teacher_kl``: mean KL(p_S || p_T) to the unbridged teacher, whatever the
      divergence trained (for the sampled estimator: the single-sample estimate
      mean(lp_S(y) - lp_T(y))).
    - ``student_entropy``: mean entropy of p_S.
    - ``divergence``: mean of the per-position divergence the loss trains (the
      ``divergence`` option, toward the bridged target; for the sampled estimator its
      per-position loss -A lp_S(y)). With no verifier and ``beta=0`` it is the plain
      KL (or JSD) to the teacher in the direction trained.
    """

    consistent_frac: Tensor
    conflict_frac: Tensor
    mean_delta: Tensor
    teacher_kl: Tensor
    student_entropy: Tensor
    divergence: Tensor


def resolve_backend(backend: str = "auto", device: Union[Tensor, torch.device, str, None] = None,
                    dtype: Optional[torch.dtype] = None, *, family: str = "logits",
                    parallel: bool = False, divergence: str = "reverse_kl") -> str:
    """The backend that a loss call with these arguments runs.

    ``device``/``dtype`` describe the logits (a tensor may be passed as
    ``device``); ``family`` is "logits" (:func:`gated_opd_loss`,
    :func:`~sgopd_kernels.fused_linear_gated_opd_loss`), "sampled"
    (:func:`sampled_opd_loss`) or "topk" (:func:`topk_opd_loss`,
    :func:`~sgopd_kernels.fused_linear_topk_opd_loss`); ``parallel`` means a
    ``process_group`` is set.
    ``"auto"`` picks, for CUDA tensors, the compiled CUDA kernels when built,
    else Triton (for "topk": Triton first, then the compiled CUDA kernels); for CPU tensors the compiled CPU kernels when built, else
    the torch reference; float64 always runs the torch reference. A named
    backend that cannot run here raises (RuntimeError; NotImplementedError for
    a loss or mode it does not implement; TypeError for a dtype it does not take).
    """
    return _dispatch.resolve(backend, device, dtype, family=family, parallel=parallel,
                             divergence=Divergence.parse(divergence))


# ---------------------------------------------------------------------------
# validation of the options

def _check_number(name: str, value, *, positive: bool = False, nonnegative: bool = False,
                  below_one: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value}")
    if positive and not value > 0:
        raise ValueError(f"{name}: expected a value > 0, got {value}")
    if nonnegative and not value >= 0:
        raise ValueError(f"{name}: expected a value >= 0, got {value}")
    if below_one and not 0 < value < 1:
        raise ValueError(f"{name}: expected a value in (0, 1), got {value}")
    return value


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {choices}, got {value!r}")


def _check_process_group(group) -> None:
    if group is None:
        return
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("process_group: torch.distributed is not initialized; call "
                           "torch.distributed.init_process_group first, or pass None")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"process_group: expected None or a torch.distributed.ProcessGroup, got "
                        f"{type(group).__name__}")


def row_options(*, beta=0.0, extrapolation=1.8, interpolation=1.0, divergence="reverse_kl",
                jsd_beta=0.5, temperature=1.0, teacher_temperature=None,
                ignore_index=-100, tail_floor=1e-7) -> RowOptions:
    """The validated :class:`RowOptions` of the public keywords (errors name the keyword)."""
    temperature = _check_number("temperature", temperature, positive=True)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")
    tail_floor = _check_number("tail_floor", tail_floor)
    if not 0 <= tail_floor < 1:
        raise ValueError(f"tail_floor: expected a value in [0, 1), got {tail_floor}")
    return RowOptions(
        divergence=Divergence.parse(divergence),
        beta=_check_number("beta", beta, nonnegative=True),
        lam_pos=_check_number("extrapolation", extrapolation, positive=True),
        lam_neg=_check_number("interpolation", interpolation, positive=True),
        jsd_beta=_check_number("jsd_beta", jsd_beta, below_one=True),
        temperature=temperature,
        teacher_temperature=temperature if teacher_temperature is None else
        _check_number("teacher_temperature", teacher_temperature, positive=True),
        ignore_index=int(ignore_index),
        tail_floor=tail_floor,
    )


def loss_options(*, reduction="mean", return_stats=False, backend="auto", process_group=None,
                 **row_keywords) -> LossOptions:
    """The validated :class:`LossOptions` of a call's keyword options."""
    rows = row_options(**row_keywords)
    _check_choice("reduction", reduction, REDUCTIONS)
    if not isinstance(return_stats, bool):
        raise TypeError(f"return_stats: expected a bool, got {type(return_stats).__name__}")
    _check_choice("backend", backend, BACKENDS)
    _check_process_group(process_group)
    return LossOptions(rows=rows, reduction=reduction, return_stats=return_stats,
                       backend=backend, process_group=process_group)


# ---------------------------------------------------------------------------
# validation of the tensors

def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def check_logits(name: str, x) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor (float32, bfloat16, float16 or "
                        f"float64), got {_dtype_name(x.dtype)}")
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"{name}: expected shape (..., V) with V >= 1, got {tuple(x.shape)}")


def check_device(name: str, x: Tensor, device: torch.device, of: str = "student_logits") -> None:
    if x.device != device:
        raise ValueError(f"{name}: is on {x.device} but {of} is on {device}; "
                         "all tensors must be on one device")


def _check_tokens(tokens, lead: torch.Size, device: torch.device, of: str) -> Tensor:
    if not isinstance(tokens, Tensor):
        raise TypeError(f"tokens: expected a torch.Tensor, got {type(tokens).__name__}")
    if tokens.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"tokens: expected an integer tensor of token ids, got "
                        f"{_dtype_name(tokens.dtype)}")
    if tokens.shape != lead:
        raise ValueError(f"tokens: expected shape {tuple(lead)} (the shape of {of} without its "
                         f"last dimension), got {tuple(tokens.shape)}")
    check_device("tokens", tokens, device, of)
    return tokens.reshape(-1).to(torch.int64).contiguous()


def _broadcast_rows(name: str, x: Tensor, lead: torch.Size) -> Tensor:
    """Per sequence (a prefix of the leading shape) or per position, to (N,).

    Fewer dimensions than the leading shape must be a prefix of it, read from the left
    ((B,) for (B, T): per sequence); a (T,) tensor is refused rather than silently read per
    time step (or per sequence when B == T). With all the dimensions, size-1 ones broadcast.
    """
    shape = tuple(x.shape)
    if x.dim() < len(lead) and shape == tuple(lead[: x.dim()]):
        x = x.reshape(shape + (1,) * (len(lead) - x.dim()))
    if x.dim() == len(lead):
        try:
            return torch.broadcast_to(x, lead).reshape(-1)
        except RuntimeError:
            pass
    raise ValueError(
        f"{name}: shape {shape} fits neither per sequence (a prefix of {tuple(lead)}, such as "
        f"{tuple(lead[:1])}) nor per position ({tuple(lead)}, size-1 dimensions broadcast)")


_VERIFIER_CHECKED = False


def _warn_if_rewards(v: Tensor) -> None:
    """Float rewards passed as a verifier read wrongly: warn.

    A float verifier is a tensor of signed advantages: its sign is the verdict and 0 is
    neutral. Rewards in [0, 1] are not: 0/1 rewards read 0 as 'neutral', and non-negative
    rewards such as [0.2, 0.9, 0.4] read every sequence as 'correct'. It warns for a float
    verifier whose values are all >= 0 and not all equal. The check reads
    values, which syncs the host for a CUDA tensor: it runs on every CPU tensor, on the
    first CUDA tensor of the process only, and never while compiling or capturing a CUDA
    graph.
    """
    global _VERIFIER_CHECKED
    if v.is_cuda:
        if _VERIFIER_CHECKED or torch.compiler.is_compiling() \
                or torch.cuda.is_current_stream_capturing():
            return
        _VERIFIER_CHECKED = True
    elif torch.compiler.is_compiling():
        return
    v = v.detach()
    # signed advantages have both signs; a constant tensor (all correct, all neutral) reads
    # as meant
    if v.numel() < 2 or not bool((v >= 0).all()) or bool((v == v.reshape(-1)[0]).all()):
        return
    if bool(((v == 0) | (v == 1)).all()):
        what = ("a float tensor of only 0s and 1s reads as signed advantages, so 0 means "
                "'neutral' (no gate), not 'wrong'")
    else:
        what = ("a float tensor with no negative value reads as signed advantages, so every "
                "positive reward means 'correct' (and 0 'neutral'); rewards need centring")
    warnings.warn(
        f"verifier: {what}. For binary verdicts pass a bool tensor (rewards > 0.5); for "
        "advantages pass centred values (e.g. rewards minus the group mean).", UserWarning,
        stacklevel=_caller_level())


def _caller_level() -> int:
    """The ``stacklevel`` of the first frame outside this package (and outside
    ``nn.Module.__call__``): a warning points at the caller's line, whichever public function
    or module it came through."""
    skip = (os.path.dirname(os.path.abspath(__file__)),
            os.path.abspath(torch.nn.modules.module.__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(skip):
        frame, level = frame.f_back, level + 1
    return level


def _verifier_sign(verifier, lead: torch.Size, device: torch.device) -> Optional[Tensor]:
    if verifier is None:
        return None
    if not isinstance(verifier, Tensor):
        raise TypeError(f"verifier: expected None or a torch.Tensor, got {type(verifier).__name__}")
    check_device("verifier", verifier, device)
    if verifier.dtype == torch.bool:
        sign = verifier.to(torch.float32) * 2 - 1
    elif verifier.is_floating_point():
        _warn_if_rewards(verifier)
        v = verifier.detach()  # the sign before any cast: a tiny float64 advantage keeps it
        sign = torch.where(torch.isnan(v), v, torch.sign(v)).to(torch.float32)  # NaN stays NaN
    else:
        raise TypeError(f"verifier: expected a bool tensor (verdicts) or a floating tensor "
                        f"(signed advantages), got {_dtype_name(verifier.dtype)}; integer 0/1 "
                        "rewards would read 0 as neutral, pass rewards.bool() for verdicts")
    return _broadcast_rows("verifier", sign, lead).contiguous()


def _weights_rows(weights, lead: torch.Size, device: torch.device) -> Optional[Tensor]:
    if weights is None:
        return None
    if not isinstance(weights, Tensor):
        raise TypeError(f"weights: expected None or a torch.Tensor, got {type(weights).__name__}")
    if not weights.is_floating_point():
        raise TypeError(f"weights: expected a floating tensor, got {_dtype_name(weights.dtype)}")
    check_device("weights", weights, device)
    w = weights.detach()
    return _broadcast_rows("weights", w if w.dtype == torch.float64 else w.float(), lead)


def _count(num_items_in_batch, reduction: str, device: torch.device):
    """The caller's global token count for "mean" (a number or a tensor), or None."""
    if num_items_in_batch is None:
        return None
    if reduction != "mean":
        raise ValueError(f"num_items_in_batch: divides the summed loss, so it goes with "
                         f"reduction='mean' (the default), got reduction={reduction!r}")
    if isinstance(num_items_in_batch, Tensor):
        if num_items_in_batch.numel() != 1:
            raise ValueError(f"num_items_in_batch: expected one count (a number or a "
                             f"one-element tensor), got shape "
                             f"{tuple(num_items_in_batch.shape)}")
        if num_items_in_batch.dtype == torch.bool or num_items_in_batch.is_complex():
            raise TypeError(f"num_items_in_batch: expected a real count, got "
                            f"{_dtype_name(num_items_in_batch.dtype)}")
        if num_items_in_batch.device != device and num_items_in_batch.device.type != "cpu":
            check_device("num_items_in_batch", num_items_in_batch, device)
        return num_items_in_batch.detach().reshape(()).to(device, non_blocking=True)
    count = _check_number("num_items_in_batch", num_items_in_batch, nonnegative=True)
    return count if count > 0 else 1.0  # a count of 0: nothing anywhere, the loss is 0


class Rows(NamedTuple):
    """The per-row tensors of a call, validated: (N,) each, N = prod(lead)."""

    lead: tuple
    tokens: Tensor            # int64 ids, ignore_index where masked
    sign: Optional[Tensor]    # float32 verdicts +-1 / 0 / NaN, or None
    weights: Optional[Tensor]  # float32 (float64 kept), or None
    count: object             # None (the local count), a float or a 0-d tensor


def check_rows(logits_like: Tensor, tokens, verifier, weights, num_items_in_batch,
               options: LossOptions, *, of: str = "student_logits",
               lead: Optional[torch.Size] = None) -> Rows:
    """Validate the per-row arguments against the leading shape of ``logits_like``."""
    lead = logits_like.shape[:-1] if lead is None else lead
    device = logits_like.device
    tok = _check_tokens(tokens, lead, device, of)
    return Rows(tuple(lead), tok, _verifier_sign(verifier, lead, device),
                _weights_rows(weights, lead, device),
                _count(num_items_in_batch, options.reduction, device))


# ---------------------------------------------------------------------------
# reductions

def row_coefficients(rows: Rows, reduction: str, ignore_index: int, dtype) -> Tensor:
    """d loss / d (row r's divergence) for a unit incoming gradient: valid_r * w_r, divided by
    the count for "mean" (the caller's ``num_items_in_batch`` or the unmasked positions)."""
    valid = rows.tokens != ignore_index
    coef = valid.to(dtype) if rows.weights is None else \
        torch.where(valid, rows.weights.to(dtype), torch.zeros((), dtype=dtype,
                                                                device=valid.device))
    if reduction == "mean":
        coef = coef / _denominator(rows, valid, dtype)
    return coef


def _denominator(rows: Rows, valid: Tensor, dtype):
    """The count "mean" divides by: a device tensor, or the caller's number (a Python float:
    dividing by it copies nothing to the device, so nothing waits on the host)."""
    if rows.count is None:
        return valid.sum().clamp(min=1).to(dtype)
    if isinstance(rows.count, Tensor):  # a global count of 0 (nothing anywhere) gives 0, not NaN
        count = rows.count.to(dtype)
        return torch.where(count == 0, torch.ones_like(count), count)
    return rows.count


def reduce_loss(table: Tensor, rows: Rows, reduction: str, ignore_index: int) -> Tensor:
    """The loss from the table's loss column, in the table's dtype (float32 or float64)."""
    valid = rows.tokens != ignore_index
    loss_rows = table[:, C.LOSS]
    if rows.weights is not None:
        loss_rows = torch.where(valid, loss_rows * rows.weights.to(table.dtype),
                                torch.zeros_like(loss_rows))
    if reduction == "none":
        return loss_rows.reshape(rows.lead)
    if reduction == "sum":
        return loss_rows.sum()
    return loss_rows.sum() / _denominator(rows, valid, table.dtype)


def statistics(table: Tensor, tokens: Tensor, ignore_index: int) -> OPDStats:
    """Means over the unmasked positions of the table's shared columns (float32)."""
    valid = tokens != ignore_index
    table = table.detach().to(torch.float32)
    count = valid.sum().clamp(min=1).to(torch.float32)
    gate = table[:, C.GATE]
    v = valid.to(torch.float32)
    return OPDStats(
        consistent_frac=((gate > 0).to(torch.float32) * v).sum() / count,
        conflict_frac=((gate < 0).to(torch.float32) * v).sum() / count,
        mean_delta=table[:, C.DELTA].sum() / count,
        teacher_kl=table[:, C.TEACHER_KL].sum() / count,
        student_entropy=table[:, C.ENTROPY].sum() / count,
        divergence=table[:, C.LOSS].sum() / count,
    )


def finish(loss: Tensor, table: Tensor, rows: Rows, options: LossOptions):
    """The float32 loss, and the statistics when asked for."""
    loss = loss.to(torch.float32)
    if not options.return_stats:
        return loss
    return loss, statistics(table, rows.tokens, options.rows.ignore_index)


def raise_no_graph_of_gradient(what: str, instead: str) -> None:
    """A gradient written in forward has no graph: refuse create_graph=True rather than give
    a second derivative of zero."""
    raise RuntimeError(f"sgopd_kernels: {what} writes the loss's gradient in forward, so it has "
                       "no graph for a second derivative (backward with create_graph=True); "
                       f"{instead}")


class _StoredGradient(torch.autograd.Function):
    """A backend that writes the gradient in forward: backward only scales it by the incoming
    gradient (a scalar for "mean"/"sum", one per position for "none") on the device."""

    @staticmethod
    def forward(ctx, student, need_grad, family, teacher, rows, coef, options, backend):
        o = options.rows
        if need_grad:
            table, grad = _ops.rows_grad(family, student, teacher, rows.tokens, rows.sign, coef,
                                         o, backend)
        else:  # evaluation: the forward alone
            table, grad = _ops.rows(family, student, teacher, rows.tokens, rows.sign, o,
                                    backend), None
        loss = reduce_loss(table, rows, options.reduction, o.ignore_index)
        ctx.mark_non_differentiable(table)
        ctx.save_for_backward(grad)
        ctx.lead = rows.lead if options.reduction == "none" else None
        ctx.backend = backend
        ctx.used = False
        return loss, table

    @staticmethod
    def backward(ctx, grad_loss, _grad_table):
        if ctx.used:
            raise RuntimeError("backward ran twice through a loss whose gradient was written in "
                               "forward (and is scaled in place); compute the loss again for a "
                               "second backward")
        ctx.used = True
        (grad,) = ctx.saved_tensors
        if grad is None:
            return (None,) * 8
        if torch.is_grad_enabled():
            raise_no_graph_of_gradient(f"backend={ctx.backend!r}",
                                       "the losses are not twice differentiable on any backend")
        g = grad_loss if ctx.lead is None else grad_loss.reshape(ctx.lead + (1,))
        _ops.scale_grad_(grad, g.to(torch.float32), ctx.backend)
        return (grad,) + (None,) * 7


def _family_loss(family: str, student: Tensor, teacher: tuple, rows: Rows,
                 options: LossOptions, backend: str):
    """The reduced loss and the table of one family on one device."""
    o = options.rows
    # float16 gradients written at the reduction's scale would underflow before a loss
    # scaler multiplies them (and overflow after): float16 recomputes with the incoming one
    if not _dispatch.stores_grad(backend) or student.dtype == torch.float16:
        table = _ops.rows(family, student, teacher, rows.tokens, rows.sign, o, backend)
        return reduce_loss(table, rows, options.reduction, o.ignore_index), table
    coef = row_coefficients(rows, options.reduction, o.ignore_index, torch.float32)
    need = student.requires_grad and torch.is_grad_enabled()
    return _StoredGradient.apply(student, need, family, teacher, rows, coef, options, backend)


def run_family(family: str, student: Tensor, teacher: tuple, rows: Rows, options: LossOptions,
               dtype: torch.dtype, dtype_of: str = "student_logits"):
    """Dispatch one family's loss (single device or vocabulary parallel) and reduce it;
    ``dtype`` is the inputs' promoted dtype, ``dtype_of`` the argument that brings it."""
    parallel = options.process_group is not None
    backend = _dispatch.resolve(options.backend, student.device, dtype, family=family,
                                parallel=parallel, divergence=options.rows.divergence,
                                dtype_of=dtype_of)
    if parallel:
        from . import parallel as _parallel

        table = _parallel.rows(family, student, teacher, rows.tokens, rows.sign, options.rows,
                               options.process_group, backend)
        loss = reduce_loss(table, rows, options.reduction, options.rows.ignore_index)
    else:
        loss, table = _family_loss(family, student, teacher, rows, options, backend)
    return finish(loss, table, rows, options)


# ---------------------------------------------------------------------------
# public losses

def _check_teacher_logits(teacher_logits, student_logits: Tensor) -> None:
    check_logits("teacher_logits", teacher_logits)
    lead, vocab = student_logits.shape[:-1], student_logits.shape[-1]
    if teacher_logits.shape[:-1] != lead:
        hint = ""
        if teacher_logits.shape == lead:
            hint = (": that is the shape of per-token log-probabilities; for a teacher that "
                    "gives only the sampled token's log-probability use sampled_opd_loss("
                    "student_logits, teacher_logprobs, tokens)")
        raise ValueError(f"teacher_logits: expected the teacher's logits, shape "
                         f"{tuple(lead) + ('V_T',)} with V_T >= {vocab} (the leading shape of "
                         f"student_logits and a vocabulary), got {tuple(teacher_logits.shape)}"
                         + hint)
    if teacher_logits.shape[-1] < vocab:
        raise ValueError(f"teacher_logits: vocabulary V_T={teacher_logits.shape[-1]} is smaller "
                         f"than the student's V={vocab}; V_T >= V is needed")
    check_device("teacher_logits", teacher_logits, student_logits.device)


def _gated(student_logits, teacher_logits, tokens, verifier, weights, num_items_in_batch,
           options: LossOptions):
    check_logits("student_logits", student_logits)
    rows = check_rows(student_logits, tokens, verifier, weights, num_items_in_batch, options)
    _check_teacher_logits(teacher_logits, student_logits)
    dtype = torch.promote_types(student_logits.dtype, teacher_logits.dtype)
    dtype_of = "student_logits" if student_logits.dtype == dtype else "teacher_logits"
    return run_family("logits", student_logits, (teacher_logits.detach(),), rows, options, dtype,
                      dtype_of)


def gated_opd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    tokens: Tensor,
    verifier: Optional[Tensor] = None,
    *,
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
) -> Union[Tensor, Tuple[Tensor, OPDStats]]:
    """Sign-gated on-policy distillation loss toward the Veto/G-OPD bridge target.

    Per position, with lambda chosen by the gate g = sign(lp_T(y) - lp_S(y)) * sigma
    (``extrapolation`` where g > 0, ``interpolation`` where g < 0, 1 otherwise)::

        log q = log_softmax(lambda * lp_T + (1 - lambda + beta) * sg(lp_S))
        reverse_kl: KL(p_S || q)        forward_kl: KL(q || p_S)
        jsd: pi KL(q || m) + (1 - pi) KL(p_S || m),  m = (1 - pi) p_S + pi q,  pi = jsd_beta

    (docs/math.md has the gradients and every edge case.)

    Args:
        student_logits: (..., V) float32/bfloat16/float16/float64, any strides.
            The only input that receives a gradient (same dtype and shape).
        teacher_logits: (..., V_T) with V_T >= V; columns V.. are ignored.
        tokens: (...) integer ids of the sampled next tokens; ``ignore_index``
            masks a position.
        verifier: None (no gate), a bool tensor of verdicts (True correct) or
            a float tensor of signed advantages (sign taken, 0 neutral), per
            sequence (a prefix of the leading shape) or per position.
        beta: Veto's bridge exponent, >= 0.
        extrapolation, interpolation: lambda+ and lambda-, > 0.
        divergence: ``"reverse_kl"``, ``"forward_kl"`` or ``"jsd"`` (TRL's and Liger's
            generalized Jensen-Shannon divergence with ``jsd_beta`` = TRL's ``beta``,
            in (0, 1)).
        temperature: > 0, divides the student's logits, and the teacher's unless
            ``teacher_temperature`` (> 0) is given.
        weights: optional per-position (or per-sequence) multipliers of the loss (detached).
        reduction: ``"mean"`` over unmasked positions, ``"sum"`` or ``"none"``.
        num_items_in_batch: with ``"mean"``, divide the weighted sum by this count instead
            of this call's unmasked positions: a number, or a one-element tensor (read on
            the device, no host sync), e.g. Hugging Face's ``num_items_in_batch``, the count
            over every micro-batch of a gradient-accumulation step and every data-parallel
            rank. A count of 0 gives a loss of 0.
        return_stats: also return :class:`OPDStats`.
        process_group: a ``torch.distributed`` group over which the vocabulary is sharded
            (docs/math.md, "Vocabulary parallel"): each rank passes its shard of equal
            width, columns ``[rank * V, (rank + 1) * V)`` of the global vocabulary, and
            global ``tokens``; every rank gets the same loss and the gradient of its shard.
        backend: ``"auto"``, ``"cuda"``, ``"triton"``, ``"cpu"`` or ``"torch"``
            (:func:`resolve_backend`).

    Returns:
        The float32 loss (a scalar, or shaped like ``tokens`` for "none"), and
        the statistics when ``return_stats`` is True.
    """
    options = loss_options(
        beta=beta, extrapolation=extrapolation, interpolation=interpolation,
        divergence=divergence, jsd_beta=jsd_beta, temperature=temperature,
        teacher_temperature=teacher_temperature, ignore_index=ignore_index,
        reduction=reduction, return_stats=return_stats, process_group=process_group,
        backend=backend)
    return _gated(student_logits, teacher_logits, tokens, verifier, weights, num_items_in_batch,
                  options)


def sampled_opd_loss(
    student_logits: Tensor,
    teacher_logprobs: Tensor,
    tokens: Tensor,
    verifier: Optional[Tensor] = None,
    *,
    extrapolation: float = 1.8,
    interpolation: float = 1.0,
    temperature: float = 1.0,
    ignore_index: int = -100,
    weights: Optional[Tensor] = None,
    reduction: str = "mean",
    num_items_in_batch=None,
    return_stats: bool = False,
    process_group=None,
    backend: str = "auto",
) -> Union[Tensor, Tuple[Tensor, OPDStats]]:
    """Sampled-token OPD estimator for a teacher that returns only lp_T(y).

    Per position: ``A = lambda * delta`` (detached, delta = teacher_logprob -
    lp_S(y), the same gate as :func:`gated_opd_loss`) and ``loss = -A *
    lp_S(y)``. Its expectation over y ~ p_S is the reverse-KL gradient toward the
    lambda-bridge. ``teacher_logprobs`` (shaped like ``tokens``) are used as
    given: compute them at the temperature the teacher sampled with. Other
    arguments as in :func:`gated_opd_loss`.
    """
    options = loss_options(extrapolation=extrapolation, interpolation=interpolation,
                           temperature=temperature, ignore_index=ignore_index,
                           reduction=reduction, return_stats=return_stats,
                           process_group=process_group, backend=backend)
    check_logits("student_logits", student_logits)
    rows = check_rows(student_logits, tokens, verifier, weights, num_items_in_batch, options)
    if not isinstance(teacher_logprobs, Tensor) or not teacher_logprobs.is_floating_point():
        raise TypeError("teacher_logprobs: expected a floating tensor of log-probabilities, got "
                        f"{getattr(teacher_logprobs, 'dtype', type(teacher_logprobs).__name__)}")
    if teacher_logprobs.shape != student_logits.shape[:-1]:
        raise ValueError(f"teacher_logprobs: expected shape {rows.lead} (like tokens: one "
                         f"log-probability per position), got {tuple(teacher_logprobs.shape)}")
    check_device("teacher_logprobs", teacher_logprobs, student_logits.device)
    tlp = teacher_logprobs.detach().reshape(-1).contiguous()
    return run_family("sampled", student_logits, (tlp,), rows, options, student_logits.dtype)


# ---------------------------------------------------------------------------
# a teacher given by its top-k (an inference engine)

INTEGER_IDS = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)


def refuse_teacher_temperature(teacher_temperature) -> None:
    if teacher_temperature is not None:
        raise ValueError(
            "teacher_temperature: a top-k teacher's log-probabilities come at the temperature "
            "the engine scored them with, and no other temperature can be applied to them: "
            "that would need the teacher's whole distribution (the tail bucket's mass does not "
            "say how it spreads). Set the temperature in the engine's sampling parameters and "
            "pass teacher_temperature=None; temperature= scales the student only")


def check_topk_teacher(ids, logprobs, token_logprobs, lead: tuple, device: torch.device,
                       of: str = "student_logits") -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """The teacher's top-k tensors of one call, validated: (ids (N, K) int64, log-probabilities
    (N, K), lp_T(y) (N,) or None), detached and contiguous."""
    shape = tuple(lead) + ("k",)
    if not isinstance(ids, Tensor):
        raise TypeError(f"teacher_topk_ids: expected a torch.Tensor, got {type(ids).__name__}")
    if ids.dtype not in INTEGER_IDS:
        raise TypeError(f"teacher_topk_ids: expected an integer tensor of token ids, got "
                        f"{_dtype_name(ids.dtype)}")
    if ids.dim() != len(lead) + 1 or tuple(ids.shape[:-1]) != tuple(lead) or ids.shape[-1] < 1:
        raise ValueError(f"teacher_topk_ids: expected shape {shape} with k >= 1 (the shape of "
                         f"tokens, then one slot per top-k entry), got {tuple(ids.shape)}")
    check_device("teacher_topk_ids", ids, device, of)
    if not isinstance(logprobs, Tensor) or not logprobs.is_floating_point():
        raise TypeError("teacher_topk_logprobs: expected a floating tensor of log-probabilities, "
                        f"got {getattr(logprobs, 'dtype', type(logprobs).__name__)}")
    if logprobs.shape != ids.shape:
        raise ValueError(f"teacher_topk_logprobs: expected shape {tuple(ids.shape)}, the shape of "
                         f"teacher_topk_ids, got {tuple(logprobs.shape)}")
    check_device("teacher_topk_logprobs", logprobs, device, of)
    k = ids.shape[-1]
    ttl = None
    if token_logprobs is not None:
        if not isinstance(token_logprobs, Tensor) or not token_logprobs.is_floating_point():
            raise TypeError("teacher_token_logprobs: expected None or a floating tensor of "
                            "log-probabilities, got "
                            f"{getattr(token_logprobs, 'dtype', type(token_logprobs).__name__)}")
        if tuple(token_logprobs.shape) != tuple(lead):
            raise ValueError(f"teacher_token_logprobs: expected shape {tuple(lead)} (like tokens: "
                             f"lp_T of each sampled token), got {tuple(token_logprobs.shape)}")
        check_device("teacher_token_logprobs", token_logprobs, device, of)
        ttl = token_logprobs.detach().reshape(-1).contiguous()
    return (ids.detach().reshape(-1, k).to(torch.int64).contiguous(),
            logprobs.detach().reshape(-1, k).contiguous(), ttl)


def topk_teacher_in(dtype: torch.dtype, teacher: tuple) -> tuple:
    """The top-k teacher (ids, logprobs, token logprobs) with its log-probabilities in float32,
    or float64 beside a float64 student. The student's dtype alone chooses the backend: the
    teacher side is O(rows k), and a float64 engine output must not send bfloat16 logits to
    the float64 reference."""
    want = torch.float64 if dtype == torch.float64 else torch.float32
    ids, lp, ttl = teacher
    return ids, lp.to(want), None if ttl is None else ttl.to(want)


def topk_opd_loss(
    student_logits: Tensor,
    teacher_topk_ids: Tensor,
    teacher_topk_logprobs: Tensor,
    tokens: Tensor,
    verifier: Optional[Tensor] = None,
    *,
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
) -> Union[Tensor, Tuple[Tensor, OPDStats]]:
    """:func:`gated_opd_loss` for a teacher that returns only its top-k log-probabilities.

    An inference engine (vLLM, SGLang) or a stored run gives, per position, the teacher's
    k most likely token ids and their log-probabilities. The loss coarsens both models to
    the categories: each of the k ids, the sampled token ``y`` on its own when
    ``teacher_token_logprobs`` is given and ``y`` is not among the ids, and one tail bucket
    holding every other token::

        P_T(e) = exp(lp_T(e)), P_T(tail) = max(1 - sum_e P_T(e), tail_floor)
        P_S(e) = p_S(e),       P_S(tail) = sum of p_S over the tokens outside the categories

    and applies the gate, the bridge and the divergence of :func:`gated_opd_loss` to them
    (docs/math.md, "A teacher that returns its top-k"). The student's tail is the exact sum
    over the tokens outside (never 1 - sum). Each divergence is at most its full-vocabulary
    value (data processing) and equals it when the ids cover the vocabulary.

    Args:
        student_logits: (..., V) float32/bfloat16/float16/float64, any strides; the only
            input that receives a gradient.
        teacher_topk_ids: (..., k) integer token ids, in [0, V) (global ids with
            ``process_group``), distinct within a position; a negative id marks an unused
            slot (its log-probability is not read).
        teacher_topk_logprobs: (..., k) floating, the teacher's log-probabilities of those
            ids, normalized over its whole vocabulary (as engines return them); -inf allowed.
        tokens, verifier: as in :func:`gated_opd_loss`.
        teacher_token_logprobs: optional (...) lp_T(y) of each sampled token (engines return
            it beside the top-k): ``y`` then has its own category when it is not among the
            ids (where it is, the top-k's value is used).
        tail_floor: in [0, 1), the least mass of the teacher's tail (default 1e-7, TRL's
            convention): a top-k whose mass rounds to 1 does not make every student tail
            infinitely wrong. 0 keeps the tail's mass as it is (0 then masks the tail).
        temperature: > 0, divides the student's logits only. The teacher's log-probabilities
            come at the engine's sampling temperature and are used as given.
        teacher_temperature: must stay None. Re-tempering top-k log-probabilities needs the
            teacher's whole distribution (how the tail's mass spreads), so it cannot be done
            exactly and is refused (ValueError): set the temperature in the engine.
        Other keywords: as in :func:`gated_opd_loss`; ``process_group`` shards the student's
        vocabulary (the ids stay global).

    Returns:
        The float32 loss, and :class:`OPDStats` when ``return_stats`` is True: ``teacher_kl``
        is KL(P_S || P_T) over the categories, ``student_entropy`` the student's entropy over
        the whole vocabulary.
    """
    refuse_teacher_temperature(teacher_temperature)
    options = loss_options(
        beta=beta, extrapolation=extrapolation, interpolation=interpolation,
        divergence=divergence, jsd_beta=jsd_beta, temperature=temperature,
        ignore_index=ignore_index, tail_floor=tail_floor, reduction=reduction,
        return_stats=return_stats, process_group=process_group, backend=backend)
    check_logits("student_logits", student_logits)
    rows = check_rows(student_logits, tokens, verifier, weights, num_items_in_batch, options)
    teacher = check_topk_teacher(teacher_topk_ids, teacher_topk_logprobs, teacher_token_logprobs,
                                 rows.lead, student_logits.device)
    return run_family("topk", student_logits, topk_teacher_in(student_logits.dtype, teacher),
                      rows, options, student_logits.dtype)


class GatedOPDLoss(torch.nn.Module):
    """``gated_opd_loss`` as a module holding its (validated) keyword options.

    ``GatedOPDLoss(beta=0.1, divergence="forward_kl")(student_logits,
    teacher_logits, tokens, verifier=None, weights=None, num_items_in_batch=None)``.
    """

    KEYWORDS = ("beta", "extrapolation", "interpolation", "divergence", "jsd_beta",
                "temperature", "teacher_temperature", "ignore_index", "reduction",
                "return_stats", "process_group", "backend")

    def __init__(self, **keywords):
        super().__init__()
        unknown = set(keywords) - set(self.KEYWORDS)
        if unknown:
            raise TypeError(f"GatedOPDLoss: unknown keyword(s) {sorted(unknown)}; expected "
                            f"some of {sorted(self.KEYWORDS)}")
        self.options = loss_options(**keywords)
        self.keywords = dict(keywords)

    def forward(self, student_logits, teacher_logits, tokens, verifier=None, weights=None,
                num_items_in_batch=None):
        return _gated(student_logits, teacher_logits, tokens, verifier, weights,
                      num_items_in_batch, self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.keywords.items())
