"""Reactive Transformer curriculum, stage 5: memory reinforcement learning (MRL) over a curriculum of episode lengths.

    accelerate launch recipes/rxt_mrl.py --config recipes/configs/rxt_mrl_tiny.yaml \
        --model_name_or_path outputs/rxt_smat_tiny          # or `python recipes/rxt_mrl.py ...`: one process
    accelerate launch --config_file recipes/accelerate_configs/multi_gpu.yaml recipes/rxt_mrl.py \
        --config recipes/configs/rxt_mrl_tiny.yaml --model_name_or_path outputs/rxt-4 --output_dir outputs/rxt-5 \
        --curriculum 2 4 8 16 --curriculum_steps 200 200 300 300 --push_to_hub --hub_model_id you/rxt-mrl
    # the comparison: PPO with a critic
    python recipes/rxt_mrl.py --config recipes/configs/rxt_mrl_tiny.yaml --advantage_estimator critic ...

Model: `--model_name_or_path` (required), the output of stage 4 (`recipes/rxt_smat.py`) or any RxT checkpoint with
its tokenizer; a frozen copy of it is the reference (KL, memory drift, embedding-cosine rewards). Data (`--dataset`):
`recall` (synthetic conversations of `max(--curriculum)` turns for each of `--strategies`: cumulative, where every
turn asks about the previous one, and long_range, a fact, distractors, then the question), or a local JSON/JSONL file
/ Hub dataset of conversations (`strategy` column optional, else `--strategy`). Training: `RxTMRLTrainer` —
`--advantage_estimator group` (critic-free, the default) or `critic`; rewards `--reward_funcs` weighted by
`--reward_weights`. Evaluation: every `--eval_steps` (or at the end) the greedy mean reward and exact-answer rate on
held-out conversations at the current stage's length. Save: model + tokenizer + `rewards.png` (the reward per
optimizer step, coloured by curriculum stage, with the evaluations) + `training.png` + `mrl.json` + README.md in
`--output_dir`; `--push_to_hub` uploads it.
"""

import json
import logging
import os
from dataclasses import dataclass, field

from rat_hf.data import mrl_recall_dataset
from rat_hf.recipes.rxt_stage import ConversationDataArguments, start_stage, write_card_and_push
from rat_hf.recipes.rxt_stage import StageModelArguments as ModelArguments
from rat_hf.trainers._rxt_common import load_conversations, load_stage_model, plot_log_history
from rat_hf.trainers.rxt_mrl_config import RxTMRLConfig
from rat_hf.trainers.rxt_mrl_trainer import RxTMRLTrainer

logger = logging.getLogger("rat_hf.recipes.rxt")


@dataclass
class DataArguments(ConversationDataArguments):
    dataset: str = field(default="recall", metadata={"help": "recall | JSON(L) file | Hub dataset of conversations"})
    recall_conversations: int = field(default=2000, metadata={"help": "recall: conversations per strategy"})
    strategies: list[str] = field(default_factory=lambda: ["cumulative", "long_range"],
                                  metadata={"help": "recall: the strategies mixed in the data"})
    eval_conversations: int = field(default=64, metadata={"help": "held-out conversations per strategy"})
    model_card: bool = field(default=True, metadata={"help": "write README.md into output_dir"})


