"""RAT's gating: the REINFORCE estimator against the exact gradient, the query-gate form, the gates-off switch, and the
sampled gates trained under every trainer (`Trainer`, TRL's SFT/DPO/GRPO through `rat_hf.trainers`' subclasses)."""

import contextlib
import itertools
import warnings

import pytest
import torch

from rat_hf import RatConfig, RatForCausalLM
from rat_hf.models.rat.modeling_rat import _reward_to_go, collect_gate_samples, gate_reinforce_loss

TINY = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ---- the estimator against the exact gradient ------------------------------------------------------------------------
def enumeration_model(num_layers: int) -> RatForCausalLM:
    """A float64 RAT small enough to enumerate every gating decision, with weights large enough that the choices
    matter (selector probabilities well inside (0, 1), losses that differ between choices)."""
    torch.manual_seed(0)
    config = RatConfig(vocab_size=7, hidden_size=8, num_hidden_layers=num_layers, num_attention_heads=2,
                       intermediate_size=16, n_policies=2, policy_hidden_size=4, gating_mode="reinforce",
                       entropy_coef=0.0, conv_kernel_size=3, initializer_range=0.7)
    model = RatForCausalLM(config).double().train()
    with torch.no_grad():  # undecided selectors: every choice has weight in the expectations below
        for layer in model.model.layers:
            layer.self_attn.gate.selector_out.weight.mul_(0.1)
    return model


@contextlib.contextmanager
def forced_policies(model: RatForCausalLM, choices: torch.Tensor):
    """Every layer's gate 'samples' the given policies `choices [L, B, T]` (its `draw_policies`, overridden here)."""
    gates = [layer.self_attn.gate for layer in model.model.layers]
    for gate, chosen in zip(gates, choices):
        gate.draw_policies = lambda probs, chosen=chosen: chosen.reshape(-1, 1)
    try:
        yield
    finally:
        for gate in gates:
            del gate.draw_policies  # back to the class's method


def selector_params(model):
    return [p for n, p in model.named_parameters() if ".gate.selector_" in n]


def flat(grads) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in grads])


def enumerate_batch(model, ids: torch.Tensor):
    """Every gating decision of every sequence: rows `[S*C, T]` (sequence-major), per row the sampled log-prob
    `[S*C, T]` (with graph) and the token NLLs `[S*C, T]` (0 at the last position, which predicts nothing)."""
    n_seq, seq_len = ids.shape
    n_layers = model.config.num_hidden_layers
    configs = torch.tensor(list(itertools.product([0, 1], repeat=n_layers * seq_len))).view(-1, n_layers, seq_len)
    n_cfg = configs.shape[0]
    rows = ids.repeat_interleave(n_cfg, dim=0)  # [S*C, T]
    choices = configs.repeat(n_seq, 1, 1).permute(1, 0, 2)  # [L, S*C, T]
    with forced_policies(model, choices), collect_gate_samples() as samples:
        logits = model(input_ids=rows).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), rows[:, 1:].flatten(), reduction="none")
    nll = torch.nn.functional.pad(nll.view(rows.shape[0], seq_len - 1), (0, 1))
    (sample,) = samples
    return configs, choices, sample.log_probs, nll


