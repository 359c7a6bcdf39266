"""`PPOTrainer`: PPO with a learned value function, on `transformers.Trainer`, with TRL's reward-function API.

TRL removed its `PPOTrainer` in 1.13; this one keeps `Trainer`'s loop (optimizer, scheduler, gradient accumulation,
accelerate/DDP, logging, checkpoints) and overrides its hooks:

- `get_train_dataloader` / `_get_train_sampler`: each batch the loader yields is one process's rollout of prompts,
  repeated once per micro-batch that the rollout feeds (`RolloutSampler`), so `max_steps` counts optimizer steps.
- `_prepare_inputs`: at the first micro-batch of a rollout, `_rollout` generates completions (eval mode: no dropout),
  scores them with the reward functions, computes old log-probs, values and reference log-probs (eval mode, no grad),
  per-token rewards (score at the last completion token minus `kl_coef` * KL), per-sequence GAE advantages and
  returns; then every call hands out the next micro-batch of the schedule (`num_ppo_epochs` passes of
  `num_mini_batches` mini-batches of `gradient_accumulation_steps` micro-batches).
- `compute_loss`: the policy's full forward, `_policy_loss` (per token, `[B, T]`, before any reduction: the clipped
  surrogate minus the entropy bonus), the clipped value loss, `loss = policy + vf_coef * value`.
- `log`: the rollout and update metrics, averaged over the logging window (and over processes).

The models: the policy (any causal LM; with `peft_config` or as a `PeftModel` the reference is the same model with the
adapter disabled, otherwise a frozen copy made at start), and a value function: `value_model` (a sequence-classification
model with a `.score` head, num_labels=1: `RatForSequenceClassification`, `LlamaForSequenceClassification`, ...; its
trunk is run per token), or, when none is given, a value head on the policy's trunk (`value_head=True`) or a
sequence-classification copy of the policy. Policy and value function are wrapped in one module
(`PolicyAndValueModel`) so that one optimizer, one DDP wrapper and one backward cover both.

Rollouts sample with `generate()`, or with `rat_hf.generation.graph_generate` (`PPOConfig.graph_decode`; by default
on for a RAT or Llama policy on CUDA): the same tokens under the same seed, the decode step replayed from a CUDA graph.

Conventions: completion token t is an action; its log-prob comes from the logits at the position before it, divided by
the sampling temperature (rollout and updates alike, and generation samples with no top-k/top-p so that this is the
distribution the token was drawn from). The completion ends at its first EOS (included, it carries the score) — the
mask never looks at pad ids, so a pad equal to EOS is fine; a completion with no EOS within `max_new_tokens` is
scored as is (minus `missing_eos_penalty` if set) at its last token and is terminal at that horizon.
Old log-probs are computed in eval mode; with `disable_dropout=True` (default) the update forward computes the same
function, and the first pass over a rollout visits it in the order and chunks it was scored in, so the importance
ratio of the first mini-batch is exactly 1. Single process or DDP; FSDP and DeepSpeed are refused.

Logged (means over the logging window; rollout metrics only in windows that started a rollout):
rollout — `reward` (weighted score, before the KL penalty) and `reward_std`, `rewards/<function>/mean`, `kl` (per
completion: summed over its tokens, `kl_estimator`), `non_score_reward` (= -kl_coef * kl), `completions/mean_length`,
`completions/terminated_fraction` (ended by EOS), `perplexity` (exp of the mean negative log-prob of the sampled
tokens under the sampling distribution, logits / temperature), `value_mean`; update — `policy_loss`, `value_loss`,
`entropy` (of the sampling distribution, per token), `clip_fraction` / `value_clip_fraction` (tokens where the clipped
term was the active one), `approx_kl` (mean 0.5 * (log pi - log pi_old)^2), `ratio`, `accuracy` (share of completion
tokens that are the policy's argmax); `time/rollout_per_step` and `time/update_per_step` (seconds per optimizer step
spent generating + scoring, and in forward + backward).
"""

import copy
import inspect
import logging
import math
import os
import time
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Sampler
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, GenerationConfig,
                          PreTrainedModel, Trainer)

from ..models.rat.modeling_rat import collect_gate_samples, gate_reinforce_loss
from .ppo_config import PPOConfig
from .reinforced_gating import linearized_token_losses
from .ppo_utils import (clipped_policy_loss, clipped_value_loss, entropy_from_logits, gae_advantages, masked_mean,
                        masked_whiten, per_token_kl, selective_log_softmax)

logger = logging.getLogger("rat_hf.ppo")

VALUE_MODEL_DIR = "value_model"  # where save_model puts a separate value model, beside the policy
VALUE_HEAD_FILE = "value_head.safetensors"
# Float attributes that modules read as a dropout probability in forward (Llama's and RAT's attention); nn.Dropout
# modules are handled by type.
DROPOUT_ATTRIBUTES = ("attention_dropout", "attn_dropout", "dropout", "dropout_p")
# graph_decode=None turns graph decoding on for these policies only: the ones it was checked on, token for token, on
# the GPU (bench/graph_decode_notes.md); graph_decode=True tries any other
GRAPH_DECODE_MODEL_TYPES = ("rat", "llama")
# without max_prompt_length, graph-decoded prompts are left-padded to a multiple of this: few shapes, few captures
GRAPH_PROMPT_MULTIPLE = 64
# a policy's own generation_config may set these (PPO overrides them, or they add no logits processor); any other
# field would add a processor or criterion graph decoding does not run
_NEUTRAL_GENERATION_FIELDS = {
    "max_new_tokens", "max_length", "do_sample", "temperature", "top_k", "top_p", "min_p", "typical_p",
    "epsilon_cutoff", "eta_cutoff", "repetition_penalty", "no_repeat_ngram_size", "min_new_tokens", "min_length",
    "num_beams", "eos_token_id", "pad_token_id", "bos_token_id", "use_cache", "output_attentions",
    "output_hidden_states", "_from_model_config", "transformers_version"}


