"""Reactive Transformer curriculum, stage 2: interaction SFT (`[Q] query [A] answer EOS`, loss on answer + EOS).

    python recipes/rxt_sft.py --config recipes/configs/rxt_sft_tiny.yaml --model_name_or_path outputs/rxt_pretrain_tiny
    accelerate launch --config_file recipes/accelerate_configs/multi_gpu.yaml recipes/rxt_sft.py \
        --config recipes/configs/rxt_sft_tiny.yaml --model_name_or_path outputs/rxt-1 --gradient_checkpointing true

Model: `--model_name_or_path` (required), the output of stage 1 (`recipes/rxt_pretrain.py`) or any RxT checkpoint
with its tokenizer. Data (`--dataset`): `offline` (chatterbot dialogs + synthetic memory-recall conversations), or a
local JSON/JSONL file / Hub dataset of conversation records (`{"query", "answer", "interactions"}` or chat
`{"messages"}`); every interaction is one example. Training: `RxTSFTTrainer` (the joint step of stage 1 on single
interactions: the decoder's loss on the answer and its EOS only, the encoder's masked-LM loss on the interaction;
`--lm_weight`, `--mlm_weight`, `--memory_noise_std`, any `TrainingArguments` flag). Save: model + tokenizer +
`training.png` + README.md in `--output_dir`, the input of `recipes/rxt_memattn.py`; `--push_to_hub` uploads it.
"""

import logging
import shlex

from rat_hf.recipes.rxt_stage import ConversationDataArguments as DataArguments
from rat_hf.recipes.rxt_stage import StageModelArguments as ModelArguments
from rat_hf.recipes.rxt_stage import start_stage
from rat_hf.trainers._rxt_common import finish_stage, load_conversations, load_stage_model
from rat_hf.trainers.rxt_pretrain_trainer import add_mask_token
from rat_hf.trainers.rxt_sft_config import RxTSFTConfig
from rat_hf.trainers.rxt_sft_trainer import RxTSFTTrainer

logger = logging.getLogger("rat_hf.recipes.rxt")


def main(argv=None) -> dict:
    argv, margs, data, args, push = start_stage((ModelArguments, DataArguments, RxTSFTConfig), argv,
                                                prog="recipes/rxt_sft.py", previous="recipes/rxt_pretrain.py")

    # ---- model -------------------------------------------------------------------------------------------------------
    model, tokenizer = load_stage_model(margs.model_name_or_path, attn_implementation=margs.attn_implementation)
    if add_mask_token(tokenizer) >= model.config.vocab_size:  # a checkpoint whose tokenizer had no [MASK] yet
        model.resize_token_embeddings(len(tokenizer))

    # ---- data --------------------------------------------------------------------------------------------------------
    conversations = load_conversations(data.dataset, recall_conversations=data.recall_conversations, seed=args.seed)
    logger.info("model: %s parameters from %s; data: %d conversations from %s", f"{model.num_parameters():,}",
                margs.model_name_or_path, len(conversations), data.dataset)

    # ---- training (the trainer splits the conversations into interactions and tokenizes them) -------------------------
    trainer = RxTSFTTrainer(model=model, args=args, train_dataset=conversations, processing_class=tokenizer)
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)

    # ---- save, curves, card, push ------------------------------------------------------------------------------------
    metrics = finish_stage(trainer, tokenizer, command=f"python recipes/rxt_sft.py {shlex.join(argv)}",
                           curves=["loss", "lm_loss", "mlm_loss"], title="RxT stage 2: interaction SFT",
                           config={**vars(margs), **vars(data)}, datasets=[data.dataset], push=push)
    print(f"stage 2 done: answer lm_loss {metrics.get('lm_loss', float('nan')):.4g}, mlm_loss "
          f"{metrics.get('mlm_loss', float('nan')):.4g}; model in {args.output_dir}")
    return metrics


if __name__ == "__main__":
    from rat_hf.recipes._config import run_cli

    run_cli(main, "recipes/rxt_sft.py")
