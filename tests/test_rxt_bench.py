"""The RxT benchmark scripts run end to end on CPU (--tiny) and measure what they say they measure."""

import json
import os
import runpy
import sys

import torch

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


def run_script(script: str, *args) -> str:
    """Runs `python bench/<script> ARGS` in this process (no import cost); restores argv, sys.path, torch threads."""
    path = os.path.join(BENCH, script)
    argv, threads, sys.argv = sys.argv, torch.get_num_threads(), [path, *map(str, args)]
    sys.path.insert(0, BENCH)
    try:
        runpy.run_path(path, run_name="__main__")
    finally:
        sys.argv = argv
        sys.path.remove(BENCH)
        torch.set_num_threads(threads)
    return path


def run_bench(script: str, out, *args) -> dict:
    """Runs the script as `python bench/<script> --device cpu --tiny ...` would, in this process."""
    path = run_script(script, "--device", "cpu", "--tiny", "--out", out, *args)
    assert torch.is_grad_enabled()  # the script left this process as it found it
    record = json.loads(out.read_text())
    assert record["device"] == "cpu" and record["command"].startswith(f"python {path} --device cpu --tiny")
    assert {"date", "torch", "transformers", "rows"} <= set(record)
    return record


def test_conversation_bench(tmp_path):
    record = run_bench("bench_rxt_conversation.py", tmp_path / "conv.json", "--turns", "3", "--repeats", "1")
    rows = record["rows"]
    assert len(rows) == 2 * 2 * 3  # models x batch sizes x turns
    for batch in (1, 2):
        rxt = [r for r in rows if r["model"] == "rxt" and r["batch"] == batch]
        llama = [r for r in rows if r["model"] == "llama" and r["batch"] == batch]
        # RxT reads [Q] query [A] every turn and holds a fixed state; Llama re-reads a growing history
        assert [r["prompt_tokens"] for r in rxt] == [batch * 10] * 3
        assert [r["prompt_tokens"] for r in llama] == [batch * (8 + 16 * t) for t in range(3)]
        assert len({r["kv_cache_bytes"] + r["memory_bytes"] for r in rxt}) == 1
        assert llama[2]["kv_cache_bytes"] > llama[1]["kv_cache_bytes"] > llama[0]["kv_cache_bytes"]
        # the update reads [Q] query [A] answer [EOS]
        assert all(r["update_s"] > 0 and r["update_tokens"] == batch * 19 for r in rxt)
    assert {s["model"] for s in record["summary"]} == {"rxt", "llama"}
    assert (tmp_path / "conv.png").exists()


def test_attention_bench(tmp_path):
    record = run_bench("bench_rxt_attention.py", tmp_path / "attn.json", "--variants", "gqa", "sqa", "xsqa",
                       "--masking", "causal", "--iters", "1")
    rows = record["rows"]
    assert [(r["variant"], r["query_heads"], r["kv_heads"]) for r in rows[:3]] == [("gqa", 8, 2), ("sqa", 4, 2),
                                                                                   ("xsqa", 2, 2)]
    assert all(r["batch"] * r["seq_len"] == 512 and r["fwd_bwd_ms"] > 0 for r in rows)
    assert all(r["fwd_speedup_vs_gqa"] == 1.0 for r in rows if r["variant"] == "gqa")
    assert (tmp_path / "attn.png").exists()


def test_tiny_preset_seeds_bench_runs_the_preset_and_appends_rows(tmp_path):
    """`bench/rxt_tiny_preset_seeds.py` with every stage cut to a few steps: one row per seed, appended to the file,
    recall measured on the final and the SMAT model (numbers meaningless at this length, only their range)."""
    pytest = __import__("pytest")
    pytest.importorskip("datasets")
    out = tmp_path / "seeds.json"
    short = ["pretrain.max_steps=4", "pretrain.recall_conversations=60", "sft.max_steps=2",
             "sft.recall_conversations=60", "memattn.max_steps=2", "memattn.recall_conversations=40",
             "smat.max_steps=3", "smat.recall_conversations=100", "smat.eval_conversations=4",
             "mrl.curriculum_steps=[1,1]", "mrl.recall_conversations=16"]
    run_script("rxt_tiny_preset_seeds.py", "--seeds", 0, "--work", tmp_path / "work", "--out", out, "--name", "short",
               *[x for kv in short for x in ("--set", kv)])
    record = json.loads(out.read_text())
    assert {"device", "date", "command", "rows"} <= set(record)
    (row,) = record["rows"]
    assert row["variant"] == "short" and row["seed"] == 0 and row["overrides"] == short
    for measured in (row, row["after_smat"]):
        assert all(0.0 <= measured[k] <= 1.0 for k in ("session_recall_d1", "recall_accuracy_d1", "recall_accuracy_d2"))
    assert (tmp_path / "work" / "short_seed0" / "final" / "config.json").is_file()
