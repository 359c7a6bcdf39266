"""The README works as written, and so does every shipped recipe config.

* Every ```python block of README.md runs, as written, in a fresh interpreter whose working directory is an empty
  temporary folder (so it cannot lean on files of the checkout or on an earlier block).
* Every command of the ```bash blocks is checked, not run in full (training runs take minutes; the main job and
  `rat-train`'s tiny config already run in tests/test_recipes.py):
  - `pip install ... -e ".[extra]"`: each extra is declared in pyproject.toml;
  - `pip install nox && nox [-s SESSION]`: noxfile.py defines the sessions;
  - `python -m MODULE`: the module exists (`python -m pytest`: the tests folder exists);
  - `python recipes/X.py ARGS`, `accelerate launch --config_file F recipes/X.py ARGS`, `rat-train ARGS`: the script
    or console script exists, F is an accelerate config accelerate itself loads, and ARGS (with their `--config`
    file) parse with the recipe's own argument parser, i.e. every flag and every key of the config is accepted;
  - `rat-generate`/`rat-chat`/`rat-eval`/`rat-test ARGS`: the console script is declared in pyproject.toml and its entry point,
    run in-process with `--help` (the only thing executed), lists every flag of ARGS.
  A command this file does not know how to check fails the test, so a new README command cannot go unchecked.
* Every `recipes/...` path and every accelerate config file named anywhere in the README exists.
* Every recipes/configs/*.yaml parses with the parser of the recipe its header comment names.
"""

import importlib
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
SCRIPTS = PYPROJECT["project"]["scripts"]  # console script -> "module:function"

# recipe script / console script -> (module or recipe file, its argument dataclasses besides TrainingArguments; a
# recipe whose dataclasses include its own training config, named *Config, takes no TrainingArguments). A recipe not
# listed here is loaded from its file and must define `ARGUMENT_TYPES`, the dataclasses its parser takes.
RECIPES = {
    "recipes/pretrain_rat.py": ("rat_hf.recipes.pretrain", ("ModelArguments", "DataArguments", "HubArguments")),
    "rat-train": ("rat_hf.recipes.pretrain", ("ModelArguments", "DataArguments", "HubArguments")),
    "recipes/rlm_next_token.py": ("rat_hf.recipes.rlm_next_token", ("RLMArguments", "ModelArguments")),
    "recipes/attention_guided_rl.py": ("rat_hf.recipes.attention_guided_rl",
                                       ("ModelArguments", "DataArguments", "AttentionGuidedConfig")),
    "recipes/sft_chat.py": ("rat_hf.recipes.chat_common",
                            ("ChatModelArguments", "ChatDataArguments", "SFTScriptArguments", "SFTConfig")),
    "recipes/grpo_chat.py": ("rat_hf.recipes.chat_common",
                             ("ChatModelArguments", "ChatDataArguments", "GRPOScriptArguments", "GRPOConfig")),
    "recipes/rxt_pipeline.py": ("rat_hf.recipes.rxt_pipeline", None),
    **{f"recipes/rxt_{stage}.py": (f"recipes/rxt_{stage}.py", ("ModelArguments", "DataArguments", f"RxT{name}Config"))
       for stage, name in [("pretrain", "Pretrain"), ("sft", "SFT"), ("memattn", "MemAttn"), ("smat", "SMAT"),
                           ("mrl", "MRL")]},
    "recipes/ppo_chat.py": ("recipes/ppo_chat.py",
                            ("ChatModelArguments", "ChatDataArguments", "PPOScriptArguments", "PPOConfig")),
}


