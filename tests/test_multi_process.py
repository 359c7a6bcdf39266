"""`accelerate launch` of recipes/pretrain_rat.py on two processes over gloo on CPU (what `bench/multi_gpu.py --cpu`
runs, cut to seconds): DDP trains one model that reloads through the Auto classes, a two-process checkpoint resumes
exactly, one process at the same global batch gives the same losses, and a launch whose processes would not train
together (FSDP on CPU, processes that see no distributed set-up) is refused in one line instead of running."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

from rat_hf.recipes._config import check_distributed_launch
from rat_hf.recipes.pretrain import train

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes/pretrain_rat.py"
CONFIGS = ROOT / "recipes/accelerate_configs"
STEPS, PER_PROCESS_BATCH = 4, 8
# the tiny config, 4 steps logged one by one, checkpoints at steps 2 and 4 (the tiny config keeps only the last)
RUN = ["--config", str(ROOT / "recipes/configs/pretrain_rat_tiny.yaml"), "--max_steps", str(STEPS),
       "--logging_steps", "1", "--save_steps", "2", "--save_total_limit", "3", "--model_card", "false",
       "--disable_tqdm", "true"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(cwd, args, config_file=None) -> subprocess.CompletedProcess:
    """Two processes of the recipe: `--multi_gpu` (gloo on CPU), or an accelerate config file, as a user types it."""
    how = ["--config_file", str(config_file)] if config_file else ["--multi_gpu", "--num_machines", "1"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *how, "--num_processes", "2",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           str(RECIPE), *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=cwd)


def losses(output_dir: Path, steps: int = STEPS) -> dict[int, dict]:
    """step -> the training log of that step, from the last checkpoint's trainer_state.json."""
    state = json.loads((output_dir / f"checkpoint-{steps}" / "trainer_state.json").read_text())
    return {entry["step"]: entry for entry in state["log_history"] if "loss" in entry}


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """One 2-process DDP run, shared by the tests below (each launch costs two interpreters' start-up)."""
    tmp = tmp_path_factory.mktemp("ddp")
    result = launch(tmp, [*RUN, "--output_dir", tmp / "out", "--per_device_train_batch_size", PER_PROCESS_BATCH])
    assert result.returncode == 0, result.stderr[-4000:]
    return tmp / "out", result


def test_two_processes_train_one_model_that_reloads_through_the_auto_classes(ddp_run):
    out, result = ddp_run
    assert (result.stdout + result.stderr).count("rat_hf.pretrain: model:") == 2  # two processes ...
    last = out / f"checkpoint-{STEPS}"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", f"checkpoint-{STEPS}"]
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in last.iterdir()}  # ... that trained together
    assert json.loads((last / "trainer_state.json").read_text())["global_step"] == STEPS

    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "RatForCausalLM"
    saved = load_file(last / "model.safetensors")
    reloaded = model.state_dict()
    assert saved and all(torch.equal(reloaded[k], v) for k, v in saved.items())  # the final step's weights
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("The list type", return_tensors="pt").input_ids
    generated = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, ids.shape[1] + 3)


def test_a_two_process_checkpoint_resumes_exactly(ddp_run, tmp_path):
    out, _ = ddp_run
    resumed = tmp_path / "resumed"
    result = launch(tmp_path, [*RUN, "--output_dir", resumed, "--per_device_train_batch_size", PER_PROCESS_BATCH,
                               "--resume_from_checkpoint", out / "checkpoint-2"])
    assert result.returncode == 0, result.stderr[-4000:]
    first, again = losses(out), losses(resumed)
    assert [again[s]["loss"] for s in (3, 4)] == [first[s]["loss"] for s in (3, 4)]
    assert [again[s]["grad_norm"] for s in (3, 4)] == [first[s]["grad_norm"] for s in (3, 4)]
    final, final_again = load_file(out / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.equal(final_again[k], v) for k, v in final.items())


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    """One process, in this interpreter, at the DDP run's global batch: the same per-device batch, accumulated over
    two micro-batches."""
    out = tmp_path_factory.mktemp("one") / "out"
    train([*RUN, "--output_dir", str(out), "--per_device_train_batch_size", str(PER_PROCESS_BATCH),
           "--gradient_accumulation_steps", "2"])
    return out


def test_one_process_at_the_same_global_batch_gives_the_same_losses(ddp_run, one_process_run):
    """Steps see the same sequences (accelerate shards each global batch of the seeded sampler between the
    processes; one process accumulates them), so the losses agree to float rounding (measured: <= 3e-7 relative)
    while they move by ~1e-2 from step to step."""
    two, one = losses(ddp_run[0]), losses(one_process_run)
    assert len({round(two[step]["loss"], 3) for step in two}) == STEPS  # a wrong batch or step would show
    for step in range(1, STEPS + 1):
        assert one[step]["loss"] == pytest.approx(two[step]["loss"], rel=1e-5, abs=0), step
        assert one[step]["grad_norm"] == pytest.approx(two[step]["grad_norm"], rel=1e-5, abs=0), step


