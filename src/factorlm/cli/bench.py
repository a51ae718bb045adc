"""``factorlm bench``: ``serving`` load-tests any OpenAI-compatible endpoint; ``offline`` times engines
on a dense and a factored folder in one run (see ``factorlm.bench.offline``); ``pareto`` measures quality
and speed of several factored checkpoints against their dense model (see ``factorlm.bench.pareto_run``)."""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from .common import check_output, device_type, float_in, non_negative_int, positive_int

_COLUMNS = ["max_concurrency", "completed", "failed", "request_throughput", "output_throughput",
            "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p99_itl_ms", "median_e2el_ms"]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="benchmarks (offline engines, serving load generator)")
    sub = p.add_subparsers(dest="bench_command", required=True)
    s = sub.add_parser("serving", help="concurrency sweep against an OpenAI-compatible /v1/completions")
    s.add_argument("--url", required=True, help="base URL, e.g. http://127.0.0.1:8000")
    s.add_argument("--model", required=True, help="model name the server expects")
    s.add_argument("--prompt", action="append", default=None, help="prompt text (repeatable)")
    s.add_argument("--num-prompts", type=positive_int, default=8)
    s.add_argument("--max-tokens", type=positive_int, default=32)
    s.add_argument("--concurrency", type=positive_int, nargs="+", default=[1])
    s.add_argument("--request-rate", type=float_in(0, float("inf"), low_open=True), default=float("inf"),
                   help="Poisson arrivals per second")
    s.set_defaults(func=run_serving)
    o = sub.add_parser("offline", help="decode/prefill speed, bytes, memory: dense vs factored, per engine")
    o.add_argument("dense", help="dense model folder (or 'sample')")
    o.add_argument("factored", help="factored checkpoint folder")
    o.add_argument("--engines", default="torch", help="comma list: torch,onnx,vllm,llamacpp")
    o.add_argument("--batch", default="1,4", help="comma list of batch sizes")
    o.add_argument("--prompt-tokens", type=positive_int, default=32)
    o.add_argument("--new-tokens", type=positive_int, default=32)
    o.add_argument("--repeats", type=positive_int, default=3)
    o.add_argument("--threads", type=positive_int, default=1, help="torch threads and ONNX Runtime intra-op threads")
    o.add_argument("--device", type=device_type(("cpu", "cuda"), index=False), default="cpu", help="cpu or cuda")
    o.add_argument("--bandwidth-mib", type=non_negative_int, default=256, help="memory-bandwidth probe size (0: skip)")
    o.add_argument("--onnx-dense", type=Path, help="ONNX export of DENSE (default: exported once into the cache)")
    o.add_argument("--onnx-factored", type=Path, help="ONNX export of FACTORED (default: as above)")
    o.add_argument("--gguf", help="GGUF file for the llamacpp engine ('sample': the sample model's Q4_1 GGUF)")
    o.add_argument("--memory", choices=["isolated", "inprocess", "off"], default="isolated",
                   help="CPU peak RSS: a fresh process per model (default), inside this process, or not at all")
    o.add_argument("--no-compile", action="store_true", help="CUDA: eager decode instead of CUDA graphs")
    o.add_argument("--json-out", type=Path, help="also write the result JSON here (atomically)")
    o.add_argument("--md-out", type=Path, help="also write the Markdown table here (atomically)")
    o.set_defaults(func=run_offline_cmd)
    q = sub.add_parser("pareto", help="perplexity, zero-shot, bytes and decode speed per operating point vs dense")
    q.add_argument("dense", nargs="?", default="sample", help="dense model folder (default: 'sample')")
    q.add_argument("--checkpoint", action="append", default=[], metavar="NAME=DIR",
                   help="a factored checkpoint to measure (repeatable)")
    q.add_argument("--keep", type=float_in(0, 1, low_open=True), nargs="*", default=[],
                   help="keep ratios to compress with --recipe (cached by recipe hash) and measure")
    q.add_argument("--recipe", type=Path, help="recipe JSON/YAML for --keep (default: saes + mgaa, sample calibration)")
    q.add_argument("--text", type=Path, required=True, help="perplexity text (e.g. WikiText-2 test, raw)")
    q.add_argument("--ppl-tokens", type=positive_int, default=49152)
    q.add_argument("--zeroshot-limit", type=non_negative_int, default=200, help="rows per task (0: skip zero-shot)")
    q.add_argument("--tasks", default="piqa,arc_easy,arc_challenge,hellaswag,winogrande,boolq")
    q.add_argument("--engines", default="torch,onnx,onnx-int8", help="comma list: torch,onnx,onnx-int8,vllm")
    q.add_argument("--batch", default="1,8", help="comma list of batch sizes")
    q.add_argument("--prompt-tokens", type=positive_int, default=32)
    q.add_argument("--new-tokens", type=positive_int, default=32)
    q.add_argument("--repeats", type=positive_int, default=3)
    q.add_argument("--threads", type=positive_int, default=1)
    q.add_argument("--output-dir", type=Path, default=Path("."), help="writes pareto.md, pareto.json, pareto.png")
    q.add_argument("--cache", type=Path, help="score and checkpoint cache (default: <factorlm cache>/pareto)")
    q.add_argument("--no-plot", action="store_true", help="skip pareto.png")
    q.set_defaults(func=run_pareto_cmd)


