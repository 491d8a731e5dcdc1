"""The Triton kernels of the top-k loss against the float64 oracle (hypothesis over k, V,
unused slots, dtypes, options and adversarial values), the precision of the student's tail,
bad ids, and the identities of the torch tests on the kernels.

Without a GPU the kernels run in the Triton interpreter (conftest.py): shapes stay small.
"""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import sgopd_kernels as sk
from sgopd_kernels.triton import topk as ttopk
from conftest import TRITON_DEVICE, needs_triton
from topk_cases import check_against_oracle, draw_case, top_heavy
from helpers import (assert_close, assert_grad_close, assert_loss_close,
                     interpreted_hypothesis, oracle_topk)

pytestmark = needs_triton
DEV = TRITON_DEVICE
HYP = interpreted_hypothesis(60)


@pytest.mark.filterwarnings("ignore:verifier. a float tensor")
@HYP
@given(data=st.data(), block=st.sampled_from([16, 64, 4096]))
def test_topk_matches_oracle(data, block):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ttopk, "FWD_BLOCK_V", block)
        mp.setattr(ttopk, "BWD_BLOCK_V", block)
        check_against_oracle("triton", DEV, *draw_case(data.draw))


def _heavy_rows(tail, n=6, vocab=700, k=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    s = 0.5 * torch.randn(n, vocab, generator=gen)
    ids = torch.stack([torch.randperm(vocab, generator=gen)[:k] for _ in range(n)])
    s = top_heavy(s.scatter_add(-1, ids, 6.0 + torch.randn(n, k, generator=gen)), ids, tail)
    lp_t = torch.log_softmax(torch.randn(n, vocab, generator=gen), -1)
    return s, ids, lp_t.gather(-1, ids), torch.randint(0, vocab, (n,), generator=gen)


@pytest.mark.parametrize("tail", [1e-6, 1e-9, 1e-14])
def test_student_tail_keeps_float32_precision_when_the_top_k_holds_nearly_all(tail,
                                                                              small_blocks):
    """The tail by exclusion (float64 sums of bitwise-equal terms; below 2^-30 of the mass, a
    second read with a membership test) against the float64 sum over the tokens outside; a
    float32 1 - sum, for comparison, is off by 30% at 1e-6."""
    s, ids, tlp, y = _heavy_rows(tail)
    from sgopd_kernels.api import row_options
    st_, _ = ttopk.stream(s.to(DEV), ids.to(DEV), y.to(DEV), row_options())
    got = torch.exp2(st_[:, ttopk.ST_LT2.value].double()).cpu() / \
        st_[:, ttopk.ST_S.value].double().cpu()
    sd = s.double()
    inside = torch.zeros_like(sd, dtype=torch.bool).scatter_(-1, ids, True)
    exact = torch.softmax(sd, -1).masked_fill(inside, 0).sum(-1)
    assert torch.allclose(exact, torch.full_like(exact, tail), rtol=1e-3)
    assert float(((got - exact) / exact).abs().max()) < 2e-6
    naive = 1 - torch.softmax(s, -1).gather(-1, ids).sum(-1).double()
    assert float(((naive - exact) / exact).abs().max()) > 1e-2
    # and through the loss: reverse KL, forward KL and JSD with the teacher's tail at 1e-3
    for divergence in ("reverse_kl", "forward_kl", "jsd"):
        kw = dict(divergence=divergence, reduction="sum")
        x = s.to(DEV).requires_grad_(True)
        loss = sk.topk_opd_loss(x, ids.to(DEV), tlp.to(DEV), y.to(DEV), backend="triton", **kw)
        (g,) = torch.autograd.grad(loss, x)
        want, _, g_want = oracle_topk(s, ids, tlp, None, y, **kw)
        _, _, g_eager = oracle_topk(s, ids, tlp, None, y, dtype=torch.float32, **kw)
        assert_loss_close(loss.reshape(1), want.reshape(1))
        assert_grad_close(g, g_want, torch.float32, g_eager)


@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl", "jsd"])
def test_a_maximum_far_above_the_reference_reads_the_row_again(divergence, small_blocks):
    """The reference is fixed before the pass from the categories and the first block: a tail
    token 60 nats above it (past the first block) makes the row read itself again."""
    gen = torch.Generator().manual_seed(3)
    s = torch.randn(4, 300, generator=gen)
    s[:, 200] = 60.0
    s[1, 250] = 130.0
    ids = torch.stack([torch.randperm(64, generator=gen)[:5] for _ in range(4)])
    tlp = torch.log_softmax(torch.randn(4, 300, generator=gen), -1).gather(-1, ids)
    y = torch.tensor([200, 3, 250, 17])
    kw = dict(divergence=divergence, beta=0.2, reduction="sum")
    x = s.to(DEV).requires_grad_(True)
    loss, stats = sk.topk_opd_loss(x, ids.to(DEV), tlp.to(DEV), y.to(DEV),
                                   torch.ones(4, device=DEV), return_stats=True,
                                   backend="triton", **kw)
    (g,) = torch.autograd.grad(loss, x)
    want, want_stats, g_want = oracle_topk(s, ids, tlp, None, y, torch.ones(4), **kw)
    _, _, g_eager = oracle_topk(s, ids, tlp, None, y, torch.ones(4), dtype=torch.float32, **kw)
    assert_loss_close(loss.reshape(1), want.reshape(1))
    for name, value in want_stats.items():
        assert_loss_close(getattr(stats, name).reshape(1), torch.tensor([value]), what=name)
    assert_grad_close(g, g_want, torch.float32, g_eager)


@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl", "jsd"])
def test_a_maximum_far_below_a_reference_of_zero_reads_the_row_again(divergence, small_blocks):
    """A first block and categories all -inf leave a reference of 0: logits near -1000 past
    the first block would underflow against it, so the row is read again from its maximum."""
    gen = torch.Generator().manual_seed(5)
    s = -1000.0 + torch.randn(3, 200, generator=gen)
    s[:, :64] = -math.inf
    ids = torch.stack([torch.randperm(64, generator=gen)[:4] for _ in range(3)])
    tlp = torch.log_softmax(torch.randn(3, 200, generator=gen), -1).gather(-1, ids)
    y = torch.tensor([100, 150, 199])
    kw = dict(divergence=divergence, beta=0.2, reduction="sum")
    x = s.to(DEV).requires_grad_(True)
    loss = sk.topk_opd_loss(x, ids.to(DEV), tlp.to(DEV), y.to(DEV), torch.ones(3, device=DEV),
                            backend="triton", **kw)
    (g,) = torch.autograd.grad(loss, x)
    want, _, g_want = oracle_topk(s, ids, tlp, None, y, torch.ones(3), **kw)
    _, _, g_eager = oracle_topk(s, ids, tlp, None, y, torch.ones(3), dtype=torch.float32, **kw)
    assert torch.isfinite(want)
    assert_loss_close(loss.reshape(1), want.reshape(1))
    assert_grad_close(g, g_want, torch.float32, g_eager)


def test_bad_ids_make_their_rows_nan_without_a_read_out_of_bounds():
    gen = torch.Generator().manual_seed(4)
    s = torch.randn(5, 50, generator=gen)
    ids = torch.stack([torch.randperm(50, generator=gen)[:6] for _ in range(5)])
    tlp = torch.log_softmax(torch.randn(5, 50, generator=gen), -1).gather(-1, ids)
    ids[1, 2] = 50          # an id = V
    ids[2, 4] = ids[2, 1]   # an id twice
    ids[3, 0] = 10 ** 9     # far out of range
    y = torch.randint(0, 50, (5,), generator=gen)
    x = s.to(DEV).requires_grad_(True)
    loss = sk.topk_opd_loss(x, ids.to(DEV), tlp.to(DEV), y.to(DEV), reduction="none",
                            backend="triton")
    (g,) = torch.autograd.grad(loss.sum(), x)
    loss, g = loss.cpu(), g.cpu()
    assert torch.isnan(loss[1:4]).all() and torch.isfinite(loss[[0, 4]]).all()
    assert torch.isnan(g[1:4]).all() and torch.isfinite(g[[0, 4]]).all()
    want = sk.topk_opd_loss(s[[0, 4]], ids[[0, 4]], tlp[[0, 4]], y[[0, 4]], reduction="none",
                            backend="torch")
    assert_close(loss[[0, 4]], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl", "jsd"])
def test_top_k_of_the_whole_vocabulary_is_the_full_loss(divergence, small_blocks):
    gen = torch.Generator().manual_seed(5)
    vocab = 90
    s = 2 * torch.randn(2, 3, vocab, generator=gen)
    t = 2 * torch.randn(2, 3, vocab, generator=gen)
    y = torch.randint(0, vocab, (2, 3), generator=gen)
    ids = torch.argsort(torch.rand(2, 3, vocab, generator=gen), -1)
    v = torch.tensor([True, False])
    kw = dict(divergence=divergence, beta=0.3, temperature=0.8, reduction="none")
    out = []
    for fn, teacher in ((sk.topk_opd_loss, (ids, torch.log_softmax(t, -1).gather(-1, ids))),
                        (sk.gated_opd_loss, (t * 0.8,))):  # teacher at temperature 1
        x = s.to(DEV).requires_grad_(True)
        loss = fn(x, *(z.to(DEV) for z in teacher), y.to(DEV), v.to(DEV),
                  backend="triton" if fn is sk.topk_opd_loss else "torch", **kw)
        out.append((loss,) + torch.autograd.grad(loss.sum(), x))
    for a, b in zip(*out):
        assert_close(a, b, rtol=1e-4, atol=2e-6)


def test_strided_students_are_read_in_place():
    gen = torch.Generator().manual_seed(6)
    base = torch.randn(2, 6, 80, generator=gen)
    s = base[:, :-1]
    lp_t = torch.log_softmax(torch.randn(2, 5, 80, generator=gen), -1)
    ids = lp_t.topk(7, -1).indices
    y = torch.randint(0, 80, (2, 5), generator=gen)
    leaf = base.clone().to(DEV).requires_grad_(True)
    loss = sk.topk_opd_loss(leaf[:, :-1], ids.to(DEV), lp_t.gather(-1, ids).to(DEV), y.to(DEV),
                            divergence="jsd", backend="triton")
    (g,) = torch.autograd.grad(loss, leaf)
    want, _, g_want = oracle_topk(s, ids, lp_t.gather(-1, ids), None, y, divergence="jsd")
    assert_loss_close(loss.reshape(1), want.reshape(1))
    assert_grad_close(g[:, :-1], g_want, torch.float32)
    assert (g[:, -1] == 0).all()


def test_forward_kl_toward_a_tail_the_student_nearly_lacks():
    """The student's tail holds about 1e-50 of its mass (below float32's range) and the teacher's
    5%: forward KL's gradient there is -Q_tail times each token's share of the tail, which the
    kernel keeps by moving the coefficient's scale into the exponent."""
    gen = torch.Generator().manual_seed(7)
    vocab, k = 120, 4
    s = torch.randn(3, vocab, generator=gen)
    ids = torch.stack([torch.randperm(vocab, generator=gen)[:k] for _ in range(3)])
    s = s.scatter_add(-1, ids, torch.full((3, k), 125.0))
    lp_t = torch.log_softmax(torch.randn(3, k, generator=gen), -1) + math.log(0.95)
    y = ids[:, 0]
    x = s.to(DEV).requires_grad_(True)
    loss = sk.topk_opd_loss(x, ids.to(DEV), lp_t.to(DEV), y.to(DEV), divergence="forward_kl",
                            reduction="sum", backend="triton")
    (g,) = torch.autograd.grad(loss, x)
    want, _, g_want = oracle_topk(s, ids, lp_t, None, y, divergence="forward_kl",
                                  reduction="sum")
    outside = torch.ones_like(s, dtype=torch.bool).scatter_(-1, ids, False)
    assert float(g_want[outside].abs().max()) > 1e-3  # a gradient the tail really gets
    assert_loss_close(loss.reshape(1), want.reshape(1))
    assert_grad_close(g, g_want, torch.float32)
