"""rat-generate, rat-eval, rat-test: end to end through `python -m rat_hf.cli`, and in process (faster).

Every tool runs once in a fresh process on a tiny model saved to tmp with a tiny trained BPE; the rest runs in
process through the same `main` functions the console scripts call.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rat_hf import RatConfig, RatForCausalLM, RxTConfig, RxTForCausalLM, cli
from rat_hf.data import RandomLanguageModel, pack_for_causal_lm
from rat_hf.tokenization import train_bpe_tokenizer

REPO = Path(__file__).resolve().parents[1]
TEXTS = [f"Token {i} follows token {i - 1}; the gates pick heads and the convolution reads the past."
         for i in range(200)]
RLM_SPEC = "rlm:vocab_size=16,depth=4,beta=1.0,seed=0"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny RAT and a tiny RxT, each saved with a 320-token BPE, and a text file."""
    root = tmp_path_factory.mktemp("cli")
    tokenizer = train_bpe_tokenizer(TEXTS, vocab_size=320)
    small = dict(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(0)
    rat = RatForCausalLM(RatConfig(**small, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    rat.save_pretrained(root / "rat")
    tokenizer.save_pretrained(root / "rat")
    rxt = RxTForCausalLM(RxTConfig(**small, num_key_value_heads=2, num_query_heads=2, stm_size=8))
    rxt.save_pretrained(root / "rxt")
    tokenizer.save_pretrained(root / "rxt")
    (root / "notes.txt").write_text("\n".join(TEXTS))
    (root / "empty").mkdir()
    return {"rat": str(root / "rat"), "rxt": str(root / "rxt"), "text": str(root / "notes.txt"),
            "empty": str(root / "empty"), "tokenizer": tokenizer}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and never wait on a busy sibling)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def offline(monkeypatch):
    """The Hub is unreachable, whatever the network: the tools must say so in one line, without retrying."""
    monkeypatch.setattr(cli, "_hub_unreachable", lambda: "test: no network")


def run_cli(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "rat_hf.cli", *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=300)


def call(capsys, *argv) -> tuple[int, str, str]:
    """`python -m rat_hf.cli ARGV` in this process: (exit code, stdout, stderr); argparse exits become codes."""
    try:
        code = cli.main(list(argv))
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, tool: str, fragment: str) -> None:
    assert code == 2
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith(f"rat-{tool}: error: "), err
    assert fragment in errors[0], errors[0]


# --- end to end, fresh processes --------------------------------------------------------------------------------------
def test_generate_subprocess_equals_in_process(saved, capsys):
    args = ["generate", "--model", saved["rat"], "--prompt", "Token 7", "--max_new_tokens", "6", "--do_sample",
            "--top_k", "20", "--num_return_sequences", "2", "--seed", "3"]
    done = run_cli(*args)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "=== prompt 1/1, sequence 1/2 ===" and lines[2] == "=== prompt 1/1, sequence 2/2 ==="
    assert lines[1].startswith("Token 7") and lines[3].startswith("Token 7")
    code, out, _ = call(capsys, *args)  # same seed, same completions
    assert code == 0 and out == done.stdout


def test_eval_rlm_subprocess_reports_a_positive_gap(saved):
    done = run_cli("eval", "--model", saved["rat"], "--dataset", RLM_SPEC, "--num_sequences", "64", "--json",
                   "--no_progress")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["sequences"] == 64 and result["seq_len"] == 16 and result["tokens"] == 64 * 15
    assert 0 < result["optimal_loss"] < math.log(16)
    assert result["gap"] >= 0 and result["gap"] > 5 * result["gap_stderr"]  # an untrained model is far off
    assert result["gap"] == pytest.approx(result["loss"] - result["optimal_loss"])
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))


def test_quick_self_test_subprocess_passes():
    done = run_cli("test", "--quick")
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    checks = [line.split()[1] for line in lines if line.startswith(("PASS", "FAIL"))]
    for model in ("rat", "rxt"):
        assert {f"{model}/{c}" for c in ("build", "causality", "cache", "generate", "save_load")} <= set(checks)
    assert all(line.startswith("PASS") for line in lines[:-1]), done.stdout
    assert lines[-1].startswith(f"rat-test: {len(checks)} passed, 0 failed")


