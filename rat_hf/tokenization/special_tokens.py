"""Special tokens and the chat template shared by rat_hf's tokenizers.

Reactive Transformer tokens: the decoder reads one interaction as `[Q] query [A] answer` (`[T]` marks an optional
thinking segment between them); `[BOS]`, `[EOS]` and `[PAD]` are the sequence tokens of tokenizers trained here.
The chat template is a plain, readable one (`<|user|>`, `<|assistant|>` headers, each turn closed by the EOS token),
with `{% generation %}` around assistant turns so `return_assistant_tokens_mask=True` (TRL's assistant-only loss)
works.
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


def reactive_token_ids(tokenizer) -> dict:
    """Ids of the reactive tokens and of bos/eos/pad; ValueError if a reactive token is missing."""
    ids = {}
    for role, token in REACTIVE_SPECIAL_TOKENS.items():
        i = tokenizer.convert_tokens_to_ids(token)
        if i is None or i == tokenizer.unk_token_id or tokenizer.convert_ids_to_tokens(i) != token:
            raise ValueError(f"tokenizer has no {token!r}: call add_reactive_special_tokens(tokenizer) first")
        ids[role] = i
    ids.update(bos=tokenizer.bos_token_id, eos=tokenizer.eos_token_id, pad=tokenizer.pad_token_id)
    return ids
