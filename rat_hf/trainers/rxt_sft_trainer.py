"""`RxTSFTTrainer`: stage 2 of the Reactive Transformer curriculum, interaction supervised fine-tuning.

The joint step of stage 1 (`RxTPretrainTrainer`) on single interactions in the reactive format:

    decoder:  [Q] query [A] answer EOS     labels on `answer EOS` only (the EOS is what ends a reply: it is trained)
    encoder:  the same interaction with mlm_probability of its real tokens masked, masked-LM loss
    memory:   the decoder's cross-attention reads the encoder's detached, noised states of the interaction

Conversations are split into their interactions (each becomes one example: the memory across turns is the business
of the memory-aware stage). Pads are never targets. The dataset holds `{"query", "answer"}` records (with optional
`interactions`, as `rat_hf.data.interactions` writes them), chat `{"messages": [...]}` records (as
`default_dialogs()` returns them), or rows already tokenized with `input_ids` and `labels`.
"""

import logging

from ._rxt_common import record_turns
from .rxt_pretrain_trainer import RxTPretrainTrainer
from .rxt_sft_config import RxTSFTConfig

logger = logging.getLogger("rat_hf.trainers")


class RxTSFTTrainer(RxTPretrainTrainer):
    """Interaction SFT of an `RxTForPreTraining` (see the module docstring); `args`: `RxTSFTConfig`."""

    stage_name = "interaction SFT"
    config_class = RxTSFTConfig

    def prepare_dataset(self, dataset, tokenizer, args, what: str):
        """Conversation records -> one tokenized interaction per row (`tokenize_interaction`: labels on answer+EOS)."""
        if dataset is None:
            return None
        if "input_ids" in dataset.column_names:
            if "labels" not in dataset.column_names:
                raise ValueError(f"{type(self).__name__}: {what} has input_ids but no labels; SFT needs labels "
                                 "(-100 on the query) or conversation records to tokenize")
            return dataset
        from ..data.interactions import tokenize_interaction

        def tokenize(batch, indices):
            rows = {"input_ids": [], "labels": []}
            records = [dict(zip(batch, values)) for values in zip(*batch.values())]
            for index, record in zip(indices, records):
                for query, answer in record_turns(record, f"{what}[{index}]"):
                    row = tokenize_interaction(tokenizer, query, answer, max_length=args.max_length)
                    rows["input_ids"].append(row["input_ids"])
                    rows["labels"].append(row["labels"])
            return rows

        tokenized = dataset.map(tokenize, batched=True, with_indices=True, remove_columns=dataset.column_names,
                                desc="tokenize interactions")
        kept = tokenized.filter(lambda r: any(label != -100 for label in r["labels"]), desc="drop answerless rows")
        if len(kept) < len(tokenized):
            logger.warning("%s: %d of %d interactions lost their whole answer to max_length=%d and were dropped",
                           what, len(tokenized) - len(kept), len(tokenized), args.max_length)
        if len(kept) == 0:
            raise ValueError(f"{type(self).__name__}: {what} has no interaction with an answer token within "
                             f"max_length={args.max_length}")
        return kept


__all__ = ["RxTSFTTrainer"]
