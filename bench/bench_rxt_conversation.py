"""Conversation cost: a Reactive Transformer vs a stateless `LlamaForCausalLM` of the same size, turn by turn.

    python bench/bench_rxt_conversation.py --out bench/results/rxt_conversation.json
    python bench/bench_rxt_conversation.py --device cpu --tiny --out /tmp/rxt_conversation.json   # smoke test, seconds

64 turns of 64-token queries and 64-token answers, for 1 and for 32 conversations at once, bf16, sdpa, one GPU.
Random weights (cost does not depend on what is said); greedy decoding with fixed lengths, the same hand-written
loop for both models (no `generate` overhead in either), every phase timed between `cuda.synchronize()` calls.

  Llama (110M: d=768, 12 layers, MHA, SwiGLU 2048, vocab 32k) is stateless: turn t re-reads the whole history,
    t-1 earlier (query, answer) pairs plus the new query, with a fresh KV cache; its KV cache grows with the history.
  RxT (111M: same width, 6 decoder layers with MHA self- and GQA memory cross-attention, 4 SQA encoder layers,
    gated self/interlayer memory attention, 512 slots per STM layer) reads only `[Q] query [A]` from its memory, then
    folds `[Q] query [A] answer [EOS]` into the memory (encoder + memory attention): `ReactiveSession` runs that update
    in the background, so it is reported apart from the answer's latency.

Per turn and model: prompt-phase time (the forward over the prompt, giving the first answer token; median of
`--repeats` runs on fresh caches), answer time (the other answer tokens, KV-cached), memory-update time (RxT), tokens
processed by each phase, and the bytes held between tokens: KV cache (Llama: the history's; RxT: this turn's, plus the
memory's cross-attention keys/values) and the memory itself. Summary: turn-last / turn-1 ratios (target for RxT <= 1.1
while Llama's grow) and cumulative time and tokens. The PNG (next to --out) plots per-turn prompt time, cumulative
time, cumulative tokens and bytes held against the turn.
"""

import statistics

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from bench_rxt_common import (base_parser, bench_dtype, png_path, print_table, pyplot, save_figure, sync, timed,
                               write_results)

from rat_hf import RxTConfig, RxTForCausalLM  # noqa: E402
from rat_hf._versions import CACHE_ARGUMENT  # noqa: E402  (bench_rxt_common put this checkout on the path)

SIZES = {
    "full": dict(
        llama=dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                   num_attention_heads=12, num_key_value_heads=12),
        rxt=dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=6, num_encoder_layers=4,
                 num_attention_heads=12, num_key_value_heads=3, num_query_heads=6, self_attention_variant="mha",
                 cross_attention_variant="gqa", encoder_attention_variant="sqa", memory_attention_variant="sqa",
                 stm_size=512, memory_attention_type="gated_self_interlayer", max_position_embeddings=1024),
    ),
    "tiny": dict(
        llama=dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=4),
        rxt=dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, num_query_heads=2, stm_size=16, max_position_embeddings=256),
    ),
}


