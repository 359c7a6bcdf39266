"""What the chat recipes share (`recipes/sft_chat.py`, `recipes/grpo_chat.py`, `recipes/ppo_chat.py`).

- Arguments: `ChatModelArguments` (TRL's `ModelConfig` with LoRA on by default, plus the fresh RAT's config and
  tokenizer), `ChatDataArguments` (the offline default dialogs or a chat JSONL in the PPO-chat seed's format), each
  recipe's own (`SFTScriptArguments`, `GRPOScriptArguments`) and the tuples the recipes parse (`SFT_ARGUMENTS`,
  `GRPO_ARGUMENTS`, ending with TRL's `SFTConfig` / `GRPOConfig`).
- Model: `build_model_and_tokenizer` loads a causal LM from a path / Hub id, or builds a fresh RAT in memory with a
  byte-level BPE trained on the conversations (`bpe:N`) or tiktoken's cl100k; RxT is refused in one line
  (`refuse_rxt`). The tokenizer gets a chat template (ours when it has none), a pad token distinct from EOS (a pad that
  is EOS makes collators mask the real end of every answer, and TRL cut completions at the first one) and the padding
  side the trainer wants. `save_base_model` writes a model built or changed here to `output_dir/base_model` and points
  `config._name_or_path` at it: TRL rebuilds its GRPO reference model from that name (beta > 0 without PEFT), and a
  LoRA adapter records it as its base, so both load again.
- Trainer classes: `sft_trainer_class(model)` / `grpo_trainer_class(model)`, the one place that picks them (RAT's
  `gating_mode="reinforce"` needs trainer subclasses to train its selectors under TRL's fused LM head).
- Data: `sft_dataset` (conversations to imitate), `prompt_dataset` (conversations up to a user turn, to generate from);
  rewards: `reward_functions` (by name, the length reward's target bound).
- End of a run: `plot_log_history` (PNG panels from `trainer.state.log_history`), `save_and_push` (adapter, the
  adapter merged into a full model, tokenizer, model card through `rat_hf.hub` (or TRL's / `trainer_card` for other
  architectures), `log_history.json`, push; `model=` names the policy when the trainer's model is more than that)
  and `finish_run`, the recipes' last section (the card's config, `save_and_push`, a summary line, end of training).
"""

import fnmatch
import inspect
import json
import logging
import math
import os
import shlex
from dataclasses import dataclass, field

from trl import GRPOConfig, ModelConfig, SFTConfig

from rat_hf.recipes._config import run_cli  # noqa: F401  (the chat recipes' entry point; lives with parse_args)

logger = logging.getLogger("rat_hf.chat")

# A fresh RAT small enough for CPU tests; a real run passes --model_name_or_path (e.g. a `rat-train` output).
TINY_RAT = ('{"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, '
            '"intermediate_size": 128, "max_position_embeddings": 512}')
BASE_MODEL_DIR = "base_model"  # under output_dir: the starting model when it exists nowhere else
MERGED_DIR = "merged"  # under output_dir: the LoRA adapter merged into the base (what --push_to_hub uploads)
PLOT_FILE = "training_stats.png"


@dataclass
class ChatModelArguments(ModelConfig):
    """TRL's `ModelConfig` (model path, dtype, attention backend, LoRA fields) with LoRA on by default."""

    use_peft: bool = field(default=True, metadata={"help": "train a LoRA adapter (--lora_r, --lora_alpha, "
                                                           "--lora_target_modules) instead of every weight"})
    model_config_overrides: str = field(default=TINY_RAT, metadata={
        "help": "RatConfig fields (JSON) of the fresh RAT built when --model_name_or_path is not given"})
    tokenizer: str = field(default="bpe:1024", metadata={
        "help": "fresh RAT only: bpe:N (a byte-level BPE of N tokens trained on the conversations), cl100k "
                "(tiktoken's, offline) or a tokenizer path / Hub id"})


