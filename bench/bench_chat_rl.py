"""Chat RL on RAT vs a same-size `LlamaForCausalLM`: GRPO (TRL's `GRPOTrainer`) and PPO (rat_hf's `PPOTrainer`), time
per RL iteration split into rollout and update, and the reward curve of a learnable reward, side by side in one run.

An iteration is one rollout and the optimizer steps that use it (GRPO: 1 step; PPO: `--ppo-epochs` steps over the same
rollout). Timed, CUDA-synchronised at both ends, medians over the iterations after `--warmup`:
  rollout — the trainer's own rollout method: GRPO's `_generate_and_score_completions` (`model.generate`, no vLLM,
            then the rewards), PPO's `_rollout` (`generate`, rewards, old log-probs, values, reference log-probs when
            `--kl` > 0, GAE);
  update  — the rest of the iteration's optimizer steps, from `Trainer`'s `on_step_begin` to its `on_step_end`
            (forward, backward, gradient clip, AdamW step).
Identical for both models: the configs of `bench/bench_rat.py` (d=768, 12 layers, 12 heads, SwiGLU 2048, vocabulary
32000, tied embeddings, sdpa; RAT 120.3M with 3 gate policies, Llama 109.5M, both seeded the same), float32 master
weights with bf16 autocast (`bf16=True`: AdamW updates of ~1e-4 would round away in bf16 weights), the prompts, the
seeds, `--batch` completions per iteration (`--num-generations` per prompt), `--max-new-tokens`, temperature 1, no
top-k/top-p, a constant learning rate, no KL term by default (GRPO's `beta`, PPO's `kl_coef`: `--kl`).
Tokenizer: a word-level vocabulary of exactly `--vocab` tokens (special tokens + "w<i>" words) with rat_hf's chat
template, so every id a random model samples decodes to a word. Prompts: seeded random words (8-24), as chat turns.
Reward (learnable from a random initialisation, TRL's reward-function signature): the share of the completion's tokens
that lie in a fixed tenth of the vocabulary (every 10th word), about 0.1 at the start.

    python bench/bench_chat_rl.py --out bench/results/chat_rl.json --plot bench/results/chat_rl.png
    python bench/bench_chat_rl.py --smoke     # tiny models on the CPU, 2 iterations each: the script end to end

Needs trl and datasets besides rat_hf's own requirements, and matplotlib for the plot.
"""

import argparse
import contextlib
import datetime
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from importlib import metadata

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench_rat import build  # noqa: E402  (the RAT and Llama configs of the other benches)

SPECIAL = ["[PAD]", "[BOS]", "[EOS]", "[UNK]", "<|system|>", "<|user|>", "<|assistant|>"]
TARGET_EVERY = 10  # the reward's target words: every 10th word of the vocabulary


# ---- tokenizer, prompts, reward -------------------------------------------------------------------------------------
def word_tokenizer(vocab_size: int):
    """A word-level tokenizer of exactly `vocab_size` tokens: SPECIAL (ids 0-6) + words w0, w1, ...; pad != EOS."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from rat_hf.tokenization.special_tokens import CHAT_TEMPLATE

    words = [f"w{i}" for i in range(vocab_size - len(SPECIAL))]
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(SPECIAL + words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]",
                                  unk_token="[UNK]", extra_special_tokens=SPECIAL[4:], chat_template=CHAT_TEMPLATE,
                                  padding_side="left")  # both trainers generate after left-padded prompts
    assert len(tok) == vocab_size, (len(tok), vocab_size)
    return tok


def prompt_dataset(tok, n: int, seed: int):
    """`n` chat prompts of 8-24 random words (seeded), as TRL's conversational `prompt` column."""
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)
    first_word, last = len(SPECIAL), len(tok)
    prompts = []
    for _ in range(n):
        length = int(torch.randint(8, 25, (1,), generator=g))
        ids = torch.randint(first_word, last, (length,), generator=g).tolist()
        prompts.append([{"role": "user", "content": " ".join(tok.convert_ids_to_tokens(ids))}])
    return Dataset.from_dict({"prompt": prompts})


