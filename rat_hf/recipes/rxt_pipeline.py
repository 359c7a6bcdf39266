"""The whole Reactive Transformer curriculum in one command: pretrain -> sft -> memattn -> smat -> mrl.

    python recipes/rxt_pipeline.py --preset tiny                      # a tiny RxT on the offline data, minutes on CPU
    python recipes/rxt_pipeline.py --config my_pipeline.yaml --output_root outputs/rxt --push_to_hub \
        --hub_model_id_prefix you/rxt                                  # pushes you/rxt-pretrain, you/rxt-sft, ...
    rat-chat --model outputs/rxt_pipeline_tiny/final                   # talk to the result

Each stage is its recipe, `recipes/rxt_<stage>.py`, run as

    python recipes/rxt_<stage>.py --config <stage config> --model_name_or_path <previous stage's dir> \
        --output_dir <output_root>/<stage> [overrides] [--push_to_hub --hub_model_id <prefix>-<stage>]

in this process (the recipes' `main(argv)`, the default: one import of torch/transformers for the five stages) or as
a subprocess (`--launcher "python"` or `--launcher "accelerate launch --config_file ..."`). The stages chain through
their saved checkpoints; `<output_root>/final` is a link to the last stage's directory (a copy where links fail).

A pipeline config (YAML/JSON) names each stage's recipe config and overrides:

    output_root: outputs/rxt_pipeline_tiny
    torch_threads: 1                                   # optional: CPU threads for torch in every stage
    stages:
      pretrain: {config: recipes/configs/rxt_pretrain_tiny.yaml, max_steps: 60}
      smat: {config: recipes/configs/rxt_smat_tiny.yaml, recall_distances: [1], max_steps: 80}

Stages missing from `stages` run with their recipe's defaults. A stage whose recipe file does not exist is skipped
with an ERROR line, recorded as `"status": "missing"` in `pipeline.json`, and the command exits with status 1 at the
end (the later stages still run from the last model made). `<output_root>/pipeline.json` records each stage's argv,
status, wall time and final metrics; it is rewritten after every stage.
"""

import argparse
import importlib.util
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

STAGES = ("pretrain", "sft", "memattn", "smat", "mrl")
DESCRIPTIONS = {
    "pretrain": "joint LM pre-training (encoder masked LM + decoder autoregressive on the encoder's states)",
    "sft": "interaction SFT ([Q] query [A] answer EOS, loss on the answer and EOS)",
    "memattn": "self-supervised memory-attention pre-training (cosine to a weighted mean of old memory and new data)",
    "smat": "supervised memory-aware training (answer turn k from the memory of turns 0..k-1, BPTT over turns)",
    "mrl": "memory reinforcement learning (sampled answers rewarded for recalling earlier turns)",
}
REPO_ROOT = Path(__file__).resolve().parents[2]
PRESETS = {"tiny": "recipes/configs/rxt_pipeline_tiny.yaml"}
logger = logging.getLogger("rat_hf.recipes.rxt_pipeline")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="recipes/rxt_pipeline.py", description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), help="a shipped pipeline config (tiny: CPU, minutes)")
    p.add_argument("--config", help="pipeline config (YAML/JSON): output_root, seed, stages: {stage: {config, ...}}")
    p.add_argument("--output_root", help="one subdirectory per stage, pipeline.json and final/ (default: the "
                   "config's output_root, else outputs/rxt_pipeline)")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    p.add_argument("--model_name_or_path", help="start the first stage from this RxT checkpoint (e.g. skip pretrain)")
    p.add_argument("--recipes_dir", default=str(REPO_ROOT / "recipes"), help="where rxt_<stage>.py live")
    p.add_argument("--launcher", help="run each stage as a subprocess with this command prefix, e.g. 'python' or "
                   "'accelerate launch --config_file recipes/accelerate_configs/multi_gpu.yaml' (default: in-process)")
    p.add_argument("--seed", type=int, help="passed to every stage as --seed")
    p.add_argument("--torch_threads", type=int, help="CPU threads for torch in every stage (default: the config's "
                   "torch_threads, else torch's own choice); tiny models run fastest on 1")
    p.add_argument("--push_to_hub", action="store_true", help="push every stage's model to the Hub")
    p.add_argument("--hub_model_id_prefix", help="stage s is pushed as <prefix>-<s> (default: the stage dir's name)")
    p.add_argument("--set", action="append", default=[], metavar="STAGE.KEY=VALUE",
                   help="override one stage argument, e.g. --set smat.max_steps=200 (repeatable; VALUE is YAML)")
    return p


