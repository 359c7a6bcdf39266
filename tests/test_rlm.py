"""Random Language Model: exact conditionals against brute-force enumeration, sampler against `.rules`."""

import itertools
import math
import time
from types import SimpleNamespace

import pytest
import torch

from rat_hf.data import RandomLanguageModel, RLMStream


def enumerate_leaf_distribution(rlm: RandomLanguageModel) -> dict:
    """P(leaves) by summing the joint over every assignment of every node (heap order: root 1, children 2i, 2i+1)."""
    V, T = rlm.vocab_size, rlm.seq_len
    nodes = torch.tensor(list(itertools.product(range(V), repeat=2 * T - 1)))  # [V**(2T-1), 2T-1], column i-1 = node i
    p = rlm.prior[nodes[:, 0]].clone()
    for i in range(1, T):
        p *= rlm.rules[nodes[:, i - 1], nodes[:, 2 * i - 1], nodes[:, 2 * i]]
    dist = {}
    for leaves, q in zip(map(tuple, nodes[:, T - 1:].tolist()), p.tolist()):
        dist[leaves] = dist.get(leaves, 0.0) + q
    return dist


@pytest.mark.parametrize("V,depth,prior", [(2, 2, [0.3, 0.7]), (3, 2, None), (2, 3, None)])
def test_conditionals_equal_enumeration(V, depth, prior):
    rlm = RandomLanguageModel(V, depth, beta=1.5, seed=7, prior=prior)
    dist = enumerate_leaf_distribution(rlm)
    assert math.isclose(sum(dist.values()), 1.0, abs_tol=1e-12)
    seqs = sorted(dist)
    got = rlm.next_token_log_probs(torch.tensor(seqs)).exp()  # [n, T, V]
    worst = 0.0
    for row, seq in enumerate(seqs):
        for t in range(rlm.seq_len):
            prefix = {s: q for s, q in dist.items() if s[:t] == seq[:t]}
            total = sum(prefix.values())
            for v in range(V):
                exact = sum(q for s, q in prefix.items() if s[t] == v) / total
                worst = max(worst, abs(got[row, t, v].item() - exact))
    assert worst < 1e-12
    # Whole-sequence probabilities too.
    torch.testing.assert_close(rlm.log_prob(torch.tensor(seqs)).exp(), torch.tensor([dist[s] for s in seqs],
                                                                                   dtype=torch.float64))


def test_sampled_pairs_match_rules():
    rlm = RandomLanguageModel(4, 1, beta=1.0, seed=3, prior=[0, 0, 1, 0])  # root is always symbol 2
    x = rlm.sample(100_000, seed=0)  # [n, 2]: the two children of the root
    freq = torch.bincount(x[:, 0] * 4 + x[:, 1], minlength=16).double() / len(x)
    expected = rlm.rules[2].flatten()
    sigma = (expected * (1 - expected) / len(x)).sqrt()
    assert ((freq - expected).abs() <= 5 * sigma + 1e-9).all(), (freq, expected)


def test_deep_samples_match_exact_first_leaf_and_second_given_first():
    rlm = RandomLanguageModel(3, 3, beta=2.0, seed=1)
    x = rlm.sample(60_000, seed=5)
    first = torch.bincount(x[:, 0], minlength=3).double() / len(x)
    torch.testing.assert_close(first, rlm.next_token_log_probs(x[:1])[0, 0].exp(), atol=0.01, rtol=0)
    # P(x_1 | x_0 = 0) from samples vs the exact conditional.
    rows = x[x[:, 0] == 0]
    second = torch.bincount(rows[:, 1], minlength=3).double() / len(rows)
    torch.testing.assert_close(second, rlm.next_token_log_probs(rows[:1])[0, 1].exp(), atol=0.02, rtol=0)


def test_sampling_is_seeded():
    rlm = RandomLanguageModel(8, 3, beta=1.0, seed=0)
    assert torch.equal(rlm.sample(5, seed=1), rlm.sample(5, seed=1))
    assert not torch.equal(rlm.sample(5, seed=1), rlm.sample(5, seed=2))
    assert rlm.sample(0).shape == (0, 8)
    assert not torch.equal(RandomLanguageModel(8, 3, 1.0, seed=1).rules, rlm.rules)
    torch.testing.assert_close(rlm.rules.sum((1, 2)), torch.ones(8, dtype=torch.float64))


def test_optimal_loss_uniform_rules_is_log_v():
    rlm = RandomLanguageModel(5, 3, beta=0.0, seed=0)  # every pair equally likely: nothing to learn
    mean, err = rlm.optimal_loss(num_samples=50, seed=0)
    assert math.isclose(mean, math.log(5), rel_tol=1e-12) and err < 1e-12


def test_optimal_loss_consistent_with_log_prob_and_positions():
    rlm = RandomLanguageModel(6, 3, beta=2.0, seed=4)
    mean, err = rlm.optimal_loss(num_samples=400, seed=9)
    per_seq = -rlm.log_prob(rlm.sample(400, seed=9)) / rlm.seq_len
    assert math.isclose(mean, per_seq.mean().item(), rel_tol=1e-12)
    assert 0 < err < 0.1
    pos_mean, pos_err = rlm.optimal_loss_per_position(num_samples=400, seed=9)
    assert pos_mean.shape == pos_err.shape == (8,)
    assert math.isclose(pos_mean.mean().item(), mean, rel_tol=1e-12)
    # Structure helps: the optimum is below the unconditional entropy log V.
    assert mean < math.log(6)


