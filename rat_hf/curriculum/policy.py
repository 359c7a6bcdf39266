"""The ordering policy, the reward and the REINFORCE pieces of the attention-guided curriculum.

An episode orders the `N` pairs of a pool. At step `s` the context is the prompt and the `s` pairs chosen so far;
the *query* is the last self-attention layer's query vector at the context's last token (the model "asks" for what
comes next), and each remaining pair's *key* is that layer's key vector at the last token of the pair's key span,
encoded where it would land if appended now (positions `offset_s ..`, so RoPE sees the true relative distance).
Per head, `softmax(q . k / sqrt(d) / temperature)` over the *remaining* pairs (chosen ones masked before the
softmax), averaged over heads; query head `h` reads KV head `h // (H / Hkv)` as grouped-query attention does.
The pair is sampled from those probabilities, independently for every batch row.

The contexts of successive steps are prefixes of the finished sequence, so for the update one causal forward over
the finished sequence gives every step's query, and one batched forward of the key spans at every step's offset
gives every key: log pi(order) costs two forwards whatever `N` is.

Reward: the evaluator's mean log-probability of the *scored value tokens* of the finished sequence (logits at
`t - 1` score token `t`), from one forward pass.
"""

import torch


def model_inputs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> dict:
    """Forward kwargs; a reactive model (RxT: `init_memory`) gets a fresh memory per row."""
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
              "use_cache": False}
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(base, "init_memory"):
        inputs["memory"] = base.init_memory(input_ids.shape[0], device=input_ids.device)
    return inputs


def layout(batch: dict) -> tuple[int, int, int, int]:
    """(prompt length, pairs N, key width, pair width) of a collated batch."""
    return (batch["prompt_ids"].shape[1], batch["key_ids"].shape[1], batch["key_ids"].shape[2],
            batch["key_ids"].shape[2] + batch["value_ids"].shape[2])


def step_offsets(batch: dict) -> torch.Tensor:
    """`[N]`: position where the pair chosen at step s starts."""
    lp, n, _, width = layout(batch)
    return lp + width * torch.arange(n)


