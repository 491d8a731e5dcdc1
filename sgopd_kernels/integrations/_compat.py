"""What the installed core offers: the integrations use a keyword when the loss takes it."""

from __future__ import annotations

import functools
import inspect


@functools.lru_cache(maxsize=None)
def takes(fn, keyword: str) -> bool:
    """Whether ``fn`` accepts ``keyword`` (by name, or through ``**kwargs``)."""
    params = inspect.signature(fn).parameters
    return keyword in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def divergences() -> tuple:
    from .. import api

    return tuple(api.DIVERGENCES)


def has_jsd() -> bool:
    """The loss computes TRL's generalized JSD (``divergence="jsd"``, ``jsd_beta``)."""
    from .. import api

    return "jsd" in divergences() and takes(api.gated_opd_loss, "jsd_beta")


def normalize(loss_fn, keywords: dict, num_items_in_batch):
    """``keywords`` for a loss divided by ``num_items_in_batch`` (None: the local mean).

    Returns ``(keywords, divisor)``: when the loss takes ``num_items_in_batch`` it gets it
    (with ``reduction="mean"``) and the divisor is None; otherwise the loss is a sum and the
    caller divides it by the divisor (on the device: a tensor divisor is never read on the
    host).
    """
    keywords = dict(keywords)
    if num_items_in_batch is None:
        keywords["reduction"] = "mean"
        return keywords, None
    if takes(loss_fn, "num_items_in_batch"):
        keywords["reduction"] = "mean"
        keywords["num_items_in_batch"] = num_items_in_batch
        return keywords, None
    keywords["reduction"] = "sum"
    return keywords, num_items_in_batch
