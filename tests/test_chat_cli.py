"""rat-chat and rat_hf.chat.ChatInterface: every command through stdin, batch mode, streaming, RxT memory, errors.

One session runs in a fresh process (`python -m rat_hf.cli chat`); the rest drives the same `main` in process with a
patched stdin, or the Python API, on a tiny RAT and a tiny RxT saved to tmp with a tiny trained BPE.
"""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rat_hf import RatConfig, RatForCausalLM, RxTConfig, RxTForCausalLM, cli
from rat_hf.chat import ChatInterface, read_conversation, read_prompts
from rat_hf.data.interactions import interaction_prompt_ids
from rat_hf.tokenization import train_bpe_tokenizer

REPO = Path(__file__).resolve().parents[1]
TEXTS = [f"Token {i} follows token {i - 1}; hello there, how are you? I am fine, thanks." for i in range(200)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny RAT and a tiny RxT, each saved with a 320-token BPE (which has the chat template and [Q]/[A])."""
    root = tmp_path_factory.mktemp("chat")
    tokenizer = train_bpe_tokenizer(TEXTS, vocab_size=320)
    small = dict(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=64, max_position_embeddings=1024)
    torch.manual_seed(0)
    rat = RatForCausalLM(RatConfig(**small, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    rat.save_pretrained(root / "rat")
    tokenizer.save_pretrained(root / "rat")
    rxt = RxTForCausalLM(RxTConfig.from_tokenizer(tokenizer, **{k: v for k, v in small.items() if k != "vocab_size"},
                                                  num_key_value_heads=2, stm_size=8))
    rxt.save_pretrained(root / "rxt")
    tokenizer.save_pretrained(root / "rxt")
    return {"rat": str(root / "rat"), "rxt": str(root / "rxt"), "tokenizer": tokenizer, "root": root}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def chat(capsys, monkeypatch, stdin: str, *argv) -> tuple[int, str, str]:
    """`python -m rat_hf.cli chat ARGV` in this process with `stdin` as the input: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    capsys.readouterr()
    try:
        code = cli.main(["chat", *argv])
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def error_lines(err: str) -> list[str]:
    assert "Traceback" not in err
    return [line for line in err.splitlines() if "error:" in line]


class GenerateSpy:
    """Wraps `model.generate` to record what every call read (the real generate still runs)."""

    def __init__(self, model):
        self.calls, self.generate = [], model.generate
        model.generate = self

    def __call__(self, **kwargs):
        self.calls.append({k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items() if k != "streamer"})
        return self.generate(**kwargs)


# --- end to end, a fresh process ------------------------------------------------------------------------------------
def test_every_command_in_a_fresh_process(saved, tmp_path):
    from rat_hf.data import load_chat_jsonl

    conversation = tmp_path / "talk.jsonl"
    stdin = (f"Hello there\ntest\ntest Token 5\nsave {conversation}\nclear\nload {conversation}\nhelp\n"
             f"load {tmp_path / 'missing.jsonl'}\nsave\nHow are you?\nbye\nNever read\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "rat_hf.cli", "chat", "--model", saved["rat"], "--max_new_tokens",
                           "8", "--seed", "0"], input=stdin, capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert out.count("Assistant: ") == 2  # "Never read" after `bye` is not answered
    assert out.count("round trip:     ok") == 2 and "tokens:         ['Token', 'Ġ5']" in out
    assert "EOS:            '[EOS]' = 2" in out and "result:         no problems found" in out
    assert "History cleared." in out and f"Loaded 2 messages from {conversation}." in out
    assert "commands:" in out and "load <file>" in out and out.rstrip().endswith("Goodbye!")
    errors = error_lines(done.stderr)
    assert len(errors) == 2 and "missing.jsonl" in errors[0] and errors[1] == "rat-chat: error: usage: save <filename>"
    # the saved conversation is what was said, in the seed's chat JSONL that the data loader reads
    row = load_chat_jsonl(conversation)[0]
    assert row["prompt"] == [{"role": "user", "content": "Hello there"}]
    answer = row["completion"][0]["content"]
    assert row["completion"][0]["role"] == "assistant" and f"Assistant: {answer}\n" in out


# --- the causal path: history through the chat template -------------------------------------------------------------
def test_history_goes_through_the_chat_template(saved):
    tokenizer = saved["tokenizer"]
    bot = ChatInterface(saved["rat"], temperature=0, max_new_tokens=6)
    spy = GenerateSpy(bot.model)
    first = bot.generate_response("first message")
    second = bot.generate_response("second one")
    assert bot.history == [{"role": "user", "content": "first message"}, {"role": "assistant", "content": first},
                           {"role": "user", "content": "second one"}, {"role": "assistant", "content": second}]
    expected = tokenizer.apply_chat_template(bot.history[:3], tokenize=False, add_generation_prompt=True)
    read = spy.calls[1]["input_ids"][0].tolist()
    assert read == tokenizer(expected, add_special_tokens=False)["input_ids"]
    assert "first message" in tokenizer.decode(read) and tokenizer.eos_token_id in read  # turns closed by EOS
    assert spy.calls[1]["do_sample"] is False and spy.calls[1]["max_new_tokens"] == 6
    # greedy answers are the model's own greedy continuation of that prompt, cut at EOS
    ids = torch.tensor([read])
    greedy = spy.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0)[0, ids.shape[1]:].tolist()
    cut = greedy.index(2) if 2 in greedy else len(greedy)
    assert second == tokenizer.decode(greedy[:cut], skip_special_tokens=True)

    alone = ChatInterface(bot.model, tokenizer, temperature=0, max_new_tokens=6, use_history=False)
    alone.generate_response("first message")
    assert alone.prompt_ids("second one") == tokenizer(tokenizer.apply_chat_template(
        [{"role": "user", "content": "second one"}], tokenize=False, add_generation_prompt=True),
        add_special_tokens=False)["input_ids"]
    assert len(alone.history) == 2  # recorded (for save) though not read


