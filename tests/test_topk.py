"""The top-k loss (docs/math.md, "A teacher that returns its top-k") on the torch backend: its
closed-form gradient against autograd, its identities (k = V is the full loss, the data
processing inequality, unused slots, y's own category, the tail floor), TRL's tail-bucket
losses as a peer, misuse, the vocabulary-parallel path and the fused-linear form."""

import math
import os
import tempfile
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import sgopd_kernels as sk
from sgopd_kernels import reference
from sgopd_kernels.api import row_options
from conftest import TRITON_DEVICE, needs_triton
from helpers import assert_close, oracle_topk, trl_tail_bucket

DIVERGENCES = ("reverse_kl", "forward_kl", "jsd")


def _inputs(shape=(2, 3), vocab=40, k=5, seed=0, dtype=torch.float64, scale=2.0):
    """Student logits, a teacher's log-probabilities over the vocabulary, its top-k (ids,
    log-probabilities), the sampled tokens and lp_T of each."""
    gen = torch.Generator().manual_seed(seed)
    s = (scale * torch.randn(*shape, vocab, generator=gen)).to(dtype)
    lp_t = torch.log_softmax(scale * torch.randn(*shape, vocab, generator=gen, dtype=dtype), -1)
    ids = lp_t.topk(k, -1).indices
    y = torch.randint(0, vocab, shape, generator=gen)
    return s, lp_t, ids, lp_t.gather(-1, ids), y, lp_t.gather(-1, y.unsqueeze(-1)).squeeze(-1)


def _grads(loss_fn, s, *args, grad_out=None, **kw):
    x = s.clone().requires_grad_(True)
    out = loss_fn(x, *args, **kw)
    loss = out[0] if isinstance(out, tuple) else out
    (g,) = torch.autograd.grad(loss, x, grad_out)
    return out, g


# --------------------------------------------------------------------------- the reference

@pytest.mark.parametrize("divergence,gated,beta,tau,token_lp,floor", [
    (d, g, b, t, tl, f) for d in DIVERGENCES
    for g, b, t, tl, f in ((False, 0.0, 1.0, False, 1e-7), (True, 0.3, 0.7, True, 0.0),
                           (True, 1.2, 1.6, True, 1e-3))])
