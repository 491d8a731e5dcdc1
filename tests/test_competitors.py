"""The benchmark's competitor rows compute the same loss as eager PyTorch.

A side-by-side table is only fair if every provider computes the same number:
these tests run the benchmark's Liger-Kernel and TRL wrappers on a CPU (Liger's
Triton kernels in the interpreter, TRL's torch fallback) and require the
script's correctness check to pass. Each skips when its package is absent.
"""

import importlib.util
import os
import subprocess
import sys

import pytest

from helpers import trl_tail_bucket

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench(*args):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_loss.py"),
                           "--cpu", "--N", "16", "--V", "300", "--rep", "1", "--no-record",
                           *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _checked_rows(out, provider):
    return [line.split() for line in out.splitlines()
            if line.split()[4:5] == [provider] and line.split()[-1] in ("ok", "mismatch")]


def _trl_importable():
    try:
        from trl.kernels.chunked_divergence import ChunkedDivergenceFunction  # noqa: F401
    except Exception:
        return False
    return True


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None,
                    reason="liger-kernel is not installed")
def test_liger_rows_match_eager():
    # LigerJSD(beta=1) on log-probabilities = KL(p_S || p_T); LigerFusedLinearJSD(jsd_beta=1)
    # on hidden states the same. (LigerKLDIVLoss does not run in the Triton interpreter.)
    out = _bench("--interpret", "--cases", "logits-rkl,linear-rkl", "--dtype", "fp32",
                 "--providers", "liger,torch-eager")
    rows = _checked_rows(out, "liger")
    assert [r[0] for r in rows] == ["logits-rkl", "linear-rkl"], out
    assert all(r[-1] == "ok" for r in rows), out


@pytest.mark.skipif(not _trl_importable(), reason="trl.kernels.chunked_divergence is not importable")
def test_trl_rows_match_eager():
    # ChunkedDivergenceFunction(..., beta=1.0): per-token KL(p_S || p_T) from hidden states
    out = _bench("--cases", "linear-rkl", "--dtype", "fp32,bf16", "--providers", "trl,torch-eager")
    rows = _checked_rows(out, "trl")
    assert len(rows) == 2 and all(r[-1] == "ok" for r in rows), out


@pytest.mark.skipif(trl_tail_bucket() is None,
                    reason="trl.experimental.server_distillation is not importable")
def test_trl_tail_bucket_rows_match_eager():
    # _add_tail_bucket on both models' top-k log-probabilities, _jsd_divergence(beta=0): forward
    # KL over the top-k and the tail bucket
    out = _bench("--cases", "topk-k20,topk-k64", "--dtype", "fp32", "--providers",
                 "trl,torch-eager")
    rows = _checked_rows(out, "trl")
    assert [r[0] for r in rows] == ["topk-k20", "topk-k64"] and \
        all(r[-1] == "ok" for r in rows), out
