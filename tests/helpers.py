"""Shared test helpers: the float64 oracle of the public API and tolerances."""

from __future__ import annotations

import math
import os

import torch
from hypothesis import HealthCheck, Phase, settings

from sgopd_kernels import reference
from sgopd_kernels.api import row_options

KERNEL_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def interpreted_hypothesis(max_examples: int):
    """hypothesis settings for tests that run the Triton interpreter: derandomized, no deadline
    and no shrinking (which takes minutes there; the failing example is printed as drawn)."""
    return settings(max_examples=max_examples, deadline=None, derandomize=True,
                    phases=[Phase.explicit, Phase.reuse, Phase.generate],
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# unit roundoff of the gradient's dtype (the kernels compute in float32 and round once)
ROUNDOFF = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11,
            torch.float64: 2.0 ** -53}
EPS32 = 2.0 ** -24
# half the spacing of the subnormal numbers where it is coarse enough to matter
SUBNORMAL = {torch.float16: 2.0 ** -25}


def sign_rows(verifier, lead):
    """The verifier as one float64 sign per position, broadcast as the spec says."""
    if verifier is None:
        return None
    v = verifier
    if v.dtype == torch.bool:
        v = torch.where(v, 1.0, -1.0).double()
    else:
        v = v.double()
        v = torch.where(torch.isnan(v), v, torch.sign(v))
    if v.dim() < len(lead):
        v = v.reshape(tuple(v.shape) + (1,) * (len(lead) - v.dim()))
    return torch.broadcast_to(v, lead).reshape(-1)


def _reduce(loss_rows, valid, weights, lead, reduction):
    if weights is not None:
        loss_rows = torch.where(valid, loss_rows * torch.broadcast_to(
            weights.to(loss_rows.dtype).reshape(tuple(weights.shape) + (1,) * (len(lead) - weights.dim())),
            lead).reshape(-1), torch.zeros_like(loss_rows))
    if reduction == "none":
        return loss_rows.reshape(lead)
    if reduction == "sum":
        return loss_rows.sum()
    return loss_rows.sum() / max(int(valid.sum()), 1)


def _stats(r, valid):
    n = max(int(valid.sum()), 1)
    return dict(
        consistent_frac=float(((r["gate"] > 0) & valid).sum()) / n,
        conflict_frac=float(((r["gate"] < 0) & valid).sum()) / n,
        mean_delta=float(r["delta"].sum()) / n,
        teacher_kl=float(r["teacher_kl"].sum()) / n,
        student_entropy=float(r["entropy"].sum()) / n,
        divergence=float(r["loss"].detach().sum()) / n,
    )


def oracle_opd(student, teacher, tokens, verifier=None, *, beta=0.0, extrapolation=1.8,
               interpolation=1.0, divergence="reverse_kl", jsd_beta=0.5, temperature=1.0,
               teacher_temperature=None, ignore_index=-100, weights=None, reduction="mean",
               grad_out=None, dtype=torch.float64):
    """(loss, stats dict, grad) of gated_opd_loss through torch.autograd, in float64.

    ``dtype=torch.float32`` gives the same computation as eager float32 PyTorch
    would make it: the yardstick of the fp32 rounding error a kernel may have.
    """
    lead = student.shape[:-1]
    vocab = student.shape[-1]
    s = student.detach().to(dtype).reshape(-1, vocab).requires_grad_(True)
    t = teacher.detach().to(dtype).reshape(-1, teacher.shape[-1])[:, :vocab]
    tok = tokens.reshape(-1).long()
    opts = row_options(beta=beta, extrapolation=extrapolation, interpolation=interpolation,
                       divergence=divergence, jsd_beta=jsd_beta, temperature=temperature,
                       teacher_temperature=teacher_temperature, ignore_index=ignore_index)
    r = reference.bridge_terms(s, t, tok, _cast(sign_rows(verifier, lead), dtype), opts)
    valid = tok != ignore_index
    loss = _reduce(r["loss"], valid, weights, lead, reduction)
    loss.backward(torch.ones_like(loss) if grad_out is None else grad_out.to(dtype))
    return loss.detach(), _stats(r, valid), s.grad.reshape(student.shape)


def _cast(x, dtype):
    return None if x is None else x.to(dtype)


