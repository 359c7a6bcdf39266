"""RAT (Reinforced Adaptive Transformer) as a transformers model.

A block is pre-norm, three residual branches:

    x = x + o_proj(gates * attention(norm(x)))          # per-token, per-head gates from n_policies policy nets
    x = x + gelu(pointwise(gelu(causal_dwconv(norm(x)))))   # temporal convolution, left padding only
    x = x + down_proj(silu(gate_proj(norm(x))) * up_proj(norm(x)))

The gates of a token come from that token's hidden state alone, so the model is causal (the seed used the mean over the
whole sequence). Gates scale each head's attention *output*, so any attention backend (eager, sdpa, flash, flex) runs
unchanged. `gating_mode="reinforce"` samples one policy per token and layer while training and trains the selector by
REINFORCE with reward = minus that token's LM loss; in eval it uses the selector's expectation.

The KV cache and the convolution state live in one `DynamicCache` with `"hybrid"` layers, so `generate()` works with
every decoding strategy. This file imports only torch, transformers and its configuration: it ships to the Hub as
remote code.
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
from transformers.masking_utils import create_causal_mask, create_recurrent_attention_mask
from transformers.modeling_layers import GenericForSequenceClassification, GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.utils import can_return_tuple, logging
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .configuration_rat import RatConfig


logger = logging.get_logger(__name__)

# transformers 5.24 renamed the cache argument `past_key_values` -> `cache` (generate() passes `cache=`, the mask
# helpers take `cache`, outputs carry `.cache`); 5.17-5.23 use `past_key_values`. Each model accepts both names and
# talks to transformers in the installed one, so one checkpoint's remote code runs on every version we claim.
_MASK_CACHE_ARG = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"
_OUTPUT_CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def _resolve_cache(cache: Cache | None, past_key_values: Cache | None) -> Cache | None:
    """The cache under either name (`cache` from transformers >= 5.24, `past_key_values` before); both is an error."""
    if cache is not None and past_key_values is not None:
        raise ValueError("pass the cache as `cache` or as `past_key_values`, not both")
    return cache if cache is not None else past_key_values


# Copied from transformers.models.llama.modeling_llama.LlamaRMSNorm with Llama->Rat
class RatRMSNorm(nn.Module):
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


# Copied from transformers.models.llama.modeling_llama.LlamaRotaryEmbedding with Llama->Rat
class RatRotaryEmbedding(nn.Module):
    def __init__(self, config: RatConfig):
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
    def compute_default_rope_parameters(config: RatConfig, device=None, **kwargs) -> tuple[torch.Tensor, float]:
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


# Copied from transformers.models.llama.modeling_llama.apply_rotary_pos_emb
def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim: int = 1):
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


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


# Copied from transformers.models.llama.modeling_llama.LlamaMLP with Llama->Rat
class RatMLP(nn.Module):
    """SwiGLU feed-forward."""

    def __init__(self, config: RatConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


@dataclass
class RatGateOutput:
    """What one layer's gating decided, for the REINFORCE loss and the gating statistics."""

    selector_probs: torch.Tensor | None  # [B, T, P] selector distribution over policies (None with one policy)
    sampled_log_prob: torch.Tensor | None  # [B, T] log-prob of the sampled policy (reinforce mode, training only)


