"""`rat_hf.generation` graph decoding, on CPU: the same decode step the GPU captures, run eagerly (`cuda_graph=False`).

What the CUDA graph adds on top (capture, replay, the compiled step) is measured on the GPU by
bench/bench_graph_decode.py; here: the static buffers, the conv state across steps, greedy/sampling/EOS token identity
with `generate()`, reuse of one step across calls, and the one-line refusals.
"""

import gc
import weakref
from unittest import mock

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.generation.stopping_criteria import MaxTimeCriteria, StoppingCriteriaList

from rat_hf import RatConfig, RatForCausalLM
from rat_hf.generation import graph_decoding, graph_generate
from rat_hf.generation import graph_decode

NEW = 16  # new tokens per call
# initializer_range 0.5: a random tiny model whose greedy continuation varies (at 0.02 it repeats one token, and a
# broken context would go unnoticed)
COMMON = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, pad_token_id=0, eos_token_id=None, bos_token_id=None, initializer_range=0.5)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def make(kind="rat", attn="sdpa"):
    torch.manual_seed(0)
    if kind == "rat":
        return RatForCausalLM._from_config(RatConfig(**COMMON), attn_implementation=attn).eval()
    return LlamaForCausalLM._from_config(LlamaConfig(**COMMON), attn_implementation=attn).eval()


def prompt(seed=0, batch=2, length=7):
    """Left-padded rows: row 0 has 3 pads."""
    ids = torch.randint(1, COMMON["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    ids[0, :3] = 0
    return ids, mask


def eager(model, ids, mask, **kw):
    return graph_generate(model, ids, attention_mask=mask, max_new_tokens=NEW, cuda_graph=False, **kw)


@pytest.mark.parametrize("kind,attn", [("rat", "sdpa"), ("rat", "eager"), ("llama", "sdpa")])
def test_greedy_equals_generate(kind, attn):
    model = make(kind, attn)
    ids, mask = prompt()
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
    assert ref.shape == (2, 7 + NEW)
    assert all(len(set(row[7:].tolist())) >= 6 for row in ref)  # the continuation depends on its context
    assert torch.equal(eager(model, ids, mask), ref)
    static = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, cache_implementation="static")
    assert torch.equal(static, ref)


def test_conv_state_is_carried_between_steps():
    """The identity above would catch a decode step that lost the convolution's state (here: zeroed every step)."""
    model = make("rat")
    ids, mask = prompt()
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=NEW)
    original_step = graph_decode._DecodeStep.step

    def step_without_conv_history(self):
        for layer in self.cache_ref().layers:
            layer.conv_states[0].zero_()
        original_step(self)

    with mock.patch.object(graph_decode._DecodeStep, "step", step_without_conv_history):
        broken = eager(model, ids, mask)
    assert not torch.equal(broken, ref)
    assert torch.equal(eager(model, ids, mask), ref)  # and the unpatched step (a new capture key: same step) is right


def test_seeded_sampling_equals_generate():
    model = make("rat")
    ids, mask = prompt()
    kw = dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.9)
    torch.manual_seed(3)
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, **kw)
    torch.manual_seed(3)
    out = eager(model, ids, mask, **kw)
    assert torch.equal(out, ref)
    torch.manual_seed(4)
    assert not torch.equal(eager(model, ids, mask, **kw), ref)  # the seed matters: sampling really samples


def test_eos_stops_rows_pads_them_and_ends_early():
    model = make("rat")
    ids, mask = prompt()
    free = model.generate(ids, attention_mask=mask, max_new_tokens=NEW)[:, 7:]
    # an EOS both rows emit before the end: the earliest-ending token common to the two rows
    common = set(free[0].tolist()) & set(free[1].tolist())
    firsts = {int(t): max(int((row == t).nonzero()[0]) for row in free) for t in common}
    eos = min(firsts, key=firsts.get)
    assert firsts[eos] < NEW - 4, "no early common token in this seed's continuation"
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=eos)
    assert ref.shape[1] < 7 + NEW  # generation ended early, after the later row's EOS
    for check_every in (1, 3, 16):  # checks at different steps: same tokens, same length
        out = eager(model, ids, mask, eos_token_id=eos, check_every=check_every)
        assert torch.equal(out, ref), check_every


