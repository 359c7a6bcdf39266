"""Text corpora that need no download, the online loaders, and packing for causal-LM training.

* `default_text_corpus()`: real English from the installed Python standard library — the language reference and
  library topics of `pydoc_data` (the text of `help('topic')`), then the docstrings of every stdlib module, class
  and function (parsed with `ast`, nothing is imported), cleaned and deduplicated, in a fixed order. About 2 MB;
  building takes ~5-10 s, so the records are cached in memory and on disk (one file per Python version).
* `default_dialogs()`: the conversations of the PyPI package `chatterbot-corpus` as chat messages.
* `load_text_dataset(name_or_path, ...)`: `datasets.load_dataset` for a Hub name (e.g. "wikitext",
  "wikitext-2-raw-v1") or a local txt/json/jsonl/csv/parquet file or folder, with a `text` column.
* `pack_for_causal_lm(dataset, tokenizer, seq_len)`: tokenize, join documents with EOS, cut into `seq_len` blocks.
"""

import ast
import builtins
import functools
import hashlib
import json
import os
import platform
import re
import sysconfig
import warnings
from pathlib import Path

from ._checks import check_int

# Bump when the cleaning rules change, so stale caches are not reused.
_CORPUS_VERSION = 1
# Short docstrings ("Return self.") are mostly noise; 15 words keeps explanations and drops one-liners.
_MIN_WORDS = 15
_BULLET = re.compile(r"\s*([-*+]|\d+[.)]|[a-z][.)])\s")
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "pydoc_data"}
_LOCAL_BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".csv": "csv",
                   ".parquet": "parquet"}


def cache_dir() -> Path:
    """Where rat_hf caches built corpora: `$RAT_HF_CACHE`, else `~/.cache/rat_hf`."""
    return Path(os.environ.get("RAT_HF_CACHE") or Path.home() / ".cache" / "rat_hf")


# --- the standard-library corpus ------------------------------------------------------------------------------------
def _clean(text: str) -> str | None:
    """Drop doctest and code-like paragraphs, unwrap prose lines; None when too little prose remains."""
    kept = []
    for para in re.split(r"\n\s*\n", text.replace("\r\n", "\n")):
        lines = [ln.rstrip() for ln in para.strip("\n").split("\n")]
        if not any(ln.strip() for ln in lines):
            continue
        code = sum(ln.lstrip().startswith((">>>", "...", "$ ", "%")) for ln in lines)
        letters = sum(c.isalpha() for c in para)
        if code * 2 >= len(lines) or letters < 0.5 * len(para.strip()):
            continue
        prose = not any(ln[:1].isspace() or _BULLET.match(ln) for ln in lines)
        kept.append(" ".join(ln.strip() for ln in lines) if prose else "\n".join(lines))  # unwrap prose only
    out = "\n\n".join(kept).strip()
    return out if len(out.split()) >= _MIN_WORDS else None


def _docstrings(tree: ast.Module):
    """(qualified name, docstring) for the module and its classes/functions, in source order."""
    def visit(node, prefix):
        for child in node.body:
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}.{child.name}" if prefix else child.name
                doc = ast.get_docstring(child)
                if doc:
                    yield name, doc
                yield from visit(child, name)

    doc = ast.get_docstring(tree)
    if doc:
        yield "", doc
    yield from visit(tree, "")


def _stdlib_files(root: Path) -> list:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("lib-dynload"))
        files += [Path(dirpath) / f for f in filenames if f.endswith(".py") and not f.startswith("test_")]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _build_stdlib_records() -> list:
    from pydoc_data.topics import topics

    raw = [(f"pydoc_data:{name}", topics[name]) for name in sorted(topics)]
    for name in sorted(dir(builtins)):  # C-implemented builtins: str, dict, open, ... (docs, no source file)
        obj = getattr(builtins, name)
        if isinstance(obj, type) or callable(obj):
            raw.append((f"builtins:{name}", obj.__doc__ or ""))
            if isinstance(obj, type):
                raw += [(f"builtins:{name}.{m}", getattr(obj, m).__doc__ or "") for m in sorted(vars(obj))
                        if not m.startswith("_")]
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in _stdlib_files(root):
        rel = path.relative_to(root).as_posix()
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError) as err:  # e.g. lib2to3 test data written in Python 2 syntax
            warnings.warn(f"default_text_corpus: skipping {path}: {err}")
            continue
        raw += [(f"{rel}:{qual}" if qual else rel, doc) for qual, doc in _docstrings(tree)]
    records, seen = [], set()
    for source, text in raw:
        text = _clean(text)
        if text is None:
            continue
        key = hashlib.sha1(" ".join(text.split()).lower().encode()).hexdigest()
        if key not in seen:
            seen.add(key)
            records.append({"text": text, "source": source})
    return records


