"""Memory-recall benchmark of the Reactive Transformer curriculum (issue 10).

    python bench/rxt_memory_recall.py                       # GPU: one H200, 8 minutes (--time_budget_s 555)
    python bench/rxt_memory_recall.py --smoke               # CPU, 1-2 minutes: tiny everything, numbers not meaningful

Trains a small RxT through the whole curriculum (`rat_hf.recipes.rxt_pipeline`: pretrain -> sft -> memattn -> smat ->
mrl) on the offline data — the memory-aware stages on `rat_hf.data.interactions.memory_recall_dataset` conversations
(a fact, k distractor turns, the question) — and reports the exact-answer accuracy on held-out conversations at
distances k = 1, 2, 4, 8 for

- `rxt`: the curriculum's final model (after MRL), earlier turns written into the memory, the question answered
  greedily (`rxt_after_smat`: the same after stage 4, before MRL);
- `no_memory`: the final model with its memory reset every turn (the question alone): must be at chance;
- `llama_full_history`: a stateless `LlamaForCausalLM` with the RxT decoder's shape (hidden size, layers, heads, MLP,
  tokenizer), trained with `transformers.Trainer` on the same conversations for the steps SMAT reached, seeing the
  whole history as one sequence (loss on every answer + EOS): the upper bound.

`chance` is the best a model without memory can do: the most likely value of the asked attribute.

Also each stage's wall time (from the pipeline's `pipeline.json`) and the MRL reward curves of the group-relative
estimator (the pipeline's stage 5) vs PPO-with-critic (stage 5 rerun from the same SMAT model with
`--advantage_estimator critic`), as `bench/results/rxt_mrl_rewards.png`.

Time: `--time_budget_s` is the target for the whole run. SMAT trains until `max_train_seconds` (the budget minus
what the other parts need), the Llama and the critic rerun are skipped when the budget is spent, and the JSON is
rewritten after every part (`complete: false` until the end), so a run cut off by an outer time limit still leaves
its rows.

Output: `bench/results/rxt_memory_recall.json` (`device`, `date`, `command`, `rows: [{"model", "distance",
"accuracy"}]`, `chance`, `stage_wall_s`, `smat_steps_reached`, `mrl`, parameter counts, settings, the accuracy per
asked attribute and a few wrong answers per model and distance) and SMAT's loss curve beside it
(`rxt_memory_recall_smat_training.png`); `--smoke` writes `rxt_memory_recall_smoke.json` unless `--out` says
otherwise. Needs `datasets` (the recipes' data) and matplotlib.
"""

import argparse
import json
import os
import platform
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
DISTANCES = (1, 2, 4, 8)


