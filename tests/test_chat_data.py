"""Chat JSONL loading, Reactive Transformer interaction data, memory recall, key/value spans, Twenty Questions."""

import json
import random

import pytest

from rat_hf.data import (
    interaction_text,
    kv_pairs_dataset,
    load_chat_jsonl,
    load_interactions,
    memory_recall_dataset,
    play_twenty_questions,
    split_into_kv_pairs,
    tokenize_interaction,
    turns,
    twenty_questions_dataset,
)
from rat_hf.data.kv_pairs import _OBJECTS, _QUESTIONS
from rat_hf.tokenization import add_reactive_special_tokens, train_bpe_tokenizer

U = lambda text: {"role": "user", "content": text}  # noqa: E731
A = lambda text: {"role": "assistant", "content": text}  # noqa: E731


def write_jsonl(path, lines):
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def small_tokenizer():
    texts = ["The quick brown fox jumps over the lazy dog. What is Alice's favorite color?"] * 20
    return train_bpe_tokenizer(texts, vocab_size=320)


def test_chat_formats_to_trl_prompt_completion(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"content": "Hi"}, {"content": "Hello!"}], "quality": 0.9},
        {"messages": [{"role": "prompter", "text": "Q1"}, {"role": "assistant", "text": "A1"},
                      {"role": "prompter", "text": "Q2"}, {"role": "assistant", "text": "A2"}], "quality": 1},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?"}]},
        "",  # blank lines are not records
        {"text": "### Human: What is 2+2? ### Assistant: 4", "quality": 0.5},
        {"text": "<|prompter|>Name a color<|endoftext|><|assistant|>Blue<|endoftext|>", "quality": None},
        {"text": "Preamble.\nUser: hi there\nAssistant: hey\nUser: bye", "quality": 0.1},
        {"text": "Just a prompt with no markers.", "quality": 0.2},
    ])
    ds = load_chat_jsonl(path)
    assert ds.column_names == ["prompt", "completion", "quality"]
    assert ds["prompt"][0] == [U("Hi")] and ds["completion"][0] == [A("Hello!")] and ds["quality"][0] == 0.9
    assert ds["prompt"][1] == [U("Q1"), A("A1"), U("Q2")] and ds["completion"][1] == [A("A2")]
    assert ds["quality"][1] == 1.0 and ds["quality"][2] is None
    assert ds["completion"][2] == []  # ends with the user: prompt-only
    assert ds["prompt"][3] == [U("What is 2+2?")] and ds["completion"][3] == [A("4")]
    assert ds["prompt"][4] == [U("Name a color")] and ds["completion"][4] == [A("Blue")]
    assert ds["prompt"][5] == [{"role": "system", "content": "Preamble."}, U("hi there"), A("hey"), U("bye")]
    assert ds["prompt"][6] == [U("Just a prompt with no markers.")] and ds["completion"][6] == []
    assert len(ds) == 7


def test_trl_prompt_completion_lines_and_the_rl_reference_column(tmp_path):
    path = write_jsonl(tmp_path / "pc.jsonl", [
        {"prompt": "Hi", "completion": "Hello!", "quality": 0.7},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?"}],
         "completion": [{"role": "assistant", "content": "Because."}]},
        {"prompt": "Only a prompt"},
    ])
    ds = load_chat_jsonl(path)
    assert ds["prompt"][0] == [U("Hi")] and ds["completion"][0] == [A("Hello!")] and ds["quality"][0] == 0.7
    assert ds["prompt"][1] == [{"role": "system", "content": "Be brief."}, U("Why?")]
    assert ds["completion"][1] == [A("Because.")] and ds["completion"][2] == []
    rl = load_chat_jsonl(path, completion_column="reference")  # TRL gives reward functions every column but this one
    assert rl.column_names == ["prompt", "reference", "quality"] and rl["reference"][0] == [A("Hello!")]


