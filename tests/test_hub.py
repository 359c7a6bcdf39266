"""Hub: model cards, the saved folder, and push -> load in a fresh process where rat_hf cannot be imported, through
the real huggingface_hub client and the test-only loopback Hub of tests/hub_server.py (no internet)."""

import contextlib
import hashlib
import io
import json
import logging
import os
import subprocess
import sys
import textwrap
import traceback
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from huggingface_hub import ModelCard

from rat_hf import RatConfig, RatForCausalLM, RxTConfig, RxTForCausalLM
from rat_hf.hub import (
    HubPushError,
    IncompleteHubFolderError,
    check_hub_folder,
    model_card,
    push_folder_to_hub,
    push_to_hub,
    save_for_hub,
)
from rat_hf.tokenization import train_bpe_tokenizer

RAT = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
RXT = dict(RAT, num_key_value_heads=2, num_query_heads=2, stm_size=8, max_position_embeddings=64)
SENTENCES = ["The quick brown fox jumps over the lazy dog.", "A reactive model keeps a short-term memory.",
             "Hello world, hello model cards!", "Tiny models train in seconds on a laptop."]
CARD_TOKEN = "hf_cardsecret0123456789"  # must never reach a card
COMMAND = f"python recipes/pretrain_rat.py --config recipes/configs/tiny.yaml --hub_token {CARD_TOKEN}"
RECIPE = {"learning_rate": 3e-4, "max_steps": 100, "hub_token": CARD_TOKEN, "tokenizer": "bpe-300"}
METRICS = {"eval_loss": 2.3456789, "eval_perplexity": 10.44, "train_tokens": 123456}
MEMORY_IDS = [[7, 8, 9, 10, 11, 12]]  # one finished interaction read into the RxT memory before the forward


def tiny_model(model_type: str):
    torch.manual_seed(0)
    model = RatForCausalLM(RatConfig(**RAT)) if model_type == "rat" else RxTForCausalLM(RxTConfig(**RXT))
    return model.eval()


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        extra = {}
        if model.config.model_type == "rxt":
            memory = model.update_memory(model.init_memory(1), torch.tensor(MEMORY_IDS))
            extra["memory"] = memory.expand(ids.shape[0], -1, -1, -1)
        return model(input_ids=ids, **extra).logits


