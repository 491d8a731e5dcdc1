"""The trainer integrations (TRL's DistillationTrainer, Hugging Face's Trainer) and the view helper.

Tiny Qwen2 models built from a config and a character tokenizer built in memory:
nothing is downloaded. The tests that need trl/transformers skip without them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

import sgopd_kernels as sk
from sgopd_kernels.integrations.hf import OPDComputeLoss, opd_views

HAS_TRL = all(importlib.util.find_spec(m) is not None
              for m in ("trl", "transformers", "datasets", "tokenizers"))
needs_trl = pytest.mark.skipif(not HAS_TRL, reason="trl/transformers/datasets not installed "
                                                   "(pip install -e '.[test]')")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_importing_the_package_imports_neither_trl_nor_transformers():
    code = ("import sys, sgopd_kernels, sgopd_kernels.integrations, sgopd_kernels.integrations.hf;"
            "bad = [m for m in ('trl', 'transformers') if m in sys.modules];"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# ---------------------------------------------------------------------------
# opd_views: the aligned views and tokens

def _batch(seed=0, b=3, t=7, v=11):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, v, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, :2] = 0  # left padding
    mask[2, -1] = 0  # right padding
    ids[mask == 0] = 0  # the pad id
    logits = torch.randn(b, t, v, generator=g)
    teacher = torch.randn(b, t, v + 3, generator=g)
    return ids, mask, logits, teacher


def test_views_shift_by_one_and_mask_padding_and_prompt():
    ids, mask, logits, teacher = _batch()
    views = opd_views(logits, ids, mask, prompt_length=3, teacher_logits=teacher)
    assert views.student_logits.data_ptr() == logits.data_ptr()  # a view, not a copy
    assert views.student_logits.shape == (3, 6, 11) and views.teacher_logits.shape == (3, 6, 14)
    assert torch.equal(views.student_logits, logits[:, :-1])
    assert torch.equal(views.teacher_logits, teacher[:, :-1])
    expected = ids[:, 1:].clone()
    for b in range(3):
        for t in range(6):  # position t predicts column t + 1
            if t + 1 < 3 or mask[b, t] == 0 or mask[b, t + 1] == 0:
                expected[b, t] = -100
    assert torch.equal(views.tokens, expected)
    # a per-row prompt length
    views = opd_views(logits, ids, mask, prompt_length=torch.tensor([1, 4, 2]))
    assert views.tokens[0, 0] == ids[0, 1] and (views.tokens[1, :3] == -100).all() \
        and views.tokens[1, 3] == ids[1, 4] and views.tokens[2, 0] == -100


def test_views_from_labels_follow_hugging_face_convention():
    ids, mask, logits, _ = _batch()
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :2] = -100  # a prompt
    views = opd_views(logits, ids, mask, labels=labels)
    assert torch.equal(views.tokens, labels[:, 1:])
    # the same tokens through the loss as the eager formula (defect 8 removed at the start)
    loss = sk.gated_opd_loss(views.student_logits, _batch()[3][:, :-1], views.tokens)
    assert torch.isfinite(loss)


def test_views_of_the_last_positions_only():
    ids, mask, logits, _ = _batch()
    views = opd_views(logits[:, -4:], ids, mask, prompt_length=3)  # logits_to_keep = 4
    full = opd_views(logits, ids, mask, prompt_length=3)
    assert torch.equal(views.student_logits, full.student_logits[:, -3:])
    assert torch.equal(views.tokens, full.tokens[:, -3:])


@pytest.mark.parametrize("case,text", [
    ("shifted", "already shifted"),
    ("pad_zero", "padding position"),
    ("prompt_zero", "not 0"),
    ("mask_as_labels", "mask passed as labels"),
    ("bool_labels", "bool tensor"),
    ("mask_as_ids", "input_ids: holds only 0s and 1s"),
    ("other", "differ from input_ids"),
])
def test_views_reject_the_classic_mistakes(case, text):
    ids, mask, logits, _ = _batch()
    labels = ids.masked_fill(mask == 0, -100)
    kw = {}
    if case == "shifted":
        labels = torch.cat([labels[:, 1:], torch.full((3, 1), -100)], dim=1)
    elif case == "pad_zero":
        labels = ids.clone()  # pad id 0 left in the labels where the mask is 0
    elif case == "prompt_zero":
        labels = ids * (torch.arange(7) >= 3)  # the prompt zeroed instead of -100
        labels = labels.masked_fill(mask == 0, -100)
    elif case == "mask_as_labels":
        labels = mask.clone()
    elif case == "bool_labels":
        labels = mask.bool()
    elif case == "mask_as_ids":
        ids = mask.clone()
        labels = None
    else:
        labels[0, 3] = (labels[0, 3] + 1) % 11 + 2
    if labels is not None:
        kw["labels"] = labels
    with pytest.raises((ValueError, TypeError), match=text):
        opd_views(logits, ids, mask, **kw)


@pytest.mark.parametrize("kw,text", [
    (dict(labels="x"), "labels"),
    (dict(prompt_length=9), "prompt_length"),
    (dict(prompt_length=-1), "prompt_length"),
    (dict(prompt_length=torch.tensor([1.0, 2.0, 3.0])), "prompt_length"),
    (dict(prompt_length=2, labels=torch.zeros(3, 7, dtype=torch.long)), "not both"),
    (dict(attention_mask=torch.full((3, 7), 2)), "attention_mask"),
    (dict(attention_mask=torch.ones(3, 6)), "attention_mask"),
    (dict(teacher_logits=torch.randn(3, 7, 5)), "teacher_logits"),
    (dict(teacher_logits=torch.randn(3, 6, 11)), "teacher_logits"),
])
def test_views_validation_names_the_argument(kw, text):
    ids, mask, logits, _ = _batch()
    args = dict(attention_mask=mask)
    args.update(kw)
    with pytest.raises((ValueError, TypeError), match=text):
        opd_views(logits, ids, **args)
    with pytest.raises(ValueError, match="logits"):
        opd_views(logits[:, :, :].reshape(3, 7 * 11, 1)[:, :8], ids, mask)


# ---------------------------------------------------------------------------
# tiny models and a character tokenizer, built here

CHARS = "0123456789+="


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(CHARS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>",
                                   padding_side="left")


VOCAB = 2 + len(CHARS)


def _qwen2(hidden, seed, vocab=VOCAB, init=0.3):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                      max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=0,
                      eos_token_id=1, bos_token_id=None, initializer_range=init)
    return Qwen2ForCausalLM(cfg)


def _padded(model, extra=5, seed=7):
    """The same model with ``extra`` random rows appended to its embeddings and head."""
    import copy

    model = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    v, _ = model.lm_head.weight.shape
    with torch.no_grad():
        head = torch.nn.Linear(model.config.hidden_size, v + extra, bias=False)
        head.weight.copy_(torch.cat([model.lm_head.weight,
                                     torch.randn(extra, model.config.hidden_size, generator=g)]))
        emb = torch.nn.Embedding(v + extra, model.config.hidden_size)
        emb.weight.copy_(torch.cat([model.model.embed_tokens.weight,
                                    torch.randn(extra, model.config.hidden_size, generator=g)]))
    model.lm_head, model.model.embed_tokens = head, emb
    model.config.vocab_size = v + extra
    return model


PROMPTS = ["12+34=", "5+6=", "77+8=", "9+90=", "1+1=", "23+45=", "3+4=", "8+80="]


def _dataset():
    from datasets import Dataset

    return Dataset.from_dict({"prompt": PROMPTS,
                              "answer": [str(eval(p[:-1])) for p in PROMPTS]})


def _args(cls, tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2,
                gradient_accumulation_steps=2, max_completion_length=5, learning_rate=1e-2,
                logging_steps=1, report_to="none", bf16=False, use_cpu=True,
                gradient_checkpointing=False, save_strategy="no", seed=0)
    base.update(kw)
    return cls(**base)


def _train(trainer_cls, config_cls, tmp_path, student, teacher, trainer_kw=None, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trainer_cls(model=student, teacher_model=teacher,
                              args=_args(config_cls, tmp_path, **kw), train_dataset=_dataset(),
                              processing_class=_tokenizer(), **(trainer_kw or {}))
        trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return trainer, logs


def _ours():
    from sgopd_kernels.integrations.trl import GatedDistillationConfig, GatedDistillationTrainer

    return GatedDistillationTrainer, GatedDistillationConfig


# ---------------------------------------------------------------------------
# TRL: GatedDistillationTrainer against TRL's own DistillationTrainer

@needs_trl
@pytest.mark.parametrize("beta,padded,path", [(1.0, False, "fused"), (0.0, True, "fused"),
                                              (1.0, True, "logits")])
def test_default_trainer_gives_trls_step_losses(tmp_path, beta, padded, path):
    """Default knobs: the same step losses, entropy and weights as TRL's trainer, with
    gradient accumulation (2 micro-batches of uneven token counts) and, for ours, a teacher
    whose vocabulary is padded by 5 random rows (TRL's trainer refuses it)."""
    from trl import DistillationConfig, DistillationTrainer

    teacher = _qwen2(32, 2)
    ref_student, student = _qwen2(16, 1), _qwen2(16, 1)
    _, ref = _train(DistillationTrainer, DistillationConfig, tmp_path / "trl", ref_student,
                    teacher, beta=beta)
    ours_t, ours = _train(*_ours(), tmp_path / "ours", student,
                          _padded(teacher) if padded else teacher, beta=beta, loss_path=path)
    assert len(ref) == len(ours) == 3
    for a, b in zip(ref, ours):
        assert a["loss"] > 1e-3  # the models disagree: a loss that can differ
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-5, abs=1e-7)
        assert b["entropy"] == pytest.approx(a["entropy"], rel=2e-5)
        assert b["opd/consistent_frac"] == 0 and b["opd/conflict_frac"] == 0  # no verifier
        assert b["opd/student_entropy"] == pytest.approx(b["entropy"], rel=1e-5)
    if beta == 1.0:  # reverse KL: what the loss trains is teacher_kl
        for b in ours:
            assert b["opd/teacher_kl"] > 0
    for p, q in zip(ref_student.parameters(), student.parameters()):
        # Adam moves every weight by about lr = 1e-2 a step: 1e-4 is a hundredth of a step
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-4)
    assert ours_t.teacher_model.config.vocab_size == VOCAB + (5 if padded else 0)


