"""Memory-reinforcement-learning rewards for a Reactive Transformer, as TRL-style reward functions.

Each function is called as TRL's `GRPOTrainer` calls reward functions, `f(prompts=, completions=, completion_ids=,
**columns)`, and returns one float per completion. What an answer is compared with comes in as columns:

- `reference_ids`: the dataset's answer to this turn's query;
- `saved_ids`: the saved interaction — the earlier turn whose content this turn asks about (the previous turn under
  the cumulative strategy, the first turn under the long-range one; see `rat_hf.trainers.rxt_mrl_trainer`).

Token ids come either as TRL passes them (lists of ints per completion; a dataset with `reference_ids`/`saved_ids`
columns works with `GRPOTrainer` as is), or as tensors on the accelerator with a boolean mask each
(`completion_mask`, `reference_mask`, `saved_mask`), which is how `RxTMRLTrainer` passes them: BLEU
(`rat_hf.rewards.bleu`) and the embedding cosine then run batched on that device. The ids scored are the answer's
tokens: leave out the EOS (TRL's `completion_ids` include it; `RxTMRLTrainer` strips it).

    bleu_to_reference / bleu_to_saved     sentence BLEU (`bleu_reward(target, max_n, smoothing)` for other settings)
    EmbeddingCosineReward(emb, target)    cosine of mean token embeddings (`cosine_to_reference`/`cosine_to_saved`)
    length_ratio_reward                   min(len, len_ref) / max(len, len_ref): 1 at the reference's length
    exact_match_reward                    1 if the answer's ids equal the reference's, else 0

Ranges: all in [0, 1] except the cosine, in [-1, 1].
"""

from __future__ import annotations

import torch
from torch import nn

from .bleu import SMOOTHING, bleu_score, pad_token_ids

TARGETS = ("reference", "saved")

__all__ = ["EmbeddingCosineReward", "TARGETS", "bleu_reward", "bleu_to_reference", "bleu_to_saved",
           "exact_match_reward", "length_ratio_reward"]


