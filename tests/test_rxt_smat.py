"""Stage 4 of the RxT curriculum, supervised memory-aware training (SMAT): its data (answer + EOS targets only, never
a pad), the episode forward (memory threaded through the turns, truncated BPTT), every part training and the memory
parts reached (a stateless fallback is refused), gradual unfreezing, bf16, gradient checkpointing, saving and exact
resuming, recall learned at distance 1-2, and the recipes of stages 4 and 5 chained through saved checkpoints."""

import importlib.util
import json
import pathlib
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, TrainerCallback

from rat_hf.data import load_interactions, memory_recall_dataset
from rat_hf.data.interactions import interaction_text, turns
from rat_hf.models.rxt import RxTForCausalLM, RxTForPreTraining
from rat_hf.tokenization import reactive_config, train_bpe_tokenizer
from rat_hf.trainers.rxt_smat_config import COMPONENTS, RxTSMATConfig
from rat_hf.trainers.rxt_smat_trainer import (
    RxTEpisodeCollator,
    RxTSMATModule,
    RxTSMATTrainer,
    component_of,
    recall_accuracy,
    tokenize_episode,
)

SIZES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, stm_size=4,
             max_position_embeddings=64)
COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def color_recall(n: int, distances, seed: int, strategy: str | None = None):
    """The tiny recall task: turn 0 names a color, `d` arithmetic turns follow, then the question asks for it
    (chance: 1/8). Short turns, so a 32-wide model learns to recall within a few hundred CPU steps."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        color, distance = rng.choice(COLORS), rng.choice(list(distances))
        follow = []
        for _ in range(distance):
            a, b = rng.randint(1, 4), rng.randint(1, 4)
            follow.append({"query": f"{a} plus {b}?", "answer": str(a + b)})
        follow.append({"query": "Color?", "answer": color})
        rows.append({"query": color, "answer": "OK.", "interactions": follow,
                     **({"strategy": strategy} if strategy else {})})
    return load_interactions(rows) if strategy is None else __import__("datasets").Dataset.from_list(rows)


def recall_tokenizer():
    """A small byte-level BPE over the task and the offline recall data of the recipes. Its merges go to the longer
    recall sentences, so the colors stay split into 2-6 pieces: the fact fills half of its turn's tokens, which is what
    lets a fresh memory pick it up within a few dozen steps (one token among seven is learned far more slowly)."""
    texts = sorted({interaction_text(q, a) for r in color_recall(400, [0, 1, 2], seed=0) for q, a in turns(r)})
    texts += [interaction_text(q, a) for r in memory_recall_dataset(40, 1, seed=0) for q, a in turns(r)]
    return train_bpe_tokenizer(texts * 3, vocab_size=400)


@pytest.fixture(scope="module")
def tokenizer():
    return recall_tokenizer()


def new_model(tokenizer, seed: int = 0, model_class=RxTForCausalLM, **overrides):
    torch.manual_seed(seed)
    return model_class(reactive_config(tokenizer, **{**SIZES, **overrides}))


def arguments(tmp_path, **overrides) -> RxTSMATConfig:
    return RxTSMATConfig(**{**dict(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=8,
                                   learning_rate=1e-2, logging_steps=1, report_to="none", use_cpu=True,
                                   save_strategy="no", disable_tqdm=True, seed=0), **overrides})


def snapshot(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed(model, before) -> dict:
    """component -> whether any of its parameters changed."""
    out = {}
    for name, p in model.named_parameters():
        part = component_of(name)
        out[part] = out.get(part, False) or not torch.equal(p, before[name])
    return out


# --- data ------------------------------------------------------------------------------------------------------------
def test_targets_are_the_answer_and_its_eos_never_the_query_or_a_pad(tokenizer):
    records = list(color_recall(6, [0, 2], seed=1))
    features = [tokenize_episode(tokenizer, r, max_turns=8, max_length=64) for r in records]
    batch = RxTEpisodeCollator(tokenizer.pad_token_id)(features)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == mask.shape == labels.shape and ids.shape[1] == 4  # the longest episode: fact, 2 sums, question
    eos, answer = tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("[A]")
    for b, record in enumerate(records):
        for k, (query, reply) in enumerate(turns(record)):
            row, lab = ids[b, k][mask[b, k].bool()], labels[b, k]
            start = int((row == answer).nonzero()[0]) + 1  # the answer starts after [A]
            assert lab[:start].eq(-100).all()  # the query is never a target
            assert lab[start:len(row)].tolist() == row[start:].tolist() and row[-1] == eos  # answer + EOS
            assert tokenizer.decode(row[start:-1]).strip() == reply
            assert lab[len(row):].eq(-100).all()  # padding never is
        assert mask[b, len(turns(record)):].eq(0).all()  # missing turns are all padding


# --- the episode forward ---------------------------------------------------------------------------------------------
def test_every_part_trains_and_the_memory_parts_are_reached(tmp_path, tokenizer):
    model = new_model(tokenizer)
    before = snapshot(model)
    trainer = RxTSMATTrainer(model, arguments(tmp_path), train_dataset=color_recall(32, [1, 2], seed=0),
                             processing_class=tokenizer)
    trainer.train()
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    assert unchanged == []
    in_optimizer = [id(p) for group in trainer.optimizer.param_groups for p in group["params"]]
    assert len(in_optimizer) == len(set(in_optimizer)) == len(list(model.parameters()))  # the tied embedding once
    logged = trainer.state.log_history[0]
    assert {"loss/turn_0", "loss/turns_1+", "target_tokens"} <= set(logged)


def test_a_memory_part_left_out_of_the_loss_is_refused(tmp_path, tokenizer, monkeypatch):
    """A memory chain cut off from the graph (what a stateless fallback looks like) stops the first step."""
    original = RxTSMATModule.memory_chain
    monkeypatch.setattr(RxTSMATModule, "memory_chain",
                        lambda self, *a, **k: [m.detach() for m in original(self, *a, **k)])
    trainer = RxTSMATTrainer(new_model(tokenizer), arguments(tmp_path), train_dataset=color_recall(16, [1], seed=0),
                             processing_class=tokenizer)
    with pytest.raises(RuntimeError, match="encoder, memory_attention got no gradient"):
        trainer.train()


def test_bptt_turns_truncates_the_gradient_through_memory_updates(tokenizer):
    """M_j is detached every `bptt_turns` updates: the initial memory gets a gradient from M_2 with bptt 2, not 1."""
    model = new_model(tokenizer)
    batch = RxTEpisodeCollator(tokenizer.pad_token_id)(
        [tokenize_episode(tokenizer, r, 8, 64) for r in color_recall(4, [2], seed=0)])
    for bptt, reaches in ((1, False), (2, True), (None, True)):
        model.zero_grad()
        memories = RxTSMATModule(model, bptt, True).memory_chain(batch["input_ids"], batch["attention_mask"], bptt, 3)
        memories[2].sum().backward()
        grad = model.model.memory_init.grad
        assert (grad is not None and grad.abs().sum() > 0) == reaches, bptt
        model.zero_grad()
        memories = RxTSMATModule(model, bptt, True).memory_chain(batch["input_ids"], batch["attention_mask"], bptt, 3)
        memories[3].sum().backward()  # the third update reads M_2: detached with bptt 2, not with None
        grad = model.model.memory_attention.layers[0].attn.q_proj.weight.grad
        assert grad is not None and grad.abs().sum() > 0
    with pytest.raises(ValueError, match="bptt_turns"):
        arguments("unused", bptt_turns=0)


class _Snapshots(TrainerCallback):
    def __init__(self, model):
        self.model, self.by_step = model, {}

    def on_step_end(self, args, state, control, **kwargs):
        self.by_step[state.global_step] = snapshot(self.model)


def test_gradual_unfreezing_trains_each_part_from_its_step(tmp_path, tokenizer):
    model = new_model(tokenizer)
    before = snapshot(model)
    schedule = {"decoder": 2, "encoder": 1, "embeddings": None}
    snapshots = _Snapshots(model)
    trainer = RxTSMATTrainer(model, arguments(tmp_path, unfreeze_schedule=json.dumps(schedule)),
                             train_dataset=color_recall(32, [1, 2], seed=0), processing_class=tokenizer,
                             callbacks=[snapshots])
    trainer.train()
    after_3 = changed(model, before)
    after_1 = {part: any(not torch.equal(snapshots.by_step[1][n], before[n]) for n, _ in model.named_parameters()
                         if component_of(n) == part) for part in after_3}
    # step 1 (global step 0): the memory parts and the cross-attention train; the decoder and encoder wait
    assert after_1 == {"embeddings": False, "decoder": False, "cross_attention": True, "encoder": False,
                       "memory_attention": True, "memory_init": True}
    assert after_3 == {**after_1, "decoder": True, "encoder": True}  # from steps 2 and 1; embeddings never
    with pytest.raises(ValueError, match="unknown component 'embedding'"):
        arguments(tmp_path, unfreeze_schedule='{"embedding": 3}')
    with pytest.raises(ValueError, match="not valid JSON"):
        arguments(tmp_path, unfreeze_schedule="{decoder: 3}")
    assert set(COMPONENTS) >= set(after_3)


@pytest.mark.parametrize("how", ["bf16 weights", "bf16 autocast"])
def test_runs_in_bf16(tmp_path, tokenizer, how):
    model = new_model(tokenizer)
    overrides = {"bf16": True} if how == "bf16 autocast" else {}
    if how == "bf16 weights":
        model = model.to(torch.bfloat16)
    before = snapshot(model)
    trainer = RxTSMATTrainer(model, arguments(tmp_path, max_steps=2, **overrides),
                             train_dataset=color_recall(16, [1, 2], seed=0), processing_class=tokenizer)
    loss = trainer.train().training_loss
    assert torch.isfinite(torch.tensor(loss)) and all(changed(model, before).values())


def test_gradient_checkpointing_gives_the_same_gradients(tokenizer):
    batch = RxTEpisodeCollator(tokenizer.pad_token_id)(
        [tokenize_episode(tokenizer, r, 8, 64) for r in color_recall(4, [1, 2], seed=0)])
    grads = []
    for checkpointing in (False, True):
        model = new_model(tokenizer).train()
        if checkpointing and hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.24
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        elif checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        RxTSMATModule(model, None, True)(**batch)["loss"].backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-4, msg=name)


def test_saves_the_rxt_and_resumes_exactly(tmp_path, tokenizer):
    data = color_recall(48, [0, 1, 2], seed=0)
    straight = new_model(tokenizer, model_class=RxTForPreTraining)
    RxTSMATTrainer(straight, arguments(tmp_path / "a", max_steps=4), train_dataset=data,
                   processing_class=tokenizer).train()
    first = new_model(tokenizer, model_class=RxTForPreTraining)
    args = arguments(tmp_path / "b", max_steps=4, save_strategy="steps", save_steps=2)
    trainer = RxTSMATTrainer(first, args, train_dataset=data, processing_class=tokenizer)
    trainer.train()
    checkpoint = tmp_path / "b" / "checkpoint-2"
    loaded = AutoModelForCausalLM.from_pretrained(checkpoint)  # the RxT itself, not the episode module
    assert type(loaded).__name__ == "RxTForCausalLM"
    resumed = new_model(tokenizer, seed=1, model_class=RxTForPreTraining)
    RxTSMATTrainer(resumed, args, train_dataset=data, processing_class=tokenizer).train(
        resume_from_checkpoint=str(checkpoint))
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


def test_group_by_length_batches_episodes_of_one_turn_count(tmp_path, tokenizer):
    """`train_sampling_strategy="group_by_length"`: the trainer adds the turns-per-episode column, and a batch's K (the
    longest episode, what a step pays for) is every member's, instead of each batch padding to the longest distance."""
    data = color_recall(64, [0, 4], seed=3)  # episodes of 2 and 6 turns, mixed
    grouped = RxTSMATTrainer(new_model(tokenizer), arguments(tmp_path / "g", train_sampling_strategy="group_by_length",
                                                             per_device_train_batch_size=4),
                             train_dataset=data, processing_class=tokenizer)
    assert grouped.train_dataset["length"] == [len(t) for t in grouped.train_dataset["turn_input_ids"]]
    turns_per_row = [b["attention_mask"].any(-1).sum(-1).tolist() for b in grouped.get_train_dataloader()]
    assert sorted(n for rows in turns_per_row for n in rows) == sorted(grouped.train_dataset["length"])
    # Trainer's sampler sorts within 4 mega-batches of 16 episodes: of 16 batches, at most one per mega-batch mixes
    assert len(turns_per_row) == 16 and sum(len(set(rows)) > 1 for rows in turns_per_row) <= 4
    mixed = RxTSMATTrainer(new_model(tokenizer), arguments(tmp_path / "m", per_device_train_batch_size=4),
                           train_dataset=data, processing_class=tokenizer)
    assert "length" not in mixed.train_dataset.column_names
    paid = {name: sum(b["input_ids"].shape[1] for b in t.get_train_dataloader())  # turns run, padding included
            for name, t in (("grouped", grouped), ("mixed", mixed))}
    assert paid["grouped"] < paid["mixed"] - 10, paid


