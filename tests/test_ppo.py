"""PPO: the tensor functions (GAE per sequence, clipped losses, KL estimators), `PPOTrainer` on tiny RAT and Llama
models (importance ratio exactly 1 on the first mini-batch, every parameter trained, LoRA reference = adapter-disabled
base, reward at the last completion token with pad == EOS, the sampling distribution = softmax(logits / T), reward
functions and models with dataset columns, learning on a learnable reward), graph-decoded rollouts (the same tokens
and run as generate()'s; when `graph_decode` turns them on) and the `recipes/ppo_chat.py` recipe."""

import importlib.util
import math
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("datasets")

from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402
from transformers import logging as hf_logging  # noqa: E402

from rat_hf import RatConfig, RatForCausalLM, RatForSequenceClassification  # noqa: E402
from rat_hf.tokenization.special_tokens import CHAT_TEMPLATE  # noqa: E402
from rat_hf.trainers.ppo_config import PPOConfig  # noqa: E402
from rat_hf.trainers.ppo_trainer import PPOTrainer, causal_lm_forward, completion_logits  # noqa: E402
from rat_hf.trainers.ppo_utils import (clipped_policy_loss, clipped_value_loss, gae_advantages,  # noqa: E402
                                       masked_mean, masked_whiten, per_token_kl, selective_log_softmax)

ROOT = Path(__file__).resolve().parent.parent
WORDS = "yes no maybe hello there how are you the cat sat on mat what is your name good morning".split()
PROMPTS = ["hello there", "how are you", "what is your name", "the cat sat on the mat", "good morning",
           "are you there"]


@pytest.fixture(autouse=True)
def quiet():
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    yield
    hf_logging.set_verbosity(level)


def word_tokenizer(pad_is_eos: bool = False):
    """A 24-token word-level tokenizer with the project's chat template (small vocabulary: learning is fast)."""
    special = ["[PAD]", "[BOS]", "[EOS]", "<|user|>", "<|assistant|>"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(special + WORDS)}, unk_token="[PAD]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="[BOS]", eos_token="[EOS]",
                                   pad_token="[EOS]" if pad_is_eos else "[PAD]",
                                   extra_special_tokens=["<|user|>", "<|assistant|>"], chat_template=CHAT_TEMPLATE)


def tiny_rat(tok, seed=0, **overrides):
    torch.manual_seed(seed)
    return RatForCausalLM(RatConfig(**{
        "vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "pad_token_id": tok.pad_token_id,
        "eos_token_id": tok.eos_token_id, "bos_token_id": tok.bos_token_id, **overrides}))


def tiny_llama(tok, seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id))


def ppo_args(tmp_path, **overrides):
    return PPOConfig(**{
        "output_dir": str(tmp_path / "ppo"), "per_device_train_batch_size": 4, "num_mini_batches": 2,
        "num_ppo_epochs": 2, "max_new_tokens": 6, "max_steps": 4, "learning_rate": 1e-2, "report_to": "none",
        "use_cpu": True, "save_strategy": "no", "disable_tqdm": True, "seed": 0, "logging_steps": 4, **overrides})


def chat_dataset(n=24, **columns):
    rows = [[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}] for i in range(n)]
    return Dataset.from_dict({"prompt": rows, **{k: v[:n] for k, v in columns.items()}})


def length_reward(prompts, completions, completion_ids, **kwargs):
    return [float(len(ids)) for ids in completion_ids]