@dataclass
class ChatDataArguments:
    dataset: str = field(default="default", metadata={
        "help": "'default' (chatterbot-corpus dialogs, offline) or a chat JSONL file in the PPO-chat seed's format "
                "(rat_hf.data.load_chat_jsonl: messages or text lines, an optional quality score)"})
    dialog_language: str = field(default="english", metadata={"help": "language of the default dialogs"})
    max_conversations: int | None = field(default=None, metadata={"help": "use at most this many conversations"})
    min_quality: float | None = field(default=None, metadata={
        "help": "JSONL: leave out conversations whose quality is below this (unscored ones are kept)"})
    skip_invalid_lines: bool = field(default=False, metadata={
        "help": "JSONL: skip malformed lines (counted in a warning) instead of stopping at the first"})


@dataclass
class SFTScriptArguments:
    merge_adapter: bool = field(default=True, metadata={
        "help": "also save the LoRA adapter merged into its base model (output_dir/merged), the folder pushed"})


@dataclass
class GRPOScriptArguments:
    reward_funcs: list[str] = field(default_factory=lambda: ["quality", "length", "format"], metadata={
        "help": "reward names (rat_hf.rewards.REWARD_FUNCS) or module.path:function, weighted by --reward_weights"})
    target_length: float = field(default=50, metadata={"help": "length reward: the best length, in words"})
    max_prompt_length: int = field(default=256, metadata={
        "help": "leave out prompts longer than this many tokens, chat template applied (GRPOTrainer keeps them "
                "whole, so one long history would dominate a batch's memory)"})
    merge_adapter: bool = field(default=True, metadata={
        "help": "also save the LoRA adapter merged into its base model (output_dir/merged), the folder pushed"})


# What each recipe parses (`--config` YAML keys and flags), in this order
SFT_ARGUMENTS = (ChatModelArguments, ChatDataArguments, SFTScriptArguments, SFTConfig)
GRPO_ARGUMENTS = (ChatModelArguments, ChatDataArguments, GRPOScriptArguments, GRPOConfig)


# ---- model and tokenizer ---------------------------------------------------------------------------------------------
def refuse_rxt(config, recipe: str) -> None:
    """One-line ValueError for a Reactive Transformer: these recipes cannot train what it chats with."""
    if getattr(config, "model_type", None) == "rxt":
        raise ValueError(
            f"{recipe}: RxT (model_type 'rxt') is not supported: TRL's trainers score each conversation with one "
            "stateless forward over its whole text, which bypasses RxT's short-term memory (the state it answers "
            "from), so they would train a model that never chats that way; train RxT turn by turn through its "
            "memory with rat_hf.trainers.RxTSMATTrainer on interaction episodes (rat_hf.data.load_interactions, "
            "memory_recall_dataset) instead, or pass a RAT or another causal LM")


def prepare_tokenizer(tokenizer, padding_side: str) -> None:
    """Chat template (ours when it has none), a pad token distinct from EOS, `padding_side`; in place."""
    from rat_hf.tokenization import CHAT_TEMPLATE, PAD_TOKEN

    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no EOS token: completions could not end")
    if not tokenizer.chat_template:
        logger.info("the tokenizer has no chat template: using rat_hf's (<|user|> / <|assistant|> headers)")
        tokenizer.chat_template = CHAT_TEMPLATE
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
        logger.info("pad token %r (id %d) added: a pad equal to EOS would hide every real EOS", PAD_TOKEN,
                    tokenizer.pad_token_id)
    tokenizer.padding_side = padding_side


def check_model_arguments(margs: ChatModelArguments, recipe: str, trust_remote_code: bool = False) -> None:
    """Fail before any work on a model that cannot be used: a checkpoint whose config does not load, an RxT, a fresh
    RAT's fields that are not a JSON object, quantization without a checkpoint."""
    from transformers import AutoConfig

    from rat_hf.cli._common import from_local_or_hub

    if margs.model_name_or_path:
        config = from_local_or_hub(AutoConfig.from_pretrained, margs.model_name_or_path, "--model_name_or_path",
                                   "config.json", trust_remote_code=trust_remote_code, revision=margs.model_revision)
        refuse_rxt(config, recipe)
        return
    if margs.load_in_4bit or margs.load_in_8bit:
        raise ValueError("--load_in_4bit / --load_in_8bit quantize a pretrained checkpoint: pass --model_name_or_path")
    fresh_rat_fields(margs)


def fresh_rat_fields(margs: ChatModelArguments) -> dict:
    """`--model_config_overrides` as a dict of RatConfig fields."""
    try:
        fields = json.loads(margs.model_config_overrides or "{}")
    except json.JSONDecodeError as e:
        raise ValueError(f"--model_config_overrides is not valid JSON: {e}") from None
    if not isinstance(fields, dict):
        raise ValueError(f"--model_config_overrides must be a JSON object of RatConfig fields, got {fields!r}")
    return fields


