#!/usr/bin/env python
"""Speed of the compiled kernels (csrc/, ``sgopd_kernels.compiled``) beside eager PyTorch
and the library's other backends, in one process, on the same inputs.

The public losses run these kernels (``backend="cpu"``/``"cuda"``, which
``bench_loss.py`` measures as ``sgopd-cpu``/``sgopd-cuda``) with the gradient
written in forward; this script calls the backend directly, to time both
designs of its gradient side by side:

- ``compiled``: the gradient written in forward (``opd_rows_grad`` with the mean's
  coefficient 1/count per row), the backward only ``scale_grad_`` (which does
  nothing when grad_output is 1, as in ``loss.backward()``);
- ``compiled-recompute``: ``opd_rows`` in forward, ``opd_rows_backward`` in backward.

Each provider's loss is checked against eager PyTorch before it is timed (that
call is the warm-up). CPU: ``time.perf_counter``, the providers taking turns for
``--reps`` rounds (a change of the machine's load falls on all alike), median and
minimum per provider;
CUDA: ``triton.testing.do_bench`` medians, and the speed of light (3 units read and
written at the copy bandwidth measured in the same run).

    python benchmarks/bench_compiled.py                       # CPU: N=512, V=32000, fp32 and bf16
    python benchmarks/bench_compiled.py --device cuda --N 8192 --V 151936 --dtype bf16
    python benchmarks/bench_compiled.py --record              # append to results/<device>-compiled.jsonl
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sk = compiled = None  # the library, imported by main() (importing this script does no work)

CASES = ("logits-rkl", "logits-fkl", "logits-gated", "logits-jsd", "sampled")
PROVIDERS = ("compiled", "compiled-recompute", "torch-eager", "sgopd-torch", "sgopd-triton",
             "speed-of-light")
BETA, LAM_POS, LAM_NEG = 0.1, 1.8, 1.0
DIV = {"logits-rkl": 0, "logits-fkl": 1, "logits-gated": 0, "logits-jsd": 2}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--N", default="512", help="rows, comma-separated")
    p.add_argument("--V", default="32000", help="vocabulary sizes, comma-separated")
    p.add_argument("--dtype", default="fp32,bf16")
    p.add_argument("--cases", default="logits-rkl")
    p.add_argument("--providers", default=",".join(PROVIDERS))
    p.add_argument("--reps", type=int, default=7, help="CPU: timed runs per measurement")
    p.add_argument("--threads", type=int, default=None, help="CPU: torch.set_num_threads")
    p.add_argument("--record", action="store_true",
                   help="append to benchmarks/results/<device>-compiled.jsonl")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------
# the losses

def _opts(case):
    return dict(divergence=DIV.get(case, 0), beta=BETA if case == "logits-gated" else 0.0,
                lam_pos=LAM_POS, lam_neg=LAM_NEG, jsd_beta=0.5, temperature=1.0,
                teacher_temperature=None, ignore_index=-100)


class _Stored(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s, t, tok, sign, opts, sampled):
        valid = tok != -100
        count = valid.sum().clamp(min=1).to(torch.float32)
        coef = (valid.to(torch.float32) / count)
        fn = compiled.sampled_rows_grad if sampled else compiled.opd_rows_grad
        table, grad = fn(s, t, tok, sign, coef, opts)
        ctx.grad = grad
        return (table[:, 0] * valid).sum() / count

    @staticmethod
    def backward(ctx, g):
        grad, ctx.grad = ctx.grad, None
        return compiled.scale_grad_(grad, g), None, None, None, None, None


class _Recompute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s, t, tok, sign, opts, sampled):
        ctx.save_for_backward(s, t, tok)
        ctx.opts, ctx.sampled = opts, sampled
        fn = compiled.sampled_rows if sampled else compiled.opd_rows
        ctx.table = fn(s, t, tok, sign, opts)
        valid = tok != -100
        ctx.count = valid.sum().clamp(min=1).to(torch.float32)
        return (ctx.table[:, 0] * valid).sum() / ctx.count

    @staticmethod
    def backward(ctx, g):
        s, t, tok = ctx.saved_tensors
        gr = ((tok != -100).to(torch.float32) * (g / ctx.count)).contiguous()
        if ctx.sampled:
            out = compiled.sampled_rows_backward(gr, s, t, tok, ctx.table, ctx.opts)
        else:
            out = compiled.opd_rows_backward(gr, s, t, tok, ctx.table, ctx.opts)
        return out, None, None, None, None, None


def eager(s, t, tok, sign, case):
    """The formula of bench_loss.py's torch-eager provider (float32 math), mean over rows."""
    lp_s = torch.log_softmax(s.float(), dim=-1)
    if case == "sampled":
        lp_s_y = lp_s.gather(-1, tok[:, None])[:, 0]
        delta = t.float() - lp_s_y.detach()
        g = torch.sign(delta) * sign
        lam = 1.0 + (g > 0) * (LAM_POS - 1.0) + (g < 0) * (LAM_NEG - 1.0)
        return (-(lam * delta) * lp_s_y).mean()
    lp_t = torch.log_softmax(t[:, : s.shape[-1]].float(), dim=-1)
    p_s = lp_s.exp()
    if case == "logits-rkl":
        return (p_s * (lp_s - lp_t)).sum(-1).mean()
    if case == "logits-fkl":
        return (lp_t.exp() * (lp_t - lp_s)).sum(-1).mean()
    if case == "logits-jsd":
        lm = torch.logaddexp(lp_s + torch.log(torch.tensor(0.5)), lp_t + torch.log(
            torch.tensor(0.5)))
        return (0.5 * (lp_t.exp() * (lp_t - lm)).sum(-1) + 0.5 * (p_s * (lp_s - lm)).sum(-1)
                ).mean()
    lp_s_d = lp_s.detach()
    delta = (lp_t.gather(-1, tok[:, None]) - lp_s_d.gather(-1, tok[:, None]))[:, 0]
    g = torch.sign(delta) * sign
    lam = (1.0 + (g > 0) * (LAM_POS - 1.0) + (g < 0) * (LAM_NEG - 1.0))[:, None]
    log_q = torch.log_softmax(lam * lp_t + (1.0 - lam + BETA) * lp_s_d, dim=-1)
    return (p_s * (lp_s - log_q)).sum(-1).mean()


