"""RAT (Reinforced Adaptive Transformer) configuration.

Transformers naming throughout (`hidden_size`, `num_hidden_layers`, ...). The names of the original `rat-transformer`
package (`d_model`, `n_layers`, `n_heads`, `max_seq_len`, `dropout`, `mlp_ratio`, `tie_weights`, `use_checkpointing`)
are accepted as aliases and build exactly the same model.

The config refuses silent mistakes, naming the field: wrong types (`hidden_size="64"`, `use_rope="no"`), sizes that do
not fit together (`hidden_size` not divisible by `num_attention_heads` when `head_dim` is not given), non-positive or
NaN numbers, and unknown keys (a typo such as `num_hiden_layers`: ValueError with the close match; in a saved config,
recognised by its `transformers_version` key, a warning instead, so a checkpoint carrying extra attributes still
loads). This file ships to the Hub as remote code: it imports only the standard library and transformers.
"""

import dataclasses
import difflib
import functools
import inspect
import math

from transformers import PreTrainedConfig
from transformers.activations import ACT2FN
from transformers.utils import logging

logger = logging.get_logger(__name__)

# The seed's names -> ours. `mlp_ratio` and `dropout` need arithmetic / fan-out and are handled separately.
_SEED_ALIASES = {
    "d_model": "hidden_size",
    "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads",
    "max_seq_len": "max_position_embeddings",
    "tie_weights": "tie_word_embeddings",
    "use_checkpointing": "use_gradient_checkpointing",
}

# The seed's documented sizes (its docs said ~3M, ~85M, ~340M, well under what it built). Parameter counts are the real ones of the model this package builds (tied embeddings,
# SwiGLU of width 4*d, policy nets of width d/8), printed by `RatForCausalLM(RatConfig.from_preset(name)).num_parameters()`.
PRESETS = {
    # 7,124,904 parameters
    "small": dict(vocab_size=10000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, n_policies=2,
                  max_position_embeddings=512),
    # 147,027,540 parameters
    "base": dict(vocab_size=30000, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, n_policies=3,
                 max_position_embeddings=2048),
    # 495,171,168 parameters
    "large": dict(vocab_size=50000, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, n_policies=4,
                  max_position_embeddings=4096),
}


# Keys that `PreTrainedConfig` itself takes (or silently drops) besides its dataclass fields, and what `to_dict()`
# writes.
_BASE_KEYS = {
    "torch_dtype", "dtype", "num_labels", "id2label", "label2id", "problem_type", "name_or_path", "_name_or_path",
    "_commit_hash", "output_attentions", "attn_implementation", "experts_implementation",
    "_attn_implementation_internal", "_experts_implementation_internal", "per_layer_config", "auto_map", "model_type",
    "transformers_version", "architectures", "rope_scaling", "rope_theta", "tie_last_hidden_states",
    "base_model_tp_plan", "output_hidden_states", "return_dict", "chunk_size_feed_forward", "is_encoder_decoder",
}


def _round_up(x: int, multiple: int) -> int:
    return multiple * ((x + multiple - 1) // multiple)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@functools.lru_cache(maxsize=None)
def _known_base_keys(config_class) -> frozenset:
    keys = set(_BASE_KEYS) | {f.name for f in dataclasses.fields(config_class)}
    try:  # generation parameters in old configs: `PreTrainedConfig` drops them
        from transformers import GenerationConfig

        keys |= set(GenerationConfig._get_default_generation_params())
    except (ImportError, AttributeError):
        pass
    return frozenset(keys)


def _check_unknown_keys(config_class, kwargs: dict, known: set) -> None:
    """ValueError for a key no field takes (with the close match); only a warning when loading a saved config."""
    unknown = set(kwargs) - known
    unknown = sorted(unknown - _known_base_keys(config_class)) if unknown else []
    if not unknown:
        return
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.75)
        hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    message = f"{config_class.__name__}: unknown key{'s' if len(hints) > 1 else ''} {', '.join(hints)}"
    if "transformers_version" in kwargs:  # written by `to_dict()`: a saved config may carry extra attributes
        logger.warning(f"{message}; kept as attribute{'s' if len(hints) > 1 else ''}, but no {config_class.model_type} "
                       "code reads it")
        return
    raise ValueError(f"{message}; see the {config_class.__name__} docstring for the accepted fields")


