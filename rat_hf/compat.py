"""The public names of the original `rat-transformer` package (arjun988/RAT), as thin wrappers over rat_hf.

Code written for the seed runs with its import line changed:

    from rat import RAT, RATTrainer, RATGenerator          # before
    from rat_hf.compat import RAT, RATTrainer, RATGenerator  # now

Each name keeps the seed's signature and return values and hands the work to the transformers-native API:

* `RAT(vocab_size, d_model=..., ...)` is a `RatForCausalLM` (the seed's argument names are `RatConfig` aliases);
  `model(input_ids)` with a positional tensor returns the logits, `use_cache=True` returns `(logits, kv)`.
* `RATTrainer` is torch AdamW + `transformers.get_cosine_schedule_with_warmup` + `clip_grad_norm_` over the seed's
  `train_step(input_seq, target_seq)`; checkpoints are directories (`save_pretrained` weights + optimizer state).
* `RATGenerator.generate` is `model.generate`; `RATDataset` / `RATDataLoader` sit on `rat_hf.data`
  (`get_statistics`, `load_text_dataset`, `pack_for_causal_lm`); `validate_model_config` is `RatConfig`'s validation.
* `ModelCheckpoint` writes safetensors weights (`save_pretrained`), never pickled modules; `RATLogger` is a
  `logging` logger obtained through `transformers.utils.logging`.

Differences from the seed, all deliberate: checkpoints are directories, not `.pt` files (a `.pt` name is used as the
directory name); `RATDataLoader` packs documents into non-overlapping blocks (the seed used windows at stride
seq_len/4); `RATTrainer` refuses `gating_mode="reinforce"` models (their policy loss needs the model's own labels
path: train those with the `transformers.Trainer` recipes); `validate_model_config` also rejects unknown keys.
"""

import inspect
import json
import logging
import math
import re
import sys
import time
from datetime import datetime
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from ._versions import output_cache
from .models.rat import RatConfig, RatForCausalLM

_CHECKPOINT_NAME = "checkpoint_step_{step:06d}"
_CHECKPOINT_PATTERN = re.compile(r"checkpoint_step_(\d+)")
_STATE_FILE = "training_state.pt"  # optimizer / scheduler state dicts and metadata: tensors and plain containers
_INFO_FILE = "checkpoint.json"  # the same metadata, readable


