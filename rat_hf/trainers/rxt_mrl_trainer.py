"""Memory reinforcement learning (MRL) of a Reactive Transformer: a curriculum of episodes in which answers sampled
from the memory are rewarded for recalling earlier turns.

    trainer = RxTMRLTrainer(model, RxTMRLConfig(output_dir="mrl", curriculum=[2, 4, 8, 16]),
                            train_dataset=mrl_recall_dataset(2000, max_turns=16), processing_class=tokenizer)
    trainer.train()

**Episodes and strategies.** A row is a conversation (`query`, `answer`, `interactions`, optional `strategy`). The
curriculum stage sets the episode length K (`curriculum`, stage lengths in optimizer steps `curriculum_steps`):

- cumulative: the first K turns; every turn k >= 1 asks about turn k-1 and is scored, the saved interaction is turn k-1;
- long_range: the first turn (a fact), K-2 distractor turns, then the row's last turn (the question about the fact);
  only that last turn is scored, the saved interaction is turn 0.

**Rollout** (no gradients, `_prepare_inputs`, like TRL's GRPO): per episode and turn, the memory M_k of turns 0..k-1
(the policy's own, and the frozen reference's); at a scored turn `num_generations` answers are sampled from M_k and
scored by the reward functions (TRL's signature, `rat_hf.rewards.mrl`) against the reference answer and the saved
interaction. Only *then* is the turn written into memory — the reference answer, or with `memory_answer="best"` the
best-scored sample — so no answer ever reaches the memory before it is scored (RxLM wrote the accepted answer first).
Unscored turns (turn 0, distractors) are written with their reference answers.

**Update** (`RxTMRLModule.forward`, with gradients, inside one DDP forward): the memory chain is recomputed from the
written interactions (truncated every `bptt_turns` updates), every sample is re-scored by the policy reading its turn's
memory, and the loss is

    group (default, critic-free):  A = (r - mean_group(r)) / std_group(r)   over the samples of one memory state
                                   L = mean_tokens[ PPO-clip(ratio, A) + beta * KL_k3(policy || reference) ]
    critic (PPO, the comparison):  per-token reward = -beta * KL_k1, + r at the answer's last token; GAE(gamma, lam)
                                   with values from a value head over the decoder states (which read memory + query);
                                   L = mean_tokens[ PPO-clip ] + vf_coef * clipped value loss
    both:                          + memory_drift_coef * mean_updates,layers,slots[ 1 - cos(M_j, target_j) ]

so the answers' log-probabilities back-propagate into the memory attention, the encoder and the initial memory (a
memory-aware stage that trained only the decoder would be stateless training). The reference is a frozen copy of the
starting model (`ref_model`), reading its own memory of the same interactions; the drift target is its memory
(`memory_drift_target="reference"`) or the policy's memory before the update, detached (`"previous"`). Losses use
`rat_hf.trainers.ppo_utils`. Log-probabilities are float32 whatever the autocast (bf16-safe).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ..data.interactions import interaction_prompt_ids, mrl_recall_dataset
from ..rewards.mrl import EmbeddingCosineReward, bleu_reward, exact_match_reward, length_ratio_reward
from ..tokenization.special_tokens import reactive_token_ids
from ._rxt_common import record_turns
from .ppo_utils import (
    clipped_policy_loss,
    clipped_value_loss,
    gae_advantages,
    masked_mean,
    masked_var,
    masked_whiten,
    per_token_kl,
    selective_log_softmax,
)
from .rxt_mrl_config import STRATEGIES, RxTMRLConfig
from .rxt_smat_trainer import RxTEpisodeModule, RxTEpisodeTrainer, causal_lm

# --- data ------------------------------------------------------------------------------------------------------------


def episode_plan(num_row_turns: int, num_turns: int, strategy: str) -> tuple[list[int], list[int | None]]:
    """`(turn indices of the row used, saved position per episode turn or None if unscored)` for an episode of at most
    `num_turns` turns (see the module docstring)."""
    if num_row_turns < 2:
        raise ValueError("an MRL episode needs at least 2 turns (one to remember, one to ask about it)")
    k = min(num_turns, num_row_turns)
    if strategy == "cumulative":
        return list(range(k)), [None] + list(range(k - 1))
    return [0, *range(1, k - 1), num_row_turns - 1], [None] * (k - 1) + [0]


def tokenize_mrl_row(tokenizer, row, args: RxTMRLConfig) -> dict:
    """Per turn: the prompt `[Q] query [A]` (query cut to `max_prompt_length`), the reference answer's ids, the
    content of the turn as a saved interaction (query + answer, no markers), the answer text; and the strategy."""
    row = dict(row)  # `datasets` hands over lazy rows
    ids = reactive_token_ids(tokenizer)
    prompts, answers, saved, texts = [], [], [], []
    for query, answer in record_turns(row):
        prompt = interaction_prompt_ids(tokenizer, query)
        if len(prompt) > args.max_prompt_length:
            prompt = prompt[: args.max_prompt_length - 1] + [ids["answer"]]
        reply = tokenizer(" " + answer, add_special_tokens=False)["input_ids"]
        prompts.append(prompt)
        answers.append(reply)
        saved.append(prompt[1:-1] + reply)
        texts.append(answer)
    strategy = row.get("strategy") or args.strategy
    if strategy not in STRATEGIES:
        raise ValueError(f"row strategy must be one of {STRATEGIES}, got {strategy!r}")
    return {"turn_prompt_ids": prompts, "turn_answer_ids": answers, "turn_saved_ids": saved, "turn_answers": texts,
            "strategy": strategy}


# --- model -----------------------------------------------------------------------------------------------------------


class RxTValueHead(nn.Module):
    """V(s) per token from the decoder's final hidden state (which has read the memory and the query so far).

    Two layers (a linear value on a frozen-ish trunk learns slowly); the output layer starts at zero, so V = 0 at
    first and the value loss starts at the returns' second moment.
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.out = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # [N, C, D] -> [N, C]
        return self.out(F.silu(self.dense(hidden.float()))).squeeze(-1)


