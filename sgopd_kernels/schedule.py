"""Schedules (README, "Options"): Veto's bridge exponent, and phased teacher sampling at cold start.

:func:`beta_schedule` gives Veto's beta at a step: constant, or decayed from ``beta0``
to 0 (linearly or as a cosine), as Veto decays it over training.

At step ``k`` a fraction ``rho(k)`` of each prompt's rollout group is replaced
by teacher rollouts that the verifier endorsed; ``rho`` decays from ``rho0``
to 0 over the cold-start phase, after which the run is purely on-policy. The
teacher rollouts then enter the same loss with a positive verdict (sigma = +1).
Nothing here generates text or knows a trainer: the picker takes verdicts and
returns masks.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Tuple

import torch
from torch import Tensor

SCHEDULES = ("linear", "cosine")
BETA_SCHEDULES = ("constant", "linear", "cosine")


def _check_step(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name}: expected an int >= 0, got {value!r}")


def _decay(step: int, steps: int, schedule: str) -> float:
    """The factor in [0, 1] of a decay from 1 at step 0 to 0 at ``steps`` (0 from then on)."""
    if step >= steps:
        return 0.0
    t = step / steps
    if schedule == "linear":
        return 1.0 - t
    return 0.5 * (1.0 + math.cos(math.pi * t))


def beta_schedule(step: int, *, beta0: float, decay_steps: Optional[int] = None,
                  schedule: str = "linear") -> float:
    """Veto's bridge exponent beta at ``step``: the ``beta`` of :func:`gated_opd_loss`.

    ``"constant"``: ``beta0`` at every step (``decay_steps`` is not used and may be None).
    ``"linear"``: ``beta0 * (1 - step / decay_steps)``; ``"cosine"``:
    ``beta0 * (1 + cos(pi * step / decay_steps)) / 2``; both are 0 from ``decay_steps`` on,
    and ``decay_steps=0`` means no bridge (always 0).
    """
    _check_step("step", step)
    if isinstance(beta0, bool) or not isinstance(beta0, numbers.Real) \
            or not math.isfinite(float(beta0)) or float(beta0) < 0:
        raise ValueError(f"beta0: expected a finite number >= 0, got {beta0!r}")
    if schedule not in BETA_SCHEDULES:
        raise ValueError(f"schedule: expected one of {BETA_SCHEDULES}, got {schedule!r}")
    if schedule == "constant":
        if decay_steps is not None:
            _check_step("decay_steps", decay_steps)
        return float(beta0)
    if decay_steps is None:
        raise ValueError(f"decay_steps: schedule={schedule!r} decays beta0 to 0 over decay_steps "
                         "steps; pass an int >= 0 (or schedule='constant')")
    _check_step("decay_steps", decay_steps)
    return float(beta0) * _decay(step, decay_steps, schedule)


def teacher_fraction(step: int, *, rho0: float, cold_start_steps: int,
                     schedule: str = "linear") -> float:
    """rho(step): the fraction of each rollout group taken from the teacher.

    ``rho0`` at step 0, decaying to 0 at ``cold_start_steps`` (linearly, or as
    ``rho0 * (1 + cos(pi * step / cold_start_steps)) / 2``), and 0 from then on.
    ``cold_start_steps=0`` means no cold start (always 0).
    """
    for name, value in (("step", step), ("cold_start_steps", cold_start_steps)):
        _check_step(name, value)
    if isinstance(rho0, bool) or not isinstance(rho0, numbers.Real) \
            or not 0.0 <= float(rho0) <= 1.0:
        raise ValueError(f"rho0: expected a number in [0, 1], got {rho0!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule: expected one of {SCHEDULES}, got {schedule!r}")
    return float(rho0) * _decay(step, cold_start_steps, schedule)


def _random_pick(candidates: Tensor, count: Tensor, generator) -> Tensor:
    """Per row, ``count`` of the True entries of ``candidates`` chosen uniformly at random."""
    keys = torch.rand(candidates.shape, generator=generator, device=candidates.device)
    keys = torch.where(candidates, keys, torch.full_like(keys, 2.0))  # non-candidates last
    rank = keys.argsort(dim=-1).argsort(dim=-1)  # each entry's place in its row's order
    return rank < count.unsqueeze(-1)


def select_teacher_rollouts(
    teacher_correct: Tensor,
    group_size: int,
    fraction: float,
    *,
    generator: Optional[torch.Generator] = None,
) -> Tuple[Tensor, Tensor]:
    """Which student rollouts to keep and which teacher rollouts replace the others.

    Args:
        teacher_correct: (P, G_T) bool, the verifier's verdict on each of the G_T teacher
            rollouts of each of P prompts. Only correct ones qualify.
        group_size: G, the number of student rollouts per prompt.
        fraction: rho in [0, 1], e.g. :func:`teacher_fraction` of the step.
        generator: a ``torch.Generator`` for reproducible picks; the random keys are drawn on
            its device.

    Per prompt, ``n = min(round(fraction * G), correct teacher rollouts)`` (half rounds
    up): n student rollouts chosen uniformly at random are dropped and n correct
    teacher rollouts chosen uniformly at random take their place, so every group keeps
    G rollouts. A prompt without a correct teacher rollout stays on-policy.

    Returns:
        ``(keep_student (P, G) bool, take_teacher (P, G_T) bool)``; each row of
        ``keep_student`` has ``G - n`` True entries and the same row of ``take_teacher``
        ``n``. Pass the taken teacher rollouts to the loss with a True (correct) verdict.
    """
    if not isinstance(teacher_correct, Tensor) or teacher_correct.dtype != torch.bool \
            or teacher_correct.dim() != 2:
        raise TypeError("teacher_correct: expected a 2-D bool tensor (prompts, teacher "
                        f"rollouts), got {getattr(teacher_correct, 'dtype', None)} "
                        f"{tuple(getattr(teacher_correct, 'shape', ()))}")
    if isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral) \
            or group_size < 1:
        raise ValueError(f"group_size: expected an int >= 1, got {group_size!r}")
    if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) \
            or not 0.0 <= float(fraction) <= 1.0:
        raise ValueError(f"fraction: expected a number in [0, 1], got {fraction!r}")
    device = teacher_correct.device
    if generator is not None:  # draw where the generator lives, return where the input lives
        teacher_correct = teacher_correct.to(generator.device)
    want = math.floor(float(fraction) * group_size + 0.5)
    n = teacher_correct.sum(dim=-1).clamp(max=want)
    take = _random_pick(teacher_correct, n, generator)
    students = torch.ones(teacher_correct.shape[0], group_size, dtype=torch.bool,
                          device=teacher_correct.device)
    keep = ~_random_pick(students, n, generator)
    return keep.to(device), take.to(device)
