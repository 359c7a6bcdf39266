"""Event-driven chat with a Reactive Transformer: answer from the memory, fold the interaction in afterwards.

    session = ReactiveSession(model, tokenizer)
    session.interact("Hi, I am Ada.")        # answers from the memory, then schedules the memory update
    session.interact("What is my name?")     # waits for that update first, then answers
    session.save_state("chat.safetensors")   # the conversation is its memory: a fixed-size tensor

A turn's decoder input is `[Q] query [A]` alone, never the history, so its cost stays flat over the conversation. The
memory update (encode `[Q] query [A] answer [EOS]`, then memory attention) runs on a worker thread and, on CUDA, on a
side stream, so `interact` returns as soon as the answer is generated; the next `interact` (or `.memory`) waits for it.
Several conversations run at once with `batch_size=N` and a list of N queries per turn.

A session may be used from several threads: its turns are serialised (a lock is held from reading the memory through
generating to scheduling the update), so every turn reads the memory that the previous one wrote and none is lost.
"""

import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from .data.interactions import interaction_prompt_ids, tokenize_interaction
from .tokenization.special_tokens import check_tokenizer_matches


class ReactiveSession:
    """One or several conversations with an `RxTForCausalLM` (or a PEFT model around one).

    Args:
        model: the reactive model; it needs `init_memory`, `update_memory` and `generate(..., memory=)`.
        tokenizer: for text queries and answers. The `[Q]`/`[A]`/EOS ids come from the model's config and must be the
            tokenizer's (`check_tokenizer_matches`; build the config with `RxTConfig.from_tokenizer`), else ValueError.
        batch_size: conversations held at once; each turn then takes a list of that many queries.
        background: update the memory on a worker thread (and a side CUDA stream); `False` updates inline.
        **generate_kwargs: defaults for every turn's `generate` (e.g. `max_new_tokens`, `do_sample`).
    """

    def __init__(self, model, tokenizer=None, batch_size: int = 1, background: bool = True, **generate_kwargs):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        config = model.config
        self.query_token_id, self.answer_token_id = config.query_token_id, config.answer_token_id
        eos = config.eos_token_id
        self.eos_token_id = eos[0] if isinstance(eos, (list, tuple)) else eos
        self.pad_token_id = config.pad_token_id if config.pad_token_id is not None else self.eos_token_id
        if self.eos_token_id is None:
            raise ValueError("ReactiveSession: the model's config needs an eos_token_id to end answers")
        if tokenizer is not None:
            check_tokenizer_matches(config, tokenizer, where="ReactiveSession")
        self.generate_kwargs = {"max_new_tokens": 256, **generate_kwargs}
        self.device = model.device
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="rxt-memory-update") if background else None
        self._side_stream = torch.cuda.Stream(self.device) if background and self.device.type == "cuda" else None
        self._pending: Future | None = None
        # held across read-memory -> generate -> schedule-update, so turns from several threads never read the same
        # memory (the later update would overwrite the earlier turn); re-entrant because a turn reads `.memory`
        self._lock = threading.RLock()
        self._memory = self._fresh_memory()
        self.turns = 0
        self.last_update_seconds: float | None = None  # wall time of the last memory update, measured where it ran

    # --- memory ------------------------------------------------------------------------------------------------------
    def _fresh_memory(self) -> torch.Tensor:
        with torch.no_grad():
            return self.model.init_memory(self.batch_size, device=self.device)

    @property
    def memory(self) -> torch.Tensor:
        """The memory after every finished turn (waits for a pending update and for a turn in progress)."""
        with self._lock:
            self.wait()
            return self._memory

    def wait(self) -> None:
        """Block until the scheduled memory update has finished."""
        with self._lock:
            if self._pending is None:
                return
            # a failed update re-raises here on every call until `reset()`: never go on with a stale memory
            memory, done = self._pending.result()
            self._pending = None
            if done is not None:  # later work on this thread's stream must see the side stream's result
                torch.cuda.current_stream(self.device).wait_event(done)
                memory.record_stream(torch.cuda.current_stream(self.device))
            self._memory = memory

    def reset(self) -> None:
        """Start the conversations over from the initial memory."""
        with self._lock:
            if self._pending is not None:
                self._pending.exception()  # let it finish; its result (or error) no longer matters
                self._pending = None
            self._memory = self._fresh_memory()
            self.turns = 0

    def save_state(self, path) -> None:
        """Write the conversations' memory (and turn count) to a safetensors file."""
        from safetensors.torch import save_file

        with self._lock:  # the memory and the turn count of the same turn
            memory, turns = self.memory.detach().contiguous().cpu(), self.turns
        save_file({"memory": memory}, str(path), metadata={"format": "rxt-memory", "turns": str(turns)})

    def load_state(self, path) -> None:
        """Continue the conversations saved by `save_state` (the batch size becomes the saved one)."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            memory, metadata = f.get_tensor("memory"), f.metadata() or {}
        config = self.model.config
        expected = (config.num_hidden_layers, config.stm_size, config.hidden_size)
        if memory.dim() != 4 or tuple(memory.shape[1:]) != expected:
            raise ValueError(f"ReactiveSession.load_state: {path} holds a memory of shape {list(memory.shape)}, this "
                             f"model needs [batch, {', '.join(map(str, expected))}]")
        with self._lock:
            self.wait()
            self._memory = memory.to(device=self.device, dtype=self._memory.dtype)
            self.batch_size = memory.shape[0]
            self.turns = int(metadata.get("turns", 0))

    # --- turns -------------------------------------------------------------------------------------------------------
    def interact(self, query: str | Sequence[str], **generate_kwargs) -> str | list[str]:
        """Answer `query` (a list of `batch_size` queries for batched sessions) and schedule the memory update."""
        queries = self._as_batch(query)
        answers = [self._decode(a) for a in self.interact_ids([self._query_ids(q) for q in queries], **generate_kwargs)]
        return answers[0] if isinstance(query, str) else answers

    def interact_stream(self, query: str, **generate_kwargs) -> Iterator[str]:
        """Yield the answer to `query` piece by piece as it is generated (one conversation); then update the memory."""
        from transformers import TextIteratorStreamer

        if self.batch_size != 1:
            raise ValueError("ReactiveSession.interact_stream streams one conversation; use interact for batches")
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        ids = [self._query_ids(query)]
        result, failure = [], []

        def run():
            try:
                result.append(self.interact_ids(ids, streamer=streamer, **generate_kwargs))
            except BaseException as error:  # re-raised in the caller's thread
                failure.append(error)
                streamer.end()

        worker = threading.Thread(target=run, name="rxt-generate", daemon=True)
        worker.start()
        first = True
        for piece in streamer:  # the pieces join to what `interact` returns: the format's leading space left out
            if first and piece:
                piece, first = piece.removeprefix(" "), False
            yield piece
        worker.join()
        if failure:
            raise failure[0]

    def interact_ids(self, query_ids: Sequence[Sequence[int]], **generate_kwargs) -> list[list[int]]:
        """Token-level turn: `batch_size` queries (ids without `[Q]`/`[A]`) in, the answers' ids (no EOS) out.

        The model reads `[Q] *ids [A]`. A model trained by the curriculum expects the ids of
        `interaction_prompt_ids(tokenizer, query)[1:-1]` (what `interact` passes): the query with the spaces around it.
        Turns from several threads run one after another, each reading the memory the previous one wrote.
        """
        with self._lock:
            return self._turn(query_ids, **generate_kwargs)

    def remember(self, query: str, answer: str) -> None:
        """Fold in a finished interaction this session did not generate (restoring a saved chat, seeding a fact).

        The memory is updated with `[Q] query [A] answer [EOS]` tokenized as the curriculum writes a finished turn
        (`rat_hf.data.interactions.tokenize_interaction`), which is what a live turn encodes after answering.
        """
        if self.batch_size != 1:
            raise ValueError(f"ReactiveSession.remember: takes one interaction; this session holds {self.batch_size}")
        query, answer = self._as_batch(query)[0], self._as_batch(answer)[0]
        row = tokenize_interaction(self.tokenizer, query, answer)["input_ids"][:-1] + [self.eos_token_id]
        input_ids, attention_mask = self._left_pad([row])
        with self._lock:
            self._schedule_update(self.memory, input_ids, attention_mask)  # `.memory` waits for the previous update
            self.turns += 1

    def _turn(self, query_ids: Sequence[Sequence[int]], **generate_kwargs) -> list[list[int]]:
        if len(query_ids) != self.batch_size:
            raise ValueError(f"ReactiveSession: expected {self.batch_size} queries (batch_size), got {len(query_ids)}")
        prompts = [[self.query_token_id, *map(int, q), self.answer_token_id] for q in query_ids]
        input_ids, attention_mask = self._left_pad(prompts)
        memory = self.memory  # waits for the previous turn's update
        kwargs = {**self.generate_kwargs, **generate_kwargs}
        kwargs.setdefault("eos_token_id", self.eos_token_id)
        kwargs.setdefault("pad_token_id", self.pad_token_id)
        with torch.no_grad():
            output = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, memory=memory, **kwargs)
        answers = output[:, input_ids.shape[1]:]  # [B, A]
        # a row's answer ends at its first EOS; what follows is padding
        is_eos = answers == self.eos_token_id
        after_eos = (is_eos.cumsum(-1) - is_eos.long()) > 0
        answer_mask = ~after_eos  # keeps the EOS itself
        ended = is_eos.any(-1, keepdim=True)
        # the interaction the memory reads: [Q] query [A] answer [EOS] (an EOS is added where generation was cut off)
        closing = torch.full_like(ended, self.eos_token_id, dtype=answers.dtype)
        interaction = torch.cat([input_ids, answers, closing], dim=-1)
        interaction_mask = torch.cat([attention_mask, answer_mask.long(), (~ended).long()], dim=-1)
        self._schedule_update(memory, interaction, interaction_mask)
        self.turns += 1
        keep = answer_mask & ~is_eos
        return [row[m].tolist() for row, m in zip(answers, keep)]

    # --- helpers -----------------------------------------------------------------------------------------------------
    def _query_ids(self, query: str) -> list[int]:
        """The ids between `[Q]` and `[A]` of a text query, as the curriculum trained on them."""
        if self.tokenizer is None:
            raise ValueError("ReactiveSession: text turns need a tokenizer; use interact_ids for token ids")
        return interaction_prompt_ids(self.tokenizer, query)[1:-1]

    def _schedule_update(self, memory: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        if self._executor is None:
            self._pending = Future()
            self._pending.set_result(self._update(memory, input_ids, attention_mask, None))
            return
        ready = None
        if self._side_stream is not None:
            main = torch.cuda.current_stream(self.device)
            ready = main.record_event()  # the side stream starts once the answer is there
            for tensor in (memory, input_ids, attention_mask):
                tensor.record_stream(self._side_stream)  # not reused by the allocator until the side stream is done
        self._pending = self._executor.submit(self._update, memory, input_ids, attention_mask, ready)

    def _update(self, memory, input_ids, attention_mask, ready) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        start = time.perf_counter()
        done = None
        with torch.no_grad():
            if self._side_stream is None:
                new_memory = self.model.update_memory(memory, input_ids, attention_mask)
            else:
                with torch.cuda.stream(self._side_stream):
                    self._side_stream.wait_event(ready)
                    new_memory = self.model.update_memory(memory, input_ids, attention_mask)
                    done = self._side_stream.record_event()
                done.synchronize()  # blocks this worker only, so the time below is the update's
        self.last_update_seconds = time.perf_counter() - start
        return new_memory, done

    def _left_pad(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, width - len(row):] = 1
        return input_ids.to(self.device), attention_mask.to(self.device)

    def _as_batch(self, query) -> list[str]:
        if self.tokenizer is None:
            raise ValueError("ReactiveSession: text turns need a tokenizer; use interact_ids for token ids")
        return [query] if isinstance(query, str) else list(query)

    def _decode(self, ids: list[int]) -> str:
        # the format puts a space between `[A]` and the answer (`tokenize_interaction`): it belongs to the format, not
        # to the answer, so `remember(query, interact(query))` writes what the live turn wrote
        return self.tokenizer.decode(ids, skip_special_tokens=True).removeprefix(" ")

    def close(self) -> None:
        """Finish the pending update and stop the worker thread."""
        with self._lock:
            self.wait()
            if self._executor is not None:
                self._executor.shutdown()

    def __enter__(self) -> "ReactiveSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["ReactiveSession"]
