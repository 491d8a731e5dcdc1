"""Vocabulary-parallel losses (docs/math.md, "Vocabulary parallel"): shards on several CPU
processes (gloo) give the single-process loss, statistics and gradient."""

import os
import tempfile
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import sgopd_kernels as sk
from sgopd_kernels import _dispatch
from sgopd_kernels._options import Divergence
from conftest import needs_triton

B, T, V_LOCAL, EXTRA_T = 2, 4, 7, 3
V_WIDE = 53  # per rank: blocks of 16 at 0, 16, 32 and a tail of 5

CASES = [
    dict(),
    dict(divergence="forward_kl", beta=0.3, temperature=0.8),
    dict(verifier="bool", beta=0.1, reduction="sum", return_stats=True),
    dict(verifier="float", divergence="forward_kl", weights=True, reduction="none",
         return_stats=True),
    dict(masked_vocab=True, verifier="bool", return_stats=True),
    dict(masked_vocab=True, divergence="forward_kl", verifier="bool", return_stats=True),
    dict(divergence="jsd", jsd_beta=0.3, verifier="bool", beta=0.2, teacher_temperature=1.4,
         return_stats=True),
    dict(masked_vocab=True, divergence="jsd", verifier="float", weights=True, reduction="none"),
    dict(teacher_temperature=0.6, temperature=1.2, verifier="bool", return_stats=True),
    # the teacher alone masks tokens the student supports (inside full blocks of the wide
    # shards), one of them where the student's probability underflows to 0
    dict(masked_teacher=True, return_stats=True),
    dict(masked_teacher=True, divergence="forward_kl", verifier="bool", return_stats=True),
    # rows held near huge constants (forward KL's kernels read them in the difference form)
    dict(held_near_huge=True, divergence="forward_kl", verifier="bool", temperature=0.7,
         return_stats=True),
    dict(held_near_huge=True, verifier="float", reduction="none"),
    dict(held_near_huge=True, divergence="jsd", verifier="bool", reduction="none"),
]


def _global_inputs(world, dtype, seed, v_local=V_LOCAL):
    gen = torch.Generator().manual_seed(seed)
    vocab = v_local * world
    s = (torch.randn(B, T, vocab, generator=gen) * 2).to(dtype)
    t = (torch.randn(B, T, vocab, generator=gen) * 2).to(dtype)
    tok = torch.randint(0, vocab, (B, T), generator=gen)
    tok[1, 2] = -100
    return s, t, tok, gen


def _case(s, t, tok, gen, opts):
    opts = dict(opts)
    ver = opts.pop("verifier", None)
    if ver == "bool":
        opts["verifier"] = torch.tensor([True, False])
    elif ver == "float":
        opts["verifier"] = torch.randn(B, T, generator=gen).double()
    if opts.pop("weights", False):
        opts["weights"] = torch.rand(B, T, generator=gen).double() + 0.5
    if opts.pop("masked_teacher", False):
        t = t.clone()
        s = s.clone()
        t[..., 18::11] = float("-inf")
        if s.shape[-1] > 18:
            s[0, 1, 18] = -200.0  # p_S underflows there: 0 * -inf unguarded
    if opts.pop("held_near_huge", False):  # (the loss sees only differences within a row)
        s = s.clone()
        t = t.clone()
        t[0, 1] = -1e15                   # a uniform teacher
        s[1, 0] = 1e15                    # a uniform student
        if opts.get("divergence") == "forward_kl":
            # a one-hot teacher, on rank 0 (reverse KL would be about 1e8 there, and the
            # float32 reference's gradient loses 1e-3 of it to cancellation)
            t[1, 3] = -1e15
            t[1, 3, 2] += 2.0 ** 27
            # a teacher that holds the student's best token at -1e15 (the frame's teacher
            # logit, where the shards centre the teacher)
            t[0, 3, s[0, 3].argmax()] = -1e15
        s[0, 2] += 2.0 ** 21              # both past 2^20 (the limit of the FMA form)
        t[0, 2] -= 2.0 ** 21
    if opts.pop("masked_vocab", False):  # -inf in both models, on every shard
        s = s.clone()
        t = t.clone()
        s[..., 3::5] = float("-inf")
        t[..., 1::4] = float("-inf")
        t[0, 0] = float("-inf")  # the teacher rules out a whole row: KL is +inf
        t[0, 0, 2] = 0.0
        s[1, 1] = float("-inf")  # a student row without support
        t[1, 3] = float("-inf")  # a teacher row without support
    return s, t, opts


def _compare(ref, got, s_full, s_shard, lo, hi, tol):
    """The shard's loss and statistics equal the full ones; its gradient the full one's slice."""
    if isinstance(ref, tuple):
        (ref, ref_stats), (got, stats) = ref, got
        for a, b in zip(stats, ref_stats):
            torch.testing.assert_close(a, b, **tol, equal_nan=True)
    torch.testing.assert_close(got, ref, **tol, equal_nan=True)
    # (a +inf row's gradient is not finite: per-position losses compare their finite rows)
    if ref.dim() or torch.isfinite(ref):
        gout = torch.isfinite(ref).to(ref.dtype) if ref.dim() else None
        (g_full,) = torch.autograd.grad(ref, s_full, gout)
        (g_shard,) = torch.autograd.grad(got, s_shard, gout)
        torch.testing.assert_close(g_shard, g_full[..., lo:hi], **tol, equal_nan=True)


