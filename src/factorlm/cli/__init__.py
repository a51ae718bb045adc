"""The ``factorlm`` command. Each subcommand lives in its own module with ``register(subparsers)``."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from ..runtime.format import FactorlmError

# One line per subcommand module; each defines register(subparsers) and sets args.func.
COMMAND_MODULES = [
    "factorlm.cli.sample_model",
    "factorlm.cli.compress",
    "factorlm.cli.generate",
    "factorlm.cli.serve",
    "factorlm.cli.export",
    "factorlm.cli.eval",
    "factorlm.cli.bench",
    "factorlm.cli.inspect",
    "factorlm.cli.fold",
    "factorlm.cli.finetune",
    "factorlm.cli.calib_text",
]


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every registered subcommand."""
    from .. import __version__

    parser = argparse.ArgumentParser(prog="factorlm", description="Compress LLMs into low-rank factors and serve them.")
    parser.add_argument("--version", action="version", version=f"factorlm {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse, run, turn expected errors into one clear line and exit code 2."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        if not getattr(args, "passes_extra_args", False):
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        args.extra_args = unknown  # e.g. `serve --engine vllm`: handed to vLLM unchanged
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except FactorlmError as exc:
        print(f"factorlm: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("factorlm: interrupted; no partial output was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
