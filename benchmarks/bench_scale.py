"""Compression at scale: source bytes, output bytes, peak RSS and seconds per block.

Synthetic models of published shapes with random weights (memory and time do not depend on
the weight values; quality does, so none is reported). The source is written in bf16 as HF
shards, then ``compress_checkpoint`` runs in a child process whose peak RSS is read back with
``getrusage``. The expected output is (source dtype bytes x kept parameters).

    python benchmarks/bench_scale.py --shape llama-3.2-1b --method svd --device cpu
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path.home() / ".cache" / "factorlm" / "scale"
RESULTS = Path(__file__).parent / "results"


def write_source(shape: str, root: Path) -> Path:
    """A bf16 dense folder of ``shape`` (random weights), sharded at 2GB, plus a tokenizer."""
    import torch

    from factorlm.bench.synthetic import random_dense
    from factorlm.testing import make_tiny_tokenizer

    path = root / f"{shape}-bf16"
    if (path / "config.json").is_file():
        return path
    model = random_dense(shape, dtype=torch.bfloat16)
    model.save_pretrained(path, max_shard_size="2GB")
    make_tiny_tokenizer().save_pretrained(path)
    return path


def child(args: argparse.Namespace) -> None:
    """Run one compression in this process and print its numbers as JSON."""
    import torch

    from factorlm.compressor import CompressionRecipe, compress_checkpoint
    from factorlm.runtime.checkpoint import safetensors_files

    torch.set_num_threads(args.threads)
    src, out = Path(args.source), Path(args.out)
    started = time.perf_counter()
    path, report = compress_checkpoint(src, out, CompressionRecipe(method=args.method, keep=args.keep, device=args.device,
                                                                   calib_samples=8, calib_len=256),
                                       overwrite=True, progress=False)
    wall = time.perf_counter() - started
    t = report["totals"]
    blocks = len({r["module"].split(".mlp")[0].split(".self_attn")[0] for r in report["layers"]})
    kept = t["model_params_after"]
    print(json.dumps({
        "source_bytes": sum(f.stat().st_size for f in safetensors_files(src)),
        "output_bytes": sum(f.stat().st_size for f in safetensors_files(path)),
        "expected_output_bytes": 2 * kept, "model_params_after": kept, "blocks": blocks,
        "wall_s": round(wall, 1), "factorize_s": t["factorize_time_s"],
        "seconds_per_block": round(t["factorize_time_s"] / blocks, 2),
    }))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama-3.2-1b")
    p.add_argument("--method", default="svd")
    p.add_argument("--keep", type=float, default=0.6)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--keep-source", action="store_true", help="do not delete the multi-GB source afterwards")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--source", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    src = write_source(args.shape, ROOT)
    out = ROOT / f"{args.shape}-{args.method}-out"
    cmd = [sys.executable, __file__, "--child", "--source", str(src), "--out", str(out), "--method", args.method,
           "--keep", str(args.keep), "--device", args.device, "--threads", str(args.threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    line = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout.strip().splitlines()[-1]
    row = {"shape": args.shape, "method": args.method, "keep": args.keep, "device": args.device,
           "synthetic_random_weights": True, **json.loads(line),
           "peak_rss_bytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
           "loadavg": Path("/proc/loadavg").read_text().split()[:3]}
    row["output_vs_expected"] = round(row["output_bytes"] / row["expected_output_bytes"], 4)
    print(json.dumps(row, indent=2))
    RESULTS.mkdir(exist_ok=True)
    name = RESULTS / f"scale_{args.device.split(':')[0]}-{args.shape}-{args.method}.json"
    name.write_text(json.dumps(row, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    if not args.keep_source:
        shutil.rmtree(src, ignore_errors=True)


if __name__ == "__main__":
    main()
