"""Interaction data for the Reactive Transformer, and a synthetic memory-recall task.

An interaction is one query and its answer; the decoder reads it as `[Q] query [A] answer` and the memory carries
everything earlier. Records are `{"query", "answer"}` (single turn) or `{"query", "answer", "interactions":
[{"query", "answer"}, ...]}` (the first turn, then follow-ups in order), as in RxLM's curriculum datasets.

`memory_recall_dataset(n, distance, seed)`: turn 0 states a fact, `distance` distractor turns follow (arithmetic and
facts about *other* entities), then a question whose exact answer is the fact's value. A model without memory can
do no better than guessing among the values; the `distance` knob sets how long the memory must hold it.

`mrl_recall_dataset(n, max_turns, strategy)`: the same facts laid out as memory-reinforcement-learning episodes
(`cumulative`: every turn asks for the previous turn's fact and states a new one; `long_range`: a fact, distractors,
the question), as `rat_hf.trainers.RxTMRLTrainer` reads them.
"""

import json
import random

from ..tokenization.special_tokens import ANSWER_TOKEN, QUERY_TOKEN
from ._checks import check_int, decode_utf8_line


def _turn(record, where: str) -> dict:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected an object with 'query' and 'answer', got {type(record).__name__}")
    for field in ("query", "answer"):
        if not isinstance(record.get(field), str):
            raise ValueError(f"{where}: field {field!r} must be a string")
    return {"query": record["query"], "answer": record["answer"]}


def normalize_interaction(record, where: str = "record") -> dict:
    """Validate one record; returns `{"query", "answer", "interactions"}` (`interactions` = [] if single-turn)."""
    out = _turn(record, where)
    follow = record.get("interactions", [])
    if not isinstance(follow, list):
        raise ValueError(f"{where}: field 'interactions' must be a list")
    out["interactions"] = [_turn(t, f"{where}: interactions[{i}]") for i, t in enumerate(follow)]
    return out


def turns(record) -> list:
    """All turns of a (normalized) record in order, as `(query, answer)` pairs."""
    return [(record["query"], record["answer"])] + [(t["query"], t["answer"]) for t in record["interactions"]]


def load_interactions(source):
    """A `datasets.Dataset` of interactions from a UTF-8 JSONL path or a list of dicts; errors name `path:line`."""
    from datasets import Dataset

    if isinstance(source, (list, tuple)):
        rows = [normalize_interaction(r, f"records[{i}]") for i, r in enumerate(source)]
    else:
        rows = []
        with open(source, "rb") as f:  # bytes: a line that is not UTF-8 is named by its line number
            for lineno, raw in enumerate(f, start=1):
                try:
                    line = decode_utf8_line(raw, lineno)
                except ValueError as err:
                    raise ValueError(f"{source}:{lineno}: {err}") from None
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{source}:{lineno}: invalid JSON ({err.msg})") from None
                rows.append(normalize_interaction(record, f"{source}:{lineno}"))
    return Dataset.from_list(rows)


def interaction_text(query: str, answer: str | None = None) -> str:
    """`[Q] query [A] answer` (or `[Q] query [A]` as a generation prompt)."""
    return f"{QUERY_TOKEN} {query} {ANSWER_TOKEN}" + ("" if answer is None else f" {answer}")


def interaction_prompt_ids(tokenizer, query: str) -> list[int]:
    """`[Q] query [A]`: the ids the decoder reads before it answers, as every stage of the curriculum tokenizes them.

    The text `interaction_text(query)` is tokenized as one string, so a byte-level BPE sees the spaces around the
    query (`[Q]`, ` Please`, ..., ` `, `[A]`). Inference must build its prompts with this function too
    (`ReactiveSession`, `rat-chat` do): the same words tokenized without those spaces are other pieces, and a model
    trained on one form recalls worse from the other (tiny preset: 0.45 vs 0.34). ValueError unless the ids open
    with the tokenizer's `[Q]` and end with its `[A]` (`add_reactive_special_tokens`).
    """
    from ..tokenization.special_tokens import reactive_token_ids

    ids = reactive_token_ids(tokenizer)
    prompt = tokenizer(interaction_text(query), add_special_tokens=False)["input_ids"]
    if len(prompt) < 2 or prompt[0] != ids["query"] or prompt[-1] != ids["answer"]:
        raise ValueError(f"the tokenizer does not keep {QUERY_TOKEN}/{ANSWER_TOKEN} as single tokens around the query "
                         f"{query[:40]!r}: its ids open with {prompt[:1]} and end with {prompt[-1:]}, expected "
                         f"{ids['query']} and {ids['answer']}")
    return prompt


def tokenize_interaction(tokenizer, query: str, answer: str, max_length: int | None = None) -> dict:
    """Decoder inputs for one interaction: `[Q] query [A] answer EOS`, labels only on `answer EOS`.

    The prompt is `interaction_prompt_ids`, the answer is tokenized with a leading space (as it follows `[A] ` in
    `interaction_text(query, answer)`; an empty answer is EOS alone). Needs the reactive tokens
    (`add_reactive_special_tokens`). `max_length` truncates from the right. What a finished turn writes into memory
    is the same `input_ids`.
    """
    prompt = interaction_prompt_ids(tokenizer, query)
    reply = (tokenizer(" " + answer, add_special_tokens=False)["input_ids"] if answer else []) + [tokenizer.eos_token_id]
    input_ids = (prompt + reply)[:max_length]
    labels = ([-100] * len(prompt) + reply)[:max_length]
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


