"""The compiled module of csrc/ (``sgopd_kernels._C``), or None when it is not built.

The extension is optional: a build without a C++ compiler, with ``SGOPD_NO_EXT=1``,
or whose compilation failed installs the pure-Python package, and importing
sgopd_kernels never fails because of it. ``error`` says why ``module`` is None.
"""

from __future__ import annotations

from typing import Optional

module = None
error: Optional[str] = None

try:
    from . import _C as module  # noqa: F811
except Exception as e:  # not built, built for another Python, a missing shared library, ...
    module = None
    error = f"{type(e).__name__}: {e}"
