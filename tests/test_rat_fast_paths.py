"""RAT's fast paths compute exactly what the plain ones do: fused projections, the checkpointed conv branch, and the
full-graph compile that `_can_compile_fullgraph = True` declares (dynamo only, on the CPU: the graph, not the kernels).
"""

import pytest
import torch
from transformers import CompileConfig

import rat_hf.models.rat.modeling_rat as modeling_rat
from rat_hf import RatConfig, RatForCausalLM

TINY = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny_model(**overrides) -> RatForCausalLM:
    torch.manual_seed(0)
    return RatForCausalLM(RatConfig(**{**TINY, **overrides}))


def packed_batch():
    ids = torch.randint(3, 97, (2, 24), generator=torch.Generator().manual_seed(1))
    positions = torch.cat([torch.arange(15), torch.arange(9)])[None].expand(2, -1)  # two documents per row
    return ids, positions


def loss_and_grads(model, ids, positions):
    model.zero_grad()
    out = model(input_ids=ids, position_ids=positions, labels=ids)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("overrides", [{}, dict(gating_mode="reinforce"), dict(head_gate_target="query")])
def test_fused_projections_equal_each_module_run_alone(overrides):
    """A no-op hook on every projection makes each run its own forward: same loss and gradients as the fused GEMMs."""
    ids, positions = packed_batch()
    model = tiny_model(**overrides).train()
    torch.manual_seed(5)  # reinforce samples policies: same draws in both runs
    fused_loss, fused_grads = loss_and_grads(model, ids, positions)
    calls = []
    for name, module in model.named_modules():
        if name.endswith(("q_proj", "k_proj", "v_proj", "policy_in", "selector_in", "gate_proj", "up_proj")):
            module.register_forward_hook(lambda mod, args, out: calls.append(mod))
    torch.manual_seed(5)
    plain_loss, plain_grads = loss_and_grads(model, ids, positions)
    assert calls, "the hooked modules must run their own forward (nothing bypasses a hook)"
    torch.testing.assert_close(fused_loss, plain_loss, atol=1e-6, rtol=1e-6)
    assert fused_grads.keys() == plain_grads.keys()
    for name in fused_grads:
        torch.testing.assert_close(fused_grads[name], plain_grads[name], atol=1e-6, rtol=1e-5, msg=name)


def test_lora_adapters_are_applied_not_bypassed_by_the_fused_gemm():
    peft = pytest.importorskip("peft")
    ids, _ = packed_batch()
    model = tiny_model().eval()
    with torch.no_grad():
        base = model(input_ids=ids).logits
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"],
                                                      init_lora_weights=False))
    with torch.no_grad():
        adapted = lora(input_ids=ids).logits
        with lora.disable_adapter():
            disabled = lora(input_ids=ids).logits
        merged = lora.merge_and_unload()(input_ids=ids).logits  # plain Linears again: the fused path
    assert (adapted - base).abs().max() > 1e-3  # the adapters change the output
    torch.testing.assert_close(disabled, base, atol=1e-6, rtol=0)
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=0)


@pytest.mark.parametrize("overrides", [{}, dict(gating_mode="reinforce", conv_kernel_size=4)])
def test_checkpointed_conv_branch_gives_bit_identical_gradients(overrides, monkeypatch):
    ids, positions = packed_batch()
    attention_mask = torch.ones_like(ids)
    attention_mask[1, :5] = 0  # a padded row too
    results = []
    for checkpointed in (False, True):
        monkeypatch.setattr(modeling_rat, "_CHECKPOINT_CONV_BRANCH", checkpointed)
        model = tiny_model(**overrides).train()
        torch.manual_seed(3)
        results.append(loss_and_grads(model, ids, positions))
        torch.manual_seed(3)
        model.zero_grad()
        model(input_ids=ids, attention_mask=attention_mask, labels=ids).loss.backward()
        results.append((None, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    for plain, checkpointed in ((results[0], results[2]), (results[1], results[3])):
        assert plain[1].keys() == checkpointed[1].keys()
        for name in plain[1]:
            assert torch.equal(plain[1][name], checkpointed[1][name]), name


def test_checkpointed_conv_branch_saves_fewer_activations(monkeypatch):
    """What backward keeps alive: measured as the bytes of the saved tensors' storages, outer and checkpointed."""
    ids, positions = packed_batch()
    saved = {}
    for checkpointed in (False, True):
        monkeypatch.setattr(modeling_rat, "_CHECKPOINT_CONV_BRANCH", checkpointed)
        model = tiny_model(hidden_size=64, intermediate_size=64, vocab_size=17).train()
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids % 17, position_ids=positions, labels=ids % 17).loss.backward()
        saved[checkpointed] = sum(storages.values())
    assert saved[True] < 0.85 * saved[False], saved


@pytest.mark.parametrize("overrides", [{}, dict(head_gate_target="query", num_key_value_heads=2),
                                       dict(use_temporal_conv=False, gating_mode="none")])
def test_static_cache_generate_compiles_as_one_graph_and_matches_eager_logits(overrides):
    """`generate(cache_implementation="static")` with `fullgraph=True` (any graph break raises), logits at every step
    equal to the eager dynamic-cache run's."""
    torch._dynamo.reset()
    model = tiny_model(**overrides).eval()
    ids = torch.randint(3, 97, (2, 6), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, output_logits=True,
                  return_dict_in_generate=True, pad_token_id=0)
    eager = model.generate(**kwargs)
    compile_config = CompileConfig(fullgraph=True, backend="eager", dynamic=False)
    compile_config._compile_all_devices = True  # generate compiles on accelerators only by default
    compiled = model.generate(**kwargs, cache_implementation="static", compile_config=compile_config)
    assert len(compiled.logits) == len(eager.logits) == 5
    for step, (a, b) in enumerate(zip(compiled.logits, eager.logits)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=f"step {step}")


@pytest.mark.parametrize("overrides", [{}, dict(use_temporal_conv=False, gating_mode="none")])
def test_training_forward_and_backward_compile_as_one_graph(overrides):
    torch._dynamo.reset()
    ids, positions = packed_batch()
    model = tiny_model(**overrides).train()
    eager_loss, eager_grads = loss_and_grads(model, ids, positions)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    model.zero_grad()
    loss = compiled(input_ids=ids, position_ids=positions, labels=ids).loss
    loss.backward()
    torch.testing.assert_close(loss.detach(), eager_loss, atol=1e-5, rtol=1e-5)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, atol=1e-5, rtol=1e-4, msg=name)


def test_ablation_switches_remove_their_modules():
    full = tiny_model()
    bare = tiny_model(use_temporal_conv=False, gating_mode="none")
    names = {n for n, _ in bare.named_parameters()}
    assert not any("temporal_conv" in n or "conv_layernorm" in n or ".gate." in n for n in names)
    assert sum(p.numel() for p in bare.parameters()) < sum(p.numel() for p in full.parameters())
    out = bare(input_ids=torch.randint(0, 97, (1, 5)), labels=torch.randint(0, 97, (1, 5)))
    assert out.gates is None if hasattr(out, "gates") else out.gate_deviation is None
