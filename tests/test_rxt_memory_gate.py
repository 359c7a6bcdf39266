"""Memory that survives an update: the default `decoupled` residual (`K * old + W * update`, K = W = 0.95 at init)
keeps what the memory read through later updates, where the RxT paper's interpolation at G = 0.5 quartered it every
turn; a saved config keeps the residual it was saved with; and a tiny RxT trained briefly on
`memory_recall_dataset` recalls a fact told two turns earlier well above chance, over seeds."""

import json

import pytest
import torch

from rat_hf import RxTConfig, RxTForCausalLM
from rat_hf.data import memory_recall_dataset
from rat_hf.data.interactions import interaction_text, tokenize_interaction, turns
from rat_hf.tokenization import reactive_config, train_bpe_tokenizer

TINY = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            num_query_heads=2, intermediate_size=64, stm_size=8, max_position_embeddings=64)


# --- defaults and saved configs --------------------------------------------------------------------------------------
def test_new_configs_keep_and_write_at_init():
    config = RxTConfig(**TINY)
    assert (config.memory_residual, config.memory_keep_gate_init, config.memory_gate_init) == ("decoupled", 3.0, 3.0)
    legacy = RxTConfig(**TINY, memory_residual="interpolate")
    assert (legacy.memory_gate_init, legacy.memory_keep_gate_init) == (0.0, None)
    with pytest.raises(ValueError, match="memory_keep_gate_init"):
        RxTConfig(**TINY, memory_residual="interpolate", memory_keep_gate_init=2.0)
    with pytest.raises(ValueError, match="memory_residual"):
        RxTConfig(**TINY, memory_residual="plain")


def test_a_config_saved_before_the_decoupled_gates_loads_as_it_was(tmp_path):
    """A checkpoint written before `memory_residual` existed (its config.json lacks the key) keeps the paper's
    interpolating gate, its weights load into it, and it computes what it computed; new saves keep theirs."""
    torch.manual_seed(0)
    old = RxTForCausalLM(RxTConfig(**TINY, memory_residual="interpolate")).eval()
    old.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    for key in ("memory_residual", "memory_keep_gate_init"):  # what the older code did not write
        del saved[key]
    assert saved["memory_gate_init"] == 0.0 and "transformers_version" in saved
    (tmp_path / "config.json").write_text(json.dumps(saved))
    loaded, info = RxTForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert loaded.config.memory_residual == "interpolate"
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    ids = torch.randint(5, 97, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded.update_memory(None, ids), old.update_memory(None, ids))
    new = RxTForCausalLM(RxTConfig(**TINY))
    new.save_pretrained(tmp_path / "new")
    assert RxTConfig.from_pretrained(tmp_path / "new").memory_residual == "decoupled"


def _first_turn_share(model, later_turns: int) -> float:
    """How much of the difference two different first interactions make to the memory is left after
    `later_turns` more (identical) interactions: 1 = all of it."""
    generator = torch.Generator().manual_seed(0)
    first_a, first_b = (torch.randint(5, 97, (4, 10), generator=generator) for _ in range(2))
    later = [torch.randint(5, 97, (4, 10), generator=generator) for _ in range(later_turns)]
    with torch.no_grad():
        a, b = model.update_memory(None, first_a), model.update_memory(None, first_b)
        start = (a - b).norm()
        for turn in later:
            a, b = model.update_memory(a, turn), model.update_memory(b, turn)
    return ((a - b).norm() / start).item()


@pytest.mark.parametrize("kind", ["gated_self_interlayer", "simple"])
def test_an_untrained_memory_keeps_what_it_read(kind):
    torch.manual_seed(0)
    decoupled = RxTForCausalLM(RxTConfig(**TINY, memory_attention_type=kind)).eval()
    torch.manual_seed(0)
    interpolate = RxTForCausalLM(RxTConfig(**TINY, memory_attention_type=kind, memory_residual="interpolate")).eval()
    kept, lost = _first_turn_share(decoupled, 2), _first_turn_share(interpolate, 2)
    # measured (seed 0): decoupled 1.09 / 0.91, interpolate 0.33 / 0.25 (simple: exactly 0.5 per turn)
    assert kept > 0.85, kept
    assert lost < 0.4, lost


