"""The attention probe: the query and key vectors a causal LM's last self-attention layer computes.

`AttentionProbe(model)` finds the last self-attention module of any causal LM by its *layout*, never by model name:

* Llama-style: `q_proj` and `k_proj` (RAT, Llama/Mistral/Qwen with GQA, RxT's decoder `self_attn`), optional
  `q_norm`/`k_norm` (Qwen3, applied per head before RoPE), RoPE from the `position_embeddings` (cos, sin) the model
  passes to the module, applied with the model's own rotary function when its module defines one;
* GPT-2-style: a fused `c_attn` projection (`Conv1D`, output `[q | k | v]`), absolute positions (no RoPE).

Cross-attention modules (`is_cross_attention`, or `is_causal = False` as in RxT's memory cross-attention and encoder)
are skipped. Heads, KV groups and head size come from the config (`head_dim`, else `hidden_size //
num_attention_heads`) and the projections' widths, so SQA/GQA/MQA variants are read as the module runs them.

A forward pre-hook captures the module's input; the probe then applies the module's *own* projection layers to it,
so LoRA adapters wrapped around `q_proj`/`k_proj`/`c_attn` are included and gradients flow to them. By default the
hook stops the forward right there (`stop=True`): nothing after the last attention's input is needed.
"""

import inspect
import sys

import torch


class _StopForward(Exception):
    """Raised from the pre-hook to skip the rest of the forward once the probe has its input."""


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def _default_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Llama's rotate-half RoPE: q, k `[B, H, T, hd]`, cos/sin `[B, T, hd]`."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _text_config(model):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


class AttentionProbe:
    """Query/key vectors of `model`'s last self-attention layer, as that layer computes them (RoPE applied).

    `probe.query_key(model_inputs)` -> `(q [B, H, T, hd], k [B, Hkv, T, hd])`; `probe.num_heads`,
    `probe.num_key_value_heads`, `probe.head_dim` describe the layout.
    """

    def __init__(self, model):
        self.model = model
        self.name, self.module, self.layout = self._find(model)
        config = _text_config(model)
        heads = getattr(config, "num_attention_heads", None)
        hidden = getattr(config, "hidden_size", None)
        head_dim = getattr(config, "head_dim", None) or (hidden // heads if heads and hidden else None)
        if not isinstance(head_dim, int) or head_dim <= 0:
            raise ValueError(f"{type(model).__name__}: the config names no head size (head_dim, or hidden_size and "
                             "num_attention_heads), so the attention probe cannot split heads")
        self.head_dim = head_dim
        if self.layout == "fused":
            fused = getattr(self.module.c_attn, "base_layer", self.module.c_attn)  # a LoRA wrapper keeps it
            self._fused_width = fused.weight.shape[-1] // 3  # Conv1D weight: [in, 3 * D]
            q_width = k_width = self._fused_width
        else:
            q_width, k_width = self._out_features(self.module.q_proj), self._out_features(self.module.k_proj)
        if q_width % head_dim or k_width % head_dim:
            raise ValueError(f"{self.name}: projection widths q={q_width}, k={k_width} are not multiples of the "
                             f"config's head size {head_dim}")
        self.num_heads, self.num_key_value_heads = q_width // head_dim, k_width // head_dim
        if self.num_heads % self.num_key_value_heads:
            raise ValueError(f"{self.name}: {self.num_heads} query heads cannot be grouped over "
                             f"{self.num_key_value_heads} key/value heads")
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self._signature = inspect.signature(self.module.forward)
        owner = sys.modules.get(type(self.module).__module__)
        self._rope_single = getattr(owner, "apply_rotary", None)  # RxT: one tensor at a time (rope flags per side)
        self._rope_pair = getattr(owner, "apply_rotary_pos_emb", None)  # Llama, RAT, ...: (q, k, cos, sin)

    # ---- finding the module ------------------------------------------------------------------------------------------
    @staticmethod
    def _find(model):
        found = None
        for name, module in model.named_modules():
            if getattr(module, "is_cross_attention", False) or getattr(module, "is_causal", True) is False:
                continue
            if hasattr(module, "q_proj") and hasattr(module, "k_proj") and not hasattr(module, "base_layer"):
                found = (name, module, "separate")
            elif hasattr(module, "c_attn") and not hasattr(module, "base_layer"):
                found = (name, module, "fused")
        if found is None:
            raise ValueError(f"{type(model).__name__}: no self-attention module with q_proj/k_proj or a fused c_attn "
                             "was found; the attention probe supports Llama-style (q_proj, k_proj, RoPE via "
                             "position_embeddings) and GPT-2-style (fused c_attn) layouts")
        return found

    @staticmethod
    def _out_features(layer) -> int:
        base = getattr(layer, "base_layer", layer)  # a LoRA wrapper keeps the original layer as base_layer
        if not hasattr(base, "out_features"):
            raise ValueError(f"attention probe: cannot read the output width of {type(base).__name__}")
        return base.out_features

    # ---- running it --------------------------------------------------------------------------------------------------
    def capture(self, **model_inputs) -> dict:
        """Run the model on `model_inputs` and return the last attention's input `{"hidden_states", "cos_sin"}`."""
        captured = {}

        def hook(module, args, kwargs):
            bound = self._signature.bind_partial(*args, **kwargs).arguments
            captured["hidden_states"] = bound.get("hidden_states", args[0] if args else None)
            captured["cos_sin"] = bound.get("position_embeddings")
            raise _StopForward  # nothing after the last attention is needed

        handle = self.module.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            self.model(**model_inputs)
        except _StopForward:
            pass
        finally:
            handle.remove()
        if captured.get("hidden_states") is None:
            raise ValueError(f"attention probe: the forward never reached {self.name} with hidden states")
        return captured

    def project(self, hidden_states: torch.Tensor, cos_sin=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The module's own q/k of its input `[B, T, D]`: q `[B, H, T, hd]`, k `[B, Hkv, T, hd]`, RoPE applied."""
        m, hd = self.module, self.head_dim
        shape = (*hidden_states.shape[:-1], -1, hd)
        if self.layout == "fused":
            q, k, _ = m.c_attn(hidden_states).split(self._fused_width, dim=-1)
            return q.view(shape).transpose(1, 2), k.view(shape).transpose(1, 2)
        q, k = m.q_proj(hidden_states).view(shape), m.k_proj(hidden_states).view(shape)
        if getattr(m, "q_norm", None) is not None:
            q = m.q_norm(q)
        if getattr(m, "k_norm", None) is not None:
            k = m.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        if cos_sin is not None:
            cos, sin = cos_sin
            if self._rope_single is not None:
                q = self._rope_single(q, cos, sin) if getattr(m, "rope_queries", True) else q
                k = self._rope_single(k, cos, sin) if getattr(m, "rope_keys", True) else k
            elif self._rope_pair is not None:
                q, k = self._rope_pair(q, k, cos, sin)
            else:
                q, k = _default_rope(q, k, cos, sin)
        return q, k

    def query_key(self, **model_inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """q `[B, H, T, hd]` and k `[B, Hkv, T, hd]` of the last self-attention layer for `model_inputs`."""
        captured = self.capture(**model_inputs)
        return self.project(captured["hidden_states"], captured["cos_sin"])
