"""RAT's gating: the REINFORCE estimator against the exact gradient, the query-gate form, the gates-off switch, and the
sampled gates trained under every trainer (`Trainer`, TRL's SFT/DPO/GRPO through `rat_hf.trainers`' subclasses)."""

import contextlib
import itertools

import pytest
import torch

from rat_hf import RatConfig, RatForCausalLM
from rat_hf.models.rat.modeling_rat import _reward_to_go, collect_gate_samples, gate_reinforce_loss

TINY = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)


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
