"""Compile the Triton kernels for a GPU target as the JIT would specialize them, without a GPU.

    python tools/aot_compile.py [--arch 90] [--resources] [--sass] [--only TEXT]
                                [--jobs J] [--json PATH] [--list]

The kernels' argument specializations are not written here: they are derived
from real launches. Each scenario below calls the library's public losses
(forward and backward; ``process_group`` on a one-rank gloo group for the
vocabulary-parallel kernels) on small CPU tensors of realistic shapes and
strides: contiguous rows, a (B, T, V) slice, a vocabulary not divisible by 16
with a padded teacher, a view starting mid-row, a vocabulary-strided view; bf16
and float32; with and without the gate; each divergence. Every ``kernel[grid]
(...)`` launch goes through Triton's own ``JITFunction.run`` against a stand-in
driver that reports the target (``GPUTarget("cuda", arch, 32)``), so Triton's
binder computes the signature and the specialization it would compile for those
argument values (ints equal to 1 as constants, divisibility by 16 of pointers
and ints, i32 or i64 ints); the compile step is intercepted, nothing is
launched, and the host code runs on with the unwritten outputs (an error it
then raises is caught at the call, once the call's launches are recorded).
Identical specializations are compiled once, with ``triton.compile`` on the
same ``ASTSource`` and options the JIT would use. Exit code 1 if a
specialization fails to compile or a scenario records no launch.

``--resources`` prints registers, stack and local memory per specialization
(cuobjdump). ``--sass`` disassembles every cubin (cuobjdump from PATH, from
Triton's bundled bin or from the nvidia-cuda-cuobjdump package), finds each
kernel's streaming loop (the first loop closed by a backward branch that holds
a global load; a kernel without one handles one block per program), counts its
instructions per element by class, and prints, for the bf16 scenarios at
N = 8192, V = 151936 on an H100 SXM, lower bounds of a throughput model: DRAM
bytes at 3.02 TB/s (each launch argument of the logits' size streamed once),
instruction issue at 4 warp-instructions per clock per SM, MUFU at 16 lanes per
clock per SM, the FP32 datapath at 128 and the integer/ALU pipe at 64 lanes per
clock per SM, 132 SMs at 1.755 GHz. It is a static model of the SASS, not a
measurement. ``--json`` writes every specialization and its counts.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Optional

os.environ.pop("TRITON_INTERPRET", None)  # the JIT, not the interpreter, must be imported
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

# ---------------------------------------------------------------------------
# recording launches: the JIT's own specialization, no launch


@dataclass
class Launch:
    """One intercepted ``kernel[grid](*args, **kwargs)`` and what the JIT made of it."""
    fn: object            # the JITFunction
    args: tuple
    kwargs: dict
    grid: tuple
    signature: dict       # argument name -> type ("*bf16", "i32", "constexpr", ...)
    constexprs: dict      # path tuple -> value
    attrs: dict           # path tuple -> [["tt.divisibility", 16]]
    options: dict         # the backend options (num_warps, ...)
    scenario: str = ""

    @property
    def name(self) -> str:
        return self.fn.__name__

    def key(self) -> tuple:
        return (self.fn.__module__, self.fn.__name__, tuple(self.signature.items()),
                tuple(sorted((k, repr(v)) for k, v in self.constexprs.items())),
                tuple(sorted((k, repr(v)) for k, v in self.attrs.items())),
                tuple(sorted((k, repr(v)) for k, v in self.options.items())))

    def divisible16(self) -> list:
        """The arguments the JIT declares divisible by 16 (pointers, ints)."""
        names = list(self.signature)
        return [names[p[0]] for p, a in sorted(self.attrs.items())
                if any(x[0] == "tt.divisibility" and x[1] == 16 for x in a)]

    def hints(self) -> str:
        """The run-time specialization in short: div16 arguments and arguments fixed at 1."""
        names = list(self.signature)
        div = self.divisible16()
        ones = [names[p[0]] for p, v in sorted(self.constexprs.items())
                if names[p[0]] not in self.declared_constexprs() and v == 1]
        return f"div16=[{','.join(div)}] =1:[{','.join(ones)}]"

    def declared_constexprs(self) -> set:
        return {p.name for p in self.fn.params if p.is_constexpr}


class _TargetDriver:
    """The part of a Triton driver that ``JITFunction.run`` asks before it compiles."""

    def __init__(self, target: GPUTarget):
        self.target = target

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def is_active(self):
        return True


class Unsupported(RuntimeError):
    """This Triton's JIT internals differ from those the recorder hooks into."""