def is_peft_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def disable_dropout(model: nn.Module) -> None:
    """Set every dropout probability of `model` to 0: `nn.Dropout` modules and float attributes named in
    `DROPOUT_ATTRIBUTES` (the config is left as it was, so a saved model keeps its dropout)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for name in DROPOUT_ATTRIBUTES:
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions as `generate` derives them for a left-padded batch: count of real tokens before, pads at 1."""
    position_ids = attention_mask.long().cumsum(-1) - 1
    return position_ids.masked_fill(attention_mask == 0, 1)


def causal_lm_forward(model, input_ids, attention_mask, position_ids, num_completion_tokens: int, **kwargs):
    """`model(input_ids=..., attention_mask=..., position_ids=...)`, keeping only the logits PPO needs when the model
    takes `logits_to_keep` (the last C + 1 positions: position P - 1 predicts completion token 0). Returns the model's
    output object as is."""
    base = model.get_base_model() if is_peft_model(model) else model
    if "logits_to_keep" in inspect.signature(base.forward).parameters:
        kwargs["logits_to_keep"] = num_completion_tokens + 1
    return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                 **kwargs)


def graph_decode_problem(policy) -> str | None:
    """Why `rat_hf.generation.graph_generate` cannot sample `policy`'s rollouts as `generate()` would; None: it can.
    (The decode loop refuses anything else it meets in one line, at the first rollout.)"""
    base = policy.get_base_model() if is_peft_model(policy) else policy
    if is_peft_model(policy) and policy.active_peft_config.is_prompt_learning:
        return "a prompt-learning adapter (its virtual tokens are added by PeftModel.generate)"
    config = base.config
    if getattr(config, "is_encoder_decoder", False):
        return "an encoder-decoder model"
    attn = getattr(config, "_attn_implementation", None)
    if attn not in ("sdpa", "eager"):
        return f"attn_implementation={attn!r} (graph decoding builds sdpa/eager masks)"
    if "position_ids" not in inspect.signature(base.forward).parameters:
        return f"{type(base).__name__}.forward takes no position_ids"
    extra = sorted(set(base.generation_config.to_diff_dict()) - _NEUTRAL_GENERATION_FIELDS)
    if extra:
        return f"the policy's generation_config sets {extra} (logits processors graph decoding does not run)"
    return None


def choose_graph_decode(graph_decode: bool | None, policy, device: torch.device) -> tuple[bool, str]:
    """`PPOConfig.graph_decode` -> (use graph decoding, why). None: on for a policy of `GRAPH_DECODE_MODEL_TYPES` on
    CUDA that `graph_decode_problem` finds nothing against; True: on, or a one-line ValueError naming the problem."""
    problem = graph_decode_problem(policy)
    if graph_decode:
        if problem:
            raise ValueError(f"PPOConfig.graph_decode=True, but graph decoding cannot sample this policy: {problem}")
        return True, "graph_decode=True" + ("" if device.type == "cuda" else " (not on CUDA: the loop runs uncaptured)")
    if graph_decode is not None:
        return False, "graph_decode=False"
    base = policy.get_base_model() if is_peft_model(policy) else policy
    model_type = getattr(base.config, "model_type", None)
    if device.type != "cuda":
        return False, f"graph_decode=None and the device is {device.type}, not CUDA"
    if model_type not in GRAPH_DECODE_MODEL_TYPES:
        return False, (f"graph_decode=None and model_type {model_type!r} is not one of {GRAPH_DECODE_MODEL_TYPES} "
                       "(graph_decode=True tries it)")
    if problem:
        return False, f"graph_decode=None and {problem}"
    return True, f"graph_decode=None: a {model_type} policy on CUDA"


def completion_logits(outputs, num_completion_tokens: int, temperature: float) -> torch.Tensor:
    """`[B, C, V]` logits that predict the C completion tokens, divided by the sampling temperature."""
    c = num_completion_tokens
    return outputs.logits[:, -(c + 1):-1] / temperature


class PolicyAndValueModel(nn.Module):
    """The policy and its value function as one module for `Trainer` (one optimizer, one DDP wrapper, one backward).

    `forward(input_ids, attention_mask, position_ids, num_completion_tokens)` -> `(policy output, values [B, C])`:
    the policy's output object from its own full forward, and V(s_t) for every completion token t (read at the
    position before it). The value comes from `value_model`'s trunk + `.score` head, or from `value_head` on the
    policy's last hidden state.
    """

    def __init__(self, policy: nn.Module, value_model: PreTrainedModel | None = None,
                 value_head: nn.Module | None = None):
        super().__init__()
        if (value_model is None) == (value_head is None):
            raise ValueError("PolicyAndValueModel: give exactly one of value_model and value_head")
        if value_model is not None:
            check_value_model(value_model)
        self.policy, self.value_model, self.value_head = policy, value_model, value_head
        self.config = policy.config  # Trainer reads model.config

    def forward(self, input_ids, attention_mask, position_ids, num_completion_tokens: int):
        c = num_completion_tokens
        extra = {"output_hidden_states": True} if self.value_head is not None else {}
        outputs = causal_lm_forward(self.policy, input_ids, attention_mask, position_ids, c, **extra)
        if self.value_head is not None:
            values = self.value_head(outputs.hidden_states[-1][:, -(c + 1):-1]).squeeze(-1)  # [B, C]
        else:
            trunk = getattr(self.value_model, self.value_model.base_model_prefix)
            hidden = trunk(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                           use_cache=False).last_hidden_state  # [B, L, D]
            values = self.value_model.score(hidden[:, -(c + 1):-1]).squeeze(-1)  # [B, C]
        return outputs, values.float()

    def _each_model(self):
        return [m for m in (self.policy, self.value_model) if m is not None]

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, **kwargs):
        for model in self._each_model():
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=activation_checkpointing_kwargs,
                                                      **kwargs)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=activation_checkpointing_kwargs,
                                                    **kwargs)
            if is_peft_model(model):  # frozen embeddings: the checkpointed layers' inputs need grad
                model.enable_input_require_grads()

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, **kwargs):  # transformers < 5.24
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)


