"""The decode core: one sampler, one text stream, one decode loop over a ``CausalLM``.

``factorlm generate``, the server's engines, the ONNX generator and the benchmark runners
all decode through these pieces.
"""

from .loop import (CausalLM, DynamicTorchLM, GenerationStats, StaticTorchLM, decode_batch, decode_tokens,
                   torch_lm)
from .sampling import SamplingParams, eos_token_ids, filter_logits, make_generator, sample_next
from .text import TextStream, find_stop

__all__ = ["CausalLM", "DynamicTorchLM", "GenerationStats", "SamplingParams", "StaticTorchLM", "TextStream",
           "decode_batch", "decode_tokens", "eos_token_ids", "filter_logits", "find_stop", "make_generator",
           "sample_next", "torch_lm"]
