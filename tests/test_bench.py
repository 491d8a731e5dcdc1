"""The benchmark script runs on a CPU and its library rows agree with eager PyTorch."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_loss.py"),
                           *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_bench_help():
    assert "--quick" in _run("--help")


def test_bench_cpu_smoke_with_interpreted_kernels():
    out = _run("--interpret", "--cpu", "--N", "8", "--V", "300", "--dtype", "fp32,bf16",
               "--rep", "1", "--providers", "sgopd-triton,sgopd-torch,torch-eager,speed-of-light",
               "--no-record")
    assert "CPU timings say nothing about GPU speed" in out
    assert "mismatch" not in out and "WARNING" not in out
    rows = [line for line in out.splitlines() if line.rstrip().endswith(" ok")]
    # 5 cases (4 logits, linear-rkl) x 2 dtypes x 2 library backends, each checked against
    # eager PyTorch
    assert len(rows) == 20, out


def test_block_sweep_smoke_with_interpreted_kernels():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "sweep_blocks.py"),
                           "--interpret", "--N", "3", "--V", "200", "--blocks", "64,256",
                           "--warps", "1", "--cases", "rkl,fkl-gated"],
                          capture_output=True, text=True, timeout=600)
    # exit status 1 would mean a launch setting changed the numbers
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count(" ok") == 8 and "best fkl-gated  bwd" in proc.stdout
    assert proc.stdout.count("design: recompute") == 2  # the two backward designs, per case