@contextlib.contextmanager
def recording(target: GPUTarget, into: list):
    """Within: every JIT launch appends a :class:`Launch` to ``into`` and launches nothing."""
    from triton.runtime import jit as jit_mod
    from triton.runtime.driver import driver

    JIT = jit_mod.JITFunction
    for attr in ("run", "_do_compile"):
        if not hasattr(JIT, attr):
            raise Unsupported(f"triton {triton.__version__}: JITFunction has no {attr}")
    if not hasattr(driver, "_active") or not hasattr(driver, "set_active"):
        raise Unsupported(f"triton {triton.__version__}: no settable active driver")
    compile_params = list(inspect.signature(JIT._do_compile).parameters)
    need = {"signature", "constexprs", "options", "attrs"}
    if not need <= set(compile_params):
        raise Unsupported(f"triton {triton.__version__}: JITFunction._do_compile"
                          f"{tuple(compile_params)} lacks {sorted(need - set(compile_params))}")
    orig_run, orig_compile = JIT.run, JIT._do_compile
    pending: list = []

    def run(self, *args, grid, warmup, **kwargs):
        pending.append((args, dict(kwargs), grid))
        try:
            return orig_run(self, *args, grid=grid, warmup=warmup, **kwargs)
        finally:
            pending.pop()

    def do_compile(self, *a, **kw):
        b = inspect.signature(orig_compile).bind(self, *a, **kw).arguments
        args, kwargs, grid = pending[-1]
        opts = b["options"]
        into.append(Launch(self, args, kwargs, tuple(grid) if not callable(grid) else grid,
                           dict(b["signature"]), dict(b["constexprs"]), dict(b["attrs"]),
                           dict(opts.__dict__)))
        return None  # nothing compiled, nothing launched: run() returns here

    saved = driver._active
    driver.set_active(_TargetDriver(target))
    JIT.run, JIT._do_compile = run, do_compile
    try:
        yield into
    finally:
        JIT.run, JIT._do_compile = orig_run, orig_compile
        driver._active = saved


# ---------------------------------------------------------------------------
# scenarios: real calls of the public losses

N_MODEL, V_MODEL = 8192, 151936   # the throughput model's problem (Qwen-sized vocabulary)
V_ODD, V_ODD_TEACHER = 50257, 50304  # GPT-2's vocabulary, and a teacher padded to 64
SHARDS = 8                        # the vocabulary-parallel model: one shard of V / 8
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def make_logits(layout: str, dtype, vocab: int, grad: bool = False, vocab_t: Optional[int] = None,
                gen=None) -> torch.Tensor:
    """Logits of 4 positions laid out as ``layout``; (..., vocab_t) when given (a padded teacher).

    rows: contiguous (4, V); btv: logits[:, :-1] of a (2, 3, V) tensor; midrow: columns 1..
    of a (4, V + 1) tensor (a view that starts mid-row); vstrided: the transpose of a (V, 4)
    tensor (stride along the vocabulary 4).
    """
    v = vocab_t or vocab
    kw = dict(generator=gen, dtype=dtype)
    if layout == "rows":
        x = torch.randn(4, v, **kw)
    elif layout == "btv":
        x = torch.randn(2, 3, v, **kw)[:, :-1]
    elif layout == "midrow":
        x = torch.randn(4, v + 1, **kw)[:, 1:]
    elif layout == "vstrided":
        x = torch.randn(v, 4, **kw).t()
    else:
        raise ValueError(layout)
    return x.detach().requires_grad_(grad)


@dataclass
class Scenario:
    name: str
    call: Callable[[], None]
    model: bool = False       # the throughput model's problem (bf16, contiguous, V_MODEL)
    rows: int = 4             # positions of the call (the model scales to N_MODEL)
    vocab: int = V_MODEL


def _gated_call(dt, layout, vocab, vocab_t, gate, div, parallel=False, beta=0.1):
    import sgopd_kernels as sk

    def call():
        group = one_rank_group() if parallel else None
        g = torch.Generator().manual_seed(0)
        s = make_logits(layout, DTYPES[dt], vocab, grad=True, gen=g)
        t = make_logits(layout, DTYPES[dt], vocab, vocab_t=vocab_t, gen=g)
        lead = s.shape[:-1]
        tok = torch.randint(0, vocab, lead, generator=g)
        ver = (torch.arange(lead[0]) % 2 == 0) if gate else None
        loss = sk.gated_opd_loss(s, t, tok, ver, divergence=div, beta=beta, backend="triton",
                                 process_group=group)
        loss.backward()
    return call


