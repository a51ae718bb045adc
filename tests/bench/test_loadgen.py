"""Load generator against an in-process fake OpenAI streaming endpoint."""

import asyncio
import json

import httpx
from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from factorlm.bench.loadgen import run_load


def _fake_app(n_tokens: int) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/completions")
    async def completions(body: dict):
        async def gen():
            for i in range(n_tokens):
                yield "data: " + json.dumps({"choices": [{"index": 0, "text": f" t{i}"}]}) + "\n\n"
            usage = {"prompt_tokens": 3, "completion_tokens": n_tokens}
            yield "data: " + json.dumps({"choices": [], "usage": usage}) + "\n\n"
            yield "data: [DONE]\n\n"
        return StreamingResponse(gen(), media_type="text/event-stream")

    return app


def test_loadgen_counts_requests_and_tokens():
    transport = httpx.ASGITransport(app=_fake_app(4))
    res = asyncio.run(run_load("http://test", "m", ["a b c"] * 5, max_tokens=4,
                               concurrency=2, transport=transport))
    assert res["completed"] == 5 and res["failed"] == 0
    assert res["total_output_tokens"] == 20
    assert res["total_input_tokens"] == 15
    assert res["output_throughput"] > 0
    assert res["p99_e2el_ms"] >= res["median_e2el_ms"] >= 0
    assert res["max_concurrency"] == 2


def test_loadgen_records_http_failures():
    app = FastAPI()

    @app.post("/v1/completions")
    async def bad(body: dict):
        from fastapi.responses import JSONResponse
        return JSONResponse({"error": "nope"}, status_code=500)

    res = asyncio.run(run_load("http://test", "m", ["x"] * 3,
                               transport=httpx.ASGITransport(app=app)))
    assert res["completed"] == 0 and res["failed"] == 3


def test_loadgen_against_tiny_model_server():
    import torch

    from factorlm.serving.app import create_app
    from factorlm.serving.server import BackgroundServer
    from factorlm.serving.torch_engine import TorchEngine
    from factorlm.testing import make_tiny_model

    torch.set_num_threads(1)
    model, tokenizer = make_tiny_model("llama")
    engine = TorchEngine(model, tokenizer, model_name="tiny", max_batch=4, max_queue=16)
    with BackgroundServer(create_app(engine, max_tokens_limit=64)) as url:
        res = asyncio.run(run_load(url, "tiny", ["hello world", "the cat"] * 2, max_tokens=6,
                                   concurrency=2, slo_ms={"e2el": 60_000.0}))
    assert res["completed"] == 4 and res["failed"] == 0
    assert 0 < res["total_output_tokens"] <= 24
    assert res["mean_ttft_ms"] > 0
    assert res["request_goodput"] == res["request_throughput"]


def test_cli_bench_serving_prints_json_line(capsys):
    import json as _json

    from factorlm.cli import main
    from factorlm.serving.server import BackgroundServer

    with BackgroundServer(_fake_app(3)) as url:
        assert main(["bench", "serving", "--url", url, "--model", "m", "--num-prompts", "2",
                     "--concurrency", "1", "2"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    rows = _json.loads(last)["results"]
    assert [r["max_concurrency"] for r in rows] == [1, 2]
    assert all(r["completed"] == 2 and r["total_output_tokens"] == 6 for r in rows)
