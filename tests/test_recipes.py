"""The recipes end to end on their tiny configs: pretraining (+ card + push to the loopback Hub + remote-code load),
the RLM recipe, two processes through `accelerate launch`, and the README's main job."""

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
    from rat_hf.recipes.pretrain import main

    monkeypatch.setenv("HF_ENDPOINT", hub_server.url)
    out = tmp_path / "run"
    metrics = main(["--config", TINY_PRETRAIN, "--output_dir", str(out), "--max_steps", "12", "--save_steps", "12",
                    "--push_to_hub", "--hub_model_id", "user/rat-recipe", "--hub_token", hub_server.token])
    assert metrics["eval_loss"] < 6.2 and metrics["eval_perplexity"] > 1  # log(512) = 6.24: it learned something
    for name in ("model.safetensors", "config.json", "modeling_rat.py", "configuration_rat.py", "tokenizer.json",
                 "README.md", "checkpoint-12/optimizer.pt"):
        assert (out / name).exists(), name
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


def test_main_job_trains_saves_reloads_and_generates(tmp_path):
    result = subprocess.run([sys.executable, "-m", "rat_hf", "--max_steps", "8", "--output_dir", str(tmp_path / "demo")],
                            capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "reloaded RatForCausalLM" in result.stdout and "sample:" in result.stdout
    assert (tmp_path / "demo" / "README.md").exists()
