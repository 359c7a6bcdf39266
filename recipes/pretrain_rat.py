"""Pretrain a RAT causal LM on the offline default corpus, a Hub dataset, local files or the random language model.

    python recipes/pretrain_rat.py --config recipes/configs/pretrain_rat_tiny.yaml
    accelerate launch --config_file recipes/accelerate_configs/multi_gpu.yaml recipes/pretrain_rat.py \
        --config recipes/configs/pretrain_rat_small.yaml --push_to_hub --hub_model_id you/rat-small

Same as the `rat-train` command; the implementation (dataclasses, data, model, training, save + card + push) is
`rat_hf/recipes/pretrain.py`.
"""

from rat_hf.recipes.pretrain import main

if __name__ == "__main__":
    main()
