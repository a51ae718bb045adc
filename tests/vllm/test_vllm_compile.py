"""vLLM's default torch.compile mode (no enforce_eager) traces the factored layers: same greedy tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
from vllm_helpers import make_llm, prompt_ids, reference_tokens, shutdown, vllm_tokens, write_mixed

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def test_compiled_engine_parity(vllm_module, tmp_path: Path) -> None:
    path = write_mixed(tmp_path / "tiny-llama-factored", "llama")
    prompts = prompt_ids(path)
    llm = make_llm(path, enforce_eager=False)
    try:
        assert vllm_tokens(llm, prompts) == reference_tokens(path, prompts)
    finally:
        shutdown(llm)
