"""Trainers: `RatTrainer` (a `transformers.Trainer` that logs RAT's gating), `PPOTrainer` (PPO with a learned value
function and TRL's reward-function API, since TRL 1.13 removed its own), `RatSFTTrainer` / `RatDPOTrainer` /
`RatGRPOTrainer` (TRL's trainers that also train a reinforce-mode RAT's sampled gates; loaded on first use, so this
package imports without TRL) and helpers."""

from .ppo_config import PPOConfig
from .ppo_trainer import PolicyAndValueModel, PPOTrainer
from .rat_trainer import RatTrainer, check_checkpoint
from .reinforced_gating import collect_gate_samples, gate_reinforce_loss, linearized_token_losses

_TRL_TRAINERS = ("RatSFTTrainer", "RatDPOTrainer", "RatGRPOTrainer")


def __getattr__(name: str):
    if name in _TRL_TRAINERS:
        from . import reinforced_gating

        return getattr(reinforced_gating, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["PPOConfig", "PPOTrainer", "PolicyAndValueModel", "RatTrainer", "check_checkpoint", "collect_gate_samples",
           "gate_reinforce_loss", "linearized_token_losses", *_TRL_TRAINERS]
