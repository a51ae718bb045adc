"""Offline decode/prefill benchmark: dense vs factored, every engine, one process.

For each engine and model: TTFT, prefill tokens/s, decode tokens/s per batch size, weight
bytes, bytes read per decoded token, peak memory, and the achieved bandwidth (bytes read
per token x tokens/s) as a fraction of this machine's memory bandwidth, probed in the
same run. Runs are interleaved (every model once per round, the order alternating), so
drift on a shared machine hits dense and factored alike; medians and per-round
factored/dense ratios come from the same run. The load average at start and end is
recorded because shared machines make absolute numbers noisy.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import site
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .bandwidth import measure_bandwidth
from .footprint import ModelFootprint, peak_rss_bytes, reset_peak_rss, rss_bytes
from .memory_probe import isolated_peak_rss
from .runner import BenchConfig, EngineUnavailable, Runner, RunTiming, get_engine

log = logging.getLogger(__name__)

TARGET_SPEEDUP_OVER_BYTES = 0.9  # issue target: factored/dense decode speed >= 0.9 x bytes ratio (batch 1, CPU)

PROMPT_TEXT = (
    "The river runs through the old town, past the market square and under the stone bridge that the "
    "builders finished after eleven years of work. In spring the water rises and the fishermen move their "
    "boats to the upper harbour, where the wall is higher and the current slower. Visitors who walk along "
    "the bank in the evening can hear the bells of three churches, each a little out of time with the "
    "others, and see the lamps being lit one by one on the far side. The town council has argued for a "
    "century about a second bridge; the plans, drawn and redrawn, fill a whole room of the archive. "
)


def prompt_windows(ids: Sequence[int], batch: int, length: int, stride: int = 7) -> list[list[int]]:
    """``batch`` prompts of ``length`` tokens, row r starting ``r * stride`` tokens into ``ids`` (repeated as needed)."""
    need = (batch - 1) * stride + length
    if not ids:
        raise ValueError("prompt_windows needs a non-empty token list")
    seq = list(ids) * (need // len(ids) + 1)
    return [seq[r * stride: r * stride + length] for r in range(batch)]


def display_path(path: str | Path) -> str:
    """A path for result files that names no machine: an installed package's file as
    ``<site-packages>/...`` (e.g. the sample GGUF), the home folder as ``~``."""
    text, home = str(path), str(Path.home())
    for root in sorted({*site.getsitepackages(), site.getusersitepackages()}, key=len, reverse=True):
        if text.startswith(root + os.sep):
            return "<site-packages>" + text[len(root):]
    return "~" + text[len(home):] if text == home or text.startswith(home + os.sep) else text


def median(values: Sequence[float]) -> float:
    """Median ignoring NaNs (NaN when nothing is left)."""
    finite = [v for v in values if not math.isnan(v)]
    return statistics.median(finite) if finite else float("nan")


def pair_ratios(numerators: Sequence[float], denominators: Sequence[float]) -> list[float]:
    """Per-round ratios of two equally long sample lists (the rounds interleaved them)."""
    if len(numerators) != len(denominators):
        raise ValueError(f"paired samples differ in length: {len(numerators)} vs {len(denominators)}")
    return [n / d for n, d in zip(numerators, denominators) if d > 0]


def achieved_bandwidth(step_bytes: float, batch: int, decode_tok_s: float) -> tuple[float, float]:
    """(bytes read per decoded token, achieved GB/s): one step reads ``step_bytes`` for ``batch`` tokens."""
    per_token = step_bytes / batch
    return per_token, per_token * decode_tok_s / 1e9


def summarize_cell(timings: Sequence[RunTiming]) -> dict[str, float]:
    """Medians of one (engine, model, batch) cell's repeats."""
    return {
        "ttft_ms": median([t.ttft_s * 1e3 for t in timings]),
        "prefill_tok_s": median([t.prefill_tok_s for t in timings]),
        "decode_tok_s": median([t.decode_tok_s for t in timings]),
        "decode_tok_s_samples": [round(t.decode_tok_s, 3) for t in timings],
        "repeats": len(timings),
    }


