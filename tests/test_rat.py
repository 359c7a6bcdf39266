"""RAT: the shared causal-LM checks over a table of tiny configs, then what is RAT's own."""

import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

from rat_hf import PRESETS, RatConfig, RatForCausalLM, RatForSequenceClassification
from rat_hf.models.rat.modeling_rat import RatPolicyGate

from causal_lm_checks import CausalLMChecks

TINY = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64)
CONFIGS = {
    "mha-soft": dict(TINY),
    "gqa-soft": dict(TINY, num_key_value_heads=2),
    "one-policy": dict(TINY, n_policies=1),
    "reinforce": dict(TINY, gating_mode="reinforce", n_policies=3, conv_kernel_size=4),
    "nope-untied": dict(TINY, use_rope=False, tie_word_embeddings=False),
    "query-gates-gqa": dict(TINY, head_gate_target="query", num_key_value_heads=2),  # the seed's gate form
    "no-conv-no-gates": dict(TINY, use_temporal_conv=False, gating_mode="none"),  # the ablation's switches
}


@pytest.fixture(params=list(CONFIGS), ids=list(CONFIGS))
def config(request):
    return RatConfig(**CONFIGS[request.param])


class TestRatCausalLM(CausalLMChecks):
    model_class = RatForCausalLM


def tiny_model(**overrides):
    torch.manual_seed(0)
    return RatForCausalLM(RatConfig(**{**TINY, **overrides}))


def test_auto_classes_resolve():
    config = AutoConfig.for_model("rat", **TINY)
    assert isinstance(AutoModelForCausalLM.from_config(config), RatForCausalLM)
    assert isinstance(AutoModelForSequenceClassification.from_config(config), RatForSequenceClassification)


def test_uniform_gating_is_one():
    """A policy net that outputs equal logits gates every head by exactly 1 (the seed's softmax gave 1/H)."""
    config = RatConfig(**TINY)
    gate = RatPolicyGate(config)
    torch.nn.init.zeros_(gate.policy_out_weight)
    torch.nn.init.zeros_(gate.policy_out_bias)
    gates, _ = gate(torch.randn(2, 5, config.hidden_size))
    torch.testing.assert_close(gates, torch.ones(2, 5, config.num_attention_heads))


def test_training_steps_change_parameters_and_lower_loss():
    model = tiny_model().train()
    ids = torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(0))
    before = copy.deepcopy(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
    changed = [n for n, p in model.state_dict().items() if not torch.equal(p, before[n])]
    assert any("gate.selector" in n for n in changed) and any("q_proj" in n for n in changed)


def test_reinforce_loss_reaches_only_the_selector():
    model = tiny_model(gating_mode="reinforce", policy_loss_coef=1.0).train()
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=ids, labels=ids)
    assert out.policy_loss is not None and out.lm_loss is not None
    torch.testing.assert_close(out.loss, out.lm_loss + out.policy_loss)
    out.policy_loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad, "the policy loss must train the selectors"
    assert all(".gate.selector_" in n for n in with_grad), sorted(with_grad)
    # ... and the LM loss never reaches the selectors (they choose by sampling)
    model.zero_grad()
    model(input_ids=ids, labels=ids).lm_loss.backward()
    selector_grads = [p.grad for n, p in model.named_parameters() if ".gate.selector_" in n]
    assert all(g is None or g.abs().sum() == 0 for g in selector_grads)


def test_reinforce_eval_is_deterministic_expectation():
    model = tiny_model(gating_mode="reinforce").eval()
    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        a, b = model(input_ids=ids, labels=ids), model(input_ids=ids, labels=ids)
    assert torch.equal(a.logits, b.logits) and a.policy_loss is None
    assert a.gate_entropy.shape == (2,) and a.policy_usage.shape == (2, 3)
    torch.testing.assert_close(a.policy_usage.sum(-1), torch.ones(2))


def test_lm_loss_matches_standard_loss_in_reinforce_mode():
    model = tiny_model(gating_mode="reinforce").train()
    ids = torch.randint(0, 97, (2, 12))
    labels = ids.clone()
    labels[0, :3] = -100
    torch.manual_seed(3)
    out = model(input_ids=ids, labels=labels)
    expected = model.loss_function(logits=out.logits, labels=labels, vocab_size=97)
    torch.testing.assert_close(out.lm_loss, expected)


