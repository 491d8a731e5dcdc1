#!/usr/bin/env python
"""Speed and memory of sgopd_kernels' losses beside eager PyTorch, torch.compile,
Liger-Kernel, TRL and the speed of light, all measured in one process.

For each case and shape it times the forward and the forward+backward
(``triton.testing.do_bench``: median, p20, p80) and the peak memory above the
inputs, prints a table and appends one JSON line per measurement to
``benchmarks/results/<gpu-name>.jsonl`` (see README.md). Without a GPU it runs
small shapes on the CPU, timed with ``time.perf_counter``: a smoke test of the
script, whose timings say nothing about GPU speed.

    python benchmarks/bench_loss.py --quick             # one shape per case
    python benchmarks/bench_loss.py                     # the full sweep
    python benchmarks/bench_loss.py --cases logits-gated --N 8192 --V 151936 --dtype bf16
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

LOGITS_CASES = ("logits-rkl", "logits-fkl", "logits-gated", "sampled")
CASES = LOGITS_CASES + ("linear-rkl",)
SGOPD = ("sgopd-triton", "sgopd-cuda", "sgopd-cpu", "sgopd-torch")
PROVIDERS = SGOPD + ("torch-eager", "torch-compile", "liger", "trl", "speed-of-light")
DTYPES = ("bf16", "fp32")
MODES = ("fwd", "fwd_bwd")
FULL_N, FULL_V = (1024, 4096, 8192, 16384), (32000, 128256, 151936)
QUICK_N, QUICK_V = (8192,), (32000, 151936)
CPU_N, CPU_V = (64,), (1000, 4000)
LINEAR_N, LINEAR_V = 8192, 151936
GPU_H, CPU_H = 4096, 256
IGNORE = -100
BETA, LAM_POS, LAM_NEG = 0.1, 1.8, 1.0  # logits-gated; the gate of `sampled` uses the lambdas too
TOLERANCE = {"bf16": 1e-2, "fp32": 1e-4}
CHECKED = SGOPD + ("torch-compile", "liger", "trl")  # losses compared with eager before timing
CPU_NOTE = "NOTE: no GPU here: these are CPU timings, and CPU timings say nothing about GPU speed."


def _list(kind, choices=None):
    def parse(text):
        items = [kind(x) for x in text.split(",") if x.strip()]
        bad = [x for x in items if choices is not None and x not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated list of {choices}, got {text!r}")
        return tuple(items)
    return parse


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Benchmark sgopd_kernels' losses (forward, forward+backward, peak memory) "
                    "beside eager PyTorch, torch.compile, Liger-Kernel, TRL and the speed of "
                    "light.",
        epilog=f"Default sweep on a GPU: N in {FULL_N} x V in {FULL_V} x bf16,fp32, cases "
               f"{', '.join(CASES)} (linear-rkl at N={LINEAR_N} V={LINEAR_V}); on a CPU: N=64, "
               "V in 1000,4000.")
    p.add_argument("--N", type=_list(int), help="rows (tokens), comma-separated")
    p.add_argument("--V", type=_list(int), help="vocabulary sizes, comma-separated")
    p.add_argument("--H", type=int,
                   help=f"hidden size of linear-rkl (default {GPU_H} on a GPU, {CPU_H} on a CPU)")
    p.add_argument("--dtype", type=_list(str, DTYPES), help="bf16,fp32")
    p.add_argument("--cases", type=_list(str, CASES), help=",".join(CASES))
    p.add_argument("--providers", type=_list(str, PROVIDERS), default=PROVIDERS,
                   help=",".join(PROVIDERS) + " (default: all)")
    p.add_argument("--quick", action="store_true",
                   help="N=8192, V in 32000,151936, bf16, the logits-* cases "
                        "(--N/--V/--dtype/--cases override)")
    p.add_argument("--teacher-pad", action="store_true", help="teacher vocabulary V_T = V + 128")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms (default 25)")
    p.add_argument("--rep", type=int, default=100,
                   help="do_bench repetition time, ms (default 100)")
    p.add_argument("--record", action="store_true",
                   help="append results to the jsonl on a CPU too")
    p.add_argument("--no-record", action="store_true", help="do not append results to the jsonl")
    p.add_argument("--plot", action="store_true", help="write PNG plots under benchmarks/results/")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is present")
    p.add_argument("--interpret", action="store_true",
                   help="CPU: run the Triton kernels in the interpreter (sets TRITON_INTERPRET=1)")
    p.add_argument("--compile-cpu", action="store_true", help="CPU: also run torch.compile (slow)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


# Arguments first: --interpret must set TRITON_INTERPRET before triton is first imported.
ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.interpret:
    os.environ["TRITON_INTERPRET"] = "1"
    # the interpreter also evaluates masked-off lanes (-inf - -inf): numpy warns; the loss check
    # below still compares every kernel's result with eager PyTorch
    warnings.filterwarnings("ignore", category=RuntimeWarning, module="triton.runtime.interpreter")

import torch  # noqa: E402

sys.path.insert(0, str(HERE.parent))  # benchmark this checkout, whose commit is recorded
import sgopd_kernels as sk  # noqa: E402


class Skip(Exception):
    """A provider that cannot run this case here; the message says why."""


# ---------------------------------------------------------------------------
# the formulas in eager PyTorch (float32 math, like the library)

def eager_rows(s, t, tok, sign, case):
    """Per-row loss of `case`, and for logits-gated the per-row statistics.

    s: student logits (N, V); t: teacher logits (N, V_T >= V), or for `sampled`
    the teacher log-probabilities (N,); sign: the verifier's +-1 per row.
    """
    valid = tok != IGNORE
    y = torch.where(valid, tok, torch.zeros_like(tok)).unsqueeze(-1)
    lp_s = torch.log_softmax(s.float(), dim=-1)
    stats = None
    if case == "sampled":
        lp_s_y = lp_s.gather(-1, y).squeeze(-1)
        delta = t.float() - lp_s_y.detach()
        g = torch.sign(delta) * sign
        lam = 1.0 + (g > 0) * (LAM_POS - 1.0) + (g < 0) * (LAM_NEG - 1.0)
        loss = -(lam * delta) * lp_s_y
    else:
        lp_t = torch.log_softmax(t[:, : s.shape[-1]].float(), dim=-1)
        p_s = lp_s.exp()
        if case == "logits-rkl":
            loss = (p_s * (lp_s - lp_t)).sum(-1)
        elif case == "logits-fkl":
            loss = (lp_t.exp() * (lp_t - lp_s)).sum(-1)
        else:  # logits-gated: sign gate, Veto bridge target with beta, reverse KL, statistics
            lp_s_d = lp_s.detach()
            delta = (lp_t.gather(-1, y) - lp_s_d.gather(-1, y)).squeeze(-1)
            g = torch.sign(delta) * sign
            lam = (1.0 + (g > 0) * (LAM_POS - 1.0) + (g < 0) * (LAM_NEG - 1.0)).unsqueeze(-1)
            log_q = torch.log_softmax(lam * lp_t + (1.0 - lam + BETA) * lp_s_d, dim=-1)
            loss = (p_s * (lp_s - log_q)).sum(-1)
            with torch.no_grad():
                p_d = p_s.detach()
                stats = ((g > 0).float(), (g < 0).float(), delta,
                         (p_d * (lp_s_d - lp_t)).sum(-1), -(p_d * lp_s_d).sum(-1))
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    return loss, stats, valid


def eager_loss(s, t, tok, sign, case):
    """Mean loss over the unmasked rows, and for logits-gated the five mean statistics."""
    loss, stats, valid = eager_rows(s, t, tok, sign, case)
    count = valid.sum().clamp(min=1)
    v = valid.float()
    means = () if stats is None else tuple((x * v).sum() / count for x in stats)
    return (loss.sum() / count,) + means


def eager_linear(hs, ws, ht, wt):
    """Reverse KL(p_S || p_T) of the logits hidden @ W.T, mean over rows."""
    lp_s = torch.log_softmax((hs @ ws.t()).float(), dim=-1)
    lp_t = torch.log_softmax((ht @ wt.t()).float(), dim=-1)
    return (lp_s.exp() * (lp_s - lp_t)).sum(-1).mean()


@torch.no_grad()
def reference_loss(inp, case, chunk_elements=1 << 26):
    """The eager loss in row chunks (bounded memory), the oracle of the correctness guard."""
    if case == "linear-rkl":
        n, vocab = inp.hs.shape[0], inp.ws.shape[0]
        step = max(1, chunk_elements // vocab)
        total = sum(float(eager_linear(inp.hs[a:a + step], inp.ws, inp.ht[a:a + step], inp.wt))
                    * min(step, n - a) for a in range(0, n, step))
        return total / max(1, n)
    n, vocab = inp.s.shape
    step = max(1, chunk_elements // vocab)
    total = 0.0
    for a in range(0, n, step):
        sl = slice(a, a + step)
        t = inp.tlp[sl] if case == "sampled" else inp.t[sl]
        rows, _, _ = eager_rows(inp.s[sl], t, inp.tok[sl], inp.sign[sl], case)
        total += float(rows.double().sum())
    return total / max(1, int((inp.tok != IGNORE).sum()))


# ---------------------------------------------------------------------------
# inputs

def make_inputs(ctx, case, n, vocab, dtype):
    dev, g = ctx.device, torch.Generator(device=ctx.device).manual_seed(ctx.args.seed)
    if case == "linear-rkl":
        h = ctx.h
        scale = 3.0 / math.sqrt(h)  # logits of std ~3
        return SimpleNamespace(
            hs=torch.randn(n, h, device=dev, dtype=dtype, generator=g).requires_grad_(),
            ws=(torch.randn(vocab, h, device=dev, dtype=dtype, generator=g) * scale
                ).requires_grad_(),
            ht=torch.randn(n, h, device=dev, dtype=dtype, generator=g),
            wt=torch.randn(vocab, h, device=dev, dtype=dtype, generator=g) * scale,
            tok=torch.randint(0, vocab, (n,), device=dev, generator=g))
    b = 8 if n % 8 == 0 else 1  # sequences: the verifier is one bool per sequence
    inp = SimpleNamespace(lead=(b, n // b), t=None, tlp=None)
    inp.s = (torch.randn(n, vocab, device=dev, dtype=dtype, generator=g) * 3.0).requires_grad_()
    if case == "sampled":
        inp.tlp = -15.0 * torch.rand(n, device=dev, generator=g)
    else:
        vt = vocab + 128 if ctx.args.teacher_pad else vocab
        inp.t = torch.randn(n, vt, device=dev, dtype=dtype, generator=g) * 3.0
    inp.tok = torch.randint(0, vocab, (n,), device=dev, generator=g)
    inp.ver = torch.rand(b, device=dev, generator=g) > 0.5
    inp.sign = (inp.ver.float() * 2 - 1).repeat_interleave(n // b)
    if case != "logits-gated" and case != "sampled":
        inp.sign = torch.zeros_like(inp.sign)  # no verifier: the gate is off
    return inp


# ---------------------------------------------------------------------------
# providers: each returns (forward, tensors whose .grad backward fills) or raises Skip

def sgopd_provider(ctx, case, inp, prov):
    backend = prov.split("-", 1)[1]
    leaf = inp.hs if case == "linear-rkl" else inp.s
    try:
        sk.resolve_backend(backend, leaf.device, leaf.dtype)
    except (RuntimeError, ValueError) as e:  # not available here, or not known to this build
        raise Skip(str(e)) from None
    if case == "linear-rkl":
        def forward():
            return sk.fused_linear_gated_opd_loss(inp.hs, inp.ws, inp.ht, inp.wt, inp.tok,
                                                  backend=backend)
        return forward, [inp.hs, inp.ws]
    lead, vocab = inp.lead, inp.s.shape[-1]
    tok = inp.tok.view(lead)
    if case == "sampled":
        tlp = inp.tlp.view(lead)

        def forward():
            return sk.sampled_opd_loss(inp.s.view(*lead, vocab), tlp, tok, inp.ver,
                                       extrapolation=LAM_POS, interpolation=LAM_NEG,
                                       backend=backend)
        return forward, [inp.s]
    kw = {"logits-rkl": dict(divergence="reverse_kl"),
          "logits-fkl": dict(divergence="forward_kl"),
          "logits-gated": dict(divergence="reverse_kl", beta=BETA, extrapolation=LAM_POS,
                               interpolation=LAM_NEG, return_stats=True)}[case]
    ver = inp.ver if case == "logits-gated" else None
    t = inp.t.view(*lead, inp.t.shape[-1])

    def forward():
        out = sk.gated_opd_loss(inp.s.view(*lead, vocab), t, tok, ver, backend=backend, **kw)
        return out[0] if isinstance(out, tuple) else out
    return forward, [inp.s]


def torch_provider(ctx, case, inp, compiled):
    if compiled and not ctx.on_gpu and not ctx.args.compile_cpu:
        raise Skip("torch.compile on the CPU is slow: pass --compile-cpu to include it")
    if case == "linear-rkl":
        fn = torch.compile(eager_linear, dynamic=False) if compiled else eager_linear
        return (lambda: fn(inp.hs, inp.ws, inp.ht, inp.wt)), [inp.hs, inp.ws]

    def loss(s, t, tok, sign):
        return eager_loss(s, t, tok, sign, case)
    fn = torch.compile(loss, dynamic=False) if compiled else loss
    t = inp.tlp if case == "sampled" else inp.t
    return (lambda: fn(inp.s, t, inp.tok, inp.sign)[0]), [inp.s]


def liger_provider(ctx, case, inp):
    if case in ("logits-gated", "sampled"):
        raise Skip("Liger-Kernel has no sign-gated bridge or sampled-token OPD loss")
    if not ctx.on_gpu and not ctx.args.interpret:
        raise Skip("Liger-Kernel's Triton kernels need CUDA tensors (or --interpret on a CPU)")
    try:
        if case == "logits-rkl":  # generalized JSD, beta=1: KL(student || teacher), on log-probs
            from liger_kernel.transformers.jsd import LigerJSD
            fn = LigerJSD(beta=1.0)
        elif case == "logits-fkl":  # KLDivLoss(log p_S, log p_T) = KL(teacher || student)
            from liger_kernel.transformers.kl_div import LigerKLDIVLoss
            fn = LigerKLDIVLoss(reduction="batchmean", log_target=True)
        else:
            from liger_kernel.transformers.fused_linear_jsd import LigerFusedLinearJSD
            fn = LigerFusedLinearJSD(jsd_beta=1.0)
    except Exception as e:  # not installed, or an API that moved
        raise Skip(f"Liger-Kernel is not usable here ({type(e).__name__}: {e})") from None
    if case == "linear-rkl":
        return (lambda: fn(inp.hs, inp.ws, inp.ht, inp.wt, None)), [inp.hs, inp.ws]
    vocab = inp.s.shape[-1]

    def forward():  # Liger takes log-probabilities: their log_softmax is part of its time
        return fn(torch.log_softmax(inp.s, dim=-1), torch.log_softmax(inp.t[:, :vocab], dim=-1))
    return forward, [inp.s]


def trl_provider(ctx, case, inp):
    if case != "linear-rkl":
        raise Skip("TRL's ChunkedDivergenceFunction takes hidden states and LM heads: "
                   "see linear-rkl")
    try:  # on CUDA it runs Triton kernels; on a CPU its torch fallback
        from trl.kernels.chunked_divergence import ChunkedDivergenceFunction
    except Exception as e:
        raise Skip(f"trl.kernels.chunked_divergence is not importable ({type(e).__name__}: {e})") \
            from None

    def forward():  # beta=1.0: reverse KL(student || teacher); per-token divergence and entropy
        divergence, _entropy = ChunkedDivergenceFunction.apply(
            inp.hs, inp.ws, None, inp.ht, inp.wt, None, 1.0)
        return divergence.mean()
    return forward, [inp.hs, inp.ws]


def build_provider(ctx, case, inp, prov):
    if prov in SGOPD:
        return sgopd_provider(ctx, case, inp, prov)
    if prov in ("torch-eager", "torch-compile"):
        return torch_provider(ctx, case, inp, compiled=prov == "torch-compile")
    if prov == "liger":
        return liger_provider(ctx, case, inp)
    return trl_provider(ctx, case, inp)


# ---------------------------------------------------------------------------
# timing and memory

def _quantile(xs, q):
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def time_ms(ctx, fn, grads):
    """[median, p20, p80] in ms: do_bench on a GPU, perf_counter repetitions on the CPU."""
    if ctx.on_gpu:
        from triton.testing import do_bench
        return list(do_bench(fn, warmup=ctx.args.warmup, rep=ctx.args.rep,
                             grad_to_none=grads or None, quantiles=[0.5, 0.2, 0.8]))
    fn()  # untimed: first-call costs (autograd threads, allocations)
    times, deadline = [], time.perf_counter() + ctx.args.rep / 1e3
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 50):
        for x in grads:
            x.grad = None
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return [_quantile(times, q) for q in (0.5, 0.2, 0.8)]


def peak_gb(ctx, fn, grads):
    """Peak memory of one call above what was allocated before it (GB), None on the CPU."""
    if not ctx.on_gpu:
        return None
    for x in grads:
        x.grad = None
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    for x in grads:
        x.grad = None
    return peak / 1e9


def free_memory(ctx):
    gc.collect()
    if ctx.on_gpu:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def copy_bandwidth(ctx):
    """Device-to-device copy bandwidth, bytes/s: (bytes read + bytes written) / time."""
    nbytes = 256 << 20
    if ctx.on_gpu:
        nbytes = min(2 << 30, int(torch.cuda.mem_get_info()[0] * 0.4))
    src = torch.ones(nbytes, dtype=torch.uint8, device=ctx.device)
    dst = torch.empty_like(src)
    ms = time_ms(ctx, lambda: dst.copy_(src), [])[0]
    del src, dst
    free_memory(ctx)
    return 2 * nbytes / (ms * 1e-3)


def gemm_floor(ctx, inp):
    """The 2 (fwd) and 4 (fwd_bwd) N x H x V GEMMs of a fused linear loss (torch.matmul)."""
    hs, ws, ht, wt = (x.detach() for x in (inp.hs, inp.ws, inp.ht, inp.wt))
    zs = hs.new_empty(hs.shape[0], ws.shape[0])
    zt, gh, gw = torch.empty_like(zs), torch.empty_like(hs), torch.empty_like(ws)

    def fwd():
        torch.matmul(hs, ws.t(), out=zs)
        torch.matmul(ht, wt.t(), out=zt)

    def fwd_bwd():
        fwd()
        torch.matmul(zs, ws, out=gh)  # zs stands in for dL/dlogits: d hidden and d weight
        torch.matmul(zs.t(), hs, out=gw)
    return {"fwd": time_ms(ctx, fwd, []), "fwd_bwd": time_ms(ctx, fwd_bwd, [])}


def speed_of_light(ctx, case, inp, n, vocab, elt):
    """{mode: [ms, p20, p80]}: the time of the bytes the loss must move at the measured copy
    bandwidth; for linear-rkl the GEMM floor."""
    if case == "linear-rkl":
        return gemm_floor(ctx, inp)
    reads = {"fwd": 1, "fwd_bwd": 2} if case == "sampled" else {"fwd": 2, "fwd_bwd": 3}
    return {m: [k * n * vocab * elt / ctx.bandwidth * 1e3] * 3 for m, k in reads.items()}


def needed_bytes(ctx, case, n, vocab, elt):
    """Inputs and gradients of one combo (a lower bound on what it needs)."""
    if case == "linear-rkl":
        h = ctx.h
        return elt * (3 * (n * h + vocab * h) + 2 * n * vocab)  # + grads + GEMM-floor outputs
    teacher = 0 if case == "sampled" else n * (vocab + 128 * ctx.args.teacher_pad)
    return elt * (2 * n * vocab + teacher)


# ---------------------------------------------------------------------------
# one shape

def _reason(e):
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return "out of GPU memory"
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"


def measure(ctx, prov, forward, grads, ref, dtype_name):
    """{mode: [ms, p20, p80, peak_gb]} of the modes that ran; the check: ok, mismatch or None."""
    def fwd_bwd():
        forward().backward()
    out, check, failed = {}, None, None
    try:
        loss = float(forward().detach())  # first call: compiles / autotunes; its value is checked
        if prov in CHECKED and ref is not None:
            rel = abs(loss - ref) / max(abs(ref), 1e-3)
            check = "ok" if rel < TOLERANCE[dtype_name] else "mismatch"
            if check == "mismatch":
                print(f"  WARNING: {prov} loss {loss:.6g} differs from torch-eager {ref:.6g} "
                      f"(relative {rel:.2e} > {TOLERANCE[dtype_name]:g}); timed anyway, "
                      "recorded with check=mismatch", flush=True)
        for mode, fn in (("fwd", forward), ("fwd_bwd", fwd_bwd)):
            ms = time_ms(ctx, fn, grads)
            out[mode] = ms + [peak_gb(ctx, fn, grads)]
    except Exception as e:  # out of memory, a competitor's API mismatch, a compile failure, ...
        failed = _reason(e)
    for x in grads:
        x.grad = None
    free_memory(ctx)
    if failed:
        print(f"  {prov:<15} failed, {', '.join(out) or 'nothing'} measured: {failed}", flush=True)
    return out, check


def run_shape(ctx, case, n, vocab, dtype_name, providers):
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    elt = torch.finfo(dtype).bits // 8
    h = ctx.h if case == "linear-rkl" else None
    if ctx.on_gpu:
        need, avail = needed_bytes(ctx, case, n, vocab, elt), torch.cuda.mem_get_info()[0]
        if need > 0.9 * avail:
            print(f"  skip: needs ~{need / 1e9:.1f} GB for inputs and gradients, "
                  f"{avail / 1e9:.1f} GB free", flush=True)
            return []
    v_t = vocab + 128 if ctx.args.teacher_pad and case in LOGITS_CASES[:3] else vocab
    if "torch-compile" in providers:
        torch._dynamo.reset()  # a fresh torch.compile per shape: no silent fall-back to eager
    try:
        inp = make_inputs(ctx, case, n, vocab, dtype)
        ref = reference_loss(inp, case)
    except torch.cuda.OutOfMemoryError:
        inp = None
    if inp is None:
        free_memory(ctx)
        print("  skip: out of GPU memory creating the inputs or the eager reference", flush=True)
        return []
    records = []
    for prov in providers:
        if prov == "speed-of-light":
            result, check = {}, None
            try:
                result = {m: v + [None] for m, v in speed_of_light(ctx, case, inp, n, vocab,
                                                                   elt).items()}
            except Exception as e:  # the GEMM floor's buffers may not fit
                print(f"  {prov:<15} failed: {_reason(e)}", flush=True)
            free_memory(ctx)
        else:
            try:
                forward, grads = build_provider(ctx, case, inp, prov)
            except Skip as e:
                if (case, prov) not in ctx.told:
                    ctx.told.add((case, prov))
                    print(f"  {prov:<15} skipped for {case}: {e}", flush=True)
                continue
            result, check = measure(ctx, prov, forward, grads, ref, dtype_name)
            del forward, grads
        for mode, (ms, p20, p80, peak) in result.items():
            records.append(dict(ctx.meta, case=case, provider=prov, N=n, V=vocab, H=h,
                                dtype=dtype_name, mode=mode, ms=ms, p20=p20, p80=p80, peak_gb=peak,
                                bandwidth_tbs=ctx.bandwidth / 1e12, check=check, V_T=v_t))
        if result:
            line = "".join(f"   {m} {result[m][0]:9.3f} ms" for m in MODES if m in result)
            peaks = [f"{result[m][3]:.2f}" for m in MODES
                     if result.get(m, [None] * 4)[3] is not None]
            mem = f"   peak {' / '.join(peaks)} GB" if peaks else ""
            print(f"  {prov:<15}{line}{mem}", flush=True)
    del inp
    free_memory(ctx)
    return records


# ---------------------------------------------------------------------------
# output

def print_table(records):
    if not records:
        print("\nno measurements")
        return
    by = {}
    for r in records:
        by.setdefault((r["case"], r["N"], r["V"], r["H"], r["dtype"]), {}).setdefault(
            r["provider"], {})[r["mode"]] = r
    head = (f"{'case':<13}{'N':>6}{'V':>7} {'dtype':<5} {'provider':<15}"
            f"{'fwd ms [p20, p80]':>27}{'fwd+bwd ms [p20, p80]':>29}"
            f"{'x compile f/fb':>16}{'% SoL f/fb':>15}{'GB f/fb':>13}  check")
    print("\n" + head + "\n" + "-" * len(head))
    for (case, n, vocab, _h, dt), provs in by.items():
        comp, sol = provs.get("torch-compile", {}), provs.get("speed-of-light", {})
        for prov, modes in provs.items():
            cells = []
            for m in MODES:
                r = modes.get(m)
                cells.append("-" if r is None
                             else f"{r['ms']:.3f} [{r['p20']:.3f}, {r['p80']:.3f}]")

            def ratio(ref, scale, m):
                r = modes.get(m)
                return f"{scale * ref[m]['ms'] / r['ms']:.2f}" if r and m in ref else "-"
            x = "/".join(ratio(comp, 1, m) for m in MODES)
            pct = "/".join(ratio(sol, 100, m) for m in MODES)
            gb = "/".join("-" if modes.get(m, {}).get("peak_gb") is None
                          else f"{modes[m]['peak_gb']:.2f}" for m in MODES)
            check = next((r["check"] for r in modes.values() if r.get("check")), "")
            print(f"{case:<13}{n:>6}{vocab:>7} {dt:<5} {prov:<15}{cells[0]:>27}{cells[1]:>29}"
                  f"{x:>16}{pct:>15}{gb:>13}  {check}")
    print("x compile: torch.compile time / this time; % SoL: speed-of-light time / this time "
          "(linear-rkl: the GEMM floor); GB: peak memory above the inputs.")


def git_commit():
    root = str(HERE.parent)
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", ".",
                                ":(exclude)benchmarks/results"], cwd=root, capture_output=True,
                               text=True, check=True).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except Exception:
        return None


def triton_version():
    try:
        import triton
        return triton.__version__
    except Exception:
        return None


def main(args):
    on_gpu = torch.cuda.is_available() and not args.cpu and not args.interpret
    device = torch.device("cuda" if on_gpu else "cpu")
    gpu = re.sub(r"[^A-Za-z0-9_.-]", "_", torch.cuda.get_device_name(device)) if on_gpu else "cpu"
    meta = dict(gpu=gpu, commit=git_commit(),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                torch=torch.__version__, triton=triton_version())
    ctx = SimpleNamespace(args=args, on_gpu=on_gpu, device=device, meta=meta, told=set(),
                          h=args.H or (GPU_H if on_gpu else CPU_H))
    (ns, vs), dts, cases = (FULL_N, FULL_V) if on_gpu else (CPU_N, CPU_V), DTYPES, CASES
    if not on_gpu:
        print(CPU_NOTE + (" (--quick is a GPU preset)" if args.quick else ""), flush=True)
    elif args.quick:
        ns, vs, dts, cases = QUICK_N, QUICK_V, ("bf16",), LOGITS_CASES[:3]
    ns, vs, dts, cases = args.N or ns, args.V or vs, args.dtype or dts, args.cases or cases
    record = not args.no_record and (on_gpu or args.record)
    out_file = RESULTS / f"{gpu}.jsonl"
    print(f"device {gpu}, torch {meta['torch']}, triton {meta['triton']}, commit {meta['commit']}"
          + (", TRITON_INTERPRET=1" if args.interpret else ""), flush=True)
    ctx.bandwidth = copy_bandwidth(ctx)
    print(f"copy bandwidth {ctx.bandwidth / 1e12:.3f} TB/s (read + write)", flush=True)

    combos = [(c, n, v, d) for c in cases if c != "linear-rkl"
              for n in ns for v in vs for d in dts]
    if "linear-rkl" in cases:
        lin_n, lin_v = ((LINEAR_N,), (LINEAR_V,)) if on_gpu else (ns, vs)
        combos += [("linear-rkl", n, v, d) for n in (args.N or lin_n)
                   for v in (args.V or lin_v) for d in dts]
    records = []
    for i, (case, n, vocab, dt) in enumerate(combos, 1):
        h = f" H={ctx.h}" if case == "linear-rkl" else ""
        print(f"[{i}/{len(combos)}] {case} N={n} V={vocab}{h} {dt}", flush=True)
        new = run_shape(ctx, case, n, vocab, dt, args.providers)
        records += new
        if record and new:
            RESULTS.mkdir(parents=True, exist_ok=True)
            with open(out_file, "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in new)
    print_table(records)
    if record:
        print(f"appended {len(records)} lines to {out_file}")
    elif not on_gpu:
        print("not recorded (CPU): pass --record to append to " + str(out_file))
    if args.plot:
        sys.path.insert(0, str(HERE))
        import plot_results
        if record:
            plot_results.plot_file(out_file)
        else:
            plot_results.plot_records(records, RESULTS, gpu)
    if not on_gpu:
        print(CPU_NOTE)


if __name__ == "__main__":
    main(ARGS)
