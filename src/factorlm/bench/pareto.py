"""Pareto sweep building blocks: a compression recipe per keep ratio, keyed by a content hash so that
compressed checkpoints and per-point scores are cached and a rerun resumes where it stopped.

Orchestration (compress, score, time engines, table, plot) lives in ``factorlm.bench.pareto_run``
(``factorlm bench pareto``, ``benchmarks/bench_pareto.py``); this module holds the pure parts: recipe
validation, hashing, the compress command line, and the score cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

DEFAULT_KEEPS = (0.95, 0.9, 0.8, 0.7, 0.6, 0.5)
DEFAULT_RECIPE: dict[str, Any] = {"method": "saes", "allocation": "mgaa", "calib": "sample",
                                  "calib_samples": 32, "calib_len": 512, "finetune_steps": 0}
_TYPES: dict[str, type] = {"method": str, "allocation": str, "calib": str, "calib_samples": int,
                           "calib_len": int, "finetune_steps": int}


def validate_recipe(recipe: dict[str, Any], source: str = "recipe") -> dict[str, Any]:
    """Defaults filled in; an unknown key or a wrong type names the key and ``source``."""
    out = dict(DEFAULT_RECIPE)
    for key, value in recipe.items():
        if key not in _TYPES:
            raise ValueError(f"{source}: unknown key {key!r} (known: {', '.join(sorted(_TYPES))})")
        if not isinstance(value, _TYPES[key]) or isinstance(value, bool):
            raise ValueError(f"{source}: {key!r} must be {_TYPES[key].__name__}, got {type(value).__name__}")
        out[key] = value
    return out


def recipe_hash(recipe: dict[str, Any], keep: float) -> str:
    """Stable 12-hex key of one operating point (recipe + keep ratio)."""
    blob = json.dumps({"recipe": validate_recipe(recipe), "keep": round(keep, 6)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def compress_args(recipe: dict[str, Any], keep: float, output: Path, model: str = "sample") -> list[str]:
    """``factorlm compress`` arguments for one point (``calib``: 'sample' or a text file)."""
    r = validate_recipe(recipe)
    args = ["compress", model, "-o", str(output), "--method", r["method"], "--allocation", r["allocation"],
            "--keep", str(keep), "--calib", r["calib"], "--calib-samples", str(r["calib_samples"]),
            "--calib-len", str(r["calib_len"])]
    if r["finetune_steps"]:
        raise ValueError("finetune_steps > 0: run 'factorlm finetune' on the checkpoint and pass it with --checkpoint")
    return args


def score_key(parts: dict[str, Any]) -> str:
    """Stable 16-hex key of one cached measurement (model fingerprint + the settings it was made with)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_score(cache: Path, key: str) -> dict[str, Any] | None:
    path = cache / f"{key}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def save_score(cache: Path, key: str, score: dict[str, Any]) -> Path:
    """Atomic write of one point's scores."""
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"{key}.json"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(score, indent=2, sort_keys=True))
    os.replace(tmp, path)
    return path
