"""Attention variants: forward and forward+backward throughput of MHA / GQA / MQA / SQA / sSQA / xSQA.

    python bench/bench_rxt_attention.py --out bench/results/rxt_attention.json
    python bench/bench_rxt_attention.py --device cpu --tiny --out /tmp/rxt_attention.json   # smoke test, seconds

One `RxTAttention` layer, the class every RxT component uses (q/k/v projections, RoPE, the registry's attention kernel,
output projection), d=2048 and H=16 heads of 128: MHA (16 query / 16 key-value heads), GQA (16/4), MQA (16/1),
SQA (8/4), sSQA (8/8), xSQA (4/4). Each step runs `--tokens` tokens (default 32k) as `tokens // seq_len` sequences of
1k, 4k and 32k tokens, bf16, sdpa; bidirectional (the encoder and memory attention, as in the SQA paper) and causal
(the decoder). Reported per row: ms per step and tokens/s for the forward and for forward+backward (gradients of the
input and of every weight), and the speed-up over GQA of the same length and masking. The SQA paper's reference
(forward only, A100): xSQA 1.4x GQA at 1k tokens, 2.7x at 32k. The PNG (next to --out) plots tokens/s against length.
"""


import torch

from bench_rxt_common import (base_parser, bench_dtype, png_path, print_table, pyplot, save_figure, timed,
                               write_results)

from rat_hf import RxTConfig  # noqa: E402  (bench_rxt_common put this checkout on the path)
from rat_hf.models.rxt.modeling_rxt import RxTAttention, RxTRotaryEmbedding  # noqa: E402

VARIANTS = ["mha", "gqa", "mqa", "sqa", "ssqa", "xsqa"]


def layer_for(variant: str, causal: bool, a) -> tuple[RxTAttention, RxTConfig]:
    config = RxTConfig(
        vocab_size=128, hidden_size=a.hidden, num_attention_heads=a.heads, num_key_value_heads=a.heads // 4,
        num_query_heads=a.heads // 2, num_hidden_layers=1, max_position_embeddings=max(a.seq_lens),
        **{f"{c}_attention_variant": variant for c in ("self", "cross", "encoder", "memory")},
    )
    config._attn_implementation = a.attn
    torch.manual_seed(0)
    layer = RxTAttention(config, variant, 0, is_causal=causal, rope_queries=True, rope_keys=True)
    for module in layer.modules():
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, std=0.02)
    return layer.to(device=a.device, dtype=bench_dtype(a.device)), config


def measure(variant: str, seq_len: int, causal: bool, a) -> dict:
    layer, config = layer_for(variant, causal, a)
    batch = max(a.tokens // seq_len, 1)
    dtype = bench_dtype(a.device)
    x = torch.randn(batch, seq_len, a.hidden, device=a.device, dtype=dtype, requires_grad=True)
    grad = torch.randn_like(x)
    positions = torch.arange(seq_len, device=a.device)[None]
    position_embeddings = RxTRotaryEmbedding(config).to(a.device)(x, positions)

    def forward():
        with torch.no_grad():
            for _ in range(a.iters):
                layer(x, position_embeddings)

    def forward_backward():
        for _ in range(a.iters):
            x.grad = None
            layer.zero_grad(set_to_none=True)
            layer(x, position_embeddings)[0].backward(grad)

    for fn in (forward, forward_backward):  # warm-up
        fn()
    _, fwd = timed(forward, a.device)
    _, fwd_bwd = timed(forward_backward, a.device)
    tokens = batch * seq_len
    fwd, fwd_bwd = fwd / a.iters, fwd_bwd / a.iters
    return dict(variant=variant, query_heads=layer.num_heads, kv_heads=layer.num_key_value_heads, seq_len=seq_len,
                batch=batch, causal=causal, fwd_ms=round(fwd * 1e3, 3), fwd_bwd_ms=round(fwd_bwd * 1e3, 3),
                fwd_tokens_per_s=round(tokens / fwd), fwd_bwd_tokens_per_s=round(tokens / fwd_bwd))


def plot(rows: list[dict], path: str) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, title in ((axes[0], "fwd_tokens_per_s", "forward"), (axes[1], "fwd_bwd_tokens_per_s", "forward+backward")):
        for color, variant in enumerate(VARIANTS):
            for causal, style in ((False, "-"), (True, "--")):
                sel = [r for r in rows if r["variant"] == variant and r["causal"] == causal]
                if sel:
                    ax.plot([r["seq_len"] for r in sel], [r[key] for r in sel], style, marker="o", color=f"C{color}",
                            label=f"{variant}{' causal' if causal else ''}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel("tokens/s")
        ax.set_title(f"one attention layer, {title}", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    save_figure(fig, path)


def main():
    parser = base_parser(__doc__, "bench/results/rxt_attention.json", "a tiny layer and short sequences (smoke test)")
    parser.add_argument("--attn", default="sdpa", help="attention implementation of the registry")
    parser.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    parser.add_argument("--masking", nargs="+", default=["bidirectional", "causal"], choices=["bidirectional", "causal"])
    parser.add_argument("--iters", type=int, default=None)
    a = parser.parse_args()
    if a.tiny:
        a.hidden, a.heads, a.seq_lens, a.tokens, a.iters = 64, 8, [64, 256], 512, a.iters or 2
    else:
        a.hidden, a.heads, a.seq_lens, a.tokens, a.iters = 2048, 16, [1024, 4096, 32768], 32768, a.iters or 10

    rows = [measure(variant, seq_len, masking == "causal", a)
            for masking in a.masking for seq_len in a.seq_lens for variant in a.variants]
    for r in rows:
        base = next((b for b in rows if b["variant"] == "gqa" and b["seq_len"] == r["seq_len"]
                     and b["causal"] == r["causal"]), None)
        if base is not None:
            r["fwd_speedup_vs_gqa"] = round(base["fwd_ms"] / r["fwd_ms"], 3)
            r["fwd_bwd_speedup_vs_gqa"] = round(base["fwd_bwd_ms"] / r["fwd_bwd_ms"], 3)
    print_table(rows, ["variant", "query_heads", "kv_heads", "seq_len", "batch", "causal", "fwd_ms", "fwd_bwd_ms",
                       "fwd_tokens_per_s", "fwd_bwd_tokens_per_s", "fwd_speedup_vs_gqa", "fwd_bwd_speedup_vs_gqa"])
    write_results(a.out, a.device, rows, setup=dict(hidden_size=a.hidden, num_attention_heads=a.heads,
                                                    head_dim=a.hidden // a.heads, tokens_per_step=a.tokens,
                                                    iters=a.iters, dtype=str(bench_dtype(a.device)), attention=a.attn))
    plot(rows, png_path(a.out))


if __name__ == "__main__":
    main()
