"""`AttentionGuidedTrainer`: group-relative REINFORCE of the ordering policy through LoRA, with exact resume.

Per episode: draw `batch_size` pools, repeat each `num_rollouts` times, sample an order per row (`policy.rollout`),
score the finished sequences with the frozen evaluator (by default the model with its adapter disabled; optionally
minus a reference model's score), normalise the rewards within each pool's group, keep the top `keep_fraction`,
and minimise `-A * log pi(order) + kl_coef * KL(pi || pi_base)`, where pi_base is the same probe with the adapter
disabled and the KL is exact (a sum over the remaining pairs at every step).

Adapter tensors that cannot influence the probe (e.g. the last layer's `v_proj`/`o_proj`: the policy reads the last
attention's queries and keys only) are frozen at start, so every trainable tensor is trained.

Checkpoints (`checkpoint-<episode>/`): the adapter, the optimizer, every RNG (the pool sampler's `random.Random`, the
order sampler's `torch.Generator`, torch's global state) and the log; resuming continues bit for bit.
"""

import json
import logging
import os
import random
import re
import shutil

import torch
from tqdm.auto import tqdm

from .config import AttentionGuidedConfig
from .policy import (assemble, candidate_keys, categorical_kl, chosen_log_prob, group_advantages, keep_top,
                     order_log_probs, rollout, sequence_reward)
from .pools import collate
from .probe import AttentionProbe

logger = logging.getLogger("rat_hf.curriculum")


