"""Reactive Transformer curriculum, stage 1: joint LM pre-training (encoder masked LM + decoder autoregressive).

    python recipes/rxt_pretrain.py --config recipes/configs/rxt_pretrain_tiny.yaml
    accelerate launch --config_file recipes/accelerate_configs/multi_gpu.yaml recipes/rxt_pretrain.py \
        --config recipes/configs/rxt_pretrain_tiny.yaml --gradient_checkpointing true --output_dir outputs/rxt-1

Model: a fresh RxT from `--model_config_overrides` (RxTConfig fields as JSON) with a byte-level BPE trained on the
data (`--tokenizer_vocab_size`, plus `[MASK]`), or `--model_name_or_path DIR` to continue from a checkpoint.
Data (`--dataset`): `offline` (chatterbot dialogs + synthetic memory-recall conversations, each interaction
`[Q] query [A] answer` a document), `stdlib` (the offline English text of the Python docs), or a local
JSON/JSONL file / Hub dataset of conversations; packed into `--seq_len` blocks. Training: `RxTPretrainTrainer`
(`--lm_weight`, `--mlm_weight`, `--mlm_probability`, `--memory_noise_std`, any `TrainingArguments` flag).
Save: model + tokenizer + `training.png` (losses) + README.md in `--output_dir`, which `recipes/rxt_sft.py
--model_name_or_path` continues from; `--push_to_hub --hub_model_id you/rxt-stage1` uploads it.
"""

import json
import logging
import shlex
from dataclasses import dataclass, field

from rat_hf.data.interactions import interaction_text
from rat_hf.recipes.rxt_stage import ConversationDataArguments, StageModelArguments, start_stage
from rat_hf.trainers._rxt_common import finish_stage, load_conversations, load_stage_model, record_turns
from rat_hf.trainers.rxt_pretrain_config import RxTPretrainConfig
from rat_hf.trainers.rxt_pretrain_trainer import RxTPretrainTrainer, add_mask_token

logger = logging.getLogger("rat_hf.recipes.rxt")
TINY_MODEL = ('{"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, '
              '"num_key_value_heads": 2, "num_query_heads": 2, "stm_size": 16, "max_position_embeddings": 256}')


@dataclass
class ModelArguments(StageModelArguments):
    model_name_or_path: str | None = field(default=None, metadata={"help": "continue from this RxT checkpoint"})
    model_config_overrides: str = field(default=TINY_MODEL, metadata={"help": "RxTConfig fields (JSON) of a fresh RxT"})
    tokenizer_vocab_size: int = field(default=1024, metadata={"help": "BPE trained on the data for a fresh RxT"})


@dataclass
class DataArguments(ConversationDataArguments):
    dataset: str = field(default="offline", metadata={"help": "offline | stdlib | JSON(L) file | Hub dataset"})
    max_docs: int | None = field(default=None, metadata={"help": "stdlib: use at most this many documents"})
    seq_len: int = field(default=128, metadata={"help": "tokens per packed training sequence"})


def load_texts(data: DataArguments, seed: int):
    """The training text as a `datasets.Dataset` with a `text` column (one document per interaction)."""
    from datasets import Dataset

    if data.dataset == "stdlib":
        from rat_hf.data import default_text_corpus

        return default_text_corpus(max_docs=data.max_docs).select_columns(["text"])
    conversations = load_conversations(data.dataset, recall_conversations=data.recall_conversations, seed=seed)
    texts = [interaction_text(q, a) for i, r in enumerate(conversations) for q, a in record_turns(r, f"{data.dataset}[{i}]")]
    return Dataset.from_dict({"text": texts})


def build_model(margs: ModelArguments, texts):
    """`(RxTForPreTraining, tokenizer)`: from the checkpoint, or fresh with a BPE trained on `texts`."""
    from rat_hf.models.rxt import RxTForPreTraining
    from rat_hf.tokenization import reactive_config, train_bpe_tokenizer

    if margs.model_name_or_path:
        model, tokenizer = load_stage_model(margs.model_name_or_path, attn_implementation=margs.attn_implementation)
    else:
        tokenizer = train_bpe_tokenizer(texts, vocab_size=margs.tokenizer_vocab_size)
        add_mask_token(tokenizer)
        try:
            overrides = json.loads(margs.model_config_overrides or "{}")
        except json.JSONDecodeError as e:
            raise ValueError(f"--model_config_overrides is not valid JSON: {e}") from None
        config = reactive_config(tokenizer, **overrides)
        model = RxTForPreTraining._from_config(config, attn_implementation=margs.attn_implementation)
    if add_mask_token(tokenizer) >= model.config.vocab_size:  # a checkpoint whose tokenizer had no [MASK] yet
        model.resize_token_embeddings(len(tokenizer))
    return model, tokenizer


def main(argv=None) -> dict:
    argv, margs, data, args, push = start_stage((ModelArguments, DataArguments, RxTPretrainConfig), argv,
                                                prog="recipes/rxt_pretrain.py")

    # ---- data and model ----------------------------------------------------------------------------------------------
    texts = load_texts(data, args.seed)
    model, tokenizer = build_model(margs, texts["text"])
    from rat_hf.data import pack_for_causal_lm

    train_set = pack_for_causal_lm(texts, tokenizer, data.seq_len).select_columns(["input_ids", "labels"])
    if len(train_set) == 0:
        raise ValueError(f"--dataset {data.dataset!r} makes no sequence of --seq_len={data.seq_len} tokens")
    logger.info("model: %s parameters; data: %d sequences of %d tokens from %s", f"{model.num_parameters():,}",
                len(train_set), data.seq_len, data.dataset)

    # ---- training ----------------------------------------------------------------------------------------------------
    trainer = RxTPretrainTrainer(model=model, args=args, train_dataset=train_set, processing_class=tokenizer)
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)

    # ---- save, curves, card, push ------------------------------------------------------------------------------------
    metrics = finish_stage(trainer, tokenizer, command=f"python recipes/rxt_pretrain.py {shlex.join(argv)}",
                           curves=["loss", "lm_loss", "mlm_loss"], title="RxT stage 1: joint LM pre-training",
                           config={**vars(margs), **vars(data)}, datasets=[data.dataset], push=push)
    print(f"stage 1 done: lm_loss {metrics.get('lm_loss', float('nan')):.4g}, mlm_loss "
          f"{metrics.get('mlm_loss', float('nan')):.4g}; model in {args.output_dir}")
    return metrics


if __name__ == "__main__":
    from rat_hf.recipes._config import run_cli

    run_cli(main, "recipes/rxt_pretrain.py")
