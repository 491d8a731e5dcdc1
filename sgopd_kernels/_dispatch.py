"""The single dispatch point: which backend runs a loss, and where its code lives.

:data:`CAPABILITIES` is a table of backend x loss family x mode (single device
or vocabulary parallel) x dtype x divergence, in the order ``"auto"`` tries
the backends. :func:`resolve` (the public :func:`sgopd_kernels.resolve_backend`),
the autograd layer (:func:`module`) and the vocabulary-parallel path all
consult it; a new backend is one more entry. Backend modules are imported
only when a loss first runs on them.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from dataclasses import dataclass
from typing import Optional

import torch

from ._options import Divergence

FLOATS = frozenset({torch.float32, torch.bfloat16, torch.float16})
ALL_DIVERGENCES = frozenset(Divergence)
SINGLE, PARALLEL = "single", "parallel"
FAMILIES = ("logits", "sampled", "topk")


@dataclass(frozen=True)
class Capability:
    name: str
    module: str                     # the backend module (imported lazily)
    parallel_module: Optional[str]  # its vocabulary-parallel module, if any
    devices: frozenset              # tensor device types it runs on
    auto_devices: frozenset         # those where "auto" may pick it
    dtypes: frozenset               # the logits' (promoted) dtypes it takes
    families: dict                  # family -> the modes it implements
    divergences: frozenset          # the logits family's divergences it implements
    stores_grad: bool = False       # writes the gradient in forward (backward scales it)
    # a family whose code lives apart from the backend's modules: family -> (its module, its
    # vocabulary-parallel module)
    family_modules: dict = dataclasses.field(default_factory=dict)
    # the divergences of a family other than logits, where not all (the sampled estimator
    # has none)
    family_divergences: dict = dataclasses.field(default_factory=dict)

    def supports(self, family: str, mode: str) -> bool:
        return mode in self.families.get(family, ())

    def implements(self, family: str, divergence: Divergence) -> bool:
        if family == "logits":
            return divergence in self.divergences
        return divergence in self.family_divergences.get(family, ALL_DIVERGENCES)

    def unavailable(self, device_type: str) -> Optional[str]:
        """Why this backend cannot run on tensors of ``device_type`` here (None: it can)."""
        return _UNAVAILABLE[self.name](device_type)


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def interpreting() -> bool:
    """TRITON_INTERPRET is on: Triton kernels run on CPU tensors in the interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _triton_unavailable(device_type: str) -> Optional[str]:
    if not _triton_importable():
        return "the triton package is not importable"
    if device_type != "cuda" and not interpreting():
        return (f"it needs CUDA tensors (got tensors on {device_type}), or TRITON_INTERPRET=1 "
                "set before triton is imported to run the kernels on CPU tensors in the "
                "interpreter")
    return None


def _compiled_unavailable(device_type: str) -> Optional[str]:
    from . import compiled  # (cheap: it imports the extension module or records why not)

    if compiled.available(device_type):
        return None
    info = compiled.build_info()
    if info["module"] is None:
        return (f"the compiled kernels of csrc/ are not built in this installation "
                f"({info['error']}); reinstall with a C++ compiler (and nvcc for CUDA)")
    if device_type == "cuda":
        return ("the compiled kernels were built without their CUDA part (no nvcc at build "
                "time, or SGOPD_NO_CUDA=1), or no CUDA device of compute capability 8.0 or "
                "newer is present")
    return f"the compiled kernels run on CPU and CUDA tensors, got tensors on {device_type}"


_UNAVAILABLE = {"torch": lambda device_type: None, "triton": _triton_unavailable,
                "cuda": _compiled_unavailable, "cpu": _compiled_unavailable}