def test_runtime_error_subprocess_is_one_line(saved):
    done = run_cli("eval", "--model", saved["rat"], "--dataset", "rlm:vocab_size=16,depth=four")
    assert_one_line_error(done.returncode, done.stderr, "eval", "bad RLM spec")
    assert done.stderr.count("\n") == 1 and done.stdout == ""


def test_usage_error_subprocess_is_one_line():
    done = run_cli("generate", "--model", "m", "--prompt", "p", "--top_p", "2")
    assert_one_line_error(done.returncode, done.stderr, "generate", "argument --top_p: must be in (0.0, 1.0]")


# --- rat-generate ---------------------------------------------------------------------------------------------------
def test_generate_greedy_matches_model_generate(saved, capsys):
    code, out, _ = call(capsys, "rat-generate", "--model", saved["rat"], "--prompt", "Token 3", "--prompt", "the",
                        "--max_new_tokens", "5", "--completion_only")
    assert code == 0
    tokenizer = saved["tokenizer"]
    model = RatForCausalLM.from_pretrained(saved["rat"]).eval()
    expected = []
    for i, prompt in enumerate(["Token 3", "the"], 1):
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        new = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        expected += [f"=== prompt {i}/2, sequence 1/1 ===", tokenizer.decode(new[0, ids.shape[1]:],
                                                                          skip_special_tokens=True)]
    assert out.splitlines() == expected


def test_generate_beams_and_repetition_penalty(saved, capsys):
    code, out, _ = call(capsys, "generate", "--model", saved["rat"], "--prompt", "Token", "--num_beams", "3",
                        "--num_return_sequences", "2", "--repetition_penalty", "1.3", "--max_new_tokens", "4")
    assert code == 0 and out.count("=== prompt 1/1, sequence") == 2


def test_generate_rxt_prompts_are_turns_of_one_conversation(saved, capsys):
    code, out, _ = call(capsys, "generate", "--model", saved["rxt"], "--prompt", "Token 1", "--prompt", "Token 2",
                        "--max_new_tokens", "4")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "[Q] Token 1" and lines[1].startswith("[A]")
    assert lines[2] == "[Q] Token 2" and lines[3].startswith("[A]")


# --- rat-eval -------------------------------------------------------------------------------------------------------
def test_eval_text_file_equals_the_models_own_loss(saved, capsys):
    code, out, _ = call(capsys, "eval", "--model", saved["rat"], "--dataset", saved["text"], "--seq_len", "32",
                        "--max_sequences", "12", "--batch_size", "5", "--json", "--no_progress")
    assert code == 0
    result = json.loads(out)
    assert result["sequences"] == 12 and result["seq_len"] == 32 and result["tokens"] == 12 * 31
    from datasets import Dataset

    packed = pack_for_causal_lm(Dataset.from_dict({"text": TEXTS}), saved["tokenizer"], 32)
    ids = torch.tensor(packed["input_ids"][:12])
    model = RatForCausalLM.from_pretrained(saved["rat"]).eval()
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()  # every row has 31 targets: mean of rows == overall
    assert result["loss"] == pytest.approx(loss, abs=1e-5)


def test_eval_default_corpus_text_report(saved, capsys):
    code, out, _ = call(capsys, "eval", "--model", saved["rat"], "--dataset", "default", "--max_docs", "20",
                        "--seq_len", "64", "--max_sequences", "4", "--no_progress")
    assert code == 0
    report = dict(line.split(None, 1) for line in out.splitlines())
    assert set(report) == {"model", "dataset", "tokens", "loss", "perplexity"}
    assert report["dataset"] == "default: 4 sequences of 64 tokens" and report["tokens"] == "252 predicted"


def test_eval_rlm_text_report_and_vocabulary_check(saved, capsys):
    code, out, _ = call(capsys, "eval", "--model", saved["rat"], "--dataset", RLM_SPEC, "--num_sequences", "8")
    assert code == 0
    assert [line.split()[0] for line in out.splitlines()] == ["model", "dataset", "tokens", "loss", "perplexity",
                                                              "optimal", "gap"]
    code, _, err = call(capsys, "eval", "--model", saved["rat"], "--dataset", "rlm:vocab_size=400,depth=2")
    assert_one_line_error(code, err, "eval", "does not cover the RLM's 400 symbols")