def _device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# --- logging --------------------------------------------------------------------------------------------------------
class RATLogger:
    """The seed's logger: a named `logging.Logger` with one console handler (stderr) and an optional file handler.

    Args:
        name: logger name.
        level: level of the logger and its console handler (the file handler logs everything from DEBUG).
        log_file: also append to this file.
    """

    def __init__(self, name: str = "RAT", level: int = logging.INFO, log_file: str | None = None):
        from transformers.utils import logging as hf_logging

        self.logger = hf_logging.get_logger(name)
        self.logger.setLevel(min(level, logging.DEBUG) if log_file else level)  # the file gets DEBUG too
        self.logger.propagate = False  # our handlers print it; the root logger would print it again
        for handler in [h for h in self.logger.handlers if getattr(h, "_rat_logger", False)]:
            self.logger.removeHandler(handler)  # a second RATLogger of the same name replaces, not duplicates
            handler.close()
        console = logging.StreamHandler(sys.stderr)
        console.setLevel(level)
        console.setFormatter(logging.Formatter("%(asctime)s - %(levelname)s - %(message)s"))
        handlers = [console]
        if log_file:
            file_handler = logging.FileHandler(log_file)
            file_handler.setLevel(logging.DEBUG)
            file_handler.setFormatter(logging.Formatter(
                "%(asctime)s - %(name)s - %(levelname)s - %(funcName)s:%(lineno)d - %(message)s"))
            handlers.append(file_handler)
        for handler in handlers:
            handler._rat_logger = True
            self.logger.addHandler(handler)

    def debug(self, message: str, *args, **kwargs):
        self.logger.debug(message, *args, stacklevel=kwargs.pop("stacklevel", 2), **kwargs)

    def info(self, message: str, *args, **kwargs):
        self.logger.info(message, *args, stacklevel=kwargs.pop("stacklevel", 2), **kwargs)

    def warning(self, message: str, *args, **kwargs):
        self.logger.warning(message, *args, stacklevel=kwargs.pop("stacklevel", 2), **kwargs)

    def error(self, message: str, *args, **kwargs):
        self.logger.error(message, *args, stacklevel=kwargs.pop("stacklevel", 2), **kwargs)

    def critical(self, message: str, *args, **kwargs):
        self.logger.critical(message, *args, stacklevel=kwargs.pop("stacklevel", 2), **kwargs)

    def log_model_info(self, model, model_name: str = "RAT"):
        """Parameter counts, size in memory and, for transformers models, the config's shape."""
        params = list(model.parameters())
        total = sum(p.numel() for p in params)
        trainable = sum(p.numel() for p in params if p.requires_grad)
        megabytes = sum(p.numel() * p.element_size() for p in params) / 2**20
        self.info(f"=== {model_name} Model Summary ===")
        self.info(f"Total Parameters: {total:,}")
        self.info(f"Trainable Parameters: {trainable:,}")
        self.info(f"Model Size (MB): {megabytes:.2f}")
        config = getattr(model, "config", None)
        for label, key in (("Model Dimension", "hidden_size"), ("Number of Layers", "num_hidden_layers"),
                           ("Attention Heads", "num_attention_heads"), ("Vocabulary Size", "vocab_size")):
            if getattr(config, key, None) is not None:
                self.info(f"{label}: {getattr(config, key)}")

    def log_training_step(self, step: int, loss: float, lr: float, **metrics):
        """`Step      N | Loss: x | LR: y | key: value ...` at INFO."""
        parts = [f"Step {step:6d}", f"Loss: {loss:.4f}", f"LR: {lr:.2e}"]
        parts += [f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}" for k, v in metrics.items()]
        self.info(" | ".join(parts))

    def log_memory_usage(self, device):
        """CUDA: allocated / reserved / peak memory of `device`; CPU: the process's peak resident memory."""
        device = _device(device)
        if device.type == "cuda":
            mib = 2**20
            self.info(f"Memory ({device}): allocated {torch.cuda.memory_allocated(device) / mib:.1f} MiB, reserved "
                      f"{torch.cuda.memory_reserved(device) / mib:.1f} MiB, peak "
                      f"{torch.cuda.max_memory_allocated(device) / mib:.1f} MiB")
        else:
            import resource

            peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
            self.info(f"Memory (cpu): peak resident {peak_kib / 1024:.1f} MiB")


# --- the model ------------------------------------------------------------------------------------------------------
class RAT(RatForCausalLM):
    """The seed's `RAT(vocab_size, d_model=768, ...)`: a `RatForCausalLM` built from the seed's arguments.

    The arguments are the seed's and go to `RatConfig` through its aliases (`d_model` -> `hidden_size`, ...);
    `**config_kwargs` passes any other `RatConfig` field. `RAT(config)` (a `RatConfig`) also works, so
    `RAT.from_pretrained(path)` does.

    Calling the model with a positional tensor behaves as the seed's `forward(x, mask=None, past_kvs=None,
    use_cache=False)`: it returns the logits `[B, L, V]`, or `(logits, kv)` with `use_cache=True`, where `kv` is a
    transformers `Cache` to pass back as `past_kvs` (the seed's list of tuples is gone). Keyword calls
    (`model(input_ids=..., labels=...)`), `generate`, `Trainer` and PEFT see a plain `RatForCausalLM`.
    `save_pretrained` saves it as a `RatForCausalLM`, so the checkpoint loads with `AutoModelForCausalLM` (remote code
    included) without this module.
    """

    def __init__(self, vocab_size: int | RatConfig | None = None, d_model: int = 768, n_layers: int = 12,
                 n_heads: int = 12, n_policies: int = 3, max_seq_len: int = 2048, dropout: float = 0.1,
                 mlp_ratio: int = 4, use_rope: bool = True, tie_weights: bool = True, use_checkpointing: bool = False,
                 config: RatConfig | None = None, **config_kwargs):
        if isinstance(vocab_size, RatConfig):
            config, vocab_size = vocab_size, None
        if config is None:
            if vocab_size is None:
                raise TypeError("RAT() needs vocab_size (or a RatConfig)")
            config = RatConfig(vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                               n_policies=n_policies, max_seq_len=max_seq_len, dropout=dropout, mlp_ratio=mlp_ratio,
                               use_rope=use_rope, tie_weights=tie_weights, use_checkpointing=use_checkpointing,
                               **config_kwargs)
        super().__init__(config)

    # The seed's attribute names.
    @property
    def d_model(self) -> int:
        return self.config.hidden_size

    @property
    def n_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def n_heads(self) -> int:
        return self.config.num_attention_heads

    @property
    def max_seq_len(self) -> int:
        return self.config.max_position_embeddings

    def __call__(self, *args, **kwargs):
        if args and isinstance(args[0], torch.Tensor):
            return self._seed_forward(*args, **kwargs)
        return super().__call__(*args, **kwargs)

    def _seed_forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, past_kvs=None, use_cache: bool = False):
        out = super().__call__(input_ids=x, attention_mask=mask, past_key_values=past_kvs, use_cache=use_cache)
        if not use_cache:
            return out.logits
        return out.logits, output_cache(out)

    def save_pretrained(self, *args, **kwargs):
        """Saved as a `RatForCausalLM` (config `architectures`, `auto_map` and the copied modeling file)."""
        self.__class__ = RatForCausalLM  # same layout: RAT adds no state; only the class name is written
        try:
            return RatForCausalLM.save_pretrained(self, *args, **kwargs)
        finally:
            self.__class__ = RAT


