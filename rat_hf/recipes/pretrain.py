"""Pretrain a RAT causal LM with `RatTrainer` — the `rat-train` command and `recipes/pretrain_rat.py`.

    # one process (CPU or one GPU)
    python recipes/pretrain_rat.py --config recipes/configs/pretrain_rat_tiny.yaml
    # several GPUs (DDP); FSDP / DeepSpeed: the other files in recipes/accelerate_configs/
    accelerate launch --config_file recipes/accelerate_configs/multi_gpu.yaml recipes/pretrain_rat.py \
        --config recipes/configs/pretrain_rat_small.yaml

Model: `--preset small|base|large`, `--model_config FILE.json|yaml` (RatConfig fields, seed names accepted), or
`--model_name_or_path DIR_OR_HUB_ID` to continue from a checkpoint; `--model_config_overrides '{"n_policies": 2}'`.
Data: `--dataset default` (real English text from the installed Python standard library's docs: no download), a Hub
dataset name (`wikitext` with `--dataset_config wikitext-2-raw-v1`), a local txt/json/jsonl/csv/parquet file or
folder, or `rlm` (the random-grammar language; `--rlm_*` arguments). Tokenizer: `bpe:N` (a byte-level BPE of N tokens
trained on the training text; small models want small vocabularies), `cl100k` (tiktoken's, offline), or a path/id.
The seed's JSON config layout is accepted by `--config` as is.
"""

import json
import logging
import math
import os
import shlex
import sys
from dataclasses import dataclass, field

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments, default_data_collator, set_seed

logger = logging.getLogger("rat_hf.pretrain")


@dataclass
class ModelArguments:
    preset: str | None = field(default="small", metadata={"help": "RatConfig preset: small, base or large"})
    model_config: str | None = field(default=None, metadata={"help": "JSON/YAML file of RatConfig fields"})
    model_config_overrides: str | None = field(
        default=None, metadata={"help": 'RatConfig fields as JSON, e.g. \'{"hidden_size": 128, "n_policies": 2}\''}
    )
    model_name_or_path: str | None = field(default=None, metadata={"help": "continue from this checkpoint"})
    attn_implementation: str = field(default="sdpa", metadata={"help": "eager, sdpa, flash_attention_2, flex_attention"})


@dataclass
class DataArguments:
    dataset: str = field(default="default", metadata={"help": "default | rlm | Hub dataset name | local file/folder"})
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name"})
    text_column: str = field(default="text")
    max_docs: int | None = field(default=None, metadata={"help": "use at most this many documents"})
    tokenizer: str = field(default="bpe:4096", metadata={"help": "bpe:N | cl100k | tokenizer path or Hub id"})
    seq_len: int = field(default=256, metadata={"help": "tokens per packed training sequence"})
    max_train_sequences: int | None = field(default=None, metadata={"help": "cap on packed training sequences"})
    eval_fraction: float = field(default=0.05, metadata={"help": "held-out share of the packed sequences"})
    rlm_vocab_size: int = 32
    rlm_depth: int = 5
    rlm_beta: float = 1.0
    rlm_seed: int = 0
    rlm_train_sequences: int = 20000


@dataclass
class HubArguments:
    model_card: bool = field(default=True, metadata={"help": "write README.md (model card) into output_dir"})


def build_tokenizer(spec: str, texts):
    from rat_hf.tokenization import tiktoken_tokenizer, train_bpe_tokenizer

    if spec.startswith("bpe:"):
        return train_bpe_tokenizer(texts, vocab_size=int(spec.split(":", 1)[1]))
    if spec == "cl100k":
        return tiktoken_tokenizer()
    return AutoTokenizer.from_pretrained(spec)


def build_data(data: DataArguments, seed: int):
    """-> (train_dataset, eval_dataset, tokenizer or None, dataset label for the card, extra metrics)."""
    from rat_hf.data import RandomLanguageModel, default_text_corpus, load_text_dataset, pack_for_causal_lm

    if data.dataset == "rlm":
        rlm = RandomLanguageModel(data.rlm_vocab_size, data.rlm_depth, data.rlm_beta, seed=data.rlm_seed)
        train = rlm.dataset(data.rlm_train_sequences, seed=seed).map(lambda b: {"labels": b["input_ids"]}, batched=True)
        evaluation = rlm.dataset(max(64, int(data.rlm_train_sequences * data.eval_fraction)), seed=seed + 1)
        evaluation = evaluation.map(lambda b: {"labels": b["input_ids"]}, batched=True)
        optimum, stderr = rlm.optimal_loss(num_samples=2000, seed=seed + 2)
        label = f"rlm(V={data.rlm_vocab_size},depth={data.rlm_depth},beta={data.rlm_beta},seed={data.rlm_seed})"
        return train, evaluation, None, label, {"rlm_optimal_loss": optimum, "rlm_optimal_loss_stderr": stderr}

    if data.dataset == "default":
        texts = default_text_corpus(max_docs=data.max_docs)
        label = "python-stdlib-docs (offline, built by rat_hf.data.default_text_corpus)"
    else:
        texts = load_text_dataset(data.dataset, data.dataset_config, text_column=data.text_column)
        if data.max_docs:
            texts = texts.select(range(min(data.max_docs, len(texts))))
        label = data.dataset if data.dataset_config is None else f"{data.dataset}/{data.dataset_config}"
    tokenizer = build_tokenizer(data.tokenizer, texts["text"])  # load_text_dataset names the column "text"
    packed = pack_for_causal_lm(texts, tokenizer, data.seq_len)
    packed = packed.select_columns(["input_ids", "labels"])
    if data.max_train_sequences:
        packed = packed.select(range(min(len(packed), data.max_train_sequences + max(1, int(data.eval_fraction * len(packed))))))
    split = packed.train_test_split(test_size=max(1, int(data.eval_fraction * len(packed))), seed=seed, shuffle=True)
    return split["train"], split["test"], tokenizer, label, {}


