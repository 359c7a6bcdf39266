"""What the Reactive Transformer curriculum's trainers share: parts, turns, padding, the stage trainer base, curves.

- `RXT_PARTS` names the parts of an RxT by parameter-name prefix (`embeddings`, `decoder`, `encoder`,
  `memory_attention`, `memory_init`, `mlm_head`); `set_trainable_parts` freezes everything else and
  `parts_without_gradients` names the trainable parts a backward pass did not reach.
- `record_turns` reads a record in either conversation layout (`{"query", "answer", "interactions"}` as
  `rat_hf.data.interactions` writes it, or chat `{"messages": [...]}` as `default_dialogs()` does) as
  `(query, answer)` pairs; `tokenize_turn` makes the encoder's view of one finished interaction,
  `[Q] query [A] answer EOS`; `pad_rows` / `pad_turns` pad them into `[B, T]` / `[B, N, T]` tensors with masks;
  `tokenize_episodes` + `EpisodeCollator` turn a dataset of conversations into `[B, N, T]` batches of turns.
- `RxTStageTrainer` is the `Trainer` every stage subclasses: it checks that the model is an `RxTForPreTraining`
  (whose one `forward` runs encoder, memory attention and decoder, so DDP synchronises all of them), freezes the
  parts the stage does not train, refuses to go on when a part it trains got no gradient in the first step (a
  memory-aware stage silently training like a stateless decoder is the bug this exists for), logs the loss parts
  next to `loss`, and normalises the loss for gradient accumulation itself (`model_accepts_loss_kwargs = False`).
- `plot_log_history` draws the logged curves of a run into a PNG.
- For the recipes: `offline_conversations` (default dialogs + synthetic memory recall, no download),
  `load_conversations`, `load_stage_model` (the previous stage's directory -> `RxTForPreTraining` + tokenizer) and
  `finish_stage` (save, curves PNG, model card, push).

Memory is threaded explicitly: a stage passes `memory=` into the model's forward and reads `outputs.memory` back;
nothing is stored on the model.
"""

import inspect
import logging
import math
import os
from collections import defaultdict

import torch
from transformers import Trainer

from ._ddp import configure_ddp_for_unused_parameters

logger = logging.getLogger("rat_hf.trainers")

# Parameter-name prefixes of each part, as `RxTForPreTraining.named_parameters()` spells them.
RXT_PARTS = {
    "embeddings": ("model.embed_tokens.",),
    "decoder": ("model.layers.", "model.norm.", "lm_head."),
    "encoder": ("model.encoder.",),
    "memory_attention": ("model.memory_attention.",),
    "memory_init": ("model.memory_init",),
    "mlm_head": ("mlm_head.",),
}


def part_of(name: str) -> str | None:
    """The part a parameter name belongs to (None for none of them)."""
    for part, prefixes in RXT_PARTS.items():
        if name.startswith(prefixes):
            return part
    return None


def check_parts(parts, where: str) -> list:
    """`parts` as a list, ValueError naming `where` if one is not in `RXT_PARTS` or the list is empty."""
    parts = list(parts or [])
    unknown = sorted(set(parts) - set(RXT_PARTS))
    if unknown or not parts:
        raise ValueError(f"{where}={parts!r} is invalid: choose parts among {sorted(RXT_PARTS)}")
    return parts


def set_trainable_parts(model, parts) -> dict:
    """Train exactly `parts` of `model` (others get `requires_grad=False`); returns `{part: parameter count}`."""
    counts = defaultdict(int)
    for name, param in model.named_parameters():
        part = part_of(name)
        param.requires_grad_(part in parts)
        if part in parts:
            counts[part] += param.numel()
    missing = [p for p in parts if not counts[p]]
    if missing:
        raise ValueError(f"the model has no parameters for the parts {missing} (is it an RxTForPreTraining?)")
    return dict(counts)


def parts_without_gradients(model, parts) -> list:
    """The trainable parts among `parts` none of whose parameters holds a non-zero gradient."""
    reached = set()
    for name, param in model.named_parameters():
        part = part_of(name)
        if part in parts and param.requires_grad and param.grad is not None and bool(param.grad.ne(0).any()):
            reached.add(part)
    return [p for p in parts if p not in reached]


