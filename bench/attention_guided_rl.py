"""Define-before-recall: does the attention-guided curriculum learn to put definitions before recalls?

    python bench/attention_guided_rl.py                       # 3 seeds x 300 updates + controls, CPU, ~10 min
    python bench/attention_guided_rl.py --seeds 0 --updates 50   # a quick look

Per seed:
1. The evaluator: a tiny Llama (2 layers, 4 query / 2 KV heads: GQA) pre-trained briefly (`--pretrain_steps`) on
   define/recall pools laid out in *random* order, loss on recall codes only. A definition in context then makes the
   recall's code predictable (it learns to copy), while a recall before its definition stays a guess. Random order
   keeps the untrained policy honest: the model has never seen definitions preferred.
2. RL: a LoRA adapter on that model learns the order (`AttentionGuidedTrainer`); the evaluator is the same model
   with the adapter disabled (frozen). Control: the same run with rewards shuffled across the batch.
3. Held-out pools scored under: the trained policy, the shuffled-reward policy, the untrained policy, a uniformly
   random order, and the oracle order (all definitions first). Gap closed = (policy - random) / (oracle - random),
   in mean log-prob of the recall codes.

Writes bench/results/attention_guided_rl.json (rows: mean ± std over seeds) and attention_guided_rl.png (the
definitions-before-recall rate over updates).
"""

import argparse
import copy
import datetime
import json
import logging
import os
import platform
import random
import sys
import time

import numpy as np
import torch

from rat_hf.curriculum import AttentionGuidedConfig, AttentionGuidedTrainer, DefineRecallPools, collate, random_orders
from rat_hf.curriculum.policy import assemble, rollout

HERE = os.path.dirname(os.path.abspath(__file__))


def build_evaluator(src: DefineRecallPools, seed: int, steps: int, lr: float):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=src.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    rng, gen = random.Random(10_000 + seed), torch.Generator().manual_seed(10_000 + seed)
    n = 2 * src.symbols_per_pool
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 50)  # short warmup: the copy circuit forms unstably without
        batch = collate(src.sample(rng, 64))
        ids, mask, score = assemble(batch, random_orders(64, n, gen))
        loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(~score, -100)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def oracle_orders(pools: list) -> torch.Tensor:
    """All definitions first (in listing order, which is random), then all recalls."""
    return torch.tensor([sorted(range(len(p["pairs"])), key=lambda j: p["pairs"][j]["kind"] != "define")
                         for p in pools])


@torch.no_grad()
def score(trainer, pools: list, orders: torch.Tensor) -> dict:
    batch = {k: v.to(trainer.device) for k, v in collate(pools).items()}
    reward = trainer.rewards(batch, orders.to(trainer.device))
    return {"recall_logprob": reward.mean().item(), **DefineRecallPools.order_metrics(pools, orders.cpu())}


def evaluate(trainer, pools: list, seed: int) -> dict:
    batch = {k: v.to(trainer.device) for k, v in collate(pools).items()}
    gen = torch.Generator().manual_seed(seed)
    policy = rollout(trainer.model, trainer.probe, batch, trainer.args.temperature, gen)
    n = batch["scored"].shape[1]
    return {"policy": score(trainer, pools, policy),
            "random": score(trainer, pools, random_orders(len(pools), n, gen)),
            "oracle": score(trainer, pools, oracle_orders(pools))}


