"""Command-line tools: `rat-generate`, `rat-eval` and `rat-test` (`rat-train` is `rat_hf.recipes.pretrain:main`).

    rat-generate --model ./my-rat --prompt "The attention" --max_new_tokens 40 --do_sample --top_p 0.9
    rat-eval --model ./my-rat --dataset default --max_docs 200
    rat-eval --model ./my-rlm-rat --dataset rlm:vocab_size=32,depth=5,beta=1.0,seed=0 --json
    rat-test --quick

Without the console scripts installed: `python -m rat_hf.cli generate|eval|test|train ...`.

Errors: bad arguments get argparse's usage line and a one-line `rat-<tool>: error: ...` (exit 2); errors while running
(a missing path, a bad dataset spec, a model id while the Hub is unreachable) the same one-line form, exit 2, no
traceback unless `--debug`. Torch, transformers and datasets are imported only when a tool runs.
"""

import argparse
import contextlib
import json
import math
import re
import sys
import time
from pathlib import Path

TOOLS = ("generate", "eval", "test", "train")
# A Hub id: `name` or `org/name`. Anything else that does not exist locally is reported as a missing path.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
_RLM_KEYS = {"vocab_size": int, "depth": int, "beta": float, "seed": int}
_DTYPES = ("auto", "float32", "bfloat16", "float16")


class CLIError(ValueError):
    """An error the user can fix (a missing path, a bad spec, an unreachable Hub); the tools print it as one line."""


# --- shared plumbing ----------------------------------------------------------------------------------------------
class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def _parser(tool: str, description: str, epilog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"rat-{tool}", description=description, epilog=epilog,
                                     formatter_class=_HelpFormatter)
    parser.add_argument("--debug", action="store_true",
                        help="show full tracebacks and library warnings instead of one-line errors")
    return parser


def _add_model_arguments(parser: argparse.ArgumentParser, tokenizer_help: str) -> None:
    parser.add_argument("--model", required=True, metavar="PATH_OR_ID",
                        help="a directory written by save_pretrained, or a Hub model id (the Hub must be reachable, "
                             "or the model in the Hugging Face cache)")
    parser.add_argument("--tokenizer", metavar="PATH_OR_ID", default=None, help=tokenizer_help)
    parser.add_argument("--trust_remote_code", action="store_true",
                        help="allow the checkpoint's own modeling code (needed for RAT/RxT checkpoints when rat_hf is "
                             "not the package that registered them)")
    parser.add_argument("--device", default="auto", help="'auto' (cuda when available, else cpu), 'cpu', 'cuda', "
                                                         "'cuda:1', ...")
    parser.add_argument("--dtype", default="auto", choices=_DTYPES,
                        help="weights dtype; 'auto' keeps the checkpoint's")


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    return parse


def _float_in(low: float, high: float = math.inf, low_open: bool = True):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value > high or value < low or (low_open and value == low):
            bound = f"in ({low}, {high}]" if high != math.inf else f"> {low}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value
    return parse


def _one_line(error: BaseException) -> str:
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    message = lines[0] if lines else type(error).__name__
    if isinstance(error, (KeyError, AttributeError, TypeError, IndexError, ImportError)) or not lines:
        message = f"{type(error).__name__}: {message}"
    return message


def _run(parser: argparse.ArgumentParser, command, argv) -> int:
    args = parser.parse_args(argv)  # usage errors: argparse prints them and exits 2
    try:
        if not args.debug:
            _quiet_libraries()
        return command(args, parser) or 0
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if args.debug:
            raise
        hint = " (pip install 'rat_hf[train]' adds the optional dependencies)" if isinstance(error, ImportError) else ""
        print(f"{parser.prog}: error: {_one_line(error)}{hint}", file=sys.stderr)
        return 2


def _quiet_libraries() -> None:
    """Library warnings (generation-config notes, datasets cache messages) would bury the one-line output."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        import datasets

        datasets.utils.logging.set_verbosity_error()
    except ImportError:
        pass


def _hub_unreachable() -> str | None:
    """Why the Hugging Face Hub cannot be used now (None when it can): a fast check, instead of ~25 s of retries."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=3).close()
    except OSError as error:
        return f"cannot connect to {host}:{port}: {error}"
    return None


