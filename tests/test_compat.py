"""rat_hf.compat: the seed's documented examples (arjun988/RAT documentation.md), with only the import line changed.

Sizes and step counts are scaled down to keep the tests fast, and the tokenizer is a small trained BPE (the docs'
`AutoTokenizer.from_pretrained("gpt2")` needs a download); everything else is the examples' code.
"""

import json
import logging

import pytest
import torch
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, Cache

from rat_hf import RatForCausalLM, cli
from rat_hf.compat import (
    RAT,
    ModelCheckpoint,
    RATDataLoader,
    RATDataset,
    RATGenerator,
    RATLogger,
    RATTrainer,
    get_optimal_batch_size,
    validate_model_config,
)
from rat_hf.tokenization import train_bpe_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: tiny models run on one thread

SMALL = dict(d_model=32, n_layers=2, n_heads=4, n_policies=3, max_seq_len=128)


@pytest.fixture(scope="module")
def tokenizer():
    texts = [f"The future of AI is number {i}; the policies gate every head." for i in range(200)]
    return train_bpe_tokenizer(texts, vocab_size=300)


def small_rat(tokenizer, seed=0, **overrides):
    torch.manual_seed(seed)
    return RAT(vocab_size=tokenizer.vocab_size, **{**SMALL, **overrides})


# --- RAT ------------------------------------------------------------------------------------------------------------
def test_rat_defaults_are_the_seeds():
    with torch.device("meta"):  # no memory, no init: the 85M-parameter default is only inspected
        model = RAT(vocab_size=30000)
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.n_policies) == (768, 12,
                                                                                                              12, 3)
    assert config.max_position_embeddings == 2048 and config.hidden_dropout == config.attention_dropout == 0.1
    assert config.intermediate_size == 4 * 768 and config.use_rope and config.tie_word_embeddings
    assert (model.d_model, model.n_layers, model.n_heads, model.max_seq_len, model.vocab_size) == (768, 12, 12, 2048,
                                                                                                     30000)
    assert isinstance(model, RatForCausalLM)


def test_rat_seed_forward(tokenizer):
    model = small_rat(tokenizer).eval()
    input_ids = torch.randint(0, tokenizer.vocab_size, (2, 12))  # batch_size=2, seq_len=12
    logits = model(input_ids)
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, 12, tokenizer.vocab_size)
    with torch.no_grad():
        first, kv = model(input_ids[:, :8], use_cache=True)
        rest, kv = model(input_ids[:, 8:], past_kvs=kv, use_cache=True)
        assert isinstance(kv, Cache)
        torch.testing.assert_close(torch.cat([first, rest], 1), logits.detach(), atol=1e-5, rtol=0)
        out = model(input_ids=input_ids, labels=input_ids)  # keyword calls: the transformers model
        assert torch.equal(out.logits, logits.detach()) and out.loss is not None
        mask = torch.ones_like(input_ids)
        assert torch.equal(model(input_ids, mask), model(input_ids=input_ids, attention_mask=mask).logits)


def test_rat_saves_as_a_plain_rat_checkpoint(tokenizer, tmp_path):
    model = small_rat(tokenizer).eval()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["RatForCausalLM"]
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_rat.RatForCausalLM"
    assert not (tmp_path / "compat.py").exists() and type(model) is RAT
    ids = torch.randint(0, tokenizer.vocab_size, (1, 9))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is RatForCausalLM
    assert torch.equal(reloaded(input_ids=ids).logits, model(ids))
    again = RAT.from_pretrained(tmp_path).eval()
    assert type(again) is RAT and torch.equal(again(ids), model(ids))


def test_custom_configuration_example():
    config = {
        'vocab_size': 500, 'd_model': 64, 'n_layers': 2, 'n_heads': 4, 'n_policies': 5, 'max_seq_len': 256,
        'dropout': 0.05, 'mlp_ratio': 4, 'use_rope': True, 'tie_weights': True, 'use_checkpointing': True,
    }
    validated_config = validate_model_config(config)
    model = RAT(**validated_config)
    assert model.config.n_policies == 5 and any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    assert sum(p.numel() for p in model.parameters()) == model.num_parameters()


