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


class Given(argparse.Action):
    """Store the value and note that the flag was given: flags given beside ``--recipe`` override it."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        setattr(namespace, self.dest, values)
        namespace.given = set(getattr(namespace, "given", set())) | {self.dest}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "compress", help="factorize a model's linear layers into a factored checkpoint",
        description="Compress a dense model. --recipe FILE runs a saved recipe (for example a checkpoint's "
                    "factorlm_recipe.yaml, or one under recipes/); any recipe flag given beside it overrides "
                    "that field of the recipe.")
    p.add_argument("model", help="dense model folder, or 'sample' for the built-in sample model")
    p.add_argument("-o", "--output", required=True, help="output folder (must not exist unless --overwrite)")
    p.add_argument("--recipe", default=None, metavar="FILE",
                   help="run a saved recipe (YAML: method, allocation, budget, calibration, correctors, healing); "
                        "flags given explicitly override its fields")
    p.add_argument("--method", action=Given, default="svd", choices=METHOD_NAMES,
                   help="factorization method (default: svd; saes/svd-llm/asvd calibrate block by block)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--keep", action=Given, type=float_in(0, 1, low_open=True), default=None,
                        help="fraction of linear-layer parameters kept (default 0.6)")
    budget.add_argument("--reduction", action=Given, type=float_in(0, 1, low_open=True, high_open=True), default=None,
                        help="fraction of whole-model parameters removed, embeddings included")
    p.add_argument("--allocation", action=Given, default="uniform", choices=ALLOCATION_NAMES,
                   help="rank allocation across layers (default: uniform)")
    p.add_argument("--rank-multiple", action=Given, type=positive_int, default=8,
                   help="round ranks to this multiple (default 8)")
    p.add_argument("--min-rank", action=Given, type=positive_int, default=None,
                   help="smallest rank (default: the rank multiple)")
    p.add_argument("--calib", action=Given, default=None,
                   help="calibration text: a .txt/.jsonl file, 'sample' (built-in, not WikiText-2), 'austen', "
                        "hf:NAME[:CONFIG[:SPLIT]], or several joined by commas (interleaved) "
                        "(default: 'sample' when calibration is needed)")
    p.add_argument("--calib-samples", action=Given, type=positive_int, default=32,
                   help="calibration windows (default 32)")
    p.add_argument("--calib-len", action=Given, type=int_at_least(2), default=512,
                   help="tokens per calibration window (default 512)")
    p.add_argument("--seed", action=Given, type=int, default=0, help="calibration sampling and ARA seed")
    p.add_argument("--device", action=Given, type=device_type(), default="cpu",
                   help="device the blocks are processed on, e.g. cuda (default cpu)")
    p.add_argument("--batch-size", action=Given, type=positive_int, default=4,
                   help="calibration windows per block forward (default 4)")
    p.add_argument("--beta", action=Given,
                   type=float_in(0, 1, hint=" (0 is svd-llm's target, 1 anchors fully to the dense output)"),
                   default=None, help="saes: fixed beta in [0, 1] instead of ACES per layer")
    p.add_argument("--aces", action=Given, default="holdout", choices=["holdout", "energy"],
                   help="saes: choose beta per layer by held-out teacher-output error (default) or by the "
                        "paper's retained-energy ratio")
    p.add_argument("--stats", action=Given, default="sequential", choices=["sequential", "one-pass"],
                   help="calibrated methods: gather each group of a block's linears (q/k/v, o, gate/up, down) "
                        "after the earlier groups are factorized, so each layer sees its block's error too "
                        "(sequential, default), or all from one pass of the dense block (faster)")
    corr = p.add_argument_group("correctors (CALR: trained low-rank correctors, folded into the factors at save)")
    corr.add_argument("--corrector", action=Given, default=None, metavar="auto|RANK",
                      help="add a corrector to every factored layer: 'auto' sizes ranks from the residual energy "
                           "within --corrector-fraction of the linear parameters; an integer fixes the rank. "
                           "Corrector parameters count in --keep/--reduction")
    corr.add_argument("--corrector-fraction", action=Given, type=float_in(0, 1, low_open=True, high_open=True),
                      default=0.03,
                      help="auto: fraction of the dense linear parameters spent on correctors (default 0.03)")
    corr.add_argument("--corrector-steps", action=Given, type=non_negative_int, default=100,
                      help="block-level training steps per block (default 100; 0 skips the block stage, and with "
                           "--corrector-layer-steps 0 too the correctors are the closed form alone)")
    corr.add_argument("--corrector-layer-steps", action=Given, type=non_negative_int, default=50,
                      help="per-layer training steps before the block stage (default 50; 0 skips it)")
    corr.add_argument("--corrector-distill-steps", action=Given, type=non_negative_int, default=0,
                      help="end-to-end KL distillation steps on the logits after the last block (default 0)")
    corr.add_argument("--corrector-init", action=Given, choices=("functional", "weight"), default="functional",
                      help="closed-form start from the functional residual (the layer's output error on the "
                           "compressed stream, default) or the weight residual W - UV (plain EoRA)")
    corr.add_argument("--corrector-lr", action=Given, type=positive_float, default=1e-3,
                      help="learning rate of the layer/block stages")
    corr.add_argument("--corrector-train", action=Given, choices=("corrector", "all"), default="all",
                      help="train the factors together with the correctors (all, default) or the correctors only")
    corr.add_argument("--corrector-save", action=Given, choices=("folded", "separate"), default="folded",
                      help="fold correctors into the factors (default; every reader loads it) or keep them apart "
                           "for further training (factorlm fold turns such a checkpoint into a folded one)")
    p.add_argument("--dtype", action=Given, default=None, choices=["bf16", "fp16", "fp32"],
                   help="checkpoint dtype (default: the source's; the math runs in fp32 either way)")
    p.add_argument("--max-shard-size", default="5GB", type=shard_size,
                   help="split the weights into HF-style shards with an index above this size (default 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run of the same recipe on the same output from its last finished block")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    from .quantize import add_quant_flags  # --factor-bits: quantize the factors after compression

    add_quant_flags(p.add_argument_group("quantized factors (format version 2)"), "--factor-bits")
    p.set_defaults(func=run)


# flag dest -> recipe field, for flags that map one to one
FLAG_FIELDS = {"method": "method", "keep": "keep", "reduction": "reduction", "allocation": "allocation",
               "rank_multiple": "rank_multiple", "min_rank": "min_rank", "calib": "calib",
               "calib_samples": "calib_samples", "calib_len": "calib_len", "seed": "seed", "device": "device",
               "batch_size": "batch_size", "beta": "beta", "aces": "aces", "dtype": "dtype"}
# corrector flag dest -> field of the recipe's corrector section
CORRECTOR_FLAGS = {"corrector_fraction": "fraction", "corrector_steps": "block_steps",
                   "corrector_layer_steps": "layer_steps", "corrector_distill_steps": "distill_steps",
                   "corrector_init": "init", "corrector_lr": "lr", "corrector_train": "train",
                   "corrector_save": "save"}


def corrector_rank(value: str):  # noqa: ANN201 - int | None
    """``auto`` (None) or a positive rank; anything else is refused naming the flag."""
    from ..runtime.format import FactorlmError

    if value == "auto":
        return None
    if not (value.isdigit() and int(value) >= 1):
        raise FactorlmError(f"--corrector must be 'auto' or a positive integer, got {value!r}")
    return int(value)


def corrector_section(args: argparse.Namespace) -> dict | None:
    """The recipe's corrector section the flags describe (None without ``--corrector``)."""
    if getattr(args, "corrector", None) is None:
        return None
    from ..compressor import CorrectorConfig

    config = CorrectorConfig(rank=corrector_rank(args.corrector), fraction=args.corrector_fraction,
                             layer_steps=args.corrector_layer_steps, block_steps=args.corrector_steps,
                             distill_steps=args.corrector_distill_steps, lr=args.corrector_lr,
                             train=args.corrector_train, save=args.corrector_save, multiple=args.rank_multiple,
                             seed=args.seed, init=getattr(args, "corrector_init", "functional"))
    return {k: getattr(config, k) for k in config.__dataclass_fields__}


