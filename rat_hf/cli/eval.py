"""`rat-eval`: perplexity of a causal LM on text, or its gap to the exact optimum on a Random Language Model.

    rat-eval --model ./my-rat --dataset default             # the documents rat-train held out
    rat-eval --model ./my-rlm-rat --dataset rlm:vocab_size=32,depth=5,beta=1.0,seed=0 --json

`--dataset default` evaluates, unless `--split` says otherwise, the documents of the offline corpus that `rat-train`
never trains on (`rat_hf.data.held_out`), at the block length the model was trained with when its
directory records it (`rat_train_data.json`, written by `rat-train`). The report says split, block length, tokens.
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

from ._common import (CLIError, add_model_arguments, check_vocabulary, int_at_least, load_model, load_model_tokenizer,
                      load_text, make_parser, one_line, run_tool)

_RLM_KEYS = {"vocab_size": int, "depth": int, "beta": float, "seed": int}
DEFAULT_SPLITS = ("heldout", "train", "all")


def build_eval_parser() -> argparse.ArgumentParser:
    parser = make_parser(
        "eval",
        "Perplexity of a causal LM on a text dataset, or its gap to the optimum on a Random Language Model.\n\n"
        "--dataset is one of:\n"
        "  default                     the offline corpus of the Python standard library's docs; --split heldout\n"
        "                              (the default) scores only the documents rat-train holds out from training,\n"
        "                              'train' the others, 'all' every one (see --max_docs)\n"
        "  PATH                        a local txt/json/jsonl/csv/parquet file or a folder (column --text_column)\n"
        "  NAME                        a Hub dataset (with --dataset_config, --split); the Hub must be reachable\n"
        "  rlm:vocab_size=V,depth=D[,beta=B][,seed=S]\n"
        "                              a Random Language Model (beta defaults to 1.0, seed to 0): the model reads\n"
        "                              symbol ids 0..V-1 directly and its vocabulary must cover V. Reports its mean\n"
        "                              next-token loss on fresh sequences (positions 1..2**D-1; nothing precedes\n"
        "                              position 0), the exact Bayes-optimal loss on the same sequences (± standard\n"
        "                              error over sequences) and the gap between them (paired standard error). The\n"
        "                              gap means something only for a model trained on that RLM: a warning says so.\n\n"
        "Text is tokenized, joined with EOS and cut into --seq_len blocks (pack_for_causal_lm); the loss is the\n"
        "mean next-token cross-entropy in nats over every predicted token, perplexity its exp.",
        "examples:\n"
        "  rat-eval --model ./my-rat --dataset default --max_docs 200 --seq_len 256\n"
        "  rat-eval --model ./my-rat --dataset notes.txt --json\n"
        "  rat-eval --model ./my-rlm-rat --dataset rlm:vocab_size=32,depth=5,beta=1.0,seed=0 --num_sequences 1000",
    )
    add_model_arguments(parser, "tokenizer directory or Hub id for text datasets (default: the --model one; "
                                "not used with rlm:)")
    parser.add_argument("--dataset", required=True, help="'default', a local path, a Hub name, or an rlm: spec")
    parser.add_argument("--dataset_config", default=None, help="Hub dataset configuration (e.g. wikitext-2-raw-v1)")
    parser.add_argument("--split", default=None,
                        help="default: heldout (documents rat-train does not train on), train or all; other "
                             "datasets: the split to read (local files: the name given to them; default 'train')")
    parser.add_argument("--text_column", default="text", help="column holding the text")
    parser.add_argument("--max_docs", type=int_at_least(1), default=None,
                        help="use only the first N documents of a text dataset (before the held-out split)")
    parser.add_argument("--seq_len", type=int_at_least(2), default=None,
                        help="tokens per evaluated block (text); default: the training length recorded in the model "
                             "directory (rat_train_data.json), else min(512, max_position_embeddings)")
    parser.add_argument("--max_sequences", type=int_at_least(1), default=None,
                        help="evaluate at most N blocks (text)")
    parser.add_argument("--num_sequences", type=int_at_least(2), default=512,
                        help="fresh RLM sequences to evaluate on (rlm:)")
    parser.add_argument("--seed", type=int, default=1234, help="seed of the fresh RLM sequences (rlm:)")
    parser.add_argument("--batch_size", type=int_at_least(1), default=8, help="sequences per forward pass")
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


def training_record(model_name: str) -> dict:
    """What `rat-train` recorded about the model's training data (`rat_train_data.json`), or {}."""
    from ..recipes.pretrain import RECORD_FILE

    path = Path(model_name).expanduser() / RECORD_FILE
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


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


def rlm_warning(model, params: dict, record: dict) -> str | None:
    """Why the gap to the RLM optimum says nothing about this model (None when it was trained on this RLM)."""
    if record.get("dataset") == "rlm":
        trained = {k: record.get(f"rlm_{k}") for k in ("vocab_size", "depth", "beta", "seed")}
        if trained != params:
            return (f"the model was trained on another RLM ({trained}), not this one: the gap to the optimum is "
                    "meaningless")
        return None
    if record.get("dataset"):
        return f"the model was trained on text ({record['dataset']}), not on this RLM: the gap to the optimum is " \
               "meaningless"
    if model.config.vocab_size != params["vocab_size"]:
        return (f"the model's vocabulary ({model.config.vocab_size}) is not the RLM's {params['vocab_size']} symbols: "
                "it was not trained on this RLM and the gap to the optimum is meaningless")
    return None


