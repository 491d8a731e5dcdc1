"""The benchmark harness: what a case and a provider are, and how one shape is measured.

A case (``cases/``) builds the inputs of one loss and says what it computes; a
provider (``providers.py``) computes it. For each shape the harness builds the
inputs, computes the eager oracle, checks every checked provider's loss
against it, times the forward and the forward+backward (``do_bench`` on a GPU,
``time.perf_counter`` on a CPU), takes the peak memory, and makes one record
per measurement (with the GPU name, torch and triton versions, git commit and
date) for the JSONL file and the table.

Importing this module does no work: the scripts call :func:`setup` and
:func:`context` after parsing their arguments.
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import re
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Mapping, Optional

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
MODES = ("fwd", "fwd_bwd")
TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TOLERANCE = {"bf16": 1e-2, "fp32": 1e-4}  # relative difference of a checked loss from eager's
TEACHER_PAD = 128  # --teacher-pad: V_T = V + TEACHER_PAD


class Skip(Exception):
    """A provider that cannot run this case here; the message says why."""


@dataclass(frozen=True)
class Case:
    """One benchmarked loss, by the functions the harness and the providers call.

    ``inp`` is what ``inputs`` returns. A call returns ``(forward, grads)``:
    ``forward()`` gives the loss, whose backward fills the ``.grad`` of ``grads``.
    ``eager`` returns ``(fn, args, grads)``: ``fn(*args)`` is the loss in eager
    PyTorch (or a tuple that starts with it), which torch-compile compiles.
    """

    name: str
    inputs: Callable  # (ctx, n, vocab, dtype) -> inp
    eager: Callable  # (inp) -> (fn, args, grads)
    reference: Callable  # (inp) -> float: the eager loss in bounded memory, the oracle
    sgopd: Callable  # (inp, backend) -> a call: the library's
    needed_bytes: Callable  # (ctx, n, vocab, elt) -> int: a lower bound on a shape's memory
    speed_of_light: Callable  # (ctx, inp, n, vocab, elt) -> {mode: [ms, p20, p80]}
    competitors: Mapping[str, Callable] = field(default_factory=dict)  # provider -> (inp) -> a call
    skips: Mapping[str, str] = field(default_factory=dict)  # provider without a call -> why
    gpu_shapes: Optional[tuple] = None  # (Ns, Vs) of its own on a GPU, run after the sweep's
    hidden: bool = False  # has a hidden size (--H, ctx.h)
    teacher_pad: bool = False  # its teacher vocabulary follows --teacher-pad


@dataclass(frozen=True)
class Provider:
    """Who computes a case's loss: ``build(ctx, case, inp)`` returns a call or raises Skip;
    without ``build``, the case's speed of light (no measurement)."""

    name: str
    build: Optional[Callable] = None
    checked: bool = False  # its loss is compared with the eager oracle before timing
    compiles: bool = False  # uses torch.compile: dynamo is reset for every shape


def optional(make, unusable):
    """``make()``; when it fails (a package not installed, an API that moved), Skip with
    ``unusable`` and the error."""
    try:
        return make()
    except Exception as e:
        raise Skip(f"{unusable} ({type(e).__name__}: {e})") from None


def loss_of(out):
    """The loss of a call that returns it alone or first in a tuple."""
    return out[0] if isinstance(out, tuple) else out


def generator(ctx):
    """A generator on the run's device, seeded with --seed."""
    return torch.Generator(device=ctx.device).manual_seed(ctx.args.seed)


def teacher_vocab(ctx, vocab):
    return vocab + TEACHER_PAD if ctx.args.teacher_pad else vocab


