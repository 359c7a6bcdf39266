"""Supervised fine-tuning of a chat model, the start before RL: TRL's `SFTTrainer` + LoRA on RAT or any causal LM.

    python recipes/sft_chat.py --config recipes/configs/sft_chat_tiny.yaml
    accelerate launch --config_file recipes/accelerate_configs/multi_gpu.yaml recipes/sft_chat.py \
        --model_name_or_path outputs/rat-small --dataset chats.jsonl --num_train_epochs 3 \
        --output_dir outputs/rat-sft --push_to_hub --hub_model_id you/rat-sft

Model: `--model_name_or_path` (a path or Hub id: RAT, Llama, ...; RxT is refused, see `chat_common.refuse_rxt`), or a
fresh RAT (`--model_config_overrides`) with a BPE trained on the conversations (`--tokenizer bpe:N`). LoRA by default
(`--use_peft false` trains every weight; `--lora_r`, `--lora_alpha`, `--lora_target_modules` as in TRL's scripts).
Data: `--dataset default` (the offline chatterbot-corpus dialogs) or a chat JSONL in the PPO-chat seed's format
(`--min_quality` keeps the well-scored conversations). The tokenizer's chat template formats them; the loss covers
the assistant turns only when the template marks them with `{% generation %}` (rat_hf's does), else every token.
Training: every `SFTConfig` field. Save (`--output_dir`): the adapter, `merged/` (adapter merged into the base: what
`--push_to_hub` uploads, with the model card), `base_model/` when the base was built here, `training_stats.png`.
Next: `recipes/grpo_chat.py --model_name_or_path OUTPUT_DIR/merged`. Shared code: `rat_hf/recipes/chat_common.py`.
"""

import logging
import re
import sys

from transformers import set_seed
from trl import get_peft_config

from rat_hf.recipes._config import parse_args
from rat_hf.recipes.chat_common import (
    SFT_ARGUMENTS,
    build_model_and_tokenizer,
    check_model_arguments,
    finish_run,
    load_conversations,
    message_texts,
    save_base_model,
    sft_dataset,
    sft_trainer_class,
)

logger = logging.getLogger("rat_hf.chat")
# What training_stats.png shows: {panel title: log keys}
PANELS = {"loss": ["loss", "eval_loss"], "token accuracy": ["mean_token_accuracy", "eval_mean_token_accuracy"],
          "entropy": ["entropy"], "learning rate": ["learning_rate"]}
# `{% generation %}` (any whitespace / trim markers) around assistant turns: the template can mark what to learn
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


def main(argv=None):
    """Run the recipe as `python recipes/sft_chat.py ARGV` does; returns the trainer (its model, state, log)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    margs, dargs, sargs, args = parse_args(SFT_ARGUMENTS, argv, prog="sft_chat.py")
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    set_seed(args.seed)
    push, args.push_to_hub = args.push_to_hub, False  # pushed once at the end, with the card
    check_model_arguments(margs, "sft_chat.py", args.trust_remote_code)  # e.g. RxT: refused before any work

    # ---- data --------------------------------------------------------------------------------------------------------
    conversations, dataset_label = load_conversations(dargs)
    train_set = sft_dataset(conversations)

    # ---- model (right padding: SFT's collator pads after the text) ---------------------------------------------------
    model, tokenizer, changed = build_model_and_tokenizer(margs, message_texts(conversations), "sft_chat.py",
                                                          padding_side="right",
                                                          trust_remote_code=args.trust_remote_code)
    if changed:  # built or resized here: saved, so that the adapter's recorded base loads again
        save_base_model(model, tokenizer, args.output_dir)
    if _GENERATION_TAG.search(tokenizer.chat_template):
        args.assistant_only_loss = True
    else:
        logger.info("the chat template does not mark assistant turns ({%% generation %%}): the loss covers every "
                    "token of the conversation")
    logger.info("model %s (%s parameters), %d conversations from %s", type(model).__name__,
                f"{model.num_parameters():,}", len(train_set), dataset_label)

    # ---- training ----------------------------------------------------------------------------------------------------
    trainer = sft_trainer_class(model)(model=model, args=args, train_dataset=train_set, processing_class=tokenizer,
                                       peft_config=get_peft_config(margs))
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)

    # ---- save, card, push --------------------------------------------------------------------------------------------
    finish_run(trainer, tokenizer, recipe="sft_chat.py", argv=argv, arguments=(margs, dargs, sargs),
               training_fields=("learning_rate", "max_steps", "num_train_epochs", "assistant_only_loss", "max_length"),
               method="sft", dataset_label=dataset_label, panels=PANELS, push=push, merge_adapter=sargs.merge_adapter,
               summary=("loss", "loss"))
    return trainer


if __name__ == "__main__":
    from rat_hf.recipes._config import run_cli

    run_cli(main, "sft_chat.py")
