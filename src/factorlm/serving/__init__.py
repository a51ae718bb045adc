"""OpenAI-compatible serving: an engine layer with continuous batching and a FastAPI app over it."""

from .engine import Engine, EngineDeadError, GenerationRequest, QueueFullError, RequestHandle, TokenEvent

__all__ = ["Engine", "EngineDeadError", "GenerationRequest", "QueueFullError", "RequestHandle", "TokenEvent"]
