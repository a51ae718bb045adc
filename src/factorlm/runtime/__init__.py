"""The PyTorch runtime: FactoredLinear, the checkpoint format, loading, generation.

Names are imported on first use, so ``factorlm.runtime.format`` (standard library only)
can be read without importing torch: ``factorlm --help`` and the vLLM plugin stay fast.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ArchSpec": "arch", "compressible_linears": "arch", "get_arch": "arch", "register_arch": "arch",
    "supported_model_types": "arch",
    "factorize_model": "checkpoint", "load_factored": "checkpoint", "load_model": "checkpoint",
    "load_tokenizer": "checkpoint", "save_factored": "checkpoint",
    "FactoredLinear": "factored_linear",
    "FORMAT_VERSION": "format", "FactoredConfig": "format", "FactorlmError": "format", "FormatError": "format",
    "read_factored_config": "format",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
