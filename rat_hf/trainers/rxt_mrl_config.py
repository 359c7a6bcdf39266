"""`RxTMRLConfig`: the settings of memory reinforcement learning (MRL, stage 5 of the RxT curriculum).

A `TrainingArguments` subclass (through `RxTEpisodeArguments`, shared with SMAT) holding the RL coefficients. Names
follow TRL's `GRPOConfig` where the meaning is the same (`num_generations`, `beta`, `epsilon`, `num_iterations`,
`scale_rewards`, `reward_weights`, `temperature`, `max_completion_length`) and TRL's former `PPOConfig` for the critic
(`vf_coef`, `cliprange_value`, `gamma`, `lam`, `whiten_advantages`). See `rxt_mrl_trainer.py` for the algorithm.
"""

import warnings
from dataclasses import dataclass, field

from ..data.interactions import MRL_STRATEGIES as STRATEGIES
from .rxt_smat_config import RxTEpisodeArguments

ADVANTAGE_ESTIMATORS = ("group", "critic")
DRIFT_TARGETS = ("reference", "previous")
MEMORY_ANSWERS = ("reference", "best")
KL_ESTIMATORS = ("k1", "k2", "k3")
# The default reward: mostly how close the answer is to the reference, some credit for echoing the saved interaction
# (RxLM's MRL reward mixes the same two targets), a little for the reference's length.
DEFAULT_REWARD_FUNCS = ["bleu_to_reference", "bleu_to_saved", "cosine_to_reference", "cosine_to_saved", "length"]
DEFAULT_REWARD_WEIGHTS = [0.4, 0.1, 0.3, 0.1, 0.1]


