"""Random Language Model: leaves of a random binary grammar, with the exact Bayes-optimal next-token loss.

A tree of `depth` levels is grown from a root symbol drawn from `prior` (uniform by default). Every internal node with
symbol i emits its ordered pair of children (j, k) with probability `rules[i, j, k]`, where for each i the V*V numbers
are `softmax(beta * sqrt(log V) * z)` with `z ~ N(0, 1)` drawn from `seed`. The 2**depth leaves are the sequence.
Small `beta` gives nearly uniform rules (little structure), large `beta` nearly deterministic ones.

The loss a perfect causal LM reaches on this language is not a bigram entropy: it is the mean over positions of
-log P(x_t | x_<t) under the grammar itself, which sees the whole prefix. `next_token_log_probs` computes those
conditionals exactly by message passing on the (fixed-shape) tree:

* inside messages I_n[s] = P(leaves under n | n = s), bottom-up; needed only for subtrees that lie wholly in the
  prefix, i.e. left children;
* outside messages O_n[s] = P(observed leaves left of n's subtree, n = s), top-down with everything to the right of
  the prefix summed out (it sums to one): for a left child O_L = O_p @ rules.sum(k); for a right child
  O_R[k] = sum_{s,j} O_p[s] I_L[j] rules[s, j, k] (its left sibling is fully observed).

At leaf t, O_t[v] = P(x_<t, x_t = v), so the conditional is O_t / O_t.sum(). Every message is renormalised (the
scale cancels in that ratio), so nothing underflows at any depth. Cost: two contractions of V**3 per internal node
and sequence, i.e. about 4 * n * 2**depth * V**3 flops, batched over sequences and over all nodes of a level
(float64); memory is chunk * 2**(depth-1) * V**2 numbers for the largest level. Measured: 1,000 sequences of V=32,
depth=5 take 0.7-0.9 s on one CPU core (bound: 10 s); depth=10 costs 32x more per sequence.
"""

import math

import torch

from ._checks import check_int

# Sequences are processed in chunks so the largest intermediate ([chunk, 2**(depth-1), V*V] float64) stays bounded:
# 256 sequences * 16 nodes * 1024 * 8 bytes = 32 MiB at V=32, depth=5.
_CHUNK = 256


def _mean_stderr(per_sequence: torch.Tensor) -> tuple[float, float]:
    """(mean, standard error of the mean) over independent sequences `[n]`."""
    return float(per_sequence.mean()), float(per_sequence.std() / math.sqrt(per_sequence.shape[0]))


