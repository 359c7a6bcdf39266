"""Graph-captured decoding: `generate()`'s greedy/sampling loop with the per-token step replayed as one CUDA graph.

`generate()` spends most of a small model's batch-1 decoding time on the host: per token it prepares inputs, builds
masks, launches hundreds of small kernels one by one, runs the logits processors and the stopping criteria, and
synchronises. Here `generate()` still does everything up to and including the prefill (argument checks, special
tokens, attention mask, position ids, the static cache, logits processors), and then one decode step -- the model's
forward on one token per row, the logits processors, greedy argmax or sampling, the EOS bookkeeping -- works only on
tensors at fixed addresses (static KV + conv state in the `StaticCache`, token/position/mask buffers), so it is
captured once in a `torch.cuda.CUDAGraph` and replayed per token. Optionally the model's forward is first compiled by
`torch.compile` (inductor, without its own cudagraphs) so the replayed graph holds fused kernels. The host only
replays, and checks for EOS every `check_every` steps.

    from rat_hf.generation import graph_generate, graph_decoding
    out = graph_generate(model, input_ids, attention_mask=mask, max_new_tokens=128)        # greedy
    out = graph_generate(model, input_ids, max_new_tokens=128, do_sample=True, top_p=0.9)  # seeded by torch's RNG
    # or generate()'s own hook (a fresh cache, hence a fresh capture, per call):
    out = model.generate(input_ids, custom_generate=graph_decoding, cache_implementation="static", max_new_tokens=128)

Outputs equal `generate()`'s token for token when the step runs the same kernels: with `compile_step=False` the
captured step is `generate(cache_implementation="static", disable_compile=True)`'s eager step (bf16, H200, batch 1:
identical; batch 32: parted after 7 tokens, cause not established, see bench/graph_decode_notes.md);
with the default `compile_step=True` on CUDA it is inductor's code (bf16, H200, batch 1: identical to
`generate(cache_implementation="static")`, which compiles too; both part from the eager path at near-ties of a random
model; float32: identical to `generate()`). `tests/test_graph_decode.py` checks the loop without capture on CPU,
bench/bench_graph_decode.py the graphs on the GPU. The first call of a shape compiles (about 20 s for the 120M RAT)
and captures; later calls of that shape through `graph_generate` replay. Prefill goes through generate()'s own
(private) `_prefill`, present in transformers 5.17 to 5.24.
Any model whose forward takes `input_ids`, `position_ids`, a 4D sdpa/eager `attention_mask` (or the dict of them that
`generate` builds) and a `StaticCache` works: RAT (KV + conv state in `"hybrid"` cache layers) and e.g. Llama.
Unsupported settings (beams, logits processors other than temperature/top-k/top-p/min-p, stop strings, streamers,
returned dicts, flash/flex attention, training mode) raise a one-line `ValueError` instead of decoding differently.
"""

from __future__ import annotations

import functools
import weakref

import torch
from transformers.cache_utils import Cache, StaticCache
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria, StoppingCriteriaList

from .._versions import CACHE_ARGUMENT

# processors that read only the scores (not the growing input_ids, not the step count), so they run inside the graph
SUPPORTED_PROCESSORS = (TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper, MinPLogitsWarper)
SUPPORTED_CRITERIA = (MaxLengthCriteria, EosTokenCriteria)
# what `prepare_inputs_for_generation` may hand a decode step; anything else could change per step
_DECODE_INPUTS = {"input_ids", "position_ids", "attention_mask", CACHE_ARGUMENT, "use_cache", "logits_to_keep"}
# real decode steps run eagerly (on a side stream) before the capture: cuBLAS handles, compilation, autotuning
_WARMUP_STEPS = 2

# the attribute of a cache holding its captured step (a graph holds that cache's tensor addresses): dropped with it
_STEP_ATTR = "_rat_hf_graph_step"
# graph_generate's reusable cache per model, so consecutive calls of the same shape replay the same graph
_CACHES: "weakref.WeakKeyDictionary[torch.nn.Module, tuple[tuple, StaticCache]]" = weakref.WeakKeyDictionary()


def _fail(message: str):
    raise ValueError(f"graph decoding: {message}")