def test_eval_rlm_optimum_is_the_exact_one(saved, monkeypatch):
    """The optimal loss reported is the RLM's exact conditionals on the very sequences the model was scored on."""
    import argparse

    rlm = RandomLanguageModel(16, 4, 1.0, seed=0)
    args = argparse.Namespace(num_sequences=300, seed=5, batch_size=64, no_progress=True, dataset=RLM_SPEC)
    model = RatForCausalLM.from_pretrained(saved["rat"]).eval()
    result = cli._eval_rlm(model, cli.parse_rlm_spec(RLM_SPEC), args)
    x = rlm.sample(300, seed=5)
    exact = -rlm.next_token_log_probs(x).gather(-1, x[..., None])[:, 1:].mean()
    assert result["optimal_loss"] == pytest.approx(float(exact), rel=1e-9)
    mean, stderr = rlm.optimal_loss(4000, seed=1)  # all positions: close to it (position 0 is the marginal)
    assert abs(result["optimal_loss"] - mean) < 0.15


@pytest.mark.parametrize("spec, params", [
    ("rlm:vocab_size=32,depth=5,beta=1.0,seed=0", dict(vocab_size=32, depth=5, beta=1.0, seed=0)),
    ("rlm:depth=3, vocab_size=8", dict(vocab_size=8, depth=3, beta=1.0, seed=0)),
    ("rlm:vocab_size=8,depth=3,beta=2.5,seed=7,", dict(vocab_size=8, depth=3, beta=2.5, seed=7)),
])
def test_parse_rlm_spec(spec, params):
    assert cli.parse_rlm_spec(spec) == params


@pytest.mark.parametrize("spec, fragment", [
    ("rlm:vocab_size=8", "missing depth"), ("rlm:vocab_size=8,depth=3,alpha=1", "'alpha=1' is not one of"),
    ("rlm:vocab_size=eight,depth=3", "vocab_size must be int"), ("rlm:vocab_size", "is not one of"),
])
def test_parse_rlm_spec_errors(spec, fragment):
    with pytest.raises(cli.CLIError, match=fragment):
        cli.parse_rlm_spec(spec)


# --- rat-test -------------------------------------------------------------------------------------------------------
def test_quick_self_test_in_process(capsys):
    code, out, _ = call(capsys, "test", "--quick")
    assert code == 0 and "FAIL" not in out and out.count("PASS") == 11


def test_self_test_reports_failures(monkeypatch, capsys):
    monkeypatch.setattr(cli.selftest, "_TINY_RAT", {**cli.selftest._TINY_RAT, "n_policies": 0})
    code, out, _ = call(capsys, "test", "--quick")
    assert code == 1
    assert "FAIL rat/build: ValueError: RatConfig.n_policies=0 is invalid" in out
    assert "FAIL rat/causality: skipped, rat/build failed" in out
    assert "PASS rxt/save_load" in out and out.splitlines()[-1].startswith("rat-test: 6 passed, 5 failed")


# --- help and errors ------------------------------------------------------------------------------------------------
FLAGS = {
    "generate": ["--model", "--tokenizer", "--prompt", "--max_new_tokens", "--do_sample", "--temperature", "--top_k",
                 "--top_p", "--repetition_penalty", "--num_return_sequences", "--num_beams", "--seed",
                 "--trust_remote_code", "--device", "--dtype", "--completion_only", "--debug"],
    "eval": ["--model", "--tokenizer", "--dataset", "--dataset_config", "--split", "--text_column", "--max_docs",
             "--seq_len", "--max_sequences", "--num_sequences", "--seed", "--batch_size", "--json", "--no_progress",
             "--trust_remote_code", "--device", "--dtype", "--debug"],
    "test": ["--quick", "--device", "--debug"],
}
BUILDERS = {"generate": cli.build_generate_parser, "eval": cli.build_eval_parser, "test": cli.build_test_parser}


@pytest.mark.parametrize("tool", list(FLAGS))
def test_help_mentions_every_flag(tool, capsys):
    code, out, _ = call(capsys, tool, "--help")
    assert code == 0 and out.startswith(f"usage: rat-{tool}")
    options = {s for a in BUILDERS[tool]()._actions for s in a.option_strings if s.startswith("--")} - {"--help"}
    assert options == set(FLAGS[tool])
    for action in BUILDERS[tool]()._actions:
        assert action.help and action.help != "==SUPPRESS==", action.option_strings
    for flag in FLAGS[tool]:
        assert flag in out, flag
    assert "examples:" in out


