"""Offline decode/prefill benchmark on the sample model: dense vs plain-SVD factored copies.

A thin driver over ``factorlm.bench.offline`` (the same harness as ``factorlm bench
offline``): compresses the sample model with plain SVD at each keep ratio (decode speed
depends only on the ranks, not on how the factors were fitted), runs the chosen engines
with dense and factored interleaved, and writes results/offline_<tag>.{json,md}. With
several ``--keep`` values it runs one harness pass per keep ratio (dense re-measured in
each, so every ratio comes from one run) and writes the sweep the plots read.

    python benchmarks/bench_offline.py --keep 0.5 --engines torch,onnx --batch 1,4 --repeats 5
    python benchmarks/bench_offline.py --keep 0.3 0.5 0.7 0.9 --engines torch --batch 1,4 --tag sweep-cpu-t1

``--model synthetic:SHAPE`` times a random-weight pair of a published architecture's shape
instead (``factorlm.bench.synthetic``: llama-3.2-1b, llama-3.1-8b, ...; speed only, the
values carry no meaning), which is how the GPU runs cover models a machine cannot download:

    python benchmarks/bench_offline.py --model synthetic:llama-3.2-1b --device cuda --engines torch \
        --keep 0.5 --batch 1,8,32 --prompt-tokens 128 --new-tokens 128
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from pathlib import Path

from factorlm.bench.offline import format_markdown, run_offline
from factorlm.bench.runner import BenchConfig
from factorlm.bench.synthetic import SHAPES, write_synthetic_pair
from factorlm.compressor import CompressionRecipe, compress_checkpoint
from factorlm.sample_model import cache_root, find_gguf, materialize_sample_model

RESULTS = Path(__file__).parent / "results"


def factored_sample(keep: float) -> Path:
    """The folder ``factorlm compress sample --method svd --keep KEEP -o <cache>/bench-svd-keepKEEP`` writes."""
    path = cache_root() / f"bench-svd-keep{keep}"
    if not (path / "config.json").is_file():
        compress_checkpoint(materialize_sample_model(), path, CompressionRecipe(method="svd", keep=keep), progress=False)
    return path


def model_pair(model: str, keep: float, device: str) -> tuple[Path, Path]:
    """(dense, factored) folders: the sample model and its svd copy, or a cached synthetic pair."""
    if model == "sample":
        return materialize_sample_model(), factored_sample(keep)
    shape = model.removeprefix("synthetic:")
    if not model.startswith("synthetic:") or shape not in SHAPES:
        raise SystemExit(f"--model must be 'sample' or synthetic:SHAPE with SHAPE one of {', '.join(SHAPES)}; "
                         f"got {model!r}")
    import torch

    build_on = "cuda" if device == "cuda" and torch.cuda.is_available() else "cpu"  # else the runner says why it skips
    return write_synthetic_pair(shape, keep, cache_root() / "synthetic", device=build_on)


def device_slug(device: str) -> str:
    """'cpu', or the GPU model in lower case ('nvidia-h200'), for result file names."""
    if device != "cuda":
        return device
    import torch

    return torch.cuda.get_device_name().lower().replace(" ", "-") if torch.cuda.is_available() else "cuda"


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", type=float, nargs="+", default=[0.5])
    ap.add_argument("--model", default="sample",
                    help="'sample' (default) or synthetic:SHAPE, a random-weight pair of a named architecture")
    ap.add_argument("--engines", default="torch,onnx")
    ap.add_argument("--batch", default="1,4")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--onnx-dense", type=Path, help="existing ONNX export of the dense sample model")
    ap.add_argument("--onnx-factored", type=Path, help="existing ONNX export of the factored copy (single --keep)")
    ap.add_argument("--memory", choices=["isolated", "inprocess", "off"], default="isolated")
    ap.add_argument("--gguf", action="store_true", help="add the llama.cpp engine on the sample model's Q4_1 GGUF")
    ap.add_argument("--tag", default=None, help="result file tag (default: <device>-t<threads>-keep<keep>)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    engines = [e for e in args.engines.split(",") if e] + (["llamacpp"] if args.gguf else [])
    onnx_dirs = {k: v for k, v in (("dense", args.onnx_dense), ("factored", args.onnx_factored)) if v}
    command = "python benchmarks/bench_offline.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    runs = []
    for keep in args.keep:
        config = BenchConfig(engines=engines, batches=[int(b) for b in args.batch.split(",")],
                             prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, repeats=args.repeats,
                             threads=args.threads, device=args.device,
                             onnx_dirs=onnx_dirs if len(args.keep) == 1 else {k: v for k, v in onnx_dirs.items()
                                                                               if k == "dense"},
                             gguf=find_gguf() if args.gguf else None, memory=args.memory)
        dense, factored = model_pair(args.model, keep, args.device)
        result = run_offline(dense, factored, config)
        result.update(keep=keep, method="svd" if args.model == "sample" else "random factors", model=args.model,
                      command=command)
        runs.append(result)
        print(format_markdown(result, command), flush=True)

    if not any(r["results"] for r in runs):
        reasons = sorted({why for r in runs for why in r["skipped"].values()})
        print(f"error: no engine ran ({'; '.join(reasons)}); no results written", file=sys.stderr)
        return 1
    parts = [device_slug(args.device), None if args.model == "sample" else args.model.removeprefix("synthetic:"),
             f"t{args.threads}" if args.device == "cpu" else None, f"keep{args.keep[0]}"]
    tag = args.tag or "-".join(p for p in parts if p)
    RESULTS.mkdir(parents=True, exist_ok=True)
    if len(runs) == 1:
        payload, text = runs[0], format_markdown(runs[0], command)
    else:
        payload = {"bench": "offline-sweep", "method": "svd", "keeps": args.keep, "command": command, "runs": runs}
        text = "\n".join(f"## keep {r['keep']}\n\n" + format_markdown(r, command) for r in runs)
    write_atomic(RESULTS / f"offline_{tag}.json", json.dumps(payload, indent=2) + "\n")
    write_atomic(RESULTS / f"offline_{tag}.md", text)
    print(json.dumps(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
