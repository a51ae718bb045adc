"""The dense source of a compression, read one module at a time (larger-than-RAM models).

A :class:`SafetensorsSource` opens a dense HF folder (one ``model.safetensors`` or shards
with ``model.safetensors.index.json``) with ``safe_open`` only (never pickle) and hands out
single tensors; :func:`meta_skeleton` builds the model from ``config.json`` alone with every
parameter on the meta device. :func:`materialize` brings one module's parameters (a decoder
block, the embeddings) onto a device in fp32, :func:`release` sends them back to meta, so
host memory holds about one block at a time instead of the whole model.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..runtime.arch import compressible_linears, get_arch
from ..runtime.checkpoint import params_on_meta
from ..runtime.format import FactorlmError, FormatError, read_config_json
from ..runtime.layout import column_major

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def resolve_source(model: str | Path) -> Path:
    """A local dense folder, or a hub id (``org/name``) found in the local huggingface_hub cache.

    Nothing is downloaded: a hub id that is not cached is refused with a clear error.
    """
    path = Path(model)
    if path.is_dir():
        return path
    text = str(model)
    if path.exists():
        raise FactorlmError(f"{path}: not a folder")
    if text.count("/") == 1 and not text.startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(text, local_files_only=True))
        except Exception as exc:  # noqa: BLE001 - any cache miss becomes one clear error
            raise FactorlmError(f"{text}: not a local folder and not in the local Hugging Face cache "
                                f"(factorlm never downloads): {type(exc).__name__}") from None
    raise FactorlmError(f"{path}: model folder not found")


class SafetensorsSource:
    """Tensor-by-tensor access to a dense folder's safetensors files.

    Every file the index names must exist and every tensor it maps must be in its file;
    both are checked when the source is opened, before any long work.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.where: dict[str, Path] = {}
        index = self.root / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise FormatError(f"{index}: malformed safetensors index: {exc}") from None
            missing = sorted({f for f in weight_map.values() if not (self.root / f).is_file()})
            if missing:
                raise FormatError(f"{index}: names shard files that are absent: {', '.join(missing)}")
            files = sorted({self.root / f for f in weight_map.values()})
        elif (self.root / SINGLE_FILE).is_file():
            files, weight_map = [self.root / SINGLE_FILE], None
        else:
            if any(self.root.glob("*.bin")) or any(self.root.glob("*.pt")):
                raise FormatError(f"{self.root}: only pickle weight files found; factorlm reads safetensors only")
            raise FormatError(f"{self.root}: no {SINGLE_FILE} (or {INDEX_FILE}) found")
        self._meta: dict[str, tuple[str, list[int]]] = {}
        for path in files:
            with self._open(path) as handle:
                for key in handle.keys():
                    self.where[key] = path
                    sl = handle.get_slice(key)
                    self._meta[key] = (sl.get_dtype(), list(sl.get_shape()))
        if weight_map is not None:
            absent = [k for k, f in weight_map.items() if self.where.get(k) != self.root / f]
            if absent:
                raise FormatError(f"{index}: tensors not found in the shard the index names: {absent[:5]}")

    @staticmethod
    def _open(path: Path) -> Any:
        """A fresh handle: files are opened per read, so no mapping of a multi-GB shard stays resident."""
        try:
            return safe_open(str(path), framework="pt")
        except (SafetensorError, OSError) as exc:
            raise FormatError(f"{path}: cannot read safetensors file: {exc}") from None

    def keys(self) -> list[str]:
        return list(self.where)

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def dtype_name(self, name: str) -> str:
        """The stored dtype of a tensor as safetensors names it (``BF16``, ``F32``, ...)."""
        return self._meta[name][0]

    def get(self, name: str) -> torch.Tensor:
        """One tensor as stored (a fresh CPU tensor, nothing else read)."""
        if name not in self.where:
            raise FormatError(f"{self.root}: tensor {name!r} not found in the safetensors files")
        try:
            with self._open(self.where[name]) as handle:
                return handle.get_tensor(name)
        except (SafetensorError, OSError) as exc:
            raise FormatError(f"{self.where[name]}: cannot read tensor {name!r}: {exc}") from None

    def fingerprint(self) -> str:
        """A digest of config.json and every tensor's name, file, dtype and shape (resume checks it)."""
        h = hashlib.sha256((self.root / "config.json").read_bytes())
        for key in sorted(self.where):
            h.update(f"{key}|{self.where[key].name}|{self._meta[key]}".encode())
        return h.hexdigest()[:32]


def meta_skeleton(root: str | Path) -> nn.Module:
    """The dense model of ``root/config.json`` with every parameter on the meta device (fp32).

    Buffers computed at construction (rotary frequencies) are real; nothing is read from the
    weight files.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    root = Path(root)
    read_config_json(root)
    config = AutoConfig.from_pretrained(root)
    get_arch(config)
    if hasattr(config, "quantization_config"):
        raise FactorlmError(f"{root}: already a quantized or factored checkpoint; compress a dense model")
    with params_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def materialize(model: nn.Module, prefix: str, source: SafetensorsSource, device: torch.device | str = "cpu") -> None:
    """Read the parameters of ``model.get_submodule(prefix)`` from ``source`` onto ``device`` in fp32.

    The compressible linears' weights are stored column-major, as the whole-model loader
    does (:mod:`factorlm.runtime.layout`), so the arithmetic is the same either way.
    """
    module = model.get_submodule(prefix) if prefix else model
    linear_weights = {f"{name}.weight" for name in compressible_linears(model)}
    for local, param in list(module.named_parameters(recurse=True)):
        full = f"{prefix}.{local}" if prefix else local
        if param.device.type != "meta":
            continue
        tensor = source.get(full)
        if tuple(tensor.shape) != tuple(param.shape):
            raise FormatError(f"{source.where[full]}: tensor {full!r} has shape {tuple(tensor.shape)}, "
                              f"config.json expects {tuple(param.shape)}")
        tensor = tensor.to(torch.float32)
        if not torch.isfinite(tensor).all():
            raise FactorlmError(f"layer {full.removesuffix('.weight')!r}: weight {full!r} contains NaN or Inf "
                                f"({source.where[full].name})")
        if full in linear_weights:
            tensor = column_major(tensor)
        owner_name, _, attr = local.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        owner._parameters[attr] = nn.Parameter(tensor.to(device), requires_grad=False)


def release(module: nn.Module) -> None:
    """Send every parameter of ``module`` back to the meta device (frees its memory)."""
    for sub in module.modules():
        for attr, param in list(sub._parameters.items()):
            if param is not None and param.device.type != "meta":
                sub._parameters[attr] = nn.Parameter(param.detach().to("meta"), requires_grad=False)


def materialized_params(model: nn.Module) -> int:
    """Parameters of ``model`` that hold real memory now (not on the meta device), tied ones once."""
    seen = {id(p): p for p in model.parameters() if p.device.type != "meta"}
    return sum(p.numel() for p in seen.values())
