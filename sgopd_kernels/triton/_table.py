"""The row-table columns, for the Triton kernels: ``sgopd_kernels._rows`` mirrored as
``tl.constexpr`` (jit code reads constexpr globals), and the columns private to this
backend, named here.

Python code (the launchers, the vocabulary-parallel combination) reads the same
numbers through ``.value``.
"""

import triton.language as tl

from .. import _rows as R

# shared by every backend
LOSS = tl.constexpr(R.LOSS)
DELTA = tl.constexpr(R.DELTA)
GATE = tl.constexpr(R.GATE)
TEACHER_KL = tl.constexpr(R.TEACHER_KL)
ENTROPY = tl.constexpr(R.ENTROPY)
# the logits family
A = tl.constexpr(R.A)
B = tl.constexpr(R.B)
LOGITS_K = tl.constexpr(R.WIDTH["logits"])
# the sampled family
ADV = tl.constexpr(R.ADV)
SAMPLED_K = tl.constexpr(R.WIDTH["sampled"])

# private to the Triton backend, logits family: raw-logit references and base-2 sums,
# scale2 = log2(e) / tau for the student, tscale2 = log2(e) / tau_T for the teacher
_P = R.PRIVATE["logits"]
REF_S = tl.constexpr(_P)          # the row max of the raw student logits
LOG2Z_S = tl.constexpr(_P + 1)    # log2 sum 2^((z_S - REF_S) scale2)
FRAME_S = tl.constexpr(_P + 2)    # the fixed frame of the raw student logits
FRAME_T = tl.constexpr(_P + 3)    # ... and of the teacher's (each 0 where it would be -inf)
MEAN_S = tl.constexpr(_P + 4)     # E_{p_S}[(z_S - FRAME_S) scale2] in the row's frame units
MEAN_T = tl.constexpr(_P + 5)     # E_{p_S}[(z_T - FRAME_T) tscale2] (_common.frame_units: a
                                  # forward-KL row in FMA form includes that form's shift; the
                                  # vocabulary-parallel table's means do not)
MAX_Q = tl.constexpr(_P + 6)      # max over the support of x = a tf + b sf
LOG2Z_Q = tl.constexpr(_P + 7)    # log2 sum 2^(x - MAX_Q)
FINITE = tl.constexpr(_P + 8)     # BLOCK_V SLOT + lead where the forward's unguarded full
                                  # blocks were finite (reverse KL: and within TAME of the
                                  # frame; logits.py), else 0
# private to the Triton backend, sampled family
S_REF = tl.constexpr(R.PRIVATE["sampled"])   # the row max of the raw student logits
S_LOG2Z = tl.constexpr(R.PRIVATE["sampled"] + 1)  # log2 sum 2^((z_S - S_REF) scale2)

assert FINITE.value < R.WIDTH["logits"] and S_LOG2Z.value < R.WIDTH["sampled"]

# the top-k family: its width, and the columns private to the Triton backend
TOPK_K = tl.constexpr(R.WIDTH["topk"])
_Q = R.PRIVATE["topk"]
K_REF = tl.constexpr(_Q)          # the fixed reference of the raw student logits
K_LOG2Z = tl.constexpr(_Q + 1)    # log2 sum 2^((z_S - K_REF) scale2) over the vocabulary
K_TAIL_COEF = tl.constexpr(_Q + 2)  # alpha of the tail: G_tail - sum_c P_S(c) G_c
K_TAIL_LOG2 = tl.constexpr(_Q + 3)  # log2 |alpha| (alpha may lie outside float32's range)
K_G_MEAN = tl.constexpr(_Q + 4)   # sum_c P_S(c) G_c
K_LOG_ZQ = tl.constexpr(_Q + 5)   # log Z_q of the bridge over the categories (natural)

assert K_LOG_ZQ.value < R.WIDTH["topk"]