class RandomLanguageModel:
    """Random binary grammar of `vocab_size` symbols; sequences are the 2**depth leaves of a full tree."""

    def __init__(self, vocab_size: int, depth: int, beta: float, seed: int = 0, prior=None):
        check_int("vocab_size", vocab_size, 2)
        check_int("depth", depth, 1)
        if not math.isfinite(beta) or beta < 0:
            raise ValueError(f"beta must be a finite number >= 0, got {beta!r}")
        self.vocab_size, self.depth, self.beta, self.seed = vocab_size, depth, float(beta), int(seed)
        self.seq_len = 2**depth
        V = vocab_size
        gen = torch.Generator().manual_seed(self.seed)
        z = torch.randn(V, V * V, generator=gen, dtype=torch.float64)  # [V, V*V]
        self.rules = torch.softmax(self.beta * math.sqrt(math.log(V)) * z, dim=-1).view(V, V, V)  # [V, V, V]
        if prior is None:
            self.prior = torch.full((V,), 1.0 / V, dtype=torch.float64)  # [V]
        else:
            p = torch.as_tensor(prior, dtype=torch.float64).flatten()
            if p.numel() != V or (p < 0).any() or not math.isclose(float(p.sum()), 1.0, abs_tol=1e-6):
                raise ValueError(f"prior must be {V} non-negative numbers summing to 1, got {prior!r}")
            self.prior = p / p.sum()
        # Derived matrices used by the message passing.
        self._left = self.rules.sum(dim=2)  # [V(parent), V(left child)]: P(left = j | parent)
        self._pairs = self.rules.reshape(V, V * V)  # [V, V*V]: parent -> (left, right) pair
        # Sampling draws the left child, then the right one given it, by inverse CDF: gathering V-sized rows is
        # ~10x faster than torch.multinomial over V*V pairs.
        self._left_cdf = self._left.cumsum(-1)  # [V, V]
        self._right_cdf = (self.rules / self._left.clamp_min(1e-300)[..., None]).cumsum(-1)  # [V, V, V]

    def __repr__(self) -> str:
        return (f"RandomLanguageModel(vocab_size={self.vocab_size}, depth={self.depth}, beta={self.beta}, "
                f"seed={self.seed})")

    # --- sampling ----------------------------------------------------------------------------------------------
    def sample(self, n: int, seed=None) -> torch.LongTensor:
        """Draw `n` sequences; returns [n, 2**depth]. `seed=None` uses torch's global generator."""
        check_int("n", n, 0)
        gen = None if seed is None else torch.Generator().manual_seed(int(seed))
        V = self.vocab_size

        def draw(cdf):  # cdf [..., V] -> one symbol per row [...]
            u = torch.rand(*cdf.shape[:-1], 1, generator=gen, dtype=torch.float64)
            return torch.searchsorted(cdf, u).squeeze(-1).clamp_(max=V - 1)  # clamp: cdf[-1] may round below u

        nodes = draw(self.prior.cumsum(0).repeat(n, 1, 1))  # [n, 1]: root symbols
        for level in range(self.depth):
            left = draw(self._left_cdf[nodes])  # [n, 2**level]
            right = draw(self._right_cdf[nodes, left])  # [n, 2**level]
            nodes = torch.stack([left, right], dim=-1).view(n, 2 ** (level + 1))  # [n, 2**(level+1)]
        return nodes

    # --- exact conditionals ------------------------------------------------------------------------------------
    def _check_sequences(self, sequences) -> torch.LongTensor:
        x = torch.as_tensor(sequences)
        if x.dim() == 1:
            x = x.unsqueeze(0)
        if x.dim() != 2 or x.shape[1] != self.seq_len:
            raise ValueError(f"sequences must have shape [n, {self.seq_len}], got {tuple(x.shape)}")
        if x.is_floating_point() or (x.numel() and (x.min() < 0 or x.max() >= self.vocab_size)):
            raise ValueError(f"sequences must hold integer symbols in [0, {self.vocab_size})")
        return x.long()

    def next_token_log_probs(self, sequences) -> torch.Tensor:
        """Exact log P(x_t = v | x_<t) for every position t and symbol v: [n, 2**depth, V] (float64).

        Position 0 holds the marginal of the first leaf. See the module docstring for the algorithm and its cost.
        (Softmax rules make every sequence possible; with a prior that has zeros, a prefix of probability 0 gives
        NaN conditionals after it.)
        """
        x = self._check_sequences(sequences)
        if x.shape[0] == 0:
            return torch.zeros(0, self.seq_len, self.vocab_size, dtype=torch.float64)
        return torch.cat([self._conditionals(chunk) for chunk in x.split(_CHUNK)]).log()

    def _conditionals(self, x: torch.LongTensor) -> torch.Tensor:
        n, V, D = x.shape[0], self.vocab_size, self.depth
        # inside[l]: normalised inside messages of the nodes at level l, [n, 2**l, V]; only left children are used.
        inside = [None] * (D + 1)
        inside[D] = torch.nn.functional.one_hot(x, V).to(torch.float64)  # [n, 2**D, V]
        for level in range(D - 1, 0, -1):  # the root's inside message is never needed
            child = inside[level + 1].view(n, -1, 2, V)  # [n, 2**level, 2, V]
            pair = child[:, :, 0, :, None] * child[:, :, 1, None, :]  # [n, 2**level, V, V]
            msg = pair.flatten(2) @ self._pairs.T  # [n, 2**level, V]
            inside[level] = msg / msg.sum(-1, keepdim=True)
        outside = self.prior.expand(n, 1, V)  # [n, 1, V] at the root
        for level in range(D):
            left = outside @ self._left  # [n, 2**level, V]: message to each left child
            # Right child: sum_{s,j} O_p[s] I_L[j] rules[s, j, k] = ((O_p @ pairs) viewed [V, V]) contracted with I_L.
            t = (outside @ self._pairs).view(n, -1, V, V)  # [n, 2**level, V(left), V(right)]
            right = (inside[level + 1].view(n, -1, 2, V)[:, :, 0, :, None] * t).sum(-2)  # [n, 2**level, V]
            outside = torch.stack([left, right], dim=2).view(n, -1, V)  # [n, 2**(level+1), V]
            outside = outside / outside.sum(-1, keepdim=True)
        return outside  # [n, 2**D, V]: P(x_t = v | x_<t)

    def token_nll(self, sequences) -> torch.Tensor:
        """Exact -log P(x_t | x_<t) of every token: [n, T] (float64; position 0 is the first token's marginal)."""
        x = self._check_sequences(sequences)
        return -self.next_token_log_probs(x).gather(-1, x.unsqueeze(-1)).squeeze(-1)

    def log_prob(self, sequences) -> torch.Tensor:
        """Exact log P(x) of whole sequences: [n] (float64)."""
        return -self.token_nll(sequences).sum(-1)

    # --- optimal loss ------------------------------------------------------------------------------------------
    def _sampled_nll(self, num_samples: int, seed: int) -> torch.Tensor:
        check_int("num_samples", num_samples, 2)
        return self.token_nll(self.sample(num_samples, seed=seed))  # [n, T]

    def optimal_loss(self, num_samples: int = 2000, seed: int = 12345, start: int = 0) -> tuple:
        """Bayes-optimal mean next-token loss in nats/token over positions `start`..T-1: (mean, standard error).

        Exact per-sequence log-probabilities of fresh samples, averaged; the error bar is the spread of the
        per-sequence mean over independent sequences. `start=0` includes position 0, the first token's marginal,
        which no causal LM is scored on: compare a causal LM's loss (labels shifted by one) with `start=1`, the
        optimum over positions 1..T-1. `start=-1` is the last position alone (the RLM seed's task).
        """
        return _mean_stderr(self._sampled_nll(num_samples, seed)[:, self._positions(start)].mean(-1))

    def optimal_losses(self, num_samples: int = 2000, seed: int = 12345) -> dict:
        """The optima a causal LM is compared with, from one set of samples (each as mean and standard error).

        `optimal_loss`: positions 1..T-1, the positions a causal LM's shifted loss covers (compare its `eval_loss`
        with this); `optimal_last_loss`: the last position alone (the RLM seed's task). Equal to
        `optimal_loss(start=1)` and `optimal_loss(start=-1)` with the same arguments, at half the cost.
        """
        nll = self._sampled_nll(num_samples, seed)  # [n, T]
        out = {}
        for name, start in (("optimal_loss", 1), ("optimal_last_loss", -1)):
            out[name], out[f"{name}_stderr"] = _mean_stderr(nll[:, self._positions(start)].mean(-1))
        return out

    def _positions(self, start) -> slice:
        if isinstance(start, bool) or not isinstance(start, int) or not -self.seq_len <= start < self.seq_len:
            raise ValueError(f"start must be an integer in [-{self.seq_len}, {self.seq_len}) (a position of the "
                             f"{self.seq_len}-token sequence), got {start!r}")
        return slice(start % self.seq_len, None)

    def optimal_loss_per_position(self, num_samples: int = 2000, seed: int = 12345) -> tuple:
        """Bayes-optimal loss at every position: (mean [T], standard error [T]) as float64 tensors."""
        nll = self._sampled_nll(num_samples, seed)  # [n, T]
        return nll.mean(0), nll.std(0) / math.sqrt(nll.shape[0])

    # --- datasets ----------------------------------------------------------------------------------------------
    def dataset(self, n: int, seed: int = 0):
        """A `datasets.Dataset` of `n` sampled sequences (column `input_ids`)."""
        from datasets import Dataset

        return Dataset.from_dict({"input_ids": self.sample(n, seed=seed).tolist()})

    def stream(self, seed: int = 0, chunk_size: int = 256) -> "RLMStream":
        """An infinite `torch.utils.data.IterableDataset` of fresh sequences (the online regime)."""
        return RLMStream(self, seed=seed, chunk_size=chunk_size)


class RLMStream(torch.utils.data.IterableDataset):
    """Endless fresh samples from a `RandomLanguageModel`: every training step sees sequences never seen before.

    Yields `{"input_ids": LongTensor[T], "labels": LongTensor[T]}` (labels equal inputs; the model shifts them), so
    `Trainer` needs no collator beyond the default. Use it with `TrainingArguments(max_steps=...)`, as the stream has
    no length. Deterministic for a given seed: each DataLoader worker draws from its own seed (seed, worker id, k).
    """

    def __init__(self, rlm: RandomLanguageModel, seed: int = 0, chunk_size: int = 256):
        check_int("chunk_size", chunk_size, 1)
        self.rlm, self.seed, self.chunk_size = rlm, int(seed), chunk_size

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        k = 0
        while True:
            # Distinct, reproducible seeds per (worker, chunk): sampling in chunks keeps the per-row cost low.
            chunk = self.rlm.sample(self.chunk_size, seed=hash((self.seed, worker, num_workers, k)) & (2**62 - 1))
            for row in chunk:
                yield {"input_ids": row, "labels": row.clone()}
            k += 1