SHORT = 2  # steps of the runs below, which only check what is logged
SHORT_RUN = [*RUN, "--max_steps", str(SHORT), "--per_device_train_batch_size", "4", "--gradient_accumulation_steps",
             "2", "--save_steps", str(SHORT)]


@pytest.fixture(scope="module")
def ddp_checkpointing_run(tmp_path_factory):
    """Two processes accumulating two micro-batches with gradient checkpointing. `Trainer` then builds DDP with
    `find_unused_parameters=False`, which returns the model's outputs uncloned: `lm_loss` is the very tensor
    `Trainer` multiplies by the number of processes in place (in `ddp_run` DDP clones it first)."""
    tmp = tmp_path_factory.mktemp("ddp_ckpt")
    result = launch(tmp, [*SHORT_RUN, "--output_dir", tmp / "out", "--gradient_checkpointing", "true"])
    assert result.returncode == 0, result.stderr[-4000:]
    return tmp / "out"


@pytest.mark.parametrize("run", ["two processes", "gradient accumulation", "two processes, checkpointing"])
def test_lm_loss_is_the_loss(run, request):
    """The tiny config trains without reinforce gating, so `loss` is `lm_loss`: the two logs must agree (before the
    fix `lm_loss` read 1/processes of `loss` under DDP and 1/accumulation steps with accumulation)."""
    fixture, steps = {"two processes": ("ddp_run", STEPS), "gradient accumulation": ("one_process_run", STEPS),
                      "two processes, checkpointing": ("ddp_checkpointing_run", SHORT)}[run]
    out = request.getfixturevalue(fixture)
    out = out[0] if isinstance(out, tuple) else out
    logged = losses(out, steps)
    assert sorted(logged) == list(range(1, steps + 1))
    for step, entry in logged.items():
        assert entry["lm_loss"] == pytest.approx(entry["loss"], rel=1e-5), step
        assert entry["perplexity"] == pytest.approx(torch.tensor(entry["loss"]).exp().item(), rel=1e-3), step


def test_policy_loss_is_on_the_scale_of_the_loss(tmp_path):
    """Reinforce gating with accumulation: `loss = lm_loss + policy_loss_coef * policy_loss` per micro-batch, each
    part divided by the step's tokens, so the logged parts must add up to the logged `loss` (before the fix both
    read half their value at two accumulation steps)."""
    model = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
             "gating_mode": "reinforce", "n_policies": 2, "policy_loss_coef": 0.5}
    out = tmp_path / "out"
    train([*map(str, SHORT_RUN), "--output_dir", str(out), "--model_config_overrides", json.dumps(model)])
    logged = losses(out, SHORT)
    assert sorted(logged) == list(range(1, SHORT + 1))
    for step, entry in logged.items():
        assert abs(entry["policy_loss"]) > 1e-3, step  # a part that matters to the sum
        assert entry["lm_loss"] + 0.5 * entry["policy_loss"] == pytest.approx(entry["loss"], rel=1e-5), step


@pytest.mark.parametrize("config, extra, message", [
    ("fsdp.yaml", [], "asks for FSDP, which accelerate runs on GPUs only: on MULTI_CPU it would silently train "
                      "with DDP"),
    ("multi_gpu.yaml", ["--use_cpu", "false"], "2 processes were launched (WORLD_SIZE=2) but each trains alone"),
], ids=["fsdp-on-cpu", "processes-that-train-alone"])
def test_a_launch_that_cannot_train_together_is_refused(tmp_path, config, extra, message):
    """Without the check, FSDP on CPU runs plain DDP, and processes without `--use_cpu true` on a machine without
    GPUs each train their own model into the same output_dir; both finish with exit code 0."""
    result = launch(tmp_path, [*RUN, "--output_dir", tmp_path / "out", *extra], config_file=CONFIGS / config)
    assert result.returncode != 0
    # each process prints the line; the two writes can land on one line of the shared stderr, so count occurrences
    errors = result.stderr.split("rat-train: error:")[1:]
    assert len(errors) == 2 and all(message in error for error in errors), result.stderr[-3000:]
    assert not (tmp_path / "out").exists()  # refused before any work


def test_the_check_reads_what_the_launcher_asked_for(tmp_path, monkeypatch):
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    assert args.world_size == 1
    check_distributed_launch(args)  # a plain one-process run
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ValueError, match=r"3 processes were launched .* 3 independent models"):
        check_distributed_launch(args)
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ValueError, match="asks for FSDP"):
        check_distributed_launch(args)
