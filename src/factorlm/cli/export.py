"""``factorlm export onnx DIR -o OUT``: a validated ONNX decoder graph with a KV cache."""

from __future__ import annotations

import argparse
import sys

from .common import check_output, input_path, positive_int


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("export", help="export a dense or factored model to another runtime")
    targets = p.add_subparsers(dest="target", metavar="TARGET", required=True)
    o = targets.add_parser("onnx", help="ONNX decoder graph with KV cache, validated against PyTorch")
    o.add_argument("model", help="model folder (dense or factored), or 'sample' for the built-in sample model")
    o.add_argument("-o", "--output", required=True, help="output folder (must not exist unless --overwrite)")
    o.add_argument("--opset", type=positive_int, default=20, help="ONNX opset (18-23, default 20)")
    o.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32",
                   help="graph dtype; fp16 is meant for GPU execution providers")
    o.add_argument("--int8", action="store_true",
                   help="int8 weights (blockwise, MatMulNBits) for every MatMul, factors included")
    o.add_argument("--accuracy-level", type=int, choices=(0, 1, 2, 3, 4), default=None,
                   help="MatMulNBits accuracy_level of quantized MatMuls: 0/1 fp32 compute (default for a "
                        "quantized checkpoint, validated exact), 2 fp16, 3 bf16, 4 int8 activations (faster; "
                        "default with --int8)")
    o.add_argument("--no-fuse", action="store_true",
                   help="keep the traced graph: no RMSNorm fusion, no joining of MatMuls that share an input")
    o.add_argument("--no-validate", action="store_true", help="skip the ONNX Runtime vs PyTorch logit check")
    o.add_argument("--external-data", action="store_true", default=None,
                   help="store weights in model.onnx.data (automatic above 1 GiB of weights)")
    o.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    o.add_argument("--threads", type=positive_int, default=None, help="CPU threads for export and validation")
    o.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..exporters.onnx.export import check_options, export_onnx
    from .common import resolve_model_path

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from pathlib import Path

    # check the cheap things before materialising the sample model
    check_options(Path(args.output), args.opset, args.dtype, args.overwrite, args.accuracy_level)
    check_output(args.output, overwrite=args.overwrite, inputs=[input_path(args.model)])
    path = resolve_model_path(args.model)
    meta = export_onnx(path, args.output, opset=args.opset, dtype=args.dtype, int8=args.int8,
                       validate=not args.no_validate, overwrite=args.overwrite,
                       external_data=args.external_data, threads=args.threads,
                       accuracy_level=args.accuracy_level, fuse=not args.no_fuse)
    v = meta.get("validation")
    check = (f"validated: max |dlogit| {v['max_abs_diff']:.3g} at {v['where']}, "
             f"{v['argmax_mismatches']} argmax mismatches / {v['compared_positions']} positions" if v else "not validated")
    print(f"wrote {args.output}: {meta['graph_bytes'] / 1e6:.1f} MB graph, export {meta['export_s']:.1f} s; {check}",
          file=sys.stderr)
    return 0