class RatPolicyGate(nn.Module):
    """Per-token, per-head attention gates proposed by `n_policies` small policy nets and weighed by a selector.

    Each policy net is Linear(d, p) -> GELU -> Linear(p, H) -> softmax * H, so a uniform policy gives every head a gate
    of exactly 1 (the seed's softmax gave 1/H and shrank attention by the head count). The P first layers run as one
    fused Linear and the P second layers as one block-diagonal matmul: two launches instead of 2P at decode time.
    """

    def __init__(self, config: RatConfig):
        super().__init__()
        self.n_policies = config.n_policies
        self.num_heads = config.num_attention_heads
        self.reinforce = config.gating_mode == "reinforce"
        p, hidden = config.policy_hidden_size, config.hidden_size
        self.policy_in = nn.Linear(hidden, self.n_policies * p)
        self.policy_out_weight = nn.Parameter(torch.empty(self.n_policies, p, self.num_heads))
        self.policy_out_bias = nn.Parameter(torch.zeros(self.n_policies, self.num_heads))
        if self.n_policies > 1:
            self.selector_in = nn.Linear(hidden, p)
            self.selector_out = nn.Linear(p, self.n_policies)

    def forward(self, hidden_states: torch.Tensor, sample: bool = False) -> tuple[torch.Tensor, RatGateOutput]:
        """Gates `[B, T, H]`; `sample=True` (reinforce training) draws one policy per token instead of the expectation."""
        batch, seq_len, _ = hidden_states.shape
        h = F.gelu(self.policy_in(hidden_states))  # [B, T, P*p]
        # the P second layers as one block-diagonal matmul [P*p, P*H]: one well-shaped GEMM instead of a batched
        # einsum over tiny matrices (which ran on a slow 16x16 kernel)
        logits = h @ torch.block_diag(*self.policy_out_weight) + self.policy_out_bias.flatten()  # [B, T, P*H]
        logits = logits.view(batch, seq_len, self.n_policies, self.num_heads)  # [B, T, P, H]
        gates = torch.softmax(logits.float(), dim=-1) * self.num_heads  # [B, T, P, H], mean over heads = 1
        if self.n_policies == 1:
            return gates[:, :, 0].to(hidden_states.dtype), RatGateOutput(None, None)

        # In reinforce mode the selector learns from the REINFORCE loss alone, so it reads a detached hidden state:
        # its loss then moves only the selector (in eval the values are the same either way).
        selector_input = hidden_states.detach() if self.reinforce and sample else hidden_states
        selector_logits = self.selector_out(F.gelu(self.selector_in(selector_input))).float()  # [B, T, P]
        probs = torch.softmax(selector_logits, dim=-1)
        if self.reinforce and sample:
            choice = torch.multinomial(probs.reshape(-1, self.n_policies), 1).view(batch, seq_len, 1)  # [B, T, 1]
            mixed = gates.gather(2, choice[..., None].expand(-1, -1, -1, self.num_heads)).squeeze(2)  # [B, T, H]
            log_prob = torch.log_softmax(selector_logits, dim=-1).gather(-1, choice).squeeze(-1)  # [B, T]
            return mixed.to(hidden_states.dtype), RatGateOutput(probs, log_prob)
        mixed = (probs[..., None] * gates).sum(dim=2)  # [B, T, H]; elementwise (fuses), not a float32 GEMM
        return mixed.to(hidden_states.dtype), RatGateOutput(probs, None)


class RatAttention(nn.Module):
    """Multi-head (or grouped-query) attention whose per-head outputs are scaled by the policy gates."""

    def __init__(self, config: RatConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, bias=config.attention_bias)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=config.attention_bias)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=config.attention_bias)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=config.attention_bias)
        self.gate = RatPolicyGate(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        sample_policies: bool = False,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None, RatGateOutput]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # [B, H, T, hd]
        key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # [B, Hkv, T, hd]
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        if position_embeddings is not None:
            cos, sin = position_embeddings
            query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)
        if cache is not None:
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self, query_states, key_states, value_states, attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scaling, **kwargs,
        )  # attn_output: [B, T, H, hd]
        gates, gate_output = self.gate(hidden_states, sample=sample_policies)  # [B, T, H]
        attn_output = (attn_output * gates[..., None]).reshape(*input_shape, -1)  # [B, T, H*hd]
        return self.o_proj(attn_output), attn_weights, gate_output


def causal_depthwise_conv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tap_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """y[t] = bias + sum_k weight[:, k] * x[t - K + 1 + k], over `x` already holding its K-1 steps of left context.

    x: [B, K-1+T, D] -> [B, T, D]. Written as K shifted multiply-adds in time-major layout: no transposes, and
    `torch.compile` fuses it with the norm and GELU around it (cuDNN's depthwise conv1d needs channels-first copies).
    `tap_mask` `[B or 1, T, K]` (1 = tap k of step t reads the same document) restarts the convolution at every
    document boundary of a packed row; None reads all taps.
    """
    kernel = weight.shape[-1]
    seq_len = x.shape[1] - kernel + 1
    y = x[:, kernel - 1 :] * weight[:, -1]  # [B, T, D]; the last tap is the token itself, always in its document
    for k in range(kernel - 1):
        tap = x[:, k : k + seq_len]
        if tap_mask is not None:
            tap = tap * tap_mask[..., k : k + 1]
        y = torch.addcmul(y, tap, weight[:, k])
    return y if bias is None else y + bias


