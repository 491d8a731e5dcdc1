"""The top-k family: ``topk_opd_loss``, the student's logits against a teacher's top-k ids and
log-probabilities (an inference engine's output), forward KL over the k ids and a tail bucket,
no verifier, beta = 0: the loss TRL's server distillation computes. Cases topk-k20 and
topk-k64; their own shape on a GPU: N = 8192, V = 151936.

torch-eager is that computation in unfused PyTorch (log_softmax, gather, the tail bucket as
1 - sum, clamped); the trl provider calls TRL's own ``_add_tail_bucket`` and
``_jsd_divergence`` on the same log-probabilities.
"""

from __future__ import annotations

import math
from functools import partial

import torch

from cases.logits import IGNORE, student_inputs
from harness import Case, copy_floor, generator, optional, row_slices

TAIL = 1e-7  # the tail floor: TRL's clamp, this library's default
NO_LIGER = "Liger-Kernel has no top-k teacher loss"


def inputs(ctx, n, vocab, dtype, k):
    """Student logits and tokens as for the logits cases; the teacher's top-k of its own normal
    x 3 logits (made a chunk of rows at a time), log-probabilities in float32."""
    inp = student_inputs(ctx, n, vocab, dtype, teacher=lambda *args: None, gated=False)
    g = generator(ctx)
    g.manual_seed(ctx.args.seed + 1)
    inp.ids = torch.empty(n, k, dtype=torch.int64, device=ctx.device)
    inp.tlp = torch.empty(n, k, dtype=torch.float32, device=ctx.device)
    for sl in row_slices(n, vocab):
        t = torch.randn(sl.stop - sl.start, vocab, device=ctx.device, generator=g) * 3.0
        top = torch.log_softmax(t, dim=-1).topk(k, dim=-1)
        inp.ids[sl], inp.tlp[sl] = top.indices, top.values
    return inp


def needed_bytes(ctx, n, vocab, elt):
    return elt * 2 * n * vocab  # S and dS


def topk_rows(s, ids, tlp, tok):
    """Per-row forward KL(P_T || P_S) over the k ids and the tail bucket, in float32."""
    valid = tok != IGNORE
    lp_s = torch.log_softmax(s.float(), dim=-1).gather(-1, ids)

    def with_tail(lp):  # the tail as log(1 - sum), its mass at least TAIL
        held = torch.logsumexp(lp, dim=-1, keepdim=True).clamp(max=math.log1p(-TAIL))
        return torch.cat([lp, torch.log(-torch.expm1(held))], dim=-1)
    lt, ls = with_tail(tlp), with_tail(lp_s)
    loss = (lt.exp() * (lt - ls)).sum(-1)
    return torch.where(valid, loss, torch.zeros_like(loss)), valid


def eager_loss(s, ids, tlp, tok):
    loss, valid = topk_rows(s, ids, tlp, tok)
    return loss.sum() / valid.sum().clamp(min=1)


def eager(inp):
    return eager_loss, (inp.s, inp.ids, inp.tlp, inp.tok), [inp.s]


@torch.no_grad()
def reference(inp):
    n, vocab = inp.s.shape
    total = sum(float(topk_rows(inp.s[sl], inp.ids[sl], inp.tlp[sl], inp.tok[sl])[0]
                      .double().sum()) for sl in row_slices(n, vocab))
    return total / max(1, int((inp.tok != IGNORE).sum()))


def sgopd(inp, backend):
    import sgopd_kernels as sk

    lead, vocab, k = inp.lead, inp.s.shape[-1], inp.ids.shape[-1]

    def forward():
        return sk.topk_opd_loss(inp.s.view(*lead, vocab), inp.ids.view(*lead, k),
                                inp.tlp.view(*lead, k), inp.tok.view(lead),
                                divergence="forward_kl", tail_floor=TAIL, backend=backend)
    return forward, [inp.s]


def trl_tail_bucket():
    from trl.experimental.server_distillation.server_distillation_trainer import (
        _add_tail_bucket, _jsd_divergence)
    return _add_tail_bucket, _jsd_divergence


def trl(inp):
    add_tail, jsd = optional(trl_tail_bucket, "trl's server distillation is not importable")

    def forward():  # TRL's beta = 0: forward KL, over the top-k and its tail bucket
        valid = inp.tok != IGNORE
        lp_s = torch.log_softmax(inp.s.float(), dim=-1).gather(-1, inp.ids)
        mask = torch.ones_like(inp.ids, dtype=torch.bool)
        s_sparse, support = add_tail(lp_s, mask)
        t_sparse, _ = add_tail(inp.tlp, mask)
        loss = jsd(s_sparse, t_sparse, 0.0, support).sum(-1)
        return torch.where(valid, loss, torch.zeros_like(loss)).sum() / valid.sum().clamp(min=1)
    return forward, [inp.s]


def topk_case(k):
    return Case(f"topk-k{k}", inputs=partial(inputs, k=k), eager=eager, reference=reference,
                sgopd=sgopd, needed_bytes=needed_bytes,
                speed_of_light=copy_floor(fwd=1, fwd_bwd=3),  # read S; read S again, write dS
                competitors={"trl": trl}, skips={"liger": NO_LIGER},
                gpu_shapes=((8192,), (151936,)))


CASES = (topk_case(20), topk_case(64))
