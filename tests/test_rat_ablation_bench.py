"""`bench/rat_ablation.py`: its exact bigram and its device sampler agree with the grammar, and `--smoke` runs end to
end on CPU (every variant, both tasks, two seeds) and records what it says it measures."""

import json
import math
import os
import runpy
import sys

import pytest
import torch

from rat_hf.data import RandomLanguageModel

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
sys.path.insert(0, BENCH)
import rat_ablation  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster on a busy machine


def _empirical_joints(x: torch.Tensor, vocab: int) -> torch.Tensor:
    """Frequencies of adjacent pairs at every position t >= 1: [T-1, V, V]."""
    pairs = x[:, :-1] * vocab + x[:, 1:]  # [n, T-1]
    counts = torch.stack([torch.bincount(col, minlength=vocab * vocab) for col in pairs.T])
    return (counts.double() / x.shape[0]).view(-1, vocab, vocab)


def test_exact_bigram_matches_samples_and_sits_between_bayes_and_pooled():
    rlm = RandomLanguageModel(vocab_size=6, depth=4, beta=2.5, seed=3)
    joints = rat_ablation.adjacent_joints(rlm)  # [T, V, V]
    assert torch.allclose(joints[1:].sum(dim=(1, 2)), torch.ones(rlm.seq_len - 1, dtype=torch.float64))
    x = rlm.sample(40_000, seed=1)
    # 40k samples: a cell's frequency has a standard error <= 0.0025; a wrong path (left/right swapped, one level
    # off) moves cells by 0.05 and more
    assert (_empirical_joints(x, rlm.vocab_size) - joints[1:]).abs().max() < 0.015
    test = x[:2000]
    bayes = rlm.token_nll(test)[:, 1:].mean()
    exact, pooled = rat_ablation.bigram_nll(joints, test).mean(), rat_ablation.bigram_nll(joints, test, True).mean()
    assert bayes + 0.05 < exact < pooled  # the grammar sees more than the previous token; the position helps


def test_device_sampler_draws_the_grammar():
    rlm = RandomLanguageModel(vocab_size=6, depth=4, beta=2.5, seed=3)
    sampler = rat_ablation.DeviceSampler(rlm, "cpu")
    x = sampler(40_000, torch.Generator().manual_seed(0))
    assert x.shape == (40_000, 16) and x.dtype == torch.long and 0 <= int(x.min()) and int(x.max()) < 6
    assert (_empirical_joints(x, 6) - rat_ablation.adjacent_joints(rlm)[1:]).abs().max() < 0.015
    # the exact log-likelihood of its draws has the grammar's entropy (a sampler off the grammar scores worse)
    ours = rlm.token_nll(x[:3000]).sum(-1)
    theirs = rlm.token_nll(rlm.sample(3000, seed=5)).sum(-1)
    se = math.sqrt((ours.var() + theirs.var()) / 3000)
    assert abs(float(ours.mean() - theirs.mean())) < 4 * se


def test_eval_steps_and_interp():
    assert rat_ablation.eval_steps(100, 3) == [1, 10, 100]
    assert rat_ablation.eval_steps(7, 1) == [7]
    curve = [{"wall_s": 0.0, "v": 0.0}, {"wall_s": 2.0, "v": 1.0}]
    assert rat_ablation.interp(curve, "v", 1.5) == pytest.approx(0.75)
    assert rat_ablation.interp(curve, "v", 3.0) is None


def test_param_matched_llama_within_one_layer_norm_of_rat():
    a = rat_ablation.parse_args(["--smoke"])
    rat = rat_ablation.build("rat_soft", a, 64, 64, 0, "cpu").num_parameters()
    llama = rat_ablation.build("llama_param_matched", a, 64, 64, 0, "cpu").num_parameters()
    assert llama == rat_ablation.llama_params(a, 64, rat_ablation.matched_intermediate(a, 64, 64))
    assert abs(llama - rat) <= 3 * a.hidden * a.layers / 2  # the nearest SwiGLU width


def test_unknown_variant_is_one_clear_error(capsys):
    with pytest.raises(SystemExit):
        rat_ablation.parse_args(["--variants", "llama,rat_sofft"])
    assert "unknown rat_sofft" in capsys.readouterr().err