def _load_yaml(path: str, where: str) -> dict:
    import yaml

    if not os.path.isfile(path):
        raise ValueError(f"{where} {path!r}: no such file")
    with open(path) as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{where} {path!r}: not valid YAML/JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{where} {path!r}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def _resolve(path: str) -> str:
    """A relative path as given if it exists from the current directory, else from the repository root."""
    if os.path.isabs(path) or os.path.exists(path):
        return path
    return str(REPO_ROOT / path)


def _flag_values(key: str, value) -> list:
    """`--key value` for a recipe's HfArgumentParser: lists as several values, dicts as JSON, bools as true/false."""
    if isinstance(value, bool):
        return [f"--{key}", "true" if value else "false"]
    if isinstance(value, (list, tuple)):
        return [f"--{key}", *[str(v) for v in value]]
    if isinstance(value, dict):
        return [f"--{key}", json.dumps(value)]
    return [f"--{key}", str(value)]


def stage_argv(stage: str, spec: dict, model: str | None, output_dir: str, seed: int | None, push: bool,
               hub_prefix: str | None) -> list:
    """The command-line arguments of one stage's recipe."""
    spec = dict(spec)
    argv = []
    if spec.get("config"):
        argv += ["--config", _resolve(str(spec.pop("config")))]
    else:
        spec.pop("config", None)
    for key in ("model_name_or_path", "output_dir", "push_to_hub", "hub_model_id"):
        if key in spec:
            raise ValueError(f"stages.{stage}.{key}: set by the pipeline (use --model_name_or_path / --output_root / "
                             "--push_to_hub / --hub_model_id_prefix)")
    if model is not None:
        argv += ["--model_name_or_path", model]
    argv += ["--output_dir", output_dir]
    if seed is not None:
        spec["seed"] = seed
    for key, value in spec.items():
        argv += _flag_values(key, value)
    if push:
        argv += ["--push_to_hub", "true", "--hub_model_id", f"{hub_prefix}-{stage}" if hub_prefix else
                 os.path.basename(os.path.abspath(output_dir))]
    return argv


