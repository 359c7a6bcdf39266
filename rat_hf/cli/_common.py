"""What the command-line tools share: argparse helpers, one-line error handling, and checked loading.

Every tool prints an error the user can fix as one line, `rat-<tool>: error: ...` (exit 2), with no traceback unless
`--debug`. Loading goes through `from_pretrained_checked` / `load_tokenizer` / `load_text`, which tell a missing local
path from a Hub id, fail at once when the Hub is unreachable, refuse weights that do not match their config, and name
an empty or undecodable text file. `rat-train` (`rat_hf.recipes.pretrain`) uses the same helpers.
"""

import argparse
import codecs
import contextlib
import math
import re
import sys
import warnings
from pathlib import Path

# A Hub id: `name` or `org/name`. Anything else that does not exist locally is reported as a missing path.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
_FILE_SUFFIXES = (".json", ".jsonl", ".safetensors", ".bin", ".pt", ".txt", ".text", ".csv", ".parquet", ".yaml")
_TEXT_SUFFIXES = {".txt", ".text", ".json", ".jsonl", ".csv"}
_DTYPES = ("auto", "float32", "bfloat16", "float16")


class CLIError(ValueError):
    """An error the user can fix (a missing path, a bad spec, an unreachable Hub); the tools print it as one line."""


# --- argparse -----------------------------------------------------------------------------------------------------
class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def make_parser(tool: str, description: str, epilog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"rat-{tool}", description=description, epilog=epilog,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--debug", action="store_true",
                        help="show full tracebacks and library warnings instead of one-line errors")
    return parser


def add_model_arguments(parser: argparse.ArgumentParser, tokenizer_help: str) -> None:
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


def int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    return parse


def float_in(low: float, high: float = math.inf, low_open: bool = True):
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


# --- errors -------------------------------------------------------------------------------------------------------
def one_line(error: BaseException) -> str:
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    message = lines[0] if lines else type(error).__name__
    if isinstance(error, (KeyError, AttributeError, TypeError, IndexError, ImportError)) or not lines:
        message = f"{type(error).__name__}: {message}"
    return message


def report_error(prog: str, error: BaseException) -> None:
    hint = " (pip install 'rat_hf[train]' adds the optional dependencies)" if isinstance(error, ImportError) else ""
    print(f"{prog}: error: {one_line(error)}{hint}", file=sys.stderr)


def run_tool(parser: argparse.ArgumentParser, command, argv) -> int:
    """Parse `argv`, run `command(args, parser)`; any error becomes one line on stderr and exit code 2."""
    args = parser.parse_args(argv)  # usage errors: argparse prints them and exits 2
    try:
        with contextlib.ExitStack() as stack:
            if not args.debug:
                stack.enter_context(quiet_libraries())
            return command(args, parser) or 0
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if args.debug:
            raise
        report_error(parser.prog, error)
        return 2


@contextlib.contextmanager
def quiet_libraries(transformers_level: str = "error"):
    """Library notes (generation-config hints, datasets cache messages) and deprecation warnings (FutureWarning:
    `past_key_values is deprecated`) would bury the tools' output; what matters (a weight mismatch) the tools check
    themselves and report as an error."""
    import transformers

    level, bars = transformers.utils.logging.get_verbosity(), transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.set_verbosity(getattr(transformers.utils.logging, transformers_level.upper()))
    transformers.utils.logging.disable_progress_bar()
    datasets = None
    with contextlib.suppress(ImportError):
        import datasets

        datasets_level = datasets.utils.logging.get_verbosity()
        datasets.utils.logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            yield
        finally:
            transformers.utils.logging.set_verbosity(level)
            if bars:
                transformers.utils.logging.enable_progress_bar()
            if datasets is not None:
                datasets.utils.logging.set_verbosity(datasets_level)


# --- the Hub ------------------------------------------------------------------------------------------------------
def hub_unreachable() -> str | None:
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
def offline():
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


