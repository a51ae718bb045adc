"""``factorlm serve DIR --engine vllm``: vLLM's OpenAI server on 127.0.0.1 serving a factored checkpoint.

One server for the module (about 30-70 s to become healthy on two cores). A plain
completion returns the torch runtime's greedy tokens; a streamed chat completion arrives
as server-sent events whose text is the reference's decoded tokens; the API key is enforced.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest
from vllm_helpers import KV_CACHE_BYTES, NEW_TOKENS, prompt_ids, reference_tokens, write_mixed

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

API_KEY = "test-key"
NAME = "tiny-factored"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(vllm_module, tmp_path_factory):
    pytest.importorskip("httpx")
    path = write_mixed(tmp_path_factory.mktemp("vllm-serve") / "tiny-llama-factored", "llama")
    port = _free_port()
    log = (tmp_path_factory.getbasetemp() / "vllm-serve.log").open("w")
    command = [sys.executable, "-m", "factorlm.cli", "serve", str(path), "--engine", "vllm", "--port", str(port),
               "--api-key", API_KEY, "--served-model-name", NAME, "--max-model-len", "256",
               "--dtype", "float32", "--enforce-eager", "--max-num-seqs", "8",
               "--kv-cache-memory-bytes", str(KV_CACHE_BYTES)]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    base = f"http://127.0.0.1:{port}"
    from factorlm.bench.loadgen import wait_until_healthy
    from factorlm.runtime.format import FactorlmError

    try:
        wait_until_healthy(base, process, 300, log.name)
    except FactorlmError as exc:
        pytest.fail(str(exc))
    yield base, path
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
    log.close()


def _headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"}


def test_completion_matches_torch_runtime(server) -> None:
    import httpx

    base, path = server
    prompts = prompt_ids(path)
    body = {"model": NAME, "prompt": prompts[0], "max_tokens": NEW_TOKENS, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True}
    reply = httpx.post(f"{base}/v1/completions", json=body, headers=_headers(), timeout=120)
    assert reply.status_code == 200, reply.text
    choice = reply.json()["choices"][0]
    assert choice["token_ids"] == reference_tokens(path, prompts[:1])[0]
    assert httpx.post(f"{base}/v1/completions", json=body, timeout=30).status_code == 401


def test_streamed_chat_completion(server) -> None:
    import httpx

    from factorlm.runtime.checkpoint import load_tokenizer
    from factorlm.runtime.generate import encode_prompt

    base, path = server
    tokenizer = load_tokenizer(path)
    question = "Name the capital of France."
    messages = [{"role": "user", "content": question}]
    ids = encode_prompt(tokenizer, question, chat=True)[0].tolist()
    expected = tokenizer.decode(reference_tokens(path, [ids])[0], skip_special_tokens=True)
    body = {"model": NAME, "messages": messages, "max_tokens": NEW_TOKENS, "temperature": 0,
            "ignore_eos": True, "stream": True}
    pieces, events = [], 0
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, headers=_headers(), timeout=120) as reply:
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in reply.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        chunk = json.loads(line.removeprefix("data: "))
        events += 1
        for choice in chunk["choices"]:
            pieces.append(choice["delta"].get("content") or "")
    assert events > 2, "a streamed reply arrives in several events"
    assert "".join(pieces) == expected
