"""What each part of RAT buys: Llama and RAT variants of one shape trained on the same tokens, scored against the
exact Bayes-optimal loss of the random language model (and by held-out perplexity on the default text corpus).

Variants (same width, depth, heads and SwiGLU width; bf16 autocast over float32 weights; sdpa attention):
  llama                stock `LlamaForCausalLM`
  llama_param_matched  Llama with its SwiGLU widened to RAT's parameter count (same depth: the width is the knob
                       that keeps the comparison about parameters, not about depth)
  rat_soft             `RatForCausalLM`, defaults (3 policies mixed by the selector, conv branch, output gates)
  rat_reinforce        `gating_mode="reinforce"`: one sampled policy per token and layer, selectors by REINFORCE
  rat_one_policy       `n_policies=1`: one policy net, no selector
  rat_no_conv          `use_temporal_conv=False`: no convolution branch (nor its norm)
  rat_no_gates         `gating_mode="none"`: no policy nets, plain attention (the conv branch stays)
  rat_query_gates      `head_gate_target="query"`: gates scale each head's query (the seed's score temperature)

Random language (`rat_hf.data.RandomLanguageModel`, V=64, depth 6 -> T=64, beta=2.5), online regime: every step
draws fresh sequences (drawn on the device with the grammar's own rule tensors, the algorithm of
`RandomLanguageModel.sample`; one stream per seed, the same for every variant). Scored on a fixed test set drawn with
`RandomLanguageModel.sample`, positions 1..63 (what a causal LM predicts) and the last position alone:
  Bayes  = the exact optimum `RandomLanguageModel.token_nll` on the same test sequences (paired: little noise);
  bigram = the best predictor that sees only the previous token and the position, P(x_t | x_t-1) at position t,
           exact: the joint of two adjacent leaves follows from the rules through their lowest common ancestor
           (`adjacent_joints`); the position-pooled bigram's loss is recorded too (`bigram_pooled_*`);
  gap closed = (bigram - model) / (bigram - Bayes): 0 = a bigram model, 1 = optimal, < 0 = worse than a bigram.
Text: the default corpus (`rat_hf.data.corpora`: the stdlib's docs; documents split by `held_out`), a byte-level BPE
trained on the training documents, packed blocks, held-out loss and perplexity.

Every run of a task trains the same number of steps (so the same tokens) with AdamW, linear warmup and cosine decay.
`--rlm_tokens 0` / `--text_tokens 0` (the default) picks the step counts from a timing probe of every variant, so that
the runs fit `--rlm_seconds` / `--text_seconds`; `--time_budget_s` then stops starting runs whose estimated end lies
past it (the JSON lists them under `skipped`). The clock (`wall_s`) counts training steps only (forward, backward,
clip, AdamW; CUDA-synchronised at each evaluation, evaluation itself excluded). A plain loop, not `Trainer`: one
host sync per evaluation, none per step, so that tok/s is the model's, not the loop's.

    PYTHONUNBUFFERED=1 python3 bench/rat_ablation.py --out bench/results/rat_ablation.json
    python bench/rat_ablation.py --smoke --out /tmp/rat_ablation.json   # tiny, CPU, seconds: the script end to end
    python bench/rat_ablation.py --plot_only bench/results/rat_ablation.json   # the PNG from a JSON

Outputs: the JSON (`device`, `date`, `command`, `meta` (the optima), `rows` (one per run, final numbers), `curves`
(per run: tokens, wall_s and the scores at every evaluation), `summary` (per variant: mean, std, min, max over
seeds), `table_md`) and a PNG next to it (gap closed vs tokens and vs seconds, held-out perplexity likewise).
"""

import argparse
import datetime
import gc
import json
import math
import os
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from rat_hf import RatConfig, RatForCausalLM  # noqa: E402
from rat_hf.data import RandomLanguageModel  # noqa: E402

# variant -> RatConfig overrides (None: a Llama)
VARIANTS = {
    "llama": None,
    "llama_param_matched": None,
    "rat_soft": {},
    "rat_reinforce": {"gating_mode": "reinforce"},
    "rat_one_policy": {"n_policies": 1},
    "rat_no_conv": {"use_temporal_conv": False},
    "rat_no_gates": {"gating_mode": "none"},
    "rat_query_gates": {"head_gate_target": "query"},
}


