"""factorlm: compress a Hugging Face causal LM into low-rank factors and serve it anywhere.

``import factorlm`` registers the ``factorlm`` quantization method with transformers, so
``AutoModelForCausalLM.from_pretrained(factored_dir)`` loads a factored checkpoint. The
registration happens when transformers' quantizer registry is imported (at once if it
already is), so ``import factorlm`` itself imports neither torch nor transformers.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .runtime.format import FORMAT_VERSION, FactoredConfig, FactorlmError, FormatError  # noqa: E402
from .runtime.hf_integration import install as _install_transformers_hook  # noqa: E402

_install_transformers_hook()

__all__ = [
    "FORMAT_VERSION",
    "FactoredConfig",
    "FactorlmError",
    "FormatError",
    "FactoredLinear",
    "load_factored",
    "load_model",
    "save_factored",
    "__version__",
]


def __getattr__(name: str):  # lazy: keep `import factorlm` light for the CLI and the vLLM plugin
    if name == "FactoredLinear":
        from .runtime.factored_linear import FactoredLinear

        return FactoredLinear
    if name in {"load_factored", "load_model", "save_factored"}:
        from .runtime import checkpoint

        return getattr(checkpoint, name)
    raise AttributeError(f"module 'factorlm' has no attribute {name!r}")