# --- validate_model_config ------------------------------------------------------------------------------------------
def test_validate_model_config_example():
    config = {'vocab_size': 30000, 'd_model': 768, 'n_layers': 12, 'n_heads': 12, 'max_seq_len': 2048}
    validated_config = validate_model_config(config)
    assert validated_config == {**config, 'dropout': 0.1, 'mlp_ratio': 4, 'use_rope': True, 'tie_weights': True,
                                'use_checkpointing': False, 'n_policies': 3}
    assert config == {'vocab_size': 30000, 'd_model': 768, 'n_layers': 12, 'n_heads': 12, 'max_seq_len': 2048}


@pytest.mark.parametrize("change, message", [
    (dict(vocab_size=None), "Missing required parameter: vocab_size"),
    (dict(d_model=100), "d_model=100 must be divisible by n_heads"),
    (dict(n_layers=0), "RatConfig.num_hidden_layers=0 is invalid"),
    (dict(dropout=1.5), "RatConfig.hidden_dropout=1.5 is invalid"),
    (dict(n_layer=12), "Unknown parameter: n_layer"),
])
def test_validate_model_config_errors(change, message):
    config = {'vocab_size': 30000, 'd_model': 768, 'n_layers': 12, 'n_heads': 12, 'max_seq_len': 2048, **change}
    try:
        validate_model_config({k: v for k, v in config.items() if v is not None})
    except ValueError as e:
        assert message in str(e)
    else:
        raise AssertionError("no ValueError")


# --- RATTrainer -----------------------------------------------------------------------------------------------------
def test_training_loop_example(tokenizer, tmp_path):
    model = small_rat(tokenizer)
    trainer = RATTrainer(model=model, tokenizer=tokenizer, lr=1e-3, max_steps=10000, warmup_steps=2, device="cpu",
                         checkpoint_dir=str(tmp_path / "checkpoints"))
    input_seq = torch.randint(0, tokenizer.vocab_size, (4, 16))
    target_seq = torch.randint(0, tokenizer.vocab_size, (4, 16))
    losses = []
    for step in range(6):
        metrics = trainer.train_step(input_seq, target_seq)
        losses.append(metrics['loss'])
        print(f"Step {step}: Loss={metrics['loss']:.4f}, PPL={metrics['perplexity']:.2f}")
    assert {"loss", "perplexity", "learning_rate", "step", "tokens_processed", "forward_time",
            "gradient_norm"} <= set(metrics)
    assert metrics["step"] == trainer.step_count == 6 and losses[-1] < losses[0]
    assert metrics["tokens_processed"] == 6 * 4 * 16
    assert metrics["learning_rate"] > 0 and trainer.scheduler.get_last_lr()[0] == metrics["learning_rate"]
    stats = trainer.get_training_stats()
    assert stats["current_step"] == 6 and stats["total_steps"] == 6 and stats["progress_percent"] == pytest.approx(0.06)
    path = trainer.save_checkpoint(str(tmp_path / "rat_checkpoint.pt"))
    assert AutoModelForCausalLM.from_pretrained(path).num_parameters() == model.num_parameters()


def test_trainer_accumulates_and_ignores_padding(tokenizer, tmp_path):
    model = small_rat(tokenizer, dropout=0.0)
    trainer = RATTrainer(model, tokenizer, accum_steps=2, device="cpu", checkpoint_dir=str(tmp_path))
    x = torch.randint(3, tokenizer.vocab_size, (2, 8))
    first = trainer.train_step(x, x.roll(-1, 1))
    assert "gradient_norm" not in first and trainer.training_stats["total_steps"] == 0
    assert "gradient_norm" in trainer.train_step(x, x.roll(-1, 1)) and trainer.training_stats["total_steps"] == 1
    padded = x.roll(-1, 1).clone()
    padded[:, 4:] = tokenizer.pad_token_id
    with torch.no_grad():
        logits = model(input_ids=x).logits[:, :4]
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x.roll(-1, 1)[:, :4].flatten())
    assert trainer.train_step(x, padded)["loss"] == pytest.approx(expected.item(), abs=1e-5)


