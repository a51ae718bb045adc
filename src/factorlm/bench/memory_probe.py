"""Peak memory of one model in a fresh process.

Inside the benchmark process, RSS growth cannot be attributed to one model: memory a
previous load freed is reused by the next one, so the second model looks cheaper than it
is. A spawned child that loads only that model and runs one generation gives a clean
number: its RSS high-water mark minus its resident set just before the load.
"""

from __future__ import annotations

import logging
import multiprocessing
import queue as queue_mod
from pathlib import Path
from typing import Any

from .footprint import peak_rss_bytes, reset_peak_rss, rss_bytes
from .runner import BenchConfig, get_engine

log = logging.getLogger(__name__)


def _child(engine: str, variant: str, path: Path, config: BenchConfig, prompts: list[list[int]],
           new_tokens: int, out: Any) -> None:
    try:
        spec = get_engine(engine)
        reset_peak_rss()
        base = rss_bytes()
        runner = spec.load(path, variant, config)
        runner.run(prompts, new_tokens)
        peak = peak_rss_bytes()
        out.put(("ok", None if peak is None or base is None else peak - base))
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which logs and records no number
        out.put(("error", f"{type(exc).__name__}: {exc}"))


def isolated_peak_rss(engine: str, variant: str, path: Path, config: BenchConfig, prompts: list[list[int]],
                      new_tokens: int, timeout_s: float = 1800.0) -> int | None:
    """Peak RSS growth (bytes) of loading ``path`` in ``engine`` and one generation, in a spawned process.

    Returns None (and logs why) when the child fails, times out, or /proc is unavailable.
    """
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=_child, args=(engine, variant, path, config, prompts, new_tokens, out), daemon=True)
    proc.start()
    try:
        status, value = out.get(timeout=timeout_s)
    except queue_mod.Empty:
        status, value = "error", f"no answer within {timeout_s:.0f} s"
    proc.join(timeout=60)
    if proc.is_alive():
        proc.terminate()
    if status != "ok":
        log.warning("memory probe of %s/%s failed: %s", engine, variant, value)
        return None
    return value
