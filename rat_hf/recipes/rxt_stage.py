"""What the Reactive Transformer stage recipes share (`recipes/rxt_{pretrain,sft,memattn,smat,mrl}.py`).

- `StageModelArguments`: the checkpoint a stage continues from (`--model_name_or_path`: required from stage 2 on, see
  `require_previous_stage`) and the attention backend. Stage 1 adds a fresh model's config and tokenizer size.
- `ConversationDataArguments`: the conversations a stage trains on (`--dataset`: the offline chatterbot dialogs +
  synthetic memory-recall conversations, a JSON/JSONL file or a Hub dataset) and how many recall conversations the
  offline set makes. Each recipe subclasses it with its own fields (`--seq_len`, `--min_turns`, `--eval_*`, ...).
- `start_stage`: the opening every stage's `main` shares (arguments parsed, logs, the previous stage required, seed,
  the push deferred to the end).
- `write_card_and_push`: the end of stages 4 and 5 — the model card of the trained policy (their `--model_card`;
  stages 1-3 always write one through `_rxt_common.finish_stage`) and the push of `output_dir` (when asked).
"""

import logging
import math
import os
import shlex
import sys
from dataclasses import dataclass, field
from typing import NamedTuple


@dataclass
class StageModelArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "the previous stage's output (required)"})
    attn_implementation: str = field(default="sdpa", metadata={"help": "eager, sdpa, flash_attention_2, ..."})

    def require_previous_stage(self, previous: str) -> None:
        """Stages 2-5 start from a trained RxT: refuse in one line when no checkpoint was given."""
        if not self.model_name_or_path:
            raise ValueError(f"--model_name_or_path is required: the output directory of {previous}")


@dataclass
class ConversationDataArguments:
    dataset: str = field(default="offline", metadata={"help": "offline | JSON(L) file | Hub dataset of conversations"})
    recall_conversations: int = field(default=2000, metadata={"help": "offline: synthetic memory-recall conversations"})


class Stage(NamedTuple):
    argv: list  # the command line as given (for the model card's command)
    model_args: object
    data_args: object
    args: object  # the stage's TrainingArguments subclass, `push_to_hub` switched off until the end
    push: bool  # whether to push once the model and its card are saved


def start_stage(dataclass_types: tuple, argv: list | None, *, prog: str, previous: str | None = None) -> Stage:
    """Parse a stage recipe's command line (`rat_hf.recipes._config.parse_args`: one line per bad argument or
    launch), set up readable logs, require the previous stage's checkpoint (`previous` names its recipe; stage 1
    has none), seed everything, and defer the push: the model is pushed once, at the end, with its card."""
    from transformers import set_seed

    from ._config import parse_args

    argv = list(sys.argv[1:] if argv is None else argv)
    model_args, data_args, args = parse_args(dataclass_types, argv, prog=prog)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if previous is not None:
        model_args.require_previous_stage(previous)
    set_seed(args.seed)
    push, args.push_to_hub = args.push_to_hub, False
    return Stage(argv, model_args, data_args, args, push)


def write_card_and_push(policy, args, *, recipe: str, argv: list, config: dict, metrics: dict, datasets: list,
                        model_card: bool, push: bool) -> None:
    """On the main process, after `trainer.save_model`: README.md for `policy` (its metrics rounded to 4 digits,
    the command `python recipes/{recipe} ARGV`) when `model_card`, then `output_dir` pushed to
    `args.hub_model_id` (or the folder's name) when `push`."""
    if model_card:
        from rat_hf.hub import model_card as build_card

        shown = {k: round(v, 4) if isinstance(v, float) and math.isfinite(v) else v for k, v in metrics.items()}
        card = build_card(policy, command=f"python recipes/{recipe} {shlex.join(argv)}", config=config,
                          metrics=shown, datasets=datasets)
        card.save(os.path.join(args.output_dir, "README.md"))
    if push:
        from rat_hf.hub import push_folder_to_hub

        repo = args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))
        push_folder_to_hub(args.output_dir, repo, token=args.hub_token, private=bool(args.hub_private_repo))


__all__ = ["ConversationDataArguments", "Stage", "StageModelArguments", "start_stage", "write_card_and_push"]
