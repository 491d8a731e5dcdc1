"""Trainer integrations: the only modules of the package that import trl or transformers.

- :mod:`sgopd_kernels.integrations.trl`: ``GatedDistillationTrainer`` and
  ``GatedDistillationConfig``, subclasses of TRL's ``DistillationTrainer`` and
  ``DistillationConfig``.
- :mod:`sgopd_kernels.integrations.hf`: ``opd_views`` (the aligned student/teacher
  views and tokens of a causal LM batch) and ``OPDComputeLoss`` (a
  ``compute_loss_func`` for the plain Hugging Face ``Trainer``).

Import them by name (``from sgopd_kernels.integrations.trl import
GatedDistillationTrainer``); importing this package imports neither trl nor
transformers.
"""
