"""The main job: `python -m rat_hf` — pretrain a small RAT on CPU, evaluate, save with a card, reload, generate.

No downloads: the corpus is built from the installed Python standard library's documentation, the tokenizer is a
byte-level BPE trained on it. Takes a few minutes on 2 CPU cores. Any `rat-train` argument may be appended and
overrides the embedded default below, e.g. `python -m rat_hf --max_steps 50 --output_dir /tmp/rat`.
"""

import sys
import time

DEFAULTS = {
    "preset": "small",
    "model_config_overrides": '{"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, '
                              '"intermediate_size": 384, "n_policies": 2}',
    "dataset": "default",
    "tokenizer": "bpe:2048",
    "seq_len": "128",
    "output_dir": "outputs/rat-demo",
    "max_steps": "400",
    "per_device_train_batch_size": "16",
    "per_device_eval_batch_size": "32",
    "learning_rate": "0.002",
    "warmup_steps": "20",
    "lr_scheduler_type": "cosine",
    "weight_decay": "0.01",
    "logging_steps": "25",
    "eval_strategy": "no",
    "save_strategy": "no",
    "report_to": "none",
    "use_cpu": "true",
    "seed": "0",
}
DEFAULT_ARGS = [part for key, value in DEFAULTS.items() for part in (f"--{key}", value)]
PROMPT = "The list type"

HELP = f"""usage: python -m rat_hf [RAT-TRAIN ARGUMENTS...]

The main job: pretrain a small RAT language model on CPU, evaluate it, save it with a model card, reload it
through AutoModelForCausalLM and sample a completion of {PROMPT!r}. No downloads: the text is the installed Python
standard library's documentation (rat_hf.data.default_text_corpus), 5% of its documents held out for evaluation
(rat-eval --dataset default scores the same ones); the tokenizer is a byte-level BPE trained on the rest.
A few minutes on 2 CPU cores.

Defaults (each is a rat-train argument; append it to override, e.g. --max_steps 50 --output_dir /tmp/rat):
""" + "\n".join(f"  --{key} {value}" for key, value in DEFAULTS.items()) + """

rat-train --help lists every other argument (model, data and transformers' TrainingArguments).
"""


def _last_value(argv, flag: str) -> str:
    """The value the last `--flag VALUE` or `--flag=VALUE` in argv gives (argparse: the last one wins)."""
    value = None
    for i, arg in enumerate(argv):
        if arg == f"--{flag}" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(f"--{flag}="):
            value = arg.split("=", 1)[1]
    return value


def run(argv) -> None:
    import warnings

    import torch
    from transformers import AutoModelForCausalLM

    from rat_hf.cli._common import from_pretrained_checked, load_tokenizer
    from rat_hf.recipes.pretrain import train

    argv = DEFAULT_ARGS + list(argv)  # later flags win
    output_dir = _last_value(argv, "output_dir")
    start = time.time()
    metrics = train(argv)
    print(f"\ntrained in {time.time() - start:.0f} s: eval loss {metrics['eval_loss']:.3f}, "
          f"perplexity {metrics['eval_perplexity']:.1f}; saved to {output_dir} (with README.md model card)")

    # through the Auto classes, as a user would; weights that do not match the config are an error
    model = from_pretrained_checked(AutoModelForCausalLM, output_dir).eval()
    tokenizer = load_tokenizer(output_dir)
    inputs = tokenizer(PROMPT, return_tensors="pt")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        out = model.generate(**inputs, max_new_tokens=40, do_sample=True, temperature=0.8, top_k=40,
                             pad_token_id=tokenizer.pad_token_id)
    print(f"\nreloaded {type(model).__name__} ({model.num_parameters():,} parameters) from {output_dir} "
          "with AutoModelForCausalLM")
    print(f"sample: {tokenizer.decode(out[0], skip_special_tokens=True)!r}")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(HELP)
        return 0
    from rat_hf.cli._common import report_error

    try:
        run(argv)
    except KeyboardInterrupt:
        print("python -m rat_hf: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if "--traceback" in argv:
            raise
        report_error("python -m rat_hf", error)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
