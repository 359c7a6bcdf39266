"""Reactive Transformer curriculum, stage 3: self-supervised memory-attention pre-training.

    python recipes/rxt_memattn.py --config recipes/configs/rxt_memattn_tiny.yaml --model_name_or_path outputs/rxt_sft_tiny
    accelerate launch --config_file recipes/accelerate_configs/multi_gpu.yaml recipes/rxt_memattn.py \
        --config recipes/configs/rxt_memattn_tiny.yaml --model_name_or_path outputs/rxt-2 --gradient_checkpointing true

Model: `--model_name_or_path` (required), the output of stage 2 (`recipes/rxt_sft.py`) or any RxT checkpoint with its
tokenizer. Data (`--dataset`): `offline` (chatterbot dialogs + synthetic memory-recall conversations), or a local
JSON/JSONL file / Hub dataset of conversation records; each conversation is one episode of up to `--max_turns`
interactions read into the memory one after the other. Training: `RxTMemAttnTrainer` (negative cosine between each
new memory and `w * pooled(encoded interaction) + (1 - w) * old memory`, w = 0.9 for the first interaction and then
decaying: `--new_data_weight_first`, `--new_data_weight_start`, `--new_data_weight_decay`, `--target_pooling`;
by default only the memory attention trains, `--trained_parts`). Save: model + tokenizer + `training.png` +
README.md in `--output_dir`, the input of the memory-aware stage; `--push_to_hub` uploads it.
"""

import logging
import shlex
from dataclasses import dataclass, field

from rat_hf.recipes.rxt_stage import ConversationDataArguments, start_stage
from rat_hf.recipes.rxt_stage import StageModelArguments as ModelArguments
from rat_hf.trainers._rxt_common import finish_stage, load_conversations, load_stage_model
from rat_hf.trainers.rxt_memattn_config import RxTMemAttnConfig
from rat_hf.trainers.rxt_memattn_trainer import RxTMemAttnTrainer

logger = logging.getLogger("rat_hf.recipes.rxt")


@dataclass
class DataArguments(ConversationDataArguments):
    min_turns: int = field(default=2, metadata={"help": "skip conversations with fewer interactions"})


def main(argv=None) -> dict:
    argv, margs, data, args, push = start_stage((ModelArguments, DataArguments, RxTMemAttnConfig), argv,
                                                prog="recipes/rxt_memattn.py", previous="recipes/rxt_sft.py")

    # ---- model -------------------------------------------------------------------------------------------------------
    model, tokenizer = load_stage_model(margs.model_name_or_path, attn_implementation=margs.attn_implementation)

    # ---- data: conversations with at least --min_turns interactions ---------------------------------------------------
    conversations = load_conversations(data.dataset, recall_conversations=data.recall_conversations, seed=args.seed)
    if "interactions" in conversations.column_names:
        conversations = conversations.filter(lambda r: 1 + len(r["interactions"] or []) >= data.min_turns)
    if len(conversations) == 0:
        raise ValueError(f"--dataset {data.dataset!r} has no conversation of --min_turns={data.min_turns} interactions")
    logger.info("model: %s parameters from %s; data: %d conversations from %s", f"{model.num_parameters():,}",
                margs.model_name_or_path, len(conversations), data.dataset)

    # ---- training ----------------------------------------------------------------------------------------------------
    trainer = RxTMemAttnTrainer(model=model, args=args, train_dataset=conversations, processing_class=tokenizer)
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)

    # ---- save, curves, card, push ------------------------------------------------------------------------------------
    metrics = finish_stage(trainer, tokenizer, command=f"python recipes/rxt_memattn.py {shlex.join(argv)}",
                           curves=["loss", "cosine_first", "cosine_last"],
                           title="RxT stage 3: memory-attention pre-training", config={**vars(margs), **vars(data)},
                           datasets=[data.dataset], push=push)
    print(f"stage 3 done: cosine to the targets {metrics.get('cosine', float('nan')):.4g}; model in {args.output_dir}")
    return metrics


if __name__ == "__main__":
    from rat_hf.recipes._config import run_cli

    run_cli(main, "recipes/rxt_memattn.py")
