"""Chat JSONL (the PPO-chat seed's format) -> TRL's conversational prompt/completion format, with `quality`.

Accepted lines (one JSON object each; blank lines are ignored):
* `{"messages": [{"content": ...}, ...], "quality": 0.8}` — no roles: turns alternate user / assistant from the
  user. With role fields (OASST style: `role` = prompter|user|assistant|system, content in `content` or `text`),
  the roles are used, `prompter` -> `user`.
* TRL's prompt/completion lines: `{"prompt": ..., "completion": ...}` (strings, or message lists with roles;
  `completion` optional: a prompt-only line is what RL trainers generate from).
* `{"text": ..., "quality": ...}` — a transcript with turn markers (`### Human:` / `### Assistant:`,
  `<|prompter|>` / `<|assistant|>`, `<|user|>` / `<|assistant|>`, or `Human:` / `User:` / `Assistant:` at the start of
  a line) is split into turns; text without markers is one user turn.
A conversation ending with the assistant gives `prompt` = all turns before it and `completion` = [that turn]; one
ending with the user is prompt-only (`completion` = []), which is what PPO/GRPO-style trainers generate from.
`quality` (a number or null) stays a column. For RL, load with `completion_column="reference"`: TRL never passes a
column named `completion` to reward functions (it is the generated text there), and rewards such as
`rat_hf.rewards.quality_reward` read the dataset's answer from `reference`. The file is UTF-8; a line that is not (Latin-1, UTF-16) is malformed.
Every malformed line raises `ValueError("path:line: reason")`, or with
`skip_invalid=True` is skipped and counted in a warning; nothing is dropped silently.
"""

import json
import re
import warnings

from ._checks import decode_utf8_line

_ROLES = {"user": "user", "prompter": "user", "human": "user", "assistant": "assistant", "bot": "assistant",
          "gpt": "assistant", "system": "system"}
_MARKERS = re.compile(
    r"###\s*(?P<a>Human|Assistant|User|System)\s*:"
    r"|<\|(?P<b>prompter|assistant|user|system)\|>"
    r"|(?m:^[ \t]*(?P<c>Human|User|Assistant|System)[ \t]*:)",
    re.IGNORECASE,
)
_END_TOKENS = re.compile(r"<\|endoftext\|>|</s>")


class _Invalid(Exception):
    """A malformed line; carries the reason shown to the user."""


def _messages_from_list(messages) -> list:
    if not isinstance(messages, list) or not messages:
        raise _Invalid("'messages' must be a non-empty list")
    has_role = [isinstance(m, dict) and ("role" in m) for m in messages]
    if any(has_role) and not all(has_role):
        raise _Invalid("some messages have a 'role' and some do not")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _Invalid(f"messages[{i}] must be an object, got {type(m).__name__}")
        content = m.get("content", m.get("text"))
        if not isinstance(content, str):
            raise _Invalid(f"messages[{i}] needs a string 'content' (or 'text')")
        if all(has_role):
            role = _ROLES.get(str(m["role"]).lower())
            if role is None:
                raise _Invalid(f"messages[{i}] has unknown role {m['role']!r} (known: {sorted(_ROLES)})")
        else:
            role = ("user", "assistant")[i % 2]
        out.append({"role": role, "content": content})
    return out


def _messages_from_text(text) -> list:
    if not isinstance(text, str):
        raise _Invalid(f"'text' must be a string, got {type(text).__name__}")
    text = _END_TOKENS.sub("", text)
    found = list(_MARKERS.finditer(text))
    if not found:
        if not text.strip():
            raise _Invalid("'text' is empty")
        return [{"role": "user", "content": text.strip()}]
    out = []
    if text[:found[0].start()].strip():
        out.append({"role": "system", "content": text[:found[0].start()].strip()})
    for k, match in enumerate(found):
        end = found[k + 1].start() if k + 1 < len(found) else len(text)
        label = (match.group("a") or match.group("b") or match.group("c")).lower()
        out.append({"role": _ROLES[label], "content": text[match.end():end].strip()})
    return out


