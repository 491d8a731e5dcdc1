"""fused_linear_gated_opd_loss equals gated_opd_loss on the materialized logits (docs/math.md)."""

import itertools

import pytest
import torch

import sgopd_kernels as sk
from sgopd_kernels import linear
from conftest import TRITON_DEVICE, needs_triton

B, T, H, H_T, V, V_T = 2, 5, 16, 12, 37, 41


def _inputs(dtype=torch.float64, bias=True, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(device)
    hs, ws = r(B, T, H).requires_grad_(), r(V, H, scale=0.7).requires_grad_()
    bs = r(V).requires_grad_() if bias else None
    ht, wt, bt = r(B, T, H_T), r(V_T, H_T, scale=0.7), (r(V_T) if bias else None)
    tok = torch.randint(0, V, (B, T), generator=gen).to(device)
    tok[0, 1] = -100
    return hs, ws, bs, ht, wt, bt, tok


def _materialized(hs, ws, bs, ht, wt, bt, tok, ver, **kw):
    zs = hs @ ws.T + (0 if bs is None else bs)
    zt = ht @ wt.T + (0 if bt is None else bt)
    return sk.gated_opd_loss(zs, zt, tok, ver, **kw)


def _leaves(hs, ws, bs):
    return [x for x in (hs, ws, bs) if x is not None]


OPTIONS = [
    dict(),
    dict(beta=0.3, divergence="forward_kl", temperature=0.7),
    dict(beta=0.1, verifier=True, extrapolation=2.0, interpolation=0.5),
    dict(divergence="forward_kl", verifier=True, weights=True),
]


@pytest.mark.parametrize("opts,reduction,chunk,bias", [
    (o, r, c, b) for (o, r), c, b in itertools.product(
        itertools.product(OPTIONS, ("mean", "sum", "none")), (None, 1, 3, 100), (True, False))
    if (c, b) in ((None, True), (3, True), (1, False), (100, False))])
def test_matches_materialized_float64(opts, reduction, chunk, bias):
    hs, ws, bs, ht, wt, bt, tok = _inputs(bias=bias)
    opts = dict(opts)
    ver = torch.tensor([True, False]) if opts.pop("verifier", False) else None
    if opts.pop("weights", False):
        opts["weights"] = torch.rand(B, T, dtype=torch.float64) + 0.5
    kw = dict(opts, reduction=reduction, return_stats=True, backend="torch")
    loss, stats = sk.fused_linear_gated_opd_loss(hs, ws, ht, wt, tok, ver, student_bias=bs,
                                                 teacher_bias=bt, chunk_size=chunk, **kw)
    ref, ref_stats = _materialized(hs, ws, bs, ht, wt, bt, tok, ver, **kw)
    assert loss.dtype == torch.float32 and loss.shape == ref.shape
    torch.testing.assert_close(loss, ref, rtol=0, atol=0)
    for a, b in zip(stats, ref_stats):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    gout = torch.randn(loss.shape, dtype=torch.float32)
    leaves = _leaves(hs, ws, bs)
    got = torch.autograd.grad(loss, leaves, gout)
    want = torch.autograd.grad(ref, leaves, gout)
    for g, w in zip(got, want):
        assert g.dtype == torch.float64
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


@needs_triton
@pytest.mark.parametrize("reduction,divergence", [("mean", "reverse_kl"), ("none", "forward_kl")])
def test_triton_matches_torch_backend(reduction, divergence):
    hs, ws, bs, ht, wt, bt, tok = _inputs(dtype=torch.float32, device=TRITON_DEVICE)
    ver = torch.tensor([True, False], device=TRITON_DEVICE)
    kw = dict(beta=0.2, divergence=divergence, reduction=reduction, chunk_size=4)
    out = {}
    for backend in ("triton", "torch"):
        loss = sk.fused_linear_gated_opd_loss(hs, ws, ht, wt, tok, ver, student_bias=bs,
                                              teacher_bias=bt, backend=backend, **kw)
        gout = torch.linspace(0.5, 1.5, loss.numel(), device=TRITON_DEVICE).reshape(loss.shape)
        out[backend] = (loss,) + torch.autograd.grad(loss, (hs, ws, bs), gout)
    for a, b in zip(out["triton"], out["torch"]):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)


