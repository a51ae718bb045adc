"""The ``factorlm`` command. Each subcommand lives in its own module with ``register(subparsers)``.

Building the parser imports no torch or transformers (commands import what they need when
they run), so ``--help`` and argument errors answer at once. Every expected failure is
one line ``factorlm: error: ...`` with exit code 2; Ctrl-C is one line and exit code 130
wherever it lands (see :mod:`.interrupt`).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from typing import NoReturn

from ..runtime.format import FactorlmError
from .interrupt import INTERRUPTED, DeferInterruptsWhileImporting, InterruptWatchdog

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
    "factorlm.cli.quantize",
    "factorlm.cli.finetune",
    "factorlm.cli.calib_text",
]
# flags whose values are paths a command writes; a hard exit on Ctrl-C removes their partial siblings
OUTPUT_FLAGS = ("output", "json_out", "md_out")


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``factorlm: error: MESSAGE (see 'factorlm CMD --help')``, exit 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"factorlm: error: {message} (see '{self.prog} --help')\n")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every registered subcommand."""
    from .. import __version__

    parser = Parser(prog="factorlm", description="Compress LLMs into low-rank factors and serve them.")
    parser.add_argument("--version", action="version", version=f"factorlm {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse, run, turn expected errors into one clear line and exit code 2."""
    DeferInterruptsWhileImporting.install()
    watchdog = InterruptWatchdog()
    watchdog.start()
    try:
        return _run(argv, watchdog)
    except KeyboardInterrupt:
        if watchdog.announce():
            print(INTERRUPTED, file=sys.stderr)
        return 130
    finally:
        watchdog.stop()


def _run(argv: Sequence[str] | None, watchdog: InterruptWatchdog) -> int:
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
    watchdog.watch_outputs([getattr(args, f) for f in OUTPUT_FLAGS if getattr(args, f, None)])
    try:
        return int(args.func(args) or 0)
    except FactorlmError as exc:
        print(f"factorlm: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a disk that fills up, a file that vanishes: the OS message names the path
        if args.verbose:
            raise
        print(f"factorlm: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
