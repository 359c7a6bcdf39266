"""The Reactive Transformer curriculum's first stages: joint LM pre-training, interaction SFT and self-supervised
memory-attention pre-training (trainers, their data, the training model class, and the recipes chained through
saved checkpoints)."""

import json

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForPreTraining

from rat_hf.data import memory_recall_dataset
from rat_hf.data.interactions import interaction_text, turns
from rat_hf.models.rxt import RxTConfig, RxTForCausalLM, RxTForMaskedLM, RxTForPreTraining
from rat_hf.tokenization import reactive_config, train_bpe_tokenizer
from rat_hf.trainers._rxt_common import RXT_PARTS, part_of, record_turns
from rat_hf.trainers.rxt_memattn_config import RxTMemAttnConfig
from rat_hf.trainers.rxt_memattn_trainer import RxTMemAttnTrainer, memory_targets
from rat_hf.trainers.rxt_pretrain_config import RxTPretrainConfig
from rat_hf.trainers.rxt_pretrain_trainer import RxTJointCollator, RxTPretrainTrainer, add_mask_token
from rat_hf.trainers.rxt_sft_config import RxTSFTConfig
from rat_hf.trainers.rxt_sft_trainer import RxTSFTTrainer

SIZES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             num_query_heads=2, stm_size=8, max_position_embeddings=128)


@pytest.fixture(scope="module")
def conversations():
    return memory_recall_dataset(48, distance=2, seed=0)


@pytest.fixture(scope="module")
def tokenizer(conversations):
    texts = [interaction_text(q, a) for r in conversations for q, a in turns(r)]
    tok = train_bpe_tokenizer(texts, vocab_size=400)
    add_mask_token(tok)
    return tok


def new_model(tokenizer, seed: int = 0, **overrides) -> RxTForPreTraining:
    torch.manual_seed(seed)
    return RxTForPreTraining(reactive_config(tokenizer, **{**SIZES, **overrides}))


def arguments(config_class, tmp_path, **overrides):
    return config_class(**{**dict(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                                  learning_rate=3e-3, logging_steps=1, report_to="none", use_cpu=True,
                                  save_strategy="no", disable_tqdm=True, seed=0), **overrides})