@needs_trl
def test_global_normalization_not_local_means(tmp_path):
    """With gradient accumulation the step loss is the sum over both micro-batches divided by
    their joint token count: a local mean per micro-batch would give another number."""
    cls, cfg = _ours()
    seen = {}

    class Spy(cls):
        def _compute_loss(self, unwrapped, inputs, num_items_in_batch):
            out = super()._compute_loss(unwrapped, inputs, num_items_in_batch)
            seen.setdefault("calls", []).append((out[0].item(), out[2].item(),
                                                 float(num_items_in_batch)))
            return out

    _, logs = _train(Spy, cfg, tmp_path / "spy", _qwen2(16, 1), _qwen2(32, 2),
                     max_steps=1)
    (l1, n1, g1), (l2, n2, g2) = seen["calls"]
    assert g1 == g2 == n1 + n2  # the global count, seen by both micro-batches
    assert logs[0]["loss"] == pytest.approx(l1 + l2, rel=1e-6)
    if n1 != n2:
        local = 0.5 * (l1 * g1 / n1 + l2 * g2 / n2)
        assert logs[0]["loss"] != pytest.approx(local, rel=1e-4)


@needs_trl
def test_knobs_change_the_loss_and_are_logged(tmp_path):
    cls, cfg = _ours()
    _, plain = _train(cls, cfg, tmp_path / "a", _qwen2(16, 1), _qwen2(32, 2), max_steps=1)
    _, veto = _train(cls, cfg, tmp_path / "b", _qwen2(16, 1), _qwen2(32, 2), max_steps=2,
                     bridge_beta=0.5, bridge_beta_schedule="linear", bridge_beta_decay_steps=2)
    assert [h["opd/bridge_beta"] for h in veto] == [0.5, 0.25]
    assert veto[0]["loss"] != pytest.approx(plain[0]["loss"], rel=1e-3)
    _, fwd = _train(cls, cfg, tmp_path / "c", _qwen2(16, 1), _qwen2(32, 2), max_steps=1,
                    divergence="forward_kl")
    assert fwd[0]["loss"] != pytest.approx(plain[0]["loss"], rel=1e-3)