def test_closed_form_gradient_matches_autograd(divergence, gated, beta, tau, token_lp, floor):
    s, _, ids, tlp, y, ttl = _inputs(shape=(3, 4), seed=1)
    ids[0, 1, 2] = -1  # an unused slot
    ids[1, 0, :] = -3  # a position whose top-k is empty
    y[2, 2] = ids[2, 2, 0]  # y among the ids
    y[0, 3] = -100
    ver = torch.tensor([True, False, True]) if gated else None
    kw = dict(divergence=divergence, beta=beta, temperature=tau, tail_floor=floor,
              extrapolation=1.7, interpolation=0.6, jsd_beta=0.35, reduction="sum")
    (loss, stats), g = _grads(sk.topk_opd_loss, s, ids, tlp, y, ver, return_stats=True,
                              teacher_token_logprobs=ttl if token_lp else None, backend="torch",
                              **kw)
    want, want_stats, g_want = oracle_topk(s, ids, tlp, ttl if token_lp else None, y, ver,
                                           **kw)
    assert_close(loss, want.float(), rtol=1e-6, atol=1e-7, what="loss")
    for name, value in want_stats.items():
        assert_close(getattr(stats, name), torch.tensor(value), rtol=1e-6, atol=1e-7, what=name)
    assert g.dtype == torch.float64
    assert_close(g, g_want, rtol=1e-9, atol=1e-12, what="grad")


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("gated,beta,tau", [(False, 0.0, 1.0), (True, 0.4, 0.6)])
def test_top_k_of_the_whole_vocabulary_is_the_full_loss(divergence, gated, beta, tau):
    """k = V (in any order): the categories are the tokens, the student's tail is empty, and
    the loss, statistics and gradient are those of gated_opd_loss on the teacher's logits."""
    vocab = 23
    s, lp_t, _, _, y, _ = _inputs(shape=(2, 5), vocab=vocab, seed=2)
    gen = torch.Generator().manual_seed(3)
    ids = torch.argsort(torch.rand(2, 5, vocab, generator=gen), -1)
    ver = torch.tensor([True, False]) if gated else None
    kw = dict(divergence=divergence, beta=beta, temperature=tau, reduction="none",
              return_stats=True, backend="torch")
    (loss, stats), g = _grads(sk.topk_opd_loss, s, ids, lp_t.gather(-1, ids), y, ver,
                              grad_out=torch.ones(2, 5, dtype=torch.float32), **kw)
    (want, want_stats), g_want = _grads(sk.gated_opd_loss, s, lp_t, y, ver,
                                        teacher_temperature=1.0,
                                        grad_out=torch.ones(2, 5, dtype=torch.float32), **kw)
    assert_close(loss, want, rtol=1e-6, atol=1e-7, what="loss")
    for a, b in zip(stats, want_stats):
        assert_close(a, b, rtol=1e-6, atol=1e-7, what="stats")
    assert_close(g, g_want, rtol=1e-9, atol=1e-12, what="grad")


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("k,token_lp", [(1, False), (4, True), (12, False), (30, True)])
def test_coarsened_divergence_is_at_most_the_full_one(divergence, k, token_lp):
    """Data processing: with no gate and beta = 0 the target is the teacher, and merging
    tokens into the tail can only lower each divergence (and KL(P_S || P_T)). tail_floor=0
    keeps the teacher's tail its exact mass."""
    s, lp_t, ids, tlp, y, ttl = _inputs(shape=(4, 6), vocab=40, k=k, seed=4)
    kw = dict(divergence=divergence, reduction="none", return_stats=True, backend="torch")
    coarse, c_stats = sk.topk_opd_loss(s, ids, tlp, y, tail_floor=0.0,
                                       teacher_token_logprobs=ttl if token_lp else None, **kw)
    full, f_stats = sk.gated_opd_loss(s, lp_t, y, teacher_temperature=1.0, **kw)
    assert (coarse <= full + 1e-6).all() and (coarse >= -1e-7).all()
    assert (coarse < full - 1e-4).any()  # (and the bound is not met trivially)
    assert float(c_stats.teacher_kl) <= float(f_stats.teacher_kl) + 1e-6
    assert float(c_stats.student_entropy) == pytest.approx(float(f_stats.student_entropy),
                                                           rel=1e-6)


def test_unused_slots_are_absent_and_y_gets_its_own_category():
    s, _, ids, tlp, y, ttl = _inputs(shape=(3, 4), vocab=30, k=4, seed=5)
    base = sk.topk_opd_loss(s, ids, tlp, y, reduction="none", backend="torch")
    # an unused slot (any negative id; its log-probability is not read) changes nothing
    ids_u = torch.cat([ids[..., :2], torch.full_like(ids[..., :1], -7), ids[..., 2:]], -1)
    tlp_u = torch.cat([tlp[..., :2], torch.full_like(tlp[..., :1], math.nan), tlp[..., 2:]], -1)
    assert torch.equal(sk.topk_opd_loss(s, ids_u, tlp_u, y, reduction="none", backend="torch"),
                       base)
    # lp_T(y) for a y outside the top-k: as if y were one more id
    y[0, 0] = ids[0, 0, 1]  # (position (0, 0): y among the ids, where lp_T(y) is not used)
    in_e = (ids == y.unsqueeze(-1)).any(-1)
    got = sk.topk_opd_loss(s, ids, tlp, y, teacher_token_logprobs=ttl, reduction="none",
                           backend="torch")
    ids_y = torch.cat([ids, torch.where(in_e, -1, y).unsqueeze(-1)], -1)
    tlp_y = torch.cat([tlp, ttl.unsqueeze(-1)], -1)
    assert torch.equal(got, sk.topk_opd_loss(s, ids_y, tlp_y, y, reduction="none",
                                             backend="torch"))
    assert in_e[0, 0] and not torch.equal(got, base)


