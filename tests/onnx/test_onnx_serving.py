"""The server's onnx engine: continuous batching over ONNX Runtime gives the torch runtime's greedy tokens,
honours --threads, and answers over HTTP like the torch engine (same hardening)."""

from __future__ import annotations

import asyncio

import pytest
import torch

pytest.importorskip("onnxruntime")

import httpx  # noqa: E402

from factorlm.exporters.onnx import export_onnx  # noqa: E402
from factorlm.runtime.checkpoint import load_model  # noqa: E402
from factorlm.runtime.generate import SamplingParams, generate_tokens  # noqa: E402
from factorlm.serving.engine import GenerationRequest  # noqa: E402
from factorlm.serving.engines import EngineOptions, create_engine  # noqa: E402
from factorlm.testing import write_tiny_factored  # noqa: E402

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [20, 21], [30, 31, 32, 33], [40] * 9]


async def _collect(engine, request):
    tokens = []
    async for event in engine.submit(request):
        tokens += event.token_ids
    return tokens


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(factored checkpoint, its ONNX export)."""
    root = tmp_path_factory.mktemp("onnx-serving")
    ckpt = write_tiny_factored(root / "ckpt", "qwen3")
    export_onnx(ckpt, root / "onnx", threads=1)
    return ckpt, root / "onnx"


def test_onnx_engine_batches_like_torch_decodes_alone(exported) -> None:
    ckpt, onnx_dir = exported
    model = load_model(ckpt)
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    want = [list(generate_tokens(model, torch.tensor([p]), params)) for p in PROMPTS]
    engine = create_engine("onnx", onnx_dir, EngineOptions(max_batch=4, threads=1))
    engine.start()
    try:
        async def run_all():
            return await asyncio.gather(*[_collect(engine, GenerationRequest(p, params)) for p in PROMPTS])

        got = asyncio.run(run_all())
    finally:
        engine.shutdown()
    assert got == want


@pytest.mark.parametrize("threads", [1, 2])
def test_onnx_engine_honours_threads_and_names_the_model_after_the_folder(exported, threads) -> None:
    _, onnx_dir = exported
    before = torch.get_num_threads()
    try:
        engine = create_engine("onnx", onnx_dir, EngineOptions(max_batch=2, threads=threads))
    finally:
        torch.set_num_threads(before)  # the factory sets torch's (process-wide) threads too
    options = engine.model.engine.session.get_session_options()
    assert options.intra_op_num_threads == threads
    assert engine.model_name == onnx_dir.name


def test_onnx_engine_over_http_equals_torch_and_rejects_bad_input(exported) -> None:
    from factorlm.serving.app import create_app
    from factorlm.serving.server import BackgroundServer

    ckpt, onnx_dir = exported
    body = {"model": "m", "prompt": [5, 6, 7, 8], "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    texts = {}
    for name, folder in (("torch", ckpt), ("onnx", onnx_dir)):
        engine = create_engine(name, folder, EngineOptions(max_batch=2, threads=1, served_model_name="m"))
        with BackgroundServer(create_app(engine, api_key="k")) as url, \
                httpx.Client(base_url=url, headers={"Authorization": "Bearer k"}, timeout=60) as client:
            r = client.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            texts[name] = r.json()["choices"][0]["text"]
            bad = client.post("/v1/completions", content=b'{"model": "m", "prompt": "\\ud800"}',
                              headers={"content-type": "application/json"})
            assert bad.status_code == 400 and bad.json()["error"]["param"] == "prompt"
            assert client.post("/v1/completions", json={**body, "n": 3}).status_code == 400  # n > max_batch
            assert client.get("/v1/models").json()["data"][0]["id"] == "m"
    assert texts["onnx"] == texts["torch"]