def build_model_and_tokenizer(margs: ChatModelArguments, texts, recipe: str, padding_side: str,
                              trust_remote_code: bool = False):
    """-> (model, tokenizer, changed): `changed` is True when the model exists only here (built in memory, or
    loaded and then given new token embeddings), so it must be saved before anything reloads it by name."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rat_hf import RatConfig, RatForCausalLM
    from rat_hf.cli._common import from_local_or_hub, from_pretrained_checked, one_line
    from rat_hf.recipes.pretrain import build_tokenizer

    check_model_arguments(margs, recipe, trust_remote_code)  # RxT refused before any weights load
    dtype = None if margs.dtype in (None, "auto") else getattr(torch, margs.dtype)
    if margs.model_name_or_path:
        path, revision = margs.model_name_or_path, margs.model_revision
        try:
            tokenizer = from_local_or_hub(AutoTokenizer.from_pretrained, path, "--model_name_or_path",
                                          trust_remote_code=trust_remote_code, revision=revision)
        except (OSError, ValueError, TypeError, KeyError) as error:
            raise ValueError(f"--model_name_or_path {path!r}: no usable tokenizer ({one_line(error)})") from None
        prepare_tokenizer(tokenizer, padding_side)
        kwargs = {"dtype": dtype} if dtype is not None else {}
        if margs.attn_implementation:
            kwargs["attn_implementation"] = margs.attn_implementation
        if margs.load_in_4bit or margs.load_in_8bit:
            from trl import get_kbit_device_map, get_quantization_config

            kwargs.update(quantization_config=get_quantization_config(margs), device_map=get_kbit_device_map())
        model = from_pretrained_checked(AutoModelForCausalLM, path, what="--model_name_or_path",
                                        trust_remote_code=trust_remote_code, revision=revision, **kwargs)
        resized = len(tokenizer) > model.get_input_embeddings().num_embeddings
        if resized:  # the pad token is new: new rows are the mean of the others (transformers' default)
            model.resize_token_embeddings(len(tokenizer))
        # TRL's reference model and a LoRA adapter's recorded base are reloaded by name alone: another revision
        # than main would silently come back as main
        changed = resized or (revision not in (None, "main") and not os.path.isdir(path))
    else:
        fields = fresh_rat_fields(margs)
        tokenizer = build_tokenizer(margs.tokenizer, texts)
        prepare_tokenizer(tokenizer, padding_side)  # before the model: its vocabulary includes a new pad token
        fields.update(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        model = RatForCausalLM(RatConfig(**fields))
        if dtype is not None:
            model = model.to(dtype)
        changed = True
    model.config.pad_token_id = model.generation_config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config.eos_token_id is None:
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, tokenizer, changed


def save_base_model(model, tokenizer, output_dir: str) -> str:
    """Write the starting model to `output_dir/base_model` (main process; the others wait) and make it the model's
    name, so TRL's reference model and the LoRA adapter's `base_model_name_or_path` load it. Returns the path."""
    from accelerate import PartialState

    path = os.path.abspath(os.path.join(output_dir, BASE_MODEL_DIR))
    state = PartialState()
    with state.main_process_first():
        if state.is_main_process:
            model.save_pretrained(path)
            tokenizer.save_pretrained(path)
    model.config._name_or_path = model.name_or_path = path
    return path


def sft_trainer_class(model):
    """The SFT trainer: `trl.SFTTrainer` that also trains a reinforce-mode RAT's sampled gates (any other model
    trains exactly as under `SFTTrainer`; see rat_hf.trainers.reinforced_gating)."""
    from rat_hf.trainers.reinforced_gating import RatSFTTrainer

    return RatSFTTrainer


def grpo_trainer_class(model):
    """The GRPO trainer: `trl.GRPOTrainer` that also trains a reinforce-mode RAT's sampled gates with the
    completions' advantages (any other model trains exactly as under `GRPOTrainer`)."""
    from rat_hf.trainers.reinforced_gating import RatGRPOTrainer

    return RatGRPOTrainer


