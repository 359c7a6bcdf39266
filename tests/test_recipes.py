"""The recipes end to end on their tiny configs: pretraining (+ card + push to the loopback Hub + remote-code load),
the RLM recipe, two processes through `accelerate launch`, and the README's main job; `rat-train`'s exit codes and
one-line errors, and the held-out split that `rat-eval --dataset default` reuses."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("datasets")
ROOT = Path(__file__).resolve().parents[1]
TINY_PRETRAIN = str(ROOT / "recipes/configs/pretrain_rat_tiny.yaml")
TINY_RLM = str(ROOT / "recipes/configs/rlm_next_token_tiny.yaml")


def test_pretrain_recipe_trains_writes_a_card_and_pushes(hub_server, tmp_path, monkeypatch):
    from rat_hf.recipes.pretrain import train

    monkeypatch.setenv("HF_ENDPOINT", hub_server.url)
    out = tmp_path / "run"
    metrics = train(["--config", TINY_PRETRAIN, "--output_dir", str(out), "--max_steps", "12", "--save_steps", "12",
                    "--push_to_hub", "--hub_model_id", "user/rat-recipe", "--hub_token", hub_server.token])
    assert metrics["eval_loss"] < 6.2 and metrics["eval_perplexity"] > 1  # log(512) = 6.24: it learned something
    for name in ("model.safetensors", "config.json", "modeling_rat.py", "configuration_rat.py", "tokenizer.json",
                 "README.md", "checkpoint-12/optimizer.pt"):
        assert (out / name).exists(), name
    record = json.loads((out / "rat_train_data.json").read_text())
    assert record["split"] == "documents" and record["seq_len"] == 64 and record["max_docs"] == 300
    card = (out / "README.md").read_text()
    assert "rat_hf" in card and "custom_code" in card and "pretrain_rat.py" in card and "eval_loss" in card
    assert hub_server.token not in card
    pushed = hub_server.repos["user/rat-recipe"]
    assert pushed.branches["main"]

    # a fresh process that cannot import rat_hf loads the pushed model through remote code: identical logits
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(3, 500, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.save({"ids": ids, "logits": model(input_ids=ids).logits}, tmp_path / "expected.pt")
    child = textwrap.dedent(f"""
        import sys
        sys.modules["rat_hf"] = None
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        model = AutoModelForCausalLM.from_pretrained("user/rat-recipe", trust_remote_code=True).eval()
        tokenizer = AutoTokenizer.from_pretrained("user/rat-recipe", trust_remote_code=True)
        with torch.no_grad():
            assert torch.equal(model(input_ids=expected["ids"]).logits, expected["logits"])
        assert tokenizer("The list type").input_ids
        print("REMOTE_OK")
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT=hub_server.url, HF_HOME=str(tmp_path / "hf_home"), HF_TOKEN=hub_server.token)
    result = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, env=env, cwd=tmp_path,
                            timeout=300)
    assert "REMOTE_OK" in result.stdout, result.stderr[-3000:]


def test_rlm_recipe_reports_the_gap_to_the_exact_optimum(tmp_path, capsys):
    from rat_hf.recipes.rlm_next_token import main

    dynamics = main(["--config", TINY_RLM, "--output_dir", str(tmp_path), "--max_steps", "30"])
    assert (tmp_path / "dynamics.png").stat().st_size > 10_000
    saved = json.loads((tmp_path / "dynamics.json").read_text())
    assert saved["final"]["gap_to_optimum"] == pytest.approx(dynamics["final"]["gap_to_optimum"])
    assert 0 < saved["optimal_loss"] < saved["test_loss"][0]  # an untrained model is above the optimum
    assert saved["test_loss"][-1] < saved["test_loss"][0]  # ... and learning moves it down
    assert len(saved["eval_steps"]) >= 3 and saved["eval_steps"][0] == 1  # log-spaced from step 1
    assert "gap" in capsys.readouterr().out