def _ids(values, mask, device, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`(ids [N, T], mask [N, T] bool)` from a tensor + mask, or from lists of ids."""
    if values is None:
        raise ValueError(f"this reward needs the `{what}` column (token ids per completion)")
    if torch.is_tensor(values):
        if mask is None:
            raise ValueError(f"`{what}` is a tensor: pass its boolean mask too (`{what.removesuffix('_ids')}_mask`, "
                             f"or `completion_mask` for `completion_ids`)")
        return values.to(device), mask.to(device).bool()
    return pad_token_ids([list(v) for v in values], device=device)


def _device(completion_ids):
    return completion_ids.device if torch.is_tensor(completion_ids) else None


def _target(kwargs, target: str, device):
    return _ids(kwargs.get(f"{target}_ids"), kwargs.get(f"{target}_mask"), device, f"{target}_ids")


def bleu_reward(target: str = "reference", max_n: int = 4, smoothing: str = "floor"):
    """A reward function: sentence BLEU of each completion against its `target` (`reference` or `saved`) ids."""
    if target not in TARGETS:
        raise ValueError(f"bleu_reward: target must be one of {TARGETS}, got {target!r}")
    if smoothing not in SMOOTHING:
        raise ValueError(f"bleu_reward: smoothing must be one of {SMOOTHING}, got {smoothing!r}")

    def reward(prompts=None, completions=None, completion_ids=None, completion_mask=None, **kwargs) -> list[float]:
        device = _device(completion_ids)
        ids, mask = _ids(completion_ids, completion_mask, device, "completion_ids")
        ref, ref_mask = _target(kwargs, target, device)
        return bleu_score(ids, ref, mask, ref_mask, max_n=max_n, smoothing=smoothing).tolist()

    reward.__name__ = reward.__qualname__ = f"bleu_to_{target}"
    return reward


bleu_to_reference = bleu_reward("reference")
bleu_to_saved = bleu_reward("saved")


class EmbeddingCosineReward:
    """Cosine similarity between the mean token embedding of a completion and of its `target` ids.

    `embedding`: an `nn.Embedding` (or its weight `[V, D]`) — use a frozen one (the reference model's
    `get_input_embeddings()`), so the reward does not move while the policy trains. A completion or target without
    tokens scores 0. Named `cosine_to_<target>` (TRL logs rewards by `__name__`).
    """

    def __init__(self, embedding: nn.Embedding | torch.Tensor, target: str = "reference"):
        if target not in TARGETS:
            raise ValueError(f"EmbeddingCosineReward: target must be one of {TARGETS}, got {target!r}")
        weight = embedding.weight if isinstance(embedding, nn.Embedding) else embedding
        if not torch.is_tensor(weight) or weight.dim() != 2:
            raise ValueError("EmbeddingCosineReward: embedding must be an nn.Embedding or a [vocab, dim] tensor")
        # a module is read at call time, so the reward follows it to whatever device it is moved to
        self.embedding = embedding if isinstance(embedding, nn.Embedding) else None
        self._weight = weight.detach()
        self.target = target
        self.__name__ = f"cosine_to_{target}"

    @property
    def weight(self) -> torch.Tensor:
        return self.embedding.weight.detach() if self.embedding is not None else self._weight

    def _mean(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        vectors = weight[ids.to(weight.device)].float()  # [N, T, D]
        m = mask.to(vectors.device, torch.float32)[..., None]
        return (vectors * m).sum(1) / m.sum(1).clamp(min=1)  # [N, D]

    def __call__(self, prompts=None, completions=None, completion_ids=None, completion_mask=None,
                 **kwargs) -> list[float]:
        device = _device(completion_ids)
        ids, mask = _ids(completion_ids, completion_mask, device, "completion_ids")
        ref, ref_mask = _target(kwargs, self.target, device)
        cos = torch.nn.functional.cosine_similarity(self._mean(ids, mask), self._mean(ref, ref_mask), dim=-1)
        empty = (mask.sum(-1) == 0) | (ref_mask.sum(-1) == 0)
        return torch.where(empty.to(cos.device), torch.zeros_like(cos), cos).tolist()


def length_ratio_reward(prompts=None, completions=None, completion_ids=None, completion_mask=None,
                        **kwargs) -> list[float]:
    """`min(n, r) / max(n, r)` for a completion of n tokens and a reference of r: 1 at the reference's length,
    falling as the answer gets shorter or longer (both empty: 1)."""
    device = _device(completion_ids)
    _, mask = _ids(completion_ids, completion_mask, device, "completion_ids")
    _, ref_mask = _target(kwargs, "reference", device)
    n, r = mask.sum(-1).float(), ref_mask.sum(-1).float().to(mask.device)
    return torch.where(torch.maximum(n, r) == 0, torch.ones_like(n), torch.minimum(n, r) / torch.maximum(n, r).clamp(
        min=1)).tolist()


def exact_match_reward(prompts=None, completions=None, completion_ids=None, completion_mask=None,
                       **kwargs) -> list[float]:
    """1.0 when the completion's token ids are exactly the reference's, else 0.0."""
    device = _device(completion_ids)
    ids, mask = _ids(completion_ids, completion_mask, device, "completion_ids")
    ref, ref_mask = _target(kwargs, "reference", device)
    n, r = mask.sum(-1), ref_mask.sum(-1).to(mask.device)
    width = max(ids.shape[1], ref.shape[1])
    a = torch.nn.functional.pad(torch.where(mask, ids, -1), (0, width - ids.shape[1]), value=-1)
    b = torch.nn.functional.pad(torch.where(ref_mask, ref.to(ids.device), -1), (0, width - ref.shape[1]), value=-1)
    # compare the real tokens in order, whatever the padding layout: sort each row's real tokens to the front
    a = torch.gather(a, 1, torch.sort((a == -1).int(), dim=1, stable=True).indices)
    b = torch.gather(b, 1, torch.sort((b == -1).int(), dim=1, stable=True).indices)
    return ((n == r) & (a == b).all(-1)).float().tolist()
