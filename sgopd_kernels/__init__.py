"""sgopd_kernels: fused loss kernels for on-policy distillation (Veto bridge, SG-OPD gate)."""

from .api import (GatedOPDLoss, OPDStats, gated_opd_loss, resolve_backend, sampled_opd_loss,
                  topk_opd_loss)
from .linear import fused_linear_gated_opd_loss, fused_linear_topk_opd_loss
from .schedule import beta_schedule, select_teacher_rollouts, teacher_fraction

__version__ = "0.1.0"

__all__ = [
    "GatedOPDLoss",
    "OPDStats",
    "beta_schedule",
    "fused_linear_gated_opd_loss",
    "fused_linear_topk_opd_loss",
    "gated_opd_loss",
    "resolve_backend",
    "sampled_opd_loss",
    "select_teacher_rollouts",
    "teacher_fraction",
    "topk_opd_loss",
    "__version__",
]
