"""Batched sentence BLEU over token ids, on the tensors' device (TensorBLEU-like; no NLTK, no host round trip).

    scores = bleu_score(candidates, references, candidate_mask, reference_mask, max_n=4, smoothing="floor")  # [B]

`candidates` `[B, Tc]` and `references` `[B, Tr]` (one reference per row) or `[B, R, Tr]` (R references per row) are
token ids with boolean masks of the same shapes (None: every position is a token). A masked position never enters an
n-gram, so left, right or interior padding all work. `pad_token_ids(rows)` builds such tensors from lists of ids.

Counting (per order n): every n-gram window of the batch is tagged with its row, `torch.unique(dim=0)` maps the
`(row, n-gram)` pairs that occur to compact ids, and `torch.bincount` counts them, once for the candidates and once per
reference. Clipped matches per pair are `min(candidate count, max over references of the reference count)`, summed
back onto the rows with another `bincount`. The work and memory are linear in the number of n-grams in the batch
(TensorBLEU offsets a batch-wide unique per sentence, which is quadratic in the batch); the counts are exact integers.

The score is NLTK's `sentence_bleu` definition (Papineni et al. 2002, with Chen & Cherry 2014 smoothing):

    p_n  = clipped matches of order n / max(1, candidate n-grams of order n)
    BP   = 1 if c > r else exp(1 - r / c)     c: candidate length, r: the reference length closest to c (ties: shorter)
    BLEU = BP * exp(sum_n w_n * log p_n)      w_n = 1 / max_n unless `weights` is given

A candidate with no token, or with no unigram match, scores 0 whatever the smoothing (as NLTK). `smoothing` says what
a zero precision of a higher order becomes:

    "none":  BLEU is 0 (NLTK's method0, up to its float minimum)
    "floor": p_n = epsilon / max(1, candidate n-grams)                     (method1; epsilon = 0.1)
    "add-k": p_n = (matches + k) / (candidate n-grams + k) for every n >= 2, zero or not   (method2, Lin & Och; k = 1)
    "exp":   the i-th zero precision becomes 1 / (2^i * max(1, candidate n-grams))   (method3, NIST geometric)

Short answers want a small `max_n` (a one-token answer has no bigram: with `max_n=4` its best score is 0.178 under
"floor"). Scores are float32 `[B]` on the inputs' device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

SMOOTHING = ("none", "floor", "add-k", "exp")

__all__ = ["SMOOTHING", "bleu_score", "pad_token_ids"]


def pad_token_ids(rows: Sequence[Sequence[int]], device=None, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad lists of token ids: `(ids [N, T], mask [N, T] bool)`, T = the longest row (at least 1)."""
    width = max([len(r) for r in rows] + [1])
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, row in enumerate(rows):
        if len(row):
            ids[i, : len(row)] = torch.as_tensor(list(row), dtype=torch.long)
            mask[i, : len(row)] = True
    return ids.to(device), mask.to(device)


