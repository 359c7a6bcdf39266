"""Reward functions with TRL's reward-function signature, and a registry to pick them by name.

    from rat_hf.rewards import get_reward_funcs
    GRPOTrainer(..., reward_funcs=get_reward_funcs(["quality", "length", "my_pkg.rewards:politeness"]))

Each function's docstring gives its range and edge cases; `rat_hf.rewards.chat` says how completions are read.
The chat functions use only the standard library (no torch, no trl). The Reactive Transformer's memory-RL rewards
(`rat_hf.rewards.mrl`: BLEU to the reference or the saved interaction, length ratio, exact match; they read token-id
columns and run batched on the accelerator) are registered by name too, and imported (with torch) on first use:

    get_reward_funcs(["bleu_to_reference", "bleu_to_saved", "length_ratio"])

The embedding-cosine rewards need an embedding: build them with `rat_hf.rewards.mrl.EmbeddingCosineReward(emb, target)`
(`RxTMRLTrainer` does, from its reference model, for the names `cosine_to_reference` / `cosine_to_saved`).
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
# Memory-RL rewards (`rat_hf.rewards.mrl`), resolved when asked for, so `import rat_hf.rewards` stays torch-free.
MRL_REWARD_FUNCS = {
    "bleu_to_reference": "rat_hf.rewards.mrl:bleu_to_reference",
    "bleu_to_saved": "rat_hf.rewards.mrl:bleu_to_saved",
    "length_ratio": "rat_hf.rewards.mrl:length_ratio_reward",
    "exact_match": "rat_hf.rewards.mrl:exact_match_reward",
}
_NEEDS_EMBEDDING = ("cosine_to_reference", "cosine_to_saved")


def _known() -> str:
    return ", ".join(sorted([*REWARD_FUNCS, *MRL_REWARD_FUNCS]))


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
        lazy = MRL_REWARD_FUNCS.get(name, MRL_REWARD_FUNCS.get(name.removesuffix("_reward")))
        if lazy is not None:
            return _resolve(lazy)
        if name in _NEEDS_EMBEDDING:
            raise ValueError(f"reward_funcs: {name!r} needs an embedding: pass "
                             f"rat_hf.rewards.mrl.EmbeddingCosineReward(embedding, {name.removeprefix('cosine_to_')!r})"
                             " as a callable (RxTMRLTrainer builds it from its reference model by name)")
        raise ValueError(f"reward_funcs: unknown reward {name!r}; known: {_known()} "
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
                         f"known: {_known()}")
    return [_resolve(n) for n in names]


def __getattr__(name: str):
    """The memory-RL reward functions as attributes (`rat_hf.rewards.bleu_to_reference`), imported on first use."""
    target = next((t for t in MRL_REWARD_FUNCS.values() if t.endswith(f":{name}")), None)
    if target is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return _resolve(target)


__all__ = [
    "MRL_REWARD_FUNCS",
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