@functools.lru_cache(maxsize=1)
def _stdlib_records() -> tuple:
    tag = f"{platform.python_implementation()}-{platform.python_version()}-v{_CORPUS_VERSION}"
    path = cache_dir() / f"stdlib_corpus-{tag}.jsonl"
    if path.exists():
        with open(path, encoding="utf-8") as f:
            return tuple(json.loads(line) for line in f)
    records = _build_stdlib_records()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    os.replace(tmp, path)  # atomic: concurrent builders never see half a file
    return tuple(records)


def default_text_records(max_docs: int | None = None, max_chars: int | None = None) -> list[dict]:
    """The documents of `default_text_corpus` as plain `{"text", "source"}` dicts, without `datasets` (for scripts
    that run where it is not installed, e.g. `bench/rat_ablation.py` on the GPU image). Same arguments."""
    for name, value in (("max_docs", max_docs), ("max_chars", max_chars)):
        if value is not None:
            check_int(name, value, 1)
    records, total = [], 0
    for r in _stdlib_records()[:max_docs]:
        if max_chars is not None and total >= max_chars:
            break
        records.append(dict(r))
        total += len(r["text"])
    return records


def default_text_corpus(max_docs: int | None = None, max_chars: int | None = None):
    """English text from the installed stdlib's docs and docstrings: a `datasets.Dataset` (`text`, `source`).

    Deterministic for a given Python version. `max_docs` / `max_chars` keep a prefix of the fixed order (the
    document that crosses `max_chars` is kept whole).
    """
    from datasets import Dataset

    records = default_text_records(max_docs, max_chars)
    return Dataset.from_dict({"text": [r["text"] for r in records], "source": [r["source"] for r in records]})


# --- dialogs --------------------------------------------------------------------------------------------------------
def default_dialogs(language: str = "english"):
    """Conversations of `chatterbot-corpus` as a `datasets.Dataset` (`messages`, `category`).

    Turns alternate user / assistant, starting with the user. Malformed entries of the package (one in English
    trivia is a bare string) are skipped with a warning naming file and index.
    """
    import yaml
    from chatterbot_corpus.corpus import DATA_DIRECTORY
    from datasets import Dataset

    folder = Path(DATA_DIRECTORY) / language
    if not folder.is_dir():
        available = sorted(p.name for p in Path(DATA_DIRECTORY).iterdir() if p.is_dir())
        raise ValueError(f"language must be one of {available}, got {language!r}")
    messages, categories, skipped = [], [], []
    for path in sorted(folder.glob("*.yml")):
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=yaml.BaseLoader)  # BaseLoader: every scalar stays text ('yes', '1984')
        category = (data.get("categories") or [path.stem])[0]
        for i, conv in enumerate(data.get("conversations", [])):
            if not isinstance(conv, list) or len(conv) < 2 or not all(isinstance(t, str) for t in conv):
                skipped.append(f"{path.name}[{i}]")
                continue
            roles = ["user", "assistant"] * len(conv)
            messages.append([{"role": r, "content": t.strip()} for r, t in zip(roles, conv)])
            categories.append(category)
    if skipped:
        warnings.warn(f"default_dialogs: skipped {len(skipped)} malformed conversation(s): {', '.join(skipped)}")
    return Dataset.from_dict({"messages": messages, "category": categories})


