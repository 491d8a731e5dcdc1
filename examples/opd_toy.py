#!/usr/bin/env python
"""On-policy distillation end to end, on a CPU, with nothing downloaded.

The task is multi-digit addition, with an exact binary verifier: the prompt is
``a+b=`` (operands zero-padded to ``--digits`` digits) and the answer is the
sum's digits written least significant first (zero-padded to ``digits + 1``),
then an end-of-sequence token.

1. A teacher (a small causal transformer) is trained on correct sums with
   cross-entropy.
2. A smaller student, from random weights, is distilled on-policy: each step it
   samples completions for a batch of prompts (``--group`` per prompt), the
   teacher scores every position of them, and the student takes one optimizer
   step on the loss of ``sgopd_kernels.fused_linear_gated_opd_loss`` (hidden
   states and LM heads; the fused Triton kernels on a GPU, the torch path on a
   CPU).
3. Three methods, from the same student weights, prompts and seeds, with the
   same number of steps and rollouts:

   - ``opd``: plain on-policy distillation, reverse KL(p_S || p_T);
   - ``veto``: Veto's bridge target q ~ p_T * p_S^beta, with beta decayed
     linearly from ``--veto-beta0`` to 0 over the run (``sk.beta_schedule``);
   - ``sgopd``: SG-OPD, the sign gate with the verifier's verdict on each
     rollout (extrapolation 1.8, interpolation 1.0) plus phased teacher
     sampling: during the first ``--cold-start`` fraction of the steps, a
     fraction ``sk.teacher_fraction`` (from ``--rho0`` down to 0) of each
     prompt's group is replaced by teacher rollouts that the verifier endorsed
     (``sk.select_teacher_rollouts``). SG-OPD samples the teacher during the
     cold start; that generation is extra compute, the training budget
     (steps, rollouts per step) is the same.

Greedy accuracy on a fixed held-out set is measured every ``--eval-every``
steps. ``--out DIR`` receives ``metrics.json`` and ``opd_toy.png`` (verifier
accuracy and loss per method; needs matplotlib).

    python examples/opd_toy.py --out runs/toy        # a few minutes on a CPU
    python examples/opd_toy.py --quick --out /tmp/q  # under a minute
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import sgopd_kernels as sk

PLUS, EQ, EOS = 10, 11, 12
VOCAB = 13
METHODS = ("opd", "veto", "sgopd")


# ---------------------------------------------------------------------------
# the task

class Addition:
    """``a+b=`` -> the digits of a+b, least significant first, then EOS."""

    def __init__(self, digits: int):
        self.digits = digits
        self.prompt_len = 2 * digits + 2
        self.answer_len = digits + 2  # digits + 1 sum digits and EOS

    def sample(self, n: int, gen: torch.Generator):
        hi = 10 ** self.digits
        a = torch.randint(0, hi, (n,), generator=gen)
        b = torch.randint(0, hi, (n,), generator=gen)
        return a, b

    @staticmethod
    def _digits(x: torch.Tensor, count: int) -> torch.Tensor:
        """(n,) -> (n, count), least significant first."""
        powers = 10 ** torch.arange(count)
        return (x.unsqueeze(1) // powers) % 10

    def prompts(self, a, b) -> torch.Tensor:
        n = a.shape[0]
        most_first = lambda x: self._digits(x, self.digits).flip(1)  # noqa: E731
        return torch.cat([most_first(a), torch.full((n, 1), PLUS), most_first(b),
                          torch.full((n, 1), EQ)], dim=1)

    def answers(self, a, b) -> torch.Tensor:
        s = self._digits(a + b, self.digits + 1)
        return torch.cat([s, torch.full((a.shape[0], 1), EOS)], dim=1)

    def verify(self, a, b, completion: torch.Tensor) -> torch.Tensor:
        """Exact: the whole answer, EOS included, at its place (bool per rollout)."""
        return (completion == self.answers(a, b).to(completion.device)).all(dim=1)


# ---------------------------------------------------------------------------
# the models

class Block(nn.Module):
    """Pre-norm attention (causal) and MLP."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.out = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.up, self.down = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads) \
            .permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.out(a.transpose(1, 2).reshape(b, t, d))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class TinyLM(nn.Module):
    """A small causal transformer that exposes its last hidden states."""

    def __init__(self, width: int, layers: int, heads: int, max_len: int):
        super().__init__()
        self.tok = nn.Embedding(VOCAB, width)
        self.pos = nn.Embedding(max_len, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, VOCAB, bias=False)

    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden(ids))


