"""Attention-guided RL self-curriculum: the model orders the key/value pairs of its own context (LoRA + REINFORCE).

    python recipes/attention_guided_rl.py --config recipes/configs/attention_guided_rl_tiny.yaml
    python recipes/attention_guided_rl.py --config recipes/configs/attention_guided_rl_tiny.yaml --resume
    accelerate launch recipes/attention_guided_rl.py --model_name_or_path MODEL --dataset wikipedia \
        --episodes 1000 --batch_size 16 --output_dir outputs/agrl

Sections: model (a causal LM, or a fresh tiny RAT with a BPE trained on the data) / data (--dataset corpus,
wikipedia, twenty_questions, define_recall) / training (`AttentionGuidedTrainer`: group-relative REINFORCE with an
exact KL to the adapter-disabled model, checkpoints every --save_steps episodes, --resume continues exactly) / save
(adapter, tokenizer, history.json, training.png in --output_dir). One process: the rollouts are sequential and the
models this is meant for are small; `accelerate launch` only picks the device.
Implementation: `rat_hf/recipes/attention_guided_rl.py`, `rat_hf/curriculum/`. Results: bench/RESULTS.md.
"""

from rat_hf.recipes.attention_guided_rl import main

if __name__ == "__main__":
    from rat_hf.recipes._config import run_cli

    run_cli(main, "recipes/attention_guided_rl.py")
