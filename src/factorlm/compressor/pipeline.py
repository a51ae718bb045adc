"""Compression orchestration: model folder in, factored checkpoint folder out.

The steps, each in its own module: calibration windows (``calib_sources``), the budget
(``planning``), the spectra pass and the block-wise two-stream factorization
(``blockwise`` on top of ``streaming``), the methods (``methods``), the allocators
(``allocation``) and optional block hooks (``hooks``). Nothing is written until the whole
model is compressed and the hooks have finished, and the save itself is atomic, so a failed
or interrupted run leaves no output folder.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..runtime.arch import compressible_linears
from ..runtime.checkpoint import (
    DEFAULT_MAX_SHARD_SIZE,
    load_model,
    load_tokenizer,
    safetensors_files,
    save_factored,
)
from ..runtime.factored_linear import CorrectedLinear, FactoredLinear
from ..runtime.format import FactoredConfig, FactorlmError
from ..runtime.safetensors_header import read_headers
from .allocation import AraConfig, get_allocator
from .blockwise import check_finite_weight, compress_blocks, spectra_pass, weight_spectra
from .budget import count_params, kept_params, shapes_of
from .hooks import BlockHook
from .methods import METHODS, MethodOptions, get_method
from .planning import linear_budget, plan_ranks
from .recipe import RECIPE_FILE, REPORT_FILE, CompressionRecipe
from .streaming import capture_block_inputs, split_batches

logger = logging.getLogger(__name__)

DEFAULT_ALLOCATION = CompressionRecipe.allocation
# ARA trains through the whole model (forward and backward per step): a few short rows keep it
# to minutes on a CPU (about 20 s per 256-token step for the 135M sample model on a busy 2-core machine)
ARA_ROWS = 4
ARA_MAX_LEN = 256


def needs_calibration(recipe: CompressionRecipe, hooks: Sequence[BlockHook] = ()) -> bool:
    """Whether the run needs calibration text, as the method and allocator registries declare.

    Calibration is needed by a calibrated method, by an allocator that needs more than
    spectra (importance, factors, batches: see ``allocation.NEEDS``), and by block hooks
    (correctors, given as hooks or as the recipe's ``corrector`` section). Spectra alone come
    from the weights when the method does not calibrate.
    """
    return (get_method(recipe.method).needs_calibration or bool(hooks) or recipe.corrector is not None
            or get_allocator(recipe.allocation).needs_calibration)


_needs_calibration = needs_calibration  # the name older callers import


def compress_model(model: nn.Module, recipe: CompressionRecipe, calib: torch.Tensor | None, *,
                   hooks: Sequence[BlockHook] = (), progress: bool = True) -> dict[str, Any]:
    """Compress ``model`` in place following ``recipe``; returns the report (rows and totals).

    ``calib`` holds calibration token ids [samples, seq_len] (``None`` only for plain svd with
    a uniform or weight-spectrum allocation and no hooks). Hooks' ``finalize`` is called here,
    after the last block; its fields go under ``totals.hooks``.
    """
    method = get_method(recipe.method)
    min_rank = recipe.rank_multiple if recipe.min_rank is None else recipe.min_rank
    if recipe.rank_multiple < 1 or min_rank < 1:
        raise FactorlmError(f"--rank-multiple and --min-rank must be >= 1, got {recipe.rank_multiple}, {min_rank}")
    device = torch.device(recipe.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FactorlmError("--device cuda was given but no CUDA device is available")
    opts = MethodOptions(damping=recipe.damping, beta=recipe.beta, aces=recipe.aces)
    linears = compressible_linears(model)
    for name, module in linears.items():
        check_finite_weight(name, module.weight)
    shapes = shapes_of(linears)
    params_before = count_params(model)
    reserved = sum(int(h.reserved_params({n: (s.out_features, s.in_features) for n, s in shapes.items()}))
                   for h in hooks)
    keep = None if recipe.reduction is not None else recipe.keep
    budget = linear_budget(shapes, params_before, keep=keep, reduction=recipe.reduction, reserved=reserved)
    captured = None
    needed = needs_calibration(recipe, hooks)
    needs = get_allocator(recipe.allocation).needs
    if calib is not None and needed:
        captured = capture_block_inputs(model, split_batches(calib, recipe.batch_size))
    elif needed:
        raise FactorlmError(f"method {recipe.method!r} with allocation {recipe.allocation!r} needs calibration data")
    else:
        calib = None  # plain svd with a weight-only allocation: block forwards on calibration text would be wasted

    alloc_started = time.perf_counter()
    spectra = importance = factors = None
    spectra_time = 0.0
    if "spectra" in needs:
        if captured is None:
            spectra = weight_spectra(model)
        else:
            res = spectra_pass(model, captured, method, opts, importance="importance" in needs,
                               factors="factors" in needs, device=device, progress=progress)
            spectra, importance, factors, spectra_time = res.spectra, res.importance, res.factors, res.time_s
    ara_batches = None
    if "batches" in needs and calib is not None:
        ara_batches = split_batches(calib[:ARA_ROWS, :ARA_MAX_LEN], 1)
    plan, alloc_info = plan_ranks(recipe.allocation, shapes, budget, recipe.rank_multiple, min_rank,
                                  spectra=spectra, importance=importance, model=model, factors=factors,
                                  batches=ara_batches, ara=AraConfig(seed=recipe.seed), progress=progress)
    del factors
    alloc_time = time.perf_counter() - alloc_started

    factor_started = time.perf_counter()
    rows = compress_blocks(model, captured, plan, method, opts, hooks=hooks, device=device, progress=progress,
                           sequential=recipe.sequential)
    hook_totals: dict[str, Any] = {}
    for hook in hooks:
        hook_totals.update(hook.finalize(model, calib) or {})
    factor_time = time.perf_counter() - factor_started

    linear_after = kept_params(shapes, plan) if not hooks else linear_weight_params(model)
    if hooks:
        sync_rows_with_model(rows, model)
    totals: dict[str, Any] = {
        "method": recipe.method,
        "allocation": recipe.allocation,
        "linear_params_before": budget.linear_total,
        "linear_params_after": linear_after,
        "linear_keep": linear_after / budget.linear_total,
        "model_params_before": params_before,
        "model_params_after": count_params(model),
        "factored_modules": sum(r is not None for r in plan.values()),
        "dense_modules": sum(r is None for r in plan.values()),
        "budget": budget.to_dict(),
        "calibration_tokens": int(calib.numel()) if calib is not None else 0,
        "spectra_time_s": round(spectra_time, 2),
        "allocation_time_s": round(alloc_time, 2),
        "factorize_time_s": round(factor_time, 2),
        **alloc_info,
    }
    totals["model_keep"] = totals["model_params_after"] / totals["model_params_before"]
    errors = [r["rel_output_error"] for r in rows if r.get("rel_output_error") is not None and not r["dense"]]
    if errors:
        totals["mean_rel_output_error"] = round(sum(errors) / len(errors), 6)
    if hooks:
        totals["hooks"] = hook_totals
    return {"method": recipe.method, "allocation": recipe.allocation, "layers": rows, "totals": totals}


def linear_weight_params(model: nn.Module) -> int:
    """Weight parameters of the compressible linears as they are now (hooks may have added rank)."""
    total = 0
    for module in compressible_linears(model).values():
        if isinstance(module, FactoredLinear):
            total += module.weight_params()  # corrector A and B included when kept separate
        else:
            total += module.weight.numel()
    return total


def sync_rows_with_model(rows: list[dict[str, Any]], model: nn.Module) -> None:
    """After hooks changed ranks (correctors), report the saved (folded) rank and parameters per row."""
    modules = compressible_linears(model)
    for row in rows:
        module = modules.get(row["module"])
        if not isinstance(module, FactoredLinear):
            continue
        saved = module.rank + (module.corrector_rank if isinstance(module, CorrectedLinear) else 0)
        if row.get("rank") != saved:
            row["saved_rank"] = saved  # the rank once folded
            row["params_after"] = module.weight_params()


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_dtype(name: str) -> torch.dtype:
    """``bf16``/``fp16``/``fp32`` (or the torch names) as a torch dtype; anything else is refused."""
    aliases = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}
    key = aliases.get(name, name)
    if key not in DTYPES:
        raise FactorlmError(f"--dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[key]


def source_dtype(model_path: str | Path) -> torch.dtype:
    """The dtype of a dense folder's floating-point weights, from the safetensors headers (no data read)."""
    headers = read_headers(safetensors_files(model_path))
    counts = Counter(h.dtype for h in headers.values() if h.is_floating)
    if not counts:
        raise FactorlmError(f"{model_path}: no floating-point weights found in the safetensors files")
    found = [name for name, _ in counts.most_common()]
    if len(found) > 1:
        logger.info("source weights mix dtypes %s; saving in the most common, %s", found, found[0])
    named = getattr(torch, found[0], None)
    if not isinstance(named, torch.dtype) or named not in DTYPES.values():
        raise FactorlmError(f"{model_path}: source dtype {found[0]} is not one of bf16, fp16, fp32; pass --dtype")
    return named


def compress_checkpoint(
    model_path: str | Path, out_dir: str | Path, recipe: CompressionRecipe, *, overwrite: bool = False,
    progress: bool = True, hooks: Sequence[BlockHook] | None = None,
    dtype: str | None = None, max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE, resume: bool = False,
) -> tuple[Path, dict[str, Any]]:
    """Compress a dense model folder (or a cached hub id) into a factored checkpoint, atomically.

    The math runs in fp32 whatever the source; the checkpoint is written in the source's
    dtype (read from its safetensors headers) unless ``dtype`` (``bf16``/``fp16``/``fp32``)
    says otherwise, sharded above ``max_shard_size``.

    Without hooks and ARA the model is never loaded whole: each block is read from the source
    when processed and written out when done (:mod:`.streamed`), and ``resume`` continues a
    killed run of the same recipe from its last finished block. ``hooks`` (see :mod:`.hooks`)
    and ARA need the whole model (end-to-end passes), so they load it in fp32 as before.
    """
    from .source import resolve_source
    from .streamed import compress_streamed, supports_streaming

    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FactorlmError(f"{out}: output directory exists; pass --overwrite to replace it")
    get_method(recipe.method)
    model_path = resolve_source(model_path)
    save_dtype = parse_dtype(dtype) if dtype else source_dtype(model_path)
    hooks = list(hooks or [])
    streamed = supports_streaming(recipe, hooks)
    if resume and not streamed:
        raise FactorlmError("--resume needs the block-streamed compressor, which block hooks (--corrector) and "
                            "--allocation ara do not use; run without --resume")
    started = time.perf_counter()
    tokenizer = load_tokenizer(model_path)
    calib = None
    source = recipe.calibration_source()
    needed = needs_calibration(recipe, hooks)
    if needed or source:
        from .calib_sources import SAMPLE_SOURCE, calibration_windows

        if not source:
            logger.info("no --calib given; calibrating on the built-in 'sample' text (BoolQ passages)")
            source = SAMPLE_SOURCE
            recipe.calib = source
        calib = calibration_windows(tokenizer, source, recipe.calib_samples, recipe.calib_len, recipe.seed)

    def extra_files(report: dict[str, Any]) -> dict[str, str | bytes]:
        files: dict[str, str | bytes] = {RECIPE_FILE: recipe.to_yaml(), REPORT_FILE: json.dumps(report, indent=2)}
        for hook in hooks:
            files.update(getattr(hook, "extra_files", dict)())
        return files

    if streamed:
        return compress_streamed(model_path, out, recipe, calib, needs_calibration=needed, save_dtype=save_dtype,
                                 max_shard_size=max_shard_size, overwrite=overwrite, progress=progress,
                                 resume=resume, tokenizer=tokenizer, extra_files=extra_files)
    model = load_model(model_path, device="cpu", dtype=torch.float32)
    report = compress_model(model, recipe, calib, hooks=hooks, progress=progress)
    report["totals"]["wall_time_s"] = round(time.perf_counter() - started, 2)
    dense = [row["module"] for row in report["layers"] if row["dense"]]
    path = save_factored(
        model, out, tokenizer=tokenizer, config=FactoredConfig(ranks={}, dense=dense),
        extra_files=extra_files(report), overwrite=overwrite, dtype=save_dtype, max_shard_size=max_shard_size,
    )
    return path, report


__all__ = ["METHODS", "RECIPE_FILE", "REPORT_FILE", "CompressionRecipe", "compress_checkpoint", "compress_model",
           "needs_calibration"]