# ---- data --------------------------------------------------------------------------------------------------------
def load_conversations(d: ChatDataArguments):
    """-> (Dataset with `messages` (role/content lists) and `quality`, label for the model card)."""
    from datasets import Dataset

    from rat_hf.data import default_dialogs, load_chat_jsonl

    if d.dataset == "default":
        dialogs = default_dialogs(d.dialog_language)
        # the corpus's answers are curated: quality 1.0 (quality_reward then pays the overlap with them in full)
        data = Dataset.from_dict({"messages": dialogs["messages"], "quality": [1.0] * len(dialogs)})
        label = f"chatterbot-corpus/{d.dialog_language} (offline, rat_hf.data.default_dialogs)"
    else:
        if not os.path.isfile(d.dataset):
            raise ValueError(f"--dataset {d.dataset!r}: no such file (pass 'default' or a chat JSONL file)")
        rows = load_chat_jsonl(d.dataset, skip_invalid=d.skip_invalid_lines)
        data = Dataset.from_dict({"messages": [p + c for p, c in zip(rows["prompt"], rows["completion"])],
                                  "quality": rows["quality"]})
        label = os.path.basename(d.dataset)
    if d.min_quality is not None:
        data = data.filter(lambda q: q is None or q >= d.min_quality, input_columns="quality")
    if d.max_conversations:
        data = data.select(range(min(d.max_conversations, len(data))))
    if len(data) == 0:
        raise ValueError(f"--dataset {d.dataset!r}: no conversations left (--min_quality {d.min_quality})")
    return data, label


def sft_dataset(conversations):
    """Conversations with at least one assistant turn, as TRL's conversational `messages` column."""
    kept = conversations.filter(lambda m: any(t["role"] == "assistant" for t in m), input_columns="messages")
    if len(kept) < len(conversations):
        logger.info("%d conversation(s) without an assistant turn left out (nothing to imitate)",
                    len(conversations) - len(kept))
    if len(kept) == 0:
        raise ValueError("--dataset: no conversation has an assistant turn to learn from")
    return kept.select_columns(["messages"])


def prompt_dataset(conversations, tokenizer, max_prompt_length: int):
    """Every conversation cut before each assistant turn (and a conversation ending with the user, whole): TRL's
    conversational `prompt`, the `reference` answer that followed ('' when none) and `quality`, for the rewards.
    Prompts longer than `max_prompt_length` tokens (chat template applied) are left out and counted."""
    from datasets import Dataset

    prompts, references, qualities = [], [], []
    for messages, quality in zip(conversations["messages"], conversations["quality"]):
        cuts = [i for i, t in enumerate(messages) if t["role"] == "assistant" and i > 0]
        cuts += [len(messages)] if messages[-1]["role"] == "user" else []
        for i in cuts:
            prompts.append(messages[:i])
            references.append(messages[i]["content"] if i < len(messages) else "")
            qualities.append(quality)
    lengths = [len(ids) for ids in tokenizer.apply_chat_template(prompts, add_generation_prompt=True,
                                                                 tokenize=True, return_dict=True)["input_ids"]]
    keep = [i for i, n in enumerate(lengths) if n <= max_prompt_length]
    if len(keep) < len(prompts):
        logger.info("%d of %d prompts longer than --max_prompt_length=%d tokens left out", len(prompts) - len(keep),
                    len(prompts), max_prompt_length)
    if not keep:
        raise ValueError(f"--max_prompt_length={max_prompt_length}: every prompt is longer (shortest: "
                         f"{min(lengths)} tokens)")
    return Dataset.from_dict({"prompt": [prompts[i] for i in keep], "reference": [references[i] for i in keep],
                              "quality": [qualities[i] for i in keep]})


def reward_functions(names, target_length):
    """The GRPO/PPO recipes' rewards by name; `length` with `target_length` bound (still logged as length_reward)."""
    from rat_hf.rewards import get_reward_funcs, length_reward, make_length_reward

    return [make_length_reward(target_length) if f is length_reward else f for f in get_reward_funcs(names)]


def message_texts(conversations) -> list:
    """Every turn's text (what a fresh BPE is trained on)."""
    return [t["content"] for messages in conversations["messages"] for t in messages]