def test_one_new_token_is_the_prefill_token():
    model = make("rat")
    ids, mask = prompt()
    out = graph_generate(model, ids, attention_mask=mask, max_new_tokens=1, cuda_graph=False)
    assert torch.equal(out, model.generate(ids, attention_mask=mask, max_new_tokens=1))


def test_one_step_and_cache_serve_every_call_of_a_shape():
    model = make("rat")
    ids, mask = prompt(seed=0)
    eager(model, ids, mask)
    cache = graph_decode._CACHES[model][1]
    step = getattr(cache, graph_decode._STEP_ATTR)
    addresses = [t.data_ptr() for t in (step.tokens, step.kv_valid, step.sequences, cache.layers[0].keys,
                                        cache.layers[0].conv_states[0])]
    for seed in (1, 2):  # other prompts of the same shape: the same buffers (as a captured graph needs), right tokens
        ids, mask = prompt(seed=seed)
        out = eager(model, ids, mask)
        assert torch.equal(out, model.generate(ids, attention_mask=mask, max_new_tokens=NEW))
        assert graph_decode._CACHES[model][1] is cache and getattr(cache, graph_decode._STEP_ATTR) is step
        assert [t.data_ptr() for t in (step.tokens, step.kv_valid, step.sequences, cache.layers[0].keys,
                                       cache.layers[0].conv_states[0])] == addresses
    eager(model, ids, mask, do_sample=True, top_k=5)  # other settings: a new step on the same cache
    assert getattr(cache, graph_decode._STEP_ATTR) is not step
    ids, mask = prompt(batch=3)  # another shape: another cache
    assert torch.equal(eager(model, ids, mask), model.generate(ids, attention_mask=mask, max_new_tokens=NEW))
    assert graph_decode._CACHES[model][1] is not cache


def test_custom_generate_hook():
    model = make("rat")
    ids, mask = prompt()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, custom_generate=graph_decoding,
                         cache_implementation="static", cuda_graph=False)
    assert torch.equal(out, model.generate(ids, attention_mask=mask, max_new_tokens=NEW))


def test_model_and_its_graph_state_are_freed():
    model = make("rat")
    ids, mask = prompt()
    eager(model, ids, mask)
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


@pytest.mark.parametrize("kwargs,message", [
    (dict(), "CUDA graphs need a CUDA device"),
    (dict(cuda_graph=False, num_beams=2), "num_beams=2"),
    (dict(cuda_graph=False, repetition_penalty=1.3), "RepetitionPenaltyLogitsProcessor is not supported"),
    (dict(cuda_graph=False, return_dict_in_generate=True), "return_dict_in_generate"),
    (dict(cuda_graph=False, check_every=0), "check_every=0"),
    (dict(cuda_graph=False, compile_step="yes"), "compile_step='yes'"),
    (dict(cuda_graph=False, stopping_criteria=StoppingCriteriaList([MaxTimeCriteria(60.0)])),
     "MaxTimeCriteria is not supported"),
])
def test_unsupported_settings_fail_in_one_line(kwargs, message):
    model = make("rat")
    ids, mask = prompt()
    with pytest.raises(ValueError, match=message) as info:
        graph_generate(model, ids, attention_mask=mask, max_new_tokens=NEW, **kwargs)
    assert "\n" not in str(info.value)


def test_refuses_training_mode_and_dynamic_cache():
    model = make("rat")
    ids, mask = prompt()
    with pytest.raises(ValueError, match="training mode"):
        graph_generate(model.train(), ids, attention_mask=mask, max_new_tokens=NEW, cuda_graph=False)
    with pytest.raises(ValueError, match="needs a static cache"):  # generate()'s default cache is dynamic
        model.eval().generate(ids, attention_mask=mask, max_new_tokens=NEW, custom_generate=graph_decoding,
                              cuda_graph=False)
