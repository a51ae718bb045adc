"""Tensor parallelism: a factored checkpoint sharded over 2 and 4 ranks gives the torch runtime's tokens.

On vLLM's CPU build the ranks are processes talking over gloo; each rank's OpenMP threads
are bound to one of the machine's cores (several ranks may share a core). TP=4 with the
tiny model's 2 kv heads exercises kv-head replication (two ranks load the same k/v shard).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from vllm_helpers import NEW_TOKENS, prompt_ids, reference_tokens, write_mixed

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

SCRIPT = Path(__file__).with_name("tp_generate.py")


def _binding(tp_size: int) -> str:
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    return "|".join(str(cores[i % len(cores)]) for i in range(tp_size))


def _tp_tokens(path: Path, tp_size: int, prompts: list[list[int]]) -> list[list[int]]:
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": _binding(tp_size), "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    done = subprocess.run([sys.executable, str(SCRIPT), str(path), str(tp_size), json.dumps(prompts), str(NEW_TOKENS)],
                          env=env, capture_output=True, text=True, timeout=480)
    lines = [line for line in done.stdout.splitlines() if line.startswith("TOKENS ")]
    if done.returncode != 0 or not lines:
        pytest.fail(f"TP={tp_size} run failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(lines[-1].removeprefix("TOKENS "))


@pytest.mark.parametrize("tp_size", [2, 4])
def test_tensor_parallel_parity(vllm_module, tmp_path: Path, tp_size: int) -> None:
    path = write_mixed(tmp_path / "tiny-llama-factored", "llama")
    prompts = prompt_ids(path)
    assert _tp_tokens(path, tp_size, prompts) == reference_tokens(path, prompts)


def test_tensor_parallel_quantized_lm_head(vllm_module, tmp_path: Path) -> None:
    """An int8 ``--lm-head`` checkpoint at TP=2: each rank loads and dequantizes its half of the vocab."""
    from factorlm.compressor.quantize import quantize_checkpoint

    src = write_mixed(tmp_path / "tiny-llama-factored", "llama", tie_word_embeddings=True)
    path = tmp_path / "q"
    quantize_checkpoint(src, path, bits=8, lm_head=True)
    prompts = prompt_ids(path)
    assert _tp_tokens(path, 2, prompts) == reference_tokens(path, prompts)
