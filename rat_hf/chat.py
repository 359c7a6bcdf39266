"""Chat with a causal LM (RAT, Llama, ...) or a Reactive Transformer: `ChatInterface`, the engine of `rat-chat`.

    chat = ChatInterface("outputs/rat-demo")           # a save_pretrained directory or a Hub id (or a loaded model)
    chat.generate_response("Hello!")                   # -> str; the turn is appended to chat.history
    for piece in chat.stream_response("And then?"):    # the same answer, piece by piece as it is generated
        print(piece, end="", flush=True)
    chat.save("chat.jsonl"); chat.clear(); chat.load("chat.jsonl")

Causal LMs read the whole conversation through the tokenizer's chat template (rat_hf's own template when the
tokenizer has none, with a warning) in a window of `max_length` tokens: when it would not fit, the oldest turns are left
out of the prompt (`last_dropped_turns` says how many; `history` keeps them). A Reactive Transformer (`model_type`
"rxt") reads only `[Q] query [A]`: the conversation lives in its fixed-size short-term memory (`chat.session`, a
`ReactiveSession`), `clear()` resets it and `load()` re-encodes the saved turns into it.

Saved conversations are one JSON line `{"messages": [{"role": "user", "content": ...}, ...]}`: the PPO-chat seed's chat
JSONL (with roles), which `rat_hf.data.load_chat_jsonl` reads back. `read_conversation` / `read_prompts` read
conversations and batch prompt files, naming `path:line` of a malformed line.
"""

import json
import math
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from .data._checks import decode_utf8_line
from .data.chat import parse_chat_record
from .data.interactions import interaction_prompt_ids
from .reactive import ReactiveSession
from .tokenization.special_tokens import CHAT_TEMPLATE


