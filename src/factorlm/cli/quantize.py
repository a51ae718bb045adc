"""``factorlm quantize DIR -o OUT --bits 8|4``: int8/int4 factors (format version 2).

Quantizes every factored layer's U and V (and, with ``--dense``, the block linears kept
dense, so a dense model becomes the "dense int8" baseline in the same format). ``--rounding
gptq`` uses each layer's input Gram from calibration text (default: the built-in sample
text) for error feedback; ``rtn`` rounds to nearest and needs no data.
"""

from __future__ import annotations

import argparse

from .common import check_output, input_path, int_at_least, positive_int

BITS = (8, 4)
DEFAULT_INT4_GROUP = 32  # divides the sample model's 576/1536 inputs and ranks in multiples of 32


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("quantize", help="store a checkpoint's factors as int8 or int4 (format version 2)")
    p.add_argument("folder", help="factored checkpoint (or a dense model folder with --dense)")
    p.add_argument("-o", "--output", required=True, help="output folder (must not exist unless --overwrite)")
    add_quant_flags(p, "--bits", required=True)
    p.add_argument("--dense", action="store_true",
                   help="also quantize the block linears kept dense (dense int8 baseline in the same format)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)


def add_quant_flags(p: argparse.ArgumentParser, bits_flag: str, required: bool = False) -> None:
    """--bits (or --factor-bits), --group-size, --rounding and the calibration flags GPTQ uses."""
    p.add_argument(bits_flag, type=int, choices=BITS, required=required, default=None,
                   help="bits per stored weight: 8 (per output channel scales) or 4 (group-wise scales)")
    p.add_argument("--group-size", type=positive_int, default=None,
                   help="int4: input columns per scale; must divide every quantized weight's input dim, "
                        "U's is the rank: compress with --rank-multiple 32 for the default (32)")
    p.add_argument("--rounding", default="rtn", choices=("rtn", "gptq"),
                   help="round to nearest (default) or GPTQ error feedback with calibration Grams")
    p.add_argument("--lm-head", action="store_true",
                   help="also quantize the LM head, read once per generated token (a head tied to the "
                        "embeddings is untied; the embeddings stay in floating point unless --embeddings)")
    p.add_argument("--embeddings", action="store_true",
                   help="also store the input embeddings as int8 rows with per-row scales (a tied model needs "
                        "--lm-head too)")
    p.add_argument("--scale-steps", type=int_at_least(0), default=0,
                   help="then train the scales for N steps on KL to the unquantized checkpoint over the "
                        "calibration text, one new window per step (codes and format unchanged; default 0: off)")
    if bits_flag == "--bits":  # compress has its own calibration flags
        p.add_argument("--calib", default="sample", help="calibration text for gptq and --scale-steps, any --calib source of compress "
                                                        "(default: built-in sample text)")
        p.add_argument("--calib-samples", type=positive_int, default=32, help="calibration windows (default 32)")
        p.add_argument("--calib-len", type=int_at_least(2), default=512, help="tokens per window (default 512)")
        p.add_argument("--seed", type=int, default=0, help="calibration sampling seed")


def group_size_of(args: argparse.Namespace, bits: int) -> int | None:
    from ..runtime.format import FactorlmError

    if bits == 8:
        if args.group_size is not None:
            raise FactorlmError("--group-size applies to 4-bit quantization only (int8 is per output channel)")
        return None
    return args.group_size or DEFAULT_INT4_GROUP


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..compressor import check_scheme, check_source

    src = Path(args.folder)
    check_output(args.output, overwrite=args.overwrite, inputs=[input_path(args.folder)])
    group = group_size_of(args, args.bits)
    check_scheme(args.bits, group, args.rounding)
    check_source(src, args.dense)
    from ..compressor import quantize_checkpoint

    info = quantize_checkpoint(src, args.output, bits=args.bits, group_size=group, rounding=args.rounding,
                               dense=args.dense, calib=args.calib, calib_samples=args.calib_samples,
                               calib_len=args.calib_len, seed=args.seed, overwrite=args.overwrite,
                               lm_head=args.lm_head, embeddings=args.embeddings, progress=not args.no_progress,
                               scale_steps=args.scale_steps)
    extras = ", ".join(w for w, on in (("LM head", args.lm_head), ("int8 embeddings", args.embeddings)) if on)
    print(f"quantized {info['modules']} modules{f' ({extras} included)' if extras else ''} to int{args.bits}"
          f"{f' (group {group})' if group else ''}, {args.rounding}; saved to {args.output}")
    print_scale_training(info)
    return 0


def print_scale_training(info: dict) -> None:
    if "scale_training" in info:
        t = info["scale_training"]
        print(f"scale training: held-out KL to the unquantized checkpoint {t['held_out_kl_before']:.4f} -> "
              f"{t['held_out_kl_after']:.4f} ({t['train_tokens']:,} tokens)")


def check_factor_flags(args: argparse.Namespace, rank_multiple: int) -> None:
    """``compress --factor-bits``: the scheme is checked before compression starts.

    Every rank is a multiple of ``rank_multiple`` and is the input dimension of a U factor, so
    an int4 group size must divide it (or the run would fail only after compressing).
    """
    from ..compressor import check_scheme
    from ..runtime.format import FactorlmError

    group = group_size_of(args, args.factor_bits)
    check_scheme(args.factor_bits, group, args.rounding)
    if group is not None and rank_multiple % group:
        raise FactorlmError(f"--group-size {group} does not divide --rank-multiple {rank_multiple}: the factors' "
                            f"ranks are multiples of {rank_multiple}; pass --rank-multiple {group} (or a multiple)")


def quantize_output(args: argparse.Namespace, path: object) -> None:
    """``compress --factor-bits``: quantize the checkpoint just written, in place (atomic replace)."""
    from ..compressor import quantize_checkpoint

    calib = args.calib or "sample"
    info = quantize_checkpoint(path, path, bits=args.factor_bits, group_size=group_size_of(args, args.factor_bits),
                               rounding=args.rounding, calib=calib, calib_samples=args.calib_samples,
                               calib_len=args.calib_len, seed=args.seed, overwrite=True, lm_head=args.lm_head,
                               embeddings=args.embeddings, progress=not args.no_progress,
                               scale_steps=args.scale_steps)
    print_scale_training(info)