def snapshot(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed_parts(model, before: dict) -> dict:
    """part -> (number of parameters that changed, number of parameters)."""
    counts = {}
    for name, param in model.named_parameters():
        part = part_of(name)
        moved, total = counts.get(part, (0, 0))
        counts[part] = (moved + (not torch.equal(before[name], param.detach())), total + 1)
    return counts


def assert_trained_exactly(model, before: dict, parts) -> None:
    for part, (moved, total) in changed_parts(model, before).items():
        if part in parts:
            assert moved == total, f"{part}: only {moved} of {total} parameters changed"
        else:
            assert moved == 0, f"{part} is frozen in this stage but {moved} parameters changed"


def assert_optimizer_lists_each_parameter_once(trainer, parts) -> None:
    listed = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    assert len({id(p) for p in listed}) == len(listed), "a parameter is listed twice in the optimizer"
    expected = {id(p) for n, p in trainer.model.named_parameters() if part_of(n) in parts}
    assert {id(p) for p in listed} == expected
    embedding = trainer.model.model.embed_tokens.weight
    assert sum(p is embedding for p in listed) == ("embeddings" in parts)  # tied to lm_head and the MLM head


# --- the training model ----------------------------------------------------------------------------------------------
def test_pretraining_model_saves_and_loads_as_every_rxt_class(tmp_path, tokenizer):
    model = new_model(tokenizer)
    with torch.no_grad():
        model.mlm_head.dense.weight.add_(1.0)  # something a fresh head would not have
    model.save_pretrained(tmp_path)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForCausalLM"] == "modeling_rxt.RxTForCausalLM"
    assert auto_map["AutoModelForMaskedLM"] == "modeling_rxt.RxTForMaskedLM"
    assert auto_map["AutoModelForPreTraining"] == "modeling_rxt.RxTForPreTraining"
    causal = AutoModelForCausalLM.from_pretrained(tmp_path)
    masked = AutoModelForMaskedLM.from_pretrained(tmp_path)
    again = AutoModelForPreTraining.from_pretrained(tmp_path)
    assert type(causal) is RxTForCausalLM and type(masked) is RxTForMaskedLM and type(again) is RxTForPreTraining
    torch.testing.assert_close(masked.mlm_head.dense.weight, model.mlm_head.dense.weight)
    torch.testing.assert_close(again.mlm_head.dense.weight, model.mlm_head.dense.weight)
    ids = torch.tensor([tokenizer(interaction_text("What is Hana's pet's name?"))["input_ids"]])
    with torch.no_grad():  # the same decoder in every class, the same encoder + head in both MLM classes
        torch.testing.assert_close(causal(ids).logits, model(ids).logits)
        mlm = model(encoder_input_ids=ids, mlm_labels=ids)
        torch.testing.assert_close(masked(ids, labels=ids).logits, mlm.mlm_logits)
        torch.testing.assert_close(masked(ids, labels=ids).loss, mlm.mlm_loss)
    assert model.mlm_head.decoder.weight is model.model.embed_tokens.weight is model.lm_head.weight


def test_one_forward_runs_the_reactive_step(tokenizer):
    """encoder -> memory attention -> decoder reading the new memory; joint mode reads the encoder's states."""
    model = new_model(tokenizer).eval()
    first = torch.tensor([tokenizer(interaction_text("Remember: Wen's lucky number is 7.", "Noted."))["input_ids"]])
    question = torch.tensor([tokenizer(interaction_text("What is Wen's lucky number?"))["input_ids"]])
    with torch.no_grad():
        step = model(question, encoder_input_ids=first, memory=model.init_memory(1))
        memory = model.update_memory(model.init_memory(1), first)
        torch.testing.assert_close(step.memory, memory)
        torch.testing.assert_close(step.logits, model(question, memory=memory).logits)
        joint = model(question, encoder_input_ids=first, memory_from_encoder=True)
        states = model.model.encoder_states_as_memory(model.encode(first))
        torch.testing.assert_close(joint.logits, model(question, memory=states,
                                                       memory_attention_mask=torch.ones(1, first.shape[1])).logits)
        assert joint.memory is None
    with pytest.raises(ValueError, match="not both"):
        model(question, encoder_input_ids=first, memory=memory, memory_from_encoder=True)


def test_memory_attention_mask_hides_padded_slots(tokenizer):
    model = new_model(tokenizer).eval()
    memory = torch.randn(1, 2, 5, 32)
    mask = torch.tensor([[1, 1, 1, 0, 0]])
    padded = memory.clone()
    padded[:, :, 3:] = 100.0  # what the padded slots hold must not matter
    ids = torch.tensor([[3, 20, 30, 4]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids, memory=memory, memory_attention_mask=mask).logits,
                                   model(ids, memory=padded, memory_attention_mask=mask).logits)
        torch.testing.assert_close(model(ids, memory=memory, memory_attention_mask=mask).logits,
                                   model(ids, memory=memory[:, :, :3], memory_attention_mask=mask[:, :3]).logits)
    with pytest.raises(ValueError, match="stm_size"):  # another slot count without a mask: a mistake, not a memory
        model(ids, memory=memory)


# --- stage 1: joint LM pre-training ----------------------------------------------------------------------------------
def test_joint_collator_never_trains_pads_and_masks_only_real_tokens(tokenizer):
    torch.manual_seed(0)
    collator = RxTJointCollator(tokenizer, mlm_probability=0.5)
    rows = [{"input_ids": list(range(10, 30))}, {"input_ids": [3, 40, 41, 42, 4, 43, 2]}]
    batch = collator(rows)
    pad = batch["attention_mask"] == 0
    assert pad[1, 7:].all() and not pad[0].any()
    assert (batch["labels"][pad] == -100).all() and (batch["mlm_labels"][pad] == -100).all()
    assert (batch["labels"][~pad] == batch["input_ids"][~pad]).all()  # every real token, EOS included, is a target
    special = torch.isin(batch["input_ids"], torch.tensor(tokenizer.all_special_ids))
    assert (batch["mlm_labels"][special] == -100).all()
    scored = batch["mlm_labels"] != -100
    assert scored.sum() > 0 and (batch["mlm_labels"][scored] == batch["input_ids"][scored]).all()
    assert (batch["encoder_input_ids"][~scored] == batch["input_ids"][~scored]).all()
    assert (batch["encoder_input_ids"][scored] == tokenizer.mask_token_id).float().mean() > 0.5


def test_pretrain_trains_encoder_decoder_and_head_not_the_memory_attention(tmp_path, tokenizer, conversations):
    texts = Dataset.from_dict({"text": [interaction_text(q, a) for r in conversations for q, a in turns(r)]})
    model = new_model(tokenizer)
    args = arguments(RxTPretrainConfig, tmp_path, memory_noise_std=0.1, gradient_checkpointing=True)
    trainer = RxTPretrainTrainer(model=model, args=args, train_dataset=texts, processing_class=tokenizer,
                                 eval_dataset=texts.select(range(8)))
    before = snapshot(model)
    trainer.train()
    assert 0 < trainer.evaluate()["eval_loss"] < 20
    parts = ["embeddings", "encoder", "decoder", "mlm_head"]
    assert_trained_exactly(model, before, parts)
    assert_optimizer_lists_each_parameter_once(trainer, parts)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert all({"lm_loss", "mlm_loss"} <= set(h) for h in logs)
    assert logs[0]["loss"] == pytest.approx(logs[0]["lm_loss"] + logs[0]["mlm_loss"], rel=1e-4)


def test_the_decoder_memory_is_detached_and_a_part_without_gradient_stops_training(tmp_path, tokenizer, conversations):
    """With the MLM weight at 0 the encoder gets no gradient (the decoder reads its states detached): the trainer
    refuses instead of training on without it."""
    texts = Dataset.from_dict({"text": [interaction_text(r["query"], r["answer"]) for r in conversations]})
    args = arguments(RxTPretrainConfig, tmp_path, mlm_weight=0.0)
    trainer = RxTPretrainTrainer(model=new_model(tokenizer), args=args, train_dataset=texts, processing_class=tokenizer)
    with pytest.raises(RuntimeError, match="encoder, mlm_head received no gradient"):
        trainer.train()


def test_the_decoder_reads_the_encoder_in_joint_training(tokenizer):
    """The cross-attention is trained by the joint step: its gradient is non-zero and the logits depend on the
    encoder's input (a stateless fall-back would give neither)."""
    model = new_model(tokenizer)
    batch = RxTJointCollator(tokenizer)([{"input_ids": tokenizer(interaction_text(q, a))["input_ids"]}
                                         for q, a in [("Hi there", "Hello!"), ("What is 2 plus 3?", "5")]])
    out = model(**batch, memory_from_encoder=True)
    out.lm_loss.backward()
    assert model.model.layers[1].cross_attn.q_proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.model.encoder.parameters())  # the decoder's reading is detached
    other = dict(batch, encoder_input_ids=batch["encoder_input_ids"].flip(0),
                 encoder_attention_mask=batch["encoder_attention_mask"].flip(0))
    with torch.no_grad():
        assert not torch.allclose(model(**other, memory_from_encoder=True).logits, out.logits)


