"""The engine interface of the offline benchmark and its registry.

An engine turns a model folder into a ``Runner`` that generates greedily for a batch of
equal-length prompts and times itself (wall clock on CPU, CUDA events on GPU). Engines
register here by name; the harness asks the registry, never a model or engine name
pattern. Adding an engine is one ``register_engine`` call.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..runtime.format import FactorlmError


class EngineUnavailable(Exception):
    """An engine cannot run here (missing package, no GPU, unsupported model); the message says why."""


@dataclass(frozen=True)
class RunTiming:
    """One timed generation of ``batch`` prompts of ``prompt_tokens`` tokens each.

    ``ttft_s`` covers the prefill forward pass and the choice of the first token;
    ``decode_s`` the remaining ``new_tokens - 1`` one-token steps.
    ``peak_memory_bytes`` is set by engines that measure memory themselves (GPU).
    """

    ttft_s: float
    decode_s: float
    batch: int
    prompt_tokens: int
    new_tokens: int
    peak_memory_bytes: int | None = None

    @property
    def decode_tok_s(self) -> float:
        """Generated tokens per second over the decode steps, summed over the batch."""
        steps = self.new_tokens - 1
        return self.batch * steps / self.decode_s if steps > 0 and self.decode_s > 0 else float("nan")

    @property
    def prefill_tok_s(self) -> float:
        """Prompt tokens per second through prefill (including the first token's sampling)."""
        return self.batch * self.prompt_tokens / self.ttft_s if self.ttft_s > 0 else float("nan")


class Runner(Protocol):
    """A loaded model in one engine.

    ``element_bytes`` / ``kv_element_bytes``: bytes per weight / KV element it reads.
    ``file_weight_bytes``: set when the engine's own format decides the bytes read per
    step (e.g. a quantized GGUF); None means the checkpoint's footprint at ``element_bytes``.
    ``max_batch``: largest batch it runs (None: any). ``memory_kind``: what peak memory means.
    """

    element_bytes: int
    kv_element_bytes: int
    file_weight_bytes: int | None
    max_batch: int | None
    memory_kind: str

    def run(self, prompts: Sequence[Sequence[int]], new_tokens: int) -> RunTiming: ...

    def close(self) -> None: ...


@dataclass
class BenchConfig:
    """What the offline benchmark runs; engines read the options they need."""

    engines: list[str] = field(default_factory=lambda: ["torch"])
    batches: list[int] = field(default_factory=lambda: [1, 4])
    prompt_tokens: int = 32
    new_tokens: int = 32
    repeats: int = 3
    threads: int = 1
    device: str = "cpu"
    warmup_tokens: int = 4
    bandwidth_mib: int = 256
    onnx_dirs: dict[str, Path] = field(default_factory=dict)
    gguf: Path | None = None
    compile: bool = True
    memory: str = "inprocess"  # CPU peak RSS: "isolated" (fresh process per model), "inprocess", "off"

    def __post_init__(self) -> None:
        if not self.engines:
            raise FactorlmError("no engine chosen; pass --engines torch,onnx,...")
        if not self.batches or min(self.batches) < 1:
            raise FactorlmError(f"batch sizes must be >= 1, got {self.batches}")
        if self.prompt_tokens < 1 or self.new_tokens < 2:
            raise FactorlmError("need prompt_tokens >= 1 and new_tokens >= 2 (decode speed needs two tokens)")
        if self.repeats < 1 or self.threads < 1:
            raise FactorlmError(f"repeats and threads must be >= 1, got {self.repeats}, {self.threads}")
        if self.memory not in ("isolated", "inprocess", "off"):
            raise FactorlmError(f"unknown memory mode {self.memory!r}; choose isolated, inprocess or off")
        if self.device not in ("cpu", "cuda"):
            raise FactorlmError(f"unknown device {self.device!r}; choose cpu or cuda")


VariantFn = Callable[[Path, Path, BenchConfig], dict[str, Path]]
LoadFn = Callable[[Path, str, BenchConfig], Runner]


def dense_and_factored(dense: Path, factored: Path, config: BenchConfig) -> dict[str, Path]:
    """The usual pair of models an engine runs: the two folders it was given."""
    return {"dense": dense, "factored": factored}


@dataclass(frozen=True)
class EngineSpec:
    """An engine: which models it runs (``variants``) and how it loads one (``load``)."""

    name: str
    load: LoadFn
    variants: VariantFn = dense_and_factored
    description: str = ""


ENGINES: dict[str, EngineSpec] = {}
_BUILTIN_MODULES = ("factorlm.bench.engines",)


def register_engine(spec: EngineSpec) -> EngineSpec:
    """Add an engine to the registry (a later registration of the same name replaces it)."""
    ENGINES[spec.name] = spec
    return spec


def get_engine(name: str) -> EngineSpec:
    """The registered engine ``name``; a clear error listing the known names otherwise."""
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)
    if name not in ENGINES:
        raise FactorlmError(f"unknown engine {name!r}; known engines: {', '.join(sorted(ENGINES))}")
    return ENGINES[name]


def as_prompt_lists(prompts: Any) -> list[list[int]]:
    """Prompts as plain lists of ints, checking they all have the same length."""
    rows = [list(map(int, p)) for p in prompts]
    if not rows or len({len(r) for r in rows}) != 1 or not rows[0]:
        raise FactorlmError("the offline benchmark needs one or more non-empty prompts of equal length")
    return rows
