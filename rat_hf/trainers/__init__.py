"""Trainers: `RatTrainer` (a `transformers.Trainer` that logs RAT's gating), `PPOTrainer` (PPO with a learned value
function and TRL's reward-function API, since TRL 1.13 removed its own) and helpers."""

from .ppo_config import PPOConfig
from .ppo_trainer import PolicyAndValueModel, PPOTrainer
from .rat_trainer import RatTrainer, check_checkpoint

__all__ = ["PPOConfig", "PPOTrainer", "PolicyAndValueModel", "RatTrainer", "check_checkpoint"]