def _windows(ids: torch.Tensor, mask: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All n-gram windows `[N, W, n]` of `ids [N, T]` and whether each is made of real tokens only `[N, W]`."""
    if ids.shape[-1] < n:
        return ids.new_zeros((ids.shape[0], 0, n)), mask.new_zeros((ids.shape[0], 0))
    return ids.unfold(-1, n, 1), mask.unfold(-1, n, 1).all(-1)


def _clipped_matches(cand, cand_mask, refs, ref_mask, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: clipped n-gram matches and the number of candidate n-grams, both int64 `[B]`."""
    B, R = refs.shape[:2]
    device = cand.device
    c_win, c_ok = _windows(cand, cand_mask, n)  # [B, Wc, n], [B, Wc]
    r_win, r_ok = _windows(refs.reshape(B * R, -1), ref_mask.reshape(B * R, -1), n)  # [B*R, Wr, n]
    c_row = torch.arange(B, device=device)[:, None].expand(c_ok.shape)[c_ok]  # row of each real candidate n-gram
    r_row = torch.arange(B, device=device).repeat_interleave(R)[:, None].expand(r_ok.shape)[r_ok]
    r_ref = torch.arange(R, device=device).repeat(B)[:, None].expand(r_ok.shape)[r_ok]  # which reference
    keys = torch.cat([torch.cat([c_row[:, None], c_win[c_ok]], 1), torch.cat([r_row[:, None], r_win[r_ok]], 1)])
    total = torch.bincount(c_row, minlength=B)
    if keys.shape[0] == 0:
        return torch.zeros(B, dtype=torch.long, device=device), total
    unique, inverse = torch.unique(keys, dim=0, return_inverse=True)  # (row, n-gram) pairs -> compact ids
    U, n_cand = unique.shape[0], c_row.shape[0]
    cand_counts = torch.bincount(inverse[:n_cand], minlength=U)  # [U]
    ref_inverse = inverse[n_cand:]
    ref_counts = torch.zeros(U, dtype=torch.long, device=device)
    for r in range(R):  # R is small (usually 1): the max over references, one bincount each
        ref_counts = torch.maximum(ref_counts, torch.bincount(ref_inverse[r_ref == r], minlength=U))
    clipped = torch.minimum(cand_counts, ref_counts)
    return torch.bincount(unique[:, 0], weights=clipped.double(), minlength=B).long(), total


def bleu_score(
    candidates: torch.Tensor,
    references: torch.Tensor,
    candidate_mask: torch.Tensor | None = None,
    reference_mask: torch.Tensor | None = None,
    *,
    max_n: int = 4,
    weights: Sequence[float] | None = None,
    smoothing: str = "floor",
    epsilon: float = 0.1,
    k: float = 1.0,
) -> torch.Tensor:
    """Sentence BLEU of each candidate row against its reference row(s); float32 `[B]` (see the module docstring)."""
    if smoothing not in SMOOTHING:
        raise ValueError(f"bleu_score: smoothing must be one of {SMOOTHING}, got {smoothing!r}")
    if not isinstance(max_n, int) or isinstance(max_n, bool) or max_n < 1:
        raise ValueError(f"bleu_score: max_n must be a positive integer, got {max_n!r}")
    weights = [1.0 / max_n] * max_n if weights is None else [float(w) for w in weights]
    if len(weights) != max_n or any(not math.isfinite(w) or w < 0 for w in weights):
        raise ValueError(f"bleu_score: weights must be {max_n} finite numbers >= 0 (one per order), got {weights}")
    if candidates.dim() != 2 or references.dim() not in (2, 3) or references.shape[0] != candidates.shape[0]:
        raise ValueError(f"bleu_score: candidates must be [B, Tc] and references [B, Tr] or [B, R, Tr] with the same "
                         f"B; got {list(candidates.shape)} and {list(references.shape)}")
    candidate_mask = torch.ones_like(candidates, dtype=torch.bool) if candidate_mask is None else candidate_mask.bool()
    reference_mask = torch.ones_like(references, dtype=torch.bool) if reference_mask is None else reference_mask.bool()
    if candidate_mask.shape != candidates.shape or reference_mask.shape != references.shape:
        raise ValueError("bleu_score: each mask must have the shape of its ids")
    if references.dim() == 2:
        references, reference_mask = references[:, None], reference_mask[:, None]
    candidates, references = candidates.long(), references.long()

    B = candidates.shape[0]
    c_len = candidate_mask.sum(-1)  # [B]
    r_lens = reference_mask.sum(-1)  # [B, R]
    # the closest reference length, the shorter one on a tie (NLTK's closest_ref_length)
    closest = (r_lens - c_len[:, None]).abs() * (r_lens.max() + 1) + r_lens
    r_len = r_lens.gather(1, closest.argmin(1, keepdim=True))[:, 0]

    log_sum = torch.zeros(B, dtype=torch.float64, device=candidates.device)
    zeros_so_far = torch.zeros(B, dtype=torch.float64, device=candidates.device)  # for "exp"
    any_zero = torch.zeros(B, dtype=torch.bool, device=candidates.device)
    unigram_matches = None
    for n in range(1, max_n + 1):
        matches, total = _clipped_matches(candidates, candidate_mask, references, reference_mask, n)
        if n == 1:
            unigram_matches = matches
        num, den = matches.double(), total.clamp(min=1).double()
        zero = matches == 0
        if smoothing == "floor":
            num = torch.where(zero, torch.full_like(num, epsilon), num)
        elif smoothing == "add-k" and n >= 2:
            num, den = num + k, den + k
        elif smoothing == "exp":
            zeros_so_far = zeros_so_far + zero.double()
            num = torch.where(zero, torch.exp2(-zeros_so_far), num)
        p = num / den
        any_zero |= p == 0
        log_sum = log_sum + weights[n - 1] * torch.log(p.clamp(min=1e-300))
    c = c_len.double().clamp(min=1)
    brevity = torch.where(c_len > r_len, torch.ones_like(c), torch.exp(1 - r_len.double() / c))
    score = brevity * torch.exp(log_sum)
    score = torch.where(any_zero | (unigram_matches == 0) | (c_len == 0), torch.zeros_like(score), score)
    return score.float()