def build_recipe(args: argparse.Namespace):  # noqa: ANN201 - CompressionRecipe
    """The recipe the flags describe: ``--recipe``'s with the flags given explicitly overriding its fields."""
    from ..compressor import CompressionRecipe, as_recipe, load_recipe

    if getattr(args, "recipe", None) is None:
        keep = args.keep if args.keep is not None or args.reduction is not None else 0.6
        recipe = CompressionRecipe(
            method=args.method, keep=keep, reduction=args.reduction, allocation=args.allocation,
            rank_multiple=args.rank_multiple, min_rank=args.min_rank, source=str(args.model), calib=args.calib,
            calib_samples=args.calib_samples, calib_len=args.calib_len, seed=args.seed, device=args.device,
            batch_size=args.batch_size, beta=args.beta, aces=args.aces, sequential=args.stats == "sequential",
            dtype=args.dtype, corrector=corrector_section(args),
        )
        return as_recipe(recipe, "command line")
    recipe = load_recipe(args.recipe)
    given = getattr(args, "given", set())
    for dest in given:
        if dest in FLAG_FIELDS:
            setattr(recipe, FLAG_FIELDS[dest], getattr(args, dest))
    if "keep" in given:
        recipe.reduction = None
    if "reduction" in given:
        recipe.keep = None
    if "stats" in given:
        recipe.sequential = args.stats == "sequential"
    if "corrector" in given:
        recipe.corrector = {**(recipe.corrector or {}), **corrector_section(args)}  # type: ignore[dict-item]
    if recipe.corrector is not None:
        section = dict(recipe.corrector)
        section.update({field: getattr(args, dest) for dest, field in CORRECTOR_FLAGS.items() if dest in given})
        if "seed" in given:
            section["seed"] = args.seed
        if "rank_multiple" in given:
            section["multiple"] = args.rank_multiple
        recipe.corrector = section
    recipe.source = str(args.model)
    where = f"{args.recipe} (with the flags given on the command line)" if given else str(args.recipe)
    return as_recipe(recipe, where)


