"""``factorlm inspect DIR``: print a factored checkpoint's compression report; ``--plot`` draws ranks."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("inspect", help="print the per-layer compression report of a factored checkpoint")
    p.add_argument("folder", help="factored checkpoint folder (or its factorlm_report.json)")
    p.add_argument("--plot", default=None, metavar="PNG", help="also draw the kept fraction per layer as a heat map")
    p.add_argument("--json", action="store_true", help="print the totals as one JSON line instead of the table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from ..compressor.report import format_report, plot_kept_fraction, read_report

    report = read_report(args.folder)
    if args.json:
        print(json.dumps(report["totals"]))
    else:
        print(format_report(report))
    if args.plot:
        print(f"wrote {plot_kept_fraction(report, args.plot)}")
    return 0
