"""`RxTMemAttnConfig`: the arguments of stage 3 of the Reactive Transformer curriculum, self-supervised
memory-attention pre-training."""

from dataclasses import dataclass, field

from transformers import TrainingArguments

from .rxt_pretrain_config import check_number

TARGET_POOLINGS = ("attention", "mean")


@dataclass
class RxTMemAttnConfig(TrainingArguments):
    r"""
    `TrainingArguments` plus the pseudo-label schedule of `RxTMemAttnTrainer`.

    Step k of an episode (the k-th interaction read into the memory) is trained towards
    `w_k * pooled(encoded interaction) + (1 - w_k) * old memory` (both RMS-normalised), with the new-data weight
    `w_1 = new_data_weight_first`, then `w_k = max(new_data_weight_min, new_data_weight_start -
    (k - 2) * new_data_weight_decay)`.
    """

    new_data_weight_first: float = field(
        default=0.9, metadata={"help": "weight of the encoded interaction in the target of the first update"})
    new_data_weight_start: float = field(
        default=0.5, metadata={"help": "its weight at the second update, decaying by new_data_weight_decay per step"})
    new_data_weight_decay: float = field(default=0.05, metadata={"help": "decrease of the new-data weight per step"})
    new_data_weight_min: float = field(default=0.05, metadata={"help": "floor of the new-data weight"})
    target_pooling: str = field(
        default="attention", metadata={"help": f"how a slot's target reads the encoded interaction: one of "
                                                f"{', '.join(TARGET_POOLINGS)} (see RxTMemAttnTrainer)"})
    memory_noise_std: float = field(
        default=0.0, metadata={"help": "Gaussian noise on the memory before each update, relative to its RMS"})
    detach_memory: bool = field(
        default=True, metadata={"help": "each update trains against its own target, from a detached memory (False: "
                                        "backpropagate through the whole episode)"})
    max_turns: int = field(default=8, metadata={"help": "interactions per episode (longer conversations are cut)"})
    max_length: int = field(default=128, metadata={"help": "tokens per interaction ([Q] query [A] answer EOS)"})
    trained_parts: list[str] = field(
        default_factory=lambda: ["memory_attention"],
        metadata={"help": "parts that train: the memory attention (adding the encoder lets it drift towards "
                          "whatever makes the targets easy)"})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "keep the dataset's columns: the trainer tokenizes and collates them itself"})

    def __post_init__(self):
        super().__post_init__()
        for name in ("new_data_weight_first", "new_data_weight_start", "new_data_weight_min"):
            check_number(self, name, 0.0, 1.0)
        check_number(self, "new_data_weight_decay", 0.0, 1.0)
        check_number(self, "memory_noise_std")
        if self.target_pooling not in TARGET_POOLINGS:
            raise ValueError(f"{type(self).__name__}.target_pooling={self.target_pooling!r} is invalid: choose one of "
                             f"{', '.join(TARGET_POOLINGS)}")
        for name, low in (("max_turns", 1), ("max_length", 2)):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= low):
                raise ValueError(f"{type(self).__name__}.{name}={value!r} is invalid: must be an int >= {low}")

    def new_data_weight(self, step: int) -> float:
        """The new-data weight of update `step` (1 = the first interaction of an episode)."""
        if step <= 1:
            return self.new_data_weight_first
        return max(self.new_data_weight_min, self.new_data_weight_start - (step - 2) * self.new_data_weight_decay)


__all__ = ["RxTMemAttnConfig", "TARGET_POOLINGS"]