def _check_supported(model, generation_config, logits_processor, stopping_criteria, synced_gpus, streamer):
    """Everything `graph_decoding` would otherwise do differently from `generate()`: refuse it, one line each."""
    if model.training:
        _fail("the model is in training mode (dropout, sampled gates); call model.eval() first")
    if model.config.is_encoder_decoder:
        _fail("encoder-decoder models are not supported")
    if generation_config.num_beams != 1:
        _fail(f"num_beams={generation_config.num_beams}: only greedy decoding and sampling are supported")
    if generation_config.return_dict_in_generate:
        _fail("return_dict_in_generate=True is not supported (the graph returns sequences only)")
    if synced_gpus:
        _fail("synced_gpus=True is not supported")
    if streamer is not None:
        _fail("streamers are not supported (tokens stay on the device until the end)")
    attn = getattr(model.config, "_attn_implementation", None)
    if attn not in ("sdpa", "eager"):
        _fail(f"attn_implementation={attn!r}: only 'sdpa' and 'eager' are supported")
    for processor in logits_processor:
        if not isinstance(processor, SUPPORTED_PROCESSORS):
            _fail(f"logits processor {type(processor).__name__} is not supported "
                  f"(supported: {', '.join(c.__name__ for c in SUPPORTED_PROCESSORS)})")
    for criterion in stopping_criteria:
        if not isinstance(criterion, SUPPORTED_CRITERIA):
            _fail(f"stopping criterion {type(criterion).__name__} is not supported (max length and EOS are)")


def _choose(logits, logits_processor, input_ids, do_sample, eos_token_id, pad_token_id, unfinished):
    """`generate()`'s token choice from float32 logits [B, V]: processors, argmax or multinomial, pad after EOS.

    Updates `unfinished` [B] (1 = still generating) in place, as `generate()` does with its EOS criterion.
    """
    scores = logits_processor(input_ids, logits)  # the supported processors never read the ids
    if do_sample:
        next_tokens = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)  # [B]
    else:
        next_tokens = torch.argmax(scores, dim=-1)  # [B]
    if eos_token_id is not None:
        next_tokens = next_tokens * unfinished + pad_token_id * (1 - unfinished)
        unfinished.mul_((~torch.isin(next_tokens, eos_token_id)).long())
    return next_tokens


