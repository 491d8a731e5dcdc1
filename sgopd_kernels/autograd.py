"""The losses as ``torch.library`` custom ops, one set per loss family.

Each family has a forward op that maps its inputs to the per-row table of
:mod:`sgopd_kernels._rows` and a backward op that maps the per-row incoming
gradient to the gradient of the student's logits. The reductions (weights,
mean/sum/none, statistics) are ordinary O(rows) PyTorch on the table, so
autograd hands the backward one incoming gradient per row and no reduction
needs a host sync. The options reach the ops flattened by
:meth:`RowOptions.op_args` (a schema cannot take a dataclass), the backend's
name last; the backend module is found through :mod:`sgopd_kernels._dispatch`
when the op first runs. Every op has a fake implementation, so
``torch.compile(fullgraph=True)`` traces through a loss call without a break.

A third op per family, ``<family>_rows_grad``, returns the table and the
gradient at once, each row scaled by a given coefficient: the backward of a
backend that writes its gradient in forward (and the fused-linear path's
chunks). A backend without a kernel for it gets the forward then the backward.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from . import _dispatch
from . import _rows as C
from ._options import N_OP_ARGS, OP_SCHEMA, RowOptions

_LIB = torch.library.Library("sgopd_kernels", "DEF")  # noqa: TOR901 (ops of this package)


def _split(rest) -> Tuple[RowOptions, str]:
    """The op's trailing arguments: the flattened options, then the backend."""
    return RowOptions.from_op_args(*rest[:N_OP_ARGS]), rest[N_OP_ARGS]


def _table_dtype(backend: str, *tensors: Tensor) -> torch.dtype:
    """The torch backend keeps float64 row tables for float64 inputs; kernels use float32."""
    if backend == "torch" and any(x.dtype == torch.float64 for x in tensors):
        return torch.float64
    return torch.float32


def _define(name: str, tensors: str, returns: str, impl, fake) -> None:
    qualname = f"sgopd_kernels::{name}"
    _LIB.define(f"{name}({tensors}, {OP_SCHEMA}, str backend) -> {returns}")
    torch.library.impl(qualname, "CompositeExplicitAutograd", impl, lib=_LIB)
    torch.library.register_fake(qualname, fake, lib=_LIB)


def _op(name: str):
    return getattr(torch.ops.sgopd_kernels, name).default


# ---------------------------------------------------------------------------
# the families: each op takes (student, *teacher, tokens, ...); backend modules implement
# <prefix>_rows(student, *teacher, tokens, sign, opts),
# <prefix>_rows_backward(grad_rows, student, *teacher, tokens, rows, opts) and optionally
# <prefix>_rows_grad(student, *teacher, tokens, sign, coef, opts) -> (rows, grad)

class Family(NamedTuple):
    name: str        # the key of _rows.WIDTH and _dispatch.FAMILIES
    prefix: str      # the ops' and the backend functions' name prefix
    teacher: tuple   # the teacher's tensors, as schema arguments


FAMILIES = {
    "logits": Family("logits", "opd", ("Tensor teacher",)),
    "sampled": Family("sampled", "sampled", ("Tensor teacher_logprobs",)),
    # a teacher given by its top-k ids and log-probabilities (and optionally lp_T(y))
    "topk": Family("topk", "topk", ("Tensor teacher_ids", "Tensor teacher_logprobs",
                                    "Tensor? teacher_token_logprobs")),
}


def _fake_rows(family: Family, backend: str, student: Tensor, teacher, tokens: Tensor):
    tensors = [student] + [x for x in teacher if x is not None]
    return student.new_empty((tokens.numel(), C.WIDTH[family.name]),
                             dtype=_table_dtype(backend, *tensors))


