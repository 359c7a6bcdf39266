"""Learn the random-grammar language in the online regime and compare with the exact Bayes-optimal loss.

    python recipes/rlm_next_token.py --config recipes/configs/rlm_next_token_tiny.yaml
    accelerate launch --config_file recipes/accelerate_configs/single_gpu.yaml recipes/rlm_next_token.py \
        --config recipes/configs/rlm_next_token.yaml

Writes dynamics.json and dynamics.png (loss and accuracy over log-spaced steps, optimum as a line) to --output_dir
and prints the final gap to the optimum. Implementation: `rat_hf/recipes/rlm_next_token.py`.
"""

from rat_hf.recipes.rlm_next_token import main

if __name__ == "__main__":
    from rat_hf.recipes._config import run_cli

    run_cli(main, "recipes/rlm_next_token.py")
