"""`RxTPretrainConfig`: the arguments of stage 1 of the Reactive Transformer curriculum, joint LM pre-training."""

import math
from dataclasses import dataclass, field

from transformers import TrainingArguments


def check_number(config, name: str, low: float = 0.0, high: float | None = None, low_open: bool = False,
                 high_open: bool = False) -> None:
    """ValueError naming `type(config).name` unless the field is a finite number in the given range."""
    value = getattr(config, name)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low)
    if high is not None:
        ok = ok and (value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {'inf' if high is None else high}{')' if high_open or high is None else ']'}"
        raise ValueError(f"{type(config).__name__}.{name}={value!r} is invalid: must be a number in {interval}")


@dataclass
class RxTPretrainConfig(TrainingArguments):
    r"""
    `TrainingArguments` plus the coefficients of joint LM pre-training (`RxTPretrainTrainer`).

    The loss is `lm_weight * AR + mlm_weight * MLM (+ router_aux_loss_coef * MoE load balancing)`: the decoder's
    next-token loss, its memory cross-attention reading the encoder's detached layer states of the same text with
    Gaussian noise of `memory_noise_std` times each state's RMS, and the encoder's masked-LM loss on
    `mlm_probability` of the (non-special, non-pad) tokens, BERT-style (80% `[MASK]`, 10% a random token, 10% kept).
    """

    lm_weight: float = field(default=1.0, metadata={"help": "alpha: weight of the decoder's autoregressive loss"})
    mlm_weight: float = field(default=1.0, metadata={"help": "beta: weight of the encoder's masked-LM loss"})
    mlm_probability: float = field(default=0.15, metadata={"help": "share of the real tokens the encoder must restore"})
    memory_noise_std: float = field(
        default=0.15, metadata={"help": "noise on the encoder states the decoder reads, relative to their RMS: keeps "
                                        "the decoder from copying them outright (RxLM's default level)"})
    max_length: int = field(default=256, metadata={"help": "tokens per sequence when the dataset has a text column"})
    text_column: str = field(default="text", metadata={"help": "the text column of an untokenized dataset"})
    trained_parts: list[str] = field(
        default_factory=lambda: ["embeddings", "encoder", "decoder", "mlm_head"],
        metadata={"help": "parts of the RxT that train (the memory attention does not run in this stage)"})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "keep the dataset's columns: the trainer tokenizes and collates them itself"})

    def __post_init__(self):
        super().__post_init__()
        for name in ("lm_weight", "mlm_weight", "memory_noise_std"):
            check_number(self, name)
        if self.lm_weight == 0 and self.mlm_weight == 0:
            raise ValueError(f"{type(self).__name__}: lm_weight and mlm_weight are both 0: nothing would train")
        check_number(self, "mlm_probability", 0.0, 1.0, low_open=True, high_open=True)
        if not (isinstance(self.max_length, int) and self.max_length >= 2):
            raise ValueError(f"{type(self).__name__}.max_length={self.max_length!r} is invalid: must be an int >= 2")


__all__ = ["RxTPretrainConfig"]
