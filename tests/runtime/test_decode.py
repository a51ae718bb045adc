"""The decode core: the sampler, the text stream and the compiled static-cache loop."""

import shutil

import pytest
import torch

from factorlm.runtime.decode import (DynamicTorchLM, SamplingParams, StaticTorchLM, TextStream, decode_batch,
                                     decode_tokens, sample_next, torch_lm)
from factorlm.runtime.generate import generate_tokens, stream_text
from factorlm.testing import make_tiny_model


class CharTokenizer:
    """Token i decodes to a fixed byte string; decoding joins the bytes as UTF-8 (U+FFFD when cut)."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = pieces

    def decode(self, ids, skip_special_tokens=True):
        return b"".join(self.pieces[i] for i in ids).decode("utf-8", errors="replace")


def run_stream(pieces: list[bytes], stops: list[str]) -> tuple[list[str], TextStream]:
    stream = TextStream(CharTokenizer(pieces), stops)
    out = [stream.push(i) for i in range(len(pieces))]
    out.append(stream.flush())
    return [p for p in out if p], stream


def test_text_stream_holds_back_a_stop_string_split_across_tokens():
    out, stream = run_stream([b"Hello", b" wo", b"rld E", b"ND", b" tail"], ["END"])
    assert "".join(out) == "Hello world " and stream.stop_string == "END"
    assert all("E" not in p for p in out)


def test_text_stream_waits_for_a_multibyte_character_split_across_tokens():
    euro = "€".encode()  # three bytes
    out, stream = run_stream([b"a", euro[:1], euro[1:2], euro[2:], b"b"], [])
    assert out == ["a", "€", "b"] and stream.stop_string is None
    assert all("\ufffd" not in p for p in out)


def test_text_stream_without_stop_strings_emits_everything_and_flush_returns_the_rest():
    out, _ = run_stream([b"x", b"yz"], ["QQQ"])
    assert "".join(out) == "xyz"


def test_sampler_greedy_top_k_top_p_and_seed():
    logits = torch.tensor([[0.0, 5.0, 1.0, 4.0]])
    assert sample_next(logits, SamplingParams()).tolist() == [1]
    assert int(sample_next(logits[0], SamplingParams())) == 1  # a single row [V]
    draws = {int(sample_next(logits, SamplingParams(temperature=5.0, top_k=2))[0]) for _ in range(200)}
    assert draws == {1, 3}
    tiny_p = SamplingParams(temperature=1.0, top_p=1e-9)
    assert {int(sample_next(logits, tiny_p)[0]) for _ in range(50)} == {1}
    seeded = SamplingParams(temperature=1.0, seed=3)
    a = [int(sample_next(logits, seeded, torch.Generator().manual_seed(3))[0]) for _ in range(5)]
    b = [int(sample_next(logits, seeded, torch.Generator().manual_seed(3))[0]) for _ in range(5)]
    assert a == b


def test_static_cache_eager_equals_dynamic_cache():
    model, tok = make_tiny_model()
    ids = tok("The quick brown fox", return_tensors="pt").input_ids
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    dynamic = list(decode_tokens(torch_lm(model), ids, params))
    static = list(decode_tokens(StaticTorchLM(model, ids.shape[1] + 12), ids, params))
    assert dynamic == static and len(dynamic) == 10


def test_decode_batch_with_left_padding_equals_each_prompt_alone():
    model, _ = make_tiny_model()
    prompts = [[5, 6, 7, 8, 9, 10, 11], [20, 21], [30, 31, 32, 33]]
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    alone = [list(decode_tokens(DynamicTorchLM(model), torch.tensor([p]), params)) for p in prompts]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    marks = []
    assert decode_batch(DynamicTorchLM(model), ids, params, attention_mask=mask, marks=marks.append) == alone
    assert marks == ["first", "end"]


def test_decode_batch_stops_each_row_at_its_first_stop_id_and_static_equals_dynamic():
    model, _ = make_tiny_model()
    ids = torch.tensor([list(range(3, 13)), list(range(20, 30))])
    params = SamplingParams(max_new_tokens=7, ignore_eos=True)
    full = decode_batch(DynamicTorchLM(model), ids, params)
    assert decode_batch(StaticTorchLM(model, 24), ids, params) == full and all(len(r) == 7 for r in full)
    stop = full[0][2]
    stopped = decode_batch(DynamicTorchLM(model), ids, SamplingParams(max_new_tokens=7, stop_token_ids=[stop]))
    for row, got in zip(full, stopped):
        assert got == (row[:row.index(stop)] if stop in row else row)


@pytest.mark.slow  # compiling the step takes a minute on CPU
@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="torch.compile on CPU needs a C++ compiler")
def test_generate_compile_equals_eager_greedy():
    model, tok = make_tiny_model()
    ids = tok("The quick brown fox", return_tensors="pt").input_ids
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    eager = list(generate_tokens(model, ids, params))
    compiled = list(generate_tokens(model, ids, params, compile=True))
    assert compiled == eager
    assert "".join(stream_text(model, tok, ids, params, compile=True)) == "".join(stream_text(model, tok, ids, params))
