"""`rat-test`: a self-check of a rat_hf installation on tiny random RAT and RxT models.

Every decoding check compares logits, not tokens (greedy tokens of a random tiny model mostly agree even when the
cache is ignored): cached step-by-step logits against a full forward at every step, and the per-step logits that
`generate(output_logits=True)` returns (greedy and seeded sampling) against a full forward over the sequence it
produced. Tolerance `ATOL` (fp32).
"""

import argparse
import sys
import tempfile
import time
import traceback
from pathlib import Path

from .._versions import CACHE_ARGUMENT
from ._common import device, make_parser, one_line, run_tool

ATOL = 1e-4
_TINY_RAT = dict(vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, n_policies=2,
                 max_position_embeddings=64, intermediate_size=64)
_TINY_RXT = dict(vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 num_query_heads=2, intermediate_size=64, stm_size=8, max_position_embeddings=64)


def build_test_parser() -> argparse.ArgumentParser:
    parser = make_parser(
        "test",
        "Self-check of a rat_hf installation. For a tiny RAT and a tiny RxT: build, causality (future tokens do not\n"
        f"change past logits), cache (step-by-step logits with the cache == a full forward, atol {ATOL}), generate\n"
        "(the per-step logits of generate(), greedy and seeded sampling, == a full forward over the produced\n"
        "sequence; greedy and beams with cache == without), save/load bit-exact; and a trained BPE tokenizer.\n"
        "Prints 'PASS name' or 'FAIL name: reason' per check and exits 1 if any failed. --quick runs one config per\n"
        "model (seconds); without it, more configs (REINFORCE gating, GQA, no RoPE, MoE RxT), the offline tiktoken\n"
        "tokenizer and a remote-code load in a fresh process.",
        "examples:\n  rat-test --quick\n  rat-test --device cuda",
    )
    parser.add_argument("--quick", action="store_true", help="one tiny config per model: takes seconds")
    parser.add_argument("--device", default="auto", help="'auto' (cuda when available, else cpu), 'cpu', 'cuda', ...")
    return parser


def expect(ok: bool, message: str) -> None:
    """A failed check (not an `assert`: `python -O` must not turn every check into a PASS)."""
    if not ok:
        raise AssertionError(message)


