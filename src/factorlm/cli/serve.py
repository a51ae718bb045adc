"""``factorlm serve DIR --engine torch|onnx|vllm``: an OpenAI-compatible HTTP endpoint."""

from __future__ import annotations

import argparse
import importlib
import os

from ..runtime.format import FactorlmError
from ..serving.engines import ENGINES
from ..serving.limits import MIB, HttpLimits
from .common import add_quant_kernel_flag

VLLM = "vllm"  # not an in-process engine: the process is handed over to vLLM's own server


def _positive(kind: type) -> type:
    def parse(text: str) -> object:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse  # type: ignore[return-value]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="serve a model folder over an OpenAI-compatible HTTP API")
    p.add_argument("model", help="model folder (dense or factored), or 'sample' for the built-in sample model")
    p.add_argument("--engine", choices=(*ENGINES, VLLM), default="torch",
                   help="torch: built-in continuous batching; onnx: ONNX Runtime export; vllm: hand over to vLLM")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("FACTORLM_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $FACTORLM_API_KEY)")
    p.add_argument("--served-model-name", default=None,
                   help="model id clients send and /v1/models lists (default: the folder's name)")
    p.add_argument("--max-batch", type=_positive(int), default=16,
                   help="sequences decoded together; a request with more (n x prompts) gets 400")
    p.add_argument("--max-queue", type=int, default=64, help="waiting sequences before answering 429")
    p.add_argument("--max-model-len", type=_positive(int), default=None,
                   help="context limit (prompt + output tokens)")
    p.add_argument("--max-tokens-limit", type=_positive(int), default=None,
                   help="largest max_tokens a request may ask for")
    p.add_argument("--threads", type=_positive(int), default=None,
                   help="CPU threads of the forward pass (torch, and ONNX Runtime for --engine onnx)")
    add_quant_kernel_flag(p)
    p.add_argument("--compile", action="store_true",
                   help="torch engine: a request decoding alone runs a static KV cache with the decode step "
                        "compiled by torch.compile (needs a C++ compiler on CPU; the first requests pay the compile "
                        "time); concurrent requests are batched as without it")
    limits = HttpLimits()
    p.add_argument("--max-body-mib", type=_positive(float), default=limits.max_body_bytes / MIB,
                   help="largest request body, announced or chunked (default %(default)g MiB; larger: 413)")
    p.add_argument("--body-timeout", type=_positive(float), default=limits.body_timeout_s,
                   help="seconds for a whole request body to arrive (default %(default)g; later: 408, closed)")
    p.add_argument("--header-timeout", type=_positive(float), default=limits.header_timeout_s,
                   help="seconds for a request's headers to arrive (default %(default)g; later: closed)")
    p.add_argument("--keep-alive-timeout", type=_positive(float), default=limits.keep_alive_timeout_s,
                   help="seconds an idle keep-alive connection stays open (default %(default)g)")
    p.set_defaults(func=run, extra_args=[], passes_extra_args=True)
    p.epilog = "With --engine vllm, arguments after the model folder that factorlm does not know go to vLLM."


def _launch_vllm(path: str, args: argparse.Namespace) -> int:
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
    return int(launch(path, extra) or 0)


def run(args: argparse.Namespace) -> int:
    from .common import check_quant_kernel, resolve_model_path

    check_quant_kernel(args.quant_kernel)
    path = resolve_model_path(args.model)
    if args.engine == VLLM:
        return _launch_vllm(str(path), args)
    if args.extra_args:
        raise FactorlmError(f"unrecognized arguments for --engine {args.engine}: {' '.join(args.extra_args)}")
    from ..serving.app import create_app
    from ..serving.engines import EngineOptions, create_engine
    from ..serving.server import uvicorn_server

    limits = HttpLimits(max_body_bytes=int(args.max_body_mib * MIB), body_timeout_s=args.body_timeout,
                        header_timeout_s=args.header_timeout, keep_alive_timeout_s=args.keep_alive_timeout)
    options = EngineOptions(max_batch=args.max_batch, max_queue=args.max_queue, max_model_len=args.max_model_len,
                            served_model_name=args.served_model_name, threads=args.threads, compile=args.compile,
                            quant_kernel=args.quant_kernel)
    engine = create_engine(args.engine, path, options)
    app = create_app(engine, api_key=args.api_key, max_tokens_limit=args.max_tokens_limit, limits=limits)
    print(f"factorlm: serving {engine.model_name!r} ({args.engine}) on http://{args.host}:{args.port}/v1", flush=True)
    uvicorn_server(app, args.host, args.port).run()  # with the app's limits
    return 0
