"""``quantize_checkpoint``: a factored (or dense) checkpoint -> a quantized one (format version 2).

Every factored layer gets int8 (per output channel) or int4 (group-wise) U and V; with
``dense=True`` the block linears kept dense are quantized the same way, so a dense model
quantized here is the "dense int8" baseline in the same format. Rounding is round-to-nearest
or GPTQ error feedback (:func:`factorlm.runtime.quant.quantize_gptq`) with the input Gram of
each layer from calibration text (V sees the layer input's Gram, U the Gram of ``V_q x``):
by default block by block, each block's Grams taken on what the already quantized blocks
produce (:func:`quantize_sequential`), or all in one pass of the unquantized model.

Everything that can be wrong is checked before the model is loaded or any Gram collected:
bits, group size against every weight's input dimension (errors name the module), an
already quantized source, an existing output. The result is written atomically by
:func:`factorlm.runtime.checkpoint.save_factored`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..runtime.factored_linear import FactoredLinear
from ..runtime.format import ROUNDINGS, FactoredConfig, FactorlmError, read_config_json, read_factored_config
from ..runtime.quant import QuantOptions, check_quant_params

logger = logging.getLogger(__name__)
SIDE_FILES = ("factorlm_recipe.yaml", "factorlm_report.json")


def check_scheme(bits: int, group_size: int | None, rounding: str) -> None:
    """Bits, group size and rounding on their own (the per-module fit is :func:`check_targets`)."""
    if bits not in (4, 8):
        raise FactorlmError(f"bits must be 4 or 8, got {bits!r}")
    if bits == 8 and group_size:
        raise FactorlmError("int8 is per output channel; --group-size applies to --bits 4 only")
    if bits == 4 and (not group_size or group_size < 2 or group_size % 2):
        raise FactorlmError(f"int4 needs an even group size >= 2 (e.g. --group-size 128), got {group_size!r}")
    if rounding not in ROUNDINGS:
        raise FactorlmError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")


def weight_shapes(config: FactoredConfig | None, skeleton: nn.Module, dense: bool, lm_head: bool = False
                  ) -> dict[str, list[tuple[str, int]]]:
    """{module: [(part, input dim), ...]} of every weight that will be quantized."""
    from ..runtime.arch import compressible_linears

    ranks = config.ranks if config else {}
    targets: dict[str, list[tuple[str, int]]] = {}
    for fqn, module in compressible_linears(skeleton).items():
        if fqn in ranks:
            targets[fqn] = [("weight_u", ranks[fqn]), ("weight_v", module.in_features)]
        elif dense and isinstance(module, nn.Linear):
            targets[fqn] = [("weight", module.in_features)]
    if lm_head:
        fqn, head = lm_head_of(skeleton)
        targets[fqn] = [("weight", head.in_features)]
    return targets


def lm_head_of(model: nn.Module) -> tuple[str, nn.Linear]:
    """(name, module) of the output projection (the LM head); a clear error when it is not a Linear."""
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise FactorlmError(f"the model's output embeddings are a {type(head).__name__}, not a Linear; "
                            "its LM head cannot be quantized")
    return next(n for n, m in model.named_modules() if m is head), head


def untie_lm_head(model: nn.Module) -> None:
    """Mark the config untied: the quantized LM head no longer shares the input embeddings' weight
    (the embeddings stay in floating point), so readers must not tie them again."""
    for cfg in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        if getattr(cfg, "tie_word_embeddings", False):
            cfg.tie_word_embeddings = False


def check_embeddings(skeleton: nn.Module, lm_head: bool) -> None:
    """``embeddings``: the input embeddings can be quantized only if no fp head shares their table."""
    if not isinstance(skeleton.get_input_embeddings(), nn.Embedding):
        raise FactorlmError(f"the model's input embeddings are a {type(skeleton.get_input_embeddings()).__name__}, "
                            "not an Embedding; they cannot be quantized")
    tied = any(getattr(c, "tie_word_embeddings", False) for c in (skeleton.config, skeleton.config.get_text_config()))
    if tied and not lm_head:
        raise FactorlmError("the LM head is tied to the input embeddings: quantizing the embeddings alone would "
                            "leave the head without its weight; pass --lm-head as well (the head gets its own codes)")


def check_targets(targets: dict[str, list[tuple[str, int]]], bits: int, group_size: int | None) -> None:
    """Every weight's input dimension fits the scheme; the error names the module and part."""
    for fqn, parts in targets.items():
        for part, in_f in parts:
            check_quant_params(bits, group_size, in_f, f"module {fqn!r} ({part})")


def check_source(src: Path, dense: bool) -> FactoredConfig | None:
    """The source's factorlm block (None for a dense folder); refuses an already quantized one."""
    if not src.is_dir():
        raise FactorlmError(f"{src}: checkpoint folder not found")
    read_config_json(src)
    block = read_factored_config(src)
    if block is not None and block.quantized:
        raise FactorlmError(f"{src / 'config.json'}: checkpoint is already quantized (bits={block.bits}); "
                            f"quantize the unquantized checkpoint instead")
    if block is None and not dense:
        raise FactorlmError(f"{src}: a dense model has no factored modules; pass --dense to quantize its linears")
    if block is not None and block.correctors == "separate":
        raise FactorlmError(f"{src}: correctors are kept separate; run 'factorlm fold' first")
    return block