def test_smoke_end_to_end(tmp_path):
    out = tmp_path / "ablation.json"
    path = os.path.join(BENCH, "rat_ablation.py")
    argv = sys.argv
    sys.argv = [path, "--smoke", "--out", str(out)]
    try:
        runpy.run_path(path, run_name="__main__")
    finally:
        sys.argv = argv
    record = json.loads(out.read_text())
    assert record["device"] == "cpu" and record["command"].startswith(f"python {path} --smoke")
    assert {"date", "meta", "plan", "rows", "curves", "summary", "table_md", "skipped"} <= set(record)
    meta = record["meta"]["rlm"]
    assert meta["bayes_loss"] < meta["bigram_loss"] < meta["bigram_pooled_loss"] < meta["uniform_loss"]
    variants, seeds = list(rat_ablation.VARIANTS), record["args"]["seeds"]
    assert record["skipped"] == [] and record["failed"] == []
    rows = record["rows"]
    assert [(r["task"], r["variant"], r["seed"]) for r in rows] == (
        [("rlm", v, s) for s in range(seeds) for v in variants] + [("text", v, 0) for v in variants])
    params = {r["variant"]: r["params"] for r in rows if r["task"] == "rlm"}
    assert params["rat_no_conv"] < params["rat_soft"] and params["rat_no_gates"] < params["rat_soft"]
    assert params["rat_one_policy"] < params["rat_soft"] == params["rat_reinforce"] == params["rat_query_gates"]
    assert params["llama"] < params["rat_soft"]
    assert abs(params["llama_param_matched"] - params["rat_soft"]) < 0.02 * params["rat_soft"]
    for task in ("rlm", "text"):  # every run of a task trains the same tokens
        assert len({r["tokens"] for r in rows if r["task"] == task}) == 1
    for r in rows:
        assert r["wall_s"] > 0 and r["tokens_per_s"] > 0
        gated = r["variant"] in ("rat_soft", "rat_reinforce", "rat_one_policy", "rat_no_conv", "rat_query_gates")
        key = "gap_closed_mean" if r["task"] == "rlm" else "held_out_ppl"
        assert (f"gates_off_{key}" in r) == gated and ("gate_deviation" in r) == gated
        if r["task"] == "rlm":
            assert math.isfinite(r["gap_closed_mean"]) and math.isfinite(r["gap_closed_last"])
    for c in record["curves"]:  # learning is shown: every run's test loss falls from its initialisation
        points = c["points"]
        assert [p["step"] for p in points] == [0, 1, 3, 8]
        assert all(p1["tokens"] > p0["tokens"] and p1["wall_s"] >= p0["wall_s"] for p0, p1 in zip(points, points[1:]))
        key, margin = ("test_loss", 0.1) if c["task"] == "rlm" else ("held_out_loss", 0.5)
        assert points[-1][key] < points[0][key] - margin, (c["task"], c["variant"], c["seed"])
        if c["task"] == "rlm":  # the gap closed is the loss, rescaled
            m = record["meta"]["rlm"]
            expect = (m["bigram_loss"] - points[-1]["test_loss"]) / (m["bigram_loss"] - m["bayes_loss"])
            assert points[-1]["gap_closed_mean"] == pytest.approx(expect, rel=1e-4)
    summary = record["summary"]
    assert set(summary["rlm"]["variants"]) == set(variants) == set(summary["text"]["variants"])
    assert summary["rlm"]["variants"]["rat_soft"]["gap_closed_mean"]["n"] == seeds
    assert all(f"| {v} |" in record["table_md"] for v in variants)
    assert (tmp_path / "ablation.png").stat().st_size > 20_000


def test_a_failing_run_is_recorded_and_the_others_still_run(tmp_path, monkeypatch):
    train = rat_ablation.train

    def broken(model, *args, **kwargs):
        if isinstance(model, rat_ablation.RatForCausalLM):
            raise RuntimeError("planted failure")
        return train(model, *args, **kwargs)

    monkeypatch.setattr(rat_ablation, "train", broken)
    out = tmp_path / "ablation.json"
    with pytest.raises(SystemExit, match="2 run\\(s\\) failed .*rlm rat_soft seed 0: RuntimeError: planted failure"):
        rat_ablation.main(["--smoke", "--tasks", "rlm", "--variants", "llama,rat_soft", "--out", str(out)])
    record = json.loads(out.read_text())
    assert [(r["variant"], r["seed"]) for r in record["rows"]] == [("llama", 0), ("llama", 1)]
    assert [(f["variant"], f["seed"]) for f in record["failed"]] == [("rat_soft", 0), ("rat_soft", 1)]
