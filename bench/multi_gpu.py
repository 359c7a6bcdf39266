"""The recipes on several GPUs through accelerate: DDP, FSDP and DeepSpeed ZeRO-2, checked and measured.

    python bench/multi_gpu.py                 # every visible GPU (N >= 2), bench/results/multi_gpu.json
    python bench/multi_gpu.py --cpu           # tiny configs, 2 processes over gloo on CPU (smoke test, minutes)
    python bench/multi_gpu.py --recipes pretrain_rat --configs multi_gpu,fsdp       # a subset

For each recipe (`recipes/pretrain_rat.py`: RAT `base` preset, 130M with its 8192-token BPE; `recipes/grpo_chat.py`;
the RxT curriculum's `recipes/rxt_smat.py` and `recipes/rxt_mrl.py`; a missing recipe is skipped with a printed line)
and each config in `recipes/accelerate_configs/{multi_gpu,fsdp,deepspeed_zero2}.yaml`:

- one run of `--steps` optimizer steps on N processes, checkpoints at steps/2 and steps: does it complete (exit 0),
  does the saved model (`output_dir`, or `output_dir/merged` for the LoRA chat recipes) reload through
  `AutoModelForCausalLM` and generate, does the last checkpoint hold `model.safetensors` that reloads too;
- a second run resumed from `checkpoint-{steps/2}`: its losses after the resume point against the first run's;
- tokens/s (the recipe's `num_input_tokens_seen`, or TRL's `num_tokens`, between two logged steps, over the time
  between their log lines reaching this script's pipe: warm-up steps and checkpoint saves are left out) and steps/s;
  peak memory per GPU (nvidia-smi's `memory.used`, sampled every 0.2 s: CUDA context and the caching allocator's
  reserve included) or, on CPU, peak RSS per process;
- against one process (`single_gpu.yaml`, the same per-device batch with gradient accumulation over N micro-batches,
  so the same global batch and the same sequences in each step): speed-up of tokens/s, and the largest relative
  difference of the first `--compare_steps` losses. Recipes that sample (GRPO, MRL) draw different completions on
  1 and N processes, so their loss difference is informational (`"comparable": false`).

On CPU (`--cpu`) FSDP is expected to be refused (accelerate shards on GPUs only; `rat-train` says so in one line and
exits, `check_distributed_launch`), DeepSpeed runs when `import deepspeed` works, and every recipe uses its tiny
config. Rows are written to `--out` after each run; running the same command again keeps the rows that are already
there for this device and mode and runs the rest (`--fresh` redoes the chosen ones), so a `--budget_s` cut (default
400 s on GPUs: a row, run and resume, may take two minutes more, within one 10-minute device call) is continued by
the same command.
"""

import argparse
import ast
import datetime
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # rat_hf from this checkout, installed or not
CONFIGS = ["multi_gpu", "fsdp", "deepspeed_zero2"]
# Never let NCCL/PyTorch use NVLink multicast on the lent machines (it can take the host's GPUs down).
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
EXCEPTION = re.compile(r"^(\[rank\d+\]: )?\w+(Error|Exception): ")


@dataclass
class Recipe:
    script: str
    cpu: list  # arguments of the tiny run on CPU
    gpu: list  # arguments of the GPU run
    per_device_batch: dict  # {"cpu": b, "gpu": b}
    steps: dict = field(default_factory=lambda: {"cpu": 6, "gpu": 12})  # optimizer steps of one run
    model_subdir: str = ""  # where the final model is saved inside output_dir ("" or "merged")
    samples: bool = False  # draws completions: 1- and N-process losses are not expected to agree
    needs_rxt_start: bool = False  # continues from an RxT checkpoint (`--model_name_or_path`)
    extra: list = field(default_factory=list)  # arguments every run gets