def check_value_model(value_model) -> None:
    score = getattr(value_model, "score", None)
    prefix = getattr(value_model, "base_model_prefix", "")
    if not isinstance(score, nn.Linear) or not hasattr(value_model, prefix or "\0"):
        raise ValueError(f"value_model: expected a sequence-classification model with a `.score` Linear head over its "
                         f"`base_model_prefix` trunk (e.g. AutoModelForSequenceClassification of a decoder), got "
                         f"{type(value_model).__name__}")
    if score.out_features != 1:
        raise ValueError(f"value_model: its score head has {score.out_features} outputs; a value model needs "
                         f"num_labels=1")


def value_model_from_policy(policy: PreTrainedModel, pad_token_id: int | None) -> PreTrainedModel:
    """A sequence-classification model of the policy's architecture (num_labels=1) with the policy's trunk weights
    and a zero score head (values start at 0)."""
    source = copy.deepcopy(policy).unload() if is_peft_model(policy) else policy  # the base weights, no adapter
    config = copy.deepcopy(source.config)
    config.num_labels, config.pad_token_id = 1, pad_token_id
    value_model = AutoModelForSequenceClassification.from_config(config).to(dtype=source.dtype, device=source.device)
    check_value_model(value_model)
    trunk = getattr(value_model, value_model.base_model_prefix)
    trunk.load_state_dict(getattr(source, source.base_model_prefix).state_dict())
    nn.init.zeros_(value_model.score.weight)
    return value_model


def keep_rows(rows: list) -> list:
    """The data collator: the dataset rows as they are (prompts and the columns for the reward functions)."""
    return rows


def reward_func_name(func) -> str:
    if isinstance(func, nn.Module):
        return str(getattr(func.config, "_name_or_path", "") or type(func).__name__).rstrip("/").split("/")[-1]
    while hasattr(func, "func"):  # functools.partial
        func = func.func
    return getattr(func, "__name__", type(func).__name__)


class RolloutSampler(Sampler):
    """Dataset indices for PPO: chunks of `prompts_per_rollout` distinct prompts (shuffled each pass over the data),
    each index `num_generations` times in a row, each chunk `repeats` times (one copy per micro-batch the rollout
    feeds). With a loader batch of one process's rollout, accelerate hands process p the p-th slice of every chunk."""

    def __init__(self, num_rows: int, prompts_per_rollout: int, num_generations: int, repeats: int, seed: int = 0):
        if num_rows < prompts_per_rollout:
            raise ValueError(f"train_dataset has {num_rows} prompts, fewer than the {prompts_per_rollout} one rollout "
                             f"needs (per_device_train_batch_size * gradient_accumulation_steps * num_mini_batches * "
                             f"processes / num_generations)")
        self.num_rows, self.prompts_per_rollout = num_rows, prompts_per_rollout
        self.num_generations, self.repeats = num_generations, repeats
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        rollouts = self.num_rows // self.prompts_per_rollout
        return rollouts * self.prompts_per_rollout * self.num_generations * self.repeats

    def __iter__(self):
        order = torch.randperm(self.num_rows, generator=self.generator).tolist()
        for start in range(0, self.num_rows - self.prompts_per_rollout + 1, self.prompts_per_rollout):
            chunk = [i for i in order[start:start + self.prompts_per_rollout] for _ in range(self.num_generations)]
            for _ in range(self.repeats):
                yield from chunk