_SEED_REQUIRED = ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len")
_SEED_DEFAULTS = dict(dropout=0.1, mlp_ratio=4, use_rope=True, tie_weights=True, use_checkpointing=False, n_policies=3)


def validate_model_config(config: dict) -> dict:
    """The seed's check of a `RAT(**config)` dict: returns a copy with the seed's defaults filled in.

    Raises ValueError for a missing required key (`vocab_size`, `d_model`, `n_layers`, `n_heads`, `max_seq_len`), a
    `d_model` that `n_heads` does not divide, a key neither `RAT` nor `RatConfig` knows, or anything `RatConfig`'s own
    validation rejects (non-positive sizes, dropout outside [0, 1), ...).
    """
    if not isinstance(config, dict):
        raise ValueError(f"config must be a dict, got {type(config).__name__}")
    validated = {**_SEED_DEFAULTS, **config}
    errors = [f"Missing required parameter: {key}" for key in _SEED_REQUIRED if validated.get(key) is None]
    known = set(inspect.signature(RAT.__init__).parameters) | set(inspect.signature(RatConfig.__init__).parameters)
    errors += [f"Unknown parameter: {key}" for key in validated if key not in known - {"self", "config_kwargs",
                                                                                         "kwargs", "config"}]
    d_model, n_heads = validated.get("d_model"), validated.get("n_heads")
    if (isinstance(d_model, int) and isinstance(n_heads, int) and n_heads > 0 and d_model % n_heads
            and validated.get("head_dim") is None):
        errors.append(f"Invalid value for n_heads: {n_heads} (d_model={d_model} must be divisible by n_heads)")
    if not errors:
        try:
            RatConfig(**validated)
        except (ValueError, TypeError) as error:
            errors.append(str(error))
    if errors:
        raise ValueError("Configuration validation failed:\n" + "\n".join(errors))
    return validated


# --- checkpoints ----------------------------------------------------------------------------------------------------
def _load_weights(model, directory: Path) -> None:
    """Load the safetensors weights `save_pretrained` wrote (one file or shards) into `model`, in place."""
    from safetensors.torch import load_file

    index = directory / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (directory / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"no safetensors weights in {directory}")
    state = {}
    for name in files:
        state.update(load_file(directory / name))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    if unexpected or set(missing) - tied:
        raise ValueError(f"checkpoint {directory} does not match the model: missing {sorted(set(missing) - tied)}, "
                         f"unexpected {sorted(unexpected)}")