# --- recall after training on single writes --------------------------------------------------------------------------
# A `memory_recall_dataset` conversation turned into token ids, each turn reduced to what carries its content: the
# fact `[Q] REMEMBER value [A] EOS`, a distractor `[Q] BY_THE_WAY value' [A] EOS` (another person's fact: a competing
# value) or `[Q] PLUS [A] EOS` (arithmetic), and the question `[Q] ASK attribute [A] value EOS`. Reading English costs
# a tiny model thousands of CPU steps before its memory is exercised at all (measured: with the dataset's text and a
# BPE, neither residual recalls even the previous turn above 25% after 600 steps), so the text is left out here.
MARKERS = ["<pad>", "<bos>", "<eos>", "[Q]", "[A]", "REMEMBER", "BY_THE_WAY", "PLUS", "ASK", "OTHER"]
CATEGORICAL = ("favorite color", "home city", "pet's name")  # ten values each: chance is 1/10 once asked


def _vocabulary() -> dict:
    from rat_hf.data import interactions

    words = MARKERS + list(CATEGORICAL) + interactions._COLORS + interactions._CITIES + interactions._PETS
    return {w: i for i, w in enumerate(words)}


def _episode(record, vocab) -> tuple:
    """(turns before the question, the question) of one conversation, as token-id lists."""
    import re

    q, a, eos = vocab["[Q]"], vocab["[A]"], vocab["<eos>"]
    fact = re.fullmatch(r"Please remember this: \w+'s (.+) is (.+)\.", record["query"])
    before = [[q, vocab["REMEMBER"], vocab[fact[2]], a, eos]]
    for turn in record["interactions"][:-1]:
        other = re.fullmatch(r"By the way, \w+'s (.+) is (.+)\.", turn["query"])
        before.append([q, vocab["BY_THE_WAY"], vocab.get(other[2], vocab["OTHER"]), a, eos] if other
                      else [q, vocab["PLUS"], a, eos])
    return before, [q, vocab["ASK"], vocab[fact[1]], a, vocab[fact[2]], eos]


def _recall_batch(distance: int, n: int, seed: int, vocab: dict) -> tuple:
    """`(turns [each (ids, mask)], question ids [n, 6])` of n conversations with a categorical fact."""
    records = [r for r in memory_recall_dataset(4 * n, distance, seed=seed)
               if any(f"'s {c} is" in r["query"] for c in CATEGORICAL)][:n]
    episodes = [_episode(r, vocab) for r in records]
    turns_ = []
    for k in range(distance + 1):
        rows = [e[0][k] for e in episodes]
        width = max(map(len, rows))
        turns_.append((torch.tensor([r + [0] * (width - len(r)) for r in rows]),
                       torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])))
    return turns_, torch.tensor([e[1] for e in episodes])


def _answer_logits(model, batch) -> torch.Tensor:
    turns_, question = batch
    memory = model.init_memory(question.shape[0])
    for ids, mask in turns_:
        memory = model.update_memory(memory, ids, mask)
    return model(question[:, :-2], memory=memory).logits[:, -1]  # what follows `[A]`: the value


def _train_on_single_writes(seed: int, steps: int, **config) -> dict:
    """A tiny RxT trained on the fact of the previous turn only (distance 0); recall at distances 0, 1, 2."""
    vocab = _vocabulary()
    torch.manual_seed(seed)
    model = RxTForCausalLM(RxTConfig(**{**TINY, "vocab_size": len(vocab), "hidden_size": 64, "intermediate_size": 128,
                                        "eos_token_id": vocab["<eos>"], **config})).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(steps):
        batch = _recall_batch(0, 32, seed=seed * 10_000 + step, vocab=vocab)
        loss = torch.nn.functional.cross_entropy(_answer_logits(model, batch), batch[1][:, -2])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        return {d: (_answer_logits(model, b).argmax(-1) == b[1][:, -2]).float().mean().item()
                for d in (0, 1, 2) for b in [_recall_batch(d, 200, seed=-1 - d, vocab=vocab)]}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_fact_read_once_is_recalled_two_turns_later(seed):
    """Trained only to recall the previous turn (120 steps, ~7 s), the default memory still holds the fact after two
    more interactions. Measured (seeds 0, 1, 2): distance 0: 1.0, 1.0, 1.0; distance 2: 0.365, 0.435, 0.38; chance 0.1."""
    recall = _train_on_single_writes(seed, steps=120)
    assert recall[0] > 0.9, recall
    assert recall[2] > 0.25, recall


def test_the_interpolating_gate_forgets_it():
    """The same training with the former default (`interpolate`, G = 0.5 in both stages): the fact is learned and lost
    two turns later. Measured (seed 1): distance 0: 1.0, 1: 0.29, 2: 0.12 (seed 0, 200 steps: 1.0, 0.17, 0.10)."""
    recall = _train_on_single_writes(1, steps=120, memory_residual="interpolate")
    assert recall[0] > 0.9, recall
    assert recall[2] < 0.2, recall
