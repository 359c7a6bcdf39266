"""What differs between the transformers versions rat_hf supports, in one place for the code outside the models.

transformers 5.24 renamed the cache argument `past_key_values` -> `cache` (what `generate()` passes, what its models
take, the outputs' field). The model files (shipped alone as remote code) detect it themselves; the CLI, compat layer
and benchmarks ask here.
"""

import inspect

from transformers.masking_utils import create_causal_mask

# `cache` from transformers 5.24 (its models warn on `past_key_values` there), `past_key_values` before
CACHE_ARGUMENT = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"


def output_cache(outputs):
    """The cache a model output carries, under this version's field name (reading the old name warns on 5.24)."""
    return getattr(outputs, CACHE_ARGUMENT)