# ---- the random language: exact bigram, device sampler ------------------------------------------------------------
def adjacent_joints(rlm: RandomLanguageModel) -> torch.Tensor:
    """Exact P(x_{t-1} = a, x_t = b) for every position t >= 1: `[T, V, V]` float64 (row 0 is unused, NaN).

    Leaves t-1 and t meet at their lowest common ancestor: r = trailing zeros of t levels above the leaves. Its
    marginal m comes down the root-to-ancestor path (left child: m @ A_L, right: m @ A_R, A_L = rules summed over
    the right child, A_R over the left); its children have joint J = sum_s m_s rules[s]; leaf t-1 is the left
    child's rightmost descendant r levels down (A_R^r), leaf t the right child's leftmost (A_L^r).
    """
    rules, depth, T, V = rlm.rules, rlm.depth, rlm.seq_len, rlm.vocab_size  # rules [V, V, V] float64
    a_left, a_right = rules.sum(2), rules.sum(1)  # [V(parent), V(child)]
    joints = torch.full((T, V, V), float("nan"), dtype=torch.float64)
    for t in range(1, T):
        r = (t & -t).bit_length() - 1  # trailing zeros of t
        m = rlm.prior
        for level in range(depth - 1 - r):  # root -> lowest common ancestor, by t's bits from the top
            m = m @ (a_right if (t >> (depth - 1 - level)) & 1 else a_left)
        joint = torch.einsum("s,sjk->jk", m, rules)  # [V, V]: (left child, right child) of the ancestor
        joints[t] = torch.linalg.matrix_power(a_right, r).T @ joint @ torch.linalg.matrix_power(a_left, r)
    return joints


def bigram_nll(joints: torch.Tensor, x: torch.Tensor, pooled: bool = False) -> torch.Tensor:
    """-log P(x_t | x_{t-1}) of sequences `x` [n, T] under the exact bigram -> [n, T-1] (positions 1..T-1).

    `pooled=False`: the position-aware bigram (position t's own conditional); `True`: one conditional for all
    positions, from the joints averaged over positions 1..T-1.
    """
    cond = joints[1:] / joints[1:].sum(-1, keepdim=True)  # [T-1, V, V]: P(b | a) at each position
    if pooled:
        pool = joints[1:].mean(0)
        cond = (pool / pool.sum(-1, keepdim=True)).expand_as(cond)
    pos = torch.arange(1, x.shape[1]).expand(x.shape[0], -1)  # [n, T-1]
    return -cond[pos - 1, x[:, :-1], x[:, 1:]].log()


class DeviceSampler:
    """`RandomLanguageModel.sample`'s algorithm (root from the prior, then each node's left child and the right
    child given it, by inverse CDF) run on `device` from the grammar's public `rules`/`prior`: the online regime's
    fresh batches cost microseconds instead of ~50-100 us per sequence on the CPU."""

    def __init__(self, rlm: RandomLanguageModel, device):
        self.depth, self.vocab_size, self.device = rlm.depth, rlm.vocab_size, torch.device(device)
        rules = rlm.rules.to(self.device)  # [V, V, V] float64
        left = rules.sum(2)  # [V(parent), V(left)]
        self.prior_cdf = rlm.prior.to(self.device).cumsum(0)  # [V]
        self.left_cdf = left.cumsum(-1)  # [V, V]
        self.right_cdf = (rules / left.clamp_min(1e-300)[..., None]).cumsum(-1)  # [V, V, V]

    def _draw(self, cdf: torch.Tensor, gen: torch.Generator) -> torch.Tensor:  # [..., V] -> [...]
        u = torch.rand(*cdf.shape[:-1], 1, generator=gen, device=self.device, dtype=torch.float64)
        return torch.searchsorted(cdf, u).squeeze(-1).clamp_(max=self.vocab_size - 1)

    def __call__(self, n: int, gen: torch.Generator) -> torch.Tensor:
        """`n` sequences `[n, 2**depth]` (int64, on the device)."""
        nodes = self._draw(self.prior_cdf.expand(n, 1, -1).contiguous(), gen)  # [n, 1]
        for level in range(self.depth):
            left = self._draw(self.left_cdf[nodes], gen)  # [n, 2**level]
            right = self._draw(self.right_cdf[nodes, left], gen)
            nodes = torch.stack([left, right], dim=-1).view(n, 2 ** (level + 1))
        return nodes


# ---- models ---------------------------------------------------------------------------------------------------------
def _common(a, vocab: int, max_pos: int, intermediate: int | None = None) -> dict:
    return dict(vocab_size=vocab, hidden_size=a.hidden, intermediate_size=intermediate or a.intermediate,
                num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.heads,
                max_position_embeddings=max_pos, tie_word_embeddings=True, pad_token_id=None, bos_token_id=None,
                eos_token_id=None)


def rat_config(variant: str, a, vocab: int, max_pos: int) -> RatConfig:
    """The RatConfig of a RAT variant; a ValueError naming the switch when this rat_hf lacks it."""
    overrides = VARIANTS[variant]
    try:
        return RatConfig(**{**_common(a, vocab, max_pos), "n_policies": a.policies, **overrides})
    except ValueError as err:
        switches = ", ".join(f"{k}={v!r}" for k, v in overrides.items())
        raise ValueError(f"variant {variant!r} needs RatConfig({switches}),"
                         f" which this rat_hf refuses: {err}") from err


