"""`RatTrainer`: a drop-in `transformers.Trainer` that also logs what RAT's gates do.

Everything about training — schedules, clipping, accumulation, mixed precision, checkpoint rotation, early stopping,
`auto_find_batch_size`, TensorBoard/trackio, tqdm, multi-GPU through accelerate — is `Trainer`'s. This adds:

- next to `loss`: `lm_loss`, `policy_loss` (reinforce gating), `perplexity`, `tokens_per_second` and the gating
  statistics `gate/entropy` (mean selector entropy, nats) plus per layer `gate/entropy/layer_{i}` and
  `gate/usage/layer_{i}/policy_{j}` (mean selector probability of each policy);
- `eval_perplexity` next to `eval_loss`;
- a check of a checkpoint before resuming from it: a missing or truncated file is reported by name instead of
  surfacing as a deserialisation error deep inside torch.

Resuming is exact because `Trainer` restores optimizer, scheduler, RNG states and the data position; RAT's only
randomness (dropout, policy sampling) draws from those RNGs.
"""

import json
import math
import os
import time
from collections import defaultdict

import torch
from transformers import Trainer


class RatTrainer(Trainer):
    """`Trainer` with RAT's loss parts and gating statistics in the logs. Same constructor as `Trainer`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._rat_sums: dict[str, float] = defaultdict(float)
        self._rat_counts: dict[str, int] = defaultdict(int)
        self._tokens_since_log = 0
        self._last_log_time = time.perf_counter()

    # -- collecting -------------------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training:
            self._collect(outputs, inputs)
        return (loss, outputs) if return_outputs else loss

    @torch.no_grad()
    def _collect(self, outputs, inputs) -> None:
        mask = inputs.get("attention_mask")
        self._tokens_since_log += int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
        values = {}
        for name in ("lm_loss", "policy_loss"):
            value = getattr(outputs, name, None) if not isinstance(outputs, dict) else outputs.get(name)
            if value is not None:
                values[name] = value.detach().float().mean().item()
        entropy = getattr(outputs, "gate_entropy", None)
        if entropy is not None:
            values["gate/entropy"] = entropy.float().mean().item()
            for i, e in enumerate(entropy.tolist()):
                values[f"gate/entropy/layer_{i}"] = e
            for i, row in enumerate(outputs.policy_usage.tolist()):
                for j, u in enumerate(row):
                    values[f"gate/usage/layer_{i}/policy_{j}"] = u
        for key, value in values.items():
            self._rat_sums[key] += value
            self._rat_counts[key] += 1

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

    def _mean_over_processes(self, value: float) -> float:
        if self.accelerator.num_processes == 1:
            return value
        tensor = torch.tensor([value], device=self.accelerator.device)
        return self.accelerator.reduce(tensor, reduction="mean").item()

    # -- resuming ---------------------------------------------------------------------------------------------------
    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if not (self.is_fsdp_enabled or self.is_deepspeed_enabled):  # those save sharded layouts of their own
            check_checkpoint(resume_from_checkpoint)
        return super()._load_from_checkpoint(resume_from_checkpoint, model)


def _perplexity(loss: float) -> float:
    return round(math.exp(min(loss, 50.0)), 4)  # capped: exp(50) already says "untrained"


def check_checkpoint(path: str) -> None:
    """Raise a `ValueError` naming what is wrong if `path` is not a complete `Trainer` checkpoint."""
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
    try:
        with open(os.path.join(path, "trainer_state.json")) as f:
            json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"checkpoint {path!r}: trainer_state.json is corrupted ({e})") from e
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
        file = os.path.join(path, name)
        if os.path.getsize(file) == 0:
            raise ValueError(f"checkpoint {path!r}: {name} is empty (was the run stopped while saving?)")


def _safetensors_payload_end(file: str) -> int:
    """Size a safetensors file must have: 8-byte header length + header + the largest tensor end offset."""
    with open(file, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    return 8 + header_len + max(ends, default=0)


__all__ = ["RatTrainer", "check_checkpoint"]
