"""`bench/bench_chat_rl.py --smoke` runs end to end on CPU (GRPO and PPO, RAT and Llama, tiny models) and records what
it says it measures: per-iteration rollout and update seconds, the reward of each rollout, RAT/Llama ratios, a PNG."""

import json
import os
import runpy
import sys

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("datasets")
pytest.importorskip("matplotlib")

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


def test_chat_rl_bench_smoke(tmp_path):
    out, png = tmp_path / "chat_rl.json", tmp_path / "chat_rl.png"
    path = os.path.join(BENCH, "bench_chat_rl.py")
    argv, threads = sys.argv, torch.get_num_threads()
    sys.argv = [path, "--smoke", "--out", str(out), "--plot", str(png)]
    try:
        runpy.run_path(path, run_name="__main__")
    finally:
        sys.argv = argv
        torch.set_num_threads(threads)
    record = json.loads(out.read_text())
    assert record["device"] == "cpu" and record["command"].startswith(f"python {path} --smoke")
    assert {"date", "torch", "transformers", "trl", "args", "wall_s"} <= set(record)
    rows = record["rows"]
    assert [(r["trainer"], r["model"]) for r in rows] == [("grpo", "llama"), ("grpo", "rat"), ("ppo", "llama"),
                                                          ("ppo", "rat")]
    n = record["args"]["iterations"]
    for r in rows:
        per = r["per_iteration"]
        assert len(per["reward"]) == len(per["rollout_s"]) == len(per["update_s"]) == n
        assert all(0.0 <= x <= 1.0 for x in per["reward"])
        assert all(x > 0 for x in per["rollout_s"] + per["update_s"])
        assert r["iteration_s"] == pytest.approx(r["rollout_s"] + r["update_s"], rel=0.5)  # medians, not a sum
        assert r["steps_per_iteration"] == (1 if r["trainer"] == "grpo" else record["args"]["ppo_epochs"])
        assert 0 < r["mean_completion_tokens"] <= record["args"]["max_new_tokens"]
        if r["model"] == "rat":
            base = next(b for b in rows if b["trainer"] == r["trainer"] and b["model"] == "llama")
            assert r["iteration_s_x_llama"] == pytest.approx(r["iteration_s"] / base["iteration_s"], abs=1e-3)
            assert r["params"] > base["params"]  # RAT's gates and conv branch: more parameters at the same sizes
    assert png.stat().st_size > 10_000