def test_max_train_seconds_stops_training_and_the_steps_are_saved(tmp_path, tokenizer):
    import time

    from transformers import TrainerCallback

    class Slow(TrainerCallback):  # every step takes >= 0.3 s, so a 0.5 s limit ends training after step 2
        def on_step_end(self, args, state, control, **kwargs):
            time.sleep(0.3)

    with pytest.raises(ValueError, match="max_train_seconds"):
        arguments(tmp_path, max_train_seconds=0)
    trainer = RxTSMATTrainer(new_model(tokenizer), arguments(tmp_path, max_steps=50, max_train_seconds=0.5),
                             train_dataset=color_recall(64, [1], seed=0), processing_class=tokenizer,
                             callbacks=[Slow()])
    trainer.train()
    assert trainer.state.global_step == 2
    trainer.save_model(str(tmp_path / "final"))
    saved = json.loads((tmp_path / "final" / "trainer_state.json").read_text())
    assert saved["global_step"] == 2 and any("loss" in h for h in saved["log_history"])


def test_trains_a_lora_adapter_on_every_part_and_resumes_it(tmp_path, tokenizer):
    """PEFT's default LoRA targets for `rxt` reach the encoder and the memory attention too; every adapter weight
    trains, and a checkpoint (the adapter) resumes into a fresh PEFT model."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(new_model(tokenizer), LoraConfig(task_type="CAUSAL_LM", r=4))
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert {component_of(n) for n in trainable} >= {"encoder", "memory_attention", "cross_attention", "decoder"}
    args = arguments(tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
    data = color_recall(16, [1, 2], seed=0)
    RxTSMATTrainer(model, args, train_dataset=data, processing_class=tokenizer).train()
    assert [n for n, p in model.named_parameters() if p.requires_grad and torch.equal(p, trainable[n])] == []
    resumed = get_peft_model(new_model(tokenizer, seed=1), LoraConfig(task_type="CAUSAL_LM", r=4))
    trainer = RxTSMATTrainer(resumed, args, train_dataset=data, processing_class=tokenizer)
    trainer._load_from_checkpoint(str(tmp_path / "checkpoint-2"))
    for (name, a), b in zip(model.named_parameters(), resumed.parameters()):
        assert not a.requires_grad or torch.equal(a, b), name


# --- learning --------------------------------------------------------------------------------------------------------
def test_smat_learns_to_recall_at_distance_one_and_two(tmp_path, tokenizer):
    """From a fresh tiny RxT (no recall), SMAT on episodes with 0-2 distractor turns makes the answer come from the
    memory: greedy exact-answer recall at distances 1 and 2 well above chance (1/8) and above the same model with its
    memory reset every turn (the no-memory control)."""
    model = new_model(tokenizer, seed=0)
    held_out = {d: list(color_recall(48, [d], seed=100 + d)) for d in (1, 2)}
    start = {d: recall_accuracy(model, tokenizer, r) for d, r in held_out.items()}
    args = arguments(tmp_path, max_steps=STEPS, per_device_train_batch_size=32, learning_rate=3e-3, logging_steps=50,
                     lr_scheduler_type="constant")
    RxTSMATTrainer(model, args, train_dataset=color_recall(640, [0, 1, 2], seed=7), processing_class=tokenizer).train()
    end = {d: recall_accuracy(model, tokenizer, r) for d, r in held_out.items()}
    reset = {d: recall_accuracy(model, tokenizer, r, memory_reset=True) for d, r in held_out.items()}
    for d in held_out:  # measured: 0 -> 0.96 / 0.94 (no memory: 0.04 / 0.08)
        assert end[d] >= start[d] + 0.35 and end[d] >= 0.5 and end[d] >= reset[d] + 0.3, (d, start, end, reset)


STEPS = 100


# --- the recipes, chained through saved checkpoints -------------------------------------------------------------------
def test_recipes_chain_smat_then_mrl(tmp_path, tokenizer):
    root = pathlib.Path(__file__).resolve().parents[1]

    def recipe(name):
        spec = importlib.util.spec_from_file_location(name, root / "recipes" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    start = tmp_path / "start"
    new_model(tokenizer, model_class=RxTForPreTraining).save_pretrained(start)
    tokenizer.save_pretrained(start)
    recipe("rxt_smat").main(["--config", str(root / "recipes/configs/rxt_smat_tiny.yaml"), "--model_name_or_path",
                             str(start), "--output_dir", str(tmp_path / "smat"), "--max_steps", "2",
                             "--logging_steps", "1"])
    metrics = recipe("rxt_mrl").main(["--config", str(root / "recipes/configs/rxt_mrl_tiny.yaml"),
                                      "--model_name_or_path", str(tmp_path / "smat"), "--output_dir",
                                      str(tmp_path / "mrl")])
    for name in ("model.safetensors", "README.md", "rewards.png", "training.png", "mrl.json", "tokenizer.json"):
        assert (tmp_path / "mrl" / name).is_file(), name
    assert (tmp_path / "smat" / "recall.json").is_file() and (tmp_path / "smat" / "training.png").is_file()
    logged = json.loads((tmp_path / "mrl" / "mrl.json").read_text())["log_history"]
    assert {h["curriculum_turns"] for h in logged if "curriculum_turns" in h} == {2, 3}
    assert "reward_3_turns" in metrics and any("eval_reward" in h for h in logged)
    assert RxTForCausalLM.from_pretrained(tmp_path / "mrl").config.model_type == "rxt"
