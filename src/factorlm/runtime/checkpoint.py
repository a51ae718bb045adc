"""Saving and loading factored checkpoints (HF folder + safetensors, never pickle).

Loading builds the model skeleton with parameters on the meta device, swaps in
``FactoredLinear`` modules of the recorded ranks, checks every tensor header against the
expected names, shapes and dtypes before any data is read (:mod:`.verify`, shared with the
transformers quantizer and ``factorlm inspect --verify``), and assigns the tensors read
from safetensors directly, so no second copy of the weights is ever made.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .factored_linear import CorrectedLinear, FactoredLinear
from .format import FactoredConfig, FactorlmError, FormatError, read_config_json, read_factored_config
from .safetensors_header import read_headers
from .verify import checkpoint_problems, raise_on_problems, rank_problem

logger = logging.getLogger(__name__)

# what transformers' save_pretrained uses; a larger checkpoint is sharded with an index
DEFAULT_MAX_SHARD_SIZE = "5GB"


# --------------------------------------------------------------------------- modules


def _split_fqn(fqn: str) -> tuple[str, str]:
    parent, _, child = fqn.rpartition(".")
    return parent, child


def replace_with_factored(model: nn.Module, ranks: dict[str, int], device: torch.device | str = "meta",
                          corrector_ranks: dict[str, int] | None = None) -> None:
    """Replace each named ``nn.Linear`` by an empty ``FactoredLinear`` of the given rank.

    Modules in ``corrector_ranks`` become ``CorrectedLinear`` (separate correctors). Used on
    a meta-device skeleton before loading; errors name the offending module.
    """
    corrector_ranks = corrector_ranks or {}
    for fqn, rank in ranks.items():
        problem = rank_problem(model, fqn, rank)
        if problem:
            raise FormatError(problem)
        module = model.get_submodule(fqn)
        if isinstance(module, FactoredLinear):
            continue
        kw = {"bias": module.bias is not None, "device": device, "dtype": module.weight.dtype}
        if fqn in corrector_ranks:
            new: FactoredLinear = CorrectedLinear(module.in_features, module.out_features, rank, corrector_ranks[fqn], **kw)
        else:
            new = FactoredLinear(module.in_features, module.out_features, rank, **kw)
        parent, child = _split_fqn(fqn)
        setattr(model.get_submodule(parent) if parent else model, child, new)


def factorize_model(model: nn.Module, ranks: dict[str, int]) -> None:
    """Replace the named ``nn.Linear`` modules by plain truncated-SVD ``FactoredLinear`` in place."""
    for fqn, rank in ranks.items():
        module = model.get_submodule(fqn)
        if not isinstance(module, nn.Linear):
            raise FactorlmError(f"module {fqn!r} is a {type(module).__name__}, not a Linear")
        limit = min(module.in_features, module.out_features)
        if not 1 <= rank <= limit:
            raise FactorlmError(f"module {fqn!r}: rank {rank} is out of range 1..{limit}")
        parent, child = _split_fqn(fqn)
        setattr(model.get_submodule(parent) if parent else model, child, FactoredLinear.from_linear(module, rank))


def factored_ranks(model: nn.Module) -> dict[str, int]:
    """Rank of every factored layer (fp or quantized) in a model, by fully-qualified name (correctors not included)."""
    from .quant_linear import QuantizedFactoredLinear

    return {name: m.rank for name, m in model.named_modules()
            if isinstance(m, (FactoredLinear, QuantizedFactoredLinear))}


def corrector_ranks_of(model: nn.Module) -> dict[str, int]:
    """Corrector rank of every ``CorrectedLinear`` (a corrector not folded yet), by name."""
    return {name: m.corrector_rank for name, m in model.named_modules() if isinstance(m, CorrectedLinear)}


def fold_correctors(model: nn.Module) -> int:
    """Replace every ``CorrectedLinear`` by its exact folded ``FactoredLinear`` (rank r + c); returns how many."""
    names = list(corrector_ranks_of(model))
    for name in names:
        parent, child = _split_fqn(name)
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, getattr(owner, child).fold())
    return len(names)


@contextlib.contextmanager
def params_on_meta() -> Iterator[None]:
    """Create parameters on the meta device while buffers stay real.

    Non-persistent buffers (rotary inverse frequencies, embedding scales) are not in the
    checkpoint, so they must be computed for real at construction; parameters are about to
    be replaced by tensors read from disk, so allocating them would be a wasted copy.
    """
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            kwargs = {"requires_grad": param.requires_grad}
            module._parameters[name] = type(param)(param.to("meta"), **kwargs)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


# --------------------------------------------------------------------------- saving


def save_factored(
    model: nn.Module,
    out_dir: str | os.PathLike,
    *,
    tokenizer: Any = None,
    config: FactoredConfig | None = None,
    extra_files: dict[str, str | bytes] | None = None,
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
) -> Path:
    """Write ``model`` (with its FactoredLinear modules) as a factored checkpoint.

    The folder is written to a temporary sibling and renamed into place, so an interrupted
    save never leaves a half-written checkpoint; an existing ``out_dir`` is refused unless
    ``overwrite``. ``config`` supplies ``dense``/``correctors``/``producer``; ranks are always
    read from the model itself so they cannot disagree with the tensors. A model that still
    holds ``CorrectedLinear`` layers is saved with separate correctors (for further
    training); fold them first (:func:`fold_correctors`) for a checkpoint of plain factors.
    ``dtype`` casts the floating-point parameters first (in place; ``None`` keeps the model's),
    and ``config.json``'s ``dtype`` and ``factor_dtype`` record it. Above ``max_shard_size``
    the weights are split into HF-style shards with ``model.safetensors.index.json``.
    The folder and files get the usual umask permissions, like ``save_pretrained``; a stale
    temporary folder of an earlier killed save on the same output is removed first.
    """
    from .. import __version__
    from .quant_linear import quant_fields

    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FactorlmError(f"{out}: output directory exists; pass overwrite=True (CLI: --overwrite) to replace it")
    ranks = factored_ranks(model)
    for fqn, rank in ranks.items():  # refuse what load_factored would refuse, before anything is written
        layer = model.get_submodule(fqn)
        if rank > min(layer.in_features, layer.out_features):
            raise FormatError(f"module {fqn!r}: rank {rank} exceeds min(in, out) = "
                              f"{min(layer.in_features, layer.out_features)}; store it dense instead")
    correctors = corrector_ranks_of(model)
    if dtype is not None:
        model.to(dtype)
    saved_dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    model.config.dtype = saved_dtype
    base = config or FactoredConfig(ranks=ranks)
    mode = "separate" if correctors else ("folded" if base.correctors == "separate" else base.correctors)
    block = FactoredConfig(
        ranks=ranks,
        dense=[d for d in base.dense if d not in ranks],
        correctors=mode,
        corrector_ranks=correctors,
        factor_dtype=str(saved_dtype).removeprefix("torch."),
        producer=base.producer or {"name": "factorlm", "version": __version__},
        **quant_fields(model, base.rounding),
    ).to_dict()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_dir(out)
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed earlier save of this output
    tmp.mkdir(parents=True)
    previous = getattr(model.config, "quantization_config", None)
    try:
        model.config.quantization_config = block
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, content in (extra_files or {}).items():
            mode = "wb" if isinstance(content, bytes) else "w"
            with open(tmp / name, mode) as fh:
                fh.write(content)
        _apply_umask(tmp)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if previous is None:
            with contextlib.suppress(AttributeError):
                del model.config.quantization_config
        else:
            model.config.quantization_config = previous
    logger.info("saved factored checkpoint with %d factored modules to %s", len(ranks), out)
    return out


def _apply_umask(root: Path) -> None:
    """Give ``root`` and its files the modes a plain ``open``/``mkdir`` would (some writers use 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(root, 0o777 & ~mask)
    for path in root.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def partial_dir(out: Path) -> Path:
    """The one temporary folder a save of ``out`` writes into before renaming it into place."""
    return out.with_name(f".{out.name}.factorlm-partial")


def _replace_dir(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``; an existing ``dst`` is removed only after the move is possible."""
    if dst.exists():
        backup = dst.with_name(f".{dst.name}.factorlm-old")
        shutil.rmtree(backup, ignore_errors=True)
        os.replace(dst, backup)
        os.replace(src, dst)
        shutil.rmtree(backup, ignore_errors=True)
    else:
        os.replace(src, dst)


# --------------------------------------------------------------------------- loading


def safetensors_files(model_dir: str | os.PathLike) -> list[Path]:
    """The safetensors files of a folder (single file or sharded index); never .bin files."""
    root = Path(model_dir)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise FormatError(f"{index}: malformed safetensors index: {exc}") from exc
        return [root / name for name in sorted(set(weight_map.values()))]
    single = root / "model.safetensors"
    if single.is_file():
        return [single]
    if any(root.glob("*.bin")) or any(root.glob("*.pt")):
        raise FormatError(f"{root}: only pickle weight files found; factorlm reads safetensors only")
    raise FormatError(f"{root}: no model.safetensors (or index) found")


def read_tensors(model_dir: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Path]]:
    """All tensors of a folder and the file each came from (for error messages)."""
    tensors: dict[str, torch.Tensor] = {}
    origin: dict[str, Path] = {}
    for path in safetensors_files(model_dir):
        try:
            with safe_open(str(path), framework="pt") as fh:
                for key in fh.keys():
                    tensors[key] = fh.get_tensor(key)
                    origin[key] = path
        except (SafetensorError, OSError) as exc:  # checked headers first; this is a file changed underneath
            raise FormatError(f"{path}: cannot read safetensors file: {exc}") from None
    return tensors, origin


def _build_skeleton(model_dir: Path, dtype: torch.dtype | None) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with params_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)
    return model


def load_factored(
    model_dir: str | os.PathLike, *, dtype: torch.dtype | None = None, device: torch.device | str = "cpu",
    fast_layout: bool = True, correctors: str = "fold", quant_kernel: str = "cached",
) -> nn.Module:
    """Load a factored checkpoint as a transformers model with ``FactoredLinear`` layers.

    Errors name the file and module: unknown format_version, missing tensor, a factor of a
    module ``ranks`` does not list, wrong shape or dtype, a truncated or corrupt file, a rank
    larger than the layer allows, an architecture the table does not cover.
    ``fast_layout`` stores block weights column-major for faster CPU decoding (see layout.py).
    A checkpoint with separate correctors is folded on load (``correctors="fold"``, exact) or
    kept as ``CorrectedLinear`` layers for further training (``correctors="keep"``).
    A quantized checkpoint (format version 2) loads as quantized layers whose matmul path is
    ``quant_kernel`` (see :mod:`.quant_linear`).
    """
    if correctors not in ("fold", "keep"):
        raise FactorlmError(f"correctors must be 'fold' or 'keep', got {correctors!r}")
    root = Path(model_dir)
    if not root.is_dir():
        raise FactorlmError(f"{root}: checkpoint folder not found")
    block = read_factored_config(root)
    if block is None:
        raise FormatError(f"{root / 'config.json'}: no factorlm quantization_config; use load_model() for dense folders")
    model = _build_skeleton(root, dtype or getattr(torch, block.factor_dtype, torch.float32))
    raise_on_problems(checkpoint_problems(model, read_headers(safetensors_files(root)), block, root), root)
    replace_with_factored(model, block.ranks, device="meta", corrector_ranks=block.corrector_ranks)
    if block.quantized:
        from .quant_linear import replace_with_quantized

        replace_with_quantized(model, block.ranks, block.quantized_dense, int(block.bits or 0), block.group_size,
                               embeddings=block.quantized_embeddings)
    tensors, _ = read_tensors(root)
    _assign(model, tensors, dtype, device)
    _load_generation_config(model, root)
    if correctors == "fold":
        fold_correctors(model)
    model = _maybe_fast_layout(model, fast_layout)
    if block.quantized:
        from .quant_linear import prepare_quantized

        prepare_quantized(model, quant_kernel)
    return model


def _maybe_fast_layout(model: nn.Module, enabled: bool) -> nn.Module:
    if enabled and next(model.parameters()).device.type == "cpu":
        from .layout import apply_fast_layout

        apply_fast_layout(model)
    return model


def _assign(model: nn.Module, tensors: dict[str, torch.Tensor], dtype: torch.dtype | None, device: torch.device | str) -> None:
    expected = set(model.state_dict())
    state = {k: v for k, v in tensors.items() if k in expected}
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if getattr(model.config, "tie_word_embeddings", False):
        model.lm_head.weight = model.get_input_embeddings().weight
    leftover = [n for n, p in [*model.named_parameters(), *model.named_buffers()] if p.device.type == "meta"]
    if leftover:
        raise FormatError(f"parameters not found in the checkpoint: {leftover[:5]}")
    model.to(device)
    model.eval()


def _load_generation_config(model: nn.Module, root: Path) -> None:
    model.config._name_or_path = str(root)
    if (root / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(root)


def is_factored_dir(model_dir: str | os.PathLike) -> bool:
    """True when the folder holds a factorlm checkpoint."""
    return read_factored_config(model_dir) is not None


def load_model(
    model_dir: str | os.PathLike, *, dtype: torch.dtype | None = None, device: torch.device | str = "cpu",
    fast_layout: bool = True, quant_kernel: str = "cached",
) -> nn.Module:
    """Load a dense HF folder or a factored checkpoint alike (local folders only).

    Both get the same weight layout treatment, so dense/factored comparisons are fair.
    ``quant_kernel`` is the matmul path of a quantized checkpoint's layers (see :func:`load_factored`).
    """
    root = Path(model_dir)
    if not root.is_dir():
        raise FactorlmError(f"{root}: model folder not found")
    read_config_json(root)
    if is_factored_dir(root):
        return load_factored(root, dtype=dtype, device=device, fast_layout=fast_layout, quant_kernel=quant_kernel)
    from transformers import AutoConfig, AutoModelForCausalLM

    from .arch import get_arch

    get_arch(AutoConfig.from_pretrained(root))
    read_headers(safetensors_files(root))  # a truncated or corrupt file is named before transformers reads it
    model = AutoModelForCausalLM.from_pretrained(root, dtype=dtype or torch.float32, use_safetensors=True)
    return _maybe_fast_layout(model.to(device).eval(), fast_layout)


def load_tokenizer(model_dir: str | os.PathLike) -> Any:
    """The tokenizer saved beside a model (dense or factored)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)
