"""The compiled backend: C++ kernels for CPU tensors, CUDA kernels for CUDA tensors (csrc/).

Both devices run the same row math (``csrc/opd_math.h``). Every function takes
the logits as they are, ``(..., V)`` of any strides (read in place: only a
tensor whose leading dims need three independent strides is copied), and an
options object ``opts`` with the attributes ``divergence`` (0 reverse KL, 1
forward KL, 2 JSD), ``beta``, ``lam_pos``, ``lam_neg``, ``jsd_beta``,
``temperature``, ``teacher_temperature`` (a float; None means ``temperature``)
and ``ignore_index``.

Two designs of the gradient, both offered:

- recompute: ``opd_rows`` returns the per-row table, ``opd_rows_backward`` re-reads
  the logits and writes ``grad_rows[r] * d loss_r / d z_S``;
- written in forward: ``opd_rows_grad`` returns the table and ``coef[r] * d loss_r /
  d z_S`` (``coef``: the row's reduction coefficient, e.g. weight / count), computed
  from the row while it is in cache or on chip; the backward then only calls
  ``scale_grad_(grad, grad_output)``, which reads the factor on the device and
  does nothing when it is 1.

The table is ``(N, ROW_K)`` float32 (``(N, SAMPLED_ROW_K)`` for the sampled
estimator). Its shared columns (``sgopd_kernels._rows``): 0 loss, 1 delta, 2 gate,
3 teacher KL, 4 entropy, then a = lambda and b = 1 - lambda + beta (5, 6; the
sampled estimator: 5 = lambda * delta). The other columns are private to this
backend and named below (``REF_S``...); masked rows are zeros everywhere.

The top-k teacher (``topk_rows``, ``topk_rows_backward``; recompute only) runs its
passes over the student's row compiled, on either device, and forms each row's O(k)
terms with the torch reference's float64 code on the student's device.

Nothing here reads a device tensor on the host: no synchronization.
"""

from __future__ import annotations

import torch

from . import _ext, _rows

_C = _ext.module

# ---------------------------------------------------------------------------
# the row table (csrc/opd_math.h names the same columns)

# private to this backend (from _rows.PRIVATE on), base-2 units (sf = (z_S - REF_S) log2(e)
# / temperature, tf = (z_T - FRAME_T) log2(e) / teacher_temperature, x = a tf + b sf)
REF_S = _rows.PRIVATE["logits"]  # the student's raw max (0 where it is -inf)
LOG2Z_S = REF_S + 1         # log2 sum 2^sf (+inf: the student has no support)
FRAME_T = REF_S + 2         # the teacher's raw logit at the student's argmax (or its max)
MEAN_S = REF_S + 3          # E_{p_S}[sf]
MEAN_T = REF_S + 4          # E_{p_S}[tf]
MAX_Q = REF_S + 5           # max of x over the joint support (0 if it is empty)
LOG2Z_Q = REF_S + 6         # log2 sum 2^(x - MAX_Q) (+inf: empty support)
MEAN_H = REF_S + 7          # JSD: E_{p_S}[(1 - pi) ln(p_S / m)], nats
ROW_K = _rows.WIDTH["logits"]

S_REF = _rows.PRIVATE["sampled"]  # the student's raw max
S_LOG2Z = S_REF + 1         # log2 sum 2^sf
SAMPLED_ROW_K = _rows.WIDTH["sampled"]
# csrc/opd_math.h names the same columns by number: they must agree
assert (REF_S, MEAN_H, ROW_K, S_REF, S_LOG2Z, SAMPLED_ROW_K) == (7, 14, 16, 6, 7, 8)

_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


# ---------------------------------------------------------------------------
# availability

_cuda_devices = None


# The module holds sm_90a and sm_80 code and compute_80 PTX: it runs on compute capability 8.0
# and newer (a newer GPU than 9.0 JITs the PTX, without clusters).
MIN_CAPABILITY = 8


def _usable_cuda_devices() -> int:
    """The number of CUDA devices, or 0 when one of them is older than the module's code."""
    count = int(_C.cuda_device_count())
    if count and torch.cuda.is_available():
        if any(torch.cuda.get_device_capability(i)[0] < MIN_CAPABILITY for i in range(count)):
            return 0
    return count


def available(device_type: str) -> bool:
    """Whether the compiled kernels for ``"cpu"`` or ``"cuda"`` tensors are built and can run."""
    global _cuda_devices
    if _C is None:
        return False
    if device_type == "cpu":
        return True
    if device_type == "cuda":
        if not _C.has_cuda:
            return False
        if _cuda_devices is None:
            _cuda_devices = _usable_cuda_devices()
        return _cuda_devices > 0
    return False


