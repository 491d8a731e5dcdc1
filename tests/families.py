"""The loss families and backends that the shared tests run over.

Each family names its public loss, its float64 oracle and how to build a
teacher for given student logits; ``test_families.py`` (edge cases,
determinism, torch.compile) and ``test_footprint.py`` (allocations, host
reads) run over every family x backend below, so a new family or backend
inherits them by one entry here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
import torch

import sgopd_kernels as sk
from sgopd_kernels import _dispatch
from sgopd_kernels._options import Divergence
from conftest import TRITON_DEVICE
from helpers import oracle_opd, oracle_sampled, oracle_topk


@dataclass(frozen=True)
class Family:
    name: str                # the key of sgopd_kernels._rows.WIDTH
    loss: Callable           # loss(student, *teacher, tokens, verifier, **keywords)
    oracle: Callable         # oracle(student, *teacher, tokens, verifier, **keywords) (float64)
    teacher: Callable        # teacher(student, generator) -> the teacher's tensors, a tuple
    variants: tuple = ({},)  # keyword sets that exercise the family (each divergence, ...)

    def __call__(self, student, teacher, tokens, verifier=None, **kw):
        return self.loss(student, *teacher, tokens, verifier, **kw)


def _teacher_logits(s, gen):
    extra = 5  # a padded teacher vocabulary
    t = torch.randn(*s.shape[:-1], s.shape[-1] + extra, generator=gen)
    return (t.to(s.dtype).to(s.device),)


def _teacher_logprobs(s, gen):
    return ((-5 * torch.rand(*s.shape[:-1], generator=gen)).to(s.device),)


def _teacher_topk(s, gen):
    """A teacher's top-k (k = 6) of random logits, with an unused slot in every other position,
    and a log-probability for each sampled token (y's own category where y is not in the
    top-k)."""
    vocab, lead = s.shape[-1], s.shape[:-1]
    k = min(6, vocab)
    lp = torch.log_softmax(2 * torch.randn(*lead, vocab, generator=gen), -1)
    ids = lp.topk(k, -1).indices
    logprobs = lp.gather(-1, ids)
    ids.view(-1, k)[::2, -1] = -1
    token_logprobs = -5 - 3 * torch.rand(lead, generator=gen)
    return tuple(x.to(s.device) for x in (ids, logprobs, token_logprobs))


def _topk_loss(student, ids, logprobs, token_logprobs, tokens, verifier=None, **kw):
    return sk.topk_opd_loss(student, ids, logprobs, tokens, verifier,
                            teacher_token_logprobs=token_logprobs, **kw)


FAMILIES = [
    Family("logits", sk.gated_opd_loss, oracle_opd, _teacher_logits, (
        dict(beta=0.2),
        dict(beta=0.2, divergence="forward_kl", teacher_temperature=0.8),
        dict(beta=0.2, divergence="jsd", jsd_beta=0.3))),
    Family("sampled", sk.sampled_opd_loss, oracle_sampled, _teacher_logprobs,
           (dict(extrapolation=1.5),)),
    Family("topk", _topk_loss, oracle_topk, _teacher_topk, (
        dict(beta=0.2, tail_floor=1e-5),
        dict(beta=0.2, divergence="forward_kl"),
        dict(beta=0.2, divergence="jsd", jsd_beta=0.3, tail_floor=1e-5))),
]


def _runs(name: str, device: str) -> bool:
    cap = _dispatch.BY_NAME[name]
    return cap.unavailable(device) is None and device in cap.devices


# (backend, the device of its tensors here) for every backend that runs on this machine
BACKENDS = [(name, dev) for name, dev in (("torch", "cpu"), ("triton", TRITON_DEVICE),
                                          ("cpu", "cpu"), ("cuda", "cuda"))
            if _runs(name, dev)]
KERNELS = [(name, dev) for name, dev in BACKENDS if name != "torch"]


def _implements(backend: str, family: Family, options: dict) -> bool:
    cap = _dispatch.BY_NAME[backend]
    div = Divergence.parse(options.get("divergence", "reverse_kl"))
    return cap.supports(family.name, _dispatch.SINGLE) and cap.implements(family.name, div)


def cases(backends):
    """pytest parameters (family, options, (backend, device)) of every family variant on
    every backend of ``backends`` that implements it."""
    return [pytest.param(f, opts, b, id=f"{f.name}-{opts.get('divergence', 'default')}-{b[0]}")
            for f in FAMILIES for opts in f.variants for b in backends
            if _implements(b[0], f, opts)]