def test_module_dispatch(capsys):
    code, out, _ = call(capsys, "--help")
    assert code == 0 and "generate,eval,test,train" in out
    code, _, err = call(capsys, "bogus")
    assert code == 2 and err.splitlines()[-1] == "rat_hf.cli: error: unknown tool 'bogus'"
    code, _, err = call(capsys)
    assert code == 2


@pytest.mark.parametrize("tool, argv, fragment", [
    ("generate", ["--prompt", "x"], "the following arguments are required: --model"),
    ("generate", ["--model", "m"], "the following arguments are required: --prompt"),
    ("generate", ["--model", "m", "--prompt", "x", "--max_new_tokens", "0"], "argument --max_new_tokens: must be >= 1"),
    ("generate", ["--model", "m", "--prompt", "x", "--temperature", "hot"], "expected a number, got 'hot'"),
    ("generate", ["--model", "m", "--prompt", "x", "--temperature", "0.7"], "--temperature applies only with"),
    ("generate", ["--model", "m", "--prompt", "x", "--num_return_sequences", "2"], "needs --do_sample or --num_beams"),
    ("generate", ["--model", "m", "--prompt", "x", "--dtype", "int8"], "argument --dtype: invalid choice"),
    ("eval", ["--model", "m"], "the following arguments are required: --dataset"),
    ("eval", ["--model", "m", "--dataset", "default", "--seq_len", "1"], "argument --seq_len: must be >= 2"),
    ("test", ["--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_arguments_are_one_line_errors(tool, argv, fragment, capsys):
    code, _, err = call(capsys, tool, *argv)
    assert_one_line_error(code, err, tool, fragment)


@pytest.mark.parametrize("tool, argv, fragment", [
    ("generate", ["--model", "./no/such/dir", "--prompt", "x"], "model './no/such/dir': no such file or directory"),
    ("generate", ["--model", "{empty}", "--prompt", "x"], "has no config.json"),
    ("generate", ["--model", "{rat}/config.json", "--prompt", "x"], "is a file; pass the directory"),
    ("generate", ["--model", "some-org/some-model", "--prompt", "x"], "not in the Hugging Face cache, and the Hub is "
                                                                       "unreachable (test: no network)"),
    ("generate", ["--model", "{rat}", "--tokenizer", "some-org/tok", "--prompt", "x"], "tokenizer 'some-org/tok' is"),
    ("generate", ["--model", "{rxt}", "--prompt", "x", "--do_sample", "--num_return_sequences", "2"],
     "one answer per query"),
    ("eval", ["--model", "{rat}", "--dataset", "no-such-org/no-such-dataset"], "dataset 'no-such-org/no-such-data"),
    ("eval", ["--model", "{rat}", "--dataset", "./missing.txt"], "dataset './missing.txt': no such file"),
    ("eval", ["--model", "{rat}", "--dataset", "{text}", "--seq_len", "100000"], "lower --seq_len"),
    ("eval", ["--model", "{rat}", "--dataset", "rlm:vocab_size=16"], "missing depth"),
    ("eval", ["--model", "{rat}", "--dataset", "rlm:vocab_size=1,depth=2"], "vocab_size must be an integer >= 2"),
])
def test_runtime_errors_are_one_line_errors(tool, argv, fragment, saved, offline, capsys):
    argv = [a.format(**saved) for a in argv]
    code, out, err = call(capsys, tool, *argv)
    assert_one_line_error(code, err, tool, fragment)
    assert out == ""


def test_debug_shows_the_exception(saved):
    with pytest.raises(cli.CLIError, match="missing depth"):
        cli.eval_main(["--model", saved["rat"], "--dataset", "rlm:vocab_size=16", "--debug"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_missing_cuda_is_one_line_error(saved, capsys):
    code, _, err = call(capsys, "generate", "--model", saved["rat"], "--prompt", "x", "--device", "cuda")
    assert_one_line_error(code, err, "generate", "CUDA is not available")


def test_hub_check_honours_offline_mode(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert cli._hub_unreachable() == "HF_HUB_OFFLINE is set"
    with cli._offline():
        assert constants.HF_HUB_OFFLINE is True
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with cli._offline():
        assert constants.HF_HUB_OFFLINE is True
    assert constants.HF_HUB_OFFLINE is False