def assemble(batch: dict, orders: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The finished sequences for `orders` `[B, N]`: input_ids, attention_mask, score_mask (scored value tokens),
    each `[B, Lp + N * (Lk + Lv)]`."""
    take = lambda t: t.gather(1, orders[..., None].expand(-1, -1, t.shape[-1]))  # noqa: E731  [B, N, L]
    keys, key_mask = take(batch["key_ids"]), take(batch["key_mask"])
    values, value_mask = take(batch["value_ids"]), take(batch["value_mask"])
    scored = batch["scored"].gather(1, orders)[..., None] & value_mask.bool()  # [B, N, Lv]
    ids = torch.cat([batch["prompt_ids"], torch.cat([keys, values], -1).flatten(1)], 1)
    mask = torch.cat([batch["prompt_mask"], torch.cat([key_mask, value_mask], -1).flatten(1)], 1)
    score = torch.cat([torch.zeros_like(batch["prompt_mask"], dtype=torch.bool),
                       torch.cat([torch.zeros_like(key_mask, dtype=torch.bool), scored], -1).flatten(1)], 1)
    return ids, mask, score


def choice_probs(query: torch.Tensor, keys: torch.Tensor, available: torch.Tensor, temperature: float = 1.0):
    """Probabilities `[B, N]` of choosing each pair.

    query `[B, H, d]`, keys `[B, N, Hkv, d]`, available `[B, N]` (bool). Scores are masked *before* the per-head
    softmax, so a chosen pair gets exactly 0 and the others share all the mass; heads are then averaged.
    """
    groups = query.shape[1] // keys.shape[2]
    keys = keys.repeat_interleave(groups, dim=2)  # [B, N, H, d]: query head h reads KV head h // groups
    scores = torch.einsum("bhd,bnhd->bhn", query.float(), keys.float()) * query.shape[-1] ** -0.5 / temperature
    scores = scores.masked_fill(~available[:, None, :], float("-inf"))
    return scores.softmax(-1).mean(1)


def candidate_keys(model, probe, batch: dict) -> torch.Tensor:
    """`[B, N_steps, N, Hkv, d]`: each pair's key vector when placed at each step's offset."""
    key_ids, key_mask = batch["key_ids"], batch["key_mask"]
    b, n, lk = key_ids.shape
    offsets = step_offsets(batch).to(key_ids.device)
    ids = key_ids[:, None].expand(b, n, n, lk).reshape(-1, lk)  # [B * S * N, Lk]
    mask = key_mask[:, None].expand(b, n, n, lk).reshape(-1, lk)
    pos = (offsets[None, :, None, None] + torch.arange(lk, device=ids.device)).expand(b, n, n, lk).reshape(-1, lk)
    _, k = probe.query_key(**model_inputs(model, ids, mask, pos))  # [B*S*N, Hkv, Lk, d]
    return k[:, :, -1].reshape(b, n, n, k.shape[1], k.shape[-1])


@torch.no_grad()
def rollout(model, probe, batch: dict, temperature: float, generator: torch.Generator | None = None,
            keys: torch.Tensor | None = None):
    """Sample an order `[B, N]` for every row independently (the model's query at each step's context).
    `keys`: `candidate_keys` of this batch when already computed."""
    b, n = batch["scored"].shape
    keys = candidate_keys(model, probe, batch) if keys is None else keys.detach()
    available = torch.ones(b, n, dtype=torch.bool, device=keys.device)
    orders = torch.zeros(b, n, dtype=torch.long, device=keys.device)
    for s in range(n):
        if s < n - 1:  # the last pair is forced
            ids, mask, _ = assemble(batch, orders[:, :s])  # prompt + the pairs chosen so far
            pos = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
            q, _ = probe.query_key(**model_inputs(model, ids, mask, pos))  # [B, H, T, d]
            probs = choice_probs(q[:, :, -1], keys[:, s], available, temperature)
            choice = torch.multinomial(probs, 1, generator=generator).squeeze(-1).to(orders.device)
        else:
            choice = available.float().argmax(-1)
        orders[:, s] = choice
        available[torch.arange(b), choice] = False
    return orders


def order_log_probs(model, probe, batch: dict, orders: torch.Tensor, temperature: float,
                    keys: torch.Tensor | None = None) -> torch.Tensor:
    """Per-step choice probabilities `[B, S, N]` of given orders, with gradients (`keys`: `candidate_keys` of this
    batch when already computed)."""
    b, n = orders.shape
    ids, mask, _ = assemble(batch, orders)
    pos = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    q, _ = probe.query_key(**model_inputs(model, ids, mask, pos))  # [B, H, T, d]
    q = q[:, :, step_offsets(batch).to(ids.device) - 1].transpose(1, 2)  # [B, S, H, d]
    keys = candidate_keys(model, probe, batch) if keys is None else keys  # [B, S, N, Hkv, d]
    chosen_before = torch.zeros(b, n, n, dtype=torch.bool, device=ids.device)  # [B, S, N]
    for s in range(1, n):
        chosen_before[:, s] = chosen_before[:, s - 1]
        chosen_before[torch.arange(b), s, orders[:, s - 1]] = True
    available = ~chosen_before
    probs = choice_probs(q.flatten(0, 1), keys.flatten(0, 1), available.flatten(0, 1), temperature)
    return probs.view(b, n, n)


def chosen_log_prob(probs: torch.Tensor, orders: torch.Tensor) -> torch.Tensor:
    """`[B]`: log pi(order) = sum over steps of log p(chosen pair)."""
    return probs.gather(-1, orders[..., None]).squeeze(-1).clamp_min(1e-30).log().sum(-1)


def categorical_kl(probs: torch.Tensor, ref_probs: torch.Tensor) -> torch.Tensor:
    """Exact KL(p || p_ref) summed over the last axis (pairs with p = 0 contribute 0); then summed over steps."""
    terms = torch.where(probs > 0, probs * (probs.clamp_min(1e-30).log() - ref_probs.clamp_min(1e-30).log()),
                        torch.zeros_like(probs))
    return terms.sum(-1).sum(-1)  # [B]


@torch.no_grad()
def sequence_reward(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, score_mask: torch.Tensor):
    """`[B]`: mean log-prob of the scored tokens; logits at position t - 1 predict token t."""
    pos = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    logits = model(**model_inputs(model, input_ids, attention_mask, pos)).logits.float()  # [B, T, V]
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)  # [B, T-1]
    m = score_mask[:, 1:].float()
    return (logp * m).sum(1) / m.sum(1).clamp_min(1.0)


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """Rewards `[P * G]` (rows of a pool adjacent) -> advantages normalised within each pool's group of G."""
    r = rewards.view(-1, group_size)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True, unbiased=False) + eps)).flatten()


def keep_top(advantages: torch.Tensor, fraction: float) -> torch.Tensor:
    """Bool mask keeping the `ceil(fraction * n)` trajectories with the highest advantages (at least one)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"keep_fraction must be in (0, 1], got {fraction}")
    k = max(1, int(-(-fraction * advantages.numel() // 1)))
    keep = torch.zeros_like(advantages, dtype=torch.bool)
    keep[advantages.argsort(descending=True, stable=True)[:k]] = True
    return keep
