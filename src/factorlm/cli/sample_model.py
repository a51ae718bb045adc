"""``factorlm sample-model``: materialise the built-in SmolLM2-135M-Instruct dense baseline."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("sample-model", help="dequantize the built-in sample model once and print its folder")
    p.add_argument("--force", action="store_true", help="rebuild even if the cached copy exists")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..sample_model import materialize_sample_model

    print(materialize_sample_model(force=args.force))
    return 0
