"""The main job: `python -m rat_hf` — pretrain a small RAT on CPU, evaluate, save with a card, reload, generate.

No downloads: the corpus is built from the installed Python standard library's documentation, the tokenizer is a
byte-level BPE trained on it. Takes a few minutes on 2 CPU cores. Any `rat-train` argument may be appended and
overrides the embedded default below, e.g. `python -m rat_hf --max_steps 50 --output_dir /tmp/rat`.
"""

import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

DEFAULT_ARGS = [
    "--preset", "small",
    "--model_config_overrides", '{"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, '
                                '"intermediate_size": 384, "n_policies": 2}',
    "--dataset", "default",
    "--tokenizer", "bpe:2048",
    "--seq_len", "128",
    "--output_dir", "outputs/rat-demo",
    "--max_steps", "400",
    "--per_device_train_batch_size", "16",
    "--per_device_eval_batch_size", "32",
    "--learning_rate", "0.002",
    "--warmup_steps", "20",
    "--lr_scheduler_type", "cosine",
    "--weight_decay", "0.01",
    "--logging_steps", "25",
    "--eval_strategy", "no",
    "--save_strategy", "no",
    "--report_to", "none",
    "--use_cpu", "true",
    "--seed", "0",
]


def main(argv=None) -> None:
    from rat_hf.recipes.pretrain import main as pretrain

    argv = DEFAULT_ARGS + list(sys.argv[1:] if argv is None else argv)  # later flags win
    output_dir = argv[len(argv) - 1 - argv[::-1].index("--output_dir") + 1]
    start = time.time()
    metrics = pretrain(argv)
    print(f"\ntrained in {time.time() - start:.0f} s: eval loss {metrics['eval_loss']:.3f}, "
          f"perplexity {metrics['eval_perplexity']:.1f}; saved to {output_dir} (with README.md model card)")

    model = AutoModelForCausalLM.from_pretrained(output_dir).eval()  # through the Auto classes, as a user would
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    prompt = "The list type"
    inputs = tokenizer(prompt, return_tensors="pt")
    torch.manual_seed(0)
    out = model.generate(**inputs, max_new_tokens=40, do_sample=True, temperature=0.8, top_k=40,
                         pad_token_id=tokenizer.pad_token_id)
    print(f"\nreloaded {type(model).__name__} ({model.num_parameters():,} parameters) with AutoModelForCausalLM")
    print(f"sample: {tokenizer.decode(out[0], skip_special_tokens=True)!r}")


if __name__ == "__main__":
    main()
