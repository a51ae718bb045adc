"""Teach transformers to load factored checkpoints: ``AutoModelForCausalLM.from_pretrained(dir)``.

``import factorlm`` calls :func:`register_with_transformers`, which adds a quantization
config class and an ``HfQuantizer`` under the name ``factorlm``. Before weights load, the
quantizer swaps the listed linears for ``FactoredLinear`` of the recorded ranks, so the
checkpoint's ``weight_u``/``weight_v`` tensors land in place. No trust_remote_code needed.
Separate correctors load as ``CorrectedLinear`` layers (trainable; exact outputs).
"""

from __future__ import annotations

import logging
from typing import Any

from .format import QUANT_METHOD, FactoredConfig, FormatError

logger = logging.getLogger(__name__)
_REGISTERED = False


def register_with_transformers() -> None:
    """Register the config class and quantizer once per process (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
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

        def _process_model_before_weight_loading(self, model: Any, **kwargs: Any) -> None:
            from .checkpoint import replace_with_factored

            corrector_ranks = getattr(self.quantization_config, "corrector_ranks", None) or {}
            replace_with_factored(model, self.quantization_config.ranks, device="meta", corrector_ranks=corrector_ranks)

        def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> Any:
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


def safe_register() -> None:
    """Register unless transformers is absent or incompatible; never break ``import factorlm``."""
    try:
        register_with_transformers()
    except ImportError:
        logger.debug("transformers not importable; factored checkpoints load only through load_factored()")
    except (AttributeError, TypeError, FormatError) as exc:  # an incompatible transformers version
        logger.warning("could not register the factorlm quantizer with transformers: %s", exc)
