"""The PyTorch runtime: FactoredLinear, the checkpoint format, loading, generation."""

from .arch import ArchSpec, compressible_linears, get_arch, register_arch, supported_model_types
from .checkpoint import factorize_model, load_factored, load_model, load_tokenizer, save_factored
from .factored_linear import FactoredLinear
from .format import FORMAT_VERSION, FactoredConfig, FactorlmError, FormatError, read_factored_config

__all__ = [
    "ArchSpec",
    "FORMAT_VERSION",
    "FactoredConfig",
    "FactoredLinear",
    "FactorlmError",
    "FormatError",
    "compressible_linears",
    "factorize_model",
    "get_arch",
    "load_factored",
    "load_model",
    "load_tokenizer",
    "read_factored_config",
    "register_arch",
    "save_factored",
    "supported_model_types",
]