def document_tap_mask(position_ids: torch.Tensor, kernel_size: int, dtype: torch.dtype) -> torch.Tensor:
    """`[B, T, K]`: tap k of step t (the input K-1-k steps back) lies in t's document.

    A document starts wherever the positions do not step by +1 (TRL's padding-free rows restart at 0; the rule is
    `create_causal_mask`'s, so attention and convolution split rows alike) and at a row starting at position 0. A row
    continuing a cached sequence (chunked prefill, positions from the cache length) has no start: every tap reads.
    Limit: one-token decoding takes no mask, so decoding after a packed prefill whose last document is shorter than
    K-1 reads the previous document's inputs from the conv state (attention's cache mixes them the same way).
    """
    seq_len = position_ids.shape[-1]
    steps = torch.arange(seq_len, device=position_ids.device)  # [T]
    starts = torch.diff(position_ids, dim=-1, prepend=position_ids[..., :1] - 1) != 1  # [B, T]
    starts[..., 0] = position_ids[..., 0] == 0
    last_start = torch.cummax(torch.where(starts, steps, -kernel_size), dim=-1).values  # [B, T]
    back = torch.arange(kernel_size - 1, -1, -1, device=position_ids.device)  # [K]: K-1 ... 0 steps back
    return ((steps - last_start)[..., None] >= back).to(dtype)


