"""The compressor's front door: ``compress(model, out, recipe)`` and the recipe types.

The CLI, the benchmarks and Python users import from here, never from the submodules::

    from factorlm.compressor import CompressionRecipe, compress

    compress("sample", "out/saes-k0.8", CompressionRecipe(method="saes", allocation="mgaa", keep=0.8))
    compress("sample", "out/again", "out/saes-k0.8/factorlm_recipe.yaml")  # replays it, bit for bit

Importing this package is light (no torch): the recipe types are plain data and every other
name is imported on first use, so ``factorlm --help`` stays fast.
"""

from __future__ import annotations

import importlib
import logging
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..runtime.format import FactorlmError
from .recipe import (CORRECTOR_FIELDS, HEAL_FIELDS, RECIPE_FILE, RECIPE_FORMAT_VERSION, REPORT_FILE, CompressionRecipe,
                     load_recipe, recipe_from_dict)

logger = logging.getLogger(__name__)

SAMPLE_ALIAS = "sample"

# name -> submodule, imported on first use (looked up on every access, so the submodule's
# attribute is what callers get, even when a test replaces it)
_LAZY = {
    "compress_checkpoint": "pipeline", "compress_model": "pipeline", "needs_calibration": "pipeline",
    "parse_dtype": "pipeline", "source_dtype": "pipeline",
    "METHODS": "methods", "get_method": "methods", "MethodOptions": "methods",
    "ALLOCATORS": "allocation", "NEEDS": "allocation", "Allocator": "allocation", "get_allocator": "allocation",
    "CorrectorConfig": "corrector_pass", "CorrectorHook": "corrector_pass",
    "FinetuneConfig": "finetune", "finetune_checkpoint": "finetune",
    "calibration_windows": "calib_sources", "write_calibration_text": "calib_sources",
    "format_report": "report", "plot_kept_fraction": "report", "read_report": "report",
    "shapes_of": "budget", "uniform_ranks": "budget",
    "meta_skeleton": "source", "SafetensorsSource": "source",
    "check_scheme": "quantize", "check_source": "quantize", "quantize_checkpoint": "quantize",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def as_recipe(recipe: CompressionRecipe | str | Path, where: str = "recipe") -> CompressionRecipe:
    """A checked copy of ``recipe`` (a recipe, or the path of a recipe YAML file)."""
    if isinstance(recipe, CompressionRecipe):
        return recipe_from_dict(asdict(recipe), where)
    return load_recipe(recipe)


def check_recipe(recipe: CompressionRecipe, where: str = "recipe") -> CompressionRecipe:
    """Fail before any work on what a recipe alone can tell: bad fields, unknown method or allocation."""
    from .allocation import get_allocator
    from .methods import get_method

    checked = as_recipe(recipe, where)
    get_method(checked.method)
    get_allocator(checked.allocation)
    if checked.beta is not None and checked.method != "saes":
        raise FactorlmError(f"{where}: beta applies to method saes only (got method {checked.method})")
    if checked.corrector is not None:
        from .corrector_pass import CorrectorConfig

        CorrectorConfig(**checked.corrector)
    if checked.heal is not None:
        heal_config(checked)
    return checked


def heal_config(recipe: CompressionRecipe) -> Any:
    """The ``FinetuneConfig`` of a recipe's ``heal`` section (None when it has none)."""
    if recipe.heal is None:
        return None
    from .finetune import FinetuneConfig

    fields = {k: v for k, v in recipe.heal.items() if k != "calib"}
    return FinetuneConfig(**fields, device=recipe.device)


def resolve_model(model: str | Path) -> Path:
    """A local model folder, a hub id already in the local cache, or ``sample`` (materialised on demand)."""
    if str(model) == SAMPLE_ALIAS:
        from ..sample_model import materialize_sample_model

        return materialize_sample_model()
    from .source import resolve_source

    return resolve_source(model)


def compress(model: str | Path, out: str | Path, recipe: CompressionRecipe | str | Path, *,
             overwrite: bool = False, progress: bool = True, max_shard_size: str | int | None = None,
             resume: bool = False) -> tuple[Path, dict[str, Any]]:
    """Compress ``model`` (a folder or ``sample``) into ``out`` following ``recipe``; returns (path, report).

    ``recipe`` is a :class:`CompressionRecipe` or the path of a recipe YAML file (such as a
    checkpoint's ``factorlm_recipe.yaml``). The run: block-wise factorization (with the
    recipe's correctors, if any), then, with a ``heal`` section, end-to-end distillation
    against the dense model. The checkpoint's ``factorlm_recipe.yaml`` records every field
    the run used (calibration source and dtype resolved), so replaying it gives the same
    tensors. Nothing is written unless the whole run succeeds (``resume`` continues a killed
    block-streamed run from its last finished block).
    """
    from . import finetune, pipeline
    from .corrector_pass import CorrectorConfig, CorrectorHook

    where = str(recipe) if not isinstance(recipe, CompressionRecipe) else "recipe"
    r = check_recipe(as_recipe(recipe, where), where)
    out = Path(out)
    if out.exists() and not overwrite:
        raise FactorlmError(f"{out}: output directory exists; pass --overwrite to replace it")
    model_path = resolve_model(model)
    if not r.source:
        r.source = str(model)
    if r.dtype is None:  # record the dtype used, so the replay does not depend on the source's
        r.dtype = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[str(pipeline.source_dtype(model_path))
                                                                              .removeprefix("torch.")]
    hooks = [CorrectorHook(CorrectorConfig(**r.corrector))] if r.corrector is not None else []
    shard: dict[str, Any] = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    cfg = heal_config(r)
    if cfg is None:
        return pipeline.compress_checkpoint(model_path, out, r, overwrite=overwrite, progress=progress, hooks=hooks,
                                            dtype=r.dtype, resume=resume, **shard)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.compressed-", dir=out.parent))
    try:
        _, report = pipeline.compress_checkpoint(model_path, stage / "c", r, progress=progress, hooks=hooks,
                                                 dtype=r.dtype, resume=resume, **shard)
        source = r.heal_source() or SAMPLE_ALIAS
        logger.info("healing: %d distillation steps on %s", cfg.steps, source)
        path, heal_report = finetune.finetune_checkpoint(stage / "c", model_path, out, source, cfg,
                                                         overwrite=overwrite, progress=progress)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    report["heal"] = {k: heal_report.get(k) for k in ("held_out_kl_before", "held_out_kl_after", "trained_params",
                                                      "tokens_per_s")}
    return path, report


__all__ = [
    "ALLOCATORS", "CORRECTOR_FIELDS", "HEAL_FIELDS", "METHODS", "NEEDS", "RECIPE_FILE", "RECIPE_FORMAT_VERSION",
    "REPORT_FILE", "Allocator", "CompressionRecipe", "CorrectorConfig", "CorrectorHook", "FinetuneConfig",
    "MethodOptions", "as_recipe", "calibration_windows", "check_recipe", "compress", "compress_checkpoint",
    "compress_model", "finetune_checkpoint", "format_report", "get_allocator", "get_method", "heal_config",
    "load_recipe", "needs_calibration", "parse_dtype", "plot_kept_fraction", "read_report", "recipe_from_dict",
    "SafetensorsSource", "check_scheme", "check_source", "meta_skeleton", "quantize_checkpoint", "resolve_model", "shapes_of", "source_dtype", "uniform_ranks",
    "write_calibration_text",
]
