"""rat_hf: RAT and Reactive Transformer models that behave like any `transformers` model.

`import rat_hf` registers every model with the Auto classes, so `AutoModelForCausalLM.from_pretrained` finds them.
Heavy optional dependencies (trl, datasets) are imported only by the modules that need them.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

from .models.rat import PRESETS, RatConfig, RatForCausalLM, RatForSequenceClassification, RatModel, RatPreTrainedModel
from .models.rxt import RxTConfig, RxTForCausalLM, RxTForMaskedLM, RxTForPreTraining, RxTModel, RxTPreTrainedModel
from ._peft import register_peft_defaults
from .reactive import ReactiveSession

__version__ = "0.1.0"


def _register() -> None:
    AutoConfig.register("rat", RatConfig, exist_ok=True)
    AutoModel.register(RatConfig, RatModel, exist_ok=True)
    AutoModelForCausalLM.register(RatConfig, RatForCausalLM, exist_ok=True)
    AutoModelForSequenceClassification.register(RatConfig, RatForSequenceClassification, exist_ok=True)
    # `save_pretrained` writes `auto_map` and copies the modeling files, so the Hub copy loads with trust_remote_code.
    RatConfig.register_for_auto_class()
    RatModel.register_for_auto_class("AutoModel")
    RatForCausalLM.register_for_auto_class("AutoModelForCausalLM")
    RatForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")
    AutoConfig.register("rxt", RxTConfig, exist_ok=True)
    AutoModel.register(RxTConfig, RxTModel, exist_ok=True)
    AutoModelForCausalLM.register(RxTConfig, RxTForCausalLM, exist_ok=True)
    RxTConfig.register_for_auto_class()
    RxTModel.register_for_auto_class("AutoModel")
    RxTForCausalLM.register_for_auto_class("AutoModelForCausalLM")
    register_peft_defaults()


_register()

__all__ = [
    "PRESETS",
    "RatConfig",
    "RatForCausalLM",
    "RatForSequenceClassification",
    "RatModel",
    "RatPreTrainedModel",
    "ReactiveSession",
    "RxTConfig",
    "RxTForCausalLM",
    "RxTForMaskedLM",
    "RxTForPreTraining",
    "RxTModel",
    "RxTPreTrainedModel",
]
