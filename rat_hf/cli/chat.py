"""`rat-chat`: talk with a causal LM (RAT or any transformers model) or a Reactive Transformer; or answer prompts.

    rat-chat --model outputs/rat-demo                                  # interactive; `help` lists the commands
    rat-chat --model ./my-rxt --temperature 0                          # RxT: its memory carries the conversation
    rat-chat --model outputs/rat-demo --prompts prompts.txt --output answers.jsonl

The conversation goes through `rat_hf.chat.ChatInterface`. The answers go to stdout; notes (a prompt window that left
out old turns, a tokenizer without a chat template) and errors go to stderr, one line each. An error in a command
(`load` of a missing file, a message longer than the window) is reported and the chat goes on; a model or prompts file
that cannot be read ends the tool with exit code 2.
"""

import argparse
import json
import sys
import warnings
from pathlib import Path

from ._common import (CLIError, add_model_arguments, check_text_file, float_in, int_at_least, load_model,
                      load_model_tokenizer, make_parser, report_error, run_tool)

QUIT = ("quit", "exit", "bye")
COMMANDS = """commands:
  quit | exit | bye   end the chat (so does the end of the input, Ctrl-D)
  clear               forget the conversation (RxT: reset the short-term memory)
  save <file>         write the conversation as one JSON line {"messages": [...]} (rat_hf.data.load_chat_jsonl reads it)
  load <file>         continue a saved conversation (RxT: its turns are re-encoded into the memory)
  test [text]         tokenisation diagnostics: ids, round trip, special tokens, EOS/PAD ids
  help                this list
anything else is a message to the model"""


def build_chat_parser() -> argparse.ArgumentParser:
    parser = make_parser(
        "chat",
        "Chat with a causal LM (RAT or any transformers model) or a Reactive Transformer (model_type 'rxt').\n\n"
        "A causal LM reads the conversation through the tokenizer's chat template, in a window of --max_length\n"
        "tokens (the oldest turns are left out beyond it, with a note). An RxT model reads only the new message:\n"
        "the conversation lives in its short-term memory, updated after every answer. Answers are streamed token by\n"
        "token unless --no_stream. With --prompts FILE the tool answers every prompt of FILE on its own and writes\n"
        "JSONL instead of chatting.\n\n" + COMMANDS,
        "examples:\n"
        "  rat-chat --model outputs/rat-demo\n"
        "  rat-chat --model ./my-rxt --temperature 0 --max_new_tokens 40\n"
        "  rat-chat --model outputs/rat-demo --prompts prompts.txt --output answers.jsonl --seed 0\n\n"
        "prompts files: a .jsonl/.json file holds one JSON object a line with 'prompt' (text, or a list of\n"
        "{role, content} messages) or 'messages' (the chat JSONL of rat_hf.data.load_chat_jsonl: the turns up to the\n"
        "last user message are the conversation to answer); any other file is one prompt a line. Each output line is\n"
        "the input record (text lines: {\"prompt\": line}) with the answer under 'response'.",
    )
    add_model_arguments(parser, "tokenizer directory or Hub id (default: the --model one)")
    parser.add_argument("--max_new_tokens", type=int_at_least(1), default=100, help="tokens per answer at most")
    parser.add_argument("--temperature", type=float_in(0.0, low_open=False), default=0.7,
                        help="sampling temperature; 0 = greedy decoding")
    parser.add_argument("--top_p", type=float_in(0.0, 1.0), default=None,
                        help="nucleus sampling mass in (0, 1] (default: the model's generation config)")
    parser.add_argument("--top_k", type=int_at_least(0), default=None,
                        help="keep the k most likely tokens, 0 = off (default: the model's generation config)")
    parser.add_argument("--repetition_penalty", type=float_in(0.0), default=None,
                        help="> 1 discourages repeating tokens; 1.0 = off")
    parser.add_argument("--max_length", type=int_at_least(2), default=512,
                        help="prompt window in tokens: older turns are left out beyond it (RxT: the message alone)")
    parser.add_argument("--no_history", "--no-history", action="store_true",
                        help="answer every message on its own (RxT: from a fresh memory)")
    parser.add_argument("--no_stream", "--no-stream", action="store_true",
                        help="print each answer when it is complete instead of token by token")
    parser.add_argument("--seed", type=int, default=None, help="random seed, for reproducible sampling")
    parser.add_argument("--prompts", metavar="FILE", default=None,
                        help="batch mode: answer every prompt of FILE (see below) instead of chatting")
    parser.add_argument("--output", metavar="FILE", default=None,
                        help="batch mode: write the JSONL results here (default: stdout)")
    return parser


def _note(message: str) -> None:
    print(f"rat-chat: note: {message}", file=sys.stderr, flush=True)


def _chat(args, parser) -> int:
    if args.output is not None and args.prompts is None:
        parser.error("--output applies only with --prompts")
    prompts_path = _check_prompts_file(args.prompts) if args.prompts is not None else None
    from transformers import set_seed

    from ..chat import ChatInterface

    model = load_model(args)
    tokenizer = load_model_tokenizer(args)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        chat = ChatInterface(model, tokenizer, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                             top_p=args.top_p, top_k=args.top_k, repetition_penalty=args.repetition_penalty,
                             max_length=args.max_length, use_history=not args.no_history)
    for warning in caught:
        if issubclass(warning.category, UserWarning):
            _note(str(warning.message))
    if args.seed is not None:
        set_seed(args.seed)
    try:
        if prompts_path is not None:
            return _batch(chat, prompts_path, args.output)
        return _interactive(chat, args)
    finally:
        if chat.session is not None:
            chat.session.close()


