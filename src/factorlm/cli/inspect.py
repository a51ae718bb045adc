"""``factorlm inspect DIR``: print a factored checkpoint's compression report; ``--plot`` draws ranks;
``--verify`` checks every tensor header of every file against config.json (nothing is loaded)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("inspect", help="print the per-layer compression report of a factored checkpoint")
    p.add_argument("folder", help="factored checkpoint folder (or its factorlm_report.json)")
    p.add_argument("--plot", default=None, metavar="PNG", help="also draw the kept fraction per layer as a heat map")
    p.add_argument("--json", action="store_true", help="print the totals as one JSON line instead of the table")
    p.add_argument("--verify", action="store_true",
                   help="check every tensor header of every file against config.json (names, shapes, dtypes, ranks, "
                        "dense list, tied weights) and print OK or each problem; exit code 2 on problems")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.verify:
        return run_verify(Path(args.folder))
    import json

    from ..compressor import format_report, plot_kept_fraction, read_report

    report = read_report(args.folder)
    if args.json:
        print(json.dumps(report["totals"]))
    else:
        print(format_report(report))
        line = quantization_line(Path(args.folder))
        if line:
            print(line)
    if args.plot:
        print(f"wrote {plot_kept_fraction(report, args.plot)}")
    return 0


def quantization_line(root: Path) -> str:
    """One line on how a quantized checkpoint stores its weights ('' for an unquantized one or a report file)."""
    from ..runtime.format import read_factored_config

    if not (root / "config.json").is_file():
        return ""
    block = read_factored_config(root)
    if block is None or not block.quantized:
        return ""
    scheme = f"int{block.bits}" + (f" group {block.group_size}" if block.group_size else " per output channel")
    heads = [m for m in block.quantized_dense if m.rpartition(".")[2] == "lm_head"]
    dense = len(block.quantized_dense) - len(heads)
    extras = [f"{dense} dense linears"] if dense else []
    extras += ["the LM head"] if heads else []
    extras += ["int8 embeddings"] if block.quantized_embeddings else []
    return (f"quantized (format version {block.format_version}): {len(block.ranks)} factored modules {scheme}, "
            f"{block.rounding}" + (f"; also {', '.join(extras)}" if extras else ""))


def run_verify(root: Path) -> int:
    """Print each problem on its own line (or one OK line); exit code 2 when there is any."""
    from ..runtime.checkpoint import safetensors_files
    from ..runtime.format import FactorlmError, read_config_json
    from ..runtime.verify import verify_folder

    if not root.is_dir():
        raise FactorlmError(f"{root}: checkpoint folder not found")
    read_config_json(root)
    try:
        files = safetensors_files(root)
    except FactorlmError as exc:
        problems, summary = [str(exc)], {}
    else:
        problems, summary = verify_folder(root, files)
    if problems:
        for problem in problems:
            print(problem)
        print(f"factorlm: error: {root}: {len(problems)} problem{'s' if len(problems) > 1 else ''}", file=sys.stderr)
        return 2
    kind = (f"{summary['factored']} factored modules, {summary['dense_listed']} kept dense"
            + (f", {summary['correctors']} separate correctors" if summary["correctors"] else "")
            if summary["factored"] else "a dense model folder")
    print(f"OK: {root}: {summary['tensors']} tensors in {summary['files']} file{'s' if summary['files'] > 1 else ''} "
          f"match config.json ({summary['architecture']}, {kind})")
    line = quantization_line(root)
    if line:
        print(line)
    return 0
