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
import warnings

logger = logging.getLogger("rat_hf.trainers")


def _reentrant(model, args) -> bool | None:
    """Whether gradient checkpointing is on and reentrant (None: off), from the arguments or the model itself."""
    on = bool(getattr(args, "activation_checkpointing", False) or getattr(args, "gradient_checkpointing", False))
    kwargs = getattr(args, "activation_checkpointing_kwargs", None) or getattr(
        args, "gradient_checkpointing_kwargs", None)
    if on:
        return bool((kwargs or {}).get("use_reentrant", False))  # transformers' default is non-reentrant
    # enabled on the model before the Trainer was built: its layers hold the checkpoint function and its keywords
    for module in model.modules():
        function = getattr(module, "_gradient_checkpointing_func", None)
        if getattr(module, "gradient_checkpointing", False) and function is not None:
            return bool(getattr(function, "keywords", {}).get("use_reentrant", False))
    return None


def configure_ddp_for_unused_parameters(model, args) -> str | None:
    """Set `args.ddp_find_unused_parameters` / `args.ddp_static_graph` when `model` needs it and the user left both
    unset. Returns what was set (for the log), or None."""
    if model is None or args is None or not getattr(model, "_forward_may_leave_parameters_unused", False):
        return None
    if args.ddp_find_unused_parameters is not None or args.ddp_static_graph is not None:
        return None  # the user decided
    if not _reentrant(model, args):
        args.ddp_find_unused_parameters = True
        return "ddp_find_unused_parameters=True (the forward may leave parameters unused)"
    # Reentrant checkpointing: DDP cannot search for unused parameters, only assume the same ones every step (a static
    # graph). That holds for LM-only steps of a dense decoder; a MoE decoder uses different experts every step.
    if getattr(getattr(model, "config", None), "num_experts", 0):
        warnings.warn("DDP with reentrant gradient checkpointing cannot train a model whose steps use different "
                      "parameters (MoE experts): use gradient_checkpointing_kwargs={'use_reentrant': False}",
                      stacklevel=3)
        return None
    args.ddp_static_graph = True
    return "ddp_static_graph=True (reentrant checkpointing; the same parameters must be used at every step)"