def _load_runner(spec_name: str, variant: str, path: Path, config: BenchConfig) -> tuple[Runner, dict[str, Any]]:
    spec = get_engine(spec_name)
    before = rss_bytes()
    t0 = time.perf_counter()
    runner = spec.load(path, variant, config)
    info = {"path": display_path(path), "load_s": round(time.perf_counter() - t0, 3)}
    if getattr(runner, "backend", None):
        info["backend"] = runner.backend  # e.g. which llama.cpp binding ran the GGUF
    after = rss_bytes()
    if before is not None and after is not None:
        info["rss_load_bytes"] = after - before
    return runner, info


def _measure_run(runner: Runner, prompts: list[list[int]], new_tokens: int) -> tuple[RunTiming, int | None]:
    """One timed run and the memory peak it reached above the process's resident set before it."""
    if runner.memory_kind == "rss":
        ok = reset_peak_rss()
        before = rss_bytes()
        timing = runner.run(prompts, new_tokens)
        peak = peak_rss_bytes()
        extra = peak - before if ok and peak is not None and before is not None else None
        return timing, extra
    timing = runner.run(prompts, new_tokens)
    return timing, timing.peak_memory_bytes


def _peak_memory(runner: Runner, mode: str, load_rss: int | None, run_peak: int | None,
                 isolated: tuple[int, int | None] | None, batch: int) -> int | None:
    """The peak-memory cell: GPU max allocated; CPU isolated-process peak (at its batch) or in-process growth."""
    if runner.memory_kind != "rss":
        return run_peak
    if mode == "isolated":
        return isolated[1] if isolated and isolated[0] == batch else None
    if mode == "inprocess" and run_peak is not None and load_rss is not None:
        return load_rss + run_peak
    return None


