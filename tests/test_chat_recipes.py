"""The chat recipes end to end on their tiny configs (CPU): `recipes/sft_chat.py` and `recipes/grpo_chat.py` train a
fresh in-memory RAT (LoRA, and GRPO with beta > 0 on every weight, whose reference TRL reloads by name), save, reload
through `AutoModelForCausalLM` / PEFT with the same logits, write their plots and card, push to the loopback Hub;
a Llama checkpoint whose pad token is its EOS gets a pad of its own; RxT is refused in one line."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("peft")
pytest.importorskip("datasets")
ROOT = Path(__file__).resolve().parents[1]
SFT_TINY = str(ROOT / "recipes/configs/sft_chat_tiny.yaml")
GRPO_TINY = str(ROOT / "recipes/configs/grpo_chat_tiny.yaml")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def load_recipe(name: str):
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", ROOT / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def record_start(monkeypatch, recipe, factory_name: str) -> dict:
    """Make the recipe's trainer class snapshot the trainable parameters when `train()` starts (after TRL wrapped the
    model with PEFT); returns the dict the snapshot lands in."""
    start = {}
    real_factory = getattr(recipe, factory_name)

    def factory(model):
        class Recording(real_factory(model)):
            def train(self, *args, **kwargs):
                start.update({n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad})
                return super().train(*args, **kwargs)

        return Recording

    monkeypatch.setattr(recipe, factory_name, factory)
    return start


def assert_all_changed(model, start: dict, what: str) -> None:
    trained = dict((n, p) for n, p in model.named_parameters() if n in start)
    assert len(trained) == len(start) > 0
    unchanged = [n for n, p in trained.items() if torch.equal(p.detach(), start[n])]
    assert not unchanged, f"{what}: unchanged after training: {unchanged}"


def logits(model, ids):
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def check_saved_lora_run(out: Path, trainer, method: str) -> None:
    """Adapter + merged model + base model reload with the trained logits; the card and the plot are there."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.randint(3, 300, (2, 10), generator=torch.Generator().manual_seed(0))
    expected = logits(trainer.model, ids)
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(out / "base_model")  # built in memory: saved first
    with_adapter = AutoModelForCausalLM.from_pretrained(out)  # transformers' PEFT integration reads the adapter
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out / "base_model"), out)
    base = AutoModelForCausalLM.from_pretrained(out / "base_model")
    for model in (merged, with_adapter, peft_model):
        torch.testing.assert_close(logits(model, ids), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits(base, ids), expected, atol=1e-4)  # the adapter did something
    card = (out / "merged" / "README.md").read_text()
    assert f"- {method}" in card and f"{method}_chat.py" in card and "- lora" in card
    assert (out / "training_stats.png").stat().st_size > 10_000
    assert json.loads((out / "log_history.json").read_text()) == trainer.state.log_history
    tokenizer_config = json.loads((out / "merged" / "tokenizer_config.json").read_text())
    assert tokenizer_config["pad_token"] != tokenizer_config["eos_token"]


def test_sft_recipe_trains_every_lora_parameter_and_reloads(tmp_path, monkeypatch):
    recipe = load_recipe("sft_chat")
    start = record_start(monkeypatch, recipe, "sft_trainer_class")
    out = tmp_path / "sft"
    trainer = recipe.main(["--config", SFT_TINY, "--output_dir", str(out), "--max_steps", "3",
                           "--max_conversations", "24"])
    assert trainer.args.assistant_only_loss  # rat_hf's template marks assistant turns with {% generation %}
    assert_all_changed(trainer.model, start, "SFT LoRA")
    assert all("lora_" in n for n in start)
    check_saved_lora_run(out, trainer, "sft")


