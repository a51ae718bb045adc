"""Larger-than-RAM compression: one decoder block in memory at a time, finished blocks on disk.

The model is a meta-device skeleton built from ``config.json`` (:func:`.source.meta_skeleton`).
The embeddings are read only for the calibration capture and freed again; each decoder block
is read from the source safetensors in fp32 when it is processed (for the spectra pass of
spectrum allocators too), factorized by the ordinary block-wise code, written at once to
its own file in the checkpoint dtype and sent back to meta. At the end the shards are packed
from those files and the source's other tensors, one tensor at a time
(:mod:`.shard_writer`), each block file removed once its tensors are in a shard, so the disk
holds about the output plus one block, not the output twice. Peak host memory is then about the embeddings (during the capture),
one block, and the calibration activations, whatever the depth of the model.

Everything happens in the save's temporary folder, renamed into place at the end; the
progress recorded there (:mod:`.resume`) lets ``--resume`` continue a killed run from the last
finished block.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from ..runtime.arch import compressible_linears, decoder_layers, get_arch
from ..runtime.checkpoint import _apply_umask, _replace_dir, partial_dir
from ..runtime.format import FactoredConfig, FactorlmError
from .allocation import AraConfig
from .blockwise import compress_blocks, spectra_pass, weight_spectra
from .budget import count_params, kept_params, shapes_of
from .host_memory import trim_host_heap
from .methods import MethodOptions, get_method
from .allocation import get_allocator
from .planning import linear_budget, plan_ranks
from .resume import ResumeState, has_state
from .shard_writer import OutTensor, shard_size_bytes, write_shards
from .source import SafetensorsSource, materialize, meta_skeleton, release
from .streaming import capture_block_inputs, split_batches

logger = logging.getLogger(__name__)


class SourceBlocks:
    """:class:`.blockwise.BlockIO` reading each block from the source, freeing it after use."""

    def __init__(self, model: nn.Module, source: SafetensorsSource) -> None:
        self.model, self.source = model, source
        self.prefix = get_arch(model.config).layers_path

    def load(self, index: int, block: nn.Module) -> None:
        materialize(self.model, f"{self.prefix}.{index}", self.source)

    def release(self, index: int, block: nn.Module) -> None:
        release(block)
        trim_host_heap()  # else glibc keeps each block's freed heap and RSS grows with depth


def supports_streaming(recipe: Any, hooks: list) -> bool:
    """Block hooks and ARA need the whole model at once (end-to-end passes); everything else streams."""
    return not hooks and "factors" not in get_allocator(recipe.allocation).needs


def _module_name(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def _check_recipe(recipe: Any) -> int:
    min_rank = recipe.rank_multiple if recipe.min_rank is None else recipe.min_rank
    if recipe.rank_multiple < 1 or min_rank < 1:
        raise FactorlmError(f"--rank-multiple and --min-rank must be >= 1, got {recipe.rank_multiple}, {min_rank}")
    if torch.device(recipe.device).type == "cuda" and not torch.cuda.is_available():
        raise FactorlmError("--device cuda was given but no CUDA device is available")
    return min_rank


def resume_key(recipe: Any, source: SafetensorsSource, save_dtype: torch.dtype) -> dict[str, Any]:
    """What must match for a run to continue another: the recipe (bar device and the source's
    spelling), the source's tensors and config, and the output dtype."""
    fields = {k: v for k, v in asdict(recipe).items() if k not in ("device", "source")}
    from .. import __version__

    return {"recipe": fields, "source": source.fingerprint(), "dtype": str(save_dtype).removeprefix("torch."),
            "factorlm": __version__}


