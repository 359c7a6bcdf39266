"""Special tokens and the chat template shared by rat_hf's tokenizers.

Reactive Transformer tokens: the decoder reads one interaction as `[Q] query [A] answer` (`[T]` marks an optional
thinking segment between them); `[BOS]`, `[EOS]` and `[PAD]` are the sequence tokens of tokenizers trained here.
The chat template is a plain, readable one (`<|user|>`, `<|assistant|>` headers, each turn closed by the EOS token),
with `{% generation %}` around assistant turns so `return_assistant_tokens_mask=True` (TRL's assistant-only loss)
works.

A model and its tokenizer agree by construction with `reactive_config(tokenizer, ...)` (adds the reactive tokens where
missing, then `RxTConfig.from_tokenizer`); `check_tokenizer_matches(config, tokenizer)` refuses a pair that does not
(`ReactiveSession` calls it).
"""

QUERY_TOKEN = "[Q]"
ANSWER_TOKEN = "[A]"
THINK_TOKEN = "[T]"
BOS_TOKEN = "[BOS]"
EOS_TOKEN = "[EOS]"
PAD_TOKEN = "[PAD]"

# What `add_reactive_special_tokens` adds, by role: other modules refer to these names, not the strings.
REACTIVE_SPECIAL_TOKENS = {"query": QUERY_TOKEN, "answer": ANSWER_TOKEN, "think": THINK_TOKEN}

# Order = ids 0..5 in a tokenizer trained by `train_bpe_tokenizer`.
TRAINED_SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, QUERY_TOKEN, ANSWER_TOKEN, THINK_TOKEN]

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant', 'tool'] -%}"
    "{{ raise_exception('unknown chat role: ' + message['role']) }}"
    "{%- endif -%}"
    "{{ '<|' + message['role'] + '|>\n' }}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{%- else -%}"
    "{{ message['content'] + eos_token }}"
    "{%- endif -%}"
    "{{ '\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\n' }}{%- endif -%}"
)


def add_reactive_special_tokens(tokenizer) -> dict:
    """Add `[Q]`, `[A]`, `[T]` (and BOS/EOS/PAD where the tokenizer has none) as special tokens; idempotent.

    Returns `{"query": id, "answer": id, "think": id, "bos": id, "eos": id, "pad": id}`. New ids come after the
    current vocabulary, so resize the model's embeddings to `len(tokenizer)` afterwards.
    """
    missing = {}
    for attr, default in (("bos_token", BOS_TOKEN), ("eos_token", EOS_TOKEN), ("pad_token", PAD_TOKEN)):
        if getattr(tokenizer, attr) is None:
            missing[attr] = default
    if missing:
        tokenizer.add_special_tokens(missing)
    new = [t for t in REACTIVE_SPECIAL_TOKENS.values() if tokenizer.convert_tokens_to_ids(t) in (None,
                                                                                               tokenizer.unk_token_id)]
    if new:
        tokenizer.add_special_tokens({"extra_special_tokens": new}, replace_extra_special_tokens=False)
    return reactive_token_ids(tokenizer)


def _token_id(tokenizer, token: str) -> int | None:
    """`token`'s id when the tokenizer really has it as one token (not mapped to UNK), else None."""
    i = tokenizer.convert_tokens_to_ids(token)
    if i is None or i == tokenizer.unk_token_id or tokenizer.convert_ids_to_tokens(i) != token:
        return None
    return i


def reactive_token_ids(tokenizer) -> dict:
    """Ids of the reactive tokens and of bos/eos/pad; ValueError if a reactive token is missing."""
    ids = {}
    for role, token in REACTIVE_SPECIAL_TOKENS.items():
        i = _token_id(tokenizer, token)
        if i is None:
            raise ValueError(f"tokenizer has no {token!r}: call add_reactive_special_tokens(tokenizer) first")
        ids[role] = i
    ids.update(bos=tokenizer.bos_token_id, eos=tokenizer.eos_token_id, pad=tokenizer.pad_token_id)
    return ids


def reactive_config(tokenizer, **config_kwargs):
    """An `RxTConfig` whose vocabulary size and pad/bos/eos/`[Q]`/`[A]` ids are `tokenizer`'s.

    Adds the reactive tokens (and BOS/EOS/PAD) to `tokenizer` where missing first, so keep and save that tokenizer
    with the model. `config_kwargs` set the other fields (sizes, variants, ...).
    """
    from ..models.rxt.configuration_rxt import RxTConfig

    add_reactive_special_tokens(tokenizer)
    return RxTConfig.from_tokenizer(tokenizer, **config_kwargs)


def check_tokenizer_matches(config, tokenizer, where: str = "") -> None:
    """ValueError, one line naming the config field, unless `config` and `tokenizer` agree on the token ids.

    Checks that every token id fits in `config.vocab_size`, that the tokenizer's EOS is the config's (or one of its
    list), that bos/pad agree where both define them, and, for an RxT config, that `query_token_id`/`answer_token_id`
    are the tokenizer's `[Q]`/`[A]`. `where` prefixes the message (e.g. "ReactiveSession").
    """
    prefix = f"{where}: " if where else ""
    hint = "; build the config from the tokenizer (RxTConfig.from_tokenizer / rat_hf.tokenization.reactive_config)" \
        if hasattr(config, "query_token_id") else "; use the tokenizer saved with the model"

    def mismatch(field: str, config_value, what: str) -> ValueError:
        return ValueError(f"{prefix}config.{field}={config_value!r} but {what}{hint}")

    vocab_size = getattr(config, "vocab_size", None)
    if vocab_size is not None and len(tokenizer) > vocab_size:
        raise mismatch("vocab_size", vocab_size, f"the tokenizer has {len(tokenizer)} tokens")
    eos = config.eos_token_id
    if eos is not None:
        allowed = list(eos) if isinstance(eos, (list, tuple)) else [eos]
        if tokenizer.eos_token_id is None:
            raise mismatch("eos_token_id", eos, "the tokenizer has no EOS token")
        if tokenizer.eos_token_id not in allowed:
            raise mismatch("eos_token_id", eos, f"the tokenizer's EOS {tokenizer.eos_token!r} is "
                                                f"{tokenizer.eos_token_id}")
    for field, attr in (("bos_token_id", "bos_token"), ("pad_token_id", "pad_token")):
        ours, theirs = getattr(config, field, None), getattr(tokenizer, f"{attr}_id")
        if ours is not None and theirs is not None and ours != theirs:
            raise mismatch(field, ours, f"the tokenizer's {getattr(tokenizer, attr)!r} is {theirs}")
    if not hasattr(config, "query_token_id"):
        return
    for field, token in (("query_token_id", QUERY_TOKEN), ("answer_token_id", ANSWER_TOKEN)):
        ours = getattr(config, field)
        theirs = _token_id(tokenizer, token)
        if theirs is None:
            there = tokenizer.convert_ids_to_tokens(ours) if 0 <= ours < len(tokenizer) else None
            raise mismatch(field, ours, f"the tokenizer has no {token!r} token (id {ours} is {there!r} there)")
        if theirs != ours:
            raise mismatch(field, ours, f"the tokenizer's {token!r} is {theirs}")