def test_grpo_recipe_trains_every_lora_parameter_reloads_and_pushes(tmp_path, monkeypatch, hub_server):
    recipe = load_recipe("grpo_chat")
    start = record_start(monkeypatch, recipe, "grpo_trainer_class")
    monkeypatch.setenv("HF_ENDPOINT", hub_server.url)
    out = tmp_path / "grpo"
    trainer = recipe.main(["--config", GRPO_TINY, "--output_dir", str(out), "--max_steps", "2",
                           "--max_conversations", "24", "--push_to_hub", "--hub_model_id", "user/rat-grpo",
                           "--hub_token", hub_server.token])
    assert_all_changed(trainer.model, start, "GRPO LoRA")
    assert all("lora_" in n for n in start)
    history = trainer.state.log_history
    for key in ("reward", "rewards/quality_reward/mean", "rewards/length_reward/mean", "rewards/format_reward/mean",
                "kl", "entropy", "completions/mean_length"):
        assert any(key in e for e in history), key
    assert trainer.processing_class.padding_side == "left"
    check_saved_lora_run(out, trainer, "grpo")
    pushed = hub_server.repos["user/rat-grpo"]
    files = pushed.commits[pushed.branches["main"]]
    assert {"model.safetensors", "config.json", "modeling_rat.py", "README.md", "tokenizer.json"} <= set(files)
    assert not any(f.startswith(("base_model/", "merged/", "adapter_")) for f in files)  # the merged model alone
    assert hub_server.token not in files["README.md"].decode()


def test_grpo_with_beta_and_no_lora_on_an_in_memory_model(tmp_path, monkeypatch):
    """TRL rebuilds the reference from the policy's name: the recipe saved the fresh model first, so the reference is
    the starting model, and every weight of the policy trains away from it."""
    recipe = load_recipe("grpo_chat")
    start = record_start(monkeypatch, recipe, "grpo_trainer_class")
    out = tmp_path / "full"
    trainer = recipe.main(["--config", GRPO_TINY, "--output_dir", str(out), "--max_steps", "2",
                           "--max_conversations", "8", "--use_peft", "false", "--beta", "0.1",
                           "--learning_rate", "0.001", "--reward_funcs", "length", "diversity"])
    ref = trainer.ref_model
    assert ref is not None and ref.name_or_path == str(out / "base_model")
    reference = dict(ref.named_parameters())
    assert reference.keys() == start.keys()
    for name, value in reference.items():
        assert torch.equal(value, start[name]), name  # the reference is the starting model
    assert_all_changed(trainer.model, start, "GRPO full")
    assert [e["kl"] for e in trainer.state.log_history if "kl" in e][-1] > 0
    from transformers import AutoModelForCausalLM

    ids = torch.randint(3, 300, (2, 10), generator=torch.Generator().manual_seed(0))
    reloaded = AutoModelForCausalLM.from_pretrained(out)  # the full model, with the card
    torch.testing.assert_close(logits(reloaded, ids), logits(trainer.model, ids), atol=1e-5, rtol=1e-5)
    assert "- grpo" in (out / "README.md").read_text() and not (out / "merged").exists()


