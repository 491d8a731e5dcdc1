"""Edge cases, determinism and torch.compile, for every loss family on every backend that
runs here (tests/families.py)."""

import pytest
import torch

from families import BACKENDS, FAMILIES, KERNELS, cases
from helpers import assert_close

ALL = cases(BACKENDS)
ON_KERNELS = cases(KERNELS)


def _inputs(fam, shape, vocab, seed, device, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    s = (2 * torch.randn(*shape, vocab, generator=gen)).to(dtype)
    teacher = fam.teacher(s, gen)
    y = torch.randint(0, vocab, shape, generator=gen)
    return s.to(device), tuple(x.to(device) for x in teacher), y.to(device)


@pytest.mark.parametrize("fam,opts,backend", ALL)
def test_all_masked_and_empty(fam, opts, backend):
    name, dev = backend
    s, teacher, y = _inputs(fam, (2, 3), 40, 5, dev)
    y[:] = -100
    x = s.clone().requires_grad_(True)
    loss, stats = fam(x, teacher, y, return_stats=True, backend=name, **opts)
    loss.backward()
    assert float(loss.detach()) == 0.0 and not torch.isnan(x.grad).any() and (x.grad == 0).all()
    assert all(float(v) == 0.0 for v in stats)
    empty = torch.zeros(0, 40, device=dev, requires_grad=True)
    teacher = tuple(t.reshape(6, *t.shape[2:])[:0] for t in teacher)
    loss = fam(empty, teacher, torch.zeros(0, dtype=torch.long, device=dev), backend=name,
               **opts)
    loss.backward()
    assert float(loss.detach()) == 0.0 and empty.grad.shape == (0, 40)


@pytest.mark.parametrize("fam,opts,backend", ALL)
def test_nan_verifier_poisons_its_position_only(fam, opts, backend):
    name, dev = backend
    s, teacher, y = _inputs(fam, (4,), 60, 11, dev)
    v = torch.tensor([1.0, float("nan"), -1.0, 0.0], device=dev)
    x = s.clone().requires_grad_(True)
    loss = fam(x, teacher, y, v, reduction="none", backend=name, **opts)
    (g,) = torch.autograd.grad(loss.sum(), x)
    loss, g = loss.cpu(), g.cpu()
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2, 3]]).all()
    assert torch.isnan(g[1]).all() and torch.isfinite(g[[0, 2, 3]]).all()


@pytest.mark.parametrize("fam,opts,backend", ON_KERNELS)
def test_out_of_range_token_gives_nan_row_not_a_read(fam, opts, backend):
    """A kernel cannot raise without a host sync: the row's loss and gradient are NaN."""
    name, dev = backend
    s, teacher, y = _inputs(fam, (4,), 70, 4, dev)
    y[1] = 70
    y[2] = -5
    x = s.clone().requires_grad_(True)
    loss = fam(x, teacher, y, reduction="none", backend=name, **opts)
    (g,) = torch.autograd.grad(loss.sum(), x)
    loss, g = loss.cpu(), g.cpu()
    assert torch.isnan(loss[[1, 2]]).all() and torch.isfinite(loss[[0, 3]]).all()
    assert torch.isnan(g[[1, 2]]).all() and torch.isfinite(g[[0, 3]]).all()


@pytest.mark.parametrize("fam", FAMILIES, ids=[f.name for f in FAMILIES])
def test_out_of_range_token_raises_on_torch(fam):
    s, teacher, y = _inputs(fam, (3,), 8, 0, "cpu")
    y[1] = 8
    with pytest.raises(ValueError, match="tokens"):
        fam(s, teacher, y, backend="torch", **fam.variants[0])


@pytest.mark.parametrize("fam,opts,backend", ALL)
def test_bitwise_deterministic(fam, opts, backend, small_blocks):
    name, dev = backend
    s, teacher, y = _inputs(fam, (3, 4), 200, 6, dev, dtype=torch.bfloat16)
    outs = []
    for _ in range(2):
        x = s.clone().requires_grad_(True)
        loss, stats = fam(x, teacher, y, torch.tensor([1., -1., 0.], device=dev),
                          return_stats=True, backend=name, **opts)
        loss.backward()
        outs.append((loss, torch.stack(list(stats)), x.grad))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("fam,opts,backend", ALL)
def test_matches_oracle_with_every_reduction(fam, opts, backend):
    name, dev = backend
    s, teacher, y = _inputs(fam, (2, 5), 33, 9, dev)
    y[0, 1] = -100
    v = torch.tensor([True, False], device=dev)
    w = torch.rand(2, 5, generator=torch.Generator().manual_seed(1))
    for reduction in ("mean", "sum", "none"):
        x = s.clone().requires_grad_(True)
        loss = fam(x, teacher, y, v, weights=w.to(dev), reduction=reduction, backend=name,
                   **opts)
        gout = torch.linspace(0.5, 1.5, loss.numel()).reshape(loss.shape)
        (g,) = torch.autograd.grad(loss, x, gout.to(dev))
        want, _, g_want = fam.oracle(s.cpu(), *(t.cpu() for t in teacher), y.cpu(), v.cpu(),
                                     weights=w, reduction=reduction, grad_out=gout,
                                     **opts)
        assert_close(loss, want, rtol=1e-5, atol=1e-6, what=f"{reduction} loss")
        assert_close(g, g_want, rtol=1e-4, atol=1e-6, what=f"{reduction} grad")


@pytest.mark.parametrize("fam,opts,backend", ALL)
def test_torch_compile_fullgraph(fam, opts, backend):
    name, dev = backend
    s, teacher, y = _inputs(fam, (2, 5), 33, 3, dev)
    v = torch.tensor([True, False], device=dev)

    def step(x):
        loss, stats = fam(x, teacher, y, v, return_stats=True, backend=name, **opts)
        return loss * 2.0, stats.teacher_kl

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x1 = s.clone().requires_grad_(True)
    x2 = s.clone().requires_grad_(True)
    l1, k1 = step(x1)
    l2, k2 = compiled(x2)
    l1.backward()
    l2.backward()
    assert torch.allclose(l1, l2) and torch.allclose(k1, k2)
    assert torch.allclose(x1.grad, x2.grad)
