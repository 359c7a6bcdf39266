"""The Reactive Transformer: configuration and modeling (shippable as Hub remote code)."""

from .configuration_rxt import RxTConfig
from .modeling_rxt import RxTForCausalLM, RxTModel, RxTPreTrainedModel

__all__ = ["RxTConfig", "RxTForCausalLM", "RxTModel", "RxTPreTrainedModel"]
