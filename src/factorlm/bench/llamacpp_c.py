"""The llama.cpp peer through llama.cpp's own C API, for hosts without llama-cpp-python.

llama-cpp-python has no binary wheel for every platform and compiles llama.cpp when it is
installed. ``llama-cpp-cffi`` ships llama.cpp prebuilt, as cffi extension modules. This
adapter loads only its CPU module (``llama/_llama_cpp_cpu*.so``) from the file, without
importing that package (its ``__init__`` imports transformers 4 and a tokenizer stack), and
drives the C API directly: model and context from the GGUF, one ``llama_decode`` over the
prompt, then one token per step with a greedy argmax over the last logits, so the timing is
llama.cpp's forward pass and nothing of a Python sampler.

Environment:
- ``FACTORLM_LLAMA_CPP_MODULE``: path of a cffi module exposing llama.cpp's C API (default:
  the CPU module of an installed ``llama-cpp-cffi``).
- ``FACTORLM_LLAMA_CPP_PRELOAD``: shared libraries (``os.pathsep``-separated) loaded with
  global symbols first, for a prebuilt module linked against a newer C++ runtime than the
  host has (``benchmarks/llamacpp_shim.cc``).
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from .runner import BenchConfig, EngineUnavailable, RunTiming, as_prompt_lists

log = logging.getLogger(__name__)

MODULE_ENV = "FACTORLM_LLAMA_CPP_MODULE"
PRELOAD_ENV = "FACTORLM_LLAMA_CPP_PRELOAD"
REQUIRED = ("llama_backend_init", "llama_model_load_from_file", "llama_init_from_model", "llama_decode",
            "llama_batch_get_one", "llama_get_logits_ith", "llama_model_get_vocab", "llama_vocab_n_tokens",
            "llama_kv_self_clear", "llama_free", "llama_model_free")


def find_module() -> Path:
    """The cffi module to load: ``$FACTORLM_LLAMA_CPP_MODULE`` or llama-cpp-cffi's CPU module."""
    explicit = os.environ.get(MODULE_ENV)
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise EngineUnavailable(f"{MODULE_ENV}={explicit} is not a file")
        return path
    spec = importlib.util.find_spec("llama")  # locates the package without running its __init__
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    found = sorted(p for root in roots for p in Path(root).glob("_llama_cpp_cpu*.so"))
    if not found:
        raise EngineUnavailable("no llama.cpp C module: pip install --no-deps llama-cpp-cffi "
                                f"(or set {MODULE_ENV} to a cffi module of llama.cpp's C API)")
    return found[0]


def load_module(path: Path) -> ModuleType:
    """Import the cffi extension at ``path`` under its own name, after the preload libraries."""
    for lib in filter(None, os.environ.get(PRELOAD_ENV, "").split(os.pathsep)):
        try:
            ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
        except OSError as exc:
            raise EngineUnavailable(f"{PRELOAD_ENV}: cannot load {lib}: {exc}") from exc
    name = path.name.split(".", 1)[0]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise EngineUnavailable(f"{path} is not an importable extension module")
    try:
        module = importlib.util.module_from_spec(spec)  # an extension module is dlopen-ed here
        spec.loader.exec_module(module)
    except ImportError as exc:
        hint = (f"; it needs a newer C++ runtime than this host's: set {PRELOAD_ENV} to a library that "
                "provides the symbol (benchmarks/llamacpp_shim.cc)") if "undefined symbol" in str(exc) else ""
        raise EngineUnavailable(f"cannot load llama.cpp from {path.name}: {exc}{hint}") from exc
    missing = [f for f in REQUIRED if not hasattr(getattr(module, "lib", None), f)]
    if missing:
        raise EngineUnavailable(f"{path.name} lacks llama.cpp C functions {missing} (a different llama.cpp API version)")
    return module


def _distribution_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


