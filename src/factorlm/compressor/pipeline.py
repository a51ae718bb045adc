"""Compression orchestration: model folder in, factored checkpoint folder out.

The math lives in small functions elsewhere (``budget``, ``FactoredLinear``); this module
only loads, plans ranks, replaces layers, reports and saves. Nothing is written until the
whole model is compressed, and the save itself is atomic, so an interrupted run leaves no
partial output.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from tqdm.auto import tqdm

from ..runtime.arch import compressible_linears
from ..runtime.checkpoint import load_model, load_tokenizer, save_factored
from ..runtime.factored_linear import FactoredLinear
from ..runtime.format import FactoredConfig, FactorlmError
from .budget import LayerShape, count_params, kept_params, shapes_of, uniform_ranks

logger = logging.getLogger(__name__)

RECIPE_FILE = "factorlm_recipe.yaml"
REPORT_FILE = "factorlm_report.json"


@dataclass
class CompressionRecipe:
    """What the user asked for; saved beside the checkpoint so a run can be repeated."""

    method: str = "svd"
    keep: float = 0.6
    rank_multiple: int = 8
    min_rank: int | None = None
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_yaml(self) -> str:
        return yaml.safe_dump(asdict(self), sort_keys=False)


def relative_error(weight: torch.Tensor, layer: FactoredLinear) -> float:
    """||W - UV||_F / ||W||_F, the weight-space error of a factorization."""
    approx = layer.weight_u.detach().double() @ layer.weight_v.detach().double()
    w = weight.detach().double()
    return float((w - approx).norm() / w.norm().clamp_min(1e-30))


def check_finite(name: str, weight: torch.Tensor) -> None:
    """NaN/Inf in a weight make every factorization meaningless: fail naming the layer."""
    if not torch.isfinite(weight).all():
        raise FactorlmError(f"layer {name!r}: weight contains NaN or Inf")


METHODS = ("svd", "asvd", "svd-llm")


def compress_model_svd(model: nn.Module, recipe: CompressionRecipe, progress: bool = True,
                       calib: torch.Tensor | None = None) -> dict[str, Any]:
    """Plain truncated SVD of every block linear under a uniform keep ratio, in place.

    Returns the report (per-layer rows and totals).
    """
    linears = compressible_linears(model)
    shapes: dict[str, LayerShape] = shapes_of(linears)
    plan = uniform_ranks(shapes, recipe.keep, recipe.rank_multiple, recipe.min_rank)
    params_before = count_params(model)
    stats = None
    if recipe.method != "svd":
        from .calibrated import collect_input_stats
        if calib is None:
            raise FactorlmError(f"method {recipe.method!r} needs calibration data (--calib FILE)")
        stats = collect_input_stats(model, {n: linears[n] for n, r in plan.items() if r is not None}, calib)
    rows: list[dict[str, Any]] = []
    for name in tqdm(plan, desc="factorizing", unit="layer", disable=not progress):
        module = linears[name]
        check_finite(name, module.weight)
        rank = plan[name]
        started = time.perf_counter()
        row: dict[str, Any] = {"module": name, "shape": [shapes[name].out_features, shapes[name].in_features],
                               "params_before": shapes[name].dense_params}
        if rank is None:
            row.update(rank=None, dense=True, params_after=shapes[name].dense_params, rel_weight_error=0.0)
        else:
            if stats is None:
                layer = FactoredLinear.from_linear(module, rank)
            else:
                from .calibrated import factorize_with_stats
                u, v, extra = factorize_with_stats(recipe.method, module.weight, stats[name], rank)
                layer = FactoredLinear.from_factors(u.to(module.weight.dtype), v.to(module.weight.dtype), module.bias)
                row.update(extra)
            row.update(rank=rank, dense=False, params_after=shapes[name].factored_params(rank),
                       rel_weight_error=relative_error(module.weight, layer))
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer)
        row["time_s"] = round(time.perf_counter() - started, 4)
        rows.append(row)
    linear_before = sum(s.dense_params for s in shapes.values())
    linear_after = kept_params(shapes, plan)
    totals = {
        "linear_params_before": linear_before,
        "linear_params_after": linear_after,
        "linear_keep": linear_after / linear_before,
        "model_params_before": params_before,
        "model_params_after": count_params(model),
        "factored_modules": sum(r is not None for r in plan.values()),
        "dense_modules": sum(r is None for r in plan.values()),
    }
    totals["model_keep"] = totals["model_params_after"] / totals["model_params_before"]
    return {"method": recipe.method, "layers": rows, "totals": totals}


def compress_checkpoint(
    model_path: str | Path, out_dir: str | Path, recipe: CompressionRecipe, *, overwrite: bool = False,
    progress: bool = True,
) -> tuple[Path, dict[str, Any]]:
    """Load a dense model folder, compress it, write the factored checkpoint atomically."""
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FactorlmError(f"{out}: output directory exists; pass --overwrite to replace it")
    if recipe.method not in METHODS:
        raise FactorlmError(f"unknown method {recipe.method!r}; available: {', '.join(METHODS)}")
    started = time.perf_counter()
    model = load_model(model_path)
    tokenizer = load_tokenizer(model_path)
    calib = None
    if recipe.method != "svd":
        from .calibrated import calibration_ids
        ex = recipe.extra
        if not ex.get("calib"):
            raise FactorlmError(f"method {recipe.method!r} needs calibration data (--calib FILE)")
        calib = calibration_ids(tokenizer, ex["calib"], int(ex.get("calib_samples", 32)),
                                int(ex.get("calib_len", 512)), int(ex.get("seed", 0)))
    report = compress_model_svd(model, recipe, progress=progress, calib=calib)
    report["totals"]["wall_time_s"] = round(time.perf_counter() - started, 2)
    dense = [row["module"] for row in report["layers"] if row["dense"]]
    path = save_factored(
        model, out, tokenizer=tokenizer, config=FactoredConfig(ranks={}, dense=dense),
        extra_files={RECIPE_FILE: recipe.to_yaml(), REPORT_FILE: json.dumps(report, indent=2)},
        overwrite=overwrite,
    )
    return path, report
