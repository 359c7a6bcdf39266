"""Trainers: `RatTrainer` (a `transformers.Trainer` that logs RAT's gating), `PPOTrainer` (PPO with a learned value
function and TRL's reward-function API, since TRL 1.13 removed its own), `RatSFTTrainer` / `RatDPOTrainer` /
`RatGRPOTrainer` (TRL's trainers that also train a reinforce-mode RAT's sampled gates; loaded on first use, so this
package imports without TRL), the Reactive Transformer curriculum's stage trainers and configs (loaded on first use)
and helpers.

The RxT curriculum, one config/trainer pair per stage (`rat_hf.trainers.rxt_<stage>_{config,trainer}`):

    1 joint LM pre-training            RxTPretrainConfig / RxTPretrainTrainer (RxTJointCollator, add_mask_token)
    2 interaction SFT                  RxTSFTConfig / RxTSFTTrainer
    3 memory-attention pre-training    RxTMemAttnConfig / RxTMemAttnTrainer (memory_targets)
    4 supervised memory-aware training RxTSMATConfig / RxTSMATTrainer (recall_accuracy, recall_answers)
    5 memory reinforcement learning    RxTMRLConfig / RxTMRLTrainer (group-relative or PPO with a critic)
"""

import importlib

from .ppo_config import PPOConfig
from .ppo_trainer import PolicyAndValueModel, PPOTrainer
from .rat_trainer import RatTrainer, check_checkpoint
from .reinforced_gating import collect_gate_samples, gate_reinforce_loss, linearized_token_losses

_TRL_TRAINERS = ("RatSFTTrainer", "RatDPOTrainer", "RatGRPOTrainer")
# name -> submodule that defines it; imported on first attribute access
_RXT = {
    "RxTPretrainConfig": "rxt_pretrain_config",
    "RxTPretrainTrainer": "rxt_pretrain_trainer",
    "RxTJointCollator": "rxt_pretrain_trainer",
    "add_mask_token": "rxt_pretrain_trainer",
    "RxTSFTConfig": "rxt_sft_config",
    "RxTSFTTrainer": "rxt_sft_trainer",
    "RxTMemAttnConfig": "rxt_memattn_config",
    "RxTMemAttnTrainer": "rxt_memattn_trainer",
    "memory_targets": "rxt_memattn_trainer",
    "RxTSMATConfig": "rxt_smat_config",
    "RxTSMATTrainer": "rxt_smat_trainer",
    "recall_accuracy": "rxt_smat_trainer",
    "recall_answers": "rxt_smat_trainer",
    "RxTMRLConfig": "rxt_mrl_config",
    "RxTMRLTrainer": "rxt_mrl_trainer",
}


def __getattr__(name: str):
    if name in _TRL_TRAINERS:
        from . import reinforced_gating

        return getattr(reinforced_gating, name)
    if name in _RXT:
        return getattr(importlib.import_module(f".{_RXT[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["PPOConfig", "PPOTrainer", "PolicyAndValueModel", "RatTrainer", "check_checkpoint", "collect_gate_samples",
           "gate_reinforce_loss", "linearized_token_losses", *_TRL_TRAINERS, *_RXT]