# --- turns ----------------------------------------------------------------------------------------------------------
def record_turns(record: dict, where: str = "record") -> list:
    """`(query, answer)` pairs of a conversation record, in order; ValueError naming `where` for another layout.

    Accepted: `{"query", "answer", "interactions": [{"query", "answer"}, ...]}` (`interactions` optional) and chat
    `{"messages": [{"role": "user" | "assistant", "content"}, ...]}` (a system message is skipped; a trailing user
    message without an answer is dropped).
    """
    record = dict(record)  # `datasets` hands over lazy row objects
    if "messages" in record and record["messages"] is not None:
        turns, query = [], None
        for i, message in enumerate(record["messages"]):
            role, content = message.get("role"), message.get("content")
            if not isinstance(content, str):
                raise ValueError(f"{where}: messages[{i}].content must be a string")
            if role == "system":
                continue
            if role == "user" and query is None:
                query = content
            elif role == "assistant" and query is not None:
                turns.append((query, content))
                query = None
            else:
                raise ValueError(f"{where}: messages[{i}] has role {role!r}; expected user and assistant turns "
                                 "alternating, starting with the user")
        return turns
    from ..data.interactions import normalize_interaction, turns

    return turns(normalize_interaction(record, where))


def tokenize_turn(tokenizer, query: str, answer: str, max_length: int | None = None) -> list:
    """Token ids of one finished interaction as the encoder reads it: `[Q] query [A] answer EOS` (right-truncated)."""
    from ..data.interactions import tokenize_interaction

    return tokenize_interaction(tokenizer, query, answer, max_length=max_length or None)["input_ids"]


def pad_rows(rows: list, pad_value: int, length: int | None = None) -> torch.Tensor:
    """`[B, T]` long tensor of `rows` right-padded with `pad_value` to `length` (default: the longest row)."""
    length = max([len(r) for r in rows] + [1]) if length is None else length
    return torch.tensor([list(r) + [pad_value] * (length - len(r)) for r in rows], dtype=torch.long)