def looks_like_missing_path(name: str) -> bool:
    """True when `name` does not exist locally and cannot be a Hub id: `./x`, `/x`, `~/x`, `a/b/c`, `x.json`, or
    `dir/x` where `dir` exists here (a typo in a local path, not an organisation on the Hub)."""
    if Path(name).expanduser().exists():
        return False
    if not _HUB_ID.fullmatch(name) or name.lower().endswith(_FILE_SUFFIXES):
        return True
    return "/" in name and Path(name.split("/", 1)[0]).is_dir()


def from_hub(load, name: str, what: str, hint: str, **kwargs):
    """`load(name, **kwargs)` for a Hub id; from the cache alone, with a one-line error, when the Hub is unreachable."""
    if looks_like_missing_path(name):
        raise CLIError(f"{what} {name!r}: no such file or directory")
    reason = hub_unreachable()
    if reason is None:
        return load(name, **kwargs)
    try:
        with offline():
            return load(name, **kwargs)
    except (OSError, ValueError):  # transformers: OSError; datasets: ConnectionError / DatasetNotFoundError
        raise CLIError(f"{what} {name!r} is not a local path, not in the Hugging Face cache, and the Hub is "
                       f"unreachable ({reason}); {hint}") from None


def from_local_or_hub(load, name: str, what: str, required: str | None = None, **kwargs):
    """`load(name, **kwargs)` for a local directory (holding `required`) or a Hub id; one-line errors when neither
    can be had."""
    local = Path(name).expanduser()
    if not local.exists():
        return from_hub(load, name, what, "pass a local directory", **kwargs)
    if not local.is_dir():
        raise CLIError(f"{what} {name!r} is a file; pass the directory written by save_pretrained")
    if required and not (local / required).exists():
        raise CLIError(f"{what} {name!r} has no {required}; pass the directory written by save_pretrained")
    return load(str(local), **kwargs)


# --- models and tokenizers ----------------------------------------------------------------------------------------
def _keys(keys) -> str:
    """A short list of state-dict keys: layers grouped (`model.layers.2.*`), at most four entries."""
    grouped = []
    for key in sorted(keys, key=lambda k: [int(p) if p.isdigit() else p for p in k.split(".")]):
        match = re.match(r"(.*?layers\.\d+)\.", key)
        item = f"{match.group(1)}.*" if match else key
        if item not in grouped:
            grouped.append(item)
    shown = ", ".join(grouped[:4])
    return shown + (f", ... ({len(grouped) - 4} more)" if len(grouped) > 4 else "")


def check_loading_info(model, info: dict, name: str, what: str = "model") -> None:
    """Raise a `CLIError` when the checkpoint's weights do not fit the model its config describes."""
    tied = set()
    if getattr(model.config, "tie_word_embeddings", False):
        tied_keys = getattr(model, "_tied_weights_keys", None) or {}
        tied = set(tied_keys) | set(tied_keys.values() if isinstance(tied_keys, dict) else [])
    missing = sorted(set(info.get("missing_keys") or ()) - tied)
    unexpected = sorted(info.get("unexpected_keys") or ())
    mismatched = sorted(info.get("mismatched_keys") or ())
    problems = []
    if missing:
        problems.append(f"{len(missing)} weights missing ({_keys(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected ({_keys(unexpected)})")
    if mismatched:
        key, saved, wanted = mismatched[0]
        problems.append(f"{len(mismatched)} of another shape (e.g. {key}: checkpoint {list(saved)}, "
                        f"config {list(wanted)})")
    if problems:
        raise CLIError(f"{what} {name!r}: the weights do not match its config.json: {'; '.join(problems)}")


def from_pretrained_checked(auto_class, name: str, what: str = "model", **kwargs):
    """`auto_class.from_pretrained(name)` that refuses weights not matching the config (missing, unexpected or of
    another shape; a tied lm_head is fine) with one line, instead of silently using random weights."""
    import transformers

    def load(path, **kw):
        level = transformers.utils.logging.get_verbosity()
        transformers.utils.logging.set_verbosity_error()  # its load report: the error below says it in one line
        try:
            return auto_class.from_pretrained(path, output_loading_info=True, ignore_mismatched_sizes=True, **kw)
        finally:
            transformers.utils.logging.set_verbosity(level)

    model, info = from_local_or_hub(load, name, what, "config.json", **kwargs)
    check_loading_info(model, info, name, what)
    return model