class RatTemporalConv(nn.Module):
    """Causal depthwise convolution over time, GELU, pointwise projection, GELU (the seed's block, made causal).

    The seed's `padding=1` centred the kernel and let each position read the next token. Here the input is padded on
    the left only; padded positions (attention_mask == 0) are zeroed first so a left-padded row sees exactly the zeros
    an unpadded one sees, and packed documents (positions restarting at 0) never read each other. With a cache, the
    last `kernel - 1` inputs are the layer's conv state (kept channels-first, `[B, D, K-1]`, the layout transformers'
    cache layers use).
    """

    def __init__(self, config: RatConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.kernel_size = config.conv_kernel_size
        self.conv_weight = nn.Parameter(torch.empty(config.hidden_size, self.kernel_size))  # depthwise: [D, K]
        self.conv_bias = nn.Parameter(torch.zeros(config.hidden_size)) if config.conv_bias else None
        self.pointwise_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(
        self,
        hidden_states: torch.Tensor,
        padding_mask: torch.Tensor | None,
        cache: Cache | None = None,
        tap_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        context = self.kernel_size - 1
        if padding_mask is not None:
            hidden_states = hidden_states * padding_mask[..., None].to(hidden_states.dtype)
        if cache is not None and cache.has_previous_state(self.layer_idx):
            # decoding: the cache returns [state | new inputs] along time; the state is K-1 steps, or the whole past
            # while assisted decoding records it for `crop`
            x = cache.update_conv_state(hidden_states.transpose(1, 2), self.layer_idx, conv_kernel_size=context)
            x = x.transpose(1, 2)[:, -(context + hidden_states.shape[1]) :]  # [B, <=K-1+T, D]
            x = F.pad(x, (0, 0, context + hidden_states.shape[1] - x.shape[1], 0))  # [B, K-1+T, D]
        else:
            if cache is not None:  # prefill: remember the last K-1 inputs
                cache.update_conv_state(hidden_states.transpose(1, 2), self.layer_idx, conv_kernel_size=context)
            x = F.pad(hidden_states, (0, 0, context, 0))  # [B, K-1+T, D], causal: left only
        x = F.gelu(causal_depthwise_conv(x, self.conv_weight, self.conv_bias, tap_mask))  # [B, T, D]
        return F.gelu(self.pointwise_proj(x))


class RatDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: RatConfig, layer_idx: int):
        super().__init__()
        self.self_attn = RatAttention(config, layer_idx)
        self.temporal_conv = RatTemporalConv(config, layer_idx)
        self.mlp = RatMLP(config)
        self.input_layernorm = RatRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.conv_layernorm = RatRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RatRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        tap_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: Cache | None = None,
        sample_policies: bool = False,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Returns `(hidden_states [B, T, D], selector_probs [B, T, P] | None, sampled_log_prob [B, T] | None)`.

        A flat tuple of tensors, not a dataclass: reentrant gradient checkpointing tracks only tensors returned at the
        top level, and the sampled log-prob must keep its graph for the REINFORCE loss.
        """
        attn_out, _, gate = self.self_attn(
            self.input_layernorm(hidden_states), position_embeddings, attention_mask, cache=cache,
            sample_policies=sample_policies, **kwargs,
        )
        hidden_states = hidden_states + self.dropout(attn_out)
        conv_out = self.temporal_conv(self.conv_layernorm(hidden_states), padding_mask, cache, tap_mask)
        hidden_states = hidden_states + self.dropout(conv_out)
        hidden_states = hidden_states + self.dropout(self.mlp(self.post_attention_layernorm(hidden_states)))
        return hidden_states, gate.selector_probs, gate.sampled_log_prob


class RatPreTrainedModel(PreTrainedModel):
    config_class = RatConfig
    config: RatConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["RatDecoderLayer"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False  # the hybrid (KV + conv) cache layer is dynamic; static caches compile
    _can_record_outputs = {"hidden_states": RatDecoderLayer, "attentions": RatAttention}

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, RatPolicyGate):  # its own parameters; the Linear children are initialised by super()
            init.normal_(module.policy_out_weight, mean=0.0, std=std)
            init.zeros_(module.policy_out_bias)
        elif isinstance(module, RatTemporalConv):
            init.normal_(module.conv_weight, mean=0.0, std=std)
            if module.conv_bias is not None:
                init.zeros_(module.conv_bias)

    def post_init(self):
        super().post_init()
        if self.config.use_gradient_checkpointing:
            # renamed `activation_checkpointing_enable` in transformers 5.2x; 5.17 only has the old name
            getattr(self, "activation_checkpointing_enable", self.gradient_checkpointing_enable)()


@dataclass
class RatModelOutputWithPast(BaseModelOutputWithPast):
    """`BaseModelOutputWithPast` plus what the gates did in every layer.

    selector_probs: per layer, the selector's distribution over policies `[B, T, P]` (None with one policy).
    sampled_log_probs: `[B, T]`, the summed log-probs over layers of the sampled policies (reinforce training only).
    """

    selector_probs: tuple[torch.Tensor, ...] | None = None
    sampled_log_probs: torch.Tensor | None = None


@dataclass
class RatCausalLMOutputWithPast(CausalLMOutputWithPast):
    """`CausalLMOutputWithPast` plus the two parts of the loss and the gating statistics.

    loss = lm_loss + policy_loss_coef * policy_loss (policy_loss only in reinforce training).
    gate_entropy: `[L]` mean selector entropy per layer (nats) over labelled tokens; policy_usage: `[L, P]` mean
    selector probability of each policy. Both detached, computed when labels are given and n_policies > 1.
    """

    lm_loss: torch.Tensor | None = None
    policy_loss: torch.Tensor | None = None
    gate_entropy: torch.Tensor | None = None
    policy_usage: torch.Tensor | None = None


class RatModel(RatPreTrainedModel):
    def __init__(self, config: RatConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([RatDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = RatRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = RatRotaryEmbedding(config) if config.use_rope else None
        # reinforce mode samples one gating policy per token while training, for the causal LM's REINFORCE loss;
        # heads without that loss (the sequence classifier) turn it off and gate by the selector's expectation
        self.samples_policies_in_training = config.gating_mode == "reinforce"
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

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
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> RatModelOutputWithPast:
        cache = _resolve_cache(cache, past_key_values)
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("RatModel.forward: pass exactly one of `input_ids` or `inputs_embeds`")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)  # [B, T, D]
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
        sample_policies = self.training and self.samples_policies_in_training

        seq_len = inputs_embeds.shape[1]
        # Positions given by the caller may restart inside a row (packed documents): the convolution restarts there.
        tap_mask = None
        if position_ids is not None and seq_len > 1:
            tap_mask = document_tap_mask(position_ids, self.config.conv_kernel_size, inputs_embeds.dtype)
        if position_ids is None:
            past_seen_tokens = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(seq_len, device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)  # [1, T]

        if isinstance(attention_mask, dict):  # prepared by generate() for a compilable (static) cache
            causal_mask, padding_mask = attention_mask["full_attention"], attention_mask["linear_attention"]
        else:
            mask_kwargs = {"config": self.config, "inputs_embeds": inputs_embeds, "attention_mask": attention_mask,
                           _MASK_CACHE_ARG: mask_cache, "position_ids": position_ids}
            causal_mask = create_causal_mask(**mask_kwargs)
            # 2D padding mask of the new tokens for the convolution (None when nothing is padded)
            padding_mask = create_recurrent_attention_mask(**mask_kwargs)
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids) if self.rotary_emb is not None else None

        hidden_states = inputs_embeds
        selector_probs, sampled_log_probs = [], None
        for layer in self.layers:
            hidden_states, probs, log_prob = layer(
                hidden_states, attention_mask=causal_mask, padding_mask=padding_mask, tap_mask=tap_mask,
                position_embeddings=position_embeddings, cache=cache, sample_policies=sample_policies, **kwargs,
            )
            if probs is not None:
                selector_probs.append(probs)
            if log_prob is not None:
                sampled_log_probs = log_prob if sampled_log_probs is None else sampled_log_probs + log_prob

        return RatModelOutputWithPast(
            last_hidden_state=self.norm(hidden_states),
            selector_probs=tuple(selector_probs) or None,
            sampled_log_probs=sampled_log_probs,
            **{_OUTPUT_CACHE_FIELD: cache},
        )


class RatForCausalLM(RatPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: RatConfig):
        super().__init__(config)
        self.model = RatModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
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
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> RatCausalLMOutputWithPast:
        outputs: RatModelOutputWithPast = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            cache=_resolve_cache(cache, past_key_values), inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])  # [B, T', V]

        loss = lm_loss = policy_loss = gate_entropy = policy_usage = None
        if labels is not None:
            shift_labels = F.pad(labels, (0, 1), value=-100)[:, 1:]  # [B, T]: token t predicts t+1
            valid = shift_labels != -100  # the tokens the LM loss counts (as the standard loss: labels alone)
            if outputs.sampled_log_probs is not None:
                lm_loss, policy_loss = self._reinforce_losses(logits, shift_labels, valid, outputs, **kwargs)
                loss = lm_loss + self.config.policy_loss_coef * policy_loss
            else:
                lm_loss = loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
            if outputs.selector_probs is not None:
                gate_entropy, policy_usage = _gate_statistics(outputs.selector_probs, valid)

        return RatCausalLMOutputWithPast(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions,
            lm_loss=lm_loss, policy_loss=policy_loss, gate_entropy=gate_entropy, policy_usage=policy_usage,
            **{_OUTPUT_CACHE_FIELD: getattr(outputs, _OUTPUT_CACHE_FIELD)},
        )

    def _reinforce_losses(self, logits, shift_labels, valid, outputs, num_items_in_batch=None, **kwargs):
        """LM loss (same value as the standard one) and the REINFORCE loss of the selectors.

        Reward of a token = minus its own LM loss (detached); baseline = the batch mean over labelled tokens; the
        log-prob is the sum over layers of the sampled policies' log-probs; an entropy bonus keeps the selectors from
        collapsing early.
        """
        token_loss = F.cross_entropy(
            logits.float().flatten(0, 1), shift_labels.flatten(), ignore_index=-100, reduction="none"
        ).view_as(shift_labels)  # [B, T]
        n_valid = valid.sum().clamp(min=1)
        denom = num_items_in_batch if num_items_in_batch is not None else n_valid
        if torch.is_tensor(denom):
            denom = denom.to(token_loss.device)
        lm_loss = (token_loss * valid).sum() / denom
        reward = -token_loss.detach()
        baseline = (reward * valid).sum() / n_valid
        advantage = (reward - baseline) * valid  # [B, T]
        # normalised like the LM loss (by `num_items_in_batch` under gradient accumulation / several processes), so
        # the coefficients mean the same whatever the accumulation steps and world size
        reinforce = -(advantage * outputs.sampled_log_probs).sum() / denom
        entropy = torch.stack([-(p * p.clamp_min(1e-12).log()).sum(-1) for p in outputs.selector_probs])  # [L, B, T]
        entropy = (entropy * valid).sum() / (denom * len(outputs.selector_probs))
        return lm_loss, reinforce - self.config.entropy_coef * entropy


@torch.no_grad()
def _gate_statistics(selector_probs: tuple[torch.Tensor, ...], valid: torch.Tensor):
    """Per-layer mean selector entropy `[L]` and mean policy probabilities `[L, P]` over the labelled tokens."""
    probs = torch.stack(selector_probs).float()  # [L, B, T, P]
    weight = valid.to(probs.dtype)[None, ..., None]  # [1, B, T, 1]
    n = weight.sum().clamp(min=1)
    entropy = (-(probs * probs.clamp_min(1e-12).log()) * weight).sum(dim=(1, 2, 3)) / n  # [L]
    usage = (probs * weight).sum(dim=(1, 2)) / n  # [L, P]
    return entropy, usage


class RatForSequenceClassification(GenericForSequenceClassification, RatPreTrainedModel):
    """A `.score` head over `RatModel` (reward and value models for RL).

    A classifier has no per-token reward to train sampled gating decisions with, so a reinforce-mode model gates by
    the selector's expectation here in training as in eval: the selectors then learn from the classification loss's
    gradient (as in soft mode) instead of adding sampling noise with no policy loss.
    """

    def __init__(self, config: RatConfig):
        RatPreTrainedModel.__init__(self, config)
        self.num_labels = config.num_labels
        self.model = RatModel(config)  # built directly so remote-code loading needs no AutoModel lookup
        self.model.samples_policies_in_training = False
        self.score = nn.Linear(config.hidden_size, self.num_labels, bias=False)
        self.post_init()


__all__ = ["RatPreTrainedModel", "RatModel", "RatForCausalLM", "RatForSequenceClassification"]
