"""Data for rat_hf: the exact Random Language Model, offline corpora, chat, interaction and curriculum data.

Nothing here imports `datasets` at module import time: the functions that build a `datasets.Dataset` import it
when called, so `import rat_hf.data` works without the `train` extra.
"""

from .corpora import (
    cache_dir,
    default_dialogs,
    default_text_corpus,
    get_statistics,
    load_text_dataset,
    pack_for_causal_lm,
)
from .rlm import RandomLanguageModel, RLMStream

__all__ = [
    "RLMStream",
    "RandomLanguageModel",
    "cache_dir",
    "default_dialogs",
    "default_text_corpus",
    "get_statistics",
    "load_text_dataset",
    "pack_for_causal_lm",
]
