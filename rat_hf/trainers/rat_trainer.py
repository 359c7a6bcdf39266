"""`RatTrainer`: a drop-in `transformers.Trainer` that also logs what RAT's gates do.

Everything about training — schedules, clipping, accumulation, mixed precision, checkpoint rotation, early stopping,
`auto_find_batch_size`, TensorBoard/trackio, tqdm, multi-GPU through accelerate — is `Trainer`'s. This adds:

- next to `loss`: `lm_loss`, `policy_loss` (reinforce gating; both on `loss`'s scale whatever the processes and
  accumulation steps: `loss = lm_loss + policy_loss_coef * policy_loss`), `perplexity`, `tokens_per_second` and the
  gating summary, averaged over layers: `gate/entropy` (mean selector entropy, nats), `gate/usage_max` (the largest mean
  probability of any policy in any layer: near 1 means the selector collapsed onto one policy), `gate/deviation`
  (mean |g - 1| of the gates applied: 0 means every head passes unchanged, i.e. gating does nothing) and
  `gate/disagreement` (mean total-variation distance between two policies' head distributions, in [0, 1]: 0 means
  the policies propose the same gates, so choosing between them does nothing). The per-layer values
  (`gate/entropy/layer_{i}`, `gate/usage/layer_{i}/policy_{j}`, `gate/deviation/layer_{i}`,
  `gate/disagreement/layer_{i}`) go to `state.log_history` (saved in `trainer_state.json`) and to the reporting
  integrations (TensorBoard, trackio, ...), not to the console: the printed line (tqdm or `disable_tqdm=True`) keeps
  only the summary, floats to 4 significant digits;
- `eval_perplexity` next to `eval_loss`; for a RAT model also `eval_loss_gates_off`, the same evaluation with every
  gate at 1 (the model's `gates_off=True`), and `eval_gate_gain` = `eval_loss_gates_off - eval_loss` (> 0: the gates
  help by that much). This runs the evaluation twice; `RatTrainer(..., eval_gates_off=False)` skips it;
- DDP set up for models whose forward can leave parameters unused (RxT's encoder and memory attention in a step
  without a memory update), which `Trainer`'s default stops on when gradient checkpointing is on (`_ddp.py`);
- a check of a checkpoint before resuming from it: a missing, truncated or unreadable file (weights, `optimizer.pt`,
  `scheduler.pt`, `trainer_state.json`, the RNG state) is reported by name in one line instead of surfacing as a
  deserialisation error deep inside torch, or as a `{}` state silently restarting at step 0.

Resuming is exact because `Trainer` restores optimizer, scheduler, RNG states and the data position; RAT's only
randomness (dropout, policy sampling) draws from those RNGs. A checkpoint without its RNG state file
(`rng_state.pth`, or `rng_state_{rank}.pth` per process) still resumes, with a `UserWarning` naming the file and
saying the run will not be exact: raising would block legitimate resumes (a checkpoint copied without it, a different
number of processes, which `Trainer` itself allows), while the warning keeps the loss of exactness visible.
"""

import dataclasses
import json
import math
import os
import time
import warnings
import zipfile
from collections import defaultdict

import torch
from transformers import PrinterCallback, ProgressCallback, Trainer, TrainerState

from ._ddp import configure_ddp_for_unused_parameters, logger as _ddp_logger


