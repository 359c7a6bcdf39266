"""RatConfig and RxTConfig refuse silent mistakes (naming the field), keep their derived defaults in step with the
fields they derive from, and still save and load (seed names included) without a warning."""

import ast
import json
import logging
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

from rat_hf import RatConfig, RatForCausalLM, RxTConfig, RxTForCausalLM

RAT = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
           max_position_embeddings=64)
RXT = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
           num_query_heads=2, intermediate_size=64, stm_size=8, max_position_embeddings=64)
BASE = {RatConfig: RAT, RxTConfig: RXT}
BOTH = pytest.mark.parametrize("cls", [RatConfig, RxTConfig], ids=["rat", "rxt"])

# (overrides, the field the error names): each was accepted before, and either built a model that silently differs
# from what was asked (65/4 heads -> 16-wide heads, use_rope="no" -> RoPE on) or failed later somewhere unrelated
BAD_FOR_BOTH = [
    (dict(hidden_size=65, num_attention_heads=4), "hidden_size"),
    (dict(hidden_size=32, num_attention_heads=5), "hidden_size"),
    (dict(hidden_size="64"), "hidden_size"),
    (dict(num_hidden_layers=2.0), "num_hidden_layers"),
    (dict(num_attention_heads=True), "num_attention_heads"),
    (dict(rms_norm_eps=0.0), "rms_norm_eps"),
    (dict(rms_norm_eps=-1e-6), "rms_norm_eps"),
    (dict(rms_norm_eps=float("nan")), "rms_norm_eps"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": float("nan")}), "rope_theta"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 0.0}), "rope_theta"),
    (dict(rope_theta=-10000.0), "rope_theta"),
    (dict(initializer_range=float("inf")), "initializer_range"),
    (dict(hidden_dropout="0.1"), "hidden_dropout"),
    (dict(attention_dropout=float("nan")), "attention_dropout"),
    (dict(tie_word_embeddings="yes"), "tie_word_embeddings"),
    (dict(use_cache="no"), "use_cache"),
    (dict(attention_bias=1), "attention_bias"),
    (dict(eos_token_id="2"), "eos_token_id"),
    (dict(pad_token_id=0.0), "pad_token_id"),
    (dict(hidden_act="silu "), "hidden_act"),
]
BAD_FOR_RAT = [
    (dict(use_rope="no"), "use_rope"),
    (dict(use_rope=0), "use_rope"),
    (dict(conv_bias="False"), "conv_bias"),
    (dict(use_gradient_checkpointing=None), "use_gradient_checkpointing"),
    (dict(head_dim=7), "head_dim"),  # odd widths only without RoPE
    (dict(policy_loss_coef=float("nan")), "policy_loss_coef"),
    (dict(entropy_coef=float("-inf")), "entropy_coef"),
    (dict(d_model="64"), "hidden_size"),  # the seed's names are checked as the fields they stand for
    (dict(mlp_ratio=float("nan")), "mlp_ratio"),
]
BAD_FOR_RXT = [
    (dict(memory_gate_init=float("nan")), "memory_gate_init"),
    (dict(memory_gate_init=float("inf")), "memory_gate_init"),
    (dict(memory_gate_init="0.0"), "memory_gate_init"),
    (dict(norm_topk_prob="yes"), "norm_topk_prob"),
    (dict(router_aux_loss_coef=float("nan")), "router_aux_loss_coef"),
    (dict(mlp_bias="False"), "mlp_bias"),
]


def _ids(cases):
    return [f"{field}-{'-'.join(map(str, overrides.values()))}" for overrides, field in cases]


@BOTH
@pytest.mark.parametrize("overrides, field", BAD_FOR_BOTH, ids=_ids(BAD_FOR_BOTH))
def test_bad_values_raise_naming_the_field(cls, overrides, field):
    with pytest.raises(ValueError, match=rf"^{cls.__name__}\.{field}=.* is invalid: "):
        cls(**{**BASE[cls], **overrides})


@pytest.mark.parametrize("overrides, field", BAD_FOR_RAT, ids=_ids(BAD_FOR_RAT))
def test_bad_rat_values_raise_naming_the_field(overrides, field):
    kwargs = {**RAT, **overrides}
    if "d_model" in overrides:
        kwargs.pop("hidden_size")
    if "mlp_ratio" in overrides:
        kwargs.pop("intermediate_size")
    with pytest.raises(ValueError, match=rf"^RatConfig\.{field}=.* is invalid: "):
        RatConfig(**kwargs)


@pytest.mark.parametrize("overrides, field", BAD_FOR_RXT, ids=_ids(BAD_FOR_RXT))
def test_bad_rxt_values_raise_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=rf"^RxTConfig\.{field}=.* is invalid: "):
        RxTConfig(**{**RXT, **overrides})