def test_tail_floor():
    """A teacher whose top-k holds all its mass: its tail is tail_floor; with 0 the tail is
    outside the teacher's support, and reverse KL is +inf where the student has mass there."""
    vocab, k = 12, 5
    gen = torch.Generator().manual_seed(6)
    s = torch.randn(3, vocab, generator=gen, dtype=torch.float64)
    t = torch.randn(3, vocab, generator=gen, dtype=torch.float64)
    t[:, k:] = -math.inf  # the teacher's support is its top-k
    lp_t = torch.log_softmax(t, -1)
    ids = torch.arange(k).expand(3, k)
    y = torch.tensor([0, 7, 2])
    for floor in (1e-7, 0.3):
        loss = sk.topk_opd_loss(s, ids, lp_t[:, :k], y, tail_floor=floor, reduction="none",
                                backend="torch").double()
        lp_s = torch.log_softmax(s, -1)
        p_s = torch.cat([lp_s[:, :k], torch.logsumexp(lp_s[:, k:], -1, keepdim=True)], -1)
        log_q = torch.log_softmax(torch.cat([lp_t[:, :k], torch.full((3, 1), math.log(floor),
                                                                     dtype=torch.float64)], -1),
                                  -1)
        assert_close(loss, (p_s.exp() * (p_s - log_q)).sum(-1), rtol=1e-6, atol=1e-7,
                     what=f"floor {floor}")
    rkl = sk.topk_opd_loss(s, ids, lp_t[:, :k], y, tail_floor=0.0, reduction="none",
                           backend="torch")
    assert (rkl == math.inf).all()
    fkl = sk.topk_opd_loss(s, ids, lp_t[:, :k], y, tail_floor=0.0, divergence="forward_kl",
                           reduction="none", backend="torch")
    assert torch.isfinite(fkl).all()


@pytest.mark.skipif(trl_tail_bucket() is None,
                    reason="trl (with experimental.server_distillation) is not installed")
@pytest.mark.filterwarnings("ignore:You are importing from 'trl.experimental'")
@pytest.mark.parametrize("trl_beta,divergence", [(0.0, "forward_kl"), (1.0, "reverse_kl"),
                                                 (0.3, "jsd"), (0.8, "jsd")])
def test_matches_trl_tail_bucket_losses(trl_beta, divergence):
    """TRL's server-distillation losses append a tail bucket (1 - sum of the top-k, clamped
    at 1e-7) to both models' top-k log-probabilities and take its generalized JSD. At beta = 0
    with no gate, away from that clamp, they are this loss."""
    add_tail, jsd = trl_tail_bucket()
    s, _, ids, tlp, y, _ = _inputs(shape=(3, 5), vocab=60, k=8, seed=7)
    lp_s = torch.log_softmax(s, -1)
    valid = torch.ones_like(ids, dtype=torch.bool)
    s_sparse, mask = add_tail(lp_s.gather(-1, ids), valid)
    t_sparse, _ = add_tail(tlp, valid)
    assert (s_sparse[..., -1].exp() > 1e-3).all() and (t_sparse[..., -1].exp() > 1e-3).all()
    want = jsd(s_sparse, t_sparse, trl_beta, mask).sum(-1)
    got = sk.topk_opd_loss(s, ids, tlp, y, divergence=divergence,
                           jsd_beta=trl_beta if divergence == "jsd" else 0.5, reduction="none",
                           backend="torch")
    assert_close(got, want, rtol=1e-6, atol=1e-7, what=f"TRL beta {trl_beta}")


