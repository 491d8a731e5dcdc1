"""The reference (torch backend) against independent mathematics, in float64."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import sgopd_kernels as sk
from sgopd_kernels import reference
from sgopd_kernels.api import row_options
from helpers import assert_close, oracle_opd, oracle_sampled

DIVS = ["reverse_kl", "forward_kl", "jsd"]


def _inputs(shape=(3, 5), vocab=37, vocab_t=41, scale=3.0, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    s = (scale * torch.randn(*shape, vocab, generator=g)).to(dtype)
    t = (scale * torch.randn(*shape, vocab_t, generator=g)).to(dtype)
    y = torch.randint(0, vocab, shape, generator=g)
    return s, t, y


def _numpy_bridge(s, t, y, sign, beta, lam_pos, lam_neg, divergence, tau, tau_t=None, pi=0.5):
    """Per-row loss straight from the definition q ~ p_T^a p_S^b, in numpy float64."""
    out = []
    for row in range(s.shape[0]):
        zs = s[row] / tau
        zt = t[row] / (tau if tau_t is None else tau_t)
        ps = np.exp(zs - zs.max())
        ps /= ps.sum()
        pt = np.exp(zt - zt.max())
        pt /= pt.sum()
        delta = math.log(pt[y[row]]) - math.log(ps[y[row]])
        g = np.sign(delta) * (0.0 if sign is None else sign[row])
        lam = lam_pos if g > 0 else (lam_neg if g < 0 else 1.0)
        a, b = lam, 1.0 - lam + beta
        logq = a * np.log(pt) + b * np.log(ps)
        q = np.exp(logq - logq.max())
        q /= q.sum()
        if divergence == "reverse_kl":
            out.append(float(np.sum(ps * (np.log(ps) - np.log(q)))))
        elif divergence == "forward_kl":
            out.append(float(np.sum(q * (np.log(q) - np.log(ps)))))
        else:  # pi KL(q || m) + (1 - pi) KL(p_S || m)
            m = (1 - pi) * ps + pi * q
            out.append(float(pi * np.sum(q * np.log(q / m))
                             + (1 - pi) * np.sum(ps * np.log(ps / m))))
    return np.array(out)


@pytest.mark.parametrize("divergence", DIVS)
@pytest.mark.parametrize("beta", [0.0, 0.35])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("tau_t", [None, 0.6])
def test_rows_match_definition(divergence, beta, gated, tau_t):
    s, t, y = _inputs(shape=(12,), vocab=23, vocab_t=23, seed=1)
    sign = np.array([1, -1, 0, 1] * 3, dtype=np.float64) if gated else None
    verifier = torch.tensor(sign) if gated else None
    loss = sk.gated_opd_loss(s, t, y, verifier, beta=beta, extrapolation=1.7,
                             interpolation=0.6, divergence=divergence, jsd_beta=0.3,
                             temperature=1.3, teacher_temperature=tau_t, reduction="none",
                             backend="torch")
    want = _numpy_bridge(s.numpy(), t.numpy(), y.numpy(), sign, beta, 1.7, 0.6,
                         divergence, 1.3, tau_t, pi=0.3)
    assert_close(loss, torch.tensor(want), rtol=3e-7, atol=1e-9, what="loss rows")


@pytest.mark.parametrize("divergence", DIVS[:2])
def test_plain_kl_at_beta_zero_without_gate(divergence):
    """beta = 0, no gate: the library's loss and gradient are the textbook KLs (TRL's GKD ends)."""
    s, t, y = _inputs(shape=(4, 6), vocab=29, vocab_t=29, seed=2)
    s.requires_grad_(True)
    loss = sk.gated_opd_loss(s, t, y, divergence=divergence, temperature=0.7, backend="torch")
    (g,) = torch.autograd.grad(loss, s)
    s2 = s.detach().clone().requires_grad_(True)
    lp_s = torch.log_softmax(s2 / 0.7, -1)
    lp_t = torch.log_softmax(t / 0.7, -1)
    if divergence == "reverse_kl":  # KL(p_S || p_T)
        want = F.kl_div(lp_t, lp_s, log_target=True, reduction="none").sum(-1).mean()
    else:  # KL(p_T || p_S)
        want = F.kl_div(lp_s, lp_t, log_target=True, reduction="none").sum(-1).mean()
    (g_want,) = torch.autograd.grad(want, s2)
    assert_close(loss, want, rtol=3e-7, atol=1e-9, what="loss")  # the loss is float32
    assert_close(g, g_want, rtol=1e-9, atol=1e-14, what="grad")


@pytest.mark.parametrize("divergence", DIVS)
@pytest.mark.parametrize("beta", [0.0, 0.5])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_closed_form_gradient_matches_autograd(divergence, beta, reduction):
    """The torch backend's closed-form backward against torch.autograd of the formula."""
    s, t, y = _inputs(shape=(3, 7), vocab=31, vocab_t=35, seed=3)
    y[0, 2] = -100
    verifier = torch.tensor([0.7, -2.0, 0.0])
    w = torch.rand(3, 7, generator=torch.Generator().manual_seed(5))
    s = s.requires_grad_(True)
    kw = dict(beta=beta, extrapolation=1.8, interpolation=0.5, divergence=divergence,
              temperature=1.1, teacher_temperature=0.8, weights=w, reduction=reduction)
    loss = sk.gated_opd_loss(s, t, y, verifier, backend="torch", **kw)
    grad_out = torch.randn(loss.shape, dtype=torch.float64) if reduction == "none" else None
    (g,) = torch.autograd.grad(loss, s, grad_out)
    want, _, g_want = oracle_opd(s, t, y, verifier, grad_out=grad_out, **kw)
    assert loss.dtype == torch.float32 and g.dtype == torch.float64
    assert_close(loss, want, rtol=3e-7, atol=1e-9, what="loss")
    # a float32 loss hands back a float32 incoming gradient: float32 rounding for "none"
    rtol = 1e-6 if reduction == "none" else 1e-9
    assert_close(g, g_want, rtol=rtol, atol=1e-13, what="grad")


