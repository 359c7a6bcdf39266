"""GRPO learns on RAT: TRL's `GRPOTrainer` on a tiny fresh `RatForCausalLM` (word-level vocabulary of 24 tokens) with
`rat_hf.rewards.keyword_reward` ("yes" as the keyword, through TRL's conversational completions) raises the mean
reward from chance (~1 in 24 words) to most of the completion within 40 CPU steps, and every weight of the model
trains. The PPO equivalent is `tests/test_ppo.py::test_ppo_raises_a_learnable_reward`."""

import functools

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("datasets")

from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402
from transformers import logging as hf_logging  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from rat_hf import RatConfig, RatForCausalLM  # noqa: E402
from rat_hf.rewards import keyword_reward  # noqa: E402
from rat_hf.tokenization.special_tokens import CHAT_TEMPLATE  # noqa: E402

WORDS = "yes no maybe hello there how are you the cat sat on mat what is your name good morning".split()
PROMPTS = ["hello there", "how are you", "what is your name", "the cat sat on the mat", "good morning",
           "are you there"]


@pytest.fixture(autouse=True)
def quiet_and_one_thread():
    """TRL/transformers info logs off; one intra-op thread (these models are tiny: a second thread on a busy 2-core
    machine only adds synchronisation)."""
    level, threads = hf_logging.get_verbosity(), torch.get_num_threads()
    hf_logging.set_verbosity_error()
    torch.set_num_threads(1)
    yield
    hf_logging.set_verbosity(level)
    torch.set_num_threads(threads)


def word_tokenizer():
    """A 24-token word-level tokenizer with rat_hf's chat template and a pad distinct from EOS, padding on the left
    (as GRPOTrainer generates)."""
    special = ["[PAD]", "[BOS]", "[EOS]", "<|user|>", "<|assistant|>"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(special + WORDS)}, unk_token="[PAD]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="[BOS]", eos_token="[EOS]", pad_token="[PAD]",
                                   extra_special_tokens=["<|user|>", "<|assistant|>"], chat_template=CHAT_TEMPLATE,
                                   padding_side="left")


def tiny_rat(tok, seed=0):
    torch.manual_seed(seed)
    return RatForCausalLM(RatConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id))


def test_grpo_raises_a_learnable_reward_on_rat(tmp_path):
    """Reward = share of the completion's words that are "yes". 40 optimizer steps of 8 completions (2 prompts x 4
    generations), a fresh generation every step: the first steps sit near chance, the last ones well above it."""
    tok = word_tokenizer()
    model = tiny_rat(tok)
    # a high learning rate and a constant schedule: 40 steps on a 34k-parameter model; beta = 0 (TRL's default)
    args = GRPOConfig(
        output_dir=str(tmp_path / "grpo"), per_device_train_batch_size=8, num_generations=4,
        max_completion_length=6, temperature=1.0, max_steps=40, learning_rate=1e-2, lr_scheduler_type="constant",
        beta=0.0, bf16=False, use_cpu=True, gradient_checkpointing=False, logging_steps=1, save_strategy="no",
        report_to="none", disable_tqdm=True, seed=0)
    prompts = [[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}] for i in range(60)]
    trainer = GRPOTrainer(model=model, reward_funcs=functools.partial(keyword_reward, keyword="yes"), args=args,
                          train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tok)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert len(before) == len(list(model.parameters()))  # full fine-tuning: every weight is trainable
    trainer.train()

    history = [h for h in trainer.state.log_history if "reward" in h]
    rewards = [h["reward"] for h in history]
    assert len(rewards) == 40
    assert all(h["rewards/keyword_reward/mean"] == h["reward"] for h in history)  # the one reward, weight 1
    start, end = sum(rewards[:2]) / 2, sum(rewards[-4:]) / 4
    assert start < 0.15, rewards  # chance: 1 word in 24
    assert end > 0.6 and end > start + 0.45, rewards
    unchanged = [n for n, p in trainer.model.named_parameters() if n in before and torch.equal(p, before[n])]
    assert not unchanged, f"not trained: {unchanged}"
