"""Triton kernels: one file per kernel family, each kernel beside its launcher."""

from .logits import opd_rows, opd_rows_backward
from .sampled import sampled_rows, sampled_rows_backward

__all__ = ["opd_rows", "opd_rows_backward", "sampled_rows", "sampled_rows_backward"]
