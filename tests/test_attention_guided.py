"""Attention-guided curriculum: the probe on every layout, the policy, the reward, REINFORCE pieces, exact resume."""

import json
import math
import random

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AttentionInterface, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from rat_hf import RatConfig, RatForCausalLM
from rat_hf.curriculum import AttentionGuidedConfig, AttentionGuidedTrainer, AttentionProbe, DefineRecallPools, collate
from rat_hf.curriculum.policy import (assemble, categorical_kl, choice_probs, group_advantages, keep_top,
                                      order_log_probs, rollout, sequence_reward)

SRC = DefineRecallPools(symbols_per_pool=2, num_symbols=8, num_codes=8)
V = SRC.vocab_size


def _rat():
    return RatForCausalLM(RatConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, intermediate_size=64))


def _llama():
    return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def _gpt2():
    return GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64))


def _rxt():
    from rat_hf import RxTConfig, RxTForCausalLM

    return RxTForCausalLM(RxTConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=64, stm_size=4))


BUILDERS = {"rat": (_rat, ["q_proj", "k_proj", "v_proj"]), "llama_gqa": (_llama, ["q_proj", "k_proj", "v_proj"]),
            "gpt2_fused": (_gpt2, ["c_attn"]), "rxt": (_rxt, ["q_proj", "k_proj", "v_proj"])}


def _lora(model, targets):
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    with torch.no_grad():  # make the adapter matter: LoRA's B starts at zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    return model.eval()


