"""Faster decoding paths on top of `generate()`.

`graph_generate(model, input_ids, max_new_tokens=...)` runs `generate()`'s greedy/sampling loop with each step replayed
from a CUDA graph over a static cache; `graph_decoding` is the same loop as a `generate(custom_generate=...)` method.
"""

from .graph_decode import SUPPORTED_CRITERIA, SUPPORTED_PROCESSORS, graph_decoding, graph_generate

__all__ = ["graph_generate", "graph_decoding", "SUPPORTED_PROCESSORS", "SUPPORTED_CRITERIA"]