def _sampled_call(dt, layout, vocab, gate):
    import sgopd_kernels as sk

    def call():
        g = torch.Generator().manual_seed(0)
        s = make_logits(layout, DTYPES[dt], vocab, grad=True, gen=g)
        lead = s.shape[:-1]
        tok = torch.randint(0, vocab, lead, generator=g)
        ver = (torch.arange(lead[0]) % 2 == 0) if gate else None
        loss = sk.sampled_opd_loss(s, -torch.rand(lead, generator=g), tok, ver,
                                   backend="triton")
        loss.backward()
    return call


def _topk_call(dt, layout, vocab, k, gate, ttl, div, parallel=False):
    import sgopd_kernels as sk

    def call():
        group = one_rank_group() if parallel else None
        g = torch.Generator().manual_seed(0)
        s = make_logits(layout, DTYPES[dt], vocab, grad=True, gen=g)
        lead = s.shape[:-1]
        tok = torch.randint(0, vocab, lead, generator=g)
        ids = torch.stack([torch.randperm(vocab, generator=g)[:k]
                           for _ in range(math.prod(lead))]).reshape(lead + (k,))
        lp = torch.log_softmax(torch.randn(lead + (k + 1,), generator=g), -1)[..., :k]
        ver = (torch.arange(lead[0]) % 2 == 0) if gate else None
        tt = torch.log(torch.rand(lead, generator=g)) if ttl else None
        loss = sk.topk_opd_loss(s, ids, lp, tok, ver, teacher_token_logprobs=tt,
                                divergence=div, backend="triton", process_group=group)
        loss.backward()
    return call