def test_two_processes_with_accelerate_launch(tmp_path):
    """DDP over gloo on CPU: the tiny config trains to the end, one checkpoint and one model card."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(ROOT / "recipes/pretrain_rat.py"), "--config", TINY_PRETRAIN, "--output_dir", str(out),
           "--max_steps", "10", "--save_steps", "10"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-10"]
    assert list(out.glob("README.md")) and (out / "model.safetensors").exists()
    state = json.loads((out / "checkpoint-10" / "trainer_state.json").read_text())
    assert state["global_step"] == 10
    assert (result.stdout + result.stderr).count("rat_hf.pretrain: model:") == 2  # one log line per process


def test_main_job_trains_into_output_dir_reloads_from_it_and_generates(tmp_path):
    """`--output_dir=X` (the `=` form too) is where it saves and where it reloads from; cut down to seconds."""
    out = tmp_path / "demo"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "rat_hf", "--max_steps", "2", "--max_docs", "150", "--seq_len", "64",
                             "--tokenizer", "bpe:400", f"--output_dir={out}"],
                            capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "reloaded RatForCausalLM" in result.stdout and f"from {out} with AutoModelForCausalLM" in result.stdout
    assert "sample: 'The list type" in result.stdout
    assert (out / "README.md").exists() and not (tmp_path / "outputs").exists()
    assert "Warning" not in result.stderr, result.stderr[-3000:]


def test_main_job_help_says_what_it_does_and_its_defaults(capsys):
    from rat_hf.__main__ import DEFAULTS, main

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m rat_hf") and len(out.splitlines()) < 40
    assert "pretrain a small RAT" in out and "held out" in out
    for key, value in DEFAULTS.items():
        assert f"--{key} {value}" in out


# --- rat-train: exit codes, one-line errors -----------------------------------------------------------------------
TINY = ["--max_docs", "60", "--seq_len", "32", "--tokenizer", "bpe:300", "--max_steps", "1", "--report_to", "none",
        "--use_cpu", "true", "--save_strategy", "no", "--per_device_train_batch_size", "4",
        "--max_train_sequences", "16", "--model_config_overrides",
        '{"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4, "intermediate_size": 64}']


def test_rat_train_exits_0_after_a_successful_run(tmp_path, capsys):
    """The console script runs `sys.exit(main())`: main returns 0 (it used to return the metrics dict: exit 1)."""
    from rat_hf.recipes.pretrain import main

    with pytest.raises(SystemExit) as exit_:
        sys.exit(main([*TINY, "--output_dir", str(tmp_path / "run")]))
    assert exit_.value.code == 0
    assert (tmp_path / "run" / "model.safetensors").exists()
    record = json.loads((tmp_path / "run" / "rat_train_data.json").read_text())
    assert record == {"dataset": "default", "dataset_config": None, "max_docs": 60, "eval_fraction": 0.05,
                      "seq_len": 32, "tokenizer": "bpe:300", "split": "documents"}
    assert "Traceback" not in capsys.readouterr().err


@pytest.fixture
def bad_inputs(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "latin1.txt").write_bytes("first line\nna\u00efve caf\u00e9\n".encode("latin-1"))
    from rat_hf import RatConfig, RatForCausalLM

    RatForCausalLM(RatConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=64)).save_pretrained(tmp_path / "rat2")
    config = json.loads((tmp_path / "rat2" / "config.json").read_text())
    config["num_hidden_layers"] = 3
    config.pop("layer_types", None)
    (tmp_path / "rat2" / "config.json").write_text(json.dumps(config))
    return tmp_path


@pytest.mark.parametrize("argv, message", [
    (["--model_name_or_path", "./nope"], "--model_name_or_path './nope': no such file or directory"),
    (["--model_name_or_path", "outputs/nope"], "--model_name_or_path 'outputs/nope': no such file or directory"),
    (["--tokenizer", "/nonexistent"], "--tokenizer '/nonexistent': no such file or directory"),
    (["--tokenizer", "nope/dir"], "--tokenizer 'nope/dir' is not a local path, not in the Hugging Face cache, and "
                                  "the Hub is unreachable (test: no network)"),
    (["--tokenizer", "bpe:many"], "--tokenizer 'bpe:many': bpe:N needs a positive integer N"),
    (["--dataset", "{tmp}/empty.txt"], "--dataset '{tmp}/empty.txt' is empty: no text to read"),
    (["--dataset", "{tmp}/latin1.txt"], "--dataset '{tmp}/latin1.txt' is not UTF-8 text: byte 0xef at offset 13 "
                                        "(line 2)"),
    (["--dataset", "./missing.txt"], "--dataset './missing.txt': no such file or directory"),
    (["--model_name_or_path", "{tmp}/rat2"], "--model_name_or_path '{tmp}/rat2': the weights do not match its "
                                             "config.json: 22 weights missing (model.layers.2.*)"),
    (["--eval_fraction", "1.5"], "--eval_fraction must be in (0, 1), got 1.5"),
    (["--bogus", "1"], "unrecognized arguments: --bogus 1 (--help lists the arguments)"),
])
def test_rat_train_errors_are_one_line(argv, message, bad_inputs, tmp_path, monkeypatch, capsys):
    from rat_hf import cli
    from rat_hf.recipes.pretrain import main

    monkeypatch.setattr(cli._common, "hub_unreachable", lambda: "test: no network")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir(exist_ok=True)
    argv = [a.format(tmp=bad_inputs) for a in argv]
    with pytest.raises(SystemExit) as exit_:
        main([*TINY, "--output_dir", str(tmp_path / "run"), *argv])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith(f"rat-train: error: {message.format(tmp=bad_inputs)}"), err


def test_rat_train_traceback_flag_raises(tmp_path):
    from rat_hf.recipes.pretrain import main

    with pytest.raises(ValueError, match="no such file or directory"):
        main([*TINY, "--output_dir", str(tmp_path / "run"), "--tokenizer", "/nonexistent", "--traceback"])


# --- the held-out split -------------------------------------------------------------------------------------------
def test_held_out_documents_do_not_depend_on_max_docs_and_nest():
    from rat_hf.data import default_text_corpus
    from rat_hf.recipes.pretrain import held_out, split_documents

    corpus = default_text_corpus(max_docs=400)
    train, held = split_documents(corpus)
    assert len(train) + len(held) == 400 and not set(train["text"]) & set(held["text"])
    assert 0.02 < len(held) / 400 < 0.09
    assert split_documents(corpus.select(range(150)))[1]["text"] == [t for t in held["text"][:150]
                                                                       if t in corpus["text"][:150]]
    assert all(held_out(t, 0.2) for t in held["text"])  # a larger fraction holds out a superset


def test_build_data_trains_on_training_documents_and_evaluates_the_held_out_ones():
    from rat_hf.data import default_text_corpus, pack_for_causal_lm
    from rat_hf.recipes.pretrain import DataArguments, build_data, split_documents

    data = DataArguments(max_docs=120, tokenizer="bpe:300", seq_len=32)
    train, evaluation, tokenizer, _, _, record = build_data(data, seed=0)
    _, held = split_documents(default_text_corpus(max_docs=120))
    assert evaluation["input_ids"] == pack_for_causal_lm(held, tokenizer, 32)["input_ids"]
    held_rows = {tuple(r) for r in evaluation["input_ids"]}
    assert not any(tuple(r) in held_rows for r in train["input_ids"])
    assert record["split"] == "documents"


def test_pretrain_rlm_optimum_covers_the_positions_the_eval_loss_covers():
    """`rlm_gap_to_optimum` compares the shifted eval loss (positions 1..T-1) with the optimum over 1..T-1, not 0..T-1
    (which includes the first token's marginal and made a perfect model's gap negative)."""
    from rat_hf.data import RandomLanguageModel
    from rat_hf.recipes.pretrain import DataArguments, build_data

    data = DataArguments(dataset="rlm", rlm_vocab_size=8, rlm_depth=3, rlm_beta=2.0, rlm_seed=0,
                         rlm_train_sequences=64)
    *_, extra, _ = build_data(data, seed=0)
    rlm = RandomLanguageModel(8, 3, 2.0, seed=0)
    assert extra["rlm_optimal_loss"] == pytest.approx(rlm.optimal_loss(num_samples=2000, seed=2, start=1)[0])
    assert extra["rlm_optimal_last_loss"] == pytest.approx(rlm.optimal_loss(num_samples=2000, seed=2, start=-1)[0])
    assert extra["rlm_optimal_loss"] != pytest.approx(rlm.optimal_loss(num_samples=2000, seed=2)[0])


@pytest.mark.parametrize("model", [None, {}, [1, 2]])
def test_seed_layout_with_an_empty_model_section_is_refused(model):
    """The seed JSON's `"model": null` used to train the `small` preset without a word."""
    from rat_hf.recipes._config import from_seed_layout

    with pytest.raises(ValueError, match='"model" must be a mapping'):
        from_seed_layout({"model": model, "trainer": {"learning_rate": 1e-3}}, "seed.json")
