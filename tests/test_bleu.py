"""Batched token-id BLEU (`rat_hf.rewards.bleu`) against a plain-Python sentence BLEU written from the definition
(NLTK's `sentence_bleu`, which is not installed here), on random cases, padding layouts and edge cases."""

import math
import random
from collections import Counter
from fractions import Fraction

import pytest
import torch

from rat_hf.rewards.bleu import SMOOTHING, bleu_score, pad_token_ids


def reference_bleu(candidate, references, max_n=4, smoothing="floor", epsilon=0.1, k=1, weights=None):
    """Sentence BLEU as NLTK computes it: modified precisions as fractions, the closest reference length, then the
    Chen & Cherry smoothing methods 0-3."""
    weights = weights or [1 / max_n] * max_n
    precisions = []
    for n in range(1, max_n + 1):
        grams = Counter(tuple(candidate[i:i + n]) for i in range(len(candidate) - n + 1))
        best = Counter()
        for ref in references:
            for gram, count in Counter(tuple(ref[i:i + n]) for i in range(len(ref) - n + 1)).items():
                best[gram] = max(best[gram], count)
        matches = sum(min(count, best[gram]) for gram, count in grams.items())
        precisions.append((matches, max(1, sum(grams.values()))))
    c = len(candidate)
    if c == 0 or precisions[0][0] == 0:
        return 0.0
    r = min((abs(len(ref) - c), len(ref)) for ref in references)[1]
    brevity = 1.0 if c > r else math.exp(1 - r / c)
    values, zeros = [], 0
    for i, (num, den) in enumerate(precisions):
        if smoothing == "floor" and num == 0:
            values.append(epsilon / den)
        elif smoothing == "add-k" and i > 0:
            values.append(Fraction(num + k, den + k))
        elif smoothing == "exp" and num == 0:
            zeros += 1
            values.append(1 / (2**zeros * den))
        else:
            values.append(Fraction(num, den))
    if any(v == 0 for v in values):
        return 0.0
    return brevity * math.exp(sum(w * math.log(v) for w, v in zip(weights, values)))


def random_case(rng, vocab):
    """A candidate and 1-3 references that share some tokens (so higher orders match sometimes)."""
    ref = [rng.randrange(vocab) for _ in range(rng.randint(0, 12))]
    candidate = list(ref)
    for _ in range(rng.randint(0, 6)):  # edit the reference: replace, delete, insert
        op = rng.random()
        if candidate and op < 0.4:
            candidate[rng.randrange(len(candidate))] = rng.randrange(vocab)
        elif candidate and op < 0.7:
            del candidate[rng.randrange(len(candidate))]
        else:
            candidate.insert(rng.randint(0, len(candidate)), rng.randrange(vocab))
    others = [[rng.randrange(vocab) for _ in range(rng.randint(1, 10))] for _ in range(rng.randint(0, 2))]
    return candidate, [ref, *others]


@pytest.mark.parametrize("smoothing", SMOOTHING)
@pytest.mark.parametrize("max_n", [1, 2, 4])
def test_matches_the_reference_on_random_cases(smoothing, max_n):
    rng = random.Random(max_n * 10 + SMOOTHING.index(smoothing))
    for vocab in (3, 6, 50):  # small vocabularies repeat n-grams, which exercises the clipping
        cases = [random_case(rng, vocab) for _ in range(40)]
        R = max(len(refs) for _, refs in cases)
        cand, cand_mask = pad_token_ids([c for c, _ in cases])
        width = max(len(r) for _, refs in cases for r in refs)
        refs = torch.zeros(len(cases), R, max(width, 1), dtype=torch.long)
        ref_mask = torch.zeros_like(refs, dtype=torch.bool)
        for i, (_, rows) in enumerate(cases):
            for j, row in enumerate(rows + rows[:1] * (R - len(rows))):  # fill spare slots with a repeated reference
                refs[i, j, : len(row)] = torch.tensor(row, dtype=torch.long)
                ref_mask[i, j, : len(row)] = True
        got = bleu_score(cand, refs, cand_mask, ref_mask, max_n=max_n, smoothing=smoothing)
        want = torch.tensor([reference_bleu(c, r, max_n, smoothing) for c, r in cases])
        torch.testing.assert_close(got, want.float(), atol=1e-6, rtol=1e-5)
        assert (want > 0).float().mean() > 0.3  # the cases are not all trivially zero


