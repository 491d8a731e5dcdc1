"""Column layout of the per-row table that every backend's forward returns.

The forward of a loss writes one row of ``ROW_K`` float32 values per position:
the loss and the statistics (columns 0-4, the same meaning for every
backend), then what that backend's backward needs (the rest). Masked
positions hold zeros. The table is O(rows): it is all a forward keeps. It is
float32, except on the torch backend for float64 inputs (float64).

The Triton kernels write and read these columns by their numbers (a jit
function cannot read module globals): change a number here and there together.
"""

# shared by all backends (natural-log units)
LOSS = 0          # per-position divergence (0 where masked)
DELTA = 1         # lp_T(y) - lp_S(y)
GATE = 2          # g = sign(delta) * sigma, in {-1, 0, +1}
TEACHER_KL = 3    # KL(p_S || p_T), unbridged
ENTROPY = 4       # H(p_S)

# Triton backward state: raw-logit references, base-2 sums (scale2 = log2(e) / tau)
REF_S = 5         # row max of the raw student logits
LOG2Z_S = 6       # log2 sum 2^((z_S - REF_S) scale2)
FRAME_S = 7       # the fixed frame: max(first block's max, z_S[y]) of the raw student logits
FRAME_T = 8       # the same for the teacher (each 0 where it would be -inf)
MEAN_S = 9        # E_{p_S}[(z_S - FRAME_S) scale2]
MEAN_T = 10       # E_{p_S}[(z_T - FRAME_T) scale2]
A = 11            # bridge coefficient a = lambda (all backends)
B = 12            # bridge coefficient b = 1 - lambda + beta (all backends)
MAX_Q = 13        # max over the support of x = (a (z_T - FRAME_T) + b (z_S - FRAME_S)) scale2
LOG2Z_Q = 14      # log2 sum 2^(x - MAX_Q)
ROW_K = 16

TORCH_COLUMNS = {"loss": LOSS, "delta": DELTA, "gate": GATE, "teacher_kl": TEACHER_KL,
                 "entropy": ENTROPY, "a": A, "b": B}

# the sampled-token estimator: columns 0-4 as above, then
S_ADV = 5         # A = lambda * delta, the detached advantage (natural units)
S_REF = 6         # row max of the raw student logits (Triton)
S_LOG2Z = 7       # log2 sum 2^((z_S - S_REF) scale2) (Triton)
SAMPLED_ROW_K = 8

SAMPLED_TORCH_COLUMNS = {"loss": LOSS, "delta": DELTA, "gate": GATE, "teacher_kl": TEACHER_KL,
                         "entropy": ENTROPY, "adv": S_ADV}
