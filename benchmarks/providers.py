"""The providers: who computes a case's loss.

Each builds ``(forward, grads)`` for a case's inputs or raises ``harness.Skip``
with the reason. The library's backends run the case's own call
(``Case.sgopd``), torch-eager and torch-compile its eager formula
(``Case.eager``), a competitor the case's call under the competitor's name
(``Case.competitors``); speed-of-light is the case's floor, not a
measurement. A provider is one entry of ``PROVIDERS``.
"""

from __future__ import annotations

import torch

from harness import Provider, Skip, loss_of

SGOPD_BACKENDS = ("triton", "cuda", "cpu", "torch")
LIGER_UNUSABLE = "Liger-Kernel is not usable here"  # with the error of its import or module


def sgopd(backend):
    """The library with ``backend=backend``; skipped where ``resolve_backend`` refuses it."""
    def build(ctx, case, inp):
        import sgopd_kernels as sk  # imported after harness.setup: this checkout

        forward, grads = case.sgopd(inp, backend)
        try:
            sk.resolve_backend(backend, grads[0].device, grads[0].dtype)
        except RuntimeError as e:
            raise Skip(str(e)) from None
        return forward, grads
    return build


def torch_formula(compiled):
    """The case's eager formula, as it is or under ``torch.compile(dynamic=False)``."""
    def build(ctx, case, inp):
        if compiled and not ctx.on_gpu and not ctx.args.compile_cpu:
            raise Skip("torch.compile on the CPU is slow: pass --compile-cpu to include it")
        fn, args, grads = case.eager(inp)
        if compiled:
            fn = torch.compile(fn, dynamic=False)
        return (lambda: loss_of(fn(*args))), grads
    return build


def competitor(name, runs_here=None):
    """The case's call for competitor ``name``, or its reason to have none; ``runs_here(ctx)``
    raises Skip where the competitor cannot run."""
    def build(ctx, case, inp):
        call = case.competitors.get(name)
        if call is None:
            raise Skip(case.skips[name])
        if runs_here is not None:
            runs_here(ctx)
        return call(inp)
    return build


def liger_runs_here(ctx):
    if not ctx.on_gpu and not ctx.args.interpret:
        raise Skip("Liger-Kernel's Triton kernels need CUDA tensors (or --interpret on a CPU)")


PROVIDERS = (
    *(Provider(f"sgopd-{b}", sgopd(b), checked=True) for b in SGOPD_BACKENDS),
    Provider("torch-eager", torch_formula(compiled=False)),
    Provider("torch-compile", torch_formula(compiled=True), checked=True, compiles=True),
    Provider("liger", competitor("liger", liger_runs_here), checked=True),
    Provider("trl", competitor("trl"), checked=True),
    Provider("speed-of-light"),
)
