"""``factorlm compress MODEL -o DIR``: write a factored checkpoint."""

from __future__ import annotations

import argparse
import re

from .common import (check_context, check_output, device_type, float_in, input_path, int_at_least, non_negative_int,
                     positive_float, positive_int)

# The names of factorlm.compressor's METHODS and ALLOCATORS registries, spelled out so that
# `compress --help` needs no torch; tests/test_cli_checks.py keeps them equal.
METHOD_NAMES = ("svd", "asvd", "svd-llm", "saes")
ALLOCATION_NAMES = ("uniform", "energy", "greedy", "mgaa", "ara")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("compress", help="factorize a model's linear layers into a factored checkpoint")
    p.add_argument("model", help="dense model folder, or 'sample' for the built-in sample model")
    p.add_argument("-o", "--output", required=True, help="output folder (must not exist unless --overwrite)")
    p.add_argument("--method", default="svd", choices=METHOD_NAMES,
                   help="factorization method (default: svd; saes/svd-llm/asvd calibrate block by block)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--keep", type=float_in(0, 1, low_open=True), default=None,
                        help="fraction of linear-layer parameters kept (default 0.6)")
    budget.add_argument("--reduction", type=float_in(0, 1, low_open=True, high_open=True), default=None,
                        help="fraction of whole-model parameters removed, embeddings included")
    p.add_argument("--allocation", default="uniform", choices=ALLOCATION_NAMES,
                   help="rank allocation across layers (default: uniform)")
    p.add_argument("--rank-multiple", type=positive_int, default=8, help="round ranks to this multiple (default 8)")
    p.add_argument("--min-rank", type=positive_int, default=None, help="smallest rank (default: the rank multiple)")
    p.add_argument("--calib", default=None,
                   help="calibration text: a .txt/.jsonl file, 'sample' (built-in, not WikiText-2) or "
                        "hf:NAME[:CONFIG[:SPLIT]] (default: 'sample' when calibration is needed)")
    p.add_argument("--calib-samples", type=positive_int, default=32, help="calibration windows (default 32)")
    p.add_argument("--calib-len", type=int_at_least(2), default=512, help="tokens per calibration window (default 512)")
    p.add_argument("--seed", type=int, default=0, help="calibration sampling and ARA seed")
    p.add_argument("--device", type=device_type(), default="cpu",
                   help="device the blocks are processed on, e.g. cuda (default cpu)")
    p.add_argument("--batch-size", type=positive_int, default=4,
                   help="calibration windows per block forward (default 4)")
    p.add_argument("--beta", type=float_in(0, 1, hint=" (0 is svd-llm's target, 1 anchors fully to the dense output)"),
                   default=None, help="saes: fixed beta in [0, 1] instead of ACES per layer")
    p.add_argument("--aces", default="holdout", choices=["holdout", "energy"],
                   help="saes: choose beta per layer by held-out teacher-output error (default) or by the "
                        "paper's retained-energy ratio")
    p.add_argument("--stats", default="sequential", choices=["sequential", "one-pass"],
                   help="calibrated methods: gather each group of a block's linears (q/k/v, o, gate/up, down) "
                        "after the earlier groups are factorized, so each layer sees its block's error too "
                        "(sequential, default), or all from one pass of the dense block (faster)")
    corr = p.add_argument_group("correctors (CALR: trained low-rank correctors, folded into the factors at save)")
    corr.add_argument("--corrector", default=None, metavar="auto|RANK",
                      help="add a corrector to every factored layer: 'auto' sizes ranks from the residual energy "
                           "within --corrector-fraction of the linear parameters; an integer fixes the rank. "
                           "Corrector parameters count in --keep/--reduction")
    corr.add_argument("--corrector-fraction", type=float_in(0, 1, low_open=True, high_open=True), default=0.03,
                      help="auto: fraction of the dense linear parameters spent on correctors (default 0.03)")
    corr.add_argument("--corrector-steps", type=non_negative_int, default=100,
                      help="block-level training steps per block (default 100; 0 skips the block stage, and with "
                           "--corrector-layer-steps 0 too the correctors are the closed form alone)")
    corr.add_argument("--corrector-layer-steps", type=non_negative_int, default=50,
                      help="per-layer training steps before the block stage (default 50; 0 skips it)")
    corr.add_argument("--corrector-distill-steps", type=non_negative_int, default=0,
                      help="end-to-end KL distillation steps on the logits after the last block (default 0)")
    corr.add_argument("--corrector-init", choices=("functional", "weight"), default="functional",
                      help="closed-form start from the functional residual (the layer's output error on the "
                           "compressed stream, default) or the weight residual W - UV (plain EoRA)")
    corr.add_argument("--corrector-lr", type=positive_float, default=1e-3,
                      help="learning rate of the layer/block stages")
    corr.add_argument("--corrector-train", choices=("corrector", "all"), default="all",
                      help="train the factors together with the correctors (all, default) or the correctors only")
    corr.add_argument("--corrector-save", choices=("folded", "separate"), default="folded",
                      help="fold correctors into the factors (default; every reader loads it) or keep them apart "
                           "for further training (factorlm fold turns such a checkpoint into a folded one)")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"],
                   help="checkpoint dtype (default: the source's; the math runs in fp32 either way)")
    p.add_argument("--max-shard-size", default="5GB", type=shard_size,
                   help="split the weights into HF-style shards with an index above this size (default 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    from .quantize import add_quant_flags  # --factor-bits: quantize the factors after compression

    add_quant_flags(p.add_argument_group("quantized factors (format version 2)"), "--factor-bits")
    p.set_defaults(func=run)


def build_recipe(args: argparse.Namespace):  # noqa: ANN201 - CompressionRecipe, imported lazily
    """The recipe the flags describe (also used by commands that extend ``compress``)."""
    from ..compressor.pipeline import CompressionRecipe

    keep = args.keep if args.keep is not None or args.reduction is not None else 0.6
    return CompressionRecipe(
        method=args.method, keep=keep, reduction=args.reduction, allocation=args.allocation,
        rank_multiple=args.rank_multiple, min_rank=args.min_rank, source=str(args.model), calib=args.calib,
        calib_samples=args.calib_samples, calib_len=args.calib_len, seed=args.seed, device=args.device,
        batch_size=args.batch_size, beta=args.beta, aces=args.aces,
        sequential=args.stats == "sequential",
    )


_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]i?B)?", re.IGNORECASE)