def _worker(rank, world, path, dtype, backend):
    # float64 agrees to rounding; float32 to the rounding of a different summation order
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-6)
    try:
        dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank,
                                world_size=world)
        group = dist.group.WORLD
        lo, hi = rank * V_LOCAL, (rank + 1) * V_LOCAL
        kernels = _dispatch.BY_NAME[backend].divergences
        # the Triton kernels also with shards of several blocks of 16: block 0, full blocks
        # read unmasked and unguarded (a -inf there makes the row read itself again), a tail
        # (and shards of 20 and 32 columns, one full block or none past block 0, on the
        # masked cases; and of 46, whose rows start off a 16-byte boundary beside a teacher
        # of 49 that is too: the full blocks on the shifted grid, a -inf there re-read)
        wide = [(seed, opts, V_WIDE) for seed, opts in enumerate(CASES)] + [
            (seed, opts, v) for v in (20, 32, 46) for seed, opts in enumerate(CASES)
            if opts.get("masked_vocab") or opts.get("masked_teacher")] \
            if backend == "triton" else []
        for seed, opts, v_local in [(seed, opts, V_LOCAL) for seed, opts in enumerate(CASES)] \
                + wide:
            if Divergence.parse(opts.get("divergence", "reverse_kl")) not in kernels:
                continue  # (a divergence these kernels do not implement: auto takes torch)
            from sgopd_kernels.triton import parallel as tp

            tp.BLOCK_V = 16 if v_local != V_LOCAL else 4096
            lo, hi = rank * v_local, (rank + 1) * v_local
            s, t, tok, gen = _global_inputs(world, dtype, seed, v_local)
            s, t, opts = _case(s, t, tok, gen, opts)
            s_full = s.clone().requires_grad_()
            ref = sk.gated_opd_loss(s_full, t, tok, backend="torch", **opts)
            # a shard of the student; the teacher shard carries extra trailing columns
            s_shard = s[..., lo:hi].clone().requires_grad_()
            t_shard = torch.cat([t[..., lo:hi], torch.randn(B, T, EXTRA_T).to(dtype)], -1)
            got = sk.gated_opd_loss(s_shard, t_shard, tok, process_group=group, backend=backend,
                                    **opts)
            _compare(ref, got, s_full, s_shard, lo, hi, tol)
            # the sampled estimator
            tlp = -5 * torch.rand(B, T, generator=gen).to(dtype)
            kw = {k: v for k, v in opts.items()
                  if k not in ("beta", "divergence", "jsd_beta", "teacher_temperature")}
            ref = sk.sampled_opd_loss(s_full, tlp, tok, backend="torch", **kw)
            got = sk.sampled_opd_loss(s_shard, tlp, tok, process_group=group, **kw)
            _compare(ref, got, s_full, s_shard, lo, hi, tol)
        lo, hi = rank * V_LOCAL, (rank + 1) * V_LOCAL
        if backend == "triton":
            from sgopd_kernels.triton import parallel as tp

            tp.BLOCK_V = 4096
        # a token id beyond the global vocabulary raises on every rank (the torch path)
        s, t, tok, _ = _global_inputs(world, dtype, 0)
        tok[0, 0] = V_LOCAL * world
        try:
            sk.gated_opd_loss(s[..., lo:hi], t[..., lo:hi], tok, process_group=group,
                              backend="torch")
        except ValueError as e:
            assert "tokens" in str(e)
        else:
            raise AssertionError("an out-of-range token id did not raise")
        # shards of different widths raise on every rank (none is left waiting)
        try:
            sk.gated_opd_loss(s[..., lo:hi - (rank == 0)], t[..., lo:hi],
                              torch.zeros_like(tok), process_group=group, backend="torch")
        except ValueError as e:
            assert "widths" in str(e)
        else:
            raise AssertionError("unequal shard widths did not raise")
        if backend == "triton":
            # peaked rows (temperature 0.02): the gradient keeps float32 precision against
            # float64, as the single-device kernels do (no cancellation in u - E_p[u])
            gen = torch.Generator().manual_seed(1)
            s64 = torch.randn(B, T, V_LOCAL * world, generator=gen, dtype=torch.float64)
            t64 = torch.randn(B, T, V_LOCAL * world, generator=gen, dtype=torch.float64)
            tok_p = torch.randint(0, V_LOCAL * world, (B, T), generator=gen)
            for div in ("reverse_kl", "forward_kl"):
                kw = dict(divergence=div, temperature=0.02, reduction="sum", beta=0.1)
                x64 = s64.clone().requires_grad_()
                (g64,) = torch.autograd.grad(sk.gated_opd_loss(x64, t64, tok_p,
                                                               backend="torch", **kw), x64)
                x = s64[..., lo:hi].float().requires_grad_()
                (g,) = torch.autograd.grad(sk.gated_opd_loss(
                    x, t64[..., lo:hi].float(), tok_p, process_group=group, backend=backend,
                    **kw), x)
                torch.testing.assert_close(g.double(), g64[..., lo:hi], rtol=1e-4,
                                           atol=1e-5 * g64.abs().max().item())
            # logits near 2^16 (multiples of 1/64, exact in float32), in shards of several
            # blocks: forward KL's frame units carry the rounding of the frame times scale2 as
            # a shift common to the row, which the shards' sums shed (against float64: float32
            # torch loses digits there, in lse = m + log z)
            tp.BLOCK_V = 16
            gen = torch.Generator().manual_seed(2)
            vw = V_WIDE * world
            s64, t64 = (torch.round(torch.randn(B, T, vw, generator=gen, dtype=torch.float64)
                                    * 128) / 64 + 65536 for _ in range(2))
            tok_p = torch.randint(0, vw, (B, T), generator=gen)
            kw = dict(divergence="forward_kl", temperature=0.7, reduction="sum", beta=0.1,
                      verifier=torch.tensor([True, False]), return_stats=True)
            x64 = s64.clone().requires_grad_()
            l64, st64 = sk.gated_opd_loss(x64, t64, tok_p, backend="torch", **kw)
            (g64,) = torch.autograd.grad(l64, x64)
            wlo, whi = rank * V_WIDE, (rank + 1) * V_WIDE
            x = s64[..., wlo:whi].float().requires_grad_()
            l32, st32 = sk.gated_opd_loss(x, t64[..., wlo:whi].float(), tok_p,
                                          process_group=group, backend=backend, **kw)
            (g,) = torch.autograd.grad(l32, x)
            torch.testing.assert_close(l32.double(), l64.double(), rtol=1e-5, atol=1e-5)
            for name in ("teacher_kl", "student_entropy"):
                torch.testing.assert_close(torch.as_tensor(float(getattr(st32, name))),
                                           torch.as_tensor(float(getattr(st64, name))),
                                           rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(g.double(), g64[..., wlo:whi], rtol=1e-4,
                                       atol=1e-5 * g64.abs().max().item())
            tp.BLOCK_V = 4096
            # no host reads on this path: the affected rows are NaN instead of an error
            loss = sk.gated_opd_loss(s[..., lo:hi], t[..., lo:hi], tok, process_group=group,
                                     backend=backend, reduction="none")
            assert torch.isnan(loss[0, 0]) and not torch.isnan(loss[0, 1:]).any()
            loss = sk.gated_opd_loss(s[..., lo:hi - (rank == 0)], t[..., lo:hi],
                                     torch.zeros_like(tok), process_group=group,
                                     backend=backend, reduction="none")
            assert torch.isnan(loss).all()
        for fn, other, name in ((sk.gated_opd_loss, t[..., lo:hi], "cuda"),
                                (sk.sampled_opd_loss, t[..., 0], "triton")):
            try:
                fn(s[..., lo:hi], other, tok, process_group=group, backend=name)
            except NotImplementedError as e:
                assert "process_group" in str(e)
            else:
                raise AssertionError(f"backend={name!r} with process_group did not raise")
    except Exception:
        traceback.print_exc()
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize("world,dtype,backend", [
    (2, torch.float64, "torch"), (3, torch.float32, "torch"),
    pytest.param(2, torch.float32, "triton", marks=needs_triton),
    pytest.param(3, torch.float32, "triton", marks=needs_triton)])
def test_vocab_parallel_matches_single_process(world, dtype, backend):
    # (without a GPU the Triton kernels run interpreted: the workers inherit TRITON_INTERPRET)
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(world, os.path.join(d, "rendezvous"), dtype, backend),
                 nprocs=world, join=True)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_vocab_parallel_under_torch_compile(tmp_path):
    """With process_group the loss runs under torch.compile (with graph breaks around the
    collectives: the README says it does not compile with fullgraph=True) and gives the eager
    loss and gradient."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0,
                            world_size=1)
    try:
        s, t, tok, _ = _global_inputs(1, torch.float32, 0)
        ver = torch.tensor([True, False])

        def f(x):
            return sk.gated_opd_loss(x, t, tok, ver, beta=0.2, process_group=dist.group.WORLD,
                                     backend="torch")
        torch._dynamo.reset()
        compiled = torch.compile(f, backend="aot_eager")
        x1, x2 = s.clone().requires_grad_(), s.clone().requires_grad_()
        l1, l2 = f(x1), compiled(x2)
        l1.backward()
        l2.backward()
        torch.testing.assert_close(l2, l1)
        torch.testing.assert_close(x2.grad, x1.grad)
    finally:
        dist.destroy_process_group()
