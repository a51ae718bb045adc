"""``factorlm bench serving --url URL``: load-test any OpenAI-compatible endpoint."""

from __future__ import annotations

import argparse
import asyncio
import json

_COLUMNS = ["max_concurrency", "completed", "failed", "request_throughput", "output_throughput",
            "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p99_itl_ms", "median_e2el_ms"]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="benchmarks (serving load generator)")
    sub = p.add_subparsers(dest="bench_command", required=True)
    s = sub.add_parser("serving", help="concurrency sweep against an OpenAI-compatible /v1/completions")
    s.add_argument("--url", required=True, help="base URL, e.g. http://127.0.0.1:8000")
    s.add_argument("--model", required=True, help="model name the server expects")
    s.add_argument("--prompt", action="append", default=None, help="prompt text (repeatable)")
    s.add_argument("--num-prompts", type=int, default=8)
    s.add_argument("--max-tokens", type=int, default=32)
    s.add_argument("--concurrency", type=int, nargs="+", default=[1])
    s.add_argument("--request-rate", type=float, default=float("inf"), help="Poisson arrivals per second")
    s.set_defaults(func=run_serving)


def run_serving(args: argparse.Namespace) -> int:
    from ..bench.loadgen import run_load

    base = args.prompt or ["Write a short note about the river and the old bridge."]
    prompts = [base[i % len(base)] for i in range(args.num_prompts)]
    rows = [asyncio.run(run_load(args.url, args.model, prompts, max_tokens=args.max_tokens,
                                 concurrency=c, request_rate=args.request_rate))
            for c in args.concurrency]
    print(" | ".join(_COLUMNS))
    for r in rows:
        print(" | ".join(f"{r[c]:.2f}" if isinstance(r[c], float) else str(r[c]) for c in _COLUMNS))
    print(json.dumps({"results": rows}))
    return 0
