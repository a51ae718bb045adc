"""``factorlm eval ppl DIR --text FILE``: perplexity of a dense or factored model."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="evaluate model quality")
    sub = p.add_subparsers(dest="eval_command", required=True)
    ppl = sub.add_parser("ppl", help="perplexity over non-overlapping windows of a text file")
    ppl.add_argument("model", help="dense or factored model folder, or 'sample'")
    ppl.add_argument("--text", required=True, help="UTF-8 text file (e.g. the WikiText-2 raw test file)")
    ppl.add_argument("--window", type=int, default=2048, help="window length in tokens (default 2048)")
    ppl.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens")
    ppl.add_argument("--json", action="store_true", help="print the result as JSON")
    ppl.add_argument("--no-progress", action="store_true", help="hide progress bars")
    ppl.set_defaults(func=run_ppl)


def run_ppl(args: argparse.Namespace) -> int:
    from ..eval.perplexity import perplexity, read_text
    from ..runtime.checkpoint import load_model, load_tokenizer
    from .common import resolve_model_path

    path = resolve_model_path(args.model)
    model = load_model(path).eval()
    result = perplexity(model, load_tokenizer(path), read_text(args.text), window=args.window,
                        max_tokens=args.max_tokens, progress=not args.no_progress)
    if args.json:
        print(json.dumps(asdict(result)))
    else:
        print(f"perplexity {result.ppl:.4f} over {result.tokens_scored} tokens in {result.windows} window(s)")
    return 0
