"""The benchmark script runs on a CPU and its library rows agree with eager PyTorch."""

import glob
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")

# Run in a fresh interpreter: every benchmarks module, executed as __main__ without its final
# `if __name__ == "__main__":` block (what runs before a script's main()), then imported. With
# argument parsing, device queries and tensor factories poisoned, any of them at import fails;
# so does importing triton (--interpret must set TRITON_INTERPRET first) or the library (the
# scripts put this checkout on the path first).
_IMPORT_DOES_NO_WORK = """
import argparse, ast, sys
import torch

def work(*args, **kwargs):
    raise AssertionError("work at import")

argparse.ArgumentParser.parse_known_args = work
for name in ("is_available", "device_count", "get_device_name", "mem_get_info", "synchronize"):
    setattr(torch.cuda, name, work)
for name in ("randn", "rand", "randint", "ones", "zeros", "empty", "full", "tensor", "Generator"):
    setattr(torch, name, work)
bench, paths = sys.argv[1], sys.argv[2:]
sys.path.insert(0, bench)
for path in paths:
    tree = ast.parse(open(path).read(), path)
    last = tree.body[-1]
    if (isinstance(last, ast.If) and isinstance(last.test, ast.Compare)
            and getattr(last.test.left, "id", None) == "__name__"):
        tree.body.pop()
    exec(compile(tree, path, "exec"), {"__name__": "__main__", "__file__": path})
    module = path[len(bench) + 1:-3].replace("/", ".")
    __import__(module[:-len(".__init__")] if module.endswith(".__init__") else module)
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("triton", "sgopd_kernels"))
assert not heavy, heavy
print(len(paths), "modules")
"""


def _run(*args):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_loss.py"),
                           *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_importing_the_benchmarks_does_no_work():
    paths = sorted(glob.glob(os.path.join(BENCH, "**", "*.py"), recursive=True))
    proc = subprocess.run([sys.executable, "-c", _IMPORT_DOES_NO_WORK, BENCH, *paths],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"{len(paths)} modules" in proc.stdout


def test_bench_help():
    assert "--quick" in _run("--help")


def test_bench_cpu_smoke_with_interpreted_kernels():
    out = _run("--interpret", "--cpu", "--N", "8", "--V", "300", "--dtype", "fp32,bf16",
               "--rep", "1", "--providers", "sgopd-triton,sgopd-torch,torch-eager,speed-of-light",
               "--no-record")
    assert "CPU timings say nothing about GPU speed" in out
    assert "mismatch" not in out and "WARNING" not in out
    rows = [line for line in out.splitlines() if line.rstrip().endswith(" ok")]
    # 7 cases (3 logits, sampled, linear-rkl, 2 topk) x 2 dtypes x 2 library backends, each
    # checked against eager PyTorch
    assert len(rows) == 28, out


def test_block_sweep_smoke_with_interpreted_kernels():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "sweep_blocks.py"),
                           "--interpret", "--N", "3", "--V", "200", "--blocks", "64,256",
                           "--warps", "1", "--cases", "rkl,fkl-gated"],
                          capture_output=True, text=True, timeout=600)
    # exit status 1 would mean a launch setting changed the numbers
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count(" ok") == 8 and "best fkl-gated  bwd" in proc.stdout
    assert proc.stdout.count("design: recompute") == 2  # the two backward designs, per case