class RatTrainer(Trainer):
    """`Trainer` with RAT's loss parts and gating statistics in the logs. Same constructor as `Trainer`, plus
    `eval_gates_off` (default True): also evaluate a RAT model with every gate at 1 (`eval_loss_gates_off`)."""

    def __init__(self, *args, eval_gates_off: bool = True, **kwargs):
        self.eval_gates_off = eval_gates_off
        self._gates_off = False  # set while the gates-off evaluation runs
        # before `Trainer.__init__` builds the accelerator: a Reactive Transformer's LM steps leave its encoder and
        # memory attention unused, which DDP must be told (see `_ddp.py`)
        model = kwargs.get("model", args[0] if args else None)
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        if (chosen := configure_ddp_for_unused_parameters(model, training_args)) is not None:
            _ddp_logger.info("RatTrainer: %s", chosen)
        super().__init__(*args, **kwargs)
        self._rat_sums: dict[str, float] = defaultdict(float)
        self._rat_counts: dict[str, float] = defaultdict(float)
        self._tokens_since_log = 0
        self._last_log_time = time.perf_counter()
        for callback in self.callback_handler.callbacks:  # the console shows a summary; integrations get everything
            if type(callback) in _CONSOLE:
                callback.__class__ = _CONSOLE[type(callback)]

    # -- collecting -------------------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self._gates_off:
            inputs = {**inputs, "gates_off": True}
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training:
            self._collect(outputs, inputs, loss, num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    def _loss_part_scale(self, part: torch.Tensor, loss: torch.Tensor, num_items_in_batch) -> tuple[float, float]:
        """(scale, weight) making a loss part of the model's output (`lm_loss`, `policy_loss`) comparable to the
        logged `loss`, accumulated as `Trainer` accumulates that: the logged value is `sum(scale * part) /
        sum(weight)` over the collected micro-batches, the weights adding up to one per optimizer step.

        Given `num_items_in_batch`, the model divides a micro-batch's summed token losses by the tokens of the whole
        optimizer step (all its micro-batches; all processes with `average_tokens_across_devices`), and `Trainer`
        multiplies its `loss` by the number of processes, in place, then sums a step's micro-batches. A part gets the
        same: times the processes unless it *is* (shares storage with) the tensor `Trainer` scaled — the model
        returns `lm_loss` as `loss`, and DDP clones its outputs only on synchronising micro-batches, so this varies
        from call to call — and a step's micro-batches summed. Without `num_items_in_batch` a part is a
        per-micro-batch mean, and is averaged (as `Trainer` divides such a loss by the accumulation steps)."""
        accumulation = max(int(getattr(self, "current_gradient_accumulation_steps", None)
                               or self.args.gradient_accumulation_steps), 1)
        if not (self.model_accepts_loss_kwargs and num_items_in_batch is not None):
            return 1.0 / accumulation, 1.0 / accumulation
        scale = 1.0
        if self.args.average_tokens_across_devices:
            tp = self.get_tp_size() if hasattr(self, "get_tp_size") else 1  # Trainer's own divisor
            processes = self.accelerator.num_processes // tp if self.args.n_gpu <= 1 else self.args.n_gpu
            scaled_in_place = part.untyped_storage().data_ptr() == loss.untyped_storage().data_ptr()
            scale = 1.0 if scaled_in_place else float(processes)
        return scale, 1.0 / accumulation

    @torch.no_grad()
    def _collect(self, outputs, inputs, loss: torch.Tensor, num_items_in_batch=None) -> None:
        mask = inputs.get("attention_mask")
        self._tokens_since_log += int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
        values, weights = {}, {}
        for name in ("lm_loss", "policy_loss"):
            value = getattr(outputs, name, None) if not isinstance(outputs, dict) else outputs.get(name)
            if value is not None:
                scale, weights[name] = self._loss_part_scale(value, loss, num_items_in_batch)
                values[name] = value.detach().float().mean().item() * scale
        entropy = getattr(outputs, "gate_entropy", None)
        if entropy is not None:
            values["gate/entropy"] = entropy.float().mean().item()
            usage = outputs.policy_usage.float().tolist()  # one copy to the host: [L][P]
            values["gate/usage_max"] = max(map(max, usage))
            for i, e in enumerate(entropy.tolist()):
                values[f"gate/entropy/layer_{i}"] = e
            for i, row in enumerate(usage):
                for j, u in enumerate(row):
                    values[f"gate/usage/layer_{i}/policy_{j}"] = u
        for name, key in (("gate_deviation", "gate/deviation"), ("policy_disagreement", "gate/disagreement")):
            per_layer = getattr(outputs, name, None)
            if per_layer is not None:
                per_layer = per_layer.float().tolist()
                values[key] = sum(per_layer) / len(per_layer)
                for i, v in enumerate(per_layer):
                    values[f"{key}/layer_{i}"] = v
        for key, value in values.items():  # gate statistics: one per micro-batch; loss parts: weighed as above
            self._rat_sums[key] += value
            self._rat_counts[key] += weights.get(key, 1.0)

    # -- reporting --------------------------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs:  # a training log: add what was collected since the last one
            for key, total in self._rat_sums.items():
                logs[key] = self._mean_over_processes(total / self._rat_counts[key])
            logs["perplexity"] = _perplexity(logs["lm_loss"] if "lm_loss" in logs else logs["loss"])
            now = time.perf_counter()
            tokens = self._mean_over_processes(float(self._tokens_since_log)) * self.accelerator.num_processes
            logs["tokens_per_second"] = round(tokens / max(now - self._last_log_time, 1e-9), 1)
            self._rat_sums.clear()
            self._rat_counts.clear()
            self._tokens_since_log, self._last_log_time = 0, now
        for key in [k for k in logs if k.endswith("eval_loss")]:
            logs[key.replace("eval_loss", "eval_perplexity")] = _perplexity(logs[key])
        super().log(logs, *args, **kwargs)

    # -- evaluating with the gates off --------------------------------------------------------------------------------
    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        output = super().evaluation_loop(dataloader, description, prediction_loss_only=prediction_loss_only,
                                         ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        loss_key = f"{metric_key_prefix}_loss"
        if self.eval_gates_off and description == "Evaluation" and loss_key in output.metrics and _is_rat(self.model):
            self._gates_off = True
            try:
                off = super().evaluation_loop(dataloader, "Evaluation (gates off)", prediction_loss_only=True,
                                              ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
            finally:
                self._gates_off = False
            output.metrics[f"{metric_key_prefix}_loss_gates_off"] = off.metrics[loss_key]
            output.metrics[f"{metric_key_prefix}_gate_gain"] = off.metrics[loss_key] - output.metrics[loss_key]
        return output

    def _mean_over_processes(self, value: float) -> float:
        if self.accelerator.num_processes == 1:
            return value
        tensor = torch.tensor([value], device=self.accelerator.device)
        return self.accelerator.reduce(tensor, reduction="mean").item()

    # -- resuming ---------------------------------------------------------------------------------------------------
    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if not (self.is_fsdp_enabled or self.is_deepspeed_enabled):  # those save sharded layouts of their own
            check_checkpoint(resume_from_checkpoint, world_size=self.args.world_size,
                             process_index=self.args.process_index)
        return super()._load_from_checkpoint(resume_from_checkpoint, model)


def _console_view(logs: dict) -> dict:
    """What the console prints of a log: no per-layer gate keys, floats to 4 significant digits."""
    return {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in logs.items()
            if not (k.startswith("gate/") and "/layer_" in k)}


def _is_rat(model) -> bool:
    """A RAT model (plain, wrapped by accelerate/DDP or PEFT): its forward takes `gates_off`."""
    model = getattr(model, "module", model)  # DDP / DataParallel
    if hasattr(model, "get_base_model"):  # PEFT
        model = model.get_base_model()
    return getattr(getattr(model, "config", None), "model_type", None) == "rat"


class _ConsoleProgressCallback(ProgressCallback):
    """`ProgressCallback` printing `_console_view` of each log (the full log still reaches every other callback)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        return super().on_log(args, state, control, logs=None if logs is None else _console_view(logs), **kwargs)


class _ConsolePrinterCallback(PrinterCallback):
    """`PrinterCallback` (used with `disable_tqdm=True`) printing `_console_view` of each log."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None:
            logs.pop("total_flos", None)  # as PrinterCallback does to the shared dict
        return super().on_log(args, state, control, logs=None if logs is None else _console_view(logs), **kwargs)


_CONSOLE = {ProgressCallback: _ConsoleProgressCallback, PrinterCallback: _ConsolePrinterCallback}


def _perplexity(loss: float) -> float:
    return round(math.exp(min(loss, 50.0)), 4)  # capped: exp(50) already says "untrained"


def check_checkpoint(path: str, world_size: int = 1, process_index: int = 0) -> None:
    """Raise a one-line `ValueError` naming the file if `path` is not a complete, readable `Trainer` checkpoint.

    Checks that the weights, `trainer_state.json`, `optimizer.pt` and `scheduler.pt` are present and readable (the
    optimizer's tensors are memory-mapped, not read) and that the state is a `Trainer` state with a `global_step`.
    A missing RNG state file (`rng_state.pth`, or `rng_state_{process_index}.pth` when `world_size > 1`) gives a
    `UserWarning` that the resume will not be exact; an unreadable one raises.
    """
    if not os.path.isdir(path):
        raise ValueError(f"checkpoint {path!r} is not a directory")
    weights = [f for f in ("model.safetensors", "adapter_model.safetensors", "model.safetensors.index.json")
               if os.path.exists(os.path.join(path, f))]
    required = ["trainer_state.json", "optimizer.pt", "scheduler.pt"]
    missing = [f for f in required if not os.path.exists(os.path.join(path, f))]
    if not weights:
        missing.insert(0, "model.safetensors")
    if missing:
        raise ValueError(
            f"checkpoint {path!r} is incomplete: missing {', '.join(missing)} (was the run stopped while saving?); "
            "resume from an earlier checkpoint-* folder"
        )
    _check_trainer_state(path)
    if weights[0].endswith(".safetensors"):
        from safetensors import safe_open

        file = os.path.join(path, weights[0])
        try:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    f.get_slice(key)  # reads each tensor's header entry; a truncated file fails here
            expected = _safetensors_payload_end(file)
        except Exception as e:  # safetensors raises its own error types; re-raise with the file named
            raise ValueError(f"checkpoint {path!r}: {weights[0]} is corrupted or truncated ({e})") from e
        if os.path.getsize(file) < expected:
            raise ValueError(
                f"checkpoint {path!r}: {weights[0]} is truncated ({os.path.getsize(file)} of {expected} bytes)"
            )
    for name in ("optimizer.pt", "scheduler.pt"):
        _check_torch_file(path, name)
    rng = "rng_state.pth" if world_size <= 1 else f"rng_state_{process_index}.pth"
    if os.path.exists(os.path.join(path, rng)):
        _check_torch_file(path, rng)
    else:
        others = sorted(f for f in os.listdir(path) if f.startswith("rng_state"))
        found = f" (it has {', '.join(others)}: saved by a different number of processes)" if others else ""
        warnings.warn(
            f"checkpoint {path!r} has no {rng}{found}: resuming continues with fresh random states, so dropout and "
            "policy sampling differ from the uninterrupted run and the resumed run is NOT exact",
            UserWarning, stacklevel=3,
        )


def _check_trainer_state(path: str) -> None:
    """`trainer_state.json` must be a JSON object of `TrainerState` fields with an integer `global_step`."""
    try:
        with open(os.path.join(path, "trainer_state.json"), encoding="utf-8") as f:
            state = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"checkpoint {path!r}: trainer_state.json is corrupted ({e})") from None
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path!r}: trainer_state.json is corrupted (a JSON object expected, "
                         f"got {type(state).__name__})")
    step = state.get("global_step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"checkpoint {path!r}: trainer_state.json is corrupted ('global_step' missing or not a "
                         f"non-negative integer: {step!r})")
    unknown = sorted(set(state) - {f.name for f in dataclasses.fields(TrainerState)})
    if unknown:
        raise ValueError(f"checkpoint {path!r}: trainer_state.json is corrupted (unknown fields {unknown})")
    if not isinstance(state.get("log_history", []), list):
        raise ValueError(f"checkpoint {path!r}: trainer_state.json is corrupted ('log_history' is not a list)")


def _check_torch_file(path: str, name: str) -> None:
    """Deserialise a `torch.save` file of the checkpoint; a truncated or foreign file raises naming `name`.

    `torch.save` writes a zip archive whose directory sits at the end, so a truncated file fails to open; its
    tensors are memory-mapped rather than read. (A pre-zip legacy file is loaded in full.)
    """
    file = os.path.join(path, name)
    size = os.path.getsize(file)
    if size == 0:
        raise ValueError(f"checkpoint {path!r}: {name} is empty (was the run stopped while saving?)")
    from transformers.trainer_pt_utils import safe_globals  # the numpy types `Trainer` allows in its RNG state

    try:
        zipped = zipfile.is_zipfile(file)
        with safe_globals():
            torch.load(file, map_location="cpu", weights_only=True, mmap=zipped)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, ... depending on the damage
        reason = " ".join(str(e).split())[:200]
        raise ValueError(f"checkpoint {path!r}: {name} is corrupted or truncated ({size} bytes; "
                         f"torch.load: {reason})") from None


def _safetensors_payload_end(file: str) -> int:
    """Size a safetensors file must have: 8-byte header length + header + the largest tensor end offset."""
    with open(file, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    return 8 + header_len + max(ends, default=0)


__all__ = ["RatTrainer", "check_checkpoint"]
