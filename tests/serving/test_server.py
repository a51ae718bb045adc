"""The HTTP server against the official openai client and raw HTTP: happy paths, streaming, errors, metrics."""

from __future__ import annotations

import concurrent.futures
import threading
import time

import httpx
import openai
import pytest

from factorlm.serving.app import create_app
from factorlm.serving.server import BackgroundServer
from factorlm.serving.torch_engine import TorchEngine

MODEL = "tiny"  # the served name set in conftest.py

PROMPTS = [f"The quick brown fox {i}" + " jumps over" * (i % 5) for i in range(16)]


def client(url: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def metric(url: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total


def test_models_health_and_completion(live):
    url, engine, _ = live
    c = client(url)
    assert [m.id for m in c.models.list().data] == [MODEL]
    assert httpx.get(f"{url}/health").status_code == 200
    r = c.completions.create(model=MODEL, prompt="The quick brown", max_tokens=7, temperature=0, logprobs=2)
    choice = r.choices[0]
    assert r.object == "text_completion" and choice.finish_reason == "length"
    assert r.usage.completion_tokens == 7 and r.usage.prompt_tokens == len(engine.tokenizer("The quick brown").input_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + 7
    assert len(choice.logprobs.tokens) == 7 and all(len(t) <= 2 for t in choice.logprobs.top_logprobs)
    assert all(lp <= 0 for lp in choice.logprobs.token_logprobs)


def test_chat_streaming_with_usage_matches_non_streamed(live):
    url, _, _ = live
    c = client(url)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a capital."}]
    full = c.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=12, temperature=0)
    assert full.choices[0].message.role == "assistant" and full.usage.completion_tokens >= 1
    chunks = list(c.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert all(ch.usage is None for ch in chunks[:-1])
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == full.choices[0].finish_reason


def test_n_seed_and_stop(live):
    url, _, _ = live
    c = client(url)
    a = c.completions.create(model=MODEL, prompt="Once upon", max_tokens=10, temperature=1.0, seed=3, n=3)
    b = c.completions.create(model=MODEL, prompt="Once upon", max_tokens=10, temperature=1.0, seed=3, n=3)
    assert [ch.index for ch in a.choices] == [0, 1, 2]
    assert [ch.text for ch in a.choices] == [ch.text for ch in b.choices]
    greedy = c.completions.create(model=MODEL, prompt="Once upon", max_tokens=10, temperature=0).choices[0].text
    stop = greedy[3:5]
    if stop.strip():
        cut = c.completions.create(model=MODEL, prompt="Once upon", max_tokens=10, temperature=0, stop=[stop])
        assert cut.choices[0].text == greedy[: greedy.find(stop)] and cut.choices[0].finish_reason == "stop"


def _stream_text(url: str, prompt: str) -> str:
    stream = client(url).completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0, stream=True,
                                            extra_body={"ignore_eos": True})
    return "".join(ch.choices[0].text for ch in stream if ch.choices)


def test_16_concurrent_streams_match_sequential(live):
    url, _, _ = live
    sequential = [_stream_text(url, p) for p in PROMPTS]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        concurrent_out = list(pool.map(lambda p: _stream_text(url, p), PROMPTS))
    assert concurrent_out == sequential
    assert all(sequential)


@pytest.fixture
def slow_model(tiny):
    """Each forward pass of the shared tiny model takes >= 10 ms, so 200 tokens take >= 2 s."""
    hook = tiny[0].register_forward_pre_hook(lambda *_: time.sleep(0.01))
    yield
    hook.remove()


def test_disconnect_mid_stream_frees_the_slot(live, slow_model):
    url, engine, _ = live
    body = {"model": MODEL, "prompt": "Paris is", "max_tokens": 200, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
        assert engine.stats()["running"] == 1
        closed = time.monotonic()
    while engine.stats()["running"] and time.monotonic() < closed + 10:
        time.sleep(0.01)
    assert engine.stats()["running"] == 0
    assert time.monotonic() - closed < 1.0  # freed long before the 200 tokens (>= 2 s) could finish


BAD = [
    ("malformed json", b'{"model": "tiny", "prompt": ', 400, None),
    ("wrong type", {"model": MODEL, "prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
    ("bool for int", {"model": MODEL, "prompt": "x", "n": True}, 400, "n"),
    ("out of range", {"model": MODEL, "prompt": "x", "temperature": 3.5}, 400, "temperature"),
    ("negative max_tokens", {"model": MODEL, "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ("unknown field", {"model": MODEL, "prompt": "x", "bogus": 1}, 400, "bogus"),
    ("unsupported", {"model": MODEL, "prompt": "x", "frequency_penalty": 0.5}, 400, "frequency_penalty"),
    ("unknown model", {"model": "gpt-9", "prompt": "x"}, 404, "model"),
    ("oversized prompt", {"model": MODEL, "prompt": "fox " * 400}, 400, "input_tokens"),
    ("too many tokens", {"model": MODEL, "prompt": "x", "max_tokens": 250}, 400, "max_tokens"),
    ("empty prompt", {"model": MODEL, "prompt": ""}, 400, "prompt"),
    ("bad token id", {"model": MODEL, "prompt": [1, 10**9]}, 400, "prompt"),
    ("options without stream", {"model": MODEL, "prompt": "x", "stream_options": {"include_usage": True}}, 400,
     "stream_options"),
    ("not an object", [1, 2], 400, None),
]


@pytest.mark.parametrize("name,body,status,param", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_openai_errors_and_are_counted(live, name, body, status, param):
    url, _, _ = live
    before = metric(url, "factorlm:request_errors_total", route="/v1/completions", status=str(status))
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(f"{url}/v1/completions", **kw)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"] and error["param"] == param
    after = metric(url, "factorlm:request_errors_total", route="/v1/completions", status=str(status))
    assert after == before + 1


def test_chat_errors_and_openai_client_exceptions(live):
    url, _, _ = live
    c = client(url)
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="other", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="tools"):
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                  tools=[{"type": "function", "function": {"name": "f"}}])
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model=MODEL, messages=[])
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model=MODEL, messages=[{"role": "robot", "content": "hi"}])


def test_metrics_report_latency_tokens_and_queue(live):
    url, _, _ = live
    client(url).completions.create(model=MODEL, prompt="Berlin", max_tokens=5, temperature=0)
    text = httpx.get(f"{url}/metrics").text
    for name in ("factorlm:time_to_first_token_seconds_bucket", "factorlm:inter_token_latency_seconds_bucket",
                 "factorlm:num_requests_waiting", "factorlm:num_requests_running", "factorlm:generation_tokens_total",
                 "factorlm:prompt_tokens_total", "factorlm:http_requests_total"):
        assert name in text
    assert metric(url, "factorlm:generation_tokens_total") >= 5
    assert metric(url, "factorlm:time_to_first_token_seconds_count") >= 1


@pytest.fixture
def gated_model(tiny):
    """After its first two forward passes (prefill, first decode step) the model blocks until
    the test opens the gate, so a running request holds its slot however fast the machine is."""
    gate, calls = threading.Event(), [0]

    def hook(*_):
        calls[0] += 1
        if calls[0] > 2:
            gate.wait(timeout=30)

    handle = tiny[0].register_forward_pre_hook(hook)
    yield gate
    gate.set()
    handle.remove()


def test_api_key_and_queue_full(tiny, gated_model):
    model, tokenizer = tiny
    engine = TorchEngine(model, tokenizer, model_name=MODEL, max_batch=1, max_queue=0)
    with BackgroundServer(create_app(engine, api_key="sekret")) as url:
        with pytest.raises(openai.AuthenticationError):
            client(url, "wrong").models.list()
        assert httpx.get(f"{url}/v1/models").status_code == 401
        assert httpx.get(f"{url}/health").status_code == 200  # public, like vLLM
        c = client(url, "sekret")
        body = {"model": MODEL, "prompt": "Paris", "max_tokens": 200, "temperature": 0, "stream": True,
                "ignore_eos": True}  # greedy: the first token already has text, before the gate closes
        headers = {"Authorization": "Bearer sekret"}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=headers, timeout=30) as r:
            # Hold the line iterator: a temporary one is closed on garbage collection, which closes
            # the connection, and the server would rightly free the slot of a client that left.
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
            with pytest.raises(openai.RateLimitError):
                c.completions.create(model=MODEL, prompt="x", max_tokens=2)
            gated_model.set()
        assert metric(url, "factorlm:request_errors_total", status="429") == 1
        assert metric(url, "factorlm:request_errors_total", status="401") == 2


def test_serve_cli_onnx_engine_rejects_a_torch_folder(tmp_path, capsys):
    """--engine onnx on a safetensors folder names the missing ONNX metadata, exit code 2."""
    from factorlm.cli import main
    from factorlm.testing import save_tiny_dense

    path = save_tiny_dense(tmp_path / "dense")
    code = main(["serve", str(path), "--engine", "onnx"])
    err = capsys.readouterr().err
    assert code == 2 and "factorlm_onnx.json" in err and "factorlm export onnx" in err


@pytest.mark.parametrize("extra", [{"top_p": 5e-324, "temperature": 1.0}, {"temperature": 5e-324},
                                   {"temperature": 2.0, "top_k": 1}, {"top_p": 1e-9, "n": 3}])
def test_extreme_but_valid_sampling_values_succeed(live, extra):
    """Found by the schema fuzz: a top_p below float32 resolution once emptied the distribution (500)."""
    url, _, _ = live
    r = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "\x01\x00", "max_tokens": 4, **extra})
    assert r.status_code == 200, r.text
    assert all(c["finish_reason"] in ("length", "stop") for c in r.json()["choices"])


def test_omitted_max_tokens_is_capped_by_the_server_limit(live):
    url, _, _ = live
    r = client(url).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                            temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 200 and r.choices[0].finish_reason == "length"  # max_tokens_limit=200


def test_disconnect_during_non_streamed_request_frees_the_slot(live, slow_model):
    url, engine, _ = live
    body = {"model": MODEL, "prompt": "Paris is", "max_tokens": 200, "temperature": 0, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/completions", json=body, timeout=0.5)
    closed = time.monotonic()
    while engine.stats()["running"] and time.monotonic() < closed + 10:
        time.sleep(0.01)
    assert engine.stats()["running"] == 0
    assert time.monotonic() - closed < 1.0  # long before the 200 tokens (>= 2 s) could finish