def test_trainer_checkpoint_round_trip_is_exact(tokenizer, tmp_path):
    def batch(seed):
        g = torch.Generator().manual_seed(seed)
        return torch.randint(0, tokenizer.vocab_size, (2, 16), generator=g), torch.randint(
            0, tokenizer.vocab_size, (2, 16), generator=g)

    trainer = RATTrainer(small_rat(tokenizer), tokenizer, lr=1e-3, warmup_steps=2, max_steps=50, device="cpu",
                         checkpoint_dir=str(tmp_path / "a"))
    for seed in range(3):
        torch.manual_seed(seed)  # dropout
        trainer.train_step(*batch(seed))
    path = trainer.save_checkpoint()
    assert path.endswith("checkpoint_step_000003")
    resumed = RATTrainer(small_rat(tokenizer, seed=1), tokenizer, lr=1e-3, warmup_steps=2, max_steps=50,
                         device="cpu", checkpoint_dir=str(tmp_path / "b"))
    resumed.load_checkpoint(path)
    assert resumed.step_count == 3 and resumed.training_stats["total_steps"] == 3
    for (name, a), b in zip(trainer.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    for trained in (trainer, resumed):  # optimizer moments and schedule came back too: the next step is identical
        torch.manual_seed(7)
        trained.train_step(*batch(7))
    assert resumed.scheduler.get_last_lr() == trainer.scheduler.get_last_lr()
    for (name, a), b in zip(trainer.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    state = torch.load(f"{path}/training_state.pt", weights_only=True)  # no pickled modules
    assert state["step"] == 3 and "optimizer_state_dict" in state


def test_trainer_refuses_reinforce_gating(tokenizer):
    with pytest.raises(ValueError, match="gating_mode='reinforce'"):
        RATTrainer(small_rat(tokenizer, gating_mode="reinforce"), tokenizer, device="cpu")


# --- RATGenerator ---------------------------------------------------------------------------------------------------
def test_generation_example(tokenizer):
    model = small_rat(tokenizer)
    generator = RATGenerator(model, tokenizer)
    prompt = "The future of artificial intelligence"
    greedy_text = generator.generate(prompt, max_len=8, do_sample=False)
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    expected = model.generate(ids, max_new_tokens=8, do_sample=False, repetition_penalty=1.1,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    assert greedy_text == tokenizer.decode(expected[0], skip_special_tokens=True)
    assert greedy_text.startswith(prompt)
    torch.manual_seed(0)
    sampled_text = generator.generate(prompt, max_len=8, temperature=0.8, top_k=40, top_p=0.9)
    assert isinstance(sampled_text, str) and sampled_text.startswith(prompt)
    multiple_texts = generator.generate(prompt, max_len=6, num_return_sequences=3, temperature=1.0)
    assert isinstance(multiple_texts, list) and len(multiple_texts) == 3
    assert generator.generate(prompt, max_len=4, do_sample=False, num_return_sequences=2) == [
        generator.generate(prompt, max_len=4, do_sample=False)] * 2
    for bad in (dict(prompt=" "), dict(prompt="x", temperature=0), dict(prompt="x", max_len=0)):
        with pytest.raises(ValueError):
            generator.generate(**bad)


# --- data -----------------------------------------------------------------------------------------------------------
def test_dataset_example():
    tokenized_texts = [
        [1, 2, 3, 4, 5, 6, 7, 8, 9, 10] * 10,  # Long sequence
        [1, 2, 3, 4, 5, 6, 7, 8, 9, 10],  # Shorter sequence
        [1, 2, 3],  # too short: dropped, as in the seed
    ]
    dataset = RATDataset(tokenized_texts=tokenized_texts, seq_len=64, pad_token_id=0)
    stats = dataset.get_statistics()
    assert stats == {"num_sequences": 2, "avg_length": 55.0, "max_length": 100, "min_length": 10,
                     "total_tokens": 110}
    dataloader = DataLoader(dataset, batch_size=4, shuffle=True)
    for input_ids, target_ids in dataloader:
        assert input_ids.shape == target_ids.shape == (2, 64) and input_ids.dtype == torch.long
        break
    short_input, short_target = dataset[1]
    assert short_input[:10].tolist() == list(range(1, 11)) and short_input[10:].eq(0).all()
    assert short_target[:9].tolist() == list(range(2, 11)) and short_target[9:].eq(0).all()
    long_input, long_target = dataset[0]  # a random window of 65 tokens: target is input shifted by one
    assert torch.equal(long_input[1:], long_target[:-1])
    assert ((long_input[1:] - long_input[:-1]) % 10 == 1).all()  # a contiguous window of 1..10 repeated
    with pytest.raises(ValueError, match="empty"):
        RATDataset([])


def test_data_loader_on_the_offline_corpus(tokenizer):
    data_loader = RATDataLoader(dataset_name="default", tokenizer=tokenizer, seq_len=32, batch_size=4,
                                num_samples=20, max_texts=50)
    train_dataloader = data_loader.prepare_dataset()
    assert len(train_dataloader) == 5
    for input_ids, target_ids in train_dataloader:
        assert input_ids.shape == target_ids.shape == (4, 32)
        assert torch.equal(input_ids[:, 1:], target_ids[:, :-1])
        break


def test_data_loader_hub_name_offline_is_a_clear_error(tokenizer, monkeypatch):
    monkeypatch.setattr(cli._common, "hub_unreachable", lambda: "test: no network")
    with pytest.raises(ValueError, match="offline, use dataset_name='default'"):
        RATDataLoader(dataset_name="no-such-org/no-such-dataset", tokenizer=tokenizer).prepare_dataset()
    with pytest.raises(ValueError, match="Tokenizer is required"):
        RATDataLoader()


# --- ModelCheckpoint, batch size, logger ----------------------------------------------------------------------------
def test_model_checkpoint_example_and_rotation(tokenizer, tmp_path):
    checkpoint_manager = ModelCheckpoint(str(tmp_path / "my_checkpoints"), max_checkpoints=3)
    model = small_rat(tokenizer)
    trainer = RATTrainer(model, tokenizer=None, device="cpu", checkpoint_dir=str(tmp_path / "unused"))
    for step in (1000, 2000, 3000, 4000, 5000):
        checkpoint_path = checkpoint_manager.save(model=model, optimizer=trainer.optimizer,
                                                  scheduler=trainer.scheduler, step=step, loss=2.5,
                                                  additional_info={"epoch": 5, "validation_loss": 2.8})
    assert [p.name for p in checkpoint_manager.checkpoints()] == [f"checkpoint_step_00{s}000" for s in (3, 4, 5)]
    assert sorted(p.name for p in (tmp_path / "my_checkpoints").iterdir()) == [
        f"checkpoint_step_00{s}000" for s in (3, 4, 5)]
    other = small_rat(tokenizer, seed=3)
    info = checkpoint_manager.load(checkpoint_path, other, trainer.optimizer, trainer.scheduler)
    assert info["step"] == 5000 and info["loss"] == 2.5 and info["epoch"] == 5 and info["validation_loss"] == 2.8
    for (name, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), name
    assert json.loads((tmp_path / "my_checkpoints/checkpoint_step_005000/checkpoint.json").read_text())["step"] == 5000
    with pytest.raises(FileNotFoundError):
        checkpoint_manager.load(str(tmp_path / "nope"), model)


def test_optimal_batch_size_on_cpu(tokenizer):
    model = small_rat(tokenizer)
    optimal_batch = get_optimal_batch_size(model=model, seq_len=512, max_memory_gb=8.0, device=torch.device("cpu"))
    assert 1 <= optimal_batch <= 64
    assert get_optimal_batch_size(model, seq_len=64, max_memory_gb=0.01, device="cpu") <= get_optimal_batch_size(
        model, seq_len=64, max_memory_gb=0.1, device="cpu")
    with torch.device("meta"):
        large = RAT(vocab_size=50000, d_model=1024, n_layers=24, n_heads=16)
    assert get_optimal_batch_size(large, seq_len=512, max_memory_gb=8.0, device="cpu") == 1


def test_logger_example(tokenizer, tmp_path, capsys):
    logger = RATLogger("MyRAT", log_file=str(tmp_path / "training.log"))
    model = small_rat(tokenizer)
    logger.log_model_info(model, "My Custom RAT")
    for step in range(3):
        loss = 3.5 - step * 0.01
        logger.log_training_step(step, loss, 1e-4, perplexity=27.1)
    logger.log_memory_usage(torch.device("cpu"))
    logger.debug("only in the file")
    RATLogger("MyRAT", log_file=str(tmp_path / "training.log")).warning("once")  # same name: no duplicate handlers
    err = capsys.readouterr().err
    assert "=== My Custom RAT Model Summary ===" in err and f"Total Parameters: {model.num_parameters():,}" in err
    assert "Step      2 | Loss: 3.4800 | LR: 1.00e-04 | perplexity: 27.1000" in err
    assert "Memory (cpu): peak resident" in err and "only in the file" not in err and err.count("once") == 1
    log = (tmp_path / "training.log").read_text()
    assert "MyRAT - DEBUG - test_logger_example" in log and "only in the file" in log
    assert logging.getLogger("MyRAT").propagate is False