def test_student_tail_is_exact_when_the_top_k_holds_nearly_all_mass():
    """The student's tail is a sum over the tokens outside (1 - sum would cancel): with the
    top-k holding all but 1e-6 (and 1e-9) of the student's mass, float32 keeps its precision."""
    vocab, k = 500, 6
    gen = torch.Generator().manual_seed(8)
    for tail in (1e-6, 1e-9):
        s = 0.5 * torch.randn(4, vocab, generator=gen, dtype=torch.float64)
        ids = torch.stack([torch.randperm(vocab, generator=gen)[:k] for _ in range(4)])
        inside = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, ids, True)
        s = torch.where(inside, s + 8.0, s)
        held = torch.logsumexp(s.masked_fill(~inside, -math.inf), -1, keepdim=True)
        rest = torch.logsumexp(s.masked_fill(inside, -math.inf), -1, keepdim=True)
        s = torch.where(inside, s, s + held - rest + math.log(tail / (1 - tail)))
        lp_s = torch.log_softmax(s, -1)
        assert torch.allclose(lp_s.masked_fill(inside, -math.inf).logsumexp(-1).exp(),
                              torch.full((4,), tail, dtype=torch.float64), rtol=1e-6)
        opts = row_options()
        present, own, _ = reference.topk_membership(ids, torch.zeros(4, dtype=torch.long), False,
                                                    opts.ignore_index)
        lp32 = torch.log_softmax(s.float(), -1)
        cats = reference.topk_student_categories(lp32, ids, torch.zeros(4, dtype=torch.long),
                                                 present, own)
        exact = lp_s.masked_fill(inside, -math.inf).logsumexp(-1)
        assert float((cats[:, -1].double() - exact).abs().max()) < 1e-5
        one_minus_sum = torch.log1p(-lp32.gather(-1, ids).exp().sum(-1)).double()
        assert not float((one_minus_sum - exact).abs().max()) < 1e-2  # what it avoids


# --------------------------------------------------------------------------- misuse

def _args():
    s, _, ids, tlp, y, ttl = _inputs(dtype=torch.float32)
    return dict(student_logits=s, teacher_topk_ids=ids, teacher_topk_logprobs=tlp.float(),
                tokens=y)


BAD_CALLS = [
    (dict(teacher_topk_ids=torch.zeros(2, 3, 5)), TypeError, "teacher_topk_ids"),
    (dict(teacher_topk_ids=torch.zeros(2, 3, 5, dtype=torch.bool)), TypeError,
     "teacher_topk_ids"),
    (dict(teacher_topk_ids=[[0]]), TypeError, "teacher_topk_ids"),
    (dict(teacher_topk_ids=torch.zeros(2, 3, dtype=torch.long)), ValueError, "teacher_topk_ids"),
    (dict(teacher_topk_ids=torch.zeros(2, 4, 5, dtype=torch.long)), ValueError,
     "teacher_topk_ids"),
    (dict(teacher_topk_ids=torch.zeros(2, 3, 0, dtype=torch.long),
          teacher_topk_logprobs=torch.zeros(2, 3, 0)), ValueError, "teacher_topk_ids"),
    (dict(teacher_topk_logprobs=torch.zeros(2, 3, 4)), ValueError, "teacher_topk_logprobs"),
    (dict(teacher_topk_logprobs=torch.zeros(2, 3, 5, dtype=torch.long)), TypeError,
     "teacher_topk_logprobs"),
    (dict(teacher_token_logprobs=torch.zeros(2, 4)), ValueError, "teacher_token_logprobs"),
    (dict(teacher_token_logprobs=torch.zeros(2, 3, dtype=torch.long)), TypeError,
     "teacher_token_logprobs"),
    (dict(teacher_topk_ids=torch.zeros(2, 3, 5, dtype=torch.long, device="meta")), ValueError,
     "teacher_topk_ids"),
    (dict(tail_floor=1.0), ValueError, "tail_floor"),
    (dict(tail_floor=-1e-9), ValueError, "tail_floor"),
    (dict(tail_floor=float("nan")), ValueError, "tail_floor"),
    (dict(tail_floor="0"), TypeError, "tail_floor"),
    (dict(divergence="jsd", jsd_beta=0.0), ValueError, "jsd_beta"),
    (dict(divergence="jsd", jsd_beta=1.0), ValueError, "jsd_beta"),
    (dict(teacher_temperature=1.0), ValueError, "teacher_temperature"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(tokens=torch.zeros(2, 4, dtype=torch.long)), ValueError, "tokens"),
    (dict(student_logits=torch.zeros(2, 3, 40, dtype=torch.int32)), TypeError,
     "student_logits"),
    (dict(backend="cuda"), RuntimeError, "cuda"),
]


