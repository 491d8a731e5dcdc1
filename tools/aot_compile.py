"""Compile every Triton kernel specialization for a GPU target, without a GPU.

    python tools/aot_compile.py [--arch 90] [--resources]

Run without TRITON_INTERPRET. It proves the kernel sources compile with the
installed Triton for the given CUDA architecture (sm_90 = H100/H200) and, with
--resources, prints registers / spills / shared memory read off each cubin by
cuobjdump (when it is on PATH). Exit code 1 if any specialization fails.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from sgopd_kernels._options import Divergence  # noqa: E402
from sgopd_kernels.triton import logits, parallel, sampled, topk  # noqa: E402

DTYPES = {"fp32": "*fp32", "bf16": "*bf16", "fp16": "*fp16"}


def _sig(names, types):
    return dict(zip(names, types))


def _div(reverse: bool) -> int:
    return int(Divergence.REVERSE_KL if reverse else Divergence.FORWARD_KL)


def specializations():
    i = "i32"
    f = "fp32"
    for dt, gate, rev, strided in itertools.product(
            ("bf16", "fp32"), (False, True), (False, True), (False, True)):
        p = DTYPES[dt]
        names = ["S", "T", "TOK", "SIG", "OUT", "V", "s_d1", "s_st0", "s_st1", "s_stv", "t_d1",
                 "t_st0", "t_st1", "t_stv", "scale2", "tscale2", "beta", "lam_pos", "lam_neg",
                 "ignore_index"]
        types = [p, p, "*i64", "*fp32", "*fp32", i, i, "i64", "i64", i, i, "i64", "i64", i,
                 f, f, f, f, f, "i64"]
        for teacher_bridge in (False, True) if not gate else (False,):
            const = dict(HAS_GATE=gate, DIVERGENCE=_div(rev), STRIDED_V=strided,
                         BLOCK_V=logits.FWD_BLOCK_V, TEACHER_BRIDGE=teacher_bridge)
            yield (f"opd_fwd {dt} gate={gate} rev={rev} strided={strided} "
                   f"teacher_bridge={teacher_bridge}",
                   logits._opd_fwd_kernel, names, types, const, logits.FWD_WARPS)
    for dt, rev, strided, local in itertools.product(("bf16", "fp32"), (False, True),
                                                     (False, True), (True, False)):
        p = DTYPES[dt]
        names = ["S", "T", "TOK", "ROWS", "GROW", "DS", "V", "s_d1", "s_st0", "s_st1", "s_stv",
                 "t_d1", "t_st0", "t_st1", "t_stv", "scale2", "tscale2", "inv_temp",
                 "ignore_index"]
        types = [p, p, "*i64", "*fp32", "*fp32", p, i, i, "i64", "i64", i, i, "i64", "i64", i,
                 f, f, f, "i64"]
        const = dict(DIVERGENCE=_div(rev), STRIDED_V=strided, BLOCK_V=logits.BWD_BLOCK_V,
                     LOCAL_TOKENS=local)  # False: a vocabulary shard's backward
        yield (f"opd_bwd {dt} rev={rev} strided={strided} local_tokens={local}",
               logits._opd_bwd_kernel, names, types, const, logits.BWD_WARPS)
    for dt, gate in itertools.product(("bf16", "fp32"), (False, True)):
        p = DTYPES[dt]
        names = ["S", "TLP", "TOK", "SIG", "OUT", "V", "s_d1", "s_st0", "s_st1", "s_stv", "scale2",
                 "lam_pos", "lam_neg", "ignore_index"]
        types = [p, "*fp32", "*i64", "*fp32", "*fp32", i, i, "i64", "i64", i, f, f, f, "i64"]
        const = dict(HAS_GATE=gate, STRIDED_V=False, BLOCK_V=sampled.FWD_BLOCK_V)
        yield (f"sampled_fwd {dt} gate={gate}", sampled._sampled_fwd_kernel, names, types, const,
               sampled.NUM_WARPS)
    strides = ["s_d1", "s_st0", "s_st1", "s_stv", "t_d1", "t_st0", "t_st1", "t_stv"]
    stride_types = [i, "i64", "i64", i, i, "i64", "i64", i]
    for dt, strided in itertools.product(("bf16", "fp32"), (False, True)):
        p = DTYPES[dt]
        yield (f"tp_stats {dt} strided={strided}", parallel._tp_stats_kernel,
               ["S", "T", "TOK", "OUT", "V", "start"] + strides
               + ["scale2", "tscale2", "ignore_index"],
               [p, p, "*i64", "*fp32", i, "i64"] + stride_types + [f, f, "i64"],
               dict(STRIDED_V=strided, BLOCK_V=parallel.BLOCK_V, K=parallel.STATS_K),
               parallel.NUM_WARPS)
        yield (f"tp_bridge {dt} strided={strided}", parallel._tp_bridge_kernel,
               ["S", "T", "TOK", "ROWS", "OUT", "V"] + strides
               + ["scale2", "tscale2", "ignore_index"],
               [p, p, "*i64", "*fp32", "*fp32", i] + stride_types + [f, f, "i64"],
               dict(STRIDED_V=strided, BLOCK_V=parallel.BLOCK_V, K=parallel.BRIDGE_K),
               parallel.NUM_WARPS)
    for dt in ("bf16", "fp32"):
        p = DTYPES[dt]
        names = ["S", "TOK", "ROWS", "GROW", "DS", "V", "s_d1", "s_st0", "s_st1", "s_stv",
                 "scale2", "inv_temp", "ignore_index"]
        types = [p, "*i64", "*fp32", "*fp32", p, i, i, "i64", "i64", i, f, f, "i64"]
        const = dict(STRIDED_V=False, BLOCK_V=sampled.BWD_BLOCK_V)
        yield (f"sampled_bwd {dt}", sampled._sampled_bwd_kernel, names, types, const,
               sampled.NUM_WARPS)

    yield from topk_specializations()


def topk_specializations():
    """The top-k kernels (sgopd_kernels/triton/topk.py) at k = 20 and 64 (BLOCK_K 32, 64)."""
    i, f = "i32", "fp32"
    strides = ["s_d1", "s_st0", "s_st1", "s_stv"]
    stride_types = [i, "i64", "i64", i]
    for dt, ttl, strided, block_k in itertools.product(("bf16", "fp32"), (False, True),
                                                       (False, True), (32, 64)):
        p = DTYPES[dt]
        yield (f"topk_stream {dt} ttl={ttl} strided={strided} block_k={block_k}",
               topk._topk_stream_kernel,
               ["S", "IDS", "SORTED", "TOK", "ZK", "ST", "V", "start", "K", "K1"] + strides
               + ["scale2", "ignore_index"],
               [p, "*i64", "*i64", "*i64", "*fp32", "*fp32", i, "i64", i, i] + stride_types
               + [f, "i64"],
               dict(HAS_TTL=ttl, STRIDED_V=strided, BLOCK_V=topk.FWD_BLOCK_V, BLOCK_K=block_k),
               topk.FWD_WARPS)
    for gate, ttl, div, block_k in itertools.product((False, True), (False, True),
                                                     tuple(Divergence), (32, 64)):
        yield (f"topk_rows gate={gate} ttl={ttl} {div.label} block_k={block_k}",
               topk._topk_rows_kernel,
               ["IDS", "TLP", "TTL", "TOK", "SIG", "ZK", "ST", "OUT", "VG", "K", "scale2", "beta",
                "lam_pos", "lam_neg", "jsd_beta", "tail_floor", "ignore_index"],
               ["*i64", "*fp32", "*fp32", "*i64", "*fp32", "*fp32", "*fp32", "*fp32", i, i,
                f, f, f, f, f, f, "i64"],
               dict(HAS_GATE=gate, HAS_TTL=ttl, DIVERGENCE=int(div), BLOCK_K=block_k,
                    DUP_K=topk.DUP_K), topk.ROW_WARPS)
    for dt, strided in itertools.product(("bf16", "fp32"), (False, True)):
        p = DTYPES[dt]
        yield (f"topk_bwd {dt} strided={strided}", topk._topk_bwd_kernel,
               ["S", "TOK", "ROWS", "GROW", "DS", "V"] + strides
               + ["scale2", "inv_temp", "ignore_index"],
               [p, "*i64", "*fp32", "*fp32", p, i] + stride_types + [f, f, "i64"],
               dict(STRIDED_V=strided, BLOCK_V=topk.BWD_BLOCK_V), topk.BWD_WARPS)
    for dt, ttl, div in itertools.product(("bf16", "fp32"), (False, True), tuple(Divergence)):
        p = DTYPES[dt]
        yield (f"topk_bwd_slots {dt} ttl={ttl} {div.label}", topk._topk_bwd_slots_kernel,
               ["S", "IDS", "TLP", "TTL", "TOK", "ROWS", "GROW", "DS", "V", "start", "K"] + strides
               + ["scale2", "inv_temp", "jsd_beta", "ignore_index"],
               [p, "*i64", "*fp32", "*fp32", "*i64", "*fp32", "*fp32", p, i, "i64", i]
               + stride_types + [f, f, f, "i64"],
               dict(HAS_TTL=ttl, DIVERGENCE=int(div), BLOCK_K=64), topk.ROW_WARPS)


def resources(cubin: bytes) -> str:
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                           "cuobjdump")
    tool = shutil.which("cuobjdump") or (bundled if os.path.exists(bundled) else None)
    if not tool:
        return "(cuobjdump not found)"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(cubin)
        fh.flush()
        out = subprocess.run([tool, "--dump-resource-usage", fh.name], capture_output=True,
                             text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)", out)
    return f"regs={m.group(1)} stack={m.group(2)} shared={m.group(3)}" if m else out.strip()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--resources", action="store_true")
    args = ap.parse_args()
    target = GPUTarget("cuda", args.arch, 32)
    failed = 0
    print(f"triton {triton.__version__}, target sm_{args.arch}")
    for label, fn, names, types, const, warps in specializations():
        sig = _sig(names, types)
        for k in const:
            sig[k] = "constexpr"
        try:
            src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=const)
            ck = triton.compile(src, target=target, options={"num_warps": warps})
            extra = resources(ck.asm["cubin"]) if args.resources else ""
            print(f"ok    {label} {extra}")
        except Exception as exc:  # report every failure, not only the first
            failed += 1
            print(f"FAIL  {label}: {type(exc).__name__}: {str(exc)[:2000]}")
    print(f"{failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