def test_a_negative_memory_gate_logit_is_legal():
    assert RxTConfig(**RXT, memory_gate_init=-3.0).memory_gate_init == -3.0  # a logit: any finite value


@BOTH
def test_a_typo_raises_with_the_close_match(cls):
    with pytest.raises(ValueError, match=rf"^{cls.__name__}: unknown key 'num_hiden_layers' "
                                         r"\(did you mean 'num_hidden_layers'\?\)"):
        cls(**BASE[cls], num_hiden_layers=3)
    with pytest.raises(ValueError, match=r"unknown keys 'colour', 'stm_sise'"):
        cls(**BASE[cls], stm_sise=4, colour="red")


@BOTH
def test_a_saved_config_with_an_extra_key_loads_with_a_warning(cls, tmp_path, caplog):
    config = cls(**BASE[cls])
    config.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    data["my_note"] = "kept"
    (tmp_path / "config.json").write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING):
        again = cls.from_pretrained(tmp_path)
    assert again.my_note == "kept"
    assert any("unknown key 'my_note'" in r.getMessage() for r in caplog.records)


@BOTH
def test_save_and_load_round_trip_without_warnings(cls, tmp_path, caplog):
    config = cls(**BASE[cls], pad_token_id=0, eos_token_id=2)
    model = (RatForCausalLM if cls is RatConfig else RxTForCausalLM)(config)
    model.register_for_auto_class("AutoModelForCausalLM")  # adds auto_map, as a Hub upload does
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert {"transformers_version", "architectures", "auto_map", "model_type"} <= set(saved)
    with caplog.at_level(logging.WARNING):
        loaded = [cls.from_pretrained(tmp_path), AutoConfig.from_pretrained(tmp_path),
                  cls.from_dict(config.to_dict()), cls.from_json_file(tmp_path / "config.json"),
                  cls.from_dict({**config.to_dict(), "torch_dtype": "float32", "_commit_hash": None})]
    assert not [r.getMessage() for r in caplog.records if "unknown key" in r.getMessage()]
    for again in loaded:
        for key in ("hidden_size", "num_attention_heads", "head_dim", "rope_parameters", "layer_types"):
            assert getattr(again, key) == getattr(config, key), key


def test_the_seed_names_still_build_the_same_config(caplog):
    with caplog.at_level(logging.WARNING):
        seed = RatConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, max_seq_len=64, dropout=0.1, mlp_ratio=4,
                         tie_weights=False, use_checkpointing=True)
    assert (seed.hidden_size, seed.num_hidden_layers, seed.num_attention_heads, seed.max_position_embeddings) == \
        (32, 2, 4, 64)
    assert seed.hidden_dropout == seed.attention_dropout == 0.1 and seed.intermediate_size == 256
    assert seed.tie_word_embeddings is False and seed.use_gradient_checkpointing is True
    assert not caplog.records


def test_an_odd_head_dim_is_legal_without_rope(tmp_path):
    config = RatConfig(**{**RAT, "head_dim": 7, "use_rope": False})
    assert config.head_dim == 7 and config.rope_parameters is None
    model = RatForCausalLM(config).eval()
    model.save_pretrained(tmp_path)  # transformers >= 5.24 validates RoPE again when saving
    again = RatForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 97, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits)
    assert model.model.layers[0].self_attn.q_proj.out_features == 4 * 7