RECIPES = {
    "pretrain_rat": Recipe(
        "recipes/pretrain_rat.py",
        cpu=["--config", "recipes/configs/pretrain_rat_tiny.yaml", "--model_card", "false"],
        gpu=["--config", "recipes/configs/pretrain_rat_small.yaml", "--preset", "base", "--tokenizer", "bpe:8192",
             "--seq_len", "512", "--learning_rate", "3e-4", "--warmup_steps", "2", "--eval_strategy", "no",
             "--report_to", "none", "--model_card", "false"],
        per_device_batch={"cpu": 8, "gpu": 32}, steps={"cpu": 6, "gpu": 30},
        extra=["--include_num_input_tokens_seen", "true"],
    ),
    "grpo_chat": Recipe(
        "recipes/grpo_chat.py",
        cpu=["--config", "recipes/configs/grpo_chat_tiny.yaml"],
        gpu=["--config", "recipes/configs/grpo_chat_tiny.yaml", "--use_cpu", "false", "--bf16", "true",
             "--model_config_overrides", '{"hidden_size": 512, "num_hidden_layers": 8, "num_attention_heads": 8, '
             '"num_key_value_heads": 8, "intermediate_size": 1536, "max_position_embeddings": 512}',
             "--tokenizer", "bpe:2048", "--max_conversations", "1024", "--num_generations", "8",
             "--max_completion_length", "32", "--learning_rate", "1e-4"],
        per_device_batch={"cpu": 8, "gpu": 32}, model_subdir="merged", samples=True,
    ),
    "rxt_smat": Recipe(
        "recipes/rxt_smat.py",
        cpu=["--config", "recipes/configs/rxt_smat_tiny.yaml"],
        gpu=["--config", "recipes/configs/rxt_smat_tiny.yaml", "--use_cpu", "false", "--bf16", "true",
             "--recall_conversations", "2000", "--max_length", "128"],
        per_device_batch={"cpu": 8, "gpu": 32}, needs_rxt_start=True,
    ),
    "rxt_mrl": Recipe(
        "recipes/rxt_mrl.py",
        cpu=["--config", "recipes/configs/rxt_mrl_tiny.yaml"],
        gpu=["--config", "recipes/configs/rxt_mrl_tiny.yaml", "--use_cpu", "false", "--bf16", "true"],
        per_device_batch={"cpu": 8, "gpu": 32}, samples=True, needs_rxt_start=True,
    ),
}
# The RxT stages continue from a checkpoint: stage 1 (joint pre-training) for a couple of steps makes one.
RXT_START = {
    "cpu": ["--config", "recipes/configs/rxt_pretrain_tiny.yaml", "--max_steps", "2"],
    "gpu": ["--config", "recipes/configs/rxt_pretrain_tiny.yaml", "--max_steps", "2", "--use_cpu", "false",
            "--model_config_overrides", '{"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 6, '
            '"num_attention_heads": 8, "num_key_value_heads": 4, "num_query_heads": 4, "stm_size": 256, '
            '"max_position_embeddings": 512}', "--tokenizer_vocab_size", "4096"],
}


