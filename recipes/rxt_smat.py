"""Reactive Transformer curriculum, stage 4: supervised memory-aware training (SMAT).

    accelerate launch recipes/rxt_smat.py --config recipes/configs/rxt_smat_tiny.yaml \
        --model_name_or_path outputs/rxt_memattn_tiny          # or `python recipes/rxt_smat.py ...`: one process
    accelerate launch --config_file recipes/accelerate_configs/multi_gpu.yaml recipes/rxt_smat.py \
        --config recipes/configs/rxt_smat_tiny.yaml --model_name_or_path outputs/rxt-3 --output_dir outputs/rxt-4 \
        --gradient_checkpointing true --push_to_hub --hub_model_id you/rxt-smat

Model: `--model_name_or_path` (required), the output of stage 3 (`recipes/rxt_memattn.py`) or any RxT checkpoint with
its tokenizer. Data (`--dataset`): `offline` (chatterbot dialogs + synthetic memory-recall conversations at
`--recall_distances`, no download), or a local JSON/JSONL file / Hub dataset of conversations. Training:
`RxTSMATTrainer` — turn k is answered from the memory that turns 0..k-1 wrote, the answer's and EOS's cross-entropy
back-propagates through the memory updates (`--bptt_turns`) into the memory attention and the encoder;
`--unfreeze_schedule '{"decoder": 200}'` trains parts from a given step. Evaluation: exact-answer recall of synthetic
conversations at each of `--eval_distances` (and with the memory reset every turn: the no-memory control), greedy.
Save: model + tokenizer + `training.png` (loss curves) + `recall.json` + README.md in `--output_dir`, the input of
stage 5 (`recipes/rxt_mrl.py`); `--push_to_hub` uploads it.
"""

import json
import logging
import os
from dataclasses import dataclass, field

from rat_hf.recipes.rxt_stage import ConversationDataArguments, start_stage, write_card_and_push
from rat_hf.recipes.rxt_stage import StageModelArguments as ModelArguments
from rat_hf.trainers._rxt_common import load_conversations, load_stage_model, plot_log_history
from rat_hf.trainers.rxt_smat_config import RxTSMATConfig
from rat_hf.trainers.rxt_smat_trainer import RxTSMATTrainer, recall_accuracy

logger = logging.getLogger("rat_hf.recipes.rxt")


@dataclass
class DataArguments(ConversationDataArguments):
    recall_distances: list[int] = field(
        default_factory=lambda: [0, 1, 2, 4], metadata={"help": "offline: distractor turns between fact and question"})
    dialogs: bool = field(default=True, metadata={"help": "offline: include the chatterbot dialogs"})
    eval_distances: list[int] = field(default_factory=lambda: [1, 2, 4], metadata={"help": "recall evaluated at"})
    eval_conversations: int = field(default=200, metadata={"help": "held-out recall conversations per distance"})
    model_card: bool = field(default=True, metadata={"help": "write README.md into output_dir"})


def evaluate_recall(model, tokenizer, distances, n: int, seed: int) -> dict:
    """Exact-answer recall by distance, with the memory and with it reset every turn (held-out seeds)."""
    from rat_hf.data import memory_recall_dataset

    result = {}
    for distance in distances:
        records = list(memory_recall_dataset(n, distance, seed=10_000 + seed + distance))  # not the training seeds
        result[f"recall_d{distance}"] = recall_accuracy(model, tokenizer, records)
        result[f"recall_d{distance}_no_memory"] = recall_accuracy(model, tokenizer, records, memory_reset=True)
    return result


def main(argv=None) -> dict:
    argv, margs, data, args, push = start_stage((ModelArguments, DataArguments, RxTSMATConfig), argv,
                                                prog="recipes/rxt_smat.py", previous="recipes/rxt_memattn.py")

    # ---- model -------------------------------------------------------------------------------------------------------
    model, tokenizer = load_stage_model(margs.model_name_or_path, attn_implementation=margs.attn_implementation)

    # ---- data: multi-turn conversations --------------------------------------------------------------------------
    conversations = load_conversations(data.dataset, recall_conversations=data.recall_conversations,
                                       recall_distances=tuple(data.recall_distances), dialogs=data.dialogs,
                                       seed=args.seed)
    logger.info("model: %s parameters from %s; data: %d conversations from %s", f"{model.num_parameters():,}",
                margs.model_name_or_path, len(conversations), data.dataset)

    # ---- training ----------------------------------------------------------------------------------------------------
    trainer = RxTSMATTrainer(model, args, train_dataset=conversations, processing_class=tokenizer)
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)

    # ---- evaluation, save, curves, card, push ------------------------------------------------------------------------
    trainer.save_model(args.output_dir)
    if not trainer.is_world_process_zero():
        return {}
    metrics = evaluate_recall(trainer.policy, tokenizer, data.eval_distances, data.eval_conversations, args.seed)
    last = next((h for h in reversed(trainer.state.log_history) if "loss" in h), {})
    metrics.update({k: last[k] for k in ("loss", "loss/turn_0", "loss/turns_1+") if k in last})
    with open(os.path.join(args.output_dir, "recall.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    plot_log_history(trainer.state.log_history, os.path.join(args.output_dir, "training.png"),
                     ["loss", "loss/turn_0", "loss/turns_1+", "grad_norm"], "RxT stage 4: memory-aware training")
    write_card_and_push(trainer.policy, args, recipe="rxt_smat.py", argv=argv, config={**vars(margs), **vars(data)},
                        metrics=metrics, datasets=[data.dataset], model_card=data.model_card, push=push)
    recall = ", ".join(f"d={d}: {metrics[f'recall_d{d}']:.2f} (no memory {metrics[f'recall_d{d}_no_memory']:.2f})"
                       for d in data.eval_distances)
    print(f"stage 4 done: recall {recall}; model in {args.output_dir}")
    return metrics


if __name__ == "__main__":
    from rat_hf.recipes._config import run_cli

    run_cli(main, "recipes/rxt_smat.py")
