"""The Reactive Transformer: configuration and modeling (shippable as Hub remote code)."""

from transformers import AutoModelForMaskedLM, AutoModelForPreTraining

from .configuration_rxt import RxTConfig
from .modeling_rxt import RxTForCausalLM, RxTForMaskedLM, RxTForPreTraining, RxTModel, RxTPreTrainedModel


def _register_training_classes() -> None:
    """The encoder's masked-LM class and the curriculum's training class, for the Auto classes and remote code
    (`rat_hf._register` registers the config, `RxTModel` and `RxTForCausalLM`)."""
    AutoModelForMaskedLM.register(RxTConfig, RxTForMaskedLM, exist_ok=True)
    AutoModelForPreTraining.register(RxTConfig, RxTForPreTraining, exist_ok=True)
    RxTForMaskedLM.register_for_auto_class("AutoModelForMaskedLM")
    RxTForPreTraining.register_for_auto_class("AutoModelForPreTraining")


_register_training_classes()

__all__ = ["RxTConfig", "RxTForCausalLM", "RxTForMaskedLM", "RxTForPreTraining", "RxTModel", "RxTPreTrainedModel"]
