"""`AttentionGuidedConfig`: the TrainingArguments-style settings of the attention-guided curriculum trainer."""

from dataclasses import dataclass, field


@dataclass
class AttentionGuidedConfig:
    output_dir: str = field(default="outputs/attention_guided_rl", metadata={"help": "checkpoints, log, plot"})
    episodes: int = field(default=300, metadata={"help": "policy updates; each orders batch_size pools"})
    batch_size: int = field(default=8, metadata={"help": "pools per episode"})
    num_rollouts: int = field(
        default=4, metadata={"help": "orders sampled per pool; advantages are normalised within this group"})
    learning_rate: float = field(default=2e-3, metadata={"help": "AdamW on the LoRA adapter (small: rank-r updates)"})
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    temperature: float = field(default=1.0, metadata={"help": "divides the scaled q.k scores before the softmax"})
    kl_coef: float = field(
        default=0.01, metadata={"help": "weight of the exact KL to the adapter-disabled policy, summed over steps"})
    keep_fraction: float = field(
        default=1.0, metadata={"help": "train on the top fraction of trajectories by advantage (1: all; "
                                       "group-normalised advantages already centre the update)"})
    shuffle_rewards: bool = field(
        default=False, metadata={"help": "control: permute rewards across the batch (no signal left)"})
    lora_r: int = 8
    lora_alpha: int = 16
    lora_target_modules: str | None = field(
        default=None, metadata={"help": "comma-separated module names; None: PEFT's default for the model type"})
    save_steps: int = field(default=100, metadata={"help": "checkpoint every this many episodes (and at the end)"})
    save_total_limit: int | None = field(default=2, metadata={"help": "keep only the newest checkpoints"})
    logging_steps: int = 10
    seed: int = 0
    use_cpu: bool = False
    plot: bool = field(default=True, metadata={"help": "write training.png (reward and order metrics per episode)"})

    def __post_init__(self):
        positive = ("episodes", "batch_size", "num_rollouts", "lora_r", "lora_alpha", "save_steps", "logging_steps")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.num_rollouts < 2:
            raise ValueError(f"num_rollouts must be >= 2: advantages are normalised within a group, got "
                             f"{self.num_rollouts}")
        if not 0 < self.keep_fraction <= 1:
            raise ValueError(f"keep_fraction must be in (0, 1], got {self.keep_fraction}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.kl_coef < 0 or self.learning_rate <= 0:
            raise ValueError(f"need kl_coef >= 0 and learning_rate > 0, got {self.kl_coef} and {self.learning_rate}")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise ValueError(f"save_total_limit must be >= 1 or None, got {self.save_total_limit}")
