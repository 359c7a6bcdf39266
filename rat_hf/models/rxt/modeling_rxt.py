"""Reactive Transformer (RxT) as a transformers model.

An RxT answers each query from a fixed-size short-term memory (STM) and folds the finished interaction into that
memory afterwards, so the cost of a turn does not grow with the conversation:

    answer  = decoder([Q] query [A] ..., memory)       # causal self-attention -> memory cross-attention -> SwiGLU/MoE
    encoded = encoder([Q] query [A] answer [EOS])       # bidirectional, every layer's hidden states
    memory' = memory_attention(memory, encoded)         # per STM layer: slots attend to the encoded interaction,
                                                        # STM' = K * STM + W * update (sigmoid keep/write gates
                                                        # per slot; `memory_residual="interpolate"`: G, 1 - G)

The memory is explicit: a tensor `[batch, num_hidden_layers, stm_size, hidden_size]` from `init_memory(batch)`,
passed to `forward`/`generate(..., memory=m)` and returned by `update_memory(m, input_ids, attention_mask)`. Nothing
is kept on the module. Batch first, so `generate()` repeats it for beams and `num_return_sequences`.

One attention class serves every component and every head layout (MHA, GQA, MQA, SQA and its symmetric and extreme
variants); RoPE rotates queries and keys in self-attention, queries only in the memory cross-attention (the slots
have no position) and keys only in the memory attention (the queries are slots). Any backend of the
attention-function registry runs it. With a cache, the cross-attention keys/values of the memory are computed once
per turn and reused at every decoding step.

Classes: `RxTModel` (decoder, encoder, memory attention), `RxTForCausalLM` (+ LM head), `RxTForMaskedLM` (the
encoder + its masked-LM head) and `RxTForPreTraining` (both heads; one forward runs a whole reactive step, which the
training curriculum in `rat_hf.trainers` uses). All read the same weight names. This file imports only torch,
transformers and its configuration: it ships to the Hub as remote code.
"""

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_bidirectional_mask, create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPastAndCrossAttentions,
    CausalLMOutputWithCrossAttentions,
    MaskedLMOutput,
)
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.utils import can_return_tuple, logging
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_rxt import RxTConfig


logger = logging.get_logger(__name__)

# Copied from rat_hf.models.rat.modeling_rat (the cache argument across transformers versions)
_MASK_CACHE_ARG = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"
_OUTPUT_CACHE_FIELD = (
    "cache" if "cache" in BaseModelOutputWithPastAndCrossAttentions.__dataclass_fields__ else "past_key_values"
)


# Copied from rat_hf.models.rat.modeling_rat._resolve_cache
def _resolve_cache(cache: Cache | None, past_key_values: Cache | None) -> Cache | None:
    """The cache under either name (`cache` from transformers >= 5.24, `past_key_values` before); both is an error."""
    if cache is not None and past_key_values is not None:
        raise ValueError("pass the cache as `cache` or as `past_key_values`, not both")
    return cache if cache is not None else past_key_values


# Copied from transformers.models.llama.modeling_llama.LlamaRMSNorm with Llama->RxT
class RxTRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


# Copied from transformers.models.llama.modeling_llama.LlamaRotaryEmbedding with Llama->RxT
class RxTRotaryEmbedding(nn.Module):
    def __init__(self, config: RxTConfig):
        super().__init__()
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.config = config
        self.rope_type = config.rope_parameters["rope_type"]
        rope_init_fn: Callable = self.compute_default_rope_parameters
        if self.rope_type != "default":
            rope_init_fn = ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = rope_init_fn(config)
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)
        self.original_inv_freq = nn.Buffer(inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config: RxTConfig, device=None, **kwargs) -> tuple[torch.Tensor, float]:
        base = config.rope_parameters.get("rope_theta", 10000.0)
        dim = config.head_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim))
        return inv_freq, 1.0

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        device_type = x.device.type if x.device.type != "mps" else "cpu"
        with torch.autocast(device_type=device_type, enabled=False):  # RoPE tables in float32 whatever the autocast
            freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)  # [B, T, hd/2]
            emb = torch.cat((freqs, freqs), dim=-1)  # [B, T, hd]
            cos = emb.cos() * self.attention_scaling
            sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


# Copied from transformers.models.llama.modeling_llama.rotate_half
def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Llama's `apply_rotary_pos_emb` for one tensor `[B, H, T, hd]`: RxT rotates queries and keys independently."""
    return (x * cos.unsqueeze(1)) + (rotate_half(x) * sin.unsqueeze(1))


# Copied from transformers.models.llama.modeling_llama.repeat_kv
def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    batch, num_key_value_heads, slen, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep, slen, head_dim)
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)


# Copied from transformers.models.llama.modeling_llama.eager_attention_forward
def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    key_states = repeat_kv(key, module.num_key_value_groups)
    value_states = repeat_kv(value, module.num_key_value_groups)
    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value_states)
    return attn_output.transpose(1, 2).contiguous(), attn_weights