def completion_log_probs(model, sample_ids, sample_mask, memory, prompt_width: int):
    """Log-probs `[N, C]` (float32) of the completion tokens `sample_ids[:, prompt_width:]` and the hidden states that
    predicted them `[N, C, D]`, the decoder reading `memory` `[N, L, S, D]`. Through the base model and the LM head
    (as TRL's fused head does), so the hidden states come for free."""
    lm = causal_lm(model)
    hidden = lm.model(input_ids=sample_ids, attention_mask=sample_mask, memory=memory).last_hidden_state
    hidden = hidden[:, prompt_width - 1 : -1]  # position t predicts token t+1: [N, C, D]
    logits = lm.lm_head(hidden)
    return selective_log_softmax(logits, sample_ids[:, prompt_width:]), hidden


def memory_drift(memories: list[torch.Tensor], targets: list[torch.Tensor], has_turn: torch.Tensor) -> torch.Tensor:
    """Mean over updates j (rows that had turn j-1), layers and slots of `1 - cos(memories[j], targets[j])`."""
    terms = []
    for j in range(1, len(memories)):
        rows = has_turn[:, j - 1]
        if rows.any():
            cos = F.cosine_similarity(memories[j][rows].float(), targets[j][rows].float(), dim=-1)  # [b, L, S]
            terms.append((1 - cos).mean())
    return torch.stack(terms).mean() if terms else memories[0].new_zeros((), dtype=torch.float32)