@contextlib.contextmanager
def _offline():
    """Hub offline mode for this block (the cache only), as HF_HUB_OFFLINE=1 would have set it at import."""
    from huggingface_hub import constants

    modules = [constants]
    if "datasets" in sys.modules:
        modules.append(sys.modules["datasets"].config)
    saved = [m.HF_HUB_OFFLINE for m in modules]
    for m in modules:
        m.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        for m, value in zip(modules, saved):
            m.HF_HUB_OFFLINE = value


def _from_hub(load, name: str, what: str, hint: str, **kwargs):
    """`load(name, **kwargs)` for a Hub id; from the cache alone, with a one-line error, when the Hub is unreachable."""
    if not _HUB_ID.fullmatch(name) or name.endswith((".json", ".safetensors", ".bin", ".pt", ".txt")):
        raise CLIError(f"{what} {name!r}: no such file or directory")
    offline = _hub_unreachable()
    if offline is None:
        return load(name, **kwargs)
    try:
        with _offline():
            return load(name, **kwargs)
    except (OSError, ValueError):  # transformers: OSError; datasets: ConnectionError / DatasetNotFoundError
        raise CLIError(f"{what} {name!r} is not a local path, not in the Hugging Face cache, and the Hub is "
                       f"unreachable ({offline}); {hint}") from None


def _from_pretrained(load, name: str, what: str, **kwargs):
    """`load(name, **kwargs)` for a local directory or a Hub id; one-line errors when neither can be had."""
    local = Path(name).expanduser()
    if not local.exists():
        return _from_hub(load, name, what, "pass a local directory", **kwargs)
    if not local.is_dir():
        raise CLIError(f"{what} {name!r} is a file; pass the directory written by save_pretrained")
    if what == "model" and not (local / "config.json").exists():
        raise CLIError(f"model {name!r} has no config.json; pass the directory written by save_pretrained")
    return load(str(local), **kwargs)


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CLIError(f"--device {name!r} is not a torch device (try 'cpu' or 'cuda')") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: CUDA is not available in this torch installation")
    return device


def _load_model(args):
    import torch
    from transformers import AutoModelForCausalLM  # RAT and RxT are registered: importing rat_hf.cli imported rat_hf

    kwargs = {"trust_remote_code": args.trust_remote_code}
    if args.dtype != "auto":
        kwargs["dtype"] = getattr(torch, args.dtype)
    model = _from_pretrained(AutoModelForCausalLM.from_pretrained, args.model, "model", **kwargs)
    return model.to(_device(args.device)).eval()


def _load_tokenizer(args):
    from transformers import AutoTokenizer

    name = args.tokenizer or args.model
    try:
        return _from_pretrained(AutoTokenizer.from_pretrained, name, "tokenizer",
                                trust_remote_code=args.trust_remote_code)
    except CLIError:
        raise
    except (OSError, ValueError) as error:
        hint = "" if args.tokenizer else "; pass --tokenizer"
        raise CLIError(f"no usable tokenizer in {name!r} ({_one_line(error)}){hint}") from None