def test_window_leaves_out_the_oldest_turns_and_says_so(saved, capsys, monkeypatch):
    bot = ChatInterface(saved["rat"], temperature=0, max_new_tokens=4, max_length=150)
    for i in range(4):
        bot.generate_response(f"message number {i} about tokens")
    ids = bot.prompt_ids("the last one")
    text = saved["tokenizer"].decode(ids)
    assert len(ids) <= 150 and "the last one" in text and "message number 3" in text and "message number 0" not in text
    assert bot.last_dropped_turns > 0 and len(bot.history) == 8  # the history keeps what the window leaves out
    with pytest.raises(ValueError, match="more than max_length=150"):
        bot.generate_response("word " * 100)
    code, out, err = chat(capsys, monkeypatch, "".join(f"message number {i} about tokens\n" for i in range(4))
                          + "word " * 100 + "\nstill here\n", "--model", saved["rat"], "--max_length", "150",
                          "--max_new_tokens", "4", "--no_stream")
    assert code == 0 and out.count("Assistant: ") == 5  # the long message is refused, the chat goes on
    assert "rat-chat: note: left out the " in err and "oldest turn(s) to fit --max_length 150" in err
    errors = error_lines(err)
    assert len(errors) == 1 and "more than max_length=150" in errors[0]


def test_streaming_prints_what_no_stream_prints(saved, capsys, monkeypatch):
    stdin = "Hello there\nHow are you?\ntest\nclear\nI am fine\n"
    for model in ("rat", "rxt"):
        args = ["--model", saved[model], "--temperature", "1.0", "--max_new_tokens", "10", "--seed", "3"]
        code, streamed, _ = chat(capsys, monkeypatch, stdin, *args)
        code2, whole, _ = chat(capsys, monkeypatch, stdin, *args, "--no_stream")
        assert code == code2 == 0 and streamed == whole and whole.count("Assistant: ") == 3
        answers = [line for line in whole.splitlines() if line.startswith("Assistant: ")]
        assert any(len(a) > len("Assistant: ") for a in answers), answers  # not trivially equal
    bot = ChatInterface(saved["rat"], temperature=0, max_new_tokens=10)
    pieces = list(bot.stream_response("Hello there"))
    assert len(pieces) >= 1 and "".join(pieces) == bot.history[-1]["content"]
    assert bot.history[-1]["content"] == ChatInterface(bot.model, bot.tokenizer, temperature=0,
                                                       max_new_tokens=10).generate_response("Hello there")