def settings(smoke: bool, device: str, budget_s: float) -> dict:
    """Model size and steps per stage.

    GPU: a 128-wide 3-layer RxT (32 memory slots per layer) with a 400-piece BPE trained in stage 1 on text holding
    3,000 recall conversations, so the recall sentences' words ("favorite", "color", "locker") are single pieces while
    names and values stay split. Measured on CPU with a 64-wide RxT, 400 SMAT steps of 32 episodes: distance-1 recall
    0.48-0.62 with such a tokenizer, 0.00 with 1,024 pieces, 0.02-0.08 with 400 pieces trained on the dialogs and
    only 200 recall conversations (near-character pieces). SMAT (stage 4) does the teaching: 256 episodes a step,
    grouped by their number of turns, for what the time budget leaves (`max_train_seconds`; 3.6 steps/s on an H200);
    the Llama gets the steps SMAT reached. MRL: a short curriculum (2 then 4 turns) at lr 3e-4; its reward curves vs
    PPO-with-critic are the point. Smoke: a 32-wide RxT and a handful of steps (mechanics only).
    """
    if smoke:
        model = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, num_query_heads=2, stm_size=8, max_position_embeddings=256)
        s = dict(model=model, vocab=400, pretrain=4, sft=4, memattn=2, smat=16, smat_seconds=None, mrl=[1, 1],
                 batch=8, n_eval=16, recall=160, lr=3e-3, mrl_lr=3e-4, mrl_batch=8, train_distances=[0, 1, 2])
    else:
        model = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=3, num_attention_heads=4,
                     num_key_value_heads=2, num_query_heads=2, stm_size=32, max_position_embeddings=512)
        # budget: ~15 s start-up, ~40 s stages 1-3, ~20 s SMAT's tokenization, ~40 s MRL + ~40 s its critic rerun,
        # ~40 s Llama, ~30 s evaluation: SMAT trains for the rest
        s = dict(model=model, vocab=400, pretrain=150, sft=150, memattn=80, smat=20_000,
                 smat_seconds=max(60.0, budget_s - 230.0), mrl=[20, 20], batch=256, n_eval=256, recall=24_000,
                 lr=2e-3, mrl_lr=3e-4, mrl_batch=32, train_distances=[0, 1, 2, 4, 8])
    common = dict(seed=0, report_to="none", save_strategy="no", disable_tqdm=False, logging_steps=2 if smoke else 20,
                  use_cpu=device == "cpu", bf16=False)  # fp32: small models, and the comparison stays exact
    max_turns = max(s["train_distances"]) + 2  # fact + distractors + question
    max_len = 96
    early = dict(per_device_train_batch_size=min(s["batch"], 64), learning_rate=s["lr"], lr_scheduler_type="cosine")
    s["stages"] = {
        "pretrain": {**common, **early, "model_config_overrides": json.dumps(s["model"]),
                     "tokenizer_vocab_size": s["vocab"], "dataset": "offline", "recall_conversations": s["recall"] // 8,
                     "seq_len": 64 if smoke else 128, "max_steps": s["pretrain"],
                     "warmup_steps": max(1, s["pretrain"] // 10)},
        "sft": {**common, **early, "dataset": "offline", "recall_conversations": s["recall"] // 8,
                "max_length": max_len, "max_steps": s["sft"], "warmup_steps": max(1, s["sft"] // 10)},
        "memattn": {**common, **early, "dataset": "offline", "recall_conversations": s["recall"] // 8,
                    "max_turns": max_turns, "max_length": max_len, "max_steps": s["memattn"], "warmup_steps": 1},
        "smat": {**common, "dataset": "offline", "dialogs": False, "recall_conversations": s["recall"],
                 "recall_distances": s["train_distances"], "eval_distances": [1], "eval_conversations": 16,
                 "max_turns": max_turns, "max_length": max_len, "bptt_turns": max_turns, "max_steps": s["smat"],
                 "per_device_train_batch_size": s["batch"], "learning_rate": s["lr"], "warmup_steps": 20,
                 "lr_scheduler_type": "constant_with_warmup", "train_sampling_strategy": "group_by_length",
                 "model_card": False, **({"max_train_seconds": s["smat_seconds"]} if s["smat_seconds"] else {})},
        "mrl": {**common, "dataset": "recall", "strategies": ["cumulative", "long_range"],
                "recall_conversations": max(64, s["recall"] // 20), "eval_conversations": 16,
                "curriculum": [2, 4][:len(s["mrl"])], "curriculum_steps": s["mrl"], "num_generations": 4,
                "per_device_train_batch_size": s["mrl_batch"], "max_completion_length": 8, "bleu_max_n": 2,
                "learning_rate": s["mrl_lr"], "logging_steps": 1, "model_card": False},
    }
    return s


def history_example(tokenizer, record, max_length: int) -> dict:
    """The whole conversation as one sequence `[Q] q0 [A] a0 EOS [Q] q1 ...`, labels on every answer + EOS."""
    from rat_hf.data.interactions import tokenize_interaction, turns

    ids, labels = [], []
    for q, a in turns(record):
        t = tokenize_interaction(tokenizer, q, a)
        ids += t["input_ids"]
        labels += t["labels"]
    return {"input_ids": ids[-max_length:], "labels": labels[-max_length:]}


def train_llama(tokenizer, rxt_config, records, steps: int, batch: int, lr: float, device: str, work: Path):
    """A stateless Llama of the RxT decoder's shape, trained on the full histories with `transformers.Trainer`."""
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    config = LlamaConfig(vocab_size=rxt_config.vocab_size, hidden_size=rxt_config.hidden_size,
                         intermediate_size=rxt_config.intermediate_size, num_hidden_layers=rxt_config.num_hidden_layers,
                         num_attention_heads=rxt_config.num_attention_heads,
                         num_key_value_heads=rxt_config.num_attention_heads, max_position_embeddings=1024,
                         bos_token_id=rxt_config.bos_token_id, eos_token_id=rxt_config.eos_token_id,
                         pad_token_id=rxt_config.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    pad = config.pad_token_id if config.pad_token_id is not None else config.eos_token_id
    examples = [history_example(tokenizer, r, 1024) for r in records]

    def collate(rows):  # right-padded [B, T]; pads masked out of attention and loss
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), pad)
        labels = torch.full((len(rows), width), -100)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    args = TrainingArguments(output_dir=str(work / "llama"), max_steps=steps, per_device_train_batch_size=batch,
                             learning_rate=lr, warmup_steps=10, lr_scheduler_type="constant_with_warmup",
                             logging_steps=max(1, steps // 10), save_strategy="no", report_to="none", seed=0,
                             use_cpu=device == "cpu", remove_unused_columns=False, disable_tqdm=False)
    Trainer(model=model, args=args, train_dataset=examples, data_collator=collate).train()
    return model


@torch.no_grad()
def llama_answers(model, tokenizer, records, batch_size: int = 32) -> list[str]:
    """The greedy answer (stripped) to the last question, prompted with the full history and the question."""
    from rat_hf.data.interactions import interaction_prompt_ids, tokenize_interaction, turns

    model.eval()
    device = next(model.parameters()).device
    eos, pad = model.config.eos_token_id, model.config.pad_token_id
    answers = []
    for start in range(0, len(records), batch_size):
        batch = records[start:start + batch_size]
        prompts = []
        for r in batch:
            t = turns(r)
            ids = [i for q, a in t[:-1] for i in tokenize_interaction(tokenizer, q, a)["input_ids"]]
            prompts.append(ids + interaction_prompt_ids(tokenizer, t[-1][0]))
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left padding for generation
            ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=12,
                             do_sample=False, eos_token_id=eos, pad_token_id=pad)
        answers += [a.strip() for a in tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)]
    return answers


def asked_attribute(record) -> str:
    """Which attribute the record's last question asks for ("favorite color", "locker code", ...)."""
    from rat_hf.data.interactions import _VALUES

    return next(a for a in _VALUES if record["interactions"][-1]["query"].endswith(f"'s {a}?"))


def score(result: dict, model: str, k: int, records, answers: list[str]) -> None:
    """Append the accuracy row of (model, k), its accuracy per asked attribute, and a few wrong answers."""
    right = [a == r["interactions"][-1]["answer"].strip() for a, r in zip(answers, records)]
    result["rows"].append({"model": model, "distance": k, "accuracy": sum(right) / max(len(right), 1)})
    by = {}
    for ok, r in zip(right, records):
        by.setdefault(asked_attribute(r), []).append(ok)
    result.setdefault("accuracy_by_attribute", {}).setdefault(model, {})[str(k)] = {
        a: round(sum(v) / len(v), 3) for a, v in sorted(by.items())}
    wrong = [{"expected": r["interactions"][-1]["answer"], "got": a} for a, r, ok in zip(answers, records, right)
             if not ok]
    result.setdefault("wrong_answers", {}).setdefault(model, {})[str(k)] = wrong[:6]


def chance_level(records) -> float:
    """The best a model without memory can do: answer the most likely value of the asked attribute (estimated from
    20,000 draws of each attribute's value generator), averaged over the records' attributes."""
    import random
    from collections import Counter

    from rat_hf.data.interactions import _VALUES

    rng = random.Random(0)
    best = {a: Counter(draw(rng) for _ in range(20_000)).most_common(1)[0][1] / 20_000 for a, draw in _VALUES.items()}
    return sum(best[asked_attribute(r)] for r in records) / max(len(records), 1)


def plot_mrl(curves: dict, path: Path, boundaries=()) -> None:
    """Mean sampled reward per optimizer step for each estimator; dashed lines where the curriculum moves to longer
    episodes (the reward drops there: the task got harder, not the policy worse)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    for name, points in curves.items():
        if points:
            ax.plot(*zip(*points), marker="." if len(points) < 40 else None, label=name)
    for step in boundaries:
        ax.axvline(step + 0.5, color="gray", linestyle="--", linewidth=0.8)
    ax.set(xlabel="optimizer step", ylabel="mean sampled reward", title="RxT MRL: group-relative vs PPO with critic")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_smat(losses: list, path: Path, batch: int) -> None:
    """SMAT's training loss (answers + EOS of every turn) against the optimizer step, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.plot(*zip(*losses), marker=".")
    ax.set(xlabel=f"optimizer step ({batch} episodes)", ylabel="training loss", yscale="log",
           title="RxT SMAT (stage 4) on memory-recall episodes")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def load_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny CPU run (1-2 minutes)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--work", default=None, help="checkpoints (default outputs/bench_rxt_memory_recall[_smoke])")
    p.add_argument("--out", default=None, help="result JSON (default bench/results/rxt_memory_recall[_smoke].json)")
    p.add_argument("--time_budget_s", type=float, default=555.0,
                   help="the whole run's wall-time target: SMAT trains for what the other parts leave of it, the "
                        "optional parts (Llama, the critic rerun) are skipped when the budget is spent; the JSON is "
                        "rewritten after every part, so a run cut off still leaves its rows")
    p.add_argument("--no_mrl_critic", action="store_true", help="skip the PPO-with-critic comparison run")
    argv = list(sys.argv[1:] if argv is None else argv)
    a = p.parse_args(argv)
    if a.smoke and a.device == "cuda":
        a.device = "cpu"
    if a.device == "cpu":
        torch.set_num_threads(1)  # tiny models run fastest on one thread
    suffix = "_smoke" if a.smoke else ""
    work = Path(a.work or f"outputs/bench_rxt_memory_recall{suffix}")
    out = Path(a.out or RESULTS / f"rxt_memory_recall{suffix}.json")
    png = out.with_name(out.stem.replace("rxt_memory_recall", "rxt_mrl_rewards") + ".png")
    t0 = time.perf_counter()
    s = settings(a.smoke, a.device, a.time_budget_s)
    device = torch.cuda.get_device_name(0) if a.device == "cuda" else f"CPU ({platform.processor() or 'cpu'})"
    result = {
        "device": device, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python bench/rxt_memory_recall.py " + shlex.join(argv), "smoke": a.smoke, "complete": False,
        "rows": [], "skipped": [], "time_budget_s": a.time_budget_s, "rxt_model": s["model"],
        "tokenizer_vocab_size": s["vocab"], "train_distances": s["train_distances"],
        "steps": {k: s[k] for k in ("pretrain", "sft", "memattn", "smat", "mrl")}, "smat_max_train_seconds":
        s["smat_seconds"], "smat_batch": s["batch"], "learning_rate": s["lr"], "mrl_learning_rate": s["mrl_lr"],
        "eval_conversations_per_distance": s["n_eval"],
    }

    def write() -> None:  # after every part: a run that is cut off still leaves what it measured
        result["total_wall_s"] = round(time.perf_counter() - t0, 1)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))

    def left() -> float:
        return a.time_budget_s - (time.perf_counter() - t0)

    # ---- the curriculum ----------------------------------------------------------------------------------------------
    import yaml

    from rat_hf.recipes.rxt_pipeline import REPO_ROOT, run_pipeline, stage_argv

    work.mkdir(parents=True, exist_ok=True)
    with open(work / "pipeline.yaml", "w") as f:
        yaml.safe_dump({"output_root": str(work), "stages": s["stages"]}, f)
    summary = run_pipeline(["--config", str(work / "pipeline.yaml")])
    if summary["missing"]:
        raise RuntimeError(f"the curriculum lacks stage(s) {summary['missing']}: their recipes are missing")
    stage_wall = {r["stage"]: r["wall_s"] for r in summary["stages"]}
    smat_state = load_json(work / "smat" / "trainer_state.json")
    smat_steps = int(smat_state.get("global_step") or s["smat"])
    result.update(stage_wall_s=stage_wall, smat_steps_reached=smat_steps,
                  smat_loss=[(h["step"], h["loss"]) for h in smat_state.get("log_history", []) if "loss" in h])
    if result["smat_loss"]:
        smat_png = out.with_name(out.stem + "_smat_training.png")
        plot_smat(result["smat_loss"], smat_png, s["batch"])
        result["smat_training_png"] = str(smat_png)
    mrl_logs = {"group": load_json(work / "mrl" / "mrl.json")}
    result["mrl"] = {"group": mrl_logs["group"].get("metrics")}
    write()

    # ---- evaluation of the RxT: after SMAT and after MRL (the final model), and with the memory reset ----------------
    from transformers import AutoTokenizer

    from rat_hf.data import memory_recall_dataset
    from rat_hf.models.rxt import RxTForCausalLM
    from rat_hf.trainers import recall_answers

    tokenizer = AutoTokenizer.from_pretrained(summary["final_model"])
    held_out = {k: list(memory_recall_dataset(s["n_eval"], k, seed=50_000 + k)) for k in DISTANCES}
    result["chance"] = {str(k): chance_level(records) for k, records in held_out.items()}
    start = time.perf_counter()
    rxt = None
    for label, path in (("rxt_after_smat", work / "smat"), ("rxt", Path(summary["final_model"]))):
        rxt = RxTForCausalLM.from_pretrained(path).to(a.device)
        for k, records in held_out.items():
            score(result, label, k, records, recall_answers(rxt, tokenizer, records))
            if label == "rxt":
                score(result, "no_memory", k, records, recall_answers(rxt, tokenizer, records, memory_reset=True))
    stage_wall["eval_rxt"] = round(time.perf_counter() - start, 2)
    result["parameters"] = {"rxt": rxt.num_parameters()}
    write()

    # ---- the upper bound: a stateless Llama of the decoder's shape over the full history, SMAT's steps -----------
    if left() > 30 or a.smoke:
        start = time.perf_counter()
        train_records = [r for i, k in enumerate(s["train_distances"])
                         for r in memory_recall_dataset(s["recall"] // len(s["train_distances"]), k, seed=i)]
        llama = train_llama(tokenizer, rxt.config, train_records, smat_steps, s["batch"], s["lr"], a.device, work)
        stage_wall["llama_full_history"] = round(time.perf_counter() - start, 2)
        for k, records in held_out.items():
            score(result, "llama_full_history", k, records, llama_answers(llama, tokenizer, records))
        result["parameters"]["llama_full_history"] = llama.num_parameters()
        result["llama_steps"] = smat_steps
    else:
        result["skipped"].append(f"llama_full_history: {left():.0f} s of the time budget left")
    write()

    # ---- MRL comparison: PPO with a critic from the same SMAT model --------------------------------------------------
    if a.no_mrl_critic:
        result["skipped"].append("mrl_critic: --no_mrl_critic")
    elif left() < stage_wall["mrl"] and not a.smoke:
        result["skipped"].append(f"mrl_critic: {left():.0f} s of the time budget left, the group run took "
                                 f"{stage_wall['mrl']:.0f} s")
    else:
        import importlib.util

        spec = importlib.util.spec_from_file_location("rxt_mrl_recipe", REPO_ROOT / "recipes" / "rxt_mrl.py")
        recipe = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(recipe)
        start = time.perf_counter()
        recipe.main(stage_argv("mrl", {**s["stages"]["mrl"], "advantage_estimator": "critic"}, str(work / "smat"),
                               str(work / "mrl_critic"), None, False, None))
        stage_wall["mrl_critic"] = round(time.perf_counter() - start, 2)
        mrl_logs["critic"] = load_json(work / "mrl_critic" / "mrl.json")
        result["mrl"]["critic"] = mrl_logs["critic"].get("metrics")
    curves = {}
    for name, log in mrl_logs.items():
        label = "group-relative (critic-free)" if name == "group" else "PPO with critic"
        curves[label] = [(h["step"], h["reward"]) for h in log.get("log_history", []) if "reward" in h]
    steps = s["stages"]["mrl"]["curriculum_steps"]
    plot_mrl(curves, png, boundaries=[sum(steps[:i + 1]) for i in range(len(steps) - 1)])
    result.update(mrl_reward_curves=curves, mrl_curriculum={"turns": s["stages"]["mrl"]["curriculum"],
                                                            "steps": steps}, mrl_rewards_png=str(png), complete=True)
    write()

    table = {(r["model"], r["distance"]): r["accuracy"] for r in result["rows"]}
    models = ("rxt", "rxt_after_smat", "no_memory", "llama_full_history")
    print("distance  " + "  ".join(f"{m:>18}" for m in models) + "   chance")
    for k in DISTANCES:
        print(f"{k:>8}  " + "  ".join(f"{table.get((m, k), float('nan')):>18.3f}" for m in models)
              + f"   {result['chance'][str(k)]:.3f}")
    print(f"stage wall times (s): {stage_wall}; SMAT steps {smat_steps}; skipped {result['skipped']}; "
          f"total {result['total_wall_s']} s; wrote {out} and {png}")
    return result


if __name__ == "__main__":
    main()
