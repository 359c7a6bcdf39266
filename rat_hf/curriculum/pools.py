"""Pools of key/value pairs for the attention-guided curriculum, and the batches the trainer consumes.

A *pool* is what one episode orders: a prompt and `N` (key, value) pairs, each value marked scored or not. A source
draws pools from its own `random.Random` (so a checkpoint that saves that generator resumes the data exactly):

* `DefineRecallPools` — the task where order matters by construction: each pool draws fresh symbols with random
  codes and holds `define <sym> -> code` and `recall <sym> -> code` pairs; only recalls are scored, so a recall is
  predictable only when its definition came first. A random order puts the definition first half of the time.
* `KVPairPools` — consecutive (key, value) spans of articles (`split_into_kv_pairs`): the offline stdlib-docs corpus
  by default, Wikipedia (or any text dataset, local files included) through `load_dataset`.
* `TwentyQuestionsPools` — the Twenty-Questions game: the secret is the prompt, each (question, answer) a pair.

`collate(pools)` pads every pool of a batch to the same widths: keys on the left (a key's last token, whose key
vector the policy reads, sits at a fixed position), values on the right; padding is masked out of attention and
reward. Token lengths are therefore uniform across rows and every step's context has the same length.
"""

import random

import torch


def _pair(key_ids, value_ids, scored=True, **meta) -> dict:
    return {"key_ids": list(key_ids), "value_ids": list(value_ids), "scored": bool(scored), **meta}


class DefineRecallPools:
    """Define-before-recall pools over a synthetic vocabulary (token ids, no tokenizer needed).

    Vocabulary: `<pad> <bos> define recall`, `num_symbols` symbol tokens `S0..`, `num_codes` code tokens `c0..`.
    A pool: prompt `<bos>`; for each of `symbols_per_pool` distinct symbols with a random `code_tokens`-long code,
    the pairs (`define S`, code) [not scored] and (`recall S`, code) [scored].
    """

    PAD, BOS, DEFINE, RECALL = 0, 1, 2, 3

    def __init__(self, symbols_per_pool: int = 3, num_symbols: int = 16, num_codes: int = 16, code_tokens: int = 1):
        if not 1 <= symbols_per_pool <= num_symbols:
            raise ValueError(f"symbols_per_pool must be in 1..num_symbols={num_symbols}, got {symbols_per_pool}")
        if num_codes < 2 or code_tokens < 1:
            raise ValueError(f"need num_codes >= 2 and code_tokens >= 1, got {num_codes} and {code_tokens}")
        self.symbols_per_pool, self.num_symbols, self.num_codes = symbols_per_pool, num_symbols, num_codes
        self.code_tokens = code_tokens
        self.vocab = (["<pad>", "<bos>", "define", "recall"] + [f"S{i}" for i in range(num_symbols)]
                      + [f"c{i}" for i in range(num_codes)])
        self.pad_token_id = self.PAD

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def sample(self, rng: random.Random, n: int) -> list:
        pools = []
        for _ in range(n):
            symbols = rng.sample(range(self.num_symbols), self.symbols_per_pool)
            pairs = []
            for s in symbols:
                code = [4 + self.num_symbols + rng.randrange(self.num_codes) for _ in range(self.code_tokens)]
                sym = 4 + s
                pairs += [_pair([self.DEFINE, sym], code, False, kind="define", symbol=s),
                          _pair([self.RECALL, sym], code, True, kind="recall", symbol=s)]
            rng.shuffle(pairs)  # the pool's listing order carries no hint
            pools.append({"prompt_ids": [self.BOS], "pairs": pairs})
        return pools

    @staticmethod
    def order_metrics(pools: list, orders: torch.Tensor) -> dict:
        """`define_before_recall`: fraction of recalls whose definition came earlier in the chosen order."""
        hits = total = 0
        for pool, order in zip(pools, orders.tolist()):
            seen = set()
            for j in order:
                pair = pool["pairs"][j]
                if pair["kind"] == "define":
                    seen.add(pair["symbol"])
                else:
                    hits += pair["symbol"] in seen
                    total += 1
        return {"define_before_recall": hits / max(total, 1)}



