"""Stage 5 of the RxT curriculum, memory reinforcement learning (MRL): the curriculum and its strategies, the rewards
as TRL reward functions, answers scored before anything is written into memory, gradients reaching the encoder and
memory attention, every part training under both estimators, bf16, the critic's value loss falling, the group
estimator raising the reward of a briefly SMAT-trained tiny model. (The recipes are chained in test_rxt_smat.py.)"""

import pytest
import torch
from datasets import Dataset

from rat_hf.models.rxt import RxTForCausalLM, RxTForPreTraining
from rat_hf.rewards.bleu import pad_token_ids
from rat_hf.rewards.mrl import (
    EmbeddingCosineReward,
    bleu_reward,
    bleu_to_reference,
    exact_match_reward,
    length_ratio_reward,
)
from rat_hf.trainers.rxt_mrl_config import RxTMRLConfig
from rat_hf.trainers.rxt_mrl_trainer import RxTMRLTrainer, episode_plan, mrl_recall_dataset
from rat_hf.trainers.rxt_smat_trainer import RxTSMATTrainer, component_of

from test_rxt_smat import arguments as smat_arguments
from test_rxt_smat import color_recall, new_model, recall_tokenizer, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tokenizer():
    return recall_tokenizer()


def mrl_arguments(tmp_path, **overrides) -> RxTMRLConfig:
    return RxTMRLConfig(**{**dict(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                                  learning_rate=1e-2, logging_steps=1, report_to="none", use_cpu=True,
                                  save_strategy="no", disable_tqdm=True, seed=0, curriculum=[2, 3],
                                  num_generations=3, max_completion_length=4, bleu_max_n=2), **overrides})


def recall_episodes(n: int = 16, seed: int = 0):
    return Dataset.from_list([dict(r) for r in color_recall(n, [0, 1], seed=seed, strategy="long_range")])


# --- data and curriculum ---------------------------------------------------------------------------------------------
def test_strategies_define_which_turns_are_scored_and_what_is_saved():
    assert episode_plan(5, 4, "cumulative") == ([0, 1, 2, 3], [None, 0, 1, 2])  # every turn asks about the previous
    assert episode_plan(6, 4, "long_range") == ([0, 1, 2, 5], [None, None, None, 0])  # fact, distractors, question
    assert episode_plan(6, 2, "long_range") == ([0, 5], [None, 0])
    assert episode_plan(3, 8, "cumulative") == ([0, 1, 2], [None, 0, 1])  # a shorter conversation: all of it
    with pytest.raises(ValueError, match="at least 2 turns"):
        episode_plan(1, 4, "cumulative")
    cumulative = mrl_recall_dataset(3, 4, "cumulative", seed=0)[0]
    values = [cumulative["query"].split(" is ")[-1].rstrip(".")]
    for turn in cumulative["interactions"]:
        assert turn["answer"] == values[-1]  # the answer is the fact of the turn before
        values.append(turn["query"].split(" is ")[-1].rstrip("."))
    long_range = mrl_recall_dataset(3, 5, "long_range", seed=0)[0]
    assert len(long_range["interactions"]) == 4 and long_range["interactions"][-1]["answer"] in long_range["query"]


def test_curriculum_stages_follow_the_steps(tmp_path, tokenizer):
    trainer = RxTMRLTrainer(new_model(tokenizer), mrl_arguments(tmp_path, curriculum=[2, 4, 8],
                                                                curriculum_steps=[2, 3, 1], max_steps=-1),
                            train_dataset=recall_episodes(), processing_class=tokenizer)
    assert trainer.args.max_steps == 6
    assert [trainer.args.curriculum[trainer.curriculum_stage(s)] for s in range(7)] == [2, 2, 4, 4, 4, 8, 8]
    with pytest.raises(ValueError, match="curriculum_steps"):
        mrl_arguments(tmp_path, curriculum=[2, 4], curriculum_steps=[3])
    with pytest.raises(ValueError, match="num_generations must be >= 2"):
        mrl_arguments(tmp_path, num_generations=1)


