"""vLLM plugin: serve factored checkpoints with ``vllm serve DIR`` / ``vllm.LLM(DIR)``.

The checkpoint is read by a vLLM quantization method named ``factorlm`` (``config.py``)
whose linear method (``linear.py``) stores each layer's factors and runs two GEMMs per
factored piece; the tensor-parallel shard arithmetic lives in ``plan.py`` (no vLLM
import), and ``head.py`` loads an LM head quantized with ``quantize --lm-head``. vLLM
finds the plugin through the ``vllm.general_plugins`` entry point, which calls
:func:`register` once in every vLLM process (front end, engine core, workers).

Nothing here imports vLLM at module import time, so ``import factorlm`` stays light and
works where vLLM is not installed.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["register", "launch_vllm_server", "vllm_server_command"]

_REGISTERED = False


def register() -> None:
    """Register the ``factorlm`` quantization method with vLLM (idempotent, lazy imports)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from .config import register_quant_config

    register_quant_config()
    _REGISTERED = True
    logger.debug("registered the factorlm quantization method with vLLM")


def __getattr__(name: str) -> Any:
    if name in ("launch_vllm_server", "vllm_server_command"):
        from . import server

        return getattr(server, name)
    raise AttributeError(name)
