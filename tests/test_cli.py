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


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture
def offline(monkeypatch):
    """The Hub is unreachable, whatever the network: the tools must say so in one line, without retrying."""
    monkeypatch.setattr(cli._common, "hub_unreachable", lambda: "test: no network")


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
    assert "Warning" not in done.stderr, done.stderr  # no library notes or our own FutureWarnings in the output
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
    assert lines[0].startswith("rat-test: transformers ")
    assert all(line.startswith("PASS") for line in lines[1:-1]), done.stdout
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


def test_eval_default_scores_the_documents_training_held_out(saved, capsys):
    """`--dataset default` is the held-out split of rat-train (by document), and the report says what was scored."""
    from rat_hf.data import default_text_corpus
    from rat_hf.recipes.pretrain import split_documents

    code, out, _ = call(capsys, "eval", "--model", saved["rat"], "--dataset", "default", "--max_docs", "120",
                        "--seq_len", "32", "--max_sequences", "4", "--json", "--no_progress")
    assert code == 0
    result = json.loads(out)
    train, held = split_documents(default_text_corpus(max_docs=120))
    assert 0 < len(held) < 20 and len(train) + len(held) == 120
    assert result["split"].startswith(f"held-out split: {len(held)} of 120 documents")
    assert result["note"] == "block length 32 (--seq_len)" and result["tokens"] == 4 * 31
    ids = torch.tensor(pack_for_causal_lm(held, saved["tokenizer"], 32)["input_ids"][:4])
    model = RatForCausalLM.from_pretrained(saved["rat"]).eval()
    with torch.no_grad():
        assert result["loss"] == pytest.approx(model(input_ids=ids, labels=ids).loss.item(), abs=1e-5)

    code, out, _ = call(capsys, "eval", "--model", saved["rat"], "--dataset", "default", "--max_docs", "120",
                        "--seq_len", "32", "--max_sequences", "4", "--no_progress")
    assert code == 0
    report = dict(line.split(None, 1) for line in out.splitlines())
    assert set(report) == {"model", "dataset", "tokens", "loss", "perplexity"}
    assert report["dataset"].startswith("default (held-out split: ") and "4 sequences of 32 tokens" in out
    assert "block length 32" in report["dataset"] and report["tokens"] == "124 predicted"
    code, out, _ = call(capsys, "eval", "--model", saved["rat"], "--dataset", "default", "--max_docs", "120",
                        "--seq_len", "32", "--max_sequences", "2", "--split", "train", "--json", "--no_progress")
    assert code == 0 and json.loads(out)["split"].startswith(f"train split: {len(train)} of 120")


def test_eval_uses_the_recorded_training_length(saved, tmp_path, capsys):
    import shutil

    model_dir = tmp_path / "rat"
    shutil.copytree(saved["rat"], model_dir)
    (model_dir / "rat_train_data.json").write_text(json.dumps({"dataset": "default", "seq_len": 16}))
    code, out, _ = call(capsys, "eval", "--model", str(model_dir), "--dataset", saved["text"], "--max_sequences", "3",
                        "--json", "--no_progress")
    assert code == 0
    result = json.loads(out)
    assert result["seq_len"] == 16 and result["note"] == "block length 16 (the training length)"
    code, _, err = call(capsys, "eval", "--model", str(model_dir), "--dataset", RLM_SPEC, "--num_sequences", "4",
                        "--json", "--no_progress")
    assert code == 0 and "trained on text (default)" in err


def test_eval_rlm_of_a_text_model_warns_the_gap_is_meaningless(saved, capsys):
    code, out, err = call(capsys, "eval", "--model", saved["rat"], "--dataset", RLM_SPEC, "--num_sequences", "4",
                          "--no_progress")
    assert code == 0
    warning = [line for line in err.splitlines() if "warning" in line]
    assert warning == ["rat-eval: warning: the model's vocabulary (320) is not the RLM's 16 symbols: it was not "
                       "trained on this RLM and the gap to the optimum is meaningless"]
    assert "(meaningless: see the warning)" in out.splitlines()[-1]


def test_eval_rlm_of_an_rlm_sized_model_has_no_warning(tmp_path, capsys):
    torch.manual_seed(0)
    RatForCausalLM(RatConfig(vocab_size=16, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                             intermediate_size=64, max_position_embeddings=32)).save_pretrained(tmp_path / "rlm")
    code, out, err = call(capsys, "eval", "--model", str(tmp_path / "rlm"), "--dataset", RLM_SPEC,
                          "--num_sequences", "4", "--json", "--no_progress")
    assert code == 0 and "warning" not in err and "warning" not in json.loads(out)


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
    result = cli.eval._eval_rlm(model, cli.parse_rlm_spec(RLM_SPEC), args)
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
    assert cli._common.hub_unreachable() == "HF_HUB_OFFLINE is set"
    with cli._common.offline():
        assert constants.HF_HUB_OFFLINE is True
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with cli._common.offline():
        assert constants.HF_HUB_OFFLINE is True
    assert constants.HF_HUB_OFFLINE is False