def _skeleton(src: Path) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(src)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


# --------------------------------------------------------------------------- calibration Grams


@contextmanager
def gram_hooks(model: nn.Module, names: list[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Accumulate X^T X (fp32) of the input of each named module while the block runs."""
    grams: dict[str, torch.Tensor] = {}
    handles = []

    def hook(name: str):  # noqa: ANN202 - a forward pre-hook
        def fn(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            g = x.T @ x
            grams[name] = grams[name] + g if name in grams else g
        return fn

    for name in names:
        handles.append(model.get_submodule(name).register_forward_pre_hook(hook(name)))
    try:
        yield grams
    finally:
        for h in handles:
            h.remove()


def collect_grams(model: nn.Module, names: list[str], windows: torch.Tensor, batch_size: int = 4) -> dict[str, torch.Tensor]:
    """Input Gram of each named linear over the calibration ``windows`` [n, seq] (one model pass)."""
    with gram_hooks(model, names) as grams, torch.no_grad():
        for start in range(0, windows.shape[0], batch_size):
            model(input_ids=windows[start:start + batch_size], use_cache=False)
    return grams


@torch.no_grad()
def quantize_sequential(model: nn.Module, targets: list[str], bits: int, group_size: int | None,
                        windows: torch.Tensor, options: QuantOptions | None = None, batch_size: int = 4,
                        progress: bool = False) -> None:
    """GPTQ decoder block by decoder block, in place: a block's Grams come from the hidden states
    the blocks before it produce *after* their quantization, so its rounding also works against
    the error arriving from upstream. Costs two block forwards per block over the calibration
    windows (Grams, then the quantized block's output). Targets outside the decoder blocks are
    quantized first with Grams from one pass of the unquantized model.
    """
    from tqdm.auto import tqdm

    from ..runtime.arch import decoder_layers, get_arch
    from .streaming import capture_block_inputs, run_block, split_batches

    layers = decoder_layers(model)
    layers_path = get_arch(model.config).layers_path
    prefixes = [f"{layers_path}.{index}." for index in range(len(layers))]
    outside = [t for t in targets if not any(t.startswith(p) for p in prefixes)]
    if outside:
        quantize_model(model, outside, bits, group_size, collect_grams(model, outside, windows, batch_size), options)
    captured = capture_block_inputs(model, split_batches(windows, batch_size))
    hidden = captured.hidden
    bar = tqdm(list(zip(layers, prefixes)), desc="quantize (gptq)", unit="block", disable=not progress)
    for index, (block, prefix) in enumerate(bar):
        local = [t for t in targets if t.startswith(prefix)]
        kwargs = captured.block_kwargs[index]
        if local:
            with gram_hooks(model, local) as grams:
                for h in hidden:
                    run_block(block, h, kwargs)
            quantize_model(model, local, bits, group_size, grams, options)
        hidden = [run_block(block, h, kwargs) for h in hidden]
        logger.debug("block %d/%d quantized", index + 1, len(layers))


# --------------------------------------------------------------------------- orchestration


def quantize_model(model: nn.Module, targets: list[str], bits: int, group_size: int | None,
                   grams: dict[str, torch.Tensor] | None = None, options: QuantOptions | None = None) -> None:
    """Swap each named layer for its quantized version in place (GPTQ where a Gram is given)."""
    from ..runtime.quant_linear import QuantizedFactoredLinear, QuantizedLinear, _set_child

    for i, fqn in enumerate(targets):
        layer = model.get_submodule(fqn)
        gram = grams.get(fqn) if grams else None
        if isinstance(layer, FactoredLinear):
            new: nn.Module = QuantizedFactoredLinear.from_factored(layer, bits, group_size, gram, options)
        elif isinstance(layer, nn.Linear):
            new = QuantizedLinear.from_linear(layer, bits, group_size, gram, options)
        else:
            raise FactorlmError(f"module {fqn!r} is a {type(layer).__name__}; only linear layers can be quantized")
        _set_child(model, fqn, new)
        if grams:
            grams.pop(fqn, None)  # free it as soon as it is used
        logger.debug("quantized %s (%d/%d)", fqn, i + 1, len(targets))


def quantize_checkpoint(src: str | os.PathLike, out: str | os.PathLike, *, bits: int, group_size: int | None = None,
                        rounding: str = "rtn", dense: bool = False, calib: str = "sample", calib_samples: int = 32,
                        calib_len: int = 512, seed: int = 0, overwrite: bool = False,
                        options: QuantOptions | None = None, lm_head: bool = False, embeddings: bool = False,
                        progress: bool = False, scale_steps: int = 0) -> dict[str, Any]:
    """Quantize checkpoint ``src`` into ``out`` (may equal ``src`` with ``overwrite``); returns a summary.

    ``lm_head`` also quantizes the output projection (read once per generated token, a fifth
    of a small model's weights); a head tied to the input embeddings is untied, the embeddings
    staying in floating point, so the checkpoint grows by the head's codes on disk, unless
    ``embeddings`` also stores the input embeddings as int8 rows (format version 3; a tied
    model needs ``lm_head`` with it).

    ``options`` (:class:`~factorlm.runtime.quant.QuantOptions`, default all on) choose the
    codes: clipping search, GPTQ act-order, U/V balancing; they are recorded in
    ``factorlm_quantization.json``, the stored format does not depend on them.

    ``scale_steps`` > 0 then trains the scales for that many steps on KL to ``src`` over the
    calibration text (:func:`tune_scales`); the codes and the format stay as quantized.
    """
    options = options or QuantOptions()
    from ..runtime.checkpoint import load_model, load_tokenizer, save_factored

    src, out = Path(src), Path(out)
    group_size = group_size if bits == 4 else None
    check_scheme(bits, group_size, rounding)
    block = check_source(src, dense)
    if out.exists() and not overwrite:
        raise FactorlmError(f"{out}: output directory exists; pass --overwrite to replace it")
    skeleton = _skeleton(src)
    targets = weight_shapes(block, skeleton, dense, lm_head)
    if embeddings:
        check_embeddings(skeleton, lm_head)
    if not targets:
        raise FactorlmError(f"{src}: nothing to quantize (no factored modules, and no dense linears selected)")
    if scale_steps < 0:
        raise FactorlmError(f"scale steps must be >= 0, got {scale_steps}")
    check_targets(targets, bits, group_size)
    model = load_model(src, fast_layout=False).float()
    tokenizer = load_tokenizer(src)
    if rounding == "gptq":
        from .calib_sources import calibration_windows

        windows = calibration_windows(tokenizer, calib, calib_samples, calib_len, seed)
        logger.info("collecting input Grams of %d layers from %d x %d calibration tokens", len(targets),
                    *windows.shape)
        if options.sequential:
            quantize_sequential(model, list(targets), bits, group_size, windows, options, progress=progress)
        else:
            grams = collect_grams(model, list(targets), windows)
            quantize_model(model, list(targets), bits, group_size, grams, options)
    else:
        quantize_model(model, list(targets), bits, group_size, None, options)
    if lm_head:
        untie_lm_head(model)
    if embeddings:
        from ..runtime.quant_embedding import quantize_embeddings

        quantize_embeddings(model)
    base = block or FactoredConfig(ranks={})
    config = FactoredConfig(ranks={}, dense=list(base.dense), producer=dict(base.producer), rounding=rounding,
                            bits=bits, group_size=group_size)
    extra: dict[str, str | bytes] = {name: (src / name).read_text() for name in SIDE_FILES if (src / name).is_file()}
    info = {"bits": bits, "group_size": group_size, "rounding": rounding, "modules": len(targets), "lm_head": lm_head,
            "embeddings": embeddings,
            "options": options.to_dict(), "scale_steps": scale_steps,
            "calibration": {"source": calib, "samples": calib_samples, "length": calib_len} if rounding == "gptq" else None}
    extra["factorlm_quantization.json"] = json.dumps(info, indent=2) + "\n"
    target = out.with_name(out.name + ".untrained-scales") if scale_steps else out
    path = save_factored(model, target, tokenizer=tokenizer, config=config, extra_files=extra,
                         overwrite=overwrite or target != out)
    del model
    if (src / "generation_config.json").is_file() and not (path / "generation_config.json").is_file():
        shutil.copy2(src / "generation_config.json", path / "generation_config.json")
    if scale_steps:
        try:
            info["scale_training"] = tune_scales(src, target, out, calib, scale_steps, calib_len, seed, progress)
        finally:
            shutil.rmtree(target, ignore_errors=True)
    logger.info("wrote %s (%d-bit%s, %s, %d modules)", out, bits, f", group {group_size}" if group_size else "",
                rounding, len(targets))
    return info


def tune_scales(teacher: Path, quantized: Path, out: Path, calib: str, steps: int, seq_len: int, seed: int,
                progress: bool) -> dict[str, Any]:
    """Train the scales of ``quantized`` against ``teacher`` (the fp checkpoint) into ``out``.

    One new window of ``seq_len`` tokens of ``calib`` per step, the default relative learning
    rate, bf16 autocast on the CPU (the scales, Adam and the loss stay fp32); returns the
    held-out KL before and after.
    """
    from .finetune import FinetuneConfig, finetune_checkpoint

    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = FinetuneConfig(steps=steps, train="scales", seq_len=seq_len, seed=seed, bf16=device == "cpu", device=device)
    _, report = finetune_checkpoint(quantized, teacher, out, calib, cfg, overwrite=True, progress=progress)
    return {k: report[k] for k in ("held_out_kl_before", "held_out_kl_after", "train_tokens")}
