"""`RxTSMATConfig`: the settings of supervised memory-aware training (SMAT, stage 4 of the RxT curriculum).

A `transformers.TrainingArguments` subclass (everything about optimisation, logging, saving, precision and devices is
`Trainer`'s), plus what a memory-aware stage needs: how many turns an episode holds, how far a loss gradient travels
back through memory updates (truncated backpropagation through time), and which parts of the model train from which
step (gradual unfreezing). `RxTEpisodeArguments` holds the fields SMAT and MRL (`rxt_mrl_config.py`) share.
"""

import json
import math
from dataclasses import dataclass, field

from transformers import TrainingArguments

# The parts of an RxT that gradual unfreezing switches on and off (`component_of` in rxt_smat_trainer.py maps every
# parameter to exactly one of them). The names of `rat_hf.trainers._rxt_common.RXT_PARTS`, with the decoder's memory
# cross-attention (and its norms) as a part of its own: the part that reads the memory, often trained first.
COMPONENTS = ("embeddings", "decoder", "cross_attention", "encoder", "memory_attention", "memory_init", "mlm_head")
UNFREEZE_UNITS = ("step", "epoch")


@dataclass
class RxTEpisodeArguments(TrainingArguments):
    """Fields shared by the memory-aware RxT stages (SMAT, MRL)."""

    max_turns: int = field(
        default=8, metadata={"help": "turns of an episode used per example (a longer conversation is cut)"})
    max_length: int = field(
        default=256, metadata={"help": "tokens of one interaction `[Q] query [A] answer [EOS]` (cut on the right)"})
    bptt_turns: int | None = field(
        default=None,
        metadata={"help": "memory updates a loss gradient may travel back through: the memory is detached every "
                          "`bptt_turns` updates (truncated BPTT in chunks; a turn's loss reaches between 1 and "
                          "`bptt_turns` updates). None: through the whole episode. Must be >= 1: with 0 the encoder "
                          "and memory attention would never train, i.e. stateless training"})
    unfreeze_schedule: dict | str | None = field(
        default=None,
        metadata={"help": "gradual unfreezing, JSON {component: first step (or epoch, see unfreeze_unit) it trains}; "
                          "null: frozen throughout; a component left out trains from the start. Components: "
                          + ", ".join(COMPONENTS) + " (embeddings: also the LM head when tied). E.g. "
                          "'{\"decoder\": 200, \"embeddings\": null}' trains the memory parts first and the decoder "
                          "from step 200"})
    unfreeze_unit: str = field(default="step", metadata={"help": "unit of unfreeze_schedule: step or epoch"})
    max_train_seconds: float | None = field(
        default=None,
        metadata={"help": "stop training after the optimizer step that crosses this many seconds of training (then "
                          "save and evaluate as usual; the step count reached is in trainer_state.json). For a run "
                          "that must fit a time slot; None: max_steps / num_train_epochs alone"})
    # Trainer's defaults that do not fit episode data: the collators read columns `Trainer` does not know.
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "keep False: the episode collators read the dataset's own columns"})

    def __post_init__(self):
        for name in ("max_turns", "max_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.bptt_turns is not None and (not isinstance(self.bptt_turns, int) or self.bptt_turns < 1):
            raise ValueError(f"bptt_turns must be a positive integer or None, got {self.bptt_turns!r} (0 would train "
                             "the decoder alone: a memory-aware stage must not fall back to stateless training)")
        if self.max_train_seconds is not None and not (isinstance(self.max_train_seconds, (int, float))
                                                       and self.max_train_seconds > 0):
            raise ValueError(f"max_train_seconds must be a positive number or None, got {self.max_train_seconds!r}")
        if self.unfreeze_unit not in UNFREEZE_UNITS:
            raise ValueError(f"unfreeze_unit must be one of {UNFREEZE_UNITS}, got {self.unfreeze_unit!r}")
        self.unfreeze_schedule = parse_unfreeze_schedule(self.unfreeze_schedule)
        if self.remove_unused_columns:
            raise ValueError("remove_unused_columns must be False: the episode collators read the dataset's columns")
        super().__post_init__()


def parse_unfreeze_schedule(value) -> dict:
    """`{component: start or None}` from a dict or its JSON text; a one-line ValueError names what is wrong."""
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"unfreeze_schedule is not valid JSON ({e.msg}): {value!r}") from None
    if not isinstance(value, dict):
        raise ValueError(f"unfreeze_schedule must be a mapping component -> start, got {type(value).__name__}")
    for key, start in value.items():
        if key not in COMPONENTS:
            raise ValueError(f"unfreeze_schedule: unknown component {key!r}; known: {', '.join(COMPONENTS)}")
        if start is not None and (isinstance(start, bool) or not isinstance(start, (int, float))
                                  or not math.isfinite(start) or start < 0):
            raise ValueError(f"unfreeze_schedule[{key!r}] must be a number >= 0 or null (never), got {start!r}")
    return dict(value)


@dataclass
class RxTSMATConfig(RxTEpisodeArguments):
    """Supervised memory-aware training: each turn is answered from the memory of the turns before it.

    For an episode of turns 0..K-1, turn k's decoder reads the memory after turns 0..k-1 were encoded and written
    (turn 0 reads the initial memory), and the loss is the answer's and EOS's cross-entropy (the query and padding are
    never targets), averaged over every target token of the batch.
    """

    train_first_turn: bool = field(
        default=True, metadata={"help": "also train turn 0, which reads the initial memory (no history yet)"})
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW learning rate"})