def build_model(margs: ModelArguments, vocab_size: int, tokenizer):
    from rat_hf import RatConfig, RatForCausalLM
    from rat_hf.recipes._config import load_config_file

    if margs.model_name_or_path:
        return AutoModelForCausalLM.from_pretrained(margs.model_name_or_path, attn_implementation=margs.attn_implementation)
    fields = load_config_file(margs.model_config) if margs.model_config else {}
    overrides = margs.model_config_overrides
    if isinstance(overrides, str):
        try:
            overrides = json.loads(overrides)
        except json.JSONDecodeError as e:
            raise ValueError(f"--model_config_overrides is not valid JSON: {e}") from e
    fields.update(overrides or {})
    fields.setdefault("vocab_size", vocab_size)
    if tokenizer is not None:
        fields.update(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id)
    config = RatConfig.from_preset(margs.preset, **fields) if margs.preset and not margs.model_config else RatConfig(**fields)
    if config.vocab_size < vocab_size:
        raise ValueError(f"RatConfig.vocab_size={config.vocab_size} is smaller than the tokenizer's {vocab_size} tokens")
    return RatForCausalLM._from_config(config, attn_implementation=margs.attn_implementation)


def main(argv=None) -> dict:
    from rat_hf.recipes._config import parse_args
    from rat_hf.trainers import RatTrainer

    margs, data, hub, args = parse_args((ModelArguments, DataArguments, HubArguments, TrainingArguments), argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    program = "rat-train" if os.path.basename(sys.argv[0]) == "rat-train" else "python recipes/pretrain_rat.py"
    command = f"{program} {shlex.join(sys.argv[1:] if argv is None else argv)}"
    if margs.model_name_or_path and data.tokenizer == DataArguments.tokenizer and data.dataset != "rlm":
        data.tokenizer = margs.model_name_or_path  # continuing: the checkpoint's own tokenizer, not a fresh BPE
    set_seed(args.seed)
    push, args.push_to_hub = args.push_to_hub, False  # pushed once at the end with the card, not every checkpoint

    # ---- data and model ------------------------------------------------------------------------------------------
    train, evaluation, tokenizer, dataset_label, extra_metrics = build_data(data, args.seed)
    vocab_size = len(tokenizer) if tokenizer is not None else data.rlm_vocab_size
    model = build_model(margs, vocab_size, tokenizer)
    logger.info("model: %s parameters; data: %d training / %d eval sequences of %d tokens from %s",
                f"{model.num_parameters():,}", len(train), len(evaluation), len(train[0]["input_ids"]), dataset_label)

    # ---- training ----------------------------------------------------------------------------------------------------
    trainer = RatTrainer(model=model, args=args, train_dataset=train, eval_dataset=evaluation,
                         data_collator=default_data_collator, processing_class=tokenizer)
    result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    metrics = {"train_loss": result.training_loss, **trainer.evaluate(), **extra_metrics}
    if "rlm_optimal_loss" in metrics:
        metrics["rlm_gap_to_optimum"] = metrics["eval_loss"] - metrics["rlm_optimal_loss"]
    trainer.log_metrics("final", metrics)

    # ---- save, card, push --------------------------------------------------------------------------------------------
    trainer.save_model(args.output_dir)
    if trainer.is_world_process_zero():
        trainer.save_metrics("final", metrics)
        if hub.model_card:
            _write_card(model, args, command, margs, data, dataset_label, metrics)
        if push:
            from rat_hf.hub import push_folder_to_hub

            repo = args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))
            push_folder_to_hub(args.output_dir, repo, token=args.hub_token, private=bool(args.hub_private_repo))
    return metrics


def _write_card(model, args, command, margs, data, dataset_label, metrics) -> None:
    from rat_hf.hub import model_card

    config = {k: v for k, v in {**vars(margs), **vars(data)}.items() if v is not None}
    shown = {k: (round(v, 4) if isinstance(v, float) and math.isfinite(v) else v) for k, v in metrics.items()}
    card = model_card(model, command=command, config=config, metrics=shown, datasets=[dataset_label])
    card.save(os.path.join(args.output_dir, "README.md"))


if __name__ == "__main__":
    main()