def digests(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@contextlib.contextmanager
def captured_logs():
    """Everything the client and transformers log (DEBUG and up) while the block runs."""
    buffer, handler = io.StringIO(), None
    handler = logging.StreamHandler(buffer)
    loggers = [logging.getLogger(n) for n in ("", "huggingface_hub", "httpx", "httpx2", "httpcore", "transformers")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.DEBUG)
    try:
        yield buffer
    finally:
        for lg, level in zip(loggers, levels):
            lg.removeHandler(handler)
            lg.setLevel(level)


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(SENTENCES * 4, 300)


@pytest.fixture
def saved(tmp_path, tokenizer):
    folder = tmp_path / "hub"
    save_for_hub(tiny_model("rat"), folder, tokenizer=tokenizer)
    return folder


# --- cards -----------------------------------------------------------------------------------------------------------
def test_card_fields():
    model = tiny_model("rat")
    card = model_card(model, repo_id="user/rat-tiny", command=COMMAND, config=RECIPE, metrics=METRICS,
                      datasets=["wikitext"], extra_tags=("tiny",))
    data = ModelCard(str(card)).data  # the front matter parses back
    assert {"rat_hf", "custom_code", "text-generation", "rat", "tiny"} <= set(data.tags)
    assert (data.library_name, data.pipeline_tag, data.license, data.datasets) == (
        "transformers", "text-generation", "mit", ["wikitext"])
    text = card.text
    assert f"{model.num_parameters():,}" in text
    assert "python recipes/pretrain_rat.py --config recipes/configs/tiny.yaml --hub_token ***" in text
    assert "learning_rate: 0.0003" in text and "tokenizer: bpe-300" in text and "hub_token: ***" in text
    assert "| eval_loss | 2.346 |" in text and "| train_tokens | 123456 |" in text
    assert 'AutoModelForCausalLM.from_pretrained("user/rat-tiny", trust_remote_code=True)' in text
    assert "import rat_hf" in text and '"hidden_size": 32' in text
    assert CARD_TOKEN not in str(card)


def test_rxt_card_uses_its_template():
    card = model_card(tiny_model("rxt"), command=["python", "train.py", "--token", CARD_TOKEN])
    assert "Reactive Transformer" in card.text and "model.init_memory(1)" in card.text
    assert "python train.py --token ***" in card.text and CARD_TOKEN not in str(card)
    assert {"rat_hf", "custom_code", "rxt"} <= set(card.data.tags)


def test_card_rejects_unknown_model_type():
    with pytest.raises(ValueError, match="no model card template for model_type 'gpt2'"):
        model_card(SimpleNamespace(config=SimpleNamespace(model_type="gpt2")))


# --- the saved folder ------------------------------------------------------------------------------------------------
def test_save_for_hub_writes_a_complete_folder(saved):
    names = set(os.listdir(saved))
    assert {"config.json", "model.safetensors", "modeling_rat.py", "configuration_rat.py", "README.md",
            "tokenizer.json", "tokenizer_config.json"} <= names
    auto_map = json.loads((saved / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForCausalLM"] == "modeling_rat.RatForCausalLM"
    assert "custom_code" in ModelCard.load(saved / "README.md").data.tags
    check_hub_folder(saved, tokenizer=True)


def test_check_hub_folder_names_what_is_missing(saved):
    (saved / "modeling_rat.py").unlink()
    (saved / "tokenizer_config.json").unlink()
    with pytest.raises(IncompleteHubFolderError, match=r"modeling_rat\.py.*tokenizer_config\.json"):
        check_hub_folder(saved, tokenizer=True)
    config = json.loads((saved / "config.json").read_text())
    del config["auto_map"]
    (saved / "config.json").write_text(json.dumps(config))
    (saved / "model.safetensors").unlink()
    with pytest.raises(IncompleteHubFolderError, match=r"auto_map.*import rat_hf.*model\.safetensors"):
        check_hub_folder(saved)


# --- push, then load in a fresh process ------------------------------------------------------------------------------
CHILD = """
import sys
sys.modules["rat_hf"] = None  # importing rat_hf now raises ImportError: only the Hub copy can be used
import hashlib, json, os
import torch
from huggingface_hub import snapshot_download
from transformers import AutoModelForCausalLM, AutoTokenizer

for path in sys.argv[1:]:
    expected = torch.load(path)
    repo = expected["repo"]
    model = AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
    tokenizer = AutoTokenizer.from_pretrained(repo, trust_remote_code=True)
    with torch.no_grad():
        extra = {}
        if model.config.model_type == "rxt":
            memory = model.update_memory(model.init_memory(1), torch.tensor(expected["memory_ids"]))
            extra["memory"] = memory.expand(expected["ids"].shape[0], -1, -1, -1)
        logits = model(input_ids=expected["ids"], **extra).logits
    folder = snapshot_download(repo)
    print(json.dumps({
        "repo": repo,
        "equal": torch.equal(logits, expected["logits"]),
        "max_diff": (logits - expected["logits"]).abs().max().item(),
        "token_ids": tokenizer(expected["text"]).input_ids,
        "files": {n: hashlib.sha256(open(os.path.join(folder, n), "rb").read()).hexdigest()
                  for n in sorted(os.listdir(folder))},
    }))
"""


def test_push_then_load_remote_code_without_rat_hf(hub_server, tokenizer, tmp_path, monkeypatch, capfd):
    """Both models go up through `push_to_hub`; one fresh process (one slow import) loads both back."""
    monkeypatch.setenv("HF_ENDPOINT", hub_server.url)
    ids = torch.randint(3, RAT["vocab_size"], (2, 10), generator=torch.Generator().manual_seed(1))
    text = " ".join(SENTENCES[:2])
    logs, expected_files = io.StringIO(), []
    for model_type in ("rat", "rxt"):
        model, repo, folder = tiny_model(model_type), f"user/{model_type}-tiny", tmp_path / model_type
        card = model_card(model, repo_id=repo, command=COMMAND, config=RECIPE, metrics=METRICS)
        with captured_logs() as captured:
            info = push_to_hub(model, repo, folder, tokenizer=tokenizer, card=card, token=hub_server.token)
        logs.write(captured.getvalue())
        assert info.oid == hub_server.repos[repo].branches["main"] and info.endswith(f"/{repo}/commit/{info.oid}")
        assert json.loads((folder / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"]
        expected_files.append(tmp_path / f"{model_type}.pt")
        torch.save({"repo": repo, "ids": ids, "logits": logits(model, ids), "memory_ids": MEMORY_IDS, "text": text},
                   expected_files[-1])

    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT=hub_server.url, HF_HOME=str(tmp_path / "hf_home"), HF_TOKEN=hub_server.token,
               HF_HUB_DISABLE_TELEMETRY="1")
    child = subprocess.run([sys.executable, "-c", CHILD, *map(str, expected_files)], capture_output=True, text=True,
                           env=env, cwd=tmp_path, stdin=subprocess.DEVNULL, timeout=180)
    assert child.returncode == 0, child.stderr[-3000:]
    results = [json.loads(line) for line in child.stdout.splitlines() if line.startswith('{"repo"')]
    assert [r["repo"] for r in results] == ["user/rat-tiny", "user/rxt-tiny"]
    for result, model_type in zip(results, ("rat", "rxt")):
        assert result["equal"], (model_type, result["max_diff"])
        assert result["token_ids"] == tokenizer(text).input_ids
        pushed = digests(tmp_path / model_type)
        assert result["files"] == {".gitattributes": hashlib.sha256(b"").hexdigest(), **pushed}

    out, err = capfd.readouterr()
    assert "/api/models/user/rxt-tiny/commit/main" in logs.getvalue()  # the capture saw the client's requests
    for where in (logs.getvalue(), out, err, child.stdout, child.stderr, "\n".join(hub_server.log),
                  (tmp_path / "rat" / "README.md").read_text(), (tmp_path / "rxt" / "README.md").read_text()):
        assert hub_server.token not in where and CARD_TOKEN not in where
    assert hub_server.unknown == []


def test_repush_of_an_unchanged_folder_makes_no_commit(hub_server, saved):
    first = push_folder_to_hub(saved, "user/again", token=hub_server.token, endpoint=hub_server.url)
    second = push_folder_to_hub(saved, "user/again", token=hub_server.token, endpoint=hub_server.url)
    assert second.oid == first.oid and len(hub_server.repos["user/again"].commits) == 2  # initial + upload


def test_push_resolves_the_namespace_and_leaves_trainer_leftovers_local(hub_server, saved):
    (saved / "checkpoint-10").mkdir()
    (saved / "checkpoint-10" / "optimizer.pt").write_bytes(b"state")
    (saved / "training_args.bin").write_bytes(b"pickle")
    (saved / "README.md").unlink()  # a card is welcome, not required
    info = push_folder_to_hub(saved, "solo", token=hub_server.token, endpoint=hub_server.url)
    assert "/user/solo/commit/" in info
    files = hub_server.repos["user/solo"].commits[info.oid]
    assert "model.safetensors" in files and not any("checkpoint" in p or p.endswith(".bin") for p in files)


# --- failures --------------------------------------------------------------------------------------------------------
def failure_text(excinfo) -> str:
    return "".join(traceback.format_exception(excinfo.value))


def test_push_to_a_stopped_server_fails_clearly(hub_server, saved, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", hub_server.url)
    hub_server.stop()
    before = digests(saved)
    with pytest.raises(HubPushError) as excinfo:
        push_folder_to_hub(saved, "user/down", token=hub_server.token)
    message = str(excinfo.value)
    assert "could not create the repository user/down" in message and "could not reach the Hub" in message
    assert hub_server.url in message and f"local save in {saved} is complete" in message
    assert hub_server.token not in failure_text(excinfo)
    assert digests(saved) == before


def test_push_with_a_wrong_token_fails_with_401(hub_server, saved):
    wrong = "hf_wrongtoken0123456789abcdef"
    before = digests(saved)
    with captured_logs() as logs, pytest.raises(HubPushError) as excinfo:
        push_folder_to_hub(saved, "user/denied", token=wrong, endpoint=hub_server.url)
    message = str(excinfo.value)
    assert "authentication failed (HTTP 401)" in message and hub_server.url in message
    assert f"local save in {saved} is complete" in message
    for text in (failure_text(excinfo), logs.getvalue(), "\n".join(hub_server.log)):
        assert wrong not in text and hub_server.token not in text
    assert hub_server.repos == {} and digests(saved) == before


def test_push_refuses_an_incomplete_folder(hub_server, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(IncompleteHubFolderError, match="model.safetensors"):
        push_folder_to_hub(tmp_path, "user/empty", token=hub_server.token, endpoint=hub_server.url)
    assert hub_server.log == []