def make_target_share_reward(tok):
    """TRL's reward signature: share of completion tokens in the target tenth of the vocabulary, in [0, 1] (an empty
    completion: 0). Each call (one rollout) appends its mean reward and mean completion length to `.history`."""
    target = set(range(len(SPECIAL), len(tok), TARGET_EVERY))

    def target_share_reward(prompts, completions, completion_ids, **kwargs):
        scores = [sum(t in target for t in ids) / len(ids) if ids else 0.0 for ids in completion_ids]
        target_share_reward.history.append((sum(scores) / len(scores),
                                            sum(map(len, completion_ids)) / len(completion_ids)))
        return scores

    target_share_reward.history = []
    return target_share_reward


# ---- timing ---------------------------------------------------------------------------------------------------------
def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Clock:
    """Seconds of each rollout and of each optimizer step (a `TrainerCallback`), synchronised with the device."""

    def __init__(self, device: str):
        from transformers import TrainerCallback

        clock = self
        self.device, self.rollouts, self.steps = device, [], []

        class StepTimer(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                sync(clock.device)
                clock._step_start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                sync(clock.device)
                clock.steps.append(time.perf_counter() - clock._step_start)

        self.callback = StepTimer()

    @contextlib.contextmanager
    def rollout(self):
        sync(self.device)
        start = time.perf_counter()
        yield
        sync(self.device)
        self.rollouts.append(time.perf_counter() - start)


def timed_trainer_classes(clock: Clock):
    """GRPOTrainer and PPOTrainer subclasses whose rollout method runs under `clock.rollout()`."""
    from trl import GRPOTrainer

    from rat_hf.trainers.ppo_trainer import PPOTrainer

    class TimedGRPOTrainer(GRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            with clock.rollout():
                return super()._generate_and_score_completions(inputs)

    class TimedPPOTrainer(PPOTrainer):
        def _rollout(self, inputs, rollout_index):
            with clock.rollout():
                return super()._rollout(inputs, rollout_index)

    return TimedGRPOTrainer, TimedPPOTrainer


# ---- one run ----------------------------------------------------------------------------------------------------------
def build_model(kind: str, tok, a):
    model = build(kind, a)  # bf16, seeded, sdpa
    if a.weights == "fp32":
        model = model.float()
    for cfg in (model.config, model.generation_config):
        cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id = tok.pad_token_id, tok.bos_token_id, tok.eos_token_id
    return model


def run(trainer_kind: str, model_kind: str, tok, dataset, a) -> dict:
    from transformers import PrinterCallback, set_seed
    from trl import GRPOConfig

    from rat_hf.trainers.ppo_config import PPOConfig

    cuda = a.device.startswith("cuda")
    set_seed(a.seed)
    model = build_model(model_kind, tok, a)
    params = model.num_parameters()
    reward = make_target_share_reward(tok)
    clock = Clock(a.device)
    grpo_cls, ppo_cls = timed_trainer_classes(clock)
    steps_per_iteration = 1 if trainer_kind == "grpo" else a.ppo_epochs
    common = dict(per_device_train_batch_size=a.batch, max_steps=a.iterations * steps_per_iteration,
                  learning_rate=a.lr, lr_scheduler_type="constant", bf16=cuda, use_cpu=not cuda,
                  logging_steps=steps_per_iteration, save_strategy="no", report_to="none", disable_tqdm=True,
                  seed=a.seed, temperature=1.0, num_generations=a.num_generations)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as output_dir:
        if trainer_kind == "grpo":
            args = GRPOConfig(output_dir=output_dir, max_completion_length=a.max_new_tokens, beta=a.kl, top_k=0,
                              top_p=1.0, gradient_checkpointing=False, **common)
            trainer = grpo_cls(model=model, reward_funcs=reward, args=args, train_dataset=dataset,
                               processing_class=tok, callbacks=[clock.callback])
        else:  # one mini-batch per pass: every optimizer step sees the whole rollout, as GRPO's one step does
            args = PPOConfig(output_dir=output_dir, max_new_tokens=a.max_new_tokens, kl_coef=a.kl,
                             num_ppo_epochs=a.ppo_epochs, num_mini_batches=1, **common)
            trainer = ppo_cls(model, reward, args=args, train_dataset=dataset, processing_class=tok,
                              callbacks=[clock.callback])
        trainer.remove_callback(PrinterCallback)  # the rows below say what this run measured
        trainer.train()
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    del trainer, model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()

    n = a.iterations
    if len(clock.rollouts) != n or len(clock.steps) != n * steps_per_iteration or len(reward.history) != n:
        raise RuntimeError(f"{trainer_kind}/{model_kind}: expected {n} rollouts and {n * steps_per_iteration} steps, "
                           f"timed {len(clock.rollouts)} rollouts, {len(clock.steps)} steps, {len(reward.history)} "
                           "reward calls")
    iteration_s = [sum(clock.steps[i * steps_per_iteration:(i + 1) * steps_per_iteration]) for i in range(n)]
    update_s = [t - r for t, r in zip(iteration_s, clock.rollouts)]
    timed = slice(a.warmup, None)
    rewards = [r for r, _ in reward.history]
    lengths = [c for _, c in reward.history]
    k = max(1, min(3, n // 3))  # reward at start / end: mean of the first / last k iterations
    median = statistics.median
    return dict(
        trainer=trainer_kind, model=model_kind, params=params, steps_per_iteration=steps_per_iteration,
        iteration_s=round(median(iteration_s[timed]), 4), rollout_s=round(median(clock.rollouts[timed]), 4),
        update_s=round(median(update_s[timed]), 4),
        generated_tokens_per_s=round(median(a.batch * c / r for c, r in zip(lengths[timed], clock.rollouts[timed])),
                                     1),
        mean_completion_tokens=round(statistics.mean(lengths), 2),
        reward_start=round(statistics.mean(rewards[:k]), 4), reward_end=round(statistics.mean(rewards[-k:]), 4),
        peak_mem_gib=round(peak, 2) if peak is not None else None,
        per_iteration=dict(reward=[round(r, 4) for r in rewards], completion_tokens=lengths,
                           rollout_s=[round(r, 4) for r in clock.rollouts], update_s=[round(u, 4) for u in update_s]),
    )


# ---- report -------------------------------------------------------------------------------------------------------
def add_ratios(rows: list, target: float) -> None:
    """RAT / Llama for each trainer (time ratios: > 1 means RAT is slower)."""
    for row in rows:
        base = next((r for r in rows if r["trainer"] == row["trainer"] and r["model"] == "llama"), None)
        if row["model"] == "rat" and base is not None:
            for key in ("iteration_s", "rollout_s", "update_s"):
                row[f"{key}_x_llama"] = round(row[key] / base[key], 3)
            row["target_met"] = row["iteration_s_x_llama"] <= target


def plot(rows: list, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trainers = list(dict.fromkeys(r["trainer"] for r in rows))
    fig, axes = plt.subplots(1, len(trainers) + 1, figsize=(4.6 * (len(trainers) + 1), 3.6), squeeze=False)
    colors = {"rat": "tab:red", "llama": "tab:blue"}
    for ax, trainer in zip(axes[0], trainers):
        for r in (r for r in rows if r["trainer"] == trainer):
            curve = r["per_iteration"]["reward"]
            ax.plot(range(1, len(curve) + 1), curve, marker=".", lw=1, color=colors.get(r["model"]),
                    label=f"{r['model']} ({r['params'] / 1e6:.1f}M)")
        ax.set(title=f"{trainer.upper()}: mean reward per rollout", xlabel="iteration (rollout)",
               ylabel="share of target tokens")
        ax.legend(fontsize="small")
    ax = axes[0][-1]
    labels = [f"{r['trainer']}\n{r['model']}" for r in rows]
    ax.bar(labels, [r["rollout_s"] for r in rows], color="tab:gray", label="rollout")
    ax.bar(labels, [r["update_s"] for r in rows], bottom=[r["rollout_s"] for r in rows], color="tab:green",
           label="update")
    ax.set(title="median seconds per iteration", ylabel="s")
    ax.legend(fontsize="small")
    fig.suptitle(title, fontsize="small")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(rows: list, device: str) -> None:
    print(f"\n{device}: median seconds per iteration (warm-up excluded); RAT/Llama > 1 means RAT is slower")
    head = (f"{'trainer':7} {'model':5} {'params':>7} {'iter s':>7} {'rollout s':>9} {'update s':>8} {'gen tok/s':>9} "
            f"{'reward':>13} {'x llama (iter/rollout/update)':>30}")
    print(head)
    for r in rows:
        ratio = (f"{r['iteration_s_x_llama']:.2f} / {r['rollout_s_x_llama']:.2f} / {r['update_s_x_llama']:.2f}"
                 if "iteration_s_x_llama" in r else "")
        print(f"{r['trainer']:7} {r['model']:5} {r['params'] / 1e6:6.1f}M {r['iteration_s']:7.3f} {r['rollout_s']:9.3f} "
              f"{r['update_s']:8.3f} {r['generated_tokens_per_s']:9.0f} "
              f"{r['reward_start']:5.3f} -> {r['reward_end']:5.3f} {ratio:>30}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="JSON results (default bench/results/chat_rl.json; --smoke: a temp file)")
    p.add_argument("--plot", default=None, help="PNG (default: --out with .png)")
    p.add_argument("--device", default=None, help="default cuda (--smoke: cpu)")
    p.add_argument("--smoke", action="store_true", help="tiny models on the CPU, 2 iterations: the script end to end")
    p.add_argument("--trainers", default="grpo,ppo")
    p.add_argument("--models", default="llama,rat")
    p.add_argument("--iterations", type=int, default=24, help="rollouts per run (reward curve length)")
    p.add_argument("--warmup", type=int, default=3, help="first iterations left out of the timing")
    p.add_argument("--batch", type=int, default=32, help="completions per rollout (and per optimizer step)")
    p.add_argument("--num-generations", type=int, default=8, help="completions per prompt")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW, constant")
    p.add_argument("--ppo-epochs", type=int, default=2, help="PPO: optimizer steps over each rollout")
    p.add_argument("--kl", type=float, default=0.0, help="GRPO beta and PPO kl_coef (0: no reference model)")
    p.add_argument("--weights", choices=["fp32", "bf16"], default="fp32",
                   help="master weights (bf16 autocast on CUDA either way)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target", type=float, default=1.1, help="RAT/Llama iteration-time target")
    for name, default in (("hidden", 768), ("layers", 12), ("heads", 12), ("intermediate", 2048), ("vocab", 32000),
                          ("policies", 3)):
        p.add_argument(f"--{name}", type=int, default=default)
    a = p.parse_args()
    if a.smoke:
        a.hidden, a.layers, a.heads, a.intermediate, a.vocab = 64, 2, 4, 128, 512
        a.iterations, a.warmup, a.batch, a.num_generations, a.max_new_tokens = 2, 1, 4, 2, 8
        a.lr = 1e-3
        a.device = a.device or "cpu"
    a.device = a.device or "cuda"
    if a.warmup >= a.iterations:
        raise SystemExit(f"--warmup {a.warmup} must be below --iterations {a.iterations}")
    if a.batch % a.num_generations:
        raise SystemExit(f"--batch {a.batch} must be a multiple of --num-generations {a.num_generations}")
    default_out = (os.path.join(tempfile.gettempdir(), "chat_rl_smoke.json") if a.smoke
                   else os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "chat_rl.json"))
    a.out = a.out or default_out
    a.plot = a.plot or os.path.splitext(a.out)[0] + ".png"
    if a.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
    else:
        torch.set_num_threads(min(torch.get_num_threads(), 2))
    from transformers import logging as hf_logging

    hf_logging.set_verbosity_error()

    start = time.perf_counter()
    tok = word_tokenizer(a.vocab)
    dataset = prompt_dataset(tok, max(64, a.iterations * a.batch // a.num_generations), a.seed)
    device = torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu"
    versions = {name: metadata.version(name) for name in ("torch", "transformers", "trl", "accelerate")}
    result = dict(device=device, date=datetime.date.today().isoformat(), command=" ".join(["python"] + sys.argv),
                  **versions, args=vars(a), rows=[])
    for trainer_kind in a.trainers.split(","):
        for model_kind in a.models.split(","):
            row = run(trainer_kind, model_kind, tok, dataset, a)
            result["rows"].append(row)
            add_ratios(result["rows"], a.target)
            result["wall_s"] = round(time.perf_counter() - start, 1)
            os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
            with open(a.out, "w") as f:  # after every run: a cut-short run keeps what it measured
                json.dump(result, f, indent=1)
            print(json.dumps({k: v for k, v in row.items() if k != "per_iteration"}), flush=True)
    plot(result["rows"], a.plot, f"{device}, batch {a.batch} ({a.num_generations} per prompt), "
                                 f"{a.max_new_tokens} new tokens, lr {a.lr:g}")
    print_table(result["rows"], device)
    print(f"\nwrote {a.out} and {a.plot} ({result['wall_s']} s)")


if __name__ == "__main__":
    main()
