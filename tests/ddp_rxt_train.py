"""Run by tests/test_ddp.py under `accelerate launch --multi_gpu --num_processes 2` (gloo on CPU): a few LM-only
steps of a tiny Reactive Transformer with gradient checkpointing; both ranks must end with the same weights.
argv: output_dir, trainer (plain|rat), reentrant (0|1), moe (0|1)."""

import sys

import torch
from transformers import Trainer, TrainingArguments

from rat_hf import RxTConfig, RxTForCausalLM
from rat_hf.trainers import RatTrainer

output_dir, trainer_name, reentrant, moe = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4] == "1"
torch.manual_seed(0)
experts = dict(num_experts=4, num_experts_per_tok=1, moe_intermediate_size=32) if moe else {}
model = RxTForCausalLM(RxTConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=64, stm_size=8, **experts))
rows = torch.randint(3, 97, (16, 12), generator=torch.Generator().manual_seed(0))
args = TrainingArguments(output_dir=output_dir, max_steps=3, per_device_train_batch_size=2, gradient_checkpointing=True,
                         gradient_checkpointing_kwargs={"use_reentrant": reentrant}, report_to=[], use_cpu=True,
                         save_strategy="no", disable_tqdm=True)
trainer_class = RatTrainer if trainer_name == "rat" else Trainer
before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
trainer = trainer_class(model=model, args=args, train_dataset=[{"input_ids": r, "labels": r} for r in rows])
trainer.train()
assert not torch.equal(before, model.model.layers[0].self_attn.q_proj.weight)
# gradients were averaged: every rank holds the same weights
flat = torch.cat([p.detach().flatten() for p in model.parameters()])
gathered = trainer.accelerator.gather(flat[None])
assert torch.equal(gathered[0], gathered[1]), "the two ranks' weights differ"
sys.stdout.write(f"DDP_OK {trainer_class.__name__} reentrant={reentrant}\n")  # one write: the two ranks interleave
sys.stdout.flush()