# --- batch mode ---------------------------------------------------------------------------------------------------
def _check_prompts_file(name: str) -> Path:
    path = Path(name).expanduser()
    if not path.exists():
        raise CLIError(f"--prompts {name!r}: no such file")
    if not path.is_file():
        raise CLIError(f"--prompts {name!r} is not a file")
    check_text_file(path, "--prompts")  # empty, or not UTF-8: one line naming the line
    return path


def _batch(chat, path: Path, output: str | None) -> int:
    from ..chat import read_prompts

    prompts = read_prompts(path)  # every line checked before the first answer
    out = sys.stdout if output is None else open(output, "w", encoding="utf-8")
    try:
        for lineno, record, messages in prompts:
            try:
                response = chat.answer_conversation(messages)
            except ValueError as error:  # e.g. longer than --max_length: name the line
                raise CLIError(f"{path}:{lineno}: {error}") from None
            out.write(json.dumps({**record, "response": response}, ensure_ascii=False) + "\n")
            out.flush()
    finally:
        if out is not sys.stdout:
            out.close()
    _note(f"answered {len(prompts)} prompt(s) of {path}" + (f"; results in {output}" if output else ""))
    return 0


# --- interactive --------------------------------------------------------------------------------------------------
def _interactive(chat, args) -> int:
    tty = sys.stdin.isatty()
    kind = "RxT (the short-term memory carries the conversation)" if chat.is_reactive else \
        f"{chat.model.config.model_type} (chat template, {chat.max_length}-token window)"
    history = "off" if args.no_history else "on"
    print(f"rat-chat: {args.model}: {kind}; history {history}; type 'help' for the commands", file=sys.stderr,
          flush=True)
    while True:
        try:
            line = input("You: ") if tty else sys.stdin.readline()
        except EOFError:
            break
        if not tty and not line:  # the end of piped input
            break
        text = line.strip()
        if not text:
            continue
        command, _, argument = text.partition(" ")
        command, argument = command.lower(), argument.strip()
        if command in QUIT and not argument:
            print("Goodbye!")
            break
        try:
            _run(chat, command, argument, line.rstrip("\r\n"), args)
        except (ValueError, OSError) as error:  # a bad file or message: say so, keep chatting
            report_error("rat-chat", error)
    return 0


def _run(chat, command: str, argument: str, line: str, args) -> None:
    if command == "help" and not argument:
        print(COMMANDS)
    elif command == "clear" and not argument:
        chat.clear()
        print("Memory reset." if chat.is_reactive else "History cleared.")
    elif command in ("save", "load"):
        if not argument:
            raise CLIError(f"usage: {command} <filename>")
        if command == "save":
            chat.save(argument)
            print(f"Saved {len(chat.history)} messages to {argument}.")
        else:
            chat.load(argument)
            what = " (re-encoded into the memory)" if chat.is_reactive else ""
            print(f"Loaded {len(chat.history)} messages from {argument}{what}.")
    elif command == "test":
        _print_diagnostics(chat.diagnostics(argument) if argument else chat.diagnostics())
    else:
        _answer(chat, line, stream=not args.no_stream)


def _answer(chat, text: str, stream: bool) -> None:
    if stream:
        print("Assistant: ", end="", flush=True)
        for piece in chat.stream_response(text):
            print(piece, end="", flush=True)
        print()
    else:
        print(f"Assistant: {chat.generate_response(text)}", flush=True)
    if chat.last_dropped_turns:
        _note(f"left out the {chat.last_dropped_turns} oldest turn(s) to fit --max_length {chat.max_length} "
              f"(the history keeps them)")


def _print_diagnostics(report: dict) -> None:
    specials = " ".join(f"{token}={i}" for token, i in report["special_tokens"].items())
    rows = [
        ("text", repr(report["text"])),
        (f"ids ({len(report['ids'])})", str(report["ids"])),
        ("tokens", str(report["tokens"])),
        ("round trip", "ok" if report["round_trip"] else f"FAILED -> {report['decoded']!r}"),
        ("special tokens", specials or "none"),
        ("EOS", f"{report['eos_token']!r} = {report['eos_token_id']} (model config: {report['model_eos_token_id']}; "
                f"answers end at {report['generation_eos_token_ids']})"),
        ("PAD", f"{report['pad_token']!r} = {report['pad_token_id']} (model config: {report['model_pad_token_id']})"),
        ("vocabulary", f"tokenizer {report['tokenizer_size']}, model {report['model_vocab_size']}"),
        ("prompt", f"{report['prompt_tokens']} tokens with this text as the next message (max_length "
                   f"{report['max_length']})"),
    ]
    if "query_token_id" in report:
        rows.append(("RxT tokens", f"[Q] = {report['query_token_id']}, [A] = {report['answer_token_id']}"))
    rows += [("problem", p) for p in report["problems"]] + [("note", n) for n in report["notes"]]
    if not report["problems"]:
        rows.append(("result", "no problems found"))
    for name, value in rows:
        print(f"{name + ':':<16}{value}")


def chat_main(argv=None) -> int:
    """Entry point of `rat-chat`."""
    return run_tool(build_chat_parser(), _chat, argv)


main = chat_main
