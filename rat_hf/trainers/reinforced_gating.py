"""Reinforced gating under every trainer: TRL trainer subclasses that train a `gating_mode="reinforce"` RAT's gates.

A reinforce-mode RAT samples one gating policy per token and layer in training; its selectors learn only from a
REINFORCE term. `RatForCausalLM.forward` adds that term when given `labels` (`transformers.Trainer`, `RatTrainer`),
but TRL computes its log-probs through `model.model` + `lm_head` (its fused LM head), so under `SFTTrainer`,
`DPOTrainer` and `GRPOTrainer` the term never runs and the selectors get no gradient (checked on TRL 1.16: all
selector gradients `None`). The model then warns once (`UserWarning`, naming the classes below) rather than raising:
a frozen selector is still a working model, and a caller may legitimately run the base model in training for other
reasons; the warning keeps the loss visible.

`RatSFTTrainer`, `RatDPOTrainer` and `RatGRPOTrainer` override only `compute_loss`: the trainer's own loss runs
unchanged inside `collect_gate_samples()` (the base model hands it each forward's sampled gate log-probs) and a hook
on the causal LM pairs them with the per-token log-probs of the same forward (TRL's fused-head output). The gates then
get the per-token signal the tokens get: each token's loss linearised in its log-prob,

    token_loss_t = (d loss / d log p_t) * log p_t      (detached; `linearized_token_losses`)

fed to `gate_reinforce_loss` (reward-to-go within each sequence or packed document, leave-one-out baseline, the
model's `policy_discount`, `entropy_coef`, added with `policy_loss_coef`). What that gives per trainer:

- SFT: `d loss / d log p_t = -1 / num_tokens`, so token_loss_t = NLL_t / num_tokens: exactly the loss, the same
  estimator `RatForCausalLM.forward` uses (tested equal);
- GRPO: `-A_t * r_t * (the loss type's token weight)` for unclipped tokens (0 where the ratio is clipped), plus the KL
  term's slope: the gates are trained with the completions' advantages, `A * sum_(t' >= t) log p_t'`, i.e. the gradient
  of `A * E_gates[log p(completion | gates)]`. (The per-token GRPO loss *value* would not do: with one update per
  generation TRL's old log-probs are this forward's own, the ratio is 1 whatever the gates, and its expectation
  carries no signal.)
- DPO: the loss is not a sum over tokens; its slope `w = d loss / d logp_sequence` (negative for the chosen answer,
  positive for the rejected one, `beta * sigmoid(-margin)` in size) weighs every token of a sequence: the gates get
  the gradient of the weighted likelihood whose token gradient is exactly DPO's (first order in the log-probs).

Under gradient accumulation the term is scaled like the trainer's own loss (it is added inside `compute_loss`). A
reinforce-mode forward whose gates cannot be paired with per-token log-probs (a loss from full logits:
`compute_loss_func`, label smoothing) raises instead of dropping the signal silently. Our own PPO trainer calls
`gate_reinforce_loss` itself with its per-token policy loss.
"""

import contextlib

import torch

from ..models.rat.modeling_rat import RatGateSamples, collect_gate_samples, gate_reinforce_loss


