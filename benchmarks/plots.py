"""PNG plots of the committed benchmark results (matplotlib, Agg backend).

Reads benchmarks/results/*.json and writes, next to them:

- serving_throughput.png: output tokens/s vs concurrency, one line per serving result file;
- serving_latency.png: TTFT and ITL p50/p90/p99 vs concurrency;
- offline_speedup_vs_keep.png: factored/dense decode speedup vs keep ratio from an offline
  sweep (``bench_offline.py --keep 0.3 0.5 0.7 0.9``), with the bytes-read ratio as the
  memory-bound ideal;
- quality_vs_size.png: perplexity vs kept fraction of linear parameters, from quality_*.json.

A plot whose inputs are absent is skipped with a log line, never drawn empty.

    python benchmarks/plots.py [--results DIR]
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

log = logging.getLogger("plots")
RESULTS = Path(__file__).parent / "results"


def load_json(pattern: str, root: Path) -> dict[str, Any]:
    """name -> parsed JSON for ``root/pattern`` files (unreadable files are skipped with a warning)."""
    out = {}
    for path in sorted(root.glob(pattern)):
        try:
            out[path.stem] = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            log.warning("skipping %s: %s", path, exc)
    return out


def serving_series(data: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Serving files that hold a concurrency sweep: label -> rows sorted by concurrency."""
    out = {}
    for name, d in data.items():
        rows = [r for r in d.get("results", []) if isinstance(r, dict) and "max_concurrency" in r
                and "output_throughput" in r]
        if rows:
            out[d.get("tag", name.removeprefix("serving_"))] = sorted(rows, key=lambda r: r["max_concurrency"])
    return out


def save(fig: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)
    log.info("wrote %s", path)


def plot_serving(series: dict[str, list[dict[str, Any]]], out: Path) -> list[Path]:
    if not series:
        log.info("no serving sweep results; skipping the serving plots")
        return []
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, rows in series.items():
        ax.plot([r["max_concurrency"] for r in rows], [r["output_throughput"] for r in rows], marker="o", label=label)
    ax.set(xlabel="concurrent requests", ylabel="output tokens/s", title="Served throughput vs concurrency")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, out / "serving_throughput.png")

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    styles = {"p50": "-", "p90": "--", "p99": ":"}
    for ax, metric, title in ((axes[0], "ttft", "time to first token"), (axes[1], "itl", "inter-token latency")):
        for i, (label, rows) in enumerate(series.items()):
            color = f"C{i}"
            for p, style in styles.items():
                key = f"{p}_{metric}_ms"
                if all(key in r for r in rows):
                    ax.plot([r["max_concurrency"] for r in rows], [r[key] for r in rows], style, marker="o",
                            color=color, label=f"{label} {p}")
        ax.set(xlabel="concurrent requests", ylabel="ms", title=title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save(fig, out / "serving_latency.png")
    return [out / "serving_throughput.png", out / "serving_latency.png"]


def sweep_points(sweep: dict[str, Any], engine: str) -> dict[int, list[tuple[float, float, float]]]:
    """batch -> [(keep, decode speedup, bytes-read ratio)] sorted by keep, for one engine of an offline sweep."""
    out: dict[int, list[tuple[float, float, float]]] = {}
    for run in sweep.get("runs", []):
        for q in run.get("ratios", []):
            if q["engine"] == engine:
                out.setdefault(q["batch"], []).append((run["keep"], q["decode_speedup"], q["bytes_ratio"]))
    return {b: sorted(v) for b, v in out.items()}


def plot_sweep(sweeps: dict[str, Any], out: Path) -> list[Path]:
    sweeps = {k: v for k, v in sweeps.items() if v.get("bench") == "offline-sweep"}
    if not sweeps:
        log.info("no offline keep-ratio sweep; skipping the speedup plot")
        return []
    fig, ax = plt.subplots(figsize=(6, 4))
    i = 0
    for name, sweep in sweeps.items():
        engines = sorted({q["engine"] for run in sweep["runs"] for q in run.get("ratios", [])})
        for engine in engines:
            for batch, pts in sorted(sweep_points(sweep, engine).items()):
                keeps = [p[0] for p in pts]
                ax.plot(keeps, [p[1] for p in pts], marker="o", color=f"C{i}", label=f"{engine} batch {batch}")
                ax.plot(keeps, [p[2] for p in pts], ":", color=f"C{i}", label=f"bytes-read ratio (batch {batch})")
                i += 1
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set(xlabel="keep ratio (fraction of linear-layer parameters)", ylabel="factored / dense decode speed",
           title="Decode speedup vs keep ratio (plain SVD ranks)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save(fig, out / "offline_speedup_vs_keep.png")
    return [out / "offline_speedup_vs_keep.png"]


def quality_points(data: dict[str, Any]) -> dict[str, list[tuple[float, float]]]:
    """method -> [(kept fraction of linear params, perplexity)] from quality files' ``rows``; dense at 1.0."""
    out: dict[str, list[tuple[float, float]]] = {}
    for d in data.values():
        for row in d.get("rows", []) if isinstance(d, dict) else []:
            ppl = next((v for k, v in row.items() if "ppl" in k and isinstance(v, (int, float))), None)
            size = row.get("linear_kept_actual") or row.get("keep_linear")
            if row.get("method") == "dense":
                size = 1.0
            if ppl is not None and isinstance(size, (int, float)):
                out.setdefault(str(row["method"]), []).append((float(size), float(ppl)))
    return {m: sorted(set(v)) for m, v in out.items()}


def plot_quality(points: dict[str, list[tuple[float, float]]], out: Path) -> list[Path]:
    if not points:
        log.info("no quality_*.json with perplexity rows; skipping the quality plot")
        return []
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, pts in sorted(points.items()):
        xs = [p[0] for p in pts]
        line = "-" if len(set(xs)) == len(xs) else "none"  # several runs at one size (other allocations): points only
        ax.plot(xs, [p[1] for p in pts], marker="o", linestyle=line, label=method)
    ax.set_yscale("log")
    ax.set(xlabel="kept fraction of linear-layer parameters", ylabel="WikiText-2 perplexity (log)",
           title="Quality vs size")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    save(fig, out / "quality_vs_size.png")
    return [out / "quality_vs_size.png"]


def make_plots(root: Path) -> list[Path]:
    """Draw every plot whose inputs exist under ``root``; return the written files."""
    written = plot_serving(serving_series(load_json("serving_*.json", root)), root)
    written += plot_sweep(load_json("offline_*.json", root), root)
    written += plot_quality(quality_points(load_json("quality_*.json", root)), root)
    return written


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    written = make_plots(args.results)
    print(json.dumps({"plots": [str(p.name) for p in written]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