def run_offline(dense: Path, factored: Path, config: BenchConfig, *, progress: bool = True) -> dict[str, Any]:
    """Run the benchmark and return the result dict (``format_markdown`` renders it)."""
    from ..runtime.checkpoint import load_tokenizer

    torch.set_num_threads(config.threads)
    load_start = os.getloadavg()
    probe_device = "cuda" if config.device == "cuda" else "cpu"
    probe_mib = config.bandwidth_mib if probe_device == "cpu" or torch.cuda.is_available() else 0  # no GPU: engines skip
    bandwidth = [measure_bandwidth(probe_mib, device=probe_device)] if probe_mib else []
    footprints = {"dense": ModelFootprint.from_folder(dense), "factored": ModelFootprint.from_folder(factored)}
    ids = load_tokenizer(dense)(PROMPT_TEXT).input_ids
    prompts = {b: prompt_windows(ids, b, config.prompt_tokens) for b in config.batches}

    runners: dict[tuple[str, str], Runner] = {}
    models: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    for name in config.engines:
        for variant, path in get_engine(name).variants(dense, factored, config).items():
            key = f"{name}/{variant}"
            try:
                runner, info = _load_runner(name, variant, path, config)
                for b in config.batches:  # warm-up: first-call allocations and graph setup stay out of the timings
                    if runner.max_batch is None or b <= runner.max_batch:
                        runner.run(prompts[b], config.warmup_tokens)
            except EngineUnavailable as exc:
                skipped[key] = str(exc)
                log.warning("skipping %s: %s", key, exc)
                continue
            runners[(name, variant)] = runner
            models[key] = info

    samples: dict[tuple[str, str, int], list[RunTiming]] = {}
    peaks: dict[tuple[str, str, int], int] = {}
    order = list(runners)
    total = config.repeats * sum(1 for b in config.batches for r in runners.values()
                                 if r.max_batch is None or b <= r.max_batch)
    with tqdm(total=total, desc="offline bench", disable=not progress, unit="run") as bar:
        for rep in range(config.repeats):
            for batch in config.batches:
                for name, variant in (order if rep % 2 == 0 else order[::-1]):  # alternate which model goes first
                    runner = runners[(name, variant)]
                    if runner.max_batch is not None and batch > runner.max_batch:
                        continue
                    timing, extra = _measure_run(runner, prompts[batch], config.new_tokens)
                    samples.setdefault((name, variant, batch), []).append(timing)
                    if extra is not None:
                        peaks[(name, variant, batch)] = max(peaks.get((name, variant, batch), 0), extra)
                    bar.update(1)
    for runner in runners.values():
        runner.close()
    isolated = {}
    if config.memory == "isolated":  # after the timed rounds, so the children do not disturb them
        for (name, variant), runner in runners.items():
            if runner.memory_kind == "rss":
                batch = max(b for b in config.batches if runner.max_batch is None or b <= runner.max_batch)
                path = Path(os.path.expanduser(models[f"{name}/{variant}"]["path"]))
                isolated[(name, variant)] = (batch, isolated_peak_rss(name, variant, path, config, prompts[batch],
                                                                      config.new_tokens))
    if probe_mib:
        bandwidth.append(measure_bandwidth(probe_mib, device=probe_device))
    load_end = os.getloadavg()

    probe = median([b["bandwidth_gbps_median"] for b in bandwidth]) if bandwidth else float("nan")
    rows = []
    for (name, variant, batch), timings in samples.items():
        runner = runners[(name, variant)]
        fp = footprints.get(variant, footprints["dense"])
        context = config.prompt_tokens + config.new_tokens / 2
        if runner.file_weight_bytes is not None:
            weight_bytes = runner.file_weight_bytes
            step = weight_bytes + batch * fp.step_bytes(1, context, 0, runner.kv_element_bytes)
        else:
            weight_bytes = fp.weight_bytes(runner.element_bytes)
            step = fp.step_bytes(batch, context, runner.element_bytes, runner.kv_element_bytes)
        cell = summarize_cell(timings)
        per_token, gbps = achieved_bandwidth(step, batch, cell["decode_tok_s"])
        peak = _peak_memory(runner, config.memory, models[f"{name}/{variant}"].get("rss_load_bytes"),
                            peaks.get((name, variant, batch)), isolated.get((name, variant)), batch)
        rows.append({"engine": name, "model": variant, "batch": batch, **cell, "weight_bytes": weight_bytes,
                     "bytes_per_token": per_token, "achieved_gbps": gbps, "bandwidth_fraction": gbps / probe,
                     "peak_memory_bytes": peak, "memory_kind": runner.memory_kind})
    return {
        "bench": "offline",
        "config": {"engines": config.engines, "batches": config.batches, "prompt_tokens": config.prompt_tokens,
                   "new_tokens": config.new_tokens, "repeats": config.repeats, "threads": config.threads,
                   "device": config.device, "memory": config.memory, "dense": display_path(dense),
                   "factored": display_path(factored)},
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name() if config.device == "cuda" and torch.cuda.is_available() else None,
                    "loadavg_start": [round(x, 2) for x in load_start], "loadavg_end": [round(x, 2) for x in load_end],
                    "bandwidth_gbps": probe, "bandwidth_probes": bandwidth},
        "models": models,
        "results": rows,
        "ratios": factored_ratios(samples, rows),
        "skipped": skipped,
    }


