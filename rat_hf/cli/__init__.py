"""Command-line tools: `rat-generate`, `rat-chat`, `rat-eval`, `rat-test` and `rat-train`, one module each.

    rat-generate --model ./my-rat --prompt "The attention" --max_new_tokens 40 --do_sample --top_p 0.9
    rat-chat --model ./my-rat                                        # interactive; --prompts FILE for batch mode
    rat-eval --model ./my-rat --dataset default                      # the documents rat-train held out
    rat-eval --model ./my-rlm-rat --dataset rlm:vocab_size=32,depth=5,beta=1.0,seed=0 --json
    rat-test --quick
    rat-train --config recipes/configs/pretrain_rat_tiny.yaml        # rat_hf.recipes.pretrain

Without the console scripts installed: `python -m rat_hf.cli generate|chat|eval|test|train ...`.

Errors: bad arguments get argparse's usage line and a one-line `rat-<tool>: error: ...` (exit 2); errors while running
(a missing path, a bad dataset spec, a model id while the Hub is unreachable, weights that do not match their config)
the same one-line form, exit 2, no traceback unless `--debug`. `datasets` is imported only by the tools that read
data. Modules: `generate`, `chat`, `eval`, `selftest` (rat-test), `_common` (what they share).
"""

import sys

from ..recipes.pretrain import main as train_main
from ._common import CLIError
from .chat import build_chat_parser, chat_main
from .eval import build_eval_parser, eval_main, parse_rlm_spec
from .generate import build_generate_parser, generate_main
from .selftest import build_test_parser, test_main

TOOLS = ("generate", "eval", "test", "train", "chat")

__all__ = ["CLIError", "build_chat_parser", "build_eval_parser", "build_generate_parser", "build_test_parser",
           "chat_main", "eval_main", "generate_main", "main", "parse_rlm_spec", "test_main"]


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
    entry = {"generate": generate_main, "chat": chat_main, "eval": eval_main, "test": test_main,
             "train": train_main}[tool]
    return entry(argv[1:])
