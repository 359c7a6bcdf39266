"""`RxTPretrainTrainer`: stage 1 of the Reactive Transformer curriculum, joint LM pre-training.

Each batch of text trains the encoder and the decoder together, in one forward of `RxTForPreTraining`:

    encoder_input_ids = text with mlm_probability of its real tokens masked (80% [MASK], 10% random, 10% kept)
    encoded = encoder(encoder_input_ids)                     -> masked-LM loss on the masked tokens
    logits  = decoder(text, memory = detach(encoded) + noise) -> next-token loss on every real token
    loss    = lm_weight * AR + mlm_weight * MLM (+ router_aux_loss_coef * load balancing, MoE decoder)

The decoder's memory cross-attention thereby learns to read the encoder's vector space (the memory attention later
writes into that space), while the detach keeps the encoder's training its MLM alone and the noise keeps the decoder
from copying the next token out of the states. Pads are never targets of either loss (nor are the special tokens
masked for the MLM); labels given by the dataset (-100 where not scored) are respected, which `RxTSFTTrainer` uses.

    trainer = RxTPretrainTrainer(model=RxTForPreTraining(config), args=RxTPretrainConfig(...),
                                 train_dataset=packed_or_text_dataset, processing_class=tokenizer)
    trainer.train()

The tokenizer needs a mask token (`add_mask_token(tokenizer)` adds `[MASK]`; resize the model's embeddings to
`len(tokenizer)` when it grew). The dataset has `input_ids` (e.g. `rat_hf.data.pack_for_causal_lm`, optional
`labels`) or a `text` column, which is tokenized with an EOS after every document and cut at `max_length`.
"""

import torch
from transformers import DataCollatorForLanguageModeling

from ._rxt_common import RxTStageTrainer, pad_rows
from .rxt_pretrain_config import RxTPretrainConfig

MASK_TOKEN = "[MASK]"


def add_mask_token(tokenizer) -> int:
    """Give `tokenizer` a mask token (`[MASK]`) when it has none; returns its id (resize the model if it is new)."""
    if tokenizer.mask_token is None:
        tokenizer.add_special_tokens({"mask_token": MASK_TOKEN})
    return tokenizer.mask_token_id


class RxTJointCollator:
    """Features with `input_ids` (and optional `labels`) -> the decoder's and the masked encoder's inputs.

    Returns `input_ids`, `attention_mask`, `labels` (pads -100) for the decoder and `encoder_input_ids`,
    `encoder_attention_mask`, `mlm_labels` (-100 except at the masked tokens) for the encoder, all `[B, T]`,
    right-padded. Masking is transformers' `DataCollatorForLanguageModeling.torch_mask_tokens` over the real,
    non-special tokens; its random numbers come from torch's global generator, which `Trainer` seeds.
    """

    def __init__(self, tokenizer, mlm_probability: float = 0.15):
        if tokenizer.mask_token is None:
            raise ValueError("RxTJointCollator: the tokenizer has no mask token for the encoder's masked-LM loss; add "
                             "one with rat_hf.trainers.rxt_pretrain_trainer.add_mask_token(tokenizer) and resize the "
                             "model's embeddings to len(tokenizer)")
        if tokenizer.pad_token_id is None:
            raise ValueError("RxTJointCollator: the tokenizer has no pad token")
        self.pad_token_id = tokenizer.pad_token_id
        self.special_ids = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
        self.masker = DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=mlm_probability)

    def __call__(self, features: list) -> dict:
        ids = [list(f["input_ids"]) for f in features]
        input_ids = pad_rows(ids, self.pad_token_id)  # [B, T]
        attention_mask = pad_rows([[1] * len(x) for x in ids], 0, input_ids.shape[1])
        labels = pad_rows([list(f["labels"]) if f.get("labels") is not None else x for f, x in zip(features, ids)],
                          -100, input_ids.shape[1])
        labels[attention_mask == 0] = -100  # pads are never targets, whatever the pad id is
        not_maskable = torch.isin(input_ids, self.special_ids) | (attention_mask == 0)
        encoder_input_ids, mlm_labels = self.masker.torch_mask_tokens(input_ids.clone(), special_tokens_mask=not_maskable)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                "encoder_input_ids": encoder_input_ids, "encoder_attention_mask": attention_mask.clone(),
                "mlm_labels": mlm_labels}


class RxTPretrainTrainer(RxTStageTrainer):
    """Joint LM pre-training of an `RxTForPreTraining` (see the module docstring); `args`: `RxTPretrainConfig`."""

    stage_name = "joint LM pre-training"
    config_class = RxTPretrainConfig

    def __init__(self, model=None, args=None, train_dataset=None, eval_dataset=None, processing_class=None,
                 data_collator=None, **kwargs):
        if not isinstance(args, self.config_class):
            raise ValueError(f"{type(self).__name__}: args must be a {self.config_class.__name__}, got "
                             f"{type(args).__name__}")
        if processing_class is None:
            raise ValueError(f"{type(self).__name__}: pass the tokenizer as processing_class=")
        train_dataset = self.prepare_dataset(train_dataset, processing_class, args, "train_dataset")
        eval_dataset = self.prepare_dataset(eval_dataset, processing_class, args, "eval_dataset")
        if data_collator is None:
            data_collator = RxTJointCollator(processing_class, args.mlm_probability)
        super().__init__(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processing_class, data_collator=data_collator, **kwargs)

    def prepare_dataset(self, dataset, tokenizer, args, what: str):
        """A dataset with `input_ids` as is; a text dataset tokenized (EOS after each document, cut at max_length)."""
        if dataset is None or "input_ids" in dataset.column_names:
            return dataset
        if args.text_column not in dataset.column_names:
            raise ValueError(f"{type(self).__name__}: {what} has neither input_ids nor the text column "
                             f"{args.text_column!r} (columns: {dataset.column_names})")
        eos, limit = tokenizer.eos_token_id, args.max_length

        def tokenize(batch):
            texts = [t for t in batch[args.text_column] if isinstance(t, str) and t.strip()]
            ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
            return {"input_ids": [(x + [eos])[:limit] for x in ids]}

        return dataset.map(tokenize, batched=True, remove_columns=dataset.column_names, desc="tokenize")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs, memory_from_encoder=True, use_cache=False,
                        memory_noise_std=self.args.memory_noise_std if model.training else 0.0)
        loss = self.args.lm_weight * outputs.lm_loss + self.args.mlm_weight * outputs.mlm_loss
        config = self.accelerator.unwrap_model(model).config
        if outputs.aux_loss is not None:
            loss = loss + config.router_aux_loss_coef * outputs.aux_loss
        if model.training:
            self.record(lm_loss=outputs.lm_loss, mlm_loss=outputs.mlm_loss, aux_loss=outputs.aux_loss)
        return (loss, outputs) if return_outputs else loss


__all__ = ["MASK_TOKEN", "RxTJointCollator", "RxTPretrainTrainer", "add_mask_token"]
