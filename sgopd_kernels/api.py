"""Public functions: argument checks, broadcasting, backend choice, reductions.

Data flows one way: the public call validates every argument before any
kernel runs, picks a backend (:func:`resolve_backend`), calls the custom op of
:mod:`sgopd_kernels.autograd` (which imports the backend lazily) and reduces
its per-row table with O(rows) PyTorch that never syncs the host.
"""

from __future__ import annotations

import math
import numbers
import os
import warnings
from typing import NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor

from . import _rows as C
from . import autograd as _ops

BACKENDS = ("auto", "cuda", "triton", "torch")
DIVERGENCES = ("reverse_kl", "forward_kl")
REDUCTIONS = ("mean", "sum", "none")


class OPDStats(NamedTuple):
    """Statistics of one loss call, float32 scalars on the logits' device.

    All are means over the unmasked positions (0 when there are none).

    - ``consistent_frac``: fraction where the gate extrapolates (g > 0).
    - ``conflict_frac``: fraction where it interpolates (g < 0).
    - ``mean_delta``: mean of delta = lp_T(y) - lp_S(y).
    - ``teacher_kl``: mean KL(p_S || p_T), unbridged (for the sampled
      estimator: the single-sample estimate mean(lp_S(y) - lp_T(y))).
    - ``student_entropy``: mean entropy of p_S.
    """

    consistent_frac: Tensor
    conflict_frac: Tensor
    mean_delta: Tensor
    teacher_kl: Tensor
    student_entropy: Tensor


# ---------------------------------------------------------------------------
# backend choice

def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend: str = "auto", device: Union[Tensor, torch.device, str, None] = None,
                    dtype: Optional[torch.dtype] = None) -> str:
    """The backend that a loss call with these arguments runs.

    ``device``/``dtype`` describe the logits (a tensor may be passed as
    ``device``). ``"auto"`` picks ``"cuda"`` (compiled kernels) when built,
    else ``"triton"`` for CUDA tensors, and ``"torch"`` for CPU tensors or
    float64 logits. A named backend that cannot run here raises RuntimeError.
    """
    if isinstance(device, Tensor):
        dtype = device.dtype if dtype is None else dtype
        device = device.device
    device = torch.device(device if device is not None else "cpu")
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    from . import cuda as _cuda

    if backend == "auto":
        if device.type != "cuda" or dtype == torch.float64:
            return "torch"
        if _cuda.available():
            return "cuda"
        return "triton" if _triton_importable() else "torch"
    if backend == "cuda":
        if not _cuda.available():
            raise RuntimeError("backend='cuda': the compiled CUDA kernels are not built in this "
                               "installation; use backend='triton' or 'auto'")
        if device.type != "cuda":
            raise RuntimeError(f"backend='cuda' needs CUDA tensors, got tensors on {device}")
    if backend == "triton":
        if not _triton_importable():
            raise RuntimeError("backend='triton': the triton package is not importable")
        if device.type != "cuda" and not _interpreting():
            raise RuntimeError(f"backend='triton' needs CUDA tensors (got tensors on {device}), "
                               "or TRITON_INTERPRET=1 set before triton is imported to run "
                               "the kernels on CPU tensors in the interpreter")
    return backend


# ---------------------------------------------------------------------------
# validation