class _DecodeStep:
    """Static buffers and the one-token step over them, replayed from a CUDA graph (or called eagerly).

    Buffers (B = batch, L = the cache's length, S = prompt + new tokens):
      tokens [B, 1] the token fed next; positions [B, 1] its position id; kv_valid [B, L] which cache slots a query may
      attend (the prompt's attention mask, then every decoded slot); cache_pos [1] the slot written next; write_pos [1]
      the column of `sequences` [B, S] written next; unfinished [B] 1 until a row emits EOS; n_decoded [1] the steps
      run while some row was unfinished (the output's length past the first new token).
    """

    def __init__(self, model, cache, key, batch, max_cache_len, total_len, mask_template, logits_processor,
                 do_sample, eos_token_id, pad_token_id, logits_to_keep, cuda_graph, compile_step):
        # weak: a captured step lives on its cache (`_STEP_ATTR`) and the cache in `_CACHES[model]`; strong references
        # back to the model would keep both alive forever
        self.model_ref, self.cache_ref, self.key = weakref.ref(model), weakref.ref(cache), key
        self.mask_template = mask_template  # ("tensor" | "dict", {name: dtype | None})
        self.logits_processor, self.do_sample = logits_processor, do_sample
        self.eos_token_id, self.pad_token_id = eos_token_id, pad_token_id  # [n_eos] | None, 0-dim | None
        self.logits_to_keep, self.cuda_graph = logits_to_keep, cuda_graph
        device = model.device
        long = dict(dtype=torch.long, device=device)
        self.tokens = torch.zeros(batch, 1, **long)
        self.positions = torch.zeros(batch, 1, **long)
        self.kv_valid = torch.zeros(batch, max_cache_len, dtype=torch.bool, device=device)
        self.cache_pos = torch.zeros(1, **long)
        self.write_pos = torch.zeros(1, **long)
        self.sequences = torch.zeros(batch, total_len, **long)
        self.unfinished = torch.ones(batch, **long)
        self.n_decoded = torch.zeros(1, **long)
        # compiled without inductor's own cudagraphs: the whole step (forward + sampling) is captured here
        if compile_step:
            options = {"dynamic": False, **(compile_step if isinstance(compile_step, dict) else {})}
            self.forward_logits = torch.compile(self._forward_logits, **options)
        else:
            self.forward_logits = self._forward_logits
        self.graph = None

    # -- the step ------------------------------------------------------------------------------------------------------
    def build_mask(self, kv_valid: torch.Tensor):
        """The 4D mask(s) `generate()` would pass for this step, from `kv_valid` [B, L] (True = may attend)."""
        kind, dtypes = self.mask_template
        masks = {}
        for name, dtype in dtypes.items():
            if dtype is None:
                masks[name] = None
            elif dtype == torch.bool:
                masks[name] = kv_valid[:, None, None, :]  # [B, 1, 1, L]
            else:  # additive mask of eager attention: 0 where attended, the dtype's minimum elsewhere
                zero = torch.zeros((), dtype=dtype, device=kv_valid.device)
                masks[name] = torch.where(kv_valid[:, None, None, :], zero, torch.finfo(dtype).min)
        return masks["mask"] if kind == "tensor" else masks

    def _forward_logits(self, model, tokens, positions, kv_valid, cache):
        """The model on one token per row -> float32 logits [B, V] (what `generate` hands the logits processors)."""
        extra = {} if self.logits_to_keep is None else {"logits_to_keep": self.logits_to_keep}
        out = model(input_ids=tokens, position_ids=positions, attention_mask=self.build_mask(kv_valid),
                         use_cache=True, return_dict=True, **{CACHE_ARGUMENT: cache}, **extra)
        return out.logits[:, -1].to(dtype=torch.float32)

    def step(self) -> None:
        """One decode step, all in place on the static buffers (this is what the graph records)."""
        self.kv_valid.index_fill_(1, self.cache_pos, True)  # the new token attends to itself
        alive = self.unfinished.amax().reshape(1)  # generate() runs this step only while a row is unfinished
        logits = self.forward_logits(self.model_ref(), self.tokens, self.positions, self.kv_valid, self.cache_ref())
        next_tokens = _choose(logits, self.logits_processor, self.sequences, self.do_sample, self.eos_token_id,
                              self.pad_token_id, self.unfinished)
        self.sequences.index_copy_(1, self.write_pos, next_tokens[:, None])
        self.tokens.copy_(next_tokens[:, None])
        self.n_decoded.add_(alive)
        self.positions.add_(1)
        self.cache_pos.add_(1)
        self.write_pos.add_(1)

    # -- one generate() call -----------------------------------------------------------------------------------------
    def start(self, sequences, first_tokens, positions, attention_mask, unfinished):
        """Load the state after the prefill and the first new token into the static buffers (addresses unchanged)."""
        prompt_len = attention_mask.shape[1]
        self.sequences.zero_()
        self.sequences[:, : sequences.shape[1]].copy_(sequences)
        self.tokens.copy_(first_tokens[:, None])
        self.positions.copy_(positions)
        self.kv_valid.zero_()
        self.kv_valid[:, :prompt_len].copy_(attention_mask.bool())
        self.cache_pos.fill_(prompt_len)
        self.write_pos.fill_(sequences.shape[1])
        self.unfinished.copy_(unfinished)
        self.n_decoded.zero_()

    def run(self, n_steps: int, check_every: int) -> None:
        """Run `n_steps` decode steps (fewer once every row has emitted EOS, checked every `check_every` steps)."""
        done = 0
        if self.cuda_graph and self.graph is None:
            # warm-up steps are real steps (cuBLAS workspaces, compilation), run on a side stream as capture wants
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                while done < min(_WARMUP_STEPS, n_steps):
                    self.step()
                    done += 1
            torch.cuda.current_stream().wait_stream(side)
            if done < n_steps:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):  # records, does not run: the state is still before the next step
                    self.step()
                self.graph = graph
        run_one = self.graph.replay if self.cuda_graph else self.step
        while done < n_steps:
            run_one()
            done += 1
            if self.eos_token_id is not None and done % check_every == 0 and not bool(self.unfinished.any()):
                break


def _step_key(model, batch, max_cache_len, total_len, mask_template, logits_processor, do_sample, eos, pad,
              logits_to_keep, cuda_graph, compile_step) -> tuple:
    """Everything a captured step bakes in; a different key recaptures. Parameters by address: a graph reads them."""
    processors = tuple((type(p).__name__, tuple(sorted((k, v) for k, v in vars(p).items()
                                                       if isinstance(v, (int, float, bool, str)))))
                       for p in logits_processor)
    return (batch, max_cache_len, total_len, repr(mask_template), processors, do_sample,
            None if eos is None else tuple(eos.tolist()), None if pad is None else int(pad), logits_to_keep,
            cuda_graph, repr(compile_step), model.dtype, str(model.device),
            tuple(p.data_ptr() for p in model.parameters()), tuple(b.data_ptr() for b in model.buffers()))