# ---- one launch ---------------------------------------------------------------------------------------------------
class PeakMemory(threading.Thread):
    """Peak memory while a launch runs: per GPU (pynvml, else nvidia-smi) or, on CPU, per process of the launch."""

    def __init__(self, cpu: bool, root_pid: int, interval: float = 0.2):
        super().__init__(daemon=True)
        self.cpu, self.root_pid, self.interval = cpu, root_pid, interval
        self.peaks: dict = {}
        self.stop = threading.Event()

    def sample(self) -> dict:
        if self.cpu:
            import psutil

            try:
                root = psutil.Process(self.root_pid)
                processes = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return {}
            sizes = {}
            for child in processes:
                try:
                    sizes[child.pid] = child.memory_info().rss / 2**20
                except psutil.NoSuchProcess:
                    pass
            return sizes
        out = subprocess.run(["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, check=True).stdout
        return {int(i): float(m) for i, m in (line.split(",") for line in out.strip().splitlines())}

    def run(self) -> None:
        while not self.stop.is_set():
            for key, value in self.sample().items():
                self.peaks[key] = max(self.peaks.get(key, 0.0), value)
            self.stop.wait(self.interval)

    def result(self, processes: int) -> list:
        values = [round(v) for _, v in sorted(self.peaks.items())]
        return sorted(values, reverse=True)[:processes] if self.cpu else values  # CPU: the N workers, not launchers


def launch(script: str, args: list, *, processes: int, config: str | None, cpu: bool, log: Path,
           timeout: float) -> dict:
    """Run one recipe; -> rc, wall time, (arrival time, logged dict) of each training log line, peak memory, the
    recipe's one-line error if any."""
    if config is None and cpu:
        cmd = [sys.executable, str(ROOT / script)]  # one process, no launcher
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / f"recipes/accelerate_configs/{config or 'single_gpu'}.yaml"),
               "--num_processes", str(processes), "--main_process_port", str(free_port())]
        if cpu:
            cmd += ["--mixed_precision", "no"]
        cmd.append(str(ROOT / script))
    cmd += [str(a) for a in args]
    env = {**os.environ, **SAFE_ENV, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    if cpu:
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    start = time.perf_counter()
    lines, errors = [], []
    with open(log, "w") as sink:
        sink.write(" ".join(cmd) + "\n")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                cwd=ROOT)
        memory = PeakMemory(cpu, proc.pid)
        memory.start()
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        for line in proc.stdout:
            now = time.perf_counter() - start
            sink.write(line)
            if line.startswith("{'") and "'loss'" in line:
                lines.append((now, ast.literal_eval(line.strip())))
            elif ": error: " in line or EXCEPTION.match(line):  # the recipe's one-line error, or a traceback's
                errors.append(line.strip())
        rc = proc.wait()
        timer.cancel()
        memory.stop.set()
        memory.join()
    return dict(rc=rc, wall_s=round(time.perf_counter() - start, 1), lines=lines, peak=memory.result(processes),
                error=next((e for e in errors if ": error: " in e), errors[-1] if errors else None),
                command=shown_command(cmd))


def shown_command(cmd: list) -> str:
    """The command as one types it in the checkout: `accelerate launch ...`, `python recipes/...`."""
    text = " ".join(cmd).replace(f"{sys.executable} -m accelerate.commands.launch", "accelerate launch")
    return text.replace(sys.executable, "python").replace(f"{ROOT}/", "")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- what a run left ----------------------------------------------------------------------------------------------
def log_history(output_dir: Path, step: int) -> dict[int, dict]:
    """step -> training log of that step, from checkpoint-{step}/trainer_state.json (full precision)."""
    state = json.loads((output_dir / f"checkpoint-{step}" / "trainer_state.json").read_text())
    return {h["step"]: h for h in state["log_history"] if "loss" in h}


def throughput(run: dict, history: dict, first: int, last: int, global_batch: int) -> dict:
    """tokens/s and steps/s between the log lines of steps `first` and `last` (logging_steps=1: line k is step k)."""
    times = [t for t, _ in run["lines"]]
    if len(times) < last or last <= first:
        return {}
    seconds = times[last - 1] - times[first - 1]
    result = dict(steps_per_s=round((last - first) / seconds, 3),
                  samples_per_s=round((last - first) * global_batch / seconds, 1))
    for key in ("num_input_tokens_seen", "num_tokens"):
        if key in history.get(first, {}) and key in history.get(last, {}):
            result["tokens_per_s"] = round((history[last][key] - history[first][key]) / seconds)
            break
    return result


def loss_diff(a: dict, b: dict, steps) -> dict:
    """Largest absolute and relative difference of the losses of the steps both runs logged (a GRPO loss near 0
    makes the relative one meaningless: read the absolute one there)."""
    pairs = [(a[s]["loss"], b[s]["loss"]) for s in steps if s in a and s in b]
    if not pairs:
        return dict(steps=0)
    return dict(steps=len(pairs), max_abs_diff=max(abs(x - y) for x, y in pairs),
                max_rel_diff=max(abs(x - y) / max(abs(x), 1e-12) for x, y in pairs))


