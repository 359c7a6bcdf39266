"""Chat RL with GRPO: TRL's `GRPOTrainer` + LoRA on RAT or any causal LM, rewards picked by name.

    python recipes/grpo_chat.py --config recipes/configs/grpo_chat_tiny.yaml
    accelerate launch --config_file recipes/accelerate_configs/multi_gpu.yaml recipes/grpo_chat.py \
        --model_name_or_path outputs/rat-sft/merged --reward_funcs quality length format --beta 0.04 \
        --num_generations 8 --max_completion_length 100 --output_dir outputs/rat-grpo \
        --push_to_hub --hub_model_id you/rat-grpo

Model: `--model_name_or_path` (a path or Hub id, e.g. `recipes/sft_chat.py`'s `merged/`), or a fresh RAT with a BPE
trained on the conversations; RxT is refused in one line (GRPO scores completions with stateless forwards that bypass
its memory). LoRA by default (`--use_peft false`: every weight; then `--beta > 0` needs a reference model, which TRL
reloads from the policy's `name_or_path`: a model built or resized here is saved to `output_dir/base_model` first).
Data: conversations cut before each assistant turn (`--dataset default`: the offline dialogs; or a chat JSONL in the
PPO-chat seed's format), columns `prompt`, `reference` (the answer that followed) and `quality` for the rewards;
prompts over `--max_prompt_length` tokens are left out. Rewards: `--reward_funcs` names from
`rat_hf.rewards.REWARD_FUNCS` (quality, length, diversity, format, keyword) or `module.path:function`, weighted by
`--reward_weights`; `--target_length` configures `length`. Training: every `GRPOConfig` field (`--beta`,
`--num_generations`, `--temperature`, `--loss_type`, ...). Save (`--output_dir`): the adapter, `merged/` (the adapter
merged into its base: what `--push_to_hub` uploads, with the model card), `training_stats.png` (reward, KL, entropy,
completion length per step), `log_history.json`. Shared code: `rat_hf/recipes/chat_common.py`.
"""

import logging
import sys

from transformers import set_seed
from trl import get_peft_config

from rat_hf.recipes._config import parse_args
from rat_hf.recipes.chat_common import (
    GRPO_ARGUMENTS,
    build_model_and_tokenizer,
    check_model_arguments,
    finish_run,
    grpo_trainer_class,
    load_conversations,
    message_texts,
    prompt_dataset,
    reward_functions,
    save_base_model,
)

logger = logging.getLogger("rat_hf.chat")
# What training_stats.png shows: {panel title: log keys (fnmatch patterns)}
PANELS = {"reward": ["reward", "rewards/*/mean"], "KL to the reference": ["kl"], "entropy": ["entropy"],
          "completion length (tokens)": ["completions/mean_length", "completions/mean_terminated_length"]}


def main(argv=None):
    """Run the recipe as `python recipes/grpo_chat.py ARGV` does; returns the trainer (its model, state, log)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    margs, dargs, sargs, args = parse_args(GRPO_ARGUMENTS, argv, prog="grpo_chat.py")
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    set_seed(args.seed)
    push, args.push_to_hub = args.push_to_hub, False  # pushed once at the end, with the card
    rewards = reward_functions(sargs.reward_funcs, sargs.target_length)  # a bad name fails before any work
    check_model_arguments(margs, "grpo_chat.py", args.trust_remote_code)  # e.g. RxT: refused before any work

    # ---- model (left padding: generation appends to the right of the prompts) ----------------------------------------
    conversations, dataset_label = load_conversations(dargs)
    model, tokenizer, changed = build_model_and_tokenizer(margs, message_texts(conversations), "grpo_chat.py",
                                                          padding_side="left",
                                                          trust_remote_code=args.trust_remote_code)
    if changed:  # TRL reloads the reference (beta > 0, no LoRA) and the adapter records its base by this name
        save_base_model(model, tokenizer, args.output_dir)

    # ---- data --------------------------------------------------------------------------------------------------------
    train_set = prompt_dataset(conversations, tokenizer, sargs.max_prompt_length)
    logger.info("model %s (%s parameters), %d prompts from %s, rewards %s", type(model).__name__,
                f"{model.num_parameters():,}", len(train_set), dataset_label, ", ".join(sargs.reward_funcs))

    # ---- training ----------------------------------------------------------------------------------------------------
    trainer = grpo_trainer_class(model)(model=model, args=args, reward_funcs=rewards, train_dataset=train_set,
                                        processing_class=tokenizer, peft_config=get_peft_config(margs))
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)

    # ---- save, card, push --------------------------------------------------------------------------------------------
    finish_run(trainer, tokenizer, recipe="grpo_chat.py", argv=argv, arguments=(margs, dargs, sargs),
               training_fields=("learning_rate", "max_steps", "beta", "num_generations", "max_completion_length",
                                "temperature", "loss_type", "reward_weights"),
               method="grpo", dataset_label=dataset_label, panels=PANELS, push=push,
               merge_adapter=sargs.merge_adapter, summary=("reward", "mean reward"))
    return trainer


if __name__ == "__main__":
    from rat_hf.recipes._config import run_cli

    run_cli(main, "grpo_chat.py")
