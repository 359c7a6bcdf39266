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

Text data is split by document: `held_out(text)` (a hash of the text) puts about `--eval_fraction` of the documents
aside for evaluation, whatever `--max_docs`, tokenizer or `--seq_len`; the BPE is trained on the others. `rat-eval
--dataset default` scores the same held-out documents. What was trained on is recorded in `rat_train_data.json`.
Errors (a missing path, an empty or undecodable file, weights that do not match their config) are one line,
`rat-train: error: ...`, exit 2; `--traceback` shows the full traceback.
"""

import json
import logging
import math
import os
import shlex
import sys
import warnings
from dataclasses import dataclass, field

import torch
from transformers import AutoModelForCausalLM, TrainingArguments, default_data_collator, set_seed

from rat_hf.data.corpora import EVAL_FRACTION, held_out, split_documents  # noqa: F401  (held_out: re-exported)
from rat_hf.recipes._config import check_distributed_launch  # noqa: F401  (re-exported; parse_args runs it)

logger = logging.getLogger("rat_hf.pretrain")
RECORD_FILE = "rat_train_data.json"


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
    eval_fraction: float = field(default=EVAL_FRACTION,
                                 metadata={"help": "held-out share of the documents (text) or sequences (rlm)"})
    rlm_vocab_size: int = 32
    rlm_depth: int = 5
    rlm_beta: float = 1.0
    rlm_seed: int = 0
    rlm_train_sequences: int = 20000


@dataclass
class HubArguments:
    model_card: bool = field(default=True, metadata={"help": "write README.md (model card) into output_dir"})
    traceback: bool = field(default=False, metadata={"help": "show the full traceback of an error, not one line"})


def build_tokenizer(spec: str, texts):
    from rat_hf.cli._common import CLIError, load_tokenizer
    from rat_hf.tokenization import tiktoken_tokenizer, train_bpe_tokenizer

    if spec.startswith("bpe:"):
        size = spec.split(":", 1)[1]
        if not size.isdigit() or int(size) < 1:
            raise CLIError(f"--tokenizer {spec!r}: bpe:N needs a positive integer N, e.g. bpe:4096")
        return train_bpe_tokenizer(texts, vocab_size=int(size))
    if spec == "cl100k":
        return tiktoken_tokenizer()
    return load_tokenizer(spec, what="--tokenizer")


def build_data(data: DataArguments, seed: int):
    """-> (train_dataset, eval_dataset, tokenizer or None, dataset label for the card, extra metrics, record)."""
    from rat_hf.cli._common import CLIError, load_text
    from rat_hf.data import RandomLanguageModel, default_text_corpus, pack_for_causal_lm

    if not 0 < data.eval_fraction < 1:
        raise CLIError(f"--eval_fraction must be in (0, 1), got {data.eval_fraction}")
    record = {"dataset": data.dataset, "dataset_config": data.dataset_config, "max_docs": data.max_docs,
              "eval_fraction": data.eval_fraction}
    if data.dataset == "rlm":
        rlm = RandomLanguageModel(data.rlm_vocab_size, data.rlm_depth, data.rlm_beta, seed=data.rlm_seed)
        train = rlm.dataset(data.rlm_train_sequences, seed=seed).map(lambda b: {"labels": b["input_ids"]}, batched=True)
        evaluation = rlm.dataset(max(64, int(data.rlm_train_sequences * data.eval_fraction)), seed=seed + 1)
        evaluation = evaluation.map(lambda b: {"labels": b["input_ids"]}, batched=True)
        # positions 1..T-1, the ones the shifted eval loss covers (the first token's marginal is never predicted),
        # and the last position alone (the seed's task)
        optima = {f"rlm_{k}": v for k, v in rlm.optimal_losses(num_samples=2000, seed=seed + 2).items()}
        label = f"rlm(V={data.rlm_vocab_size},depth={data.rlm_depth},beta={data.rlm_beta},seed={data.rlm_seed})"
        record.update(seq_len=rlm.seq_len, split="fresh sequences", rlm_vocab_size=data.rlm_vocab_size,
                      rlm_depth=data.rlm_depth, rlm_beta=data.rlm_beta, rlm_seed=data.rlm_seed)
        return train, evaluation, None, label, optima, record

    if data.dataset == "default":
        texts = default_text_corpus(max_docs=data.max_docs)
        label = "python-stdlib-docs (offline, built by rat_hf.data.default_text_corpus)"
    else:
        texts = load_text(data.dataset, data.dataset_config, text_column=data.text_column, what="--dataset")
        if data.max_docs:
            texts = texts.select(range(min(data.max_docs, len(texts))))
        label = data.dataset if data.dataset_config is None else f"{data.dataset}/{data.dataset_config}"
    train_docs, held_docs = split_documents(texts, data.eval_fraction)
    tokenizer = build_tokenizer(data.tokenizer, train_docs["text"])  # load_text names the column "text"
    if tokenizer.eos_token_id is None:
        raise CLIError(f"--tokenizer {data.tokenizer!r} has no EOS token: documents could not be separated")
    train = pack_for_causal_lm(train_docs, tokenizer, data.seq_len).select_columns(["input_ids", "labels"])
    evaluation = pack_for_causal_lm(held_docs, tokenizer, data.seq_len).select_columns(["input_ids", "labels"])
    record.update(seq_len=data.seq_len, tokenizer=data.tokenizer, split="documents")
    if len(evaluation) == 0:  # too few documents to hold any out: hold out sequences instead, and say so
        train = pack_for_causal_lm(texts, tokenizer, data.seq_len).select_columns(["input_ids", "labels"])
        if len(train) >= 2:
            logger.warning("the held-out documents of %s make no %d-token sequence: holding out %.0f%% of the packed "
                           "sequences instead (rat-eval --dataset default will not know which)", label,
                           data.seq_len, 100 * data.eval_fraction)
            split = train.train_test_split(test_size=max(1, int(data.eval_fraction * len(train))), seed=seed)
            train, evaluation = split["train"], split["test"]
            record["split"] = "sequences"
    if len(train) == 0 or len(evaluation) == 0:
        raise CLIError(f"--dataset {data.dataset!r}: {len(texts):,} documents make {len(train) + len(evaluation)} "
                       f"sequences of --seq_len={data.seq_len} tokens, too few to train and evaluate; lower "
                       "--seq_len or add text")
    if data.max_train_sequences:
        train = train.select(range(min(len(train), data.max_train_sequences)))
        cap = max(1, round(data.max_train_sequences * data.eval_fraction / (1 - data.eval_fraction)))
        evaluation = evaluation.select(range(min(len(evaluation), cap)))
    return train, evaluation, tokenizer, label, {}, record


def build_model(margs: ModelArguments, vocab_size: int, tokenizer):
    from rat_hf import RatConfig, RatForCausalLM
    from rat_hf.cli._common import from_pretrained_checked
    from rat_hf.recipes._config import load_config_file

    if margs.model_name_or_path:
        return from_pretrained_checked(AutoModelForCausalLM, margs.model_name_or_path, what="--model_name_or_path",
                                       attn_implementation=margs.attn_implementation)
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


def program_name() -> str:
    return "rat-train" if os.path.basename(sys.argv[0]) == "rat-train" else "python recipes/pretrain_rat.py"


def main(argv=None) -> int:
    """Entry point of `rat-train`: train (`train`), exit code 0; an error is one line on stderr and exit 2
    (`SystemExit`, so that a script calling `main()` without `sys.exit` still fails)."""
    from rat_hf.cli._common import report_error

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        train(argv)
    except KeyboardInterrupt:
        print("rat-train: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as error:
        if "--traceback" in argv or any(a.startswith("--traceback=") and a != "--traceback=false" for a in argv):
            raise
        report_error("rat-train", error)
        raise SystemExit(2) from None
    return 0


def train(argv=None) -> dict:
    """Pretrain as `rat-train ARGV` does and return the final metrics; errors are raised."""
    from rat_hf.recipes._config import parse_args
    from rat_hf.trainers import RatTrainer

    argv = list(sys.argv[1:] if argv is None else argv)
    # parse_args refuses a launch whose processes cannot train together, before any data work
    margs, data, hub, args = parse_args((ModelArguments, DataArguments, HubArguments, TrainingArguments), argv,
                                        prog="rat-train")
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    command = f"{program_name()} {shlex.join(argv)}"
    if margs.model_name_or_path and data.tokenizer == DataArguments.tokenizer and data.dataset != "rlm":
        data.tokenizer = margs.model_name_or_path  # continuing: the checkpoint's own tokenizer, not a fresh BPE
    set_seed(args.seed)
    push, args.push_to_hub = args.push_to_hub, False  # pushed once at the end with the card, not every checkpoint

    # ---- data and model (a checkpoint to continue from first: a wrong path fails before any data work) ----------
    model = build_model(margs, 0, None) if margs.model_name_or_path else None
    train_set, evaluation, tokenizer, dataset_label, extra_metrics, record = build_data(data, args.seed)
    vocab_size = len(tokenizer) if tokenizer is not None else data.rlm_vocab_size
    if model is None:
        model = build_model(margs, vocab_size, tokenizer)
    elif vocab_size > model.config.vocab_size:
        raise ValueError(f"--model_name_or_path {margs.model_name_or_path!r} has a vocabulary of "
                         f"{model.config.vocab_size}, smaller than the tokenizer's {vocab_size} tokens")
    logger.info("model: %s parameters; data: %d training / %d eval sequences of %d tokens from %s",
                f"{model.num_parameters():,}", len(train_set), len(evaluation), len(train_set[0]["input_ids"]),
                dataset_label)

    # ---- training ----------------------------------------------------------------------------------------------------
    trainer = RatTrainer(model=model, args=args, train_dataset=train_set, eval_dataset=evaluation,
                         data_collator=default_data_collator, processing_class=tokenizer)
    with warnings.catch_warnings():
        if not hub.traceback:  # our models' deprecation notes (FutureWarning) would drown the training log
            warnings.simplefilter("ignore", FutureWarning)
        result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
        metrics = {"train_loss": result.training_loss, **trainer.evaluate(), **extra_metrics}
    if "rlm_optimal_loss" in metrics:
        metrics["rlm_gap_to_optimum"] = metrics["eval_loss"] - metrics["rlm_optimal_loss"]
    trainer.log_metrics("final", metrics)

    # ---- save, card, push --------------------------------------------------------------------------------------------
    if trainer.is_fsdp_enabled:  # FSDP's default SHARDED_STATE_DICT makes `save_model` write no weights at all
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(args.output_dir)
    if trainer.is_world_process_zero():
        trainer.save_metrics("final", metrics)
        with open(os.path.join(args.output_dir, RECORD_FILE), "w") as f:
            json.dump(record, f, indent=2)
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
    sys.exit(main())
