"""Engine adapters of the offline benchmark: torch runtime, ONNX Runtime, vLLM, llama.cpp.

Each adapter loads one model and runs greedy generation for a batch of equal-length
prompts, timing prefill (to the first token) and the decode steps separately. Optional
packages (onnxruntime, vllm, llama_cpp) are imported only when their engine loads; a
missing package or a model the engine cannot load becomes ``EngineUnavailable`` with
the reason, so the rest of the run goes on.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..runtime.decode import CausalLM, DynamicTorchLM, SamplingParams, StaticTorchLM, decode_batch
from .llamacpp_c import GgufPeer
from .runner import BenchConfig, EngineSpec, EngineUnavailable, RunTiming, as_prompt_lists, register_engine

log = logging.getLogger(__name__)


def timed_greedy(runner: Any, lm: CausalLM, ids: torch.Tensor, new_tokens: int) -> RunTiming:
    """Greedy ``new_tokens`` per row through the runtime's decode loop, timed to the first token and after.

    The tokens are kept on ``runner.last_tokens`` (the tests compare engines with them).
    """
    marks: dict[str, float] = {}
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    runner.last_tokens = decode_batch(lm, ids, params, marks=lambda k: marks.__setitem__(k, time.perf_counter()))
    return RunTiming(marks["first"] - t0, marks["end"] - marks["first"], ids.shape[0], ids.shape[1], new_tokens)


class TorchRunner:
    """The factorlm torch runtime on CPU: ``load_model`` and the decode loop over a DynamicCache, greedy."""

    kv_element_bytes = 4
    file_weight_bytes = None
    max_batch = None
    memory_kind = "rss"

    def __init__(self, model_dir: Path, config: BenchConfig) -> None:
        from ..runtime.checkpoint import load_model

        torch.set_num_threads(config.threads)
        self.model = load_model(model_dir)
        self.element_bytes = next(self.model.parameters()).element_size()
        self.kv_element_bytes = self.element_bytes
        self.last_tokens: list[list[int]] = []

    def run(self, prompts: Sequence[Sequence[int]], new_tokens: int) -> RunTiming:
        return timed_greedy(self, DynamicTorchLM(self.model), torch.tensor(as_prompt_lists(prompts)), new_tokens)

    def close(self) -> None:
        del self.model


class CompiledCpuRunner:
    """The factorlm torch runtime on CPU with the one-token decode step compiled by inductor.

    Eager decoding pays Python dispatch for every op of every layer. A static KV cache fixes
    the step's shapes, so ``torch.compile`` traces it once per batch size (during the
    benchmark's warm-up) and replays fused C++ kernels; what is left is mostly the matrix
    products, i.e. how close each model gets to memory bandwidth. Prefill runs eagerly.
    """

    element_bytes = 4
    kv_element_bytes = 4
    file_weight_bytes = None
    max_batch = None
    memory_kind = "rss"

    def __init__(self, model_dir: Path, config: BenchConfig) -> None:
        import shutil

        from ..runtime.checkpoint import load_model

        if config.device != "cpu":
            raise EngineUnavailable("torch-compile is the CPU engine; on CUDA the torch engine already compiles")
        if shutil.which("g++") is None and shutil.which("c++") is None:
            raise EngineUnavailable("torch.compile on CPU needs a C++ compiler (g++) on PATH")
        torch.set_num_threads(config.threads)
        self.model = load_model(model_dir)
        self.max_cache_len = config.prompt_tokens + config.new_tokens + 8
        self.decoders: dict[int, StaticTorchLM] = {}
        self.last_tokens: list[list[int]] = []

    def run(self, prompts: Sequence[Sequence[int]], new_tokens: int) -> RunTiming:
        ids = torch.tensor(as_prompt_lists(prompts))
        batch = ids.shape[0]
        if ids.shape[1] + new_tokens > self.max_cache_len:
            raise ValueError(f"{ids.shape[1]} + {new_tokens} tokens exceed the cache of {self.max_cache_len}")
        if batch not in self.decoders:  # one static cache (and compiled step) per batch size
            self.decoders[batch] = StaticTorchLM(self.model, self.max_cache_len, compile=True, compile_mode="default")
        return timed_greedy(self, self.decoders[batch], ids, new_tokens)

    def close(self) -> None:
        self.decoders.clear()
        del self.model


def load_torch_compile(model_dir: Path, variant: str, config: BenchConfig) -> CompiledCpuRunner:
    return CompiledCpuRunner(model_dir, config)


def load_torch(model_dir: Path, variant: str, config: BenchConfig) -> Any:
    """CPU: ``TorchRunner``; CUDA: the bf16 static-cache runner of ``factorlm.bench.cuda``."""
    if config.device == "cuda":
        from .cuda import CudaTorchRunner

        return CudaTorchRunner(model_dir, config)
    return TorchRunner(model_dir, config)


def folder_fingerprint(model_dir: Path) -> str:
    """Short hash of a model folder's config and weight files (name, size, mtime)."""
    h = hashlib.sha256((model_dir / "config.json").read_bytes())
    for f in sorted(model_dir.glob("*.safetensors")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:12]