class RxTMRLModule(RxTEpisodeModule):
    """MRL's update forward (see the module docstring); `value_head` only with the critic estimator."""

    def __init__(self, policy, args: RxTMRLConfig):
        super().__init__(policy)
        self.args = args
        if args.advantage_estimator == "critic":
            self.value_head = RxTValueHead(policy.config.hidden_size)
            self._extra_module_names = ("value_head",)

    def forward(self, turn_ids, turn_mask, sample_row, sample_turn, sample_ids, sample_mask, completion_mask,
                prompt_width: int, advantages, old_log_probs=None, ref_log_probs=None, old_values=None, returns=None,
                drift_targets=None) -> dict:
        """turn_ids/turn_mask `[B, K, T]`: the interactions written; sample_* `[N]` / `[N, P + C]`: the scored samples
        (row, turn, prompt left-padded to `prompt_width` + completion); completion_mask `[N, C]`; advantages `[N]`
        (group) or `[N, C]` (critic); the rest `[N, C]` from the rollout; drift_targets `[B, K', L, S, D]`."""
        a = self.args
        num_updates = int(sample_turn.max())
        memories = self.memory_chain(turn_ids, turn_mask, a.bptt_turns, num_updates)
        memory = torch.stack(memories, 1)[sample_row, sample_turn]  # [N, L, S, D]
        log_probs, hidden = completion_log_probs(self.policy, sample_ids, sample_mask, memory, prompt_width)
        mask = completion_mask
        old = old_log_probs if old_log_probs is not None else log_probs.detach()
        adv = advantages[:, None].expand_as(log_probs) if advantages.dim() == 1 else advantages
        policy_loss, ratio, clipped = clipped_policy_loss(log_probs, old, adv, a.epsilon)
        out = {"clip_fraction": masked_mean(clipped.float(), mask).detach()}
        if a.advantage_estimator == "group":
            per_token = policy_loss
            if a.beta > 0:
                kl = per_token_kl(log_probs, ref_log_probs, a.kl_estimator)
                per_token = per_token + a.beta * kl
                out["kl"] = masked_mean(kl, mask).detach()
            loss = masked_mean(per_token, mask)
        else:
            values = self.value_head(hidden)  # [N, C]
            value_loss, _ = clipped_value_loss(values, old_values, returns, a.cliprange_value)
            value_loss = masked_mean(value_loss, mask)
            loss = masked_mean(policy_loss, mask) + a.vf_coef * value_loss
            out["value_loss"] = value_loss.detach()
            out["value_mean"] = masked_mean(values, mask).detach()
            # the share of the returns' variance the critic explains (1: perfect, 0: no better than their mean)
            explained = 1 - masked_var(returns - values.detach(), mask) / masked_var(returns, mask).clamp(min=1e-8)
            out["value_explained_variance"] = explained.detach()
        out["policy_loss"] = masked_mean(policy_loss, mask).detach()
        if a.memory_drift_coef > 0:
            if a.memory_drift_target == "previous":
                targets = [m.detach() for m in [memories[0], *memories[:-1]]]
            elif drift_targets is None:
                raise ValueError("RxTMRLModule: memory_drift_target='reference' needs drift_targets (the reference "
                                 "model's memories)")
            else:
                targets = [None, *[drift_targets[:, j] for j in range(1, num_updates + 1)]]
            drift = memory_drift(memories, targets, turn_mask.bool().any(-1))
            loss = loss + a.memory_drift_coef * drift
            out["memory_drift"] = drift.detach()
        out["loss"] = loss
        return out


# --- trainer ---------------------------------------------------------------------------------------------------------


