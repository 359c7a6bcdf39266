"""`RxTSFTConfig`: the arguments of stage 2 of the Reactive Transformer curriculum, interaction SFT."""

from dataclasses import dataclass, field

from .rxt_pretrain_config import RxTPretrainConfig


@dataclass
class RxTSFTConfig(RxTPretrainConfig):
    r"""
    `RxTPretrainConfig` for interactions: the decoder's loss covers the answer and its EOS only (`lm_weight`), the
    encoder's masked-LM loss the whole interaction (`mlm_weight`), the decoder's memory being the encoder's
    noised states of the same interaction as in stage 1. `max_length` truncates `[Q] query [A] answer EOS` from the
    right; an interaction whose answer is cut away entirely is dropped (with a warning).
    """

    max_length: int = field(default=256, metadata={"help": "tokens per interaction ([Q] query [A] answer EOS)"})


__all__ = ["RxTSFTConfig"]
