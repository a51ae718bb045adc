"""What a hostile or careless client can send: every case a 4xx (or a closed connection), counted, harmless.

Bodies above the limit (announced or chunked), bodies and headers that never finish, lone
surrogates in any string field, requests that can never fit, crashes inside a handler,
and tokenizing that must not stall the event loop.
"""

from __future__ import annotations

import socket
import threading

import httpx
import pytest

from factorlm.serving.app import create_app
from factorlm.serving.limits import MIB, HttpLimits
from factorlm.serving.server import BackgroundServer
from factorlm.serving.torch_engine import TorchEngine

MODEL = "tiny"
LIMITS = HttpLimits(body_timeout_s=1.0, header_timeout_s=1.0, drain_s=0.5)
JSON = {"content-type": "application/json"}
OK = {"model": MODEL, "prompt": "hello", "max_tokens": 2}


def metric(url: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


class GatedTokenizer:
    """The tiny tokenizer, except that encoding a text containing BLOCK waits for ``gate`` (or raises, if set to).

    Both ways the server may encode are gated: calling the tokenizer and its Rust backend's encode_batch.
    """

    def __init__(self, tokenizer, fail: bool = False) -> None:
        self._tokenizer, self.fail = tokenizer, fail
        self.entered, self.gate = threading.Event(), threading.Event()
        self.backend_tokenizer = _GatedBackend(tokenizer.backend_tokenizer, self)

    def wait_if_blocked(self, texts) -> None:
        if any("BLOCK" in t for t in texts):
            if self.fail:
                raise RuntimeError("tokenizer exploded")
            self.entered.set()
            self.gate.wait(timeout=30)

    def __call__(self, text, *args, **kwargs):
        self.wait_if_blocked([text])
        return self._tokenizer(text, *args, **kwargs)

    def __len__(self) -> int:
        return len(self._tokenizer)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


class _GatedBackend:
    def __init__(self, backend, owner: GatedTokenizer) -> None:
        self._backend, self._owner = backend, owner

    def encode_batch(self, texts, *args, **kwargs):
        self._owner.wait_if_blocked(texts)
        return self._backend.encode_batch(texts, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._backend, name)


@pytest.fixture(scope="module")
def served(tiny):
    """(url, tokenizer) of a server with max_batch 4 and short body/header deadlines."""
    model, tokenizer = tiny
    gated = GatedTokenizer(tokenizer)
    engine = TorchEngine(model, gated, model_name=MODEL, max_batch=4, max_queue=8)
    with BackgroundServer(create_app(engine, max_tokens_limit=64, limits=LIMITS)) as url:  # the app's limits
        yield url, gated


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def _local_port(response: httpx.Response) -> int:
    return response.extensions["network_stream"].get_extra_info("client_addr")[1]


SURROGATES = [
    ("prompt", "/v1/completions", b'{"model": "tiny", "prompt": "caf\\ud800"}', "prompt"),
    ("prompt list", "/v1/completions", b'{"model": "tiny", "prompt": ["ok", "\\udfff"]}', "prompt"),
    ("model", "/v1/completions", b'{"model": "\\ud800", "prompt": "x"}', "model"),
    ("stop", "/v1/completions", b'{"model": "tiny", "prompt": "x", "stop": ["\\ud800"]}', "stop"),
    ("user", "/v1/completions", b'{"model": "tiny", "prompt": "x", "user": "\\udbff"}', "user"),
    ("field name", "/v1/completions", b'{"model": "tiny", "prompt": "x", "\\ud800": 1}', None),
    ("utf-8 encoded surrogate", "/v1/completions", b'{"model": "tiny", "prompt": "\xed\xa0\x80"}', "prompt"),
    ("invalid utf-8", "/v1/completions", b'{"model": "tiny", "prompt": "\xff\xfe"}', None),
    ("chat content", "/v1/chat/completions",
     b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}', "messages"),
    ("chat text part", "/v1/chat/completions",
     b'{"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", "text": "a\\ud800"}]}]}',
     "messages"),
    ("chat name", "/v1/chat/completions",
     b'{"model": "tiny", "messages": [{"role": "user", "content": "hi", "name": "\\ud800"}]}', "messages"),
]


@pytest.mark.parametrize("name,path,body,param", SURROGATES, ids=[s[0] for s in SURROGATES])
def test_invalid_unicode_is_400_naming_the_field_and_the_connection_stays_usable(served, name, path, body, param):
    url, _ = served
    with httpx.Client(base_url=url, timeout=30) as client:
        bad = client.post(path, content=body, headers=JSON)
        assert bad.status_code == 400, bad.text
        error = bad.json()["error"]
        assert error["param"] == param and error["type"] == "invalid_request_error"
        if param is not None:
            assert "invalid Unicode" in error["message"] and error["message"].startswith(param)
        good = client.post("/v1/completions", json=OK)
        assert good.status_code == 200, good.text
        assert _local_port(good) == _local_port(bad)  # the same keep-alive connection


def test_chunked_body_over_the_limit_is_413_and_small_chunked_bodies_are_served(served):
    url, _ = served
    before = metric(url, "factorlm:request_errors_total", status="413")

    def chunks(count: int, size: int = 256 * 1024):
        for _ in range(count):
            yield b" " * size

    # 6 MiB with no Content-Length: counted as it arrives, answered 413 (or cut off once the limit is passed)
    try:
        r = httpx.post(f"{url}/v1/completions", content=chunks(24), headers=JSON, timeout=30)
        assert r.status_code == 413 and "larger than" in r.json()["error"]["message"]
    except httpx.TransportError:
        pass
    assert metric(url, "factorlm:request_errors_total", status="413") == before + 1
    small = (part for part in [b'{"model": "tiny", ', b'"prompt": "hello", "max_tokens": 2}'])
    r = httpx.post(f"{url}/v1/completions", content=small, headers=JSON, timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def test_announced_body_over_the_limit_is_413_without_reading_it(served):
    url, _ = served
    with socket.create_connection(("127.0.0.1", _port(url)), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % (5 * MIB))
        head = s.recv(65536)
    assert head.startswith(b"HTTP/1.1 413")


def test_half_sent_body_gets_408_and_the_connection_closes(served):
    url, _ = served
    before = metric(url, "factorlm:request_errors_total", status="408")
    with socket.create_connection(("127.0.0.1", _port(url)), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n{\"model\": ")
        received = b""
        while chunk := s.recv(65536):
            received += chunk
    assert received.startswith(b"HTTP/1.1 408") and b"did not arrive within 1 s" in received
    assert metric(url, "factorlm:request_errors_total", status="408") == before + 1


@pytest.mark.parametrize("head", [b"", b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"], ids=["silent", "partial"])
def test_connections_that_never_finish_their_headers_are_closed(served, head):
    url, _ = served
    with socket.create_connection(("127.0.0.1", _port(url)), timeout=10) as s:
        s.sendall(head)
        assert s.recv(65536) == b""  # closed by the server (LIMITS.header_timeout_s = 1 s), not by our 10 s timeout


def test_a_keep_alive_connection_that_starts_a_head_and_stalls_is_closed(served):
    url, _ = served
    with socket.create_connection(("127.0.0.1", _port(url)), timeout=10) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = b""
        while b'"ok"' not in answer:
            answer += s.recv(65536)
        assert answer.startswith(b"HTTP/1.1 200")
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # never finished; keep-alive (5 s) is not armed now
        assert s.recv(65536) == b""  # closed by the 1 s head deadline (a 10 s socket timeout would raise)


def test_requests_that_can_never_fit_are_400_not_429(served):
    url, _ = served
    cases = [({**OK, "n": 5}, "n"), ({**OK, "prompt": ["a", "b", "c", "d", "e"]}, "prompt"),
             ({**OK, "prompt": ["a", "b", "c"], "n": 2}, "n")]
    for body, param in cases:
        r = httpx.post(f"{url}/v1/completions", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
        assert "--max-batch" in r.json()["error"]["message"]
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 5}
    assert httpx.post(f"{url}/v1/chat/completions", json=chat).status_code == 400
    r = httpx.post(f"{url}/v1/completions", json={**OK, "prompt": ["a", "b"], "n": 2})
    assert r.status_code == 200 and len(r.json()["choices"]) == 4  # exactly max_batch fits


def test_tokenizing_runs_off_the_event_loop(served):
    """While one request's tokenizer is stuck, /health, /metrics and other requests are answered."""
    url, gated = served
    gated.entered.clear()
    gated.gate.clear()
    result: dict[str, httpx.Response] = {}
    slow = threading.Thread(target=lambda: result.update(
        r=httpx.post(f"{url}/v1/completions", json={**OK, "prompt": "BLOCK here"}, timeout=60)))
    slow.start()
    try:
        assert gated.entered.wait(timeout=30)
        assert httpx.get(f"{url}/health", timeout=5).status_code == 200
        assert httpx.get(f"{url}/metrics", timeout=5).status_code == 200
        assert httpx.post(f"{url}/v1/completions", json=OK, timeout=5).status_code == 200
        assert slow.is_alive()  # still inside the tokenizer
    finally:
        gated.gate.set()
        slow.join(timeout=30)
    assert result["r"].status_code == 200


def test_unexpected_errors_are_500_json_and_counted(tiny):
    model, tokenizer = tiny
    engine = TorchEngine(model, GatedTokenizer(tokenizer, fail=True), model_name=MODEL, max_batch=2)
    with BackgroundServer(create_app(engine)) as url:
        r = httpx.post(f"{url}/v1/completions", json={**OK, "prompt": "BLOCK"})
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        assert "exploded" not in r.text  # internals stay in the server log
        assert metric(url, "factorlm:http_requests_total", route="/v1/completions", status="500") == 1
        assert metric(url, "factorlm:request_errors_total", status="500", type="server_error") == 1
        assert httpx.post(f"{url}/v1/completions", json=OK).status_code == 200  # still serving


@pytest.fixture
def gated_model(tiny):
    """After prefill and the first decode step the model waits for the gate, so the one slot stays taken."""
    gate, calls = threading.Event(), [0]

    def hook(*_):
        calls[0] += 1
        if calls[0] > 2:
            gate.wait(timeout=30)

    handle = tiny[0].register_forward_pre_hook(hook)
    yield gate
    gate.set()
    handle.remove()


def test_queue_full_is_429_with_retry_after(tiny, gated_model):
    model, tokenizer = tiny
    engine = TorchEngine(model, tokenizer, model_name=MODEL, max_batch=1, max_queue=0)
    with BackgroundServer(create_app(engine)) as url:
        body = {**OK, "max_tokens": 50, "temperature": 0, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
            busy = httpx.post(f"{url}/v1/completions", json=OK, timeout=30)
            gated_model.set()
        assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
        assert busy.json()["error"]["type"] == "rate_limit_error"


def test_models_show_the_served_name_never_a_path(tmp_path):
    from factorlm.serving.engines import EngineOptions, create_engine
    from factorlm.testing import save_tiny_dense

    folder = save_tiny_dense(tmp_path / "my-model")
    engine = create_engine("torch", folder, EngineOptions(max_batch=2, threads=1))
    assert engine.model_name == "my-model"
    with BackgroundServer(create_app(engine)) as url:
        listing = httpx.get(f"{url}/v1/models").json()
    assert [m["id"] for m in listing["data"]] == ["my-model"] and listing["data"][0]["root"] == "my-model"
    assert str(tmp_path) not in str(listing)
    named = create_engine("torch", folder, EngineOptions(served_model_name="prod"))
    assert named.model_name == "prod"


def test_engine_registry_declares_needs_and_rejects_unknown_engines(tmp_path):
    from factorlm.runtime.format import FactorlmError
    from factorlm.serving.engines import ENGINES, create_engine

    assert set(ENGINES) >= {"torch", "onnx"}
    assert ENGINES["onnx"].packages == (("onnxruntime", "onnx"),)
    with pytest.raises(FactorlmError, match="unknown engine"):
        create_engine("tpu", tmp_path)
    with pytest.raises(FactorlmError, match="config.json"):
        create_engine("torch", tmp_path)
    with pytest.raises(FactorlmError, match="model folder not found"):
        create_engine("torch", tmp_path / "missing")


def test_serve_cli_rejects_bad_limits(capsys):
    from factorlm.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["serve", "sample", "--body-timeout", "0"])
    assert exc.value.code == 2 and "must be > 0" in capsys.readouterr().err


def test_limits_are_checked():
    from factorlm.runtime.format import FactorlmError

    with pytest.raises(FactorlmError, match="body_timeout_s"):
        HttpLimits(body_timeout_s=0)
    with pytest.raises(FactorlmError, match="max_body_bytes"):
        HttpLimits(max_body_bytes=0)
    assert HttpLimits().max_body_bytes == 4 * MIB


def test_hopeless_prompts_are_refused_before_tokenizing(served):
    """The tiny tokenizer has at most 12 characters per token: 4,000 characters cannot fit 256 tokens."""
    url, gated = served
    gated.entered.clear()
    gated.gate.clear()  # tokenizing a BLOCK prompt would now wait 30 s
    try:
        for route, body in [("/v1/completions", {**OK, "prompt": "BLOCK" + "x" * 4000}),
                            ("/v1/chat/completions",
                             {"model": MODEL, "messages": [{"role": "user", "content": "BLOCK" + "x" * 4000}]})]:
            r = httpx.post(f"{url}{route}", json=body, timeout=10)
            assert r.status_code == 400 and r.json()["error"]["param"] == "input_tokens", r.text
            assert "at least" in r.json()["error"]["message"]
        assert not gated.entered.is_set()
    finally:
        gated.gate.set()


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3_text"])
def test_chars_per_token_bound_holds_for_hostile_texts(arch):
    import random

    from factorlm.serving.tokenize import max_chars_per_token
    from factorlm.testing import make_tiny_model

    _, tokenizer = make_tiny_model(arch)
    bound = max_chars_per_token(tokenizer)
    if bound is None:
        pytest.skip(f"no bound for the {arch} tokenizer")
    rng = random.Random(0)
    texts = [" " * 5000, "#" * 5000, "\n" * 3000, "ab" * 3000, "e\u0301" * 2000, "<|im_start|>" * 300,
             "".join(chr(rng.randint(32, 0x2FFF)) for _ in range(5000)), "The quick brown fox " * 300]
    for text in texts:
        assert len(text) / len(tokenizer(text).input_ids) <= bound


def test_prompt_encoder_gives_the_tokenizers_ids_and_refuses_long_prompts(tiny):
    from factorlm.serving.errors import APIError
    from factorlm.serving.tokenize import PromptEncoder

    _, tokenizer = tiny
    encoder = PromptEncoder(tokenizer, 64)
    assert encoder.backend is not None and encoder.chars_per_token == 12
    for text in ["The quick brown fox", " spaces  and\ttabs\n", "<|im_start|>user", "caf\u00e9"]:
        for add in (True, False):
            assert encoder.encode(text, add) == tokenizer(text, add_special_tokens=add).input_ids
    with pytest.raises(APIError, match="has 129 input tokens"):  # counted before the ids become a list
        encoder.encode("fox " * 64)
    with pytest.raises(APIError, match="at least 67 input tokens"):  # refused without tokenizing
        encoder.encode("x" * 800)
    unguarded = PromptEncoder(tokenizer, 64, length_guard=False)
    with pytest.raises(APIError, match="has 1600 input tokens"):
        unguarded.encode("x " * 800)


def _bpe_tokenizer(configure):
    from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE({"a": 0, "b": 1, "ab": 2, "\u2581": 3}, [("a", "b")]))
    configure(backend, normalizers, pre_tokenizers, AddedToken)
    return PreTrainedTokenizerFast(tokenizer_object=backend)


@pytest.mark.parametrize("name,configure,bound", [
    ("plain BPE", lambda t, n, p, a: None, 2.0),
    ("metaspace replace", lambda t, n, p, a: setattr(t, "normalizer", n.Replace(" ", "\u2581")), 2.0),
    ("NFC", lambda t, n, p, a: setattr(t, "normalizer", n.NFC()), 8.0),
    ("shrinking replace", lambda t, n, p, a: setattr(t, "normalizer", n.Replace("  ", " ")), None),
    ("strip", lambda t, n, p, a: setattr(t, "normalizer", n.Strip()), None),
    ("whitespace pre-tokenizer", lambda t, n, p, a: setattr(t, "pre_tokenizer", p.Whitespace()), None),
    ("lstrip added token", lambda t, n, p, a: t.add_special_tokens([a("<m>", lstrip=True)]), None),
])
def test_chars_per_token_bound_only_for_tokenizers_that_keep_all_text(name, configure, bound):
    from factorlm.serving.tokenize import max_chars_per_token

    assert max_chars_per_token(_bpe_tokenizer(configure)) == bound


def test_no_bound_for_tokenizers_that_drop_text():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from factorlm.serving.tokenize import max_chars_per_token

    backend = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()  # whitespace makes no tokens at all
    assert max_chars_per_token(PreTrainedTokenizerFast(tokenizer_object=backend)) is None