def test_bfloat16_close_to_materialized():
    hs, ws, bs, ht, wt, bt, tok = _inputs(dtype=torch.bfloat16)
    loss = sk.fused_linear_gated_opd_loss(hs, ws, ht, wt, tok, student_bias=bs, teacher_bias=bt,
                                          chunk_size=3, backend="torch")
    ref = _materialized(hs, ws, bs, ht, wt, bt, tok, None, backend="torch")
    torch.testing.assert_close(loss, ref, rtol=1e-2, atol=1e-2)
    got = torch.autograd.grad(loss, (hs, ws, bs))
    want = torch.autograd.grad(ref, (hs, ws, bs))
    for g, w in zip(got, want):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g.float(), w.float(), rtol=2e-2, atol=2e-3)


def test_float16_under_a_loss_scaler():
    # a GradScaler multiplies the loss by 65536 at first: float16 gradients must come out as
    # the logits path gives them, not overflow (nor underflow at unit scale)
    gen = torch.Generator().manual_seed(0)
    n, h, v = 8192, 16, 64  # many rows: each row's unit-scale gradient is tiny
    hs = (0.3 * torch.randn(n, h, generator=gen)).half().requires_grad_()
    ws = (0.3 * torch.randn(v, h, generator=gen)).half().requires_grad_()
    ht = (0.3 * torch.randn(n, h, generator=gen)).half()
    wt = (0.3 * torch.randn(v, h, generator=gen)).half()
    tok = torch.randint(0, v, (n,), generator=gen)
    loss = sk.fused_linear_gated_opd_loss(hs, ws, ht, wt, tok, chunk_size=1000,
                                          backend="torch")
    got = torch.autograd.grad(loss * 65536, (hs, ws))
    ref = sk.gated_opd_loss(hs @ ws.T, ht @ wt.T, tok, backend="torch")
    want = torch.autograd.grad(ref * 65536, (hs, ws))
    for g, w in zip(got, want):
        assert g.dtype == torch.float16 and torch.isfinite(g).all()
        rel = (g.double() - w.double()).norm() / w.double().norm()
        assert rel < 2e-3, rel  # float16 rounding, not underflow


def test_stored_gradients_scaled_in_float32():
    # bfloat16 gradients stored in forward, scaled by an incoming gradient that bfloat16 cannot
    # hold exactly (1/3): one rounding of the product, not of the factor too
    hs, ws, bs, ht, wt, bt, tok = _inputs(dtype=torch.bfloat16)
    loss = sk.fused_linear_gated_opd_loss(hs, ws, ht, wt, tok, student_bias=bs, teacher_bias=bt,
                                          chunk_size=3, backend="torch")
    unit = [g.float() for g in torch.autograd.grad(loss, (hs, ws, bs))]
    loss = sk.fused_linear_gated_opd_loss(hs, ws, ht, wt, tok, student_bias=bs, teacher_bias=bt,
                                          chunk_size=3, backend="torch")
    third = torch.autograd.grad(loss / 3, (hs, ws, bs))
    for g, u in zip(third[:2], unit[:2]):
        torch.testing.assert_close(g, (u / 3).to(torch.bfloat16), rtol=0, atol=0)
    # (the bias gradient is summed in float32 and rounded once, after the scaling)
    torch.testing.assert_close(third[2].float(), unit[2] / 3, rtol=2 ** -7, atol=0)


def test_chunks_bound_the_logits(monkeypatch):
    seen = []
    real = linear.Head.logits

    def spy(head, h):
        seen.append(h.shape[0])
        return real(head, h)
    monkeypatch.setattr(linear.Head, "logits", spy)
    hs, ws, bs, ht, wt, bt, tok = _inputs()
    for reduction in ("mean", "none"):  # gradients in forward / recomputed in backward
        seen.clear()
        loss = sk.fused_linear_gated_opd_loss(hs, ws, ht, wt, tok, chunk_size=4,
                                              reduction=reduction, backend="torch")
        loss.sum().backward()
        n_products = 2 * 3 * (2 if reduction == "none" else 1)  # 10 rows in chunks of 4
        assert len(seen) == n_products and max(seen) == 4