def _model_checks(name: str, build, extra, dev, tmp: Path, remote: bool):
    """(check name, function) pairs for one model; `extra(model, batch)` gives extra forward inputs (RxT memory)."""
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    state = {}

    def ids(batch, length, seed=0):
        g = torch.Generator().manual_seed(seed)
        return torch.randint(3, state["model"].config.vocab_size, (batch, length), generator=g).to(dev)

    def logits(model, input_ids, more=None, **kw):
        more = extra(model, input_ids.shape[0]) if more is None else more
        with torch.no_grad():
            return model(input_ids=input_ids, **more, **kw).logits

    def check_build():
        torch.manual_seed(0)
        state["model"] = model = build().to(dev).eval()
        out = logits(model, ids(2, 8))
        expect(out.shape == (2, 8, model.config.vocab_size), f"logits shape {tuple(out.shape)}")
        expect(torch.isfinite(out).all(), "non-finite logits")
        return f"{model.num_parameters():,} parameters"

    def check_causality():
        model, x = state["model"], ids(2, 16)
        changed = x.clone()
        changed[:, 9:] = ids(2, 7, seed=1)
        diff = (logits(model, x)[:, :9] - logits(model, changed)[:, :9]).abs().max().item()
        expect(diff <= 1e-5, f"changing tokens 9.. changed logits before them by {diff:.2e}")

    def check_cache():
        model, key = state["model"], CACHE_ARGUMENT  # the name generate() passes the cache under
        worst = 0.0
        for seed, prompt in ((0, 5), (1, 1), (2, 3)):
            x = ids(2, 12, seed=seed)
            full = logits(model, x)
            more = extra(model, 2)
            cache = DynamicCache(config=model.config)
            with torch.no_grad():
                steps = [model(input_ids=x[:, :prompt], use_cache=True, **{key: cache}, **more).logits]
                for t in range(prompt, 12):
                    steps.append(model(input_ids=x[:, t:t + 1], use_cache=True, **{key: cache}, **more).logits)
            step_logits = torch.cat(steps, 1)
            for t in range(12):
                diff = (step_logits[:, t] - full[:, t]).abs().max().item()
                expect(diff <= ATOL, f"cached logits at step {t} (prompt {prompt}, cache passed as {key}=) differ "
                                     f"from the full forward by {diff:.2e}")
                worst = max(worst, diff)
        return f"max |Δlogit| {worst:.1e}, cache passed as {key}="

    def generated_logits_match(model, x, what, **kw):
        more = extra(model, x.shape[0])
        with torch.no_grad():
            out = model.generate(x, output_logits=True, return_dict_in_generate=True, pad_token_id=0, **more, **kw)
        sequences, produced = out.sequences, torch.stack(out.logits, 1)  # [B, T], [B, new, V]
        repeat = sequences.shape[0] // x.shape[0]  # num_return_sequences: generate repeats each row's inputs
        more = {k: v.repeat_interleave(repeat, 0) for k, v in more.items()}
        full = logits(model, sequences, more)[:, x.shape[1] - 1:-1]  # the logits that chose each new token
        worst = 0.0
        for t in range(produced.shape[1]):
            diff = (produced[:, t].float() - full[:, t].float()).abs().max().item()
            expect(diff <= ATOL, f"{what}: generate()'s logits at new token {t} differ from a full forward over the "
                                 f"produced sequence by {diff:.2e}")
            worst = max(worst, diff)
        return sequences, worst

    def check_generate():
        model, x = state["model"], ids(2, 6)
        kw = dict(max_new_tokens=6, do_sample=False)
        cached, worst = generated_logits_match(model, x, "greedy", use_cache=True, **kw)
        expect(cached.shape == (2, 12), f"greedy output shape {tuple(cached.shape)}")
        torch.manual_seed(0)
        sampled, diff = generated_logits_match(model, x[:1], "sampling", do_sample=True, top_k=20, top_p=0.9,
                                               temperature=0.8, max_new_tokens=5, num_return_sequences=3)
        expect(sampled.shape == (3, 11), f"sampled output shape {tuple(sampled.shape)}")
        more = extra(model, 2)
        with torch.no_grad():
            plain = model.generate(x, use_cache=False, pad_token_id=0, **more, **kw)
            expect(torch.equal(cached, plain), "greedy generate with cache != without cache")
            beams = model.generate(x, num_beams=3, pad_token_id=0, **more, **kw)
            plain_beams = model.generate(x, num_beams=3, use_cache=False, pad_token_id=0, **more, **kw)
        expect(beams.shape == (2, 12), f"beam output shape {tuple(beams.shape)}")
        expect(torch.equal(beams, plain_beams), "beam search with cache != without cache")
        return f"max |Δlogit| {max(worst, diff):.1e}"

    def check_save_load():
        model, x = state["model"], ids(2, 8)
        path = tmp / name
        model.save_pretrained(path)
        reloaded = AutoModelForCausalLM.from_pretrained(path).to(dev).eval()
        expect(type(reloaded) is type(model), f"reloaded as {type(reloaded).__name__}")
        for (key, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
            expect(torch.equal(a, b), f"weight {key} changed")
        expect(torch.equal(logits(model, x), logits(reloaded, x)), "reloaded logits differ")
        if remote:
            _check_remote_code(path, x.cpu(), logits(model, x).cpu(), tmp)

    return [(f"{name}/build", check_build), (f"{name}/causality", check_causality), (f"{name}/cache", check_cache),
            (f"{name}/generate", check_generate), (f"{name}/save_load", check_save_load)]


_REMOTE_SCRIPT = """
import sys
sys.modules["rat_hf"] = None  # rat_hf cannot be imported: the checkpoint's own code must do
import torch
from transformers import AutoModelForCausalLM
expected = torch.load(sys.argv[2])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
with torch.no_grad():
    logits = model(input_ids=expected["ids"]).logits
if not torch.equal(logits, expected["logits"]):
    raise SystemExit("remote-code logits differ")
"""


def _check_remote_code(path: Path, ids, logits, tmp: Path) -> None:
    """A fresh process that cannot import rat_hf loads `path` with trust_remote_code and gets the same logits."""
    import subprocess

    import torch

    torch.save({"ids": ids, "logits": logits}, tmp / "expected.pt")
    done = subprocess.run([sys.executable, "-c", _REMOTE_SCRIPT, str(path), str(tmp / "expected.pt")],
                          capture_output=True, text=True, cwd=tmp)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        raise AssertionError(f"remote-code load failed: {lines[-1] if lines else done.returncode}")


def _tokenizer_checks(quick: bool):
    def check_bpe():
        from ..tokenization import train_bpe_tokenizer

        texts = ["The quick brown fox jumps over the lazy dog.", "Attention gates choose heads per token."] * 20
        tok = train_bpe_tokenizer(texts, vocab_size=300)
        sample = "The fox gates héads: 123 ✓"
        expect(tok.decode(tok(sample)["input_ids"]) == sample, "BPE round trip changed the text")
        return f"{len(tok)} tokens"

    def check_tiktoken():
        from ..tokenization import tiktoken_tokenizer

        tok = tiktoken_tokenizer()
        sample = "Hello world, 12345 tokens!"
        expect(tok.decode(tok(sample, add_special_tokens=False)["input_ids"]) == sample, "round trip changed text")
        return f"{len(tok):,} tokens"

    return [("tokenizer/bpe", check_bpe)] + ([] if quick else [("tokenizer/tiktoken", check_tiktoken)])


def _self_test(args, parser) -> int:
    import torch

    dev = device(args.device)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: thread start-up and contention cost more than they save
    try:
        return _run_checks(args, dev)
    finally:
        torch.set_num_threads(threads)


def _all_checks(args, dev, tmp: Path) -> list:
    import torch

    from ..models.rat import RatConfig, RatForCausalLM

    no_extra = lambda model, batch: {}  # noqa: E731
    rat_configs = [("rat", {})]
    if not args.quick:
        rat_configs += [("rat-reinforce", dict(gating_mode="reinforce")),
                        ("rat-gqa-nope", dict(num_key_value_heads=2, use_rope=False, n_policies=1))]
    checks = []
    for name, overrides in rat_configs:
        checks += _model_checks(name, lambda o=overrides: RatForCausalLM(RatConfig(**{**_TINY_RAT, **o})),
                                no_extra, dev, tmp, remote=not args.quick and name == "rat")
    try:
        from ..models.rxt import RxTConfig, RxTForCausalLM
    except ImportError as error:
        print(f"SKIP rxt: {one_line(error)}")
    else:
        def memory(model, batch):  # a fixed, non-trivial memory so the cross-attention matters
            g = torch.Generator().manual_seed(1)
            shape = model.init_memory(batch).shape
            return {"memory": torch.randn(shape, generator=g).to(model.device)}

        rxt_configs = [("rxt", {})] + ([] if args.quick else [("rxt-moe", dict(num_experts=4, num_experts_per_tok=2))])
        for name, overrides in rxt_configs:
            checks += _model_checks(name, lambda o=overrides: RxTForCausalLM(RxTConfig(**{**_TINY_RXT, **o})),
                                    memory, dev, tmp, remote=False)
    return checks + _tokenizer_checks(args.quick)


def _run_checks(args, dev) -> int:
    import transformers

    started, failed, passed = time.perf_counter(), 0, 0
    print(f"rat-test: transformers {transformers.__version__} on {dev}", flush=True)
    with tempfile.TemporaryDirectory(prefix="rat-test-") as tmp:
        skipped = set()
        for name, check in _all_checks(args, dev, Path(tmp)):
            model_name = name.split("/")[0]
            if model_name in skipped:
                print(f"FAIL {name}: skipped, {model_name}/build failed")
                failed += 1
                continue
            try:
                note = check()
            except Exception as error:
                failed += 1
                if name.endswith("/build"):
                    skipped.add(model_name)
                reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                if not isinstance(error, AssertionError):
                    reason = f"{type(error).__name__}: {reason}"
                print(f"FAIL {name}: {reason}", flush=True)
                if args.debug:
                    traceback.print_exc()
            else:
                passed += 1
                print(f"PASS {name}" + (f" ({note})" if note else ""), flush=True)
    seconds = time.perf_counter() - started
    print(f"rat-test: {passed} passed, {failed} failed in {seconds:.1f} s on {dev}")
    return 1 if failed else 0


def test_main(argv=None) -> int:
    """Entry point of `rat-test`."""
    return run_tool(build_test_parser(), _self_test, argv)


test_main.__test__ = False  # not a pytest test
main = test_main