def build_info() -> dict:
    """What this installation holds: CPU ISA, CUDA archs, or why there is no module."""
    if _C is None:
        return {"module": None, "error": _ext.error}
    return {"module": _C.__file__, "cpu_isa": _C.cpu_isa(), "has_cuda": bool(_C.has_cuda),
            "cuda_archs": _C.cuda_archs}


def _require(device: torch.device) -> None:
    if _C is None:
        raise RuntimeError("the compiled kernels of sgopd_kernels are not built in this "
                           f"installation ({_ext.error}); reinstall with a C++ compiler "
                           "(and nvcc for CUDA), or use another backend")
    if device.type == "cuda" and not _C.has_cuda:
        raise RuntimeError("the compiled kernels were built without their CUDA part (no nvcc "
                           "at build time, or SGOPD_NO_CUDA=1); use another backend for CUDA "
                           "tensors")
    if device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"the compiled kernels run on CPU and CUDA tensors, got {device}")


# ---------------------------------------------------------------------------
# arguments

def _check_logits(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _DTYPE_CODE:
        raise TypeError(f"{name}: the compiled kernels take float32, bfloat16 or float16, got "
                        f"{x.dtype}")
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"{name}: expected shape (..., V) with V >= 1, got {tuple(x.shape)}")


def _layout(x: torch.Tensor):
    """(tensor, d1, st0, st1, stv): row r at (r // d1) st0 + (r % d1) st1, column stride stv.

    The leading dims are merged into at most two strided dims; a tensor that needs
    three or more is reshaped (copied) to (N, V). The same addressing as
    ``triton/_layout.py``.
    """
    lead = [(n, st) for n, st in zip(x.shape[:-1], x.stride()[:-1]) if n != 1]
    merged: list = []
    for n, st in lead:  # outermost first
        if merged and merged[-1][1] == st * n:
            merged[-1] = (merged[-1][0] * n, st)
        else:
            merged.append((n, st))
    stv = x.stride(-1) if x.shape[-1] > 1 else 1
    if len(merged) > 2:
        y = x.reshape(-1, x.shape[-1])
        return y, 1, y.stride(0), 0, y.stride(1) if y.shape[1] > 1 else 1
    if not merged:
        return x, 1, 0, 0, stv
    if len(merged) == 1:
        return x, 1, merged[0][1], 0, stv
    (_, st0), (n1, st1) = merged
    return x, n1, st0, st1, stv


def _rows_arg(x: torch.Tensor, keep: list) -> tuple:
    y, d1, st0, st1, stv = _layout(x)
    keep.append(y)
    return (y.data_ptr(), _DTYPE_CODE[y.dtype], d1, st0, st1, stv)


def _params(opts, has_gate: bool) -> tuple:
    t_s = float(opts.temperature)
    t_t = getattr(opts, "teacher_temperature", None)
    t_t = t_s if t_t is None else float(t_t)
    return (int(opts.divergence), bool(has_gate), float(getattr(opts, "beta", 0.0)),
            float(opts.lam_pos), float(opts.lam_neg), float(getattr(opts, "jsd_beta", 0.5)),
            t_s, t_t, int(opts.ignore_index))


def _rows_vector(name: str, x, n: int, device: torch.device, dtype=torch.float32, keep=None):
    """A (N,) vector as a contiguous tensor of ``dtype`` on ``device``; its pointer (0: None)."""
    if x is None:
        return 0
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor or None, got {type(x).__name__}")
    if x.numel() != n:
        raise ValueError(f"{name}: expected {n} values (one per row), got shape "
                         f"{tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name}: is on {x.device} but student_logits is on {device}")
    y = x.detach().reshape(-1).to(dtype).contiguous()
    keep.append(y)
    return y.data_ptr()


def _tokens(tokens, lead, device, keep) -> int:
    if not isinstance(tokens, torch.Tensor) or tokens.dtype != torch.int64:
        raise TypeError(f"tokens: expected an int64 tensor, got "
                        f"{getattr(tokens, 'dtype', type(tokens).__name__)}")
    n = 1
    for d in lead:
        n *= d
    if tokens.numel() != n:
        raise ValueError(f"tokens: expected {n} ids (one per row of student_logits "
                         f"{tuple(lead)}), got shape {tuple(tokens.shape)}")
    if tokens.device != device:
        raise ValueError(f"tokens: is on {tokens.device} but student_logits is on {device}")
    t = tokens.reshape(-1).contiguous()
    keep.append(t)
    return t.data_ptr()