_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]i?B)?", re.IGNORECASE)


def shard_size(text: str) -> str | int:
    """A shard size such as ``5GB``, ``500MB`` or a byte count, checked before any work starts."""
    match = _SIZE.fullmatch(text.strip())
    if not match or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive size such as 5GB, 500MB or 1000000, got {text!r}")
    return text.strip() if match.group(2) else int(float(match.group(1)))


def check_args(args: argparse.Namespace):  # noqa: ANN201 - CompressionRecipe
    """What the flags and the recipe file alone can tell is wrong, before the model is even materialised."""
    if args.corrector is not None:
        corrector_rank(args.corrector)
    if args.beta is not None and args.recipe is None and args.method != "saes":
        from ..runtime.format import FactorlmError

        raise FactorlmError(f"--beta applies to --method saes only (got --method {args.method})")
    recipe = build_recipe(args)  # recipe file errors (key, type, version) come first, without torch
    check_output(args.output, overwrite=args.overwrite, inputs=[input_path(args.model)])
    if args.factor_bits:
        from .quantize import check_factor_flags

        check_factor_flags(args, recipe.rank_multiple)
    else:  # the quantization flags mean nothing without --factor-bits: refused, not ignored
        given = {"--lm-head": args.lm_head, "--embeddings": args.embeddings,
                 "--group-size": args.group_size is not None, "--scale-steps": args.scale_steps > 0}
        flag = next((f for f, on in given.items() if on), None)
        if flag is not None:
            from ..runtime.format import FactorlmError

            raise FactorlmError(f"{flag} applies to quantized factors; pass --factor-bits 8|4 with it")
    from ..compressor import check_recipe

    return check_recipe(recipe, str(args.recipe or "command line"))


def run(args: argparse.Namespace) -> int:
    recipe = check_args(args)
    from ..compressor import compress, needs_calibration
    from .common import resolve_model_path

    model_path = resolve_model_path(args.model)
    if needs_calibration(recipe) or recipe.calibration_source():
        check_context(model_path, recipe.calib_len, "--calib-len")
    if recipe.heal is not None:
        check_context(model_path, int(recipe.heal.get("seq_len", 512)), "heal.seq_len")
    path, report = compress(model_path, args.output, recipe, overwrite=args.overwrite,
                            progress=not args.no_progress, max_shard_size=args.max_shard_size,
                            resume=getattr(args, "resume", False))
    if args.factor_bits:
        from .quantize import quantize_output

        quantize_output(args, path)
    print(format_totals(report["totals"]))
    if "heal" in report:
        h = report["heal"]
        print(f"healing: held-out KL to the dense model {h['held_out_kl_before']:.4f} -> {h['held_out_kl_after']:.4f}")
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
