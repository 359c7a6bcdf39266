"""The Reactive Transformer curriculum in one command: pretrain -> sft -> memattn -> smat -> mrl.

    python recipes/rxt_pipeline.py --preset tiny            # a tiny RxT on the offline data, minutes on CPU
    rat-chat --model outputs/rxt_pipeline_tiny/final         # then talk to it

    python recipes/rxt_pipeline.py --config recipes/configs/rxt_pipeline_tiny.yaml --output_root outputs/rxt \
        --set smat.max_steps=400 --push_to_hub --hub_model_id_prefix you/rxt   # you/rxt-pretrain, you/rxt-sft, ...

Each stage runs `recipes/rxt_<stage>.py` on the previous stage's saved checkpoint; wall times and metrics go to
`<output_root>/pipeline.json`. The implementation is `rat_hf.recipes.rxt_pipeline`.
"""

import sys

from rat_hf.recipes.rxt_pipeline import main

if __name__ == "__main__":
    from rat_hf.recipes._config import run_cli

    run_cli(lambda: sys.exit(main()), "recipes/rxt_pipeline.py")  # main returns the exit status