# ---- plots, save, push --------------------------------------------------------------------------------------------
def plot_log_history(history: list, panels: dict, path: str) -> None:
    """One panel per title in `panels` ({title: [log keys, fnmatch patterns allowed]}), each key against the step;
    a panel whose keys were never logged says so (e.g. KL with beta = 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    logged = list(dict.fromkeys(k for entry in history for k in entry))
    for ax, (title, patterns) in zip(axes[0], panels.items()):
        keys = [k for p in patterns for k in logged if fnmatch.fnmatchcase(k, p)]
        for key in dict.fromkeys(keys):
            points = [(e["step"], e[key]) for e in history if key in e and "step" in e and math.isfinite(e[key])]
            ax.plot([s for s, _ in points], [v for _, v in points], marker=".", lw=1, label=key)
        if keys:
            ax.legend(fontsize="x-small")
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
        ax.set(xlabel="step", title=title)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


TRAINER_CARD = """---
{{ card_data }}
---

# {{ model_name }}

A causal LM trained with {{ trainer_name }} (`{{ trainer_module }}`) on {{ dataset_name }}{% if base_model %}, starting
from [{{ base_model }}](https://huggingface.co/{{ base_model }}){% endif %}.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{{ repo_id }}")
model = AutoModelForCausalLM.from_pretrained("{{ repo_id }}")
```

## Training

```bash
{{ command }}
```

Final metrics:
{% for name, value in metrics.items() %}
- {{ name }}: {{ value }}
{%- endfor %}
"""


def trainer_card(trainer, *, model_name: str, base_model: str | None, dataset_label: str, tags: list, command: str,
                 metrics: dict):
    """A `huggingface_hub.ModelCard` for a model trained by a trainer without TRL's card (rat_hf's `PPOTrainer`)."""
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(base_model=base_model, library_name="transformers", pipeline_tag="text-generation",
                         model_name=model_name, tags=tags)
    return ModelCard.from_template(
        data, template_str=TRAINER_CARD, model_name=model_name, base_model=base_model,
        trainer_name=type(trainer).__name__, trainer_module=type(trainer).__module__, dataset_name=dataset_label,
        repo_id=trainer.args.hub_model_id or model_name, command=command, metrics=metrics)


def save_and_push(trainer, tokenizer, *, push: bool, method: str, command: str, config: dict, dataset_label: str,
                  panels: dict, merge_adapter: bool = True, model=None) -> str:
    """Save the run into `args.output_dir`, then push when `push` (the recipes clear `args.push_to_hub` before
    training so that `Trainer` does not push every checkpoint, and pass it here).

    output_dir: what `trainer.save_model` writes (the adapter (LoRA) or the full model, the tokenizer; PPO adds its
    value function), `log_history.json`, `training_stats.png`; output_dir/merged: the adapter merged into its base
    (LoRA with `merge_adapter`). The full-model folder gets the model card (rat_hf's for RAT; for other
    architectures TRL's trainers' own, or `trainer_card` for trainers without one) and is what is pushed. Returns
    that folder.

    `model`: the trained causal LM (a `PeftModel` under LoRA) the card, the merge and the push are about; None: the
    trainer's model, unwrapped. PPO passes its policy (`PPOTrainer.model` is the policy and value function together).
    """
    from rat_hf.hub import IGNORE_PATTERNS, TEMPLATES, check_hub_folder, model_card, push_folder_to_hub

    args = trainer.args
    trainer.save_model(args.output_dir)  # adapter or full model, + the tokenizer (processing_class)
    if not trainer.is_world_process_zero():
        return args.output_dir
    history = trainer.state.log_history
    with open(os.path.join(args.output_dir, "log_history.json"), "w") as f:
        json.dump(history, f, indent=1)
    plot_log_history(history, panels, os.path.join(args.output_dir, PLOT_FILE))
    model = model if model is not None else trainer.accelerator.unwrap_model(trainer.model)
    folder = args.output_dir
    is_peft = hasattr(model, "peft_config")
    base_name = model.peft_config["default"].base_model_name_or_path if is_peft else None
    if is_peft and merge_adapter:  # merged from what was saved (base + adapter, on the CPU): the trainer's model
        from peft import AutoPeftModelForCausalLM  # keeps its adapter, and the saved adapter is known to load

        folder = os.path.join(args.output_dir, MERGED_DIR)
        model = AutoPeftModelForCausalLM.from_pretrained(args.output_dir, dtype=model.dtype,
                                                         trust_remote_code=args.trust_remote_code).merge_and_unload()
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    # the last logged value of every metric (the final summary's train_loss and runtime included)
    metrics = {k: v for entry in history for k, v in entry.items()
               if isinstance(v, (int, float)) and k not in ("step", "epoch")}
    shown = {k: round(v, 4) if isinstance(v, float) and math.isfinite(v) else v for k, v in metrics.items()}
    tags = list(dict.fromkeys([*getattr(trainer, "_tag_names", []), method] + (["lora"] if is_peft else [])))
    full_rat = model.config.model_type in TEMPLATES and (merge_adapter or not is_peft)  # a RAT's weights in `folder`
    if full_rat:
        hub_base = base_name if base_name and not os.path.exists(base_name) else None  # a Hub id, not a local path
        card = model_card(model, command=command, config=config, metrics=shown, datasets=[dataset_label],
                          base_model=hub_base, extra_tags=tags)
        card.save(os.path.join(folder, "README.md"))
        check_hub_folder(folder, tokenizer=True)
    else:  # another architecture, or an adapter alone: the trainer's own card (written into output_dir)
        name = os.path.basename(os.path.abspath(args.output_dir))
        if "dataset_name" in inspect.signature(trainer.create_model_card).parameters:  # TRL's trainers
            trainer.create_model_card(model_name=name, dataset_name=dataset_label, tags=tags)
        else:  # a transformers Trainer (rat_hf's PPOTrainer: its model is policy + value function, which
            # transformers' own card code would read as the model)
            base = base_name if is_peft else model.config._name_or_path
            trainer_card(trainer, model_name=name, base_model=base if base and not os.path.exists(base) else None,
                         dataset_label=dataset_label, tags=tags, command=command,
                         metrics=shown).save(os.path.join(args.output_dir, "README.md"))
        if folder != args.output_dir:
            os.replace(os.path.join(args.output_dir, "README.md"), os.path.join(folder, "README.md"))
    if push:
        repo = args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))
        ignore = [*IGNORE_PATTERNS, f"{BASE_MODEL_DIR}/**", f"{MERGED_DIR}/**"]
        if full_rat:  # checks that the remote code is there first
            push_folder_to_hub(folder, repo, token=args.hub_token, private=bool(args.hub_private_repo),
                               ignore_patterns=ignore)
        else:
            from huggingface_hub import HfApi

            api = HfApi(endpoint=os.environ.get("HF_ENDPOINT"), token=args.hub_token)
            repo = api.create_repo(repo, private=bool(args.hub_private_repo), exist_ok=True).repo_id
            api.upload_folder(folder_path=folder, repo_id=repo, ignore_patterns=ignore)
    return folder


def finish_run(trainer, tokenizer, *, recipe: str, argv: list, arguments: tuple, training_fields: tuple, method: str,
               dataset_label: str, panels: dict, push: bool, merge_adapter: bool, summary: tuple, model=None) -> str:
    """The end of a chat recipe's `main()`: `save_and_push`, one summary line, `end_training`; returns the folder.

    The card's config: the non-None fields of the recipe's own dataclasses (`arguments`, later ones winning) and the
    trainer config's `training_fields`; its command `python recipes/{recipe} ARGV`. `summary`: (log key, what it
    is), printed first -> last on the main process, e.g. `("reward", "mean reward")`.
    """
    args = trainer.args
    merged = {}
    for dataclass_obj in arguments:
        merged.update(vars(dataclass_obj))
    config = {k: v for k, v in merged.items() if v is not None}
    config.update({k: getattr(args, k) for k in training_fields})
    folder = save_and_push(trainer, tokenizer, push=push, method=method, dataset_label=dataset_label, panels=panels,
                           command=f"python recipes/{recipe} {shlex.join(argv)}", config=config,
                           merge_adapter=merge_adapter, model=model)
    if trainer.is_world_process_zero():
        key, what = summary
        logged = [e[key] for e in trainer.state.log_history if key in e]
        if logged:
            print(f"{method.upper()}: {what} {logged[0]:.4f} -> {logged[-1]:.4f} over {trainer.state.global_step} "
                  f"steps; model in {folder}")
    trainer.accelerator.end_training()
    return folder
