"""Every recipe refuses a launch whose processes would not train as one run, in one line, before any work.

`rat_hf.recipes._config.parse_args` runs `check_distributed_launch` on the parsed `TrainingArguments` (SFTConfig,
GRPOConfig, PPOConfig, the RxT stage configs, ...), so each recipe gets the check by parsing its arguments. The
launches are simulated with the environment `accelerate launch` gives its processes: `ACCELERATE_USE_FSDP=true` from
an FSDP config (refused on CPU: accelerate would silently run DDP), and `WORLD_SIZE=2` (+ `RANK`, `LOCAL_RANK`,
`MASTER_*`) in a process that finds no distributed set-up (no GPU, no `--use_cpu true`): it would train alone.
The recipes are found by listing recipes/, so a new recipe is checked without being registered here.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")  # the chat recipes import it at module level
pytest.importorskip("datasets")

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "recipes/configs"
# rxt_pipeline.py has its own parser and runs the stage recipes, which check (it starts no training of its own)
RECIPES = sorted(p.stem for p in (ROOT / "recipes").glob("*.py") if p.stem != "rxt_pipeline")
FSDP_MESSAGE = "the accelerate config asks for FSDP, which accelerate runs on GPUs only"
# recipes whose own loop trains in one process (no TrainingArguments): every distributed launch is refused
ONE_PROCESS = {"attention_guided_rl": "trains in one process (its loop does not use accelerate's distributed set-up)"}


def load_main(name: str):
    spec = importlib.util.spec_from_file_location(f"recipe_launch_{name}", ROOT / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def tiny_config(name: str) -> Path:
    config = CONFIGS / f"{name}_tiny.yaml"
    assert config.is_file(), f"recipes/{name}.py has no tiny config {config.name}"
    return config


def refusal(main, argv, capsys) -> str:
    """The error a recipe's `main(argv)` stops with: a raised ValueError, or (rat-train) the line it printed."""
    try:
        main(argv)
    except ValueError as error:
        return str(error)
    except SystemExit as stop:
        assert stop.code == 2
        return capsys.readouterr().err.strip()
    pytest.fail("the launch was not refused")


def test_every_recipe_is_listed():
    assert {"sft_chat", "grpo_chat", "ppo_chat", "pretrain_rat", "rxt_pretrain", "rxt_sft", "rxt_memattn", "rxt_smat",
            "rxt_mrl"} <= set(RECIPES)


# What `accelerate launch` tells its processes. LOCAL_RANK is left out of the two-process launch: with it, torch would
# wait at the rendezvous for the second process (tests/test_multi_process.py launches the real two processes).
LAUNCHES = {
    "fsdp-on-cpu": ({"ACCELERATE_USE_FSDP": "true"}, FSDP_MESSAGE),
    "processes-that-train-alone": ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29599"},
                                   "2 processes were launched (WORLD_SIZE=2) but each trains alone"),
}


@pytest.mark.parametrize("launch", list(LAUNCHES))
@pytest.mark.parametrize("name", RECIPES)
def test_a_launch_that_cannot_train_together_is_refused_in_one_line(name, launch, tmp_path, monkeypatch, capsys):
    env, expected = LAUNCHES[launch]
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    output_dir = tmp_path / "out"
    argv = ["--config", str(tiny_config(name)), "--output_dir", str(output_dir)]
    if name in ONE_PROCESS:
        expected = ONE_PROCESS[name]
    else:
        argv += ["--use_cpu", "false"]  # no GPU and no --use_cpu: the process finds no distributed set-up
    message = refusal(load_main(name), argv, capsys)
    assert expected in message and "\n" not in message, message
    assert not output_dir.exists()  # refused before any work


def test_the_command_prints_one_line(tmp_path):
    """`python recipes/rxt_sft.py` under an FSDP config on CPU: one error line on stderr, exit code 2."""
    env = {**os.environ, "ACCELERATE_USE_FSDP": "true", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "recipes/rxt_sft.py"), "--config", str(tiny_config("rxt_sft")),
           "--output_dir", str(tmp_path / "out")]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert errors[-1].startswith(f"recipes/rxt_sft.py: error: {FSDP_MESSAGE}"), errors[-3:]
    assert sum(": error: " in line for line in errors) == 1
    assert not (tmp_path / "out").exists()


def test_every_recipe_command_reports_a_bad_argument_in_one_line(tmp_path):
    """`python recipes/<name>.py --config missing.yaml` for every recipe (the pipeline too): one error line naming
    the file, exit code 2, no traceback. One interpreter runs them all (`runpy`, as `python FILE` would)."""
    names = RECIPES + ["rxt_pipeline"]
    code = (
        "import contextlib, io, runpy, sys\n"
        "for name in sys.argv[1:]:\n"
        "    sys.argv = [f'recipes/{name}.py', '--config', 'missing.yaml']\n"
        "    err = io.StringIO()\n"
        "    with contextlib.redirect_stderr(err):\n"
        "        try:\n"
        "            runpy.run_path(str(ROOT / 'recipes' / f'{name}.py'), run_name='__main__')\n"
        "            status = 0\n"
        "        except SystemExit as stop:\n"
        "            status = stop.code\n"
        "    lines = [x for x in err.getvalue().splitlines() if x.strip()]\n"
        "    print(repr((name, status, lines[-1:] if lines else [], any('Traceback' in x for x in lines))))\n"
    )
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", f"from pathlib import Path; ROOT = Path({str(ROOT)!r})\n" + code,
                             *names], capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    import ast

    rows = [ast.literal_eval(line) for line in result.stdout.splitlines() if line.startswith("(")]
    assert [r[0] for r in rows] == names
    for name, status, last, traceback in rows:
        assert status == 2 and not traceback, (name, status, last)
        assert "missing.yaml" in last[0] and "no such file" in last[0] and ": error: " in last[0], (name, last)