def pad_turns(episodes: list, pad_value: int) -> tuple:
    """`(ids [B, N, T], mask [B, N, T])` of `episodes` (lists of token-id lists); missing turns are all padding."""
    turns = max([len(e) for e in episodes] + [1])
    length = max([len(t) for e in episodes for t in e] + [1])
    ids = torch.full((len(episodes), turns, length), pad_value, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, episode in enumerate(episodes):
        for n, turn in enumerate(episode):
            ids[b, n, :len(turn)] = torch.tensor(turn, dtype=torch.long)
            mask[b, n, :len(turn)] = 1
    return ids, mask


def tokenize_episodes(dataset, tokenizer, max_turns: int, max_length: int | None = None, what: str = "dataset"):
    """`dataset` of conversation records -> a dataset with one column `turn_input_ids`: per record, its first
    `max_turns` interactions as `tokenize_turn` ids. A dataset that already has the column is returned as is."""
    if dataset is None or "turn_input_ids" in dataset.column_names:
        return dataset

    def tokenize(record, index):
        pairs = record_turns(record, f"{what}[{index}]")[:max_turns]
        return {"turn_input_ids": [tokenize_turn(tokenizer, q, a, max_length) for q, a in pairs]}

    tokenized = dataset.map(tokenize, with_indices=True, remove_columns=dataset.column_names, desc="tokenize turns")
    return tokenized.filter(lambda r: len(r["turn_input_ids"]) > 0, desc="drop empty conversations")


class EpisodeCollator:
    """Rows of `turn_input_ids` -> `turn_input_ids` and `turn_attention_mask`, `[B, N, T]` (missing turns: all pad,
    which `update_memory` treats as "keep the memory")."""

    def __init__(self, pad_token_id: int):
        if pad_token_id is None:
            raise ValueError("EpisodeCollator: the tokenizer has no pad token")
        self.pad_token_id = pad_token_id

    def __call__(self, features: list) -> dict:
        ids, mask = pad_turns([f["turn_input_ids"] for f in features], self.pad_token_id)
        return {"turn_input_ids": ids, "turn_attention_mask": mask}


# --- the stage trainer ----------------------------------------------------------------------------------------------
class RxTStageTrainer(Trainer):
    """Base of the curriculum's trainers; `args` must have `trained_parts` (a list of `RXT_PARTS` names).

    Subclasses implement `compute_loss` with one or more forwards of the (wrapped) model and call
    `self.record(name=value, ...)` for every loss part they want logged.
    """

    stage_name = "RxT stage"

    def __init__(self, model=None, args=None, **kwargs):
        if model is None or args is None:
            raise ValueError(f"{type(self).__name__}: pass model= and args=")
        if not (hasattr(model, "mlm_head") and hasattr(model, "update_memory")
                and "encoder_input_ids" in inspect.signature(model.forward).parameters):
            raise ValueError(f"{type(self).__name__}: the model must be an RxTForPreTraining (got {type(model).__name__}); "
                             "load a checkpoint of any RxT class with RxTForPreTraining.from_pretrained(path)")
        parts = check_parts(args.trained_parts, f"{type(args).__name__}.trained_parts")
        counts = set_trainable_parts(model, parts)
        logger.info("%s trains %s", self.stage_name, ", ".join(f"{p} ({n:,} parameters)" for p, n in counts.items()))
        if (chosen := configure_ddp_for_unused_parameters(model, args)) is not None:
            logger.info("%s: %s", type(self).__name__, chosen)
        super().__init__(model=model, args=args, **kwargs)
        # the loss each stage returns is a mean over its own items: Trainer divides it by the accumulation steps
        self.model_accepts_loss_kwargs = False
        self._part_sums: dict[str, float] = defaultdict(float)
        self._part_counts: dict[str, int] = defaultdict(int)
        self._gradients_checked = False

    def record(self, **values) -> None:
        """Add loss parts (tensors or floats) to the means logged at the next logging step."""
        for key, value in values.items():
            if value is None:
                continue
            value = float(value.detach().float().mean()) if torch.is_tensor(value) else float(value)
            self._part_sums[key] += value
            self._part_counts[key] += 1

    def training_step(self, model, inputs, *args, **kwargs):
        loss = super().training_step(model, inputs, *args, **kwargs)
        if not self._gradients_checked:
            self._gradients_checked = True
            if not (self.is_deepspeed_enabled or self.is_fsdp_enabled):  # those keep gradients elsewhere
                missing = parts_without_gradients(self.accelerator.unwrap_model(model), self.args.trained_parts)
                if missing:
                    raise RuntimeError(
                        f"{type(self).__name__}: {', '.join(missing)} received no gradient in the first step, so this "
                        f"stage would train without {'them' if len(missing) > 1 else 'it'}; with gradient "
                        "checkpointing use gradient_checkpointing_kwargs={'use_reentrant': False}, or drop the part "
                        "from trained_parts")
        return loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation is the stage's own loss (its inputs are not a plain model call's)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs:  # a training log: the means of the parts recorded since the last one
            for key, total in self._part_sums.items():
                logs[key] = self._mean_over_processes(total / self._part_counts[key])
            self._part_sums.clear()
            self._part_counts.clear()
        super().log(logs, *args, **kwargs)

    def _mean_over_processes(self, value: float) -> float:
        if self.accelerator.num_processes == 1:
            return round(value, 6)
        tensor = torch.tensor([value], device=self.accelerator.device)
        return round(self.accelerator.reduce(tensor, reduction="mean").item(), 6)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if not (self.is_fsdp_enabled or self.is_deepspeed_enabled):
            from .rat_trainer import check_checkpoint

            check_checkpoint(resume_from_checkpoint, world_size=self.args.world_size,
                             process_index=self.args.process_index)
        return super()._load_from_checkpoint(resume_from_checkpoint, model)


# --- data and checkpoints for the recipes ---------------------------------------------------------------------------
def offline_conversations(recall_conversations: int = 1000, recall_distances=(0, 1, 2), dialogs: bool = True,
                          seed: int = 0):
    """Conversations from data that ships with the installation, in the interactions layout (`query`, `answer`,
    `interactions`): chatterbot-corpus dialogs (`default_dialogs()`, when `dialogs`) and `recall_conversations`
    synthetic memory-recall conversations spread over `recall_distances` (`memory_recall_dataset`)."""
    from datasets import Dataset

    from ..data import default_dialogs, memory_recall_dataset

    rows = []
    if dialogs:
        for i, record in enumerate(default_dialogs()):
            pairs = record_turns(record, f"default_dialogs()[{i}]")
            if pairs:
                rows.append({"query": pairs[0][0], "answer": pairs[0][1],
                             "interactions": [{"query": q, "answer": a} for q, a in pairs[1:]]})
    distances = list(recall_distances)
    for i, distance in enumerate(distances):
        count = recall_conversations // len(distances) + (i < recall_conversations % len(distances))
        if count:
            recall = memory_recall_dataset(count, distance, seed=seed * 1000 + i)
            rows += [{"query": r["query"], "answer": r["answer"], "interactions": r["interactions"]} for r in recall]
    if not rows:
        raise ValueError("offline_conversations: no conversations (dialogs=False and recall_conversations=0)")
    return Dataset.from_list(rows).shuffle(seed=seed)


