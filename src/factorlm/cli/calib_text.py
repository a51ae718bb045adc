"""``factorlm calib-text SOURCE -o FILE``: write a calibration text file.

``sample`` gives the built-in calibration text (BoolQ passages, disjoint from WikiText-2);
``hf:NAME[:CONFIG[:SPLIT]]`` a Hugging Face dataset's text when ``datasets`` is installed;
``austen`` Jane Austen's novels; several sources joined by commas, their texts interleaved.
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("calib-text", help="write calibration text ('sample' or hf:NAME) to a file")
    p.add_argument("source", help="'sample' (built-in, not WikiText-2), 'austen', hf:NAME[:CONFIG[:SPLIT]], a file, "
                                   "or several joined by commas (interleaved)")
    p.add_argument("-o", "--output", required=True, help="text file to write")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .common import check_output

    check_output(args.output, kind="file")
    from ..compressor import write_calibration_text

    path = write_calibration_text(args.source, args.output)
    print(f"wrote {path.stat().st_size:,} bytes of calibration text to {path}")
    return 0
