"""The torch engine: batched greedy decoding equals one-at-a-time decoding; cancel, queue limits, factored models."""

from __future__ import annotations

import asyncio

import pytest
import torch

from factorlm.runtime.generate import SamplingParams, generate_tokens
from factorlm.serving.batch_cache import left_pad, select
from factorlm.serving.engine import GenerationRequest, QueueFullError
from factorlm.serving.torch_engine import TorchEngine

PROMPTS = [f"The quick brown fox {i}" + " jumps over" * (i % 5) for i in range(16)]


async def _collect(engine, request):
    handle = engine.submit(request)
    tokens, text, last = [], "", None
    async for event in handle:
        tokens += event.token_ids
        text += event.text
        last = event
    return tokens, text, last


def _greedy(tokenizer, prompt, n=24, **kw):
    return GenerationRequest(tokenizer(prompt).input_ids, SamplingParams(max_new_tokens=n, ignore_eos=True, **kw))


def test_left_pad_and_select_trim_padding():
    x = torch.ones(2, 1, 3, 4)
    assert left_pad(x, 5, 2).shape == (2, 1, 5, 4) and left_pad(x, 5, 2)[:, :, :2].abs().sum() == 0
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    layers = [(torch.arange(8.0).view(2, 1, 4, 1), torch.arange(8.0).view(2, 1, 4, 1))]
    new_layers, new_mask = select(layers, mask, [0])
    assert new_mask.tolist() == [[1, 1]] and new_layers[0][0].flatten().tolist() == [2.0, 3.0]


def test_batched_greedy_equals_reference_generation(tiny):
    model, tokenizer = tiny
    engine = TorchEngine(model, tokenizer, max_batch=16)
    engine.start()
    try:
        async def both():
            return await asyncio.gather(*[_collect(engine, _greedy(tokenizer, p)) for p in PROMPTS])

        batched = asyncio.run(both())
    finally:
        engine.shutdown()
    for prompt, (tokens, text, last) in zip(PROMPTS, batched):
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        reference = list(generate_tokens(model, ids, SamplingParams(max_new_tokens=24)))
        assert tokens == reference
        assert text == tokenizer.decode(reference, skip_special_tokens=True)
        assert last.finish_reason == "length" and last.completion_tokens == 24


def test_seeded_sampling_is_reproducible_in_a_batch(tiny):
    model, tokenizer = tiny
    engine = TorchEngine(model, tokenizer, max_batch=8)
    engine.start()
    try:
        async def run():
            alone = await _collect(engine, _greedy(tokenizer, PROMPTS[1], temperature=0.8, top_p=0.9, seed=7))
            crowd = await asyncio.gather(*[_collect(engine, _greedy(tokenizer, p, temperature=0.8, seed=i))
                                           for i, p in enumerate(PROMPTS[:6])],
                                         _collect(engine, _greedy(tokenizer, PROMPTS[1], temperature=0.8,
                                                                  top_p=0.9, seed=7)))
            return alone, crowd[-1]

        alone, crowded = asyncio.run(run())
    finally:
        engine.shutdown()
    assert alone[0] == crowded[0]


def test_cancel_frees_the_slot_and_queue_limit(tiny):
    model, tokenizer = tiny
    engine = TorchEngine(model, tokenizer, max_batch=1, max_queue=1, max_model_len=256)
    engine.start()
    try:
        async def run():
            first = engine.submit(_greedy(tokenizer, PROMPTS[0], n=200))
            second = engine.submit(_greedy(tokenizer, PROMPTS[1], n=4))
            with pytest.raises(QueueFullError):
                engine.submit(_greedy(tokenizer, PROMPTS[2], n=4))
            async for event in first:
                if event.token_ids:
                    first.cancel()
                if event.finish_reason:
                    assert event.finish_reason in ("abort", "length")
            tokens, _, last = await _collect_handle(second)
            return last

        async def _collect_handle(handle):
            tokens, text, last = [], "", None
            async for event in handle:
                tokens += event.token_ids
                last = event
            return tokens, text, last

        last = asyncio.run(run())
    finally:
        engine.shutdown()
    assert last.finish_reason == "length"
    assert engine.stats()["running"] == 0 and engine.stats()["waiting"] == 0


def test_factored_checkpoint_batches_like_it_decodes_alone(tmp_path):
    from factorlm.runtime.checkpoint import load_model, load_tokenizer
    from factorlm.testing import write_tiny_factored

    path = write_tiny_factored(tmp_path / "f", rank=8)
    model, tokenizer = load_model(path), load_tokenizer(path)
    engine = TorchEngine(model, tokenizer, max_batch=4)
    engine.start()
    try:
        async def run():
            return await asyncio.gather(*[_collect(engine, _greedy(tokenizer, p, n=12)) for p in PROMPTS[:4]])

        batched = asyncio.run(run())
    finally:
        engine.shutdown()
    for prompt, (tokens, _, _) in zip(PROMPTS, batched):
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        assert tokens == list(generate_tokens(model, ids, SamplingParams(max_new_tokens=12)))


@pytest.mark.parametrize("arch", ["qwen3", "gemma3_text"])
def test_batched_greedy_equals_reference_other_archs(arch):
    """gemma3_text has a 16-token sliding window: 30 new tokens cross it."""
    from factorlm.testing import make_tiny_model

    model, tokenizer = make_tiny_model(arch)
    engine = TorchEngine(model, tokenizer, max_batch=4)
    engine.start()
    try:
        async def run():
            return await asyncio.gather(*[_collect(engine, _greedy(tokenizer, p, n=30)) for p in PROMPTS[:4]])

        batched = asyncio.run(run())
    finally:
        engine.shutdown()
    for prompt, (tokens, _, _) in zip(PROMPTS, batched):
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        assert tokens == list(generate_tokens(model, ids, SamplingParams(max_new_tokens=30)))