@pytest.mark.parametrize("line,reason", [
    ("{not json", "invalid JSON"),
    ('["a list"]', "expected a JSON object"),
    ('{"quality": 1}', "exactly one of 'messages', 'text' or 'prompt'"),
    ('{"messages": [{"content": "a"}], "prompt": "b"}', "exactly one of"),
    ('{"text": "a", "completion": "b"}', "'completion' goes with 'prompt'"),
    ('{"prompt": ""}', "'prompt' is empty"),
    ('{"prompt": [{"content": "a"}]}', "'prompt' must be a string or a non-empty list of messages with roles"),
    ('{"prompt": "a", "completion": 3}', "'completion' must be a string"),
    ('{"prompt": [{"role": "assistant", "content": "a"}]}', "'prompt' has no user turn"),
    ('{"messages": [], "quality": 1}', "non-empty list"),
    ('{"messages": [{"content": 5}]}', r"messages\[0\] needs a string 'content'"),
    ('{"messages": [{"role": "user", "content": "a"}, {"content": "b"}]}', "some messages have a 'role'"),
    ('{"messages": [{"role": "wizard", "content": "a"}]}', "unknown role 'wizard'"),
    ('{"messages": [{"role": "assistant", "content": "a"}]}', "no user turn"),
    ('{"text": "hi", "quality": "high"}', "'quality' must be a number"),
    ('{"text": "  "}', "'text' is empty"),
])
def test_malformed_lines_name_path_line_and_reason(tmp_path, line, reason):
    path = write_jsonl(tmp_path / "bad.jsonl", ['{"text": "fine"}', line])
    with pytest.raises(ValueError, match=rf"bad\.jsonl:2: .*{reason}"):
        load_chat_jsonl(path)


def test_skip_invalid_counts_what_it_skips(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", ['{"text": "ok"}', "{oops", '{"text": 3}', '{"text": "fine"}'])
    with pytest.warns(UserWarning, match=r"skipped 2 invalid line\(s\).*mixed\.jsonl:2.*mixed\.jsonl:3"):
        ds = load_chat_jsonl(path, skip_invalid=True)
    assert len(ds) == 2
    only_bad = write_jsonl(tmp_path / "allbad.jsonl", ["{oops"])
    with pytest.raises(ValueError, match="no valid conversations"), pytest.warns(UserWarning):
        load_chat_jsonl(only_bad, skip_invalid=True)


def test_non_utf8_files_name_the_file_and_line(tmp_path):
    """Latin-1 and UTF-16 files: one error naming path:line and the encoding problem, not a UnicodeDecodeError."""
    lines = ['{"text": "fine"}', '{"text": "caf\u00e9 au lait"}', '{"text": "also fine"}']
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(("\n".join(lines[:1] + ['{"text": "caf\xe9 au lait"}'] + lines[2:]) + "\n").encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.jsonl:2: not UTF-8 text: byte 0xe9 at column 14"):
        load_chat_jsonl(str(latin1))
    with pytest.warns(UserWarning, match=r"skipped 1 invalid line\(s\) of .*latin1\.jsonl:2: not UTF-8"):
        ds = load_chat_jsonl(str(latin1), skip_invalid=True)
    assert [row["prompt"][0]["content"] for row in ds] == ["fine", "also fine"]

    utf16 = tmp_path / "utf16.jsonl"
    utf16.write_text("\n".join(lines) + "\n", encoding="utf-16")
    with pytest.raises(ValueError, match=r"utf16\.jsonl:1: not UTF-8 text: .*UTF-16"):
        load_chat_jsonl(str(utf16))
    with pytest.raises(ValueError, match="no valid conversations"), \
            pytest.warns(UserWarning, match=r"utf16\.jsonl:1: not UTF-8.*utf16\.jsonl:2: not UTF-8"):
        load_chat_jsonl(str(utf16), skip_invalid=True)

    bom = tmp_path / "bom.jsonl"  # UTF-8 with a byte-order mark (Windows editors): accepted
    bom.write_text("\n".join(lines) + "\n", encoding="utf-8-sig")
    assert len(load_chat_jsonl(str(bom))) == 3


def test_load_interactions_single_and_multi_turn(tmp_path):
    path = write_jsonl(tmp_path / "int.jsonl", [
        {"query": "q0", "answer": "a0"},
        {"query": "q0", "answer": "a0", "interactions": [{"query": "q1", "answer": "a1"}]},
    ])
    ds = load_interactions(path)
    assert ds[0]["interactions"] == [] and turns(ds[1]) == [("q0", "a0"), ("q1", "a1")]
    assert load_interactions([{"query": "x", "answer": "y"}])[0]["query"] == "x"
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"query": "q", "answer": "a", "interactions": [{"query": "q"}]}])
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: interactions\[0\]: field 'answer'"):
        load_interactions(bad)