def test_seed_style_config_builds_the_same_model():
    seed = RatConfig(vocab_size=30000, d_model=512, n_layers=6, n_heads=8, n_policies=3, max_seq_len=2048, dropout=0.1,
                     mlp_ratio=4, use_rope=True, tie_weights=True, use_checkpointing=False)
    ours = RatConfig(vocab_size=30000, hidden_size=512, num_hidden_layers=6, num_attention_heads=8, n_policies=3,
                     max_position_embeddings=2048, hidden_dropout=0.1, attention_dropout=0.1, intermediate_size=2048,
                     use_rope=True, tie_word_embeddings=True, use_gradient_checkpointing=False)
    assert seed.to_dict() == ours.to_dict()
    torch.manual_seed(0)
    a = RatForCausalLM(seed)
    torch.manual_seed(0)
    b = RatForCausalLM(ours)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_seed_checkpointing_flag_enables_gradient_checkpointing():
    model = RatForCausalLM(RatConfig(**TINY, use_checkpointing=True))
    assert model.is_gradient_checkpointing


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(hidden_size=30, num_attention_heads=4, head_dim=None, num_key_value_heads=3), "num_attention_heads"),
        (dict(gating_mode="hard"), "gating_mode"),
        (dict(n_policies=0), "n_policies"),
        (dict(n_policies=1, gating_mode="reinforce"), "n_policies"),
        (dict(conv_kernel_size=1), "conv_kernel_size"),
        (dict(hidden_dropout=1.5), "hidden_dropout"),
        (dict(vocab_size=-3), "vocab_size"),
        (dict(layer_types=["full_attention", "hybrid"]), "layer_types"),
        (dict(policy_discount=0.0), "policy_discount"),
        (dict(head_gate_target="scores"), "head_gate_target"),
    ],
)
def test_bad_configs_raise_clear_errors(kwargs, field):
    with pytest.raises(ValueError, match=rf"RatConfig\.{field}="):
        RatConfig(**{**TINY, **kwargs})


def test_unknown_preset_raises():
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        RatConfig.from_preset("huge")


def test_preset_parameter_counts_match_docstring():
    from rat_hf.models.rat import configuration_rat

    source = open(configuration_rat.__file__).read()
    with torch.device("meta"):
        for name in PRESETS:
            count = RatForCausalLM(RatConfig.from_preset(name)).num_parameters()
            assert f"# {count:,} parameters" in source, (name, count)


def test_lora_trains_and_merges():
    peft = pytest.importorskip("peft")
    model = tiny_model()
    lora = peft.get_peft_model(
        model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                    "up_proj", "down_proj"], init_lora_weights=False)
    )
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    ids = torch.randint(0, 97, (2, 10))
    opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    before = {n: p.detach().clone() for n, p in lora.named_parameters() if p.requires_grad}
    lora.train()
    for _ in range(3):
        lora(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    assert any(not torch.equal(p, before[n]) for n, p in lora.named_parameters() if p.requires_grad)
    lora.eval()
    with torch.no_grad():
        adapted = lora(input_ids=ids).logits
        merged = lora.merge_and_unload()
        assert isinstance(merged, RatForCausalLM)
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted, atol=1e-5, rtol=1e-5)


def test_sequence_classification_head():
    torch.manual_seed(0)
    model = RatForSequenceClassification(RatConfig(**TINY, num_labels=1, pad_token_id=0)).eval()
    ids = torch.randint(3, 97, (2, 7))
    ids[1, 5:] = 0  # right padding: the score is read at the last real token
    out = model(input_ids=ids)
    assert out.logits.shape == (2, 1)
    with torch.no_grad():
        alone = model(input_ids=ids[1:, :5]).logits
    torch.testing.assert_close(out.logits[1:], alone, atol=1e-5, rtol=0)


def test_torch_compile_matches_eager():
    model = tiny_model().eval()
    ids = torch.randint(0, 97, (2, 8))
    with torch.no_grad():
        eager = model(input_ids=ids).logits
        compiled = torch.compile(model, backend="eager", fullgraph=False)(input_ids=ids).logits
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=0)


@pytest.mark.parametrize("task_type", ["CAUSAL_LM", "SEQ_CLS"])
def test_peft_default_target_modules(task_type):
    """`LoraConfig(task_type=...)` with no `target_modules` works for `rat`, as for Llama (defaults: q_proj, v_proj)."""
    peft = pytest.importorskip("peft")
    model = tiny_model() if task_type == "CAUSAL_LM" else RatForSequenceClassification(RatConfig(**TINY, num_labels=2))
    lora = peft.get_peft_model(model, peft.LoraConfig(task_type=task_type, r=4))
    adapted = {n.rsplit(".lora_A", 1)[0].rsplit(".", 1)[-1] for n, _ in lora.named_parameters() if ".lora_A" in n}
    assert adapted == {"q_proj", "v_proj"}
    if task_type == "SEQ_CLS":  # the new head trains too
        assert any("score" in n and p.requires_grad for n, p in lora.named_parameters())


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_reinforce_selectors_get_gradients_under_gradient_checkpointing(use_reentrant):
    """The sampled log-prob leaves each checkpointed layer as a top-level tensor, so reentrant checkpointing keeps it."""
    model = tiny_model(gating_mode="reinforce").train()
    if hasattr(model, "activation_checkpointing_enable"):  # the name from transformers 5.2x (the old one warns)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    ids = torch.randint(3, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    selector = [p for n, p in model.named_parameters() if "gate.selector" in n]
    assert selector and all(p.grad is not None and p.grad.abs().sum() > 0 for p in selector)


