"""Compression at scale: source bytes, output bytes, peak RSS and seconds per block.

Synthetic models of published shapes with **random weights** (memory and time do not depend
on the weight values; quality does, so none is reported). The bf16 source is written shard by
shard (``factorlm.bench.synthetic.write_synthetic_source``, never the whole model in RAM)
under ~/.cache/factorlm/scale, then ``compress_checkpoint`` runs in a child process that
reports its own peak RSS (``getrusage``) and its RSS after every block is loaded. The
expected output is (source dtype bytes x kept parameters). Peak disk is the size of the
temporary output folder, sampled after every finished block and just before each packed
block file is deleted (the moments it is largest).

``--max-blocks N`` stops the run after N blocks (a fixed-size sample when the whole model does
not fit the time budget): the seconds per block are measured, the total is extrapolated
(setup + blocks x mean block time) and labelled so, and the output bytes are the expected ones.

    python benchmarks/bench_scale.py --shape llama-3.1-8b --method svd --max-blocks 1
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
NAMES = {"smollm2-135m": "SmolLM2-135M", "llama-3.2-1b": "Llama-3.2-1B", "llama-3.2-3b": "Llama-3.2-3B",
         "llama-3.1-8b": "Llama-3.1-8B"}


def rss_bytes(field: str = "VmRSS") -> int:
    """``field`` of /proc/self/status in bytes: VmRSS (all), RssAnon (heap) or RssFile (mapped files)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    return 0


