"""Supervised memory-aware training (SMAT) of a Reactive Transformer, and the episode machinery MRL shares.

    trainer = RxTSMATTrainer(model, RxTSMATConfig(output_dir="smat", bptt_turns=4), train_dataset=episodes,
                             processing_class=tokenizer)
    trainer.train()

Why not a stock `Trainer`/`SFTTrainer`: an RxT answers each turn from a memory that the *previous* turns wrote through
the encoder and the memory attention. A stateless step trains the decoder alone (TRL's fused LM head even bypasses a
subclass's `forward`), so the memory parts never learn. Here one `forward` of `RxTEpisodeModule` runs a whole
episode — init memory, then per turn: answer from the memory, write the turn into it — so that:

- the loss of turn k back-propagates through the memory updates of turns < k into the encoder, the memory attention
  and the initial memory (truncated every `bptt_turns` updates);
- DistributedDataParallel sees every parameter inside its own `forward` (memory updates run outside a DDP forward would
  have their gradients silently left unsynchronised: DDP only reduces gradients of a forward it prepared);
- gradient checkpointing, bf16/fp16 autocast and gradient accumulation are `Trainer`'s.

The Trainer's model is that module (`trainer.model.policy` is the RxT); `save_model` and checkpoints write the RxT
itself (`from_pretrained`-loadable), and resuming reads it back. Data: records `{"query", "answer", "interactions"}`
(`rat_hf.data.load_interactions`, `memory_recall_dataset`) or chat `messages` (`default_dialogs()`), tokenized with
`tokenize_interaction` (labels on the answer and EOS only; padding is never a target), or already tokenized
`turn_input_ids`/`turn_labels` columns.

Episodes of mixed lengths: `train_sampling_strategy="group_by_length"` batches episodes with similar turn counts
together (the trainer adds the `length_column_name` column: turns per episode), so a batch of two-turn episodes does
not pay for the ten-turn ones of another distance.

Gradual unfreezing (`unfreeze_schedule`): a component that is not yet trained keeps its weights exactly (its gradients
are dropped after every backward, so neither the optimizer's update nor its weight decay touches it, and gradient
clipping does not count it); `requires_grad` is not toggled because DDP fixes the set of synchronised parameters when
it wraps the model.
"""

from __future__ import annotations

import logging
import os
import time
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer, TrainerCallback

from ..data.interactions import interaction_prompt_ids, tokenize_interaction
from ._ddp import configure_ddp_for_unused_parameters
from ._rxt_common import record_turns
from .rat_trainer import check_checkpoint
from .rxt_smat_config import COMPONENTS, RxTSMATConfig

logger = logging.getLogger("rat_hf.trainers")

EXTRA_STATE_NAME = "rxt_trainer_modules.safetensors"  # trainer-owned modules (the MRL value head) in a checkpoint
# The parts whose gradients prove a step trained through the memory: what reads it, what writes it.
MEMORY_PARTS = ("cross_attention", "encoder", "memory_attention")


# --- data ------------------------------------------------------------------------------------------------------------
def tokenize_episode(tokenizer, record: dict, max_turns: int, max_length: int, where: str = "record") -> dict:
    """`{"turn_input_ids", "turn_labels"}`: the record's first `max_turns` turns as `tokenize_interaction` makes them
    (`[Q] query [A]` then ` answer` then EOS, the layout `generate` produces and `ReactiveSession` writes). Records
    are conversations in either layout `record_turns` reads (interactions, or chat `messages`)."""
    ids, labels = [], []
    for query, answer in record_turns(record, where)[:max_turns]:
        turn = tokenize_interaction(tokenizer, query, answer, max_length)
        ids.append(turn["input_ids"])
        labels.append(turn["labels"])
    return {"turn_input_ids": ids, "turn_labels": labels}