# Adapted from transformers.models.llama.modeling_llama.LlamaMLP with Llama->RxT (the width is an argument: the
# decoder, the encoder and the experts each have their own)
class RxTMLP(nn.Module):
    """SwiGLU feed-forward."""

    def __init__(self, config: RxTConfig, intermediate_size: int | None = None):
        super().__init__()
        intermediate_size = intermediate_size if intermediate_size is not None else config.intermediate_size
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class RxTSparseMoeBlock(nn.Module):
    """Top-k routed SwiGLU experts (token choice). Each expert is an `RxTMLP`, so LoRA's default names reach them."""

    def __init__(self, config: RxTConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.router = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = nn.ModuleList(RxTMLP(config, config.moe_intermediate_size) for _ in range(config.num_experts))

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])  # [N, D]
        router_logits = self.router(flat)  # [N, E]
        routing = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
        weights, chosen = torch.topk(routing, self.top_k, dim=-1)  # [N, k]
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(flat.dtype)
        output = torch.zeros_like(flat)
        for expert_idx in chosen.unique().tolist():
            token_idx, slot = torch.where(chosen == expert_idx)
            expert_out = self.experts[expert_idx](flat[token_idx]) * weights[token_idx, slot, None]
            output.index_add_(0, token_idx, expert_out)
        return output.view_as(hidden_states), router_logits


def load_balancing_loss(
    router_logits: tuple[torch.Tensor, ...], num_experts: int, top_k: int, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch-style auxiliary loss `E * sum_e f_e * P_e` over all MoE layers, padding excluded.

    f_e: fraction of (token, slot) routings that chose expert e; P_e: mean router probability of e. Balanced routing
    gives `top_k`; collapse onto one expert gives up to `top_k * E`.
    """
    logits = torch.stack(router_logits).float()  # [L, N, E]
    probs = torch.softmax(logits, dim=-1)
    chosen = torch.topk(probs, top_k, dim=-1).indices  # [L, N, k]
    routed = F.one_hot(chosen, num_experts).float()  # [L, N, k, E]
    if attention_mask is None or attention_mask.dim() != 2:
        weight = torch.ones(probs.shape[1], device=probs.device)
    else:
        num_tokens = probs.shape[1] // attention_mask.shape[0]
        weight = attention_mask[:, -num_tokens:].reshape(-1).to(probs.device, torch.float32)  # [N]
    total = weight.sum().clamp(min=1) * probs.shape[0]
    tokens_per_expert = torch.einsum("lnke,n->ke", routed, weight) / total  # [k, E]
    prob_per_expert = torch.einsum("lne,n->e", probs, weight) / total  # [E]
    return num_experts * (tokens_per_expert * prob_per_expert).sum()


class RxTAttention(nn.Module):
    """Attention for every RxT component and head layout.

    `num_heads` query heads and `num_key_value_heads` key/value heads of width `head_dim`, as the config's variant
    names them: MHA (H, H), GQA (H, Hkv), MQA (H, 1), SQA (Hq < H, Hkv), sSQA (H/2, H/2), xSQA (H/4, H/4). Fewer query
    heads shrink `q_proj`, the score matrix and `o_proj`: SQA saves attention FLOPs, GQA/MQA save KV memory.
    Keys/values come from `key_value_states` (cross-attention), from precomputed `key_value`, or from the input.
    """

    def __init__(
        self, config: RxTConfig, variant: str, layer_idx: int, is_causal: bool, rope_queries: bool, rope_keys: bool
    ):
        super().__init__()
        self.config = config
        self.variant = variant
        self.layer_idx = layer_idx
        self.num_heads, self.num_key_value_heads = config.attention_heads(variant)
        self.head_dim = config.head_dim
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = is_causal
        self.rope_queries, self.rope_keys = rope_queries, rope_keys
        hidden, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=bias)

    def project_key_value(
        self, states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values `[B, Hkv, T, hd]` of `states` `[B, T, D]`; keys rotated when this attention ropes keys."""
        hidden_shape = (*states.shape[:-1], -1, self.head_dim)
        key_states = self.k_proj(states).view(hidden_shape).transpose(1, 2)
        value_states = self.v_proj(states).view(hidden_shape).transpose(1, 2)
        if self.rope_keys and position_embeddings is not None:
            key_states = apply_rotary(key_states, *position_embeddings)
        return key_states, value_states

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        key_value_states: torch.Tensor | None = None,
        key_value: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        query_states = self.q_proj(hidden_states).view(*input_shape, -1, self.head_dim).transpose(1, 2)  # [B, Hq, T, hd]
        if self.rope_queries and position_embeddings is not None:
            query_states = apply_rotary(query_states, *position_embeddings)
        if key_value is None:
            states = hidden_states if key_value_states is None else key_value_states
            key_value = self.project_key_value(states, position_embeddings)
        key_states, value_states = key_value
        if cache is not None:
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self, query_states, key_states, value_states, attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scaling, **kwargs,
        )  # attn_output: [B, T, Hq, hd]
        return self.o_proj(attn_output.reshape(*input_shape, -1)), attn_weights


class RxTGateLinear(nn.Linear):
    """The dynamic gate's projection: its own class so `_init_weights` can give it the configured bias, `bias_init`."""

    def __init__(self, in_features: int, bias_init: list):
        super().__init__(in_features, len(bias_init))
        self.bias_init = [float(b) for b in bias_init]