def run_serving(args: argparse.Namespace) -> int:
    import asyncio

    from ..bench.loadgen import run_load

    base = args.prompt or ["Write a short note about the river and the old bridge."]
    prompts = [base[i % len(base)] for i in range(args.num_prompts)]
    rows = [asyncio.run(run_load(args.url, args.model, prompts, max_tokens=args.max_tokens,
                                 concurrency=c, request_rate=args.request_rate))
            for c in args.concurrency]
    print(" | ".join(_COLUMNS))
    for r in rows:
        print(" | ".join(f"{r[c]:.2f}" if isinstance(r[c], float) else str(r[c]) for c in _COLUMNS))
    print(json.dumps({"results": rows}))
    return 0


def _int_list(text: str, what: str) -> list[int]:
    from ..runtime.format import FactorlmError

    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise FactorlmError(f"{what} must be a comma list of integers, got {text!r}") from exc
    if not values or min(values) < 1:
        raise FactorlmError(f"{what} must be a comma list of integers >= 1, got {text!r}")
    return values


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _command_line(args: argparse.Namespace) -> str:
    """The equivalent command line, recorded with the result (defaults spelled out)."""
    parts = ["factorlm", "bench", "offline", args.dense, args.factored, "--engines", args.engines, "--batch", args.batch,
             "--prompt-tokens", args.prompt_tokens, "--new-tokens", args.new_tokens, "--repeats", args.repeats,
             "--threads", args.threads, "--device", args.device, "--memory", args.memory]
    for flag, value in (("--onnx-dense", args.onnx_dense), ("--onnx-factored", args.onnx_factored),
                        ("--gguf", args.gguf)):
        if value:
            parts += [flag, value]
    if args.no_compile:
        parts.append("--no-compile")
    return " ".join(shlex.quote(str(p)) for p in parts)


def run_offline_cmd(args: argparse.Namespace) -> int:
    from ..bench.offline import format_markdown, run_offline
    from ..bench.runner import BenchConfig
    from .common import resolve_model_path

    for out in (args.json_out, args.md_out):
        if out:
            check_output(out, kind="file")
    gguf = None
    if args.gguf == "sample":
        from ..sample_model import find_gguf

        gguf = find_gguf()
    elif args.gguf:
        gguf = Path(args.gguf)
    onnx_dirs = {k: v for k, v in (("dense", args.onnx_dense), ("factored", args.onnx_factored)) if v}
    config = BenchConfig(engines=[e.strip() for e in args.engines.split(",") if e.strip()],
                         batches=_int_list(args.batch, "--batch"), prompt_tokens=args.prompt_tokens,
                         new_tokens=args.new_tokens, repeats=args.repeats, threads=args.threads, device=args.device,
                         bandwidth_mib=args.bandwidth_mib, onnx_dirs=onnx_dirs, gguf=gguf,
                         compile=not args.no_compile, memory=args.memory)
    result = run_offline(resolve_model_path(args.dense), resolve_model_path(args.factored), config)
    result["command"] = _command_line(args)
    table = format_markdown(result, result["command"])
    if args.md_out:
        _write_atomic(args.md_out, table)
    if args.json_out:
        _write_atomic(args.json_out, json.dumps(result, indent=2) + "\n")
    print(table)
    print(json.dumps(result))
    return 0


