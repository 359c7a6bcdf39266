"""RxT: the shared causal-LM checks over a table of tiny configs (with a fixed, non-trivial memory), then what is
RxT's own: the memory, its update, the attention and memory-attention variants, MoE, LoRA and configs."""

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from rat_hf import RxTConfig, RxTForCausalLM, RxTModel
from rat_hf.models.rxt.modeling_rxt import RxTAttention, RxTMemoryAttentionLayer, RxTSparseMoeBlock

from causal_lm_checks import CausalLMChecks

TINY = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            num_query_heads=2, intermediate_size=64, stm_size=8, max_position_embeddings=64)
# The shared checks compare generations of fixed length, so their models never stop early: no EOS.
CHECKED = dict(TINY, eos_token_id=None)
CONFIGS = {
    # decoder GQA, encoder + memory SQA, the paper's gated self/interlayer memory attention, dynamic gates
    "gqa-gated_self_interlayer": dict(CHECKED),
    "mha-simple-static": dict(CHECKED, self_attention_variant="mha", cross_attention_variant="mha",
                              encoder_attention_variant="mha", memory_attention_variant="mha",
                              memory_attention_type="simple", memory_gate_type="static", memory_gate_init=1.0),
    "mqa-self": dict(CHECKED, self_attention_variant="mqa", cross_attention_variant="ssqa",
                     encoder_attention_variant="mqa", memory_attention_variant="ssqa", memory_attention_type="self"),
    # with a MoE decoder (top-2 of 4 experts)
    "sqa-interlayer-moe-untied": dict(CHECKED, self_attention_variant="sqa", cross_attention_variant="xsqa",
                                      encoder_attention_variant="xsqa", memory_attention_variant="xsqa",
                                      memory_attention_type="interlayer", num_encoder_layers=3,
                                      tie_word_embeddings=False, num_experts=4, num_experts_per_tok=2,
                                      moe_intermediate_size=32),
}

# The fixed memory of the shared checks: one random interaction read into the initial memory, the same for every row
# (the padding checks compare a batch row with that row run alone). Also written as one line for the remote process.
MEMORY_SEED, MEMORY_LENGTH = 1234, 12
REMOTE_MEMORY_SOURCE = (
    f"ids_ = torch.randint(3, model.config.vocab_size, (1, {MEMORY_LENGTH}), "
    f"generator=torch.Generator().manual_seed({MEMORY_SEED})); "
    "extra = {'memory': model.update_memory(model.init_memory(1), ids_).detach().expand(2, -1, -1, -1)}"
)


def fixed_memory(model, batch_size: int) -> torch.Tensor:
    ids = torch.randint(3, model.config.vocab_size, (1, MEMORY_LENGTH), generator=torch.Generator().manual_seed(MEMORY_SEED))
    with torch.no_grad():
        return model.update_memory(model.init_memory(1), ids).expand(batch_size, -1, -1, -1)


@pytest.fixture(params=list(CONFIGS), ids=list(CONFIGS))
def config(request):
    return RxTConfig(**CONFIGS[request.param])


class TestRxTCausalLM(CausalLMChecks):
    model_class = RxTForCausalLM

    def extra_inputs(self, model, batch_size: int) -> dict:
        return {"memory": fixed_memory(model, batch_size)}

    def remote_check_source(self) -> str:
        return REMOTE_MEMORY_SOURCE


# --- helpers ---------------------------------------------------------------------------------------------------------
def tiny_model(**overrides) -> RxTForCausalLM:
    torch.manual_seed(0)
    return RxTForCausalLM(RxTConfig(**{**TINY, **overrides})).eval()