class AttentionGuidedTrainer:
    """Train `model`'s LoRA adapter to order the pools of `pool_source` (see the module docstring).

    `pool_source.sample(rng, n)` returns pools; `pool_source.order_metrics(pools, orders)` (optional) adds metrics
    such as the define-before-recall rate. `evaluator`/`reference`: separate frozen scoring models (optional).
    """

    def __init__(self, model, args: AttentionGuidedConfig, pool_source, evaluator=None, reference=None):
        from peft import LoraConfig, PeftModel, get_peft_model

        self.args = args
        self.device = torch.device("cuda" if torch.cuda.is_available() and not args.use_cpu else "cpu")
        torch.manual_seed(args.seed)
        if not isinstance(model, PeftModel):
            targets = [t.strip() for t in args.lora_target_modules.split(",")] if args.lora_target_modules else None
            model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha,
                                                     target_modules=targets, task_type="CAUSAL_LM"))
        self.model = model.to(self.device).eval()  # eval: no dropout, so rollouts and updates see one policy
        self.probe = AttentionProbe(self.model)
        self.pools = pool_source
        self.pad_token_id = getattr(pool_source, "pad_token_id", 0)
        self.evaluator = evaluator.to(self.device).eval() if evaluator is not None else None
        self.reference = reference.to(self.device).eval() if reference is not None else None
        self.rng = random.Random(args.seed)  # draws pools
        self.generator = torch.Generator().manual_seed(args.seed)  # samples orders (on CPU: device-independent)
        self._freeze_unreachable()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("no adapter parameter reaches the attention probe: target q_proj/k_proj (or c_attn) "
                             "or layers before the last attention with lora_target_modules")
        self.optimizer = torch.optim.AdamW(self.params, lr=args.learning_rate, weight_decay=args.weight_decay)
        self.episode, self.history = 0, []

    # ---- setup -------------------------------------------------------------------------------------------------------
    def _freeze_unreachable(self) -> None:
        """Freeze adapter tensors with no path to the probe's q/k (their gradient would always be None)."""
        batch = self._batch(self.pools.sample(random.Random(-1), 1), 1)
        orders = torch.arange(batch["scored"].shape[1], device=self.device)[None]
        probs = order_log_probs(self.model, self.probe, batch, orders, self.args.temperature)
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        grads = torch.autograd.grad(probs[..., 0].sum(), [p for _, p in named], allow_unused=True)
        frozen = [n for (n, p), g in zip(named, grads) if g is None]
        for n, p in named:
            if n in frozen:
                p.requires_grad_(False)
        if frozen:
            logger.info("froze %d adapter tensors that cannot reach the last attention's q/k: %s%s", len(frozen),
                        ", ".join(frozen[:4]), " ..." if len(frozen) > 4 else "")

    def _batch(self, pools: list, repeats: int) -> dict:
        batch = collate(pools, self.pad_token_id)
        return {k: v.repeat_interleave(repeats, 0).to(self.device) for k, v in batch.items()}

    # ---- scoring -----------------------------------------------------------------------------------------------------
    def rewards(self, batch: dict, orders: torch.Tensor) -> torch.Tensor:
        """`[B]` evaluator log-prob of the scored values (minus the reference's, when one is given)."""
        ids, mask, score = assemble(batch, orders)
        if self.evaluator is None:
            with self.model.disable_adapter():
                reward = sequence_reward(self.model, ids, mask, score)
        else:
            reward = sequence_reward(self.evaluator, ids, mask, score)
        if self.reference is not None:
            reward = reward - sequence_reward(self.reference, ids, mask, score)
        return reward

    def order_metrics(self, pools: list, orders: torch.Tensor) -> dict:
        fn = getattr(self.pools, "order_metrics", None)
        return fn(pools, orders.cpu()) if fn is not None else {}

    # ---- one episode -------------------------------------------------------------------------------------------------
    def train_step(self) -> dict:
        args, g = self.args, self.args.num_rollouts
        pools = self.pools.sample(self.rng, args.batch_size)
        batch = self._batch(pools, g)  # rows of one pool adjacent: [P * G, ...]
        # the candidate keys do not depend on the order: computed once, with gradients, for the rollout and the update
        keys = candidate_keys(self.model, self.probe, batch)
        orders = rollout(self.model, self.probe, batch, args.temperature, self.generator, keys=keys)
        reward = self.rewards(batch, orders)
        signal = reward[torch.randperm(reward.numel(), generator=self.generator)] if args.shuffle_rewards else reward
        advantages = group_advantages(signal, g)
        keep = keep_top(advantages, args.keep_fraction)

        probs = order_log_probs(self.model, self.probe, batch, orders, args.temperature, keys=keys)
        with torch.no_grad(), self.model.disable_adapter():
            ref_probs = order_log_probs(self.model, self.probe, batch, orders, args.temperature)
        log_prob = chosen_log_prob(probs, orders)
        kl = categorical_kl(probs, ref_probs)
        pg = -(advantages[keep] * log_prob[keep]).mean()
        loss = pg + args.kl_coef * kl.mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, args.max_grad_norm)
        self.optimizer.step()
        self.episode += 1
        rows = [p for p in pools for _ in range(g)]
        entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1).mean()
        return {"episode": self.episode, "reward": reward.mean().item(), "loss": loss.item(), "kl": kl.mean().item(),
                "entropy": entropy.item(), "grad_norm": grad_norm.item(), "kept": int(keep.sum()),
                **self.order_metrics(rows, orders)}

    def train(self, resume_from_checkpoint: str | bool | None = None) -> list:
        """Run up to `args.episodes` episodes (continuing a checkpoint when given; True: the newest one)."""
        if resume_from_checkpoint:
            path = resume_from_checkpoint if isinstance(resume_from_checkpoint, str) else self.last_checkpoint()
            if path is None:
                raise ValueError(f"--resume: no checkpoint-* folder in {self.args.output_dir}")
            self.load_checkpoint(path)
        args = self.args
        bar = tqdm(total=args.episodes, initial=self.episode, desc="episodes", dynamic_ncols=True)
        while self.episode < args.episodes:
            logs = self.train_step()
            self.history.append(logs)
            bar.update(1)
            bar.set_postfix({k: f"{v:.3f}" for k, v in logs.items() if k in ("reward", "kl", "define_before_recall")})
            if self.episode % args.logging_steps == 0 or self.episode == args.episodes:
                logger.info("episode %d/%d  %s", self.episode, args.episodes, "  ".join(
                    f"{k} {v:.4g}" for k, v in logs.items() if k != "episode"))
            if self.episode % args.save_steps == 0 or self.episode == args.episodes:
                self.save_checkpoint()
        bar.close()
        if args.plot and self.history:
            plot_history(self.history, os.path.join(args.output_dir, "training.png"))
        return self.history

    # ---- checkpoints -------------------------------------------------------------------------------------------------
    def save_checkpoint(self) -> str:
        path = os.path.join(self.args.output_dir, f"checkpoint-{self.episode}")
        os.makedirs(path, exist_ok=True)
        self.model.save_pretrained(path)  # adapter_model.safetensors + adapter_config.json
        torch.save(self.optimizer.state_dict(), os.path.join(path, "optimizer.pt"))
        torch.save({"python": self.rng.getstate(), "generator": self.generator.get_state(),
                    "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
                   os.path.join(path, "rng_state.pth"))
        with open(os.path.join(path, "trainer_state.json"), "w") as f:
            json.dump({"episode": self.episode, "history": self.history, "args": vars(self.args)}, f, indent=1)
        limit = self.args.save_total_limit
        if limit is not None:
            for old in self.checkpoints()[:-limit]:
                shutil.rmtree(old)
        return path

    def checkpoints(self) -> list:
        root = self.args.output_dir
        found = [d for d in os.listdir(root) if re.fullmatch(r"checkpoint-\d+", d)] if os.path.isdir(root) else []
        return [os.path.join(root, d) for d in sorted(found, key=lambda d: int(d.split("-")[1]))]

    def last_checkpoint(self) -> str | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def load_checkpoint(self, path: str) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        weights = os.path.join(path, "adapter_model.safetensors")
        if not os.path.isfile(weights):
            raise ValueError(f"{path} is not an attention-guided checkpoint (no adapter_model.safetensors)")
        set_peft_model_state_dict(self.model, load_file(weights, device=str(self.device)))
        self.optimizer.load_state_dict(torch.load(os.path.join(path, "optimizer.pt"), map_location=self.device))
        rng = torch.load(os.path.join(path, "rng_state.pth"), weights_only=False)
        self.rng.setstate(rng["python"])
        self.generator.set_state(rng["generator"])
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        with open(os.path.join(path, "trainer_state.json")) as f:
            state = json.load(f)
        self.episode, self.history = state["episode"], state["history"]
        logger.info("resumed from %s at episode %d", path, self.episode)


def plot_history(history: list, path: str) -> None:
    """Reward and every order metric against the episode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["reward", "kl"] + [k for k in history[0] if k not in
                               ("episode", "reward", "loss", "kl", "entropy", "grad_norm", "kept")]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4))
    steps = [h["episode"] for h in history]
    for ax, key in zip(axes, keys):
        ax.plot(steps, [h[key] for h in history], lw=1)
        ax.set(xlabel="episode", title=key)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
