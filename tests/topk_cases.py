"""Adversarial cases of the top-k loss drawn by hypothesis, and their check against the float64
oracle, for every backend that implements the top-k family."""

import math

import torch
from hypothesis import strategies as st

import sgopd_kernels as sk
from sgopd_kernels import reference
from sgopd_kernels.api import row_options
from helpers import KERNEL_DTYPES, assert_kernel_matches_oracle, oracle_topk


def _student(kind, lead, vocab, dtype, scale, gen):
    n = math.prod(lead)
    if kind == "vocab_strided":  # the vocabulary is not the fastest dimension
        return (scale * torch.randn(vocab, n, generator=gen)).to(dtype).t().reshape(*lead, vocab) \
            if len(lead) == 1 else (scale * torch.randn(*lead, vocab, generator=gen)).to(dtype)
    if kind == "shifted":  # logits[:, :-1] of (B, T + 1, V)
        b = lead[0]
        return (scale * torch.randn(b, n // b + 1, vocab, generator=gen)).to(dtype)[:, :-1]
    return (scale * torch.randn(*lead, vocab, generator=gen)).to(dtype)


def top_heavy(s, ids, tail):
    """Raise the logits at the ids so that the categories hold all but ``tail`` of p_S."""
    sd = s.double()
    inside = torch.zeros_like(sd).scatter_add_(-1, ids.clamp(min=0), (ids >= 0).double()) > 0
    held = sd.masked_fill(~inside, -math.inf).logsumexp(-1, keepdim=True)
    rest = sd.masked_fill(inside, -math.inf).logsumexp(-1, keepdim=True)
    shift = (rest - held - math.log(tail / (1 - tail))).nan_to_num(0.0, 0.0, 0.0)
    return torch.where(inside, sd + shift, sd).to(s.dtype)


def draw_case(draw):
    seed = draw(st.integers(0, 2 ** 16))
    gen = torch.Generator().manual_seed(seed)
    lead = draw(st.sampled_from([(1,), (5,), (2, 3), (3, 2)]))
    vocab = draw(st.sampled_from([1, 2, 7, 61, 64, 127, 257, 331]))
    k = draw(st.sampled_from([1, 2, 3, 5, 8, 20, 33, 64, 128]))
    dtype = draw(st.sampled_from(KERNEL_DTYPES))
    scale = draw(st.sampled_from([0.5, 3.0, 12.0]))
    kind = draw(st.sampled_from(["contiguous", "vocab_strided"] if len(lead) == 1
                                else ["contiguous", "shifted"]))
    s = _student(kind, lead, vocab, dtype, scale, gen)
    lp_t = torch.log_softmax(scale * torch.randn(*lead, vocab, generator=gen), -1)
    used = min(k, vocab)
    if draw(st.booleans()):  # the teacher's top-k
        ids = lp_t.topk(used, -1).indices
    else:  # any distinct ids
        ids = torch.argsort(torch.rand(*lead, vocab, generator=gen), -1)[..., :used]
    tlp = lp_t.gather(-1, ids)
    if used < k:
        ids = torch.cat([ids, torch.full((*lead, k - used), -1)], -1)
        tlp = torch.cat([tlp, torch.zeros(*lead, k - used)], -1)
    if draw(st.booleans()):  # unused slots anywhere (negative ids)
        drop = torch.rand(*lead, k, generator=gen) < 0.3
        ids = torch.where(drop, -1 - torch.randint(0, 5, ids.shape, generator=gen), ids)
    perm = torch.argsort(torch.rand(*lead, k, generator=gen), -1)  # slots in any order
    ids, tlp = ids.gather(-1, perm), tlp.gather(-1, perm)
    tokens = torch.randint(0, vocab, lead, generator=gen)
    if draw(st.booleans()):  # y among the ids where it can be
        first = ids[..., 0]
        tokens = torch.where(first >= 0, first, tokens)
    if draw(st.booleans()):
        tokens.view(-1)[0] = -100
    ttl = lp_t.gather(-1, tokens.clamp(min=0).unsqueeze(-1)).squeeze(-1) \
        if draw(st.booleans()) else None
    gate = draw(st.sampled_from(["none", "bool_seq", "adv_pos"]))
    verifier = None if gate == "none" else (torch.rand(lead[0], generator=gen) > 0.5
                                            if gate == "bool_seq"
                                            else torch.randn(lead, generator=gen).round())
    kw = dict(
        extrapolation=draw(st.sampled_from([1.8, 2.5])),
        interpolation=draw(st.sampled_from([1.0, 0.4])),
        temperature=draw(st.sampled_from([1.0, 0.7, 1.9])),
        reduction=draw(st.sampled_from(["mean", "sum", "none"])),
        beta=draw(st.sampled_from([0.0, 0.3, 1.2])),
        divergence=draw(st.sampled_from(["reverse_kl", "forward_kl", "jsd"])),
        jsd_beta=draw(st.sampled_from([0.5, 0.1, 0.9])),
        tail_floor=draw(st.sampled_from([1e-7, 0.0, 1e-3])),
    )
    if draw(st.booleans()):
        kw["weights"] = torch.rand(lead, generator=gen)
    adversary = draw(st.sampled_from(["none", "student_mask", "huge_negative",
                                      "teacher_mask", "top_heavy"]))
    cols = torch.randperm(vocab, generator=gen)[: max(1, vocab // 4)]
    if adversary == "student_mask" and vocab > 2:  # some of them may be among the ids
        s[..., cols] = float("-inf")
    elif adversary == "huge_negative":
        s[..., cols] = -1e4
    elif adversary == "teacher_mask":  # the teacher rules out some of its slots
        tlp = torch.where(torch.rand(tlp.shape, generator=gen) < 0.3, float("-inf"), tlp)
        kw["divergence"] = "forward_kl"  # (reverse KL is +inf there)
    elif adversary == "top_heavy" and vocab > k:
        s = top_heavy(s.contiguous(), ids, draw(st.sampled_from([1e-3, 1e-6])))
    if kw["tail_floor"] == 0.0 and kw["divergence"] == "reverse_kl":
        # a top-k that holds the teacher's whole mass up to rounding leaves a tail of 0 or of
        # 1e-20 by the rounding of 1 - sum: reverse KL +inf or finite (the floor's purpose)
        kw["tail_floor"] = 1e-7
    tlp = tlp.to(draw(st.sampled_from([torch.float32, dtype])))
    return s, (ids, tlp, ttl), tokens, verifier, kw


def _to(x, device):
    return None if x is None else x.to(device)


def check_against_oracle(backend, device, s, teacher, tokens, verifier, kw):
    """The loss, statistics and gradient of ``backend`` on ``device`` against the float64
    oracle (and its float32 eager twin for the tolerance)."""
    ids, tlp, ttl = teacher
    kw = dict(kw)
    x = s.to(device).requires_grad_(True)
    w = _to(kw.pop("weights", None), device)
    loss, stats = sk.topk_opd_loss(x, ids.to(device), tlp.to(device), tokens.to(device),
                                   _to(verifier, device), teacher_token_logprobs=_to(ttl, device),
                                   weights=w, return_stats=True, backend=backend, **kw)
    grad_out = torch.randn(loss.shape, device=device) if kw["reduction"] == "none" else None
    (g,) = torch.autograd.grad(loss, x, grad_out)
    okw = dict(weights=_to(w, "cpu"), grad_out=_to(grad_out, "cpu"), **kw)
    assert_kernel_matches_oracle(
        loss, stats, g, s, oracle_topk(s, ids, tlp, ttl, tokens, verifier, **okw),
        oracle_topk(s, ids, tlp, ttl, tokens, verifier, dtype=torch.float32, **okw),
        teacher=(tlp,), tokens=tokens, temperature=kw["temperature"],
        reduction=kw["reduction"], weights=okw["weights"], grad_out=okw["grad_out"],
        gate_slack=_undecidable_gates(s, ids, tlp, ttl, tokens, verifier, kw))


def _undecidable_gates(s, ids, tlp, ttl, tokens, verifier, kw):
    """The fraction of unmasked rows whose delta (float64) is not 0 but within float32's
    resolution of it (|delta| < 1e-5): a student and teacher that agree on y to 1e-13 leave
    the gate's sign to rounding."""
    if verifier is None:
        return 0.0
    k = ids.shape[-1]
    opts = row_options(temperature=kw["temperature"], beta=kw["beta"],
                       divergence=kw["divergence"], tail_floor=kw["tail_floor"])
    r = reference.topk_terms(s.detach().double().reshape(-1, s.shape[-1]), ids.reshape(-1, k),
                             tlp.double().reshape(-1, k),
                             None if ttl is None else ttl.double().reshape(-1),
                             tokens.reshape(-1), None, opts)
    valid = tokens.reshape(-1) != -100
    small = valid & (r["delta"] != 0) & (r["delta"].abs() < 1e-5)
    return float(small.sum()) / max(int(valid.sum()), 1)