# --- weights that do not match their config ---------------------------------------------------------------------------
@pytest.fixture
def three_layer_config(saved, tmp_path):
    """The tiny RAT's 2-layer weights under a config.json that says 3 layers (a hand-edited or mixed-up checkpoint)."""
    import shutil

    path = tmp_path / "rat3"
    shutil.copytree(saved["rat"], path)
    config = json.loads((path / "config.json").read_text())
    config["num_hidden_layers"] = 3
    config.pop("layer_types", None)
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


@pytest.mark.parametrize("tool, extra", [("generate", ["--prompt", "Token 1", "--max_new_tokens", "2"]),
                                         ("eval", ["--dataset", RLM_SPEC, "--num_sequences", "4"])])
def test_weights_not_matching_the_config_are_an_error(tool, extra, three_layer_config, capsys):
    code, out, err = call(capsys, tool, "--model", three_layer_config, *extra)
    assert_one_line_error(code, err, tool, f"model {three_layer_config!r}: the weights do not match its config.json: "
                                           "22 weights missing (model.layers.2.*)")
    assert out == ""


def test_weights_of_another_shape_and_extra_weights_are_named(saved, tmp_path):
    import shutil

    from transformers import AutoModelForCausalLM

    from rat_hf.cli._common import from_pretrained_checked

    path = tmp_path / "wide"
    shutil.copytree(saved["rat"], path)
    config = json.loads((path / "config.json").read_text())
    config.update(intermediate_size=96)
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(cli.CLIError, match=r"6 of another shape \(e.g. model.layers.0.mlp.down_proj.weight: "
                                           r"checkpoint \[32, 64\], config \[32, 96\]\)"):
        from_pretrained_checked(AutoModelForCausalLM, str(path))
    config.update(intermediate_size=64, num_hidden_layers=1, layer_types=["hybrid"])
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(cli.CLIError, match=r"22 unexpected \(model.layers.1.\*\)"):
        from_pretrained_checked(AutoModelForCausalLM, str(path))
    model = from_pretrained_checked(AutoModelForCausalLM, saved["rat"])  # tied lm_head: not "missing"
    assert model.config.tie_word_embeddings


# --- rat-test catches a model that ignores its cache ------------------------------------------------------------------
def test_self_test_fails_when_the_model_ignores_the_cache(monkeypatch, capsys):
    """The 5.24 bug: `forward` swallows the cache under the name generate() passes it (`cache=` from 5.24), so each
    decode step sees only the newest token. Greedy tokens of a tiny random model often survive that; logits do not."""
    import functools

    from rat_hf._versions import CACHE_ARGUMENT as key
    for cls in (RatForCausalLM, RxTForCausalLM):
        forward = cls.forward

        @functools.wraps(forward)
        def forgetful(self, *args, _forward=forward, **kwargs):
            kwargs.pop(key, None)
            return _forward(self, *args, **kwargs)

        monkeypatch.setattr(cls, "forward", forgetful)
    code, out, _ = call(capsys, "test", "--quick")
    assert code == 1
    failed = {line.split()[1].rstrip(":") for line in out.splitlines() if line.startswith("FAIL")}
    assert failed == {"rat/cache", "rat/generate", "rxt/cache", "rxt/generate"}, out
    assert f"cache passed as {key}=) differ from the full forward" in out
    assert "greedy: generate()'s logits at new token 1 differ from a full forward" in out


# --- text files -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("content, fragment", [
    (b"", "is empty: no text to read"), (b"  \n\n", "is empty: no text to read"),
    (b"fine line\ncaf\xe9 au lait\n", "is not UTF-8 text: byte 0xe9 at offset 13 (line 2)"),
    ("\ufeffUTF-16 text\n".encode("utf-16-le"), "is not UTF-8 text"),
])
def test_eval_names_an_empty_or_undecodable_file(content, fragment, saved, tmp_path, capsys):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    code, out, err = call(capsys, "eval", "--model", saved["rat"], "--dataset", str(path))
    assert_one_line_error(code, err, "eval", f"--dataset {str(path)!r} {fragment}")


def test_quiet_libraries_hides_deprecation_warnings_and_restores_logging():
    import warnings

    import transformers

    from rat_hf.cli._common import quiet_libraries

    level = transformers.utils.logging.get_verbosity()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet_libraries():
            warnings.warn("`past_key_values` is deprecated", FutureWarning)
            assert transformers.utils.logging.get_verbosity() == transformers.logging.ERROR
        warnings.warn("shown", UserWarning)
    assert [str(w.message) for w in caught] == ["shown"]
    assert transformers.utils.logging.get_verbosity() == level