def _answer_reward(prompts, completions, answer, **kw):
    return [1.0 if c.strip() == a else 0.0 for c, a in zip(completions, answer)]


@needs_trl
def test_verifier_gates_the_loss(tmp_path):
    cls, cfg = _ours()
    _, plain = _train(cls, cfg, tmp_path / "a", _qwen2(16, 1), _qwen2(32, 2), max_steps=1)
    _, gated = _train(cls, cfg, tmp_path / "b", _qwen2(16, 1), _qwen2(32, 2), max_steps=1,
                      trainer_kw=dict(reward_funcs=_answer_reward))
    g = gated[0]
    # an untrained student is wrong everywhere: sigma = -1, so every position with delta != 0
    # is gated (extrapolated where the teacher wants the token less, interpolated elsewhere)
    assert g["verifier/correct_frac"] == 0.0
    assert g["rewards/_answer_reward/mean"] == 0.0
    assert g["opd/consistent_frac"] + g["opd/conflict_frac"] == pytest.approx(1.0)
    assert g["opd/consistent_frac"] > 0
    assert g["loss"] != pytest.approx(plain[0]["loss"], rel=1e-3)
    # signed advantages: a reward of 0 is neutral, so no position is gated
    _, neutral = _train(cls, cfg, tmp_path / "c", _qwen2(16, 1), _qwen2(32, 2), max_steps=1,
                        verifier_mode="advantage", trainer_kw=dict(reward_funcs=_answer_reward))
    assert neutral[0]["opd/consistent_frac"] == 0 and neutral[0]["opd/conflict_frac"] == 0
    assert neutral[0]["loss"] == pytest.approx(plain[0]["loss"], rel=1e-5)