def load_data(data: DataArguments, args: RxTMRLConfig):
    """(train, eval) conversations; the synthetic ones are long enough for the last curriculum stage."""
    from datasets import concatenate_datasets

    if data.dataset != "recall":
        conversations = load_conversations(data.dataset)
        split = conversations.train_test_split(test_size=min(data.eval_conversations, len(conversations) // 5 or 1),
                                               seed=args.seed)
        return split["train"], split["test"]
    turns = max(args.curriculum)
    train = [mrl_recall_dataset(data.recall_conversations, turns, s, seed=args.seed + i)
             for i, s in enumerate(data.strategies)]
    held_out = [mrl_recall_dataset(data.eval_conversations, turns, s, seed=10_000 + args.seed + i)
                for i, s in enumerate(data.strategies)]
    return concatenate_datasets(train).shuffle(seed=args.seed), concatenate_datasets(held_out)


def plot_rewards(log_history: list, curriculum: list, path: str) -> str:
    """The mean training reward per optimizer step, one colour per curriculum stage (episode length), with the
    evaluations' greedy reward as markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    for turns in curriculum:
        points = [(h["step"], h["reward"]) for h in log_history if h.get("curriculum_turns") == turns and "reward" in h]
        if points:
            ax.plot(*zip(*points), marker="." if len(points) < 30 else None, label=f"{turns} turns (train, sampled)")
    evals = [(h["step"], h["eval_reward"]) for h in log_history if "eval_reward" in h]
    if evals:
        ax.plot(*zip(*evals), "k^--", label="held out (greedy)")
    ax.set(xlabel="optimizer step", ylabel="mean reward", title="RxT stage 5: MRL reward per curriculum stage")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> dict:
    argv, margs, data, args, push = start_stage((ModelArguments, DataArguments, RxTMRLConfig), argv,
                                                prog="recipes/rxt_mrl.py", previous="recipes/rxt_smat.py")

    # ---- model (the reference is a frozen copy, made by the trainer) -------------------------------------------------
    model, tokenizer = load_stage_model(margs.model_name_or_path, attn_implementation=margs.attn_implementation)

    # ---- data --------------------------------------------------------------------------------------------------------
    train, held_out = load_data(data, args)
    logger.info("model: %s parameters from %s; data: %d / %d held-out conversations; curriculum %s turns, %s",
                f"{model.num_parameters():,}", margs.model_name_or_path, len(train), len(held_out), args.curriculum,
                args.advantage_estimator)

    # ---- training ----------------------------------------------------------------------------------------------------
    trainer = RxTMRLTrainer(model, args, train_dataset=train, eval_dataset=held_out, processing_class=tokenizer)
    start = trainer.evaluate_rewards(num_turns=args.curriculum[0])
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)

    # ---- evaluation, save, curves, card, push ------------------------------------------------------------------------
    trainer.save_model(args.output_dir)
    if not trainer.is_world_process_zero():
        return {}
    metrics = {"start_reward": start["reward"], "start_exact_match": start["exact_match"]}
    for turns in sorted(set(args.curriculum)):  # every stage's length, after training
        result = trainer.evaluate_rewards(num_turns=turns)
        metrics.update({f"reward_{turns}_turns": result["reward"], f"exact_match_{turns}_turns": result["exact_match"]})
    with open(os.path.join(args.output_dir, "mrl.json"), "w") as f:
        json.dump({"metrics": metrics, "log_history": trainer.state.log_history}, f, indent=1)
    plot_rewards(trainer.state.log_history, args.curriculum, os.path.join(args.output_dir, "rewards.png"))
    curves = ["loss", "kl", "memory_drift", "exact_match"] + (["value_loss"] if args.advantage_estimator == "critic"
                                                              else [])
    plot_log_history(trainer.state.log_history, os.path.join(args.output_dir, "training.png"), curves,
                     f"RxT stage 5: MRL ({args.advantage_estimator})")
    write_card_and_push(trainer.policy, args, recipe="rxt_mrl.py", argv=argv, config={**vars(margs), **vars(data)},
                        metrics=metrics, datasets=[data.dataset], model_card=data.model_card, push=push)
    per_stage = ", ".join(f"{t} turns: {metrics[f'reward_{t}_turns']:.3f}" for t in sorted(set(args.curriculum)))
    print(f"stage 5 done: greedy reward {metrics['start_reward']:.3f} at the start ({args.curriculum[0]} turns); after "
          f"training {per_stage}; model in {args.output_dir}")
    return metrics


if __name__ == "__main__":
    from rat_hf.recipes._config import run_cli

    run_cli(main, "recipes/rxt_mrl.py")
