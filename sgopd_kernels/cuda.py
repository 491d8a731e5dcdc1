"""The compiled CUDA kernels of csrc/, when they are built; ``module`` is None otherwise.

The CUDA extension is optional: the package imports and runs without it.
The compiled kernels are not part of this release yet, so ``module`` is
always None and ``backend="cuda"`` raises a RuntimeError that says so.
"""

from __future__ import annotations

module = None


def available() -> bool:
    return module is not None