# ---- ppo_utils ------------------------------------------------------------------------------------------------------
def test_gae_matches_a_hand_computed_example_and_never_crosses_sequences():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.0, 2.0, 0.0, 0.0]])
    values = torch.tensor([[0.5, 0.4, 0.3, 9.0], [0.1, 0.2, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    adv, ret = gae_advantages(rewards, values, mask, gamma=0.9, lam=0.8)
    # row 0, backwards: d2 = 1 - .3 = .7, A2 = .7; d1 = .9*.3 - .4 = -.13, A1 = -.13 + .72*.7 = .374;
    # d0 = .9*.4 - .5 = -.14, A0 = -.14 + .72*.374 = .12928. Row 1: d1 = 2 - .2 = 1.8; d0 = .9*.2 - .1 = .08,
    # A0 = .08 + .72*1.8 = 1.376. Padding (value 9) never enters.
    expected = torch.tensor([[0.12928, 0.374, 0.7, 0.0], [1.376, 1.8, 0.0, 0.0]])
    torch.testing.assert_close(adv, expected)
    torch.testing.assert_close(ret, (expected + values) * mask)
    # per-sequence isolation: changing the other row changes nothing in this one
    rewards2, values2 = rewards.clone(), values.clone()
    rewards2[1], values2[1] = torch.tensor([5.0, -3.0, 1.0, 1.0]), torch.tensor([1.0, 1.0, 1.0, 1.0])
    torch.testing.assert_close(gae_advantages(rewards2, values2, mask, 0.9, 0.8)[0][0], adv[0])
    # a row is computed as if alone, and an unmasked position inside a row is skipped, not a time step
    alone = gae_advantages(rewards[1:], values[1:], mask[1:], 0.9, 0.8)[0]
    torch.testing.assert_close(alone[0], adv[1])
    gap_r = torch.tensor([[0.0, 7.0, 0.0, 1.0]])
    gap_v = torch.tensor([[0.5, 9.0, 0.4, 0.3]])
    gap = gae_advantages(gap_r, gap_v, torch.tensor([[1, 0, 1, 1]]), 0.9, 0.8)[0]
    torch.testing.assert_close(gap[0, [0, 2, 3]], torch.tensor([0.12928, 0.374, 0.7]))
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        gae_advantages(rewards[0], values[0], mask[0], 1.0, 1.0)


def test_rollout_sampler_repeats_prompts_and_rollouts():
    from rat_hf.trainers.ppo_trainer import RolloutSampler

    sampler = RolloutSampler(10, prompts_per_rollout=3, num_generations=2, repeats=2, seed=0)
    stream = list(sampler)
    assert len(stream) == len(sampler) == 3 * 6 * 2  # 3 whole rollouts (the 10th prompt waits for the next pass)
    rollouts = [stream[i:i + 12] for i in range(0, len(stream), 12)]
    for rollout in rollouts:
        assert rollout[:6] == rollout[6:]  # one copy per micro-batch group it feeds
        assert rollout[0:6:2] == rollout[1:6:2] and len(set(rollout)) == 3  # each prompt twice in a row
    assert len({i for r in rollouts for i in r}) == 9
    assert list(sampler) != stream  # the next pass is shuffled anew
    with pytest.raises(ValueError, match="fewer than"):
        RolloutSampler(2, prompts_per_rollout=3, num_generations=1, repeats=1)


def test_losses_kl_and_masked_statistics():
    mask = torch.tensor([[1, 1, 0]])
    assert masked_mean(torch.tensor([[1.0, 3.0, 100.0]]), mask).item() == 2.0
    assert masked_mean(torch.ones(1, 3), torch.zeros(1, 3)).item() == 0.0  # empty: 0, not NaN
    white = masked_whiten(torch.tensor([[1.0, 3.0, 100.0]]), mask)
    assert white[0, 2] == 0 and abs(white[0, :2].sum()) < 1e-6
    old = torch.zeros(1, 3)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.0]]))  # ratios 1.5, 0.5, 1
    loss, ratio, clipped = clipped_policy_loss(new, old, torch.tensor([[1.0, -1.0, 1.0]]), clip_eps=0.2)
    torch.testing.assert_close(ratio, torch.tensor([[1.5, 0.5, 1.0]]))
    torch.testing.assert_close(loss, torch.tensor([[-1.2, 0.8, -1.0]]))  # -min(A r, A clip(r))
    assert clipped.tolist() == [[True, True, False]]
    v_loss, v_clipped = clipped_value_loss(torch.tensor([[1.0]]), torch.tensor([[0.0]]), torch.tensor([[2.0]]), 0.2)
    assert v_loss.item() == pytest.approx(0.5 * 1.8**2) and v_clipped.item()
    unclipped = clipped_value_loss(torch.tensor([[1.0]]), torch.tensor([[0.0]]), torch.tensor([[2.0]]), None)
    assert unclipped[0].item() == 0.5 and not unclipped[1].item()
    # KL estimators on tokens drawn from p: k1 and k3 average to KL(p || q), k3 and k2 are >= 0 per token
    gen = torch.Generator().manual_seed(0)
    p, q = torch.softmax(torch.randn(8, generator=gen), 0), torch.softmax(torch.randn(8, generator=gen), 0)
    tokens = torch.multinomial(p, 200000, replacement=True, generator=gen)[None]
    lp, lq = p.log()[tokens], q.log()[tokens]
    exact = (p * (p.log() - q.log())).sum().item()
    for estimator in ("k1", "k3"):
        assert per_token_kl(lp, lq, estimator).mean().item() == pytest.approx(exact, rel=0.03)
    assert (per_token_kl(lp, lq, "k3") >= 0).all() and (per_token_kl(lp, lq, "k2") >= 0).all()
    logits = torch.randn(2, 3, 5)
    index = torch.randint(0, 5, (2, 3))
    torch.testing.assert_close(selective_log_softmax(logits, index),
                               torch.log_softmax(logits, -1).gather(-1, index[..., None]).squeeze(-1))