def provider(name, case, inp, device):
    from types import SimpleNamespace

    s, t, tok, sign = inp
    sampled = case == "sampled"
    gate = sign if case in ("logits-gated", "sampled") else None
    opts = SimpleNamespace(**_opts(case))
    if name == "compiled":  # without autograd (evaluation) the forward writes no gradient
        return lambda: (_Stored if torch.is_grad_enabled() else _Recompute).apply(
            s, t, tok, gate, opts, sampled)
    if name == "compiled-recompute":
        return lambda: _Recompute.apply(s, t, tok, gate, opts, sampled)
    if name == "torch-eager":
        return lambda: eager(s, t, tok, sign if gate is not None else torch.zeros_like(sign),
                             case)
    backend = name.split("-", 1)[1]
    if (backend == "torch") != (device == "cpu") or case == "logits-jsd":
        return None
    kw = dict(backend=backend)
    ver = (sign > 0) if gate is not None else None
    if sampled:
        return lambda: sk.sampled_opd_loss(s, t, tok, ver, extrapolation=LAM_POS,
                                           interpolation=LAM_NEG, **kw)
    extra = dict(divergence="forward_kl" if case == "logits-fkl" else "reverse_kl")
    if case == "logits-gated":
        extra.update(beta=BETA, extrapolation=LAM_POS, interpolation=LAM_NEG)
    return lambda: sk.gated_opd_loss(s, t, tok, ver, **extra, **kw)


# ---------------------------------------------------------------------------
# timing

def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, leaf, device, reps):
    """(median, min) in ms."""
    if device == "cuda":
        from triton.testing import do_bench
        med, lo = do_bench(fn, grad_to_none=[leaf], quantiles=[0.5, 0.0])
        return med, lo
    times = []
    for _ in range(reps):
        leaf.grad = None
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), min(times)


def machine(device):
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = next(line.split(":", 1)[1].strip() for line in out.splitlines()
                    if line.startswith("Model name"))
        cores = torch.get_num_threads()
        return f"{name}, {cores} threads"
    except Exception:
        return platform.processor() or "cpu"


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=HERE).stdout.strip() or None
    except Exception:
        return None


