"""The benchmarked cases, one module per loss family; ``CASES`` in the order of the default
sweep. A family is a module whose ``CASES`` (``harness.Case``) are added here."""

from cases import linear, logits, sampled, topk

CASES = logits.CASES + sampled.CASES + linear.CASES + topk.CASES
