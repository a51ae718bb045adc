"""ONNX export of dense and factored checkpoints, and an ONNX Runtime generator.

``export_onnx`` writes a validated decoder graph with a KV cache; ``OnnxGenerator`` /
``load_onnx_engine`` run it. Heavy imports (torch.onnx, onnxruntime) happen on use. The
server's onnx engine lives in ``factorlm.serving.onnx_engine``; nothing here imports the server.
"""

from __future__ import annotations

from typing import Any

__all__ = ["export_onnx", "OnnxGenerator", "load_onnx_engine"]


def __getattr__(name: str) -> Any:
    if name == "export_onnx":
        from .export import export_onnx

        return export_onnx
    if name in ("OnnxGenerator", "load_onnx_engine"):
        from . import generator

        return getattr(generator, name)
    raise AttributeError(name)
