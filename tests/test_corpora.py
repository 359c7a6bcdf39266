"""Offline corpora, the local/Hub loader, and causal-LM packing."""

import json

import pytest

from rat_hf.data import (
    default_dialogs,
    default_text_corpus,
    get_statistics,
    load_text_dataset,
    pack_for_causal_lm,
)
from rat_hf.data import corpora
from rat_hf.tokenization import train_bpe_tokenizer


@pytest.fixture(scope="module")
def corpus():
    return default_text_corpus()


def test_stdlib_corpus_is_real_deduplicated_english(corpus):
    texts = corpus["text"]
    total = sum(map(len, texts))
    assert corpus.column_names == ["text", "source"] and len(corpus) > 2000
    assert 1_000_000 < total < 20_000_000
    assert len({" ".join(t.split()).lower() for t in texts}) == len(texts)
    words = " ".join(texts).lower().split()
    assert words.count("the") / len(words) > 0.03  # English prose, not code
    assert not any(t.lstrip().startswith(">>>") for t in texts)
    assert corpus[0]["source"].startswith("pydoc_data:")
    assert any(s.startswith("json/") for s in corpus["source"])


def test_stdlib_corpus_is_deterministic_and_knobs_cut_a_prefix(corpus):
    corpora._stdlib_records.cache_clear()  # read back from the disk cache
    again = default_text_corpus()
    assert again["text"] == corpus["text"] and again["source"] == corpus["source"]
    assert default_text_corpus(max_docs=5)["text"] == corpus["text"][:5]
    cut = default_text_corpus(max_chars=5000)["text"]
    assert cut == corpus["text"][:len(cut)] and sum(map(len, cut[:-1])) < 5000 <= sum(map(len, cut))
    with pytest.raises(ValueError, match="max_docs"):
        default_text_corpus(max_docs=0)
    records = corpora.default_text_records(max_chars=5000)  # the same documents as plain dicts
    assert [r["text"] for r in records] == cut and [r["source"] for r in records] == corpus["source"][:len(cut)]


def test_disk_cache_written_once_and_reused(tmp_path, monkeypatch):
    calls = []

    def fake_build():
        calls.append(1)
        return [{"text": "one two three", "source": "a"}, {"text": "ünïcode ✓", "source": "b"}]

    monkeypatch.setenv("RAT_HF_CACHE", str(tmp_path))
    monkeypatch.setattr(corpora, "_build_stdlib_records", fake_build)
    corpora._stdlib_records.cache_clear()
    try:
        assert default_text_corpus()["text"] == ["one two three", "ünïcode ✓"]
        corpora._stdlib_records.cache_clear()
        assert default_text_corpus()["source"] == ["a", "b"]
        assert calls == [1] and len(list(tmp_path.glob("stdlib_corpus-*.jsonl"))) == 1
    finally:
        corpora._stdlib_records.cache_clear()


def test_clean_drops_doctests_and_unwraps_prose():
    doc = ("Return the thing.\n\nThis explains at some length what\nthe function does, wrapped over\n"
           "three lines of ordinary English prose for readers.\n\n>>> f(1)\n2\n\n- a list item stays\n- as is")
    out = corpora._clean(doc)
    assert ">>>" not in out
    assert "what the function does, wrapped over three lines" in out
    assert "- a list item stays\n- as is" in out
    assert corpora._clean("Return self.") is None


def test_default_dialogs():
    with pytest.warns(UserWarning, match=r"trivia\.yml\[13\]"):  # the package's one malformed entry
        ds = default_dialogs()
    assert len(ds) > 1500 and ds.column_names == ["messages", "category"]
    for conv in ds["messages"][:200]:
        assert len(conv) >= 2
        assert [m["role"] for m in conv] == ["user", "assistant"] * (len(conv) // 2) + ["user"] * (len(conv) % 2)
    assert ds[0]["messages"][0]["content"] == "What is AI?"
    with pytest.raises(ValueError, match="language"):
        default_dialogs("klingon")


def test_load_text_dataset_local_files(tmp_path):
    (tmp_path / "a.txt").write_text("line one\nline two\n")
    assert load_text_dataset(str(tmp_path / "a.txt"))["text"] == ["line one", "line two"]
    with open(tmp_path / "b.jsonl", "w") as f:
        f.writelines(json.dumps({"body": f"doc {i}", "id": i}) + "\n" for i in range(3))
    ds = load_text_dataset(str(tmp_path / "b.jsonl"), text_column="body")
    assert ds["text"] == ["doc 0", "doc 1", "doc 2"] and ds["id"] == [0, 1, 2]
    (tmp_path / "c.csv").write_text("text,n\nhello,1\nworld,2\n")
    assert load_text_dataset(str(tmp_path / "c.csv"))["text"] == ["hello", "world"]
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "train.txt").write_text("x\ny\n")
    (folder / "test.txt").write_text("z\n")
    assert load_text_dataset(str(folder), split="test")["text"] == ["z"]
    with pytest.raises(ValueError, match="text_column"):
        load_text_dataset(str(tmp_path / "b.jsonl"))
    (tmp_path / "d.xml").write_text("<a/>")
    with pytest.raises(ValueError, match="unsupported file type"):
        load_text_dataset(str(tmp_path / "d.xml"))


def test_pack_for_causal_lm():
    from datasets import Dataset

    docs = ["The quick brown fox jumps over the lazy dog. " * 3, "", "   ", "Pack me too, please.", "short"]
    tok = train_bpe_tokenizer(docs * 5, vocab_size=300)
    ds = Dataset.from_dict({"text": docs, "other": list(range(len(docs)))})
    packed = pack_for_causal_lm(ds, tok, seq_len=8, num_proc=2)
    assert packed.column_names == ["input_ids", "labels"]
    stream = []
    for d in docs:
        if d.strip():
            stream += tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert packed["input_ids"] == [stream[i:i + 8] for i in range(0, len(stream) - 7, 8)]
    assert packed["labels"] == packed["input_ids"]
    assert get_statistics(packed) == {"sequences": len(stream) // 8, "tokens": len(stream) // 8 * 8,
                                      "mean_length": 8.0}
    assert pack_for_causal_lm(ds, tok, seq_len=8)["input_ids"] == packed["input_ids"]  # num_proc-independent
    with pytest.raises(ValueError, match="seq_len"):
        pack_for_causal_lm(ds, tok, seq_len=1)
    with pytest.raises(ValueError, match="text_column"):
        pack_for_causal_lm(ds, tok, seq_len=8, text_column="body")


def test_data_and_tokenization_import_without_datasets():
    import subprocess
    import sys

    code = ("import sys; sys.modules['datasets'] = None\n"  # any `import datasets` now raises ImportError
            "import rat_hf.data, rat_hf.tokenization\n"
            "from rat_hf.data import RandomLanguageModel\n"
            "print(RandomLanguageModel(4, 2, 1.0).sample(2, seed=0).shape)\n"
            "from rat_hf.data import default_text_records\n"  # the corpus without `datasets` (the GPU image's benches)
            "print('records', len(default_text_records(max_docs=3)))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "torch.Size([2, 4])" in out.stdout and "records 3" in out.stdout
