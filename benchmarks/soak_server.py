"""Bounded soak of `factorlm serve` (torch and onnx engines): N concurrent clients for D seconds, no errors, flat memory.

For each engine the real CLI serves the model in its own process (so its RSS is the
server's alone), with an API key and a served model name. Each client loops over
completions and chat requests, streamed or not, greedy or seeded sampling, with the
official async openai client. The server's RSS is sampled every few seconds. RSS swings
with the running batch (its KV cache), and the file-backed part (weights read from disk)
shrinks when the host reclaims page cache, so single samples of the total say little:
memory is "flat" (it does not grow) when the least-squares line through the heap
(``RssAnon``) samples after the warm-up rises by no more than the tolerance over the
measured window; a falling line passes. The total (``VmRSS``) is reported too. Results:
JSON + Markdown under benchmarks/results/.

    python benchmarks/soak_server.py --model sample --engines torch onnx --clients 32 --warmup 90 --duration 390
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _serving  # noqa: E402

PROMPTS = ["The quick brown fox", "Paris is the capital of", "Once upon a time there was",
           "Serving engines batch requests so that", "Low rank compression keeps", "The license grants"]


async def client_loop(cid: int, client: Any, model: str, deadline: float, out: dict[str, Any]) -> None:
    rng = random.Random(cid)
    while time.monotonic() < deadline:
        chat, stream = rng.random() < 0.5, rng.random() < 0.5
        kw: dict[str, Any] = {"model": model, "max_tokens": rng.randint(8, 48), "stream": stream}
        kw.update(temperature=0.0) if rng.random() < 0.5 else kw.update(temperature=0.8, seed=rng.randint(0, 1000))
        if stream:
            kw["stream_options"] = {"include_usage": True}
        prompt = rng.choice(PROMPTS)
        started = time.perf_counter()
        try:
            if chat:
                response = await client.chat.completions.create(messages=[{"role": "user", "content": prompt}], **kw)
            else:
                response = await client.completions.create(prompt=prompt, **kw)
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


async def soak(server: _serving.Server, clients: int, duration: float, sample_s: float) -> dict[str, Any]:
    import openai

    out: dict[str, Any] = {"completed": 0, "tokens": 0, "errors": [], "latency_s": [], "ttft_s": [], "rss_mib": [],
                           "anon_mib": []}
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=server.key, max_retries=0, timeout=300)
    start = time.monotonic()
    deadline = start + duration

    def sample() -> None:
        t = round(time.monotonic() - start, 1)
        out["rss_mib"].append((t, _serving.rss_mib(server.pid)))
        out["anon_mib"].append((t, _serving.rss_mib(server.pid, "RssAnon")))

    async def sampler() -> None:
        while time.monotonic() < deadline:
            sample()
            await asyncio.sleep(sample_s)
        sample()

    await asyncio.gather(sampler(), *(client_loop(i, client, server.model, deadline, out) for i in range(clients)))
    out["wall_s"] = time.monotonic() - start
    await client.close()
    return out


def slope_mib_per_min(samples: list[tuple[float, float]]) -> float:
    """Least-squares slope of RSS over time, MiB per minute."""
    if len(samples) < 2:
        return float("nan")
    ts, rs = [t for t, _ in samples], [r for _, r in samples]
    mt, mr = statistics.fmean(ts), statistics.fmean(rs)
    var = sum((t - mt) ** 2 for t in ts)
    return 60 * sum((t - mt) * (r - mr) for t, r in zip(ts, rs)) / var if var else float("nan")


def memory(samples: list[tuple[float, float]], warmup: float) -> dict[str, Any]:
    """First, last, min, max and the trend of one memory series after the warm-up."""
    after = [(t, r) for t, r in samples if t >= warmup] or samples
    slope = slope_mib_per_min(after)
    late = [r for t, r in samples if t >= samples[-1][0] / 2] or [r for _, r in samples]
    return {"after_warmup_mib": after[0][1], "end_mib": after[-1][1], "min_mib": min(r for _, r in after),
            "second_half_min_mib": min(late), "second_half_max_mib": max(late),
            "max_mib": max(r for _, r in after), "last_minus_first_mib": after[-1][1] - after[0][1],
            "slope_mib_per_min": slope, "trend_rise_mib": slope * (after[-1][0] - after[0][0]) / 60,
            "window_s": after[-1][0] - after[0][0], "samples": samples}


def summarize(raw: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    lat = sorted(raw["latency_s"])
    ttft = sorted(x for x in raw["ttft_s"] if x == x)

    def pct(xs: list[float], p: float) -> float:
        return xs[min(len(xs) - 1, int(p / 100 * len(xs)))] if xs else float("nan")

    rss, anon = memory(raw["rss_mib"], args.warmup), memory(raw["anon_mib"], args.warmup)
    return {
        "clients": args.clients, "duration_s": args.duration, "wall_s": raw["wall_s"],
        "completed": raw["completed"], "errors": len(raw["errors"]), "error_samples": raw["errors"][:10],
        "output_tokens": raw["tokens"], "request_throughput": raw["completed"] / raw["wall_s"],
        "output_throughput": raw["tokens"] / raw["wall_s"],
        "median_e2el_ms": 1000 * statistics.median(lat) if lat else None, "p99_e2el_ms": 1000 * pct(lat, 99),
        "median_ttft_ms": 1000 * statistics.median(ttft) if ttft else None, "p99_ttft_ms": 1000 * pct(ttft, 99),
        "rss": rss, "anon": anon, "tolerance_mib": args.rss_tolerance_mib,
        "memory_flat": anon["trend_rise_mib"] <= args.rss_tolerance_mib,
    }


def _mem(m: dict[str, Any]) -> str:
    return f"{m['after_warmup_mib']:.0f} / {m['end_mib']:.0f}, {m['min_mib']:.0f} / {m['max_mib']:.0f}"


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# Server soak ({result['date']})", "", f"Command: `{result['command']}`", "",
             f"Model: {result['model']}; {result['clients']} concurrent openai clients (completions and chat, "
             f"streamed or not, greedy or seeded sampling), {result['duration_s']:.0f} s per engine, RSS sampled "
             f"every 5 s, measured after {result['warmup_s']:.0f} s of warm-up.", "",
             _serving.environment_line(result["environment"]), "",
             "| metric | " + " | ".join(f"--engine {r['engine']}" for r in result["engines"]) + " |",
             "|---|" + "---:|" * len(result["engines"])]
    rows = [
        ("wall time (s)", lambda r: f"{r['wall_s']:.0f}"), ("completed requests", lambda r: f"{r['completed']}"),
        ("client errors", lambda r: f"**{r['errors']}**"), ("server 5xx (/metrics)", lambda r: f"**{r['server_5xx']:.0f}**"),
        ("requests/s", lambda r: f"{r['request_throughput']:.2f}"),
        ("output tokens/s", lambda r: f"{r['output_throughput']:.1f}"),
        ("median / p99 E2E latency (ms)", lambda r: f"{r['median_e2el_ms']:.0f} / {r['p99_e2el_ms']:.0f}"),
        ("median / p99 TTFT, streamed (ms)", lambda r: f"{r['median_ttft_ms']:.0f} / {r['p99_ttft_ms']:.0f}"),
        ("heap (RssAnon) after warm-up / end, min / max (MiB)", lambda r: _mem(r["anon"])),
        ("heap trend after warm-up: slope (MiB/min), rise over the window (MiB)",
         lambda r: f"{r['anon']['slope_mib_per_min']:+.2f}, {r['anon']['trend_rise_mib']:+.1f}"),
        ("heap over the second half of the run, min / max (MiB)",
         lambda r: f"{r['anon']['second_half_min_mib']:.0f} / {r['anon']['second_half_max_mib']:.0f}"),
        ("memory flat (heap trend rise <= tolerance)",
         lambda r: f"**{r['memory_flat']}** (<= {r['tolerance_mib']:g} MiB)"),
        ("all resident (VmRSS) after warm-up / end, min / max (MiB)", lambda r: _mem(r["rss"])),
        ("load average at start / end", lambda r: f"{r['loadavg_start']} / {r['loadavg_end']}"),
    ]
    lines += [f"| {name} | " + " | ".join(cell(r) for r in result["engines"]) + " |" for name, cell in rows]
    lines += ["", "Servers:", ""] + [f"- `{r['serve_command']}`" for r in result["engines"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="'tiny' (in-code), 'sample' or a model folder")
    parser.add_argument("--engines", nargs="+", default=["torch"], choices=["torch", "onnx"])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--duration", type=float, default=390.0, help="seconds per engine, warm-up included")
    parser.add_argument("--warmup", type=float, default=90.0, help="seconds before RSS is measured")
    parser.add_argument("--threads", type=int, default=1, help="server threads")
    parser.add_argument("--rss-tolerance-mib", type=float, default=32.0,
                        help="largest rise of the RSS trend line over the measured window")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "serving_soak")
    args = parser.parse_args(argv)
    env = _serving.environment()

    runs = []
    with tempfile.TemporaryDirectory(prefix="factorlm-soak-") as tmp:
        folder, label = _serving.model_folder(args.model, Path(tmp))
        for engine in args.engines:
            served = _serving.onnx_export(folder, Path(tmp), args.threads) if engine == "onnx" else folder
            extra = ["--max-batch", str(args.clients), "--max-queue", "64"]
            with _serving.serve(served, engine, threads=args.threads, extra=extra) as server:
                load_start = _serving.loadavg()
                raw = asyncio.run(soak(server, args.clients, args.duration, sample_s=5.0))
                run = summarize(raw, args)
                run.update(engine=engine, serve_command=server.command, loadavg_start=load_start,
                           loadavg_end=_serving.loadavg(),
                           server_5xx=server.metric_sum("factorlm:http_requests_total", status="5*"))
            runs.append(run)
            print(f"{engine}: {run['completed']} requests, {run['errors']} errors, heap trend "
                  f"{run['anon']['trend_rise_mib']:+.1f} MiB", flush=True)
    result = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "model": label,
              "environment": env,
              "clients": args.clients, "duration_s": args.duration, "warmup_s": args.warmup, "threads": args.threads,
              "command": "python benchmarks/soak_server.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "engines": runs}
    _serving.write_result(args.out, result, markdown(result))
    print(markdown(result))
    ok = all(r["errors"] == 0 and r["server_5xx"] == 0 and r["memory_flat"] for r in runs)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
