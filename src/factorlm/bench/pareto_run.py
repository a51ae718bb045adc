"""Pareto sweep: quality and decode speed of several factored checkpoints against their dense model.

For every point (a factored checkpoint, given or compressed here through ``factorlm compress``):
WikiText-2 perplexity, zero-shot average, weight bytes, and decode tokens/s per engine and batch
from one ``run_offline`` pass that interleaves that checkpoint with the dense model, so every
speedup is a ratio from one run. Quality scores and speed results are cached per model
fingerprint and settings, so a rerun resumes where a killed one stopped. ``onnx-int8`` is an
engine registered here: ONNX Runtime on a weight-only int8 export (exported once, cached); a
checkpoint already quantized (int8/int4 factors) is not quantized again: its own stored codes
run with MatMulNBits accuracy level 4 (int8 activations), as the dense int8 export does.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .engines import OnnxRunner, export_cache_dir, folder_fingerprint
from .footprint import ModelFootprint
from .offline import display_path, run_offline
from .pareto import compress_args, load_score, recipe_hash, save_score, score_key, validate_recipe
from .runner import BenchConfig, EngineSpec, EngineUnavailable, register_engine

log = logging.getLogger(__name__)


def load_onnx_int8(model_dir: Path, variant: str, config: BenchConfig) -> OnnxRunner:
    """ONNX Runtime on the weight-only int8 export of ``model_dir`` (exported once into the cache), or on
    its stored codes at accuracy level 4 when the checkpoint is quantized already."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        raise EngineUnavailable(f"onnxruntime is not installed ({exc}); install the 'onnx' extra") from exc
    from ..exporters.onnx import export_onnx
    from ..runtime.format import read_factored_config

    out = export_cache_dir(model_dir, "-int8")
    if not (out / "factorlm_onnx.json").is_file():
        block = read_factored_config(model_dir)
        if block is not None and block.quantized:
            log.info("exporting %s's stored %d-bit codes at accuracy level 4 to %s", model_dir, block.bits, out)
            export_onnx(model_dir, out, accuracy_level=4, overwrite=True, threads=config.threads)
        else:
            log.info("exporting %s to int8 ONNX at %s", model_dir, out)
            export_onnx(model_dir, out, int8=True, overwrite=True, threads=config.threads)
    return OnnxRunner(out, config)


register_engine(EngineSpec("onnx-int8", load_onnx_int8, description="ONNX Runtime, weight-only int8 export"))


