"""How the newcomer's RxT preset (`recipes/rxt_pipeline.py --preset tiny`) fares over seeds, and with variants.

    python bench/rxt_tiny_preset_seeds.py --seeds 0 1 2 3                       # the preset, ~5 minutes a seed (CPU)
    python bench/rxt_tiny_preset_seeds.py --seeds 2 3 --set smat.per_device_train_batch_size=32 --name "batch 32"
    python bench/rxt_tiny_preset_seeds.py --seeds 2 3 --stages pretrain,sft,smat,mrl --name "stage 3 skipped"

Each seed runs the whole preset (with the `--set` overrides and `--stages`) on one CPU thread, then measures recall
of a fact one turn back on held-out conversations, for the final model and the SMAT model:
`session_recall_d1` — `ReactiveSession.remember` the fact and one distractor turn, `interact` the question, exact
answer (120 conversations, seed 777, as tests/test_rxt_pipeline.py); `recall_accuracy_d1/d2` —
`rat_hf.trainers.recall_accuracy` at one / two distractors (200 conversations, seeds 901 / 902). Chance is ~0.06.
Rows are appended to `--out` (default bench/results/rxt_tiny_preset_seeds.json), so runs of several variants (or
two processes on two cores, each with its own seeds) collect in one file. Needs `datasets`.
"""

import argparse
import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def session_recall(model, tokenizer, n: int = 120, seed: int = 777) -> float:
    from rat_hf.data import memory_recall_dataset
    from rat_hf.data.interactions import turns
    from rat_hf.reactive import ReactiveSession

    hits = 0
    for record in memory_recall_dataset(n, 1, seed=seed):
        *told, (question, answer) = turns(record)
        with ReactiveSession(model, tokenizer, background=False, max_new_tokens=8, do_sample=False) as session:
            for q, a in told:
                session.remember(q, a)
            hits += session.interact(question).strip() == answer
    return round(hits / n, 3)


def measure(path) -> dict:
    from transformers import AutoTokenizer

    from rat_hf.data import memory_recall_dataset
    from rat_hf.models.rxt import RxTForCausalLM
    from rat_hf.trainers import recall_accuracy

    model, tokenizer = RxTForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    out = {"session_recall_d1": session_recall(model, tokenizer)}
    for k in (1, 2):
        records = list(memory_recall_dataset(200, k, seed=900 + k))
        out[f"recall_accuracy_d{k}"] = round(recall_accuracy(model, tokenizer, records), 3)
    return out


def main(argv=None) -> list:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--set", action="append", default=[], metavar="STAGE.KEY=VALUE", help="as rxt_pipeline.py --set")
    p.add_argument("--stages", default=None, help="as rxt_pipeline.py --stages (default: all five)")
    p.add_argument("--name", default="the preset", help="the variant's name in the rows")
    p.add_argument("--work", default="outputs/rxt_tiny_preset_seeds")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "rxt_tiny_preset_seeds.json"))
    a = p.parse_args(argv)
    torch.set_num_threads(1)  # the preset's own setting: a 64-wide model runs fastest on one thread

    from rat_hf.recipes.rxt_pipeline import STAGES, run_pipeline

    quiet = [x for s in STAGES for x in ("--set", f"{s}.disable_tqdm=true")]
    rows = []
    for seed in a.seeds:
        root = Path(a.work) / f"{a.name.replace(' ', '_')}_seed{seed}"
        argv_run = ["--preset", "tiny", "--output_root", str(root), "--seed", str(seed), *quiet,
                    *[x for kv in a.set for x in ("--set", kv)], *(["--stages", a.stages] if a.stages else [])]
        start = time.perf_counter()
        run_pipeline(argv_run)
        wall = round(time.perf_counter() - start, 1)
        row = {"variant": a.name, "seed": seed, "overrides": a.set + ([f"--stages {a.stages}"] if a.stages else []),
               **measure(root / "final"), "after_smat": measure(root / "smat"), "pipeline_wall_s": wall}
        print(json.dumps(row), flush=True)
        rows.append(row)
        out = Path(a.out)
        result = json.loads(out.read_text()) if out.is_file() else {
            "device": f"CPU ({platform.processor() or 'cpu'}), torch {torch.__version__}, 1 thread",
            "date": datetime.now(timezone.utc).date().isoformat(),
            "command": "python bench/rxt_tiny_preset_seeds.py ...", "chance": 0.06, "rows": []}
        result["rows"].append(row)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
    return rows


if __name__ == "__main__":
    main()