def linearized_token_losses(loss: torch.Tensor, token_log_probs: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """For each `token_log_probs` tensor (with graph, as `loss` used it): `d loss / d log p * log p`, detached.

    The loss linearised in the tokens' log-probs, token by token: exact for a loss linear in them (NLL), the slope the
    token parameters are trained with otherwise. None for a tensor the loss does not use. Keeps `loss`'s graph.
    """
    grads = torch.autograd.grad(loss, token_log_probs, retain_graph=True, allow_unused=True)
    return [None if g is None else g.detach() * lp.detach() for g, lp in zip(grads, token_log_probs)]


class _GateCapture:
    """Inside: the gate samples of every reinforce-mode forward of `causal_lm`, paired with the per-token log-probs
    (`output.log_probs`, TRL's fused LM head) of the same call; `unpaired` counts the samples with no such output."""

    def __init__(self, causal_lm: torch.nn.Module):
        self.causal_lm = causal_lm
        self.pairs: list[tuple[RatGateSamples, torch.Tensor]] = []
        self.unpaired = 0
        self._starts: list[int] = []

    def __enter__(self) -> "_GateCapture":
        self._stack = contextlib.ExitStack()
        self.samples = self._stack.enter_context(collect_gate_samples())
        for handle in (self.causal_lm.register_forward_pre_hook(self._before),
                       self.causal_lm.register_forward_hook(self._after)):
            self._stack.callback(handle.remove)
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def _before(self, module, args) -> None:
        self._starts.append(len(self.samples))

    def _after(self, module, args, output) -> None:
        new = self.samples[self._starts.pop():]
        log_probs = getattr(output, "log_probs", None)
        if len(new) == 1 and torch.is_tensor(log_probs) and log_probs.requires_grad:
            self.pairs.append((new[0], log_probs))
        else:
            self.unpaired += len(new)


def _sampling_causal_lm(trainer, model) -> torch.nn.Module | None:
    """The causal LM under `model` (accelerate/DDP and PEFT unwrapped) when this training forward samples its gates."""
    if not (model.training and torch.is_grad_enabled()):
        return None
    causal_lm = trainer.accelerator.unwrap_model(model)
    if hasattr(causal_lm, "get_base_model"):  # PEFT
        causal_lm = causal_lm.get_base_model()
    base = getattr(causal_lm, "model", None)
    sampling = getattr(causal_lm.config, "gating_mode", None) == "reinforce" and getattr(
        base, "samples_policies_in_training", False)
    return causal_lm if sampling else None


def _loss_scaled_for_accumulation(trainer, num_items_in_batch) -> bool:
    """Whether `compute_loss`'s loss is already divided over the accumulation window (`Trainer` then leaves it)."""
    scaled = getattr(trainer, "loss_is_scaled_for_ga", None)
    if scaled is not None:
        return bool(scaled)
    return bool((trainer.model_accepts_loss_kwargs and num_items_in_batch is not None)
                or trainer.compute_loss_func is not None)


def _align(token_losses: torch.Tensor, seq_len: int) -> torch.Tensor:
    """`[B, T-1]` (position t predicts token t+1, the fused head's layout) or `[B, T]` -> `[B, T]`."""
    if token_losses.shape[1] == seq_len - 1:
        return torch.nn.functional.pad(token_losses, (0, 1))
    if token_losses.shape[1] != seq_len:
        raise RuntimeError(f"per-token log-probs of length {token_losses.shape[1]} for a forward of {seq_len} tokens: "
                           "cannot align them with the sampled gates")
    return token_losses


class _ReinforcedGatingMixin:
    """`compute_loss` = the trainer's own loss + `policy_loss_coef` * the gates' REINFORCE loss (see module docs)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        causal_lm = _sampling_causal_lm(self, model)
        if causal_lm is None:  # soft gating, eval, or no gradients: the trainer's behaviour, untouched
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        with _GateCapture(causal_lm) as capture:
            result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                          num_items_in_batch=num_items_in_batch)
        loss = result[0] if return_outputs else result
        gate_loss = self._gate_loss(loss, capture, causal_lm.config, num_items_in_batch)
        if gate_loss is not None:
            loss = loss + causal_lm.config.policy_loss_coef * gate_loss
        return (loss, result[1]) if return_outputs else loss

    def _gate_loss(self, loss, capture: _GateCapture, config, num_items_in_batch) -> torch.Tensor | None:
        if capture.unpaired:
            raise RuntimeError(
                f"{type(self).__name__}: {capture.unpaired} reinforce-mode forward(s) of this loss returned no "
                "per-token log-probs (TRL's fused LM head output), so the sampled gates cannot be given the tokens' "
                "signal; a loss computed from full logits (compute_loss_func, label smoothing) is not supported with "
                "gating_mode='reinforce'"
            )
        pairs = [(s, lp) for s, lp in capture.pairs if s.log_probs.requires_grad]  # frozen selectors (LoRA): nothing
        if not pairs:
            return None
        token_losses = linearized_token_losses(loss, [lp for _, lp in pairs])
        masks = [torch.ones_like(s.log_probs, dtype=torch.bool) if s.attention_mask is None
                 else s.attention_mask.bool() for s, _ in pairs]
        scale = 1  # the entropy averaged over the accumulation window when the loss is
        if _loss_scaled_for_accumulation(self, num_items_in_batch):
            scale = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        normalizer = sum(m.sum() for m in masks).clamp(min=1) * scale
        gate_loss, entropy = 0.0, 0.0
        for (samples, _), losses, mask in zip(pairs, token_losses, masks):
            if losses is None:  # this forward's log-probs do not enter the loss: nothing to reinforce
                continue
            joint_entropy = samples.entropy
            gate_loss = gate_loss + gate_reinforce_loss(
                samples.log_probs, _align(losses, samples.log_probs.shape[1]), mask, discount=config.policy_discount,
                position_ids=samples.position_ids, gate_entropy=joint_entropy, entropy_coef=config.entropy_coef,
                entropy_normalizer=normalizer,
            )
            entropy = entropy + (joint_entropy.detach() * mask).sum() / (normalizer / scale)
        if not torch.is_tensor(gate_loss):
            return None
        metrics = getattr(self, "_metrics", None)
        if metrics is not None:  # TRL trainers average these into their logs
            metrics["train"]["gate/policy_loss"].append(self.accelerator.gather(gate_loss.detach()).mean().item())
            metrics["train"]["gate/entropy"].append(self.accelerator.gather(entropy.detach()).mean().item())
        return gate_loss


def _refuse_full_logit_losses(trainer) -> None:
    """SFT losses computed from full logits bypass the fused head: no per-token log-probs to pair the gates with."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(model.config, "gating_mode", None) != "reinforce":
        return
    if trainer.compute_loss_func is not None or trainer.label_smoother is not None:
        raise ValueError(f"{type(trainer).__name__}: a gating_mode='reinforce' RAT needs the fused LM head's per-token "
                         "log-probs to train its gates; compute_loss_func and label_smoothing_factor are not supported")


# The TRL subclasses are defined on first access (PEP 562), so this module, and `gate_reinforce_loss` with it, imports
# without TRL (an optional dependency).
_TRL_TRAINERS = ("RatSFTTrainer", "RatDPOTrainer", "RatGRPOTrainer")


def __getattr__(name: str):
    if name in _TRL_TRAINERS:
        _define_trl_trainers()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _define_trl_trainers() -> None:
    try:
        import trl
    except ImportError as e:
        raise ImportError(f"{', '.join(_TRL_TRAINERS)} need TRL: pip install 'rat_hf[train]'") from e

    class RatSFTTrainer(_ReinforcedGatingMixin, trl.SFTTrainer):
        """`trl.SFTTrainer` that also trains a reinforce-mode RAT's sampled gates (token NLL, reward-to-go).
        Same constructor; any other model trains exactly as under `SFTTrainer`."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            _refuse_full_logit_losses(self)

    class RatDPOTrainer(_ReinforcedGatingMixin, trl.DPOTrainer):
        """`trl.DPOTrainer` that also trains a reinforce-mode RAT's sampled gates (each sequence's DPO slope times
        its tokens' NLL, reward-to-go). Same constructor; any other model trains exactly as under `DPOTrainer`."""

    class RatGRPOTrainer(_ReinforcedGatingMixin, trl.GRPOTrainer):
        """`trl.GRPOTrainer` that also trains a reinforce-mode RAT's sampled gates with the completions' advantages
        (reward-to-go within the completion). Same constructor; any other model trains exactly as under
        `GRPOTrainer`."""

    for cls in (RatSFTTrainer, RatDPOTrainer, RatGRPOTrainer):
        cls.__module__, cls.__qualname__ = __name__, cls.__name__
        globals()[cls.__name__] = cls


__all__ = ["RatSFTTrainer", "RatDPOTrainer", "RatGRPOTrainer", "collect_gate_samples", "gate_reinforce_loss",
           "linearized_token_losses"]