def _mask_template(mask, batch: int, max_cache_len: int):
    """("tensor" | "dict", {name: dtype | None}) from the mask `generate` prepared for the first decode step."""
    def leaf(name, value):
        if value is None:
            return None
        if not torch.is_tensor(value) or tuple(value.shape) != (batch, 1, 1, max_cache_len):
            shape = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
            _fail(f"attention mask {name!r} is {shape}, expected a [B, 1, 1, cache length] tensor")
        return value.dtype
    if isinstance(mask, dict):
        template = {name: leaf(name, value) for name, value in mask.items()}
        if all(dtype is None for dtype in template.values()):
            _fail("generate() passes no attention mask to decode steps over the static cache")
        return "dict", template
    if mask is None:
        _fail("generate() passes no attention mask to decode steps over the static cache")
    return "tensor", {"mask": leaf("attention_mask", mask)}


def _masks_equal(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_masks_equal(a[k], b[k]) for k in a)
    if a is None or b is None:
        return a is None and b is None
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


@torch.no_grad()
def graph_decoding(
    model,
    input_ids: torch.LongTensor,
    logits_processor: LogitsProcessorList,
    stopping_criteria: StoppingCriteriaList,
    generation_config,
    synced_gpus: bool = False,
    streamer=None,
    cuda_graph: bool | None = None,
    compile_step: bool | dict | None = None,
    check_every: int = 16,
    **model_kwargs,
) -> torch.LongTensor:
    """A `generate()` decoding method (`model.generate(..., custom_generate=graph_decoding)`): prefill, then graphs.

    cuda_graph: capture the step in a CUDA graph (default: on CUDA; False runs the same step eagerly, e.g. on CPU).
    compile_step: `torch.compile` the model's forward inside the step (default: with `cuda_graph`). Fused kernels, but
        inductor's numerics, not eager's (bf16 greedy tokens may then part from `generate()` at near-ties). A dict
        is passed to `torch.compile` (e.g. `{"mode": "max-autotune-no-cudagraphs"}`).
    check_every: steps between EOS checks (each one a host sync); at most this many steps run after every row ended.
    Returns `[B, prompt + new]` token ids, like `generate()` (pad after a row's EOS; as long as the longest row).
    """
    device = input_ids.device
    cuda_graph = device.type == "cuda" if cuda_graph is None else cuda_graph
    compile_step = cuda_graph if compile_step is None else compile_step
    if cuda_graph and device.type != "cuda":
        _fail(f"CUDA graphs need a CUDA device, the inputs are on {device.type} (pass cuda_graph=False to run the "
              f"same decode step eagerly, or use generate())")
    if not isinstance(compile_step, (bool, dict)):
        _fail(f"compile_step={compile_step!r} must be a bool or a dict of torch.compile arguments")
    if not isinstance(check_every, int) or check_every < 1:
        _fail(f"check_every={check_every!r} must be a positive int")
    _check_supported(model, generation_config, logits_processor, stopping_criteria, synced_gpus, streamer)
    cache = model_kwargs.get(CACHE_ARGUMENT)
    if not isinstance(cache, Cache) or not cache.is_compileable or not all(
        hasattr(layer, "max_cache_len") for layer in cache.layers
    ):
        _fail(f"needs a static cache (pass cache_implementation='static' or {CACHE_ARGUMENT}=StaticCache(...)), "
              f"got {type(cache).__name__}")
    if any(getattr(layer, "is_sliding", False) for layer in cache.layers):
        _fail("sliding-window cache layers are not supported (their masks change shape as they wrap)")
    if "position_ids" not in model_kwargs:
        _fail(f"{type(model).__name__}.forward takes no position_ids")

    batch, prompt_len = input_ids.shape
    max_length = generation_config.max_length
    new_tokens = max_length - prompt_len
    max_cache_len = min(layer.max_cache_len for layer in cache.layers)
    if prompt_len + new_tokens - 1 > max_cache_len:
        _fail(f"the static cache holds {max_cache_len} tokens, {prompt_len} + {new_tokens} - 1 are needed")
    eos = generation_config._eos_token_tensor
    has_eos = any(isinstance(c, EosTokenCriteria) for c in stopping_criteria)
    eos = eos.to(device).reshape(-1) if has_eos and eos is not None else None
    pad = generation_config._pad_token_tensor
    pad = pad.to(device) if pad is not None else None
    if eos is not None and pad is None:
        _fail("an EOS token needs a pad token (set pad_token_id)")

    # prefill: generate()'s own (chunked if prefill_chunk_size is set), eager
    outputs = model._prefill(input_ids, generation_config, model_kwargs, is_first_iteration=True)
    position_ids = model_kwargs["position_ids"]  # [B, prompt], from the attention mask, as generate() made them
    attention_mask = model_kwargs["attention_mask"]  # [B, prompt]
    logits = outputs.logits[:, -1].to(copy=True, dtype=torch.float32)

    # the first new token, chosen by the same code as in the graph
    total_len = prompt_len + new_tokens
    unfinished = torch.ones(batch, dtype=torch.long, device=device)
    first_tokens = _choose(logits, logits_processor, input_ids, generation_config.do_sample, eos, pad, unfinished)
    sequences = torch.cat([input_ids, first_tokens[:, None]], dim=-1)
    if new_tokens == 1 or (eos is not None and not bool(unfinished.any())):
        return sequences

    # what generate() would feed the first decode step: its mask gives the template, and checks ours
    model_kwargs = model._update_model_kwargs_for_generation(outputs, model_kwargs, is_encoder_decoder=False)
    del outputs
    inputs = model.prepare_inputs_for_generation(sequences, next_sequence_length=1, **model_kwargs)
    unknown = set(inputs) - _DECODE_INPUTS
    if unknown:
        _fail(f"decode steps would get inputs {sorted(unknown)}, which may change per step")
    mask_template = _mask_template(inputs.get("attention_mask"), batch, max_cache_len)
    logits_to_keep = inputs.get("logits_to_keep")
    next_positions = position_ids[:, -1:] + 1  # [B, 1]

    key = _step_key(model, batch, max_cache_len, total_len, mask_template, logits_processor,
                    generation_config.do_sample, eos, pad, logits_to_keep, cuda_graph, compile_step)
    runner = getattr(cache, _STEP_ATTR, None)
    if runner is None or runner.key != key:
        runner = _DecodeStep(model, cache, key, batch, max_cache_len, total_len, mask_template, logits_processor,
                             generation_config.do_sample, eos, pad, logits_to_keep, cuda_graph, compile_step)
        setattr(cache, _STEP_ATTR, runner)
    runner.logits_processor = logits_processor  # same settings (the key), this call's objects
    runner.start(sequences, first_tokens, next_positions, attention_mask, unfinished)

    # our first step's inputs must be exactly generate()'s (mask values included): else fail, never decode differently
    runner.kv_valid.index_fill_(1, runner.cache_pos, True)  # as the step will (the bool mask is a view of it)
    same = (_masks_equal(runner.build_mask(runner.kv_valid), inputs["attention_mask"])
            and torch.equal(runner.positions, inputs["position_ids"])
            and torch.equal(runner.tokens, inputs["input_ids"]))
    runner.kv_valid.index_fill_(1, runner.cache_pos, False)
    if not same:
        raise RuntimeError("graph decoding: the decode inputs differ from generate()'s (please report this model)")

    runner.run(new_tokens - 1, check_every)
    length = total_len - (new_tokens - 1) + int(runner.n_decoded.item())
    return runner.sequences[:, :length].clone()