class ModelCheckpoint:
    """The seed's checkpoint manager: `save` writes a directory, `load` restores it; keeps the newest few.

    A checkpoint is a directory holding the model (`save_pretrained`: config + safetensors weights, loadable on its
    own with `AutoModelForCausalLM.from_pretrained`), `training_state.pt` (optimizer and scheduler state dicts, step,
    loss, `additional_info`: tensors and plain Python values, read back with `torch.load(weights_only=True)`) and the
    same metadata as `checkpoint.json`.

    Args:
        save_dir: where `save` puts `checkpoint_step_NNNNNN` directories.
        max_checkpoints: how many of those to keep; after each save the ones with the lowest steps go.
    """

    def __init__(self, save_dir: str = "./checkpoints", max_checkpoints: int = 5):
        if not isinstance(max_checkpoints, int) or max_checkpoints < 1:
            raise ValueError(f"max_checkpoints must be an int >= 1, got {max_checkpoints!r}")
        self.save_dir = Path(save_dir)
        self.max_checkpoints = max_checkpoints
        self.logger = RATLogger("RATCheckpoint", level=logging.WARNING)

    def save(self, model, optimizer, scheduler, step: int, loss: float, additional_info: dict | None = None,
             directory: str | None = None) -> str:
        """Write a checkpoint and return its directory. `directory` (not the seed's) overrides the rotated name and
        takes no part in the rotation."""
        path = Path(directory) if directory is not None else self.save_dir / _CHECKPOINT_NAME.format(step=step)
        path.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(path)
        info = {"step": int(step), "loss": float(loss), "timestamp": datetime.now().isoformat(),
                **(additional_info or {})}
        torch.save({"optimizer_state_dict": optimizer.state_dict() if optimizer is not None else None,
                    "scheduler_state_dict": scheduler.state_dict() if scheduler is not None else None, **info},
                   path / _STATE_FILE)
        (path / _INFO_FILE).write_text(json.dumps(info, indent=2, default=str))
        self.logger.info(f"Checkpoint saved: {path}")
        if directory is None:
            self._rotate()
        return str(path)

    def load(self, checkpoint_path: str, model, optimizer=None, scheduler=None) -> dict:
        """Restore weights (and optimizer / scheduler when given) in place; returns the metadata (`step`, `loss`,
        `timestamp`, the `additional_info` keys)."""
        path = Path(checkpoint_path)
        if not (path / _STATE_FILE).exists():
            raise FileNotFoundError(f"Checkpoint not found: {checkpoint_path} (expected a directory written by "
                                    f"ModelCheckpoint.save)")
        state = torch.load(path / _STATE_FILE, map_location="cpu", weights_only=True)
        _load_weights(model, path)
        if optimizer is not None and state.get("optimizer_state_dict") is not None:
            optimizer.load_state_dict(state["optimizer_state_dict"])
        if scheduler is not None and state.get("scheduler_state_dict") is not None:
            scheduler.load_state_dict(state["scheduler_state_dict"])
        self.logger.info(f"Checkpoint loaded: {path}")
        return {k: v for k, v in state.items() if k not in ("optimizer_state_dict", "scheduler_state_dict")}

    def checkpoints(self) -> list:
        """The rotated checkpoint directories in `save_dir`, oldest step first."""
        if not self.save_dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.save_dir.iterdir()
                 if p.is_dir() and (m := _CHECKPOINT_PATTERN.fullmatch(p.name))]
        return [p for _, p in sorted(found)]

    def _rotate(self) -> None:
        import shutil

        for old in self.checkpoints()[:-self.max_checkpoints]:
            shutil.rmtree(old)
            self.logger.debug(f"Removed old checkpoint: {old}")


