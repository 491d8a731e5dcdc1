"""The losses as ``torch.library`` custom ops with autograd and fake implementations.

Each op maps logits to the per-row table of :mod:`sgopd_kernels._rows`;
the reductions (weights, mean/sum/none, statistics) are ordinary O(rows)
PyTorch on that table, so autograd hands the backward kernel one incoming
gradient per row and no reduction needs a host sync. The backend is an
argument of the op: the implementations are imported when first called.
``torch.compile(fullgraph=True)`` traces through these ops without a break.
"""

from __future__ import annotations

import importlib
from typing import Optional

import torch
from torch import Tensor

from . import _rows as C


def _impl(backend: str):
    if backend == "torch":
        return importlib.import_module("sgopd_kernels.reference")
    if backend == "triton":
        return importlib.import_module("sgopd_kernels.triton")
    raise RuntimeError(f"backend={backend!r} has no implementation in this build")


def _as_2d(x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1])


def _table_dtype(backend: str, *tensors: Tensor) -> torch.dtype:
    """The torch backend keeps float64 row tables for float64 inputs; kernels use float32."""
    if backend == "torch" and any(x.dtype == torch.float64 for x in tensors):
        return torch.float64
    return torch.float32


# ---------------------------------------------------------------------------
# full-logits loss

@torch.library.custom_op("sgopd_kernels::opd_rows", mutates_args=())
def opd_rows(student: Tensor, teacher: Tensor, tokens: Tensor, sign: Optional[Tensor],
             beta: float, lam_pos: float, lam_neg: float, reverse: bool, temperature: float,
             ignore_index: int, backend: str) -> Tensor:
    kw = dict(beta=beta, lam_pos=lam_pos, lam_neg=lam_neg, reverse=reverse,
              temperature=temperature, ignore_index=ignore_index)
    if backend == "torch":
        return _impl(backend).opd_rows(_as_2d(student), _as_2d(teacher), tokens, sign, **kw)
    return _impl(backend).opd_rows(student, teacher, tokens, sign, **kw)


@opd_rows.register_fake
def _(student, teacher, tokens, sign, beta, lam_pos, lam_neg, reverse, temperature,
      ignore_index, backend):
    return student.new_empty((tokens.numel(), C.ROW_K), dtype=_table_dtype(backend, student,
                                                                            teacher))


@torch.library.custom_op("sgopd_kernels::opd_rows_backward", mutates_args=())
def opd_rows_backward(grad_rows: Tensor, student: Tensor, teacher: Tensor, tokens: Tensor,
                      rows: Tensor, reverse: bool, temperature: float, ignore_index: int,
                      backend: str) -> Tensor:
    kw = dict(reverse=reverse, temperature=temperature, ignore_index=ignore_index)
    if backend == "torch":
        g = _impl(backend).opd_rows_backward(grad_rows, _as_2d(student), _as_2d(teacher),
                                             tokens, rows, **kw)
        return g.view(student.shape)
    return _impl(backend).opd_rows_backward(grad_rows, student, teacher, tokens, rows, **kw)


@opd_rows_backward.register_fake
def _(grad_rows, student, teacher, tokens, rows, reverse, temperature, ignore_index, backend):
    return student.new_empty(student.shape)


def _opd_setup(ctx, inputs, output):
    student, teacher, tokens, _sign, _b, _lp, _ln, reverse, temperature, ignore_index, \
        backend = inputs
    ctx.save_for_backward(student, teacher, tokens, output)
    ctx.args = (reverse, temperature, ignore_index, backend)


def _opd_backward(ctx, grad):
    student, teacher, tokens, rows = ctx.saved_tensors
    grad_student = None
    if ctx.needs_input_grad[0]:
        grad_student = opd_rows_backward(grad[:, C.LOSS].contiguous(), student, teacher, tokens,
                                         rows, *ctx.args)
    return (grad_student,) + (None,) * 10


opd_rows.register_autograd(_opd_backward, setup_context=_opd_setup)


# ---------------------------------------------------------------------------
# sampled-token estimator

@torch.library.custom_op("sgopd_kernels::sampled_rows", mutates_args=())
def sampled_rows(student: Tensor, teacher_logprobs: Tensor, tokens: Tensor,
                 sign: Optional[Tensor], lam_pos: float, lam_neg: float, temperature: float,
                 ignore_index: int, backend: str) -> Tensor:
    if backend == "torch":
        student = _as_2d(student)
    return _impl(backend).sampled_rows(student, teacher_logprobs, tokens, sign, lam_pos=lam_pos,
                                       lam_neg=lam_neg, temperature=temperature,
                                       ignore_index=ignore_index)


@sampled_rows.register_fake
def _(student, teacher_logprobs, tokens, sign, lam_pos, lam_neg, temperature, ignore_index,
      backend):
    return student.new_empty((tokens.numel(), C.SAMPLED_ROW_K),
                             dtype=_table_dtype(backend, student, teacher_logprobs))


@torch.library.custom_op("sgopd_kernels::sampled_rows_backward", mutates_args=())
def sampled_rows_backward(grad_rows: Tensor, student: Tensor, tokens: Tensor, rows: Tensor,
                          temperature: float, ignore_index: int, backend: str) -> Tensor:
    kw = dict(temperature=temperature, ignore_index=ignore_index)
    if backend == "torch":
        g = _impl(backend).sampled_rows_backward(grad_rows, _as_2d(student), tokens, rows, **kw)
        return g.view(student.shape)
    return _impl(backend).sampled_rows_backward(grad_rows, student, tokens, rows, **kw)


@sampled_rows_backward.register_fake
def _(grad_rows, student, tokens, rows, temperature, ignore_index, backend):
    return student.new_empty(student.shape)


def _sampled_setup(ctx, inputs, output):
    student, _tlp, tokens, _sign, _lp, _ln, temperature, ignore_index, backend = inputs
    ctx.save_for_backward(student, tokens, output)
    ctx.args = (temperature, ignore_index, backend)


def _sampled_backward(ctx, grad):
    student, tokens, rows = ctx.saved_tensors
    grad_student = None
    if ctx.needs_input_grad[0]:
        grad_student = sampled_rows_backward(grad[:, C.LOSS].contiguous(), student, tokens, rows,
                                             *ctx.args)
    return (grad_student,) + (None,) * 8


sampled_rows.register_autograd(_sampled_backward, setup_context=_sampled_setup)
