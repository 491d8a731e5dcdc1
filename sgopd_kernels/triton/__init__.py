"""The Triton backend: one file per kernel family, each kernel beside its launcher.

The backend functions (the interface of :mod:`sgopd_kernels.autograd`) take
(..., V) logits of any strides and a :class:`~sgopd_kernels._options.RowOptions`;
``parallel`` holds the vocabulary-parallel kernels and their combination.
"""

from .logits import opd_rows, opd_rows_backward
from .sampled import sampled_rows, sampled_rows_backward

__all__ = ["opd_rows", "opd_rows_backward", "sampled_rows", "sampled_rows_backward"]