def _inputs(model, b=2, t=7):
    from rat_hf.curriculum.policy import model_inputs

    ids = torch.randint(4, V, (b, t), generator=torch.Generator().manual_seed(0))
    return model_inputs(model, ids, torch.ones_like(ids), torch.arange(t).expand(b, t))


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_probe_matches_the_attention_it_reads(arch):
    torch.manual_seed(0)
    build, targets = BUILDERS[arch]
    model = _lora(build(), targets)
    probe = AttentionProbe(model)
    seen = {}

    def capture(module, query, key, value, attention_mask, **kwargs):
        if module is probe.module:
            seen["q"], seen["k"] = query.detach().clone(), key.detach().clone()
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("ag_capture", capture)
    config = model.get_base_model().config
    old = config._attn_implementation
    config._attn_implementation = "ag_capture"
    try:
        inputs = _inputs(model)
        with torch.no_grad():
            model(**inputs)
            q, k = probe.query_key(**inputs)
    finally:
        config._attn_implementation = old
    assert "q" in seen, f"{arch}: the probe's module {probe.name} never ran attention"
    assert q.shape == seen["q"].shape and k.shape == seen["k"].shape
    torch.testing.assert_close(q, seen["q"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(k, seen["k"], rtol=1e-5, atol=1e-6)
    if arch == "llama_gqa":
        assert (probe.num_heads, probe.num_key_value_heads, probe.head_dim) == (4, 2, 8)
    with model.disable_adapter(), torch.no_grad():
        q0, _ = probe.query_key(**inputs)
    assert not torch.allclose(q0, q), "LoRA must change the probed query"


def test_probe_error_for_an_unknown_layout():
    class Fused(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv_proj = torch.nn.Linear(8, 24)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = Fused()
            self.config = LlamaConfig(hidden_size=8, num_attention_heads=2)

    with pytest.raises(ValueError, match="no self-attention module with q_proj/k_proj or a fused c_attn"):
        AttentionProbe(Model())


def test_choice_probs_masks_chosen_keys_and_groups_heads():
    g = torch.Generator().manual_seed(0)
    q, keys = torch.randn(3, 4, 8, generator=g), torch.randn(3, 5, 2, 8, generator=g)  # H=4 over Hkv=2
    available = torch.tensor([[1, 0, 1, 1, 0], [1, 1, 1, 1, 1], [0, 0, 0, 1, 0]], dtype=torch.bool)
    probs = choice_probs(q, keys, available, temperature=0.7)
    assert torch.all(probs[~available] == 0) and torch.allclose(probs.sum(-1), torch.ones(3))
    assert probs[2, 3] == 1
    manual = torch.zeros(3, 5)
    for b in range(3):
        for h in range(4):
            s = keys[b, :, h // 2] @ q[b, h] / math.sqrt(8) / 0.7
            manual[b] += s.masked_fill(~available[b], -math.inf).softmax(-1) / 4
    torch.testing.assert_close(probs, manual)


def test_rows_choose_independently():
    torch.manual_seed(0)
    model = _lora(_llama(), ["q_proj", "k_proj"])
    batch = collate(SRC.sample(random.Random(0), 1) * 64)  # 64 copies of one pool
    orders = rollout(model, AttentionProbe(model), batch, temperature=5.0, generator=torch.Generator().manual_seed(0))
    assert len({tuple(o) for o in orders.tolist()}) > 10, "rows must not share one row's choices"
    assert all(sorted(o) == list(range(4)) for o in orders.tolist()), "every order is a permutation"


def test_reward_scores_only_value_tokens_shifted():
    torch.manual_seed(0)
    model = _llama().eval()
    pools = SRC.sample(random.Random(1), 3)
    batch = collate(pools)
    orders = torch.stack([torch.randperm(4) for _ in range(3)])
    ids, mask, score = assemble(batch, orders)
    reward = sequence_reward(model, ids, mask, score)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    for b in range(3):
        picked = [pools[b]["pairs"][j] for j in orders[b].tolist()]
        expected_tokens = [t for p in picked if p["scored"] for t in p["value_ids"]]
        positions = [t for t in range(ids.shape[1]) if score[b, t]]
        assert [ids[b, t].item() for t in positions] == expected_tokens  # recalls' codes, nothing else
        manual = [torch.log_softmax(logits[b, t - 1], -1)[ids[b, t]].item() for t in positions]
        assert reward[b].item() == pytest.approx(sum(manual) / len(manual), abs=1e-5)


def test_kl_zero_without_adapter_effect_and_positive_with_it():
    torch.manual_seed(0)
    model = get_peft_model(_llama(), LoraConfig(r=4, target_modules=["q_proj", "k_proj"])).eval()  # B = 0
    probe = AttentionProbe(model)
    batch = collate(SRC.sample(random.Random(2), 4))
    orders = torch.stack([torch.randperm(4) for _ in range(4)])

    def kl():
        with torch.no_grad():
            p = order_log_probs(model, probe, batch, orders, 1.0)
            with model.disable_adapter():
                ref = order_log_probs(model, probe, batch, orders, 1.0)
        return categorical_kl(p, ref)

    assert torch.all(kl() == 0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    assert torch.all(kl() > 0)


def test_filtering_and_group_advantages():
    adv = torch.tensor([0.3, -1.0, 2.0, 0.1, -0.2, 1.5, 0.0, -3.0])
    keep = keep_top(adv, 0.25)
    assert keep.sum() == 2 and set(torch.nonzero(keep).flatten().tolist()) == {2, 5}
    assert keep_top(adv, 1.0).all() and keep_top(adv, 0.01).sum() == 1
    a = group_advantages(torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 13.0]), 3)
    assert torch.allclose(a.view(2, 3).mean(1), torch.zeros(2), atol=1e-6)
    assert a[0] < a[1] < a[2]


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), episodes=4, batch_size=2, num_rollouts=3, learning_rate=0.01,
                save_steps=2, logging_steps=2, use_cpu=True, plot=False, lora_target_modules="q_proj,k_proj,v_proj")
    return AttentionGuidedConfig(**{**base, **kw})


def test_training_filters_and_changes_every_trainable_parameter(tmp_path):
    torch.manual_seed(0)
    trainer = AttentionGuidedTrainer(_llama(), _args(tmp_path, keep_fraction=0.5, weight_decay=0.0), SRC)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    frozen = [n for n, p in trainer.model.named_parameters() if "lora" in n and not p.requires_grad]
    assert frozen and all("layers.1.self_attn.v_proj" in n for n in frozen)  # cannot reach the last q/k
    history = trainer.train()
    assert all(h["kept"] == 3 for h in history)  # ceil(0.5 * 2 pools * 3 rollouts)
    unchanged = [n for n, p in trainer.model.named_parameters() if n in before and torch.equal(p, before[n])]
    assert not unchanged, f"not trained: {unchanged}"
    assert 0 <= history[-1]["define_before_recall"] <= 1


def test_resume_is_bitwise_exact(tmp_path):
    torch.manual_seed(0)
    straight = AttentionGuidedTrainer(_llama(), _args(tmp_path / "a"), SRC)
    straight.train()
    torch.manual_seed(0)
    first = AttentionGuidedTrainer(_llama(), _args(tmp_path / "b", episodes=2), SRC)
    first.train()
    torch.manual_seed(0)
    resumed = AttentionGuidedTrainer(_llama(), _args(tmp_path / "b"), SRC)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.episode == 4 and len(resumed.history) == 4
    a = dict(straight.model.named_parameters())
    for n, p in resumed.model.named_parameters():
        assert torch.equal(p, a[n]), n
    assert [h["reward"] for h in straight.history] == [h["reward"] for h in resumed.history]
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["checkpoint-2", "checkpoint-4"]


def test_config_errors_are_one_line():
    with pytest.raises(ValueError, match="num_rollouts must be >= 2"):
        AttentionGuidedConfig(num_rollouts=1)
    with pytest.raises(ValueError, match=r"keep_fraction must be in \(0, 1\]"):
        AttentionGuidedConfig(keep_fraction=0.0)


def test_recipe_on_local_wikipedia_files_and_resume(tmp_path):
    from rat_hf.data import default_text_corpus
    from rat_hf.recipes.attention_guided_rl import main

    data = tmp_path / "wiki.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in default_text_corpus(max_docs=20)["text"]))
    argv = ["--config", "recipes/configs/attention_guided_rl_tiny.yaml", "--dataset", "wikipedia", "--dataset_name",
            "json", "--data_files", str(data), "--max_docs", "20", "--tokenizer_vocab_size", "300",
            "--output_dir", str(tmp_path / "out"), "--episodes", "2", "--save_steps", "1", "--plot", "false"]
    history = main(argv)
    assert len(history) == 2 and (tmp_path / "out" / "checkpoint-2").is_dir()
    history = main(argv[:-6] + ["--episodes", "3", "--save_steps", "1", "--plot", "false", "--resume"])
    assert [h["episode"] for h in history] == [1, 2, 3]


def test_collate_pads_keys_left_values_right_and_a_padded_batch_trains(tmp_path):
    pools = [{"prompt_ids": [1], "pairs": [{"key_ids": [2, 5], "value_ids": [9], "scored": True},
                                           {"key_ids": [3], "value_ids": [10, 11, 12], "scored": False}]},
             {"prompt_ids": [1, 4], "pairs": [{"key_ids": [6], "value_ids": [13, 14], "scored": True},
                                              {"key_ids": [7, 8], "value_ids": [15], "scored": True}]}]
    batch = collate(pools, pad_token_id=0)
    assert batch["prompt_ids"].tolist() == [[0, 1], [1, 4]] and batch["key_ids"][0, 1].tolist() == [0, 3]
    assert batch["value_ids"][0, 0].tolist() == [9, 0, 0] and batch["value_mask"][0, 0].tolist() == [1, 0, 0]
    ids, mask, score = assemble(batch, torch.tensor([[1, 0], [0, 1]]))
    assert ids[0].tolist() == [0, 1, 0, 3, 10, 11, 12, 2, 5, 9, 0, 0]
    assert [ids[0, t].item() for t in range(ids.shape[1]) if score[0, t]] == [9]  # padding and unscored values out
    assert mask[0].tolist() == [0, 1, 0, 1, 1, 1, 1, 1, 1, 1, 0, 0]

    class Source:
        pad_token_id = 0

        def sample(self, rng, n):
            return [pools[rng.randrange(2)] for _ in range(n)]

    torch.manual_seed(0)
    trainer = AttentionGuidedTrainer(_llama(), _args(tmp_path, episodes=2), Source())
    assert all(math.isfinite(h["reward"]) for h in trainer.train())