class RxTMRLTrainer(RxTEpisodeTrainer):
    """Memory reinforcement learning over a curriculum of episode lengths (see the module docstring).

    Args:
        model: an `RxTForCausalLM` (after SMAT), or a PEFT model around one.
        args: `RxTMRLConfig`.
        reward_funcs: callables with TRL's reward signature (`rat_hf.rewards.mrl`); None: `args.reward_funcs`.
        train_dataset / eval_dataset: conversations (`query`, `answer`, `interactions`, optional `strategy`), e.g.
            `mrl_recall_dataset`. Need `processing_class` (the tokenizer, with `[Q]`/`[A]`).
        ref_model: the frozen reference for the KL and the memory drift; None: a copy of `model` as it is now.
    """

    def __init__(self, model, args: RxTMRLConfig, reward_funcs=None, train_dataset=None, eval_dataset=None,
                 processing_class=None, ref_model=None, **kwargs):
        if not isinstance(args, RxTMRLConfig):
            raise ValueError(f"RxTMRLTrainer: args must be an RxTMRLConfig, got {type(args).__name__}")
        if processing_class is None:
            raise ValueError("RxTMRLTrainer: pass processing_class=tokenizer (prompts, rewards and logs need it)")
        needs_ref = args.beta > 0 or args.memory_drift_target == "reference" or reward_funcs is None
        if ref_model is None and needs_ref:
            ref_model = copy.deepcopy(model)
        if ref_model is not None:  # on the training device before the rewards read its embedding
            ref_model = ref_model.eval().requires_grad_(False).to(args.device)
        self.ref_model = ref_model
        self.reward_funcs = list(reward_funcs) if reward_funcs is not None else self._named_rewards(args, ref_model)
        if reward_funcs is not None:
            self.reward_weights = (args.reward_weights if args.reward_weights is not None
                                   else [1.0] * len(self.reward_funcs))
        else:
            self.reward_weights = args.resolved_reward_weights()
        if len(self.reward_weights) != len(self.reward_funcs):
            raise ValueError(f"RxTMRLTrainer: {len(self.reward_weights)} reward_weights for "
                             f"{len(self.reward_funcs)} reward functions")
        tokenize = lambda r: tokenize_mrl_row(processing_class, r, args)  # noqa: E731
        if train_dataset is not None:
            train_dataset = train_dataset.map(tokenize, remove_columns=train_dataset.column_names,
                                              desc="tokenizing train_dataset")
        if eval_dataset is not None:
            eval_dataset = eval_dataset.map(tokenize, remove_columns=eval_dataset.column_names,
                                            desc="tokenizing eval_dataset")
        config = model.config
        self.eos_token_id = config.eos_token_id
        self.pad_token_id = config.pad_token_id if config.pad_token_id is not None else config.eos_token_id
        super().__init__(model, args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processing_class, data_collator=lambda rows: rows, **kwargs)
        self._buffer: list[dict | None] = [None] * args.gradient_accumulation_steps
        self._micro_step = 0

    def _build_module(self, model, args) -> RxTMRLModule:
        return RxTMRLModule(model, args)

    def create_optimizer(self, model=None):
        """`Trainer`'s optimizer; with `vf_learning_rate`, the value head's parameters in groups of their own at that
        rate (same weight decay as before; the schedule scales every group alike)."""
        optimizer = super().create_optimizer(model)
        module = self.accelerator.unwrap_model(self.model)
        if self.args.vf_learning_rate is None or not hasattr(module, "value_head"):
            return optimizer
        head = {id(p) for p in module.value_head.parameters()}
        moved = []
        for group in optimizer.param_groups:
            mine = [p for p in group["params"] if id(p) in head]
            if mine:
                group["params"] = [p for p in group["params"] if id(p) not in head]
                moved.append({**{k: v for k, v in group.items() if k != "params"}, "params": mine,
                              "lr": self.args.vf_learning_rate})
        optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"]]
        for group in moved:
            optimizer.add_param_group(group)
        return optimizer

    def _named_rewards(self, args: RxTMRLConfig, ref_model) -> list:
        embedding = ref_model.get_input_embeddings() if ref_model is not None else None
        funcs = []
        for name in args.reward_funcs:
            if name in ("bleu_to_reference", "bleu_to_saved"):
                funcs.append(bleu_reward(name.removeprefix("bleu_to_"), args.bleu_max_n, args.bleu_smoothing))
            elif name in ("cosine_to_reference", "cosine_to_saved"):
                funcs.append(EmbeddingCosineReward(embedding, name.removeprefix("cosine_to_")))
            elif name in ("length", "length_ratio"):
                funcs.append(length_ratio_reward)
            elif name == "exact_match":
                funcs.append(exact_match_reward)
            else:  # the chat rewards of rat_hf.rewards, or 'module:function'
                from ..rewards import get_reward_funcs

                funcs.extend(get_reward_funcs([name]))
        return funcs

    # -- curriculum ---------------------------------------------------------------------------------------------------
    def curriculum_stage(self, step: int | None = None) -> int:
        """Index into `args.curriculum` of the stage that optimizer step `step` (default: now) belongs to."""
        step = self.state.global_step if step is None else step
        stages = self.args.curriculum
        lengths = self.args.curriculum_steps or [max(1, -(-self.state.max_steps // len(stages)))] * len(stages)
        end = 0
        for i, n in enumerate(lengths):
            end += n
            if step < end:
                return i
        return len(stages) - 1

    # -- rollout ------------------------------------------------------------------------------------------------------
    def _prepare_inputs(self, inputs):
        """Rollout once per `num_iterations` passes over the same accumulation slot (TRL's GRPO buffering)."""
        if not self.model.training:  # evaluation batches go through `evaluate`
            return inputs
        slot = self._micro_step % self.args.gradient_accumulation_steps
        pass_index = self._micro_step // self.args.gradient_accumulation_steps
        if pass_index % self.args.num_iterations == 0 or self._buffer[slot] is None:
            self._buffer[slot] = self._rollout(inputs)
        self._micro_step += 1
        return self._buffer[slot]

    @contextmanager
    def _eval_mode(self, module):
        was = module.training
        module.eval()
        try:
            yield module
        finally:
            module.train(was)

    def _pad(self, rows: list[list[int]], left: bool, width: int | None = None):
        width = max([len(r) for r in rows] + [1]) if width is None else width
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, r in enumerate(rows):
            if r:
                sl = slice(width - len(r), width) if left else slice(0, len(r))
                ids[i, sl] = torch.tensor(r, dtype=torch.long)
                mask[i, sl] = True
        return ids.to(self.args.device), mask.to(self.args.device)

    def _episodes(self, rows: list[dict], num_turns: int) -> list[list[dict]]:
        episodes = []
        for row in rows:
            used, saved = episode_plan(len(row["turn_prompt_ids"]), num_turns, row["strategy"])
            episodes.append([{"prompt": row["turn_prompt_ids"][i], "answer": row["turn_answer_ids"][i],
                              "answer_text": row["turn_answers"][i],
                              "saved": None if s is None else row["turn_saved_ids"][used[s]],
                              "saved_text": None if s is None else row["turn_answers"][used[s]]}
                             for i, s in zip(used, saved)])
        return episodes

    @torch.no_grad()
    def sample_episodes(self, rows: list[dict], num_turns: int, num_generations: int, do_sample: bool = True):
        """Play episodes: per turn, sample answers at scored turns, score them, then write the turn into memory.

        Returns `(samples, written, memories, ref_memories)`: `samples` one dict per scored (row, turn) group,
        `written[k][b]` the interaction ids written at turn k, the policy's and the reference's memories per turn.
        """
        policy = causal_lm(self.policy)
        with self._eval_mode(policy):  # the acting policy: no dropout
            return self._play(policy, self._episodes(rows, num_turns), num_generations, do_sample)

    def _play(self, policy, episodes, num_generations: int, do_sample: bool):
        a = self.args
        B, K = len(episodes), max(len(e) for e in episodes)
        device = self.args.device
        memory = policy.init_memory(B, device=device)
        ref_memory = self.ref_model.init_memory(B, device=device) if self.ref_model is not None else None
        memories, ref_memories, written, samples = [memory], [ref_memory], [], []
        for k in range(K):
            scored = [b for b in range(B) if k < len(episodes[b]) and episodes[b][k]["saved"] is not None]
            best = {}
            if scored:
                group = self._sample_and_score([episodes[b][k] for b in scored], memory[scored], num_generations,
                                               do_sample)
                group.update(rows=scored, turn=k)
                samples.append(group)
                if a.memory_answer == "best":
                    top = group["rewards"].view(len(scored), num_generations).argmax(-1)
                    for i, b in enumerate(scored):
                        best[b] = group["answers"][i * num_generations + int(top[i])]
            turn_ids = []
            for b in range(B):
                if k >= len(episodes[b]):
                    turn_ids.append([])
                    continue
                turn = episodes[b][k]
                answer = best.get(b, turn["answer"])
                turn_ids.append((turn["prompt"] + answer + [self.eos_token_id])[: a.max_length])
            written.append(turn_ids)
            if k < K - 1:  # the last turn's memory is never read
                ids, mask = self._pad(turn_ids, left=False)
                memory = policy.update_memory(memory, ids, mask)
                memories.append(memory)
                if self.ref_model is not None:
                    ref_memory = self.ref_model.update_memory(ref_memory, ids, mask)
                    ref_memories.append(ref_memory)
        return samples, written, memories, ref_memories

    def _sample_and_score(self, turns_: list[dict], memory, G: int, do_sample: bool) -> dict:
        a, tok = self.args, self.processing_class
        prompts, prompt_mask = self._pad([t["prompt"] for t in turns_], left=True)
        kwargs = dict(do_sample=True, temperature=a.temperature, top_k=a.top_k or None, top_p=a.top_p) \
            if do_sample else dict(do_sample=False)
        out = causal_lm(self.policy).generate(
            input_ids=prompts, attention_mask=prompt_mask, memory=memory, num_return_sequences=G,
            max_new_tokens=a.max_completion_length, eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id,
            **kwargs)
        completion = out[:, prompts.shape[1]:]  # [n*G, C]
        is_eos = completion == self.eos_token_id
        after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
        completion_mask = ~after_eos  # the answer and its EOS
        answer_mask = completion_mask & ~is_eos
        answers = [row[m].tolist() for row, m in zip(completion, answer_mask)]
        reference, reference_mask = self._pad([t["answer"] for t in turns_ for _ in range(G)], left=False)
        saved, saved_mask = self._pad([t["saved"] for t in turns_ for _ in range(G)], left=False)
        prompt_texts = tok.batch_decode([t["prompt"] for t in turns_ for _ in range(G)], skip_special_tokens=True)
        columns = dict(prompts=prompt_texts, completions=tok.batch_decode(answers, skip_special_tokens=True),
                       completion_ids=torch.where(answer_mask, completion, self.pad_token_id),
                       completion_mask=answer_mask, reference_ids=reference, reference_mask=reference_mask,
                       saved_ids=saved, saved_mask=saved_mask, reference=[t["answer_text"] for t in turns_
                                                                          for _ in range(G)],
                       saved=[t["saved_text"] for t in turns_ for _ in range(G)], trainer_state=self.state)
        per_func = torch.stack([torch.tensor([float("nan") if v is None else v for v in f(**columns)],
                                             dtype=torch.float32) for f in self.reward_funcs], 1).to(self.args.device)
        weights = torch.tensor(self.reward_weights, dtype=torch.float32, device=per_func.device)
        rewards = (per_func * weights).nansum(-1)  # a function's None leaves it out, as in TRL
        exact = exact_match_reward(completion_ids=columns["completion_ids"], completion_mask=answer_mask,
                                   reference_ids=reference, reference_mask=reference_mask)
        return {"prompts": prompts, "prompt_mask": prompt_mask, "completion": completion,
                "completion_mask": completion_mask, "answers": answers, "rewards": rewards, "per_func": per_func,
                "exact": torch.tensor(exact), "memory": memory}

    def _rollout(self, rows: list[dict]) -> dict:
        a = self.args
        stage = self.curriculum_stage()
        G = a.num_generations
        samples, written, memories, ref_memories = self.sample_episodes(rows, a.curriculum[stage], G)
        # one flat batch of samples: prompts left-padded to a common width P, completions right-padded to C
        P = max(s["prompts"].shape[1] for s in samples)
        C = max(s["completion"].shape[1] for s in samples)
        ids, masks, cmasks, rows_, turns_, group_rewards = [], [], [], [], [], []
        for s in samples:
            n = s["prompts"].shape[0]
            prompt = F.pad(s["prompts"].repeat_interleave(G, 0), (P - s["prompts"].shape[1], 0),
                           value=self.pad_token_id)
            pmask = F.pad(s["prompt_mask"].repeat_interleave(G, 0), (P - s["prompts"].shape[1], 0), value=False)
            comp = F.pad(s["completion"], (0, C - s["completion"].shape[1]), value=self.pad_token_id)
            cmask = F.pad(s["completion_mask"], (0, C - s["completion"].shape[1]), value=False)
            ids.append(torch.cat([prompt, torch.where(cmask, comp, self.pad_token_id)], 1))
            masks.append(torch.cat([pmask, cmask], 1))
            cmasks.append(cmask)
            rows_.append(torch.tensor(s["rows"]).repeat_interleave(G))
            turns_.append(torch.full((n * G,), s["turn"]))
            group_rewards.append(s["rewards"].view(n, G))
        device = a.device
        batch = {"sample_ids": torch.cat(ids), "sample_mask": torch.cat(masks).long(),
                 "completion_mask": torch.cat(cmasks), "sample_row": torch.cat(rows_).to(device),
                 "sample_turn": torch.cat(turns_).to(device), "prompt_width": P}
        K_needed = int(batch["sample_turn"].max())
        turn_ids = [self._pad(written[k], left=False) for k in range(max(K_needed, 1))]
        T = max(t[0].shape[1] for t in turn_ids)
        batch["turn_ids"] = torch.stack(
            [F.pad(i, (0, T - i.shape[1]), value=self.pad_token_id) for i, _ in turn_ids], 1)
        batch["turn_mask"] = torch.stack([F.pad(m, (0, T - m.shape[1]), value=False) for _, m in turn_ids], 1).long()
        if self.ref_model is not None and a.memory_drift_target == "reference" and a.memory_drift_coef > 0:
            batch["drift_targets"] = torch.stack(ref_memories[: K_needed + 1], 1)

        rewards = torch.cat([g.reshape(-1) for g in group_rewards])  # [N]
        memory = torch.stack(memories, 1)[batch["sample_row"], batch["sample_turn"]]
        need_old = a.num_iterations > 1 or a.advantage_estimator == "critic"
        module = self.accelerator.unwrap_model(self.model)
        with torch.no_grad(), self._eval_mode(module):
            old_log_probs = hidden = ref_log_probs = None
            if need_old:
                old_log_probs, hidden = completion_log_probs(module.policy, batch["sample_ids"], batch["sample_mask"],
                                                             memory, P)
            if self.ref_model is not None and a.beta > 0:
                ref_memory = torch.stack(ref_memories, 1)[batch["sample_row"], batch["sample_turn"]]
                ref_log_probs, _ = completion_log_probs(self.ref_model, batch["sample_ids"], batch["sample_mask"],
                                                       ref_memory, P)
        cmask = batch["completion_mask"]
        if a.advantage_estimator == "group":
            g = torch.cat([x for x in group_rewards])  # [groups, G]
            adv = g - g.mean(-1, keepdim=True)
            if a.scale_rewards:
                adv = adv / (g.std(-1, keepdim=True) + 1e-4)
            batch["advantages"] = adv.reshape(-1)
        else:
            with torch.no_grad():
                old_values = module.value_head(hidden)
                token_rewards = torch.zeros_like(old_log_probs)
                if ref_log_probs is not None:
                    token_rewards = -a.beta * per_token_kl(old_log_probs, ref_log_probs, "k1")
                last = cmask.long().cumsum(-1).argmax(-1)  # the answer's last token (its EOS when it ended)
                token_rewards[torch.arange(len(last), device=last.device), last] += rewards
                token_rewards = token_rewards * cmask
                adv, returns = gae_advantages(token_rewards, old_values, cmask, a.gamma, a.lam)
                if a.whiten_advantages:
                    adv = masked_whiten(adv, cmask)
            batch.update(advantages=adv, old_values=old_values, returns=returns)
        batch.update(old_log_probs=old_log_probs if a.num_iterations > 1 else None, ref_log_probs=ref_log_probs)
        per_func = torch.cat([s["per_func"] for s in samples])
        exact = torch.cat([s["exact"] for s in samples])
        lengths = cmask.sum(-1).float()
        self._record(reward=rewards.mean().item(), reward_std=rewards.std().item() if len(rewards) > 1 else 0.0,
                     exact_match=exact.mean().item(), completion_length=lengths.mean().item(),
                     curriculum_turns=a.curriculum[stage])
        for f, column in zip(self.reward_funcs, per_func.T):  # a function's None (NaN) samples are left out
            scored = ~column.isnan()
            mean = column[scored].mean().item() if scored.any() else 0.0
            self._record(weight=int(scored.sum()), **{f"rewards/{getattr(f, '__name__', type(f).__name__)}": mean})
        return batch

    # -- loss ---------------------------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = model(**inputs)
        self._record(**{k: v.item() for k, v in out.items() if k != "loss"})
        return (out["loss"], out) if return_outputs else out["loss"]

    # -- evaluation ---------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate_rewards(self, dataset=None, num_turns: int | None = None, do_sample: bool = False,
                         num_generations: int = 1, batch_size: int | None = None) -> dict:
        """Mean reward and exact-match rate of the scored turns of `dataset` (default: the eval set, tokenized) at
        `num_turns` (default: the current stage's), answering greedily unless `do_sample`."""
        dataset = self.eval_dataset if dataset is None else dataset
        if dataset is None:
            raise ValueError("evaluate_rewards: no dataset (pass one, or eval_dataset to the trainer)")
        if "turn_prompt_ids" not in dataset.column_names:
            dataset = dataset.map(lambda r: tokenize_mrl_row(self.processing_class, r, self.args))
        num_turns = num_turns or self.args.curriculum[self.curriculum_stage()]
        batch_size = batch_size or self.args.per_device_eval_batch_size
        rewards, exact = [], []
        for start in range(0, len(dataset), batch_size):
            rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            samples = self.sample_episodes(rows, num_turns, num_generations, do_sample)[0]
            rewards += [s["rewards"] for s in samples]
            exact += [s["exact"] for s in samples]
        return {"reward": torch.cat(rewards).mean().item(), "exact_match": torch.cat(exact).mean().item(),
                "turns": num_turns}

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        result = self.evaluate_rewards(eval_dataset)
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in result.items()}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


__all__ = ["RxTMRLModule", "RxTMRLTrainer", "RxTValueHead", "completion_log_probs", "episode_plan", "memory_drift",
           "mrl_recall_dataset", "tokenize_mrl_row"]