def load_conversations(name: str, split: str = "train", **offline_kwargs):
    """`"offline"` (`offline_conversations(**offline_kwargs)`), a local JSON/JSONL file of conversation records, or a
    Hub dataset name; the records are checked when a trainer tokenizes them (`record_turns`)."""
    if name == "offline":
        return offline_conversations(**offline_kwargs)
    from datasets import load_dataset

    if os.path.exists(name):
        if not name.endswith((".json", ".jsonl")):
            raise ValueError(f"--dataset {name!r}: a local file must be JSON or JSONL conversation records")
        return load_dataset("json", data_files=name, split="train")
    return load_dataset(name, split=split)


def load_stage_model(name_or_path: str, **kwargs):
    """`(RxTForPreTraining, tokenizer)` from a previous stage's output directory (or any RxT checkpoint: a missing
    MLM head starts fresh, with a warning from transformers)."""
    from transformers import AutoTokenizer

    from ..models.rxt import RxTForPreTraining
    from ..tokenization.special_tokens import check_tokenizer_matches

    model = RxTForPreTraining.from_pretrained(name_or_path, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    check_tokenizer_matches(model.config, tokenizer, where=f"--model_name_or_path {name_or_path!r}")
    return model, tokenizer


def finish_stage(trainer, tokenizer, *, command: str, curves: list, title: str, config: dict | None = None,
                 datasets=None, push: bool = False) -> dict:
    """Save the stage's model (loadable as `RxTForCausalLM`, `RxTForMaskedLM` or `RxTForPreTraining`, also as remote
    code) and tokenizer, the curves as `training.png`, a model card, and push the folder when asked; returns the
    final training metrics."""
    args = trainer.args
    logs = trainer.state.log_history
    last = next((h for h in reversed(logs) if "loss" in h), {})  # the last training log, then the run's summary
    metrics = {k: v for k, v in {**last, **(logs[-1] if logs else {})}.items() if isinstance(v, (int, float))}
    trainer.save_model(args.output_dir)
    if not trainer.is_world_process_zero():
        return metrics
    tokenizer.save_pretrained(args.output_dir)
    plot_log_history(trainer.state.log_history, os.path.join(args.output_dir, "training.png"), curves, title)
    from ..hub import model_card

    model = trainer.accelerator.unwrap_model(trainer.model)
    shown = {k: (round(v, 4) if isinstance(v, float) and math.isfinite(v) else v) for k, v in metrics.items()}
    card = model_card(model, command=command, config=config, metrics=shown, datasets=datasets)
    card.save(os.path.join(args.output_dir, "README.md"))
    if push:
        from ..hub import push_folder_to_hub

        repo = args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))
        push_folder_to_hub(args.output_dir, repo, token=args.hub_token, private=bool(args.hub_private_repo))
    return metrics


# --- curves ---------------------------------------------------------------------------------------------------------
def plot_log_history(log_history: list, path: str, keys: list, title: str) -> str | None:
    """Plot `keys` of the training logs against the step into the PNG `path`; returns the path, or None (with a
    warning) when matplotlib is missing or nothing was logged."""
    series = {k: [(h["step"], h[k]) for h in log_history if k in h and "step" in h and math.isfinite(h[k])]
              for k in keys}
    series = {k: v for k, v in series.items() if v}
    if not series:
        logger.warning("no logged values of %s to plot into %s", keys, path)
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no %s (pip install matplotlib)", path)
        return None
    fig, axes = plt.subplots(1, len(series), figsize=(4.2 * len(series), 3.4), squeeze=False)
    for ax, (key, points) in zip(axes[0], series.items()):
        ax.plot([s for s, _ in points], [v for _, v in points], marker="." if len(points) < 30 else None)
        ax.set(xlabel="step", title=key)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = ["RXT_PARTS", "EpisodeCollator", "RxTStageTrainer", "check_parts", "finish_stage", "load_conversations",
           "load_stage_model", "offline_conversations", "pad_rows", "pad_turns", "part_of",
           "parts_without_gradients", "plot_log_history", "record_turns", "set_trainable_parts", "tokenize_episodes",
           "tokenize_turn"]