@pytest.mark.parametrize("change,exc,text", BAD_CALLS)
def test_misuse_raises_naming_the_argument(change, exc, text):
    args = _args()
    args.update(change)
    with pytest.raises(exc, match=text):
        sk.topk_opd_loss(**args)


def test_bad_ids_raise_on_the_torch_path_but_not_in_masked_rows():
    args = _args()
    ids = args["teacher_topk_ids"]
    ids[0, 1, 3] = 40  # = V
    with pytest.raises(ValueError, match="teacher_topk_ids: id 40 is outside"):
        sk.topk_opd_loss(**args, backend="torch")
    args["tokens"][0, 1] = -100  # a masked position is not read
    sk.topk_opd_loss(**args, backend="torch")
    ids[1, 2, 4] = ids[1, 2, 0]
    with pytest.raises(ValueError, match="appears twice"):
        sk.topk_opd_loss(**args, backend="torch")


def test_num_items_in_batch_weights_and_module_free_reductions():
    s, _, ids, tlp, y, ttl = _inputs(shape=(4, 3))
    y[0, 0] = -100
    w = torch.rand(4, 3, generator=torch.Generator().manual_seed(9))
    v = torch.tensor([True, False, True, False])
    total = sk.topk_opd_loss(s, ids, tlp, y, v, weights=w, reduction="sum", backend="torch")
    mean = sk.topk_opd_loss(s, ids, tlp, y, v, weights=w, backend="torch")
    assert_close(mean, total / 11, rtol=1e-6, atol=0, what="mean")
    parts = sum(sk.topk_opd_loss(s[a:a + 2], ids[a:a + 2], tlp[a:a + 2], y[a:a + 2], v[a:a + 2],
                                 weights=w[a:a + 2], num_items_in_batch=torch.tensor(11),
                                 backend="torch") for a in (0, 2))
    assert_close(parts, mean, rtol=1e-6, atol=0, what="num_items_in_batch")


# --------------------------------------------------------------------------- fused linear

B, T, H = 2, 5, 16


def _linear_inputs(dtype=torch.float64, device="cpu", k=4, vocab=37):
    gen = torch.Generator().manual_seed(10)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(device)
    hs, ws, bs = r(B, T, H).requires_grad_(), r(vocab, H, scale=0.7).requires_grad_(), \
        r(vocab).requires_grad_()
    lp_t = torch.log_softmax(r(B, T, vocab, scale=2.0), -1)
    ids = lp_t.topk(k, -1).indices
    tlp = lp_t.gather(-1, ids)
    ids[0, 2, 1] = -1
    tok = torch.randint(0, vocab, (B, T), generator=gen).to(device)
    ttl = lp_t.gather(-1, tok.unsqueeze(-1))[..., 0]
    tok[1, 3] = -100
    return hs, ws, bs, ids, tlp, tok, ttl


@pytest.mark.parametrize("opts,reduction,chunk", [
    (dict(), "mean", None), (dict(divergence="forward_kl", beta=0.3, verifier=True), "sum", 3),
    (dict(divergence="jsd", token_lp=True, temperature=0.7, verifier=True), "none", 1),
    (dict(divergence="reverse_kl", token_lp=True, student_softcap=5.0, student_logit_scale=0.5),
     "mean", 4)])
