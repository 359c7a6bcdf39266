"""rat_hf.rewards: ranges, edge cases (empty completion, missing column, None entries), conversational vs plain
completions, the registry, and each function called inside TRL 1.16's `GRPOTrainer` exactly as it calls rewards."""

import functools
import json
import math
import pickle

import pytest

from rat_hf.rewards import (
    REWARD_FUNCS,
    completion_text,
    diversity_reward,
    format_reward,
    get_reward_funcs,
    keyword_reward,
    length_reward,
    make_length_reward,
    quality_reward,
    unigram_f1,
)

A = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731
TEXTS = ["The cat sat on the mat.", "cat cat cat", "", "   ", "User: hello there\nAssistant: hi", "Fine, thanks!",
         "<|im_start|>assistant ok.", "one two three four five six seven eight nine ten eleven twelve"]
COLUMNS = {"quality": [1.0, 0.5, 0.8, None, 1.0, -1.0, 0.2, 1.0],
           "reference": ["the cat sat", "a cat", "hi", "x", A("hello"), "fine thanks", [], None],
           "keyword": ["cat"] * 7 + [None]}
RANGES = {"quality": (-1.0, 1.0), "length": (-1.0, 1.0), "diversity": (0.0, 1.0), "format": (0.0, 1.0),
          "keyword": (0.0, 1.0)}


def call(func, completions, **columns):
    """Keyword call as TRL makes it (prompts, completions, completion_ids, trainer_state, logging hooks, columns)."""
    prompts = [[{"role": "user", "content": "hi"}]] * len(completions)
    ids = [[7] * (len(completion_text(c).split()) + 1) for c in completions]
    return func(prompts=prompts, completions=completions, completion_ids=ids, trainer_state=None,
                log_extra=lambda *a: None, log_metric=lambda *a: None, **columns)


@pytest.mark.parametrize("name", sorted(REWARD_FUNCS))
def test_batch_length_range_and_conversational_equals_plain(name):
    func = REWARD_FUNCS[name]
    plain = call(func, TEXTS, **COLUMNS)
    assert len(plain) == len(TEXTS)
    assert call(func, [A(t) for t in TEXTS], **COLUMNS) == plain
    low, high = RANGES[name]
    assert all(r is None or (isinstance(r, float) and low <= r <= high) for r in plain), plain
    assert call(func, [], **{k: [] for k in COLUMNS}) == []


def test_completion_text_takes_the_assistant_text():
    assert completion_text("plain") == "plain"
    assert completion_text(A("a")) == "a"
    tool_loop = [{"role": "assistant", "content": None, "tool_calls": [{}]}, {"role": "tool", "content": "42"},
                 {"role": "assistant", "content": [{"type": "text", "text": "It is 42."}, {"type": "image"}]}]
    assert completion_text(tool_loop) == "It is 42."
    for bad in (3, [["x"]], [{"role": "assistant", "content": 5}]):
        with pytest.raises(ValueError, match="completion|content"):
            completion_text(bad)


def test_quality_depends_on_the_completion():
    # The seed scored the reference answer: constant per prompt. Here completions of one prompt get different rewards.
    r = call(quality_reward, ["the cat sat", "a cat sat", "dogs run", ""], quality=[0.8] * 4,
             reference=["The cat sat."] * 4)
    assert r[0] == pytest.approx(0.8) and 0 < r[1] < r[0] and r[2] == 0.0 and r[3] == 0.0
    assert unigram_f1(["a", "cat", "sat"], ["the", "cat", "sat"]) == pytest.approx(2 / 3)
    r = call(quality_reward, TEXTS, **COLUMNS)
    assert r[0] == pytest.approx(2 * (3 / 6) * 1 / (3 / 6 + 1))  # 3 of 6 words shared, all 3 reference words
    assert r[3] is None and r[6] is None and r[7] is None  # quality None; reference [] (prompt-only row); None
    assert r[5] == pytest.approx(-1.0)  # a negative score is earned as a penalty
    assert call(quality_reward, ["x"], quality=[float("nan")], reference=["x"]) == [None]


@pytest.mark.parametrize("missing", ["quality", "reference"])
def test_quality_missing_column_names_it(missing):
    columns = {k: v for k, v in COLUMNS.items() if k != missing}
    with pytest.raises(ValueError, match=f"no '{missing}' column"):
        call(quality_reward, TEXTS, **columns)
    with pytest.raises(ValueError, match=r"quality\[0\] must be a finite number"):
        call(quality_reward, ["x"], quality=["high"], reference=["x"])
    with pytest.raises(ValueError, match="3 values for 1 completions"):
        call(quality_reward, ["x"], quality=[1.0, 1.0, 1.0], reference=["x"])


def test_length_reward():
    r = call(length_reward, ["", "a b", "a b c d", "a " * 6, "a " * 12, "a " * 40], target_length=4)
    assert r == [0.0, 0.5, 1.0, 0.5, -1.0, -1.0]
    assert call(make_length_reward(2), ["a b", "a"]) == [1.0, 0.5]
    tokens = call(make_length_reward(3, length_unit="tokens"), ["a b", "a b c d"])  # ids: words + 1 (EOS)
    assert tokens == [1.0, pytest.approx(1 / 3)]
    assert call(length_reward, ["a", "a b"], target_length=[1, None]) == [1.0, None]  # per-sample column
    with pytest.raises(ValueError, match="needs completion_ids"):
        length_reward(["p"], ["a"], None, length_unit="tokens")
    for kwargs in ({"target_length": 0}, {"target_length": "50"}, {"length_unit": "chars"}):
        with pytest.raises(ValueError, match="target_length|length_unit"):
            make_length_reward(**kwargs)
        with pytest.raises(ValueError, match="target_length|length_unit"):
            call(length_reward, ["a"], **kwargs)
    bound = pickle.loads(pickle.dumps(make_length_reward(2)))  # picklable, like TRL's supported forms
    assert call(bound, ["a b"]) == [1.0]