def _eval_rlm(model, params: dict, args) -> dict:
    from ..data import RandomLanguageModel

    if model.config.vocab_size < params["vocab_size"]:  # checked first: a large RLM takes long to build
        raise CLIError(f"the model's vocabulary ({model.config.vocab_size}) does not cover the RLM's "
                       f"{params['vocab_size']} symbols")
    try:
        rlm = RandomLanguageModel(**params)
    except ValueError as error:
        raise CLIError(f"bad RLM spec {args.dataset!r}: {error}") from None
    except (MemoryError, RuntimeError) as error:  # its rule table holds vocab_size**3 float64 numbers
        raise CLIError(f"the RLM {args.dataset!r} does not fit in memory ({params['vocab_size']}**3 rules): "
                       f"{one_line(error)}") from None
    x = rlm.sample(args.num_sequences, seed=args.seed)  # [n, T]
    model_nll = _token_nll(model, x, args.batch_size, not args.no_progress, "rlm").mean(-1)  # [n]
    optimal = rlm.token_nll(x)[:, 1:].mean(-1)  # [n]
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
    """-> (dataset, split description)."""
    if args.dataset == "default":
        from ..data import default_text_corpus, split_documents

        split = args.split or "heldout"
        if split not in DEFAULT_SPLITS:
            raise CLIError(f"--split {split!r}: the default corpus has splits {', '.join(DEFAULT_SPLITS)}")
        corpus = default_text_corpus(max_docs=args.max_docs)
        if split == "all":
            return corpus, "all documents"
        train, held = split_documents(corpus)
        if split == "heldout":
            return held, f"held-out split: {len(held):,} of {len(corpus):,} documents, none trained on by rat-train"
        return train, f"train split: {len(train):,} of {len(corpus):,} documents, the ones rat-train trains on"
    split = args.split or "train"
    ds = load_text(args.dataset, args.dataset_config, split, args.text_column)
    ds = ds.select(range(min(args.max_docs, len(ds)))) if args.max_docs else ds
    return ds, f"split {split!r}: {len(ds):,} documents"


def _eval_text(model, args, record: dict) -> dict:
    import torch

    from ..data import pack_for_causal_lm
    tokenizer = load_model_tokenizer(args)
    if args.no_progress:
        import datasets

        datasets.disable_progress_bars()
    dataset, split = _load_text(args)
    if args.seq_len:
        seq_len, length_note = args.seq_len, "--seq_len"
    elif record.get("seq_len"):
        seq_len, length_note = int(record["seq_len"]), "the training length"
    else:
        seq_len = min(512, getattr(model.config, "max_position_embeddings", 512) or 512)
        length_note = "min(512, max_position_embeddings); the training length is not recorded"
    packed = pack_for_causal_lm(dataset, tokenizer, seq_len)
    if len(packed) == 0:
        raise CLIError(f"dataset {args.dataset!r} ({split}) has fewer than --seq_len={seq_len} tokens; "
                       "lower --seq_len")
    if args.max_sequences:
        packed = packed.select(range(min(args.max_sequences, len(packed))))
    ids = torch.tensor(packed["input_ids"], dtype=torch.long)  # [n, seq_len]
    check_vocabulary(model, tokenizer, ids, f"dataset {args.dataset!r}")
    nll = _token_nll(model, ids, args.batch_size, not args.no_progress, "eval")
    loss = float(nll.mean())
    return {"sequences": ids.shape[0], "seq_len": seq_len, "tokens": nll.numel(), "loss": loss,
            "perplexity": math.exp(loss) if loss < 700 else math.inf, "split": split,
            "note": f"block length {seq_len} ({length_note})"}


def _evaluate(args, parser) -> int:
    rlm = parse_rlm_spec(args.dataset) if args.dataset.startswith("rlm:") else None
    model = load_model(args)
    record = training_record(args.model)
    started = time.perf_counter()
    warning = None
    if rlm is not None:
        warning = rlm_warning(model, rlm, record)
        result = _eval_rlm(model, rlm, args)
    else:
        result = _eval_text(model, args, record)
    result = {"model": args.model, "dataset": args.dataset, "model_type": model.config.model_type,
              "parameters": model.num_parameters(), **result, "seconds": round(time.perf_counter() - started, 3)}
    if warning:
        result["warning"] = warning
        print(f"rat-eval: warning: {warning}", file=sys.stderr)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"model       {args.model} ({result['model_type']}, {result['parameters']:,} parameters)")
    what = f"{result['sequences']:,} sequences of {result['seq_len']} tokens"
    if rlm is None:
        print(f"dataset     {args.dataset} ({result['split']}): {what}, {result['note']}")
    else:
        print(f"dataset     {args.dataset}: {what}; {result['note']}")
    print(f"tokens      {result['tokens']:,} predicted")
    print(f"loss        {result['loss']:.4f} nats/token")
    print(f"perplexity  {result['perplexity']:.3f}")
    if rlm is not None:
        print(f"optimal     {result['optimal_loss']:.4f} ± {result['optimal_loss_stderr']:.4f} nats/token "
              "(exact Bayes-optimal, same sequences and positions)")
        print(f"gap         {result['gap']:.4f} ± {result['gap_stderr']:.4f} nats/token"
              + (" (meaningless: see the warning)" if warning else ""))
    return 0


def eval_main(argv=None) -> int:
    """Entry point of `rat-eval`."""
    return run_tool(build_eval_parser(), _evaluate, argv)


main = eval_main