class KVPairPools:
    """Windows of `pairs_per_pool` consecutive (key, value) spans of one article; every value scored."""

    def __init__(self, texts, tokenizer, key_tokens: int = 8, value_tokens: int = 8, pairs_per_pool: int = 4,
                 max_articles: int | None = None):
        from rat_hf.data import split_into_kv_pairs

        self.articles = []
        for text in texts:
            pairs = split_into_kv_pairs(text or "", tokenizer, key_tokens, value_tokens)
            if len(pairs) >= pairs_per_pool:
                self.articles.append([_pair(p["key_ids"], p["value_ids"]) for p in pairs])
            if max_articles is not None and len(self.articles) >= max_articles:
                break
        if not self.articles:
            raise ValueError(f"no article has {pairs_per_pool} (key, value) pairs of {key_tokens}+{value_tokens} "
                             "tokens: use shorter spans, fewer pairs per pool, or longer texts")
        self.pairs_per_pool = pairs_per_pool
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if bos is None:
            raise ValueError("the tokenizer has neither a bos nor an eos token to start each pool with")
        self.prompt_ids = [bos]
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else bos

    def sample(self, rng: random.Random, n: int) -> list:
        pools = []
        for _ in range(n):
            pairs = rng.choice(self.articles)
            start = rng.randrange(len(pairs) - self.pairs_per_pool + 1)
            pools.append({"prompt_ids": list(self.prompt_ids), "pairs": pairs[start:start + self.pairs_per_pool]})
        return pools


class TwentyQuestionsPools:
    """Twenty-Questions games (answerer role): the secret is the prompt, (question, answer) turns are the pairs.

    Each pool keeps the first `pairs_per_pool` turns of a game (shorter games are redrawn); answers are scored.
    """

    def __init__(self, tokenizer, pairs_per_pool: int = 4, num_games: int = 200, seed: int = 0):
        from rat_hf.data import twenty_questions_dataset

        games = [g for g in twenty_questions_dataset(num_games, seed=seed) if len(g["interactions"]) >= pairs_per_pool]
        if not games:
            raise ValueError(f"no Twenty-Questions game has {pairs_per_pool} turns; lower pairs_per_pool")
        enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
        self.games = [{"prompt_ids": enc(g["query"]),
                       "pairs": [_pair(enc(t["query"]), enc(" " + t["answer"])) for t in g["interactions"]]}
                      for g in games]
        self.pairs_per_pool = pairs_per_pool
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token to pad questions and answers with")
        self.pad_token_id = pad

    def sample(self, rng: random.Random, n: int) -> list:
        return [{"prompt_ids": g["prompt_ids"], "pairs": g["pairs"][: self.pairs_per_pool]}
                for g in (rng.choice(self.games) for _ in range(n))]


def collate(pools: list, pad_token_id: int = 0) -> dict:
    """Pad a list of pools (same number of pairs) into tensors.

    Returns prompt_ids/prompt_mask `[P, Lp]` (left-padded), key_ids/key_mask `[P, N, Lk]` (left-padded),
    value_ids/value_mask `[P, N, Lv]` (right-padded), scored `[P, N]`.
    """
    n = {len(p["pairs"]) for p in pools}
    if len(n) != 1:
        raise ValueError(f"every pool of a batch must hold the same number of pairs, got {sorted(n)}")
    lp = max(len(p["prompt_ids"]) for p in pools)
    lk = max(len(q["key_ids"]) for p in pools for q in p["pairs"])
    lv = max(len(q["value_ids"]) for p in pools for q in p["pairs"])
    if lp == 0 or lk == 0 or lv == 0:
        raise ValueError("prompts, keys and values need at least one token each")

    def pad(seq, width, left):
        fill = [pad_token_id] * (width - len(seq))
        mask = [0] * len(fill)
        return (fill + list(seq), mask + [1] * len(seq)) if left else (list(seq) + fill, [1] * len(seq) + mask)

    out = {"prompt_ids": [], "prompt_mask": [], "key_ids": [], "key_mask": [], "value_ids": [], "value_mask": [],
           "scored": []}
    for p in pools:
        ids, mask = pad(p["prompt_ids"], lp, True)
        out["prompt_ids"].append(ids)
        out["prompt_mask"].append(mask)
        keys = [pad(q["key_ids"], lk, True) for q in p["pairs"]]
        values = [pad(q["value_ids"], lv, False) for q in p["pairs"]]
        out["key_ids"].append([k for k, _ in keys])
        out["key_mask"].append([m for _, m in keys])
        out["value_ids"].append([v for v, _ in values])
        out["value_mask"].append([m for _, m in values])
        out["scored"].append([q["scored"] for q in p["pairs"]])
    return {k: torch.tensor(v, dtype=torch.bool if k == "scored" else torch.long) for k, v in out.items()}


def random_orders(num_rows: int, num_pairs: int, generator: torch.Generator) -> torch.Tensor:
    """`[num_rows, num_pairs]` independent uniform permutations (the random-order baseline)."""
    return torch.argsort(torch.rand(num_rows, num_pairs, generator=generator), dim=-1)