# --- synthetic memory recall ----------------------------------------------------------------------------------------
_NAMES = ["Alice", "Bruno", "Chen", "Dalia", "Emeka", "Farah", "Goran", "Hana", "Ivan", "Jun", "Kofi", "Lena",
          "Mateo", "Nadia", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tariq", "Uma", "Viktor", "Wen", "Yara"]
_COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "teal", "silver", "black", "white"]
_CITIES = ["Lisbon", "Nairobi", "Osaka", "Lima", "Oslo", "Cairo", "Denver", "Hanoi", "Krakow", "Quito"]
_PETS = ["Biscuit", "Pepper", "Luna", "Milo", "Ziggy", "Nala", "Otis", "Maple", "Rocket", "Juno"]


# How each attribute's value is drawn.
_VALUES = {
    "favorite color": lambda rng: rng.choice(_COLORS),
    "home city": lambda rng: rng.choice(_CITIES),
    "pet's name": lambda rng: rng.choice(_PETS),
    "locker code": lambda rng: str(rng.randint(1000, 9999)),
    "lucky number": lambda rng: str(rng.randint(1, 99)),
}
_ATTRIBUTES = list(_VALUES)


def _distractor(rng: random.Random, avoid: str) -> dict:
    if rng.random() < 0.5:
        a, b = rng.randint(2, 50), rng.randint(2, 50)
        return {"query": f"What is {a} plus {b}?", "answer": str(a + b)}
    name = rng.choice([x for x in _NAMES if x != avoid])
    attribute = rng.choice(_ATTRIBUTES)
    return {"query": f"By the way, {name}'s {attribute} is {_VALUES[attribute](rng)}.", "answer": "Noted."}


def memory_recall_dataset(n: int, distance: int, seed: int = 0):
    """`n` conversations: a fact, `distance` distractor turns, then the question; a `datasets.Dataset`.

    Columns: `query`, `answer` (turn 0), `interactions` (distractors + final question; the last answer is exactly
    the fact's value), `fact` (that value) and `distance`.
    """
    from datasets import Dataset

    check_int("n", n, 1)
    check_int("distance", distance, 0)
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        name, attribute = rng.choice(_NAMES), rng.choice(_ATTRIBUTES)
        value = _VALUES[attribute](rng)
        follow = [_distractor(rng, avoid=name) for _ in range(distance)]
        follow.append({"query": f"What is {name}'s {attribute}?", "answer": value})
        rows.append({"query": f"Please remember this: {name}'s {attribute} is {value}.",
                     "answer": "Got it, I will remember.", "interactions": follow, "fact": value,
                     "distance": distance})
    return Dataset.from_list(rows)


MRL_STRATEGIES = ("cumulative", "long_range")  # how an MRL episode is built (rat_hf.trainers.rxt_mrl_trainer)


def mrl_recall_dataset(n: int, max_turns: int, strategy: str = "cumulative", seed: int = 0, attributes=None):
    """`n` synthetic recall conversations of `max_turns` turns for a strategy (a `datasets.Dataset`).

    cumulative: turn 0 states a fact; turn k asks for the fact of turn k-1 (the answer is its value) and states a new
    one. long_range: a fact, `max_turns - 2` distractors (arithmetic, facts about others), the question about the fact.
    `attributes`: the fact kinds to draw from (default all of `rat_hf.data.interactions`: favorite color, home city,
    pet's name, locker code, lucky number). Columns: query, answer, interactions, strategy.
    """
    from datasets import Dataset

    if strategy not in MRL_STRATEGIES:
        raise ValueError(f"mrl_recall_dataset: strategy must be one of {MRL_STRATEGIES}, got {strategy!r}")
    if not isinstance(max_turns, int) or max_turns < 2:
        raise ValueError(f"mrl_recall_dataset: max_turns must be an integer >= 2, got {max_turns!r}")
    attributes = list(attributes or _ATTRIBUTES)
    unknown = sorted(set(attributes) - set(_ATTRIBUTES))
    if unknown:
        raise ValueError(f"mrl_recall_dataset: unknown attributes {unknown}; known: {_ATTRIBUTES}")
    rng = random.Random(seed)

    def fact():
        name, attribute = rng.choice(_NAMES), rng.choice(attributes)
        return name, attribute, _VALUES[attribute](rng)

    rows = []
    for _ in range(n):
        name, attribute, value = fact()
        first = {"query": f"Please remember this: {name}'s {attribute} is {value}.",
                 "answer": "Got it, I will remember."}
        follow = []
        if strategy == "cumulative":
            for _k in range(1, max_turns):
                new = fact()
                follow.append({"query": f"What is {name}'s {attribute}? Also remember: {new[0]}'s {new[1]} is "
                                        f"{new[2]}.", "answer": value})
                name, attribute, value = new
        else:
            follow = [_distractor(rng, avoid=name) for _ in range(max_turns - 2)]
            follow.append({"query": f"What is {name}'s {attribute}?", "answer": value})
        rows.append({**first, "interactions": follow, "strategy": strategy})
    return Dataset.from_list(rows)
