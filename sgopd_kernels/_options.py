"""The options of a loss call, validated once in :mod:`sgopd_kernels.api`.

:class:`RowOptions` holds what the row kernels of every backend need (the
formulas of docs/math.md); it is frozen, so one object can travel through the
single-device, vocabulary-parallel, fused-linear and module paths unchanged.
Custom-op schemas cannot take a dataclass: :meth:`RowOptions.op_args` flattens
it into the op's scalar arguments (named in :data:`OP_SCHEMA`) and
:meth:`RowOptions.from_op_args` rebuilds it inside the op.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, fields


class Divergence(enum.IntEnum):
    """The divergence between the student and the bridged target (docs/math.md).

    Its integer value reaches the kernels as a compile-time constant.
    """

    REVERSE_KL = 0  # KL(p_S || q)
    FORWARD_KL = 1  # KL(q || p_S)
    JSD = 2         # pi KL(q || m) + (1 - pi) KL(p_S || m), m = (1 - pi) p_S + pi q

    @property
    def label(self) -> str:
        """The public name: "reverse_kl", "forward_kl" or "jsd"."""
        return self.name.lower()

    @classmethod
    def labels(cls) -> tuple:
        return tuple(d.label for d in cls)

    @classmethod
    def parse(cls, value) -> "Divergence":
        """A public name (or a Divergence) to the enum; ValueError naming ``divergence``."""
        if isinstance(value, cls):
            return value
        for d in cls:
            if value == d.label:
                return d
        raise ValueError(f"divergence: expected one of {cls.labels()}, got {value!r}")


@dataclass(frozen=True)
class RowOptions:
    """What every backend's row kernels need, validated (see ``api._row_options``).

    ``teacher_temperature`` is resolved: it equals ``temperature`` unless the
    caller set it apart. ``beta`` and ``divergence`` do not apply to the
    sampled-token estimator (which keeps their defaults). ``tail_floor`` is the
    least teacher mass of a top-k teacher's tail bucket (the top-k family only).
    """

    divergence: Divergence = Divergence.REVERSE_KL
    beta: float = 0.0
    lam_pos: float = 1.8
    lam_neg: float = 1.0
    jsd_beta: float = 0.5
    temperature: float = 1.0
    teacher_temperature: float = 1.0
    ignore_index: int = -100
    tail_floor: float = 1e-7

    @property
    def reverse(self) -> bool:
        return self.divergence == Divergence.REVERSE_KL

    def op_args(self) -> tuple:
        """The scalars of :data:`OP_SCHEMA`, in its order."""
        return tuple(int(v) if isinstance(v, Divergence) else v
                     for v in (getattr(self, f.name) for f in fields(self)))

    @classmethod
    def from_op_args(cls, *args) -> "RowOptions":
        values = dict(zip((f.name for f in fields(cls)), args))
        values["divergence"] = Divergence(values["divergence"])
        return cls(**values)


# the options as custom-op schema arguments, "int divergence, float beta, ...": a Divergence
# travels as its int
OP_SCHEMA = ", ".join(f"{'float' if f.type == 'float' else 'int'} {f.name}"
                      for f in fields(RowOptions))
N_OP_ARGS = len(fields(RowOptions))


@dataclass(frozen=True)
class LossOptions:
    """Every keyword option of a loss call, validated: what ``GatedOPDLoss`` holds.

    The per-call tensors (verifier, weights, ``num_items_in_batch``) are not options.
    """

    rows: RowOptions = RowOptions()
    reduction: str = "mean"
    return_stats: bool = False
    backend: str = "auto"
    process_group: object = None
