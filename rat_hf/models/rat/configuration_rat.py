"""RAT (Reinforced Adaptive Transformer) configuration.

Transformers naming throughout (`hidden_size`, `num_hidden_layers`, ...). The names of the original `rat-transformer`
package (`d_model`, `n_layers`, `n_heads`, `max_seq_len`, `dropout`, `mlp_ratio`, `tie_weights`, `use_checkpointing`)
are accepted as aliases and build exactly the same model.
"""

from transformers import PreTrainedConfig

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


def _round_up(x: int, multiple: int) -> int:
    return multiple * ((x + multiple - 1) // multiple)


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
        rope_parameters: transformers RoPE dict (`{"rope_type": "default", "rope_theta": 10000.0}` by default).
        use_rope: rotary position embeddings on queries and keys; `False` relies on causality + the convolution (NoPE).
        n_policies: number of policy nets proposing per-head gates at every token.
        policy_hidden_size: width of each policy net and of the selector; defaults to `hidden_size // 8`. The seed's
            `hidden_size // 2` nets cost ~2·d² parameters per layer, more than the attention's output projection; at d/8
            the gating is ~2% of a layer's FLOPs, which is what "small policy nets" should cost.
        gating_mode: `"soft"` mixes the policies with the selector's weights, trained by backprop; `"reinforce"` samples
            one policy per token and layer while training and trains the selector with REINFORCE (expectation in eval).
        policy_loss_coef: weight of the REINFORCE loss added to the LM loss.
        entropy_coef: weight of the selector-entropy bonus inside the REINFORCE loss.
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
        if "dropout" in kwargs:  # the seed's single dropout covers both places it used dropout
            hidden_dropout = attention_dropout = kwargs.pop("dropout")
        if "mlp_ratio" in kwargs:
            mlp_ratio = kwargs.pop("mlp_ratio")
            if intermediate_size is not None:
                raise ValueError("RatConfig: give either `intermediate_size` or the seed's `mlp_ratio`, not both")
            intermediate_size = _round_up(int(mlp_ratio * hidden_size), 256)

        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size if intermediate_size is not None else _round_up(4 * hidden_size, 256)
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads if num_key_value_heads is not None else num_attention_heads
        self.head_dim = head_dim if head_dim is not None else hidden_size // max(num_attention_heads, 1)
        self.max_position_embeddings = explicit["max_position_embeddings"]
        self.rope_parameters = dict(rope_parameters) if rope_parameters else {"rope_type": "default", "rope_theta": 10000.0}
        self.use_rope = use_rope
        self.n_policies = n_policies
        self.policy_hidden_size = policy_hidden_size if policy_hidden_size is not None else max(hidden_size // 8, 1)
        self.gating_mode = gating_mode
        self.policy_loss_coef = policy_loss_coef
        self.entropy_coef = entropy_coef
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
        self.layer_types = list(layer_types) if layer_types is not None else ["hybrid"] * num_hidden_layers
        self._validate()
        super().__init__(
            pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
            tie_word_embeddings=explicit["tie_word_embeddings"], **kwargs,
        )

    def _validate(self) -> None:
        def need(ok: bool, field: str, constraint: str) -> None:
            if not ok:
                raise ValueError(f"RatConfig.{field}={getattr(self, field)!r} is invalid: {constraint}")

        for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                      "num_key_value_heads", "head_dim", "max_position_embeddings", "n_policies", "policy_hidden_size"):
            value = getattr(self, field)
            need(isinstance(value, int) and not isinstance(value, bool) and value > 0, field, "must be a positive int")
        need(self.num_attention_heads % self.num_key_value_heads == 0, "num_attention_heads",
             f"must be a multiple of num_key_value_heads={self.num_key_value_heads}")
        need(self.head_dim % 2 == 0 or not self.use_rope, "head_dim", "must be even for rotary embeddings")
        need(self.gating_mode in ("soft", "reinforce"), "gating_mode", "must be 'soft' or 'reinforce'")
        need(self.gating_mode == "soft" or self.n_policies >= 2, "n_policies",
             "must be >= 2 with gating_mode='reinforce' (with one policy there is nothing to choose)")
        need(isinstance(self.conv_kernel_size, int) and self.conv_kernel_size >= 2, "conv_kernel_size",
             "must be an int >= 2")
        for field in ("hidden_dropout", "attention_dropout"):
            need(0.0 <= getattr(self, field) < 1.0, field, "must be in [0, 1)")
        for field in ("policy_loss_coef", "entropy_coef"):
            need(getattr(self, field) >= 0.0, field, "must be >= 0")
        need(len(self.layer_types) == self.num_hidden_layers and set(self.layer_types) <= {"hybrid"}, "layer_types",
             f"must be ['hybrid'] * num_hidden_layers ({self.num_hidden_layers}): every RAT layer has attention and a conv")
        need(isinstance(self.rope_parameters, dict) and "rope_type" in self.rope_parameters, "rope_parameters",
             "must be a dict with a 'rope_type' key")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "RatConfig":
        """The seed's `small` (7.1M parameters), `base` (147.0M) or `large` (495.2M) sizes; `overrides` win."""
        if name not in PRESETS:
            raise ValueError(f"RatConfig.from_preset: unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


__all__ = ["RatConfig", "PRESETS"]
