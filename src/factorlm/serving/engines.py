"""The registry of serving engines: what each one needs and how to build it for a model folder.

``factorlm serve DIR --engine NAME`` and the benchmarks build engines only through
:func:`create_engine`. Each :class:`EngineSpec` declares the optional packages it needs
(checked before anything is loaded, with the extra to install) and the kind of folder it
serves (checked cheaply by ``check``). Both engines are the same continuous-batching
scheduler (:class:`~factorlm.serving.torch_engine.TorchEngine`); they differ in what runs
the forward pass: PyTorch over a dense or factored checkpoint, or ONNX Runtime over a
folder written by ``factorlm export onnx``.

This module imports nothing heavy at import time, so the CLI can list the engine names.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..runtime.format import FactorlmError


@dataclass(frozen=True)
class EngineOptions:
    """Scheduler and runtime settings shared by every engine."""

    max_batch: int = 16
    max_queue: int = 64
    max_model_len: int | None = None
    served_model_name: str | None = None
    threads: int | None = None  # CPU threads of the forward pass (torch intra-op / ORT intra-op)
    compile: bool = False  # torch: a lone sequence decodes through the compiled static-cache decoder
    quant_kernel: str = "cached"  # torch: matmul path of a quantized checkpoint's layers (runtime.quant_kernels)


@dataclass(frozen=True)
class EngineSpec:
    """One engine: its needs and its factory."""

    name: str
    summary: str
    packages: tuple[tuple[str, str], ...]  # (import name, pip extra) that must be installed
    folder: str  # what the model folder must be, for messages
    check: Callable[[Path], None]  # cheap check of the folder, before anything is loaded
    build: Callable[[Path, EngineOptions, str], Any]  # (folder, options, served name) -> Engine
    compiles: bool = False  # whether --compile means something to this engine


ENGINES: dict[str, EngineSpec] = {}


def register_engine(spec: EngineSpec) -> EngineSpec:
    if spec.name in ENGINES:
        raise ValueError(f"engine {spec.name!r} is already registered")
    ENGINES[spec.name] = spec
    return spec


def served_model_name(model_dir: str | os.PathLike, options: EngineOptions) -> str:
    """The model id clients send: ``--served-model-name``, else the folder's name (never a path)."""
    name = options.served_model_name or Path(model_dir).resolve().name
    if not name:
        raise FactorlmError(f"{model_dir}: cannot derive a model name; pass --served-model-name")
    return name


def create_engine(name: str, model_dir: str | os.PathLike, options: EngineOptions | None = None) -> Any:
    """Check what engine ``name`` needs, then build it over ``model_dir``."""
    spec = ENGINES.get(name)
    if spec is None:
        raise FactorlmError(f"unknown engine {name!r}; choose one of {', '.join(ENGINES)}")
    options = options or EngineOptions()
    if options.max_batch < 1 or options.max_queue < 0:
        raise FactorlmError(f"--max-batch must be >= 1 and --max-queue >= 0, got {options.max_batch} and "
                            f"{options.max_queue}")
    if options.threads is not None and options.threads < 1:
        raise FactorlmError(f"--threads must be >= 1, got {options.threads}")
    if options.compile and not spec.compiles:
        raise FactorlmError(f"--compile applies to the torch engine, not to {name}")
    for module, extra in spec.packages:
        if importlib.util.find_spec(module) is None:
            raise FactorlmError(f"the {name} engine needs the '{module}' package: pip install 'factorlm[{extra}]'")
    path = Path(model_dir)
    if not path.is_dir():
        raise FactorlmError(f"{path}: model folder not found (the {name} engine serves {spec.folder})")
    spec.check(path)
    return spec.build(path, options, served_model_name(path, options))


# ---- torch ----------------------------------------------------------------------------------------
def _check_torch(path: Path) -> None:
    if not (path / "config.json").is_file():
        raise FactorlmError(f"{path}: no config.json; the torch engine serves a Hugging Face model folder")


def _build_torch(path: Path, options: EngineOptions, name: str) -> Any:
    import torch

    from ..runtime.checkpoint import load_model, load_tokenizer
    from .torch_engine import TorchEngine

    if options.threads:
        torch.set_num_threads(options.threads)
    if options.compile and not torch.cuda.is_available() and not _has_cxx():  # before the model loads
        raise FactorlmError("--compile on CPU needs a C++ compiler (g++) on PATH for torch.compile")
    return TorchEngine(load_model(path, quant_kernel=options.quant_kernel), load_tokenizer(path), model_name=name, max_batch=options.max_batch,
                       max_queue=options.max_queue, max_model_len=options.max_model_len, compile=options.compile)


def _has_cxx() -> bool:
    import shutil

    return shutil.which("g++") is not None or shutil.which("c++") is not None


# ---- onnx -----------------------------------------------------------------------------------------
def _check_onnx(path: Path) -> None:
    from ..exporters.onnx.metadata import read_metadata

    read_metadata(path)  # names the missing or wrong factorlm_onnx.json and 'factorlm export onnx'


def _build_onnx(path: Path, options: EngineOptions, name: str) -> Any:
    from .onnx_engine import build_onnx_engine

    return build_onnx_engine(path, threads=options.threads, model_name=name, max_batch=options.max_batch,
                             max_queue=options.max_queue, max_model_len=options.max_model_len)


register_engine(EngineSpec(
    name="torch", summary="PyTorch continuous batching over a dense or factored checkpoint",
    packages=(), folder="a dense or factored checkpoint folder",
    check=_check_torch, build=_build_torch, compiles=True))
register_engine(EngineSpec(
    name="onnx", summary="the same scheduler with ONNX Runtime doing the forward passes",
    packages=(("onnxruntime", "onnx"),), folder="a folder written by 'factorlm export onnx'",
    check=_check_onnx, build=_build_onnx))
