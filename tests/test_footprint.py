"""What the Triton paths allocate, and that they never read a value on the host, on a CPU.

A ``TorchDispatchMode`` records every aten op that the public call, the autograd
layer, the launchers and the reductions run, with its outputs. The issue asks
that the kernels never materialize a full-size float32 tensor (the only N x V
tensor is the gradient, in the logits' dtype) and that forward and backward
never synchronize the host: every host read of a tensor value (``.item()``,
``bool(t)``, ``int(t)``) is the op ``aten._local_scalar_dense``. The
interpreted kernels themselves run in numpy; the interpreter's own byte
copies of the arguments (uint8 storages) are not the library's and are left
out.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import sgopd_kernels as sk
from sgopd_kernels.api import row_options
from sgopd_kernels.triton import logits as tlogits
from sgopd_kernels.triton import sampled as tsampled
from conftest import TRITON_DEVICE, needs_triton
from families import KERNELS, cases

pytestmark = needs_triton

HOST_READ = torch.ops.aten._local_scalar_dense.default
INTERPRETER_COPIES = ("aten.set_", "aten.empty.memory_format", "aten.copy_")


def _storages(tree):
    return {t.untyped_storage().data_ptr() for t in tree_flatten(tree)[0]
            if isinstance(t, torch.Tensor)}


class Record(TorchDispatchMode):
    """Every op's newly allocated outputs (name, shape, dtype), host reads apart.

    Views and in-place results share an input's storage: they allocate nothing and are
    not recorded.
    """

    def __init__(self):
        super().__init__()
        self.outputs = []
        self.host_reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is HOST_READ:
            self.host_reads.append(func)
        old = _storages((args, kwargs))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.untyped_storage().data_ptr() in old:
                continue
            if t.dtype == torch.uint8 and str(func).startswith(INTERPRETER_COPIES):
                continue
            self.outputs.append((str(func), tuple(t.shape), t.dtype))
        return out


def _full_size(rec, n_elements):
    return [(f, s, d) for f, s, d in rec.outputs if _numel(s) >= n_elements]


def _numel(shape):
    n = 1
    for x in shape:
        n *= x
    return n


def _inputs(dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(2, 3, 300, generator=gen).to(dtype).to(TRITON_DEVICE)
    t = torch.randn(2, 3, 305, generator=gen).to(dtype).to(TRITON_DEVICE)  # padded teacher
    y = torch.randint(0, 300, (2, 3), generator=gen).to(TRITON_DEVICE)
    v = torch.tensor([True, False], device=TRITON_DEVICE)
    return s, t, y, v


@pytest.mark.parametrize("fam,opts,backend", cases(KERNELS))
def test_public_path_allocates_one_gradient_and_reads_nothing(fam, opts, backend):
    """Every family variant on every kernel backend: forward and backward through the public
    call allocate one logits-sized tensor (the gradient, in the logits' dtype) and read no
    value on the host."""
    name, dev = backend
    s, t, y, v = (x.to(dev) for x in _inputs())
    teacher = (t,) if fam.name == "logits" else fam.teacher(s, torch.Generator().manual_seed(2))
    x = s.clone().requires_grad_(True)
    with Record() as public:
        loss, stats = fam(x, teacher, y, v, return_stats=True, backend=name, **opts)
        loss.backward()
    assert public.host_reads == []
    big = _full_size(public, s.numel())
    # one allocation as large as the logits: the gradient, in bfloat16; no float32 copy
    assert len(big) == 1 and big[0][1:] == (tuple(s.shape), torch.bfloat16), big


@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl"])
def test_logits_launchers_allocate_one_gradient_and_read_nothing(divergence):
    s, t, y, v = _inputs()
    # inside the custom ops: the launchers' own tensors
    sign = torch.tensor([1.0] * 3 + [-1.0] * 3, device=TRITON_DEVICE)
    opts = row_options(beta=0.1, divergence=divergence)
    with Record() as launchers:
        rows = tlogits.opd_rows(s, t, y.reshape(-1), sign, opts)
        tlogits.opd_rows_backward(torch.ones(6, device=TRITON_DEVICE), s, t, y.reshape(-1),
                                  rows, opts)
    assert launchers.host_reads == []
    big = _full_size(launchers, s.numel())
    assert len(big) == 1 and big[0][1:] == (tuple(s.shape), torch.bfloat16), big


def test_sampled_launchers_allocate_one_gradient_and_read_nothing():
    s, t, y, v = _inputs()
    tlp = -torch.rand(2, 3, device=TRITON_DEVICE)
    with Record() as launchers:
        rows = tsampled.sampled_rows(s, tlp.reshape(-1), y.reshape(-1), None, row_options())
        tsampled.sampled_rows_backward(torch.ones(6, device=TRITON_DEVICE), s, tlp.reshape(-1),
                                       y.reshape(-1), rows, row_options())
    assert launchers.host_reads == []
    big = _full_size(launchers, s.numel())
    assert len(big) == 1 and big[0][1:] == (tuple(s.shape), torch.bfloat16), big


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_linear_holds_chunks_and_reads_nothing(reduction):
    gen = torch.Generator().manual_seed(1)
    n, h, vocab, chunk = 12, 8, 50, 4
    hs = torch.randn(n, h, generator=gen).to(TRITON_DEVICE).requires_grad_()
    ws = torch.randn(vocab, h, generator=gen).to(TRITON_DEVICE).requires_grad_()
    ht = torch.randn(n, h, generator=gen).to(TRITON_DEVICE)
    wt = torch.randn(vocab + 3, h, generator=gen).to(TRITON_DEVICE)
    tok = torch.randint(0, vocab, (n,), generator=gen).to(TRITON_DEVICE)
    with Record() as rec:
        loss = sk.fused_linear_gated_opd_loss(hs, ws, ht, wt, tok, chunk_size=chunk,
                                              reduction=reduction, backend="triton")
        loss.sum().backward()
    assert rec.host_reads == []
    # logits exist one chunk at a time: besides the weight's gradient (vocab, h), nothing
    # larger than a chunk of logits, let alone the full (n, vocab)
    sizes = sorted((_numel(s), f) for f, s, _ in rec.outputs if s != (vocab, h))
    assert sizes[-1][0] <= chunk * vocab, sizes[-3:]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_vocab_parallel_triton_path_reads_nothing(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0,
                            world_size=1)
    try:
        s, t, y, v = _inputs()
        x = s.clone().requires_grad_(True)
        with Record() as rec:
            loss, stats = sk.gated_opd_loss(x, t, y, v, beta=0.1, return_stats=True,
                                            process_group=dist.group.WORLD, backend="triton")
            loss.backward()
        assert rec.host_reads == []
        big = _full_size(rec, s.numel())
        assert len(big) == 1 and big[0][1:] == (tuple(s.shape), torch.bfloat16), big
        # (and it computes the single-device loss)
        ref = sk.gated_opd_loss(s, t, y, v, beta=0.1, backend="triton")
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    finally:
        dist.destroy_process_group()
