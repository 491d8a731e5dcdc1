"""The Triton kernels against the float64 oracle.

On a machine without a GPU the kernels run on CPU tensors in the Triton
interpreter (TRITON_INTERPRET=1, set by conftest.py), so shapes stay small.
With a GPU the same tests run the compiled kernels on CUDA tensors.
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import sgopd_kernels as sk
from sgopd_kernels.api import row_options
from sgopd_kernels.triton import logits as tlogits
from sgopd_kernels.triton import sampled as tsampled
from sgopd_kernels.triton._layout import row_layout
from conftest import TRITON_DEVICE, needs_triton
from helpers import (KERNEL_DTYPES, assert_close, assert_grad_close,
                     assert_kernel_matches_oracle, assert_loss_close, interpreted_hypothesis,
                     oracle_opd, oracle_sampled)

pytestmark = needs_triton
DEV = TRITON_DEVICE
HYP = interpreted_hypothesis(80)


LAYOUTS_2D = ["flat", "vocab_strided"]                         # lead (N,)
LAYOUTS_3D = ["contiguous", "shifted", "transposed", "permuted"]  # lead (B, T)


def _layout(kind, n_b, n_t, vocab, dtype, scale, gen):
    """A (N, V) or (B, T, V) tensor with one of several stride patterns, values ~ scale."""
    def base(*shape):
        return (scale * torch.randn(*shape, generator=gen)).to(dtype)

    if kind == "flat":
        return base(n_b * n_t, vocab)
    if kind == "vocab_strided":  # the vocabulary is not the fastest dim
        return base(vocab, n_b * n_t).t()
    if kind == "contiguous":
        return base(n_b, n_t, vocab)
    if kind == "shifted":  # logits[:, :-1]
        return base(n_b, n_t + 1, vocab)[:, :-1]
    if kind == "transposed":  # (T, B, V) seen as (B, T, V)
        return base(n_t, n_b, vocab).transpose(0, 1)
    return base(vocab, n_t, n_b).permute(2, 1, 0)  # "permuted": (V, T, B) as (B, T, V)


def _draw_case(draw, *, sampled=False):
    seed = draw(st.integers(0, 2 ** 16))
    gen = torch.Generator().manual_seed(seed)
    kinds = draw(st.sampled_from([LAYOUTS_2D, LAYOUTS_3D]))
    n_b = draw(st.integers(1, 3))
    n_t = draw(st.integers(1, 3))
    vocab = draw(st.sampled_from([1, 2, 7, 61, 64, 127, 257, 331]))
    dtype = draw(st.sampled_from(KERNEL_DTYPES))
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
        verifier = torch.randn(tuple(lead), generator=gen).round()  # zeros are neutral
    kw = dict(
        extrapolation=draw(st.sampled_from([1.8, 1.3, 2.5])),
        interpolation=draw(st.sampled_from([1.0, 0.4])),
        temperature=draw(st.sampled_from([1.0, 0.7, 1.9])),
        reduction=draw(st.sampled_from(["mean", "sum", "none"])),
    )
    if draw(st.booleans()):
        kw["weights"] = torch.rand(tuple(lead), generator=gen)
    if sampled:
        teacher_lp = torch.log_softmax(torch.randn(*lead, vocab, generator=gen), -1)
        teacher_lp = teacher_lp.gather(-1, tokens.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return s, teacher_lp, tokens, verifier, kw
    extra = draw(st.sampled_from([0, 0, 3, 9]))
    t_dtype = draw(st.sampled_from([dtype, torch.float32]))
    t = _layout(draw(st.sampled_from(kinds)), n_b, n_t, vocab + extra, t_dtype, scale, gen)
    kw["beta"] = draw(st.sampled_from([0.0, 0.3, 1.2]))
    kw["divergence"] = draw(st.sampled_from(["reverse_kl", "forward_kl"]))
    adversary = draw(st.sampled_from(["none", "shared_mask", "student_mask", "huge_negative",
                                      "tie", "teacher_mask"]))
    if adversary == "teacher_mask":
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
        t[..., :vocab] = s  # delta == 0 exactly: the gate is neutral even with a verdict
    return s, t, tokens, verifier, kw


def _to(x, device):
    return None if x is None else x.to(device)


def _check_against_oracle(loss_fn, oracle, module, block, s, other, tokens, verifier, kw):
    """Run ``loss_fn`` on the Triton backend with vocabulary blocks of ``block`` and hold its
    loss, statistics and gradient to the float64 ``oracle``."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(module, "FWD_BLOCK_V", block)
        mp.setattr(module, "BWD_BLOCK_V", block)
        x = s.to(DEV).requires_grad_(True)
        w = _to(kw.pop("weights", None), DEV)
        loss, stats = loss_fn(x, other.to(DEV), tokens.to(DEV), _to(verifier, DEV), weights=w,
                              return_stats=True, backend="triton", **kw)
        grad_out = torch.randn(loss.shape, device=DEV) if kw["reduction"] == "none" else None
        (g,) = torch.autograd.grad(loss, x, grad_out)
    okw = dict(weights=_to(w, "cpu"), grad_out=_to(grad_out, "cpu"), **kw)
    assert_kernel_matches_oracle(
        loss, stats, g, s, oracle(s, other, tokens, verifier, **okw),
        oracle(s, other, tokens, verifier, dtype=torch.float32, **okw), teacher=(other,),
        tokens=tokens, temperature=kw["temperature"], reduction=kw["reduction"],
        weights=okw["weights"], grad_out=okw["grad_out"])