@needs_trl
def test_phased_teacher_sampling_replaces_rollouts_with_verified_teacher_ones(tmp_path):
    cls, cfg = _ours()
    seen = []

    class Spy(cls):
        def _compute_loss(self, unwrapped, inputs, num_items_in_batch):
            seen.append((self.state.global_step, inputs["completion_ids"].clone(),
                         inputs["completion_mask"].clone(), inputs["opd_verifier"].clone(),
                         float(num_items_in_batch)))
            return super()._compute_loss(unwrapped, inputs, num_items_in_batch)

    calls = []

    def everything_correct(prompts, completions, completion_ids, **kw):
        calls.append([tuple(c) for c in completion_ids])
        return [1.0] * len(prompts)

    teacher = _padded(_qwen2(32, 2))  # must never sample its padding ids
    trainer, logs = _train(Spy, cfg, tmp_path, _qwen2(16, 1), teacher, max_steps=2,
                           teacher_rho0=1.0, teacher_cold_start_steps=1,
                           trainer_kw=dict(reward_funcs=everything_correct))
    # step 0: student scored, then teacher scored; step 1 (rho = 0): student only
    assert len(calls) == 3
    teacher_rows = set(calls[1])
    assert logs[0]["teacher_sampling/fraction"] == 1.0
    assert logs[0]["teacher_sampling/taken_frac"] == 1.0
    assert "teacher_sampling/fraction" not in logs[1]
    step0 = [s for s in seen if s[0] == 0]
    total = sum(int(m.sum()) for _, _, m, _, _ in step0)
    for _, ids, mask, verdict, count in step0:
        assert verdict.dtype == torch.bool and verdict.all()
        assert count == total  # recounted over the spliced batch
        for row, m in zip(ids, mask):
            r = tuple(row[m.bool()].tolist())
            assert r in teacher_rows and all(t < VOCAB for t in r)


@needs_trl
def test_trl_beta_between_gives_trls_generalized_jsd(tmp_path):
    from trl import DistillationConfig, DistillationTrainer

    _, ref = _train(DistillationTrainer, DistillationConfig, tmp_path / "t", _qwen2(16, 1),
                    _qwen2(32, 2), beta=0.3, max_steps=2)
    _, ours = _train(*_ours(), tmp_path / "o", _qwen2(16, 1), _qwen2(32, 2), beta=0.3,
                     max_steps=2)
    for a, b in zip(ref, ours):
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-5, abs=1e-7)
        assert b["opd/divergence"] > 0  # the JSD it trains, logged


@needs_trl
def test_bf16_mixed_precision_follows_trl(tmp_path):
    """TRL's default precision (bf16 autocast over float32 master weights) runs the fused
    path; the step losses agree with TRL's to bf16 accuracy."""
    from trl import DistillationConfig, DistillationTrainer

    _, ref = _train(DistillationTrainer, DistillationConfig, tmp_path / "t", _qwen2(16, 1),
                    _qwen2(32, 2), bf16=True, max_steps=2)
    _, ours = _train(*_ours(), tmp_path / "o", _qwen2(16, 1), _qwen2(32, 2), bf16=True,
                     max_steps=2)
    for a, b in zip(ref, ours):
        assert b["loss"] == pytest.approx(a["loss"], rel=3e-2)