def test_load_interactions_names_a_non_utf8_line(tmp_path):
    path = tmp_path / "int.jsonl"
    path.write_bytes('{"query": "ok", "answer": "fine"}\n{"query": "caf\xe9", "answer": "x"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"int\.jsonl:2: not UTF-8 text: byte 0xe9"):
        load_interactions(str(path))
    path.write_text('{"query": "ok", "answer": "fine"}\n', encoding="utf-16")
    with pytest.raises(ValueError, match=r"int\.jsonl:1: not UTF-8 text: .*UTF-16"):
        load_interactions(str(path))


def test_tokenize_interaction_masks_the_query(small_tokenizer):
    with pytest.raises(ValueError, match="add_reactive_special_tokens"):
        tokenize_interaction(_without_reactive(), "q", "a")
    ids = add_reactive_special_tokens(small_tokenizer)
    assert interaction_text("Hi?", "Yes.") == "[Q] Hi? [A] Yes."
    out = tokenize_interaction(small_tokenizer, "What is the color?", "blue")
    assert out["input_ids"][0] == ids["query"] and out["input_ids"][-1] == ids["eos"]
    a = out["input_ids"].index(ids["answer"])
    assert out["labels"][:a + 1] == [-100] * (a + 1) and out["labels"][a + 1:] == out["input_ids"][a + 1:]
    assert small_tokenizer.decode(out["input_ids"]) == "[Q] What is the color? [A] blue[EOS]"
    assert len(tokenize_interaction(small_tokenizer, "q", "a long answer", max_length=4)["labels"]) == 4


def _without_reactive():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()), eos_token="</s>")


@pytest.mark.parametrize("distance", [0, 3])
def test_memory_recall(distance):
    ds = memory_recall_dataset(50, distance=distance, seed=1)
    assert len(ds) == 50 and all(len(r["interactions"]) == distance + 1 for r in ds)
    for r in ds:
        assert r["interactions"][-1]["answer"] == r["fact"] and r["fact"] in r["query"]
        name = r["interactions"][-1]["query"].split("What is ")[1].split("'s")[0]
        assert name in r["query"] and not any(name in t["query"] for t in r["interactions"][:-1])
        assert r["fact"] not in r["answer"]  # the reply does not repeat it: it must be recalled from the query
    assert memory_recall_dataset(5, distance, seed=1)["query"] == ds["query"][:5]
    assert len(set(ds["fact"])) > 10
    with pytest.raises(ValueError, match="distance"):
        memory_recall_dataset(5, distance=-1)


def test_split_into_kv_pairs(small_tokenizer):
    text = "The quick brown fox jumps over the lazy dog. " * 3
    ids = small_tokenizer(text, add_special_tokens=False)["input_ids"]
    pairs = split_into_kv_pairs(text, small_tokenizer, key_tokens=3, value_tokens=2)
    assert len(pairs) == len(ids) // 5
    flat = [t for p in pairs for t in p["key_ids"] + p["value_ids"]]
    assert flat == ids[:len(flat)]  # consecutive, non-overlapping
    assert [p["start"] for p in pairs] == list(range(0, 5 * len(pairs), 5))
    assert pairs[0]["key"] + pairs[0]["value"] == small_tokenizer.decode(ids[:5])
    with pytest.raises(ValueError, match="value_tokens"):
        split_into_kv_pairs(text, small_tokenizer, 3, 0)


def test_kv_pairs_dataset(small_tokenizer):
    from datasets import Dataset

    texts = ["The quick brown fox jumps over the lazy dog.", "", "What is Alice's favorite color? " * 2]
    ds = kv_pairs_dataset(Dataset.from_dict({"text": texts}), small_tokenizer, key_tokens=2, value_tokens=2)
    expected = [(i, p["key_ids"]) for i, t in enumerate(texts) for p in split_into_kv_pairs(t, small_tokenizer, 2, 2)]
    assert list(zip(ds["doc"], ds["key_ids"])) == expected and len(expected) > 3


def test_twenty_questions_is_consistent():
    assert len({frozenset(v) for v in _OBJECTS.values()}) == len(_OBJECTS)  # every object is identifiable
    rng = random.Random(0)
    for secret in _OBJECTS:
        game = play_twenty_questions(secret, rng)
        assert game[-1] == (f"Is it {'an' if secret[0] in 'aeiou' else 'a'} {secret}?", "Yes! You guessed it.")
        by_phrase = {f"Is it {p}?": k for k, p in _QUESTIONS.items()}
        for q, a in game[:-1]:
            assert a == ("Yes." if by_phrase[q] in _OBJECTS[secret] else "No.")
        assert len(game) <= 10  # greedy halving of 23 objects
    short = play_twenty_questions("shoe", random.Random(0), max_questions=2)
    assert len(short) == 2 and short[-1][0].startswith("Is it a")  # out of questions: it must guess
    ds = twenty_questions_dataset(20, seed=3)
    assert all(r["secret"] in r["query"] and r["interactions"][-1]["answer"] == "Yes! You guessed it." for r in ds)
    q = twenty_questions_dataset(5, seed=3, model_role="questioner")
    assert q["secret"] == ds["secret"][:5] and q[0]["answer"].startswith("Is it")
    assert all(r["secret"] not in r["query"] for r in q)
    with pytest.raises(ValueError, match="model_role"):
        twenty_questions_dataset(2, model_role="judge")
