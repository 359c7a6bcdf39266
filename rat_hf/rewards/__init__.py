"""Reward functions with TRL's reward-function signature, and a registry to pick them by name.

    from rat_hf.rewards import get_reward_funcs
    GRPOTrainer(..., reward_funcs=get_reward_funcs(["quality", "length", "my_pkg.rewards:politeness"]))

Each function's docstring gives its range and edge cases; `rat_hf.rewards.chat` says how completions are read.
The functions use only the standard library (no torch, no trl).
"""

import importlib

from .chat import (
    completion_text,
    diversity_reward,
    format_reward,
    keyword_reward,
    length_reward,
    make_length_reward,
    quality_reward,
    unigram_f1,
    words,
)

REWARD_FUNCS = {
    "quality": quality_reward,
    "length": length_reward,
    "diversity": diversity_reward,
    "format": format_reward,
    "keyword": keyword_reward,
}


def _resolve(spec):
    if callable(spec):
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"reward_funcs: expected a name, 'module.path:function' or a callable, got {spec!r}")
    name = spec.strip()
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise ValueError(f"reward_funcs: cannot import {module_name!r} for {name!r}: {err}") from None
        func = getattr(module, attr, None)
        if not callable(func):
            raise ValueError(f"reward_funcs: {module_name!r} has no callable {attr!r}")
        return func
    func = REWARD_FUNCS.get(name, REWARD_FUNCS.get(name.removesuffix("_reward")))  # "length" or "length_reward"
    if func is None:
        raise ValueError(f"reward_funcs: unknown reward {name!r}; known: {', '.join(sorted(REWARD_FUNCS))} "
                         "(or 'module.path:function', or a callable)")
    return func


def get_reward_funcs(names) -> list:
    """Names (`REWARD_FUNCS` keys, with or without `_reward`), `"module.path:function"` strings or callables -> a list
    of callables for `reward_funcs=`. A single string may list several names separated by commas (a CLI value)."""
    if isinstance(names, str):
        names = [n for n in names.split(",") if n.strip()]
    elif callable(names):
        names = [names]
    if not isinstance(names, (list, tuple)) or not names:
        raise ValueError(f"reward_funcs: expected one or more reward names or callables, got {names!r}; "
                         f"known: {', '.join(sorted(REWARD_FUNCS))}")
    return [_resolve(n) for n in names]


__all__ = [
    "REWARD_FUNCS",
    "completion_text",
    "diversity_reward",
    "format_reward",
    "get_reward_funcs",
    "keyword_reward",
    "length_reward",
    "make_length_reward",
    "quality_reward",
    "unigram_f1",
    "words",
]