@dataclass
class RxTMRLConfig(RxTEpisodeArguments):
    """Memory reinforcement learning: answers sampled from the memory are rewarded for recalling earlier turns."""

    # -- curriculum ---------------------------------------------------------------------------------------------------
    curriculum: list[int] = field(
        default_factory=lambda: [2, 4, 8, 16],
        metadata={"help": "episode lengths (turns) of the curriculum stages, in order"})
    curriculum_steps: list[int] | None = field(
        default=None,
        metadata={"help": "optimizer steps of each stage; None: max_steps split evenly over the stages. When given "
                          "and max_steps is not, max_steps is their sum"})
    strategy: str = field(
        default="cumulative",
        metadata={"help": "for rows without a `strategy` column: cumulative (every turn asks about the previous one) "
                          "or long_range (a fact first, distractors, the question about the fact last)"})
    # -- sampling -----------------------------------------------------------------------------------------------------
    num_generations: int = field(
        default=4, metadata={"help": "answers sampled per memory state (the group of the group-relative estimator)"})
    max_prompt_length: int = field(default=128, metadata={"help": "query tokens kept ([Q] and [A] included)"})
    max_completion_length: int = field(default=32, metadata={"help": "new tokens per sampled answer"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature"})
    top_k: int = field(default=0, metadata={"help": "top-k sampling (0: off)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling (1: off)"})
    memory_answer: str = field(
        default="reference",
        metadata={"help": "what a scored turn writes into memory once its answers are scored: reference (the "
                          "dataset's answer) or best (the highest-reward sample)"})
    # -- rewards ------------------------------------------------------------------------------------------------------
    reward_funcs: list[str] = field(
        default_factory=lambda: list(DEFAULT_REWARD_FUNCS),
        metadata={"help": "reward names: bleu_to_reference, bleu_to_saved, cosine_to_reference, cosine_to_saved, "
                          "length, exact_match, a name of rat_hf.rewards or 'module:function' (used when the trainer "
                          "gets no reward_funcs)"})
    reward_weights: list[float] | None = field(
        default=None, metadata={"help": "one weight per reward function; None: the defaults' weights, else all 1"})
    bleu_max_n: int = field(default=4, metadata={"help": "highest n-gram order of the BLEU rewards (2 for 1-3 token "
                                                         "answers)"})
    bleu_smoothing: str = field(default="floor", metadata={"help": "none, floor, add-k or exp"})
    # -- loss ---------------------------------------------------------------------------------------------------------
    advantage_estimator: str = field(
        default="group",
        metadata={"help": "group: critic-free, advantages normalised within each memory state's samples (default); "
                          "critic: PPO with GAE and a value head reading the decoder states over memory + query"})
    scale_rewards: bool = field(default=True, metadata={"help": "group: divide advantages by the group's std"})
    beta: float = field(default=0.04, metadata={"help": "KL coefficient to the reference (a frozen copy of the "
                                                        "starting model, reading its own memory); 0: no KL"})
    kl_estimator: str = field(default="k3", metadata={"help": "group: per-token KL estimator in the loss (k1/k2/k3); "
                                                              "critic: the penalty in the reward is always k1"})
    epsilon: float = field(default=0.2, metadata={"help": "PPO clipping of the probability ratio"})
    num_iterations: int = field(default=1, metadata={"help": "optimisation passes over each rollout (PPO epochs)"})
    memory_drift_coef: float = field(
        default=0.1, metadata={"help": "weight of the memory-drift penalty: mean over updates, layers and slots of "
                                       "1 - cos(updated slot, target slot)"})
    memory_drift_target: str = field(
        default="reference",
        metadata={"help": "reference: the frozen reference model's memory after the same interactions (keeps the "
                          "memory representation near the one the decoder was trained to read); previous: the "
                          "memory before this update, detached (penalises overwriting)"})
    # -- critic -------------------------------------------------------------------------------------------------------
    vf_coef: float = field(default=0.5, metadata={"help": "critic: weight of the value loss"})
    vf_learning_rate: float | None = field(
        default=None, metadata={"help": "critic: learning rate of the value head, which starts from zero next to a "
                                        "trained policy and may want larger steps; None: learning_rate"})
    cliprange_value: float | None = field(default=0.2, metadata={"help": "critic: value clipping (None: off)"})
    gamma: float = field(default=1.0, metadata={"help": "critic: discount over an answer's tokens"})
    lam: float = field(default=0.95, metadata={"help": "critic: GAE lambda"})
    whiten_advantages: bool = field(default=True, metadata={"help": "critic: whiten GAE advantages per rollout"})
    # -- optimisation defaults for RL ---------------------------------------------------------------------------------
    learning_rate: float = field(default=1e-5, metadata={"help": "AdamW learning rate (RL wants small steps)"})

    def __post_init__(self):
        for name, allowed in (("advantage_estimator", ADVANTAGE_ESTIMATORS), ("strategy", STRATEGIES),
                              ("memory_drift_target", DRIFT_TARGETS), ("memory_answer", MEMORY_ANSWERS),
                              ("kl_estimator", KL_ESTIMATORS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        from ..rewards.bleu import SMOOTHING

        if self.bleu_smoothing not in SMOOTHING:
            raise ValueError(f"bleu_smoothing must be one of {SMOOTHING}, got {self.bleu_smoothing!r}")
        for name in ("num_generations", "max_prompt_length", "max_completion_length", "num_iterations", "bleu_max_n"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.advantage_estimator == "group" and self.num_generations < 2:
            raise ValueError(f"num_generations must be >= 2 with advantage_estimator='group' (advantages are "
                             f"relative within a group), got {self.num_generations}")
        if not self.curriculum or any(not isinstance(k, int) or k < 2 for k in self.curriculum):
            raise ValueError(f"curriculum must be a non-empty list of episode lengths >= 2 (a turn to remember, one "
                             f"to ask), got {self.curriculum!r}")
        if self.max_prompt_length < 3:
            raise ValueError(f"max_prompt_length must be >= 3 ([Q], a token, [A]), got {self.max_prompt_length}")
        if self.curriculum_steps is not None:
            if len(self.curriculum_steps) != len(self.curriculum) or any(s < 1 for s in self.curriculum_steps):
                raise ValueError(f"curriculum_steps must give a positive step count for each of the "
                                 f"{len(self.curriculum)} curriculum stages, got {self.curriculum_steps!r}")
            if self.max_steps is None or self.max_steps <= 0:
                self.max_steps = sum(self.curriculum_steps)
            elif self.max_steps != sum(self.curriculum_steps):
                warnings.warn(f"max_steps={self.max_steps} but curriculum_steps add up to {sum(self.curriculum_steps)}:"
                              " training stops " + ("before the last stages" if self.max_steps < sum(
                                  self.curriculum_steps) else "in the last stage, which runs on"), stacklevel=2)
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_funcs):
            raise ValueError(f"reward_weights has {len(self.reward_weights)} values for {len(self.reward_funcs)} "
                             "reward_funcs")
        for name in ("temperature", "epsilon"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.vf_learning_rate is not None and not self.vf_learning_rate > 0:
            raise ValueError(f"vf_learning_rate must be > 0 or None, got {self.vf_learning_rate}")
        for name in ("beta", "memory_drift_coef", "vf_coef"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not (0 < self.top_p <= 1) or self.top_k < 0:
            raise ValueError(f"need 0 < top_p <= 1 and top_k >= 0, got top_p={self.top_p}, top_k={self.top_k}")
        super().__post_init__()

    def resolved_reward_weights(self) -> list[float]:
        """The weights to use for `reward_funcs` (see the field's help)."""
        if self.reward_weights is not None:
            return [float(w) for w in self.reward_weights]
        if list(self.reward_funcs) == DEFAULT_REWARD_FUNCS:
            return list(DEFAULT_REWARD_WEIGHTS)
        return [1.0] * len(self.reward_funcs)
