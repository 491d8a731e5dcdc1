"""The per-row table that every backend's forward returns, and who owns which column.

A forward writes one row of ``WIDTH[family]`` values per position: it is all
that a loss keeps between forward and backward (O(rows)). The table is
float32, except on the torch backend for float64 inputs (float64).

- Shared columns (:data:`SHARED`): the same meaning on every backend and in
  every family, natural-log units, zero where the position is masked. The
  reductions and the statistics read only these.
- Family columns: the same meaning on every backend of that family (the
  bridge coefficients of the logits and top-k families, the advantage of the
  sampled estimator).
- Columns from ``PRIVATE[family]`` on belong to the backend that wrote the
  table and are named by that backend: the Triton kernels' in
  ``sgopd_kernels/triton/_table.py`` (mirrored as ``tl.constexpr`` for the
  jit code), the torch vocabulary-parallel path's in
  ``sgopd_kernels/reference_parallel.py``. The torch reference needs none. No
  path writes a quantity into a column named for another.
"""

# shared by every backend and every family
LOSS = 0          # the per-position divergence (0 where masked)
DELTA = 1         # delta = lp_T(y) - lp_S(y)
GATE = 2          # g = sign(delta) * sigma, in {-1, 0, +1}
TEACHER_KL = 3    # KL(p_S || p_T), unbridged
ENTROPY = 4       # H(p_S)
SHARED = {"loss": LOSS, "delta": DELTA, "gate": GATE, "teacher_kl": TEACHER_KL,
          "entropy": ENTROPY}

# the logits family (gated_opd_loss): the bridge coefficients of the row's lambda
A = 5             # a = lambda
B = 6             # b = 1 - lambda + beta
# the sampled family (sampled_opd_loss)
ADV = 5           # A = lambda * delta, the detached advantage

# the top-k family (topk_opd_loss): A and B, the bridge coefficients over its categories

FAMILY = {"logits": {"a": A, "b": B}, "sampled": {"adv": ADV}, "topk": {"a": A, "b": B}}
# the first column private to a backend, and the table's width, per family
PRIVATE = {"logits": 7, "sampled": 6, "topk": 7}
WIDTH = {"logits": 16, "sampled": 8, "topk": 16}