def test_fused_linear_matches_the_materialized_logits(opts, reduction, chunk):
    hs, ws, bs, ids, tlp, tok, ttl = _linear_inputs()
    opts = dict(opts)
    ver = torch.tensor([True, False]) if opts.pop("verifier", False) else None
    ttl = ttl if opts.pop("token_lp", False) else None
    scale, cap = opts.pop("student_logit_scale", 1.0), opts.pop("student_softcap", None)
    kw = dict(opts, reduction=reduction, return_stats=True, backend="torch",
              teacher_token_logprobs=ttl)
    loss, stats = sk.fused_linear_topk_opd_loss(hs, ws, ids, tlp, tok, ver, student_bias=bs,
                                                chunk_size=chunk, student_logit_scale=scale,
                                                student_softcap=cap, **kw)
    z = (hs @ ws.T + bs) * scale
    if cap is not None:
        z = cap * torch.tanh(z / cap)
    ref, ref_stats = sk.topk_opd_loss(z, ids, tlp, tok, ver, **kw)
    torch.testing.assert_close(loss, ref, rtol=0, atol=0)
    for a, b in zip(stats, ref_stats):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    gout = torch.randn(loss.shape, generator=torch.Generator().manual_seed(11))
    for g, w in zip(torch.autograd.grad(loss, (hs, ws, bs), gout),
                    torch.autograd.grad(ref, (hs, ws, bs), gout)):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_fused_linear_misuse():
    hs, ws, bs, ids, tlp, tok, _ = _linear_inputs()
    with pytest.raises(ValueError, match="teacher_topk_ids"):
        sk.fused_linear_topk_opd_loss(hs, ws, ids[:, :3], tlp, tok)
    with pytest.raises(ValueError, match="teacher_temperature"):
        sk.fused_linear_topk_opd_loss(hs, ws, ids, tlp, tok, teacher_temperature=2.0)
    with pytest.raises(NotImplementedError, match="process_group"):
        sk.fused_linear_topk_opd_loss(hs, ws, ids, tlp, tok, process_group=object())


