"""Test set-up: where the Triton kernels run, and shared helpers.

With a CUDA GPU the Triton tests run compiled kernels on CUDA tensors. Without
one they run the same kernels on CPU tensors in the Triton interpreter, which
must be switched on before triton is first imported: this file does it.
"""

import os

if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"


def _triton_runs() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return HAS_CUDA or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


TRITON_RUNS = _triton_runs()
needs_triton = pytest.mark.skipif(
    not TRITON_RUNS, reason="triton is not importable, or no GPU and TRITON_INTERPRET is off")
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


@pytest.fixture
def small_blocks(monkeypatch):
    """Shrink the kernels' vocabulary blocks so small rows take several loop steps."""
    from sgopd_kernels.triton import logits, sampled, topk

    for mod in (logits, sampled, topk):
        monkeypatch.setattr(mod, "FWD_BLOCK_V", 64)
        monkeypatch.setattr(mod, "BWD_BLOCK_V", 64)