def one_rank_group():
    """A one-rank gloo group: the vocabulary-parallel path on one shard."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    return dist.group.WORLD


# the throughput model's scenarios: bf16, contiguous rows of V_MODEL (a shard of V_MODEL / SHARDS),
# beta = 0.1 unless the name says beta=0
MODEL = {"logits bf16 rows gate=0 reverse_kl", "logits bf16 rows gate=1 reverse_kl",
         "logits bf16 rows gate=0 beta=0 reverse_kl", "logits bf16 rows gate=0 forward_kl",
         "logits bf16 rows gate=1 forward_kl",
         "sampled bf16 rows gate=0", "sampled bf16 rows gate=1",
         "parallel logits bf16 rows gate=1 reverse_kl",
         "topk bf16 rows k=20 gate=1 ttl=1 reverse_kl"}


def scenarios():
    """Every scenario. Contiguous rows and a vocabulary-strided view with every constant the
    launchers set (gate, divergence, top-k width, teacher's lp_T(y)); the other layouts with
    fewer of them (they change the alignment hints, not the code paths)."""
    out = []
    layouts = {  # layout -> (student V, teacher V)
        "rows": (V_MODEL, None), "vstrided": (V_ODD, None), "btv": (V_MODEL, None),
        "midrow": (V_MODEL, None), "odd": (V_ODD, V_ODD_TEACHER), "gpt2": (V_ODD, None)}

    def add(name, call, vocab=V_MODEL):
        out.append(Scenario(name, call, model=name in MODEL, vocab=vocab))

    def lay(name):
        return "rows" if name in ("odd", "gpt2") else name

    for dt in DTYPES:
        for name, (v, vt) in layouts.items():
            full = name in ("rows", "vstrided")
            if not full and dt == "fp32" and name != "odd":
                continue
            combos = [(g, d) for g in (False, True) for d in ("reverse_kl", "forward_kl")] \
                if full else [(True, "reverse_kl"), (False, "forward_kl")][:1 + (dt == "bf16")]
            for gate, div in combos:
                add(f"logits {dt} {name} gate={int(gate)} {div}",
                    _gated_call(dt, lay(name), v, vt, gate, div), v)
            if name == "rows" and dt == "bf16":  # plain reverse KL: the bridge is the teacher
                add(f"logits {dt} {name} gate=0 beta=0 reverse_kl",
                    _gated_call(dt, "rows", v, vt, False, "reverse_kl", beta=0.0), v)
            for gate in ((False, True) if full else (True,)):
                if full or dt == "bf16":
                    add(f"sampled {dt} {name} gate={int(gate)}",
                        _sampled_call(dt, lay(name), v, gate), v)
        topk = [(k, g, t, d) for k in (20, 64) for g in (False, True) for t in (False, True)
                for d in ("reverse_kl", "forward_kl", "jsd")] if dt == "bf16" else \
            [(20, True, t, d) for t in (False, True) for d in ("reverse_kl", "forward_kl", "jsd")]
        for k, gate, ttl, div in topk:
            add(f"topk {dt} rows k={k} gate={int(gate)} ttl={int(ttl)} {div}",
                _topk_call(dt, "rows", V_MODEL, k, gate, ttl, div))
        for name in (("btv", "odd", "vstrided") if dt == "bf16" else ()):
            v = layouts[name][0]
            add(f"topk {dt} {name} k=20 gate=1 ttl=1 reverse_kl",
                _topk_call(dt, lay(name), v, 20, True, True, "reverse_kl"), v)
        # vocabulary parallel: one rank holding a shard of V_MODEL / SHARDS columns
        vs = V_MODEL // SHARDS
        for gate in (False, True):
            for div in ("reverse_kl", "forward_kl"):
                add(f"parallel logits {dt} rows gate={int(gate)} {div}",
                    _gated_call(dt, "rows", vs, None, gate, div, parallel=True), vs)
        if dt == "bf16":  # a shard of GPT-2's vocabulary: rows off a 16-byte boundary
            vo = V_ODD // SHARDS
            add(f"parallel logits {dt} gpt2 gate=1 reverse_kl",
                _gated_call(dt, "rows", vo, None, True, "reverse_kl", parallel=True), vo)
        add(f"parallel topk {dt} rows k=20 gate=1 ttl=1 reverse_kl",
            _topk_call(dt, "rows", vs, 20, True, True, "reverse_kl", parallel=True), vs)
    return out


@contextlib.contextmanager
def triton_on_cpu():
    """Let the public losses pick backend='triton' for CPU tensors (their launches are
    recorded, never run)."""
    from sgopd_kernels import _dispatch

    saved = dict(_dispatch._UNAVAILABLE)
    _dispatch._UNAVAILABLE["triton"] = lambda device_type: None
    try:
        yield
    finally:
        _dispatch._UNAVAILABLE.clear()
        _dispatch._UNAVAILABLE.update(saved)


def record(target: GPUTarget, selected):
    """Run the scenarios; (launches, {scenario name: error or None})."""
    launches, status = [], {}
    with triton_on_cpu(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for sc in selected:
            before = len(launches)
            err = None
            with recording(target, launches):
                try:
                    sc.call()
                except Exception as exc:  # the host code read an unwritten output
                    err = f"{type(exc).__name__}: {str(exc)[:300]}"
            for la in launches[before:]:
                la.scenario = sc.name
            status[sc.name] = (len(launches) - before, err)
    return launches, status


# ---------------------------------------------------------------------------
# compiling and disassembling


def compile_launch(la: Launch, target: GPUTarget):
    src = triton.compiler.ASTSource(fn=la.fn, signature=la.signature, constexprs=la.constexprs,
                                    attrs=la.attrs)
    return triton.compile(src, target=target, options=dict(la.options))


def find_tool(name: str) -> Optional[str]:
    """A CUDA binary utility: PATH, Triton's bundled bin, or an nvidia-* pip package."""
    found = shutil.which(name)
    if found:
        return found
    cands = [os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)]
    for p in sys.path:
        nv = os.path.join(p, "nvidia")
        if os.path.isdir(nv):
            for sub in sorted(os.listdir(nv)):
                cands.append(os.path.join(nv, sub, "bin", name))
    for c in cands:
        if os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def _on_cubin(tool: str, flags: list, cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(cubin)
        fh.flush()
        return subprocess.run([tool, *flags, fh.name], capture_output=True, text=True).stdout


def resources(cubin: bytes) -> dict:
    tool = find_tool("cuobjdump")
    if not tool:
        return {}
    out = _on_cubin(tool, ["--dump-resource-usage"], cubin)
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    if not m:
        return {}
    return dict(zip(("regs", "stack", "shared", "local"), map(int, m.groups())))


SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def disassemble(cubin: bytes) -> Optional[list]:
    """[(address, opcode with modifiers, operands)] of the cubin's one kernel, or None."""
    tool = find_tool("cuobjdump")
    if tool:
        text = _on_cubin(tool, ["-sass"], cubin)
    else:
        tool = find_tool("nvdisasm")
        if not tool:
            return None
        text = _on_cubin(tool, ["-hex"], cubin)
    ins = []
    for ln in text.splitlines():
        m = SASS_LINE.search(ln)
        if m:
            ins.append((int(m.group(1), 16), m.group(3), m.group(4).strip()))
    # what follows the kernel's closing self-branch is padding
    for i, (addr, op, operands) in enumerate(ins):
        if op == "BRA" and re.search(rf"0x0*{addr:x}\b", operands):
            return ins[:i]
    return ins


def loops(ins) -> list:
    """(head, tail) address ranges closed by backward branches, in address order."""
    out = []
    for addr, op, operands in ins:
        if op.split(".")[0] == "BRA":
            m = re.search(r"0x([0-9a-f]+)", operands)
            if m and int(m.group(1), 16) <= addr:
                out.append((int(m.group(1), 16), addr))
    return sorted(out)


def ldst_width(op: str) -> str:
    m = re.search(r"\.(128|64|U16|S16|U8|S8)\b", op)
    return {"U16": "16", "S16": "16", "U8": "8", "S8": "8"}.get(m.group(1), m.group(1)) \
        if m else "32"


# instruction classes of the report, and the pipe each occupies on sm_90 (lanes/clock/SM)
FP32_ARITH = {"FFMA", "FADD", "FMUL", "FFMA32I", "FADD32I", "FMUL32I"}
FP32_OTHER = {"FMNMX", "FSETP", "FSEL", "FSET", "FCHK"}
HALF = {"HFMA2", "HADD2", "HMUL2", "HSETP2", "HMNMX2"}
XU = {"MUFU", "F2F", "I2F", "F2I", "I2FP", "F2IP", "FRND", "POPC", "FLO", "BREV"}
LSU = {"LDG", "STG", "LDS", "STS", "LDSM", "SHFL", "LDL", "STL", "LDC", "RED", "ATOM", "ATOMG",
       "ATOMS", "LDGSTS", "MEMBAR", "LD", "ST"}
CONTROL = {"BRA", "EXIT", "BSYNC", "BSSY", "WARPSYNC", "NOP", "CALL", "RET", "YIELD", "BAR",
           "BREAK", "BMOV", "JMP"}


def classify(op: str) -> str:
    base = op.split(".")[0]
    if base in ("LDG", "STG"):
        return f"{base}.{ldst_width(op)}"
    if base == "MUFU":
        return "MUFU"
    if base in ("LDL", "STL"):
        return "LDL/STL"
    if base == "SHFL":
        return "SHFL"
    if base == "BAR":
        return "BAR"
    if base in ("LDS", "STS", "LDSM", "ATOMS"):
        return "LDS/STS"
    if base in FP32_ARITH or base in FP32_OTHER or base in HALF:
        return "FP32"
    if base.startswith("U") or base in ("S2UR", "R2UR", "LDC"):
        return "uniform"
    if base in CONTROL:
        return "control"
    if base in XU:
        return "conv"
    return "INT/ALU"  # IMAD IADD3 LOP3 SHF LEA ISETP SEL MOV PRMT F2FP PLOP3 ...


def pipe(op: str) -> str:
    base = op.split(".")[0]
    if base in FP32_ARITH or base in HALF:
        return "fma"
    if base in ("IMAD", "IMUL", "IMAD32I"):
        return "fmaheavy"
    if base in XU:
        return "xu"
    if base in LSU:
        return "lsu"
    if base.startswith("U") or base in ("S2UR", "R2UR"):
        return "uniform"
    if base in CONTROL:
        return "cbu"
    return "alu"  # FMNMX FSETP FSEL ISETP IADD3 LOP3 SHF LEA SEL MOV PRMT F2FP PLOP3 ...


@dataclass
class Sass:
    n: int                      # instructions of the kernel
    loop: Optional[tuple]       # the streaming loop's (head, tail), or None
    loop_ops: list              # its instructions' opcodes (the whole kernel if no loop)
    rest_ops: list              # the code outside every loop
    spills: int                 # LDL/STL instructions anywhere


def analyze(ins, streams: bool = True) -> Sass:
    """``streams``: the kernel walks the vocabulary in blocks (it has a BLOCK_V); otherwise
    no loop is taken for the streaming one and every instruction counts once."""
    lps = loops(ins) if streams else []
    in_loop = set()
    for lo, hi in lps:
        in_loop.update(a for a, _, _ in ins if lo <= a <= hi)
    hot = None
    for lo, hi in lps:  # the first loop that streams: it holds a global load
        body = [op for a, op, _ in ins if lo <= a <= hi]
        if any(op.startswith("LDG") for op in body):
            hot = (lo, hi)
            break
    rest = [op for a, op, _ in ins if a not in in_loop]
    body = [op for a, op, _ in ins if hot[0] <= a <= hot[1]] if hot else [op for _, op, _ in ins]
    spills = sum(op.split(".")[0] in ("LDL", "STL") for _, op, _ in ins)
    return Sass(len(ins), hot, body, rest, spills)


# ---------------------------------------------------------------------------
# the throughput model (H100 SXM)

SMS, CLOCK_GHZ, BW_TBS = 132, 1.755, 3.02
ISSUE_PER_CLK = 4                                     # warp-instructions per clock per SM
LANES = {"fma": 128, "fmaheavy": 64, "alu": 64, "xu": 16, "lsu": 32}
REPORT_CLASSES = ["LDG.128", "LDG.64", "LDG.32", "LDG.16", "STG.128", "STG.64", "STG.32",
                  "STG.16", "MUFU", "FP32", "INT/ALU", "conv", "SHFL", "BAR", "LDS/STS",
                  "uniform", "control", "LDL/STL"]


def model(la: Launch, sass: Sass, rows: int, vocab: int, block: int) -> dict:
    """Per-element counts and whole-kernel lower bounds (ms) at N_MODEL rows of this launch
    (``rows`` positions of ``vocab`` columns in the scenario; ``block``: its BLOCK_V, 0 for a
    kernel that does not walk the vocabulary)."""
    warps = la.options["num_warps"]
    grid = la.grid if isinstance(la.grid, tuple) else ()
    programs = math.prod(grid) * N_MODEL // rows
    per_thread = block / (32 * warps) if block else 1.0  # elements per thread and trip
    body = Counter(classify(op) for op in sass.loop_ops)
    if sass.loop:
        # trips of the streaming loop per program: the row's blocks, less those the code
        # before the loop reads (a peeled first block holds as many wide loads as a trip)
        wide = max((k for k in body if k.startswith("LDG.")), key=lambda k: int(k[4:]))
        rest = Counter(classify(op) for op in sass.rest_ops)
        peeled = rest[wide] // body[wide]
        # a row's blocks may be shared by several programs (a 2-D grid, each program
        # looping over a few of them): the trips of one program are its share
        per_row = math.prod(grid) / rows if grid else 1.0
        trips = max(math.ceil(vocab / block) - peeled, 0) / max(per_row, 1.0)
        dyn = Counter(sass.rest_ops)  # the other loops: zero trips (rare rows)
        for op in sass.loop_ops:
            dyn[op] += trips
    else:  # one block per program (or, without a block, the whole code once per program)
        trips = 0
        dyn = Counter(sass.loop_ops)
    scale = programs * warps
    by_pipe, by_class = Counter(), Counter()
    for op, c in dyn.items():
        by_pipe[pipe(op)] += c * scale
        by_class[classify(op)] += c * scale
    warp_ins = sum(dyn.values()) * scale
    f = CLOCK_GHZ * 1e9
    # DRAM bytes: a streaming kernel reads or writes each argument of the logits' size once
    # (rows x V, a padded teacher's extra columns unread); every smaller tensor (tokens, row
    # tables, top-k ids) whole. A kernel without a block only gathers from the big ones:
    # those few entries are not counted.
    nbytes = 0
    for v in la.args:
        if isinstance(v, torch.Tensor):
            if v.numel() >= rows * vocab:
                nbytes += v.element_size() * rows * vocab if block else 0
            else:
                nbytes += v.element_size() * v.numel()
    nbytes = nbytes * N_MODEL // rows
    fp32 = sum(c for op, c in dyn.items() if op.split(".")[0] in FP32_ARITH | FP32_OTHER | HALF)
    bounds = {
        "mem": nbytes / (BW_TBS * 1e12),
        "issue": warp_ins / (SMS * ISSUE_PER_CLK * f),
        "mufu": by_class["MUFU"] * 32 / (SMS * LANES["xu"] * f),
        "xu": by_pipe["xu"] * 32 / (SMS * LANES["xu"] * f),  # MUFU and the conversions
        "fp32": fp32 * scale * 32 / (SMS * LANES["fma"] * f),
        "alu": by_pipe["alu"] * 32 / (SMS * LANES["alu"] * f),
        "fma+imad": max((by_pipe["fma"] + by_pipe["fmaheavy"]) / LANES["fma"],
                        by_pipe["fmaheavy"] / LANES["fmaheavy"]) * 32 / (SMS * f),
        "lsu": by_pipe["lsu"] * 32 / (SMS * LANES["lsu"] * f),
    }
    bounds = {k: 1e3 * v for k, v in bounds.items()}
    per_elem = {k: body[k] / per_thread for k in REPORT_CLASSES if body.get(k)}
    loop_bytes = sum(body[k] * int(k[4:]) // 8 for k in body if k[:4] in ("LDG.", "STG."))
    return dict(programs=programs, trips=trips, vocab=vocab, block=block, warps=warps,
                per_thread=per_thread, loop_instr=len(sass.loop_ops),
                instr_per_elem=len(sass.loop_ops) / per_thread, per_elem=per_elem,
                loop_bytes_per_elem=loop_bytes / per_thread, bytes=nbytes,
                warp_instr=warp_ins, bounds=bounds, binding=max(bounds, key=bounds.get))


def block_of(la: Launch) -> int:
    for p, v in la.constexprs.items():
        if list(la.signature)[p[0]] == "BLOCK_V":
            return int(v)
    return 0


# ---------------------------------------------------------------------------


def _compile_one(i):
    """Worker: compile launch i of the parent's list (a fork inherits it), read its cubin's
    resources and, with _WANT["sass"], analyze its SASS; (i, resources, Sass, error)."""
    la = _UNIQUE[i]
    try:
        cubin = compile_launch(la, _TARGET).asm["cubin"]
    except Exception as exc:
        return i, None, None, f"{type(exc).__name__}: {str(exc)[:2000]}"
    res = resources(cubin) if _WANT["resources"] else {}
    sass = analyze(disassemble(cubin), streams=bool(block_of(la))) if _WANT["sass"] else None
    return i, res, sass, None


_UNIQUE: list = []
_TARGET = None
_WANT = {"resources": False, "sass": False}


def main(argv=None) -> int:
    global _UNIQUE, _TARGET
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--resources", action="store_true",
                    help="registers, stack and local memory of each cubin")
    ap.add_argument("--sass", action="store_true",
                    help="hot-loop instruction mix and the H100 throughput model")
    ap.add_argument("--only", default="", help="the scenarios whose name holds this text")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", help="write every specialization and its counts here")
    ap.add_argument("--list", action="store_true", help="record and list; compile nothing")
    args = ap.parse_args(argv)
    target = GPUTarget("cuda", args.arch, 32)
    _TARGET = target
    print(f"triton {triton.__version__}, torch {torch.__version__}, target sm_{args.arch}")
    selected = [s for s in scenarios() if args.only in s.name]
    try:
        launches, status = record(target, selected)
    except Unsupported as exc:
        print(f"cannot derive the JIT's specializations: {exc}")
        return 2
    failed = 0
    for name, (n, err) in status.items():
        if n == 0:
            failed += 1
            print(f"FAIL  scenario {name}: no launch recorded ({err})")
    unique: dict = {}
    for la in launches:
        unique.setdefault(la.key(), []).append(la)
    _UNIQUE = [v[0] for v in unique.values()]
    users = [sorted({x.scenario for x in v}) for v in unique.values()]
    print(f"{len(selected)} scenarios, {len(launches)} launches, {len(_UNIQUE)} distinct "
          "specializations")
    if args.list:
        for la, us in zip(_UNIQUE, users):
            print(f"      {la.name} warps={la.options['num_warps']} {la.hints()} "
                  f"<- {us[0]}" + (f" (+{len(us) - 1})" if len(us) > 1 else ""))
        return 1 if failed else 0

    need_sass = bool(args.sass or args.json)
    if need_sass and not find_tool("cuobjdump") and not find_tool("nvdisasm"):
        print("(no cuobjdump or nvdisasm on PATH, in Triton's bin or in an nvidia-* package: "
              "no SASS analysis)")
        need_sass = False
    _WANT.update(resources=bool(args.resources or need_sass), sass=need_sass)
    done: list = [None] * len(_UNIQUE)
    if args.jobs > 1 and len(_UNIQUE) > 1:
        import multiprocessing as mp
        with mp.get_context("fork").Pool(args.jobs) as pool:
            for out in pool.imap_unordered(_compile_one, range(len(_UNIQUE))):
                done[out[0]] = out[1:]
    else:
        done = [_compile_one(i)[1:] for i in range(len(_UNIQUE))]

    records = []
    for la, us, (res, sass, err) in zip(_UNIQUE, users, done):
        label = f"{la.name} warps={la.options['num_warps']} {la.hints()}"
        src = f"<- {us[0]}" + (f" (+{len(us) - 1} more)" if len(us) > 1 else "")
        if err:
            failed += 1
            print(f"FAIL  {label} {src}: {err}")
            continue
        rec = dict(kernel=la.name, scenarios=us, num_warps=la.options["num_warps"],
                   signature=la.signature,
                   constexprs={list(la.signature)[p[0]]: repr(v) for p, v in
                               la.constexprs.items()},
                   divisible16=la.divisible16(), **res)
        extra = ""
        if args.resources:
            extra = " ".join(f"{k}={v}" for k, v in res.items()) if res else \
                "(cuobjdump not found)"
        if sass is not None:
            rec["spill_instructions"] = sass.spills
            rec["loop"] = list(sass.loop) if sass.loop else None
            rec["loop_mix"] = dict(Counter(classify(op) for op in sass.loop_ops))
            rec["_sass"] = sass
        records.append((la, rec))
        print(f"ok    {label} {extra} {src}")
    print(f"{failed} failed")

    if args.sass and need_sass:
        order = {}  # scenario -> the kernels it launched, in launch order
        for la in launches:
            names = order.setdefault(la.scenario, [])
            if la.key() not in names:
                names.append(la.key())
        print_report(records, {s.name: s for s in selected}, order)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"triton": triton.__version__, "arch": args.arch,
                       "specializations": [{k: v for k, v in r.items() if k != "_sass"}
                                           for _, r in records]}, fh, indent=1, default=str)
    return 1 if failed else 0