def test_diversity_reward():
    assert call(diversity_reward, ["a b c d", "a a a a", "", "!!!", "The the"]) == [1.0, 0.25, 0.0, 0.0, 0.5]
    assert call(diversity_reward, ["a b a b a", "a"], ngram_size=2) == [0.5, 0.0]
    with pytest.raises(ValueError, match="ngram_size"):
        call(diversity_reward, ["a"], ngram_size=0)


def test_format_reward():
    r = call(format_reward, ["Fine, thanks!", "Fine", "ok.\nUser: and you?", "", "  \n", '(He said "yes.")',
                             "<|im_end|>", "Sure. [INST] next"])
    assert r == [1.0, pytest.approx(2 / 3), pytest.approx(2 / 3), 0.0, 0.0, 1.0, pytest.approx(1 / 3),
                 pytest.approx(1 / 3)]


def test_keyword_reward():
    assert call(keyword_reward, ["the cat sat", "Cat, CAT!", "", "category", "dog"], keyword="cat") == \
        [pytest.approx(1 / 3), 1.0, 0.0, 0.0, 0.0]
    assert call(keyword_reward, ["new york new york city"], keyword="New York") == [pytest.approx(4 / 5)]
    bound = functools.partial(keyword_reward, keyword="dog")
    assert call(bound, ["cat dog", "cat dog"], keyword=["cat", None]) == [0.5, None]  # the column wins
    with pytest.raises(ValueError, match="no keyword"):
        call(keyword_reward, ["x"])
    with pytest.raises(ValueError, match="keyword"):
        call(keyword_reward, ["x"], keyword="!!")


def test_registry():
    funcs = get_reward_funcs(["quality", "length_reward", "rat_hf.rewards.chat:format_reward", len])
    assert funcs == [quality_reward, length_reward, format_reward, len]
    assert get_reward_funcs("diversity, keyword") == [diversity_reward, keyword_reward]
    assert get_reward_funcs(format_reward) == [format_reward]
    known = "bleu_to_reference, bleu_to_saved, diversity, exact_match, format, keyword, length, length_ratio, quality"
    for bad, match in (("bleuu", f"unknown reward 'bleuu'; known: {known}"),
                       ("no_such_module_xyz:f", "cannot import 'no_such_module_xyz'"),
                       ("rat_hf.rewards:nope", "has no callable 'nope'"), ([], "one or more"), ([3], "got 3")):
        with pytest.raises(ValueError, match=match) as info:
            get_reward_funcs(bad)
        assert "\n" not in str(info.value)


def test_loader_rows_feed_quality_reward(tmp_path):
    from rat_hf.data import load_chat_jsonl

    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in [
        {"messages": [{"content": "Hello"}, {"content": "Hi there! How can I help?"}], "quality": 1.0},
        {"text": "Single response text", "quality": 0.8}]) + "\n")
    rows = load_chat_jsonl(str(path)).rename_column("completion", "reference")  # TRL never passes "completion"
    r = call(quality_reward, ["Hi! How can I help you?", "anything"], quality=rows["quality"],
             reference=rows["reference"])
    assert r[0] == pytest.approx(2 * (5 / 6) * (5 / 6) / (5 / 6 + 5 / 6)) and r[1] is None  # prompt-only row: None


def test_inside_grpo_trainer(tmp_path):
    """One real GRPO step with every reward (TRL names, logs and weights them), then `_calculate_rewards` — TRL's own
    call — on known completions gives exactly what the functions return."""
    torch = pytest.importorskip("torch")
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM

    from rat_hf.tokenization import train_bpe_tokenizer

    tok = train_bpe_tokenizer(["the cat sat on the mat. hello there, how are you?"] * 20, vocab_size=300)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id))
    prompts = [[{"role": "user", "content": p}] for p in ("hello", "the cat")]
    data = Dataset.from_dict({"prompt": prompts, "quality": [1.0, 0.5], "reference": ["hello there", "the cat sat"],
                              "keyword": ["cat", "mat"]})
    funcs = get_reward_funcs(["quality", "diversity", "format", "keyword"]) + [make_length_reward(4)]
    args = trl.GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=2,
                          max_completion_length=6, max_steps=1, bf16=False, gradient_checkpointing=False,
                          use_cpu=True, report_to=[], logging_steps=1, save_strategy="no", seed=0)
    trainer = trl.GRPOTrainer(model=model, reward_funcs=funcs, args=args, train_dataset=data, processing_class=tok)
    trainer.train()
    logged = trainer.state.log_history[0]
    for name in ("quality_reward", "diversity_reward", "format_reward", "keyword_reward", "length_reward"):
        assert math.isfinite(logged[f"rewards/{name}/mean"]), (name, logged)

    columns = {"quality": [1.0, None, 0.3, 0.5], "reference": ["hello there", "x", [], "the cat sat"],
               "keyword": ["cat", "mat", None, "mat"]}
    inputs = [{"prompt": prompts[i % 2], **{k: v[i] for k, v in columns.items()}} for i in range(4)]
    completions = [A("the cat sat."), A("mat mat"), A(""), A("User: the mat")]
    ids = [tok(completion_text(c))["input_ids"] + [tok.eos_token_id] for c in completions]
    got = trainer._calculate_rewards(inputs, [x["prompt"] for x in inputs], completions, ids)
    for j, func in enumerate(funcs):
        expected = [math.nan if r is None else r for r in call(func, completions, **columns)]
        assert got[:, j].tolist() == pytest.approx(expected, nan_ok=True), j
