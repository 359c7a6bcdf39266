"""The RAT causal language model: configuration and modeling (shippable as Hub remote code)."""

from .configuration_rat import PRESETS, RatConfig
from .modeling_rat import RatForCausalLM, RatForSequenceClassification, RatModel, RatPreTrainedModel

__all__ = ["PRESETS", "RatConfig", "RatForCausalLM", "RatForSequenceClassification", "RatModel", "RatPreTrainedModel"]
