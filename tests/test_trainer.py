"""RatTrainer: gating statistics in the logs, exact resume, clear errors on broken checkpoints."""

import json
import os

import pytest
import torch
from transformers import TrainerCallback, TrainingArguments, default_data_collator

from rat_hf import RatConfig, RatForCausalLM
from rat_hf.recipes._config import from_seed_layout, load_config_file
from rat_hf.trainers import RatTrainer, check_checkpoint

datasets = pytest.importorskip("datasets")

TINY = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)


def random_dataset(n=48, length=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 97, (n, length), generator=g).tolist()
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})


def make_trainer(out, max_steps=6, resume_ok=True, **config):
    torch.manual_seed(0)
    model = RatForCausalLM(RatConfig(**{**TINY, **config}))
    args = TrainingArguments(
        output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=4, learning_rate=3e-3,
        lr_scheduler_type="cosine", warmup_steps=2, logging_steps=1, save_strategy="steps", save_steps=3,
        report_to="none", use_cpu=True, seed=7, disable_tqdm=True,
    )
    return RatTrainer(model=model, args=args, train_dataset=random_dataset(), data_collator=default_data_collator)


def test_logs_gating_statistics_perplexity_and_speed(tmp_path):
    trainer = make_trainer(tmp_path, gating_mode="reinforce", n_policies=3)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 6
    for key in ("lm_loss", "policy_loss", "perplexity", "tokens_per_second", "gate/entropy", "gate/entropy/layer_1",
                "gate/usage/layer_0/policy_2"):
        assert key in logs[0], key
    usage = sum(logs[-1][f"gate/usage/layer_0/policy_{j}"] for j in range(3))
    assert usage == pytest.approx(1.0, abs=1e-4)
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])]
    assert any("selector" in n for n in changed) and any("q_proj" in n for n in changed)


class StopAfter(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_resume_is_bitwise_exact(tmp_path):
    """Stop after step 3, resume from the checkpoint: same final weights and same losses as one uninterrupted run."""
    config = dict(gating_mode="reinforce", hidden_dropout=0.1)  # both RNG consumers: policy sampling and dropout
    full = make_trainer(tmp_path / "full", **config)
    full.train()
    interrupted = make_trainer(tmp_path / "part", **config)
    interrupted.add_callback(StopAfter(3))  # as if killed right after the step-3 checkpoint
    interrupted.train()
    resumed = make_trainer(tmp_path / "part", **config)
    resumed.train(resume_from_checkpoint=str(tmp_path / "part" / "checkpoint-3"))

    for (name, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name
    losses = lambda t: [e["loss"] for e in t.state.log_history if "loss" in e]  # noqa: E731
    assert losses(resumed)[-3:] == losses(full)[-3:]


def test_broken_checkpoints_give_clear_errors(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=3)
    trainer.train()
    ckpt = tmp_path / "checkpoint-3"
    check_checkpoint(str(ckpt))  # complete: no error

    weights = ckpt / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors is (corrupted or )?truncated"):
        make_trainer(tmp_path, max_steps=4).train(resume_from_checkpoint=str(ckpt))
    weights.write_bytes(data)

    (ckpt / "optimizer.pt").unlink()
    with pytest.raises(ValueError, match="incomplete: missing optimizer.pt"):
        check_checkpoint(str(ckpt))
    (ckpt / "trainer_state.json").write_text("{not json")
    with pytest.raises(ValueError):
        check_checkpoint(str(ckpt))


def test_seed_json_config_is_translated(tmp_path):
    seed = {
        "model": {"vocab_size": 30000, "d_model": 768, "n_layers": 12, "n_heads": 12, "n_policies": 3,
                  "max_seq_len": 2048, "dropout": 0.1, "use_rope": True, "tie_weights": True},
        "trainer": {"lr": 0.0005, "warmup_steps": 1000, "max_steps": 100000, "weight_decay": 0.1, "grad_clip": 1.0,
                    "accum_steps": 4},
        "dataset": {"dataset_name": "wikitext", "dataset_config": "wikitext-2-raw-v1", "seq_len": 1024,
                    "batch_size": 8, "num_samples": 10000},
        "tokenizer_path": "gpt2",
    }
    path = tmp_path / "seed.json"
    path.write_text(json.dumps(seed))
    flat = load_config_file(str(path))
    assert flat["learning_rate"] == 0.0005 and flat["max_grad_norm"] == 1.0 and flat["gradient_accumulation_steps"] == 4
    assert flat["dataset"] == "wikitext" and flat["per_device_train_batch_size"] == 8 and flat["tokenizer"] == "gpt2"
    assert RatConfig(**flat["model_config_overrides"]).hidden_size == 768
    with pytest.raises(ValueError, match="unknown key trainer.lrr"):
        from_seed_layout({"trainer": {"lrr": 1}})


def test_reinforce_terms_are_normalised_like_the_lm_loss():
    """Under gradient accumulation `num_items_in_batch` spans several micro-batches: every term scales with it."""
    torch.manual_seed(0)
    model = RatForCausalLM(RatConfig(**TINY, gating_mode="reinforce")).train()
    ids = torch.randint(0, 97, (2, 12))
    torch.manual_seed(1)
    alone = model(input_ids=ids, labels=ids)
    torch.manual_seed(1)
    split = model(input_ids=ids, labels=ids, num_items_in_batch=torch.tensor(4 * 2 * 11))  # 4 micro-batches' tokens
    torch.testing.assert_close(split.lm_loss, alone.lm_loss / 4)
    torch.testing.assert_close(split.policy_loss, alone.policy_loss / 4)


def test_config_equals_form_is_read(tmp_path):
    from rat_hf.recipes._config import parse_args
    from rat_hf.recipes.pretrain import DataArguments

    path = tmp_path / "c.yaml"
    path.write_text("seq_len: 77\n")
    (data,) = parse_args((DataArguments,), [f"--config={path}"])
    assert data.seq_len == 77