def test_another_causal_lm_gets_a_pad_of_its_own(tmp_path):
    """A Llama whose tokenizer pads with EOS: the recipe adds `[PAD]`, resizes the embeddings, saves that base (the
    adapter's recorded base) and writes TRL's card (rat_hf's templates are for RAT/RxT)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    bpe.train_from_iterator(["hello there, how are you?", "fine, thanks."], trainers.BpeTrainer(
        vocab_size=280, special_tokens=["</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>", pad_token="</s>")  # no template
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
    llama.save_pretrained(tmp_path / "llama")
    tokenizer.save_pretrained(tmp_path / "llama")
    out = tmp_path / "sft"
    trainer = load_recipe("sft_chat").main(["--config", SFT_TINY, "--model_name_or_path", str(tmp_path / "llama"),
                                            "--output_dir", str(out), "--max_steps", "1",
                                            "--max_conversations", "8"])
    tok = trainer.processing_class
    assert tok.pad_token == "[PAD]" and tok.pad_token_id != tok.eos_token_id and len(tok) == len(tokenizer) + 1
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    assert type(merged).__name__ == "LlamaForCausalLM" and merged.config.vocab_size == len(tok)
    assert merged.config.pad_token_id == tok.pad_token_id
    assert "- sft" in (out / "merged" / "README.md").read_text()
    assert tok.chat_template and "<|assistant|>" in tok.apply_chat_template(  # rat_hf's template was added
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)


@pytest.mark.parametrize("name", ["grpo_chat", "sft_chat"])
def test_rxt_is_refused_in_one_line(tmp_path, monkeypatch, capsys, name):
    from rat_hf import RxTConfig
    from rat_hf.recipes.chat_common import run_cli

    RxTConfig(vocab_size=300, hidden_size=32, num_hidden_layers=1, num_attention_heads=4).save_pretrained(tmp_path)
    recipe = load_recipe(name)
    argv = ["--config", GRPO_TINY if name == "grpo_chat" else SFT_TINY, "--model_name_or_path", str(tmp_path),
            "--output_dir", str(tmp_path / "out"), "--max_conversations", "4"]
    with pytest.raises(ValueError, match="RxT .* not supported") as info:
        recipe.main(argv)
    assert "\n" not in str(info.value) and "memory" in str(info.value) and "RAT or another causal LM" in str(info.value)
    monkeypatch.setattr("sys.argv", [f"{name}.py", *argv])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(recipe.main, f"{name}.py")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"{name}.py: error: {name}.py: RxT (model_type 'rxt') is not supported")
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_bad_reward_name_fails_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        load_recipe("grpo_chat").main(["--config", GRPO_TINY, "--output_dir", str(tmp_path / "out"),
                                       "--reward_funcs", "quality", "nope"])
    assert not (tmp_path / "out").exists()


def test_seed_jsonl_becomes_sft_conversations_and_grpo_prompts(tmp_path):
    """The PPO-chat seed's lines (messages without roles, a bare text, scored or not): `--min_quality` drops the
    low-scored, SFT keeps conversations with an answer, GRPO cuts before each answer with `reference` and `quality`."""
    from rat_hf.recipes.chat_common import ChatDataArguments, load_conversations, prompt_dataset, sft_dataset
    from rat_hf.tokenization import train_bpe_tokenizer

    lines = [{"messages": [{"content": "Hello"}, {"content": "Hi there! How can I help?"}], "quality": 1.0},
             {"text": "Single response text", "quality": 0.8},
             {"messages": [{"content": "a"}, {"content": "b"}], "quality": 0.2},
             {"messages": [{"content": "x"}, {"content": "y"}, {"content": "z"}, {"content": "w"}]}]
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    conversations, label = load_conversations(ChatDataArguments(dataset=str(path), min_quality=0.5))
    assert label == "chats.jsonl" and conversations["quality"] == [1.0, 0.8, None]
    sft = sft_dataset(conversations)
    assert sft.column_names == ["messages"] and len(sft) == 2  # the bare text has no answer to imitate
    assert sft[0]["messages"] == [{"role": "user", "content": "Hello"},
                                  {"role": "assistant", "content": "Hi there! How can I help?"}]
    tokenizer = train_bpe_tokenizer(["Hello there", "x y z w"] * 4, vocab_size=300)
    prompts = prompt_dataset(conversations, tokenizer, max_prompt_length=64)
    assert [p[-1]["content"] for p in prompts["prompt"]] == ["Hello", "Single response text", "x", "z"]
    assert [len(p) for p in prompts["prompt"]] == [1, 1, 1, 3]  # the second answer's prompt is the history
    assert prompts["reference"] == ["Hi there! How can I help?", "", "y", "w"]
    assert prompts["quality"] == [1.0, 0.8, None, None]
    shortest = min(len(tokenizer.apply_chat_template(p, add_generation_prompt=True, return_dict=True)["input_ids"])
                   for p in prompts["prompt"])
    assert len(prompt_dataset(conversations, tokenizer, max_prompt_length=shortest)) < len(prompts)
    with pytest.raises(ValueError, match="every prompt is longer"):
        prompt_dataset(conversations, tokenizer, max_prompt_length=shortest - 1)
    with pytest.raises(ValueError, match="no such file"):
        load_conversations(ChatDataArguments(dataset=str(tmp_path / "missing.jsonl")))