# --- training -------------------------------------------------------------------------------------------------------
class RATTrainer:
    """The seed's step-by-step trainer: `train_step(input_seq, target_seq)` on batches you provide.

    Loss: cross-entropy of the logits at position t against `target_seq[:, t]` (the seed's convention: targets are
    already shifted), ignoring the tokenizer's pad id. Optimizer: torch AdamW (betas 0.9/0.95; no weight decay on
    biases and norm weights); schedule: `transformers.get_cosine_schedule_with_warmup` over `max_steps` optimizer
    steps; `clip_grad_norm_(grad_clip)`; `accum_steps` calls accumulate into one optimizer step. A step whose
    gradient norm is not finite is skipped. Logs every 100 steps; saves a rotated checkpoint every 1000 steps.

    Attributes: `model`, `tokenizer`, `device`, `optimizer`, `scheduler`, `logger` (a `RATLogger`),
    `checkpoint_manager` (a `ModelCheckpoint` over `checkpoint_dir`), `step_count` (train_step calls),
    `max_steps`, `training_stats`.
    """

    log_every, save_every = 100, 1000

    def __init__(self, model, tokenizer, lr: float = 5e-4, warmup_steps: int = 1000, max_steps: int = 100000,
                 weight_decay: float = 0.1, grad_clip: float = 1.0, device=None, accum_steps: int = 1,
                 checkpoint_dir: str = "./checkpoints", log_level: int = 20):
        from transformers import get_cosine_schedule_with_warmup

        if getattr(getattr(model, "config", None), "gating_mode", "soft") == "reinforce":
            raise ValueError("RATTrainer trains the LM loss only; a gating_mode='reinforce' model also needs its "
                             "policy loss (model(input_ids, labels=...)): train it with transformers.Trainer")
        for name, value, low in (("max_steps", max_steps, 1), ("accum_steps", accum_steps, 1),
                                 ("warmup_steps", warmup_steps, 0)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        self.device = _device(device)
        self.logger = RATLogger("RATTrainer", level=log_level)
        self.checkpoint_manager = ModelCheckpoint(checkpoint_dir)
        self.model = model.to(self.device)
        self.tokenizer = tokenizer
        self.accum_steps, self.max_steps, self.grad_clip = accum_steps, max_steps, grad_clip
        self.step_count = 0
        pad = getattr(tokenizer, "pad_token_id", None)
        self.ignore_index = pad if pad is not None else -100
        if pad is not None and pad == getattr(tokenizer, "eos_token_id", None):
            self.logger.warning("pad_token_id == eos_token_id: the loss ignores EOS targets as padding (the seed's "
                                "behaviour), so the model never learns to stop; give the tokenizer its own pad token")
        decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}],
                                           lr=lr, betas=(0.9, 0.95), eps=1e-8)
        self.scheduler = get_cosine_schedule_with_warmup(self.optimizer, min(warmup_steps, max_steps), max_steps)
        self.training_stats = {"total_steps": 0, "total_tokens": 0, "best_loss": math.inf, "start_time": time.time()}
        self.logger.log_model_info(model, "RAT")
        self.logger.info(f"Trainer initialized: lr={lr}, max_steps={max_steps}, device={self.device}, "
                         f"accum_steps={accum_steps}")

    def train_step(self, input_seq: torch.Tensor, target_seq: torch.Tensor) -> dict:
        """One forward/backward on `[B, L]` inputs and targets; an optimizer step every `accum_steps` calls.

        Returns `{"loss", "perplexity", "learning_rate", "step", "tokens_processed", "forward_time"}`, plus
        `"gradient_norm"` on calls that stepped the optimizer.
        """
        import torch.nn.functional as F

        if input_seq.shape != target_seq.shape:
            raise ValueError(f"Input and target shapes don't match: {tuple(input_seq.shape)} vs "
                             f"{tuple(target_seq.shape)}")
        self.model.train()
        input_seq, target_seq = input_seq.to(self.device), target_seq.to(self.device)
        started = time.time()
        logits = self.model(input_ids=input_seq).logits  # [B, L, V]
        forward_time = time.time() - started
        loss = F.cross_entropy(logits.flatten(0, 1).float(), target_seq.flatten(), ignore_index=self.ignore_index)
        (loss / self.accum_steps).backward()
        self.step_count += 1
        current_loss = loss.item()
        metrics = {"loss": current_loss, "perplexity": math.exp(min(current_loss, 700.0)), "step": self.step_count,
                   "forward_time": forward_time}
        if self.step_count % self.accum_steps == 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
            if not torch.isfinite(grad_norm):
                self.logger.warning(f"Invalid gradient norm: {grad_norm}. Skipping optimization step.")
                self.optimizer.zero_grad()
                return {**metrics, "loss": math.nan, "perplexity": math.nan, "gradient_norm": math.nan,
                        "learning_rate": self.scheduler.get_last_lr()[0],
                        "tokens_processed": self.training_stats["total_tokens"]}
            self.optimizer.step()
            self.optimizer.zero_grad()
            self.scheduler.step()
            self.training_stats["total_steps"] += 1
            self.training_stats["total_tokens"] += input_seq.numel() * self.accum_steps
            metrics["gradient_norm"] = grad_norm.item()
        self.training_stats["best_loss"] = min(self.training_stats["best_loss"], current_loss)
        metrics["learning_rate"] = self.scheduler.get_last_lr()[0]
        metrics["tokens_processed"] = self.training_stats["total_tokens"]
        if self.step_count % self.log_every == 0:
            self.logger.log_training_step(self.step_count, current_loss, metrics["learning_rate"],
                                          perplexity=metrics["perplexity"])
        if self.step_count % self.save_every == 0:
            path = self.checkpoint_manager.save(self.model, self.optimizer, self.scheduler, self.step_count,
                                                current_loss, additional_info={
                                                    "training_stats": dict(self.training_stats),
                                                    "perplexity": metrics["perplexity"]})
            self.logger.info(f"Auto-saved checkpoint: {path}")
        return metrics

    def save_checkpoint(self, filepath: str | None = None) -> str:
        """Save model, optimizer, scheduler and step; returns the directory. `filepath` names the directory
        (a seed-style `"model.pt"` becomes a directory of that name); None: a rotated one in `checkpoint_dir`."""
        return self.checkpoint_manager.save(
            self.model, self.optimizer, self.scheduler, self.step_count, self.training_stats["best_loss"],
            additional_info={"training_stats": dict(self.training_stats)}, directory=filepath)

    def load_checkpoint(self, filepath: str) -> None:
        """Restore model, optimizer, scheduler, `step_count` and the training statistics from `save_checkpoint`."""
        checkpoint = self.checkpoint_manager.load(filepath, self.model, self.optimizer, self.scheduler)
        self.step_count = checkpoint.get("step", 0)
        stats = dict(checkpoint.get("training_stats", {}))
        stats.pop("start_time", None)  # elapsed time counts from this run's start
        self.training_stats.update(stats)
        self.logger.info(f"Resumed training from step {self.step_count}")

    def get_training_stats(self) -> dict:
        """`training_stats` plus `elapsed_time`, `tokens_per_second`, `current_step`, `progress_percent`."""
        elapsed = time.time() - self.training_stats["start_time"]
        return {**self.training_stats, "elapsed_time": elapsed,
                "tokens_per_second": self.training_stats["total_tokens"] / elapsed if elapsed > 0 else 0.0,
                "current_step": self.step_count, "progress_percent": 100.0 * self.step_count / self.max_steps}