def export_cache_dir(model_dir: Path, suffix: str = "") -> Path:
    """Where the benchmarks cache an ONNX export of ``model_dir``: named by its fingerprint and the
    exporter's graph revision, so an export by an older exporter is not reused."""
    from ..exporters.onnx.export import GRAPH_REVISION
    from ..sample_model import cache_root

    return cache_root() / "bench-onnx" / f"{model_dir.name}-{folder_fingerprint(model_dir)}-g{GRAPH_REVISION}{suffix}"


def onnx_folder(model_dir: Path, variant: str, config: BenchConfig) -> Path:
    """The ONNX export to run: given with ``onnx_dirs``, else cached by fingerprint, exported once."""
    if variant in config.onnx_dirs:
        return config.onnx_dirs[variant]
    out = export_cache_dir(model_dir)
    if not (out / "factorlm_onnx.json").is_file():
        from ..exporters.onnx import export_onnx

        log.info("no ONNX export of %s yet; exporting to %s (takes minutes for a 100M model)", model_dir, out)
        export_onnx(model_dir, out, overwrite=True, threads=config.threads)
    return out


class OnnxRunner:
    """ONNX Runtime through ``OnnxGenerator``'s ``CausalLM`` (IOBinding, cache kept as OrtValues), greedy."""

    file_weight_bytes = None
    max_batch = None
    memory_kind = "rss"

    def __init__(self, onnx_dir: Path, config: BenchConfig) -> None:
        try:
            from ..exporters.onnx import OnnxGenerator
        except ImportError as exc:
            raise EngineUnavailable(f"onnxruntime is not installed ({exc}); install the 'onnx' extra") from exc
        self.gen = OnnxGenerator(onnx_dir, threads=config.threads, device=config.device)
        self.element_bytes = 2 if self.gen.meta.get("dtype") == "fp16" else 4
        self.kv_element_bytes = np.dtype(self.gen.kv_dtype).itemsize
        self.last_tokens: list[list[int]] = []

    def run(self, prompts: Sequence[Sequence[int]], new_tokens: int) -> RunTiming:
        return timed_greedy(self, self.gen.lm(), torch.tensor(as_prompt_lists(prompts)), new_tokens)

    def close(self) -> None:
        del self.gen


def load_onnx(model_dir: Path, variant: str, config: BenchConfig) -> OnnxRunner:
    try:
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        raise EngineUnavailable(f"onnxruntime is not installed ({exc}); install the 'onnx' extra") from exc
    return OnnxRunner(onnx_folder(model_dir, variant, config), config)


class VllmRunner:
    """vLLM's offline ``LLM`` in this process; decode time = T(N tokens) - T(1 token), prefix cache off."""

    file_weight_bytes = None
    memory_kind = "rss"

    def __init__(self, model_dir: Path, config: BenchConfig) -> None:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process: seconds, not a minute
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
        try:
            from vllm import LLM
        except ImportError as exc:
            raise EngineUnavailable(f"vllm is not installed ({exc}); install the 'vllm' extra") from exc
        self.max_batch = max(config.batches)
        self.element_bytes = 4 if config.device == "cpu" else 2
        self.kv_element_bytes = self.element_bytes
        try:
            self.llm = LLM(model=str(model_dir), dtype="float32" if config.device == "cpu" else "bfloat16",
                           max_model_len=config.prompt_tokens + config.new_tokens + 16, max_num_seqs=self.max_batch,
                           enforce_eager=True, enable_prefix_caching=False, seed=0,
                           kv_cache_memory_bytes=256 * 2**20)
        except Exception as exc:  # noqa: BLE001 - any load failure means "cannot run this model here"
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise EngineUnavailable(f"vllm.LLM could not load {model_dir}: {type(exc).__name__}: {first}") from exc

    def _generate(self, rows: list[list[int]], max_tokens: int) -> float:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        t0 = time.perf_counter()
        self.llm.generate([TokensPrompt(prompt_token_ids=r) for r in rows], params, use_tqdm=False)
        return time.perf_counter() - t0

    def run(self, prompts: Sequence[Sequence[int]], new_tokens: int) -> RunTiming:
        rows = as_prompt_lists(prompts)
        first = self._generate(rows, 1)
        full = self._generate(rows, new_tokens)
        return RunTiming(first, max(full - first, 1e-9), len(rows), len(rows[0]), new_tokens)

    def close(self) -> None:
        del self.llm