def random_ids(batch: int, length: int, seed: int, vocab: int = 97) -> torch.Tensor:
    return torch.randint(5, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def read(model, memory, *turns) -> torch.Tensor:
    with torch.no_grad():
        for ids in turns:
            memory = model.update_memory(memory, ids)
    return memory


# --- registration and size -------------------------------------------------------------------------------------------
def test_auto_classes_resolve():
    config = AutoConfig.for_model("rxt", **TINY)
    assert isinstance(config, RxTConfig)
    assert isinstance(AutoModelForCausalLM.from_config(config), RxTForCausalLM)
    assert isinstance(AutoModel.from_config(config), RxTModel)


def test_default_config_is_a_small_model():
    with torch.device("meta"):
        count = RxTForCausalLM(RxTConfig()).num_parameters()
    assert 10e6 <= count <= 30e6
    from rat_hf.models.rxt import configuration_rxt

    assert f"{count:,}" in open(configuration_rxt.__file__).read(), count  # the docstring states the real count


# --- the memory ------------------------------------------------------------------------------------------------------
def test_memory_is_explicit_and_changes_after_an_update():
    model = tiny_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    memory = model.init_memory(3)
    assert memory.shape == (3, 2, 8, 32)
    before = memory.clone()
    updated = read(model, memory, random_ids(3, 10, seed=0))
    assert torch.equal(memory, before), "update_memory must not modify its input"
    assert (updated - memory).abs().amax(dim=(1, 2, 3)).min() > 1e-3  # every row moved
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items()), "no state on the module"
    # a batch size unrelated to anything at load time
    assert read(model, model.init_memory(5), random_ids(5, 4, seed=1)).shape == (5, 2, 8, 32)


def test_memory_is_used_and_the_same_history_reproduces_the_same_logits():
    model = tiny_model()
    query = random_ids(1, 6, seed=10)
    history_a = [random_ids(1, 12, seed=1), random_ids(1, 9, seed=2)]
    history_b = [random_ids(1, 12, seed=3), random_ids(1, 9, seed=4)]
    with torch.no_grad():
        logits_a = model(query, memory=read(model, model.init_memory(1), *history_a)).logits
        logits_a2 = model(query, memory=read(model, model.init_memory(1), *history_a)).logits
        logits_b = model(query, memory=read(model, model.init_memory(1), *history_b)).logits
    assert torch.equal(logits_a, logits_a2)
    assert (logits_a - logits_b).abs().max() > 1e-3


def test_no_memory_means_the_initial_memory():
    model = tiny_model()
    ids = random_ids(2, 7, seed=0)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, model(ids, memory=model.init_memory(2)).logits, atol=0, rtol=0)


def test_padding_does_not_change_the_memory_update():
    model = tiny_model()
    rows = [random_ids(1, 10, seed=0)[0], random_ids(1, 6, seed=1)[0]]
    memory = read(model, model.init_memory(2), random_ids(2, 8, seed=2))  # different rows
    alone = [read(model, memory[i : i + 1], row[None]) for i, row in enumerate(rows)]
    for side in ("left", "right"):
        batch = torch.zeros(2, 10, dtype=torch.long)
        mask = torch.zeros(2, 10, dtype=torch.long)
        for i, row in enumerate(rows):
            span = slice(10 - len(row), 10) if side == "left" else slice(0, len(row))
            batch[i, span], mask[i, span] = row, 1
        batch[mask == 0] = 7  # padding content must not matter either
        with torch.no_grad():
            padded = model.update_memory(memory, batch, mask)
        for i in range(2):
            torch.testing.assert_close(padded[i : i + 1], alone[i], atol=1e-5, rtol=0, msg=f"{side} row {i}")
    # a row with nothing to read keeps its memory
    with torch.no_grad():
        kept = model.update_memory(memory, batch, torch.stack([mask[0], torch.zeros_like(mask[1])]))
    assert torch.equal(kept[1], memory[1])


def test_generate_repeats_each_rows_memory_for_beams_and_return_sequences():
    """Per-row memories stay with their rows when generate expands the batch (memory is batch-first)."""
    model = tiny_model()
    ids = random_ids(2, 5, seed=0)
    memory = read(model, model.init_memory(2), random_ids(2, 9, seed=1))
    for kw in (dict(num_beams=3), dict(num_beams=3, num_return_sequences=2)):
        kw.update(max_new_tokens=4, do_sample=False, pad_token_id=0)
        batched = model.generate(ids, memory=memory, **kw)
        per_row = batched.shape[0] // 2
        for i in range(2):
            alone = model.generate(ids[i : i + 1], memory=memory[i : i + 1], **kw)
            assert torch.equal(batched[i * per_row : (i + 1) * per_row], alone), kw


def test_memory_keys_values_are_computed_once_per_turn(monkeypatch):
    model = tiny_model()
    calls = []
    original = type(model.model.layers[0]).memory_key_value
    monkeypatch.setattr(type(model.model.layers[0]), "memory_key_value",
                        lambda self, states: calls.append(1) or original(self, states))
    memory = read(model, model.init_memory(1), random_ids(1, 9, seed=1))
    ids = random_ids(1, 5, seed=0)
    model.generate(ids, memory=memory, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert len(calls) == model.config.num_hidden_layers  # the prompt step only
    calls.clear()
    model.generate(ids, memory=memory, max_new_tokens=6, do_sample=False, pad_token_id=0, use_cache=False)
    assert len(calls) == 6 * model.config.num_hidden_layers  # recomputed at every step without a cache
    calls.clear()
    model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)  # the initial memory, also once
    assert len(calls) == model.config.num_hidden_layers


