"""ONNX Runtime vs the torch runtime on the sample model, dense vs factored (plain SVD, keep 0.5).

For each model: export time and graph size of the fp32 (and optionally int8) ONNX folder,
then decode tokens/s at batch 1 and 8 for ONNX Runtime (``OnnxGenerator``, IOBinding) and
the torch runtime. Decode time is T(prefill + N tokens) - T(prefill + 1 token), so prefill
is excluded; configurations run interleaved and the median over repeats is reported.
Results go to benchmarks/results/onnx_<tag>.{json,md}.

    python benchmarks/bench_onnx.py --keep 0.5 --threads 1 --repeats 3 --int8
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

from factorlm.exporters.onnx import OnnxGenerator, export_onnx
from factorlm.runtime.checkpoint import load_model
from factorlm.runtime.generate import SamplingParams
from factorlm.sample_model import cache_root, materialize_sample_model

from bench_offline import factored_sample  # the same cached plain-SVD folder

RESULTS = Path(__file__).parent / "results"


def exported(src: Path, name: str, int8: bool, threads: int, reuse: bool) -> tuple[Path, dict[str, Any]]:
    out = cache_root() / f"bench-onnx-{name}"
    if reuse and (out / "factorlm_onnx.json").is_file():
        from factorlm.exporters.onnx.metadata import read_metadata

        meta = read_metadata(out)
        meta["graph_bytes"] = sum(f.stat().st_size for f in out.glob("model.onnx*"))
        return out, meta
    return out, export_onnx(src, out, int8=int8, overwrite=True, threads=threads)


@torch.inference_mode()
def torch_batch(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int) -> None:
    """Greedy batched decode with a DynamicCache (equal-length prompts, no padding)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    logits = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
    for _ in range(new_tokens - 1):
        token = logits.argmax(-1, keepdim=True)
        logits = model(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1]


def decode_tok_s(run: Callable[[int], Any], batch: int, new_tokens: int) -> float:
    t0 = time.perf_counter()
    run(1)
    t1 = time.perf_counter()
    run(new_tokens)
    t2 = time.perf_counter()
    return batch * (new_tokens - 1) / max((t2 - t1) - (t1 - t0), 1e-9)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--keep", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--int8", action="store_true", help="also export and time int8 graphs")
    ap.add_argument("--reuse", action="store_true", help="reuse exports left in the cache by an earlier run")
    ap.add_argument("--tag", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    sources = {"dense": materialize_sample_model(), "factored": factored_sample(args.keep)}

    exports: dict[str, dict[str, Any]] = {}
    engines: dict[str, Callable[[torch.Tensor, int], Any]] = {}
    for name, src in sources.items():
        variants = [(name, False)] + ([(f"{name}-int8", True)] if args.int8 else [])
        for label, int8 in variants:
            out, meta = exported(src, f"{label}-keep{args.keep}" if name == "factored" else label, int8, args.threads, args.reuse)
            exports[label] = {"export_s": round(meta["export_s"], 1), "graph_mb": round(meta["graph_bytes"] / 1e6, 1),
                              "validation": meta["validation"]}
            gen = OnnxGenerator(out, threads=args.threads, device="cpu")
            engines[f"onnx/{label}"] = (lambda g: lambda ids, n: g.generate_batch(
                ids.tolist(), SamplingParams(max_new_tokens=n, ignore_eos=True)))(gen)
        model = load_model(src)
        engines[f"torch/{name}"] = (lambda m: lambda ids, n: torch_batch(m, ids, n))(model)

    gen = torch.Generator().manual_seed(0)
    samples: dict[str, list[float]] = {}
    for rep in range(args.repeats):
        for batch in batches:
            ids = torch.randint(100, 40000, (batch, args.prompt_tokens), generator=gen)
            for key, run in engines.items():  # interleaved: every engine once per round
                if rep == 0:
                    run(ids, 2)  # warm-up
                tps = decode_tok_s(lambda n: run(ids, n), batch, args.new_tokens)
                samples.setdefault(f"{key}@b{batch}", []).append(tps)
                print(f"rep {rep} {key} batch {batch}: {tps:.1f} tok/s", flush=True)
    med = {k: round(statistics.median(v), 2) for k, v in samples.items()}
    ratios = {}
    for b in batches:
        ratios[f"onnx factored / onnx dense @b{b}"] = round(med[f"onnx/factored@b{b}"] / med[f"onnx/dense@b{b}"], 3)
        ratios[f"onnx factored / torch factored @b{b}"] = round(med[f"onnx/factored@b{b}"] / med[f"torch/factored@b{b}"], 3)
        ratios[f"torch factored / torch dense @b{b}"] = round(med[f"torch/factored@b{b}"] / med[f"torch/dense@b{b}"], 3)
        if args.int8:
            ratios[f"onnx factored-int8 / onnx dense-int8 @b{b}"] = round(
                med[f"onnx/factored-int8@b{b}"] / med[f"onnx/dense-int8@b{b}"], 3)
            ratios[f"onnx factored-int8 / onnx dense @b{b}"] = round(med[f"onnx/factored-int8@b{b}"] / med[f"onnx/dense@b{b}"], 3)
    import onnxruntime

    tag = args.tag or f"cpu-t{args.threads}-keep{args.keep}"
    result = {
        "benchmark": "bench_onnx", "tag": tag, "keep": args.keep, "threads": args.threads, "repeats": args.repeats,
        "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "batches": batches,
        "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__, "exports": exports, "decode_tok_s_median": med,
        "decode_tok_s_samples": {k: [round(x, 2) for x in v] for k, v in samples.items()}, "ratios": ratios,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"onnx_{tag}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# bench_onnx {tag}", "",
             f"Sample model, dense vs factored (plain SVD, keep {args.keep}); {args.threads} thread(s); prompt "
             f"{args.prompt_tokens} tokens, {args.new_tokens} greedy new tokens; median of {args.repeats} interleaved "
             f"runs; onnxruntime {onnxruntime.__version__}, torch {torch.__version__}.", "",
             "| graph | export s (trace + convert, without validation) | graph MB | validation max abs dlogit | argmax mismatches |", "|---|---|---|---|---|"]
    for label, e in exports.items():
        v = e["validation"] or {}
        lines.append(f"| {label} | {e['export_s']} | {e['graph_mb']} | {v.get('max_abs_diff', float('nan')):.3g} | "
                     f"{v.get('argmax_mismatches')} / {v.get('compared_positions')} |")
    lines += ["", "| engine/model | " + " | ".join(f"decode tok/s b{b}" for b in batches) + " |",
              "|---|" + "---|" * len(batches)]
    for key in engines:
        lines.append(f"| {key} | " + " | ".join(str(med[f'{key}@b{b}']) for b in batches) + " |")
    lines += ["", "| ratio | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in ratios.items()]
    (RESULTS / f"onnx_{tag}.md").write_text("\n".join(lines) + "\n")
    print(json.dumps({"tag": tag, "ratios": ratios}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