def _check_teacher(student: torch.Tensor, teacher: torch.Tensor) -> None:
    _check_logits("teacher_logits", teacher)
    if teacher.shape[:-1] != student.shape[:-1]:
        raise ValueError(f"teacher_logits: expected leading shape {tuple(student.shape[:-1])} "
                         f"like student_logits, got {tuple(teacher.shape)}")
    if teacher.shape[-1] < student.shape[-1]:
        raise ValueError(f"teacher_logits: vocabulary V_T={teacher.shape[-1]} is smaller than "
                         f"the student's V={student.shape[-1]}")
    if teacher.device != student.device:
        raise ValueError(f"teacher_logits: is on {teacher.device} but student_logits is on "
                         f"{student.device}")


def _where(device: torch.device) -> tuple:
    """The last arguments of a kernel call: CPU threads, or the current CUDA stream and the
    device index."""
    if device.type == "cpu":
        return (torch.get_num_threads(),)
    return (torch.cuda.current_stream(device).cuda_stream, device.index
            if device.index is not None else torch.cuda.current_device())


def _teacher_for(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """The CUDA kernels are built for a teacher of the student's dtype or float32; any other
    teacher (bf16 beside fp32 or fp16, fp16 beside bf16) is upcast to float32, exactly."""
    if student.device.type == "cuda" and teacher.dtype not in (student.dtype, torch.float32):
        return teacher.float()
    return teacher


def _fn(device: torch.device, name: str):
    return getattr(_C, ("cpu_" if device.type == "cpu" else "cuda_") + name)


def _device_guard(device: torch.device):
    if device.type == "cuda":
        return torch.cuda.device(device)
    import contextlib

    return contextlib.nullcontext()


# ---------------------------------------------------------------------------
# the logits loss

def _opd_forward(student, teacher, tokens, sign, coef, opts, want_grad: bool):
    _check_logits("student_logits", student)
    _check_teacher(student, teacher)
    dev = student.device
    _require(dev)
    keep: list = []
    lead, vocab = student.shape[:-1], student.shape[-1]
    tok = _tokens(tokens, lead, dev, keep)
    n = tokens.numel()
    sig = _rows_vector("sign", sign, n, dev, keep=keep)
    cf = _rows_vector("coef", coef, n, dev, keep=keep)
    table = torch.empty(n, ROW_K, dtype=torch.float32, device=dev)
    grad = torch.empty(student.shape, dtype=student.dtype, device=dev) if want_grad else None
    if n == 0:
        return table, grad
    s = _rows_arg(student.detach(), keep)
    t = _rows_arg(_teacher_for(student, teacher.detach()), keep)
    with _device_guard(dev):
        _fn(dev, "opd_forward")(s, t, n, vocab, tok, sig, cf, table.data_ptr(),
                                0 if grad is None else grad.data_ptr(),
                                _DTYPE_CODE[student.dtype], _params(opts, sign is not None),
                                *_where(dev))
    return table, grad


def opd_rows(student, teacher, tokens, sign, opts) -> torch.Tensor:
    """Forward of the logits loss: the per-row table (N, ROW_K), float32."""
    return _opd_forward(student, teacher, tokens, sign, None, opts, False)[0]


def opd_rows_grad(student, teacher, tokens, sign, coef, opts):
    """Forward with the gradient written in forward: (table, grad) with
    ``grad[r] = coef[r] * d loss_r / d student_logits[r]`` in the student's dtype and
    shape (contiguous); ``coef`` is (N,) (None: 1)."""
    return _opd_forward(student, teacher, tokens, sign, coef, opts, True)


def opd_rows_backward(grad_rows, student, teacher, tokens, rows, opts) -> torch.Tensor:
    """Recompute backward: ``grad_rows[r] * d loss_r / d student_logits[r]`` from the table."""
    _check_logits("student_logits", student)
    _check_teacher(student, teacher)
    dev = student.device
    _require(dev)
    keep: list = []
    lead, vocab = student.shape[:-1], student.shape[-1]
    tok = _tokens(tokens, lead, dev, keep)
    n = tokens.numel()
    grad = torch.empty(student.shape, dtype=student.dtype, device=dev)
    _check_table(rows, n, ROW_K, dev)
    gr = _rows_vector("grad_rows", grad_rows, n, dev, keep=keep)
    if n == 0:
        return grad
    s = _rows_arg(student.detach(), keep)
    t = _rows_arg(_teacher_for(student, teacher.detach()), keep)
    table = rows.detach().contiguous()
    keep.append(table)
    with _device_guard(dev):
        _fn(dev, "opd_backward")(s, t, n, vocab, tok, table.data_ptr(), gr, grad.data_ptr(),
                                 _DTYPE_CODE[student.dtype], _params(opts, False), *_where(dev))
    return grad


def _check_table(rows, n, k, device):
    if not isinstance(rows, torch.Tensor) or rows.dtype != torch.float32 or \
            tuple(rows.shape) != (n, k):
        raise ValueError(f"rows: expected the forward's float32 table of shape ({n}, {k}), got "
                         f"{getattr(rows, 'dtype', None)} {tuple(getattr(rows, 'shape', ()))}")
    if rows.device != device:
        raise ValueError(f"rows: is on {rows.device} but student_logits is on {device}")


# ---------------------------------------------------------------------------
# the sampled-token estimator

def _sampled_forward(student, teacher_logprobs, tokens, sign, coef, opts, want_grad: bool):
    _check_logits("student_logits", student)
    dev = student.device
    _require(dev)
    keep: list = []
    lead, vocab = student.shape[:-1], student.shape[-1]
    tok = _tokens(tokens, lead, dev, keep)
    n = tokens.numel()
    if not isinstance(teacher_logprobs, torch.Tensor) or \
            not teacher_logprobs.is_floating_point():
        raise TypeError("teacher_logprobs: expected a floating tensor, got "
                        f"{getattr(teacher_logprobs, 'dtype', type(teacher_logprobs).__name__)}")
    tlp = _rows_vector("teacher_logprobs", teacher_logprobs, n, dev, keep=keep)
    sig = _rows_vector("sign", sign, n, dev, keep=keep)
    cf = _rows_vector("coef", coef, n, dev, keep=keep)
    table = torch.empty(n, SAMPLED_ROW_K, dtype=torch.float32, device=dev)
    grad = torch.empty(student.shape, dtype=student.dtype, device=dev) if want_grad else None
    if n == 0:
        return table, grad
    s = _rows_arg(student.detach(), keep)
    with _device_guard(dev):
        _fn(dev, "sampled_forward")(s, n, vocab, tok, tlp, sig, cf, table.data_ptr(),
                                    0 if grad is None else grad.data_ptr(),
                                    _DTYPE_CODE[student.dtype], _params(opts, sign is not None),
                                    *_where(dev))
    return table, grad


def sampled_rows(student, teacher_logprobs, tokens, sign, opts) -> torch.Tensor:
    """Forward of the sampled estimator: the per-row table (N, SAMPLED_ROW_K)."""
    return _sampled_forward(student, teacher_logprobs, tokens, sign, None, opts, False)[0]


def sampled_rows_grad(student, teacher_logprobs, tokens, sign, coef, opts):
    """(table, grad) with ``grad[r] = coef[r] * d loss_r / d student_logits[r]``."""
    return _sampled_forward(student, teacher_logprobs, tokens, sign, coef, opts, True)


def sampled_rows_backward(grad_rows, student, teacher_logprobs, tokens, rows,
                          opts) -> torch.Tensor:
    """Recompute backward of the sampled estimator (``teacher_logprobs`` is not read: the
    table holds the advantage)."""
    _check_logits("student_logits", student)
    dev = student.device
    _require(dev)
    keep: list = []
    lead, vocab = student.shape[:-1], student.shape[-1]
    tok = _tokens(tokens, lead, dev, keep)
    n = tokens.numel()
    grad = torch.empty(student.shape, dtype=student.dtype, device=dev)
    _check_table(rows, n, SAMPLED_ROW_K, dev)
    gr = _rows_vector("grad_rows", grad_rows, n, dev, keep=keep)
    if n == 0:
        return grad
    s = _rows_arg(student.detach(), keep)
    table = rows.detach().contiguous()
    keep.append(table)
    with _device_guard(dev):
        _fn(dev, "sampled_backward")(s, n, vocab, tok, table.data_ptr(), gr, grad.data_ptr(),
                                     _DTYPE_CODE[student.dtype], _params(opts, False),
                                     *_where(dev))
    return grad


# ---------------------------------------------------------------------------
# the backward of the gradient written in forward

def scale_grad_(grad: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``grad *= g`` in place, ``g`` a 0-d float tensor (or one value per row, (N,), for
    reduction="none") on grad's device. The kernel reads g on the device and returns at once
    when it is 1: no host synchronization. Returns ``grad``."""
    if not isinstance(grad, torch.Tensor) or grad.dtype not in _DTYPE_CODE or \
            not grad.is_contiguous():
        raise TypeError("grad: expected a contiguous float32/bfloat16/float16 tensor (the "
                        "gradient written in forward)")
    if not isinstance(g, torch.Tensor) or not g.is_floating_point():
        raise TypeError(f"g: expected a floating tensor, got {type(g).__name__}")
    if g.device != grad.device:
        raise ValueError(f"g: is on {g.device} but grad is on {grad.device}")
    dev = grad.device
    _require(dev)
    vocab = grad.shape[-1] if grad.dim() else 1
    n = grad.numel() // max(vocab, 1)
    per_row = g.numel() != 1
    if g.numel() != 1 and g.numel() != n:
        raise ValueError(f"g: expected one value or one per row ({n}), got shape "
                         f"{tuple(g.shape)}")
    if n == 0 or vocab == 0:
        return grad
    gg = g.detach().reshape(-1).to(torch.float32).contiguous()
    with _device_guard(dev):
        _fn(dev, "scale_grad")(grad.data_ptr(), _DTYPE_CODE[grad.dtype], n, vocab,
                               gg.data_ptr(), bool(per_row), *_where(dev))
    return grad


# ---------------------------------------------------------------------------
# the top-k teacher: the passes over the student's row are compiled (CPU and CUDA), the
# O(k) terms of each row are the torch reference's, in float64, from the pass's sums (on
# the student's device)

T_LSE = _rows.PRIVATE["topk"]  # log Z_S of z / tau (natural), as float32 hi + lo
T_TAIL = T_LSE + 2             # log P_S(tail) (natural; -inf: no tail), hi + lo
assert T_TAIL + 1 < _rows.WIDTH["topk"]


def _hi_lo(table, col, x):
    """x (float64) into two float32 columns whose sum is x to about 1e-14 (lo is 0 where x is
    not finite)."""
    hi = x.to(torch.float32)
    lo = torch.where(torch.isfinite(hi), x - hi.to(x.dtype), torch.zeros_like(x))
    table[:, col], table[:, col + 1] = hi, lo.to(torch.float32)


def _joined(table, col):
    return table[:, col].double() + table[:, col + 1].double()


def _topk_columns(student, ids, tokens, ttl, ignore_index):
    """(cols (N, K + 1) with V for none, present, own, cat_y, bad rows): the categories' columns
    of each row, and the rows whose ids (outside [0, V) or twice in a row) or token (outside
    [0, V)) make them NaN, as in the other kernels (the torch path raises instead)."""
    from .reference import topk_membership

    vocab = student.shape[-1]
    valid = tokens != ignore_index
    ordered = ids.sort(-1).values
    bad = (ids >= vocab).any(-1) | ((ordered[:, 1:] == ordered[:, :-1])
                                    & (ordered[:, 1:] >= 0)).any(-1)
    bad = valid & (bad | (tokens < 0) | (tokens >= vocab))
    safe_ids = torch.where(bad.unsqueeze(-1) | (ids >= vocab), -1, ids)
    safe_tok = torch.where(bad, ignore_index, tokens)  # (membership of a clean row)
    present, own, cat_y = topk_membership(safe_ids, safe_tok, ttl is not None, ignore_index)
    none = torch.full_like(tokens, vocab)
    cols = torch.cat([torch.where(present, safe_ids, vocab),
                      torch.where(own, tokens, none).unsqueeze(-1)], -1).contiguous()
    return cols, present, own, cat_y, bad


def _topk_call(student, tokens, k):
    """The checks and arguments common to the top-k kernels: (the tensors to keep alive, the
    leading shape, the tokens' pointer, the tokens flattened)."""
    _check_logits("student_logits", student)
    dev = student.device
    _require(dev)
    if dev.type == "cuda" and not _C.cuda_topk_fits(student.shape[-1], k + 1, _where(dev)[1]):
        raise NotImplementedError(
            f"student_logits: rows of {student.shape[-1]} columns with k = {k} categories "
            "overflow the CUDA top-k kernel's shared memory (a bitmap of the vocabulary); use "
            "backend='triton' or backend='torch'")
    keep: list = []
    lead = student.shape[:-1]
    tok = _tokens(tokens, lead, dev, keep)
    return keep, lead, tok, keep[-1]


def topk_rows(student, ids, tlp, ttl, tokens, sign, opts) -> torch.Tensor:
    """Forward of the top-k loss: the per-row table (N, WIDTH["topk"]), float32."""
    from .reference_parallel import topk_terms_from_sums

    dev = student.device
    keep, lead, tok, tokens = _topk_call(student, tokens, ids.shape[-1])
    n, k, vocab = tokens.numel(), ids.shape[-1], student.shape[-1]
    table = torch.zeros(n, _rows.WIDTH["topk"], dtype=torch.float32, device=dev)
    if n == 0:
        return table
    cols, present, own, cat_y, bad = _topk_columns(student, ids, tokens, ttl, opts.ignore_index)
    sums = torch.empty(n, _C.TOPK_STREAM_K + k + 1, dtype=torch.float64, device=dev)
    with _device_guard(dev):
        _fn(dev, "topk_stream")(_rows_arg(student.detach(), keep), n, vocab, cols.data_ptr(),
                                k + 1, 1.0 / float(opts.temperature), tok,
                                int(opts.ignore_index), sums.data_ptr(), *_where(dev))
    valid = tokens != opts.ignore_index
    t = topk_terms_from_sums(sums[:, 0], sums[:, 1], sums[:, 2:5], sums[:, 5:], present, own,
                             cat_y, tlp, ttl, sign, valid, opts)
    nan = torch.full_like(t["loss"], float("nan"))
    for name, c in {**_rows.SHARED, **_rows.FAMILY["topk"]}.items():
        table[:, c] = torch.where(bad, nan, t[name])
    _hi_lo(table, T_LSE, t["lse"])
    _hi_lo(table, T_TAIL, t["tail"])
    return table


def topk_rows_backward(grad_rows, student, ids, tlp, ttl, tokens, rows, opts) -> torch.Tensor:
    """``grad_rows[r] * d loss_r / d student_logits[r]`` from the table of the forward: the
    categories' terms formed again (O(k), float64) from A, B, log Z_S and log P_S(tail), as
    the torch reference forms them from A and B."""
    from .reference import TOPK_DTYPE, topk_category_grads

    dev = student.device
    keep, lead, tok, tokens = _topk_call(student, tokens, ids.shape[-1])
    n, k, vocab = tokens.numel(), ids.shape[-1], student.shape[-1]
    grad = torch.empty(student.shape, dtype=student.dtype, device=dev)
    _check_table(rows, n, _rows.WIDTH["topk"], dev)
    if n == 0:
        return grad
    cdt = TOPK_DTYPE
    cols, present, own, _, bad = _topk_columns(student, ids, tokens, ttl, opts.ignore_index)
    inv_t = 1.0 / float(opts.temperature)
    held = torch.cat([present, own.unsqueeze(-1)], -1)
    z_at = student.detach().gather(-1, torch.where(held, cols, 0).view(*lead, k + 1))
    lse = _joined(rows, T_LSE)
    ls = torch.where(held, z_at.reshape(n, k + 1).to(cdt) * inv_t - lse[:, None], -torch.inf)
    cat_s = torch.cat([ls, _joined(rows, T_TAIL)[:, None]], -1)
    values, log_tail, sign_tail = topk_category_grads(
        cat_s, tlp.to(cdt), None if ttl is None else ttl.to(cdt), present, own,
        rows[:, _rows.A, None].to(cdt), rows[:, _rows.B, None].to(cdt), opts)
    factor = grad_rows.reshape(-1).to(cdt) * inv_t
    nan = torch.full_like(factor, float("nan"))
    values = torch.where(bad.unsqueeze(-1), nan[:, None], values * factor[:, None]).contiguous()
    info = torch.stack([log_tail + factor.abs().log() - lse, sign_tail * torch.sign(factor)],
                       -1)
    info = torch.where(bad.unsqueeze(-1) | info.isnan().any(-1, keepdim=True), nan[:, None],
                       info).contiguous()
    with _device_guard(dev):
        _fn(dev, "topk_backward")(_rows_arg(student.detach(), keep), n, vocab, cols.data_ptr(),
                                  k + 1, values.data_ptr(), info.data_ptr(), inv_t, tok,
                                  int(opts.ignore_index), grad.data_ptr(),
                                  _DTYPE_CODE[student.dtype], *_where(dev))
    return grad