def test_assisted_and_prompt_lookup_decoding_equal_greedy():
    """Speculative strategies crop and extend the cache; the memory's keys/values must stay right throughout."""
    model = tiny_model(eos_token_id=None)
    ids = random_ids(1, 8, seed=0)
    memory = read(model, model.init_memory(1), random_ids(1, 9, seed=1))
    kw = dict(memory=memory, max_new_tokens=8, do_sample=False, pad_token_id=0)
    greedy = model.generate(ids, **kw)
    assert torch.equal(model.generate(ids, prompt_lookup_num_tokens=3, **kw), greedy)
    assistant = tiny_model(eos_token_id=None, intermediate_size=32)
    assert torch.equal(model.generate(ids, assistant_model=assistant, **kw), greedy)


def test_a_batch_of_one_memory_is_broadcast_and_wrong_layouts_raise():
    model = tiny_model()
    ids = random_ids(3, 5, seed=0)
    memory = read(model, model.init_memory(1), random_ids(1, 9, seed=1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids, memory=memory).logits,
                                   model(ids, memory=memory.expand(3, -1, -1, -1)).logits, atol=1e-6, rtol=0)
        with pytest.raises(ValueError, match=r"memory must have shape \[batch=3, num_hidden_layers, stm_size"):
            model(ids, memory=model.init_memory(3).transpose(0, 1))  # layer-first
        with pytest.raises(ValueError, match="memory must have shape"):
            model.update_memory(model.init_memory(2), ids)


def test_cross_attentions_are_returned():
    model = RxTForCausalLM._from_config(RxTConfig(**TINY), attn_implementation="eager").eval()
    with torch.no_grad():
        out = model(random_ids(2, 7, seed=0), memory=model.init_memory(2), output_attentions=True)
    assert len(out.cross_attentions) == 2
    assert out.cross_attentions[0].shape == (2, 4, 7, 8)  # [B, query heads, tokens, slots]
    torch.testing.assert_close(out.cross_attentions[0].sum(-1), torch.ones(2, 4, 7))


def test_gradients_flow_through_the_memory_update():
    """Training through turns reaches the encoder, the memory attention and the initial memory."""
    model = tiny_model().train()
    memory = model.update_memory(model.init_memory(2), random_ids(2, 10, seed=0))
    query = random_ids(2, 6, seed=1)
    model(query, memory=memory, labels=query).loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    for part in ("model.encoder.layers.0.", "model.memory_attention.layers.1.", "model.memory_init", "model.layers.1.cross_attn"):
        assert any(n.startswith(part) for n in grads), part


def test_memory_carries_information_after_training():
    """End to end: a turn states a key, the next asks for it; only the memory can carry it across turns."""
    torch.manual_seed(0)
    model = RxTForCausalLM(RxTConfig(**{**TINY, "hidden_size": 64, "intermediate_size": 128})).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    q, a, eos = model.config.query_token_id, model.config.answer_token_id, model.config.eos_token_id

    def batch(n, seed):
        keys = torch.randint(10, 18, (n, 1), generator=torch.Generator().manual_seed(seed))
        first = torch.cat([torch.full((n, 1), q), keys, torch.full((n, 1), a), torch.full((n, 1), eos)], dim=1)
        second = torch.tensor([[q, 5, a]]).expand(n, -1)
        return first, torch.cat([second, keys], dim=1), keys[:, 0]

    for step in range(150):
        first, second, _ = batch(32, step)
        memory = model.update_memory(model.init_memory(32), first)
        labels = torch.full_like(second, -100)
        labels[:, -1] = second[:, -1]
        loss = model(second, memory=memory, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    first, second, keys = batch(64, 10_000)
    with torch.no_grad():
        memory = model.update_memory(model.init_memory(64), first)
        predicted = model(second[:, :-1], memory=memory).logits[:, -1].argmax(-1)
    assert (predicted == keys).float().mean() > 0.9  # chance is 1/8


# --- variants --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "variant, query_heads, kv_heads",
    [("mha", 8, 8), ("gqa", 8, 2), ("mqa", 8, 1), ("sqa", 4, 2), ("ssqa", 4, 4), ("xsqa", 2, 2)],
)
def test_attention_variants_build_what_they_name(variant, query_heads, kv_heads):
    config = RxTConfig(**{**TINY, "hidden_size": 64, "num_attention_heads": 8, "num_query_heads": 4,
                          "num_key_value_heads": 2, "self_attention_variant": variant, "cross_attention_variant": variant,
                          "encoder_attention_variant": variant, "memory_attention_variant": variant})
    model = RxTForCausalLM._from_config(config, attn_implementation="eager").eval()
    attentions = [m for m in model.modules() if isinstance(m, RxTAttention)]
    assert len(attentions) == 2 * 2 + 2 + 2 * 2  # decoder self+cross, encoder, memory stage + memory attention
    for attn in attentions:
        assert (attn.num_heads, attn.num_key_value_heads, attn.head_dim) == (query_heads, kv_heads, 8)
        assert attn.q_proj.out_features == attn.o_proj.in_features == query_heads * 8
        assert attn.k_proj.out_features == attn.v_proj.out_features == kv_heads * 8
    with torch.no_grad():
        out = model(random_ids(1, 5, seed=0), output_attentions=True)
    assert out.attentions[0].shape == (1, query_heads, 5, 5)