def oracle_sampled(student, teacher_logprobs, tokens, verifier=None, *, extrapolation=1.8,
                   interpolation=1.0, temperature=1.0, ignore_index=-100, weights=None,
                   reduction="mean", grad_out=None, dtype=torch.float64):
    lead = student.shape[:-1]
    vocab = student.shape[-1]
    s = student.detach().to(dtype).reshape(-1, vocab).requires_grad_(True)
    tok = tokens.reshape(-1).long()
    opts = row_options(extrapolation=extrapolation, interpolation=interpolation,
                       temperature=temperature, ignore_index=ignore_index)
    r = reference.sampled_terms(s, teacher_logprobs.detach().to(dtype).reshape(-1), tok,
                                _cast(sign_rows(verifier, lead), dtype), opts)
    valid = tok != ignore_index
    loss = _reduce(r["loss"], valid, weights, lead, reduction)
    loss.backward(torch.ones_like(loss) if grad_out is None else grad_out.to(dtype))
    return loss.detach(), _stats(r, valid), s.grad.reshape(student.shape)


def assert_close(actual, expected, *, rtol, atol, what=""):
    """Elementwise |a - e| <= atol + rtol |e|, with NaN and +-inf required at the same places.

    ``atol`` is a number or a tensor broadcastable to ``expected``."""
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    assert torch.equal(nan_a, nan_e), f"{what}: NaN at {nan_a.nonzero().tolist()} vs " \
                                      f"{nan_e.nonzero().tolist()}"
    inf_e = torch.isinf(e)
    assert torch.equal(a[inf_e], e[inf_e]) and not torch.isinf(a[~inf_e]).any(), \
        f"{what}: infinities differ"
    fin = torch.isfinite(e)
    err = (a[fin] - e[fin]).abs()
    if isinstance(atol, torch.Tensor):  # an elementwise floor
        atol = torch.broadcast_to(atol.detach().double().cpu(), e.shape)[fin]
    bound = atol + rtol * e[fin].abs()
    if err.numel():
        worst = int((err - bound).argmax())
        assert bool((err <= bound).all()), (
            f"{what}: |err| {float(err[worst]):.3g} > bound {float(bound[worst]):.3g} "
            f"(actual {float(a[fin][worst]):.6g}, expected {float(e[fin][worst]):.6g})")


def assert_loss_close(actual, expected, what="loss", eager32=None):
    """float32 losses computed in float32 against the float64 oracle; with ``eager32``
    (the same loss computed by eager float32 PyTorch) twice its error is allowed too."""
    scale = max(1.0, float(expected.double().abs().nan_to_num(0, 0, 0).max())) \
        if expected.numel() else 1.0
    atol = 2e-5 * scale
    if eager32 is not None:
        atol += 2 * eager_error(eager32, expected)
    assert_close(actual, expected, rtol=2e-4, atol=atol, what=what)


def eager_error(eager32, expected):
    """Largest |eager float32 - float64| over the finite entries: PyTorch's own error."""
    fin = torch.isfinite(expected) & torch.isfinite(eager32)
    if not fin.any():
        return 0.0
    return float((eager32.double()[fin] - expected.double()[fin]).abs().max())


def logprob_scale(*tensors, temperature=1.0):
    """The magnitude L of the log-probability terms a loss adds up: the largest finite
    |logit| / temperature of each input, plus log V. float32 arithmetic on such terms
    carries absolute errors of about eps32 * L."""
    total = math.log(max(tensors[0].shape[-1], 2))
    for x in tensors:
        fin = x.detach().double()[torch.isfinite(x.detach().double())]
        total += float(fin.abs().max()) / temperature if fin.numel() else 0.0
    return total


def assert_grad_close(actual, expected, dtype, eager32=None, what="grad", scale_l=None,
                      unit=None):
    """A gradient computed in float32 and rounded once to ``dtype``.

    Each entry may differ from the float64 oracle by twice the rounding to
    ``dtype`` plus the float32 yardsticks: four times the largest error that
    eager float32 PyTorch makes on the same inputs (``eager32``; a maximum over
    a tensor, so a factor of 4 rather than 2 absorbs its luck), 8 eps32 * L
    (``scale_l``, see :func:`logprob_scale`) times the largest gradient, and
    4 eps32 * ``unit``, elementwise: the gradient that one ulp of each entry's
    probability carries (p_S x incoming gradient x weight / (count x
    temperature)), the floor where the gradient cancels to ~0 (p = q).
    """
    fin = expected[torch.isfinite(expected)]
    scale = float(fin.abs().max()) if fin.numel() else 0.0
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype} != {dtype}"
    atol = 1e-6 * scale + 1e-12 + SUBNORMAL.get(dtype, 0.0)
    if scale_l is not None:
        atol += 8 * EPS32 * scale_l * scale
    if unit is not None:
        atol = atol + 4 * EPS32 * unit
    if eager32 is not None:
        atol += 4 * eager_error(eager32, expected)
    assert_close(actual, expected, rtol=2 * ROUNDOFF[dtype], atol=atol, what=what)