def _check_logits(name: str, x) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor (float32, bfloat16, float16 or "
                        f"float64), got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"{name}: expected shape (..., V) with V >= 1, got {tuple(x.shape)}")


def _check_number(name: str, value, *, positive: bool = False, nonnegative: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value}")
    if positive and not value > 0:
        raise ValueError(f"{name}: expected a value > 0, got {value}")
    if nonnegative and not value >= 0:
        raise ValueError(f"{name}: expected a value >= 0, got {value}")
    return value


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {choices}, got {value!r}")


def _check_device(name: str, x: Tensor, device: torch.device) -> None:
    if x.device != device:
        raise ValueError(f"{name}: is on {x.device} but student_logits is on {device}; "
                         "all tensors must be on one device")


def _check_tokens(tokens, lead: torch.Size, device: torch.device) -> Tensor:
    if not isinstance(tokens, Tensor):
        raise TypeError(f"tokens: expected a torch.Tensor, got {type(tokens).__name__}")
    if tokens.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"tokens: expected an integer tensor of token ids, got {tokens.dtype}")
    if tokens.shape != lead:
        raise ValueError(f"tokens: expected shape {tuple(lead)} (the logits' shape without the "
                         f"vocabulary), got {tuple(tokens.shape)}")
    _check_device("tokens", tokens, device)
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
    """A float tensor of 0/1 rewards reads 0 as 'neutral': warn.

    The check reads values, which syncs the host for a CUDA tensor: it runs on
    every CPU tensor, on the first CUDA tensor of the process only, and never
    while compiling or capturing a CUDA graph.
    """
    global _VERIFIER_CHECKED
    if v.is_cuda:
        if _VERIFIER_CHECKED or torch.compiler.is_compiling() \
                or torch.cuda.is_current_stream_capturing():
            return
        _VERIFIER_CHECKED = True
    elif torch.compiler.is_compiling():
        return
    if v.numel() and bool(((v == 0) | (v == 1)).all()) and bool((v == 0).any()):
        warnings.warn(
            "verifier: a float tensor of only 0s and 1s reads as signed advantages, so 0 means "
            "'neutral' (no gate), not 'wrong'. For binary verdicts pass a bool tensor "
            "(rewards > 0.5) or signed values (2 * rewards - 1).", UserWarning, stacklevel=4)


def _verifier_sign(verifier, lead: torch.Size, device: torch.device) -> Optional[Tensor]:
    if verifier is None:
        return None
    if not isinstance(verifier, Tensor):
        raise TypeError(f"verifier: expected None or a torch.Tensor, got {type(verifier).__name__}")
    _check_device("verifier", verifier, device)
    if verifier.dtype == torch.bool:
        sign = verifier.to(torch.float32) * 2 - 1
    elif verifier.is_floating_point():
        _warn_if_rewards(verifier)
        v = verifier.detach()  # the sign before any cast: a tiny float64 advantage keeps it
        sign = torch.where(torch.isnan(v), v, torch.sign(v)).to(torch.float32)  # NaN stays NaN
    else:
        raise TypeError(f"verifier: expected a bool tensor (verdicts) or a floating tensor "
                        f"(signed advantages), got {verifier.dtype}; integer 0/1 rewards would "
                        "read 0 as neutral, pass rewards.bool() for verdicts")
    return _broadcast_rows("verifier", sign, lead).contiguous()


def _weights_rows(weights, lead: torch.Size, device: torch.device) -> Optional[Tensor]:
    if weights is None:
        return None
    if not isinstance(weights, Tensor):
        raise TypeError(f"weights: expected None or a torch.Tensor, got {type(weights).__name__}")
    if not weights.is_floating_point():
        raise TypeError(f"weights: expected a floating tensor, got {weights.dtype}")
    _check_device("weights", weights, device)
    w = weights.detach()
    return _broadcast_rows("weights", w if w.dtype == torch.float64 else w.float(), lead)


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