class RxTResidualGate(nn.Module):
    """Per-slot sigmoid residual gates combining a slot's old value and its update (`config.memory_residual`):

    decoupled:   `new = K * old + W * update`, a keep gate K and a write gate W, each `[B, S, 1]`;
    interpolate: `new = G * update + (1 - G) * old`.

    `static`: learned logits per slot (`gate_logits`, `[S, gates]`). `dynamic`: the logits are a linear function of
    `old + update` (`gate_logit_proj`). With two gates, logit 0 is K's and logit 1 is W's.
    """

    def __init__(self, config: RxTConfig):
        super().__init__()
        self.static = config.memory_gate_type == "static"
        self.decoupled = config.memory_residual == "decoupled"
        # the initial logits, which `_init_weights` writes
        self.logits_init = [config.memory_keep_gate_init, config.memory_gate_init] if self.decoupled else [
            config.memory_gate_init]
        if self.static:
            self.gate_logits = nn.Parameter(torch.zeros(config.stm_size, len(self.logits_init)))
        else:
            self.gate_logit_proj = RxTGateLinear(config.hidden_size, self.logits_init)

    def forward(self, old: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        logits = self.gate_logits if self.static else self.gate_logit_proj(old + update)
        gates = torch.sigmoid(logits.float()).to(update.dtype)  # [S or (B, S), gates]
        if self.decoupled:
            return gates[..., :1] * old + gates[..., 1:] * update
        return gates * update + (1 - gates) * old


class RxTDecoderLayer(GradientCheckpointingLayer):
    """Causal self-attention -> memory cross-attention (keys/values: this layer's normalised STM) -> SwiGLU or MoE."""

    def __init__(self, config: RxTConfig, layer_idx: int):
        super().__init__()
        self.self_attn = RxTAttention(
            config, config.self_attention_variant, layer_idx, is_causal=True, rope_queries=True, rope_keys=True
        )
        self.cross_attn = RxTAttention(
            config, config.cross_attention_variant, layer_idx, is_causal=False, rope_queries=True, rope_keys=False
        )
        self.mlp = RxTSparseMoeBlock(config) if config.num_experts else RxTMLP(config)
        self.input_layernorm = RxTRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.cross_attention_layernorm = RxTRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.memory_layernorm = RxTRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RxTRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def memory_key_value(self, memory_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention keys/values `[B, Hkv, S, hd]` of this layer's STM `[B, S, D]` (no RoPE: slots are a set)."""
        return self.cross_attn.project_key_value(self.memory_layernorm(memory_states))

    def forward(
        self,
        hidden_states: torch.Tensor,
        memory_key: torch.Tensor,
        memory_value: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: Cache | None = None,
        memory_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attn_out, _ = self.self_attn(
            self.input_layernorm(hidden_states), position_embeddings, attention_mask, cache=cache, **kwargs
        )
        hidden_states = hidden_states + self.dropout(attn_out)
        cross_out, _ = self.cross_attn(
            self.cross_attention_layernorm(hidden_states), position_embeddings, memory_mask,
            key_value=(memory_key, memory_value), **kwargs,
        )
        hidden_states = hidden_states + self.dropout(cross_out)
        mlp_out = self.mlp(self.post_attention_layernorm(hidden_states))
        router_logits = None
        if isinstance(mlp_out, tuple):
            mlp_out, router_logits = mlp_out
        return hidden_states + self.dropout(mlp_out), router_logits


class RxTEncoderLayer(GradientCheckpointingLayer):
    """Bidirectional self-attention -> SwiGLU."""

    def __init__(self, config: RxTConfig, layer_idx: int):
        super().__init__()
        self.self_attn = RxTAttention(
            config, config.encoder_attention_variant, layer_idx, is_causal=False, rope_queries=True, rope_keys=True
        )
        self.mlp = RxTMLP(config, config.encoder_intermediate_size)
        self.input_layernorm = RxTRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RxTRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> torch.Tensor:
        attn_out, _ = self.self_attn(self.input_layernorm(hidden_states), position_embeddings, attention_mask, **kwargs)
        hidden_states = hidden_states + self.dropout(attn_out)
        return hidden_states + self.dropout(self.mlp(self.post_attention_layernorm(hidden_states)))


class RxTEncoder(nn.Module):
    """The interaction encoder: returns the hidden states after every layer (the embedding is the model's, shared)."""

    def __init__(self, config: RxTConfig):
        super().__init__()
        self.layers = nn.ModuleList([RxTEncoderLayer(config, i) for i in range(config.num_encoder_layers)])

    def forward(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None, position_embeddings, **kwargs
    ) -> tuple[torch.Tensor, ...]:
        hidden_states, all_states = inputs_embeds, []
        for layer in self.layers:
            hidden_states = layer(hidden_states, attention_mask=attention_mask, position_embeddings=position_embeddings,
                                  **kwargs)
            all_states.append(hidden_states)
        return tuple(all_states)


class RxTMemoryAttentionLayer(GradientCheckpointingLayer):
    """Writes one STM layer. `memory_attention_type` picks what the slots look at before the encoded interaction:

    simple:                nothing;
    self:                  the slots of their own layer (STM self-attention);
    interlayer:            the mean of all STM layers;
    gated_self_interlayer: per slot, `g * own layer + (1 - g) * mean of layers`, g a sigmoid of both.

    That first stage is a gated residual update; then the slots (queries, no RoPE) attend to the encoded interaction
    (keys with RoPE, padding masked) and the final gate writes `STM' = K * STM + W * update` (`RxTResidualGate`).
    """

    def __init__(self, config: RxTConfig, layer_idx: int):
        super().__init__()
        self.memory_attention_type = config.memory_attention_type
        variant, eps = config.memory_attention_variant, config.rms_norm_eps
        if self.memory_attention_type != "simple":
            self.stm_attn = RxTAttention(config, variant, layer_idx, is_causal=False, rope_queries=False, rope_keys=False)
            self.stm_layernorm = RxTRMSNorm(config.hidden_size, eps=eps)
            self.stm_gate = RxTResidualGate(config)
        if self.memory_attention_type in ("interlayer", "gated_self_interlayer"):
            self.interlayer_layernorm = RxTRMSNorm(config.hidden_size, eps=eps)
        if self.memory_attention_type == "gated_self_interlayer":
            self.self_interlayer_gate = nn.Linear(config.hidden_size, 1)
        self.attn = RxTAttention(config, variant, layer_idx, is_causal=False, rope_queries=False, rope_keys=True)
        self.query_layernorm = RxTRMSNorm(config.hidden_size, eps=eps)
        self.encoded_layernorm = RxTRMSNorm(config.hidden_size, eps=eps)
        self.gate = RxTResidualGate(config)

    def stm_context(self, normed_stm: torch.Tensor, layer_mean: torch.Tensor | None) -> torch.Tensor:
        """What the slots attend to in the first stage."""
        if self.memory_attention_type == "self":
            return normed_stm
        normed_mean = self.interlayer_layernorm(layer_mean)
        if self.memory_attention_type == "interlayer":
            return normed_mean
        mix = torch.sigmoid(self.self_interlayer_gate(normed_stm + normed_mean).float()).to(normed_stm.dtype)
        return mix * normed_stm + (1 - mix) * normed_mean

    def forward(
        self,
        stm: torch.Tensor,
        encoded: torch.Tensor,
        layer_mean: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> torch.Tensor:
        hidden = stm
        if self.memory_attention_type != "simple":
            normed = self.stm_layernorm(stm)
            update, _ = self.stm_attn(normed, None, None, key_value_states=self.stm_context(normed, layer_mean), **kwargs)
            hidden = self.stm_gate(stm, update)
        update, _ = self.attn(
            self.query_layernorm(hidden), position_embeddings, attention_mask,
            key_value_states=self.encoded_layernorm(encoded), **kwargs,
        )
        return self.gate(hidden, update)


class RxTMemoryAttention(nn.Module):
    """The memory-attention network: one layer per STM layer, all reading the memory from before this update."""

    def __init__(self, config: RxTConfig):
        super().__init__()
        self.memory_attention_type = config.memory_attention_type
        self.encoder_layer_ids = [config.encoder_layer_for_memory_layer(i) for i in range(config.num_hidden_layers)]
        self.layers = nn.ModuleList([RxTMemoryAttentionLayer(config, i) for i in range(config.num_hidden_layers)])

    def forward(
        self,
        memory: torch.Tensor,
        encoder_hidden_states: tuple[torch.Tensor, ...],
        attention_mask: torch.Tensor | None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
        **kwargs,
    ) -> torch.Tensor:
        layer_mean = memory.mean(dim=1) if "interlayer" in self.memory_attention_type else None  # [B, S, D]
        new_layers = [
            layer(memory[:, i], encoder_hidden_states[self.encoder_layer_ids[i]], layer_mean,
                  attention_mask=attention_mask, position_embeddings=position_embeddings, **kwargs)
            for i, layer in enumerate(self.layers)
        ]
        return torch.stack(new_layers, dim=1)  # [B, L, S, D]


class RxTPreTrainedModel(PreTrainedModel):
    config_class = RxTConfig
    config: RxTConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["RxTDecoderLayer", "RxTEncoderLayer", "RxTMemoryAttentionLayer"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False  # the per-turn memory keys/values ride on the cache object
    # The LM forward runs the decoder only (the encoder and memory attention run in `update_memory`): DDP must look
    # for unused parameters. rat_hf's trainers read this; with a plain `Trainer` pass `ddp_find_unused_parameters=True`.
    _forward_may_leave_parameters_unused = True
    _can_record_outputs = {
        "hidden_states": RxTDecoderLayer,
        "attentions": OutputRecorder(RxTAttention, index=1, layer_name="self_attn"),
        "cross_attentions": OutputRecorder(RxTAttention, index=1, layer_name="cross_attn"),
    }

    # Every RxT class reads the same weight names, so a checkpoint of any of them names them all in `auto_map`
    # (a curriculum stage saves `RxTForPreTraining`; users load `AutoModelForCausalLM` from it, also as remote code).
    _AUTO_CLASSES = {"AutoModel": "RxTModel", "AutoModelForCausalLM": "RxTForCausalLM",
                     "AutoModelForMaskedLM": "RxTForMaskedLM", "AutoModelForPreTraining": "RxTForPreTraining"}

    def save_pretrained(self, save_directory, *args, **kwargs):
        if self._auto_class is not None:  # registered for remote code (`import rat_hf` does)
            module = type(self).__module__.split(".")[-1]
            auto_map = dict(getattr(self.config, "auto_map", None) or {})
            for auto_class, name in self._AUTO_CLASSES.items():
                auto_map.setdefault(auto_class, f"{module}.{name}")
            self.config.auto_map = auto_map
        return super().save_pretrained(save_directory, *args, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, RxTModel):
            init.normal_(module.memory_init, mean=0.0, std=self.config.initializer_range)
        elif isinstance(module, RxTResidualGate) and module.static:
            init.copy_(module.gate_logits, torch.tensor(module.logits_init).expand_as(module.gate_logits))
        elif isinstance(module, RxTGateLinear):  # the leaf: a module without parameters of its own is skipped
            init.copy_(module.bias, torch.tensor(module.bias_init))


@dataclass
class RxTModelOutputWithPast(BaseModelOutputWithPastAndCrossAttentions):
    """Decoder outputs; `cross_attentions` are the memory cross-attention weights (eager attention only).

    router_logits: per MoE layer, the router logits `[B*T, num_experts]` (None for a dense decoder).
    """

    router_logits: tuple[torch.Tensor, ...] | None = None


@dataclass
class RxTCausalLMOutputWithPast(CausalLMOutputWithCrossAttentions):
    """`loss` = LM loss + `router_aux_loss_coef * aux_loss` (the load-balancing loss, MoE with labels only)."""

    aux_loss: torch.Tensor | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None


class RxTModel(RxTPreTrainedModel):
    """Embedding + decoder (the `forward`), with the encoder and the memory-attention network used by `update_memory`."""

    def __init__(self, config: RxTConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([RxTDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = RxTRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = RxTRotaryEmbedding(config)
        self.encoder = RxTEncoder(config)
        self.memory_attention = RxTMemoryAttention(config)
        # the learned initial STM, [L, S, D]
        self.memory_init = nn.Parameter(torch.empty(config.num_hidden_layers, config.stm_size, config.hidden_size))
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    # --- memory ---------------------------------------------------------------------------------------------------
    def init_memory(self, batch_size: int = 1, device=None, dtype=None) -> torch.Tensor:
        """A fresh memory `[batch_size, num_hidden_layers, stm_size, hidden_size]` (the learned initial STM)."""
        memory = self.memory_init.to(device=device, dtype=dtype)
        return memory.unsqueeze(0).expand(batch_size, *memory.shape).clone()

    def _check_memory(self, memory: torch.Tensor, batch_size: int, any_slots: bool = False) -> None:
        """ValueError unless `memory` is `[1 or batch_size, L, stm_size, D]` (`any_slots`: any slot count, which the
        decoder accepts with a `memory_attention_mask`)."""
        expected = (self.config.num_hidden_layers, self.config.stm_size, self.config.hidden_size)
        slots_ok = memory.dim() == 4 and (memory.shape[2] == expected[1] or (any_slots and memory.shape[2] > 0))
        if (memory.dim() != 4 or not slots_ok or (memory.shape[1], memory.shape[3]) != (expected[0], expected[2])
                or memory.shape[0] not in (1, batch_size)):
            raise ValueError(
                f"RxT memory must have shape [batch={batch_size}, num_hidden_layers, stm_size, hidden_size] = "
                f"[{batch_size}, {', '.join(map(str, expected))}] (a batch of 1 is broadcast"
                + ("; another slot count needs a memory_attention_mask" if not any_slots else "")
                + f"); got {list(memory.shape)}"
            )

    def encode(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """The encoder's hidden states after every layer, each `[B, T, D]` (padding masked out of attention)."""
        return self._encode(input_ids, attention_mask)[0]

    def _encode(self, input_ids, attention_mask):
        inputs_embeds = self.embed_tokens(input_ids)  # [B, T, D]
        if attention_mask is None:
            attention_mask = torch.ones(input_ids.shape, dtype=torch.bool, device=input_ids.device)
        attention_mask = attention_mask.bool()
        has_tokens = attention_mask.any(dim=-1)  # [B]
        # an empty row attends to its padding (its result is discarded) so no softmax runs over nothing
        attention_mask = attention_mask | ~has_tokens[:, None]
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # left or right padding: real tokens at 0..
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids)
        mask = create_bidirectional_mask(config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask)
        encoded = self.encoder(inputs_embeds, mask, position_embeddings)
        return encoded, attention_mask, has_tokens, position_embeddings

    def update_memory(
        self, memory: torch.Tensor | None, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The memory after reading the finished interactions `input_ids` (`[Q] query [A] answer [EOS]`, any padding).

        Returns a new tensor; `memory` is left as it was. Rows whose `attention_mask` is all zeros keep their memory.
        """
        return self._write_memory(memory, *self._encode(input_ids, attention_mask))

    def _write_memory(self, memory, encoded, attention_mask, has_tokens, position_embeddings) -> torch.Tensor:
        """The memory-attention step of `update_memory`, from the encoder's outputs (`_encode`)."""
        batch_size, dtype = encoded[0].shape[0], encoded[0].dtype
        if memory is None:
            memory = self.init_memory(batch_size, dtype=dtype)
        self._check_memory(memory, batch_size)
        memory = memory.expand(batch_size, -1, -1, -1).to(dtype)
        slots = memory[:, 0]  # [B, S, D], for the mask's shapes
        mask = create_bidirectional_mask(
            config=self.config, inputs_embeds=slots, attention_mask=attention_mask, encoder_hidden_states=encoded[0]
        )  # queries: slots, keys: tokens
        new_memory = self.memory_attention(memory, encoded, mask, position_embeddings)
        return torch.where(has_tokens[:, None, None, None], new_memory, memory)

    def encoder_states_as_memory(self, encoded: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The encoder's layer states `[B, T, D]` as a decoder memory `[B, L, T, D]`: decoder layer `l` reads encoder
        layer `encoder_layer_for_memory_layer(l)`, the one memory-attention layer `l` writes from (joint pre-training)."""
        return torch.stack([encoded[i] for i in self.memory_attention.encoder_layer_ids], dim=1)

    def memory_key_values(
        self, memory: torch.Tensor | None, batch_size: int, cache: Cache | None = None, any_slots: bool = False
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every decoder layer's cross-attention keys/values `[B, Hkv, S, hd]` of `memory` (None: the initial memory).

        With a cache they are computed once and kept on it for as long as the same memory tensor comes back, so a
        decoding step costs nothing for the memory whatever `stm_size` is. `any_slots`: accept any slot count.
        """
        source = self.memory_init if memory is None else memory
        stored = getattr(cache, "_rxt_memory_key_values", None)
        if stored is not None and stored[0] is source:
            key_values = stored[1]
        else:
            if memory is None:
                memory = self.memory_init.unsqueeze(0)
            self._check_memory(memory, batch_size, any_slots=any_slots)
            memory = memory.to(self.memory_init.dtype)
            key_values = [layer.memory_key_value(memory[:, i]) for i, layer in enumerate(self.layers)]
            if cache is not None:
                cache._rxt_memory_key_values = (source, key_values)
        return [(k.expand(batch_size, -1, -1, -1), v.expand(batch_size, -1, -1, -1)) for k, v in key_values]

    # --- decoder ----------------------------------------------------------------------------------------------------
    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        memory: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        memory_attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> RxTModelOutputWithPast:
        r"""
        memory (`torch.Tensor` of shape `[batch, num_hidden_layers, stm_size, hidden_size]`, *optional*):
            The short-term memory the decoder reads; `init_memory(batch)` when not given (a first turn).
        memory_attention_mask (`torch.Tensor` of shape `[batch, memory_slots]`, *optional*):
            Which memory slots the cross-attention may read (1) and which are padding (0). With it, `memory` may have
            any slot count: joint pre-training feeds the encoder's token states `[batch, L, T, D]` as the memory.
        """
        cache = _resolve_cache(cache, past_key_values)
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("RxTModel.forward: pass exactly one of `input_ids` or `inputs_embeds`")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)  # [B, T, D]
        # Copied from rat_hf.models.rat.modeling_rat.RatModel.forward (no cache under checkpointing, mask_cache)
        if self.gradient_checkpointing and self.training:
            # a recomputed layer would write its keys/values into a cache a second time (transformers 5.17's
            # checkpointing layer only drops a kwarg named `past_key_values`, not `cache`)
            if cache is not None:
                logger.warning_once(f"{type(self).__name__}: no cache while training with gradient checkpointing")
            cache, use_cache = None, False
        # A cache made here is empty: the masks are built as without one, so packed rows (positions restarting at 0,
        # no attention mask) keep their document boundaries also when `use_cache` is on (Llama loses them there).
        mask_cache = cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)

        past_seen_tokens = cache.get_seq_length() if cache is not None else 0
        batch_size, seq_len = inputs_embeds.shape[:2]
        if (position_ids is None and torch.is_tensor(attention_mask) and attention_mask.dim() == 2
                and attention_mask.shape[-1] == past_seen_tokens + seq_len):
            # Queries are rotated before they read the memory, so unlike self-attention (relative positions) the
            # result depends on absolute positions: a left-padded row must count from its first real token, as
            # generate() does. The 2D mask covers past + new tokens (any other length: positions from the cache).
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -seq_len:]  # [B, T]
        if position_ids is None:
            position_ids = torch.arange(seq_len, device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)  # [1, T]
        if isinstance(attention_mask, dict):  # prepared by generate() for a compilable (static) cache
            causal_mask = attention_mask["full_attention"]
        else:
            causal_mask = create_causal_mask(**{
                "config": self.config, "inputs_embeds": inputs_embeds, "attention_mask": attention_mask,
                _MASK_CACHE_ARG: mask_cache, "position_ids": position_ids,
            })
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids)
        memory_key_values = self.memory_key_values(memory, batch_size, cache, any_slots=memory_attention_mask is not None)
        memory_mask = None
        if memory_attention_mask is not None:
            if memory is None or memory_attention_mask.shape != (memory.shape[0], memory.shape[2]):
                raise ValueError(f"RxTModel.forward: memory_attention_mask must be [batch, memory slots] = "
                                 f"{[memory.shape[0], memory.shape[2]] if memory is not None else '(no memory given)'}"
                                 f", got {list(memory_attention_mask.shape)}")
            memory_attention_mask = memory_attention_mask.bool().expand(batch_size, -1)
            memory_mask = create_bidirectional_mask(
                config=self.config, inputs_embeds=inputs_embeds, attention_mask=memory_attention_mask,
                encoder_hidden_states=inputs_embeds.new_empty(batch_size, memory.shape[2], 1),
            )  # queries: tokens, keys: memory slots

        hidden_states = inputs_embeds
        router_logits = []
        for layer, (memory_key, memory_value) in zip(self.layers, memory_key_values):
            hidden_states, layer_router_logits = layer(
                hidden_states, memory_key.to(hidden_states.dtype), memory_value.to(hidden_states.dtype),
                attention_mask=causal_mask, position_embeddings=position_embeddings, cache=cache,
                memory_mask=memory_mask, **kwargs,
            )
            if layer_router_logits is not None:
                router_logits.append(layer_router_logits)

        return RxTModelOutputWithPast(
            last_hidden_state=self.norm(hidden_states),
            router_logits=tuple(router_logits) or None,
            **{_OUTPUT_CACHE_FIELD: cache},
        )


class RxTForCausalLM(RxTPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    # a checkpoint saved by `RxTForPreTraining` (the training curriculum) also holds the encoder's MLM head
    _keys_to_ignore_on_load_unexpected = [r"^mlm_head\."]
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: RxTConfig):
        super().__init__(config)
        self.model = RxTModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def init_memory(self, batch_size: int = 1, device=None, dtype=None) -> torch.Tensor:
        """A fresh memory `[batch_size, num_hidden_layers, stm_size, hidden_size]`."""
        return self.model.init_memory(batch_size, device=device, dtype=dtype)

    def update_memory(
        self, memory: torch.Tensor | None, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The memory after the finished interactions `input_ids` (`[Q] query [A] answer [EOS]`); see `RxTModel`."""
        return self.model.update_memory(memory, input_ids, attention_mask)

    def encode(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """The encoder's hidden states after every layer."""
        return self.model.encode(input_ids, attention_mask)

    def _decoder_losses(self, logits, labels, router_logits, attention_mask, **kwargs):
        """(next-token loss on `labels`, the MoE load-balancing loss or None)."""
        loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        aux_loss = None
        if router_logits is not None:
            aux_loss = load_balancing_loss(
                router_logits, self.config.num_experts, self.config.num_experts_per_tok, attention_mask
            )
        return loss, aux_loss

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        memory: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        memory_attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> RxTCausalLMOutputWithPast:
        r"""
        memory (`torch.Tensor` of shape `[batch, num_hidden_layers, stm_size, hidden_size]`, *optional*):
            The short-term memory the decoder reads; `generate(..., memory=m)` passes it to every step.
        memory_attention_mask (`torch.Tensor` of shape `[batch, memory_slots]`, *optional*):
            Padding mask of the memory slots; with it `memory` may have any slot count (see `RxTModel.forward`).
        """
        outputs: RxTModelOutputWithPast = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            cache=_resolve_cache(cache, past_key_values), inputs_embeds=inputs_embeds, use_cache=use_cache,
            memory=memory, memory_attention_mask=memory_attention_mask, **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])  # [B, T', V]

        loss = aux_loss = None
        if labels is not None:
            loss, aux_loss = self._decoder_losses(logits, labels, outputs.router_logits, attention_mask, **kwargs)
            if aux_loss is not None:
                loss = loss + self.config.router_aux_loss_coef * aux_loss.to(loss.device)

        return RxTCausalLMOutputWithPast(
            loss=loss, aux_loss=aux_loss, logits=logits, hidden_states=outputs.hidden_states,
            attentions=outputs.attentions, cross_attentions=outputs.cross_attentions, router_logits=outputs.router_logits,
            **{_OUTPUT_CACHE_FIELD: getattr(outputs, _OUTPUT_CACHE_FIELD)},
        )


class RxTMaskedLMHead(nn.Module):
    """The encoder's masked-LM head: RMSNorm -> dense -> activation -> RMSNorm -> vocabulary projection.

    The first norm is needed because the encoder's layers are pre-norm and end on the raw residual stream. The
    projection (`decoder`) is tied to the shared token embedding when `tie_word_embeddings` is set.
    """

    def __init__(self, config: RxTConfig):
        super().__init__()
        self.input_norm = RxTRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size, bias=config.mlp_bias)
        self.act_fn = ACT2FN[config.hidden_act]
        self.norm = RxTRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(self, encoder_states: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(self.act_fn(self.dense(self.input_norm(encoder_states)))))  # [B, T, V]


def masked_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the positions whose label is not -100 (no shift: the encoder predicts in place); 0
    (still part of the graph) when no position is scored, e.g. a short batch in which nothing was masked."""
    labels = labels.to(logits.device).reshape(-1)
    total = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels, ignore_index=-100, reduction="sum")
    return total / (labels != -100).sum().clamp(min=1)


class RxTForMaskedLM(RxTPreTrainedModel):
    """The encoder with its masked-LM head (`AutoModelForMaskedLM`, the `fill-mask` pipeline).

    It holds the whole `RxTModel` (decoder included), so it loads from any RxT checkpoint under the same weight
    names; the decoder is not run. `forward` returns `MaskedLMOutput` with the loss over labels != -100.
    """

    _tied_weights_keys = {"mlm_head.decoder.weight": "model.embed_tokens.weight"}
    _keys_to_ignore_on_load_unexpected = [r"^lm_head\."]

    def __init__(self, config: RxTConfig):
        super().__init__(config)
        self.model = RxTModel(config)
        self.mlm_head = RxTMaskedLMHead(config)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.mlm_head.decoder

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.mlm_head.decoder = value

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> MaskedLMOutput:
        if input_ids is None:
            raise ValueError("RxTForMaskedLM.forward: input_ids are required (the encoder reads token ids)")
        encoded = self.model.encode(input_ids, attention_mask)
        logits = self.mlm_head(encoded[-1])
        loss = masked_lm_loss(logits, labels) if labels is not None else None
        return MaskedLMOutput(loss=loss, logits=logits, hidden_states=encoded if output_hidden_states else None)


@dataclass
class RxTForPreTrainingOutput(RxTCausalLMOutputWithPast):
    """Outputs of one step of `RxTForPreTraining` (fields of the parts that did not run are None).

    loss: `lm_loss + mlm_loss + router_aux_loss_coef * aux_loss` over the parts that ran with labels (the curriculum's
        trainers weight the parts themselves).
    lm_loss: the decoder's next-token loss on `labels`; mlm_loss: the encoder's masked-LM loss on `mlm_labels`.
    mlm_logits: `[B, T_enc, V]`, computed when `mlm_labels` are given.
    memory: the memory after the memory attention wrote the encoded interaction into it `[B, L, S, D]` (None in
        the joint mode `memory_from_encoder=True`, and when no encoder input was given).
    encoder_hidden_states: the encoder's states after every layer, each `[B, T_enc, D]`.
    encoder_attention_mask: the encoder's padding mask `[B, T_enc]` (bool).
    """

    lm_loss: torch.Tensor | None = None
    mlm_loss: torch.Tensor | None = None
    mlm_logits: torch.Tensor | None = None
    memory: torch.Tensor | None = None
    encoder_hidden_states: tuple[torch.Tensor, ...] | None = None
    encoder_attention_mask: torch.Tensor | None = None


class RxTForPreTraining(RxTForCausalLM):
    """An `RxTForCausalLM` with the encoder's masked-LM head: the model the training curriculum trains and saves.

    One `forward` runs one step of the reactive cycle, so every part a stage trains runs inside the model's own
    forward (DistributedDataParallel synchronises only what its wrapped forward computed):

        encoded = encoder(encoder_input_ids)                    # if given; MLM logits/loss with `mlm_labels`
        memory' = memory_attention(memory, encoded)             # unless `memory_from_encoder`
        logits  = decoder(input_ids, memory' | memory)          # if `input_ids`/`inputs_embeds` are given

    `memory_from_encoder=True` is joint LM pre-training: the decoder's memory cross-attention reads the encoder's
    layer states of the same text, detached (the encoder learns from its MLM loss only) and with Gaussian noise of
    `memory_noise_std` times each token state's RMS, instead of a memory. Without an encoder input the decoder reads
    `memory` as `RxTForCausalLM` does (also under `generate`). The saved checkpoint loads as `RxTForCausalLM`,
    `RxTForMaskedLM` or this class.
    """

    _tied_weights_keys = {
        "lm_head.weight": "model.embed_tokens.weight",
        "mlm_head.decoder.weight": "model.embed_tokens.weight",
    }

    def __init__(self, config: RxTConfig):
        RxTPreTrainedModel.__init__(self, config)  # RxTForCausalLM's parts plus the MLM head, initialised once
        self.model = RxTModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.mlm_head = RxTMaskedLMHead(config)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        memory: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        memory_attention_mask: torch.Tensor | None = None,
        encoder_input_ids: torch.LongTensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        mlm_labels: torch.LongTensor | None = None,
        memory_from_encoder: bool = False,
        memory_noise_std: float = 0.0,
        **kwargs,
    ) -> RxTForPreTrainingOutput:
        r"""
        encoder_input_ids (`torch.LongTensor` of shape `[batch, T_enc]`, *optional*):
            The interaction (or text) the encoder reads, masked where `mlm_labels` are set.
        encoder_attention_mask (`torch.Tensor` of shape `[batch, T_enc]`, *optional*): its padding mask.
        mlm_labels (`torch.LongTensor` of shape `[batch, T_enc]`, *optional*): MLM targets, -100 where not scored.
        memory_from_encoder (`bool`): the decoder reads the encoder's detached, noised states (joint pre-training).
        memory_noise_std (`float`): noise on those states, relative to each state's RMS.
        """
        if memory_from_encoder and encoder_input_ids is None:
            raise ValueError("RxTForPreTraining.forward: memory_from_encoder=True needs encoder_input_ids")
        if memory_from_encoder and memory is not None:
            raise ValueError("RxTForPreTraining.forward: give memory or memory_from_encoder=True, not both")
        if not (isinstance(memory_noise_std, (int, float)) and memory_noise_std >= 0):
            raise ValueError(f"RxTForPreTraining.forward: memory_noise_std must be a number >= 0, got {memory_noise_std!r}")
        encoded = encoder_mask = mlm_logits = mlm_loss = new_memory = None
        if encoder_input_ids is not None:
            encoded, encoder_mask, has_tokens, encoder_positions = self.model._encode(
                encoder_input_ids, encoder_attention_mask)
            if mlm_labels is not None:
                mlm_logits = self.mlm_head(encoded[-1])
                mlm_loss = masked_lm_loss(mlm_logits, mlm_labels)
            if memory_from_encoder:
                states = self.model.encoder_states_as_memory(encoded).detach()  # [B, L, T_enc, D]
                if memory_noise_std > 0:
                    rms = states.float().pow(2).mean(-1, keepdim=True).sqrt()
                    states = states + (memory_noise_std * rms * torch.randn_like(states, dtype=torch.float32)).to(
                        states.dtype)
                memory, memory_attention_mask = states, encoder_mask
            else:
                new_memory = memory = self.model._write_memory(memory, encoded, encoder_mask, has_tokens,
                                                               encoder_positions)

        logits = lm_loss = aux_loss = router_logits = hidden_states = attentions = cross_attentions = cache_out = None
        if input_ids is not None or inputs_embeds is not None:
            decoded = super().forward(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                inputs_embeds=inputs_embeds, use_cache=use_cache, logits_to_keep=logits_to_keep, memory=memory,
                past_key_values=past_key_values, memory_attention_mask=memory_attention_mask, **kwargs,
            )
            logits, router_logits = decoded.logits, decoded.router_logits
            hidden_states, attentions, cross_attentions = decoded.hidden_states, decoded.attentions, decoded.cross_attentions
            cache_out = getattr(decoded, _OUTPUT_CACHE_FIELD)
            if labels is not None:
                lm_loss, aux_loss = self._decoder_losses(logits, labels, router_logits, attention_mask, **kwargs)

        parts = [x for x in (lm_loss, mlm_loss) if x is not None]
        if aux_loss is not None:
            parts.append(self.config.router_aux_loss_coef * aux_loss.to(lm_loss.device))
        loss = sum(parts[1:], parts[0]) if parts else None
        return RxTForPreTrainingOutput(
            loss=loss, lm_loss=lm_loss, mlm_loss=mlm_loss, aux_loss=aux_loss, logits=logits, mlm_logits=mlm_logits,
            memory=new_memory, encoder_hidden_states=encoded, encoder_attention_mask=encoder_mask,
            hidden_states=hidden_states, attentions=attentions, cross_attentions=cross_attentions,
            router_logits=router_logits, **{_OUTPUT_CACHE_FIELD: cache_out},
        )


__all__ = ["RxTPreTrainedModel", "RxTModel", "RxTForCausalLM", "RxTForMaskedLM", "RxTForPreTraining"]
