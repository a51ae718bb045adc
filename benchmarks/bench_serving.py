"""Served benchmark: concurrency sweep against an OpenAI-compatible endpoint.

Either points at a running server (``--url``, e.g. ``factorlm serve`` or vLLM) or starts
factorlm's torch server on 127.0.0.1 for ``--model`` in this process. Metric names follow
vLLM's serving benchmark. Measures memory bandwidth in the same run. Results go to
benchmarks/results/serving_<tag>.{json,md}; ends with one JSON line.

    python benchmarks/bench_serving.py --model DIR --concurrency 1 2 4 --num-prompts 8
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
from pathlib import Path

import torch

from factorlm.bench import measure_bandwidth
from factorlm.bench.loadgen import run_load

RESULTS = Path(__file__).parent / "results"
PROMPTS = [
    "The history of the city begins in the early middle ages, when",
    "Explain in simple words why the sky is blue.",
    "Write a short note about the river and the old bridge.",
    "List three facts about the moon.",
]
COLUMNS = ["max_concurrency", "completed", "request_throughput", "output_throughput",
           "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p99_itl_ms", "median_e2el_ms"]


@contextlib.contextmanager
def endpoint(url: str | None, model: str | None, max_batch: int):
    """Yield (base_url, model name): the given URL, or a local factorlm server for ``model``."""
    if url:
        yield url, model or "default"
        return
    from factorlm.serving.app import create_app
    from factorlm.serving.engines import EngineOptions, create_engine
    from factorlm.serving.server import BackgroundServer

    engine = create_engine("torch", model, EngineOptions(max_batch=max_batch, served_model_name="bench"))
    with BackgroundServer(create_app(engine)) as local:
        yield local, "bench"


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# Serving benchmark `{meta['tag']}`", "",
             f"Command: `{meta['command']}`  ", f"Load average at start: {meta['loadavg']}  ",
             f"Memory bandwidth (fp32 sum, median): {meta['bandwidth']['bandwidth_gbps_median']:.1f} GB/s", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[c]:.2f}" if isinstance(r[c], float) else str(r[c])
                                       for c in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default=None, help="base URL of a running OpenAI-compatible server")
    ap.add_argument("--model", default=None, help="model folder to serve locally (or model name with --url)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--num-prompts", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tag", default="cpu")
    args = ap.parse_args()
    if not args.url and not args.model:
        ap.error("give --url of a running server or --model folder to serve")
    torch.set_num_threads(args.threads)
    meta = {"tag": args.tag, "loadavg": os.getloadavg(), "machine": platform.machine(),
            "threads": args.threads, "bandwidth": measure_bandwidth(512, 7),
            "command": ("python benchmarks/bench_serving.py " + " ".join(os.sys.argv[1:])).replace(str(Path.home()), "~")}
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.num_prompts)]
    rows = []
    with endpoint(args.url, args.model, max(args.concurrency)) as (url, name):
        for c in args.concurrency:
            rows.append(asyncio.run(run_load(url, name, prompts, max_tokens=args.max_tokens, concurrency=c)))
    RESULTS.mkdir(exist_ok=True)
    out = {**meta, "results": rows}
    for suffix, text in (("json", json.dumps(out, indent=2)), ("md", markdown(rows, meta))):
        tmp = RESULTS / f".serving_{args.tag}.{suffix}.tmp"
        tmp.write_text(text)
        tmp.replace(RESULTS / f"serving_{args.tag}.{suffix}")
    print(markdown(rows, meta))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
