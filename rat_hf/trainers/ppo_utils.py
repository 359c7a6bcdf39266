"""Pure tensor functions for PPO on token sequences (no model, no trainer state).

Conventions shared by every function here (stable API: `rat_hf.trainers.ppo_trainer` and the RxT memory-RL trainer
import them):

- Per-token tensors are `[B, T]`: row b is one sequence (one episode), column t one completion token (one action).
  `mask[B, T]` (bool or 0/1) marks the real completion tokens; everything else (prompt, padding, tokens after EOS)
  is ignored — it never enters a mean, a variance or the GAE recursion.
- Nothing is reduced unless the name says so: the losses return `[B, T]` so a caller can add its own per-token terms
  (e.g. a gate REINFORCE term) before reducing with `masked_mean`.
- All functions are differentiable where that makes sense (losses, log-probs, entropy); `gae_advantages` and
  `masked_whiten` are meant for detached rollout tensors and run under `torch.no_grad()` if you wish.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "gae_advantages",
    "clipped_policy_loss",
    "clipped_value_loss",
    "per_token_kl",
    "KL_ESTIMATORS",
    "selective_log_softmax",
    "entropy_from_logits",
]

KL_ESTIMATORS = ("k1", "k2", "k3")


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `values` over the positions where `mask` is true.

    `dim=None` → a scalar over all masked entries; `dim=d` → the mean along `d` (e.g. `dim=1` gives one value per
    sequence, `[B]`). Where the mask is empty (no entry, or a row with no completion token) the result is 0, not
    NaN, so an all-padding row or mini-batch contributes nothing instead of poisoning the loss.
    """
    mask = mask.to(values.dtype)
    total = (values * mask).sum() if dim is None else (values * mask).sum(dim)
    count = mask.sum() if dim is None else mask.sum(dim)
    return total / count.clamp(min=1.0)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of `values` over the masked entries (a scalar). `unbiased` applies Bessel's correction (n / (n - 1)),
    which is skipped when fewer than two entries are masked (the variance is then 0)."""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        n = mask.to(values.dtype).sum()
        if n > 1:
            var = var * n / (n - 1)
    return var


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Normalise `values` to unit variance (and zero mean unless `shift_mean=False`) using the statistics of the
    masked entries only; unmasked entries come back as 0. `[B, T]` in, `[B, T]` out.

    With a single masked entry the variance is 0 and the result is `(x - mean) / sqrt(eps)` = 0 when shifting, i.e. a
    lone advantage carries no signal after whitening (as in TRL): whiten over a rollout of several sequences.
    """
    mask_f = mask.to(values.dtype)
    mean = masked_mean(values, mask)
    var = masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask_f