# --- rewards ---------------------------------------------------------------------------------------------------------
def test_rewards_take_trl_lists_or_device_tensors_alike():
    completions = [[5, 6, 7], [5, 9], [], [8, 8, 8, 8]]
    references = [[5, 6, 7], [5, 6, 7], [5], [8, 8]]
    saved = [[1, 5, 6, 7, 2], [4], [3], [8]]
    ids, mask = pad_token_ids(completions)
    ref, ref_mask = pad_token_ids(references)
    sav, sav_mask = pad_token_ids(saved)
    embedding = torch.nn.Embedding(12, 8)
    funcs = [bleu_to_reference, bleu_reward("saved", max_n=1), length_ratio_reward, exact_match_reward,
             EmbeddingCosineReward(embedding, "reference"), EmbeddingCosineReward(embedding.weight, "saved")]
    for f in funcs:
        from_lists = f(prompts=[""] * 4, completions=[""] * 4, completion_ids=completions, reference_ids=references,
                       saved_ids=saved, trainer_state=None)
        from_tensors = f(prompts=None, completions=None, completion_ids=ids, completion_mask=mask, reference_ids=ref,
                         reference_mask=ref_mask, saved_ids=sav, saved_mask=sav_mask)
        assert isinstance(from_lists, list) and len(from_lists) == 4
        assert from_lists == pytest.approx(from_tensors, abs=1e-6), getattr(f, "__name__", f)
    assert exact_match_reward(completion_ids=completions, reference_ids=references) == [1.0, 0.0, 0.0, 0.0]
    lengths = length_ratio_reward(completion_ids=completions, reference_ids=references)
    assert lengths == pytest.approx([1, 2 / 3, 0, 0.5])
    cosine = EmbeddingCosineReward(embedding, "reference")(completion_ids=completions, reference_ids=references)
    assert cosine[0] == pytest.approx(1.0) and cosine[2] == 0.0  # identical; an empty answer scores 0
    assert [f.__name__ for f in funcs[:2]] == ["bleu_to_reference", "bleu_to_saved"]
    with pytest.raises(ValueError, match="reference_ids"):
        bleu_to_reference(completion_ids=completions)
    with pytest.raises(ValueError, match="mask"):
        bleu_to_reference(completion_ids=ids, reference_ids=references)


# --- rollout order ---------------------------------------------------------------------------------------------------
def test_answers_are_scored_before_the_memory_reads_them(tmp_path, tokenizer):
    """With memory_answer="best", the interaction a scored turn writes is its best sample, and no sample reaches the
    memory before the reward functions have seen it (RxLM wrote the accepted answer first)."""
    events = []

    def reward(completion_ids=None, completion_mask=None, **kwargs):
        events.append(("scored", [tuple(r[m].tolist()) for r, m in zip(completion_ids, completion_mask)]))
        return [float(len(r[m])) - 0.01 * i for i, (r, m) in enumerate(zip(completion_ids, completion_mask))]

    model = new_model(tokenizer)
    update = model.update_memory

    def logged_update(memory, input_ids, attention_mask=None):
        events.append(("written", [tuple(r[m.bool()].tolist()) for r, m in zip(input_ids, attention_mask)]))
        return update(memory, input_ids, attention_mask)

    model.update_memory = logged_update
    args = mrl_arguments(tmp_path, memory_answer="best", curriculum=[3], beta=0.0, memory_drift_target="previous")
    trainer = RxTMRLTrainer(model, args, reward_funcs=[reward], train_dataset=recall_episodes(),
                            processing_class=tokenizer)
    rows = [trainer.train_dataset[i] for i in range(4)]
    samples, written, _, _ = trainer.sample_episodes(rows, num_turns=3, num_generations=3)
    eos = tokenizer.eos_token_id
    for group in samples:  # every scored turn wrote its best (longest, then first) answer
        for i, b in enumerate(group["rows"]):
            answers = group["answers"][3 * i: 3 * i + 3]
            best = max(range(3), key=lambda g: len(answers[g]) - 0.01 * g)
            assert written[group["turn"]][b] == (
                trainer._episodes(rows, 3)[b][group["turn"]]["prompt"] + answers[best] + [eos])[:args.max_length]
    scored = set()
    for kind, rows_ in events:
        if kind == "scored":
            scored |= set(rows_)
        else:
            for row in rows_:  # a written answer (the tokens between [A] and EOS) was scored before
                answer_at = row.index(tokenizer.convert_tokens_to_ids("[A]")) + 1 if row else 0
                answer = row[answer_at:-1]
                assert not row or answer in scored or _is_reference(answer, rows, tokenizer)