def oracle_topk(student, ids, logprobs, token_logprobs, tokens, verifier=None, *, beta=0.0,
                extrapolation=1.8, interpolation=1.0, divergence="reverse_kl", jsd_beta=0.5,
                temperature=1.0, tail_floor=1e-7, ignore_index=-100, weights=None,
                reduction="mean", grad_out=None, dtype=torch.float64):
    """(loss, stats dict, grad) of topk_opd_loss through torch.autograd, in ``dtype``;
    ``token_logprobs`` may be None."""
    lead = student.shape[:-1]
    vocab = student.shape[-1]
    k = ids.shape[-1]
    s = student.detach().to(dtype).reshape(-1, vocab).requires_grad_(True)
    tok = tokens.reshape(-1).long()
    opts = row_options(beta=beta, extrapolation=extrapolation, interpolation=interpolation,
                       divergence=divergence, jsd_beta=jsd_beta, temperature=temperature,
                       ignore_index=ignore_index, tail_floor=tail_floor)
    ttl = None if token_logprobs is None else token_logprobs.detach().to(dtype).reshape(-1)
    r = reference.topk_terms(s, ids.reshape(-1, k).long(),
                             logprobs.detach().to(dtype).reshape(-1, k), ttl, tok,
                             _cast(sign_rows(verifier, lead), dtype), opts)
    valid = tok != ignore_index
    loss = _reduce(r["loss"], valid, weights, lead, reduction)
    loss.backward(torch.ones_like(loss) if grad_out is None else grad_out.to(dtype))
    return loss.detach(), _stats(r, valid), s.grad.reshape(student.shape)


def assert_kernel_matches_oracle(loss, stats, grad, student, want, eager, *, teacher, tokens,
                                 temperature, reduction, weights=None, grad_out=None,
                                 gate_slack=0.0):
    """A kernel's loss, statistics and gradient against the float64 oracle's ``want`` =
    (loss, stats dict, grad), with eager float32 PyTorch's ``eager`` (the same, in float32) as
    the yardstick of float32's error (:func:`assert_loss_close`, :func:`assert_grad_close`).

    ``teacher``: the teacher's tensors whose magnitudes enter the log-probability scale.
    ``gate_slack``: the fraction of rows whose delta lies within float32's resolution of 0
    (not 0 itself), whose gate sign float32 cannot decide: the gate fractions may differ by it.
    """
    (want_loss, want_stats, g_want), (eager_loss, eager_stats, g_eager) = want, eager
    assert loss.dtype == torch.float32
    assert_loss_close(loss, want_loss, eager32=eager_loss)
    for name, value in want_stats.items():
        got = getattr(stats, name).reshape(1)
        if gate_slack and name in ("consistent_frac", "conflict_frac") \
                and abs(float(got) - value) <= gate_slack + 1e-6:
            continue
        assert_loss_close(got, torch.tensor([value]), what=name,
                          eager32=torch.tensor([eager_stats[name]]))
    assert grad.shape == student.shape and grad.dtype == student.dtype
    scale_l = logprob_scale(student, *teacher, temperature=temperature)
    count = int((tokens != -100).sum()) if reduction == "mean" else 1
    p_s = torch.softmax(student.double() / temperature, dim=-1).nan_to_num(0.0)
    unit = p_s * (1.0 if weights is None else float(weights.abs().max())) * \
        (1.0 if grad_out is None else float(grad_out.abs().max())) / \
        (max(count, 1) * temperature)
    assert_grad_close(grad, g_want, student.dtype, g_eager, scale_l=scale_l, unit=unit)


def trl_tail_bucket():
    """TRL's ``(_add_tail_bucket, _jsd_divergence)`` of its server distillation, or None where
    trl (or that module) is not importable."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    try:
        from trl.experimental.server_distillation.server_distillation_trainer import (
            _add_tail_bucket, _jsd_divergence)
    except Exception:
        return None
    return _add_tail_bucket, _jsd_divergence
