"""ONNX Runtime decode speed with and without the exporter's graph fusions, in one interleaved run.

Every model given is exported twice (``fuse=True``, the default, and ``fuse=False``: the traced
graph), fp32 or, with ``--int8``, weight-only int8 (MatMulNBits, accuracy level 4; a checkpoint
that is already quantized runs its stored codes at level 4). All exports are timed round-robin
in the same rounds; decode tok/s = batch x (new - 1) / decode time, median of the rounds; each
ratio is the median of the per-round ratios (both sides timed in the same round). The first
model is the reference of the "vs first" columns (same graph kind, same batch).

    OMP_NUM_THREADS=1 python benchmarks/bench_onnx_fusion.py dense=DIR k0.8=DIR [--int8] --name onnx_fusion
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
log = logging.getLogger("bench_onnx_fusion")


def export(name: str, path: Path, work: Path, fuse: bool, int8: bool, threads: int) -> tuple[Path, dict[str, Any]]:
    """The cached export of ``path`` (fused or not); returns (folder, its metadata)."""
    from factorlm.exporters.onnx import export_onnx
    from factorlm.exporters.onnx.metadata import read_metadata
    from factorlm.runtime.format import read_factored_config

    out = work / f"{name}-{'int8' if int8 else 'fp32'}-{'fused' if fuse else 'plain'}"
    if not (out / "factorlm_onnx.json").is_file():
        quantized = (block := read_factored_config(path)) is not None and block.quantized
        kw: dict[str, Any] = {"accuracy_level": 4} if quantized else {"int8": True} if int8 else {}
        t0 = time.perf_counter()
        export_onnx(path, out, overwrite=True, threads=threads, fuse=fuse, **kw)
        log.info("exported %s in %.0f s", out.name, time.perf_counter() - t0)
    return out, read_metadata(out)


def node_count(folder: Path) -> int:
    import onnx

    return len(onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.node)


def main(argv: list[str]) -> int:
    from factorlm.bench.engines import OnnxRunner
    from factorlm.bench.runner import BenchConfig

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="*", help="NAME=DIR, the first is the reference")
    p.add_argument("--report", type=Path, help="rewrite the report of an earlier run's JSON (no timing)")
    p.add_argument("--int8", action="store_true", help="weight-only int8 exports of unquantized models")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", type=Path, default=None, help="export cache (default: ~/.cache/factorlm/onnx-fusion)")
    p.add_argument("--name", default="onnx_fusion")
    args = p.parse_args(argv)
    if args.report:
        write_report(json.loads(args.report.read_text()), args.report.stem)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from factorlm.sample_model import cache_root

    work = args.work or cache_root() / "onnx-fusion"
    models = dict(m.split("=", 1) for m in args.models)
    batches = [int(b) for b in args.batches.split(",")]
    cfg = BenchConfig(engines=["onnx"], batches=batches, prompt_tokens=args.prompt_tokens,
                      new_tokens=args.new_tokens, repeats=args.repeats, threads=args.threads)
    load_start = os.getloadavg()
    runners: dict[tuple[str, str], Any] = {}
    info: dict[str, dict[str, Any]] = {}
    for name, path in models.items():
        for kind in ("plain", "fused"):
            folder, meta = export(name, Path(path).expanduser(), work, kind == "fused", args.int8, args.threads)
            info.setdefault(name, {})[kind] = {"nodes": node_count(folder), "fusions": meta.get("fusions", {})}
            runners[(name, kind)] = OnnxRunner(folder, cfg)
    prompt = [[(7 * i + 11) % 1000 + 100 for i in range(args.prompt_tokens)]]
    samples: dict[tuple[str, str, int], list[float]] = {}
    for batch in batches:
        for runner in runners.values():
            runner.run(prompt * batch, 4)  # warm-up
        for _ in range(args.repeats):
            for key, runner in runners.items():
                t = runner.run(prompt * batch, args.new_tokens)
                samples.setdefault((*key, batch), []).append(batch * (args.new_tokens - 1) / t.decode_s)
    for runner in runners.values():
        runner.close()
    command = "OMP_NUM_THREADS=1 python benchmarks/bench_onnx_fusion.py " + " ".join(
        [*(f"{n}=..." for n in models), *(["--int8"] if args.int8 else []), f"--batches {args.batches}",
         f"--prompt-tokens {args.prompt_tokens}", f"--new-tokens {args.new_tokens}", f"--repeats {args.repeats}",
         f"--threads {args.threads}", f"--name {args.name}"])
    result = {"command": command, "graphs": "int8" if args.int8 else "fp32", "fusions": info,
              "models": list(models), "batches": batches, "settings": {k: getattr(args, k) for k in (
                  "prompt_tokens", "new_tokens", "repeats", "threads")},
              "load_start": [round(x, 2) for x in load_start], "load_end": [round(x, 2) for x in os.getloadavg()],
              "samples": {f"{k[0]}/{k[1]}/b{k[2]}": v for k, v in samples.items()}}
    write_report(result, args.name)
    return 0


def summarize(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Per model and batch: median tok/s and the medians of the per-round ratios."""
    s, first = result["samples"], result["models"][0]

    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(s[a], s[b]))

    rows = []
    for name in result["models"]:
        for batch in result["batches"]:
            key = lambda model, kind: f"{model}/{kind}/b{batch}"  # noqa: E731
            rows.append({"model": name, "batch": batch, "plain_tok_s": statistics.median(s[key(name, "plain")]),
                         "fused_tok_s": statistics.median(s[key(name, "fused")]),
                         "fusion_speedup": ratio(key(name, "fused"), key(name, "plain")),
                         "plain_vs_first": ratio(key(name, "plain"), key(first, "plain")),
                         "fused_vs_first": ratio(key(name, "fused"), key(first, "fused")),
                         "nodes_plain": result["fusions"][name]["plain"]["nodes"],
                         "nodes_fused": result["fusions"][name]["fused"]["nodes"]})
    return rows


def write_report(result: dict[str, Any], name: str) -> None:
    """results/<name>.json (with the rows) and results/<name>.md."""
    rows = result["rows"] = summarize(result)
    first, st = result["models"][0], result["settings"]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# ONNX graph fusions: decode tok/s ({result['graphs']} graphs)", "", f"`{result['command']}`", "",
             f"Median of {st['repeats']} interleaved rounds (ratios: median of the per-round ratios), prompt "
             f"{st['prompt_tokens']}, {st['new_tokens']} new tokens, {st['threads']} thread(s); load average "
             f"{result['load_start'][0]} at start, {result['load_end'][0]} at end.",
             "", "| model | batch | nodes plain / fused | plain tok/s | fused tok/s | fused / plain | "
             f"plain vs {first} | fused vs {first} |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['batch']} | {r['nodes_plain']} / {r['nodes_fused']} | {r['plain_tok_s']:.1f} | "
                     f"{r['fused_tok_s']:.1f} | {r['fusion_speedup']:.2f}x | {r['plain_vs_first']:.2f}x | "
                     f"{r['fused_vs_first']:.2f}x |")
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