@pytest.mark.parametrize("num_layers, seq_len", [(1, 3), (2, 3)])
def test_reward_to_go_estimator_is_exact_and_the_per_token_reward_is_not(num_layers, seq_len):
    """Batch of 2, 2 policies: the exact gradient of the expected loss (every choice enumerated, float64) equals the
    exact expectation of the new estimator (its sampling enumerated too, leave-one-out baseline included); the shipped
    per-token estimator (reward = that token's loss, batch-mean baseline) is off."""
    model = enumeration_model(num_layers)
    params = selector_params(model)
    ids = torch.tensor([[1, 4, 2, 6, 3][:seq_len], [5, 0, 3, 1, 2][:seq_len]])
    configs, choices, log_probs, nll = enumerate_batch(model, ids)
    n_cfg = configs.shape[0]
    denom = 2 * (seq_len - 1)  # labelled tokens of the batch: the LM loss is their mean
    row_log_prob = log_probs.sum(-1)  # log p(all choices of the row)
    probs = row_log_prob.detach().exp().view(2, n_cfg)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, dtype=torch.float64))
    assert probs.min() * n_cfg > 0.01 and probs.max() < 0.5  # no choice certain or negligible
    assert (nll.sum(-1).max() - nll.sum(-1).min()) > 0.5  # and the choices change the loss

    # exact: J = sum_c p(c) L(c); the selectors read a detached hidden state, so J depends on them through p alone
    row_loss = nll.sum(-1).detach() / denom
    expected_loss = (row_log_prob.exp() * row_loss).sum()
    exact = flat(torch.autograd.grad(expected_loss, params, retain_graph=True))
    # the estimators' exact expectations: every pair of choices (c1, c2) of the two sequences, weighted p(c1) p(c2);
    # `gate_reinforce_loss` runs on each pair's 2-row batch (vmapped over the pairs)
    first, second = torch.meshgrid(torch.arange(n_cfg), n_cfg + torch.arange(n_cfg), indexing="ij")
    pairs = torch.stack([first.flatten(), second.flatten()], dim=1)  # [C*C, 2] rows of the batch
    weight = probs[0][:, None] * probs[1][None, :]  # [C, C]
    mask = torch.ones(2, seq_len, dtype=torch.bool)
    estimator = torch.func.vmap(lambda lp, loss: gate_reinforce_loss(lp, loss, mask))
    per_pair = estimator(log_probs[pairs], nll[pairs] / denom)
    new = flat(torch.autograd.grad((weight.flatten() * per_pair).sum(), params, retain_graph=True))
    valid = torch.ones(2, seq_len, dtype=torch.bool)
    valid[:, -1] = False
    reward = -nll[pairs]  # the shipped estimator, as it was written: reward = the token's own loss
    advantage = (reward - (reward * valid).sum((1, 2), keepdim=True) / valid.sum()) * valid  # batch-mean baseline
    old_per_pair = -(advantage * log_probs[pairs]).sum((1, 2)) / denom
    old = flat(torch.autograd.grad((weight.flatten() * old_per_pair).sum(), params, retain_graph=True))
    # the per-token reward with the leave-one-out baseline (the other sequence's loss at the same position): still off
    own = -nll[pairs] / denom
    own_loo = -((own - own.flip(1)) * log_probs[pairs]).sum((1, 2))
    own_loo = flat(torch.autograd.grad((weight.flatten() * own_loo).sum(), params, retain_graph=True))
    torch.testing.assert_close(new, exact, rtol=1e-9, atol=1e-12)
    # measured: old 25% (1 layer) / 62% (2 layers) off, per-token + leave-one-out 2.7% / 39% off
    for biased, least in ((old, 0.2), (own_loo, 0.02)):
        assert (biased - exact).norm() > least * exact.norm(), ((biased - exact).norm() / exact.norm()).item()

    # the model's own forward computes exactly this estimator: one batch of forced choices, through `labels`
    i, j = 5 % n_cfg, 11 % n_cfg
    with forced_policies(model, choices[:, [i, n_cfg + j]]):
        out = model(input_ids=ids, labels=ids)
    by_hand = gate_reinforce_loss(log_probs[[i, n_cfg + j]], nll[[i, n_cfg + j]] / denom, mask)
    torch.testing.assert_close(out.policy_loss, by_hand, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(flat(torch.autograd.grad(out.policy_loss, params)),
                               flat(torch.autograd.grad(by_hand, params)), rtol=1e-10, atol=1e-14)

    # the exact gradient itself, checked by central differences along a random direction (last: moves the weights)
    direction = [torch.randn_like(p) for p in params]
    eps = 1e-5
    values = []
    for sign in (1, -1):
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.add_(sign * eps * d)
        _, _, lp, loss = enumerate_batch(model, ids)
        values.append((lp.sum(-1).exp() * loss.sum(-1) / denom).sum().detach())
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.sub_(sign * eps * d)
    torch.testing.assert_close((values[0] - values[1]) / (2 * eps), exact @ flat(direction), rtol=1e-6, atol=1e-9)


def test_sampled_estimator_learns_the_best_gates():
    """Learning is shown: training only the selectors with the model's own sampled REINFORCE loss (40 steps) brings
    the exact expected loss (enumerated) most of the way to that of the best gating decisions (measured: 92%)."""
    model = enumeration_model(2)
    ids = torch.tensor([[1, 4, 2], [5, 0, 3]])

    def expected_and_best() -> tuple[float, float]:
        _, _, log_probs, nll = enumerate_batch(model, ids)
        probs, loss = log_probs.sum(-1).exp().view(2, -1), nll.sum(-1).view(2, -1) / 4
        return (probs * loss).sum().item(), loss.min(-1).values.sum().item()

    before, best = expected_and_best()
    model.requires_grad_(False)
    params = selector_params(model)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=0.05)
    torch.manual_seed(0)
    batch = ids.repeat(8, 1)
    for _ in range(40):
        model(input_ids=batch, labels=batch).policy_loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after, _ = expected_and_best()
    assert (before - after) > 0.6 * (before - best), (before, after, best)


