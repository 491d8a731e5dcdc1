"""Phased teacher sampling: the schedule and the rollout picker."""

import math

import pytest
import torch

import sgopd_kernels as sk


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_fraction_decays_from_rho0_to_zero(schedule):
    k = 10
    values = [sk.teacher_fraction(s, rho0=0.5, cold_start_steps=k, schedule=schedule)
              for s in range(k + 5)]
    assert values[0] == 0.5
    assert all(a > b for a, b in zip(values[:k], values[1:k + 1]))  # strictly decreasing
    assert values[k:] == [0.0] * 5  # purely on-policy after the cold start
    mid = sk.teacher_fraction(5, rho0=0.5, cold_start_steps=k, schedule=schedule)
    assert mid == pytest.approx(0.25)  # both shapes pass rho0 / 2 half way
    quarter = sk.teacher_fraction(2, rho0=1.0, cold_start_steps=8, schedule=schedule)
    assert quarter == pytest.approx(0.75 if schedule == "linear"
                                    else 0.5 * (1 + math.cos(math.pi / 4)))


def test_fraction_without_cold_start():
    assert sk.teacher_fraction(0, rho0=0.7, cold_start_steps=0) == 0.0


@pytest.mark.parametrize("kw,text", [
    (dict(step=-1), "step"), (dict(step=1.5), "step"), (dict(cold_start_steps=-2), "cold_start"),
    (dict(rho0=1.5), "rho0"), (dict(rho0=-0.1), "rho0"), (dict(schedule="exp"), "schedule"),
])
def test_fraction_validation(kw, text):
    args = dict(step=0, rho0=0.5, cold_start_steps=10)
    args.update(kw)
    step = args.pop("step")
    with pytest.raises(ValueError, match=text):
        sk.teacher_fraction(step, **args)


def test_select_counts_and_only_correct_teacher_rollouts():
    correct = torch.tensor([[True, False, True, True],    # 3 correct
                            [False, False, False, False],  # none: stays on-policy
                            [False, True, False, False]])  # 1 correct: fewer than wanted
    gen = torch.Generator().manual_seed(0)
    keep, take = sk.select_teacher_rollouts(correct, group_size=8, fraction=0.3, generator=gen)
    assert keep.shape == (3, 8) and take.shape == (3, 4)
    assert keep.dtype == torch.bool and take.dtype == torch.bool
    # round(0.3 * 8) = 2 wanted per prompt
    assert take.sum(-1).tolist() == [2, 0, 1]
    assert keep.sum(-1).tolist() == [6, 8, 7]
    assert not (take & ~correct).any()  # never an unverified teacher rollout


def test_select_extremes_and_rounding():
    correct = torch.ones(2, 16, dtype=torch.bool)
    keep, take = sk.select_teacher_rollouts(correct, 4, 0.0)
    assert keep.all() and not take.any()
    keep, take = sk.select_teacher_rollouts(correct, 4, 1.0)
    assert not keep.any() and take.sum(-1).tolist() == [4, 4]
    keep, take = sk.select_teacher_rollouts(correct, 4, 0.125)  # 0.5 rounds up
    assert take.sum(-1).tolist() == [1, 1]


def test_select_is_reproducible_and_uniform():
    correct = torch.ones(4000, 4, dtype=torch.bool)
    a = sk.select_teacher_rollouts(correct, 4, 0.5, generator=torch.Generator().manual_seed(3))
    b = sk.select_teacher_rollouts(correct, 4, 0.5, generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    keep, take = a
    # each position is dropped / taken with probability 1/2
    torch.testing.assert_close(keep.float().mean(0), torch.full((4,), 0.5), atol=0.04, rtol=0)
    torch.testing.assert_close(take.float().mean(0), torch.full((4,), 0.5), atol=0.04, rtol=0)


@pytest.mark.parametrize("args,exc,text", [
    ((torch.ones(2, 3), 4, 0.5), TypeError, "teacher_correct"),
    ((torch.ones(3, dtype=torch.bool), 4, 0.5), TypeError, "teacher_correct"),
    ((torch.ones(2, 3, dtype=torch.bool), 0, 0.5), ValueError, "group_size"),
    ((torch.ones(2, 3, dtype=torch.bool), 4, 1.2), ValueError, "fraction"),
])
def test_select_validation(args, exc, text):
    with pytest.raises(exc, match=text):
        sk.select_teacher_rollouts(*args)


# ---------------------------------------------------------------------------
# Veto's bridge exponent

def test_beta_constant_is_beta0_at_every_step():
    assert [sk.beta_schedule(s, beta0=0.3, schedule="constant") for s in (0, 7, 10 ** 6)] \
        == [0.3, 0.3, 0.3]
    assert sk.beta_schedule(5, beta0=0.3, decay_steps=2, schedule="constant") == 0.3


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_beta_decays_from_beta0_to_zero(schedule):
    k = 8
    values = [sk.beta_schedule(s, beta0=0.4, decay_steps=k, schedule=schedule) for s in range(k + 3)]
    assert values[0] == 0.4
    assert all(a > b for a, b in zip(values[:k], values[1:k + 1]))
    assert values[k:] == [0.0] * 3
    assert values[4] == pytest.approx(0.2)  # both shapes pass beta0 / 2 half way
    expected = 0.4 * (1 - 2 / k) if schedule == "linear" else 0.2 * (1 + math.cos(math.pi * 2 / k))
    assert values[2] == pytest.approx(expected)
    # the schedules differ away from the ends and the middle
    other = "cosine" if schedule == "linear" else "linear"
    assert values[2] != pytest.approx(sk.beta_schedule(2, beta0=0.4, decay_steps=k, schedule=other))


def test_beta_without_decay_steps_is_zero():
    assert sk.beta_schedule(0, beta0=0.5, decay_steps=0) == 0.0


@pytest.mark.parametrize("kw,text", [
    (dict(step=-1), "step"), (dict(step=2.0), "step"), (dict(beta0=-0.1), "beta0"),
    (dict(beta0=float("nan")), "beta0"), (dict(beta0=True), "beta0"),
    (dict(decay_steps=-1), "decay_steps"), (dict(decay_steps=None), "decay_steps"),
    (dict(decay_steps=3.5), "decay_steps"), (dict(schedule="exp"), "schedule"),
    (dict(schedule="constant", decay_steps=-2), "decay_steps"),
])
def test_beta_validation(kw, text):
    args = dict(step=0, beta0=0.5, decay_steps=10, schedule="linear")
    args.update(kw)
    step = args.pop("step")
    with pytest.raises(ValueError, match=text):
        sk.beta_schedule(step, **args)
