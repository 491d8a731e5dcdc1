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

This file is the command line; harness.py measures, providers.py holds who
computes a loss, cases/ what is computed (one module per loss family).
"""

from __future__ import annotations

import argparse

import harness
import plot_results
from cases import CASES, linear, logits
from providers import PROVIDERS

CASE = {c.name: c for c in CASES}
PROVIDER = {p.name: p for p in PROVIDERS}
DTYPES = ("bf16", "fp32")
FULL_N, FULL_V = (1024, 4096, 8192, 16384), (32000, 128256, 151936)
QUICK_N, QUICK_V = (8192,), (32000, 151936)
CPU_N, CPU_V = (64,), (1000, 4000)
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


def _own_shapes():
    return "; ".join(f"{c.name} at N={','.join(map(str, c.gpu_shapes[0]))} "
                     f"V={','.join(map(str, c.gpu_shapes[1]))}" for c in CASES if c.gpu_shapes)


def parse_args(argv=None):
    cases, providers = tuple(CASE), tuple(PROVIDER)
    p = argparse.ArgumentParser(
        description="Benchmark sgopd_kernels' losses (forward, forward+backward, peak memory) "
                    "beside eager PyTorch, torch.compile, Liger-Kernel, TRL and the speed of "
                    "light.",
        epilog=f"Default sweep on a GPU: N in {FULL_N} x V in {FULL_V} x bf16,fp32, cases "
               f"{', '.join(cases)} ({_own_shapes()}); on a CPU: N=64, V in 1000,4000.")
    p.add_argument("--N", type=_list(int), help="rows (tokens), comma-separated")
    p.add_argument("--V", type=_list(int), help="vocabulary sizes, comma-separated")
    p.add_argument("--H", type=int,
                   help=f"hidden size of linear-rkl (default {linear.GPU_H} on a GPU, "
                        f"{linear.CPU_H} on a CPU)")
    p.add_argument("--dtype", type=_list(str, DTYPES), help="bf16,fp32")
    p.add_argument("--cases", type=_list(str, cases), help=",".join(cases))
    p.add_argument("--providers", type=_list(str, providers), default=providers,
                   help=",".join(providers) + " (default: all)")
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


def main(argv=None):
    args = parse_args(argv)
    harness.setup(args.interpret)  # before triton is first imported
    ctx = harness.context(args, cpu=args.cpu or args.interpret)
    on_gpu, gpu = ctx.on_gpu, ctx.meta["gpu"]
    ctx.h = args.H or (linear.GPU_H if on_gpu else linear.CPU_H)
    (ns, vs), dts, cases = (FULL_N, FULL_V) if on_gpu else (CPU_N, CPU_V), DTYPES, CASES
    if not on_gpu:
        print(CPU_NOTE + (" (--quick is a GPU preset)" if args.quick else ""), flush=True)
    elif args.quick:
        ns, vs, dts, cases = QUICK_N, QUICK_V, ("bf16",), logits.CASES
    ns, vs, dts = args.N or ns, args.V or vs, args.dtype or dts
    cases = [CASE[name] for name in args.cases] if args.cases else cases
    providers = [PROVIDER[name] for name in args.providers]
    record = not args.no_record and (on_gpu or args.record)
    out_file = harness.RESULTS / f"{gpu}.jsonl"
    print(harness.describe(ctx.meta) + (", TRITON_INTERPRET=1" if args.interpret else ""),
          flush=True)
    ctx.bandwidth = harness.copy_bandwidth(ctx)
    print(f"copy bandwidth {ctx.bandwidth / 1e12:.3f} TB/s (read + write)", flush=True)

    combos = []
    for case in sorted(cases, key=lambda c: c.gpu_shapes is not None):  # own shapes last
        cns, cvs = case.gpu_shapes if on_gpu and case.gpu_shapes else (ns, vs)
        combos += [(case, n, v, d) for n in (args.N or cns) for v in (args.V or cvs) for d in dts]
    records = []
    for i, (case, n, vocab, dt) in enumerate(combos, 1):
        h = f" H={ctx.h}" if case.hidden else ""
        print(f"[{i}/{len(combos)}] {case.name} N={n} V={vocab}{h} {dt}", flush=True)
        new = harness.run_shape(ctx, case, n, vocab, dt, providers)
        records += new
        if record and new:
            harness.append_jsonl(out_file, new)
    harness.print_table(records)
    if record:
        print(f"appended {len(records)} lines to {out_file}")
    elif not on_gpu:
        print("not recorded (CPU): pass --record to append to " + str(out_file))
    if args.plot:
        if record:
            plot_results.plot_file(out_file)
        else:
            plot_results.plot_records(records, harness.RESULTS, gpu)
    if not on_gpu:
        print(CPU_NOTE)


if __name__ == "__main__":
    main()