@needs_trl
@pytest.mark.parametrize("kw,text", [
    (dict(bridge_beta=-0.1), "bridge_beta"),
    (dict(bridge_beta_schedule="linear"), "bridge_beta_decay_steps"),
    (dict(bridge_beta_schedule="exp"), "bridge_beta_schedule"),
    (dict(divergence="kl"), "divergence"),
    (dict(divergence="jsd", beta=1.0), "divergence='jsd'"),
    (dict(divergence="forward_kl", beta=0.4), "contradicts"),
    (dict(extrapolation=0.0), "extrapolation"),
    (dict(loss_path="hidden"), "loss_path"),
    (dict(verifier_mode="reward"), "verifier_mode"),
    (dict(teacher_rho0=1.5), "teacher_rho0"),
    (dict(teacher_cold_start_steps=-1), "teacher_cold_start_steps"),
    (dict(loss_chunk_size=0), "loss_chunk_size"),
])
def test_config_validation_names_the_field(tmp_path, kw, text):
    with pytest.raises(ValueError, match=text):
        _args(_ours()[1], tmp_path, **kw)


@needs_trl
def test_trainer_refuses_a_smaller_teacher_and_sampling_without_a_verifier(tmp_path):
    cls, cfg = _ours()
    with pytest.raises(ValueError, match="teacher_model: vocab_size"):
        _train(cls, cfg, tmp_path, _qwen2(16, 1, vocab=VOCAB + 2), _qwen2(32, 2))
    with pytest.raises(ValueError, match="teacher_rho0.*reward_funcs"):
        _train(cls, cfg, tmp_path, _qwen2(16, 1), _qwen2(32, 2), teacher_rho0=0.5,
               teacher_cold_start_steps=3)
    with pytest.raises(TypeError, match="reward_funcs"):
        _train(cls, cfg, tmp_path, _qwen2(16, 1), _qwen2(32, 2),
               trainer_kw=dict(reward_funcs="a-reward-model"))


@needs_trl
def test_head_scale_and_softcap_are_read_from_each_config():
    from transformers import CohereConfig, Gemma2Config, GraniteConfig, Qwen2Config

    from sgopd_kernels.integrations.trl import head_transform

    assert head_transform(Qwen2Config()) == (1.0, None)
    assert head_transform(Gemma2Config(final_logit_softcapping=3.0)) == (1.0, 3.0)
    assert head_transform(CohereConfig(logit_scale=0.25)) == (0.25, None)
    assert head_transform(GraniteConfig(logits_scaling=8.0)) == (0.125, None)


