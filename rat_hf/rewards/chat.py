"""Chat reward functions with TRL's reward-function signature (plain functions, stdlib only).

TRL 1.16's `GRPOTrainer._calculate_rewards` calls every reward function as

    f(prompts=..., completions=..., completion_ids=..., trainer_state=..., log_extra=..., log_metric=..., **columns)

where `columns` are all dataset columns except `prompt`, `completion` and `completion_ids`, one value per completion
(already repeated `num_generations` times). Each function returns one `float` per completion, or `None` for "no reward
from this function for this sample" (TRL turns it into NaN and leaves it out of the weighted sum). Extra keyword
arguments (`trainer_state`, `log_extra`, ...) are accepted and ignored.

Completions are plain strings (standard format) or message lists (conversational format, e.g.
`[{"role": "assistant", "content": "..."}]`): the text scored is the assistant messages' content joined by newlines
(`tool` / `user` messages a tool loop may add are not the model's text and are skipped; `content` may be None or a list
of `{"type": "text", "text": ...}` parts). "Words" are lower-cased Unicode `\\w+` runs, apostrophes inside a word kept
("don't" is one word), so punctuation never counts.

Settings (`target_length`, `keyword`, ...) are keyword arguments, so `functools.partial(length_reward,
target_length=20)` configures a function and stays picklable; TRL names it after the wrapped function. A dataset column
of the same name is passed by TRL at call time and wins over the partial's value: such settings accept either one value
or one value per completion, so a column works as a per-sample setting.
"""

import math
import re
from collections import Counter
from collections.abc import Sequence
from functools import partial

_WORD = re.compile(r"\w+(?:'\w+)*")
# Turn markers a chat model should never write itself: chat-template tags and transcript prefixes at a line start.
_ROLE_LEAK = re.compile(
    r"<\|(?:im_start|im_end|user|assistant|system|prompter|endoftext|eot_id|start_header_id|end_header_id)\|>"
    r"|\[/?INST\]|</s>"
    r"|(?m:^[ \t]*(?:#{1,3}[ \t]*)?(?:user|assistant|human|system)[ \t]*:)",
    re.IGNORECASE,
)
# A sentence end, optionally followed by closing quotes/brackets: "Done." / "He said 'yes!'" / "(see above.)"
_SENTENCE_END = re.compile(r"[.!?\u2026\u3002\uff01\uff1f][\"'\u201d\u2019)\]]*$")
_NOT_COLUMNS = ("trainer_state", "log_extra", "log_metric", "environments")