@needs_triton
@pytest.mark.parametrize("reduction,divergence", [("mean", "reverse_kl"), ("none", "jsd")])
def test_fused_linear_triton_matches_torch(reduction, divergence):
    hs, ws, bs, ids, tlp, tok, ttl = _linear_inputs(dtype=torch.float32, device=TRITON_DEVICE)
    kw = dict(beta=0.2, divergence=divergence, reduction=reduction, chunk_size=4,
              teacher_token_logprobs=ttl)
    out = {}
    for backend in ("triton", "torch"):
        loss = sk.fused_linear_topk_opd_loss(hs, ws, ids, tlp, tok, student_bias=bs,
                                             backend=backend, **kw)
        out[backend] = (loss,) + torch.autograd.grad(loss.sum(), (hs, ws, bs))
    for a, b in zip(out["triton"], out["torch"]):
        assert_close(a, b, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- vocabulary parallel

V_LOCAL = 9
PARALLEL_CASES = [
    dict(),
    dict(divergence="forward_kl", beta=0.3, temperature=0.8, verifier=True, token_lp=True),
    dict(divergence="jsd", jsd_beta=0.3, verifier=True, reduction="none", return_stats=True),
    dict(token_lp=True, masked=True, reduction="sum", return_stats=True, tail_floor=0.0,
         divergence="forward_kl"),
]


def _parallel_worker(rank, world, path, backend):
    tol = dict(rtol=1e-10, atol=1e-12) if backend == "torch" else dict(rtol=2e-4, atol=2e-6)
    dtype = torch.float64 if backend == "torch" else torch.float32
    try:
        dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank,
                                world_size=world)
        group = dist.group.WORLD
        lo, hi = rank * V_LOCAL, (rank + 1) * V_LOCAL
        for seed, case in enumerate(PARALLEL_CASES):
            case = dict(case)
            s, _, ids, tlp, y, ttl = _inputs(shape=(2, 4), vocab=V_LOCAL * world, k=6, seed=seed,
                                             dtype=dtype)
            ids[0, 1, 2] = -1
            y[1, 2] = -100
            if case.pop("masked", False):  # a student row masked on every shard but one column
                s[0, 0] = -math.inf
                s[0, 0, 3] = 1.0
            ver = torch.tensor([True, False]) if case.pop("verifier", False) else None
            token_lp = case.pop("token_lp", False)
            kw = dict(case, teacher_token_logprobs=ttl if token_lp else None)
            s_full = s.clone().requires_grad_()
            ref = sk.topk_opd_loss(s_full, ids, tlp, y, ver, backend="torch", **kw)
            s_shard = s[..., lo:hi].clone().requires_grad_()
            got = sk.topk_opd_loss(s_shard, ids, tlp, y, ver, process_group=group,
                                   backend=backend, **kw)
            if isinstance(ref, tuple):
                for a, b in zip(got[1], ref[1]):
                    torch.testing.assert_close(a, b, **tol)
                ref, got = ref[0], got[0]
            torch.testing.assert_close(got, ref, **tol)
            gout = torch.ones_like(ref) if ref.dim() else None
            (g_full,) = torch.autograd.grad(ref, s_full, gout)
            (g_shard,) = torch.autograd.grad(got, s_shard, gout)
            torch.testing.assert_close(g_shard, g_full[..., lo:hi], **tol)
        s, _, ids, tlp, y, _ = _inputs(shape=(2, 4), vocab=V_LOCAL * world, k=6, dtype=dtype)
        ids[0, 0, 0] = V_LOCAL * world  # an id beyond the global vocabulary
        if backend == "torch":
            try:
                sk.topk_opd_loss(s[..., lo:hi], ids, tlp, y, process_group=group, backend=backend)
            except ValueError as e:
                assert "teacher_topk_ids" in str(e)
            else:
                raise AssertionError("an out-of-range id did not raise")
        else:  # nothing read on the host: that row is NaN, the others are not
            loss = sk.topk_opd_loss(s[..., lo:hi], ids, tlp, y, process_group=group,
                                    backend=backend, reduction="none")
            assert torch.isnan(loss[0, 0]) and not torch.isnan(loss.view(-1)[1:]).any()
            # shards of unequal widths: every row
            loss = sk.topk_opd_loss(s[..., lo:hi - (rank == 0)], torch.full_like(ids, -1), tlp,
                                    torch.zeros_like(y), process_group=group, backend=backend,
                                    reduction="none")
            assert torch.isnan(loss).all()
    except Exception:
        traceback.print_exc()
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize("world,backend", [
    (2, "torch"), (3, "torch"), pytest.param(2, "triton", marks=needs_triton),
    pytest.param(3, "triton", marks=needs_triton)])
def test_vocab_parallel_matches_single_process(world, backend):
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_parallel_worker, args=(world, os.path.join(d, "rendezvous"), backend),
                 nprocs=world, join=True)


def test_resolve_backend_knows_the_family():
    from sgopd_kernels import compiled

    cpu = "cpu" if compiled.available("cpu") else "torch"  # the compiled CPU kernels, if built
    assert sk.resolve_backend("auto", torch.zeros(1), family="topk", divergence="jsd") == cpu
    assert sk.resolve_backend("auto", torch.zeros(1), family="topk", parallel=True) == "torch"
    assert sk.resolve_backend("auto", torch.zeros(1, dtype=torch.float64),
                              family="topk") == "torch"
    assert sk.resolve_backend("torch", torch.zeros(1), family="topk", parallel=True) == "torch"
    with pytest.raises(NotImplementedError, match="process_group"):
        sk.resolve_backend("cpu", torch.zeros(1), family="topk", parallel=True)