def test_joint_loss_adds_the_moe_load_balancing_loss(tokenizer):
    model = new_model(tokenizer, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    batch = RxTJointCollator(tokenizer)([{"input_ids": tokenizer(interaction_text("Hi there", "Hello!"))["input_ids"]}])
    out = model(**batch, memory_from_encoder=True)
    assert out.aux_loss is not None and out.lm_loss is not None and out.mlm_loss is not None
    torch.testing.assert_close(out.loss, out.lm_loss + out.mlm_loss + model.config.router_aux_loss_coef * out.aux_loss)


# --- stage 2: interaction SFT ----------------------------------------------------------------------------------------
def test_sft_labels_are_the_answer_and_its_eos(tmp_path, tokenizer, conversations):
    args = arguments(RxTSFTConfig, tmp_path)
    trainer = RxTSFTTrainer(model=new_model(tokenizer), args=args, train_dataset=conversations.select(range(2)),
                            processing_class=tokenizer)
    assert len(trainer.train_dataset) == 2 * 4  # fact + 2 distractors + question, one example each
    row = trainer.train_dataset[3]  # the question of the first conversation
    scored = [t for t, label in zip(row["input_ids"], row["labels"]) if label != -100]
    answer = record_turns(conversations[0])[-1][1]
    assert scored == tokenizer(" " + answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    assert (batch["labels"] == tokenizer.eos_token_id).sum() == 4  # every EOS is a target


def test_sft_trains_and_its_loss_falls(tmp_path, tokenizer, conversations):
    model = new_model(tokenizer)
    chat = Dataset.from_list([{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                                            {"role": "user", "content": "How are you?"},
                                            {"role": "assistant", "content": "Fine."}]}] * 8)
    data = Dataset.from_list([{"query": q, "answer": a} for r in conversations for q, a in turns(r)][:96])
    args = arguments(RxTSFTConfig, tmp_path, max_steps=30, per_device_train_batch_size=8, logging_steps=5,
                     memory_noise_std=0.0)
    trainer = RxTSFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    assert len(RxTSFTTrainer(model=new_model(tokenizer), args=args, train_dataset=chat,
                             processing_class=tokenizer).train_dataset) == 16  # chat records: one row per reply
    before = snapshot(model)
    trainer.train()
    assert_trained_exactly(model, before, ["embeddings", "encoder", "decoder", "mlm_head"])
    logs = [h for h in trainer.state.log_history if "lm_loss" in h]
    assert logs[-1]["lm_loss"] < 0.85 * logs[0]["lm_loss"], logs  # 5.7 -> 4.3 measured


# --- stage 3: memory-attention pre-training --------------------------------------------------------------------------
@pytest.mark.parametrize("slots, tokens", [(8, 5), (3, 11), (6, 6)])
def test_memory_targets_work_for_any_slot_count(slots, tokens):
    torch.manual_seed(0)
    old, states = torch.randn(2, 3, slots, 16), torch.randn(2, 3, tokens, 16)
    mask = torch.ones(2, tokens, dtype=torch.bool)
    mask[1, tokens - 2:] = False
    rms = lambda x: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)  # noqa: E731
    target = memory_targets(old, states, mask, 0.9)
    assert target.shape == old.shape
    torch.testing.assert_close(memory_targets(old, states, mask, 0.0), rms(old))
    pooled = memory_targets(old, states, mask, 1.0)
    assert not torch.allclose(pooled[:, :, 0], pooled[:, :, 1])  # each slot reads the interaction its own way
    mean = memory_targets(old, states, mask, 1.0, pooling="mean")
    torch.testing.assert_close(mean[:, :, 0], mean[:, :, -1])
    torch.testing.assert_close(mean[0, :, 0], rms(rms(states[0]).mean(1)))  # the mean of the normalised tokens
    leaked = states.clone()
    leaked[1, :, tokens - 2:] = 1e3  # padding never reaches a target
    torch.testing.assert_close(memory_targets(old, leaked, mask, 0.9), target)
    torch.testing.assert_close((target - 0.1 * rms(old)) / 0.9, pooled)