def test_save_and_load_continue_the_same_conversation(saved, tmp_path):
    from rat_hf.data import load_chat_jsonl

    bot = ChatInterface(saved["rat"], temperature=0, max_new_tokens=5)
    bot.generate_response("Hello there")
    bot.generate_response("How are you?")
    for name in ("talk.jsonl", "talk.json"):
        bot.save(tmp_path / name)
        row = load_chat_jsonl(tmp_path / name)[0]
        assert row["prompt"] + row["completion"] == bot.history
        again = ChatInterface(bot.model, bot.tokenizer, temperature=0, max_new_tokens=5)
        again.load(tmp_path / name)
        assert again.history == bot.history and again.prompt_ids("next") == bot.prompt_ids("next")
    # the seed's role-less lines and a pretty-printed JSON file load too
    (tmp_path / "seed.jsonl").write_text('{"messages": [{"content": "Hi"}, {"content": "Hello!"}], "quality": 1.0}\n')
    assert read_conversation(tmp_path / "seed.jsonl") == [{"role": "user", "content": "Hi"},
                                                          {"role": "assistant", "content": "Hello!"}]
    (tmp_path / "pretty.json").write_text(json.dumps({"messages": bot.history}, indent=2))
    assert read_conversation(tmp_path / "pretty.json") == bot.history
    bot.clear()
    assert bot.history == []
    with pytest.raises(ValueError, match="nothing to save"):
        bot.save(tmp_path / "empty.jsonl")


# --- RxT: the memory, not the history --------------------------------------------------------------------------------
def test_rxt_answers_from_memory_and_clear_resets_it(saved):
    tokenizer = saved["tokenizer"]
    bot = ChatInterface(saved["rxt"], temperature=1.0, max_new_tokens=6)
    assert bot.is_reactive
    spy = GenerateSpy(bot.model)
    initial = bot.model.init_memory(1).clone()
    torch.manual_seed(0)
    bot.generate_response("Hi, I am Ada.")
    after_one = bot.session.memory.clone()
    assert not torch.allclose(after_one, initial)  # the turn was folded into the memory
    bot.generate_response("What is my name?")
    # the second turn read `[Q] query [A]` alone (no history), tokenized as the curriculum trains on it, and the
    # memory the first turn wrote
    assert spy.calls[1]["input_ids"][0].tolist() == interaction_prompt_ids(tokenizer, "What is my name?")
    assert torch.equal(spy.calls[1]["memory"], after_one) and torch.equal(spy.calls[0]["memory"], initial)
    assert len(bot.history) == 4 and bot.session.turns == 2
    bot.clear()
    assert bot.history == [] and bot.session.turns == 0 and torch.equal(bot.session.memory, initial)


def test_rxt_load_reencodes_the_turns_into_memory(saved, tmp_path, capsys, monkeypatch):
    tokenizer = saved["tokenizer"]
    talk = tmp_path / "talk.jsonl"
    talk.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi, I am Ada."},
                                             {"role": "assistant", "content": "Hello, Ada!"},
                                             {"role": "user", "content": "Bye."}]}) + "\n")
    bot = ChatInterface(saved["rxt"], temperature=0, max_new_tokens=4)
    bot.generate_response("something else first")
    bot.load(talk)
    model, eos = bot.model, 2

    with torch.no_grad():  # every user turn with its reply (the last has none), from the initial memory
        memory = model.init_memory(1)
        for row in (interaction_prompt_ids(tokenizer, "Hi, I am Ada.")
                    + tokenizer(" Hello, Ada!", add_special_tokens=False)["input_ids"] + [eos],
                    interaction_prompt_ids(tokenizer, "Bye.") + [eos]):
            memory = model.update_memory(memory, torch.tensor([row]))
    assert torch.allclose(bot.session.memory, memory, atol=1e-6) and bot.session.turns == 2
    assert len(bot.history) == 3
    code, out, err = chat(capsys, monkeypatch, f"load {talk}\nclear\n", "--model", saved["rxt"])
    assert code == 0 and f"Loaded 3 messages from {talk} (re-encoded into the memory)." in out
    assert "Memory reset." in out and "RxT" in err


