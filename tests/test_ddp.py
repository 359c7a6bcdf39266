"""DDP with a model whose forward leaves parameters unused (RxT's LM steps never run the encoder or the memory
attention), with gradient checkpointing: two processes over gloo on CPU."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import TrainingArguments

from rat_hf import RatConfig, RatForCausalLM, RxTConfig, RxTForCausalLM
from rat_hf.trainers._ddp import configure_ddp_for_unused_parameters

SCRIPT = Path(__file__).with_name("ddp_rxt_train.py")
TINY_RXT = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                stm_size=8)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp_path, trainer: str, reentrant: bool, moe: bool = False) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()),
           str(SCRIPT), str(tmp_path / "out"), trainer, "1" if reentrant else "0", "1" if moe else "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)


@pytest.mark.parametrize("reentrant, moe", [(False, True), (True, False)], ids=["non-reentrant-moe", "reentrant"])
def test_rxt_trains_under_ddp_with_gradient_checkpointing(tmp_path, reentrant, moe):
    """Both ranks finish and hold identical weights (a MoE decoder uses different experts at every step)."""
    result = launch(tmp_path, "rat", reentrant, moe)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("DDP_OK") == 2, result.stdout[-2000:]


def test_choice_follows_the_checkpointing_kind_and_leaves_user_choices(tmp_path):
    rxt = RxTForCausalLM(RxTConfig(**TINY_RXT))
    plain = TrainingArguments(output_dir=str(tmp_path), gradient_checkpointing=True, report_to=[])
    assert "find_unused" in configure_ddp_for_unused_parameters(rxt, plain) and plain.ddp_find_unused_parameters
    reentrant = TrainingArguments(output_dir=str(tmp_path), gradient_checkpointing=True, report_to=[],
                                  gradient_checkpointing_kwargs={"use_reentrant": True})
    assert "static_graph" in configure_ddp_for_unused_parameters(rxt, reentrant) and reentrant.ddp_static_graph
    chosen = TrainingArguments(output_dir=str(tmp_path), ddp_find_unused_parameters=False, report_to=[])
    assert configure_ddp_for_unused_parameters(rxt, chosen) is None and chosen.ddp_find_unused_parameters is False
    moe = RxTForCausalLM(RxTConfig(**TINY_RXT, num_experts=4, num_experts_per_tok=1, moe_intermediate_size=32))
    moe_reentrant = TrainingArguments(output_dir=str(tmp_path), gradient_checkpointing=True, report_to=[],
                                      gradient_checkpointing_kwargs={"use_reentrant": True})
    with pytest.warns(UserWarning, match="use_reentrant"):  # neither DDP setting can work: say so
        assert configure_ddp_for_unused_parameters(moe, moe_reentrant) is None
    on_the_model = TrainingArguments(output_dir=str(tmp_path), report_to=[])
    rxt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})  # before the Trainer
    assert "static_graph" in configure_ddp_for_unused_parameters(rxt, on_the_model)
    rat = RatForCausalLM(RatConfig(vocab_size=97, hidden_size=32, num_hidden_layers=1, num_attention_heads=4))
    untouched = TrainingArguments(output_dir=str(tmp_path), report_to=[])
    assert configure_ddp_for_unused_parameters(rat, untouched) is None  # every RAT parameter is used
    assert untouched.ddp_find_unused_parameters is None