# ---- the trainer ----------------------------------------------------------------------------------------------------
class RecordingPPOTrainer(PPOTrainer):
    """Records the per-token importance ratios of every update micro-batch (global step, ratios on the mask)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.ratios = []

    def _policy_loss(self, outputs, inputs):
        loss, stats = super()._policy_loss(outputs, inputs)
        assert loss.shape == inputs["completion_mask"].shape  # per token, before any reduction
        self.ratios.append((self.state.global_step, stats["ratio"][inputs["completion_mask"]].detach()))
        return loss, stats


@pytest.mark.parametrize("disable_dropout", [True, False])
def test_importance_ratio_is_exactly_one_on_the_first_mini_batch(tmp_path, disable_dropout):
    """Old log-probs come from an eval-mode (dropout-free) forward. With dropout disabled in the models the update
    forward is the same function, and the first pass visits the rollout in the chunks it was scored in: ratio == 1
    bit for bit on both micro-batches of the first mini-batch. With dropout left on (the config has 0.1), it is not."""
    tok = word_tokenizer()
    model = tiny_rat(tok, hidden_dropout=0.1, attention_dropout=0.1)
    args = ppo_args(tmp_path, gradient_accumulation_steps=2, disable_dropout=disable_dropout, kl_coef=0.1)
    trainer = RecordingPPOTrainer(model, length_reward, args=args, train_dataset=chat_dataset(),
                                  processing_class=tok)
    trainer.train()
    first = [r for step, r in trainer.ratios if step == 0]
    later = [r for step, r in trainer.ratios if step > 0]
    assert len(first) == 2 and len(later) == 6  # 4 optimizer steps x 2 micro-batches
    if disable_dropout:
        assert all(torch.equal(r, torch.ones_like(r)) for r in first)
        assert model.config.hidden_dropout == 0.1  # the saved config keeps its dropout
    else:
        assert not any(torch.equal(r, torch.ones_like(r)) for r in first)
    assert any((r - 1).abs().max() > 1e-3 for r in later)  # the policy did move


@pytest.mark.parametrize("arch", ["rat", "llama", "rat_value_head"])
def test_every_trainable_parameter_of_policy_and_value_model_changes(tmp_path, arch):
    tok = word_tokenizer()
    model = tiny_llama(tok) if arch == "llama" else tiny_rat(tok)
    args = ppo_args(tmp_path, max_steps=6, value_head=arch == "rat_value_head", kl_coef=0.05)
    trainer = PPOTrainer(model, length_reward, args=args, train_dataset=chat_dataset(), processing_class=tok)
    wrapper = trainer.model
    assert (wrapper.value_model is None) == (arch == "rat_value_head")
    before = {n: p.detach().clone() for n, p in wrapper.named_parameters() if p.requires_grad}
    assert any(n.startswith("value_model.") or n.startswith("value_head.") for n in before)
    trainer.train()
    unchanged = [n for n, p in wrapper.named_parameters() if p.requires_grad and torch.equal(p, before[n])]
    assert not unchanged, f"not trained: {unchanged}"
    if trainer.ref_model is not None:  # the frozen copy stays what the policy was
        ref = dict(trainer.ref_model.named_parameters())
        assert all(torch.equal(ref[n.removeprefix("policy.")], p) for n, p in before.items() if n.startswith("policy."))
    logs = [h for h in trainer.state.log_history if "policy_loss" in h][0]
    for key in ("policy_loss", "value_loss", "entropy", "reward", "reward_std", "kl", "clip_fraction", "approx_kl",
                "accuracy", "perplexity", "completions/mean_length", "time/rollout_per_step", "time/update_per_step"):
        assert key in logs and math.isfinite(logs[key]), key


def test_lora_reference_is_the_adapter_disabled_base(tmp_path):
    from peft import LoraConfig

    tok = word_tokenizer()
    model = tiny_rat(tok)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = ppo_args(tmp_path, max_steps=8, kl_coef=0.1, value_head=True, learning_rate=3e-2)
    trainer = PPOTrainer(model, length_reward, args=args, train_dataset=chat_dataset(), processing_class=tok,
                         peft_config=LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM"))
    assert trainer.ref_model is None  # no copy: the reference is the same weights with the adapter off
    trainer.train()
    kls = [h["kl"] for h in trainer.state.log_history if "kl" in h]
    policy = trainer.model.policy
    lora = [n for n, p in policy.named_parameters() if p.requires_grad and "lora_" in n]
    assert lora and all(not p.requires_grad for n, p in policy.named_parameters() if "lora_" not in n)
    frozen = {n.replace("base_model.model.", "").replace(".base_layer", ""): p
              for n, p in policy.named_parameters() if "lora_" not in n}
    assert all(torch.equal(frozen[n], p) for n, p in base.items())  # the base (= the reference) never moved
    # log_history holds window means: the first rollout alone at step 4 (rollout of 8: 2 x 2 steps), then one more
    first_rollout_kl = trainer.state.log_history[0]["kl"]
    assert first_rollout_kl == 0.0, kls  # LoRA's B starts at 0: adapted == base, KL exactly 0
    assert kls[-1] != 0.0


def test_reward_at_the_last_token_with_pad_equal_to_eos_and_truncation(tmp_path):
    """pad == EOS (as with tiktoken's cl100k, both 100257): each completion ends at its first EOS (included), one
    without EOS keeps all max_new_tokens; with gamma = lam = 1, no KL and no whitening every token's return is the
    completion's score, i.e. the score sits at its last token and nothing flows past the end."""
    tok = word_tokenizer(pad_is_eos=True)
    eos = tok.eos_token_id
    seen, seen_prompts = [], []

    def recorder(prompts, completions, completion_ids, **kwargs):
        seen.extend(completion_ids)
        seen_prompts.extend(prompts)
        return [float(len(ids)) + 0.5 * ids.count(eos) for ids in completion_ids]

    model = tiny_rat(tok, seed=3)
    args = ppo_args(tmp_path, gamma=1.0, lam=1.0, kl_coef=0.0, whiten_advantages=False, max_new_tokens=5,
                    missing_eos_penalty=2.0, num_generations=2)
    trainer = PPOTrainer(model, recorder, args=args, train_dataset=chat_dataset(), processing_class=tok)
    dataloader = trainer.get_train_dataloader()
    micro_batches = trainer._rollout(next(iter(dataloader)), 0)
    assert seen_prompts[0::2] == seen_prompts[1::2] and seen_prompts[0] != seen_prompts[2]  # 2 samples per prompt
    ended = [ids for ids in seen if eos in ids]
    assert ended and len(ended) < len(seen)  # both kinds occur
    for ids in seen:
        assert ids.count(eos) <= 1 and (ids[-1] == eos or len(ids) == 5) and (eos not in ids[:-1])
    for mb in micro_batches[: len(micro_batches) // args.num_ppo_epochs]:
        mask = mb["completion_mask"]
        lengths = mask.sum(1)
        ended = mb["completion_ids"][torch.arange(len(mask)), lengths - 1] == eos
        score = lengths.float() + 0.5 * ended.float() - 2.0 * (~ended).float()  # truncated: minus the penalty
        torch.testing.assert_close(mb["returns"], score[:, None] * mask)


def test_log_probs_are_those_of_the_sampling_distribution(tmp_path):
    """Generation with the trainer's config samples from softmax(logits / T) even when the model's own
    generation_config asks for top-k: the scores `generate` sampled from equal the trainer's log-probs."""
    tok = word_tokenizer()
    model = tiny_rat(tok)
    model.generation_config.top_k, model.generation_config.top_p = 3, 0.5
    trainer = PPOTrainer(model, length_reward, args=ppo_args(tmp_path, temperature=0.7), train_dataset=chat_dataset(),
                         processing_class=tok)
    policy = trainer.model.policy.eval()
    enc = tok([trainer._prompt_text(p) for p in chat_dataset(4)["prompt"]], return_tensors="pt", padding=True,
              padding_side="left", add_special_tokens=False)
    out = policy.generate(**enc, generation_config=trainer.generation_config, output_scores=True,
                          return_dict_in_generate=True)
    completion = out.sequences[:, enc.input_ids.shape[1]:]
    c = completion.shape[1]
    sampled = torch.stack([torch.log_softmax(s, -1) for s in out.scores], 1).gather(-1, completion[..., None])[..., 0]
    ids = out.sequences
    mask = torch.cat([enc.attention_mask, torch.ones_like(completion)], 1)
    from rat_hf.trainers.ppo_trainer import position_ids_from_mask

    with torch.no_grad():
        logits = completion_logits(causal_lm_forward(policy, ids, mask, position_ids_from_mask(mask), c), c, 0.7)
    ours = selective_log_softmax(logits, completion)
    alive = torch.ones_like(completion, dtype=torch.bool)  # up to each row's first EOS (after it: padding)
    for row in range(len(completion)):
        hits = (completion[row] == tok.eos_token_id).nonzero()
        if len(hits):
            alive[row, hits[0, 0] + 1:] = False
    torch.testing.assert_close(ours[alive], sampled[alive], atol=1e-4, rtol=1e-4)
    assert (sampled[alive] > -math.inf).all()  # no token was masked out by a top-k/top-p warper


def test_reward_functions_and_reward_models_get_columns_and_weights(tmp_path):
    tok = word_tokenizer()
    got = {}

    def column_reward(prompts, completions, completion_ids, quality, trainer_state, log_metric, **kwargs):
        got.update(prompts=prompts, completions=completions, quality=quality, kwargs=kwargs, step=trainer_state)
        log_metric("custom_metric", 7.0)
        return [q if q is not None else None for q in quality]

    torch.manual_seed(1)
    reward_model = RatForSequenceClassification(RatConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_labels=1, pad_token_id=tok.pad_token_id))
    qualities = [1.0, None, 0.5, 0.25] * 6
    ds = chat_dataset(quality=qualities, category=["greet"] * 24)
    args = ppo_args(tmp_path, max_steps=2, reward_weights=[2.0, 1.0], logging_steps=1)
    value_config = RatConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=2, num_labels=1, pad_token_id=tok.pad_token_id)
    value_model = RatForSequenceClassification(value_config)  # a value model of its own size
    value_before = {n: p.detach().clone() for n, p in value_model.named_parameters()}
    trainer = PPOTrainer(tiny_rat(tok), [column_reward, reward_model], args=args, train_dataset=ds,
                         processing_class=tok, reward_processing_classes=[None, tok], value_model=value_model)
    trainer.train()
    assert trainer.model.value_model is value_model
    assert all(not torch.equal(p, value_before[n]) for n, p in value_model.named_parameters())
    assert got["kwargs"]["category"] == ["greet"] * 8 and len(got["quality"]) == 8
    assert got["completions"][0][0]["role"] == "assistant" and isinstance(got["completions"][0][0]["content"], str)
    log = trainer.state.log_history[0]
    assert log["custom_metric"] == 7.0 and "rewards/column_reward/mean" in log
    assert f"rewards/{trainer.reward_func_names[1]}/mean" in log
    # the score of each completion: 2 * quality (None: left out of the sum) + the reward model's logit on the
    # chat-templated conversation
    rows = [ds[i] for i in range(4)]
    prompts = [r["prompt"] for r in rows]
    ids = torch.tensor([[5, 6, 2], [7, 2, 0], [8, 9, 10], [5, 2, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    scores = trainer._score(rows, prompts, ids, mask)
    texts = tok.batch_decode([r[m].tolist() for r, m in zip(ids, mask)], skip_special_tokens=True)
    joined = [tok.apply_chat_template(p + [{"role": "assistant", "content": t}], tokenize=False)
              for p, t in zip(prompts, texts)]
    with torch.no_grad():
        rm = reward_model(**tok(joined, return_tensors="pt", padding=True, padding_side="right",
                                add_special_tokens=False)).logits[:, 0]
    expected = torch.tensor([2 * q if q is not None else 0.0 for q in qualities[:4]]) + rm
    torch.testing.assert_close(scores, expected)
    with pytest.raises(ValueError, match="reward_weights"):
        PPOTrainer(tiny_rat(tok), [column_reward], args=ppo_args(tmp_path, reward_weights=[1.0, 2.0]),
                   train_dataset=ds, processing_class=tok)
    with pytest.raises(ValueError, match="'prompt' column"):
        PPOTrainer(tiny_rat(tok), [column_reward], args=ppo_args(tmp_path), train_dataset=ds.rename_column(
            "prompt", "messages"), processing_class=tok)
    with pytest.raises(ValueError, match="num_labels=1"):
        PPOTrainer(tiny_rat(tok), [column_reward], args=ppo_args(tmp_path), train_dataset=ds, processing_class=tok,
                   value_model=RatForSequenceClassification(RatConfig(**{**value_config.to_dict(), "num_labels": 2})))
    with pytest.raises(ValueError, match="kl_estimator"):
        ppo_args(tmp_path, kl_estimator="k4")


def test_ppo_raises_a_learnable_reward(tmp_path):
    """Reward = share of completion tokens that are "yes" (1 in 24 at start): PPO on a fresh tiny RAT must raise
    it well above where it started within 40 optimizer steps (10 rollouts of 16)."""
    tok = word_tokenizer()
    target = tok.convert_tokens_to_ids("yes")

    def yes_reward(prompts, completions, completion_ids, **kwargs):
        return [sum(t == target for t in ids) / len(ids) for ids in completion_ids]

    args = ppo_args(tmp_path, per_device_train_batch_size=8, max_steps=40, kl_coef=0.0, logging_steps=4,
                    lr_scheduler_type="constant")
    trainer = PPOTrainer(tiny_rat(tok), yes_reward, args=args, train_dataset=chat_dataset(60), processing_class=tok)
    trainer.train()
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    assert len(rewards) == 10
    start, end = sum(rewards[:2]) / 2, sum(rewards[-2:]) / 2
    assert start < 0.15 and end > start + 0.3, rewards


@pytest.mark.parametrize("lora", [False, True])
def test_checkpoints_hold_policy_and_value_function_and_resume_loads_them(tmp_path, lora):
    """A checkpoint is the policy (the adapter under LoRA) where `from_pretrained` finds it plus `value_model/` (or
    `value_head.safetensors`); resuming loads both into a fresh trainer exactly."""
    from peft import LoraConfig

    tok = word_tokenizer()
    peft = LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM") if lora else None
    args = ppo_args(tmp_path, save_strategy="steps", save_steps=4, value_head=lora)
    first = PPOTrainer(tiny_rat(tok), length_reward, args=args, train_dataset=chat_dataset(), processing_class=tok,
                       peft_config=peft)
    first.train()
    checkpoint = tmp_path / "ppo" / "checkpoint-4"
    assert (checkpoint / ("adapter_model.safetensors" if lora else "model.safetensors")).is_file()
    assert (checkpoint / ("value_head.safetensors" if lora else "value_model/model.safetensors")).is_file()
    model = tiny_rat(tok, seed=0 if lora else 1)  # under LoRA the checkpoint holds the adapter: same base
    torch.manual_seed(1)  # another adapter / value init
    second = PPOTrainer(model, length_reward, args=args, train_dataset=chat_dataset(), processing_class=tok,
                        peft_config=peft)
    trained = dict(first.model.named_parameters())
    differs = [n for n, p in second.model.named_parameters() if not torch.equal(p, trained[n])]
    assert any("value" in n for n in differs) and any(("lora_" if lora else "policy.") in n for n in differs)
    second.train(resume_from_checkpoint=str(checkpoint))  # at max_steps already: loads, trains no further
    assert all(torch.equal(p, trained[n]) for n, p in second.model.named_parameters())


def test_recipe_trains_saves_and_reloads_with_auto_classes(tmp_path, monkeypatch):
    pytest.importorskip("trl")
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    spec = importlib.util.spec_from_file_location("recipe_ppo_chat", ROOT / "recipes" / "ppo_chat.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    start = {}

    class Recording(recipe.PPOTrainer):
        def train(self, *args, **kwargs):
            start.update({n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad})
            return super().train(*args, **kwargs)

    monkeypatch.setattr(recipe, "PPOTrainer", Recording)
    out = tmp_path / "ppo_chat"
    trainer = recipe.main(["--config", str(ROOT / "recipes/configs/ppo_chat_tiny.yaml"), "--output_dir", str(out),
                           "--max_conversations", "24"])
    wrapper = trainer.model
    lora = [n for n in start if n.startswith("policy.")]
    assert lora and all("lora_" in n for n in lora)  # LoRA: the policy trains its adapter only
    unchanged = [n for n, p in wrapper.named_parameters() if n in start and torch.equal(p, start[n])]
    assert not unchanged, unchanged
    history = trainer.state.log_history
    for key in ("reward", "rewards/quality_reward/mean", "rewards/length_reward/mean", "rewards/format_reward/mean",
                "kl", "entropy", "policy_loss", "value_loss", "completions/mean_length"):
        assert any(key in e for e in history), key
    ids = torch.randint(6, 300, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = wrapper.policy.eval()(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)
        value_model = AutoModelForSequenceClassification.from_pretrained(out / "value_model").eval()
        torch.testing.assert_close(value_model(input_ids=ids).logits, wrapper.value_model.eval()(input_ids=ids).logits)
    assert (out / "training_stats.png").stat().st_size > 10_000 and (out / "log_history.json").is_file()
    assert "- ppo" in (out / "merged" / "README.md").read_text()


def test_reinforce_gating_selectors_learn_under_ppo(tmp_path):
    """The sampled gates of a reinforce-mode RAT are trained with the tokens' PPO signal, not dropped with a warning."""
    tok = word_tokenizer()
    model = tiny_rat(tok, gating_mode="reinforce", n_policies=2)
    trainer = PPOTrainer(model, length_reward, args=ppo_args(tmp_path), train_dataset=chat_dataset(),
                         processing_class=tok)
    selectors = {n: p.detach().clone() for n, p in trainer.model.policy.named_parameters() if ".selector_" in n}
    assert selectors
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*does not train them.*")  # the dropped-signal warning
        trainer.train()
    policy = dict(trainer.model.policy.named_parameters())
    unchanged = [n for n, before in selectors.items() if torch.equal(policy[n], before)]
    assert not unchanged, f"selectors not trained: {unchanged}"
    logs = [h for h in trainer.state.log_history if "gate/policy_loss" in h]
    assert logs and math.isfinite(logs[0]["gate/policy_loss"])


# ---- graph-decoded rollouts -------------------------------------------------------------------------------------------
class SequenceRecordingPPOTrainer(PPOTrainer):
    """Records every rollout's sampled sequences `[R, P + C0]`."""

    def _generate(self, policy, prompt_ids, prompt_mask):
        sequences = super()._generate(policy, prompt_ids, prompt_mask)
        self.sequences.append(sequences.clone())
        return sequences


@pytest.mark.parametrize("arch", ["rat", "llama_lora"])
def test_graph_decoded_rollouts_are_the_generate_rollouts(tmp_path, monkeypatch, arch):
    """`graph_decode=True` samples through `graph_generate` (on CPU its static-cache loop, uncaptured) from prompts
    padded to `max_prompt_length`: under the same seed every rollout has the same tokens as `generate()`'s, so the
    whole run is the same (parameters equal bit for bit). The policy's own `min_new_tokens=3` is overridden on both
    paths. Eight more stop tokens make every row of a rollout end before max_new_tokens: the loop must stop at
    generate()'s step and draw as many samples, else the next rollout would start from another RNG state."""
    import rat_hf.generation

    from peft import LoraConfig

    calls = []

    def counting_graph_generate(model, input_ids, *args, **kwargs):
        calls.append(tuple(input_ids.shape))
        return graph_generate(model, input_ids, *args, **kwargs)

    graph_generate = rat_hf.generation.graph_generate
    monkeypatch.setattr(rat_hf.generation, "graph_generate", counting_graph_generate)
    tok = word_tokenizer()
    stops = [tok.eos_token_id, *tok.convert_tokens_to_ids(WORDS[:8])]
    runs = {}
    for graph_decode in (False, True):
        model = tiny_rat(tok) if arch == "rat" else tiny_llama(tok)
        model.generation_config.min_new_tokens = 3
        model.generation_config.eos_token_id = stops
        # two rollouts of 8 sequences, each one optimizer step of two micro-batches
        args = ppo_args(tmp_path / str(graph_decode), graph_decode=graph_decode, max_steps=2, num_ppo_epochs=1,
                        num_mini_batches=1, gradient_accumulation_steps=2, max_new_tokens=12, max_prompt_length=24,
                        kl_coef=0.05)
        trainer = SequenceRecordingPPOTrainer(
            model, length_reward, args=args, train_dataset=chat_dataset(), processing_class=tok,
            peft_config=LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM") if arch == "llama_lora" else None)
        assert trainer.graph_decode is graph_decode
        trainer.sequences = []
        trainer.train()
        runs[graph_decode] = trainer.sequences, {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    assert calls == [(8, 24)] * 2  # both rollouts through graph_generate, at the padded width
    (plain, plain_params), (graph, graph_params) = runs[False], runs[True]
    assert len(plain) == len(graph) == 2
    for a, b in zip(plain, graph):
        assert torch.equal(a, b)
    width = _prompt_width(tok)
    assert all(s.shape[1] - width < 12 for s in plain), [s.shape for s in plain]  # every rollout ended early
    assert all(torch.equal(graph_params[n], p) for n, p in plain_params.items())


def _prompt_width(tok) -> int:
    """Tokens of the longest chat prompt of `chat_dataset`, as the rollout left-pads them."""
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in PROMPTS]
    return max(len(tok(t, add_special_tokens=False).input_ids) for t in texts)


def test_graph_decode_is_chosen_by_model_device_and_generation_settings():
    """None: on for a RAT/Llama policy on CUDA with supported settings, else off; True: on or a one-line error."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from rat_hf.trainers.ppo_trainer import choose_graph_decode

    tok = word_tokenizer()
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    rat, llama = tiny_rat(tok), tiny_llama(tok)
    qwen = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2))
    assert choose_graph_decode(None, rat, cuda)[0] and choose_graph_decode(None, llama, cuda)[0]
    assert not choose_graph_decode(None, rat, cpu)[0]
    off, why = choose_graph_decode(None, qwen, cuda)
    assert not off and "'qwen2'" in why
    assert choose_graph_decode(True, qwen, cuda)[0]  # True tries it
    assert choose_graph_decode(True, rat, cpu)[0]  # the uncaptured loop
    assert not choose_graph_decode(False, rat, cuda)[0]
    suppressing = tiny_rat(tok)
    suppressing.generation_config.suppress_tokens = [3]  # a logits processor graph decoding does not run
    off, why = choose_graph_decode(None, suppressing, cuda)
    assert not off and "suppress_tokens" in why
    with pytest.raises(ValueError, match=r"graph_decode=True, but .*suppress_tokens") as error:
        choose_graph_decode(True, suppressing, cuda)
    assert "\n" not in str(error.value)
    flash = tiny_rat(tok)
    flash.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="attn_implementation='flash_attention_2'"):
        choose_graph_decode(True, flash, cpu)