def _load_recipe_main(path: Path):
    spec = importlib.util.spec_from_file_location(f"rxt_recipe_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "main", None)):
        raise ValueError(f"{path}: has no main(argv) to call in-process; pass --launcher python")
    return module.main


def _link_final(root: Path, last_dir: Path) -> Path:
    final = root / "final"
    if final.is_symlink() or final.is_file():
        final.unlink()
    elif final.is_dir():
        shutil.rmtree(final)
    try:
        final.symlink_to(last_dir.name, target_is_directory=True)
    except OSError:  # filesystems without symlinks
        shutil.copytree(last_dir, final)
    return final


def parse_pipeline(argv=None) -> tuple:
    args = build_parser().parse_args(argv)
    if args.preset and args.config:
        raise ValueError("--preset and --config: give one of them")
    config = {}
    source = args.config or (PRESETS[args.preset] if args.preset else None)
    if source:
        config = _load_yaml(_resolve(source), "--config")
    unknown = sorted(set(config) - {"output_root", "seed", "stages", "torch_threads"})
    if unknown:
        raise ValueError(f"--config {source!r}: unknown keys {unknown} (expected output_root, seed, stages, "
                         "torch_threads)")
    stage_specs = config.get("stages") or {}
    if not isinstance(stage_specs, dict) or set(stage_specs) - set(STAGES):
        raise ValueError(f"--config {source!r}: 'stages' must map some of {list(STAGES)} to their arguments")
    stage_specs = {s: dict(stage_specs.get(s) or {}) for s in STAGES}
    import yaml

    for item in args.set:
        target, sep, value = item.partition("=")
        stage, dot, key = target.partition(".")
        if not sep or not dot or stage not in STAGES or not key:
            raise ValueError(f"--set {item!r}: expected STAGE.KEY=VALUE with STAGE one of {list(STAGES)}")
        stage_specs[stage][key] = yaml.safe_load(value)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    bad = [s for s in stages if s not in STAGES]
    if bad or not stages:
        raise ValueError(f"--stages {args.stages!r}: unknown stage(s) {bad}; choose from {list(STAGES)}")
    stages = [s for s in STAGES if s in stages]  # the curriculum's order, whatever order was typed
    if stages[0] != "pretrain" and not args.model_name_or_path:
        raise ValueError(f"--stages starts at {stages[0]!r}: give --model_name_or_path (the previous stage's output)")
    root = Path(args.output_root or config.get("output_root") or "outputs/rxt_pipeline")
    seed = args.seed if args.seed is not None else config.get("seed")
    threads = args.torch_threads if args.torch_threads is not None else config.get("torch_threads")
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise ValueError(f"torch_threads={threads!r}: expected a positive integer")
    args.torch_threads = threads
    return args, stages, stage_specs, root, seed


def run_pipeline(argv=None) -> dict:
    """Run the curriculum; returns the summary also written to `<output_root>/pipeline.json`."""
    args, stages, specs, root, seed = parse_pipeline(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    root.mkdir(parents=True, exist_ok=True)
    summary = {"command": "python recipes/rxt_pipeline.py " + shlex.join(sys.argv[1:] if argv is None else argv),
               "output_root": str(root), "stages": [], "final_model": None, "missing": []}
    model = args.model_name_or_path
    recipes = Path(args.recipes_dir)
    start_all = time.perf_counter()
    threads_before = None
    if args.torch_threads is not None:
        import torch

        threads_before = torch.get_num_threads()
        torch.set_num_threads(args.torch_threads)
        summary["torch_threads"] = args.torch_threads

    def write():
        summary["total_wall_s"] = round(time.perf_counter() - start_all, 2)
        with open(root / "pipeline.json", "w") as f:
            json.dump(summary, f, indent=2, default=str)

    for i, stage in enumerate(stages, start=1):
        recipe = recipes / f"rxt_{stage}.py"
        out_dir = root / stage
        record = {"stage": stage, "recipe": str(recipe), "output_dir": str(out_dir), "from": model}
        summary["stages"].append(record)
        if not recipe.is_file():
            message = (f"stage {i}/{len(stages)} {stage}: recipe {recipe} does not exist; SKIPPED, the next stage "
                       f"continues from {model}")
            logger.error(message)
            print(f"[rxt-pipeline] ERROR: {message}", file=sys.stderr, flush=True)
            record["status"] = "missing"
            summary["missing"].append(stage)
            write()
            continue
        argv_stage = stage_argv(stage, specs[stage], model, str(out_dir), seed, args.push_to_hub,
                                args.hub_model_id_prefix)
        record["argv"] = argv_stage
        print(f"[rxt-pipeline] stage {i}/{len(stages)} {stage}: {DESCRIPTIONS[stage]}\n"
              f"[rxt-pipeline]   python {recipe.relative_to(REPO_ROOT) if recipe.is_relative_to(REPO_ROOT) else recipe}"
              f" {shlex.join(argv_stage)}", flush=True)
        start = time.perf_counter()
        try:
            if args.launcher:
                env = dict(os.environ, **({"OMP_NUM_THREADS": str(args.torch_threads)} if args.torch_threads else {}))
                subprocess.run([*shlex.split(args.launcher), str(recipe), *argv_stage], check=True, env=env)
                metrics = {}
            else:
                metrics = _load_recipe_main(recipe)(argv_stage) or {}
        except BaseException as e:
            record.update(status="failed", wall_s=round(time.perf_counter() - start, 2), error=repr(e))
            write()
            if threads_before is not None:
                torch.set_num_threads(threads_before)
            print(f"[rxt-pipeline] stage {stage} FAILED after {record['wall_s']:.1f} s: {e!r}", file=sys.stderr)
            raise
        record.update(status="done", wall_s=round(time.perf_counter() - start, 2),
                      metrics={k: v for k, v in metrics.items() if isinstance(v, (int, float, str))})
        model = str(out_dir)
        summary["final_model"] = model
        write()
        print(f"[rxt-pipeline] stage {i}/{len(stages)} {stage} done in {record['wall_s']:.1f} s -> {out_dir}",
              flush=True)
    if threads_before is not None:
        torch.set_num_threads(threads_before)  # an in-process caller gets its setting back
    if summary["final_model"]:
        summary["final_link"] = str(_link_final(root, Path(summary["final_model"])))
    write()
    walls = ", ".join(f"{r['stage']} {r['wall_s']:.1f} s" for r in summary["stages"] if "wall_s" in r)
    print(f"[rxt-pipeline] finished in {summary['total_wall_s']:.1f} s ({walls}); final model {summary['final_model']}"
          f"\n[rxt-pipeline] chat with it: rat-chat --model {summary.get('final_link', summary['final_model'])}",
          flush=True)
    if summary["missing"]:
        print(f"[rxt-pipeline] ERROR: stage(s) {summary['missing']} were skipped: their recipes are missing",
              file=sys.stderr, flush=True)
    return summary


def main(argv=None) -> int:
    """Console entry: exit status 1 when a stage's recipe was missing (the other stages still ran)."""
    summary = run_pipeline(argv)
    return 1 if summary["missing"] else 0


__all__ = ["DESCRIPTIONS", "STAGES", "main", "run_pipeline", "stage_argv"]
