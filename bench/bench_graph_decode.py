"""Batch-1 (and batch-B) greedy decoding: stock `generate` vs `rat_hf.generation.graph_generate`, side by side.

One process, one GPU, bf16, sdpa, the RAT and Llama configs of `bench/bench_rat.py` (RAT ~120M, Llama 109.5M):
  generate_static  — `generate(cache_implementation="static")` (transformers compiles the forward, mode
                     reduce-overhead, after its first calls); the yardstick of issue 12;
  graph_eager      — `graph_generate(compile_step=False)`: the eager step captured in one CUDA graph;
  graph_compiled   — `graph_generate(compile_step=True)`: the step's forward compiled by inductor, then captured.
Each row: tokens/s of the whole call (prefill + decode, median of --repeats), decode ms per token (graph rows: the
replay loop alone), token identity against references, and the ratio to Llama's generate_static at that batch.
Identity: graph_eager vs `generate(static, disable_compile=True)` (the same eager step; equal in bf16 at batch 1 on
the H200, not at batch 32: see the notes), seeded sampling the same way; graph_compiled in float32 (no TF32) vs
`generate()` with the dynamic cache (inductor changes bf16 rounding, so bf16 greedy tokens may part at near-ties of a
random model; float32 shows the step is the same function).
A kernel profile of one eager step and the graph replay time give the per-token breakdown (bench/graph_decode_notes.md).

    python bench/bench_graph_decode.py --out bench/results/graph_decode.json
    python bench/bench_graph_decode.py --tiny --device cpu        # seconds-long smoke test (no graphs, no compile)
"""

import argparse
import contextlib
import datetime
import gc
import json
import os
import statistics
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench_rat import build  # noqa: E402  (the same two configs as the decode rows of bench_rat.py)

from rat_hf.generation import graph_decode, graph_generate  # noqa: E402

START = time.perf_counter()
DECODE_TIMES = []  # (seconds, steps) of each graph decode loop, recorded by the wrapper below


def _timed_run(self, n_steps, check_every):
    """`_DecodeStep.run` with the device synchronised around it: the decode loop's own time, without the prefill."""
    sync()
    start = time.perf_counter()
    _original_run(self, n_steps, check_every)
    sync()
    DECODE_TIMES.append((time.perf_counter() - start, n_steps))


_original_run = graph_decode._DecodeStep.run
graph_decode._DecodeStep.run = _timed_run


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def elapsed():
    return time.perf_counter() - START


def first_divergence(a: torch.Tensor, b: torch.Tensor):
    """None when equal, else the first generated column where any row differs (or 'length')."""
    if a.shape != b.shape:
        return "length"
    diff = (a != b).any(0).nonzero()
    return None if len(diff) == 0 else int(diff[0])


def timed_calls(fn, warm: int, repeats: int):
    out = None
    for _ in range(warm):
        out = fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - start)
    return out, statistics.median(times)


def decode_row(kind, method, model, prompt, a, refs):
    batch = prompt.shape[0]
    kw = dict(max_new_tokens=a.new_tokens, do_sample=False, pad_token_id=0)
    row = dict(model=kind, method=method, batch=batch)
    t0 = elapsed()
    if method == "generate_static":
        def fn():
            return model.generate(prompt, min_new_tokens=a.new_tokens, cache_implementation="static", **kw)
        out, seconds = timed_calls(fn, warm=2, repeats=a.repeats)  # the first static calls compile
    else:
        compiled = method == "graph_compiled"
        def fn():
            return graph_generate(model, prompt, cuda_graph=a.graphs, compile_step=compiled and a.graphs, **kw)
        DECODE_TIMES.clear()
        out, seconds = timed_calls(fn, warm=1, repeats=a.repeats)
        loop_s, steps = min(DECODE_TIMES[1:] or DECODE_TIMES)
        row["decode_ms_per_token"] = round(1e3 * loop_s / steps, 4)
    assert out.shape == (batch, a.prompt + a.new_tokens), out.shape
    row["tokens_per_s"] = round(batch * a.new_tokens / seconds, 1)
    row["call_ms"] = round(1e3 * seconds, 2)
    row["setup_s"] = round(elapsed() - t0 - seconds * a.repeats, 1)  # compile / capture / warm-up calls
    for name, ref in refs.items():
        row[f"first_divergence_vs_{name}"] = first_divergence(out, ref)
    refs.setdefault(f"{method}", out)
    return row