class RxTEpisodeCollator:
    """Episodes of tokenized turns -> `input_ids`, `attention_mask`, `labels`, each `[B, K, T]`, right-padded.

    K is the longest episode of the batch; a shorter episode's missing turns are all padding (attention mask 0),
    which the memory update skips (the row keeps its memory) and the loss ignores (labels -100).
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict]) -> dict:
        B = len(features)
        K = max(len(f["turn_input_ids"]) for f in features)
        T = max(len(t) for f in features for t in f["turn_input_ids"])
        input_ids = torch.full((B, K, T), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((B, K, T), dtype=torch.long)
        labels = torch.full((B, K, T), -100, dtype=torch.long)
        for b, f in enumerate(features):
            for k, (ids, lab) in enumerate(zip(f["turn_input_ids"], f["turn_labels"])):
                input_ids[b, k, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                attention_mask[b, k, : len(ids)] = 1
                labels[b, k, : len(lab)] = torch.tensor(lab, dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# --- model pieces ----------------------------------------------------------------------------------------------------
def component_of(name: str) -> str:
    """Which of `COMPONENTS` a parameter of an `RxTForCausalLM` (or a PEFT model around one) belongs to."""
    if "memory_init" in name:
        return "memory_init"
    if "mlm_head." in name:
        return "mlm_head"
    if ".encoder." in name:
        return "encoder"
    if ".memory_attention." in name:
        return "memory_attention"
    if any(part in name for part in (".cross_attn.", ".cross_attention_layernorm.", ".memory_layernorm.")):
        return "cross_attention"
    if "embed_tokens" in name:
        return "embeddings"
    return "decoder"  # self-attention, MLP/MoE, their norms, the final norm, an untied lm_head


def causal_lm(policy):
    """The `RxTForCausalLM` inside a PEFT model (LoRA layers stay in place), or `policy` itself."""
    return policy.get_base_model() if hasattr(policy, "get_base_model") else policy


class RxTEpisodeModule(nn.Module):
    """What `Trainer` (and DDP) wrap: the RxT (`policy`) plus trainer-owned modules; `forward` runs whole episodes.

    Subclasses define `forward`. Gradient checkpointing is switched on the RxT's layers.
    """

    _forward_may_leave_parameters_unused = True  # frozen components / unscored turns: DDP must look (see _ddp.py)
    _extra_module_names: tuple[str, ...] = ()  # trainer-owned submodules saved next to the RxT in checkpoints

    def __init__(self, policy):
        super().__init__()
        self.policy = policy
        self.config = policy.config

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, **kwargs):
        return self.policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, **kwargs):
        enable = getattr(self.policy, "activation_checkpointing_enable", None)
        if enable is None:  # transformers < 5.24 names it gradient_checkpointing_enable
            return self.policy.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs=activation_checkpointing_kwargs)
        return enable(activation_checkpointing_kwargs=activation_checkpointing_kwargs, **kwargs)

    def gradient_checkpointing_disable(self):
        return self.policy.gradient_checkpointing_disable()

    def memory_chain(self, input_ids, attention_mask, bptt_turns: int | None, num_updates: int) -> list[torch.Tensor]:
        """Memories `[M_0, ..., M_num_updates]`, each `[B, L, S, D]`: M_0 the initial memory, M_j after turn j-1.

        With grad; M_j is detached before the update that follows it when j is a positive multiple of `bptt_turns`.
        input_ids, attention_mask: the interactions written, `[B, K, T]` (an all-padding turn keeps the memory).
        """
        policy = causal_lm(self.policy)
        memory = policy.init_memory(input_ids.shape[0], device=input_ids.device)
        memories = [memory]
        for j in range(1, num_updates + 1):
            if bptt_turns is not None and j > 1 and (j - 1) % bptt_turns == 0:
                memory = memory.detach()
            memory = policy.update_memory(memory, input_ids[:, j - 1], attention_mask[:, j - 1])
            memories.append(memory)
        return memories


class RxTSMATModule(RxTEpisodeModule):
    """SMAT's episode forward: turn k is answered from the memory of turns 0..k-1; answer + EOS cross-entropy."""

    def __init__(self, policy, bptt_turns: int | None, train_first_turn: bool):
        super().__init__(policy)
        self.bptt_turns, self.train_first_turn = bptt_turns, train_first_turn

    def forward(self, input_ids, attention_mask, labels) -> dict:
        """input_ids, attention_mask, labels: `[B, K, T]`. Returns `loss` (mean over every target token of the batch)
        and, detached, `turn_loss_sum` / `turn_tokens` `[K]` (the summed cross-entropy and target count per turn)."""
        B, K, _ = input_ids.shape
        memories = self.memory_chain(input_ids, attention_mask, self.bptt_turns, num_updates=K - 1)
        total = input_ids.new_zeros((), dtype=torch.float32)
        sums, counts, trained = [], [], 0
        for k in range(K):
            rows = attention_mask[:, k].any(-1)  # episodes that have turn k
            targets = labels[rows, k, 1:]  # [b, T-1], shifted: position t predicts token t+1
            counts.append(targets.ne(-100).sum())
            if (k == 0 and not self.train_first_turn) or not rows.any():
                sums.append(total.new_zeros(()))
                continue
            trained = trained + counts[-1]
            logits = self.policy(input_ids=input_ids[rows, k], attention_mask=attention_mask[rows, k],
                                 memory=memories[k][rows]).logits[:, :-1]  # [b, T-1, V]
            turn_loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                        ignore_index=-100, reduction="sum")
            total = total + turn_loss
            sums.append(turn_loss.detach())
        loss = total / torch.as_tensor(trained, device=total.device).clamp(min=1)
        return {"loss": loss, "turn_loss_sum": torch.stack(sums).float(), "turn_tokens": torch.stack(counts).float()}