def _is_reference(answer, rows, tokenizer) -> bool:
    return any(list(answer) == a for r in rows for a in r["turn_answer_ids"])


# --- the update ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("estimator", ["group", "critic"])
def test_every_part_trains_and_the_encoder_and_memory_attention_get_gradients(tmp_path, tokenizer, estimator):
    model = new_model(tokenizer)
    before = snapshot(model)
    trainer = RxTMRLTrainer(model, mrl_arguments(tmp_path, advantage_estimator=estimator),
                            train_dataset=recall_episodes(), processing_class=tokenizer)
    head = snapshot(trainer.model.value_head) if estimator == "critic" else {}
    # one update by hand, the policy loss alone (no KL, no drift): the encoder, the memory attention and the initial
    # memory are in its graph through the memory the answers were sampled from
    trainer.model.train()
    batch = trainer._prepare_inputs([trainer.train_dataset[i] for i in range(4)])
    trainer.args.memory_drift_coef, trainer.args.beta = 0.0, 0.0
    trainer.model.zero_grad()
    loss = trainer.model(**batch)["loss"]
    loss.backward()
    trainer.args.memory_drift_coef, trainer.args.beta = 0.1, 0.04
    assert torch.isfinite(loss)
    for part in ("encoder", "memory_attention", "cross_attention", "memory_init"):
        grads = [p.grad for n, p in model.named_parameters() if component_of(n) == part]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), part
    trainer.model.zero_grad()
    trainer.train()
    assert [n for n, p in model.named_parameters() if torch.equal(p, before[n])] == []
    if estimator == "critic":
        assert all(not torch.equal(p, head[n]) for n, p in trainer.model.value_head.named_parameters())
        assert "value_loss" in trainer.state.log_history[0]
    else:
        assert "kl" in trainer.state.log_history[-2] and "memory_drift" in trainer.state.log_history[-2]


@pytest.mark.parametrize("how", ["bf16 weights", "bf16 autocast"])
def test_runs_in_bf16(tmp_path, tokenizer, how):
    model = new_model(tokenizer)
    if how == "bf16 weights":
        model = model.to(torch.bfloat16)
    args = mrl_arguments(tmp_path, max_steps=2, **({"bf16": True} if how == "bf16 autocast" else {}))
    result = RxTMRLTrainer(model, args, train_dataset=recall_episodes(), processing_class=tokenizer).train()
    assert torch.isfinite(torch.tensor(result.training_loss))


def test_saves_the_rxt_and_the_value_head(tmp_path, tokenizer):
    args = mrl_arguments(tmp_path, max_steps=2, advantage_estimator="critic", save_strategy="steps", save_steps=2)
    trainer = RxTMRLTrainer(new_model(tokenizer, model_class=RxTForPreTraining), args,
                            train_dataset=recall_episodes(), processing_class=tokenizer)
    trainer.train()
    checkpoint = tmp_path / "checkpoint-2"
    assert RxTForCausalLM.from_pretrained(checkpoint).config.model_type == "rxt"
    head = snapshot(trainer.model.value_head)
    fresh = RxTMRLTrainer(new_model(tokenizer, seed=3, model_class=RxTForPreTraining), args,
                          train_dataset=recall_episodes(), processing_class=tokenizer)
    fresh._load_from_checkpoint(str(checkpoint))
    for name, p in fresh.model.value_head.named_parameters():
        assert torch.equal(p, head[name])