def compress_streamed(
    root: Path, out: Path, recipe: Any, calib: torch.Tensor | None, *, needs_calibration: bool,
    save_dtype: torch.dtype, max_shard_size: str | int, overwrite: bool, progress: bool, resume: bool,
    tokenizer: Any, extra_files: Callable[[dict[str, Any]], dict[str, str | bytes]],
) -> tuple[Path, dict[str, Any]]:
    """Compress the dense folder ``root`` into ``out`` block by block (see the module docstring).

    ``extra_files(report)`` gives the files written beside the weights (recipe, report).
    """
    started = time.perf_counter()
    get_method(recipe.method)
    min_rank = _check_recipe(recipe)
    shard_size_bytes(max_shard_size)
    source = SafetensorsSource(root)
    model = meta_skeleton(root)
    shapes = shapes_of(compressible_linears(model))
    params_before = count_params(model)
    keep = None if recipe.reduction is not None else recipe.keep
    budget = linear_budget(shapes, params_before, keep=keep, reduction=recipe.reduction, reserved=0)

    tmp = partial_dir(out)
    key = resume_key(recipe, source, save_dtype)
    if resume and has_state(tmp):
        state = ResumeState.open(tmp, key, shard_size_bytes(max_shard_size))
        logger.info("resuming %s: %d of %d blocks already done", out, state.start, len(decoder_layers(model)))
    else:
        if resume:
            logger.info("--resume: no interrupted run of %s found, starting from the first block", out)
        out.parent.mkdir(parents=True, exist_ok=True)
        state = ResumeState.fresh(tmp, key)
    try:
        return _run(model, source, state, out, recipe, calib, needs_calibration, save_dtype, max_shard_size,
                    overwrite, progress, tokenizer, extra_files, budget, shapes, params_before, min_rank, started)
    except FactorlmError:
        # bad input or a bad state: resuming would fail the same way, so leave nothing behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _run(model: nn.Module, source: SafetensorsSource, state: ResumeState, out: Path, recipe: Any,
         calib: torch.Tensor | None, needs_calibration: bool, save_dtype: torch.dtype, max_shard_size: str | int,
         overwrite: bool, progress: bool, tokenizer: Any, extra_files: Callable[[dict[str, Any]], dict[str, str | bytes]],
         budget: Any, shapes: dict, params_before: int, min_rank: int, started: float) -> tuple[Path, dict[str, Any]]:
    """The block walk and the save, in the temporary folder of ``state``."""
    method = get_method(recipe.method)
    device = torch.device(recipe.device)
    opts = MethodOptions(damping=recipe.damping, beta=recipe.beta, aces=recipe.aces)
    io = SourceBlocks(model, source)
    captured = None
    all_done = state.plan is not None and state.start == len(decoder_layers(model))  # killed while packing
    if needs_calibration and calib is None:
        raise FactorlmError(f"method {recipe.method!r} with allocation {recipe.allocation!r} needs calibration data")
    if needs_calibration and not all_done:
        embed = model.get_input_embeddings()
        embed_name = _module_name(model, embed)
        materialize(model, embed_name, source)
        captured = capture_block_inputs(model, split_batches(calib, recipe.batch_size))
        release(embed)
    elif not needs_calibration:
        calib = None

    alloc_started = time.perf_counter()
    if state.plan is None:
        spectra = importance = None
        spectra_time = 0.0
        needs = get_allocator(recipe.allocation).needs
        if "spectra" in needs:
            if captured is None:
                spectra = weight_spectra(model, io)
            else:
                res = spectra_pass(model, captured, method, opts, importance="importance" in needs,
                                   device=device, progress=progress, io=io)
                spectra, importance, spectra_time = res.spectra, res.importance, res.time_s
        plan, alloc_info = plan_ranks(recipe.allocation, shapes, budget, recipe.rank_multiple, min_rank,
                                      spectra=spectra, importance=importance, ara=AraConfig(seed=recipe.seed),
                                      progress=progress)
        state.set_plan(plan, {"alloc_info": alloc_info, "spectra_time_s": round(spectra_time, 2),
                              "allocation_time_s": round(time.perf_counter() - alloc_started, 2)})
    plan = dict(state.plan or {})

    def block_done(index: int, block: nn.Module, rows: list[dict[str, Any]], student: list[torch.Tensor],
                   teacher: list[torch.Tensor] | None) -> None:
        prefix = f"{io.prefix}.{index}."
        tensors = {prefix + k: (v.to(save_dtype) if v.is_floating_point() else v) for k, v in block.state_dict().items()}
        state.block_done(index, tensors, rows, student, teacher, time.perf_counter() - marks[-1])
        marks.append(time.perf_counter())

    resumed_from = state.start
    marks = [time.perf_counter()]
    factor_started = time.perf_counter()
    if not all_done:
        compress_blocks(model, captured, plan, method, opts, device=device, progress=progress,
                        sequential=recipe.sequential, io=io, on_block_done=block_done, start=state.start,
                        streams=state.streams() if state.start else None)
    factor_time = state.info.get("factorize_time_s", 0.0) + time.perf_counter() - factor_started
    state.info["factorize_time_s"] = factor_time

    rows = state.rows
    model_after = params_before - sum(r["params_before"] - r["params_after"] for r in rows)
    linear_after = kept_params(shapes, plan)
    info = state.info
    totals: dict[str, Any] = {
        "method": recipe.method, "allocation": recipe.allocation,
        "linear_params_before": budget.linear_total, "linear_params_after": linear_after,
        "linear_keep": linear_after / budget.linear_total,
        "model_params_before": params_before, "model_params_after": model_after,
        "factored_modules": sum(r is not None for r in plan.values()),
        "dense_modules": sum(r is None for r in plan.values()),
        "budget": budget.to_dict(),
        "calibration_tokens": int(calib.numel()) if calib is not None else 0,
        "spectra_time_s": info["spectra_time_s"], "allocation_time_s": info["allocation_time_s"],
        "factorize_time_s": round(factor_time, 2), **info["alloc_info"],
        "streamed": True, "block_time_s": info["block_time_s"], "resumed_at_block": resumed_from or None,
    }
    totals["model_keep"] = model_after / params_before
    errors = [r["rel_output_error"] for r in rows if r.get("rel_output_error") is not None and not r["dense"]]
    if errors:
        totals["mean_rel_output_error"] = round(sum(errors) / len(errors), 6)
    report = {"method": recipe.method, "allocation": recipe.allocation, "layers": rows, "totals": totals}
    _finish(model, source, state, out, plan, rows, save_dtype, max_shard_size, tokenizer, extra_files, report,
            started, overwrite)
    return out, report


