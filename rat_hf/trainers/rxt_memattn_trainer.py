"""`RxTMemAttnTrainer`: stage 3 of the Reactive Transformer curriculum, self-supervised memory-attention
pre-training.

The memory attention has no labels of its own (nobody knows what a good memory looks like), so it is warmed up
against pseudo-labels before the memory-aware stages: reading the interactions of a conversation one after the other
into the memory (`memory_k = memory_attention(memory_{k-1}, encoder(interaction_k))`, one forward of
`RxTForPreTraining` per interaction), each new memory is pulled towards

    target_k = w_k * rms(pooled_k) + (1 - w_k) * rms(memory_{k-1}),    loss = -cos(memory_k, target_k)

per layer and slot, averaged over the slots, layers, conversations that have an interaction k, and steps. The
new-data weight is 0.9 for the first interaction and then decays (`RxTMemAttnConfig.new_data_weight`): a fresh memory
should mostly become the first interaction, a full one should mostly stay what it was.

**The per-slot target for any slot count.** RxLM mixed the encoded interaction `[T, D]` into the memory `[S, D]`
element-wise, which only has a meaning when T == S (and then pairs token t with slot t for no reason). Here each
slot reads the interaction the way memory attention does, without parameters: with its old value as the query and
the interaction's RMS-normalised token states (of the encoder layer that this memory layer is written from) as keys
and values, `pooled = softmax(rms(old) . rms(tokens)^T / sqrt(D)) @ rms(tokens)`, padding masked (`target_pooling=
"attention"`, the default; `"mean"` gives every slot the masked mean of the tokens instead). So S and T are
independent, slots holding different content pull different parts of the interaction (a mean would make every slot
the same), and padding never leaks into a target. Both terms are RMS-normalised before mixing so that the weight
means what it says whatever the scales of the encoder states and of the memory; the target is a constant (no
gradient), and by default the encoder is frozen and the memory is detached between updates.
"""

import math

import torch
import torch.nn.functional as F

from ._rxt_common import EpisodeCollator, RxTStageTrainer, tokenize_episodes
from .rxt_memattn_config import RxTMemAttnConfig


def _rms_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


@torch.no_grad()
def memory_targets(old: torch.Tensor, token_states: torch.Tensor, token_mask: torch.Tensor, weight: float,
                   pooling: str = "attention") -> torch.Tensor:
    """Pseudo-labels `[B, L, S, D]` (float32) for the memory after reading an interaction.

    old: the memory before the update `[B, L, S, D]`; token_states: per memory layer, the encoder states it is written
    from `[B, L, T, D]`; token_mask: `[B, T]` (True: a real token; a row needs at least one); weight: the new-data
    weight w. See the module docstring.
    """
    old_n, tokens = _rms_normalize(old.float()), _rms_normalize(token_states.float())
    mask = token_mask.bool()[:, None, None, :]  # [B, 1, 1, T]
    if pooling == "mean":
        weights = mask.float() / mask.float().sum(-1, keepdim=True).clamp(min=1)  # [B, 1, 1, T]
        pooled = (weights @ tokens).expand_as(old_n)  # [B, L, S, D]
    elif pooling == "attention":
        scores = old_n @ tokens.transpose(-1, -2) / math.sqrt(old.shape[-1])  # [B, L, S, T]
        pooled = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ tokens  # [B, L, S, D]
    else:
        raise ValueError(f"memory_targets: pooling={pooling!r} is invalid: choose 'attention' or 'mean'")
    return weight * _rms_normalize(pooled) + (1 - weight) * old_n


class RxTMemAttnTrainer(RxTStageTrainer):
    """Self-supervised memory-attention pre-training of an `RxTForPreTraining`; `args`: `RxTMemAttnConfig`.

    `train_dataset`: conversations (`{"query", "answer", "interactions"}` or chat `{"messages"}` records, see
    `record_turns`), or rows with `turn_input_ids`; each row is one episode of up to `max_turns` interactions.
    """

    stage_name = "memory-attention pre-training"

    def __init__(self, model=None, args=None, train_dataset=None, eval_dataset=None, processing_class=None,
                 data_collator=None, **kwargs):
        if not isinstance(args, RxTMemAttnConfig):
            raise ValueError(f"{type(self).__name__}: args must be an RxTMemAttnConfig, got {type(args).__name__}")
        if processing_class is None:
            raise ValueError(f"{type(self).__name__}: pass the tokenizer as processing_class=")
        train_dataset = tokenize_episodes(train_dataset, processing_class, args.max_turns, args.max_length,
                                          "train_dataset")
        eval_dataset = tokenize_episodes(eval_dataset, processing_class, args.max_turns, args.max_length,
                                         "eval_dataset")
        super().__init__(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processing_class,
                         data_collator=data_collator or EpisodeCollator(processing_class.pad_token_id), **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ids, mask = inputs["turn_input_ids"], inputs["turn_attention_mask"]  # [B, N, T]
        args = self.args
        memory = self.accelerator.unwrap_model(model).init_memory(ids.shape[0], device=ids.device)
        losses, cosines = [], []
        for step in range(ids.shape[1]):
            has_turn = mask[:, step].any(-1)  # [B]
            if not bool(has_turn.any()):
                break
            # a detached memory still asks for its gradient: with reentrant checkpointing a memory-attention layer
            # whose inputs (this memory, the frozen encoder's states) need none would pass no gradient to its weights
            old = memory.detach().requires_grad_(model.training) if args.detach_memory else memory
            read = old
            if args.memory_noise_std > 0 and model.training:
                rms = old.detach().float().pow(2).mean(-1, keepdim=True).sqrt()
                read = old + (args.memory_noise_std * rms * torch.randn_like(old, dtype=torch.float32)).to(old.dtype)
            outputs = model(encoder_input_ids=ids[:, step], encoder_attention_mask=mask[:, step], memory=read)
            states = self.accelerator.unwrap_model(model).model.encoder_states_as_memory(outputs.encoder_hidden_states)
            target = memory_targets(old, states, outputs.encoder_attention_mask, args.new_data_weight(step + 1),
                                    args.target_pooling)
            cosine = F.cosine_similarity(outputs.memory.float(), target, dim=-1).mean(dim=(1, 2))  # [B]
            weight = has_turn.float()
            cosine = (cosine * weight).sum() / weight.sum()
            losses.append(-cosine)
            cosines.append(cosine.detach())
            memory = outputs.memory
        loss = torch.stack(losses).mean()
        if model.training:
            self.record(cosine=torch.stack(cosines).mean(), cosine_first=cosines[0], cosine_last=cosines[-1],
                        turns=float(len(cosines)))
        return (loss, {"memory": memory}) if return_outputs else loss


__all__ = ["RxTMemAttnTrainer", "memory_targets"]
