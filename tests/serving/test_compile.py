"""``factorlm serve --compile``: a lone request decodes through the compiled static-cache decoder,
requests that join it move it into the dynamic batch, and every token equals eager greedy decoding."""

from __future__ import annotations

import asyncio
import shutil

import httpx
import pytest
import torch

from factorlm.cli import build_parser
from factorlm.runtime.decode import StaticTorchLM
from factorlm.runtime.format import FactorlmError
from factorlm.runtime.generate import SamplingParams, generate_tokens
from factorlm.serving import torch_engine
from factorlm.serving.app import create_app
from factorlm.serving.engine import GenerationRequest
from factorlm.serving.engines import EngineOptions, create_engine
from factorlm.serving.server import BackgroundServer
from factorlm.testing import save_tiny_dense

HAS_CXX = bool(shutil.which("g++") or shutil.which("c++"))


async def _tokens(engine, request, delay: float = 0.0):
    await asyncio.sleep(delay)
    tokens = []
    async for event in engine.submit(request):
        tokens += event.token_ids
    return tokens


def _reference(model, prompt, n):
    return list(generate_tokens(model, torch.tensor([prompt]), SamplingParams(max_new_tokens=n, ignore_eos=True)))


def test_a_lone_request_decodes_on_the_static_cache_and_joiners_move_it_to_the_batch(tiny, monkeypatch):
    """The scheduling around the static decoder, checked eagerly (the compiled step is checked below)."""
    built: list[StaticTorchLM] = []
    left: list[int] = []

    def eager_static(*args, **kwargs):
        built.append(StaticTorchLM(*args, **{**kwargs, "compile": False}))
        return built[-1]

    monkeypatch.setattr(torch_engine, "StaticTorchLM", eager_static)
    model, tokenizer = tiny
    engine = torch_engine.TorchEngine(model, tokenizer, max_batch=4, compile=True)
    leave = engine._leave_static
    monkeypatch.setattr(engine, "_leave_static", lambda: (left.append(1), leave())[1])
    prompts = [[5, 6, 7, 8, 9, 10, 11], [20, 21], [30, 31, 32, 33]]
    short, long = SamplingParams(max_new_tokens=20, ignore_eos=True), SamplingParams(max_new_tokens=100, ignore_eos=True)

    async def joined():  # the first runs static; the others join once it has streamed a token
        events = engine.submit(GenerationRequest(prompts[0], long)).__aiter__()
        first = await events.__anext__()
        others = asyncio.gather(*[_tokens(engine, GenerationRequest(p, short)) for p in prompts[1:]])
        rest = [t for event in [e async for e in events] for t in event.token_ids]
        return [first.token_ids + rest, *await others]

    engine.start()
    try:
        alone = asyncio.run(_tokens(engine, GenerationRequest(prompts[0], short)))
        assert len(built) == 1 and built[0].position == len(prompts[0]) + 19 and not left  # it ran static
        together = asyncio.run(joined())
    finally:
        engine.shutdown()
    assert alone == _reference(model, prompts[0], 20)
    assert left, "the joining requests should have moved the static sequence into the batch"
    assert together == [_reference(model, prompts[0], 100)] + [_reference(model, p, 20) for p in prompts[1:]]
    assert len(built) == 2  # one decoder per cache length (64 and 128 tokens), each kept for reuse


def test_compile_is_a_torch_engine_option(tmp_path):
    folder = save_tiny_dense(tmp_path / "dense")
    args = build_parser().parse_args(["serve", str(folder), "--compile"])
    assert args.compile is True
    onnx_dir = tmp_path / "onnx"
    onnx_dir.mkdir()
    with pytest.raises(FactorlmError, match="--compile applies to the torch engine"):
        create_engine("onnx", onnx_dir, EngineOptions(compile=True))  # refused before the folder is read


@pytest.mark.slow  # compiling the decode step takes a minute on CPU
@pytest.mark.skipif(not HAS_CXX, reason="torch.compile on CPU needs a C++ compiler")
def test_serve_compile_answers_with_the_eager_greedy_tokens(tmp_path):
    from factorlm.runtime.checkpoint import load_model, load_tokenizer

    folder = save_tiny_dense(tmp_path / "dense")
    engine = create_engine("torch", folder, EngineOptions(compile=True, threads=1, max_batch=4))
    assert engine.compile
    model, tokenizer = load_model(folder), load_tokenizer(folder)
    prompt = "The quick brown fox"
    want = _reference(model, tokenizer(prompt).input_ids, 12)
    with BackgroundServer(create_app(engine)) as url:
        for _ in range(2):  # the first request compiles, the second reuses the compiled step
            body = {"model": engine.model_name, "prompt": prompt, "max_tokens": 12, "temperature": 0,
                    "ignore_eos": True}
            reply = httpx.post(f"{url}/v1/completions", json=body, timeout=600).json()
            assert reply["choices"][0]["text"] == tokenizer.decode(want, skip_special_tokens=True)
            assert reply["usage"]["completion_tokens"] == 12
    assert len(engine._static_lms) == 1