def _define_family(f: Family) -> None:
    k = len(f.teacher)
    inputs = ", ".join(("Tensor student",) + f.teacher + ("Tensor tokens", "Tensor? sign"))

    def forward(student, *args):
        teacher, (tokens, sign), (opts, backend) = args[:k], args[k:k + 2], _split(args[k + 2:])
        return getattr(_dispatch.module(backend, family=f.name), f"{f.prefix}_rows")(
            student, *teacher, tokens, sign, opts)

    def forward_fake(student, *args):
        return _fake_rows(f, _split(args[k + 2:])[1], student, args[:k], args[k])

    def backward(grad_rows, student, *args):
        teacher, (tokens, rows_), (opts, backend) = args[:k], args[k:k + 2], _split(args[k + 2:])
        return getattr(_dispatch.module(backend, family=f.name), f"{f.prefix}_rows_backward")(
            grad_rows, student, *teacher, tokens, rows_, opts)

    def backward_fake(grad_rows, student, *args):
        return student.new_empty(student.shape)

    def fused(student, *args):
        teacher, (tokens, sign, coef) = args[:k], args[k:k + 3]
        opts, backend = _split(args[k + 3:])
        mod = _dispatch.module(backend, family=f.name)
        kernel = getattr(mod, f"{f.prefix}_rows_grad", None)
        if kernel is not None:
            return kernel(student, *teacher, tokens, sign, coef, opts)
        rows_ = getattr(mod, f"{f.prefix}_rows")(student, *teacher, tokens, sign, opts)
        return rows_, getattr(mod, f"{f.prefix}_rows_backward")(coef, student, *teacher, tokens,
                                                                rows_, opts)

    def fused_fake(student, *args):
        opts, backend = _split(args[k + 3:])
        return (_fake_rows(f, backend, student, args[:k], args[k]),
                student.new_empty(student.shape))

    bwd_inputs = ", ".join(("Tensor grad_rows", "Tensor student") + f.teacher
                           + ("Tensor tokens", "Tensor rows"))
    _define(f"{f.prefix}_rows", inputs, "Tensor", forward, forward_fake)
    _define(f"{f.prefix}_rows_backward", bwd_inputs, "Tensor", backward, backward_fake)
    _define(f"{f.prefix}_rows_grad", inputs + ", Tensor coef", "(Tensor, Tensor)", fused,
            fused_fake)

    def setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:k + 2], output)  # student, *teacher, tokens, rows
        ctx.rest = inputs[k + 3:]
        ctx.n_inputs = len(inputs)

    def autograd_backward(ctx, grad):
        grad_student = None
        if ctx.needs_input_grad[0]:
            grad_student = _op(f"{f.prefix}_rows_backward")(
                grad[:, C.LOSS].contiguous(), *ctx.saved_tensors, *ctx.rest)
        return (grad_student,) + (None,) * (ctx.n_inputs - 1)

    torch.library.register_autograd(f"sgopd_kernels::{f.prefix}_rows", autograd_backward,
                                    setup_context=setup, lib=_LIB)
    for name in (f"{f.prefix}_rows_backward", f"{f.prefix}_rows_grad"):
        torch.library.register_autograd(f"sgopd_kernels::{name}", _no_double_backward,
                                        setup_context=_no_setup, lib=_LIB)


def _no_setup(ctx, inputs, output):
    pass


def _no_double_backward(ctx, *grads):
    raise RuntimeError("sgopd_kernels: the losses' gradients are not differentiable (no double "
                       "backward, e.g. a Hessian-vector product through create_graph=True)")


for _family in FAMILIES.values():
    _define_family(_family)


# ---------------------------------------------------------------------------
# the Python entry points of the ops (teacher: the family's teacher tensors, in order)

def rows(family: str, student: Tensor, teacher: tuple, tokens: Tensor, sign: Optional[Tensor],
         opts: RowOptions, backend: str) -> Tensor:
    """The per-row table of ``family``; differentiable in ``student`` (recompute backward)."""
    return _op(f"{FAMILIES[family].prefix}_rows")(student, *teacher, tokens, sign,
                                                  *opts.op_args(), backend)


def rows_backward(family: str, grad_rows: Tensor, student: Tensor, teacher: tuple,
                  tokens: Tensor, table: Tensor, opts: RowOptions, backend: str) -> Tensor:
    """d (sum_r grad_rows[r] loss_r) / d student, from the table of the forward."""
    return _op(f"{FAMILIES[family].prefix}_rows_backward")(
        grad_rows, student, *teacher, tokens, table, *opts.op_args(), backend)


def rows_grad(family: str, student: Tensor, teacher: tuple, tokens: Tensor,
              sign: Optional[Tensor], coef: Tensor, opts: RowOptions,
              backend: str) -> Tuple[Tensor, Tensor]:
    """(table, gradient with row r scaled by coef[r]); not differentiable."""
    return _op(f"{FAMILIES[family].prefix}_rows_grad")(student, *teacher, tokens, sign, coef,
                                                       *opts.op_args(), backend)


# ---------------------------------------------------------------------------
# the stored gradient's scaling by the incoming gradient, in place (an op, so that a
# compiled graph holds it like any other)

_LIB.define("scale_grad_(Tensor(a!) grad, Tensor factor, str backend) -> ()")


def _scale_grad_impl(grad, factor, backend):
    """grad *= factor (a 0-d tensor, or one per row shaped to broadcast); the backend's
    kernel where it has one (it returns at once where the factor is 1), else ``mul_``."""
    kernel = getattr(_dispatch.module(backend), "scale_grad_", None)
    if kernel is not None:
        kernel(grad, factor)
    else:
        grad.mul_(factor)


torch.library.impl("sgopd_kernels::scale_grad_", "CompositeExplicitAutograd", _scale_grad_impl,
                   lib=_LIB)
torch.library.register_fake("sgopd_kernels::scale_grad_", lambda grad, factor, backend: None,
                            lib=_LIB)


def scale_grad_(grad: Tensor, factor: Tensor, backend: str) -> None:
    _op("scale_grad_")(grad, factor, backend)