def test_rope_placement_per_component():
    model = tiny_model()
    layer = model.model.layers[0]
    memory_layer = model.model.memory_attention.layers[0]
    assert (layer.self_attn.rope_queries, layer.self_attn.rope_keys) == (True, True)
    assert (layer.cross_attn.rope_queries, layer.cross_attn.rope_keys) == (True, False)
    assert (memory_layer.attn.rope_queries, memory_layer.attn.rope_keys) == (False, True)
    assert not layer.cross_attn.is_causal and layer.self_attn.is_causal
    assert not model.model.encoder.layers[0].self_attn.is_causal


INTERACTION = random_ids(1, 8, seed=5)


def _layer_update(model, memory):
    """STM layer 0 after the whole update (encoder + memory-attention network) reads `INTERACTION`."""
    return read(model, memory, INTERACTION)[:, 0]


@pytest.mark.parametrize("kind", ["simple", "self", "interlayer", "gated_self_interlayer"])
def test_memory_attention_variants_build_what_they_name(kind):
    """Each type builds its own stage (the original silently built another for `interlayer`), and the update of one
    STM layer depends on the other layers exactly when the type is an interlayer one."""
    model = tiny_model(memory_attention_type=kind)
    layers = model.model.memory_attention.layers
    assert all(isinstance(l, RxTMemoryAttentionLayer) and l.memory_attention_type == kind for l in layers)
    layer = layers[0]
    assert hasattr(layer, "stm_attn") == (kind != "simple")
    assert hasattr(layer, "interlayer_layernorm") == ("interlayer" in kind)
    assert hasattr(layer, "self_interlayer_gate") == (kind == "gated_self_interlayer")

    memory = read(model, model.init_memory(1), random_ids(1, 9, seed=1))
    other = memory.clone()
    other[:, 1] += torch.randn_like(other[:, 1])  # change only STM layer 1
    depends_on_other_layers = not torch.equal(_layer_update(model, memory), _layer_update(model, other))
    assert depends_on_other_layers == ("interlayer" in kind)
    slots = memory.clone()
    slots[:, 0, 0] += 1.0  # change slot 0 of layer 0: a first stage lets slot 1 see it; without one, slots are apart
    slot_1_moved = not torch.allclose(_layer_update(model, memory)[:, 1], _layer_update(model, slots)[:, 1])
    assert slot_1_moved == (kind != "simple")


def _attention_update(model, memory):
    """Layer 0's memory-attention update (before its gate) of `memory` reading `INTERACTION`."""
    layer = model.model.memory_attention.layers[0]
    encoded = model.encode(INTERACTION)[model.config.encoder_layer_for_memory_layer(0)]
    position_embeddings = model.model.rotary_emb(encoded, torch.arange(8)[None])
    update, _ = layer.attn(layer.query_layernorm(memory[:, 0]), position_embeddings, None,
                           key_value_states=layer.encoded_layernorm(encoded))
    return update