# ---- gate_reinforce_loss's parts -------------------------------------------------------------------------------------
def test_reward_to_go_matches_a_loop_with_discount_and_documents():
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(3, 150, generator=g, dtype=torch.float64)  # longer than one 64-step chunk
    starts = torch.rand(3, 150, generator=g) < 0.05
    starts[:, 0] = True
    for discount in (1.0, 0.9):
        expected = torch.zeros_like(rewards)
        for b in range(3):
            running = 0.0
            for t in reversed(range(150)):
                ends_here = t + 1 == 150 or bool(starts[b, t + 1])
                running = rewards[b, t] + (0.0 if ends_here else discount * running)
                expected[b, t] = running
        torch.testing.assert_close(_reward_to_go(rewards, starts, discount), expected, rtol=1e-12, atol=1e-12)


def test_packed_documents_equal_separate_rows():
    """Documents packed in one row (positions restarting at 0) give the loss and gradient of right-padded separate
    rows: rewards stop at each document's end, and the baseline compares documents position by position."""
    g = torch.Generator().manual_seed(1)
    lengths = (5, 3, 4)
    log_probs = torch.randn(sum(lengths), generator=g, dtype=torch.float64, requires_grad=True)
    losses = torch.rand(sum(lengths), generator=g, dtype=torch.float64)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    packed = gate_reinforce_loss(log_probs[None], losses[None], torch.ones(1, sum(lengths)), discount=0.8,
                                 position_ids=position_ids)
    rows, row_losses, mask = [], torch.zeros(3, 5, dtype=torch.float64), torch.zeros(3, 5, dtype=torch.bool)
    for i, (start, n) in enumerate(zip((0, 5, 8), lengths)):
        rows.append(torch.nn.functional.pad(log_probs[start : start + n], (0, 5 - n)))
        row_losses[i, :n], mask[i, :n] = losses[start : start + n], True
    separate = gate_reinforce_loss(torch.stack(rows), row_losses, mask, discount=0.8)
    torch.testing.assert_close(packed, separate)
    torch.testing.assert_close(torch.autograd.grad(packed, log_probs)[0], torch.autograd.grad(separate, log_probs)[0])


def test_bad_shapes_and_discounts_raise():
    x = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="same \\[B, T\\] shape"):
        gate_reinforce_loss(x, torch.zeros(2, 5), torch.ones(2, 5))
    with pytest.raises(ValueError, match="discount=1.5"):
        gate_reinforce_loss(x, x, x, discount=1.5)


def test_entropy_bonus_is_summed_over_layers_like_the_log_probs():
    """entropy_coef weighs the entropy of a token's whole gating decision (sum over layers, as its log-prob is),
    averaged over the real tokens."""
    ids = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    losses = {}
    for coef in (0.0, 0.5):
        torch.manual_seed(0)
        model = RatForCausalLM(RatConfig(**TINY, gating_mode="reinforce", n_policies=3, entropy_coef=coef)).train()
        torch.manual_seed(1)  # the same sampled choices both times
        with collect_gate_samples() as samples:
            model.model(input_ids=ids)
        torch.manual_seed(1)
        losses[coef] = model(input_ids=ids, labels=ids).policy_loss
    entropy = samples[0].entropy  # [B, T]
    per_layer = [-(p * p.log()).sum(-1) for p in samples[0].selector_probs]
    torch.testing.assert_close(entropy, sum(per_layer))
    torch.testing.assert_close(losses[0.0] - losses[0.5], 0.5 * entropy.mean())