def reload_check(path: Path) -> dict:
    """Load `path` with `AutoModelForCausalLM` (+ its tokenizer) on CPU and greedily generate 4 tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import rat_hf  # noqa: F401  (registers RAT/RxT with the Auto classes)

    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path)
        ids = tokenizer("Hello", return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        return dict(ok=out.shape[1] == ids.shape[1] + 4, path=str(path.relative_to(ROOT)) if path.is_relative_to(ROOT)
                    else str(path), cls=type(model).__name__, params=model.num_parameters())
    except Exception as e:  # recorded in the row and printed: a failed reload is a result of this bench
        return dict(ok=False, path=str(path), error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")


# ---- the bench ----------------------------------------------------------------------------------------------------
def training_args(recipe: Recipe, mode: str, out: Path, steps: int, accumulation: int, batch: int) -> list:
    half = steps // 2
    return [*getattr(recipe, mode), *recipe.extra, "--output_dir", out, "--max_steps", steps, "--logging_steps", 1,
            "--save_strategy", "steps", "--save_steps", half, "--save_total_limit", 3, "--disable_tqdm", "true",
            "--per_device_train_batch_size", batch, "--gradient_accumulation_steps", accumulation, "--seed", 0]


def bench_recipe(name: str, recipe: Recipe, configs: list, a, done: set, rows: list, save) -> None:
    mode = "cpu" if a.cpu else "gpu"
    n = a.num_processes
    steps = a.steps or recipe.steps[mode]
    half = steps // 2
    batch = recipe.per_device_batch[mode]
    work = Path(a.work) / name
    work.mkdir(parents=True, exist_ok=True)
    extra = []
    if recipe.needs_rxt_start:
        start = Path(a.work) / "rxt_start"
        if not (start / "config.json").exists():
            run = launch("recipes/rxt_pretrain.py", [*RXT_START[mode], "--output_dir", start], processes=1,
                         config=None, cpu=a.cpu, log=Path(a.work) / "rxt_start.log", timeout=a.timeout)
            if run["rc"] != 0:
                print(f"{name}: skipped, the RxT start checkpoint failed ({run['error']}; {a.work}/rxt_start.log)")
                return
        extra = ["--model_name_or_path", start]

    def over_budget() -> bool:
        if time.perf_counter() - a.t0 > a.budget_s:
            print(f"time budget of {a.budget_s:.0f} s spent: rerun the same command to continue")
            return True
        return False

    baseline = None
    if (name, "single") not in done:
        if over_budget():
            return
        out = work / "single"
        shutil.rmtree(out, ignore_errors=True)
        run = launch(recipe.script, [*training_args(recipe, mode, out, steps, n, batch), *extra], processes=1,
                     config=None, cpu=a.cpu, log=work / "single.log", timeout=a.timeout)
        row = dict(recipe=name, config="single", processes=1, per_device_batch=batch, gradient_accumulation=n,
                   steps=steps, wall_s=run["wall_s"], command=run["command"], peak_memory_mib=run["peak"])
        if run["rc"] == 0:
            history = log_history(out, half)
            row.update(status="ok", **throughput(run, history, a.warmup, half, batch * n),
                       losses=[history[s]["loss"] for s in sorted(history)])
        else:
            row.update(status="failed", error=run["error"], log=str(work / "single.log"))
        rows.append(row)
        save()
    baseline = next((r for r in rows if r["recipe"] == name and r["config"] == "single"), None)

    for config in configs:
        if (name, config) in done:
            continue
        if over_budget():
            return
        row = dict(recipe=name, config=config, processes=n, per_device_batch=batch, gradient_accumulation=1,
                   steps=steps)
        if config == "deepspeed_zero2" and importlib.util.find_spec("deepspeed") is None:
            rows.append(dict(row, status="skipped", reason="deepspeed is not installed (pip install deepspeed)"))
            print(f"{name} / {config}: skipped, deepspeed is not installed")
            save()
            continue
        out = work / config
        shutil.rmtree(out, ignore_errors=True)
        run = launch(recipe.script, [*training_args(recipe, mode, out, steps, 1, batch), *extra], processes=n,
                     config=config, cpu=a.cpu, log=work / f"{config}.log", timeout=a.timeout)
        row.update(wall_s=run["wall_s"], command=run["command"], peak_memory_mib=run["peak"])
        if run["rc"] != 0:
            expected = a.cpu and config == "fsdp"  # accelerate shards on GPUs only: refusing is the right outcome
            refused = run["error"] is not None and not (out / "model.safetensors").exists()
            row.update(status="refused" if expected and refused else "failed", error=run["error"],
                       log=str(work / f"{config}.log"))
            if expected and not refused:
                row["note"] = "FSDP on CPU must be refused in one line before any training"
            rows.append(row)
            save()
            continue
        if a.cpu and config == "fsdp":  # it ran: accelerate turned FSDP into DDP without a word (no guard in it)
            rows.append(dict(row, status="failed", error="FSDP on CPU ran (as DDP) instead of being refused"))
            save()
            continue
        history = log_history(out, steps)
        row.update(status="ok", **throughput(run, history, a.warmup, half, batch * n),
                   losses=[history[s]["loss"] for s in sorted(history)])
        row["reload_final"] = reload_check(out / recipe.model_subdir)
        last = out / f"checkpoint-{steps}"
        row["reload_checkpoint"] = (reload_check(last) if (last / "model.safetensors").exists() else
                                    dict(ok=False, files=sorted(p.name for p in last.iterdir())[:12]))
        if baseline and baseline.get("status") == "ok":
            compare = range(1, min(a.compare_steps, half) + 1)
            single = {s: {"loss": v} for s, v in enumerate(baseline["losses"], start=1)}
            row["loss_vs_1_process"] = dict(comparable=not recipe.samples, **loss_diff(single, history, compare))
            if row.get("tokens_per_s") and baseline.get("tokens_per_s"):
                row["speedup_vs_1_process"] = round(row["tokens_per_s"] / baseline["tokens_per_s"], 3)
        # resume from the half-way checkpoint into a new folder; losses after it against the first run's
        again = work / f"{config}_resumed"
        shutil.rmtree(again, ignore_errors=True)
        resumed = launch(recipe.script, [*training_args(recipe, mode, again, steps, 1, batch), *extra,
                                         "--resume_from_checkpoint", out / f"checkpoint-{half}"],
                         processes=n, config=config, cpu=a.cpu, log=work / f"{config}_resumed.log", timeout=a.timeout)
        if resumed["rc"] == 0:
            after = log_history(again, steps)
            row["resume"] = dict(ok=max(after) == steps, wall_s=resumed["wall_s"],
                                 **loss_diff(history, after, range(half + 1, steps + 1)))
        else:
            row["resume"] = dict(ok=False, error=resumed["error"], log=str(work / f"{config}_resumed.log"))
        if row["status"] == "ok" and not (row["reload_final"]["ok"] and row["resume"]["ok"]):
            row["status"] = "failed"
        rows.append(row)
        save()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu", action="store_true", help="tiny configs, processes over gloo on CPU")
    parser.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated: " + ", ".join(RECIPES))
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated: " + ", ".join(CONFIGS))
    parser.add_argument("--num_processes", type=int, default=None, help="default: visible GPUs (--cpu: 2)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: the recipe's, "
                        "30 for pretrain_rat and 12 for the others on GPUs, 6 on CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="steps left out of tokens/s (default 3; --cpu 1)")
    parser.add_argument("--compare_steps", type=int, default=10, help="first steps whose 1- and N-process losses "
                        "are compared")
    parser.add_argument("--budget_s", type=float, default=None, help="start no new run after this many seconds "
                        "(default 400 on GPUs, to end within one 10-minute call; none on CPU)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds one launch may take")
    parser.add_argument("--work", default=None, help="outputs and logs of the runs (default /tmp/rat_multi_gpu)")
    parser.add_argument("--out", default=None, help="default bench/results/multi_gpu.json (--cpu: "
                        "bench/results/multi_gpu_cpu.json)")
    parser.add_argument("--fresh", action="store_true", help="rerun the chosen rows, also those already in --out")
    a = parser.parse_args(argv)
    import torch

    gpus = torch.cuda.device_count()
    if not a.cpu and gpus < 2:
        parser.error(f"{gpus} GPU(s) visible: this bench needs 2 or more (or --cpu for the smoke test)")
    a.num_processes = a.num_processes or (2 if a.cpu else gpus)
    a.warmup = a.warmup or (1 if a.cpu else 3)
    a.budget_s = a.budget_s or (float("inf") if a.cpu else 400)
    a.work = a.work or "/tmp/rat_multi_gpu"
    a.out = a.out or str(ROOT / ("bench/results/multi_gpu_cpu.json" if a.cpu else "bench/results/multi_gpu.json"))
    a.t0 = time.perf_counter()
    if a.steps is not None and (a.steps < 4 or a.steps % 2):
        parser.error("--steps must be even and >= 4 (checkpoints at steps/2 and steps)")
    unknown = [x for x in a.recipes.split(",") if x not in RECIPES] + [
        x for x in a.configs.split(",") if x not in CONFIGS]
    if unknown:
        parser.error(f"unknown recipe/config {unknown}")

    device = "cpu" if a.cpu else torch.cuda.get_device_name(0)
    previous = json.loads(Path(a.out).read_text()) if Path(a.out).exists() else {}
    same = previous.get("device") == device and previous.get("num_processes") == a.num_processes
    chosen = {(r, c) for r in a.recipes.split(",") for c in ["single", *a.configs.split(",")]}
    rows = [r for r in previous.get("rows", []) if r["status"] in ("ok", "refused", "skipped")
            and not (a.fresh and (r["recipe"], r["config"]) in chosen)] if same else []
    done = {(r["recipe"], r["config"]) for r in rows}
    Path(a.work).mkdir(parents=True, exist_ok=True)

    def save() -> None:
        import accelerate
        import transformers

        record = dict(device=device, devices=a.num_processes if not a.cpu else 0, num_processes=a.num_processes,
                      date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                      command="python " + " ".join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]),
                      torch=torch.__version__, transformers=transformers.__version__,
                      accelerate=accelerate.__version__,
                      deepspeed=_version("deepspeed"), trl=_version("trl"), rows=rows)
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(record, indent=1) + "\n")

    for name in a.recipes.split(","):
        recipe = RECIPES[name]
        if not (ROOT / recipe.script).exists():
            print(f"{name}: skipped, {recipe.script} does not exist in this checkout")
            continue
        bench_recipe(name, recipe, a.configs.split(","), a, done, rows, save)
    save()
    print_rows(rows)
    print(f"wrote {a.out}; logs and outputs in {a.work}")
    return 0 if all(r["status"] in ("ok", "refused", "skipped") for r in rows) else 1


def _version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def print_rows(rows: list) -> None:
    columns = ["recipe", "config", "processes", "status", "tokens_per_s", "speedup_vs_1_process", "peak_memory_mib",
               "loss_diff_1_vs_n", "resume_diff", "reload", "wall_s"]
    table = []
    for r in rows:
        compare, resume = r.get("loss_vs_1_process") or {}, r.get("resume") or {}
        sampled = not compare.get("comparable", True)
        diff = compare.get("max_abs_diff" if sampled else "max_rel_diff")
        table.append({**r, "loss_diff_1_vs_n": "" if diff is None else f"{diff:.1e}" + (" abs, sampled" if sampled
                                                                                       else " rel"),
                      "resume_diff": "" if resume.get("max_abs_diff") is None else f"{resume['max_abs_diff']:.1e} abs",
                      "reload": {True: "yes", False: "NO"}.get((r.get("reload_final") or {}).get("ok"), ""),
                      "status": r["status"] + (f": {r['error']}" if r.get("error") else "")[:120]})
    widths = [max(len(c), *(len(str(t.get(c, ""))) for t in table)) if table else len(c) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for t in table:
        print("  ".join(str(t.get(c, "")).ljust(w) for c, w in zip(columns, widths)))


if __name__ == "__main__":
    sys.exit(main())