# --- online / local loaders -----------------------------------------------------------------------------------------
def load_text_dataset(name_or_path: str, config: str | None = None, split: str = "train", text_column: str = "text",
                      **load_kwargs):
    """Load a text dataset through `datasets.load_dataset`, Hub name or local file/folder alike; column `text`.

    A local file is read with the builder for its extension (txt: one row per line, unless
    `sample_by="document"`); a folder is given to `load_dataset` as is. `text_column` is renamed to `text`.
    """
    from datasets import load_dataset

    path = Path(name_or_path)
    if path.is_file():
        builder = _LOCAL_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(f"name_or_path: unsupported file type {path.suffix!r} for {path} "
                             f"(supported: {', '.join(sorted(_LOCAL_BUILDERS))})")
        ds = load_dataset(builder, config, data_files={split: str(path)}, split=split, **load_kwargs)
    else:
        ds = load_dataset(str(name_or_path), config, split=split, **load_kwargs)
    if text_column not in ds.column_names:
        raise ValueError(f"text_column {text_column!r} not in {name_or_path}: columns are {ds.column_names}")
    if text_column != "text":
        if "text" in ds.column_names:
            raise ValueError(f"text_column {text_column!r}: {name_or_path} already has a different 'text' column")
        ds = ds.rename_column(text_column, "text")
    return ds


# --- packing --------------------------------------------------------------------------------------------------------
# The share of the default corpus's documents that rat-train holds out (and rat-eval scores by default).
EVAL_FRACTION = 0.05


def held_out(text: str, fraction: float = EVAL_FRACTION) -> bool:
    """Whether rat-train keeps the document `text` out of training: a hash of the text below `fraction`.

    Depends on nothing but the text, so a larger fraction holds out a superset, and `rat-eval` finds the same
    documents whatever `--max_docs`, tokenizer or block length the model was trained with.
    """
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < fraction


def split_documents(texts, fraction: float = EVAL_FRACTION):
    """A text `Dataset` -> (training documents, held-out documents), by `held_out`."""
    flags = [held_out(t or "", fraction) for t in texts["text"]]
    return (texts.select([i for i, f in enumerate(flags) if not f]),
            texts.select([i for i, f in enumerate(flags) if f]))


def pack_for_causal_lm(dataset, tokenizer, seq_len: int, text_column: str = "text", num_proc: int | None = None,
                       batch_size: int = 1000):
    """Tokenize `dataset[text_column]`, put EOS after every document, and cut the stream into `seq_len` blocks.

    Returns a `datasets.Dataset` with `input_ids` and `labels` (equal: the model shifts), every row exactly
    `seq_len` long. Blank documents are skipped (they would add only an EOS). Within each map batch of
    `batch_size` documents the tail shorter than `seq_len` is dropped, as in transformers' run_clm. Tokenizing
    runs in `num_proc` processes; packing (cheap) in one, so the result does not depend on `num_proc`.
    """
    check_int("seq_len", seq_len, 2)
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no eos_token: documents could not be separated")
    if text_column not in dataset.column_names:
        raise ValueError(f"text_column {text_column!r} not in dataset columns {dataset.column_names}")
    eos = tokenizer.eos_token_id

    def tokenize(batch):
        texts = [t for t in batch[text_column] if t is not None and t.strip()]
        ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"] if texts else []
        return {"input_ids": [x + [eos] for x in ids]}

    def group(batch):
        stream = [t for x in batch["input_ids"] for t in x]
        blocks = [stream[i:i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)]
        return {"input_ids": blocks, "labels": [list(b) for b in blocks]}

    tokenized = dataset.map(tokenize, batched=True, batch_size=batch_size, num_proc=num_proc,
                            remove_columns=dataset.column_names, desc="tokenize")
    return tokenized.map(group, batched=True, batch_size=batch_size, desc=f"pack {seq_len}")


def get_statistics(dataset, column: str = "input_ids") -> dict:
    """`{"sequences", "tokens", "mean_length"}` of a tokenized dataset (packed or not)."""
    import pyarrow.compute as pc

    if column not in dataset.column_names:
        raise ValueError(f"column {column!r} not in dataset columns {dataset.column_names}")
    lengths = pc.list_value_length(dataset.with_format("arrow")[column])
    n, tokens = len(dataset), int(pc.sum(lengths).as_py() or 0)
    return {"sequences": n, "tokens": tokens, "mean_length": tokens / n if n else 0.0}