def test_sampled_gradient_and_expectation():
    """Closed form vs autograd, and E_{y~p_S} of the estimator's gradient = lambda * grad KL."""
    s, t, _ = _inputs(shape=(5,), vocab=11, vocab_t=11, seed=4)
    lam = 1.5
    lp_s = torch.log_softmax(s, -1)
    lp_t = torch.log_softmax(t, -1)
    p_s = lp_s.exp()
    expected = torch.zeros_like(s)
    for y in range(11):
        tok = torch.full((5,), y)
        x = s.clone().requires_grad_(True)
        loss = sk.sampled_opd_loss(x, lp_t[:, y], tok, torch.ones(5), extrapolation=lam,
                                   interpolation=lam, reduction="sum", backend="torch")
        (g,) = torch.autograd.grad(loss, x)
        _, _, g_want = oracle_sampled(x, lp_t[:, y], tok, torch.ones(5), extrapolation=lam,
                                      interpolation=lam, reduction="sum")
        assert_close(g, g_want, rtol=1e-9, atol=1e-14, what=f"grad y={y}")
        expected += p_s[:, y:y + 1] * g
    x = s.clone().requires_grad_(True)
    kl = (torch.log_softmax(x, -1).exp() * (torch.log_softmax(x, -1) - lp_t)).sum()
    (g_kl,) = torch.autograd.grad(kl, x)
    assert_close(expected, lam * g_kl, rtol=1e-9, atol=1e-12, what="E[grad]")


