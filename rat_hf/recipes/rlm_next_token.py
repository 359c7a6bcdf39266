"""Next-token learning on the random-grammar language, measured against the exact Bayes-optimal loss.

    python recipes/rlm_next_token.py --config recipes/configs/rlm_next_token_tiny.yaml
    accelerate launch --config_file recipes/accelerate_configs/single_gpu.yaml recipes/rlm_next_token.py \
        --config recipes/configs/rlm_next_token.yaml

The online regime of the RLM seed: every step trains on fresh sequences from the grammar (an endless stream), so
train and test loss differ only by noise and the gap to the optimum is the model's real shortfall. SGD with momentum
(the seed's choice) or AdamW, warmup + cosine; checkpoints and evaluations at log-spaced steps; the dynamics (train /
test loss and accuracy over steps) go to `dynamics.json` and `dynamics.png`, the exact optimal loss drawn as a line.

Like with like: a causal LM is scored on positions 1..T-1 (token t predicts t+1; nothing predicts the first token), so
the optimum it is compared with is the exact loss over the same positions (`optimal_loss(start=1)`), never the mean
over 0..T-1, which includes the first token's marginal and would make a perfect model look better than optimal. The
last position alone (the RLM seed's task: predict the final leaf from all the others) is reported too: the model's
test loss there (`test_last_loss`) next to its own optimum (`optimal_last_loss`).
"""

import json
import logging
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import TrainerCallback, TrainingArguments, default_data_collator, set_seed

logger = logging.getLogger("rat_hf.rlm")


@dataclass
class RLMArguments:
    vocab_size: int = field(default=32, metadata={"help": "grammar symbols V"})
    depth: int = field(default=5, metadata={"help": "tree depth; sequences have 2**depth tokens"})
    beta: float = field(default=1.0, metadata={"help": "inverse temperature of the grammar rules"})
    grammar_seed: int = field(default=0, metadata={"help": "seed that draws the grammar"})
    eval_sequences: int = field(default=512, metadata={"help": "sequences in the fixed train probe and the test set"})
    optimal_samples: int = field(default=2000, metadata={"help": "samples for the optimal-loss estimate"})


@dataclass
class ModelArguments:
    model_config_overrides: str | None = field(
        default='{"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "n_policies": 2}',
        metadata={"help": "RatConfig fields as JSON (vocab and length come from the grammar)"},
    )
    optimizer: str = field(default="sgd", metadata={"help": "sgd (with momentum, the seed's) or adamw"})
    momentum: float = field(default=0.9)
    num_checkpoints: int = field(default=8, metadata={"help": "log-spaced steps at which to evaluate and save"})


class LogSpacedSteps(TrainerCallback):
    """Evaluate and save at log-spaced steps (1, ..., max_steps): the early dynamics get as many points as the tail."""

    def __init__(self, max_steps: int, count: int):
        self.steps = set(np.unique(np.geomspace(1, max_steps, num=max(count, 2)).round().astype(int)).tolist())

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in self.steps:
            control.should_evaluate = control.should_save = True


def _argmax_and_last_nll(logits, labels):
    """Per batch, keep the argmax predictions [B, T] and the loss on the last position [B] (not the full logits)."""
    logits = logits[0] if isinstance(logits, tuple) else logits  # the output's other fields (gate stats) follow
    last = torch.nn.functional.cross_entropy(logits[:, -2].float(), labels[:, -1], reduction="none")  # [B]
    return logits.argmax(-1), last


def _metrics(eval_pred):
    predictions, last_nll = eval_pred.predictions
    predictions, labels = predictions[:, :-1], eval_pred.label_ids[:, 1:]  # token t predicts t+1
    return {"accuracy": float((predictions == labels).mean()), "last_loss": float(np.mean(last_nll)),
            "last_accuracy": float((predictions[:, -1] == labels[:, -1]).mean())}


