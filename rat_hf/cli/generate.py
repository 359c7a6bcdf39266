"""`rat-generate`: complete prompts with a causal LM (RAT, RxT or any transformers model).

    rat-generate --model ./my-rat --prompt "The attention" --max_new_tokens 40 --do_sample --top_p 0.9
"""

import argparse

from ._common import (CLIError, add_model_arguments, check_vocabulary, float_in, int_at_least, load_model,
                      load_model_tokenizer, make_parser, run_tool)


def build_generate_parser() -> argparse.ArgumentParser:
    parser = make_parser(
        "generate",
        "Complete prompts with a causal LM (RAT, RxT or any transformers model).\n\n"
        "Loads the model and tokenizer with the Auto classes. For a Reactive Transformer (model_type 'rxt') each\n"
        "--prompt is a query of one conversation (answered from the memory, which then reads the turn); for other\n"
        "models each --prompt is completed on its own. Greedy decoding unless --do_sample or --num_beams > 1.\n"
        "Weights that do not match the checkpoint's config.json (missing, unexpected, another shape) are an error.",
        "examples:\n"
        "  rat-generate --model ./my-rat --prompt 'The attention' --max_new_tokens 40\n"
        "  rat-generate --model ./my-rat --prompt 'Once' --do_sample --temperature 0.8 --top_p 0.9 "
        "--num_return_sequences 3 --seed 0\n"
        "  rat-generate --model ./my-rxt --prompt 'Hi, I am Ada.' --prompt 'What is my name?'",
    )
    add_model_arguments(parser, "tokenizer directory or Hub id (default: the --model one)")
    parser.add_argument("--prompt", action="append", required=True,
                        help="text to complete; repeat for several prompts (RxT: several turns of one conversation)")
    parser.add_argument("--max_new_tokens", type=int_at_least(1), default=50, help="tokens to generate per prompt")
    parser.add_argument("--do_sample", action="store_true", help="sample instead of greedy / beam search")
    parser.add_argument("--temperature", type=float_in(0.0), default=None,
                        help="sampling temperature (> 0; needs --do_sample; transformers' default 1.0)")
    parser.add_argument("--top_k", type=int_at_least(0), default=None,
                        help="keep the k most likely tokens (0 = off; needs --do_sample; transformers' default 50)")
    parser.add_argument("--top_p", type=float_in(0.0, 1.0), default=None,
                        help="nucleus sampling mass in (0, 1] (needs --do_sample; transformers' default 1.0)")
    parser.add_argument("--repetition_penalty", type=float_in(0.0), default=None,
                        help="> 1 discourages repeating tokens (CTRL penalty); 1.0 = off")
    parser.add_argument("--num_return_sequences", type=int_at_least(1), default=1,
                        help="completions per prompt (needs --do_sample, or --num_beams at least as large)")
    parser.add_argument("--num_beams", type=int_at_least(1), default=1, help="beam search width (1 = no beams)")
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

    model = load_model(args)
    tokenizer = load_model_tokenizer(args)
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
        check_vocabulary(model, tokenizer, encoded["input_ids"], f"prompt {i}")
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
    from ..reactive import ReactiveSession

    if args.num_return_sequences != 1:
        raise CLIError("an RxT model gives one answer per query: --num_return_sequences must be 1")
    kwargs.pop("num_return_sequences")
    for i, prompt in enumerate(args.prompt, 1):
        check_vocabulary(model, tokenizer, tokenizer(prompt, return_tensors="pt")["input_ids"], f"prompt {i}")
    with ReactiveSession(model, tokenizer, background=False, **kwargs) as session:
        for prompt in args.prompt:
            answer = session.interact(prompt)
            print(answer if args.completion_only else f"[Q] {prompt}\n[A] {answer}", flush=True)
    return 0


def generate_main(argv=None) -> int:
    """Entry point of `rat-generate`."""
    return run_tool(build_generate_parser(), _generate, argv)


main = generate_main