def main(args):
    global sk, compiled
    sys.path.insert(0, str(HERE.parent))  # benchmark this checkout, whose commit is recorded
    import sgopd_kernels as sk
    from sgopd_kernels import compiled
    device = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    if not compiled.available(device):
        sys.exit(f"the compiled kernels for {device} are not available: {compiled.build_info()}")
    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                machine=machine(device), torch=torch.__version__, commit=git_commit(),
                python=platform.python_version(), build=compiled.build_info().get("cpu_isa"))
    print(json.dumps(meta))
    bandwidth = None
    if device == "cuda" and "speed-of-light" in args.providers:
        from triton.testing import do_bench
        src = torch.ones(1 << 30, dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        bandwidth = 2 * src.numel() / (do_bench(lambda: dst.copy_(src)) * 1e-3)
        del src, dst
        print(f"copy bandwidth {bandwidth / 1e12:.3f} TB/s")
    records = []
    gen = torch.Generator(device=device).manual_seed(0)
    shapes = [(int(n), int(v)) for n in args.N.split(",") for v in args.V.split(",")]
    combos = [(c, d, n, v) for c in args.cases.split(",") for n, v in shapes
              for d in args.dtype.split(",")]
    for case, dt, n, vocab in combos:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dt]
        s = (3 * torch.randn(n, vocab, device=device, generator=gen)).to(dtype)
        s.requires_grad_(True)
        t = (-15 * torch.rand(n, device=device, generator=gen) if case == "sampled" else
             (3 * torch.randn(n, vocab, device=device, generator=gen)).to(dtype))
        tok = torch.randint(0, vocab, (n,), device=device, generator=gen)
        sign = (torch.rand(n, device=device, generator=gen) > 0.5).float() * 2 - 1
        with torch.no_grad():
            ref = float(eager(s, t, tok, sign, case))
        print(f"{case} N={n} V={vocab} {dt}")
        fns, checks = {}, {}
        for name in args.providers.split(","):
            if name == "speed-of-light":
                if bandwidth:
                    units = 2 if case == "sampled" else 3
                    ms = units * n * vocab * s.element_size() / bandwidth * 1e3
                    print(f"  {name:<20} fwd+bwd {ms:8.3f} ms")
                    records.append(dict(meta, case=case, N=n, V=vocab, dtype=dt,
                                        provider=name, mode="fwd_bwd", ms=ms))
                continue
            fn = provider(name, case, (s, t, tok, sign), device)
            if fn is None:
                continue
            try:
                with torch.no_grad():
                    val = float(fn().detach())
            except Exception as e:  # a backend that cannot run here
                print(f"  {name:<20} skipped: {type(e).__name__}: {str(e).splitlines()[0]}")
                continue
            ok = abs(val - ref) / max(abs(ref), 1e-3) < (1e-2 if dt == "bf16" else 1e-4)
            fns[name] = fn
            checks[name] = "ok" if ok else f"MISMATCH loss {val:.6g} vs eager {ref:.6g}"
        res = {name: {"fwd": [], "fwd_bwd": []} for name in fns}
        # CPU: the providers take turns, run after run, so a change in the machine's load
        # falls on all of them alike; CUDA: do_bench per provider
        names = list(fns)
        for rnd in range(args.reps if device == "cpu" else 1):
            # the order turns too: the provider after a memory-hungry one pays for the
            # pages the system took back (first-touch faults), so that cost is spread
            for name in names[rnd % len(names):] + names[:rnd % len(names)]:
                fn = fns[name]
                with torch.no_grad():
                    res[name]["fwd"].append(time_ms(fn, s, device, 1))
                res[name]["fwd_bwd"].append(time_ms(lambda: fn().backward(), s, device, 1))
        summary = {}
        for name, modes in res.items():
            out = {}
            for mode, runs in modes.items():
                meds = [r[0] for r in runs]
                out[mode] = (statistics.median(meds), min(r[1] for r in runs))
                records.append(dict(meta, case=case, N=n, V=vocab, dtype=dt, provider=name,
                                    mode=mode, ms=out[mode][0], min_ms=out[mode][1],
                                    reps=len(runs), check=checks[name][:8].strip().lower()))
            summary[name] = out
            note = "" if checks[name] == "ok" else "  " + checks[name]
            print(f"  {name:<20} fwd {out['fwd'][0]:8.2f} ms (min {out['fwd'][1]:7.2f})   "
                  f"fwd+bwd {out['fwd_bwd'][0]:8.2f} ms (min {out['fwd_bwd'][1]:7.2f}){note}")
        if "torch-eager" in summary:
            e = summary["torch-eager"]["fwd_bwd"]
            for name, out in summary.items():
                if name != "torch-eager":
                    print(f"  {name:<20} {e[0] / out['fwd_bwd'][0]:5.1f}x eager (fwd+bwd "
                          f"medians), {e[1] / out['fwd_bwd'][1]:5.1f}x (minima)")
        del s, t
    if args.record:
        out = HERE / "results" / f"{'cpu' if device == 'cpu' else 'cuda'}-compiled.jsonl"
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        print(f"appended {len(records)} lines to {out}")


if __name__ == "__main__":
    main(parse_args())