def shard_size(text: str) -> str | int:
    """A shard size such as ``5GB``, ``500MB`` or a byte count, checked before any work starts."""
    match = _SIZE.fullmatch(text.strip())
    if not match or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive size such as 5GB, 500MB or 1000000, got {text!r}")
    return text.strip() if match.group(2) else int(float(match.group(1)))


def build_hooks(args: argparse.Namespace) -> list:
    """Block hooks selected by flags: the CALR corrector step when ``--corrector`` is given."""
    if getattr(args, "corrector", None) is None:
        return []
    from ..compressor.corrector_pass import CorrectorConfig, CorrectorHook
    from ..runtime.format import FactorlmError

    if args.corrector == "auto":
        rank = None
    else:
        try:
            rank = int(args.corrector)
        except ValueError:
            raise FactorlmError(f"--corrector must be 'auto' or a positive integer, got {args.corrector!r}") from None
    config = CorrectorConfig(rank=rank, fraction=args.corrector_fraction, layer_steps=args.corrector_layer_steps,
                             block_steps=args.corrector_steps, distill_steps=args.corrector_distill_steps,
                             lr=args.corrector_lr, train=args.corrector_train, save=args.corrector_save, multiple=args.rank_multiple,
                             seed=args.seed, init=getattr(args, "corrector_init", "functional"))
    return [CorrectorHook(config)]


def check_args(args: argparse.Namespace) -> None:
    """What the flags alone can tell is wrong, before the model is even materialised."""
    from ..runtime.format import FactorlmError

    corrector = args.corrector
    if corrector is not None and corrector != "auto" and not (corrector.isdigit() and int(corrector) >= 1):
        raise FactorlmError(f"--corrector must be 'auto' or a positive integer, got {corrector!r}")
    if args.beta is not None and args.method != "saes":
        raise FactorlmError(f"--beta applies to --method saes only (got --method {args.method})")
    check_output(args.output, overwrite=args.overwrite, inputs=[input_path(args.model)])
    if getattr(args, "factor_bits", None):
        from .quantize import check_factor_flags

        check_factor_flags(args)


def run(args: argparse.Namespace) -> int:
    check_args(args)
    from ..compressor.pipeline import _needs_calibration, compress_checkpoint
    from .common import resolve_model_path

    model_path = resolve_model_path(args.model)
    recipe = build_recipe(args)
    hooks = build_hooks(args)
    if _needs_calibration(recipe, hooks) or recipe.calibration_source():
        check_context(model_path, args.calib_len, "--calib-len")
    for hook in hooks:
        recipe.extra["corrector"] = {k: getattr(hook.config, k) for k in hook.config.__dataclass_fields__}
    path, report = compress_checkpoint(model_path, args.output, recipe, overwrite=args.overwrite,
                                       progress=not args.no_progress, hooks=hooks, dtype=args.dtype,
                                       max_shard_size=args.max_shard_size)
    if args.factor_bits:
        from .quantize import quantize_output

        quantize_output(args, path)
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
        + (f"\ncorrectors: {t['hooks']['corrector_params']:,} parameters in {t['hooks']['corrected_modules']} "
           f"modules ({'kept separate' if t['hooks'].get('corrector_save') == 'separate' else 'folded into the factors'})"
           if "corrector_params" in t.get("hooks", {}) else "")
    )