def gae_advantages(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation, per sequence, over the masked (completion) tokens only.

    rewards, values, mask: `[B, T]`. `rewards[b, t]` is the reward for emitting token t of sequence b (typically the
    score at the sequence's last completion token minus a per-token KL penalty everywhere); `values[b, t]` is V(s_t),
    the value of the state *before* token t is emitted. Returns `(advantages, returns)`, both `[B, T]`, zero where
    `mask` is false; `returns = advantages + values` (the value targets).

    The recursion runs backwards along each row's time axis (dim 1) — never across rows — and steps from one masked
    position to the previous masked one, so padding or prompt positions inside a row are skipped rather than treated
    as time steps. After a row's last masked token the episode ends: V = 0 beyond it (a completion cut at
    `max_new_tokens` is terminal at that horizon; the caller decides what reward such a completion gets).

        delta_t = r_t + gamma * V(s_{t+1}) - V(s_t)
        A_t     = delta_t + gamma * lam * A_{t+1}
    """
    if not (rewards.shape == values.shape == mask.shape) or rewards.dim() != 2:
        raise ValueError(
            f"gae_advantages: rewards, values and mask must all be [B, T]; got {tuple(rewards.shape)}, "
            f"{tuple(values.shape)}, {tuple(mask.shape)}"
        )
    rewards = rewards.detach()
    values = values.detach()
    valid = mask.bool()
    B, T = rewards.shape
    advantages = torch.zeros_like(rewards)
    next_value = rewards.new_zeros(B)  # V(s_{t+1}) of the next masked position in the same row (0 after the end)
    next_adv = rewards.new_zeros(B)  # A_{t+1}
    for t in range(T - 1, -1, -1):
        m = valid[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * next_adv
        advantages[:, t] = torch.where(m, adv, torch.zeros_like(adv))
        next_value = torch.where(m, values[:, t], next_value)
        next_adv = torch.where(m, adv, next_adv)
    returns = (advantages + values) * valid.to(values.dtype)
    return advantages, returns


def clipped_policy_loss(
    log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor, clip_eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate, per token (not reduced).

    log_probs (current policy, with grad), old_log_probs (rollout policy, detached), advantages: `[B, T]`.
    Returns `(loss, ratio, clipped)`, all `[B, T]`: `loss = max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))`,
    `ratio = exp(log_probs - old_log_probs)`, `clipped` (bool) true where the clipped term was the larger one (its
    masked mean is the usual "clip fraction"). Reduce with `masked_mean(loss, mask)`.
    """
    ratio = torch.exp(log_probs - old_log_probs.detach())
    advantages = advantages.detach()
    unclipped = -advantages * ratio
    clipped_term = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = torch.maximum(unclipped, clipped_term)
    return loss, ratio, clipped_term > unclipped


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, clip_range: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's value loss, per token (not reduced): `0.5 * max((V - R)^2, (V_clip - R)^2)` with
    `V_clip = old_V + clip(V - old_V, -clip_range, clip_range)`. `clip_range=None` gives the plain `0.5 * (V - R)^2`.

    values (with grad), old_values (rollout, detached), returns (GAE targets): `[B, T]`. Returns `(loss, clipped)`,
    `[B, T]` each; `clipped` (bool) marks where the clipped error was the larger one (always false when unclipped).
    """
    returns = returns.detach()
    err = (values - returns) ** 2
    if clip_range is None:
        return 0.5 * err, torch.zeros_like(err, dtype=torch.bool)
    old_values = old_values.detach()
    v_clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    err_clipped = (v_clipped - returns) ** 2
    return 0.5 * torch.maximum(err, err_clipped), err_clipped > err


def per_token_kl(log_probs: torch.Tensor, ref_log_probs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from the log-probs of the *sampled* tokens, `[B, T]` (Schulman's
    estimators, http://joschu.net/blog/kl-approx.html, with r = pi_ref / pi evaluated at a token drawn from pi):

    - `"k1"`: `log pi - log pi_ref` — unbiased, can be negative per token; the classic RLHF reward penalty.
    - `"k2"`: `0.5 * (log pi - log pi_ref)^2` — biased, always >= 0, low variance.
    - `"k3"`: `r - 1 - log r` — unbiased and always >= 0 (GRPO's choice).
    """
    log_ratio = log_probs - ref_log_probs
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"per_token_kl: estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`log_softmax(logits)[..., index]` without materialising the full `[B, T, V]` log-softmax in float32 at once:
    logits `[B, T, V]`, index `[B, T]` (token ids) → `[B, T]`. Computed row by row in float32 (bf16 logits lose
    too much precision for importance ratios)."""
    out = []
    for row_logits, row_index in zip(logits, index):  # [T, V], [T]
        row_logits = row_logits.float()
        taken = torch.gather(row_logits, -1, row_index.unsqueeze(-1)).squeeze(-1)
        out.append(taken - torch.logsumexp(row_logits, dim=-1))
    return torch.stack(out)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of the categorical distribution given by the last axis of `logits`: `[B, T, V]` → `[B, T]`,
    computed in float32."""
    logits = logits.float()
    log_p = F.log_softmax(logits, dim=-1)
    return -(log_p.exp() * log_p).sum(-1)
