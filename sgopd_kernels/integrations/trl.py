"""TRL integration: ``GatedDistillationTrainer``, a subclass of TRL's ``DistillationTrainer``.

Tested with TRL 1.16. TRL's ``DistillationTrainer`` samples completions from the
student, runs both models' backbones and computes a generalized JSD between
their next-token distributions from the hidden states and LM heads, one chunk of
logits at a time. ``beta`` (TRL's) selects the divergence: 1 is reverse KL, 0 is
forward KL, in between the generalized JSD. This subclass computes the loss with
this library instead:

- **Default settings give TRL's step losses**: no verifier, no bridge, the
  divergence that TRL's ``beta`` names, TRL's ``temperature``, the hidden-state
  path, normalized by TRL's global count of completion tokens
  (``num_items_in_batch``).
- **Knobs** (:class:`GatedDistillationConfig`): ``divergence``; Veto's
  ``bridge_beta`` with its schedule (named apart from TRL's ``beta``);
  ``extrapolation``/``interpolation`` of the SG-OPD gate; ``loss_path``
  (``"fused"``: hidden states and LM heads, the logits never exist in full;
  ``"logits"``: the models' own forward, then :func:`sgopd_kernels.gated_opd_loss`).
- **Verifier**: GRPO-style ``reward_funcs`` (``reward_func(prompts=, completions=,
  completion_ids=, **dataset_columns, trainer_state=)`` returning one float per
  completion), weighted by ``reward_weights``; per sequence, as verdicts
  (``reward > reward_threshold``) or as signed advantages (sign of the reward).
- **Phased teacher sampling** (``teacher_rho0``, ``teacher_cold_start_steps``):
  the teacher samples one completion per prompt, the reward functions score it,
  and :func:`sgopd_kernels.select_teacher_rollouts` replaces a fraction
  :func:`sgopd_kernels.teacher_fraction` of the local generation batch (one group)
  with correct teacher completions, which enter the loss with a True verdict.
- **Logging**: the :class:`sgopd_kernels.OPDStats` go to TRL's metrics as
  ``opd/<field>``, token-weighted across ranks with ``gather_for_metrics`` as TRL
  logs its ``entropy``; rewards as ``rewards/<name>/mean``.
- **Heads and vocabularies**: a teacher with a padded vocabulary (the same
  tokenizer, ``V_T >= V``) is accepted; its columns ``V..V_T-1`` are ignored, and it
  never samples them. Each model's logit multiplier and softcap are read from its
  config (``logit_scale``: Cohere, multiplies; ``logits_scaling``: Granite and
  MiniCPM3 divide, HyperCLOVA X multiplies; ``lm_head_multiplier``: Falcon-H1;
  ``final_logit_softcapping``: Gemma-2/3).

Which TRL API it uses. TRL documents overriding ``compute_loss`` (from
``transformers.Trainer``) and supplying the teacher "another way" by passing
``teacher_model=None`` to ``DistillationTrainer.__init__``. The vocabulary check
of TRL's ``__init__`` refuses any teacher whose ``vocab_size`` differs from the
student's, so this trainer loads and prepares the teacher itself (with the same
``teacher_model_init_kwargs`` and accelerator preparation) and checks ``V_T >= V``
instead. Two private methods of TRL 1.16 are overridden, because TRL has no public
hook at these points:

- ``_compute_loss(unwrapped_student, inputs, num_items_in_batch)``: the place
  where TRL computes its divergence, inside ``_forward_redirection`` (so DDP/FSDP
  see a forward of the wrapped student). The override keeps its contract (returns
  ``(loss, entropy_sum, num_valid_tokens)``, which TRL's ``compute_loss`` logs as
  ``entropy``) and reuses TRL's ``_get_last_hidden_state``.
- ``_generate_and_score_completions(inputs)``: called once per generation batch
  after sampling, where GRPO scores completions. The override calls TRL's, then
  scores the completions with the reward functions (the verifier) and, during the
  cold start, splices in verified teacher completions and recounts
  ``num_items_in_batch``.

``compute_loss`` (public) is overridden to log the statistics after TRL's
returns, outside the wrapped forward (as TRL logs its entropy). Also used from
TRL's internals, without overriding them: the private method
``_get_last_hidden_state`` and attributes ``_metrics``, ``_tokenizer``,
``_forward_redirection``, and ``eos_token_ids``, ``generation_config``,
``model_kwarg_keys``, ``pad_to_multiple_of``, ``temperature``. A TRL release
that renames them breaks this module: it is tested against TRL 1.16.0.

Phased teacher sampling generates with the unwrapped teacher (``generate``),
which is not supported under DeepSpeed ZeRO-3 (sharded teacher weights), nor
with ``tools``; reward models (``nn.Module`` reward functions) are not supported.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import torch
from torch import Tensor
from trl import DistillationConfig, DistillationTrainer

from .. import api as _api
from .. import linear as _linear
from .. import schedule as _schedule

LOSS_PATHS = ("fused", "logits")
VERIFIER_MODES = ("verdict", "advantage")
IGNORE = -100


@dataclass
class GatedDistillationConfig(DistillationConfig):
    r"""TRL's ``DistillationConfig`` with the knobs of sgopd_kernels.

    TRL's ``beta`` keeps its meaning (1.0 reverse KL, 0.0 forward KL, in between the
    generalized JSD, the library's ``divergence="jsd"``); ``divergence``,
    when set, overrides the choice. All fields below default to TRL's behaviour.

    Parameters:
        divergence (`str`, *optional*): ``"reverse_kl"``, ``"forward_kl"`` or ``"jsd"``
            (TRL's ``beta`` is then the mixture weight, in (0, 1)). None: from ``beta``.
        bridge_beta (`float`, defaults to 0.0): Veto's bridge exponent ``beta0`` (the
            target ``q ∝ p_T · p_S^β``); not TRL's ``beta``.
        bridge_beta_schedule (`str`, defaults to ``"constant"``): ``"constant"``,
            ``"linear"`` or ``"cosine"`` decay of ``bridge_beta`` to 0 over
            ``bridge_beta_decay_steps`` optimizer steps (:func:`sgopd_kernels.beta_schedule`).
        bridge_beta_decay_steps (`int`, *optional*): needed by the decaying schedules.
        extrapolation, interpolation (`float`, defaults to 1.8, 1.0): the SG-OPD gate's
            λ where teacher and verifier agree / disagree (used only with a verifier).
        loss_path (`str`, defaults to ``"fused"``): ``"fused"`` (hidden states and LM
            heads, as TRL) or ``"logits"`` (each model's own logits).
        loss_backend (`str`, defaults to ``"auto"``): the ``backend`` of the loss.
        loss_chunk_size (`int`, *optional*): rows per chunk of the fused path.
        verifier_mode (`str`, defaults to ``"verdict"``): ``"verdict"`` (correct where the
            weighted reward exceeds ``reward_threshold``) or ``"advantage"`` (the weighted
            reward is a signed advantage: its sign is the verdict, 0 neutral).
        reward_threshold (`float`, defaults to 0.5): the verdict's threshold.
        reward_weights (`list[float]`, *optional*): one weight per reward function
            (default 1 each); rewards are summed as GRPO does (a None reward adds 0).
        teacher_rho0 (`float`, defaults to 0.0): phased teacher sampling: the fraction of
            each generation batch taken from verified teacher completions at step 0.
        teacher_cold_start_steps (`int`, defaults to 0): steps over which it decays to 0.
        teacher_fraction_schedule (`str`, defaults to ``"linear"``): or ``"cosine"``.
    """

    divergence: Optional[str] = field(
        default=None,
        metadata={"help": "'reverse_kl', 'forward_kl' or 'jsd' (TRL's beta is then the JSD "
                          "mixture weight). None: the divergence that TRL's beta names."})
    bridge_beta: float = field(
        default=0.0, metadata={"help": "Veto's bridge exponent (q ~ p_T * p_S^beta), >= 0; not "
                                       "TRL's beta."})
    bridge_beta_schedule: str = field(
        default="constant", metadata={"help": "'constant', 'linear' or 'cosine' decay of "
                                              "bridge_beta to 0."})
    bridge_beta_decay_steps: Optional[int] = field(
        default=None, metadata={"help": "Optimizer steps over which bridge_beta decays."})
    extrapolation: float = field(
        default=1.8, metadata={"help": "SG-OPD gate: lambda where teacher and verifier agree."})
    interpolation: float = field(
        default=1.0, metadata={"help": "SG-OPD gate: lambda where they disagree."})
    loss_path: str = field(
        default="fused", metadata={"help": "'fused' (hidden states and LM heads) or 'logits'."})
    loss_backend: str = field(default="auto", metadata={"help": "The loss's backend."})
    loss_chunk_size: Optional[int] = field(
        default=None, metadata={"help": "Rows per chunk of the fused path."})
    verifier_mode: str = field(
        default="verdict", metadata={"help": "'verdict' (reward > reward_threshold) or "
                                             "'advantage' (sign of the reward)."})
    reward_threshold: float = field(default=0.5, metadata={"help": "Threshold of a verdict."})
    reward_weights: Optional[list[float]] = field(
        default=None, metadata={"help": "One weight per reward function."})
    teacher_rho0: float = field(
        default=0.0, metadata={"help": "Phased teacher sampling: initial teacher fraction."})
    teacher_cold_start_steps: int = field(
        default=0, metadata={"help": "Steps over which the teacher fraction decays to 0."})
    teacher_fraction_schedule: str = field(
        default="linear", metadata={"help": "'linear' or 'cosine'."})

    def __post_init__(self):
        super().__post_init__()
        self.opd_divergence, self.opd_jsd_beta = resolve_divergence(self.divergence, self.beta)
        _api._check_number("bridge_beta", self.bridge_beta, nonnegative=True)
        # the schedule validates its own arguments, naming them
        try:
            _schedule.beta_schedule(0, beta0=self.bridge_beta,
                                    decay_steps=self.bridge_beta_decay_steps,
                                    schedule=self.bridge_beta_schedule)
        except ValueError as e:
            raise ValueError(f"bridge_beta_{e}" if str(e).startswith(("schedule", "decay_steps"))
                             else str(e)) from None
        _api._check_number("extrapolation", self.extrapolation, positive=True)
        _api._check_number("interpolation", self.interpolation, positive=True)
        _api._check_choice("loss_path", self.loss_path, LOSS_PATHS)
        _api._check_choice("loss_backend", self.loss_backend, _api.BACKENDS)
        if self.loss_chunk_size is not None and (
                isinstance(self.loss_chunk_size, bool)
                or not isinstance(self.loss_chunk_size, numbers.Integral)
                or self.loss_chunk_size < 1):
            raise ValueError(f"loss_chunk_size: expected None or an int >= 1, got "
                             f"{self.loss_chunk_size!r}")
        _api._check_choice("verifier_mode", self.verifier_mode, VERIFIER_MODES)
        _api._check_number("reward_threshold", self.reward_threshold)
        try:
            _schedule.teacher_fraction(0, rho0=self.teacher_rho0,
                                       cold_start_steps=self.teacher_cold_start_steps,
                                       schedule=self.teacher_fraction_schedule)
        except ValueError as e:
            name = {"rho0": "teacher_rho0", "cold_start_steps": "teacher_cold_start_steps",
                    "schedule": "teacher_fraction_schedule"}
            msg = str(e)
            for old, new in name.items():
                if msg.startswith(old):
                    msg = new + msg[len(old):]
                    break
            raise ValueError(msg) from None


def resolve_divergence(divergence: Optional[str], beta: float):
    """The library's ``(divergence, jsd_beta)`` for TRL's ``beta`` and an optional override.

    TRL's ``beta``: 1.0 reverse KL, 0.0 forward KL, in between the generalized JSD with
    mixture ``(1 - beta) p_S + beta p_T``, which is the library's ``"jsd"`` with
    ``jsd_beta = beta``.
    """
    choices = ("reverse_kl", "forward_kl", "jsd")
    if divergence is not None and divergence not in choices:
        raise ValueError(f"divergence: expected None or one of {choices}, got {divergence!r}")
    between = 0.0 < beta < 1.0
    if divergence is None:
        divergence = "reverse_kl" if beta == 1.0 else "forward_kl" if beta == 0.0 else "jsd"
    elif divergence != "jsd" and between:
        raise ValueError(f"divergence={divergence!r} contradicts beta={beta}, which asks TRL for "
                         "the generalized JSD; set beta to 1.0 (reverse KL) or 0.0 (forward KL), "
                         "or divergence='jsd'")
    elif divergence == "jsd" and not between:
        raise ValueError(f"divergence='jsd' takes TRL's beta as its mixture weight, which must be "
                         f"in (0, 1); got beta={beta}")
    return divergence, (beta if divergence == "jsd" else None)


def head_transform(config) -> tuple:
    """``(logit_scale, softcap)`` of a model's LM head, read from its (text) config.

    The head's logits are ``softcap * tanh(scale * (h @ W.T) / softcap)`` (scale first, the
    cap after, as the models apply them; no cap when softcap is None).
    """
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = 1.0
    for name in ("logit_scale", "lm_head_multiplier"):
        value = getattr(config, name, None)
        if value is not None:
            scale *= float(value)
    value = getattr(config, "logits_scaling", None)
    if value is not None:
        multiplies = getattr(config, "model_type", None) == "hyperclovax"
        scale *= float(value) if multiplies else 1.0 / float(value)
    softcap = getattr(config, "final_logit_softcapping", None)
    return scale, (None if softcap is None else float(softcap))


class _MaskColumns:
    """A logits processor that keeps generation inside the first ``vocab`` ids."""

    def __init__(self, vocab: int):
        self.vocab = vocab

    def __call__(self, input_ids, scores):
        if scores.shape[-1] > self.vocab:
            scores[..., self.vocab:] = -math.inf
        return scores


class GatedDistillationTrainer(DistillationTrainer):
    """TRL's ``DistillationTrainer`` with the loss of sgopd_kernels (see the module docs).

    Takes the arguments of ``DistillationTrainer`` (``teacher_model`` is required) and
    ``reward_funcs`` (a callable or a list of them, GRPO's signature), the verifier.
    ``args`` must be a :class:`GatedDistillationConfig`.
    """

    _tag_names = ["trl", "distillation", "sgopd_kernels"]

    def __init__(self, model, teacher_model=None, args: Optional[GatedDistillationConfig] = None,
                 train_dataset=None, eval_dataset=None, processing_class=None, callbacks=None,
                 optimizers=(None, None), quantization_config=None, peft_config=None,
                 tools=None, reward_funcs: Union[Callable, list, None] = None):
        if args is None:
            args = GatedDistillationConfig("GatedDistillation")
        if not isinstance(args, GatedDistillationConfig):
            raise TypeError(f"args: expected a GatedDistillationConfig, got {type(args).__name__}")
        if teacher_model is None:
            raise ValueError("teacher_model: GatedDistillationTrainer needs a teacher (a model id, "
                             "a path or a PreTrainedModel)")
        if isinstance(teacher_model, str):
            teacher_model = _load_teacher(teacher_model, args)
        elif args.teacher_model_init_kwargs is not None:
            raise ValueError("teacher_model_init_kwargs: set in the config, but teacher_model is "
                             "already instantiated")
        self.reward_funcs = _reward_funcs(reward_funcs)
        if args.reward_weights is not None and len(args.reward_weights) != len(self.reward_funcs):
            raise ValueError(f"reward_weights: {len(args.reward_weights)} weights for "
                             f"{len(self.reward_funcs)} reward functions")
        if args.teacher_rho0 > 0 and args.teacher_cold_start_steps > 0:
            if not self.reward_funcs:
                raise ValueError("teacher_rho0: phased teacher sampling takes only teacher "
                                 "completions that the verifier endorses; pass reward_funcs")
            if tools:
                raise ValueError("teacher_rho0: phased teacher sampling does not support tools")
        # TRL's own teacher handling refuses V_T != V: the teacher is supplied here instead
        super().__init__(model, teacher_model=None, args=args, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class,
                         callbacks=callbacks, optimizers=optimizers,
                         quantization_config=quantization_config, peft_config=peft_config,
                         tools=tools)
        vocab = self.model.config.get_text_config().vocab_size
        teacher_vocab = teacher_model.config.get_text_config().vocab_size
        if teacher_vocab < vocab:
            raise ValueError(
                f"teacher_model: vocab_size {teacher_vocab} is smaller than the student's {vocab}. "
                "The teacher must use the student's tokenizer; a larger (padded) vocabulary is "
                "accepted and its extra columns are ignored")
        self.student_vocab = vocab
        plugin = getattr(args, "deepspeed_plugin", None)
        if args.teacher_rho0 > 0 and args.teacher_cold_start_steps > 0 \
                and plugin is not None and plugin.zero_stage == 3:
            raise ValueError("teacher_rho0: phased teacher sampling generates with the whole "
                             "teacher, which DeepSpeed ZeRO-3 shards; use ZeRO-2 or turn it off")
        if self.is_deepspeed_enabled:
            from trl.models import prepare_deepspeed

            self.teacher_model = prepare_deepspeed(teacher_model, self.accelerator)
        else:
            self.teacher_model = self.accelerator.prepare_model(teacher_model, evaluation_mode=True)
        self.reward_weights = torch.tensor(
            args.reward_weights if args.reward_weights is not None else [1.0] * len(self.reward_funcs),
            dtype=torch.float32)
        self.reward_func_names = [getattr(f, "__name__", type(f).__name__)
                                  for f in self.reward_funcs]
        self._opd_generator = torch.Generator().manual_seed(args.seed)
        self._opd_last = None

    # -- the loss ---------------------------------------------------------------------------

    def current_bridge_beta(self) -> float:
        """Veto's beta at the current optimizer step."""
        a = self.args
        return _schedule.beta_schedule(self.state.global_step, beta0=a.bridge_beta,
                                       decay_steps=a.bridge_beta_decay_steps,
                                       schedule=a.bridge_beta_schedule)

    def current_teacher_fraction(self) -> float:
        """The fraction of the generation batch taken from the teacher at the current step."""
        a = self.args
        if a.teacher_rho0 == 0 or a.teacher_cold_start_steps == 0:
            return 0.0
        return _schedule.teacher_fraction(self.state.global_step, rho0=a.teacher_rho0,
                                          cold_start_steps=a.teacher_cold_start_steps,
                                          schedule=a.teacher_fraction_schedule)

    def _loss_keywords(self) -> dict:
        a = self.args
        kw = dict(beta=self.current_bridge_beta(), extrapolation=a.extrapolation,
                  interpolation=a.interpolation, divergence=a.opd_divergence,
                  temperature=self.temperature, backend=a.loss_backend)
        if a.opd_jsd_beta is not None:
            kw["jsd_beta"] = a.opd_jsd_beta
        return kw

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._opd_last = None
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        if self._opd_last is not None:
            self._log_stats(*self._opd_last)
            self._opd_last = None
        return result

    def _log_stats(self, stats, count: Tensor) -> None:
        """Token-weighted means across ranks, as TRL's ``compute_loss`` logs ``entropy``."""
        mode = "train" if self.model.training else "eval"
        names = stats._fields
        sums = torch.stack([getattr(stats, n).detach().float() for n in names]) * count.float()
        sums = self.accelerator.gather_for_metrics(sums.unsqueeze(0)).reshape(-1, len(names))
        total = self.accelerator.gather_for_metrics(count.reshape(1)).sum()
        values = (sums.sum(0) / total.clamp(min=1)).tolist()
        for n, v in zip(names, values):
            self._metrics[mode][f"opd/{n}"].append(v)
        self._metrics[mode]["opd/bridge_beta"].append(self.current_bridge_beta())

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        loss_mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            loss_mask = loss_mask * inputs["tool_mask"]
        keep = inputs["completion_ids"].size(1)
        # the sampled next tokens, -100 where not trained (the mask is TRL's int64 0/1)
        tokens = inputs["completion_ids"].masked_fill(loss_mask == 0, IGNORE)
        mm = {k: inputs[k] for k in _MULTIMODAL if k in inputs}
        verifier = inputs.get("opd_verifier")
        unwrapped_teacher = self.accelerator.unwrap_model(self.teacher_model)
        self.teacher_model.eval()
        keywords = self._loss_keywords()
        s_head = head_transform(unwrapped_student.config)
        t_head = head_transform(unwrapped_teacher.config)
        path = self.args.loss_path
        if path == "fused":
            loss, stats = self._fused_loss(unwrapped_student, unwrapped_teacher, input_ids,
                                           attention_mask, keep, mm, tokens, verifier,
                                           keywords, s_head, t_head, num_items_in_batch)
        else:
            loss, stats = self._logits_loss(unwrapped_student, unwrapped_teacher, input_ids,
                                            attention_mask, keep, mm, tokens, verifier,
                                            keywords, num_items_in_batch)
        count = (tokens != IGNORE).sum()
        self._opd_last = (stats, count)
        entropy_sum = stats.student_entropy.detach() * count
        return loss, entropy_sum, count

    def _fused_loss(self, student, teacher, input_ids, attention_mask, keep, mm, tokens,
                    verifier, keywords, s_head, t_head, num_items_in_batch):
        hs = self._get_last_hidden_state(student, input_ids, attention_mask, keep, **mm)
        with torch.no_grad():
            ht = self._forward_redirection(self.teacher_model, teacher,
                                           self._get_last_hidden_state, teacher, input_ids,
                                           attention_mask, keep, **mm)
        s_lm, t_lm = student.get_output_embeddings(), teacher.get_output_embeddings()
        device = s_lm.weight.device
        hs, ht = hs.to(device), ht.to(device)
        tokens = tokens.to(device)
        ws, bs = s_lm.weight, s_lm.bias
        wt, bt = t_lm.weight.to(device), None if t_lm.bias is None else t_lm.bias.to(device)
        loss, stats = _linear.fused_linear_gated_opd_loss(
            hs, ws, ht, wt, tokens, _verifier(verifier, device), student_bias=bs,
            teacher_bias=bt, chunk_size=self.args.loss_chunk_size,
            student_logit_scale=s_head[0], teacher_logit_scale=t_head[0],
            student_softcap=s_head[1], teacher_softcap=t_head[1],
            num_items_in_batch=_count(num_items_in_batch, device), return_stats=True,
            **keywords)
        return loss, stats

    def _logits_loss(self, student, teacher, input_ids, attention_mask, keep, mm, tokens,
                     verifier, keywords, num_items_in_batch):
        zs = self._last_logits(student, input_ids, attention_mask, keep, mm)
        with torch.no_grad():
            zt = self._forward_redirection(self.teacher_model, teacher, self._last_logits,
                                           teacher, input_ids, attention_mask, keep, mm)
        zt = zt.to(zs.device)
        tokens = tokens.to(zs.device)
        loss, stats = _api.gated_opd_loss(
            zs, zt, tokens, _verifier(verifier, zs.device),
            num_items_in_batch=_count(num_items_in_batch, zs.device), return_stats=True,
            **keywords)
        return loss, stats

    def _last_logits(self, model, input_ids, attention_mask, keep, mm):
        """The model's own logits (its head's scale and cap applied) that predict the
        completion tokens, ``(B, keep, V)``."""
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False,
                  **mm}
        if "logits_to_keep" in self.model_kwarg_keys:
            inputs["logits_to_keep"] = keep + 1
        logits = model(**inputs).logits
        return logits[:, :-1][:, -keep:]

    # -- verifier and phased teacher sampling ------------------------------------------------

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        if not self.reward_funcs:
            return output
        mode = "train" if self.model.training else "eval"
        prompts = [x["prompt"] for x in inputs]
        rewards = self._score(inputs, prompts, output["completion_ids"], output["completion_mask"],
                              mode, "")
        rho = self.current_teacher_fraction() if mode == "train" else 0.0
        taken = torch.zeros(len(prompts), dtype=torch.bool)
        if rho > 0:
            output, rewards, taken = self._splice_teacher(inputs, prompts, output, rewards, rho)
            self._metrics[mode]["teacher_sampling/fraction"].append(rho)
            took = self.accelerator.gather(taken.to(self.accelerator.device).float())
            self._metrics[mode]["teacher_sampling/taken_frac"].append(took.mean().item())
        if self.args.verifier_mode == "verdict":
            verdict = rewards > self.args.reward_threshold
            verdict = verdict | taken.to(verdict.device)
            gathered = self.accelerator.gather(verdict.float())
            self._metrics[mode]["verifier/correct_frac"].append(gathered.mean().item())
            output["opd_verifier"] = verdict
        else:
            sign = torch.sign(rewards)
            output["opd_verifier"] = torch.where(taken.to(sign.device), torch.ones_like(sign),
                                                 sign)
        return output

    def _score(self, inputs, prompts, completion_ids, completion_mask, mode, prefix) -> Tensor:
        """The weighted sum of the reward functions per completion (GRPO's convention: a None
        reward adds nothing), logged per function as ``rewards/<name>/mean``."""
        from trl.data_utils import is_conversational

        device = self.accelerator.device
        ids = [c[m.bool()].tolist() for c, m in zip(completion_ids.cpu(), completion_mask.cpu())]
        texts = self.processing_class.batch_decode(ids, skip_special_tokens=True)
        if is_conversational({"prompt": prompts[0]}):
            completions = [[{"role": "assistant", "content": t}] for t in texts]
        else:
            completions = texts
        columns = [k for k in inputs[0] if k not in ("prompt", "completion", "completion_ids")]
        kwargs = {k: [x[k] for x in inputs] for k in columns}
        kwargs["trainer_state"] = self.state
        per_func = torch.zeros(len(prompts), len(self.reward_funcs), device=device)
        for i, (func, name) in enumerate(zip(self.reward_funcs, self.reward_func_names)):
            out = func(prompts=prompts, completions=completions, completion_ids=ids, **kwargs)
            out = [math.nan if r is None else float(r) for r in out]
            if len(out) != len(prompts):
                raise ValueError(f"reward_funcs: {name!r} returned {len(out)} rewards for "
                                 f"{len(prompts)} completions; return one per completion")
            per_func[:, i] = torch.tensor(out, dtype=torch.float32, device=device)
        gathered = self.accelerator.gather(per_func)
        for i, name in enumerate(self.reward_func_names):
            self._metrics[mode][f"{prefix}rewards/{name}/mean"].append(
                torch.nanmean(gathered[:, i]).item())
        weights = self.reward_weights.to(device)
        return (per_func * weights).nansum(dim=1)

    def _teacher_generate(self, prompt_ids: Tensor, prompt_mask: Tensor):
        """One sampled teacher completion per prompt, as lists of ids cut after the first EOS."""
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        with torch.no_grad():
            out = teacher.generate(input_ids=prompt_ids, attention_mask=prompt_mask,
                                   generation_config=self.generation_config,
                                   logits_processor=[_MaskColumns(self.student_vocab)])
        completion = out[:, prompt_ids.size(1):]
        eos = torch.isin(completion, torch.tensor(self.eos_token_ids, device=completion.device))
        result = []
        for row, e in zip(completion.tolist(), eos.tolist()):
            end = e.index(True) + 1 if True in e else len(row)
            result.append(row[:end])
        return result

    def _splice_teacher(self, inputs, prompts, output, rewards, rho):
        """Replace a fraction ``rho`` of the generation batch (one group) with verified teacher
        completions of the same prompts; returns the new batch, its rewards and which rows
        came from the teacher."""
        from trl.trainer.utils import pad

        device = self.accelerator.device
        mode = "train"
        t_ids = self._teacher_generate(output["prompt_ids"], output["prompt_mask"])
        t_tensor = pad([torch.tensor(x, dtype=torch.long) for x in t_ids],
                       padding_value=self._tokenizer.pad_token_id, padding_side="right").to(device)
        t_mask = pad([torch.ones(len(x), dtype=torch.long) for x in t_ids], padding_value=0,
                     padding_side="right").to(device)
        t_rewards = self._score(inputs, prompts, t_tensor, t_mask, mode, "teacher/")
        correct = (t_rewards > self.args.reward_threshold if self.args.verifier_mode == "verdict"
                   else t_rewards > 0)
        keep, take = _schedule.select_teacher_rollouts(correct.view(1, -1), len(prompts), rho,
                                                       generator=self._opd_generator)
        keep, take = keep.view(-1).cpu(), take.view(-1).cpu()
        dropped = (~keep).nonzero().view(-1).tolist()
        sources = take.nonzero().view(-1).tolist()
        taken = torch.zeros(len(prompts), dtype=torch.bool)
        if not dropped:
            return output, rewards, taken
        prompt_ids, prompt_mask = output["prompt_ids"].clone(), output["prompt_mask"].clone()
        s_mask = output["completion_mask"]
        completions = [c[m.bool()].tolist() for c, m in zip(output["completion_ids"].cpu(),
                                                             s_mask.cpu())]
        rewards = rewards.clone()
        for slot, src in zip(dropped, sources):
            prompt_ids[slot], prompt_mask[slot] = output["prompt_ids"][src], output["prompt_mask"][src]
            completions[slot] = t_ids[src]
            rewards[slot] = t_rewards[src]
            taken[slot] = True
        pad_to = self.pad_to_multiple_of
        output = dict(output)
        output["prompt_ids"], output["prompt_mask"] = prompt_ids, prompt_mask
        output["completion_ids"] = pad([torch.tensor(c, dtype=torch.long) for c in completions],
                                       padding_value=self._tokenizer.pad_token_id,
                                       padding_side="right", pad_to_multiple_of=pad_to).to(device)
        output["completion_mask"] = pad([torch.ones(len(c), dtype=torch.long) for c in completions],
                                        padding_value=0, padding_side="right",
                                        pad_to_multiple_of=pad_to).to(device)
        output["num_items_in_batch"] = self.accelerator.gather(
            output["completion_mask"].sum()).sum()
        return output, rewards, taken