def test_gate_picks_lambda():
    """g > 0 extrapolates, g < 0 interpolates, g = 0 (neutral or no gate) uses lambda = 1."""
    delta = torch.tensor([0.5, 0.5, -0.5, -0.5, 0.5, 0.0, float("nan")], dtype=torch.float64)
    sign = torch.tensor([1.0, -1.0, 1.0, -1.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    lam, g = reference.gate_lambda(delta, sign, 1.8, 0.4)
    assert g.tolist() == [1.0, -1.0, -1.0, 1.0, 0.0, 0.0, 0.0]
    assert lam.tolist() == [1.8, 0.4, 0.4, 1.8, 1.0, 1.0, 1.0]
    lam, g = reference.gate_lambda(delta, None, 1.8, 0.4)
    assert lam.tolist() == [1.0] * 7


def test_veto_bridge_is_teacher_times_student_power():
    """lambda = 1: q ~ p_T * p_S^beta exactly (the Veto target)."""
    s, t, y = _inputs(shape=(2,), vocab=13, vocab_t=13, seed=6)
    r = reference.bridge_terms(s, t, y, None, row_options(beta=0.4, divergence="forward_kl"))
    p_s = torch.softmax(s, -1)
    p_t = torch.softmax(t, -1)
    q = p_t * p_s ** 0.4
    q = q / q.sum(-1, keepdim=True)
    want = (q * (q.log() - p_s.log())).sum(-1)
    assert_close(r["loss"], want, rtol=1e-12, atol=1e-14, what="forward KL to the Veto bridge")


@pytest.mark.parametrize("divergence", DIVS)
def test_masked_vocabulary_entries(divergence):
    """-inf in both models (or the student only) is outside q's support: finite, no NaN."""
    s, t, y = _inputs(shape=(4,), vocab=17, vocab_t=17, seed=7)
    s[:, 3] = float("-inf")
    t[:, 3] = float("-inf")
    s[1, 5] = float("-inf")  # student only
    y[1] = 6
    s = s.requires_grad_(True)
    loss = sk.gated_opd_loss(s, t, y, torch.tensor([True, False, True, True]), beta=0.2,
                             divergence=divergence, reduction="none", backend="torch")
    assert torch.isfinite(loss).all()
    loss.sum().backward()
    assert torch.isfinite(s.grad).all()
    assert (s.grad[:, 3] == 0).all() and s.grad[1, 5] == 0
    # the entry the student masks is outside the support: the loss equals the one computed
    # on the vocabulary without it
    keep = [v for v in range(17) if v not in (3, 5)]
    sub = sk.gated_opd_loss(s.detach()[1:2, keep], t[1:2, keep], torch.tensor([keep.index(6)]),
                            torch.tensor([False]), beta=0.2, divergence=divergence,
                            reduction="none", backend="torch")
    assert_close(loss[1:2], sub, rtol=1e-12, atol=1e-14, what="masked row")


@pytest.mark.parametrize("divergence", DIVS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rows_held_near_huge_constants(divergence, dtype):
    """The loss depends only on differences within a row: rows held near -1e15, near the
    largest float (at tau < 1, where z / tau would overflow), or one-hot 2^27 above -1e15
    give the loss and gradient of the same rows with their maxima subtracted. Computing
    log p as z - logsumexp(z) rounds log Z away there (a uniform row got lp = 0)."""
    s, t, y = _inputs(shape=(6,), vocab=23, vocab_t=23, seed=12, dtype=dtype)
    big = torch.finfo(torch.float32)
    t[0] = -1e15
    s[1] = 1e15
    t[2] = big.max
    s[3] = big.min / 2
    t[4] = -1e15
    t[4, 5] = -1e15 + 2.0 ** 27
    y[4] = 5
    ver = torch.tensor([True, False, True, False, True, True])
    kw = dict(beta=0.2, divergence=divergence, temperature=0.7, reduction="none",
              backend="torch")

    def run(s, t):
        x = s.clone().requires_grad_(True)
        loss = sk.gated_opd_loss(x, t, y, ver, **kw)
        (g,) = torch.autograd.grad(loss.sum(), x)
        return loss.detach(), g

    loss, g = run(s, t)
    want, g_want = run(s - s.amax(-1, keepdim=True), t - t.amax(-1, keepdim=True))
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert torch.isfinite(loss).all()
    assert_close(loss, want, rtol=tol, atol=tol, what="loss")
    assert_close(g, g_want, rtol=tol, atol=tol, what="grad")


def test_teacher_masks_student_mass_reverse_kl_is_inf():
    s, t, y = _inputs(shape=(3,), vocab=9, vocab_t=9, seed=8)
    t[1, 4] = float("-inf")
    loss = sk.gated_opd_loss(s, t, y, reduction="none", backend="torch")
    assert loss[1] == math.inf and torch.isfinite(loss[[0, 2]]).all()
    fkl = sk.gated_opd_loss(s, t, y, reduction="none", divergence="forward_kl", backend="torch")
    assert torch.isfinite(fkl).all()


def test_nan_propagates_to_its_position_only():
    s, t, y = _inputs(shape=(4,), vocab=10, vocab_t=12, seed=9)
    s[2, 1] = float("nan")
    t[0, 7] = float("nan")
    s = s.requires_grad_(True)
    loss = sk.gated_opd_loss(s, t, y, reduction="none", backend="torch")
    assert torch.isnan(loss[[0, 2]]).all() and torch.isfinite(loss[[1, 3]]).all()
    loss.sum().backward()
    assert torch.isfinite(s.grad[[1, 3]]).all()


@pytest.mark.parametrize("divergence", DIVS)
def test_nan_verifier_poisons_its_position_only(divergence):
    s, t, y = _inputs(shape=(4,), vocab=10, vocab_t=10, seed=13)
    v = torch.tensor([1.0, float("nan"), -1.0, 0.0])
    s = s.requires_grad_(True)
    loss = sk.gated_opd_loss(s, t, y, v, divergence=divergence, reduction="none",
                             backend="torch")
    sampled = sk.sampled_opd_loss(s, t[:, 0], y, v, reduction="none", backend="torch")
    for out in (loss, sampled):
        assert torch.isnan(out[1]) and torch.isfinite(out[[0, 2, 3]]).all()
    loss.sum().backward()
    assert torch.isnan(s.grad[1]).all() and torch.isfinite(s.grad[[0, 2, 3]]).all()


def test_all_positions_masked():
    s, t, y = _inputs(shape=(2, 3), vocab=8, vocab_t=8, seed=10)
    y[:] = -100
    s = s.requires_grad_(True)
    loss, stats = sk.gated_opd_loss(s, t, y, return_stats=True, backend="torch")
    loss.backward()
    assert loss.item() == 0.0 and (s.grad == 0).all()
    assert all(float(v) == 0.0 for v in stats)


def test_stats_and_weights():
    s, t, y = _inputs(shape=(2, 4), vocab=15, vocab_t=15, seed=11)
    y[1, 3] = -100
    v = torch.tensor([True, False])
    w = torch.tensor([2.0, 0.5])  # per sequence
    loss, stats = sk.gated_opd_loss(s, t, y, v, weights=w, return_stats=True, backend="torch")
    want, want_stats, _ = oracle_opd(s, t, y, v, weights=w)
    assert_close(loss, want, rtol=1e-6, atol=1e-7)
    for name, value in want_stats.items():
        assert abs(float(getattr(stats, name)) - value) < 1e-6, name
    assert float(stats.consistent_frac) + float(stats.conflict_frac) <= 1.0 + 1e-6
    lp_s = torch.log_softmax(s, -1)
    ent = -(lp_s.exp() * lp_s).sum(-1)
    valid = y != -100
    assert abs(float(stats.student_entropy) - float(ent[valid].mean())) < 1e-6


def test_chunking_bounds_memory(monkeypatch):
    """Rows are processed in chunks: the result does not depend on the chunk size."""
    s, t, y = _inputs(shape=(9,), vocab=40, vocab_t=40, seed=12)
    full = sk.gated_opd_loss(s, t, y, torch.ones(9), reduction="none", backend="torch")
    monkeypatch.setattr(reference, "CHUNK_ELEMENTS", 80)  # two rows a chunk
    chunked = sk.gated_opd_loss(s, t, y, torch.ones(9), reduction="none", backend="torch")
    assert torch.equal(full, chunked)


def test_out_of_range_token_raises_on_torch_path():
    s, t, y = _inputs(shape=(3,), vocab=8, vocab_t=8)
    y[1] = 8
    with pytest.raises(ValueError, match="tokens"):
        sk.gated_opd_loss(s, t, y, backend="torch")
    with pytest.raises(ValueError, match="tokens"):
        sk.sampled_opd_loss(s, torch.zeros(3), y, backend="torch")


def test_jsd_matches_trl_generalized_jsd():
    """divergence="jsd", beta = 0, no gate: TRL's GKD generalized JSD, loss and gradient
    (jsd_beta = TRL's beta; TRL's "batchmean" over the unmasked tokens = "mean" here)."""
    gkd = pytest.importorskip("trl.experimental.gkd.gkd_trainer")
    s, t, y = _inputs(shape=(3, 5), vocab=29, vocab_t=29, seed=14)
    y[1, :2] = -100
    for pi in (0.1, 0.5, 0.9):
        x = s.clone().requires_grad_(True)
        loss = sk.gated_opd_loss(x, t, y, divergence="jsd", jsd_beta=pi, temperature=0.8,
                                 backend="torch")
        (g,) = torch.autograd.grad(loss, x)
        x2 = s.clone().requires_grad_(True)
        want = gkd.GKDTrainer.generalized_jsd_loss(x2, t, labels=y, beta=pi, temperature=0.8)
        (g_want,) = torch.autograd.grad(want, x2)
        assert_close(loss, want, rtol=3e-7, atol=1e-9, what=f"jsd pi={pi}")
        assert_close(g, g_want, rtol=1e-9, atol=1e-14, what=f"jsd grad pi={pi}")


def test_jsd_with_masked_entries_is_finite_and_bounded():
    """JSD stays finite where one model masks the other's mass (KL would be +inf), and a
    masked student entry gets no NaN gradient."""
    s, t, y = _inputs(shape=(4,), vocab=17, vocab_t=17, seed=15)
    t[:, 4] = float("-inf")  # the teacher masks student mass
    s[:, 7] = float("-inf")  # the student masks teacher mass
    x = s.clone().requires_grad_(True)
    loss = sk.gated_opd_loss(x, t, y, torch.tensor([1.0, -1.0, 0.0, 1.0]), beta=0.2,
                             divergence="jsd", jsd_beta=0.4, reduction="none", backend="torch")
    assert torch.isfinite(loss).all() and (loss >= 0).all()
    # a JSD is at most -pi log pi - (1 - pi) log (1 - pi)
    assert (loss <= -(0.4 * math.log(0.4) + 0.6 * math.log(0.6)) + 1e-12).all()
    loss.sum().backward()
    assert torch.isfinite(x.grad).all() and (x.grad[:, 7] == 0).all()


@pytest.mark.parametrize("divergence", DIVS)
def test_stats_divergence_is_the_trained_divergence(divergence):
    s, t, y = _inputs(shape=(2, 4), vocab=15, vocab_t=15, seed=16)
    y[0, 1] = -100
    kw = dict(divergence=divergence, backend="torch")
    rows = sk.gated_opd_loss(s, t, y, reduction="none", **kw)
    _, stats = sk.gated_opd_loss(s, t, y, weights=torch.rand(2, 4), return_stats=True, **kw)
    assert_close(stats.divergence, rows.sum() / 7, rtol=1e-6, atol=0, what="divergence")
    if divergence == "forward_kl":  # no gate, beta = 0: KL(p_T || p_S), not teacher_kl
        lp_s, lp_t = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
        fkl = (lp_t.exp() * (lp_t - lp_s)).sum(-1)[y != -100].mean()
        assert_close(stats.divergence, fkl, rtol=1e-6, atol=1e-7, what="forward KL")
        assert abs(float(stats.teacher_kl) - float(fkl)) > 1e-3
