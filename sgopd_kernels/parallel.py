"""Vocabulary-parallel losses (docs/math.md, "Vocabulary parallel"): each rank holds a shard.

Megatron's layout: with ``W`` ranks in ``process_group`` and ``V_local``
columns per rank, rank ``r`` holds the global columns ``[r V_local, (r + 1)
V_local)`` of both models' logits (shards of equal width, as Megatron's
vocabulary-parallel layers make them). The teacher's shard must hold the same
global columns as the student's: its first ``V_local`` columns are used and
any further ones ignored. A teacher whose padded vocabulary is sharded at its
own boundaries (``r V_T / W``) must be re-sharded at the student's first.
``tokens`` are global ids.

Every rank computes per-row partial statistics of its shard and combines them
with all-reduces of O(rows) size; nothing of size rows x vocabulary is
communicated. Every rank then holds the same loss and statistics, and its
backward writes the gradient of its own shard from the combined row state,
without communication.

This module holds what every path shares: the shard helpers and the autograd
function that calls a backend's vocabulary-parallel module
(``_dispatch.module(backend, parallel=True)``), which implements, per family,
``<prefix>_rows_parallel(student, *teacher, tokens, sign, opts, group)`` and
``<prefix>_rows_parallel_backward(grad_rows, student, *teacher, tokens, rows, opts,
group)``: the readable torch path in :mod:`sgopd_kernels.reference_parallel`
(it raises on misuse, reading shard widths and token ids on the host) and the
Triton kernels with their combination in :mod:`sgopd_kernels.triton.parallel`
(nothing read on the host).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from . import _dispatch
from . import _rows as C
from ._options import RowOptions
from .autograd import FAMILIES


def check_shards(local_vocab: int, group, device) -> int:
    """The global vocabulary; raises on every rank alike if the shard widths differ."""
    w = torch.tensor([local_vocab, -local_vocab], dtype=torch.int64, device=device)
    dist.all_reduce(w, op=dist.ReduceOp.MAX, group=group)
    widest, narrowest = int(w[0]), -int(w[1])
    if widest != narrowest:
        raise ValueError(f"student_logits: the vocabulary shards of the process group have "
                         f"different widths ({narrowest} to {widest}); shards of equal width "
                         "are expected (rank r holds columns [r V, (r + 1) V))")
    return local_vocab * dist.get_world_size(group=group)


def shard_start(local_vocab: int, group) -> int:
    """The first global column of this rank's shard (shards of equal width)."""
    return dist.get_rank(group=group) * local_vocab


def all_reduce(x: Tensor, op, group) -> Tensor:
    dist.all_reduce(x, op=op, group=group)
    return x


def finite(m: Tensor) -> Tensor:
    """Infinite row maxima (a row without support) as 0, a harmless reference."""
    return torch.where(torch.isinf(m), torch.zeros_like(m), m)


def log_total(m: Tensor, total: Tensor) -> Tensor:
    """m + log(total); +inf for an empty row (total 0), so that z - lse is -inf there, not NaN."""
    return torch.where(total == 0, torch.full_like(m, math.inf), m + total.log())


class _ShardRows(torch.autograd.Function):
    """The table of one family's loss on a vocabulary shard; gradient to the student's shard."""

    @staticmethod
    def forward(ctx, student, family, teacher, tokens, sign, opts, group, backend):
        prefix = FAMILIES[family].prefix
        mod = _dispatch.module(backend, parallel=True, family=family)
        table = getattr(mod, f"{prefix}_rows_parallel")(student, *teacher, tokens, sign, opts,
                                                        group)
        ctx.save_for_backward(student, tokens, table, *teacher)
        ctx.args = (mod, prefix, opts, group)
        return table

    @staticmethod
    def backward(ctx, grad):
        student, tokens, table, *teacher = ctx.saved_tensors
        grad_student = None
        if ctx.needs_input_grad[0]:
            mod, prefix, opts, group = ctx.args
            grad_student = getattr(mod, f"{prefix}_rows_parallel_backward")(
                grad[:, C.LOSS].contiguous(), student, *teacher, tokens, table, opts, group)
        return (grad_student,) + (None,) * 7


def rows(family: str, student: Tensor, teacher: tuple, tokens: Tensor, sign, opts: RowOptions,
         group, backend: str) -> Tensor:
    """The per-row table of ``family`` for this rank's shard ``student`` (..., V_local)."""
    return _ShardRows.apply(student, family, teacher, tokens, sign, opts, group, backend)