@needs_trl
def test_softcapped_models_get_their_own_logits_loss_on_both_paths(tmp_path):
    """Gemma-2 caps its logits (final_logit_softcapping): the hidden-state path must give the
    loss of the models' own logits (through the core's softcap, or by falling back)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    def gemma(hidden, seed):
        torch.manual_seed(seed)
        return Gemma2ForCausalLM(Gemma2Config(
            vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
            max_position_embeddings=64, final_logit_softcapping=3.0, pad_token_id=0,
            eos_token_id=1, bos_token_id=None, initializer_range=1.0))

    cls, cfg = _ours()
    _, fused = _train(cls, cfg, tmp_path / "f", gemma(16, 1), gemma(32, 2), max_steps=1,
                      loss_path="fused")
    _, logits = _train(cls, cfg, tmp_path / "l", gemma(16, 1), gemma(32, 2), max_steps=1,
                       loss_path="logits")
    assert fused[0]["loss"] == pytest.approx(logits[0]["loss"], rel=1e-4)


# ---------------------------------------------------------------------------
# Hugging Face Trainer: OPDComputeLoss

@needs_trl
def test_hf_compute_loss_func_is_the_global_token_mean(tmp_path):
    """One optimizer step over all 4 examples (2 per device batch, 2 accumulation steps) of
    uneven lengths: the logged loss is the mean over every labelled token of the 4, whatever
    their order, which per-micro-batch means would not give."""
    from transformers import Trainer, TrainingArguments

    tok = _tokenizer()
    texts = ["12+34=46", "5+6=11", "77+8=85", "1+1=2"]
    rows = []
    for t in texts:
        ids = tok(t)["input_ids"] + [tok.eos_token_id]
        cut = t.index("=") + 1
        rows.append({"input_ids": ids, "labels": [-100] * cut + ids[cut:]})

    def collate(batch):
        width = max(len(r["input_ids"]) for r in batch)
        out = {"input_ids": [], "attention_mask": [], "labels": []}
        for r in batch:
            n = width - len(r["input_ids"])
            out["input_ids"].append(r["input_ids"] + [0] * n)
            out["attention_mask"].append([1] * len(r["input_ids"]) + [0] * n)
            out["labels"].append(r["labels"] + [-100] * n)
        return {k: torch.tensor(v) for k, v in out.items()}

    student, teacher = _qwen2(16, 1), _qwen2(32, 2)
    full = collate(rows)
    with torch.no_grad():
        ls = torch.log_softmax(student(input_ids=full["input_ids"],
                                       attention_mask=full["attention_mask"]).logits, -1)
        lt = torch.log_softmax(teacher(input_ids=full["input_ids"],
                                       attention_mask=full["attention_mask"]).logits, -1)
    kl = (ls.exp() * (ls - lt)).sum(-1)[:, :-1]
    used = full["labels"][:, 1:] != -100
    expected = (kl * used).sum() / used.sum()
    per_row = (kl * used).sum(1) / used.sum(1)
    assert not torch.allclose(expected, per_row.mean(), rtol=1e-3)  # the test can fail

    loss_func = OPDComputeLoss(student, teacher)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, learning_rate=1e-3, logging_steps=1,
                             report_to="none", use_cpu=True, save_strategy="no",
                             remove_unused_columns=False)
    trainer = Trainer(model=student, args=args, train_dataset=rows, data_collator=collate,
                      compute_loss_func=loss_func)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h][0]["loss"]
    assert logged == pytest.approx(expected.item(), rel=1e-5)
    assert loss_func.last_stats is not None
    loss_func.remove()


@needs_trl
def test_hf_compute_loss_func_takes_the_verifier_column_out_of_the_inputs():
    student, teacher = _qwen2(16, 1), _qwen2(32, 2)
    ids = torch.randint(2, VOCAB, (3, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, :2] = -100
    verdict = torch.tensor([True, False, False])
    loss_func = OPDComputeLoss(student, teacher, extrapolation=1.5)
    out = student(input_ids=ids, attention_mask=mask, verifier=verdict)  # popped by the hook
    loss = loss_func(out, labels, num_items_in_batch=torch.tensor(20))
    with torch.no_grad():
        t_logits = teacher(input_ids=ids, attention_mask=mask).logits
    expected = sk.gated_opd_loss(out.logits[:, :-1], t_logits[:, :-1], labels[:, 1:], verdict,
                                 extrapolation=1.5, reduction="sum") / 20
    ungated = sk.gated_opd_loss(out.logits[:, :-1], t_logits[:, :-1], labels[:, 1:],
                                reduction="sum") / 20
    torch.testing.assert_close(loss, expected)
    assert not torch.allclose(loss, ungated)
    assert loss_func.last_stats.consistent_frac + loss_func.last_stats.conflict_frac > 0
    loss_func.remove()


def test_hf_compute_loss_func_validation():
    m = torch.nn.Linear(2, 2)
    with pytest.raises(TypeError, match="reduction"):
        OPDComputeLoss(m, m, reduction="sum")
    with pytest.raises(ValueError, match="divergence"):
        OPDComputeLoss(m, m, divergence="kl")
    with pytest.raises(TypeError, match="teacher_model"):
        OPDComputeLoss(m, "teacher")
    f = OPDComputeLoss(m, m)
    with pytest.raises(RuntimeError, match="forward"):
        f({"logits": torch.zeros(1, 2, 3)}, torch.zeros(1, 2, dtype=torch.long))
# ---------------------------------------------------------------------------
# the example

def test_example_quick_run_writes_metrics_and_plot(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    try:
        import opd_toy
    finally:
        sys.path.pop(0)
    out = tmp_path / "run"
    opd_toy.main(["--quick", "--out", str(out), "--steps", "6", "--teacher-steps", "20",
                  "--eval-every", "3", "--eval-size", "32", "--no-progress"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["methods"]) == {"opd", "veto", "sgopd"}
    for name, m in metrics["methods"].items():
        assert [e["step"] for e in m["eval"]] == [0, 3, 6]
        assert all(0.0 <= e["accuracy"] <= 1.0 for e in m["eval"])
        assert len(m["train"]) == 6 and all(r["loss"] == r["loss"] for r in m["train"])
    assert 0.0 <= metrics["teacher"]["accuracy"] <= 1.0
    # the same seeds: every method starts from the same student
    starts = {m["eval"][0]["accuracy"] for m in metrics["methods"].values()}
    assert len(starts) == 1
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "opd_toy.png").stat().st_size > 0