def row_slices(n, vocab, elements=1 << 26):
    """Slices of the rows of an (n, vocab) matrix with at most ``elements`` entries each (the
    oracle's bounded memory)."""
    step = max(1, elements // vocab)
    return [slice(a, min(a + step, n)) for a in range(0, n, step)]


# ---------------------------------------------------------------------------
# the run

def setup(interpret):
    """Before triton or the library is first imported: the Triton interpreter if asked, and this
    checkout first on the path (the library benchmarked is the one whose commit is recorded)."""
    if interpret:
        os.environ["TRITON_INTERPRET"] = "1"
        # the interpreter also evaluates masked-off lanes (-inf - -inf): numpy warns; every
        # kernel's result is still checked
        warnings.filterwarnings("ignore", category=RuntimeWarning,
                                module="triton.runtime.interpreter")
    sys.path.insert(0, str(ROOT))


def context(args, cpu):
    """The run: its device (CUDA unless ``cpu`` or none is present) and the fields of every
    record (gpu, commit, date, torch, triton). ``args`` needs ``warmup`` and ``rep`` (ms)."""
    on_gpu = torch.cuda.is_available() and not cpu
    device = torch.device("cuda" if on_gpu else "cpu")
    gpu = re.sub(r"[^A-Za-z0-9_.-]", "_", torch.cuda.get_device_name(device)) if on_gpu else "cpu"
    meta = dict(gpu=gpu, commit=git_commit(),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                torch=torch.__version__, triton=triton_version())
    return SimpleNamespace(args=args, on_gpu=on_gpu, device=device, meta=meta, told=set())


def describe(meta):
    return (f"device {meta['gpu']}, torch {meta['torch']}, triton {meta['triton']}, "
            f"commit {meta['commit']}")


def git_commit():
    root = str(ROOT)
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


def append_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


# ---------------------------------------------------------------------------
# timing, memory and floors

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


def copy_floor(**passes):
    """A case's speed of light: ``passes[mode]`` passes over the N x V matrix (read or written)
    at the copy bandwidth measured at the start of the run."""
    def speed_of_light(ctx, inp, n, vocab, elt):
        return {m: [k * n * vocab * elt / ctx.bandwidth * 1e3] * 3 for m, k in passes.items()}
    return speed_of_light


def gemm_floor(ctx, hs, ws, ht, wt):
    """The 2 (fwd) and 4 (fwd_bwd) N x H x V GEMMs of a fused linear loss (torch.matmul)."""
    hs, ws, ht, wt = (x.detach() for x in (hs, ws, ht, wt))
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
        if prov.checked and ref is not None:
            rel = abs(loss - ref) / max(abs(ref), 1e-3)
            check = "ok" if rel < TOLERANCE[dtype_name] else "mismatch"
            if check == "mismatch":
                print(f"  WARNING: {prov.name} loss {loss:.6g} differs from torch-eager {ref:.6g} "
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
        print(f"  {prov.name:<15} failed, {', '.join(out) or 'nothing'} measured: {failed}",
              flush=True)
    return out, check


def run_shape(ctx, case, n, vocab, dtype_name, providers):
    """Measure ``providers`` on one shape of ``case``; print a line per provider and return the
    records."""
    dtype = TORCH_DTYPES[dtype_name]
    elt = torch.finfo(dtype).bits // 8
    h = ctx.h if case.hidden else None
    if ctx.on_gpu:
        need, avail = case.needed_bytes(ctx, n, vocab, elt), torch.cuda.mem_get_info()[0]
        if need > 0.9 * avail:
            print(f"  skip: needs ~{need / 1e9:.1f} GB for inputs and gradients, "
                  f"{avail / 1e9:.1f} GB free", flush=True)
            return []
    v_t = teacher_vocab(ctx, vocab) if case.teacher_pad else vocab
    if any(p.compiles for p in providers):
        torch._dynamo.reset()  # a fresh torch.compile per shape: no silent fall-back to eager
    try:
        inp = case.inputs(ctx, n, vocab, dtype)
        ref = case.reference(inp)
    except torch.cuda.OutOfMemoryError:
        inp = None
    if inp is None:
        free_memory(ctx)
        print("  skip: out of GPU memory creating the inputs or the eager reference", flush=True)
        return []
    records = []
    for prov in providers:
        if prov.build is None:
            result, check = {}, None
            try:
                result = {m: v + [None] for m, v in case.speed_of_light(ctx, inp, n, vocab,
                                                                        elt).items()}
            except Exception as e:  # the GEMM floor's buffers may not fit
                print(f"  {prov.name:<15} failed: {_reason(e)}", flush=True)
            free_memory(ctx)
        else:
            try:
                forward, grads = prov.build(ctx, case, inp)
            except Skip as e:
                if (case.name, prov.name) not in ctx.told:
                    ctx.told.add((case.name, prov.name))
                    print(f"  {prov.name:<15} skipped for {case.name}: {e}", flush=True)
                continue
            result, check = measure(ctx, prov, forward, grads, ref, dtype_name)
            del forward, grads
        for mode, (ms, p20, p80, peak) in result.items():
            records.append(dict(ctx.meta, case=case.name, provider=prov.name, N=n, V=vocab, H=h,
                                dtype=dtype_name, mode=mode, ms=ms, p20=p20, p80=p80, peak_gb=peak,
                                bandwidth_tbs=ctx.bandwidth / 1e12, check=check, V_T=v_t))
        if result:
            line = "".join(f"   {m} {result[m][0]:9.3f} ms" for m in MODES if m in result)
            peaks = [f"{result[m][3]:.2f}" for m in MODES
                     if result.get(m, [None] * 4)[3] is not None]
            mem = f"   peak {' / '.join(peaks)} GB" if peaks else ""
            print(f"  {prov.name:<15}{line}{mem}", flush=True)
    del inp
    free_memory(ctx)
    return records


# ---------------------------------------------------------------------------
# the table

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
