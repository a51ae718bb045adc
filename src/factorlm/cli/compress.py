"""``factorlm compress MODEL -o DIR``: write a factored checkpoint."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("compress", help="factorize a model's linear layers into a factored checkpoint")
    p.add_argument("model", help="dense model folder, or 'sample' for the built-in sample model")
    p.add_argument("-o", "--output", required=True, help="output folder (must not exist unless --overwrite)")
    p.add_argument("--method", default="svd", help="factorization method: svd, asvd, svd-llm (default: svd)")
    p.add_argument("--keep", type=float, default=0.6, help="fraction of linear-layer parameters kept (default 0.6)")
    p.add_argument("--rank-multiple", type=int, default=8, help="round ranks to this multiple (default 8)")
    p.add_argument("--calib", default=None, help="calibration .txt/.jsonl file (asvd, svd-llm)")
    p.add_argument("--calib-samples", type=int, default=32, help="calibration windows (default 32)")
    p.add_argument("--calib-len", type=int, default=512, help="tokens per calibration window (default 512)")
    p.add_argument("--seed", type=int, default=0, help="calibration sampling seed")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..compressor.pipeline import CompressionRecipe, compress_checkpoint
    from .common import resolve_model_path

    model_path = resolve_model_path(args.model)
    recipe = CompressionRecipe(method=args.method, keep=args.keep, rank_multiple=args.rank_multiple,
                               source=str(args.model),
                               extra={"calib": args.calib, "calib_samples": args.calib_samples,
                                      "calib_len": args.calib_len, "seed": args.seed} if args.calib else {})
    path, report = compress_checkpoint(model_path, args.output, recipe, overwrite=args.overwrite,
                                       progress=not args.no_progress)
    print(format_totals(report["totals"]))
    print(f"saved factored checkpoint to {path}")
    return 0


def format_totals(t: dict) -> str:
    """Both budget views, since papers use 'ratio' in opposite senses."""
    return (
        f"linear-layer parameters: {t['linear_params_before']:,} -> {t['linear_params_after']:,} "
        f"(kept {t['linear_keep']:.1%})\n"
        f"whole-model parameters:  {t['model_params_before']:,} -> {t['model_params_after']:,} "
        f"(kept {t['model_keep']:.1%}, removed {1 - t['model_keep']:.1%})\n"
        f"modules: {t['factored_modules']} factored, {t['dense_modules']} kept dense"
    )
