"""`PPOConfig`: the `TrainingArguments` of `PPOTrainer` (PPO with a learned value function and TRL's reward API).

Batch sizes (per process; `W` processes):

    micro-batch   = per_device_train_batch_size               sequences per forward/backward
    mini-batch    = micro-batch * gradient_accumulation_steps  sequences per optimizer step (x W in all)
    rollout       = mini-batch * num_mini_batches              sequences generated and scored at once (x W in all)
                    (= rollout / num_generations distinct prompts, each sampled num_generations times)

Each rollout is then used for `num_ppo_epochs` passes of `num_mini_batches` optimizer steps each, so one rollout
spans `steps_per_rollout = num_ppo_epochs * num_mini_batches` of `Trainer`'s global steps (`max_steps` counts those).
"""

from dataclasses import dataclass, field

from transformers import TrainingArguments

KL_ESTIMATORS = ("k1", "k2", "k3")  # see rat_hf.trainers.ppo_utils.per_token_kl


@dataclass
class PPOConfig(TrainingArguments):
    # ---- PPO --------------------------------------------------------------------------------------------------------
    clip_eps: float = field(
        default=0.2, metadata={"help": "PPO's ratio clip: the policy loss stops rewarding a token's probability ratio "
                                       "beyond 1 +/- clip_eps (the seed's 0.2, also TRL's)"})
    value_clip_eps: float | None = field(
        default=0.2, metadata={"help": "clip of the value prediction around its rollout value (TRL's cliprange_value "
                                       "0.2); None: plain squared error"})
    vf_coef: float = field(
        default=0.1, metadata={"help": "weight of the value loss. It is summed with the policy loss before the "
                                       "global gradient-norm clip, so a large value loss would shrink the policy's "
                                       "step (TRL's 0.1)"})
    entropy_coef: float = field(
        default=0.0, metadata={"help": "weight of the entropy bonus (of the sampling distribution, logits / "
                                       "temperature). 0: over a large vocabulary a bonus mostly rewards mass on junk "
                                       "tokens; the KL to the reference already keeps the policy from collapsing"})
    kl_coef: float = field(
        default=0.05, metadata={"help": "per-token KL penalty to the reference model, subtracted from the per-token "
                                        "reward (TRL's 0.05). 0: no reference model is kept"})
    kl_estimator: str = field(
        default="k1", metadata={"help": "per-token KL estimate in the reward: k1 (log pi - log pi_ref, unbiased, "
                                        "classic RLHF), k2 or k3 (non-negative)"})
    gamma: float = field(
        default=1.0, metadata={"help": "discount. 1: the score arrives once, at the end of a short episode; "
                                       "discounting would only shrink it for longer completions"})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda (TRL's 0.95): bias/variance of the advantages"})
    whiten_advantages: bool = field(
        default=True, metadata={"help": "normalise the advantages of each rollout to mean 0, std 1 (this process's "
                                        "completion tokens)"})
    num_ppo_epochs: int = field(
        default=4, metadata={"help": "passes over each rollout (TRL's 4); the first mini-batch of the first pass has "
                                     "importance ratio exactly 1"})
    num_mini_batches: int = field(default=1, metadata={"help": "optimizer steps per pass over a rollout"})
    num_generations: int = field(
        default=1, metadata={"help": "completions sampled per prompt in a rollout (PPO's value baseline needs no "
                                     "group; >1 gives several samples of one prompt)"})
    missing_eos_penalty: float | None = field(
        default=None, metadata={"help": "subtracted from the score of a completion cut at max_new_tokens without EOS. "
                                        "Either way such a completion is terminal at that horizon and scored as is"})
    disable_dropout: bool = field(
        default=True, metadata={"help": "set every dropout of the policy and value models to 0 (nn.Dropout and the "
                                        "attention-dropout floats) so updates compute the function the rollout "
                                        "sampled from. False: updates run with dropout while rollouts never do, so the "
                                        "first ratio is pi_dropout / pi_eval != 1 and clipping acts on dropout noise"})
    value_head: bool = field(
        default=False, metadata={"help": "when no value_model is passed: True, a linear value head on the policy's "
                                         "last hidden state (shared trunk, one forward); False, a separate "
                                         "sequence-classification copy of the policy (num_labels=1, trunk copied)"})
    reward_weights: list[float] | None = field(
        default=None, metadata={"help": "one weight per reward function (TRL's GRPOConfig.reward_weights); "
                                        "None: 1 each"})
    trust_remote_code: bool = field(
        default=False, metadata={"help": "passed to from_pretrained for models and tokenizers given by name (policy, "
                                         "value, reference and reward models)"})
    # ---- generation -------------------------------------------------------------------------------------------------
    temperature: float = field(
        default=0.7, metadata={"help": "sampling temperature (the seed's 0.7). Log-probs, ratios, KL and entropy all "
                                       "use logits / temperature, the distribution the tokens were drawn from; no "
                                       "top-k/top-p, which would change that distribution"})
    max_new_tokens: int = field(default=100, metadata={"help": "completion length cap (the seed's 100)"})
    max_prompt_length: int | None = field(
        default=412, metadata={"help": "prompt tokens kept (the last ones); 412 = the seed's max_length 512 minus "
                                       "max_new_tokens. None: no cap"})
    graph_decode: bool | None = field(
        default=None, metadata={"help": "sample rollouts through rat_hf.generation.graph_generate (the decode step "
                                        "replayed from a CUDA graph; same tokens as generate() under the same seed, "
                                        "about 2x faster on a GPU). None: on for a RAT or Llama policy on CUDA whose "
                                        "generation settings it supports, else off. True: required (a one-line "
                                        "error when unsupported; on CPU the same static-cache loop runs uncaptured). "
                                        "Prompts are then left-padded to max_prompt_length (or a multiple of 64) "
                                        "so every rollout has one shape: one capture (and compile), replayed"})
    # ---- TrainingArguments defaults that differ for RL --------------------------------------------------------------
    learning_rate: float = field(
        default=1e-5, metadata={"help": "AdamW's learning rate: full fine-tuning leaves the clip region within one "
                                        "rollout much above this (TRL's PPO used 3e-6); LoRA tolerates ~1e-4"})
    logging_steps: float = field(default=10, metadata={"help": "log every this many optimizer steps"})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "keep every dataset column: reward functions receive them by name"})

    def __post_init__(self):
        super().__post_init__()
        for name in ("num_ppo_epochs", "num_mini_batches", "num_generations", "max_new_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"PPOConfig.{name} must be a positive integer, got {value!r}")
        if self.max_prompt_length is not None and self.max_prompt_length < 1:
            raise ValueError(f"PPOConfig.max_prompt_length must be >= 1 or None, got {self.max_prompt_length}")
        if self.clip_eps <= 0:
            raise ValueError(f"PPOConfig.clip_eps must be > 0, got {self.clip_eps}")
        if self.value_clip_eps is not None and self.value_clip_eps <= 0:
            raise ValueError(f"PPOConfig.value_clip_eps must be > 0 or None, got {self.value_clip_eps}")
        for name in ("vf_coef", "entropy_coef", "kl_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"PPOConfig.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("gamma", "lam"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"PPOConfig.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ValueError(f"PPOConfig.temperature must be > 0 (sampling is always on), got {self.temperature}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"PPOConfig.kl_estimator must be one of {KL_ESTIMATORS}, got {self.kl_estimator!r}")
        if self.local_rollout_batch_size % self.num_generations:
            raise ValueError(
                f"PPOConfig: the rollout of per_device_train_batch_size * gradient_accumulation_steps * "
                f"num_mini_batches = {self.local_rollout_batch_size} sequences must be a multiple of num_generations="
                f"{self.num_generations}")

    @property
    def local_rollout_batch_size(self) -> int:
        """Sequences generated and scored per rollout on this process."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps * self.num_mini_batches

    @property
    def steps_per_rollout(self) -> int:
        """Optimizer steps (Trainer's global steps) each rollout is used for."""
        return self.num_ppo_epochs * self.num_mini_batches