def llama_params(a, vocab: int, intermediate: int) -> int:
    """LlamaForCausalLM's parameter count with tied embeddings (sums its parts; no model is built)."""
    d, kv = a.hidden, a.heads * (a.hidden // a.heads)
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * intermediate + 2 * d  # q, o, k, v, SwiGLU, two norms
    return vocab * d + a.layers * per_layer + d


def matched_intermediate(a, vocab: int, max_pos: int) -> int:
    """The SwiGLU width that brings Llama closest to the default RAT's parameter count."""
    with torch.device("meta"):
        target = RatForCausalLM(rat_config("rat_soft", a, vocab, max_pos)).num_parameters()
    base = llama_params(a, vocab, a.intermediate)
    return a.intermediate + round((target - base) / (3 * a.hidden * a.layers))


def build(variant: str, a, vocab: int, max_pos: int, seed: int, device) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if VARIANTS[variant] is None:
        inter = matched_intermediate(a, vocab, max_pos) if variant == "llama_param_matched" else None
        cfg = LlamaConfig(**_common(a, vocab, max_pos, inter))
        model = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa")
    else:
        model = RatForCausalLM._from_config(rat_config(variant, a, vocab, max_pos), attn_implementation="sdpa")
    return model.to(device)


# ---- training -------------------------------------------------------------------------------------------------------
def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def autocast(device):
    # bf16 autocast over float32 weights on CUDA (AdamW updates would round away in bf16 weights); float32 on CPU
    return torch.autocast("cuda", dtype=torch.bfloat16) if torch.device(device).type == "cuda" else \
        torch.autocast("cpu", enabled=False)


def lr_at(step: int, total: int, peak: float) -> float:
    """Linear warmup over 5% of the steps, then cosine down to 10% of the peak."""
    warm = max(1, total // 20)
    if step < warm:
        return peak * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def eval_steps(total: int, count: int) -> list:
    """Log-spaced steps 1..total (the early dynamics get as many points as the tail), always ending at `total`."""
    points = {max(1, round(total ** (i / (count - 1)))) for i in range(count)} if count > 1 else set()
    return sorted(points | {total})


def train(model, batch_fn, steps: int, evaluate, a, device) -> tuple[list, dict]:
    """Train `steps` AdamW steps on `batch_fn(step)`; `evaluate(model)` at the start and at `eval_steps`.

    Returns (curve: one dict per evaluation, final: the last one).
    """
    fused = torch.device(device).type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=a.weight_decay,
                            fused=fused)
    checkpoints, wall, tokens = set(eval_steps(steps, a.eval_points)), 0.0, 0
    model.eval()
    curve = [{"step": 0, "tokens": 0, "wall_s": 0.0, "train_loss": None, **evaluate(model, final=False)}]
    model.train()
    sync(device)
    start = time.perf_counter()
    for step in range(steps):
        ids = batch_fn(step)  # [B, T]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, a.lr)
        with autocast(device):
            out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += ids.numel()
        if step + 1 in checkpoints:
            sync(device)
            wall += time.perf_counter() - start
            lm_loss = getattr(out, "lm_loss", None)  # RAT reinforce: the LM part of the loss (no policy term)
            train_loss = float((out.loss if lm_loss is None else lm_loss).detach())
            model.eval()
            point = {"step": step + 1, "tokens": tokens, "wall_s": round(wall, 4), "train_loss": train_loss,
                     **evaluate(model, final=step + 1 == steps)}
            model.train()
            curve.append(point)
            sync(device)
            start = time.perf_counter()
    del opt
    return curve, curve[-1]


@torch.no_grad()
def token_nll(model, x: torch.Tensor, device, batch: int, **kwargs) -> torch.Tensor:
    """-log p(x_t | x_<t) of every predicted token: `x` [n, T] -> [n, T-1] float32 on the CPU."""
    out = []
    for chunk in x.split(batch):
        chunk = chunk.to(device)
        with autocast(device):
            logits = model(input_ids=chunk, **kwargs).logits  # [b, T, V]
        out.append(F.cross_entropy(logits[:, :-1].float().transpose(1, 2), chunk[:, 1:], reduction="none").cpu())
    return torch.cat(out)


def gate_kwargs_supported(model) -> bool:
    """A RAT with gates: its evaluation is repeated with every gate at 1 (`gates_off=True`)."""
    cfg = model.config
    return isinstance(model, RatForCausalLM) and getattr(cfg, "gating_mode", "soft") != "none"


@torch.no_grad()
def gate_statistics(model, x: torch.Tensor, device) -> dict:
    """Whether the gates do anything, on the sequences `x` [b, T]: the model's own statistics averaged over layers
    (`gate_deviation` = mean |g - 1|, `policy_disagreement`, `gate_entropy`; see `RatCausalLMOutputWithPast`)."""
    x = x.to(device)
    with autocast(device):
        out = model(input_ids=x, labels=x)
    names = ("gate_deviation", "policy_disagreement", "gate_entropy")
    return {name: float(getattr(out, name).float().mean()) for name in names if getattr(out, name, None) is not None}


# ---- the two tasks --------------------------------------------------------------------------------------------------
class RLMTask:
    name = "rlm"

    def __init__(self, a, device):
        self.a, self.device = a, device
        self.rlm = RandomLanguageModel(a.rlm_vocab, a.rlm_depth, a.rlm_beta, seed=a.grammar_seed)
        t0 = time.perf_counter()
        self.test = self.rlm.sample(a.test_sequences, seed=987_654)  # [n, T] on the CPU
        bayes = self.rlm.token_nll(self.test)[:, 1:].float()  # [n, T-1]: positions 1..T-1
        joints = adjacent_joints(self.rlm)
        bigram, pooled = bigram_nll(joints, self.test).float(), bigram_nll(joints, self.test, pooled=True).float()
        self.ref = {"bayes": bayes, "bigram": bigram}
        self.meta = {
            "vocab_size": a.rlm_vocab, "depth": a.rlm_depth, "seq_len": self.rlm.seq_len, "beta": a.rlm_beta,
            "grammar_seed": a.grammar_seed, "test_sequences": a.test_sequences,
            "bayes_loss": float(bayes.mean()), "bayes_last_loss": float(bayes[:, -1].mean()),
            "bigram_loss": float(bigram.mean()), "bigram_last_loss": float(bigram[:, -1].mean()),
            "bigram_pooled_loss": float(pooled.mean()), "bigram_pooled_last_loss": float(pooled[:, -1].mean()),
            "uniform_loss": math.log(a.rlm_vocab), "reference_seconds": round(time.perf_counter() - t0, 2),
        }
        self.sampler = DeviceSampler(self.rlm, device)
        self.vocab, self.max_pos, self.batch = a.rlm_vocab, self.rlm.seq_len, a.rlm_batch
        self.max_steps = None  # fresh data: no epochs to cap

    def batches(self, seed: int, steps: int):
        """The seed's stream: `steps` fresh batches, drawn up front (outside the clock), the same for every variant."""
        gen = torch.Generator(device=self.device).manual_seed(10_000 + seed)
        data = torch.cat([self.sampler(self.batch, gen) for _ in range(steps)]).view(steps, self.batch, -1)
        return lambda step: data[step]

    def probe_batch(self):
        return self.sampler(self.batch, torch.Generator(device=self.device).manual_seed(1))

    def gap_closed(self, nll: torch.Tensor) -> dict:
        b, g = self.ref["bayes"], self.ref["bigram"]
        mean = (g.mean() - nll.mean()) / (g.mean() - b.mean())
        last = (g[:, -1].mean() - nll[:, -1].mean()) / (g[:, -1].mean() - b[:, -1].mean())
        return {"test_loss": float(nll.mean()), "test_last_loss": float(nll[:, -1].mean()),
                "gap_closed_mean": float(mean), "gap_closed_last": float(last)}

    def evaluate(self, model, final: bool) -> dict:
        scores = self.gap_closed(token_nll(model, self.test, self.device, self.a.eval_batch))
        if final and gate_kwargs_supported(model):  # what the gates are worth: the same model with every gate at 1
            off = self.gap_closed(token_nll(model, self.test, self.device, self.a.eval_batch, gates_off=True))
            scores.update({f"gates_off_{k}": v for k, v in off.items()})
            scores.update(gate_statistics(model, self.test[: self.a.eval_batch], self.device))
        return scores


class TextTask:
    name = "text"

    def __init__(self, a, device):
        # The records behind `default_text_corpus()` (which wraps them in a `datasets.Dataset`), without `datasets`:
        # the bench runs on images that lack it.
        from rat_hf.data.corpora import default_text_records, held_out
        from rat_hf.tokenization import train_bpe_tokenizer

        self.a, self.device = a, device
        t0 = time.perf_counter()
        texts = [r["text"] for r in default_text_records(max_docs=a.text_max_docs)]
        train_docs = [t for t in texts if not held_out(t)]
        eval_docs = [t for t in texts if held_out(t)]
        tok = train_bpe_tokenizer(train_docs, a.bpe_vocab)
        self.train_blocks, self.eval_blocks = self._pack(tok, train_docs), self._pack(tok, eval_docs)
        if len(self.eval_blocks) == 0:
            raise ValueError(f"--text_max_docs {a.text_max_docs}: no held-out block of {a.text_seq} tokens")
        self.vocab, self.max_pos, self.batch = len(tok), a.text_seq, a.text_batch
        # a few epochs at most: past that a model of this size overfits the ~0.5M training tokens, and the
        # comparison would be about memorising
        self.max_steps = max(1, int(a.text_epochs * len(self.train_blocks) / self.batch))
        self.meta = {"documents": len(texts), "train_documents": len(train_docs), "eval_documents": len(eval_docs),
                     "vocab_size": self.vocab, "seq_len": a.text_seq, "train_tokens": self.train_blocks.numel(),
                     "eval_tokens": self.eval_blocks.numel(), "python": sys.version.split()[0],
                     "reference_seconds": round(time.perf_counter() - t0, 2)}
        self.train_blocks = self.train_blocks.to(device)

    def _pack(self, tok, docs) -> torch.Tensor:
        """Documents joined with EOS, cut into `text_seq` blocks `[n, T]` (the tail shorter than a block dropped)."""
        ids = tok(docs, add_special_tokens=False)["input_ids"]
        stream = torch.tensor([t for x in ids for t in x + [tok.eos_token_id]], dtype=torch.long)
        n = stream.numel() // self.a.text_seq
        return stream[: n * self.a.text_seq].view(n, self.a.text_seq)

    def batches(self, seed: int, steps: int):
        """Epochs of the training blocks, each in its own seeded order."""
        n, gen = len(self.train_blocks), torch.Generator().manual_seed(20_000 + seed)
        per_epoch = max(1, n // self.batch)
        order = torch.cat([torch.randperm(n, generator=gen)[: per_epoch * self.batch]
                           for _ in range(math.ceil(steps / per_epoch))]).view(-1, min(self.batch, n))
        order = order.to(self.device)
        return lambda step: self.train_blocks[order[step]]

    def probe_batch(self):
        return self.train_blocks[: self.batch]

    def evaluate(self, model, final: bool) -> dict:
        nll = token_nll(model, self.eval_blocks, self.device, self.a.eval_batch)
        scores = {"held_out_loss": float(nll.mean()), "held_out_ppl": math.exp(float(nll.mean()))}
        if final and gate_kwargs_supported(model):
            off = token_nll(model, self.eval_blocks, self.device, self.a.eval_batch, gates_off=True).mean()
            scores.update({"gates_off_held_out_loss": float(off), "gates_off_held_out_ppl": math.exp(float(off))})
            scores.update(gate_statistics(model, self.eval_blocks[: self.a.eval_batch], self.device))
        return scores


# ---- planning, running, summarising ---------------------------------------------------------------------------------
def probe(task, variants, a, device) -> dict:
    """Seconds per training step of each variant on the task's batch shape (after warm-up steps)."""
    out = {}
    for v in variants:
        model = build(v, a, task.vocab, task.max_pos, 0, device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=torch.device(device).type == "cuda")
        ids = task.probe_batch()
        times = []
        for i in range(a.probe_warmup + a.probe_steps):
            sync(device)
            t0 = time.perf_counter()
            with autocast(device):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync(device)
            if i >= a.probe_warmup:
                times.append(time.perf_counter() - t0)
        out[v] = statistics.median(times)
        del model, opt
    return out


def plan_steps(step_s: dict, seconds: float, seeds: int, batch_tokens: int, tokens: int, lo: int, hi: int) -> int:
    """Steps per run: `tokens` / batch when given, else what fits `seconds` for all variants x seeds (20% for eval)."""
    if tokens > 0:
        return max(1, tokens // batch_tokens)
    fit = int(seconds / (1.2 * seeds * sum(step_s.values())))
    return max(lo, min(hi, fit))


def _stats(values: list) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def interp(curve: list, key: str, at: float, x: str = "wall_s") -> float | None:
    """`key` at `x == at` along a curve, linear between evaluations; None outside it."""
    pts = [(p[x], p[key]) for p in curve]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= at <= x1:
            return y0 + (y1 - y0) * (at - x0) / (x1 - x0) if x1 > x0 else y1
    return None


def summarise(rows: list, curves: list) -> dict:
    summary = {}
    for task in sorted({r["task"] for r in rows}):
        trows = [r for r in rows if r["task"] == task]
        variants = list(dict.fromkeys(r["variant"] for r in trows))
        # equal-time comparison: every variant's score at the end time of the fastest variant's runs
        t_eq = min(statistics.fmean(r["wall_s"] for r in trows if r["variant"] == v) for v in variants)
        keys = ["gap_closed_mean", "gap_closed_last", "test_loss", "gates_off_gap_closed_mean",
                "gates_off_gap_closed_last"] if task == "rlm" else ["held_out_loss", "held_out_ppl",
                                                                   "gates_off_held_out_ppl"]
        keys += ["gate_deviation", "policy_disagreement", "gate_entropy"]
        eq_key = "gap_closed_mean" if task == "rlm" else "held_out_ppl"
        summary[task] = {"equal_time_s": round(t_eq, 3), "variants": {}}
        for v in variants:
            vrows = [r for r in trows if r["variant"] == v]
            vcurves = [c["points"] for c in curves if c["task"] == task and c["variant"] == v]
            s = {"params": vrows[0]["params"], "tokens": vrows[0]["tokens"], "seeds": len(vrows),
                 "wall_s": _stats([r["wall_s"] for r in vrows]),
                 "tokens_per_s": _stats([r["tokens"] / r["wall_s"] for r in vrows])}
            s.update({k: _stats([r.get(k) for r in vrows]) for k in keys})
            s[f"{eq_key}_at_equal_time"] = _stats([interp(c, eq_key, t_eq) for c in vcurves])
            summary[task]["variants"][v] = {k: val for k, val in s.items() if val != {}}
    return summary


def table_md(summary: dict) -> str:
    """Markdown tables (mean ± std over seeds): one for the random language, one for the text corpus."""
    def pm(s: dict, fmt: str = "{:.3f}") -> str:
        if not s:
            return "–"
        return (fmt + " ± " + fmt).format(s["mean"], s["std"]) if s["n"] > 1 else fmt.format(s["mean"])

    def common(s: dict) -> str:
        return f"| {s['params'] / 1e6:.2f}M | {s['tokens_per_s']['mean'] / 1e3:.0f}k "

    lines = []
    if "rlm" in summary:
        rs = summary["rlm"]
        lines += ["| variant | params | tok/s | gap closed (mean) | gap closed (last) | gap closed (mean) at "
                  f"{rs['equal_time_s']:.1f} s | gates off: gap closed (mean) | mean abs(g-1) |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for v, s in rs["variants"].items():
            lines.append(f"| {v} {common(s)}| {pm(s['gap_closed_mean'])} | {pm(s['gap_closed_last'])} | "
                         f"{pm(s.get('gap_closed_mean_at_equal_time', {}))} | "
                         f"{pm(s.get('gates_off_gap_closed_mean', {}))} | {pm(s.get('gate_deviation', {}))} |")
    if "text" in summary:
        ts = summary["text"]
        lines += ["", f"| variant | params | tok/s | held-out ppl | ppl at {ts['equal_time_s']:.1f} s | gates off: ppl "
                  "| mean abs(g-1) |", "|---|---:|---:|---:|---:|---:|---:|"]
        for v, s in ts["variants"].items():
            lines.append(f"| {v} {common(s)}| {pm(s['held_out_ppl'], '{:.2f}')} | "
                         f"{pm(s.get('held_out_ppl_at_equal_time', {}), '{:.2f}')} | "
                         f"{pm(s.get('gates_off_held_out_ppl', {}), '{:.2f}')} | {pm(s.get('gate_deviation', {}))} |")
    return "\n".join(lines)


def plot(record: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("rlm", "gap_closed_mean", "tokens"), ("rlm", "gap_closed_mean", "wall_s"),
              ("rlm", "gap_closed_last", "tokens"), ("rlm", "gap_closed_last", "wall_s"),
              ("text", "held_out_ppl", "tokens"), ("text", "held_out_ppl", "wall_s")]
    fig, axes = plt.subplots(3, 2, figsize=(13, 13))
    variants = list(VARIANTS)
    for ax, (task, key, x) in zip(axes.flatten(), panels):
        if not any(c["task"] == task for c in record["curves"]):
            ax.set_axis_off()
            ax.text(0.5, 0.5, f"{task}: not run", ha="center", va="center", transform=ax.transAxes)
            continue
        for i, v in enumerate(variants):
            runs = [c["points"] for c in record["curves"] if c["task"] == task and c["variant"] == v]
            if not runs:
                continue
            n = min(len(r) for r in runs)
            keep = [j for j in range(n) if runs[0][j]["step"] > 0]  # log axes: the start point is not drawn
            xs = [statistics.fmean(r[j][x] for r in runs) for j in keep]
            ys = [[r[j][key] for r in runs] for j in keep]
            style = "--" if v.startswith("llama") else "-"
            ax.plot(xs, [statistics.fmean(y) for y in ys], style, color=f"C{i}", label=v, marker=".")
            if len(runs) > 1:
                ax.fill_between(xs, [min(y) for y in ys], [max(y) for y in ys], color=f"C{i}", alpha=0.15)
        what = {"gap_closed_mean": "bigram→Bayes gap closed, positions 1..T-1",
                "gap_closed_last": "bigram→Bayes gap closed, last token", "held_out_ppl": "held-out perplexity"}[key]
        ax.set(xscale="log", xlabel="training tokens" if x == "tokens" else "training seconds (eval excluded)",
               ylabel=what, title=f"{'random language' if task == 'rlm' else 'default text corpus'}: {what}")
        if key == "held_out_ppl":
            ax.set_yscale("log")
        else:
            ax.axhline(1.0, color="k", lw=0.8, ls=":")
            ax.axhline(0.0, color="k", lw=0.8, ls=":")
            lowest = min((y for line in ax.get_lines() for y in line.get_ydata()), default=0.0)
            # the first points lie far below a bigram model (down to -3 or -5): below -1 they would squash the range
            # where the variants differ, so they run off the bottom
            ax.set_ylim(max(-1.0, min(-0.05, lowest - 0.05)), 1.05)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize="small")
    fig.suptitle(f"RAT ablation ({record['device']}, {record['date']}): mean over seeds, band = min..max", y=0.995)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench/results/rat_ablation.json", help="JSON file (the PNG goes next to it)")
    p.add_argument("--plot", default=None, help="PNG path (default: --out with .png)")
    p.add_argument("--plot_only", default=None, metavar="JSON", help="only write the PNG of an existing JSON")
    p.add_argument("--smoke", action="store_true", help="tiny models and grammar on the CPU: the script end to end")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ", ".join(VARIANTS))
    p.add_argument("--tasks", default="rlm,text")
    # shape (same for every variant)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=1024, help="SwiGLU width (RatConfig's default 4d rounded)")
    p.add_argument("--policies", type=int, default=3, help="n_policies of the RAT variants (RatConfig's default)")
    # optimisation
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight_decay", type=float, default=0.01)
    p.add_argument("--eval_points", type=int, default=14)
    p.add_argument("--eval_batch", type=int, default=512)
    # random language
    p.add_argument("--rlm_vocab", type=int, default=64)
    p.add_argument("--rlm_depth", type=int, default=6)
    p.add_argument("--rlm_beta", type=float, default=2.5)
    p.add_argument("--grammar_seed", type=int, default=0)
    p.add_argument("--rlm_batch", type=int, default=512, help="sequences per step")
    p.add_argument("--test_sequences", type=int, default=2048)
    p.add_argument("--seeds", type=int, default=3, help="seeds of the random-language runs")
    p.add_argument("--rlm_tokens", type=int, default=0, help="training tokens per run; 0: from --rlm_seconds")
    p.add_argument("--rlm_seconds", type=float, default=270.0, help="training time for all random-language runs")
    # text
    p.add_argument("--text_seeds", type=int, default=1)
    p.add_argument("--text_seq", type=int, default=128)
    p.add_argument("--text_batch", type=int, default=32)
    p.add_argument("--text_max_docs", type=int, default=None)
    p.add_argument("--bpe_vocab", type=int, default=4096)
    p.add_argument("--text_tokens", type=int, default=0, help="training tokens per run; 0: from --text_seconds")
    p.add_argument("--text_epochs", type=float, default=3.0, help="at most this many epochs when planned by time")
    p.add_argument("--text_seconds", type=float, default=80.0, help="training time for all text runs")
    # planning
    p.add_argument("--min_steps", type=int, default=50)
    p.add_argument("--max_steps", type=int, default=4000)
    p.add_argument("--probe_warmup", type=int, default=3)
    p.add_argument("--probe_steps", type=int, default=6)
    p.add_argument("--time_budget_s", type=float, default=430.0,
                   help="start no run whose estimated end lies past this many seconds from the start")
    a = p.parse_args(argv)
    if a.smoke:
        a.device = "cpu"
        a.hidden, a.layers, a.heads, a.intermediate, a.policies = 32, 2, 2, 64, 3
        a.rlm_vocab, a.rlm_depth, a.rlm_beta, a.rlm_batch, a.test_sequences, a.seeds = 8, 4, 2.5, 16, 64, 2
        a.text_max_docs, a.bpe_vocab, a.text_seq, a.text_batch = 300, 300, 32, 8
        a.min_steps = a.max_steps = 8  # the probe and planner run; the step count is fixed
        a.lr, a.eval_points, a.probe_warmup, a.probe_steps, a.eval_batch = 1e-2, 3, 1, 1, 64
    unknown = sorted(set(a.variants.split(",")) - set(VARIANTS))
    if unknown:
        p.error(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    bad_tasks = sorted(set(a.tasks.split(",")) - {"rlm", "text"})
    if bad_tasks:
        p.error(f"--tasks: unknown {', '.join(bad_tasks)}; choose from rlm, text")
    return a


def main(argv=None) -> dict:
    a = parse_args(argv)
    command = " ".join(["python", *(sys.argv if argv is None else [__file__, *argv])])
    if os.environ.get("OUT"):  # the device's output folder, written as the variable (the RESULTS.md convention)
        command = command.replace(os.environ["OUT"], "$OUT")
    png = a.plot or os.path.splitext(a.plot_only or a.out)[0] + ".png"
    if a.plot_only:
        with open(a.plot_only) as f:
            plot(json.load(f), png)
        print(f"wrote {png}")
        return {}
    t_start = time.perf_counter()
    torch.backends.cuda.matmul.allow_tf32 = True
    variants = a.variants.split(",")
    for v in variants:  # refuse a variant this rat_hf cannot build before any time is spent
        if VARIANTS[v] is not None:
            rat_config(v, a, 64, 64)
    device = torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu"
    record = dict(device=device, date=datetime.date.today().isoformat(), command=command, torch=torch.__version__,
                  transformers=__import__("transformers").__version__, args=vars(a), meta={}, plan={}, rows=[],
                  curves=[], skipped=[], failed=[])

    def fail(task: str, variant: str, seed, err: Exception) -> None:
        traceback.print_exc()
        record["failed"].append({"task": task, "variant": variant, "seed": seed,
                                 "error": f"{type(err).__name__}: {err}"})
        if torch.device(a.device).type == "cuda":
            torch.cuda.empty_cache()

    def save():
        record["summary"] = summarise(record["rows"], record["curves"]) if record["rows"] else {}
        record["table_md"] = table_md(record["summary"]) if record["rows"] else ""
        record["total_s"] = round(time.perf_counter() - t_start, 1)
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(record, f, indent=1)

    probed = []
    for name in a.tasks.split(","):
        try:
            task = RLMTask(a, a.device) if name == "rlm" else TextTask(a, a.device)
        except Exception as err:  # e.g. no stdlib docs on the machine: the other task still runs; recorded, exit 1
            fail(name, None, None, err)
            continue
        record["meta"][name] = task.meta
        print(f"[{name}] {json.dumps(task.meta)}", flush=True)
        step_s = {}
        for v in variants:
            try:
                step_s.update(probe(task, [v], a, a.device))
            except Exception as err:  # the variant is left out of this task's runs; recorded, exit 1
                fail(name, v, None, err)
        if step_s:
            probed.append((task, step_s))
    if not probed:
        raise SystemExit(f"nothing to run: {record['failed']}")
    # the training seconds asked for, shrunk to what the budget has left after the set-up (10 s for the end); a task
    # that needs less (the text runs stop at --text_epochs) hands the rest to the random language
    asked = {"rlm": a.rlm_seconds, "text": a.text_seconds}
    left = a.time_budget_s - (time.perf_counter() - t_start) - 10.0
    scale = min(1.0, max(0.0, left) / sum(asked[t.name] for t, _ in probed))
    seconds = {t.name: scale * asked[t.name] for t, _ in probed}
    plans = {}
    for task, step_s in sorted(probed, key=lambda p: p[0].name != "text"):  # text first: its leftover goes on
        seeds = a.seeds if task.name == "rlm" else a.text_seeds
        steps = plan_steps(step_s, seconds[task.name], seeds, task.batch * task.max_pos,
                           a.rlm_tokens if task.name == "rlm" else a.text_tokens, a.min_steps, a.max_steps)
        if task.max_steps is not None and steps > task.max_steps and a.text_tokens <= 0:
            steps = max(a.min_steps, task.max_steps)
            unused = seconds[task.name] - 1.2 * seeds * steps * sum(step_s.values())
            seconds[task.name] -= unused
            seconds["rlm"] = seconds.get("rlm", 0.0) + unused
        plans[task.name] = (task, seeds, steps, step_s)
        record["plan"][task.name] = {"probe_step_s": step_s, "seconds": round(seconds[task.name], 1),
                                     "steps": steps, "seeds": seeds,
                                     "tokens_per_run": steps * task.batch * task.max_pos}
        print(f"[{task.name}] probe s/step {json.dumps({k: round(v, 4) for k, v in step_s.items()})} -> {steps} steps "
              f"x {task.batch * task.max_pos} tokens per run", flush=True)
    tasks = [plans[t.name] for t, _ in probed]  # run in the order asked

    for task, seeds, steps, step_s in tasks:
        for seed in range(seeds):
            batch_fn = task.batches(seed, steps)
            for v in variants:
                estimate = 1.2 * steps * step_s[v] + 2.0
                elapsed = time.perf_counter() - t_start
                if elapsed + estimate > a.time_budget_s:
                    record["skipped"].append({"task": task.name, "variant": v, "seed": seed,
                                              "why": f"estimated end {elapsed + estimate:.0f} s > budget"})
                    print(f"[{task.name}] skip {v} seed {seed}: {elapsed:.0f} s + ~{estimate:.0f} s > "
                          f"{a.time_budget_s:.0f} s", flush=True)
                    continue
                if v not in step_s:  # its probe failed (recorded under `failed`)
                    continue
                try:
                    model = build(v, a, task.vocab, task.max_pos, seed, a.device)
                    curve, final = train(model, batch_fn, steps, task.evaluate, a, a.device)
                except Exception as err:  # one broken variant must not lose the others' runs: recorded, exit 1
                    fail(task.name, v, seed, err)
                    continue
                row = {"task": task.name, "variant": v, "seed": seed, "params": model.num_parameters(),
                       "steps": steps, "tokens": final["tokens"], "wall_s": final["wall_s"],
                       "tokens_per_s": round(final["tokens"] / final["wall_s"]),
                       **{k: val for k, val in final.items() if k not in ("step", "tokens", "wall_s")}}
                record["rows"].append(row)
                record["curves"].append({"task": task.name, "variant": v, "seed": seed, "points": curve})
                print(json.dumps({k: round(val, 4) if isinstance(val, float) else val for k, val in row.items()}),
                      flush=True)
                del model
                gc.collect()
                if torch.device(a.device).type == "cuda":
                    torch.cuda.empty_cache()
                save()
            del batch_fn
    save()
    print("\n" + record["table_md"])
    try:
        plot(record, png)
        print(f"wrote {a.out} and {png}")
    except ImportError as err:  # no matplotlib on the machine: `--plot_only` makes the PNG elsewhere
        print(f"wrote {a.out}; no PNG ({err}): run with --plot_only {a.out}")
    if record["failed"]:
        raise SystemExit(f"{len(record['failed'])} run(s) failed (see 'failed' in {a.out}): "
                         + "; ".join(f"{f['task']} {f['variant']} seed {f['seed']}: {f['error']}"
                                     for f in record["failed"]))
    return record


if __name__ == "__main__":
    main()