@pytest.mark.parametrize("gate_type", ["static", "dynamic"])
def test_residual_gate_interpolates_old_and_update(gate_type):
    model = tiny_model(memory_attention_type="simple", memory_gate_type=gate_type, memory_residual="interpolate")
    memory = read(model, model.init_memory(1), random_ids(1, 9, seed=1))
    gate = model.model.memory_attention.layers[0].gate
    logit = gate.gate_logits if gate_type == "static" else gate.gate_logit_proj.bias
    assert logit.shape[-1] == 1
    torch.testing.assert_close(logit, torch.zeros_like(logit))  # memory_gate_init=0.0 -> G = 0.5 at init
    with torch.no_grad():
        logit.fill_(-30.0)  # G ~ 0: the memory stays
        if gate_type == "dynamic":
            gate.gate_logit_proj.weight.zero_()
        torch.testing.assert_close(_layer_update(model, memory), memory[:, 0], atol=1e-6, rtol=0)
        logit.fill_(30.0)  # G ~ 1: the memory becomes the attention update
        torch.testing.assert_close(_layer_update(model, memory), _attention_update(model, memory), atol=1e-6, rtol=0)


@pytest.mark.parametrize("gate_type", ["static", "dynamic"])
def test_decoupled_gates_keep_and_write(gate_type):
    """The default residual: `K * old + W * update`, both gates starting at sigmoid(3) = 0.95."""
    model = tiny_model(memory_attention_type="simple", memory_gate_type=gate_type)
    memory = read(model, model.init_memory(1), random_ids(1, 9, seed=1))
    gate = model.model.memory_attention.layers[0].gate
    logits = gate.gate_logits if gate_type == "static" else gate.gate_logit_proj.bias  # [..., (keep, write)]
    torch.testing.assert_close(logits, torch.full_like(logits, 3.0))
    with torch.no_grad():
        if gate_type == "dynamic":
            gate.gate_logit_proj.weight.zero_()
        update = _attention_update(model, memory)
        for keep, write, expected in ((30.0, 30.0, memory[:, 0] + update), (30.0, -30.0, memory[:, 0]),
                                      (-30.0, 30.0, update), (-30.0, -30.0, torch.zeros_like(update))):
            logits[..., 0], logits[..., 1] = keep, write
            torch.testing.assert_close(_layer_update(model, memory), expected, atol=1e-5, rtol=0)


def test_encoder_depth_maps_onto_memory_layers():
    assert [RxTConfig(**TINY, num_encoder_layers=4).encoder_layer_for_memory_layer(i) for i in range(2)] == [1, 3]
    assert [RxTConfig(**TINY, num_encoder_layers=1).encoder_layer_for_memory_layer(i) for i in range(2)] == [0, 0]
    model = tiny_model(num_encoder_layers=5)
    assert len(model.model.encoder.layers) == 5 and len(model.encode(random_ids(1, 4, seed=0))) == 5
    assert model.model.memory_attention.encoder_layer_ids == [1, 4]


# --- MoE ---------------------------------------------------------------------------------------------------------------
def test_moe_routes_top_k_and_adds_the_load_balancing_loss():
    model = tiny_model(num_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.5).train()
    assert all(isinstance(layer.mlp, RxTSparseMoeBlock) for layer in model.model.layers)
    ids = random_ids(2, 9, seed=0)
    out = model(ids, labels=ids)
    assert len(out.router_logits) == 2 and out.router_logits[0].shape == (18, 4)
    lm_loss = model.loss_function(logits=out.logits, labels=ids, vocab_size=97)
    torch.testing.assert_close(out.loss, lm_loss + 0.5 * out.aux_loss)
    assert 2.0 - 1e-4 <= out.aux_loss.item() < 2.0 * 4  # top_k when balanced, up to top_k * E when collapsed
    out.loss.backward()
    experts_with_grad = sum(
        e.down_proj.weight.grad is not None and e.down_proj.weight.grad.abs().sum() > 0
        for e in model.model.layers[0].mlp.experts
    )
    assert experts_with_grad >= 2
    assert model.model.layers[0].mlp.router.weight.grad.abs().sum() > 0


def test_dense_decoder_has_no_aux_loss():
    model = tiny_model()
    ids = random_ids(1, 5, seed=0)
    out = model(ids, labels=ids)
    assert out.aux_loss is None and out.router_logits is None