BOUNDS = ("mem", "issue", "mufu", "xu", "fp32", "alu", "fma+imad", "lsu")


def print_report(records, by_name, order):
    """The markdown tables of --sass."""
    print("\n## Registers and spills of every specialization (sm_90)\n")
    print("| kernel | warps | specialization | regs | stack B | local B | LDL/STL | scenarios |")
    print("|---|---|---|---|---|---|---|---|")
    for la, r in records:
        print(f"| {la.name} | {r['num_warps']} | {la.hints()} | {r.get('regs', '?')} | "
              f"{r.get('stack', '?')} | {r.get('local', '?')} | {r['spill_instructions']} | "
              f"{len(r['scenarios'])} |")
    rows = []
    for la, r in records:
        model_users = [u for u in r["scenarios"] if by_name[u].model]
        if model_users:
            sc = by_name[model_users[0]]
            rows.append((la, r, model_users,
                         model(la, r["_sass"], sc.rows, sc.vocab, block_of(la))))
    if not rows:
        return
    print(f"\n## Streaming loop, per thread and element (bf16, V = {V_MODEL}; "
          f"vocabulary-parallel: a shard of V / {SHARDS})\n")
    print("Instructions of the loop body divided by the elements a thread handles per trip "
          "(BLOCK_V / (32 num_warps)). A kernel without a loop handles one block per program: "
          "its whole code. A kernel without a BLOCK_V (per row, O(k)): its whole code once "
          "per thread. LDG/STG B: bytes the listed loads and stores move per element (for a "
          "loop-free kernel, the row's scalar loads included).\n")
    cls = [c for c in REPORT_CLASSES if any(c in m["per_elem"] for *_, m in rows)]
    print("| kernel | scenario | regs | BLOCK_V | loop instr | trips | LDG/STG B | "
          + " | ".join(cls) + " | total |")
    print("|" + "---|" * (8 + len(cls)))
    for la, r, us, m in rows:
        loop = "0x%x-0x%x" % tuple(r["loop"]) if r["loop"] else "none"
        print(f"| {la.name} | {us[0]} | {r.get('regs', '?')} | {m['block'] or '-'} | "
              f"{m['loop_instr']} ({loop}) | {m['trips']:.3g} | {m['loop_bytes_per_elem']:.2f} | "
              + " | ".join(f"{m['per_elem'].get(c, 0):.2f}" for c in cls)
              + f" | {m['instr_per_elem']:.2f} |")
    print(f"\n## Lower bounds (ms) at N = {N_MODEL}: H100 SXM, {SMS} SMs at {CLOCK_GHZ} GHz, "
          f"{BW_TBS} TB/s\n")
    print("mem: DRAM bytes / bandwidth; issue: warp-instructions / (4 per clock per SM); mufu: "
          "16 lanes, xu: MUFU and the conversions (F2F, I2F, F2I) that share its 16 lanes, fp32: 128 lanes (FFMA FADD FMUL FMNMX FSETP FSEL, half2), alu: 64 lanes "
          "(integer, logic, compare, select, move, PRMT/F2FP), fma+imad: the FMA pipes "
          "shared with IMAD (64 lanes), lsu: 32 lanes, per clock per SM.\n")
    print("| kernel | scenario | programs | DRAM MB | warp-instr (1e9) | "
          + " | ".join(BOUNDS) + " | binding |")
    print("|" + "---|" * (6 + len(BOUNDS)))
    for la, r, us, m in rows:
        b = m["bounds"]
        print(f"| {la.name} | {us[0]} | {m['programs']} | {m['bytes'] / 1e6:.0f} | "
              f"{m['warp_instr'] / 1e9:.3f} | " + " | ".join(f"{b[k]:.3f}" for k in BOUNDS)
              + f" | {m['binding']} |")
    print("\n## One loss call (forward and backward): sum of each launch's largest bound (ms)\n")
    print("| scenario | launches | lower bound |")
    print("|---|---|---|")
    for name in sorted(MODEL):
        mine = sorted(((la, m) for la, r, us, m in rows if name in r["scenarios"]),
                      key=lambda x: order[name].index(x[0].key()))
        if mine:
            total = sum(max(m["bounds"].values()) for _, m in mine)
            names = " + ".join(f"{la.name} ({m['binding']})" for la, m in mine)
            print(f"| {name} | {names} | {total:.2f} |")


def _short(users) -> str:
    return users[0] + (f" (+{len(users) - 1})" if len(users) > 1 else "")


if __name__ == "__main__":
    sys.exit(main())