def test_new_data_weight_schedule():
    args = RxTMemAttnConfig(output_dir="unused", report_to="none")
    assert [round(args.new_data_weight(k), 3) for k in (1, 2, 3, 4, 12)] == [0.9, 0.5, 0.45, 0.4, 0.05]
    with pytest.raises(ValueError, match="new_data_weight_first"):
        RxTMemAttnConfig(output_dir="unused", report_to="none", new_data_weight_first=1.5)


def test_memattn_trains_only_the_memory_attention_and_approaches_its_targets(tmp_path, tokenizer, conversations):
    model = new_model(tokenizer)
    args = arguments(RxTMemAttnConfig, tmp_path, max_steps=24, per_device_train_batch_size=8, logging_steps=4,
                     max_turns=4)
    trainer = RxTMemAttnTrainer(model=model, args=args, train_dataset=conversations, processing_class=tokenizer,
                                eval_dataset=conversations.select(range(8)))
    before = snapshot(model)
    trainer.train()
    assert -1.0 <= trainer.evaluate()["eval_loss"] < 0  # evaluation is the stage's loss, a negative cosine
    assert_trained_exactly(model, before, ["memory_attention"])
    assert_optimizer_lists_each_parameter_once(trainer, ["memory_attention"])
    logs = [h for h in trainer.state.log_history if "cosine" in h]
    assert logs[0]["turns"] == 4
    # learning is shown: the distance to the targets shrinks (measured: cosine 0.825 -> 0.908)
    assert 1 - logs[-1]["cosine"] < 0.75 * (1 - logs[0]["cosine"]), logs


