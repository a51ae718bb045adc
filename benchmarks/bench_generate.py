"""Torch runtime: dense vs factored decode speed and load time on the sample model.

Runs dense and factored generations alternately (A B A B ...) so drift of a shared machine
hits both alike, reports medians and the per-pair factored/dense ratio, and ends with one
JSON line. Results go to benchmarks/results/generate_<tag>.{json,md}.

    python benchmarks/bench_generate.py --keep 0.5 --threads 1 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from factorlm.compressor.budget import count_params
from factorlm.compressor.pipeline import CompressionRecipe, compress_checkpoint
from factorlm.runtime.checkpoint import load_model, load_tokenizer
from factorlm.runtime.generate import GenerationStats, SamplingParams, generate_tokens
from factorlm.sample_model import cache_root, materialize_sample_model

RESULTS = Path(__file__).parent / "results"
PROMPT = "The history of the city begins in the early middle ages, when a small settlement grew around"


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of unique parameters: what one decode step must read at batch 1."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total


def factored_sample(keep: float) -> Path:
    """A plain-SVD factored copy of the sample model at ``keep`` (speed depends only on ranks)."""
    path = cache_root() / f"bench-svd-keep{keep}"
    if not (path / "config.json").is_file():
        compress_checkpoint(materialize_sample_model(), path, CompressionRecipe(method="svd", keep=keep), progress=False)
    return path


def timed_load(path: Path) -> tuple[torch.nn.Module, float]:
    started = time.perf_counter()
    model = load_model(path)
    return model, time.perf_counter() - started


def decode_run(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int) -> GenerationStats:
    stats = GenerationStats()
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    for _ in generate_tokens(model, ids, params, stats=stats):
        pass
    return stats


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--tag", default=None, help="result file tag (default: cpu-t<threads>-keep<keep>)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, set(range(min(args.threads, os.cpu_count() or 1))))
    dense_path = materialize_sample_model()
    fact_path = factored_sample(args.keep)
    tok = load_tokenizer(dense_path)
    ids = tok(PROMPT, return_tensors="pt").input_ids

    loads = {"dense": [], "factored": []}
    rates = {"dense": [], "factored": []}
    ttft = {"dense": [], "factored": []}
    ratios = []
    models = {}
    for name, path in (("dense", dense_path), ("factored", fact_path)):
        models[name], _ = timed_load(path)
        decode_run(models[name], ids, 8)  # warm-up
    for _ in range(args.repeats):
        pair = {}
        for name, path in (("dense", dense_path), ("factored", fact_path)):
            _, load_s = timed_load(path)
            loads[name].append(load_s)
            stats = decode_run(models[name], ids, args.new_tokens)
            rates[name].append(stats.decode_tokens_per_s)
            ttft[name].append(stats.ttft_s)
            pair[name] = stats.decode_tokens_per_s
        ratios.append(pair["factored"] / pair["dense"])

    med = statistics.median
    result = {
        "bench": "generate",
        "engine": "torch",
        "device": "cpu",
        "machine": platform.processor() or platform.machine(),
        "threads": args.threads,
        "keep": args.keep,
        "prompt_tokens": int(ids.shape[1]),
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "dense": {"decode_tok_s": med(rates["dense"]), "ttft_s": med(ttft["dense"]), "load_s": med(loads["dense"]),
                  "params": count_params(models["dense"]), "weight_bytes": weight_bytes(models["dense"])},
        "factored": {"decode_tok_s": med(rates["factored"]), "ttft_s": med(ttft["factored"]),
                     "load_s": med(loads["factored"]), "params": count_params(models["factored"]),
                     "weight_bytes": weight_bytes(models["factored"])},
        "speedup_median_of_pairs": med(ratios),
        "speedup_pairs": ratios,
    }
    result["bytes_ratio"] = result["dense"]["weight_bytes"] / result["factored"]["weight_bytes"]
    result["speedup_vs_bytes_ratio"] = result["speedup_median_of_pairs"] / result["bytes_ratio"]
    result["command"] = "python benchmarks/bench_generate.py " + " ".join(sys.argv[1:])

    tag = args.tag or f"cpu-t{args.threads}-keep{args.keep}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"generate_{tag}.json").write_text(json.dumps(result, indent=2) + "\n")
    d, f = result["dense"], result["factored"]
    table = (
        f"# Torch runtime decode, sample model, keep {args.keep} (plain SVD ranks), {args.threads} thread(s)\n\n"
        f"`{result['command']}` — medians of {args.repeats} alternating runs, {args.new_tokens} new tokens, "
        f"batch 1, fp32.\n\n"
        "| model | params | weight MB | decode tok/s | TTFT ms | load s |\n|---|---|---|---|---|---|\n"
        f"| dense | {d['params']:,} | {d['weight_bytes'] / 1e6:.1f} | {d['decode_tok_s']:.1f} | "
        f"{d['ttft_s'] * 1000:.0f} | {d['load_s']:.2f} |\n"
        f"| factored | {f['params']:,} | {f['weight_bytes'] / 1e6:.1f} | {f['decode_tok_s']:.1f} | "
        f"{f['ttft_s'] * 1000:.0f} | {f['load_s']:.2f} |\n\n"
        f"factored/dense decode speed: **{result['speedup_median_of_pairs']:.2f}x** (median of per-pair ratios); "
        f"bytes-read ratio {result['bytes_ratio']:.2f}x; speedup / bytes ratio = {result['speedup_vs_bytes_ratio']:.2f}.\n"
    )
    (RESULTS / f"generate_{tag}.md").write_text(table)
    print(table)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
