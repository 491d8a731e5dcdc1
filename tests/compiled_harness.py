"""The public losses on the compiled backend, in either design of its gradient.

The compiled kernels write the gradient in forward (the capability table's
``stores_grad``; ``api._StoredGradient`` scales it by the incoming gradient).
They also implement the recompute design, which the public call takes for
float16 logits; ``design="recompute"`` runs it for any dtype by turning the
capability off for the call, so the tests hold both designs to the oracle.
"""

from __future__ import annotations

import contextlib
import dataclasses

import sgopd_kernels as sk
from sgopd_kernels import _dispatch
from sgopd_kernels.api import row_options as make_opts  # noqa: F401 (the tests' options)


@contextlib.contextmanager
def _design(backend: str, design: str):
    cap = _dispatch.BY_NAME[backend]
    if design not in ("stored", "recompute"):
        raise ValueError(f"design: expected 'stored' or 'recompute', got {design!r}")
    _dispatch.BY_NAME[backend] = dataclasses.replace(cap, stores_grad=design == "stored")
    try:
        yield
    finally:
        _dispatch.BY_NAME[backend] = cap


def _backend(student) -> str:
    return "cuda" if student.is_cuda else "cpu"


def gated_loss(student, teacher, tokens, verifier=None, *, design="stored", **kw):
    backend = _backend(student)
    with _design(backend, design):
        return sk.gated_opd_loss(student, teacher, tokens, verifier, backend=backend, **kw)


def sampled_loss(student, teacher_logprobs, tokens, verifier=None, *, design="stored", **kw):
    backend = _backend(student)
    with _design(backend, design):
        return sk.sampled_opd_loss(student, teacher_logprobs, tokens, verifier,
                                   backend=backend, **kw)