@BOTH
def test_an_explicit_head_dim_may_differ_from_hidden_over_heads(cls):
    config = cls(**{**BASE[cls], "hidden_size": 30, "head_dim": 8})  # as Qwen3 / Gemma do
    assert config.head_dim == 8


@BOTH
def test_the_pre_5_rope_theta_key_is_honoured(cls):
    assert cls(**BASE[cls], rope_theta=500000.0).rope_parameters["rope_theta"] == 500000.0
    with pytest.raises(ValueError, match=rf"{cls.__name__}\.rope_theta=500000.0 is invalid: rope_parameters says"):
        cls(**BASE[cls], rope_theta=500000.0, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


# --- derived defaults follow the fields they derive from -------------------------------------------------------------
@pytest.mark.parametrize("heads, query, kv", [(8, 4, 2), (4, 2, 1), (2, 1, 1), (6, 3, 1), (10, 5, 1), (12, 6, 3),
                                              (16, 8, 4)])
def test_rxt_head_counts_follow_num_attention_heads(heads, query, kv):
    config = RxTConfig(num_attention_heads=heads, hidden_size=8 * heads)
    assert (config.num_query_heads, config.num_key_value_heads, config.head_dim) == (query, kv, 8)
    assert RxTConfig(num_attention_heads=heads, hidden_size=8 * heads, num_query_heads=1).num_key_value_heads == 1


def test_rxt_config_with_only_num_attention_heads_builds_and_runs():
    config = RxTConfig(num_attention_heads=4)  # raised about num_query_heads before
    assert (config.num_query_heads, config.num_key_value_heads, config.head_dim) == (2, 1, 64)
    small = RxTConfig(num_attention_heads=4, hidden_size=32, num_hidden_layers=1, stm_size=4, vocab_size=50)
    model = RxTForCausalLM(small).eval()
    with torch.no_grad():
        logits = model(torch.tensor([[3, 7, 9, 4]]), memory=model.init_memory(1)).logits
    assert logits.shape == (1, 4, 50) and torch.isfinite(logits).all()


def test_rxt_widths_and_depths_follow_what_they_derive_from():
    assert RxTConfig().intermediate_size == 768  # the documented 19.4M-parameter default is unchanged
    wide = RxTConfig(hidden_size=512)
    assert wide.intermediate_size == wide.encoder_intermediate_size == wide.moe_intermediate_size == 1536
    assert wide.head_dim == 64
    config = RxTConfig(intermediate_size=100, num_hidden_layers=3)
    assert config.encoder_intermediate_size == config.moe_intermediate_size == 100
    assert config.num_encoder_layers == 3 and config.layer_types == ["full_attention"] * 3
    explicit = RxTConfig(num_attention_heads=8, num_query_heads=2, num_key_value_heads=1, intermediate_size=64)
    assert (explicit.num_query_heads, explicit.num_key_value_heads, explicit.intermediate_size) == (2, 1, 64)


def test_rat_derived_defaults_follow_hidden_size_and_heads():
    config = RatConfig(hidden_size=512, num_attention_heads=8, num_hidden_layers=3)
    assert (config.head_dim, config.intermediate_size, config.policy_hidden_size) == (64, 2048, 64)
    assert config.num_key_value_heads == 8 and config.layer_types == ["hybrid"] * 3


# --- remote code ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["rat_hf/models/rat/configuration_rat.py", "rat_hf/models/rxt/configuration_rxt.py"])
def test_configuration_files_import_only_the_standard_library_and_transformers(path):
    source = (Path(__file__).resolve().parent.parent / path).read_text()
    roots = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import of {node.module}"
            roots.add(node.module.split(".")[0])
    assert roots - set(sys.stdlib_module_names) <= {"transformers"}, roots