class GgufPeer:
    """What the harness reads of a llama.cpp runner, whichever binding drives it."""

    element_bytes = 1  # unused: the GGUF's size is what a step reads
    kv_element_bytes = 2  # llama.cpp keeps the KV cache in f16 by default
    max_batch = 1
    memory_kind = "rss"
    file_weight_bytes: int  # the GGUF's size: a decode step reads the whole file once


class LlamaCppCRunner(GgufPeer):
    """A GGUF model in llama.cpp (CPU), batch 1, greedy, through the C API."""

    def __init__(self, gguf: Path, config: BenchConfig) -> None:
        path = find_module()
        module = load_module(path)
        self._lib, self._ffi = module.lib, module.ffi
        lib, ffi = self._lib, self._ffi
        self._silence_logs()
        lib.llama_backend_init()
        params = lib.llama_model_default_params()
        params.n_gpu_layers = 0
        self._model = lib.llama_model_load_from_file(str(gguf).encode(), params)
        if self._model == ffi.NULL:
            raise EngineUnavailable(f"llama.cpp could not load {gguf.name}")
        self._n_vocab = int(lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self._model)))
        ctx_params = lib.llama_context_default_params()
        n_ctx = config.prompt_tokens + config.new_tokens + 16
        ctx_params.n_ctx = n_ctx
        ctx_params.n_batch = ctx_params.n_ubatch = max(n_ctx, 32)
        ctx_params.n_threads = ctx_params.n_threads_batch = config.threads
        self._ctx = lib.llama_init_from_model(self._model, ctx_params)
        if self._ctx == ffi.NULL:
            lib.llama_model_free(self._model)
            raise EngineUnavailable("llama.cpp could not create a context")
        self.file_weight_bytes = gguf.stat().st_size
        version = _distribution_version("llama-cpp-cffi")
        self.backend = f"llama.cpp C API ({path.name}" + (f", llama-cpp-cffi {version})" if version else ")")
        self.last_tokens: list[list[int]] = []

    def _silence_logs(self) -> None:
        """Route llama.cpp's log lines to this module's logger at debug level (they flood stderr)."""
        ffi = self._ffi
        try:
            @ffi.callback("void(enum ggml_log_level, const char *, void *)")
            def _log(_level: int, text: Any, _user: Any) -> None:
                if text != ffi.NULL:
                    log.debug("llama.cpp: %s", ffi.string(text).decode(errors="replace").rstrip())
        except (ffi.error, TypeError):
            return
        self._log_callback = _log  # keep it alive as long as llama.cpp may call it
        self._lib.llama_log_set(_log, ffi.NULL)

    def _step(self, tokens: Sequence[int]) -> int:
        """Decode ``tokens`` after the cached ones; the greedy next token."""
        buf = self._ffi.new("llama_token[]", list(tokens))
        if self._lib.llama_decode(self._ctx, self._lib.llama_batch_get_one(buf, len(tokens))) != 0:
            raise RuntimeError("llama_decode failed")
        logits = self._ffi.buffer(self._lib.llama_get_logits_ith(self._ctx, -1), self._n_vocab * 4)
        return int(np.frombuffer(logits, dtype=np.float32).argmax())

    def run(self, prompts: Sequence[Sequence[int]], new_tokens: int) -> RunTiming:
        rows = as_prompt_lists(prompts)
        if len(rows) != 1:
            raise EngineUnavailable("the llama.cpp peer decodes one sequence at a time (batch 1 only)")
        self._lib.llama_kv_self_clear(self._ctx)  # no prefix reuse from the previous run
        t0 = time.perf_counter()
        out = [self._step(rows[0])]
        t1 = time.perf_counter()
        for _ in range(new_tokens - 1):
            out.append(self._step(out[-1:]))
        t2 = time.perf_counter()
        self.last_tokens = [out]
        return RunTiming(t1 - t0, t2 - t1, 1, len(rows[0]), new_tokens)

    def close(self) -> None:
        if getattr(self, "_ctx", None) is not None:
            self._lib.llama_free(self._ctx)
            self._lib.llama_model_free(self._model)
            self._ctx = None