# --- trainers --------------------------------------------------------------------------------------------------------
class _TimeLimit(TrainerCallback):
    """Stops training after the optimizer step that crosses `args.max_train_seconds` (measured from `on_train_begin`).
    Every process takes the same decision (the slowest clock wins), so no rank waits in a collective alone."""

    def __init__(self):
        self.start = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        elapsed = time.perf_counter() - self.start
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            clock = torch.tensor([elapsed], device=args.device)
            torch.distributed.all_reduce(clock, op=torch.distributed.ReduceOp.MAX)
            elapsed = float(clock)
        if elapsed >= args.max_train_seconds and not control.should_training_stop:
            logger.warning("max_train_seconds=%s reached after %d optimizer steps (%.0f s): training stops",
                           args.max_train_seconds, state.global_step, elapsed)
            control.should_training_stop = True
        return control


class RxTEpisodeTrainer(Trainer):
    """`Trainer` over an `RxTEpisodeModule`: saving/resuming the RxT itself, gradual unfreezing, metric logging.

    Subclasses build the module (`_build_module`) and say how a batch becomes a loss (`compute_loss`).
    """

    def __init__(self, model, args, train_dataset=None, eval_dataset=None, processing_class=None, **kwargs):
        if getattr(args, "fsdp", None) or getattr(args, "deepspeed", None):
            raise ValueError(f"{type(self).__name__}: FSDP and DeepSpeed are not supported (the episode module saves "
                             "and loads the RxT itself); use DDP (accelerate's multi_gpu config)")
        if args.load_best_model_at_end:
            raise ValueError(f"{type(self).__name__}: load_best_model_at_end is not supported; pick a checkpoint-* "
                             "folder after training instead")
        for required in ("init_memory", "update_memory"):
            if not hasattr(causal_lm(model), required):
                raise ValueError(f"{type(self).__name__}: the model must be a Reactive Transformer "
                                 f"(RxTForCausalLM, with `{required}`), got {type(model).__name__}")
        module = self._build_module(model, args)
        if (chosen := configure_ddp_for_unused_parameters(module, args)) is not None:
            logger.info("%s: %s", type(self).__name__, chosen)
        super().__init__(model=module, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processing_class, **kwargs)
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:  # also when chosen by an accelerate config file
            raise ValueError(f"{type(self).__name__}: FSDP and DeepSpeed are not supported (the episode module saves "
                             "and loads the RxT itself, and ZeRO keeps gradients out of `.grad`, which gradual "
                             "unfreezing and the first-step gradient check read); use DDP (accelerate's multi_gpu "
                             "config)")
        self.model_accepts_loss_kwargs = False  # the loss is a per-batch mean; Trainer scales it for accumulation
        self._metrics: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])  # key -> [sum, weight]
        named = dict(causal_lm(self.model.policy).named_parameters())  # tied weights once (the embedding)
        self._component_params = {c: [p for n, p in named.items() if component_of(n) == c] for c in COMPONENTS}
        self._gradients_checked = False
        if args.max_train_seconds is not None:
            self.add_callback(_TimeLimit())

    def _build_module(self, model, args) -> RxTEpisodeModule:
        raise NotImplementedError

    @property
    def policy(self):
        """The RxT being trained (unwrapped from DDP)."""
        return self.accelerator.unwrap_model(self.model).policy

    # -- gradual unfreezing -------------------------------------------------------------------------------------------
    def frozen_components(self) -> list[str]:
        """The components `unfreeze_schedule` keeps frozen at the current step (or epoch)."""
        now = self.state.global_step if self.args.unfreeze_unit == "step" else (self.state.epoch or 0.0)
        return [c for c, start in self.args.unfreeze_schedule.items() if start is None or now < start]

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not self._gradients_checked:
            self._gradients_checked = True
            self._check_memory_parts_reached()
        for component in self.frozen_components():  # after DDP's all-reduce: every rank drops the same gradients
            for p in self._component_params[component]:
                p.grad = None
        return loss

    def _check_memory_parts_reached(self) -> None:
        """After the first backward: every trainable memory part must be in the graph of the loss (a gradient, even
        an all-zero one, e.g. when every advantage of a first RL step is 0). A part left out means the stage
        trains like a stateless decoder: RuntimeError. A part with no trainable parameter (e.g. LoRA on the decoder
        only) is the user's choice: a warning."""
        frozen = set(self.frozen_components())
        missing, untrainable = [], []
        for part in MEMORY_PARTS:
            params = [p for p in self._component_params[part] if p.requires_grad]
            if part in frozen:
                continue
            if not params:
                untrainable.append(part)
            elif all(p.grad is None for p in params):
                missing.append(part)
        if missing:
            raise RuntimeError(f"{type(self).__name__}: {', '.join(missing)} got no gradient in the first step, so "
                               "this memory-aware stage would train like a stateless decoder; with gradient "
                               "checkpointing use gradient_checkpointing_kwargs={'use_reentrant': False}")
        if untrainable:
            logger.warning("%s: %s %s no trainable parameters: the memory is read but not trained",
                           type(self).__name__, ", ".join(untrainable), "has" if len(untrainable) == 1 else "have")

    # -- metrics ------------------------------------------------------------------------------------------------------
    def _record(self, weight: float = 1.0, **values) -> None:
        """Add `value * weight` and `weight` to each key's running sums; a log shows sum / weight since the last one.

        Record every key at every step on every process (weight 0 when there is nothing to add): the sums are reduced
        across processes at logging time, and processes holding different keys would wait on each other forever.
        """
        for key, value in values.items():
            self._metrics[key][0] += float(value) * weight
            self._metrics[key][1] += weight

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs and self._metrics:  # a training log: the means of what was recorded since the last one
            keys = sorted(self._metrics)
            sums = torch.tensor([self._metrics[k] for k in keys], dtype=torch.float64, device=self.args.device)
            sums = self.accelerator.reduce(sums, reduction="sum")  # [keys, (sum, weight)] over processes
            for key, (total, weight) in zip(keys, sums.tolist()):
                if weight > 0:
                    logs[key] = round(total / weight, 6)
            self._metrics.clear()
        super().log(logs, *args, **kwargs)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        with torch.no_grad():
            loss = self.compute_loss(model, self._prepare_inputs(inputs))
        return loss.detach(), None, None

    # -- saving and resuming: the RxT itself, plus the trainer-owned modules -------------------------------------------
    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        module = self.accelerator.unwrap_model(self.model)
        module.policy.save_pretrained(output_dir)
        extra = {f"{name}.{k}": v.detach().contiguous().cpu() for name in module._extra_module_names
                 for k, v in getattr(module, name).state_dict().items()}
        if extra:
            from safetensors.torch import save_file

            save_file(extra, os.path.join(output_dir, EXTRA_STATE_NAME))
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))
        # steps reached and the logged curves, also next to a final model (a checkpoint gets Trainer's own copy)
        self.state.save_to_json(os.path.join(output_dir, "trainer_state.json"))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        check_checkpoint(resume_from_checkpoint, world_size=self.args.world_size, process_index=self.args.process_index)
        from safetensors.torch import load_file

        module = self.accelerator.unwrap_model(model if model is not None else self.model)
        if hasattr(module.policy, "peft_config"):  # a PEFT policy saves (and resumes) its adapter
            from peft import set_peft_model_state_dict

            result = set_peft_model_state_dict(
                module.policy, load_file(os.path.join(resume_from_checkpoint, "adapter_model.safetensors")))
            if getattr(result, "unexpected_keys", None):
                raise ValueError(f"checkpoint {resume_from_checkpoint!r}: adapter weights the model does not have: "
                                 f"{sorted(result.unexpected_keys)[:5]}")
        else:
            policy = module.policy
            state = load_file(os.path.join(resume_from_checkpoint, "model.safetensors"))
            missing, unexpected = policy.load_state_dict(state, strict=False)
            tied = set(getattr(policy, "_tied_weights_keys", None) or {})
            tied = tied if policy.config.tie_word_embeddings else set()
            if unexpected or set(missing) - tied:
                raise ValueError(f"checkpoint {resume_from_checkpoint!r} does not match the model: missing "
                                 f"{sorted(set(missing) - tied)}, unexpected {sorted(unexpected)}")
        if module._extra_module_names:
            extra = load_file(os.path.join(resume_from_checkpoint, EXTRA_STATE_NAME))
            for name in module._extra_module_names:
                prefix = f"{name}."
                getattr(module, name).load_state_dict({k[len(prefix):]: v for k, v in extra.items()
                                                       if k.startswith(prefix)})


