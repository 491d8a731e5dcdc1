"""The sampled family: ``sampled_opd_loss``, the student's logits against the teacher's
log-probability of each sampled token, with a bool verifier per sequence."""

from __future__ import annotations

from functools import partial

import torch

from cases.logits import (LAM_NEG, LAM_POS, NO_LIGER, NO_TRL, eager, gate, reference, student,
                          student_inputs)
from harness import Case, copy_floor


def teacher_log_probs(ctx, g, n, vocab, dtype):
    return -15.0 * torch.rand(n, device=ctx.device, generator=g)


def needed_bytes(ctx, n, vocab, elt):
    return elt * 2 * n * vocab  # S and dS


def sampled_rows(s, t, tok, sign):
    """Per-row loss, no statistics, and the rows' mask; t: the teacher's log-probabilities of
    the tokens (N,)."""
    valid, y, lp_s = student(s, tok)
    lp_s_y = lp_s.gather(-1, y).squeeze(-1)
    delta = t.float() - lp_s_y.detach()
    _, lam = gate(delta, sign)
    loss = -(lam * delta) * lp_s_y
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    return loss, None, valid


def sgopd(inp, backend):
    import sgopd_kernels as sk

    lead, vocab = inp.lead, inp.s.shape[-1]
    tok, tlp = inp.tok.view(lead), inp.t.view(lead)

    def forward():
        return sk.sampled_opd_loss(inp.s.view(*lead, vocab), tlp, tok, inp.ver,
                                   extrapolation=LAM_POS, interpolation=LAM_NEG, backend=backend)
    return forward, [inp.s]


CASES = (
    Case("sampled", inputs=partial(student_inputs, teacher=teacher_log_probs, gated=True),
         eager=partial(eager, sampled_rows), reference=partial(reference, sampled_rows),
         sgopd=sgopd, needed_bytes=needed_bytes,
         speed_of_light=copy_floor(fwd=1, fwd_bwd=2),  # read S; and write dS
         skips={"liger": NO_LIGER, "trl": NO_TRL}),
)