@pytest.mark.parametrize("reentrant", [False, True])
def test_memattn_trains_with_gradient_checkpointing(tmp_path, tokenizer, conversations, reentrant):
    model = new_model(tokenizer)
    args = arguments(RxTMemAttnConfig, tmp_path, max_steps=2, gradient_checkpointing=True,
                     gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    trainer = RxTMemAttnTrainer(model=model, args=args, train_dataset=conversations, processing_class=tokenizer)
    before = snapshot(model)
    trainer.train()
    assert_trained_exactly(model, before, ["memory_attention"])


def test_memattn_refuses_a_part_its_loss_never_reaches(tmp_path, tokenizer, conversations):
    args = arguments(RxTMemAttnConfig, tmp_path, trained_parts=["memory_attention", "decoder"])
    trainer = RxTMemAttnTrainer(model=new_model(tokenizer), args=args, train_dataset=conversations,
                                processing_class=tokenizer)
    with pytest.raises(RuntimeError, match="decoder received no gradient"):
        trainer.train()


def test_trainers_refuse_a_model_without_the_training_heads(tmp_path, tokenizer, conversations):
    causal = RxTForCausalLM(RxTConfig(**{**SIZES, "vocab_size": len(tokenizer)}))
    with pytest.raises(ValueError, match="must be an RxTForPreTraining"):
        RxTMemAttnTrainer(model=causal, args=arguments(RxTMemAttnConfig, tmp_path), train_dataset=conversations,
                          processing_class=tokenizer)
    with pytest.raises(ValueError, match="trained_parts"):
        RxTMemAttnTrainer(model=new_model(tokenizer), args=arguments(RxTMemAttnConfig, tmp_path, trained_parts=["gate"]),
                          train_dataset=conversations, processing_class=tokenizer)
    assert set(RXT_PARTS) == {"embeddings", "decoder", "encoder", "memory_attention", "memory_init", "mlm_head"}


# --- bf16 ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["autocast", "bf16 weights"])
def test_memory_stages_run_in_bf16(tokenizer, conversations, how):
    model = new_model(tokenizer)
    if how == "bf16 weights":
        model = model.to(torch.bfloat16)
    pair = [tokenizer(interaction_text(q, a))["input_ids"] for q, a in turns(conversations[0])[:2]]
    batch = RxTJointCollator(tokenizer)([{"input_ids": ids} for ids in pair])
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=how == "autocast"):
        joint = model(**batch, memory_from_encoder=True, memory_noise_std=0.1)
        step = model(encoder_input_ids=batch["input_ids"], encoder_attention_mask=batch["attention_mask"],
                     memory=model.init_memory(2))
        states = model.model.encoder_states_as_memory(step.encoder_hidden_states)
        target = memory_targets(model.init_memory(2), states, step.encoder_attention_mask, 0.9)
        cosine = torch.nn.functional.cosine_similarity(step.memory.float(), target, dim=-1).mean()
        decoded = model(batch["input_ids"], memory=step.memory, labels=batch["labels"])
    (joint.loss + decoded.loss - cosine).backward()
    assert torch.isfinite(joint.loss) and torch.isfinite(cosine) and torch.isfinite(decoded.loss)
    assert model.model.memory_attention.layers[0].attn.q_proj.weight.grad is not None