CAPABILITIES = (
    Capability("cuda", "sgopd_kernels.compiled", None, frozenset({"cuda"}),
               frozenset({"cuda"}), FLOATS,
               {"logits": (SINGLE,), "sampled": (SINGLE,), "topk": (SINGLE,)},
               ALL_DIVERGENCES, stores_grad=True),
    Capability("triton", "sgopd_kernels.triton", "sgopd_kernels.triton.parallel",
               frozenset({"cuda", "cpu"}), frozenset({"cuda"}), FLOATS,
               {"logits": (SINGLE, PARALLEL), "sampled": (SINGLE,), "topk": (SINGLE, PARALLEL)},
               frozenset({Divergence.REVERSE_KL, Divergence.FORWARD_KL}),
               family_modules={"topk": ("sgopd_kernels.triton.topk",) * 2}),
    Capability("cpu", "sgopd_kernels.compiled", None, frozenset({"cpu"}), frozenset({"cpu"}),
               FLOATS, {"logits": (SINGLE,), "sampled": (SINGLE,), "topk": (SINGLE,)},
               ALL_DIVERGENCES, stores_grad=True),
    Capability("torch", "sgopd_kernels.reference", "sgopd_kernels.reference_parallel",
               frozenset({"cpu", "cuda", "meta"}), frozenset({"cpu", "cuda", "meta"}),
               FLOATS | {torch.float64}, {"logits": (SINGLE, PARALLEL),
                                          "sampled": (SINGLE, PARALLEL),
                                          "topk": (SINGLE, PARALLEL)}, ALL_DIVERGENCES),
)
BY_NAME = {c.name: c for c in CAPABILITIES}
# a family whose "auto" order differs from CAPABILITIES': the top-k loss tries Triton before
# the compiled CUDA kernels (Triton forms the O(k) row terms in one kernel; the compiled
# path forms them with torch operations on (N, k) tensors)
AUTO_ORDER = {"topk": ("triton", "cuda", "cpu", "torch")}
assert all(sorted(order) == sorted(BY_NAME) for order in AUTO_ORDER.values())
BACKENDS = ("auto",) + tuple(BY_NAME)


def _device_type(device) -> str:
    if isinstance(device, torch.Tensor):
        return device.device.type
    return torch.device(device if device is not None else "cpu").type


def resolve(backend: str, device, dtype: Optional[torch.dtype], *, family: str = "logits",
            parallel: bool = False, divergence: Divergence = Divergence.REVERSE_KL,
            dtype_of: str = "student_logits") -> str:
    """The backend a call runs: ``backend`` itself, checked, or ``"auto"``'s choice.

    Errors: ValueError for an unknown name or family; NotImplementedError for a
    backend that does not implement this family or mode (or divergence);
    TypeError for a dtype it does not take; RuntimeError for one that cannot run
    here (not built, not importable, wrong device). ``dtype_of`` names the argument whose
    dtype ``dtype`` is (for the message).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if family not in FAMILIES:
        raise ValueError(f"family: expected one of {FAMILIES}, got {family!r}")
    if isinstance(device, torch.Tensor):
        dtype = device.dtype if dtype is None else dtype
    dev = _device_type(device)
    mode = PARALLEL if parallel else SINGLE
    divergence = Divergence.REVERSE_KL if family == "sampled" else divergence
    if backend == "auto":
        order = [BY_NAME[name] for name in AUTO_ORDER[family]] if family in AUTO_ORDER \
            else CAPABILITIES
        for cap in order:
            if (dev in cap.auto_devices and cap.supports(family, mode)
                    and (dtype is None or dtype in cap.dtypes)
                    and cap.implements(family, divergence) and cap.unavailable(dev) is None):
                return cap.name
        raise RuntimeError(f"backend='auto': no backend runs this {family} loss on {dev} "
                           f"tensors of {dtype}")  # (the torch entry covers every case)
    cap = BY_NAME[backend]
    if not cap.supports(family, mode):
        what = "with process_group (vocabulary parallel)" if parallel else "on one device"
        others = [c.name for c in CAPABILITIES if c.supports(family, mode)]
        raise NotImplementedError(
            f"backend={backend!r} does not implement the {family} loss {what}; "
            f"process_group={'set' if parallel else 'None'}: pass backend='auto' or one of "
            f"{others}")
    if not cap.implements(family, divergence):
        raise NotImplementedError(
            f"backend={backend!r} does not implement divergence={divergence.label!r} yet; pass "
            f"backend='auto' or 'torch'")
    if dtype is not None and dtype not in cap.dtypes:
        names = ", ".join(sorted(str(d).replace("torch.", "") for d in cap.dtypes))
        raise TypeError(f"{dtype_of}: backend={backend!r} takes {names} logits, got "
                        f"{str(dtype).replace('torch.', '')}; use backend='torch' for float64")
    why = cap.unavailable(dev)
    if why is None and dev not in cap.devices:
        why = f"it runs on {' or '.join(sorted(cap.devices))} tensors, got tensors on {dev}"
    if why is not None:
        raise RuntimeError(f"backend={backend!r} cannot run here: {why}")
    return backend


def module(backend: str, parallel: bool = False, family: Optional[str] = None):
    """The module that implements ``backend`` (its vocabulary-parallel one with ``parallel``)
    for ``family``."""
    cap = BY_NAME[backend]
    name = cap.parallel_module if parallel else cap.module
    if family in cap.family_modules:
        name = cap.family_modules[family][int(parallel)]
    if name is None:
        raise RuntimeError(f"backend={backend!r} has no vocabulary-parallel implementation")
    return importlib.import_module(name)


def stores_grad(backend: str) -> bool:
    return BY_NAME[backend].stores_grad