def recipe_argument_types(recipe: str) -> tuple:
    """The dataclasses `recipe` parses (from RECIPES, else its file's `ARGUMENT_TYPES`), or its argparse `build_parser()`."""
    import importlib.util

    module_name, names = RECIPES.get(recipe, (recipe, None))
    if module_name.endswith(".py"):  # a script under recipes/: load it by path (its main() only runs as __main__)
        spec = importlib.util.spec_from_file_location(Path(module_name).stem, ROOT / module_name)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    if names is None and hasattr(module, "build_parser"):  # an argparse driver (recipes/rxt_pipeline.py)
        return module.build_parser()
    if names is None:
        assert hasattr(module, "ARGUMENT_TYPES"), f"{recipe} defines no ARGUMENT_TYPES (the dataclasses it parses)"
        return tuple(module.ARGUMENT_TYPES)
    return tuple(getattr(module, n) for n in names)


def blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README, flags=re.S | re.M)


def bash_commands() -> list[str]:
    """Each command of the bash blocks: continuation lines joined, `&&` chains split, comments dropped."""
    commands = []
    for block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                commands += [part.strip() for part in line.split("&&")]
    return commands


def test_readme_has_the_blocks_this_file_checks():
    assert len(blocks("python")) >= 2 and len(bash_commands()) >= 8
    assert set(re.findall(r"^```(\w*)", README, flags=re.M)) <= {"python", "bash", ""}  # no block goes unchecked


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_python_block_runs_as_written(index, tmp_path):
    code = blocks("python")[index]
    env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "2"}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**os.environ, **env})
    assert result.returncode == 0, f"README python block {index + 1} failed:\n{code}\n{result.stderr[-3000:]}"


def parse_recipe_args(recipe: str, argv: list[str]):
    """Parse `argv` with the recipe's own parser (as its `main` does); an unknown flag or config key fails."""
    from transformers import TrainingArguments

    from rat_hf.recipes._config import parse_args

    types = recipe_argument_types(recipe)
    argv = list(argv)
    if not isinstance(types, tuple):  # an argparse parser
        try:
            return types.parse_args(argv)
        except SystemExit as e:
            pytest.fail(f"{recipe} {shlex.join(argv)}: the recipe's parser exits with {e.code}")
    if not torch.cuda.is_available() and "--use_cpu" not in argv:
        # TrainingArguments refuses bf16 (a config's, or TRL's GRPOConfig default) without a GPU unless told to use the CPU
        argv += ["--use_cpu", "true"]
    try:
        own_config = any(t.__name__.endswith("Config") for t in types)
        return parse_args((*types,) if own_config else (*types, TrainingArguments), argv)
    except SystemExit as e:  # argparse's error()
        pytest.fail(f"{recipe} {shlex.join(argv)}: the recipe's parser exits with {e.code}")


def check_console_script(name: str, args: list[str], monkeypatch, capsys) -> None:
    assert name in SCRIPTS, f"README runs {name!r}, which pyproject.toml's [project.scripts] does not declare"
    module_name, function = SCRIPTS[name].split(":")
    entry = getattr(importlib.import_module(module_name), function)
    monkeypatch.setattr(sys, "argv", [name, "--help"])
    capsys.readouterr()
    try:
        code = entry()
    except SystemExit as e:
        code = e.code
    shown = capsys.readouterr().out
    assert code in (0, None), f"{name} --help exits with {code}"
    for flag in (a.split("=", 1)[0] for a in args if a.startswith("--")):
        assert re.search(rf"{re.escape(flag)}\b", shown), f"README: `{name}` has no flag {flag}"