@needs_triton
def test_float64_teacher_logprobs_do_not_choose_the_backend():
    """The student's dtype chooses the backend: a float64 teacher side (O(rows k)) beside
    bfloat16 logits runs the kernels (it named the wrong argument before), and gives what
    float32 teacher log-probabilities give."""
    s, _, ids, tlp, tokens, _ = _inputs(dtype=torch.float32)
    s, ids, tokens = (x.to(TRITON_DEVICE) for x in (s.to(torch.bfloat16), ids, tokens))
    got = sk.topk_opd_loss(s, ids, tlp.double().to(TRITON_DEVICE), tokens, backend="triton")
    want = sk.topk_opd_loss(s, ids, tlp.to(TRITON_DEVICE), tokens, backend="triton")
    assert got.dtype == torch.float32 and torch.equal(got, want)
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(6, 8, generator=gen).to(torch.bfloat16).to(TRITON_DEVICE)
    w = torch.randn(40, 8, generator=gen).to(torch.bfloat16).to(TRITON_DEVICE)
    flat = (ids.reshape(6, -1), tlp.reshape(6, -1).to(TRITON_DEVICE), tokens.reshape(6))
    got = sk.fused_linear_topk_opd_loss(h, w, flat[0], flat[1].double(), flat[2],
                                        backend="triton")
    want = sk.fused_linear_topk_opd_loss(h, w, *flat, backend="triton")
    assert got.dtype == torch.float32 and torch.equal(got, want)


def test_the_readme_engine_example_runs_and_gives_a_finite_loss():
    """The README's code for a teacher behind vLLM or SGLang, run as written."""
    text = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    section = text.split("## A teacher behind vLLM or SGLang", 1)[1]
    code = section.split("```python", 1)[1].split("```", 1)[0]
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert torch.isfinite(scope["loss"]) and scope["student_logits"].grad is not None
    assert scope["ids"].tolist() == [[11, 7], [5, 2], [3, 8]]
    assert scope["token_logprobs"].tolist() == pytest.approx([-0.1, -4.0, -0.05])


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_forward_kl_toward_a_tail_of_e_minus_ten_thousand(backend):
    """A student tail of e^-14000 (a logit of -1e4 outside the categories): the tail's
    coefficient Q_tail / P_S(tail) lies beyond float64's range, its product with p_S does not;
    it is formed in the log domain (the oracle's autograd gets -Q_tail there). (The Triton
    kernels, float32 throughout, hold this to float32's digits of z / tau, 1e-3 here; their
    own test goes to a tail of 1e-52.)"""
    if not sk.resolve_backend("auto", torch.zeros(1)) == "cpu" and backend == "cpu":
        pytest.skip("the compiled CPU kernels are not built")
    dev = "cpu"
    s = torch.tensor([[3.3, -1e4], [-2.0, -1e4]])
    ids = torch.tensor([[-1, -1], [0, -1]])
    tlp = torch.tensor([[0.0, 0.0], [-0.5, 0.0]])
    y, ttl = torch.tensor([0, 0]), torch.tensor([-6.97, -0.5])
    kw = dict(divergence="forward_kl", temperature=0.7, reduction="sum", tail_floor=1e-3)
    x = s.to(dev).requires_grad_(True)
    loss = sk.topk_opd_loss(x, ids.to(dev), tlp.to(dev), y.to(dev),
                            teacher_token_logprobs=ttl.to(dev), backend=backend, **kw)
    (g,) = torch.autograd.grad(loss, x)
    loss, g = loss.cpu(), g.cpu()
    want, _, g_want = oracle_topk(s, ids, tlp, ttl, y, **kw)
    assert torch.isfinite(want) and float(g_want[:, 1].abs().min()) > 0.1
    assert_close(loss.double(), want, rtol=1e-6, atol=0)
    assert_close(g.double(), g_want, rtol=1e-5, atol=1e-7)