def factored_ratios(samples: dict[tuple[str, str, int], list[RunTiming]], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per engine and batch: factored/dense decode speed (median of per-round ratios) against the bytes ratio."""
    by_key = {(r["engine"], r["model"], r["batch"]): r for r in rows}
    out = []
    for (engine, model, batch), fact in samples.items():
        if model != "factored" or (engine, "dense", batch) not in samples:
            continue
        dense = samples[(engine, "dense", batch)]
        speedup = median(pair_ratios([t.decode_tok_s for t in fact], [t.decode_tok_s for t in dense]))
        ttft = median(pair_ratios([t.ttft_s for t in dense], [t.ttft_s for t in fact]))
        bytes_ratio = by_key[(engine, "dense", batch)]["bytes_per_token"] / by_key[(engine, model, batch)]["bytes_per_token"]
        eff = speedup / bytes_ratio
        out.append({"engine": engine, "batch": batch, "decode_speedup": speedup, "ttft_speedup": ttft,
                    "bytes_ratio": bytes_ratio, "speedup_over_bytes_ratio": eff,
                    "target_met": eff >= TARGET_SPEEDUP_OVER_BYTES if batch == 1 else None})
    return out


def _pct(x: float) -> str:
    return "-" if math.isnan(x) else f"{100 * x:.0f}%"


def _mb(x: float | None) -> str:
    return "-" if x is None else f"{x / 1e6:.1f}"


def format_markdown(result: dict[str, Any], command: str = "") -> str:
    """A readable report: setup line, one row per engine/model/batch, then the factored/dense ratios."""
    cfg, m = result["config"], result["machine"]
    lines = [f"# Offline decode/prefill benchmark ({cfg['device']}, {cfg['threads']} thread(s))", ""]
    if command:
        lines += [f"`{command}`", ""]
    if str(result.get("model", "")).startswith("synthetic:"):
        lines += [f"Models: random weights with the {result['model'].removeprefix('synthetic:')} configuration, "
                  f"dense and factored with uniform ranks at keep {result.get('keep')} (speed only: decode time "
                  "depends on shapes and ranks, not on the values).", ""]
    lines += [
        f"Prompt {cfg['prompt_tokens']} tokens, {cfg['new_tokens']} greedy new tokens, median of {cfg['repeats']} "
        f"interleaved rounds. Machine: {m['processor']}, {m['cpu_count']} CPUs"
        + (f", GPU {m['gpu']}" if m.get("gpu") else "")
        + f"; load average {m['loadavg_start'][0]} at start, {m['loadavg_end'][0]} at end; "
        + (f"memory bandwidth probe {m['bandwidth_gbps']:.1f} GB/s (median of start and end probes)."
           if not math.isnan(m["bandwidth_gbps"]) else "memory bandwidth probe not run."), "",
        "| engine | model | batch | TTFT ms | prefill tok/s | decode tok/s | weight MB | MB read/token "
        "| achieved GB/s | % of probe | peak memory MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(result["results"], key=lambda r: (r["engine"], r["batch"], r["model"])):
        lines.append(f"| {r['engine']} | {r['model']} | {r['batch']} | {r['ttft_ms']:.0f} | {r['prefill_tok_s']:.0f} | "
                     f"{r['decode_tok_s']:.1f} | {_mb(r['weight_bytes'])} | {_mb(r['bytes_per_token'])} | "
                     f"{r['achieved_gbps']:.2f} | {_pct(r['bandwidth_fraction'])} | {_mb(r['peak_memory_bytes'])} |")
    if result["ratios"]:
        lines += ["", "| engine | batch | decode speedup factored/dense | TTFT speedup | bytes-read ratio "
                  "| speedup / bytes ratio | target >= 0.9 (batch 1) |", "|---|---|---|---|---|---|---|"]
        for q in sorted(result["ratios"], key=lambda q: (q["engine"], q["batch"])):
            met = "-" if q["target_met"] is None else ("met" if q["target_met"] else "not met")
            lines.append(f"| {q['engine']} | {q['batch']} | {q['decode_speedup']:.2f}x | {q['ttft_speedup']:.2f}x | "
                         f"{q['bytes_ratio']:.2f}x | {q['speedup_over_bytes_ratio']:.2f} | {met} |")
    loads = [f"{key} {info['load_s']:.2f} s" for key, info in sorted(result.get("models", {}).items())
             if "load_s" in info]
    if loads:
        lines += ["", "Load time (engine/model, first load in this process): " + ", ".join(loads) + "."]
    for key, reason in result["skipped"].items():
        lines.append(f"\nSkipped {key}: {reason}")
    memory = {
        "isolated": "CPU rows: peak RSS growth of a fresh process that loads only that model and runs one "
                    "generation at the largest batch (shown on that batch's row)",
        "inprocess": "CPU rows: RSS growth at load plus the highest RSS growth during one run, inside the "
                     "benchmark process (memory freed by an earlier load is reused, so later models look smaller)",
        "off": "CPU rows: not measured",
    }[cfg.get("memory", "inprocess")]
    lines += ["", f"Peak memory: {memory}; GPU rows: torch's max allocated bytes in a run. Bytes read per token: "
              "weights read once per step (shared by the batch) plus each sequence's KV cache, divided by the batch."]
    return "\n".join(lines) + "\n"
