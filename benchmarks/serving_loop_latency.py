"""Does a 4 MB prompt stall the server? /health latency and a running stream while huge prompts arrive.

For each engine the server runs in its own process twice: as ``factorlm serve`` (its length
guard refuses a prompt that cannot fit before tokenizing it) and with the guard off, so
that the 4 MB prompt really is tokenized (~1M tokens, seconds of CPU). Throughout, one
client polls ``GET /health`` back to back and another reads a long greedy stream. Phases:
a quiet baseline, one 4 MB completions prompt, three at once, one 4 MB chat message. The
event loop is stalled if a /health round trip takes long; the target is < 100 ms.
Results: JSON + Markdown under benchmarks/results/.

    python benchmarks/serving_loop_latency.py --model sample --engines torch onnx
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _serving  # noqa: E402

TARGET_MS = 100.0
PROMPT_BYTES = 4_000_000


def stats_ms(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    ordered = sorted(v * 1000 for v in values)
    return {"n": len(ordered), "p50": statistics.median(ordered), "p99": ordered[min(len(ordered) - 1,
                                                                                       int(0.99 * len(ordered)))],
            "max": ordered[-1]}


async def poll_health(client: Any, url: str, stop: asyncio.Event, out: list[tuple[float, float]]) -> None:
    while not stop.is_set():
        started = time.perf_counter()
        r = await client.get(f"{url}/health", timeout=120)
        out.append((started, time.perf_counter() - started))
        assert r.status_code == 200, r.text
        await asyncio.sleep(0.01)


async def read_stream(client: Any, server: _serving.Server, stop: asyncio.Event, out: list[float]) -> None:
    """One long greedy stream after another, recording when each chunk arrives."""
    card = (await client.get(f"{server.url}/v1/models", headers=server.headers())).json()["data"][0]
    body = {"model": server.model, "prompt": "Once upon a time", "max_tokens": min(4000, card["max_model_len"] - 16),
            "temperature": 0, "ignore_eos": True, "stream": True}
    while not stop.is_set():
        async with client.stream("POST", f"{server.url}/v1/completions", json=body, headers=server.headers(),
                                 timeout=600) as r:
            if r.status_code != 200:
                raise SystemExit(f"the stream got {r.status_code}: {(await r.aread())[:300]!r}")
            async for line in r.aiter_lines():
                if line.startswith("data:"):
                    out.append(time.perf_counter())
                if stop.is_set():
                    break


def window(samples: list[tuple[float, float]], start: float, end: float) -> list[float]:
    return [lat for t, lat in samples if start <= t <= end or (t < start and t + lat > start)]


def gaps(times: list[float], start: float, end: float) -> list[float]:
    inside = [t for t in times if start <= t <= end]
    before = [t for t in times if t < start][-1:]
    seq = before + inside
    return [b - a for a, b in zip(seq, seq[1:])]


async def measure(server: _serving.Server, baseline_s: float) -> list[dict[str, Any]]:
    import httpx

    big = "lorem ipsum " * (PROMPT_BYTES // 12)
    completion = json.dumps({"model": server.model, "prompt": big, "max_tokens": 4}).encode()
    chat = json.dumps({"model": server.model, "messages": [{"role": "user", "content": big}], "max_tokens": 4}).encode()
    headers = {**server.headers(), "content-type": "application/json"}
    health: list[tuple[float, float]] = []
    chunks: list[float] = []
    stop = asyncio.Event()
    phases = []
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=16)) as client:
        tasks = [asyncio.ensure_future(poll_health(client, server.url, stop, health)),
                 asyncio.ensure_future(read_stream(client, server, stop, chunks))]
        while not chunks:
            if tasks[1].done():
                tasks[1].result()  # re-raises why the stream failed
            await asyncio.sleep(0.05)

        async def phase(name: str, bodies: list[tuple[str, bytes]]) -> None:
            start = time.perf_counter()
            if bodies:
                answers = await asyncio.gather(*(client.post(f"{server.url}{route}", content=b, headers=headers,
                                                             timeout=600) for route, b in bodies))
            else:
                await asyncio.sleep(baseline_s)
                answers = []
            end = time.perf_counter()
            phases.append({"phase": name, "seconds": end - start, "statuses": [a.status_code for a in answers],
                           "messages": [a.json()["error"]["message"][:160] for a in answers if a.status_code >= 400],
                           "health_ms": stats_ms(window(health, start, end)),
                           "stream_gap_ms": stats_ms(gaps(chunks, start, end))})
            print(f"  {name}: {phases[-1]['seconds']:.1f} s, /health max {phases[-1]['health_ms'].get('max', 0):.0f} ms",
                  file=sys.stderr, flush=True)

        await phase("baseline (no large prompt)", [])
        await phase("one 4 MB completions prompt", [("/v1/completions", completion)])
        await phase("three 4 MB prompts at once", [("/v1/completions", completion)] * 3)
        await phase("one 4 MB chat message", [("/v1/chat/completions", chat)])
        stop.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return phases


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# Event loop under 4 MB prompts ({result['date']})", "", f"Command: `{result['command']}`", "",
             f"Model: {result['model']}; one thread per server. /health is polled back to back (10 ms apart) "
             f"while one greedy stream runs; target: every /health round trip < {TARGET_MS:.0f} ms.", "",
             _serving.environment_line(result["environment"]), ""]
    for run in result["runs"]:
        lines += [f"## `--engine {run['engine']}`, length guard {'on' if run['length_guard'] else 'off'}", "",
                  f"Server: `{run['serve_command']}`; load average at start {run['loadavg_start']}, "
                  f"end {run['loadavg_end']}", "",
                  "| phase | wall (s) | answers | /health p50 / p99 / max (ms) | stream gap p50 / max (ms) |",
                  "|---|---:|---|---:|---:|"]
        for p in run["phases"]:
            h, g = p["health_ms"], p["stream_gap_ms"]
            lines.append(f"| {p['phase']} | {p['seconds']:.1f} | {', '.join(map(str, p['statuses'])) or '-'} | "
                         f"{h.get('p50', 0):.1f} / {h.get('p99', 0):.1f} / **{h.get('max', 0):.1f}** | "
                         f"{g.get('p50', 0):.0f} / {g.get('max', 0):.0f} |")
        lines.append("")
    lines += [f"Worst /health round trip over all runs: **{result['worst_health_ms']:.1f} ms** "
              f"(target < {TARGET_MS:.0f} ms: {result['target_met']}).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="'tiny' (in-code), 'sample' or a model folder")
    parser.add_argument("--engines", nargs="+", default=["torch"], choices=["torch", "onnx"])
    parser.add_argument("--baseline", type=float, default=5.0, help="seconds of the quiet phase")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "serving_loop_latency")
    args = parser.parse_args(argv)
    env = _serving.environment()

    runs = []
    with tempfile.TemporaryDirectory(prefix="factorlm-loop-") as tmp:
        folder, label = _serving.model_folder(args.model, Path(tmp))
        for engine in args.engines:
            served = _serving.onnx_export(folder, Path(tmp), args.threads) if engine == "onnx" else folder
            for guard in (True, False):
                print(f"{engine}, length guard {'on' if guard else 'off'}:", file=sys.stderr, flush=True)
                with _serving.serve(served, engine, threads=args.threads, length_guard=guard) as server:
                    load_start = _serving.loadavg()
                    phases = asyncio.run(measure(server, args.baseline))
                    runs.append({"engine": engine, "length_guard": guard, "serve_command": server.command,
                                 "loadavg_start": load_start, "loadavg_end": _serving.loadavg(), "phases": phases})
    worst = max(p["health_ms"].get("max", 0.0) for r in runs for p in r["phases"])
    result = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "model": label,
              "environment": env,
              "command": "python benchmarks/serving_loop_latency.py " + " ".join(argv if argv is not None
                                                                                 else sys.argv[1:]),
              "prompt_bytes": PROMPT_BYTES, "target_ms": TARGET_MS, "worst_health_ms": worst,
              "target_met": worst < TARGET_MS, "runs": runs}
    _serving.write_result(args.out, result, markdown(result))
    print(markdown(result))
    return 0 if result["target_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