# --- learning --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smat_model(tmp_path_factory, tokenizer):
    """A tiny RxT after a brief SMAT on the recall task: the starting point of MRL (greedy recall about one half,
    sampled answers mostly wrong)."""
    model = new_model(tokenizer, seed=0)
    args = smat_arguments(tmp_path_factory.mktemp("smat"), max_steps=SMAT_STEPS, per_device_train_batch_size=32,
                          learning_rate=3e-3, lr_scheduler_type="constant", logging_steps=SMAT_STEPS)
    RxTSMATTrainer(model, args, train_dataset=color_recall(640, [0, 1, 2], seed=7), processing_class=tokenizer).train()
    return model


def test_group_mrl_raises_the_reward(tmp_path, tokenizer, smat_model):
    """Critic-free group-relative MRL raises the mean sampled reward (exact answer + unigram BLEU to it, so up to 2) of
    held-out recall episodes within a few dozen CPU steps, from the briefly SMAT-trained model."""
    held_out = recall_episodes(48, seed=7)
    args = mrl_arguments(tmp_path, max_steps=MRL_STEPS, curriculum=[3], per_device_train_batch_size=8,
                         num_generations=4, learning_rate=1e-3, temperature=0.7, max_completion_length=8,
                         reward_funcs=["exact_match", "bleu_to_reference"], bleu_max_n=1, beta=0.01, logging_steps=10)
    model = RxTForCausalLM(smat_model.config)
    model.load_state_dict(smat_model.state_dict())
    trainer = RxTMRLTrainer(model, args, train_dataset=recall_episodes(256, seed=1), processing_class=tokenizer)
    torch.manual_seed(0)
    before = trainer.evaluate_rewards(held_out, num_turns=3, do_sample=True, num_generations=8)
    trainer.train()
    torch.manual_seed(0)
    after = trainer.evaluate_rewards(held_out, num_turns=3, do_sample=True, num_generations=8)
    # measured: 0.67 -> 0.85 (SMAT seeds 1 and 2: 0.78 -> 1.03, 0.78 -> 0.92)
    assert after["reward"] >= before["reward"] + 0.1, (before, after)


def test_critic_value_loss_falls(tmp_path, tokenizer, smat_model):
    """PPO with a critic trains, and its value head learns: on fresh rollouts its value loss is well below the one it
    started from (the zero-initialised head, whose loss is half the returns' second moment). Monte-Carlo returns
    (lam=1) and no value clipping, so both losses are measured against the same targets."""
    args = mrl_arguments(tmp_path, max_steps=CRITIC_STEPS, curriculum=[3], per_device_train_batch_size=8,
                         num_generations=2, advantage_estimator="critic", learning_rate=5e-4, vf_learning_rate=1e-2,
                         lam=1.0, cliprange_value=None, temperature=0.7, max_completion_length=8,
                         reward_funcs=["exact_match", "bleu_to_reference"], bleu_max_n=1, logging_steps=5)
    model = RxTForCausalLM(smat_model.config)
    model.load_state_dict(smat_model.state_dict())
    trainer = RxTMRLTrainer(model, args, train_dataset=recall_episodes(CRITIC_STEPS * 8, seed=2),
                            processing_class=tokenizer)
    trainer.train()
    assert all("value_explained_variance" in h for h in trainer.state.log_history if "loss" in h)
    trainer.model.train()
    batch = trainer._rollout([dict(r) for r in trainer.train_dataset.select(range(32))])
    with torch.no_grad():
        learned = trainer.model(**batch)["value_loss"].item()
        torch.nn.init.zeros_(trainer.model.value_head.out.weight)
        torch.nn.init.zeros_(trainer.model.value_head.out.bias)
        start = trainer.model(**batch)["value_loss"].item()
    assert learned < 0.7 * start, (learned, start)


SMAT_STEPS, MRL_STEPS, CRITIC_STEPS = 80, 40, 20