class _BlockFiles:
    """Reads finished blocks' tensors from their files, one file open at a time."""

    def __init__(self, state: ResumeState) -> None:
        self.state, self.index, self.handle = state, None, None

    def get(self, index: int, name: str) -> torch.Tensor:
        if self.index != index:
            self.close()
            path = self.state.block_path(index)
            if not path.is_file():
                raise FactorlmError(f"{path}: finished block file is missing; run without --resume")
            self.index, self.handle = index, safe_open(str(path), framework="pt")
        return self.handle.get_tensor(name)

    def close(self) -> None:
        self.index, self.handle = None, None


def _output_tensors(model: nn.Module, source: SafetensorsSource, state: ResumeState,
                    save_dtype: torch.dtype) -> list[OutTensor]:
    """Every tensor of the checkpoint in ``state_dict`` order: blocks from their files, the rest from the source.

    The last tensor of each block carries an ``on_written`` callback that records the packing
    progress and removes the block's file (:meth:`.resume.ResumeState.packed`).
    """
    files = _BlockFiles(state)
    prefix = get_arch(model.config).layers_path + "."

    def block_of(name: str) -> int | None:
        if not name.startswith(prefix):
            return None
        index = int(name[len(prefix):].split(".", 1)[0])
        return index if index in state.finished else None

    def from_block(index: int, name: str) -> Callable[[], torch.Tensor]:
        return lambda: files.get(index, name)

    def from_source(name: str) -> Callable[[], torch.Tensor]:
        def fetch() -> torch.Tensor:
            t = source.get(name)
            return t.to(save_dtype) if t.is_floating_point() else t
        return fetch

    tied = None
    if getattr(model.config, "tie_word_embeddings", False):
        tied = f"{_module_name(model, model.get_output_embeddings())}.weight"
    out: list[OutTensor] = []
    last: dict[int, int] = {}
    for name, value in model.state_dict(keep_vars=True).items():
        dtype = save_dtype if value.is_floating_point() else value.dtype
        index = block_of(name)
        if index is not None:
            last[index] = len(out)
            out.append(OutTensor(name, dtype, tuple(value.shape), from_block(index, name)))
        elif name in source:
            out.append(OutTensor(name, dtype, tuple(value.shape), from_source(name)))
        elif name != tied:
            raise FactorlmError(f"{source.root}: tensor {name!r} is neither in the source nor a finished block")

    def packed(index: int) -> Callable[[int], None]:
        def done(count: int) -> None:
            files.close()
            state.packed(count, [index])
        return done

    for index, position in last.items():
        out[position].on_written = packed(index)
    return out


def _finish(model: nn.Module, source: SafetensorsSource, state: ResumeState, out: Path, plan: dict[str, int | None],
            rows: list[dict[str, Any]], save_dtype: torch.dtype, max_shard_size: str | int, tokenizer: Any,
            extra_files: Callable[[dict[str, Any]], dict[str, str | bytes]], report: dict[str, Any],
            started: float, overwrite: bool) -> None:
    """Pack the shards, write config/tokenizer/extra files, then rename the folder into place."""
    from .. import __version__
    from ..runtime.checkpoint import replace_with_factored

    ranks = {n: r for n, r in plan.items() if r is not None}
    replace_with_factored(model, ranks, device="meta")  # the skeleton's names and shapes are the checkpoint's
    tmp = state.folder
    start = state.start_packing(shard_size_bytes(max_shard_size))
    write_shards(tmp, _output_tensors(model, source, state, save_dtype), max_shard_size, start=start)
    dense = [row["module"] for row in rows if row["dense"]]
    name = str(save_dtype).removeprefix("torch.")
    block = FactoredConfig(ranks=ranks, dense=[d for d in dense if d not in ranks], factor_dtype=name,
                           producer={"name": "factorlm", "version": __version__}).to_dict()
    model.config.dtype = save_dtype
    model.config.architectures = [type(model).__name__]
    model.config.quantization_config = block
    model.config.save_pretrained(tmp)
    if (source.root / "generation_config.json").is_file():
        from transformers import GenerationConfig

        GenerationConfig.from_pretrained(source.root).save_pretrained(tmp)
    elif model.can_generate() and getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    report["totals"]["wall_time_s"] = round(time.perf_counter() - started, 2)
    for fname, content in extra_files(report).items():
        with open(tmp / fname, "wb" if isinstance(content, bytes) else "w") as fh:
            fh.write(content)
    state.cleanup()
    _apply_umask(tmp)
    if out.exists() and not overwrite:
        raise FactorlmError(f"{out}: output directory exists; pass --overwrite to replace it")
    _replace_dir(tmp, out)
    logger.info("saved factored checkpoint with %d factored modules to %s", len(ranks), out)