def _parallel_backend(backend: str, device: torch.device, dtype: torch.dtype,
                      kernels: bool) -> str:
    """The path of a vocabulary-parallel loss: "triton" (where ``kernels`` exist) or "torch".

    "auto" takes the Triton kernels for CUDA tensors (float64 inputs excepted), the torch
    path otherwise; ``dtype`` is the inputs' promoted dtype.
    """
    _check_choice("backend", backend, BACKENDS)
    if backend == "torch":
        return "torch"
    if backend == "auto":
        fast = kernels and device.type == "cuda" and dtype != torch.float64
        return "triton" if fast and _triton_importable() else "torch"
    if backend == "triton" and kernels:
        if dtype == torch.float64:
            raise TypeError("student_logits: the Triton backend takes float32, bfloat16 or "
                            "float16 logits, got float64; use backend='torch' for float64")
        return resolve_backend("triton", device, dtype)
    raise NotImplementedError(
        f"backend={backend!r} with process_group: this vocabulary-parallel loss has "
        + ("no compiled CUDA kernels; pass backend='triton', 'torch' or 'auto'" if kernels
           else "the torch path only; pass backend='torch' or 'auto'"))


def _common(student_logits, tokens, verifier, weights, extrapolation, interpolation,
            temperature, ignore_index, reduction, return_stats, process_group):
    _check_logits("student_logits", student_logits)
    lead = student_logits.shape[:-1]
    device = student_logits.device
    lam_pos = _check_number("extrapolation", extrapolation, positive=True)
    lam_neg = _check_number("interpolation", interpolation, positive=True)
    temperature = _check_number("temperature", temperature, positive=True)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")
    _check_choice("reduction", reduction, REDUCTIONS)
    if not isinstance(return_stats, bool):
        raise TypeError(f"return_stats: expected a bool, got {type(return_stats).__name__}")
    _check_process_group(process_group)
    tok = _check_tokens(tokens, lead, device)
    sign = _verifier_sign(verifier, lead, device)
    w = _weights_rows(weights, lead, device)
    return lead, tok, sign, w, lam_pos, lam_neg, temperature, int(ignore_index)


def _reduce_loss(rows: Tensor, tok: Tensor, w: Optional[Tensor], lead, ignore_index: int,
                 reduction: str) -> Tensor:
    """The loss from the table's loss column, in the table's dtype (float32 or float64)."""
    valid = tok != ignore_index
    loss_rows = rows[:, C.LOSS]
    if w is not None:
        loss_rows = torch.where(valid, loss_rows * w.to(rows.dtype), torch.zeros_like(loss_rows))
    if reduction == "none":
        return loss_rows.reshape(lead)
    if reduction == "sum":
        return loss_rows.sum()
    return loss_rows.sum() / valid.sum().clamp(min=1).to(rows.dtype)


def _stats(rows: Tensor, tok: Tensor, ignore_index: int) -> OPDStats:
    """Means over the unmasked positions of the table's statistics columns (float32)."""
    valid = tok != ignore_index
    rows = rows.detach().to(torch.float32)
    count = valid.sum().clamp(min=1).to(torch.float32)
    gate = rows[:, C.GATE]
    v = valid.to(torch.float32)
    return OPDStats(
        consistent_frac=((gate > 0).to(torch.float32) * v).sum() / count,
        conflict_frac=((gate < 0).to(torch.float32) * v).sum() / count,
        mean_delta=rows[:, C.DELTA].sum() / count,
        teacher_kl=rows[:, C.TEACHER_KL].sum() / count,
        student_entropy=rows[:, C.ENTROPY].sum() / count,
    )


def _reduce(rows: Tensor, tok: Tensor, w: Optional[Tensor], lead, ignore_index: int,
            reduction: str, return_stats: bool):
    """Weights and reduction in the table's dtype; the loss is returned in float32."""
    loss = _reduce_loss(rows, tok, w, lead, ignore_index, reduction).to(torch.float32)
    if not return_stats:
        return loss
    return loss, _stats(rows, tok, ignore_index)


