"""The server's onnx engine: continuous batching over ONNX Runtime gives the torch runtime's greedy tokens."""

from __future__ import annotations

import asyncio

import pytest
import torch

pytest.importorskip("onnxruntime")

from factorlm.exporters.onnx import create_engine, export_onnx  # noqa: E402
from factorlm.runtime.checkpoint import load_model  # noqa: E402
from factorlm.runtime.generate import SamplingParams, generate_tokens  # noqa: E402
from factorlm.serving.engine import GenerationRequest  # noqa: E402
from factorlm.testing import write_tiny_factored  # noqa: E402

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [20, 21], [30, 31, 32, 33], [40] * 9]


async def _collect(engine, request):
    tokens = []
    async for event in engine.submit(request):
        tokens += event.token_ids
    return tokens


def test_onnx_engine_batches_like_torch_decodes_alone(tmp_path) -> None:
    ckpt = write_tiny_factored(tmp_path / "ckpt", "qwen3")
    export_onnx(ckpt, tmp_path / "onnx", threads=1)
    model = load_model(ckpt)
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    want = [list(generate_tokens(model, torch.tensor([p]), params)) for p in PROMPTS]
    engine = create_engine(tmp_path / "onnx", max_batch=4, threads=1)
    engine.start()
    try:
        async def run_all():
            return await asyncio.gather(*[_collect(engine, GenerationRequest(p, params)) for p in PROMPTS])

        got = asyncio.run(run_all())
    finally:
        engine.shutdown()
    assert got == want