def load_vllm(model_dir: Path, variant: str, config: BenchConfig) -> VllmRunner:
    return VllmRunner(model_dir, config)


class LlamaCppRunner(GgufPeer):
    """llama.cpp through llama-cpp-python on a GGUF file; one sequence at a time (CPU only: see load_llamacpp)."""

    def __init__(self, gguf: Path, config: BenchConfig) -> None:
        try:
            from llama_cpp import Llama
        except ImportError as exc:
            raise EngineUnavailable(f"llama-cpp-python is not installed ({exc}); pip install llama-cpp-python") from exc
        self.file_weight_bytes = gguf.stat().st_size
        self.backend = "llama-cpp-python " + getattr(sys.modules.get("llama_cpp"), "__version__", "?")
        self.llm = Llama(model_path=str(gguf), n_ctx=config.prompt_tokens + config.new_tokens + 16,
                         n_threads=config.threads, n_threads_batch=config.threads, n_batch=512, seed=0,
                         verbose=False)
        self.last_tokens: list[list[int]] = []

    def run(self, prompts: Sequence[Sequence[int]], new_tokens: int) -> RunTiming:
        rows = as_prompt_lists(prompts)
        if len(rows) != 1:
            raise EngineUnavailable("llama-cpp-python decodes one sequence at a time (batch 1 only)")
        self.llm.reset()  # no prefix reuse from the previous run
        t0 = time.perf_counter()
        stream = self.llm.generate(rows[0], top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True)
        out = [next(stream)]
        t1 = time.perf_counter()
        for _ in range(new_tokens - 1):
            out.append(next(stream))
        t2 = time.perf_counter()
        stream.close()
        self.last_tokens = [out]
        return RunTiming(t1 - t0, t2 - t1, 1, len(rows[0]), new_tokens)

    def close(self) -> None:
        self.llm.close()


def gguf_variant(dense: Path, factored: Path, config: BenchConfig) -> dict[str, Path]:
    """llama.cpp runs the GGUF given with ``gguf`` (there is no factored GGUF)."""
    if config.gguf is None:
        return {}
    return {"gguf-" + config.gguf.stem.rsplit(".", 1)[-1].lower(): config.gguf}


def load_llamacpp(model_file: Path, variant: str, config: BenchConfig) -> Any:
    """llama-cpp-python when installed, else llama.cpp's C API from a prebuilt module (llamacpp_c)."""
    if config.device != "cpu":
        raise EngineUnavailable("the llama.cpp peer is benchmarked on CPU only")
    try:
        return LlamaCppRunner(model_file, config)
    except EngineUnavailable as no_python_binding:
        from .llamacpp_c import LlamaCppCRunner

        try:
            return LlamaCppCRunner(model_file, config)
        except EngineUnavailable as no_c_module:
            raise EngineUnavailable(f"{no_python_binding}; {no_c_module}") from no_c_module


register_engine(EngineSpec("torch", load_torch, description="factorlm torch runtime (CPU fp32; CUDA bf16 static cache)"))
register_engine(EngineSpec("torch-compile", load_torch_compile,
                           description="factorlm torch runtime on CPU, decode step compiled by inductor (static cache)"))
register_engine(EngineSpec("onnx", load_onnx, description="ONNX Runtime via factorlm export onnx"))
register_engine(EngineSpec("vllm", load_vllm, description="vLLM offline LLM (needs the factorlm plugin for factored)"))
register_engine(EngineSpec("llamacpp", load_llamacpp, variants=gguf_variant, description="llama.cpp on a GGUF"))
