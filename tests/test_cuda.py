"""The compiled module's build and its CUDA kernels.

Without a GPU: the CPU part is built where a C++ compiler is, the CUDA part where
nvcc is, the module holds sm_90a code (cuobjdump), and the CUDA kernels' row
logic runs on the host (csrc/tests/cluster_split.cpp: the row programs of
opd_math.h under an emulation of the kernels' block and cluster reductions, for
several cluster sizes, against the one-block result and the CPU kernels).

With a GPU: the CUDA kernels against the CPU kernels (held to the float64 oracle
in test_compiled.py) and the oracle, on clusters, the streaming fallback, the
adversarial rows, determinism, the scaling kernel and CUDA-graph capture.
"""

import glob
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import sgopd_kernels as sk
from sgopd_kernels import _ext, compiled
from compiled_harness import gated_loss, make_opts, sampled_loss
from helpers import assert_grad_close, assert_loss_close, oracle_opd, oracle_topk
from topk_cases import check_against_oracle, draw_case, top_heavy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CXX = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")


def _nvcc():
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc") or (
        "/usr/local/cuda/bin/nvcc" if os.path.isfile("/usr/local/cuda/bin/nvcc") else None)


def _cuobjdump():
    nvcc = _nvcc()
    cands = []
    if nvcc:
        cands += [os.path.join(os.path.dirname(os.path.realpath(nvcc)), "cuobjdump"),
                  os.path.join(os.path.dirname(nvcc), "cuobjdump")]
    cands += [shutil.which("cuobjdump") or ""]
    try:  # Triton's wheel carries one
        import triton
        cands += glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia",
                                        "bin", "cuobjdump"))
    except Exception:
        pass
    return next((c for c in cands if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


# ---------------------------------------------------------------------------
# the build

@pytest.mark.skipif(os.environ.get("SGOPD_NO_EXT") == "1" or CXX is None,
                    reason="no C++ compiler at install time (or SGOPD_NO_EXT=1)")
def test_compiler_present_means_module_built():
    """A silent build failure would skip every compiled test: where a compiler is, the
    module must be there."""
    assert _ext.module is not None, _ext.error
    assert compiled.available("cpu")
    assert compiled.build_info()["cpu_isa"] in ("x86-64-v4", "x86-64-v3", "x86-64", "generic")


@pytest.mark.skipif(os.environ.get("SGOPD_NO_EXT") == "1" or os.environ.get("SGOPD_NO_CUDA")
                    == "1" or _nvcc() is None, reason="no nvcc at install time (or "
                    "SGOPD_NO_EXT=1 / SGOPD_NO_CUDA=1)")
def test_nvcc_present_means_cuda_part_built_with_sm90a():
    assert _ext.module is not None, _ext.error
    assert compiled.build_info()["has_cuda"], "nvcc is here but the CUDA part was not built"
    archs = compiled.build_info()["cuda_archs"].split()
    assert "sm_90a" in archs and "sm_80" in archs and "compute_80" in archs
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump next to nvcc, on PATH or in Triton's wheel")
    out = subprocess.run([tool, "--list-elf", _ext.module.__file__], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "sm_90a" in out.stdout and "sm_80" in out.stdout, out.stdout
    ptx = subprocess.run([tool, "--list-ptx", _ext.module.__file__], capture_output=True,
                         text=True, timeout=120)
    assert "compute_80" in ptx.stdout or "sm_80" in ptx.stdout, ptx.stdout + ptx.stderr


@pytest.mark.skipif(_nvcc() is None, reason="no nvcc")
def test_cuda_kernels_use_no_local_memory(tmp_path):
    """Every kernel's sm_90a code keeps its arrays in registers: no stack frame, no spills
    (ptxas's report; a loop over a runtime count indexing a small array puts it in local
    memory, one load and store per element)."""
    out = subprocess.run(
        [_nvcc(), "-cubin", "-arch=sm_90a", "-O3", "-std=c++17", "-Xptxas", "-v",
         "-I" + os.path.join(ROOT, "csrc"), os.path.join(ROOT, "csrc", "cuda", "kernels.cu"),
         "-o", str(tmp_path / "kernels.cubin")], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    frames = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill "
                        r"loads", out.stderr)
    kernels = re.findall(r"Compiling entry function '(\w+)'", out.stderr)
    assert len(frames) == len(kernels) and any("topk_stream" in k for k in kernels), out.stderr
    bad = [(k, f) for k, f in zip(kernels, frames) if f != ("0", "0", "0")]
    assert not bad, bad


@pytest.mark.skipif(CXX is None, reason="no C++ compiler")
def test_cluster_split_on_the_host(tmp_path):
    """The CUDA kernels' row programs under an emulation of their reductions: cluster sizes
    1-8, block sizes 64 and 256, against the one-block result and the CPU kernels."""
    exe = str(tmp_path / "cluster_split")
    build = subprocess.run(
        [CXX, "-O2", "-std=c++17", "-ffp-contract=fast", "-fno-math-errno",
         "-fno-trapping-math", "-DSGOPD_NO_CLONES", os.path.join(ROOT, "csrc", "tests",
                                                                 "cluster_split.cpp"),
         os.path.join(ROOT, "csrc", "cpu", "kernels.cpp"), "-o", exe, "-pthread"],
        capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([exe], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:]
    for part in ("ok plan", "ok opd", "ok sampled", "ok all"):
        assert part in run.stdout, run.stdout[-2000:]


@pytest.mark.skipif(CXX is None, reason="no C++ compiler")
def test_topk_split_on_the_host(tmp_path):
    """The CUDA top-k kernels' row logic (a bitmap of the categories, one running maximum per
    thread, the block's tree, warp 0's category terms) under an emulation of their layout, for
    block sizes 64 and 256, against the CPU kernels' two-pass sums and their gradient."""
    exe = str(tmp_path / "topk_split")
    build = subprocess.run(
        [CXX, "-O2", "-std=c++17", "-ffp-contract=fast", "-fno-math-errno",
         "-fno-trapping-math", "-DSGOPD_NO_CLONES",
         os.path.join(ROOT, "csrc", "tests", "topk_split.cpp"),
         os.path.join(ROOT, "csrc", "cpu", "kernels.cpp"), "-o", exe, "-pthread"],
        capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([exe], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:]
    for part in ("ok top-heavy", "ok large logits", "ok -inf and NaN", "ok k > warp", "ok all"):
        assert part in run.stdout, run.stdout[-2000:]


@pytest.mark.skipif(_ext.module is None, reason=f"the compiled module is not built "
                    f"({_ext.error})")
def test_plans_of_the_design_sizes():
    """Both bf16 rows of V = 151936 fit on chip in at most 8 blocks of an H100-class GPU
    (227 KiB of shared memory per block); a row of 2^20 columns streams."""
    limit = 227 * 1024 - 2048
    cluster, chunk, smem, resident = _ext.module.row_plan(151936, 2, 2, limit, limit // 2, 8)
    assert resident and cluster <= 8 and chunk * cluster >= 151936 and smem <= limit
    assert not _ext.module.row_plan(1 << 20, 2, 2, limit, limit // 2, 8)[3]
    assert _ext.module.row_plan(151936, 2, 2, 163 * 1024, 80 * 1024, 1)[0] == 1


# ---------------------------------------------------------------------------
# on a GPU

needs_cuda_ext = pytest.mark.skipif(
    not compiled.available("cuda"),
    reason="needs a CUDA GPU and the module's CUDA part (built where nvcc is); without a GPU "
           "the kernels' row logic is tested on the host (test_cluster_split_on_the_host)")
DIVS = ["reverse_kl", "forward_kl", "jsd"]


def _rand(n, vocab, vocab_t=None, seed=0, dtype=torch.float32, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    s = (scale * torch.randn(n, vocab, generator=gen)).to(dtype)
    t = (scale * torch.randn(n, vocab_t or vocab, generator=gen)).to(dtype)
    y = torch.randint(0, vocab, (n,), generator=gen)
    return s, t, y


def _both(fn, *args, **kw):
    """(CUDA result, CPU result) of one compiled call on the same inputs."""
    cuda = fn(*[a.cuda() if isinstance(a, torch.Tensor) else a for a in args], **kw)
    cpu = fn(*args, **kw)
    return cuda, cpu


def _close_tables(a, b, what):
    a, b = a.cpu().double(), b.double()
    fin = torch.isfinite(b)
    assert torch.equal(torch.isnan(a), torch.isnan(b)), what
    assert torch.equal(a[torch.isinf(b)], b[torch.isinf(b)]), what
    err = (a[fin] - b[fin]).abs()
    assert bool((err <= 1e-4 + 2e-4 * b[fin].abs()).all()), (what, float(err.max()))


def _close_grads(a, b, what):
    dtype = b.dtype
    a, b = a.cpu().double(), b.double()
    assert torch.equal(torch.isnan(a), torch.isnan(b)), what
    fin = torch.isfinite(b)
    scale = float(b[fin].abs().max()) if fin.any() else 0.0
    rt = {torch.float32: 1e-5, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}[dtype]
    err = (a[fin] - b[fin]).abs()
    assert bool((err <= 1e-6 * scale + 1e-12 + rt * b[fin].abs()).all()), \
        (what, float(err.max()), scale)


@needs_cuda_ext
@pytest.mark.parametrize("vocab", [61, 4099, 32000, 151936, 300000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("divergence", DIVS)
def test_cuda_matches_cpu_kernels(vocab, dtype, divergence):
    """Small rows (one block), V = 151936 (a cluster), V = 300000 fp32 (the streaming
    fallback for fp32; bf16 still fits a cluster); a padded float32 teacher; a gate."""
    n = 6 if vocab > 100000 else 24
    s, t, y = _rand(n, vocab, vocab + 5, seed=vocab % 97)
    s = s.to(dtype)
    sign = torch.tensor([1.0, -1.0, 0.0] * (n // 3))
    coef = torch.rand(n)
    opts = make_opts(divergence=divergence, beta=0.2, temperature=0.9, teacher_temperature=1.1)
    (tab_c, g_c), (tab, g) = _both(compiled.opd_rows_grad, s, t, y, sign, coef, opts)
    _close_tables(tab_c, tab, f"table V={vocab}")
    _close_grads(g_c, g, f"grad V={vocab}")
    assert g_c.dtype == dtype and g_c.shape == s.shape
    # forward only, then the recompute backward: the same table, a gradient that agrees
    tab2 = compiled.opd_rows(s.cuda(), t.cuda(), y.cuda(), sign.cuda(), opts)
    _close_tables(tab2, tab, "forward only")
    g2 = compiled.opd_rows_backward(coef.cuda(), s.cuda(), t.cuda(), y.cuda(), tab2, opts)
    _close_grads(g2, g, "recompute")
    # deterministic: a second run gives the same bits
    tab3, g3 = compiled.opd_rows_grad(s.cuda(), t.cuda(), y.cuda(), sign.cuda(), coef.cuda(),
                                      opts)
    assert torch.equal(tab3, tab_c) and torch.equal(g3, g_c)


@needs_cuda_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_sampled_matches_cpu_kernels(dtype):
    for vocab in (127, 151936):
        s, _, y = _rand(8, vocab, seed=3, dtype=dtype)
        tlp = -5 * torch.rand(8)
        sign = torch.tensor([1.0, -1.0] * 4)
        opts = make_opts(extrapolation=1.5, interpolation=0.5, temperature=0.8)
        (tab_c, g_c), (tab, g) = _both(compiled.sampled_rows_grad, s, tlp, y, sign,
                                       torch.ones(8), opts)
        _close_tables(tab_c, tab, "sampled table")
        _close_grads(g_c, g, "sampled grad")


@needs_cuda_ext
@pytest.mark.parametrize("design", ["stored", "recompute"])
def test_cuda_against_the_oracle_on_adversarial_rows(design):
    s, t, y = _rand(8, 300, 304, seed=12, scale=4.0)
    s[1, ::7] = float("-inf")
    t[1, ::5] = float("-inf")
    s[2, ::3] = -1e4
    t[3, :300] = s[3]  # delta == 0 with a verdict
    v = torch.tensor([True, False, True, True, False, True, False, True])
    y[4] = -100
    s = s[:, :].clone()
    for div in ("reverse_kl", "forward_kl"):
        x = s.cuda().requires_grad_(True)
        kw = dict(divergence=div, beta=0.3, reduction="sum")
        loss = gated_loss(x, t.cuda(), y.cuda(), v.cuda(), design=design, **kw)
        (g,) = torch.autograd.grad(loss, x)
        want, _, g_want = oracle_opd(s, t, y, v, **kw)
        _, _, g_eager = oracle_opd(s, t, y, v, dtype=torch.float32, **kw)
        assert_loss_close(loss.cpu().reshape(1), want.reshape(1))
        assert_grad_close(g.cpu(), g_want, torch.float32, g_eager)


@needs_cuda_ext
def test_cuda_nan_token_and_masked_rows():
    s, t, y = _rand(6, 5000, seed=4)
    s[1, 50] = float("nan")
    y[2] = 5000
    y[3] = -(2 ** 40)
    y[4] = -100
    x = s.cuda().requires_grad_(True)
    loss = gated_loss(x, t.cuda(), y.cuda(), reduction="none")
    (g,) = torch.autograd.grad(loss.sum(), x)
    loss, g = loss.cpu(), g.cpu()
    assert torch.isnan(loss[[1, 2, 3]]).all() and torch.isfinite(loss[[0, 5]]).all()
    assert loss[4] == 0 and (g[4] == 0).all()
    assert torch.isnan(g[[1, 2, 3]]).all() and torch.isfinite(g[[0, 5]]).all()
    loss = sampled_loss(s.cuda(), torch.zeros(6).cuda(), y.cuda(), reduction="none").cpu()
    assert torch.isnan(loss[[1, 2, 3]]).all() and loss[4] == 0


@needs_cuda_ext
def test_cuda_strided_views_read_in_place():
    base = torch.randn(2, 7, 4099, device="cuda")
    teacher = torch.randn(2, 7, 4103, device="cuda")
    s, t = base[:, :-1], teacher[:, :-1]  # rows not 16-byte aligned: the scalar path
    y = torch.randint(0, 4099, (2, 6), device="cuda")
    opts = make_opts(divergence="forward_kl")
    tab_c, g_c = compiled.opd_rows_grad(s, t, y.reshape(-1), None, None, opts)
    tab, g = compiled.opd_rows_grad(s.cpu(), t.cpu(), y.reshape(-1).cpu(), None, None, opts)
    _close_tables(tab_c, tab, "strided")
    _close_grads(g_c, g, "strided")


@needs_cuda_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_scale_kernel_skips_one(dtype):
    g0 = torch.randn(64, 1000, device="cuda").to(dtype)
    g = g0.clone()
    compiled.scale_grad_(g, torch.tensor(1.0, device="cuda"))
    assert torch.equal(g, g0)
    compiled.scale_grad_(g, torch.tensor(0.5, device="cuda"))
    assert torch.equal(g, (g0.float() * 0.5).to(dtype))
    f = torch.randn(64, device="cuda")
    g = g0.clone()
    compiled.scale_grad_(g, f)
    assert torch.equal(g, (g0.float() * f[:, None]).to(dtype))


@needs_cuda_ext
def test_cuda_graph_capture_of_forward_and_backward():
    """No host synchronization: the forward with its stored gradient and the scaling pass
    are captured in a CUDA graph and replayed."""
    s, t, y = _rand(32, 32000, seed=8, dtype=torch.bfloat16)
    s, t, y = s.cuda(), t.cuda(), y.cuda()
    coef = torch.full((32,), 1 / 32, device="cuda")
    g_out = torch.tensor(2.0, device="cuda")
    opts = make_opts(beta=0.1)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        compiled.opd_rows_grad(s, t, y, None, coef, opts)  # warm-up
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        table, grad = compiled.opd_rows_grad(s, t, y, None, coef, opts)
        compiled.scale_grad_(grad, g_out)
    graph.replay()
    torch.cuda.synchronize()
    want_t, want_g = compiled.opd_rows_grad(s, t, y, None, coef, opts)
    assert torch.equal(table, want_t)
    assert torch.equal(grad, (want_g.float() * 2.0).to(grad.dtype))


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))


# ---------------------------------------------------------------------------
# the top-k teacher on a GPU

needs_cuda_topk = pytest.mark.skipif(
    not compiled.available("cuda"),
    reason="needs a CUDA GPU and the module's CUDA part (built where nvcc is); without a GPU "
           "the top-k kernels' row logic is tested on the host (test_topk_split_on_the_host)")

def _topk_inputs(n, vocab, k, seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    s = (3 * torch.randn(n, vocab, generator=gen)).to(dtype)
    lp = torch.log_softmax(2 * torch.randn(n, vocab, generator=gen), -1)
    ids = lp.topk(k, -1).indices
    tlp = lp.gather(-1, ids)
    ids[::3, -1] = -1  # unused slots
    y = torch.randint(0, vocab, (n,), generator=gen)
    y[1] = ids[1, 0]  # a token among the ids
    y[2] = -100
    return s, ids, tlp, y


@needs_cuda_topk
@pytest.mark.parametrize("vocab", [61, 4099, 151936, 390000, 1000000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("divergence", DIVS)
def test_cuda_topk_matches_cpu_kernels(vocab, dtype, divergence):
    """The CUDA top-k passes against the CPU ones (held to the oracle in test_compiled.py):
    the table, and the gradient of the recompute backward; deterministic. V = 390000 needs
    just under 48 KiB of dynamic shared memory (with the static scratch, over the default
    limit), V = 10^6 the opt-in beyond it."""
    s, ids, tlp, y = _topk_inputs(6 if vocab > 100000 else 24, vocab, min(20, vocab), vocab % 89,
                                  dtype)
    n = s.shape[0]
    sign = torch.tensor([1.0, -1.0, 0.0] * (n // 3))
    opts = make_opts(divergence=divergence, beta=0.2, temperature=0.9, tail_floor=1e-6)
    ttl = -6 - torch.rand(n)
    args = (s, ids, tlp, ttl, y)
    tab = compiled.topk_rows(*args, sign, opts)
    tab_c = compiled.topk_rows(*(a.cuda() for a in args), sign.cuda(), opts)
    _close_tables(tab_c, tab, f"top-k table V={vocab}")
    gr = torch.rand(n)
    g = compiled.topk_rows_backward(gr, *args, tab, opts)
    g_c = compiled.topk_rows_backward(gr.cuda(), *(a.cuda() for a in args), tab_c, opts)
    _close_grads(g_c, g, f"top-k grad V={vocab}")
    again = compiled.topk_rows(*(a.cuda() for a in args), sign.cuda(), opts)
    assert torch.equal(again, tab_c)


@needs_cuda_topk
@pytest.mark.filterwarnings("ignore:verifier. a float tensor")
@settings(max_examples=25, deadline=None, derandomize=True,
          phases=[Phase.explicit, Phase.reuse, Phase.generate],
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_cuda_topk_matches_oracle(data):
    """The adversarial cases of the Triton and CPU top-k tests, on the CUDA kernels."""
    check_against_oracle("cuda", "cuda", *draw_case(data.draw))


@needs_cuda_topk
def test_cuda_topk_tail_when_the_top_k_holds_nearly_all():
    gen = torch.Generator().manual_seed(0)
    n, vocab, k = 6, 3000, 8
    s = 0.5 * torch.randn(n, vocab, generator=gen)
    ids = torch.stack([torch.randperm(vocab, generator=gen)[:k] for _ in range(n)])
    s = top_heavy(s.scatter_add(-1, ids, 6.0 + torch.randn(n, k, generator=gen)), ids, 1e-12)
    tlp = torch.log_softmax(torch.randn(n, vocab, generator=gen), -1).gather(-1, ids)
    y = torch.randint(0, vocab, (n,), generator=gen)
    for divergence in DIVS:
        kw = dict(divergence=divergence, reduction="sum")
        x = s.cuda().requires_grad_(True)
        loss = sk.topk_opd_loss(x, ids.cuda(), tlp.cuda(), y.cuda(), backend="cuda", **kw)
        (g,) = torch.autograd.grad(loss, x)
        want, _, g_want = oracle_topk(s, ids, tlp, None, y, **kw)
        _, _, g_eager = oracle_topk(s, ids, tlp, None, y, dtype=torch.float32, **kw)
        assert_loss_close(loss.cpu().reshape(1), want.reshape(1))
        assert_grad_close(g.cpu(), g_want, torch.float32, g_eager)


@needs_cuda_topk
def test_cuda_topk_refuses_rows_beyond_its_shared_memory():
    s = torch.zeros(1, 1 << 23, device="cuda", dtype=torch.bfloat16)
    ids = torch.zeros(1, 4, dtype=torch.long, device="cuda")
    with pytest.raises(NotImplementedError, match="student_logits.*triton"):
        sk.topk_opd_loss(s, ids, torch.zeros(1, 4, device="cuda"),
                         torch.zeros(1, dtype=torch.long, device="cuda"), backend="cuda")