# --- rat-generate -------------------------------------------------------------------------------------------------
def build_generate_parser() -> argparse.ArgumentParser:
    parser = _parser(
        "generate",
        "Complete prompts with a causal LM (RAT, RxT or any transformers model).\n\n"
        "Loads the model and tokenizer with the Auto classes. For a Reactive Transformer (model_type 'rxt') each\n"
        "--prompt is a query of one conversation (answered from the memory, which then reads the turn); for other\n"
        "models each --prompt is completed on its own. Greedy decoding unless --do_sample or --num_beams > 1.",
        "examples:\n"
        "  rat-generate --model ./my-rat --prompt 'The attention' --max_new_tokens 40\n"
        "  rat-generate --model ./my-rat --prompt 'Once' --do_sample --temperature 0.8 --top_p 0.9 "
        "--num_return_sequences 3 --seed 0\n"
        "  rat-generate --model ./my-rxt --prompt 'Hi, I am Ada.' --prompt 'What is my name?'",
    )
    _add_model_arguments(parser, "tokenizer directory or Hub id (default: the --model one)")
    parser.add_argument("--prompt", action="append", required=True,
                        help="text to complete; repeat for several prompts (RxT: several turns of one conversation)")
    parser.add_argument("--max_new_tokens", type=_int_at_least(1), default=50, help="tokens to generate per prompt")
    parser.add_argument("--do_sample", action="store_true", help="sample instead of greedy / beam search")
    parser.add_argument("--temperature", type=_float_in(0.0), default=None,
                        help="sampling temperature (> 0; needs --do_sample; transformers' default 1.0)")
    parser.add_argument("--top_k", type=_int_at_least(0), default=None,
                        help="keep the k most likely tokens (0 = off; needs --do_sample; transformers' default 50)")
    parser.add_argument("--top_p", type=_float_in(0.0, 1.0), default=None,
                        help="nucleus sampling mass in (0, 1] (needs --do_sample; transformers' default 1.0)")
    parser.add_argument("--repetition_penalty", type=_float_in(0.0), default=None,
                        help="> 1 discourages repeating tokens (CTRL penalty); 1.0 = off")
    parser.add_argument("--num_return_sequences", type=_int_at_least(1), default=1,
                        help="completions per prompt (needs --do_sample, or --num_beams at least as large)")
    parser.add_argument("--num_beams", type=_int_at_least(1), default=1, help="beam search width (1 = no beams)")
    parser.add_argument("--seed", type=int, default=None, help="random seed, for reproducible sampling")
    parser.add_argument("--completion_only", action="store_true",
                        help="print only the generated text, not the prompt before it")
    return parser


def _generation_kwargs(args, parser) -> dict:
    sampling = {k: getattr(args, k) for k in ("temperature", "top_k", "top_p") if getattr(args, k) is not None}
    if sampling and not args.do_sample:
        flags = "/".join(f"--{k}" for k in sampling)
        parser.error(f"{flags} {'applies' if len(sampling) == 1 else 'apply'} only with --do_sample")
    if args.num_return_sequences > args.num_beams and not args.do_sample:
        parser.error(f"--num_return_sequences {args.num_return_sequences} needs --do_sample or "
                     f"--num_beams >= {args.num_return_sequences}")
    kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, num_beams=args.num_beams,
                  num_return_sequences=args.num_return_sequences, **sampling)
    if args.repetition_penalty is not None:
        kwargs["repetition_penalty"] = args.repetition_penalty
    return kwargs