@torch.no_grad()
def generate(model: TinyLM, prompts: torch.Tensor, length: int, *, greedy: bool,
             gen: torch.Generator = None) -> torch.Tensor:
    """``length`` tokens after each prompt; after the first EOS everything is EOS."""
    seq = prompts
    done = torch.zeros(prompts.shape[0], dtype=torch.bool, device=prompts.device)
    for _ in range(length):
        logits = model(seq)[:, -1].float()
        if greedy:
            nxt = logits.argmax(-1)
        else:
            probs = torch.softmax(logits, -1)
            nxt = torch.multinomial(probs.cpu(), 1, generator=gen).squeeze(1).to(seq.device)
        nxt = torch.where(done, torch.full_like(nxt, EOS), nxt)
        done |= nxt == EOS
        seq = torch.cat([seq, nxt.unsqueeze(1)], dim=1)
    return seq[:, prompts.shape[1]:]


def accuracy(model: TinyLM, task: Addition, a, b, device) -> float:
    model.eval()
    out = generate(model, task.prompts(a, b).to(device), task.answer_len, greedy=True)
    return task.verify(a, b, out).float().mean().item()


def loss_tokens(completion: torch.Tensor) -> torch.Tensor:
    """The sampled next tokens, -100 after the first EOS (which is trained)."""
    after = torch.cumsum((completion == EOS).int(), dim=1) - (completion == EOS).int()
    return completion.masked_fill(after > 0, -100)


# ---------------------------------------------------------------------------
# training

def train_teacher(task, cfg, device, progress):
    torch.manual_seed(cfg.seed + 1000)
    gen = torch.Generator().manual_seed(cfg.seed + 1000)
    teacher = TinyLM(cfg.teacher_width, cfg.teacher_layers, 4,
                     task.prompt_len + task.answer_len).to(device)
    opt = torch.optim.AdamW(teacher.parameters(), lr=cfg.teacher_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.teacher_lr,
                                                total_steps=cfg.teacher_steps, pct_start=0.1)
    bar = progress(range(cfg.teacher_steps), "teacher (cross-entropy)")
    for step in bar:
        teacher.train()
        a, b = task.sample(cfg.teacher_batch, gen)
        seq = torch.cat([task.prompts(a, b), task.answers(a, b)], dim=1).to(device)
        logits = teacher(seq[:, :-1])[:, task.prompt_len - 1:]
        loss = F.cross_entropy(logits.reshape(-1, VOCAB).float(),
                               seq[:, task.prompt_len:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if hasattr(bar, "set_postfix") and step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def distill(method, teacher, task, cfg, device, eval_set, seed, progress):
    torch.manual_seed(seed)
    student = TinyLM(cfg.student_width, cfg.student_layers, 2,
                     task.prompt_len + task.answer_len).to(device)
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=0.0)
    data_gen = torch.Generator().manual_seed(seed + 1)     # the same prompts for every method
    sample_gen = torch.Generator().manual_seed(seed + 2)   # rollouts
    pick_gen = torch.Generator().manual_seed(seed + 3)     # phased sampling's picks
    cold = int(round(cfg.cold_start * cfg.steps))
    evals = [{"step": 0, "accuracy": accuracy(student, task, *eval_set, device)}]
    rows = []
    bar = progress(range(cfg.steps), f"{method} seed {seed}")
    for step in bar:
        a, b = task.sample(cfg.prompts, data_gen)
        a, b = a.repeat_interleave(cfg.group), b.repeat_interleave(cfg.group)
        prompts = task.prompts(a, b).to(device)
        student.eval()
        completion = generate(student, prompts, task.answer_len, greedy=False, gen=sample_gen)
        correct = task.verify(a, b, completion)
        reward = correct.float().mean().item()
        beta, verifier, rho, taken = 0.0, None, 0.0, 0
        if method == "veto":
            beta = sk.beta_schedule(step, beta0=cfg.veto_beta0, decay_steps=cfg.steps,
                                    schedule="linear")
        if method == "sgopd":
            rho = sk.teacher_fraction(step, rho0=cfg.rho0, cold_start_steps=cold,
                                      schedule="linear")
            if rho > 0:
                t_completion = generate(teacher, prompts, task.answer_len, greedy=False,
                                        gen=sample_gen)
                t_correct = task.verify(a, b, t_completion).view(cfg.prompts, cfg.group)
                keep, take = sk.select_teacher_rollouts(t_correct.cpu(), cfg.group, rho,
                                                        generator=pick_gen)
                s_rows = completion.view(cfg.prompts, cfg.group, -1)
                t_rows = t_completion.view(cfg.prompts, cfg.group, -1)
                mixed, verdict = [], []
                for p in range(cfg.prompts):  # the group keeps its size: kept + taken
                    mixed += [s_rows[p][keep[p]], t_rows[p][take[p]]]
                    verdict += [correct.view(cfg.prompts, cfg.group)[p][keep[p]],
                                torch.ones(int(take[p].sum()), dtype=torch.bool)]
                completion = torch.cat(mixed)
                correct = torch.cat(verdict)
                taken = int(take.sum())
            verifier = correct.to(device)
        seq = torch.cat([prompts, completion], dim=1)
        tokens = loss_tokens(completion)
        student.train()
        hs = student.hidden(seq[:, :-1])[:, task.prompt_len - 1:]
        with torch.no_grad():
            ht = teacher.hidden(seq[:, :-1])[:, task.prompt_len - 1:]
        loss, stats = sk.fused_linear_gated_opd_loss(
            hs, student.head.weight, ht, teacher.head.weight, tokens, verifier, beta=beta,
            return_stats=True)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        row = {"step": step + 1, "loss": loss.item(), "reward": reward, "beta": beta,
               "teacher_fraction": rho, "teacher_rollouts": taken,
               **{k: float(v) for k, v in stats._asdict().items()}}
        rows.append(row)
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            evals.append({"step": step + 1,
                          "accuracy": accuracy(student, task, *eval_set, device)})
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{evals[-1]['accuracy']:.2f}",
                            reward=f"{reward:.2f}", kl=f"{row['teacher_kl']:.3f}",
                            ent=f"{row['student_entropy']:.2f}",
                            cons=f"{row['consistent_frac']:.2f}",
                            conf=f"{row['conflict_frac']:.2f}", refresh=False)
    return {"seed": seed, "eval": evals, "train": rows}


