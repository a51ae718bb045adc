"""Teach transformers to load factored checkpoints: ``AutoModelForCausalLM.from_pretrained(dir)``.

``import factorlm`` calls :func:`install`: it registers a quantization config class and an
``HfQuantizer`` under the name ``factorlm`` at once when transformers' quantizer registry
is already imported, and otherwise the moment it is (an import hook), so ``import
factorlm`` itself stays light (no torch, no transformers) and the CLI starts fast. Before
weights load, the quantizer checks every tensor header against the config with the same
function as ``load_factored`` (:mod:`.verify`: same checks, same messages), then swaps the
listed linears for ``FactoredLinear`` of the recorded ranks, so the checkpoint's
``weight_u``/``weight_v`` tensors land in place. No trust_remote_code needed. Separate
correctors load as ``CorrectedLinear`` layers (trainable; exact outputs). A quantized
checkpoint (format version 2) gets quantized layers whose codes and scales load unchanged.
"""

from __future__ import annotations

import importlib.abc
import logging
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from .format import QUANT_METHOD, FactoredConfig
from .import_hooks import WrappingLoader, wrapped_spec

logger = logging.getLogger(__name__)
_REGISTERED = False
REGISTRY_MODULE = "transformers.quantizers.auto"


def install() -> None:
    """Register with transformers now if its quantizer registry is loaded, else when it loads."""
    module = sys.modules.get(REGISTRY_MODULE)
    if module is not None and not getattr(getattr(module, "__spec__", None), "_initializing", False):
        safe_register(module)
    elif not any(isinstance(f, _RegisterOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport())


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the loader of transformers' quantizer registry to register after it runs."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != REGISTRY_MODULE or _REGISTERED:
            return None
        return wrapped_spec(self, fullname, path, target, _RegisteringLoader)


class _RegisteringLoader(WrappingLoader):
    """Runs the real loader, then registers the factorlm quantizer in the fresh module."""

    def exec_module(self, module: ModuleType) -> None:
        self.inner.exec_module(module)
        safe_register(module)

    def __getattr__(self, name: str) -> Any:  # get_source, get_resource_reader, ...: the real loader's
        return getattr(self.inner, name)


def register_with_transformers(qauto: ModuleType | None = None) -> None:
    """Register the config class and quantizer once per process (idempotent).

    ``qauto`` is ``transformers.quantizers.auto`` when the import hook calls this from inside
    that module's import.
    """
    global _REGISTERED
    if _REGISTERED:
        return
    if qauto is None:
        from transformers.quantizers import auto as qauto
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    if QUANT_METHOD in qauto.AUTO_QUANTIZER_MAPPING:
        _REGISTERED = True
        return

    class FactorlmHfConfig(QuantizationConfigMixin):
        """transformers-side view of the ``quantization_config`` block (validated on creation)."""

        def __init__(self, **block: Any) -> None:
            block.setdefault("quant_method", QUANT_METHOD)
            self.block = FactoredConfig.from_dict(block, source="config.json").to_dict()
            self.quant_method = QUANT_METHOD
            for key, value in self.block.items():
                setattr(self, key, value)

        @classmethod
        def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs: Any):
            config = cls(**config_dict)
            return (config, kwargs) if return_unused_kwargs else config

        def to_dict(self) -> dict[str, Any]:
            return dict(self.block)

        def to_diff_dict(self) -> dict[str, Any]:
            return self.to_dict()

    class FactorlmHfQuantizer(HfQuantizer):
        """Swap linears for FactoredLinear before weights load; nothing to do afterwards."""

        requires_calibration = True

        def _process_model_before_weight_loading(self, model: Any, checkpoint_files: Any = None,
                                                 **kwargs: Any) -> None:
            from .checkpoint import replace_with_factored

            block = FactoredConfig.from_dict(self.quantization_config.to_dict(), source="config.json")
            if checkpoint_files:
                check_before_loading(model, block, [Path(f) for f in checkpoint_files])
            else:
                logger.warning("transformers gave no checkpoint files; the tensors are not checked before loading")
            replace_with_factored(model, block.ranks, device="meta", corrector_ranks=block.corrector_ranks)
            if block.quantized:  # format version 2: integer codes + scales land in the quantized layers' buffers
                from .quant_linear import replace_with_quantized

                replace_with_quantized(model, block.ranks, block.quantized_dense, int(block.bits or 0),
                                       block.group_size, embeddings=block.quantized_embeddings)

        def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> Any:
            from .quant_linear import prepare_quantized

            prepare_quantized(model)  # the same matmul path as load_factored, so logits are identical
            return model

        def param_needs_quantization(self, model: Any, param_name: str, **kwargs: Any) -> bool:
            return False

        def is_serializable(self, safe_serialization: Any = None) -> bool:
            return True

        @property
        def is_trainable(self) -> bool:
            return True

    qauto.register_quantization_config(QUANT_METHOD)(FactorlmHfConfig)
    qauto.register_quantizer(QUANT_METHOD)(FactorlmHfQuantizer)
    _REGISTERED = True
    logger.debug("registered the factorlm quantizer with transformers")


def check_before_loading(model: Any, block: FactoredConfig, files: list[Path]) -> None:
    """What ``load_factored`` checks, on transformers' skeleton (dense still) and files: same messages."""
    from .safetensors_header import read_headers
    from .verify import checkpoint_problems, raise_on_problems

    root = files[0].parent
    raise_on_problems(checkpoint_problems(model, read_headers(files), block, root), root)


def safe_register(qauto: ModuleType | None = None) -> None:
    """Register unless transformers is absent or incompatible; never break ``import factorlm`` or transformers."""
    try:
        register_with_transformers(qauto)
    except ImportError:
        logger.debug("transformers not importable; factored checkpoints load only through load_factored()")
    except Exception as exc:  # an incompatible transformers version must not break its own import
        logger.warning("could not register the factorlm quantizer with transformers: %s", exc)
