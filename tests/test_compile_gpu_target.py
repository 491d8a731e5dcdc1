"""Every Triton kernel specialization compiles for the H100 (sm_90), even without a GPU.

The interpreter runs the kernels' logic on CPU; ``tools/aot_compile.py`` compiles
the same sources through Triton's real CUDA pipeline (TTIR -> PTX -> cubin with
the bundled ptxas), so that a construct the compiler rejects is caught on a CPU
machine. Its specializations come from the library's own launches, as the JIT
would specialize them: these tests check that they do (divisibility hints that
give the contiguous bf16 forward 128-bit loads, the JIT's per-argument rules).
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "aot_compile.py")


def _has_nvidia_backend() -> bool:
    try:
        import triton.backends
    except Exception:
        return False
    return "nvidia" in getattr(triton.backends, "backends", {})


pytestmark = pytest.mark.skipif(not _has_nvidia_backend(),
                                reason="this Triton has no NVIDIA backend")


def _env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return env


def _run(args, timeout):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=_env(),
                          timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """The tool over every scenario, with the SASS analysis; (process, its JSON or None)."""
    out = tmp_path_factory.mktemp("aot") / "aot.json"
    proc = _run([TOOL, "--arch", "90", "--sass", "--json", str(out)], timeout=1500)
    if proc.returncode == 2:
        pytest.skip(proc.stdout.strip().splitlines()[-1])
    data = json.loads(out.read_text()) if out.exists() else None
    return proc, data


def _spec(data, kernel, scenario):
    for s in data["specializations"]:
        if s["kernel"] == kernel and scenario in s["scenarios"]:
            return s
    raise AssertionError(f"no {kernel} specialization recorded for {scenario!r}")


def test_kernels_compile_for_sm90(compiled):
    proc, _ = compiled
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "0 failed" in proc.stdout


def test_contiguous_bf16_forward_is_specialized_and_loads_128_bits(compiled):
    proc, data = compiled
    assert data is not None, proc.stdout[-4000:] + proc.stderr[-4000:]
    fwd = _spec(data, "_opd_fwd_kernel", "logits bf16 rows gate=0 reverse_kl")
    # contiguous rows: both pointers and the row stride divisible by 16, unit strides constant
    assert {"S", "T", "V", "s_st0", "t_st0"} <= set(fwd["divisible16"])
    assert fwd["signature"]["s_stv"] == "constexpr" and fwd["constexprs"]["s_stv"] == "1"
    # a view that starts mid-row loses the pointer's alignment, and a 50257 vocabulary V's
    odd = _spec(data, "_opd_fwd_kernel", "logits bf16 midrow gate=1 reverse_kl")
    assert "S" not in odd["divisible16"] and "s_st0" not in odd["divisible16"]
    gpt2 = _spec(data, "_opd_fwd_kernel", "logits bf16 odd gate=1 reverse_kl")
    assert "V" not in gpt2["divisible16"]
    if fwd.get("loop_mix") is None:
        pytest.skip("no cuobjdump or nvdisasm: the SASS is not checked")
    mix = fwd["loop_mix"]
    assert mix.get("LDG.128", 0) >= 4, mix  # 16 bf16 per thread and tensor: 2 x 128 bits each
    assert not mix.get("LDG.16") and not mix.get("LDG.32"), mix
    # no local memory in the hot loop (a spill outside it costs once per row: triton 3.9 puts
    # two there for this kernel, triton 3.6, the GPU machine's, none)
    assert fwd["regs"] <= 255 and not mix.get("LDL/STL"), mix


def test_rows_off_16_bytes_keep_128_bit_loads_on_a_shifted_grid(compiled):
    """GPT-2's V = 50257 (every row start but one off a 16-byte boundary, the teacher sharing
    the vocabulary): the forward's full blocks, and the backward's blocks inside the row,
    load and store 128 bits on the grid shifted back to a 16-byte boundary (logits, sampled,
    vocabulary-parallel and top-k kernels)."""
    proc, data = compiled
    assert data is not None, proc.stdout[-4000:] + proc.stderr[-4000:]
    fwd = _spec(data, "_opd_fwd_kernel", "logits bf16 gpt2 gate=1 reverse_kl")
    bwd = _spec(data, "_opd_bwd_kernel", "logits bf16 gpt2 gate=1 reverse_kl")
    sfwd = _spec(data, "_sampled_fwd_kernel", "sampled bf16 gpt2 gate=1")
    sbwd = _spec(data, "_sampled_bwd_kernel", "sampled bf16 gpt2 gate=1")
    assert "s_st0" not in fwd["divisible16"]  # (the JIT cannot prove the row starts aligned)
    for spec in (fwd, bwd, sfwd, sbwd):
        assert spec["constexprs"]["ALIGN"] == "True", spec["constexprs"]
    assert fwd["constexprs"]["T_SAME"] == "True" and bwd["constexprs"]["G_SAME"] == "True"
    if fwd.get("loop_mix") is None:
        pytest.skip("no cuobjdump or nvdisasm: the SASS is not checked")
    for spec, loads in ((fwd, 4), (sfwd, 2)):
        mix = spec["loop_mix"]
        assert mix.get("LDG.128", 0) >= loads and not mix.get("LDG.16"), (spec["kernel"], mix)
    # the backward has no loop: its code holds the unmasked branch (128 bits) and the masked
    # one (for the blocks at the row's two ends)
    for spec, loads in ((bwd, 4), (sbwd, 2)):
        mix = spec["loop_mix"]
        assert mix.get("LDG.128", 0) >= loads and mix.get("STG.128", 0) >= 2, (spec["kernel"],
                                                                            mix)
    # an aligned teacher beside the misaligned student keeps its own alignment in forward
    odd = _spec(data, "_opd_fwd_kernel", "logits bf16 odd gate=1 reverse_kl")
    assert odd["constexprs"].get("ALIGN") == "False", odd["constexprs"]
    # a vocabulary-parallel shard of it (6282 columns): both forward kernels shift, in blocks
    # of 2048 (two full blocks on the grid), and the statistics pass's full blocks (its
    # first loop) load 128 bits: one load per model and thread
    tp = "parallel logits bf16 gpt2 gate=1 reverse_kl"
    for kernel in ("_tp_stats_kernel", "_tp_bridge_kernel"):
        spec = _spec(data, kernel, tp)
        assert spec["constexprs"]["ALIGN"] == "True", (kernel, spec["constexprs"])
        assert spec["constexprs"]["BLOCK_V"] == "2048", (kernel, spec["constexprs"])
    mix = _spec(data, "_tp_stats_kernel", tp)["loop_mix"]
    assert mix.get("LDG.128", 0) >= 2 and not mix.get("LDG.16") and not mix.get("LDG.64"), mix
    # the top-k stream and its backward on the same grid: 16 bf16 per thread and block, two
    # 128-bit loads (and, in backward, stores) in the loop over the blocks inside the row
    topk = "topk bf16 odd k=20 gate=1 ttl=1 reverse_kl"
    stream = _spec(data, "_topk_stream_kernel", topk)
    tbwd = _spec(data, "_topk_bwd_kernel", topk)
    assert stream["constexprs"]["ALIGN"] == "True" and tbwd["constexprs"]["ALIGN"] == "True"
    assert tbwd["constexprs"]["G_SAME"] == "True", tbwd["constexprs"]
    for spec, stores in ((stream, 0), (tbwd, 2)):
        mix = spec["loop_mix"]
        assert mix.get("LDG.128", 0) >= 2 and not mix.get("LDG.16"), (spec["kernel"], mix)
        assert mix.get("STG.128", 0) >= stores and not mix.get("STG.16"), (spec["kernel"], mix)


CHECK = textwrap.dedent("""
    import importlib.util, sys
    spec = importlib.util.spec_from_file_location("aot_compile", sys.argv[1])
    aot = importlib.util.module_from_spec(spec)
    sys.modules["aot_compile"] = aot
    spec.loader.exec_module(aot)
    from triton._C.libtriton import native_specialize_impl
    from triton.compiler import make_backend
    target = aot.GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    names = sys.argv[2:]
    launches, status = aot.record(target, [s for s in aot.scenarios() if s.name in names])
    assert all(n for n, _ in status.values()), status
    assert {la.scenario for la in launches} == set(names)
    checked = 0
    for la in launches:
        # the JIT's rule, argument by argument: constexprs as given, floats fp32 unspecialized,
        # the rest through native_specialize_impl (ints == 1 constant, divisibility by 16)
        bound = la.fn.signature.bind(*la.args, **{k: v for k, v in la.kwargs.items()
                                                 if k in la.fn.arg_names}).arguments
        for i, p in enumerate(la.fn.params):
            v = bound[p.name]
            if p.is_constexpr:
                want, attr = "constexpr", None
            else:
                want, attr = native_specialize_impl(backend, v, p.is_const,
                                                    not p.do_not_specialize,
                                                    not p.do_not_specialize_on_alignment)
            assert la.signature[p.name] == want, (la.name, p.name, la.signature[p.name], want)
            if want == "constexpr":
                assert la.constexprs[(i,)] == v, (la.name, p.name)
            got = la.attrs.get((i,)) or None  # (an empty list: no attribute, as absent)
            want_attr = (backend.parse_attr(attr) or None) if isinstance(attr, str) else None
            assert got == want_attr, (la.name, p.name, got, attr)
            checked += 1
        assert la.options["num_warps"] == la.kwargs["num_warps"]
    print("checked", len(launches), "launches,", checked, "arguments")
""")


def test_recorded_specialization_is_the_jits():
    scen = ["logits bf16 rows gate=1 forward_kl", "logits fp32 odd gate=1 reverse_kl",
            "logits bf16 midrow gate=0 forward_kl", "parallel logits bf16 rows gate=1 reverse_kl",
            "sampled bf16 odd gate=1", "topk bf16 vstrided k=20 gate=1 ttl=1 reverse_kl"]
    proc = _run(["-c", CHECK, TOOL, *scen], timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "checked" in proc.stdout
