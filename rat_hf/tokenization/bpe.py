"""Train a small byte-level BPE tokenizer (the `tokenizers` library) for small models.

A 100k vocabulary would dominate the parameter count of a model of a few million parameters (100k x 256 = 25.6 M
embedding weights), so small runs train their own vocabulary of a few thousand tokens on their corpus.
Byte-level means every string encodes (no unknown token) and decoding round-trips exactly.
"""

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .special_tokens import BOS_TOKEN, CHAT_TEMPLATE, EOS_TOKEN, PAD_TOKEN, TRAINED_SPECIAL_TOKENS


def train_bpe_tokenizer(texts, vocab_size: int, min_frequency: int = 2, model_max_length: int | None = None):
    """Train a byte-level BPE on `texts` (any iterable of strings, e.g. `dataset["text"]`).

    Returns a `PreTrainedTokenizerFast` with `[PAD]`=0, `[BOS]`=1, `[EOS]`=2 and the reactive tokens `[Q]`, `[A]`,
    `[T]` at 3..5, the chat template, and no automatic BOS/EOS (packing adds EOS between documents). Training is
    deterministic for a given input order. `vocab_size` counts the 256 byte tokens and the 6 special tokens.
    """
    from transformers import PreTrainedTokenizerFast

    floor = 256 + len(TRAINED_SPECIAL_TOKENS)
    if not isinstance(vocab_size, int) or vocab_size < floor:
        raise ValueError(f"vocab_size must be an integer >= {floor} (256 bytes + special tokens), got {vocab_size!r}")
    if isinstance(texts, str):
        raise ValueError("texts must be an iterable of strings, not a single string")

    def checked(it):
        for i, text in enumerate(it):
            if not isinstance(text, str):
                raise ValueError(f"texts[{i}] must be a string, got {type(text).__name__}")
            yield text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's split regex, then bytes
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=TRAINED_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(checked(texts), trainer=trainer)
    kwargs = {} if model_max_length is None else {"model_max_length": model_max_length}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
        extra_special_tokens=TRAINED_SPECIAL_TOKENS[3:], clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE, **kwargs,
    )