def _check(name: str, ok: bool, constraint: str, value) -> None:
    if not ok:
        raise ValueError(f"ChatInterface: {name} {constraint}, got {value!r}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class ChatInterface:
    """A conversation with one model: answers, history, save/load, tokenisation diagnostics.

    Args:
        model: a directory written by `save_pretrained`, a Hub id, or a loaded causal LM (RAT, RxT, any transformers
            `...ForCausalLM`).
        tokenizer: a tokenizer or its path/id; default: the one saved with `model` (a path) or `model.name_or_path`.
        max_new_tokens: tokens per answer at most (the PPO-chat seed's 100).
        temperature: sampling temperature; 0 means greedy decoding (the seed samples at 0.7).
        top_p, top_k, repetition_penalty: as in `generate`; None leaves the model's generation config.
        max_length: the prompt window in tokens (the seed's 512): oldest turns are left out beyond it. For RxT it
            bounds the query alone, which is all the decoder reads.
        use_history: False answers every message on its own (RxT: from a fresh memory); `history` still records it.
        device, dtype, trust_remote_code: used when `model` is a path or id (device default: cuda when available).
    """

    def __init__(self, model, tokenizer=None, *, max_new_tokens: int = 100, temperature: float = 0.7,
                 top_p: float | None = None, top_k: int | None = None, repetition_penalty: float | None = None,
                 max_length: int = 512, use_history: bool = True, device=None, dtype=None,
                 trust_remote_code: bool = False):
        _check("max_new_tokens", _is_int(max_new_tokens) and max_new_tokens >= 1, "must be an integer >= 1",
               max_new_tokens)
        _check("temperature", isinstance(temperature, (int, float)) and math.isfinite(temperature)
               and temperature >= 0, "must be a number >= 0 (0 = greedy)", temperature)
        _check("top_p", top_p is None or (isinstance(top_p, (int, float)) and 0 < top_p <= 1), "must be in (0, 1]",
               top_p)
        _check("top_k", top_k is None or (_is_int(top_k) and top_k >= 0), "must be an integer >= 0", top_k)
        _check("repetition_penalty", repetition_penalty is None or (isinstance(repetition_penalty, (int, float))
               and repetition_penalty > 0), "must be > 0", repetition_penalty)
        _check("max_length", _is_int(max_length) and max_length >= 2, "must be an integer >= 2", max_length)
        if isinstance(model, (str, Path)):
            from transformers import AutoModelForCausalLM

            name = str(model)
            kwargs = {} if dtype is None else {"dtype": dtype}
            model = AutoModelForCausalLM.from_pretrained(name, trust_remote_code=trust_remote_code, **kwargs)
            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            tokenizer = name if tokenizer is None else tokenizer
        if device is not None:
            model = model.to(device)
        if tokenizer is None:
            tokenizer = model.name_or_path
        if isinstance(tokenizer, (str, Path)):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer), trust_remote_code=trust_remote_code)
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_new_tokens, self.temperature, self.top_p, self.top_k = max_new_tokens, temperature, top_p, top_k
        self.repetition_penalty, self.max_length, self.use_history = repetition_penalty, max_length, use_history
        self.is_reactive = model.config.model_type == "rxt"
        self.history: list[dict] = []  # {"role", "content"} messages, whatever the model reads
        self.last_dropped_turns = 0  # turns the last causal prompt left out to fit max_length
        self.session: ReactiveSession | None = None
        if self.is_reactive:
            # background=True: the memory update runs while the user reads the answer; the next turn waits for it
            self.session = ReactiveSession(model, tokenizer, background=True)
            self.eos_token_ids = [self.session.eos_token_id]
            self.chat_template = None
            return
        eos = model.generation_config.eos_token_id
        eos = list(eos) if isinstance(eos, (list, tuple)) else [] if eos is None else [eos]
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
            eos.insert(0, tokenizer.eos_token_id)  # the chat template closes every turn with the tokenizer's EOS
        if not eos:
            raise ValueError("ChatInterface: neither the tokenizer nor the model's generation config has an EOS token "
                             "to end answers with")
        self.eos_token_ids = eos
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else model.generation_config.pad_token_id
        self.pad_token_id = pad if pad is not None else eos[0]
        self.chat_template = tokenizer.chat_template
        if self.chat_template is None:
            warnings.warn("the tokenizer has no chat template; using rat_hf's (<|user|>/<|assistant|> headers, turns "
                          "closed by EOS), which the model may not have been trained on", stacklevel=2)
            self.chat_template = CHAT_TEMPLATE

    # --- settings ----------------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.model.device

    def generate_kwargs(self) -> dict:
        """The `generate` arguments of every answer (greedy when temperature is 0)."""
        kwargs = {"max_new_tokens": self.max_new_tokens, "do_sample": self.temperature > 0}
        if self.temperature > 0:
            kwargs["temperature"] = float(self.temperature)
            kwargs.update({k: getattr(self, k) for k in ("top_p", "top_k") if getattr(self, k) is not None})
        if self.repetition_penalty is not None:
            kwargs["repetition_penalty"] = float(self.repetition_penalty)
        if not self.is_reactive:
            kwargs.update(eos_token_id=self.eos_token_ids, pad_token_id=self.pad_token_id)
        return kwargs

    # --- prompts -----------------------------------------------------------------------------------------------------
    def _template_ids(self, messages: list[dict]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False,
                                                  add_generation_prompt=True)
        # the template's text already holds its special tokens (BOS, EOS): adding them again would double them
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _prompt(self, text: str) -> tuple[list[int], int]:
        """The ids the model reads to answer `text` next, and how many old turns were left out to fit max_length."""
        if self.is_reactive:
            ids = interaction_prompt_ids(self.tokenizer, text)  # `[Q] text [A]` as the curriculum trained on it
            if len(ids) > self.max_length:
                raise ValueError(f"the message is {len(ids)} tokens with [Q]/[A], more than max_length="
                                 f"{self.max_length}")
            return ids, 0
        history = self.history if self.use_history else []
        system = [m for m in history[:1] if m["role"] == "system"]  # a leading system message is always kept
        turns = history[len(system):]
        dropped = 0
        while True:
            ids = self._template_ids(system + turns + [{"role": "user", "content": text}])
            if len(ids) <= self.max_length:
                break
            if not turns:
                raise ValueError(f"the message is {len(ids)} tokens in the chat template, more than max_length="
                                 f"{self.max_length}; shorten it or raise max_length")
            # leave out the oldest turn: its user message and everything up to the next user message
            nxt = next((i for i, m in enumerate(turns[1:], 1) if m["role"] == "user"), len(turns))
            turns, dropped = turns[nxt:], dropped + 1
        if ids and int(max(ids)) >= self.model.config.vocab_size:
            raise ValueError(f"the tokenizer produces id {max(ids)}, outside the model's vocabulary "
                             f"({self.model.config.vocab_size}); use the model's own tokenizer")
        return ids, dropped

    def prompt_ids(self, text: str) -> list[int]:
        """The token ids the model would read to answer `text` now (causal: the chat-templated window; RxT: the
        query alone)."""
        return self._prompt(text)[0]

    # --- answers -----------------------------------------------------------------------------------------------------
    def generate_response(self, text: str) -> str:
        """Answer `text` (the next user message) and append both to `history`."""
        if not isinstance(text, str):
            raise ValueError(f"ChatInterface.generate_response: text must be a string, got {type(text).__name__}")
        if self.is_reactive:
            if not self.use_history:
                self.session.reset()
            answer = self.session.interact(text, **self._reactive_kwargs(text))
        else:
            ids, dropped = self._prompt(text)
            answer = self._decode(self._generate(ids))
            self.last_dropped_turns = dropped
        self._record(text, answer)
        return answer

    def stream_response(self, text: str) -> Iterator[str]:
        """An iterator over the answer to `text`, piece by piece as it is generated (the pieces join to what
        `generate_response` returns for the same random state); the turn joins `history` once the answer is complete.
        A bad message (too long for max_length) raises here, before anything is generated."""
        if not isinstance(text, str):
            raise ValueError(f"ChatInterface.stream_response: text must be a string, got {type(text).__name__}")
        if self.is_reactive:
            return self._stream_reactive(text, self._reactive_kwargs(text))
        ids, dropped = self._prompt(text)
        return self._stream_causal(text, ids, dropped)

    def _stream_reactive(self, text: str, kwargs: dict) -> Iterator[str]:
        if not self.use_history:
            self.session.reset()
        pieces = []
        for piece in self.session.interact_stream(text, **kwargs):
            pieces.append(piece)
            yield piece
        self._record(text, "".join(pieces))  # what `interact` returns: the streamer decodes the same ids

    def _stream_causal(self, text: str, ids: list[int], dropped: int) -> Iterator[str]:
        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        result, failure = [], []

        def run():
            try:
                result.append(self._generate(ids, streamer=streamer))
            except BaseException as error:  # re-raised below, in the caller's thread
                failure.append(error)
                streamer.end()

        worker = threading.Thread(target=run, name="rat-chat-generate", daemon=True)
        worker.start()
        yield from streamer
        worker.join()
        if failure:
            raise failure[0]
        self.last_dropped_turns = dropped
        self._record(text, self._decode(result[0]))

    def _reactive_kwargs(self, text: str) -> dict:
        self._prompt(text)  # the max_length check (the session builds the same [Q] query [A] itself)
        return self.generate_kwargs()

    def _generate(self, ids: list[int], streamer=None) -> list[int]:
        """The answer's ids: what `generate` adds after the prompt, up to (without) the first EOS."""
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        with torch.no_grad():
            output = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                         streamer=streamer, **self.generate_kwargs())
        new = output[0, len(ids):].tolist()
        end = next((i for i, t in enumerate(new) if t in self.eos_token_ids), len(new))
        return new[:end]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _record(self, text: str, answer: str) -> None:
        self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]

    # --- the conversation --------------------------------------------------------------------------------------------
    def clear(self) -> None:
        """Forget the conversation: the history, and for RxT the memory (back to its initial state)."""
        self.history = []
        self.last_dropped_turns = 0
        if self.session is not None:
            self.session.reset()

    def restore(self, messages: list[dict]) -> None:
        """Continue the conversation `messages` (`{"role", "content"}` dicts) instead of the current one.

        RxT re-encodes each user message with the assistant reply after it (empty if none) into a fresh memory;
        system messages stay in `history` only (the reactive decoder has no place for them).
        """
        messages = _messages({"messages": list(messages)}, "ChatInterface.restore") if messages else []
        self.clear()
        if self.session is not None:
            for i, message in enumerate(messages):
                if message["role"] == "user":
                    reply = messages[i + 1] if i + 1 < len(messages) else None
                    answer = reply["content"] if reply is not None and reply["role"] == "assistant" else ""
                    self.session.remember(message["content"], answer)
        self.history = [dict(m) for m in messages]

    def answer_conversation(self, messages: list[dict]) -> str:
        """Answer the last user message of `messages` with the turns before it as the conversation (a batch item)."""
        if not messages or messages[-1].get("role") != "user":
            raise ValueError("the conversation must end with a user message to answer")
        self.restore(messages[:-1])
        return self.generate_response(messages[-1]["content"])

    def save(self, path) -> None:
        """Write the conversation as one JSON line `{"messages": [...]}` (valid JSON and JSONL)."""
        if not self.history:
            raise ValueError("nothing to save: the conversation is empty")
        with open(path, "w", encoding="utf-8") as f:
            f.write(json.dumps({"messages": self.history}, ensure_ascii=False) + "\n")

    def load(self, path) -> None:
        """Continue the conversation saved in `path` (see `read_conversation`)."""
        self.restore(read_conversation(path))

    # --- diagnostics -------------------------------------------------------------------------------------------------
    def diagnostics(self, text: str = "Hello! How are you today?") -> dict:
        """Tokenisation facts for `test`: `text`'s ids and tokens, whether decoding round-trips, the special tokens,
        the tokenizer's and the model's EOS/PAD ids, and `problems` (each a sentence) where they disagree."""
        tok, config = self.tokenizer, self.model.config
        ids = tok(text, add_special_tokens=False)["input_ids"]
        decoded = tok.decode(ids)
        special = dict(zip(tok.all_special_tokens, tok.all_special_ids))
        problems, notes = [], []
        if decoded != text:
            problems.append(f"decoding does not round-trip: {text!r} -> {decoded!r}")
        if len(tok) > config.vocab_size:
            problems.append(f"the tokenizer has {len(tok)} tokens, the model's vocabulary {config.vocab_size}")

        def ordinary(token_id) -> str | None:
            """Why `token_id` cannot end a sequence: an ordinary text token (cl100k's 50256 is 'parable'; its
            end-of-text is 100257), or outside the vocabulary."""
            if not 0 <= token_id < len(tok):
                return f"id {token_id} is outside the tokenizer's {len(tok)} tokens"
            if token_id not in special.values():
                return f"id {token_id} is the ordinary token {tok.convert_ids_to_tokens(token_id)!r}"
            return None

        if tok.eos_token_id is None:
            problems.append("the tokenizer has no EOS token")
        elif (why := ordinary(tok.eos_token_id)) is not None:
            problems.append(f"the tokenizer's EOS: {why}")
        model_eos = list(dict.fromkeys(_as_list(config.eos_token_id)
                                       + _as_list(self.model.generation_config.eos_token_id)))
        for token_id in model_eos:
            if (why := ordinary(token_id)) is not None:
                problems.append(f"the model's eos_token_id: {why}")
        if tok.eos_token_id is not None and model_eos and tok.eos_token_id not in model_eos:
            problems.append(f"the tokenizer's EOS is {tok.eos_token_id}, the model's {model_eos}")
        if tok.pad_token_id is not None and tok.pad_token_id == tok.eos_token_id:
            notes.append("PAD is EOS: fine for chat; RL trainers need a pad token distinct from EOS")
        report = {
            "text": text, "ids": ids, "tokens": tok.convert_ids_to_tokens(ids), "decoded": decoded,
            "round_trip": decoded == text, "special_tokens": special, "tokenizer_size": len(tok),
            "model_vocab_size": config.vocab_size, "eos_token": tok.eos_token, "eos_token_id": tok.eos_token_id,
            "pad_token": tok.pad_token, "pad_token_id": tok.pad_token_id, "model_eos_token_id": config.eos_token_id,
            "model_pad_token_id": config.pad_token_id, "generation_eos_token_ids": self.eos_token_ids,
            "prompt_tokens": len(self._prompt(text)[0]), "max_length": self.max_length,
            "problems": problems, "notes": notes,
        }
        if self.is_reactive:
            report.update(query_token_id=self.session.query_token_id, answer_token_id=self.session.answer_token_id)
        return report