@pytest.mark.filterwarnings("ignore:verifier. a float tensor")
@HYP
@given(data=st.data(), block=st.sampled_from([16, 64, 4096]))
def test_opd_matches_oracle(data, block):
    _check_against_oracle(sk.gated_opd_loss, oracle_opd, tlogits, block, *_draw_case(data.draw))


@pytest.mark.filterwarnings("ignore:verifier. a float tensor")
@HYP
@given(data=st.data(), block=st.sampled_from([16, 4096]))
def test_sampled_matches_oracle(data, block):
    _check_against_oracle(sk.sampled_opd_loss, oracle_sampled, tsampled, block,
                          *_draw_case(data.draw, sampled=True))


def _rand(shape, vocab, vocab_t=None, seed=0, dtype=torch.float32, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    s = (scale * torch.randn(*shape, vocab, generator=gen)).to(dtype)
    t = (scale * torch.randn(*shape, vocab_t or vocab, generator=gen)).to(dtype)
    y = torch.randint(0, vocab, shape, generator=gen)
    return s, t, y


@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl"])
def test_verdict_with_zero_delta_reads_lambda_one(divergence, small_blocks):
    """A row with a verdict and delta == 0 takes lambda = 1 (the kernel's second read).

    delta == 0 exactly with p_T != p_S: integer logits at temperature log2(e) make
    every sum exact in the kernel's base-2 arithmetic, and the teacher is the
    student with the entries other than y permuted: same lp(y), another q.
    """
    gen = torch.Generator().manual_seed(1)
    vocab, n = 150, 6
    s = torch.randint(-8, 9, (n, vocab), generator=gen).float()
    y = torch.randint(0, vocab, (n,), generator=gen)
    t = torch.randn(n, vocab + 4, generator=gen).round()
    for row in range(3):  # rows 0-2: delta == 0 with a different teacher distribution
        others = torch.tensor([v for v in range(vocab) if v != y[row]])
        t[row, :vocab] = s[row]
        t[row, others] = s[row, others[torch.randperm(len(others), generator=gen)]]
        assert not torch.equal(t[row, :vocab], s[row])
    v = torch.tensor([True, False, True, True, False, True])
    kw = dict(beta=0.4, divergence=divergence, reduction="none", temperature=math.log2(math.e))
    x = s.to(DEV).requires_grad_(True)
    loss, stats = sk.gated_opd_loss(x, t.to(DEV), y.to(DEV), v.to(DEV), return_stats=True,
                                    backend="triton", **kw)
    (g,) = torch.autograd.grad(loss.sum(), x)
    from sgopd_kernels import _rows as C, autograd as ops
    opts = row_options(beta=0.4, divergence=divergence, temperature=kw["temperature"])
    rows = ops.rows("logits", s.to(DEV), (t.to(DEV),), y.to(DEV),
                    torch.where(v, 1.0, -1.0).to(DEV), opts, "triton").cpu()
    assert (rows[:3, C.DELTA] == 0).all() and (rows[:3, C.GATE] == 0).all()
    neutral = torch.tensor([0.0, -1.0, 0.0, 1.0, -1.0, 1.0])  # what delta == 0 means
    want, _, g_want = oracle_opd(s, t, y, neutral, **kw)
    _, _, g_eager = oracle_opd(s, t, y, neutral, dtype=torch.float32, **kw)
    assert_loss_close(loss, want)
    assert_grad_close(g, g_want, torch.float32, g_eager)
    # the lambda+ target differs from the lambda = 1 one here: the test can tell them apart
    lp_s = torch.log_softmax(s.double() / kw["temperature"], -1)
    lp_t = torch.log_softmax(t[:, :vocab].double() / kw["temperature"], -1)
    log_q = torch.log_softmax(1.8 * lp_t + (1 - 1.8 + 0.4) * lp_s, -1)
    p, q = lp_s.exp(), log_q.exp()
    other = (p * (lp_s - log_q)).sum(-1) if divergence == "reverse_kl" else \
        (q * (log_q - lp_s)).sum(-1)
    assert (other[:3] - want[:3]).abs().min() > 1e-3
    assert float(stats.consistent_frac) + float(stats.conflict_frac) <= 0.5 + 1e-6


@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl"])
def test_sampled_token_far_from_the_bulk(divergence, small_blocks):
    """A teacher-sampled token that the student masks with a large finite negative (and a
    masked first block): the kernels' fixed frame must not sit far from the mass."""
    s, t, y = _rand((4,), 300, seed=12, scale=0.5)
    y[:] = torch.tensor([5, 70, 140, 299])
    s[:, y] = -1e4
    s[2:, :64] = -1e4  # rows 2-3: the whole first block of the student is masked too
    x = s.to(DEV).requires_grad_(True)
    kw = dict(divergence=divergence, beta=0.2, reduction="sum", temperature=1.9)
    loss, stats = sk.gated_opd_loss(x, t.to(DEV), y.to(DEV), torch.ones(4, device=DEV),
                                    return_stats=True, backend="triton", **kw)
    (g,) = torch.autograd.grad(loss, x)
    want, want_stats, g_want = oracle_opd(s, t, y, torch.ones(4), **kw)
    _, _, g_eager = oracle_opd(s, t, y, torch.ones(4), dtype=torch.float32, **kw)
    assert_loss_close(loss.reshape(1), want.reshape(1))
    for name, value in want_stats.items():
        assert_loss_close(getattr(stats, name).reshape(1), torch.tensor([value]), what=name)
    assert_grad_close(g, g_want, torch.float32, g_eager)


@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl"])
def test_peaked_rows_keep_float32_precision(divergence, small_blocks):
    """A peaked student (logits ~ 20) and a teacher whose values at the student's mode lie
    far below its own max: the gradient subtracts nearly equal terms of the size of the
    logits, and every sum centred at the wrong place shows. The kernel must stay within
    twice the error of eager float32 PyTorch (it failed this with its frame at the
    teacher's max)."""
    gen = torch.Generator().manual_seed(13)
    s = 20.0 * torch.randn(16, 300, generator=gen)
    t = 5.0 * torch.randn(16, 300, generator=gen)
    t[:, 3] += 40.0  # the teacher's max, in the first block, far from the student's mode
    y = s.argmax(-1)
    lp_s, lp_t = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    delta = (lp_t - lp_s).gather(-1, y[:, None])[:, 0]
    v = -torch.sign(delta)  # g < 0 on every row: lambda- = 0.4, b = 0.9
    kw = dict(divergence=divergence, beta=0.3, interpolation=0.4, reduction="sum")
    x = s.to(DEV).requires_grad_(True)
    loss = sk.gated_opd_loss(x, t.to(DEV), y.to(DEV), v.to(DEV), backend="triton", **kw)
    (g,) = torch.autograd.grad(loss, x)
    _, _, g_want = oracle_opd(s, t, y, v, **kw)
    _, _, g_eager = oracle_opd(s, t, y, v, dtype=torch.float32, **kw)
    err = float((g.cpu().double() - g_want).abs().max())
    err_eager = float((g_eager.double() - g_want).abs().max())
    assert err <= 2 * err_eager + 1e-12, (err, err_eager)


@pytest.mark.parametrize("divergence,beta,gated", [("reverse_kl", 0.0, False),
                                                   ("reverse_kl", 0.3, True),
                                                   ("forward_kl", 0.0, False)])
def test_masked_logits_in_unguarded_blocks(divergence, beta, gated, small_blocks):
    """The full blocks between the first and the last are folded without per-element
    guards; a -inf met there (or, where the bridge is taken from the teacher, anywhere in
    the student's row) makes the row read itself again with them. Rows 1-4 put -inf in the
    first block, a middle block, the last (partial) block, and in the teacher; row 0 has
    none."""
    s, t, y = _rand((5,), 200, seed=21)  # blocks of 64: 0, 1 and 2 full, 3 partial
    s[1, 10] = float("-inf")
    s[2, 100] = float("-inf")
    s[3, 195] = float("-inf")
    t[4, 130] = float("-inf")
    if divergence == "reverse_kl":
        s[4, 130] = float("-inf")  # (a teacher mask under student mass is +inf)
    y[:] = torch.tensor([3, 40, 70, 150, 199])
    ver = torch.tensor([1.0, -1.0, 1.0, 0.0, 1.0]) if gated else None
    kw = dict(divergence=divergence, beta=beta, reduction="none")
    x = s.to(DEV).requires_grad_(True)
    loss, stats = sk.gated_opd_loss(x, t.to(DEV), y.to(DEV), _to(ver, DEV), return_stats=True,
                                    backend="triton", **kw)
    grad_out = torch.randn(5)
    (g,) = torch.autograd.grad(loss, x, grad_out.to(DEV))
    want, want_stats, g_want = oracle_opd(s, t, y, ver, grad_out=grad_out, **kw)
    _, _, g_eager = oracle_opd(s, t, y, ver, dtype=torch.float32, grad_out=grad_out, **kw)
    assert_loss_close(loss, want)
    for name, value in want_stats.items():
        assert_loss_close(getattr(stats, name).reshape(1), torch.tensor([value]), what=name)
    assert_grad_close(g, g_want, torch.float32, g_eager)


def test_reverse_kl_is_inf_where_teacher_masks_student_mass():
    s, t, y = _rand((4,), 90, seed=2)
    t[2, 17] = float("-inf")
    loss = sk.gated_opd_loss(s.to(DEV), t.to(DEV), y.to(DEV), reduction="none",
                             backend="triton").cpu()
    assert loss[2] == math.inf
    want, _, _ = oracle_opd(s, t, y, reduction="none")
    assert_loss_close(loss[[0, 1, 3]], want[[0, 1, 3]])


def test_infinite_loss_rows_keep_the_guards_in_backward(small_blocks):
    """The backward drops its per-element guards only over the columns the forward read
    unguarded and found finite (``FINITE``). A teacher's -inf under student mass leaves no
    NaN there (a -inf sum) but an infinite loss: that row keeps its guards, so an entry
    whose student probability is 0 (here 2^-400 underflows) still gets gradient 0, and
    the other rows are unaffected."""
    s, t, y = _rand((3,), 200, seed=4)  # blocks of 64: 1 and 2 are read unguarded
    t[1, 100] = float("-inf")
    s[1, 150] = -300.0
    s[2, 150] = -300.0
    y[:] = torch.tensor([3, 5, 7])
    x = s.to(DEV).requires_grad_(True)
    loss = sk.gated_opd_loss(x, t.to(DEV), y.to(DEV), reduction="none", backend="triton")
    (g,) = torch.autograd.grad(loss, x, torch.ones(3, device=DEV))
    loss, g = loss.cpu(), g.cpu()
    assert loss[1] == math.inf and torch.isfinite(loss[[0, 2]]).all()
    assert g[1, 150] == 0.0 and g[2, 150] == 0.0
    want, _, g_want = oracle_opd(s, t, y, reduction="none")
    assert_grad_close(g[[0, 2]], g_want[[0, 2]], torch.float32)


@pytest.mark.parametrize("case", ["teacher_min", "student_min", "both_gate", "huge_grad"])
def test_huge_finite_masks_keep_a_zero_gradient(case, small_blocks):
    """A mask of -3e38 (finfo.min) is finite, and at temperatures above log2(e) so is its
    scaled logit, so the forward's unguarded blocks accept it; reverse KL's gradient there
    is p (A d_s + B d_t + C) with p = 0 and a coefficient times -3e38 that overflows. The
    forward hands such a row to the backward's guards (its logits are not within TAME of
    the frame), so the entry's gradient stays exactly 0 (0 * inf would be NaN). So does a
    row whose incoming gradient is so large (1e36) that its coefficients times an ordinary
    logit overflow (the backward's own check of its coefficients)."""
    s, t, y = _rand((3,), 300, seed=11)  # blocks of 64: columns 64..255 unguarded in forward
    fmin = torch.finfo(torch.float32).min
    kw = dict(reduction="sum")
    scale, ver = 1.0, None
    if case == "teacher_min":
        t[:, 150] = fmin
        s[:, 150] = -1000.0
        kw.update(temperature=0.6, teacher_temperature=1.5)
    elif case == "student_min":
        s[:, 150] = fmin
        kw.update(temperature=2.0)
        scale = 10.0
    elif case == "both_gate":
        s[:, 150] = fmin
        t[:, 150] = fmin
        kw.update(temperature=2.0, beta=0.1)
        ver = torch.tensor([True, False, True])
        scale = 10.0
    else:
        s[:, 150] = -1000.0
        scale = 1e36
    x = s.to(DEV).requires_grad_(True)
    loss = sk.gated_opd_loss(x, t.to(DEV), y.to(DEV), None if ver is None else ver.to(DEV),
                             backend="triton", **kw)
    (g,) = torch.autograd.grad(loss * scale, x)
    g = g.cpu()
    assert torch.isfinite(g).all() and (g[:, 150] == 0.0).all()
    want, _, g_want = oracle_opd(s, t, y, ver, grad_out=torch.tensor(scale, dtype=torch.float64),
                                 **kw)
    assert_loss_close(loss.detach().cpu(), want)
    assert_grad_close(g, g_want, torch.float32)


@pytest.mark.parametrize("fwd_block,bwd_block", [(64, 16), (16, 64), (64, 4096)])
def test_backward_with_other_blocks_than_forward(fwd_block, bwd_block, monkeypatch):
    """The forward writes which columns it read unguarded (block size and lead) and the
    backward drops its guards only there, whatever its own blocks: -inf in the student's
    first, middle and last blocks and in the teacher, on an aligned and a shifted grid."""
    monkeypatch.setattr(tlogits, "FWD_BLOCK_V", fwd_block)
    monkeypatch.setattr(tlogits, "BWD_BLOCK_V", bwd_block)
    for vocab in (200, 203):
        s, t, y = _rand((4,), vocab, seed=8)
        s, t = s.to(torch.bfloat16), t.to(torch.bfloat16)
        s[1, 3] = float("-inf")
        s[1, 70] = float("-inf")
        # in the forward's last (guarded) block; where the shift (lead = 3 row mod 8) is 6,
        # the blocks of 16 of the backward hold it in a block inside the row
        s[2, vocab - 6] = float("-inf")
        t[3, 20] = float("-inf")
        s[3, 20] = float("-inf")
        s[0, 90] = -400.0  # p = 0 in a finite row
        y[:] = torch.tensor([1, 5, 9, 11])
        x = s.to(DEV).requires_grad_(True)
        # (beta > 0: with beta = 0 and no gate a student's -inf anywhere means a second read)
        loss = sk.gated_opd_loss(x, t.to(DEV), y.to(DEV), beta=0.2, reduction="sum",
                                 backend="triton")
        (g,) = torch.autograd.grad(loss, x)
        _, _, g_want = oracle_opd(s, t, y, beta=0.2, reduction="sum")
        _, _, g_eager = oracle_opd(s, t, y, beta=0.2, reduction="sum", dtype=torch.float32)
        assert_grad_close(g.cpu(), g_want, torch.bfloat16, g_eager)


@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_rows_without_support_never_give_nan(divergence, backend, small_blocks):
    # -inf alone never creates NaN: a model that masks its whole row gives every token
    # probability 0, so the joint support is empty and the loss is +inf
    inf = math.inf
    s, t, y = _rand((4,), 90, seed=5)
    t[0] = -inf                      # the teacher masks everything
    s[1] = -inf                      # the student masks everything
    s[2] = -inf
    t[2] = -inf                      # both
    ver = torch.tensor([True, False, True, False])
    loss, st = sk.gated_opd_loss(s.to(DEV), t.to(DEV), y.to(DEV), ver.to(DEV), beta=0.2,
                                 divergence=divergence, reduction="none", return_stats=True,
                                 backend=backend)
    loss = loss.cpu()
    assert loss[:3].tolist() == [inf, inf, inf]
    want, _, _ = oracle_opd(s[3:], t[3:], y[3:], ver[3:], beta=0.2, divergence=divergence,
                            reduction="none")
    assert_loss_close(loss[3:], want)
    # teacher_kl is +inf (rows 0 and 2 have no p_T; row 0 has p_S mass); entropy stays finite
    assert st.teacher_kl.item() == inf and math.isfinite(st.student_entropy.item())
    # the sampled estimator: a student row without support, with and without teacher mass on y
    tlp = torch.tensor([-1.0, -inf, -2.0, -3.0])
    loss = sk.sampled_opd_loss(s.to(DEV), tlp.to(DEV), y.to(DEV), reduction="none",
                               backend=backend).cpu()
    assert loss[1].item() == 0.0  # lp_S(y) = lp_T(y) = -inf: delta = 0, A = 0, no contribution
    assert loss[2].item() == inf  # lp_S(y) = -inf < lp_T(y): A = +inf
    assert not torch.isnan(loss).any()


def test_nan_stays_in_its_row(small_blocks):
    s, t, y = _rand((5,), 100, 104, seed=3)
    s[1, 50] = float("nan")
    t[3, 2] = float("nan")
    t[4, 101] = float("nan")  # in the teacher's padding: never read
    x = s.to(DEV).requires_grad_(True)
    loss = sk.gated_opd_loss(x, t.to(DEV), y.to(DEV), torch.ones(5, device=DEV),
                             reduction="none", backend="triton")
    (g,) = torch.autograd.grad(loss.sum(), x)
    loss, g = loss.cpu(), g.cpu()
    assert torch.isnan(loss[[1, 3]]).all() and torch.isfinite(loss[[0, 2, 4]]).all()
    assert torch.isfinite(g[[0, 2, 4]]).all()
    want, _, g_want = oracle_opd(s, t, y, torch.ones(5), reduction="none")
    assert_grad_close(g[[0, 2, 4]], g_want[[0, 2, 4]], torch.float32)


def test_strided_inputs_are_read_in_place():
    base = torch.randn(2, 6, 50)
    teacher = torch.randn(2, 6, 64)
    for x in (base[:, :-1], teacher[:, 1:, :50], base.transpose(0, 1), torch.randn(50, 8).t()):
        assert row_layout(x).tensor is x
    s = base[:, :-1]
    t = teacher[:, :-1]
    y = torch.randint(0, 50, (2, 5))
    x = s.to(DEV).requires_grad_(True) if DEV != "cpu" else s.clone().requires_grad_(True)
    loss = sk.gated_opd_loss(x, t.to(DEV), y.to(DEV), backend="triton")
    (g,) = torch.autograd.grad(loss, x)
    want, _, g_want = oracle_opd(s, t, y)
    assert_loss_close(loss.reshape(1), want.reshape(1))
    assert_grad_close(g, g_want, torch.float32)


def test_backends_agree_through_module():
    s, t, y = _rand((2, 3), 80, 85, seed=7)
    v = torch.tensor([True, False])
    mod = sk.GatedOPDLoss(beta=0.1, divergence="forward_kl", return_stats=True)
    a, sa = sk.GatedOPDLoss(beta=0.1, divergence="forward_kl", return_stats=True,
                            backend="triton")(s.to(DEV), t.to(DEV), y.to(DEV), v.to(DEV))
    b, sb = mod(s, t, y, v)
    assert_loss_close(a.reshape(1), b.reshape(1))
    for x, z in zip(sa, sb):
        assert_loss_close(x.reshape(1), z.reshape(1))


def test_bf16_error_at_most_twice_eager():
    """The ml-cross-entropy habit: a bf16 kernel within ~2x the error of eager bf16 PyTorch."""
    s, t, y = _rand((16,), 300, seed=8, dtype=torch.bfloat16)
    x = s.to(DEV).requires_grad_(True)
    loss = sk.gated_opd_loss(x, t.to(DEV), y.to(DEV), reduction="sum", backend="triton")
    (g,) = torch.autograd.grad(loss, x)
    want, _, g_want = oracle_opd(s, t, y, reduction="sum")
    xe = s.clone().requires_grad_(True)  # eager PyTorch on the same bf16 inputs
    lp_s = torch.log_softmax(xe, -1)
    eager = (lp_s.exp() * (lp_s - torch.log_softmax(t, -1))).sum()
    (g_eager,) = torch.autograd.grad(eager, xe)
    err = (g.cpu().double() - g_want).norm()
    err_eager = (g_eager.double() - g_want).norm()
    assert err <= 2 * err_eager, (float(err), float(err_eager))
    assert abs(float(loss.detach()) - float(want)) <= 2 * abs(float(eager.detach()) - float(want)) + 1e-4


def _record_loads(monkeypatch):
    """The addresses of every element that the interpreted kernels load (a list of arrays,
    filled as they run)."""
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if not hasattr(builder, "create_masked_load"):
        pytest.skip("this Triton's interpreter has no create_masked_load to observe")
    seen = []
    load = builder.create_masked_load

    def observed(self, ptrs, mask, *args):
        take = np.broadcast_to(np.asarray(mask.data, dtype=bool), np.shape(ptrs.data))
        seen.append(np.asarray(ptrs.data)[take].astype(np.uint64))
        return load(self, ptrs, mask, *args)

    monkeypatch.setattr(builder, "create_masked_load", observed)
    return seen


@pytest.mark.parametrize("family", ["logits", "sampled", "topk", "topk_ttl"])
@pytest.mark.parametrize("vocab", [100, 61])  # (61: the rows off 16 bytes, on the shifted grid)
def test_a_masked_row_reads_nothing(family, vocab, small_blocks, monkeypatch):
    """A row whose token is ignore_index reads none of its logits: NaN logits there give no
    NaN, a gradient of exactly 0 in that row, and the other rows' values; and, where the
    kernels run interpreted, no load of the forward or the backward touches its addresses."""
    s, t, y = _rand((4,), vocab, vocab, seed=5)
    y[2] = -100
    s_nan = s.clone()
    s_nan[2] = float("nan")
    t_nan = t.clone()
    t_nan[2] = float("nan")
    ids = torch.stack([torch.randperm(vocab)[:5] for _ in range(4)])
    lp_t = torch.log_softmax(t, -1)

    def run(student, teacher):
        x = student.to(DEV).requires_grad_(True)
        if family == "logits":
            loss = sk.gated_opd_loss(x, teacher.to(DEV), y.to(DEV), torch.ones(4, device=DEV),
                                     reduction="sum", backend="triton")
        elif family == "sampled":
            loss = sk.sampled_opd_loss(x, lp_t.gather(-1, y.clamp(min=0)[:, None])[:, 0].to(DEV),
                                       y.to(DEV), reduction="sum", backend="triton")
        else:  # (topk_ttl: with the teacher's log-probability of each sampled token)
            ttl = lp_t.gather(-1, y.clamp(min=0)[:, None])[:, 0].to(DEV) \
                if family == "topk_ttl" else None
            loss = sk.topk_opd_loss(x, ids.to(DEV), lp_t.gather(-1, ids).to(DEV), y.to(DEV),
                                    teacher_token_logprobs=ttl, reduction="sum",
                                    backend="triton")
        (g,) = torch.autograd.grad(loss, x)
        return loss.cpu(), g.cpu()

    loads = _record_loads(monkeypatch) if DEV == "cpu" else None
    loss, g = run(s_nan, t_nan)
    if loads is not None:
        addr = np.concatenate(loads)
        for x in (s_nan, t_nan) if family == "logits" else (s_nan,):
            def touched(r):
                lo = x.data_ptr() + r * x.stride(0) * x.element_size()
                return int(((addr >= lo) & (addr < lo + vocab * x.element_size())).sum())
            # (row 1's loads show that the addresses are these tensors')
            assert touched(1) >= vocab and touched(2) == 0, (touched(1), touched(2))
    want, g_want = run(s, t)
    assert torch.isfinite(loss) and torch.equal(loss, want)
    assert (g[2] == 0).all() and torch.equal(g[[0, 1, 3]], g_want[[0, 1, 3]])


def _rows_near_huge_constants(vocab, gen):
    """Rows that a model holds near a huge constant, each beside an ordinary other model;
    and (rows 8 to 12) rows whose frame, taken in the first block, must move to where
    p_S's mass is: across the limit of the FMA form, or out of a block held at a huge
    constant (the first 48 columns: inside block 0 on the shifted grid too; column 64 on
    is past it)."""
    big = torch.finfo(torch.float32)
    s = torch.round(torch.randn(N_HUGE, vocab, generator=gen) * 8) / 4
    t = torch.round(torch.randn(N_HUGE, vocab, generator=gen) * 8) / 4
    t[0] = -1e15                       # uniform teachers
    t[1] = big.min
    t[2] = big.max
    s[3] = big.min / 2                 # uniform students
    s[4] = 1e15
    for r, off in ((5, 2.0 ** 21), (6, 2.0 ** 19)):  # offsets on both, differences of 1/16
        s[r] = torch.round(s[r] * 16) / 16 + off
        t[r] = torch.round(t[r] * 16) / 16 + (off if r == 5 else -off)
    t[7] = -1e15                       # one-hot: one token 2^27 above the rest
    t[7, 3] = -1e15 + 2.0 ** 27
    s[8, :48] = -1e15                  # the student's frame in a block held at -1e15 ...
    s[9, :64] = big.min / 2            # ... at -3e38 / 2, all of block 0 (its sums overflow,
                                       # and at tau = 0.7 the other logits' frame units)
    t[10, :48] = -1e15                 # the teacher's
    s[11, 64:] += 30                   # past block 0: a moderate move of f_s, while f_t
    t[11, 64:] += 3e6                  # jumps to 3e6 (FMA -> the difference form)
    s[12, :64] += 7.2e5                # f_s moves by its mean from 7.2e5 to 7.4e5, across
    s[12, 64:] += 7.4e5                # 2^20 / scale2 at tau = 1 (FMA -> difference form)
    return s, t


N_HUGE = 13


@pytest.mark.parametrize("vocab", [40, 150])
@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl"])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_rows_held_near_huge_constants(vocab, divergence, gated, temperature, small_blocks):
    """A model that holds its row near a huge constant (a teacher row of -1e15, a student
    row of -3e38 / 2, logits past 2^20). The loss and gradient depend only on differences
    within a row, so they must equal those of the row with its maximum subtracted, and the
    float64 oracle's. Forward KL's FMA frame units would carry a shift of up to 2^-24
    |frame scale2| (10^8 base-2 units at -1e15, an overflow at -3e38): such rows are read in
    the exact difference form, forward and backward (V = 40: one block; V = 150: full
    blocks between a first and a last). A frame that must move far is moved to the model's
    maximum where its mean is itself huge (rounded at 10^8 there, or overflowed)."""
    gen = torch.Generator().manual_seed(5)
    s, t = _rows_near_huge_constants(vocab, gen)
    y = torch.full((N_HUGE,), 3)
    # (rows 8 and 12 in conflict: with a verdict for the student's token, which lies in a
    # block far below the student's mass, lambda+ = 1.8 would take b < 0 and move q's mass
    # onto that block, beside which float32 holds little of the teacher's differences)
    ver = torch.tensor([1.0, -1.0, 0.0, 1.0, -1.0, 1.0, 1.0, -1.0, -1.0, -1.0, 1.0, 0.0, -1.0]) \
        if gated else None
    kw = dict(divergence=divergence, beta=0.1, temperature=temperature, reduction="none")
    grad_out = torch.randn(N_HUGE, generator=gen)

    def run(s, t):
        x = s.to(DEV).requires_grad_(True)
        loss, stats = sk.gated_opd_loss(x, t.to(DEV), y.to(DEV), _to(ver, DEV),
                                        return_stats=True, backend="triton", **kw)
        (g,) = torch.autograd.grad(loss, x, grad_out.to(DEV))
        return loss.detach().cpu(), stats, g.cpu()

    loss, stats, g = run(s, t)
    want, want_stats, g_want = oracle_opd(s, t, y, ver, grad_out=grad_out, **kw)
    assert_loss_close(loss, want)
    assert_grad_close(g, g_want, torch.float32)
    for name in ("teacher_kl", "student_entropy", "divergence"):
        assert_loss_close(torch.as_tensor(float(getattr(stats, name))).reshape(1),
                          torch.as_tensor(want_stats[name]).reshape(1), what=name)
    # (each row minus its maximum is exact in float32 here, but where it holds -1e15 or
    # -3e38 / 2 beside ordinary logits, which keep a probability of 0)
    loss0, _, g0 = run(s - s.amax(-1, keepdim=True), t - t.amax(-1, keepdim=True))
    assert_close(loss, loss0, rtol=1e-5, atol=1e-5, what="loss vs the centred rows")
    assert_close(g, g0, rtol=1e-4, atol=1e-6, what="grad vs the centred rows")


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_forward_kl_takes_the_fma_form_below_two_to_the_twenty(temperature, small_blocks):
    """The table's FINITE (the backward's unguarded span, whose blocks form FMA frame
    units) is set for a forward-KL row whose frames |f scale2| lie below 2^20, and 0 for
    one above: a row read in the difference form, whose backward keeps its guards (and
    forms the same units)."""
    from sgopd_kernels.triton._table import FINITE

    gen = torch.Generator().manual_seed(8)
    vocab, scale2 = 150, tlogits.LOG2E / temperature
    s = torch.round(torch.randn(4, vocab, generator=gen) * 16) / 16
    t = torch.round(torch.randn(4, vocab, generator=gen) * 16) / 16
    below, above = 0.9 * 2.0 ** 20 / scale2, 1.1 * 2.0 ** 20 / scale2
    s[1] += round(below)               # the student's frame below, then above the limit
    s[2] += round(above)
    t[3] -= round(above)               # the teacher's above
    y = torch.full((4,), 3)
    opts = row_options(divergence="forward_kl", temperature=temperature)
    rows = tlogits.opd_rows(s.to(DEV), t.to(DEV), y.to(DEV), None, opts)
    assert [bool(v != 0) for v in rows[:, FINITE.value].cpu()] == [True, True, False, False]


@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl"])
@pytest.mark.parametrize("gated", [False, True])
def test_logits_near_two_to_the_sixteen_keep_their_digits(divergence, gated, small_blocks):
    """A common offset of 2^16 on both models' logits (exact in float32: the logits are
    multiples of 1/64) changes no loss, statistic or gradient. Forward KL forms its frame
    units as fma(raw, scale2, -round(f scale2)), which carries the rounding of f scale2 (up
    to 2^-7 base-2 units here) as a shift common to the row: the kernel must take it out of
    every expectation, or the loss moves by about 1e-3."""
    gen = torch.Generator().manual_seed(11)
    n, vocab = 6, 150
    s0 = torch.round(torch.randn(n, vocab, generator=gen) * 2 * 64) / 64
    t0 = torch.round(torch.randn(n, vocab, generator=gen) * 2 * 64) / 64
    y = torch.randint(0, vocab, (n,), generator=gen)
    ver = torch.tensor([1.0, -1.0, 0.0, 1.0, -1.0, 1.0]) if gated else None
    kw = dict(divergence=divergence, beta=0.1, temperature=0.7, reduction="none")
    got = []
    for off in (0.0, 65536.0):
        s, t = s0 + off, t0 + off
        x = s.to(DEV).requires_grad_(True)
        loss, stats = sk.gated_opd_loss(x, t.to(DEV), y.to(DEV), _to(ver, DEV),
                                        return_stats=True, backend="triton", **kw)
        grad_out = torch.randn(loss.shape, generator=gen).to(DEV)
        (g,) = torch.autograd.grad(loss, x, grad_out)
        want, want_stats, g_want = oracle_opd(s, t, y, ver, grad_out=grad_out.cpu(), **kw)
        assert_loss_close(loss.cpu(), want)
        assert_grad_close(g.cpu(), g_want, torch.float32)
        for name in ("teacher_kl", "student_entropy", "divergence"):
            assert_loss_close(torch.as_tensor(float(getattr(stats, name))).reshape(1),
                              torch.as_tensor(want_stats[name]).reshape(1), what=name)
        got.append((loss.cpu(), stats))
    (l0, st0), (l1, st1) = got
    assert_close(l1, l0, rtol=1e-5, atol=1e-5, what="loss at 2^16 vs at 0")
    for name in ("teacher_kl", "student_entropy"):
        assert abs(float(getattr(st1, name)) - float(getattr(st0, name))) < 1e-5, name