@torch.no_grad()
def graph_generate(
    model,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int,
    cuda_graph: bool | None = None,
    compile_step: bool | dict | None = None,
    check_every: int = 16,
    **generate_kwargs,
) -> torch.LongTensor:
    """`model.generate(input_ids, max_new_tokens=..., **generate_kwargs)` with the decode loop in a CUDA graph.

    Keeps one `StaticCache` per model for the last (batch, prompt + new tokens) shape, so repeated calls of one shape
    (benchmarks, RL rollouts with padded prompts) replay the step captured on the first call; a new shape allocates a
    new cache and captures again. Greedy by default; `do_sample=True, temperature/top_k/top_p/min_p` sample on the
    device with torch's RNG (`torch.manual_seed` makes it repeatable). `eos_token_id`/`pad_token_id` as in generate().
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        _fail(f"max_new_tokens={max_new_tokens!r} must be a positive int")
    for name in ("custom_generate", "cache_implementation", "past_key_values", "cache"):
        if generate_kwargs.get(name) is not None:
            _fail(f"{name} is set by graph_generate itself")
    device = model.device
    if (cuda_graph is None or cuda_graph) and device.type != "cuda":
        _fail(f"CUDA graphs need a CUDA device, the model is on {device.type} (use generate(), or cuda_graph=False)")
    batch, prompt_len = input_ids.shape
    shape = (batch, prompt_len + max_new_tokens - 1, model.dtype, str(device))
    held = _CACHES.get(model)
    if held is not None and held[0] == shape:
        cache = held[1]
        cache.reset()  # zeroes in place: the captured step's addresses stay valid
    else:
        cache = StaticCache(config=model.config.get_text_config(decoder=True), max_cache_len=shape[1])
        _CACHES[model] = (shape, cache)
    decoding = functools.partial(graph_decoding, cuda_graph=cuda_graph, compile_step=compile_step,
                                 check_every=check_every)
    return model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                          custom_generate=decoding, **{CACHE_ARGUMENT: cache}, **generate_kwargs)