# --- PEFT ----------------------------------------------------------------------------------------------------------------
def test_lora_on_the_decoder_trains_and_merges():
    peft = pytest.importorskip("peft")
    model = tiny_model()
    memory = read(model, model.init_memory(2), random_ids(2, 9, seed=1))
    decoder_only = r"model\.layers\.\d+\.(self_attn|cross_attn|mlp)\.(q|k|v|o|gate|up|down)_proj"
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=decoder_only,
                                                      init_lora_weights=False))
    adapted_names = [n for n, _ in lora.named_modules() if n.endswith("lora_A")]
    assert adapted_names and all(".model.layers." in n for n in adapted_names)
    assert any(".cross_attn." in n for n in adapted_names)
    ids = random_ids(2, 10, seed=2)
    optimizer = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    lora.train()
    for _ in range(3):
        lora(input_ids=ids, labels=ids, memory=memory).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    lora.eval()
    with torch.no_grad():
        adapted = lora(input_ids=ids, memory=memory).logits
        generated = lora.generate(input_ids=ids, memory=memory, max_new_tokens=4, do_sample=False, pad_token_id=0)
        # the encoder and the memory attention are untouched: the memory update is the same as before
        torch.testing.assert_close(read(lora, model.init_memory(2), random_ids(2, 9, seed=1)), memory, atol=0, rtol=0)
        merged = lora.merge_and_unload()
        assert isinstance(merged, RxTForCausalLM)
        torch.testing.assert_close(merged(input_ids=ids, memory=memory).logits, adapted, atol=1e-5, rtol=1e-5)
    assert generated.shape == (2, 14)


# --- configs -------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(self_attention_variant="bogus"), "self_attention_variant"),
        (dict(memory_attention_variant="sqa", num_query_heads=4), "num_query_heads"),  # SQA needs fewer query heads
        (dict(encoder_attention_variant="sqa", num_query_heads=3, num_key_value_heads=2), "num_key_value_heads"),
        (dict(cross_attention_variant="gqa", num_key_value_heads=3), "num_key_value_heads"),
        (dict(num_attention_heads=6, hidden_size=48, cross_attention_variant="xsqa"), "num_attention_heads"),
        (dict(memory_attention_type="interlayer_gated"), "memory_attention_type"),
        (dict(memory_gate_type="elementwise"), "memory_gate_type"),
        (dict(stm_size=0), "stm_size"),
        (dict(num_experts=2, num_experts_per_tok=3), "num_experts_per_tok"),
        (dict(num_experts=-1), "num_experts"),
        (dict(query_token_id=97), "query_token_id"),
        (dict(answer_token_id=3), "answer_token_id"),
        (dict(hidden_dropout=1.0), "hidden_dropout"),
        (dict(head_dim=7), "head_dim"),
        (dict(layer_types=["full_attention", "sliding_attention"]), "layer_types"),
    ],
)
def test_bad_configs_raise_clear_errors(kwargs, field):
    with pytest.raises(ValueError, match=rf"RxTConfig\.{field}=.* is invalid: "):
        RxTConfig(**{**TINY, **kwargs})


def test_config_round_trips_through_dict():
    config = RxTConfig(**CONFIGS["sqa-interlayer-moe-untied"])
    again = RxTConfig.from_dict(config.to_dict())
    assert again.to_dict() == config.to_dict()
    assert again.attention_heads("xsqa") == (1, 1) and again.attention_heads("sqa") == (2, 2)


def test_peft_default_target_modules():
    """`LoraConfig(task_type="CAUSAL_LM")` with no `target_modules` works for `rxt` (Llama's defaults: q_proj, v_proj)."""
    peft = pytest.importorskip("peft")
    lora = peft.get_peft_model(tiny_model(), peft.LoraConfig(task_type="CAUSAL_LM", r=4))
    adapted = {n.rsplit(".lora_A", 1)[0].rsplit(".", 1)[-1] for n, _ in lora.named_parameters() if ".lora_A" in n}
    assert adapted == {"q_proj", "v_proj"}


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_tensor_parallel_plan_covers_every_decoder_projection(moe):
    """`tp_plan="auto"` shards what the plan names: every decoder Linear but the MoE router must match a pattern (the
    plan used to name `mlp.gate_proj`, which matches nothing in the MoE decoder's `mlp.experts.*`)."""
    import re

    config = RxTConfig(**TINY, **(dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32) if moe else {}))
    model = RxTModel(config)
    patterns = [re.compile(re.escape(key).replace(r"\*", r"\d+") + "$") for key in config.base_model_tp_plan]
    for name, module in model.layers.named_modules(prefix="layers"):
        if isinstance(module, torch.nn.Linear) and not name.endswith("router"):
            assert any(p.match(name) for p in patterns), f"{name} is not in base_model_tp_plan"
