#!/usr/bin/env python
"""Time the logits kernels' forward and backward launches over block sizes and warp counts.

The library's launch settings (``FWD_BLOCK_V``/``FWD_WARPS`` and
``BWD_BLOCK_V``/``BWD_WARPS`` in ``sgopd_kernels/triton/logits.py``) should be
the fastest of this sweep on the GPU they target. It times the two kernels
alone (``triton.testing.do_bench``, median with p20 and p80), for reverse KL,
forward KL and both with the gate and beta, checks every configuration's row
table and gradient against the default configuration's (a launch setting must
not change the numbers beyond rounding), prints a table with the % of the
speed of light of each kernel's bytes, times the two designs of the backward
(recompute, as the library does, or the gradient written in forward and
scaled in backward), and appends JSON lines to
``benchmarks/results/<gpu>_sweep.jsonl``.

    python benchmarks/sweep_blocks.py                          # N=8192 V=151936 bf16
    python benchmarks/sweep_blocks.py --N 4096 --V 32000 --dtype fp32
    python benchmarks/sweep_blocks.py --interpret --N 4 --V 300 --blocks 64,128 --warps 1,2

Without a GPU it needs ``--interpret`` (the Triton interpreter on CPU
tensors): a smoke test whose timings say nothing about GPU speed.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial

import torch

import harness


def kernels(case, s, t, tok, sign, grad_rows):
    """The logits kernels of a sweep case (rkl, fkl, rkl-gated, fkl-gated): the only calls of
    their launchers. Returns ``forward(**launch)`` (the row table), ``backward(rows, **launch)``
    (the gradient) and the row-table columns a launch setting must not change; ``launch``:
    ``block_v``, ``num_warps``."""
    from sgopd_kernels import _rows as C
    from sgopd_kernels.api import row_options
    from sgopd_kernels.triton import logits as K

    gated = case.endswith("gated")
    opts = row_options(divergence="reverse_kl" if case.startswith("rkl") else "forward_kl",
                       beta=0.1 if gated else 0.0, extrapolation=1.8, interpolation=1.0)
    sg = sign if gated else None

    def forward(**launch):
        return K.opd_rows(s, t, tok, sg, opts, **launch)

    def backward(rows, **launch):
        return K.opd_rows_backward(grad_rows, s, t, tok, rows, opts, **launch)
    # the loss, statistics and bridge coefficients (the saved frame depends on the first block,
    # so its columns differ)
    compared = [C.LOSS, C.DELTA, C.GATE, C.TEACHER_KL, C.ENTROPY, C.A, C.B]
    return forward, backward, compared


def parse_args(argv=None):
    ints = lambda text: tuple(int(x) for x in text.split(",") if x.strip())  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--N", type=int, default=8192)
    p.add_argument("--V", type=int, default=151936)
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    p.add_argument("--blocks", type=ints, default=(1024, 2048, 4096, 8192))
    p.add_argument("--warps", type=ints, default=(4, 8, 16))
    p.add_argument("--cases", default="rkl,fkl,rkl-gated,fkl-gated")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition time, ms")
    p.add_argument("--no-record", action="store_true")
    p.add_argument("--interpret", action="store_true",
                   help="CPU: run the kernels in the Triton interpreter (a smoke test)")
    return p.parse_args(argv)


def design(ctx, meta, case, forward, backward, rows):
    """Recompute in backward (this library) against writing the gradient in forward.

    With the default launch settings: the forward kernel, the backward kernel, and the
    pass a stored gradient needs when grad_output is not 1 (read and write it once, scaled
    by a device scalar). Recompute: forward = fwd, training step = fwd + bwd. Store:
    forward = fwd + bwd (the gradient is written there), training step = the same, plus
    the scaling pass when grad_output != 1. Evaluation runs the forward only.
    """
    t_f = harness.time_ms(ctx, forward, [])[0]
    t_b = harness.time_ms(ctx, lambda: backward(rows), [])[0]
    stored = backward(rows)
    factor = torch.ones((), device=stored.device)
    t_s = harness.time_ms(ctx, lambda: stored.mul_(factor), [])[0]
    rec = dict(meta, case=case, kernel="design", fwd_ms=t_f, bwd_ms=t_b, scale_ms=t_s,
               recompute_eval_ms=t_f, recompute_step_ms=t_f + t_b,
               store_eval_ms=t_f + t_b, store_step_ms=t_f + t_b,
               store_step_scaled_ms=t_f + t_b + t_s)
    print(f"  {case:<10} design: recompute eval {t_f:.3f} / step {t_f + t_b:.3f} ms; "
          f"store-in-forward eval {t_f + t_b:.3f} / step {t_f + t_b:.3f} ms "
          f"(+{t_s:.3f} ms when grad_output != 1)", flush=True)
    return rec


def main(argv=None):
    args = parse_args(argv)
    if not args.interpret and not torch.cuda.is_available():
        print("no GPU: pass --interpret to run the kernels in the Triton interpreter")
        return 2
    harness.setup(args.interpret)  # before triton is first imported
    # the harness's timing: do_bench on a GPU, perf_counter repetitions on a CPU
    ctx = harness.context(argparse.Namespace(rep=args.rep, warmup=25), cpu=args.interpret)
    on_gpu, dev, gpu = ctx.on_gpu, ctx.device, ctx.meta["gpu"]
    dtype = harness.TORCH_DTYPES[args.dtype]
    n, vocab = args.N, args.V
    gen = torch.Generator(device=dev).manual_seed(0)
    s = torch.randn(n, vocab, device=dev, generator=gen).mul_(3).to(dtype)
    t = torch.randn(n, vocab, device=dev, generator=gen).mul_(3).to(dtype)
    tok = torch.randint(0, vocab, (n,), device=dev, generator=gen)
    sign = torch.where(torch.rand(n, device=dev, generator=gen) > 0.5, 1.0, -1.0)
    grow = torch.full((n,), 1.0 / n, device=dev)
    bw = harness.copy_bandwidth(ctx)
    elt = s.element_size()
    sol = {"fwd": 2 * n * vocab * elt / bw * 1e3, "bwd": 3 * n * vocab * elt / bw * 1e3}
    meta = dict(ctx.meta, N=n, V=vocab, dtype=args.dtype, bandwidth_tbs=bw / 1e12)
    print(f"{harness.describe(meta)}, N={n} V={vocab} {args.dtype}, "
          f"copy bandwidth {bw / 1e12:.3f} TB/s")
    if not on_gpu:
        print("NOTE: interpreted on a CPU: these timings say nothing about GPU speed.")
    records = []
    for case in args.cases.split(","):
        forward, backward, compared = kernels(case, s, t, tok, sign, grow)
        base_rows = forward()
        base_grad = backward(base_rows).float()
        for block in args.blocks:
            for warps in args.warps:
                if block < 32 * warps:
                    continue
                for kernel in ("fwd", "bwd"):
                    launch = dict(block_v=block, num_warps=warps)
                    fn = (partial(forward, **launch) if kernel == "fwd"
                          else partial(backward, base_rows, **launch))
                    try:
                        out = fn().float()
                        if kernel == "fwd":
                            out, want = out[:, compared], base_rows[:, compared]
                        else:
                            want = base_grad
                        ok = torch.allclose(out, want, rtol=1e-4, atol=1e-5, equal_nan=True)
                        ms, p20, p80 = harness.time_ms(ctx, fn, [])
                    except Exception as e:  # e.g. out of resources for a large block
                        print(f"  {case:<10} {kernel} BLOCK_V={block:<5} warps={warps:<2} "
                              f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
                        continue
                    rec = dict(meta, case=case, kernel=kernel, block_v=block, num_warps=warps,
                               ms=ms, p20=p20, p80=p80, pct_sol=100 * sol[kernel] / ms,
                               check="ok" if ok else "mismatch")
                    records.append(rec)
                    print(f"  {case:<10} {kernel} BLOCK_V={block:<5} warps={warps:<2} "
                          f"{ms:8.3f} ms [{p20:.3f}, {p80:.3f}]  {rec['pct_sol']:5.1f}% SoL  "
                          f"{rec['check']}", flush=True)
        records.append(design(ctx, meta, case, forward, backward, base_rows))
    for case in args.cases.split(","):
        for kernel in ("fwd", "bwd"):
            rs = [r for r in records if r["case"] == case and r["kernel"] == kernel
                  and r["check"] == "ok"]
            if rs:
                best = min(rs, key=lambda r: r["ms"])
                print(f"best {case:<10} {kernel}: BLOCK_V={best['block_v']} "
                      f"warps={best['num_warps']} {best['ms']:.3f} ms")
    if on_gpu and not args.no_record and records:
        out = harness.RESULTS / f"{gpu}_sweep.jsonl"
        harness.append_jsonl(out, records)
        print(f"appended {len(records)} lines to {out}")
    return 1 if any(r.get("check") == "mismatch" for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