def _generate(args, parser) -> int:
    kwargs = _generation_kwargs(args, parser)
    import torch
    from transformers import set_seed

    model = _load_model(args)
    tokenizer = _load_tokenizer(args)
    if args.seed is not None:
        set_seed(args.seed)
    if model.config.model_type == "rxt":
        return _generate_reactive(model, tokenizer, args, kwargs)
    eos = model.generation_config.eos_token_id
    kwargs["eos_token_id"] = eos if eos is not None else tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else model.generation_config.pad_token_id
    kwargs["pad_token_id"] = pad if pad is not None else kwargs["eos_token_id"]
    several = len(args.prompt) * args.num_return_sequences > 1
    for i, prompt in enumerate(args.prompt, 1):
        encoded = tokenizer(prompt, return_tensors="pt")
        encoded = {k: encoded[k] for k in ("input_ids", "attention_mask") if k in encoded}  # no token_type_ids
        if encoded["input_ids"].shape[1] == 0:
            if tokenizer.bos_token_id is None:
                raise CLIError(f"prompt {i} is empty after tokenization and the tokenizer has no BOS token")
            encoded = {"input_ids": torch.tensor([[tokenizer.bos_token_id]]),
                       "attention_mask": torch.ones(1, 1, dtype=torch.long)}
        encoded = {k: v.to(model.device) for k, v in encoded.items()}
        with torch.no_grad():
            output = model.generate(**encoded, **kwargs)
        completions = tokenizer.batch_decode(output[:, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
        for j, completion in enumerate(completions, 1):
            if several:
                print(f"=== prompt {i}/{len(args.prompt)}, sequence {j}/{len(completions)} ===")
            print(completion if args.completion_only else prompt + completion, flush=True)
    return 0


def _generate_reactive(model, tokenizer, args, kwargs) -> int:
    from .reactive import ReactiveSession

    if args.num_return_sequences != 1:
        raise CLIError("an RxT model gives one answer per query: --num_return_sequences must be 1")
    kwargs.pop("num_return_sequences")
    with ReactiveSession(model, tokenizer, background=False, **kwargs) as session:
        for prompt in args.prompt:
            answer = session.interact(prompt)
            print(answer if args.completion_only else f"[Q] {prompt}\n[A] {answer}", flush=True)
    return 0


def generate_main(argv=None) -> int:
    """Entry point of `rat-generate`."""
    return _run(build_generate_parser(), _generate, argv)


# --- rat-eval -----------------------------------------------------------------------------------------------------
def build_eval_parser() -> argparse.ArgumentParser:
    parser = _parser(
        "eval",
        "Perplexity of a causal LM on a text dataset, or its gap to the optimum on a Random Language Model.\n\n"
        "--dataset is one of:\n"
        "  default                     the offline corpus of the Python standard library's docs (see --max_docs)\n"
        "  PATH                        a local txt/json/jsonl/csv/parquet file or a folder (column --text_column)\n"
        "  NAME                        a Hub dataset (with --dataset_config, --split); the Hub must be reachable\n"
        "  rlm:vocab_size=V,depth=D[,beta=B][,seed=S]\n"
        "                              a Random Language Model (beta defaults to 1.0, seed to 0): the model reads\n"
        "                              symbol ids 0..V-1 directly and its vocabulary must cover V. Reports its mean\n"
        "                              next-token loss on fresh sequences (positions 1..2**D-1; nothing precedes\n"
        "                              position 0), the exact Bayes-optimal loss on the same sequences (± standard\n"
        "                              error over sequences) and the gap between them (paired standard error).\n\n"
        "Text is tokenized, joined with EOS and cut into --seq_len blocks (pack_for_causal_lm); the loss is the\n"
        "mean next-token cross-entropy in nats over every predicted token, perplexity its exp.",
        "examples:\n"
        "  rat-eval --model ./my-rat --dataset default --max_docs 200 --seq_len 256\n"
        "  rat-eval --model ./my-rat --dataset notes.txt --json\n"
        "  rat-eval --model ./my-rlm-rat --dataset rlm:vocab_size=32,depth=5,beta=1.0,seed=0 --num_sequences 1000",
    )
    _add_model_arguments(parser, "tokenizer directory or Hub id for text datasets (default: the --model one; "
                                 "not used with rlm:)")
    parser.add_argument("--dataset", required=True, help="'default', a local path, a Hub name, or an rlm: spec")
    parser.add_argument("--dataset_config", default=None, help="Hub dataset configuration (e.g. wikitext-2-raw-v1)")
    parser.add_argument("--split", default="train", help="dataset split (local files: the name given to them)")
    parser.add_argument("--text_column", default="text", help="column holding the text")
    parser.add_argument("--max_docs", type=_int_at_least(1), default=None,
                        help="use only the first N documents of a text dataset")
    parser.add_argument("--seq_len", type=_int_at_least(2), default=None,
                        help="tokens per evaluated block (text); default min(512, the model's max_position_embeddings)")
    parser.add_argument("--max_sequences", type=_int_at_least(1), default=None,
                        help="evaluate at most N blocks (text)")
    parser.add_argument("--num_sequences", type=_int_at_least(2), default=512,
                        help="fresh RLM sequences to evaluate on (rlm:)")
    parser.add_argument("--seed", type=int, default=1234, help="seed of the fresh RLM sequences (rlm:)")
    parser.add_argument("--batch_size", type=_int_at_least(1), default=8, help="sequences per forward pass")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the text report")
    parser.add_argument("--no_progress", action="store_true", help="no progress bars on stderr")
    return parser


def parse_rlm_spec(spec: str) -> dict:
    """`rlm:vocab_size=32,depth=5,beta=1.0,seed=0` -> `{"vocab_size": 32, "depth": 5, "beta": 1.0, "seed": 0}`."""
    body = spec[len("rlm:"):] if spec.startswith("rlm:") else spec
    params = {"beta": 1.0, "seed": 0}
    for item in filter(None, (p.strip() for p in body.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in _RLM_KEYS:
            raise CLIError(f"bad RLM spec {spec!r}: {item!r} is not one of "
                           f"{', '.join(k + '=...' for k in _RLM_KEYS)}")
        try:
            params[key] = _RLM_KEYS[key](value.strip())
        except ValueError:
            raise CLIError(f"bad RLM spec {spec!r}: {key} must be {_RLM_KEYS[key].__name__}, got {value!r}") from None
    missing = [k for k in ("vocab_size", "depth") if k not in params]
    if missing:
        raise CLIError(f"bad RLM spec {spec!r}: missing {', '.join(missing)} "
                       "(e.g. rlm:vocab_size=32,depth=5,beta=1.0,seed=0)")
    return params


def _token_nll(model, input_ids, batch_size: int, show_progress: bool, desc: str):
    """Next-token NLL in nats of every position after the first: [n, T-1] (float64, on the CPU)."""
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    batches = input_ids.split(batch_size)
    rows = []
    with torch.no_grad():
        for batch in tqdm(batches, desc=desc, unit="batch", file=sys.stderr,
                          disable=not show_progress or len(batches) < 4):
            batch = batch.to(model.device)
            logits = model(input_ids=batch).logits[:, :-1].float()  # [B, T-1, V]
            nll = F.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")  # [B, T-1]
            rows.append(nll.double().cpu())
    return torch.cat(rows)


def _eval_rlm(model, params: dict, args) -> dict:
    from .data import RandomLanguageModel

    if model.config.vocab_size < params["vocab_size"]:  # checked first: a large RLM takes long to build
        raise CLIError(f"the model's vocabulary ({model.config.vocab_size}) does not cover the RLM's "
                       f"{params['vocab_size']} symbols")
    try:
        rlm = RandomLanguageModel(**params)
    except ValueError as error:
        raise CLIError(f"bad RLM spec {args.dataset!r}: {error}") from None
    except (MemoryError, RuntimeError) as error:  # its rule table holds vocab_size**3 float64 numbers
        raise CLIError(f"the RLM {args.dataset!r} does not fit in memory ({params['vocab_size']}**3 rules): "
                       f"{_one_line(error)}") from None
    x = rlm.sample(args.num_sequences, seed=args.seed)  # [n, T]
    model_nll = _token_nll(model, x, args.batch_size, not args.no_progress, "rlm").mean(-1)  # [n]
    optimal = -rlm.next_token_log_probs(x).gather(-1, x.unsqueeze(-1)).squeeze(-1)[:, 1:].mean(-1)  # [n]
    n = x.shape[0]
    loss, best = float(model_nll.mean()), float(optimal.mean())
    return {
        "sequences": n, "seq_len": rlm.seq_len, "tokens": n * (rlm.seq_len - 1), "loss": loss,
        "perplexity": math.exp(loss), "optimal_loss": best,
        "optimal_loss_stderr": float(optimal.std() / math.sqrt(n)), "gap": loss - best,
        "gap_stderr": float((model_nll - optimal).std() / math.sqrt(n)),
        "note": f"fresh sequences (seed {args.seed}), positions 1..{rlm.seq_len - 1}",
    }


def _load_text(args):
    from .data import default_text_corpus, load_text_dataset

    if args.dataset == "default":
        return default_text_corpus(max_docs=args.max_docs)
    local = Path(args.dataset).expanduser()
    kwargs = dict(config=args.dataset_config, split=args.split, text_column=args.text_column)
    if local.exists():
        ds = load_text_dataset(str(local), **kwargs)
    else:
        ds = _from_hub(load_text_dataset, args.dataset, "dataset", "pass a local path, 'default' or an rlm: spec",
                       **kwargs)
    return ds.select(range(min(args.max_docs, len(ds)))) if args.max_docs else ds


def _eval_text(model, args) -> dict:
    import torch

    from .data import pack_for_causal_lm

    tokenizer = _load_tokenizer(args)
    if args.no_progress:
        import datasets

        datasets.disable_progress_bars()
    dataset = _load_text(args)
    seq_len = args.seq_len or min(512, getattr(model.config, "max_position_embeddings", 512) or 512)
    packed = pack_for_causal_lm(dataset, tokenizer, seq_len)
    if len(packed) == 0:
        raise CLIError(f"dataset {args.dataset!r} has fewer than --seq_len={seq_len} tokens; lower --seq_len")
    if args.max_sequences:
        packed = packed.select(range(min(args.max_sequences, len(packed))))
    ids = torch.tensor(packed["input_ids"], dtype=torch.long)  # [n, seq_len]
    if ids.max() >= model.config.vocab_size:
        raise CLIError(f"the tokenizer produces id {int(ids.max())}, outside the model's vocabulary "
                       f"({model.config.vocab_size}); pass the model's own tokenizer")
    nll = _token_nll(model, ids, args.batch_size, not args.no_progress, "eval")
    loss = float(nll.mean())
    return {"sequences": ids.shape[0], "seq_len": seq_len, "tokens": nll.numel(), "loss": loss,
            "perplexity": math.exp(loss) if loss < 700 else math.inf}


def _evaluate(args, parser) -> int:
    rlm = parse_rlm_spec(args.dataset) if args.dataset.startswith("rlm:") else None
    model = _load_model(args)
    started = time.perf_counter()
    result = _eval_rlm(model, rlm, args) if rlm is not None else _eval_text(model, args)
    result = {"model": args.model, "dataset": args.dataset, "model_type": model.config.model_type,
              "parameters": model.num_parameters(), **result, "seconds": round(time.perf_counter() - started, 3)}
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"model       {args.model} ({result['model_type']}, {result['parameters']:,} parameters)")
    what = f"{result['sequences']:,} sequences of {result['seq_len']} tokens"
    print(f"dataset     {args.dataset}: {what}" + (f"; {result['note']}" if rlm else ""))
    print(f"tokens      {result['tokens']:,} predicted")
    print(f"loss        {result['loss']:.4f} nats/token")
    print(f"perplexity  {result['perplexity']:.3f}")
    if rlm is not None:
        print(f"optimal     {result['optimal_loss']:.4f} ± {result['optimal_loss_stderr']:.4f} nats/token "
              "(exact Bayes-optimal, same sequences and positions)")
        print(f"gap         {result['gap']:.4f} ± {result['gap_stderr']:.4f} nats/token")
    return 0


def eval_main(argv=None) -> int:
    """Entry point of `rat-eval`."""
    return _run(build_eval_parser(), _evaluate, argv)


# --- rat-test -----------------------------------------------------------------------------------------------------
def build_test_parser() -> argparse.ArgumentParser:
    parser = _parser(
        "test",
        "Self-check of a rat_hf installation. For a tiny RAT and a tiny RxT: build, causality (future tokens do not\n"
        "change past logits), cached decoding == full forward, generate (greedy with cache == without, sampling,\n"
        "beams), save/load bit-exact; and a trained BPE tokenizer. Prints 'PASS name' or 'FAIL name: reason' per\n"
        "check and exits 1 if any failed. --quick runs one config per model (seconds); without it, more configs\n"
        "(REINFORCE gating, GQA, no RoPE, MoE RxT), the offline tiktoken tokenizer and a remote-code load in a\n"
        "fresh process.",
        "examples:\n  rat-test --quick\n  rat-test --device cuda",
    )
    parser.add_argument("--quick", action="store_true", help="one tiny config per model: takes seconds")
    parser.add_argument("--device", default="auto", help="'auto' (cuda when available, else cpu), 'cpu', 'cuda', ...")
    return parser


_TINY_RAT = dict(vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, n_policies=2,
                 max_position_embeddings=64, intermediate_size=64)
_TINY_RXT = dict(vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 num_query_heads=2, intermediate_size=64, stm_size=8, max_position_embeddings=64)


def _model_checks(name: str, build, extra, device, tmp: Path, remote: bool):
    """(check name, function) pairs for one model; `extra(model, batch)` gives extra forward inputs (RxT memory)."""
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    state = {}

    def ids(batch, length, seed=0):
        g = torch.Generator().manual_seed(seed)
        return torch.randint(3, state["model"].config.vocab_size, (batch, length), generator=g).to(device)

    def logits(model, input_ids, **kw):
        with torch.no_grad():
            return model(input_ids=input_ids, **extra(model, input_ids.shape[0]), **kw).logits

    def check_build():
        torch.manual_seed(0)
        state["model"] = model = build().to(device).eval()
        out = logits(model, ids(2, 8))
        assert out.shape == (2, 8, model.config.vocab_size), f"logits shape {tuple(out.shape)}"
        assert torch.isfinite(out).all(), "non-finite logits"
        return f"{model.num_parameters():,} parameters"

    def check_causality():
        model, x = state["model"], ids(2, 16)
        changed = x.clone()
        changed[:, 9:] = ids(2, 7, seed=1)
        diff = (logits(model, x)[:, :9] - logits(model, changed)[:, :9]).abs().max().item()
        assert diff <= 1e-5, f"changing tokens 9.. changed logits before them by {diff:.2e}"

    def check_cache():
        model, x = state["model"], ids(2, 12)
        full = logits(model, x)
        more = extra(model, 2)
        with torch.no_grad():
            out = model(input_ids=x[:, :5], past_key_values=DynamicCache(config=model.config), use_cache=True, **more)
            steps = [out.logits]
            for t in range(5, 12):
                out = model(input_ids=x[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True, **more)
                steps.append(out.logits)
        diff = (torch.cat(steps, 1) - full).abs().max().item()
        assert diff <= 1e-4, f"step-by-step logits differ from the full forward by {diff:.2e}"

    def check_generate():
        model, x = state["model"], ids(2, 6)
        kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, **extra(model, 2))
        with torch.no_grad():
            cached, plain = model.generate(x, use_cache=True, **kw), model.generate(x, use_cache=False, **kw)
            assert cached.shape == (2, 12), f"greedy output shape {tuple(cached.shape)}"
            assert torch.equal(cached, plain), "greedy generate with cache != without cache"
            beams = model.generate(x, num_beams=3, **kw)
            assert beams.shape == (2, 12), f"beam output shape {tuple(beams.shape)}"
            torch.manual_seed(0)
            sampled = model.generate(x[:1], do_sample=True, top_k=20, top_p=0.9, temperature=0.8, max_new_tokens=5,
                                     num_return_sequences=3, pad_token_id=0, **extra(model, 1))
        assert sampled.shape == (3, 11), f"sampled output shape {tuple(sampled.shape)}"

    def check_save_load():
        model, x = state["model"], ids(2, 8)
        path = tmp / name
        model.save_pretrained(path)
        reloaded = AutoModelForCausalLM.from_pretrained(path).to(device).eval()
        assert type(reloaded) is type(model), f"reloaded as {type(reloaded).__name__}"
        for (key, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
            assert torch.equal(a, b), f"weight {key} changed"
        assert torch.equal(logits(model, x), logits(reloaded, x)), "reloaded logits differ"
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
assert torch.equal(logits, expected["logits"]), "remote-code logits differ"
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
        from .tokenization import train_bpe_tokenizer

        texts = ["The quick brown fox jumps over the lazy dog.", "Attention gates choose heads per token."] * 20
        tok = train_bpe_tokenizer(texts, vocab_size=300)
        sample = "The fox gates héads: 123 ✓"
        assert tok.decode(tok(sample)["input_ids"]) == sample, "BPE round trip changed the text"
        return f"{len(tok)} tokens"

    def check_tiktoken():
        from .tokenization import tiktoken_tokenizer

        tok = tiktoken_tokenizer()
        sample = "Hello world, 12345 tokens!"
        assert tok.decode(tok(sample, add_special_tokens=False)["input_ids"]) == sample, "round trip changed text"
        return f"{len(tok):,} tokens"

    return [("tokenizer/bpe", check_bpe)] + ([] if quick else [("tokenizer/tiktoken", check_tiktoken)])


def _self_test(args, parser) -> int:
    import torch

    device = _device(args.device)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: thread start-up and contention cost more than they save
    try:
        return _run_checks(args, device)
    finally:
        torch.set_num_threads(threads)


def _run_checks(args, device) -> int:
    import tempfile
    import traceback

    import torch

    from .models.rat import RatConfig, RatForCausalLM

    no_extra = lambda model, batch: {}  # noqa: E731
    rat_configs = [("rat", {})]
    if not args.quick:
        rat_configs += [("rat-reinforce", dict(gating_mode="reinforce")),
                        ("rat-gqa-nope", dict(num_key_value_heads=2, use_rope=False, n_policies=1))]
    started, failed, passed = time.perf_counter(), 0, 0
    with tempfile.TemporaryDirectory(prefix="rat-test-") as tmp:
        checks = []
        for name, overrides in rat_configs:
            checks += _model_checks(name, lambda o=overrides: RatForCausalLM(RatConfig(**{**_TINY_RAT, **o})),
                                    no_extra, device, Path(tmp), remote=not args.quick and name == "rat")
        try:
            from .models.rxt import RxTConfig, RxTForCausalLM
        except ImportError as error:
            print(f"SKIP rxt: {_one_line(error)}")
        else:
            def memory(model, batch):  # a fixed, non-trivial memory so the cross-attention matters
                g = torch.Generator().manual_seed(1)
                shape = model.init_memory(batch).shape
                return {"memory": torch.randn(shape, generator=g).to(model.device)}

            rxt_configs = [("rxt", {})] + ([] if args.quick else [("rxt-moe", dict(num_experts=4,
                                                                                   num_experts_per_tok=2))])
            for name, overrides in rxt_configs:
                checks += _model_checks(name, lambda o=overrides: RxTForCausalLM(RxTConfig(**{**_TINY_RXT, **o})),
                                        memory, device, Path(tmp), remote=False)
        checks += _tokenizer_checks(args.quick)
        skipped = set()
        for name, check in checks:
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
    print(f"rat-test: {passed} passed, {failed} failed in {seconds:.1f} s on {device}")
    return 1 if failed else 0


def test_main(argv=None) -> int:
    """Entry point of `rat-test`."""
    return _run(build_test_parser(), _self_test, argv)


test_main.__test__ = False  # not a pytest test


# --- python -m rat_hf.cli ---------------------------------------------------------------------------------------------
def _train_main(argv) -> int:
    try:
        from .recipes.pretrain import main as pretrain_main
    except ImportError as error:
        print(f"rat-train: error: the pretraining recipe is not available ({_one_line(error)})", file=sys.stderr)
        return 2
    return pretrain_main(argv)


def main(argv=None) -> int:
    """`python -m rat_hf.cli TOOL ARGS...`: the console scripts without installing them."""
    argv = sys.argv[1:] if argv is None else list(argv)
    usage = f"usage: python -m rat_hf.cli {{{','.join(TOOLS)}}} [ARGS...]  (TOOL --help for each tool's options)"
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0 if argv else 2
    tool = argv[0].removeprefix("rat-")
    if tool not in TOOLS:
        print(f"{usage}\nrat_hf.cli: error: unknown tool {argv[0]!r}", file=sys.stderr)
        return 2
    entry = {"generate": generate_main, "eval": eval_main, "test": test_main, "train": _train_main}[tool]
    return entry(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
