"""The compiled CPU kernels (csrc/cpu) against the float64 oracle.

The same adversarial cases as the Triton tests: strided and transposed views, a
teacher with a larger vocabulary, -inf masks, huge negatives, ties (delta exactly
0 with a verdict), NaN, out-of-range tokens, all rows masked, zero rows; plus
what is particular to these kernels: JSD, a separate teacher temperature,
determinism across thread counts, and the gradient written in forward against
the recompute gradient, bit for bit. The kernels run through
``compiled_harness`` (the public call's reductions and statistics over
``sgopd_kernels.compiled``) in both designs of the gradient.
"""

import math

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import sgopd_kernels as sk
from sgopd_kernels import _ext, _rows as C, compiled, reference
from compiled_harness import _design, gated_loss, make_opts, sampled_loss
from helpers import (_reduce, _stats, assert_grad_close, assert_loss_close,
                     logprob_scale, oracle_opd, oracle_sampled, oracle_topk, sign_rows)
from topk_cases import check_against_oracle, draw_case, top_heavy

needs_cpu_ext = pytest.mark.skipif(not compiled.available("cpu"),
                                   reason=f"the compiled module is not built ({_ext.error})")
pytestmark = needs_cpu_ext
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
HYP = settings(max_examples=40, deadline=None, derandomize=True,
               phases=[Phase.explicit, Phase.reuse, Phase.generate],
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---------------------------------------------------------------------------
# the float64 oracle, extended by JSD and a teacher temperature

def _jsd_terms(s_logits, t_logits, tokens, sign, *, beta, lam_pos, lam_neg, jsd_beta,
               temperature, ignore_index):
    """docs/math.md's JSD in eager PyTorch: m = (1-pi) p_S + pi q, loss = pi KL(q||m) +
    (1-pi) KL(p_S||m), q detached, 0 log 0 = 0, q = 0 outside the joint support."""
    pi = jsd_beta
    lp_s = reference.log_softmax(s_logits / temperature)
    lp_t = reference.log_softmax(t_logits / temperature)
    lp_s_d = lp_s.detach()
    p = lp_s.exp()
    valid = tokens != ignore_index
    y = torch.where(valid, tokens, torch.zeros_like(tokens)).unsqueeze(-1)
    delta = reference.sampled_delta(lp_t.gather(-1, y).squeeze(-1),
                                    lp_s_d.gather(-1, y).squeeze(-1))
    lam, g = reference.gate_lambda(delta, sign, lam_pos, lam_neg)
    a, b = lam.unsqueeze(-1), (1.0 - lam + beta).unsqueeze(-1)
    x = reference.bridge_logits(lp_s_d, lp_t, a, b)
    lzq = torch.logsumexp(x, -1, keepdim=True)
    log_q = torch.where(lzq == -math.inf, torch.full_like(x, -math.inf), x - lzq)
    q = log_q.exp()
    la = math.log(1 - pi) + lp_s
    lb = math.log(pi) + log_q
    dead = (la == -math.inf) & (lb == -math.inf)  # p = q = 0: no term (and no NaN gradient)
    log_m = torch.logaddexp(torch.where(dead, torch.zeros_like(la), la),
                            torch.where(dead, torch.zeros_like(lb), lb))
    loss = pi * reference._xmul(q, log_q - log_m).sum(-1) + \
        (1 - pi) * reference._xmul(p, lp_s - log_m).sum(-1)
    loss = torch.where(lzq.squeeze(-1) == -math.inf, torch.full_like(loss, math.inf), loss)
    zero = torch.zeros_like(delta)
    with torch.no_grad():
        teacher_kl = reference._xmul(p, lp_s - lp_t).sum(-1)
        entropy = -reference._xmul(p, lp_s).sum(-1)
    return dict(loss=torch.where(valid, loss, zero), delta=torch.where(valid, delta, zero),
                gate=torch.where(valid, g, zero), teacher_kl=torch.where(valid, teacher_kl, zero),
                entropy=torch.where(valid, entropy, zero))


def oracle(student, teacher, tokens, verifier=None, *, divergence="reverse_kl", jsd_beta=0.5,
           temperature=1.0, teacher_temperature=None, dtype=torch.float64, **kw):
    """(loss, stats, grad) of the logits loss in ``dtype`` (float64: the oracle; float32: the
    eager yardstick). A teacher temperature is folded into the teacher's logits."""
    if teacher_temperature is not None:
        teacher = teacher.double() * (temperature / teacher_temperature)
    if divergence != "jsd":
        return oracle_opd(student, teacher, tokens, verifier, divergence=divergence,
                          temperature=temperature, dtype=dtype, **kw)
    lead, vocab = student.shape[:-1], student.shape[-1]
    s = student.detach().to(dtype).reshape(-1, vocab).requires_grad_(True)
    t = teacher.detach().to(dtype).reshape(-1, teacher.shape[-1])[:, :vocab]
    tok = tokens.reshape(-1).long()
    sign = sign_rows(verifier, lead)
    grad_out = kw.pop("grad_out", None)
    weights = kw.pop("weights", None)
    reduction = kw.pop("reduction", "mean")
    r = _jsd_terms(s, t, tok, None if sign is None else sign.to(dtype),
                   beta=kw.get("beta", 0.0), lam_pos=kw.get("extrapolation", 1.8),
                   lam_neg=kw.get("interpolation", 1.0), jsd_beta=jsd_beta,
                   temperature=temperature, ignore_index=kw.get("ignore_index", -100))
    valid = tok != kw.get("ignore_index", -100)
    loss = _reduce(r["loss"], valid, weights, lead, reduction)
    loss.backward(torch.ones_like(loss) if grad_out is None else grad_out.to(dtype))
    return loss.detach(), _stats(r, valid), s.grad.reshape(student.shape)


# ---------------------------------------------------------------------------
# inputs

LAYOUTS_2D = ["flat", "vocab_strided"]
LAYOUTS_3D = ["contiguous", "shifted", "transposed", "permuted", "three_strides"]


def _layout(kind, n_b, n_t, vocab, dtype, scale, gen):
    def base(*shape):
        return (scale * torch.randn(*shape, generator=gen)).to(dtype)

    if kind == "flat":
        return base(n_b * n_t, vocab)
    if kind == "vocab_strided":
        return base(vocab, n_b * n_t).t()
    if kind == "contiguous":
        return base(n_b, n_t, vocab)
    if kind == "shifted":
        return base(n_b, n_t + 1, vocab)[:, :-1]
    if kind == "transposed":
        return base(n_t, n_b, vocab).transpose(0, 1)
    if kind == "three_strides":  # leading dims that need three strides: the one copy
        return base(n_b, 2, n_t + 1, vocab)[:, :1, :-1].reshape(n_b, 1, n_t, vocab)[:, 0]
    return base(vocab, n_t, n_b).permute(2, 1, 0)


def _draw_case(draw, *, sampled=False):
    seed = draw(st.integers(0, 2 ** 16))
    gen = torch.Generator().manual_seed(seed)
    kinds = draw(st.sampled_from([LAYOUTS_2D, LAYOUTS_3D]))
    n_b = draw(st.integers(1, 3))
    n_t = draw(st.integers(1, 3))
    vocab = draw(st.sampled_from([1, 2, 7, 16, 61, 64, 127, 257, 331]))
    dtype = draw(st.sampled_from(DTYPES))
    scale = draw(st.sampled_from([0.5, 3.0, 12.0]))
    s = _layout(draw(st.sampled_from(kinds)), n_b, n_t, vocab, dtype, scale, gen)
    lead = s.shape[:-1]
    tokens = torch.randint(0, vocab, tuple(lead), generator=gen)
    if draw(st.booleans()):
        tokens.view(-1)[0] = -100
    gate = draw(st.sampled_from(["none", "bool_seq", "bool_pos", "adv_pos"]))
    if gate == "none":
        verifier = None
    elif gate == "bool_seq":
        verifier = torch.rand(lead[0], generator=gen) > 0.5
    elif gate == "bool_pos":
        verifier = torch.rand(tuple(lead), generator=gen) > 0.5
    else:
        verifier = torch.randn(tuple(lead), generator=gen).round()
    kw = dict(
        extrapolation=draw(st.sampled_from([1.8, 1.3, 2.5])),
        interpolation=draw(st.sampled_from([1.0, 0.4])),
        temperature=draw(st.sampled_from([1.0, 0.7, 1.9])),
        reduction=draw(st.sampled_from(["mean", "sum", "none"])),
    )
    if draw(st.booleans()):
        kw["weights"] = torch.rand(tuple(lead), generator=gen)
    design = draw(st.sampled_from(["stored", "recompute"]))
    if sampled:
        teacher_lp = torch.log_softmax(torch.randn(*lead, vocab, generator=gen), -1)
        teacher_lp = teacher_lp.gather(-1, tokens.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return s, teacher_lp, tokens, verifier, kw, design
    extra = draw(st.sampled_from([0, 0, 3, 9]))
    t_dtype = draw(st.sampled_from([dtype, torch.float32]))
    t = _layout(draw(st.sampled_from(kinds)), n_b, n_t, vocab + extra, t_dtype, scale, gen)
    kw["beta"] = draw(st.sampled_from([0.0, 0.3, 1.2]))
    kw["divergence"] = draw(st.sampled_from(["reverse_kl", "forward_kl", "jsd"]))
    if kw["divergence"] == "jsd":
        kw["jsd_beta"] = draw(st.sampled_from([0.5, 0.1, 0.9]))
    if draw(st.integers(0, 3)) == 0:
        kw["teacher_temperature"] = draw(st.sampled_from([0.6, 1.5]))
    adversary = draw(st.sampled_from(["none", "shared_mask", "student_mask", "huge_negative",
                                      "tie", "teacher_mask"]))
    if adversary == "teacher_mask" and kw["divergence"] == "reverse_kl":
        kw["divergence"] = "forward_kl"  # reverse KL is +inf there (tested separately)
    cols = torch.randperm(vocab, generator=gen)[: max(1, vocab // 5)] if vocab > 2 else None
    if cols is not None and adversary in ("shared_mask", "student_mask", "teacher_mask"):
        if adversary != "teacher_mask":
            s[..., cols] = float("-inf")
        if adversary != "student_mask":
            t[..., cols] = float("-inf")
    elif adversary == "huge_negative" and cols is not None:
        s[..., cols] = -1e4
    elif adversary == "tie" and t_dtype == dtype:
        t[..., :vocab] = s
        kw.pop("teacher_temperature", None)  # delta == 0 needs the same temperature
    return s, t, tokens, verifier, kw, design


def _check_against_oracle(loss_fn, oracle_fn, s, other, tokens, verifier, kw, design):
    x = s.clone().requires_grad_(True) if s.is_contiguous() else s.detach().requires_grad_(True)
    w = kw.pop("weights", None)
    loss, stats = loss_fn(x, other, tokens, verifier, weights=w, return_stats=True,
                          design=design, **kw)
    grad_out = torch.randn(loss.shape, generator=torch.Generator().manual_seed(5)) \
        if kw["reduction"] == "none" else None
    (g,) = torch.autograd.grad(loss, x, grad_out)
    if design == "stored" and grad_out is not None and s.dtype == torch.bfloat16:
        # The stored gradient is rounded to the logits' dtype in forward, then scaled by
        # grad_output and rounded again: two roundings. (float16 recomputes instead: its
        # gradient at the reduction's scale would underflow.)
        # Hold that exact composition, and the stored gradient (grad_output = 1) to the oracle.
        loss1 = loss_fn(x, other, tokens, verifier, weights=w, design=design, **kw)
        (g1,) = torch.autograd.grad(loss1, x, torch.ones_like(loss1))
        assert torch.equal(g, (g1.float() * grad_out.reshape(*grad_out.shape, 1)).to(s.dtype))
        g, grad_out = g1, torch.ones_like(grad_out)
    okw = dict(weights=w, grad_out=grad_out, **kw)
    want, want_stats, g_want = oracle_fn(s, other, tokens, verifier, **okw)
    eager, eager_stats, g_eager = oracle_fn(s, other, tokens, verifier, dtype=torch.float32,
                                            **okw)
    assert loss.dtype == torch.float32
    assert_loss_close(loss, want, eager32=eager)
    for name, value in want_stats.items():
        assert_loss_close(getattr(stats, name).reshape(1), torch.tensor([value]), what=name,
                          eager32=torch.tensor([eager_stats[name]]))
    assert g.shape == s.shape and g.dtype == s.dtype
    t_scale = kw.get("temperature", 1.0)
    scale_l = logprob_scale(s, temperature=t_scale) + (
        logprob_scale(other, temperature=kw.get("teacher_temperature") or t_scale)
        if other.dim() == s.dim() else 0.0)
    count = int((tokens != -100).sum()) if kw["reduction"] == "mean" else 1
    p_s = torch.softmax(s.double() / t_scale, dim=-1).nan_to_num(0.0)
    unit = p_s * (1.0 if w is None else float(w.abs().max())) * \
        (1.0 if grad_out is None else float(grad_out.abs().max())) / (max(count, 1) * t_scale)
    assert_grad_close(g, g_want, s.dtype, g_eager, scale_l=scale_l, unit=unit)


@pytest.mark.filterwarnings("ignore:verifier. a float tensor")
@HYP
@given(data=st.data())
def test_opd_matches_oracle(data):
    s, t, tokens, verifier, kw, design = _draw_case(data.draw)
    _check_against_oracle(gated_loss, oracle, s, t, tokens, verifier, kw, design)


@HYP
@given(data=st.data())
def test_sampled_matches_oracle(data):
    s, tlp, tokens, verifier, kw, design = _draw_case(data.draw, sampled=True)
    _check_against_oracle(sampled_loss, oracle_sampled, s, tlp, tokens, verifier, kw, design)


@pytest.mark.filterwarnings("ignore:verifier. a float tensor")
@HYP
@given(data=st.data(), design=st.sampled_from(["stored", "recompute"]))
def test_topk_matches_oracle(data, design):
    """The top-k loss on the CPU kernels (its passes over the student's row compiled, its
    O(k) terms in float64) against the oracle, in the adversarial cases of the Triton test."""
    with _design("cpu", design):
        check_against_oracle("cpu", "cpu", *draw_case(data.draw))


@pytest.mark.parametrize("tail", [1e-6, 1e-9, 1e-14])
def test_topk_student_tail_when_the_top_k_holds_nearly_all(tail):
    """The tail is summed over the tokens outside the categories against its own maximum:
    float32 precision of the loss and the gradient at any tail."""
    gen = torch.Generator().manual_seed(0)
    n, vocab, k = 6, 700, 8
    s = 0.5 * torch.randn(n, vocab, generator=gen)
    ids = torch.stack([torch.randperm(vocab, generator=gen)[:k] for _ in range(n)])
    s = top_heavy(s.scatter_add(-1, ids, 6.0 + torch.randn(n, k, generator=gen)), ids, tail)
    tlp = torch.log_softmax(torch.randn(n, vocab, generator=gen), -1).gather(-1, ids)
    y = torch.randint(0, vocab, (n,), generator=gen)
    for divergence in ("reverse_kl", "forward_kl", "jsd"):
        kw = dict(divergence=divergence, reduction="sum")
        x = s.clone().requires_grad_(True)
        loss = sk.topk_opd_loss(x, ids, tlp, y, backend="cpu", **kw)
        (g,) = torch.autograd.grad(loss, x)
        want, _, g_want = oracle_topk(s, ids, tlp, None, y, **kw)
        _, _, g_eager = oracle_topk(s, ids, tlp, None, y, dtype=torch.float32, **kw)
        assert_loss_close(loss.reshape(1), want.reshape(1))
        assert_grad_close(g, g_want, torch.float32, g_eager)


def test_topk_bad_ids_and_tokens_make_their_rows_nan():
    """An id >= V, an id twice in a row, or a token outside [0, V) makes that row's loss and
    gradient NaN (the torch path raises); the other rows are untouched."""
    gen = torch.Generator().manual_seed(2)
    s = torch.randn(4, 50, generator=gen)
    ids = torch.stack([torch.randperm(50, generator=gen)[:5] for _ in range(4)])
    tlp = torch.log_softmax(torch.randn(4, 50, generator=gen), -1).gather(-1, ids)
    y = torch.randint(0, 50, (4,), generator=gen)
    bad_ids, bad_y = ids.clone(), y.clone()
    bad_ids[0, 1] = 50
    bad_ids[1, 2] = bad_ids[1, 3]
    bad_y[2] = 51
    x = s.clone().requires_grad_(True)
    loss = sk.topk_opd_loss(x, bad_ids, tlp, bad_y, reduction="none", backend="cpu")
    (g,) = torch.autograd.grad(loss.sum(), x)
    want = sk.topk_opd_loss(s, ids, tlp, y, reduction="none", backend="torch")
    assert torch.isnan(loss[:3]).all() and torch.isnan(g[:3]).all()
    assert_loss_close(loss[3:], want[3:].double())
    x3 = s[3:].clone().requires_grad_(True)
    (g3,) = torch.autograd.grad(sk.topk_opd_loss(x3, ids[3:], tlp[3:], y[3:], reduction="sum",
                                                 backend="torch"), x3)
    assert torch.allclose(g[3:], g3, rtol=1e-5, atol=1e-9)


def _rand(shape, vocab, vocab_t=None, seed=0, dtype=torch.float32, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    s = (scale * torch.randn(*shape, vocab, generator=gen)).to(dtype)
    t = (scale * torch.randn(*shape, vocab_t or vocab, generator=gen)).to(dtype)
    y = torch.randint(0, vocab, shape, generator=gen)
    return s, t, y


DIVS = ["reverse_kl", "forward_kl", "jsd"]


@pytest.mark.parametrize("divergence", DIVS)
def test_verdict_with_zero_delta_takes_lambda_one(divergence):
    """delta == 0 exactly with p_T != p_S (integer logits at temperature log2(e): every sum
    is exact in base 2; the teacher permutes the student's other entries): lambda = 1."""
    gen = torch.Generator().manual_seed(1)
    vocab, n = 150, 6
    s = torch.randint(-8, 9, (n, vocab), generator=gen).float()
    y = torch.randint(0, vocab, (n,), generator=gen)
    t = torch.randn(n, vocab + 4, generator=gen).round()
    for row in range(3):
        others = torch.tensor([v for v in range(vocab) if v != y[row]])
        t[row, :vocab] = s[row]
        t[row, others] = s[row, others[torch.randperm(len(others), generator=gen)]]
    v = torch.tensor([True, False, True, True, False, True])
    kw = dict(beta=0.4, divergence=divergence, reduction="none", temperature=math.log2(math.e))
    x = s.clone().requires_grad_(True)
    loss = gated_loss(x, t, y, v, **kw)
    (g,) = torch.autograd.grad(loss.sum(), x)
    table = compiled.opd_rows(s, t, y, torch.where(v, 1.0, -1.0), make_opts(**{
        k: kw[k] for k in ("beta", "divergence", "temperature")}))
    assert (table[:3, C.DELTA] == 0).all() and (table[:3, C.GATE] == 0).all()
    assert (table[:3, C.A] == 1).all()
    neutral = torch.tensor([0.0, -1.0, 0.0, 1.0, -1.0, 1.0])
    want, _, g_want = oracle(s, t, y, neutral, **kw)
    _, _, g_eager = oracle(s, t, y, neutral, dtype=torch.float32, **kw)
    assert_loss_close(loss, want)
    assert_grad_close(g, g_want, torch.float32, g_eager)


@pytest.mark.parametrize("divergence", DIVS)
def test_sampled_token_far_from_the_bulk(divergence):
    s, t, y = _rand((4,), 300, seed=12, scale=0.5)
    y[:] = torch.tensor([5, 70, 140, 299])
    s[:, y] = -1e4
    s[2:, :64] = -1e4
    x = s.clone().requires_grad_(True)
    kw = dict(divergence=divergence, beta=0.2, reduction="sum", temperature=1.9)
    loss, stats = gated_loss(x, t, y, torch.ones(4), return_stats=True, **kw)
    (g,) = torch.autograd.grad(loss, x)
    want, want_stats, g_want = oracle(s, t, y, torch.ones(4), **kw)
    _, _, g_eager = oracle(s, t, y, torch.ones(4), dtype=torch.float32, **kw)
    assert_loss_close(loss.reshape(1), want.reshape(1))
    for name, value in want_stats.items():
        assert_loss_close(getattr(stats, name).reshape(1), torch.tensor([value]), what=name)
    assert_grad_close(g, g_want, torch.float32, g_eager)


@pytest.mark.parametrize("divergence", DIVS)
def test_peaked_rows_keep_float32_precision(divergence):
    """A peaked student and a teacher whose values at the student's mode lie far below its
    own max: within twice the error of eager float32 PyTorch."""
    gen = torch.Generator().manual_seed(13)
    s = 20.0 * torch.randn(16, 300, generator=gen)
    t = 5.0 * torch.randn(16, 300, generator=gen)
    t[:, 3] += 40.0
    y = s.argmax(-1)
    lp_s, lp_t = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    v = -torch.sign((lp_t - lp_s).gather(-1, y[:, None])[:, 0])
    kw = dict(divergence=divergence, beta=0.3, interpolation=0.4, reduction="sum")
    x = s.clone().requires_grad_(True)
    loss = gated_loss(x, t, y, v, **kw)
    (g,) = torch.autograd.grad(loss, x)
    _, _, g_want = oracle(s, t, y, v, **kw)
    _, _, g_eager = oracle(s, t, y, v, dtype=torch.float32, **kw)
    err = float((g.double() - g_want).abs().max())
    err_eager = float((g_eager.double() - g_want).abs().max())
    assert err <= 2 * err_eager + 1e-12, (err, err_eager)


def test_reverse_kl_is_inf_where_teacher_masks_student_mass():
    s, t, y = _rand((4,), 90, seed=2)
    t[2, 17] = float("-inf")
    loss = gated_loss(s, t, y, reduction="none")
    assert loss[2] == math.inf
    want, _, _ = oracle(s, t, y, reduction="none")
    assert_loss_close(loss[[0, 1, 3]], want[[0, 1, 3]])
    # forward KL and JSD stay finite there
    for div in ("forward_kl", "jsd"):
        loss = gated_loss(s, t, y, reduction="none", divergence=div)
        want, _, _ = oracle(s, t, y, reduction="none", divergence=div)
        assert torch.isfinite(loss).all()
        assert_loss_close(loss, want)


@pytest.mark.parametrize("divergence", DIVS)
def test_rows_without_support_never_give_nan(divergence):
    inf = math.inf
    s, t, y = _rand((4,), 90, seed=5)
    t[0] = -inf
    s[1] = -inf
    s[2] = -inf
    t[2] = -inf
    ver = torch.tensor([True, False, True, False])
    x = s.clone().requires_grad_(True)
    loss, st_ = gated_loss(x, t, y, ver, beta=0.2, divergence=divergence, reduction="none",
                           return_stats=True)
    assert loss[:3].tolist() == [inf, inf, inf]
    want, _, g_want = oracle(s[3:], t[3:], y[3:], ver[3:], beta=0.2, divergence=divergence,
                             reduction="none")
    assert_loss_close(loss[3:], want)
    assert st_.teacher_kl.item() == inf and math.isfinite(st_.student_entropy.item())
    (g,) = torch.autograd.grad(loss[3], x)
    # no target: NaN like the reference's softmax over nothing, but where reverse KL and JSD
    # weigh each entry by p_S = 0 (a student without support, rows 1 and 2) as the reference
    assert torch.isnan(g[0]).all()
    if divergence == "forward_kl":
        assert torch.isnan(g[1:3]).all()
    else:
        assert torch.equal(g[1:3], torch.zeros_like(g[1:3]))
    assert_grad_close(g[3:], g_want, torch.float32)
    tlp = torch.tensor([-1.0, -inf, -2.0, -3.0])
    loss = sampled_loss(s, tlp, y, reduction="none")
    assert loss[1].item() == 0.0
    assert loss[2].item() == inf
    assert not torch.isnan(loss).any()


@pytest.mark.parametrize("design", ["stored", "recompute"])
def test_nan_stays_in_its_row(design):
    s, t, y = _rand((5,), 100, 104, seed=3)
    s[1, 50] = float("nan")
    t[3, 2] = float("nan")
    t[4, 101] = float("nan")  # in the teacher's padding: never read
    for div in DIVS:
        x = s.clone().requires_grad_(True)
        loss = gated_loss(x, t, y, torch.ones(5), reduction="none", divergence=div,
                          design=design)
        (g,) = torch.autograd.grad(loss.sum(), x)
        assert torch.isnan(loss[[1, 3]]).all() and torch.isfinite(loss[[0, 2, 4]]).all()
        assert torch.isnan(g[[1, 3]]).all() and torch.isfinite(g[[0, 2, 4]]).all()
        want, _, g_want = oracle(s, t, y, torch.ones(5), reduction="none", divergence=div)
        _, _, g_eager = oracle(s, t, y, torch.ones(5), reduction="none", divergence=div,
                               dtype=torch.float32)
        assert_grad_close(g[[0, 2, 4]], g_want[[0, 2, 4]], torch.float32, g_eager[[0, 2, 4]])
    x = s.clone().requires_grad_(True)
    loss = sampled_loss(x, torch.tensor([-1.0, -2.0, float("nan"), -1.0, -1.0]), y,
                        reduction="none", design=design)
    (g,) = torch.autograd.grad(loss.sum(), x)
    assert torch.isnan(loss[[1, 2]]).all() and torch.isfinite(loss[[0, 3, 4]]).all()
    assert torch.isnan(g[[1, 2]]).all() and torch.isfinite(g[[0, 3, 4]]).all()


@pytest.mark.parametrize("sampled", [False, True])
@pytest.mark.parametrize("design", ["stored", "recompute"])
def test_nan_verifier_poisons_its_position_only(sampled, design):
    s, t, y = _rand((4,), 60, seed=11)
    v = torch.tensor([1.0, float("nan"), -1.0, 0.0])
    x = s.clone().requires_grad_(True)
    if sampled:
        loss = sampled_loss(x, t[:, 0], y, v, reduction="none", design=design)
    else:
        loss = gated_loss(x, t, y, v, reduction="none", divergence="forward_kl", design=design)
    (g,) = torch.autograd.grad(loss.sum(), x)
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2, 3]]).all()
    assert torch.isnan(g[1]).all() and torch.isfinite(g[[0, 2, 3]]).all()


@pytest.mark.parametrize("design", ["stored", "recompute"])
def test_out_of_range_token_gives_nan_row_not_a_read(design):
    s, t, y = _rand((4,), 70, seed=4)
    y[1] = 70
    y[2] = -(2 ** 40)  # would fault if it were read
    y[3] = 2 ** 40
    for fn, other in ((gated_loss, t), (sampled_loss, torch.zeros(4))):
        x = s.clone().requires_grad_(True)
        loss = fn(x, other, y, reduction="none", design=design)
        (g,) = torch.autograd.grad(loss.sum(), x)
        assert torch.isnan(loss[[1, 2, 3]]).all() and torch.isfinite(loss[0])
        assert torch.isnan(g[[1, 2, 3]]).all() and torch.isfinite(g[0]).all()


@pytest.mark.parametrize("sampled", [False, True])
@pytest.mark.parametrize("design", ["stored", "recompute"])
def test_all_masked_and_empty(sampled, design):
    s, t, y = _rand((2, 3), 40, seed=5)
    y[:] = -100
    x = s.clone().requires_grad_(True)
    other = torch.zeros(2, 3) if sampled else t
    fn = sampled_loss if sampled else gated_loss
    loss, stats = fn(x, other, y, return_stats=True, design=design)
    loss.backward()
    assert float(loss.detach()) == 0.0 and (x.grad == 0).all()
    assert all(float(v) == 0.0 for v in stats)
    table = (compiled.sampled_rows(s, other.reshape(-1), y.reshape(-1), None, make_opts())
             if sampled else compiled.opd_rows(s, t, y.reshape(-1), None, make_opts()))
    assert (table == 0).all()  # masked rows: zeros in every column
    empty = torch.zeros(0, 40, requires_grad=True)
    other = torch.zeros(0) if sampled else torch.zeros(0, 40)
    loss = fn(empty, other, torch.zeros(0, dtype=torch.long), design=design)
    loss.backward()
    assert float(loss.detach()) == 0.0 and empty.grad.shape == (0, 40)


def test_bitwise_deterministic_across_runs_threads_and_designs():
    s, t, y = _rand((3, 40), 700, 710, seed=6, dtype=torch.bfloat16)
    sign = torch.tensor([1., -1., 0.]).repeat_interleave(40)
    threads = torch.get_num_threads()
    outs = []
    try:
        for nt in (1, 2, 1, 3):
            torch.set_num_threads(nt)
            for div in (0, 1, 2):
                opts = make_opts(beta=0.2, divergence=["reverse_kl", "forward_kl", "jsd"][div])
                table, grad = compiled.opd_rows_grad(s, t, y.reshape(-1), sign,
                                                     torch.full((120,), 0.5), opts)
                table2 = compiled.opd_rows(s, t, y.reshape(-1), sign, opts)
                grad2 = compiled.opd_rows_backward(torch.full((120,), 0.5), s, t,
                                                   y.reshape(-1), table2, opts)
                assert torch.equal(table, table2)
                assert torch.equal(grad, grad2)  # written in forward == recomputed, bitwise
                outs.append((table, grad))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(outs[:3], outs[3:6]):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    for a, b in zip(outs[:3], outs[9:12]):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_stored_gradient_equals_recompute_sampled(dtype):
    s, t, y = _rand((64,), 333, seed=9, dtype=dtype)
    opts = make_opts(extrapolation=1.5, interpolation=0.5, temperature=0.8)
    tlp = torch.randn(64) - 3
    sign = torch.randn(64).sign()
    coef = torch.rand(64)
    table, grad = compiled.sampled_rows_grad(s, tlp, y, sign, coef, opts)
    table2 = compiled.sampled_rows(s, tlp, y, sign, opts)
    grad2 = compiled.sampled_rows_backward(coef, s, tlp, y, table2, opts)
    assert torch.equal(table, table2) and torch.equal(grad, grad2)


def test_strided_inputs_are_read_in_place():
    base = torch.randn(2, 6, 50)
    teacher = torch.randn(2, 6, 64)
    for x in (base[:, :-1], teacher[:, 1:, :50], base.transpose(0, 1), torch.randn(50, 8).t()):
        assert compiled._layout(x)[0] is x
    s, t = base[:, :-1], teacher[:, :-1]
    y = torch.randint(0, 50, (2, 5))
    x = s.detach().requires_grad_(True)
    for design in ("stored", "recompute"):
        loss = gated_loss(x, t, y, design=design)
        (g,) = torch.autograd.grad(loss, x)
        want, _, g_want = oracle(s, t, y)
        assert_loss_close(loss.reshape(1), want.reshape(1))
        assert_grad_close(g, g_want, torch.float32)
        assert g.is_contiguous() and g.shape == s.shape


@pytest.mark.parametrize("divergence", DIVS)
def test_teacher_temperature(divergence):
    s, t, y = _rand((8,), 200, 210, seed=14)
    kw = dict(divergence=divergence, temperature=0.8, teacher_temperature=1.7, beta=0.1)
    v = torch.tensor([True, False] * 4)
    x = s.clone().requires_grad_(True)
    loss = gated_loss(x, t, y, v, reduction="sum", **kw)
    (g,) = torch.autograd.grad(loss, x)
    want, _, g_want = oracle(s, t, y, v, reduction="sum", **kw)
    _, _, g_eager = oracle(s, t, y, v, reduction="sum", dtype=torch.float32, **kw)
    assert_loss_close(loss.reshape(1), want.reshape(1))
    assert_grad_close(g, g_want, torch.float32, g_eager)
    other = gated_loss(s, t, y, v, reduction="sum", divergence=divergence, temperature=0.8,
                       beta=0.1)
    assert abs(float(other) - float(loss.detach())) > 1e-3  # the teacher's temperature mattered


@pytest.mark.parametrize("divergence", DIVS)
def test_bf16_error_at_most_twice_eager(divergence):
    s, t, y = _rand((16,), 300, seed=8, dtype=torch.bfloat16)
    x = s.clone().requires_grad_(True)
    loss = gated_loss(x, t, y, reduction="sum", divergence=divergence)
    (g,) = torch.autograd.grad(loss, x)
    want, _, g_want = oracle(s, t, y, reduction="sum", divergence=divergence)
    xe = s.clone().requires_grad_(True)  # eager PyTorch on the same bf16 inputs
    lp_s, lp_t = torch.log_softmax(xe, -1), torch.log_softmax(t, -1)
    if divergence == "reverse_kl":
        eager = (lp_s.exp() * (lp_s - lp_t)).sum()
    elif divergence == "forward_kl":
        eager = (lp_t.exp() * (lp_t - lp_s)).sum()
    else:
        lm = torch.logaddexp(math.log(0.5) + lp_s, math.log(0.5) + lp_t)
        eager = 0.5 * (lp_t.exp() * (lp_t - lm)).sum() + 0.5 * (lp_s.exp() * (lp_s - lm)).sum()
    (g_eager,) = torch.autograd.grad(eager, xe)
    err = (g.double() - g_want).norm()
    err_eager = (g_eager.double() - g_want).norm()
    assert err <= 2 * err_eager, (float(err), float(err_eager))
    assert abs(float(loss.detach()) - float(want)) <= \
        2 * abs(float(eager.detach()) - float(want)) + 1e-4


@pytest.mark.parametrize("dtype", DTYPES)
def test_scale_grad_reads_the_factor_and_skips_one(dtype):
    g0 = torch.randn(5, 33).to(dtype)
    g = g0.clone()
    compiled.scale_grad_(g, torch.tensor(1.0))
    assert torch.equal(g, g0)
    compiled.scale_grad_(g, torch.tensor(-2.5))
    assert torch.equal(g, (g0.float() * -2.5).to(dtype))
    rows = torch.tensor([1.0, 0.0, 3.0, -1.0, 1.0])
    g = g0.clone()
    compiled.scale_grad_(g, rows)
    assert torch.equal(g, (g0.float() * rows[:, None]).to(dtype))
    g3 = torch.randn(2, 3, 7).to(dtype)  # a (B, T, V) gradient, one factor per position
    f = torch.randn(2, 3)
    want = (g3.float() * f[..., None]).to(dtype)
    compiled.scale_grad_(g3, f)
    assert torch.equal(g3, want)


def test_second_backward_through_a_stored_gradient_raises():
    s, t, y = _rand((4,), 30, seed=1)
    x = s.clone().requires_grad_(True)
    loss = gated_loss(x, t, y, design="stored")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_errors_name_the_argument():
    s, t, y = _rand((4,), 30, seed=1)
    opts = make_opts()
    with pytest.raises(TypeError, match="student_logits"):
        compiled.opd_rows(s.double(), t, y, None, opts)
    with pytest.raises(TypeError, match="teacher_logits"):
        compiled.opd_rows(s, t.int(), y, None, opts)
    with pytest.raises(ValueError, match="teacher_logits"):
        compiled.opd_rows(s, t[:, :10], y, None, opts)
    with pytest.raises(TypeError, match="tokens"):
        compiled.opd_rows(s, t, y.int(), None, opts)
    with pytest.raises(ValueError, match="tokens"):
        compiled.opd_rows(s, t, y[:3], None, opts)
    with pytest.raises(ValueError, match="sign"):
        compiled.opd_rows(s, t, y, torch.ones(3), opts)
    with pytest.raises(ValueError, match="coef"):
        compiled.opd_rows_grad(s, t, y, None, torch.ones(5), opts)
    with pytest.raises(ValueError, match="rows"):
        compiled.opd_rows_backward(torch.ones(4), s, t, y, torch.zeros(4, 8), opts)
    with pytest.raises(ValueError, match="g"):
        compiled.scale_grad_(torch.zeros(4, 30), torch.ones(3))


def test_three_divergences_differ_and_jsd_endpoints():
    """JSD at pi -> 0 and pi -> 1 approaches (pi-scaled) forward and reverse KL."""
    s, t, y = _rand((6,), 120, seed=21, scale=1.0)
    rkl = gated_loss(s, t, y, reduction="none")
    fkl = gated_loss(s, t, y, reduction="none", divergence="forward_kl")
    j_lo = gated_loss(s, t, y, reduction="none", divergence="jsd", jsd_beta=1e-4)
    j_hi = gated_loss(s, t, y, reduction="none", divergence="jsd", jsd_beta=1 - 1e-4)
    # pi KL(q||m) + (1-pi) KL(p||m) ~ pi KL(q||p) for small pi, (1-pi) KL(p||q) near 1
    assert torch.allclose(j_lo / 1e-4, fkl, rtol=2e-3)
    assert torch.allclose(j_hi / 1e-4, rkl, rtol=2e-3)
    assert (fkl - rkl).abs().min() > 1e-2


def test_bench_compiled_smoke():
    """benchmarks/bench_compiled.py runs on the CPU and its providers agree with eager."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "bench_compiled.py"),
                           "--N", "8", "--V", "300", "--reps", "1", "--dtype", "fp32,bf16",
                           "--cases", "logits-gated,logits-jsd,sampled"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "MISMATCH" not in proc.stdout
    assert proc.stdout.count("x eager") >= 10, proc.stdout
