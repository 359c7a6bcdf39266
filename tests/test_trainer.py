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
    for key in ("lm_loss", "policy_loss", "perplexity", "tokens_per_second", "gate/entropy", "gate/usage_max",
                "gate/entropy/layer_1", "gate/usage/layer_0/policy_2"):
        assert key in logs[0], key
    usage = sum(logs[-1][f"gate/usage/layer_0/policy_{j}"] for j in range(3))
    assert usage == pytest.approx(1.0, abs=1e-4)
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])]
    assert any("selector" in n for n in changed) and any("q_proj" in n for n in changed)


@pytest.mark.parametrize("disable_tqdm", [True, False])
def test_console_log_lines_stay_short(tmp_path, capsys, disable_tqdm):
    """Per-layer gate statistics go to log_history/TensorBoard only: a printed step log is one short line."""
    trainer = make_trainer(tmp_path, max_steps=2, gating_mode="reinforce", n_policies=4, num_hidden_layers=6)
    trainer.args.disable_tqdm = disable_tqdm
    trainer.args.save_strategy = "no"
    if not disable_tqdm:  # make_trainer disables tqdm: put the progress bar back as Trainer would
        from transformers import PrinterCallback, ProgressCallback

        trainer.remove_callback(PrinterCallback)
        trainer.add_callback(ProgressCallback)
        trainer = RatTrainer(model=trainer.model, args=trainer.args, train_dataset=trainer.train_dataset,
                             data_collator=default_data_collator)
    seen = []  # what a reporting integration (TensorBoard, trackio, ...) receives: everything

    class Recorder(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            seen.append(dict(logs))

    trainer.add_callback(Recorder)
    trainer.train()
    assert "gate/usage/layer_5/policy_3" in seen[0] and "gate/entropy/layer_0" in seen[0]
    captured = capsys.readouterr()
    lines = [line for line in (captured.out + captured.err).splitlines() if "'loss'" in line]
    assert len(lines) == 2, captured
    for line in lines:
        assert "gate/entropy" in line and "gate/usage_max" in line and "layer_" not in line, line
        assert len(line) < 320, f"{len(line)} characters: {line}"
    step_log = [e for e in trainer.state.log_history if "loss" in e][0]
    assert "gate/usage/layer_5/policy_3" in step_log and "gate/entropy/layer_5" in step_log  # the details are kept


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

    def one_line_error(match):  # resuming raises a single line naming the file, before anything is loaded
        with pytest.raises(ValueError, match=match) as info:
            make_trainer(tmp_path, max_steps=4).train(resume_from_checkpoint=str(ckpt))
        assert "\n" not in str(info.value) and "checkpoint-3" in str(info.value)

    for name, damage, match in [
        ("optimizer.pt", lambda b: b[: len(b) // 2], "optimizer.pt is corrupted or truncated"),
        ("optimizer.pt", lambda b: b[:-1], "optimizer.pt is corrupted or truncated"),
        ("scheduler.pt", lambda b: b"garbage" * 10, "scheduler.pt is corrupted or truncated"),
        ("rng_state.pth", lambda b: b[: len(b) // 2], "rng_state.pth is corrupted or truncated"),
        ("trainer_state.json", lambda b: b"{}", "trainer_state.json is corrupted .*'global_step' missing"),
        ("trainer_state.json", lambda b: b"[]", "trainer_state.json is corrupted"),
        ("trainer_state.json", lambda b: b"{not json", "trainer_state.json is corrupted"),
    ]:
        original = (ckpt / name).read_bytes()
        (ckpt / name).write_bytes(damage(original))
        one_line_error(match)
        (ckpt / name).write_bytes(original)
    check_checkpoint(str(ckpt))  # restored: fine again

    (ckpt / "optimizer.pt").unlink()
    with pytest.raises(ValueError, match="incomplete: missing optimizer.pt"):
        check_checkpoint(str(ckpt))


def test_missing_rng_state_warns_that_resume_is_not_exact(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=3)
    trainer.train()
    ckpt = tmp_path / "checkpoint-3"
    (ckpt / "rng_state.pth").rename(ckpt / "rng_state_0.pth")  # as if saved by a 2-process run
    with pytest.warns(UserWarning, match=r"checkpoint-3' has no rng_state.pth \(it has rng_state_0.pth.*NOT exact"):
        make_trainer(tmp_path, max_steps=4).train(resume_from_checkpoint=str(ckpt))
    with pytest.warns(UserWarning, match=r"no rng_state_1.pth"):  # what process 1 of 2 looks for
        check_checkpoint(str(ckpt), world_size=2, process_index=1)


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


def test_gate_diagnostics_and_the_gates_off_evaluation(tmp_path):
    """Training logs say how far the gates are from 1 and how much the policies disagree; evaluation adds the loss
    with every gate at 1 and the difference (`eval_gate_gain`)."""
    trainer = make_trainer(tmp_path, max_steps=2, gating_mode="reinforce", n_policies=3, initializer_range=0.2)
    trainer.args.save_strategy = "no"
    trainer.eval_dataset = random_dataset(n=8, seed=1)
    trainer.train()
    log = [entry for entry in trainer.state.log_history if "loss" in entry][0]
    for key in ("gate/deviation", "gate/disagreement", "gate/deviation/layer_1", "gate/disagreement/layer_0"):
        assert key in log, key
    assert log["gate/deviation"] > 0 and 0 < log["gate/disagreement"] < 1
    metrics = trainer.evaluate()
    batch = default_data_collator(list(trainer.eval_dataset))  # one evaluation batch of 8
    model = trainer.model.eval()
    with torch.no_grad():
        expected = model(**batch).loss.item(), model(**batch, gates_off=True).loss.item()
    assert metrics["eval_loss"] == pytest.approx(expected[0], rel=1e-5)
    assert metrics["eval_loss_gates_off"] == pytest.approx(expected[1], rel=1e-5)
    assert metrics["eval_gate_gain"] == pytest.approx(expected[1] - expected[0], abs=1e-5)
    assert abs(metrics["eval_gate_gain"]) > 1e-4  # the gates do something here
    assert trainer.evaluate()["eval_loss"] == metrics["eval_loss"]  # the gates are back on afterwards
    logged = [e for e in trainer.state.log_history if "eval_loss_gates_off" in e]
    assert len(logged) == 2 and "eval_gate_gain" in logged[0]

    quiet = RatTrainer(model=trainer.model, args=trainer.args, eval_dataset=trainer.eval_dataset,
                       data_collator=default_data_collator, eval_gates_off=False)
    assert "eval_loss_gates_off" not in quiet.evaluate()
