"""RAT vs a stock `LlamaForCausalLM` of the same width, depth, heads, SwiGLU width and vocabulary, side by side.

Measures, in one process on one GPU, bf16 weights, sdpa attention:
  train  — training tokens/s, MFU and peak memory at T=1024, B=16, eager and `torch.compile`; with `--modes ...,liger`
           also Llama with Liger's kernels (`apply_liger_kernel_to_llama`: RMSNorm, RoPE, SwiGLU, fused linear
           cross-entropy; eager, as Liger is used) where `liger-kernel` is installed;
  decode — `generate` tokens/s at batch 1 and 32 with the default dynamic cache, and with a static cache (which
           `generate` compiles on CUDA).

    python bench/bench_rat.py --part train  --out bench/results/rat_vs_llama_train.json
    python bench/bench_rat.py --part decode --out bench/results/rat_vs_llama_decode.json
    python bench/bench_rat.py --part train --tiny --device cpu      # seconds-long smoke test of the script itself

MFU counts 6 FLOPs per parameter per token plus 12·L·d·T for attention scores (PaLM's formula) over the bf16 dense
peak of an H100/H200 (989 TFLOP/s). Each model's own parameter count is used, so RAT's extra work (gates, conv) is
credited to it.
"""

import argparse
import datetime
import gc
import json
import os
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from rat_hf import RatConfig, RatForCausalLM  # noqa: E402

PEAK_BF16_FLOPS = 989e12