def parse_chat_record(record) -> dict:
    """One decoded JSON line -> `{"prompt", "completion", "quality"}`; raises ValueError with the reason."""
    try:
        return _parse(record)
    except _Invalid as err:
        raise ValueError(str(err)) from None


def _parse(record) -> dict:
    if not isinstance(record, dict):
        raise _Invalid(f"expected a JSON object, got {type(record).__name__}")
    kinds = [key for key in ("messages", "text", "prompt") if key in record]
    if len(kinds) != 1:
        raise _Invalid("expected exactly one of 'messages', 'text' or 'prompt'")
    if "completion" in record and kinds != ["prompt"]:
        raise _Invalid("'completion' goes with 'prompt', not with 'messages' or 'text'")
    quality = record.get("quality")
    if quality is not None and (isinstance(quality, bool) or not isinstance(quality, (int, float))):
        raise _Invalid(f"'quality' must be a number or null, got {quality!r}")
    if kinds == ["prompt"]:
        prompt = _turns(record["prompt"], "prompt", "user")
        completion = _turns(record["completion"], "completion", "assistant") if "completion" in record else []
        if not any(m["role"] == "user" for m in prompt):
            raise _Invalid("'prompt' has no user turn")
        return {"prompt": prompt, "completion": completion, "quality": None if quality is None else float(quality)}
    msgs = _messages_from_list(record["messages"]) if "messages" in record else _messages_from_text(record["text"])
    if msgs[-1]["role"] == "assistant":
        prompt, completion = msgs[:-1], msgs[-1:]
        if not any(m["role"] == "user" for m in prompt):
            raise _Invalid("the assistant's reply has no user turn before it")
    else:
        prompt, completion = msgs, []
    return {"prompt": prompt, "completion": completion, "quality": None if quality is None else float(quality)}


def _turns(value, field: str, role: str) -> list:
    """A prompt/completion field: a string is one turn of `role`; a list is messages with roles."""
    if isinstance(value, str):
        if not value.strip():
            raise _Invalid(f"'{field}' is empty")
        return [{"role": role, "content": value}]
    if isinstance(value, list) and value and all(isinstance(m, dict) and "role" in m for m in value):
        return _messages_from_list(value)
    raise _Invalid(f"'{field}' must be a string or a non-empty list of messages with roles")


def _decode_line(raw: bytes, lineno: int) -> str:
    try:
        return decode_utf8_line(raw, lineno)
    except ValueError as err:
        raise _Invalid(str(err)) from None


def load_chat_jsonl(path, skip_invalid: bool = False, completion_column: str = "completion"):
    """Read a chat JSONL file into a `datasets.Dataset` with `prompt`, `completion` (message lists), `quality`.

    `completion_column` names the answer column: `"completion"` for SFT (TRL's prompt/completion format),
    `"reference"` for RL trainers, which generate the completion and hand the dataset's answer to reward functions.

    The file must be UTF-8 (a leading byte-order mark is allowed). Malformed lines — including lines that are not
    UTF-8, e.g. a Latin-1 or UTF-16 file — raise `ValueError("path:line: reason")`; with `skip_invalid=True` they are
    skipped and a warning says how many (with the first reasons). Raises if no valid line remains.
    """
    from datasets import Dataset

    rows, errors = [], []
    with open(path, "rb") as f:  # bytes: an undecodable line is then reported (or skipped) as that line
        for lineno, raw in enumerate(f, start=1):
            try:
                line = _decode_line(raw, lineno)
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise _Invalid(f"invalid JSON ({err.msg} at column {err.colno})") from None
                row = _parse(record)
                rows.append({"prompt": row["prompt"], completion_column: row["completion"], "quality": row["quality"]})
            except _Invalid as err:
                message = f"{path}:{lineno}: {err}"
                if not skip_invalid:
                    raise ValueError(message) from None
                errors.append(message)
    if errors:
        shown = "; ".join(errors[:5]) + ("; ..." if len(errors) > 5 else "")
        warnings.warn(f"load_chat_jsonl: skipped {len(errors)} invalid line(s) of {path}: {shown}")
    if not rows:
        raise ValueError(f"{path}: no valid conversations")
    return Dataset.from_list(rows)