class RatConfig(PreTrainedConfig):
    r"""
    Configuration of a RAT causal language model.

    Each block is pre-norm: gated attention -> causal depthwise temporal convolution + pointwise projection -> SwiGLU.

    Args:
        vocab_size: size of the token vocabulary.
        hidden_size: model width.
        intermediate_size: SwiGLU width; defaults to `4 * hidden_size` rounded up to a multiple of 256 (the seed's rule).
        num_hidden_layers: number of blocks.
        num_attention_heads: query heads.
        num_key_value_heads: key/value heads (GQA when fewer than `num_attention_heads`); defaults to all.
        head_dim: per-head width; defaults to `hidden_size // num_attention_heads`.
        max_position_embeddings: longest sequence the RoPE tables are meant for.
        rope_parameters: transformers RoPE dict (`{"rope_type": "default", "rope_theta": 10000.0}` by default; None
            with `use_rope=False`). The pre-5.0 top-level `rope_theta=` is accepted too.
        use_rope: rotary position embeddings on queries and keys; `False` relies on causality + the convolution (NoPE).
        n_policies: number of policy nets proposing per-head gates at every token.
        policy_hidden_size: width of each policy net and of the selector; defaults to `hidden_size // 8`. The seed's
            `hidden_size // 2` nets cost ~2·d² parameters per layer, more than the attention's output projection; at d/8
            the gating is ~2% of a layer's FLOPs, which is what "small policy nets" should cost.
        gating_mode: `"soft"` mixes the policies with the selector's weights, trained by backprop; `"reinforce"` samples
            one policy per token and layer while training and trains the selector with REINFORCE (expectation in eval);
            `"none"` builds no gates at all (plain multi-head attention: the ablation's "no gates" model).
        policy_loss_coef: weight of the REINFORCE loss added to the LM loss.
        entropy_coef: weight of the selector-entropy bonus inside the REINFORCE loss. The entropy is that of a token's
            whole gating decision (one policy per layer), i.e. summed over layers like the sampled log-probs are.
        policy_discount: discount of the REINFORCE reward-to-go: the gate sampled at token t is rewarded with minus
            `sum_{t' >= t} policy_discount**(t'-t) * loss_t'` over the later labelled tokens of its sequence (its choice
            changes them all: the convolution reads t at t+1..t+K-1 and later layers attend to it). 1.0 (default)
            gives the exact gradient of the expected loss; < 1 trades that exactness for lower variance.
        head_gate_target: where the per-head gates act. `"output"` (default) scales each head's attention output;
            `"query"` scales each head's query per token, i.e. multiplies that head's pre-softmax scores: a per-token,
            per-head temperature (the seed's form). Both keep every attention backend and the KV cache.
        use_temporal_conv: build each block's temporal-convolution branch (`False`: attention + MLP only, the ablation's
            "no conv" model; the cache then keeps no convolution state worth reading).
        conv_kernel_size: width of the causal depthwise temporal convolution (>= 2; the seed used 3).
        conv_bias: bias in the depthwise convolution.
        hidden_dropout: dropout on every residual branch.
        attention_dropout: dropout on attention probabilities.
        rms_norm_eps, initializer_range, attention_bias, mlp_bias, tie_word_embeddings: as in Llama.
        use_gradient_checkpointing: enable gradient checkpointing when the model is built (the seed's `use_checkpointing`).
    """

    model_type = "rat"
    keys_to_ignore_at_inference = ["past_key_values"]
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 768,
        intermediate_size: int | None = None,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        max_position_embeddings: int = 2048,
        rope_parameters: dict | None = None,
        use_rope: bool = True,
        n_policies: int = 3,
        policy_hidden_size: int | None = None,
        gating_mode: str = "soft",
        policy_loss_coef: float = 1.0,
        entropy_coef: float = 0.01,
        policy_discount: float = 1.0,
        head_gate_target: str = "output",
        use_temporal_conv: bool = True,
        conv_kernel_size: int = 3,
        conv_bias: bool = True,
        hidden_act: str = "silu",
        hidden_dropout: float = 0.0,
        attention_dropout: float = 0.0,
        rms_norm_eps: float = 1e-6,
        initializer_range: float = 0.02,
        attention_bias: bool = False,
        mlp_bias: bool = False,
        use_cache: bool = True,
        use_gradient_checkpointing: bool = False,
        tie_word_embeddings: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | list[int] | None = None,
        layer_types: list[str] | None = None,
        **kwargs,
    ):
        _check_unknown_keys(type(self), kwargs, _OWN_KEYS)
        explicit = dict(
            hidden_size=hidden_size, num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
            max_position_embeddings=max_position_embeddings, tie_word_embeddings=tie_word_embeddings,
            use_gradient_checkpointing=use_gradient_checkpointing,
        )
        for seed_name, name in _SEED_ALIASES.items():
            if seed_name in kwargs:
                explicit[name] = kwargs.pop(seed_name)
        hidden_size, num_hidden_layers = explicit["hidden_size"], explicit["num_hidden_layers"]
        num_attention_heads = explicit["num_attention_heads"]
        # the fields other defaults derive from are checked first, so a wrong type is named, not a TypeError below
        for field, value in (("hidden_size", hidden_size), ("num_hidden_layers", num_hidden_layers),
                             ("num_attention_heads", num_attention_heads)):
            if not (_is_int(value) and value > 0):
                raise ValueError(f"RatConfig.{field}={value!r} is invalid: must be a positive int")
        if "dropout" in kwargs:  # the seed's single dropout covers both places it used dropout
            hidden_dropout = attention_dropout = kwargs.pop("dropout")
        if "mlp_ratio" in kwargs:
            mlp_ratio = kwargs.pop("mlp_ratio")
            if intermediate_size is not None:
                raise ValueError("RatConfig: give either `intermediate_size` or the seed's `mlp_ratio`, not both")
            if not (_is_number(mlp_ratio) and mlp_ratio > 0):
                raise ValueError(f"RatConfig.mlp_ratio={mlp_ratio!r} is invalid: must be a positive number")
            intermediate_size = _round_up(int(mlp_ratio * hidden_size), 256)
        given_rope = bool(rope_parameters)
        if given_rope and not isinstance(rope_parameters, dict):
            raise ValueError(f"RatConfig.rope_parameters={rope_parameters!r} is invalid: must be a dict with a "
                             "'rope_type' key")
        rope_parameters = dict(rope_parameters) if given_rope else {"rope_type": "default", "rope_theta": 10000.0}
        if "rope_theta" in kwargs and "rope_scaling" not in kwargs:  # the pre-5.0 top-level key, which
            rope_theta = kwargs.pop("rope_theta")                     # `PreTrainedConfig` would drop here silently
            if given_rope and rope_parameters.get("rope_theta", rope_theta) != rope_theta:
                raise ValueError(f"RatConfig.rope_theta={rope_theta!r} is invalid: rope_parameters says "
                                 f"{rope_parameters['rope_theta']!r}; give it once")
            rope_parameters["rope_theta"] = rope_theta

        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size if intermediate_size is not None else _round_up(4 * hidden_size, 256)
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads if num_key_value_heads is not None else num_attention_heads
        self.head_dim = head_dim if head_dim is not None else hidden_size // num_attention_heads
        self.max_position_embeddings = explicit["max_position_embeddings"]
        # NoPE keeps no RoPE parameters: set only after `PreTrainedConfig.__init__`, whose RoPE validation would
        # otherwise refuse an odd head_dim that no rotary embedding uses (transformers >= 5.24)
        if use_rope is not False:
            self.rope_parameters = rope_parameters
        self.use_rope = use_rope
        self.n_policies = n_policies
        self.policy_hidden_size = policy_hidden_size if policy_hidden_size is not None else max(hidden_size // 8, 1)
        self.gating_mode = gating_mode
        self.policy_loss_coef = policy_loss_coef
        self.entropy_coef = entropy_coef
        self.policy_discount = policy_discount
        self.head_gate_target = head_gate_target
        self.use_temporal_conv = use_temporal_conv
        self.conv_kernel_size = conv_kernel_size
        self.conv_bias = conv_bias
        self.hidden_act = hidden_act
        self.hidden_dropout = hidden_dropout
        self.attention_dropout = attention_dropout
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.attention_bias = attention_bias
        self.mlp_bias = mlp_bias
        self.use_cache = use_cache
        self.use_gradient_checkpointing = explicit["use_gradient_checkpointing"]
        # Every layer keeps attention KV *and* a convolution state: one "hybrid" cache layer each, so `generate()`
        # builds the right `DynamicCache` from the config.
        # Without the conv branch there is no conv state: plain attention layers (croppable, for assisted decoding).
        cache_layer = "hybrid" if use_temporal_conv is not False else "full_attention"
        self.layer_types = list(layer_types) if isinstance(layer_types, (list, tuple)) else (
            [cache_layer] * num_hidden_layers if layer_types is None else layer_types)
        self._validate(head_dim_given=head_dim is not None, tie_word_embeddings=explicit["tie_word_embeddings"],
                       pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id)
        super().__init__(
            pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
            tie_word_embeddings=explicit["tie_word_embeddings"], **kwargs,
        )
        if use_rope is False:
            self.rope_parameters = None
        else:
            self._validate_rope()

    def _validate(self, **init_only) -> None:
        """Check every field (and `init_only`: arguments `PreTrainedConfig` stores); ValueError naming the field."""
        def need(ok: bool, field: str, constraint: str) -> None:
            if not ok:
                value = init_only[field] if field in init_only else getattr(self, field)
                raise ValueError(f"RatConfig.{field}={value!r} is invalid: {constraint}")

        for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                      "num_key_value_heads", "head_dim", "max_position_embeddings", "n_policies", "policy_hidden_size"):
            value = getattr(self, field)
            need(_is_int(value) and value > 0, field, "must be a positive int")
        for field in ("use_rope", "use_temporal_conv", "conv_bias", "attention_bias", "mlp_bias", "use_cache",
                      "use_gradient_checkpointing"):
            need(isinstance(getattr(self, field), bool), field, "must be True or False")
        need(isinstance(init_only["tie_word_embeddings"], bool), "tie_word_embeddings", "must be True or False")
        for field in ("pad_token_id", "bos_token_id"):
            need(init_only[field] is None or _is_int(init_only[field]), field, "must be an int token id or None")
        eos = init_only["eos_token_id"]
        need(eos is None or _is_int(eos) or (isinstance(eos, (list, tuple)) and all(_is_int(e) for e in eos)),
             "eos_token_id", "must be an int token id, a list of them, or None")
        need(self.num_attention_heads % self.num_key_value_heads == 0, "num_attention_heads",
             f"must be a multiple of num_key_value_heads={self.num_key_value_heads}")
        need(init_only["head_dim_given"] or self.hidden_size % self.num_attention_heads == 0, "hidden_size",
             f"must be divisible by num_attention_heads ({self.num_attention_heads}) when head_dim is not given")
        need(self.head_dim % 2 == 0 or not self.use_rope, "head_dim", "must be even for rotary embeddings "
             "(odd widths need use_rope=False)")
        need(self.gating_mode in ("soft", "reinforce", "none"), "gating_mode", "must be 'soft', 'reinforce' or 'none'")
        need(self.gating_mode == "soft" or self.n_policies >= 2, "n_policies",
             "must be >= 2 with gating_mode='reinforce' (with one policy there is nothing to choose)")
        need(_is_number(self.policy_discount) and 0.0 < self.policy_discount <= 1.0, "policy_discount",
             "must be a number in (0, 1]")
        need(self.head_gate_target in ("output", "query"), "head_gate_target", "must be 'output' or 'query'")
        need(_is_int(self.conv_kernel_size) and self.conv_kernel_size >= 2, "conv_kernel_size", "must be an int >= 2")
        need(isinstance(self.hidden_act, str) and self.hidden_act in ACT2FN, "hidden_act",
             "must name a transformers activation (e.g. 'silu', 'gelu')")
        for field in ("hidden_dropout", "attention_dropout"):
            value = getattr(self, field)
            need(_is_number(value) and 0.0 <= value < 1.0, field, "must be a number in [0, 1)")
        for field in ("policy_loss_coef", "entropy_coef"):
            value = getattr(self, field)
            need(_is_number(value) and value >= 0.0, field, "must be a finite number >= 0")
        for field in ("rms_norm_eps", "initializer_range"):
            value = getattr(self, field)
            need(_is_number(value) and value > 0.0, field, "must be a finite number > 0")
        cache_layer = "hybrid" if self.use_temporal_conv else "full_attention"
        need(isinstance(self.layer_types, list) and len(self.layer_types) == self.num_hidden_layers
             and set(self.layer_types) <= {cache_layer}, "layer_types",
             f"must be ['{cache_layer}'] * num_hidden_layers ({self.num_hidden_layers}): every RAT layer has attention"
             + (" and a conv" if self.use_temporal_conv else " (and no conv: use_temporal_conv=False)"))
        need(not self.use_rope or (isinstance(self.rope_parameters, dict) and "rope_type" in self.rope_parameters),
             "rope_parameters", "must be a dict with a 'rope_type' key")

    def _validate_rope(self) -> None:
        theta = self.rope_parameters.get("rope_theta") if isinstance(self.rope_parameters, dict) else None
        if not (_is_number(theta) and theta > 0):
            raise ValueError(f"RatConfig.rope_theta={theta!r} is invalid: must be a finite number > 0 "
                             "(in rope_parameters['rope_theta'])")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "RatConfig":
        """The seed's `small` (7.1M parameters), `base` (147.0M) or `large` (495.2M) sizes; `overrides` win."""
        if name not in PRESETS:
            raise ValueError(f"RatConfig.from_preset: unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


# What `RatConfig(...)` takes by name: its arguments, the seed's aliases and the seed's `dropout` / `mlp_ratio`.
_OWN_KEYS = ({name for name, p in inspect.signature(RatConfig.__init__).parameters.items()
              if p.kind is p.POSITIONAL_OR_KEYWORD and name != "self"} | set(_SEED_ALIASES) | {"dropout", "mlp_ratio"})

__all__ = ["RatConfig", "PRESETS"]