def write_source(shape: str, root: Path, layers: int | None) -> Path:
    """A bf16 dense folder of ``shape`` (random weights), sharded at 2GB, written tensor by tensor."""
    from factorlm.bench.synthetic import write_synthetic_source

    path = root / f"{shape}-bf16{f'-{layers}l' if layers else ''}"
    if (path / "config.json").is_file():
        return path
    overrides = {"num_hidden_layers": layers} if layers else {}
    started = time.perf_counter()
    write_synthetic_source(shape, path, max_shard_size="2GB", **overrides)
    print(f"wrote {path} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return path


class _Stop(Exception):
    """Raised in the child once ``--max-blocks`` blocks are done."""


def child(args: argparse.Namespace) -> None:
    """Run one compression in this process and print its numbers as JSON."""
    import torch

    from factorlm.compressor import CompressionRecipe, compress_checkpoint, meta_skeleton
    from factorlm.compressor import streamed  # instrumented below: per-block timings
    from factorlm.compressor.resume import ResumeState  # instrumented below: disk use
    from factorlm.runtime.arch import compressible_linears, decoder_layers
    from factorlm.runtime.checkpoint import partial_dir, safetensors_files

    torch.set_num_threads(args.threads)
    src, out = Path(args.source), Path(args.out)
    rss_import = rss_bytes()
    marks: dict[str, float] = {}
    rss_blocks: list[int] = []
    anon_blocks: list[int] = []
    original = streamed.SourceBlocks.load

    def load(self, index, block):  # noqa: ANN001, ANN202 - instrumented BlockIO.load
        if args.max_blocks and len(rss_blocks) >= args.max_blocks:
            raise _Stop
        marks.setdefault("first_block", time.perf_counter())
        original(self, index, block)
        rss_blocks.append(rss_bytes())
        anon_blocks.append(rss_bytes("RssAnon"))

    streamed.SourceBlocks.load = load  # type: ignore[method-assign]
    disk = [0]
    done, packed = ResumeState.block_done, ResumeState.packed

    def sample(folder: Path) -> None:
        disk[0] = max(disk[0], sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()))

    def block_done(self, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202 - instrumented
        done(self, *a, **k)
        sample(self.folder)

    def packed_block(self, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202 - instrumented
        sample(self.folder)
        packed(self, *a, **k)

    ResumeState.block_done, ResumeState.packed = block_done, packed_block  # type: ignore[method-assign]
    recipe = CompressionRecipe(method=args.method, keep=args.keep, device=args.device,
                               calib_samples=args.calib_samples, calib_len=args.calib_len)
    started = time.perf_counter()
    report = None
    try:
        path, report = compress_checkpoint(src, out, recipe, overwrite=True, progress=False)
    except _Stop:
        path = None
    wall = time.perf_counter() - started
    state = json.loads((partial_dir(out) / "factorlm_resume.json").read_text()) if path is None else None
    plan = report["layers"] if report else None
    model = meta_skeleton(src)
    blocks = len(decoder_layers(model))
    ranks = ({r["module"]: r["rank"] for r in plan} if plan else state["plan"])
    kept = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    for name, linear in compressible_linears(model).items():
        if ranks.get(name) is not None:
            kept -= linear.in_features * linear.out_features - ranks[name] * (linear.in_features + linear.out_features)
    block_times = report["totals"]["block_time_s"] if report else state["info"]["block_time_s"]
    setup = marks.get("first_block", started) - started
    mean = sum(block_times) / len(block_times)
    row = {
        "source_bytes": sum(f.stat().st_size for f in safetensors_files(src)),
        "output_bytes": sum(f.stat().st_size for f in safetensors_files(path)) if path else None,
        "expected_output_bytes": 2 * kept, "model_params_after": kept, "blocks": blocks,
        "blocks_measured": len(block_times), "seconds_per_block": [round(t, 1) for t in block_times],
        "mean_seconds_per_block": round(mean, 1), "setup_s": round(setup, 1), "wall_s": round(wall, 1),
        "total_s": round(wall, 1) if path else None,
        "extrapolated_total_s": None if path else round(setup + blocks * mean, 0),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rss_after_imports_bytes": rss_import, "rss_after_each_block_load_bytes": rss_blocks,
        "rss_anon_after_each_block_load_bytes": anon_blocks,
        "peak_disk_bytes": disk[0],
    }
    shutil.rmtree(partial_dir(out), ignore_errors=True)
    print(json.dumps(row))


def render(rows: list[dict]) -> str:
    """The markdown table of every row (measured and extrapolated numbers labelled)."""
    gb = 1e9
    lines = [
        "# Compression at scale (larger-than-RAM, dtype-true, sharded output)",
        "",
        "Synthetic models of published shapes with **random weights**, bf16 sources written as 2 GB HF shards:",
        "speed and memory only (they do not depend on the weight values); no quality is reported.",
        "2-core CPU shared with other jobs, one thread (`OMP_NUM_THREADS=1`), `nice -n 5`; load averages",
        "per row. Peak RSS is the compressing process's own `ru_maxrss` (torch and transformers imports",
        "included, about 0.5 GB). Rows marked *extrapolated* ran `--max-blocks N` blocks of the full-depth",
        "source: seconds per block are measured, the total is setup + blocks x mean block time, and the",
        "output bytes are the expected ones (2 B x kept parameters, the checkpoint being bf16). Peak disk is",
        "the temporary output folder's largest size (block files + shards), sampled after each block and",
        "before each packed block file is deleted, as a multiple of the output (rows without it predate the",
        "sampling).",
        "",
        "| shape | method | loader | blocks run | source | output | output / expected | peak RSS | peak disk | setup s | s / block | total s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        partial = r.get("output_bytes") is None
        out = f"{r['expected_output_bytes'] / gb:.2f} GB (expected)" if partial else f"{r['output_bytes'] / gb:.2f} GB"
        ratio = "-" if partial else f"{r['output_bytes'] / r['expected_output_bytes']:.4f}"
        spb = r.get("mean_seconds_per_block", r.get("seconds_per_block"))
        total = f"{r['extrapolated_total_s']:.0f} (extrapolated)" if partial else f"{r.get('total_s', r['wall_s'])}"
        run = f"{r.get('blocks_measured', r['blocks'])} of {r['blocks']}"
        disk = "-" if not r.get("peak_disk_bytes") or partial else f"{r['peak_disk_bytes'] / r['output_bytes']:.2f} x output"
        lines.append(f"| {NAMES.get(r['shape'], r['shape'])}{r.get('label', '')} | {r['method']} | "
                     f"{r.get('loader', 'streamed')} | {run} | {r['source_bytes'] / gb:.2f} GB | {out} | {ratio} | "
                     f"{r['peak_rss_bytes'] / gb:.2f} GB | {disk} | {r.get('setup_s', '-')} | {spb} | {total} |")
    lines += ["", "Commands and load averages:", ""]
    lines += [f"- `{r['command']}` (load {' / '.join(r['loadavg'])})" for r in rows if r.get("command")]
    return "\n".join(lines) + "\n"


def record(row: dict) -> None:
    """Merge ``row`` into results/scale.json (same shape/method/device/loader/depth/blocks replaced) and re-render."""
    path = RESULTS / "scale.json"
    data = json.loads(path.read_text()) if path.is_file() else {"rows": []}
    key = ("shape", "method", "device", "loader", "layers", "blocks_measured", "blocks")
    rows = [r for r in data["rows"] if tuple(r.get(k) for k in key) != tuple(row.get(k) for k in key)]
    rows.append(row)
    data["rows"] = rows
    data["note"] = "synthetic random weights (speed and memory only); see scale.md"
    path.write_text(json.dumps(data, indent=2) + "\n")
    (RESULTS / "scale.md").write_text(render(rows) + data.get("notes_md", ""))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama-3.2-1b")
    p.add_argument("--method", default="svd")
    p.add_argument("--keep", type=float, default=0.6)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--layers", type=int, default=None, help="override the depth (a shallower source of the same shape)")
    p.add_argument("--max-blocks", type=int, default=0, help="stop after N blocks and extrapolate (0: all)")
    p.add_argument("--calib-samples", type=int, default=8)
    p.add_argument("--calib-len", type=int, default=256)
    p.add_argument("--keep-source", action="store_true", help="do not delete the multi-GB source afterwards")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--source", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    src = write_source(args.shape, ROOT, args.layers)
    out = ROOT / f"{args.shape}-{args.method}-out"
    cmd = [sys.executable, __file__, "--child", "--source", str(src), "--out", str(out), "--method", args.method,
           "--keep", str(args.keep), "--device", args.device, "--threads", str(args.threads),
           "--max-blocks", str(args.max_blocks), "--calib-samples", str(args.calib_samples),
           "--calib-len", str(args.calib_len)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(proc.returncode)
    line = proc.stdout.strip().splitlines()[-1]
    flags = " ".join(a for a in sys.argv[1:])
    row = {"shape": args.shape, "method": args.method, "keep": args.keep, "device": args.device,
           "threads": args.threads, "loader": "streamed", "layers": args.layers,
           "label": f" ({args.layers} layers)" if args.layers else "",
           "synthetic_random_weights": True, **json.loads(line),
           "loadavg": Path("/proc/loadavg").read_text().split()[:3],
           "command": f"python benchmarks/bench_scale.py {flags}"}
    if row["output_bytes"]:
        row["output_vs_expected"] = round(row["output_bytes"] / row["expected_output_bytes"], 4)
    print(json.dumps(row, indent=2))
    RESULTS.mkdir(exist_ok=True)
    if args.device != "cpu":
        name = RESULTS / f"scale_{args.device.split(':')[0]}-{args.shape}-{args.method}.json"
        name.write_text(json.dumps(row, indent=2) + "\n")
    record(row)
    shutil.rmtree(out, ignore_errors=True)
    if not args.keep_source:
        shutil.rmtree(src, ignore_errors=True)


if __name__ == "__main__":
    main()
