"""RAT (Reinforced Adaptive Transformer) as a transformers model.

A block is pre-norm, three residual branches:

    x = x + o_proj(gates * attention(norm(x)))          # per-token, per-head gates from n_policies policy nets
    x = x + gelu(pointwise(gelu(causal_dwconv(norm(x)))))   # temporal convolution, left padding only
    x = x + down_proj(silu(gate_proj(norm(x))) * up_proj(norm(x)))

The gates of a token come from that token's hidden state alone, so the model is causal (the seed used the mean over the
whole sequence). Gates scale each head's attention *output* (`head_gate_target="output"`) or each head's *query*
(`"query"`: a per-token, per-head temperature on the scores, the seed's form); either way any attention backend (eager,
sdpa, flash, flex) runs unchanged. `gates_off=True` in `forward` runs the model with every gate at 1 (the ablation
`RatTrainer` evaluates).

`gating_mode="reinforce"` samples one policy per token and layer while training and trains the selectors by REINFORCE
(`gate_reinforce_loss`): the gate of token t is rewarded with the reward-to-go, minus the (discounted) sum of the
losses of tokens t, t+1, ... of its document, against a leave-one-out baseline; in eval it uses the selector's
expectation. `RatForCausalLM.forward` adds that loss when given `labels`. A forward that bypasses it (TRL's fused LM
head calls `model.model` + `lm_head`) hands its sampled log-probs to the innermost `collect_gate_samples()` context
instead, where trainers that know their per-token losses pick them up (`rat_hf.trainers.reinforced_gating`); with no
such context, a training forward with gradients warns once that the selectors learn nothing from it.

`use_temporal_conv=False` and `gating_mode="none"` remove the conv branch and the gates (the ablation's models).

Speed without changing the checkpoint layout: projections reading the same input (q/k/v with the gate nets' first
layers; the MLP's gate/up) run as one GEMM when they are plain `nn.Linear`s (`fused_linears`; an adapter or hook
makes each run its own forward), and the conv branch trains under selective activation checkpointing (only its GEMM
output is saved). The forward compiles as one graph (`_can_compile_fullgraph`), with a static cache too.

The KV cache and the convolution state live in one `DynamicCache` with `"hybrid"` layers, so `generate()` works with
every decoding strategy. This file imports only torch, transformers and its configuration: it ships to the Hub as
remote code.
"""

import contextlib
import contextvars
import functools
import inspect
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

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


def _is_plain_linear(module: nn.Module) -> bool:
    """A bare `nn.Linear` whose `forward` is exactly `F.linear(x, weight, bias)`: not a PEFT/LoRA or quantised
    subclass, no forward hooks (DeepSpeed ZeRO-3 gathers parameters in one), no replaced `forward` (accelerate's
    offload), no parametrization, no sharded (DTensor) weight."""
    return (type(module) is nn.Linear and not module._forward_hooks and not module._forward_pre_hooks
            and "forward" not in module.__dict__ and type(module.weight) is nn.Parameter)


def fused_linears(x: torch.Tensor, linears: tuple[nn.Linear, ...]) -> list[torch.Tensor]:
    """`[m(x) for m in linears]`, as ONE GEMM over the concatenated weights when every module is a plain `nn.Linear`.

    Projections that read the same input (q/k/v and the gate nets' first layers; the MLP's gate/up) then cost one
    launch instead of several when decoding, and in training one input-gradient GEMM instead of several GEMMs plus
    the adds that sum them. The parameters stay separate modules with Llama's names, so checkpoints, PEFT's
    `target_modules` and tensor-parallel plans see the usual layout; any wrapped or hooked module (a LoRA adapter, a
    quantised layer, a ZeRO-3 or offload hook) makes every module run its own forward instead, so nothing is bypassed.
    """
    if len(linears) < 2 or not all(_is_plain_linear(m) for m in linears):
        return [m(x) for m in linears]
    weight = torch.cat([m.weight for m in linears])  # [sum(out), in]
    bias = None
    if any(m.bias is not None for m in linears):
        # one bias with zeros for the unbiased parts, so the bias add stays the GEMM's epilogue (the H200 run with the
        # bias added to the gate nets' slices afterwards trained compiled at 0.65x Llama instead of 0.78x; that run
        # also changed eager checkpointing, so the cause is likely but not isolated)
        bias = torch.cat([m.bias if m.bias is not None else m.weight.new_zeros(m.out_features) for m in linears])
    return list(F.linear(x, weight, bias).split([m.out_features for m in linears], dim=-1))


