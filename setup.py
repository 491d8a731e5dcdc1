"""Build script.

The pure-Python package (reference path and Triton kernels) needs nothing
compiled. The CUDA kernels of csrc/ are an optional extension: they are not
part of this release, so no extension is built and ``sgopd_kernels.cuda``
reports the compiled backend as unavailable.
"""

from setuptools import setup

setup()