def main(argv=None) -> dict:
    from rat_hf import RatConfig, RatForCausalLM
    from rat_hf.data import RandomLanguageModel
    from rat_hf.recipes._config import parse_args
    from rat_hf.trainers import RatTrainer

    rlm_args, margs, args = parse_args((RLMArguments, ModelArguments, TrainingArguments), argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if args.max_steps <= 0:
        raise ValueError("--max_steps must be > 0: the online regime streams fresh data forever")
    set_seed(args.seed)

    # ---- the grammar, its optimum, the data ------------------------------------------------------------------------
    rlm = RandomLanguageModel(rlm_args.vocab_size, rlm_args.depth, rlm_args.beta, seed=rlm_args.grammar_seed)
    best = rlm.optimal_losses(num_samples=rlm_args.optimal_samples, seed=10_000 + args.seed)  # positions 1..T-1, last
    logger.info("grammar V=%d depth=%d beta=%.2f: optimal loss %.4f ± %.4f nats/token over positions 1..%d, "
                "%.4f ± %.4f at the last position (uniform: %.4f)", rlm.vocab_size, rlm_args.depth, rlm_args.beta,
                best["optimal_loss"], best["optimal_loss_stderr"], rlm.seq_len - 1, best["optimal_last_loss"],
                best["optimal_last_loss_stderr"], np.log(rlm.vocab_size))
    label = lambda d: d.map(lambda b: {"labels": b["input_ids"]}, batched=True)  # noqa: E731
    evaluation = {"train": label(rlm.dataset(rlm_args.eval_sequences, seed=args.seed)),  # = the stream's first draws
                  "test": label(rlm.dataset(rlm_args.eval_sequences, seed=20_000 + args.seed))}
    stream = rlm.stream(seed=args.seed)

    # ---- model and optimiser ---------------------------------------------------------------------------------------------
    fields = json.loads(margs.model_config_overrides or "{}")
    config = RatConfig(**{**fields, "vocab_size": rlm.vocab_size, "max_position_embeddings": rlm.seq_len})
    model = RatForCausalLM(config)
    if margs.optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=args.learning_rate, momentum=margs.momentum,
                                    weight_decay=args.weight_decay)
    elif margs.optimizer == "adamw":
        optimizer = None  # Trainer's AdamW from the TrainingArguments
    else:
        raise ValueError(f"--optimizer {margs.optimizer!r}: choose sgd or adamw")

    # ---- training ---------------------------------------------------------------------------------------------------------
    args.eval_strategy = "no"  # evaluation happens at the log-spaced steps below
    trainer = RatTrainer(
        model=model, args=args, train_dataset=stream, eval_dataset=evaluation, data_collator=default_data_collator,
        optimizers=(optimizer, None), compute_metrics=_metrics, preprocess_logits_for_metrics=_argmax_and_last_nll,
        callbacks=[LogSpacedSteps(args.max_steps, margs.num_checkpoints)],
    )
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    final = trainer.evaluate()
    trainer.save_model(args.output_dir)

    # ---- dynamics, plot, gap ------------------------------------------------------------------------------------------------
    dynamics = _dynamics(trainer.state.log_history, best, vars(rlm_args))
    gap = final["eval_test_loss"] - best["optimal_loss"]
    last_gap = final["eval_test_last_loss"] - best["optimal_last_loss"]
    dynamics["final"] = {"test_loss": final["eval_test_loss"], "test_accuracy": final["eval_test_accuracy"],
                         "optimal_loss": best["optimal_loss"], "gap_to_optimum": gap,
                         "test_last_loss": final["eval_test_last_loss"],
                         "test_last_accuracy": final["eval_test_last_accuracy"],
                         "optimal_last_loss": best["optimal_last_loss"], "last_gap_to_optimum": last_gap}
    if trainer.is_world_process_zero():
        with open(os.path.join(args.output_dir, "dynamics.json"), "w") as f:
            json.dump(dynamics, f, indent=1)
        _plot(dynamics, os.path.join(args.output_dir, "dynamics.png"))
        print(f"final test loss {final['eval_test_loss']:.4f} nats/token (positions 1..{rlm.seq_len - 1}); optimum "
              f"{best['optimal_loss']:.4f} ± {best['optimal_loss_stderr']:.4f}; gap {gap:+.4f}; "
              f"test accuracy {final['eval_test_accuracy']:.3f}")
        print(f"last position: test loss {final['eval_test_last_loss']:.4f}; optimum {best['optimal_last_loss']:.4f} "
              f"± {best['optimal_last_loss_stderr']:.4f}; gap {last_gap:+.4f}; "
              f"test accuracy {final['eval_test_last_accuracy']:.3f}")
    return dynamics


def _dynamics(history, best, grammar) -> dict:
    train = [(e["step"], e["loss"]) for e in history if "loss" in e]
    evals: dict[int, dict] = {}  # Trainer logs each eval set in its own entry: merge them by step
    for e in history:
        if any(k.startswith("eval_") for k in e):
            evals.setdefault(e["step"], {}).update(e)
    steps = sorted(s for s, e in evals.items() if "eval_test_loss" in e and "eval_train_loss" in e)
    return {
        "grammar": grammar, **best,
        "train_steps": [s for s, _ in train], "train_loss": [v for _, v in train], "eval_steps": steps,
        **{f"{name}_{what}": [evals[s][f"eval_{split}_{what}"] for s in steps]
           for name, split in (("train_probe", "train"), ("test", "test")) for what in ("loss", "accuracy")},
        "test_last_loss": [evals[s]["eval_test_last_loss"] for s in steps],
    }


def _plot(d: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot(d["train_steps"], d["train_loss"], color="C0", alpha=0.4, label="train (fresh batches)")
    ax_loss.plot(d["eval_steps"], d["train_probe_loss"], "o-", color="C1", label="train probe")
    ax_loss.plot(d["eval_steps"], d["test_loss"], "s-", color="C2", label="test")
    ax_loss.axhline(d["optimal_loss"], color="k", ls="--",
                    label=f"Bayes-optimal {d['optimal_loss']:.3f} (positions 1..T-1)")
    ax_loss.plot(d["eval_steps"], d["test_last_loss"], "^-", color="C3", alpha=0.6, label="test, last position")
    ax_loss.axhline(d["optimal_last_loss"], color="C3", ls=":",
                    label=f"optimal at the last position {d['optimal_last_loss']:.3f}")
    ax_loss.set(xscale="log", xlabel="step", ylabel="next-token loss (nats)", title="loss vs the exact optimum")
    ax_loss.legend(fontsize="small")
    ax_acc.plot(d["eval_steps"], d["train_probe_accuracy"], "o-", color="C1", label="train probe")
    ax_acc.plot(d["eval_steps"], d["test_accuracy"], "s-", color="C2", label="test")
    ax_acc.set(xscale="log", xlabel="step", ylabel="next-token accuracy", title="accuracy")
    ax_acc.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