def test_reinforce_classifier_gates_by_expectation_and_trains_its_selectors():
    """No per-token reward in a classifier: it gates by the selector's expectation (deterministic in train mode) and
    its selectors learn from the classification loss instead of being sampled with no policy loss."""
    torch.manual_seed(0)
    model = RatForSequenceClassification(RatConfig(**TINY, gating_mode="reinforce", num_labels=2, pad_token_id=0))
    model.train()
    ids = torch.randint(3, 97, (2, 9))
    first, second = model(input_ids=ids).logits, model(input_ids=ids).logits
    torch.testing.assert_close(first, second, atol=0, rtol=0)
    model(input_ids=ids, labels=torch.tensor([0, 1])).loss.backward()
    selector = [p for n, p in model.named_parameters() if "gate.selector" in n]
    assert selector and all(p.grad is not None and p.grad.abs().sum() > 0 for p in selector)


def test_packed_rows_equal_separate_rows_in_training_mode_with_reinforce_off():
    """Packed == separate for the training loss too (the convolution restarts at each document)."""
    model = tiny_model(conv_kernel_size=4).eval()
    docs = [torch.randint(3, 97, (n,), generator=torch.Generator().manual_seed(n)) for n in (5, 2, 8)]
    packed = torch.cat(docs)[None]
    position_ids = torch.cat([torch.arange(len(d)) for d in docs])[None]
    labels = torch.cat([torch.cat([d[:1].new_full((1,), -100), d[1:]]) for d in docs])[None]  # no cross-document target
    with torch.no_grad():
        packed_loss = model(input_ids=packed, position_ids=position_ids, labels=labels).loss
        token_losses = [model(input_ids=d[None], labels=d[None]).loss * (len(d) - 1) for d in docs]
    torch.testing.assert_close(packed_loss, sum(token_losses) / sum(len(d) - 1 for d in docs), atol=1e-5, rtol=0)


def test_sft_trainer_packing_equals_separate_documents(tmp_path):
    """TRL's `SFTTrainer(packing=True)` batches: each document's logits inside the packed row equal it alone."""
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    model = tiny_model(conv_kernel_size=4)
    docs = [[int(t) for t in torch.randint(3, 97, (n,), generator=torch.Generator().manual_seed(n))] for n in (6, 3, 9, 4)]
    dataset = datasets.Dataset.from_dict({"input_ids": docs})
    args = trl.SFTConfig(output_dir=str(tmp_path), packing=True, max_length=32, per_device_train_batch_size=1,
                         max_steps=1, report_to=[], use_cpu=True, bf16=False, dataset_num_proc=None)
    from rat_hf.tokenization import train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(["a tiny text for a tiny tokenizer"] * 4, vocab_size=300)  # collation needs one
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    assert "position_ids" in batch and (batch["position_ids"][0] == 0).sum() > 1, "expected several packed documents"
    model.eval()
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [batch["input_ids"].shape[1]]
    for start, end in zip(starts[:-1], starts[1:]):
        with torch.no_grad():
            alone = model(input_ids=batch["input_ids"][:, start:end]).logits[0]
        torch.testing.assert_close(packed[start:end], alone, atol=2e-5, rtol=0)
    trainer.train()  # and it trains on such batches


def test_classifier_trains_with_trainer_on_a_dataset(tmp_path):
    """`Trainer` keeps only the columns `forward`'s signature names (`remove_unused_columns`): the classifier's forward
    must keep `input_ids`/`labels` in its signature."""
    datasets = pytest.importorskip("datasets")
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    model = RatForSequenceClassification(RatConfig(**TINY, gating_mode="reinforce", num_labels=2, pad_token_id=0))
    rows = torch.randint(3, 97, (8, 6), generator=torch.Generator().manual_seed(0)).tolist()
    dataset = datasets.Dataset.from_dict({"input_ids": rows, "labels": [i % 2 for i in range(8)], "text": ["x"] * 8})
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, report_to=[],
                             use_cpu=True, save_strategy="no", learning_rate=1e-2)
    Trainer(model=model, args=args, train_dataset=dataset).train()
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    assert not unchanged, unchanged