# --- batch mode ------------------------------------------------------------------------------------------------------
def test_batch_mode_writes_one_json_line_per_prompt(saved, tmp_path, capsys, monkeypatch):
    tokenizer = saved["tokenizer"]
    text_file = tmp_path / "prompts.txt"
    text_file.write_text("Hello there\n\nHow are you?\n")
    output = tmp_path / "answers.jsonl"
    code, out, err = chat(capsys, monkeypatch, "", "--model", saved["rat"], "--prompts", str(text_file),
                          "--output", str(output), "--temperature", "0", "--max_new_tokens", "6")
    assert code == 0 and out == "" and "answered 2 prompt(s)" in err
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    bot = ChatInterface(saved["rat"], temperature=0, max_new_tokens=6, use_history=False)
    assert rows == [{"prompt": p, "response": bot.generate_response(p)} for p in ("Hello there", "How are you?")]

    jsonl = tmp_path / "prompts.jsonl"
    conversation = [{"content": "Hi"}, {"content": "Hello!"}, {"content": "How are you?"}, {"content": "Fine."}]
    jsonl.write_text("\n".join(json.dumps(r) for r in (
        {"prompt": "Hello there", "completion": "Hi!", "id": 1},  # TRL's format: the completion is a reference
        {"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                    {"role": "user", "content": "How are you?"}]},
        {"messages": conversation, "quality": 0.5},  # the reply after the last user turn is a reference
    )) + "\n")
    code, out, _ = chat(capsys, monkeypatch, "", "--model", saved["rat"], "--prompts", str(jsonl),
                        "--temperature", "0", "--max_new_tokens", "6")
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [r["id"] for r in rows[:1]] == [1] and rows[2]["quality"] == 0.5
    assert rows[0]["response"] == bot.generate_response("Hello there")
    # the conversation's earlier turns are the context: the greedy continuation of the templated conversation
    messages = [{"role": r, "content": m["content"]} for r, m in zip(("user", "assistant", "user"), conversation)]
    prompt = torch.tensor([tokenizer(tokenizer.apply_chat_template(messages, tokenize=False,
                                                                   add_generation_prompt=True),
                                     add_special_tokens=False)["input_ids"]])
    new = bot.model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)[0, prompt.shape[1]:].tolist()
    expected = tokenizer.decode(new[:new.index(2)] if 2 in new else new, skip_special_tokens=True)
    assert rows[1]["response"] == rows[2]["response"] == expected

    code, out, _ = chat(capsys, monkeypatch, "", "--model", saved["rxt"], "--prompts", str(jsonl),
                        "--temperature", "0", "--max_new_tokens", "4")
    assert code == 0 and len(out.splitlines()) == 3


# --- errors ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("content, fragment", [
    (None, "--prompts '{path}': no such file"),
    ('{"prompt": "ok"}\n{"prompt": "cut\n', "{path}:2: invalid JSON"),
    ('{"prompt": "ok"}\n{"messages": [{"role": "system", "content": "Be brief."}]}\n',
     "{path}:2: the prompt must end with a user message (it ends with system)"),
    ('{"prompt": "ok"}\n\n{"question": "what?"}\n', "{path}:3: expected exactly one of 'messages', 'text' or"),
    ('{"prompt": 3}\n', "{path}:1: 'prompt' must be a string or a non-empty list of messages"),
    ("", "--prompts '{path}' is empty"),
])
def test_bad_prompts_files_are_one_line_errors(saved, tmp_path, capsys, monkeypatch, content, fragment):
    path = tmp_path / "prompts.jsonl"
    if content is not None:
        path.write_text(content)
    code, out, err = chat(capsys, monkeypatch, "", "--model", saved["rat"], "--prompts", str(path))
    errors = error_lines(err)
    assert code == 2 and out == "" and len(errors) == 1, err
    assert errors[0].startswith("rat-chat: error: ") and fragment.format(path=path) in errors[0], errors[0]