def run_seed(seed: int, a, src) -> dict:
    t0 = time.time()
    evaluator = build_evaluator(src, seed, a.pretrain_steps, a.pretrain_lr)
    pretrain_s = time.time() - t0
    held_out = src.sample(random.Random(99_000 + seed), a.eval_pools)
    out = {"seed": seed, "pretrain_s": pretrain_s}
    for name, shuffle in (("policy", False), ("shuffled", True)):
        args = AttentionGuidedConfig(
            output_dir=os.path.join(a.output_dir, f"seed{seed}_{name}"), episodes=a.updates, batch_size=a.batch_size,
            num_rollouts=a.num_rollouts, learning_rate=a.lr, kl_coef=a.kl_coef, shuffle_rewards=shuffle,
            lora_r=8, lora_alpha=16, lora_target_modules="q_proj,k_proj,v_proj,o_proj", save_steps=a.updates,
            logging_steps=50, seed=seed, use_cpu=True, plot=False)
        trainer = AttentionGuidedTrainer(copy.deepcopy(evaluator), args, src)
        if name == "policy":
            out["untrained"] = evaluate(trainer, held_out, seed)["policy"]
        t1 = time.time()
        history = trainer.train()
        out[f"{name}_train_s"] = time.time() - t1
        final = evaluate(trainer, held_out, seed)
        out[f"{name}_rate_curve"] = [h["define_before_recall"] for h in history]
        out[name] = final["policy"]
        if name == "policy":
            out["random"], out["oracle"] = final["random"], final["oracle"]
    gap = out["oracle"]["recall_logprob"] - out["random"]["recall_logprob"]
    for name in ("policy", "shuffled", "untrained"):
        out[name]["gap_closed"] = (out[name]["recall_logprob"] - out["random"]["recall_logprob"]) / gap
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--updates", type=int, default=300)
    p.add_argument("--batch_size", type=int, default=8, help="pools per update")
    p.add_argument("--num_rollouts", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--kl_coef", type=float, default=0.01)
    p.add_argument("--pretrain_steps", type=int, default=1000)
    p.add_argument("--pretrain_lr", type=float, default=5e-3)
    p.add_argument("--eval_pools", type=int, default=512)
    p.add_argument("--output_dir", default="/tmp/attention_guided_rl_bench")
    p.add_argument("--results", default=os.path.join(HERE, "results", "attention_guided_rl.json"))
    a = p.parse_args()
    torch.set_num_threads(1)  # tiny model: threads cost more than they give on a shared 2-core machine
    logging.basicConfig(level=logging.WARNING)
    src = DefineRecallPools(symbols_per_pool=3, num_symbols=16, num_codes=16, code_tokens=1)
    t0 = time.time()
    runs = []
    for seed in a.seeds:
        runs.append(run_seed(seed, a, src))
        r = runs[-1]
        print(f"seed {seed}: rate {r['policy']['define_before_recall']:.3f} (shuffled "
              f"{r['shuffled']['define_before_recall']:.3f}, untrained {r['untrained']['define_before_recall']:.3f}), "
              f"gap closed {r['policy']['gap_closed']:.3f} (shuffled {r['shuffled']['gap_closed']:.3f}); "
              f"{r['policy_train_s']:.0f} s", flush=True)
    rows = []
    for cond in ("policy", "shuffled", "untrained", "random", "oracle"):
        row = {"condition": cond}
        for metric in ("define_before_recall", "recall_logprob", "gap_closed"):
            vals = [r[cond][metric] for r in runs if metric in r[cond]]
            if vals:
                row[metric] = {"mean": float(np.mean(vals)), "std": float(np.std(vals)), "per_seed": vals}
        rows.append(row)
    rate = [r["policy"]["define_before_recall"] for r in runs]
    gap = [r["policy"]["gap_closed"] for r in runs]
    result = {
        "device": f"CPU ({platform.processor() or platform.machine()}), torch {torch.__version__}, 1 thread",
        "date": datetime.date.today().isoformat(),
        "command": "python " + " ".join(["bench/attention_guided_rl.py"] + sys.argv[1:]),
        "task": {"symbols_per_pool": 3, "pairs_per_pool": 6, "num_symbols": 16, "num_codes": 16, "code_tokens": 1},
        "settings": {k: v for k, v in vars(a).items() if k not in ("output_dir", "results")},
        "rows": rows,
        "success": {"rate_ge_0.9": bool(min(rate) >= 0.9), "gap_closed_ge_0.75": bool(min(gap) >= 0.75),
                    "criterion": "every seed: held-out definitions-before-recall rate >= 0.9 and >= 75% of the "
                                 "random->oracle recall log-prob gap closed"},
        "wall_s": time.time() - t0,
        "runs": [{k: v for k, v in r.items() if not k.endswith("_curve")} for r in runs],
        "curves": {f"seed{r['seed']}": {"policy": r["policy_rate_curve"], "shuffled": r["shuffled_rate_curve"]}
                   for r in runs},
    }
    os.makedirs(os.path.dirname(a.results), exist_ok=True)
    with open(a.results, "w") as f:
        json.dump(result, f, indent=1)
    plot(result, a.results.replace(".json", ".png"))
    for row in rows:
        print(row["condition"], {k: f"{v['mean']:.3f} ± {v['std']:.3f}" for k, v in row.items() if k != "condition"})


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (seed, c) in enumerate(result["curves"].items()):
        smooth = lambda v: np.convolve(v, np.ones(10) / 10, mode="valid")  # noqa: E731  10-update running mean
        ax.plot(smooth(c["policy"]), color="C0", alpha=0.8, label="attention-guided RL" if i == 0 else None)
        ax.plot(smooth(c["shuffled"]), color="C3", alpha=0.8, label="shuffled-reward control" if i == 0 else None)
    ax.axhline(0.5, color="k", ls="--", label="random order (0.5)")
    ax.axhline(1.0, color="C2", ls=":", label="oracle (1.0)")
    ax.axhline(0.9, color="grey", ls=":", lw=0.8)
    ax.set(xlabel="update", ylabel="definitions before recall (training rollouts)", ylim=(0.3, 1.02),
           title="define-before-recall rate over updates (3 seeds, running mean of 10)")
    ax.legend(fontsize="small", loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