# ---- the query form of the gates and the gates-off switch ------------------------------------------------------------
def test_query_gates_are_a_per_head_temperature_on_the_scores():
    """head_gate_target='query': head h's attention at token t is softmax(g[t, h] * scores), scores as without gates."""
    torch.manual_seed(0)
    config = RatConfig(**TINY, head_gate_target="query", initializer_range=0.3)
    model = RatForCausalLM._from_config(config, attn_implementation="eager").eval()
    ids = torch.randint(3, 97, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        gated = model.model(input_ids=ids, output_attentions=True)
        plain = model.model(input_ids=ids, output_attentions=True, gates_off=True)
    gates = gated.gates[0]  # [B, T, H] of the first layer (whose input does not depend on the gates)
    assert (gates - 1).abs().max() > 0.05  # the gates are far enough from 1 to tell
    expected = torch.softmax(gates.transpose(1, 2)[..., None] * plain.attentions[0].log(), dim=-1)  # [B, H, T, T]
    torch.testing.assert_close(gated.attentions[0], expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("target", ["output", "query"])
def test_gates_off_equals_gates_fixed_at_one(target):
    """`gates_off=True` is the model whose policy nets propose exactly 1 for every head (uniform logits)."""
    torch.manual_seed(0)
    model = RatForCausalLM(RatConfig(**TINY, head_gate_target=target, initializer_range=0.3)).eval()
    uniform = RatForCausalLM(model.config)
    uniform.load_state_dict(model.state_dict())
    with torch.no_grad():
        for layer in uniform.model.layers:
            layer.self_attn.gate.policy_out_weight.zero_()
            layer.self_attn.gate.policy_out_bias.zero_()
        ids = torch.randint(3, 97, (2, 8))
        off = model(input_ids=ids, labels=ids, gates_off=True)
        torch.testing.assert_close(off.logits, uniform.eval()(input_ids=ids).logits, atol=1e-5, rtol=0)
        assert not torch.allclose(off.logits, model(input_ids=ids).logits, atol=1e-3)
    assert off.gate_deviation is None and off.gate_entropy is None
    model.train()  # reinforce training with the gates off: nothing is sampled
    reinforce = RatForCausalLM(RatConfig(**TINY, gating_mode="reinforce")).train()
    a, b = (reinforce(input_ids=ids, labels=ids, gates_off=True) for _ in range(2))
    assert a.policy_loss is None and torch.equal(a.logits, b.logits)


# ---- reinforced gating under every trainer ---------------------------------------------------------------------------
# TRL computes log-probs through model.model + lm_head (its fused head): RatForCausalLM.forward's REINFORCE term never
# runs there. The plain TRL trainers leave the selectors untouched (and the model warns); the subclasses train them.
GATE_WARNING = "gating_mode='reinforce'"


@pytest.fixture(scope="module")
def tokenizer():
    from rat_hf.tokenization import train_bpe_tokenizer

    return train_bpe_tokenizer(["the cat sat on the mat. hello there, how are you? fine thanks"] * 20, vocab_size=300)


def chat_model(tok, gating_mode="reinforce"):
    torch.manual_seed(0)
    config = RatConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64, n_policies=2, gating_mode=gating_mode, pad_token_id=tok.pad_token_id,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return RatForCausalLM(config)


def trl_trainer(kind: str, tok, model, out, steps=2, plain=False):
    """A tiny CPU `SFTTrainer`/`DPOTrainer`/`GRPOTrainer` (or the rat_hf subclass) on `model`."""
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from rat_hf.trainers import reinforced_gating

    common = dict(output_dir=str(out), max_steps=steps, per_device_train_batch_size=2, learning_rate=1e-2,
                  report_to=[], use_cpu=True, bf16=False, save_strategy="no", logging_steps=1, disable_tqdm=True)
    cls = getattr(trl if plain else reinforced_gating, ("" if plain else "Rat") + f"{kind}Trainer")
    if kind == "SFT":
        data = datasets.Dataset.from_dict({"text": ["the cat sat on the mat", "hello there, how are you?"] * 4})
        return cls(model=model, args=trl.SFTConfig(**common, max_length=32), train_dataset=data, processing_class=tok)
    if kind == "DPO":
        data = datasets.Dataset.from_dict({"prompt": ["hello", "the cat"] * 4, "chosen": [" there", " sat"] * 4,
                                           "rejected": [" mat", " you"] * 4})
        ref = chat_model(tok, model.config.gating_mode).eval()  # an in-memory model has no path to rebuild it from
        return cls(model=model, ref_model=ref, args=trl.DPOConfig(**common, max_length=32), train_dataset=data,
                   processing_class=tok)
    data = datasets.Dataset.from_dict({"prompt": ["hello", "the cat"] * 4})
    args = trl.GRPOConfig(**{**common, "per_device_train_batch_size": 4}, num_generations=2, max_completion_length=6,
                          gradient_checkpointing=False, seed=0)
    # any reward that tells completions apart (so that advantages are not all 0)
    reward = lambda completions, **kwargs: [float(sum(map(ord, c)) % 13) for c in completions]  # noqa: E731
    return cls(model=model, reward_funcs=reward, args=args, train_dataset=data, processing_class=tok)


def selectors(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".gate.selector_" in n}


@contextlib.contextmanager
def gate_warnings(action="always"):
    """Yields the list of the model's gate warnings (`UserWarning`s naming reinforce gating) issued inside."""
    found = []
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter(action)
        yield found
    found.extend(w for w in record if GATE_WARNING in str(w.message))


@pytest.mark.parametrize("kind", ["SFT", "DPO", "GRPO"])
def test_selectors_learn_under_the_rat_trl_trainers(kind, tokenizer, tmp_path):
    model = chat_model(tokenizer)
    trainer = trl_trainer(kind, tokenizer, model, tmp_path)
    before = selectors(model)
    with gate_warnings() as warned:
        trainer.train()
    assert not warned, [str(w.message) for w in warned]
    unchanged = [n for n, p in selectors(model).items() if torch.equal(p, before[n])]
    assert len(before) == 8 and not unchanged, unchanged  # 2 layers x selector_in/out weight and bias
    logged = [e for e in trainer.state.log_history if "gate/policy_loss" in e]
    assert logged and all(torch.isfinite(torch.tensor(e["gate/entropy"])) for e in logged)


@pytest.mark.parametrize("kind, steps", [("SFT", 3), ("DPO", 1), ("GRPO", 1)])
def test_plain_trl_trainers_leave_the_selectors_frozen_and_warn(kind, steps, tokenizer, tmp_path):
    model = chat_model(tokenizer)
    trainer = trl_trainer(kind, tokenizer, model, tmp_path, steps=steps, plain=True)
    before = selectors(model)
    with gate_warnings(action="default") as warned:  # Python's default: once per place in the code
        trainer.train()
    assert len(warned) == 1 and f"Rat{kind}Trainer" in str(warned[0].message)  # once, naming the trainer to use
    assert all(torch.equal(p, before[n]) for n, p in selectors(model).items())


def test_sft_gate_loss_is_the_models_own_reinforce_loss(tokenizer, tmp_path):
    """Under RatSFTTrainer the gates get exactly the loss RatForCausalLM.forward(labels=...) gives them."""
    model = chat_model(tokenizer)
    trainer = trl_trainer("SFT", tokenizer, model, tmp_path)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    model.train()
    n_items = (batch["labels"][:, 1:] != -100).sum()
    torch.manual_seed(5)
    loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=n_items)
    torch.manual_seed(5)  # the same sampled gates
    own = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")}, num_items_in_batch=n_items)
    assert own.policy_loss is not None
    torch.testing.assert_close(loss, own.loss, atol=1e-5, rtol=1e-5)
    torch.manual_seed(5)
    params = list(selectors(model))
    grads = dict(zip(params, torch.autograd.grad(loss, [dict(model.named_parameters())[n] for n in params])))
    own_grads = torch.autograd.grad(own.loss, [dict(model.named_parameters())[n] for n in params])
    for name, g in zip(params, own_grads):
        torch.testing.assert_close(grads[name], g, atol=1e-6, rtol=1e-4)


def test_soft_gating_is_untouched_by_the_subclasses(tokenizer, tmp_path):
    """A soft-mode model trains bit-identically under RatSFTTrainer and SFTTrainer, with no gate warning."""
    weights = []
    for plain in (True, False):
        model = chat_model(tokenizer, gating_mode="soft")
        trainer = trl_trainer("SFT", tokenizer, model, tmp_path / str(plain), plain=plain)
        with gate_warnings() as warned:
            trainer.train()
        assert not warned
        weights.append(model.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_selectors_learn_under_transformers_trainer(tmp_path):
    """`Trainer` calls the model's own forward with labels: its REINFORCE term trains the selectors, no warning."""
    datasets = pytest.importorskip("datasets")
    from transformers import Trainer, TrainingArguments, default_data_collator

    torch.manual_seed(0)
    model = RatForCausalLM(RatConfig(**TINY, gating_mode="reinforce", n_policies=2))
    ids = torch.randint(3, 97, (8, 12), generator=torch.Generator().manual_seed(0)).tolist()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
                             report_to=[], use_cpu=True, save_strategy="no")
    trainer = Trainer(model=model, args=args, data_collator=default_data_collator,
                      train_dataset=datasets.Dataset.from_dict({"input_ids": ids, "labels": ids}))
    before = selectors(model)
    with gate_warnings() as warned:
        trainer.train()
    assert not warned
    assert all(not torch.equal(p, before[n]) for n, p in selectors(model).items())


def record_token_signal(monkeypatch) -> list:
    """Records each (token log-probs, linearised token losses) pair the subclasses compute for the gates."""
    from rat_hf.trainers import reinforced_gating

    seen, original = [], reinforced_gating.linearized_token_losses

    def recording(loss, token_log_probs):
        losses = original(loss, token_log_probs)
        seen.extend(zip([lp.detach() for lp in token_log_probs], losses))
        return losses

    monkeypatch.setattr(reinforced_gating, "linearized_token_losses", recording)
    return seen


def test_grpo_gates_get_the_completions_advantages(tokenizer, tmp_path, monkeypatch):
    """GRPO: the gates' per-token loss is -A_i * c * log p_t on completion tokens (one update per generation: no
    ratio clipping; the 'dapo' loss weighs all tokens alike), 0 on the prompt."""
    model = chat_model(tokenizer)
    trainer = trl_trainer("GRPO", tokenizer, model, tmp_path, steps=1)
    seen, batches = record_token_signal(monkeypatch), []
    compute = trainer._compute_loss
    monkeypatch.setattr(trainer, "_compute_loss", lambda model, inputs: batches.append(inputs) or compute(model, inputs))
    trainer.train()
    ((log_probs, losses),), (inputs,) = seen, batches
    completion = inputs["completion_mask"].bool()
    c = completion.shape[1]
    slope = losses[:, -c:] / log_probs[:, -c:]  # [B, C]
    assert torch.all(losses[:, :-c] == 0)
    advantages = inputs["advantages"]
    assert advantages.abs().max() > 0  # some completions were better than others
    scale = -(slope[completion] / advantages[:, None].expand_as(slope)[completion])  # one positive constant
    scale = scale[advantages[:, None].expand_as(slope)[completion] != 0]
    torch.testing.assert_close(scale, scale.mean().expand_as(scale))
    assert scale.mean() > 0


def test_dpo_gates_get_each_sequences_dpo_slope(tokenizer, tmp_path, monkeypatch):
    """DPO: every token of a sequence gets the slope of the DPO loss in that sequence's log-prob: negative for the
    chosen answer, positive for the rejected one, of equal size within a pair."""
    model = chat_model(tokenizer)
    trainer = trl_trainer("DPO", tokenizer, model, tmp_path, steps=1)
    seen = record_token_signal(monkeypatch)
    trainer.train()
    ((log_probs, losses),) = seen
    counted = losses != 0
    slope = torch.where(counted, losses / log_probs, torch.nan)
    per_row = slope.nanmean(-1)  # [2B]: chosen rows, then rejected rows
    torch.testing.assert_close(slope[counted], per_row[:, None].expand_as(slope)[counted])
    chosen, rejected = per_row.chunk(2)
    assert torch.all(chosen < 0) and torch.all(rejected > 0)
    torch.testing.assert_close(chosen, -rejected)