def build(kind: str, a) -> torch.nn.Module:
    common = dict(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate, num_hidden_layers=a.layers,
                  num_attention_heads=a.heads, num_key_value_heads=a.heads, max_position_embeddings=4096,
                  tie_word_embeddings=True, pad_token_id=0, eos_token_id=None, bos_token_id=None)
    torch.manual_seed(0)
    if kind == "llama":
        model = LlamaForCausalLM._from_config(LlamaConfig(**common), attn_implementation="sdpa")
    else:
        model = RatForCausalLM._from_config(RatConfig(**common, n_policies=a.policies), attn_implementation="sdpa")
    return model.to(device=a.device, dtype=torch.bfloat16)


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def train_row(kind: str, compiled: bool, a, liger: bool = False) -> dict:
    if liger:  # patches transformers' Llama classes in place: run after every plain Llama row
        try:
            from liger_kernel.transformers import apply_liger_kernel_to_llama
            apply_liger_kernel_to_llama()
        except Exception as e:  # not installed, or not compatible with this transformers: say so in the row
            return dict(model=kind, mode="liger", error=f"{type(e).__name__}: {e}"[:300])
    model = build(kind, a).train()
    n_params = model.num_parameters()
    step_fn = torch.compile(model) if compiled else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=a.device.startswith("cuda"))
    g = torch.Generator(device="cpu").manual_seed(0)
    batches = [torch.randint(0, a.vocab, (a.batch, a.seq), generator=g).to(a.device) for _ in range(4)]

    def step(i):
        ids = batches[i % len(batches)]
        loss = step_fn(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for i in range(a.warmup):
        step(i)
    sync(a.device)
    if a.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for i in range(a.steps):
        loss = step(i)
    sync(a.device)
    seconds = time.perf_counter() - start
    tok_s = a.steps * a.batch * a.seq / seconds
    flops_per_token = 6 * n_params + 12 * a.layers * a.hidden * a.seq
    row = dict(model=kind, mode="liger" if liger else "compile" if compiled else "eager", params=n_params, tokens_per_s=round(tok_s),
               mfu=round(tok_s * flops_per_token / PEAK_BF16_FLOPS, 4), final_loss=round(loss.item(), 3),
               peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if a.device.startswith("cuda") else None)
    del model, step_fn, opt
    gc.collect()
    if a.device.startswith("cuda"):
        torch.cuda.empty_cache()
    torch._dynamo.reset()
    return row


@torch.no_grad()
def decode_row(kind: str, batch: int, cache: str, a) -> dict:
    model = build(kind, a).eval()
    prompt = torch.randint(1, a.vocab, (batch, a.prompt), generator=torch.Generator().manual_seed(0)).to(a.device)
    kw = dict(max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, do_sample=False, pad_token_id=0)
    if cache == "static":
        kw["cache_implementation"] = "static"
    for _ in range(2 if cache == "static" else 1):  # the first static run compiles
        model.generate(prompt, **kw)
    sync(a.device)
    start = time.perf_counter()
    out = model.generate(prompt, **kw)
    sync(a.device)
    seconds = time.perf_counter() - start
    assert out.shape[1] == a.prompt + a.new_tokens
    row = dict(model=kind, batch=batch, cache=cache, tokens_per_s=round(batch * a.new_tokens / seconds, 1))
    del model
    gc.collect()
    if a.device.startswith("cuda"):
        torch.cuda.empty_cache()
    torch._dynamo.reset()
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["train", "decode"], required=True)
    p.add_argument("--out", default=None, help="JSON file for the results")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny sizes, to smoke-test the script on CPU")
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--intermediate", type=int, default=2048, help="2048 gives the reference Llama's 109.5M parameters")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--policies", type=int, default=3)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--models", default="llama,rat")
    p.add_argument("--modes", default="eager,compile")
    a = p.parse_args()
    if a.tiny:
        a.hidden, a.layers, a.heads, a.intermediate, a.vocab = 64, 2, 4, 128, 500
        a.seq, a.batch, a.warmup, a.steps, a.prompt, a.new_tokens = 64, 2, 1, 2, 8, 8
    torch.backends.cuda.matmul.allow_tf32 = True
    rows = []
    models = a.models.split(",")
    if a.part == "train":
        for mode in a.modes.split(","):
            for kind in (["llama"] if mode == "liger" else models):
                rows.append(train_row(kind, mode == "compile", a, liger=mode == "liger"))
                print(json.dumps(rows[-1]), flush=True)
    else:
        for cache in ("dynamic", "static"):
            for batch in (1, 32):
                for kind in models:
                    rows.append(decode_row(kind, batch, cache, a))
                    print(json.dumps(rows[-1]), flush=True)
    device = torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu"
    result = dict(device=device, date=datetime.date.today().isoformat(), command=" ".join(["python"] + sys.argv),
                  torch=torch.__version__, transformers=__import__("transformers").__version__, args=vars(a), rows=rows)
    print(f"\n{device}  {a.part}")
    key = "mode" if a.part == "train" else "cache"
    for r in rows:
        print("  ".join(f"{k}={r[k]}" for k in r))
    # side-by-side ratios, RAT / Llama, for each setting
    liger = next((x for x in rows if x.get("mode") == "liger" and "tokens_per_s" in x), None)
    for r in rows:
        if r["model"] == "rat" and liger is not None:
            r["tok_s_ratio_vs_llama_liger"] = round(r["tokens_per_s"] / liger["tokens_per_s"], 3)
            r["mem_ratio_vs_llama_liger"] = round(r["peak_mem_gib"] / liger["peak_mem_gib"], 3)
            print(f"RAT {r['mode']} / Llama+Liger: tok/s x{r['tok_s_ratio_vs_llama_liger']}, "
                  f"memory x{r['mem_ratio_vs_llama_liger']}")
        if r["model"] == "rat":
            base = next(x for x in rows if x["model"] == "llama" and x[key] == r[key] and x.get("batch") == r.get("batch"))
            r["tok_s_ratio_vs_llama"] = round(r["tokens_per_s"] / base["tokens_per_s"], 3)
            if r.get("peak_mem_gib"):
                r["mem_ratio_vs_llama"] = round(r["peak_mem_gib"] / base["peak_mem_gib"], 3)
            print(f"RAT/Llama {key}={r[key]} batch={r.get('batch', a.batch)}: tok/s x{r['tok_s_ratio_vs_llama']}"
                  + (f", memory x{r['mem_ratio_vs_llama']}" if "mem_ratio_vs_llama" in r else ""))
    if a.out:
        os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
