"""The fused linear family: ``fused_linear_gated_opd_loss``, reverse KL of the logits
``hidden @ W.T`` (hidden size H = ``ctx.h``), no verifier, beta = 0, gradients to the student's
hidden state and weight. Its own shape on a GPU: N = 8192, V = 151936."""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch

from harness import Case, gemm_floor, generator, optional, row_slices
from providers import LIGER_UNUSABLE

GPU_H, CPU_H = 4096, 256  # the default of --H


def inputs(ctx, n, vocab, dtype):
    dev, g, h = ctx.device, generator(ctx), ctx.h
    scale = 3.0 / math.sqrt(h)  # logits of std ~3
    return SimpleNamespace(
        hs=torch.randn(n, h, device=dev, dtype=dtype, generator=g).requires_grad_(),
        ws=(torch.randn(vocab, h, device=dev, dtype=dtype, generator=g) * scale
            ).requires_grad_(),
        ht=torch.randn(n, h, device=dev, dtype=dtype, generator=g),
        wt=torch.randn(vocab, h, device=dev, dtype=dtype, generator=g) * scale,
        tok=torch.randint(0, vocab, (n,), device=dev, generator=g))


def needed_bytes(ctx, n, vocab, elt):
    h = ctx.h
    return elt * (3 * (n * h + vocab * h) + 2 * n * vocab)  # + grads + GEMM-floor outputs


def eager_linear(hs, ws, ht, wt):
    """Reverse KL(p_S || p_T) of the logits hidden @ W.T, mean over rows."""
    lp_s = torch.log_softmax((hs @ ws.t()).float(), dim=-1)
    lp_t = torch.log_softmax((ht @ wt.t()).float(), dim=-1)
    return (lp_s.exp() * (lp_s - lp_t)).sum(-1).mean()


def eager(inp):
    return eager_linear, (inp.hs, inp.ws, inp.ht, inp.wt), [inp.hs, inp.ws]


@torch.no_grad()
def reference(inp):
    n, vocab = inp.hs.shape[0], inp.ws.shape[0]
    total = sum(float(eager_linear(inp.hs[sl], inp.ws, inp.ht[sl], inp.wt)) * (sl.stop - sl.start)
                for sl in row_slices(n, vocab))
    return total / max(1, n)


def speed_of_light(ctx, inp, n, vocab, elt):
    return gemm_floor(ctx, inp.hs, inp.ws, inp.ht, inp.wt)


def sgopd(inp, backend):
    import sgopd_kernels as sk

    def forward():
        return sk.fused_linear_gated_opd_loss(inp.hs, inp.ws, inp.ht, inp.wt, inp.tok,
                                              backend=backend)
    return forward, [inp.hs, inp.ws]


def liger_fused_linear_jsd():
    from liger_kernel.transformers.fused_linear_jsd import LigerFusedLinearJSD
    return LigerFusedLinearJSD(jsd_beta=1.0)


def liger(inp):
    fn = optional(liger_fused_linear_jsd, LIGER_UNUSABLE)
    return (lambda: fn(inp.hs, inp.ws, inp.ht, inp.wt, None)), [inp.hs, inp.ws]


def chunked_divergence():  # on CUDA it runs Triton kernels; on a CPU its torch fallback
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction
    return ChunkedDivergenceFunction


def trl(inp):
    fn = optional(chunked_divergence, "trl.kernels.chunked_divergence is not importable")

    def forward():  # beta=1.0: reverse KL(student || teacher); per-token divergence and entropy
        divergence, _entropy = fn.apply(inp.hs, inp.ws, None, inp.ht, inp.wt, None, 1.0)
        return divergence.mean()
    return forward, [inp.hs, inp.ws]


CASES = (
    Case("linear-rkl", inputs=inputs, eager=eager, reference=reference, sgopd=sgopd,
         needed_bytes=needed_bytes, speed_of_light=speed_of_light,
         competitors={"liger": liger, "trl": trl}, gpu_shapes=((8192,), (151936,)), hidden=True),
)
