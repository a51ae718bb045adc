"""Bounded soak of `factorlm serve --engine torch`: N concurrent clients for D seconds, zero errors, flat memory.

The server runs in its own process over a tiny in-code model saved to a temporary folder
(so its RSS is the server's alone). Each client loops over completions and chat requests,
streamed or not, greedy or seeded sampling, with the official async openai client. RSS of
the server process is sampled every few seconds; memory is "flat" when RSS at the end is
within the tolerance of RSS after the warm-up. Results: JSON + Markdown under benchmarks/results/.

    python benchmarks/soak_server.py --clients 32 --duration 300
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MODEL = "tiny"
PROMPTS = ["The quick brown fox", "Paris is the capital of", "Once upon a time there was",
           "Serving engines batch requests so that", "Low rank compression keeps", "The license grants"]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def client_loop(cid: int, client: Any, deadline: float, out: dict[str, Any]) -> None:
    rng = random.Random(cid)
    while time.monotonic() < deadline:
        chat, stream = rng.random() < 0.5, rng.random() < 0.5
        kw: dict[str, Any] = {"model": MODEL, "max_tokens": rng.randint(8, 48)}
        kw.update(temperature=0.0) if rng.random() < 0.5 else kw.update(temperature=0.8, seed=rng.randint(0, 1000))
        prompt = rng.choice(PROMPTS)
        started = time.perf_counter()
        try:
            if chat:
                call = client.chat.completions.create(messages=[{"role": "user", "content": prompt}], stream=stream,
                                                      **({"stream_options": {"include_usage": True}} if stream else {}),
                                                      **kw)
            else:
                call = client.completions.create(prompt=prompt, stream=stream,
                                                 **({"stream_options": {"include_usage": True}} if stream else {}), **kw)
            response = await call
            if stream:
                first, tokens = None, 0
                async for chunk in response:
                    if chunk.choices and first is None:
                        first = time.perf_counter() - started
                    if chunk.usage is not None:
                        tokens = chunk.usage.completion_tokens
                out["ttft_s"].append(first if first is not None else float("nan"))
            else:
                tokens = response.usage.completion_tokens
            out["latency_s"].append(time.perf_counter() - started)
            out["completed"] += 1
            out["tokens"] += tokens
        except Exception as exc:  # every failure is a result of the soak, not a crash of it
            out["errors"].append(f"{type(exc).__name__}: {str(exc)[:200]}")


async def soak(url: str, pid: int, clients: int, duration: float, sample_s: float) -> dict[str, Any]:
    import openai

    out: dict[str, Any] = {"completed": 0, "tokens": 0, "errors": [], "latency_s": [], "ttft_s": [], "rss_mib": []}
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="soak", max_retries=0, timeout=120)
    start = time.monotonic()
    deadline = start + duration

    async def sampler() -> None:
        while time.monotonic() < deadline:
            out["rss_mib"].append((round(time.monotonic() - start, 1), rss_mib(pid)))
            await asyncio.sleep(sample_s)
        out["rss_mib"].append((round(time.monotonic() - start, 1), rss_mib(pid)))

    await asyncio.gather(sampler(), *(client_loop(i, client, deadline, out) for i in range(clients)))
    out["wall_s"] = time.monotonic() - start
    await client.close()
    return out


def summarize(raw: dict[str, Any], args: argparse.Namespace, warmup_s: float) -> dict[str, Any]:
    rss = raw["rss_mib"]
    warm = [r for t, r in rss if t >= warmup_s] or [r for _, r in rss]
    lat = sorted(raw["latency_s"])
    ttft = sorted(x for x in raw["ttft_s"] if x == x)

    def pct(xs: list[float], p: float) -> float:
        return xs[min(len(xs) - 1, int(p / 100 * len(xs)))] if xs else float("nan")

    growth = warm[-1] - warm[0]
    return {
        "clients": args.clients, "duration_s": args.duration, "wall_s": raw["wall_s"],
        "completed": raw["completed"], "errors": len(raw["errors"]), "error_samples": raw["errors"][:10],
        "output_tokens": raw["tokens"], "request_throughput": raw["completed"] / raw["wall_s"],
        "output_throughput": raw["tokens"] / raw["wall_s"],
        "median_e2el_ms": 1000 * statistics.median(lat) if lat else None, "p99_e2el_ms": 1000 * pct(lat, 99),
        "median_ttft_ms": 1000 * statistics.median(ttft) if ttft else None, "p99_ttft_ms": 1000 * pct(ttft, 99),
        "rss_after_warmup_mib": warm[0], "rss_end_mib": warm[-1], "rss_max_mib": max(r for _, r in rss),
        "rss_growth_mib": growth, "rss_tolerance_mib": args.rss_tolerance_mib,
        "memory_flat": abs(growth) <= args.rss_tolerance_mib, "rss_samples": rss,
    }


def write(result: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(result, indent=2) + "\n"), (".md", markdown(result))):
        tmp = out.with_suffix(suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(out.with_suffix(suffix))


def markdown(r: dict[str, Any]) -> str:
    return "\n".join([
        f"# Server soak ({r['date']})", "", f"Command: `{r['command']}`", "",
        f"Tiny llama model (2 layers, hidden 64) served by `factorlm serve --engine torch --threads {r['threads']}`, "
        f"{r['clients']} concurrent openai clients (completions and chat, streamed or not, greedy or seeded).", "",
        "| metric | value |", "|---|---:|",
        f"| wall time (s) | {r['wall_s']:.0f} |", f"| completed requests | {r['completed']} |",
        f"| client errors | **{r['errors']}** |", f"| server 5xx (/metrics) | **{r['server_5xx']:.0f}** |",
        f"| requests/s | {r['request_throughput']:.2f} |", f"| output tokens/s | {r['output_throughput']:.1f} |",
        f"| median / p99 E2E latency (ms) | {r['median_e2el_ms']:.0f} / {r['p99_e2el_ms']:.0f} |",
        f"| median / p99 TTFT, streamed (ms) | {r['median_ttft_ms']:.0f} / {r['p99_ttft_ms']:.0f} |",
        f"| server RSS after warm-up / end / max (MiB) | {r['rss_after_warmup_mib']:.1f} / {r['rss_end_mib']:.1f} / "
        f"{r['rss_max_mib']:.1f} |",
        f"| RSS growth after warm-up (MiB) | {r['rss_growth_mib']:+.1f} (flat: {r['memory_flat']}) |", ""])


def server_5xx(url: str) -> float:
    import httpx

    total = 0.0
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("factorlm:http_requests_total{") and 'status="5' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--duration", type=float, default=300.0, help="seconds")
    parser.add_argument("--warmup", type=float, default=30.0, help="seconds before the RSS baseline")
    parser.add_argument("--threads", type=int, default=1, help="server torch threads")
    parser.add_argument("--rss-tolerance-mib", type=float, default=16.0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "serving_soak")
    args = parser.parse_args(argv)

    from factorlm.testing import save_tiny_dense

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_tiny_dense(Path(tmp) / "tiny")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "factorlm.cli", "serve", str(model_dir), "--port", str(port),
               "--served-model-name", MODEL, "--max-batch", str(args.clients), "--max-queue", "64",
               "--threads", str(args.threads)]
        server = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            import httpx

            for _ in range(600):
                try:
                    if httpx.get(f"{url}/health").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if server.poll() is not None:
                    raise SystemExit("the server exited during start-up")
                time.sleep(0.1)
            raw = asyncio.run(soak(url, server.pid, args.clients, args.duration, sample_s=5.0))
            result = summarize(raw, args, args.warmup)
            result["server_5xx"] = server_5xx(url)
        finally:
            server.terminate()
            server.wait(timeout=30)
    result.update(date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), threads=args.threads,
                  command="python benchmarks/soak_server.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    write(result, args.out)
    print(markdown(result))
    return 0 if result["errors"] == 0 and result["server_5xx"] == 0 and result["memory_flat"] else 1


if __name__ == "__main__":
    sys.exit(main())