def get_optimal_batch_size(model, seq_len: int, max_memory_gb: float = 8.0, device=None,
                           max_batch_size: int = 64) -> int:
    """The largest training batch size (1 to `max_batch_size`, the seed's cap of 64) for `seq_len`-token sequences.

    The estimate (any device): `max_memory_gb` minus weights, gradients and AdamW's two moments (4 copies of the
    parameters), at 70% (the seed's margin), divided by the activation bytes of one sequence — per layer
    `seq_len * d * (34 + 5 * heads * seq_len / d)` half-precision bytes (Korthikanti et al. 2022), scaled to the
    model's dtype, plus three `seq_len * vocab` logits-sized buffers. On CUDA that number is then tried with
    accelerate's `find_executable_batch_size`, which halves it until a forward + backward on random tokens fits.
    """
    device = _device(device)
    config = model.config
    element = next(model.parameters()).element_size()
    d, layers, heads = config.hidden_size, config.num_hidden_layers, config.num_attention_heads
    per_sequence = layers * seq_len * d * (34 + 5 * heads * seq_len / d) * element / 2
    per_sequence += 3 * seq_len * config.vocab_size * 4
    budget = 0.7 * max_memory_gb * 2**30 - 4 * model.num_parameters() * element
    estimate = int(max(1, min(max_batch_size, budget // per_sequence)))
    if device.type != "cuda":
        return estimate
    from accelerate.utils import find_executable_batch_size

    model = model.to(device)
    was_training = model.training
    model.train()

    @find_executable_batch_size(starting_batch_size=estimate)
    def probe(batch_size):
        ids = torch.randint(0, config.vocab_size, (batch_size, seq_len), device=device)
        try:
            model(input_ids=ids, labels=ids).loss.backward()
        finally:
            model.zero_grad(set_to_none=True)
        return batch_size

    try:
        return probe()
    finally:
        model.train(was_training)


# --- generation -----------------------------------------------------------------------------------------------------
class RATGenerator:
    """The seed's text generator, over `model.generate`.

    Args:
        model: a causal LM (`RAT`, `RatForCausalLM` or any transformers model); moved to `device`.
        tokenizer: encodes the prompt and decodes the output.
        device: default CUDA when available, else CPU.
        log_level: level of its `RATLogger`.
    """

    def __init__(self, model, tokenizer, device=None, log_level: int = 20):
        self.device = _device(device)
        self.logger = RATLogger("RATGenerator", level=log_level)
        self.model = model.to(self.device)
        self.tokenizer = tokenizer

    @torch.no_grad()
    def generate(self, prompt: str, max_len: int = 100, temperature: float = 0.8, top_k: int = 50,
                 top_p: float = 0.9, repetition_penalty: float = 1.1, num_return_sequences: int = 1,
                 do_sample: bool = True, pad_token_id: int | None = None) -> str | list:
        """Generate up to `max_len` new tokens after `prompt`; returns the decoded prompt + continuation (special
        tokens skipped), a list of `num_return_sequences` strings when that is > 1. With `do_sample=False` decoding
        is greedy and the sampling arguments are unused (several greedy sequences are identical, as in the seed).
        """
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("Prompt must be a non-empty string")
        if temperature <= 0:
            raise ValueError(f"Temperature must be positive, got {temperature}")
        if not isinstance(max_len, int) or max_len <= 0:
            raise ValueError(f"max_len must be a positive int, got {max_len}")
        if not isinstance(num_return_sequences, int) or num_return_sequences < 1:
            raise ValueError(f"num_return_sequences must be a positive int, got {num_return_sequences}")
        started = time.time()
        self.model.eval()
        encoded = self.tokenizer(prompt, return_tensors="pt")
        inputs = {k: encoded[k].to(self.device) for k in ("input_ids", "attention_mask") if k in encoded}
        eos = self.tokenizer.eos_token_id
        if pad_token_id is None:
            pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos
        kwargs = dict(max_new_tokens=max_len, do_sample=do_sample, repetition_penalty=repetition_penalty,
                      pad_token_id=pad_token_id, eos_token_id=eos)
        if do_sample:
            kwargs.update(temperature=temperature, top_k=top_k, top_p=top_p, num_return_sequences=num_return_sequences)
        output = self.model.generate(**inputs, **kwargs)
        if not do_sample:
            output = output.expand(num_return_sequences, -1)
        texts = self.tokenizer.batch_decode(output, skip_special_tokens=True)
        self.logger.info(f"Generation Time: {time.time() - started:.3f}s")
        self.logger.debug(f"Prompt: {prompt[:100]}")
        self.logger.debug(f"Generated: {texts[0][:100]}")
        return texts[0] if num_return_sequences == 1 else texts


# --- data -----------------------------------------------------------------------------------------------------------
class RATDataset(Dataset):
    """The seed's training dataset: token sequences in, `(input_ids, target_ids)` pairs of length `seq_len` out.

    Sequences shorter than 10 tokens are dropped (as in the seed). Item i: sequence i cut to `seq_len + 1` tokens —
    a random window when longer, right-padded with `pad_token_id` when shorter — then `(tokens[:-1], tokens[1:])`.
    The sequences are held in a `datasets.Dataset` (Arrow, not Python lists); `get_statistics` uses
    `rat_hf.data.get_statistics`. `eos_token_id` is kept for the seed's signature (packing documents with EOS is
    `pack_for_causal_lm`'s job).
    """

    min_length = 10

    def __init__(self, tokenized_texts, seq_len: int = 1024, pad_token_id: int = 0, eos_token_id: int | None = None):
        from datasets import Dataset as HFDataset

        if tokenized_texts is None or len(tokenized_texts) == 0:
            raise ValueError("tokenized_texts cannot be empty")
        if not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
        kept = [list(map(int, t)) for t in tokenized_texts if len(t) >= self.min_length]
        if not kept:
            raise ValueError(f"No valid sequences found after filtering (all shorter than {self.min_length} tokens)")
        self.seq_len, self.pad_token_id, self.eos_token_id = seq_len, pad_token_id, eos_token_id
        self.data = HFDataset.from_dict({"input_ids": kept}).with_format("torch")

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, idx: int):
        tokens = self.data[int(idx)]["input_ids"]
        need = self.seq_len + 1
        if len(tokens) > need:
            start = int(torch.randint(0, len(tokens) - need + 1, (1,)))
            tokens = tokens[start:start + need]
        elif len(tokens) < need:
            tokens = torch.cat([tokens, tokens.new_full((need - len(tokens),), self.pad_token_id)])
        return tokens[:-1].long(), tokens[1:].long()

    def get_statistics(self) -> dict:
        """`num_sequences`, `avg_length`, `max_length`, `min_length`, `total_tokens` of the kept sequences."""
        import pyarrow.compute as pc

        from .data import get_statistics

        stats = get_statistics(self.data)
        lengths = pc.list_value_length(self.data.with_format("arrow")["input_ids"])
        bounds = pc.min_max(lengths).as_py()
        return {"num_sequences": stats["sequences"], "avg_length": stats["mean_length"], "max_length": bounds["max"],
                "min_length": bounds["min"], "total_tokens": stats["tokens"]}


class RATDataLoader:
    """The seed's text pipeline: load, tokenize, pack, and batch into a shuffled `DataLoader` of `RATDataset` pairs.

    Args:
        dataset_name: a Hub dataset (offline this fails with a clear error), a local txt/json/jsonl/csv/parquet file
            or folder, or `"default"` for rat_hf's offline standard-library corpus.
        dataset_config: the Hub configuration (ignored for `"default"` and local paths).
        tokenizer: required; needs an EOS token (documents are joined with it).
        seq_len: tokens per training input (blocks of `seq_len + 1` tokens give input and shifted target).
        batch_size: rows per batch (the last, incomplete batch is dropped).
        num_samples: at most this many blocks.
        max_texts: at most this many non-blank documents.
    """

    def __init__(self, dataset_name: str = "wikitext", dataset_config: str = "wikitext-2-raw-v1", tokenizer=None,
                 seq_len: int = 1024, batch_size: int = 4, num_samples: int = 5000, max_texts: int = 2000):
        if tokenizer is None:
            raise ValueError("Tokenizer is required")
        self.logger = RATLogger("RATDataLoader", level=logging.WARNING)
        self.dataset_name, self.dataset_config, self.tokenizer = dataset_name, dataset_config, tokenizer
        self.seq_len, self.batch_size, self.num_samples, self.max_texts = seq_len, batch_size, num_samples, max_texts

    def _texts(self):
        from .cli._common import from_hub
        from .data import default_text_corpus, load_text_dataset

        if self.dataset_name == "default":
            return default_text_corpus()
        if Path(self.dataset_name).exists():
            return load_text_dataset(self.dataset_name)
        # fails at once, in one line, when the Hub is unreachable and the dataset is not in the cache
        return from_hub(load_text_dataset, self.dataset_name, "dataset",
                         "offline, use dataset_name='default' (the standard-library corpus) or a local path",
                         config=self.dataset_config)

    def prepare_dataset(self) -> DataLoader:
        """Load and pack the texts; returns a shuffled `DataLoader` of `(input_ids, target_ids)` batches."""
        from .data import pack_for_causal_lm

        texts = self._texts()
        texts = texts.filter(lambda t: t is not None and bool(t.strip()), input_columns="text")
        texts = texts.select(range(min(self.max_texts, len(texts))))
        packed = pack_for_causal_lm(texts, self.tokenizer, self.seq_len + 1)
        packed = packed.select(range(min(self.num_samples, len(packed))))
        if len(packed) < self.batch_size:
            raise ValueError(f"Insufficient data: {len(packed)} blocks of {self.seq_len + 1} tokens from "
                             f"{len(texts)} texts, fewer than one batch of {self.batch_size}")
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        dataset = RATDataset(packed["input_ids"], seq_len=self.seq_len, pad_token_id=pad,
                             eos_token_id=self.tokenizer.eos_token_id)
        self.logger.info(f"Dataset statistics: {dataset.get_statistics()}")
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=True, num_workers=0,
                          pin_memory=torch.cuda.is_available(), drop_last=True)


__all__ = [
    "ModelCheckpoint",
    "RAT",
    "RATDataLoader",
    "RATDataset",
    "RATGenerator",
    "RATLogger",
    "RATTrainer",
    "get_optimal_batch_size",
    "validate_model_config",
]
