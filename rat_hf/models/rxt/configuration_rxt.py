"""Reactive Transformer (RxT) configuration.

One flat config builds the three parts of an RxT: the decoder that answers a query from the short-term memory (STM),
the encoder that reads the finished interaction, and the memory-attention network that folds it into the STM. The
defaults build a ~19M-parameter model (printed by `RxTForCausalLM(RxTConfig()).num_parameters()`: 19,421,982).

Derived defaults follow the fields they derive from (`RxTConfig(num_attention_heads=4)` alone works): `head_dim`,
`num_query_heads`, `num_key_value_heads` from the head count, the widths from `hidden_size` / `intermediate_size`,
the depths from `num_hidden_layers`. The special-token ids must be the tokenizer's: build them with
`RxTConfig.from_tokenizer(tokenizer, ...)`.

The config refuses silent mistakes, naming the field: wrong types (`hidden_size="64"`), sizes that do not fit together,
non-positive or NaN numbers, and unknown keys (a typo such as `num_hiden_layers`: ValueError with the close match; in
a saved config, recognised by its `transformers_version` key, a warning instead, so a checkpoint carrying extra
attributes still loads). This file ships to the Hub as remote code: it imports only the standard library and
transformers.
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

# Attention variants: how many query and key/value heads a component uses, given `num_attention_heads` (H, which sets
# `head_dim`), `num_query_heads` (Hq, SQA only) and `num_key_value_heads` (Hkv, GQA and SQA).
ATTENTION_VARIANTS = ("mha", "gqa", "mqa", "sqa", "ssqa", "xsqa")
MEMORY_ATTENTION_TYPES = ("simple", "self", "interlayer", "gated_self_interlayer")
MEMORY_GATE_TYPES = ("static", "dynamic")
MEMORY_RESIDUALS = ("decoupled", "interpolate")
# Gate logits a fresh `decoupled` memory starts from: keep sigmoid(3) = 0.95 of the old memory and write 0.95 of the
# update, so an untrained memory behaves like RxLM's plain residual `STM + update` (nothing read is lost, the
# gradient reaches earlier turns undamped) while staying bounded; see `memory_residual` in the docstring.
DECOUPLED_KEEP_INIT, DECOUPLED_WRITE_INIT = 3.0, 3.0
# The components that choose a variant, as `<component>_attention_variant` fields.
ATTENTION_COMPONENTS = ("self", "cross", "encoder", "memory")
# The reactive tokens' text (as in `rat_hf.tokenization.special_tokens`, which this remote-code file cannot import).
QUERY_TOKEN, ANSWER_TOKEN = "[Q]", "[A]"

# Copied from rat_hf.models.rat.configuration_rat (down to `_known_base_keys`): each configuration file ships alone
# as remote code, so the validation helpers are copied per model folder rather than imported.
# Keys that `PreTrainedConfig` itself takes (or silently drops) besides its dataclass fields, and what `to_dict()`
# writes.
_BASE_KEYS = {
    "torch_dtype", "dtype", "num_labels", "id2label", "label2id", "problem_type", "name_or_path", "_name_or_path",
    "_commit_hash", "output_attentions", "attn_implementation", "experts_implementation",
    "_attn_implementation_internal", "_experts_implementation_internal", "per_layer_config", "auto_map", "model_type",
    "transformers_version", "architectures", "rope_scaling", "rope_theta", "tie_last_hidden_states",
    "base_model_tp_plan", "output_hidden_states", "return_dict", "chunk_size_feed_forward", "is_encoder_decoder",
}


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


def _default_key_value_heads(heads: int, query_heads: int) -> int:
    """The largest count <= H/4 that divides both H and the SQA query heads (H=8 -> 2, 12 -> 3, 4 -> 1)."""
    return max(k for k in range(1, max(heads // 4, 1) + 1) if heads % k == 0 and query_heads % k == 0)


class RxTConfig(PreTrainedConfig):
    r"""
    Configuration of a Reactive Transformer.

    Shapes: the STM is `[batch, num_hidden_layers, stm_size, hidden_size]` (batch first, so `generate()` repeats it
    for beams). Decoder layer `l` reads STM layer `l`; memory-attention layer `l` writes it from the encoder layer that
    `encoder_layer_for_memory_layer(l)` names (the last one when depths are equal).

    Args:
        vocab_size: size of the token vocabulary (encoder and decoder share the embedding).
        hidden_size: width of the decoder, the encoder and the STM slots.
        intermediate_size: decoder SwiGLU width (dense decoder); defaults to `3 * hidden_size`.
        num_hidden_layers: decoder layers; also the number of STM layers and of memory-attention layers.
        num_encoder_layers: encoder layers; defaults to `num_hidden_layers`.
        encoder_intermediate_size: encoder SwiGLU width; defaults to `intermediate_size`.
        num_attention_heads: H, the full head count; `head_dim` defaults to `hidden_size // H`.
        num_key_value_heads: key/value heads of the `gqa` and `sqa` variants; defaults to the largest count <= H/4
            that divides H and `num_query_heads` (2 for the default H=8).
        num_query_heads: query heads of the `sqa` variant (must be < H: that is what saves the FLOPs); defaults to H/2.
        head_dim: per-head width.
        self_attention_variant, cross_attention_variant, encoder_attention_variant, memory_attention_variant: one of
            `mha` (H query, H kv heads), `gqa` (H, num_key_value_heads), `mqa` (H, 1), `sqa` (num_query_heads,
            num_key_value_heads), `ssqa` (symmetric: H/2, H/2), `xsqa` (extreme: H/4, H/4) for, in order, the decoder's
            causal self-attention, its memory cross-attention, the encoder's self-attention and the memory attention.
        stm_size: memory slots per STM layer.
        memory_attention_type: `simple` (slots attend to the encoded interaction), `self` (slots first attend to each
            other), `interlayer` (slots first attend to the mean of all STM layers) or `gated_self_interlayer` (first to
            a per-slot sigmoid mix of their own layer and the mean of all layers).
        memory_residual: how each memory-attention stage combines a slot's old value with its update, through
            sigmoid gates per slot. `decoupled` (the default): `STM' = K * STM + W * update`, a keep gate K and a write
            gate W, initialised to 0.95 each, so a fresh memory keeps what it read and writes the new interaction at
            full strength, like RxLM's plain residual, and can learn to forget (K < 1 always bounds it by
            `|update| / (1 - K)`). `interpolate`: `STM' = G * update + (1 - G) * STM`, the RxT paper's gate; at G = 0.5
            two such stages per update quarter the old memory every turn, which a tiny model could not learn to
            recall through (a fact two turns back was recalled at chance). A saved config without this key (written
            before it existed) loads as `interpolate`, its behaviour then.
        memory_gate_type: the gates are per slot; `static` learns their logits per slot, `dynamic` computes them from
            the slot's old value plus its update.
        memory_gate_init: initial logit of the write gate W (`decoupled`, default 3.0 -> 0.95) or of G
            (`interpolate`, default 0.0 -> G = 0.5).
        memory_keep_gate_init: initial logit of the keep gate K (`decoupled` only; default 3.0 -> 0.95).
        num_experts: decoder MoE experts (0 = dense SwiGLU).
        num_experts_per_tok: experts each token is routed to (top-k).
        moe_intermediate_size: width of each expert; defaults to `intermediate_size`.
        norm_topk_prob: renormalise the top-k routing weights to sum to one.
        router_aux_loss_coef: weight of the load-balancing loss added to the LM loss when labels are given.
        max_position_embeddings: longest single interaction the RoPE tables are meant for (memory carries the rest).
        rope_parameters: transformers RoPE dict (`{"rope_type": "default", "rope_theta": 10000.0}` by default).
        query_token_id, answer_token_id: ids of the `[Q]` and `[A]` tokens that open a query and an answer. The
            defaults (pad/bos/eos/[Q]/[A] = 0..4) are those of `rat_hf.tokenization.train_bpe_tokenizer`; for any other
            tokenizer use `RxTConfig.from_tokenizer(tokenizer, ...)`.
        hidden_act, hidden_dropout, attention_dropout, rms_norm_eps, initializer_range, attention_bias, mlp_bias,
        tie_word_embeddings, pad/bos/eos_token_id: as in Llama.
    """

    model_type = "rxt"
    keys_to_ignore_at_inference = ["past_key_values"]
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.cross_attn.q_proj": "colwise",
        "layers.*.cross_attn.k_proj": "colwise",
        "layers.*.cross_attn.v_proj": "colwise",
        "layers.*.cross_attn.o_proj": "rowwise",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
        # MoE decoder: every expert is a SwiGLU of its own, sharded like the dense one (the router stays replicated)
        "layers.*.mlp.experts.*.gate_proj": "colwise",
        "layers.*.mlp.experts.*.up_proj": "colwise",
        "layers.*.mlp.experts.*.down_proj": "rowwise",
    }

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 256,
        intermediate_size: int | None = None,
        num_hidden_layers: int = 6,
        num_encoder_layers: int | None = None,
        encoder_intermediate_size: int | None = None,
        num_attention_heads: int = 8,
        num_key_value_heads: int | None = None,
        num_query_heads: int | None = None,
        head_dim: int | None = None,
        self_attention_variant: str = "gqa",
        cross_attention_variant: str = "gqa",
        encoder_attention_variant: str = "sqa",
        memory_attention_variant: str = "sqa",
        stm_size: int = 256,
        memory_attention_type: str = "gated_self_interlayer",
        memory_gate_type: str = "dynamic",
        memory_gate_init: float | None = None,
        memory_residual: str | None = None,
        memory_keep_gate_init: float | None = None,
        num_experts: int = 0,
        num_experts_per_tok: int = 2,
        moe_intermediate_size: int | None = None,
        norm_topk_prob: bool = True,
        router_aux_loss_coef: float = 0.01,
        max_position_embeddings: int = 1024,
        rope_parameters: dict | None = None,
        hidden_act: str = "silu",
        hidden_dropout: float = 0.0,
        attention_dropout: float = 0.0,
        rms_norm_eps: float = 1e-6,
        initializer_range: float = 0.02,
        attention_bias: bool = False,
        mlp_bias: bool = False,
        use_cache: bool = True,
        tie_word_embeddings: bool = True,
        pad_token_id: int | None = 0,
        bos_token_id: int | None = 1,
        eos_token_id: int | list[int] | None = 2,
        query_token_id: int = 3,
        answer_token_id: int = 4,
        layer_types: list[str] | None = None,
        **kwargs,
    ):
        _check_unknown_keys(type(self), kwargs, _OWN_KEYS)
        # the fields other defaults derive from are checked first, so a wrong type is named, not a TypeError below
        for field, value in (("hidden_size", hidden_size), ("num_hidden_layers", num_hidden_layers),
                             ("num_attention_heads", num_attention_heads)):
            if not (_is_int(value) and value > 0):
                raise ValueError(f"RxTConfig.{field}={value!r} is invalid: must be a positive int")
        if intermediate_size is None:
            intermediate_size = 3 * hidden_size
        if num_query_heads is None:
            num_query_heads = max(num_attention_heads // 2, 1)
        if num_key_value_heads is None and _is_int(num_query_heads) and num_query_heads > 0:
            num_key_value_heads = _default_key_value_heads(num_attention_heads, num_query_heads)
        given_rope = bool(rope_parameters)
        if given_rope and not isinstance(rope_parameters, dict):
            raise ValueError(f"RxTConfig.rope_parameters={rope_parameters!r} is invalid: must be a dict with a "
                             "'rope_type' key")
        rope_parameters = dict(rope_parameters) if given_rope else {"rope_type": "default", "rope_theta": 10000.0}
        if "rope_theta" in kwargs and "rope_scaling" not in kwargs:  # the pre-5.0 top-level key, which
            rope_theta = kwargs.pop("rope_theta")                     # `PreTrainedConfig` would drop here silently
            if given_rope and rope_parameters.get("rope_theta", rope_theta) != rope_theta:
                raise ValueError(f"RxTConfig.rope_theta={rope_theta!r} is invalid: rope_parameters says "
                                 f"{rope_parameters['rope_theta']!r}; give it once")
            rope_parameters["rope_theta"] = rope_theta

        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_encoder_layers = num_encoder_layers if num_encoder_layers is not None else num_hidden_layers
        self.encoder_intermediate_size = (
            encoder_intermediate_size if encoder_intermediate_size is not None else intermediate_size
        )
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.num_query_heads = num_query_heads
        self.head_dim = head_dim if head_dim is not None else hidden_size // num_attention_heads
        self.self_attention_variant = self_attention_variant
        self.cross_attention_variant = cross_attention_variant
        self.encoder_attention_variant = encoder_attention_variant
        self.memory_attention_variant = memory_attention_variant
        self.stm_size = stm_size
        self.memory_attention_type = memory_attention_type
        self.memory_gate_type = memory_gate_type
        if memory_residual is None:  # a config saved before the field existed keeps the behaviour it was saved with
            memory_residual = "interpolate" if "transformers_version" in kwargs else "decoupled"
        self.memory_residual = memory_residual
        decoupled = memory_residual == "decoupled"
        self.memory_gate_init = memory_gate_init if memory_gate_init is not None else (
            DECOUPLED_WRITE_INIT if decoupled else 0.0)
        self.memory_keep_gate_init = memory_keep_gate_init if memory_keep_gate_init is not None else (
            DECOUPLED_KEEP_INIT if decoupled else None)
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.moe_intermediate_size = moe_intermediate_size if moe_intermediate_size is not None else intermediate_size
        self.norm_topk_prob = norm_topk_prob
        self.router_aux_loss_coef = router_aux_loss_coef
        self.max_position_embeddings = max_position_embeddings
        self.rope_parameters = rope_parameters
        self.hidden_act = hidden_act
        self.hidden_dropout = hidden_dropout
        self.attention_dropout = attention_dropout
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.attention_bias = attention_bias
        self.mlp_bias = mlp_bias
        self.use_cache = use_cache
        self.query_token_id = query_token_id
        self.answer_token_id = answer_token_id
        # Only the decoder's self-attention is cached; the memory cross-attention keys/values are computed once per turn.
        self.layer_types = list(layer_types) if isinstance(layer_types, (list, tuple)) else (
            ["full_attention"] * num_hidden_layers if layer_types is None else layer_types)
        self._validate(head_dim_given=head_dim is not None, tie_word_embeddings=tie_word_embeddings,
                       pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id)
        super().__init__(
            pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings, **kwargs,
        )
        self._validate_rope()

    @classmethod
    def from_tokenizer(cls, tokenizer, **kwargs) -> "RxTConfig":
        """A config whose `vocab_size` and pad/bos/eos/`[Q]`/`[A]` ids are the tokenizer's; `kwargs` set the rest.

        The tokenizer needs `[Q]`, `[A]` and an EOS token: `rat_hf.tokenization.add_reactive_special_tokens(tokenizer)`
        adds what is missing (or use `rat_hf.tokenization.reactive_config(tokenizer, ...)`, which does both).
        `vocab_size` defaults to `len(tokenizer)`; a larger one (e.g. rounded up for speed) is accepted.
        """
        ids = {}
        for field, token in (("query_token_id", QUERY_TOKEN), ("answer_token_id", ANSWER_TOKEN)):
            token_id = tokenizer.convert_tokens_to_ids(token)
            if (token_id is None or token_id == tokenizer.unk_token_id
                    or tokenizer.convert_ids_to_tokens(token_id) != token):
                raise ValueError(f"RxTConfig.from_tokenizer: the tokenizer has no {token!r} token; add it with "
                                 "rat_hf.tokenization.add_reactive_special_tokens(tokenizer)")
            ids[field] = token_id
        if tokenizer.eos_token_id is None:
            raise ValueError("RxTConfig.from_tokenizer: the tokenizer has no EOS token, which ends every answer; add "
                             "one (rat_hf.tokenization.add_reactive_special_tokens(tokenizer) does)")
        ids.update(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                   eos_token_id=tokenizer.eos_token_id, vocab_size=len(tokenizer))
        for field in ("pad_token_id", "bos_token_id", "eos_token_id", "query_token_id", "answer_token_id"):
            if field in kwargs and kwargs[field] != ids[field]:
                raise ValueError(f"RxTConfig.from_tokenizer: {field}={kwargs[field]!r} differs from the tokenizer's "
                                 f"{ids[field]!r}; leave it out")
        if "vocab_size" in kwargs and _is_int(kwargs["vocab_size"]) and kwargs["vocab_size"] < len(tokenizer):
            raise ValueError(f"RxTConfig.from_tokenizer: vocab_size={kwargs['vocab_size']} is smaller than the "
                             f"tokenizer's {len(tokenizer)} tokens")
        return cls(**{**ids, **kwargs})

    def attention_heads(self, variant: str) -> tuple[int, int]:
        """`(query heads, key/value heads)` of an attention variant under this config."""
        heads = self.num_attention_heads
        return {
            "mha": (heads, heads),
            "gqa": (heads, self.num_key_value_heads),
            "mqa": (heads, 1),
            "sqa": (self.num_query_heads, self.num_key_value_heads),
            "ssqa": (heads // 2, heads // 2),
            "xsqa": (heads // 4, heads // 4),
        }[variant]

    def encoder_layer_for_memory_layer(self, layer_idx: int) -> int:
        """The encoder layer whose output memory-attention layer `layer_idx` reads: evenly spaced, ending at the last."""
        return max((layer_idx + 1) * self.num_encoder_layers // self.num_hidden_layers - 1, 0)

    def _validate(self, **init_only) -> None:
        """Check every field (and `init_only`: arguments `PreTrainedConfig` stores); ValueError naming the field."""
        def need(ok: bool, field: str, constraint: str) -> None:
            if not ok:
                value = init_only[field] if field in init_only else getattr(self, field)
                raise ValueError(f"RxTConfig.{field}={value!r} is invalid: {constraint}")

        for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_encoder_layers",
                      "encoder_intermediate_size", "num_attention_heads", "num_key_value_heads", "num_query_heads",
                      "head_dim", "stm_size", "num_experts_per_tok", "moe_intermediate_size",
                      "max_position_embeddings"):
            value = getattr(self, field)
            need(_is_int(value) and value > 0, field, "must be a positive int")
        for field in ("norm_topk_prob", "attention_bias", "mlp_bias", "use_cache"):
            need(isinstance(getattr(self, field), bool), field, "must be True or False")
        need(isinstance(init_only["tie_word_embeddings"], bool), "tie_word_embeddings", "must be True or False")
        for field in ("pad_token_id", "bos_token_id"):
            need(init_only[field] is None or _is_int(init_only[field]), field, "must be an int token id or None")
        eos = init_only["eos_token_id"]
        need(eos is None or _is_int(eos) or (isinstance(eos, (list, tuple)) and all(_is_int(e) for e in eos)),
             "eos_token_id", "must be an int token id, a list of them, or None")
        need(init_only["head_dim_given"] or self.hidden_size % self.num_attention_heads == 0, "hidden_size",
             f"must be divisible by num_attention_heads ({self.num_attention_heads}) when head_dim is not given")
        need(_is_int(self.num_experts) and self.num_experts >= 0, "num_experts", "must be an int >= 0 (0 = dense)")
        need(self.num_experts == 0 or self.num_experts_per_tok <= self.num_experts, "num_experts_per_tok",
             f"must be <= num_experts ({self.num_experts})")
        need(self.head_dim % 2 == 0, "head_dim", "must be even for rotary embeddings")
        heads = self.num_attention_heads
        for component in ATTENTION_COMPONENTS:
            field = f"{component}_attention_variant"
            variant = getattr(self, field)
            need(variant in ATTENTION_VARIANTS, field, f"must be one of {list(ATTENTION_VARIANTS)}")
            if variant == "gqa":
                need(self.num_key_value_heads < heads and heads % self.num_key_value_heads == 0, "num_key_value_heads",
                     f"must be < num_attention_heads ({heads}) and divide it for the 'gqa' variant of {field}")
            elif variant == "sqa":
                need(self.num_query_heads < heads, "num_query_heads",
                     f"must be < num_attention_heads ({heads}) for the 'sqa' variant of {field}")
                need(self.num_query_heads % self.num_key_value_heads == 0, "num_key_value_heads",
                     f"must divide num_query_heads ({self.num_query_heads}) for the 'sqa' variant of {field}")
            elif variant in ("ssqa", "xsqa"):
                divisor = 2 if variant == "ssqa" else 4
                need(heads % divisor == 0, "num_attention_heads", f"must be a multiple of {divisor} for the "
                     f"'{variant}' variant of {field}")
        need(self.memory_attention_type in MEMORY_ATTENTION_TYPES, "memory_attention_type",
             f"must be one of {list(MEMORY_ATTENTION_TYPES)}")
        need(self.memory_gate_type in MEMORY_GATE_TYPES, "memory_gate_type", f"must be one of {list(MEMORY_GATE_TYPES)}")
        need(self.memory_residual in MEMORY_RESIDUALS, "memory_residual", f"must be one of {list(MEMORY_RESIDUALS)}")
        need(_is_number(self.memory_gate_init), "memory_gate_init",
             "must be a finite number (a gate logit: 0.0 gives G = 0.5)")
        if self.memory_residual == "decoupled":
            need(_is_number(self.memory_keep_gate_init), "memory_keep_gate_init",
                 "must be a finite number (the keep gate's logit: 3.0 gives K = 0.95)")
        else:
            need(self.memory_keep_gate_init is None, "memory_keep_gate_init",
                 "applies to memory_residual='decoupled' only (leave it out for 'interpolate')")
        need(isinstance(self.hidden_act, str) and self.hidden_act in ACT2FN, "hidden_act",
             "must name a transformers activation (e.g. 'silu', 'gelu')")
        for field in ("hidden_dropout", "attention_dropout"):
            value = getattr(self, field)
            need(_is_number(value) and 0.0 <= value < 1.0, field, "must be a number in [0, 1)")
        need(_is_number(self.router_aux_loss_coef) and self.router_aux_loss_coef >= 0.0, "router_aux_loss_coef",
             "must be a finite number >= 0")
        for field in ("rms_norm_eps", "initializer_range"):
            value = getattr(self, field)
            need(_is_number(value) and value > 0.0, field, "must be a finite number > 0")
        for field in ("query_token_id", "answer_token_id"):
            value = getattr(self, field)
            need(_is_int(value) and 0 <= value < self.vocab_size, field,
                 f"must be a token id in [0, vocab_size={self.vocab_size})")
        need(self.query_token_id != self.answer_token_id, "answer_token_id", "must differ from query_token_id")
        need(self.layer_types == ["full_attention"] * self.num_hidden_layers, "layer_types",
             f"must be ['full_attention'] * num_hidden_layers ({self.num_hidden_layers}): only decoder self-attention "
             "is cached")
        need(isinstance(self.rope_parameters, dict) and "rope_type" in self.rope_parameters, "rope_parameters",
             "must be a dict with a 'rope_type' key")

    def _validate_rope(self) -> None:
        theta = self.rope_parameters.get("rope_theta") if isinstance(self.rope_parameters, dict) else None
        if not (_is_number(theta) and theta > 0):
            raise ValueError(f"RxTConfig.rope_theta={theta!r} is invalid: must be a finite number > 0 "
                             "(in rope_parameters['rope_theta'])")


# What `RxTConfig(...)` takes by name.
_OWN_KEYS = {name for name, p in inspect.signature(RxTConfig.__init__).parameters.items()
             if p.kind is p.POSITIONAL_OR_KEYWORD and name != "self"}

__all__ = ["RxTConfig"]
