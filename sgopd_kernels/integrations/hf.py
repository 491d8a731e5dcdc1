"""Hugging Face integration: the aligned views of a causal LM batch, and a ``compute_loss_func``.

A causal LM's logits at position ``t`` predict the token at ``t + 1``: the loss
needs ``logits[:, :-1]`` beside ``input_ids[:, 1:]``, with ``-100`` wherever the
next token is not trained (prompt, padding). Getting that wrong is silent: an
unshifted pairing, a pad id of 0 where -100 was meant, or a 0/1 mask passed as
token ids all give a finite loss. :func:`opd_views` builds the views and the
tokens from what a trainer has (the logits, ``input_ids``, ``attention_mask``,
and the labels or the prompt length) and rejects those mistakes by name.

:class:`OPDComputeLoss` is a ``compute_loss_func`` for ``transformers.Trainer``:
it runs the teacher on the student's inputs, builds the views and returns the
loss normalized by the Trainer's global token count ``num_items_in_batch``.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor

from .. import api as _api

_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


class OPDViews(NamedTuple):
    """What :func:`sgopd_kernels.gated_opd_loss` takes, aligned by one position.

    ``student_logits`` and ``teacher_logits`` are views (no copy) of the positions that
    predict a next token; ``tokens`` holds those next tokens, ``-100`` where masked.
    """

    student_logits: Tensor
    teacher_logits: Optional[Tensor]
    tokens: Tensor


def _check_ids(name: str, x, shape=None) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype == torch.bool:
        raise TypeError(f"{name}: got a bool tensor, which is a mask, not token ids; pass the "
                        "token ids (the mask goes to attention_mask)")
    if x.dtype not in _INT_DTYPES:
        raise TypeError(f"{name}: expected an integer tensor of token ids, got {x.dtype}")
    if shape is None and x.dim() != 2:
        raise ValueError(f"{name}: expected shape (B, T), got {tuple(x.shape)}")
    if shape is not None and tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)} like input_ids, got "
                         f"{tuple(x.shape)}")


def _only_zeros_and_ones(x: Tensor) -> bool:
    return x.numel() > 0 and bool(((x == 0) | (x == 1)).all())


def opd_views(
    logits: Tensor,
    input_ids: Tensor,
    attention_mask: Optional[Tensor] = None,
    *,
    labels: Optional[Tensor] = None,
    prompt_length: Union[int, Tensor, None] = None,
    teacher_logits: Optional[Tensor] = None,
    ignore_index: int = -100,
    validate: bool = True,
) -> OPDViews:
    """The aligned student/teacher views and next tokens of a causal LM batch.

    Args:
        logits: the student's ``(B, L, V)`` logits of the last ``L <= T`` positions of
            ``input_ids`` (``L = T``: every position; fewer, as a model called with
            ``logits_to_keep=L`` returns them). ``logits[:, j]`` is at position ``T - L + j``
            and predicts ``input_ids[:, T - L + j + 1]``; the last one predicts nothing and
            is dropped.
        input_ids: ``(B, T)`` integer token ids of prompt and completion.
        attention_mask: ``(B, T)`` 0/1 (int or bool), 0 at padding. A position is trained
            only where it and the next token are both 1. None: no padding.
        labels: ``(B, T)`` in Hugging Face's convention: aligned with ``input_ids`` (not
            shifted; the shift happens here) and ``ignore_index`` where not trained.
        prompt_length: instead of ``labels``: an int, or a ``(B,)`` integer tensor, the
            number of leading columns of ``input_ids`` that are prompt (with left-padded
            prompts, as TRL builds them, the prompt tensor's width). Only the tokens at
            columns ``>= prompt_length`` are trained. Neither given: every next token that
            ``attention_mask`` keeps is trained.
        teacher_logits: the teacher's logits over the same positions as ``logits`` (the
            same ``(B, L)``, a vocabulary ``V_T >= V``), viewed the same way.
        ignore_index: the id of a masked position in ``labels`` and in the returned tokens.
        validate: check the values (labels against ``input_ids``, the mask's values);
            this reads them on the host, a synchronization on a GPU. Shapes and dtypes
            are always checked.

    Returns:
        :class:`OPDViews` ``(student_logits (B, L-1, V), teacher_logits (B, L-1, V_T) or
        None, tokens (B, L-1) int64)``.

    Raises (naming the argument): labels already shifted by one, labels that hold a pad
    id (such as 0) instead of ``ignore_index`` where the attention mask is 0 or that
    disagree with ``input_ids``, a 0/1 mask passed as ``input_ids`` or ``labels``, both
    ``labels`` and ``prompt_length``, shapes that do not line up.
    """
    _check_ids("input_ids", input_ids)
    batch, width = input_ids.shape
    _api.check_logits("logits", logits)
    if logits.dim() != 3 or logits.shape[0] != batch or not 2 <= logits.shape[1] <= width:
        raise ValueError(f"logits: expected shape (B={batch}, L, V) with 2 <= L <= T={width} "
                         f"(the last L positions of input_ids), got {tuple(logits.shape)}")
    keep = logits.shape[1]
    if teacher_logits is not None:
        _api.check_logits("teacher_logits", teacher_logits)
        if teacher_logits.shape[:2] != logits.shape[:2]:
            raise ValueError(f"teacher_logits: expected shape ({batch}, {keep}, V_T) like logits "
                             f"over the same positions, got {tuple(teacher_logits.shape)}")
        if teacher_logits.shape[-1] < logits.shape[-1]:
            raise ValueError(f"teacher_logits: vocabulary V_T={teacher_logits.shape[-1]} is "
                             f"smaller than the student's V={logits.shape[-1]}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")
    if labels is not None and prompt_length is not None:
        raise ValueError("labels, prompt_length: pass one of them (labels say which tokens are "
                         "trained; prompt_length masks the prompt), not both")
    device = input_ids.device
    if attention_mask is not None:
        if not isinstance(attention_mask, Tensor):
            raise TypeError(f"attention_mask: expected a torch.Tensor, got "
                            f"{type(attention_mask).__name__}")
        if attention_mask.dtype != torch.bool and attention_mask.dtype not in _INT_DTYPES:
            raise TypeError(f"attention_mask: expected an integer or bool 0/1 mask, got "
                            f"{attention_mask.dtype}")
        if tuple(attention_mask.shape) != (batch, width):
            raise ValueError(f"attention_mask: expected shape {(batch, width)} like input_ids, "
                             f"got {tuple(attention_mask.shape)}")
        if validate and attention_mask.dtype != torch.bool \
                and not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
            raise ValueError("attention_mask: expected only 0s and 1s (0 at padding)")
        present = attention_mask.to(device) != 0
    else:
        present = torch.ones((batch, width), dtype=torch.bool, device=device)
    vocab = logits.shape[-1]
    if validate and vocab > 2 and _only_zeros_and_ones(input_ids) and input_ids.shape[1] > 1:
        raise ValueError("input_ids: holds only 0s and 1s, which looks like a mask passed where "
                         "token ids are expected; pass the token ids (validate=False skips "
                         "this check)")

    # the positions t = T-L .. T-2 predict the columns t+1 = T-L+1 .. T-1
    start = width - keep
    nxt = input_ids[:, start + 1:].to(torch.int64)
    trained = present[:, start + 1:] & present[:, start:-1]
    if labels is not None:
        _check_ids("labels", labels, input_ids.shape)
        if validate:
            _check_labels(labels, input_ids, present, ignore_index, vocab)
        lab = labels[:, start + 1:].to(torch.int64)
        # Hugging Face's convention: the labels alone say what is trained (as its loss and
        # its num_items_in_batch count do); validation made them -100 at padding
        tokens = lab
    else:
        if prompt_length is not None:
            first = _prompt_start(prompt_length, batch, width, device)
            cols = torch.arange(start + 1, width, device=device)
            trained = trained & (cols.unsqueeze(0) >= first.unsqueeze(1))
        tokens = nxt.masked_fill(~trained, ignore_index)
    student = logits[:, :-1]
    teacher = None if teacher_logits is None else teacher_logits[:, :-1]
    return OPDViews(student, teacher, tokens)


def _prompt_start(prompt_length, batch: int, width: int, device) -> Tensor:
    if isinstance(prompt_length, Tensor):
        if prompt_length.dtype == torch.bool or prompt_length.dtype not in _INT_DTYPES \
                or prompt_length.dim() > 1 or (prompt_length.dim() == 1
                                               and prompt_length.shape[0] != batch):
            raise TypeError(f"prompt_length: expected an int or a ({batch},) integer tensor, got "
                            f"{prompt_length.dtype} {tuple(prompt_length.shape)}")
        first = prompt_length.to(device=device, dtype=torch.int64).expand(batch)
        if bool(((first < 0) | (first > width)).any()):
            raise ValueError(f"prompt_length: expected values in [0, T={width}]")
        return first
    if isinstance(prompt_length, bool) or not isinstance(prompt_length, numbers.Integral) \
            or not 0 <= prompt_length <= width:
        raise ValueError(f"prompt_length: expected an int in [0, T={width}] or a ({batch},) "
                         f"integer tensor, got {prompt_length!r}")
    return torch.full((batch,), int(prompt_length), dtype=torch.int64, device=device)


def _check_labels(labels: Tensor, input_ids: Tensor, present: Tensor, ignore_index: int,
                  vocab: int) -> None:
    labels = labels.to(torch.int64)
    ids = input_ids.to(torch.int64)
    used = labels != ignore_index
    if not bool(used.any()):
        return
    wrong = used & (labels != ids)
    # labels[:, t] == input_ids[:, t + 1]: shifted already (checked first: a shift also moves
    # labels onto padding)
    if bool(wrong.any()) and labels.shape[1] > 1:
        u = used[:, :-1]
        if bool(u.any()) and bool((labels[:, :-1][u] == ids[:, 1:][u]).all()):
            raise ValueError(
                "labels: already shifted by one (labels[:, t] == input_ids[:, t + 1]). Pass "
                "labels aligned with input_ids, as Hugging Face does (labels = input_ids with "
                f"{ignore_index} where not trained); the shift happens here")
    if bool(wrong.any()) and vocab > 2 and _only_zeros_and_ones(labels[used]) \
            and not _only_zeros_and_ones(ids[used]):
        raise ValueError(
            "labels: holds only 0s and 1s where input_ids hold other ids, which looks like a "
            f"mask passed as labels; pass input_ids with {ignore_index} where not trained")
    pad_labelled = used & ~present
    if bool(pad_labelled.any()):
        value = int(labels[pad_labelled][0])
        raise ValueError(
            f"labels: {int(pad_labelled.sum())} padding position(s) (attention_mask == 0) hold "
            f"a token id (e.g. {value}) instead of ignore_index={ignore_index}; set labels to "
            f"{ignore_index} wherever the attention mask is 0 (a pad id of 0 is trained as a "
            "token)")
    if not bool(wrong.any()):
        return
    if bool((labels[wrong] == 0).all()):
        raise ValueError(
            f"labels: {int(wrong.sum())} position(s) hold 0 where input_ids differ; a masked "
            f"position must hold ignore_index={ignore_index}, not 0 (0 is a token id)")
    raise ValueError(
        f"labels: {int(wrong.sum())} unmasked position(s) differ from input_ids; labels must be "
        f"input_ids with {ignore_index} where not trained (Hugging Face's convention)")


class OPDComputeLoss:
    """A ``compute_loss_func`` for ``transformers.Trainer``: on-policy distillation loss.

    ``Trainer`` calls ``compute_loss_func(outputs, labels, num_items_in_batch=...)``
    without the inputs; the teacher needs them. This object therefore registers a
    forward pre-hook on the student that keeps the latest ``input_ids`` and
    ``attention_mask`` (and removes the per-sequence ``verifier_key`` column from
    the student's inputs, if the batch has one). Each call then runs the teacher
    on those inputs, builds the views with :func:`opd_views` from the labels
    (Hugging Face's unshifted convention) and returns
    :func:`sgopd_kernels.gated_opd_loss` summed and divided by
    ``num_items_in_batch`` (the Trainer's count of ``labels[..., 1:] != -100``
    over the whole accumulated batch and all devices; the local mean when it is
    None).

    Args:
        model: the student (the model given to the Trainer; the hook goes on it).
        teacher_model: the teacher, on the student's device, with the same tokenizer
            (vocabulary ``V_T >= V``; padded rows are ignored). Run in eval mode, no grad.
        verifier_key: name of a batch column with per-sequence verdicts (bool) or signed
            advantages (float), ``(B,)``; taken out before the student's forward. Keep
            it in the batch with ``remove_unused_columns=False`` and a collator that
            passes it through.
        validate: as in :func:`opd_views`.
        **loss_keywords: keywords of :func:`sgopd_kernels.gated_opd_loss` (``beta``,
            ``divergence``, ``temperature``, ``extrapolation``, ...). ``reduction`` is set
            here.

    ``last_stats`` holds the :class:`sgopd_kernels.OPDStats` of the latest call.
    Call :meth:`remove` to take the hook off the student.
    """

    def __init__(self, model: torch.nn.Module, teacher_model: torch.nn.Module, *,
                 verifier_key: str = "verifier", validate: bool = True, **loss_keywords):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model: expected the student torch.nn.Module, got "
                            f"{type(model).__name__}")
        if not isinstance(teacher_model, torch.nn.Module):
            raise TypeError(f"teacher_model: expected a torch.nn.Module, got "
                            f"{type(teacher_model).__name__}")
        for name in ("reduction", "return_stats", "num_items_in_batch", "verifier"):
            if name in loss_keywords:
                raise TypeError(f"{name}: set by OPDComputeLoss itself; do not pass it")
        # the keywords are checked once, here, as the loss checks them (unknown ones included)
        _api.GatedOPDLoss(**loss_keywords)
        self.teacher_model = teacher_model
        self.verifier_key = verifier_key
        self.validate = validate
        self.loss_keywords = dict(loss_keywords)
        self.last_stats = None
        self._inputs = None
        self._hook = model.register_forward_pre_hook(self._remember, with_kwargs=True)

    def _remember(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        verifier = kwargs.pop(self.verifier_key, None)
        self._inputs = (input_ids, kwargs.get("attention_mask"), verifier)
        return args, kwargs

    def remove(self) -> None:
        """Take the forward pre-hook off the student."""
        self._hook.remove()

    def __call__(self, outputs, labels, num_items_in_batch=None):
        if self._inputs is None or self._inputs[0] is None:
            raise RuntimeError("OPDComputeLoss: the student has not run a forward with input_ids "
                               "since this object was made; pass the same model to the Trainer "
                               "and to OPDComputeLoss")
        if labels is None:
            raise ValueError("labels: the batch has no labels; OPDComputeLoss trains the tokens "
                             "that labels mark (Hugging Face's convention, -100 where masked)")
        input_ids, attention_mask, verifier = self._inputs
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs.logits
        self.teacher_model.eval()
        with torch.no_grad():
            teacher_logits = self.teacher_model(input_ids=input_ids,
                                                attention_mask=attention_mask).logits
        views = opd_views(logits, input_ids, attention_mask, labels=labels,
                          teacher_logits=teacher_logits, validate=self.validate,
                          ignore_index=self.loss_keywords.get("ignore_index", -100))
        if verifier is not None and not isinstance(verifier, Tensor):
            verifier = torch.as_tensor(verifier)
        if verifier is not None:
            verifier = verifier.to(logits.device)
        if isinstance(num_items_in_batch, Tensor):
            num_items_in_batch = num_items_in_batch.to(logits.device)
        loss, stats = _api.gated_opd_loss(views.student_logits, views.teacher_logits,
                                          views.tokens, verifier, return_stats=True,
                                          num_items_in_batch=num_items_in_batch,
                                          **self.loss_keywords)
        self.last_stats = stats
        return loss
