"""Attention-guided RL self-curriculum: a causal LM learns, through a LoRA adapter, the order of its own context.

    python recipes/attention_guided_rl.py --config recipes/configs/attention_guided_rl_tiny.yaml
    python recipes/attention_guided_rl.py --config recipes/configs/attention_guided_rl_tiny.yaml --resume

Model: `--model_name_or_path` (any causal LM the attention probe understands, with its tokenizer) or, by default, a
fresh RAT from `--model_config_overrides` with a byte-level BPE trained on the data (a smoke test, not a result).
Data (`--dataset`): `corpus` (the offline stdlib-docs corpus, split into key/value pairs), `wikipedia` (through
`datasets.load_dataset`: `--dataset_name`/`--dataset_config`, or local files with `--data_files`), `twenty_questions`
or `define_recall` (the synthetic task where order matters; see bench/attention_guided_rl.py). Training: the
`AttentionGuidedConfig` fields (`--episodes`, `--batch_size`, `--num_rollouts`, `--kl_coef`, ...); `--resume`
continues from the newest `checkpoint-*` in `--output_dir`, exactly.
"""

import json
import logging
import os
from dataclasses import dataclass, field

from rat_hf.curriculum import AttentionGuidedConfig

logger = logging.getLogger("rat_hf.curriculum")

DATASETS = ("corpus", "wikipedia", "twenty_questions", "define_recall")


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "a causal LM; None: a fresh RAT"})
    model_config_overrides: str | None = field(
        default='{"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, '
                '"intermediate_size": 128}', metadata={"help": "RatConfig fields (JSON) of the fresh RAT"})
    tokenizer_vocab_size: int = field(default=512, metadata={"help": "BPE trained on the data for a fresh RAT"})
    resume: bool = field(default=False, metadata={"help": "continue from the newest checkpoint-* in output_dir"})


@dataclass
class DataArguments:
    dataset: str = field(default="corpus", metadata={"help": f"one of {', '.join(DATASETS)}"})
    dataset_name: str = field(default="wikimedia/wikipedia", metadata={"help": "load_dataset name (wikipedia)"})
    dataset_config: str | None = field(default="20231101.en")
    data_files: str | None = field(default=None, metadata={"help": "local text/json/parquet files for load_dataset"})
    text_column: str = "text"
    max_docs: int = field(default=500, metadata={"help": "articles read (Wikipedia is streamed)"})
    key_tokens: int = 8
    value_tokens: int = 8
    pairs_per_pool: int = 4
    symbols_per_pool: int = field(default=3, metadata={"help": "define_recall: symbols per pool (2 pairs each)"})

    def __post_init__(self):
        if self.dataset not in DATASETS:
            raise ValueError(f"--dataset {self.dataset!r}: choose one of {', '.join(DATASETS)}")


def load_texts(d: DataArguments) -> list:
    """Article texts: the offline corpus, or `load_dataset` (Hub name, or a builder such as `json` + data_files)."""
    if d.dataset == "corpus":
        from rat_hf.data import default_text_corpus

        return default_text_corpus(max_docs=d.max_docs)["text"]
    from datasets import load_dataset

    if d.data_files:  # the same call as for the Hub, on local files (e.g. --dataset_name json)
        ds = load_dataset(d.dataset_name, data_files=d.data_files, split="train", streaming=True)
    else:
        ds = load_dataset(d.dataset_name, d.dataset_config, split="train", streaming=True)
    texts = []
    for row in ds:
        if d.text_column not in row:
            raise ValueError(f"--text_column {d.text_column!r} not in {d.dataset_name}: columns are {sorted(row)}")
        texts.append(row[d.text_column])
        if len(texts) >= d.max_docs:
            break
    return texts


def build(margs: ModelArguments, d: DataArguments, seed: int):
    """(model, pool source) for the arguments."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rat_hf import RatConfig, RatForCausalLM
    from rat_hf.curriculum import DefineRecallPools, KVPairPools, TwentyQuestionsPools

    tokenizer = None
    if margs.model_name_or_path:
        tokenizer = AutoTokenizer.from_pretrained(margs.model_name_or_path)
    texts = load_texts(d) if d.dataset in ("corpus", "wikipedia") else None
    if d.dataset == "define_recall":
        source = DefineRecallPools(symbols_per_pool=d.symbols_per_pool)
        vocab_size = source.vocab_size
    else:
        if tokenizer is None:
            from rat_hf.data import default_text_corpus
            from rat_hf.tokenization import train_bpe_tokenizer

            corpus = texts if texts is not None else default_text_corpus(max_docs=d.max_docs)["text"]
            tokenizer = train_bpe_tokenizer(corpus, vocab_size=margs.tokenizer_vocab_size)
        if d.dataset == "twenty_questions":
            source = TwentyQuestionsPools(tokenizer, pairs_per_pool=d.pairs_per_pool, seed=seed)
        else:
            source = KVPairPools(texts, tokenizer, d.key_tokens, d.value_tokens, d.pairs_per_pool)
        vocab_size = len(tokenizer)
    if margs.model_name_or_path:
        model = AutoModelForCausalLM.from_pretrained(margs.model_name_or_path)
    else:
        torch.manual_seed(seed)
        fields = json.loads(margs.model_config_overrides or "{}")
        model = RatForCausalLM(RatConfig(**{**fields, "vocab_size": vocab_size}))
    return model, source, tokenizer


def main(argv=None) -> list:
    from rat_hf.curriculum import AttentionGuidedTrainer
    from rat_hf.recipes._config import parse_args

    margs, dargs, args = parse_args((ModelArguments, DataArguments, AttentionGuidedConfig), argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)

    # ---- model and data (a fresh RAT's vocabulary comes from the data's tokenizer) -----------------------------------
    model, source, tokenizer = build(margs, dargs, args.seed)
    logger.info("model %s (%.2fM parameters), dataset %s", type(model).__name__,
                sum(p.numel() for p in model.parameters()) / 1e6, dargs.dataset)

    # ---- training ----------------------------------------------------------------------------------------------------
    trainer = AttentionGuidedTrainer(model, args, source)
    history = trainer.train(resume_from_checkpoint=True if margs.resume else None)

    # ---- save --------------------------------------------------------------------------------------------------------
    trainer.model.save_pretrained(args.output_dir)  # the final adapter, next to the checkpoints
    if tokenizer is not None:
        tokenizer.save_pretrained(args.output_dir)
    with open(os.path.join(args.output_dir, "history.json"), "w") as f:
        json.dump(history, f, indent=1)
    if history:
        last = history[-1]
        print(f"episode {last['episode']}: reward {last['reward']:.4f} (first {history[0]['reward']:.4f}), "
              f"KL {last['kl']:.4g}; adapter and checkpoints in {args.output_dir}")
    return history