def _mean_over_runs(runs, key):
    out = []
    for entries in zip(*[r[key] for r in runs]):
        merged = {"step": entries[0]["step"]}
        for k in entries[0]:
            if k != "step":
                vals = [e[k] for e in entries]
                merged[k] = sum(vals) / len(vals)
        if key == "eval" and len(entries) > 1:
            merged["min"] = min(e["accuracy"] for e in entries)
            merged["max"] = max(e["accuracy"] for e in entries)
        out.append(merged)
    return out


def plot(metrics, path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4))
    for name, m in metrics["methods"].items():
        steps = [e["step"] for e in m["eval"]]
        line, = ax1.plot(steps, [e["accuracy"] for e in m["eval"]], marker="o", ms=3, label=name)
        if "min" in m["eval"][0]:
            ax1.fill_between(steps, [e["min"] for e in m["eval"]], [e["max"] for e in m["eval"]],
                             color=line.get_color(), alpha=0.15)
        ax2.plot([r["step"] for r in m["train"]], [r["loss"] for r in m["train"]], lw=1,
                 label=name)
        ax3.plot([r["step"] for r in m["train"]], [r["teacher_kl"] for r in m["train"]], lw=1,
                 label=name)
    ax1.axhline(metrics["teacher"]["accuracy"], color="gray", ls="--", lw=1, label="teacher")
    ax1.set(xlabel="step", ylabel="verifier accuracy (greedy, held out)", ylim=(0, 1.02),
            title=f"{metrics['config']['digits']}-digit addition")
    ax2.set(xlabel="step", ylabel="training loss", yscale="log",
            title="loss (each method's own objective)")
    ax3.set(xlabel="step", ylabel="KL(p_S || p_T) per token", yscale="log",
            title="distance to the teacher on the rollouts")
    for ax in (ax1, ax2, ax3):
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _progress(enabled):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        tqdm = None

    def wrap(it, desc):
        if enabled and tqdm is not None:
            return tqdm(it, desc=desc, leave=True, dynamic_ncols=True)
        if enabled:
            print(desc, flush=True)
        return it
    return wrap


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=None, help="directory for metrics.json and opd_toy.png")
    p.add_argument("--quick", action="store_true", help="a smaller run, under a minute")
    p.add_argument("--digits", type=int, default=2, help="digits per operand")
    p.add_argument("--steps", type=int, default=None,
                   help="distillation steps per method (1000; quick: 100)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="(0 1; quick: 0)")
    p.add_argument("--teacher-steps", type=int, default=None, help="(1500; quick: 500)")
    p.add_argument("--teacher-lr", type=float, default=1e-2)
    p.add_argument("--prompts", type=int, default=16, help="prompts per step")
    p.add_argument("--group", type=int, default=4, help="rollouts per prompt")
    p.add_argument("--lr", type=float, default=3e-3, help="student learning rate")
    p.add_argument("--veto-beta0", type=float, default=0.5,
                   help="Veto: beta at step 0, decayed linearly to 0 over the run")
    p.add_argument("--rho0", type=float, default=0.5,
                   help="SG-OPD: teacher fraction at step 0")
    p.add_argument("--cold-start", type=float, default=0.25,
                   help="SG-OPD: fraction of the steps over which rho decays to 0")
    p.add_argument("--eval-every", type=int, default=None, help="(100; quick: 25)")
    p.add_argument("--eval-size", type=int, default=256, help="held-out problems")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (the models are tiny: one thread is as fast as two)")
    p.add_argument("--no-progress", action="store_true")
    cfg = p.parse_args(argv)
    quick = dict(steps=100, seeds=[0], teacher_steps=500, eval_every=25)
    full = dict(steps=1000, seeds=[0, 1], teacher_steps=1500, eval_every=100)
    for k, v in (quick if cfg.quick else full).items():
        if getattr(cfg, k) is None:
            setattr(cfg, k, v)
    cfg.seed = cfg.seeds[0]
    cfg.teacher_width, cfg.teacher_layers, cfg.teacher_batch = 64, 2, 128
    cfg.student_width, cfg.student_layers = 48, 2
    for name in ("steps", "teacher_steps", "eval_every", "prompts", "group", "digits"):
        if getattr(cfg, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return cfg


def main(argv=None):
    cfg = parse(argv)
    threads = torch.get_num_threads()
    if cfg.threads and cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    try:
        return run(cfg)
    finally:
        torch.set_num_threads(threads)


def run(cfg):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backend = sk.resolve_backend("auto", device, torch.float32)
    progress = _progress(not cfg.no_progress)
    task = Addition(cfg.digits)
    started = time.perf_counter()
    print(f"{cfg.digits}-digit addition on {device} (loss backend: {backend}), "
          f"{cfg.steps} steps x {cfg.prompts} prompts x {cfg.group} rollouts, seeds {cfg.seeds}",
          flush=True)
    teacher = train_teacher(task, cfg, device, progress)
    eval_gen = torch.Generator().manual_seed(12345)
    eval_set = task.sample(cfg.eval_size, eval_gen)
    teacher_acc = accuracy(teacher, task, *eval_set, device)
    print(f"teacher accuracy {teacher_acc:.3f}", flush=True)
    methods = {}
    for method in METHODS:
        t0 = time.perf_counter()
        runs = [distill(method, teacher, task, cfg, device, eval_set, seed, progress)
                for seed in cfg.seeds]
        methods[method] = {"runs": runs, "eval": _mean_over_runs(runs, "eval"),
                           "train": _mean_over_runs(runs, "train"),
                           "seconds": time.perf_counter() - t0}
        methods[method]["final_accuracy"] = methods[method]["eval"][-1]["accuracy"]
        print(f"{method}: final accuracy {methods[method]['final_accuracy']:.3f} "
              f"(mean over seeds {cfg.seeds})", flush=True)
    params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    metrics = {
        "config": {k: v for k, v in vars(cfg).items() if k not in ("out",)},
        "machine": {"device": str(device), "device_name": _device_name(device),
                    "cpu_count": os.cpu_count(),
                    "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "sgopd_kernels": sk.__version__, "loss_backend": backend},
        "teacher": {"accuracy": teacher_acc, "parameters": params(teacher)},
        "student_parameters": params(TinyLM(cfg.student_width, cfg.student_layers, 2,
                                            task.prompt_len + task.answer_len)),
        "methods": methods,
        "seconds": time.perf_counter() - started,
    }
    ranking = sorted(METHODS, key=lambda m: -methods[m]["final_accuracy"])
    print("final greedy accuracy: " + ", ".join(
        f"{m} {methods[m]['final_accuracy']:.3f}" for m in ranking)
        + f" (teacher {teacher_acc:.3f}); {metrics['seconds']:.0f} s", flush=True)
    if cfg.out:
        os.makedirs(cfg.out, exist_ok=True)
        with open(os.path.join(cfg.out, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=1)
        png = os.path.join(cfg.out, "opd_toy.png")
        if plot(metrics, png):
            print(f"wrote {cfg.out}/metrics.json and {png}")
        else:
            print(f"wrote {cfg.out}/metrics.json (install matplotlib for the plot)")
    return metrics


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