# --- recipes, chained through saved checkpoints ----------------------------------------------------------------------
def test_offline_conversations_mix_dialogs_and_memory_recall():
    from rat_hf.trainers._rxt_common import offline_conversations

    data = offline_conversations(recall_conversations=6, recall_distances=(1, 2), seed=0)
    recall = [r for r in data if r["query"].startswith("Please remember this")]
    assert sorted(len(r["interactions"]) for r in recall) == [2, 2, 2, 3, 3, 3]  # distance + the question
    dialogs = [r for r in data if not r["query"].startswith("Please remember this")]
    assert len(dialogs) > 100 and all(record_turns(r) for r in dialogs)


def test_recipes_chain_through_saved_checkpoints(tmp_path, conversations):
    import runpy
    from pathlib import Path

    recipes = Path(__file__).resolve().parents[1] / "recipes"
    data = tmp_path / "conversations.jsonl"  # a local file of conversation records (`--dataset offline` is the default)
    conversations.select_columns(["query", "answer", "interactions"]).to_json(str(data))
    quick = ["--max_steps", "3", "--logging_steps", "1", "--dataset", str(data), "--disable_tqdm", "true"]
    previous = None
    for stage in ("pretrain", "sft", "memattn"):
        out = tmp_path / stage
        argv = ["--config", str(recipes / "configs" / f"rxt_{stage}_tiny.yaml"), "--output_dir", str(out), *quick]
        if previous is not None:
            argv += ["--model_name_or_path", str(previous)]
        module = runpy.run_path(str(recipes / f"rxt_{stage}.py"), run_name=f"rxt_{stage}")
        metrics = module["main"](argv)
        assert metrics["train_loss"] == metrics["train_loss"]  # finite, a number
        for name in ("config.json", "model.safetensors", "tokenizer.json", "README.md", "training.png",
                     "modeling_rxt.py"):
            assert (out / name).exists(), f"{stage}: {name} missing"
        previous = out
    model = AutoModelForCausalLM.from_pretrained(previous)
    assert isinstance(model, RxTForCausalLM)


# --- DDP -------------------------------------------------------------------------------------------------------------
DDP_SCRIPT = '''
import sys
import torch
from rat_hf.data import memory_recall_dataset
from rat_hf.data.interactions import interaction_text, turns
from rat_hf.models.rxt import RxTForPreTraining
from rat_hf.tokenization import reactive_config, train_bpe_tokenizer
from rat_hf.trainers.rxt_memattn_config import RxTMemAttnConfig
from rat_hf.trainers.rxt_memattn_trainer import RxTMemAttnTrainer
from rat_hf.trainers.rxt_sft_config import RxTSFTConfig
from rat_hf.trainers.rxt_sft_trainer import RxTSFTTrainer
from rat_hf.trainers.rxt_pretrain_trainer import add_mask_token

data = memory_recall_dataset(16, distance=2, seed=0)
tokenizer = train_bpe_tokenizer([interaction_text(q, a) for r in data for q, a in turns(r)], vocab_size=400)
add_mask_token(tokenizer)
torch.manual_seed(0)
model = RxTForPreTraining(reactive_config(tokenizer, **SIZES))
common = dict(output_dir=sys.argv[1], max_steps=2, per_device_train_batch_size=2, gradient_checkpointing=True,
              report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
for trainer_class, config_class in ((RxTSFTTrainer, RxTSFTConfig), (RxTMemAttnTrainer, RxTMemAttnConfig)):
    trainer = trainer_class(model=model, args=config_class(**common), train_dataset=data, processing_class=tokenizer)
    before = [p.detach().clone() for p in model.parameters()]
    trainer.train()
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = trainer.accelerator.gather(flat[None])
    assert torch.equal(gathered[0], gathered[1]), f"{trainer_class.__name__}: the two ranks' weights differ"
sys.stdout.write("DDP_OK\\n")
sys.stdout.flush()
'''


def test_stages_train_under_ddp_with_gradient_checkpointing(tmp_path):
    """Two processes (gloo on CPU): the joint step (one forward) and the memory-attention step (a forward per
    interaction) end with the same weights on both ranks, so every part they train was synchronised."""
    import os
    import socket
    import subprocess
    import sys

    script = tmp_path / "ddp_stages.py"
    script.write_text(f"SIZES = {SIZES!r}\n" + DDP_SCRIPT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
           str(script), str(tmp_path / "out")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("DDP_OK") == 2, result.stdout[-2000:]