def test_other_errors_are_one_line(saved, tmp_path, capsys, monkeypatch):
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"fine\ncaf\xe9\n")
    for argv, fragment in [
        (["--model", str(tmp_path / "no-such-model")], "no such file or directory"),
        (["--model", saved["rat"], "--prompts", str(latin)], "is not UTF-8 text: byte 0xe9 at offset 8 (line 2)"),
        (["--model", saved["rat"], "--output", "x.jsonl"], "--output applies only with --prompts"),
        (["--model", saved["rat"], "--temperature", "-1"], "argument --temperature: must be"),
    ]:
        code, out, err = chat(capsys, monkeypatch, "", *argv)
        errors = error_lines(err)
        assert code == 2 and len(errors) == 1 and fragment in errors[0], (argv, err)
    with pytest.raises(ValueError, match="temperature must be a number >= 0"):
        ChatInterface(saved["rat"], temperature=-0.5)
    with pytest.raises(ValueError, match=r"prompts.txt: no prompts"):
        (tmp_path / "prompts.txt").write_text("\n  \n")
        read_prompts(tmp_path / "prompts.txt")


def test_diagnostics_flag_an_end_of_text_that_is_an_ordinary_token(saved):
    bot = ChatInterface(saved["rat"])
    report = bot.diagnostics("Token 7 follows")
    assert report["round_trip"] and report["problems"] == [] and report["eos_token_id"] == 2
    assert report["special_tokens"]["[EOS]"] == 2
    assert report["ids"] == saved["tokenizer"]("Token 7 follows")["input_ids"]
    # the PPO-chat seed's mistake: EOS 50256, an ordinary token in cl100k (whose end-of-text is 100257); here id 100
    model = RatForCausalLM.from_pretrained(saved["rat"])
    model.config.eos_token_id = model.generation_config.eos_token_id = 100
    report = ChatInterface(model, saved["tokenizer"]).diagnostics()
    token = saved["tokenizer"].convert_ids_to_tokens(100)
    assert f"the model's eos_token_id: id 100 is the ordinary token {token!r}" in report["problems"]
    assert "the tokenizer's EOS is 2, the model's [100]" in report["problems"]


def test_diagnostics_on_cl100k_name_its_end_of_text():
    """cl100k's end-of-text is 100257; the seed's fallback 50256 is the ordinary token 'parable' there."""
    from rat_hf.tokenization import tiktoken_tokenizer

    tokenizer = tiktoken_tokenizer()
    model = RatForCausalLM(RatConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32, eos_token_id=50256,
                                     pad_token_id=100257))
    report = ChatInterface(model, tokenizer).diagnostics("Hello, world! 12345 tokens")
    assert report["round_trip"] and report["eos_token_id"] == 100257 == report["special_tokens"]["<|endoftext|>"]
    assert report["problems"] == ["the model's eos_token_id: id 50256 is the ordinary token 'parable'",
                                  "the tokenizer's EOS is 100257, the model's [50256]"]
    assert report["notes"] == ["PAD is EOS: fine for chat; RL trainers need a pad token distinct from EOS"]


def test_a_tokenizer_without_chat_template_gets_rat_hfs_with_a_note(saved, tmp_path, capsys, monkeypatch):
    from rat_hf.tokenization import CHAT_TEMPLATE

    plain = saved["tokenizer"].__class__.from_pretrained(saved["rat"])
    plain.chat_template = None
    plain.save_pretrained(tmp_path / "plain")
    with pytest.warns(UserWarning, match="the tokenizer has no chat template; using rat_hf's"):
        bot = ChatInterface(saved["rat"], tmp_path / "plain", temperature=0)
    assert bot.chat_template == CHAT_TEMPLATE
    assert bot.prompt_ids("hi") == saved["tokenizer"](saved["tokenizer"].apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True),
        add_special_tokens=False)["input_ids"]
    code, out, err = chat(capsys, monkeypatch, "hi\n", "--model", saved["rat"], "--tokenizer", str(tmp_path / "plain"),
                          "--max_new_tokens", "3")
    assert code == 0 and out.startswith("Assistant: ")
    assert "rat-chat: note: the tokenizer has no chat template; using rat_hf's" in err