# ---------------------------------------------------------------------------
# public losses

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
    temperature: float = 1.0,
    ignore_index: int = -100,
    weights: Optional[Tensor] = None,
    reduction: str = "mean",
    return_stats: bool = False,
    process_group=None,
    backend: str = "auto",
) -> Union[Tensor, Tuple[Tensor, OPDStats]]:
    """Sign-gated on-policy distillation loss toward the Veto/G-OPD bridge target.

    Per position, with lambda chosen by the gate g = sign(lp_T(y) - lp_S(y)) * sigma
    (``extrapolation`` where g > 0, ``interpolation`` where g < 0, 1 otherwise)::

        log q = log_softmax(lambda * lp_T + (1 - lambda + beta) * sg(lp_S))
        reverse_kl: KL(p_S || q)        forward_kl: KL(q || p_S)

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
        divergence: ``"reverse_kl"`` or ``"forward_kl"``.
        temperature: > 0, divides both models' logits.
        weights: optional per-position multipliers of the loss (detached).
        reduction: ``"mean"`` over unmasked positions, ``"sum"`` or ``"none"``.
        return_stats: also return :class:`OPDStats`.
        process_group: a ``torch.distributed`` group over which the vocabulary is sharded
            (SPEC §7): each rank passes its shard of equal width, columns
            ``[rank * V, (rank + 1) * V)`` of the global vocabulary, and global ``tokens``;
            every rank gets the same loss and the gradient of its shard. CUDA tensors run the
            Triton kernels (``"auto"``/``"triton"``), others the torch path.
        backend: ``"auto"``, ``"cuda"``, ``"triton"`` or ``"torch"``.

    Returns:
        The float32 loss (a scalar, or shaped like ``tokens`` for "none"), and
        the statistics when ``return_stats`` is True.
    """
    lead, tok, sign, w, lam_pos, lam_neg, temperature, ignore_index = _common(
        student_logits, tokens, verifier, weights, extrapolation, interpolation, temperature,
        ignore_index, reduction, return_stats, process_group)
    _check_logits("teacher_logits", teacher_logits)
    if teacher_logits.shape[:-1] != lead:
        raise ValueError(f"teacher_logits: expected leading shape {tuple(lead)} like "
                         f"student_logits, got {tuple(teacher_logits.shape)}")
    if teacher_logits.shape[-1] < student_logits.shape[-1]:
        raise ValueError(f"teacher_logits: vocabulary V_T={teacher_logits.shape[-1]} is smaller "
                         f"than the student's V={student_logits.shape[-1]}; V_T >= V is needed")
    _check_device("teacher_logits", teacher_logits, student_logits.device)
    beta = _check_number("beta", beta, nonnegative=True)
    _check_choice("divergence", divergence, DIVERGENCES)
    reverse = divergence == "reverse_kl"
    if process_group is not None:
        from . import parallel

        path = _parallel_backend(backend, student_logits.device, torch.promote_types(
            student_logits.dtype, teacher_logits.dtype), kernels=True)
        rows = parallel.rows_parallel("opd", student_logits, teacher_logits, tok, sign,
                                      group=process_group, backend=path, beta=beta, lam_pos=lam_pos,
                                      lam_neg=lam_neg, reverse=reverse, temperature=temperature,
                                      ignore_index=ignore_index)
        return _reduce(rows, tok, w, lead, ignore_index, reduction, return_stats)
    name = resolve_backend(backend, student_logits.device,
                           torch.promote_types(student_logits.dtype, teacher_logits.dtype))
    rows = _ops.opd_rows(student_logits, teacher_logits.detach(), tok, sign, beta, lam_pos,
                         lam_neg, reverse, temperature, ignore_index, name)
    return _reduce(rows, tok, w, lead, ignore_index, reduction, return_stats)


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
    return_stats: bool = False,
    process_group=None,
    backend: str = "auto",
) -> Union[Tensor, Tuple[Tensor, OPDStats]]:
    """Sampled-token OPD estimator for a teacher that returns only lp_T(y).

    Per position: ``A = lambda * delta`` (detached, delta = teacher_logprob -
    lp_S(y), the same gate as :func:`gated_opd_loss`) and ``loss = -A *
    lp_S(y)``. Its expectation over y ~ p_S is the reverse-KL gradient toward
    the lambda-bridge. ``teacher_logprobs`` (shaped like ``tokens``) are used as
    given: compute them at the same temperature. Other arguments as in
    :func:`gated_opd_loss`.
    """
    lead, tok, sign, w, lam_pos, lam_neg, temperature, ignore_index = _common(
        student_logits, tokens, verifier, weights, extrapolation, interpolation, temperature,
        ignore_index, reduction, return_stats, process_group)
    if not isinstance(teacher_logprobs, Tensor) or not teacher_logprobs.is_floating_point():
        raise TypeError("teacher_logprobs: expected a floating tensor of log-probabilities, got "
                        f"{getattr(teacher_logprobs, 'dtype', type(teacher_logprobs).__name__)}")
    if teacher_logprobs.shape != lead:
        raise ValueError(f"teacher_logprobs: expected shape {tuple(lead)} (like tokens), got "
                         f"{tuple(teacher_logprobs.shape)}")
    _check_device("teacher_logprobs", teacher_logprobs, student_logits.device)
    tlp = teacher_logprobs.detach().reshape(-1).contiguous()
    if process_group is not None:
        from . import parallel

        _parallel_backend(backend, student_logits.device, student_logits.dtype, kernels=False)
        rows = parallel.rows_parallel("sampled", student_logits, tlp, tok, sign,
                                      group=process_group, lam_pos=lam_pos, lam_neg=lam_neg,
                                      temperature=temperature, ignore_index=ignore_index)
        return _reduce(rows, tok, w, lead, ignore_index, reduction, return_stats)
    name = resolve_backend(backend, student_logits.device, student_logits.dtype)
    rows = _ops.sampled_rows(student_logits, tlp, tok, sign, lam_pos, lam_neg, temperature,
                             ignore_index, name)
    return _reduce(rows, tok, w, lead, ignore_index, reduction, return_stats)


