"""What DistributedDataParallel needs for models whose forward leaves some parameters unused.

A Reactive Transformer's language-model forward runs the decoder only; the encoder and the memory attention are run by
`update_memory`. A step without a memory update leaves them without gradients, and DDP (which `Trainer` builds with
`find_unused_parameters=False` whenever gradient checkpointing is on) then stops at the next step with "Expected to
have finished reduction in the prior iteration". Models that can do this say so with the class attribute
`_forward_may_leave_parameters_unused = True`; for them, unless the user chose, DDP looks for unused parameters
(non-reentrant checkpointing, transformers' default) or runs with a static graph (reentrant checkpointing, which
`find_unused_parameters` cannot follow).
"""

import logging

logger = logging.getLogger("rat_hf.trainers")


def _checkpointing(args) -> tuple[bool, dict]:
    """(on?, kwargs) under either name (`gradient_checkpointing*` before transformers 5.2x, `activation_*` after)."""
    on = bool(getattr(args, "activation_checkpointing", False) or getattr(args, "gradient_checkpointing", False))
    kwargs = getattr(args, "activation_checkpointing_kwargs", None) or getattr(args, "gradient_checkpointing_kwargs", None)
    return on, dict(kwargs or {})


def configure_ddp_for_unused_parameters(model, args) -> str | None:
    """Set `args.ddp_find_unused_parameters` / `args.ddp_static_graph` when `model` needs it and the user left both
    unset. Returns what was set (for the log), or None."""
    if model is None or args is None or not getattr(model, "_forward_may_leave_parameters_unused", False):
        return None
    if args.ddp_find_unused_parameters is not None or args.ddp_static_graph is not None:
        return None  # the user decided
    checkpointing, kwargs = _checkpointing(args)
    model_checkpointing = bool(getattr(model, "is_activation_checkpointing", None)  # 5.2x's name; the old one warns
                               or getattr(model, "is_gradient_checkpointing", False))
    if (checkpointing or model_checkpointing) and kwargs.get("use_reentrant", False):
        args.ddp_static_graph = True
        return "ddp_static_graph=True (reentrant checkpointing with parameters the forward may not use)"
    args.ddp_find_unused_parameters = True
    return "ddp_find_unused_parameters=True (the forward may leave parameters unused)"
