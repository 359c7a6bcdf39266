"""Attention-guided RL self-curriculum: the model orders the key/value pairs of its own training context.

`AttentionProbe` reads the query/key vectors of a causal LM's last self-attention layer (any layout it knows: RAT,
Llama-style GQA, GPT-2 fused `c_attn`, RxT's decoder), `policy` turns them into choices over the remaining pairs and
scores finished orders, `AttentionGuidedTrainer` trains a LoRA adapter with group-relative REINFORCE + exact KL, and
`pools` holds the data (define-before-recall, article key/value pairs, Twenty Questions).
"""

from .config import AttentionGuidedConfig
from .pools import DefineRecallPools, KVPairPools, TwentyQuestionsPools, collate, random_orders
from .probe import AttentionProbe
from .trainer import AttentionGuidedTrainer, plot_history

__all__ = [
    "AttentionGuidedConfig",
    "AttentionGuidedTrainer",
    "AttentionProbe",
    "DefineRecallPools",
    "KVPairPools",
    "TwentyQuestionsPools",
    "collate",
    "plot_history",
    "random_orders",
]
