"""Data for rat_hf: the exact Random Language Model, offline corpora, chat, interaction and curriculum data.

Nothing here imports `datasets` at module import time: the functions that build a `datasets.Dataset` import it
when called, so `import rat_hf.data` works without the `train` extra.
"""

from .chat import load_chat_jsonl, parse_chat_record
from .corpora import (
    EVAL_FRACTION,
    cache_dir,
    default_dialogs,
    default_text_corpus,
    default_text_records,
    get_statistics,
    held_out,
    load_text_dataset,
    pack_for_causal_lm,
    split_documents,
)
from .interactions import (
    MRL_STRATEGIES,
    interaction_prompt_ids,
    interaction_text,
    load_interactions,
    memory_recall_dataset,
    mrl_recall_dataset,
    normalize_interaction,
    tokenize_interaction,
    turns,
)
from .kv_pairs import kv_pairs_dataset, play_twenty_questions, split_into_kv_pairs, twenty_questions_dataset
from .rlm import RandomLanguageModel, RLMStream

__all__ = [
    "EVAL_FRACTION",
    "MRL_STRATEGIES",
    "RLMStream",
    "RandomLanguageModel",
    "cache_dir",
    "default_dialogs",
    "default_text_corpus",
    "default_text_records",
    "get_statistics",
    "interaction_prompt_ids",
    "interaction_text",
    "kv_pairs_dataset",
    "load_chat_jsonl",
    "load_interactions",
    "held_out",
    "load_text_dataset",
    "memory_recall_dataset",
    "mrl_recall_dataset",
    "normalize_interaction",
    "pack_for_causal_lm",
    "split_documents",
    "parse_chat_record",
    "play_twenty_questions",
    "split_into_kv_pairs",
    "tokenize_interaction",
    "turns",
    "twenty_questions_dataset",
]
