"""``factorlm finetune DIR --teacher DENSE -o OUT``: end-to-end KL distillation of a factored checkpoint."""

from __future__ import annotations

import argparse
import os

from .common import (check_context, check_output, device_type, input_path, int_at_least, positive_float, positive_int,
                     resolve_model_path)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "finetune", help="train a factored checkpoint's factors (and separate correctors), or a quantized one's scales, "
             "on KL to its teacher")
    p.add_argument("folder", help="factored checkpoint folder")
    p.add_argument("--teacher", required=True, help="the model it was compressed (or quantized) from: folder, or 'sample'")
    p.add_argument("-o", "--output", required=True, help="output folder (must not exist unless --overwrite)")
    p.add_argument("--calib", default="sample",
                   help="training text: a .txt/.jsonl file, 'sample', 'austen', hf:NAME[:CONFIG[:SPLIT]], or several "
                        "joined by commas, interleaved (default: sample); "
                        "the last 10%% of its tokens are held out to measure the gain")
    p.add_argument("--steps", type=positive_int, default=100, help="optimiser steps (default 100)")
    p.add_argument("--lr", type=positive_float, default=None,
                   help="peak learning rate (Adam, warm-up then cosine; default 3e-5, or with --train scales 3e-3 "
                        "relative to each scale tensor's mean)")
    p.add_argument("--samples", type=positive_int, default=None,
                   help="training windows, cycled over when fewer than the steps (default: one per step)")
    p.add_argument("--seq-len", type=int_at_least(2), default=512, help="tokens per window (default 512)")
    p.add_argument("--held-out", type=positive_int, default=4,
                   help="held-out windows for the before/after KL (default 4)")
    p.add_argument("--train", choices=("all", "correctors", "scales"), default="all",
                   help="train every factor and corrector (default), only separate correctors, or only the scales "
                        "of a quantized checkpoint (its codes stay; use the checkpoint it was quantized from as "
                        "--teacher)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", type=device_type(("cpu", "cuda")), default="cpu", help="training device, e.g. cuda (bf16 autocast there; default cpu)")
    p.add_argument("--batch-size", type=positive_int, default=1, help="windows per micro-batch per process (default 1)")
    p.add_argument("--grad-accum", type=positive_int, default=1,
                   help="micro-batches accumulated per optimiser step; global batch = batch-size x grad-accum x "
                        "processes (default 1)")
    p.add_argument("--parallel", choices=("ddp", "fsdp"), default="ddp",
                   help="under torchrun with several processes: ddp (a full model copy per process, default) or "
                        "fsdp (parameters sharded per decoder block, for models that do not fit one device)")
    p.add_argument("--top-k", type=positive_int, default=None,
                   help="cache the teacher's top-k log-probabilities once instead of running it every step")
    p.add_argument("--teacher-cache", default=None, help="folder for the teacher top-k cache (reused across runs)")
    p.add_argument("--save-every", type=int_at_least(0), default=0,
                   help="write a resumable training state to OUTPUT.train-state every N steps (default 0: never)")
    p.add_argument("--bf16", action="store_true",
                   help="CPU bf16 autocast on the student's and teacher's forwards (fp32 weights, Adam and loss)")
    p.add_argument("--snapshot-steps", type=positive_int, nargs="+", default=(),
                   help="also write the model after these steps to OUTPUT.snapshots/step-N (for a healing curve)")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT.train-state (same settings)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_output(args.output, overwrite=args.overwrite, inputs=[input_path(args.folder), input_path(args.teacher)])
    from ..compressor import FinetuneConfig, finetune_checkpoint

    student, teacher = resolve_model_path(args.folder), resolve_model_path(args.teacher)
    for model in (student, teacher):
        check_context(model, args.seq_len, "--seq-len")
    cfg = FinetuneConfig(steps=args.steps, lr=args.lr, samples=args.samples, seq_len=args.seq_len,
                         held_out=args.held_out, train=args.train, seed=args.seed, batch_size=args.batch_size,
                         grad_accum=args.grad_accum, top_k=args.top_k, cache_dir=args.teacher_cache,
                         save_every=args.save_every, device=args.device, parallel=args.parallel,
                         bf16=args.bf16)
    path, report = finetune_checkpoint(student, teacher, args.output, args.calib, cfg, overwrite=args.overwrite,
                                       progress=not args.no_progress, resume=args.resume,
                                       snapshot_steps=args.snapshot_steps)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # under torchrun only rank 0 reports
    print(f"held-out KL to the teacher: {report['held_out_kl_before']:.4f} -> {report['held_out_kl_after']:.4f} "
          f"({report['trained_params']:,} parameters, {args.steps} steps, {report['seconds']['train']:.0f} s, "
          f"{report['tokens_per_s']:.0f} tokens/s, {report['world_size']} process(es))")
    print(f"saved factored checkpoint to {path}")
    return 0
