"""Chat RL with PPO: rat_hf's `PPOTrainer` (learned value function, GAE, clipped losses) + LoRA on RAT or any causal LM.

    python recipes/ppo_chat.py --config recipes/configs/ppo_chat_tiny.yaml
    accelerate launch recipes/ppo_chat.py --config recipes/configs/ppo_chat_tiny.yaml
    accelerate launch --config_file recipes/accelerate_configs/multi_gpu.yaml recipes/ppo_chat.py \
        --model_name_or_path outputs/rat-sft/merged --reward_funcs quality length format --kl_coef 0.05 \
        --max_new_tokens 100 --temperature 0.7 --output_dir outputs/rat-ppo --push_to_hub --hub_model_id you/rat-ppo

Model: `--model_name_or_path` (a path or Hub id, e.g. `recipes/sft_chat.py`'s `merged/`), or a fresh RAT with a BPE
trained on the conversations; RxT is refused in one line. LoRA by default: the KL reference is the policy with its
adapter disabled; `--use_peft false` trains every weight against a frozen copy. The value function: a
sequence-classification copy of the starting model (its trunk, a zero score head; saved in `output_dir/value_model`)
or `--value_head true` (a linear head on the policy's trunk). Data: conversations cut before each assistant turn
(`--dataset default`: the offline dialogs; or a chat JSONL in the PPO-chat seed's format), columns `prompt`,
`reference` and `quality` for the rewards; prompts over `--max_prompt_length` tokens are left out. Rewards:
`--reward_funcs` names from `rat_hf.rewards.REWARD_FUNCS` or `module.path:function`, weighted by `--reward_weights`.
Training: every `PPOConfig` field (`--kl_coef`, `--clip_eps`, `--num_ppo_epochs`, `--num_mini_batches`, `--vf_coef`,
`--entropy_coef`, `--temperature`, `--max_new_tokens`, ...). Save (`--output_dir`): the adapter, `merged/` (adapter
merged into its base: what `--push_to_hub` uploads, with the model card), `value_model/`, `training_stats.png`
(reward, KL, entropy, losses, completion length per step), `log_history.json`. Shared code:
`rat_hf/recipes/chat_common.py`; the trainer: `rat_hf/trainers/ppo_trainer.py`.
"""

import logging
import sys
from dataclasses import dataclass, field

from transformers import set_seed
from trl import get_peft_config

from rat_hf.recipes._config import parse_args
from rat_hf.recipes.chat_common import (
    ChatDataArguments,
    ChatModelArguments,
    build_model_and_tokenizer,
    finish_run,
    load_conversations,
    message_texts,
    prompt_dataset,
    reward_functions,
    save_base_model,
)
from rat_hf.trainers.ppo_config import PPOConfig
from rat_hf.trainers.ppo_trainer import PPOTrainer

logger = logging.getLogger("rat_hf.chat")
# What training_stats.png shows: {panel title: log keys (fnmatch patterns)}
PANELS = {"reward": ["reward", "rewards/*/mean"], "KL to the reference": ["kl"], "entropy": ["entropy"],
          "losses": ["policy_loss", "value_loss"], "completion length (tokens)": ["completions/mean_length"]}


@dataclass
class PPOScriptArguments:
    reward_funcs: list[str] = field(default_factory=lambda: ["quality", "length", "format"], metadata={
        "help": "reward names (rat_hf.rewards.REWARD_FUNCS) or module.path:function, weighted by --reward_weights"})
    target_length: float = field(default=50, metadata={"help": "length reward: the best length, in words"})
    merge_adapter: bool = field(default=True, metadata={
        "help": "also save the LoRA adapter merged into its base model (output_dir/merged), the folder pushed"})


def main(argv=None):
    """Run the recipe as `python recipes/ppo_chat.py ARGV` does; returns the trainer (its model, state, log)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    margs, dargs, sargs, args = parse_args((ChatModelArguments, ChatDataArguments, PPOScriptArguments, PPOConfig),
                                           argv, prog="ppo_chat.py")
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    set_seed(args.seed)
    push, args.push_to_hub = args.push_to_hub, False  # pushed once at the end, with the card
    rewards = reward_functions(sargs.reward_funcs, sargs.target_length)  # a bad name fails before any work

    # ---- model (left padding: generation appends to the right of the prompts) ----------------------------------------
    conversations, dataset_label = load_conversations(dargs)
    model, tokenizer, changed = build_model_and_tokenizer(margs, message_texts(conversations), "ppo_chat.py",
                                                          padding_side="left",
                                                          trust_remote_code=args.trust_remote_code)
    if changed:  # the LoRA adapter records its base by this name (and the merged model is rebuilt from it)
        save_base_model(model, tokenizer, args.output_dir)

    # ---- data --------------------------------------------------------------------------------------------------------
    train_set = prompt_dataset(conversations, tokenizer, args.max_prompt_length or sys.maxsize)
    logger.info("model %s (%s parameters), %d prompts from %s, rewards %s", type(model).__name__,
                f"{model.num_parameters():,}", len(train_set), dataset_label, ", ".join(sargs.reward_funcs))

    # ---- training ----------------------------------------------------------------------------------------------------
    trainer = PPOTrainer(model, rewards, args=args, train_dataset=train_set, processing_class=tokenizer,
                         peft_config=get_peft_config(margs))
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)

    # ---- save, card, push --------------------------------------------------------------------------------------------
    policy = trainer.accelerator.unwrap_model(trainer.model).policy  # save_model writes it and the value function
    finish_run(trainer, tokenizer, recipe="ppo_chat.py", argv=argv, arguments=(margs, dargs, sargs),
               training_fields=("learning_rate", "max_steps", "kl_coef", "clip_eps", "value_clip_eps", "vf_coef",
                                "entropy_coef", "gamma", "lam", "num_ppo_epochs", "num_mini_batches", "temperature",
                                "max_new_tokens", "reward_weights"),
               method="ppo", dataset_label=dataset_label, panels=PANELS, push=push,
               merge_adapter=sargs.merge_adapter, summary=("reward", "mean reward"), model=policy)
    return trainer


if __name__ == "__main__":
    from rat_hf.recipes._config import run_cli

    run_cli(main, "ppo_chat.py")