def _checkpoints(specs: list[str]) -> dict[str, Path]:
    from ..runtime.format import FactorlmError

    out: dict[str, Path] = {}
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not folder:
            raise FactorlmError(f"--checkpoint must be NAME=DIR, got {spec!r}")
        if not (Path(folder) / "config.json").is_file():
            raise FactorlmError(f"--checkpoint {name}: {folder}/config.json not found")
        out[name] = Path(folder)
    return out


def _read_recipe(path: Path | None) -> dict:
    from ..bench.pareto import validate_recipe
    from ..runtime.format import FactorlmError

    if path is None:
        return validate_recipe({})
    if not path.is_file():
        raise FactorlmError(f"--recipe {path}: file not found")
    import yaml

    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise FactorlmError(f"{path}: a recipe must be a mapping")
    try:
        return validate_recipe(data, str(path))
    except ValueError as exc:
        raise FactorlmError(str(exc)) from exc


def run_pareto_cmd(args: argparse.Namespace) -> int:
    from ..bench.pareto_run import (ParetoConfig, compress_point, format_markdown, llamacpp_reference, plot_pareto,
                                    run_pareto)
    from ..bench.offline import display_path
    from ..bench.runner import BenchConfig
    from ..runtime.format import FactorlmError
    from ..sample_model import cache_root
    from .common import resolve_model_path

    points = _checkpoints(args.checkpoint)
    recipe = _read_recipe(args.recipe)
    if not args.text.is_file():
        raise FactorlmError(f"--text {args.text}: file not found")
    if not points and not args.keep:
        raise FactorlmError("nothing to measure: pass --checkpoint NAME=DIR and/or --keep RATIO ...")
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    gguf, note = llamacpp_reference()
    if gguf is not None and "llamacpp" not in engines:
        engines.append("llamacpp")
    cache = args.cache or cache_root() / "pareto"
    speed = BenchConfig(engines=engines, batches=_int_list(args.batch, "--batch"), prompt_tokens=args.prompt_tokens,
                        new_tokens=args.new_tokens, repeats=args.repeats, threads=args.threads, gguf=gguf,
                        memory="off", bandwidth_mib=0)
    cfg = ParetoConfig(text=args.text, ppl_tokens=args.ppl_tokens, zeroshot_limit=args.zeroshot_limit,
                       tasks=tuple(t.strip() for t in args.tasks.split(",") if t.strip()), speed=speed,
                       cache=cache / "scores")
    dense = resolve_model_path(args.dense)
    for keep in args.keep:
        points.setdefault(f"keep{keep:g}", compress_point(keep, recipe, cache / "ckpt", args.dense))
    sweep = run_pareto(dense, points, cfg)
    command = " ".join(shlex.quote(a) for a in ["factorlm", "bench", "pareto", args.dense]
                       + [f"--checkpoint={n}={display_path(d)}" for n, d in _checkpoints(args.checkpoint).items()]
                       + (["--keep", *map(str, args.keep)] if args.keep else [])
                       + ["--text", args.text.name, "--ppl-tokens", str(args.ppl_tokens), "--zeroshot-limit",
                          str(args.zeroshot_limit), "--engines", args.engines, "--batch", args.batch,
                          "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens),
                          "--repeats", str(args.repeats), "--threads", str(args.threads)])
    sweep["command"] = command
    sweep["llamacpp"] = note or "run"
    table = format_markdown(sweep, command, f"not available ({note})" if note else "")
    _write_atomic(args.output_dir / "pareto.md", table)
    _write_atomic(args.output_dir / "pareto.json", json.dumps(sweep, indent=2, default=str) + "\n")
    if not args.no_plot:
        plot_pareto(sweep, args.output_dir / "pareto.png")
    print(table)
    return 0