def _as_list(value) -> list:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


# --- files --------------------------------------------------------------------------------------------------------
def _json_lines(path) -> Iterator[tuple[int, object]]:
    """(line number, decoded JSON) for every non-blank line; ValueError("path:line: reason") for a bad one."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = decode_utf8_line(raw, lineno)
            except ValueError as error:
                raise ValueError(f"{path}:{lineno}: {error}") from None
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({error.msg} at column {error.colno})") from None


def _parse(record, where: str) -> dict:
    """`parse_chat_record` (the seed's chat JSONL: roles or alternating turns) with `where` before its reason."""
    try:
        return parse_chat_record(record)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None


def _messages(record, where: str) -> list[dict]:
    parsed = _parse(record, where)
    return parsed["prompt"] + parsed["completion"]


def read_conversation(path) -> list[dict]:
    """The one conversation in `path`: a JSON object (possibly over several lines) or a JSONL line, as the seed's
    chat JSONL writes it (`messages`, with or without roles, or a `text` transcript). ValueError naming path:line."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        record = json.loads(raw.decode("utf-8-sig"))
        return _messages(record, f"{path}:1")
    except (UnicodeDecodeError, json.JSONDecodeError):
        pass  # not one JSON document: read it line by line, which names the bad line
    records = list(_json_lines(path))
    if not records:
        raise ValueError(f"{path}: no conversation in the file")
    if len(records) > 1:
        raise ValueError(f"{path}:{records[1][0]}: a second conversation; load takes a file with one (save writes "
                         f"one)")
    lineno, record = records[0]
    return _messages(record, f"{path}:{lineno}")


def read_prompts(path) -> list[tuple[int, dict, list[dict]]]:
    """Batch prompts: `(line number, record, messages)` per prompt, `messages` ending with the user turn to answer.

    A `.jsonl`/`.json` file holds chat JSONL lines as `rat_hf.data.load_chat_jsonl` reads them: TRL's `prompt` (a
    string or a list of messages; a `completion` beside it is a reference), or the seed's `messages` / `text` (the
    turns up to the last user message are the prompt, a reply after it is a reference); the record is kept whole.
    Any other file: every non-blank line is one prompt, the record `{"prompt": line}`. ValueError naming
    `path:line` for a malformed line, or when there is no prompt.
    """
    prompts = []
    if Path(path).suffix.lower() in (".jsonl", ".json"):
        for lineno, record in _json_lines(path):
            where = f"{path}:{lineno}"
            messages = _parse(record, where)["prompt"]
            if not messages or messages[-1]["role"] != "user":
                raise ValueError(f"{where}: the prompt must end with a user message (it ends with "
                                 f"{messages[-1]['role'] if messages else 'nothing'})")
            prompts.append((lineno, record, messages))
    else:
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                try:
                    line = decode_utf8_line(raw, lineno).rstrip("\r\n")
                except ValueError as error:
                    raise ValueError(f"{path}:{lineno}: {error}") from None
                if line.strip():
                    prompts.append((lineno, {"prompt": line}, [{"role": "user", "content": line}]))
    if not prompts:
        raise ValueError(f"{path}: no prompts in the file")
    return prompts


__all__ = ["ChatInterface", "read_conversation", "read_prompts"]
