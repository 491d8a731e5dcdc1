"""The logits family: ``gated_opd_loss`` on the student's and the teacher's logits.

logits-rkl and logits-fkl: reverse and forward KL, no verifier, beta = 0;
logits-gated: reverse KL, a bool verifier per sequence, the Veto bridge with
beta = 0.1, lambda+- = 1.8/1.0, and the five statistics. The student's side
(inputs, mask, gate, mean, oracle) serves the other families on logits too.
"""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace

import torch

from harness import Case, copy_floor, generator, loss_of, optional, row_slices, teacher_vocab
from providers import LIGER_UNUSABLE

IGNORE = -100
BETA, LAM_POS, LAM_NEG = 0.1, 1.8, 1.0  # logits-gated; the gate of `sampled` uses the lambdas too
NO_LIGER = "Liger-Kernel has no sign-gated bridge or sampled-token OPD loss"
NO_TRL = "TRL's ChunkedDivergenceFunction takes hidden states and LM heads: see linear-rkl"


# ---------------------------------------------------------------------------
# inputs

def student_inputs(ctx, n, vocab, dtype, teacher, gated):
    """Student logits (N, V), normal x 3, in 8 sequences (1 if 8 does not divide N); the
    teacher, ``teacher(ctx, generator, n, vocab, dtype)``; token ids uniform in [0, V); a bool
    verifier per sequence, and its +-1 per row as ``sign`` (0 when not ``gated``)."""
    dev, g = ctx.device, generator(ctx)
    b = 8 if n % 8 == 0 else 1  # sequences: the verifier is one bool per sequence
    inp = SimpleNamespace(lead=(b, n // b))
    inp.s = (torch.randn(n, vocab, device=dev, dtype=dtype, generator=g) * 3.0).requires_grad_()
    inp.t = teacher(ctx, g, n, vocab, dtype)
    inp.tok = torch.randint(0, vocab, (n,), device=dev, generator=g)
    inp.ver = torch.rand(b, device=dev, generator=g) > 0.5
    inp.sign = (inp.ver.float() * 2 - 1).repeat_interleave(n // b)
    if not gated:
        inp.sign = torch.zeros_like(inp.sign)  # no verifier: the gate is off
    return inp


def teacher_logits(ctx, g, n, vocab, dtype):
    return torch.randn(n, teacher_vocab(ctx, vocab), device=ctx.device, dtype=dtype,
                       generator=g) * 3.0


def needed_bytes(ctx, n, vocab, elt):
    return elt * (2 * n * vocab + n * teacher_vocab(ctx, vocab))  # S, dS and T


# ---------------------------------------------------------------------------
# the formulas in eager PyTorch (float32 math, like the library)

def student(s, tok):
    """The rows' mask, their tokens (0 where masked) as (N, 1), and log p_S in float32."""
    valid = tok != IGNORE
    y = torch.where(valid, tok, torch.zeros_like(tok)).unsqueeze(-1)
    return valid, y, torch.log_softmax(s.float(), dim=-1)


def gate(delta, sign):
    """g = sign(delta) x the verifier's sign, and its weight: LAM_POS where g > 0, LAM_NEG where
    g < 0, else 1."""
    g = torch.sign(delta) * sign
    return g, 1.0 + (g > 0) * (LAM_POS - 1.0) + (g < 0) * (LAM_NEG - 1.0)


def logits_rows(s, t, tok, sign, variant):
    """Per-row loss of logits-<variant> (rkl, fkl or gated), for gated the per-row statistics,
    and the rows' mask. s: student logits (N, V); t: teacher logits (N, V_T >= V); sign: the
    verifier's +-1 per row."""
    valid, y, lp_s = student(s, tok)
    lp_t = torch.log_softmax(t[:, : s.shape[-1]].float(), dim=-1)
    p_s = lp_s.exp()
    stats = None
    if variant == "rkl":
        loss = (p_s * (lp_s - lp_t)).sum(-1)
    elif variant == "fkl":
        loss = (lp_t.exp() * (lp_t - lp_s)).sum(-1)
    else:  # gated: sign gate, Veto bridge target with beta, reverse KL, statistics
        lp_s_d = lp_s.detach()
        delta = (lp_t.gather(-1, y) - lp_s_d.gather(-1, y)).squeeze(-1)
        g, lam = gate(delta, sign)
        lam = lam.unsqueeze(-1)
        log_q = torch.log_softmax(lam * lp_t + (1.0 - lam + BETA) * lp_s_d, dim=-1)
        loss = (p_s * (lp_s - log_q)).sum(-1)
        with torch.no_grad():
            p_d = p_s.detach()
            stats = ((g > 0).float(), (g < 0).float(), delta,
                     (p_d * (lp_s_d - lp_t)).sum(-1), -(p_d * lp_s_d).sum(-1))
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    return loss, stats, valid


def eager_loss(rows, s, t, tok, sign):
    """Mean loss over the unmasked rows, and the mean of each statistic ``rows`` returns."""
    loss, stats, valid = rows(s, t, tok, sign)
    count = valid.sum().clamp(min=1)
    v = valid.float()
    means = () if stats is None else tuple((x * v).sum() / count for x in stats)
    return (loss.sum() / count,) + means


def eager(rows, inp):
    def loss(s, t, tok, sign):
        return eager_loss(rows, s, t, tok, sign)
    return loss, (inp.s, inp.t, inp.tok, inp.sign), [inp.s]


@torch.no_grad()
def reference(rows, inp):
    n, vocab = inp.s.shape
    total = 0.0
    for sl in row_slices(n, vocab):
        loss, _, _ = rows(inp.s[sl], inp.t[sl], inp.tok[sl], inp.sign[sl])
        total += float(loss.double().sum())
    return total / max(1, int((inp.tok != IGNORE).sum()))


# ---------------------------------------------------------------------------
# the calls

def sgopd(kw, gated, inp, backend):
    import sgopd_kernels as sk

    lead, vocab = inp.lead, inp.s.shape[-1]
    tok, ver = inp.tok.view(lead), inp.ver if gated else None
    t = inp.t.view(*lead, inp.t.shape[-1])

    def forward():
        return loss_of(sk.gated_opd_loss(inp.s.view(*lead, vocab), t, tok, ver, backend=backend,
                                         **kw))
    return forward, [inp.s]


def liger_on_log_probs(make, inp):
    fn = optional(make, LIGER_UNUSABLE)
    vocab = inp.s.shape[-1]

    def forward():  # Liger takes log-probabilities: their log_softmax is part of its time
        return fn(torch.log_softmax(inp.s, dim=-1), torch.log_softmax(inp.t[:, :vocab], dim=-1))
    return forward, [inp.s]


def liger_jsd():  # generalized JSD, beta=1: KL(student || teacher), on log-probs
    from liger_kernel.transformers.jsd import LigerJSD
    return LigerJSD(beta=1.0)


def liger_kl_div():  # KLDivLoss(log p_S, log p_T) = KL(teacher || student)
    from liger_kernel.transformers.kl_div import LigerKLDIVLoss
    return LigerKLDIVLoss(reduction="batchmean", log_target=True)


def logits_case(variant, liger, gated=False, **kw):
    rows = partial(logits_rows, variant=variant)
    competitors, skips = {}, {"trl": NO_TRL}
    if liger is None:
        skips["liger"] = NO_LIGER
    else:
        competitors["liger"] = partial(liger_on_log_probs, liger)
    return Case(f"logits-{variant}",
                inputs=partial(student_inputs, teacher=teacher_logits, gated=gated),
                eager=partial(eager, rows), reference=partial(reference, rows),
                sgopd=partial(sgopd, kw, gated), needed_bytes=needed_bytes,
                speed_of_light=copy_floor(fwd=2, fwd_bwd=3),  # read S, T; and write dS
                competitors=competitors, skips=skips, teacher_pad=True)


CASES = (
    logits_case("rkl", liger_jsd, divergence="reverse_kl"),
    logits_case("fkl", liger_kl_div, divergence="forward_kl"),
    logits_case("gated", None, gated=True, divergence="reverse_kl", beta=BETA,
                extrapolation=LAM_POS, interpolation=LAM_NEG, return_stats=True),
)
