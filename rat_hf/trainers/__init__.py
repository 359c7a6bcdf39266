"""Trainers: `RatTrainer` (a `transformers.Trainer` that logs RAT's gating) and helpers."""

from .rat_trainer import RatTrainer, check_checkpoint

__all__ = ["RatTrainer", "check_checkpoint"]
