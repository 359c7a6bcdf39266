"""Argument parsing shared by the recipes: `HfArgumentParser` dataclasses + an optional `--config` file.

`--config FILE` (YAML or JSON) supplies defaults and the command line overrides them, as with TRL's `TrlParser`.
The RAT seed's JSON layout (`{"model": {...}, "trainer": {...}, "dataset": {...}, "tokenizer_path": ...}`) is
recognised and translated, so its config files work unchanged.

`parse_args` also refuses a launch whose processes would not train as one run (`check_distributed_launch`; for a
recipe without `TrainingArguments`, any distributed launch: `check_single_process_launch`), for every recipe, before
any data or model work; `run_cli` turns a recipe's `main()` into a command whose user errors
(`ValueError`) are one line on stderr, exit code 2.
"""

import json
import os
import sys

from transformers import HfArgumentParser, TrainingArguments

# The seed's trainer/dataset keys -> our argument names (its model keys are RatConfig aliases and pass through).
_SEED_TRAINER_KEYS = {
    "lr": "learning_rate", "warmup_steps": "warmup_steps", "max_steps": "max_steps", "weight_decay": "weight_decay",
    "grad_clip": "max_grad_norm", "accum_steps": "gradient_accumulation_steps", "checkpoint_dir": "output_dir",
}
_SEED_DATASET_KEYS = {
    "dataset_name": "dataset", "dataset_config": "dataset_config", "seq_len": "seq_len",
    "batch_size": "per_device_train_batch_size", "num_samples": "max_train_sequences", "max_texts": "max_docs",
}


def load_config_file(path: str) -> dict:
    """Read a YAML/JSON recipe config into flat argument names; errors name the file and the problem."""
    if not os.path.isfile(path):
        raise ValueError(f"--config {path!r}: no such file")
    with open(path) as f:
        text = f.read()
    try:
        if path.endswith(".json"):
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # json.JSONDecodeError, or yaml's own YAMLError subclasses
        raise ValueError(f"--config {path!r} is not valid {'JSON' if path.endswith('.json') else 'YAML'}: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"--config {path!r}: expected a mapping at the top level, got {type(data).__name__}")
    seed_layout = any(isinstance(data.get(k), dict) for k in ("model", "trainer", "dataset"))
    return from_seed_layout(data, path) if seed_layout else data


def from_seed_layout(data: dict, path: str = "<config>") -> dict:
    """Translate the RAT seed's nested JSON config into flat recipe arguments."""
    flat = {}
    unknown = set(data) - {"model", "trainer", "dataset", "tokenizer_path"}
    if unknown:
        raise ValueError(f"--config {path!r}: unknown top-level keys {sorted(unknown)} in the seed's config layout")
    if "model" in data:
        model = data["model"]
        if not isinstance(model, dict) or not model:  # `"model": null` used to fall back to the preset silently
            raise ValueError(f"--config {path!r}: \"model\" must be a mapping of model fields (the seed's d_model, "
                             f"n_layers, ... or RatConfig's), got {model!r}; leave the key out to train a --preset")
        flat["model_config_overrides"] = dict(model)
    for section, mapping in (("trainer", _SEED_TRAINER_KEYS), ("dataset", _SEED_DATASET_KEYS)):
        for key, value in (data.get(section) or {}).items():
            if key not in mapping:
                raise ValueError(f"--config {path!r}: unknown key {section}.{key}; known: {sorted(mapping)}")
            flat[mapping[key]] = value
    if "tokenizer_path" in data:
        flat["tokenizer"] = data["tokenizer_path"]
    return flat


class _Parser(HfArgumentParser):
    """Usage errors in one line: the usage of every TrainingArguments flag is hundreds of lines."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (--help lists the arguments)\n")


def parse_args(dataclass_types, argv=None, prog: str | None = None):
    """Parse `argv` into the dataclasses, with `--config FILE` values as defaults that the command line overrides."""
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = [part for arg in argv for part in (arg.split("=", 1) if arg.startswith("--config=") else [arg])]
    parser = _Parser(dataclass_types, prog=prog)
    parser.add_argument("--config", default=None, help="YAML/JSON file of arguments (command-line flags override it)")
    config = {}
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            parser.error("--config needs a file path")
        config = load_config_file(argv[i + 1])
        del argv[i : i + 2]
    known = {action.dest for action in parser._actions}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(f"--config: unknown arguments {unknown}; see --help for the accepted ones")
    parser.set_defaults(**config)
    outputs = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    objs, extra = outputs[: len(dataclass_types)], outputs[-1]  # (a Namespace holding --config sits in between)
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    training = [obj for obj in objs if isinstance(obj, TrainingArguments)]  # SFTConfig, GRPOConfig, PPOConfig, ...
    if training:
        check_distributed_launch(training[0])
    else:
        check_single_process_launch(prog or parser.prog)
    return objs


def check_distributed_launch(args: TrainingArguments) -> None:
    """Refuse a launch whose processes would not train as one run (a silent wrong result otherwise).

    `accelerate launch --num_processes N` starts N processes whatever the machine can do with them. Without GPUs and
    without `--use_cpu true` each process finds no distributed setup and trains a full copy of the model on its own,
    all writing the same `output_dir`; FSDP asked for on CPU is dropped by accelerate for plain DDP (it shards on
    GPUs only). `args.world_size` (from accelerate's `PartialState`, built by `TrainingArguments`) is what `Trainer`
    will use; `WORLD_SIZE` and `ACCELERATE_USE_FSDP` are what the launcher asked for.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    state = args.distributed_state  # accelerate's PartialState; None only without a launcher or device set-up
    kind = state.distributed_type.value if state is not None else "NO"
    if launched > 1 and args.world_size != launched:
        raise ValueError(
            f"{launched} processes were launched (WORLD_SIZE={launched}) but each trains alone (distributed type "
            f"{kind}, world_size {args.world_size}): they would train {launched} independent models into one "
            "output_dir. On GPUs check that each process sees one (CUDA_VISIBLE_DEVICES); on CPU add --use_cpu true "
            "(DDP over gloo)")
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and kind in ("MULTI_CPU", "NO"):
        raise ValueError(
            f"the accelerate config asks for FSDP, which accelerate runs on GPUs only: on {kind} it would silently "
            "train with DDP instead; use recipes/accelerate_configs/multi_gpu.yaml (DDP) on CPU")


def check_single_process_launch(prog: str) -> None:
    """A recipe without `TrainingArguments` (its own loop, no accelerate): refuse any distributed launch, where each
    process would train its own copy into the same output directory."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if launched > 1 or fsdp:
        asked = f"{launched} processes were launched (WORLD_SIZE={launched})" if launched > 1 else \
            "the accelerate config asks for FSDP"
        raise ValueError(f"{asked} but {prog} trains in one process (its loop does not use accelerate's distributed "
                         "set-up): run it with python, or accelerate launch --num_processes 1 without FSDP")


def run_cli(main, prog: str) -> None:
    """`main()` as a command: an error the user can fix (a ValueError: bad argument, missing file, malformed line,
    a refused model or launch) is one line on stderr and exit code 2; `--traceback` shows the full traceback; other
    exceptions (bugs) keep theirs."""
    from rat_hf.cli._common import report_error

    traceback = "--traceback" in sys.argv
    if traceback:
        sys.argv.remove("--traceback")
    try:
        main()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except ValueError as error:
        if traceback:
            raise
        report_error(prog, error)
        raise SystemExit(2) from None
