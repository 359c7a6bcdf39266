"""PEFT's default target modules for `rat` and `rxt`, so `LoraConfig(task_type=...)` needs no `target_modules`.

PEFT picks defaults from tables keyed by `model_type` (`peft.utils.constants.TRANSFORMERS_MODELS_TO_*_MAPPING`); an
unknown type raises "Please specify `target_modules`". Both models use Llama's projection names (`q_proj ... down_proj`,
`input_layernorm`, ...), so each table gets Llama's entry for them. The tables are module-level dicts that PEFT reads
when a config is applied, so filling them at `import rat_hf` is enough; remote-code users without rat_hf pass
`target_modules` themselves.
"""

MODEL_TYPES = ("rat", "rxt")


def register_peft_defaults() -> None:
    try:
        import peft.utils.constants as constants
    except ImportError:  # peft is a dependency, but the models themselves do not need it
        return
    for name, table in vars(constants).items():
        if name.startswith("TRANSFORMERS_MODELS_TO_") and name.endswith("_MAPPING") and isinstance(table, dict):
            if "llama" in table:
                for model_type in MODEL_TYPES:
                    table.setdefault(model_type, list(table["llama"]))