def kernel_profile(model, prompt, a, compiled: bool):
    """Kernels per decode token and their summed device time, for the step run eagerly (launch by launch)."""
    from torch.profiler import ProfilerActivity, profile

    kw = dict(max_new_tokens=a.new_tokens, do_sample=False, pad_token_id=0, cuda_graph=False, compile_step=compiled)
    graph_generate(model, prompt, **kw)  # warm (and compile)
    sync()
    DECODE_TIMES.clear()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        graph_generate(model, prompt, **kw)
        sync()
    wall_s, steps = DECODE_TIMES[-1]
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    # the profile holds the prefill too; per token = (total - prefill's share) is approximated by total / (steps + 1)
    per_step = len(kernels) / (steps + 1)
    device_us = sum(getattr(e, "device_time", 0.0) for e in kernels) / (steps + 1)
    top = {}
    for e in kernels:
        top[e.name] = top.get(e.name, 0.0) + getattr(e, "device_time", 0.0)
    top = sorted(top.items(), key=lambda kv: -kv[1])[:12]
    return dict(step="compiled" if compiled else "eager", kernels_per_token=round(per_step, 1),
                kernel_time_us_per_token=round(device_us, 1),
                wall_ms_per_token_under_profiler=round(1e3 * wall_s / steps, 3),
                top_kernels_us_per_token=[(name[:90], round(us / (steps + 1), 1)) for name, us in top])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="JSON file for the results")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny sizes, to smoke-test the script (CPU: no graphs)")
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--intermediate", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--policies", type=int, default=3)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batches", default="1", help="comma-separated batch sizes; the first is never skipped")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--variants", default=None,
                   help="JSON list of compile_step values to compare on RAT at batch 1 instead of the full table, e.g. "
                        "'[true, {\"mode\": \"max-autotune-no-cudagraphs\"}]'; \"math\" = default compile, math SDPA")
    p.add_argument("--time-budget", type=float, default=1e9, help="seconds; later optional parts are skipped after")
    a = p.parse_args()
    if a.tiny:
        a.hidden, a.layers, a.heads, a.intermediate, a.vocab = 64, 2, 4, 128, 500
        a.prompt, a.new_tokens, a.repeats = 8, 8, 2
    a.graphs = a.device.startswith("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    rows, profiles, errors = [], [], []
    result = dict(device=torch.cuda.get_device_name() if a.graphs else "cpu", date=datetime.date.today().isoformat(),
                  command=" ".join(["python"] + sys.argv), torch=torch.__version__,
                  transformers=__import__("transformers").__version__, args=vars(a), rows=rows, profiles=profiles,
                  errors=errors)

    def save():
        if a.out:
            os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
            with open(a.out, "w") as f:
                json.dump(result, f, indent=1)

    def attempt(label, fn, optional=True):
        """Run one part; a failure is printed with its traceback and recorded in the JSON, and the next part runs."""
        if optional and elapsed() > a.time_budget:
            errors.append(f"{label}: skipped, time budget spent ({elapsed():.0f} s)")
            print(errors[-1], flush=True)
            return None
        try:
            value = fn()
        except Exception as exc:  # a benchmark part failing must not hide the others' numbers; it is reported
            traceback.print_exc()
            errors.append(f"{label}: {type(exc).__name__}: {exc}"[:500])
            value = None
        print(f"[{elapsed():6.1f} s] {label}: {json.dumps(value)[:400] if value is not None else 'failed'}", flush=True)
        save()
        return value

    batches = [int(b) for b in a.batches.split(",")]
    models = {kind: build(kind, a).eval() for kind in ("rat", "llama")}

    def run_batch(batch: int, first: bool):
        """Every method for both models at one batch size; on the first batch the yardstick rows are never skipped."""
        prompt = torch.randint(1, a.vocab, (batch, a.prompt), generator=torch.Generator().manual_seed(0)).to(a.device)
        for kind in ("rat", "llama"):
            model, refs = models[kind], {}
            # the eager reference: generate() with the static cache, not compiled (the kernels graph_eager captures)
            eager_ref = attempt(f"{kind} b{batch} eager static reference", lambda: model.generate(
                prompt, max_new_tokens=a.new_tokens, do_sample=False, pad_token_id=0, cache_implementation="static",
                disable_compile=True).tolist(), optional=not first)
            if eager_ref is not None:
                refs["generate_static_eager"] = torch.tensor(eager_ref, device=a.device)
            # Llama's yardstick first: the RAT rows' ratios need it; Llama through the graph helper is optional
            methods = ["generate_static", "graph_eager", "graph_compiled"] if kind == "llama" else [
                "graph_eager", "graph_compiled", "generate_static"]
            for method in methods:
                optional = not first or (kind == "llama" and method != "generate_static")
                row = attempt(f"{kind} b{batch} {method}", lambda: decode_row(kind, method, model, prompt, a, refs),
                              optional=optional)
                if row is not None:
                    rows.append(row)
            if first and kind == "rat":  # seeded sampling through the graph == generate()'s, same seed
                def sampling():
                    kw = dict(max_new_tokens=a.new_tokens, do_sample=True, top_k=50, top_p=0.9, temperature=0.8,
                              pad_token_id=0)
                    torch.manual_seed(1)
                    ref = model.generate(prompt, cache_implementation="static", disable_compile=True, **kw)
                    torch.manual_seed(1)
                    out = graph_generate(model, prompt, cuda_graph=a.graphs, compile_step=False, **kw)
                    return dict(sampling_first_divergence_vs_generate_static_eager=first_divergence(out, ref))
                value = attempt("rat sampling identity", sampling)
                if value:
                    result.update(value)
            gc.collect()
            if a.graphs:
                torch.cuda.empty_cache()
        # ratios against Llama's generate_static at the same batch
        base = next((r for r in rows if r["model"] == "llama" and r["method"] == "generate_static"
                     and r["batch"] == batch), None)
        for row in rows:
            if base is not None and row["batch"] == batch:
                row["x_llama_generate_static"] = round(row["tokens_per_s"] / base["tokens_per_s"], 3)
        save()

    if a.variants is not None:  # compile settings for the RAT step, side by side (bench/graph_decode_notes.md)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        prompt = torch.randint(1, a.vocab, (1, a.prompt), generator=torch.Generator().manual_seed(0)).to(a.device)
        kw = dict(max_new_tokens=a.new_tokens, do_sample=False, pad_token_id=0)
        for variant in json.loads(a.variants):
            def one_variant():
                torch._dynamo.reset()
                DECODE_TIMES.clear()
                math = variant == "math"
                with sdpa_kernel([SDPBackend.MATH]) if math else contextlib.nullcontext():
                    # the math row needs its own step (a different compile_step value), not the one captured for `true`
                    step = ({"dynamic": False} if math else variant) if a.graphs else False
                    def fn():
                        return graph_generate(models["rat"], prompt, cuda_graph=a.graphs, compile_step=step, **kw)
                    out, seconds = timed_calls(fn, warm=1, repeats=a.repeats)
                loop_s, steps = min(DECODE_TIMES[1:])
                return dict(model="rat", method="graph_compiled", compile_step=variant, batch=1,
                            decode_ms_per_token=round(1e3 * loop_s / steps, 4),
                            tokens_per_s=round(a.new_tokens / seconds, 1), call_ms=round(1e3 * seconds, 2))
            row = attempt(f"rat variant {variant}", one_variant)
            if row is not None:
                rows.append(row)
        return

    run_batch(batches[0], first=True)
    one = torch.randint(1, a.vocab, (1, a.prompt), generator=torch.Generator().manual_seed(0)).to(a.device)
    if a.graphs:  # kernel counts need the CUDA profiler
        for compiled in (False, True):
            value = attempt(f"rat kernel profile ({'compiled' if compiled else 'eager'} step)",
                            lambda: kernel_profile(models["rat"], one, a, compiled))
            if value is not None:
                profiles.append(value)
    for batch in batches[1:]:
        run_batch(batch, first=False)

    def float32_identity():
        # float32, no TF32: the compiled graph step against generate()'s default (dynamic cache, eager) path
        torch.backends.cuda.matmul.allow_tf32 = False
        model = models["rat"].float()
        ref = model.generate(one, max_new_tokens=a.new_tokens, do_sample=False, pad_token_id=0)
        out = graph_generate(model, one, max_new_tokens=a.new_tokens, do_sample=False, pad_token_id=0,
                             cuda_graph=a.graphs, compile_step=a.graphs)
        return dict(float32_graph_compiled_first_divergence_vs_generate_dynamic=first_divergence(out, ref))
    value = attempt("rat float32 identity (compiled graph vs generate)", float32_identity)
    if value:
        result.update(value)
    save()

    print(f"\n{result['device']}  prompt {a.prompt}, {a.new_tokens} new tokens, bf16")
    for r in rows:
        print("  ".join(f"{k}={v}" for k, v in r.items()))
    for e in errors:
        print("ERROR", e)


if __name__ == "__main__":
    main()
