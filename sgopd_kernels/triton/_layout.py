"""How a (..., V) tensor of any strides is addressed row by row, without a copy."""

from __future__ import annotations

from typing import NamedTuple

import torch


class RowLayout(NamedTuple):
    tensor: torch.Tensor  # the tensor the kernel reads (the input itself unless it had to be copied)
    d1: int               # row r lives at (r // d1) * st0 + (r % d1) * st1
    st0: int
    st1: int
    stv: int              # stride along the vocabulary


def row_layout(x: torch.Tensor) -> RowLayout:
    """Collapse the leading dims of ``x`` into at most two strided dims.

    A contiguous (N, V) tensor, a (B, T, V) slice such as ``logits[:, :-1]``
    and a teacher padded to a larger vocabulary are all read in place. Only a
    tensor whose leading dims need three or more independent strides is
    copied (it is reshaped to (N, V) first).
    """
    lead = list(zip(x.shape[:-1], x.stride()[:-1]))
    lead = [(n, st) for n, st in lead if n != 1]
    merged: list = []
    for n, st in lead:  # outermost first
        if merged and merged[-1][1] == st * n:
            pn, _ = merged[-1]
            merged[-1] = (pn * n, st)
        else:
            merged.append((n, st))
    stv = x.stride(-1) if x.shape[-1] > 1 else 1
    if len(merged) > 2:
        y = x.reshape(-1, x.shape[-1])
        return RowLayout(y, 1, y.stride(0), 0, y.stride(1) if y.shape[1] > 1 else 1)
    if not merged:
        return RowLayout(x, 1, 0, 0, stv)
    if len(merged) == 1:
        return RowLayout(x, 1, merged[0][1], 0, stv)
    (n0, st0), (n1, st1) = merged
    return RowLayout(x, n1, st0, st1, stv)