@pytest.mark.parametrize("command", bash_commands(), ids=lambda c: " ".join(c.split()[:3]))
def test_bash_command_is_valid(command, monkeypatch, capsys):
    argv = shlex.split(command)
    if argv[:3] == ["pip", "install", "nox"]:
        assert len(argv) == 3, command
    elif argv[:2] == ["pip", "install"]:
        for extra in re.findall(r"\[(\w+)\]", command):
            assert extra in PYPROJECT["project"]["optional-dependencies"], f"{command}: no extra [{extra}]"
        assert any(a.startswith("-e") for a in argv) and (ROOT / "pyproject.toml").exists()
    elif argv[0] == "nox":  # the test matrix: every session named exists in noxfile.py
        noxfile = (ROOT / "noxfile.py").read_text()
        sessions = argv[argv.index("-s") + 1 :] if "-s" in argv else []
        assert len(argv) == 1 or sessions, command
        for name in sessions:
            assert re.search(rf"^@nox\.session\ndef {name}\(", noxfile, flags=re.M), f"{command}: no session {name}"
    elif argv[:3] == ["python", "-m", "pytest"]:
        assert (ROOT / "tests").is_dir()
    elif argv[:2] == ["python", "-m"]:
        assert importlib.util.find_spec(f"{argv[2]}.__main__") or importlib.util.find_spec(argv[2]), command
    elif argv[0] == "python" and argv[1].startswith("recipes/"):
        assert (ROOT / argv[1]).is_file(), f"{command}: no file {argv[1]}"
        parse_recipe_args(argv[1], argv[2:])
    elif argv[:2] == ["accelerate", "launch"]:
        assert argv[2] == "--config_file", command
        from accelerate.commands.config.config_args import load_config_from_file

        assert (ROOT / argv[3]).is_file(), f"{command}: no file {argv[3]}"
        load_config_from_file(str(ROOT / argv[3]))  # accelerate's own reader: unknown keys or values raise
        assert (ROOT / argv[4]).is_file(), f"{command}: no file {argv[4]}"
        parse_recipe_args(argv[4], argv[5:])
    elif argv[0] == "rat-train":
        assert argv[0] in SCRIPTS
        parse_recipe_args("rat-train", argv[1:])
    elif argv[0].startswith("rat-"):
        check_console_script(argv[0], argv[1:], monkeypatch, capsys)
    else:
        pytest.fail(f"README command {command!r}: tests/test_readme.py does not know how to check it; add a case")


def test_every_recipes_path_and_accelerate_config_named_in_the_readme_exists():
    paths = set(re.findall(r"\brecipes/[\w./-]*[\w/]", README))
    assert paths, "the README names no recipes/ path: is this test still reading the right file?"
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, f"README names missing paths: {missing}"
    named = set(re.findall(r"`([\w-]+\.yaml)`", README)) - {Path(p).name for p in paths}
    missing = sorted(n for n in named if not list((ROOT / "recipes").rglob(n)))
    assert not missing, f"README names missing config files: {missing}"


@pytest.mark.parametrize("config", sorted(p.name for p in (ROOT / "recipes/configs").glob("*.yaml")))
def test_shipped_config_parses_with_its_recipe(config):
    """Each config's header comment names its recipe; every key must be an argument that recipe accepts."""
    text = (ROOT / "recipes/configs" / config).read_text(encoding="utf-8")
    header = "".join(line for line in text.splitlines(keepends=True) if line.startswith("#"))
    recipes = set(re.findall(r"recipes/\w+\.py", header))
    assert len(recipes) == 1, f"{config}: the header comment should name exactly one recipe, got {recipes}"
    recipe = recipes.pop()
    assert isinstance(yaml.safe_load(text), dict)
    parsed = parse_recipe_args(recipe, ["--config", f"recipes/configs/{config}"])
    if recipe == "recipes/rxt_pipeline.py":  # a driver: each stage's config must parse with that stage's recipe
        stages = yaml.safe_load(text)["stages"]
        for stage, settings in stages.items():
            args = parse_recipe_args(f"recipes/rxt_{stage}.py", ["--config", settings["config"]])[-1]
            assert args.output_dir and args.learning_rate > 0
        return
    args = parsed[-1]
    assert args.output_dir and args.learning_rate > 0


def test_accelerate_configs_load():
    from accelerate.commands.config.config_args import load_config_from_file

    files = sorted((ROOT / "recipes/accelerate_configs").glob("*.yaml"))
    assert len(files) >= 4
    for file in files:
        load_config_from_file(str(file))