ZEROSHOT_TASKS = ("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "boolq")


@dataclass
class ParetoConfig:
    """What one sweep measures; ``speed`` is the offline benchmark's configuration for every point."""

    text: Path
    ppl_tokens: int = 49152
    ppl_window: int = 2048
    zeroshot_limit: int = 200
    tasks: tuple[str, ...] = ZEROSHOT_TASKS
    speed: BenchConfig = field(default_factory=lambda: BenchConfig(engines=["torch", "onnx", "onnx-int8"],
                                                                   batches=[1, 8], memory="off", bandwidth_mib=0))
    cache: Path | None = None
    progress: bool = True


def compress_point(keep: float, recipe: dict[str, Any], ckpt_root: Path, model: str = "sample") -> Path:
    """The checkpoint for (recipe, keep): cached by recipe hash, else written by ``factorlm compress``."""
    out = ckpt_root / f"keep{keep:g}-{recipe_hash(recipe, keep)}"
    if (out / "config.json").is_file():
        return out
    cmd = [sys.executable, "-m", "factorlm", *compress_args(validate_recipe(recipe), keep, out, model)]
    log.info("compressing: %s", " ".join(cmd))
    subprocess.run(cmd, check=True)
    return out


def quality(path: Path, tokenizer_dir: Path, cfg: ParetoConfig) -> dict[str, Any]:
    """Perplexity and zero-shot scores of one model folder (cached by fingerprint and settings)."""
    import torch

    from ..eval.perplexity import perplexity, read_text
    from ..eval.zeroshot import evaluate_zeroshot
    from ..runtime.checkpoint import load_model, load_tokenizer

    key = score_key({"kind": "quality", "model": folder_fingerprint(path), "text": str(cfg.text),
                     "ppl_tokens": cfg.ppl_tokens, "window": cfg.ppl_window, "limit": cfg.zeroshot_limit,
                     "tasks": list(cfg.tasks)})
    if cfg.cache and (hit := load_score(cfg.cache, key)):
        log.info("quality of %s from cache", path)
        return hit
    torch.set_num_threads(cfg.speed.threads)
    model, tok = load_model(path), load_tokenizer(tokenizer_dir)
    t0 = time.perf_counter()
    ppl = perplexity(model, tok, read_text(cfg.text), window=cfg.ppl_window, max_tokens=cfg.ppl_tokens,
                     progress=cfg.progress)
    out: dict[str, Any] = {"ppl": ppl.ppl, "ppl_tokens_scored": ppl.tokens_scored, "ppl_s": time.perf_counter() - t0}
    if cfg.tasks and cfg.zeroshot_limit > 0:
        t0 = time.perf_counter()
        zs = evaluate_zeroshot(model, tok, list(cfg.tasks), limit=cfg.zeroshot_limit, progress=cfg.progress)
        out.update({"zeroshot_average": zs["average"], "zeroshot_s": time.perf_counter() - t0,
                    "zeroshot_tasks": {k: v["acc"] for k, v in zs["tasks"].items()}})
    del model
    if cfg.cache:
        save_score(cfg.cache, key, out)
    return out


def _graph_revision() -> int:
    from ..exporters.onnx.export import GRAPH_REVISION

    return GRAPH_REVISION


def speed(dense: Path, factored: Path, cfg: ParetoConfig) -> dict[str, Any]:
    """One interleaved ``run_offline`` pass of dense and ``factored`` (cached by both fingerprints and settings)."""
    s = cfg.speed
    key = score_key({"kind": "speed", "dense": folder_fingerprint(dense), "factored": folder_fingerprint(factored),
                     "engines": s.engines, "batches": s.batches, "prompt": s.prompt_tokens, "new": s.new_tokens,
                     "repeats": s.repeats, "threads": s.threads, "gguf": str(s.gguf), "onnx_graph": _graph_revision()})
    if cfg.cache and (hit := load_score(cfg.cache, key)):
        log.info("speed of %s from cache", factored)
        return hit
    result = run_offline(dense, factored, s, progress=cfg.progress)
    if cfg.cache:
        save_score(cfg.cache, key, result)
    return result


def _cells(result: dict[str, Any], model: str) -> dict[str, dict[str, float]]:
    """``engine/bbatch`` -> decode tok/s (and the same-engine factored/dense speedup for factored rows)."""
    ratios = {(q["engine"], q["batch"]): q["decode_speedup"] for q in result["ratios"]}
    out = {}
    for r in result["results"]:
        if r["model"] != model:
            continue
        cell = {"decode_tok_s": r["decode_tok_s"], "weight_bytes": r["weight_bytes"]}
        if model == "factored" and (r["engine"], r["batch"]) in ratios:
            cell["speedup"] = ratios[(r["engine"], r["batch"])]
        out[f"{r['engine']}/b{r['batch']}"] = cell
    return out


SWEEP_MODELS = ("dense", "factored")


def reference_rows(runs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """A row per model that is neither dense nor factored (a peer such as llama.cpp on a GGUF), timed in
    every point's run: decode tok/s per engine/batch is the median over those runs. No perplexity: the
    harness scores only torch-loadable folders."""
    import statistics

    samples: dict[str, dict[str, list[float]]] = {}
    weight: dict[str, int] = {}
    for result in runs.values():
        for r in result["results"]:
            if r["model"] in SWEEP_MODELS:
                continue
            samples.setdefault(r["model"], {}).setdefault(f"{r['engine']}/b{r['batch']}", []).append(r["decode_tok_s"])
            weight[r["model"]] = r["weight_bytes"]
    return [{"name": model, "kind": "reference", "weight_bytes": weight[model], "ppl": None,
             "engines": {k: {"decode_tok_s": statistics.median(v), "runs": len(v)} for k, v in cells.items()}}
            for model, cells in sorted(samples.items())]


def run_pareto(dense: Path, points: dict[str, Path], cfg: ParetoConfig) -> dict[str, Any]:
    """Measure every point and the dense reference; returns the JSON-ready sweep."""
    if not points:
        raise ValueError("no factored checkpoint to measure: pass --checkpoint NAME=DIR or --keep")
    for name, path in points.items():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"checkpoint {name}: {path}/config.json not found")
    if not cfg.text.is_file():
        raise FileNotFoundError(f"{cfg.text}: perplexity text not found")
    load_start = os.getloadavg()
    dense_fp = ModelFootprint.from_folder(dense)
    rows: list[dict[str, Any]] = [{"name": "dense", "path": display_path(dense), "kind": "dense",
                                   "weight_bytes": dense_fp.weight_bytes(4), **quality(dense, dense, cfg)}]
    dense_speed: dict[str, list[float]] = {}
    runs = {}
    for name, path in points.items():
        q = quality(path, dense, cfg)
        result = speed(dense, path, cfg)
        runs[name] = result
        wb = ModelFootprint.from_folder(path).weight_bytes(4)
        rows.append({"name": name, "path": display_path(path), "kind": "factored", "weight_bytes": wb,
                     "bytes_ratio": rows[0]["weight_bytes"] / wb, **q, "engines": _cells(result, "factored")})
        for key, cell in _cells(result, "dense").items():
            dense_speed.setdefault(key, []).append(cell["decode_tok_s"])
    import statistics

    rows[0]["engines"] = {k: {"decode_tok_s": statistics.median(v), "runs": len(v)} for k, v in dense_speed.items()}
    for ref in reference_rows(runs):
        ref["bytes_ratio"] = rows[0]["weight_bytes"] / ref["weight_bytes"]
        rows.append(ref)
    skipped = {k: v for r in runs.values() for k, v in r.get("skipped", {}).items()}
    return {"bench": "pareto", "dense": display_path(dense), "rows": rows, "skipped": skipped,
            "settings": {"ppl_tokens": cfg.ppl_tokens, "ppl_window": cfg.ppl_window, "text": cfg.text.name,
                         "zeroshot_limit": cfg.zeroshot_limit, "tasks": list(cfg.tasks),
                         "engines": cfg.speed.engines, "batches": cfg.speed.batches,
                         "prompt_tokens": cfg.speed.prompt_tokens, "new_tokens": cfg.speed.new_tokens,
                         "repeats": cfg.speed.repeats, "threads": cfg.speed.threads},
            "machine": {"cpu_count": os.cpu_count(), "loadavg_start": [round(x, 2) for x in load_start],
                        "loadavg_end": [round(x, 2) for x in os.getloadavg()]},
            "runs": runs}


def llamacpp_reference() -> tuple[Path | None, str]:
    """(GGUF path, '') when llama.cpp can run here, else (None, why not)."""
    try:
        from ..sample_model import find_gguf
        from .llamacpp_c import find_module

        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            find_module()
        return find_gguf(), ""
    except (EngineUnavailable, Exception) as exc:  # any failure to locate it means: not available here
        return None, str(exc)


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def format_markdown(sweep: dict[str, Any], command: str = "", llamacpp_note: str = "") -> str:
    """One table: a row per point (dense first), quality, bytes, and decode tok/s with speedups per engine/batch."""
    st, m, rows = sweep["settings"], sweep["machine"], sweep["rows"]
    cells = sorted({k for r in rows for k in r.get("engines", {})},
                   key=lambda k: (k.split("/b")[0], int(k.split("/b")[1])))
    dense_ppl = rows[0]["ppl"]
    lines = ["# Pareto sweep: quality and decode speed per operating point", ""]
    if command:
        lines += [f"`{command}`", ""]
    zs = (f"average acc over {len(st['tasks'])} tasks ({', '.join(st['tasks'])}), {st['zeroshot_limit']} rows each"
          if st["zeroshot_limit"] and st["tasks"] else "not run")
    lines += [f"Perplexity: first {st['ppl_tokens']} tokens of {st['text']}, windows of {st['ppl_window']} (torch fp32). "
              f"Zero-shot: {zs}. Decode: prompt {st['prompt_tokens']} tokens, {st['new_tokens']} greedy new tokens, median of "
              f"{st['repeats']} interleaved rounds, {st['threads']} thread(s); each point timed in its own run with the dense "
              "model interleaved, speedup = factored/dense on the same engine and batch in that run; the dense row's "
              f"tok/s is the median over those runs. Machine: {m['cpu_count']} CPUs, load average "
              f"{m['loadavg_start'][0]} at start, {m['loadavg_end'][0]} at end.", ""]
    head = "| point | weight MB | bytes ratio | ppl | ppl / dense | zero-shot avg | " + " | ".join(
        f"{c} tok/s (speedup)" for c in cells) + " |"
    lines += [head, "|" + "---|" * (6 + len(cells))]
    for r in rows:
        eng = r.get("engines", {})
        vals = []
        for c in cells:
            cell = eng.get(c)
            if cell is None:
                vals.append("-")
            else:
                sp = f" ({cell['speedup']:.2f}x)" if "speedup" in cell else ""
                vals.append(f"{cell['decode_tok_s']:.1f}{sp}")
        lines.append(f"| {r['name']} | {r['weight_bytes'] / 1e6:.1f} | {_fmt(r.get('bytes_ratio', 1.0), '.2f')}x | "
                     f"{_fmt(r['ppl'], '.2f')} | {'-' if r['ppl'] is None else format(r['ppl'] / dense_ppl, '.2f') + 'x'} | "
                     f"{_fmt(r.get('zeroshot_average'), '.4f')} | "
                     + " | ".join(vals) + " |")
    lines += ["", "Reference rows: dense fp32 is the `torch` and `onnx` columns of the dense row; dense ONNX int8 is "
              "its `onnx-int8` column (its perplexity is not measured here; the int8 columns of factored rows show "
              "the torch fp32 perplexity of that checkpoint)."]
    lines.append("llama.cpp (sample Q4_1 GGUF): " + (llamacpp_note or "the `gguf-q4_1` row, llamacpp columns (batch 1 "
                 "only); its tok/s is the median over the points' runs and its quality is not scored here (the dense "
                 "model is that GGUF dequantized to fp32)") + ".")
    for key, reason in sweep.get("skipped", {}).items():
        lines.append(f"\nSkipped {key}: {reason}")
    return "\n".join(lines) + "\n"


def plot_pareto(sweep: dict[str, Any], out: Path) -> Path:
    """Perplexity against batch-1 decode speedup (factored/dense, same engine), one line per engine."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in sweep["rows"] if r.get("kind") in ("dense", "factored")]
    engines = sorted({k.split("/b")[0] for r in rows for k in r.get("engines", {})})
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for engine in engines:
        pts = [(1.0, rows[0]["ppl"])] + [(r["engines"][f"{engine}/b1"]["speedup"], r["ppl"]) for r in rows[1:]
                                         if "speedup" in r.get("engines", {}).get(f"{engine}/b1", {})]
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=engine)
    for r in rows[1:]:
        cell = r.get("engines", {}).get(f"{engines[0]}/b1", {}) if engines else {}
        if "speedup" in cell:
            ax.annotate(r["name"], (cell["speedup"], r["ppl"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("batch-1 decode speedup over dense (same engine)")
    ax.set_ylabel("WikiText-2 perplexity (torch fp32)")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp{out.suffix}")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, out)
    return out