def test_identical_is_one_and_disjoint_is_zero():
    ids = torch.tensor([[5, 6, 7, 8, 9], [1, 2, 3, 4, 5]])
    assert bleu_score(ids, ids).tolist() == [1.0, 1.0]
    assert bleu_score(ids, ids + 20).tolist() == [0.0, 0.0]


def test_padding_position_and_value_do_not_matter():
    """Masked positions never form n-grams: the same tokens right-padded, left-padded or padded with a token that
    also occurs in the text give the same score."""
    rng = random.Random(0)
    cases = [random_case(rng, 8) for _ in range(20)]
    cands, refs = [c for c, _ in cases], [r[0] for _, r in cases]
    scores = []
    for pad_id in (0, 3):
        for left in (False, True):
            c_ids, c_mask = pad_token_ids(cands, pad_id=pad_id)
            r_ids, r_mask = pad_token_ids(refs, pad_id=pad_id)
            if left:
                c_ids, c_mask = _left(c_ids, c_mask), _left(c_mask, c_mask)
                r_ids, r_mask = _left(r_ids, r_mask), _left(r_mask, r_mask)
            scores.append(bleu_score(c_ids, r_ids, c_mask, r_mask, max_n=3))
    for s in scores[1:]:
        torch.testing.assert_close(s, scores[0])
    want = torch.tensor([reference_bleu(c, [r], 3) for c, r in zip(cands, refs)]).float()
    torch.testing.assert_close(scores[0], want, atol=1e-6, rtol=1e-5)


def _left(values, mask):
    """Move each row's masked-in entries to the right end (left padding)."""
    out = torch.zeros_like(values)
    for i, row in enumerate(mask):
        n = int(row.sum())
        if n:
            out[i, -n:] = values[i, row.bool()]
    return out


def test_edge_cases():
    empty = torch.zeros(1, 3, dtype=torch.long)
    none = torch.zeros(1, 3, dtype=torch.bool)
    ref = torch.tensor([[4, 5, 6]])
    assert bleu_score(empty, ref, none).item() == 0.0  # an empty candidate
    assert bleu_score(ref, empty, None, none).item() == 0.0  # an empty reference: nothing matches
    one = torch.tensor([[4]])  # shorter than every order above 1
    assert bleu_score(one, ref, max_n=1).item() == pytest.approx(math.exp(1 - 3))
    assert bleu_score(one, ref, max_n=4).item() == pytest.approx(reference_bleu([4], [[4, 5, 6]], 4))
    # one-token answer that is exactly right: "floor" with max_n=4 caps it at 0.1^(3/4)
    assert bleu_score(one, one, max_n=4).item() == pytest.approx(0.1**0.75, rel=1e-5)


def test_bad_arguments_raise():
    ids = torch.tensor([[1, 2]])
    with pytest.raises(ValueError, match="smoothing"):
        bleu_score(ids, ids, smoothing="method7")
    with pytest.raises(ValueError, match="max_n"):
        bleu_score(ids, ids, max_n=0)
    with pytest.raises(ValueError, match="weights"):
        bleu_score(ids, ids, max_n=2, weights=[1.0])
    with pytest.raises(ValueError, match=r"\[B, Tc\]"):
        bleu_score(ids[0], ids)


def test_large_batch_is_linear_and_matches():
    """A batch of 512 rows scores in one call and agrees with the reference on a sample of rows."""
    gen = torch.Generator().manual_seed(0)
    refs = torch.randint(0, 30, (512, 24), generator=gen)
    cands = torch.where(torch.rand(512, 24, generator=gen) < 0.3, torch.randint(0, 30, (512, 24), generator=gen), refs)
    scores = bleu_score(cands, refs)
    for i in range(0, 512, 64):
        assert scores[i].item() == pytest.approx(reference_bleu(cands[i].tolist(), [refs[i].tolist()]), rel=1e-5)