def build(kind: str, size: dict, max_positions: int, device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    common = dict(tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if kind == "llama":
        config = LlamaConfig(**size["llama"], max_position_embeddings=max_positions, **common)
        model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa")
    else:
        model = RxTForCausalLM._from_config(RxTConfig(**size["rxt"], **common), attn_implementation="sdpa")
    return model.to(device=device, dtype=bench_dtype(device)).eval()


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def cache_bytes(cache: DynamicCache) -> int:
    return tensor_bytes(t for layer in cache.layers for t in (layer.keys, layer.values) if t is not None)


def answer(model, prompt: torch.Tensor, a, extra: dict) -> tuple[dict, DynamicCache, torch.Tensor]:
    """Prompt phase (median of `a.repeats` fresh-cache runs) then the rest of the answer, greedy, fixed length."""

    def prompt_phase():
        cache = DynamicCache(config=model.config)
        out = model(input_ids=prompt, use_cache=True, logits_to_keep=1, **{CACHE_ARGUMENT: cache}, **extra)
        return cache, out.logits[:, -1].argmax(-1, keepdim=True)

    times = []
    for _ in range(a.repeats):
        (cache, token), seconds = timed(prompt_phase, a.device)
        times.append(seconds)

    def decode():
        tokens = [token]
        for _ in range(a.answer_len - 1):
            out = model(input_ids=tokens[-1], use_cache=True, **{CACHE_ARGUMENT: cache}, **extra)
            tokens.append(out.logits[:, -1].argmax(-1, keepdim=True))
        return torch.cat(tokens, dim=1)

    answer_ids, answer_seconds = timed(decode, a.device)
    row = dict(prompt_tokens=prompt.numel(), prompt_s=statistics.median(times), decode_tokens=answer_ids[:, 1:].numel(),
               answer_s=answer_seconds, kv_cache_bytes=cache_bytes(cache))
    return row, cache, answer_ids


def run_llama(model, queries: list[torch.Tensor], a) -> list[dict]:
    history = torch.empty(queries[0].shape[0], 0, dtype=torch.long, device=a.device)
    rows = []
    for turn, query in enumerate(queries, 1):
        prompt = torch.cat([history, query], dim=1)  # stateless: the whole conversation again
        row, _, answer_ids = answer(model, prompt, a, {})
        history = torch.cat([prompt, answer_ids], dim=1)
        rows.append(dict(turn=turn, **row, update_s=0.0, update_tokens=0, memory_bytes=0))
    return rows


def run_rxt(model, queries: list[torch.Tensor], a) -> list[dict]:
    config = model.config
    batch = queries[0].shape[0]
    q = torch.full((batch, 1), config.query_token_id, device=a.device)
    ans = torch.full((batch, 1), config.answer_token_id, device=a.device)
    eos = torch.full((batch, 1), config.eos_token_id, device=a.device)
    memory = model.init_memory(batch, device=a.device)
    rows = []
    for turn, query in enumerate(queries, 1):
        prompt = torch.cat([q, query, ans], dim=1)  # [Q] query [A]: never the history
        row, cache, answer_ids = answer(model, prompt, a, {"memory": memory})
        memory_kv_bytes = tensor_bytes(t for kv in cache._rxt_memory_key_values[1] for t in kv)
        interaction = torch.cat([prompt, answer_ids, eos], dim=1)
        new_memory, update_seconds = timed(lambda: model.update_memory(memory, interaction), a.device)
        row["kv_cache_bytes"] += memory_kv_bytes
        rows.append(dict(turn=turn, **row, update_s=update_seconds, update_tokens=interaction.numel(),
                         memory_bytes=tensor_bytes([memory])))
        memory = new_memory
    return rows


@torch.no_grad()
def conversations(kind: str, size: dict, max_positions: int, a, rows: list[dict]) -> int:
    """Runs `a.turns` turns for each batch size, appends the rows, returns the model's parameter count."""
    model = build(kind, size, max_positions, a.device)
    run = run_rxt if kind == "rxt" else run_llama
    for batch in a.batch_sizes:
        g = torch.Generator().manual_seed(batch)
        vocab = model.config.vocab_size
        queries = [torch.randint(5, vocab, (batch, a.query_len), generator=g).to(a.device) for _ in range(a.turns)]
        run(model, queries[:2], a)  # warm-up: kernels, allocator, cuBLAS handles
        for r in run(model, queries, a):
            r.update(model=kind, batch=batch, tokens_processed=r["prompt_tokens"] + r["decode_tokens"] + r["update_tokens"])
            rows.append(r)
        print(f"{kind} batch {batch}: done")
    return model.num_parameters()


def summarise(rows: list[dict]) -> list[dict]:
    summary = []
    for model in dict.fromkeys(r["model"] for r in rows):
        for batch in sorted({r["batch"] for r in rows}):
            turns = [r for r in rows if r["model"] == model and r["batch"] == batch]
            first, last = turns[0], turns[-1]
            held = lambda r: r["kv_cache_bytes"] + r["memory_bytes"]  # noqa: E731
            summary.append(dict(
                model=model, batch=batch, turns=len(turns),
                prompt_ms_first=round(first["prompt_s"] * 1e3, 2), prompt_ms_last=round(last["prompt_s"] * 1e3, 2),
                prompt_ratio=round(last["prompt_s"] / first["prompt_s"], 3),
                held_MB_first=round(held(first) / 2**20, 2), held_MB_last=round(held(last) / 2**20, 2),
                held_ratio=round(held(last) / held(first), 3),
                total_s=round(sum(r["prompt_s"] + r["answer_s"] + r["update_s"] for r in turns), 3),
                latency_s=round(sum(r["prompt_s"] + r["answer_s"] for r in turns), 3),
                total_tokens=sum(r["tokens_processed"] for r in turns),
            ))
    return summary


def plot(rows: list[dict], path: str) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.5))
    panels = [
        ("prompt-phase time per turn (ms)", lambda r: r["prompt_s"] * 1e3, False),
        ("cumulative time (s): prompt + answer (+ update)", lambda r: r["prompt_s"] + r["answer_s"] + r["update_s"], True),
        ("cumulative tokens processed", lambda r: r["tokens_processed"], True),
        ("KV cache + memory held (MiB)", lambda r: (r["kv_cache_bytes"] + r["memory_bytes"]) / 2**20, False),
    ]
    for ax, (title, value, cumulative) in zip(axes, panels):
        for model, style in (("rxt", "-"), ("llama", "--")):
            for color, batch in enumerate(sorted({r["batch"] for r in rows})):
                turns = [r for r in rows if r["model"] == model and r["batch"] == batch]
                ys, total = [], 0.0
                for r in turns:
                    total = total + value(r) if cumulative else value(r)
                    ys.append(total)
                ax.plot([r["turn"] for r in turns], ys, style, color=f"C{color}", label=f"{model}, {batch} conv.")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("turn")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    save_figure(fig, path)


