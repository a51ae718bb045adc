"""OpenAI-compatible serving: engines with continuous batching and a FastAPI app over them.

Layout (imports point down the list): ``protocol`` (request schemas) and ``errors``;
``engine`` (the engine protocol and its event types); ``torch_engine`` and ``batch_cache``
(the scheduler); ``onnx_engine`` (the scheduler over an ONNX Runtime graph); ``engines`` (the registry that builds an engine for a folder);
``tokenize``, ``openai_format``, ``streaming`` and ``handlers`` (request handling);
``middleware`` and ``app`` (the HTTP app); ``server`` (uvicorn). Names are loaded on use,
so ``import factorlm.serving.engines`` stays light.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "Engine": "engine", "EngineDeadError": "engine", "GenerationRequest": "engine", "NeverFitsError": "engine",
    "QueueFullError": "engine", "RequestHandle": "engine", "TokenEvent": "engine",
    "EngineOptions": "engines", "create_engine": "engines", "ENGINES": "engines",
    "HttpLimits": "limits", "create_app": "app",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(name)
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
