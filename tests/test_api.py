"""The public API: validation, broadcasting, backend choice, module, torch.compile."""

import warnings

import pytest
import torch

import sgopd_kernels as sk
from conftest import HAS_CUDA, TRITON_DEVICE, TRITON_RUNS, needs_cuda, needs_triton
from helpers import assert_close, oracle_opd


def _inputs(shape=(2, 3), vocab=11, vocab_t=None, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(*shape, vocab, generator=gen).to(dtype)
    t = torch.randn(*shape, vocab_t or vocab, generator=gen).to(dtype)
    y = torch.randint(0, vocab, shape, generator=gen)
    return s, t, y


def test_public_names():
    assert set(sk.__all__) >= {"gated_opd_loss", "sampled_opd_loss", "GatedOPDLoss", "OPDStats",
                               "resolve_backend", "fused_linear_gated_opd_loss", "__version__"}
    assert sk.OPDStats._fields == ("consistent_frac", "conflict_frac", "mean_delta",
                                   "teacher_kl", "student_entropy", "divergence")


# --------------------------------------------------------------------------- validation

BAD_CALLS = [
    # (what to change, exception, text the message must contain)
    (dict(student_logits=torch.zeros(2, 3, 11, dtype=torch.int64)), TypeError, "student_logits"),
    (dict(student_logits=torch.zeros(2, 3, 11, dtype=torch.complex64)), TypeError,
     "student_logits"),
    (dict(student_logits=[[0.0]]), TypeError, "student_logits"),
    (dict(teacher_logits=torch.zeros(2, 3, 11, dtype=torch.int32)), TypeError, "teacher_logits"),
    (dict(teacher_logits=torch.zeros(2, 4, 11)), ValueError, "teacher_logits"),
    (dict(teacher_logits=torch.zeros(2, 3, 10)), ValueError, "V_T"),
    (dict(tokens=torch.zeros(2, 4, dtype=torch.long)), ValueError, "tokens"),
    (dict(tokens=torch.zeros(2, 3)), TypeError, "tokens"),
    (dict(verifier=torch.ones(5, dtype=torch.bool)), ValueError, "verifier"),
    (dict(verifier=torch.ones(2, dtype=torch.int64)), TypeError, "verifier"),
    (dict(verifier=[True, False]), TypeError, "verifier"),
    (dict(weights=torch.ones(3, 2)), ValueError, "weights"),
    (dict(weights=torch.ones(2, 3, dtype=torch.long)), TypeError, "weights"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(temperature=-1.0), ValueError, "temperature"),
    (dict(temperature=float("nan")), ValueError, "temperature"),
    (dict(temperature=float("inf")), ValueError, "temperature"),
    (dict(temperature="1"), TypeError, "temperature"),
    (dict(beta=-0.1), ValueError, "beta"),
    (dict(beta=torch.tensor(0.1)), TypeError, "beta"),
    (dict(extrapolation=0.0), ValueError, "extrapolation"),
    (dict(interpolation=-1.0), ValueError, "interpolation"),
    (dict(divergence="js"), ValueError, "divergence"),
    (dict(divergence="jsd", jsd_beta=0.0), ValueError, "jsd_beta"),
    (dict(divergence="jsd", jsd_beta=1.0), ValueError, "jsd_beta"),
    (dict(jsd_beta=1.5), ValueError, "jsd_beta"),
    (dict(teacher_temperature=0.0), ValueError, "teacher_temperature"),
    (dict(teacher_temperature=float("inf")), ValueError, "teacher_temperature"),
    (dict(num_items_in_batch=-3.0), ValueError, "num_items_in_batch"),
    (dict(num_items_in_batch=torch.ones(2)), ValueError, "num_items_in_batch"),
    (dict(num_items_in_batch=torch.tensor(True)), TypeError, "num_items_in_batch"),
    (dict(num_items_in_batch=8, reduction="sum"), ValueError, "num_items_in_batch"),
    (dict(reduction="avg"), ValueError, "reduction"),
    (dict(backend="jax"), ValueError, "backend"),
    (dict(backend="cuda"), RuntimeError, "cuda"),
    (dict(ignore_index=1.5), TypeError, "ignore_index"),
    (dict(return_stats=1), TypeError, "return_stats"),
    (dict(process_group=object()), RuntimeError, "process_group"),
    (dict(teacher_logits=torch.zeros(2, 3, 11, device="meta")), ValueError, "teacher_logits"),
    (dict(tokens=torch.zeros(2, 3, dtype=torch.long, device="meta")), ValueError, "tokens"),
    (dict(weights=torch.ones(2, 3, device="meta")), ValueError, "weights"),
]


@pytest.mark.parametrize("change,exc,text", BAD_CALLS)
def test_gated_misuse_raises_naming_the_argument(change, exc, text):
    s, t, y = _inputs()
    args = dict(student_logits=s, teacher_logits=t, tokens=y)
    args.update(change)
    with pytest.raises(exc, match=text):
        sk.gated_opd_loss(**args)


@pytest.mark.parametrize("change,exc,text", [
    (dict(teacher_logprobs=torch.zeros(2, 4)), ValueError, "teacher_logprobs"),
    (dict(teacher_logprobs=torch.zeros(2, 3, dtype=torch.long)), TypeError, "teacher_logprobs"),
    (dict(tokens=torch.zeros(3, dtype=torch.long)), ValueError, "tokens"),
    (dict(extrapolation=-2.0), ValueError, "extrapolation"),
    (dict(student_logits=torch.zeros(2, 3, 11, dtype=torch.int8)), TypeError, "student_logits"),
])
def test_sampled_misuse_raises_naming_the_argument(change, exc, text):
    s, _, y = _inputs()
    args = dict(student_logits=s, teacher_logprobs=torch.zeros(2, 3), tokens=y)
    args.update(change)
    with pytest.raises(exc, match=text):
        sk.sampled_opd_loss(**args)


def test_triton_backend_rejects_float64_before_running():
    if not TRITON_RUNS:
        pytest.skip("triton does not run here")
    s, t, y = _inputs(dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        sk.gated_opd_loss(s.to(TRITON_DEVICE), t.to(TRITON_DEVICE), y.to(TRITON_DEVICE),
                          backend="triton")


def test_float_rewards_warn_and_bool_verdicts_do_not():
    s, t, y = _inputs()
    with pytest.warns(UserWarning, match="verifier"):
        sk.gated_opd_loss(s, t, y, torch.tensor([1.0, 0.0]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sk.gated_opd_loss(s, t, y, torch.tensor([True, False]))
        sk.gated_opd_loss(s, t, y, torch.tensor([0.5, -1.5]))


def test_module_validates_at_construction():
    with pytest.raises(TypeError, match="unknown"):
        sk.GatedOPDLoss(temprature=1.0)
    with pytest.raises(ValueError, match="divergence"):
        sk.GatedOPDLoss(divergence="tv")
    with pytest.raises(ValueError, match="beta"):
        sk.GatedOPDLoss(beta=-1)
    with pytest.raises(TypeError, match="ignore_index"):
        sk.GatedOPDLoss(ignore_index=2.5)
    with pytest.raises(TypeError, match="return_stats"):
        sk.GatedOPDLoss(return_stats="yes")
    mod = sk.GatedOPDLoss(beta=0.2, reduction="sum")
    assert "beta=0.2" in repr(mod)
    s, t, y = _inputs()
    assert torch.equal(mod(s, t, y), sk.gated_opd_loss(s, t, y, beta=0.2, reduction="sum"))


# --------------------------------------------------------------------------- backends

def test_resolve_backend(monkeypatch):
    from sgopd_kernels import compiled

    cpu = "cpu" if compiled.available("cpu") else "torch"  # the compiled kernels, when built
    assert sk.resolve_backend("auto", torch.zeros(1)) == cpu
    assert sk.resolve_backend("auto", "cpu") == cpu
    assert sk.resolve_backend("auto", "cpu", torch.float64) == "torch"
    assert sk.resolve_backend("torch", "cpu") == "torch"
    with pytest.raises(RuntimeError, match="backend='cuda' cannot run here"):
        sk.resolve_backend("cuda", "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        sk.resolve_backend("triton", "cpu")
    assert sk.resolve_backend("auto", "cpu", family="sampled", parallel=True) == "torch"
    with pytest.raises(ValueError, match="family"):
        sk.resolve_backend("auto", "cpu", family="topp")
    with pytest.raises(ValueError, match="divergence"):
        sk.resolve_backend("auto", "cpu", divergence="tv")
    with pytest.raises(NotImplementedError, match="process_group"):
        sk.resolve_backend("cuda", "cpu", family="sampled", parallel=True)
    with pytest.raises(TypeError, match="float64"):
        sk.resolve_backend("triton", "cpu", torch.float64)
    if HAS_CUDA:
        assert sk.resolve_backend("auto", "cuda") == (
            "cuda" if compiled.available("cuda") else "triton")
        assert sk.resolve_backend("auto", "cuda", family="topk") == "triton"
        assert sk.resolve_backend("auto", "cuda", torch.float64) == "torch"
        assert sk.resolve_backend("auto", "cuda", parallel=True) == "triton"
        assert sk.resolve_backend("auto", "cuda", family="sampled", parallel=True) == "torch"


def test_auto_on_cuda_tensors_as_if_every_backend_ran(monkeypatch):
    """The choice on CUDA tensors, with every backend made available: the compiled kernels for
    the logits and sampled losses, Triton first for the top-k one (whose O(k) row terms it forms
    in one kernel), then the compiled CUDA kernels."""
    from sgopd_kernels import _dispatch

    monkeypatch.setitem(_dispatch._UNAVAILABLE, "cuda", lambda device_type: None)
    monkeypatch.setitem(_dispatch._UNAVAILABLE, "triton", lambda device_type: None)
    assert sk.resolve_backend("auto", "cuda") == "cuda"
    assert sk.resolve_backend("auto", "cuda", family="sampled") == "cuda"
    assert sk.resolve_backend("auto", "cuda", family="topk") == "triton"
    assert sk.resolve_backend("cuda", "cuda", family="topk") == "cuda"
    assert sk.resolve_backend("auto", "cuda", family="topk", divergence="jsd") == "triton"
    monkeypatch.setitem(_dispatch._UNAVAILABLE, "triton", lambda device_type: "not here")
    assert sk.resolve_backend("auto", "cuda", family="topk") == "cuda"
    assert sk.resolve_backend("auto", "cuda", family="topk", parallel=True) == "torch"
    with pytest.raises(NotImplementedError, match="process_group"):
        sk.resolve_backend("cuda", "cuda", family="topk", parallel=True)


# --------------------------------------------------------------------------- semantics

def test_verifier_and_weights_broadcast_per_sequence():
    s, t, y = _inputs(shape=(2, 4))
    per_seq = torch.tensor([True, False])
    per_pos = per_seq[:, None].expand(2, 4)
    column = per_seq[:, None]
    a = sk.gated_opd_loss(s, t, y, per_seq, weights=torch.tensor([1.0, 3.0]), reduction="none")
    b = sk.gated_opd_loss(s, t, y, per_pos, weights=torch.tensor([[1.0], [3.0]]),
                          reduction="none")
    c = sk.gated_opd_loss(s, t, y, column, weights=torch.tensor([1.0, 3.0])[:, None].expand(2, 4),
                          reduction="none")
    assert torch.equal(a, b) and torch.equal(a, c)


def test_per_time_step_shapes_are_refused_not_guessed():
    # a (T,) tensor for (B, T) positions is neither per sequence nor per position: reading it
    # per time step (or per sequence when B == T) would be a guess
    s, t, y = _inputs(shape=(2, 3))
    with pytest.raises(ValueError, match="verifier"):
        sk.gated_opd_loss(s, t, y, torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="weights"):
        sk.gated_opd_loss(s, t, y, weights=torch.ones(3))
    with pytest.raises(ValueError, match="weights"):
        sk.gated_opd_loss(s, t, y, weights=torch.ones(2, 3, 1))
    # all the dimensions, size 1 where it broadcasts: accepted
    a = sk.gated_opd_loss(s, t, y, torch.tensor([[True, False, True]]), reduction="none")
    b = sk.gated_opd_loss(s, t, y, torch.tensor([[True, False, True]] * 2), reduction="none")
    assert torch.equal(a, b)
    # with B == T a (B,) tensor is per sequence, as always
    s, t, y = _inputs(shape=(3, 3))
    v = torch.tensor([True, False, True])
    a = sk.gated_opd_loss(s, t, y, v, reduction="none")
    b = sk.gated_opd_loss(s, t, y, v[:, None].expand(3, 3), reduction="none")
    assert torch.equal(a, b)


def test_tiny_float64_advantages_keep_their_sign():
    s, t, y = _inputs()
    tiny = torch.tensor([1e-50, -1e-50], dtype=torch.float64)
    _, st = sk.gated_opd_loss(s, t, y, tiny, return_stats=True)
    _, ref = sk.gated_opd_loss(s, t, y, tiny > 0, return_stats=True)
    assert st.consistent_frac + st.conflict_frac == 1.0
    assert torch.equal(torch.stack(list(st)), torch.stack(list(ref)))


def test_float64_weights_keep_float64_precision():
    s, t, y = _inputs(dtype=torch.float64)
    w = torch.tensor([1.0 + 3e-12, 0.7], dtype=torch.float64)
    x = s.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(sk.gated_opd_loss(x, t, y, weights=w, reduction="sum",
                                                 backend="torch"), x)
    rows = sk.gated_opd_loss(x, t, y, reduction="none", backend="torch")
    (g_rows,) = torch.autograd.grad(rows, x, w[:, None].expand(2, 3).float(), retain_graph=True)
    (want,) = torch.autograd.grad(rows, x, torch.ones_like(rows))
    want = want * w[:, None, None]
    assert g.dtype == torch.float64
    torch.testing.assert_close(g, want, rtol=1e-14, atol=0)
    # (a float32 copy of the weights would be off by about 1e-8 relative)
    assert (g_rows - want).abs().max() > 1e-12 * want.abs().max()


def test_dtypes_shapes_and_no_writes_to_inputs():
    s, t, y = _inputs(shape=(2, 3), dtype=torch.bfloat16)
    y[1, 2] = -100
    s0, t0 = s.clone(), t.clone()
    x = s.clone().requires_grad_(True)
    loss = sk.gated_opd_loss(x, t, y, reduction="none")
    assert loss.dtype == torch.float32 and loss.shape == y.shape and loss[1, 2] == 0
    loss.sum().backward()
    assert x.grad.dtype == torch.bfloat16 and x.grad.shape == s.shape
    assert torch.equal(x.detach(), s0) and torch.equal(t, t0)
    assert (x.grad[1, 2] == 0).all()


def test_teacher_gets_no_gradient():
    s, t, y = _inputs()
    t.requires_grad_(True)
    x = s.clone().requires_grad_(True)
    sk.gated_opd_loss(x, t, y).backward()
    assert t.grad is None and x.grad is not None


@needs_cuda
def test_no_host_sync_on_cuda():
    s, t, y = _inputs(shape=(4, 8), vocab=1000)
    s, t, y = s.cuda().requires_grad_(True), t.cuda(), y.cuda()
    v = torch.tensor([True, False, True, False], device="cuda")
    sk.gated_opd_loss(s, t, y, v).backward()  # warm up (compilation)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for fn, other in ((sk.gated_opd_loss, t), (sk.sampled_opd_loss, t[..., 0])):
            for count in (None, 29, torch.tensor(29, device="cuda"), torch.tensor(29)):
                loss, stats = fn(s, other, y, v, num_items_in_batch=count, return_stats=True)
                loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@needs_cuda
@pytest.mark.skipif(not torch.distributed.is_available() or
                    not torch.distributed.is_nccl_available(), reason="needs NCCL")
def test_no_host_sync_on_cuda_vocab_parallel(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0,
                            world_size=1)
    try:
        s, t, y = _inputs(shape=(4, 8), vocab=1000)
        s, t, y = s.cuda().requires_grad_(True), t.cuda(), y.cuda()
        v = torch.tensor([True, False, True, False], device="cuda")
        kw = dict(process_group=dist.group.WORLD, return_stats=True)
        sk.gated_opd_loss(s, t, y, v, **kw)[0].backward()  # warm up (compilation)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            loss, stats = sk.gated_opd_loss(s, t, y, v, **kw)
            loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    finally:
        dist.destroy_process_group()


def test_mean_counts_unmasked_positions_only():
    s, t, y = _inputs(shape=(3, 4))
    y[0] = -100
    per_row = sk.gated_opd_loss(s, t, y, reduction="none")
    mean = sk.gated_opd_loss(s, t, y)
    total = sk.gated_opd_loss(s, t, y, reduction="sum")
    assert_close(mean, per_row.sum() / 8, rtol=1e-6, atol=0)
    assert_close(total, per_row.sum(), rtol=1e-6, atol=0)
    want, _, _ = oracle_opd(s, t, y)
    assert_close(mean, want, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- defects a
# trainer integration found (each failed before)

def test_per_token_logprobs_as_teacher_logits_point_to_sampled_loss():
    s, t, y = _inputs(shape=(4, 16))
    with pytest.raises(ValueError, match="sampled_opd_loss") as e:
        sk.gated_opd_loss(s, t[..., 0], y)
    assert "V_T" in str(e.value) and "(4, 16)" in str(e.value)


def test_non_negative_float_rewards_warn():
    s, t, y = _inputs(shape=(4, 3))
    with pytest.warns(UserWarning, match="centring"):
        sk.gated_opd_loss(s, t, y, torch.tensor([0.2, 0.9, 0.4, 0.7]))
    with pytest.warns(UserWarning, match="0s and 1s"):
        sk.sampled_opd_loss(s, t[..., 0], y, torch.tensor([0.0, 1.0, 1.0, 0.0]))
    with warnings.catch_warnings():  # centred advantages, and constant tensors, read as meant
        warnings.simplefilter("error")
        sk.gated_opd_loss(s, t, y, torch.tensor([0.3, -0.2, 0.4, -0.5]))
        sk.gated_opd_loss(s, t, y, torch.ones(4))


def test_num_items_in_batch_gives_the_global_mean():
    """Gradient accumulation over two micro-batches, normalized by the global token count:
    the sum of the parts equals the mean over the whole batch (a local mean does not)."""
    s, t, y = _inputs(shape=(4, 5), vocab=13)
    y[0, :3] = -100
    y[3, 1] = -100
    v = torch.tensor([True, False, True, True])
    w = torch.rand(4, 5, generator=torch.Generator().manual_seed(3))
    x = s.clone().requires_grad_(True)
    whole = sk.gated_opd_loss(x, t, y, v, weights=w)
    (g_whole,) = torch.autograd.grad(whole, x)
    count = int((y != -100).sum())
    for n_items in (count, torch.tensor(count), torch.tensor(float(count))):
        x = s.clone().requires_grad_(True)
        parts = [sk.gated_opd_loss(x[a:a + 2], t[a:a + 2], y[a:a + 2], v[a:a + 2],
                                   weights=w[a:a + 2], num_items_in_batch=n_items)
                 for a in (0, 2)]
        (g,) = torch.autograd.grad(parts[0] + parts[1], x)
        assert_close(parts[0] + parts[1], whole, rtol=1e-6, atol=0, what="loss")
        assert_close(g, g_whole, rtol=1e-6, atol=1e-9, what="grad")
    local = sum(sk.gated_opd_loss(s[a:a + 2], t[a:a + 2], y[a:a + 2], v[a:a + 2],
                                  weights=w[a:a + 2]) for a in (0, 2))
    assert abs(float(local) - float(whole.detach())) > 1e-3  # a local mean is not the global one
    # a global count of 0 (nothing anywhere): 0, not NaN, as a number or a tensor
    y0 = torch.full_like(y, -100)
    for zero in (0, 0.0, torch.tensor(0)):
        assert float(sk.gated_opd_loss(s, t, y0, num_items_in_batch=zero)) == 0.0
    # the module and the sampled estimator take it too
    mod = sk.GatedOPDLoss()
    assert torch.equal(mod(s, t, y, v, weights=w, num_items_in_batch=count), whole)
    sam = sk.sampled_opd_loss(s, t[..., 0], y, v, num_items_in_batch=2 * count)
    assert_close(2 * sam, sk.sampled_opd_loss(s, t[..., 0], y, v), rtol=1e-6, atol=0)


def test_teacher_temperature_is_separate():
    s, t, y = _inputs(shape=(2, 3))
    a = sk.gated_opd_loss(s, t, y, temperature=0.7, teacher_temperature=1.3)
    b = sk.gated_opd_loss(s, t * (0.7 / 1.3), y, temperature=0.7)
    assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert torch.equal(sk.gated_opd_loss(s, t, y, temperature=0.7, teacher_temperature=0.7),
                       sk.gated_opd_loss(s, t, y, temperature=0.7))


def test_stored_gradient_path_equals_recompute(monkeypatch):
    """A backend that writes its gradient in forward (the compiled kernels) goes through
    api._StoredGradient: with the torch backend marked so, every reduction, grad_output != 1
    and evaluation give the recompute path's loss and gradient; a second backward raises."""
    from sgopd_kernels import _dispatch

    s, t, y = _inputs(shape=(3, 4), vocab=17, vocab_t=19)
    y[1, 2] = -100
    v = torch.tensor([1.0, -1.0, 0.0])
    w = torch.rand(3, 4, generator=torch.Generator().manual_seed(4))
    ref = {}
    for stores in (False, True):
        monkeypatch.setitem(_dispatch.BY_NAME, "torch", _dispatch.dataclasses.replace(
            _dispatch.BY_NAME["torch"], stores_grad=stores))
        out = []
        for reduction in ("mean", "sum", "none"):
            x = s.clone().requires_grad_(True)
            loss = sk.gated_opd_loss(x, t, y, v, beta=0.2, weights=w, reduction=reduction,
                                     divergence="forward_kl", backend="torch")
            gout = torch.linspace(0.5, 2.0, loss.numel()).reshape(loss.shape)
            (g,) = torch.autograd.grad(loss, x, gout)
            out += [loss.detach(), g]
        with torch.no_grad():
            out.append(sk.gated_opd_loss(s, t, y, v, backend="torch"))
        ref[stores] = out
        if stores:
            x = s.clone().requires_grad_(True)
            loss = sk.gated_opd_loss(x, t, y, v, backend="torch")
            loss.backward(retain_graph=True)
            with pytest.raises(RuntimeError, match="backward ran twice"):
                loss.backward()
    for a, b in zip(ref[False], ref[True]):
        assert_close(a, b, rtol=1e-6, atol=1e-9)


def _storing(monkeypatch, stores: bool):
    from sgopd_kernels import _dispatch

    monkeypatch.setitem(_dispatch.BY_NAME, "torch", _dispatch.dataclasses.replace(
        _dispatch.BY_NAME["torch"], stores_grad=stores))


def test_stored_gradient_compiles_fullgraph_and_float16_recomputes(monkeypatch):
    _storing(monkeypatch, True)
    s, t, y = _inputs(shape=(2, 5), vocab=13)

    def f(x):
        return sk.gated_opd_loss(x, t, y, beta=0.1, backend="torch") * 3.0
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    x1, x2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    f(x1).backward()
    compiled(x2).backward()
    assert torch.equal(x1.grad, x2.grad)
    # float16 under a loss scaler with a large global count: a gradient written at unit scale
    # would flush to 0; float16 recomputes with the incoming gradient instead
    gen = torch.Generator().manual_seed(0)
    s16 = torch.randn(4096, 64, generator=gen).half()
    t16 = torch.randn(4096, 64, generator=gen).half()
    y16 = torch.randint(0, 64, (4096,), generator=gen)
    grads = []
    for stores in (True, False):
        _storing(monkeypatch, stores)
        x = s16.clone().requires_grad_()
        loss = sk.gated_opd_loss(x, t16, y16, num_items_in_batch=2 ** 20, backend="torch")
        (g,) = torch.autograd.grad(loss * 65536, x)
        grads.append(g)
    assert torch.equal(grads[0], grads[1]) and (grads[0] != 0).float().mean() > 0.99


def test_dtype_errors_name_the_argument_that_brings_it():
    if not TRITON_RUNS:
        pytest.skip("triton does not run here")
    s, t, y = _inputs()
    with pytest.raises(TypeError, match="teacher_logits"):
        sk.gated_opd_loss(s.to(TRITON_DEVICE), t.double().to(TRITON_DEVICE),
                          y.to(TRITON_DEVICE), backend="triton")


def test_warnings_point_at_the_callers_line():
    s, t, y = _inputs(shape=(4, 3))
    v = torch.tensor([0.2, 0.9, 0.4, 0.7])
    for call in (lambda: sk.gated_opd_loss(s, t, y, v), lambda: sk.GatedOPDLoss()(s, t, y, v)):
        with pytest.warns(UserWarning, match="verifier") as record:
            call()
        assert record[0].filename == __file__


def test_no_double_backward():
    s, t, y = _inputs(dtype=torch.float64)
    x = s.clone().requires_grad_()
    (g,) = torch.autograd.grad(sk.gated_opd_loss(x, t, y), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad((g * torch.randn_like(g)).sum(), x)


def test_a_gradient_written_in_forward_refuses_create_graph():
    """A backend that writes the gradient in forward, and the fused-linear loss with "mean" or
    "sum", have no graph of their gradient: create_graph=True raises instead of giving a
    second derivative of zero."""
    from sgopd_kernels import compiled

    s, t, y = _inputs()
    if compiled.available("cpu"):
        x = s.clone().requires_grad_()
        with pytest.raises(RuntimeError, match="create_graph=True"):
            torch.autograd.grad(sk.gated_opd_loss(x, t, y, backend="cpu"), x, create_graph=True)
        (g,) = torch.autograd.grad(sk.gated_opd_loss(x, t, y, backend="cpu"), x)  # without it
        assert torch.isfinite(g).all()
    h = torch.randn(6, 8, requires_grad=True)
    w, wt = torch.randn(40, 8), torch.randn(40, 8)
    loss = sk.fused_linear_gated_opd_loss(h, w, torch.randn(6, 8), wt, y.reshape(-1)[:6])
    with pytest.raises(RuntimeError, match="create_graph=True"):
        torch.autograd.grad(loss, h, create_graph=True)


def test_compiled_cuda_needs_compute_capability_8(monkeypatch):
    """The module holds sm_90a, sm_80 and compute_80 PTX: an older GPU is not offered to
    "auto" (the Triton path takes it), a newer one JITs the PTX."""
    import types

    from sgopd_kernels import compiled

    fake = types.SimpleNamespace(has_cuda=True, cuda_device_count=lambda: 2)
    monkeypatch.setattr(compiled, "_C", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for caps, usable in (([(9, 0), (9, 0)], True), ([(8, 6), (12, 0)], True),
                         ([(9, 0), (7, 5)], False)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i, c=caps: c[i])
        monkeypatch.setattr(compiled, "_cuda_devices", None)
        assert compiled.available("cuda") is usable


def test_compiled_backend_not_built_raises(monkeypatch):
    from sgopd_kernels import compiled

    monkeypatch.setattr(compiled, "_C", None)
    s, t, y = _inputs()
    for name in ("cpu", "cuda"):
        with pytest.raises(RuntimeError, match="not built"):
            sk.gated_opd_loss(s, t, y, backend=name)
    assert sk.resolve_backend("auto", "cpu") == "torch"