def oracle_logits(rlm, x):
    """The exact conditional model as a causal LM: logits at t predict token t+1 (the last row predicts nothing)."""
    lp = rlm.next_token_log_probs(x)  # [n, T, V]: log P(x_t = v | x_<t)
    return torch.cat([lp[:, 1:], torch.zeros_like(lp[:, :1])], dim=1)  # [n, T, V]


@pytest.mark.parametrize("beta", [1.0, 2.0])
def test_exact_model_has_zero_gap_to_the_optimum(beta):
    """Compare like with like: a perfect causal LM's loss (positions 1..T-1) minus the optimum is 0, not negative."""
    from rat_hf.recipes.rlm_next_token import _argmax_and_last_nll, _metrics

    rlm = RandomLanguageModel(8, 4, beta=beta, seed=1)
    n, seed = 300, 5
    x = rlm.sample(n, seed=seed)
    logits = oracle_logits(rlm, x)
    lm_loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten()).item()  # as HF

    best = rlm.optimal_losses(num_samples=n, seed=seed)  # what the recipes compare with, on the oracle's samples
    assert lm_loss - best["optimal_loss"] >= -1e-6
    assert lm_loss - best["optimal_loss"] == pytest.approx(0.0, abs=1e-9)
    assert abs(rlm.optimal_loss(num_samples=n, seed=seed)[0] - lm_loss) > 1e-3  # 0..T-1 (the first marginal) is off

    # The recipe's last-position metric on the exact model equals the last-position optimum.
    predictions, last_nll = _argmax_and_last_nll(logits, x)
    metrics = _metrics(SimpleNamespace(predictions=(predictions.numpy(), last_nll.numpy()), label_ids=x.numpy()))
    assert metrics["last_loss"] - best["optimal_last_loss"] == pytest.approx(0.0, abs=1e-6)  # float32 logits
    per_position, _ = rlm.optimal_loss_per_position(num_samples=n, seed=seed)
    assert best["optimal_last_loss"] == pytest.approx(per_position[-1].item(), abs=1e-12)
    assert best["optimal_loss"] == pytest.approx(per_position[1:].mean().item(), abs=1e-12)
    assert (best["optimal_loss"], best["optimal_loss_stderr"]) == rlm.optimal_loss(num_samples=n, seed=seed, start=1)
    assert (best["optimal_last_loss"], best["optimal_last_loss_stderr"]) == rlm.optimal_loss(n, seed, start=-1)


def test_optimal_loss_start_is_checked():
    rlm = RandomLanguageModel(4, 2, beta=1.0)
    assert rlm.optimal_loss(num_samples=20, start=-4) == rlm.optimal_loss(num_samples=20)
    for bad in (4, -5, 1.0, True):
        with pytest.raises(ValueError, match="start must be an integer in"):
            rlm.optimal_loss(num_samples=20, start=bad)


def test_speed_budget_one_core():
    rlm = RandomLanguageModel(32, 5, beta=1.0, seed=0)
    x = rlm.sample(1000, seed=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        lp = rlm.next_token_log_probs(x)
        elapsed = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    assert lp.shape == (1000, 32, 32) and torch.isfinite(lp).all()
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(1000, 32, dtype=torch.float64))
    assert elapsed < 10.0, f"exact conditionals took {elapsed:.2f}s"


def test_deep_tree_does_not_underflow():
    rlm = RandomLanguageModel(4, 9, beta=3.0, seed=0)  # 512 leaves: raw probabilities would be ~1e-300
    lp = rlm.next_token_log_probs(rlm.sample(3, seed=0))
    assert torch.isfinite(lp).all()


def test_bad_inputs_raise():
    rlm = RandomLanguageModel(4, 2, beta=1.0)
    with pytest.raises(ValueError, match="shape"):
        rlm.next_token_log_probs(torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="symbols"):
        rlm.next_token_log_probs(torch.full((1, 4), 4))
    with pytest.raises(ValueError, match="prior"):
        RandomLanguageModel(4, 2, 1.0, prior=[0.5, 0.5])
    with pytest.raises(ValueError, match="depth"):
        RandomLanguageModel(4, 0, 1.0)


def test_dataset_and_stream_train_with_trainer(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    rlm = RandomLanguageModel(8, 3, beta=1.0, seed=0)
    ds = rlm.dataset(10, seed=3)
    assert ds.column_names == ["input_ids"] and len(ds) == 10 and len(ds[0]["input_ids"]) == 8
    assert ds["input_ids"] == rlm.sample(10, seed=3).tolist()

    stream = rlm.stream(seed=0, chunk_size=4)
    assert isinstance(stream, RLMStream)
    first = [row["input_ids"] for _, row in zip(range(10), stream)]
    again = [row["input_ids"] for _, row in zip(range(10), stream)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))  # reproducible
    assert not torch.equal(torch.stack(first[:4]), torch.stack(first[4:8]))  # fresh chunks

    model = GPT2LMHeadModel(GPT2Config(vocab_size=8, n_positions=8, n_embd=16, n_layer=1, n_head=2))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                             report_to="none", use_cpu=True, logging_steps=1, save_strategy="no")
    out = Trainer(model=model, args=args, train_dataset=stream).train()
    assert out.global_step == 3 and math.isfinite(out.training_loss)