def device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise CLIError(f"--device {name!r} is not a torch device (try 'cpu' or 'cuda')") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: CUDA is not available in this torch installation")
    return dev


def load_model(args):
    import torch
    from transformers import AutoModelForCausalLM  # RAT and RxT are registered: importing rat_hf.cli imported rat_hf

    kwargs = {"trust_remote_code": args.trust_remote_code}
    if args.dtype != "auto":
        kwargs["dtype"] = getattr(torch, args.dtype)
    model = from_pretrained_checked(AutoModelForCausalLM, args.model, **kwargs)
    return model.to(device(args.device)).eval()


def load_tokenizer(name: str, trust_remote_code: bool = False, hint: str = "", what: str = "tokenizer"):
    """`AutoTokenizer` from a directory or Hub id; a one-line error naming `name` when there is none."""
    from transformers import AutoTokenizer

    try:
        return from_local_or_hub(AutoTokenizer.from_pretrained, name, what, trust_remote_code=trust_remote_code)
    except CLIError:
        raise
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise CLIError(f"{what}: no usable tokenizer in {name!r} ({one_line(error)}){hint}") from None


def load_model_tokenizer(args):
    """The tokenizer of `--tokenizer`, else the one saved with `--model`."""
    return load_tokenizer(args.tokenizer or args.model, args.trust_remote_code,
                          "" if args.tokenizer else "; pass --tokenizer")


def check_vocabulary(model, tokenizer, ids, what: str) -> None:
    """Token ids the embedding cannot look up: a tokenizer that is not the model's."""
    if ids.numel() and int(ids.max()) >= model.config.vocab_size:
        raise CLIError(f"{what}: the tokenizer produces id {int(ids.max())}, outside the model's vocabulary "
                       f"({model.config.vocab_size}); pass the model's own tokenizer")


# --- text data ----------------------------------------------------------------------------------------------------
def check_text_file(path: Path, what: str = "dataset") -> None:
    """A one-line error naming `path` when it is empty, blank, or not UTF-8 (with the line of the first bad byte)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    seen_text, line, offset = False, 1, 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            try:
                text = decoder.decode(chunk)
            except UnicodeDecodeError as error:
                bad = offset + error.start
                line += chunk[:error.start].count(b"\n")
                raise CLIError(f"{what} {str(path)!r} is not UTF-8 text: byte {chunk[error.start]:#04x} at offset "
                               f"{bad} (line {line}); convert it, e.g. iconv -f latin1 -t utf-8") from None
            seen_text = seen_text or bool(text.strip())
            line += chunk.count(b"\n")
            offset += len(chunk)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise CLIError(f"{what} {str(path)!r} is not UTF-8 text: it ends inside a character") from None
    if not seen_text:
        raise CLIError(f"{what} {str(path)!r} is empty: no text to read")


def load_text(name: str, config=None, split: str = "train", text_column: str = "text", what: str = "--dataset"):
    """A local txt/json/jsonl/csv/parquet file or folder, or a Hub dataset, as a `datasets.Dataset` with `text`.

    Local text files are checked first (empty, not UTF-8: one line naming the file); what `datasets` cannot read
    is reported with the file's name instead of `DatasetGenerationError`.
    """
    from ..data import load_text_dataset

    local = Path(name).expanduser()
    kwargs = dict(config=config, split=split, text_column=text_column)
    if not local.exists():
        return from_hub(load_text_dataset, name, f"{what}", "pass a local path", **kwargs)
    files = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file())
    for path in files:
        if path.suffix.lower() in _TEXT_SUFFIXES:
            check_text_file(path, what)
    try:
        ds = load_text_dataset(str(local), **kwargs)
    except CLIError:
        raise
    except Exception as error:  # datasets' DatasetGenerationError wraps the real cause
        cause = error
        while cause.__cause__ is not None or cause.__context__ is not None:
            cause = cause.__cause__ or cause.__context__
        raise CLIError(f"{what} {name!r} cannot be read: {one_line(cause)}") from None
    if len(ds) == 0:
        raise CLIError(f"{what} {name!r} has no rows of text")
    return ds