class RatMLP(nn.Module):
    """SwiGLU feed-forward (Llama's, with gate_proj and up_proj run as one GEMM by `fused_linears`)."""

    def __init__(self, config: RatConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = fused_linears(x, (self.gate_proj, self.up_proj))  # [B, T, I] each
        return self.down_proj(self.act_fn(gate) * up)


@dataclass
class RatGateOutput:
    """What one layer's gating decided, for the REINFORCE loss and the gating statistics."""

    selector_probs: torch.Tensor | None  # [B, T, P] selector distribution over policies (None with one policy)
    sampled_log_prob: torch.Tensor | None  # [B, T] log-prob of the sampled policy (reinforce mode, training only)
    gates: torch.Tensor | None = None  # [B, T, H] the gates applied, detached (None with the gates off)
    policy_gates: torch.Tensor | None = None  # [B, T, P, H] every policy's proposal, detached (None with one policy)


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """Softmaxes and losses in float32 under half precision; a float64 model (exactness tests) stays in float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


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

    def draw_policies(self, probs: torch.Tensor) -> torch.Tensor:
        """One policy index per row of the selector's `probs` `[N, P]` -> `[N, 1]` (its own method so that a test can
        enumerate every choice)."""
        return torch.multinomial(probs, 1)

    def input_projections(self, sample: bool) -> tuple[nn.Linear, ...]:
        """The Linears that read the block's normed hidden state as it is, so that attention runs them with q/k/v as
        one GEMM. The reinforce selector reads a detached copy while sampling (below), so it is left out then."""
        if self.n_policies == 1 or (self.reinforce and sample):
            return (self.policy_in,)
        return (self.policy_in, self.selector_in)

    def forward(
        self, hidden_states: torch.Tensor, sample: bool = False, projected: list[torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, RatGateOutput]:
        """Gates `[B, T, H]`; `sample=True` (reinforce training) draws one policy per token instead of the expectation.

        `projected`: the outputs of `input_projections(sample)` on `hidden_states` when the caller computed them.
        """
        batch, seq_len, _ = hidden_states.shape
        if projected is None:
            projected = [m(hidden_states) for m in self.input_projections(sample)]
        h = F.gelu(projected[0])  # [B, T, P*p]
        logits = h @ torch.block_diag(*self.policy_out_weight) + self.policy_out_bias.flatten()  # [B, T, P*H]
        logits = logits.view(batch, seq_len, self.n_policies, self.num_heads)  # [B, T, P, H]
        gates = torch.softmax(_at_least_float32(logits), dim=-1) * self.num_heads  # [B, T, P, H], mean over heads = 1
        if self.n_policies == 1:
            single = gates[:, :, 0].to(hidden_states.dtype)
            return single, RatGateOutput(None, None, single.detach(), None)

        # In reinforce mode the selector learns from the REINFORCE loss alone, so it reads a detached hidden state:
        # its loss then moves only the selector (in eval the values are the same either way).
        selector_pre = self.selector_in(hidden_states.detach()) if len(projected) == 1 else projected[1]  # [B, T, p]
        selector_logits = _at_least_float32(self.selector_out(F.gelu(selector_pre)))  # [B, T, P]
        probs = torch.softmax(selector_logits, dim=-1)
        if self.reinforce and sample:
            choice = self.draw_policies(probs.reshape(-1, self.n_policies)).view(batch, seq_len, 1)  # [B, T, 1]
            mixed = gates.gather(2, choice[..., None].expand(-1, -1, -1, self.num_heads)).squeeze(2)  # [B, T, H]
            log_prob = torch.log_softmax(selector_logits, dim=-1).gather(-1, choice).squeeze(-1)  # [B, T]
            mixed = mixed.to(hidden_states.dtype)
            return mixed, RatGateOutput(probs, log_prob, mixed.detach(), gates.detach())
        mixed = (probs[..., None] * gates).sum(dim=2).to(hidden_states.dtype)  # [B, T, H]; elementwise, not a GEMM
        return mixed, RatGateOutput(probs, None, mixed.detach(), gates.detach())


class RatAttention(nn.Module):
    """Multi-head (or grouped-query) attention whose per-head outputs (or queries) are scaled by the policy gates."""

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
        self.gate = RatPolicyGate(config) if config.gating_mode != "none" else None
        # "query": gate g scales head h's query at token t, so its scores become g * q.k / sqrt(d) (a temperature)
        self.gate_queries = config.head_gate_target == "query"

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        sample_policies: bool = False,
        gates_off: bool = False,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None, RatGateOutput]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        gated = self.gate is not None and not gates_off  # gates_off: every gate at 1, plain attention
        gate_inputs = self.gate.input_projections(sample_policies) if gated else ()
        query, key, value, *gate_projected = fused_linears(
            hidden_states, (self.q_proj, self.k_proj, self.v_proj, *gate_inputs))  # one GEMM when plain Linears
        if gated:
            gates, gate_output = self.gate(hidden_states, sample=sample_policies, projected=gate_projected)  # [B, T, H]
        else:
            gates, gate_output = None, RatGateOutput(None, None)
        query_states = query.view(hidden_shape).transpose(1, 2)  # [B, H, T, hd]
        if gates is not None and self.gate_queries:
            query_states = query_states * gates.transpose(1, 2)[..., None]  # [B, H, T, 1]: commutes with RoPE
        key_states = key.view(hidden_shape).transpose(1, 2)  # [B, Hkv, T, hd]
        value_states = value.view(hidden_shape).transpose(1, 2)
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
        if gates is not None and not self.gate_queries:
            attn_output = attn_output * gates[..., None]
        return self.o_proj(attn_output.reshape(*input_shape, -1)), attn_weights, gate_output  # o_proj of [B, T, H*hd]


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


# The conv branch (norm -> depthwise conv -> GELU -> pointwise -> GELU) saved ~6 [B, T, D] activations per layer for
# backward when run plainly: RAT's peak training memory was 1.20x Llama's. Compiled, it runs under selective
# activation checkpointing: only the pointwise GEMM's output is kept, the norm, convolution and GELU (elementwise) are
# recomputed in backward. In eager mode the selective policy is a Python dispatch mode called for every op, which
# cost ~10% of an eager step on an H200 (host-bound at 110M parameters); eager runs a plain checkpoint instead (keeps
# only the branch's input, recomputes the branch with its one GEMM).
_CONV_BRANCH_SAVES = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}
_CHECKPOINT_CONV_BRANCH = True  # False runs the branch plainly (the tests compare both)


def _save_only_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _CONV_BRANCH_SAVES else CheckpointPolicy.PREFER_RECOMPUTE


class RatDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: RatConfig, layer_idx: int):
        super().__init__()
        self.self_attn = RatAttention(config, layer_idx)
        self.temporal_conv = RatTemporalConv(config, layer_idx) if config.use_temporal_conv else None
        self.mlp = RatMLP(config)
        self.input_layernorm = RatRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.conv_layernorm = (RatRMSNorm(config.hidden_size, eps=config.rms_norm_eps) if config.use_temporal_conv
                               else None)
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
        gates_off: bool = False,
        **kwargs,
    ) -> tuple[torch.Tensor, ...]:
        """Returns `(hidden_states [B, T, D], selector_probs [B, T, P] | None, sampled_log_prob [B, T] | None,
        gates [B, T, H] | None, policy_gates [B, T, P, H] | None)` (the last two detached, for statistics).

        A flat tuple of tensors, not a dataclass: reentrant gradient checkpointing tracks only tensors returned at the
        top level, and the sampled log-prob must keep its graph for the REINFORCE loss.
        """
        attn_out, _, gate = self.self_attn(
            self.input_layernorm(hidden_states), position_embeddings, attention_mask, cache=cache,
            sample_policies=sample_policies, gates_off=gates_off, **kwargs,
        )
        # dropout is the identity in eval: not called there (decoding launches every op of every layer per token)
        hidden_states = hidden_states + (self.dropout(attn_out) if self.training else attn_out)
        if self.temporal_conv is not None:
            conv_out = self._conv_branch(hidden_states, padding_mask, cache, tap_mask)
            hidden_states = hidden_states + (self.dropout(conv_out) if self.training else conv_out)
        mlp_out = self.mlp(self.post_attention_layernorm(hidden_states))
        hidden_states = hidden_states + (self.dropout(mlp_out) if self.training else mlp_out)
        return hidden_states, gate.selector_probs, gate.sampled_log_prob, gate.gates, gate.policy_gates


    def _conv_branch(self, hidden_states, padding_mask, cache, tap_mask) -> torch.Tensor:
        """norm -> temporal conv `[B, T, D]`; while training with gradients (no cache, and the layer not checkpointed
        as a whole already) under activation checkpointing (selective when compiled): exact, ~6 activations fewer."""
        def branch(h, padding_mask, tap_mask):
            return self.temporal_conv(self.conv_layernorm(h), padding_mask, None, tap_mask)

        if (_CHECKPOINT_CONV_BRANCH and self.training and torch.is_grad_enabled() and cache is None
                and not self.gradient_checkpointing):
            if not torch.compiler.is_compiling():
                return checkpoint(branch, hidden_states, padding_mask, tap_mask, use_reentrant=False)
            return checkpoint(branch, hidden_states, padding_mask, tap_mask, use_reentrant=False,
                              context_fn=functools.partial(create_selective_checkpoint_contexts, _save_only_matmuls))
        return self.temporal_conv(self.conv_layernorm(hidden_states), padding_mask, cache, tap_mask)


# ---- REINFORCE for the sampled gates -------------------------------------------------------------------------------
@dataclass
class RatGateSamples:
    """The gating decisions one reinforce-mode `RatModel` forward sampled, for whoever trains the selectors.

    log_probs: `[B, T]` log-prob of each token's sampled policies, summed over layers (with graph to the selectors).
    selector_probs: per layer `[B, T, P]` (with graph); `entropy` is their entropy summed over layers `[B, T]`.
    position_ids / attention_mask: as the caller passed them (None when not given): packed documents and padding.
    """

    log_probs: torch.Tensor
    selector_probs: tuple[torch.Tensor, ...]
    position_ids: torch.Tensor | None
    attention_mask: torch.Tensor | None

    @property
    def entropy(self) -> torch.Tensor:
        return _joint_entropy(self.selector_probs)


_GATE_SAMPLES: contextvars.ContextVar = contextvars.ContextVar("rat_gate_samples", default=None)


@contextlib.contextmanager
def collect_gate_samples() -> Iterator[list]:
    """Collect the `RatGateSamples` of every reinforce-mode `RatModel` forward run (with gradients) inside, in order.

    For code whose loss bypasses `RatForCausalLM.forward` (TRL's fused LM head calls `model.model` + `lm_head`): run
    the forward inside, then add `gate_reinforce_loss(samples.log_probs, token_losses, mask)` to the loss. The
    innermost context collects (`RatForCausalLM.forward` opens its own when given `labels`, and trains them itself).
    """
    samples: list = []
    token = _GATE_SAMPLES.set(samples)
    try:
        yield samples
    finally:
        _GATE_SAMPLES.reset(token)


@torch.compiler.disable
def _hand_over_gate_samples(samples: RatGateSamples) -> None:
    collector = _GATE_SAMPLES.get()
    if collector is not None:
        collector.append(samples)
        return
    warnings.warn(
        "RAT gating_mode='reinforce': this training forward sampled gating policies, but its caller does not train "
        "them, so the gate selectors learn nothing from it. RatForCausalLM.forward trains them when given `labels` "
        "(transformers Trainer, RatTrainer); TRL's SFTTrainer/DPOTrainer/GRPOTrainer call model.model + lm_head "
        "instead: use RatSFTTrainer / RatDPOTrainer / RatGRPOTrainer from rat_hf.trainers.reinforced_gating; a custom "
        "loop runs its forward inside collect_gate_samples() and adds gate_reinforce_loss(...) to its loss (both in "
        "the same module).",
        UserWarning, stacklevel=2,
    )


def _joint_entropy(selector_probs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """`[B, T]`: entropy of a token's whole gating decision (one policy per layer, drawn independently given the
    hidden states) = the sum over layers of the selectors' entropies, as its log-prob is the sum of theirs."""
    probs = torch.stack(selector_probs)  # [L, B, T, P]
    return -(probs * probs.clamp_min(1e-12).log()).sum(dim=(0, -1))


