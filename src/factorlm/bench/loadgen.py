"""OpenAI-compatible load generator (httpx async streaming).

Works against any ``/v1/completions`` endpoint (factorlm serve, vLLM). Each request
is streamed; the arrival time of every content chunk gives TTFT and inter-token
latencies, aggregated by :func:`factorlm.bench.stats.summarize_requests`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import subprocess
import time

import httpx

from factorlm.bench.stats import RequestTiming, summarize_requests

log = logging.getLogger(__name__)


async def _one_request(client: httpx.AsyncClient, url: str, model: str, prompt: str,
                       max_tokens: int) -> RequestTiming:
    """Send one streamed completion and time its chunks."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True,
            "temperature": 0.0, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    arrivals: list[float] = []
    prompt_len, usage_out = len(prompt.split()), None
    try:
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                await resp.aread()
                log.warning("request failed: HTTP %s %s", resp.status_code, resp.text[:200])
                return RequestTiming(prompt_len, 0, 0.0, time.perf_counter() - t0, success=False)
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("usage"):
                    prompt_len = chunk["usage"].get("prompt_tokens", prompt_len)
                    usage_out = chunk["usage"].get("completion_tokens")
                if any(c.get("text") for c in chunk.get("choices", [])):
                    arrivals.append(time.perf_counter() - t0)
    except httpx.HTTPError as exc:
        log.warning("request failed: %s", exc)
        return RequestTiming(prompt_len, 0, 0.0, time.perf_counter() - t0, success=False)
    latency = time.perf_counter() - t0
    if not arrivals:
        return RequestTiming(prompt_len, 0, 0.0, latency, success=False)
    itl = [b - a for a, b in zip(arrivals, arrivals[1:])]
    n_out = usage_out if usage_out is not None else len(arrivals)
    return RequestTiming(prompt_len, n_out, arrivals[0], latency, itl)


async def run_load(base_url: str, model: str, prompts: list[str], *, max_tokens: int = 32,
                   concurrency: int = 1, request_rate: float = float("inf"), seed: int = 0,
                   slo_ms: dict[str, float] | None = None,
                   transport: httpx.AsyncBaseTransport | None = None) -> dict:
    """Send every prompt once; at most ``concurrency`` in flight, Poisson arrivals at
    ``request_rate`` req/s (inf = all at once). Returns vLLM-style summary metrics."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    url = base_url.rstrip("/") + "/v1/completions"
    rng = random.Random(seed)
    sem = asyncio.Semaphore(concurrency)

    async with httpx.AsyncClient(timeout=None, transport=transport) as client:
        async def limited(p: str) -> RequestTiming:
            async with sem:
                return await _one_request(client, url, model, p, max_tokens)

        start = time.perf_counter()
        tasks = []
        for p in prompts:
            tasks.append(asyncio.create_task(limited(p)))
            if request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(request_rate))
        timings = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    result = summarize_requests(list(timings), duration, slo_ms=slo_ms)
    result.update({"max_concurrency": concurrency,
                   "request_rate": "inf" if request_rate == float("inf") else request_rate,
                   "num_prompts": len(prompts), "model_id": model})
    return result


def wait_until_healthy(base_url: str, process: "subprocess.Popen[bytes]", timeout_s: float, log_name: str,
                       poll_s: float = 1.0) -> None:
    """Poll ``GET /health`` of a server started as ``process`` until it answers 200.

    Raises :class:`~factorlm.runtime.format.FactorlmError` naming the log file when the
    process exits first or ``timeout_s`` passes (the process is then killed).
    """
    from factorlm.runtime.format import FactorlmError

    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            raise FactorlmError(f"server exited with {process.returncode}; log: {log_name}")
        try:
            if httpx.get(f"{base_url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            raise FactorlmError(f"server not healthy after {timeout_s:.0f} s; log: {log_name}")
        time.sleep(poll_s)