# --- text helpers ----------------------------------------------------------------------------------------------------
def _content_text(content, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # multimodal parts: keep the text ones
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    raise ValueError(f"{where}: 'content' must be a string, a list of parts or None, got {type(content).__name__}")


def completion_text(completion) -> str:
    """The text a reward scores: a string as is; a message (list) -> its assistant contents joined by newlines."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        completion = [completion]
    if not isinstance(completion, (list, tuple)):
        raise ValueError(f"a completion must be a string or a list of messages, got {type(completion).__name__}")
    parts = []
    for i, message in enumerate(completion):
        if not isinstance(message, dict):
            raise ValueError(f"completion message {i} must be a dict with 'role'/'content', "
                             f"got {type(message).__name__}")
        if message.get("role", "assistant") == "assistant":
            text = _content_text(message.get("content"), f"completion message {i}")
            if text:
                parts.append(text)
    return "\n".join(parts)


def words(text: str) -> list[str]:
    """Lower-cased words of `text` (see the module docstring)."""
    return _WORD.findall(text.lower())


def unigram_f1(candidate: list[str], reference: list[str]) -> float:
    """Bag-of-words F1 of two word lists (ROUGE-1 F / SQuAD F1), in [0, 1]; 0.0 when either is empty."""
    common = sum((Counter(candidate) & Counter(reference)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(candidate), common / len(reference)
    return 2 * precision * recall / (precision + recall)


# --- argument checks -------------------------------------------------------------------------------------------------
def _column(func: str, columns: dict, name: str, n: int) -> list:
    if name not in columns:
        given = sorted(k for k in columns if k not in _NOT_COLUMNS)
        raise ValueError(f"{func}: the dataset has no {name!r} column (columns passed: {given})")
    return _per_sample(func, name, columns[name], n)


def _per_sample(func: str, name: str, value, n: int) -> list:
    """One value for every completion (broadcast), or a column of exactly n values (any non-string sequence: a list,
    a tuple, a `datasets` Column)."""
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        if len(value) != n:
            raise ValueError(f"{func}: {name!r} has {len(value)} values for {n} completions")
        return list(value)
    return [value] * n


def _number_or_none(func: str, name: str, value, i: int):
    if value is None or (isinstance(value, float) and math.isnan(value)):  # NaN: a missing value (pandas' convention)
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isinf(value):
        raise ValueError(f"{func}: {name}[{i}] must be a finite number or None, got {value!r}")
    return float(value)


def _check_unit(func: str, length_unit) -> None:
    if length_unit not in ("words", "tokens"):
        raise ValueError(f"{func}: length_unit must be 'words' or 'tokens', got {length_unit!r}")


def _texts(completions) -> list[str]:
    if not isinstance(completions, Sequence) or isinstance(completions, (str, bytes)):
        raise ValueError(f"completions must be a list (one per sample), got {type(completions).__name__}")
    return [completion_text(c) for c in completions]


# --- reward functions ------------------------------------------------------------------------------------------------
def quality_reward(prompts, completions, completion_ids=None, **columns) -> list[float | None]:
    """`quality[i] * unigram_f1(words(completion[i]), words(reference[i]))`: the human score of the example, earned in
    proportion to how much the completion overlaps the reference answer.

    Columns (both required): `quality` (number or None: the seed's human score) and `reference` (the reference answer,
    a string or a message list). TRL does not pass a column named `completion` to reward functions, so rename the
    loader's column first: `dataset.rename_column("completion", "reference")`. The seed scored the reference itself,
    a constant per prompt with no learning signal; here the reward depends on the completion.
    Range: [0, quality] (for quality < 0: [quality, 0]); quality in [0, 1] gives [0, 1].
    Edge cases: empty completion -> 0.0; quality None/NaN, reference None or without words (e.g. `[]` of a prompt-only
    row) -> None for that sample. A missing column raises ValueError naming it (quality alone is constant per
    prompt: returning it would silently train on nothing).
    """
    texts = _texts(completions)
    n = len(texts)
    quality = _column("quality_reward", columns, "quality", n)
    reference = _column("quality_reward", columns, "reference", n)
    out = []
    for i, text in enumerate(texts):
        q = _number_or_none("quality_reward", "quality", quality[i], i)
        ref = words(completion_text(reference[i])) if reference[i] is not None else []
        out.append(None if q is None or not ref else q * unigram_f1(words(text), ref))
    return out


def length_reward(prompts, completions, completion_ids=None, *, target_length=50, length_unit: str = "words",
                  **columns) -> list[float | None]:
    """`max(-1, 1 - |n - target_length| / target_length)`, n = the completion's length in `length_unit`.

    Range [-1, 1]: 1 at exactly `target_length`, 0 for an empty completion or twice the target, -1 from three times
    the target on (a bonus near the target, a growing penalty for rambling). `length_unit`: `"words"` (default) or
    `"tokens"` (`len(completion_ids[i])`, as TRL passes them: including the EOS token when generation stopped; needs
    `completion_ids`). `target_length` (default 50 words, about the seed's 100 new tokens) is a positive number, or
    one per completion (a column); a None entry gives None for that sample.
    Configure with `functools.partial(length_reward, target_length=20)` or `make_length_reward(20)`.
    """
    texts = _texts(completions)
    n = len(texts)
    _check_unit("length_reward", length_unit)
    if length_unit == "tokens":
        if completion_ids is None:
            raise ValueError("length_reward: length_unit='tokens' needs completion_ids (TRL passes them)")
        lengths = [len(ids) for ids in _per_sample("length_reward", "completion_ids", list(completion_ids), n)]
    else:
        lengths = [len(words(t)) for t in texts]
    targets = _per_sample("length_reward", "target_length", target_length, n)
    out = []
    for i, length in enumerate(lengths):
        target = _number_or_none("length_reward", "target_length", targets[i], i)
        if target is not None and target <= 0:
            raise ValueError(f"length_reward: target_length must be > 0, got {targets[i]!r}")
        out.append(None if target is None else max(-1.0, 1.0 - abs(length - target) / target))
    return out


def make_length_reward(target_length=50, length_unit: str = "words"):
    """`length_reward` with its settings bound (a picklable `functools.partial`); the settings are checked now."""
    _check_unit("make_length_reward", length_unit)
    number = isinstance(target_length, (int, float)) and not isinstance(target_length, bool)
    if not number or not 0 < target_length < math.inf:
        raise ValueError(f"make_length_reward: target_length must be a positive number, got {target_length!r}")
    return partial(length_reward, target_length=target_length, length_unit=length_unit)


def diversity_reward(prompts, completions, completion_ids=None, *, ngram_size: int = 1,
                     **columns) -> list[float | None]:
    """Distinct-n of the completion: distinct word n-grams / all word n-grams (`ngram_size`, default 1 = the
    vocabulary ratio `len(set(words)) / len(words)`).

    Range [0, 1]: 1 when no n-gram repeats, -> 0 for "the the the ...". Edge cases: an empty completion, or one with
    fewer than `ngram_size` words, -> 0.0. Short completions score high by construction: pair it with `length_reward`.
    """
    if isinstance(ngram_size, bool) or not isinstance(ngram_size, int) or ngram_size < 1:
        raise ValueError(f"diversity_reward: ngram_size must be an integer >= 1, got {ngram_size!r}")
    out = []
    for text in _texts(completions):
        w = words(text)
        grams = [tuple(w[k:k + ngram_size]) for k in range(len(w) - ngram_size + 1)]
        out.append(len(set(grams)) / len(grams) if grams else 0.0)
    return out


def format_reward(prompts, completions, completion_ids=None, **columns) -> list[float | None]:
    """Mean of three checks on a non-empty completion: it is non-empty (always true here), it ends a sentence
    (`.`, `!`, `?`, `…` or CJK stops, optionally followed by closing quotes/brackets), and it leaks no turn marker
    (`User:` / `Assistant:` / `Human:` / `System:` at a line start, `### Human:`, `<|im_start|>`, `<|im_end|>`,
    `<|user|>`, `<|assistant|>`, `<|endoftext|>`, `[INST]`, `</s>`, ...: the model writing the next turn itself).

    Range [0, 1] in steps of 1/3; an empty or whitespace-only completion -> 0.0.
    """
    out = []
    for text in _texts(completions):
        stripped = text.strip()
        if not stripped:
            out.append(0.0)
            continue
        ends = _SENTENCE_END.search(stripped) is not None
        clean = _ROLE_LEAK.search(stripped) is None
        out.append((1.0 + ends + clean) / 3.0)
    return out


def keyword_reward(prompts, completions, completion_ids=None, *, keyword=None, **columns) -> list[float | None]:
    """Fraction of the completion's words that belong to an occurrence of `keyword`: occurrences of the keyword's
    word sequence (whole words, case-insensitive) x its word count / the completion's word count.

    A simple learnable reward for tests and benchmarks: "cat" -> "the cat sat" 1/3, "cat cat" 1.0.
    `keyword`: a string for every sample (`functools.partial(keyword_reward, keyword="cat")`) or a dataset column
    `keyword` (one per sample; the column wins over a bound value). Range [0, 1]; empty completion -> 0.0; a None
    keyword entry -> None. No keyword at all, or one without words, raises ValueError.
    """
    texts = _texts(completions)
    if keyword is None:
        raise ValueError("keyword_reward: no keyword: pass keyword='...' (functools.partial) or a 'keyword' column")
    keywords = _per_sample("keyword_reward", "keyword", keyword, len(texts))
    out = []
    for i, text in enumerate(texts):
        if keywords[i] is None:
            out.append(None)
            continue
        if not isinstance(keywords[i], str) or not words(keywords[i]):
            raise ValueError(f"keyword_reward: keyword[{i}] must be a string with a word in it, got {keywords[i]!r}")
        key, w = tuple(words(keywords[i])), words(text)
        hits, k = 0, 0
        while k + len(key) <= len(w):  # non-overlapping left-to-right matches
            if tuple(w[k:k + len(key)]) == key:
                hits, k = hits + 1, k + len(key)
            else:
                k += 1
        out.append(hits * len(key) / len(w) if w else 0.0)
    return out