def test_partial_and_no_gradients():
    hs, ws, bs, ht, wt, bt, tok = _inputs()
    ws.requires_grad_(False)
    bs.requires_grad_(False)
    loss = sk.fused_linear_gated_opd_loss(hs, ws, ht, wt, tok, student_bias=bs, backend="torch")
    (gh,) = torch.autograd.grad(loss, (hs,))
    ref = _materialized(hs, ws, bs, ht, wt, None, tok, None, backend="torch")
    torch.testing.assert_close(gh, torch.autograd.grad(ref, (hs,))[0], rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        plain = sk.fused_linear_gated_opd_loss(hs, ws, ht, wt, tok, student_bias=bs,
                                               backend="torch")
    assert not plain.requires_grad
    torch.testing.assert_close(plain, loss.detach(), rtol=0, atol=0)


def test_no_gradient_work_without_grad_mode(monkeypatch):
    calls = []
    real = linear._accumulate
    monkeypatch.setattr(linear, "_accumulate", lambda *a: calls.append(1) or real(*a))
    hs, ws, bs, ht, wt, bt, tok = _inputs()  # hidden, weight and bias require grad
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            loss = sk.fused_linear_gated_opd_loss(hs, ws, ht, wt, tok, student_bias=bs,
                                                  chunk_size=3, backend="torch")
        assert not loss.requires_grad
    assert calls == []
    loss = sk.fused_linear_gated_opd_loss(hs, ws, ht, wt, tok, student_bias=bs, chunk_size=3,
                                          backend="torch")
    assert len(calls) == 4  # 10 rows in chunks of 3: the gradients are formed in forward


def test_second_backward_through_stored_gradients_raises():
    hs, ws, bs, ht, wt, bt, tok = _inputs()
    loss = sk.fused_linear_gated_opd_loss(hs, ws, ht, wt, tok, backend="torch")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_all_rows_masked_and_no_rows():
    hs, ws, bs, ht, wt, bt, tok = _inputs()
    tok = torch.full_like(tok, -100)
    loss = sk.fused_linear_gated_opd_loss(hs, ws, ht, wt, tok, backend="torch")
    assert loss.item() == 0.0
    for g in torch.autograd.grad(loss, (hs, ws)):
        assert torch.count_nonzero(g) == 0
    empty = sk.fused_linear_gated_opd_loss(hs[:, :0], ws, ht[:, :0], wt, tok[:, :0],
                                           backend="torch")
    assert empty.item() == 0.0


BAD = [
    (dict(student_weight=torch.zeros(V, H + 1, dtype=torch.float64)), ValueError,
     "student_weight"),
    (dict(student_weight=torch.zeros(V, H, dtype=torch.int64)), TypeError, "student_weight"),
    (dict(student_bias=torch.zeros(V + 1, dtype=torch.float64)), ValueError, "student_bias"),
    (dict(student_bias=torch.zeros(V, dtype=torch.int64)), TypeError, "student_bias"),
    (dict(student_logit_scale=0.0), ValueError, "student_logit_scale"),
    (dict(teacher_logit_scale=float("nan")), ValueError, "teacher_logit_scale"),
    (dict(student_softcap=0.0), ValueError, "student_softcap"),
    (dict(teacher_softcap=-30.0), ValueError, "teacher_softcap"),
    (dict(teacher_softcap="30"), TypeError, "teacher_softcap"),
    (dict(num_items_in_batch=5, reduction="none"), ValueError, "num_items_in_batch"),
    (dict(teacher_hidden=torch.zeros(B, T + 1, H_T, dtype=torch.float64)), ValueError,
     "teacher_hidden"),
    (dict(teacher_weight=torch.zeros(V - 1, H_T, dtype=torch.float64)), ValueError, "V_T"),
    (dict(tokens=torch.zeros(B, T + 1, dtype=torch.long)), ValueError, "tokens"),
    (dict(chunk_size=0), ValueError, "chunk_size"),
    (dict(chunk_size=2.0), ValueError, "chunk_size"),
    (dict(divergence="js"), ValueError, "divergence"),
    (dict(beta=-1.0), ValueError, "beta"),
    (dict(process_group=object()), NotImplementedError, "process_group"),
]


@pytest.mark.parametrize("change,exc,text", BAD)
def test_validation(change, exc, text):
    hs, ws, bs, ht, wt, bt, tok = _inputs()
    args = dict(student_hidden=hs, student_weight=ws, teacher_hidden=ht, teacher_weight=wt,
                tokens=tok)
    args.update(change)
    with pytest.raises(exc, match=text):
        sk.fused_linear_gated_opd_loss(**args, backend="torch")


def test_out_of_range_token_raises_on_torch_backend():
    hs, ws, bs, ht, wt, bt, tok = _inputs()
    tok[1, 2] = V
    with pytest.raises(ValueError, match="tokens"):
        sk.fused_linear_gated_opd_loss(hs, ws, ht, wt, tok, backend="torch")


def test_torch_compile_fullgraph():
    hs, ws, bs, ht, wt, bt, tok = _inputs(dtype=torch.float32)

    def f(hs, ws, ht, wt, tok):
        return sk.fused_linear_gated_opd_loss(hs, ws, ht, wt, tok, beta=0.1, chunk_size=4,
                                              backend="torch")
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(hs, ws, ht, wt, tok)
    ref = f(hs, ws, ht, wt, tok)
    torch.testing.assert_close(loss, ref)
    got = torch.autograd.grad(loss, (hs, ws))
    want = torch.autograd.grad(ref, (hs, ws))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


# --------------------------------------------------------------------------- heads as trainers
# run them: scaled and softcapped logits, autocast, float32 master weights

def _heads(z, scale, cap):
    z = z * scale
    return z if cap is None else cap * torch.tanh(z / cap)


@pytest.mark.parametrize("s_scale,s_cap,t_scale,t_cap", [
    (1.0, 3.0, 1.0, 30.0),      # Gemma-2 style softcaps
    (0.0625, None, 0.25, None),  # Cohere / Granite style scales
    (2.0, 5.0, 1.0, None)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_logit_scale_and_softcap_match_the_models_logits(s_scale, s_cap, t_scale, t_cap,
                                                         reduction):
    hs, ws, bs, ht, wt, bt, tok = _inputs()
    hs.data.mul_(3)  # logits large enough for the softcap to bend them
    ver = torch.tensor([True, False])
    kw = dict(beta=0.2, divergence="forward_kl", reduction=reduction, backend="torch")
    loss = sk.fused_linear_gated_opd_loss(
        hs, ws, ht, wt, tok, ver, student_bias=bs, teacher_bias=bt, chunk_size=3,
        student_logit_scale=s_scale, student_softcap=s_cap, teacher_logit_scale=t_scale,
        teacher_softcap=t_cap, **kw)
    zs = _heads(hs @ ws.T + bs, s_scale, s_cap)
    zt = _heads(ht @ wt.T + bt, t_scale, t_cap)
    ref = sk.gated_opd_loss(zs, zt, tok, ver, **kw)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    gout = torch.rand(loss.shape, dtype=torch.float32) + 0.5
    got = torch.autograd.grad(loss, (hs, ws, bs), gout)
    want = torch.autograd.grad(ref, (hs, ws, bs), gout)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)
    # without them the loss differs: the silent error a trainer would make
    plain = sk.fused_linear_gated_opd_loss(hs, ws, ht, wt, tok, ver, student_bias=bs,
                                           teacher_bias=bt, **kw)
    assert (plain - ref).abs().max() > 1e-3


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_under_autocast_bfloat16(reduction):
    """torch.autocast(bf16) with float32 parameters: no crash, the products in bf16, as the
    materialized logits under the same autocast give them; gradients in float32."""
    hs, ws, bs, ht, wt, bt, tok = _inputs(dtype=torch.float32)
    kw = dict(reduction=reduction, beta=0.1, backend="torch")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = sk.fused_linear_gated_opd_loss(hs, ws, ht, wt, tok, student_bias=bs,
                                              teacher_bias=bt, chunk_size=4, **kw)
        zs = torch.nn.functional.linear(hs, ws, bs)
        zt = torch.nn.functional.linear(ht, wt, bt)
        assert zs.dtype == torch.bfloat16
        ref = sk.gated_opd_loss(zs, zt, tok, **kw)
    gout = torch.rand(loss.shape) + 0.5
    got = torch.autograd.grad(loss, (hs, ws, bs), gout)
    want = torch.autograd.grad(ref, (hs, ws, bs), gout)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for g, w in zip(got, want):  # bf16 products, rounded in another order: a bf16 tolerance
        assert g.dtype == torch.float32
        assert (g - w).norm() <= 1e-2 * w.norm(), float((g - w).norm() / w.norm())


def test_float32_master_weights_beside_bfloat16_hidden_states():
    """No autocast: bf16 hidden states and a float32 head compute in float32 (the promoted
    dtype), each gradient in its input's dtype."""
    hs, ws, bs, ht, wt, bt, tok = _inputs(dtype=torch.float32)
    hs16 = hs.detach().to(torch.bfloat16).requires_grad_()
    loss = sk.fused_linear_gated_opd_loss(hs16, ws, ht.bfloat16(), wt, tok, student_bias=bs,
                                          chunk_size=3, backend="torch")
    ref = _materialized(hs16.float(), ws, bs, ht.bfloat16().float(), wt, None, tok, None,
                        backend="torch")
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-7)
    gh, gw, gb = torch.autograd.grad(loss, (hs16, ws, bs))
    assert gh.dtype == torch.bfloat16 and gw.dtype == torch.float32 and gb.dtype == torch.float32
    h32 = hs16.detach().float().requires_grad_()
    rh, rw, rb = torch.autograd.grad(
        _materialized(h32, ws, bs, ht.bfloat16().float(), wt, None, tok, None, backend="torch"),
        (h32, ws, bs))
    torch.testing.assert_close(gh, rh.bfloat16(), rtol=0, atol=0)
    # (float32 sums over the chunks in another order)
    torch.testing.assert_close(gw, rw, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gb, rb, rtol=1e-5, atol=1e-6)


def test_num_items_in_batch_and_jsd():
    hs, ws, bs, ht, wt, bt, tok = _inputs()
    kw = dict(divergence="jsd", jsd_beta=0.3, teacher_temperature=0.8, backend="torch")
    loss = sk.fused_linear_gated_opd_loss(hs, ws, ht, wt, tok, num_items_in_batch=16,
                                          chunk_size=4, **kw)
    ref = _materialized(hs, ws, None, ht, wt, None, tok, None, reduction="sum", **kw) / 16
    torch.testing.assert_close(loss, ref.float(), rtol=0, atol=0)
    got = torch.autograd.grad(loss, (hs, ws))
    want = torch.autograd.grad(ref, (hs, ws))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_float16_hidden_states_beside_float32_weights_recompute():
    """float32 products, but a float16 hidden-state gradient: it must not be formed at the
    reduction's scale (it would flush to 0 under a large global count) but recomputed with the
    loss scaler's incoming gradient."""
    gen = torch.Generator().manual_seed(0)
    n, h, v = 8192, 16, 64
    hs = (0.3 * torch.randn(n, h, generator=gen)).half().requires_grad_()
    ws = (0.3 * torch.randn(v, h, generator=gen)).requires_grad_()
    ht, wt = 0.3 * torch.randn(n, h, generator=gen), 0.3 * torch.randn(v, h, generator=gen)
    tok = torch.randint(0, v, (n,), generator=gen)
    loss = sk.fused_linear_gated_opd_loss(hs, ws, ht, wt, tok, num_items_in_batch=2 ** 20,
                                          chunk_size=1000, backend="torch")
    (g,) = torch.autograd.grad(loss * 65536, hs)
    h32 = hs.detach().float().requires_grad_()
    ref = sk.gated_opd_loss(h32 @ ws.T, ht @ wt.T, tok, num_items_in_batch=2 ** 20,
                            backend="torch")
    (want,) = torch.autograd.grad(ref * 65536, h32)
    rel = (g.double() - want.double()).norm() / want.double().norm()
    assert g.dtype == torch.float16 and rel < 2e-3, rel


def test_float64_heads_ignore_autocast():
    """autocast leaves float64 alone: so does the fused loss."""
    hs, ws, bs, ht, wt, bt, tok = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = sk.fused_linear_gated_opd_loss(hs, ws, ht, wt, tok, student_bias=bs,
                                              teacher_bias=bt, backend="torch")
        ref = _materialized(hs, ws, bs, ht, wt, bt, tok, None, backend="torch")
    torch.testing.assert_close(loss, ref, rtol=0, atol=0)
