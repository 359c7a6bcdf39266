"""Checks every causal LM of rat_hf must pass, written once and run over a table of tiny configs.

A test module subclasses `CausalLMChecks`, sets `model_class`, and provides a `config` fixture parametrised over its
table. Models that need extra forward inputs (the Reactive Transformer's memory) override `extra_inputs`.

(a) changing future tokens never changes past logits (with and without a padding mask);
(b) cached decoding equals a full forward *on logits at every step*, under both cache argument names, for greedy,
    left-padded, seeded sampling, beams, the static cache, assisted decoding and prompt lookup;
(b') padding-free packed rows (positions restarting at 0) equal separate runs;
(c) left-padded batch rows equal unpadded single-row runs (forward and greedy generate);
(d) save -> `from_pretrained` is bit-exact, also through remote code in a process where rat_hf cannot be imported.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from rat_hf._versions import output_cache

ATOL = 2e-5
LOGIT_ATOL = 1e-4  # cached vs full-forward logits, fp32
SEEDS = [0, 1, 2]


class CausalLMChecks:
    model_class = None

    # --- hooks -------------------------------------------------------------------------------------------------
    def extra_inputs(self, model, batch_size: int) -> dict:
        """Extra keyword inputs for forward/generate (none for a plain causal LM)."""
        return {}

    @pytest.fixture
    def model(self, config):
        torch.manual_seed(0)
        return self.model_class(config).eval()

    # --- helpers -----------------------------------------------------------------------------------------------
    def ids(self, model, batch: int, length: int, seed: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randint(3, model.config.vocab_size, (batch, length), generator=g)

    def logits(self, model, input_ids, **kw) -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=input_ids, **self.extra_inputs(model, input_ids.shape[0]), **kw).logits

    # --- (a) causality ---------------------------------------------------------------------------------------------
    def test_future_tokens_do_not_change_past_logits(self, model):
        ids = self.ids(model, 2, 16)
        changed = ids.clone()
        changed[:, 9:] = self.ids(model, 2, 7, seed=1)
        torch.testing.assert_close(self.logits(model, ids)[:, :9], self.logits(model, changed)[:, :9], atol=ATOL, rtol=0)

    def test_future_tokens_do_not_change_past_logits_with_padding_mask(self, model):
        ids = self.ids(model, 2, 16)
        mask = torch.ones_like(ids)
        mask[0, :4] = 0  # row 0 left-padded
        changed = ids.clone()
        changed[:, 10:] = self.ids(model, 2, 6, seed=2)
        a = self.logits(model, ids, attention_mask=mask)[:, :10]
        b = self.logits(model, changed, attention_mask=mask)[:, :10]
        torch.testing.assert_close(a[0, 4:], b[0, 4:], atol=ATOL, rtol=0)
        torch.testing.assert_close(a[1], b[1], atol=ATOL, rtol=0)

    # --- (b) caching: compared on logits at every step -------------------------------------------------------------
    # Greedy tokens of a random tiny model barely depend on context: they matched while transformers 5.24's `cache=`
    # was silently ignored. Every check here compares logits (fp32, LOGIT_ATOL) over several seeds and prompts.
    def seeded_model(self, config, seed: int):
        torch.manual_seed(seed)
        return self.model_class(config.__class__.from_dict(config.to_dict())).eval()

    @pytest.mark.parametrize("seed", SEEDS)
    @pytest.mark.parametrize("cache_name", ["cache", "past_key_values"])
    def test_cached_step_by_step_equals_full_forward(self, config, seed, cache_name):
        """Prefill 5 tokens, then one token at a time; the cache passed under either name transformers has used."""
        model = self.seeded_model(config, seed)
        ids = self.ids(model, 2, 12, seed=seed)
        full = self.logits(model, ids)
        extra = self.extra_inputs(model, 2)
        cache, steps = DynamicCache(config=model.config), []
        with torch.no_grad():
            out = model(input_ids=ids[:, :5], use_cache=True, **{cache_name: cache}, **extra)
            steps.append(out.logits)
            for t in range(5, 12):
                out = model(input_ids=ids[:, t : t + 1], use_cache=True, **{cache_name: cache}, **extra)
                steps.append(out.logits)
        assert cache.get_seq_length() == 12
        torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=LOGIT_ATOL, rtol=0)

    def test_forward_returns_the_cache_it_filled(self, model):
        with torch.no_grad():
            out = model(input_ids=self.ids(model, 1, 4), use_cache=True, **self.extra_inputs(model, 1))
        cache = output_cache(out)  # the field's name depends on the version
        assert cache is not None and cache.get_seq_length() == 4

    def generate_logits(self, model, ids, **kw) -> tuple[torch.Tensor, torch.Tensor]:
        """(sequences, per-step logits `[B, steps, V]`) of `generate`."""
        out = model.generate(
            ids, output_logits=True, return_dict_in_generate=True, pad_token_id=0,
            **self.extra_inputs(model, ids.shape[0]), **kw,
        )
        return out.sequences, torch.stack(out.logits, dim=1)

    def assert_logits_match_full_forward(self, model, sequences, step_logits, prompt_len):
        """Step t's logits equal a full forward over the final (unpadded) sequence at position prompt_len + t - 1."""
        full = self.logits(model, sequences)[:, prompt_len - 1 : -1]
        torch.testing.assert_close(step_logits, full, atol=LOGIT_ATOL, rtol=0)

    @pytest.mark.parametrize("seed", SEEDS)
    def test_greedy_generate_logits_equal_full_forward(self, config, seed):
        model = self.seeded_model(config, seed)
        ids = self.ids(model, 2, 6, seed=seed)
        sequences, logits = self.generate_logits(model, ids, max_new_tokens=8, do_sample=False)
        assert sequences.shape == (2, 14)
        self.assert_logits_match_full_forward(model, sequences, logits, 6)

    @pytest.mark.parametrize("seed", SEEDS)
    def test_left_padded_generate_logits_equal_full_forward(self, config, seed):
        model = self.seeded_model(config, seed)
        ids = self.ids(model, 2, 8, seed=seed)
        mask = torch.ones_like(ids)
        mask[1, :3] = 0
        sequences, logits = self.generate_logits(model, ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        # the padded row's logits are those of its unpadded tokens alone
        self.assert_logits_match_full_forward(model, sequences[:1], logits[:1], 8)
        alone = sequences[1:, 3:]
        self.assert_logits_match_full_forward(model, alone, logits[1:], 5)

    @pytest.mark.parametrize("seed", SEEDS)
    def test_seeded_sampling_logits_equal_full_forward(self, config, seed):
        model = self.seeded_model(config, seed)
        ids = self.ids(model, 1, 5, seed=seed)
        sampling = dict(do_sample=True, temperature=0.8, top_k=20, top_p=0.9, max_new_tokens=8, num_return_sequences=3)
        torch.manual_seed(seed)
        sequences, logits = self.generate_logits(model, ids, **sampling)
        assert sequences.shape == (3, 13)
        self.assert_logits_match_full_forward(model, sequences, logits, 5)
        torch.manual_seed(seed)  # the same seed without a cache draws the same tokens
        again, _ = self.generate_logits(model, ids, use_cache=False, **sampling)
        assert torch.equal(sequences, again)

    @pytest.mark.parametrize("seed", SEEDS)
    def test_beam_search_with_cache_equals_without(self, config, seed):
        """Beams reorder the cache every step: per-step logits and final scores equal a cache-free beam search."""
        model = self.seeded_model(config, seed)
        ids = self.ids(model, 2, 6, seed=seed)
        kw = dict(max_new_tokens=6, do_sample=False, num_beams=3, num_return_sequences=2, output_logits=True,
                  output_scores=True, return_dict_in_generate=True, pad_token_id=0, **self.extra_inputs(model, 2))
        cached, plain = model.generate(ids, use_cache=True, **kw), model.generate(ids, use_cache=False, **kw)
        assert torch.equal(cached.sequences, plain.sequences)
        torch.testing.assert_close(torch.stack(cached.logits), torch.stack(plain.logits), atol=LOGIT_ATOL, rtol=0)
        torch.testing.assert_close(cached.sequences_scores, plain.sequences_scores, atol=LOGIT_ATOL, rtol=0)

    @pytest.mark.parametrize("seed", SEEDS)
    def test_static_cache_generate_logits_equal_full_forward(self, config, seed):
        model = self.seeded_model(config, seed)
        ids = self.ids(model, 2, 6, seed=seed)
        mask = torch.ones_like(ids)
        mask[1, :2] = 0
        kw = dict(max_new_tokens=6, do_sample=False, attention_mask=mask)
        dynamic, dynamic_logits = self.generate_logits(model, ids, **kw)
        static, static_logits = self.generate_logits(model, ids, cache_implementation="static", **kw)
        assert torch.equal(dynamic, static)
        torch.testing.assert_close(static_logits, dynamic_logits, atol=LOGIT_ATOL, rtol=0)
        self.assert_logits_match_full_forward(model, static[:1], static_logits[:1], 6)

    @pytest.mark.parametrize("seed", SEEDS)
    @pytest.mark.parametrize("mode", ["assisted", "prompt_lookup"])
    def test_assisted_and_prompt_lookup_equal_greedy(self, config, seed, mode):
        """Candidate tokens are verified in one forward and the cache is cropped back: the result equals greedy."""
        model = self.seeded_model(config, seed)
        prompt = self.ids(model, 1, 6, seed=seed)
        ids = torch.cat([prompt, prompt], dim=1)  # repeats give prompt lookup candidates to verify
        extra = dict(assistant_model=self.seeded_model(config, seed + 100)) if mode == "assisted" else dict(
            prompt_lookup_num_tokens=3)
        greedy, greedy_logits = self.generate_logits(model, ids, max_new_tokens=10, do_sample=False)
        fast, fast_logits = self.generate_logits(model, ids, max_new_tokens=10, do_sample=False, **extra)
        assert torch.equal(fast, greedy)
        torch.testing.assert_close(fast_logits, greedy_logits, atol=LOGIT_ATOL, rtol=0)

    def test_sampling_generate(self, model):
        ids = self.ids(model, 1, 4)
        torch.manual_seed(0)
        out = model.generate(
            ids, do_sample=True, temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.2, max_new_tokens=5,
            num_return_sequences=3, pad_token_id=0, **self.extra_inputs(model, 1),
        )
        assert out.shape == (3, 9)
        assert torch.equal(out[:, :4], ids.expand(3, -1))

    # --- padding-free packing --------------------------------------------------------------------------------------
    def test_packed_documents_equal_separate_runs(self, model):
        """TRL's padding-free rows: documents back to back, positions restarting at 0, no attention mask."""
        docs = [self.ids(model, 1, n, seed=10 + n)[0] for n in (7, 3, 9)]
        packed = torch.cat(docs)[None]
        position_ids = torch.cat([torch.arange(len(d)) for d in docs])[None]
        logits = self.logits(model, packed, position_ids=position_ids)[0]
        start = 0
        for doc in docs:
            alone = self.logits(model, doc[None])[0]
            torch.testing.assert_close(logits[start : start + len(doc)], alone, atol=ATOL, rtol=0)
            start += len(doc)

    # --- (c) padding ---------------------------------------------------------------------------------------------------
    def left_padded_batch(self, model):
        long_row, short_row = self.ids(model, 1, 10, seed=3), self.ids(model, 1, 6, seed=4)
        batch = torch.zeros(2, 10, dtype=torch.long)
        mask = torch.zeros(2, 10, dtype=torch.long)
        batch[0], mask[0] = long_row[0], 1
        batch[1, 4:], mask[1, 4:] = short_row[0], 1
        return long_row, short_row, batch, mask

    def test_left_padded_batch_equals_unbatched(self, model):
        long_row, short_row, batch, mask = self.left_padded_batch(model)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        batched = self.logits(model, batch, attention_mask=mask, position_ids=position_ids)
        torch.testing.assert_close(batched[0], self.logits(model, long_row)[0], atol=ATOL, rtol=0)
        torch.testing.assert_close(batched[1, 4:], self.logits(model, short_row)[0], atol=ATOL, rtol=0)

    def test_left_padded_batch_without_position_ids_equals_unbatched(self, model):
        """A plain `model(ids, attention_mask=mask)`: positions must come from the mask (RxT's memory reads depend on
        absolute positions: rotated queries meet unrotated slots)."""
        long_row, short_row, batch, mask = self.left_padded_batch(model)
        batched = self.logits(model, batch, attention_mask=mask)
        torch.testing.assert_close(batched[0], self.logits(model, long_row)[0], atol=ATOL, rtol=0)
        torch.testing.assert_close(batched[1, 4:], self.logits(model, short_row)[0], atol=ATOL, rtol=0)

    def test_left_padded_generate_equals_unbatched(self, model):
        long_row, short_row, batch, mask = self.left_padded_batch(model)
        kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
        batched = model.generate(batch, attention_mask=mask, **kw, **self.extra_inputs(model, 2))
        alone_long = model.generate(long_row, **kw, **self.extra_inputs(model, 1))
        alone_short = model.generate(short_row, **kw, **self.extra_inputs(model, 1))
        assert torch.equal(batched[0], alone_long[0])
        assert torch.equal(batched[1, 4:], alone_short[0])

    # --- attention backends and outputs ------------------------------------------------------------------------------
    def test_sdpa_equals_eager(self, model, config):
        ids = self.ids(model, 2, 9)
        mask = torch.ones_like(ids)
        mask[1, :3] = 0
        sdpa = type(model)._from_config(config.__class__.from_dict(config.to_dict()), attn_implementation="sdpa")
        sdpa.load_state_dict(model.state_dict())
        eager = type(model)._from_config(config.__class__.from_dict(config.to_dict()), attn_implementation="eager")
        eager.load_state_dict(model.state_dict())
        a = self.logits(sdpa.eval(), ids, attention_mask=mask)
        b = self.logits(eager.eval(), ids, attention_mask=mask)
        torch.testing.assert_close(a[0], b[0], atol=1e-4, rtol=0)
        torch.testing.assert_close(a[1, 3:], b[1, 3:], atol=1e-4, rtol=0)

    def test_hidden_states_and_attentions(self, model, config):
        ids = self.ids(model, 1, 7)
        eager = type(model)._from_config(config.__class__.from_dict(config.to_dict()), attn_implementation="eager").eval()
        with torch.no_grad():
            out = eager(input_ids=ids, output_hidden_states=True, output_attentions=True, **self.extra_inputs(eager, 1))
        assert len(out.hidden_states) == config.num_hidden_layers + 1
        assert len(out.attentions) == config.num_hidden_layers
        assert out.attentions[0].shape[-2:] == (7, 7)

    @pytest.mark.parametrize("use_reentrant", [False, True], ids=["non-reentrant", "reentrant"])
    @pytest.mark.parametrize("with_cache", [False, True], ids=["", "with-cache"])
    def test_gradient_checkpointing_matches(self, model, use_reentrant, with_cache):
        """Same loss and gradients with checkpointing, also when the caller passes a cache (a recomputed layer must
        not write into it twice: transformers 5.17 only drops a kwarg named `past_key_values`)."""
        ids = self.ids(model, 2, 8)
        model.train()
        torch.manual_seed(1)
        plain = model(input_ids=ids, labels=ids, **self.extra_inputs(model, 2)).loss
        plain.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        if hasattr(model, "activation_checkpointing_enable"):  # transformers 5.2x's name (the old one warns there)
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
        cache = {"cache": DynamicCache(config=model.config), "use_cache": True} if with_cache else {}
        torch.manual_seed(1)
        ckpt = model(input_ids=ids, labels=ids, **cache, **self.extra_inputs(model, 2)).loss
        ckpt.backward()
        torch.testing.assert_close(ckpt, plain)
        for n, p in model.named_parameters():
            if n in grads:
                torch.testing.assert_close(p.grad, grads[n], atol=1e-5, rtol=1e-4, msg=n)

    # --- (d) persistence --------------------------------------------------------------------------------------------------
    def test_save_load_bit_exact(self, model, tmp_path):
        model.save_pretrained(tmp_path)
        assert (tmp_path / "model.safetensors").exists()
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
        assert type(reloaded) is type(model)
        for (n, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
            assert torch.equal(a, b), n
        ids = self.ids(model, 2, 8)
        assert torch.equal(self.logits(model, ids), self.logits(reloaded, ids))

    def test_remote_code_load_without_package(self, model, tmp_path):
        """A fresh process where `rat_hf` cannot be imported loads the checkpoint with trust_remote_code."""
        save = tmp_path / "ckpt"
        model.save_pretrained(save)
        config = json.loads((save / "config.json").read_text())
        assert "AutoModelForCausalLM" in config["auto_map"]
        ids = self.ids(model, 2, 8)
        torch.save({"ids": ids, "logits": self.logits(model, ids)}, tmp_path / "expected.pt")
        script = textwrap.dedent(f"""
            import sys
            sys.modules["rat_hf"] = None  # importing rat_hf now raises ImportError
            import torch
            from transformers import AutoModelForCausalLM
            expected = torch.load({str(tmp_path / "expected.pt")!r})
            model = AutoModelForCausalLM.from_pretrained({str(save)!r}, trust_remote_code=True).eval()
            assert not type(model).__module__.startswith("rat_hf"), type(model).__module__
            {self.remote_check_source()}
            with torch.no_grad():
                logits = model(input_ids=expected["ids"], **extra).logits
            assert torch.equal(logits, expected["logits"]), (logits - expected["logits"]).abs().max()
            print("REMOTE_OK", type(model).__module__)
        """)
        env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"}
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
        assert result.returncode == 0 and "REMOTE_OK" in result.stdout, result.stderr[-3000:]

    def remote_check_source(self) -> str:
        """Python source run in the remote-code process that defines `extra` (extra forward inputs)."""
        return "extra = {}"
