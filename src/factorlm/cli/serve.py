"""``factorlm serve DIR --engine torch|onnx|vllm``: an OpenAI-compatible HTTP endpoint."""

from __future__ import annotations

import argparse
import importlib
import os
from typing import Any

from ..runtime.format import FactorlmError

ENGINES = ("torch", "onnx", "vllm")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="serve a model folder over an OpenAI-compatible HTTP API")
    p.add_argument("model", help="model folder (dense or factored), or 'sample' for the built-in sample model")
    p.add_argument("--engine", choices=ENGINES, default="torch",
                   help="torch: built-in continuous batching; onnx: ONNX Runtime export; vllm: hand over to vLLM")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("FACTORLM_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $FACTORLM_API_KEY)")
    p.add_argument("--served-model-name", default=None, help="model id clients send (default: folder name)")
    p.add_argument("--max-batch", type=int, default=16, help="sequences decoded together")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests before answering 429")
    p.add_argument("--max-model-len", type=int, default=None, help="context limit (prompt + output tokens)")
    p.add_argument("--max-tokens-limit", type=int, default=None, help="largest max_tokens a request may ask for")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.set_defaults(func=run, extra_args=[], passes_extra_args=True)
    p.epilog = "With --engine vllm, arguments after the model folder that factorlm does not know go to vLLM."


def _onnx_engine(path: Any, args: argparse.Namespace) -> Any:
    try:
        module = importlib.import_module("factorlm.exporters.onnx")
    except ImportError as exc:
        raise FactorlmError(f"the onnx engine is not available in this installation ({exc})") from exc
    factory = getattr(module, "create_engine", None)
    if factory is None:
        raise FactorlmError("the onnx engine is not available yet: factorlm.exporters.onnx has no create_engine()")
    return factory(path, max_batch=args.max_batch, max_queue=args.max_queue, max_model_len=args.max_model_len,
                   served_model_name=args.served_model_name)


def run(args: argparse.Namespace) -> int:
    from .common import resolve_model_path

    path = resolve_model_path(args.model)
    if args.engine == "vllm":
        try:
            launch = importlib.import_module("factorlm.exporters.vllm").launch_vllm_server
        except (ImportError, AttributeError) as exc:
            raise FactorlmError(f"the vllm engine is not available: {exc}") from exc
        extra = ["--host", args.host, "--port", str(args.port)]
        if args.api_key:
            extra += ["--api-key", args.api_key]
        if args.served_model_name:
            extra += ["--served-model-name", args.served_model_name]
        if args.max_model_len:
            extra += ["--max-model-len", str(args.max_model_len)]
        extra += list(args.extra_args)
        return int(launch(str(path), extra) or 0)
    if args.extra_args:
        raise FactorlmError(f"unrecognized arguments for --engine {args.engine}: {' '.join(args.extra_args)}")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from ..serving.app import create_app
    from ..serving.server import torch_engine, uvicorn_server

    if args.engine == "onnx":
        engine = _onnx_engine(path, args)
    else:
        engine = torch_engine(path, max_batch=args.max_batch, max_queue=args.max_queue,
                              max_model_len=args.max_model_len, served_model_name=args.served_model_name)
    app = create_app(engine, api_key=args.api_key, max_tokens_limit=args.max_tokens_limit, model_root=str(path))
    print(f"factorlm: serving {engine.model_name!r} ({args.engine}) on http://{args.host}:{args.port}/v1", flush=True)
    uvicorn_server(app, args.host, args.port).run()
    return 0