class PPOTrainer(Trainer):
    """PPO on a causal LM (see the module docstring).

    Args:
        model: the policy: a causal LM, a `PeftModel`, or a name/path for `AutoModelForCausalLM.from_pretrained`.
        reward_funcs: as for TRL's `GRPOTrainer`: a callable `f(prompts, completions, completion_ids, **columns) ->
            list[float | None]` (every dataset column but `prompt` is passed by name, plus `trainer_state` and
            `log_metric`), a sequence-classification reward model (or its name), or a list of these, combined with
            `args.reward_weights` (None entries are left out of the weighted sum).
        train_dataset: a `prompt` column: text, or a list of chat messages (the tokenizer's chat template is applied
            with a generation prompt).
        value_model: a sequence-classification model with a `.score` head and num_labels=1 (or a name/path); None:
            see `PPOConfig.value_head`.
        ref_model: the frozen reference for the KL penalty; None: the adapter-disabled policy under PEFT, otherwise
            a frozen copy of the policy at start. Unused when `kl_coef` is 0.
        peft_config: a PEFT config to wrap the policy with (the reference is then the adapter-disabled base).
    """

    _tag_names = ["rat_hf", "ppo"]

    def __init__(self, model, reward_funcs, args: PPOConfig | None = None, train_dataset=None, processing_class=None,
                 value_model=None, ref_model=None, reward_processing_classes=None, peft_config=None, callbacks=None,
                 optimizers=(None, None)):
        args = args if args is not None else PPOConfig(output_dir="outputs/ppo")
        if not isinstance(args, PPOConfig):
            raise ValueError(f"PPOTrainer: args must be a PPOConfig, got {type(args).__name__}")
        remote = {"trust_remote_code": args.trust_remote_code}
        policy = AutoModelForCausalLM.from_pretrained(model, **remote) if isinstance(model, str) else model
        if processing_class is None:
            processing_class = AutoTokenizer.from_pretrained(policy.config._name_or_path, **remote)
        self._stop_token_ids = self._stop_ids(policy, processing_class)
        if processing_class.pad_token_id is None:  # safe: completion masks come from the first EOS, never from pads
            logger.warning("the tokenizer has no pad token: padding with its EOS token %r", processing_class.eos_token)
            processing_class.pad_token = processing_class.eos_token
        if getattr(policy.config, "gating_mode", None) == "reinforce":
            logger.warning("policy has gating_mode='reinforce': the update forward samples gating decisions the "
                           "rollout (eval mode, expected gates) did not, so the importance ratios carry that noise; "
                           "the sampled gates are trained with the tokens' PPO signal (_gate_loss)")

        # value function (built from the plain policy, before any adapter is added)
        value_head = None
        if isinstance(value_model, str):
            value_model = AutoModelForSequenceClassification.from_pretrained(value_model, num_labels=1, **remote)
        if value_model is None and args.value_head:
            hidden = policy.config.get_text_config().hidden_size
            value_head = nn.Linear(hidden, 1, bias=True).to(dtype=policy.dtype, device=policy.device)
            nn.init.zeros_(value_head.weight), nn.init.zeros_(value_head.bias)
        elif value_model is None:
            value_model = value_model_from_policy(policy, processing_class.pad_token_id)
        if value_model is not None and value_model.get_input_embeddings().num_embeddings < len(processing_class):
            raise ValueError(f"value_model: its vocabulary ({value_model.get_input_embeddings().num_embeddings}) is "
                             f"smaller than the tokenizer's {len(processing_class)} tokens; it reads the policy's ids")

        # reference model
        if peft_config is not None:
            from peft import get_peft_model

            if is_peft_model(policy):
                raise ValueError("PPOTrainer: the model is already a PeftModel; leave peft_config out")
            policy = get_peft_model(policy, peft_config)
        if isinstance(ref_model, str):
            ref_model = AutoModelForCausalLM.from_pretrained(ref_model, **remote)
        if args.kl_coef > 0 and ref_model is None and not is_peft_model(policy):
            ref_model = copy.deepcopy(policy)
        self.ref_model = ref_model.eval().requires_grad_(False) if ref_model is not None and args.kl_coef > 0 else None

        if args.disable_dropout:
            for m in (policy, value_model):
                if m is not None:
                    disable_dropout(m)

        # reward functions, as GRPOTrainer takes them
        reward_funcs = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
        if not reward_funcs:
            raise ValueError("PPOTrainer: reward_funcs is empty")
        reward_funcs = [AutoModelForSequenceClassification.from_pretrained(f, num_labels=1, **remote)
                        if isinstance(f, str) else f for f in reward_funcs]
        for f in reward_funcs:
            if not (callable(f) or isinstance(f, nn.Module)):
                raise ValueError(f"reward_funcs: expected callables or reward models, got {type(f).__name__}")
        weights = args.reward_weights if args.reward_weights is not None else [1.0] * len(reward_funcs)
        if len(weights) != len(reward_funcs):
            raise ValueError(f"PPOConfig.reward_weights has {len(weights)} weights for {len(reward_funcs)} reward "
                             "functions")
        if reward_processing_classes is None:
            reward_processing_classes = [None] * len(reward_funcs)
        elif not isinstance(reward_processing_classes, (list, tuple)):
            reward_processing_classes = [reward_processing_classes]
        if len(reward_processing_classes) != len(reward_funcs):
            raise ValueError(f"reward_processing_classes has {len(reward_processing_classes)} entries for "
                             f"{len(reward_funcs)} reward functions")
        reward_processing_classes = list(reward_processing_classes)
        for i, f in enumerate(reward_funcs):
            if isinstance(f, PreTrainedModel):  # scored by logits[:, 0], as TRL does
                if reward_processing_classes[i] is None:
                    reward_processing_classes[i] = AutoTokenizer.from_pretrained(f.config._name_or_path, **remote)
                f.eval().requires_grad_(False)
        self.reward_funcs, self.reward_processing_classes = reward_funcs, reward_processing_classes
        self.reward_func_names = [reward_func_name(f) for f in reward_funcs]
        self.reward_weights = torch.tensor(weights, dtype=torch.float32)

        if train_dataset is None or "prompt" not in (train_dataset.column_names or []):
            columns = None if train_dataset is None else train_dataset.column_names
            raise ValueError(f"PPOTrainer: train_dataset needs a 'prompt' column (text or chat messages); columns: "
                             f"{columns}")

        wrapper = PolicyAndValueModel(policy, value_model=value_model, value_head=value_head)
        super().__init__(model=wrapper, args=args, data_collator=keep_rows, train_dataset=train_dataset,
                         processing_class=processing_class, callbacks=callbacks, optimizers=optimizers)
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise ValueError("PPOTrainer supports one process or DDP; FSDP and DeepSpeed are not supported")
        self.model_accepts_loss_kwargs = False  # compute_loss normalises per micro-batch; Trainer divides by GA
        device = self.accelerator.device
        if self.ref_model is not None:
            self.ref_model.to(device)
        for f in self.reward_funcs:
            if isinstance(f, nn.Module):
                f.to(device)
        sampling = dict(
            max_new_tokens=args.max_new_tokens, do_sample=True, temperature=args.temperature,
            # explicit neutral values: a model's own generation_config must not add a warper (top-k 50, top-p, ...)
            # that would make the sampling distribution differ from softmax(logits / temperature)
            top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0,
            repetition_penalty=1.0, no_repeat_ngram_size=0, min_new_tokens=0, num_beams=1,
            eos_token_id=self._stop_token_ids, pad_token_id=processing_class.pad_token_id, use_cache=True,
        )
        self.generation_config = GenerationConfig(**sampling)
        # graph decoding gets them as keyword arguments, which override the model's own values even when None:
        # min_new_tokens=0 would become a (no-op) MinLengthLogitsProcessor, which graph decoding refuses
        self._graph_sampling = {**sampling, "min_new_tokens": None, "min_length": 0}
        self.graph_decode, why = choose_graph_decode(args.graph_decode, policy, device)
        logger.info("PPO rollouts: %s (%s)", "graph-decoded" if self.graph_decode else "generate()", why)
        self._rollout_index, self._micro_batches = None, []
        self._step_seen, self._micro = -1, 0
        self._metrics = defaultdict(list)
        self._seconds = {"rollout": 0.0, "update": 0.0}
        self._last_logged_step = 0

    @staticmethod
    def _stop_ids(policy, tokenizer) -> list:
        ids = [tokenizer.eos_token_id]
        gen_eos = getattr(getattr(policy, "generation_config", None), "eos_token_id", None)
        ids += list(gen_eos) if isinstance(gen_eos, (list, tuple)) else [gen_eos]
        ids = sorted({int(i) for i in ids if i is not None})
        if not ids:
            raise ValueError("PPOTrainer: neither the tokenizer nor the model's generation_config defines an EOS "
                             "token: completions could not end")
        return ids

    # ---- data --------------------------------------------------------------------------------------------------------
    def _get_train_sampler(self, train_dataset=None):
        args = self.args
        prompts = args.local_rollout_batch_size * args.world_size // args.num_generations
        return RolloutSampler(len(train_dataset if train_dataset is not None else self.train_dataset), prompts,
                              args.num_generations, args.steps_per_rollout * args.gradient_accumulation_steps,
                              seed=args.data_seed if args.data_seed is not None else args.seed)

    def get_train_dataloader(self):
        return self._get_dataloader(dataset=self.train_dataset, description="Training",
                                    batch_size=self.args.local_rollout_batch_size,
                                    sampler_fn=self._get_train_sampler, is_training=True)

    def _prepare_inputs(self, inputs: list) -> dict:
        """The next micro-batch of the current rollout; a new rollout from `inputs` (this process's prompts) at the
        first micro-batch of each (or after resuming mid-rollout)."""
        args = self.args
        step = self.state.global_step
        if step != self._step_seen:
            self._step_seen, self._micro = step, 0
        phase = (step % args.steps_per_rollout) * args.gradient_accumulation_steps + self._micro
        self._micro += 1
        if self._rollout_index != step // args.steps_per_rollout:
            if phase:
                logger.warning("step %d is inside a rollout (resumed?): generating a fresh one for its remaining "
                               "micro-batches", step)
            start = time.perf_counter()
            self._micro_batches = self._rollout(inputs, step // args.steps_per_rollout)
            self._rollout_index = step // args.steps_per_rollout
            self._seconds["rollout"] += time.perf_counter() - start
        return self._micro_batches[phase]

    # ---- rollout -----------------------------------------------------------------------------------------------------
    def _prompt_text(self, prompt) -> str:
        if isinstance(prompt, str):
            return prompt
        if isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt):
            return self.processing_class.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        raise ValueError(f"PPOTrainer: a prompt must be text or a list of chat messages, got {type(prompt).__name__}")

    def _forward_chunks(self, rows: int):
        size = self.args.per_device_train_batch_size
        return [slice(i, min(i + size, rows)) for i in range(0, rows, size)]

    @torch.no_grad()
    def _rollout(self, inputs: list, rollout_index: int) -> list:
        """Generate, score and evaluate one rollout; returns its micro-batches in training order."""
        wrapper = self.accelerator.unwrap_model(self.model)  # keeps accelerate's autocast wrapper of forward
        wrapper.eval()  # dropout off for generation, old log-probs and values
        with self.accelerator.autocast():  # generation and reference in the precision regime of the updates
            micro_batches = self._rollout_batches(wrapper, inputs, rollout_index)
        wrapper.train()
        return micro_batches

    def _rollout_batches(self, wrapper, inputs: list, rollout_index: int) -> list:
        """`_rollout`'s work (in eval mode, under no_grad and the updates' autocast)."""
        args, device, tok = self.args, self.accelerator.device, self.processing_class
        prompts = [row["prompt"] for row in inputs]
        encoded = tok(text=[self._prompt_text(p) for p in prompts], return_tensors="pt", padding=True,
                      padding_side="left", add_special_tokens=False)
        prompt_ids, prompt_mask = encoded["input_ids"].to(device), encoded["attention_mask"].to(device)
        if args.max_prompt_length is not None:  # keep the end of a long prompt (the turn being answered)
            prompt_ids, prompt_mask = prompt_ids[:, -args.max_prompt_length:], prompt_mask[:, -args.max_prompt_length:]
        sequences = self._generate(wrapper.policy, prompt_ids, prompt_mask)
        completion_ids = sequences[:, prompt_ids.shape[1]:]  # [R, C0]

        # the completion: up to and including its first stop token, or all max_new_tokens of it
        is_stop = torch.isin(completion_ids, torch.tensor(self._stop_token_ids, device=device))
        terminated = is_stop.any(1)  # [R]
        last = torch.where(terminated, is_stop.int().argmax(1), completion_ids.shape[1] - 1)  # [R] scored token
        num_tokens = int(last.max()) + 1
        completion_ids = completion_ids[:, :num_tokens]
        completion_mask = torch.arange(num_tokens, device=device)[None] <= last[:, None]  # [R, C]
        completion_ids = completion_ids.masked_fill(~completion_mask, tok.pad_token_id)

        scores = self._score(inputs, prompts, completion_ids, completion_mask)  # [R]
        if args.missing_eos_penalty is not None:
            scores = scores - args.missing_eos_penalty * (~terminated).float()

        input_ids = torch.cat([prompt_ids, completion_ids], 1)  # [R, P + C]
        attention_mask = torch.cat([prompt_mask, completion_mask.long()], 1)
        position_ids = position_ids_from_mask(attention_mask)
        old_log_probs, old_values, ref_log_probs = [], [], []
        policy = wrapper.policy
        for rows in self._forward_chunks(len(prompts)):  # the chunks the first PPO pass will use
            batch = (input_ids[rows], attention_mask[rows], position_ids[rows], num_tokens)
            outputs, values = wrapper(*batch)
            logits = completion_logits(outputs, num_tokens, args.temperature)
            old_log_probs.append(selective_log_softmax(logits, completion_ids[rows]))
            old_values.append(values)
            if args.kl_coef > 0:
                if self.ref_model is None:
                    with policy.disable_adapter():
                        ref_outputs = causal_lm_forward(policy, *batch)
                else:
                    ref_outputs = causal_lm_forward(self.ref_model, *batch)
                ref_logits = completion_logits(ref_outputs, num_tokens, args.temperature)
                ref_log_probs.append(selective_log_softmax(ref_logits, completion_ids[rows]))
        old_log_probs, old_values = torch.cat(old_log_probs), torch.cat(old_values)
        mask_f = completion_mask.float()

        # per-token rewards: - kl_coef * KL everywhere, + the score at the scored (last) token; then GAE per sequence
        kl = per_token_kl(old_log_probs, torch.cat(ref_log_probs), args.kl_estimator) * mask_f if ref_log_probs \
            else torch.zeros_like(old_log_probs)
        rewards = -args.kl_coef * kl
        rewards[torch.arange(len(prompts), device=device), last] += scores
        advantages, returns = gae_advantages(rewards, old_values, completion_mask, args.gamma, args.lam)
        if args.whiten_advantages:
            advantages = masked_whiten(advantages, completion_mask)

        m = self._metrics
        m["reward"].append(scores.mean().item())
        m["reward_std"].append(scores.std().item() if len(scores) > 1 else 0.0)
        m["kl"].append((kl.sum(1)).mean().item())  # per sequence: summed over its tokens
        m["non_score_reward"].append((-args.kl_coef * kl.sum(1)).mean().item())
        m["completions/mean_length"].append(mask_f.sum(1).mean().item())
        m["completions/terminated_fraction"].append(terminated.float().mean().item())
        m["perplexity"].append(math.exp(-masked_mean(old_log_probs, completion_mask).item()))  # under logits / T
        m["value_mean"].append(masked_mean(old_values, completion_mask).item())

        # schedule: pass 0 in rollout order (its chunks are the ones scored above: ratio exactly 1 at its first
        # mini-batch), then shuffled passes; each pass = num_mini_batches * gradient_accumulation_steps micro-batches
        generator = torch.Generator().manual_seed(args.seed + rollout_index)
        n = len(prompts)
        orders = [torch.arange(n)] + [torch.randperm(n, generator=generator) for _ in range(args.num_ppo_epochs - 1)]
        tensors = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
                   "completion_ids": completion_ids, "completion_mask": completion_mask,
                   "old_log_probs": old_log_probs, "old_values": old_values, "advantages": advantages,
                   "returns": returns}
        size = args.per_device_train_batch_size
        return [{**{k: v[order[i:i + size].to(device)] for k, v in tensors.items()},
                 "num_completion_tokens": num_tokens} for order in orders for i in range(0, n, size)]

    def _generate(self, policy, prompt_ids, prompt_mask) -> torch.Tensor:
        """`[R, P + C0]` sampled sequences of the left-padded prompts `[R, P]`: `generate()`, or (`graph_decode`)
        `graph_generate` on prompts left-padded further to one width for the whole run (max_prompt_length, else the
        next multiple of GRAPH_PROMPT_MULTIPLE), so that its captured (and compiled) step is replayed rollout after
        rollout; the extra columns are cut off again. EOS is checked after every step, as generate() does, so the
        loop stops at the same step and draws as many samples: the RNG stream, hence the run, stays generate()'s."""
        if not self.graph_decode:
            return policy.generate(input_ids=prompt_ids, attention_mask=prompt_mask,
                                   generation_config=self.generation_config)
        from ..generation import graph_generate

        width = self.args.max_prompt_length or -(-prompt_ids.shape[1] // GRAPH_PROMPT_MULTIPLE) * GRAPH_PROMPT_MULTIPLE
        extra = width - prompt_ids.shape[1]  # >= 0: prompts were cut to max_prompt_length
        padded_ids = F.pad(prompt_ids, (extra, 0), value=self.processing_class.pad_token_id)
        padded_mask = F.pad(prompt_mask, (extra, 0), value=0)
        model = policy.get_base_model() if is_peft_model(policy) else policy  # LoRA layers sit inside the base
        sequences = graph_generate(model, padded_ids, padded_mask, cuda_graph=padded_ids.device.type == "cuda",
                                   check_every=1, **self._graph_sampling)
        return sequences[:, extra:]

    def _score(self, inputs: list, prompts: list, completion_ids, completion_mask) -> torch.Tensor:
        """Weighted sum over the reward functions (TRL's call convention) -> `[R]` scores."""
        tok, device = self.processing_class, self.accelerator.device
        ids_list = [row[mask].tolist() for row, mask in zip(completion_ids, completion_mask)]
        texts = tok.batch_decode(ids_list, skip_special_tokens=True)
        conversational = not isinstance(prompts[0], str)
        completions = [[{"role": "assistant", "content": t}] for t in texts] if conversational else texts
        columns = {k: [row[k] for row in inputs] for k in inputs[0] if k not in ("prompt", "completion",
                                                                                  "completion_ids")}
        per_func = torch.full((len(prompts), len(self.reward_funcs)), float("nan"))
        for i, (func, name) in enumerate(zip(self.reward_funcs, self.reward_func_names)):
            if isinstance(func, nn.Module):
                rtok = self.reward_processing_classes[i]
                if conversational:
                    joined = [rtok.apply_chat_template(p + c, tokenize=False) for p, c in zip(prompts, completions)]
                else:
                    joined = [p + c for p, c in zip(prompts, completions)]
                enc = rtok(text=joined, return_tensors="pt", padding=True, padding_side="right",
                           add_special_tokens=False).to(device)
                per_func[:, i] = func(**enc).logits[:, 0].float().cpu()
                continue
            out = func(prompts=prompts, completions=completions, completion_ids=ids_list, trainer_state=self.state,
                       log_metric=self._log_metric, **columns)
            if len(out) != len(prompts):
                raise ValueError(f"reward function {name!r} returned {len(out)} rewards for {len(prompts)} completions")
            per_func[:, i] = torch.tensor([float("nan") if r is None else float(r) for r in out])
        for i, name in enumerate(self.reward_func_names):  # nan when a function scored none of them
            self._metrics[f"rewards/{name}/mean"].append(per_func[:, i].nanmean().item())
        unscored = per_func.isnan().all(1)
        if unscored.any():
            logger.warning("every reward function returned None for %d of %d completions (e.g. %r): their score is 0",
                           int(unscored.sum()), len(prompts), texts[int(unscored.nonzero()[0])][:80])
        return (per_func * self.reward_weights).nansum(1).to(device)

    def _log_metric(self, name: str, value: float) -> None:
        """`log_metric` for reward functions (TRL's kwarg): averaged over the logging window like the others."""
        self._metrics[name].append(float(value))

    # ---- update ------------------------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        with collect_gate_samples() as gate_samples:  # a reinforce-mode RAT policy hands over its sampled gates
            outputs, values = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                    position_ids=inputs["position_ids"],
                                    num_completion_tokens=inputs["num_completion_tokens"])
        mask = inputs["completion_mask"]
        policy_tokens, stats = self._policy_loss(outputs, inputs)  # [B, C]
        policy_loss = masked_mean(policy_tokens, mask)
        value_tokens, value_clipped = clipped_value_loss(values, inputs["old_values"], inputs["returns"],
                                                         self.args.value_clip_eps)
        value_loss = masked_mean(value_tokens, mask)
        loss = policy_loss + self.args.vf_coef * value_loss
        gate_loss = self._gate_loss(gate_samples, policy_loss, stats["log_probs"], inputs)
        if gate_loss is not None:
            loss = loss + self.accelerator.unwrap_model(model).config.policy_loss_coef * gate_loss
            self._metrics["gate/policy_loss"].append(gate_loss.item())
        with torch.no_grad():
            m = self._metrics
            log_ratio = stats["log_probs"] - inputs["old_log_probs"]
            m["policy_loss"].append(policy_loss.item())
            m["value_loss"].append(value_loss.item())
            m["entropy"].append(masked_mean(stats["entropy"], mask).item())
            m["clip_fraction"].append(masked_mean(stats["clipped"].float(), mask).item())
            m["value_clip_fraction"].append(masked_mean(value_clipped.float(), mask).item())
            m["approx_kl"].append(masked_mean(0.5 * log_ratio**2, mask).item())  # old -> current policy
            m["ratio"].append(masked_mean(stats["ratio"], mask).item())
            # accuracy: how often the sampled token is the policy's most likely one
            m["accuracy"].append(masked_mean((stats["logits"].argmax(-1) == inputs["completion_ids"]).float(),
                                             mask).item())
        return (loss, outputs) if return_outputs else loss

    def _gate_loss(self, gate_samples: list, policy_loss: torch.Tensor, log_probs: torch.Tensor,
                   inputs: dict) -> torch.Tensor | None:
        """REINFORCE loss of a reinforce-mode RAT policy's sampled gates, with the tokens' own PPO signal.

        The sampled gates are part of the action: each completion token's policy loss, linearised in its log-prob
        (`d policy_loss / d log p_t * log p_t`, the clipped surrogate's slope: 0 where the ratio is clipped), is the
        reward-to-go signal of the gates at and before it (`gate_reinforce_loss`: within the sequence, leave-one-out
        baseline). None when no gates were sampled (soft gating, other models) or the selectors are frozen (LoRA).
        """
        samples = [s for s in gate_samples if s.log_probs.requires_grad]
        if not samples:
            return None
        (token_losses,) = linearized_token_losses(policy_loss, [log_probs])  # [B, C]
        if token_losses is None:
            return None
        (sample,) = samples  # one policy forward per loss
        seq_len, num_completion = sample.log_probs.shape[1], log_probs.shape[1]
        # completion token j sits at seq_len - C + j and is predicted at the position before it
        aligned = torch.zeros_like(sample.log_probs, dtype=token_losses.dtype)
        aligned[:, seq_len - num_completion - 1: seq_len - 1] = token_losses
        config = self.accelerator.unwrap_model(self.model).config
        return gate_reinforce_loss(sample.log_probs, aligned, inputs["attention_mask"].bool(),
                                   discount=config.policy_discount, position_ids=sample.position_ids,
                                   gate_entropy=sample.entropy, entropy_coef=config.entropy_coef)

    def _policy_loss(self, outputs, inputs: dict) -> tuple[torch.Tensor, dict]:
        """Per-token policy loss `[B, C]`, not reduced (zero weight outside `completion_mask` comes from the caller's
        masked mean): PPO's clipped surrogate on the temperature-scaled log-probs, minus `entropy_coef` * entropy.

        `outputs` is the policy's own output object (`model(input_ids=..., attention_mask=...)`), so model-specific
        per-token terms can be added here. Returns `(loss, stats)` with `stats` = `log_probs`, `ratio`, `clipped`,
        `entropy` (each `[B, C]`) and the scaled `logits` `[B, C, V]`.
        """
        args = self.args
        logits = completion_logits(outputs, inputs["num_completion_tokens"], args.temperature)  # [B, C, V]
        log_probs = selective_log_softmax(logits, inputs["completion_ids"])  # [B, C]
        loss, ratio, clipped = clipped_policy_loss(log_probs, inputs["old_log_probs"], inputs["advantages"],
                                                   args.clip_eps)
        if args.entropy_coef > 0:
            entropy = entropy_from_logits(logits)
            loss = loss - args.entropy_coef * entropy
        else:
            with torch.no_grad():
                entropy = entropy_from_logits(logits)
        return loss, {"log_probs": log_probs, "ratio": ratio, "clipped": clipped, "entropy": entropy,
                      "logits": logits}

    def training_step(self, model, inputs, num_items_in_batch=None):
        start, rollout_before = time.perf_counter(), self._seconds["rollout"]
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._seconds["update"] += time.perf_counter() - start - (self._seconds["rollout"] - rollout_before)
        return loss

    # ---- logging -----------------------------------------------------------------------------------------------------
    def log(self, logs: dict, start_time: float | None = None) -> None:
        if "loss" in logs and self._metrics:  # a training log: add the metrics of this window
            from accelerate.utils import gather_object

            # per process: the window's mean of each metric; then the mean over the processes that logged it (a
            # reward function's log_metric may run on some processes only)
            local = {k: sum(v) / len(v) for k, v in self._metrics.items() if v}
            merged = defaultdict(list)
            for per_process in gather_object([local]):
                for k, v in per_process.items():
                    merged[k].append(v)
            logs.update({k: round(sum(v) / len(v), 6) for k, v in sorted(merged.items())})
            steps = max(1, self.state.global_step - self._last_logged_step)
            logs["time/rollout_per_step"] = round(self._seconds["rollout"] / steps, 4)
            logs["time/update_per_step"] = round(self._seconds["update"] / steps, 4)
            self._metrics.clear()
            self._seconds = {"rollout": 0.0, "update": 0.0}
            self._last_logged_step = self.state.global_step
        super().log(logs, start_time)

    # ---- save / resume -----------------------------------------------------------------------------------------------
    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """The policy where `from_pretrained` finds it (the adapter alone under PEFT), the value model in
        `value_model/` (or the value head in `value_head.safetensors`), the tokenizer and the arguments."""
        from safetensors.torch import save_file

        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        wrapper = self.accelerator.unwrap_model(self.model)
        wrapper.policy.save_pretrained(output_dir)
        if wrapper.value_model is not None:
            wrapper.value_model.save_pretrained(os.path.join(output_dir, VALUE_MODEL_DIR))
        else:
            save_file({k: v.contiguous() for k, v in wrapper.value_head.state_dict().items()},
                      os.path.join(output_dir, VALUE_HEAD_FILE))
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Load what `_save` wrote into the policy and value function (exactly; a missing file is an error)."""
        from safetensors.torch import load_file

        wrapper = self.accelerator.unwrap_model(self.model)
        policy = wrapper.policy
        if is_peft_model(policy):
            from peft import set_peft_model_state_dict

            path = os.path.join(resume_from_checkpoint, "adapter_model.safetensors")
            if not os.path.isfile(path):
                raise ValueError(f"{resume_from_checkpoint}: no adapter_model.safetensors to resume the policy from")
            result = set_peft_model_state_dict(policy, load_file(path))
            if result.unexpected_keys:
                raise ValueError(f"{path}: unexpected adapter keys {result.unexpected_keys[:4]}")
        else:
            saved = type(policy).from_pretrained(resume_from_checkpoint, dtype=policy.dtype)
            policy.load_state_dict(saved.state_dict())
        if wrapper.value_model is not None:
            saved = type(wrapper.value_model).from_pretrained(os.path.join(resume_from_checkpoint, VALUE_MODEL_DIR),
                                                              dtype=wrapper.value_model.dtype)
            wrapper.value_model.load_state_dict(saved.state_dict())
        else:
            wrapper.value_head.load_state_dict(load_file(os.path.join(resume_from_checkpoint, VALUE_HEAD_FILE)))