def main():
    parser = base_parser(__doc__, "bench/results/rxt_conversation.json", "tiny models and a short conversation (smoke test)")
    parser.add_argument("--turns", type=int, default=None)
    parser.add_argument("--query-len", type=int, default=None)
    parser.add_argument("--answer-len", type=int, default=None)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None)
    parser.add_argument("--repeats", type=int, default=3, help="prompt-phase runs per turn (median)")
    parser.add_argument("--models", nargs="+", default=["rxt", "llama"], choices=["rxt", "llama"])
    a = parser.parse_args()
    defaults = dict(turns=4, query_len=8, answer_len=8, batch_sizes=[1, 2]) if a.tiny else \
        dict(turns=64, query_len=64, answer_len=64, batch_sizes=[1, 32])
    for name, value in defaults.items():
        if getattr(a, name) is None:
            setattr(a, name, value)
    size = SIZES["tiny" if a.tiny else "full"]
    if a.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
    max_positions = a.turns * (a.query_len + a.answer_len) + 16

    rows, params = [], {}
    for kind in a.models:
        params[kind] = conversations(kind, size, max_positions, a, rows)
        sync(a.device)
        if a.device.startswith("cuda"):
            torch.cuda.empty_cache()

    shown = [r for r in rows if r["turn"] in (1, 2, a.turns // 4, a.turns // 2, a.turns)]
    print_table([{**r, "prompt_ms": round(r["prompt_s"] * 1e3, 2), "answer_ms": round(r["answer_s"] * 1e3, 1),
                  "update_ms": round(r["update_s"] * 1e3, 2),
                  "held_MB": round((r["kv_cache_bytes"] + r["memory_bytes"]) / 2**20, 2)} for r in shown],
                ["model", "batch", "turn", "prompt_tokens", "prompt_ms", "answer_ms", "update_ms", "tokens_processed",
                 "held_MB"])
    summary = summarise(rows)
    print()
    print_table(summary, list(summary[0]))
    write_results(a.out, a.device, rows, params=params, summary=summary,
                  setup=dict(turns=a.turns, query_len=a.query_len, answer_len=a.answer_len, batch_sizes=a.batch_sizes,
                             repeats=a.repeats, dtype=str(bench_dtype(a.device)), attention="sdpa",
                             llama=size["llama"], rxt=size["rxt"]))
    plot(rows, png_path(a.out))


if __name__ == "__main__":
    main()