def gate_reinforce_loss(
    gate_log_probs: torch.Tensor,
    token_losses: torch.Tensor,
    mask: torch.Tensor,
    discount: float = 1.0,
    position_ids: torch.Tensor | None = None,
    gate_entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    entropy_normalizer: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """REINFORCE loss of sampled gates: its gradient is an unbiased estimate of the gradient of the expected loss.

    gate_log_probs `[B, T]`: log-prob of the gates sampled at each position (summed over layers), with graph.
    token_losses `[B, T]`: the loss carried by the token predicted at each position (position t predicts token t+1),
        weighted as in the loss being minimised (e.g. NLL / number of labelled tokens; a per-token PPO/GRPO loss);
        0 where no loss is counted. Detached here.
    mask `[B, T]`: 1 at real tokens (their gates are trained, their losses count), 0 at padding.
    discount: weight `discount**(t'-t)` of a later token's loss in the reward of the gate at t (1.0 = exact).
    position_ids `[B or 1, T]`: for packed rows (positions restarting at 0, by `create_causal_mask`'s rule): rewards
        never cross a document boundary, and the baseline compares documents by position inside the document.
    gate_entropy `[B, T]` (with graph) and `entropy_coef`: an entropy bonus, `entropy_coef * sum(mask * entropy) /
        entropy_normalizer` (default: the number of real tokens) subtracted from the loss.

    The gate sampled at t changes the loss of t and of every later token of its document, so its reward is the
    reward-to-go `R_t = -sum_{t' >= t} discount**(t'-t) token_losses[t']`. The baseline of a document at position p is
    the mean `R` of the *other* documents of the batch at p (leave-one-out: it does not depend on this document's
    gates, so it leaves the estimate unbiased; 0 where no other document reaches p). Returns
    `-sum(mask * (R - baseline) * gate_log_probs) - entropy bonus`, a scalar.
    """
    if gate_log_probs.shape != token_losses.shape or mask.shape != token_losses.shape:
        raise ValueError(f"gate_reinforce_loss: gate_log_probs {tuple(gate_log_probs.shape)}, token_losses "
                         f"{tuple(token_losses.shape)} and mask {tuple(mask.shape)} must have the same [B, T] shape")
    if not 0.0 < discount <= 1.0:
        raise ValueError(f"gate_reinforce_loss: discount={discount!r} must be in (0, 1]")
    batch, seq_len = token_losses.shape
    real = mask.bool()
    dtype = torch.promote_types(token_losses.dtype, torch.float32)
    rewards = -(token_losses.detach().to(dtype) * real)
    if position_ids is None:
        starts = torch.zeros_like(real)
        keys = torch.arange(seq_len, device=real.device).expand(batch, seq_len)
    else:
        position_ids = position_ids.to(real.device).expand(batch, seq_len)
        starts = torch.diff(position_ids, dim=-1, prepend=position_ids[:, :1] - 1) != 1  # document starts
        keys = position_ids.clamp(0, seq_len - 1)  # a document's position; any grouping keeps the baseline unbiased
    starts[:, 0] = True
    returns = _reward_to_go(rewards, starts, discount)  # [B, T]
    advantage = (returns - _leave_one_out_baseline(returns, keys, real)) * real
    loss = -(advantage.detach() * gate_log_probs).sum()
    if gate_entropy is not None and entropy_coef:
        normalizer = real.sum().clamp(min=1) if entropy_normalizer is None else entropy_normalizer
        loss = loss - entropy_coef * (gate_entropy * real).sum() / normalizer
    return loss


def _reward_to_go(rewards: torch.Tensor, starts: torch.Tensor, discount: float, chunk: int = 64) -> torch.Tensor:
    """`R[b, t] = sum_{t' >= t in t's document} discount**(t'-t) * rewards[b, t']`, documents beginning at `starts`.

    Exact for any discount: within a chunk of `chunk` steps a masked `[chunk, chunk]` decay matrix, across chunks the
    recurrence `R_t += discount**(distance) * R_(first step of the next chunk)` when that step is in t's document
    (T/chunk sequential steps, memory B * chunk**2).
    """
    batch, seq_len = rewards.shape
    document = starts.long().cumsum(-1)  # [B, T] document index along each row
    steps = torch.arange(chunk, device=rewards.device)
    lag = steps[None, :] - steps[:, None]  # [C, C]: t' - t
    gamma = rewards.new_tensor(discount)
    decay = torch.where(lag >= 0, gamma ** lag.clamp(min=0).to(rewards.dtype), 0.0)  # [C, C]
    returns = torch.empty_like(rewards)
    carry = rewards.new_zeros(batch)  # R at the first step of the chunk after this one
    carry_document = torch.full((batch,), -1, dtype=document.dtype, device=rewards.device)
    for end in range(seq_len, 0, -chunk):
        begin = max(0, end - chunk)
        n = end - begin
        doc = document[:, begin:end]  # [B, n]
        same = doc[:, :, None] == doc[:, None, :]  # [B, n, n]
        local = torch.einsum("btu,bu->bt", decay[:n, :n] * same, rewards[:, begin:end])  # [B, n]
        to_next = gamma ** (n - steps[:n]).to(rewards.dtype)  # discount**(distance to the next chunk's start)
        local = local + (doc == carry_document[:, None]) * to_next * carry[:, None]
        returns[:, begin:end] = local
        carry, carry_document = local[:, 0], doc[:, 0]
    return returns


def _leave_one_out_baseline(returns: torch.Tensor, keys: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """`[B, T]`: the mean of `returns` over the other real entries with the same key (0 where there is none)."""
    seq_len = returns.shape[1]
    weight = real.to(returns.dtype)
    flat_keys = keys.reshape(-1)
    sums = returns.new_zeros(seq_len).index_add_(0, flat_keys, (returns * weight).reshape(-1))
    counts = returns.new_zeros(seq_len).index_add_(0, flat_keys, weight.reshape(-1))
    others = counts[keys] - weight  # [B, T]
    return torch.where(others > 0, (sums[keys] - returns * weight) / others.clamp(min=1), 0.0)


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
    # one graph with a static cache (generate's compiled path) and in training; a reinforce-mode training forward
    # breaks it once, where it hands its sampled gates to the trainer (`collect_gate_samples`)
    _can_compile_fullgraph = True
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
    gates: per layer, the gates applied `[B, T, H]` (detached; None with `gates_off=True`).
    policy_gates: per layer, every policy's proposed gates `[B, T, P, H]` (detached; None with one policy).
    """

    selector_probs: tuple[torch.Tensor, ...] | None = None
    sampled_log_probs: torch.Tensor | None = None
    gates: tuple[torch.Tensor, ...] | None = None
    policy_gates: tuple[torch.Tensor, ...] | None = None


@dataclass
class RatCausalLMOutputWithPast(CausalLMOutputWithPast):
    """`CausalLMOutputWithPast` plus the two parts of the loss and the gating statistics.

    loss = lm_loss + policy_loss_coef * policy_loss (policy_loss only in reinforce training).
    Gating statistics per layer over the labelled tokens, detached, computed when labels are given:
    gate_entropy `[L]`: mean selector entropy (nats); policy_usage `[L, P]`: mean selector probability of each policy
    (both n_policies > 1); gate_deviation `[L]`: mean |g - 1| of the gates applied (0 = every head at identity);
    policy_disagreement `[L]`: mean total-variation distance between two policies' head distributions (gates / H),
    averaged over the policy pairs (0 = all policies propose the same gates, 1 = disjoint heads; n_policies > 1).
    """

    lm_loss: torch.Tensor | None = None
    policy_loss: torch.Tensor | None = None
    gate_entropy: torch.Tensor | None = None
    policy_usage: torch.Tensor | None = None
    gate_deviation: torch.Tensor | None = None
    policy_disagreement: torch.Tensor | None = None


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
        gates_off: bool = False,
        **kwargs,
    ) -> RatModelOutputWithPast:
        """`gates_off=True` runs every layer with all gates at 1 (no policy nets, no sampling)."""
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
        # no cache of our own in a training forward with gradients: nobody decodes from it, and the conv branch's
        # activation checkpointing (RatDecoderLayer._conv_branch) needs none
        if use_cache and cache is None and not (self.training and torch.is_grad_enabled()):
            cache = DynamicCache(config=self.config)
        sample_policies = self.training and self.samples_policies_in_training and not gates_off
        given_position_ids, given_attention_mask = position_ids, attention_mask

        seq_len = inputs_embeds.shape[1]
        # Positions given by the caller may restart inside a row (packed documents): the convolution restarts there.
        tap_mask = None
        if position_ids is not None and seq_len > 1 and self.config.use_temporal_conv:
            tap_mask = document_tap_mask(position_ids, self.config.conv_kernel_size, inputs_embeds.dtype)
        if position_ids is None:
            past_seen_tokens = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(seq_len, device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)  # [1, T]

        if isinstance(attention_mask, dict):  # prepared by generate() for a compilable (static) cache
            causal_mask, padding_mask = attention_mask["full_attention"], attention_mask.get("linear_attention")
        else:
            mask_kwargs = {"config": self.config, "inputs_embeds": inputs_embeds, "attention_mask": attention_mask,
                           _MASK_CACHE_ARG: mask_cache, "position_ids": position_ids}
            causal_mask = create_causal_mask(**mask_kwargs)
            # 2D padding mask of the new tokens for the convolution (None when nothing is padded)
            padding_mask = create_recurrent_attention_mask(**mask_kwargs)
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids) if self.rotary_emb is not None else None

        hidden_states = inputs_embeds
        selector_probs, gates, policy_gates, sampled_log_probs = [], [], [], None
        for layer in self.layers:
            hidden_states, probs, log_prob, layer_gates, layer_policy_gates = layer(
                hidden_states, attention_mask=causal_mask, padding_mask=padding_mask, tap_mask=tap_mask,
                position_embeddings=position_embeddings, cache=cache, sample_policies=sample_policies,
                gates_off=gates_off, **kwargs,
            )
            for kept, value in ((selector_probs, probs), (gates, layer_gates), (policy_gates, layer_policy_gates)):
                if value is not None:
                    kept.append(value)
            if log_prob is not None:
                sampled_log_probs = log_prob if sampled_log_probs is None else sampled_log_probs + log_prob
        if sampled_log_probs is not None and sampled_log_probs.requires_grad:  # selectors that can learn from it
            _hand_over_gate_samples(RatGateSamples(
                sampled_log_probs, tuple(selector_probs), given_position_ids,
                given_attention_mask if torch.is_tensor(given_attention_mask) and given_attention_mask.dim() == 2
                else None,
            ))

        return RatModelOutputWithPast(
            last_hidden_state=self.norm(hidden_states),
            selector_probs=tuple(selector_probs) or None,
            sampled_log_probs=sampled_log_probs,
            gates=tuple(gates) or None,
            policy_gates=tuple(policy_gates) or None,
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
        # with labels this forward trains the sampled gates itself: their samples go to a context of its own
        trains_gates = labels is not None and self.training and self.model.samples_policies_in_training
        with collect_gate_samples() if trains_gates else contextlib.nullcontext():
            outputs: RatModelOutputWithPast = self.model(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                cache=_resolve_cache(cache, past_key_values), inputs_embeds=inputs_embeds, use_cache=use_cache,
                **kwargs,
            )
        hidden_states = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])  # [B, T', V]

        loss = lm_loss = policy_loss = None
        stats = dict.fromkeys(("gate_entropy", "policy_usage", "gate_deviation", "policy_disagreement"))
        if labels is not None:
            shift_labels = F.pad(labels, (0, 1), value=-100)[:, 1:]  # [B, T]: token t predicts t+1
            valid = shift_labels != -100  # the tokens the LM loss counts (as the standard loss: labels alone)
            if outputs.sampled_log_probs is not None:
                lm_loss, policy_loss = self._reinforce_losses(
                    logits, shift_labels, valid, outputs, attention_mask, position_ids, **kwargs)
                loss = lm_loss + self.config.policy_loss_coef * policy_loss
            else:
                lm_loss = loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
            stats = _gate_statistics(outputs, valid)

        return RatCausalLMOutputWithPast(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions,
            lm_loss=lm_loss, policy_loss=policy_loss, **stats,
            **{_OUTPUT_CACHE_FIELD: getattr(outputs, _OUTPUT_CACHE_FIELD)},
        )

    def _reinforce_losses(self, logits, shift_labels, valid, outputs, attention_mask, position_ids,
                          num_items_in_batch=None, **kwargs):
        """LM loss (same value as the standard one) and the REINFORCE loss of the selectors (`gate_reinforce_loss`).

        A token's loss enters the reward-to-go weighted as in the LM loss (divided by `num_items_in_batch`, or by the
        labelled tokens here), so the coefficients mean the same whatever the accumulation steps and world size. The
        gates of every real token are trained, labelled or not: a prompt token's gate changes the later tokens' loss.
        """
        token_loss = F.cross_entropy(
            _at_least_float32(logits).flatten(0, 1), shift_labels.flatten(), ignore_index=-100, reduction="none"
        ).view_as(shift_labels)  # [B, T]
        n_valid = valid.sum().clamp(min=1)
        denom = num_items_in_batch if num_items_in_batch is not None else n_valid
        if torch.is_tensor(denom):
            denom = denom.to(token_loss.device)
        lm_loss = (token_loss * valid).sum() / denom
        real = attention_mask if torch.is_tensor(attention_mask) and attention_mask.shape == valid.shape else None
        real = torch.ones_like(valid) if real is None else real.bool()
        policy_loss = gate_reinforce_loss(
            outputs.sampled_log_probs, token_loss * valid / denom, real, discount=self.config.policy_discount,
            position_ids=position_ids, gate_entropy=_joint_entropy(outputs.selector_probs),
            entropy_coef=self.config.entropy_coef, entropy_normalizer=real.sum() * denom / n_valid,
        )
        return lm_loss, policy_loss


@torch.no_grad()
def _gate_statistics(outputs: RatModelOutputWithPast, valid: torch.Tensor) -> dict:
    """Per-layer gating statistics over the labelled tokens (see `RatCausalLMOutputWithPast`); None where absent."""
    weight = valid.float()[None]  # [1, B, T]
    n = weight.sum().clamp(min=1)
    stats = dict.fromkeys(("gate_entropy", "policy_usage", "gate_deviation", "policy_disagreement"))
    if outputs.selector_probs is not None:
        probs = torch.stack(outputs.selector_probs).float()  # [L, B, T, P]
        stats["gate_entropy"] = ((-(probs * probs.clamp_min(1e-12).log())).sum(-1) * weight).sum(dim=(1, 2)) / n
        stats["policy_usage"] = (probs * weight[..., None]).sum(dim=(1, 2)) / n  # [L, P]
    if outputs.gates is not None:
        gates = torch.stack(outputs.gates).float()  # [L, B, T, H]
        stats["gate_deviation"] = ((gates - 1).abs().mean(-1) * weight).sum(dim=(1, 2)) / n  # [L]
    if outputs.policy_gates is not None:
        heads = torch.stack(outputs.policy_gates).float()  # [L, B, T, P, H]
        heads = heads / heads.shape[-1]  # each policy's distribution over heads
        n_policies = heads.shape[-2]
        tv = 0.5 * (heads[..., :, None, :] - heads[..., None, :, :]).abs().sum(-1)  # [L, B, T, P, P]
        pairs = tv.sum(dim=(-1, -2)) / (n_policies * (n_policies - 1))  # mean over ordered pairs i != j: [L, B, T]
        stats["policy_disagreement"] = (pairs * weight).sum(dim=(1, 2)) / n
    return stats


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


__all__ = ["RatPreTrainedModel", "RatModel", "RatForCausalLM", "RatForSequenceClassification", "RatGateSamples",
           "collect_gate_samples", "gate_reinforce_loss"]