class GatedOPDLoss(torch.nn.Module):
    """``gated_opd_loss`` as a module holding its keyword arguments.

    ``GatedOPDLoss(beta=0.1, divergence="forward_kl")(student_logits,
    teacher_logits, tokens, verifier=None, weights=None)``. Keywords are
    validated at construction.
    """

    def __init__(self, **keywords):
        super().__init__()
        allowed = {"beta", "extrapolation", "interpolation", "divergence", "temperature",
                   "ignore_index", "reduction", "return_stats", "process_group", "backend"}
        unknown = set(keywords) - allowed
        if unknown:
            raise TypeError(f"GatedOPDLoss: unknown keyword(s) {sorted(unknown)}; expected "
                            f"some of {sorted(allowed)}")
        if "beta" in keywords:
            _check_number("beta", keywords["beta"], nonnegative=True)
        for name in ("extrapolation", "interpolation", "temperature"):
            if name in keywords:
                _check_number(name, keywords[name], positive=True)
        if "ignore_index" in keywords and (isinstance(keywords["ignore_index"], bool) or not
                                           isinstance(keywords["ignore_index"], numbers.Integral)):
            raise TypeError(f"ignore_index: expected an int, got "
                            f"{type(keywords['ignore_index']).__name__}")
        if "return_stats" in keywords and not isinstance(keywords["return_stats"], bool):
            raise TypeError(f"return_stats: expected a bool, got "
                            f"{type(keywords['return_stats']).__name__}")
        if "divergence" in keywords:
            _check_choice("divergence", keywords["divergence"], DIVERGENCES)
        if "reduction" in keywords:
            _check_choice("reduction", keywords["reduction"], REDUCTIONS)
        if "backend" in keywords:
            _check_choice("backend", keywords["backend"], BACKENDS)
        self.keywords = dict(keywords)

    def forward(self, student_logits, teacher_logits, tokens, verifier=None, weights=None):
        return gated_opd_loss(student_logits, teacher_logits, tokens, verifier,
                              weights=weights, **self.keywords)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.keywords.items())
