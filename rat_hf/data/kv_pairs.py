"""Attention-guided curriculum data: key/value spans of articles, and a synthetic Twenty-Questions game.

`split_into_kv_pairs` cuts an article's token stream into consecutive, non-overlapping (key, value) spans of
`key_tokens` and `value_tokens` tokens: reading the article, then being asked for the value that followed a key, is
a retrieval task whose answer is exact. Token ids are authoritative; the decoded `key`/`value` strings are for
reading (a span may cut a multi-byte character, which decodes as U+FFFD).

`twenty_questions_dataset` plays Twenty Questions over a small, consistent knowledge base (every object has a
distinct yes/no profile). The questioner asks the question that best halves the remaining candidates (random among
ties), so games are short, varied, and always end with the right guess. With `model_role="answerer"` the model is
told the secret in turn 0 and must keep it in memory to answer every later question.
"""

import random

from ._checks import check_int

# Questions ("Is it ...?") and, for each object, the set of those that are true.
_QUESTIONS = {
    "animal": "an animal", "mammal": "a mammal", "plant": "a plant or part of one",
    "heavy": "heavier than a person", "fly": "able to fly", "water": "found in water",
    "food": "something people eat", "metal": "made mostly of metal", "electric": "powered by electricity",
    "kitchen": "usually found in a kitchen", "ride": "something people ride in or on",
    "instrument": "a musical instrument", "wood": "made mostly of wood", "paper": "made of paper",
}
_OBJECTS = {
    "elephant": {"animal", "mammal", "heavy"}, "dog": {"animal", "mammal"},
    "whale": {"animal", "mammal", "heavy", "water"}, "horse": {"animal", "mammal", "heavy", "ride"},
    "eagle": {"animal", "fly"}, "goldfish": {"animal", "water"}, "salmon": {"animal", "water", "food"},
    "apple": {"plant", "food"}, "oak tree": {"plant", "heavy", "wood"}, "rose": {"plant"},
    "airplane": {"heavy", "fly", "metal", "ride"}, "submarine": {"heavy", "water", "metal", "ride"},
    "bicycle": {"metal", "ride"}, "toaster": {"metal", "electric", "kitchen"}, "spoon": {"metal", "kitchen"},
    "laptop": {"electric"}, "book": {"paper"}, "pencil": {"wood"}, "piano": {"heavy", "wood", "instrument"},
    "guitar": {"wood", "instrument"}, "cup": {"kitchen"}, "loaf of bread": {"food", "kitchen"}, "shoe": set(),
}


def split_into_kv_pairs(text: str, tokenizer, key_tokens: int, value_tokens: int) -> list:
    """Consecutive non-overlapping (key, value) token spans of `text`; a trailing incomplete pair is left out.

    Returns dicts `{"key", "value", "key_ids", "value_ids", "start"}` (`start`: token offset of the key).
    """
    check_int("key_tokens", key_tokens, 1)
    check_int("value_tokens", value_tokens, 1)
    if not isinstance(text, str):
        raise ValueError(f"text must be a string, got {type(text).__name__}")
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    step = key_tokens + value_tokens
    pairs = []
    for start in range(0, len(ids) - step + 1, step):
        key, val = ids[start:start + key_tokens], ids[start + key_tokens:start + step]
        pairs.append({"key": tokenizer.decode(key), "value": tokenizer.decode(val), "key_ids": key,
                      "value_ids": val, "start": start})
    return pairs


def kv_pairs_dataset(dataset, tokenizer, key_tokens: int, value_tokens: int, text_column: str = "text",
                     num_proc: int | None = None):
    """One row per (key, value) pair of every article in `dataset` (`datasets.map`); adds `doc` (row index)."""
    if text_column not in dataset.column_names:
        raise ValueError(f"text_column {text_column!r} not in dataset columns {dataset.column_names}")

    def explode(batch, indices):
        out = {"doc": [], "start": [], "key": [], "value": [], "key_ids": [], "value_ids": []}
        for doc, text in zip(indices, batch[text_column]):
            for pair in split_into_kv_pairs(text or "", tokenizer, key_tokens, value_tokens):
                out["doc"].append(doc)
                for field in ("start", "key", "value", "key_ids", "value_ids"):
                    out[field].append(pair[field])
        return out

    return dataset.map(explode, batched=True, with_indices=True, num_proc=num_proc,
                       remove_columns=dataset.column_names, desc="key/value pairs")


def _article(name: str) -> str:
    return ("an " if name[0] in "aeiou" else "a ") + name


def play_twenty_questions(secret: str, rng: random.Random, max_questions: int = 20) -> list:
    """The questioner's questions and the answers, ending with the (right) guess: [(question, answer), ...]."""
    if secret not in _OBJECTS:
        raise ValueError(f"secret must be one of {sorted(_OBJECTS)}, got {secret!r}")
    candidates, asked, game = sorted(_OBJECTS), set(), []
    while len(candidates) > 1 and len(game) < max_questions - 1:
        split = {q: sum(q in _OBJECTS[c] for c in candidates) for q in _QUESTIONS if q not in asked}
        best = min(abs(2 * yes - len(candidates)) for yes in split.values())
        q = rng.choice(sorted(k for k, yes in split.items() if abs(2 * yes - len(candidates)) == best))
        asked.add(q)
        truth = q in _OBJECTS[secret]
        game.append((f"Is it {_QUESTIONS[q]}?", "Yes." if truth else "No."))
        candidates = [c for c in candidates if (q in _OBJECTS[c]) == truth]
    guess = candidates[0] if len(candidates) == 1 else rng.choice(candidates)
    game.append((f"Is it {_article(guess)}?", "Yes! You guessed it." if guess == secret else "No."))
    return game


def twenty_questions_dataset(n: int, seed: int = 0, model_role: str = "answerer", max_questions: int = 20):
    """`n` Twenty-Questions games in interaction format (`query`, `answer`, `interactions`, `secret`, `questions`).

    `model_role="answerer"`: turn 0 tells the model its secret; queries are the questions, answers the model's
    yes/no replies. `model_role="questioner"`: the model asks (answers are questions) and the user replies.
    """
    from datasets import Dataset

    if model_role not in ("answerer", "questioner"):
        raise ValueError(f"model_role must be 'answerer' or 'questioner', got {model_role!r}")
    check_int("n", n, 1)
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        secret = rng.choice(sorted(_OBJECTS))
        game = play_twenty_questions(secret, rng, max_questions)
        if model_role == "answerer":
            first = {"query": f"Let's play Twenty Questions. Your secret object is {_article(secret)}. "
                              "Answer my yes/no questions truthfully.", "answer": "Ready. Ask away."}
            follow = [{"query": q, "answer": a} for q, a in game]
        else:
            first = {"query": "Let's play Twenty Questions. I am thinking of an object. Ask me yes/no questions.",
                     "answer": game[0][0]}
            replies = [a for _, a in game]
            asks = [q for q, _ in game[1:]] + ["Thanks for playing!"]
            follow = [{"query": r, "answer": q} for r, q in zip(replies, asks)]
        rows.append({**first, "interactions": follow, "secret": secret, "questions": len(game)})
    return Dataset.from_list(rows)
