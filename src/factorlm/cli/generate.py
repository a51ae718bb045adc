"""``factorlm generate DIR --prompt ...``: stream a completion from a dense or factored model."""

from __future__ import annotations

import argparse
import sys
import time

from .common import add_quant_kernel_flag, float_in, non_negative_float, non_negative_int, positive_int

ENGINES = ("torch", "onnx")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="generate text from a model folder (dense or factored)")
    p.add_argument("model", help="model folder, or 'sample' for the built-in sample model")
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn with the chat template")
    p.add_argument("--system", default=None, help="system message (with --chat)")
    p.add_argument("--max-new-tokens", type=positive_int, default=128)
    p.add_argument("--temperature", type=non_negative_float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float_in(0, 1, low_open=True), default=1.0)
    p.add_argument("--top-k", type=non_negative_int, default=0, help="0 = no top-k cut")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--engine", choices=ENGINES, default="torch",
                   help="torch: model folder; onnx: a folder written by 'factorlm export onnx'")
    p.add_argument("--onnx-device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="ONNX Runtime execution provider (auto: CUDA when onnxruntime-gpu sees a GPU)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    add_quant_kernel_flag(p)
    p.add_argument("--compile", action="store_true",
                   help="torch engine: static KV cache with the decode step compiled by torch.compile "
                        "(needs a C++ compiler on CPU; the first tokens pay the compile time)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..runtime.checkpoint import load_model, load_tokenizer
    from ..runtime.generate import GenerationStats, SamplingParams, encode_prompt, stream_text
    from .common import check_quant_kernel, resolve_model_path

    check_quant_kernel(args.quant_kernel)
    if args.threads:
        torch.set_num_threads(args.threads)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, stop=tuple(args.stop))
    path = resolve_model_path(args.model)
    if args.engine == "onnx":
        if args.compile:
            print("factorlm generate: --compile applies to the torch engine only", file=sys.stderr)
            return 2
        return _run_onnx(args, path, params)
    started = time.perf_counter()
    model = load_model(path, quant_kernel=args.quant_kernel)
    tokenizer = load_tokenizer(path)
    load_s = time.perf_counter() - started
    input_ids = encode_prompt(tokenizer, args.prompt, chat=args.chat, system=args.system)
    stats = GenerationStats()
    for piece in stream_text(model, tokenizer, input_ids, params, stats, compile=args.compile):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    print(
        f"[{stats.prompt_tokens} prompt + {stats.new_tokens} new tokens; load {load_s:.1f}s, "
        f"TTFT {stats.ttft_s * 1000:.0f} ms, decode {stats.decode_tokens_per_s:.1f} tok/s; "
        f"finish: {stats.finish_reason}]",
        file=sys.stderr,
    )
    return 0


def _run_onnx(args: argparse.Namespace, path, params) -> int:
    """The same streaming loop on an exported ONNX folder (factorlm.exporters.onnx)."""
    from ..exporters.onnx import load_onnx_engine
    from ..runtime.generate import GenerationStats, encode_prompt

    started = time.perf_counter()
    engine = load_onnx_engine(path, threads=args.threads, device=args.onnx_device)
    tokenizer = engine.tokenizer
    load_s = time.perf_counter() - started
    input_ids = encode_prompt(tokenizer, args.prompt, chat=args.chat, system=args.system)
    stats = GenerationStats()
    for piece in engine.stream_text(tokenizer, input_ids, params, stats):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    print(
        f"[onnx {engine.device}: {stats.prompt_tokens} prompt + {stats.new_tokens} new tokens; load {load_s:.1f}s, "
        f"TTFT {stats.ttft_s * 1000:.0f} ms, decode {stats.decode_tokens_per_s:.1f} tok/s; "
        f"finish: {stats.finish_reason}]",
        file=sys.stderr,
    )
    return 0