_MULTIMODAL = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes",
               "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")


def _count(num_items_in_batch, device):
    """TRL's global token count (a device tensor, never read on the host), or None (eval:
    the local mean)."""
    if isinstance(num_items_in_batch, Tensor):
        return num_items_in_batch.to(device)
    return num_items_in_batch


def _verifier(verifier: Optional[Tensor], device) -> Optional[Tensor]:
    return None if verifier is None else verifier.to(device)


def _reward_funcs(reward_funcs) -> list:
    if reward_funcs is None:
        return []
    funcs = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
    for f in funcs:
        if isinstance(f, (str, torch.nn.Module)) or not callable(f):
            raise TypeError(f"reward_funcs: expected callables reward_func(prompts=, completions=, "
                            f"completion_ids=, **kwargs) -> list of floats (GRPO's signature); "
                            f"got {type(f).__name__} (reward models are not supported)")
    return funcs


def _load_teacher(name: str, args: GatedDistillationConfig):
    """The teacher from a model id or path, with ``teacher_model_init_kwargs`` as TRL reads them."""
    from trl.trainer.utils import create_model_from_path

    kwargs = dict(args.teacher_model_init_kwargs or {})
    dtype = kwargs.get("dtype")
    if isinstance(dtype, str) and dtype != "auto":
        kwargs["dtype"] = getattr(torch, dtype)
    if args.teacher_model_revision is not None:
        kwargs.setdefault("revision", args.teacher_model_revision)
    if args.distributed_state.distributed_type in ("MULTI_GPU", "DEEPSPEED"):
        kwargs["device_map"] = None
    kwargs.setdefault("trust_remote_code", args.trust_remote_code)
    return create_model_from_path(name, **kwargs)


__all__ = ["GatedDistillationConfig", "GatedDistillationTrainer", "head_transform",
           "resolve_divergence"]
