"""Tokenizers for rat_hf: tiktoken-exact cl100k, small trained BPEs, the chat template, reactive tokens, and the
check that a model's config and its tokenizer agree on the token ids."""

from .bpe import train_bpe_tokenizer
from .special_tokens import (
    ANSWER_TOKEN,
    BOS_TOKEN,
    CHAT_TEMPLATE,
    EOS_TOKEN,
    PAD_TOKEN,
    QUERY_TOKEN,
    REACTIVE_SPECIAL_TOKENS,
    THINK_TOKEN,
    TRAINED_SPECIAL_TOKENS,
    add_reactive_special_tokens,
    check_tokenizer_matches,
    reactive_config,
    reactive_token_ids,
)
from .tiktoken_bpe import load_tiktoken_encoding, oniguruma_pattern, tiktoken_tokenizer

__all__ = [
    "ANSWER_TOKEN",
    "BOS_TOKEN",
    "CHAT_TEMPLATE",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "QUERY_TOKEN",
    "REACTIVE_SPECIAL_TOKENS",
    "THINK_TOKEN",
    "TRAINED_SPECIAL_TOKENS",
    "add_reactive_special_tokens",
    "check_tokenizer_matches",
    "load_tiktoken_encoding",
    "oniguruma_pattern",
    "reactive_config",
    "reactive_token_ids",
    "tiktoken_tokenizer",
    "train_bpe_tokenizer",
]