class RxTSMATTrainer(RxTEpisodeTrainer):
    """SMAT: the loss of every turn flows back through the memory writes of the turns before it (see the module doc).

    Args:
        model: an `RxTForCausalLM` (e.g. after interaction SFT and memory-attention pre-training), or a PEFT model
            around one.
        args: `RxTSMATConfig`.
        train_dataset / eval_dataset: interaction records (`query`, `answer`, `interactions`) or tokenized episodes
            (`turn_input_ids`, `turn_labels`). Raw records need `processing_class` (the tokenizer, with `[Q]`/`[A]`).
        processing_class: the tokenizer; saved with the model.
    """

    def __init__(self, model, args: RxTSMATConfig, train_dataset=None, eval_dataset=None, processing_class=None,
                 data_collator=None, **kwargs):
        if not isinstance(args, RxTSMATConfig):
            raise ValueError(f"RxTSMATTrainer: args must be an RxTSMATConfig, got {type(args).__name__}")
        train_dataset = self._tokenized(train_dataset, processing_class, args, "train_dataset")
        eval_dataset = self._tokenized(eval_dataset, processing_class, args, "eval_dataset")
        if data_collator is None:
            pad = model.config.pad_token_id
            data_collator = RxTEpisodeCollator(pad if pad is not None else 0)
        super().__init__(model, args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processing_class, data_collator=data_collator, **kwargs)

    def _build_module(self, model, args) -> RxTSMATModule:
        return RxTSMATModule(model, args.bptt_turns, args.train_first_turn)

    @staticmethod
    def _tokenized(dataset, tokenizer, args, what: str):
        dataset = RxTSMATTrainer._tokenized_turns(dataset, tokenizer, args, what)
        column = args.length_column_name
        if (dataset is not None and args.train_sampling_strategy == "group_by_length"
                and column not in dataset.column_names):
            # An episode costs one decoder pass and one memory update per turn: grouping episodes by their number of
            # turns keeps a batch's K (the longest episode) close to each member's, instead of padding every batch to
            # the longest distance of a mixed curriculum.
            dataset = dataset.map(lambda r: {column: len(r["turn_input_ids"])}, desc=f"{what}: turns per episode")
        return dataset

    @staticmethod
    def _tokenized_turns(dataset, tokenizer, args, what: str):
        if dataset is None or "turn_input_ids" in dataset.column_names:
            return dataset
        if tokenizer is None:
            raise ValueError(f"RxTSMATTrainer: {what} holds text records; pass processing_class=tokenizer")
        if "query" not in dataset.column_names and "messages" not in dataset.column_names:
            raise ValueError(f"RxTSMATTrainer: {what} needs conversations (query/answer/interactions or messages) or "
                             f"tokenized episodes (turn_input_ids, turn_labels); it has {dataset.column_names}")
        tokenized = dataset.map(
            lambda r, i: tokenize_episode(tokenizer, r, args.max_turns, args.max_length, f"{what}[{i}]"),
            with_indices=True, remove_columns=dataset.column_names, desc=f"tokenizing {what}")
        return tokenized.filter(lambda r: len(r["turn_input_ids"]) > 0, desc="dropping empty conversations")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=inputs["labels"])
        if model.training:
            sums, tokens = out["turn_loss_sum"].tolist(), out["turn_tokens"].tolist()
            self._record(target_tokens=sum(tokens))
            # token-weighted means: the first turn (initial memory) and the turns that read a written memory
            self._record(weight=tokens[0], **{"loss/turn_0": sums[0] / max(tokens[0], 1)})
            self._record(weight=sum(tokens[1:]), **{"loss/turns_1+": sum(sums[1:]) / max(sum(tokens[1:]), 1)})
        return (out["loss"], out) if return_outputs else out["loss"]


# --- evaluation ------------------------------------------------------------------------------------------------------
@torch.no_grad()
def recall_accuracy(model, tokenizer, records, batch_size: int = 32, max_new_tokens: int = 16,
                    memory_reset: bool = False) -> float:
    """Exact-match accuracy of the last answer of each record, answered greedily from the memory of the turns before.

    The earlier turns are written with their reference answers (what the conversation said), the last query is
    answered by `generate(..., memory=...)`, and the decoded answer (special tokens skipped, stripped) is compared with
    the record's last answer. `memory_reset=True` answers from the initial memory instead (the no-memory control).
    The answers themselves: `recall_answers`.
    """
    rows = [record_turns(r, f"records[{i}]") for i, r in enumerate(records)]
    answers = recall_answers(model, tokenizer, records, batch_size, max_new_tokens, memory_reset)
    return sum(a == t[-1][1].strip() for a, t in zip(answers, rows)) / max(len(rows), 1)


@torch.no_grad()
def recall_answers(model, tokenizer, records, batch_size: int = 32, max_new_tokens: int = 16,
                   memory_reset: bool = False) -> list[str]:
    """The model's greedy answer (decoded, special tokens skipped, stripped) to the last query of each record, from the
    memory of the turns before it (written with their reference answers; `memory_reset=True`: the initial memory)."""
    model_was_training = model.training
    model.eval()
    config = model.config
    eos, pad = config.eos_token_id, config.pad_token_id if config.pad_token_id is not None else config.eos_token_id
    rows = [record_turns(r, f"records[{i}]") for i, r in enumerate(records)]
    answers = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        device = next(model.parameters()).device
        memory = model.init_memory(len(batch), device=device)
        history = max(len(t) for t in batch) - 1
        for k in range(history if not memory_reset else 0):
            written = [tokenize_interaction(tokenizer, *t[k], max_length=None)["input_ids"] if k < len(t) - 1 else []
                       for t in batch]
            ids, mask = _pad(written, pad, left=False, device=device)
            memory = model.update_memory(memory, ids, mask)
        prompts = [interaction_prompt_ids(tokenizer, t[-1][0]) for t in batch]
        ids, mask = _pad(prompts, pad, left=True, device=device)
        out = model.generate(input_ids=ids, attention_mask=mask, memory=memory, max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=eos, pad_token_id=pad)
        answers += [a.strip() for a in tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)]
    model.train(model_was_training)
    return answers


def _pad(rows: list[list[int]], pad_id: int, left: bool, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max([len(r) for r in rows] + [1])
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            sl = slice(width - len(r), width) if left else slice(0, len(r))
            ids[i, sl] = torch.tensor(r, dtype=torch.long)
            mask[i, sl] = 1
    return ids.to(device), mask.to(device)


__all__ = ["RxTEpisodeCollator", "RxTEpisodeModule", "RxTEpisodeTrainer", "RxTSMATModule", "RxTSMATTrainer",
           "causal_lm", "component_of", "recall_accuracy", "recall_answers",
           "tokenize_episode"]
